"""serpent.layers against the timm layers it stands in for: same values, same RNG draws."""
import pytest
import torch

from serpent import layers

timm_layers = pytest.importorskip("timm.layers")


@pytest.mark.parametrize("shape,kw", [((180, 540), dict(std=0.02)), ((225, 6), dict(std=0.02)),
                                      ((7, 3, 5), dict(mean=0.5, std=2.0, a=-1.0, b=3.0))])
def test_trunc_normal_draws_what_timm_draws(shape, kw):
    torch.manual_seed(0)
    ours = layers.trunc_normal_(torch.empty(shape), **kw)
    after_ours = torch.rand(3)
    torch.manual_seed(0)
    theirs = timm_layers.trunc_normal_(torch.empty(shape), **kw)
    assert torch.equal(ours, theirs) and torch.equal(after_ours, torch.rand(3))


def test_trunc_normal_leaves_meta_tensors_alone():
    t = torch.empty(4, 5, device="meta")
    assert layers.trunc_normal_(t, std=0.02) is t


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_drop_path_equals_timm(p):
    x = torch.randn(8, 5, 4, 4)
    ours, theirs = layers.DropPath(p), timm_layers.DropPath(p)
    assert repr(ours) == repr(theirs)
    for train in (True, False):
        ours.train(train), theirs.train(train)
        torch.manual_seed(1)
        a = ours(x)
        torch.manual_seed(1)
        assert torch.equal(a, theirs(x))
    assert torch.equal(ours(x), x)  # eval: identity


@pytest.mark.parametrize("x", [8, (8, 4), [2, 3], "ab"])
def test_to_2tuple_equals_timm(x):
    assert layers.to_2tuple(x) == timm_layers.to_2tuple(x)

"""NAFNet: official parameter counts and names, LayerNorm2d, TLC pool, and a functional reference."""
import pytest
import torch
import torch.nn.functional as F

from baselines.nafnet import LayerNorm2d, LocalAvgPool2d, NAFNet
from bench.registry import create_model, model_info

TINY = dict(width=4, enc_blk_nums=(1, 2), middle_blk_num=1, dec_blk_nums=(2, 1))


def meta_model(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,task,expected", [
    ("nafnet_w64", "deblur", 67_888_835),  # GoPro width 64: the published 67.89M
    ("nafnet_w32", "deblur", 17_111_907),  # GoPro width 32
    ("nafnet_w64", "denoise", 115_982_915),  # SIDD width 64
    ("nafnet_w32", "denoise", 29_159_715),  # SIDD width 32
    ("nafnet", "deblur", 67_888_835),  # default width is 64
    ("nafnet_w32", "sr", 17_111_907),  # SR: the GoPro network on the bicubic input
])
def test_param_counts(name, task, expected):
    assert n_params(meta_model(name, task=task)) == expected


def test_registry_entries():
    for name in ("nafnet", "nafnet_w32", "nafnet_w64"):
        info = model_info(name)
        assert (info.family, info.multiple, info.upsampler) == ("conv", 1, False)
        assert set(info.tasks) == {"deblur", "denoise", "sr"}
    assert model_info("nafnet_w32").defaults == {"width": 32}


def test_official_key_names_and_shapes():
    sd = meta_model("nafnet_w64", task="deblur").state_dict()
    expected = {
        "intro.weight": (64, 3, 3, 3),
        "ending.weight": (3, 64, 3, 3),
        "encoders.0.0.norm1.weight": (64,),
        "encoders.0.0.beta": (1, 64, 1, 1),
        "encoders.0.0.conv2.weight": (128, 1, 3, 3),
        "encoders.3.27.sca.1.weight": (512, 512, 1, 1),
        "downs.0.weight": (128, 64, 2, 2),
        "middle_blks.0.gamma": (1, 1024, 1, 1),
        "ups.0.0.weight": (2048, 1024, 1, 1),
        "decoders.3.0.conv5.bias": (64,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert "ups.0.0.bias" not in sd  # the official up-conv has no bias
    assert len(sd) == 4 + 4 * 2 + 4 * 1 + 36 * 18  # intro/ending, downs, ups, 36 blocks of 18


def test_layernorm2d_matches_formula_float64():
    torch.manual_seed(0)
    ln = LayerNorm2d(5).double()
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 3, 4, dtype=torch.float64)

    mu = x.mean(1, keepdim=True)
    var = ((x - mu) ** 2).mean(1, keepdim=True)
    xhat = (x - mu) / (var + ln.eps).sqrt()
    ref = ln.weight.view(1, -1, 1, 1) * xhat + ln.bias.view(1, -1, 1, 1)
    ref_grads = torch.autograd.grad(ref, (x, ln.weight, ln.bias), g)

    out = ln(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out, (x, ln.weight, ln.bias), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # the official hand-written backward: dx = (gw - xhat * mean(gw * xhat) - mean(gw)) / std
    gw = g * ln.weight.view(1, -1, 1, 1)
    dx = (gw - xhat * (gw * xhat).mean(1, keepdim=True) - gw.mean(1, keepdim=True)) / (var + ln.eps).sqrt()
    torch.testing.assert_close(grads[0], dx.detach(), rtol=1e-10, atol=1e-10)


def test_layernorm2d_keeps_memory_format():
    ln = LayerNorm2d(6)
    x = torch.randn(2, 6, 5, 7)
    assert ln(x).is_contiguous()
    y = ln(x.contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ln(x))


def _ln(x, w, b):
    mu = x.mean(1, keepdim=True)
    var = ((x - mu) ** 2).mean(1, keepdim=True)
    return (x - mu) / (var + 1e-6).sqrt() * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def _block(x, p):
    """NAFBlock from the paper (Fig. 3c/4), written with functional ops on the state dict."""
    def conv(t, name, **kw):
        return F.conv2d(t, p[name + ".weight"], p[name + ".bias"], **kw)

    def gate(t):
        a, b = t.chunk(2, dim=1)
        return a * b

    t = conv(_ln(x, p["norm1.weight"], p["norm1.bias"]), "conv1")
    t = gate(conv(t, "conv2", padding=1, groups=t.shape[1]))
    t = t * conv(t.mean((2, 3), keepdim=True), "sca.1")
    y = x + conv(t, "conv3") * p["beta"]
    t = gate(conv(_ln(y, p["norm2.weight"], p["norm2.bias"]), "conv4"))
    return y + conv(t, "conv5") * p["gamma"]


def _reference(x, sd, cfg):
    def sub(prefix):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

    h, w = x.shape[-2:]
    m = 2 ** len(cfg["enc_blk_nums"])
    xp = F.pad(x, (0, -w % m, 0, -h % m))
    t = F.conv2d(xp, sd["intro.weight"], sd["intro.bias"], padding=1)
    skips = []
    for i, n in enumerate(cfg["enc_blk_nums"]):
        for j in range(n):
            t = _block(t, sub(f"encoders.{i}.{j}."))
        skips.append(t)
        t = F.conv2d(t, sd[f"downs.{i}.weight"], sd[f"downs.{i}.bias"], stride=2)
    for j in range(cfg["middle_blk_num"]):
        t = _block(t, sub(f"middle_blks.{j}."))
    for i, n in enumerate(cfg["dec_blk_nums"]):
        t = F.pixel_shuffle(F.conv2d(t, sd[f"ups.{i}.0.weight"]), 2) + skips[-1 - i]
        for j in range(n):
            t = _block(t, sub(f"decoders.{i}.{j}."))
    t = F.conv2d(t, sd["ending.weight"], sd["ending.bias"], padding=1) + xp
    return t[..., :h, :w]


@pytest.mark.parametrize("size", [(16, 16), (13, 21)])
def test_forward_matches_functional_reference(size):
    torch.manual_seed(0)
    model = NAFNet(**TINY).double().eval()
    with torch.no_grad():
        for p in model.parameters():  # beta/gamma start at zero: randomize everything
            p.normal_(0, 0.3)
    x = torch.rand(2, 3, *size, dtype=torch.float64)
    out = model(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _reference(x, model.state_dict(), TINY), rtol=1e-10, atol=1e-10)


def test_state_dict_round_trip_strict(tmp_path):
    torch.manual_seed(0)
    a, b = NAFNet(**TINY), NAFNet(**TINY)
    with torch.no_grad():
        for p in a.parameters():
            p.normal_()
    torch.save(a.state_dict(), tmp_path / "w.pth")
    b.load_state_dict(torch.load(tmp_path / "w.pth", weights_only=True), strict=True)
    x = torch.rand(1, 3, 9, 11)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_local_avg_pool_matches_box_mean():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 10, dtype=torch.float64)
    out = LocalAvgPool2d(4)(x)
    ref = F.pad(F.avg_pool2d(x, 4, stride=1), (1, 2, 1, 2), mode="replicate")
    torch.testing.assert_close(out, ref)
    # kernel taller than the map: full-height windows sliding along the width
    out = LocalAvgPool2d(8)(x)
    ref = F.pad(F.avg_pool2d(x, (7, 8), stride=1), (3, 4, 3, 3), mode="replicate")
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(LocalAvgPool2d(10)(x), x.mean((2, 3), keepdim=True))


def test_tlc_kernels_and_checkpoint_compatibility():
    m = meta_model("nafnet_w64", task="deblur", tlc=True)  # the official GoPro test network
    assert m.encoders[0][0].sca[0].kernel_size == 384
    assert m.encoders[3][27].sca[0].kernel_size == 48
    assert m.middle_blks[0].sca[0].kernel_size == 24
    assert m.decoders[0][0].sca[0].kernel_size == 48
    assert m.decoders[3][0].sca[0].kernel_size == 384
    # same keys as the plain network; below the kernel size it is the same function
    torch.manual_seed(0)
    plain, local = NAFNet(**TINY), NAFNet(**TINY, tlc=True)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.3)
    local.load_state_dict(plain.state_dict(), strict=True)
    x = torch.rand(1, 3, 24, 20)
    torch.testing.assert_close(local(x), plain(x))


# ------------------------------------------------------------------------ formulations (issue 13)

from baselines import channel_norm  # noqa: E402
from baselines import nafnet as nafnet_module  # noqa: E402


@pytest.fixture
def interpret(monkeypatch):
    """The Triton channel norm runs on CPU tensors through Triton's interpreter."""
    pytest.importorskip("triton")
    monkeypatch.setattr(channel_norm, "INTERPRET_ON_CPU", True)


@pytest.mark.parametrize("impl", nafnet_module.NORM_IMPLS)
def test_layernorm2d_impls_match_formula_float64(interpret, impl):
    torch.manual_seed(0)
    ln = LayerNorm2d(5, norm_impl=impl).double()
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    ref = _ln(x, ln.weight, ln.bias)
    out = ln(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    params = (x, ln.weight, ln.bias)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tlc", [False, True])
def test_every_formulation_is_the_official_function_float64(interpret, tlc):
    torch.manual_seed(0)
    model = NAFNet(**TINY, tlc=tlc, formulation="official").double()
    with torch.no_grad():
        for p in model.parameters():  # beta/gamma start at zero: randomize everything
            p.normal_(0, 0.3)
    x = torch.rand(1, 3, 13, 21, dtype=torch.float64)

    def run():
        model.zero_grad()
        y = model(x)
        y.square().mean().backward()
        return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref, ref_grads = run()
    if not tlc:  # the official formulation is the paper's block, written out functionally
        torch.testing.assert_close(ref, _reference(x, model.state_dict(), TINY),
                                   rtol=1e-10, atol=1e-10)
    for form in nafnet_module.FORMULATIONS:
        model.set_formulation(form)
        out, grads = run()
        assert out.is_contiguous(), form
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12, msg=form)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-10, atol=1e-12,
                                       msg=f"{form} {name}")


def test_formulation_presets():
    model = NAFNet(**TINY, formulation="fused_cl")
    assert {m.norm_impl for m in model.modules() if isinstance(m, LayerNorm2d)} == {"triton"}
    assert model.intro.weight.is_contiguous(memory_format=torch.channels_last)
    assert nafnet_module.DEFAULT_FORMULATION in nafnet_module.FORMULATIONS
    with pytest.raises(ValueError, match="formulation"):
        NAFNet(**TINY, formulation="fastest")
    m = meta_model("nafnet_w32", task="deblur", formulation="official", fused_residual=True)
    assert m.formulation_settings == {**nafnet_module.FORMULATIONS["official"],
                                      "fused_residual": True}

"""Restormer: official sizes, SDPA vs the official math path, the LayerNorms vs their formulas."""
import pytest
import torch

import bench
from baselines.attention import set_attn_impl
from baselines.restormer import LayerNorm, Restormer

TINY = dict(dim=8, num_blocks=[1, 2, 1, 1], num_refinement_blocks=1, heads=[1, 2, 2, 4])


def tiny(**kw):
    torch.manual_seed(0)
    model = Restormer(**{**TINY, **kw}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("temperature"):
                p.uniform_(0.5, 4.0)  # the official init is 1: make the scale matter
            elif "norm" in name:
                p.normal_(0 if name.endswith("bias") else 1, 0.2)
    return model


def param_count(model):
    return sum(p.numel() for p in model.parameters())


def expected_params(with_bias: bool) -> int:
    """The official Restormer's size, block by block (bias=False convs, 3x3 dwconvs)."""
    def block(c, heads):
        hidden = int(c * 2.66)
        norms = 2 * (2 * c if with_bias else c)
        attn = heads + 3 * c * c + 3 * c * 9 + c * c
        ffn = c * 2 * hidden + 2 * hidden * 9 + hidden * c
        return norms + attn + ffn

    d = 48
    blocks = (4 * block(d, 1) + 6 * block(2 * d, 2) + 6 * block(4 * d, 4) + 8 * block(8 * d, 8)
              + 6 * block(4 * d, 4) + 6 * block(2 * d, 2) + 4 * block(2 * d, 1)
              + 4 * block(2 * d, 1))
    convs = (3 * d * 9 + sum(c * c // 2 * 9 for c in (d, 2 * d, 4 * d))  # embed, downsamples
             + sum(c * 2 * c * 9 for c in (8 * d, 4 * d, 2 * d))  # upsamples
             + 8 * d * 4 * d + 4 * d * 2 * d + 2 * d * 3 * 9)  # reduce_chan x2, output
    return blocks + convs


def test_official_parameter_counts():
    with torch.device("meta"):
        deblur = bench.create_model("restormer", task="deblur")
        denoise = bench.create_model("restormer", task="denoise")
        sr = bench.create_model("restormer", task="sr", scale=4)
    assert param_count(deblur) == param_count(sr) == 26_126_644 == expected_params(True)  # 26.13M
    assert param_count(denoise) == 26_111_668 == expected_params(False)  # BiasFree LayerNorm


def test_registry_entry_and_attn_impl_override():
    info = bench.registry.model_info("restormer")
    assert (info.family, info.multiple, info.upsampler) == ("attention", 8, False)
    with torch.device("meta"):
        model = bench.create_model("restormer", task="deblur", attn_impl="math")
    impls = {m.attn_impl for m in model.modules() if hasattr(m, "attn_impl")}
    assert impls == {"math"}
    with pytest.raises(ValueError, match="attn_impl"):
        Restormer(**TINY, attn_impl="flash")


@pytest.mark.parametrize("norm", ["WithBias", "BiasFree"])
@pytest.mark.parametrize("size", [(24, 40), (16, 8)])
def test_sdpa_equals_math(norm, size):
    model = tiny(LayerNorm_type=norm)
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        a = set_attn_impl(model, "sdpa")(x)
        b = set_attn_impl(model, "math")(x)
    assert a.shape == x.shape
    assert (a - b).abs().max() < 1e-5


def test_gradients_equal_between_paths():
    model = tiny().train()
    x = torch.rand(1, 3, 16, 24)
    grads = {}
    for impl in ("sdpa", "math"):
        model.zero_grad()
        set_attn_impl(model, impl)(x).square().mean().backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["sdpa"].items():
        assert torch.allclose(g, grads["math"][name], atol=1e-5, rtol=1e-4), name


def test_input_must_be_a_multiple_of_8():
    with pytest.raises(ValueError, match="divisible by 8"):
        tiny()(torch.rand(1, 3, 20, 24))


@pytest.mark.parametrize("kind", ["WithBias", "BiasFree"])
def test_layernorm_is_the_official_formula(kind):
    torch.manual_seed(1)
    norm = LayerNorm(6, kind)
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_(0.5, 1.0)
    x = torch.randn(2, 6, 5, 7) * 3 + 1
    t = x.permute(0, 2, 3, 1)  # official to_3d: normalise each pixel over channels
    var = t.var(-1, keepdim=True, unbiased=False)
    if kind == "WithBias":
        ref = (t - t.mean(-1, keepdim=True)) / torch.sqrt(var + 1e-5)
        ref = ref * norm.body.weight + norm.body.bias
    else:
        ref = t / torch.sqrt(var + 1e-5) * norm.body.weight
    out = norm(x)
    assert (out - ref.permute(0, 3, 1, 2)).abs().max() < 1e-5
    assert out.is_contiguous()  # NCHW in, NCHW out
    assert norm(x.contiguous(memory_format=torch.channels_last)).is_contiguous(
        memory_format=torch.channels_last)


def test_published_flops_are_the_convolutions():
    """Restormer's 140.99 G at 256x256 (KAIR's counter: Conv2d MACs only) is our conv share."""
    from bench.measure.flops import count_flops

    with torch.device("meta"):
        model = bench.create_model("restormer", task="deblur", attn_impl="sdpa")
    f = count_flops(model, (1, 3, 256, 256))
    assert round(f.by_category_gmacs["conv"], 2) == 140.99
    # transposed attention, per head: (c x HW) @ (HW x c) and (c x c) @ (c x HW), c = C / heads
    stages = [(4, 48, 1, 256), (12, 96, 2, 128), (12, 192, 4, 64), (8, 384, 8, 32),
              (8, 96, 1, 256)]  # (blocks, channels, heads, side); last: decoder_level1 + refinement
    attn = sum(n * 2 * ch * (ch // h) * side * side for n, ch, h, side in stages)
    assert round(f.by_category_gmacs["sdpa"] * 1e9) == attn


# ------------------------------------------------------------------------ formulations (issue 13)

from baselines import channel_norm  # noqa: E402
from baselines import restormer as restormer_module  # noqa: E402

FORMULATION_CASES = [dict(formulation=f) for f in restormer_module.FORMULATIONS] + [
    dict(formulation="fused", attn_split=4),  # q k^T as a sum of 4 partial products
    dict(formulation="fused", band_elements=3000),  # every block in row bands (1 row each)
    dict(formulation="fused_cl", band_elements=20000, attn_split=2),
]


@pytest.fixture
def interpret(monkeypatch):
    """The Triton channel norm runs on CPU tensors through Triton's interpreter."""
    pytest.importorskip("triton")
    monkeypatch.setattr(channel_norm, "INTERPRET_ON_CPU", True)


def _official_and_grads(model, x):
    model.zero_grad()
    y = model(x)
    y.square().mean().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("norm,cases", [("WithBias", FORMULATION_CASES),
                                        ("BiasFree", FORMULATION_CASES[2:5])])
def test_every_formulation_is_the_official_function_float64(interpret, norm, cases):
    model = tiny(LayerNorm_type=norm, formulation="official").double().train()
    x = torch.rand(1, 3, 16, 24, dtype=torch.float64)
    ref, ref_grads = _official_and_grads(model, x)
    for case in cases:
        model.set_formulation(**case)
        out, grads = _official_and_grads(model, x)
        assert out.is_contiguous(), case  # NCHW in, NCHW out, whatever runs inside
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, msg=str(case))
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-8, atol=1e-10,
                                       msg=f"{case} {name}")


def test_formulation_switches_reach_every_module():
    model = tiny(formulation="fused_cl", attn_split=3)
    norms = {m.norm_impl for m in model.modules() if isinstance(m, restormer_module.LayerNorm)}
    attn = {(m.attn_impl, m.attn_split) for m in model.modules()
            if isinstance(m, restormer_module.Attention)}
    assert norms == {"triton"} and attn == {("gram", 3)}
    assert model.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    model.set_formulation("official")
    assert model.patch_embed.proj.weight.is_contiguous()
    assert restormer_module.DEFAULT_FORMULATION in restormer_module.FORMULATIONS
    with pytest.raises(ValueError, match="formulation"):
        Restormer(**TINY, formulation="fastest")
    with pytest.raises(ValueError, match="norm_impl"):
        Restormer(**TINY, norm_impl="apex")
    with pytest.raises(ValueError, match="switches"):
        Restormer(**TINY).set_formulation("fused", tile=64)
    with torch.device("meta"):  # and through the registry (--set formulation=...)
        model = bench.create_model("restormer", task="deblur", formulation="official")
    assert model.formulation_settings == restormer_module.FORMULATIONS["official"]


def test_row_bands_cover_the_map_once():
    assert restormer_module.row_bands(10, 4, 100) is None  # fits
    assert restormer_module.row_bands(10, 4, 0) is None  # banding off
    bands = restormer_module.row_bands(10, 4, 20)  # 5 rows of budget: 3 + a 1-row halo each side
    assert bands == [(0, 3), (3, 6), (6, 9), (9, 10)]


def test_gram_split_equals_matmul():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, 64, dtype=torch.float64), torch.randn(2, 3, 5, 64,
                                                                     dtype=torch.float64)
    ref = q @ k.transpose(-2, -1)
    torch.testing.assert_close(restormer_module.gram(q, k, 8), ref)
    torch.testing.assert_close(restormer_module.gram(q, k, 7), ref)  # 64 % 7: no split

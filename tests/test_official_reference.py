"""Our SwinIR and Restormer against third-party copies of the official architectures.

spandrel (SwinIR) and spandrel-extra-arches (Restormer) ship the official model definitions
nearly verbatim. Where they are installed (`pip install spandrel spandrel-extra-arches`; not a
project dependency, so these tests skip elsewhere), an official-layout state dict with random
weights must load into ours with strict=True and give the same outputs: bit-identical on the
official math path where we compute the same ops (SwinIR; Restormer BiasFree), to float
rounding where we use a fused kernel (SDPA, F.layer_norm). Every Restormer and NAFNet
formulation (issue 13) must also match the official forward and gradients (NAFNet: the
official hand-written LayerNorm backward), the Triton norm interpreted on the CPU.
"""
import importlib

import pytest
import torch

from baselines.attention import set_attn_impl
from baselines.restormer import Restormer
from baselines.swinir import SwinIR


def reference(module: str, package: str):
    pytest.importorskip(package)
    return importlib.import_module(module)


def perturbed(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
            if "relative_position_bias_table" in name:
                p.normal_(0, 1.0)
            if name.endswith("temperature"):
                p.uniform_(0.5, 4.0)
    return model.eval()


@pytest.mark.parametrize("upsampler,upscale", [("", 1), ("pixelshuffle", 3),
                                               ("nearest+conv", 4)])
def test_swinir_equals_official(upsampler, upscale):
    ref_mod = reference("spandrel.architectures.SwinIR.__arch.SwinIR", "spandrel")
    cfg = dict(upscale=upscale, img_size=16, window_size=8, depths=[2, 2], embed_dim=24,
               num_heads=[6, 6], mlp_ratio=2, upsampler=upsampler)
    ref = perturbed(ref_mod.SwinIR(**cfg))
    ours = SwinIR(**cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(2, 3, 21, 30)  # not a multiple of the window: padded and cropped
    with torch.no_grad():
        expected = ref(x)
        assert torch.equal(set_attn_impl(ours, "math")(x), expected)
        assert (set_attn_impl(ours, "sdpa")(x) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("norm", ["WithBias", "BiasFree"])
def test_restormer_equals_official(norm):
    ref_mod = reference("spandrel_extra_arches.architectures.Restormer.__arch.restormer_arch",
                        "spandrel_extra_arches")
    cfg = dict(dim=16, num_blocks=[1, 2, 2, 2], num_refinement_blocks=2, heads=[1, 2, 4, 8],
               LayerNorm_type=norm)
    ref = perturbed(ref_mod.Restormer(**cfg))
    ours = Restormer(**cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(2, 3, 24, 40)
    with torch.no_grad():
        expected = ref(x)
        math = set_attn_impl(ours, "math")(x)
        if norm == "BiasFree":
            assert torch.equal(math, expected)
        assert (math - expected).abs().max() < 1e-5
        assert (set_attn_impl(ours, "sdpa")(x) - expected).abs().max() < 1e-5


# ------------------------------------------------------------------------ formulations (issue 13)


@pytest.fixture
def interpret(monkeypatch):
    """The Triton channel norm runs on CPU tensors through Triton's interpreter."""
    pytest.importorskip("triton")
    from baselines import channel_norm

    monkeypatch.setattr(channel_norm, "INTERPRET_ON_CPU", True)


def _forward_backward(model, x):
    model.zero_grad()
    y = model(x)
    y.square().mean().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(ours, ref, what):
    out, grads = ours
    ref_out, ref_grads = ref
    assert (out - ref_out).abs().max() / ref_out.abs().max() < 1e-6, what  # float32 rounding
    for name, g in ref_grads.items():
        err = (grads[name] - g).abs().max() / g.abs().max().clamp_min(1e-12)
        assert err < 1e-4, f"{what} {name}: {err:.1e}"


@pytest.mark.parametrize("norm", ["WithBias", "BiasFree"])
def test_every_restormer_formulation_equals_official(interpret, norm):
    from baselines.restormer import FORMULATIONS

    ref_mod = reference("spandrel_extra_arches.architectures.Restormer.__arch.restormer_arch",
                        "spandrel_extra_arches")
    cfg = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 2, 4],
               LayerNorm_type=norm)
    ref = perturbed(ref_mod.Restormer(**cfg)).train()
    ours = Restormer(**cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.train()
    x = torch.rand(1, 3, 16, 24)
    expected = _forward_backward(ref, x)
    for form in FORMULATIONS:
        _assert_same(_forward_backward(ours.set_formulation(form), x), expected, form)


def test_every_nafnet_formulation_equals_official(interpret):
    from baselines.nafnet import FORMULATIONS, NAFNet

    ref_mod = reference("spandrel.architectures.NAFNet.__arch.NAFNet_arch", "spandrel")
    cfg = dict(width=8, enc_blk_nums=[1, 1], middle_blk_num=1, dec_blk_nums=[1, 1])
    ref = ref_mod.NAFNet(img_channel=3, **cfg)
    with torch.no_grad():  # beta/gamma start at zero: make every block count
        for p in ref.parameters():
            p.normal_(0, 0.3)
    ours = NAFNet(**cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(1, 3, 20, 28)
    expected = _forward_backward(ref, x)  # the official hand-written LayerNorm backward
    for form in FORMULATIONS:
        _assert_same(_forward_backward(ours.set_formulation(form), x), expected, form)

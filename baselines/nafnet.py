"""NAFNet (Chen et al., "Simple Baselines for Image Restoration", ECCV 2022).

Faithful to megvii-research/NAFNet `basicsr/models/archs/NAFNet_arch.py`: same module tree and
parameter names, so the official checkpoints (`NAFNet-GoPro-width64.pth`, `NAFNet-SIDD-width32.pth`,
...) load with `strict=True` and give the same outputs. How it is computed is a formulation
(FORMULATIONS, baselines.formulation; `formulation="official"` runs the official ops). What the
formulations change, and why it matters on a GPU (issue 13: our previous formulation,
"layer_norm", was 14% slower than the official code at 1024 px in bf16 on an H200, and faster
at 256 px where the official norm's many small kernels dominate):

- LayerNorm2d (72 per forward at width 64, GoPro). The official `LayerNormFunction` (a custom
  autograd.Function that FLOP counters cannot see) runs ten reduction/elementwise kernels
  forward and a hand-written backward, all over NCHW with no layout copies. "layer_norm" used
  `F.layer_norm` over a channels-last view: one op the counters know, but on an NCHW map a
  transposing copy in and one out. "triton" (baselines.channel_norm) reads the map once and
  writes it once each way; "channels_first" is the same without a custom kernel. On meta
  tensors (FLOP counting) every formulation counts as `F.layer_norm`.
- The block's residuals `y + x * beta`: one addcmul each (`fused_residual`) instead of a
  multiply and an add.
- Memory format: "_cl" formulations run NHWC (cuDNN's tensor-core layout).
- TLC (`tlc=True`, the official `NAFNetLocal` used by the GoPro test configs): the local average
  pool is the official integral-image computation, with the cumulative sums kept in at least
  float32 so half-precision runs do not overflow.

Per-formulation latency and peak memory of NAFNet-w32/w64 on a GPU
(`python -m benchmarks.baseline_formulations`) are not in a committed run yet; the formulations
equal the official function in float64 in the CPU tests
(tests/test_nafnet.py::test_every_formulation_is_the_official_function_float64).

Configurations (official option files):
- deblur (GoPro, `options/test/GoPro/NAFNet-width{32,64}.yml`): enc [1,1,1,28], middle 1,
  dec [1,1,1,1]; the test configs use `NAFNetLocal` (here `tlc=True`; default off: the same
  network as training, and the one the paper's cost figures describe).
- denoise (SIDD real-noise denoising, `options/test/SIDD/NAFNet-width{32,64}.yml`): enc [2,2,4,8],
  middle 12, dec [2,2,2,2], plain NAFNet. NAFNet has no official Gaussian-denoising model; SIDD is
  its denoising configuration.
- sr: NAFNet has no single-image SR configuration (NAFSSR is a stereo network); the GoPro network
  is run as an x1 model on the bicubic-upsampled input (registry: upsampler=False).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines.channel_norm import NORM_IMPLS as channel_norm_impls
from baselines.channel_norm import channel_norm, check_norm_impl
from baselines.formulation import (apply_memory_format, enter_format, leave_format,
                                   resolve_formulation)
from serpent.registry import register_model

# --------------------------------------------------------------------------- formulations

# Same function, different kernels (baselines.formulation). Switches:
# - norm_impl: "official" (the official LayerNormFunction), or a baselines.channel_norm impl:
#   "layer_norm", "channels_first", "triton";
# - fused_residual: the block's two residuals `y + x * beta` as one addcmul kernel each
#   (False: the official multiply then add, two kernels and an intermediate);
# - memory_format: "preserve" or "channels_last".
FORMULATIONS = {
    "official": dict(norm_impl="official", fused_residual=False, memory_format="preserve"),
    "layer_norm": dict(norm_impl="layer_norm", fused_residual=False,
                       memory_format="preserve"),  # this module before issue 13
    "channels_first": dict(norm_impl="channels_first", fused_residual=True,
                           memory_format="preserve"),
    "fused": dict(norm_impl="triton", fused_residual=True, memory_format="preserve"),
    "fused_cl": dict(norm_impl="triton", fused_residual=True, memory_format="channels_last"),
    "layer_norm_cl": dict(norm_impl="layer_norm", fused_residual=True,
                          memory_format="channels_last"),
}
# "fused": the Triton channel norm and the fused residual (same values as the official
# formulation). Its speed against "official" is not yet in a committed run: rerun
# `python -m benchmarks.baseline_formulations` and cite it.
DEFAULT_FORMULATION = "fused"

NORM_IMPLS = ("official",) + channel_norm_impls

# --------------------------------------------------------------------------- helpers


class LayerNormFunction(torch.autograd.Function):  # official (arch_util.py), restated
    """The official channel layer norm of an NCHW map, with its hand-written backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        ctx.eps = eps
        N, C, H, W = x.size()
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        y = (x - mu) / (var + eps).sqrt()
        ctx.save_for_backward(y, var, weight)
        y = weight.view(1, C, 1, 1) * y + bias.view(1, C, 1, 1)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        eps = ctx.eps
        N, C, H, W = grad_output.size()
        y, var, weight = ctx.saved_tensors
        g = grad_output * weight.view(1, C, 1, 1)
        mean_g = g.mean(dim=1, keepdim=True)
        mean_gy = (g * y).mean(dim=1, keepdim=True)
        gx = 1. / torch.sqrt(var + eps) * (g - y * mean_gy - mean_g)
        return (gx, (grad_output * y).sum(dim=3).sum(dim=2).sum(dim=0),
                grad_output.sum(dim=3).sum(dim=2).sum(dim=0), None)


class LayerNorm2d(nn.Module):
    """Layer norm over the channels of an NCHW map (official LayerNorm2d, eps 1e-6).

    `norm_impl="official"` is the official LayerNormFunction (ten elementwise and reduction
    kernels forward, a hand-written backward, invisible to FLOP counters); the others are
    baselines.channel_norm's formulations of the same function.
    """

    def __init__(self, channels: int, eps: float = 1e-6, norm_impl: str = "official"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps
        self.norm_impl = check_norm_impl(norm_impl, NORM_IMPLS)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, norm_impl={self.norm_impl}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_impl == "official":
            return LayerNormFunction.apply(x, self.weight, self.bias, self.eps)
        return channel_norm(x, self.weight, self.bias, self.eps, impl=self.norm_impl)


class SimpleGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return x1 * x2


class LocalAvgPool2d(nn.Module):
    """TLC's local average pool (Chu et al. 2021, official `local_arch.AvgPool2d`, fast_imp off).

    A box mean of `kernel_size` (clipped to the map) at every valid position, replicate-padded
    back to the input size; the global mean when the kernel covers the whole map.
    """

    def __init__(self, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        k = self.kernel_size
        if k >= h and k >= w:
            return F.adaptive_avg_pool2d(x, 1)
        k1, k2 = min(h, k), min(w, k)
        s = x if x.dtype in (torch.float32, torch.float64) else x.float()
        s = F.pad(s.cumsum(-1).cumsum(-2), (1, 0, 1, 0))
        out = (s[..., k1:, k2:] + s[..., :-k1, :-k2] - s[..., :-k1, k2:] - s[..., k1:, :-k2]) / (k1 * k2)
        ph, pw = h - out.shape[-2], w - out.shape[-1]
        out = F.pad(out, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2), mode="replicate")
        return out.to(x.dtype)


# The official NAFNetLocal converts at train_size 256 with base_size 1.5x: a pool whose map is
# m pixels wide at a 256 input gets kernel m * 384 // 256.
TLC_TRAIN_SIZE = 256
TLC_BASE_SIZE = 384


def tlc_kernel(level: int) -> int:
    """Kernel of the TLC pool in a block at U-Net `level` (0 = full resolution)."""
    return (TLC_TRAIN_SIZE >> level) * TLC_BASE_SIZE // TLC_TRAIN_SIZE


# --------------------------------------------------------------------------- blocks


class NAFBlock(nn.Module):
    """Official NAFBlock: LN -> 1x1 -> dw3x3 -> SimpleGate -> SCA -> 1x1, then LN -> FFN-gate."""

    def __init__(self, c: int, *, dw_expand: int = 2, ffn_expand: int = 2, drop_out_rate: float = 0.0,
                 pool: nn.Module | None = None):
        super().__init__()
        dw = c * dw_expand
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
        self.conv3 = nn.Conv2d(dw // 2, c, 1)
        # simplified channel attention; `sca.0` is the global pool (TLC: a local one)
        self.sca = nn.Sequential(pool or nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw // 2, dw // 2, 1))
        self.sg = SimpleGate()
        ffn = ffn_expand * c
        self.conv4 = nn.Conv2d(c, ffn, 1)
        self.conv5 = nn.Conv2d(ffn // 2, c, 1)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)
        self.dropout1 = nn.Dropout(drop_out_rate) if drop_out_rate > 0 else nn.Identity()
        self.dropout2 = nn.Dropout(drop_out_rate) if drop_out_rate > 0 else nn.Identity()
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.fused_residual = False

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.sg(self.conv2(self.conv1(self.norm1(inp))))
        x = self.conv3(x * self.sca(x))
        y = self.residual(inp, self.dropout1(x), self.beta)
        x = self.conv5(self.sg(self.conv4(self.norm2(y))))
        return self.residual(y, self.dropout2(x), self.gamma)

    def residual(self, skip: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """skip + x * scale; one addcmul kernel when fused (same dtype rules: float32 under
        autocast, where the scale parameter is float32)."""
        if self.fused_residual:
            return torch.addcmul(skip, x, scale)
        return skip + x * scale


# --------------------------------------------------------------------------- model


class NAFNet(nn.Module):
    """U-Net of NAFBlocks with a global residual; pads to 2**len(enc) itself and crops back.

    Official constructor arguments, plus `tlc` and the formulation switches (`formulation` and
    its overrides: see FORMULATIONS)."""

    def __init__(self, *, img_channel: int = 3, width: int = 16, middle_blk_num: int = 1,
                 enc_blk_nums: tuple[int, ...] = (), dec_blk_nums: tuple[int, ...] = (),
                 tlc: bool = False, formulation: str = DEFAULT_FORMULATION,
                 norm_impl: str | None = None, fused_residual: bool | None = None,
                 memory_format: str | None = None):
        super().__init__()

        def blocks(chan: int, num: int, level: int) -> nn.Sequential:
            return nn.Sequential(*[NAFBlock(chan, pool=LocalAvgPool2d(tlc_kernel(level)) if tlc else None)
                                   for _ in range(num)])

        self.intro = nn.Conv2d(img_channel, width, 3, padding=1)
        self.ending = nn.Conv2d(width, img_channel, 3, padding=1)
        self.encoders = nn.ModuleList()
        self.decoders = nn.ModuleList()
        self.ups = nn.ModuleList()
        self.downs = nn.ModuleList()

        chan = width
        for level, num in enumerate(enc_blk_nums):
            self.encoders.append(blocks(chan, num, level))
            self.downs.append(nn.Conv2d(chan, 2 * chan, 2, 2))
            chan *= 2
        self.middle_blks = blocks(chan, middle_blk_num, len(enc_blk_nums))
        for i, num in enumerate(dec_blk_nums):
            self.ups.append(nn.Sequential(nn.Conv2d(chan, chan * 2, 1, bias=False), nn.PixelShuffle(2)))
            chan //= 2
            self.decoders.append(blocks(chan, num, len(dec_blk_nums) - 1 - i))
        self.padder_size = 2 ** len(self.encoders)
        self.set_formulation(formulation, norm_impl=norm_impl, fused_residual=fused_residual,
                             memory_format=memory_format)

    def set_formulation(self, formulation: str = DEFAULT_FORMULATION, **overrides) -> "NAFNet":
        """Switch how the model computes (same function, same weights), in place."""
        settings = resolve_formulation(FORMULATIONS, formulation, **overrides)
        check_norm_impl(settings["norm_impl"], NORM_IMPLS)
        for module in self.modules():
            if isinstance(module, LayerNorm2d):
                module.norm_impl = settings["norm_impl"]
            elif isinstance(module, NAFBlock):
                module.fused_residual = settings["fused_residual"]
        self.memory_format = settings["memory_format"]
        apply_memory_format(self, self.memory_format)
        self.formulation, self.formulation_settings = formulation, settings
        return self

    def extra_repr(self) -> str:
        return f"formulation={self.formulation}, {self.formulation_settings}"

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        m = self.padder_size
        inp = enter_format(F.pad(image, (0, (m - w % m) % m, 0, (m - h % m) % m)),
                           self.memory_format)

        x = self.intro(inp)
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        x = self.middle_blks(x)
        for decoder, up, skip in zip(self.decoders, self.ups, skips[::-1]):
            x = decoder(up(x) + skip)
        x = self.ending(x) + inp
        return leave_format(x[..., :h, :w], image)


# --------------------------------------------------------------------------- constructors

GOPRO = dict(enc_blk_nums=(1, 1, 1, 28), middle_blk_num=1, dec_blk_nums=(1, 1, 1, 1))
SIDD = dict(enc_blk_nums=(2, 2, 4, 8), middle_blk_num=12, dec_blk_nums=(2, 2, 2, 2))
REFERENCE = "Chen et al., ECCV 2022, github.com/megvii-research/NAFNet"


@register_model(family="conv", multiple=1, upsampler=False, reference=REFERENCE, alias_of="nafnet_w64",
                notes="default width 64 (the paper's headline model); deblur/sr: GoPro config, "
                      "denoise: SIDD config; tlc=True gives the official GoPro test model NAFNetLocal")
def nafnet(*, task: str, scale: int, width: int = 64, **overrides) -> NAFNet:
    """Official NAFNet for `task`; `scale` only sets the bicubic input size (x1 network)."""
    config = SIDD if task == "denoise" else GOPRO
    return NAFNet(**{**config, "width": width, **overrides})


register_model(name="nafnet_w32", family="conv", multiple=1, upsampler=False, reference=REFERENCE,
               notes="NAFNet width 32", width=32)(nafnet)
register_model(name="nafnet_w64", family="conv", multiple=1, upsampler=False, reference=REFERENCE,
               notes="NAFNet width 64", width=64)(nafnet)

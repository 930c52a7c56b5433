"""Restormer (Zamir et al., "Restormer: Efficient Transformer for High-Resolution Image
Restoration", CVPR 2022).

Faithful to swz30/Restormer `basicsr/models/archs/restormer_arch.py`: same module tree and
parameter names, so the official checkpoints (`motion_deblurring.pth`,
`gaussian_color_denoising_*.pth`, ...) load with `strict=True`, and the same function. How it is
computed is a formulation (FORMULATIONS, baselines.formulation; `formulation="official"` runs
the official code's own ops). What the formulations change, and why it matters on a GPU
(issue 13: our previous formulation, "layer_norm", was 41% slower than the official code at
1024 px in bf16 on an H200):

- The channel LayerNorm (88 per forward). The official `to_3d` + manual mean/var runs two
  reductions and five elementwise passes over each map (float32 outputs under autocast), with
  no layout copies. "layer_norm" used `F.layer_norm` on the permuted NCHW map: a transposing
  copy in (inside the op) and one out, in float32 under autocast, on rows of only 48-384 channels.
  "triton" (baselines.channel_norm) reads the map once and writes it once, forward and
  backward; "channels_first" is the same without a custom kernel.
- Transposed attention (MDTA). The official F.normalize writes normalised float32 copies of q
  and k (and autocast casts them back to bf16 for q k^T); "gram" computes the same C x C
  matrix as ``(q k^T) / (|q| |k|^T)``: q and k are only read, and training saves no copies.
  `attn_split` splits q k^T over pixel chunks (a split-K for the H*W-long contraction).
- Memory format: "_cl" formulations run NHWC (cuDNN's tensor-core layout; depthwise
  convolutions then go through cuDNN instead of PyTorch's NCHW depthwise kernel).
- Large images: past 2048 px the level-1 maps pass 2^31 elements (510 x 4096^2 in the FFN), where
  convolutions need 64-bit indexing; with `band_elements` set ("channels_first", "fused", ...) a
  block whose tensors would pass it runs in row bands with a one-row halo (same values).
- SDPA (`attn_impl="sdpa"`) stays an option but no formulation uses it (see `restormer()`).

On one NVIDIA H200 (results/h200-run5/call2/baseline_checks.jsonl, fp32 with TF32 off, 128 px,
the official formulation's weights): "layer_norm", "channels_first" and "fused" give outputs
within 5.5e-7 and gradients within 2.3e-5 of the official formulation; their bf16 errors against
fp32 (0.0068-0.0083) are the official one's (0.0076). Per-formulation latency and memory
(`python -m benchmarks.baseline_formulations`, parts grid onwards) are not in a committed run.

Like the official code, the input height and width must be multiples of 8 (three 2x
downsamplings; the official test scripts reflect-pad outside the model): registry multiple=8.

Configurations (official option files and test scripts): dim 48, blocks [4,6,6,8], refinement 4,
heads [1,2,4,8], FFN factor 2.66, bias False;
- deblur: motion deblurring (GoPro), LayerNorm 'WithBias' (26,126,644 parameters, "26.13M").
- denoise: Gaussian color denoising, LayerNorm 'BiasFree' (`test_gaussian_color_denoising.py`).
- sr: no official SR model; the deblurring network on the bicubic-upsampled input (x1 model).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from baselines.attention import check_attn_impl
from baselines.channel_norm import NORM_IMPLS as channel_norm_impls
from baselines.channel_norm import channel_norm, check_norm_impl
from baselines.formulation import (apply_memory_format, enter_format, leave_format,
                                   resolve_formulation)
from serpent.registry import register_model

REFERENCE = "Zamir et al., CVPR 2022, github.com/swz30/Restormer"

# --------------------------------------------------------------------------- formulations

# Same function, different kernels (baselines.formulation). Switches:
# - norm_impl: "official" (to_3d + manual mean/var, the official code), or a
#   baselines.channel_norm impl: "layer_norm", "channels_first", "triton";
# - attn_impl: "math" (official: F.normalize(q), F.normalize(k), q @ k^T), "sdpa", or "gram"
#   (normalisation folded into the C x C matrix: the Attention docstring says why);
# - attn_split: q @ k^T as the sum of this many partial products over pixel chunks (0: one);
# - band_elements: a block whose largest intermediate would exceed this many elements runs in
#   row bands (0: never); the default is int32's limit, past which tensors need 64-bit indexing;
# - memory_format: "preserve" or "channels_last".
FORMULATIONS = {
    "official": dict(norm_impl="official", attn_impl="math", attn_split=0, band_elements=0,
                     memory_format="preserve"),
    "layer_norm": dict(norm_impl="layer_norm", attn_impl="math", attn_split=0, band_elements=0,
                       memory_format="preserve"),  # this module before issue 13
    "channels_first": dict(norm_impl="channels_first", attn_impl="gram", attn_split=0,
                           band_elements=2**31 - 1, memory_format="preserve"),
    "fused": dict(norm_impl="triton", attn_impl="gram", attn_split=0, band_elements=2**31 - 1,
                  memory_format="preserve"),
    "fused_cl": dict(norm_impl="triton", attn_impl="gram", attn_split=0,
                     band_elements=2**31 - 1, memory_format="channels_last"),
    "layer_norm_cl": dict(norm_impl="layer_norm", attn_impl="gram", attn_split=0,
                          band_elements=2**31 - 1, memory_format="channels_last"),
}
# "fused": the Triton channel norm and the Gram attention (same values as the official
# formulation, checked on an H200 in results/h200-run5/call2). Its speed against "official" is
# not yet in a committed run: rerun `python -m benchmarks.baseline_formulations` and cite it.
DEFAULT_FORMULATION = "fused"

NORM_IMPLS = ("official",) + channel_norm_impls
ATTN_IMPLS = ("math", "sdpa", "gram")

# --------------------------------------------------------------------------- helpers


def to_3d(x: torch.Tensor) -> torch.Tensor:  # official
    return rearrange(x, "b c h w -> b (h w) c")


def to_4d(x: torch.Tensor, h: int, w: int) -> torch.Tensor:  # official
    return rearrange(x, "b (h w) c -> b c h w", h=h, w=w)


class BiasFree_LayerNorm(nn.Module):  # official class name and formula
    """x / sqrt(var(x) + 1e-5) * weight over the last dimension (no centring, no bias)."""

    def __init__(self, normalized_shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sigma = x.var(-1, keepdim=True, unbiased=False)
        return x / torch.sqrt(sigma + 1e-5) * self.weight


class WithBias_LayerNorm(nn.Module):  # official class name and formula
    """Layer norm over the last dimension, eps 1e-5, written out as the official code does."""

    def __init__(self, normalized_shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(-1, keepdim=True)
        sigma = x.var(-1, keepdim=True, unbiased=False)
        return (x - mu) / torch.sqrt(sigma + 1e-5) * self.weight + self.bias


class LayerNorm(nn.Module):
    """Per-pixel norm over the channels of a (B, C, H, W) map; keeps the map's memory format.

    `norm_impl="official"` is the official `to_4d(body(to_3d(x)))`: mean and variance over a
    permuted view, then five elementwise passes. The others are baselines.channel_norm's
    formulations of the same function.
    """

    def __init__(self, dim: int, LayerNorm_type: str, norm_impl: str = "official"):  # official arg
        super().__init__()
        if LayerNorm_type not in ("WithBias", "BiasFree"):
            raise ValueError(f"LayerNorm_type must be 'WithBias' or 'BiasFree', "
                             f"got {LayerNorm_type!r}")
        self.with_bias = LayerNorm_type == "WithBias"
        self.body = WithBias_LayerNorm(dim) if self.with_bias else BiasFree_LayerNorm(dim)
        self.norm_impl = check_norm_impl(norm_impl, NORM_IMPLS)

    def extra_repr(self) -> str:
        return f"norm_impl={self.norm_impl}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_impl == "official":
            h, w = x.shape[-2:]
            return to_4d(self.body(to_3d(x)), h, w)
        return channel_norm(x, self.body.weight, self.body.bias if self.with_bias else None,
                            1e-5, impl=self.norm_impl, centered=self.with_bias)


def row_bands(height: int, elements_per_row: int, limit: int) -> list[tuple[int, int]] | None:
    """Row ranges [lo, hi) such that a band plus a one-row halo on each side stays within
    `limit` elements; None when the whole map fits (or banding is off: limit 0)."""
    if not limit or height * elements_per_row <= limit:
        return None
    rows = max(1, limit // elements_per_row - 2)
    return [(lo, min(lo + rows, height)) for lo in range(0, height, rows)]


def with_halo(x: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, int]:
    """Rows [lo - 1, hi + 1) of x clipped to the map, and where row `lo` sits in that slice:
    enough context for a 3x3 convolution's outputs at rows [lo, hi)."""
    a = max(lo - 1, 0)
    return x[:, :, a:min(hi + 1, x.shape[2])], lo - a


# --------------------------------------------------------------------------- blocks


class FeedForward(nn.Module):
    """Gated-Dconv feed-forward network (GDFN)."""

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool, band_elements: int = 0):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, stride=1, padding=1,
                                groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)
        self.band_elements = band_elements

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        bands = row_bands(h, b * self.dwconv.out_channels * w, self.band_elements)
        if bands is None:
            return self._gated(self.dwconv(self.project_in(x)))
        # Every op is per pixel except the 3x3 dwconv: a band with a one-row halo computes the
        # same values, and no intermediate needs 64-bit indexing.
        out = []
        for lo, hi in bands:
            xb, top = with_halo(x, lo, hi)
            out.append(self._gated(self.dwconv(self.project_in(xb))[:, :, top:top + hi - lo]))
        return torch.cat(out, dim=2)

    def _gated(self, t: torch.Tensor) -> torch.Tensor:
        x1, x2 = t.chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class Attention(nn.Module):
    """Multi-Dconv head transposed self-attention (MDTA): attention across channels.

    The official ``softmax((q/|q|) (k/|k|)^T * temperature) v`` attends over the C/heads
    channels of a head, each a vector of H*W pixels. `attn_impl`:

    - ``"math"``: the official computation: F.normalize writes normalised copies of q and k
      (full size; float32 under autocast, which then casts them back for the matmul);
    - ``"sdpa"``: SDPA with the temperature folded into q and ``scale=1`` (sequence = channels,
      embedding = pixels: no fused kernel takes a head dimension of H*W; see `restormer()`);
    - ``"gram"``: ``(q k^T) / (|q| |k|^T)``: the same matrix, but q and k are only read (their
      norms by one reduction each, then the product); nothing of full size is written, and
      training saves no normalised copies. In channels_last the output is produced as
      ``v^T attn^T``, already NHWC.

    With ``"gram"``, `attn_split` > 1 computes q k^T as the sum of that many products over
    pixel chunks (a split-K the library may not choose for a C x C output from an H*W-long
    contraction), and a map whose qkv tensor would exceed `band_elements` runs in row bands
    (q k^T and the norms accumulated over bands, v kept, the output projected per band).
    """

    attn_impls = ATTN_IMPLS

    def __init__(self, dim: int, num_heads: int, bias: bool, attn_impl: str = "math",
                 attn_split: int = 0, band_elements: int = 0):
        super().__init__()
        self.num_heads = num_heads
        self.attn_impl = check_attn_impl(attn_impl, ATTN_IMPLS)
        self.attn_split = attn_split
        self.band_elements = band_elements
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, stride=1, padding=1,
                                    groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, attn_impl={self.attn_impl}, "
                f"attn_split={self.attn_split}, band_elements={self.band_elements}")

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return rearrange(t, "b (head c) h w -> b head c (h w)", head=self.num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if self.attn_impl == "gram":
            bands = row_bands(h, b * self.qkv.out_channels * w, self.band_elements)
            if bands is not None:
                return self._banded(x, bands)
        q, k, v = (self._heads(t) for t in self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1))
        if self.attn_impl == "math":  # official
            q = F.normalize(q, dim=-1)
            k = F.normalize(k, dim=-1)
            attn = (q @ k.transpose(-2, -1)) * self.temperature
            out = attn.softmax(dim=-1) @ v
        elif self.attn_impl == "sdpa":
            q = F.normalize(q, dim=-1)
            k = F.normalize(k, dim=-1)
            out = F.scaled_dot_product_attention(q * self.temperature, k, v, scale=1.0)
        else:
            attn = self._attention(gram(q, k, self.attn_split), norms(q), norms(k))
            return self.project_out(self._weigh_values(attn, v, h, w))
        return self.project_out(rearrange(out, "b head c (h w) -> b (head c) h w", h=h, w=w))

    def _attention(self, qk, q_norm, k_norm) -> torch.Tensor:
        """softmax over keys of q.k / (|q| |k|) * temperature, from the raw products (float32)."""
        scale = q_norm.clamp_min(1e-12)[..., :, None] * k_norm.clamp_min(1e-12)[..., None, :]
        return (at_least_f32(qk) / scale * self.temperature).softmax(dim=-1)

    def _weigh_values(self, attn: torch.Tensor, v: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """attn @ v as a (B, C, h, w) map in v's memory format."""
        attn = attn.to(v.dtype)
        if v.stride(-1) == 1:  # NCHW: (b, head, c, hw) is the map
            return (attn @ v).reshape(v.shape[0], -1, h, w)
        out = v.transpose(-2, -1) @ attn.transpose(-2, -1)  # (b, head, hw, c): NHWC per head
        return out.transpose(1, 2).reshape(v.shape[0], h, w, -1).permute(0, 3, 1, 2)

    def _banded(self, x: torch.Tensor, bands: list[tuple[int, int]]) -> torch.Tensor:
        qk = q_sq = k_sq = None
        values = []
        for lo, hi in bands:
            xb, top = with_halo(x, lo, hi)
            q, k, v = self.qkv_dwconv(self.qkv(xb))[:, :, top:top + hi - lo].chunk(3, dim=1)
            v = v.clone(memory_format=torch.preserve_format)  # keep v, not the band's qkv
            q, k, v = (self._heads(t) for t in (q, k, v))
            parts = (at_least_f32(gram(q, k, self.attn_split)), norms(q).square(),
                     norms(k).square())
            qk, q_sq, k_sq = parts if qk is None else (qk + parts[0], q_sq + parts[1],
                                                        k_sq + parts[2])
            values.append((v, hi - lo))
        attn = self._attention(qk, q_sq.sqrt(), k_sq.sqrt())
        w = x.shape[-1]
        return torch.cat([self.project_out(self._weigh_values(attn, v, rows, w))
                          for v, rows in values], dim=2)


def at_least_f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def norms(t: torch.Tensor) -> torch.Tensor:
    """|t| over the last (pixel) axis in at least float32, read straight from t's dtype:
    autocast would otherwise cast all of t to float32 first."""
    low = t.dtype in (torch.float16, torch.bfloat16)
    kind = t.device.type
    no_autocast = (torch.autocast(kind, enabled=False) if kind in ("cuda", "cpu")
                   else contextlib.nullcontext())
    with no_autocast:
        return torch.linalg.vector_norm(t, dim=-1, dtype=torch.float32 if low else None)


def gram(q: torch.Tensor, k: torch.Tensor, split: int = 0) -> torch.Tensor:
    """q @ k^T for (..., c, L) operands; with `split` > 1, as the float32 sum of `split` partial
    products over chunks of L (each a strided view: one batched matmul per head, no copies),
    summed in at least float32."""
    length = q.shape[-1]
    if split <= 1 or length % split:
        return q @ k.transpose(-2, -1)
    lead = q.shape[:-2]
    qs, ks = q.flatten(0, -3), k.flatten(0, -3)  # (heads, c, L)
    parts = []
    for qi, ki in zip(qs, ks):  # (split, c, L/split) views of each head
        qi = qi.unflatten(-1, (split, length // split)).transpose(0, 1)
        ki = ki.unflatten(-1, (split, length // split)).transpose(0, 1)
        parts.append(at_least_f32(qi @ ki.transpose(-2, -1)).sum(0))
    return torch.stack(parts).view(*lead, *parts[0].shape)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool,
                 LayerNorm_type: str, *, norm_impl: str = "official", attn_impl: str = "math",
                 attn_split: int = 0, band_elements: int = 0):
        super().__init__()
        self.norm1 = LayerNorm(dim, LayerNorm_type, norm_impl)
        self.attn = Attention(dim, num_heads, bias, attn_impl, attn_split, band_elements)
        self.norm2 = LayerNorm(dim, LayerNorm_type, norm_impl)
        self.ffn = FeedForward(dim, ffn_expansion_factor, bias, band_elements)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class OverlapPatchEmbed(nn.Module):
    """3x3 conv embedding."""

    def __init__(self, in_c: int = 3, embed_dim: int = 48, bias: bool = False):
        super().__init__()
        self.proj = nn.Conv2d(in_c, embed_dim, kernel_size=3, stride=1, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """Halve resolution, double channels: conv to C/2 then PixelUnshuffle(2)."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat // 2, 3, 1, 1, bias=False),
                                  nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """Double resolution, halve channels: conv to 2C then PixelShuffle(2)."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat * 2, 3, 1, 1, bias=False),
                                  nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# --------------------------------------------------------------------------- model


class Restormer(nn.Module):
    """Restormer with the official constructor arguments, plus the formulation switches
    (`formulation` and its overrides: see FORMULATIONS)."""

    def __init__(self, *, inp_channels=3, out_channels=3, dim=48, num_blocks=(4, 6, 6, 8),
                 num_refinement_blocks=4, heads=(1, 2, 4, 8), ffn_expansion_factor=2.66,
                 bias=False, LayerNorm_type="WithBias", dual_pixel_task=False,
                 formulation: str = DEFAULT_FORMULATION, norm_impl: str | None = None,
                 attn_impl: str | None = None, attn_split: int | None = None,
                 band_elements: int | None = None, memory_format: str | None = None):
        super().__init__()

        def stage(level: int, n: int, head_level: int | None = None) -> nn.Sequential:
            width = dim * 2 ** level
            head = heads[level if head_level is None else head_level]
            return nn.Sequential(*[TransformerBlock(width, head, ffn_expansion_factor, bias,
                                                    LayerNorm_type) for _ in range(n)])

        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        self.encoder_level1 = stage(0, num_blocks[0])
        self.down1_2 = Downsample(dim)
        self.encoder_level2 = stage(1, num_blocks[1])
        self.down2_3 = Downsample(dim * 2)
        self.encoder_level3 = stage(2, num_blocks[2])
        self.down3_4 = Downsample(dim * 4)
        self.latent = stage(3, num_blocks[3])
        self.up4_3 = Upsample(dim * 8)
        self.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, kernel_size=1, bias=bias)
        self.decoder_level3 = stage(2, num_blocks[2])
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, kernel_size=1, bias=bias)
        self.decoder_level2 = stage(1, num_blocks[1])
        self.up2_1 = Upsample(dim * 2)  # no channel reduction at level 1: it runs at 2*dim
        self.decoder_level1 = stage(1, num_blocks[0], head_level=0)
        self.refinement = stage(1, num_refinement_blocks, head_level=0)
        self.dual_pixel_task = dual_pixel_task
        if dual_pixel_task:
            self.skip_conv = nn.Conv2d(dim, dim * 2, kernel_size=1, bias=bias)
        self.output = nn.Conv2d(dim * 2, out_channels, kernel_size=3, stride=1, padding=1,
                                bias=bias)
        self.set_formulation(formulation, norm_impl=norm_impl, attn_impl=attn_impl,
                             attn_split=attn_split, band_elements=band_elements,
                             memory_format=memory_format)

    def set_formulation(self, formulation: str = DEFAULT_FORMULATION, **overrides) -> "Restormer":
        """Switch how the model computes (same function, same weights), in place."""
        settings = resolve_formulation(FORMULATIONS, formulation, **overrides)
        check_norm_impl(settings["norm_impl"], NORM_IMPLS)
        check_attn_impl(settings["attn_impl"], ATTN_IMPLS)
        for module in self.modules():
            if isinstance(module, LayerNorm):
                module.norm_impl = settings["norm_impl"]
            elif isinstance(module, Attention):
                module.attn_impl = settings["attn_impl"]
                module.attn_split = settings["attn_split"]
                module.band_elements = settings["band_elements"]
            elif isinstance(module, FeedForward):
                module.band_elements = settings["band_elements"]
        self.memory_format = settings["memory_format"]
        apply_memory_format(self, self.memory_format)
        self.formulation, self.formulation_settings = formulation, settings
        return self

    def extra_repr(self) -> str:
        return f"formulation={self.formulation}, {self.formulation_settings}"

    def forward(self, inp_img: torch.Tensor) -> torch.Tensor:
        if inp_img.shape[-2] % 8 or inp_img.shape[-1] % 8:
            raise ValueError(f"Restormer needs height and width divisible by 8, got "
                             f"{tuple(inp_img.shape[-2:])} (pad the input, as the official "
                             f"test scripts do)")
        x = enter_format(inp_img, self.memory_format)
        enc1_in = self.patch_embed(x)
        enc1 = self.encoder_level1(enc1_in)
        enc2 = self.encoder_level2(self.down1_2(enc1))
        enc3 = self.encoder_level3(self.down2_3(enc2))
        latent = self.latent(self.down3_4(enc3))
        dec3 = torch.cat([self.up4_3(latent), enc3], 1)
        dec3 = self.decoder_level3(self.reduce_chan_level3(dec3))
        dec2 = torch.cat([self.up3_2(dec3), enc2], 1)
        dec2 = self.decoder_level2(self.reduce_chan_level2(dec2))
        dec1 = self.refinement(self.decoder_level1(torch.cat([self.up2_1(dec2), enc1], 1)))
        if self.dual_pixel_task:
            return leave_format(self.output(dec1 + self.skip_conv(enc1_in)), inp_img)
        return leave_format(self.output(dec1) + x, inp_img)


# --------------------------------------------------------------------------- constructors

OFFICIAL = dict(inp_channels=3, out_channels=3, dim=48, num_blocks=[4, 6, 6, 8],
                num_refinement_blocks=4, heads=[1, 2, 4, 8], ffn_expansion_factor=2.66, bias=False,
                LayerNorm_type="WithBias", dual_pixel_task=False)


@register_model(family="attention", multiple=8, upsampler=False, reference=REFERENCE,
                tasks=("deblur", "denoise", "sr"), scales=(2, 3, 4, 8),
                notes="deblur/sr: motion-deblurring network (WithBias LayerNorm); denoise: "
                      "Gaussian color denoising (BiasFree); SR on the bicubic-upsampled input")
def restormer(*, task: str, scale: int, **overrides) -> Restormer:
    """Official Restormer for `task`; `scale` only sets the bicubic input size (x1 network).

    Computed as DEFAULT_FORMULATION unless `formulation=` (or a single switch) says otherwise.
    SDPA is never the default: MDTA attends across channels, so SDPA's "head dimension" is the
    pixel count (65,536 at 256x256) and no fused kernel takes that well (flash stops at 256).
    Measured on an H200 with torch 2.11 (results/gpu-h200x4-run4/README.md): at 256 px SDPA
    picks the memory-efficient kernel and is 2.7x slower than the math path in fp32 (78.5 vs
    28.7 ms); at 512 px it fails ("cutlassF: no kernel found to launch!").
    """
    config = {**OFFICIAL, "LayerNorm_type": "BiasFree" if task == "denoise" else "WithBias"}
    return Restormer(**{**config, **overrides})

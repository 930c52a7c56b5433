"""MambaIR (Guo et al., "MambaIR: A Simple Baseline for Image Restoration with State-Space Model",
ECCV 2024): the SSM peer of the comparison.

Faithful to csguoh/MambaIR `basicsr/archs/mambair_arch.py`: same module tree and parameter names
(SS2D's stacked `x_proj_weight`, `dt_projs_weight`, `dt_projs_bias`, `A_logs`, `Ds`; VSSBlock's
`skip_scale`, `conv_blk`, ...), so the official checkpoints load with `strict=True`. The selective
scan is the project's op `serpent.scan.selective_scan`, called exactly as the official calls
mamba-ssm's `selective_scan_fn`: u and delta (b, 4*d, l), B and C grouped (b, 4, n, l), in float32.

Configurations (official option files `options/test/test_MambaIR_*.yml`):
- sr (classical SR x2/x3/x4, `test_MambaIR_SR_x{2,3,4}.yml`): embed_dim 180, depths 6x[6], d_state
  16, mlp_ratio 2, upsampler 'pixelshuffle', resi_connection '1conv'. x8 builds the same network
  with a third PixelShuffle stage (the official Upsample supports 2^n) but has no official weights.
- denoise (color Gaussian denoising, `test_MambaIR_ColorDN_level{15,25,50}.yml`): embed_dim 180,
  depths 6x[6], d_state 16, mlp_ratio 1.2, no upsampler. MambaIR has no deblurring model; deblur
  uses this x1 configuration.
The official `img_size`/`patch_size` arguments only set unused attributes (patch size is 1, the
"patch embedding" is a flatten): they are not taken here. The forward accepts any size without
padding (multiple=1); the official *test script* (MambaIRModel.test) additionally tiles large
inputs into ~200 px overlapping chunks, which is evaluation policy, not architecture.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from baselines.swinir import Upsample  # identical in both official repositories
from serpent.layers import DropPath, init_transformer_weights
from serpent.registry import register_model
from serpent.scan import selective_scan

K = 4  # scan directions: row-major, column-major, and both reversed


def _at_least_f32(t: torch.Tensor) -> torch.Tensor:
    """The official runs the scan in float32 (`.float()`); float64 stays float64 for tests."""
    return t if t.dtype == torch.float64 else t.float()


# --------------------------------------------------------------------------- helpers


class ChannelAttention(nn.Module):
    """RCAN channel attention: global pool -> squeeze -> ReLU -> excite -> sigmoid gate."""

    def __init__(self, num_feat: int, squeeze_factor: int = 16):
        super().__init__()
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(num_feat, num_feat // squeeze_factor, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_feat // squeeze_factor, num_feat, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class CAB(nn.Module):
    """Channel-attention block (the classical-SR / denoising variant, not light SR)."""

    def __init__(self, num_feat: int, compress_ratio: int = 3, squeeze_factor: int = 30):
        super().__init__()
        self.cab = nn.Sequential(
            nn.Conv2d(num_feat, num_feat // compress_ratio, 3, 1, 1),
            nn.GELU(),
            nn.Conv2d(num_feat // compress_ratio, num_feat, 3, 1, 1),
            ChannelAttention(num_feat, squeeze_factor),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cab(x)


# --------------------------------------------------------------------------- SS2D


class SS2D(nn.Module):
    """2D selective scan: in-proj -> dwconv -> S6 over 4 directions -> LN -> SiLU(z) gate -> out-proj.

    Parameters of the 4 directions are stacked as in the official (and VMamba) code.
    """

    def __init__(self, *, d_model: int, d_state: int = 16, d_conv: int = 3, expand: float = 2.0,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_scale: float = 1.0, dt_init_floor: float = 1e-4, dropout: float = 0.0,
                 conv_bias: bool = True, bias: bool = False):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner,
                                bias=conv_bias)
        self.act = nn.SiLU()
        self.x_proj_weight = nn.Parameter(torch.empty(K, self.dt_rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(K, d_inner, self.dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(K, d_inner))
        self.A_logs = nn.Parameter(torch.empty(K * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(K * d_inner))
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._init_ssm(dt_min, dt_max, dt_scale, dt_init_floor)

    @torch.no_grad()
    def _init_ssm(self, dt_min: float, dt_max: float, dt_scale: float, dt_init_floor: float) -> None:
        """Official init: nn.Linear default for x_proj, Mamba's dt init, S4D-real A, D = 1.

        Skipped on meta tensors, which have no values (serpent.layers: why that matters).
        """
        if self.Ds.is_meta:
            return
        bound = self.d_inner ** -0.5  # kaiming_uniform(a=sqrt(5)) of a Linear with fan_in d_inner
        self.x_proj_weight.uniform_(-bound, bound)
        std = self.dt_rank ** -0.5 * dt_scale
        self.dt_projs_weight.uniform_(-std, std)
        dt = torch.exp(torch.rand(K, self.d_inner) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_logs.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32))
                          .expand(K * self.d_inner, -1))
        self.Ds.fill_(1.0)

    def forward_core(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, D, H*W): the sum of the 4 directional scans, in row-major order."""
        b, d, h, w = x.shape
        seq = torch.stack([x.flatten(2), x.transpose(2, 3).flatten(2)], dim=1)  # (b, 2, d, l)
        xs = torch.cat([seq, seq.flip(-1)], dim=1)  # (b, k, d, l)

        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, bs, cs = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)

        f = _at_least_f32
        y = selective_scan(
            f(xs).flatten(1, 2), f(dts).flatten(1, 2).contiguous(),
            -torch.exp(f(self.A_logs)), f(bs), f(cs), f(self.Ds),
            delta_bias=f(self.dt_projs_bias).flatten(), delta_softplus=True,
        ).view(b, K, d, h * w)

        y = y[:, :2] + y[:, 2:].flip(-1)  # undo the reversal: (b, 2, d, l)
        return y[:, 0] + y[:, 1].view(b, d, w, h).transpose(2, 3).flatten(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        b, h, w, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2).contiguous()))
        y = self.forward_core(x).transpose(1, 2).reshape(b, h, w, -1)
        # the official keeps y in float32 here; matching the norm's dtype also lets bf16 models run
        y = self.out_norm(y.to(self.out_norm.weight.dtype)) * F.silu(z)
        return self.dropout(self.out_proj(y))


# --------------------------------------------------------------------------- blocks


class VSSBlock(nn.Module):
    """Residual state-space block: x*s1 + SS2D(LN(x)), then x*s2 + CAB(LN(x))."""

    def __init__(self, *, hidden_dim: int, drop_path: float = 0.0, d_state: int = 16, expand: float = 2.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim)  # eps 1e-5: the official BasicLayer passes nn.LayerNorm
        self.self_attention = SS2D(d_model=hidden_dim, d_state=d_state, expand=expand)
        self.drop_path = DropPath(drop_path)
        self.skip_scale = nn.Parameter(torch.ones(hidden_dim))
        self.conv_blk = CAB(hidden_dim)
        self.ln_2 = nn.LayerNorm(hidden_dim)
        self.skip_scale2 = nn.Parameter(torch.ones(hidden_dim))

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        b, l, c = x.shape
        x = x.view(b, *x_size, c)
        x = x * self.skip_scale + self.drop_path(self.self_attention(self.ln_1(x)))
        cab = self.conv_blk(self.ln_2(x).permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)
        return (x * self.skip_scale2 + cab).reshape(b, l, c)


class BasicLayer(nn.Module):
    def __init__(self, *, dim: int, depth: int, drop_path: list[float], d_state: int, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList(
            VSSBlock(hidden_dim=dim, drop_path=drop_path[i], d_state=d_state, expand=mlp_ratio)
            for i in range(depth))

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x, x_size)
        return x


class ResidualGroup(nn.Module):
    """Residual state-space group (RSSG): blocks -> 3x3 conv, plus a skip (resi_connection '1conv')."""

    def __init__(self, *, dim: int, depth: int, drop_path: list[float], d_state: int, mlp_ratio: float):
        super().__init__()
        self.residual_group = BasicLayer(dim=dim, depth=depth, drop_path=drop_path, d_state=d_state,
                                         mlp_ratio=mlp_ratio)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        y = self.residual_group(x, x_size)
        y = self.conv(rearrange(y, "b (h w) c -> b c h w", h=x_size[0], w=x_size[1]))
        return y.flatten(2).transpose(1, 2) + x


class PatchEmbed(nn.Module):
    """Flatten (B, C, H, W) to tokens (B, HW, C), then the optional norm (patch size 1)."""

    def __init__(self, *, embed_dim: int, norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)
        return self.norm(x) if self.norm is not None else x


# --------------------------------------------------------------------------- model


class MambaIR(nn.Module):
    """Shallow conv -> RSSGs -> norm -> conv (+ skip) -> reconstruction (pixelshuffle SR or x1)."""

    def __init__(self, *, in_chans: int = 3, embed_dim: int = 96, depths: tuple[int, ...] = (6, 6, 6, 6),
                 d_state: int = 16, mlp_ratio: float = 2.0, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, patch_norm: bool = True, upscale: int = 2,
                 img_range: float = 1.0, upsampler: str = "", resi_connection: str = "1conv"):
        super().__init__()
        if upsampler not in ("pixelshuffle", ""):
            raise ValueError(f"upsampler {upsampler!r} is not supported: use 'pixelshuffle' (classical SR) "
                             "or '' (x1 restoration)")
        if resi_connection != "1conv":
            raise ValueError("only resi_connection='1conv' (every official MambaIR config) is supported")
        num_feat = 64
        self.img_range = img_range
        self.upscale = upscale
        self.upsampler = upsampler
        mean = (0.4488, 0.4371, 0.4040) if in_chans == 3 else (0.0,)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)

        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(embed_dim=embed_dim, norm=patch_norm)
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.layers = nn.ModuleList(
            ResidualGroup(dim=embed_dim, depth=depth, drop_path=dpr[s:s + depth], d_state=d_state,
                          mlp_ratio=mlp_ratio)
            for s, depth in zip(starts, depths))
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1)

        if upsampler == "pixelshuffle":
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1),
                                                      nn.LeakyReLU(inplace=True))
            self.upsample = Upsample(upscale, num_feat)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
        else:
            self.conv_last = nn.Conv2d(embed_dim, in_chans, 3, 1, 1)
        self.apply(init_transformer_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x_size = (x.shape[2], x.shape[3])
        x = self.pos_drop(self.patch_embed(x))
        for layer in self.layers:
            x = layer(x, x_size)
        x = self.norm(x)
        return rearrange(x, "b (h w) c -> b c h w", h=x_size[0], w=x_size[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.mean.to(x.dtype)
        x = (x - mean) * self.img_range
        if self.upsampler == "pixelshuffle":
            x = self.conv_first(x)
            x = self.conv_after_body(self.forward_features(x)) + x
            x = self.conv_last(self.upsample(self.conv_before_upsample(x)))
        else:
            first = self.conv_first(x)
            x = x + self.conv_last(self.conv_after_body(self.forward_features(first)) + first)
        return x / self.img_range + mean


# --------------------------------------------------------------------------- constructors

BASE = dict(embed_dim=180, depths=(6, 6, 6, 6, 6, 6), d_state=16, img_range=1.0)
CLASSICAL_SR = dict(BASE, mlp_ratio=2.0, upsampler="pixelshuffle")
COLOR_DN = dict(BASE, mlp_ratio=1.2, upsampler="", upscale=1)


@register_model(family="ssm", multiple=1, upsampler=True,
                reference="Guo et al., ECCV 2024, github.com/csguoh/MambaIR",
                notes="sr: classical-SR config (official weights x2/x3/x4; x8 has none); "
                      "denoise and deblur: color-denoising config")
def mambair(*, task: str, scale: int, **overrides) -> MambaIR:
    """Official MambaIR for `task`: classical SR x`scale`, else the color-denoising network."""
    config = dict(CLASSICAL_SR, upscale=scale) if task == "sr" else COLOR_DN
    return MambaIR(**{**config, **overrides})

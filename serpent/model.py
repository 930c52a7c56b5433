"""Serpent: multi-scale selective-state-space image restoration (our reading of arXiv 2403.17902).

The authors' code and weights (published with arXiv v3) cannot be reached from our machines; this
follows the paper's description (see MODEL_CARD.md for
which hyperparameters are ours): patch embedding -> U-Net of Serpent blocks (encoder stages with
2x downsampling and doubling channels, bottleneck, decoder with skip connections) -> PixelShuffle
un-embedding -> output conv, plus a global residual. A Serpent block is pre-norm
`x + MSSM(LN(x))`, `x + FFN(LN(x))`; MSSM runs Mamba's selective scan (S6) over a pyramid of
scales, each unrolled into four directional sequences that go through ONE scan call (directions
stacked along channels, B and C grouped per direction, as VMamba's cross-scan does).

File order as in timm: helpers (scan paths, init), blocks, model, registered constructors.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from serpent.fused import mssm_core, use_fused
from serpent.fused_linear import activation_dtype, fused_linear
from serpent.layers import DropPath, init_transformer_weights
from serpent.registry import register_model
from serpent.scan import selective_scan

PATHS = ("raster", "serpentine")

# --------------------------------------------------------------------------- helpers: scan paths


def _snake(x: torch.Tensor) -> torch.Tensor:
    """Reverse every other row of (..., rows, cols): raster order <-> boustrophedon."""
    out = x.clone()
    out[..., 1::2, :] = x[..., 1::2, :].flip(-1)
    return out


def _build_orders(h: int, w: int, path: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    if path not in PATHS:
        raise ValueError(f"scan path must be one of {PATHS}, got {path!r}")
    grid = torch.arange(h * w, device=device).view(h, w)
    walk = _snake if path == "serpentine" else (lambda g: g)
    rows, cols = walk(grid).flatten(), walk(grid.t()).flatten()
    order = torch.stack([rows, cols, rows.flip(0), cols.flip(0)])
    return order, order.argsort(dim=1)


@functools.lru_cache(maxsize=256)
def _cached_orders(h: int, w: int, path: str,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # never inference tensors: a cache filled under torch.inference_mode also serves training,
    # where gather saves its index for backward
    with torch.inference_mode(False):
        return _build_orders(h, w, path, device)


def scan_orders(h: int, w: int, path: str,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, inverse), each (4, h*w): sequence step -> flat pixel index and back, for the
    directions rows, columns, rows reversed, columns reversed. Cached per size in eager mode
    (unrolling and rolling back are then one gather each); built fresh under torch.compile,
    which traces the few index ops instead of a cache it cannot see through."""
    if torch.compiler.is_compiling():
        return _build_orders(h, w, path, device)
    return _cached_orders(h, w, path, torch.device(device))


def clear_scan_orders_cache() -> None:
    """Drop the cached scan orders (they hold device memory)."""
    _cached_orders.cache_clear()


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(b, 4 or 1, c, l) by (4, l) -> (b, 4, c, l): out[:, k, :, i] = x[:, k, :, index[k, i]]."""
    b, _, c, l = x.shape
    return x.expand(b, 4, c, l).gather(-1, index[None, :, None, :].expand(b, 4, c, l))


def unroll(x: torch.Tensor, path: str = "serpentine") -> torch.Tensor:
    """(b, c, h, w) -> (b, 4, c, h*w): along rows, along columns, and both reversed.

    "raster" restarts every row (column) at its first pixel; "serpentine" walks alternate rows
    (columns) backwards, so consecutive sequence elements are always 4-neighbours in the image.
    """
    h, w = x.shape[-2:]
    order, _ = scan_orders(h, w, path, x.device)
    return _gather(x.flatten(-2).unsqueeze(1), order)


def roll_back(y: torch.Tensor, h: int, w: int, path: str = "serpentine") -> torch.Tensor:
    """Inverse of `unroll`: (b, 4, c, h*w) -> (b, 4, c, h, w), each direction on the grid."""
    _, inverse = scan_orders(h, w, path, y.device)
    return _gather(y, inverse).unflatten(-1, (h, w))


def merge_directions(y: torch.Tensor, h: int, w: int, path: str = "serpentine") -> torch.Tensor:
    """`roll_back(y).sum(1)`: (b, 4, c, h*w) -> (b, c, h, w)."""
    return roll_back(y, h, w, path).sum(1)


def _at_least_fp32(p: torch.Tensor) -> torch.Tensor:
    """SSM parameters in float32 (the scan kernels' precision), float64 ones kept."""
    return p.to(torch.promote_types(p.dtype, torch.float32))


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    return F.pad(x, (0, -w % multiple, 0, -h % multiple), mode="replicate")


# --------------------------------------------------------------------------- blocks


class DirectionalSSM(nn.Module):
    """S6 over the four directional sequences of one scale; own parameters per direction.

    Parameter layout follows VMamba's SS2D (x_proj_weight, dt_projs_*, A_logs, Ds), with Mamba's
    initialisation: S4D-real A = -(1..N), dt = softplus(bias) log-uniform in [dt_min, dt_max].
    """

    def __init__(self, *, dim: int, d_state: int, dt_rank: int, dt_min: float = 1e-3,
                 dt_max: float = 0.1, scan_backend: str = "auto", path: str = "serpentine"):
        super().__init__()
        k = 4
        self.d_state, self.dt_rank = d_state, dt_rank
        self.scan_backend, self.path = scan_backend, path
        self.x_proj_weight = nn.Parameter(torch.empty(k, dt_rank + 2 * d_state, dim))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, dim, dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, dim))
        self.A_logs = nn.Parameter(torch.empty(k * dim, d_state))
        self.Ds = nn.Parameter(torch.empty(k * dim))
        self._init_ssm(dt_min, dt_max)

    @torch.no_grad()
    def _init_ssm(self, dt_min: float, dt_max: float) -> None:
        """Mamba's initialisation (class docstring); skipped on meta tensors, which have no
        values (serpent.layers: why that matters)."""
        if self.Ds.is_meta:
            return
        k, dim, dt_rank = self.dt_projs_weight.shape
        bound = dim ** -0.5  # nn.Linear's default init range for fan-in `dim`
        self.x_proj_weight.uniform_(-bound, bound)
        std = dt_rank ** -0.5
        self.dt_projs_weight.uniform_(-std, std)
        log_dt = torch.rand(k, dim) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = torch.exp(log_dt).clamp(min=1e-4)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1
        self.A_logs.copy_(torch.log(torch.arange(1, self.d_state + 1.0)).repeat(k * dim, 1))
        self.Ds.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, h, w) -> (b, c, h, w): scan four directions in one call, roll back, sum."""
        h, w = x.shape[-2:]
        xs = unroll(x, self.path)  # (b, k, c, l)
        x_dbl = torch.einsum("bkcl,kjc->bkjl", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kcr->bkcl", dts, self.dt_projs_weight)
        y = selective_scan(
            xs.flatten(1, 2), dts.flatten(1, 2), -torch.exp(_at_least_fp32(self.A_logs)),
            Bs, Cs, _at_least_fp32(self.Ds), None,
            _at_least_fp32(self.dt_projs_bias.flatten()), delta_softplus=True,
            backend=self.scan_backend)
        return merge_directions(y.unflatten(1, (4, -1)), h, w, self.path)


class MSSM(nn.Module):
    """Multi-scale selective-scan mixer on channels-last maps (b, h, w, c).

    in-proj to (x, z); depthwise 3x3 conv + SiLU on x; for each pyramid scale s (x, avgpool2(x),
    avgpool4(x), ...) a DirectionalSSM; every scale upsampled to the finest and fused by a 1x1
    projection of their concatenation; LayerNorm; gate with SiLU(z); out-projection.
    """

    def __init__(self, *, dim: int, expand: float = 2.0, d_state: int = 16, num_scales: int = 3,
                 scan_path: str = "serpentine", scan_backend: str = "auto"):
        super().__init__()
        inner = int(expand * dim)
        self.scan_backend, self.scan_path = scan_backend, scan_path
        self.in_proj = nn.Linear(dim, 2 * inner)
        self.dwconv = nn.Conv2d(inner, inner, 3, padding=1, groups=inner)
        self.ssms = nn.ModuleList(
            DirectionalSSM(dim=inner, d_state=d_state, dt_rank=math.ceil(dim / 16),
                           scan_backend=scan_backend, path=scan_path) for _ in range(num_scales))
        self.fuse = nn.Linear(num_scales * inner, inner) if num_scales > 1 else nn.Identity()
        self.out_norm = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, dim)

    def fused(self, x: torch.Tensor) -> bool:
        """Whether this mixer (and its block) runs the fused ops for input x (serpent.fused)."""
        return use_fused(self.scan_backend, x.device, x.dtype, len(self.ssms))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused(x):
            xz = fused_linear(x, self.in_proj.weight, self.in_proj.bias)
            return fused_linear(self._fused_core(xz), self.out_proj.weight, self.out_proj.bias)
        h, w = x.shape[1:3]
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = F.silu(self.dwconv(rearrange(x, "b h w c -> b c h w")))
        scales = []
        for s, ssm in enumerate(self.ssms):
            # ceil_mode: border windows average only their valid pixels, any size works
            xs = F.avg_pool2d(x, 2 ** s, ceil_mode=True) if s else x
            ys = ssm(xs)
            if s:
                ys = F.interpolate(ys, size=(h, w), mode="bilinear", align_corners=False)
            scales.append(rearrange(ys, "b c h w -> b h w c"))
        y = self.out_norm(self.fuse(torch.cat(scales, dim=-1)))
        return self.out_proj(y * F.silu(z))

    def _fused_core(self, xz: torch.Tensor) -> torch.Tensor:
        """Everything between in_proj and out_proj as one op (serpent.fused): same function,
        same parameters, a few kernel launches instead of ~70."""
        fuse = self.fuse if isinstance(self.fuse, nn.Linear) else None
        return mssm_core(
            xz, self.dwconv.weight, self.dwconv.bias, [m.x_proj_weight for m in self.ssms],
            [m.dt_projs_weight for m in self.ssms], [m.dt_projs_bias for m in self.ssms],
            [m.A_logs for m in self.ssms], [m.Ds for m in self.ssms],
            None if fuse is None else fuse.weight, None if fuse is None else fuse.bias,
            self.out_norm.weight, self.out_norm.bias, self.out_norm.eps, self.scan_path)


class FeedForward(nn.Module):
    def __init__(self, *, dim: int, mlp_ratio: float = 2.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SerpentBlock(nn.Module):
    """Pre-norm residual block: x + MSSM(LN(x)), then x + FFN(LN(x)); channels-last."""

    def __init__(self, *, dim: int, mlp_ratio: float, drop_path: float = 0.0, **mssm):
        super().__init__()
        self.norm1, self.mixer = nn.LayerNorm(dim), MSSM(dim=dim, **mssm)
        self.norm2, self.ffn = nn.LayerNorm(dim), FeedForward(dim=dim, mlp_ratio=mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        if self.mixer.fused(x):
            return self._fused_forward(x)
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        return x + self.drop_path(self.ffn(self.norm2(x)))

    def _fused_forward(self, x):
        """The same function in 10 kernel launches in any dtype: LN1 + in_proj, the mixer core
        (6), out_proj + residual, LN2 + fc1 + GELU, fc2 + residual (serpent.fused_linear)."""
        act, mixer, ffn = activation_dtype(x), self.mixer, self.ffn
        xz = fused_linear(x, mixer.in_proj.weight, mixer.in_proj.bias, ln=self.norm1, act_dtype=act)
        x = fused_linear(mixer._fused_core(xz), mixer.out_proj.weight, mixer.out_proj.bias,
                         residual=x, scale=self._drop_scale(x), act_dtype=act)
        h = fused_linear(x, ffn.fc1.weight, ffn.fc1.bias, ln=self.norm2, gelu=True, act_dtype=act)
        return fused_linear(h, ffn.fc2.weight, ffn.fc2.bias, residual=x,
                            scale=self._drop_scale(x), act_dtype=act)

    def _drop_scale(self, x):
        """Stochastic depth's per-sample factor (DropPath's draw: the same random numbers), or
        None when it is the identity."""
        dp = self.drop_path
        if not isinstance(dp, DropPath) or not self.training or dp.drop_prob == 0.0:
            return None
        keep = 1 - dp.drop_prob
        scale = x.new_empty(x.shape[0], dtype=torch.float32).bernoulli_(keep)
        return scale.div_(keep) if keep > 0.0 and dp.scale_by_keep else scale


class Stage(nn.Module):
    """Serpent blocks on an NCHW map (channels-last inside, one permute each way)."""

    def __init__(self, *, dim: int, drop_path: list[float], **block):
        """One block per entry of `drop_path` (its stochastic-depth rate)."""
        super().__init__()
        self.blocks = nn.Sequential(*(SerpentBlock(dim=dim, drop_path=dp, **block)
                                      for dp in drop_path))

    def forward(self, x):
        return rearrange(self.blocks(rearrange(x, "b c h w -> b h w c")), "b h w c -> b c h w")


# --------------------------------------------------------------------------- model


class Serpent(nn.Module):
    """U-Net of Serpent blocks; maps (B, 3, H, W) to (B, 3, H, W) for any H, W.

    depths[i] blocks at encoder level i (channels embed_dim * 2**i), depths[-1] in the bottleneck;
    dec_depths[i] blocks at decoder level i (shallow first, len(depths) - 1 of them).
    """

    def __init__(self, *, in_chans: int = 3, embed_dim: int = 32, depths=(2, 2, 4),
                 dec_depths=(2, 2), patch_size: int = 4, expand: float = 2.0, d_state: int = 16,
                 num_scales: int = 3, mlp_ratio: float = 2.0, scan_path: str = "serpentine",
                 drop_path_rate: float = 0.0, scan_backend: str = "auto"):
        super().__init__()
        if len(dec_depths) != len(depths) - 1:
            raise ValueError(f"need len(dec_depths) == len(depths) - 1, got {dec_depths}, {depths}")
        levels = len(depths)
        self.multiple = patch_size * 2 ** (levels - 1)
        dims = [embed_dim * 2 ** i for i in range(levels)]
        block = dict(mlp_ratio=mlp_ratio, expand=expand, d_state=d_state, num_scales=num_scales,
                     scan_path=scan_path, scan_backend=scan_backend)
        # on the CPU: Python floats, also when built under `with torch.device("meta")`
        rates = iter(torch.linspace(0, drop_path_rate, sum(depths) + sum(dec_depths),
                                    device="cpu").tolist())

        def stage(dim, depth):
            return Stage(dim=dim, drop_path=[next(rates) for _ in range(depth)], **block)

        enc, dec = range(levels - 1), reversed(range(levels - 1))  # decoder: deepest first
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.encoder = nn.ModuleList(stage(dims[i], depths[i]) for i in enc)
        self.downs = nn.ModuleList(nn.Conv2d(dims[i], dims[i + 1], 2, stride=2) for i in enc)
        self.bottleneck = stage(dims[-1], depths[-1])
        self.ups, self.reduces, self.decoder = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i in dec:
            up = nn.Conv2d(dims[i + 1], 4 * dims[i], 1)
            self.ups.append(nn.Sequential(up, nn.PixelShuffle(2)))
            self.reduces.append(nn.Conv2d(2 * dims[i], dims[i], 1))
            self.decoder.append(stage(dims[i], dec_depths[i]))
        self.unembed = nn.Sequential(nn.Conv2d(embed_dim, embed_dim * patch_size ** 2, 1),
                                     nn.PixelShuffle(patch_size))
        self.conv_out = nn.Conv2d(embed_dim, in_chans, 3, padding=1)
        self.apply(init_transformer_weights)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        x = _pad_to(img, self.multiple)
        feat = self.patch_embed(x)
        skips = []
        for stage, down in zip(self.encoder, self.downs):
            feat = stage(feat)
            skips.append(feat)
            feat = down(feat)
        feat = self.bottleneck(feat)
        for up, reduce, stage in zip(self.ups, self.reduces, self.decoder):
            feat = stage(reduce(torch.cat([up(feat), skips.pop()], dim=1)))
        out = self.conv_out(self.unembed(feat)) + x
        return out[..., :h, :w]


# --------------------------------------------------------------------------- constructors

REFERENCE = ("Sepehri, Fabian, Soltanolkotabi: 'Serpent: Scalable and Efficient Image Restoration "
             "via Multi-scale Structured State Space Models', arXiv 2403.17902 (NGSM workshop, "
             "ICML 2024); code (GitHub AIF4S/Serpent) and weights (Hugging Face hub) published "
             "with arXiv v3 but unreachable from our machines: our reading of the paper")
NOTES = ("x1 network: for SR it gets the bicubic upsample (upsampler=False); "
         "hyperparameters are ours (serpent/MODEL_CARD.md)")
_REG = dict(family="ssm", multiple=1, upsampler=False, reference=REFERENCE,
            tasks=("deblur", "denoise", "sr"), scales=(2, 3, 4, 8))

CONFIGS = {
    "serpent_t": dict(embed_dim=16, depths=(2, 2, 4), dec_depths=(2, 2)),
    "serpent_s": dict(embed_dim=32, depths=(2, 2, 4), dec_depths=(2, 2)),
    "serpent_b": dict(embed_dim=48, depths=(2, 4, 6), dec_depths=(2, 4)),
}
# task and scale only decide what the harness feeds (the same x1 network for every task)


@register_model(**_REG, notes="tiny variant; " + NOTES)
def serpent_t(*, task: str = "deblur", scale: int = 1, **overrides) -> Serpent:
    return Serpent(**{**CONFIGS["serpent_t"], **overrides})


@register_model(**_REG, notes="small variant (the default, also registered as 'serpent'); " + NOTES)
def serpent_s(*, task: str = "deblur", scale: int = 1, **overrides) -> Serpent:
    return Serpent(**{**CONFIGS["serpent_s"], **overrides})


@register_model(**_REG, notes="base variant; " + NOTES)
def serpent_b(*, task: str = "deblur", scale: int = 1, **overrides) -> Serpent:
    return Serpent(**{**CONFIGS["serpent_b"], **overrides})


register_model(name="serpent", alias_of="serpent_s", **_REG, notes="default variant = serpent_s; " + NOTES)(serpent_s)

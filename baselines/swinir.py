"""SwinIR (Liang et al., "SwinIR: Image Restoration Using Swin Transformer", ICCVW 2021).

Faithful to JingyunLiang/SwinIR `models/network_swinir.py` (current version, which reflect-pads
the input to the window size and crops back): same module tree, parameter and buffer names and
shapes, so the official checkpoints load with `strict=True`, and the same function. What differs
is how it is computed:

- Window attention runs through `scaled_dot_product_attention` by default (relative-position bias
  and shift mask as `attn_mask`, the official scale); `attn_impl="math"` is the official explicit
  softmax, kept to show the two equal (tests) and to measure the difference.
- The shifted-window mask is built on the input's device and cached per size. The official code
  rebuilds it on the CPU, with Python loops, in every block of every forward whose size differs
  from `img_size` (hundreds of ms per image on a GPU that needs a few ms for the FLOPs).
- Roll + window partition (and their inverses) are one cached token gather. Windows are laid out
  window-major with the batch inner and the windows that the shift mask touches (last window row
  and column) last. Only those get a mask: the other windows share the (heads, N, N) bias,
  broadcast, so no (windows x heads x N x N) tensor is materialised on the SDPA path. The masked
  windows go through a second SDPA call with their bias folded into the head dimension.
- The `attn_mask` buffers stay (every official checkpoint has them, shaped by `img_size`) but are
  not read: the cached mask is the same function at every size, `img_size` included.
- `use_checkpoint=True` works (the official call omits `x_size`).

Configurations (official `main_test_swinir.py`): embed 180, depths 6x[6], heads 6x[6], window 8,
mlp ratio 2, `resi_connection='1conv'`.
- denoise / deblur: color denoising (`005_colorDN_DFWB_s128w8_SwinIR-M_noise*.pth`: upscale 1,
  `upsampler=''`, img_size 128). SwinIR has no deblurring model; deblur uses the same network.
- sr: classical SR (`upsampler='pixelshuffle'`, x2/x3/x4/x8), img_size 64 = the DF2K
  `001_classicalSR_DF2K_s64w8_SwinIR-M_x*.pth` checkpoints; pass `img_size=48` for the DIV2K
  `s48w8` ones (img_size shapes only the `attn_mask` buffers, not the function).
"""
from __future__ import annotations

import functools
import math
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from baselines.attention import check_attn_impl
from serpent.layers import DropPath, init_transformer_weights, to_2tuple, trunc_normal_
from serpent.registry import register_model

REFERENCE = "Liang et al., ICCVW 2021, github.com/JingyunLiang/SwinIR"

# --------------------------------------------------------------------------- helpers


def _windows(t: torch.Tensor, window_size: int) -> torch.Tensor:
    """(H, W, *rest) -> (num_windows, window_size**2, *rest), windows in row-major order."""
    h, w, *rest = t.shape
    ws = window_size
    t = t.reshape(h // ws, ws, w // ws, ws, *rest).transpose(1, 2)
    return t.reshape((h // ws) * (w // ws), ws * ws, *rest)


def _region_labels(height: int, width: int, window_size: int, shift_size: int,
                   device=None) -> torch.Tensor:
    """(H, W) region id of every position of the rolled map (the official 3x3 slices)."""
    def bands(n):
        i = torch.arange(n, device=device)
        return (i >= n - window_size).long() + (i >= n - shift_size).long()
    return bands(height)[:, None] * 3 + bands(width)[None, :]


def _pairwise_mask(labels: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(..., N) window labels -> (..., N, N) additive mask: 0 within a region, -100 across."""
    differ = labels[..., :, None] != labels[..., None, :]
    return torch.zeros(differ.shape, dtype=dtype, device=labels.device).masked_fill_(differ, -100.0)


def shift_window_mask(height: int, width: int, window_size: int, shift_size: int,
                      device=None, dtype=torch.float32) -> torch.Tensor:
    """The official SW-MSA mask (`calculate_mask`): (num_windows, N, N), row-major windows."""
    labels = _region_labels(height, width, window_size, shift_size, device)
    return _pairwise_mask(_windows(labels, window_size), dtype)


def relative_position_index(window_size: tuple[int, int], device=None) -> torch.Tensor:
    """(N, N) index into the (2Wh-1)(2Ww-1) bias table for every query/key pair of a window."""
    wh, ww = window_size
    ys, xs = torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device),
                            indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + wh - 1
    dx = xs[:, None] - xs[None, :] + ww - 1
    return dy * (2 * ww - 1) + dx


@functools.lru_cache(maxsize=16)
def _cpu_constant(fn, *args) -> torch.Tensor:
    return fn(*args, device="cpu")


def _constant_buffer(fn, *args) -> torch.Tensor:
    """`fn(*args)` for a buffer: computed once on the CPU (every block has the same one) and
    copied to the default device; a free copy under `with torch.device("meta")`, where computing
    it would run slow Python meta kernels (see serpent.layers)."""
    return _cpu_constant(fn, *args).to(torch.get_default_device(), copy=True)


def _persistent():
    """Tensors cached across calls must not be inference tensors (they may later meet autograd)."""
    return nullcontext() if torch.compiler.is_compiling() else torch.inference_mode(False)


class WindowPlan:
    """How a block cuts a (B, H*W, C) token map into attention windows; cached per size.

    ``gather`` picks the token of the cyclically shifted map for every window slot: windows are
    ordered window-major with the batch inner (so a run of windows is a view) and the
    ``num_windows - n_plain`` windows touched by the shift mask come last. ``scatter`` is the
    inverse permutation (un-partition and roll back in one gather).
    """

    def __init__(self, batch: int, height: int, width: int, window_size: int, shift_size: int,
                 device=None):
        nh, nw = height // window_size, width // window_size
        ids = torch.arange(nh * nw, device=device).view(nh, nw)
        if shift_size:  # only the last window row and column straddle the wrap-around
            order = torch.cat([ids[:-1, :-1].flatten(), ids[:-1, -1], ids[-1]])
            self.n_plain = (nh - 1) * (nw - 1)
        else:
            order = ids.flatten()
            self.n_plain = nh * nw
        rows = (torch.arange(height, device=device) + shift_size) % height
        cols = (torch.arange(width, device=device) + shift_size) % width
        src = _windows(rows[:, None] * width + cols[None, :], window_size)[order]  # (nW, N)
        offsets = torch.arange(batch, device=device) * (height * width)
        self.gather = (src[:, None, :] + offsets[None, :, None]).flatten()
        self.scatter = torch.empty_like(self.gather)
        self.scatter[self.gather] = torch.arange(self.gather.numel(), device=device)
        self.shape = (nh * nw, batch, window_size * window_size)  # (windows, batch, tokens)
        self.order = order
        self._labels = None
        if shift_size:
            labels = _windows(_region_labels(height, width, window_size, shift_size, device),
                              window_size)
            self._labels = labels[order[self.n_plain:]]
        self._masks: dict = {}

    def mask(self, dtype: torch.dtype, full: bool = False) -> torch.Tensor | None:
        """0/-100 shift mask, (masked windows, N, N), or (all windows, N, N) if `full`."""
        if self._labels is None:
            return None
        key = (dtype, full)
        if key not in self._masks:
            with _persistent():
                m = _pairwise_mask(self._labels, dtype)
                if full:
                    m = torch.cat([m.new_zeros(self.n_plain, *m.shape[1:]), m])
            if torch.compiler.is_compiling():
                return m
            self._masks[key] = m
        return self._masks[key]


@functools.lru_cache(maxsize=16)
def _cached_plan(*args) -> WindowPlan:
    with torch.inference_mode(False):
        return WindowPlan(*args)


def window_plan(batch: int, height: int, width: int, window_size: int, shift_size: int,
                device) -> WindowPlan:
    """The cached WindowPlan for this size and device (built fresh under torch.compile)."""
    if torch.compiler.is_compiling():
        return WindowPlan(batch, height, width, window_size, shift_size, device)
    return _cached_plan(batch, height, width, window_size, shift_size, torch.device(device))


def clear_window_cache() -> None:
    """Drop the cached window plans and masks (they hold device memory)."""
    _cached_plan.cache_clear()


# --------------------------------------------------------------------------- blocks


class Mlp(nn.Module):
    """The official SwinIR MLP: fc1 -> act -> dropout -> fc2 -> dropout."""

    def __init__(self, in_features: int, hidden_features: int | None = None,
                 out_features: int | None = None, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features or in_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features or in_features, out_features or in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """(Shifted-)window multi-head self-attention with relative position bias (W-MSA / SW-MSA)."""

    def __init__(self, dim: int, window_size: tuple[int, int], num_heads: int, qkv_bias=True,
                 qk_scale=None, attn_drop=0.0, proj_drop=0.0, attn_impl: str = "sdpa"):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_impl = check_attn_impl(attn_impl)
        wh, ww = window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer("relative_position_index",
                             _constant_buffer(relative_position_index, window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, "
                f"attn_impl={self.attn_impl}")

    def relative_position_bias(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1).contiguous()  # (heads, N, N)

    def forward(self, x: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
        """x: (windows, batch, N, C) laid out as `plan` says; returns the same shape."""
        nw, b, n, c = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).view(nw, b, n, 3, h, c // h).permute(3, 0, 1, 4, 2, 5).unbind(0)
        bias = self.relative_position_bias()
        if self.attn_impl == "math":  # the official computation, all windows at once
            attn = (q * self.scale) @ k.transpose(-2, -1) + bias
            mask = plan.mask(attn.dtype, full=True)
            if mask is not None:
                attn = attn + mask[:, None, None]
            parts = [self.attn_drop(attn.softmax(dim=-1)) @ v]
        else:
            parts = self._sdpa(q, k, v, bias.to(q.dtype), plan)
        out = torch.cat([p.transpose(-3, -2) for p in parts])  # (windows, batch, N, heads, d)
        return self.proj_drop(self.proj(out.reshape(nw, b, n, c)))

    def _sdpa(self, q, k, v, bias, plan):
        nw, b, h, n, d = q.shape
        p = self.attn_drop.p if self.training else 0.0
        # The fused (memory-efficient) kernel needs a head dim divisible by 8 and a 4-D mask;
        # SwinIR's is 180 / 6 = 30. Zero-padding q, k, v to 32 leaves q.k and the first 30
        # output columns unchanged (the scale stays 30 ** -0.5), so the function is the same.
        pad = _fused_kernel_pad(q)
        if pad:
            q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        sdpa = functools.partial(F.scaled_dot_product_attention, dropout_p=p, scale=self.scale)
        split = plan.n_plain
        parts = []
        if split:  # unmasked windows: one (heads, N, N) bias broadcast over windows and batch
            flat = [t[:split].flatten(0, 1) for t in (q, k, v)]
            parts.append(sdpa(*flat, attn_mask=bias[None]).view(split, b, h, n, d + pad))
        if split < nw:  # masked windows: fold windows into heads so the mask broadcasts over batch
            m = nw - split
            folded = [t[split:].transpose(0, 1).reshape(b, m * h, n, d + pad) for t in (q, k, v)]
            mask = (bias + plan.mask(q.dtype)[:, None]).view(1, m * h, n, n)
            parts.append(sdpa(*folded, attn_mask=mask).view(b, m, h, n, d + pad).transpose(0, 1))
        return [part[..., :d] for part in parts] if pad else parts


def _fused_kernel_pad(q: torch.Tensor) -> int:
    """Head-dim padding for SDPA's fused kernels: CUDA only (where those kernels are), so FLOP
    counts on meta tensors stay those of the real head dim."""
    return -q.shape[-1] % 8 if q.is_cuda else 0


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int,
                 window_size=7, shift_size=0, mlp_ratio=4.0, qkv_bias=True, qk_scale=None,
                 drop=0.0, attn_drop=0.0, drop_path=0.0, act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm, attn_impl: str = "sdpa"):
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.mlp_ratio = mlp_ratio
        if min(input_resolution) <= window_size:  # official: no partition when img_size fits
            self.shift_size = 0
            self.window_size = min(input_resolution)
        if not 0 <= self.shift_size < self.window_size:
            raise ValueError(f"shift_size must be in [0, {self.window_size}), got {shift_size}")
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, to_2tuple(self.window_size), num_heads, qkv_bias,
                                    qk_scale, attn_drop, drop, attn_impl)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                       drop=drop)
        # kept for checkpoint compatibility only (see module docstring)
        attn_mask = (_constant_buffer(shift_window_mask, *input_resolution, self.window_size,
                                      self.shift_size)
                     if self.shift_size > 0 else None)
        self.register_buffer("attn_mask", attn_mask)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, input_resolution={self.input_resolution}, "
                f"num_heads={self.num_heads}, window_size={self.window_size}, "
                f"shift_size={self.shift_size}, mlp_ratio={self.mlp_ratio}")

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        height, width = x_size
        b, length, c = x.shape
        plan = window_plan(b, height, width, self.window_size, self.shift_size, x.device)
        windows = self.norm1(x).reshape(b * length, c).index_select(0, plan.gather)
        windows = self.attn(windows.view(*plan.shape, c), plan)
        y = windows.reshape(b * length, c).index_select(0, plan.scatter).view(b, length, c)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BasicLayer(nn.Module):
    """A stage of Swin blocks, alternating plain and shifted windows."""

    def __init__(self, dim, input_resolution, depth, num_heads, window_size, mlp_ratio=4.0,
                 qkv_bias=True, qk_scale=None, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 norm_layer=nn.LayerNorm, use_checkpoint=False, attn_impl="sdpa"):
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(
                dim, input_resolution, num_heads, window_size,
                shift_size=0 if i % 2 == 0 else window_size // 2, mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop, attn_drop=attn_drop,
                drop_path=drop_path[i] if isinstance(drop_path, list) else drop_path,
                norm_layer=norm_layer, attn_impl=attn_impl)
            for i in range(depth)])

    def forward(self, x, x_size):
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, x_size, use_reentrant=False)
            else:
                x = blk(x, x_size)
        return x


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H*W, C), optionally normalised (patch size 1: no projection)."""

    def __init__(self, embed_dim: int, norm_layer=None):
        super().__init__()
        self.embed_dim = embed_dim
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x):
        x = x.flatten(2).transpose(1, 2)
        return self.norm(x) if self.norm is not None else x


class PatchUnEmbed(nn.Module):
    """(B, H*W, C) -> (B, C, H, W)."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.embed_dim = embed_dim

    def forward(self, x, x_size):
        return x.transpose(1, 2).view(x.shape[0], self.embed_dim, *x_size)


class RSTB(nn.Module):
    """Residual Swin Transformer Block: a stage of Swin blocks, a conv, a residual."""

    def __init__(self, dim, input_resolution, depth, num_heads, window_size, mlp_ratio=4.0,
                 qkv_bias=True, qk_scale=None, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 norm_layer=nn.LayerNorm, use_checkpoint=False, resi_connection="1conv",
                 attn_impl="sdpa"):
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.residual_group = BasicLayer(dim, input_resolution, depth, num_heads, window_size,
                                         mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, drop_path,
                                         norm_layer, use_checkpoint, attn_impl)
        self.conv = _resi_conv(dim, resi_connection)
        self.patch_embed = PatchEmbed(dim)
        self.patch_unembed = PatchUnEmbed(dim)

    def forward(self, x, x_size):
        y = self.patch_unembed(self.residual_group(x, x_size), x_size)
        return self.patch_embed(self.conv(y)) + x


def _resi_conv(dim: int, kind: str) -> nn.Module:
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if kind == "3conv":  # fewer parameters (SwinIR-L)
        return nn.Sequential(
            nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Conv2d(dim // 4, dim // 4, 1, 1, 0), nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Conv2d(dim // 4, dim, 3, 1, 1))
    raise ValueError(f"resi_connection must be '1conv' or '3conv', got {kind!r}")


class Upsample(nn.Sequential):
    """conv + PixelShuffle(2) per factor 2 (scale 2^n), or one conv + PixelShuffle(3)."""

    def __init__(self, scale: int, num_feat: int):
        layers = []
        if scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"scale {scale} is not supported; supported scales: 2^n and 3")
        super().__init__(*layers)


class UpsampleOneStep(nn.Sequential):
    """One conv + PixelShuffle to the output channels (lightweight SR)."""

    def __init__(self, scale: int, num_feat: int, num_out_ch: int):
        super().__init__(nn.Conv2d(num_feat, scale ** 2 * num_out_ch, 3, 1, 1),
                         nn.PixelShuffle(scale))


# --------------------------------------------------------------------------- model


class SwinIR(nn.Module):
    """SwinIR with the official constructor arguments (plus `attn_impl`)."""

    def __init__(self, *, img_size=64, patch_size=1, in_chans=3, embed_dim=96,
                 depths=(6, 6, 6, 6), num_heads=(6, 6, 6, 6), window_size=7, mlp_ratio=4.0,
                 qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.1, norm_layer=nn.LayerNorm, ape=False, patch_norm=True,
                 use_checkpoint=False, upscale=2, img_range=1.0, upsampler="",
                 resi_connection="1conv", attn_impl: str = "sdpa"):
        super().__init__()
        if patch_size != 1:
            raise ValueError("SwinIR uses patch_size=1 (as every official configuration)")
        num_feat = 64
        self.img_range = img_range
        mean = (0.4488, 0.4371, 0.4040) if in_chans == 3 else (0.0,) * in_chans
        self.register_buffer("mean", torch.tensor(mean).view(1, in_chans, 1, 1), persistent=False)
        self.upscale = upscale
        self.upsampler = upsampler
        self.window_size = window_size
        self.embed_dim = embed_dim
        self.num_layers = len(depths)
        self.ape = ape
        self.patches_resolution = list(to_2tuple(img_size))
        resolution = tuple(self.patches_resolution)

        # 1. shallow features
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        # 2. deep features
        self.patch_embed = PatchEmbed(embed_dim, norm_layer if patch_norm else None)
        self.patch_unembed = PatchUnEmbed(embed_dim)
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, resolution[0] * resolution[1],
                                                               embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList([
            RSTB(embed_dim, resolution, depths[i], num_heads[i], window_size, mlp_ratio,
                 qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                 dpr[sum(depths[:i]):sum(depths[:i + 1])], norm_layer, use_checkpoint,
                 resi_connection, attn_impl)
            for i in range(self.num_layers)])
        self.norm = norm_layer(embed_dim)
        self.conv_after_body = _resi_conv(embed_dim, resi_connection)
        # 3. reconstruction
        if upsampler == "pixelshuffle":  # classical SR
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1),
                                                      nn.LeakyReLU(inplace=True))
            self.upsample = Upsample(upscale, num_feat)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
        elif upsampler == "pixelshuffledirect":  # lightweight SR
            self.upsample = UpsampleOneStep(upscale, embed_dim, in_chans)
        elif upsampler == "nearest+conv":  # real-world SR
            if upscale != 4:
                raise ValueError("upsampler 'nearest+conv' supports upscale 4 only")
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1),
                                                      nn.LeakyReLU(inplace=True))
            self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
            self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        elif not upsampler:  # denoising, JPEG artifacts (x1)
            self.conv_last = nn.Conv2d(embed_dim, in_chans, 3, 1, 1)
        else:
            raise ValueError(f"unknown upsampler {upsampler!r}")
        self.apply(init_transformer_weights)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"absolute_pos_embed"}

    @torch.jit.ignore
    def no_weight_decay_keywords(self):
        return {"relative_position_bias_table"}

    def check_image_size(self, x: torch.Tensor) -> torch.Tensor:
        """Reflect-pad height and width up to a multiple of the window size (official)."""
        h, w = x.shape[-2:]
        pad_h = -h % self.window_size
        pad_w = -w % self.window_size
        return F.pad(x, (0, pad_w, 0, pad_h), "reflect") if pad_h or pad_w else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x_size = (x.shape[2], x.shape[3])
        x = self.patch_embed(x)
        if self.ape:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x, x_size)
        return self.patch_unembed(self.norm(x), x_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        x = self.check_image_size(x)
        mean = self.mean.to(x.dtype)
        x = (x - mean) * self.img_range
        if self.upsampler == "pixelshuffle":
            x = self.conv_first(x)
            x = self.conv_after_body(self.forward_features(x)) + x
            x = self.conv_last(self.upsample(self.conv_before_upsample(x)))
        elif self.upsampler == "pixelshuffledirect":
            x = self.conv_first(x)
            x = self.upsample(self.conv_after_body(self.forward_features(x)) + x)
        elif self.upsampler == "nearest+conv":
            x = self.conv_first(x)
            x = self.conv_before_upsample(self.conv_after_body(self.forward_features(x)) + x)
            x = self.lrelu(self.conv_up1(F.interpolate(x, scale_factor=2, mode="nearest")))
            x = self.lrelu(self.conv_up2(F.interpolate(x, scale_factor=2, mode="nearest")))
            x = self.conv_last(self.lrelu(self.conv_hr(x)))
        else:
            x_first = self.conv_first(x)
            x = x + self.conv_last(self.conv_after_body(self.forward_features(x_first)) + x_first)
        x = x / self.img_range + mean
        return x[:, :, :h * self.upscale, :w * self.upscale]


# --------------------------------------------------------------------------- constructors

OFFICIAL = dict(in_chans=3, window_size=8, img_range=1.0, depths=[6] * 6, embed_dim=180,
                num_heads=[6] * 6, mlp_ratio=2, resi_connection="1conv")
CLASSICAL_SR = dict(img_size=64, upsampler="pixelshuffle")
COLOR_DN = dict(upscale=1, img_size=128, upsampler="")


@register_model(family="attention", multiple=1, upsampler=True, reference=REFERENCE,
                tasks=("deblur", "denoise", "sr"), scales=(2, 3, 4, 8),
                notes="official classical-SR (DF2K s64w8) and color-denoising (s128w8) networks; "
                      "deblur uses the denoising network; pads to the window size itself")
def swinir(*, task: str, scale: int, attn_impl: str = "sdpa", **overrides) -> SwinIR:
    """Official SwinIR-M for `task`: classical SR xscale, or color denoising (x1 tasks)."""
    config = {**CLASSICAL_SR, "upscale": scale} if task == "sr" else COLOR_DN
    return SwinIR(**{**OFFICIAL, **config, "attn_impl": attn_impl, **overrides})

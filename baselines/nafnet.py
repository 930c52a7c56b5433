"""NAFNet (Chen et al., "Simple Baselines for Image Restoration", ECCV 2022).

Faithful to megvii-research/NAFNet `basicsr/models/archs/NAFNet_arch.py`: same module tree and
parameter names, so the official checkpoints (`NAFNet-GoPro-width64.pth`, `NAFNet-SIDD-width32.pth`,
...) load with `strict=True` and give the same outputs. Two deliberate differences, same function:

- LayerNorm2d: the official one is a custom autograd.Function (hand-written backward) that FLOP
  counters cannot see. Here it is `F.layer_norm` over a channels-last view: one op the counters
  know, gradient by autograd, zero-copy when the model runs in channels_last.
- TLC (`tlc=True`, the official `NAFNetLocal` used by the GoPro test configs): the local average
  pool is the official integral-image computation, with the cumulative sums kept in at least
  float32 so half-precision runs do not overflow.

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

from serpent.registry import register_model

# --------------------------------------------------------------------------- helpers


class LayerNorm2d(nn.Module):
    """Layer norm over the channels of an NCHW map (official LayerNorm2d, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        y = y.permute(0, 3, 1, 2)
        # keep the caller's memory format (the permuted result is channels_last-strided)
        if x.is_contiguous(memory_format=torch.channels_last):
            return y
        return y.contiguous()


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

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.sg(self.conv2(self.conv1(self.norm1(inp))))
        x = self.conv3(x * self.sca(x))
        y = inp + self.dropout1(x) * self.beta
        x = self.conv5(self.sg(self.conv4(self.norm2(y))))
        return y + self.dropout2(x) * self.gamma


# --------------------------------------------------------------------------- model


class NAFNet(nn.Module):
    """U-Net of NAFBlocks with a global residual; pads to 2**len(enc) itself and crops back."""

    def __init__(self, *, img_channel: int = 3, width: int = 16, middle_blk_num: int = 1,
                 enc_blk_nums: tuple[int, ...] = (), dec_blk_nums: tuple[int, ...] = (),
                 tlc: bool = False):
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

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        h, w = inp.shape[-2:]
        m = self.padder_size
        inp = F.pad(inp, (0, (m - w % m) % m, 0, (m - h % m) % m))

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
        return x[..., :h, :w]


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

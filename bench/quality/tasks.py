"""Degradation operators: Gaussian deblurring, bicubic super-resolution, Gaussian denoising.

Conventions (they decide what a PSNR means, so they are fixed and written down here):

- Images are float tensors (B, C, H, W) in [0, 1]. Degraded images are *not* clipped or
  quantized: the model sees the float result (SwinIR/Restormer test scripts add Gaussian noise
  the same way). Evaluation inputs are computed in float64 on the CPU and cast to float32 once,
  so every model gets byte-identical inputs (rows carry `input_sha256` to prove it).
- Blur: a normalized isotropic Gaussian, ``k = g g^T`` with ``g[i] ~ exp(-(i-c)^2 / 2 sigma^2)``
  over ``kernel_size`` taps (MATLAB ``fspecial('gaussian', 61, 3)`` gives the same kernel),
  applied separably. Boundary: reflect padding by ``kernel_size // 2`` (mirror without repeating
  the edge pixel, numpy/torch "reflect"), output the size of the input. Training crops are cut
  with that much real context around them, so a crop is blurred exactly as it would be inside
  the whole (reflect-padded) image.
- Bicubic: MATLAB ``imresize(x, 1/s, 'bicubic')`` semantics (Keys cubic a=-0.5, kernel widened
  by s with antialiasing when downscaling, symmetric boundary), because the SR literature
  (SwinIR, MambaIR, EDSR, BasicSR test sets) builds its low-resolution images with MATLAB: our
  bicubic baseline on Set5 gives Y-PSNR 33.69 / 30.41 / 28.43 / 24.40 dB at x2/x3/x4/x8, the
  published 33.66 / 30.39 / 28.42 / 24.40 (the last 0.01-0.03 dB: MATLAB rounds Y to 8 bits).
  torch's ``F.interpolate(mode='bicubic', antialias=True)`` down + bicubic up gives 28.63 / 24.53
  at x4 / x8: not comparable with published numbers. The implementation is a dense separable
  weight matrix (exact, GPU friendly); the tests check it against pyiqa's independent port of
  MATLAB imresize. SR ground truth is cropped to a multiple of the scale ("mod-crop").
- Noise: additive white Gaussian, sigma in [0, 1] units (25/255 for denoising, 0.01 after the
  blur for deblurring, none for SR unless asked).
- Evaluation is deterministic: the noise of an image comes from a CPU ``torch.Generator`` seeded
  with sha256("<dataset>/<image>|<task key>"), so it is the same for every model, run and machine.
  Training draws degradation parameters per crop (uniform in the configured ranges) from the
  crop's own generator (see bench.quality.data.TrainCrops).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field, replace

import torch

from bench.errors import UsageError
from bench.options import DEFAULT_SR_SCALE, TASKS



# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TaskConfig:
    """One degradation. Eval uses the fixed values; training draws from the ranges.

    A range of None means "the fixed value" (no randomness besides the noise itself).
    """

    task: str
    scale: int = 1
    blur_sigma: float = 3.0
    kernel_size: int = 61
    noise_sigma: float = 0.0
    blur_sigma_range: tuple[float, float] | None = None
    noise_sigma_range: tuple[float, float] | None = None
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def key(self) -> str:
        """Stable text naming the eval degradation; part of the eval noise seed and of rows."""
        if self.task == "deblur":
            s = f"deblur:sigma={self.blur_sigma:.6g},ksize={self.kernel_size}"
        elif self.task == "sr":
            s = f"sr:x{self.scale},bicubic=matlab"
        else:
            s = "denoise"
        return s + f",noise={self.noise_sigma:.6g}"

    def train_ranges(self) -> tuple[tuple[float, float], tuple[float, float]]:
        blur = self.blur_sigma_range or (self.blur_sigma, self.blur_sigma)
        noise = self.noise_sigma_range or (self.noise_sigma, self.noise_sigma)
        return blur, noise

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d["key"] = self.key
        return d

    @property
    def context(self) -> int:
        """Pixels of real image needed around a training crop to degrade it like the whole image."""
        if self.task == "deblur":
            return self.kernel_size // 2
        if self.task == "sr":
            return 4 * self.scale  # bicubic support at 1/s is 4s wide, 2s each side; margin 2x
        return 0


def make_task(task: str, *, scale: int | None = None, blur_sigma=None, kernel_size: int = 61,
              noise_sigma=None) -> TaskConfig:
    """Task config with the defaults of docs/design.md; `blur_sigma`/`noise_sigma` may be a number
    (used for training and eval) or a (lo, hi) pair (training range; eval keeps the default)."""
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "sr":
        scale = DEFAULT_SR_SCALE if scale is None else int(scale)
        if scale not in (2, 3, 4, 8):
            raise UsageError(f"SR scale must be 2, 3, 4 or 8, got {scale}")
    elif scale not in (None, 1):
        raise UsageError(f"--scale applies to task 'sr' only; task {task!r} is x1")
    defaults = {"deblur": 0.01, "denoise": 25 / 255, "sr": 0.0}
    cfg = TaskConfig(task=task, scale=scale or 1, noise_sigma=defaults[task])
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise UsageError(f"blur kernel size must be odd and positive, got {kernel_size}")
    cfg = replace(cfg, kernel_size=int(kernel_size))
    for name, value in (("blur_sigma", blur_sigma), ("noise_sigma", noise_sigma)):
        if value is None:
            continue
        if isinstance(value, (tuple, list)):
            lo, hi = map(float, value)
            if not 0 <= lo <= hi:
                raise UsageError(f"{name} range must satisfy 0 <= lo <= hi, got {lo}:{hi}")
            if lo == hi:
                cfg = replace(cfg, **{name: lo})
            else:
                cfg = replace(cfg, **{name + "_range": (lo, hi)})
        else:
            if float(value) < 0:
                raise UsageError(f"{name} must be >= 0, got {value}")
            cfg = replace(cfg, **{name: float(value)})
    if task == "deblur" and cfg.blur_sigma <= 0:
        raise UsageError("blur sigma must be > 0")
    return cfg


def parse_level(text: str) -> float | tuple[float, float]:
    """'0.01', '25/255' or a training range 'lo:hi' (each end may be a fraction)."""
    def one(s: str) -> float:
        try:
            if "/" in s:
                a, b = s.split("/")
                return float(a) / float(b)
            return float(s)
        except (ValueError, ZeroDivisionError):
            raise UsageError(f"cannot read {text!r} as a number, a fraction like 25/255, "
                             "or a range lo:hi") from None
    if ":" in text:
        lo, hi = text.split(":", 1)
        return (one(lo), one(hi))
    return one(text)


# ----------------------------------------------------------------------------- operators


def gaussian_kernel1d(sigma: torch.Tensor | float, size: int,
                      dtype=torch.float64) -> torch.Tensor:
    """Normalized 1D Gaussian taps, shape (..., size) for a sigma of shape (...)."""
    sigma = torch.as_tensor(sigma, dtype=dtype)
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma[..., None] ** 2))
    return g / g.sum(-1, keepdim=True)


def gaussian_kernel2d(sigma: float, size: int, dtype=torch.float64) -> torch.Tensor:
    """The 2D kernel the blur applies (outer product of the 1D taps); sums to 1."""
    g = gaussian_kernel1d(sigma, size, dtype)
    return g[:, None] * g[None, :]


def blur_matrix(n: int, sigma: float, kernel_size: int, padding: str = "reflect"
                ) -> torch.Tensor:
    """Matrix applying the 1D Gaussian along an axis of length n: (n, n) with the reflect
    boundary folded in, or (n - kernel_size + 1, n) for padding="valid". float64."""
    r = kernel_size // 2
    g = gaussian_kernel1d(sigma, kernel_size)
    if padding == "reflect":
        if n <= r:
            raise UsageError(f"image side {n} is too small for a {kernel_size}x{kernel_size} "
                             f"blur with reflect padding (needs sides > {r})")
        src = (torch.arange(n)[:, None] + torch.arange(-r, r + 1)[None]).abs()
        src = torch.where(src >= n, 2 * (n - 1) - src, src)
    elif padding == "valid":
        if n < kernel_size:
            raise ValueError(f"side {n} is smaller than the kernel ({kernel_size})")
        src = torch.arange(n - 2 * r)[:, None] + torch.arange(kernel_size)[None]
    else:
        raise ValueError(padding)
    m = torch.zeros(src.shape[0], n, dtype=torch.float64)
    return m.scatter_add_(1, src, g.expand_as(src).contiguous())


def blur(x: torch.Tensor, sigma: torch.Tensor | float, kernel_size: int,
         padding: str = "reflect") -> torch.Tensor:
    """Gaussian blur of (B, C, H, W) with one sigma per batch item (or one for all).

    Computed as separable dense matrix products (exact; on CPUs much faster than a 61-tap
    convolution, in float64 too). padding="reflect": same-size output (evaluation);
    padding="valid": no padding, output smaller by kernel_size - 1 (training crops cut with
    context).
    """
    sig = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
    h, w = x.shape[-2:]
    return torch.stack([blur_matrix(h, float(s), kernel_size, padding).to(x) @ x[i]
                        @ blur_matrix(w, float(s), kernel_size, padding).to(x).T
                        for i, s in enumerate(sig)])


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB imresize 'bicubic')."""
    ax = x.abs()
    ax2, ax3 = ax ** 2, ax ** 3
    return ((1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def resize_matrix(n_in: int, n_out: int, scale: float, antialias: bool = True) -> torch.Tensor:
    """(n_out, n_in) float64 matrix of MATLAB imresize's bicubic weights along one axis,
    boundary ('symmetric' mirroring) folded in."""
    width = 4.0
    kernel = _cubic
    if scale < 1 and antialias:
        width /= scale
        kernel = lambda t: scale * _cubic(scale * t)  # noqa: E731
    x = torch.arange(1, n_out + 1, dtype=torch.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(u - width / 2)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + torch.arange(taps, dtype=torch.float64)[None]  # 1-based
    wts = kernel(u[:, None] - idx)
    wts = wts / wts.sum(1, keepdim=True)
    mirror = torch.cat([torch.arange(n_in), torch.arange(n_in - 1, -1, -1)])
    idx0 = mirror[(idx.long() - 1) % (2 * n_in)]
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)[:, None].expand_as(idx0)
    m.index_put_((rows.reshape(-1), idx0.reshape(-1)), wts.reshape(-1), accumulate=True)
    return m


def imresize(x: torch.Tensor, factor: int, down: bool) -> torch.Tensor:
    """MATLAB-style bicubic resize of (..., H, W) by an integer factor (down: 1/factor)."""
    h, w = x.shape[-2:]
    if down:
        if h % factor or w % factor:
            raise ValueError(f"{h}x{w} is not divisible by {factor}; mod-crop first")
        oh, ow, s = h // factor, w // factor, 1 / factor
    else:
        oh, ow, s = h * factor, w * factor, float(factor)
    mh = resize_matrix(h, oh, s).to(x)
    mw = resize_matrix(w, ow, s).to(x)
    return mh @ x @ mw.T


def mod_crop(x: torch.Tensor, m: int) -> torch.Tensor:
    """Crop the bottom/right so H and W are multiples of m (SR ground-truth convention)."""
    h, w = x.shape[-2:]
    return x[..., : h - h % m, : w - w % m]


def add_noise(x: torch.Tensor, sigma: torch.Tensor | float,
              generator: torch.Generator | None) -> torch.Tensor:
    """x + sigma * N(0, 1), sigma scalar or per batch item; noise drawn on the CPU in x's dtype."""
    sig = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    if not bool((sig > 0).any()):
        return x
    n = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
    return x + sig.to(x.device) * n


def degrade(hr: torch.Tensor, cfg: TaskConfig, *, blur_sigma=None, noise_sigma=None,
            generator: torch.Generator | None = None, blur_padding: str = "reflect"
            ) -> torch.Tensor:
    """The degraded (low-quality) image for HR batch `hr`; SR returns the low-res image.

    `blur_sigma`/`noise_sigma` override cfg's fixed values (scalar or per batch item).
    """
    blur_sigma = cfg.blur_sigma if blur_sigma is None else blur_sigma
    noise_sigma = cfg.noise_sigma if noise_sigma is None else noise_sigma
    if cfg.task == "deblur":
        lq = blur(hr, blur_sigma, cfg.kernel_size, padding=blur_padding)
    elif cfg.task == "sr":
        lq = imresize(hr, cfg.scale, down=True)
    else:
        lq = hr
    return add_noise(lq, noise_sigma, generator)


def model_input(lq: torch.Tensor, cfg: TaskConfig, upsampler: bool) -> torch.Tensor:
    """What the model is fed: for SR with an x1 model, the bicubic upsample of the LR image."""
    if cfg.task == "sr" and not upsampler:
        return imresize(lq, cfg.scale, down=False)
    return lq


def eval_seed(image_id: str, cfg: TaskConfig) -> int:
    """Seed of the evaluation noise of one image: sha256 of '<image id>|<task key>'."""
    digest = hashlib.sha256(f"{image_id}|{cfg.key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def eval_pair(hr: torch.Tensor, image_id: str, cfg: TaskConfig, upsampler: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic eval degradation of one image (1, 3, H, W).

    Returns (ground truth, model input, degraded image shown as `model=input`), float32. The
    ground truth is mod-cropped for SR; the `input` image of SR is the bicubic upsample.
    """
    hr = hr.to(torch.float64)
    if cfg.task == "sr":
        hr = mod_crop(hr, cfg.scale)
    gen = torch.Generator().manual_seed(eval_seed(image_id, cfg))
    lq = degrade(hr, cfg, generator=gen)
    inp = model_input(lq, cfg, upsampler)
    shown = model_input(lq, cfg, upsampler=False)
    return hr.float(), inp.float(), shown.float()

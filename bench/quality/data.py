"""Image folders, the data root, training crops, and train/eval overlap checks.

A dataset is a folder of images (PNG/JPEG/BMP/TIFF). Named sets ("Kodak24", "Set5", ...) are
folders under the data root: ``--data-root`` or the environment variable SERPENT_BENCH_DATA.
A name that is an existing directory path is used as is.

Decoding rules: grayscale -> 3 equal channels; RGBA/LA -> alpha dropped with a warning; palette
and CMYK -> RGB; 16-bit (grayscale or color) -> scaled by 1/65535 (16-bit color needs OpenCV,
since Pillow silently truncates it to 8 bits; without OpenCV it is rejected); float TIFF
rejected. Images are kept in memory as uint8/uint16 HxWx3 arrays: training workers (forked)
share them and decode nothing per step.
"""
from __future__ import annotations

import csv
import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.errors import UsageError
from bench.options import split_names
from bench.quality.tasks import TaskConfig, add_noise, degrade, imresize, model_input

DATA_ENV = "SERPENT_BENCH_DATA"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
FINGERPRINT = 16  # side of the grayscale thumbnail used to find the same photo in two sets
NEAR_DUPLICATE = 0.02  # mean |difference| of thumbnails (in [0, 1]) below which two images match


# ----------------------------------------------------------------------------- locating sets


def data_root(explicit: str | os.PathLike | None = None) -> Path | None:
    """--data-root if given, else $SERPENT_BENCH_DATA, else None (only paths then work)."""
    value = explicit or os.environ.get(DATA_ENV)
    if not value:
        return None
    root = Path(value).expanduser()
    if not root.is_dir():
        src = "--data-root" if explicit else f"${DATA_ENV}"
        why = "" if root.exists() else ": it does not exist"
        raise UsageError(f"data root {root} ({src}) is not a directory{why}")
    return root


def available_sets(root: Path | None) -> list[str]:
    if root is None:
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def resolve_set(name: str, root: Path | None) -> Path:
    """Folder of a named set under the root, or `name` itself when it is a directory."""
    p = Path(name).expanduser()
    if p.is_dir() and (p.is_absolute() or os.sep in name or root is None
                       or not (root / name).is_dir()):
        return p
    if root is not None and (root / name).is_dir():
        return root / name
    if root is None:
        raise UsageError(f"image set {name!r} is not a directory; pass --data-root DIR or set "
                         f"{DATA_ENV} to resolve set names")
    known = ", ".join(available_sets(root)) or "none"
    raise UsageError(f"no image set {name!r} under data root {root} (available: {known})")


# ----------------------------------------------------------------------------- decoding


def _decode_16bit_color(path: Path) -> np.ndarray:
    try:
        import cv2
    except ImportError:
        raise UsageError(f"{path}: 16-bit color image; Pillow would truncate it to 8 bits and "
                         "OpenCV (pip install opencv-python-headless) is not installed to "
                         "read it; convert it to 8-bit or install OpenCV") from None
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16:
        raise UsageError(f"{path}: cannot decode 16-bit color image")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[2] == 4:
        warnings.warn(f"{path}: dropping the alpha channel", stacklevel=3)
        arr = arr[..., :3]
    return np.ascontiguousarray(arr[..., ::-1] if arr.shape[2] == 3 else arr)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """HxWx3 uint8 or uint16 array (see module doc for the conversion rules)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            tile = im.tile[0].args if im.tile else ""
            rawmode = tile[0] if isinstance(tile, tuple) else str(tile)
            if im.mode in ("RGB", "RGBA") and ";16" in rawmode:
                arr = _decode_16bit_color(path)
            else:
                im.load()
                arr = _from_pil(im, path)
    except UsageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UsageError(f"cannot read image {path}: {e}") from None
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


def _from_pil(im, path: Path) -> np.ndarray:
    mode = im.mode
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        warnings.warn(f"{path}: dropping the alpha channel", stacklevel=4)
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im)
        if mode == "I" and (arr.min() < 0 or arr.max() > 65535):
            raise UsageError(f"{path}: 32-bit integer image with values outside 16 bits")
        return arr.astype(np.uint16)
    if mode == "F":
        raise UsageError(f"{path}: floating-point images are not supported; save as 8/16-bit")
    if mode in ("L", "LA"):
        return np.asarray(im.convert("L"))
    return np.asarray(im.convert("RGB"))


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """HxWxC integer array -> (C, H, W) float32 in [0, 1]."""
    scale = 65535.0 if arr.dtype == np.uint16 else 255.0
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float() / scale


# ----------------------------------------------------------------------------- image sets


@dataclass(eq=False)
class ImageRecord:
    """One decoded image of a set, with what is needed to find it again in another set."""

    dataset: str
    name: str  # file stem
    path: Path
    array: np.ndarray  # HxWx3 uint8/uint16
    sha256: str  # of the decoded pixels (dtype, shape, bytes)
    fingerprint: np.ndarray  # FINGERPRINT^2 float32 grayscale thumbnail

    @property
    def id(self) -> str:
        return f"{self.dataset}/{self.name}"

    @property
    def hw(self) -> tuple[int, int]:
        return self.array.shape[0], self.array.shape[1]


def fingerprint(arr: np.ndarray) -> np.ndarray:
    """Area-averaged grayscale thumbnail; robust to crops of a row/column and recompression."""
    t = to_tensor(arr).mean(0, keepdim=True)[None]
    return torch.nn.functional.adaptive_avg_pool2d(t, FINGERPRINT).flatten().numpy()


def pixel_sha256(arr: np.ndarray) -> str:
    h = hashlib.sha256(f"{arr.dtype}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def load_set(name: str, root: Path | None, *, limit: int | None = None,
             only: list[str] | None = None, threads: int = 8) -> list[ImageRecord]:
    """Decode the images of a set (sorted by file name; `only`: these file stems; `limit`: the
    first N), in parallel threads."""
    folder = resolve_set(name, root)
    files = list_images(folder)
    if not files:
        raise UsageError(f"image set {name!r} ({folder}) holds no images "
                         f"({'/'.join(e[1:] for e in IMAGE_EXTS)})")
    if only:
        files = [f for f in files if f.stem in only]
        if not files:
            raise UsageError(f"image set {name!r} has none of the images {', '.join(only)}")
    if limit:
        files = files[:limit]
    label = Path(name).name if Path(name).is_dir() else name

    def one(p: Path) -> ImageRecord:
        arr = read_image(p)
        return ImageRecord(label, p.stem, p, arr, pixel_sha256(arr), fingerprint(arr))

    with ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
        return list(pool.map(one, files))


def load_sets(names, root: Path | None, **kw) -> dict[str, list[ImageRecord]]:
    out = {}
    for n in split_names(names):
        recs = load_set(n, root, **kw)
        out[recs[0].dataset] = recs
    return out


# ----------------------------------------------------------------------------- overlap


def find_overlaps(a: list, b: list, tol: float = NEAR_DUPLICATE) -> list[tuple]:
    """Pairs (a_id, b_id, how) of the same photo in both lists: identical pixels ("exact") or
    near-identical thumbnails with the same aspect ratio ("near": crops, recompression).

    Items are ImageRecords or dicts with keys id, sha256, fingerprint, hw (as stored in a training
    run's train_images.json), so eval can check against a training set it cannot read.
    """
    def fields(r):
        if isinstance(r, ImageRecord):
            return r.id, r.sha256, r.fingerprint, r.hw
        return r["id"], r["sha256"], np.asarray(r["fingerprint"], np.float32), tuple(r["hw"])

    fa, fb = [fields(r) for r in a], [fields(r) for r in b]
    if not fa or not fb:
        return []
    ta = torch.from_numpy(np.stack([f[2] for f in fa]))
    tb = torch.from_numpy(np.stack([f[2] for f in fb]))
    dist = torch.cdist(ta, tb, p=1) / ta.shape[1]
    ra = torch.tensor([np.log(f[3][1] / f[3][0]) for f in fa])
    rb = torch.tensor([np.log(f[3][1] / f[3][0]) for f in fb])
    near = (dist < tol) & ((ra[:, None] - rb[None, :]).abs() < 0.05)
    out = []
    for i, j in near.nonzero().tolist():
        how = "exact" if fa[i][1] == fb[j][1] else "near"
        out.append((fa[i][0], fb[j][0], how))
    exact_b = {f[1]: f[0] for f in fb}
    seen = {(x, y) for x, y, _ in out}
    for ida, sha, _, _ in fa:
        if sha in exact_b and (ida, exact_b[sha]) not in seen:
            out.append((ida, exact_b[sha], "exact"))
    return out


def read_id_map(root: Path | None) -> dict[str, str]:
    """BSD100 file stem -> BSDS300 id from the data root's BSD100_id_map.csv (if present)."""
    if root is None or not (root / "BSD100_id_map.csv").exists():
        return {}
    with open(root / "BSD100_id_map.csv", newline="") as f:
        return {Path(r["file"]).stem: r["bsds300_id"] for r in csv.DictReader(f)}


def record_summary(r: ImageRecord) -> dict:
    """What train_images.json keeps of a training image (enough for find_overlaps)."""
    return {"id": r.id, "sha256": r.sha256, "hw": list(r.hw),
            "fingerprint": [round(float(v), 5) for v in r.fingerprint]}


# ----------------------------------------------------------------------------- training crops


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The generator of global sample `index`: crops are a pure function of (seed, index), so
    resuming, changing the worker count or the number of ranks never changes the data stream."""
    return torch.Generator().manual_seed(_splitmix64(_splitmix64(seed) ^ index))


def _reflect(idx: np.ndarray, n: int) -> np.ndarray:
    """Indices mirrored into [0, n) like torch/numpy 'reflect' padding (edge not repeated)."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.abs(idx) % period
    return np.where(idx >= n, period - idx, idx)


def augment(t: torch.Tensor, code: int) -> torch.Tensor:
    """One of the 8 flips/rotations of the square (code 0 = identity)."""
    if code >= 4:
        t = t.flip(-1)
    return torch.rot90(t, code % 4, dims=(-2, -1))


class TrainCrops(torch.utils.data.Dataset):
    """Random (input, target) training pairs; item i is global sample number i.

    Each item draws, from its own generator: an image (uniform over images), a crop position
    (on the scale grid for SR), one of 8 flips/rotations, the degradation parameters (uniform in
    the task's ranges) and the noise. The crop is cut with `cfg.context` pixels of real image
    around it (reflect beyond the border for blur, clipped for bicubic) so it is degraded exactly
    as the whole image would be at evaluation.
    """

    def __init__(self, images: list[ImageRecord], cfg: TaskConfig, crop: int, *,
                 upsampler: bool, seed: int, augment: bool = True):
        s = cfg.scale
        if cfg.task == "sr" and crop % s:
            raise UsageError(f"--crop {crop} must be a multiple of the SR scale {s}")
        self.images = list(images)
        self.cfg, self.crop, self.upsampler = cfg, crop, upsampler
        self.seed, self.augment = seed, augment
        if not self.images:
            raise UsageError(f"no training image is at least {crop}x{crop} pixels")

    def __len__(self) -> int:
        return 2 ** 62  # indices come from the sampler (global sample numbers)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, p, s = self.cfg, self.crop, self.cfg.scale
        g = sample_generator(self.seed, int(index))

        def randint(n: int) -> int:
            return int(torch.randint(n, (), generator=g))

        def uniform(lo: float, hi: float) -> float:
            return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))

        arr = self.images[randint(len(self.images))].array
        h, w = arr.shape[0] - arr.shape[0] % s, arr.shape[1] - arr.shape[1] % s
        y, x = s * randint((h - p) // s + 1), s * randint((w - p) // s + 1)
        code = randint(8) if self.augment else 0
        (b_lo, b_hi), (n_lo, n_hi) = cfg.train_ranges()
        blur_sigma, noise_sigma = uniform(b_lo, b_hi), uniform(n_lo, n_hi)

        m = cfg.context
        if cfg.task == "sr":
            y0, x0 = max(0, y - m), max(0, x - m)
            win = to_tensor(arr[y0:min(h, y + p + m), x0:min(w, x + p + m)])[None]
            lq = add_noise(imresize(win, s, down=True), noise_sigma, g)
            inp = model_input(lq, cfg, self.upsampler)
            f = 1 if not self.upsampler else s  # input pixels per target pixel: 1 or 1/s
            iy, ix, ip = (y - y0) // f, (x - x0) // f, p // f
            inp = inp[..., iy:iy + ip, ix:ix + ip]
            target = to_tensor(arr[y:y + p, x:x + p])[None]
        else:
            rows = _reflect(np.arange(y - m, y + p + m), arr.shape[0])
            cols = _reflect(np.arange(x - m, x + p + m), arr.shape[1])
            win = to_tensor(arr[np.ix_(rows, cols)])[None]
            target = win[..., m:m + p, m:m + p]
            inp = degrade(win, cfg, blur_sigma=blur_sigma, noise_sigma=0.0, blur_padding="valid")
            inp = add_noise(inp, noise_sigma, g)
        return augment(inp[0], code).contiguous(), augment(target[0], code).contiguous()


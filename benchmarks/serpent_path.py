"""Scan-path ablation for Serpent on CPU: raster vs serpentine, same seeds, same data.

    python -m benchmarks.serpent_path --out results/serpent_path.jsonl [--data-root DIR]

A small Serpent is trained from the same initialisation (per seed) on the same crops of BSD100
for Gaussian deblurring (sigma 2 px, noise 0.01), once per scan path, and scored (PSNR) on fixed
degraded 128x128 centre crops of Kodak24. It is small and short on purpose (a CPU check, not a
result of the paper's scale): it tells whether one path is clearly worse at equal cost.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import center_crop, gaussian_blur

from bench.quality.data import data_root, list_images, read_image, resolve_set, to_tensor
from bench.environment import environment
from bench.results import append_rows
from serpent.model import PATHS, Serpent

BLUR_SIGMA, KSIZE, NOISE = 2.0, 13, 0.01


def degrade(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    y = gaussian_blur(x, [KSIZE, KSIZE], [BLUR_SIGMA, BLUR_SIGMA])
    return y + NOISE * torch.randn(y.shape, generator=gen)


def load(name: str, root) -> list[torch.Tensor]:
    return [to_tensor(read_image(p)) for p in list_images(resolve_set(name, root))]


def crops(images, n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    out = []
    for _ in range(n):
        img = images[int(torch.randint(len(images), (1,), generator=gen))]
        i = int(torch.randint(img.shape[1] - size + 1, (1,), generator=gen))
        j = int(torch.randint(img.shape[2] - size + 1, (1,), generator=gen))
        out.append(img[:, i:i + size, j:j + size])
    return torch.stack(out)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss(a.clamp(0, 1), b, reduction="none").mean(dim=(1, 2, 3))
    return (10 * torch.log10(1 / mse)).mean().item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--embed-dim", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = data_root(args.data_root)
    train_imgs, eval_imgs = load("BSD100", root), load("Kodak24", root)
    clean = torch.stack([center_crop(x, [128, 128]) for x in eval_imgs[:12]])
    degraded = degrade(clean, torch.Generator().manual_seed(1234))
    cfg = dict(embed_dim=args.embed_dim, depths=(1, 1, 2), dec_depths=(1, 1), d_state=8)
    env = environment("cpu")
    rows = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        init = Serpent(**cfg).state_dict()  # paths share every parameter: same start for both
        for path in PATHS:
            model = Serpent(**cfg, scan_path=path)
            model.load_state_dict(init)
            opt = torch.optim.Adam(model.parameters(), lr=2e-3)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
            gen = torch.Generator().manual_seed(10_000 + seed)  # same crops and noise per path
            t0 = time.perf_counter()
            for _ in range(args.steps):
                x = crops(train_imgs, args.batch, args.crop, gen)
                loss = F.l1_loss(model(degrade(x, gen)), x)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            with torch.no_grad():
                score = psnr(model.eval()(degraded), clean)
            row = {"kind": "serpent_path", "path": path, "seed": seed, "steps": args.steps,
                   "batch": args.batch, "crop": args.crop, "config": cfg, "psnr_db": score,
                   "input_psnr_db": psnr(degraded, clean), "train_s": time.perf_counter() - t0,
                   "task": f"deblur sigma={BLUR_SIGMA} ksize={KSIZE} noise={NOISE}",
                   "train_set": "BSD100", "eval_set": "Kodak24 (12 centre crops 128px)", **env}
            rows.append(row)
            print(f"seed {seed} {path:10s} PSNR {score:.3f} dB (input {row['input_psnr_db']:.2f}) "
                  f"{row['train_s']:.0f} s")
    append_rows(args.out, rows)
    for path in PATHS:
        scores = [r["psnr_db"] for r in rows if r["path"] == path]
        print(f"{path:10s} mean PSNR {statistics.mean(scores):.3f} dB over {len(scores)} seeds")
    diffs = [b["psnr_db"] - a["psnr_db"] for a, b in zip(rows[::2], rows[1::2])]
    print("serpentine - raster per seed: " + ", ".join(f"{d:+.3f}" for d in diffs) + " dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

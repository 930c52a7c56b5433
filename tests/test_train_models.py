"""Every registered model through a tiny train + validation + resume cycle on the CPU (issue 15:
the validation test used a stand-in model, and every Serpent variant crashed after its first
validation). The reference is the same training without the interruption: resuming must end on
the same weights.

One case per model constructor: entries that share one (aliases such as `serpent` and
`nafnet`, or `nafnet_w64` next to `nafnet_w32`) differ only in constructor defaults, so the
smallest entry runs the code path of all (nafnet_w64 alone would take a minute: 116 M
parameters through AdamW and five checkpoints).
"""
import numpy as np
import pytest
import torch
from PIL import Image

from bench.quality.tasks import make_task
from bench.registry import count_params, create_meta_model, list_models, model_info
from bench.train.loop import TrainConfig, train

def _one_per_constructor() -> list[str]:
    smallest: dict = {}
    for name in list_models():
        fn = model_info(name).fn
        rank = (count_params(create_meta_model(name, task="denoise")),
                bool(model_info(name).alias_of))  # the smallest; of equals, not the alias
        if fn not in smallest or rank < smallest[fn][1]:
            smallest[fn] = (name, rank)
    return sorted(name for name, _ in smallest.values())


def _images(folder, n, size, seed):
    folder.mkdir(parents=True)
    for i in range(n):
        arr = np.random.default_rng(seed + i).integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(arr).resize((size, size), Image.BICUBIC).save(folder / f"im{i}.png")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    _images(root / "T", 2, 20, seed=0)
    _images(root / "V", 1, 12, seed=10)  # validation: a whole image, not a multiple of 8
    return root


def _cfg(root, out, **kw):
    return TrainConfig(**{**dict(task="denoise", train_sets=["T"], val_sets=["V"], iters=2,
                                 crop=8, batch=1, out_dir=str(out), workers=0, seed=3,
                                 data_root=str(root), val_every=1, ckpt_every=1, log_every=1,
                                 warmup=1, device="cpu", progress=False), **kw})


@pytest.mark.parametrize("name", _one_per_constructor())
def test_train_validate_resume(name, data_root, tmp_path):
    task = make_task("denoise")
    full = train(_cfg(data_root, tmp_path / "full", model=name), task)
    part = train(_cfg(data_root, tmp_path / "part", model=name, stop_at=1), task)
    resumed = train(_cfg(data_root, tmp_path / "part", model=name, resume="auto"), task)
    assert full["iteration"] == resumed["iteration"] == 2 and part["iteration"] == 1
    assert np.isfinite(full["best_val_psnr"]) and np.isfinite(resumed["best_val_psnr"])
    a = torch.load(tmp_path / "full" / "last.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "last.pt", map_location="cpu", weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k

"""Image decoding rules, set resolution, overlap detection and training crops."""
import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.quality.data import (DATA_ENV, TrainCrops, data_root, find_overlaps, load_set, read_image,
                        resolve_set, sample_generator)
from bench.errors import UsageError
from bench.quality.tasks import eval_pair, make_task

REPO = Path(__file__).resolve().parent.parent


def shared_data() -> Path | None:
    p = Path(os.environ.get(DATA_ENV) or REPO.parent / "shared" / "data")
    return p if (p / "Set5").is_dir() else None


needs_data = pytest.mark.skipif(shared_data() is None, reason="shared image data not found")


def _rgb(h=40, w=50, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_decoding_rules(tmp_path):
    rgb = _rgb()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "b.bmp")
    Image.fromarray(rgb).save(tmp_path / "c.tif")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    rgba = np.concatenate([rgb, np.full((40, 50, 1), 7, np.uint8)], 2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    g16 = np.random.default_rng(1).integers(0, 65536, (40, 50), dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    Image.fromarray(rgb).save(tmp_path / "d.jpg", quality=95)

    for name in ("a.png", "b.bmp", "c.tif"):
        assert np.array_equal(read_image(tmp_path / name), rgb)
    gray = read_image(tmp_path / "gray.png")
    assert gray.shape == (40, 50, 3) and np.array_equal(gray[..., 2], rgb[..., 0])
    with pytest.warns(UserWarning, match="alpha"):
        assert np.array_equal(read_image(tmp_path / "alpha.png"), rgb)
    a16 = read_image(tmp_path / "g16.png")
    assert a16.dtype == np.uint16 and np.array_equal(a16[..., 1], g16)
    from bench.quality.data import to_tensor
    assert torch.allclose(to_tensor(a16)[0], torch.from_numpy(g16.astype(np.float32)) / 65535)
    assert read_image(tmp_path / "d.jpg").shape == (40, 50, 3)


def test_16bit_color_is_not_truncated(tmp_path):
    cv2 = pytest.importorskip("cv2")
    a = np.random.default_rng(2).integers(0, 65536, (12, 10, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "c16.png"), a[..., ::-1])  # cv2 writes BGR
    got = read_image(tmp_path / "c16.png")
    assert got.dtype == np.uint16 and np.array_equal(got, a)


def test_bad_inputs_give_clear_errors(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no images"):
        load_set("empty", tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(UsageError, match=r"cannot read image .*x\.png"):
        load_set("bad", tmp_path)
    with pytest.raises(UsageError, match=r"no image set 'Nope' .*available: bad, empty"):
        resolve_set("Nope", tmp_path)
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(UsageError, match="--data-root"):
        resolve_set("Nope", data_root(None))
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert data_root(None) == tmp_path
    assert resolve_set("bad", data_root(None)) == tmp_path / "bad"
    with pytest.raises(UsageError, match="not a directory"):
        data_root(str(tmp_path / "missing"))


def test_overlap_finds_crops_and_copies_not_strangers(tmp_path):
    imgs = [np.asarray(Image.fromarray(_rgb(64, 96, s)).resize((96, 64), Image.BILINEAR))
            for s in range(3)]
    for d in ("train", "val"):
        (tmp_path / d).mkdir()
    Image.fromarray(imgs[0]).save(tmp_path / "train" / "a.png")
    Image.fromarray(imgs[1]).save(tmp_path / "train" / "b.png")
    Image.fromarray(imgs[0][:-1, :-1]).save(tmp_path / "val" / "a_crop.png")  # cropped copy
    Image.fromarray(imgs[1]).save(tmp_path / "val" / "b_copy.png")
    Image.fromarray(imgs[2]).save(tmp_path / "val" / "c.png")
    pairs = find_overlaps(load_set("train", tmp_path), load_set("val", tmp_path))
    assert sorted(pairs) == [("train/a", "val/a_crop", "near"), ("train/b", "val/b_copy", "exact")]


@needs_data
def test_cbsd68_bsd100_overlap_matches_the_id_map():
    root = shared_data()
    with open(root / "BSD100_id_map.csv", newline="") as f:
        verified = {(f"BSD100/{Path(r['file']).stem}", f"CBSD68/{r['bsds300_id']}")
                    for r in csv.DictReader(f) if r["mapping"].startswith("verified")}
    pairs = find_overlaps(load_set("BSD100", root), load_set("CBSD68", root))
    assert len(verified) == 68
    assert {(a, b) for a, b, _ in pairs} == verified


def _image_folder(tmp_path, h=90, w=100):
    (tmp_path / "imgs").mkdir()
    Image.fromarray(_rgb(h, w, 5)).save(tmp_path / "imgs" / "x.png")
    return load_set("imgs", tmp_path)


def test_training_crops_are_a_pure_function_of_seed_and_index(tmp_path):
    recs = _image_folder(tmp_path)
    ds = TrainCrops(recs, make_task("deblur"), 32, upsampler=False, seed=3)
    a, b = ds[17], ds[17]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(ds[18][1], a[1])
    assert not torch.equal(TrainCrops(recs, make_task("deblur"), 32, upsampler=False,
                                      seed=4)[17][1], a[1])
    g1, g2 = sample_generator(0, 5), sample_generator(0, 5)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


@pytest.mark.parametrize("task,upsampler", [("deblur", False), ("sr", False), ("sr", True)])
def test_training_crop_is_degraded_like_the_whole_image(tmp_path, task, upsampler):
    """Without noise and augmentation, a training pair equals the eval degradation of the
    whole image, cropped: crops are cut with enough context (reflect/clipped at borders)."""
    recs = _image_folder(tmp_path, 96, 112)
    cfg = make_task(task, scale=4 if task == "sr" else None, noise_sigma=0.0)
    ds = TrainCrops(recs, cfg, 32, upsampler=upsampler, seed=0, augment=False)
    from bench.quality.data import to_tensor
    gt, inp, _ = eval_pair(to_tensor(recs[0].array)[None], "x", cfg, upsampler)
    f = 4 if upsampler else 1
    checked = set()
    for i in range(40):
        x, y = ds[i]
        # locate the target crop in the ground truth to know where the crop was cut
        g = sample_generator(0, i)
        torch.randint(1, (), generator=g)
        s = cfg.scale
        h, w = gt.shape[-2:]
        y0 = s * int(torch.randint((h - 32) // s + 1, (), generator=g))
        x0 = s * int(torch.randint((w - 32) // s + 1, (), generator=g))
        assert torch.equal(y, gt[0, :, y0:y0 + 32, x0:x0 + 32])
        ref = inp[0, :, y0 // f:(y0 + 32) // f, x0 // f:(x0 + 32) // f]
        assert torch.allclose(x, ref, atol=2e-6), (i, (x - ref).abs().max())
        checked.add((y0 == 0 or y0 == h - 32, x0 == 0 or x0 == w - 32))
    assert (True, True) in checked or (True, False) in checked or (False, True) in checked


def test_sr_crops_must_be_multiples_of_the_scale(tmp_path):
    recs = _image_folder(tmp_path)
    with pytest.raises(UsageError, match="multiple of the SR scale"):
        TrainCrops(recs, make_task("sr", scale=8), 60, upsampler=True, seed=0)
    x, y = TrainCrops(recs, make_task("sr", scale=8), 64, upsampler=True, seed=0)[0]
    assert x.shape == (3, 8, 8) and y.shape == (3, 64, 64)

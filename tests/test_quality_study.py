"""The quality study script end to end on CPU, tiny: staging keeps training images that are also
evaluation images behind (by content), a run trains by time, validates at 10 points, scores the
last checkpoint on every evaluation set, and the study's state (what is done) is its results folder."""
import json

import numpy as np
from PIL import Image

from bench.results import read_rows
from benchmarks import quality_study as qs


def _set(root, name, n, seed, size=(40, 48)):
    d = root / name
    d.mkdir(parents=True)
    for i in range(n):
        a = np.random.default_rng(seed + i).integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(a).resize(size[::-1], Image.BICUBIC).save(d / f"im{seed + i}.png")
    return d


def test_study_stages_trains_scores_and_resumes(tmp_path):
    src = tmp_path / "data"
    for k, s in enumerate(qs.EVAL_SETS):
        _set(src, s, 2, 100 * k)
    train = _set(src, "BSD100", 3, 1000)
    # a BSD100 image that is also a CBSD68 image (different file name, same pixels)
    (train / "dup.png").write_bytes((src / "CBSD68" / "im100.png").read_bytes())
    staged = tmp_path / "staged"
    assert qs.main(["stage", "--data-root", str(src), "--dest", str(staged)]) == 0
    kept = sorted(p.name for p in (staged / qs.STAGED_TRAIN).iterdir())
    assert kept == ["im1000.png", "im1001.png", "im1002.png"]
    manifest = [json.loads(x) for x in (staged / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 2 * len(qs.EVAL_SETS) + 3 and all(len(m["sha256"]) == 64
                                                              for m in manifest)

    out = tmp_path / "study"
    args = ["run", "--data-root", str(staged), "--out", str(out), "--budget-min", "0.01",
            "--runs-dir", str(tmp_path / "runs"), "--workers", "0", "--crop", "32",
            "--batch", "2"]
    first = "nafnet_w32"
    assert qs.main([*args, "--model", first]) == 0
    runs = read_rows(out / "deblur_runs.jsonl")
    assert [r["model"] for r in runs] == [first]
    assert runs[0]["train_s"] >= 0.6 and runs[0]["optimizer"]["recipe"] == "paper"
    assert sorted(runs[0]["train_images"]) == [f"{qs.STAGED_TRAIN}/im100{i}" for i in range(3)]
    val = read_rows(out / "deblur_validation.jsonl")
    points = [r["point"] for r in val]  # a step longer than 10% of the budget skips points
    assert points == sorted(set(points)) and points[-1] == 10
    means = [r for r in read_rows(out / "deblur.jsonl") if r["image"] is None]
    assert {(r["model"], r["dataset"]) for r in means} == {
        (m, s) for m in ("input", first) for s in qs.EVAL_SETS}
    assert json.loads((out / "manifest.jsonl").read_text().splitlines()[0])["kind"] == "manifest"
    assert qs._done(out, "deblur", 0.6) == {first}
    # the next call picks the first model of the study's order that has no run yet
    todo = [m for m in qs.STUDY["deblur"] if m not in qs._done(out, "deblur", 0.6)]
    assert first not in todo and todo[0] == qs.STUDY["deblur"][0]

import pytest
import torch

from bench.errors import UsageError
from bench.registry import create_model, list_models, resolve_models
from bench.results import append_rows, read_rows


def test_unknown_model_lists_known():
    with pytest.raises(UsageError, match="known models"):
        resolve_models("no_such_model")


def test_truncated_results_file_still_loads(tmp_path):
    p = tmp_path / "r.jsonl"
    append_rows(p, [{"model": "a", "res": 64}, {"model": "b", "res": 128}])
    with open(p, "a") as f:
        f.write('{"model": "c", "re')  # killed mid-write
    with pytest.warns(UserWarning, match="unreadable"):
        rows = read_rows(p)
    assert [r["model"] for r in rows] == ["a", "b"]
    append_rows(p, [{"model": "d"}])  # next writer starts on a fresh line
    with pytest.warns(UserWarning):
        assert [r["model"] for r in read_rows(p)] == ["a", "b", "d"]


@pytest.mark.parametrize("task", ["deblur", "sr"])
@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_on_the_meta_device(name, task):
    """What `bench models` and the params/FLOPs sweep build (create_meta_model); the fallback,
    a CPU build moved to meta, takes seconds."""
    with torch.device("meta"):
        model = create_model(name, task=task)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])

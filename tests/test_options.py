"""The command-line vocabulary (bench.options): one spelling and one check per word."""
import pytest

from bench import options
from bench.errors import UsageError
from bench.train.loop import LOSSES
from serpent.registry import TASKS as MODEL_TASKS


def test_vocabulary_agrees_with_the_models_and_the_loop():
    assert set(options.TASKS) == set(MODEL_TASKS)  # models declare tasks without importing bench
    assert tuple(LOSSES) == options.LOSSES


@pytest.mark.parametrize("task, given, want", [("sr", None, 8), ("sr", 4, 4), ("deblur", None, 1),
                                               ("denoise", 1, 1)])
def test_resolve_scale(task, given, want):
    assert options.resolve_scale(task, given) == want


def test_scale_on_an_x1_task_is_a_usage_error():
    with pytest.raises(UsageError, match="--scale applies to --task sr only"):
        options.resolve_scale("deblur", 4)


def test_parse_overrides_reads_json_literals_and_checks_keys():
    assert options.parse_overrides(["width=32", "attn_impl=math", "flag=true", "xs=[1, 2]"]) == {
        "width": 32, "attn_impl": "math", "flag": True, "xs": [1, 2]}
    for bad in ("nonsense", "2x=3", "a-b=1", "=3"):
        with pytest.raises(UsageError, match="--set expects key=value"):
            options.parse_overrides([bad])


def test_lists_are_checked():
    assert options.int_list("256, 512", "--res") == [256, 512]
    assert options.choice_list("bf16,fp32", options.PRECISIONS, "dtype") == ["bf16", "fp32"]
    assert options.split_names(" Kodak24, ,Set5 ") == ["Kodak24", "Set5"]
    with pytest.raises(UsageError):
        options.int_list("256,-1", "--res")
    with pytest.raises(UsageError, match="unknown dtype fp8"):
        options.choice_list("fp8", options.PRECISIONS, "dtype")


def test_resolve_device_on_a_cpu_machine(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert options.resolve_device("auto") == "cpu"
    assert options.resolve_device(None) == "cpu"
    assert options.resolve_device("cpu") == "cpu"
    with pytest.raises(UsageError, match="CUDA is not available"):
        options.resolve_device("cuda")
    with pytest.raises(UsageError, match="bad device 'tpu'"):
        options.resolve_device("tpu")


def test_torchrun_ranks_never_fall_back_silently():
    assert options.torchrun_ranks({}) == (0, 1, 0)
    assert options.torchrun_ranks({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    with pytest.raises(UsageError, match="must be integers"):
        options.torchrun_ranks({"RANK": "x"})
    with pytest.raises(UsageError, match="inconsistent"):
        options.torchrun_ranks({"RANK": "4", "WORLD_SIZE": "4"})

"""The JSONL results store: what is written is what is read, torn lines are skipped with a
warning naming them, and the config identity that --resume and compare share."""
import math
import os
import warnings

import pytest

from bench.results import (append_rows, config_dict, config_key, json_safe, load_results,
                           read_rows)


def test_json_safe_turns_non_finite_numbers_into_null_at_any_depth():
    value = {"a": math.nan, "b": [1.0, math.inf, (-math.inf, 2)], "c": {"d": math.nan, "e": 3},
             "f": "nan", "g": 0.5}
    assert json_safe(value) == {"a": None, "b": [1.0, None, [None, 2]], "c": {"d": None, "e": 3},
                                "f": "nan", "g": 0.5}


def test_append_then_read_round_trip_one_line_per_row(tmp_path):
    path = tmp_path / "sub" / "dir" / "r.jsonl"  # the folders are created
    rows = [{"model": "a", "x": 1.5, "bad": math.nan}, {"model": "b", "nested": {"y": [1, 2]}}]
    old = os.umask(0o022)
    try:
        append_rows(path, rows[:1])
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # readable by all, like any results file
    append_rows(path, rows[1:])
    append_rows(path, [])  # nothing to write: nothing written
    text = path.read_text()
    assert text == ('{"model": "a", "x": 1.5, "bad": null}\n'  # key order kept, one line each
                    '{"model": "b", "nested": {"y": [1, 2]}}\n')
    assert read_rows(path) == [{"model": "a", "x": 1.5, "bad": None},
                               {"model": "b", "nested": {"y": [1, 2]}}]


def test_append_after_a_torn_line_starts_a_fresh_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"model": "a"}\n{"model": "b", "x"')  # killed mid-write
    append_rows(path, [{"model": "c"}])
    assert path.read_text() == '{"model": "a"}\n{"model": "b", "x"\n{"model": "c"}\n'
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable line\(s\) \[2\]"):
        assert [r["model"] for r in read_rows(path)] == ["a", "c"]
    one_byte = tmp_path / "one.jsonl"
    one_byte.write_text("{")  # killed after the first byte
    append_rows(one_byte, [{"model": "d"}])
    assert one_byte.read_text() == '{\n{"model": "d"}\n'


def test_warning_names_the_first_five_lines_and_survives_invalid_utf8(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"model": "a"}\n' + b"x\n" * 6 + b'\xff\xfe{"model"\n')  # not UTF-8
    with pytest.warns(UserWarning) as caught:
        assert read_rows(path) == [{"model": "a"}]
    (w,) = caught
    assert "skipped 7 unreadable line(s) [2, 3, 4, 5, 6] (torn write?)" in str(w.message)


def test_read_rows_skips_blank_garbage_and_non_objects_naming_the_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"model": "a"}\n\n[1, 2]\nnot json\n{"model": "b"}\n"text"\n')
    with pytest.warns(UserWarning, match=r"skipped 3 unreadable line\(s\) \[3, 4, 6\]"):
        assert read_rows(path) == [{"model": "a"}, {"model": "b"}]


def test_read_rows_of_a_clean_or_missing_file_warns_nothing(tmp_path):
    path = tmp_path / "r.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_rows(path) == []
        path.write_text('{"model": "a"}\n')
        assert read_rows(path) == [{"model": "a"}]


def test_load_results_frames_sources_and_kinds(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    append_rows(a, [{"model": "m", "res": 32}, {"kind": "quality", "model": "m", "psnr": 30.0}])
    append_rows(b, [{"kind": "efficiency", "model": "n", "res": 64}])
    df = load_results([a, b])
    assert list(df["model"]) == ["m", "m", "n"]
    assert list(df["kind"]) == ["efficiency", "quality", "efficiency"]  # no kind = efficiency
    assert list(df["source"]) == [str(a), str(a), str(b)]
    assert list(df.index) == [0, 1, 2]
    eff = load_results([a, b], kind="efficiency")
    assert list(eff["res"]) == [32, 64] and list(eff.index) == [0, 1]
    assert list(load_results(str(a), kind="quality")["psnr"]) == [30.0]  # one path as a str
    both = load_results([a, b], kind="efficiency")
    assert "index" not in both.columns
    with pytest.raises(FileNotFoundError, match="results file not found"):
        load_results([tmp_path / "missing.jsonl"])
    assert load_results([]).empty


def test_config_key_identity_and_round_trip():
    row = {"model": "m", "task": "sr", "scale": 4, "res": 256, "batch": 2, "dtype": "bf16",
           "mode": "train", "compile": True, "overrides": {"b": 1, "a": 2}, "latency": 3.0}
    key = config_key(row)
    assert config_dict(key) == {"model": "m", "task": "sr", "scale": 4, "res": 256, "batch": 2,
                                "dtype": "bf16", "mode": "train", "compile": True,
                                "channels_last": False, "cuda_graph": False,
                                "overrides": {"a": 2, "b": 1}}
    # measured numbers are not part of the identity; override order is not either
    assert config_key({**row, "latency": 9.0, "overrides": {"a": 2, "b": 1}}) == key
    for change in ({"res": 512}, {"mode": "infer"}, {"compile": False}, {"cuda_graph": True},
                   {"channels_last": True}, {"overrides": {"a": 3, "b": 1}}, {"dtype": "fp32"}):
        assert config_key({**row, **change}) != key, change
    assert config_key({**row, "overrides": None}) == config_key({**row, "overrides": {}})

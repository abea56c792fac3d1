import math

import pytest
import torch

from guard.artifacts import (atomic_path, check_fingerprint, check_finite, provenance, read_json,
                             write_json_atomic)
from guard.errors import GuardError


def test_atomic_file_write_and_failure_leaves_nothing(tmp_path):
    target = tmp_path / "a.json"
    write_json_atomic(target, {"x": 1})
    assert read_json(target) == {"x": 1}
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert read_json(target) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_dir_replaces_whole_dir(tmp_path):
    out = tmp_path / "adapter"
    for content in ("one", "two"):
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "f.txt").write_text(content)
    assert (out / "f.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_nan_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "x.json", {"v": math.nan})
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(GuardError, match="'w' holds NaN"):
        check_finite("lock file", {"w": torch.tensor([1.0, float("nan")])})


def test_read_json_errors(tmp_path):
    with pytest.raises(GuardError, match="not found"):
        read_json(tmp_path / "missing.json", "guard.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(GuardError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(GuardError, match="JSON object"):
        read_json(tmp_path / "list.json")


def test_fingerprint_check():
    check_fingerprint("adapter", "abc", "abc")
    with pytest.raises(GuardError, match="made for base model 111111111111, but the loaded base model is 222222222222"):
        check_fingerprint("adapter", "1" * 64, "2" * 64)
    with pytest.raises(GuardError, match="records no base-model fingerprint"):
        check_fingerprint("adapter", None, "2" * 64)


def test_provenance_fields():
    p = provenance()
    assert p["format_version"] >= 1 and p["torch"].startswith("2.") and p["commit"]

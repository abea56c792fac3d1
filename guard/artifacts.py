"""Atomic artifact writes, provenance metadata and compatibility checks.

Every file safety-guard produces (reference states, adapters, lock vectors, reports) is written to a
temporary sibling and renamed into place, so a crash or a bad input never leaves a half-written artifact
that a later run would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from guard.errors import GuardError

FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it over `path`, on failure delete it.

    Works for files and directories alike (the caller creates whichever it needs at the yielded path).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    tmp.rmdir()  # callers create a file or a directory here
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike[str], what: str = "file") -> dict[str, Any]:
    """Read a JSON object, turning every way it can be wrong into one GuardError line."""
    p = Path(path)
    if not p.is_file():
        raise GuardError(f"{what} not found: {p}")
    try:
        obj = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GuardError(f"{what} {p} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise GuardError(f"{what} {p} must hold a JSON object, found {type(obj).__name__}")
    return obj


def sha256_text(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\x00")
    return h.hexdigest()


def git_commit(short: bool = True) -> str:
    """The commit of the safety-guard checkout that produced an artifact, '+dirty' when its code is uncommitted.
    Changes under bench/results/ do not count: they are what runs write, not what they run."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short" if short else "--verify", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.splitlines()
        dirty = [line for line in status if not line[3:].startswith("bench/results/")]
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance() -> dict[str, Any]:
    """What made an artifact: format version, package versions, commit, machine."""
    import torch
    import transformers

    from guard import __version__

    return {
        "format_version": FORMAT_VERSION,
        "safety_guard": __version__,
        "commit": git_commit(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": machine_description(),
    }


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cpus, {platform.system()} {platform.machine()}"


def check_finite(name: str, values: Mapping[str, Any]) -> None:
    """Raise if any tensor (or float) in `values` holds NaN/inf; `name` says which artifact."""
    import torch

    for key, v in values.items():
        if isinstance(v, torch.Tensor):
            if not torch.isfinite(v).all():
                raise GuardError(f"{name}: tensor '{key}' holds NaN or inf values")
        elif isinstance(v, float) and not math.isfinite(v):
            raise GuardError(f"{name}: value '{key}' is NaN or inf")


def check_fingerprint(what: str, found: str | None, expected: str) -> None:
    """An artifact made for one base model must not be used with another."""
    if found is None:
        raise GuardError(f"{what} records no base-model fingerprint; rebuild it with this version of safety-guard")
    if found != expected:
        raise GuardError(
            f"{what} was made for base model {found[:12]}, but the loaded base model is {expected[:12]}"
        )

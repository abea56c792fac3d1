"""Shared by the bench scripts: where results go and what every result records."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from guard.artifacts import provenance, write_json_atomic  # noqa: E402


def write_result(name: str, result: dict[str, Any]) -> Path:
    prov = provenance()
    out = {**result, "commit": prov["commit"], "machine": prov["machine"],
           "versions": {k: prov[k] for k in ("torch", "transformers", "safety_guard")}}
    path = RESULTS / f"{name}.json"
    write_json_atomic(path, out)
    print(json.dumps(out, indent=2))
    return path


def run_cli(app: Any) -> None:
    """Run a typer app the way `guard` runs its commands: a GuardError is one line on stderr and exit code 1."""
    from guard.errors import GuardError

    try:
        app()
    except GuardError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def load_gated_base(cfg: Any) -> tuple[Any, Any, Any, str]:
    """(model, tokenizer, lock, fingerprint) of the aligned base in float32, with its lock, which must carry a
    prompt gate: what the conditional-lock benches read."""
    import typer

    from guard.lock import load_lock
    from guard.models import ModelShape, fingerprint_dir, load_causal_lm
    from guard.workspace import Workspace
    from training.safetylock import ensure_lock

    base = Workspace(cfg).base()
    fp = fingerprint_dir(base)
    model, tok = load_causal_lm(base, "float32")
    lock = load_lock(ensure_lock(cfg), ModelShape.from_config(model.config), fp)
    if lock.gate is None:
        raise typer.BadParameter("the lock has no prompt gate; rebuild it with `guard lock build --rebuild`")
    return model, tok, lock, fp

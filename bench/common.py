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

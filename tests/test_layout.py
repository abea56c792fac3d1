"""The architecture the folders show, checked: guard <- training, guard <- serve, never the other way; the
`guard` command wires them; lab code (attacks, stress, stand-ins) never reaches what users install."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# what each installed package may import among the repo's own top-level packages
ALLOWED = {
    "guard": {"guard"},
    "training": {"guard", "training"},
    "serve": {"guard", "serve"},
    "guardcli": {"guard", "training", "serve", "guardcli"},
}
OWN = {"guard", "training", "serve", "guardcli", "lab", "bench", "tests"}


def imported_roots(path: Path) -> set[str]:
    """Top-level names of every import in a file, function-level imports included."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_what_the_layering_allows(package):
    bad = {}
    for f in sorted((ROOT / package).rglob("*.py")):
        wrong = (imported_roots(f) & OWN) - ALLOWED[package]
        if package == "guard" and "vllm" in imported_roots(f):
            wrong.add("vllm")
        if wrong:
            bad[str(f.relative_to(ROOT))] = sorted(wrong)
    assert not bad, bad


def test_lab_is_not_installed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert not any(p.startswith(("lab", "bench", "tests")) for p in cfg["include"])
    assert {p.rstrip("*") for p in cfg["include"]} == set(ALLOWED)

"""The layers point one way: application (``diffdistill.app``, the ``cli`` / ``train`` entry
modules) → trainers → eval → library. Checked on the import statements of every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> installed package (pyproject.toml's package-dir)
PACKAGES = {"diffdistill": "diffdistill", "trainers": "diffdistill.trainers",
            "eval": "diffdistill.eval"}
APP = ("diffdistill.app", "diffdistill.cli", "diffdistill.train")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:-1]]
    if rel.stem != "__init__":
        parts.append(rel.stem)
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved)."""
    name = module_name(path)
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def offenders(paths, forbidden) -> list[str]:
    return [f"{module_name(p)} imports {m}" for p in paths for m in sorted(imported_modules(p))
            if any(m == f or m.startswith(f + ".") for f in forbidden)]


def is_app(path: Path) -> bool:
    return module_name(path).startswith(APP)


def test_module_names_and_relative_imports_resolve():
    assert module_name(ROOT / "eval" / "harness.py") == "diffdistill.eval.harness"
    assert module_name(ROOT / "diffdistill" / "world" / "__init__.py") == "diffdistill.world"
    assert "diffdistill.world.SIZE_BUDGET_BYTES" in imported_modules(
        ROOT / "diffdistill" / "world" / "info.py")
    assert "diffdistill.trainers.ema.ema_backed_copy" in imported_modules(
        ROOT / "trainers" / "lcd.py")


@pytest.mark.parametrize("folder, forbidden", [
    ("eval", ("diffdistill.trainers", *APP)),
    ("trainers", APP),
])
def test_eval_and_trainers_never_import_layers_above_them(folder, forbidden):
    assert offenders(modules(folder), forbidden) == []


def test_the_library_imports_neither_trainers_nor_the_application():
    library = [p for p in modules("diffdistill") if not is_app(p)]
    assert len(library) > 20
    assert offenders(library, ("diffdistill.trainers", *APP)) == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    bad = ROOT / "eval" / "harness.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (
        "from diffdistill.trainers.common import x\nfrom ..app import cli\n"))
    assert offenders([bad], ("diffdistill.trainers", *APP)) == [
        "diffdistill.eval.harness imports diffdistill.app",
        "diffdistill.eval.harness imports diffdistill.app.cli",
        "diffdistill.eval.harness imports diffdistill.trainers.common",
        "diffdistill.eval.harness imports diffdistill.trainers.common.x"]

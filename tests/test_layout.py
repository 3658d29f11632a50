"""What may import what: model/ stands alone (the wheel's model.demo carries data only), and nothing
outside tests/ reaches into tests/ or edits sys.path."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_MODULES = {"tests", "conftest"} | {p.stem for p in (REPO / "tests").glob("*.py")}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every absolute import in a file, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def _sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def test_importing_model_loads_neither_convert_nor_server():
    # a fresh interpreter, every module of the package imported: what they pull in at import time
    code = ("import pkgutil, sys, model\n"
            "for m in pkgutil.walk_packages(model.__path__, 'model.'): __import__(m.name)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = set(ast.literal_eval(out.stdout.strip().splitlines()[-1]))
    assert "model" in loaded
    assert not loaded & {"convert", "server", "demo", "fixtures", "tests"}


def test_model_sources_import_nothing_of_ours_but_model():
    # function-level imports too, which the fresh interpreter above never runs
    bad = [f"{p.relative_to(REPO)}:{line} imports {name}" for p in _sources("model") for line, name in _imports(p)
           if name in {"convert", "server", "demo", "fixtures"} | TEST_MODULES]
    assert not bad


def test_nothing_outside_tests_reaches_into_tests_or_edits_sys_path():
    bad = []
    for p in _sources("model", "convert", "server", "bench", "demo", "fixtures"):
        bad += [f"{p.relative_to(REPO)}:{line} imports {name}" for line, name in _imports(p) if name in TEST_MODULES]
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
                bad.append(f"{p.relative_to(REPO)}:{node.lineno} uses sys.path")
    assert not bad

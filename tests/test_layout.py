"""The layering the project keeps: each stage script stands alone (shared pieces live in config.py,
model.py, data/ and dsu_ops/), model.py and data/ do not import each other, and dsu_ops/ (the Python side of
the C++/CUDA ops in kernels/) imports nothing of the project."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("extend", "train", "generate", "wer")


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_script_imports_another(stage):
    others = set(STAGES) - {stage}
    assert imported_modules(ROOT / f"{stage}.py") & others == set()


def test_model_and_data_do_not_import_each_other():
    assert "data" not in imported_modules(ROOT / "model.py")
    for path in sorted((ROOT / "data").glob("*.py")):
        assert "model" not in imported_modules(path), path.name


def test_dsu_ops_import_nothing_of_the_project():
    project = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if p.is_dir() and p.name != "dsu_ops"}
    for path in sorted((ROOT / "dsu_ops").glob("*.py")):
        assert imported_modules(path) & project == set(), path.name

"""The layering the project keeps (docs/DESIGN.md, "Layering rules"): each stage script stands alone
(shared pieces live in config.py, files.py, model.py, model_dir.py, data/ and dsu_ops/) and no stage
imports the matrix driver, which runs them as commands; model.py and data/ do not import each other;
data/ holds what training reads, so it imports no audio or model library; and dsu_ops/ (the Python
side of the C++/CUDA ops in kernels/) imports nothing of the project."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("extend", "train", "generate", "wer")
DRIVERS = ("matrix",)
AUDIO_AND_MODEL_LIBRARIES = {"soundfile", "soxr", "transformers", "speech_units"}


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
def test_no_stage_script_imports_another_or_a_driver(stage):
    others = set(STAGES + DRIVERS) - {stage}
    assert imported_modules(ROOT / f"{stage}.py") & others == set()


def test_model_and_data_do_not_import_each_other():
    assert imported_modules(ROOT / "model.py") & {"data", "model_dir"} == set()  # the network alone
    for path in sorted((ROOT / "data").glob("*.py")):
        assert "model" not in imported_modules(path), path.name


def test_dsu_ops_import_nothing_of_the_project():
    project = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if p.is_dir() and p.name != "dsu_ops"}
    for path in sorted((ROOT / "dsu_ops").glob("*.py")):
        assert imported_modules(path) & project == set(), path.name


def test_data_imports_no_audio_or_model_library():
    for path in sorted((ROOT / "data").glob("*.py")):
        assert imported_modules(path) & AUDIO_AND_MODEL_LIBRARIES == set(), path.name


def test_one_module_names_the_step_directories():
    # model_dir.py names this project's step_NNNNNNN directories (and data/reference_run.py the
    # reference's layouts, which model_dir reads through it); nothing else spells them out.
    spelled = re.compile(r"""f["']step_\{|["']step_\*|step_\(\\d|step_\\d""")
    sources = [*ROOT.glob("*.py"), *ROOT.glob("data/*.py"), *ROOT.glob("speech_units/*.py"), *ROOT.glob("dsu_ops/*.py")]
    allowed = {ROOT / "model_dir.py", ROOT / "data" / "reference_run.py"}
    assert [path.name for path in sources if path not in allowed and spelled.search(path.read_text())] == []
    assert spelled.search((ROOT / "model_dir.py").read_text())

"""The project's import names against the environments it runs in.

Scripts and tests run from the repository root, which is first on `sys.path`, so a top-level
module or package of the project named like an installed distribution's hides the real one from
every library that imports it. That is how a fresh clone broke: transformers 5.25 imports Hugging
Face's `kernels` at import time, and found this project's `kernels/` package instead (now
`dsu_ops`; `kernels/` holds only C++ and CUDA sources, so it imports as nothing of ours).
"""

import json
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from tests.test_vllm import vllm_python

ROOT = Path(__file__).resolve().parents[1]


def project_import_names(root: Path = ROOT) -> set[str]:
    """What `import NAME` could find at the root: every module there, and every folder with Python
    files (a package, or a namespace package without __init__.py). A folder without Python files
    never hides a distribution's package: a regular package anywhere on the path wins over it."""
    modules = {path.stem for path in root.glob("*.py")}
    packages = {path.name for path in root.iterdir()
                if path.is_dir() and path.name.isidentifier() and any(path.glob("*.py"))}
    return modules | packages


def collisions(names: set[str], distributions: dict[str, list[str]]) -> dict[str, list[str]]:
    return {name: distributions[name] for name in sorted(names) if name in distributions}


def test_the_project_has_the_import_names_it_is_known_by():
    names = project_import_names()
    assert {"train", "model", "data", "dsu_ops", "tests"} <= names
    assert "kernels" not in names  # the C++/CUDA sources' folder holds no Python


def test_no_import_name_of_the_project_is_an_installed_distributions():
    found = collisions(project_import_names(), packages_distributions())
    assert not found, (f"top-level names of this repository are also provided by installed distributions "
                       f"(name: distributions): {found}; rename ours, or the root will shadow theirs")


def test_a_module_named_like_a_distribution_is_caught(tmp_path):
    (tmp_path / "yaml.py").write_text("")  # PyYAML provides `yaml`
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "pack.cpp").write_text("")
    assert project_import_names(tmp_path) == {"yaml"}
    assert collisions(project_import_names(tmp_path), packages_distributions()) == {"yaml": ["PyYAML"]}


def test_transformers_models_import_with_the_repository_root_first_on_the_path():
    code = "from transformers import HubertModel, LlamaForCausalLM, MimiModel"
    done = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); {code}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_no_import_name_of_the_project_is_a_distributions_in_the_vllm_environment():
    python, where = vllm_python()
    if python is None:
        pytest.skip(where)
    code = "import json, importlib.metadata as m; print(json.dumps(m.packages_distributions()))"
    done = subprocess.run([python, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = collisions(project_import_names(), json.loads(done.stdout))
    assert not found, f"in {where}, top-level names of this repository are also distributions': {found}"

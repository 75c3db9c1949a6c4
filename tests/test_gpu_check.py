"""bench/gpu.sh's dry run: every step of the prepared GPU check on this CPU (tiny shape), so that the
script is tried before GPU time is spent on it. The table must have a number in every row that a CPU
can run; the CUDA tests report themselves skipped. The reference stack's row needs the carried wheels
(bench/.wheels, `bash bench/gpu.sh --fetch-wheels`); where they are not there they are fetched into a
temporary folder, and only where that fails too may that row be skipped, saying why."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ("torchtune-0.6.1-", "torchao-0.15.0-", "omegaconf-2.4.0-", "psutil-7.2.2-", "llama_models-0.3.0-")
NUMBER = r"[0-9][0-9,.]*"


def complete(folder: Path) -> bool:
    return folder.is_dir() and all(any(folder.glob(prefix + "*.whl")) for prefix in WHEELS)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp / "out"), "GPU_CHECK_WORK": str(tmp / "work")}
    wheels, why_not = ROOT / "bench" / ".wheels", ""
    if not complete(wheels):
        wheels = tmp / "wheels"
        fetch = subprocess.run(["bash", "bench/gpu.sh", "--fetch-wheels"], cwd=ROOT, capture_output=True, text=True,
                               timeout=180, env={**env, "GPU_CHECK_WHEELS": str(wheels),
                                                 "GPU_CHECK_GOLDEN": str(tmp / "golden")})
        if not complete(wheels):
            said = [line for line in (fetch.stderr + fetch.stdout).splitlines() if line.strip()]
            why_not = f"the wheels could not be fetched ({said[-1] if said else f'exit status {fetch.returncode}'})"
    env["GPU_CHECK_WHEELS"] = str(wheels)
    done = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=400, env=env)
    shutil.rmtree(tmp / "work", ignore_errors=True)  # the models and runs: 100 MB
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp / "out"
    table = (out / "gpu_check.md").read_text()
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and re.match(r"\d\. ", cells[0]):
            rows[cells[0][0]] = dict(zip(("step", "status", "seconds", "rate", "mfu", "memory", "notes"), cells))
    return dict(table=table, rows=rows, out=out, log=done.stdout, why_not=why_not)


def test_the_dry_run_says_its_numbers_are_cpu_numbers(dry_run):
    assert "CPU dry run: these are CPU numbers of a tiny model, not GPU figures" in dry_run["table"]
    assert re.search(r"lock [0-9a-f]{8} \(", dry_run["table"]), dry_run["table"]
    assert set(dry_run["rows"]) == set("123456"), dry_run["table"]
    assert dry_run["rows"]["2"]["status"] == "skipped: no CUDA (dry run)"


def test_every_step_a_cpu_can_run_has_its_numbers(dry_run):
    rows = dry_run["rows"]
    assert rows["3"]["status"] == "ok" and re.fullmatch(NUMBER, rows["3"]["seconds"]), rows["3"]
    runs = ["4", "5"] + (["6"] if not dry_run["why_not"] else [])
    for step in runs:
        row = rows[step]
        assert row["status"] == "ok", (row, dry_run["log"][-3000:])
        assert re.fullmatch(NUMBER, row["seconds"]) and re.fullmatch(NUMBER, row["rate"]), row
        assert re.fullmatch(NUMBER + "%", row["mfu"]) and re.fullmatch(NUMBER + " GiB RSS", row["memory"]), row
        assert float(row["rate"].replace(",", "")) > 0, row
    if dry_run["why_not"]:
        assert rows["6"]["status"].startswith("skipped: "), rows["6"]
        pytest.skip(f"the reference stack's row was skipped: {dry_run['why_not']}")
    assert rows["1"]["status"] == "ok" and "torchtune 0.6.1" in rows["1"]["notes"], rows["1"]
    assert re.search(r"\*\*train.py packed / reference stack\*\* .* \*\*" + NUMBER + "x\\*\\*", dry_run["table"])


def test_the_reference_stack_trains_on_the_same_weights_and_batches_as_train_py(dry_run):
    if dry_run["why_not"]:
        pytest.skip(dry_run["why_not"])
    padded = json.loads((dry_run["out"] / "padded.json").read_text())
    reference = json.loads((dry_run["out"] / "reference.json").read_text())
    # fp32 on the CPU: torchtune's llama3_2 with train.py's weights and first batch gives train.py's loss
    assert reference["loss_step1"] == pytest.approx(padded["loss_step1"], rel=1e-5)
    assert reference["tokens"] > 0 and padded["tokens"] > 0

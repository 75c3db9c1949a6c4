"""The methods matrix (matrix.py): unit variants of the corpus, and the tiny grid end to end."""

import csv
import json
import shutil
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import config
import matrix
from speech_units import cli, corpus, encoders, features
from tests.test_wer import fifo

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "data" / "mini"
GRID = ROOT / "configs" / "matrix.json"

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (sudo apt-get install espeak-ng)")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", ["mfcc", "logmel"])
@pytest.mark.parametrize("stack, rate", [(1, 50.0), (2, 25.0), (4, 12.5)])
def test_stacked_units_have_the_frame_rate_and_count_of_their_stack(kind, stack, rate):
    audio = np.random.default_rng(0).normal(0, 0.1, 16000 * 3 + 123)
    encoder = encoders.SpectralEncoder(kind, None, stack=stack)
    base = (features.mfcc_features if kind == "mfcc" else features.logmel_features)(audio)
    stacked = encoder.features([audio])[0]
    assert encoder.sampling_rate / encoder.downsampling_ratio == rate
    assert len(stacked) == encoder.frames(len(audio)) == features.frame_count(len(audio)) // stack
    assert stacked.shape[1] == stack * base.shape[1]
    np.testing.assert_array_equal(stacked[1, : base.shape[1]], base[stack])  # unit t starts at frame t * stack


def test_stack_is_refused_for_encoders_with_their_own_frame_rate(tmp_path, capsys):
    assert cli.main(["encode", str(tmp_path / "out"), "--encoder", "mimi", "--model", str(tmp_path),
                       "--stack", "2", str(tmp_path / "x.wav")]) == 2
    assert "--stack applies to the mfcc and logmel encoders" in capsys.readouterr().err


@needs_espeak
def test_resynthesis_reproduces_the_bundled_corpus():
    """A variant re-synthesises data/mini's utterances: the same ids and, with its k-means, the same DSUs."""
    sentences, speakers = corpus.split_sentences(8000, 200, 200, 0), corpus.split_speakers(0)
    centroids = features.load_centroids(MINI / "kmeans.npz", settings=features.FEATURE_SETTINGS)
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (MINI / f"{split}.jsonl").read_text().splitlines()[:2]]
        for i, row in enumerate(rows):
            speaker = speakers[split][i % len(speakers[split])]
            made = corpus._make_utterance((split, i, sentences[split][i], speaker, 0, None))
            assert made["row"]["id"] == row["id"] and made["row"]["speaker"] == row["speaker"]
            assert encoders.assign(made["features"], centroids).tolist() == row["speech_tokens"]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (sudo apt-get install espeak-ng)")
    out = tmp_path_factory.mktemp("variant") / "corpus"
    assert corpus.main(["build", str(out), "--n-train", "10", "--n-dev", "2", "--n-test", "2", "--k", "8",
                        "--save-wav"]) == 0
    return out


def encode_variant(corpus_dir: Path, out: Path, stack: int) -> list[dict]:
    encoder = ["--encoder", "logmel", "--stack", str(stack), "--quiet"]
    kmeans = out / "kmeans.npy"
    out.mkdir(parents=True)
    assert cli.main(["learn-kmeans", *encoder, "--k", "8", str(kmeans), str(corpus_dir / "wav" / "train.jsonl")]) == 0
    assert cli.main(["encode", str(out / "train"), *encoder, "--kmeans", str(kmeans),
                       str(corpus_dir / "wav" / "train.jsonl")]) == 0
    return pq.read_table(out / "train" / "data").to_pylist()


@needs_espeak
@pytest.mark.parametrize("stack", [2, 4])
def test_a_variant_is_deterministic_keeps_the_ids_and_has_its_frame_count(small_corpus, tmp_path, stack):
    first = encode_variant(small_corpus, tmp_path / "a", stack)
    second = encode_variant(small_corpus, tmp_path / "b", stack)
    assert first == second
    source = [json.loads(line) for line in (small_corpus / "train.jsonl").read_text().splitlines()]
    assert [r["id"] for r in first] == [r["id"] for r in source]
    assert [r["aligned_token_end_time"] for r in first] == [r["aligned_token_end_time"] for r in source]
    for row in first:
        audio, _ = corpus.read_wav(small_corpus / "wav" / "train" / f"{row['id']}.wav")
        assert len(row["speech_tokens"]) == features.frame_count(len(audio)) // stack
    info = json.loads((tmp_path / "a" / "train" / "units.json").read_text())
    assert info["frames_per_second"] == 50 / stack and info["stack"] == stack


def test_bad_grids_are_refused_naming_the_problem(tmp_path, capsys):
    spec = json.loads(GRID.read_text())
    spec["grids"]["tiny"]["units"] = ["mfcc-k999"]
    bad = tmp_path / "grid.json"
    bad.write_text(json.dumps(spec))
    assert matrix.main([str(bad), "--grid", "tiny", "--out", str(tmp_path / "out")]) == 2
    assert "unknown units 'mfcc-k999'" in capsys.readouterr().err
    assert matrix.main([str(GRID), "--grid", "nope", "--out", str(tmp_path / "out")]) == 2
    assert "no grid 'nope'" in capsys.readouterr().err
    spec["grids"]["tiny"]["units"] = ["mfcc-k128-50hz"]  # the bundled units, with the tiny grid's own corpus
    bad.write_text(json.dumps(spec))
    assert matrix.main([str(bad), "--grid", "tiny", "--out", str(tmp_path / "out")]) == 2
    assert "are the bundled corpus's, but the grid's corpus settings" in capsys.readouterr().err
    assert not (tmp_path / "out" / "cells").exists()


def test_make_matrix_runs_the_driver_on_the_chosen_grid():
    dry = subprocess.run(["make", "-n", "matrix", "MATRIX=tiny", "MATRIX_DIR=somewhere"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "python matrix.py configs/matrix.json --grid tiny --out somewhere --cache runs/matrix-cache" in dry


def run_matrix(out: Path, grid: Path = GRID) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "matrix.py", str(grid), "--grid", "tiny", "--out", str(out),
                           "--cache", str(out.parent / "cache")], cwd=ROOT, capture_output=True, text=True)


def commands(result: subprocess.CompletedProcess, script: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("$ ") and f" {script} " in line]


@pytest.fixture(scope="module")
def tiny_matrix(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (sudo apt-get install espeak-ng)")
    out = tmp_path_factory.mktemp("matrix") / "tiny"
    result = run_matrix(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


@needs_espeak
def test_the_tiny_grid_runs_end_to_end(tiny_matrix):
    out, result = tiny_matrix
    assert len(commands(result, "train.py")) == 3  # SFT; CPT then SFT
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["cell"] for r in rows] == ["mfcc-k16-25hz/sft", "mfcc-k16-25hz/cpt-interleaved+sft"]  # grid order
    for row in rows:
        cell = json.loads((out / "cells" / row["cell"] / "cell.json").read_text())
        report = json.loads((out / "cells" / row["cell"] / "wer.json").read_text())
        assert float(row["wer"]) == pytest.approx(report["wer"]) and report["n_utterances"] == 6
        assert cell["complete"] and cell["training_tokens"] > 0 and cell["seconds"]["total"] > 0
        assert "data.cpt.downsampling_ratio=640" in cell["overrides"]  # 25 Hz
        test = pq.read_table(out.parent / "cache" / "corpus-40-4-6-seed0" / "units" / "mfcc-k16-stack2" / "test"
                             / "data").to_pylist()
        lengths = [1 + np.count_nonzero(np.diff(r["speech_tokens"])) for r in test]  # deduplicated
        assert cell["speech_tokens_per_utterance"] == pytest.approx(np.mean(lengths))
    chain = out / "cells" / "mfcc-k16-25hz" / "cpt-interleaved+sft"
    assert json.loads((chain / "cell.json").read_text())["steps"] == {"cpt": 3, "sft": 3}
    sft_config = json.loads((chain / "sft" / "checkpoints" / "step_0000003" / "training_config.json").read_text())
    assert "cpt" in sft_config["model"]["path"]  # SFT started from the CPT run's checkpoint
    assert (out / "compare.md").exists() and (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


@needs_espeak
def test_a_rerun_skips_finished_cells_and_finishes_an_interrupted_one_exactly(tiny_matrix):
    out, _ = tiny_matrix
    again = run_matrix(out)
    assert again.returncode == 0 and not commands(again, "train.py") and not commands(again, "generate.py")
    assert again.stdout.count("   done: ") == 2

    copy = out.parent / "copy"  # beside it: the same cache
    shutil.copytree(out, copy)
    cell = copy / "cells" / "mfcc-k16-25hz" / "sft"
    final = cell / "sft" / "checkpoints" / "step_0000006"
    weights = (final / "model.safetensors").read_bytes()
    shutil.rmtree(final)  # as if stopped after step 4: the run resumes from its checkpoint
    for done in ("cell.json", "wer.json", "test"):
        shutil.rmtree(cell / done) if (cell / done).is_dir() else (cell / done).unlink()
    resumed = run_matrix(copy)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(commands(resumed, "train.py")) == 1 and len(commands(resumed, "generate.py")) == 1
    assert (final / "model.safetensors").read_bytes() == weights


@needs_espeak
def test_a_cell_started_with_other_settings_is_refused(tiny_matrix, tmp_path):
    out, _ = tiny_matrix
    spec = json.loads(GRID.read_text())
    spec["grids"]["tiny"]["steps"] = 8
    changed = tmp_path / "grid.json"
    changed.write_text(json.dumps(spec))
    result = run_matrix(out, changed)
    assert result.returncode == 2
    assert "was started with other settings (steps)" in result.stderr and not commands(result, "train.py")


@needs_espeak
def test_seeds_train_each_cell_again_beside_the_first_seed(tiny_matrix, tmp_path):
    out, _ = tiny_matrix
    copy = out.parent / "seeds"  # beside it: the same cache
    shutil.copytree(out, copy)
    spec = json.loads(GRID.read_text())
    spec["grids"]["tiny"]["seeds"] = 2
    spec["regimes"]["sft-asr+tts"] = {"sft_overrides": ["data.sft.tasks.tts=1"]}  # a multi-task regime
    spec["grids"]["tiny"]["extra"] = [{"units": "mfcc-k16-25hz", "regime": "sft-asr+tts"}]
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(spec))
    result = run_matrix(copy, grid)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("   done: ") == 2  # seed 0: the single-seed grid's cells
    trained = commands(result, "train.py")
    assert len(trained) == 5 and sum(" seed=1" in c for c in trained) == 4
    multi = json.loads((copy / "cells" / "mfcc-k16-25hz" / "sft-asr+tts+seed1" / "sft" / "checkpoints"
                        / "step_0000006" / "training_config.json").read_text())
    assert multi["data"]["sft"]["tasks"] == {"asr": 1.0, "tts": 1, "continue": 0.0}
    assert "Across training seeds" in (copy / "compare.md").read_text()
    assert [c for c in commands(result, "extend.py") if "--seed 1" in c]
    for regime in ("sft", "cpt-interleaved+sft"):
        cell = json.loads((copy / "cells" / "mfcc-k16-25hz" / f"{regime}+seed1" / "cell.json").read_text())
        assert (cell["cell"], cell["seed"]) == (f"mfcc-k16-25hz/{regime}", 1)
    first = json.loads((copy / "cells" / "mfcc-k16-25hz" / "sft" / "sft" / "checkpoints" / "step_0000006"
                        / "training_config.json").read_text())
    second = json.loads((copy / "cells" / "mfcc-k16-25hz" / "sft+seed1" / "sft" / "checkpoints" / "step_0000006"
                         / "training_config.json").read_text())
    assert (first["seed"], second["seed"]) == (config.SEED, 1)
    assert second["model"]["path"].endswith("-seed1")


def write_grid(tmp_path: Path, change) -> Path:
    """configs/matrix.json changed by `change(spec)`, written into tmp_path."""
    spec = json.loads(GRID.read_text())
    change(spec)
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(spec))
    return path


def refused(tmp_path: Path, capsys, grid: Path, *args: str) -> str:
    """The one-line error of running `grid`'s tiny grid, checked to have written nothing."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    code = matrix.main([str(grid), "--grid", "tiny", "--out", str(out), "--cache", str(cache), *args])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not cache.exists()
    return err


def tiny(**change):
    return lambda spec: spec["grids"]["tiny"].update(change)


@pytest.mark.parametrize("change, message", [
    (tiny(steps=1), "'grids.tiny.steps' must be an integer >= 2, got 1"),
    (tiny(steps="6"), "'grids.tiny.steps' must be an integer >= 2, got \"6\""),
    (tiny(steps=True), "'grids.tiny.steps' must be an integer >= 2, got true"),
    (tiny(corpus={"n_train": 0, "n_dev": 1, "n_test": 1, "seed": 0}), "'grids.tiny.corpus.n_train' must be an integer >= 1"),
    (tiny(corpus={"n_train": 40, "n_dev": 4, "n_test": 0, "seed": 0}), "'grids.tiny.corpus.n_test' must be an integer >= 1"),
    (tiny(corpus={"n_train": 40, "n_dev": 4, "n_test": 6}), "'grids.tiny.corpus.seed' must be given"),
    (tiny(extra=[{"units": "mfcc-k16-25hz", "regime": "sft", "options": {"dsu_bpe": "512"}}]),
     "'grids.tiny.extra[0].options.dsu_bpe' must be an integer >= 0, got \"512\""),
    (tiny(extra=[{"units": "mfcc-k16-25hz", "regime": "sft", "options": {"dsu_bpe": True}}]),
     "'grids.tiny.extra[0].options.dsu_bpe' must be an integer >= 0, got true"),
    (tiny(extra={"units": "mfcc-k16-25hz", "regime": "sft"}), "'grids.tiny.extra' must be a list of objects"),
    (tiny(units=None), "'grids.tiny.units' must be given"),  # not every declared unit
    (tiny(regimes="sft"), "'grids.tiny.regimes' must be a list of names declared under 'regimes', got \"sft\""),
    (tiny(base_model=["--layers", 1]), "'grids.tiny.base_model' must be a list of strings"),
    (tiny(train_overrides=["train.batch_size"]), "'grids.tiny.train_overrides' must be a list of key=value strings"),
    (tiny(save_steps=0), "'grids.tiny.save_steps' must be an integer > 0, got 0"),
    (lambda spec: spec["units"]["mfcc-k16-25hz"].update(k=16.0), "'units.mfcc-k16-25hz.k' must be an integer in 1..65534"),
    (lambda spec: spec["units"]["mfcc-k16-25hz"].update(encoder="wav2vec"), "'units.mfcc-k16-25hz.encoder' must be mfcc or logmel"),
    (lambda spec: spec["regimes"]["cpt-interleaved+sft"].update(cpt_share=float("nan")),
     "'regimes.cpt-interleaved+sft.cpt_share' must be a number between 0 and 1, got NaN"),
    (lambda spec: spec["regimes"]["cpt-interleaved+sft"].update(cpt_share=10**400),  # too large for a float
     "'regimes.cpt-interleaved+sft.cpt_share' must be a number between 0 and 1, got 1000"),
    (lambda spec: spec["regimes"].update({"cpt-no-share": {"cpt": "interleaved"}}),  # would silently train SFT alone
     "'regimes.cpt-no-share' {\"cpt\": \"interleaved\"}: SFT alone is {}; CPT then SFT needs both cpt and cpt_share"),
    (lambda spec: spec["units"].update({"no-k": {"encoder": "mfcc"}}), "'units.no-k' {\"encoder\": \"mfcc\"}: give"),
    (lambda spec: spec["units"]["mfcc-k128-50hz"].update(k=64), "'units.mfcc-k128-50hz' {\"bundled\": true, \"k\": 64}: give"),
    (lambda spec: spec["regimes"]["cpt-interleaved+sft"].update(cpt_share=0.01),
     "grid 'tiny': regime 'cpt-interleaved+sft': a cpt_share of 0.01 of 6 steps leaves CPT or SFT no step"),
    (tiny(extra=[{"units": "mfcc-k16-25hz", "regime": "sft", "options": {"deduplicate": True}}]),
     "grid 'tiny': the cell mfcc-k16-25hz/sft is listed twice"),
    (tiny(units=[], regimes=[]), "grid 'tiny' has no cells"),
    (lambda spec: spec["configs"].update(sft="configs/no-such.json"),
     f"grid 'tiny': configs.sft: {ROOT / 'configs' / 'no-such.json'}: no such file"),
    (lambda spec: spec.pop("configs"), "grid 'tiny' has no 'configs', in the grid or at the top of the file"),
], ids=lambda value: value if isinstance(value, str) and len(value) < 40 else None)
def test_a_grid_with_a_bad_setting_is_refused_before_anything_runs(tmp_path, capsys, change, message):
    grid = write_grid(tmp_path, change)
    assert f"{grid}: {message}" in refused(tmp_path, capsys, grid)


@pytest.mark.parametrize("change, key", [
    (lambda spec: spec.update(save_step=250), "'save_step' (the keys here: steps, save_steps, "),
    (lambda spec: spec["units"]["mfcc-k16-25hz"].update(stak=2),
     "'units.mfcc-k16-25hz.stak' (the keys of 'units.mfcc-k16-25hz': bundled, encoder, k, stack)"),
    (lambda spec: spec["grids"]["tiny"].update(extra=[{"units": "mfcc-k16-25hz", "regime": "sft",
                                                       "optoins": {"deduplicate": False}}]),
     "'grids.tiny.extra[0].optoins' (the keys of 'grids.tiny.extra[0]': units, regime, options)"),
    (lambda spec: spec["grids"]["tiny"]["corpus"].update(n_tset=6), "'grids.tiny.corpus.n_tset'"),
    (lambda spec: spec["regimes"]["sft"].update(cpt_shares=0.5), "'regimes.sft.cpt_shares'"),
    (lambda spec: spec["grids"]["default"].update(setps=10), "'grids.default.setps'"),  # in a grid not run
])
def test_an_unknown_key_anywhere_in_the_grid_file_is_refused(tmp_path, capsys, change, key):
    grid = write_grid(tmp_path, change)
    assert f"{grid}: unknown key {key}" in refused(tmp_path, capsys, grid)


@pytest.mark.parametrize("change, name, where", [
    (lambda spec: spec["units"].update({"../../x": spec["units"]["mfcc-k16-25hz"]}), "../../x", "units"),
    (lambda spec: spec["units"].update({"/abs/x": spec["units"]["mfcc-k16-25hz"]}), "/abs/x", "units"),
    (lambda spec: spec["units"].update({"a\\b": spec["units"]["mfcc-k16-25hz"]}), "a\\b", "units"),
    (lambda spec: spec["regimes"].update({"..": {}}), "..", "regimes"),
    (lambda spec: spec["regimes"].update({".": {}}), ".", "regimes"),
    (lambda spec: spec["regimes"].update({"": {}}), "", "regimes"),
    (lambda spec: spec["grids"].update({"../escape": spec["grids"]["tiny"]}), "../escape", "grids"),
])
def test_names_that_become_directories_must_be_plain_names(tmp_path, capsys, change, name, where):
    grid = write_grid(tmp_path, change)
    err = refused(tmp_path, capsys, grid)
    assert f"{grid}: the name {name!r} in '{where}' is not a plain name" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.json"]


def test_a_cell_of_an_escaping_unit_is_refused_before_it_writes_outside_out(tmp_path, capsys):
    def escape(spec):
        spec["units"]["../../escaped"] = spec["units"]["mfcc-k16-25hz"]
        spec["grids"]["tiny"]["units"] = ["../../escaped"]

    grid = write_grid(tmp_path, escape)
    assert "is not a plain name" in refused(tmp_path, capsys, grid)
    assert not (tmp_path / "escaped").exists()


def test_a_grid_file_with_a_repeated_key_is_refused(tmp_path, capsys):
    grid = tmp_path / "grid.json"
    grid.write_text(GRID.read_text().replace('"save_steps": 250,', '"save_steps": 250, "save_steps": 500,'))
    assert f"{grid}: the key 'save_steps' is given twice in one object" in refused(tmp_path, capsys, grid)


@pytest.mark.parametrize("content, message", [
    (b'{"units": ', ":1: not valid JSON"),
    (b'{"units": "\xff"}', ": not UTF-8 text"),
    (b"[1, 2]", ": a grid file is a JSON object, got list"),
    (b"[" * 100000 + b"]" * 100000, ": nested too deeply"),
])
def test_a_grid_file_that_is_not_a_json_object_is_refused(tmp_path, capsys, content, message):
    grid = tmp_path / "grid.json"
    grid.write_bytes(content)
    assert f"{grid}{message}" in refused(tmp_path, capsys, grid)


def test_a_grid_file_that_is_a_fifo_is_refused_without_waiting(tmp_path, capsys):
    with fifo(tmp_path / "grid.json") as grid:
        assert f"{grid}: is a FIFO" in refused(tmp_path, capsys, grid)


@pytest.mark.parametrize("flag", ["--out", "--cache"])
@pytest.mark.parametrize("where, problem", [
    ("file", "{tmp}/file is a regular file, where a directory is expected"),
    ("file/x", "{tmp}/file/x cannot be created: {tmp}/file is a regular file"),
    ("loop", "{tmp}/loop is a symlink loop, where a directory is expected"),
])
def test_an_out_or_cache_that_cannot_be_a_directory_is_refused(tmp_path, capsys, flag, where, problem):
    (tmp_path / "file").write_text("keep me")
    (tmp_path / "loop").symlink_to("loop")
    other = "--cache" if flag == "--out" else "--out"
    code = matrix.main([str(GRID), "--grid", "tiny", flag, str(tmp_path / where), other, str(tmp_path / "other")])
    err = capsys.readouterr().err
    assert code == 2 and f"{flag}: {problem.format(tmp=tmp_path)}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "loop"] and (tmp_path / "file").read_text() == "keep me"


@pytest.mark.parametrize("damage", ["garbage", "fifo"])
def test_a_damaged_plan_of_a_started_cell_is_named(tmp_path, capsys, damage):
    """The small grid's first cell uses the bundled units: no corpus to build before its plan is read."""
    plan = tmp_path / "out" / "cells" / "mfcc-k128-50hz" / "sft" / "plan.json"
    plan.parent.mkdir(parents=True)
    with fifo(plan) if damage == "fifo" else nullcontext(plan.write_text("{")):
        code = matrix.main([str(GRID), "--grid", "small", "--out", str(tmp_path / "out"), "--cache", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and f"{plan}" in err and "remove it to redo what wrote it" in err
    assert ("is a FIFO" in err) == (damage == "fifo") and ("invalid JSON" in err) == (damage != "fifo")
    assert sorted(p.name for p in plan.parent.iterdir()) == ["plan.json"]


@pytest.mark.parametrize("change, message", [
    (lambda spec: spec.pop("units"), "'units' must be given: the unit variants, by name"),
    (lambda spec: spec.update(units=None), "'units' must be an object of the unit variants, by name, got null"),
    (lambda spec: spec.update(units={"mfcc-k16-25hz": "mfcc"}),
     "'units.mfcc-k16-25hz' must be an object of bundled, encoder, k, stack, got \"mfcc\""),
], ids=["missing", "null", "not-an-object"])
def test_a_grid_file_without_its_unit_declarations_is_refused(tmp_path, capsys, change, message):
    grid = write_grid(tmp_path, change)
    assert f"{grid}: {message}" in refused(tmp_path, capsys, grid)


def test_every_grid_of_the_shipped_file_loads_with_its_cells():
    cells = {name: [matrix.cell_name(cell) for cell in matrix.load_grid(GRID, name)["cells"]]
             for name in ("default", "units", "small", "tiny")}
    assert cells["tiny"] == ["mfcc-k16-25hz/sft", "mfcc-k16-25hz/cpt-interleaved+sft"]
    assert cells["default"][-2:] == ["mfcc-k128-50hz/sft+no-dedup", "mfcc-k128-50hz/sft+bpe512"]
    assert len(cells["default"]) == 11 and len(cells["units"]) == 4 and len(cells["small"]) == 4
    tiny_grid = matrix.load_grid(GRID, "tiny")
    assert (tiny_grid["save_steps"], tiny_grid["generate"]) == (2, ["--max-tokens", "8"])  # its own, not the shared
    assert matrix.load_grid(GRID, "units")["save_steps"] == 250  # the shared one

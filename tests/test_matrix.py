"""The methods matrix (data/matrix.py): unit variants of the corpus, and the tiny grid end to end."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data import corpus, features, matrix, units

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
    encoder = units.SpectralEncoder(kind, None, stack=stack)
    base = (features.mfcc_features if kind == "mfcc" else features.logmel_features)(audio)
    stacked = encoder.features([audio])[0]
    assert encoder.sampling_rate / encoder.downsampling_ratio == rate
    assert len(stacked) == encoder.frames(len(audio)) == features.frame_count(len(audio)) // stack
    assert stacked.shape[1] == stack * base.shape[1]
    np.testing.assert_array_equal(stacked[1, : base.shape[1]], base[stack])  # unit t starts at frame t * stack


def test_stack_is_refused_for_encoders_with_their_own_frame_rate(tmp_path, capsys):
    assert units.main(["encode", str(tmp_path / "out"), "--encoder", "mimi", "--model", str(tmp_path),
                       "--stack", "2", str(tmp_path / "x.wav")]) == 2
    assert "--stack applies to the mfcc and logmel encoders" in capsys.readouterr().err


@needs_espeak
def test_resynthesis_reproduces_the_bundled_corpus():
    """A variant re-synthesises data/mini's utterances: the same ids and, with its k-means, the same DSUs."""
    sentences, speakers = corpus.split_sentences(8000, 200, 200, 0), corpus.split_speakers(0)
    centroids = features.load_kmeans(MINI / "kmeans.npz")
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (MINI / f"{split}.jsonl").read_text().splitlines()[:2]]
        for i, row in enumerate(rows):
            speaker = speakers[split][i % len(speakers[split])]
            made = corpus._make_utterance((split, i, sentences[split][i], speaker, 0, None))
            assert made["row"]["id"] == row["id"] and made["row"]["speaker"] == row["speaker"]
            assert units.assign(made["features"], centroids).tolist() == row["speech_tokens"]


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
    assert units.main(["learn-kmeans", *encoder, "--k", "8", str(kmeans), str(corpus_dir / "wav" / "train.jsonl")]) == 0
    assert units.main(["encode", str(out / "train"), *encoder, "--kmeans", str(kmeans),
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
    assert "-m data.matrix configs/matrix.json --grid tiny --out somewhere --cache runs/matrix-cache" in dry


def run_matrix(out: Path, grid: Path = GRID) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data.matrix", str(grid), "--grid", "tiny", "--out", str(out),
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


@pytest.mark.parametrize("change, message", [
    ({"steps": 1}, "steps must be an integer >= 2"),
    ({"corpus": {"n_train": 0, "n_dev": 1, "n_test": 1, "seed": 0}}, "needs integers n_train >= 1"),
    ({"regimes": ["cpt-no-share"]}, "regime 'cpt-no-share'"),
    ({"units": ["no-k"]}, "units 'no-k'"),
    ({"extra": [{"units": "mfcc-k16-25hz", "regime": "sft", "options": {"dsu_bpe": "512"}}]}, "dsu_bpe an integer"),
    ({"units": None}, "grid 'tiny' needs 'units': a list of names"),  # not every declared unit
    ({"regimes": "sft"}, "grid 'tiny' needs 'regimes': a list of names"),
])
def test_a_grid_with_a_bad_setting_is_refused_before_anything_runs(tmp_path, capsys, change, message):
    spec = json.loads(GRID.read_text())
    spec["regimes"]["cpt-no-share"] = {"cpt": "interleaved"}  # would silently train SFT alone
    spec["units"]["no-k"] = {"encoder": "mfcc"}
    spec["grids"]["tiny"].update(change)
    bad = tmp_path / "grid.json"
    bad.write_text(json.dumps(spec))
    assert matrix.main([str(bad), "--grid", "tiny", "--out", str(tmp_path / "out"), "--cache", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("declared", [None, {"mfcc-k16-25hz": "mfcc"}], ids=["missing", "not-an-object"])
def test_a_grid_file_without_its_unit_declarations_is_refused(tmp_path, capsys, declared):
    spec = json.loads(GRID.read_text())
    spec["units"] = declared
    bad = tmp_path / "grid.json"
    bad.write_text(json.dumps(spec))
    assert matrix.main([str(bad), "--grid", "tiny", "--out", str(tmp_path / "out"), "--cache", str(tmp_path)]) == 2
    assert "needs a top-level 'units' object" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

"""Artifacts laid out exactly as the reference implementation (speech-integration) writes them,
used here unchanged: its extended model, its run directory (torchtune_config.yaml with tags and
Hydra interpolations, epoch_E/global_step_N checkpoints), its vLLM-record generations, hub-layout
Parquet datasets and `datasets` save_to_disk directories. A small random model with the real
Llama 3 tokenizer extended by 5000 DSUs, as the reference's HuBERT runs use."""

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import jiwer
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from safetensors.torch import save_file
from whisper_normalizer.english import EnglishTextNormalizer

import config
import generate
import train
import wer
from data import batches, reference_run
from data.dataset import DataError, Source, dataset_name, load_rows, resolve_files
from data.tokenizer import Tokenizer, extended_tokenizer_bytes, read_bpe_file
from model import Llama, ModelConfig, init_weights
from tests.tiny import rows as tiny_rows
from tiny_model import make_tiny_model

N_DSUS = 5000
DATASET = "mls-hubert_large_ll60k-layer_22"
# The older reference's prompt (no trailing space); this project's default has one: it must come from the YAML.
REFERENCE_PROMPT = "You will act as an automatic speech recognition (ASR) system. Transcribe the speech tokens into English text."

# What the reference's torchtune WandBLogger saves (OmegaConf.save, unresolved): an excerpt of a
# real SFT run's composed config, with its interpolations and the pathlib tag the checkpointer's
# output_dir gets once the code has set it.
TORCHTUNE_CONFIG = """\
speech:
  n_dsus: @N_DSUS@
  use_modality_tokens: true
  deduplicate: @DEDUPLICATE@
extended_models_dir: /mnt/scratch-artemis/anilkeshwani/models/extended/
base_model_name: Llama-3.2-1B-${speech.n_dsus}-dsus
experiments_root_dir: /mnt/scratch-artemis/anilkeshwani/experiments
config_name: ${hydra:job.config_name}
output_dir: ${experiments_root_dir}/${base_model_name}-${config_name}
tokenizer:
  path: ${extended_models_dir}/${base_model_name}/original/tokenizer.model
  max_seq_len: 2048
  prompt_template: null
optimizer:
  lr: 0.0002
gradient_accumulation_steps: 4
clip_grad_norm: null
log_interval: 1
eval_steps: 1000
save_steps: 10000
checkpointer:
  checkpoint_dir: ${extended_models_dir}/${base_model_name}
  checkpoint_files:
  - ft-model-00001-of-00001.safetensors
  output_dir: !!python/object/apply:pathlib.PosixPath
  - /
  - mnt
  - scratch-artemis
  - run-id_abc123
  - checkpoints
  recipe_checkpoint: null
data:
  train:
    dataset:
      source: anilkeshwani/@DATASET@
      inference: false
      deduplicate: ${speech.deduplicate}
      train_on_input: true
      column_map:
        input: speech_tokens
        output: transcript
      new_system_prompt: @PROMPT@
      use_modality_tokens: ${speech.use_modality_tokens}
      split: train
    dataloader:
      batch_size: 2
  test:
    dataset:
      source: anilkeshwani/@DATASET@
      inference: true
      deduplicate: ${speech.deduplicate}
      new_system_prompt: @PROMPT@
      use_modality_tokens: ${speech.use_modality_tokens}
      split: test
"""


def write_yaml(path: Path, n_dsus="5000", deduplicate="false") -> Path:
    text = TORCHTUNE_CONFIG.replace("@N_DSUS@", n_dsus).replace("@DEDUPLICATE@", deduplicate)
    path.write_text(text.replace("@DATASET@", DATASET).replace("@PROMPT@", json.dumps(REFERENCE_PROMPT)))
    return path


def hub_rows(n: int, seed: int, prefix: str) -> list[dict]:
    """Rows as the reference's hub datasets hold them: `ID`, no `id`."""
    return [{"ID": r.pop("id"), **r} for r in tiny_rows(n, seed, prefix, n_dsus=N_DSUS)]


def write_hub_dataset(root: Path, splits: dict[str, list[dict]]) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text("---\nconfigs: []\n---\n")
    for split, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows), root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def write_save_to_disk(root: Path, splits: dict[str, list[dict]]) -> Path:
    """A DatasetDict as `datasets.save_to_disk` lays it out: Arrow IPC streams named in state.json."""
    root.mkdir(parents=True)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    for split, rows in splits.items():
        (root / split).mkdir()
        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(root / split / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table, max_chunksize=3)
        (root / split / "dataset_info.json").write_text(json.dumps({"features": {}}))
        (root / split / "state.json").write_text(json.dumps({
            "_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "0" * 16,
            "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
            "_split": split,
        }))
    return root


@pytest.fixture(scope="module")
def ref(tmp_path_factory, llama3_tokenizer_file):
    """The reference's artifacts: extended model, run directory, hub dataset."""
    root = tmp_path_factory.mktemp("reference")
    # Extended model: the real Llama 3 tokenizer + 5000 DSUs + 2 modality tokens, random 16-wide weights,
    # stored as the reference's extension script names them.
    model = make_tiny_model(root / "Llama-3.2-1B-5000-dsus", "ab " * 50, vocab_size=257, hidden=16, layers=1, heads=2,
                            kv_heads=1, intermediate=32)
    base = llama3_tokenizer_file.read_bytes()
    (model / "original" / "tokenizer.model").write_bytes(
        extended_tokenizer_bytes(base, len(read_bpe_file(llama3_tokenizer_file)), N_DSUS, True))
    tok = Tokenizer(model / "original" / "tokenizer.model")
    bos, eos = tok.special_ids["<|begin_of_text|>"], tok.special_ids["<|end_of_text|>"]
    for name, extra in (("config.json", {"vocab_size": tok.vocab_size}), ("generation_config.json", {})):
        config = json.loads((model / name).read_text())
        (model / name).write_text(json.dumps({**config, **extra, "bos_token_id": bos, "eos_token_id": eos}))
    params = json.loads((model / "original" / "params.json").read_text())
    (model / "original" / "params.json").write_text(json.dumps({**params, "vocab_size": tok.vocab_size}))
    (model / "model.safetensors").unlink()
    reference_model = Llama(ModelConfig.from_file(model / "config.json"))
    init_weights(reference_model, seed=0)
    weights = reference_model.state_dict()
    save_file(weights, model / "ft-model-00001-of-00001.safetensors", metadata={"format": "pt"})
    (model / "model.safetensors.index.json").write_text(json.dumps({
        "metadata": {"total_size": sum(w.numel() * 4 for w in weights.values())},
        "weight_map": {name: "ft-model-00001-of-00001.safetensors" for name in weights},
    }))
    # Run directory: a checkpoint is the model directory's files with new weights.
    run = root / "experiments" / "Llama-3.2-1B-5000-dsus-sft" / "absurd-sound-475-id_cqjfkkwf"
    checkpoint = run / "checkpoints" / "epoch_0" / "global_step_4"
    shutil.copytree(model, checkpoint)
    (run / "checkpoints" / "epoch_0" / "recipe_state.pt").write_bytes(b"not read")
    write_yaml(run / "checkpoints" / "torchtune_config.yaml")
    # Hub dataset with three splits, the test one holding a repeated-DSU (run-length) utterance.
    splits = {"train": hub_rows(10, 1, "tr"), "validation": hub_rows(4, 2, "va"), "test": hub_rows(6, 3, "te")}
    for row in splits["test"][:2]:
        row["speech_tokens"] = list(np.repeat(row["speech_tokens"], 2))  # deduplication changes these prompts
    hub = write_hub_dataset(root / "hub" / DATASET, splits)
    return {"root": root, "model": model, "run": run, "checkpoint": checkpoint, "tok": tok, "hub": hub,
            "splits": splits}


def prompts_for(checkpoint: Path, tok: Tokenizer, rows: list[dict], overrides=(), n_dsus=None) -> list[list[int]]:
    """generate.py's prompts: settings as generate.run takes them."""
    from_yaml, _ = reference_run.generation_settings(checkpoint, list(overrides), n_dsus)
    data = generate.data_settings(checkpoint, list(overrides), n_dsus, from_yaml)
    generate.load_tokenizer(checkpoint, data)  # fills in what the model holds (modality tokens), as run does
    return generate.build_prompts(rows, tok, data)


# -- 1. settings from torchtune_config.yaml ---------------------------------------------------


def test_the_config_is_read_as_data_never_as_objects(ref):
    path = ref["run"] / "checkpoints" / "torchtune_config.yaml"
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load(path.read_text())  # what made generate.py give up before
    config = reference_run.ReferenceConfig(path)
    assert config.get("checkpointer.output_dir") == "/mnt/scratch-artemis/run-id_abc123/checkpoints"
    assert config.get("data.train.dataset.deduplicate") is False  # ${speech.deduplicate}, typed
    assert config.get("base_model_name") == "Llama-3.2-1B-5000-dsus"
    assert isinstance(config.get("config_name"), reference_run.Unresolved)
    assert "hydra" in config.get("output_dir")  # unresolved through ${config_name}
    assert config.get("no.such.key") is None


def test_the_yaml_is_read_only_from_the_checkpoints_own_run_in_the_references_layout(ref, tmp_path):
    assert reference_run.find_config(ref["checkpoint"]) == ref["run"] / "checkpoints" / "torchtune_config.yaml"
    newer = tmp_path / "newer" / "checkpoints" / "step_6"  # the newer reference, beside checkpoints/training_state.pt
    newer.mkdir(parents=True)
    write_yaml(newer.parent / "torchtune_config.yaml")
    assert reference_run.find_config(newer) == newer.parent / "torchtune_config.yaml"
    (newer / "training_state.pt").write_bytes(b"x")  # ... but this project's own step_N holds its state
    assert reference_run.find_config(newer) is None
    # A YAML in any directory above a model that is no reference checkpoint, or in its own, is not its config:
    # not even in a directory named checkpoints.
    for model in (tmp_path / "a" / "b" / "model", tmp_path / "c" / "checkpoints" / "model",
                  tmp_path / "d" / "checkpoints" / "epoch_0" / "model",
                  tmp_path / "e" / "x" / "epoch_0" / "global_step_4"):
        model.mkdir(parents=True)
        for directory in (model, *list(model.parents)[:4]):
            write_yaml(directory / "torchtune_config.yaml")
        assert reference_run.find_config(model) is None, model


def test_an_unrelated_yaml_above_an_extended_model_leaves_its_settings_alone(ref, tmp_path, capsys):
    model = Path(shutil.copytree(ref["model"], tmp_path / "experiments" / "models" / "Llama-3.2-1B-5000-dsus"))
    for directory in (model.parent, model.parent.parent):  # deduplicate=false and the reference's prompt
        write_yaml(directory / "torchtune_config.yaml")
    out = tmp_path / "out"
    args = [str(model), "--data", str(ref["hub"]), "--n-dsus", "5000", "--backend", "torch", "--max-tokens", "1",
            "--out", str(out)]
    assert generate.main(args) == 0
    err = capsys.readouterr().err
    assert "torchtune_config.yaml" not in err
    assert "deduplicate=true  (train.py default)" in err
    assert json.loads((out / "generation_config.json").read_text())["data"]["sft"]["system_prompt"] == (
        config.DEFAULT_SYSTEM_PROMPT)


# -- 1b. the YAML is read with limits ---------------------------------------------------------

LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
TOWER = 'x0: "lol"\n' + "".join(f'x{i}: "{f"${{x{i - 1}}}" * 10}"\n' for i in range(1, 12))
OBJECTS = "y0: {a: 1}\n" + "".join(
    f"y{i}: {{" + ", ".join(f'{k}: "${{y{i - 1}}}"' for k in "abcdefghij") + "}\n" for i in range(1, 10))
# Each would take all memory, run for ages or overflow the stack without the limits; the key named is the one
# the limit trips on, or the one asked for when it is resolving its ${...} that trips.
HOSTILE = {
    "billion laughs": (LAUGHS + "speech:\n  n_dsus: *i\n", "speech.n_dsus", ":5: key 'e' expands through aliases"),
    "an anchor in itself": ("speech:\n  n_dsus: &a [*a]\n", "speech.n_dsus",
                            ":2: key 'speech.n_dsus[0]' refers to itself through an alias"),
    "a mapping holding itself": ("speech:\n  n_dsus: &s\n    me: *s\n", "speech.n_dsus",
                                 ":2: key 'speech.n_dsus.me' refers to itself"),
    "deep nesting": ("speech:\n  n_dsus: " + "[" * 5000 + "]" * 5000 + "\n", "speech.n_dsus",
                     ":2: key 'speech.n_dsus[0][0]"),
    "a tower of ${...}": (TOWER + "speech:\n  n_dsus: ${x11}\n", "speech.n_dsus",
                          ": key 'speech.n_dsus' resolves through ${...} to more than"),
    "multiplying ${...} objects": (OBJECTS + "speech:\n  n_dsus: ${y9}\n", "speech.n_dsus",
                                ": key 'speech.n_dsus' resolves through ${...} to more than"),
    "a ${...} cycle": ("speech:\n  n_dsus: ${speech.x}\n  x: ${speech.n_dsus}\n", "speech.n_dsus",
                       ": key 'speech.n_dsus' resolves through ${...} deeper than"),
}
READ_ONE_KEY = """
import sys
from data import reference_run
try:
    print(repr(reference_run.ReferenceConfig(sys.argv[1]).get(sys.argv[2]))[:200])
except reference_run.ReferenceError as error:
    print(error)
    sys.exit(2)
"""


def bounded(command: list[str], cwd: Path, memory: int) -> subprocess.CompletedProcess:
    """`command` with `memory` bytes of address space and a minute: a limit that fails to hold ends it
    with a MemoryError or a timeout instead of taking the machine's memory."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60, preexec_fn=limit)


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_yaml_is_refused_naming_the_file_and_key(case, tmp_path):
    text, key, message = HOSTILE[case]
    path = tmp_path / "torchtune_config.yaml"
    path.write_text(text)
    result = bounded([sys.executable, "-c", READ_ONE_KEY, str(path), key], Path(generate.__file__).parent, 512 << 20)
    assert result.returncode == 2, result.stdout + result.stderr[-2000:]
    assert result.stdout.startswith(f"{path}{message}") and result.stdout.strip().endswith("refused"), result.stdout


def test_a_hostile_yaml_beside_a_checkpoint_stops_generate_with_status_2(ref, tmp_path):
    checkpoint = Path(shutil.copytree(ref["checkpoint"], tmp_path / "checkpoints" / "epoch_0" / "global_step_4"))
    yaml_path = tmp_path / "checkpoints" / "torchtune_config.yaml"
    yaml_path.write_text(LAUGHS + "speech:\n  n_dsus: *i\ndata:\n  test:\n    dataset:\n      source: *i\n")
    command = [sys.executable, "generate.py", str(checkpoint), "--backend", "torch", "--max-tokens", "1"]
    settings = {"n_dsus": N_DSUS, "deduplicate": False, "modality_tokens": True, "sft": {"system_prompt": "S"}}
    # Read for the settings; and, when the checkpoint's training_config.json gives them all, for the dataset.
    for extra, training_config in ((["--data", str(ref["hub"])], None), ([], {"data": settings})):
        if training_config:
            (checkpoint / "training_config.json").write_text(json.dumps(training_config))
        result = bounded(command + extra, Path(generate.__file__).parent, 3 << 30)  # torch alone maps ~1 GB
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1] == (
            f"generate.py: error: {yaml_path}:5: key 'e' expands through aliases to more than "
            f"{reference_run.MAX_VALUES} values: refused")
    assert not (tmp_path / "generations").exists()


@pytest.mark.parametrize("text, message", [
    ("speech:\n  n_dsus: !!int abc\n", "not valid YAML (invalid literal for int()"),
    ("speech: [1\n", ":2: not valid YAML"),
    ("- 1\n- 2\n", "expected a YAML mapping at the top"),
    ("#" * reference_run.MAX_BYTES + "\nspeech: {}\n", "larger than 4 MiB"),
])
def test_malformed_yaml_is_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "torchtune_config.yaml"
    path.write_text(text)
    with pytest.raises(reference_run.ReferenceError) as error:
        reference_run.ReferenceConfig(path)
    assert str(error.value).startswith(f"{path}") and message in str(error.value)


def test_a_yaml_that_is_no_regular_file_is_refused_without_blocking(ref, tmp_path):
    checkpoint = Path(shutil.copytree(ref["checkpoint"], tmp_path / "checkpoints" / "epoch_0" / "global_step_4"))
    os.mkfifo(tmp_path / "checkpoints" / "torchtune_config.yaml")
    command = [sys.executable, "-c", READ_ONE_KEY, str(reference_run.find_config(checkpoint)), "speech.n_dsus"]
    result = bounded(command, Path(generate.__file__).parent, 512 << 20)
    assert result.returncode == 2 and "is a FIFO, where a regular file is expected" in result.stdout


@pytest.mark.parametrize("place, value, shown", [
    ("n_dsus", "-5", "'speech.n_dsus': must be an integer in 1..65534 (for data.n_dsus), got -5"),
    ("deduplicate", '"yes"', "'speech.deduplicate': must be true or false (for data.deduplicate), got \"yes\""),
])
def test_a_bad_value_in_the_yaml_is_reported_as_the_yamls(ref, tmp_path, capsys, place, value, shown):
    checkpoint = Path(shutil.copytree(ref["checkpoint"], tmp_path / "checkpoints" / "epoch_0" / "global_step_4"))
    path = tmp_path / "checkpoints" / "torchtune_config.yaml"
    write_yaml(path, **{place: value})
    assert generate.main([str(checkpoint), "--data", str(ref["hub"]), "--backend", "torch", "--max-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert f"generate.py: error: {path}, key {shown}" in err and "override" not in err
    assert not (tmp_path / "generations").exists()


def test_prompts_from_the_yaml_equal_prompts_from_settings_given_by_hand(ref):
    rows = load_rows(Source(ref["hub"], "test"), n_dsus=N_DSUS)
    from_yaml = prompts_for(ref["checkpoint"], ref["tok"], rows)
    by_hand = prompts_for(ref["model"], ref["tok"], rows, n_dsus=N_DSUS, overrides=[
        "data.deduplicate=false", "data.modality_tokens=true", f"data.sft.system_prompt={json.dumps(REFERENCE_PROMPT)}"])
    assert from_yaml == by_hand
    # ...and the settings matter: with this project's defaults (deduplicate=true) the two utterances
    # with repeated DSUs get other token ids (the system prompts differ only by outer space, stripped).
    defaults = prompts_for(ref["model"], ref["tok"], rows, n_dsus=N_DSUS)
    assert [a != b for a, b in zip(from_yaml, defaults)] == [True, True, False, False, False, False]


def test_precedence_command_line_then_training_config_then_yaml(ref, tmp_path):
    checkpoint = Path(shutil.copytree(ref["checkpoint"], tmp_path / "checkpoints" / "epoch_0" / "global_step_4"))
    write_yaml(tmp_path / "checkpoints" / "torchtune_config.yaml")
    (checkpoint / "training_config.json").write_text(json.dumps({"data": {"deduplicate": True}}))
    from_yaml, sources = reference_run.generation_settings(checkpoint, ["data.modality_tokens=true"], None)
    assert sources["deduplicate"] == str(checkpoint / "training_config.json")
    assert sources["modality_tokens"] == "command line"
    assert sources["n_dsus"].endswith("torchtune_config.yaml, key 'speech.n_dsus'")
    assert {setting: value for setting, (value, _) in from_yaml.items()} == {
        "n_dsus": 5000, "sft.system_prompt": REFERENCE_PROMPT}
    data = generate.data_settings(checkpoint, ["data.modality_tokens=true"], None, from_yaml)
    assert (data["n_dsus"], data["deduplicate"], data["sft"]["system_prompt"]) == (5000, True, REFERENCE_PROMPT)


@pytest.mark.parametrize("n_dsus, deduplicate, setting, wanted", [
    ("???", "false", "n_dsus", "--n-dsus N"),
    ("5000", "???", "deduplicate", "data.deduplicate=true|false"),
    ("${hydra:runtime.choices.n_dsus}", "false", "n_dsus", "resolver 'hydra:'"),
])
def test_an_unresolved_setting_is_asked_for_by_name(ref, tmp_path, capsys, n_dsus, deduplicate, setting, wanted):
    checkpoint = Path(shutil.copytree(ref["checkpoint"], tmp_path / "checkpoints" / "epoch_0" / "global_step_4"))
    write_yaml(tmp_path / "checkpoints" / "torchtune_config.yaml", n_dsus, deduplicate)
    args = [str(checkpoint), "--data", str(ref["hub"]), "--backend", "torch", "--max-tokens", "1"]
    assert generate.main(args) == 2
    err = capsys.readouterr().err
    assert f"error: {setting}:" in err and wanted in err
    assert not (tmp_path / "generations").exists()
    given = ["--n-dsus", "5000"] if setting == "n_dsus" else ["data.deduplicate=false"]
    assert generate.main(args + given) == 0
    assert f"{setting}=" in capsys.readouterr().err


# -- 2, 3. generation of a reference checkpoint: paths, sources, no prompt limit -------------------


def test_generation_goes_where_the_reference_puts_it_and_says_where_settings_came_from(ref, capsys):
    args = [str(ref["checkpoint"]), "--data", str(ref["hub"] / "data"), "--backend", "torch", "--max-tokens", "2"]
    assert generate.main(args) == 0
    err = capsys.readouterr().err
    out = ref["run"] / "generations" / "epoch_0" / "global_step_4" / DATASET / "test" / "generations.jsonl"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [row["ID"] for row in ref["splits"]["test"]]  # the ID column, test split only
    assert "deduplicate=false  (" in err and "torchtune_config.yaml, key 'speech.deduplicate'" in err
    assert f"sft.system_prompt={json.dumps(REFERENCE_PROMPT)}" in err
    assert generate.main(args) == 2 and "already exists" in capsys.readouterr().err  # never overwritten
    shutil.rmtree(ref["run"] / "generations")


def test_without_data_a_reference_checkpoint_takes_its_dataset_from_the_hub_cache(ref, tmp_path, monkeypatch, capsys):
    make_hub_cache(ref, tmp_path / "cache")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert generate.main([str(ref["checkpoint"]), "--backend", "torch", "--max-tokens", "1", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [row["ID"] for row in ref["splits"]["test"]]
    capsys.readouterr()


def test_dataset_names_come_from_the_data_source(ref, tmp_path):
    assert dataset_name(str(ref["hub"])) == DATASET
    assert dataset_name(str(ref["hub"] / "data")) == DATASET
    assert dataset_name(str(ref["hub"] / "data" / "test-00000-of-00001.parquet")) == DATASET
    snapshot = tmp_path / "hub" / f"datasets--anilkeshwani--{DATASET}" / "snapshots" / "abc" / "data"
    assert dataset_name(str(snapshot)) == DATASET
    assert dataset_name(str(tmp_path / "mls" / "test.jsonl")) == "mls"


def test_a_long_prompt_is_generated_unless_a_limit_is_asked_for(ref, tmp_path, capsys):
    # 20 s of speech: 1000 DSUs with no repeats, over 1000 prompt tokens (training's max_seq_len is 768).
    row = {"ID": "long", "transcript": "a long one", "speech_tokens": [i % N_DSUS for i in range(0, 3000, 3)]}
    data = tmp_path / "long.parquet"
    pq.write_table(pa.Table.from_pylist([row]), data)
    base = [str(ref["checkpoint"]), "--data", str(data), "--backend", "torch", "--max-tokens", "1"]
    assert generate.main(base + ["--out", str(tmp_path / "a")]) == 0
    record = json.loads((tmp_path / "a" / "generations.jsonl").read_text())
    assert record["prompt_len"] > 1000
    assert generate.main(base + ["--out", str(tmp_path / "b"), "data.max_seq_len=768"]) == 2
    assert "more than data.max_seq_len=768" in capsys.readouterr().err
    # The bound is the model's context: past it, a clear error.
    short = Path(shutil.copytree(ref["checkpoint"], tmp_path / "short" / "checkpoints" / "epoch_0" / "global_step_1"))
    write_yaml(tmp_path / "short" / "checkpoints" / "torchtune_config.yaml")
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 512}))
    assert generate.main([str(short)] + base[1:] + ["--out", str(tmp_path / "c")]) == 2
    assert "max_position_embeddings=512" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


# -- 4. wer.py on the reference's generations ------------------------------------------------


def vllm_record(i: int, text: str) -> dict:
    """A RequestOutput as the reference's generate.py writes it (vars() of vLLM's objects)."""
    return {"request_id": str(i), "prompt": None, "prompt_token_ids": [128000, 5], "prompt_logprobs": None,
            "outputs": [{"index": 0, "text": text, "token_ids": [1, 2], "cumulative_logprob": None,
                         "logprobs": None, "finish_reason": "stop", "stop_reason": None, "stop_reason_text": None}],
            "finished": True, "encoder_prompt": None, "encoder_prompt_token_ids": None, "num_cached_tokens": 0}


def reference_wer(hyps: list[str], refs: list[str]) -> float:
    """The reference's wer.py: Whisper's normaliser, then `evaluate`'s WER (its jiwer sums per pair)."""
    normalize = EnglishTextNormalizer()
    errors = total = 0
    for hyp, ref in zip(hyps, refs):
        out = jiwer.process_words(normalize(ref), normalize(hyp))
        errors += out.substitutions + out.deletions + out.insertions
        total += out.substitutions + out.deletions + out.hits
    return errors / total


def write_reference_generations(ref, tmp_path) -> tuple[Path, list[str]]:
    tests = ref["splits"]["test"]
    hyps = [r["transcript"].upper() + ("" if i % 2 else " and then") for i, r in enumerate(tests)]
    hyps[1] = "Mr. " + " ".join(tests[1]["transcript"].split()[1:]) + ", 2 birds!"
    path = tmp_path / "generations" / "epoch_0" / "global_step_4" / DATASET / "test" / "generations.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(vllm_record(i, h)) + "\n" for i, h in enumerate(hyps)))
    return path, hyps


def test_wer_of_reference_generations_equals_the_references_wer(ref, tmp_path, capsys):
    path, hyps = write_reference_generations(ref, tmp_path)
    assert wer.main([str(path), "--dataset", str(ref["hub"]), "--split", "test", "--gt_transcript_colname",
                     "transcript", "--normalizer", "whisper", "--bootstrap", "0"]) == 0
    result = json.loads((path.parent / "wer.json").read_text())
    expected = reference_wer(hyps, [r["transcript"] for r in ref["splits"]["test"]])
    assert 0 < expected < 1 and result["wer"] == pytest.approx(expected, abs=1e-12)
    assert result["worst"][0]["id"].startswith("te")  # rows named by the dataset's ID column
    # The split inferred from the path, as the reference does; a references file, by row order.
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps({"id": r["ID"], "transcript": r["transcript"]}) + "\n"
                                 for r in ref["splits"]["test"]))
    for extra in (["--dataset", str(ref["hub"] / "data")], ["--references", str(test_file)]):
        out = tmp_path / f"wer{len(extra[1])}.json"
        assert wer.main([str(path), *extra, "--out", str(out), "--bootstrap", "0"]) == 0
        assert json.loads(out.read_text())["wer"] == result["wer"]
    capsys.readouterr()


def make_hub_cache(ref, cache: Path) -> Path:
    """A hub cache entry of the test dataset: files in snapshots/<revision>/ are symlinks into blobs/."""
    entry = cache / f"datasets--anilkeshwani--{DATASET}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text("0123abc")
    (entry / "blobs").mkdir()
    (entry / "snapshots" / "0123abc" / "data").mkdir(parents=True)
    for shard in (ref["hub"] / "data").iterdir():
        blob = entry / "blobs" / f"blob-{shard.stem}"
        shutil.copy(shard, blob)
        (entry / "snapshots" / "0123abc" / "data" / shard.name).symlink_to(blob)
    return entry


def test_wer_finds_the_dataset_in_the_hub_cache_by_name(ref, tmp_path, monkeypatch, capsys):
    entry = make_hub_cache(ref, tmp_path / "cache")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    path, hyps = write_reference_generations(ref, tmp_path)
    assert wer.main([str(path), "--bootstrap", "0"]) == 0  # dataset and split from the path, as the reference
    assert json.loads((path.parent / "wer.json").read_text())["wer"] == pytest.approx(
        reference_wer(hyps, [r["transcript"] for r in ref["splits"]["test"]]))
    assert len(load_rows(Source(entry, "train"))) == len(ref["splits"]["train"])
    capsys.readouterr()


def test_wer_row_order_join_checks_counts_and_needs_references(ref, tmp_path, capsys):
    path, _ = write_reference_generations(ref, tmp_path)
    assert wer.main([str(path), "--dataset", str(ref["hub"]), "--split", "validation"]) == 2
    err = capsys.readouterr().err
    assert "has 6 generations but" in err and "has 4 rows" in err
    assert wer.main([str(path)]) == 2
    assert "pass --dataset PATH" in capsys.readouterr().err
    assert not (path.parent / "wer.json").exists()


# -- 5. hub layouts: one split at a time -----------------------------------------------------


def test_a_hub_data_directory_never_yields_a_test_row_in_training(ref, tmp_path):
    for source in (ref["hub"], ref["hub"] / "data"):
        with pytest.raises(DataError, match="one split is read at a time"):
            resolve_files(str(source))
    cfg = train.load_config(None, [f"run_dir={tmp_path / 'run'}", f"model.path={ref['model']}",
                                   f"data.train={ref['hub'] / 'data'}", f"data.dev={ref['hub']}",
                                   f"data.n_dsus={N_DSUS}", "data.task=\"sft\"", "train.max_steps=1"])
    seqs, dev = batches.load_data(cfg["data"], Path(cfg["run_dir"]), ref["tok"])
    assert [seqs.rows[i]["id"] for i in range(len(seqs))] == [r["ID"] for r in ref["splits"]["train"]]
    assert [dev.rows[i]["id"] for i in range(len(dev))] == [r["ID"] for r in ref["splits"]["validation"]]


def test_splits_mix_only_by_naming_the_files(ref):
    named = load_rows(str(ref["hub"] / "data" / "*-00000-of-00001.parquet"))
    assert len(named) == sum(len(rows) for rows in ref["splits"].values())


def test_save_to_disk_directories_and_arrow_files(ref, tmp_path):
    saved = write_save_to_disk(tmp_path / "saved", {s: rows for s, rows in ref["splits"].items()})
    for split, rows in ref["splits"].items():
        got = load_rows(Source(saved, split), n_dsus=N_DSUS)
        assert [r["id"] for r in got] == [r["ID"] for r in rows]
        np.testing.assert_array_equal(got[-1]["speech_tokens"], rows[-1]["speech_tokens"])
    assert len(load_rows(str(saved / "train"))) == 10  # one split's directory (a Dataset)
    assert len(load_rows(str(saved / "test" / "data-00000-of-00001.arrow"))) == 6
    with pytest.raises(DataError, match="one split is read at a time"):
        load_rows(str(saved))


def test_columns_named_otherwise_are_mapped(tmp_path):
    rows = [{"key": r["id"], "text": r["transcript"], "units": r["speech_tokens"], "speech_tokens": [1]}
            for r in tiny_rows(3, 4, "m", n_dsus=N_DSUS)]
    path = tmp_path / "other.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    source = Source(path, columns={"id": "key", "transcript": "text", "speech_tokens": "units"})
    got = load_rows(source, n_dsus=N_DSUS, fields=("transcript", "speech_tokens"))
    assert [(r["id"], r["transcript"], list(r["speech_tokens"])) for r in got] == [
        (r["key"], r["text"], r["units"]) for r in rows]
    with pytest.raises(DataError, match="no column 'units2'"):
        load_rows(Source(path, columns={"speech_tokens": "units2"}))


# -- 6. resume on a reference run --------------------------------------------------------------


def test_resume_auto_on_a_reference_run_refuses_and_shows_how_to_continue(ref, tmp_path, capsys):
    run = Path(shutil.copytree(ref["run"], tmp_path / "run"))
    newer = tmp_path / "newer"
    (newer / "checkpoints" / "step_6").mkdir(parents=True)
    (newer / "checkpoints" / "training_state.pt").write_bytes(b"x")
    common = [f"model.path={ref['model']}", f"data.train={ref['hub']}", f"data.n_dsus={N_DSUS}", "train.max_steps=2",
              "data.task=\"sft\""]
    for run_dir, latest in ((run, run / "checkpoints" / "epoch_0" / "global_step_4"),
                            (newer, newer / "checkpoints" / "step_6")):
        for resume in (["resume=auto"], [], [f"resume={latest}"]):
            before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
            assert train.main(["configs/sft_hubert.json", f"run_dir={run_dir}", *common, *resume]) == 2
            err = capsys.readouterr().err
            assert "reference implementation" in err and f"model.path={latest}" in err
            # The settings its YAML holds come with the command, where there is one.
            assert ("data.n_dsus=5000 data.deduplicate=false data.modality_tokens=true" in err) == (run_dir == run)
            assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before  # nothing written


def test_the_refusals_command_continues_from_the_reference_weights(ref, tmp_path, capsys):
    run = tmp_path / "continued"
    args = ["configs/sft_hubert.json", f"run_dir={run}", f"model.path={ref['checkpoint']}",
            f"data.train={ref['hub']}", f"data.n_dsus={N_DSUS}", "data.deduplicate=false", "train.max_steps=1",
            "train.batch_size=2", "train.grad_accum=1", "model.dtype=\"float32\"", "train.device=\"cpu\""]
    assert train.main(args) == 0, capsys.readouterr().err
    assert (run / "checkpoints" / "step_0000001" / "model.safetensors").is_file()


# -- 7. the per-tokenizer configs carry the reference's values ---------------------------------

# speech-integration conf/training.yaml, common.yaml, cpt.yaml, sft.yaml, data/_cpt_base.yaml, data/_sft_base.yaml
REFERENCE_VALUES = {
    "optim.lr": 2e-4, "optim.betas": [0.9, 0.999], "optim.eps": 1e-8, "optim.weight_decay": 0.01,
    "optim.warmup_steps": 1000, "optim.num_cycles": 0.5, "optim.max_grad_norm": 0,  # clip_grad_norm: null
    "train.grad_accum": 4, "train.max_steps": 100000, "train.log_steps": 1, "train.eval_steps": 1000,
    "train.save_steps": 10000, "data.deduplicate": True, "data.modality_tokens": True, "data.shuffle": True,
    "data.packed": False, "seed": 42831,
}
PER_TASK = {
    "cpt": {"train.batch_size": 16, "data.max_seq_len": 768, "data.cpt.sequence_type": "interleaved",
            "data.cpt.mean_seq_len_tokens": 39.43, "data.cpt.binom_prob": 0.1},
    "sft": {"train.batch_size": 2, "data.max_seq_len": 2048, "data.sft.train_on_input": True},
}


@pytest.mark.parametrize("task", ["cpt", "sft"])
@pytest.mark.parametrize("tokenizer, n_dsus", [("hubert", 5000), ("speechtokenizer", 1024), ("mimi", 2048),
                                               ("focalcodec", 8192)])
def test_configs_carry_the_references_values(task, tokenizer, n_dsus):
    cfg = train.load_config(f"configs/{task}_{tokenizer}.json", ["run_dir=r", "model.path=m", "data.train=t"])
    for key, value in {**REFERENCE_VALUES, **PER_TASK[task], "data.n_dsus": n_dsus}.items():
        assert config.get(cfg, key) == value, key
    if task == "sft":
        assert cfg["data"]["sft"]["system_prompt"].strip() == REFERENCE_PROMPT

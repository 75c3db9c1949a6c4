"""The config schema: every bad configuration or override is refused before anything is created,
with exit status 2, a message naming the key, and no traceback; good configs pass unchanged."""

import importlib.util
import json
import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import config
import train
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("config_assets")
    only_config = root / "only_config"
    only_config.mkdir()
    model = tiny.extended_model(root)
    (only_config / "config.json").write_text((model / "config.json").read_text())
    a_file = root / "a_file"
    a_file.write_text("not a directory\n")
    loop = root / "loop"
    loop.symlink_to(loop)
    fifo_weights = shutil.copytree(model, root / "fifo_weights")  # a model whose weights file is a FIFO
    (fifo_weights / "model.safetensors").unlink()
    os.mkfifo(fifo_weights / "model.safetensors")
    return SimpleNamespace(model=model, only_config=only_config, a_file=a_file, loop=loop, fifo_weights=fifo_weights,
                           train=tiny.write_jsonl(root / "train.jsonl", tiny.rows(16, seed=2, prefix="train")))


@contextmanager
def within(seconds: int):
    """Fails the test, rather than hanging it, when the body blocks (on a FIFO)."""
    def fail(*_):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# (case, overrides, the key the message must name). {file} is a regular file, {only_config} a
# directory holding only config.json.
BAD_OVERRIDES = [
    # booleans are true/false only: never a truthy string
    ("modality_tokens_no", ["data.modality_tokens=no"], "data.modality_tokens"),
    ("shuffle_yes", ["data.shuffle=yes"], "data.shuffle"),
    ("deduplicate_0", ["data.deduplicate=0"], "data.deduplicate"),
    ("train_on_input_1", ["data.sft.train_on_input=1"], "data.sft.train_on_input"),
    ("resume_force_maybe", ["resume_force=maybe"], "resume_force"),
    ("activation_checkpointing_quoted", ['model.activation_checkpointing="true"'], "model.activation_checkpointing"),
    ("compile_python_false", ["model.compile=False"], "model.compile"),
    ("packed_on", ["data.packed=on"], "data.packed"),
    ("fsdp_yes", ["model.fsdp=yes"], "model.fsdp"),
    ("skip_nonfinite_1", ["train.skip_nonfinite=1"], "train.skip_nonfinite"),
    # optimizer
    ("lr_zero", ["optim.lr=0"], "optim.lr"),
    ("lr_negative", ["optim.lr=-1"], "optim.lr"),
    ("lr_text", ["optim.lr=abc"], "optim.lr"),
    ("lr_nan", ["optim.lr=NaN"], "optim.lr"),
    ("lr_infinite", ["optim.lr=Infinity"], "optim.lr"),
    ("warmup_negative", ["optim.warmup_steps=-5"], "optim.warmup_steps"),
    ("warmup_text", ["optim.warmup_steps=abc"], "optim.warmup_steps"),
    ("warmup_fraction", ["optim.warmup_steps=1.5"], "optim.warmup_steps"),
    ("num_cycles_text", ["optim.num_cycles=abc"], "optim.num_cycles"),
    ("num_cycles_negative", ["optim.num_cycles=-1"], "optim.num_cycles"),
    ("betas_text", ["optim.betas=abc"], "optim.betas"),
    ("betas_one", ["optim.betas=[0.9]"], "optim.betas"),
    ("betas_above_one", ["optim.betas=[2,3]"], "optim.betas"),
    ("betas_mixed", ['optim.betas=[0.9,"x"]'], "optim.betas"),
    ("weight_decay_negative", ["optim.weight_decay=-1"], "optim.weight_decay"),
    ("eps_text", ["optim.eps=abc"], "optim.eps"),
    ("eps_zero", ["optim.eps=0"], "optim.eps"),
    ("max_grad_norm_text", ["optim.max_grad_norm=abc"], "optim.max_grad_norm"),
    ("max_grad_norm_negative", ["optim.max_grad_norm=-1"], "optim.max_grad_norm"),
    ("seed_text", ["seed=abc"], "seed"),
    ("seed_negative", ["seed=-1"], "seed"),
    # data
    ("system_prompt_number", ["data.sft.system_prompt=123"], "data.sft.system_prompt"),
    ("binom_prob_above_one", ["data.cpt.binom_prob=2"], "data.cpt.binom_prob"),
    ("binom_prob_negative", ["data.cpt.binom_prob=-0.1"], "data.cpt.binom_prob"),
    ("mean_seq_len_text", ["data.cpt.mean_seq_len_tokens=abc"], "data.cpt.mean_seq_len_tokens"),
    ("mean_seq_len_below_one", ["data.cpt.mean_seq_len_tokens=0.5"], "data.cpt.mean_seq_len_tokens"),
    ("mean_seq_len_beyond_a_float", ["data.cpt.mean_seq_len_tokens=1" + "0" * 400], "data.cpt.mean_seq_len_tokens"),
    ("downsampling_zero", ["data.cpt.downsampling_ratio=0"], "data.cpt.downsampling_ratio"),
    ("sampling_rate_zero", ["data.cpt.sampling_rate=0"], "data.cpt.sampling_rate"),
    ("sampling_rate_negative", ["data.cpt.sampling_rate=-16000"], "data.cpt.sampling_rate"),
    ("sampling_rate_fraction", ["data.cpt.sampling_rate=16000.5"], "data.cpt.sampling_rate"),
    ("sequence_type_unknown", ["data.cpt.sequence_type=interleave"], "data.cpt.sequence_type"),
    ("task_unknown", ["data.task=asr"], "data.task"),
    ("max_seq_len_zero", ["data.max_seq_len=0"], "data.max_seq_len"),
    ("n_dsus_zero", ["data.n_dsus=0"], "data.n_dsus"),
    ("n_dsus_beyond_the_private_use_area", ["data.n_dsus=70000"], "data.n_dsus"),
    ("n_dsus_text", ["data.n_dsus=abc"], "data.n_dsus"),
    ("train_empty", ["data.train="], "data.train"),
    ("packed_cpt_rows_of_one", ["data.packed=true", "data.max_seq_len=1"], "data.max_seq_len"),
    ("cache_dir_a_file", ["data.cache_dir={file}"], "data.cache_dir"),
    ("cache_dir_below_a_file", ["data.cache_dir={file}/cache"], "data.cache_dir"),
    ("cache_dir_a_symlink_loop", ["data.cache_dir={loop}"], "symlink loop"),
    ("cache_dir_below_a_symlink_loop", ["data.cache_dir={loop}/cache"], "data.cache_dir"),
    # model, training, run directory
    ("dtype_unknown", ["model.dtype=fp16"], "model.dtype"),
    ("device_unknown", ["train.device=tpu"], "train.device"),
    ("batch_size_zero", ["train.batch_size=0"], "train.batch_size"),
    ("grad_accum_negative", ["train.grad_accum=-1"], "train.grad_accum"),
    ("max_steps_zero", ["train.max_steps=0"], "train.max_steps"),
    ("max_steps_fraction", ["train.max_steps=10.5"], "train.max_steps"),
    ("eval_steps_zero", ["train.eval_steps=0"], "train.eval_steps"),
    ("save_steps_text", ["train.save_steps=abc"], "train.save_steps"),
    ("log_steps_zero", ["train.log_steps=0"], "train.log_steps"),
    ("loss_chunk_zero", ["train.loss_chunk_size=0"], "train.loss_chunk_size"),
    ("fsdp_without_torchrun", ["model.fsdp=true"], "model.fsdp"),
    ("run_dir_empty", ["run_dir="], "run_dir"),
    ("run_dir_blank", ["run_dir= "], "run_dir"),
    ("run_dir_a_file", ["run_dir={file}"], "run_dir"),
    ("run_dir_below_a_file", ["run_dir={file}/run"], "run_dir"),
    ("run_dir_a_symlink_loop", ["run_dir={loop}"], "'run_dir': {loop} is a symlink loop"),
    ("run_dir_below_a_symlink_loop", ["run_dir={loop}/run"], "run_dir"),
    ("model_path_weights_a_fifo", ["model.path={fifo_weights}"], "model.safetensors: is a FIFO"),
    ("model_path_empty", ["model.path="], "model.path"),
    ("model_path_missing", ["model.path={file}.missing"], "model.path"),
    ("model_path_only_config", ["model.path={only_config}"], "model.path"),
    ("resume_missing", ["resume={file}.missing"], "resume"),
    # the shape of the config
    ("unknown_key", ["train.batchsize=2"], "train.batchsize"),
    ("unknown_nested_key", ["data.cpt.rate=1"], "data.cpt.rate"),
    ("section_given_a_value", ["optim=1"], "optim"),
    ("value_given_a_section", ['optim.lr={"a": 1}'], "optim.lr"),
    ("override_without_equals", ["optim.lr"], "optim.lr"),
]


def run_refused(assets, tmp_path, capsys, monkeypatch, args: list[str], key: str) -> str:
    """train.main(args) must refuse with status 2 naming `key`, print no traceback, create no file
    (the run directory, the working directory) and start no training."""
    workdir = Path(tempfile.mkdtemp(dir=tmp_path, prefix="cwd"))
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert train.main(args) == 2
    out, err = capsys.readouterr()
    assert key in err, err
    assert err.startswith("train.py: error: ") and "Traceback" not in out + err
    assert "train: " not in out  # the line a starting run prints
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert list(workdir.iterdir()) == []
    return err


@pytest.mark.parametrize("case, overrides, key", BAD_OVERRIDES, ids=[c[0] for c in BAD_OVERRIDES])
def test_a_bad_override_is_refused_naming_the_key(assets, tmp_path, capsys, monkeypatch, case, overrides, key):
    good = {"run_dir": str(tmp_path / "run"), "model.path": str(assets.model), "data.train": str(assets.train),
            "data.n_dsus": str(tiny.N_DSUS), "train.max_steps": "2"}
    places = {"{file}": assets.a_file, "{only_config}": assets.only_config, "{loop}": assets.loop,
              "{fifo_weights}": assets.fifo_weights}
    for name, path in places.items():
        overrides, key = [o.replace(name, str(path)) for o in overrides], key.replace(name, str(path))
    given = {o.partition("=")[0] for o in overrides}
    args = [str(CONFIGS / "tiny_cpt.json"), *(f"{k}={v}" for k, v in good.items() if k not in given), *overrides]
    with within(60):
        run_refused(assets, tmp_path, capsys, monkeypatch, args, key)


# (case, the config file's text, what the message must name besides the file)
BAD_FILES = [
    ("invalid_json", '{"data": {"task": "cpt",}}', ":1:25: invalid JSON"),
    ("not_an_object", "[1, 2]", "expected a JSON object, got an array (the config file)"),
    ("section_as_number", '{"data": 5}', "'data'"),
    ("string_for_a_number", '{"optim": {"lr": "abc"}}', "'optim.lr'"),
    ("truthy_string", '{"data": {"deduplicate": "false"}}', "'data.deduplicate'"),
    ("unknown_section", '{"trainer": {"lr": 1}}', "'trainer'"),
]


@pytest.mark.parametrize("case, text, named", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_a_bad_config_file_is_refused_naming_file_and_key(assets, tmp_path, capsys, monkeypatch, case, text, named):
    path = tmp_path / "bad.json"
    path.write_text(text)
    args = [str(path), f"run_dir={tmp_path / 'run'}", f"model.path={assets.model}", f"data.train={assets.train}",
            f"data.n_dsus={tiny.N_DSUS}", "train.max_steps=2"]
    err = run_refused(assets, tmp_path, capsys, monkeypatch, args, named)
    assert str(path) in err


@pytest.mark.parametrize("kind", ["fifo", "symlink_loop", "directory"])
def test_a_config_file_that_is_not_a_regular_file_is_refused_without_blocking(assets, tmp_path, capsys, monkeypatch,
                                                                                kind):
    path = tmp_path / "config.json"
    {"fifo": os.mkfifo, "symlink_loop": lambda p: p.symlink_to(p), "directory": os.mkdir}[kind](path)
    args = [str(path), f"run_dir={tmp_path / 'run'}", f"model.path={assets.model}", f"data.train={assets.train}",
            f"data.n_dsus={tiny.N_DSUS}", "train.max_steps=2"]
    with within(60):
        err = run_refused(assets, tmp_path, capsys, monkeypatch, args, str(path))
    assert {"fifo": "is a FIFO", "symlink_loop": "Too many levels of symbolic links",
            "directory": "is a directory"}[kind] in err


def test_optional_packages_and_devices_a_setting_needs_are_checked_up_front(assets, tmp_path, capsys, monkeypatch):
    args = [str(CONFIGS / "tiny_cpt.json"), f"run_dir={tmp_path / 'run'}", f"model.path={assets.model}",
            f"data.train={assets.train}", f"data.n_dsus={tiny.N_DSUS}", "train.max_steps=2"]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    run_refused(assets, tmp_path, capsys, monkeypatch, args + ["wandb.project=speech"], "wandb")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run_refused(assets, tmp_path, capsys, monkeypatch, args + ["train.device=cuda"], "train.device")


TRAINING_CONFIGS = sorted(p for p in CONFIGS.glob("*.json") if p.name != "matrix.json")  # matrix.json: matrix.py's grids


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.name)
def test_every_bundled_config_passes_the_schema(path):
    cfg = config.load_config(path, ["run_dir=r", "model.path=m", "data.train=t", "data.n_dsus=64",
                                    "train.max_steps=1"])
    assert cfg["run_dir"] == "r" and set(cfg) == set(config.defaults())


def test_overrides_are_typed_by_json_and_a_quoted_value_stays_text():
    cfg = config.load_config(CONFIGS / "tiny_sft.json", [
        "run_dir=r", "model.path=m", "data.train=t", "data.n_dsus=64", "train.max_steps=3",
        "data.deduplicate=false", 'data.sft.system_prompt="123"', "optim.betas=[0.8, 0.95]", "optim.lr=1",
    ])
    assert cfg["data"]["deduplicate"] is False
    assert cfg["data"]["sft"]["system_prompt"] == "123"
    assert cfg["optim"]["betas"] == [0.8, 0.95] and cfg["optim"]["lr"] == 1
    assert cfg["train"]["max_steps"] == 3


def test_help_config_lists_every_key_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help-config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for dotted, key in config.SCHEMA.items():
        shown = "(required)" if key.default is config.REQUIRED else json.dumps(key.default)
        assert f"  {dotted} = {shown}\n" in out

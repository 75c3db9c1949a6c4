"""The configuration schema of train.py (and the data section generate.py reads): every key with
its default, type, allowed values and meaning, declared once, and the checks that run before
anything is created.

    python train.py --help-config      prints it

A config is a JSON file of nested objects plus `dotted.key=value` overrides; a value on the
command line is read as JSON when it parses (numbers, true/false, null, lists, "quoted strings")
and as a plain string otherwise. Booleans are `true` / `false` only: `no`, `0` or `"false"` are
refused, never read as truthy. A key named "//" at any level is a comment.
"""

import importlib.util
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from data.samples import CPT_SEQUENCE_TYPES, SEED, Interleave
from data.tokenizer import MAX_DSUS
from files import JsonFileError, directory_problem, read_json

DEFAULT_SYSTEM_PROMPT = (
    "You will act as an automatic speech recognition (ASR) system. Transcribe the speech tokens into English text. "
)
DEFAULT_TTS_PROMPT = (
    "You will act as a text-to-speech (TTS) system. Speak the English text as speech tokens. "
)
DEFAULT_CONTINUE_PROMPT = (
    "You will act as a speech continuation system. Continue the speech tokens with the speech tokens that follow. "
)
REQUIRED = object()  # the default of a key every run must give
COMMENT = "//"


class ConfigError(ValueError):
    """A bad configuration: the message names the key (and the file or override it came from)."""


@dataclass(frozen=True)
class Key:
    default: object
    kind: type  # str, int, float (ints accepted), bool or list
    help: str
    rule: str = ""  # the allowed values in words, shown in errors and --help-config
    ok: object = None  # predicate on a value of the right type

    def problem(self, value) -> str | None:
        """Why `value` is not allowed, or None."""
        if value is None:  # required keys are checked apart, with every missing one named
            return None if self.default is None or self.default is REQUIRED else f"must be {self.rule or describe_kind(self.kind)}"
        if self.kind is bool:
            good_type = isinstance(value, bool)
        elif self.kind is int:
            good_type = isinstance(value, int) and not isinstance(value, bool)
        elif self.kind is float:
            good_type = isinstance(value, (int, float)) and not isinstance(value, bool) and _finite_float(value)
        else:
            good_type = isinstance(value, self.kind)
        if not good_type or (self.ok is not None and not self.ok(value)):
            return f"must be {self.rule or describe_kind(self.kind)}"
        return None


def _finite_float(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float, such as 10**400
        return False


def describe_kind(kind: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(kind, "a list")


def choice(default, help, *options) -> Key:
    return Key(default, str, help, " or ".join(options), lambda v: v in options)


def at_least(kind, low, default, help) -> Key:
    return Key(default, kind, help, f"{describe_kind(kind)} >= {low}", lambda v: v >= low)


def positive(kind, default, help) -> Key:
    return Key(default, kind, help, f"{describe_kind(kind)} > 0", lambda v: v > 0)


def nonempty(default, help) -> Key:
    return Key(default, str, help, "a non-empty string", lambda v: v.strip() != "")


def _betas(value) -> bool:
    return (len(value) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in value)
            and all(0 <= b < 1 for b in value))


_INTERLEAVE = Interleave()  # the interleaving defaults live with the construction code

SCHEMA: dict[str, Key] = {
    "run_dir": nonempty(REQUIRED, "checkpoints, metrics.jsonl and losses.png go here (created if missing)"),
    "seed": at_least(int, 0, SEED, "the epochs' row order, the SFT task draws and torch's RNG; the CPT "
                     f"interleaving draws always use the reference's seed {SEED} (data.samples.SEED), whatever "
                     "this is, so sequences match it"),
    "model.path": nonempty(REQUIRED, "an extended model directory (extend.py's output) or a train.py checkpoint"),
    "model.dtype": choice("bfloat16", "parameters and compute", "bfloat16", "float32"),
    "model.activation_checkpointing": Key(False, bool, "recompute layer activations in the backward pass"),
    "model.compile": Key("auto", object, "torch.compile the model (auto: on CUDA; the compile time is printed, and a "
                         "failure falls back to the eager model with a warning)", 'true, false or "auto"',
                         lambda v: isinstance(v, bool) or v == "auto"),
    "model.fsdp": Key(False, bool, "shard parameters, gradients and optimizer state (FSDP2) instead of replicating "
                      "them; needs torchrun"),
    "data.task": choice("cpt", "continued pre-training or ASR fine-tuning", "cpt", "sft"),
    "data.train": nonempty(REQUIRED, "JSONL / Parquet / Arrow file, directory of shards, glob, or a dataset "
                           "directory (its train split)"),
    "data.dev": Key("", str, "evaluated every train.eval_steps when given (a dataset directory: its validation split)"),
    **{f"data.columns.{field}": Key(None, str, f"the source's column for '{field}' when named otherwise (null: "
                                     f"'{field}'{', then ID' if field == 'id' else ''}), as the reference's *_key settings")
       for field in ("id", "transcript", "tokenized", "aligned_token_start_time", "aligned_token_end_time",
                     "speech_tokens")},
    "data.cache_dir": Key("", str, "where train and dev are converted once into memory-mapped arrays that later runs "
                          "reuse; \"\" means <run_dir>/data_cache. Runs on the same data may share one"),
    "data.n_dsus": Key(None, int, "DSUs in the model's vocabulary: null reads it from the model's tokenizer "
                       "(extend.py --n-dsus); a number given must match it", f"an integer in 1..{MAX_DSUS}",
                       lambda v: 1 <= v <= MAX_DSUS),
    "data.deduplicate": Key(None, bool, "collapse runs of a repeated DSU into one: null follows the model (as its "
                            "speech BPE was learnt; true without one, the reference's default); a value given must "
                            "agree with a speech BPE"),
    "data.modality_tokens": Key(None, bool, "mark text and speech spans with the modality tokens: null uses them "
                                "when the model's tokenizer has them; true needs them there"),
    "data.max_seq_len": positive(int, 768, "longest sequence in tokens (longer ones are cut)"),
    "data.shuffle": Key(True, bool, "a new permutation of the rows each epoch"),
    "data.packed": Key(False, bool, "pack sequences into rows of max_seq_len (attention stays within a sequence) "
                       "instead of padding each batch; train.batch_size then counts rows"),
    "data.cpt.sequence_type": choice("interleaved", "how CPT joins text and speech", *CPT_SEQUENCE_TYPES),
    "data.cpt.sampling_rate": positive(int, _INTERLEAVE.sampling_rate, "audio samples per second of the speech "
                                       "tokenizer (word times to DSU frames)"),
    "data.cpt.downsampling_ratio": positive(int, _INTERLEAVE.downsampling_ratio,
                                            "audio samples per DSU frame (16000 / 320 = 50 frames/s)"),
    "data.cpt.mean_seq_len_tokens": at_least(float, 1, _INTERLEAVE.mean_seq_len_tokens,
                                             "binomial n of the interleaved span lengths (in words)"),
    "data.cpt.binom_prob": Key(_INTERLEAVE.binom_prob, float, "binomial p of the interleaved span lengths",
                               "a number in [0, 1]", lambda v: 0 <= v <= 1),
    "data.sft.system_prompt": Key(DEFAULT_SYSTEM_PROMPT, str, "the ASR prompt's system message"),
    **{f"data.sft.tasks.{task}": at_least(float, 0, 1.0 if task == "asr" else 0.0,
                                          f"weight of the {task} task in the SFT mixture ({meaning}); each sample's "
                                          "task is drawn from the weights, the seed, its row and epoch")
       for task, meaning in (("asr", "speech -> transcript"), ("tts", "transcript -> speech units"),
                             ("continue", "first part of the units -> the rest"))},
    "data.sft.tts_system_prompt": Key(DEFAULT_TTS_PROMPT, str, "the TTS task's system message"),
    "data.sft.continue_system_prompt": Key(DEFAULT_CONTINUE_PROMPT, str, "the continue task's system message"),
    "data.sft.continue_fraction": Key(0.5, float, "the continue task's prompt: this fraction of the units, then "
                                      "up to the next change of unit", "a number in (0, 1)", lambda v: 0 < v < 1),
    "data.sft.train_on_input": Key(False, bool, "also train on the prompt's tokens, not only the transcript"),
    "optim.lr": positive(float, 2e-4, "peak learning rate (AdamW)"),
    "optim.betas": Key([0.9, 0.999], list, "AdamW betas", "two numbers in [0, 1)", _betas),
    "optim.eps": positive(float, 1e-8, "AdamW epsilon"),
    "optim.weight_decay": at_least(float, 0, 0.01, "AdamW weight decay"),
    "optim.warmup_steps": at_least(int, 0, 1000, "linear warm-up from 0, in optimizer steps"),
    "optim.num_cycles": at_least(float, 0, 0.5, "cosine cycles over the run after warm-up: 0.5 decays to zero"),
    "optim.max_grad_norm": at_least(float, 0, 1.0, "clip the gradient norm to this; 0 turns clipping off"),
    "train.batch_size": positive(int, 16, "sequences (rows with data.packed) per micro-batch per process"),
    "train.grad_accum": positive(int, 4, "micro-batches per optimizer step"),
    "train.max_steps": positive(int, REQUIRED, "optimizer steps in the whole run"),
    "train.eval_steps": positive(int, 1000, "dev loss every this many steps (and at the end)"),
    "train.save_steps": positive(int, 10000, "a checkpoint every this many steps (and at the end)"),
    "train.log_steps": positive(int, 10, "full metrics every this many steps"),
    "train.device": choice("auto", "auto is cuda when a GPU is visible", "auto", "cuda", "cpu"),
    "train.loss_chunk_size": positive(int, 1024, "tokens per logits chunk in the loss (memory vs speed)"),
    "train.skip_nonfinite": Key(False, bool, "on a NaN or infinite loss or gradient norm, skip that step's update "
                                "with a warning instead of stopping the run"),
    "resume": Key("", str, "\"\", auto (the run directory's newest intact checkpoint) or a checkpoint path"),
    "resume_force": Key(False, bool, "resume even if batch size, accumulation or world size changed"),
    "wandb.project": Key("", str, "log to Weights & Biases under this project (needs the wandb package)"),
    "wandb.name": Key("", str, "the Weights & Biases run name"),
}


def defaults() -> dict:
    """The nested config of every key's default (None where a key must be given)."""
    config: dict = {}
    for dotted, key in SCHEMA.items():
        *parents, leaf = dotted.split(".")
        node = config
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = None if key.default is REQUIRED else json.loads(json.dumps(key.default))
    return config


def get(config: dict, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return config


def merge(config: dict, update: dict, source: str, prefix: str = "") -> None:
    """Sets `update`'s values into `config`; every key must be in the schema ("//" comments are skipped)."""
    for name, value in update.items():
        if name == COMMENT:
            continue
        dotted = prefix + name
        if not isinstance(config, dict) or name not in config:
            raise ConfigError(f"{source}: unknown key '{dotted}' (python train.py --help-config lists every key)")
        if isinstance(config[name], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{dotted}' is a section: give it an object of keys")
            merge(config[name], value, source, dotted + ".")
        elif isinstance(value, dict):
            raise ConfigError(f"{source}: '{dotted}' {SCHEMA[dotted].problem(value) or 'is not a section'}, got an object")
        else:
            config[name] = value


def parse_override(text: str) -> tuple[str, object]:
    """`a.b=value` -> ("a.b", value): JSON when the value parses as JSON, the plain string otherwise."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{text}' is not of the form dotted.key=value")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def apply_override(config: dict, text: str) -> str:
    """Sets one `dotted.key=value` override into `config`; returns the key."""
    key, value = parse_override(text)
    nested = value
    for name in reversed(key.split(".")):
        nested = {name: nested}
    merge(config, nested, f"override '{text}'")
    return key


def read_config_file(path: str | Path) -> dict:
    """The JSON object of a config file; any problem is a ConfigError naming the file."""
    try:
        return read_json(path)
    except JsonFileError as e:
        raise ConfigError(f"{e} (the config file)") from None


def check_values(config: dict, source: str, prefix: str = "") -> None:
    """Every key under `prefix` against its type and rule; the first problem raises."""
    for dotted, key in SCHEMA.items():
        if not dotted.startswith(prefix):
            continue
        value = get(config, dotted)
        problem = key.problem(value)
        if problem is not None:
            hint = ""
            if key.kind is str and not isinstance(value, str) and value is not None:
                hint = f" (to pass it as text on the command line, quote it: {dotted}='\"{json.dumps(value)}\"')"
            raise ConfigError(f"{source}: '{dotted}' {problem}, got {json.dumps(value)}{hint}")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """The validated config: defaults, then the file, then the overrides, then every check that
    needs no data (types, ranges, choices, required keys, combinations, paths, optional packages)."""
    config = defaults()
    if path is not None:
        merge(config, read_config_file(path), str(path))
        check_values(config, str(path))
    for text in overrides:  # each checked as it comes, so that an error names the override at fault
        check_values(config, f"override '{text}'", prefix=apply_override(config, text))
    missing = [dotted for dotted, key in SCHEMA.items() if key.default is REQUIRED and get(config, dotted) is None]
    if missing:
        raise ConfigError(f"{path or 'config'}: these keys must be given (in the file or as key=value): "
                          + ", ".join(missing))
    check_combinations(config)
    return config


def check_combinations(config: dict) -> None:
    """What a run needs beyond each key's own rule: settings that go together, the environment, paths."""
    data = config["data"]
    if data["packed"] and data["task"] == "cpt" and data["max_seq_len"] < 2:
        raise ConfigError(f"'data.max_seq_len' must be at least 2 for packed CPT, got {data['max_seq_len']}")
    if data["task"] == "sft" and not any(data["sft"]["tasks"].values()):
        raise ConfigError("'data.sft.tasks': give at least one task a weight > 0 (asr, tts, continue)")
    if config["model"]["fsdp"] and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ConfigError("'model.fsdp' is true but this is a single process: FSDP shards across processes, so "
                          "start the run with torchrun --nproc N (N >= 2), or set model.fsdp=false")
    if config["train"]["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("'train.device' is cuda but no GPU is visible (use auto or cpu)")
    if config["wandb"]["project"] and importlib.util.find_spec("wandb") is None:
        raise ConfigError("'wandb.project' is set but the wandb package is not installed "
                          "(pip install wandb, or leave wandb.project empty)")
    for dotted in ("run_dir", "data.cache_dir"):
        problem = directory_problem(get(config, dotted)) if get(config, dotted) else None
        if problem:  # a file, a FIFO, a symlink loop: found now, not when the first checkpoint is saved
            raise ConfigError(f"'{dotted}': {problem}")


def describe() -> str:
    """The schema as text, for --help-config."""
    lines = ["Every config key (file: nested JSON objects; command line: dotted.key=value):", ""]
    for dotted, key in SCHEMA.items():
        default = "(required)" if key.default is REQUIRED else json.dumps(key.default)
        lines.append(f"  {dotted} = {default}")
        lines.append(f"      {key.rule or describe_kind(key.kind)}: {key.help}")
    return "\n".join(lines)

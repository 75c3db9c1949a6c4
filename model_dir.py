"""The Hugging Face model directory and the run layout, the one place that names their files:
a model directory's weights (`model.safetensors`, or shards named by `model.safetensors.index.json`),
their checks, saving and loading one, and checking one is complete for a tokenizer; a run's step
directories (this project's `<run>/checkpoints/step_NNNNNNN`, the reference's
`<run>/checkpoints/epoch_E/global_step_N`), where their generations go, and the
`training_config.json` each of this project's checkpoints carries.
"""

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import files
from config import ConfigError
from data.reference_run import EPOCH_DIR as REFERENCE_EPOCH_DIR
from data.reference_run import STEP_DIR as REFERENCE_STEP_DIR
from data.tokenizer import Tokenizer, TokenizerSettingsError, fill_from_tokenizer
from model import DTYPES, Llama, ModelConfig

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER = "original/tokenizer.model"
PARAMS = "original/params.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TRAINING_CONFIG = "training_config.json"
CHECKPOINTS = "checkpoints"
GENERATIONS = "generations"
STEP_DIR = re.compile(r"step_(\d+)")

SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}


# -- weights -----------------------------------------------------------------------------------


def read_weight_index(model_dir) -> dict[str, str]:
    """Tensor name -> shard file, from `model.safetensors.index.json`; each shard must be a file name
    beside the index (a writer of the same layout elsewhere must not write out of its directory)."""
    path = Path(model_dir) / WEIGHTS_INDEX
    weight_map = files.read_json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{path}: missing or empty 'weight_map'")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard:
            raise ValueError(f"{path}: 'weight_map' maps {name} to {json.dumps(shard)}, "
                             "not a file name beside the index")
    return weight_map


def weight_files(model_dir) -> list[Path]:
    """The safetensors files of a model directory: `model.safetensors`, or the shards its index names."""
    model_dir = Path(model_dir)
    if (model_dir / WEIGHTS).exists():
        return [model_dir / WEIGHTS]
    if not (model_dir / WEIGHTS_INDEX).exists():
        raise FileNotFoundError(f"{model_dir}: missing {WEIGHTS} (or {WEIGHTS_INDEX})")
    shards = sorted(set(read_weight_index(model_dir).values()))
    missing = [shard for shard in shards if not (model_dir / shard).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir / WEIGHTS_INDEX}: shard {missing[0]} does not exist")
    return [model_dir / shard for shard in shards]


def check_safetensors(path: Path) -> None:
    """Raises ValueError unless `path` is a complete safetensors file: a readable header, and every
    tensor's bytes inside the file, as many as its dtype and shape need. Reads only the header, so
    a truncated or damaged file is found before any weight is loaded."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= header_len <= size - 8:
            raise ValueError(f"{path}: not a complete safetensors file ({size} bytes, header length unreadable)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}: damaged safetensors header") from None
    data_len = size - 8 - header_len
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(v) for v in info["data_offsets"])
            count = math.prod(int(n) for n in info["shape"]) * SAFETENSORS_DTYPE_BYTES.get(info["dtype"], 0)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: damaged safetensors header entry for {name!r}") from None
        if count and stop - begin != count:  # count 0: a dtype this check does not know
            raise ValueError(f"{path}: tensor {name!r} has {stop - begin} bytes, its dtype and shape need {count}")
        end = max(end, stop)
    if end != data_len:
        raise ValueError(f"{path}: truncated or damaged: its header describes {end} bytes of tensors, "
                         f"the file holds {data_len}")


def check_weights(model_dir) -> None:
    """Raises (ValueError, FileNotFoundError) unless every weight file of `model_dir` is complete."""
    for path in weight_files(model_dir):
        check_safetensors(path)


def load_state_dict(model_dir, device="cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the model directory's weight files; a damaged file is a ValueError naming it."""
    state = {}
    for path in weight_files(model_dir):
        check_safetensors(path)
        state.update(load_file(path, device=str(device)))
    return state


def write_safetensors(state: dict[str, torch.Tensor], path) -> None:
    """One safetensors file that transformers and vLLM load, readable as any file the user creates
    (safetensors itself creates it private, mode 0600, whatever the umask)."""
    with files.atomic_write(path) as tmp:
        save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(tmp), metadata={"format": "pt"})


# -- a model directory -------------------------------------------------------------------------


def save_pretrained(directory, config: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
    """`config.json` and `model.safetensors` of a Hugging Face LlamaForCausalLM directory: train.py's
    checkpoints and the tiny base models of tiny_model.py. A tied head is not in the state dict."""
    files.write_json(Path(directory) / CONFIG, config.to_hf())
    write_safetensors({name: tensor.detach().to("cpu") for name, tensor in weights.items()},
                      Path(directory) / WEIGHTS)


def load_model(model_dir, dtype: torch.dtype | None = None, device="cpu", activation_checkpointing=False) -> Llama:
    """The Llama of a Hugging Face model directory; dtype defaults to config.json's torch_dtype."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_file(model_dir / CONFIG)
    state = load_state_dict(model_dir, device=device)
    return Llama.from_state_dict(config, state, dtype or DTYPES[config.torch_dtype], device,
                                 activation_checkpointing, source=str(model_dir))


def model_tokenizer(model_dir: Path, data: dict) -> Tokenizer:
    """The tokenizer of model directory `model_dir`, after checking that the directory holds a
    complete model (config.json, original/tokenizer.model, intact weights) whose vocabulary
    matches the data settings. The settings the model holds are read from it: `data`'s n_dsus,
    modality_tokens and deduplicate, where None, are set from the tokenizer (`fill_from_tokenizer`);
    given, they must agree with it."""
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: no such model directory")
    for name in (CONFIG, TOKENIZER):
        if not (model_dir / name).is_file():
            raise ConfigError(f"{model_dir}: missing {name} (a model directory from extend.py, or a train.py checkpoint)")
    try:
        files.regular_files_only(model_dir, "original")  # the readers below would block on a FIFO among the weights
        tok = Tokenizer(model_dir / TOKENIZER)
        vocab = ModelConfig.from_file(model_dir / CONFIG).vocab_size
        check_weights(model_dir)
    except (ValueError, OSError) as error:  # TokenizerFileError and ModelConfig's errors are ValueErrors
        raise ConfigError(str(error)) from None
    problems = [] if vocab == tok.vocab_size else [f"config.json vocab_size {vocab} != tokenizer's {tok.vocab_size}"]
    try:
        fill_from_tokenizer(data, tok)
    except TokenizerSettingsError as error:
        problems.append(str(error))
    if problems:
        raise ConfigError(f"{model_dir}: " + "; ".join(problems) + " (extend the model with extend.py --n-dsus N)")
    return tok


# -- a run's step directories ------------------------------------------------------------------


def step_dir(run_dir, step: int) -> Path:
    """Where train.py saves step `step` of a run: `<run>/checkpoints/step_NNNNNNN`."""
    return Path(run_dir) / CHECKPOINTS / f"step_{step:07d}"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's checkpoints (train.py's step directories), oldest first; temporary directories of
    unfinished saves are not. A checkpoints directory, or a step_N in it, that is something else (a
    file, a symlink loop) is refused: read as "no checkpoints", the run would start over and fail at
    its first save."""
    root = Path(run_dir) / CHECKPOINTS
    done = [p for p in root.glob("step_*") if STEP_DIR.fullmatch(p.name)] if root.is_dir() else []
    for path in (root, *done):
        problem = files.directory_problem(path)
        if problem:
            raise ConfigError(f"{problem} (it holds the run's checkpoints): remove it, or choose another run_dir")
    return sorted(done, key=lambda p: int(STEP_DIR.fullmatch(p.name)[1]))


def run_checkpoints(run_dir: Path) -> list[Path]:
    """A run's checkpoints in step order: this project's <run>/checkpoints/step_N and the
    reference's <run>/checkpoints/epoch_E/global_step_N."""
    found = []
    for path in (Path(run_dir) / CHECKPOINTS).glob("*"):
        if STEP_DIR.fullmatch(path.name):
            found.append((int(STEP_DIR.fullmatch(path.name)[1]), path))
        elif REFERENCE_EPOCH_DIR.fullmatch(path.name):
            found += [(int(REFERENCE_STEP_DIR.fullmatch(p.name)[1]), p) for p in path.glob("global_step_*")
                      if REFERENCE_STEP_DIR.fullmatch(p.name)]
    return [path for _, path in sorted(found) if path.is_dir()]


def generations_dir(checkpoint: Path) -> Path | None:
    """`<run>/generations/<N>` for this project's `<run>/checkpoints/step_N`, the reference's
    `<run>/generations/epoch_E/global_step_N` for its `<run>/checkpoints/epoch_E/global_step_N`;
    None for a checkpoint outside a run."""
    absolute = Path(checkpoint).absolute()
    parts = absolute.parts
    if (len(parts) >= 4 and parts[-3] == CHECKPOINTS and REFERENCE_EPOCH_DIR.fullmatch(parts[-2])
            and REFERENCE_STEP_DIR.fullmatch(parts[-1])):
        return absolute.parents[2] / GENERATIONS / parts[-2] / parts[-1]
    resolved = Path(checkpoint).resolve()
    step = STEP_DIR.fullmatch(resolved.name)
    if step and resolved.parent.name == CHECKPOINTS:
        return resolved.parent.parent / GENERATIONS / str(int(step[1]))
    return None


def generations_step(parts: tuple[str, ...]) -> int | None:
    """The checkpoint step of a generations folder, given as its path's parts below `<run>/generations`:
    `<N>/<dataset>/<split>` (this project's) or `epoch_E/global_step_N/<dataset>/<split>` (the
    reference's); None for any other (e.g. an untrained model's, generated elsewhere)."""
    if len(parts) == 3 and parts[0].isdigit():
        return int(parts[0])
    if len(parts) == 4 and REFERENCE_EPOCH_DIR.fullmatch(parts[0]) and REFERENCE_STEP_DIR.fullmatch(parts[1]):
        return int(REFERENCE_STEP_DIR.fullmatch(parts[1])[1])
    return None


# -- the training config a checkpoint carries -------------------------------------------------


def training_config_path(checkpoint: Path) -> Path:
    return Path(checkpoint) / TRAINING_CONFIG


def read_training_config(checkpoint: Path) -> dict:
    """A checkpoint's training_config.json, as a JSON object; any problem is a ConfigError naming it."""
    try:
        return files.read_json(training_config_path(checkpoint))
    except files.JsonFileError as error:
        raise ConfigError(str(error)) from None

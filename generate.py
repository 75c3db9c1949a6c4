"""Generation: transcribe a test split with a trained checkpoint (or speak its transcripts, or
continue its speech), one JSON line per utterance.

    python generate.py run/checkpoints/step_0010000 [--data test.jsonl] [--task asr|tts|continue] [data.key=value ...]
    python generate.py run [...]       (every checkpoint of the run, skipping those already generated)

The prompt is the task's SFT chat prompt up to the assistant header, built exactly as in training
from the checkpoint's training_config.json (n_dsus, deduplication, modality tokens, system prompts,
max_seq_len); `data.key=value` arguments override that data section. Generation is greedy unless
--temperature > 0 and stops at <|eot_id|>, <|eom_id|>, <|end_of_text|> or --max-tokens; for the
speech tasks also at the text modality token, which ends speech.

Backends: vLLM where it imports and has its device (its CPU build on a CPU, its CUDA build with a
GPU visible; `make vllm` installs it in .venv-vllm), else a built-in PyTorch engine (model.py with a
KV cache); both fp32 on CPU, bf16 on GPU. `--backend auto` prints which it took and why.

Output: generations.jsonl and generation_config.json, in <run_dir>/generations/<step>/<dataset>/<split>/
by default (`<split>-tts`, `<split>-continue` for those tasks). One record per utterance, in data
order; token_ids exclude the stop token:
    asr:      {id, reference, text, token_ids, finish_reason, prompt_len}
    tts:      {id, task, text (the transcript given), speech_tokens, reference_speech_tokens, ...}
    continue: {id, task, text (the transcript, for reference), speech_tokens, reference_speech_tokens, ...}
speech_tokens are the DSU indices of the generated speech tokens (merged-unit tokens spelt out),
deduplicated; reference_speech_tokens are the utterance's units (tts) or those after the prompt's
(continue), deduplicated too. `python wer.py` scores both kinds. Existing outputs are never
overwritten without --overwrite. Bad input exits with status 2 and writes nothing.
"""

import argparse
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import config
from config import ConfigError
from data import reference_run
from data.dataset import ASR_FIELDS, DataError, Source, dataset_name, load_rows, split_files
from data.samples import SFT_TASKS, SampleBuilder, continuation_split, deduplicate_runs
from data.tokenizer import Tokenizer
import files
from files import atomic_write
import model_dir
from model import KVCache, Llama, ModelConfig

STOP_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
GENERATIONS, SETTINGS = "generations.jsonl", "generation_config.json"
BACKENDS = ("auto", "vllm", "torch")
# Logits are divided by the temperature and the repetition penalty: past these bounds fp32 logits
# overflow to inf and sampling fails. (vLLM decodes greedily below a temperature of 1e-5.)
MIN_TEMPERATURE = 1e-5
REPETITION_PENALTY_RANGE = (1e-5, 1e5)
MAX_SEED = 2**32 - 1  # vLLM seeds numpy with it, which takes 0..2**32-1


class GenerateError(Exception):
    """Bad input, reported with exit status 2 before anything is written."""


@dataclass(frozen=True)
class Sampling:
    """Decoding settings shared by both backends; temperature 0 is greedy, top_k 0 keeps every token.

    The penalties follow vLLM (and the reference, which generated with it): the repetition penalty
    covers prompt and output tokens, presence and frequency penalties only the tokens generated so far.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output
    seed: int = 0
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated at least once
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated
    stop_token_ids: tuple[int, ...] = ()  # stop tokens besides STOP_TOKENS
    n: int = 1  # samples per prompt

    def __post_init__(self):
        low, high = REPETITION_PENALTY_RANGE
        floats = ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
        problems = [
            *((math.isfinite(getattr(self, name)), f"{name} must be a finite number") for name in floats),
            (self.max_tokens >= 1, "max_tokens must be at least 1"),
            (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE,
             f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (low <= self.repetition_penalty <= high, f"repetition_penalty must be in [{low:g}, {high:g}]"),
            (0 <= self.seed <= MAX_SEED, f"seed must be in 0..{MAX_SEED}"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (all(i >= 0 for i in self.stop_token_ids), "stop token ids must be >= 0"),
            (self.n >= 1, "n must be at least 1"),
            (self.n == 1 or self.temperature > 0,
             "n > 1 needs temperature > 0: greedy decoding would give n identical candidates"),
        ]
        for ok, message in problems:
            if not ok:
                raise ValueError(message)


@dataclass
class Generation:
    token_ids: list[int]  # without the stop token
    finish_reason: str  # "stop" (a stop token) or "length" (max_tokens)


# -- settings ----------------------------------------------------------------------------------


def checked_file(path) -> Path:
    """`path`, when it is a regular file (reading a FIFO or a device would block or never end)."""
    try:
        return files.regular_file(path)
    except files.NotRegularFile as error:
        raise GenerateError(str(error)) from None


def training_config(checkpoint: Path) -> Path | None:
    """The checkpoint's training_config.json, or None when it has none."""
    path = model_dir.training_config_path(checkpoint)
    return checked_file(path) if os.path.lexists(path) else None


def data_settings(checkpoint: Path, overrides: list[str], n_dsus: int | None,
                  from_yaml: dict[str, tuple[object, str]] | None = None) -> dict:
    """The data section that builds the prompts: the checkpoint's training config (or the schema's
    defaults when it has none), then the settings a reference run's YAML gives (`from_yaml`:
    {setting: (value, the file and key)}), then `overrides`, then --n-dsus; each checked against
    the schema, and an error names where the value came from."""
    settings = {"data": config.defaults()["data"]}
    config_path = training_config(checkpoint)
    try:
        if config_path is not None:
            saved = model_dir.read_training_config(checkpoint)
            if not isinstance(saved.get("data"), dict):
                raise ConfigError(f"{config_path}: expected a 'data' object")
            config.merge(settings, {"data": saved["data"]}, str(config_path))
        for setting, (value, where) in (from_yaml or {}).items():
            set_checked(settings, f"data.{setting}", value, where)
        for text in overrides:
            if not text.startswith("data."):
                raise ConfigError(f"override '{text}': only data.* keys apply to generation")
            config.check_values(settings, f"override '{text}'", prefix=config.apply_override(settings, text))
        if n_dsus is not None:
            set_checked(settings, "data.n_dsus", n_dsus, "--n-dsus")
        config.check_values(settings, "generation settings", prefix="data.")
    except ConfigError as error:
        raise GenerateError(str(error)) from None
    return settings["data"]


def set_checked(settings: dict, dotted: str, value, where: str) -> None:
    """Set one schema key to `value`, which `where` gave (a file and key, or an option)."""
    problem = config.SCHEMA[dotted].problem(value)
    if problem is not None:
        raise ConfigError(f"{where}: {problem} (for {dotted}), got {json.dumps(value, default=str)}")
    *parents, leaf = dotted.split(".")
    node = settings
    for parent in parents:
        node = node[parent]
    node[leaf] = value


def load_tokenizer(checkpoint: Path, data: dict) -> Tokenizer:
    """The checkpoint's tokenizer, after checking its files (weights intact) and vocabulary."""
    try:
        return model_dir.model_tokenizer(checkpoint, data)
    except ConfigError as error:
        raise GenerateError(str(error)) from None


def resolve_data_path(data_arg: str | None, split: str, data: dict, checkpoint: Path) -> str:
    """--data, or `<split>.jsonl` beside the training config's data.train."""
    if data_arg:
        if os.path.lexists(data_arg) and not os.path.isdir(data_arg):
            checked_file(data_arg)  # a directory or a glob is the loader's to resolve
        return data_arg
    try:  # the reference's hub dataset, if in the local cache
        cached = reference_run.cached_dataset(checkpoint)
    except reference_run.ReferenceError as error:
        raise GenerateError(str(error)) from None
    if cached is not None:
        return str(cached)
    if training_config(checkpoint) is None:
        raise GenerateError(f"{checkpoint}: no {model_dir.TRAINING_CONFIG} to find the test data from; pass --data PATH")
    if not data["train"]:
        raise GenerateError(
            f"{model_dir.training_config_path(checkpoint)}: no data.train to find {split}.jsonl beside; pass --data PATH"
        )
    if Path(data["train"]).is_dir() and split_files(Path(data["train"])) is not None:
        return data["train"]  # a dataset directory holds every split; Source picks this one
    path = Path(data["train"]).parent / f"{split}.jsonl"
    if not os.path.lexists(path):
        raise GenerateError(
            f"{path}: no such file (the {split} split is looked for beside data.train {data['train']}); "
            "pass --data PATH"
        )
    return str(checked_file(path))


def default_out_dir(checkpoint: Path, data_path: str, split: str, task: str = "asr") -> Path:
    """`<run_dir>/generations/<step>/<dataset>/<split>` for `<run_dir>/checkpoints/step_N`, the
    reference's `<run>/generations/epoch_E/global_step_N/<dataset>/<split>` for its
    `<run>/checkpoints/epoch_E/global_step_N`, else `<checkpoint>/generations/<dataset>/<split>`;
    the dataset is named by the data's directory (data.dataset.dataset_name). Tasks other than ASR
    write to `<split>-<task>`."""
    dataset = dataset_name(data_path)
    split = split if task == "asr" else f"{split}-{task}"
    in_run = model_dir.generations_dir(checkpoint)
    if in_run is not None:
        return in_run / dataset / split
    return checkpoint.resolve() / "generations" / dataset / split


# -- prompts -----------------------------------------------------------------------------------


def build_prompts(rows: list[dict], tok: Tokenizer, data: dict, limit: int | None = None,
                  limit_name: str = "", task: str = "asr") -> list[list[int]]:
    """The SFT inference prompt of `task` (system, user = the DSUs for ASR, assistant header) of every row.

    Prompts are never shortened: one longer than `limit` (described by `limit_name`) is an error.
    """
    builder = SampleBuilder(tok, deduplicate=data["deduplicate"], modality_tokens=data["modality_tokens"],
                            max_seq_len=None)
    prompts = []
    for row in rows:
        tokens, _ = builder.assemble(builder.sft_pieces(task, row, data["sft"], inference=True))
        if limit is not None and len(tokens) > limit:
            raise GenerateError(
                f"utterance {row['id']!r}: its prompt has {len(tokens)} tokens, more than {limit_name or limit}"
            )
        prompts.append(tokens.tolist())
    return prompts


# -- built-in engine ---------------------------------------------------------------------------


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator, seen: torch.Tensor | None,
                counts: torch.Tensor | None = None):
    """(B,) next ids from fp32 (B, V) logits: repetition penalty (`seen`: prompt and output tokens),
    frequency and presence penalties (`counts`: output tokens), then greedy, or temperature,
    top-k and top-p (the smallest set of most likely tokens whose probability reaches top_p)."""
    if seen is not None:
        penalized = torch.where(logits > 0, logits / sampling.repetition_penalty, logits * sampling.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if counts is not None:
        logits = logits - sampling.frequency_penalty * counts - sampling.presence_penalty * (counts > 0)
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= sampling.top_p  # the mass before it already reaches top_p
        logits = logits.scatter(1, order, ordered.masked_fill(outside, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate_batch(model: Llama, prompts: list[list[int]], sampling: Sampling, stop_ids, generator) -> list[Generation]:
    """One batch: left-padded prefill, then one cached decode step per new token; rows that stop
    are dropped from the batch (and the cache) so the rest run at the smaller size."""
    device = model.head_weight.device
    lengths = torch.tensor([len(p) for p in prompts])
    width = int(lengths.max())
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = torch.tensor(prompt)
    cache = KVCache(model.config, width - lengths, width + sampling.max_tokens, model.head_weight.dtype, device)
    hidden = model(tokens.to(device), cache=cache)[:, -1]
    seen = None
    if sampling.repetition_penalty != 1:
        seen = torch.zeros(len(prompts), model.config.vocab_size, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            seen[row, prompt] = True
    counts = None
    if sampling.presence_penalty or sampling.frequency_penalty:
        counts = torch.zeros(len(prompts), model.config.vocab_size, device=device)

    outputs = [Generation([], "length") for _ in prompts]
    live = list(range(len(prompts)))  # the prompt index of each row still in the batch
    for step in range(sampling.max_tokens):
        chosen = next_tokens(model.logits(hidden).float(), sampling, generator, seen, counts)
        keep = []
        for row, (index, token) in enumerate(zip(live, chosen.tolist())):
            if token in stop_ids:
                outputs[index].finish_reason = "stop"
            else:
                outputs[index].token_ids.append(token)
                keep.append(row)
        if not keep or step == sampling.max_tokens - 1:
            break
        if len(keep) < len(live):
            rows = torch.tensor(keep, device=device)
            cache.keep(rows)
            chosen = chosen[rows]
            seen = None if seen is None else seen[rows]
            counts = None if counts is None else counts[rows]
            live = [live[row] for row in keep]
        if seen is not None:
            seen[torch.arange(len(live), device=device), chosen] = True
        if counts is not None:
            counts[torch.arange(len(live), device=device), chosen] += 1
        hidden = model(chosen[:, None], cache=cache)[:, -1]
    return outputs


def generate(model: Llama, prompts: list[list[int]], sampling: Sampling, stop_ids, batch_size: int = 32,
             progress: tqdm | None = None) -> list[Generation]:
    """sampling.n generations for each of `prompts`, prompt by prompt (all n of the first prompt, then
    the second's, ...), from batches of prompts of similar length; n > 1 repeats each prompt n times."""
    generator = torch.Generator(device=model.head_weight.device).manual_seed(sampling.seed)
    stop_ids = set(stop_ids)
    prompts = [prompt for prompt in prompts for _ in range(sampling.n)]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: memory errors come early
    results: list[Generation | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        outputs = generate_batch(model, [prompts[i] for i in batch], sampling, stop_ids, generator)
        for index, result in zip(batch, outputs):
            results[index] = result
        if progress is not None:
            progress.update(len(batch))
    return results


def load_model(checkpoint: Path, device: torch.device) -> Llama:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return model_dir.load_model(checkpoint, dtype=dtype, device=device).eval()
    except (ValueError, FileNotFoundError) as error:
        raise GenerateError(str(error)) from None


# -- vLLM --------------------------------------------------------------------------------------

VLLM_BLOCK = 128  # tokens per KV-cache block: vLLM's CPU default, and a multiple of its GPU one (16)
VLLM_MAX_SEQS = 256  # sequences vLLM decodes at once (its default on CPUs and smaller GPUs)


def quiet_vllm() -> None:
    """vLLM's log lines (hundreds, warnings about optional CPU libraries among them) bury ours:
    errors only, unless VLLM_LOGGING_LEVEL is set. Before vLLM is imported; its workers inherit it."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # its CPU worker's NUMA notice
    warnings.filterwarnings("ignore", category=FutureWarning, module="vllm")  # deprecated torch names it probes
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")  # ... in its engine processes too


def vllm_status(device: str = "auto") -> tuple[bool, str]:
    """Whether vLLM imports and has a device to run on here (its CPU build on a CPU, its CUDA
    build on a visible GPU), and why, in words."""
    quiet_vllm()
    try:
        import vllm
        from vllm.platforms import current_platform
    except ImportError as error:
        return False, f"vLLM is not installed ({error}); 'make vllm' makes an environment with it, .venv-vllm"
    except Exception as error:  # e.g. a torchvision wheel built for another torch: see requirements-vllm.txt
        return False, f"vLLM does not import: {type(error).__name__}: {error}"
    version = getattr(vllm, "__version__", "?")
    if current_platform.is_cpu():
        if device == "cuda":
            return False, f"--device cuda, but vLLM {version} is its CPU build"
        return True, f"vLLM {version}, CPU build"
    if current_platform.is_cuda_alike() and torch.cuda.is_available():
        if device == "cpu":
            return False, f"--device cpu, but vLLM {version} is a GPU build"
        return True, f"vLLM {version} on {torch.cuda.get_device_name()}"
    return False, f"vLLM {version} is a GPU build and no GPU is visible"


def vllm_device() -> str:
    from vllm.platforms import current_platform
    return "cpu" if current_platform.is_cpu() else "cuda"


def kv_cache_bytes(checkpoint: Path, prompts: list[list[int]], sampling: Sampling, dtype: torch.dtype) -> int:
    """KV-cache memory for every sequence of the run at once (up to VLLM_MAX_SEQS of them), each
    rounded up to whole blocks plus one: vLLM's default of 92% of the machine's memory is refused on
    a CPU with anything else running, and on a GPU leaves nothing to other processes."""
    try:
        config = ModelConfig.from_file(checkpoint / model_dir.CONFIG)
    except (ValueError, FileNotFoundError) as error:
        raise GenerateError(str(error)) from None
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize
    lengths = sorted((len(p) + sampling.max_tokens for p in prompts for _ in range(sampling.n)), reverse=True)
    blocks = sum(-(-length // VLLM_BLOCK) + 1 for length in lengths[:VLLM_MAX_SEQS])
    return blocks * VLLM_BLOCK * per_token


def start_vllm(checkpoint: Path, prompts: list[list[int]], sampling: Sampling, kv_cache_mib: int | None = None,
               enforce_eager: bool = False):
    """A vLLM engine for `checkpoint`, sized for `prompts` with `sampling`: its longest sequence and,
    unless `kv_cache_mib` says otherwise, the KV cache that all of them need."""
    quiet_vllm()
    from vllm import LLM

    dtype = torch.float32 if vllm_device() == "cpu" else torch.bfloat16  # as the built-in engine on that device
    kv_bytes = kv_cache_mib * 2**20 if kv_cache_mib else kv_cache_bytes(checkpoint, prompts, sampling, dtype)
    return LLM(
        model=str(checkpoint),
        skip_tokenizer_init=True,
        dtype=str(dtype).removeprefix("torch."),
        seed=sampling.seed,
        max_model_len=max(map(len, prompts)) + sampling.max_tokens,
        kv_cache_memory_bytes=kv_bytes,
        max_num_seqs=VLLM_MAX_SEQS,  # what kv_cache_bytes counts on
        enforce_eager=enforce_eager,  # no compilation: start-up on a CPU drops from minutes to under one
        use_tqdm_on_load=False,
    )


def vllm_generate(llm, prompts: list[list[int]], sampling: Sampling, stop_ids) -> list[Generation]:
    """sampling.n generations per prompt, prompt by prompt (as `generate`), all prompts in one call
    as token ids (no tokenizer: ours is not a Hugging Face one)."""
    from vllm import SamplingParams

    params = SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k or -1,  # -1: every token, in every vLLM version
        repetition_penalty=sampling.repetition_penalty,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        # A seed per request where it works; vLLM 0.32's CPU build crashes on one ("CPU Generator does not
        # use offset") when a prompt is prefilled in chunks, so there the engine's seed (start_vllm) alone.
        seed=sampling.seed if sampling.temperature > 0 and vllm_device() != "cpu" else None,
        max_tokens=sampling.max_tokens,
        stop_token_ids=sorted(stop_ids),
        detokenize=False,
    )
    results = []
    for output in llm.generate([{"prompt_token_ids": prompt} for prompt in prompts], params, use_tqdm=False):
        for completion in sorted(output.outputs, key=lambda c: c.index):
            ids = list(completion.token_ids)
            if ids and ids[-1] in stop_ids:
                ids.pop()  # vLLM returns the stop token; the built-in engine does not
            results.append(Generation(ids, "stop" if completion.finish_reason == "stop" else "length"))
    return results


def generate_vllm(checkpoint: Path, prompts: list[list[int]], sampling: Sampling, stop_ids,
                  kv_cache_mib: int | None = None, enforce_eager: bool = False) -> tuple[list[Generation], float]:
    """`vllm_generate` with an engine started for the purpose, and that engine's start-up seconds."""
    started = time.perf_counter()
    llm = start_vllm(checkpoint, prompts, sampling, kv_cache_mib, enforce_eager)
    startup = time.perf_counter() - started
    try:
        return vllm_generate(llm, prompts, sampling, stop_ids), startup
    finally:
        stop_vllm(llm)


def stop_vllm(llm) -> None:
    """End the engine's processes now, not at exit: a run's next checkpoint would start its engine beside them."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()


# -- the stage ---------------------------------------------------------------------------------


def choose_backend(name: str, device: str = "auto") -> tuple[str, str]:
    """The backend to run and why: --backend auto takes vLLM where it can run, else the built-in engine."""
    if name == "torch":
        return "torch", "--backend torch"
    usable, why = vllm_status(device)
    if name == "vllm" and not usable:
        raise GenerateError(f"--backend vllm: {why}; use --backend torch for the built-in engine")
    if usable:
        return "vllm", why
    return "torch", f"the built-in engine, as {why}"


def choose_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise GenerateError("--device cuda: no GPU is visible")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Before any work: the output directory can be created, and holds no generations unless --overwrite."""
    problem = files.directory_problem(out_dir)  # a file or a symlink loop in the way
    if problem is not None:
        raise GenerateError(f"{problem} (the output directory)")
    if not overwrite and os.path.lexists(out_dir / GENERATIONS):
        raise GenerateError(f"{out_dir / GENERATIONS}: already exists; pass --overwrite or choose another --out")


def write_outputs(out_dir: Path, records: list[dict], settings: dict, overwrite: bool) -> None:
    """Each file written atomically, generations.jsonl last: it marks a complete output."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not overwrite and (out_dir / GENERATIONS).exists():
        raise GenerateError(f"{out_dir / GENERATIONS}: appeared while generating; refusing to overwrite it")
    contents = {
        SETTINGS: json.dumps(settings, indent=2, ensure_ascii=False) + "\n",
        GENERATIONS: "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records),
    }
    for name, text in contents.items():
        with atomic_write(out_dir / name) as temporary:
            temporary.write_text(text, encoding="utf-8")


def prompt_limit(checkpoint: Path, data: dict, overrides: list[str], max_tokens: int) -> tuple[int, str]:
    """No limit of training's: the model's max_position_embeddings, less room for --max-tokens, or
    data.max_seq_len when given on the command line (as the reference's tokenizer.max_seq_len)."""
    try:
        positions = files.read_json(checkpoint / model_dir.CONFIG)["max_position_embeddings"]
    except (files.JsonFileError, KeyError):
        raise GenerateError(f"{checkpoint / 'config.json'}: no max_position_embeddings") from None
    limit = positions - max_tokens
    name = f"the model's max_position_embeddings={positions} less --max-tokens={max_tokens}"
    asked = data["max_seq_len"]  # checked against the schema: an integer > 0, never a boolean
    if any(text.startswith("data.max_seq_len=") for text in overrides) and asked < limit:
        limit, name = asked, f"data.max_seq_len={asked} (given on the command line)"
    return limit, name


def run(args: argparse.Namespace, skip_done: bool = False) -> Path | None:
    """Generate for the checkpoint args.checkpoint; with `skip_done`, return None at once when its
    output already exists (run mode), rather than refusing to overwrite it."""
    try:
        sampling = Sampling(args.max_tokens, args.temperature, args.top_p, args.top_k, args.repetition_penalty,
                            args.seed, args.presence_penalty, args.frequency_penalty, tuple(args.stop_token_ids), args.n)
    except ValueError as error:
        raise GenerateError(str(error)) from None
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        raise GenerateError(f"{checkpoint}: checkpoint directory does not exist")
    try:  # a reference checkpoint's settings come from its torchtune_config.yaml, under the command line's
        from_yaml, sources = reference_run.generation_settings(checkpoint, args.overrides, args.n_dsus)
    except reference_run.ReferenceError as error:
        raise GenerateError(str(error)) from None
    data = data_settings(checkpoint, args.overrides, args.n_dsus, from_yaml)
    from_model = [key for key in ("n_dsus", "modality_tokens", "deduplicate") if data[key] is None]
    tok = load_tokenizer(checkpoint, data)  # fills in what the model holds
    sources = {**sources, **{key: "the model's tokenizer" for key in from_model}}
    if "deduplicate" in from_model:  # the model holds it only in a speech BPE
        sources["deduplicate"] = "the model's speech BPE" if tok.dsu_bpe is not None else "train.py default"
    for line in reference_run.describe_settings(data, sources):
        print(f"generate: {line}", file=sys.stderr)
    data_path = resolve_data_path(args.data, args.split, data, checkpoint)
    out_dir = Path(args.out) if args.out else default_out_dir(checkpoint, data_path, args.split, args.task)
    if skip_done and (out_dir / GENERATIONS).exists():
        print(f"generate: {checkpoint.name}: done already ({out_dir / GENERATIONS})", file=sys.stderr)
        return None
    check_out_dir(out_dir, args.overwrite)
    vocab_size = ModelConfig.from_file(checkpoint / model_dir.CONFIG).vocab_size  # load_tokenizer checked it
    outside = [i for i in sampling.stop_token_ids if i >= vocab_size]
    if outside:
        raise GenerateError(f"--stop-token-ids {outside}: outside the model's vocabulary (vocab_size {vocab_size})")
    rows = load_rows(Source(data_path, args.split, data.get("columns")), n_dsus=data["n_dsus"], fields=ASR_FIELDS)
    if not rows:
        raise DataError(f"{data_path}: no rows")
    try:
        prompts = build_prompts(rows, tok, data, *prompt_limit(checkpoint, data, args.overrides, args.max_tokens),
                                task=args.task)
    except GenerateError as error:
        raise GenerateError(f"{data_path}: {error}") from None
    if data["task"] != "sft" and training_config(checkpoint) is not None:
        print(f"generate.py: warning: the checkpoint was trained with data.task={data['task']!r}; "
              "prompts use the SFT chat format", file=sys.stderr)
    if args.task != "asr" and not data["sft"]["tasks"][args.task]:
        print(f"generate.py: warning: the checkpoint was not trained on the {args.task} task "
              f"(data.sft.tasks.{args.task} is 0)", file=sys.stderr)

    backend, why = choose_backend(args.backend, args.device)
    stop_ids = {tok.special_ids[name] for name in STOP_TOKENS} | set(sampling.stop_token_ids)
    if args.task != "asr" and data["modality_tokens"]:
        stop_ids.add(tok.text_id)  # the end of speech
    started, startup = time.perf_counter(), None
    print(f"generate: backend {backend} ({why})", file=sys.stderr)
    print(f"generate: {len(rows)} utterances from {data_path} with {backend}, {checkpoint}", file=sys.stderr)
    if backend == "vllm":
        device = vllm_device()
        generations, startup = generate_vllm(checkpoint, prompts, sampling, stop_ids, args.kv_cache_mib,
                                             args.enforce_eager)
    else:
        device = choose_device(args.device)
        model = load_model(checkpoint, device)
        with tqdm(total=len(prompts) * sampling.n, desc="generate", unit="seq", dynamic_ncols=True) as progress:
            generations = generate(model, prompts, sampling, stop_ids, args.batch_size, progress)
    elapsed = time.perf_counter() - started

    def fields(result: Generation) -> dict:
        if args.task == "asr":
            out = {"text": tok.decode(result.token_ids, keep_special=False).strip()}
        else:
            out = {"speech_tokens": deduplicate_runs(np.array(tok.units(result.token_ids), dtype=np.int64)).tolist()}
        return {**out, "token_ids": result.token_ids, "finish_reason": result.finish_reason}

    records = []
    for index, (row, prompt) in enumerate(zip(rows, prompts)):
        mine = generations[index * sampling.n : (index + 1) * sampling.n]
        given = {"reference": row["transcript"]} if args.task == "asr" else speech_reference(row, args.task, data)
        record = {"id": row["id"], **given, **fields(mine[0]), "prompt_len": len(prompt)}
        if sampling.n > 1:  # all n samples; the first is also the record's text
            record["candidates"] = [fields(result) for result in mine]
        records.append(record)
    settings = {
        "checkpoint": str(checkpoint.resolve()),
        "data_path": str(Path(data_path).resolve()),
        "split": args.split,
        "task": args.task,
        "backend": backend,
        "device": str(device),
        "batch_size": args.batch_size if backend == "torch" else None,
        **asdict(sampling),
        "stop_token_ids": sorted(stop_ids),
        "data": data,
        "n_utterances": len(records),
        "generated_tokens": sum(len(r.token_ids) for r in generations),
        "elapsed_s": round(elapsed, 3),
        "engine_startup_s": None if startup is None else round(startup, 3),
        "enforce_eager": args.enforce_eager if backend == "vllm" else None,
    }
    write_outputs(out_dir, records, settings, args.overwrite)
    print(f"generate: wrote {out_dir / GENERATIONS} ({settings['generated_tokens']} tokens in {elapsed:.1f} s"
          + ("" if startup is None else f", of which {startup:.1f} s engine start-up") + ")", file=sys.stderr)
    return out_dir


def speech_reference(row: dict, task: str, data: dict) -> dict:
    """What a speech task's record holds of its row: the task, the transcript, and the units it
    should produce (deduplicated): the utterance's (tts), or those after the prompt's (continue)."""
    units = np.asarray(row["speech_tokens"], dtype=np.int64)
    if task == "continue":
        units = units[continuation_split(units, data["sft"]["continue_fraction"]):]
    return {"task": task, "text": row["transcript"], "reference_speech_tokens": deduplicate_runs(units).tolist()}


def run_all(args: argparse.Namespace) -> None:
    """Every checkpoint of the run args.checkpoint, oldest first, skipping those with generations:
    run it again after a crash (or after training saved more checkpoints) and it goes on from there."""
    run_dir = Path(args.checkpoint)
    if args.out:
        raise GenerateError("--out names one checkpoint's output; a run's go to <run>/generations/<step>/...")
    if args.overwrite:
        raise GenerateError("--overwrite with a run directory: remove the generations to redo instead")
    checkpoints = model_dir.run_checkpoints(run_dir)
    if not checkpoints:
        raise GenerateError(f"{run_dir}: no checkpoints (checkpoints/step_N or checkpoints/epoch_E/global_step_N)")
    print(f"generate: {len(checkpoints)} checkpoints in {run_dir}", file=sys.stderr)
    for checkpoint in checkpoints:
        run(argparse.Namespace(**{**vars(args), "checkpoint": str(checkpoint)}), skip_done=True)


def is_run_dir(path: Path) -> bool:
    return (path / model_dir.CHECKPOINTS).is_dir() and not (path / model_dir.CONFIG).exists()


# -- command line ------------------------------------------------------------------------------


def id_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Test data: --data PATH when given; otherwise <split>.jsonl in the directory of the training\n"
        "config's data.train (so --split test reads test.jsonl beside the training file).\n"
        "A reference implementation checkpoint takes n_dsus, deduplicate, modality tokens and the system\n"
        "prompt from its run's torchtune_config.yaml, and its data from the local hub cache when there.\n"
        "Another checkpoint with no training_config.json (e.g. from extend.py) needs --data and --n-dsus;\n"
        "its other data settings take the training schema's defaults (python train.py --help-config)\n"
        "unless overridden with data.key=value.\n"
        "Prompts are never cut; past the model's max_position_embeddings (or data.max_seq_len=N when\n"
        "given on the command line) they are an error.",
    )
    parser.add_argument("checkpoint",
                        help="checkpoint directory (Hugging Face layout), e.g. run/checkpoints/step_0001000, or a run "
                        "directory: every checkpoint of it, skipping those already generated")
    parser.add_argument("overrides", nargs="*", help="data.key=value overrides of the training config's data section")
    parser.add_argument("--data",
                        help="test data (JSONL or Parquet file, directory or glob); see below for the default")
    parser.add_argument("--task", choices=SFT_TASKS, default="asr",
                        help="asr: transcribe the speech; tts: speak the transcript as units; continue: the units "
                        "after the first data.sft.continue_fraction of them (default: asr)")
    parser.add_argument("--split", default="test",
                        help="split name, for the default data file and output directory (default: test)")
    parser.add_argument("--out", help="output directory (default: <run_dir>/generations/<step>/<dataset>/<split>, "
                        "<split>-<task> for tts and continue)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="auto: vLLM where it imports and has its device (CPU build, or CUDA build and a GPU), "
                        "else the built-in engine (default: auto)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="device of the built-in engine (default: auto)")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per batch, built-in engine (default: 32)")
    parser.add_argument("--max-tokens", type=int, default=256, help="most new tokens per utterance (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy, else at least 1e-5 (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1)")
    parser.add_argument("--top-k", type=int, default=0,
                        help="sample among the k most likely tokens; 0: all (default: 0)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 is none (default: 1)")
    parser.add_argument("--presence-penalty", type=float, default=0.0,
                        help="subtracted from the logits of tokens generated so far, in [-2, 2] (default: 0)")
    parser.add_argument("--frequency-penalty", type=float, default=0.0,
                        help="subtracted per time a token was generated so far, in [-2, 2] (default: 0)")
    parser.add_argument("--stop-token-ids", type=id_list, default=[], metavar="ID,ID",
                        help="more token ids that end a generation, comma-separated, besides <|eot_id|>, "
                        "<|eom_id|> and <|end_of_text|>")
    parser.add_argument("--n", type=int, default=1,
                        help="samples per utterance, with --temperature > 0; all go in 'candidates' (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, 0..2**32-1 (default: 0)")
    parser.add_argument("--kv-cache-mib", type=int,
                        help="vLLM's KV-cache memory in MiB (default: what this run's sequences need)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="vLLM without torch.compile: a faster start (about 1 min less on a 2-core CPU), "
                        "slower decoding")
    parser.add_argument("--n-dsus", type=int,
                        help="number of DSUs, same as data.n_dsus=N: a check, as the model's tokenizer holds it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing generations.jsonl")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.kv_cache_mib is not None and args.kv_cache_mib < 1:
        parser.error("--kv-cache-mib must be at least 1")
    if not re.fullmatch(r"[\w.-]+", args.split):
        parser.error("--split must be a plain name (letters, digits, '_', '-', '.')")
    try:
        if is_run_dir(Path(args.checkpoint)):
            run_all(args)
        else:
            run(args)
    except (GenerateError, DataError) as error:
        print(f"generate.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Extend a Llama 3.x model directory (Hugging Face layout) with discrete speech unit (DSU) tokens.

    python extend.py --base DIR --n-dsus N [--no-modality-tokens] [--out DIR] [--seed S]
                     [--dsu-bpe M --dsu-bpe-data DATA [--no-deduplicate] [--dsu-bpe-init mean|gaussian]]

Writes the layout of docs/DESIGN.md, "Token layout": the tokenizer file gets N DSU ranks (and the text and
speech modality tokens) after its V ranks, so the 256 special tokens move up behind them; the
embedding rows (and an untied output head's) follow the same order, with the new rows sampled
around the base rows; config.json, generation_config.json and original/params.json get the new
vocabulary size and special-token ids. Weights are streamed tensor by tensor from the safetensors
file(s) to the output, keeping the input's sharding, so memory stays far below twice the checkpoint.

How the new rows are made follows the reference (speech-integration, ssi/extend_llama3_2 and
scripts/extend_llama3_2.py): the "base rows" whose statistics are used are only the V tokenizer-file
rows, not the 256 special-token rows, and the covariance is scaled by 1e-5. The reference only
handled tied Llama 3.2 heads; for an untied `lm_head.weight` we do what the same author's Hugging
Face extension script (for TinyLlama, in sardalign) did: sample the head's new rows from the
statistics of the head's own rows. The samples are not bit-identical to the reference's (it drew
through torch.distributions with a global seed); their distribution is the same.

Speech BPE (`--dsu-bpe M`, this project's own extension): a sentencepiece BPE of M merged-unit
tokens is learnt from the `speech_tokens` of DATA (deduplicated unless --no-deduplicate), each
unit one private-use character, with no normalisation and no whitespace or script splitting, so any
unit sequence encodes losslessly. It is written to original/dsu_bpe.model with its settings in
original/dsu_bpe.json (`deduplicate` among them: training and generation read it from there, as
data.deduplicate); the merged tokens follow the modality tokens (before the special tokens), in
the BPE's piece order, each in tokenizer.model as the string of its units. Their embedding rows are
drawn like the DSU rows (`gaussian`, the default: on the demo recipe it reached a lower dev loss at
every evaluation than `mean`, bench/RESULTS.md "Speech BPE") or are the mean of their units' rows.
"""

import argparse
import io
import json
import os
import re
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from data.dataset import DataError, iter_rows
from data.samples import SEED, deduplicate_runs
from data.tokenizer import (
    DSU_BPE_MODEL,
    DSU_BPE_SETTINGS,
    LLAMA3_SPECIAL_TOKENS,
    MAX_DSUS,
    DsuBpe,
    TokenizerFileError,
    bpe_lines,
    extended_tokenizer_bytes,
    extension_tokens,
    read_bpe_file,
    units_text,
)
import files
from files import atomic_write, write_json
from model_dir import (CONFIG, GENERATION_CONFIG, PARAMS, SAFETENSORS_DTYPE_BYTES, TOKENIZER, WEIGHTS, WEIGHTS_INDEX,
                       read_weight_index)

DEFAULT_SEED = SEED  # the reference's seed, as for everything it draws
MAX_SEED = 2**63 - 1  # the head's generator takes seed + 1, and torch takes seeds below 2**64
MAX_SENTENCEPIECE_VOCAB = 2**31 - 1  # sentencepiece's vocabulary size is a 32-bit integer
COVARIANCE_SCALE = 1e-5
STATS_CHUNK_ROWS = 8192  # rows converted to fp32 at a time for the mean and covariance

BPE_INITS = ("mean", "gaussian")
EMBEDDING = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")

# Not copied: Hugging Face tokenizer files describe the base vocabulary (a stale tokenizer.json would
# silently tokenize without DSUs and with the old special ids), and weight files other than the
# safetensors we rewrite (Meta's original/consolidated.*.pth, *.bin) still have the old vocabulary.
STALE_TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
STALE_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")

class ExtendError(Exception):
    """Bad input: the script reports it and exits with status 2, having written nothing."""


@dataclass(frozen=True)
class VocabLayout:
    n_file_ranks: int  # V: ranks in the base tokenizer file
    n_new: int  # DSUs, plus 2 with modality tokens
    n_merged: int = 0  # speech-BPE merged-unit tokens, after those

    @property
    def old_size(self) -> int:
        return self.n_file_ranks + len(LLAMA3_SPECIAL_TOKENS)

    @property
    def new_size(self) -> int:
        return self.old_size + self.n_new + self.n_merged

    def new_id(self, old_id: int, where: str) -> int:
        """Where a base token id lands: file ranks stay put, special tokens move up by n_new."""
        if isinstance(old_id, bool) or not isinstance(old_id, int) or not 0 <= old_id < self.old_size:
            raise ExtendError(f"{where}: token id {old_id!r} is not in the base vocabulary 0..{self.old_size - 1}")
        return old_id if old_id < self.n_file_ranks else old_id + self.n_new + self.n_merged


@dataclass(frozen=True)
class SpeechBpe:
    """A learnt speech BPE: the files it is written as, and each merged token's units in piece order."""

    model: bytes
    settings: dict
    merged_units: list[np.ndarray]
    init: str  # how the merged tokens' embedding rows are made: BPE_INITS


def learn_speech_bpe(data: str, n_dsus: int, merges: int, deduplicate: bool, init: str) -> SpeechBpe:
    """Learn `merges` merged-unit tokens from the speech_tokens of `data`, in memory (nothing written)."""
    import sentencepiece

    most = MAX_SENTENCEPIECE_VOCAB - 1 - n_dsus  # the unknown piece and every unit come first
    if not 1 <= merges <= most:
        raise ExtendError(f"--dsu-bpe must be in 1..{most} (sentencepiece's vocabulary is at most 2**31-1 pieces), "
                          f"got {merges}")
    try:
        texts = [units_text(deduplicate_runs(r["speech_tokens"]) if deduplicate else r["speech_tokens"])
                 for r in iter_rows(data, n_dsus=n_dsus, fields=("speech_tokens",), unique_ids=False)]
    except DataError as e:
        raise ExtendError(f"--dsu-bpe-data: {e}") from None
    texts = [t for t in texts if t]
    if not texts:
        raise ExtendError(f"--dsu-bpe-data {data}: no speech_tokens to learn a BPE from")
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, model_type="bpe",
            vocab_size=1 + n_dsus + merges,  # the unknown piece, every unit (required_chars), the merges
            required_chars="".join(chr(0xF0000 + i) for i in range(n_dsus)), character_coverage=1.0,
            normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
            split_by_whitespace=False, split_by_unicode_script=False, split_by_number=False,
            bos_id=-1, eos_id=-1, unk_id=0, max_sentence_length=1 << 30, num_threads=1, minloglevel=2,
        )
    except RuntimeError as e:
        largest = re.search(r"value <= (\d+)", str(e))
        if largest:
            supported = int(largest.group(1)) - 1 - n_dsus
            how_many = f"at most {supported} merged tokens" if supported > 0 else "no merged token"
            raise ExtendError(f"--dsu-bpe {merges}: the speech_tokens of {data} support {how_many}") from None
        raise ExtendError(f"--dsu-bpe-data {data}: sentencepiece could not learn the BPE ({e})") from None
    settings = {"n_dsus": n_dsus, "merges": merges, "deduplicate": deduplicate, "model_type": "bpe",
                "embedding_init": init, "data": str(data), "sequences": len(texts),
                "sentencepiece": sentencepiece.__version__}
    try:
        bpe = DsuBpe(model.getvalue(), settings, "the learnt BPE")
    except TokenizerFileError as e:
        raise ExtendError(str(e)) from None
    units = [np.array([ord(c) - 0xF0000 for c in piece]) for piece in bpe.merged]
    return SpeechBpe(model.getvalue(), settings, units, init)


def default_out_dir(base_dir: Path, n_dsus: int, modality_tokens: bool) -> Path:
    """`<base>-<N>-dsus[-no_modality_tokens]` beside the base, as the reference names them."""
    base_dir = Path(os.path.abspath(base_dir))  # so that "." names the directory itself
    name = f"{base_dir.name}-{n_dsus}-dsus" + ("" if modality_tokens else "-no_modality_tokens")
    return base_dir.parent / name


def load_json(path: Path) -> dict:
    try:
        return files.read_json(path)
    except files.JsonFileError as e:
        raise ExtendError(str(e)) from None


def tensor_names(path: Path) -> list[str]:
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except SafetensorError as e:
        raise ExtendError(f"{path}: not a readable safetensors file ({e})") from None


def regular_file(path: Path) -> Path:
    """`path`, when it is a regular file: a FIFO or a device would block or never end."""
    try:
        return files.regular_file(path)
    except files.NotRegularFile as e:
        raise ExtendError(str(e)) from None


def weight_shards(base_dir: Path) -> dict[str, list[str]]:
    """Safetensors file name -> the tensor names it holds; a single file is preferred, as transformers does."""
    if os.path.lexists(base_dir / WEIGHTS):
        return {WEIGHTS: tensor_names(regular_file(base_dir / WEIGHTS))}
    if not os.path.lexists(base_dir / WEIGHTS_INDEX):
        raise ExtendError(f"{base_dir}: no {WEIGHTS} or {WEIGHTS_INDEX}")
    try:  # each shard a file name beside the index: the same name is written in the output directory
        weight_map = read_weight_index(base_dir)
    except ValueError as e:  # files.JsonFileError too
        raise ExtendError(str(e)) from None
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(shard, []).append(name)
    for shard, names in shards.items():
        if not os.path.lexists(base_dir / shard):
            raise ExtendError(f"{base_dir / WEIGHTS_INDEX}: shard {shard} listed in 'weight_map' does not exist")
        if set(tensor_names(regular_file(base_dir / shard))) != set(names):
            raise ExtendError(f"{base_dir / shard}: its tensors differ from those {WEIGHTS_INDEX} maps to it")
    return shards


def tensor_shape(base_dir: Path, shards: dict[str, list[str]], name: str) -> list[int] | None:
    for shard, names in shards.items():
        if name in names:
            with safe_open(base_dir / shard, framework="pt") as f:
                return f.get_slice(name).get_shape()
    return None


def check_vocabulary(base_dir: Path, config: dict, params: dict, shards: dict, layout: VocabLayout) -> list[str]:
    """Names of the row-per-token tensors to extend, after checking they match the tokenizer."""
    expected = layout.old_size
    how = f"{layout.n_file_ranks} ranks in {base_dir / TOKENIZER} + {len(LLAMA3_SPECIAL_TOKENS)} special tokens"
    for path, values in ((CONFIG, config), (PARAMS, params)):
        if values.get("vocab_size") != expected:
            found = values.get("vocab_size")
            raise ExtendError(f"{base_dir / path}: vocab_size is {found!r}, expected {expected} ({how})")
    to_extend = []
    for name in (EMBEDDING, HEAD):
        shape = tensor_shape(base_dir, shards, name)
        if shape is None:
            continue
        if len(shape) != 2 or shape[0] != expected:
            raise ExtendError(f"{base_dir}: {name} has shape {shape}, expected [{expected}, hidden] ({how})")
        to_extend.append(name)
    if EMBEDDING not in to_extend:
        raise ExtendError(f"{base_dir}: the weights have no {EMBEDDING}")
    if HEAD not in to_extend and config.get("tie_word_embeddings") is not True:
        raise ExtendError(f"{base_dir / CONFIG}: tie_word_embeddings is not true but the weights have no {HEAD}")
    return to_extend


def check_tokenizer(path: Path, n_dsus: int, modality_tokens: bool) -> dict[bytes, int]:
    try:
        ranks = read_bpe_file(path)
    except OSError as e:
        raise ExtendError(f"{path}: cannot read ({e})") from None
    except TokenizerFileError as e:
        raise ExtendError(str(e)) from None
    for token in extension_tokens(n_dsus, modality_tokens):
        if token in ranks:
            char = token.decode()
            raise ExtendError(
                f"{path}: already contains U+{ord(char):04X} (rank {ranks[token]}), one of the tokens extension "
                "adds; was it extended already?"
            )
    return ranks


def sample_like_rows(rows: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """`n` fp32 rows from a multivariate normal with the mean of `rows` and their covariance times 1e-5."""
    n_rows, dim = rows.shape
    chunks = [rows[i : i + STATS_CHUNK_ROWS] for i in range(0, n_rows, STATS_CHUNK_ROWS)]
    # Chunked so that only a slice of a bf16 checkpoint's rows is ever held in fp32; sums in fp64.
    mean = sum(chunk.float().sum(0, dtype=torch.float64) for chunk in chunks) / n_rows
    mean32 = mean.float()
    covariance = torch.zeros(dim, dim, dtype=torch.float64)
    for chunk in chunks:
        centred = chunk.float() - mean32
        covariance += (centred.T @ centred).double()
    covariance /= n_rows  # the population covariance; n vs n-1 is immaterial at 128k rows
    # A square root of the covariance from its eigendecomposition: valid for positive semi-definite
    # covariances too (fewer rows than dimensions), where a Cholesky factor does not exist.
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance * COVARIANCE_SCALE)
    root = (eigenvectors * eigenvalues.clamp(min=0).sqrt()).float()
    noise = torch.randn(n, dim, generator=generator, dtype=torch.float32)
    return mean32 + noise @ root.T


def extend_rows(weight: torch.Tensor, layout: VocabLayout, generator: torch.Generator,
                bpe: SpeechBpe | None = None) -> torch.Tensor:
    """File-rank rows unchanged, then the new rows (DSUs, modality, merged tokens), then the
    special-token rows; dtype kept."""
    file_rows, special_rows = weight[: layout.n_file_ranks], weight[layout.n_file_ranks :]
    new_rows = sample_like_rows(file_rows, layout.n_new, generator)
    merged_rows = []
    if bpe is not None and bpe.init == "mean":  # DSU i's row is new_rows[i]
        merged_rows = [torch.stack([new_rows[torch.as_tensor(units)].mean(0) for units in bpe.merged_units])]
    elif bpe is not None:
        merged_rows = [sample_like_rows(file_rows, layout.n_merged, generator)]
    return torch.cat([file_rows, torch.cat([new_rows, *merged_rows]).to(weight.dtype), special_rows])


def safetensors_header(specs: list[tuple[str, str, list[int]]], metadata: dict) -> tuple[bytes, int]:
    """The serialized header for tensors stored back to back in `specs` order, and their total bytes."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in specs:
        if dtype not in SAFETENSORS_DTYPE_BYTES:
            raise ExtendError(f"tensor {name}: unsupported safetensors dtype {dtype}")
        size = SAFETENSORS_DTYPE_BYTES[dtype]
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8-byte alignment
    return struct.pack("<Q", len(encoded)) + encoded, offset


def stream_shard(src: Path, dst: Path, layout: VocabLayout, seed: int, progress: tqdm,
                 bpe: SpeechBpe | None = None) -> int:
    """Copy one safetensors file tensor by tensor, extending the embedding/head rows; returns data bytes."""
    with safe_open(src, framework="pt") as f:
        names = list(f.keys())
        specs = []
        for name in names:
            tensor_slice = f.get_slice(name)
            shape = tensor_slice.get_shape()
            if name in (EMBEDDING, HEAD):
                shape = [layout.new_size, *shape[1:]]
            specs.append((name, tensor_slice.get_dtype(), shape))
        header, data_size = safetensors_header(specs, f.metadata() or {"format": "pt"})
        with open(dst, "xb") as out:
            out.write(header)
            for name in names:
                tensor = f.get_tensor(name)
                if name in (EMBEDDING, HEAD):
                    # One generator per tensor, so the draw does not depend on how the tensors are sharded.
                    generator = torch.Generator().manual_seed(seed + (name == HEAD))
                    tensor = extend_rows(tensor, layout, generator, bpe)
                out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
                progress.update()
    return data_size


def map_token_ids(config: dict, layout: VocabLayout, where: Path) -> dict:
    """A copy of `config` with its bos/eos/pad ids (single ids or lists) moved to the extended layout."""
    config = dict(config)
    for field in TOKEN_ID_FIELDS:
        value = config.get(field)
        if isinstance(value, list):
            config[field] = [layout.new_id(v, f"{where}: {field}") for v in value]
        elif value is not None:
            config[field] = layout.new_id(value, f"{where}: {field}")
    return config


def files_to_copy(base_dir: Path, weight_files) -> tuple[list[Path], list[Path]]:
    """Relative paths of the other files to copy as they are, and of those left out as stale."""
    rewritten = {Path(p) for p in (CONFIG, GENERATION_CONFIG, TOKENIZER, PARAMS, WEIGHTS_INDEX, *weight_files)}
    copied, stale = [], []
    for path in sorted(base_dir.rglob("*")):
        relative = path.relative_to(base_dir)
        if not path.is_file() or relative in rewritten or any(part.startswith(".") for part in relative.parts):
            continue
        if relative.name in STALE_TOKENIZER_FILES or relative.name.endswith(STALE_WEIGHT_SUFFIXES):
            stale.append(relative)
        else:
            copied.append(relative)
    return copied, stale


@dataclass
class Plan:
    """Everything extension will write, worked out and checked before anything is written."""

    base_dir: Path
    out_dir: Path
    n_dsus: int
    modality_tokens: bool
    layout: VocabLayout
    config: dict
    new_config: dict
    new_generation_config: dict
    new_params: dict
    shards: dict[str, list[str]]  # safetensors file -> tensor names
    to_extend: list[str]
    copied: list[Path]
    stale: list[Path]
    bpe: SpeechBpe | None = None


def plan_extension(base_dir: Path, n_dsus: int, modality_tokens: bool, out_dir: Path | None,
                   bpe_args: dict | None = None) -> Plan:
    out_dir = out_dir if out_dir is not None else default_out_dir(base_dir, n_dsus, modality_tokens)
    if not 1 <= n_dsus <= MAX_DSUS:
        raise ExtendError(f"--n-dsus must be in 1..{MAX_DSUS} (the private-use range), got {n_dsus}")
    if out_dir.exists():
        raise ExtendError(f"{out_dir}: already exists; refusing to overwrite it")
    if not out_dir.parent.is_dir():
        raise ExtendError(f"{out_dir.parent}: output parent directory does not exist")
    if not base_dir.is_dir():
        raise ExtendError(f"{base_dir}: base model directory does not exist")
    for required in (CONFIG, GENERATION_CONFIG, TOKENIZER, PARAMS):
        if not os.path.lexists(base_dir / required):
            raise ExtendError(f"{base_dir}: missing {required}")
        regular_file(base_dir / required)

    ranks = check_tokenizer(base_dir / TOKENIZER, n_dsus, modality_tokens)
    bpe = learn_speech_bpe(n_dsus=n_dsus, **bpe_args) if bpe_args else None
    layout = VocabLayout(len(ranks), n_dsus + 2 * modality_tokens, len(bpe.merged_units) if bpe else 0)
    config = load_json(base_dir / CONFIG)
    params = load_json(base_dir / PARAMS)
    shards = weight_shards(base_dir)
    to_extend = check_vocabulary(base_dir, config, params, shards, layout)
    generation_config = load_json(base_dir / GENERATION_CONFIG)
    copied, stale = files_to_copy(base_dir, shards)
    return Plan(
        base_dir, out_dir, n_dsus, modality_tokens, layout, config,
        new_config=map_token_ids(config, layout, base_dir / CONFIG) | {"vocab_size": layout.new_size},
        new_generation_config=map_token_ids(generation_config, layout, base_dir / GENERATION_CONFIG),
        new_params=params | {"vocab_size": layout.new_size},
        shards=shards, to_extend=to_extend, copied=copied, stale=stale, bpe=bpe,
    )


def write_extension(plan: Plan, dst: Path, seed: int) -> int:
    """Write the extended directory's contents into `dst`; returns the weights' data bytes."""
    (dst / "original").mkdir()
    base_tokenizer = (plan.base_dir / TOKENIZER).read_bytes()
    tokenizer = extended_tokenizer_bytes(base_tokenizer, plan.layout.n_file_ranks, plan.n_dsus, plan.modality_tokens)
    if plan.bpe is not None:
        merged = [units_text(units).encode() for units in plan.bpe.merged_units]
        tokenizer += bpe_lines(merged, plan.layout.n_file_ranks + plan.layout.n_new)
        (dst / "original" / DSU_BPE_MODEL).write_bytes(plan.bpe.model)
        write_json(dst / "original" / DSU_BPE_SETTINGS, plan.bpe.settings)
    (dst / TOKENIZER).write_bytes(tokenizer)
    write_json(dst / CONFIG, plan.new_config)
    write_json(dst / GENERATION_CONFIG, plan.new_generation_config)
    write_json(dst / PARAMS, plan.new_params)
    for relative in plan.copied:
        (dst / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(plan.base_dir / relative, dst / relative)

    total_size = 0
    with tqdm(total=sum(map(len, plan.shards.values())), desc="tensors", unit="tensor") as progress:
        for shard in sorted(plan.shards):
            total_size += stream_shard(plan.base_dir / shard, dst / shard, plan.layout, seed, progress, plan.bpe)
    if WEIGHTS not in plan.shards:  # sharded: the same index with the new total size
        index = load_json(plan.base_dir / WEIGHTS_INDEX)
        index["metadata"] = dict(index.get("metadata") or {}) | {"total_size": total_size}
        write_json(dst / WEIGHTS_INDEX, index)
    return total_size


def print_summary(plan: Plan, total_size: int, seconds: float) -> None:
    layout, first_new = plan.layout, plan.layout.n_file_ranks
    modality = f"text/speech modality {first_new + plan.n_dsus}/{first_new + plan.n_dsus + 1}"
    print(f"tokenizer: {first_new} ranks + {plan.n_dsus} DSUs at {first_new}..{first_new + plan.n_dsus - 1}, "
          + (modality if plan.modality_tokens else "no modality tokens"))
    if plan.bpe is not None:
        first, settings = first_new + layout.n_new, plan.bpe.settings
        learnt = f"{settings['sequences']} {'deduplicated' if settings['deduplicate'] else 'raw'} sequences"
        print(f"speech BPE: {layout.n_merged} merged tokens at {first}..{first + layout.n_merged - 1} "
              f"(learnt from {learnt}; embedding rows: {plan.bpe.init})")
    print(f"vocab_size: {layout.old_size} -> {layout.new_size}")
    for field in TOKEN_ID_FIELDS:
        if plan.config.get(field) is not None:
            print(f"{field}: {plan.config[field]} -> {plan.new_config[field]}")
    for name in plan.to_extend:
        print(f"extended {name}: {layout.old_size} -> {layout.new_size} rows")
    print(f"weights: {', '.join(sorted(plan.shards))} ({total_size / 1e9:.2f} GB)")
    for relative in plan.stale:
        print(f"warning: left out {relative}: it describes the base vocabulary and would be stale", file=sys.stderr)
    print(f"done in {seconds:.1f} s: {plan.out_dir}")


def extend(base_dir, n_dsus: int, modality_tokens: bool = True, out_dir=None, seed: int = DEFAULT_SEED,
           dsu_bpe: int | None = None, dsu_bpe_data=None, deduplicate: bool = True,
           dsu_bpe_init: str = "gaussian") -> Path:
    """Write the extended copy of `base_dir` and return its path; raises ExtendError on bad input.
    With `dsu_bpe` merges, a speech BPE learnt from `dsu_bpe_data` is added (module docstring)."""
    started = time.perf_counter()
    if not 0 <= seed <= MAX_SEED:
        raise ExtendError(f"--seed must be in 0..{MAX_SEED}, got {seed}")
    if (dsu_bpe is None) != (dsu_bpe_data is None):
        raise ExtendError("--dsu-bpe M and --dsu-bpe-data DATA go together")
    if dsu_bpe is None and not deduplicate:
        raise ExtendError("--no-deduplicate is how a speech BPE (--dsu-bpe) is learnt; without one, "
                          "deduplication is a training setting (data.deduplicate)")
    if dsu_bpe_init not in BPE_INITS:
        raise ExtendError(f"--dsu-bpe-init must be one of {BPE_INITS}, got {dsu_bpe_init!r}")
    bpe_args = None if dsu_bpe is None else {
        "data": str(dsu_bpe_data), "merges": dsu_bpe, "deduplicate": deduplicate, "init": dsu_bpe_init}
    plan = plan_extension(Path(base_dir), n_dsus, modality_tokens, None if out_dir is None else Path(out_dir), bpe_args)
    print(f"extending {plan.base_dir} -> {plan.out_dir}")
    # Written under a temporary sibling name and renamed at the end, so a failure leaves nothing behind.
    with atomic_write(plan.out_dir, directory=True, replace=False) as staging:
        total_size = write_extension(plan, staging, seed)
        if plan.out_dir.exists():
            raise ExtendError(f"{plan.out_dir}: appeared while extending; refusing to overwrite it")
    print_summary(plan, total_size, time.perf_counter() - started)
    return plan.out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Extend a Llama 3.x model directory (Hugging Face layout with original/tokenizer.model and "
        "original/params.json) with N discrete speech unit tokens, plus the text and speech modality tokens. "
        "Writes a new directory in the same layout; the base is only read.",
    )
    parser.add_argument(
        "--base", type=Path, required=True, metavar="DIR", help="base model directory, e.g. Llama-3.2-1B"
    )
    parser.add_argument(
        "--n-dsus", type=int, required=True, metavar="N", help=f"number of DSU tokens to add (1..{MAX_DSUS})"
    )
    parser.add_argument(
        "--no-modality-tokens", dest="modality_tokens", action="store_false",
        help="do not add the text/speech modality tokens (U+E001, U+E000)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, metavar="DIR",
        help="output directory, must not exist (default: <base>-<N>-dsus beside the base, "
        "plus -no_modality_tokens without modality tokens)",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, metavar="S",
        help=f"seed of the new embedding rows, 0..2**63-1 (default {DEFAULT_SEED})",
    )
    parser.add_argument(
        "--dsu-bpe", type=int, default=None, metavar="M",
        help="add a speech BPE of M merged-unit tokens, learnt with sentencepiece from --dsu-bpe-data",
    )
    parser.add_argument(
        "--dsu-bpe-data", default=None, metavar="DATA",
        help="dataset (JSONL/Parquet file, directory or glob) whose speech_tokens the speech BPE is learnt from",
    )
    parser.add_argument(
        "--no-deduplicate", dest="deduplicate", action="store_false",
        help="learn the speech BPE from the raw units, repeats kept (default: deduplicated); the model records "
        "it, and training and generation follow (data.deduplicate)",
    )
    parser.add_argument(
        "--dsu-bpe-init", choices=BPE_INITS, default="gaussian",
        help="merged tokens' embedding rows: drawn like the DSU rows (default), or the mean of their units' rows",
    )
    args = parser.parse_args(argv)
    try:
        extend(args.base, args.n_dsus, args.modality_tokens, args.out, args.seed,
               args.dsu_bpe, args.dsu_bpe_data, args.deduplicate, args.dsu_bpe_init)
    except ExtendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

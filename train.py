"""Training: continued pre-training (CPT) and supervised fine-tuning (SFT) of an extended Llama 3.x.

    python train.py configs/cpt_speechtokenizer.json [dotted.key=value ...]
    torchrun --nproc 4 train.py configs/sft_speechtokenizer.json resume=auto

One optimizer step consumes batch_size x grad_accum x world_size sequences, taken in order from a
permutation of the training rows fixed by (seed, epoch); the loss is the sum of token losses over
the whole step divided by its number of target tokens, across micro-batches and ranks. Every
sequence is a pure function of (epoch, row), so the data position is just the step number and a
resumed run continues with exactly the losses of an uninterrupted one.

With data.packed, the sequences are packed into rows of max_seq_len instead (see PackedStream) and
a step consumes batch_size x grad_accum x world_size rows: fixed tokens per step, little padding.
The data position is then the packer's state, saved with each checkpoint.

Checkpoints are Hugging Face LlamaForCausalLM directories (plus training_state.pt), written under a
temporary name and renamed, in <run_dir>/checkpoints/step_NNNNNNN.
"""

import argparse
import copy
import json
import math
import os
import pickle
import random
import shutil
import sys
import time
import zipfile
from collections import deque
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import kernels
from config import ConfigError, describe, load_config, model_tokenizer
from data import reference_run
from data.dataset import ASR_FIELDS, SCHEMA_FIELDS, DataError, Source
from data.samples import IGNORE, Interleave, Pieces, SampleBuilder
from data.store import RowStore, open_store, store_path
from data.tokenizer import Tokenizer, dsu_bpe_files
from model import DTYPES, Llama, check_weights, write_safetensors

# -- processes ---------------------------------------------------------------------------------


def setup_distributed(device_choice: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); torchrun's environment starts a process group (NCCL on GPU, gloo on CPU)."""
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return rank, world_size, torch.device("cuda", local_rank)
    return rank, world_size, torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


# -- data --------------------------------------------------------------------------------------


class Sequences:
    """Training or dev sequences: row `i` of epoch `e` always becomes the same tokens and labels."""

    def __init__(self, rows: RowStore | list[dict], data_cfg: dict, tokenizer: Tokenizer):
        self.rows = rows
        self.task = data_cfg["task"]
        self.cpt = data_cfg["cpt"]
        self.sft = data_cfg["sft"]
        self.interleave = Interleave(
            self.cpt["sampling_rate"], self.cpt["downsampling_ratio"], self.cpt["mean_seq_len_tokens"], self.cpt["binom_prob"]
        )
        self.builder = SampleBuilder(
            tokenizer,
            deduplicate=data_cfg["deduplicate"],
            modality_tokens=data_cfg["modality_tokens"],
            max_seq_len=data_cfg["max_seq_len"],
        )

    def __len__(self) -> int:
        return len(self.rows)

    def pieces(self, index: int, epoch: int) -> Pieces:
        return self.pieces_many([index], epoch)[0]

    def pieces_many(self, indices, epoch: int) -> list[Pieces]:
        """The sequences of these rows, described as pieces; interleaving's random draws are made
        for all of them at once (kernels.interleave_draws)."""
        indices = [int(i) for i in indices]
        rows = [self.rows[i] for i in indices]
        if self.task == "sft":
            return [self.builder.sft_asr_pieces(row, self.sft["system_prompt"], self.sft["train_on_input"])
                    for row in rows]
        kind = self.cpt["sequence_type"]
        if kind == "interleaved":
            draws = kernels.interleave_draws(indices, [len(row["tokenized"]) for row in rows], epoch, self.interleave)
            return [self.builder.cpt_interleaved_pieces(row, i, epoch, self.interleave, draws=d)
                    for row, i, d in zip(rows, indices, draws)]
        return [self.builder.cpt_concatenated_pieces(row, text_first=kind == "concatenated_txt_dsu") for row in rows]

    def build(self, index: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        return self.builder.assemble(self.pieces(index, epoch))

    def build_many(self, indices, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return [self.builder.assemble(p) for p in self.pieces_many(indices, epoch)]

    def lengths(self, pieces: list[Pieces]) -> list[int]:
        """How many tokens these sequences have once built, in one call of the measure op."""
        return kernels.measure(kernels.flatten(pieces), self.builder.deduplicate).tolist()


def store_options(data_cfg: dict) -> dict:
    """How a source is read into its store for this run: the fields its task needs, and the frame
    rate that interleaved CPT's word times must fit."""
    if data_cfg["task"] == "sft":
        return {"n_dsus": data_cfg["n_dsus"], "fields": ASR_FIELDS}
    if data_cfg["cpt"]["sequence_type"] == "interleaved":  # word times pick the DSUs under each word span
        cpt = data_cfg["cpt"]
        return {"n_dsus": data_cfg["n_dsus"], "fields": SCHEMA_FIELDS,
                "frame_rate": cpt["sampling_rate"] / cpt["downsampling_ratio"]}
    return {"n_dsus": data_cfg["n_dsus"], "fields": ("tokenized", "speech_tokens")}  # words joined, as the reference does


def load_data(cfg: dict, tokenizer: Tokenizer) -> tuple[Sequences, Sequences | None]:
    """The train and dev sequences, read through their stores (`data.store`): converted by the
    first process of each machine, memory-mapped by all. When either source is refused, what this
    call created (stores, cache and run directories) is removed: a refused run leaves nothing new."""
    data_cfg = cfg["data"]
    run_dir = Path(cfg["run_dir"])
    cache_dir = Path(data_cfg["cache_dir"] or run_dir / "data_cache")
    options = store_options(data_cfg)
    # a dataset directory gives train its train split and dev its validation split, never a mix
    sources = [Source(data_cfg["train"], "train", data_cfg["columns"])]
    if data_cfg["dev"]:
        sources.append(Source(data_cfg["dev"], "validation", data_cfg["columns"]))
    first_here = int(os.environ.get("LOCAL_RANK", "0")) == 0
    created = [p for p in (run_dir, cache_dir, *cache_dir.parents) if not p.exists()]
    stores = []
    try:
        created += [d for d in (store_path(s, cache_dir, **options) for s in sources) if not d.exists()]
        for source in sources:
            rows = open_store(source, cache_dir, **options, build=first_here, progress=first_here)
            if not len(rows):
                raise DataError(f"{source}: no rows")
            stores.append(rows)
    except DataError:
        if first_here:
            for path in created:
                shutil.rmtree(path, ignore_errors=True)
        raise
    train_seqs, *dev = (Sequences(rows, data_cfg, tokenizer) for rows in stores)
    return train_seqs, (dev[0] if dev else None)


def epoch_order(n_rows: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    return np.random.default_rng((seed, epoch)).permutation(n_rows) if shuffle else np.arange(n_rows)


def collate(pairs: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and next-token targets (labels shifted left by one, IGNORE at the end)."""
    length = max(len(tokens) for tokens, _ in pairs)
    inputs = np.full((len(pairs), length), pad_id, dtype=np.int64)
    targets = np.full((len(pairs), length), IGNORE, dtype=np.int64)
    for i, (tokens, labels) in enumerate(pairs):
        inputs[i, : len(tokens)] = tokens
        targets[i, : len(labels) - 1] = labels[1:]
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def step_micro_batches(seqs: Sequences, step: int, cfg: dict, rank: int, world: int):
    """(epoch, this rank's micro-batches for optimizer step `step` (0-based) as (inputs, targets)
    pairs, the row index of each micro-batch's first sequence).

    The step takes the next batch_size*grad_accum*world rows of the epoch's order; micro-batch m
    is the m-th slice of batch_size*world rows, of which this rank takes its batch_size, so a run
    on 2 processes sees the same micro-batches as 1 process with twice the batch size.
    """
    batch, accum = cfg["train"]["batch_size"], cfg["train"]["grad_accum"]
    per_step = batch * accum * world
    steps_per_epoch = len(seqs) // per_step
    if steps_per_epoch == 0:
        raise DataError(f"{cfg['data']['train']}: {len(seqs)} rows are fewer than one optimizer step ({per_step})")
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    order = epoch_order(len(seqs), cfg["seed"], epoch, cfg["data"]["shuffle"])
    chunk = order[step_in_epoch * per_step : (step_in_epoch + 1) * per_step]
    pad_id = seqs.builder.tok.special_ids["<|finetune_right_pad_id|>"]
    micro, firsts = [], []
    for m in range(accum):
        rows = chunk[m * batch * world : (m + 1) * batch * world][rank * batch : (rank + 1) * batch]
        micro.append(collate(seqs.build_many(rows, epoch), pad_id))
        firsts.append(int(rows[0]))
    return epoch, micro, firsts


PACK_OPEN_ROWS = 128  # rows a packed stream keeps open for later sequences to fill: more, less padding
PACK_LOOKAHEAD = 64  # sequences described and measured at a time


class PackedStream:
    """The training data of a packed run: one stream of rows, computed identically on every rank.

    Sequences enter in each epoch's order (`epoch_order`) as `Pieces`, are measured, and a
    `kernels.FirstFitPacker` with PACK_OPEN_ROWS open rows places them by length. When an epoch's
    sequences run out, its open rows are repacked and flushed, so no row mixes epochs and every
    sequence is trained on once per epoch. The `pack` op later writes each rank's rows, exactly as
    the unpacked path builds the sequences (cut to max_seq_len by the builders). The position in
    the stream is (epoch, sequences taken from its order, the indices of the sequences in the open
    rows): `state_dict`, saved with each checkpoint. A sequence is a pure function of (epoch,
    index), so a restored stream rebuilds the open rows and continues with exactly the rows of an
    uninterrupted one. Memory: the open rows' sequences and the look-ahead, not the data set.
    """

    def __init__(self, seqs: Sequences, cfg: dict):
        self.seqs, self.seed, self.shuffle = seqs, cfg["seed"], cfg["data"]["shuffle"]
        self.max_seq_len = cfg["data"]["max_seq_len"]
        if seqs.task == "cpt" and self.max_seq_len < 2:  # CPT keeps max_seq_len - 1 tokens: no row would fill
            raise ConfigError(f"data.max_seq_len must be at least 2 for packed CPT, got {self.max_seq_len}")
        self.packer = kernels.FirstFitPacker(self.max_seq_len, PACK_OPEN_ROWS)
        self.open_samples: dict[int, Pieces] = {}  # index -> sequence, in open rows
        self._start_epoch(0, 0)

    def _start_epoch(self, epoch: int, position: int) -> None:
        self.epoch, self.position = epoch, position
        self.order = epoch_order(len(self.seqs), self.seed, epoch, self.shuffle)
        self.ahead: deque[tuple[int, Pieces, int]] = deque()  # (index, sequence, length): measured, not yet placed

    def next_row(self) -> tuple[int, list[int], list[Pieces]]:
        """(epoch, the row's sequences' indices, those sequences), for `kernels.pack`."""
        while True:
            if self.position == len(self.order):
                row = self.packer.pop()
                if row is not None:
                    return self.epoch, row, [self.open_samples.pop(i) for i in row]
                self._start_epoch(self.epoch + 1, 0)
            if not self.ahead:
                indices = self.order[self.position : self.position + PACK_LOOKAHEAD].tolist()
                pieces = self.seqs.pieces_many(indices, self.epoch)
                self.ahead.extend(zip(indices, pieces, self.seqs.lengths(pieces)))
            index, sample, length = self.ahead.popleft()
            self.position += 1
            if length:  # the packer drops empty sequences: nothing to keep
                self.open_samples[index] = sample
            row = self.packer.add(index, length)
            if self.position == len(self.order):
                self.packer.finish()
            if row is not None:
                return self.epoch, row, [self.open_samples.pop(i) for i in row]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "open_rows": self.packer.open_rows,
                "max_seq_len": self.max_seq_len}

    def load_state_dict(self, state: dict) -> None:
        assert state["max_seq_len"] == self.max_seq_len, "check_resumable compares them first"
        self._start_epoch(state["epoch"], state["position"])
        indices = [i for row in state["open_rows"] for i in row]
        self.open_samples = dict(zip(indices, self.seqs.pieces_many(indices, self.epoch)))
        length = dict(zip(indices, self.seqs.lengths([self.open_samples[i] for i in indices])))
        self.packer.reopen([[(i, length[i]) for i in row] for row in state["open_rows"]])


def packed_micro_batches(stream: PackedStream, cfg: dict, rank: int, world: int, device=None):
    """(epoch, this rank's micro-batches for the next optimizer step as `kernels.Packed` rows on
    `device`, the index of each micro-batch's first sequence):
    the step takes the stream's next batch_size*grad_accum*world rows, sliced as
    `step_micro_batches` slices sequences, so 2 processes see what 1 process with twice the batch
    size sees. Only this rank's rows are written (by the `pack` op; on the GPU when it is one)."""
    batch, accum = cfg["train"]["batch_size"], cfg["train"]["grad_accum"]
    rows = [stream.next_row() for _ in range(batch * accum * world)]
    builder = stream.seqs.builder
    pad_id = builder.tok.special_ids["<|finetune_right_pad_id|>"]
    micro, firsts = [], []
    for m in range(accum):
        mine = rows[m * batch * world : (m + 1) * batch * world][rank * batch : (rank + 1) * batch]
        micro.append(kernels.pack([samples for _, _, samples in mine], builder.tok.dsu_offset, builder.deduplicate,
                                  stream.max_seq_len, pad_id, device))
        firsts.append(mine[0][1][0])
    return rows[-1][0], micro, firsts


def token_kinds(inputs: torch.Tensor, tok: Tokenizer, pad_id: int) -> dict[str, int]:
    """How many real (non-pad) input tokens are text, DSU, or special (Llama specials and modality)."""
    real = inputs[inputs != pad_id]
    dsu = tok.is_speech(real).sum().item()
    modality = sum((real == i).sum().item() for i in (tok.speech_id, tok.text_id) if i is not None)
    special = (real >= tok.n_file_tokens).sum().item() + modality
    return {"text_tokens": real.numel() - dsu - special, "dsu_tokens": dsu, "special_tokens": special}


# -- checkpoints -------------------------------------------------------------------------------

CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.pt"


CHECKPOINT_FILES = ("config.json", "generation_config.json", "original/tokenizer.model", "original/params.json",
                    "training_config.json", STATE_FILE)
# numpy's RNG state is an ndarray: unpickling may rebuild plain arrays and nothing else
NUMPY_ARRAY_GLOBALS = [np.empty(0).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first (temporary directories of unfinished saves are not)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(done, key=lambda p: int(p.name[5:]))


def checkpoint_damage(checkpoint: Path) -> str | None:
    """What makes `checkpoint` unusable for resuming (a missing, truncated or damaged file), or
    None. Reads the weights' headers and the training state's zip directory, not the tensors."""
    for name in CHECKPOINT_FILES:
        if not (checkpoint / name).is_file():
            return f"{name} is missing"
    try:
        check_weights(checkpoint)
    except (ValueError, OSError) as error:
        return str(error)
    try:
        with zipfile.ZipFile(checkpoint / STATE_FILE) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as error:
        return f"{STATE_FILE} is truncated or damaged ({error})"
    return None


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, cfg: dict, model_src: Path, state: dict):
    """Writes <run_dir>/checkpoints/step_N atomically: a temporary directory renamed when complete."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)  # collective under FSDP: every rank calls it
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    final = run_dir / CHECKPOINTS / f"step_{step:07d}"
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "original").mkdir(parents=True)

    inner = getattr(model, "module", model)  # DDP wraps the model
    hf_config = inner.config.to_hf()
    hf_config["torch_dtype"] = cfg["model"]["dtype"]  # what the weights are stored as
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    shutil.copy(model_src / "generation_config.json", tmp / "generation_config.json")
    for name in ("tokenizer.model", "params.json", *dsu_bpe_files(model_src / "original")):
        shutil.copy(model_src / "original" / name, tmp / "original" / name)
    write_safetensors(weights, tmp / "model.safetensors")
    (tmp / "training_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    torch.save(
        {
            **state,
            "step": step,
            "optimizer": optim_state,
            "scheduler": scheduler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
        },
        tmp / STATE_FILE,
    )
    if final.exists():  # incomplete (no training state), or from steps a resume from an earlier checkpoint redoes
        shutil.rmtree(final)
    os.replace(tmp, final)  # atomic: a crash before this line leaves only the temporary directory


def read_training_state(checkpoint: Path) -> dict:
    """The training state as data: tensors, numbers, strings and plain numpy arrays, nothing executable."""
    path = checkpoint / STATE_FILE
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise ConfigError(f"{path}: cannot be read ({str(error).splitlines()[0]})") from None


def restore_training_state(state: dict, model, optimizer, scheduler) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])


def resolve_resume(cfg: dict, run_dir: Path) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from and its training state; (None, None) starts from the beginning.
    resume=auto takes the newest intact checkpoint, naming each damaged one it passes over; a run
    directory whose checkpoints are all damaged is refused rather than silently started over."""
    resume, found = cfg["resume"], checkpoint_dirs(run_dir)
    try:  # a reference run is never continued inexactly, nor started over beside
        reference_run.refuse_to_resume(run_dir, resume)
    except reference_run.ReferenceError as error:
        raise ConfigError(str(error)) from None
    if not resume:
        if found:
            raise ConfigError(
                f"{run_dir} already holds checkpoints: pass resume=auto to continue that run, or choose another run_dir"
            )
        return None, None
    if resume != "auto":
        path = Path(resume)
        problem = checkpoint_damage(path) if path.is_dir() else "no such directory"
        if problem:
            raise ConfigError(f"resume: {path} cannot be resumed from: {problem}")
        return path, read_training_state(path)
    for path in reversed(found):
        problem = checkpoint_damage(path)
        if problem is None:
            try:
                return path, read_training_state(path)
            except ConfigError as error:
                problem = str(error)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"train.py: resume=auto: skipping {path}: {problem}", file=sys.stderr, flush=True)
    if found:
        raise ConfigError(f"resume=auto: no intact checkpoint among the {len(found)} in {run_dir / CHECKPOINTS} "
                          "(see above); resume from another with resume=PATH, or start a new run_dir")
    return None, None  # nothing saved yet


def check_resumable(saved: dict, cfg: dict, world: int) -> None:
    if ("packer" in saved) != cfg["data"]["packed"]:
        raise ConfigError(
            f"resume: the checkpoint was made with data.packed={json.dumps('packer' in saved)}, this run has "
            f"{json.dumps(cfg['data']['packed'])}; its data position means nothing to this run. Start a new run "
            "from it (model.path) instead."
        )
    if "packer" in saved and saved["packer"]["max_seq_len"] != cfg["data"]["max_seq_len"]:
        raise ConfigError(f"resume: the checkpoint packed rows of {saved['packer']['max_seq_len']} tokens, this run "
                          f"has data.max_seq_len {cfg['data']['max_seq_len']}")
    now = {"batch_size": cfg["train"]["batch_size"], "grad_accum": cfg["train"]["grad_accum"], "world_size": world}
    then = {key: saved[key] for key in now}
    if then != now and not cfg["resume_force"]:
        raise ConfigError(
            f"resume: the checkpoint was made with {then}, this run has {now}; the data order and losses "
            "would differ. Pass resume_force=true to continue anyway."
        )


# -- optimisation ------------------------------------------------------------------------------


def cosine_with_warmup(warmup: int, total: int, cycles: float):
    """LR multiplier: linear warm-up from 0, then a cosine over `cycles` periods (0.5: down to 0)."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * cycles * 2.0 * progress)))

    return multiplier


def build_model(cfg: dict, model_path: Path, device: torch.device, world: int):
    dtype = DTYPES[cfg["model"]["dtype"]]
    model = Llama.from_pretrained(model_path, dtype=dtype, device=device,
                                  activation_checkpointing=cfg["model"]["activation_checkpointing"])
    model.loss_chunk_size = cfg["train"]["loss_chunk_size"]
    if cfg["model"]["fsdp"]:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    elif world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["model"]["compile"]:
        model = torch.compile(model)
    return model


# -- the loop ----------------------------------------------------------------------------------


def forward_loss(model, batch, device):
    """(loss sum, target count) of a micro-batch: (inputs, targets) from `collate`, or `kernels.Packed`
    rows (tokens, targets, positions, document_ids); targets are shifted in both."""
    inputs, targets, *packing = (t.to(device, non_blocking=True) for t in batch)
    positions, document_ids = packing or (None, None)
    return model(inputs, positions=positions, document_ids=document_ids, labels=targets)


@torch.no_grad()
def evaluate(model, seqs: Sequences, cfg: dict, rank: int, world: int, device) -> float:
    """Mean token loss over the whole dev set (epoch 0's sequences), across ranks."""
    model.eval()
    batch = cfg["train"]["batch_size"]
    pad_id = seqs.builder.tok.special_ids["<|finetune_right_pad_id|>"]
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for first in range(0, len(seqs), batch * world):  # as many forward passes on every rank: FSDP's are collective
        rows = range(first + rank * batch, min(first + (rank + 1) * batch, len(seqs)))
        inputs, targets = collate(seqs.build_many(rows or [0], 0), pad_id)
        if not rows:  # this rank is past the end: a pass that counts nothing
            targets.fill_(IGNORE)
        loss_sum, count = forward_loss(model, (inputs, targets), device)
        totals += torch.stack([loss_sum.double(), count.double()])
    all_reduce_sum(totals)
    model.train()
    return (totals[0] / totals[1].clamp(min=1)).item()


class TrainingStopped(Exception):
    """The run cannot go on (a non-finite loss); the message says how to continue."""


def nonfinite_report(done: int, loss: float, grad_norm: float, micro_losses: list, firsts: list[int], epoch: int,
                     rows, rank: int) -> str:
    """What went non-finite at step `done`, and where the first such micro-batch starts in the data."""
    bad = [m for m, value in enumerate(torch.stack(micro_losses).tolist()) if not math.isfinite(value)]
    m = bad[0] if bad else 0  # only the gradient norm: name the step's first micro-batch
    which = "its first non-finite" if bad else "its first"
    return (f"step {done}: loss {loss}, gradient norm {grad_norm}; {which} micro-batch ({m + 1} of {len(firsts)} "
            f"on rank {rank}) starts with row {firsts[m]} of epoch {epoch} (id {rows[firsts[m]]['id']!r})")


def train(cfg: dict) -> None:
    rank, world, device = setup_distributed(cfg["train"]["device"])
    run_dir = Path(cfg["run_dir"])
    model_path = Path(cfg["model"]["path"])
    try:
        tok = model_tokenizer(model_path, cfg["data"])
    except ConfigError as error:
        raise ConfigError(f"'model.path': {error}") from None
    resume_from, saved = resolve_resume(cfg, run_dir)
    if saved is not None:
        check_resumable(saved, cfg, world)  # before the data is converted: a refused run writes nothing
    train_seqs, dev_seqs = load_data(cfg, tok)
    stream = PackedStream(train_seqs, cfg) if cfg["data"]["packed"] else None

    torch.manual_seed(cfg["seed"])
    model = build_model(cfg, resume_from or model_path, device, world)
    opt = cfg["optim"]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"],
        weight_decay=opt["weight_decay"], fused=device.type == "cuda",
    )
    max_steps = cfg["train"]["max_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(opt["warmup_steps"], max_steps, opt["num_cycles"])
    )
    start_step, totals = 0, {"tokens": 0, "text_tokens": 0, "dsu_tokens": 0, "special_tokens": 0, "target_tokens": 0}
    if saved is not None:
        restore_training_state(saved, model, optimizer, scheduler)
        start_step, totals = saved["step"], saved["totals"]
        if stream is not None:
            stream.load_state_dict(saved["packer"])

    metrics = MetricsLog(run_dir, start_step, cfg, enabled=rank == 0)
    if rank == 0:
        where = f"resuming from {resume_from}" if resume_from else f"from {model_path}"
        packing = f", packed into rows of {cfg['data']['max_seq_len']}" if stream is not None else ""
        print(f"train: {cfg['data']['task']} on {len(train_seqs)} rows{packing}, {max_steps} steps, {where}; "
              f"world size {world}, device {device}, run dir {run_dir}", flush=True)

    pad_id = tok.special_ids["<|finetune_right_pad_id|>"]
    save_steps, eval_steps, log_steps = cfg["train"]["save_steps"], cfg["train"]["eval_steps"], cfg["train"]["log_steps"]
    sync_off = getattr(model, "no_sync", None)
    progress = tqdm(total=max_steps, initial=start_step, disable=rank != 0, desc="train", dynamic_ncols=True)
    window_start, window_tokens = time.perf_counter(), 0
    for step in range(start_step, max_steps):
        if stream is not None:
            epoch, micro, firsts = packed_micro_batches(stream, cfg, rank, world, device)
        else:
            epoch, micro, firsts = step_micro_batches(train_seqs, step, cfg, rank, world)
        n_targets = all_reduce_sum(torch.tensor(sum((b[1] != IGNORE).sum().item() for b in micro), device=device))
        if n_targets.item() == 0 and rank == 0:
            progress.write(f"warning: step {step + 1} has no target tokens (is data.max_seq_len too short "
                           "for the prompt? SFT truncation cuts the transcript first)")
        scale = world / n_targets.clamp(min=1).float()  # DDP and FSDP average gradients over ranks
        micro_losses = []
        step_kinds = {"text_tokens": 0, "dsu_tokens": 0, "special_tokens": 0}
        for m, batch in enumerate(micro):
            last = m == len(micro) - 1
            with sync_off() if (sync_off and not last) else nullcontext():
                loss_sum, _ = forward_loss(model, batch, device)
                (loss_sum * scale).backward()
            micro_losses.append(loss_sum.detach())
            for key, value in token_kinds(batch[0], tok, pad_id).items():  # padding is not counted
                step_kinds[key] += value
        # With clipping off (max_grad_norm 0) the norm is still measured: a non-finite one must stop the step.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opt["max_grad_norm"] or float("inf")).item()
        loss = (all_reduce_sum(torch.stack(micro_losses).sum()) / n_targets.clamp(min=1)).item()
        lr = scheduler.get_last_lr()[0]
        done = step + 1
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            optimizer.step()
        else:  # every rank sees the same all-reduced loss and norm, so all take this branch
            report = nonfinite_report(done, loss, grad_norm, micro_losses, firsts, epoch, train_seqs.rows, rank)
            if not cfg["train"]["skip_nonfinite"]:
                raise TrainingStopped(f"{report}. Nothing of this step was applied or saved. "
                                      + resume_advice(run_dir, done))
            progress.write(f"warning: {report}: update skipped (train.skip_nonfinite)")
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        counts = all_reduce_sum(torch.tensor(list(step_kinds.values()), device=device)).tolist()  # all ranks' tokens
        for key, value in zip(step_kinds, counts):
            totals[key] += value
        step_tokens = sum(counts)
        totals["tokens"] += step_tokens
        totals["target_tokens"] += int(n_targets.item())
        window_tokens += step_tokens
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if not finite:
            metrics.write({"step": done, "skipped": "non-finite loss or gradient norm"})
        elif done % log_steps == 0 or done == max_steps or done == start_step + 1:
            elapsed = time.perf_counter() - window_start
            metrics.write({"step": done, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                           "tokens_per_s": window_tokens / max(elapsed, 1e-9), **totals})
            window_start, window_tokens = time.perf_counter(), 0
        else:
            metrics.write({"step": done, "loss": loss})
        if dev_seqs is not None and (done % eval_steps == 0 or done == max_steps):
            dev_loss = evaluate(model, dev_seqs, cfg, rank, world, device)
            metrics.write({"step": done, "dev_loss": dev_loss})
            progress.write(f"step {done}: dev loss {dev_loss:.4f}")
        if done % save_steps == 0 or done == max_steps:
            state = {"totals": totals, "batch_size": cfg["train"]["batch_size"],
                     "grad_accum": cfg["train"]["grad_accum"], "world_size": world}
            if stream is not None:
                state["packer"] = stream.state_dict()
            save_checkpoint(run_dir, done, model, optimizer, scheduler, cfg, model_path, state)
            progress.write(f"step {done}: saved {run_dir / CHECKPOINTS / f'step_{done:07d}'}")
    progress.close()
    metrics.close()
    if rank == 0:
        print(f"train: loss curves in {plot_losses(run_dir / 'metrics.jsonl', run_dir / 'losses.png')}", flush=True)
    if dist.is_initialized():
        dist.barrier()  # ranks leave together: gloo can abort a rank that tears down while a peer still works
        dist.destroy_process_group()


def resume_advice(run_dir: Path, step: int) -> str:
    found = checkpoint_dirs(run_dir)
    again = (f"the same data comes again at step {step}: add train.skip_nonfinite=true to skip non-finite updates, "
             "or lower optim.lr")
    if not found:
        return f"No checkpoint was saved before it: start the run again ({again})."
    return f"The newest checkpoint is {found[-1]}: continue from it with resume=auto ({again})."


def plot_losses(metrics_path: Path, png_path: Path) -> Path:
    """Train and dev loss against step, from metrics.jsonl, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("loss", "-"), ("dev_loss", "o-")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), style, label=key.replace("_", " "), markersize=3)
    ax.set(xlabel="optimizer step", ylabel="loss (nats per target token)", title=metrics_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


class MetricsLog:
    """metrics.jsonl in the run directory (rank 0); on resume, lines after the resumed step are dropped."""

    def __init__(self, run_dir: Path, start_step: int, cfg: dict, enabled: bool):
        self.enabled = enabled
        self.wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        kept = []
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.file = self.path.open("a")
        if cfg["wandb"]["project"]:
            import wandb  # optional: only when asked for

            self.wandb = wandb.init(project=cfg["wandb"]["project"], name=cfg["wandb"]["name"] or None, config=cfg)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()


# -- command line ------------------------------------------------------------------------------


class HelpConfig(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        print(describe())
        parser.exit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="--help-config lists every key with its default, allowed values and meaning; configs/ has one file "
        "per tokenizer and regime. Exit status: 0 done, 2 bad configuration or data (nothing written), 1 the run "
        "stopped (e.g. a non-finite loss; the message says how to continue).",
    )
    parser.add_argument("config", help="JSON config file")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value (value parsed as JSON when it parses)")
    parser.add_argument("--help-config", nargs=0, action=HelpConfig, help="print every config key and exit")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg)
    except (ConfigError, DataError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training: continued pre-training (CPT) and supervised fine-tuning (SFT) of an extended Llama 3.x.

    python train.py configs/cpt_speechtokenizer.json [dotted.key=value ...]
    torchrun --nproc 4 train.py configs/sft_speechtokenizer.json resume=auto

One optimizer step consumes batch_size x grad_accum x world_size sequences, taken in order from a
permutation of the training rows fixed by (seed, epoch); the loss is the sum of token losses over
the whole step divided by its number of target tokens, across micro-batches and ranks. Every
sequence is a pure function of (epoch, row), so the data position is just the step number and a
resumed run continues with exactly the losses of an uninterrupted one.

With data.packed, the sequences are packed into rows of max_seq_len instead (data.batches) and
a step consumes batch_size x grad_accum x world_size rows: fixed tokens per step, little padding.
The data position is then the packer's state, saved with each checkpoint.

Checkpoints are Hugging Face LlamaForCausalLM directories (plus training_state.pt), written under a
temporary name and renamed, in <run_dir>/checkpoints/step_NNNNNNN. The training state records the
settings that change token ids, with the tokenizer files' SHA-256; a resume with other ones is
refused (`check_same_settings`).
"""

import argparse
import dataclasses
import json
import math
import os
import pickle
import random
import shutil
import sys
import time
import zipfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from config import SCHEMA, ConfigError, describe, load_config
from config import get as config_get
from data import reference_run
from data.batches import (PackedStream, Sequences, StepBatches, collate, load_data, packed_micro_batches, prefetched,
                          step_micro_batches, token_kinds)
from data.dataset import DataError
from data.samples import IGNORE, SFT_TASKS
from data.tokenizer import DSU_BPE_MODEL, DSU_BPE_SETTINGS, dsu_bpe_files
from files import (NotRegularFile, atomic_write, directory_problem, file_sha256, read_json, regular_file,
                   regular_files_only, write_json)
from model import DTYPES, CompiledForward
from model_dir import (CHECKPOINTS, TRAINING_CONFIG, check_weights, checkpoint_dirs, load_model, model_tokenizer,
                       read_training_config, save_pretrained, step_dir)

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


# -- the model ---------------------------------------------------------------------------------


def cosine_with_warmup(warmup: int, total: int, cycles: float):
    """LR multiplier: linear warm-up from 0, then a cosine over `cycles` periods (0.5: down to 0)."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * cycles * 2.0 * progress)))

    return multiplier


def build_model(cfg: dict, model_path: Path, device: torch.device, world: int, announce: bool):
    """(the model, wrapped for DDP or FSDP when distributed, and the callable that runs its forward pass)."""
    dtype = DTYPES[cfg["model"]["dtype"]]
    model = load_model(model_path, dtype=dtype, device=device,
                       activation_checkpointing=cfg["model"]["activation_checkpointing"])
    model.loss_chunk_size = cfg["train"]["loss_chunk_size"]
    if cfg["model"]["fsdp"]:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    elif world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["model"]["compile"] is True or (cfg["model"]["compile"] == "auto" and device.type == "cuda"):
        return model, CompiledForward(model, announce)
    return model, model


# -- the loop ----------------------------------------------------------------------------------

TOTALS = ("tokens", "text_tokens", "dsu_tokens", "special_tokens", "target_tokens")  # counted since step 0


def train(cfg: dict) -> None:
    rank, world, device = setup_distributed(cfg["train"]["device"])
    run_dir, model_path, data_cfg = Path(cfg["run_dir"]), Path(cfg["model"]["path"]), cfg["data"]
    try:
        tok = model_tokenizer(model_path, data_cfg)
    except ConfigError as error:
        raise ConfigError(f"'model.path': {error}") from None
    settings = id_settings(cfg, tok)
    resume_from, saved = resolve_resume(cfg, run_dir)
    if saved is not None:  # before the data is converted: a refused run writes nothing
        check_same_settings(resume_from, saved, cfg, settings, announce=rank == 0)
        check_resumable(saved, cfg, world)
    earlier_metrics = kept_metrics(run_dir, saved["step"] if saved is not None else 0)
    train_seqs, dev_seqs = load_data(data_cfg, run_dir, tok, cfg["seed"])
    stream = PackedStream(train_seqs, data_cfg["max_seq_len"], cfg["seed"], data_cfg["shuffle"]) if data_cfg["packed"] else None

    torch.manual_seed(cfg["seed"])
    model, forward = build_model(cfg, resume_from or model_path, device, world, announce=rank == 0)
    opt = cfg["optim"]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"],
        weight_decay=opt["weight_decay"], fused=device.type == "cuda",
    )
    max_steps = cfg["train"]["max_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(opt["warmup_steps"], max_steps, opt["num_cycles"])
    )
    start_step, packer_state = 0, None
    totals = torch.zeros(len(TOTALS), dtype=torch.int64, device=device)  # on the device: counting never waits
    if saved is not None:
        restore_training_state(saved, model, optimizer, scheduler)
        start_step = saved["step"]
        totals += torch.tensor([saved["totals"][key] for key in TOTALS], device=device)
        if stream is not None:
            stream.load_state_dict(saved["packer"])

    metrics = MetricsLog(run_dir, earlier_metrics, cfg, enabled=rank == 0)
    if rank == 0:
        where = f"resuming from {resume_from}" if resume_from else f"from {model_path}"
        packing = f", packed into rows of {data_cfg['max_seq_len']}" if stream is not None else ""
        task, weights = data_cfg["task"], data_cfg["sft"]["tasks"]
        if task == "sft" and (weights["tts"] or weights["continue"]):  # a mixture: say so
            task += " (" + ", ".join(f"{name} {weight:g}" for name, weight in weights.items() if weight) + ")"
        print(f"train: {task} on {len(train_seqs)} rows{packing}, {max_steps} steps, {where}; "
              f"world size {world}, device {device}, run dir {run_dir}", flush=True)

    shape = {"batch_size": cfg["train"]["batch_size"], "grad_accum": cfg["train"]["grad_accum"], "rank": rank,
             "world": world, "device": device}

    def step_batches(step: int) -> StepBatches:
        if stream is None:
            return StepBatches(*step_micro_batches(train_seqs, step, seed=cfg["seed"], shuffle=data_cfg["shuffle"],
                                                   **shape))
        return StepBatches(*packed_micro_batches(stream, **shape), stream.state_dict())  # the state after this step

    save_steps, eval_steps, log_steps = cfg["train"]["save_steps"], cfg["train"]["eval_steps"], cfg["train"]["log_steps"]
    sync_off = getattr(model, "no_sync", None)
    progress = tqdm(total=max_steps, initial=start_step, disable=rank != 0, desc="train", dynamic_ncols=True)
    window_start, window_tokens_from = time.perf_counter(), totals[0].item()
    steps = range(start_step, max_steps)
    for step, (epoch, micro, firsts, packer_state) in zip(steps, prefetched(step_batches, steps, device)):
        n_targets = all_reduce_sum(sum((targets != IGNORE).sum() for _, targets, *_ in micro))
        scale = world / n_targets.clamp(min=1).float()  # DDP and FSDP average gradients over ranks
        micro_losses, kinds = [], 0
        for m, batch in enumerate(micro):
            last = m == len(micro) - 1
            with sync_off() if (sync_off and not last) else nullcontext():
                loss_sum, _ = forward_loss(forward, batch, device)
                (loss_sum * scale).backward()
            micro_losses.append(loss_sum.detach())
            kinds = kinds + token_kinds(batch[0], tok)  # padding is not counted
        # With clipping off (max_grad_norm 0) the norm is still measured: a non-finite one must stop the step.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opt["max_grad_norm"] or float("inf"))
        if isinstance(grad_norm, DTensor):  # FSDP: the norm over every shard
            grad_norm = grad_norm.full_tensor()
        loss = all_reduce_sum(torch.stack(micro_losses).sum()) / n_targets.clamp(min=1)
        # The step's one wait on the device: is the update finite (and did the step train on anything)?
        finite, no_targets = torch.stack([loss.isfinite() & grad_norm.isfinite(), n_targets == 0]).tolist()
        lr = scheduler.get_last_lr()[0]
        done = step + 1
        if no_targets and rank == 0:
            progress.write(f"warning: step {done} has no target tokens (is data.max_seq_len too short "
                           "for the prompt? SFT truncation cuts the transcript first)")
        if finite:
            optimizer.step()
        else:  # every rank sees the same all-reduced loss and norm, so all take this branch
            metrics.flush()
            report = nonfinite_report(done, loss.item(), grad_norm.item(), micro_losses, firsts, epoch,
                                      train_seqs.rows, rank)
            if not cfg["train"]["skip_nonfinite"]:
                raise TrainingStopped(f"{report}. Nothing of this step was applied or saved. "
                                      + resume_advice(run_dir, done))
            progress.write(f"warning: {report}: update skipped (train.skip_nonfinite)")
            metrics.write({"step": done, "skipped": "non-finite loss or gradient norm"})
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        counts = all_reduce_sum(kinds)  # all ranks' tokens
        totals += torch.cat([counts.sum().view(1), counts, n_targets.view(1)])
        progress.update(1)
        if finite:
            metrics.add_loss(done, loss)
        if finite and (done % log_steps == 0 or done == max_steps or done == start_step + 1):
            now, elapsed = dict(zip(TOTALS, totals.tolist())), time.perf_counter() - window_start
            metrics.flush(last={"epoch": epoch, "lr": lr, "grad_norm": grad_norm.item(),
                                "tokens_per_s": (now["tokens"] - window_tokens_from) / max(elapsed, 1e-9), **now})
            progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
            window_start, window_tokens_from = time.perf_counter(), now["tokens"]
        if dev_seqs is not None and (done % eval_steps == 0 or done == max_steps):
            metrics.flush()
            dev_loss = evaluate(model, forward, dev_seqs, cfg["train"]["batch_size"], rank, world, device)
            metrics.write({"step": done, "dev_loss": dev_loss})
            progress.write(f"step {done}: dev loss {dev_loss:.4f}")
        if done % save_steps == 0 or done == max_steps:
            metrics.flush()  # a resumed run keeps the lines up to its checkpoint
            state = {"totals": dict(zip(TOTALS, totals.tolist())), "batch_size": cfg["train"]["batch_size"],
                     "grad_accum": cfg["train"]["grad_accum"], "world_size": world, "settings": settings}
            if stream is not None:
                state["packer"] = packer_state
            save_checkpoint(run_dir, done, model, optimizer, scheduler, cfg, model_path, state)
            progress.write(f"step {done}: saved {step_dir(run_dir, done)}")
    progress.close()
    metrics.close()
    if rank == 0:
        print(f"train: loss curves in {plot_losses(run_dir / METRICS, run_dir / 'losses.png')}", flush=True)
    if dist.is_initialized():
        dist.barrier()  # ranks leave together: gloo can abort a rank that tears down while a peer still works
        dist.destroy_process_group()


# -- evaluation --------------------------------------------------------------------------------


def forward_loss(model, batch, device):
    """(loss sum, target count) of a micro-batch: (inputs, targets) from `collate`, or `dsu_ops.Packed`
    rows (tokens, targets, positions, document_ids); targets are shifted in both."""
    inputs, targets, *packing = (t.to(device, non_blocking=True) for t in batch)
    positions, document_ids = packing or (None, None)
    return model(inputs, positions=positions, document_ids=document_ids, labels=targets)


@torch.no_grad()
def evaluate(model, forward, seqs: Sequences, batch: int, rank: int, world: int, device) -> float:
    """Mean token loss over the whole dev set (epoch 0's sequences), across ranks; `forward` runs `model`."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for first in range(0, len(seqs), batch * world):  # as many forward passes on every rank: FSDP's are collective
        rows = range(first + rank * batch, min(first + (rank + 1) * batch, len(seqs)))
        inputs, targets = collate(seqs.assembled(rows or [0], 0, device), seqs.pad_id)
        if not rows:  # this rank is past the end: a pass that counts nothing
            targets.fill_(IGNORE)
        loss_sum, count = forward_loss(forward, (inputs, targets), device)
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


def resume_advice(run_dir: Path, step: int) -> str:
    found = checkpoint_dirs(run_dir)
    again = (f"the same data comes again at step {step}: add train.skip_nonfinite=true to skip non-finite updates, "
             "or lower optim.lr")
    if not found:
        return f"No checkpoint was saved before it: start the run again ({again})."
    return f"The newest checkpoint is {found[-1]}: continue from it with resume=auto ({again})."


# -- checkpoints -------------------------------------------------------------------------------

STATE_FILE = "training_state.pt"
METRICS = "metrics.jsonl"
STATE_KEYS = ("step", "totals", "optimizer", "scheduler", "rng", "batch_size", "grad_accum", "world_size")


CHECKPOINT_FILES = ("config.json", "generation_config.json", "original/tokenizer.model", "original/params.json",
                    TRAINING_CONFIG, STATE_FILE)
# numpy's RNG state is an ndarray: unpickling may rebuild plain arrays and nothing else
NUMPY_ARRAY_GLOBALS = [np.empty(0).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def checkpoint_damage(checkpoint: Path) -> str | None:
    """What makes `checkpoint` unusable for resuming (a missing, truncated or damaged file, or one
    that is not a regular file), or None. Reads the weights' headers and the training state's zip
    directory, not the tensors."""
    try:
        regular_files_only(checkpoint, "original")  # a FIFO would block the readers below
    except NotRegularFile as error:
        return str(error)
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
    final = step_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    # A checkpoint already there is incomplete (no training state), or from steps that a resume from an
    # earlier checkpoint redoes: replaced.
    with atomic_write(final, directory=True) as tmp:
        (tmp / "original").mkdir()
        inner = getattr(model, "module", model)  # DDP wraps the model
        # the config says what the weights are stored as
        save_pretrained(tmp, dataclasses.replace(inner.config, torch_dtype=cfg["model"]["dtype"]), weights)
        shutil.copy(model_src / "generation_config.json", tmp / "generation_config.json")
        for name in ("tokenizer.model", "params.json", *dsu_bpe_files(model_src / "original")):
            shutil.copy(model_src / "original" / name, tmp / "original" / name)
        write_json(tmp / TRAINING_CONFIG, cfg)
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        torch.save({**state, "step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rng},
                   tmp / STATE_FILE)


def read_training_state(checkpoint: Path) -> dict:
    """The training state as data: tensors, numbers, strings and plain numpy arrays, nothing executable."""
    path = checkpoint / STATE_FILE
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAY_GLOBALS):
            state = torch.load(regular_file(path), map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise ConfigError(f"{path}: cannot be read ({str(error).splitlines()[0]})") from None
    missing = [key for key in STATE_KEYS if key not in state] if isinstance(state, dict) else ["all of them"]
    if missing:
        raise ConfigError(f"{path}: not a training state (no {', '.join(missing)})")
    return state


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
        problem = checkpoint_damage(path) if path.is_dir() else directory_problem(path) or "no such directory"
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


# Settings that change the token ids of a row or what its loss trains on: a run resumes only with
# the checkpoint's. The task's own ones are compared for the run's task; all are recorded.
ID_SETTINGS = ("data.task", "data.n_dsus", "data.deduplicate", "data.modality_tokens", "data.max_seq_len")
SFT_TASK_SETTINGS = (*(f"data.sft.tasks.{task}" for task in SFT_TASKS), "data.sft.tts_system_prompt",
                     "data.sft.continue_system_prompt", "data.sft.continue_fraction")
SFT_SETTINGS = ("data.sft.system_prompt", "data.sft.train_on_input", *SFT_TASK_SETTINGS)
CPT_SETTINGS = ("data.cpt.sequence_type",)
INTERLEAVE_SETTINGS = ("data.cpt.sampling_rate", "data.cpt.downsampling_ratio", "data.cpt.mean_seq_len_tokens",
                       "data.cpt.binom_prob")
DATA_SETTINGS = ID_SETTINGS + SFT_SETTINGS + CPT_SETTINGS + INTERLEAVE_SETTINGS
TOKENIZER_SETTINGS = ("tokenizer.sha256", "tokenizer.speech_bpe")
NOT_RECORDED = "(not recorded)"


def tokenizer_settings(tokenizer_file: Path) -> dict:
    """The SHA-256 of a tokenizer file, and its speech BPE's (merged tokens and model hash, or None)."""
    bpe = tokenizer_file.parent / DSU_BPE_MODEL
    try:
        speech_bpe = None
        if os.path.lexists(bpe):
            merges = read_json(bpe.with_name(DSU_BPE_SETTINGS)).get("merges")
            speech_bpe = f"{merges} merged tokens, {DSU_BPE_MODEL} sha256 {file_sha256(bpe)}"
        return {"tokenizer.sha256": file_sha256(tokenizer_file), "tokenizer.speech_bpe": speech_bpe}
    except (OSError, ValueError) as error:  # NotRegularFile, JsonFileError: ValueErrors
        raise ConfigError(f"{tokenizer_file.parent}: cannot read the tokenizer files ({error})") from None


def id_settings(cfg: dict, tok) -> dict:
    """What a checkpoint records (in its training state) of the settings that change token ids."""
    return {**{key: config_get(cfg, key) for key in DATA_SETTINGS}, **tokenizer_settings(Path(tok.path))}


def compared_keys(cfg: dict) -> tuple[str, ...]:
    """The settings of `id_settings` that this run's task uses."""
    data = cfg["data"]
    if data["task"] == "sft":
        return ID_SETTINGS + SFT_SETTINGS
    interleaved = data["cpt"]["sequence_type"] == "interleaved"
    return ID_SETTINGS + CPT_SETTINGS + (INTERLEAVE_SETTINGS if interleaved else ())


def recorded(tree: dict, dotted: str):
    """A dotted key's value in a nested dict read from a checkpoint, or NOT_RECORDED. The SFT task
    settings, added in 2026-12, read as their defaults (ASR alone) where an earlier run lacks them."""
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return SCHEMA[dotted].default if dotted in SFT_TASK_SETTINGS else NOT_RECORDED
        tree = tree[key]
    return tree


def checkpoint_records(checkpoint: Path, saved: dict, announce: bool) -> list[tuple[str, dict]]:
    """(where, settings) that a checkpoint holds of how it was trained: its training state's record
    (checkpoints saved before there was one: none), its training_config.json (data settings) and
    its own copy of the tokenizer files."""
    path = checkpoint / TRAINING_CONFIG
    saved_config = read_training_config(checkpoint)
    records = [(str(path), {key: recorded(saved_config, key) for key in DATA_SETTINGS}),
               (str(checkpoint / "original"), tokenizer_settings(checkpoint / "original" / "tokenizer.model"))]
    if isinstance(saved.get("settings"), dict):
        return [(str(checkpoint / STATE_FILE), saved["settings"]), *records]
    if announce:
        print(f"train.py: note: {checkpoint / STATE_FILE} has no record of the settings that change token ids "
              "(saved by an earlier version): this run is compared with the checkpoint's training_config.json "
              "and its original/tokenizer.model instead", file=sys.stderr, flush=True)
    return records


def check_same_settings(checkpoint: Path, saved: dict, cfg: dict, settings: dict, announce: bool) -> None:
    """Refuses a resume whose settings would build other token ids than the checkpoint was trained
    on (n_dsus, deduplication, modality tokens, task, sequence type, prompt, max_seq_len, the
    tokenizer and speech BPE files): naming each key with both values, and the way to train on from
    those weights as a new run."""
    keys = compared_keys(cfg) + TOKENIZER_SETTINGS
    for where, then in checkpoint_records(checkpoint, saved, announce):
        differ = [key for key in keys if key in then and then[key] != settings[key]]
        if differ:
            raise ConfigError(
                f"resume: {checkpoint} was trained with {shown(differ, then)} (per {where}), this run has "
                f"{shown(differ, settings)}. These change the token ids or what is trained on, so this would not "
                f"continue that run. To train from its weights with this run's settings, start a new run: "
                f"model.path={checkpoint} run_dir=<a new directory>, without resume"
            )


def shown(keys: list[str], settings: dict) -> str:
    """'key value, ...' with long values (a system prompt) cut."""
    values = [value if value == NOT_RECORDED else json.dumps(value) for value in map(settings.get, keys)]
    return ", ".join(f"{key} {text if len(text) <= 100 else text[:97] + '...'}" for key, text in zip(keys, values))


def check_resumable(saved: dict, cfg: dict, world: int) -> None:
    if ("packer" in saved) != cfg["data"]["packed"]:
        raise ConfigError(
            f"resume: the checkpoint was made with data.packed={json.dumps('packer' in saved)}, this run has "
            f"{json.dumps(cfg['data']['packed'])}; its data position means nothing to this run. Start a new run "
            "from it (model.path) instead."
        )
    now = {"batch_size": cfg["train"]["batch_size"], "grad_accum": cfg["train"]["grad_accum"], "world_size": world}
    then = {key: saved[key] for key in now}
    if then != now and not cfg["resume_force"]:
        raise ConfigError(
            f"resume: the checkpoint was made with {then}, this run has {now}; the data order and losses "
            "would differ. Pass resume_force=true to continue anyway."
        )


# -- metrics ---------------------------------------------------------------------------------


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
    try:
        with atomic_write(png_path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return png_path


def kept_metrics(run_dir: Path, start_step: int) -> list[str]:
    """The lines of the run's metrics.jsonl up to `start_step` (the resumed checkpoint's; 0 for a new
    run: none), read before anything is written. A last line cut short by a kill is dropped; any
    other line that is not a record with a step is refused, naming it."""
    path = run_dir / METRICS
    if not os.path.lexists(path):
        return []
    try:  # checked even when nothing is kept: writing to a FIFO would block as well
        lines = regular_file(path).read_text(encoding="utf-8").splitlines() if start_step else []
    except (OSError, ValueError) as error:  # NotRegularFile (a FIFO would block), not UTF-8
        raise ConfigError(f"{path}: cannot be read ({error})") from None
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
            step = None
        if not isinstance(step, int) or isinstance(step, bool):
            if number == len(lines):
                break  # a write cut short
            raise ConfigError(f"{path}:{number}: not a metrics record with a step; repair or remove the line")
        if step <= start_step:
            kept.append(line)
    return kept


class MetricsLog:
    """metrics.jsonl in the run directory (rank 0), starting with the `kept` lines of the run so
    far (`kept_metrics`; on resume, lines after the resumed step are dropped). Each step's loss stays
    on the device until `flush` (at log steps, and before evaluations, checkpoints and stops) writes
    the pending ones together: logging a step never waits for it."""

    def __init__(self, run_dir: Path, kept: list[str], cfg: dict, enabled: bool):
        self.enabled, self.pending = enabled, []
        self.wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / METRICS
        with atomic_write(self.path) as tmp:  # on resume, a kill mid-rewrite must not lose the kept lines
            tmp.write_text("".join(line + "\n" for line in kept))
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

    def add_loss(self, step: int, loss: torch.Tensor) -> None:
        if self.enabled:
            self.pending.append((step, loss))

    def flush(self, last: dict | None = None) -> None:
        """Writes the pending losses, one line per step; `last` adds fields to the newest one's line."""
        if not self.pending:
            return
        values = torch.stack([loss for _, loss in self.pending]).tolist()
        for (step, _), value in zip(self.pending[:-1], values):
            self.write({"step": step, "loss": value})
        self.write({"step": self.pending[-1][0], "loss": values[-1], **(last or {})})
        self.pending = []

    def close(self) -> None:
        self.flush()
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

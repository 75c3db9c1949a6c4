"""Training batches: the sequences of a data source, and the micro-batches of each optimizer step.

Every sequence is a pure function of (epoch, row): `Sequences` describes it with the builders of
`data.samples`, and the `dsu_ops` ops write whole batches of them. Unpacked, a step takes its rows
from a permutation fixed by (seed, epoch) (`step_micro_batches`), each micro-batch padded to its
longest sequence, as the reference trains. Packed, the sequences stream through a first-fit packer
into rows of max_seq_len (`PackedStream`, `packed_micro_batches`): fixed tokens per step, little
padding, and the data position is the packer's state, saved with each checkpoint.
"""

import os
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import NamedTuple
from pathlib import Path

import numpy as np
import torch

import dsu_ops
from data.dataset import DataError, Source, task_fields
from data.samples import IGNORE, SEED, Interleave, Pieces, SampleBuilder, interleave_spans, sft_task
from data.store import RowStore, open_store, store_path
from data.tokenizer import Tokenizer, fill_from_tokenizer

PACK_OPEN_ROWS = 128  # rows a packed stream keeps open for later sequences to fill: more, less padding
PACK_LOOKAHEAD = 64  # sequences described and measured at a time


class Sequences:
    """Training or dev sequences: row `i` of epoch `e` always becomes the same tokens and labels."""

    def __init__(self, rows: RowStore | list[dict], builder: SampleBuilder, task: str, *, sequence_type: str,
                 interleave: Interleave, sft: dict, seed: int = SEED, name: str = "data"):
        self.rows, self.builder, self.task, self.name = rows, builder, task, name
        self.sequence_type, self.interleave = sequence_type, interleave
        self.sft, self.seed = sft, seed  # the data.sft section; the run's seed draws each sample's SFT task

    @classmethod
    def from_config(cls, rows: RowStore | list[dict], data_cfg: dict, tokenizer: Tokenizer, name: str = "data",
                    seed: int = SEED):
        """The sequences that the config's `data` section describes."""
        cpt, sft = data_cfg["cpt"], data_cfg["sft"]
        builder = SampleBuilder(tokenizer, deduplicate=data_cfg["deduplicate"],
                                modality_tokens=data_cfg["modality_tokens"], max_seq_len=data_cfg["max_seq_len"])
        interleave = Interleave(cpt["sampling_rate"], cpt["downsampling_ratio"], cpt["mean_seq_len_tokens"],
                                cpt["binom_prob"])
        return cls(rows, builder, data_cfg["task"], sequence_type=cpt["sequence_type"], interleave=interleave,
                   sft=sft, seed=seed, name=name)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def pad_id(self) -> int:
        return self.builder.tok.pad_id

    def pieces_many(self, indices, epoch: int) -> list[Pieces]:
        """The sequences of these rows, described as pieces; interleaving's spans are drawn for all
        of them at once (`interleave_spans_many`)."""
        indices = [int(i) for i in indices]
        rows = [self.rows[i] for i in indices]
        if self.task == "sft":
            weights = self.sft["tasks"]
            return [self.builder.sft_pieces(sft_task(i, epoch, weights, self.seed), row, self.sft)
                    for i, row in zip(indices, rows)]
        if self.sequence_type == "interleaved":
            spans = interleave_spans_many(indices, [len(row["tokenized"]) for row in rows], epoch, self.interleave)
            return [self.builder.cpt_interleaved_pieces(row, i, epoch, self.interleave, spans=s)
                    for row, i, s in zip(rows, indices, spans)]
        text_first = self.sequence_type == "concatenated_txt_dsu"
        return [self.builder.cpt_concatenated_pieces(row, text_first=text_first) for row in rows]

    def assembled(self, indices, epoch: int, device=None) -> dsu_ops.Assembled:
        """These rows' sequences, flat, written by the assemble op (on `device`)."""
        return dsu_ops.assemble_batch(self.pieces_many(indices, epoch), self.builder.tok.dsu_offset,
                                      self.builder.deduplicate, device)

    def lengths(self, pieces: list[Pieces]) -> list[int]:
        """How many tokens these sequences have once built, in one call of the measure op."""
        return dsu_ops.measure(dsu_ops.flatten(pieces), self.builder.deduplicate).tolist()


def interleave_spans_many(indices: list[int], n_words: list[int], epoch: int,
                          settings: Interleave) -> list[tuple[bool, list[int]]]:
    """`data.samples.interleave_spans` for many rows: the C++ op where it applies, NumPy otherwise."""
    spans = dsu_ops.interleave_spans(indices, n_words, epoch, int(settings.mean_seq_len_tokens), settings.binom_prob,
                                     SEED)
    return spans or [interleave_spans(i, epoch, w, settings) for i, w in zip(indices, n_words)]


def store_options(data_cfg: dict) -> dict:
    """How a source is read into its store for this run: the fields its task needs, and the frame
    rate that interleaved CPT's word times must fit."""
    cpt = data_cfg["cpt"]
    options = {"n_dsus": data_cfg["n_dsus"], "fields": task_fields(data_cfg["task"], cpt["sequence_type"])}
    if data_cfg["task"] == "cpt" and cpt["sequence_type"] == "interleaved":
        options["frame_rate"] = cpt["sampling_rate"] / cpt["downsampling_ratio"]
    return options


def load_data(data_cfg: dict, run_dir: Path, tokenizer: Tokenizer,
              seed: int = SEED) -> tuple[Sequences, Sequences | None]:
    """The train and dev sequences, read through their stores (`data.store`): converted by the
    first process of each machine, memory-mapped by all. When either source is refused, what this
    call created (stores, cache and run directories) is removed: a refused run leaves nothing new."""
    fill_from_tokenizer(data_cfg, tokenizer)  # n_dsus checks every row's units: never left unknown
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
    train_seqs, *dev = (Sequences.from_config(rows, data_cfg, tokenizer, name=str(source), seed=seed)
                        for rows, source in zip(stores, sources))
    return train_seqs, (dev[0] if dev else None)


def epoch_order(n_rows: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    return np.random.default_rng((seed, epoch)).permutation(n_rows) if shuffle else np.arange(n_rows)


def collate(assembled: dsu_ops.Assembled, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and next-token targets (labels shifted left by one, IGNORE at the end),
    on the device the sequences are on."""
    tokens, labels, offsets = assembled
    lengths = offsets.diff()
    n_seqs, width = len(lengths), int(lengths.max()) if len(lengths) else 0
    row = torch.repeat_interleave(torch.arange(n_seqs, device=tokens.device), lengths, output_size=len(tokens))
    column = torch.arange(len(tokens), device=tokens.device) - offsets[:-1][row]
    inputs = torch.full((n_seqs, width), pad_id, dtype=torch.int64, device=tokens.device)
    inputs[row, column] = tokens
    # label j lands in column j of a row one wider, so that dropping column 0 shifts every row by one
    targets = torch.full((n_seqs, width + 1), IGNORE, dtype=torch.int64, device=tokens.device)
    targets[row, column] = labels
    return inputs, targets[:, 1:].contiguous()


def step_micro_batches(seqs: Sequences, step: int, *, batch_size: int, grad_accum: int, seed: int, shuffle: bool,
                       rank: int, world: int, device=None):
    """(epoch, this rank's micro-batches for optimizer step `step` (0-based) as (inputs, targets)
    pairs on `device`, the row index of each micro-batch's first sequence).

    The step takes the next batch_size*grad_accum*world rows of the epoch's order; micro-batch m
    is the m-th slice of batch_size*world rows, of which this rank takes its batch_size, so a run
    on 2 processes sees the same micro-batches as 1 process with twice the batch size.
    """
    per_step = batch_size * grad_accum * world
    steps_per_epoch = len(seqs) // per_step
    if steps_per_epoch == 0:
        raise DataError(f"{seqs.name}: {len(seqs)} rows are fewer than one optimizer step ({per_step})")
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    order = epoch_order(len(seqs), seed, epoch, shuffle)
    chunk = order[step_in_epoch * per_step : (step_in_epoch + 1) * per_step]
    micro, firsts = [], []
    for m in range(grad_accum):
        rows = chunk[m * batch_size * world : (m + 1) * batch_size * world][rank * batch_size : (rank + 1) * batch_size]
        micro.append(collate(seqs.assembled(rows, epoch, device), seqs.pad_id))
        firsts.append(int(rows[0]))
    return epoch, micro, firsts


class PackedStream:
    """The training data of a packed run: one stream of rows, computed identically on every rank.

    Sequences enter in each epoch's order (`epoch_order`) as `Pieces`, PACK_LOOKAHEAD at a time,
    are measured, and a first-fit packer (`dsu_ops.first_fit_packer`) with PACK_OPEN_ROWS open rows
    places them by length; the rows that leave it wait in a queue. When an epoch's sequences run
    out, its open rows are repacked and queued, so no row mixes epochs and every sequence is
    trained on once per epoch. The `pack` op later writes each rank's rows, exactly as the
    unpacked path builds the sequences (cut to max_seq_len by the builders). The position in the
    stream is (epoch, sequences taken from its order, the indices of the sequences in the open
    and the queued rows): `state_dict`, saved with each checkpoint. A sequence is a pure function
    of (epoch, index), so a restored stream rebuilds those rows and continues with exactly the
    rows of an uninterrupted one. Memory: the open and queued rows' sequences, not the data set.
    """

    def __init__(self, seqs: Sequences, max_seq_len: int, seed: int, shuffle: bool):
        self.seqs, self.seed, self.shuffle, self.max_seq_len = seqs, seed, shuffle, max_seq_len  # config.py checks it fits
        self.packer = dsu_ops.first_fit_packer(max_seq_len, PACK_OPEN_ROWS)
        self.open_samples: dict[int, Pieces] = {}  # index -> sequence, in open or queued rows
        self._start_epoch(0, 0)

    def _start_epoch(self, epoch: int, position: int) -> None:
        self.epoch, self.position = epoch, position
        self.order = epoch_order(len(self.seqs), self.seed, epoch, self.shuffle)
        self.left: deque[list[int]] = deque()  # rows that left the packer, not yet handed out

    def next_row(self) -> tuple[int, list[int], list[Pieces]]:
        """(epoch, the row's sequences' indices, those sequences), for `dsu_ops.pack`."""
        while not self.left:
            if self.position == len(self.order):
                self._start_epoch(self.epoch + 1, 0)
            indices = self.order[self.position : self.position + PACK_LOOKAHEAD].tolist()
            pieces = self.seqs.pieces_many(indices, self.epoch)
            lengths = self.seqs.lengths(pieces)
            # the packer drops empty sequences: nothing to keep
            self.open_samples.update((i, sample) for i, sample, n in zip(indices, pieces, lengths) if n)
            self.left.extend(self.packer.add(indices, lengths))
            self.position += len(indices)
            if self.position == len(self.order):
                self.left.extend(self.packer.finish())
        row = self.left.popleft()
        return self.epoch, row, [self.open_samples.pop(i) for i in row]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "open_rows": self.packer.open_rows(),
                "left_rows": list(self.left), "max_seq_len": self.max_seq_len}

    def load_state_dict(self, state: dict) -> None:
        assert state["max_seq_len"] == self.max_seq_len, "train.check_same_settings compares data.max_seq_len first"
        self._start_epoch(state["epoch"], state["position"])
        open_rows, left = state["open_rows"], state.get("left_rows")
        if left is None:  # saved before rows were queued: an epoch's last rows were then still open
            open_rows, left = ([], open_rows) if self.position == len(self.order) else (open_rows, [])
        indices = [i for row in [*open_rows, *left] for i in row]
        self.open_samples = dict(zip(indices, self.seqs.pieces_many(indices, self.epoch)))
        length = dict(zip(indices, self.seqs.lengths([self.open_samples[i] for i in indices])))
        self.packer.reopen(open_rows, [[length[i] for i in row] for row in open_rows])
        self.left.extend(left)


def packed_micro_batches(stream: PackedStream, *, batch_size: int, grad_accum: int, rank: int, world: int,
                         device=None):
    """(epoch, this rank's micro-batches for the next optimizer step as `dsu_ops.Packed` rows on
    `device`, the index of each micro-batch's first sequence):
    the step takes the stream's next batch_size*grad_accum*world rows, sliced as
    `step_micro_batches` slices sequences, so 2 processes see what 1 process with twice the batch
    size sees. Only this rank's rows are written (by the `pack` op; on the GPU when it is one)."""
    rows = [stream.next_row() for _ in range(batch_size * grad_accum * world)]
    builder = stream.seqs.builder
    micro, firsts = [], []
    for m in range(grad_accum):
        mine = rows[m * batch_size * world : (m + 1) * batch_size * world][rank * batch_size : (rank + 1) * batch_size]
        micro.append(dsu_ops.pack([samples for _, _, samples in mine], builder.tok.dsu_offset, builder.deduplicate,
                                  stream.max_seq_len, stream.seqs.pad_id, device))
        firsts.append(mine[0][1][0])
    return rows[-1][0], micro, firsts


def token_kinds(inputs: torch.Tensor, tok: Tokenizer) -> torch.Tensor:
    """How many real (non-pad) input tokens are text, DSU, and special (Llama specials and modality),
    as a tensor on the inputs' device: counting does not wait for the device."""
    real = inputs != tok.pad_id
    dsu = (real & tok.is_speech(inputs)).sum()  # DSU and merged-unit (speech BPE) tokens
    special = (real & (inputs >= tok.n_file_tokens)).sum()
    for modality in (tok.speech_id, tok.text_id):
        if modality is not None:
            special = special + (inputs == modality).sum()
    return torch.stack([real.sum() - dsu - special, dsu, special])


class StepBatches(NamedTuple):
    epoch: int
    micro: list  # this rank's micro-batches, on the device
    firsts: list[int]  # the row index of each micro-batch's first sequence
    packer_state: dict | None = None  # packed: the stream's position after this step


def prefetched(make, steps, device: torch.device, background: bool | None = None):
    """make(step) for each of `steps`. On an accelerator (`background` by default) each is made on a
    background thread while the caller trains on the one before, on a CUDA stream of its own that
    the caller's waits for. On a CPU they are made in turn: the host is the device, so a thread
    gains nothing, and its torch ops compete with the step's for the same cores (the demo's padded
    loop ran at 0.7x with one: bench/RESULTS.md)."""
    if background is None:
        background = device.type != "cpu"
    if not background:
        yield from map(make, steps)
        return
    side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def made(step: int):
        with torch.cuda.stream(side) if side is not None else nullcontext():
            batches = make(step)
            return batches, side.record_event() if side is not None else None

    steps = list(steps)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches") as pool:
        ahead = pool.submit(made, steps[0]) if steps else None
        for k in range(len(steps)):
            batches, ready = ahead.result()
            if k + 1 < len(steps):
                ahead = pool.submit(made, steps[k + 1])
            if ready is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(ready)
                for tensor in (t for batch in batches.micro for t in batch):
                    tensor.record_stream(current)  # the side stream must not reuse its memory before this one is done
            yield batches

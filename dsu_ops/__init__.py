"""The fused data ops, the Python side of the C++ and CUDA sources in `kernels/`. (Not itself named
`kernels`: Hugging Face's `kernels` distribution owns that import name, and transformers imports it.)

A batch of samples, described as pieces, is deduplicated (DSU runs), mapped
to token ids, masked, truncated, and either assembled flat or packed into rows, in one pass.

Contract
--------
Input: S samples, each described by the `Pieces` protocol below (`data.samples.Pieces` is one),
flattened by `flatten` into
    values                int64 (N,)    every piece's values, concatenated
    piece_offsets         int64 (P+1,)  piece k is values[piece_offsets[k]:piece_offsets[k+1]]
    piece_is_dsu          bool  (P,)    the piece holds DSU indices: deduplicated if asked, then + dsu_offset
    piece_masked          bool  (P,)    the piece's tokens get IGNORE (-100) labels
    sample_piece_offsets  int64 (S+1,)  sample s is pieces sample_piece_offsets[s]:sample_piece_offsets[s+1]
    sample_limit          int64 (S,)    keep at most this many tokens; -1: no limit
    sample_force_last     int64 (S,)    when the limit cut the sample, its last kept token becomes this
                                        one, masked; negative: none
and two scalars: dsu_offset, the token id of DSU 0, and deduplicate, which drops consecutive
repeats inside each DSU piece (never across pieces).
With a speech BPE (data.tokenizer.DsuBpe), the builders deduplicate and encode each speech span
before the ops, so its tokens arrive as literal pieces and the ops need no BPE of their own
(bench/RESULTS.md, "Speech BPE", has that encoding's cost).

Ops (torch.ops.speech_llama, each exactly what `data.samples.assemble` gives per sample; masked
labels are IGNORE, -100):
- `measure` -> each sample's length (S,), after deduplication and its limit: what a packer places (CPU only:
  the packer runs on the host).
- `assemble` -> Assembled(tokens, labels, sample_offsets): sample s is tokens[sample_offsets[s]:
  sample_offsets[s+1]], labels NOT shifted (label i belongs to token i), IGNORE where masked.
- `pack`, given row_sample_offsets int64 (R+1,) (row r holds samples row_sample_offsets[r]:
  row_sample_offsets[r+1], which the batch lists in row order), max_seq_len L and pad_id ->
  Packed(tokens, targets, positions, document_ids), each int64 (R, L):
  - a row's samples sit side by side in their order from column 0; a row holding more than L
    tokens is an error (builders cut samples to their max_seq_len, CPT to L - 1, SFT to L, which
    is the unpacked path's truncation);
  - positions restart at 0 for every sample; document_ids number the samples of a row 0, 1, 2, ...;
  - targets are ALREADY SHIFTED for next-token prediction: targets[r, j] is the label of the token
    after j in the same sample, and IGNORE at every sample's last token. The trainer must not
    shift packed batches again, and no token is ever trained to predict the next sample's first
    token (a sample's first label is never a target, as in the unpacked path's shift);
  - padding: tokens pad_id, targets IGNORE, positions 0, document_ids -1.
  A packed batch feeds `model(tokens, positions, document_ids, labels=targets)` as it is.

One more op serves the builders rather than the batch: `interleave_spans`, where CPT interleaving
cuts each of many rows into spans, from random draws bit for bit what NumPy's
`default_rng((seed, epoch, row))` draws (data.samples.interleave_spans).

This package imports nothing of the project: callers pass plain arrays and objects that have the
`Pieces` protocol's attributes.

Where each sample goes is decided from `measure`'s lengths alone by a first-fit packer
(`first_fit_packer`, a C++ torch class: first fit over a bounded window of open rows, streaming;
dsu_ops.packing has its rule); `place` runs it over one epoch.

Implementations: C++ (CPU) and CUDA, registered as torch.ops.speech_llama and built on first use
(`dsu_ops.build`; `python -m dsu_ops build` ahead of time), and the NumPy reference (with the
packer in Python: `dsu_ops.reference`), used with one warning when the extension cannot be built.
The CUDA ops wait for the GPU to validate the offsets and to size or check their outputs.
"""

from itertools import chain
from typing import NamedTuple, Protocol, Sequence

import numpy as np
import torch

from dsu_ops import build, reference
from dsu_ops.packing import IGNORE, Packed

__all__ = ["IGNORE", "Assembled", "FlatBatch", "Packed", "Pieces", "assemble_batch", "first_fit_packer", "flatten",
           "interleave_spans", "measure", "pack", "place"]


class Pieces(Protocol):
    """One sample before assembly: `values[k]` is a run of token ids, or of DSU indices when
    `is_dsu[k]`, as native int64 bytes; `masked[k]` gives the run IGNORE labels; at most `limit`
    tokens are kept (None: all), and when that cuts the sample, its last kept token becomes
    `force_last` (None: stays), masked."""

    values: Sequence[bytes]
    is_dsu: Sequence[bool]
    masked: Sequence[bool]
    limit: int | None
    force_last: int | None


class FlatBatch(NamedTuple):
    """A batch of samples in the ops' input layout (NumPy arrays)."""

    values: np.ndarray
    piece_offsets: np.ndarray
    piece_is_dsu: np.ndarray
    piece_masked: np.ndarray
    sample_piece_offsets: np.ndarray
    sample_limit: np.ndarray
    sample_force_last: np.ndarray


class Assembled(NamedTuple):
    tokens: torch.Tensor  # (T,)
    labels: torch.Tensor  # (T,), unshifted
    sample_offsets: torch.Tensor  # (S + 1,)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def flatten(samples: Sequence[Pieces]) -> FlatBatch:
    """The samples in the ops' input layout; the values are copied once (one join of bytes)."""
    runs = [values for sample in samples for values in sample.values]
    n_pieces, n_samples = len(runs), len(samples)
    return FlatBatch(
        values=np.frombuffer(bytearray().join(runs), dtype=np.int64),  # a bytearray: writable, as torch wants
        piece_offsets=_offsets(np.fromiter(map(len, runs), np.int64, n_pieces) // 8),
        piece_is_dsu=np.fromiter(chain.from_iterable([s.is_dsu for s in samples]), bool, n_pieces),
        piece_masked=np.fromiter(chain.from_iterable([s.masked for s in samples]), bool, n_pieces),
        sample_piece_offsets=_offsets(np.fromiter((len(s.values) for s in samples), np.int64, n_samples)),
        sample_limit=np.fromiter((-1 if s.limit is None else s.limit for s in samples), np.int64, n_samples),
        sample_force_last=np.fromiter(
            (-1 if s.force_last is None else s.force_last for s in samples), np.int64, n_samples
        ),
    )


def _run(op: str, batch: FlatBatch, extra_tensors: tuple, args: tuple, device) -> tuple:
    """Runs an op where it can: the CUDA op for a CUDA device (when built with CUDA), else the
    CPU op, else the reference."""
    ext = build.extension()
    if ext is None:
        return getattr(reference, op)(*batch, *extra_tensors, *args)
    inputs = [torch.from_numpy(array) for array in (*batch, *extra_tensors)]
    if device.type == "cuda" and ext.with_cuda:
        inputs = [t.to(device, non_blocking=True) for t in inputs]
    return getattr(torch.ops.speech_llama, op)(*inputs, *args)


def interleave_spans(indices: Sequence[int], n_words: Sequence[int], epoch: int, n: int, p: float,
                     seed: int) -> list[tuple[bool, list[int]]] | None:
    """For each row i with w words, from `default_rng((seed, epoch, i))` as NumPy draws: whether it
    starts with text, and its span bounds [0, cut, ..., w], the cuts being the running sums below w
    of w span lengths, each max(1, Binomial(n, p)). None where the op does not apply (no extension,
    or outside the binomial's inversion regime, which the reference's settings are in): the caller
    draws with NumPy then."""
    if build.extension() is None or min(p, 1 - p) * n > 30:
        return None
    text_first, bounds, offsets = torch.ops.speech_llama.interleave_spans(
        torch.tensor(indices, dtype=torch.int64), torch.tensor(n_words, dtype=torch.int64), seed, epoch, n, p)
    bounds, offsets = bounds.tolist(), offsets.tolist()
    return [(first, bounds[lo:hi]) for first, lo, hi in zip(text_first.tolist(), offsets, offsets[1:])]


def first_fit_packer(max_seq_len: int, capacity: int):
    """A first-fit packer of `capacity` open rows of `max_seq_len` tokens (dsu_ops.packing): the C++
    one, whose items are ints, or without the extension the reference."""
    if build.extension() is None:
        return reference.FirstFitPacker(max_seq_len, capacity)
    return torch.classes.speech_llama.FirstFitPacker(max_seq_len, capacity)


def place(lengths: Sequence[int], max_seq_len: int, capacity: int) -> list[list[int]]:
    """The rows (as sample positions) that one epoch of samples with these lengths becomes when
    streamed through a first-fit packer and finished: what a packed training run trains on."""
    packer = first_fit_packer(max_seq_len, capacity)
    rows = packer.add(list(range(len(lengths))), [int(n) for n in lengths])
    return rows + packer.finish()


def measure(batch: FlatBatch, deduplicate: bool) -> np.ndarray:
    """Every sample's length after deduplication and its limit (on the CPU)."""
    return np.asarray(_run("measure", batch, (), (deduplicate,), torch.device("cpu")))


def assemble_batch(samples: Sequence[Pieces], dsu_offset: int, deduplicate: bool, device=None) -> Assembled:
    """Every sample's tokens and unshifted labels, flat, on `device`, as `data.samples.assemble` gives them."""
    device = torch.device(device if device is not None else "cpu")
    outputs = _run("assemble", flatten(samples), (), (dsu_offset, deduplicate), device)
    return Assembled(*(t.to(device) for t in outputs))


def pack(rows: Sequence[Sequence[Pieces]], dsu_offset: int, deduplicate: bool, max_seq_len: int, pad_id: int,
         device=None) -> Packed:
    """One row of max_seq_len per entry of `rows`, holding its samples side by side (see the contract)."""
    device = torch.device(device if device is not None else "cpu")
    batch = flatten([sample for row in rows for sample in row])
    row_offsets = _offsets(np.fromiter(map(len, rows), np.int64, len(rows)))
    outputs = _run("pack", batch, (row_offsets,), (dsu_offset, deduplicate, max_seq_len, pad_id), device)
    return Packed(*(t.to(device) for t in outputs))

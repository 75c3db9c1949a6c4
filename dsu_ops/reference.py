"""NumPy implementation of the ops `measure`, `assemble` and `pack`, with their signatures and
semantics (dsu_ops/__init__.py), and the first-fit packer in Python (dsu_ops/packing.py). `dsu_ops`
uses them when the extension cannot be built; tests hold the C++ and CUDA code to them.
"""

from typing import Hashable, Sequence

import numpy as np
import torch

from dsu_ops.packing import IGNORE


def _assembled(values, piece_offsets, piece_is_dsu, piece_masked, sample_piece_offsets, sample_limit,
               sample_force_last, dsu_offset, deduplicate):
    """(tokens, masked, offsets) as NumPy arrays."""
    values, piece_offsets, sample_piece_offsets, sample_limit, sample_force_last = (
        np.asarray(a, dtype=np.int64)
        for a in (values, piece_offsets, sample_piece_offsets, sample_limit, sample_force_last)
    )
    piece_is_dsu, piece_masked = np.asarray(piece_is_dsu, dtype=bool), np.asarray(piece_masked, dtype=bool)
    n_samples = len(sample_piece_offsets) - 1
    piece = np.repeat(np.arange(len(piece_offsets) - 1), np.diff(piece_offsets))
    sample = np.repeat(np.arange(n_samples), np.diff(sample_piece_offsets))[piece]
    is_dsu = piece_is_dsu[piece]

    keep = np.ones(len(values), dtype=bool)
    if deduplicate:  # a repeat of the previous value inside the same DSU piece
        keep[1:] = ~((values[1:] == values[:-1]) & (piece[1:] == piece[:-1]) & is_dsu[1:])
    tokens = (values + np.where(is_dsu, dsu_offset, 0))[keep]
    masked, sample = piece_masked[piece][keep], sample[keep]

    lengths = np.bincount(sample, minlength=n_samples)
    starts = np.cumsum(lengths) - lengths
    kept = np.where(sample_limit >= 0, np.minimum(lengths, sample_limit), lengths)
    within = np.arange(len(tokens)) - starts[sample] < kept[sample]
    tokens, masked = tokens[within], masked[within]

    offsets = np.zeros(n_samples + 1, dtype=np.int64)
    np.cumsum(kept, out=offsets[1:])
    forced = (kept < lengths) & (sample_force_last >= 0) & (kept > 0)
    tokens[offsets[1:][forced] - 1] = sample_force_last[forced]
    masked[offsets[1:][forced] - 1] = True
    return tokens, masked, offsets


def measure(values, piece_offsets, piece_is_dsu, piece_masked, sample_piece_offsets, sample_limit,
            sample_force_last, deduplicate):
    _, _, offsets = _assembled(values, piece_offsets, piece_is_dsu, piece_masked, sample_piece_offsets, sample_limit,
                               sample_force_last, 0, deduplicate)
    return torch.from_numpy(np.diff(offsets))


def assemble(values, piece_offsets, piece_is_dsu, piece_masked, sample_piece_offsets, sample_limit,
             sample_force_last, dsu_offset, deduplicate):
    tokens, masked, offsets = _assembled(values, piece_offsets, piece_is_dsu, piece_masked, sample_piece_offsets,
                                         sample_limit, sample_force_last, dsu_offset, deduplicate)
    labels = np.where(masked, IGNORE, tokens)
    return torch.from_numpy(tokens), torch.from_numpy(labels), torch.from_numpy(offsets)


def pack(values, piece_offsets, piece_is_dsu, piece_masked, sample_piece_offsets, sample_limit, sample_force_last,
         row_sample_offsets, dsu_offset, deduplicate, max_seq_len, pad_id):
    tokens, masked, offsets = _assembled(values, piece_offsets, piece_is_dsu, piece_masked, sample_piece_offsets,
                                         sample_limit, sample_force_last, dsu_offset, deduplicate)
    row_sample_offsets = np.asarray(row_sample_offsets, dtype=np.int64)
    n_rows, lengths = len(row_sample_offsets) - 1, np.diff(offsets)
    fills = offsets[row_sample_offsets[1:]] - offsets[row_sample_offsets[:-1]]
    if (fills > max_seq_len).any():
        row = int(np.argmax(fills > max_seq_len))
        raise RuntimeError(f"row {row} holds {fills[row]} tokens, more than max_seq_len {max_seq_len}")

    # Samples fill each row from column 0, so in row-major order the filled slots hold the
    # samples' concatenation: one boolean mask places everything.
    filled = np.arange(max_seq_len) < fills[:, None]
    sample_of = np.repeat(np.arange(len(lengths)), lengths)
    row_of_sample = np.repeat(np.arange(n_rows), np.diff(row_sample_offsets))
    document = np.arange(len(lengths)) - row_sample_offsets[:-1][row_of_sample]
    labels = np.where(masked, IGNORE, tokens)
    next_labels = np.full_like(labels, IGNORE)
    next_labels[:-1] = labels[1:]
    next_labels[offsets[1:][lengths > 0] - 1] = IGNORE  # a sample's last token predicts nothing
    shape = (n_rows, max_seq_len)
    out_tokens, targets = np.full(shape, pad_id, dtype=np.int64), np.full(shape, IGNORE, dtype=np.int64)
    positions, document_ids = np.zeros(shape, dtype=np.int64), np.full(shape, -1, dtype=np.int64)
    out_tokens[filled] = tokens
    targets[filled] = next_labels
    positions[filled] = np.arange(len(tokens)) - offsets[:-1][sample_of]
    document_ids[filled] = document[sample_of]
    return tuple(torch.from_numpy(a) for a in (out_tokens, targets, positions, document_ids))


class FirstFitPacker:
    """The first-fit packer (dsu_ops/packing.py has its rule and methods), with any hashable items."""

    def __init__(self, max_seq_len: int, capacity: int):
        if max_seq_len < 1 or capacity < 1:
            raise ValueError(f"max_seq_len and capacity must be positive, got {max_seq_len} and {capacity}")
        self.max_seq_len, self.capacity = max_seq_len, capacity
        self._rows: list[list[tuple[Hashable, int]]] = []  # open rows, oldest first: (item, length)
        self._fills: list[int] = []  # tokens in each open row

    def add(self, items: Sequence[Hashable], lengths: Sequence[int]) -> list[list]:
        if len(items) != len(lengths):
            raise ValueError(f"got {len(items)} items and {len(lengths)} lengths")
        for item, length in zip(items, lengths):
            if not 0 <= length <= self.max_seq_len:
                raise ValueError(f"sample {item} has {length} tokens; a row holds 0 to {self.max_seq_len}")
        left = []
        for item, length in zip(items, lengths):
            if (row := self._place(item, int(length))) is not None:
                left.append(row)
        return left

    def finish(self) -> list[list]:
        samples = sorted((sample for row in self._rows for sample in row), key=lambda sample: -sample[1])
        self._rows, self._fills = [], []
        for item, length in samples:
            k = self._first_fit(length)
            if k is None:
                self._rows.append([])
                self._fills.append(0)
                k = -1
            self._rows[k].append((item, length))
            self._fills[k] += length
        rows = [[item for item, _ in row] for row in self._rows]
        self._rows, self._fills = [], []
        return rows

    def open_rows(self) -> list[list]:
        return [[item for item, _ in row] for row in self._rows]

    def reopen(self, items: Sequence[Sequence[Hashable]], lengths: Sequence[Sequence[int]]) -> None:
        rows = [list(zip(i, n, strict=True)) for i, n in zip(items, lengths, strict=True)]
        fills = [sum(n) for n in lengths]
        for r, fill in enumerate(fills):
            if fill > self.max_seq_len:
                raise ValueError(f"row {r} of {fill} tokens does not fit {self.max_seq_len}")
        if len(rows) > self.capacity:
            raise ValueError(f"{len(rows)} rows do not fit {self.capacity} open rows")
        self._rows, self._fills = rows, fills

    def _place(self, item: Hashable, length: int) -> list | None:
        """Places one sample; returns the row that left to make room or became full, if one did."""
        if length == 0:
            return None
        k = self._first_fit(length)
        if k is not None:
            self._rows[k].append((item, length))
            self._fills[k] += length
            return self._take(k) if self._fills[k] == self.max_seq_len else None
        if length == self.max_seq_len:
            return [item]
        left = self._take(self._fills.index(max(self._fills))) if len(self._rows) == self.capacity else None
        self._rows.append([(item, length)])
        self._fills.append(length)
        return left

    def _first_fit(self, length: int) -> int | None:
        room = self.max_seq_len - length
        return next((k for k, fill in enumerate(self._fills) if fill <= room), None)

    def _take(self, k: int) -> list:
        self._fills.pop(k)
        return [item for item, _ in self._rows.pop(k)]

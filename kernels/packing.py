"""Where each sample goes when samples are packed into rows of max_seq_len: first fit over a bounded
window of open rows, from lengths alone. Placement is sequential and cheap, so it is plain Python;
the `pack` op then writes the rows (kernels/__init__.py).
"""

from typing import Hashable, NamedTuple, Sequence

import torch

IGNORE = -100  # the label of a token that is not trained on (torch's cross-entropy ignore_index)


class Packed(NamedTuple):
    tokens: torch.Tensor  # (R, L)
    targets: torch.Tensor  # (R, L), shifted for next-token prediction
    positions: torch.Tensor  # (R, L)
    document_ids: torch.Tensor  # (R, L), -1 on padding


class FirstFitPacker:
    """Places samples, by length, into rows of `max_seq_len` tokens as they stream in.

    A sample goes into the first open row (oldest first) with room for it. When none has room, a
    sample that fills a row by itself leaves alone; otherwise a new row opens, and when `capacity`
    rows are open already, the fullest (the oldest among equals) leaves first to make space. A row
    that becomes exactly full leaves at once. So at most one row leaves per sample and at most
    `capacity` rows are ever open: memory is bounded by the window, not by the data.

    When no more samples will come, `finish()` repacks the open rows' samples longest first
    (first-fit decreasing, which wastes less on the last rows) and `pop()` hands the rows out,
    oldest first. Rows are lists of the items given to `add`, in the order they were placed.
    Empty samples take no room and are dropped: they hold nothing to train on.
    """

    def __init__(self, max_seq_len: int, capacity: int):
        if max_seq_len < 1 or capacity < 1:
            raise ValueError(f"max_seq_len and capacity must be positive, got {max_seq_len} and {capacity}")
        self.max_seq_len, self.capacity = max_seq_len, capacity
        self._rows: list[list[tuple[Hashable, int]]] = []  # open rows, oldest first: (item, length)
        self._fills: list[int] = []  # tokens in each open row

    @property
    def open_rows(self) -> list[list[Hashable]]:
        return [[item for item, _ in row] for row in self._rows]

    def add(self, item: Hashable, length: int) -> list | None:
        """Places a sample; returns the row that left to make room or became full, if one did."""
        if not 0 <= length <= self.max_seq_len:
            raise ValueError(f"sample {item!r} has {length} tokens; a row holds 0 to {self.max_seq_len}")
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

    def finish(self) -> None:
        """Re-places the open rows' samples longest first (ties in their order); no `add` after this
        until the rows are popped."""
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

    def pop(self) -> list | None:
        """The oldest open row, removed; None when no row is open."""
        return self._take(0) if self._rows else None

    def reopen(self, rows: Sequence[Sequence[tuple[Hashable, int]]]) -> None:
        """Replaces the open rows with `rows` of (item, length), as `open_rows` and the lengths
        described them: restores a packer's state."""
        fills = [sum(length for _, length in row) for row in rows]
        if len(rows) > self.capacity or any(fill > self.max_seq_len for fill in fills):
            raise ValueError(f"{len(rows)} rows of up to {max(fills, default=0)} tokens do not fit "
                             f"{self.capacity} open rows of {self.max_seq_len}")
        self._rows, self._fills = [list(row) for row in rows], fills

    def _first_fit(self, length: int) -> int | None:
        room = self.max_seq_len - length
        return next((k for k, fill in enumerate(self._fills) if fill <= room), None)

    def _take(self, k: int) -> list:
        self._fills.pop(k)
        return [item for item, _ in self._rows.pop(k)]


def place(lengths: Sequence[int], max_seq_len: int, capacity: int) -> list[list[int]]:
    """The rows (as sample positions) that one epoch of samples with these lengths becomes when
    streamed through a FirstFitPacker and finished: what a packed training run trains on."""
    packer = FirstFitPacker(max_seq_len, capacity)
    rows = [row for i, length in enumerate(lengths) if (row := packer.add(i, int(length))) is not None]
    packer.finish()
    while (row := packer.pop()) is not None:
        rows.append(row)
    return rows

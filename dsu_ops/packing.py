"""What packing produces, and where each sample goes: the rule of the first-fit packer.

`dsu_ops.first_fit_packer(max_seq_len, capacity)` places samples, by length, into rows of
`max_seq_len` tokens as they stream in, a batch of them per `add(items, lengths)` call, which
returns the rows that left meanwhile:

A sample goes into the first open row (oldest first) with room for it. When none has room, a
sample that fills a row by itself leaves alone; otherwise a new row opens, and when `capacity`
rows are open already, the fullest (the oldest among equals) leaves first to make space. A row
that becomes exactly full leaves at once. So at most one row leaves per sample and at most
`capacity` rows are ever open: memory is bounded by the window, not by the data. Empty samples
take no room and are dropped: they hold nothing to train on.

When no more samples will come, `finish()` re-places the open rows' samples longest first
(first-fit decreasing, which wastes less on the last rows) and returns them all as rows, oldest
first. Rows are lists of the items given to `add`, in the order they were placed. `open_rows()`
lists the open rows' items and `reopen(items, lengths)` restores them.

The packer is C++ (kernels/first_fit.cpp; a Python call per sample cost more than placing
it), with the same packer in Python in dsu_ops/reference.py. The `pack` op then writes the rows
(dsu_ops/__init__.py).
"""

from typing import NamedTuple

import torch

IGNORE = -100  # the label of a token that is not trained on (torch's cross-entropy ignore_index)


class Packed(NamedTuple):
    tokens: torch.Tensor  # (R, L)
    targets: torch.Tensor  # (R, L), shifted for next-token prediction
    positions: torch.Tensor  # (R, L)
    document_ids: torch.Tensor  # (R, L), -1 on padding

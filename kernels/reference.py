"""NumPy implementation of `assemble`, with the op's signature and semantics (kernels/__init__.py).
`kernels` uses it when the extension cannot be built; tests hold the C++ and CUDA ops to it.
"""

import numpy as np
import torch

from data.samples import IGNORE


def assemble(values, piece_offsets, piece_is_dsu, piece_masked, sample_piece_offsets, sample_limit,
             sample_force_last, dsu_offset, deduplicate):
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
    labels = np.where(masked, IGNORE, tokens)
    return torch.from_numpy(tokens), torch.from_numpy(labels), torch.from_numpy(offsets)

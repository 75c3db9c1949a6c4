"""NumPy implementation of the ops `measure`, `assemble` and `pack`, with their signatures and
semantics (kernels/__init__.py). `kernels` uses it when the extension cannot be built; tests hold
the C++ and CUDA ops to it.
"""

import numpy as np
import torch

from kernels.packing import IGNORE


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

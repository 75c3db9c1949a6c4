"""NumPy implementation of `assemble` and `pack`, with the ops' signatures and semantics
(kernels/__init__.py). `kernels` uses it when the extension cannot be built; tests hold the
C++ and CUDA ops to it. Vectorized over the batch except for the greedy row placement, which is
sequential by nature.
"""

import numpy as np
import torch

from data.samples import IGNORE


def _assemble(values, piece_offsets, piece_is_dsu, piece_masked, sample_piece_offsets, sample_limit,
              sample_force_last, dsu_offset, deduplicate):
    """Flat tokens, their mask flags and the sample offsets."""
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


def assemble(values, piece_offsets, piece_is_dsu, piece_masked, sample_piece_offsets, sample_limit,
             sample_force_last, dsu_offset, deduplicate):
    tokens, masked, offsets = _assemble(values, piece_offsets, piece_is_dsu, piece_masked, sample_piece_offsets,
                                        sample_limit, sample_force_last, dsu_offset, deduplicate)
    labels = np.where(masked, IGNORE, tokens)
    return torch.from_numpy(tokens), torch.from_numpy(labels), torch.from_numpy(offsets)


def greedy_rows(counts: np.ndarray, max_seq_len: int):
    """Each sample's (row, column, document number), row -1 for empty samples, and the row count."""
    row, column, document = (np.zeros(len(counts), dtype=np.int64) for _ in range(3))
    n_rows, fill, doc = 0, max_seq_len, 0
    for s, count in enumerate(counts.tolist()):
        if count == 0:
            row[s] = -1
            continue
        if fill + count > max_seq_len:
            n_rows, fill, doc = n_rows + 1, 0, 0
        row[s], column[s], document[s] = n_rows - 1, fill, doc
        fill, doc = fill + count, doc + 1
    return row, column, document, n_rows


def pack(values, piece_offsets, piece_is_dsu, piece_masked, sample_piece_offsets, sample_limit, sample_force_last,
         dsu_offset, deduplicate, max_seq_len, pad_id):
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    tokens, masked, offsets = _assemble(values, piece_offsets, piece_is_dsu, piece_masked, sample_piece_offsets,
                                        sample_limit, sample_force_last, dsu_offset, deduplicate)
    lengths = np.diff(offsets)
    counts = np.minimum(lengths, max_seq_len)
    row, column, document, n_rows = greedy_rows(counts, max_seq_len)

    sample = np.repeat(np.arange(len(lengths)), lengths)
    index = np.arange(len(tokens)) - offsets[:-1][sample]
    fits = index < counts[sample]
    sample, index = sample[fits], index[fits]
    at = row[sample] * max_seq_len + column[sample] + index
    labels = np.where(masked, IGNORE, tokens)[fits]

    shape = (n_rows, max_seq_len)
    out_tokens, targets = np.full(shape, pad_id, dtype=np.int64), np.full(shape, IGNORE, dtype=np.int64)
    positions, document_ids = np.zeros(shape, dtype=np.int64), np.full(shape, -1, dtype=np.int64)
    out_tokens.flat[at] = tokens[fits]
    positions.flat[at] = index
    document_ids.flat[at] = document[sample]
    later = index > 0  # the label of a sample's token k is the target of its token k - 1
    targets.flat[at[later] - 1] = labels[later]
    return tuple(torch.from_numpy(a) for a in (out_tokens, targets, positions, document_ids))

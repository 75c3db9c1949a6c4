"""The reference implementation's way of building sequences: one string per sample, tokenized whole.

Test code, kept as an executable specification: tests check that the token-level builders in
`data/samples.py` give exactly these tokens, and `bench/construction.py` and `bench/packing.py` use
it as the throughput baseline. Training never calls it.
"""

from itertools import groupby

import numpy as np

from data.samples import SEED, Interleave, dsu_frames
from data.tokenizer import MODALITY_SPEECH, MODALITY_TEXT, Tokenizer, dsu_char


def _dsu_string(units, deduplicate: bool) -> str:
    units = [int(u) for u in units]
    if deduplicate:
        units = [u for u, _ in groupby(units)]
    return "".join(dsu_char(u) for u in units)


def _with_modality(text: str, speech: str, modality_tokens: bool) -> tuple[str, str]:
    if modality_tokens:
        return f"{MODALITY_TEXT} {text}", f"{MODALITY_SPEECH} {speech}"
    return text, speech


def concatenated_string(row: dict, text_first: bool, deduplicate: bool, modality_tokens: bool) -> str:
    text, speech = _with_modality(
        " ".join(row["tokenized"]), _dsu_string(row["speech_tokens"], deduplicate), modality_tokens
    )
    return f"{text} {speech}" if text_first else f"{speech} {text}"


def interleaved_string(
    row: dict, index: int, epoch: int, deduplicate: bool, modality_tokens: bool, settings: Interleave = Interleave()
) -> str:
    words = row["tokenized"]
    rng = np.random.default_rng((SEED, epoch, index))
    start_with_text = bool(rng.choice([True, False], p=[0.5, 0.5]))
    lengths = np.maximum(rng.binomial(int(settings.mean_seq_len_tokens), settings.binom_prob, size=len(words)), 1)
    cuts = np.cumsum(lengths)
    bounds = [0, *cuts[cuts < len(words)].tolist(), len(words)]
    spans = []
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if (k % 2 == 0) == start_with_text:
            span = " ".join(words[lo:hi])
            spans.append(f"{MODALITY_TEXT} {span}" if modality_tokens else span)
        else:
            f_lo, f_hi = dsu_frames(
                row["aligned_token_start_time"][lo],
                row["aligned_token_end_time"][hi - 1],
                settings.sampling_rate,
                settings.downsampling_ratio,
            )
            span = _dsu_string(row["speech_tokens"][f_lo:f_hi], deduplicate)
            spans.append(f"{MODALITY_SPEECH} {span}" if modality_tokens else span)
    return " ".join(spans)


def cpt_tokens(tok: Tokenizer, string: str, max_seq_len: int | None) -> list[int]:
    tokens = tok.encode(string, bos=True, eos=True)
    return tokens if max_seq_len is None else tokens[: max_seq_len - 1]


def sft_user_string(row: dict, deduplicate: bool, modality_tokens: bool) -> str:
    dsus = _dsu_string(row["speech_tokens"], deduplicate)
    return f"{MODALITY_SPEECH}{dsus}{MODALITY_TEXT}" if modality_tokens else dsus


def sft_tokens(tok: Tokenizer, row: dict, system_prompt: str, deduplicate: bool, modality_tokens: bool, inference: bool) -> list[int]:
    tokens = [tok.bos_id, *tok.message("system", system_prompt)]
    tokens += tok.message("user", sft_user_string(row, deduplicate, modality_tokens))
    if inference:
        return tokens + tok.header("assistant")
    return tokens + tok.message("assistant", row["transcript"]) + [tok.eos_id]

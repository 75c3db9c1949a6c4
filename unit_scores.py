"""Unit edit rate: how far generated speech units are from the units they should be, with no vocoder.

`wer.py` scores the records `generate.py --task tts|continue` writes with it:

    {"id": ..., "task": "tts" | "continue", "text": ..., "speech_tokens": [generated units],
     "reference_speech_tokens": [the units the generation should match], ...}

Both unit sequences are deduplicated again before scoring (consecutive repeats collapsed: [5, 5, 7, 5]
-> [5, 7, 5]), so that a model trained without deduplication is scored on the same footing as one
trained with it. The unit edit rate is corpus-level, as WER is: the total Levenshtein edits
(substitutions, deletions, insertions of single units) over the total number of reference units,
not a mean of per-utterance rates. An utterance whose reference has no units counts each generated
unit as an insertion and adds nothing to the reference length. The alignment is jiwer's (the one
WER uses, word_edit_counts), on the units spelt as words `u0 u17 ...`.

Nothing here reads files or prints: this module checks one record (`unit_record`) and scores lists
of unit sequences (`score_units`, `score_unit_groups`); `wer.py` does the rest.
"""

import math
from typing import Callable

import jiwer
import numpy as np

METRIC = "unit_edit_rate"  # the value of wer.json's "metric" for these reports
LABEL = "unit edit rate"  # how tables and reports name it
TASKS = ("tts", "continue")
UNIT_FIELDS = ("speech_tokens", "reference_speech_tokens")
KINDS = ("substitutions", "deletions", "insertions", "hits")


class RecordError(ValueError):
    """A unit record that cannot be scored; the message names where it is."""


def is_unit_record(obj: dict) -> bool:
    """Whether a generations record is a speech task's (units), not a transcript's."""
    return any(field in obj for field in UNIT_FIELDS) or obj.get("task") in TASKS


def collapse_repeats(units: list[int]) -> list[int]:
    """Consecutive repeats dropped: [5, 5, 7, 5] -> [5, 7, 5]."""
    return [unit for i, unit in enumerate(units) if i == 0 or unit != units[i - 1]]


def _units(obj: dict, field: str, where: str) -> list[int]:
    if field not in obj:
        raise RecordError(f"{where}: missing field '{field}'")
    value = obj[field]
    if not isinstance(value, list):
        raise RecordError(f"{where}: field '{field}' must be a list of unit ids (integers >= 0), got "
                          f"{type(value).__name__}")
    for position, unit in enumerate(value):
        if isinstance(unit, bool) or not isinstance(unit, int):  # true is not unit 1
            shown = "true" if unit is True else "false" if unit is False else repr(unit)
            kind = "a boolean" if isinstance(unit, bool) else type(unit).__name__
            raise RecordError(f"{where}: field '{field}', position {position}: {shown} is {kind}, not a unit id "
                              "(an integer >= 0)")
        if unit < 0:
            raise RecordError(f"{where}: field '{field}', position {position}: {unit} is not a unit id (>= 0)")
    return value


def unit_record(obj: dict, where: str) -> dict:
    """The record's {id, task, text (None when absent), speech_tokens, reference_speech_tokens}, both
    unit lists deduplicated; RecordError naming `where` (file:line) and the field when it is malformed."""
    if "id" not in obj:
        raise RecordError(f"{where}: missing field 'id'")
    if not isinstance(obj["id"], str):
        raise RecordError(f"{where}: field 'id' must be a string, got {obj['id']!r}")
    if "task" not in obj:
        raise RecordError(f"{where}: missing field 'task' (a record with speech units is 'tts' or 'continue')")
    if obj["task"] not in TASKS:
        raise RecordError(f"{where}: field 'task' must be one of {', '.join(TASKS)} for a record with speech "
                          f"units, got {obj['task']!r}")
    text = obj.get("text")
    if text is not None and not isinstance(text, str):
        raise RecordError(f"{where}: field 'text' must be a string, got {text!r}")
    return {"id": obj["id"], "task": obj["task"], "text": text,
            **{field: collapse_repeats(_units(obj, field, where)) for field in UNIT_FIELDS}}


def _words(units: list[int]) -> str:
    return " ".join(f"u{unit}" for unit in units)


def word_edit_counts(refs: list[str], hyps: list[str]) -> dict[str, np.ndarray]:
    """Substitutions, deletions, insertions and hits of each (reference, hypothesis) pair of
    space-separated words, aligned by jiwer: wer.py's word counts, and the units' spelt as words.
    jiwer before 4.0 refuses empty references, so those are counted here: all insertions."""
    counts = {kind: np.zeros(len(refs), dtype=np.int64) for kind in KINDS}
    scored = [i for i, ref in enumerate(refs) if ref]
    for i in set(range(len(refs))) - set(scored):
        counts["insertions"][i] = len(hyps[i].split())
    if scored:
        words = jiwer.process_words([refs[i] for i in scored], [hyps[i] for i in scored])
        for i, chunks in zip(scored, words.alignments):
            for chunk in chunks:
                ref_span = chunk.ref_end_idx - chunk.ref_start_idx
                if chunk.type == "equal":
                    counts["hits"][i] += ref_span
                elif chunk.type == "substitute":
                    counts["substitutions"][i] += ref_span
                elif chunk.type == "delete":
                    counts["deletions"][i] += ref_span
                else:
                    counts["insertions"][i] += chunk.hyp_end_idx - chunk.hyp_start_idx
    return counts


def edit_counts(refs: list[list[int]], hyps: list[list[int]]) -> dict[str, np.ndarray]:
    """Substitutions, deletions, insertions and hits of each (reference, hypothesis) pair of unit
    sequences, as given (no deduplication here)."""
    return word_edit_counts([_words(ref) for ref in refs], [_words(hyp) for hyp in hyps])


def score_units(hyps: list[list[int]], refs: list[list[int]], ids: list[str] | None = None, *,
                interval: Callable[[np.ndarray, np.ndarray], dict] | None = None, worst: int = 10) -> dict:
    """Corpus unit edit rate of `hyps` against `refs` (same order), each deduplicated first.

    `interval(errors, reference_lengths)` (per-utterance arrays) gives the report's
    `unit_edit_rate_interval` (wer.py passes its bootstrap); None leaves it null. `worst` lists up
    to that many utterances with errors, most errors first (ties: higher rate first), by id
    (default: positions). Raises ValueError when no reference has a unit.
    """
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    ids = [str(i) for i in range(len(refs))] if ids is None else ids
    hyps = [collapse_repeats(list(units)) for units in hyps]
    refs = [collapse_repeats(list(units)) for units in refs]
    counts = edit_counts(refs, hyps)
    errors = counts["substitutions"] + counts["deletions"] + counts["insertions"]
    lengths = np.array([len(ref) for ref in refs], dtype=np.int64)
    n_ref_units = int(lengths.sum())
    if n_ref_units == 0:
        raise ValueError("every reference has no units, so the unit edit rate is undefined")

    def rate(i):
        return errors[i] / lengths[i] if lengths[i] else math.inf

    ranked = sorted((i for i in range(len(refs)) if errors[i]), key=lambda i: (-errors[i], -rate(i)))
    return {
        "metric": METRIC,
        "deduplicated": True,
        "unit_edit_rate": int(errors.sum()) / n_ref_units,
        "unit_edit_rate_interval": interval(errors, lengths) if interval is not None else None,
        **{kind: int(values.sum()) for kind, values in counts.items()},
        "errors": int(errors.sum()),
        "n_ref_units": n_ref_units,
        "n_hyp_units": sum(len(hyp) for hyp in hyps),
        "n_utterances": len(refs),
        "n_empty_hypotheses": sum(1 for hyp in hyps if not hyp),
        "n_empty_references": sum(1 for ref in refs if not ref),
        "worst": [
            {"id": ids[i], "errors": int(errors[i]), "ref_units": int(lengths[i]), "hyp_units": len(hyps[i]),
             # undefined (null) for a reference without units
             "unit_edit_rate": float(rate(i)) if lengths[i] else None}
            for i in ranked[:worst]
        ],
    }


def score_unit_groups(hyps: list[list[int]], refs: list[list[int]], groups: list[str]) -> dict:
    """The unit edit rate of each group's utterances on their own, groups in sorted order:
    {value: {unit_edit_rate, errors, n_ref_units, n_utterances}}; a group whose references all
    have no units has rate null."""
    out = {}
    for value in sorted(set(groups)):
        mine = [i for i, group in enumerate(groups) if group == value]
        try:
            result = score_units([hyps[i] for i in mine], [refs[i] for i in mine], worst=0)
        except ValueError:
            out[value] = {"unit_edit_rate": None, "errors": None, "n_ref_units": 0, "n_utterances": len(mine)}
            continue
        out[value] = {"unit_edit_rate": result["unit_edit_rate"], "errors": result["errors"],
                      "n_ref_units": result["n_ref_units"], "n_utterances": len(mine)}
    return out

"""Score generations against reference transcripts: corpus WER and CER, a bootstrap interval, the worst utterances.

    python wer.py run/.../generations.jsonl [--references DATASET [--by FIELD]] [--normalizer whisper|none]
    python wer.py run/.../test-tts/generations.jsonl [--asr CHECKPOINT] [--references DATASET --by FIELD]
    python wer.py RUN_DIR                  (every checkpoint's generations: a table and a plot of WER by step)
    python wer.py --compare WER_JSON_OR_DIR [...] [--out DIR] [--overwrite]   (cells side by side)

Input: one JSON object per line with `id`, `text` (the hypothesis) and `reference`, or, with
`--references`, references joined by `id` from a dataset file (field `transcript`). `--by FIELD`
also scores each value of that dataset field on its own (e.g. `--by speaker`: WER per voice).
The reference implementation's generations (vLLM `RequestOutput` records: text in
`outputs[0].text`, no ids) are read too; their references come from `--dataset PATH --split S`
(a dataset directory, or a name found in the local hub cache; both inferred from the file's
`<dataset>/<split>/` directories when not given) or `--references FILE`, joined by row order, and
the counts must agree. The reference's flag names (`--dataset`, `--split`,
`--gt_transcript_colname`, `--normalizer`) work here, and give the same WER on the same files.

Scoring: hypotheses and references go through the same normaliser (Whisper's English normaliser,
as the reference implementation uses, or `none`), then whitespace is collapsed. WER and CER are
corpus-level: total edits over total reference words (characters), not a mean of per-utterance
rates. An utterance whose normalised reference is empty (e.g. a transcript of only "um") has
no words to align against: each of its hypothesis words counts as an insertion, and it adds
nothing to the reference word count.

Speech units (the records of `generate.py --task tts|continue`: `speech_tokens`, the generated
units, and `reference_speech_tokens`, those they should match) are scored by their unit edit rate
(unit_scores.py): total Levenshtein edits between the unit sequences over total reference units,
both sides deduplicated again first (consecutive repeats collapsed, so a model trained without
deduplication is scored on the same footing), with the same bootstrap interval, worst utterances and
`--references DATASET --by FIELD` groups (the dataset only names the groups; ids are joined). No
vocoder is needed. With `--asr CHECKPOINT` (tts records only), the round-trip WER too: the generated
units are written as a dataset {id, speech_tokens, transcript: the record's text[, the --by field]}
to `round_trip/units.jsonl` beside the report, transcribed greedily by `generate.py CHECKPOINT --data
round_trip/units.jsonl --out round_trip/ --backend torch` (`--backend` to change), and the transcripts
scored against the texts as above (WER, CER, by group). A record without generated units is not
transcribed: its transcript is empty (all deletions), and the report counts them. An earlier round
trip of the same units by the same checkpoint in `round_trip/` is reused; another is replaced only
with `--overwrite`. Such a report's `metric` is `unit_edit_rate` (a transcript report has no `metric`:
WER), and its `round_trip` holds the round trip's WER report and the checkpoint (null without --asr).

Output: a printed report and `wer.json` beside the input (`--out` to change; never overwritten
without `--overwrite`). Bad input exits with status 2 and writes nothing.

A run directory (as `generate.py RUN_DIR` fills it: <run>/generations/<step>/<dataset>/<split>/, or the
reference's generations/epoch_E/global_step_N/<dataset>/<split>/) is scored checkpoint by checkpoint:
`wer_by_step.tsv` (step, dataset/split, utterances, WER, CER, interval) and `wer_by_step.png`
(WER against step, one line per dataset/split) in the run directory, or in `--out DIR`. A speech
task's generations (`<split>-tts`, `<split>-continue`) get their unit edit rate in the WER column
and no CER; the table then has a last column, `metric`, naming each row's.

Comparing cells (`--compare`, e.g. `python wer.py --compare runs/matrix`): one table and chart of many
wer.json reports, across training seeds too; compare_table.py says what it shows.

Every file read must be a regular file: a FIFO, a device or a symlink loop is refused, never waited on.
"""

import argparse
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jiwer
import numpy as np
from whisper_normalizer.english import EnglishTextNormalizer

from data import reference_run
from data.dataset import DataError, Source, load_rows
import compare_table
import files
import model_dir
import unit_scores
from files import directory_problem
from report_io import NORMALIZERS, InputError, check_output, check_overwrite, readable, write_into

CONFIDENCE = 0.95
BOOTSTRAP_CELLS = 4_000_000  # resampled indices held in memory at once


def collapse_whitespace(text: str) -> str:
    return " ".join(text.split())


def make_normalizer(name: str):
    """The text normaliser called `name`, returning text with single spaces and no outer whitespace."""
    if name == "none":
        return collapse_whitespace
    if name == "whisper":
        whisper = EnglishTextNormalizer()
        return lambda text: collapse_whitespace(whisper(text))
    raise ValueError(f"unknown normaliser {name!r}; expected one of {', '.join(NORMALIZERS)}")


def character_errors(refs: list[str], hyps: list[str]) -> int:
    """Total character edits over all pairs, empty references counting every hypothesis character."""
    scored = [i for i, ref in enumerate(refs) if ref]
    errors = sum(len(hyps[i]) for i in range(len(refs)) if not refs[i])
    if scored:
        chars = jiwer.process_characters([refs[i] for i in scored], [hyps[i] for i in scored])
        errors += chars.substitutions + chars.deletions + chars.insertions
    return errors


def bootstrap_interval(errors: np.ndarray, ref_words: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile interval of corpus WER over utterances resampled with replacement."""
    rng = np.random.default_rng(seed)
    n = len(errors)
    rows_per_chunk = max(1, BOOTSTRAP_CELLS // n)
    rates = []
    for start in range(0, resamples, rows_per_chunk):
        picks = rng.integers(0, n, size=(min(rows_per_chunk, resamples - start), n))
        words = ref_words[picks].sum(axis=1)
        edits = errors[picks].sum(axis=1)
        # A resample of only empty references has no defined WER; it is left out of the percentiles.
        rates.append(np.divide(edits, words, out=np.full(len(words), np.nan), where=words > 0))
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.nanpercentile(np.concatenate(rates), [tail, 100 - tail])
    return float(low), float(high)


def score(hyps: list[str], refs: list[str], normalizer: str = "whisper", *, ids: list[str] | None = None,
          bootstrap: int = 1000, seed: int = 0, worst: int = 10) -> dict:
    """Corpus WER/CER of `hyps` against `refs` (same order), with a bootstrap interval and the worst utterances.

    `worst` lists up to that many utterances with errors, most errors first (ties: higher
    per-utterance WER first), with their normalised texts; `ids` names them (default: positions).
    `bootstrap=0` skips the interval. Raises ValueError when there is no reference word at all.
    """
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    ids = [str(i) for i in range(len(refs))] if ids is None else ids
    normalize = make_normalizer(normalizer)
    hyps = [normalize(text) for text in hyps]
    refs = [normalize(text) for text in refs]

    counts = unit_scores.word_edit_counts(refs, hyps)
    errors = counts["substitutions"] + counts["deletions"] + counts["insertions"]
    ref_words = counts["substitutions"] + counts["deletions"] + counts["hits"]
    n_ref_words = int(ref_words.sum())
    if n_ref_words == 0:
        raise ValueError("every reference is empty after normalisation, so WER is undefined")
    n_ref_chars = sum(len(ref) for ref in refs)
    n_char_errors = character_errors(refs, hyps)

    def utterance_wer(i):
        return errors[i] / ref_words[i] if ref_words[i] else math.inf

    ranked = sorted((i for i in range(len(refs)) if errors[i]), key=lambda i: (-errors[i], -utterance_wer(i)))
    result = {
        "normalizer": normalizer,
        "wer": int(errors.sum()) / n_ref_words,
        "cer": n_char_errors / n_ref_chars,
        **{kind: int(values.sum()) for kind, values in counts.items()},
        "n_ref_words": n_ref_words,
        "n_utterances": len(refs),
        "n_empty_references": sum(1 for ref in refs if not ref),
        "n_char_errors": n_char_errors,
        "n_ref_chars": n_ref_chars,
        "wer_interval": None,
        "worst": [
            {"id": ids[i], "reference": refs[i], "hypothesis": hyps[i], "errors": int(errors[i]),
             # per-utterance WER is undefined (null) for an empty reference
             "wer": float(utterance_wer(i)) if ref_words[i] else None}
            for i in ranked[:worst]
        ],
    }
    result["wer_interval"] = interval_of(errors, ref_words, bootstrap, seed)
    return result


def read_generations(path: Path, need_reference: bool) -> list[dict]:
    """The generations file's records as {id, text[, reference], line}, checked field by field; or,
    for a speech task's generations, as unit_scores.unit_record gives them (all of one task)."""
    required = ("id", "text", "reference") if need_reference else ("id", "text")
    records, first_line_of, kinds = [], {}, set()
    try:
        with open(readable(path), "rb") as file:
            for line_number, raw in enumerate(file, start=1):
                if not raw.strip():
                    continue
                where = f"{path}:{line_number}"
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as error:
                    raise InputError(f"{where}: not UTF-8 text ({error.reason} at byte {error.start})") from None
                except json.JSONDecodeError as error:
                    raise InputError(f"{where}: not valid JSON ({error.msg})") from None
                if not isinstance(obj, dict):
                    raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
                if unit_scores.is_unit_record(obj):  # generate.py --task tts|continue
                    try:
                        record = unit_scores.unit_record(obj, where)
                    except unit_scores.RecordError as error:
                        raise InputError(str(error)) from None
                    if records and "task" in records[0] and record["task"] != records[0]["task"]:
                        raise InputError(f"{where}: a {record['task']} record among {records[0]['task']} records; "
                                         "score each task's generations on their own")
                    if record["id"] in first_line_of:
                        raise InputError(f"{where}: duplicate id {record['id']!r} (first on line "
                                         f"{first_line_of[record['id']]})")
                    first_line_of[record["id"]] = line_number
                    records.append(record)
                    kinds.add("units")
                    continue
                if "outputs" in obj and "text" not in obj:  # a vLLM record, from the reference's generate.py
                    try:
                        records.append({"id": None, "text": reference_run.vllm_text(obj, where)})
                    except reference_run.ReferenceError as error:
                        raise InputError(str(error)) from None
                    kinds.add("vLLM")
                    continue
                kinds.add("id")
                for field in required:
                    if field not in obj:
                        raise InputError(f"{where}: missing field '{field}'")
                    if not isinstance(obj[field], str):
                        raise InputError(f"{where}: field '{field}' must be a string, got {json.dumps(obj[field])}")
                if obj["id"] in first_line_of:
                    raise InputError(f"{where}: duplicate id {obj['id']!r} (first on line {first_line_of[obj['id']]})")
                first_line_of[obj["id"]] = line_number
                records.append({field: obj[field] for field in required})
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror})") from None
    if not records:
        raise InputError(f"{path}: no generations (the file is empty)")
    if "units" in kinds and len(kinds) > 1:
        raise InputError(f"{path}: mixes speech unit records ({{id, task, speech_tokens, reference_speech_tokens}}) "
                         "with transcript records")
    if len(kinds) > 1:
        raise InputError(f"{path}: mixes vLLM records (no ids) with {{id, text}} records")
    if kinds == {"vLLM"} and need_reference:
        raise InputError(f"{path}: vLLM records carry no reference transcript; pass --dataset PATH [--split S] "
                         "or --references FILE (joined by row order)")
    return records


def reference_source(args, infer: bool) -> Source | None:
    """Where references come from: --references, or --dataset and --split (the reference's flags;
    a name not on disk is looked up in the hub cache). With `infer` (generations without
    references) and neither flag, the dataset named by the file's directories, if the cache has it."""
    columns = {"transcript": args.gt_transcript_colname} if args.gt_transcript_colname else None
    split = args.split or reference_run.infer_split(args.generations)
    if args.references is not None:
        if args.dataset is not None:
            raise InputError("give --references or --dataset, not both")
        return Source(args.references, split, columns)
    dataset = args.dataset
    if dataset is None:
        if not infer:
            return None
        inferred = args.generations.absolute().parent.parent.name
        found = reference_run.hub_cache_dataset(inferred) if split else None
        return Source(found, split, columns) if found else None
    if not Path(dataset).exists():
        found = reference_run.hub_cache_dataset(dataset)
        if found is None:
            raise InputError(f"--dataset {dataset}: no such file or directory, nor a dataset of that name in the "
                             "Hugging Face hub cache; pass the dataset's path")
        dataset = found
    if split is None:
        raise InputError(f"--dataset {args.dataset}: pass --split (train, validation or test)")
    return Source(dataset, split, columns)


def references_by_row(records: list[dict], generations: Path, source: Source,
                      by: str | None = None) -> tuple[list[str], list[str] | None, list[str]]:
    """References for generations without ids, in the dataset's row order: transcripts, the `by`
    field as strings (None without `by`) and the rows' ids (to name utterances in the report)."""
    try:
        rows = load_rows(source, fields=("transcript",))
    except DataError as error:
        raise InputError(str(error)) from None
    where = f"{source}" + (f" (split {source.split})" if source.split else "")
    if len(rows) != len(records):
        raise InputError(f"{generations} has {len(records)} generations but {where} has {len(rows)} rows: "
                         "without ids they are joined by row order, so the counts must be equal")
    if by is not None:
        lacking = [row["id"] for row in rows if by not in row]
        if lacking:
            raise InputError(f"{where}: {len(lacking)} row(s) have no field '{by}': {id_list(lacking)}")
    groups = [str(row[by]) for row in rows] if by is not None else None
    return [row["transcript"] for row in rows], groups, [row["id"] for row in rows]


def id_list(ids: list[str], shown: int = 10) -> str:
    more = f", ... ({len(ids) - shown} more)" if len(ids) > shown else ""
    return ", ".join(repr(i) for i in ids[:shown]) + more


def join_references(records: list[dict], generations_path: Path, references_path: Path,
                    by: str | None = None) -> tuple[list[str], list[str] | None]:
    """The dataset's transcripts in the order of `records`, and the rows' `by` field as strings
    (None without `by`); every id must be on both sides, and every row must have `by`."""
    try:
        rows = load_rows(references_path, fields=("transcript",))  # checks ids are unique
    except DataError as error:
        raise InputError(str(error)) from None
    if not rows:
        raise InputError(f"{references_path}: no references (the dataset is empty)")
    if by is not None:
        lacking = [row["id"] for row in rows if by not in row]
        if lacking:
            raise InputError(f"{references_path}: {len(lacking)} row(s) have no field '{by}': {id_list(lacking)}")
    transcripts = {row["id"]: row["transcript"] for row in rows}
    generated = {record["id"] for record in records}
    unknown = [record["id"] for record in records if record["id"] not in transcripts]
    missing = [row["id"] for row in rows if row["id"] not in generated]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} generation id(s) not in {references_path}: {id_list(unknown)}")
    if missing:
        problems.append(f"{len(missing)} reference id(s) with no generation in {generations_path}: {id_list(missing)}")
    if problems:
        raise InputError("ids do not match: " + "; ".join(problems))
    groups = None
    if by is not None:
        value = {row["id"]: str(row[by]) for row in rows}
        groups = [value[record["id"]] for record in records]
    return [transcripts[record["id"]] for record in records], groups


def score_groups(hyps: list[str], refs: list[str], groups: list[str], normalizer: str = "whisper") -> dict:
    """Corpus WER/CER of each group's utterances on their own, groups in sorted order: {value: {wer,
    cer, errors, n_ref_words, n_utterances}}. A group whose references are all empty has WER null."""
    out = {}
    for value in sorted(set(groups)):
        mine = [i for i, g in enumerate(groups) if g == value]
        try:
            r = score([hyps[i] for i in mine], [refs[i] for i in mine], normalizer, bootstrap=0, worst=0)
        except ValueError:  # every reference empty
            out[value] = {"wer": None, "cer": None, "errors": None, "n_ref_words": 0, "n_utterances": len(mine)}
            continue
        errors = r["substitutions"] + r["deletions"] + r["insertions"]
        out[value] = {"wer": r["wer"], "cer": r["cer"], "errors": errors, "n_ref_words": r["n_ref_words"],
                      "n_utterances": len(mine)}
    return out


def percent(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"


def format_report(result: dict) -> str:
    ci = interval_text(result["wer_interval"])
    rows = [
        ("input", result["input"]),
        ("references", result["references"] or "from the generations file"),
        ("normaliser", result["normalizer"]),
        ("utterances", f"{result['n_utterances']}  ({result['n_empty_references']} with an empty reference)"),
        ("reference words", result["n_ref_words"]),
        ("WER", percent(result["wer"]) + ci),
        ("CER", f"{percent(result['cer'])}   ({result['n_char_errors']} edits / {result['n_ref_chars']} characters)"),
        ("substitutions", result["substitutions"]),
        ("deletions", result["deletions"]),
        ("insertions", result["insertions"]),
        ("hits", result["hits"]),
    ]
    lines = [f"  {name:<16} {value}" for name, value in rows]
    if result["worst"]:
        lines.append(f"\n{len(result['worst'])} worst utterance(s) by errors (normalised text):")
        id_width = max(len(entry["id"]) for entry in result["worst"])
        for entry in result["worst"]:
            rate = percent(entry["wer"]) if entry["wer"] is not None else "n/a (empty reference)"
            lines.append(f"  {entry['id']:<{id_width}}   errors {entry['errors']:>4}   WER {rate}")
            lines.append(f"    ref: {entry['reference']}")
            lines.append(f"    hyp: {entry['hypothesis']}")
    if result.get("groups"):
        lines.append(f"\nby {result['by']}:")
        width = max(len(value) for value in result["groups"])
        for value, g in result["groups"].items():
            rate = percent(g["wer"]) if g["wer"] is not None else "n/a"
            lines.append(f"  {value:<{width}}   WER {rate:>7}   ({g['n_utterances']} utterances, {g['n_ref_words']} words)")
    return "\n".join(lines)


# -- speech units: unit edit rate and round-trip WER -------------------------------------------------

ROUND_TRIP_DIR, ROUND_TRIP_DATA = "round_trip", "units.jsonl"
ROUND_TRIP_FIELDS = ("id", "speech_tokens", "transcript")
# what generate.py writes into its --out (it is a stage script: run as a command, never imported)
GENERATE_SCRIPT = Path(__file__).resolve().with_name("generate.py")
GENERATED, GENERATION_SETTINGS = "generations.jsonl", "generation_config.json"


def interval_of(errors: np.ndarray, lengths: np.ndarray, bootstrap: int, seed: int) -> dict | None:
    """The report's bootstrap interval of total errors over total lengths, None when `bootstrap` is 0."""
    if bootstrap <= 0:
        return None
    low, high = bootstrap_interval(errors, lengths, bootstrap, seed)
    return {"low": low, "high": high, "confidence": CONFIDENCE, "resamples": bootstrap, "seed": seed}


def score_unit_generations(args, records: list[dict], references: Source | None, out: Path,
                           scored_with: dict) -> dict:
    """The report of a speech task's generations: the unit edit rate (unit_scores.py), by --by group,
    and with --asr the round-trip WER of the generated units transcribed by that checkpoint."""
    task = records[0]["task"]
    if args.asr is not None and task != "tts":
        raise InputError(f"--asr scores generated speech against the text it was spoken from, which only tts "
                         f"records have; {args.generations} holds {task} records")
    groups = None
    if references is not None:  # only for --by: the reference units are the records'
        _, groups = join_references(records, args.generations, references, args.by)
    hyps = [record["speech_tokens"] for record in records]
    refs = [record["reference_speech_tokens"] for record in records]
    try:
        result = unit_scores.score_units(
            hyps, refs, [record["id"] for record in records], worst=args.worst,
            interval=lambda errors, lengths: interval_of(errors, lengths, args.bootstrap, args.seed))
    except ValueError as error:
        raise InputError(f"{args.generations}: {error}") from None
    if groups is not None:
        result = {**result, "by": args.by, "groups": unit_scores.score_unit_groups(hyps, refs, groups)}
    round_trip = None
    if args.asr is not None:
        if os.path.lexists(out) and not args.overwrite and earlier_settings(out) != scored_with:
            # refused before transcribing anything, rather than after
            raise InputError(f"{out} already exists, scored with other settings; pass --overwrite to replace it")
        round_trip = round_trip_wer(args, records, groups, out.parent / ROUND_TRIP_DIR)
    return {"input": str(args.generations), "references": references_name(references), "task": task, **result,
            "round_trip": round_trip, "scored_with": scored_with}


def round_trip_rows(args, records: list[dict], groups: list[str] | None) -> list[dict]:
    """The dataset generate.py transcribes: each record's generated units as speech, its text as the
    transcript (and its --by field, unless that names one of these); records without units are left
    out (no speech to transcribe)."""
    untexted = [record["id"] for record in records if record["text"] is None]
    if untexted:
        raise InputError(f"{args.generations}: {len(untexted)} record(s) have no 'text' to score the round trip "
                         f"against: {id_list(untexted)}")
    return [{"id": record["id"], "speech_tokens": record["speech_tokens"], "transcript": record["text"],
             **({args.by: groups[i]} if groups is not None and args.by not in ROUND_TRIP_FIELDS else {})}
            for i, record in enumerate(records) if record["speech_tokens"]]


def read_transcripts(folder: Path, ids: list[str]) -> dict[str, str]:
    """{id: transcript} of generate.py's output in `folder`, which must hold exactly `ids`."""
    records = read_generations(folder / GENERATED, need_reference=False)
    got = [record["id"] for record in records]
    if sorted(got) != sorted(ids):
        raise InputError(f"{folder / GENERATED}: its ids are not those of {folder / ROUND_TRIP_DATA}")
    return {record["id"]: record["text"] for record in records}


def earlier_round_trip(folder: Path, data: bytes, checkpoint: Path, backend: str, ids: list[str]) -> dict | None:
    """The transcripts of an earlier round trip in `folder` of the same units by the same checkpoint
    (greedy, by the same backend unless `auto`), or None when there is none such."""
    paths = [folder / name for name in (ROUND_TRIP_DATA, GENERATION_SETTINGS, GENERATED)]
    if not all(path.is_file() for path in paths) or paths[0].read_bytes() != data:
        return None
    try:
        settings = files.read_json(paths[1])
        if (settings.get("checkpoint") != str(checkpoint.resolve()) or settings.get("task", "asr") != "asr"
                or settings.get("temperature") != 0 or backend not in ("auto", settings.get("backend"))):
            return None
        return read_transcripts(folder, ids)
    except (files.JsonFileError, InputError):
        return None


def round_trip_wer(args, records: list[dict], groups: list[str] | None, folder: Path) -> dict:
    """WER and CER of the tts records' generated units transcribed by the --asr checkpoint
    (`generate.py CHECKPOINT --data FOLDER/units.jsonl --out FOLDER`), against the text each was
    spoken from; a record without units is an empty transcript (all deletions). An earlier round
    trip in FOLDER of the same units by the same checkpoint is reused; another is replaced only
    with --overwrite."""
    checkpoint = args.asr
    if not (checkpoint / model_dir.CONFIG).is_file():
        raise InputError(f"--asr {checkpoint}: not a checkpoint directory (no {model_dir.CONFIG}); a run's "
                         "checkpoints are its checkpoints/step_N")
    problem = directory_problem(folder)
    if problem:
        raise InputError(f"round trip: {problem}")
    rows = round_trip_rows(args, records, groups)
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    ids = [row["id"] for row in rows]
    transcripts = {}
    if rows:
        transcripts = earlier_round_trip(folder, data, checkpoint, args.backend, ids)
        if transcripts is None:
            taken = [str(folder / name) for name in (ROUND_TRIP_DATA, GENERATED) if os.path.lexists(folder / name)]
            if taken and not args.overwrite:
                raise InputError(f"{', '.join(taken)} already exist(s), from other units, another checkpoint or "
                                 "backend; pass --overwrite to transcribe again")
            transcripts = transcribe(folder, data, checkpoint, args.backend, ids)
        else:
            print(f"round trip: reusing the transcripts in {folder / GENERATED}", file=sys.stderr)
    hyps = [transcripts.get(record["id"], "") for record in records]
    try:
        result = score(hyps, [record["text"] for record in records], args.normalizer,
                       ids=[record["id"] for record in records], bootstrap=args.bootstrap, seed=args.seed,
                       worst=args.worst)
    except ValueError as error:
        raise InputError(f"{args.generations}: round trip: {error}") from None
    if groups is not None:
        result = {**result, "by": args.by, "groups": score_groups(hyps, [r["text"] for r in records], groups,
                                                                   args.normalizer)}
    return {"asr_checkpoint": str(checkpoint.resolve()), "backend": args.backend,
            "transcripts": str(folder / GENERATED) if rows else None,
            "n_empty_hypotheses": len(records) - len(rows), **result}


def transcribe(folder: Path, data: bytes, checkpoint: Path, backend: str, ids: list[str]) -> dict[str, str]:
    """Writes `data` to FOLDER/units.jsonl and transcribes it greedily with generate.py."""
    write_into(folder, {folder / ROUND_TRIP_DATA: data})
    command = [sys.executable, str(GENERATE_SCRIPT), str(checkpoint), "--data", str(folder / ROUND_TRIP_DATA),
               "--out", str(folder), "--backend", backend, "--overwrite"]
    print(f"round trip: {' '.join(command)}", file=sys.stderr, flush=True)
    try:  # its messages to stderr, beside ours: stdout is the report's
        messages = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stderr without a file (captured)
        messages = None
    status = subprocess.run(command, stdout=messages).returncode
    if status != 0:
        raise InputError(f"round trip: generate.py exited with status {status} transcribing "
                         f"{folder / ROUND_TRIP_DATA} with {checkpoint} (its messages are above)")
    return read_transcripts(folder, ids)


def interval_text(interval: dict | None) -> str:
    if not interval:
        return ""
    return (f"   {interval['confidence']:.0%} CI [{percent(interval['low'])}, {percent(interval['high'])}]"
            f"  ({interval['resamples']} resamples, seed {interval['seed']})")


def format_unit_report(result: dict) -> str:
    """The unit edit rate's report, then the round trip's (as format_report's) when there is one."""
    rows = [
        ("input", result["input"]),
        ("references", "units from the generations file" + (f"; groups from {result['references']}"
                                                           if result["references"] else "")),
        ("task", result["task"]),
        ("utterances", f"{result['n_utterances']}  ({result['n_empty_hypotheses']} with no generated units, "
                       f"{result['n_empty_references']} with no reference units)"),
        ("reference units", f"{result['n_ref_units']}  (both sides deduplicated: consecutive repeats collapsed)"),
        ("generated units", result["n_hyp_units"]),
        ("unit edit rate", percent(result["unit_edit_rate"]) + interval_text(result["unit_edit_rate_interval"])),
        *((kind, result[kind]) for kind in unit_scores.KINDS),
    ]
    lines = [f"  {name:<16} {value}" for name, value in rows]
    if result["worst"]:
        lines.append(f"\n{len(result['worst'])} worst utterance(s) by unit edits:")
        id_width = max(len(entry["id"]) for entry in result["worst"])
        for entry in result["worst"]:
            rate = percent(entry["unit_edit_rate"]) if entry["unit_edit_rate"] is not None else "n/a"
            lines.append(f"  {entry['id']:<{id_width}}   errors {entry['errors']:>4}   unit edit rate {rate:>7}   "
                         f"({entry['ref_units']} reference units, {entry['hyp_units']} generated)")
    if result.get("groups"):
        lines.append(f"\nby {result['by']}:")
        width = max(len(value) for value in result["groups"])
        for value, g in result["groups"].items():
            rate = percent(g["unit_edit_rate"]) if g["unit_edit_rate"] is not None else "n/a"
            lines.append(f"  {value:<{width}}   unit edit rate {rate:>7}   ({g['n_utterances']} utterances, "
                         f"{g['n_ref_units']} units)")
    trip = result["round_trip"]
    if trip is not None:
        lines.append(f"\nround-trip WER: the generated units transcribed by {trip['asr_checkpoint']} "
                     f"({trip['backend']} backend, greedy), scored against the text they were spoken from")
        if trip["n_empty_hypotheses"]:
            lines.append(f"  {trip['n_empty_hypotheses']} utterance(s) with no generated units: empty transcripts "
                         "(all deletions)")
        lines.append(format_report({**trip, "input": trip["transcripts"] or "(no units to transcribe)",
                                    "references": "the tts records' text"}))
    return "\n".join(lines)


# -- a whole run -----------------------------------------------------------------------------------

RUN_TABLE, RUN_PLOT = "wer_by_step.tsv", "wer_by_step.png"
GENERATIONS_ONLY = ("references", "dataset", "by", "asr", "backend")  # flags for one generations file


def run_generations(run_dir: Path) -> list[tuple[int, str, Path]]:
    """(step, "<dataset>/<split>", generations.jsonl) of every checkpoint's generations in a run, by step."""
    root = run_dir / model_dir.GENERATIONS
    found = []
    for path in root.rglob("generations.jsonl"):
        parts = path.relative_to(root).parts[:-1]
        step = model_dir.generations_step(parts)
        if step is not None:  # else not a checkpoint's (e.g. an untrained model's, generated elsewhere)
            found.append((step, "/".join(parts[-2:]), path))
    return sorted(found)


def score_run(run_dir: Path, normalizer: str, bootstrap: int, seed: int) -> list[dict]:
    """WER and CER of each checkpoint's generations, one row per (step, dataset/split); for a speech
    task's generations (`<split>-tts`, `<split>-continue`), the unit edit rate in the WER column,
    no CER, and the row's `metric` says so."""
    found = run_generations(run_dir)
    if not found:
        raise InputError(f"{run_dir}: no generations/<step>/<dataset>/<split>/generations.jsonl "
                         "(generate.py RUN_DIR writes them)")
    rows = []
    for step, name, path in found:
        records = read_generations(path, need_reference=True)
        if "speech_tokens" in records[0]:
            try:
                result = unit_scores.score_units(
                    [r["speech_tokens"] for r in records], [r["reference_speech_tokens"] for r in records], worst=0,
                    interval=lambda errors, lengths: interval_of(errors, lengths, bootstrap, seed))
            except ValueError as error:
                raise InputError(f"{path}: {error}") from None
            interval = result["unit_edit_rate_interval"] or {"low": None, "high": None}
            rows.append({"step": step, "set": name, "n_utterances": result["n_utterances"],
                         "wer": result["unit_edit_rate"], "cer": None, "wer_low": interval["low"],
                         "wer_high": interval["high"], "metric": unit_scores.LABEL})
            continue
        try:
            result = score([r["text"] for r in records], [r["reference"] for r in records], normalizer,
                           bootstrap=bootstrap, seed=seed, worst=0)
        except ValueError as error:
            raise InputError(f"{path}: {error}") from None
        interval = result["wer_interval"] or {"low": None, "high": None}
        rows.append({"step": step, "set": name, "n_utterances": result["n_utterances"], "wer": result["wer"],
                     "cer": result["cer"], "wer_low": interval["low"], "wer_high": interval["high"],
                     "metric": "WER"})
    return rows


def format_run_table(rows: list[dict], sep: str | None = None) -> str:
    """The rows as TSV (`sep="\\t"`, full precision) or as aligned text for people (WER in %). A run
    with speech task generations gets a `metric` column (TSV: the last): WER, or unit edit rate (then
    in the WER column)."""
    labelled = any(r["metric"] != "WER" for r in rows)
    columns = ["step", "set", "n_utterances", "wer", "cer", "wer_low", "wer_high"] + (["metric"] if labelled else [])
    if sep is not None:
        return "\n".join([sep.join(columns)] + [sep.join("" if r[c] is None else str(r[c]) for c in columns)
                                                  for r in rows]) + "\n"
    width = max(len(r["set"]) for r in rows)
    metric_width = max(len(r["metric"]) for r in rows)

    def metric(text):  # a column only where some row is not WER
        return f"{text:<{metric_width}}  " if labelled else ""

    lines = [f"{'step':>8}  {'set':<{width}}  {metric('metric')}{'utts':>5}  {'WER':>7}  {'CER':>7}  95% CI of WER"
             + (" (or of the row's metric)" if labelled else "")]
    for r in rows:
        ci = f"[{percent(r['wer_low'])}, {percent(r['wer_high'])}]" if r["wer_low"] is not None else ""
        cer = "" if r["cer"] is None else percent(r["cer"])
        lines.append(f"{r['step']:>8}  {r['set']:<{width}}  {metric(r['metric'])}{r['n_utterances']:>5}  "
                     f"{percent(r['wer']):>7}  {cer:>7}  {ci}")
    return "\n".join(lines)


def plot_run(rows: list[dict], title: str) -> bytes:
    """WER (%) against step, a line per dataset/split, with its bootstrap interval as a band, as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in sorted({r["set"] for r in rows}):
        mine = [r for r in rows if r["set"] == name]
        steps = [r["step"] for r in mine]
        ax.plot(steps, [100 * r["wer"] for r in mine], "o-", markersize=4, label=f"{name} {mine[0]['metric']}")
        if all(r["wer_low"] is not None for r in mine):
            ax.fill_between(steps, [100 * r["wer_low"] for r in mine], [100 * r["wer_high"] for r in mine], alpha=0.2)
    metrics = " / ".join(dict.fromkeys(r["metric"] for r in sorted(rows, key=lambda r: r["metric"] != "WER")))
    ax.set(xlabel="checkpoint (optimizer step)", ylabel=f"{metrics} (%)", title=title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return png.getvalue()


def main_run(args) -> int:
    """wer.py RUN_DIR: the table and the plot, or exit status 2 and nothing written."""
    out_dir = args.out or args.generations
    table, png = out_dir / RUN_TABLE, out_dir / RUN_PLOT
    try:
        if any(getattr(args, key) is not None for key in GENERATIONS_ONLY):
            raise InputError("--references, --dataset, --by, --asr and --backend score one generations file, "
                             "not a run directory")
        check_output(out_dir, directory=True)
        check_overwrite([table, png], args.overwrite)
        rows = score_run(args.generations, args.normalizer, args.bootstrap, args.seed)
        title = f"{args.generations.resolve().name}: WER by checkpoint ({args.normalizer} normaliser)"
        write_into(out_dir, {table: format_run_table(rows, sep="\t").encode(), png: plot_run(rows, title)})
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_run_table(rows))
    print(f"\nwrote {table} and {png}")
    return 0


# The flags that decide a report's figures, with their defaults. A report records them
# (`scored_with`), so that scoring the same generations again without flags scores them the same way.
SCORING_DEFAULTS = {"references": None, "dataset": None, "split": None, "gt_transcript_colname": None, "by": None,
                    "normalizer": "whisper", "bootstrap": 1000, "seed": 0, "worst": 10}
# Recorded by reports of speech units only, so a transcripts report is what it always was. The
# round trip's backend is recorded as run (ROUND_TRIP_BACKEND unless --backend), None without --asr.
ROUND_TRIP_DEFAULTS = {"asr": None, "backend": None}
ROUND_TRIP_BACKEND = "torch"
ALL_SCORING_DEFAULTS = {**SCORING_DEFAULTS, **ROUND_TRIP_DEFAULTS}


def earlier_settings(out: Path) -> dict:
    """The scoring flags recorded in an existing report at `out` ({} when there is none, or it
    predates the record, or it cannot be read: then it is only replaced with --overwrite)."""
    if not out.is_file():
        return {}
    try:
        recorded = files.read_json(out).get("scored_with")
    except files.JsonFileError:
        return {}
    if not isinstance(recorded, dict) or set(recorded) not in (set(SCORING_DEFAULTS), set(ALL_SCORING_DEFAULTS)):
        return {}
    return recorded


def resolve_scoring(args, out: Path) -> dict:
    """The scoring flags: those given, else (when none is given) the existing report's, else the defaults."""
    given = {key: getattr(args, key) for key in ALL_SCORING_DEFAULTS if getattr(args, key) is not None}
    earlier = {} if given else earlier_settings(out)
    settings = {**ALL_SCORING_DEFAULTS, **earlier, **given}
    flags = " ".join(f"--{key} {value}" for key, value in earlier.items() if value != ALL_SCORING_DEFAULTS[key])
    if flags:
        print(f"scoring as {out} was scored: {flags}", file=sys.stderr)
    paths = ("references", "asr")
    for key, value in settings.items():
        setattr(args, key, Path(value) if key in paths and value is not None else value)
    return {key: None if value is None else str(value) if key in paths else value
            for key, value in settings.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compare or args.generations.is_dir():
        for key, default in SCORING_DEFAULTS.items():
            if key in ("normalizer", "bootstrap", "seed", "worst") and getattr(args, key) is None:
                setattr(args, key, default)
        if not args.compare:
            return main_run(args)
        if any(getattr(args, key) is not None for key in GENERATIONS_ONLY):
            print("error: --references, --dataset, --by, --asr and --backend score generations; --compare reads "
                  "wer.json reports", file=sys.stderr)
            return 2
        return compare_table.main(args.compare, args.out, args.overwrite)
    out = args.out or args.generations.with_name("wer.json")
    try:
        readable(args.generations)  # before anything opens it
        check_output(out, directory=False)
        scored_with = resolve_scoring(args, out)
        references = reference_source(args, infer=reference_run.holds_vllm_records(args.generations))
        if args.by is not None and references is None:
            raise InputError("--by needs --references (the dataset whose field it names)")
        records = read_generations(args.generations, need_reference=references is None)
        if "speech_tokens" in records[0]:  # a speech task's generations: unit edit rate (unit_scores.py)
            if args.backend is not None and args.asr is None:
                raise InputError("--backend chooses the round trip's engine; it needs --asr CHECKPOINT")
            if args.asr is not None:
                args.backend = scored_with["backend"] = args.backend or ROUND_TRIP_BACKEND
            result = score_unit_generations(args, records, references, out, scored_with)
        else:
            if args.asr is not None or args.backend is not None:
                raise InputError(f"--asr and --backend transcribe generated speech (tts records); "
                                 f"{args.generations} holds transcripts")
            scored_with = {key: scored_with[key] for key in SCORING_DEFAULTS}
            result = score_transcripts(args, records, references, scored_with)
        report = (json.dumps(result, indent=2, ensure_ascii=False) + "\n").encode()
        unchanged = out.is_file() and readable(out).read_bytes() == report
        if os.path.lexists(out) and not unchanged and not args.overwrite:
            raise InputError(f"{out} already exists with other figures or settings; pass --overwrite to replace it")
        if not unchanged:
            write_into(out.parent, {out: report})
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_unit_report(result) if "unit_edit_rate" in result else format_report(result))
    print(f"\n{out} is unchanged" if unchanged else f"\nwrote {out}")
    return 0


def references_name(references: Source | None) -> str | None:
    """How a report names the references' dataset."""
    if references is None:
        return None
    return str(references) + (f" (split {references.split})" if references.split else "")


def score_transcripts(args, records: list[dict], references: Source | None, scored_with: dict) -> dict:
    """The report of transcripts: WER, CER (by --by group) against the records' references or the dataset's."""
    ids = [record["id"] for record in records]
    if references is None:
        refs, groups = [record["reference"] for record in records], None
    elif ids[0] is None:
        refs, groups, ids = references_by_row(records, args.generations, references, args.by)
    else:
        refs, groups = join_references(records, args.generations, references, args.by)
    try:
        result = score([record["text"] for record in records], refs, args.normalizer, ids=ids,
                       bootstrap=args.bootstrap, seed=args.seed, worst=args.worst)
    except ValueError as error:
        raise InputError(f"{references or args.generations}: {error}") from None
    if groups is not None:
        hyps = [record["text"] for record in records]
        result = {**result, "by": args.by, "groups": score_groups(hyps, refs, groups, args.normalizer)}
    return {"input": str(args.generations), "references": references_name(references), **result,
            "scored_with": scored_with}


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("generations", type=Path, nargs="?", help="generations.jsonl: one {id, text, reference} "
                        "object per line; or a run directory: every checkpoint's generations, scored by step")
    inputs.add_argument("--compare", type=Path, nargs="+", metavar="WER_JSON_OR_DIR",
                        help="compare cells instead: wer.json reports, or directories searched for them; writes "
                        "compare.md, compare.csv and compare.png")
    parser.add_argument("--references", type=Path, help="dataset file (JSONL or Parquet) whose `transcript` is joined by `id`")
    parser.add_argument("--dataset", help="reference transcripts from this dataset (directory, file, or a name in the "
                        "local hub cache), in row order for generations without ids; the reference's flag")
    parser.add_argument("--split", help="the --dataset split (train, validation or dev, test); default: the name of "
                        "the generations file's directory, as the reference infers it")
    parser.add_argument("--gt_transcript_colname", "--gt-transcript-colname", metavar="COLUMN",
                        help="the reference transcripts' column (default: transcript)")
    parser.add_argument("--by", metavar="FIELD",
                        help="also score each value of this --references field on its own, e.g. speaker")
    parser.add_argument("--normalizer", "--normaliser", choices=NORMALIZERS,
                        help="text normaliser applied to hypotheses and references (default: whisper)")
    parser.add_argument("--asr", type=Path, metavar="CHECKPOINT",
                        help="tts generations: also transcribe the generated units with this ASR checkpoint "
                        "(generate.py, greedy; into round_trip/ beside the report) and score that round-trip WER "
                        "against the text they were spoken from")
    parser.add_argument("--backend", choices=("auto", "vllm", "torch"),
                        help=f"the round trip's generate.py --backend (default: {ROUND_TRIP_BACKEND})")
    parser.add_argument("--out", type=Path, help="report JSON path (default: wer.json beside the input); for a run "
                        "directory, the directory of wer_by_step.tsv and .png (default: the run directory); with "
                        "--compare, the directory of compare.* (default: the deepest directory holding every "
                        "report given)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report whose figures or "
                        "settings differ (scoring again to the same report needs no flag)")
    parser.add_argument("--bootstrap", type=non_negative_int, help="bootstrap resamples, 0 to skip (default: 1000)")
    parser.add_argument("--seed", type=non_negative_int, help="bootstrap seed (default: 0)")
    parser.add_argument("--worst", type=non_negative_int, help="worst utterances to list (default: 10)")
    parser.epilog = ("Scoring generations whose wer.json exists, with none of the flags from --references to "
                     "--worst (nor --asr, --backend), scores them with the flags that report was made with (it records them).")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())

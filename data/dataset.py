"""Streaming, validated loading of speech-text rows in the reference's schema (DESIGN.md, "Data").

A source is a JSON Lines file (`.jsonl` or `.json`), a Parquet file, a directory holding such
files, or a glob pattern. Rows are read file by file (JSONL line by line, Parquet one record batch
at a time) and checked as they stream, so a bad row fails with a `DataError` that names the file,
the line (JSONL, 1-based) or row (Parquet, 0-based), and the field at fault.

Which fields each consumer needs (pass them as `fields=`; unrequested schema fields are neither
checked nor returned, and Parquet does not even read their columns):
- CPT interleaved: all of `SCHEMA_FIELDS` (word times pick the DSUs under each word span);
- CPT concatenated, SFT (ASR) training and generation prompts: `ASR_FIELDS`;
- WER references: `("transcript",)`.
"""

import glob
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.tokenizer import MAX_DSUS

SCHEMA_FIELDS = (
    "transcript",
    "tokenized",
    "aligned_token_start_time",
    "aligned_token_end_time",
    "speech_tokens",
)
ASR_FIELDS = ("transcript", "speech_tokens")
WORD_FIELDS = ("tokenized", "aligned_token_start_time", "aligned_token_end_time")
TIME_FIELDS = ("aligned_token_start_time", "aligned_token_end_time")

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
PARQUET_BATCH_ROWS = 1024


class DataError(ValueError):
    """Bad input data; the message names the file, the line or row, and the field."""


def resolve_files(source: str) -> list[Path]:
    """The data files of `source`: a file, a directory (its data files, sorted) or a glob (sorted)."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and _is_data_file(p))
        if not files:
            raise DataError(f"{source}: no {', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)} files in directory")
        return files
    if path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(str(source), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{source}: no such file or directory, and no file matches it as a glob")
    for file in files:
        if not _is_data_file(file):
            raise DataError(
                f"{file}: unknown extension {file.suffix!r} "
                f"(expected one of {', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)})"
            )
    return files


def iter_rows(
    source: str,
    *,
    n_dsus: int | None = None,
    fields: Sequence[str] = SCHEMA_FIELDS,
    unique_ids: bool = True,
) -> Iterator[dict]:
    """Yield the validated rows of `source`, lazily, in file order then row order.

    Each row holds `id` (given, or derived as "<file stem>:<row index>"), the requested `fields`
    (`speech_tokens` as a numpy int64 array) and any non-schema fields of the source unchanged.
    DSU ids must lie in [0, n_dsus), or in [0, MAX_DSUS) when `n_dsus` is None.
    Ids must be unique across the whole source; every id is kept in memory to check that, unless
    `unique_ids` is False (`data.store` checks them itself, in less memory).
    """
    unknown = [f for f in fields if f not in SCHEMA_FIELDS]
    if unknown:
        raise ValueError(f"unknown fields {unknown}; choose from {SCHEMA_FIELDS}")
    if n_dsus is not None and not 0 < n_dsus <= MAX_DSUS:
        raise ValueError(f"n_dsus must be in [1, {MAX_DSUS}], got {n_dsus}")
    dsu_limit = MAX_DSUS if n_dsus is None else n_dsus
    fields = tuple(fields)
    first_seen: dict[str, str] = {}
    for path in resolve_files(source):
        raw_rows = _iter_parquet(path, fields) if _is_parquet(path) else _iter_jsonl(path)
        for index, (where, row) in enumerate(raw_rows):
            row = _checked_row(row, where, fields, dsu_limit)
            if row.get("id") is None:
                row["id"] = f"{path.stem}:{index}"
            elif not isinstance(row["id"], str):
                raise _field_error(where, "id", f"expected a string, got {type(row['id']).__name__}")
            if unique_ids:
                if row["id"] in first_seen:
                    problem = f"duplicate id {row['id']!r}, first at {first_seen[row['id']]}"
                    raise _field_error(where, "id", problem)
                first_seen[row["id"]] = where
            yield row


def load_rows(source: str, **kwargs) -> list[dict]:
    """All rows of `source` as a list; keyword arguments as for `iter_rows`."""
    return list(iter_rows(source, **kwargs))


def count_rows(source: str) -> int:
    """Number of rows without validating them (Parquet metadata; non-blank JSONL lines)."""
    total = 0
    for path in resolve_files(source):
        if _is_parquet(path):
            total += _open_parquet(path).metadata.num_rows
        else:
            with open(path, "rb") as f:
                total += sum(1 for line in f if line.strip())
    return total


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in PARQUET_SUFFIXES


def _is_data_file(path: Path) -> bool:
    return path.suffix.lower() in JSONL_SUFFIXES + PARQUET_SUFFIXES


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason})") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON: {e.msg} at column {e.colno}") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None


def _iter_parquet(path: Path, fields: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    parquet = _open_parquet(path)
    # Unrequested schema columns (often the heavy DSU lists) are never read; a requested column
    # that the file lacks shows up as a missing field in row 0.
    columns = [c for c in parquet.schema_arrow.names if c not in SCHEMA_FIELDS or c in fields]
    row_number = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
        dsus = _dsu_slices(batch.column("speech_tokens")) if "speech_tokens" in batch.schema.names else None
        other = batch.drop_columns(["speech_tokens"]) if dsus is not None else batch
        for i, row in enumerate(other.to_pylist()):
            if dsus is not None:
                row["speech_tokens"] = dsus[i]
            yield f"{path}: row {row_number}", row
            row_number += 1


def _dsu_slices(column: pa.Array) -> list[np.ndarray] | None:
    """Per-row views into a clean list<int> column's values, avoiding Python lists of ints.

    None when the column is anything else (wrong type, nulls), so that the row checks report it.
    """
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        return None
    if not pa.types.is_integer(column.type.value_type) or column.null_count or column.values.null_count:
        return None
    values = column.values.to_numpy()
    offsets = column.offsets.to_numpy()
    return [values[start:end] for start, end in zip(offsets[:-1], offsets[1:])]


def _field_error(where: str, field: str, problem: str) -> DataError:
    return DataError(f"{where}: field '{field}': {problem}")


def _checked_row(row: dict, where: str, fields: tuple[str, ...], dsu_limit: int) -> dict:
    """`row` without unrequested schema fields, its requested fields checked and DSUs as int64."""
    checked = {k: v for k, v in row.items() if k not in SCHEMA_FIELDS}
    for field in fields:
        if row.get(field) is None:
            why = " (interleaved CPT needs word times; data without them trains with SFT or concatenated CPT)"
            raise _field_error(where, field, "missing" + (why if field in TIME_FIELDS else ""))
        checked[field] = row[field]

    if "transcript" in fields and not isinstance(row["transcript"], str):
        raise _field_error(where, "transcript", f"expected a string, got {type(row['transcript']).__name__}")
    if "tokenized" in fields:
        words = row["tokenized"]
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise _field_error(where, "tokenized", "expected a list of strings")
    for field in TIME_FIELDS:
        if field in fields:
            _check_times(row[field], where, field)

    word_fields = [f for f in WORD_FIELDS if f in fields]
    for field in word_fields[1:]:
        if len(row[field]) != len(row[word_fields[0]]):
            problem = f"{len(row[field])} entries but '{word_fields[0]}' has {len(row[word_fields[0]])}"
            raise _field_error(where, field, problem)
    if all(f in fields for f in TIME_FIELDS):
        starts, ends = row["aligned_token_start_time"], row["aligned_token_end_time"]
        for word, (start, end) in enumerate(zip(starts, ends)):
            if start > end:
                problem = f"word {word} starts at {start}, after its end {end}"
                raise _field_error(where, "aligned_token_start_time", problem)

    if "speech_tokens" in fields:
        checked["speech_tokens"] = _dsu_array(row["speech_tokens"], where, dsu_limit)
    return checked


def _check_times(times, where: str, field: str) -> None:
    if not isinstance(times, list):
        raise _field_error(where, field, f"expected a list of numbers, got {type(times).__name__}")
    for word, t in enumerate(times):
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise _field_error(where, field, f"word {word}: expected a number, got {type(t).__name__}")
        if not math.isfinite(t) or t < 0:
            raise _field_error(where, field, f"word {word}: time {t} is not a finite non-negative number")


def _dsu_array(value, where: str, dsu_limit: int) -> np.ndarray:
    """`value` (a list, or a numpy view from Parquet) as int64 DSU ids, checked in bulk with numpy."""
    if isinstance(value, list):
        if not value:
            return np.empty(0, dtype=np.int64)
        try:
            value = np.array(value)
        except (ValueError, OverflowError):
            raise _field_error(where, "speech_tokens", "expected a flat list of integers") from None
    if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind not in "iu":
        raise _field_error(where, "speech_tokens", "expected a list of integers")
    if value.size:
        outside = (value < 0) | (value >= dsu_limit)
        if outside.any():
            position = int(np.argmax(outside))
            problem = f"DSU {value[position]} at position {position} outside [0, {dsu_limit})"
            raise _field_error(where, "speech_tokens", problem)
    # A copy, so that rows never pin a whole Parquet record batch in memory.
    return value.astype(np.int64)

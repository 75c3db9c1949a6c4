"""Streaming, validated loading of speech-text rows in the reference's schema (docs/DESIGN.md, "Data").

A source is a JSON Lines file (`.jsonl` or `.json`), a Parquet file, an Arrow file (`.arrow`, as
`datasets` writes), a directory holding such files, or a glob pattern. Dataset directories as the
Hugging Face hub and `datasets` lay them out are read too, one split at a time (`Source`, below):
- hub layout: the directory, or its `data/` directory, holds files named by split
  (`train-00000-of-00004.parquet`, `validation-*`, `test-*`; also `dev`/`valid` for validation);
- a hub cache entry (`datasets--owner--name`, or one of its `snapshots/<revision>` directories,
  whose files are symlinks);
- `datasets`' `save_to_disk` output: a `DatasetDict` directory (`dataset_dict.json` and one
  directory per split) or a `Dataset` directory (`state.json` naming its `.arrow` files).
Such a directory given without a split is refused: rows of two splits are only ever mixed by
naming their files (or a glob matching them). A split is complete or refused: numbered shards
(`-0000K-of-0000N`) must all be there (`check_shards`). Where a data file is expected, a FIFO, a
device or a symlink loop is refused before it is opened. Rows are read file by file (JSONL line
by line, Parquet one record batch at a time) and checked as they stream, so a bad row fails with a
`DataError` that names the file, the line (JSONL, 1-based) or row (Parquet, 0-based), and the field
at fault.

Which fields each consumer needs (pass them as `fields=`; unrequested schema fields are neither
checked nor returned, and Parquet does not even read their columns): `task_fields` for training
sequences, `ASR_FIELDS` for generation prompts, `("transcript",)` for WER references.

The utterance id is the `id` column, else `ID` (the reference's hub datasets), else derived.
Columns named differently from the schema are mapped with `Source(columns={field: column})`.
"""

import glob
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.tokenizer import MAX_DSUS
from files import JsonFileError, NotRegularFile, read_json, regular_file

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


def task_fields(task: str, sequence_type: str) -> tuple[str, ...]:
    """The fields a training task's sequences read (`sequence_type` matters for CPT only)."""
    if task == "sft":
        return ASR_FIELDS
    if sequence_type == "interleaved":  # word times pick the DSUs under each word span
        return SCHEMA_FIELDS
    return ("tokenized", "speech_tokens")  # words joined, as the reference does


JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
DATA_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES
# Split names and the file-name prefixes that the hub takes for each of them.
SPLIT_PREFIXES = {"train": ("train",), "validation": ("validation", "valid", "dev", "val"), "test": ("test",)}
SPLIT_NAME = re.compile(r"^(train|validation|valid|dev|val|test)(?=[-_.]|$)", re.IGNORECASE)
MAPPABLE_FIELDS = ("id",) + SCHEMA_FIELDS
# JSON files that `datasets` and the hub keep beside the data: never rows.
METADATA_FILES = ("dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json")
PARQUET_BATCH_ROWS = 1024


class DataError(ValueError):
    """Bad input data; the message names the file, the line or row, and the field."""


class Source(str):
    """A source path narrowed to one split of a dataset directory and/or with columns renamed.

    It is a str, so that code which only passes sources along (`data.store`) keeps working.
    `split` is a split name (`train`, `validation` or `dev`, `test`; ignored for plain files,
    directories of shards and globs); `columns` maps schema fields (and `id`) to column names.
    """

    split: str | None
    columns: dict[str, str]

    def __new__(cls, path, split: str | None = None, columns: dict | None = None):
        self = super().__new__(cls, str(path))
        self.split = _split_key(split) if split else None
        self.columns = _checked_columns(columns or {})
        return self

    def __repr__(self) -> str:
        return f"Source({str(self)!r}, split={self.split!r}, columns={self.columns!r})"


def canonical_split(name: str) -> str:
    """`dev`, `valid` and `val` are the validation split, as the reference and the hub take them."""
    for split, prefixes in SPLIT_PREFIXES.items():
        if name.lower() in prefixes:
            return split
    raise DataError(f"unknown split {name!r}: expected train, validation (or dev) or test")


def _split_key(name: str) -> str:
    """A known split's canonical name; any other name as it is (a save_to_disk split may have one)."""
    try:
        return canonical_split(name)
    except DataError:
        return name


def _checked_columns(columns: dict) -> dict[str, str]:
    """The non-null entries of a {schema field: column name} mapping, checked."""
    if not isinstance(columns, dict):
        raise DataError(f"data.columns: expected an object of field: column name, got {columns!r}")
    out = {}
    for field, column in columns.items():
        if field not in MAPPABLE_FIELDS:
            raise DataError(f"data.columns: unknown field {field!r}; choose from {', '.join(MAPPABLE_FIELDS)}")
        if column is None or column == field:
            continue
        if not isinstance(column, str) or not column:
            raise DataError(f"data.columns.{field}: expected a column name, got {column!r}")
        out[field] = column
    return out


def resolve_files(source: str) -> list[Path]:
    """The data files of `source`: a file, a directory (its data files, sorted, or one split's
    files in a dataset layout; see the module docstring) or a glob (sorted). Numbered shards
    (`-0000K-of-0000N`) of a directory or a glob must all be there (`check_shards`); a file
    named alone is read as it is."""
    path = Path(source)
    if path.is_file():
        return _checked_extensions([_regular(path)])
    files = _directory_files(path, source) if path.is_dir() else _glob_files(source)
    check_shards(files, source)
    return files


def _directory_files(path: Path, source: str) -> list[Path]:
    split = source.split if isinstance(source, Source) else None
    path = _hub_cache_snapshot(path)
    if (path / "state.json").is_file():  # a save_to_disk Dataset: one split already
        return _save_to_disk_files(path)
    by_split = split_files(path)
    if by_split is None:
        files = _data_files_in(path)
        if not files:
            raise DataError(f"{source}: no {', '.join(DATA_SUFFIXES)} files in directory")
        return files
    if split is None:
        counts = ", ".join(f"{name} ({len(files)} file(s))" for name, files in by_split.items())
        raise DataError(
            f"{source}: a dataset directory with splits {counts}; one split is read at a time "
            "(data.train reads train, data.dev validation, generate.py --split, default test)"
        )
    if not by_split.get(split):
        raise DataError(f"{source}: no {split} split (it has {', '.join(by_split) or 'none'})")
    return by_split[split]


def _glob_files(source: str) -> list[Path]:
    # A match that is not a directory is a file to read: a FIFO or a symlink loop is refused, not skipped.
    files = sorted(_regular(Path(p)) for p in glob.glob(str(source), recursive=True) if not Path(p).is_dir())
    if not files:
        raise DataError(f"{source}: no such file or directory, and no file matches it as a glob")
    return _checked_extensions(files)


def _checked_extensions(files: list[Path]) -> list[Path]:
    for file in files:
        if not _is_data_file(file):
            raise DataError(
                f"{file}: unknown extension {file.suffix!r} (expected one of {', '.join(DATA_SUFFIXES)})"
            )
    return files


def _regular(path: Path) -> Path:
    """`path`, refused unless a regular file: reading a FIFO or a device would block."""
    try:
        return regular_file(path)
    except NotRegularFile as error:
        raise DataError(str(error)) from None


def _data_files_in(directory: Path) -> list[Path]:
    """The data files directly in `directory`, sorted; an entry with a data extension that is not a
    regular file (a FIFO, a symlink to nothing, a loop) is refused rather than passed over."""
    return sorted(_regular(p) for p in directory.iterdir() if _is_data_file(p) and not p.is_dir())


SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<index>\d+)-of-(?P<count>\d+)(?P<tail>.*)$")


def check_shards(files: list[Path], source: str) -> None:
    """Numbered shards (`train-00000-of-00004.parquet`, ...: the hub's names) are a split only when
    all are there: the shards of a name agree on their count, and each index from 0 to count - 1
    appears exactly once; the error names the missing files. A split read in part would train on
    part of it, or score WER on part of a test set, without a word."""
    groups: dict[tuple[Path, str], list[tuple[Path, re.Match]]] = {}
    for file in files:
        match = SHARD_NAME.match(file.name)
        if match:
            groups.setdefault((file.parent, match["stem"]), []).append((file, match))
    for (folder, stem), shards in groups.items():
        problem = _shard_problem(folder, stem, shards)
        if problem:
            raise DataError(f"{source}: {problem}")


def _shard_problem(folder: Path, stem: str, shards: list[tuple[Path, re.Match]]) -> str | None:
    """What is wrong with the shards `<stem>-K-of-N` of `folder`, or None when they are all there."""
    counts = sorted({int(m["count"]) for _, m in shards})
    if len(counts) > 1:
        named = ", ".join(f"{f.name} (of {int(m['count'])})" for f, m in shards)
        return f"the shards {folder / stem}-* disagree on how many there are: {named}"
    seen: dict[int, Path] = {}
    for file, match in shards:
        index = int(match["index"])
        if index in seen:
            return f"shard {index} of {folder / stem}-* twice: {seen[index].name}, {file.name}"
        seen[index] = file
    count, first = counts[0], shards[0][1]
    if max(seen) >= count:
        return f"{seen[max(seen)].name} numbers a shard past the count"
    missing = [k for k in range(count) if k not in seen]
    if not missing:
        return None
    tails = {m["tail"] for _, m in shards}  # ".parquet", or "-<hash>.parquet" in older hub datasets
    tail = tails.pop() if len(tails) == 1 and first["tail"].startswith(".") else "*"
    names = [f"{stem}-{k:0{len(first['index'])}d}-of-{first['count']}{tail}" for k in missing[:5]]
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return (f"incomplete split: {len(seen)} of the {count} shards {stem}-*-of-{first['count']}: missing "
            f"{', '.join(names)}{more} in {folder} (a split is read whole: fetch the missing shards)")


def split_files(directory: Path) -> dict[str, list[Path]] | None:
    """{split: files} when `directory` is a dataset laid out by split, else None (a plain directory
    of shards). A `save_to_disk` `Dataset` directory counts as a plain one, its files as `state.json` lists."""
    directory = _hub_cache_snapshot(directory)
    if (directory / "dataset_dict.json").is_file():
        return _save_to_disk_splits(directory)
    if (directory / "state.json").is_file():
        return None
    data_dir = directory / "data"
    files = _data_files_in(directory)
    if not files and data_dir.is_dir():
        directory, files = data_dir, _data_files_in(data_dir)
    named = {p: SPLIT_NAME.match(p.name) for p in files}
    if not any(named.values()):
        return None
    unnamed = [p.name for p, match in named.items() if not match]
    if unnamed:
        raise DataError(
            f"{directory}: files named by split sit beside files of no split ({', '.join(unnamed[:5])}); "
            "name the files to read instead"
        )
    out: dict[str, list[Path]] = {}
    for p, match in named.items():
        out.setdefault(canonical_split(match.group(1)), []).append(p)
    return out


def _hub_cache_snapshot(directory: Path) -> Path:
    """A hub cache entry (`datasets--owner--name`) stands for the snapshot its `refs/main` names."""
    ref = directory / "refs" / "main"
    if directory.name.startswith("datasets--") and ref.is_file() and (directory / "snapshots").is_dir():
        try:
            revision = ref.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"{ref}: not a readable revision ({error})") from None
        snapshot = directory / "snapshots" / revision
        if not revision or Path(revision).name != revision or not snapshot.is_dir():
            raise DataError(f"{ref}: names snapshot {snapshot.name}, which is not in {directory / 'snapshots'}")
        return snapshot
    return directory


def _save_to_disk_splits(directory: Path) -> dict[str, list[Path]]:
    where = directory / "dataset_dict.json"
    splits = _json_file(where).get("splits")
    if not isinstance(splits, list) or not all(isinstance(name, str) and name for name in splits):
        raise DataError(f"{where}: expected a JSON object with a 'splits' list of names")
    out = {}
    for name in splits:
        files = _save_to_disk_files(directory / name)
        try:
            out.setdefault(canonical_split(name), []).extend(files)
        except DataError:
            out[name] = files  # a split of another name: readable by naming its directory
    return out


def _save_to_disk_files(directory: Path) -> list[Path]:
    """The `.arrow` files a `save_to_disk` `Dataset` directory's `state.json` lists, in its order."""
    where = directory / "state.json"
    entries = _json_file(where).get("_data_files")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("filename"), str)
                                                for e in entries):
        raise DataError(f"{where}: expected a JSON object whose '_data_files' list names the .arrow files")
    files = [directory / entry["filename"] for entry in entries]
    for file in files:
        try:
            regular_file(file)
        except NotRegularFile as error:
            raise DataError(f"{where}: lists {file.name}, which cannot be read: {error}") from None
    return files


def _json_file(path: Path) -> dict:
    """A JSON object file that `datasets` writes beside its data."""
    try:
        return read_json(path)
    except JsonFileError as error:
        raise DataError(str(error)) from None


def dataset_name(source: str) -> str:
    """The dataset's name for output paths: the hub repository's name for a hub cache entry, else the
    directory holding the data, passing over `data/`, split and snapshot directories."""
    parts = Path(os.path.abspath(source)).parts  # no symlink resolution: hub cache files link into blobs/
    for part in reversed(parts):
        if part.startswith("datasets--") and part.count("--") >= 2:
            return part.split("--", 2)[2]
    path = Path(*parts)
    if not path.is_dir():
        path = path.parent
    while path.name and (path.name.lower() == "data" or SPLIT_NAME.fullmatch(path.name)):
        path = path.parent
    return path.name or "dataset"


def iter_rows(
    source: str,
    *,
    n_dsus: int | None = None,
    fields: Sequence[str] = SCHEMA_FIELDS,
    frame_rate: float | None = None,
    unique_ids: bool = True,
) -> Iterator[dict]:
    """Yield the validated rows of `source`, lazily, in file order then row order.

    Each row holds `id` (given, as `id` or `ID`, or derived as "<file stem>:<row index>"), the requested `fields`
    (`speech_tokens` as a numpy int64 array) and any non-schema fields of the source unchanged.
    DSU ids must lie in [0, n_dsus), or in [0, MAX_DSUS) when `n_dsus` is None.
    With `frame_rate` (DSU frames per second) and word times, no word may end more than one frame
    past the row's speech tokens: its DSU span would be cut short.
    Ids must be unique across the whole source; every id is kept in memory to check that, unless
    `unique_ids` is False (`data.store` checks them itself, in less memory).
    A `Source` picks the split of a dataset directory and renames columns (`Source.columns`).
    """
    unknown = [f for f in fields if f not in SCHEMA_FIELDS]
    if unknown:
        raise ValueError(f"unknown fields {unknown}; choose from {SCHEMA_FIELDS}")
    if n_dsus is not None and not 0 < n_dsus <= MAX_DSUS:
        raise ValueError(f"n_dsus must be in [1, {MAX_DSUS}], got {n_dsus}")
    dsu_limit = MAX_DSUS if n_dsus is None else n_dsus
    fields = tuple(fields)
    first_seen: dict[str, str] = {}
    columns = source.columns if isinstance(source, Source) else {}
    for path in resolve_files(source):
        if _is_parquet(path) or _is_arrow(path):
            raw_rows = _iter_table(path, fields, columns)
        else:
            raw_rows = _renamed(_iter_jsonl(path), fields, columns)
        for index, (where, row) in enumerate(raw_rows):
            row = _checked_row(row, where, fields, dsu_limit, frame_rate)
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
        elif _is_arrow(path):
            total += sum(batch.num_rows for batch in _arrow_batches(path))
        else:
            with _open_jsonl(path) as f:
                total += sum(1 for line in f if line.strip())
    return total


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in PARQUET_SUFFIXES


def _is_data_file(path: Path) -> bool:
    return path.suffix.lower() in DATA_SUFFIXES and path.name not in METADATA_FILES


def _is_arrow(path: Path) -> bool:
    return path.suffix.lower() in ARROW_SUFFIXES


def _open_jsonl(path: Path):
    try:
        return open(_regular(path), "rb")
    except OSError as e:  # no permission, or gone since it was listed
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with _open_jsonl(path) as f:
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
            except RecursionError:
                raise DataError(f"{where}: malformed JSON: nested too deeply") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None


def _arrow_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """The record batches of an Arrow IPC stream (what `datasets` writes) or IPC file, memory-mapped."""
    try:
        mapped = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_stream(mapped)
        except pa.ArrowInvalid:
            mapped.seek(0)
            reader = pa.ipc.open_file(mapped)
            yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
            return
        yield from reader
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Arrow file: {e}") from None


def _column_plan(names: Sequence[str], fields: tuple[str, ...], columns: dict[str, str]) -> dict[str, str]:
    """{column to read: name it takes in the row}: mapped columns take their field's name, `ID`
    becomes `id` when there is no `id`, and unrequested schema fields are left unread."""
    mapping = dict(columns)
    if "id" not in mapping and "id" not in names and "ID" in names:
        mapping["id"] = "ID"
    field_of = {column: field for field, column in mapping.items()}
    plan = {}
    for name in names:
        if name in field_of:
            plan[name] = field_of[name]
        elif name not in mapping:  # a column bearing a field's name that is mapped elsewhere is dropped
            plan[name] = name
    return {c: f for c, f in plan.items() if f not in SCHEMA_FIELDS or f in fields}


def _check_mapped_columns(where: str, names, fields: tuple[str, ...], columns: dict[str, str]) -> None:
    for field, column in columns.items():
        if (field == "id" or field in fields) and column not in names:
            raise DataError(f"{where}: no column {column!r} (data.columns maps '{field}' to it)")


def _renamed(rows: Iterator[tuple[str, dict]], fields, columns: dict[str, str]) -> Iterator[tuple[str, dict]]:
    for where, row in rows:
        if columns or ("ID" in row and "id" not in row):
            _check_mapped_columns(where, row, fields, columns)
            row = {name: row[column] for column, name in _column_plan(list(row), fields, columns).items()}
        yield where, row


def _iter_table(path: Path, fields: tuple[str, ...], columns: dict[str, str]) -> Iterator[tuple[str, dict]]:
    """Rows of a Parquet or Arrow file, read a record batch at a time."""
    if _is_parquet(path):
        parquet = _open_parquet(path)
        names = parquet.schema_arrow.names
    else:
        names = next(_arrow_batches(path), pa.record_batch([])).schema.names
    _check_mapped_columns(str(path), names, fields, columns)
    # Unrequested schema columns (often the heavy DSU lists) are never read; a requested column
    # that the file lacks shows up as a missing field in row 0.
    plan = _column_plan(names, fields, columns)
    if _is_parquet(path):
        batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=list(plan))
    else:
        batches = (batch.select(list(plan)) for batch in _arrow_batches(path))
    row_number = 0
    for batch in batches:
        batch = batch.rename_columns([plan[name] for name in batch.schema.names])
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


def _checked_row(row: dict, where: str, fields: tuple[str, ...], dsu_limit: int, frame_rate: float | None) -> dict:
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
        if frame_rate and "aligned_token_end_time" in fields:
            _check_word_ends(row, checked["speech_tokens"].size, frame_rate, where)
    return checked


def _check_word_ends(row: dict, n_frames: int, frame_rate: float, where: str) -> None:
    """A word's DSU span ends at frame ceil(end * frame_rate); more than one frame past the speech
    tokens means the times and the DSUs do not belong together (or the frame rate is wrong)."""
    words = row.get("tokenized") or []
    for word, end in enumerate(row["aligned_token_end_time"]):
        frame = math.ceil(end * frame_rate) if _finite(end * frame_rate) else math.inf
        if frame > n_frames + 1:
            name = f" ({words[word]!r})" if word < len(words) else ""
            problem = (f"word {word}{name} ends at {end} s, frame {frame}, "
                       f"but speech_tokens has {n_frames} frames ({n_frames / frame_rate:g} s at {frame_rate:g} "
                       "frames/s; check data.cpt.sampling_rate and downsampling_ratio)")
            raise _field_error(where, "aligned_token_end_time", problem)


def _check_times(times, where: str, field: str) -> None:
    if not isinstance(times, list):
        raise _field_error(where, field, f"expected a list of numbers, got {type(times).__name__}")
    for word, t in enumerate(times):
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise _field_error(where, field, f"word {word}: expected a number, got {type(t).__name__}")
        if not _finite(t) or t < 0:
            raise _field_error(where, field, f"word {word}: time {t} is not a finite non-negative number")


def _finite(number) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an integer beyond any float
        return False


def _dsu_array(value, where: str, dsu_limit: int) -> np.ndarray:
    """`value` (a list, or a numpy view from Parquet) as int64 DSU ids, checked in bulk with numpy."""
    if isinstance(value, list):
        if not value:
            return np.empty(0, dtype=np.int64)
        if bool in set(map(type, value)):  # numpy would take true as unit 1
            position = next(i for i, v in enumerate(value) if isinstance(v, bool))
            problem = f"position {position}: {json.dumps(value[position])} is a boolean, not a DSU id (an integer)"
            raise _field_error(where, "speech_tokens", problem)
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

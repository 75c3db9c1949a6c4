"""A data source converted once into flat arrays on disk, so that training reads any row by index
while its memory stays independent of the corpus size.

    store = open_store(source, cache_dir, n_dsus=1024, fields=SCHEMA_FIELDS)
    row = store[i]   # the dict `data.dataset.iter_rows` yields for that row (schema fields and id)

The source is read once, streaming and validated by `iter_rows` (a bad row fails with its file,
line or row and field named, and nothing is kept), into `cache_dir/<key>`: the key hashes the
source files' paths, sizes and modification times, the fields and n_dsus, so a changed source is
read again and an unchanged one is reused by later runs (and resumes). The directory is written
under a temporary name and renamed when complete: a failed conversion removes its partial copy, a
killed one leaves it unused until the next conversion of that source on that machine removes it.

Layout: three raw little-endian files, `index.i64` and `meta.json`:
    dsus.u16    every row's speech_tokens, concatenated (DSU ids fit 16 bits: n_dsus <= 65534)
    times.f64   every row's word start times then its word end times (kept as float64: the DSU
                spans of interleaved CPT must floor and ceil exactly the reference's values)
    text.u8     every row's id, transcript and `tokenized` (a JSON list), as UTF-8
    index.i64   (rows + 1, 5): where row r starts in dsus, times, and where its id, transcript
                and words start in text; row r ends where row r + 1 starts
A row costs four positioned reads (pread), so a process holds only the rows it is working on and
the operating system's page cache does the rest. MLS English (10.8 M rows, 44.5 k hours at 50
frames/s) takes about 31 GB on disk. Fields that were not asked for are left empty.
"""

import array
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.dataset import SCHEMA_FIELDS, TIME_FIELDS, DataError, count_rows, iter_rows, resolve_files
from files import atomic_write, read_json, regular_files_only

FORMAT_VERSION = 2
INDEX_WIDTH = 5  # dsus, times, id, transcript, words
FLUSH_ROWS = 4096  # rows buffered before the files are written: a few MB


class RowStore:
    """The rows of a converted source, read from its files on demand."""

    def __init__(self, directory: Path):
        self.directory = directory
        try:  # a store is this code's output, but a FIFO or a damaged file in it must not block or crash a run
            regular_files_only(directory)
            self.meta = read_json(directory / "meta.json")
            self.fields = tuple(self.meta["fields"])
            self.n_rows = int(self.meta["n_rows"])
            # Unbuffered files read with os.pread: no shared file position, so forked readers are safe.
            self._files = {name: open(directory / name, "rb", buffering=0)
                           for name in ("index.i64", "dsus.u16", "times.f64", "text.u8")}
        except (OSError, ValueError, KeyError, TypeError) as error:  # NotRegularFile and bad JSON are ValueErrors
            raise DataError(f"{directory}: not a readable data store ({error}); remove it to convert the "
                            "source again") from None

    def __len__(self) -> int:
        return self.n_rows

    def _read(self, name: str, start: int, stop: int) -> bytes:
        return os.pread(self._files[name].fileno(), stop - start, start) if stop > start else b""

    def __getitem__(self, row: int) -> dict:
        if not 0 <= row < self.n_rows:
            raise IndexError(f"row {row} of a store of {self.n_rows}")
        row_bytes = 8 * INDEX_WIDTH
        dsu, time_, id_, transcript, words, next_dsu, next_time, next_id, _, _ = np.frombuffer(
            self._read("index.i64", row * row_bytes, (row + 2) * row_bytes), np.int64).tolist()
        text = self._read("text.u8", id_, next_id)
        out = {"id": text[: transcript - id_].decode()}
        if "speech_tokens" in self.fields:
            out["speech_tokens"] = np.frombuffer(self._read("dsus.u16", 2 * dsu, 2 * next_dsu), np.uint16).astype(np.int64)
        if "transcript" in self.fields:
            out["transcript"] = text[transcript - id_ : words - id_].decode()
        if "tokenized" in self.fields:
            out["tokenized"] = json.loads(text[words - id_ :])
        if "aligned_token_start_time" in self.fields:
            times = np.frombuffer(self._read("times.f64", 8 * time_, 8 * next_time), np.float64).tolist()
            half = len(times) // 2
            out["aligned_token_start_time"], out["aligned_token_end_time"] = times[:half], times[half:]
        return out


def store_key(source: str, fields, n_dsus: int, frame_rate: float | None = None) -> str:
    """What a conversion depends on: the files (path, size, modification time), fields, n_dsus and
    the frame rate that word times are checked against."""
    files = [Path(f).resolve() for f in resolve_files(source)]
    described = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    renamed = getattr(source, "columns", None)  # a data.dataset.Source's column mapping changes the rows
    extra = ([frame_rate] if frame_rate else []) + ([renamed] if renamed else [])
    payload = json.dumps([FORMAT_VERSION, described, sorted(fields), n_dsus] + extra)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _store_fields(fields) -> tuple[str, ...]:
    if set(TIME_FIELDS) & set(fields):  # word times are stored together
        fields = (*fields, *TIME_FIELDS)
    return tuple(f for f in SCHEMA_FIELDS if f in fields)


def store_path(source: str, cache_dir: str | os.PathLike, *, n_dsus: int, fields=SCHEMA_FIELDS,
               frame_rate: float | None = None) -> Path:
    """The directory `open_store` converts `source` into, with the same arguments."""
    fields = _store_fields(fields)
    return Path(cache_dir) / store_key(source, fields, n_dsus, frame_rate)


def open_store(source: str, cache_dir: str | os.PathLike, *, n_dsus: int, fields=SCHEMA_FIELDS,
               frame_rate: float | None = None, build: bool = True, progress: bool = True) -> RowStore:
    """The store of `source` in `cache_dir`, converted first if needed (when `build`; otherwise
    waits for another process to finish converting it). With `frame_rate` (DSU frames per
    second), a word that ends more than a frame past the speech tokens is a data error."""
    fields = _store_fields(fields)
    directory = store_path(source, cache_dir, n_dsus=n_dsus, fields=fields, frame_rate=frame_rate)
    if not (directory / "meta.json").exists():
        if build:
            convert(source, directory, n_dsus=n_dsus, fields=fields, frame_rate=frame_rate, progress=progress)
        else:
            while not (directory / "meta.json").exists():
                time.sleep(1)
    return RowStore(directory)


class _Appender:
    """A file written in chunks of values."""

    def __init__(self, path: Path, dtype):
        self.file, self.dtype = open(path, "wb"), dtype
        self.pending, self.length = [], 0

    def append(self, values) -> None:
        self.pending.append(values)
        self.length += len(values)

    def flush(self) -> None:
        if self.pending:
            self.file.write(np.concatenate(self.pending).astype(self.dtype, copy=False).tobytes())
        self.pending = []

    def close(self) -> None:
        self.flush()
        self.file.close()


def _utf8(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8)


def convert(source: str, directory: Path, *, n_dsus: int, fields, frame_rate: float | None = None,
            progress: bool = True) -> None:
    """Reads `source` once (validated) into a store at `directory`, atomically."""
    created = [p for p in (directory.parent, *directory.parent.parents) if not p.exists()]
    directory.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    _remove_abandoned(directory, host)
    partial = directory.with_name(f".{directory.name}.{host}.{os.getpid()}.partial")
    try:
        with atomic_write(directory, directory=True, replace=False, temporary=partial):
            _write_store(partial, source, n_dsus=n_dsus, fields=fields, frame_rate=frame_rate, progress=progress)
    except OSError:  # another process finished the same conversion first: keep its copy
        if not (directory / "meta.json").exists():
            raise
    except BaseException:  # bad data, or interrupted: leave nothing behind, not even new parent directories
        for parent in created:
            try:
                parent.rmdir()
            except OSError:
                break
        raise


def _write_store(partial: Path, source: str, *, n_dsus: int, fields, frame_rate: float | None, progress: bool) -> None:
    dsus, times = _Appender(partial / "dsus.u16", np.uint16), _Appender(partial / "times.f64", np.float64)
    text, index = _Appender(partial / "text.u8", np.uint8), _Appender(partial / "index.i64", np.int64)
    files = (dsus, times, text, index)
    id_hashes = array.array("Q")  # 8 bytes per row
    total = count_rows(source) if progress else None
    rows = iter_rows(source, n_dsus=n_dsus, fields=fields, frame_rate=frame_rate, unique_ids=False)
    bar = tqdm(rows, total=total, desc=f"caching {source}", unit=" rows", disable=not progress,
               dynamic_ncols=True, mininterval=1.0)
    n_rows = 0
    for row in bar:
        starts = [dsus.length, times.length, text.length]
        row_id = row["id"].encode()
        id_hashes.append(int.from_bytes(hashlib.blake2b(row_id, digest_size=8).digest(), "little"))
        text.append(np.frombuffer(row_id, np.uint8))
        starts.append(text.length)
        text.append(_utf8(row.get("transcript", "")))
        starts.append(text.length)
        if "tokenized" in row:
            text.append(_utf8(json.dumps(row["tokenized"], ensure_ascii=False)))
        if "speech_tokens" in row:
            dsus.append(row["speech_tokens"].astype(np.uint16))
        if "aligned_token_start_time" in row:
            times.append(np.asarray(row["aligned_token_start_time"] + row["aligned_token_end_time"], np.float64))
        index.append(np.array(starts, np.int64))
        n_rows += 1
        if n_rows % FLUSH_ROWS == 0:
            for file in files:
                file.flush()
    index.append(np.array([dsus.length, times.length] + [text.length] * 3, np.int64))  # where a next row would start
    bar.close()
    for file in files:
        file.close()
    _check_unique_ids(np.frombuffer(id_hashes, dtype=np.uint64), source, n_dsus, fields)
    meta = {"version": FORMAT_VERSION, "source": str(source), "fields": list(fields), "n_dsus": n_dsus,
            "n_rows": n_rows}
    (partial / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def _remove_abandoned(directory: Path, host: str) -> None:
    """Partial copies left by killed conversions of this store on this machine."""
    for partial in directory.parent.glob(f".{directory.name}.{host}.*.partial"):
        pid = int(partial.name.split(".")[-2])
        try:
            os.kill(pid, 0)  # alive: a conversion in progress, leave it
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def _check_unique_ids(hashes: np.ndarray, source: str, n_dsus: int, fields) -> None:
    """Ids are compared by 64-bit hashes, so memory holds 8 bytes per row rather than every id; on
    a repeated hash the source is read again with exact id checks, whose error names both places
    (or which pass, when two different ids merely share a hash)."""
    ordered = np.sort(hashes)
    if len(ordered) > 1 and (ordered[1:] == ordered[:-1]).any():
        for _ in iter_rows(source, n_dsus=n_dsus, fields=fields):
            pass

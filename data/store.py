"""A data source converted once into flat arrays on disk and memory-mapped, so that training reads
any row by index while its memory stays independent of the corpus size.

    store = open_store(source, cache_dir, n_dsus=1024, fields=SCHEMA_FIELDS)
    row = store[i]   # the dict `data.dataset.iter_rows` yields for that row (schema fields and id)

The source is read once, streaming and validated by `iter_rows` (a bad row fails with its file,
line or row and field named, and nothing is kept), into `cache_dir/<key>`: the key hashes the
source files' paths, sizes and modification times, the fields and n_dsus, so a changed source is
read again and an unchanged one is reused by later runs (and resumes). The directory is written
under a temporary name and renamed when complete: a killed conversion leaves nothing half-written.

Layout, one raw little-endian file per array (lengths in `meta.json`):
    dsus.u16          every row's speech_tokens, concatenated (DSU ids fit 16 bits: n_dsus <= 65534)
    starts.f64 ends.f64   every row's word times, concatenated (kept as float64: the DSU spans of
                      interleaved CPT must floor and ceil exactly the reference's values)
    words.u8 transcript.u8 id.u8   UTF-8 text: each row's `tokenized` as a JSON list, its transcript, its id
    <column>.offsets.i64  row r of a column is [offsets[r], offsets[r+1])
MLS English (10.8 M rows, 44.5 k hours at 50 frames/s) takes about 16 GB of DSUs on disk and its
row offsets (a few hundred MB) are the only arrays that are ever read whole.
"""

import array
import hashlib
import json
import mmap
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.dataset import SCHEMA_FIELDS, count_rows, iter_rows, resolve_files

FORMAT_VERSION = 1
# column -> (file suffix, dtype, the schema field it holds)
COLUMNS = {
    "dsus": ("u16", np.uint16, "speech_tokens"),
    "starts": ("f64", np.float64, "aligned_token_start_time"),
    "ends": ("f64", np.float64, "aligned_token_end_time"),
    "words": ("u8", np.uint8, "tokenized"),
    "transcript": ("u8", np.uint8, "transcript"),
    "id": ("u8", np.uint8, None),
}
FLUSH_BYTES = 16 << 20  # buffered bytes per column before a write


class RowStore:
    """The rows of a converted source, read from memory-mapped files."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.meta = json.loads((directory / "meta.json").read_text())
        self.fields = tuple(self.meta["fields"])
        self.n_rows = self.meta["n_rows"]
        self._data, self._offsets = {}, {}
        for column in self.meta["columns"]:
            suffix, dtype, _ = COLUMNS[column]
            self._data[column] = _map(directory / f"{column}.{suffix}", dtype)
            self._offsets[column] = _map(directory / f"{column}.offsets.i64", np.int64)

    def __len__(self) -> int:
        return self.n_rows

    def _slice(self, column: str, row: int) -> np.ndarray:
        offsets = self._offsets[column]
        return self._data[column][offsets[row] : offsets[row + 1]]

    def _text(self, column: str, row: int) -> str:
        return self._slice(column, row).tobytes().decode()

    def __getitem__(self, row: int) -> dict:
        if not 0 <= row < self.n_rows:
            raise IndexError(f"row {row} of a store of {self.n_rows}")
        out = {"id": self._text("id", row)}
        if "speech_tokens" in self.fields:
            out["speech_tokens"] = self._slice("dsus", row).astype(np.int64)
        if "transcript" in self.fields:
            out["transcript"] = self._text("transcript", row)
        if "tokenized" in self.fields:
            out["tokenized"] = json.loads(self._slice("words", row).tobytes())
        if "aligned_token_start_time" in self.fields:
            out["aligned_token_start_time"] = self._slice("starts", row).tolist()
        if "aligned_token_end_time" in self.fields:
            out["aligned_token_end_time"] = self._slice("ends", row).tolist()
        return out


def _map(path: Path, dtype) -> np.ndarray:
    # np.memmap refuses empty files; an empty column needs no mapping.
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    array = np.memmap(path, dtype=dtype, mode="r")
    if hasattr(mmap, "MADV_RANDOM"):  # rows are read in shuffled order: read-ahead would only waste I/O
        array._mmap.madvise(mmap.MADV_RANDOM)
    return array


def store_key(source: str, fields, n_dsus: int) -> str:
    """What a conversion depends on: the files (path, size, modification time), fields, n_dsus."""
    files = [Path(f).resolve() for f in resolve_files(source)]
    described = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    payload = json.dumps([FORMAT_VERSION, described, sorted(fields), n_dsus])
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def open_store(source: str, cache_dir: str | os.PathLike, *, n_dsus: int, fields=SCHEMA_FIELDS,
               build: bool = True, progress: bool = True) -> RowStore:
    """The store of `source` in `cache_dir`, converted first if needed (when `build`; otherwise
    waits for another process to finish converting it)."""
    fields = tuple(f for f in SCHEMA_FIELDS if f in fields)
    directory = Path(cache_dir) / store_key(source, fields, n_dsus)
    if not (directory / "meta.json").exists():
        if build:
            convert(source, directory, n_dsus=n_dsus, fields=fields, progress=progress)
        else:
            while not (directory / "meta.json").exists():
                time.sleep(1)
    return RowStore(directory)


class _Column:
    """One column being written: values appended in chunks, plus row offsets."""

    def __init__(self, directory: Path, name: str):
        suffix, self.dtype, _ = COLUMNS[name]
        self.values = open(directory / f"{name}.{suffix}", "wb")
        self.offsets = open(directory / f"{name}.offsets.i64", "wb")
        self.pending, self.pending_ends, self.pending_bytes, self.length = [], [], 0, 0
        self.offsets.write(np.zeros(1, np.int64).tobytes())

    def append(self, values: np.ndarray) -> None:
        self.pending.append(values)
        self.length += len(values)
        self.pending_ends.append(self.length)
        self.pending_bytes += values.nbytes
        if self.pending_bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.values.write(np.concatenate(self.pending).astype(self.dtype, copy=False).tobytes())
            self.offsets.write(np.asarray(self.pending_ends, dtype=np.int64).tobytes())
        self.pending, self.pending_ends, self.pending_bytes = [], [], 0

    def close(self) -> None:
        self.flush()
        self.values.close()
        self.offsets.close()


def _utf8(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8)


def convert(source: str, directory: Path, *, n_dsus: int, fields, progress: bool = True) -> None:
    """Reads `source` once (validated) into a store at `directory`, atomically."""
    columns = ["id"] + [name for name, (_, _, field) in COLUMNS.items() if field in fields]
    created = [p for p in (directory.parent, *directory.parent.parents) if not p.exists()]
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial = directory.with_name(f".{directory.name}.{socket.gethostname()}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        writers = {name: _Column(partial, name) for name in columns}
        id_hashes = array.array("Q")  # 8 bytes per row
        total = count_rows(source) if progress else None
        rows = iter_rows(source, n_dsus=n_dsus, fields=fields, unique_ids=False)
        bar = tqdm(rows, total=total, desc=f"caching {source}", unit=" rows", disable=not progress,
                   dynamic_ncols=True, mininterval=1.0)
        n_rows = 0
        for row in bar:
            for name in columns:
                field = COLUMNS[name][2]
                if name == "id":
                    value = _utf8(row["id"])
                    id_hashes.append(int.from_bytes(hashlib.blake2b(value.tobytes(), digest_size=8).digest(), "little"))
                elif name == "words":
                    value = _utf8(json.dumps(row[field], ensure_ascii=False))
                elif name == "transcript":
                    value = _utf8(row[field])
                else:
                    value = np.asarray(row[field], dtype=COLUMNS[name][1])
                writers[name].append(value)
            n_rows += 1
        bar.close()
        for writer in writers.values():
            writer.close()
        _check_unique_ids(np.frombuffer(id_hashes, dtype=np.uint64), source, n_dsus, fields)
        meta = {"version": FORMAT_VERSION, "source": str(source), "fields": list(fields), "n_dsus": n_dsus,
                "n_rows": n_rows, "columns": columns}
        (partial / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        try:
            partial.rename(directory)
        except OSError:  # another process finished the same conversion first: keep its copy
            if not (directory / "meta.json").exists():
                raise
            shutil.rmtree(partial)
    except BaseException:  # bad data, or interrupted: leave nothing behind, not even new parent directories
        shutil.rmtree(partial, ignore_errors=True)
        for parent in created:
            try:
                parent.rmdir()
            except OSError:
                break
        raise


def _check_unique_ids(hashes: np.ndarray, source: str, n_dsus: int, fields) -> None:
    """Ids are compared by 64-bit hashes, so memory holds 8 bytes per row rather than every id; on
    a repeated hash the source is read again with exact id checks, whose error names both places
    (or which pass, when two different ids merely share a hash)."""
    ordered = np.sort(hashes)
    if len(ordered) > 1 and (ordered[1:] == ordered[:-1]).any():
        for _ in iter_rows(source, n_dsus=n_dsus, fields=fields):
            pass

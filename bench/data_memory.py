"""Memory of the training data path against corpus size: converting a corpus into its store
(data.store) and streaming packed rows out of it (data.batches.PackedStream), each in a fresh process.

    python bench/data_memory.py [--rows 20000 200000] [--pack-rows 3000] [--workdir DIR]

For each size, writes a synthetic corpus in the reference schema as Parquet shards of 10,000 rows
shaped like Multilingual LibriSpeech English (15 s utterances: 750 DSUs at 50 frames/s from 1024
SpeechTokenizer units, 35 words with their times), then reports the peak resident memory (VmHWM)
of (1) the conversion and (2) a packed CPT stream (interleaved, rows of 2048, 128 open rows,
the real Llama 3 tokenizer extended by 1024 DSUs) drawing --pack-rows rows, plus the store's size
on disk per row. Bounded memory shows as the same peak for every corpus size; the disk figure
extrapolates to MLS English (10.8 M rows).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARD_ROWS = 10_000
N_DSUS = 1024
MLS_ENGLISH_ROWS = 10_808_037


def write_corpus(directory: Path, n_rows: int, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    vocabulary = np.array([f"word{i}" for i in range(5000)])
    directory.mkdir(parents=True)
    for first in range(0, n_rows, SHARD_ROWS):
        n = min(SHARD_ROWS, n_rows - first)
        n_words = rng.integers(25, 46, size=n)
        n_frames = rng.integers(600, 901, size=n)
        word_offsets = np.concatenate([[0], np.cumsum(n_words)])
        frame_offsets = np.concatenate([[0], np.cumsum(n_frames)])
        words = vocabulary[rng.integers(0, len(vocabulary), size=word_offsets[-1])]
        # word i of a row spans [i, i + 0.8) of its (frames / 50 s) / words slots
        slot = np.repeat(n_frames / 50 / n_words, n_words)
        index = np.arange(word_offsets[-1]) - np.repeat(word_offsets[:-1], n_words)
        starts, ends = index * slot, (index + 0.8) * slot
        table = pa.table({
            "id": [f"utt{first + i}" for i in range(n)],
            "transcript": [" ".join(words[a:b]) for a, b in zip(word_offsets[:-1], word_offsets[1:])],
            "tokenized": pa.ListArray.from_arrays(word_offsets.astype(np.int32), pa.array(words)),
            "aligned_token_start_time": pa.ListArray.from_arrays(word_offsets.astype(np.int32), pa.array(starts)),
            "aligned_token_end_time": pa.ListArray.from_arrays(word_offsets.astype(np.int32), pa.array(ends)),
            "speech_tokens": pa.ListArray.from_arrays(
                frame_offsets.astype(np.int32), pa.array(rng.integers(0, N_DSUS, size=frame_offsets[-1]))
            ),
        })
        pq.write_table(table, directory / f"shard-{first // SHARD_ROWS:05d}.parquet")


def memory() -> dict:
    """Peak resident memory (VmHWM), and the anonymous (heap) part of the resident memory now:
    mapped store pages that were read also count as resident, but the kernel can drop them."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(status[field].split()[0]) * 1024 for key, field in (("peak", "VmHWM"), ("anon", "RssAnon"))}


def child_convert(source: str, cache: str) -> dict:
    from data.dataset import SCHEMA_FIELDS
    from data.store import open_store

    start = time.perf_counter()
    store = open_store(source, cache, n_dsus=N_DSUS, fields=SCHEMA_FIELDS, progress=False)
    disk = sum(f.stat().st_size for f in store.directory.iterdir())
    return {"seconds": time.perf_counter() - start, **memory(), "disk_per_row": disk / len(store)}


def child_pack(source: str, cache: str, pack_rows: int) -> dict:
    from bench.construction import extended_llama3_tokenizer
    from config import load_config
    from data.batches import PackedStream, load_data

    cfg = load_config(None, [
        "run_dir=unused", "model.path=unused", f"data.train={source}", f"data.n_dsus={N_DSUS}", "train.max_steps=1",
        "data.modality_tokens=true",  # what train.py reads from the extended model
        f"data.cache_dir={cache}", "data.max_seq_len=2048", "data.packed=true",
    ])
    seqs, _ = load_data(cfg["data"], Path(cfg["run_dir"]), extended_llama3_tokenizer(N_DSUS))
    stream = PackedStream(seqs, cfg["data"]["max_seq_len"], cfg["seed"], cfg["data"]["shuffle"])
    start, tokens = time.perf_counter(), 0
    for _ in range(pack_rows):
        _, _, samples = stream.next_row()
        tokens += sum(len(t) for t, _ in map(seqs.builder.assemble, samples))
    return {"seconds": time.perf_counter() - start, **memory(), "tokens": tokens}


def run_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stderr)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000], help="corpus sizes")
    parser.add_argument("--pack-rows", type=int, default=3000, help="packed rows of 2048 tokens drawn per size")
    parser.add_argument("--workdir", default=None, help="where the corpora and stores go (default: a temp dir)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = child_convert(*rest) if kind == "convert" else child_pack(rest[0], rest[1], int(rest[2]))
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="data-memory-") as work:
        print(f"{'rows':>9} | {'convert: peak':>13} {'heap':>8} {'s':>6} {'disk/row':>9} | "
              f"{'pack: peak':>10} {'heap':>8} {'s':>5} | {'MLS English store':>17}")
        for n_rows in args.rows:
            source, cache = Path(work) / f"corpus-{n_rows}", Path(work) / f"cache-{n_rows}"
            write_corpus(source, n_rows)
            converted = run_child("convert", str(source), str(cache))
            packed = run_child("pack", str(source), str(cache), str(args.pack_rows))
            mls_gb = converted["disk_per_row"] * MLS_ENGLISH_ROWS / 1e9
            mib = {key: f"{value / 2**20:.0f} MiB" for key, value in
                   (("cp", converted["peak"]), ("ca", converted["anon"]), ("pp", packed["peak"]), ("pa", packed["anon"]))}
            print(f"{n_rows:9d} | {mib['cp']:>13} {mib['ca']:>8} {converted['seconds']:6.1f} "
                  f"{converted['disk_per_row'] / 1024:5.1f} KiB | {mib['pp']:>10} {mib['pa']:>8} "
                  f"{packed['seconds']:5.1f} | {mls_gb:14.1f} GB", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

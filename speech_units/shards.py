"""The shard writer: `encode` turns the utterances of the inputs into Parquet shards of rows in
the reference's schema (id, transcript, tokenized, word times, speech_tokens) with a `units.json`
that records everything the units depend on; `overrides` gives the train.py settings it implies.
Every file is written under a temporary name and renamed when complete, so `--resume` continues a
killed run, keeping its finished shards."""

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from data.tokenizer import MAX_DSUS
import files
from files import atomic_write
from speech_units import features, inputs
from speech_units.encoders import Encoder, encode_audios, make_encoder
from speech_units.inputs import InputError, Utterance, json_object

FORMAT_VERSION = 1


def _shard_name(split: str, index: int, n_shards: int) -> str:
    return f"{split}-{index:05d}-of-{n_shards:05d}.parquet"


def _inputs_hash(utterances: list[Utterance]) -> str:
    digest = hashlib.sha256()
    for u in utterances:
        digest.update(json.dumps([u.id, str(u.path), u.transcript, u.words, u.starts, u.ends]).encode() + b"\n")
    return digest.hexdigest()


def write_atomically(path: Path, write) -> None:
    """`write(tmp_path)`, then rename onto `path`: a crash never leaves a partial file under its name."""
    with atomic_write(path, temporary=path.with_name(f".{path.name}.partial")) as tmp:
        write(tmp)


def _shard_table(rows: list[dict], timed: bool):
    import pyarrow as pa

    columns = {
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "transcript": pa.array([r["transcript"] for r in rows], pa.string()),
        "tokenized": pa.array([r["tokenized"] for r in rows], pa.list_(pa.string())),
    }
    if timed:
        for name in ("aligned_token_start_time", "aligned_token_end_time"):
            columns[name] = pa.array([r[name] for r in rows], pa.list_(pa.float64()))
    offsets = np.concatenate([[0], np.cumsum([len(r["speech_tokens"]) for r in rows])]).astype(np.int32)
    values = np.concatenate([r["speech_tokens"] for r in rows]).astype(np.int64)
    columns["speech_tokens"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    return pa.table(columns)


def encode(args) -> int:
    import pyarrow.parquet as pq

    out, data_dir = Path(args.out_dir), Path(args.out_dir) / "data"
    if out.exists() and not args.resume:
        raise InputError(f"{out}: already exists; choose a new output directory, or pass --resume to continue an encoding there")
    utterances = inputs.read_inputs(args.inputs)
    if args.alignments:
        inputs.attach_alignments(utterances, args.alignments)
    untimed = [u for u in utterances if u.words is None]
    if untimed and len(untimed) < len(utterances):
        raise InputError(f"{untimed[0].where}: utterance {untimed[0].id!r} has no word times, while others have; "
                         "give all or none (rows without them suit SFT and concatenated CPT, not interleaved CPT)")
    encoder = make_encoder(args)
    inputs.check_audio(utterances, encoder)
    info = _encoding_info(args, encoder, utterances, timed=not untimed)
    meta_path = out / "units.json"
    if args.resume:
        _check_resumable(out, info)
        for stale in data_dir.glob(".*.partial"):  # what a killed run was writing
            stale.unlink()
    else:
        created = out  # the outermost directory this run creates
        while not created.parent.exists():
            created = created.parent
        data_dir.mkdir(parents=True)
        files.write_json(meta_path, {**info, "complete": False})
    started = time.time()
    try:
        written = _write_shards(args, encoder, utterances, info, data_dir)
    except (InputError, features.FeatureError):
        if not args.resume:
            shutil.rmtree(created, ignore_errors=True)  # refused input leaves nothing behind
        raise
    n_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in data_dir.glob("*.parquet"))
    files.write_json(meta_path, {**info, "complete": True})
    use = {"validation": f"evaluate on it with: data.dev={data_dir}",
           "test": f"transcribe it with: python generate.py CHECKPOINT --data {data_dir}"}.get(
        args.split, f"train with: data.train={data_dir} {' '.join(overrides(info))}")
    print(f"{written} shards written in {time.time() - started:.1f} s ({n_rows} utterances in {info['n_shards']} shards "
          f"in all)\n{use}", file=sys.stderr)
    return 0


def _encoding_info(args, encoder: Encoder, utterances: list[Utterance], timed: bool) -> dict:
    """What units.json records: everything the units depend on, and the layout of the shards."""
    return {
        "format_version": FORMAT_VERSION,
        "encoder": encoder.name,
        **encoder.settings(),
        "kmeans": str(args.kmeans) if encoder.centroids is not None else None,
        "centroids_sha256": features.centroids_sha256(encoder.centroids) if encoder.centroids is not None else None,
        "n_dsus": encoder.n_dsus,
        "sampling_rate": encoder.sampling_rate,
        "downsampling_ratio": encoder.downsampling_ratio,
        "frames_per_second": encoder.sampling_rate / encoder.downsampling_ratio,
        "word_times": timed,
        "alignments": args.alignments,
        "inputs": args.inputs,
        "inputs_sha256": _inputs_hash(utterances),
        "n_utterances": len(utterances),
        "split": args.split,
        "shard_size": args.shard_size,
        "n_shards": -(-len(utterances) // args.shard_size),
        "chunk_seconds": args.chunk_seconds,
        "chunk_context_samples": list(encoder.context) if encoder.chunked else None,
        "batch_size": encoder.batch_size,
        "device": str(getattr(encoder, "device", "cpu")),
    }


RESUME_MAY_CHANGE = ("batch_size",)  # the units do not depend on it


def _check_resumable(out: Path, info: dict) -> None:
    meta = out / "units.json"
    if not meta.exists():
        raise InputError(f"--resume {out}: no units.json there, so nothing to resume")
    before = json_object(meta)
    # Compared as JSON text, so that true is not taken for 1, nor 1 for 1.0.
    differ = [k for k in info if k not in RESUME_MAY_CHANGE
              and json.dumps(before.get(k), sort_keys=True) != json.dumps(info[k], sort_keys=True)]
    if differ:
        raise InputError(f"--resume {out}: this encoding differs from the one there in {', '.join(differ)}")


def _write_shards(args, encoder: Encoder, utterances: list[Utterance], info: dict, data_dir: Path) -> int:
    """Encode and write the shards not yet in `data_dir`; how many were written."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    n_shards, size = info["n_shards"], args.shard_size
    pending = [i for i in range(n_shards) if not (data_dir / _shard_name(args.split, i, n_shards)).exists()]
    done = sum(len(utterances[i * size : (i + 1) * size]) for i in range(n_shards) if i not in pending)
    if args.resume:
        print(f"resuming: {n_shards - len(pending)} of {n_shards} shards already written", file=sys.stderr)
    group_size = max(32, 4 * encoder.batch_size)  # utterances read and encoded together
    with tqdm(total=len(utterances), initial=done, unit="utt", desc=f"{encoder.name} -> {data_dir.parent}",
              file=sys.stderr, disable=args.quiet) as bar:
        for index in pending:
            shard = utterances[index * size : (index + 1) * size]
            rows = []
            for first in range(0, len(shard), group_size):
                group = shard[first : first + group_size]
                rows += _encoded_rows(encoder, group, args.chunk_seconds, info["word_times"])
                bar.update(len(group))
            table = _shard_table(rows, info["word_times"])
            write_atomically(data_dir / _shard_name(args.split, index, n_shards), lambda p: pq.write_table(table, p))
    return len(pending)


def _encoded_rows(encoder: Encoder, group: list[Utterance], chunk_seconds: float, timed: bool) -> list[dict]:
    audios = []
    for u in group:
        try:
            audios.append(inputs.read_audio(u.path, encoder.sampling_rate))
        except InputError as e:
            raise InputError(f"{u.where}: {e}") from None
    rows = []
    for u, audio, units in zip(group, audios, encode_audios(encoder, audios, chunk_seconds, [u.where for u in group])):
        if len(units) != encoder.frames(len(audio)):
            raise RuntimeError(f"{u.id}: {len(units)} units for {len(audio)} samples, expected "
                               f"{encoder.frames(len(audio))} (an encoder whose frame count this tool misjudges)")
        row = {"id": u.id, "transcript": u.transcript, "speech_tokens": units,
               "tokenized": u.words if timed else u.transcript.split()}
        if timed:
            row["aligned_token_start_time"], row["aligned_token_end_time"] = u.starts, u.ends
        rows.append(row)
    return rows


def overrides(info: dict, source: str = "units.json") -> list[str]:
    """The train.py settings an encoding implies; `source` names `info` in errors."""
    for key, low, high in (("n_dsus", 1, MAX_DSUS), ("sampling_rate", 1, None), ("downsampling_ratio", 1, None)):
        value = info.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
            raise InputError(f"{source}: field '{key}': expected an integer in [{low}, {high or 'inf'}], got {value!r}")
    return [f"data.n_dsus={info['n_dsus']}", f"data.cpt.sampling_rate={info['sampling_rate']}",
            f"data.cpt.downsampling_ratio={info['downsampling_ratio']}"]


def overrides_for(out_dir: str | os.PathLike) -> list[str]:
    """data.train and the settings of an encoding's output directory, for train.py's command line."""
    meta = Path(out_dir) / "units.json"
    if not meta.exists():
        raise InputError(f"{out_dir}: no units.json (not an output of 'encode')")
    info = json_object(meta)
    if not isinstance(info.get("complete"), bool):
        raise InputError(f"{meta}: field 'complete': expected true or false, got {info.get('complete')!r}")
    if not info["complete"]:
        raise InputError(f"{out_dir}: the encoding there is unfinished; complete it with 'encode ... --resume'")
    return [f"data.train={Path(out_dir) / 'data'}", *overrides(info, str(meta))]

"""From your audio to training data: encode speech into discrete speech units (DSUs) and write
Parquet shards in the reference's schema (docs/DESIGN.md, "Data").

    python -m speech_units encode --encoder hubert --model DIR --layer 22 --kmeans km.npy OUT_DIR INPUT...
    python -m speech_units encode --encoder mimi --model DIR OUT_DIR INPUT...
    python -m speech_units encode --encoder mfcc --kmeans data/mini/kmeans.npz OUT_DIR INPUT...
    python -m speech_units learn-kmeans --encoder logmel --stack 4 --k 128 OUT.npy INPUT...   # 12.5 units/s
    python -m speech_units learn-kmeans --encoder hubert --model DIR --layer 22 --k 500 OUT.npy INPUT...
    python -m speech_units convert-kmeans KMEANS.pkl OUT.npy --allow-pickle
    python -m speech_units overrides OUT_DIR      # the train.py settings the encoding implies

INPUT: wav/flac files (transcript from STEM.txt beside each), JSONL manifests (one object per line:
`path` or `audio`, `transcript`, optional `id` and word times `tokenized`, `aligned_token_start_time`,
`aligned_token_end_time`), or TSV manifests (`path<TAB>transcript` lines, or a header line naming
the columns `id`, `path`, `transcript`). Relative paths are relative to the manifest. Audio is read
with soundfile, channels averaged, and resampled to the encoder's rate with soxr.

Encoders: `hubert` (transformers HubertModel, the output of transformer layer --layer, as fairseq's
`output_layer` counts, then the nearest k-means centroid), `mimi` (transformers MimiModel, first,
semantic codebook), `speechtokenizer` (its package, RVQ-0), `mfcc` and `logmel` (speech_units.features,
the bundled corpus's units; `--stack N` joins N frames into one unit, 50 / N units per second).
Model weights are read from local directories only. An utterance's units do not depend on what it
is batched with; audio longer than --chunk-seconds is encoded in chunks, each with context on both
sides that is encoded and dropped (`chunk_pieces`).

OUT_DIR gets `units.json` (encoder, layer, centroid hash, n_dsus, sampling_rate, downsampling_ratio,
chunk context, what was encoded) and `data/SPLIT-XXXXX-of-YYYYY.parquet` (--split: a plain name),
each shard written under a temporary name and renamed when complete; `--resume` continues a killed
run, keeping its finished shards. Refused input (exit status 2) leaves no new OUT_DIR behind.
Train with `data.train=OUT_DIR/data` and the settings `overrides` prints.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from data.tokenizer import MAX_DSUS
from speech_units import features, inputs
from speech_units.encoders import as_numpy, make_encoder, torch_device, utterance_features
from speech_units.inputs import InputError, plain_name
from speech_units.shards import encode, overrides_for, write_atomically

# ---------------------------------------------------------------------------------------------
# k-means


def learn_kmeans(args) -> int:
    out = Path(args.out)
    if out.exists():
        raise InputError(f"{out}: already exists; choose a new output file")
    if out.suffix != ".npy":
        raise InputError(f"{out}: the centroids are written as a plain .npy file; name it *.npy")
    if not 1 <= args.k <= MAX_DSUS:
        raise InputError(f"--k must be in [1, {MAX_DSUS}], got {args.k}")
    if args.encoder not in ("hubert", "mfcc", "logmel"):
        raise InputError(f"the {args.encoder} encoder has its own codebook; k-means applies to hubert, mfcc and logmel")
    utterances = inputs.read_inputs(args.inputs, need_transcript=False)
    encoder = make_encoder(args, need_kmeans=False)
    inputs.check_audio(utterances, encoder)
    rng = np.random.default_rng(args.seed)
    chunks, total = [], 0
    from tqdm import tqdm

    # Features of a seeded random sample of utterances, until there are --max-frames of them.
    with tqdm(unit="utt", desc="features", file=sys.stderr, disable=args.quiet) as bar:
        for index in rng.permutation(len(utterances)):
            if total >= args.max_frames:
                break
            u = utterances[index]
            try:
                audio = inputs.read_audio(u.path, encoder.sampling_rate)
            except InputError as e:
                raise InputError(f"{u.where}: {e}") from None
            # The features encode assigns: the same pieces, context and normalisation.
            x = utterance_features(encoder, [audio], args.chunk_seconds, [u.where])[0]
            chunks.append(as_numpy(x).astype(np.float32))
            total += len(chunks[-1])
            bar.update(1)
    x = np.concatenate(chunks)
    if len(x) > args.max_frames:
        x = x[np.sort(rng.choice(len(x), size=args.max_frames, replace=False))]
    device = getattr(encoder, "device", None) or torch_device(args.device)
    started = time.time()
    centroids = features.fit_kmeans_torch(x, args.k, args.seed, max_iter=args.max_iter, device=str(device))
    write_atomically(out, lambda p: _save_npy(p, centroids))
    print(f"{out}: k={args.k} centroids of {x.shape[1]} dims fitted on {len(x)} frames in {time.time() - started:.1f} s, "
          f"sha256 {features.centroids_sha256(centroids)}", file=sys.stderr)
    return 0


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def convert_kmeans(args) -> int:
    if not args.allow_pickle:
        raise InputError(f"{args.kmeans}: converting a pickled k-means means loading it, which can run any code it "
                         "holds: pass --allow-pickle if you trust the file")
    out = Path(args.out)
    if out.exists():
        raise InputError(f"{out}: already exists; choose a new output file")
    centroids = features.load_centroids(args.kmeans, allow_pickle=True)
    write_atomically(out, lambda p: _save_npy(p, centroids))
    print(f"{out}: {centroids.shape[0]} centroids of {centroids.shape[1]} dims, sha256 {features.centroids_sha256(centroids)}",
          file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speech_units", description=__doc__.split("\n\n")[0],
                                     epilog="Read speech_units/cli.py's docstring for the inputs and outputs.")
    commands = parser.add_subparsers(dest="command", required=True)

    def encoder_options(p):
        p.add_argument("--encoder", required=True, choices=["hubert", "mimi", "speechtokenizer", "mfcc", "logmel"])
        p.add_argument("--model", help="local model directory (hubert, mimi: Hugging Face layout; speechtokenizer: "
                                       "config.json + SpeechTokenizer.pt)")
        p.add_argument("--layer", type=int, help="hubert: transformer layer whose output is clustered (1-based; 22 for large)")
        p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda[:N]")
        p.add_argument("--batch-size", type=int, default=8, help="utterances (or chunks) per forward pass")
        p.add_argument("--chunk-seconds", type=float, default=30.0,
                       help="hubert, mimi, speechtokenizer: longer audio is encoded in chunks of this length, each "
                            "with context on both sides that is encoded and dropped")
        p.add_argument("--stack", type=int, default=1, help="mfcc, logmel: consecutive 20 ms frames joined into one "
                                                            "unit before k-means (2: 25 units/s, 4: 12.5 units/s)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("inputs", nargs="+", help="wav/flac files, JSONL or TSV manifests")

    e = commands.add_parser("encode", help="audio -> DSUs -> Parquet shards in the reference schema")
    e.add_argument("out_dir", help="output directory; must not exist unless --resume")
    encoder_options(e)
    e.add_argument("--kmeans", help="centroids: .npy, .npz, or a pickled k-means with --allow-pickle")
    e.add_argument("--allow-pickle", action="store_true", help="read a pickled (scikit-learn / fairseq) k-means")
    e.add_argument("--alignments", help="word times: a CTM file, or a directory of ID.TextGrid files")
    e.add_argument("--split", default="train", help="shard name prefix (train, validation, test, ...)")
    e.add_argument("--shard-size", type=int, default=1000, help="utterances per Parquet shard")
    e.add_argument("--resume", action="store_true", help="continue an encoding in out_dir, keeping its finished shards")

    k = commands.add_parser("learn-kmeans", help="fit k-means centroids on features of your audio, saved as .npy")
    k.add_argument("out", help="output .npy; must not exist")
    encoder_options(k)
    k.add_argument("--k", type=int, required=True, help="number of centroids (DSUs)")
    k.add_argument("--max-frames", type=int, default=200_000, help="frames drawn from a seeded sample of utterances")
    k.add_argument("--max-iter", type=int, default=100)
    k.add_argument("--seed", type=int, default=0)

    c = commands.add_parser("convert-kmeans", help="a pickled scikit-learn / fairseq k-means -> plain .npy centroids")
    c.add_argument("kmeans")
    c.add_argument("out", help="output .npy; must not exist")
    c.add_argument("--allow-pickle", action="store_true", help="required: loading a pickle can run any code it holds")

    o = commands.add_parser("overrides", help="print the train.py settings an encoding implies")
    o.add_argument("out_dir")
    args = parser.parse_args(argv)
    try:
        if args.command in ("encode", "learn-kmeans"):
            if args.batch_size < 1 or not (math.isfinite(args.chunk_seconds) and args.chunk_seconds > 0):
                raise InputError("--batch-size must be >= 1 and --chunk-seconds a number > 0")
            if args.stack != 1 and args.encoder not in ("mfcc", "logmel"):
                raise InputError(f"--stack applies to the mfcc and logmel encoders, not {args.encoder}")
        if args.command == "encode":
            if args.shard_size < 1:
                raise InputError("--shard-size must be >= 1")
            plain_name(args.split, "--split")  # it names the shard files
            return encode(args)
        if args.command == "learn-kmeans":
            return learn_kmeans(args)
        if args.command == "convert-kmeans":
            return convert_kmeans(args)
        print(" ".join(overrides_for(args.out_dir)))
        return 0
    except (InputError, features.FeatureError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

"""From your audio to training data: encode speech into discrete speech units (DSUs) and write
Parquet shards in the reference's schema (DESIGN.md, "Data").

    python -m data.units encode --encoder hubert --model DIR --layer 22 --kmeans km.npy OUT_DIR INPUT...
    python -m data.units encode --encoder mimi --model DIR OUT_DIR INPUT...
    python -m data.units encode --encoder mfcc --kmeans data/mini/kmeans.npz OUT_DIR INPUT...
    python -m data.units learn-kmeans --encoder logmel --stack 4 --k 128 OUT.npy INPUT...   # 12.5 units/s
    python -m data.units learn-kmeans --encoder hubert --model DIR --layer 22 --k 500 OUT.npy INPUT...
    python -m data.units convert-kmeans KMEANS.pkl OUT.npy --allow-pickle
    python -m data.units overrides OUT_DIR      # the train.py settings the encoding implies

INPUT: wav/flac files (transcript from STEM.txt beside each), JSONL manifests (one object per line:
`path` or `audio`, `transcript`, optional `id` and word times `tokenized`, `aligned_token_start_time`,
`aligned_token_end_time`), or TSV manifests (`path<TAB>transcript` lines, or a header line naming
the columns `id`, `path`, `transcript`). Relative paths are relative to the manifest. Audio is read
with soundfile, channels averaged, and resampled to the encoder's rate with soxr.

Encoders: `hubert` (transformers HubertModel, the output of transformer layer --layer, as fairseq's
`output_layer` counts, then the nearest k-means centroid), `mimi` (transformers MimiModel, first,
semantic codebook), `speechtokenizer` (its package, RVQ-0), `mfcc` and `logmel` (data.features,
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
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data import features
from data.tokenizer import MAX_DSUS
from files import NotRegularFile, atomic_write, regular_file

AUDIO_SUFFIXES = (".wav", ".flac")
AUDIO_EXTRA = "pip install -r requirements-audio.txt"
SILENCE_WORDS = {"", "sil", "sp", "<eps>", "<sil>", "!sil"}  # alignment entries that are not words
END_SLACK_S = 0.05  # how far a word may end past its audio (aligners round to 10 ms frames)
FORMAT_VERSION = 1


class InputError(ValueError):
    """Bad input; the message names the file, line or field."""


def readable(path: str | os.PathLike) -> Path:
    """`path`, checked to be a regular file before anything opens it (a FIFO would block the read)."""
    try:
        return regular_file(path)
    except NotRegularFile as e:
        raise InputError(str(e)) from None


def plain_name(name: str, what: str) -> str:
    """`name`, checked to be usable as one file name: it becomes part of an output path, so it
    must not reach out of its directory (no separators, not `.` or `..`, not hidden)."""
    if not re.fullmatch(r"\w[\w.+-]*", name):
        raise InputError(f"{what} {name!r}: expected a plain name (letters, digits, '_', '-', '.', '+'; "
                         "no path separators, not starting with '.')")
    return name


@dataclass
class Utterance:
    id: str
    path: Path
    transcript: str
    where: str  # "manifest:line" or the audio file, for messages
    words: list[str] | None = None
    starts: list[float] | None = None
    ends: list[float] | None = None


# ---------------------------------------------------------------------------------------------
# Inputs: audio files and manifests


def read_inputs(inputs: list[str], need_transcript: bool = True) -> list[Utterance]:
    """Every utterance the inputs list, in order; ids must be unique."""
    utterances = []
    for name in inputs:
        path = Path(name)
        suffix = path.suffix.lower()
        if suffix in AUDIO_SUFFIXES:
            utterances.append(_bare_audio(path, need_transcript))
        elif suffix in (".jsonl", ".json"):
            utterances += _jsonl_manifest(path, need_transcript)
        elif suffix == ".tsv":
            utterances += read_tsv_manifest(path)
        else:
            raise InputError(f"{path}: unknown input type {suffix!r} (expected {', '.join(AUDIO_SUFFIXES)}, .jsonl or .tsv)")
    if not utterances:
        raise InputError("no utterances in the inputs")
    check_unique_ids(utterances)
    return utterances


def check_unique_ids(utterances: list[Utterance]) -> None:
    seen = {}
    for u in utterances:
        if u.id in seen:
            raise InputError(f"{u.where}: id {u.id!r} repeats {seen[u.id]}")
        seen[u.id] = u.where


def _bare_audio(path: Path, need_transcript: bool) -> Utterance:
    text_file = path.with_suffix(".txt")
    if text_file.exists():
        transcript = " ".join(" ".join(_read_lines(text_file)).split())
    elif need_transcript:
        raise InputError(f"{path}: no transcript: put it in {text_file}, or list the audio in a JSONL or TSV manifest")
    else:
        transcript = ""
    return Utterance(path.stem, path, transcript, str(path))


def _read_lines(path: Path) -> list[str]:
    try:
        return readable(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None


def _jsonl_manifest(path: Path, need_transcript: bool = True) -> list[Utterance]:
    out = []
    for lineno, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: malformed JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object")
        audio = row.get("path", row.get("audio"))
        if not isinstance(audio, str) or not audio:
            raise InputError(f"{where}: field 'path' (or 'audio'): missing or not a string")
        if not need_transcript:
            row.setdefault("transcript", "")
        if not isinstance(row.get("transcript"), str):
            raise InputError(f"{where}: field 'transcript': missing or not a string")
        audio_path = path.parent / audio
        utt_id = row.get("id", audio_path.stem)
        if not isinstance(utt_id, str) or not utt_id:
            raise InputError(f"{where}: field 'id': expected a non-empty string")
        u = Utterance(utt_id, audio_path, row["transcript"], where)
        timed = [f for f in ("tokenized", "aligned_token_start_time", "aligned_token_end_time") if f in row]
        if timed:
            if len(timed) < 3:
                raise InputError(f"{where}: word times need all of tokenized, aligned_token_start_time, "
                                 f"aligned_token_end_time; only {', '.join(timed)} given")
            u.words, u.starts, u.ends = _checked_words(row["tokenized"], row["aligned_token_start_time"],
                                                       row["aligned_token_end_time"], where)
        out.append(u)
    if not out:
        raise InputError(f"{path}: no entries")
    return out


def read_tsv_manifest(path: Path) -> list[Utterance]:
    """`path<TAB>transcript` lines, or columns named by a header line (`id`, `path`, `transcript`);
    the id defaults to the audio file's stem."""
    lines = _read_lines(path)
    columns = ["path", "transcript"]
    first = lines[0].split("\t") if lines else []
    header = bool(first) and set(first) <= {"id", "path", "transcript"} and "path" in first
    if header:
        columns = first
    out = []
    for lineno, line in enumerate(lines, 1):
        if (header and lineno == 1) or not line.strip():
            continue
        where = f"{path}:{lineno}"
        values = line.split("\t")
        if len(values) != len(columns) or not all(v.strip() for v in values):
            raise InputError(f"{where}: expected {len(columns)} non-empty tab-separated fields "
                             f"({'<TAB>'.join(columns)}), got {line!r}")
        row = dict(zip(columns, (v.strip() for v in values)))
        audio_path = path.parent / row["path"]
        out.append(Utterance(row.get("id", audio_path.stem), audio_path, row.get("transcript", ""), where))
    if not out:
        raise InputError(f"{path}: no entries")
    return out


def _checked_words(words, starts, ends, where: str) -> tuple[list[str], list[float], list[float]]:
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise InputError(f"{where}: field 'tokenized': expected a list of strings")
    for name, times in (("aligned_token_start_time", starts), ("aligned_token_end_time", ends)):
        if not isinstance(times, list) or len(times) != len(words):
            raise InputError(f"{where}: field '{name}': expected a list of {len(words)} numbers, one per word")
        for i, t in enumerate(times):
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
                raise InputError(f"{where}: field '{name}': word {i}: {t!r} is not a non-negative number")
    for i, (s, e) in enumerate(zip(starts, ends)):
        if s > e:
            raise InputError(f"{where}: word {i} ({words[i]!r}) starts at {s}, after its end {e}")
    return list(words), [float(t) for t in starts], [float(t) for t in ends]


# ---------------------------------------------------------------------------------------------
# Alignments: CTM files and Praat TextGrids


def read_ctm(path: Path) -> dict[str, tuple[list[str], list[float], list[float]]]:
    """Per utterance id, its words with start and end times, from `utt channel start duration word
    [confidence]` lines (Kaldi and NeMo CTM)."""
    entries: dict[str, list[tuple[float, float, str]]] = {}
    for lineno, line in enumerate(_read_lines(path), 1):
        fields = line.split()
        if not fields or fields[0].startswith(";;"):
            continue
        where = f"{path}:{lineno}"
        if len(fields) not in (5, 6):
            raise InputError(f"{where}: expected 'utterance channel start duration word [confidence]', got {line!r}")
        try:
            start, duration = float(fields[2]), float(fields[3])
        except ValueError:
            raise InputError(f"{where}: start and duration must be numbers, got {fields[2]!r} {fields[3]!r}") from None
        if not (math.isfinite(start) and math.isfinite(duration)) or start < 0 or duration < 0:
            raise InputError(f"{where}: start {start} and duration {duration} must be non-negative")
        if fields[4].lower() not in SILENCE_WORDS:
            entries.setdefault(fields[0], []).append((start, start + duration, fields[4]))
    return {utt: _sorted_words(words) for utt, words in entries.items()}


def _sorted_words(entries: list[tuple[float, float, str]]) -> tuple[list[str], list[float], list[float]]:
    entries = sorted(entries)
    return [w for _, _, w in entries], [s for s, _, _ in entries], [e for _, e, _ in entries]


_TEXTGRID_TOKEN = re.compile(r'"((?:[^"]|"")*)"|(?<![\w\[])(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)(?![\w\]])|(<exists>)')


def read_textgrid(path: Path) -> tuple[list[str], list[float], list[float]]:
    """The words of a Praat TextGrid (long or short text format): the interval tier named "words"
    (Montreal Forced Aligner's), or the only interval tier; empty intervals are pauses."""
    text = "\n".join(_read_lines(path))
    # Both formats reduce to the same sequence of quoted strings and numbers once the long format's
    # labels and "[n]" indices are set aside.
    tokens = [m[1].replace('""', '"') if m.lastindex == 1 else float(m[2]) if m.lastindex == 2 else m[3]
              for m in _TEXTGRID_TOKEN.finditer(re.sub(r"\[\d*\]", "", text))]
    tiers, i = {}, 0
    try:
        if tokens[:2] != ["ooTextFile", "TextGrid"]:
            raise ValueError("it does not start with File type = \"ooTextFile\", Object class = \"TextGrid\"")
        i = 4 + (tokens[4] == "<exists>")
        n_tiers, i = int(tokens[i]), i + 1
        for _ in range(n_tiers):
            kind, name, n_items = tokens[i], tokens[i + 1], int(tokens[i + 4])
            i += 5
            width = 3 if kind == "IntervalTier" else 2
            items = [tokens[i + j * width : i + (j + 1) * width] for j in range(n_items)]
            i += n_items * width
            if kind == "IntervalTier":
                tiers[name] = items
    except (IndexError, ValueError, TypeError) as e:
        raise InputError(f"{path}: not a readable TextGrid ({e})") from None
    by_name = {name.lower(): items for name, items in tiers.items()}
    if "words" in by_name:
        items = by_name["words"]
    elif len(tiers) == 1:
        items = next(iter(tiers.values()))
    else:
        raise InputError(f"{path}: no interval tier named 'words' among {sorted(tiers)}")
    return _sorted_words([(float(s), float(e), str(w).strip()) for s, e, w in items
                          if str(w).strip().lower() not in SILENCE_WORDS])


def attach_alignments(utterances: list[Utterance], source: str) -> None:
    """Give each utterance its words and times from a CTM file or a directory of ID.TextGrid files."""
    path = Path(source)
    if path.is_dir():
        def lookup(u: Utterance):
            if Path(u.id).is_absolute() or ".." in Path(u.id).parts:  # the id names a file inside the directory
                raise InputError(f"{u.where}: id {u.id!r} would name a TextGrid outside {source}")
            grid = path / f"{u.id}.TextGrid"
            return read_textgrid(grid) if grid.exists() else None
    elif path.exists():
        ctm = read_ctm(path)
        lookup = lambda u: ctm.get(u.id)  # noqa: E731
    else:
        raise InputError(f"--alignments {source}: no such file or directory")
    for u in utterances:
        found = lookup(u)
        if found is None:
            raise InputError(f"{u.where}: utterance {u.id!r} has no alignment in {source}")
        u.words, u.starts, u.ends = _checked_words(*found, f"{source} ({u.id})")


# ---------------------------------------------------------------------------------------------
# Audio


def read_audio(path: Path, rate: int, block_seconds: float = 30.0) -> np.ndarray:
    """Mono float32 samples of a soundfile-readable file, resampled to `rate` by soxr (HQ); read
    and resampled a block at a time, so a long file never exists twice at its original rate."""
    import soundfile
    import soxr

    try:
        with soundfile.SoundFile(str(readable(path))) as f:
            source_rate = f.samplerate
            stream = soxr.ResampleStream(source_rate, rate, 1, dtype="float32") if source_rate != rate else None
            pieces = []
            for block in _finite_blocks(f, path, int(block_seconds * source_rate)):
                mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
                pieces.append(stream.resample_chunk(mono) if stream else mono.copy())
            if stream:
                pieces.append(stream.resample_chunk(np.zeros(0, np.float32), last=True))
    except (soundfile.LibsndfileError, RuntimeError, OSError) as e:
        raise InputError(f"{path}: cannot read as audio ({e})") from None
    return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)


def _finite_blocks(f, path: Path, block_frames: int):
    """The blocks of an open soundfile, refusing NaN or infinite samples (a float file may hold
    them; every encoder would turn them into constant units)."""
    done = 0
    for block in f.blocks(blocksize=block_frames, dtype="float32", always_2d=True):
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            second = (done + int(np.argmax(bad))) / f.samplerate
            raise InputError(f"{path}: holds NaN or infinite samples (the first at {second:.3f} s)")
        done += len(block)
        yield block


# ---------------------------------------------------------------------------------------------
# Encoders. Each takes a batch of mono arrays at `sampling_rate` (whole utterances, or pieces of
# long ones) and gives `frames(n)` frames for each: k-means encoders their `features`, codecs
# their DSUs (`encode`). `encode_audios`, below, cuts long audio into pieces and joins the frames.

CONTEXT_SECONDS = 10.0  # audio encoded on each side of a chunk, then dropped, for models that see their whole input


def _transformers():
    try:
        import transformers
    except ImportError:
        raise InputError(f"this encoder needs the transformers package: {AUDIO_EXTRA}") from None
    transformers.utils.logging.disable_progress_bar()  # ours is the one that counts utterances
    return transformers


def _torch_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device here")
    return torch.device(name)


@contextmanager
def _exact_float32(torch):
    """Float32 without TF32 inside, whatever the process set: TF32's 10-bit mantissa rounds
    differently for each batch shape (cuDNN uses it for convolutions by default), which on a GPU
    changed units of Mimi with their batch companions."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def assign(x, centroids: np.ndarray, device=None) -> np.ndarray:
    """Nearest centroid of each row of `x` in float64: numpy on a CPU (features.assign, which made
    the bundled corpus), torch on a GPU."""
    if device is None or device.type == "cpu":
        return features.assign(np.asarray(x, dtype=np.float64), centroids)
    import torch

    if _DEVICE_CENTROIDS.get("array") is not centroids or _DEVICE_CENTROIDS["device"] != device:
        c = torch.as_tensor(centroids, device=device, dtype=torch.float64)  # once, not once per batch
        _DEVICE_CENTROIDS.update(array=centroids, device=device, c=c, norms=(c * c).sum(1))
    c, norms = _DEVICE_CENTROIDS["c"], _DEVICE_CENTROIDS["norms"]
    x = torch.as_tensor(x, device=device).double()
    return ((x * x).sum(1, keepdim=True) - 2 * x @ c.T + norms).argmin(1).cpu().numpy()


_DEVICE_CENTROIDS: dict = {}


class Encoder:
    name = ""
    sampling_rate = 16000
    downsampling_ratio = 320
    n_dsus = 0
    batch_size = 1
    chunked = True  # long audio may be encoded in pieces
    chunk_overlap = 0  # samples a frame reaches past its hop (the receptive field minus the hop)
    context = (0, 0)  # samples encoded before and after a piece's own frames, then dropped
    centroids = None

    def frames(self, n_samples: int) -> int:
        raise NotImplementedError

    def settings(self) -> dict:
        return {}

    def prepare(self, audio: np.ndarray) -> np.ndarray:
        """What is done to a whole utterance before it is cut into pieces."""
        return audio

    def features(self, audios: list[np.ndarray]) -> list:
        raise NotImplementedError(f"the {self.name} encoder has its own codebook")

    def encode(self, audios: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError(f"the {self.name} encoder's units are k-means clusters of its features")

    def set_centroids(self, path: str, allow_pickle: bool, dim: int, settings: dict | None = None) -> None:
        if not path:
            raise InputError(f"the {self.name} encoder needs --kmeans (learn one with 'learn-kmeans')")
        self.centroids = features.load_centroids(path, allow_pickle, settings, dim)  # settings: .npz files only
        if len(self.centroids) > MAX_DSUS:
            raise InputError(f"{path}: {len(self.centroids)} centroids, more than the {MAX_DSUS} DSUs a tokenizer can hold")
        self.n_dsus = len(self.centroids)


class SpectralEncoder(Encoder):
    """MFCC or log-mel frames (data.features) and k-means: the bundled corpus's units. `stack`
    consecutive 20 ms frames join into one vector before k-means, so a unit spans `stack` frames:
    50 / stack units per second (2: 25 Hz; 4: 12.5 Hz, Mimi's rate). A trailing part-unit is dropped.
    Each utterance is computed on its own, and never in pieces (its features are normalised over it)."""

    chunked = False

    def __init__(self, kind: str, kmeans: str | None, allow_pickle: bool = False, stack: int = 1):
        if stack < 1:
            raise InputError(f"--stack must be >= 1, got {stack}")
        self.name = kind
        self.stack = stack
        self.downsampling_ratio = features.HOP_LENGTH * stack
        self.extract = features.mfcc_features if kind == "mfcc" else features.logmel_features
        self.feature_settings = features.FEATURE_SETTINGS if kind == "mfcc" else features.LOGMEL_SETTINGS
        self.dim = stack * (features.FEATURE_DIM if kind == "mfcc" else features.LOGMEL_DIM)
        if kmeans is not None:
            self.set_centroids(kmeans, allow_pickle, self.dim, self.feature_settings)

    def frames(self, n_samples: int) -> int:
        return features.frame_count(n_samples) // self.stack

    def settings(self) -> dict:
        return {"features": self.feature_settings, "stack": self.stack}

    def features(self, audios):
        out = []
        for audio in audios:
            x = self.extract(audio)
            n = len(x) // self.stack
            out.append(x[: n * self.stack].reshape(n, self.dim))
        return out


class HubertEncoder(Encoder):
    """transformers HubertModel cut after transformer layer `layer` (fairseq's output_layer, 1-based:
    no final layer norm), then k-means. Padding is masked out of the attention and its frames are
    never used, so batched utterances get their features alone (up to float rounding). Attention
    sees the whole input, so a piece of a long file is encoded with CONTEXT_SECONDS around it."""

    name = "hubert"

    def __init__(self, model_dir: str, layer: int, kmeans: str | None, device: str, batch_size: int,
                 allow_pickle: bool = False):
        transformers = _transformers()
        import torch

        self.model_dir = _model_dir(model_dir)
        self.device = _torch_device(device)
        model = transformers.HubertModel.from_pretrained(str(self.model_dir), local_files_only=True)
        n_layers = model.config.num_hidden_layers
        if not 1 <= layer <= n_layers:
            raise InputError(f"--layer {layer}: {model_dir} has transformer layers 1..{n_layers}")
        self.layer = layer
        model.encoder.layers = model.encoder.layers[:layer]  # the layers above are never needed
        self._captured = []
        model.encoder.layers[-1].register_forward_hook(
            lambda _m, _i, out: self._captured.append(out[0] if isinstance(out, tuple) else out))
        self.model = model.eval().to(self.device)
        self.torch = torch
        pre = _json_object(self.model_dir / "preprocessor_config.json", required=False)
        # HuBERT large was trained on utterance-normalised audio, base on raw audio (fairseq's
        # task.normalize); the Hugging Face preprocessor config says which.
        self.normalize = pre.get("do_normalize", model.config.feat_extract_norm == "layer")
        self.sampling_rate = pre.get("sampling_rate", 16000)
        where = self.model_dir / "preprocessor_config.json"
        if not isinstance(self.normalize, bool):
            raise InputError(f"{where}: field 'do_normalize': expected true or false, got {self.normalize!r}")
        if not _positive_int(self.sampling_rate):
            raise InputError(f"{where}: field 'sampling_rate': expected a positive integer, got {self.sampling_rate!r}")
        self.downsampling_ratio = int(np.prod(model.config.conv_stride))
        receptive = 1
        for kernel, stride in reversed(list(zip(model.config.conv_kernel, model.config.conv_stride))):
            receptive = (receptive - 1) * stride + kernel
        self.receptive_field = receptive
        self.chunk_overlap = receptive - self.downsampling_ratio
        self.context = (int(CONTEXT_SECONDS * self.sampling_rate),) * 2
        # Group norm (HuBERT base) normalises over time, padding included: batch only on layer norm.
        self.batch_size = batch_size if model.config.feat_extract_norm == "layer" else 1
        if kmeans is not None:
            self.set_centroids(kmeans, allow_pickle, model.config.hidden_size)

    def frames(self, n_samples: int) -> int:
        return 0 if n_samples < self.receptive_field else 1 + (n_samples - self.receptive_field) // self.downsampling_ratio

    def settings(self) -> dict:
        return {"model": str(self.model_dir), "model_sha256": _model_hash(self.model_dir), "layer": self.layer,
                "normalize": self.normalize}

    def prepare(self, audio):
        # Over the whole utterance, as Wav2Vec2FeatureExtractor does, so that its pieces share it.
        return (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7) if self.normalize else audio

    def features(self, audios):
        torch = self.torch
        lengths = [len(a) for a in audios]
        batch = np.zeros((len(audios), max(lengths)), np.float32)
        mask = np.zeros(batch.shape, np.int64)
        for i, a in enumerate(audios):
            batch[i, : len(a)], mask[i, : len(a)] = a, 1
        self._captured.clear()
        with torch.inference_mode(), _exact_float32(torch):
            self.model(torch.from_numpy(batch).to(self.device),
                       attention_mask=torch.from_numpy(mask).to(self.device) if len(audios) > 1 else None)
        hidden = self._captured[0]
        return [hidden[i, : self.frames(n)].float() for i, n in enumerate(lengths)]


class CodecEncoder(Encoder):
    """A neural codec's first codebook: one frame per started hop of audio."""

    model_dir: Path

    def frames(self, n_samples: int) -> int:
        return -(-n_samples // self.downsampling_ratio)

    def settings(self) -> dict:
        return {"model": str(self.model_dir), "model_sha256": _model_hash(self.model_dir), "codebook": 0}


class MimiEncoder(CodecEncoder):
    """transformers MimiModel, the first (semantic) codebook of its split RVQ.

    Mimi is causal, so padding after an utterance cannot reach its full frames, but it reaches the
    last, part-filled one: alone, each strided convolution pads its input to a whole window with
    zeros (or its last frame repeated), while in a batch the encoding of the padding audio fills
    that window. Hooks on those convolutions give each utterance of a batch the padding it gets
    alone, so its codes do not depend on its companions (up to float rounding). Its reach back is
    finite (the convolutions and the transformer's attention window), so a chunk of a long file
    encoded with that much audio before it gets exactly the frames of a single pass."""

    name = "mimi"

    def __init__(self, model_dir: str, device: str, batch_size: int):
        transformers = _transformers()
        import torch
        from transformers.models.mimi.modeling_mimi import MimiConv1d

        self.model_dir = _model_dir(model_dir)
        self.device = _torch_device(device)
        self.model = transformers.MimiModel.from_pretrained(str(self.model_dir), local_files_only=True).eval().to(self.device)
        config = self.model.config
        self.sampling_rate = int(config.sampling_rate)
        self.downsampling_ratio = int(round(config.sampling_rate / config.frame_rate))
        self.n_dsus = int(config.codebook_size)
        self.torch = torch
        # Where this transformers version keeps them: in MimiModel.encoder, or beside it.
        seanet = getattr(self.model.encoder, "encoder_seanet", self.model.encoder)
        downsample = getattr(self.model.encoder, "downsample", None) or getattr(self.model, "downsample", None)
        convs = [m for m in [*seanet.modules(), downsample] if isinstance(m, MimiConv1d)]
        strided = [m for m in convs if m.conv.stride[0] > 1]
        causal = config.use_causal_conv and all(m.pad_mode in ("constant", "replicate") for m in strided)
        window = getattr(config, "sliding_window", None)
        # Unless every layer looks only back, padding reaches every frame: then one utterance at a time.
        self.batch_size = batch_size if causal else 1
        self._valid: dict[int, list[int]] = {}  # input length at a layer -> each utterance's own length there
        if causal:
            for conv in strided:
                conv.register_forward_pre_hook(self._pad_as_alone)
                conv.register_forward_hook(self._record_lengths)
        context = int(CONTEXT_SECONDS * self.sampling_rate)
        self.context = (self._reach(convs, downsample, window), 0) if causal and window else (context, context)

    @staticmethod
    def _reach(convs: list, downsample, window: int) -> int:
        """Samples before a frame's hop that can change it: the receptive field of the convolutions
        (residual branches counted in series: a bound) and the transformer's attention window,
        which works between the SEANet and the downsampling convolution."""
        reach, jump = 0, 1
        for conv in convs:
            if conv is downsample:
                reach += (window - 1) * jump
            reach += (int(conv.kernel_size) - 1) * jump
            jump *= conv.conv.stride[0]
        return reach if downsample is not None else reach + (window - 1) * jump

    def _pad_as_alone(self, conv, args):
        x = args[0]
        valid = self._valid[x.shape[-1]]
        if min(valid) == x.shape[-1]:
            return None
        x = x.clone()
        for i, n in enumerate(valid):
            x[i, :, n:] = x[i, :, n - 1 : n] if conv.pad_mode == "replicate" else 0
        return (x, *args[1:])

    def _record_lengths(self, conv, args, out):
        stride = conv.conv.stride[0]
        self._valid[out.shape[-1]] = [-(-n // stride) for n in self._valid[args[0].shape[-1]]]

    def encode(self, audios):
        torch = self.torch
        lengths = [len(a) for a in audios]
        batch = np.zeros((len(audios), 1, max(lengths)), np.float32)
        for i, a in enumerate(audios):
            batch[i, 0, : len(a)] = a
        self._valid = {batch.shape[-1]: lengths}
        with torch.inference_mode(), _exact_float32(torch):
            codes = self.model.encode(torch.from_numpy(batch).to(self.device), num_quantizers=1).audio_codes
        return [codes[i, 0, : self.frames(n)].cpu().numpy().astype(np.int64) for i, n in enumerate(lengths)]


class SpeechTokenizerEncoder(CodecEncoder):
    """The speechtokenizer package's model, RVQ-0 codes. Its encoder is not causal (convolutions
    and a BiLSTM see the padding), so utterances go one at a time, and a piece of a long file is
    encoded with CONTEXT_SECONDS around it."""

    name = "speechtokenizer"

    def __init__(self, model_dir: str, device: str):
        try:
            from speechtokenizer import SpeechTokenizer
        except ImportError:
            raise InputError("the speechtokenizer encoder needs its package: pip install speechtokenizer") from None
        import torch

        self.model_dir = _model_dir(model_dir)
        config_path, weights = self.model_dir / "config.json", self.model_dir / "SpeechTokenizer.pt"
        if not weights.exists():
            raise InputError(f"{self.model_dir}: no {weights.name} (the directory holds config.json and SpeechTokenizer.pt)")
        config = _json_object(config_path)
        for key in ("codebook_size", "sample_rate"):
            if not _positive_int(config.get(key)):
                raise InputError(f"{config_path}: field '{key}': expected a positive integer, got {config.get(key)!r}")
        self.n_dsus = config["codebook_size"]
        self.device = _torch_device(device)
        self.model = SpeechTokenizer(config)
        # Read as data: the package's own loader would unpickle the checkpoint.
        self.model.load_state_dict(torch.load(readable(weights), map_location="cpu", weights_only=True))
        self.model = self.model.eval().to(self.device)
        self.sampling_rate = int(self.model.sample_rate)
        self.downsampling_ratio = int(self.model.downsample_rate)
        self.context = (int(CONTEXT_SECONDS * self.sampling_rate),) * 2
        self.torch = torch

    def encode(self, audios):
        out = []
        for a in audios:
            with self.torch.inference_mode(), _exact_float32(self.torch):
                codes = self.model.encode(self.torch.from_numpy(a)[None, None].to(self.device), n_q=1)
            out.append(codes[0, 0].cpu().numpy().astype(np.int64))
        return out


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _json_object(path: Path, required: bool = True) -> dict:
    """A JSON file holding an object; {} for an absent optional one. Errors name the file."""
    if not required and not path.exists():
        return {}
    try:
        value = json.loads(readable(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _model_dir(model_dir: str | None) -> Path:
    if not model_dir:
        raise InputError("this encoder needs --model DIR (a local model directory)")
    path = Path(model_dir)
    if not (path / "config.json").exists():
        raise InputError(f"--model {model_dir}: no config.json there (a Hugging Face model directory is expected)")
    for entry in _model_files(path):
        readable(entry)  # a FIFO among them would block the model's loader
    return path


def _model_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.iterdir() if p.suffix in (".json", ".safetensors", ".bin", ".pt"))


def _model_hash(model_dir: Path) -> str:
    """sha256 over the directory's config and weight files (names and contents)."""
    digest = hashlib.sha256()
    for path in _model_files(model_dir):
        if path.is_file():
            digest.update(path.name.encode())
            with open(path, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
    return digest.hexdigest()


def make_encoder(args, need_kmeans: bool = True) -> Encoder:
    kmeans = args.kmeans if need_kmeans else None
    allow = getattr(args, "allow_pickle", False)
    if args.encoder in ("mfcc", "logmel"):
        encoder = SpectralEncoder(args.encoder, kmeans, allow, args.stack)
        if need_kmeans and kmeans is None:
            raise InputError(f"the {args.encoder} encoder needs --kmeans (e.g. data/mini/kmeans.npz, or learn one with 'learn-kmeans')")
        return encoder
    if args.encoder == "hubert":
        if args.layer is None:
            raise InputError("the hubert encoder needs --layer (22 for HuBERT large, as the reference's datasets)")
        if need_kmeans and kmeans is None:
            raise InputError("the hubert encoder needs --kmeans (learn one with 'learn-kmeans')")
        return HubertEncoder(args.model, args.layer, kmeans, args.device, args.batch_size, allow)
    if args.kmeans and need_kmeans:
        raise InputError(f"--kmeans: the {args.encoder} encoder has its own codebook")
    if args.encoder == "mimi":
        return MimiEncoder(args.model, args.device, args.batch_size)
    return SpeechTokenizerEncoder(args.model, args.device)


# ---------------------------------------------------------------------------------------------
# Encoding, with long audio in pieces


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of an utterance, encoded as one; of its frames, `count` from `first`
    on are kept, the others being context. `start` is on a frame boundary, so the piece's frame j
    is the utterance's frame start / hop + j."""

    start: int
    stop: int
    first: int
    count: int


def chunk_pieces(n_samples: int, encoder: Encoder, chunk_seconds: float) -> list[Piece]:
    """The pieces an utterance is encoded in: its frames in chunks of `chunk_seconds`, each encoded
    with `encoder.context` samples of audio before and after it (the window moved inwards at the
    ends of the file, so every piece is as long, and chunks that end up in the same window share
    one piece), so that its frames see what a single pass shows them: exactly where the model's
    reach is finite (Mimi), nearly where it attends to its whole input (HuBERT)."""
    n_frames = encoder.frames(n_samples)
    hop = encoder.downsampling_ratio
    step = max(1, int(chunk_seconds * encoder.sampling_rate) // hop)
    if not encoder.chunked or n_frames <= step:
        return [Piece(0, n_samples, 0, n_frames)]
    before, after = (-(-c // hop) for c in encoder.context)  # whole frames
    window = before + step + after
    pieces = []
    for first in range(0, n_frames, step):
        last = min(n_frames, first + step)
        # Frames [first - before, first + step + after), moved inside the file where they cross its ends.
        start = max(0, min(first - before, n_frames - window))
        stop = min(n_frames, start + window)
        piece = Piece(start * hop, n_samples if stop == n_frames else stop * hop + encoder.chunk_overlap,
                      first - start, last - first)
        if pieces and (pieces[-1].start, pieces[-1].stop) == (piece.start, piece.stop):  # the same window: once
            before_it = pieces.pop()
            piece = Piece(piece.start, piece.stop, before_it.first, before_it.count + piece.count)
        pieces.append(piece)
    return pieces


def _in_pieces(encoder: Encoder, audios: list[np.ndarray], chunk_seconds: float, run) -> list[list]:
    """`run` (the encoder's `features` or `encode`) over the pieces of every audio, `batch_size`
    pieces at a time, longest first (less padding); per audio, the kept frames of its pieces in order."""
    audios = [encoder.prepare(a) for a in audios]
    pieces = [(i, p) for i, a in enumerate(audios) for p in chunk_pieces(len(a), encoder, chunk_seconds)]
    order = sorted(range(len(pieces)), key=lambda k: pieces[k][1].start - pieces[k][1].stop)
    kept = [None] * len(pieces)
    for first in range(0, len(order), encoder.batch_size):
        batch = order[first : first + encoder.batch_size]
        outputs = run([audios[pieces[k][0]][pieces[k][1].start : pieces[k][1].stop] for k in batch])
        for k, out in zip(batch, outputs):
            p = pieces[k][1]
            kept[k] = out[p.first : p.first + p.count]
    per_audio = [[] for _ in audios]
    for (i, _), frames in zip(pieces, kept):
        per_audio[i].append(frames)
    return per_audio


def utterance_features(encoder: Encoder, audios: list[np.ndarray], chunk_seconds: float,
                       names: list[str] | None = None) -> list:
    """Per audio, the (frames x dims) features a k-means encoder clusters: torch on the encoder's
    device, or numpy. Non-finite features are refused, naming the audio (`names`)."""
    out = []
    for i, parts in enumerate(_in_pieces(encoder, audios, chunk_seconds, encoder.features)):
        if hasattr(parts[0], "isfinite"):
            import torch

            whole, finite = torch.cat(parts), lambda x: bool(x.isfinite().all())
        else:
            whole, finite = np.concatenate(parts), lambda x: bool(np.isfinite(x).all())
        if not finite(whole):
            raise InputError(f"{names[i] if names else f'audio {i}'}: the {encoder.name} features hold NaN or "
                             "infinite values")
        out.append(whole)
    return out


def encode_audios(encoder: Encoder, audios: list[np.ndarray], chunk_seconds: float,
                  names: list[str] | None = None) -> list[np.ndarray]:
    """DSUs of each audio: the nearest centroid of each frame's features (k-means encoders) or the
    codec's codes; the same for an audio whatever it is batched with."""
    if encoder.centroids is not None:
        device = getattr(encoder, "device", None)
        return [assign(f, encoder.centroids, device) for f in utterance_features(encoder, audios, chunk_seconds, names)]
    return [np.concatenate(parts).astype(np.int64) for parts in _in_pieces(encoder, audios, chunk_seconds, encoder.encode)]


def _numpy(x) -> np.ndarray:
    return x.cpu().numpy() if hasattr(x, "cpu") else np.asarray(x)


# ---------------------------------------------------------------------------------------------
# Output: Parquet shards and units.json


def _shard_name(split: str, index: int, n_shards: int) -> str:
    return f"{split}-{index:05d}-of-{n_shards:05d}.parquet"


def _inputs_hash(utterances: list[Utterance]) -> str:
    digest = hashlib.sha256()
    for u in utterances:
        digest.update(json.dumps([u.id, str(u.path), u.transcript, u.words, u.starts, u.ends]).encode() + b"\n")
    return digest.hexdigest()


def _write_atomically(path: Path, write) -> None:
    """`write(tmp_path)`, then rename onto `path`: a crash never leaves a partial file under its name."""
    with atomic_write(path, temporary=path.with_name(f".{path.name}.partial")) as tmp:
        write(tmp)


def _check_audio(utterances: list[Utterance], encoder: Encoder) -> None:
    """Every file opens as audio and has at least one frame, a file of float samples holds no NaN
    or infinity, and no word ends after its audio: checked before anything is written (from the
    headers, and the samples of float files, the only ones that can hold such values)."""
    import soundfile

    for u in utterances:
        try:
            info = soundfile.info(str(readable(u.path)))
            if info.subtype in ("FLOAT", "DOUBLE"):
                with soundfile.SoundFile(str(u.path)) as f:
                    for _ in _finite_blocks(f, u.path, 1 << 20):
                        pass
        except InputError as e:
            raise InputError(f"{u.where}: {e}") from None
        except Exception as e:  # soundfile raises several types for unreadable files
            raise InputError(f"{u.where}: {u.path}: cannot read as audio ({e})") from None
        seconds = info.frames / info.samplerate
        if encoder.frames(int(seconds * encoder.sampling_rate)) == 0:
            raise InputError(f"{u.where}: {u.path}: {seconds:.3f} s is shorter than one {encoder.name} frame")
        if u.ends and max(u.ends) > seconds + END_SLACK_S:
            raise InputError(f"{u.where}: utterance {u.id!r}: a word ends at {max(u.ends)} s, after the audio's "
                             f"{seconds:.3f} s (alignments of another utterance?)")


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
    utterances = read_inputs(args.inputs)
    if args.alignments:
        attach_alignments(utterances, args.alignments)
    untimed = [u for u in utterances if u.words is None]
    if untimed and len(untimed) < len(utterances):
        raise InputError(f"{untimed[0].where}: utterance {untimed[0].id!r} has no word times, while others have; "
                         "give all or none (rows without them suit SFT and concatenated CPT, not interleaved CPT)")
    encoder = make_encoder(args)
    _check_audio(utterances, encoder)
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
        _write_atomically(meta_path, lambda p: p.write_text(json.dumps({**info, "complete": False}, indent=2) + "\n"))
    started = time.time()
    try:
        written = _write_shards(args, encoder, utterances, info, data_dir)
    except (InputError, features.FeatureError):
        if not args.resume:
            shutil.rmtree(created, ignore_errors=True)  # refused input leaves nothing behind
        raise
    n_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in data_dir.glob("*.parquet"))
    _write_atomically(meta_path, lambda p: p.write_text(json.dumps({**info, "complete": True}, indent=2) + "\n"))
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
    before = _json_object(meta)
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
            _write_atomically(data_dir / _shard_name(args.split, index, n_shards), lambda p: pq.write_table(table, p))
    return len(pending)


def _encoded_rows(encoder: Encoder, group: list[Utterance], chunk_seconds: float, timed: bool) -> list[dict]:
    audios = []
    for u in group:
        try:
            audios.append(read_audio(u.path, encoder.sampling_rate))
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
    info = _json_object(meta)
    if not isinstance(info.get("complete"), bool):
        raise InputError(f"{meta}: field 'complete': expected true or false, got {info.get('complete')!r}")
    if not info["complete"]:
        raise InputError(f"{out_dir}: the encoding there is unfinished; complete it with 'encode ... --resume'")
    return [f"data.train={Path(out_dir) / 'data'}", *overrides(info, str(meta))]


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
    utterances = read_inputs(args.inputs, need_transcript=False)
    encoder = make_encoder(args, need_kmeans=False)
    _check_audio(utterances, encoder)
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
                audio = read_audio(u.path, encoder.sampling_rate)
            except InputError as e:
                raise InputError(f"{u.where}: {e}") from None
            # The features encode assigns: the same pieces, context and normalisation.
            x = utterance_features(encoder, [audio], args.chunk_seconds, [u.where])[0]
            chunks.append(_numpy(x).astype(np.float32))
            total += len(chunks[-1])
            bar.update(1)
    x = np.concatenate(chunks)
    if len(x) > args.max_frames:
        x = x[np.sort(rng.choice(len(x), size=args.max_frames, replace=False))]
    device = getattr(encoder, "device", None) or _torch_device(args.device)
    started = time.time()
    centroids = features.fit_kmeans_torch(x, args.k, args.seed, max_iter=args.max_iter, device=str(device))
    _write_atomically(out, lambda p: _save_npy(p, centroids))
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
    _write_atomically(out, lambda p: _save_npy(p, centroids))
    print(f"{out}: {centroids.shape[0]} centroids of {centroids.shape[1]} dims, sha256 {features.centroids_sha256(centroids)}",
          file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.units", description=__doc__.split("\n\n")[0],
                                     epilog="Read data/units.py's docstring for the inputs and outputs.")
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


if __name__ == "__main__":
    sys.exit(main())

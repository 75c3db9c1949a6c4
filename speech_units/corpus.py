"""A synthetic speech-tokenized corpus: grammar sentences spoken by espeak-ng, encoded as k-means DSUs.

    python -m speech_units.corpus build OUT_DIR [--n-train 1500 --n-dev 100 --n-test 100 --k 128 --seed 0 --jobs 2]
    python -m speech_units.corpus encode KMEANS.npz OUT.jsonl WAV_AND_TEXT.tsv

`build` writes `train.jsonl`, `dev.jsonl`, `test.jsonl` in the reference's schema (docs/DESIGN.md,
"Data") plus `speaker`, and `kmeans.npz`, `corpus.json`, `README.md`. How an utterance is made:
each word is synthesised on its own (`espeak-ng -v VOICE -s SPEED -p PITCH -w FILE WORD`, 22050 Hz),
resampled to 16 kHz (windowed sinc, `speech_units.features.resample`), trimmed to the samples whose
5 ms frames reach -40 dB of the word's loudest frame, and the words are joined with seeded random
pauses; the word times are the trimmed words' first and last sample. The utterance is peak
normalised, faint seeded noise is added, and it is quantised to 16-bit, which is exactly what
`--save-wav` writes and what `encode` would read back. DSUs: the MFCC encoder of
`speech_units.encoders` (features and k-means in `speech_units.features`), the one encoding path of
this project: `encode` here and `python -m speech_units encode --encoder mfcc --kmeans kmeans.npz`
give the same units.

Requires the `espeak-ng` program (Debian/Ubuntu package `espeak-ng`).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.tokenizer import MAX_DSUS
from files import atomic_write
from speech_units import encoders, features, inputs
from speech_units.inputs import InputError

# Speakers: an espeak-ng voice spec (language voice + variant) with its own speed (words per
# minute) and pitch (0-99). British English is "en", not "en-gb": espeak-ng 1.51 ignores the
# variant of "en-gb+VARIANT". Dev and test each add speakers never heard in training (test's also
# have accents training never heard), for half of their utterances.
TRAIN_SPEAKERS = {
    "en-us+m1": (165, 45),
    "en-us+f2": (175, 62),
    "en+m3": (160, 38),
    "en+f4": (170, 66),
    "en-gb-scotland+m2": (155, 50),
    "en-gb-x-rp+f1": (180, 55),
    "en-029+m4": (170, 35),
    "en-gb-x-gbcwmd+f3": (160, 70),
    "en-us+m5": (160, 42),
    "en-gb-scotland+Annie": (165, 60),
    "en-gb-x-rp+m7": (170, 40),
    "en-029+steph": (165, 65),
    "en-gb-x-gbcwmd+david": (160, 45),
    "en-us+linda": (170, 58),
    "en+paul": (165, 40),
    "en-us+max": (175, 50),
}
DEV_ONLY_SPEAKERS = {
    "en+m8": (165, 44),
    "en-gb-x-rp+Andrea": (170, 64),
}
TEST_ONLY_SPEAKERS = {
    "en-us-nyc+m6": (170, 48),
    "en-gb-x-gbclan+f5": (165, 60),
}
SPEAKERS = {**TRAIN_SPEAKERS, **DEV_ONLY_SPEAKERS, **TEST_ONLY_SPEAKERS}
SPLITS = ("train", "dev", "test")
MFCC = encoders.SpectralEncoder("mfcc", None)  # features only: build fits its own centroids
MANIFEST_FIELDS = ("id", "transcript", "tokenized", "aligned_token_start_time", "aligned_token_end_time")
COMPACT = (",", ":")  # JSON separators of the rows: no spaces, a fifth smaller
SPEED_JITTER = 10  # per-utterance speed is the speaker's +- this, so repeated words differ in length
PITCH_JITTER = 4

WORD_TRIM_DB = -40.0
TRIM_FRAME = 80  # samples (5 ms) per energy frame when trimming
LEAD_SILENCE_S = (0.15, 0.35)
WORD_PAUSE_S = (0.03, 0.18)
TAIL_SILENCE_S = (0.15, 0.35)
PEAK = 0.8
NOISE_STD = 1e-4

# ---------------------------------------------------------------------------------------------
# Grammar: a closed vocabulary and sentence templates. "{slot}" fills from WORDS[slot]; slots
# ending in "phrase" are built by the functions below.

NOUNS = {
    "box": "boxes", "ball": "balls", "cup": "cups", "book": "books", "chair": "chairs",
    "table": "tables", "bird": "birds", "cat": "cats", "dog": "dogs", "car": "cars",
    "hat": "hats", "key": "keys", "lamp": "lamps", "bag": "bags", "bottle": "bottles",
    "pen": "pens", "shoe": "shoes", "apple": "apples", "plate": "plates", "flower": "flowers",
    "stone": "stones", "train": "trains", "boat": "boats", "horse": "horses", "clock": "clocks",
    "spoon": "spoons",
}  # fmt: skip
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
WORDS = {
    "colour": ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "brown", "pink", "grey"],
    "size": ["big", "small", "large", "tiny", "old", "new", "round", "heavy"],
    "place": ["house", "garden", "kitchen", "room", "park", "school", "shop", "river", "window"],
    "prep": ["on", "under", "near", "behind", "beside", "in", "above", "below", "inside"],
    "verb": ["put", "place", "move", "take", "bring", "push", "carry", "drop", "hide", "wash"],
    "past": ["saw", "found", "bought", "painted", "moved", "dropped", "carried", "wanted", "lost", "sold"],
    "name": ["anna", "tom", "lucy", "peter", "sara", "jack", "emma", "david"],
    "pronoun": ["i", "we", "you", "they"],
    "owner": ["my", "your", "his", "her", "our"],
    "number": NUMBERS,
}
MAX_WORDS = 8  # short utterances suit the tiny demo models
TEMPLATES = [
    "{verb} the {nounphrase} {prep} the {nounphrase}",
    "the {countphrase} are {prep} the {place}",
    "{name} {past} {countphrase}",
    "is the {nounphrase} {prep} the {nounphrase}",
    "give me the {nounphrase}",
    "there are {countphrase} in the {place}",
    "where is the {nounphrase}",
    "{pronoun} can see {aphrase}",
    "{name} and {name} {past} the {nounphrase}",
    "the {noun} is {colour}",
    "{verb} {countphrase} to the {place}",
    "how many {plural} are {prep} the {noun}",
    "{owner} {noun} is {prep} the {place}",
    "paint the {noun} {colour}",
    "do not {verb} the {nounphrase}",
    "{pronoun} have {countphrase}",
    "this {noun} is very {size}",
    "{name} has {aphrase} and {aphrase}",
]


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _noun_phrase(rng: np.random.Generator) -> list[str]:
    """`[size] [colour] noun`, each adjective present with probability 1/2."""
    words = [_pick(rng, WORDS[kind]) for kind in ("size", "colour") if rng.random() < 0.5]
    return words + [_pick(rng, list(NOUNS))]


def _count_phrase(rng: np.random.Generator) -> list[str]:
    """`number [adjective] plural-noun`."""
    adjective = [_pick(rng, WORDS[_pick(rng, ["size", "colour"])])] if rng.random() < 0.6 else []
    return [_pick(rng, NUMBERS), *adjective, NOUNS[_pick(rng, list(NOUNS))]]


def _a_phrase(rng: np.random.Generator) -> list[str]:
    phrase = _noun_phrase(rng)
    return ["an" if phrase[0][0] in "aeiou" else "a", *phrase]


SLOT_BUILDERS = {
    "nounphrase": _noun_phrase,
    "countphrase": _count_phrase,
    "aphrase": _a_phrase,
    "noun": lambda rng: [_pick(rng, list(NOUNS))],
    "plural": lambda rng: [_pick(rng, list(NOUNS.values()))],
    **{slot: (lambda rng, slot=slot: [_pick(rng, WORDS[slot])]) for slot in WORDS},
}


def sentence(rng: np.random.Generator) -> str:
    words = []
    for part in _pick(rng, TEMPLATES).split():
        words += SLOT_BUILDERS[part[1:-1]](rng) if part.startswith("{") else [part]
    return " ".join(words)


def vocabulary() -> set[str]:
    """Every word the grammar can produce."""
    words = {w for template in TEMPLATES for w in template.split() if not w.startswith("{")}
    return words | {"a", "an"} | set(NOUNS) | set(NOUNS.values()) | {w for ws in WORDS.values() for w in ws}


def distinct_sentences(n: int, seed: int) -> list[str]:
    """`n` different sentences of at most MAX_WORDS words, deterministic given `seed`."""
    rng = np.random.default_rng([seed, 1])
    found: dict[str, None] = {}
    for _ in range(50 * n + 100):
        if len(found) == n:
            break
        text = sentence(rng)
        if len(text.split()) <= MAX_WORDS:
            found.setdefault(text)
    if len(found) < n:
        raise ValueError(f"the grammar gave only {len(found)} distinct sentences of the {n} asked for")
    return list(found)


def split_sentences(n_train: int, n_dev: int, n_test: int, seed: int) -> dict[str, list[str]]:
    """Disjoint train/dev/test sentence lists."""
    pool = distinct_sentences(n_train + n_dev + n_test, seed)
    return dict(zip(SPLITS, (pool[:n_train], pool[n_train : n_train + n_dev], pool[n_train + n_dev :])))


def split_speakers(seed: int) -> dict[str, list[str]]:
    """Speakers each split cycles through. Dev and test alternate their unseen speakers with the
    training ones, unseen first, so that half of their utterances (and even a tiny split) have a
    voice training never heard."""
    rng = np.random.default_rng([seed, 2])
    seen = [list(TRAIN_SPEAKERS)[i] for i in rng.permutation(len(TRAIN_SPEAKERS))]

    def alternate(unseen: list[str]) -> list[str]:
        n = len(unseen) * len(seen)  # one full cycle of each
        return [unseen[i // 2 % len(unseen)] if i % 2 == 0 else seen[i // 2 % len(seen)] for i in range(2 * n)]

    return {"train": seen, "dev": alternate(list(DEV_ONLY_SPEAKERS)), "test": alternate(list(TEST_ONLY_SPEAKERS))}


# ---------------------------------------------------------------------------------------------
# Synthesis


def speaker_settings(speaker: str) -> tuple[int, int]:
    return SPEAKERS[speaker]


def espeak_word(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """One word from espeak-ng, resampled to 16 kHz, samples in [-1, 1]."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "word.wav")
        command = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", path, word]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not os.path.exists(path):
            raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")
        audio, rate = read_wav(path)
    return features.resample(audio, rate, features.SAMPLE_RATE)


def trim(audio: np.ndarray) -> np.ndarray:
    """The span from the first to the last 5 ms frame within WORD_TRIM_DB of the loudest frame."""
    n_frames = len(audio) // TRIM_FRAME
    rms = np.sqrt((audio[: n_frames * TRIM_FRAME].reshape(n_frames, TRIM_FRAME) ** 2).mean(1))
    loud = np.flatnonzero(rms >= rms.max() * 10 ** (WORD_TRIM_DB / 20)) if n_frames and rms.max() > 0 else []
    if len(loud) == 0:
        raise RuntimeError("espeak-ng produced silence")
    return audio[loud[0] * TRIM_FRAME : (loud[-1] + 1) * TRIM_FRAME]


def synthesize(words: list[str], speaker: str, rng: np.random.Generator) -> tuple[np.ndarray, list[float], list[float]]:
    """16-bit 16 kHz audio of `words` said by `speaker`, with each word's start and end in seconds."""
    base_speed, base_pitch = speaker_settings(speaker)
    speed = base_speed + int(rng.integers(-SPEED_JITTER, SPEED_JITTER + 1))
    pitch = base_pitch + int(rng.integers(-PITCH_JITTER, PITCH_JITTER + 1))

    def silence(bounds: tuple[float, float]) -> np.ndarray:
        return np.zeros(int(rng.uniform(*bounds) * features.SAMPLE_RATE))

    pieces, starts, ends = [silence(LEAD_SILENCE_S)], [], []
    offset = len(pieces[0])
    for i, word in enumerate(words):
        if i:
            pieces.append(silence(WORD_PAUSE_S))
            offset += len(pieces[-1])
        spoken = trim(espeak_word(word, speaker, speed, pitch))
        starts.append(offset)
        ends.append(offset + len(spoken))
        pieces.append(spoken)
        offset += len(spoken)
    pieces.append(silence(TAIL_SILENCE_S))
    audio = np.concatenate(pieces)
    audio = audio * (PEAK / np.abs(audio).max()) + rng.normal(0.0, NOISE_STD, len(audio))
    pcm = np.clip(np.round(audio * 32768), -32768, 32767).astype(np.int16)
    rate = features.SAMPLE_RATE
    return pcm, [s / rate for s in starts], [e / rate for e in ends]


def _make_utterance(task: tuple) -> dict:
    """Worker: synthesise one utterance and compute its features (and write its wav if asked)."""
    split, index, text, speaker, seed, wav_path = task
    split_number = SPLITS.index(split)  # so that train-00000 and test-00000 get different pauses
    pcm, starts, ends = synthesize(text.split(), speaker, np.random.default_rng([seed, 3, split_number, index]))
    if wav_path:
        write_wav(wav_path, pcm)
    row = {
        "id": f"{split}-{index:05d}",
        "transcript": text,
        "tokenized": text.split(),
        "aligned_token_start_time": starts,
        "aligned_token_end_time": ends,
        "speaker": speaker,
    }
    return {"split": split, "row": row, "features": MFCC.features([pcm / 32768.0])[0]}


# ---------------------------------------------------------------------------------------------
# WAV files


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Samples in [-1, 1] (channels averaged) and the sample rate of an integer-PCM WAV file."""
    try:
        with wave.open(str(path), "rb") as f:
            width, channels, rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
            data = f.readframes(f.getnframes())
    except (OSError, EOFError, wave.Error) as e:
        raise InputError(f"{path}: cannot read as a PCM WAV file ({e})") from None
    if width == 1:
        samples = (np.frombuffer(data, np.uint8).astype(np.float64) - 128) / 128
    elif width in (2, 4):
        samples = np.frombuffer(data, f"<i{width}").astype(np.float64) / 2 ** (8 * width - 1)
    elif width == 3:
        raw = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.int32)
        samples = ((raw[:, 0] | raw[:, 1] << 8 | raw[:, 2] << 16) << 8 >> 8) / 2**23
    else:
        raise InputError(f"{path}: unsupported sample width of {width} bytes")
    whole_frames = len(samples) // channels * channels  # a truncated file can end mid-frame
    return samples[:whole_frames].reshape(-1, channels).mean(axis=1), rate


def write_wav(path: str | os.PathLike, pcm: np.ndarray) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(features.SAMPLE_RATE)
        f.writeframes(pcm.astype("<i2").tobytes())


# ---------------------------------------------------------------------------------------------
# Build


def build(
    out_dir: str | os.PathLike,
    n_train: int = 1500,
    n_dev: int = 100,
    n_test: int = 100,
    k: int = 128,
    seed: int = 0,
    jobs: int = 2,
    save_wav: bool = False,
) -> None:
    """Build the whole corpus into `out_dir`, which must not exist (written aside, then renamed)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise InputError(f"{out_dir}: already exists; choose a new output directory")
    if n_train < 1 or n_dev < 0 or n_test < 0:
        raise InputError(f"--n-train must be >= 1 and --n-dev, --n-test >= 0 (got {n_train}, {n_dev}, {n_test})")
    if not 1 <= k <= MAX_DSUS:
        raise InputError(f"--k must be in [1, {MAX_DSUS}], got {k}")
    if shutil.which("espeak-ng") is None:
        raise InputError("the espeak-ng program is not installed (apt-get install espeak-ng)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir, directory=True, replace=False) as work:
        _build_into(work, out_dir, n_train, n_dev, n_test, k, seed, jobs, save_wav)


def _build_into(work: Path, out_dir: Path, n_train, n_dev, n_test, k, seed, jobs, save_wav) -> None:
    sentences = split_sentences(n_train, n_dev, n_test, seed)
    speakers = split_speakers(seed)
    tasks = []
    for split, texts in sentences.items():
        if save_wav:
            (work / "wav" / split).mkdir(parents=True)
        for i, text in enumerate(texts):
            speaker = speakers[split][i % len(speakers[split])]
            wav_path = str(work / "wav" / split / f"{split}-{i:05d}.wav") if save_wav else None
            tasks.append((split, i, text, speaker, seed, wav_path))

    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        made = list(tqdm(pool.map(_make_utterance, tasks, chunksize=4), total=len(tasks), desc="synthesis", unit="utt"))

    started = time.time()
    train_frames = np.concatenate([u["features"] for u in made if u["split"] == "train"])
    centroids = features.fit_kmeans(train_frames, k, seed)
    features.save_kmeans(work / "kmeans.npz", centroids)
    print(f"k-means: K={k} on {len(train_frames)} train frames in {time.time() - started:.1f} s", file=sys.stderr)

    sizes = {}
    for split in sentences:
        rows = []
        for u in made:
            if u["split"] == split:
                rows.append({**u["row"], "speech_tokens": encoders.assign(u["features"], centroids).tolist()})
        with open(work / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row, separators=COMPACT) + "\n" for row in rows)
        if save_wav:  # a manifest of the audio and word times, for python -m speech_units
            with open(work / "wav" / f"{split}.jsonl", "w") as f:
                f.writelines(json.dumps({"path": f"{split}/{row['id']}.wav", **{k: row[k] for k in MANIFEST_FIELDS}},
                                        separators=COMPACT) + "\n" for row in rows)
        sizes[split] = {"utterances": len(rows), "frames": sum(len(r["speech_tokens"]) for r in rows)}

    command = (
        f"python -m speech_units.corpus build {out_dir} --n-train {n_train} --n-dev {n_dev} --n-test {n_test} --k {k} --seed {seed}"
    )
    voices = {split: sorted({u["row"]["speaker"] for u in made if u["split"] == split}) for split in sentences}
    voices["dev_only"] = sorted(set(voices["dev"]) - set(voices["train"]))
    voices["test_only"] = sorted(set(voices["test"]) - set(voices["train"]))
    meta = {
        "command": command,
        "seed": seed,
        "n_dsus": k,
        "frames_per_second": features.SAMPLE_RATE // features.HOP_LENGTH,
        "sample_rate": features.SAMPLE_RATE,
        "downsampling_ratio": features.HOP_LENGTH,
        "sizes": sizes,
        "voices": voices,
        "speaker_settings": {name: {"speed": speed, "pitch": pitch} for name, (speed, pitch) in SPEAKERS.items()},
        "features": features.FEATURE_SETTINGS,
        "vocabulary_size": len(vocabulary()),
    }
    (work / "corpus.json").write_text(json.dumps(meta, indent=2) + "\n")
    (work / "README.md").write_text(_readme(meta))


def _readme(meta: dict) -> str:
    minutes = {split: s["frames"] / meta["frames_per_second"] / 60 for split, s in meta["sizes"].items()}
    sizes = "\n".join(
        f"| {split} | {s['utterances']} | {s['frames']} | {minutes[split]:.1f} | {', '.join(meta['voices'][split])} |"
        for split, s in meta["sizes"].items()
    )
    return f"""# Synthetic speech-tokenized corpus

Made by `speech_units/corpus.py` (read its docstring for the exact recipe) with:

    {meta['command']}

Seed {meta['seed']}; K = {meta['n_dsus']} k-means DSUs at {meta['frames_per_second']} frames/s
({meta['sample_rate']} Hz audio, hop {meta['downsampling_ratio']}); vocabulary of {meta['vocabulary_size']} words.
Rebuilding with the same command, espeak-ng and numpy gives the same files.

| split | utterances | DSU frames | minutes | voices |
|---|---|---|---|---|
{sizes}

Voices never heard in training: {', '.join(meta['voices'].get('dev_only', [])) or 'none'} in dev,
{', '.join(meta['voices']['test_only']) or 'none'} in test. Dev and test alternate them with the
training voices, so half of their utterances have a voice training never heard. Speed and pitch
per voice are in `corpus.json` (each utterance varies them by up to +-{SPEED_JITTER} words/min and +-{PITCH_JITTER}).

Sentences come from a small English grammar; the three splits share no sentence.
Each word was synthesised separately by espeak-ng, resampled from 22050 Hz to 16 kHz with a
windowed-sinc filter, trimmed of silence, and joined to the next with a random pause, so the word
times are exact. A word's DSU span is floor(start * 50) .. ceil(end * 50).

DSUs: 13 MFCCs per 25 ms window every 20 ms (no padding: n samples give 1 + (n - 400) // 320
frames; mel energies floored {meta['features']['floor_db']:g} dB below the utterance's loudest), normalised per
utterance, each frame stacked with the {meta['features']['context']} frames on either side ({(2 * meta['features']['context'] + 1) * meta['features']['n_mfcc']} values);
nearest of K centroids fitted on the train split's frames (a seeded sample of at most 100,000 of
them). `kmeans.npz` holds the centroids and feature settings;
`python -m speech_units.corpus encode kmeans.npz OUT.jsonl LIST.tsv` encodes other audio the same way.

Files: `train.jsonl`, `dev.jsonl`, `test.jsonl` (fields `id`, `transcript`, `tokenized`,
`aligned_token_start_time`, `aligned_token_end_time`, `speech_tokens`, `speaker`), `kmeans.npz`,
`corpus.json`. No audio is kept unless built with `--save-wav`, which also writes `wav/SPLIT.jsonl`,
manifests with the word times that `python -m speech_units encode` and `learn-kmeans` read: other
units (features, K, frame rate) for the same utterances.
"""


# ---------------------------------------------------------------------------------------------
# Encode


def encode(kmeans_path: str | os.PathLike, out_path: str | os.PathLike, tsv_path: str | os.PathLike) -> None:
    """Encode the audio files listed in `tsv_path` (`path<TAB>transcript`) with saved k-means into
    JSONL rows (no word times), through `speech_units.encoders`' MFCC encoder: the same reading,
    resampling and encoding as `python -m speech_units encode --encoder mfcc`, which writes Parquet
    shards."""
    out_path = Path(out_path)
    if out_path.exists():
        raise InputError(f"{out_path}: already exists; choose a new output file")
    encoder = encoders.SpectralEncoder("mfcc", str(kmeans_path))
    entries = inputs.read_tsv_manifest(Path(tsv_path))
    inputs.check_unique_ids(entries)
    rows = []
    for u in tqdm(entries, desc="encoding", unit="utt"):
        try:
            audio = inputs.read_audio(u.path, encoder.sampling_rate)
        except InputError as e:
            raise InputError(f"{u.where}: {e}") from None
        if encoder.frames(len(audio)) == 0:
            raise InputError(f"{u.where}: {u.path}: shorter than one 25 ms window")
        dsus = encoders.encode_audios(encoder, [audio], chunk_seconds=0)[0]
        rows.append({"id": u.id, "transcript": u.transcript, "tokenized": u.transcript.split(),
                     "speech_tokens": dsus.tolist()})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_path) as tmp:
        tmp.write_text("".join(json.dumps(row, separators=COMPACT) + "\n" for row in rows))


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speech_units.corpus", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="synthesise and encode a whole corpus (needs espeak-ng)")
    b.add_argument("out_dir", help="output directory; must not exist")
    b.add_argument("--n-train", type=int, default=1500)
    b.add_argument("--n-dev", type=int, default=100)
    b.add_argument("--n-test", type=int, default=100)
    b.add_argument("--k", type=int, default=128, help="number of k-means DSUs")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--jobs", type=int, default=2, help="synthesis worker processes (output does not depend on it)")
    b.add_argument("--save-wav", action="store_true", help="also keep the audio as OUT_DIR/wav/SPLIT/ID.wav, listed "
                   "with word times in OUT_DIR/wav/SPLIT.jsonl for python -m speech_units")
    e = commands.add_parser(
        "encode",
        help="encode your own audio with a saved k-means "
        "(python -m speech_units encode --encoder mfcc does it into Parquet shards)",
        description="Encode wav or flac files (any rate: resampled to 16 kHz with soxr; channels averaged) "
        "listed as 'path<TAB>transcript' lines (relative paths are relative to the list file) into JSONL "
        "rows with id (the file stem), transcript, tokenized (the transcript split on whitespace) and "
        "speech_tokens. Without word times the rows have no aligned_token_* fields: they suit SFT/ASR "
        "and concatenated CPT, not interleaved CPT.",
    )
    e.add_argument("kmeans", help="kmeans.npz written by 'build'")
    e.add_argument("out", help="output JSONL; must not exist")
    e.add_argument("wav_list", help="TSV of path<TAB>transcript (or with a header line naming id, path, transcript)")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            build(args.out_dir, args.n_train, args.n_dev, args.n_test, args.k, args.seed, args.jobs, args.save_wav)
        else:
            encode(args.kmeans, args.out, args.wav_list)
    except (InputError, features.FeatureError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

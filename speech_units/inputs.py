"""What the audio -> units tools read: audio files and manifests (JSONL, TSV), word alignments
(CTM files, Praat TextGrids) and the audio itself (soundfile, resampled with soxr). Bad input raises
InputError, whose message names the file, line or field."""

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import files
from files import NotRegularFile, regular_file

AUDIO_SUFFIXES = (".wav", ".flac")
SILENCE_WORDS = {"", "sil", "sp", "<eps>", "<sil>", "!sil"}  # alignment entries that are not words
END_SLACK_S = 0.05  # how far a word may end past its audio (aligners round to 10 ms frames)


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


def json_object(path: Path, required: bool = True) -> dict:
    """A JSON file holding an object; {} for an absent optional one. Errors name the file."""
    if not required and not path.exists():
        return {}
    try:
        return files.read_json(path)
    except files.JsonFileError as error:
        raise InputError(str(error)) from None


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



def check_audio(utterances: list[Utterance], encoder) -> None:
    """Every file opens as audio and has at least one frame of `encoder`, a file of float samples
    holds no NaN or infinity, and no word ends after its audio: checked before anything is written (from the
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

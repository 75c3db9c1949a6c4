"""Training and inference sequences built at the token level, identical to the reference's.

The reference builds one string per sample (words, DSU characters, modality characters, spaces)
and pushes it through the tokenizer's regex. Here the text pieces are tokenized alone and DSUs
map straight to ids; the glue between pieces (the spaces the reference joins with) is emitted as
the tokens that string would have produced. `tests/test_samples.py` proves both paths equal on
the golden vectors and on random rows, with modality tokens on and off.

A builder first describes a sample as `Pieces` (literal token runs and raw DSU runs, each with a
loss mask, plus the truncation rule); `assemble` turns that into tokens and labels. The fused
op in `dsu_ops` (C++ in `kernels/`) assembles (and packs) whole batches of `Pieces` the same way.

With a speech BPE (the tokenizer's `dsu_bpe`), each DSU run is deduplicated (if asked) and
encoded here, before the ops, into a literal run of DSU and merged-unit token ids.
"""

import math
import re
from array import array
from dataclasses import dataclass, field

import numpy as np

from data.tokenizer import Tokenizer, TokenizerSettingsError, settings_problems
from dsu_ops import IGNORE

# The reference's seed: with the epoch and row index it fixes every interleaving. The config's
# `seed` (row order, torch's RNG) does not change it, so sequences always match the reference's.
SEED = 42831
CPT_SEQUENCE_TYPES = ("interleaved", "concatenated_txt_dsu", "concatenated_dsu_txt")  # how CPT joins text and speech
_WHITESPACE = re.compile(r"\s")


@dataclass(frozen=True)
class Interleave:
    """How CPT interleaving splits a row into text and speech spans."""

    sampling_rate: int = 16000
    downsampling_ratio: int = 320
    mean_seq_len_tokens: float = 39.43
    binom_prob: float = 0.1


def ids(values) -> bytes:
    """Token ids or DSU indices as a run of `Pieces`: native int64 bytes."""
    if isinstance(values, np.ndarray):
        return values.astype(np.int64, copy=False).tobytes()
    return array("q", values).tobytes()  # a list: converted several times faster than by NumPy


@dataclass
class Pieces:
    """One sequence before assembly.

    `values[k]` holds token ids, or DSU indices when `is_dsu[k]` (deduplicated if asked, then
    offset into the vocabulary at assembly), as native int64 bytes (`ids`): batches are flattened
    by joining bytes, a copy, where lists of Python ints cost a conversion per run. Tokens of a
    piece with `masked[k]` get IGNORE labels. At most `limit` tokens are kept; if that cuts the
    sequence and `force_last` is set, the last kept token becomes `force_last`, masked.
    """

    values: list[bytes] = field(default_factory=list)
    is_dsu: list[bool] = field(default_factory=list)
    masked: list[bool] = field(default_factory=list)
    limit: int | None = None
    force_last: int | None = None

    def add(self, values, masked: bool = False, is_dsu: bool = False) -> None:
        """Appends a run: bytes from `ids`, or anything `ids` takes."""
        run = values if isinstance(values, bytes) else ids(values)
        if not is_dsu and self.values and not self.is_dsu[-1] and self.masked[-1] == masked:
            self.values[-1] += run  # one literal run per stretch between DSU runs
            return
        self.values.append(run)
        self.is_dsu.append(is_dsu)
        self.masked.append(masked)


def deduplicate_runs(units: np.ndarray) -> np.ndarray:
    """Drop consecutive repeats: [5, 5, 7, 5] -> [5, 7, 5]."""
    units = np.asarray(units)
    if units.size == 0:
        return units
    keep = np.empty(units.shape, dtype=bool)
    keep[0] = True
    np.not_equal(units[1:], units[:-1], out=keep[1:])
    return units[keep]


def assemble(pieces: Pieces, dsu_offset: int, deduplicate: bool) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and labels (int64; labels unshifted, IGNORE where masked) of one `Pieces`."""
    runs = [np.frombuffer(v, dtype=np.int64) for v in pieces.values]
    runs = [(deduplicate_runs(v) if deduplicate else v) + dsu_offset if dsu else v
            for v, dsu in zip(runs, pieces.is_dsu)]
    tokens = np.concatenate(runs).astype(np.int64, copy=False) if runs else np.zeros(0, dtype=np.int64)
    masked = np.repeat(pieces.masked, [len(r) for r in runs]).astype(bool)
    if pieces.limit is not None and len(tokens) > pieces.limit:
        tokens, masked = tokens[: pieces.limit].copy(), masked[: pieces.limit].copy()
        if pieces.force_last is not None and len(tokens):
            tokens[-1], masked[-1] = pieces.force_last, True
    return tokens, np.where(masked, IGNORE, tokens)


def interleave_spans(index: int, epoch: int, n_words: int, settings: Interleave = Interleave(),
                     seed: int = SEED) -> tuple[bool, list[int]]:
    """The random part of CPT interleaving for row `index`: whether it starts with text, and the
    span bounds in words [0, cut, ..., n_words] (the cuts: the running sums of n_words span lengths
    that fall below n_words)."""
    rng = np.random.default_rng((seed, epoch, index))
    # The reference draws rng.choice([True, False], p=[0.5, 0.5]): one uniform u, True when
    # u < 0.5. Drawing u directly gives the same value and leaves the stream in the same state.
    start_with_text = rng.random() < 0.5
    lengths = np.maximum(rng.binomial(int(settings.mean_seq_len_tokens), settings.binom_prob, size=n_words), 1)
    cuts = np.cumsum(lengths)
    return start_with_text, [0, *cuts[cuts < n_words].tolist(), n_words]


SFT_TASKS = ("asr", "tts", "continue")  # speech -> text, text -> speech, speech -> more speech
_TASK_STREAM = 1  # keeps the task draws apart from the interleaving draws of the same row


def sft_task(index: int, epoch: int, weights: dict[str, float], seed: int) -> str:
    """The SFT task of row `index` in `epoch`, drawn from `weights` ({task: weight}, weights >= 0):
    a function of its arguments alone, so a resumed run draws what the first run drew. A single
    task with weight is taken without a draw."""
    tasks = [task for task in SFT_TASKS if weights.get(task, 0) > 0]
    if len(tasks) == 1:
        return tasks[0]
    u = np.random.default_rng((seed, epoch, index, _TASK_STREAM)).random() * sum(weights[t] for t in tasks)
    for task in tasks:
        u -= weights[task]
        if u < 0:
            return task
    return tasks[-1]  # u rounded to the total


def continuation_split(units: np.ndarray, fraction: float) -> int:
    """Where a `continue` sample cuts an utterance's units into prompt and continuation: the first
    change of unit at or after `fraction` of them (never inside a run, so deduplication cannot
    leave half a run on each side); len(units) when no change follows."""
    start = max(1, math.ceil(fraction * len(units)))
    changes = np.flatnonzero(units[start:] != units[start - 1 : -1]) if start < len(units) else []
    return start + int(changes[0]) if len(changes) else len(units)


def dsu_frames(start: float, end: float, sampling_rate: int, downsampling_ratio: int) -> tuple[int, int]:
    """Frame range [lo, hi) covering the time span; same float expression as the reference
    (math.ceil equals its np.ceil on every float, at a fraction of the cost)."""
    return int(start * sampling_rate / downsampling_ratio), math.ceil(end * sampling_rate / downsampling_ratio)


class SampleBuilder:
    """Builds CPT and SFT sequences for one tokenizer and one set of options.

    `*_pieces` methods describe a sample; the methods without the suffix assemble it.
    """

    def __init__(self, tokenizer: Tokenizer, *, deduplicate: bool, modality_tokens: bool, max_seq_len: int | None):
        for name, value in (("deduplicate", deduplicate), ("modality_tokens", modality_tokens)):
            if not isinstance(value, bool):  # None (read it from the model) must be resolved first
                raise TypeError(f"{name} must be true or false, got {value!r}")
        problems = settings_problems(tokenizer, tokenizer.n_dsus, modality_tokens, deduplicate)
        if problems:
            raise TokenizerSettingsError(f"{tokenizer.path}: " + "; ".join(problems))
        self.tok = tokenizer
        self.deduplicate = deduplicate
        self.modality_tokens = modality_tokens
        self.max_seq_len = max_seq_len
        # Fixed runs, tokenized once.
        self.space = ids(tokenizer.encode(" "))
        self._bos, self._eos, self._eot = ids([tokenizer.bos_id]), ids([tokenizer.eos_id]), ids([tokenizer.eot_id])
        modality = (tokenizer.text_id, tokenizer.speech_id) if modality_tokens else None
        self._text, self._speech = (ids([m]) for m in modality) if modality else (b"", b"")
        self._user_header = ids(tokenizer.header("user"))
        self._assistant_header = ids(tokenizer.header("assistant"))
        self._sft_prefixes: dict[str, bytes] = {}
        self._word_ids: tuple[dict[str, bytes], dict[str, bytes]] = {}, {}  # encodings of "word", " word"

    def _words(self, words: list[str], leading_space: bool) -> bytes:
        """Token ids of " ".join(words) (with a leading space if asked), one cached encoding per word.

        Exact because the pre-tokenizer never joins a word's leading space to the previous word:
        each " word" is tokenized alone. Words holding whitespace (never in real data) take the
        slow path, since runs of spaces do cross word boundaries.
        """
        bare, spaced = self._word_ids  # hold only words that passed the check below
        try:  # every word seen before: one join
            if leading_space or not words:
                return b"".join(map(spaced.__getitem__, words))
            return bare[words[0]] + b"".join(map(spaced.__getitem__, words[1:]))
        except KeyError:
            pass
        if len(spaced) > 1_000_000:
            bare.clear(), spaced.clear()
        runs = []
        for k, word in enumerate(words):
            cache, space = (bare, "") if k == 0 and not leading_space else (spaced, " ")
            run = cache.get(word)
            if run is None:
                if not word or _WHITESPACE.search(word):
                    return ids(self.tok.encode((" " if leading_space else "") + " ".join(words)))
                run = cache[word] = ids(self.tok.encode(space + word))
            runs.append(run)
        return b"".join(runs)

    def _units(self, out: Pieces, units: bytes, masked: bool = False) -> None:
        """A DSU run (`ids`): raw, for assembly to deduplicate and offset, or encoded now by the speech BPE."""
        if self.tok.dsu_bpe is None:
            out.add(units, masked=masked, is_dsu=True)
        else:
            units = np.frombuffer(units, dtype=np.int64)
            out.add(self.tok.speech_ids(deduplicate_runs(units) if self.deduplicate else units), masked=masked)

    def assemble(self, pieces: Pieces) -> tuple[np.ndarray, np.ndarray]:
        return assemble(pieces, self.tok.dsu_offset or 0, self.deduplicate)

    def _sft_prefix(self, system_prompt: str) -> bytes:
        """`<|begin_of_text|>` and the system message (masked in every mode)."""
        if system_prompt not in self._sft_prefixes:
            self._sft_prefixes[system_prompt] = ids([self.tok.bos_id, *self.tok.message("system", system_prompt)])
        return self._sft_prefixes[system_prompt]

    # -- spans -------------------------------------------------------------------------------

    def _text_span(self, words: list[str], first: bool) -> bytes:
        # Reference string: "\ue001 w1 w2" (modality) or "w1 w2", joined to the previous span by " ".
        # The join space before a modality character is a token of its own; before a word it
        # merges into the word's first token.
        if self.modality_tokens:
            return (b"" if first else self.space) + self._text + self._words(words, leading_space=True)
        return self._words(words, leading_space=not first)

    def _speech_head(self, first: bool) -> bytes:
        # Reference string: "\ue000 <dsus>" or "<dsus>": every DSU is a piece of its own, so a
        # space before one is always a lone space token.
        head = b"" if first else self.space
        return head + self._speech + self.space if self.modality_tokens else head

    def _cpt(self, spans: list[tuple[bool, list[str] | bytes]]) -> Pieces:
        """A CPT sequence of spans, each (True, its words) or (False, its DSUs as `ids`): one
        literal run between DSU runs, so one `add` each."""
        # The reference truncates CPT sequences to max_seq_len - 1, keeping no end token.
        out = Pieces(limit=None if self.max_seq_len is None else self.max_seq_len - 1)
        literal = self._bos
        for k, (is_text, content) in enumerate(spans):
            if is_text:
                literal += self._text_span(content, first=k == 0)
            else:
                out.add(literal + self._speech_head(first=k == 0))
                self._units(out, content)
                literal = b""
        out.add(literal + self._eos)
        return out

    # -- sequences ---------------------------------------------------------------------------

    def cpt_concatenated_pieces(self, row: dict, text_first: bool) -> Pieces:
        text, speech = (True, row["tokenized"]), (False, ids(row["speech_tokens"]))
        return self._cpt([text, speech] if text_first else [speech, text])

    def cpt_interleaved_pieces(
        self, row: dict, index: int, epoch: int, settings: Interleave = Interleave(), seed: int = SEED,
        spans: tuple[bool, list[int]] | None = None,
    ) -> Pieces:
        """`spans`, when given, are `interleave_spans(index, epoch, len(row["tokenized"]), ...)`
        made ahead (dsu_ops.interleave_spans makes a batch of them at once)."""
        words = row["tokenized"]
        text, bounds = spans or interleave_spans(index, epoch, len(words), settings, seed)
        starts, finishes = row["aligned_token_start_time"], row["aligned_token_end_time"]
        units, rate, ratio = ids(row["speech_tokens"]), settings.sampling_rate, settings.downsampling_ratio
        out = []
        for lo, hi in zip(bounds, bounds[1:]):
            if text:
                out.append((True, words[lo:hi]))
            else:
                f_lo, f_hi = dsu_frames(starts[lo], finishes[hi - 1], rate, ratio)
                out.append((False, units[8 * f_lo : 8 * f_hi]))  # 8 bytes a unit
            text = not text
        return self._cpt(out)

    def sft_asr_pieces(self, row: dict, system_prompt: str, train_on_input: bool, inference: bool = False) -> Pieces:
        """Llama 3 chat: system prompt, user = the utterance's DSUs, assistant = its transcript.

        Masking follows the reference (torchtune): the begin token and the system message are
        always masked, the user message unless `train_on_input`, the assistant message never;
        the final end-of-text token is masked. `inference` stops after the assistant header.
        Truncation (torchtune's rule) keeps max_seq_len tokens and, when the sequence carries
        end tokens, makes the last one end-of-text.
        """
        user = [(self._speech, False), (ids(row["speech_tokens"]), True), (self._text, False)]
        answer = [] if inference else [(ids(self.tok.encode(row["transcript"].strip())), False)]
        return self._sft_pieces(system_prompt, train_on_input, inference, user, answer)

    def _sft_pieces(self, system_prompt: str, train_on_input: bool, inference: bool,
                    user: list[tuple[bytes, bool]], answer: list[tuple[bytes, bool]]) -> Pieces:
        """A Llama 3 chat sample around the user and assistant contents, each a list of (`ids`,
        is_dsu) runs, masked and cut as `sft_asr_pieces` describes."""
        out = Pieces(limit=self.max_seq_len, force_last=None if inference else self.tok.eos_id)
        out.add(self._sft_prefix(system_prompt), masked=True)
        self._runs(out, [(self._user_header, False), *user, (self._eot, False)], masked=not train_on_input)
        out.add(self._assistant_header)
        if not inference:
            self._runs(out, [*answer, (self._eot, False)], masked=False)
            out.add(self._eos, masked=True)
        return out

    def _runs(self, out: Pieces, runs: list[tuple[bytes, bool]], masked: bool) -> None:
        for run, is_dsu in runs:
            if is_dsu:
                self._units(out, run, masked=masked)
            elif run:  # an absent modality token is an empty run
                out.add(run, masked=masked)

    def sft_tts_pieces(self, row: dict, system_prompt: str, train_on_input: bool, inference: bool = False) -> Pieces:
        """Text to speech: user = the transcript, assistant = the utterance's units. With modality
        tokens the user message is `<text> words <speech>` and the units end with `<text>`, the
        end of speech; without them the units end at `<|eot_id|>`."""
        words = ids(self.tok.encode(row["transcript"].strip()))
        user = [(self._text + words + self._speech, False)]
        answer = [(ids(row["speech_tokens"]), True), (self._text, False)]
        return self._sft_pieces(system_prompt, train_on_input, inference, user, answer)

    def sft_continue_pieces(self, row: dict, system_prompt: str, train_on_input: bool, fraction: float,
                            inference: bool = False) -> Pieces:
        """Speech continuation: user = the first `fraction` of the units (`continuation_split`),
        assistant = the rest, ended as in `sft_tts_pieces`."""
        units = np.asarray(row["speech_tokens"], dtype=np.int64)
        cut = continuation_split(units, fraction)
        user = [(self._speech, False), (ids(units[:cut]), True)]
        answer = [(ids(units[cut:]), True), (self._text, False)]
        return self._sft_pieces(system_prompt, train_on_input, inference, user, answer)

    def sft_pieces(self, task: str, row: dict, sft: dict, inference: bool = False) -> Pieces:
        """The `task` sample of a row (one of SFT_TASKS), with the prompts and options of `sft` (a
        config's data.sft section; a prompt for inference needs only the task's own keys)."""
        train_on_input = False if inference else sft["train_on_input"]  # labels mean nothing at inference
        if task == "asr":
            return self.sft_asr_pieces(row, sft["system_prompt"], train_on_input, inference)
        if task == "tts":
            return self.sft_tts_pieces(row, sft["tts_system_prompt"], train_on_input, inference)
        if task == "continue":
            return self.sft_continue_pieces(row, sft["continue_system_prompt"], train_on_input,
                                            sft["continue_fraction"], inference)
        raise ValueError(f"unknown SFT task {task!r} (one of {', '.join(SFT_TASKS)})")

    def cpt_concatenated(self, row: dict, text_first: bool) -> tuple[np.ndarray, np.ndarray]:
        return self.assemble(self.cpt_concatenated_pieces(row, text_first))

    def cpt_interleaved(
        self, row: dict, index: int, epoch: int, settings: Interleave = Interleave(), seed: int = SEED
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.assemble(self.cpt_interleaved_pieces(row, index, epoch, settings, seed))

    def sft_asr(
        self, row: dict, system_prompt: str, train_on_input: bool, inference: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.assemble(self.sft_asr_pieces(row, system_prompt, train_on_input, inference))

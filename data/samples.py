"""Training and inference sequences built at the token level, identical to the reference's.

The reference builds one string per sample (words, DSU characters, modality characters, spaces)
and pushes it through the tokenizer's regex. Here the text pieces are tokenized alone and DSUs
map straight to ids; the glue between pieces (the spaces the reference joins with) is emitted as
the tokens that string would have produced. `tests/test_samples.py` proves both paths equal on
the golden vectors and on random rows, with modality tokens on and off.

Every builder returns `(tokens, labels)` as int64 numpy arrays; labels are not shifted
(position i labels token i) and are IGNORE where the loss is masked.
"""

from dataclasses import dataclass

import numpy as np

from data.tokenizer import Tokenizer

IGNORE = -100
SEED = 42831  # the reference's seed: with the epoch and row index it fixes every interleaving


@dataclass(frozen=True)
class Interleave:
    """How CPT interleaving splits a row into text and speech spans."""

    sampling_rate: int = 16000
    downsampling_ratio: int = 320
    mean_seq_len_tokens: float = 39.43
    binom_prob: float = 0.1


def deduplicate_runs(units: np.ndarray) -> np.ndarray:
    """Drop consecutive repeats: [5, 5, 7, 5] -> [5, 7, 5]."""
    units = np.asarray(units)
    if units.size == 0:
        return units
    keep = np.empty(units.shape, dtype=bool)
    keep[0] = True
    np.not_equal(units[1:], units[:-1], out=keep[1:])
    return units[keep]


def dsu_frames(start: float, end: float, sampling_rate: int, downsampling_ratio: int) -> tuple[int, int]:
    """Frame range [lo, hi) covering the time span; same float expression as the reference."""
    return int(start * sampling_rate / downsampling_ratio), int(np.ceil(end * sampling_rate / downsampling_ratio))


class SampleBuilder:
    """Builds CPT and SFT sequences for one tokenizer and one set of options."""

    def __init__(self, tokenizer: Tokenizer, *, deduplicate: bool, modality_tokens: bool, max_seq_len: int | None):
        if modality_tokens and not tokenizer.has_modality_tokens:
            raise ValueError(f"{tokenizer.path}: modality tokens asked for, but the tokenizer has none")
        self.tok = tokenizer
        self.deduplicate = deduplicate
        self.modality_tokens = modality_tokens
        self.max_seq_len = max_seq_len
        self.space = self._ids(tokenizer.encode(" "))
        # Fixed pieces of the chat format, tokenized once.
        self._user_header = self._ids(tokenizer.header("user"))
        self._assistant_header = self._ids(tokenizer.header("assistant"))
        self._eot, self._eos = self._ids([tokenizer.eot_id]), self._ids([tokenizer.eos_id])
        self._sft_prefixes: dict[str, np.ndarray] = {}

    @staticmethod
    def _ids(ids) -> np.ndarray:
        return np.asarray(ids, dtype=np.int64)

    def _sft_prefix(self, system_prompt: str) -> np.ndarray:
        """`<|begin_of_text|>` and the system message (masked in every mode)."""
        if system_prompt not in self._sft_prefixes:
            self._sft_prefixes[system_prompt] = self._ids([self.tok.bos_id, *self.tok.message("system", system_prompt)])
        return self._sft_prefixes[system_prompt]

    # -- pieces ------------------------------------------------------------------------------

    def _text(self, text: str) -> np.ndarray:
        return self._ids(self.tok.encode(text))

    def _dsus(self, units) -> np.ndarray:
        units = np.asarray(units, dtype=np.int64)
        return self.tok.dsu_ids(deduplicate_runs(units) if self.deduplicate else units)

    def _text_span(self, words: list[str], first: bool) -> list[np.ndarray]:
        # Reference string: "\ue001 w1 w2" (modality) or "w1 w2", joined to the previous span by " ".
        # The join space before a modality character is a token of its own; before a word it
        # merges into the word's first token.
        text = " ".join(words)
        if self.modality_tokens:
            return ([] if first else [self.space]) + [np.array([self.tok.text_id]), self._text(" " + text)]
        return [self._text(text if first else " " + text)]

    def _speech_span(self, units, first: bool) -> list[np.ndarray]:
        # Reference string: "\ue000 <dsus>" or "<dsus>": every DSU is a piece of its own, so a
        # space before one is always a lone space token.
        head = [] if first else [self.space]
        if self.modality_tokens:
            head += [np.array([self.tok.speech_id]), self.space]
        return head + [self._dsus(units)]

    def _cpt(self, parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.concatenate([[self.tok.bos_id], *parts, [self.tok.eos_id]]).astype(np.int64)
        if self.max_seq_len is not None:
            # The reference truncates CPT sequences to max_seq_len - 1, keeping no end token.
            tokens = tokens[: self.max_seq_len - 1]
        return tokens, tokens.copy()

    # -- sequences ---------------------------------------------------------------------------

    def cpt_concatenated(self, row: dict, text_first: bool) -> tuple[np.ndarray, np.ndarray]:
        text = self._text_span(row["tokenized"], first=text_first)
        speech = self._speech_span(row["speech_tokens"], first=not text_first)
        return self._cpt(text + speech if text_first else speech + text)

    def cpt_interleaved(
        self, row: dict, index: int, epoch: int, settings: Interleave = Interleave(), seed: int = SEED
    ) -> tuple[np.ndarray, np.ndarray]:
        words = row["tokenized"]
        rng = np.random.default_rng((seed, epoch, index))
        start_with_text = bool(rng.choice([True, False], p=[0.5, 0.5]))
        lengths = np.maximum(rng.binomial(int(settings.mean_seq_len_tokens), settings.binom_prob, size=len(words)), 1)
        ends = np.cumsum(lengths)
        bounds = [0, *ends[ends < len(words)].tolist(), len(words)]

        starts, finishes = row["aligned_token_start_time"], row["aligned_token_end_time"]
        units = row["speech_tokens"]
        parts: list[np.ndarray] = []
        for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            is_text = (k % 2 == 0) == start_with_text
            if is_text:
                parts += self._text_span(words[lo:hi], first=k == 0)
            else:
                f_lo, f_hi = dsu_frames(starts[lo], finishes[hi - 1], settings.sampling_rate, settings.downsampling_ratio)
                parts += self._speech_span(units[f_lo:f_hi], first=k == 0)
        return self._cpt(parts)

    def sft_asr(
        self, row: dict, system_prompt: str, train_on_input: bool, inference: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Llama 3 chat: system prompt, user = the utterance's DSUs, assistant = its transcript.

        Masking follows the reference (torchtune): the begin token and the system message are
        always masked, the user message unless `train_on_input`, the assistant message never;
        the final end-of-text token is masked. `inference` stops after the assistant header.
        """
        tok = self.tok
        user = self._dsus(row["speech_tokens"])
        if self.modality_tokens:
            user = np.concatenate([[tok.speech_id], user, [tok.text_id]])
        segments = [
            (self._sft_prefix(system_prompt), True),
            (self._user_header, not train_on_input),
            (user, not train_on_input),
            (self._eot, not train_on_input),
            (self._assistant_header, False),
        ]
        if not inference:
            segments += [(self._text(row["transcript"].strip()), False), (self._eot, False), (self._eos, True)]

        tokens = np.concatenate([s for s, _ in segments])
        masked = np.repeat([m for _, m in segments], [len(s) for s, _ in segments])
        if self.max_seq_len is not None and len(tokens) > self.max_seq_len:
            # torchtune's rule: cut, and when the sequence carries end tokens force the last to eos.
            tokens, masked = tokens[: self.max_seq_len].copy(), masked[: self.max_seq_len].copy()
            if not inference:
                tokens[-1], masked[-1] = tok.eos_id, True
        return tokens, np.where(masked, IGNORE, tokens)

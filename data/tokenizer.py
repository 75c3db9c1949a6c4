"""The Llama 3 tiktoken tokenizer, base or extended with discrete speech units (DSUs).

File format (`tokenizer.model`): one line per BPE rank, `base64(token bytes) rank`, ranks 0..V-1.
The 256 Llama 3 special tokens are not in the file; they take ids V..V+255. Extension appends
DSU characters (and optionally the two modality characters) as new ranks, so the special tokens
move up behind them. See DESIGN.md, "Token layout".
"""

import base64
import os
from functools import cached_property

import numpy as np
import tiktoken

DSU_BASE = 0xF0000  # DSU i is chr(DSU_BASE + i): Supplementary Private Use Area-A
MAX_DSUS = 65534  # U+F0000 .. U+FFFFD
MODALITY_SPEECH = "\ue000"
MODALITY_TEXT = "\ue001"

LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
    "<|video|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 245)]
assert len(LLAMA3_SPECIAL_TOKENS) == 256

# Llama 3's pre-tokenization pattern with private-use characters (\p{Co}) taken out of the
# letter-prefix and punctuation classes and matched alone, so that every DSU and modality
# character is a piece of its own and therefore exactly one token.
PUA_AWARE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}\p{Co}]?\p{L}+"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}\p{Co}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
    r"|\p{Co}"
)


def dsu_char(unit: int) -> str:
    return chr(DSU_BASE + unit)


class TokenizerFileError(ValueError):
    pass


def read_bpe_file(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken BPE file, checking that ranks are unique and contiguous from 0."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token_b64, rank_str = line.split()
                token, rank = base64.b64decode(token_b64, validate=True), int(rank_str)
            except ValueError as e:
                raise TokenizerFileError(f"{path}:{lineno}: not a 'base64 rank' line ({e})") from None
            if rank != len(ranks) or token in ranks:
                raise TokenizerFileError(
                    f"{path}:{lineno}: rank {rank} breaks the contiguous 0..V-1 layout "
                    f"(expected {len(ranks)}, or the token is repeated)"
                )
            ranks[token] = rank
    if not ranks:
        raise TokenizerFileError(f"{path}: empty tokenizer file")
    return ranks


def bpe_lines(tokens: list[bytes], first_rank: int) -> bytes:
    """Lines to append to a tiktoken BPE file for `tokens`, starting at `first_rank`."""
    return b"".join(base64.b64encode(t) + b" %d\n" % (first_rank + i) for i, t in enumerate(tokens))


def extension_tokens(n_dsus: int, modality_tokens: bool) -> list[bytes]:
    """The tokens extension appends, in rank order: DSUs 0..N-1, then text and speech modality."""
    if not 1 <= n_dsus <= MAX_DSUS:
        raise ValueError(f"n_dsus must be in 1..{MAX_DSUS} (the private-use range), got {n_dsus}")
    tokens = [dsu_char(i).encode() for i in range(n_dsus)]
    return tokens + ([MODALITY_TEXT.encode(), MODALITY_SPEECH.encode()] if modality_tokens else [])


def extended_tokenizer_bytes(base: bytes, n_base_ranks: int, n_dsus: int, modality_tokens: bool) -> bytes:
    """An extended tokenizer file: the base file's bytes unchanged, then the new ranks."""
    if base and not base.endswith(b"\n"):
        base += b"\n"
    return base + bpe_lines(extension_tokens(n_dsus, modality_tokens), n_base_ranks)


class Tokenizer:
    """A Llama 3 tokenizer file, with its DSU and modality tokens when it has been extended."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        ranks = read_bpe_file(path)
        self.n_file_tokens = len(ranks)
        self.special_ids = {t: self.n_file_tokens + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.vocab_size = self.n_file_tokens + len(LLAMA3_SPECIAL_TOKENS)
        self.bos_id = self.special_ids["<|begin_of_text|>"]
        self.eos_id = self.special_ids["<|end_of_text|>"]
        self.eot_id = self.special_ids["<|eot_id|>"]
        self.pad_id = self.special_ids["<|finetune_right_pad_id|>"]  # right padding of batches
        self.start_header_id = self.special_ids["<|start_header_id|>"]
        self.end_header_id = self.special_ids["<|end_header_id|>"]

        # DSUs are a contiguous block of ranks starting at DSU 0.
        self.dsu_offset = ranks.get(dsu_char(0).encode())
        self.n_dsus = 0
        if self.dsu_offset is not None:
            while (
                self.n_dsus < MAX_DSUS
                and ranks.get(dsu_char(self.n_dsus).encode()) == self.dsu_offset + self.n_dsus
            ):
                self.n_dsus += 1
        self.speech_id = ranks.get(MODALITY_SPEECH.encode())
        self.text_id = ranks.get(MODALITY_TEXT.encode())

        self._encoding = tiktoken.Encoding(
            name=os.path.basename(self.path),
            pat_str=PUA_AWARE_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_ids,
        )

    @property
    def has_modality_tokens(self) -> bool:
        return self.speech_id is not None and self.text_id is not None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Tokenize plain text; special-token strings in it are treated as text, never as control tokens."""
        ids = self._encoding.encode_ordinary(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def dsu_ids(self, units) -> np.ndarray:
        """Token ids of DSU indices (no range check here; data loading validates them)."""
        if self.dsu_offset is None:
            raise ValueError(f"{self.path}: tokenizer has no DSU tokens (was it extended?)")
        return np.asarray(units, dtype=np.int64) + self.dsu_offset

    @cached_property
    def _is_special(self) -> np.ndarray:
        mask = np.zeros(self.vocab_size, dtype=bool)
        mask[self.n_file_tokens :] = True
        return mask

    def decode(self, ids, keep_special: bool = True) -> str:
        """Text of `ids`; DSU and modality tokens come back as their private-use characters."""
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        if not keep_special:
            ids = [i for i in ids if not self._is_special[i]]
        return self._encoding.decode(ids, errors="replace")

    def units(self, ids) -> list[int]:
        """DSU indices of the DSU tokens in `ids`, in order; other tokens are skipped."""
        if self.dsu_offset is None:
            return []
        arr = np.asarray(list(ids), dtype=np.int64) - self.dsu_offset
        return arr[(arr >= 0) & (arr < self.n_dsus)].tolist()

    def header(self, role: str) -> list[int]:
        """`<|start_header_id|>role<|end_header_id|>\\n\\n`, the Llama 3 chat message header."""
        return [self.start_header_id, *self.encode(role), self.end_header_id, *self.encode("\n\n")]

    def message(self, role: str, content: str | list[int], end: bool = True) -> list[int]:
        """One Llama 3 chat message: header, stripped content, `<|eot_id|>` when `end`."""
        body = self.encode(content.strip()) if isinstance(content, str) else list(content)
        return self.header(role) + body + ([self.eot_id] if end else [])

"""The Llama 3 tiktoken tokenizer, base or extended with discrete speech units (DSUs).

File format (`tokenizer.model`): one line per BPE rank, `base64(token bytes) rank`, ranks 0..V-1.
The 256 Llama 3 special tokens are not in the file; they take ids V..V+255. Extension appends
DSU characters (and optionally the two modality characters) as new ranks, so the special tokens
move up behind them. See docs/DESIGN.md, "Token layout".

A speech BPE (optional, `extend.py --dsu-bpe M`) adds M merged-unit tokens after the modality
tokens: the sentencepiece model `dsu_bpe.model` and its settings `dsu_bpe.json` sit beside
`tokenizer.model`, which holds each merged token as the string of its units. `Tokenizer` loads
them when they are there and then encodes speech with the BPE (`speech_ids`).
"""

import base64
import os
from functools import cached_property

import numpy as np
import tiktoken

from files import NotRegularFile, read_json, regular_file

DSU_BASE = 0xF0000  # DSU i is chr(DSU_BASE + i): Supplementary Private Use Area-A
MAX_DSUS = 65534  # U+F0000 .. U+FFFFD
MODALITY_SPEECH = "\ue000"
MODALITY_TEXT = "\ue001"
DSU_BPE_MODEL = "dsu_bpe.model"  # beside tokenizer.model
DSU_BPE_SETTINGS = "dsu_bpe.json"

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


class TokenizerSettingsError(ValueError):
    """Data settings that disagree with what the extended model's tokenizer holds."""


def read_bpe_file(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken BPE file, checking that ranks are unique and contiguous from 0."""
    ranks: dict[bytes, int] = {}
    try:
        f = open(regular_file(path), "rb")  # checked first: opening a FIFO would block
    except NotRegularFile as e:
        raise TokenizerFileError(str(e)) from None
    except OSError as e:
        raise TokenizerFileError(f"{path}: cannot be read ({e.strerror})") from None
    with f:
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


def units_text(units) -> str:
    """DSU indices as one string of their private-use characters: what the speech BPE reads."""
    return (np.asarray(units, dtype=np.int64) + DSU_BASE).astype("<u4").tobytes().decode("utf-32-le")


def dsu_bpe_files(directory: str | os.PathLike) -> list[str]:
    """The speech-BPE files present in `directory` (an extended model's `original/`)."""
    return [name for name in (DSU_BPE_MODEL, DSU_BPE_SETTINGS) if os.path.isfile(os.path.join(directory, name))]


class DsuBpe:
    """A sentencepiece BPE over DSU sequences (`extend.py --dsu-bpe`), checked against its settings.

    Piece 0 is sentencepiece's unknown piece; every other piece is a string of DSU characters:
    each of the n_dsus units alone, and `merges` merged pieces, in piece order, which become the
    merged-unit tokens. `deduplicate`: the BPE was learnt from sequences without repeats, so the
    sequences it encodes must be deduplicated too.
    """

    def __init__(self, model: bytes, settings: dict, where: str):
        import sentencepiece  # imported here: only models with a speech BPE need it

        if "deduplicate" not in settings and "deduplicated" in settings:  # its name in models extended before 2026-12
            settings = {**settings, "deduplicate": settings["deduplicated"]}
        for key, kind in (("n_dsus", int), ("merges", int), ("deduplicate", bool)):
            if type(settings.get(key)) is not kind:
                raise TokenizerFileError(f"{where}: {DSU_BPE_SETTINGS} field '{key}' must be {kind.__name__}, "
                                         f"got {settings.get(key)!r}")
        self.n_dsus, self.deduplicate = settings["n_dsus"], settings["deduplicate"]
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=model)
        except RuntimeError as e:
            raise TokenizerFileError(f"{where}: not a sentencepiece model ({e})") from None
        self._piece_units, singles, self.merged = [np.zeros(0, dtype=np.int64)], set(), []
        for i in range(1, self._sp.get_piece_size()):
            piece = self._sp.id_to_piece(i)
            units = np.frombuffer(piece.encode("utf-32-le"), dtype="<u4").astype(np.int64) - DSU_BASE
            if not piece or units.min() < 0 or units.max() >= self.n_dsus:
                raise TokenizerFileError(f"{where}: piece {i} {piece!r} is not a string of DSUs 0..{self.n_dsus - 1} "
                                         f"(the BPE does not match n_dsus={self.n_dsus})")
            self._piece_units.append(units)
            if len(units) == 1:
                singles.add(int(units[0]))
            else:
                self.merged.append(piece)
        if not self._sp.is_unknown(0) or len(singles) != self.n_dsus or len(self.merged) != settings["merges"]:
            raise TokenizerFileError(
                f"{where}: expected the unknown piece, the {self.n_dsus} DSUs and {settings['merges']} merged pieces "
                f"({DSU_BPE_SETTINGS}), found {len(singles)} DSUs and {len(self.merged)} merged pieces")

    @classmethod
    def load(cls, directory: str) -> "DsuBpe":
        where = os.path.join(directory, DSU_BPE_MODEL)
        try:
            settings = read_json(os.path.join(directory, DSU_BPE_SETTINGS))
            model = regular_file(where).read_bytes()
        except (OSError, ValueError) as e:  # NotRegularFile and JsonFileError are ValueErrors
            raise TokenizerFileError(f"{where}: cannot read the speech BPE or its {DSU_BPE_SETTINGS} ({e})") from None
        return cls(model, settings, where)

    def token_table(self, dsu_offset: int, merged_offset: int) -> np.ndarray:
        """Token id of every piece id: DSU pieces map to their DSU tokens, merged pieces to theirs in
        order; the unknown piece to -1."""
        table = np.full(len(self._piece_units), -1, dtype=np.int64)
        merged = 0
        for i, units in enumerate(self._piece_units[1:], 1):
            table[i] = dsu_offset + units[0] if len(units) == 1 else merged_offset + merged
            merged += len(units) > 1
        return table

    def encode(self, units) -> list[int]:
        """Piece ids of a DSU sequence."""
        return self._sp.encode(units_text(units))


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
        self.dsu_bpe, self.merged_offset, self.n_merged = None, None, 0
        self._load_dsu_bpe(ranks)

        self._encoding = tiktoken.Encoding(
            name=os.path.basename(self.path),
            pat_str=PUA_AWARE_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_ids,
        )

    def _load_dsu_bpe(self, ranks: dict[bytes, int]) -> None:
        """The speech BPE beside the file, whose merged pieces must be the file's last ranks, right
        after the DSUs and modality tokens; without one, the file must hold no merged tokens."""
        directory = os.path.dirname(self.path)
        has_bpe = os.path.isfile(os.path.join(directory, DSU_BPE_MODEL))
        if self.dsu_offset is None:
            if has_bpe:
                raise TokenizerFileError(f"{self.path}: has no DSU tokens, but a {DSU_BPE_MODEL} sits beside it")
            return
        ends = [self.dsu_offset + self.n_dsus - 1] + [i for i in (self.speech_id, self.text_id) if i is not None]
        self.merged_offset = max(ends) + 1
        tail = sorted((rank, token) for token, rank in ranks.items() if rank >= self.merged_offset)
        if not has_bpe:
            for rank, token in tail:
                text = token.decode("utf-8", errors="replace")
                if len(text) > 1 and all(DSU_BASE <= ord(c) < DSU_BASE + MAX_DSUS for c in text):
                    raise TokenizerFileError(f"{self.path}: rank {rank} is a merged DSU token, but there is no "
                                             f"{DSU_BPE_MODEL} beside the file to encode speech with")
            return
        bpe = DsuBpe.load(directory)
        if bpe.n_dsus != self.n_dsus:
            raise TokenizerFileError(f"{os.path.join(directory, DSU_BPE_MODEL)}: learnt over {bpe.n_dsus} DSUs, "
                                     f"but {self.path} has {self.n_dsus}")
        if [token for _, token in tail] != [piece.encode() for piece in bpe.merged]:
            raise TokenizerFileError(f"{self.path}: ranks {self.merged_offset}.. are not the {len(bpe.merged)} "
                                     f"merged pieces of {DSU_BPE_MODEL}, in its order")
        self.dsu_bpe, self.n_merged = bpe, len(bpe.merged)
        self._bpe_tokens = bpe.token_table(self.dsu_offset, self.merged_offset)

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

    def speech_ids(self, units) -> np.ndarray:
        """Token ids of a DSU sequence: merged by the speech BPE when there is one, else one per
        unit. Deduplicate before, as the BPE was learnt (`settings_problems`)."""
        if self.dsu_bpe is None:
            return self.dsu_ids(units)
        ids = self._bpe_tokens[self.dsu_bpe.encode(units)]
        if ids.size and ids.min() < 0:
            raise ValueError(f"{self.path}: DSUs outside 0..{self.n_dsus - 1} in {list(units)[:20]}...")
        return ids

    def is_speech(self, ids):
        """Mask of the DSU and merged-unit tokens in `ids` (a NumPy array or a torch tensor)."""
        mask = (ids >= self.dsu_offset) & (ids < self.dsu_offset + self.n_dsus)
        if self.n_merged:
            mask = mask | ((ids >= self.merged_offset) & (ids < self.merged_offset + self.n_merged))
        return mask

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
        """DSU indices of the DSU tokens in `ids`, in order, merged-unit tokens spelt out as their
        units; other tokens are skipped."""
        if self.dsu_offset is None:
            return []
        arr = np.asarray(list(ids), dtype=np.int64)
        if self.dsu_bpe is not None:
            arr = arr[self.is_speech(arr)]
            merged = arr >= self.merged_offset  # the merged block lies above the DSU block
            pieces = self._merged_units
            return [u for i, m in zip(arr.tolist(), merged.tolist())
                    for u in (pieces[i - self.merged_offset] if m else (i - self.dsu_offset,))]
        arr = arr - self.dsu_offset
        return arr[(arr >= 0) & (arr < self.n_dsus)].tolist()

    @cached_property
    def _merged_units(self) -> list[list[int]]:
        return [[ord(c) - DSU_BASE for c in piece] for piece in self.dsu_bpe.merged]

    def header(self, role: str) -> list[int]:
        """`<|start_header_id|>role<|end_header_id|>\\n\\n`, the Llama 3 chat message header."""
        return [self.start_header_id, *self.encode(role), self.end_header_id, *self.encode("\n\n")]

    def message(self, role: str, content: str | list[int], end: bool = True) -> list[int]:
        """One Llama 3 chat message: header, stripped content, `<|eot_id|>` when `end`."""
        body = self.encode(content.strip()) if isinstance(content, str) else list(content)
        return self.header(role) + body + ([self.eot_id] if end else [])


def settings_problems(tok: "Tokenizer", n_dsus: int, modality_tokens: bool, deduplicate: bool) -> list[str]:
    """Why sequences built with these settings cannot use this tokenizer (empty: they can)."""
    problems = []
    if n_dsus != tok.n_dsus:
        problems.append(f"the tokenizer has {tok.n_dsus} DSUs but data.n_dsus is {n_dsus}")
    if modality_tokens and not tok.has_modality_tokens:
        problems.append("data.modality_tokens is true but the tokenizer has no modality tokens")
    if tok.dsu_bpe is not None and tok.dsu_bpe.deduplicate != deduplicate:
        learnt = "deduplicated" if tok.dsu_bpe.deduplicate else "raw (repeats kept)"
        problems.append(f"the speech BPE beside {tok.path} was learnt from {learnt} units, but data.deduplicate is "
                        f"{str(deduplicate).lower()} (leave data.deduplicate unset to follow the model)")
    return problems


def fill_from_tokenizer(data: dict, tok: "Tokenizer") -> dict:
    """`data` (a config's data section) with the settings the extended model's tokenizer holds
    filled in where the user left them None: n_dsus; modality tokens (on when the tokenizer has
    them); deduplication (as its speech BPE was learnt, else on, the reference's default). Values
    given are checked against the tokenizer: a ValueError lists every disagreement."""
    if data["n_dsus"] is None:
        data["n_dsus"] = tok.n_dsus
    if data["modality_tokens"] is None:
        data["modality_tokens"] = tok.has_modality_tokens
    if data["deduplicate"] is None:
        data["deduplicate"] = tok.dsu_bpe.deduplicate if tok.dsu_bpe is not None else True
    problems = settings_problems(tok, data["n_dsus"], data["modality_tokens"], data["deduplicate"])
    if problems:
        raise TokenizerSettingsError("; ".join(problems))
    return data

"""Token layout and sequence construction: identical to the reference implementation.

The golden file pins the reference's output for N=5000 with modality tokens; for other N and
with modality tokens off, the token-level builders must equal the reference's string path.
"""

import hashlib

import numpy as np
import pytest

from data.samples import IGNORE, Interleave, SampleBuilder, deduplicate_runs, dsu_frames
from data.tokenizer import MODALITY_SPEECH, MODALITY_TEXT, dsu_char
from tests import reference_strings as ref


def interleave_settings(golden) -> Interleave:
    c = golden["cpt_interleave"]
    return Interleave(c["sampling_rate"], c["downsampling_ratio"], c["mean_seq_len_tokens"], c["binom_prob"])


def test_extended_tokenizer_file_matches_reference(golden, extended_tokenizer):
    tok = extended_tokenizer(golden["n_dsus"], golden["use_modality_tokens"])
    data = open(tok.path, "rb").read()
    assert hashlib.sha256(data).hexdigest() == golden["extended_tokenizer_sha256"]
    lines = data.decode().splitlines()
    for line in golden["extended_tokenizer_tail"]:
        assert line in lines


def test_special_token_ids_move_behind_the_extension(golden, extended_tokenizer):
    tok = extended_tokenizer(5000, True)
    assert tok.special_ids == golden["special_token_ids"]
    assert (tok.n_dsus, tok.dsu_offset, tok.text_id, tok.speech_id) == (5000, 128000, 133000, 133001)
    assert tok.vocab_size == 133258


@pytest.mark.parametrize(
    "kind", ["cpt_interleaved", "cpt_concatenated_txt_dsu", "cpt_concatenated_dsu_txt", "sft"]
)
def test_golden_cases(golden, extended_tokenizer, kind):
    tok = extended_tokenizer(golden["n_dsus"], golden["use_modality_tokens"])
    cases = [c for c in golden["cases"] if c["kind"] == kind]
    assert cases
    for n, case in enumerate(cases):
        row = golden["samples"][case["sample"]]
        builder = SampleBuilder(
            tok, deduplicate=case["deduplicate"], modality_tokens=True, max_seq_len=golden["max_seq_len"]
        )
        if kind == "sft":
            tokens, labels = builder.sft_asr(row, golden["sft_system_prompt"], case["train_on_input"], case["inference"])
            assert labels.tolist() == case["labels"], f"{kind} case {n}: labels differ"
        elif kind == "cpt_interleaved":
            tokens, labels = builder.cpt_interleaved(row, case["sample"], case["epoch"], interleave_settings(golden))
            assert labels.tolist() == tokens.tolist()
        else:
            tokens, labels = builder.cpt_concatenated(row, text_first=kind.endswith("txt_dsu"))
        assert tokens.tolist() == case["tokens"], f"{kind} case {n} (sample {case['sample']}): tokens differ"


def random_rows(golden, n_rows: int, n_dsus: int, seed: int) -> list[dict]:
    """Rows with the golden samples' words, random alignments and DSUs, plus awkward ones."""
    rng = np.random.default_rng(seed)
    vocab = sorted({w for s in golden["samples"] for w in s["tokenized"]})
    rows = []
    for _ in range(n_rows):
        n_words = int(rng.integers(1, 60))
        gaps = rng.uniform(0.0, 0.3, size=2 * n_words)
        gaps[rng.random(2 * n_words) < 0.1] = 0.0  # zero-length words and gaps: empty DSU spans
        edges = np.cumsum(gaps)
        n_frames = int(np.ceil(edges[-1] * 50)) + 1
        runs = rng.integers(0, n_dsus, size=n_frames)
        units = np.repeat(runs, rng.integers(1, 4, size=n_frames))[:n_frames]  # repeated runs to dedup
        rows.append(
            {
                "tokenized": [vocab[i] for i in rng.integers(0, len(vocab), size=n_words)],
                "aligned_token_start_time": edges[0::2].tolist(),
                "aligned_token_end_time": edges[1::2].tolist(),
                "speech_tokens": units.tolist(),
            }
        )
    rows[0]["speech_tokens"] = [n_dsus - 1] * 7  # the largest DSU id, all duplicates
    rows[1]["tokenized"] = rows[1]["tokenized"][:1]
    rows[2]["tokenized"][:3] = ["two  spaces", "", " lead"]  # whitespace inside words: never cached
    for row in rows:
        row["transcript"] = " ".join(row["tokenized"])
    return rows


@pytest.mark.parametrize("n_dsus,modality_tokens", [(1024, True), (2048, False), (5000, False), (8192, True)])
def test_token_level_equals_string_path(golden, extended_tokenizer, n_dsus, modality_tokens):
    tok = extended_tokenizer(n_dsus, modality_tokens)
    assert tok.n_dsus == n_dsus and tok.has_modality_tokens == modality_tokens
    prompt = golden["sft_system_prompt"]
    for dedup in (True, False):
        builder = SampleBuilder(tok, deduplicate=dedup, modality_tokens=modality_tokens, max_seq_len=None)
        for i, row in enumerate(random_rows(golden, 40, n_dsus, seed=n_dsus)):
            for epoch in (0, 3):
                expected = ref.cpt_tokens(tok, ref.interleaved_string(row, i, epoch, dedup, modality_tokens), None)
                assert builder.cpt_interleaved(row, i, epoch)[0].tolist() == expected, (i, epoch, dedup)
            for text_first in (True, False):
                expected = ref.cpt_tokens(tok, ref.concatenated_string(row, text_first, dedup, modality_tokens), None)
                assert builder.cpt_concatenated(row, text_first)[0].tolist() == expected, (i, text_first, dedup)
            for inference in (True, False):
                expected = ref.sft_tokens(tok, row, prompt, dedup, modality_tokens, inference)
                assert builder.sft_asr(row, prompt, True, inference)[0].tolist() == expected, (i, inference, dedup)


def test_cpt_truncation_keeps_max_seq_len_minus_one(golden, extended_tokenizer):
    tok = extended_tokenizer(5000, True)
    row = golden["samples"][0]
    full, _ = SampleBuilder(tok, deduplicate=False, modality_tokens=True, max_seq_len=None).cpt_concatenated(row, True)
    cut, labels = SampleBuilder(tok, deduplicate=False, modality_tokens=True, max_seq_len=100).cpt_concatenated(row, True)
    assert len(full) > 100 and cut.tolist() == full[:99].tolist() and labels.tolist() == cut.tolist()


def test_sft_truncation_ends_with_eos_and_masks_it(golden, extended_tokenizer):
    tok = extended_tokenizer(5000, True)
    row = golden["samples"][0]
    tokens, labels = SampleBuilder(tok, deduplicate=False, modality_tokens=True, max_seq_len=64).sft_asr(
        row, "Transcribe.", train_on_input=True
    )
    assert len(tokens) == 64 and tokens[-1] == tok.eos_id and labels[-1] == IGNORE
    assert labels[0] == IGNORE and (labels[1:-1] != IGNORE).any()


def test_sft_labels_mask_only_the_answer_when_not_training_on_input(golden, extended_tokenizer):
    tok = extended_tokenizer(5000, True)
    row = golden["samples"][1]
    tokens, labels = SampleBuilder(tok, deduplicate=True, modality_tokens=True, max_seq_len=None).sft_asr(
        row, "Transcribe.", train_on_input=False
    )
    kept = tokens[labels != IGNORE].tolist()
    assert kept == tok.header("assistant") + tok.encode(row["transcript"]) + [tok.eot_id]


def test_modality_tokens_need_an_extended_tokenizer(extended_tokenizer):
    with pytest.raises(ValueError, match="modality tokens"):
        SampleBuilder(extended_tokenizer(1024, False), deduplicate=True, modality_tokens=True, max_seq_len=None)


def test_every_dsu_and_modality_character_is_one_token(extended_tokenizer):
    tok = extended_tokenizer(5000, True)
    units = [0, 17, 17, 4999, 3]
    text = f"hello{MODALITY_SPEECH} {''.join(dsu_char(u) for u in units)}world {MODALITY_TEXT}x"
    ids = tok.encode(text)
    assert tok.units(ids) == units
    assert ids.count(tok.speech_id) == 1 and ids.count(tok.text_id) == 1
    assert len([i for i in ids if tok.dsu_offset <= i < tok.dsu_offset + tok.n_dsus]) == len(units)
    assert tok.decode(ids) == text


def test_decode_keeps_or_drops_special_tokens_and_never_parses_them(extended_tokenizer):
    tok = extended_tokenizer(5000, True)
    ids = tok.message("assistant", "hi there")
    assert tok.decode(ids) == "<|start_header_id|>assistant<|end_header_id|>\n\nhi there<|eot_id|>"
    assert tok.decode(ids, keep_special=False) == "assistant\n\nhi there"
    assert tok.eot_id not in tok.encode("<|eot_id|>")


def test_deduplicate_runs_and_frame_spans():
    assert deduplicate_runs(np.array([5, 5, 7, 5, 5, 5])).tolist() == [5, 7, 5]
    assert deduplicate_runs(np.array([], dtype=np.int64)).tolist() == []
    assert dsu_frames(0.695, 1.131, 16000, 320) == (34, 57)
    assert dsu_frames(1.0, 1.0, 24000, 1920) == (12, 13)  # Mimi, 12.5 frames/s

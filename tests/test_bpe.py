"""Speech BPE (extend.py --dsu-bpe): lossless on the bundled corpus, the token layout, every
sequence kind encoded with it, training with packing and exact resume, transformers parity,
generation, and refusals of settings that do not fit together."""

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import config
import extend
import generate
import model_dir
import dsu_ops
import train
from data.dataset import load_rows
from data.samples import Interleave, SampleBuilder, deduplicate_runs
from tiny_model import make_tiny_model
from data.tokenizer import DSU_BPE_MODEL, DSU_BPE_SETTINGS, Tokenizer, TokenizerFileError, read_bpe_file
from model_dir import load_model
from tests import tiny
from tests.test_vllm import in_vllm_env, vllm_python

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "data" / "mini"
MINI_DSUS, MINI_MERGES = 128, 256
TINY_MERGES = 48
PROMPT = "Transcribe the speech."


def base_model(root: Path, hidden: int) -> Path:
    text = " ".join(" ".join(r["tokenized"]) for r in tiny.rows(400, seed=1, prefix="text"))
    return make_tiny_model(root / "base", text, vocab_size=300, hidden=hidden, layers=2 if hidden > 32 else 1,
                           heads=2, kv_heads=1, intermediate=2 * hidden, seed=0)


def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer(model_dir / "original" / "tokenizer.model")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """A tiny base extended by the bundled corpus's 128 DSUs: plain, with a BPE learnt from its
    deduplicated training units, and with one learnt from the raw units."""
    root = tmp_path_factory.mktemp("mini_bpe")
    base = base_model(root, hidden=32)
    data = MINI / "train.jsonl"
    return {
        "plain": extend.extend(base, MINI_DSUS, out_dir=root / "plain", seed=0),
        "bpe": extend.extend(base, MINI_DSUS, out_dir=root / "bpe", seed=0, dsu_bpe=MINI_MERGES, dsu_bpe_data=data),
        "raw": extend.extend(base, MINI_DSUS, out_dir=root / "raw", seed=0, dsu_bpe=MINI_MERGES, dsu_bpe_data=data,
                             deduplicate=False, dsu_bpe_init="mean"),
        "rows": {split: load_rows(str(MINI / f"{split}.jsonl")) for split in ("train", "dev", "test")},
    }


# -- lossless, and shorter -------------------------------------------------------------------------


def test_units_to_bpe_ids_to_units_is_exact_on_the_whole_bundled_corpus(mini):
    dedup, raw = tokenizer(mini["bpe"]), tokenizer(mini["raw"])
    n_units = n_ids = 0
    for rows in mini["rows"].values():
        for row in rows:
            units = deduplicate_runs(row["speech_tokens"])
            ids = dedup.speech_ids(units)
            assert dedup.is_speech(ids).all()
            assert dedup.units(ids) == units.tolist(), row["id"]
            assert raw.units(raw.speech_ids(row["speech_tokens"])) == row["speech_tokens"].tolist(), row["id"]
            n_units, n_ids = n_units + len(units), n_ids + len(ids)
    assert n_units / n_ids > 1.5  # 256 merges make the corpus's deduplicated units ~1.8x shorter


def test_layout_appends_the_merged_tokens_after_the_modality_tokens(mini):
    plain, bpe = tokenizer(mini["plain"]), tokenizer(mini["bpe"])
    settings = json.loads((mini["bpe"] / "original" / DSU_BPE_SETTINGS).read_text())
    assert (settings["n_dsus"], settings["merges"], settings["deduplicate"]) == (MINI_DSUS, MINI_MERGES, True)
    assert bpe.dsu_offset == plain.dsu_offset and (bpe.text_id, bpe.speech_id) == (plain.text_id, plain.speech_id)
    assert bpe.merged_offset == plain.n_file_tokens and bpe.n_merged == MINI_MERGES
    assert bpe.bos_id == plain.bos_id + MINI_MERGES and bpe.vocab_size == plain.vocab_size + MINI_MERGES
    # The file is the plain extension's, byte for byte, then one rank per merged piece.
    plain_bytes = (mini["plain"] / "original" / "tokenizer.model").read_bytes()
    bpe_bytes = (mini["bpe"] / "original" / "tokenizer.model").read_bytes()
    assert bpe_bytes.startswith(plain_bytes)
    ranks = read_bpe_file(mini["bpe"] / "original" / "tokenizer.model")
    merged = sorted((rank, token.decode()) for token, rank in ranks.items() if rank >= bpe.merged_offset)
    assert [piece for _, piece in merged] == bpe.dsu_bpe.merged
    assert all(len(piece) > 1 for piece in bpe.dsu_bpe.merged)
    for key in ("vocab_size", "bos_token_id", "eos_token_id"):
        config = json.loads((mini["bpe"] / "config.json").read_text())
        assert config[key] == json.loads((mini["plain"] / "config.json").read_text())[key] + MINI_MERGES


def embeddings(model_dir: Path) -> torch.Tensor:
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        return f.get_tensor("model.embed_tokens.weight")


@pytest.mark.parametrize("init", ["gaussian", "mean"])
def test_embedding_rows_plain_rows_unchanged_merged_rows_new(mini, init):
    model = mini["bpe" if init == "gaussian" else "raw"]  # the default init, and --dsu-bpe-init mean
    plain, bpe = tokenizer(mini["plain"]), tokenizer(model)
    old, new = embeddings(mini["plain"]), embeddings(model)
    first = bpe.merged_offset
    assert torch.equal(new[:first], old[:first]) and torch.equal(new[first + MINI_MERGES :], old[first:])
    merged, dsus = new[first : first + MINI_MERGES], old[plain.dsu_offset : plain.dsu_offset + MINI_DSUS]
    if init == "mean":
        for k, piece in enumerate(bpe.dsu_bpe.merged):
            units = torch.tensor([plain.dsu_offset + ord(c) - 0xF0000 for c in piece])
            torch.testing.assert_close(merged[k], old[units].mean(0))
    else:  # drawn around the same mean as the DSU rows, with their spread, each row its own draw
        torch.testing.assert_close(merged.mean(0), dsus.mean(0), atol=4 * dsus.std(0).max().item(), rtol=0)
        assert 0.5 < merged.std(0).mean() / dsus.std(0).mean() < 2
        assert len(torch.unique(merged, dim=0)) == MINI_MERGES


def test_the_bpe_is_learnt_the_same_way_every_time(mini, tmp_path):
    again = extend.extend(mini["plain"].parent / "base", MINI_DSUS, out_dir=tmp_path / "again", seed=0,
                          dsu_bpe=MINI_MERGES, dsu_bpe_data=MINI / "train.jsonl")
    for name in ("tokenizer.model", DSU_BPE_MODEL):
        assert (again / "original" / name).read_bytes() == (mini["bpe"] / "original" / name).read_bytes()


# -- every sequence kind -----------------------------------------------------------------------------


def strip_speech(tok: Tokenizer, tokens) -> str:
    """The text and special tokens of a sequence (or its trained labels), speech left out."""
    return tok.decode([t for t in tokens if t != -100 and not tok.is_speech(t)])


@pytest.mark.parametrize("kind", ["sft", "sft_inference", "interleaved", "dsu_txt", "txt_dsu"])
def test_every_speech_span_is_encoded_and_the_rest_is_unchanged(mini, kind):
    plain_tok, bpe_tok = tokenizer(mini["plain"]), tokenizer(mini["bpe"])
    settings = Interleave(16000, 320, 8.0, 0.3)  # short spans: many speech spans per row
    n_plain = n_bpe = 0
    for index, row in enumerate(mini["rows"]["dev"][:40]):
        sequences = []
        for tok in (plain_tok, bpe_tok):
            builder = SampleBuilder(tok, deduplicate=True, modality_tokens=True, max_seq_len=None)
            if kind.startswith("sft"):
                pieces = builder.sft_asr_pieces(row, PROMPT, train_on_input=False, inference=kind == "sft_inference")
            elif kind == "interleaved":
                pieces = builder.cpt_interleaved_pieces(row, index, 3, settings)
            else:
                pieces = builder.cpt_concatenated_pieces(row, text_first=kind == "txt_dsu")
            tokens, labels = builder.assemble(pieces)
            # The ops build the same sequence from the same pieces, packed or flat.
            packed = dsu_ops.pack([[pieces]], tok.dsu_offset, True, len(tokens) + 1, 0)
            assert packed.tokens[0, : len(tokens)].tolist() == tokens.tolist()
            sequences.append((tok, tokens, labels))
        (_, plain, plain_labels), (_, bpe, bpe_labels) = sequences
        assert bpe_tok.units(bpe) == plain_tok.units(plain)  # the same units (spans deduplicated alone)
        assert strip_speech(bpe_tok, bpe) == strip_speech(plain_tok, plain)  # the same text and specials
        assert strip_speech(bpe_tok, bpe_labels) == strip_speech(plain_tok, plain_labels)
        n_plain, n_bpe = n_plain + int(plain_tok.is_speech(plain).sum()), n_bpe + int(bpe_tok.is_speech(bpe).sum())
    assert n_bpe < n_plain


def test_sft_masks_the_whole_encoded_prompt(mini):
    tok = tokenizer(mini["bpe"])
    builder = SampleBuilder(tok, deduplicate=True, modality_tokens=True, max_seq_len=None)
    tokens, labels = builder.sft_asr(mini["rows"]["test"][0], PROMPT, train_on_input=False)
    assert (labels[tok.is_speech(tokens)] == -100).all()
    tokens, labels = builder.sft_asr(mini["rows"]["test"][0], PROMPT, train_on_input=True)
    assert (labels[tok.is_speech(tokens)] == tokens[tok.is_speech(tokens)]).all()


# -- training, resume, transformers, generation --------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bpe(tmp_path_factory):
    """The training tests' tiny model (tests/tiny.py) with a BPE of 48 merges learnt from its training rows."""
    root = tmp_path_factory.mktemp("tiny_bpe")
    train_file = tiny.write_jsonl(root / "train.jsonl", tiny.rows(64, seed=2, prefix="train"))
    model = extend.extend(base_model(root, hidden=64), tiny.N_DSUS, out_dir=root / "extended", seed=0,
                          dsu_bpe=TINY_MERGES,
                          dsu_bpe_data=train_file)
    return {"root": root, "model": model, "train": train_file}


def sft_args(assets, run_dir: Path, *overrides: str) -> list[str]:
    return [str(ROOT / "configs" / "tiny_sft.json"), f"run_dir={run_dir}", f"model.path={assets['model']}",
            f"data.train={assets['train']}", f"data.n_dsus={tiny.N_DSUS}", f"data.sft.system_prompt={PROMPT}",
            "data.packed=true", "data.max_seq_len=256", "train.max_steps=8", "train.save_steps=4",
            "train.eval_steps=100", "train.log_steps=1", *overrides]


def step_losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_packed_training_resumes_exactly_and_loads_in_transformers(tiny_bpe, tmp_path):
    from transformers import LlamaForCausalLM

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert train.main(sft_args(tiny_bpe, reference)) == 0
    step_4, step_8 = (reference / "checkpoints" / f"step_{s:07d}" for s in (4, 8))
    assert train.main(sft_args(tiny_bpe, resumed, f"resume={step_4}")) == 0
    assert step_losses(resumed) == {s: v for s, v in step_losses(reference).items() if s > 4}
    with safe_open(step_8 / "model.safetensors", "pt") as a, \
            safe_open(resumed / "checkpoints" / "step_0000008" / "model.safetensors", "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert all(r["dsu_tokens"] > 0 for r in records if "dsu_tokens" in r)  # merged tokens count as speech

    for name in (DSU_BPE_MODEL, DSU_BPE_SETTINGS):  # the checkpoint carries the BPE
        assert (step_8 / "original" / name).read_bytes() == (tiny_bpe["model"] / "original" / name).read_bytes()
    tok = tokenizer(step_8)
    row = load_rows(str(tiny_bpe["train"]))[0]
    builder = SampleBuilder(tok, deduplicate=True, modality_tokens=True, max_seq_len=None)
    tokens = torch.tensor(builder.sft_asr(row, PROMPT, train_on_input=False)[0])[None]
    assert (tokens >= tok.merged_offset).logical_and(tokens < tok.merged_offset + tok.n_merged).any()
    ours = load_model(step_8, dtype=torch.float32).eval()
    hf = LlamaForCausalLM.from_pretrained(step_8, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours.logits(ours(tokens)), atol=1e-4, rtol=0)


def test_cpt_interleaved_training_runs_with_the_bpe(tiny_bpe, tmp_path):
    args = sft_args(tiny_bpe, tmp_path / "cpt", "train.max_steps=2")
    args[0] = str(ROOT / "configs" / "tiny_cpt.json")
    assert train.main(args + ["data.max_seq_len=128"]) == 0


@pytest.fixture(scope="module")
def memorised(tiny_bpe, tmp_path_factory):
    """A run of the BPE model that memorised 8 utterances: (checkpoint, data file, rows)."""
    root = tmp_path_factory.mktemp("memorised")
    rng = random.Random(0)
    rows = [{"id": f"utt{i}", "transcript": " ".join(rng.choice(tiny.WORDS) for _ in range(3)),
             "speech_tokens": [rng.randrange(tiny.N_DSUS) for _ in range(rng.randint(10, 16))]} for i in range(8)]
    data = tiny.write_jsonl(root / "asr.jsonl", rows)
    run = root / "run"
    status = train.main([
        str(ROOT / "configs" / "tiny_sft.json"), f"run_dir={run}", f"model.path={tiny_bpe['model']}",
        f"data.train={data}", f"data.n_dsus={tiny.N_DSUS}", f"data.sft.system_prompt={PROMPT}", "optim.lr=1e-2",
        "train.batch_size=8", "train.grad_accum=1", "train.max_steps=120", "train.save_steps=120",
        "train.eval_steps=120",
    ])
    assert status == 0
    return run / "checkpoints" / "step_0000120", data, rows


def generations(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]


def test_a_memorised_run_transcribes_with_the_built_in_engine(memorised, tmp_path):
    checkpoint, data, rows = memorised
    out = tmp_path / "gen"
    assert generate.main([str(checkpoint), "--data", str(data), "--out", str(out), "--backend", "torch",
                          "--max-tokens", "16"]) == 0
    records = generations(out)
    builder = SampleBuilder(tokenizer(checkpoint), deduplicate=True, modality_tokens=True, max_seq_len=None)
    prompts = [builder.sft_asr(row, PROMPT, train_on_input=False, inference=True)[0] for row in rows]
    assert [r["prompt_len"] for r in records] == [len(p) for p in prompts]
    assert [r["text"] for r in records] == [r["transcript"] for r in rows]


@pytest.mark.skipif(vllm_python()[0] is None, reason=vllm_python()[1])
def test_vllm_generates_what_the_built_in_engine_does_with_the_bpe(memorised, tmp_path):
    checkpoint, data, _ = memorised
    common = [str(checkpoint), "--data", str(data), "--max-tokens", "16"]
    assert generate.main(common + ["--backend", "torch", "--out", str(tmp_path / "torch")]) == 0
    in_vllm_env(["generate.py", *common, "--backend", "vllm", "--enforce-eager", "--out", str(tmp_path / "vllm")])
    ours, theirs = generations(tmp_path / "torch"), generations(tmp_path / "vllm")
    assert [(r["token_ids"], r["text"]) for r in theirs] == [(r["token_ids"], r["text"]) for r in ours]


# -- refusals ------------------------------------------------------------------------------------


def test_training_without_the_deduplication_the_bpe_was_learnt_with_is_refused(tiny_bpe, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train.main(sft_args(tiny_bpe, run_dir, "data.deduplicate=false")) == 2
    assert "learnt from deduplicated units, but data.deduplicate is false" in capsys.readouterr().err
    assert not run_dir.exists()
    with pytest.raises(ValueError, match="learnt from deduplicated units"):
        SampleBuilder(tokenizer(tiny_bpe["model"]), deduplicate=False, modality_tokens=True, max_seq_len=None)


@pytest.mark.parametrize("kind, deduplicate", [("plain", True), ("bpe", True), ("raw", False)])
def test_deduplication_is_read_from_the_model(mini, kind, deduplicate):
    data = config.defaults()["data"]
    assert data["deduplicate"] is None
    model_dir.model_tokenizer(mini[kind], data)
    assert data["deduplicate"] is deduplicate


def test_a_raw_bpe_model_trains_without_being_told_and_records_it(mini, tmp_path):
    run_dir = tmp_path / "run"
    assert train.main([str(ROOT / "configs" / "tiny_sft.json"), f"run_dir={run_dir}", f"model.path={mini['raw']}",
                       f"data.train={MINI / 'train.jsonl'}", "train.max_steps=2", "train.save_steps=2",
                       "train.eval_steps=100"]) == 0
    recorded = json.loads(model_dir.training_config_path(model_dir.step_dir(run_dir, 2)).read_text())["data"]
    assert (recorded["deduplicate"], recorded["n_dsus"]) == (False, MINI_DSUS)


def test_a_model_extended_before_the_rename_keeps_its_deduplication(mini, tmp_path):
    """dsu_bpe.json called the setting `deduplicated` until 2026-12: such models load as they were."""
    old = tmp_path / "old"
    shutil.copytree(mini["raw"], old)
    settings_file = old / "original" / DSU_BPE_SETTINGS
    settings = json.loads(settings_file.read_text())
    settings["deduplicated"] = settings.pop("deduplicate")
    settings_file.write_text(json.dumps(settings))
    assert tokenizer(old).dsu_bpe.deduplicate is False


def test_no_deduplicate_without_a_bpe_is_refused(mini, tmp_path, capsys):
    out = tmp_path / "out"
    assert extend.main(["--base", str(mini["plain"].parent / "base"), "--n-dsus", "8", "--out", str(out),
                        "--no-deduplicate"]) == 2
    assert "--no-deduplicate is how a speech BPE (--dsu-bpe) is learnt" in capsys.readouterr().err
    assert not out.exists()


def test_a_bpe_larger_than_the_data_supports_is_refused_and_nothing_written(tiny_bpe, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--base", str(tiny_bpe["root"] / "base"), "--n-dsus", str(tiny.N_DSUS), "--out", str(out),
            "--dsu-bpe", "100000", "--dsu-bpe-data", str(tiny_bpe["train"])]
    assert extend.main(args) == 2
    assert "support at most" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert extend.main(args[:6] + ["--dsu-bpe", "8"]) == 2  # without --dsu-bpe-data
    assert "go together" in capsys.readouterr().err


def test_a_dsu_outside_n_dsus_in_the_bpe_data_is_refused(tiny_bpe, tmp_path, capsys):
    bad = tiny.write_jsonl(tmp_path / "bad.jsonl", tiny.rows(3, seed=5, prefix="b", n_dsus=tiny.N_DSUS * 2))
    args = ["--base", str(tiny_bpe["root"] / "base"), "--n-dsus", str(tiny.N_DSUS), "--out", str(tmp_path / "out"),
            "--dsu-bpe", "8", "--dsu-bpe-data", str(bad)]
    assert extend.main(args) == 2
    assert "bad.jsonl" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_bpe_file_that_does_not_match_n_dsus_is_refused(mini, tiny_bpe, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(mini["bpe"], model)
    for name in (DSU_BPE_MODEL, DSU_BPE_SETTINGS):  # a 64-DSU BPE beside a 128-DSU tokenizer
        shutil.copy(tiny_bpe["model"] / "original" / name, model / "original" / name)
    with pytest.raises(TokenizerFileError, match="learnt over 64 DSUs"):
        tokenizer(model)
    # Settings edited to claim 128 DSUs: the pieces themselves give it away.
    settings = json.loads((model / "original" / DSU_BPE_SETTINGS).read_text()) | {"n_dsus": MINI_DSUS}
    (model / "original" / DSU_BPE_SETTINGS).write_text(json.dumps(settings))
    with pytest.raises(TokenizerFileError, match="found 64 DSUs"):
        tokenizer(model)
    args = [str(ROOT / "configs" / "tiny_sft.json"), f"run_dir={tmp_path / 'run'}", f"model.path={model}",
            f"data.train={tiny_bpe['train']}", f"data.n_dsus={MINI_DSUS}"]
    assert train.main(args) == 2
    assert DSU_BPE_MODEL in capsys.readouterr().err
    # And merged tokens with no BPE beside them cannot encode speech.
    for name in (DSU_BPE_MODEL, DSU_BPE_SETTINGS):
        os.remove(model / "original" / name)
    with pytest.raises(TokenizerFileError, match="no dsu_bpe.model"):
        tokenizer(model)


def test_without_the_option_nothing_about_the_bpe_is_written(mini):
    assert not any((mini["plain"] / "original" / name).exists() for name in (DSU_BPE_MODEL, DSU_BPE_SETTINGS))
    tok = tokenizer(mini["plain"])
    assert tok.dsu_bpe is None and tok.n_merged == 0
    units = np.array([3, 3, 5, 7])
    assert tok.speech_ids(units).tolist() == (units + tok.dsu_offset).tolist()

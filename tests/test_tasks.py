"""SFT tasks both ways (data.sft.tasks): the tts and continue sequences token by token, the
deterministic task draw, the fused ops on every task, exact resume of a mixture, and generation of
units with the built-in engine and vLLM."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

import config
import dsu_ops
import generate
import train
from data.samples import IGNORE, SFT_TASKS, SampleBuilder, continuation_split, deduplicate_runs, sft_task
from data.tokenizer import Tokenizer
from tests import tiny
from tests.test_vllm import in_vllm_env, vllm_python

ROOT = Path(__file__).resolve().parents[1]
SFT = config.defaults()["data"]["sft"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny.extended_model(tmp_path_factory.mktemp("tasks"), heads=2)  # a head size vLLM's CPU build takes


def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer(model_dir / "original" / "tokenizer.model")


ROW = {"id": "u1", "transcript": " the red cat ", "speech_tokens": [5, 5, 9, 9, 9, 2, 7, 7, 3]}


def chat_start(tok: Tokenizer, system_prompt: str) -> list[int]:
    return [tok.bos_id, *tok.message("system", system_prompt), *tok.header("user")]


def trained(tok: Tokenizer, prompt: list[int], answer: list[int]) -> list[int]:
    """The labels of a chat sample, as torchtune masks the reference's ASR one: the assistant
    message (its header too) is trained on, the rest and the closing end-of-text are not."""
    header = len(tok.header("assistant"))
    return [IGNORE] * (len(prompt) - header) + prompt[-header:] + answer + [IGNORE]


# -- the sequences, by hand -------------------------------------------------------------------


@pytest.mark.parametrize("modality_tokens", [True, False])
def test_tts_sequence_is_the_transcript_then_its_units_and_the_end_of_speech(model, modality_tokens):
    tok = tokenizer(model)
    builder = SampleBuilder(tok, deduplicate=True, modality_tokens=modality_tokens, max_seq_len=None)
    tokens, labels = builder.assemble(builder.sft_pieces("tts", ROW, SFT))
    text, speech = ([tok.text_id], [tok.speech_id]) if modality_tokens else ([], [])
    units = [tok.dsu_offset + u for u in (5, 9, 2, 7, 3)]  # deduplicated
    prompt = (chat_start(tok, SFT["tts_system_prompt"]) + text + tok.encode("the red cat") + speech
              + [tok.eot_id] + tok.header("assistant"))
    answer = units + text + [tok.eot_id]
    assert tokens.tolist() == prompt + answer + [tok.eos_id]
    assert labels.tolist() == trained(tok, prompt, answer)
    inference, _ = builder.assemble(builder.sft_pieces("tts", ROW, SFT, inference=True))
    assert inference.tolist() == prompt


def test_continue_sequence_cuts_between_runs_and_trains_on_the_rest(model):
    tok = tokenizer(model)
    builder = SampleBuilder(tok, deduplicate=True, modality_tokens=True, max_seq_len=None)
    tokens, labels = builder.assemble(builder.sft_pieces("continue", ROW, SFT))
    # 0.5 of 9 units is 4.5 -> index 5, which starts a new run (2): prompt 5 5 9 9 9, rest 2 7 7 3
    prompt = (chat_start(tok, SFT["continue_system_prompt"]) + [tok.speech_id, tok.dsu_offset + 5, tok.dsu_offset + 9]
              + [tok.eot_id] + tok.header("assistant"))
    answer = [tok.dsu_offset + u for u in (2, 7, 3)] + [tok.text_id, tok.eot_id]
    assert tokens.tolist() == prompt + answer + [tok.eos_id]
    assert labels.tolist() == trained(tok, prompt, answer)


def test_asr_through_sft_pieces_is_the_asr_sequence(model):
    builder = SampleBuilder(tokenizer(model), deduplicate=True, modality_tokens=True, max_seq_len=None)
    for inference in (False, True):
        ours = builder.assemble(builder.sft_pieces("asr", ROW, SFT, inference))
        asr = builder.sft_asr(ROW, SFT["system_prompt"], SFT["train_on_input"], inference)
        assert [a.tolist() for a in ours] == [a.tolist() for a in asr]


@pytest.mark.parametrize("units, fraction, cut", [
    ([1, 2, 3, 4], 0.5, 2),           # a change right at the fraction
    ([1, 1, 1, 1, 2, 2], 0.5, 4),     # inside a run: moved to its end
    ([1, 1, 1, 1], 0.5, 4),           # no change after: all prompt
    ([7], 0.5, 1),
    ([1, 2, 2, 2, 2, 2, 3], 0.1, 1),  # at least one unit of prompt
])
def test_continuation_split(units, fraction, cut):
    assert continuation_split(np.array(units), fraction) == cut


# -- the task draw -----------------------------------------------------------------------------


def test_task_draw_is_a_function_of_seed_row_and_epoch_and_follows_the_weights():
    weights = {"asr": 2.0, "tts": 1.0, "continue": 1.0}
    draws = [sft_task(i, 3, weights, seed=7) for i in range(8000)]
    assert draws == [sft_task(i, 3, weights, seed=7) for i in range(8000)]
    assert draws != [sft_task(i, 4, weights, seed=7) for i in range(8000)]
    assert draws != [sft_task(i, 3, weights, seed=8) for i in range(8000)]
    shares = {task: draws.count(task) / len(draws) for task in SFT_TASKS}
    assert shares == pytest.approx({"asr": 0.5, "tts": 0.25, "continue": 0.25}, abs=0.02)
    assert {sft_task(i, 0, {"asr": 1.0, "tts": 0.0, "continue": 0.0}, 7) for i in range(100)} == {"asr"}


def test_a_mixture_without_any_weight_is_refused(tmp_path):
    with pytest.raises(config.ConfigError, match="data.sft.tasks"):
        config.load_config(ROOT / "configs" / "tiny_sft.json", [f"run_dir={tmp_path}", "model.path=m",
                                                                 "data.train=t", "data.sft.tasks.asr=0"])


# -- the fused ops -------------------------------------------------------------------------------


@pytest.mark.parametrize("deduplicate", [True, False])
def test_the_assemble_and_pack_ops_build_every_task_as_numpy_does(model, deduplicate):
    tok = tokenizer(model)
    builder = SampleBuilder(tok, deduplicate=deduplicate, modality_tokens=True, max_seq_len=64)
    rows = tiny.rows(12, seed=5, prefix="r")
    pieces = [builder.sft_pieces(SFT_TASKS[i % 3], row, SFT) for i, row in enumerate(rows)]
    expected = [builder.assemble(p) for p in pieces]
    got = dsu_ops.assemble_batch(pieces, tok.dsu_offset, deduplicate)
    offsets = got.sample_offsets.tolist()
    for (want_tokens, want_labels), start, end in zip(expected, offsets, offsets[1:]):
        assert got.tokens[start:end].tolist() == want_tokens.tolist()
        assert got.labels[start:end].tolist() == want_labels.tolist()
    packed = dsu_ops.pack([pieces[:4], pieces[4:8]], tok.dsu_offset, deduplicate, 256, tok.pad_id)
    first_row = packed.tokens[0, : sum(len(t) for t, _ in expected[:4])].tolist()
    assert first_row == sum((t.tolist() for t, _ in expected[:4]), [])


# -- training: exact resume of a mixture ------------------------------------------------------


def step_losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_a_task_mixture_resumes_exactly(model, tmp_path):
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.rows(48, seed=3, prefix="t"))
    args = [str(ROOT / "configs" / "tiny_sft.json"), f"model.path={model}", f"data.train={data}",
            "data.sft.tasks.tts=1", "data.sft.tasks.continue=1", "data.packed=true", "data.max_seq_len=256",
            "train.max_steps=6", "train.save_steps=3", "train.eval_steps=100", "train.log_steps=1"]
    assert train.main(args + [f"run_dir={tmp_path / 'whole'}"]) == 0
    assert train.main(args + [f"run_dir={tmp_path / 'cut'}", "train.max_steps=3"]) == 0
    assert train.main(args + [f"run_dir={tmp_path / 'cut'}", "resume=auto"]) == 0
    assert step_losses(tmp_path / "cut") == step_losses(tmp_path / "whole")
    # another mixture would train on other sequences: refused
    assert train.main(args + [f"run_dir={tmp_path / 'cut'}", "resume=auto", "train.max_steps=9",
                              "data.sft.tasks.tts=2"]) == 2


# -- generation ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def memorised(model, tmp_path_factory):
    """A model trained on ASR and TTS of 8 utterances until it knows them: (checkpoint, data, rows)."""
    root = tmp_path_factory.mktemp("memorised_tasks")
    rng = random.Random(1)
    rows = [{"id": f"utt{i}", "transcript": " ".join(rng.choice(tiny.WORDS) for _ in range(3)),
             "speech_tokens": [rng.randrange(tiny.N_DSUS) for _ in range(rng.randint(8, 12))]} for i in range(8)]
    data = tiny.write_jsonl(root / "train.jsonl", rows)
    run = root / "run"
    assert train.main([str(ROOT / "configs" / "tiny_sft.json"), f"run_dir={run}", f"model.path={model}",
                       f"data.train={data}", "data.sft.tasks.tts=1", "optim.lr=1e-2", "train.batch_size=8",
                       "train.grad_accum=1", "train.max_steps=150", "train.save_steps=150",
                       "train.eval_steps=150"]) == 0
    return run / "checkpoints" / "step_0000150", data, rows


def generations(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]


def test_a_two_task_model_speaks_and_transcribes_what_it_learnt(memorised, tmp_path):
    checkpoint, data, rows = memorised
    common = [str(checkpoint), "--data", str(data), "--backend", "torch", "--max-tokens", "24"]
    assert generate.main(common + ["--task", "tts", "--out", str(tmp_path / "tts")]) == 0
    records = generations(tmp_path / "tts")
    assert [(r["id"], r["task"], r["text"]) for r in records] == [(r["id"], "tts", r["transcript"]) for r in rows]
    references = [deduplicate_runs(np.array(r["speech_tokens"])).tolist() for r in rows]
    assert [r["reference_speech_tokens"] for r in records] == references
    assert all(r["finish_reason"] == "stop" for r in records)  # ended by the end-of-speech token
    exact = sum(r["speech_tokens"] == ref for r, ref in zip(records, references))
    assert exact >= 6, [r["speech_tokens"] for r in records]
    assert generate.main(common + ["--out", str(tmp_path / "asr")]) == 0
    assert sum(r["text"] == row["transcript"] for r, row in zip(generations(tmp_path / "asr"), rows)) >= 6


def test_continue_records_hold_the_units_after_the_prompt(memorised, tmp_path, capsys):
    checkpoint, data, rows = memorised
    assert generate.main([str(checkpoint), "--data", str(data), "--backend", "torch", "--max-tokens", "8",
                          "--task", "continue", "--out", str(tmp_path / "continue")]) == 0
    assert "not trained on the continue task" in capsys.readouterr().err
    records = generations(tmp_path / "continue")
    for record, row in zip(records, rows):
        units = np.array(row["speech_tokens"])
        rest = units[continuation_split(units, SFT["continue_fraction"]):]
        assert (record["task"], record["reference_speech_tokens"]) == ("continue", deduplicate_runs(rest).tolist())
        assert all(0 <= u < tiny.N_DSUS for u in record["speech_tokens"])


def test_speech_task_outputs_go_beside_the_asr_ones(memorised):
    checkpoint, data, _ = memorised
    asr = generate.default_out_dir(checkpoint, str(data), "test")
    assert generate.default_out_dir(checkpoint, str(data), "test", "tts") == asr.with_name("test-tts")


@pytest.mark.skipif(vllm_python()[0] is None, reason=vllm_python()[1])
def test_vllm_speaks_what_the_built_in_engine_does(memorised, tmp_path):
    checkpoint, data, _ = memorised
    common = [str(checkpoint), "--data", str(data), "--task", "tts", "--max-tokens", "24"]
    assert generate.main(common + ["--backend", "torch", "--out", str(tmp_path / "torch")]) == 0
    in_vllm_env(["generate.py", *common, "--backend", "vllm", "--enforce-eager", "--out", str(tmp_path / "vllm")])
    ours, theirs = generations(tmp_path / "torch"), generations(tmp_path / "vllm")
    assert [(r["token_ids"], r["speech_tokens"]) for r in theirs] == [(r["token_ids"], r["speech_tokens"]) for r in ours]

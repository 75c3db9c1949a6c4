"""generate.py: the KV-cached engine against uncached greedy decoding, sampling, prompts against the
golden vectors, a memorised training run transcribed back, outputs, errors, and what vLLM loads."""

import contextlib
import json
import os
import random
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

import extend
import generate
import train
from tiny_model import make_tiny_model
from data.tokenizer import Tokenizer
from generate import Sampling, build_prompts, next_tokens
from model import Llama, ModelConfig
from model_dir import load_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
N_DSUS = 64
WORDS = "the a cat dog red blue runs sits near over one two three big small bird sings and green".split()
SYSTEM_PROMPT = "Transcribe the speech."
TRAIN_STEPS = 120


def utterances(n: int, seed: int) -> list[dict]:
    """Short transcripts with random DSUs: nothing links sound to text, so only memorisation transcribes them."""
    rng = random.Random(seed)
    return [
        {"id": f"utt{i}", "transcript": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4))),
         "speech_tokens": [rng.randrange(N_DSUS) for _ in range(rng.randint(8, 16))]}
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tiny_extended(root: Path, heads: int, kv_heads: int) -> Path:
    rng = random.Random(1)
    text = " ".join(rng.choice(WORDS) for _ in range(3000))
    base = make_tiny_model(root / "base", text, vocab_size=300, hidden=64, layers=2, heads=heads, kv_heads=kv_heads,
                           intermediate=128, seed=0)
    return extend.extend(base, N_DSUS, modality_tokens=True, out_dir=root / "extended")


@pytest.fixture(scope="module")
def random_model_dir(tmp_path_factory) -> Path:
    """A random extended model with grouped-query attention (4 query heads, 2 key/value heads)."""
    return tiny_extended(tmp_path_factory.mktemp("random"), heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def random_model(random_model_dir) -> Llama:
    """The random model with weights drawn 15x wider than their init: at the init scale its tied
    embeddings make greedy decoding repeat the last prompt token, which would test little."""
    model = load_model(random_model_dir).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3, generator=generator)
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """An SFT run of train.py that memorises 8 utterances; test.jsonl (the same rows) lies beside train.jsonl.

    Two heads of 32 sharing one key/value head (grouped-query attention, as Llama 3.2) and a high
    learning rate bring the loss under 0.02 in 120 full-batch steps, a few seconds on CPU; with
    ten different data seeds every run transcribed all 8 utterances exactly.
    """
    root = tmp_path_factory.mktemp("trained")
    model_dir = tiny_extended(root, heads=2, kv_heads=1)
    rows = utterances(8, seed=0)
    train_file = write_jsonl(root / "asr" / "train.jsonl", rows)
    write_jsonl(root / "asr" / "test.jsonl", rows)
    status = train.main([
        str(CONFIGS / "tiny_sft.json"), f"run_dir={root / 'run'}", f"model.path={model_dir}", f"data.train={train_file}",
        f"data.n_dsus={N_DSUS}", f"data.sft.system_prompt={SYSTEM_PROMPT}", "optim.lr=1e-2", "train.batch_size=8",
        "train.grad_accum=1", f"train.max_steps={TRAIN_STEPS}", f"train.save_steps={TRAIN_STEPS}",
        f"train.eval_steps={TRAIN_STEPS}",
    ])
    assert status == 0
    checkpoint = root / "run" / "checkpoints" / f"step_{TRAIN_STEPS:07d}"
    return {"root": root, "checkpoint": checkpoint, "rows": rows, "test": root / "asr" / "test.jsonl"}


def tokenizer_and_prompts(trained) -> tuple[Tokenizer, list[list[int]]]:
    """The trained checkpoint's tokenizer and the prompts of its rows, built from its training config."""
    tok = Tokenizer(trained["checkpoint"] / "original" / "tokenizer.model")
    config = json.loads((trained["checkpoint"] / "training_config.json").read_text())
    return tok, build_prompts(trained["rows"], tok, config["data"])


def read_generations(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "generations.jsonl").read_text().splitlines()]


# -- the engine --------------------------------------------------------------------------------


def uncached_greedy(model: Llama, prompt: list[int], max_tokens: int, stop_ids) -> tuple[list[int], str]:
    """Greedy decoding the slow way: the whole sequence through the model for every new token."""
    sequence, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model.logits(model(torch.tensor([sequence])))[0, -1].argmax())
            if token in stop_ids:
                return out, "stop"
            out.append(token)
            sequence.append(token)
    return out, "length"


def random_prompts(lengths, vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


def test_batched_cached_greedy_equals_uncached_greedy(random_model):
    prompts = random_prompts([7, 19, 3, 12, 19], random_model.config.vocab_size)
    greedy = Sampling(max_tokens=10)
    batched = generate.generate(random_model, prompts, greedy, stop_ids=set(), batch_size=5)
    for prompt, result in zip(prompts, batched):
        assert (result.token_ids, result.finish_reason) == uncached_greedy(random_model, prompt, 10, set())
        alone = generate.generate(random_model, [prompt], greedy, stop_ids=set())[0]
        assert alone.token_ids == result.token_ids
    # Batches of 2 regroup the prompts by length; the results stay in input order.
    assert [r.token_ids for r in generate.generate(random_model, prompts, greedy, set(), batch_size=2)] == [
        r.token_ids for r in batched
    ]


def test_rows_that_stop_leave_the_others_unchanged(random_model):
    prompts = random_prompts([5, 11, 8, 14], random_model.config.vocab_size, seed=3)
    free = generate.generate(random_model, prompts, Sampling(max_tokens=12), stop_ids=set())
    ids = free[1].token_ids
    first_new = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])
    stop = ids[first_new]  # prompt 1 stops there, others wherever they meet it
    results = generate.generate(random_model, prompts, Sampling(max_tokens=12), stop_ids={stop})
    for prompt, result in zip(prompts, results):
        assert (result.token_ids, result.finish_reason) == uncached_greedy(random_model, prompt, 12, {stop})
    assert results[1].finish_reason == "stop" and results[1].token_ids == ids[:first_new]
    assert any(r.finish_reason == "length" for r in results)  # the batch went on without row 1


def test_sampling_is_reproducible_with_a_seed(random_model):
    prompts = random_prompts([6, 9, 4], random_model.config.vocab_size, seed=5)

    def sample(seed, **settings):
        sampling = Sampling(max_tokens=16, temperature=1.0, seed=seed, **settings)
        return [r.token_ids for r in generate.generate(random_model, prompts, sampling, stop_ids=set(), batch_size=2)]

    assert sample(1, top_p=0.95, top_k=50) == sample(1, top_p=0.95, top_k=50)
    assert sample(1, top_p=0.95, top_k=50) != sample(2, top_p=0.95, top_k=50)
    greedy = [r.token_ids for r in generate.generate(random_model, prompts, Sampling(max_tokens=16), set())]
    assert sample(1, top_k=1) == greedy  # only the most likely token survives top-k 1


def test_top_p_keeps_the_smallest_set_reaching_p_and_the_penalty_demotes_seen_tokens():
    logits = torch.tensor([[0.5, 0.3, 0.2, 1e-9]]).log().repeat(2000, 1)
    generator = torch.Generator().manual_seed(0)
    drawn = next_tokens(logits, Sampling(temperature=1.0, top_p=0.6), generator, seen=None)
    assert set(drawn.tolist()) == {0, 1}  # 0.5 < 0.6 <= 0.5 + 0.3
    scores = torch.tensor([[2.0, 1.9, -1.0], [-1.0, -1.1, -3.0]])
    seen = torch.tensor([[True, False, False], [True, False, False]])
    chosen = next_tokens(scores, Sampling(repetition_penalty=1.2), generator, seen)
    assert chosen.tolist() == [1, 1]  # 2.0 / 1.2 < 1.9, and -1.0 * 1.2 < -1.1


def test_presence_and_frequency_penalties_count_output_tokens():
    scores = torch.tensor([[3.0, 2.5, 2.0, 0.0]])
    counts = torch.tensor([[2.0, 1.0, 0.0, 0.0]])  # token 0 generated twice, token 1 once
    generator = torch.Generator()

    def pick(**penalties):
        return int(next_tokens(scores, Sampling(**penalties), generator, None, counts)[0])

    assert pick() == 0
    assert pick(presence_penalty=0.6) == 0  # once per token seen: 2.4, 1.9, 2.0
    assert pick(frequency_penalty=0.6) == 2  # once per time seen: 1.8, 1.9, 2.0
    assert pick(presence_penalty=1.1) == 2  # 1.9, 1.4, 2.0
    assert pick(presence_penalty=-1.0) == 0 and pick(frequency_penalty=-0.5) == 0  # negative ones reward


# -- prompts -----------------------------------------------------------------------------------


def test_prompts_equal_the_golden_inference_cases(golden, extended_tokenizer):
    tok = extended_tokenizer(golden["n_dsus"], golden["use_modality_tokens"])
    limit = golden["max_seq_len"]
    cases = [c for c in golden["cases"] if c["kind"] == "sft" and c["inference"]]
    assert cases
    for case in cases:
        row = {**golden["samples"][case["sample"]], "id": f"golden-{case['sample']}"}
        data = {"deduplicate": case["deduplicate"], "modality_tokens": golden["use_modality_tokens"],
                "max_seq_len": limit, "sft": {"system_prompt": golden["sft_system_prompt"]}}
        if len(case["tokens"]) < limit:
            assert build_prompts([row], tok, data) == [case["tokens"]]
        else:
            # The golden file's training tokenizer cut this prompt at max_seq_len. Generation has no
            # such limit (nor has the reference's); one asked for is an error naming the utterance.
            with pytest.raises(generate.GenerateError, match=f"'golden-{case['sample']}'"):
                build_prompts([row], tok, data, limit)
            assert build_prompts([row], tok, data)[0][:limit] == case["tokens"]


# -- the script on a trained checkpoint --------------------------------------------------------


def test_a_memorised_run_transcribes_its_training_data(trained):
    # Default data: test.jsonl beside the config's train file; default output: under the run directory.
    assert generate.main([str(trained["checkpoint"]), "--backend", "torch", "--max-tokens", "24"]) == 0
    out_dir = trained["root"] / "run" / "generations" / str(TRAIN_STEPS) / "asr" / "test"
    records = read_generations(out_dir)
    assert [r["id"] for r in records] == [row["id"] for row in trained["rows"]]
    # The loss ends under 0.02, far from any argmax tie, so every transcript comes back exactly.
    assert [r["text"] for r in records] == [row["transcript"] for row in trained["rows"]]
    assert all(r["finish_reason"] == "stop" for r in records)


def test_output_fields_and_generation_config(trained, tmp_path):
    out = tmp_path / "out"
    args = [str(trained["checkpoint"]), "--data", str(trained["test"]), "--out", str(out), "--backend", "torch",
            "--max-tokens", "2", "--batch-size", "3"]
    assert generate.main(args) == 0
    tok, prompts = tokenizer_and_prompts(trained)
    for record, row, prompt in zip(read_generations(out), trained["rows"], prompts):
        assert set(record) == {"id", "reference", "text", "token_ids", "finish_reason", "prompt_len"}
        assert (record["id"], record["reference"], record["prompt_len"]) == (row["id"], row["transcript"], len(prompt))
        assert record["finish_reason"] == "length" and len(record["token_ids"]) == 2  # every answer is longer
        assert record["text"] == tok.decode(record["token_ids"], keep_special=False).strip()
    settings = json.loads((out / "generation_config.json").read_text())
    assert settings["backend"] == "torch" and settings["max_tokens"] == 2 and settings["temperature"] == 0
    assert settings["checkpoint"] == str(trained["checkpoint"].resolve())
    assert settings["data_path"] == str(trained["test"].resolve())
    assert settings["data"]["sft"]["system_prompt"] == SYSTEM_PROMPT
    assert sorted(settings["stop_token_ids"]) == sorted(
        tok.special_ids[t] for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
    )
    assert sorted(p.name for p in out.iterdir()) == ["generation_config.json", "generations.jsonl"]  # no temporaries


def test_existing_output_is_never_overwritten(trained, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(trained["checkpoint"]), "--data", str(trained["test"]), "--out", str(out), "--max-tokens", "1"]
    assert generate.main(args) == 0
    (out / "generations.jsonl").write_text("keep me\n")
    assert generate.main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "generations.jsonl").read_text() == "keep me\n"
    assert generate.main(args + ["--overwrite"]) == 0
    assert len(read_generations(out)) == len(trained["rows"])


def test_default_output_directories(tmp_path):
    data = str(tmp_path / "mls_hubert" / "test.jsonl")
    run_checkpoint = tmp_path / "run" / "checkpoints" / "step_0000040"
    assert generate.default_out_dir(run_checkpoint, data, "test") == (
        (tmp_path / "run" / "generations" / "40" / "mls_hubert" / "test").resolve()
    )
    loose = tmp_path / "models" / "extended"
    assert generate.default_out_dir(loose, data, "dev") == (loose / "generations" / "mls_hubert" / "dev").resolve()


def test_a_checkpoint_without_training_config_needs_data_and_reads_n_dsus_from_its_tokenizer(
        random_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "asr" / "test.jsonl", utterances(3, seed=1))
    out = tmp_path / "out"
    assert generate.main([str(random_model_dir), "--out", str(out)]) == 2
    assert "--data" in capsys.readouterr().err
    assert generate.main([str(random_model_dir), "--n-dsus", str(N_DSUS + 1), "--data", str(data), "--out", str(out)]) == 2
    assert f"the tokenizer has {N_DSUS} DSUs but data.n_dsus is {N_DSUS + 1}" in capsys.readouterr().err
    assert not out.exists()
    args = [str(random_model_dir), "--data", str(data), "--out", str(out), "--max-tokens", "3"]
    assert generate.main(args) == 0
    assert f"n_dsus={N_DSUS}  (the model's tokenizer)" in capsys.readouterr().err
    assert [r["id"] for r in read_generations(out)] == ["utt0", "utt1", "utt2"]


def break_checkpoint(trained, tmp_path, missing: str) -> Path:
    copy = Path(shutil.copytree(trained["checkpoint"], tmp_path / "checkpoint"))
    (copy / missing).unlink()
    return copy


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_checkpoint", "checkpoint directory does not exist"),
        ("missing_weights", "missing model.safetensors"),
        ("missing_tokenizer", "missing original/tokenizer.model"),
        ("n_dsus_mismatch", "data.n_dsus is 32"),
        ("unknown_override", "unknown key 'data.n_dsu'"),
        ("model_override", "only data.* keys"),
        ("bad_override_value", "'data.deduplicate' must be true or false"),
        ("malformed_data", "test.jsonl:2: malformed JSON"),
        ("dsu_out_of_range", "test.jsonl:1: field 'speech_tokens': DSU 64"),
        ("prompt_too_long", "utterance 'utt0'"),
        ("missing_data", "no such file"),
        ("no_split_beside_train", "dev.jsonl: no such file"),
        ("bad_sampling", "top_p must be in (0, 1]"),
        ("truncated_weights", "model.safetensors: truncated or damaged"),
        ("out_is_a_file", "out is a regular file, where a directory is expected (the output directory)"),
        ("out_is_a_symlink_loop", "out is a symlink loop, where a directory is expected (the output directory)"),
        ("n_dsus_option", "--n-dsus: must be an integer in 1..65534 (for data.n_dsus), got 0"),
        # Never opened: reading a FIFO blocks until someone writes to it.
        ("data_is_a_fifo", "test.jsonl: is a FIFO, where a regular file is expected"),
        ("training_config_is_a_fifo", "training_config.json: is a FIFO, where a regular file is expected"),
        ("split_beside_train_is_a_fifo", "dev.jsonl: is a FIFO, where a regular file is expected"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(trained, tmp_path, capsys, case, message):
    checkpoint, data = trained["checkpoint"], tmp_path / "asr" / "test.jsonl"
    write_jsonl(data, trained["rows"])
    extra = []
    data_args = ["--data", str(data)]
    if case == "missing_checkpoint":
        checkpoint = tmp_path / "no-such-checkpoint"
    elif case == "missing_weights":
        checkpoint = break_checkpoint(trained, tmp_path, "model.safetensors")
    elif case == "missing_tokenizer":
        checkpoint = break_checkpoint(trained, tmp_path, "original/tokenizer.model")
    elif case == "n_dsus_mismatch":
        extra = ["data.n_dsus=32"]
    elif case == "unknown_override":
        extra = ["data.n_dsu=64"]
    elif case == "model_override":
        extra = ["model.dtype=float32"]
    elif case == "bad_override_value":
        extra = ["data.deduplicate=maybe"]
    elif case == "malformed_data":
        data.write_text(json.dumps(trained["rows"][0]) + "\n{not json\n")
    elif case == "dsu_out_of_range":
        write_jsonl(data, [{**trained["rows"][0], "speech_tokens": [1, N_DSUS]}])
    elif case == "prompt_too_long":
        extra = ["data.max_seq_len=20"]
    elif case == "missing_data":
        data_args = ["--data", str(tmp_path / "nowhere" / "test.jsonl")]
    elif case == "no_split_beside_train":
        data_args = ["--split", "dev"]  # no --data: dev.jsonl beside the training file, which is not there
    elif case == "bad_sampling":
        extra = ["--top-p", "0"]
    elif case == "n_dsus_option":
        extra = ["--n-dsus", "0"]
    elif case == "data_is_a_fifo":
        data.unlink()
        os.mkfifo(data)
    elif case == "training_config_is_a_fifo":
        checkpoint = break_checkpoint(trained, tmp_path, "training_config.json")
        os.mkfifo(checkpoint / "training_config.json")
        extra = ["--n-dsus", str(N_DSUS)]
    elif case == "split_beside_train_is_a_fifo":
        checkpoint = Path(shutil.copytree(trained["checkpoint"], tmp_path / "checkpoint"))
        saved = json.loads((checkpoint / "training_config.json").read_text())
        saved["data"]["train"] = str(data)
        (checkpoint / "training_config.json").write_text(json.dumps(saved))
        os.mkfifo(data.parent / "dev.jsonl")
        data_args = ["--split", "dev"]
    elif case == "truncated_weights":
        checkpoint = Path(shutil.copytree(trained["checkpoint"], tmp_path / "checkpoint"))
        weights = (checkpoint / "model.safetensors").read_bytes()
        (checkpoint / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    out = tmp_path / "out"
    if case == "out_is_a_file":
        out.write_text("a file in the way\n")
    elif case == "out_is_a_symlink_loop":
        out.symlink_to(out)
    assert generate.main([str(checkpoint), *data_args, "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert out.is_file() if case == "out_is_a_file" else out.is_symlink() if case == "out_is_a_symlink_loop" \
        else not out.exists()


# -- what vLLM loads ---------------------------------------------------------------------------


def test_checkpoint_carries_what_vllms_llama_loader_reads(trained):
    from transformers import LlamaConfig, LlamaForCausalLM

    checkpoint = trained["checkpoint"]
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    for key, kind in [("hidden_size", int), ("intermediate_size", int), ("num_hidden_layers", int),
                      ("num_attention_heads", int), ("num_key_value_heads", int), ("head_dim", int),
                      ("rms_norm_eps", float), ("rope_theta", float), ("max_position_embeddings", int),
                      ("vocab_size", int), ("tie_word_embeddings", bool), ("torch_dtype", str)]:
        assert isinstance(config[key], kind), key
    assert config["rope_scaling"]["rope_type"] == "llama3"  # the tiny base copies Llama 3.2's scaling

    with safe_open(checkpoint / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        dtypes = {str(f.get_slice(name).get_dtype()) for name in names}
        embed_rows = f.get_slice("model.embed_tokens.weight").get_shape()[0]
    assert embed_rows == config["vocab_size"]
    assert dtypes == {{"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[config["torch_dtype"]]}
    with torch.device("meta"):
        hf_names = set(LlamaForCausalLM(LlamaConfig(**config)).state_dict())
    if config["tie_word_embeddings"]:
        hf_names.discard("lm_head.weight")  # tied: saved once, as the embeddings
    assert names == hf_names


class FakeVLLM:
    """Stands in for the `vllm` module with its documented interface: `LLM(...).generate(prompts,
    params)` returns one RequestOutput per prompt, in order, whose `outputs[0]` has `token_ids`
    (the stop token included) and `finish_reason`; `vllm.platforms.current_platform` says whether
    it is the CPU or a CUDA build."""

    def __init__(self, answers: dict[tuple, list[int]], cpu_build: bool = False):
        self.answers, self.calls = answers, []  # answer ids by prompt ids
        self.__version__ = "0.0-fake"
        fake = self

        class LLM:
            def __init__(self, **kwargs):
                fake.llm_kwargs = kwargs

            def generate(self, prompts, params, use_tqdm=True):
                fake.calls.append((prompts, params))
                return [SimpleNamespace(outputs=[fake.completion(p["prompt_token_ids"], params)]) for p in prompts]

        self.LLM, self.SamplingParams = LLM, lambda **kwargs: SimpleNamespace(**kwargs)
        platform = SimpleNamespace(is_cpu=lambda: cpu_build, is_cuda_alike=lambda: not cpu_build)
        self.platforms = SimpleNamespace(current_platform=platform)

    def completion(self, prompt, params):
        ids = self.answers[tuple(prompt)][: params.max_tokens]
        stopped = bool(ids) and ids[-1] in params.stop_token_ids
        return SimpleNamespace(index=0, token_ids=ids, finish_reason="stop" if stopped else "length")

    def install(self, monkeypatch) -> None:
        monkeypatch.setitem(sys.modules, "vllm", self)
        monkeypatch.setitem(sys.modules, "vllm.platforms", self.platforms)


def memorised_answers(trained) -> tuple[Tokenizer, list[list[int]], dict]:
    tok, prompts = tokenizer_and_prompts(trained)
    return tok, prompts, {tuple(p): tok.encode(row["transcript"]) + [tok.eot_id] for p, row in zip(prompts, trained["rows"])}


def test_vllm_backend_submits_token_prompts_once_and_normalises_outputs(trained, tmp_path, monkeypatch, capsys):
    tok, prompts, answers = memorised_answers(trained)
    fake = FakeVLLM(answers)
    fake.install(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Fake GPU")
    out = tmp_path / "out"
    args = [str(trained["checkpoint"]), "--data", str(trained["test"]), "--out", str(out), "--max-tokens", "40"]
    assert generate.main(args) == 0  # --backend auto picks vLLM when it imports and a GPU is visible
    assert "backend vllm (vLLM 0.0-fake on Fake GPU)" in capsys.readouterr().err

    assert len(fake.calls) == 1
    submitted, params = fake.calls[0]
    assert submitted == [{"prompt_token_ids": p} for p in prompts]
    kwargs = fake.llm_kwargs
    assert kwargs["model"] == str(trained["checkpoint"]) and kwargs["skip_tokenizer_init"]
    assert kwargs["dtype"] == "bfloat16" and kwargs["max_model_len"] == max(map(len, prompts)) + 40
    assert kwargs["kv_cache_memory_bytes"] == generate.kv_cache_bytes(trained["checkpoint"], prompts,
                                                                      Sampling(max_tokens=40), torch.bfloat16)
    assert (params.temperature, params.top_k, params.max_tokens, params.detokenize, params.n) == (0.0, -1, 40, False, 1)
    assert (params.presence_penalty, params.frequency_penalty) == (0, 0)
    assert sorted(params.stop_token_ids) == sorted(tok.special_ids[t] for t in generate.STOP_TOKENS)
    records = read_generations(out)
    assert [r["text"] for r in records] == [row["transcript"] for row in trained["rows"]]
    assert all(r["finish_reason"] == "stop" and tok.eot_id not in r["token_ids"] for r in records)
    settings = json.loads((out / "generation_config.json").read_text())
    assert (settings["backend"], settings["device"]) == ("vllm", "cuda") and settings["engine_startup_s"] >= 0


def test_auto_takes_vllms_cpu_build_on_a_cpu_in_float32_with_the_options(trained, tmp_path, monkeypatch, capsys):
    tok, prompts, answers = memorised_answers(trained)
    fake = FakeVLLM(answers, cpu_build=True)
    fake.install(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    args = [str(trained["checkpoint"]), "--data", str(trained["test"]), "--out", str(out), "--max-tokens", "40",
            "--presence-penalty", "0.5", "--frequency-penalty", "0.25", "--stop-token-ids", "7,9",
            "--kv-cache-mib", "3"]
    assert generate.main(args) == 0
    assert "backend vllm (vLLM 0.0-fake, CPU build)" in capsys.readouterr().err
    assert fake.llm_kwargs["dtype"] == "float32" and fake.llm_kwargs["kv_cache_memory_bytes"] == 3 * 2**20
    params = fake.calls[0][1]
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, 0.25)
    assert {7, 9} < set(params.stop_token_ids)
    assert json.loads((out / "generation_config.json").read_text())["device"] == "cpu"
    # --device cuda asks for what this build cannot do: auto falls back to the built-in engine and says why.
    assert generate.choose_backend("auto", "cuda") == (
        "torch", "the built-in engine, as --device cuda, but vLLM 0.0-fake is its CPU build")


def test_without_vllm_auto_says_why_it_takes_the_builtin_engine_and_vllm_is_refused(trained, tmp_path, monkeypatch,
                                                                                     capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    args = [str(trained["checkpoint"]), "--data", str(trained["test"]), "--max-tokens", "1"]
    assert generate.main(args + ["--out", str(tmp_path / "auto")]) == 0
    assert "backend torch (the built-in engine, as vLLM is not installed" in capsys.readouterr().err
    assert generate.main(args + ["--out", str(tmp_path / "vllm"), "--backend", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "--backend vllm: vLLM is not installed" in err and "make vllm" in err
    assert not (tmp_path / "vllm").exists()


def test_kv_cache_holds_every_sequence_at_once_in_whole_blocks(trained):
    config = ModelConfig.from_file(trained["checkpoint"] / "config.json")
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    prompts = [[1] * 100, [1] * 300, [1] * 37]
    sampling = Sampling(max_tokens=28, temperature=1.0, n=2)
    needed = 2 * sum(len(p) + 28 for p in prompts) * per_token
    got = generate.kv_cache_bytes(trained["checkpoint"], prompts, sampling, torch.float32)
    assert got % (generate.VLLM_BLOCK * per_token) == 0
    assert needed < got <= needed + 2 * 2 * len(prompts) * generate.VLLM_BLOCK * per_token


# -- options, and a whole run --------------------------------------------------------------------


def test_extra_stop_tokens_and_n_samples_with_the_builtin_engine(trained, tmp_path):
    common = [str(trained["checkpoint"]), "--data", str(trained["test"]), "--backend", "torch", "--max-tokens", "24"]
    assert generate.main(common + ["--out", str(tmp_path / "plain")]) == 0
    plain = read_generations(tmp_path / "plain")
    stop = plain[0]["token_ids"][1]  # the first utterance's second token ends every generation that reaches it
    assert generate.main(common + ["--out", str(tmp_path / "stop"), "--stop-token-ids", f"{stop}"]) == 0
    for before, after in zip(plain, read_generations(tmp_path / "stop")):
        cut = before["token_ids"].index(stop) if stop in before["token_ids"] else None
        assert after["token_ids"] == before["token_ids"][:cut]
        assert after["finish_reason"] == ("stop" if cut is not None else before["finish_reason"])
    settings = json.loads((tmp_path / "stop" / "generation_config.json").read_text())
    assert stop in settings["stop_token_ids"] and settings["stop_token_ids"] != [stop]

    assert generate.main(common + ["--out", str(tmp_path / "n"), "--n", "3", "--temperature", "1.5"]) == 0
    records = read_generations(tmp_path / "n")
    assert all(len(r["candidates"]) == 3 and r["candidates"][0]["text"] == r["text"] for r in records)
    assert any(len({c["text"] for c in r["candidates"]}) > 1 for r in records)  # samples, not copies


@pytest.mark.parametrize("options, message", [
    (["--n", "2"], "n > 1 needs temperature > 0"),
    (["--presence-penalty", "2.5"], "presence_penalty must be in [-2, 2]"),
    (["--stop-token-ids", "5,99999"], "--stop-token-ids [99999]: outside the model's vocabulary"),
    (["--kv-cache-mib", "0"], "--kv-cache-mib must be at least 1"),
    # Past these, fp32 logits overflow and sampling (or seeding) fails with a traceback.
    (["--temperature", "1e-40"], "temperature must be 0 (greedy) or at least 1e-05"),
    (["--temperature", "inf"], "temperature must be a finite number"),
    (["--temperature", "1", "--repetition-penalty", "1e-40"], "repetition_penalty must be in [1e-05, 100000]"),
    (["--temperature", "1", "--seed", str(2**70)], "seed must be in 0..4294967295"),
    (["--temperature", "1", "--seed", "-1"], "seed must be in 0..4294967295"),  # vLLM seeds numpy with it
])
def test_options_a_run_cannot_honour_are_refused(trained, tmp_path, capsys, options, message):
    out = tmp_path / "out"
    args = [str(trained["checkpoint"]), "--data", str(trained["test"]), "--out", str(out), "--backend", "torch"]
    with pytest.raises(SystemExit) if options[0] == "--kv-cache-mib" else contextlib.nullcontext():
        assert generate.main(args + options) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_run_directory_generates_every_checkpoint_and_resumes_after_a_crash(trained, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    for step in (40, 80, 120):  # the same weights under three steps: what matters here is the bookkeeping
        shutil.copytree(trained["checkpoint"], run / "checkpoints" / f"step_{step:07d}")
    (run / "checkpoints" / "step_0000080.tmp").mkdir()  # a checkpoint being written is no checkpoint
    args = [str(run), "--data", str(trained["test"]), "--backend", "torch", "--max-tokens", "4"]
    outputs = [run / "generations" / str(step) / "asr" / "test" / "generations.jsonl" for step in (40, 80, 120)]

    real_generate, calls = generate.generate, []

    def crash_on_the_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies mid-run
        return real_generate(*a, **k)

    monkeypatch.setattr(generate, "generate", crash_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        generate.main(args)
    assert [path.exists() for path in outputs] == [True, False, False]
    assert not list(outputs[1].parent.glob("*")) if outputs[1].parent.exists() else True  # nothing half-written
    first = outputs[0].read_text()
    capsys.readouterr()

    monkeypatch.setattr(generate, "generate", real_generate)
    assert generate.main(args) == 0
    assert all(path.exists() for path in outputs) and outputs[0].read_text() == first
    err = capsys.readouterr().err
    assert "3 checkpoints" in err and "step_0000040: done already" in err
    assert generate.main(args + ["--out", str(tmp_path / "x")]) == 2  # one output directory cannot hold a run
    assert generate.main([str(tmp_path), "--data", str(trained["test"])]) == 2  # no checkpoints/: not a run

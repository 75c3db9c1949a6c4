"""extend.py on tiny Llama 3.2-layout models (tiny_model.py) and on the real Llama 3 tokenizer."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import extend
from tiny_model import make_tiny_model
from data.tokenizer import LLAMA3_SPECIAL_TOKENS, MODALITY_SPEECH, MODALITY_TEXT, Tokenizer, dsu_char

N_SPECIAL = len(LLAMA3_SPECIAL_TOKENS)
N_DSUS = 3000  # many new rows in a 16-dim space, so their sample mean/covariance are tight estimates
N_FILE_RANKS = 300
TINY = dict(vocab_size=N_FILE_RANKS, hidden=16, layers=1, heads=2, kv_heads=1, intermediate=48)
WORDS = (
    "the of and to in is was that for on with as by at from his her they this which speech model "
    "units token language sound voice words listen record spoken text train data audio the and of"
).split()


def sample_text(n_words: int = 1200) -> str:
    rng = np.random.default_rng(0)
    sentences = [" ".join(rng.choice(WORDS, size=12)).capitalize() + "." for _ in range(n_words // 12)]
    return " ".join(sentences)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors |= load_file(path)
    return tensors


def run_extend(base: Path, *args: str) -> int:
    return extend.main(["--base", str(base), *args])


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", sample_text(), **TINY)


@pytest.fixture(scope="module")
def tiny_extended(tiny_base) -> Path:
    assert run_extend(tiny_base, "--n-dsus", str(N_DSUS)) == 0
    out = tiny_base.parent / f"tiny-{N_DSUS}-dsus"  # the default name, beside the base
    assert out.is_dir()
    return out


def copy_base(tiny_base: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_base, tmp_path / "base"))


def test_tiny_model_has_the_llama_3_2_layout_and_is_deterministic(tiny_base, tmp_path):
    config = json.loads((tiny_base / "config.json").read_text())
    params = json.loads((tiny_base / "original" / "params.json").read_text())
    n_ranks = Tokenizer(tiny_base / "original" / "tokenizer.model").n_file_tokens
    assert n_ranks == N_FILE_RANKS
    assert config["vocab_size"] == params["vocab_size"] == n_ranks + N_SPECIAL
    assert (config["bos_token_id"], config["eos_token_id"]) == (n_ranks, n_ranks + 1)
    assert config["tie_word_embeddings"] and config["rope_scaling"]["rope_type"] == "llama3"
    # Meta's FFN sizing rule applied to params.json gives the config's intermediate size.
    ffn = int(params["ffn_dim_multiplier"] * int(2 * 4 * params["dim"] / 3))
    ffn = params["multiple_of"] * -(-ffn // params["multiple_of"])
    assert ffn == config["intermediate_size"]
    tensors = weights(tiny_base)
    assert "lm_head.weight" not in tensors
    assert tensors["model.embed_tokens.weight"].shape == (config["vocab_size"], config["hidden_size"])
    assert torch.equal(tensors["model.norm.weight"], torch.ones(config["hidden_size"]))

    again = make_tiny_model(tmp_path / "again", sample_text(), **TINY)
    assert (again / "model.safetensors").read_bytes() == (tiny_base / "model.safetensors").read_bytes()
    assert (again / "original/tokenizer.model").read_bytes() == (tiny_base / "original/tokenizer.model").read_bytes()
    with pytest.raises(FileExistsError):
        make_tiny_model(again, sample_text(), **TINY)

    assert config["rope_theta"] == params["rope_theta"] == 500000.0  # Llama 3's, by default
    demo = make_tiny_model(tmp_path / "demo", sample_text(), rope_theta=10000.0, **TINY)  # make demo's
    assert json.loads((demo / "config.json").read_text())["rope_theta"] == 10000.0
    assert json.loads((demo / "original/params.json").read_text())["rope_theta"] == 10000.0


def test_base_rows_kept_and_special_rows_moved_to_the_end(tiny_base, tiny_extended):
    base, extended = weights(tiny_base), weights(tiny_extended)
    before, after = base["model.embed_tokens.weight"], extended["model.embed_tokens.weight"]
    assert after.shape == (N_FILE_RANKS + N_DSUS + 2 + N_SPECIAL, before.shape[1])
    assert after.dtype == before.dtype
    assert torch.equal(after[:N_FILE_RANKS], before[:N_FILE_RANKS])
    assert torch.equal(after[-N_SPECIAL:], before[N_FILE_RANKS:])
    assert base.keys() == extended.keys()  # tied: still no lm_head
    for name in base.keys() - {"model.embed_tokens.weight"}:
        assert torch.equal(base[name], extended[name]), name


def test_new_rows_follow_the_base_rows_statistics(tiny_base, tiny_extended):
    file_rows = weights(tiny_base)["model.embed_tokens.weight"][:N_FILE_RANKS].double()
    new_rows = weights(tiny_extended)["model.embed_tokens.weight"][N_FILE_RANKS:-N_SPECIAL].double()
    assert len(new_rows) == N_DSUS + 2
    base_mean = file_rows.mean(0)
    base_cov = torch.cov(file_rows.T, correction=0)
    # The new rows' spread is about sqrt(1e-5) * 0.02 = 6e-5, their mean error about 1e-6.
    assert (new_rows.mean(0) - base_mean).abs().max() < 1e-5 < base_mean.abs().max()
    target = 1e-5 * base_cov
    relative_error = torch.linalg.matrix_norm(torch.cov(new_rows.T) - target) / torch.linalg.matrix_norm(target)
    assert relative_error < 0.15


def test_seed_changes_only_the_new_rows(tiny_base, tiny_extended, tmp_path):
    assert run_extend(tiny_base, "--n-dsus", str(N_DSUS), "--seed", "7", "--out", str(tmp_path / "seed7")) == 0
    default = weights(tiny_extended)["model.embed_tokens.weight"]
    seeded = weights(tmp_path / "seed7")["model.embed_tokens.weight"]
    new = slice(N_FILE_RANKS, -N_SPECIAL)
    assert torch.equal(seeded[:N_FILE_RANKS], default[:N_FILE_RANKS])
    assert torch.equal(seeded[-N_SPECIAL:], default[-N_SPECIAL:])
    assert not torch.equal(seeded[new], default[new])


def test_configs_get_the_new_vocab_size_and_special_ids(tiny_base, tiny_extended):
    new_size = N_FILE_RANKS + N_DSUS + 2 + N_SPECIAL
    bos, eos = N_FILE_RANKS + N_DSUS + 2, N_FILE_RANKS + N_DSUS + 3
    for name in ("config.json", "generation_config.json"):
        before = json.loads((tiny_base / name).read_text())
        after = json.loads((tiny_extended / name).read_text())
        assert (after["bos_token_id"], after["eos_token_id"]) == (bos, eos), name
        unchanged = {k for k in before if k not in ("bos_token_id", "eos_token_id", "vocab_size")}
        assert {k: after[k] for k in unchanged} == {k: before[k] for k in unchanged}, name
    assert json.loads((tiny_extended / "config.json").read_text())["vocab_size"] == new_size
    params_before = json.loads((tiny_base / "original/params.json").read_text())
    params_after = json.loads((tiny_extended / "original/params.json").read_text())
    assert params_after == params_before | {"vocab_size": new_size}


def test_extended_tokenizer_round_trip(tiny_base, tiny_extended):
    base_bytes = (tiny_base / "original/tokenizer.model").read_bytes()
    assert (tiny_extended / "original/tokenizer.model").read_bytes().startswith(base_bytes)
    tokenizer = Tokenizer(tiny_extended / "original/tokenizer.model")
    config = json.loads((tiny_extended / "config.json").read_text())
    assert (tokenizer.n_dsus, tokenizer.dsu_offset) == (N_DSUS, N_FILE_RANKS)
    assert (tokenizer.text_id, tokenizer.speech_id) == (N_FILE_RANKS + N_DSUS, N_FILE_RANKS + N_DSUS + 1)
    assert tokenizer.vocab_size == config["vocab_size"]
    assert (tokenizer.bos_id, tokenizer.eos_id) == (config["bos_token_id"], config["eos_token_id"])
    assert tokenizer.special_ids["<|eot_id|>"] == N_FILE_RANKS + N_DSUS + 2 + 9

    units = [0, 17, 17, N_DSUS - 1]
    text = "the speech " + MODALITY_SPEECH + "".join(dsu_char(u) for u in units) + MODALITY_TEXT + " model"
    ids = tokenizer.encode(text)
    assert ids.count(tokenizer.speech_id) == ids.count(tokenizer.text_id) == 1
    dsu_tokens = ids[ids.index(tokenizer.speech_id) + 1 : ids.index(tokenizer.text_id)]
    assert dsu_tokens == tokenizer.dsu_ids(units).tolist()  # one token per DSU
    assert tokenizer.units(ids) == units
    assert tokenizer.decode(ids) == text


def test_transformers_loads_the_extended_model(tiny_extended):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_extended)
    embedding = weights(tiny_extended)["model.embed_tokens.weight"]
    assert model.config.vocab_size == len(embedding)
    assert torch.equal(model.get_input_embeddings().weight, embedding)
    assert model.get_output_embeddings().weight.shape == embedding.shape


def test_untied_head_is_extended_the_same_way(tmp_path):
    base = make_tiny_model(tmp_path / "untied", sample_text(), dtype="bfloat16", **TINY)
    tensors = load_file(base / "model.safetensors")
    head = (torch.randn(tensors["model.embed_tokens.weight"].shape, generator=torch.Generator().manual_seed(1))
            * 0.05 + 0.01).to(torch.bfloat16)
    save_file(tensors | {"lm_head.weight": head}, base / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": False}))

    assert run_extend(base, "--n-dsus", str(N_DSUS)) == 0
    extended = weights(tmp_path / f"untied-{N_DSUS}-dsus")
    new_head = extended["lm_head.weight"]
    assert new_head.dtype == torch.bfloat16 and extended["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert new_head.shape == extended["model.embed_tokens.weight"].shape
    assert torch.equal(new_head[:N_FILE_RANKS], head[:N_FILE_RANKS])
    assert torch.equal(new_head[-N_SPECIAL:], head[N_FILE_RANKS:])
    # The head's new rows come from the head's own statistics (mean 0.01 here), not the embedding's.
    new_rows = new_head[N_FILE_RANKS:-N_SPECIAL].float()
    assert torch.allclose(new_rows.mean(0), head[:N_FILE_RANKS].float().mean(0), atol=2e-3)
    assert new_rows.std(0).max() < 1e-3


def test_sharded_input_gives_the_same_result_and_keeps_its_sharding(tiny_base, tiny_extended, tmp_path):
    base = copy_base(tiny_base, tmp_path)
    tensors = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, base / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard_names, shard)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))

    assert run_extend(base, "--n-dsus", str(N_DSUS)) == 0
    out = tmp_path / f"base-{N_DSUS}-dsus"
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(shards)
    new_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert new_index["weight_map"] == weight_map
    expected = weights(tiny_extended)
    assert new_index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    for shard, shard_names in shards.items():
        with safe_open(out / shard, framework="pt") as f:
            assert sorted(f.keys()) == sorted(shard_names)
            for name in shard_names:
                assert torch.equal(f.get_tensor(name), expected[name]), name


def test_no_modality_tokens_naming_and_layout(tiny_base):
    assert run_extend(tiny_base, "--n-dsus", "10", "--no-modality-tokens") == 0
    out = tiny_base.parent / "tiny-10-dsus-no_modality_tokens"
    tokenizer = Tokenizer(out / "original/tokenizer.model")
    assert (tokenizer.n_dsus, tokenizer.dsu_offset) == (10, N_FILE_RANKS)
    assert not tokenizer.has_modality_tokens and tokenizer.speech_id is None and tokenizer.text_id is None
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == N_FILE_RANKS + 10 + N_SPECIAL == tokenizer.vocab_size
    assert config["bos_token_id"] == N_FILE_RANKS + 10 == tokenizer.bos_id
    before = weights(tiny_base)["model.embed_tokens.weight"]
    after = weights(out)["model.embed_tokens.weight"]
    assert len(after) == tokenizer.vocab_size and torch.equal(after[-N_SPECIAL:], before[N_FILE_RANKS:])


def test_real_llama3_tokenizer_matches_the_reference(golden, llama3_tokenizer_file, tmp_path):
    """The whole script on a base with the real tokenizer and a 4-wide model (no real weights here)."""
    base = tmp_path / "Llama-3.2-1B"
    (base / "original").mkdir(parents=True)
    shutil.copy(llama3_tokenizer_file, base / "original/tokenizer.model")
    vocab, eot_ids = 128256, [128001, 128008, 128009]  # an instruct config's list of end ids
    (base / "config.json").write_text(json.dumps(
        {"model_type": "llama", "vocab_size": vocab, "bos_token_id": 128000, "eos_token_id": eot_ids,
         "tie_word_embeddings": True}))
    (base / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": eot_ids}))
    (base / "original/params.json").write_text(json.dumps({"dim": 4, "vocab_size": vocab}))
    embedding = torch.randn(vocab, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    save_file({"model.embed_tokens.weight": embedding}, base / "model.safetensors", metadata={"format": "pt"})

    assert run_extend(base, "--n-dsus", str(golden["n_dsus"])) == 0
    out = tmp_path / "Llama-3.2-1B-5000-dsus"
    tokenizer_bytes = (out / "original/tokenizer.model").read_bytes()
    assert hashlib.sha256(tokenizer_bytes).hexdigest() == golden["extended_tokenizer_sha256"]
    special = golden["special_token_ids"]
    end_ids = [special["<|end_of_text|>"], special["<|eom_id|>"], special["<|eot_id|>"]]
    for name in ("config.json", "generation_config.json"):
        config = json.loads((out / name).read_text())
        assert config["bos_token_id"] == special["<|begin_of_text|>"]
        assert config["eos_token_id"] == end_ids
    assert json.loads((out / "config.json").read_text())["vocab_size"] == max(special.values()) + 1
    assert load_file(out / "model.safetensors")["model.embed_tokens.weight"].shape == (max(special.values()) + 1, 4)


def set_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def drop_embedding_row(base: Path) -> None:
    tensors = load_file(base / "model.safetensors")
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:-1]
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})


def make_existing_out(base: Path) -> None:
    (base.parent / f"base-{N_DSUS}-dsus").mkdir()


def make_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def shard_outside(base: Path) -> None:
    """An index whose shard name leads out of the directory: the output would be written out of its own too."""
    names = list(load_file(base / "model.safetensors"))
    (base / "model.safetensors").rename(base.parent / "outside.safetensors")
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {name: "../outside.safetensors" for name in names}}))


N = ["--n-dsus", str(N_DSUS)]


REFUSALS = {
    "existing output": (make_existing_out, [], "already exists"),
    "no DSUs": (None, ["--n-dsus", "0"], "1..65534"),
    "too many DSUs": (None, ["--n-dsus", "65535"], "1..65534"),
    "config vocab_size": (lambda b: set_json(b / "config.json", vocab_size=9), [], "config.json: vocab_size is 9,"),
    "params vocab_size": (lambda b: set_json(b / "original/params.json", vocab_size=1), [], "params.json: vocab_size"),
    "embedding rows": (drop_embedding_row, [], "model.embed_tokens.weight has shape"),
    "missing params": (lambda b: (b / "original/params.json").unlink(), [], "missing original/params.json"),
    "missing tokenizer": (lambda b: (b / "original/tokenizer.model").unlink(), [], "missing original/tokenizer.model"),
    "missing weights": (lambda b: (b / "model.safetensors").unlink(), [], "no model.safetensors"),
    "bad eos id": (lambda b: set_json(b / "generation_config.json", eos_token_id=10**6), [], "eos_token_id"),
    "absurd speech BPE": (None, N + ["--dsu-bpe", str(10**12), "--dsu-bpe-data", "any.jsonl"],
                          "--dsu-bpe must be in 1..2147480646 (sentencepiece's vocabulary is at most 2**31-1 pieces), "
                          "got 1000000000000"),
    "negative speech BPE": (None, N + ["--dsu-bpe", "-5", "--dsu-bpe-data", "any.jsonl"], "must be in 1..2147480646"),
    "seed too large": (None, N + ["--seed", str(2**70)], f"--seed must be in 0..{2**63 - 1}, got {2**70}"),
    "config is a FIFO": (lambda b: make_fifo(b / "config.json"), [], "config.json: is a FIFO"),
    "weights are a FIFO": (lambda b: make_fifo(b / "model.safetensors"), [], "model.safetensors: is a FIFO"),
    "shard outside the directory": (shard_outside, [], "'weight_map' maps model.embed_tokens.weight to "
                                    '"../outside.safetensors", not a file name beside the index'),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_bad_input_is_refused_with_status_2_and_nothing_written(case, tiny_base, tmp_path, capsys):
    spoil, args, message = REFUSALS[case]
    base = copy_base(tiny_base, tmp_path)
    if spoil:
        spoil(base)
    before = tree(tmp_path)
    assert run_extend(base, *(args or ["--n-dsus", str(N_DSUS)])) == 2
    assert message in capsys.readouterr().err
    assert tree(tmp_path) == before


def test_already_extended_tokenizer_is_refused(tiny_extended, tmp_path, capsys):
    assert run_extend(tiny_extended, "--n-dsus", "5", "--out", str(tmp_path / "twice")) == 2
    assert "already contains U+F0000" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_leaves_nothing_behind(tiny_base, tmp_path, monkeypatch):
    base = copy_base(tiny_base, tmp_path)
    before = tree(tmp_path)

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(extend, "extend_rows", fail)
    with pytest.raises(OSError, match="disk full"):
        run_extend(base, "--n-dsus", "10")
    assert tree(tmp_path) == before


def test_a_speech_bpe_its_data_cannot_support_says_so(tiny_base, tmp_path, capsys):
    data = tmp_path / "units.jsonl"
    data.write_text("".join(json.dumps({"speech_tokens": [1, 2, 3, i]}) + "\n" for i in range(4)))
    before = tree(tmp_path)
    assert run_extend(tiny_base, *N, "--out", str(tmp_path / "out"), "--dsu-bpe", "5", "--dsu-bpe-data", str(data)) == 2
    assert f"--dsu-bpe 5: the speech_tokens of {data} support no merged token" in capsys.readouterr().err
    assert tree(tmp_path) == before

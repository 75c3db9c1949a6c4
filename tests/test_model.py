"""model.py: logits parity with transformers, chunked loss, packed attention, checkpoint I/O."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from dsu_ops import IGNORE
from model import (
    CompiledForward,
    Llama,
    ModelConfig,
    chunked_cross_entropy,
    flops_per_token,
    init_weights,
    num_params,
)
from model_dir import load_model, load_state_dict, save_pretrained

VOCAB = 300
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small enough that head_dim 16's wavelengths (6 .. ~20,000 positions) fall in all three bands.
    "original_max_position_embeddings": 64,
}


def tiny_config(tied: bool, rope_scaling: dict | None = LLAMA3_SCALING, layers: int = 2) -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=rope_scaling,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=[2, 3],
    )


def tiny_model(tied: bool = False, seed: int = 0, **config) -> Llama:
    model = Llama(tiny_config(tied, **config))
    init_weights(model, seed)
    with torch.no_grad():  # non-trivial norm weights, so a misplaced norm cannot go unnoticed
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    return model


def random_tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_logits(model_dir, tokens) -> torch.Tensor:
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens).logits


def our_logits(model: Llama, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(model(tokens))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING], ids=["plain_rope", "llama3_rope"])
def test_logits_match_transformers(tmp_path, tied, scaling):
    hf_config = LlamaConfig(**{**tiny_config(tied, scaling).to_hf(), "torch_dtype": "float32"})
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            noise = torch.randn_like(param)
            param.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.05 * noise)
    # Small shards also exercise the sharded-checkpoint path (model.safetensors.index.json).
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()

    model = load_model(tmp_path, dtype=torch.float32)
    assert set(model.state_dict()) == set(hf.state_dict()) - ({"lm_head.weight"} if tied else set())
    tokens = random_tokens(2, 150)  # past original_max_position_embeddings, where scaling matters
    with torch.no_grad():
        expected = hf(tokens).logits
    assert (our_logits(model, tokens) - expected).abs().max() < 1e-4


def test_llama3_scaling_changes_the_model():
    plain, scaled = tiny_model(rope_scaling=None), tiny_model(rope_scaling=LLAMA3_SCALING)
    tokens = random_tokens(1, 100)
    assert (our_logits(plain, tokens) - our_logits(scaled, tokens)).abs().max() > 1e-3


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_saved_checkpoint_loads_in_transformers(tmp_path, tied):
    model = tiny_model(tied)
    save_pretrained(tmp_path, model.config, model.state_dict())

    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        assert saved.metadata() == {"format": "pt"}
        assert ("lm_head.weight" in saved.keys()) is not tied
    tokens = random_tokens(2, 40)
    assert (hf_logits(tmp_path, tokens) - our_logits(model, tokens)).abs().max() < 1e-4
    reloaded = load_model(tmp_path, dtype=torch.float32)
    assert torch.equal(our_logits(reloaded, tokens), our_logits(model, tokens))


def test_tied_checkpoint_with_a_copy_of_the_head_loads(tmp_path):
    model = tiny_model(tied=True)
    state = dict(model.state_dict(), **{"lm_head.weight": model.model.embed_tokens.weight})
    save_file({k: v.contiguous().clone() for k, v in state.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf()))
    reloaded = load_model(tmp_path, dtype=torch.float32)
    assert reloaded.lm_head is None
    tokens = random_tokens(1, 20)
    assert torch.equal(our_logits(reloaded, tokens), our_logits(model, tokens))


def test_from_pretrained_rejects_weights_that_do_not_match_the_config(tmp_path):
    model = tiny_model()
    save_pretrained(tmp_path, model.config, model.state_dict())
    (tmp_path / "config.json").write_text(json.dumps({**model.config.to_hf(), "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="missing.*model.layers.2"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**model.config.to_hf(), "vocab_size": VOCAB + 1}))
    with pytest.raises(ValueError, match="embed_tokens"):
        load_model(tmp_path)


def test_from_pretrained_uses_the_config_dtype(tmp_path):
    model = tiny_model()
    save_pretrained(tmp_path, model.config, model.state_dict())
    (tmp_path / "config.json").write_text(json.dumps({**model.config.to_hf(), "torch_dtype": "bfloat16"}))
    reloaded = load_model(tmp_path)
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    assert reloaded(random_tokens(1, 8)).dtype == torch.bfloat16


def test_load_state_dict_names_the_directory_when_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_state_dict(tmp_path)


def test_config_reads_llama3_and_transformers5_layouts():
    llama32 = {  # as in Llama-3.2-1B's config.json
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "hidden_act": "silu",
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": 128001,
        "torch_dtype": "bfloat16", "attention_bias": False, "mlp_bias": False, "use_cache": True,
    }
    config = ModelConfig.from_hf(llama32)
    assert config.rope_scaling == llama32["rope_scaling"] and config.rope_theta == 500000.0
    assert config.torch_dtype == "bfloat16" and config.tie_word_embeddings
    assert ModelConfig.from_hf(config.to_hf()) == config
    assert config.to_hf() == {k: v for k, v in llama32.items() if k != "use_cache"}

    transformers5 = LlamaConfig(**config.to_hf()).to_dict()
    assert "rope_parameters" in transformers5
    assert ModelConfig.from_hf(transformers5) == config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": "64"}, "'hidden_size'"),
        ({"hidden_act": "gelu"}, "'hidden_act'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'rope_scaling'.*yarn"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "'rope_scaling.low_freq_factor'"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"num_key_value_heads": 0}, "'num_key_value_heads'"),
        ({"rope_scaling": [8.0]}, "'rope_scaling' must be a JSON object"),
    ],
)
def test_config_errors_name_the_file_and_field(change, message):
    with pytest.raises(ValueError, match=f"my/config.json: .*{message}"):
        ModelConfig.from_hf({**tiny_config(False).to_hf(), **change}, source="my/config.json")
    missing = tiny_config(False).to_hf()
    del missing["vocab_size"]
    with pytest.raises(ValueError, match="my/config.json: missing field.*vocab_size"):
        ModelConfig.from_hf(missing, source="my/config.json")


def reference_loss(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.T).reshape(-1, weight.shape[0]), labels.reshape(-1), reduction="sum")


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64, 1000])
def test_chunked_cross_entropy_equals_full_cross_entropy(chunk_size):
    generator = torch.Generator().manual_seed(chunk_size)
    hidden = torch.randn(3, 37, 64, generator=generator, requires_grad=True)
    weight = torch.randn(VOCAB, 64, generator=generator, requires_grad=True)
    labels = torch.randint(0, VOCAB, (3, 37), generator=generator)
    labels[torch.rand(3, 37, generator=generator) < 0.3] = IGNORE

    loss, count = chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk_size)
    (loss / 10).backward()  # a non-unit upstream gradient, as when the trainer normalises
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = reference_loss(hidden, weight, labels)
    (expected / 10).backward()

    assert count.item() == (labels != IGNORE).sum().item()
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert torch.allclose(grads[0], hidden.grad, atol=1e-6)
    assert torch.allclose(grads[1], weight.grad, atol=1e-6)


def test_chunked_cross_entropy_with_no_targets_is_zero_and_differentiable():
    hidden = torch.randn(2, 5, 64, requires_grad=True)
    weight = torch.randn(VOCAB, 64, requires_grad=True)
    loss, count = chunked_cross_entropy(hidden, weight, torch.full((2, 5), IGNORE), chunk_size=4)
    loss.backward()
    assert loss.item() == 0 and count.item() == 0
    assert not hidden.grad.any() and not weight.grad.any()


def test_forward_with_labels_returns_the_chunked_loss():
    model = tiny_model(tied=True)
    tokens = random_tokens(2, 30)
    labels = torch.cat([tokens[:, 1:], torch.full((2, 1), IGNORE)], dim=1)
    model.loss_chunk_size = 11
    loss, count = model(tokens, labels=labels)
    expected = reference_loss(model(tokens), model.model.embed_tokens.weight, labels)
    assert count.item() == 58 and torch.allclose(loss, expected, rtol=1e-5)


DOCUMENT_LENGTHS = [[5, 9, 7], [12, 9]]  # two rows packed differently


def packed_batch():
    tokens = random_tokens(len(DOCUMENT_LENGTHS), sum(DOCUMENT_LENGTHS[0]), seed=3)
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in DOCUMENT_LENGTHS])
    document_ids = torch.stack(
        [torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in DOCUMENT_LENGTHS]
    )
    return tokens, positions, document_ids


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_packed_documents_equal_separate_forwards(backend, device):
    if backend == "flex":
        pytest.importorskip("torch.nn.attention.flex_attention")
    model = tiny_model().to(device)  # on CUDA, flex is the compiled FlexAttention kernel train.py uses
    model.attention_backend = backend
    tokens, positions, document_ids = (t.to(device) for t in packed_batch())
    tolerance = 1e-5 if device == "cpu" else 1e-4  # the GPU's kernels sum in other orders
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns that it runs uncompiled on CPU
        packed = model(tokens, positions=positions, document_ids=document_ids)
        for row, lengths in enumerate(DOCUMENT_LENGTHS):
            separate = torch.cat([model(document[None])[0] for document in tokens[row].split(lengths)])
            assert (packed[row] - separate).abs().max() < tolerance
    # Without document_ids the same row is one long causal sequence, which differs.
    with torch.no_grad():
        assert (model(tokens) - packed).abs().max() > 1e-3


def test_activation_checkpointing_gives_the_same_gradients():
    tokens, positions, document_ids = packed_batch()
    labels = torch.cat([tokens[:, 1:], torch.full((tokens.shape[0], 1), IGNORE)], dim=1)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model()
        model.activation_checkpointing = checkpointing
        loss, count = model(tokens, positions=positions, document_ids=document_ids, labels=labels)
        (loss / count).backward()
        grads.append({name: param.grad for name, param in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0, name
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-7), name


@pytest.mark.parametrize("tied", [False, True])
def test_num_params_and_flops(tied):
    config = tiny_config(tied)
    model = Llama(config)
    assert num_params(config) == sum(p.numel() for p in model.parameters())
    layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 160  # q, o: 64x64; k, v: 64x32; gate, up, down
    head = VOCAB * 64
    assert flops_per_token(config, 128) == 6 * (2 * layer + head) + 12 * 2 * 4 * 16 * 128


def test_init_weights_is_deterministic():
    a, b, c = Llama(tiny_config(False)), Llama(tiny_config(False)), Llama(tiny_config(False))
    init_weights(a, 5), init_weights(b, 5), init_weights(c, 6)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert torch.equal(a.model.norm.weight, torch.ones(64))
    assert abs(a.model.embed_tokens.weight.std().item() - 0.02) < 0.002


def test_a_compiler_failure_falls_back_to_the_eager_model_with_a_warning(monkeypatch, capsys):
    model = tiny_model()
    tokens = random_tokens(2, 16)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda module: broken)
    forward = CompiledForward(model, announce=True)
    with pytest.warns(UserWarning, match="torch.compile failed, running uncompiled: RuntimeError: no C\\+\\+ compiler$"):
        first = forward(tokens)
    assert torch.equal(first, model(tokens)) and torch.equal(forward(tokens), first)
    assert "torch.compile took" not in capsys.readouterr().out

    monkeypatch.setattr(torch, "compile", lambda module: module)  # compiles: the time is printed once
    forward = CompiledForward(model, announce=True)
    forward(tokens), forward(tokens)
    assert capsys.readouterr().out.count("torch.compile took") == 1

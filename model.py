"""A plain-PyTorch Llama 3.x, shared by training and generation.

Parameter names are exactly the Hugging Face `LlamaForCausalLM` keys, so a `model.safetensors`
state dict loads with no renaming, and what we save loads in `transformers` and vLLM.
Hugging Face stores q/k projections for the rotate-half RoPE layout, which is what we implement.
"""

import dataclasses
import functools
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsu_ops import IGNORE
from files import read_json

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # older torch: packed batches use the masked SDPA path
    flex_attention = None


LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION_BACKENDS = ("auto", "sdpa", "flex")


@dataclass
class ModelConfig:
    """The subset of a Hugging Face Llama `config.json` this model needs.

    Defaults are transformers' `LlamaConfig` defaults, so a config.json that leaves a key out
    means the same here as there.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None: same as num_attention_heads
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Llama 3 frequency scaling {"rope_type": "llama3", factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings}, or None for plain RoPE.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "float32"

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.torch_dtype not in DTYPES:
            raise ValueError(f"torch_dtype must be one of {sorted(DTYPES)}, got {self.torch_dtype!r}")

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Reads a Hugging Face config dict; errors name `source` and the offending field."""
        _require_supported(hf, source)
        fields = {}
        for field in dataclasses.fields(cls):
            if field.name in ("rope_theta", "rope_scaling", "torch_dtype") or field.name not in hf:
                continue
            fields[field.name] = _checked_value(hf, field.name, source)
        fields["rope_theta"], fields["rope_scaling"] = _rope_from_hf(hf, source)
        dtype = hf.get("torch_dtype", hf.get("dtype"))  # transformers >= 5 writes "dtype"
        if dtype is not None:
            fields["torch_dtype"] = dtype
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in fields]
        if missing:
            raise ValueError(f"{source}: missing field(s) {', '.join(missing)}")
        try:
            return cls(**fields)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        """Reads a config.json; a file that is not a JSON object is a ValueError (files.JsonFileError)."""
        return cls.from_hf(read_json(path), source=str(path))

    def to_hf(self) -> dict:
        """A `LlamaForCausalLM` config.json dict in the layout Llama 3.x checkpoints ship with."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.torch_dtype,
        }


# The only values of these fields this implementation models; others would silently give wrong outputs.
_SUPPORTED_VALUES = {"model_type": "llama", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


def _require_supported(hf: dict, source: str) -> None:
    for key, supported in _SUPPORTED_VALUES.items():
        if key in hf and hf[key] != supported:
            raise ValueError(f"{source}: field '{key}' is {hf[key]!r}; only {supported!r} is supported")


def _checked_value(hf: dict, key: str, source: str):
    value = hf[key]
    if key == "rms_norm_eps":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    elif key == "tie_word_embeddings":
        ok = isinstance(value, bool)
    elif key == "eos_token_id":
        ok = value is None or _is_int(value) or (isinstance(value, list) and all(map(_is_int, value)))
    elif key == "bos_token_id":
        ok = value is None or (_is_int(value) and value >= 0)
    elif key in ("num_key_value_heads", "head_dim"):
        ok = value is None or (_is_int(value) and value > 0)
    else:
        ok = _is_int(value) and value > 0
    if not ok:
        raise ValueError(f"{source}: field '{key}' has an invalid value {value!r}")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rope_from_hf(hf: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, llama3 scaling or None) from either config layout.

    Llama 3.x checkpoints write `rope_theta` and `rope_scaling`; transformers >= 5 writes both
    inside `rope_parameters`.
    """
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    for name, value in (("rope_parameters", params), (field, scaling)):
        if not isinstance(value, dict):
            raise ValueError(f"{source}: field '{name}' must be a JSON object")
    theta = params.get("rope_theta", hf.get("rope_theta", ModelConfig.rope_theta))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ValueError(f"{source}: field 'rope_theta' has an invalid value {theta!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ValueError(f"{source}: field '{field}' has rope_type {rope_type!r}; only 'llama3' is supported")
    for key in LLAMA3_ROPE_KEYS:
        value = scaling.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{source}: field '{field}.{key}' has an invalid value {value!r}")
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(f"{source}: field '{field}': high_freq_factor must exceed low_freq_factor")
    return float(theta), {"rope_type": "llama3", **{key: scaling[key] for key in LLAMA3_ROPE_KEYS}}


def rope_inv_freq(config: ModelConfig, device=None) -> torch.Tensor:
    """Inverse RoPE frequencies (head_dim / 2,) in fp32, with Llama 3 scaling when configured.

    Llama 3 scaling leaves short wavelengths alone, divides long ones by `factor`, and
    interpolates smoothly between the two bands.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    context, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    low_freq_wavelen, high_freq_wavelen = context / low, context / high
    wavelen = 2 * torch.pi / inv_freq
    smooth = (context / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    is_between = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_between, interpolated, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, exactly as transformers does,
        # so bf16 outputs round the same way.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        dim, q_dim, kv_dim = config.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(dim, q_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask, store_kv=None) -> torch.Tensor:
        # Positions arrive as cos/sin rather than being implied by the sequence index, so a KV
        # cache can append rotated keys for new positions. `store_kv(k, v)`, given by a cache,
        # stores this step's keys and values and returns all of them so far.
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        k = apply_rope(k, cos, sin)
        if store_kv is not None:
            k, v = store_kv(k, v)
        out = attend(apply_rope(q, cos, sin), k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Grouped-query causal attention. `mask`: None (plain causal), a boolean (B, 1, T, T)
    tensor, or a FlexAttention BlockMask."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    flex = _compiled_flex_attention() if q.is_cuda else flex_attention
    return flex(q, k, v, block_mask=mask, enable_gqa=True)


@functools.cache
def _compiled_flex_attention():
    # Uncompiled flex_attention materialises the full score matrix; compiled, it is a fused kernel.
    return torch.compile(flex_attention, dynamic=False)


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean: query i sees key j iff j <= i and both are in the same document."""
    length = document_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril()
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    return (causal & same_document).unsqueeze(1)


def document_block_mask(document_ids: torch.Tensor):
    """The same mask as `document_mask`, as a FlexAttention BlockMask (skips empty blocks)."""

    def causal_same_document(batch, head, q_index, kv_index):
        return (q_index >= kv_index) & (document_ids[batch, q_index] == document_ids[batch, kv_index])

    batch, length = document_ids.shape
    return create_block_mask(causal_same_document, batch, None, length, length, device=document_ids.device)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask, store_kv=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, store_kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Every layer's keys and values for a batch being generated, preallocated to `max_len` slots.

    Prompts of different lengths are left-padded to a common length, so every row writes its next
    token to the same slot and a decode step is a single (B, 1) forward. Row b's first `pad[b]`
    slots are padding: no real token attends to them, and positions count from the row's first
    real token, so each row sees exactly the keys and RoPE positions it would see alone. (Right
    padding would need per-row write slots instead.) A padding query attends to itself only, which
    keeps its softmax finite: a NaN there would reach the cache and, times a zero weight, every row.
    """

    def __init__(self, config: ModelConfig, pad: torch.Tensor, max_len: int, dtype: torch.dtype, device=None):
        shape = (len(pad), config.num_key_value_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.pad = pad.to(device=device, dtype=torch.long)
        self.length = 0  # slots filled, the same in every row

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def positions(self, n: int) -> torch.Tensor:
        """(B, n) RoPE positions of the next n slots (0 for padding)."""
        slots = torch.arange(self.length, self.length + n, device=self.pad.device)
        return (slots[None, :] - self.pad[:, None]).clamp(min=0)

    def mask(self, n: int) -> torch.Tensor:
        """(B, 1, n, length + n) boolean: which filled or new slots each of the next n slots attends to."""
        keys = torch.arange(self.length + n, device=self.pad.device)
        queries = keys[self.length :]
        causal = keys[None, :] <= queries[:, None]
        real = keys[None, :] >= self.pad[:, None]
        itself = keys[None, :] == queries[:, None]
        return ((causal[None] & real[:, None]) | itself[None]).unsqueeze(1)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes layer `layer`'s keys and values (B, kv_heads, n, head_dim) for the next n slots;
        returns the layer's keys and values for every slot filled so far, these included."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} slots needed, {self.max_len} allocated")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def keep(self, rows: torch.Tensor) -> None:
        """Keeps only the given batch rows (e.g. drops finished sequences), in that order."""
        rows = rows.to(self.pad.device)
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.pad = self.pad.index_select(0, rows)


class Backbone(nn.Module):
    """Holds the parameters under the Hugging Face `model.` prefix; `Llama.forward` runs them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(nn.Module):
    """Llama 3.x decoder.

    Attributes callers may set: `activation_checkpointing` (recompute each layer in backward),
    `attention_backend` for packed batches ("auto": FlexAttention on CUDA when available, else
    masked SDPA; "sdpa"; "flex"), `loss_chunk_size` (tokens per logits chunk in the loss).
    """

    def __init__(self, config: ModelConfig, activation_checkpointing: bool = False):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        # A tied head has no parameter of its own, so the state dict has no lm_head.weight.
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.activation_checkpointing = activation_checkpointing
        self.attention_backend = "auto"
        self.loss_chunk_size = 1024
        self.cross_entropy = chunked_cross_entropy  # CompiledForward keeps it out of the compiled graph
        self._inv_freq = None  # not a buffer: .to(bfloat16) must not round the frequencies

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, tokens, positions=None, document_ids=None, labels=None, cache: KVCache | None = None):
        """tokens, positions, document_ids, labels: (B, T).

        positions default to 0..T-1. With document_ids, a token attends only to earlier tokens of
        the same document (callers pass positions restarting at 0 per document).
        With a `cache`, tokens fill its next T slots (a left-padded prompt batch, then one token
        per step) and attend to every earlier slot; positions and mask come from the cache.
        Returns the final-normed hidden states (B, T, hidden_size), or, given labels (already
        shifted, IGNORE where no loss), `chunked_cross_entropy`'s (loss sum, target count).
        """
        batch, length = tokens.shape
        if cache is not None:
            if positions is not None or document_ids is not None:
                raise ValueError("with a KV cache, positions and the mask come from the cache")
            positions, mask = cache.positions(length), cache.mask(length)
        else:
            mask = None if document_ids is None else self._document_mask(document_ids)
        if positions is None:
            positions = torch.arange(length, device=tokens.device).expand(batch, length)
        x = self.model.embed_tokens(tokens)
        cos, sin = self._rope_tables(positions, x.dtype)
        for index, layer in enumerate(self.model.layers):
            store_kv = None if cache is None else functools.partial(cache.store, index)
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, store_kv, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, store_kv)
        if cache is not None:
            cache.length += length
        hidden = self.model.norm(x)
        if labels is None:
            return hidden
        return self.cross_entropy(hidden, self.head_weight, labels, self.loss_chunk_size)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits in the model dtype; for a few positions (generation, tests), not for training."""
        return F.linear(hidden, self.head_weight)

    def _rope_tables(self, positions: torch.Tensor, dtype: torch.dtype):
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            self._inv_freq = rope_inv_freq(self.config, positions.device)
        angles = positions[..., None].float() * self._inv_freq
        angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)  # (B, 1, T, head_dim): broadcast over heads
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _document_mask(self, document_ids: torch.Tensor):
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        use_flex = self.attention_backend == "flex" or (self.attention_backend == "auto" and document_ids.is_cuda)
        if use_flex and flex_attention is not None:
            return document_block_mask(document_ids)
        return document_mask(document_ids)

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                        device="cpu", activation_checkpointing=False, source: str = "weights") -> "Llama":
        """The model of `config` holding the Hugging Face state dict `state` (as loaded from `source`,
        which errors name) in `dtype` on `device`; names or shapes that do not match are a ValueError."""
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # some tied checkpoints carry a copy of the embeddings
        with torch.device("meta"):
            model = cls(config, activation_checkpointing=activation_checkpointing)
        expected = model.state_dict().keys()
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                f"{source}: weights do not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        state = {name: tensor.to(device=device, dtype=dtype) for name, tensor in state.items()}
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as error:  # shape mismatches
            raise ValueError(f"{source}: weights do not match config.json: {error}") from None
        return model


class CompiledForward:
    """The model's forward pass through torch.compile, which compiles on the first call: its time is
    printed, and a failure falls back to the eager model with a warning."""

    def __init__(self, model, announce: bool):
        # The loss stays uncompiled: which positions are targets is data, and so is its chunk loop's
        # length; traced, each new target count recompiled it until torch's limit (then eager anyway).
        # Disabled here, not at import: torch._dynamo costs every script a second to import.
        llama = getattr(model, "module", model)  # DDP wraps the Llama; FSDP shards it in place
        llama.cross_entropy = torch.compiler.disable(chunked_cross_entropy)
        self.eager, self.run, self.first, self.announce = model, torch.compile(model), True, announce

    def __call__(self, *args, **kwargs):
        if not self.first:
            return self.run(*args, **kwargs)
        self.first, start = False, time.perf_counter()
        try:
            out = self.run(*args, **kwargs)
        except Exception as error:  # any compiler failure: the eager model computes the same
            first_line = (str(error).strip().splitlines() or [""])[0]
            warnings.warn(f"torch.compile failed, running uncompiled: {type(error).__name__}: {first_line}")
            self.run = self.eager
            return self.run(*args, **kwargs)
        if self.announce:
            print(f"torch.compile took {time.perf_counter() - start:.1f} s (first forward pass)", flush=True)
        return out


def init_weights(model: Llama, seed: int) -> None:
    """Deterministic random init for small test models: N(0, 0.02) for matrices, ones for norms.

    Values are drawn on the CPU in parameter order, so they do not depend on device or dtype.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.empty(param.shape).normal_(0.0, 0.02, generator=generator))


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets` (none ignored), chunk by chunk.

    Each chunk's logits are freed as soon as its loss and gradients are known, so neither the
    forward nor the backward ever holds more than one chunk of vocabulary-sized rows. The
    gradients are computed in the forward pass and scaled by the incoming gradient in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        want_hidden_grad, want_weight_grad = ctx.needs_input_grad[:2]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight_grad else None
        for start in range(0, hidden.shape[0], chunk_size):
            chunk, chunk_targets = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            logits = (chunk @ weight.T).float()
            log_norm = torch.logsumexp(logits, dim=-1)
            loss += (log_norm - logits.gather(1, chunk_targets[:, None]).squeeze(1)).sum()
            if not (want_hidden_grad or want_weight_grad):
                continue
            # d(loss)/d(logits) = softmax - one_hot(target), built in place in the logits buffer.
            grad_logits = logits.sub_(log_norm[:, None]).exp_()
            grad_logits[torch.arange(len(chunk_targets), device=logits.device), chunk_targets] -= 1
            grad_logits = grad_logits.to(hidden.dtype)
            if want_hidden_grad:
                grad_hidden[start : start + chunk_size] = grad_logits @ weight
            if want_weight_grad:
                grad_weight += grad_logits.T @ chunk  # accumulated in fp32 across chunks
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def chunked_cross_entropy(hidden, head_weight, labels, chunk_size: int = 1024):
    """Cross-entropy of the head's logits, never materialising logits for more than `chunk_size` tokens.

    hidden: (..., D); head_weight: (V, D); labels: (...), already aligned with hidden (callers
    shift), IGNORE where there is no target. Logits are upcast to fp32 per chunk.
    Returns (sum of token losses, fp32 scalar; number of target tokens, int64 scalar), so the
    trainer can normalise by target tokens across micro-batches and ranks.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not line up")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    is_target = labels != IGNORE
    # Dropping ignored positions first saves their head matmuls (most of an SFT prompt).
    loss = _LinearCrossEntropy.apply(hidden[is_target], head_weight, labels[is_target], chunk_size)
    return loss, is_target.sum()


def num_params(config: ModelConfig) -> int:
    """Parameter count, embeddings included, the head counted once when tied."""
    d, heads, kv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    attention = d * heads * hd * 2 + d * kv * hd * 2
    layer = attention + 3 * d * config.intermediate_size + 2 * d
    head = 0 if config.tie_word_embeddings else config.vocab_size * d
    return config.vocab_size * d + config.num_hidden_layers * layer + d + head


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward), for MFU, in the PaLM paper's convention:

        6 * N + 12 * L * H * head_dim * T

    N counts the weights used in matmuls: every layer's projections plus the output head (V * D,
    also when tied); the embedding lookup and norms are not matmuls. Each such weight costs 2 FLOPs
    per token forward and 4 backward. The second term is attention's QK^T and AV products:
    2 * 2 * T * H * head_dim per layer forward, times 3 with backward, over the full T x T score
    matrix (causal and document masking do less work; the convention counts it all).
    """
    d, hd = config.hidden_size, config.head_dim
    attention = d * config.num_attention_heads * hd * 2 + d * config.num_key_value_heads * hd * 2
    matmul_weights = config.num_hidden_layers * (attention + 3 * d * config.intermediate_size) + config.vocab_size * d
    attention_scores = 12 * config.num_hidden_layers * config.num_attention_heads * hd * seq_len
    return 6 * matmul_weights + attention_scores

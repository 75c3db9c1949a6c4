"""A small randomly initialised base model laid out like Meta's Llama-3.2-1B in Hugging Face layout.

For tests and demos, where no real checkpoint is available. The directory holds `config.json`,
`generation_config.json`, `model.safetensors` (tied embeddings, so no `lm_head.weight`),
`original/tokenizer.model` (a tiktoken BPE file learnt from the given text; the 256 Llama 3
special tokens follow its ranks, as in the real file) and `original/params.json` (Meta's format).
The model is model.py's `Llama`, initialised by its `init_weights` and written by its
`save_pretrained`, as train.py writes checkpoints.

    python tiny_model.py OUT_DIR --text FILE [--vocab-size 512] [--hidden 128] ...
"""

import argparse
import sys
from pathlib import Path

from tiktoken._educational import bpe_train

from data.dataset import load_rows
from data.tokenizer import LLAMA3_SPECIAL_TOKENS, PUA_AWARE_PATTERN, bpe_lines
from files import atomic_write, write_json
from model import DTYPES, Llama, ModelConfig, init_weights
from model_dir import save_pretrained

NORM_EPS = 1e-5
ROPE_THETA = 500000.0
# Llama 3.2's context length and "llama3" RoPE scaling, copied as the real config has them.
MAX_POSITIONS = 131072
ROPE_SCALING = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}


def learn_bpe(text: str, n_ranks: int) -> list[bytes]:
    """Tokens of a BPE vocabulary of `n_ranks` ranks learnt from `text`, in rank order."""
    try:
        ranks = bpe_train(text, n_ranks, pat_str=PUA_AWARE_PATTERN, visualise=None)
    except ValueError as e:  # the trainer's max() over no pairs: the text ran out of merges
        raise ValueError(f"cannot learn {n_ranks} BPE ranks from {len(text)} characters of text ({e})") from None
    return sorted(ranks, key=ranks.__getitem__)


def meta_ffn_params(hidden: int, intermediate: int) -> tuple[float, int]:
    """`ffn_dim_multiplier` and `multiple_of` for which Meta's FFN sizing rule gives `intermediate`."""
    base = int(2 * (4 * hidden) / 3)
    multiple_of = 256
    while intermediate % multiple_of:
        multiple_of //= 2
    multiplier = round(intermediate / base, 6)
    sized = int(multiplier * base)
    sized = multiple_of * ((sized + multiple_of - 1) // multiple_of)
    if sized != intermediate:
        raise ValueError(f"intermediate size {intermediate} cannot be written in Meta's params.json for dim {hidden}")
    return multiplier, multiple_of


def make_tiny_model(
    out_dir,
    text: str,
    vocab_size: int = 512,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 384,
    seed: int = 0,
    dtype: str = "float32",
    rope_theta: float = ROPE_THETA,
) -> Path:
    """Write a tiny Llama 3.2-layout model to `out_dir` (which must not exist); `vocab_size` is the
    number of BPE ranks learnt from `text`, the model's vocabulary has 256 special tokens more."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir}: already exists; refusing to overwrite it")
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden ({hidden}) must divide by heads ({heads}), heads by kv_heads ({kv_heads})")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    ffn_dim_multiplier, multiple_of = meta_ffn_params(hidden, intermediate)
    tokens = learn_bpe(text, vocab_size)
    n_vocab = len(tokens) + len(LLAMA3_SPECIAL_TOKENS)
    bos_id, eos_id = len(tokens), len(tokens) + 1  # <|begin_of_text|>, <|end_of_text|>

    config = ModelConfig(
        vocab_size=n_vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=NORM_EPS, rope_theta=rope_theta,
        rope_scaling=ROPE_SCALING, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
        bos_token_id=bos_id, eos_token_id=eos_id, torch_dtype=dtype,
    )
    generation_config = {
        "bos_token_id": bos_id,
        "do_sample": True,
        "eos_token_id": eos_id,
        "temperature": 0.6,
        "top_p": 0.9,
    }
    params = {
        "dim": hidden,
        "ffn_dim_multiplier": ffn_dim_multiplier,
        "multiple_of": multiple_of,
        "n_heads": heads,
        "n_kv_heads": kv_heads,
        "n_layers": layers,
        "norm_eps": NORM_EPS,
        "rope_theta": rope_theta,
        "use_scaled_rope": True,
        "vocab_size": n_vocab,
    }
    model = Llama(config)
    init_weights(model, seed)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir, directory=True, replace=False) as tmp:
        (tmp / "original").mkdir()
        save_pretrained(tmp, config, model.to(DTYPES[dtype]).state_dict())
        write_json(tmp / "generation_config.json", generation_config)
        write_json(tmp / "original" / "params.json", params)
        (tmp / "original" / "tokenizer.model").write_bytes(bpe_lines(tokens, 0))
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tiny_model.py",
        description="Write a small random Llama 3.2-layout model (Hugging Face layout plus original/) "
        "whose BPE tokenizer is learnt from a text file.",
    )
    parser.add_argument("out_dir", type=Path, help="directory to create (must not exist)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", type=Path, help="UTF-8 text file to learn the BPE vocabulary from")
    source.add_argument("--transcripts", help="or a dataset (JSONL/Parquet, reference schema) whose transcripts to learn it from")
    parser.add_argument("--vocab-size", type=int, default=512, help="BPE ranks to learn, >= 256 (default 512)")
    parser.add_argument("--hidden", type=int, default=128, help="model width (default 128)")
    parser.add_argument("--layers", type=int, default=4, help="transformer layers (default 4)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (default 2)")
    parser.add_argument("--intermediate", type=int, default=384, help="MLP width (default 384)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype (default float32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument(
        "--rope-theta", type=float, default=ROPE_THETA,
        help=f"RoPE base (default {ROPE_THETA:g}, Llama 3's). A small model trained briefly on sequences "
        "of a few hundred tokens learns faster with a lower base such as 10000, more of whose rotary frequencies "
        "more often complete a turn within such lengths",
    )
    args = parser.parse_args(argv)
    try:
        if args.text is not None:
            text = args.text.read_text(encoding="utf-8")
        else:
            text = "\n".join(row["transcript"] for row in load_rows(args.transcripts, fields=("transcript",)))
        out = make_tiny_model(
            args.out_dir, text, args.vocab_size, args.hidden, args.layers, args.heads,
            args.kv_heads, args.intermediate, args.seed, args.dtype, args.rope_theta,
        )
    except (OSError, ValueError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of extend.py on a Llama-3.2-1B-shaped checkpoint, as a multiple of the checkpoint size.

    python bench/extend_memory.py [--n-dsus 5000] [--workdir DIR]

Writes a randomly initialised bf16 checkpoint with Llama-3.2-1B's shapes and the real Llama 3
tokenizer (llama-models package), runs `extend.py` on it in a child process, and reports the
child's peak resident memory against the checkpoint's size on disk. Target (docs/DESIGN.md, "Targets"): under 2x.
Needs about 6 GB of free disk and a few GB of memory.
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "max_position_embeddings": 131072, "vocab_size": 128256, "tie_word_embeddings": True,
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16", "hidden_act": "silu",
}


def write_base(base: Path) -> int:
    import llama_models

    c = LLAMA_3_2_1B
    d, kv = c["hidden_size"], c["num_key_value_heads"] * c["head_dim"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (c["intermediate_size"], d), p + "mlp.up_proj.weight": (c["intermediate_size"], d),
            p + "mlp.down_proj.weight": (d, c["intermediate_size"]),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        })
    generator = torch.Generator().manual_seed(0)
    tensors = {name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16) for name, shape in shapes.items()}
    (base / "original").mkdir(parents=True)
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps(c))
    (base / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": 128001}))
    params = {"dim": d, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "ffn_dim_multiplier": 1.5,
              "multiple_of": 256, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
    (base / "original" / "params.json").write_text(json.dumps(params))
    shutil.copy(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model", base / "original" / "tokenizer.model")
    return (base / "model.safetensors").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-dsus", type=int, default=5000)
    parser.add_argument("--workdir", type=Path, default=None, help="where the checkpoints go (default: a temp dir)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        size = write_base(work / "Llama-3.2-1B")
        start = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "extend.py"), "--base", str(work / "Llama-3.2-1B"),
                        "--n-dsus", str(args.n_dsus)], check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
        print(f"checkpoint {size / 1e9:.2f} GB, extend.py peak RSS {peak / 1e9:.2f} GB "
              f"= {peak / size:.2f}x the checkpoint (target < 2x), {seconds:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

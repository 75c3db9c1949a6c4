"""Training throughput: model.py's training step vs transformers' LlamaForCausalLM on the same weights.

    python bench/train.py                           # CPU, a small model, fp32
    python bench/train.py --shape 1b --device cuda  # Llama-3.2-1B shape + 5000 DSUs, bf16, seq 2048

One step = forward, loss, backward and AdamW over a batch of random token rows. Both models
are timed in the same run, alternating, after warm-up; tokens/s is the best of the timed rounds.
On a GPU it also prints MFU (model FLOPs per token from `model.flops_per_token` x tokens/s over
the GPU's dense bf16 peak, `--peak-tflops`) and peak memory.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import Llama, ModelConfig, flops_per_token, init_weights  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {
    # Llama-3.2-1B, vocabulary extended by 5000 DSUs + 2 modality tokens.
    "1b": dict(vocab_size=133258, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
               rope_scaling=LLAMA3_ROPE, max_position_embeddings=131072, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "small": dict(vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=32, rope_theta=500000.0,
                  rope_scaling=LLAMA3_ROPE, max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5),
}


def ours(config: ModelConfig, device, dtype, compile_model: bool):
    model = Llama(config, activation_checkpointing=False)
    init_weights(model, seed=0)
    model = model.to(device=device, dtype=dtype)
    step_model = torch.compile(model) if compile_model else model

    def loss(tokens, targets):
        loss_sum, count = step_model(tokens, labels=targets)
        return loss_sum / count

    return model, loss


def transformers_model(model: Llama, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(**model.config.to_hf())).to(device=device, dtype=dtype)
    result = hf.load_state_dict(model.state_dict(), strict=False)  # a tied head has no lm_head.weight of ours
    assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys, result

    def loss(tokens, targets):
        logits = hf(input_ids=tokens).logits
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    return hf, loss


def time_steps(runners, tokens, targets, steps: int, rounds: int, device) -> list[float]:
    """Best tokens/s of each runner over `rounds` alternating rounds of `steps` steps."""
    best = [0.0] * len(runners)
    for round_ in range(rounds + 1):  # round 0 warms up (allocator, compile)
        for k, (module, loss_fn, optimizer) in enumerate(runners):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                loss_fn(tokens, targets).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_:
                best[k] = max(best[k], steps * tokens.numel() / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per step (default: 8 CPU, 4 GPU)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: 256 CPU, 2048 GPU)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile our model")
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers (e.g. when it does not fit)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    batch, seq = args.batch_size or (4 if on_gpu else 8), args.seq_len or (2048 if on_gpu else 256)
    config = ModelConfig(**SHAPES[args.shape], torch_dtype="bfloat16" if on_gpu else "float32")

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch, seq), generator=generator).to(device)
    targets = torch.roll(tokens, -1, dims=1)

    model, our_loss = ours(config, device, dtype, args.compile)
    runners = [(model, our_loss, torch.optim.AdamW(model.parameters(), lr=1e-5, fused=on_gpu))]
    if not args.no_baseline:
        hf, hf_loss = transformers_model(model, device, dtype)
        runners.append((hf, hf_loss, torch.optim.AdamW(hf.parameters(), lr=1e-5, fused=on_gpu)))
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    rates = time_steps(runners, tokens, targets, args.steps, args.rounds, device)

    name = torch.cuda.get_device_name(device) if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}, torch {torch.__version__}, shape {args.shape}, batch {batch} x {seq}, {dtype}")
    print(f"model.py      {rates[0]:12,.0f} tok/s")
    if len(rates) > 1:
        print(f"transformers  {rates[1]:12,.0f} tok/s   model.py / transformers = {rates[0] / rates[1]:.2f}x")
    if on_gpu:
        mfu = flops_per_token(config, seq) * rates[0] / (args.peak_tflops * 1e12)
        print(f"MFU {mfu:.1%} of {args.peak_tflops:.0f} TFLOP/s; peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
              + (" (both models)" if len(rates) > 1 else ""))


if __name__ == "__main__":
    main()

"""Greedy generation on CPU: the built-in engine (generate.py) vs transformers' `generate()`, and vLLM
where it imports (run with .venv-vllm/bin/python after `make vllm`).

    python bench/generate.py [--threads 2] [--prompts 64] [--new-tokens 64] [--batch-size 32] [--enforce-eager]

Both run the same randomly initialised Llama checkpoint (a few million parameters, fp32) on the
same prompts (random ids, 150-300 tokens, like SFT ASR prompts), batched the same way: sorted by
length, longest first, left-padded with an attention mask. No stop token, so every prompt gets
exactly --new-tokens tokens. Prints tokens/s for each and their ratio, and checks that both
produced the same tokens (fp differences can flip an argmax tie, so mismatches are counted, not fatal).
vLLM gets all prompts in one call (it schedules them itself), fp32 like the others; its engine
start-up (loading, compiling unless --enforce-eager, KV-cache allocation) is timed on its own, apart
from its tokens/s, and its tokens are compared with the built-in engine's.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from generate import Sampling, generate, start_vllm, vllm_generate, vllm_status  # noqa: E402
from model import Llama, ModelConfig, init_weights, num_params  # noqa: E402
from model_dir import load_model, save_pretrained  # noqa: E402


def random_checkpoint(out_dir: Path, args) -> ModelConfig:
    config = ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 128),
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=4096, tie_word_embeddings=True,
    )
    model = Llama(config)
    init_weights(model, seed=args.seed)
    with torch.no_grad():  # wider than init, so greedy outputs depend on the context (see tests/test_generate.py)
        generator = torch.Generator().manual_seed(args.seed)
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3 / (args.hidden / 64) ** 0.5, generator=generator)
    save_pretrained(out_dir, config, model.state_dict())
    return config


def batches(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices in generate.py's order: longest first, in batches."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def ours(model: Llama, prompts, new_tokens: int, batch_size: int) -> list[list[int]]:
    return [r.token_ids for r in generate(model, prompts, Sampling(max_tokens=new_tokens), set(), batch_size)]


@torch.no_grad()
def transformers_generate(model, prompts, new_tokens: int, batch_size: int) -> list[list[int]]:
    results = [None] * len(prompts)
    for batch in batches(prompts, batch_size):
        width = max(len(prompts[i]) for i in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
        for row, i in enumerate(batch):
            results[i] = out[row, width:].tolist()
    return results


def best_time(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=150)
    parser.add_argument("--max-len", type=int, default=300)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the fastest counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.prompts,), generator=generator).tolist()
    prompts = [torch.randint(0, args.vocab, (n,), generator=generator).tolist() for n in lengths]
    tmp = tempfile.TemporaryDirectory()
    config = random_checkpoint(Path(tmp.name), args)
    model = load_model(tmp.name, dtype=torch.float32).eval()
    hf = LlamaForCausalLM.from_pretrained(tmp.name, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # like ours here: no stop token
    use_vllm, why = vllm_status("cpu")

    print(f"model: {num_params(config) / 1e6:.1f} M parameters, hidden {config.hidden_size}, "
          f"{config.num_hidden_layers} layers, vocab {config.vocab_size}; {args.prompts} prompts of "
          f"{min(lengths)}-{max(lengths)} tokens, "
          f"{args.new_tokens} new tokens, batch {args.batch_size}, {args.threads} threads")
    warm = prompts[:2]
    ours(model, warm, 2, args.batch_size)
    transformers_generate(hf, warm, 2, args.batch_size)
    ours_s, ours_ids = best_time(lambda: ours(model, prompts, args.new_tokens, args.batch_size), args.repeats)
    hf_s, hf_ids = best_time(lambda: transformers_generate(hf, prompts, args.new_tokens, args.batch_size), args.repeats)

    total = args.prompts * args.new_tokens
    print(f"built-in engine:          {total / ours_s:10.1f} tokens/s ({ours_s:.2f} s)")
    print(f"transformers generate():  {total / hf_s:10.1f} tokens/s ({hf_s:.2f} s)")
    print(f"ratio: {hf_s / ours_s:.2f}x")
    compare("transformers", hf_ids, ours_ids)
    if not use_vllm:
        print(f"vLLM: skipped ({why})")
        return
    started = time.perf_counter()
    greedy = Sampling(max_tokens=args.new_tokens)
    llm = start_vllm(Path(tmp.name), prompts, greedy, enforce_eager=args.enforce_eager)
    startup_s = time.perf_counter() - started
    vllm_generate(llm, warm, Sampling(max_tokens=2), set())
    vllm_s, vllm_ids = best_time(lambda: [g.token_ids for g in vllm_generate(llm, prompts, greedy, set())], args.repeats)
    vllm_total = sum(map(len, vllm_ids))  # counted, not assumed: vLLM would stop at an EOS in config.json
    print(f"vLLM ({why}{', eager' if args.enforce_eager else ''}): {vllm_total / vllm_s:10.1f} tokens/s "
          f"({vllm_s:.2f} s); engine start-up {startup_s:.1f} s, not included")
    print(f"ratio vLLM / built-in: {ours_s / vllm_s:.2f}x")
    compare("vLLM", vllm_ids, ours_ids)


def compare(name: str, theirs: list[list[int]], ours: list[list[int]]) -> None:
    same = sum(a == b for a, b in zip(ours, theirs))
    same_tokens = sum(x == y for a, b in zip(ours, theirs) for x, y in zip(a, b))
    total = sum(map(len, ours))
    print(f"{name}: identical generations to the built-in engine's: {same}/{len(ours)} ({same_tokens}/{total} tokens)")


if __name__ == "__main__":
    main()

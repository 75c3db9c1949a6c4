"""Training throughput packed vs padded, on the same samples: real (non-pad) tokens per second.

    python bench/packed_training.py                            # CPU, the small shape, fp32
    python bench/packed_training.py --shape 1b --device cuda   # Llama-3.2-1B shape + 5000 DSUs, bf16

Samples: the golden file's SFT samples (../shared/golden, 5000 DSUs; their tokens taken modulo the
vocabulary for the small shape), in a fixed shuffled order, every token trained (targets are the
next token of the same sample). One step = forward, loss, backward and AdamW, as train.py runs it:
  padded   `--padded-batch` samples per step, right-padded to the longest (the reference's SFT
           batches: causal SDPA, pad targets ignored);
  packed   `--rows` rows of `--max-seq-len` per step, filled by dsu_ops.place (train.PACK_OPEN_ROWS
           open rows) and written by the pack op: positions restart per sample and attention is
           block-diagonal (FlexAttention on CUDA, masked SDPA on CPU).
Each layout runs one warm-up pass over the samples (allocator, FlexAttention's compilation), then
`--rounds` timed passes; tokens/s is the best pass's real tokens over its time.
"""

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import dsu_ops  # noqa: E402
from data.samples import Pieces  # noqa: E402
from dsu_ops import IGNORE  # noqa: E402
from model import Llama, ModelConfig, init_weights  # noqa: E402
from data.batches import PACK_OPEN_ROWS  # noqa: E402


def bench_shapes() -> dict:
    """bench/train.py's model shapes (its module name is taken by the root's train.py)."""
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SHAPES


SHAPES = bench_shapes()

GOLDEN = ROOT.parent / "shared" / "golden" / "seed_compat_5000.json"


def golden_sft_samples(path: Path, vocab_size: int, max_seq_len: int) -> list[np.ndarray]:
    cases = [c for c in json.loads(path.read_text())["cases"] if c["kind"] == "sft"]
    order = np.random.default_rng(0).permutation(len(cases))
    return [np.asarray(cases[i]["tokens"][:max_seq_len], dtype=np.int64) % vocab_size for i in order]


def padded_batches(samples: list[np.ndarray], batch_size: int, pad_id: int):
    for first in range(0, len(samples), batch_size):
        group = samples[first : first + batch_size]
        width = max(map(len, group))
        tokens = torch.full((len(group), width), pad_id, dtype=torch.long)
        targets = torch.full((len(group), width), IGNORE, dtype=torch.long)
        for row, sample in enumerate(group):
            tokens[row, : len(sample)] = torch.from_numpy(sample)
            targets[row, : len(sample) - 1] = torch.from_numpy(sample[1:])
        yield tokens, targets, None, None


def packed_batches(samples: list[np.ndarray], rows_per_step: int, max_seq_len: int, pad_id: int):
    pieces = []
    for sample in samples:
        p = Pieces()
        p.add(sample)
        pieces.append(p)
    rows = dsu_ops.place([len(s) for s in samples], max_seq_len, PACK_OPEN_ROWS)
    for first in range(0, len(rows), rows_per_step):
        step_rows = [[pieces[i] for i in row] for row in rows[first : first + rows_per_step]]
        yield tuple(dsu_ops.pack(step_rows, 0, False, max_seq_len, pad_id))


def real_tokens(batch) -> int:
    tokens, targets, positions, document_ids = batch
    return int((document_ids >= 0).sum()) if document_ids is not None else int((targets != IGNORE).sum()) + len(tokens)


def run_pass(model, optimizer, batches, device) -> float:
    """Seconds for one pass of training steps over `batches`."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        tokens, targets, positions, document_ids = (None if t is None else t.to(device, non_blocking=True) for t in batch)
        loss_sum, count = model(tokens, positions=positions, document_ids=document_ids, labels=targets)
        (loss_sum / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--golden", type=Path, default=GOLDEN)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=None, help="packed rows per step (default: 4 GPU, 1 CPU)")
    parser.add_argument("--padded-batch", type=int, nargs="+", default=None,
                        help="samples per padded step, one run each (default: 2 and 8 GPU, 2 CPU)")
    parser.add_argument("--samples", type=int, default=None, help="use the first N samples (default: all 320 GPU, 64 CPU)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    config = ModelConfig(**SHAPES[args.shape], torch_dtype="bfloat16" if on_gpu else "float32")
    samples = golden_sft_samples(args.golden, config.vocab_size, args.max_seq_len)[: args.samples or (320 if on_gpu else 64)]
    pad_id = 0
    model = Llama(config)
    init_weights(model, seed=0)
    model = model.to(device=device, dtype=dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=on_gpu)

    layouts = [(f"padded, {b} samples/step", list(padded_batches(samples, b, pad_id)))
               for b in args.padded_batch or ([2, 8] if on_gpu else [2])]
    rows = args.rows or (4 if on_gpu else 1)
    layouts.append((f"packed, {rows} x {args.max_seq_len}/step", list(packed_batches(samples, rows, args.max_seq_len, pad_id))))
    n_real = sum(len(s) for s in samples)
    name = torch.cuda.get_device_name(device) if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}, torch {torch.__version__}, shape {args.shape}, {dtype}, {len(samples)} golden SFT samples, "
          f"{n_real:,} tokens (mean {n_real / len(samples):.0f})")
    rates = []
    for label, batches in layouts:
        assert sum(real_tokens(b) for b in batches) == n_real, label
        slots = sum(b[0].numel() for b in batches)
        run_pass(model, optimizer, batches, device)  # warm-up
        best = min(run_pass(model, optimizer, batches, device) for _ in range(args.rounds))
        rates.append(n_real / best)
        print(f"{label:28s} {len(batches):4d} steps  padding {1 - n_real / slots:6.1%}  {rates[-1]:12,.0f} real tok/s"
              f"  ({rates[-1] / rates[0]:.2f}x the first)")
    if on_gpu:
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()

"""The pack op's throughput: CUDA against the C++ CPU op, on a large batch of SFT-shaped samples.

    python bench/pack_op.py [--samples 16384] [--max-seq-len 2048]

Samples like the golden SFT ones (5000 DSUs): a masked prompt of ~60 text tokens, a DSU run of
300-1500 units with repeats (deduplication on, as the reference's default), a transcript of 10-60
text tokens; rows placed by dsu_ops.place. Timed: the op alone on inputs already where it runs
(CPU; CUDA with the flat inputs on the GPU), and the CUDA op called as train.py calls it
(dsu_ops.pack: NumPy inputs copied to the GPU, outputs on the GPU). Both outputs are checked equal
first. Tokens/s counts output tokens (rows x max_seq_len slots filled with real tokens).
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import dsu_ops  # noqa: E402
from data.samples import Pieces  # noqa: E402

DSU_OFFSET, PAD_ID = 128256, 128004


def sft_like(rng, n: int) -> list[Pieces]:
    samples = []
    for _ in range(n):
        p = Pieces()
        p.add(rng.integers(0, 128000, int(rng.integers(40, 80))), masked=True)
        units = rng.integers(0, 5000, int(rng.integers(200, 1000)))
        p.add(np.repeat(units, rng.integers(1, 3, len(units))), masked=True, is_dsu=True)
        p.add(rng.integers(0, 128000, int(rng.integers(10, 60))))
        samples.append(p)
    return samples


def best_seconds(fn, rounds: int, cuda: bool) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    ext = dsu_ops.build.extension()
    if ext is None:
        sys.exit("the extension did not build")
    samples = sft_like(np.random.default_rng(0), args.samples)
    lengths = dsu_ops.measure(dsu_ops.flatten(samples), True)
    placed = dsu_ops.place(lengths, args.max_seq_len, 64)
    rows = [[samples[i] for i in row] for row in placed]
    batch = dsu_ops.flatten([s for row in rows for s in row])
    row_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=row_offsets[1:])
    cpu_inputs = [torch.from_numpy(a) for a in (*batch, row_offsets)]
    scalars = (DSU_OFFSET, True, args.max_seq_len, PAD_ID)
    op = torch.ops.speech_llama.pack
    n_tokens = int(lengths.sum())
    print(f"# torch {torch.__version__}; {len(samples)} samples, {n_tokens:,} tokens in {len(rows)} rows of {args.max_seq_len}")
    cpu_s = best_seconds(lambda: op(*cpu_inputs, *scalars), args.rounds, False)
    print(f"CPU op (1 thread)          {n_tokens / cpu_s / 1e6:10.1f} M tok/s")
    if not (torch.cuda.is_available() and ext.with_cuda):
        print("no CUDA GPU or the extension has no CUDA ops: CPU only")
        return
    gpu_inputs = [t.cuda() for t in cpu_inputs]
    expected, got = op(*cpu_inputs, *scalars), op(*gpu_inputs, *scalars)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(expected, got)), "CUDA op differs from the CPU op"
    gpu_s = best_seconds(lambda: op(*gpu_inputs, *scalars), args.rounds, True)
    call_s = best_seconds(lambda: dsu_ops.pack(rows, DSU_OFFSET, True, args.max_seq_len, PAD_ID, device="cuda"),
                          args.rounds, True)
    print(f"CUDA op, inputs on GPU     {n_tokens / gpu_s / 1e6:10.1f} M tok/s   {cpu_s / gpu_s:6.1f}x the CPU op")
    print(f"dsu_ops.pack(device=cuda)  {n_tokens / call_s / 1e6:10.1f} M tok/s   {cpu_s / call_s:6.1f}x the CPU op"
          " (flattening in Python and the copy to the GPU included)")
    print(f"# {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()

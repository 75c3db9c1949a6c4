"""train.py's own training step, tokens/s, of this tree against an earlier commit's, in one run.

    python bench/train_loop.py [--base 6f3a196] [--steps 60] [--rounds 2]

Both trees train the same model on the same data with the same config (the demo's: a 96-wide,
4-layer Llama extended by the bundled corpus's 128 DSUs, ASR fine-tuning on data/mini, batches of
16, CPU, float32), unpacked and packed, alternating old and new `--rounds` times, each a fresh
`python train.py` process. The base commit's files are extracted (`git archive`) into a temporary
directory. A run's figure is the tokens/s train.py itself logs (metrics.jsonl) over its steps after
the first logging window, which holds start-up and the first (slower) steps; the best round counts.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "data" / "mini"
LOG_STEPS = 20


def run(args: list[str], cwd: Path) -> None:
    subprocess.run([sys.executable, *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def tokens_per_second(tree: Path, model: Path, run_dir: Path, steps: int, packed: bool) -> float:
    run(["train.py", "configs/demo_sft.json", f"run_dir={run_dir}", f"model.path={model}",
         f"data.train={MINI / 'train.jsonl'}", f"train.max_steps={steps}", f"train.log_steps={LOG_STEPS}",
         f"train.save_steps={steps}", f"data.packed={json.dumps(packed)}"], cwd=tree)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > LOG_STEPS]
    return statistics.mean(windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="6f3a196", help="the commit to compare against (default: before issue 12)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_tree = tmp / "base-tree"
        base_tree.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.base], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(base_tree)], input=archive.stdout, check=True)
        run(["tiny_model.py", str(tmp / "base"), "--transcripts", str(MINI / "train.jsonl"), "--vocab-size", "384",
             "--hidden", "96", "--layers", "4", "--heads", "3", "--kv-heads", "1", "--intermediate", "256",
             "--rope-theta", "10000"], cwd=ROOT)
        run(["extend.py", "--base", str(tmp / "base"), "--n-dsus", "128", "--out", str(tmp / "model")], cwd=ROOT)
        best = {}
        for round_ in range(args.rounds):
            for packed in (False, True):
                for name, tree in (("before", base_tree), ("after", ROOT)):
                    run_dir = tmp / f"run-{name}-{packed}-{round_}"
                    value = tokens_per_second(tree, tmp / "model", run_dir, args.steps, packed)
                    key = (packed, name)
                    best[key] = max(best.get(key, 0.0), value)
                    print(f"round {round_ + 1} {'packed' if packed else 'padded'} {name}: {value:,.0f} tokens/s",
                          flush=True)

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"base {args.base}, {args.steps} steps per run, best of {args.rounds} rounds, tokens/s after step {LOG_STEPS}:")
    for packed in (False, True):
        before, after = best[packed, "before"], best[packed, "after"]
        print(f"  {'packed' if packed else 'padded'}: before {before:,.0f}, after {after:,.0f} ({after / before:.2f}x)")


if __name__ == "__main__":
    main()

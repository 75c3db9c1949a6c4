"""The Python side of bench/gpu.sh, issue 23's prepared GPU check: one subcommand per step.

    python bench/gpu_check.py setup --shape 1b --work W --tokenizer PATH   # model + data
    python bench/gpu_check.py train --shape 1b --work W --run packed       # train.py as its CLI runs it
    python bench/gpu_check.py train --shape 1b --work W --run padded
    python bench/gpu_check.py reference --shape 1b --work W                # bench/reference_stack.py
    python bench/gpu_check.py table --work W --steps W/steps.tsv --peak-tflops 989

`setup` writes a base model of the shape with random weights and the real Llama 3 tokenizer.model,
extends it by 5000 DSUs with extend.py (as a user would), and writes synthetic HuBERT-like SFT rows
in the project's schema. `train` runs train.py's `main` in this process with configs/sft_hubert.json
and the run's overrides, then reads its metrics.jsonl: real (non-pad) tokens per second over the
steps after the warm-up (compilation), the first step's time and loss, and the peak memory (GPU:
torch's peak allocation; CPU: the process's peak RSS). `table` joins the steps' results into one
markdown table for bench/RESULTS.md. Shape "tiny" is the CPU dry run: same code, tiny model, fp32.
"""

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/: the root's train.py, not bench/train.py

import numpy as np  # noqa: E402
import torch  # noqa: E402

N_DSUS = 5000
CONFIG = ROOT / "configs" / "sft_hubert.json"
BASE_VOCAB = 128256  # Llama 3: 128,000 BPE ranks + 256 special tokens
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

# model: the base model's shape (Llama-3.2-1B's for "1b"); rows and units: the synthetic data
# (units: mean deduplicated DSUs per utterance); steps / warmup: optimizer steps per training run,
# the first `warmup` of which are not timed; overrides: what every run adds to configs/sft_hubert.json,
# packed / padded: what each of those runs adds.
SHAPES = {
    "1b": dict(
        model=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=64, torch_dtype="bfloat16"),
        rows=1200, units=430, steps=30, warmup=5,
        overrides=[], packed=["data.packed=true"], padded=[],
    ),
    "tiny": dict(
        model=dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, torch_dtype="float32"),
        rows=48, units=30, steps=5, warmup=2,
        overrides=["model.dtype=float32", "model.compile=false", "train.device=cpu", "data.max_seq_len=256",
                   "train.grad_accum=2"],
        packed=["data.packed=true", "train.batch_size=1"], padded=[],
    ),
}

WORDS = ("the of and to in that is was he for it with as his on be at by had not are but from or have an they "
         "which one you were her all she there would their we him been has when who will more no if out so said "
         "what up its about into than them can only other new some could time these two may then do first any my "
         "now such like our over man me even most made after also did many before must through back years where "
         "much your way well down should because each just those people how too little state good very make world "
         "still own see men work long get here between both life being under never day same another know while "
         "last might us great old year off come since against go came right used take three").split()


# -- setup: the model and the data ---------------------------------------------------------------


def model_config(shape: str, vocab_size: int):
    from model import ModelConfig

    return ModelConfig(**SHAPES[shape]["model"], vocab_size=vocab_size, rms_norm_eps=1e-5, rope_theta=500000.0,
                       rope_scaling=dict(LLAMA3_ROPE), max_position_embeddings=131072, tie_word_embeddings=True,
                       bos_token_id=128000, eos_token_id=128001)


def write_base_model(directory: Path, shape: str, tokenizer: Path, device: torch.device) -> None:
    """A Llama 3.2-layout base model directory: random N(0, 0.02) weights (norms 1) in the shape's
    dtype, the real Llama 3 tokenizer.model, config.json, generation_config.json, params.json."""
    from model import DTYPES, Llama
    from model_dir import save_pretrained
    from tiny_model import meta_ffn_params

    config = model_config(shape, BASE_VOCAB)
    with torch.device("meta"):  # names and shapes from model.py, no memory
        shapes = {name: tuple(t.shape) for name, t in Llama(config).state_dict().items()}
    generator = torch.Generator(device).manual_seed(0)
    weights = {}
    for name, size in shapes.items():
        tensor = torch.ones(size) if name.endswith("norm.weight") else \
            torch.randn(size, generator=generator, device=device).mul_(0.02)
        weights[name] = tensor.to(DTYPES[config.torch_dtype]).cpu()
    (directory / "original").mkdir(parents=True)
    save_pretrained(directory, config, weights)
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": 128001}))
    multiplier, multiple_of = meta_ffn_params(config.hidden_size, config.intermediate_size)
    params = {"dim": config.hidden_size, "n_layers": config.num_hidden_layers, "n_heads": config.num_attention_heads,
              "n_kv_heads": config.num_key_value_heads, "vocab_size": BASE_VOCAB, "ffn_dim_multiplier": multiplier,
              "multiple_of": multiple_of, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
    (directory / "original" / "params.json").write_text(json.dumps(params))
    shutil.copy(tokenizer, directory / "original" / "tokenizer.model")


def hubert_like_rows(n_rows: int, mean_units: int, seed: int = 0) -> list[dict]:
    """SFT rows in the reference's schema, shaped like HuBERT large layer-22 k-means units: 50 frames/s,
    5000 units, runs of a repeated unit (mean 1.67 frames) that deduplication collapses to about
    `mean_units` units per utterance, and about 2.5 words a second with evenly spread word times."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_rows):
        n_units = int(np.clip(rng.normal(mean_units, mean_units * 0.15), mean_units // 2, mean_units * 3 // 2))
        units = rng.integers(0, N_DSUS - 1, n_units)
        units[1:] += units[1:] >= units[:-1]  # never the previous unit: exactly n_units after deduplication
        frames = np.repeat(units, rng.geometric(0.6, n_units))
        seconds = len(frames) / 50
        words = [str(w) for w in rng.choice(WORDS, max(1, round(seconds * 2.5)))]
        edges = np.linspace(0.0, seconds, len(words) + 1).round(3)
        rows.append({"id": f"synthetic-{i:05d}", "transcript": " ".join(words), "tokenized": words,
                     "aligned_token_start_time": edges[:-1].tolist(), "aligned_token_end_time": edges[1:].tolist(),
                     "speech_tokens": frames.tolist()})
    return rows


def setup(args) -> None:
    work, shape = args.work, SHAPES[args.shape]
    device = torch.device("cuda" if torch.cuda.is_available() and args.shape != "tiny" else "cpu")
    for name in ("base", "model", "data"):
        shutil.rmtree(work / name, ignore_errors=True)
    start = time.perf_counter()
    write_base_model(work / "base", args.shape, args.tokenizer, device)
    print(f"setup: base model ({args.shape} shape, random weights, {args.tokenizer}) in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "extend.py"), "--base", str(work / "base"), "--n-dsus", str(N_DSUS),
                    "--out", str(work / "model")], check=True)
    print(f"setup: extend.py --n-dsus {N_DSUS} in {time.perf_counter() - start:.1f} s", flush=True)
    shutil.rmtree(work / "base")  # only the extended model is trained
    rows = hubert_like_rows(shape["rows"], shape["units"])
    (work / "data").mkdir()
    with open(work / "data" / "train.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    frames = np.mean([len(r["speech_tokens"]) for r in rows])
    print(f"setup: {len(rows)} synthetic HuBERT-like SFT rows ({frames:.0f} frames, about {shape['units']} units "
          "after deduplication, per row)", flush=True)


# -- train: train.py's CLI, in this process -------------------------------------------------------


def train_args(work: Path, shape: str, run: str) -> list[str]:
    """train.py's command line for a run ("packed" or "padded"; the reference stack reads the padded one's)."""
    s = SHAPES[shape]
    return [str(CONFIG), f"run_dir={work / run}", f"model.path={work / 'model'}",
            f"data.train={work / 'data' / 'train.jsonl'}", f"data.cache_dir={work / 'data_cache'}",
            f"train.max_steps={s['steps']}", *s["overrides"], *s[run]]


def steady_rate(records: list[dict], warmup: int) -> tuple[float, float, int]:
    """(real tokens/s over the logged windows after step `warmup`, seconds of the first window, steps timed)
    from metrics.jsonl records: each logged record has the cumulative `tokens` and the window's `tokens_per_s`."""
    logged = [r for r in records if "tokens_per_s" in r]
    tokens, seconds, steps, before, first = 0, 0.0, 0, 0, None
    previous_step = 0
    for record in logged:
        window = record["tokens"] - before
        duration = window / record["tokens_per_s"] if record["tokens_per_s"] else 0.0
        if first is None:
            first = duration
        if record["step"] > warmup:
            tokens, seconds, steps = tokens + window, seconds + duration, steps + record["step"] - previous_step
        before, previous_step = record["tokens"], record["step"]
    return (tokens / seconds if seconds else float("nan")), (first or float("nan")), steps


def peak_memory(device_type: str) -> tuple[float, str]:
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30, "GPU allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process RSS"  # Linux: KiB


def flops_at_max_len(work: Path, argv: list[str]) -> tuple[int, int]:
    """(model.flops_per_token at data.max_seq_len, that length) for the trained model and train.py's argv."""
    from config import load_config
    from model import ModelConfig, flops_per_token

    max_seq_len = load_config(argv[0], argv[1:])["data"]["max_seq_len"]
    return flops_per_token(ModelConfig.from_file(work / "model" / "config.json"), max_seq_len), max_seq_len


def run_train(args) -> int:
    import train

    assert Path(train.__file__).resolve().parent == ROOT, f"imported {train.__file__}, not the root's train.py"
    work, shape = args.work, SHAPES[args.shape]
    argv = train_args(work, args.shape, args.run)
    shutil.rmtree(work / args.run, ignore_errors=True)
    print("train.py " + " ".join(argv[0:1] + [a.replace(str(work), "$WORK") for a in argv[1:]]), flush=True)
    device_type = "cuda" if torch.cuda.is_available() and "train.device=cpu" not in argv else "cpu"
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start, error = time.perf_counter(), None
    try:
        status = train.main(argv)
    except Exception as exc:  # noqa: BLE001 - what train.py raised after its steps is reported, below
        status, error = 1, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    wall = time.perf_counter() - start
    memory, memory_kind = peak_memory(device_type)
    metrics = work / args.run / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    steps_done = max((r["step"] for r in records if "loss" in r), default=0)
    if steps_done < shape["steps"]:
        print(f"train.py stopped after {steps_done} of {shape['steps']} steps (exit status {status}"
              f"{', ' + error if error else ''})", file=sys.stderr)
        return 1
    rate, first, timed = steady_rate(records, shape["warmup"])
    flops, max_len = flops_at_max_len(work, argv)
    step1 = next(r for r in records if r["step"] == 1 and "loss" in r)
    result = {"run": args.run, "tokens_per_s": rate, "timed_steps": timed, "warmup_steps": shape["warmup"],
              "first_step_s": first, "loss_step1": step1["loss"], "peak_memory_gib": memory,
              "peak_memory_kind": memory_kind, "flops_per_token": flops, "flops_seq_len": max_len,
              "tokens": records[-1]["tokens"] if "tokens" in records[-1] else None, "wall_s": wall,
              "device": device_type, "argv": [a.replace(str(work), "$WORK") for a in argv],
              "note": f"train.py raised after its last step: {error}" if error else ""}
    (work / f"{args.run}.json").write_text(json.dumps(result, indent=1))
    print(f"{args.run}: {rate:,.0f} real tokens/s over steps {shape['warmup'] + 1}..{shape['steps']}, first step "
          f"{first:.1f} s, step-1 loss {step1['loss']:.5f}, peak memory {memory:.2f} GiB ({memory_kind})", flush=True)
    shutil.rmtree(work / args.run / "checkpoints", ignore_errors=True)  # GBs at the 1B shape
    return 0


def run_reference(args) -> int:
    import reference_stack  # bench/, beside this file

    return reference_stack.main(args.work, train_args(args.work, args.shape, "padded"), SHAPES[args.shape])


# -- table ----------------------------------------------------------------------------------------


def lock_line() -> str:
    lines = (ROOT / "requirements.lock").read_text().splitlines()[:3]
    inputs = next((line.split()[2] for line in lines if line.startswith("# inputs")), "?")
    made = next((line.rsplit("made ", 1)[-1] for line in lines if "made " in line), "?")
    return f"lock {inputs[:8]} ({made})"


def machine_name() -> str:
    if torch.cuda.is_available():
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=30).stdout.strip().splitlines()
            if names:
                return f"{names[0]} (x{len(names)})" if len(names) > 1 else names[0]
        except (OSError, subprocess.SubprocessError):
            pass
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if head.returncode == 0:
            return head.stdout.strip() + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown (no git repository here)"


def number(value, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(args) -> str:
    steps = [line.split("\t") for line in args.steps.read_text().split("\n") if line.strip()]
    results = {name: json.loads((args.work / f"{name}.json").read_text())
               for name in ("packed", "padded", "reference") if (args.work / f"{name}.json").exists()}
    dry = args.dry_run
    peak = args.peak_tflops * 1e12
    rows = []
    for key, label, status, seconds, detail in steps:
        r = results.get(key) if status == "ok" else None
        rate = mfu = memory = ""
        if r:
            rate = number(r["tokens_per_s"], ",.0f")
            mfu = r["flops_per_token"] * r["tokens_per_s"] / peak
            mfu = f"{100 * mfu:.2g}%" if dry else number(mfu, ".1%")  # a tiny CPU run's is ~1e-7 of the GPU peak
            memory = f"{r['peak_memory_gib']:.1f} GiB" + (" RSS" if r["peak_memory_kind"] == "process RSS" else "")
            detail = "; ".join(x for x in (detail, f"{r['timed_steps']} steps timed after {r['warmup_steps']}, "
                                           f"first step {r['first_step_s']:.1f} s, step-1 loss {r['loss_step1']:.4f}",
                                           r.get("note", "")) if x)
        rows.append(f"| {label} | {status} | {seconds} | {rate} | {mfu} | {memory} | {detail} |")
    summary = []
    if "packed" in results and "reference" in results:
        ratio = results["packed"]["tokens_per_s"] / results["reference"]["tokens_per_s"]
        goal = "(CPU, tiny model: not the goal's measure)" if dry else "(goal >= 2.5x)"
        summary.append(f"| **train.py packed / reference stack** | | | **{ratio:.2f}x** {goal} | | | |")
    if "padded" in results and "reference" in results:
        ratio = results["padded"]["tokens_per_s"] / results["reference"]["tokens_per_s"]
        summary.append(f"| train.py padded / reference stack (same batches) | | | {ratio:.2f}x | | | |")
    if "packed" in results and not dry:
        r = results["packed"]
        summary.append(f"| **train.py packed MFU** | | | | **{r['flops_per_token'] * r['tokens_per_s'] / peak:.1%}** "
                       "(goal >= 55%) | | |")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    kind = ("**CPU dry run: these are CPU numbers of a tiny model, not GPU figures**" if dry else "GPU run")
    shape = SHAPES["tiny" if dry else "1b"]
    lines = [
        f"### bench/gpu.sh{' --dry-run' if dry else ''}, {when}: {machine_name()}",
        "",
        f"{kind}. torch {torch.__version__}, Python {platform.python_version()}, {lock_line()}, commit {commit()}. "
        f"Model: {'a tiny' if dry else 'the Llama-3.2-1B'} shape ({shape['model']['num_hidden_layers']} layers, "
        f"{shape['model']['hidden_size']} wide) with random weights and the real Llama 3 tokenizer, extended by "
        f"{N_DSUS} DSUs + 2 modality tokens; {shape['rows']} synthetic HuBERT-like SFT rows (about {shape['units']} "
        f"units each after deduplication); {shape['steps']} optimizer steps per run, the first ones (compilation) "
        "not timed. Real tokens/s counts non-pad input tokens (train.py: its metrics.jsonl `tokens_per_s` windows). "
        "MFU: `model.flops_per_token` at `data.max_seq_len` x real tokens/s over "
        f"{args.peak_tflops:g} TFLOP/s (dense bf16 peak given with --peak-tflops). Peak memory: torch's peak "
        "allocation on the GPU, the process's peak RSS on a CPU.",
        "",
        "| step | status | time (s) | real tokens/s | MFU | peak memory | notes |",
        "|---|---|---|---|---|---|---|",
        *rows,
        *summary,
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("setup", "train", "reference", "table"):
        p = sub.add_parser(name)
        p.add_argument("--work", type=Path, required=True, help="the check's working directory")
        if name != "table":
            p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    sub.choices["setup"].add_argument("--tokenizer", type=Path, required=True, help="Llama 3's tokenizer.model")
    sub.choices["train"].add_argument("--run", choices=("packed", "padded"), required=True)
    sub.choices["table"].add_argument("--steps", type=Path, required=True, help="gpu.sh's steps.tsv")
    sub.choices["table"].add_argument("--peak-tflops", type=float, default=989.0)
    sub.choices["table"].add_argument("--dry-run", action="store_true")
    sub.choices["table"].add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    if args.command == "setup":
        setup(args)
        return 0
    if args.command == "train":
        return run_train(args)
    if args.command == "reference":
        return run_reference(args)
    text = table(args)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

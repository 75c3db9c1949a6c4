"""Speech BPE (extend.py --dsu-bpe) on the bundled corpus: how much shorter speech gets, what the
encoding costs in sample construction, and what it does to training speed and WER.

    python bench/speech_bpe.py lengths [--merges 256 512 2048]
    python bench/speech_bpe.py construction [--merges 512] [--seconds 3]
    python bench/speech_bpe.py compare BASELINE_DEMO BPE_DEMO [...]   (directories made by `make demo`)

`lengths`: BPEs learnt from data/mini/train.jsonl as extend.py learns them; speech tokens per test
utterance raw, deduplicated, and deduplicated + BPE. `construction`: SFT and CPT-interleaved
sequences built from the training rows and packed by the kernels' op, one CPU thread, without and
with the BPE (encoded before the op). `compare`: training tokens/s and time per epoch from each
run's metrics.jsonl, and test WER on the voices training heard and on those it never heard, each
with a 95% bootstrap interval, plus a paired bootstrap interval of the WER difference to the first run.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import dsu_ops  # noqa: E402
import wer  # noqa: E402
from data.dataset import load_rows  # noqa: E402
from data.samples import Interleave, SampleBuilder, deduplicate_runs  # noqa: E402
from data.tokenizer import (DSU_BPE_MODEL, DSU_BPE_SETTINGS, Tokenizer, bpe_lines,  # noqa: E402
                            extended_tokenizer_bytes, read_bpe_file, units_text)
from extend import learn_speech_bpe  # noqa: E402

MINI = ROOT / "data" / "mini"
N_DSUS = 128
PROMPT = "Transcribe the speech."


def tokenizer_with_bpe(merges: int | None) -> Tokenizer:
    """The real Llama 3 tokenizer (llama-models) extended by the corpus's DSUs, with a speech BPE of
    `merges` learnt from the training split (none for None), in a temporary directory."""
    import llama_models

    base = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    n_ranks = len(read_bpe_file(base))
    text = extended_tokenizer_bytes(base.read_bytes(), n_ranks, N_DSUS, True)
    out = Path(tempfile.mkdtemp())
    if merges:
        bpe = learn_speech_bpe(str(MINI / "train.jsonl"), N_DSUS, merges, deduplicate=True, init="mean")
        text += bpe_lines([units_text(u).encode() for u in bpe.merged_units], n_ranks + N_DSUS + 2)
        (out / DSU_BPE_MODEL).write_bytes(bpe.model)
        (out / DSU_BPE_SETTINGS).write_text(json.dumps(bpe.settings))
    (out / "tokenizer.model").write_bytes(text)
    return Tokenizer(out / "tokenizer.model")


def lengths(args) -> None:
    rows = load_rows(str(MINI / "test.jsonl"))
    unseen = set(json.loads((MINI / "corpus.json").read_text())["voices"]["test_only"])
    raw = np.mean([len(r["speech_tokens"]) for r in rows])
    dedup = np.mean([len(deduplicate_runs(r["speech_tokens"])) for r in rows])
    print(f"test split, {len(rows)} utterances: {raw:.1f} units raw, {dedup:.1f} deduplicated ({raw / dedup:.2f}x)")
    print("| merges | read data + learn (s) | speech tokens / utt. | vs deduplicated | vs raw | "
          "vs dedup., heard voices | vs dedup., unseen voices |\n|---|---|---|---|---|---|---|")
    print(f"| none | | {dedup:.1f} | 1.00x | {raw / dedup:.2f}x | 1.00x | 1.00x |")
    for merges in args.merges:
        started = time.perf_counter()
        tok = tokenizer_with_bpe(merges)
        learnt = time.perf_counter() - started
        units = [len(deduplicate_runs(r["speech_tokens"])) for r in rows]
        ids = [len(tok.speech_ids(deduplicate_runs(r["speech_tokens"]))) for r in rows]
        ratio = {want: sum(u for u, r in zip(units, rows) if (r["speaker"] in unseen) == want)
                 / sum(n for n, r in zip(ids, rows) if (r["speaker"] in unseen) == want) for want in (False, True)}
        n = np.mean(ids)
        print(f"| {merges} | {learnt:.1f} | {n:.1f} | {dedup / n:.2f}x | {raw / n:.2f}x | {ratio[False]:.2f}x | "
              f"{ratio[True]:.2f}x |")


def construction(args) -> None:
    torch.set_num_threads(1)
    rows = load_rows(str(MINI / "train.jsonl"))
    settings = Interleave(16000, 320, 39.43, 0.1)
    dsu_ops.pack([[SampleBuilder(tokenizer_with_bpe(None), deduplicate=True, modality_tokens=True, max_seq_len=None)
                   .sft_asr_pieces(rows[0], PROMPT, train_on_input=False)]], 0, True, 2048, 0)  # loads the ops
    print("| sequences | BPE | sequences/s | tokens/s | speech tokens per sequence |\n|---|---|---|---|---|")
    for merges in (None, args.merges):
        tok = tokenizer_with_bpe(merges)
        builder = SampleBuilder(tok, deduplicate=True, modality_tokens=True, max_seq_len=2048)
        pad = tok.special_ids["<|finetune_right_pad_id|>"]
        kinds = {
            "SFT": lambda i: builder.sft_asr_pieces(rows[i], PROMPT, train_on_input=False),
            "CPT interleaved": lambda i: builder.cpt_interleaved_pieces(rows[i], i, 0, settings),
        }
        for kind, pieces_of in kinds.items():
            n_seq = n_tok = n_speech = 0
            started = time.perf_counter()
            while time.perf_counter() - started < args.seconds:
                for first in range(0, len(rows), 64):  # a batch of 64 sequences, one row each, per op call
                    batch = [pieces_of(i) for i in range(first, min(first + 64, len(rows)))]
                    packed = dsu_ops.pack([[p] for p in batch], tok.dsu_offset, True, 2048, pad)
                    real = packed.tokens[packed.document_ids >= 0]
                    n_seq, n_tok = n_seq + len(batch), n_tok + real.numel()
                    n_speech += int(tok.is_speech(real).sum())
                    if time.perf_counter() - started >= args.seconds:
                        break
            seconds = time.perf_counter() - started
            print(f"| {kind} | {merges or 'none'} | {n_seq / seconds:,.0f} | {n_tok / seconds:,.0f} | "
                  f"{n_speech / n_seq:.1f} |")


def run_figures(demo: Path) -> dict:
    """Training throughput and test WER of a `make demo` directory."""
    metrics = [json.loads(line) for line in (demo / "sft" / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in metrics if "tokens_per_s" in m]
    steps = max(m["step"] for m in metrics if "loss" in m)
    config = json.loads(next((demo / "sft" / "checkpoints").glob("step_*/training_config.json")).read_text())
    rows_per_epoch = len(load_rows(config["data"]["train"], fields=("transcript",)))
    per_step = config["train"]["batch_size"] * config["train"]["grad_accum"]
    # tokens/s is logged over each log interval: time per interval = its tokens / its rate.
    seconds = sum((b["tokens"] - a["tokens"]) / b["tokens_per_s"] for a, b in zip(logged, logged[1:]))
    train_steps = logged[-1]["step"] - logged[0]["step"]
    return {"steps": steps, "tokens_per_s": (logged[-1]["tokens"] - logged[0]["tokens"]) / seconds,
            "tokens_per_step": logged[-1]["tokens"] / logged[-1]["step"],
            "epoch_s": seconds / train_steps * rows_per_epoch / per_step,
            "train_s": seconds / train_steps * steps, "generations": demo / "trained" / "generations.jsonl"}


def utterance_errors(generations: Path) -> dict[str, tuple[int, int]]:
    records = [json.loads(line) for line in generations.read_text().splitlines()]
    normalize = wer.make_normalizer("whisper")
    refs, hyps = [normalize(r["reference"]) for r in records], [normalize(r["text"]) for r in records]
    counts = wer.per_utterance_counts(refs, hyps)
    errors = counts["substitutions"] + counts["deletions"] + counts["insertions"]
    words = counts["substitutions"] + counts["deletions"] + counts["hits"]
    return {r["id"]: (int(e), int(w)) for r, e, w in zip(records, errors, words)}


def paired_interval(a: np.ndarray, b: np.ndarray, words: np.ndarray, resamples: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of WER(b) - WER(a) over the same resampled utterances."""
    picks = np.random.default_rng(0).integers(0, len(words), size=(resamples, len(words)))
    diff = (b[picks].sum(1) - a[picks].sum(1)) / words[picks].sum(1)
    return tuple(np.percentile(diff, [2.5, 97.5]))


def compare(args) -> None:
    test = load_rows(str(MINI / "test.jsonl"), fields=("transcript",))
    unseen = set(json.loads((MINI / "corpus.json").read_text())["voices"]["test_only"])
    heard = {row["id"]: row["speaker"] not in unseen for row in test}
    figures = [run_figures(Path(d)) for d in args.demos]
    errors = [utterance_errors(f["generations"]) for f in figures]
    print("| run | steps | tokens/step | tokens/s | epoch | training | voices | WER (95% CI) | "
          "vs first run (paired 95% CI) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for demo, fig, errs in zip(args.demos, figures, errors):
        for voices, want in (("heard", True), ("unseen", False)):
            ids = [i for i in errs if heard[i] == want]
            e, w = (np.array([errs[i][k] for i in ids]) for k in (0, 1))
            low, high = wer.bootstrap_interval(e, w, 1000, 0)
            base = np.array([errors[0][i][0] for i in ids])
            d_low, d_high = paired_interval(base, e, w)
            print(f"| {demo} | {fig['steps']} | {fig['tokens_per_step']:.0f} | {fig['tokens_per_s']:,.0f} | "
                  f"{fig['epoch_s']:.0f} s | {fig['train_s'] / 60:.1f} min | {voices} | "
                  f"{100 * e.sum() / w.sum():.1f}% ({100 * low:.1f}-{100 * high:.1f}) | "
                  f"{100 * (e.sum() - base.sum()) / w.sum():+.1f} ({100 * d_low:+.1f} to {100 * d_high:+.1f}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("lengths")
    p.add_argument("--merges", type=int, nargs="+", default=[256, 512, 2048])
    p = sub.add_parser("construction")
    p.add_argument("--merges", type=int, default=512)
    p.add_argument("--seconds", type=float, default=3.0)
    p = sub.add_parser("compare")
    p.add_argument("demos", nargs="+")
    args = parser.parse_args()
    {"lengths": lengths, "construction": construction, "compare": compare}[args.command](args)


if __name__ == "__main__":
    main()

"""Sample construction throughput on one CPU core: token-level builders vs the reference's string path.

    python bench/construction.py [--seconds 3]

Both paths build the golden file's samples with its settings (the real Llama 3 tokenizer from
the llama-models package, extended by 5000 DSUs with modality tokens, deduplication on and off)
and must produce identical tokens; the script checks that before timing. Each path gets its rows
as its loader delivers them: lists of ints for the string path (as Hugging Face `datasets` gives
the reference), `speech_tokens` as a numpy array for ours (as `data.dataset` gives it). Prints
tokens/s for each path and their ratio; the baseline is measured in the same run.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from data.samples import Interleave, SampleBuilder  # noqa: E402
from data.tokenizer import Tokenizer, extended_tokenizer_bytes, read_bpe_file  # noqa: E402
from tests import reference_strings as ref  # noqa: E402

GOLDEN = ROOT.parent / "shared" / "golden" / "seed_compat_5000.json"


def extended_llama3_tokenizer(n_dsus: int) -> Tokenizer:
    import llama_models

    base_path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    out = Path(tempfile.mkdtemp()) / "tokenizer.model"
    out.write_bytes(extended_tokenizer_bytes(base_path.read_bytes(), len(read_bpe_file(base_path)), n_dsus, True))
    return Tokenizer(out)


def workloads(tok: Tokenizer, golden: dict):
    """(name, token-level fn, string-path fn); each fn builds every sample once and returns token count."""
    rows, prompt = golden["samples"], golden["sft_system_prompt"]
    loaded = [dict(row, speech_tokens=np.asarray(row["speech_tokens"], dtype=np.int64)) for row in rows]
    c = golden["cpt_interleave"]
    settings = Interleave(c["sampling_rate"], c["downsampling_ratio"], c["mean_seq_len_tokens"], c["binom_prob"])
    builders = {d: SampleBuilder(tok, deduplicate=d, modality_tokens=True, max_seq_len=None) for d in (True, False)}

    def cpt_fast():
        n = 0
        for d, b in builders.items():
            for i, row in enumerate(loaded):
                n += len(b.cpt_interleaved(row, i, 0, settings)[0])
                n += len(b.cpt_concatenated(row, True)[0]) + len(b.cpt_concatenated(row, False)[0])
        return n

    def cpt_strings():
        n = 0
        for d in builders:
            for i, row in enumerate(rows):
                n += len(ref.cpt_tokens(tok, ref.interleaved_string(row, i, 0, d, True, settings), None))
                for text_first in (True, False):
                    n += len(ref.cpt_tokens(tok, ref.concatenated_string(row, text_first, d, True), None))
        return n

    def sft_fast():
        return sum(len(b.sft_asr(row, prompt, False)[0]) for b in builders.values() for row in loaded)

    def sft_strings():
        return sum(len(ref.sft_tokens(tok, row, prompt, d, True, False)) for d in builders for row in rows)

    return [("CPT", cpt_fast, cpt_strings), ("SFT", sft_fast, sft_strings)]


def best_tokens_per_second(fns, seconds: float, rounds: int = 5) -> list[float]:
    """Best of `rounds` alternating timings of each fn: a busy machine slows both alike."""
    best = [0.0] * len(fns)
    for fn in fns:
        fn()  # warm-up
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            n_tokens, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / rounds:
                n_tokens += fn()
            best[k] = max(best[k], n_tokens / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="time per path and workload")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core

    golden = json.loads(GOLDEN.read_text())
    tok = extended_llama3_tokenizer(golden["n_dsus"])
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}, one core")
    print(f"{'workload':8} {'string path tok/s':>18} {'token-level tok/s':>18} {'speed-up':>9}")
    for name, fast, strings in workloads(tok, golden):
        assert fast() == strings(), f"{name}: token counts differ between the two paths"
        base, ours = best_tokens_per_second([strings, fast], args.seconds)
        print(f"{name:8} {base / 1e6:16.2f} M {ours / 1e6:16.2f} M {ours / base:8.1f}x")


if __name__ == "__main__":
    main()

"""Tiny extended models and speech-text data in the reference schema, for fast training tests."""

import json
import random
import sys
from pathlib import Path

WORDS = ["the", "a", "cat", "dog", "red", "blue", "runs", "sits", "near", "over",
         "one", "two", "three", "four", "big", "small", "bird", "sings", "and", "green"]
N_DSUS = 64
FRAMES_PER_SECOND = 50  # 16 kHz audio, downsampling ratio 320: the default CPT settings
# Two processes on this machine, launched as the README launches them: the environment's `torchrun`
# script with --nproc-per-node spelt out (torchrun refuses the abbreviation --nproc as ambiguous, seen on Python 3.11).
TORCHRUN_TWO = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2"]


def rows(n: int, seed: int, prefix: str, n_dsus: int = N_DSUS) -> list[dict]:
    """`n` utterances of 2-6 random words with increasing word times and random DSUs under them."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        starts, ends, t = [], [], 0.1
        for _ in words:
            starts.append(round(t, 3))
            t += rng.uniform(0.15, 0.4)
            ends.append(round(t, 3))
            t += 0.02
        n_frames = int(t * FRAMES_PER_SECOND) + 1
        out.append({
            "id": f"{prefix}{i}",
            "transcript": " ".join(words),
            "tokenized": words,
            "aligned_token_start_time": starts,
            "aligned_token_end_time": ends,
            "speech_tokens": [rng.randrange(n_dsus) for _ in range(n_frames)],
        })
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def extended_model(root: Path, n_dsus: int = N_DSUS, heads: int = 4) -> Path:
    """A 2-layer, 64-wide random Llama with a 300-rank BPE vocabulary, extended with `n_dsus` DSUs.
    vLLM's CPU attention takes head sizes from 32 up: `heads=2` for a model that vLLM runs."""
    import extend
    from tiny_model import make_tiny_model

    text = " ".join(" ".join(r["tokenized"]) for r in rows(400, seed=1, prefix="text"))
    base = make_tiny_model(root / "base", text, vocab_size=300, hidden=64, layers=2, heads=heads, kv_heads=heads // 2,
                           intermediate=128, seed=0)
    return extend.extend(base, n_dsus, modality_tokens=True, out_dir=root / f"extended-{n_dsus}", seed=0)


def built(seqs, index: int, epoch: int):
    """The (tokens, labels) of one sequence of `data.batches.Sequences`, assembled on its own in NumPy."""
    return seqs.builder.assemble(seqs.pieces_many([index], epoch)[0])

"""Sample construction + packing throughput on one CPU core, and the padding that packing saves.

    python bench/packing.py [--seconds 3]

Throughput, on the golden file's samples (CPT: interleaved and concatenated both ways; SFT: ASR;
deduplication on and off), 16 samples per op call, max_seq_len 2048 (no golden sample reaches it):
  string path   the reference's string + regex path (data/reference_strings.py): the baseline
  per sample    SampleBuilder's per-sample NumPy assembly (bench/construction.py's token-level path)
  op assemble   SampleBuilder *_pieces + kernels.assemble_batch (flat tokens and labels)
  op pack       SampleBuilder *_pieces + kernels.pack_batch (rows of 2048, shifted targets)
All paths must produce the same number of tokens (checked before timing). The baseline is
measured in the same run; speed-ups are against it.

Padding: the share of pad tokens when every batch of 16 samples is padded to its longest (as the
reference trains) vs greedy packing of the same sample stream into rows of 768 and 2048; samples
are built with max_seq_len equal to the row length and taken in a fixed shuffled order.
"""

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402
from bench.construction import GOLDEN, best_tokens_per_second, extended_llama3_tokenizer  # noqa: E402
from data import reference_strings as ref  # noqa: E402
from data.samples import Interleave, SampleBuilder  # noqa: E402

BATCH = 16
THROUGHPUT_SEQ_LEN = 2048
PACKED_SEQ_LENS = (768, 2048)


class Workload:
    """One sample kind over the golden rows: its Pieces, and the baseline's string-path tokens."""

    def __init__(self, name: str, tok, golden: dict):
        self.name, self.tok = name, tok
        self.rows = golden["samples"]
        self.loaded = [dict(row, speech_tokens=np.asarray(row["speech_tokens"], dtype=np.int64)) for row in self.rows]
        self.prompt = golden["sft_system_prompt"]
        c = golden["cpt_interleave"]
        self.settings = Interleave(
            c["sampling_rate"], c["downsampling_ratio"], c["mean_seq_len_tokens"], c["binom_prob"]
        )
        self.pad_id = tok.special_ids["<|finetune_right_pad_id|>"]

    def builder(self, deduplicate: bool, max_seq_len: int) -> SampleBuilder:
        return SampleBuilder(self.tok, deduplicate=deduplicate, modality_tokens=True, max_seq_len=max_seq_len)

    def pieces(self, builder: SampleBuilder) -> list:
        if self.name == "SFT":
            return [builder.sft_asr_pieces(row, self.prompt, False) for row in self.loaded]
        out = []
        for i, row in enumerate(self.loaded):
            out.append(builder.cpt_interleaved_pieces(row, i, 0, self.settings))
            out.append(builder.cpt_concatenated_pieces(row, True))
            out.append(builder.cpt_concatenated_pieces(row, False))
        return out

    def string_path_lengths(self, deduplicate: bool) -> list[int]:
        tok, n = self.tok, THROUGHPUT_SEQ_LEN
        if self.name == "SFT":
            return [len(ref.sft_tokens(tok, row, self.prompt, deduplicate, True, False)) for row in self.rows]
        out = []
        for i, row in enumerate(self.rows):
            out.append(len(ref.cpt_tokens(tok, ref.interleaved_string(row, i, 0, deduplicate, True, self.settings), n)))
            for text_first in (True, False):
                out.append(len(ref.cpt_tokens(tok, ref.concatenated_string(row, text_first, deduplicate, True), n)))
        return out

    # Each path below builds every sample once (both deduplication settings) and returns the token count.

    def string_path(self) -> int:
        return sum(sum(self.string_path_lengths(d)) for d in (True, False))

    def per_sample(self) -> int:
        n = 0
        for d in (True, False):
            b = self.builder(d, THROUGHPUT_SEQ_LEN)
            n += sum(len(b.assemble(p)[0]) for p in self.pieces(b))
        return n

    def op_assemble(self) -> int:
        n = 0
        for d in (True, False):
            b = self.builder(d, THROUGHPUT_SEQ_LEN)
            samples = self.pieces(b)
            for k in range(0, len(samples), BATCH):
                n += len(kernels.assemble_batch(samples[k : k + BATCH], self.tok.dsu_offset, d).tokens)
        return n

    def op_pack(self) -> int:
        n = 0
        for d in (True, False):
            b = self.builder(d, THROUGHPUT_SEQ_LEN)
            samples = self.pieces(b)
            for k in range(0, len(samples), BATCH):
                batch = samples[k : k + BATCH]
                packed = kernels.pack_batch(batch, self.tok.dsu_offset, d, THROUGHPUT_SEQ_LEN, self.pad_id)
                n += int((packed.document_ids >= 0).sum())
        return n

    def padding_shares(self, max_seq_len: int) -> tuple[float, float]:
        """Pad tokens over all tokens, (padded batches, packed rows), both deduplication settings."""
        order = np.random.default_rng(0).permutation
        real = padded = packed_slots = 0
        for d in (True, False):
            samples = self.pieces(self.builder(d, max_seq_len))
            samples = [samples[i] for i in order(len(samples))]
            lengths = np.diff(kernels.assemble_batch(samples, self.tok.dsu_offset, d).sample_offsets.numpy())
            real += lengths.sum()
            padded += sum(len(b) * b.max() for b in np.array_split(lengths, range(BATCH, len(lengths), BATCH)))
            packed_slots += kernels.pack_batch(samples, self.tok.dsu_offset, d, max_seq_len, self.pad_id).tokens.numel()
        return 1 - real / padded, 1 - real / packed_slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per path and workload")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    torch.set_num_threads(1)
    if kernels.build.extension() is None:
        sys.exit("the C++ extension did not build; this bench measures it")

    golden = json.loads(GOLDEN.read_text())
    tok = extended_llama3_tokenizer(golden["n_dsus"])
    workloads = [Workload(name, tok, golden) for name in ("CPT", "SFT")]
    machine = platform.processor() or platform.machine()
    print(f"# {machine}, python {platform.python_version()}, torch {torch.__version__}, one core")
    print(f"# tokens/s (speed-up over the string path), {BATCH} samples per op call")
    paths = ["string path", "per sample", "op assemble", "op pack"]
    print(f"{'workload':8}" + "".join(f"{p:>22}" for p in paths))
    for w in workloads:
        fns = [w.string_path, w.per_sample, w.op_assemble, w.op_pack]
        counts = [fn() for fn in fns]
        assert len(set(counts)) == 1, f"{w.name}: token counts differ between paths: {counts}"
        rates = best_tokens_per_second(fns, args.seconds)
        print(f"{w.name:8}" + "".join(f"{r / 1e6:12.2f} M ({r / rates[0]:4.1f}x)" for r in rates))

    print(f"\n# padding share: batches of {BATCH} padded to their longest vs greedy packing into rows")
    print(f"{'workload':8} {'row length':>10} {'padded':>8} {'packed':>8}")
    for w in workloads:
        for n in PACKED_SEQ_LENS:
            padded, packed = w.padding_shares(n)
            print(f"{w.name:8} {n:10d} {padded:8.1%} {packed:8.1%}")


if __name__ == "__main__":
    main()

"""Sample construction + packing throughput on one CPU core, and the padding that packing saves.

    python bench/packing.py [--seconds 3]

Throughput, on the golden file's samples (CPT: interleaved and concatenated both ways; SFT: ASR;
deduplication on and off), 16 samples per op call, rows of 2048 (no golden sample reaches it):
  string path   the reference's string + regex path (tests/reference_strings.py): the baseline
  per sample    SampleBuilder *_pieces (interleaving's spans drawn for all rows at once by
                data.batches.interleave_spans_many, as training draws them), each assembled on its own
                by data.samples.assemble (NumPy)
  op assemble   the same pieces, assembled 16 at a time by dsu_ops.assemble_batch
  op + packer   train.py's packed path: SampleBuilder *_pieces, dsu_ops.measure per 64 samples
                (data.batches.PACK_LOOKAHEAD), the C++ first-fit packer placing each 64 as they come
                (data.batches.PACK_OPEN_ROWS open rows, finished at the end), and the pack op writing
                every 16 rows that leave (tokens, shifted targets, positions, document ids)
All paths must produce the same number of tokens (checked before timing). The baseline is
measured in the same run; speed-ups are against it.

Padding: the share of pad tokens over one epoch of samples in a fixed shuffled order, built with
max_seq_len equal to the row length and deduplication on, when every batch of 16 samples is padded
to its longest (as the reference trains), and when packed by a first-fit packer with 1 open row (next
fit: a row is closed as soon as a sample does not fit it), 16, and data.batches.PACK_OPEN_ROWS, as a packed
training epoch is (open rows finished and flushed at its end). Workloads: the golden samples (CPT
as above, SFT) and the bundled corpus data/mini (128 DSUs; CPT interleaved, SFT).
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

import dsu_ops  # noqa: E402
from bench.construction import GOLDEN, best_tokens_per_second, extended_llama3_tokenizer  # noqa: E402
from config import DEFAULT_SYSTEM_PROMPT  # noqa: E402
from data.dataset import SCHEMA_FIELDS, load_rows  # noqa: E402
from data.samples import Interleave, SampleBuilder  # noqa: E402
from data.batches import PACK_LOOKAHEAD, PACK_OPEN_ROWS, interleave_spans_many  # noqa: E402
from tests import reference_strings as ref  # noqa: E402

BATCH = 16
THROUGHPUT_SEQ_LEN = 2048
MINI = ROOT / "data" / "mini" / "train.jsonl"
PADDING_CASES = [("CPT", 768), ("SFT", 2048), ("SFT", 512)]
OPEN_ROWS = (1, 16, PACK_OPEN_ROWS)


class Workload:
    """One sample kind over a set of rows: its Pieces, and (golden) the baseline's string-path tokens."""

    def __init__(self, name: str, tok, rows: list[dict], prompt: str, settings: Interleave, all_cpt_kinds: bool):
        self.name, self.tok, self.rows, self.prompt, self.settings = name, tok, rows, prompt, settings
        self.all_cpt_kinds = all_cpt_kinds  # interleaved and both concatenations, or interleaved only
        self.loaded = [dict(row, speech_tokens=np.asarray(row["speech_tokens"], dtype=np.int64)) for row in rows]
        self.pad_id = tok.pad_id

    def builder(self, deduplicate: bool, max_seq_len: int) -> SampleBuilder:
        return SampleBuilder(self.tok, deduplicate=deduplicate, modality_tokens=True, max_seq_len=max_seq_len)

    def pieces(self, builder: SampleBuilder) -> list:
        if self.name == "SFT":
            return [builder.sft_asr_pieces(row, self.prompt, False) for row in self.loaded]
        out = []
        spans = interleave_spans_many(list(range(len(self.loaded))), [len(r["tokenized"]) for r in self.loaded], 0,
                                      self.settings)  # as training draws them, for many rows at once
        for i, row in enumerate(self.loaded):
            out.append(builder.cpt_interleaved_pieces(row, i, 0, self.settings, spans=spans[i]))
            if self.all_cpt_kinds:
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
                n += len(dsu_ops.assemble_batch(samples[k : k + BATCH], self.tok.dsu_offset, d).tokens)
        return n

    def op_and_packer(self) -> int:
        n = 0
        for d in (True, False):
            b = self.builder(d, THROUGHPUT_SEQ_LEN)
            pieces = self.pieces(b)
            packer, open_samples, rows = dsu_ops.first_fit_packer(THROUGHPUT_SEQ_LEN, PACK_OPEN_ROWS), {}, []
            for k in range(0, len(pieces), PACK_LOOKAHEAD):  # as data.batches.PackedStream streams them
                ahead = dict(enumerate(pieces[k : k + PACK_LOOKAHEAD], start=k))
                lengths = dsu_ops.measure(dsu_ops.flatten(list(ahead.values())), d).tolist()
                open_samples.update((i, sample) for (i, sample), length in zip(ahead.items(), lengths) if length)
                rows += [[open_samples.pop(i) for i in row] for row in packer.add(list(ahead), lengths)]
                for first in range(0, len(rows) - BATCH + 1, BATCH):
                    n += self.packed_tokens(rows[first : first + BATCH], d)
                rows = rows[len(rows) - len(rows) % BATCH :]
            n += self.packed_tokens(rows + [[open_samples.pop(i) for i in row] for row in packer.finish()], d)
        return n

    def packed_tokens(self, rows: list[list], deduplicate: bool) -> int:
        """Real tokens in rows written by the pack op (the last ones all at once)."""
        packed = dsu_ops.pack(rows, self.tok.dsu_offset, deduplicate, THROUGHPUT_SEQ_LEN, self.pad_id)
        return int(np.count_nonzero(packed.document_ids.numpy() >= 0))

    def padding_shares(self, max_seq_len: int) -> list[float]:
        """Pad tokens over all tokens: padded batches, then packing with each of OPEN_ROWS."""
        samples = self.pieces(self.builder(True, max_seq_len))
        samples = [samples[i] for i in np.random.default_rng(0).permutation(len(samples))]
        lengths = np.diff(dsu_ops.assemble_batch(samples, self.tok.dsu_offset, True).sample_offsets.numpy())
        real = lengths.sum()
        padded = sum(len(b) * b.max() for b in np.array_split(lengths, range(BATCH, len(lengths), BATCH)))
        shares = [1 - real / padded]
        for open_rows in OPEN_ROWS:
            shares.append(1 - real / (len(dsu_ops.place(lengths, max_seq_len, open_rows)) * max_seq_len))
        return shares


def golden_workloads(golden: dict) -> list[Workload]:
    tok = extended_llama3_tokenizer(golden["n_dsus"])
    c = golden["cpt_interleave"]
    settings = Interleave(c["sampling_rate"], c["downsampling_ratio"], c["mean_seq_len_tokens"], c["binom_prob"])
    prompt = golden["sft_system_prompt"]
    return [Workload(name, tok, golden["samples"], prompt, settings, True) for name in ("CPT", "SFT")]


def mini_workloads() -> list[Workload]:
    tok = extended_llama3_tokenizer(128)
    rows = load_rows(str(MINI), n_dsus=128, fields=SCHEMA_FIELDS)
    return [Workload(name, tok, rows, DEFAULT_SYSTEM_PROMPT, Interleave(), False) for name in ("CPT", "SFT")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per path and workload")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    torch.set_num_threads(1)
    if dsu_ops.build.extension() is None:
        sys.exit("the C++ extension did not build; this bench measures it")

    golden = golden_workloads(json.loads(GOLDEN.read_text()))
    machine = platform.processor() or platform.machine()
    print(f"# {machine}, python {platform.python_version()}, torch {torch.__version__}, one core")
    print(f"# tokens/s (speed-up over the string path), {BATCH} samples per op call")
    paths = ["string path", "per sample", "op assemble", "op + packer"]
    print(f"{'workload':8}" + "".join(f"{p:>22}" for p in paths))
    for w in golden:
        fns = [w.string_path, w.per_sample, w.op_assemble, w.op_and_packer]
        counts = [fn() for fn in fns]
        assert len(set(counts)) == 1, f"{w.name}: token counts differ between paths: {counts}"
        rates = best_tokens_per_second(fns, args.seconds)
        print(f"{w.name:8}" + "".join(f"{r / 1e6:12.2f} M ({r / rates[0]:4.1f}x)" for r in rates))

    print(f"\n# padding share: batches of {BATCH} padded to their longest vs packing with N open rows")
    columns = ["padded"] + [f"{n} open" for n in OPEN_ROWS]
    print(f"{'data':7} {'workload':8} {'samples':>7} {'row length':>10}" + "".join(f"{c:>10}" for c in columns))
    for data, workloads in (("golden", golden), ("mini", mini_workloads())):
        for w in workloads:
            n_samples = len(w.pieces(w.builder(True, None)))
            for max_seq_len in [n for name, n in PADDING_CASES if name == w.name]:
                shares = "".join(f"{s:10.1%}" for s in w.padding_shares(max_seq_len))
                print(f"{data:7} {w.name:8} {n_samples:7d} {max_seq_len:10d}{shares}")


if __name__ == "__main__":
    main()

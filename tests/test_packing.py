"""Packed training: the first-fit packer, the row tensors, the packed stream of train.py (exactly
once per epoch, truncation, exact restore), and packed runs against unpacked ones, resumed ones
and two processes."""

import json
import os
import shutil
import subprocess
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import config
import dsu_ops
import train
from data import batches
from data.dataset import SCHEMA_FIELDS, load_rows
from data.samples import IGNORE, Pieces, SampleBuilder, assemble
from model_dir import load_model, model_tokenizer
from tests import tiny
from dsu_ops import reference
from tests.test_kernels import DSU_OFFSET, adversarial_pieces, sample_pieces

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # runs compared with == sum floats in the same order
PAD_ID = 128004


pytestmark = pytest.mark.usefixtures("one_thread")


# -- the packer --------------------------------------------------------------------------------


PACKERS = {"C++": dsu_ops.first_fit_packer, "reference": reference.FirstFitPacker}


def stream(new_packer, lengths, max_seq_len: int, capacity: int, batch: int) -> tuple[list[list[int]], int]:
    """Rows of one epoch through a packer, `batch` samples per call, and the most rows ever open."""
    packer = new_packer(max_seq_len, capacity)
    rows, most_open = [], 0
    for first in range(0, len(lengths), batch):
        part = [int(n) for n in lengths[first : first + batch]]
        rows += packer.add(list(range(first, first + len(part))), part)
        most_open = max(most_open, len(packer.open_rows()))
    return rows + packer.finish(), most_open


def waste(rows: list[list[int]], lengths, max_seq_len: int) -> float:
    return 1 - sum(int(lengths[i]) for row in rows for i in row) / (len(rows) * max_seq_len)


@pytest.mark.parametrize("implementation", PACKERS)
def test_first_fit_places_evicts_the_fullest_and_repacks_at_the_end(implementation):
    packer = PACKERS[implementation](max_seq_len=10, capacity=2)
    a, b, c, d, e, f, g, h, i, j, k, l = range(12)  # noqa: E741
    assert packer.add([a, b, c], [3, 8, 2]) == []  # b: no room in a's row, a second row; c: the first row with room
    assert packer.add([d, e], [10, 0]) == [[d]]  # d fills a row by itself: leaves alone; e: empty, dropped
    assert packer.open_rows() == [[a, c], [b]]
    assert packer.add([f], [9]) == [[b]]  # no room anywhere, window full: the fullest row leaves, not the oldest
    # g fills a row exactly: it leaves at once; i then fills f's
    assert packer.add([g, h, i, j, k, l], [5, 4, 1, 2, 7, 3]) == [[a, c, g], [f, i]]
    assert packer.open_rows() == [[h, j, l], [k]]
    assert packer.finish() == [[k, l], [h, j]]  # longest first: k 7, h 4, l 3, j 2
    assert packer.open_rows() == [] and packer.finish() == []
    with pytest.raises(ValueError, match="sample 11 has 11 tokens; a row holds 0 to 10"):
        packer.add([a, 11], [1, 11])
    assert packer.open_rows() == []  # a batch is checked before any of it is placed
    with pytest.raises(ValueError, match="3 rows do not fit 2 open rows"):
        packer.reopen([[a], [b], [c]], [[6], [5], [1]])
    with pytest.raises(ValueError, match="row 1 of 11 tokens does not fit 10"):
        packer.reopen([[a], [b, c]], [[6], [5, 6]])
    packer.reopen([[a, c], [b]], [[3, 2], [8]])
    assert packer.add([d], [5]) == [[a, c, d]]


@pytest.mark.parametrize("implementation", PACKERS)
def test_every_sample_once_rows_fit_and_the_window_bounds_open_rows(implementation):
    lengths = np.random.default_rng(3).integers(0, 301, size=5000)
    rows, most_open = stream(PACKERS[implementation], lengths, 512, capacity=16, batch=64)
    assert most_open <= 16
    placed = [i for row in rows for i in row]
    assert sorted(placed) == [i for i, n in enumerate(lengths) if n > 0]  # each non-empty sample once
    assert all(0 < sum(lengths[i] for i in row) <= 512 for row in rows)
    # the same rows however the samples are batched, and from both packers
    assert rows == dsu_ops.place(lengths, 512, 16) == stream(reference.FirstFitPacker, lengths, 512, 16, batch=1)[0]


@pytest.fixture(scope="module")
def mini_lengths(extended_tokenizer):
    """Sequence lengths of the bundled corpus (data/mini, 128 DSUs) in a shuffled order: CPT
    interleaved with rows of 768, SFT with rows of 2048, as the configs build them."""
    tok = extended_tokenizer(128)
    rows = load_rows(str(ROOT / "data" / "mini" / "train.jsonl"), n_dsus=128, fields=SCHEMA_FIELDS)
    order = np.random.default_rng(0).permutation(len(rows))
    out = {}
    for task, max_seq_len in (("cpt", 768), ("sft", 2048)):
        builder = SampleBuilder(tok, deduplicate=True, modality_tokens=True, max_seq_len=max_seq_len)
        if task == "cpt":
            pieces = [builder.cpt_interleaved_pieces(rows[i], int(i), 0) for i in order]
        else:
            pieces = [builder.sft_asr_pieces(rows[i], config.DEFAULT_SYSTEM_PROMPT, False) for i in order]
        out[task, max_seq_len] = dsu_ops.measure(dsu_ops.flatten(pieces), True)
    return out


@pytest.mark.parametrize("task, max_seq_len", [("cpt", 768), ("sft", 2048)])
def test_waste_is_under_5_percent_on_the_bundled_corpus(mini_lengths, task, max_seq_len):
    lengths = mini_lengths[task, max_seq_len]
    packed = waste(dsu_ops.place(lengths, max_seq_len, batches.PACK_OPEN_ROWS), lengths, max_seq_len)
    greedy = waste(dsu_ops.place(lengths, max_seq_len, 1), lengths, max_seq_len)  # one open row: next fit
    assert packed < 0.05 and packed < greedy, (packed, greedy)


# -- row tensors (the pack op) -----------------------------------------------------------------


def check_rows(packed: dsu_ops.Packed, rows, max_seq_len: int, pad_id: int = PAD_ID) -> None:
    """Row r holds rows[r]'s samples (tokens, unshifted labels) side by side from column 0:
    positions restarting, targets shifted inside each sample, document ids numbering the samples,
    padding after."""
    tokens, targets, positions, documents = (t.numpy() for t in packed)
    assert all(t.dtype == torch.int64 for t in packed)
    assert tokens.shape == targets.shape == positions.shape == documents.shape == (len(rows), max_seq_len)
    for r, samples in enumerate(rows):
        fill = 0
        for d, (sample_tokens, labels) in enumerate(samples):
            span = slice(fill, fill + len(sample_tokens))
            assert tokens[r, span].tolist() == sample_tokens.tolist()
            # token i predicts label i + 1 of its own sample; the last one predicts nothing
            assert targets[r, span].tolist() == [*labels[1:].tolist(), IGNORE][: len(sample_tokens)]
            assert positions[r, span].tolist() == list(range(len(sample_tokens)))
            assert (documents[r, span] == d).all()
            fill += len(sample_tokens)
        assert (tokens[r, fill:] == pad_id).all() and (targets[r, fill:] == IGNORE).all()
        assert (positions[r, fill:] == 0).all() and (documents[r, fill:] == -1).all()


def literal(*values) -> Pieces:
    out = Pieces()
    out.add(list(values))
    return out


def test_pack_fills_rows_exactly_and_never_predicts_across_samples():
    samples = [literal(*range(10, 10 + n)) for n in (3, 5, 8, 1)]
    tokens, targets, positions, documents = dsu_ops.pack([samples[:2], samples[2:3], samples[3:]], 0, False, 8, 0)
    assert documents[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert positions[0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert targets[0].tolist() == [11, 12, IGNORE, 11, 12, 13, 14, IGNORE]
    assert targets[1].tolist() == [*range(11, 18), IGNORE]
    assert tokens[2].tolist() == [10, 0, 0, 0, 0, 0, 0, 0] and targets[2].tolist() == [IGNORE] * 8
    with pytest.raises(RuntimeError, match="row 0 holds 9 tokens, more than max_seq_len 8"):
        dsu_ops.pack([samples[1:2] + samples[3:] * 4], 0, False, 8, 0)
    assert dsu_ops.pack([], 0, False, 8, 0).tokens.shape == (0, 8)


def random_rows(rng, max_seq_len: int, deduplicate: bool) -> tuple[list[list[Pieces]], list[list[tuple]]]:
    """Random and adversarial samples that fit max_seq_len, placed by a first-fit packer: the rows
    as pieces, and as the (tokens, labels) that data.samples.assemble builds."""
    pieces = adversarial_pieces(max_seq_len) + [sample_pieces(rng) for _ in range(300)]
    built = [assemble(p, DSU_OFFSET, deduplicate) for p in pieces]
    fits = [i for i, (tokens, _) in enumerate(built) if len(tokens) <= max_seq_len]
    lengths = dsu_ops.measure(dsu_ops.flatten([pieces[i] for i in fits]), deduplicate)
    assert lengths.tolist() == [len(built[i][0]) for i in fits]
    placed = dsu_ops.place(lengths, max_seq_len, 8)
    return [[pieces[fits[i]] for i in row] for row in placed], [[built[fits[i]] for i in row] for row in placed]


@pytest.mark.parametrize("max_seq_len", [1, 7, 32, 64])
def test_pack_holds_the_samples_as_built_and_placed(max_seq_len):
    rng = np.random.default_rng(7)
    for deduplicate in (True, False):
        rows, expected = random_rows(rng, max_seq_len, deduplicate)
        packed = dsu_ops.pack(rows, DSU_OFFSET, deduplicate, max_seq_len, PAD_ID)
        check_rows(packed, expected, max_seq_len)
        flat = dsu_ops.flatten([sample for row in rows for sample in row])
        row_offsets = np.cumsum([0, *map(len, rows)])
        for ours, theirs in zip(packed, reference.pack(*flat, row_offsets, DSU_OFFSET, deduplicate, max_seq_len, PAD_ID)):
            assert torch.equal(ours, theirs)
        # rows with empty samples in them: they take no room but keep their document number
        empty = Pieces()
        with_empty = [[empty, *row] for row in rows]
        check_rows(dsu_ops.pack(with_empty, DSU_OFFSET, deduplicate, max_seq_len, PAD_ID),
                   [[(np.zeros(0, np.int64), np.zeros(0, np.int64)), *row] for row in expected], max_seq_len)


def test_golden_sft_samples_packed_keep_their_tokens_and_labels(golden, extended_tokenizer):
    tok = extended_tokenizer(golden["n_dsus"], golden["use_modality_tokens"])
    builder = SampleBuilder(tok, deduplicate=True, modality_tokens=True, max_seq_len=golden["max_seq_len"])
    cases = [c for c in golden["cases"] if c["kind"] == "sft" and c["deduplicate"] and not c["inference"]]
    pieces = [builder.sft_asr_pieces(golden["samples"][c["sample"]], golden["sft_system_prompt"], c["train_on_input"])
              for c in cases]
    expected = [(np.array(c["tokens"]), np.array(c.get("labels", c["tokens"]))) for c in cases]
    lengths = dsu_ops.measure(dsu_ops.flatten(pieces), True)
    assert lengths.tolist() == [len(t) for t, _ in expected]
    placed = dsu_ops.place(lengths, 2048, 8)
    assert len(placed) < len(cases)  # several samples share a row
    packed = dsu_ops.pack([[pieces[i] for i in row] for row in placed], tok.dsu_offset, True, 2048, PAD_ID)
    check_rows(packed, [[expected[i] for i in row] for row in placed], 2048)


# -- train.py's packed stream ------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing_assets")
    return SimpleNamespace(
        root=root,
        model=tiny.extended_model(root),
        train=tiny.write_jsonl(root / "train.jsonl", tiny.rows(64, seed=2, prefix="train")),
        dev=tiny.write_jsonl(root / "dev.jsonl", tiny.rows(8, seed=3, prefix="dev")),
    )


def sequences(assets, task: str, max_seq_len: int | None, *overrides: str) -> batches.Sequences:
    cfg = train.load_config(CONFIGS / f"tiny_{task}.json", [
        f"run_dir={assets.root / 'run'}", f"model.path={assets.model}", f"data.train={assets.train}", f"data.n_dsus={tiny.N_DSUS}",
        *overrides,
    ])
    cfg["data"]["max_seq_len"] = max_seq_len
    tok = model_tokenizer(assets.model, cfg["data"])  # as train.py reads it, with what the model holds filled in
    return batches.load_data(cfg["data"], Path(cfg["run_dir"]), tok)[0]


@pytest.mark.parametrize("task", ["cpt", "sft"])
def test_stream_gives_every_sequence_once_per_epoch_as_built_and_restores_exactly(assets, monkeypatch, task):
    # A window of 3 open rows forces evictions; rows as long as the median sequence cut about
    # half of them (the builders' truncation, as unpacked).
    monkeypatch.setattr(batches, "PACK_OPEN_ROWS", 3)
    monkeypatch.setattr(batches, "PACK_LOOKAHEAD", 5)
    unbounded = sequences(assets, task, None)
    max_seq_len = int(np.median([len(tiny.built(unbounded, i, 0)[0]) for i in range(len(unbounded))]))
    seqs = sequences(assets, task, max_seq_len)
    packed = batches.PackedStream(seqs, max_seq_len, seed=5, shuffle=True)

    def key(sample):  # a built sequence, or the pieces of one
        tokens, labels = seqs.builder.assemble(sample) if isinstance(sample, Pieces) else sample
        return tuple(tokens.tolist()), tuple(labels.tolist())

    seen = {0: Counter(), 1: Counter(), 2: Counter()}
    draws = []  # (the stream's state before the draw, the row drawn)
    while True:
        state = packed.state_dict()
        epoch, indices, samples = packed.next_row()
        if epoch == 3:
            break
        assert [key(s) for s in samples] == [key(s) for s in seqs.pieces_many(indices, epoch)]
        draws.append((state, epoch, [key(s) for s in samples]))
        assert 0 < sum(len(t) for t, _ in draws[-1][2]) <= max_seq_len
        seen[epoch].update(map(key, samples))
        open_rows = packed.packer.open_rows()
        # bounded memory: a look-ahead's rows (one per sequence at most) and an epoch's last (first fit
        # leaves one row at most half full)
        assert len(open_rows) <= 3 and len(packed.left) <= 5 + (2 * 3 + 1)
        assert len(packed.open_samples) == sum(map(len, open_rows + list(packed.left)))
    for epoch, got in seen.items():
        built_now = [tiny.built(seqs, i, epoch) for i in range(len(seqs))]
        assert got == Counter(map(key, built_now)), epoch
        # placed as dsu_ops.place places the epoch's order
        lengths = [len(built_now[i][0]) for i in batches.epoch_order(len(seqs), 5, epoch, True)]
        placed = [[lengths[i] for i in row] for row in dsu_ops.place(lengths, max_seq_len, 3)]
        assert [[len(tokens) for tokens, _ in row] for _, e, row in draws if e == epoch] == placed
        assert max(len(t) for t, _ in built_now) == max_seq_len - (task == "cpt")  # cut as unpacked: CPT to L - 1
    if task == "sft":
        assert any(t[-1] == seqs.builder.tok.eos_id and len(t) == max_seq_len for t, _ in built_now)  # forced end

    # Restore from many states (mid-epoch, mid-flush, at an epoch's start): the same next rows; and
    # from the states as saved before rows were queued, where one exists.
    assert any(s["open_rows"] and 0 < s["position"] < len(seqs) for s, _, _ in draws[::5])
    assert any(s["position"] == len(seqs) and s["left_rows"] for s, _, _ in draws[::5])
    for k in range(0, len(draws), 5):
        for state in (draws[k][0], unqueued(draws[k][0], len(seqs))):
            if state is None:
                continue
            restored = batches.PackedStream(seqs, max_seq_len, seed=5, shuffle=True)
            restored.load_state_dict(torch.load(save(state), weights_only=True))
            for _, epoch, want in draws[k : k + 4]:
                got_epoch, _, got = restored.next_row()
                assert (got_epoch, [key(s) for s in got]) == (epoch, want)


def unqueued(state: dict, n_rows: int) -> dict | None:
    """The state as the stream saved it before rows left through a queue (handed out as they left,
    an epoch's finished rows kept open), or None where that stream never stood there."""
    old = {key: value for key, value in state.items() if key != "left_rows"}
    if state["position"] == n_rows:
        return {**old, "open_rows": state["left_rows"]}
    return None if state["left_rows"] else old


def save(state: dict):
    """The state through torch.save and back, as in training_state.pt."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


# -- packed loss == unpacked loss ----------------------------------------------------------------


def test_loss_and_gradients_over_packed_rows_equal_the_unpacked_batches(assets):
    seqs = sequences(assets, "cpt", 128)
    model = load_model(assets.model, dtype=torch.float32)
    samples = [tiny.built(seqs, i, 0) for i in range(24)]
    pad_id = seqs.pad_id

    def loss_and_grads(batches):
        model.zero_grad()
        loss_sum, count = map(sum, zip(*(train.forward_loss(model, b, "cpu") for b in batches)))
        (loss_sum / count).backward()
        return loss_sum.item(), count.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    unpacked = loss_and_grads([batches.collate(seqs.assembled(range(k, k + 4), 0), pad_id) for k in range(0, 24, 4)])
    rows = [seqs.pieces_many(row, 0) for row in dsu_ops.place([len(t) for t, _ in samples], 128, 8)]
    assert len(rows) < 24 / 2  # packing put several sequences in most rows
    packed = loss_and_grads([dsu_ops.pack(rows, seqs.builder.tok.dsu_offset, True, 128, pad_id)])
    assert packed[1] == unpacked[1]
    assert packed[0] == pytest.approx(unpacked[0], rel=1e-5)
    for name, grad in unpacked[2].items():
        torch.testing.assert_close(packed[2][name], grad, atol=1e-6, rtol=1e-4)


def equal_length_rows(n: int) -> list[dict]:
    """Utterances that differ (word order, DSUs) but build CPT concatenated sequences of one length."""
    out = tiny.rows(n, seed=9, prefix="eq")
    rng = np.random.default_rng(9)
    for row in out:
        row["tokenized"] = [str(w) for w in rng.permutation(["the", "cat", "runs", "near", "a", "bird"])]
        row["transcript"] = " ".join(row["tokenized"])
        row["speech_tokens"] = rng.integers(0, tiny.N_DSUS, size=40).tolist()
    return out


def run_args(assets, run_dir: Path, *overrides: str, train_file=None) -> list[str]:
    return [str(CONFIGS / "tiny_cpt.json"), f"run_dir={run_dir}", f"model.path={assets.model}",
            f"data.train={train_file or assets.train}", f"data.dev={assets.dev}", f"data.n_dsus={tiny.N_DSUS}",
            "train.eval_steps=4", *overrides]


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def totals(run_dir: Path) -> dict:
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"tokens"' in line][-1]
    return {k: last[k] for k in ("tokens", "text_tokens", "dsu_tokens", "special_tokens", "target_tokens")}


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step_{step:07d}" / "model.safetensors")


def assert_close_weights(a: dict, b: dict, **tolerance) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tolerance)


def test_packed_run_trains_like_the_unpacked_run_on_the_same_sequences(assets, tmp_path):
    # Every sequence has the same length, and a row holds exactly 4: each packed row is one
    # unpacked micro-batch of 4, in the same order, so the two runs must agree step by step.
    data = tiny.write_jsonl(tmp_path / "equal.jsonl", equal_length_rows(16))
    seqs = sequences(SimpleNamespace(root=tmp_path, model=assets.model, train=data), "cpt", None,
                     "data.cpt.sequence_type=concatenated_txt_dsu", "data.deduplicate=false")
    length = len(tiny.built(seqs, 0, 0)[0])
    assert {len(tiny.built(seqs, i, 0)[0]) for i in range(16)} == {length}
    common = ["data.cpt.sequence_type=concatenated_txt_dsu", "data.deduplicate=false", f"data.max_seq_len={4 * length}",
              "train.grad_accum=2", "train.max_steps=4", "train.save_steps=4"]  # 2 steps per epoch
    unpacked, packed = tmp_path / "unpacked", tmp_path / "packed"
    assert train.main(run_args(assets, unpacked, *common, "train.batch_size=4", train_file=data)) == 0
    assert train.main(run_args(assets, packed, *common, "train.batch_size=1", "data.packed=true", train_file=data)) == 0
    got, expected = losses(packed), losses(unpacked)
    assert got.keys() == expected.keys() == {1, 2, 3, 4}
    assert all(got[s] == pytest.approx(expected[s], rel=1e-5) for s in got), (got, expected)
    assert losses(packed, "dev_loss") == pytest.approx(losses(unpacked, "dev_loss"), rel=1e-5)
    assert totals(packed) == totals(unpacked)  # real tokens only: no padding in either
    assert_close_weights(weights(packed, 4), weights(unpacked, 4), atol=1e-5, rtol=1e-4)

    resumed = tmp_path / "resumed"
    refused = train.main(run_args(assets, resumed, *common, "train.batch_size=1", "data.packed=true",
                                  f"resume={unpacked / 'checkpoints' / 'step_0000004'}", train_file=data))
    assert refused == 2 and not resumed.exists()


# -- packed resume and two processes ------------------------------------------------------------

PACKED = ["data.packed=true", "data.max_seq_len=128", "train.batch_size=2", "train.max_steps=10", "train.save_steps=2"]
SMALL_WINDOW = 6  # open rows: 64 tiny sequences would all fit in the default window, leaving no mid-epoch state


def packed_run(args: list[str]) -> int:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batches, "PACK_OPEN_ROWS", SMALL_WINDOW)
        patch.setattr(batches, "PACK_LOOKAHEAD", 8)  # states inside an epoch of 64 sequences
        return train.main(args)


@pytest.fixture(scope="module")
def packed_reference(assets, tmp_path_factory):
    """An uninterrupted packed run into its second epoch (4 rows a step), saving every 2 steps."""
    run_dir = tmp_path_factory.mktemp("packed") / "run"
    assert packed_run(run_args(assets, run_dir, *PACKED)) == 0
    return run_dir


def test_packed_run_logs_full_rows_of_real_tokens(packed_reference):
    records = [json.loads(line) for line in (packed_reference / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r["step"] == 1)
    assert 0.9 * 4 * 128 < first["tokens"] <= 4 * 128  # 4 rows of 128, padding not counted
    assert max(r.get("epoch", 0) for r in records) == 1
    assert losses(packed_reference)[10] < losses(packed_reference)[1] - 0.5


def test_packed_resume_continues_with_identical_losses(assets, packed_reference, tmp_path):
    states = {step: train.read_training_state(packed_reference / "checkpoints" / f"step_{step:07d}")["packer"]
              for step in (2, 4, 6, 8, 10)}
    mid_epoch = [s for s, state in states.items() if state["open_rows"] and 0 < state["position"] < 64]
    assert len(mid_epoch) >= 2 and states[10]["epoch"] == 1, states
    for step in mid_epoch[:2]:
        run_dir = tmp_path / f"from_{step}"
        ckpt = packed_reference / "checkpoints" / f"step_{step:07d}"
        assert packed_run(run_args(assets, run_dir, *PACKED, f"resume={ckpt}")) == 0
        assert losses(run_dir) == {s: v for s, v in losses(packed_reference).items() if s > step}
        assert totals(run_dir) == totals(packed_reference)
        assert_close_weights(weights(run_dir, 10), weights(packed_reference, 10), atol=0, rtol=0)
    auto = tmp_path / "auto"
    shutil.copytree(packed_reference, auto)
    for step in (6, 8, 10):
        shutil.rmtree(auto / "checkpoints" / f"step_{step:07d}")
    assert packed_run(run_args(assets, auto, *PACKED, "resume=auto")) == 0
    assert losses(auto) == losses(packed_reference)


def test_refuses_a_packed_resume_into_an_unpacked_run(assets, packed_reference, tmp_path, capsys):
    ckpt = packed_reference / "checkpoints" / "step_0000002"
    assert train.main(run_args(assets, tmp_path / "run", "data.max_seq_len=128", f"resume={ckpt}")) == 2
    assert "data.packed=true" in capsys.readouterr().err
    assert packed_run(run_args(assets, tmp_path / "run", *PACKED, "data.max_seq_len=64", f"resume={ckpt}")) == 2
    assert "data.max_seq_len 64" in capsys.readouterr().err
    assert train.main(run_args(assets, tmp_path / "run", "data.packed=1")) == 2
    assert "'data.packed' must be true or false" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_two_packed_processes_match_one_with_twice_the_batch(assets, tmp_path):
    common = ["data.packed=true", "data.max_seq_len=128", "train.max_steps=4", "train.save_steps=4"]
    two, one = tmp_path / "two", tmp_path / "one"
    command = [*tiny.TORCHRUN_TWO, "train.py",
               *run_args(assets, two, *common, "train.batch_size=2")]
    done = subprocess.run(command, cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert train.main(run_args(assets, one, *common, "train.batch_size=4")) == 0
    for key in ("loss", "dev_loss"):
        got, expected = losses(two, key), losses(one, key)
        assert got.keys() == expected.keys() and got
        assert all(got[s] == pytest.approx(expected[s], rel=1e-5) for s in got), (got, expected)
    assert totals(two) == totals(one)
    assert_close_weights(weights(two, 4), weights(one, 4), atol=1e-5, rtol=1e-4)


def test_batches_made_ahead_on_a_thread_train_exactly_like_batches_made_in_turn(assets, packed_reference, tmp_path,
                                                                                 monkeypatch):
    # On a GPU each step's batches are made on a background thread while the step before trains;
    # a CPU makes them in turn. The thread must change nothing: losses, totals, weights, and the
    # packer state each checkpoint saves (the stream has run a step ahead when it is saved).
    made_on = []

    def ahead(make, steps, device):
        def recorded(step):
            made_on.append(threading.current_thread().name)
            return make(step)
        return batches.prefetched(recorded, steps, device, background=True)

    monkeypatch.setattr(train, "prefetched", ahead)
    run_dir = tmp_path / "ahead"
    assert packed_run(run_args(assets, run_dir, *PACKED)) == 0
    assert len(made_on) == 10 and all(name.startswith("batches") for name in made_on), made_on
    assert losses(run_dir) == losses(packed_reference)
    assert totals(run_dir) == totals(packed_reference)
    assert_close_weights(weights(run_dir, 10), weights(packed_reference, 10), atol=0, rtol=0)
    for step in (2, 4, 6, 8, 10):
        saved = [train.read_training_state(run / "checkpoints" / f"step_{step:07d}")["packer"]
                 for run in (run_dir, packed_reference)]
        assert saved[0] == saved[1], step

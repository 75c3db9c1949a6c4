"""The fused ops (measure, assemble; pack in tests/test_packing.py): C++ (CPU), CUDA and the NumPy
reference against data.samples.assemble."""

import logging

import numpy as np
import pytest
import torch

import dsu_ops
from data.batches import interleave_spans_many
from data.samples import Interleave, Pieces, SampleBuilder, assemble, interleave_spans
from dsu_ops import build, reference
from tests.test_samples import interleave_settings

MAX_DSU = 65533
DSU_OFFSET = 128000


@pytest.fixture(scope="module")
def extension():
    ext = build.extension()
    assert ext is not None, "the C++ extension did not build (see the warning logged above)"
    return ext


def sample_pieces(rng, max_pieces: int = 6, max_len: int = 30) -> Pieces:
    out = Pieces(
        limit=None if rng.random() < 0.4 else int(rng.integers(0, 2 * max_len)),
        force_last=None if rng.random() < 0.5 else int(rng.integers(0, 128256)),
    )
    for _ in range(int(rng.integers(0, max_pieces + 1))):
        n = int(rng.integers(0, max_len + 1))
        masked = bool(rng.random() < 0.3)
        if rng.random() < 0.5:
            runs = rng.integers(0, MAX_DSU + 1, size=n)
            out.add(np.repeat(runs, rng.integers(1, 4, size=n))[:n], masked=masked, is_dsu=True)
        else:
            out.add(rng.integers(0, 128000, size=n), masked=masked)
    return out


def adversarial_pieces(max_seq_len: int) -> list[Pieces]:
    """Edge cases: empty, all-duplicate, single-token, boundary-length and limit-cut samples."""

    def make(*pieces, limit=None, force_last=None):
        out = Pieces(limit=limit, force_last=force_last)
        for values, is_dsu, masked in pieces:
            out.add(values, masked=masked, is_dsu=is_dsu)
        return out

    dsu_run = np.repeat(np.arange(0, 40), 3)  # 120 values, 40 after deduplication
    return [
        make(),  # no pieces
        make(([], False, False), ([], True, True)),  # only empty pieces
        make(([MAX_DSU] * 9, True, False)),  # all duplicates, the largest DSU id
        make(([7], False, False)),  # a single token
        make(([1], False, False), ([5, 5], True, False), ([5, 5, 6], True, True)),  # no dedup across pieces
        make((np.arange(max_seq_len), False, False)),  # exactly max_seq_len
        make((np.arange(max_seq_len + 5), False, True)),  # longer than max_seq_len, no limit
        make(([2, 3], False, True), (dsu_run, True, False), limit=20, force_last=99),  # cut inside a DSU run
        make(([2, 3], False, True), (dsu_run, True, False), limit=20),  # the same cut, no force_last
        make(([2, 3], False, False), ([9, 9, 8], True, False), limit=4, force_last=99),  # fits only deduplicated
        make(([4, 5, 6], False, False), limit=0, force_last=99),  # limit 0 keeps nothing
        make(([4, 5, 6], False, False), limit=1, force_last=99),  # only the forced token is left
        make((np.arange(3 * max_seq_len), False, False), limit=max_seq_len + 2, force_last=99),  # a cut longer than max_seq_len
    ]


def batches(max_seq_len: int = 32):
    rng = np.random.default_rng(7)
    yield adversarial_pieces(max_seq_len)
    yield [sample_pieces(rng) for _ in range(200)]
    yield [sample_pieces(rng, max_pieces=2, max_len=3) for _ in range(300)]  # many tiny samples
    yield []


def expected_samples(samples, deduplicate: bool, dsu_offset: int = DSU_OFFSET):
    return [assemble(p, dsu_offset, deduplicate) for p in samples]


def split(assembled: dsu_ops.Assembled):
    offsets = assembled.sample_offsets.tolist()
    return [
        (assembled.tokens[a:b].tolist(), assembled.labels[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:])
    ]


def as_lists(expected):
    return [(tokens.tolist(), labels.tolist()) for tokens, labels in expected]


@pytest.mark.parametrize("deduplicate", [True, False])
def test_reference_and_cpu_op_assemble_like_data_samples(extension, deduplicate):
    for samples in batches():
        expected = as_lists(expected_samples(samples, deduplicate))
        flat = dsu_ops.flatten(samples)
        assert split(dsu_ops.Assembled(*reference.assemble(*flat, DSU_OFFSET, deduplicate))) == expected
        ours = dsu_ops.assemble_batch(samples, DSU_OFFSET, deduplicate)
        assert split(ours) == expected
        assert ours.tokens.dtype == ours.labels.dtype == ours.sample_offsets.dtype == torch.int64


@pytest.mark.parametrize("kind", ["cpt_interleaved", "cpt_concatenated_txt_dsu", "cpt_concatenated_dsu_txt", "sft"])
def test_golden_cases_through_the_op(golden, extended_tokenizer, extension, kind):
    tok = extended_tokenizer(golden["n_dsus"], golden["use_modality_tokens"])
    settings = interleave_settings(golden)
    for deduplicate in (True, False):
        cases = [c for c in golden["cases"] if c["kind"] == kind and c["deduplicate"] == deduplicate]
        assert cases
        builder = SampleBuilder(tok, deduplicate=deduplicate, modality_tokens=True, max_seq_len=golden["max_seq_len"])
        samples = []
        for case in cases:
            row = golden["samples"][case["sample"]]
            if kind == "sft":
                p = builder.sft_asr_pieces(row, golden["sft_system_prompt"], case["train_on_input"], case["inference"])
            elif kind == "cpt_interleaved":
                p = builder.cpt_interleaved_pieces(row, case["sample"], case["epoch"], settings)
            else:
                p = builder.cpt_concatenated_pieces(row, text_first=kind.endswith("txt_dsu"))
            samples.append(p)
        got = split(dsu_ops.assemble_batch(samples, tok.dsu_offset, deduplicate))
        for n, (case, (tokens, labels)) in enumerate(zip(cases, got)):
            assert tokens == case["tokens"], f"{kind} case {n}: tokens"
            assert labels == case.get("labels", case["tokens"]), f"{kind} case {n}: labels"


@pytest.mark.parametrize("n, p", [(39, 0.1), (10, 0.5), (60, 0.5), (50, 0.9), (7, 1.0), (5, 0.0), (0, 0.3)])
def test_interleave_spans_equal_numpys_generator(extension, n, p):
    """The op's SeedSequence, PCG64 and binomial inversion give NumPy's draws bit for bit, so the
    same spans: the reference's settings (n 39, p 0.1), the edges of the inversion regime, p > 0.5,
    and nothing to draw."""
    rng = np.random.default_rng(1)
    indices = [0, 1, 2**32 - 1, 2**32, 2**40 + 7] + rng.integers(0, 10**7, 300).tolist()
    n_words = [0, 1, 200] + rng.integers(0, 120, len(indices) - 3).tolist()
    settings = Interleave(mean_seq_len_tokens=n + 0.43, binom_prob=p)
    for epoch in (0, 3, 2**33):
        got = dsu_ops.interleave_spans(indices, n_words, epoch, n, p, seed=42831)
        assert len(got) == len(indices)
        for i, w, spans in zip(indices, n_words, got):
            assert spans == interleave_spans(i, epoch, w, settings, 42831), (i, epoch)
    with pytest.raises(RuntimeError, match="BTPE"):  # outside the inversion regime NumPy draws them
        torch.ops.speech_llama.interleave_spans(torch.tensor([0]), torch.tensor([3]), 1, 0, 100, 0.5)
    assert dsu_ops.interleave_spans([0, 1], [4, 2], 0, 100, 0.5, 42831) is None
    assert len(interleave_spans_many([0, 1], [4, 2], 0, Interleave(mean_seq_len_tokens=100, binom_prob=0.5))) == 2


@pytest.fixture
def no_extension(monkeypatch):
    def cannot_build(with_cuda):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(build, "compile_extension", cannot_build)
    build.extension.cache_clear()
    yield
    build.extension.cache_clear()  # the next caller builds (loads) the real extension again


def test_reference_is_used_with_one_warning_when_the_extension_cannot_build(no_extension, caplog):
    samples = adversarial_pieces(16)
    expected = as_lists(expected_samples(samples, True))
    with caplog.at_level(logging.WARNING, logger="dsu_ops.build"):
        assert split(dsu_ops.assemble_batch(samples, DSU_OFFSET, True)) == expected
        assert dsu_ops.measure(dsu_ops.flatten(samples), True).tolist() == [len(t) for t, _ in expected]
        packed = dsu_ops.pack([samples[2:5]], DSU_OFFSET, True, 16, 0)
        assert packed.tokens[0, :4].tolist() == expected[2][0] + expected[3][0] + expected[4][0][:2]
        assert packed.document_ids[0, :5].tolist() == [0, 1, 2, 2, 2]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "NumPy reference" in warnings[0].getMessage()
    assert "Ninja is required" in warnings[0].getMessage()


def test_cpu_op_rejects_malformed_batches(extension):
    flat = dsu_ops.flatten(adversarial_pieces(8))
    tensors = {name: torch.from_numpy(a) for name, a in flat._asdict().items()}
    ops = torch.ops.speech_llama

    def call(**changes):
        return ops.assemble(*{**tensors, **changes}.values(), DSU_OFFSET, True)

    broken = tensors["piece_offsets"].clone()
    broken[3] = broken[4] + 1
    with pytest.raises(RuntimeError, match="piece_offsets decreases at index"):
        call(piece_offsets=broken)
    short = tensors["sample_piece_offsets"].clone()
    short[-1] -= 1
    with pytest.raises(RuntimeError, match="sample_piece_offsets must end at the number of pieces"):
        call(sample_piece_offsets=short)
    with pytest.raises(RuntimeError, match=r"sample_limit\[0\] must be >= 0"):
        call(sample_limit=torch.full_like(tensors["sample_limit"], -2))
    with pytest.raises(RuntimeError, match="values must be Long"):
        call(values=tensors["values"].int())
    with pytest.raises(RuntimeError, match="piece_offsets decreases at index"):
        ops.measure(*{**tensors, "piece_offsets": broken}.values(), True)

    def pack(row_offsets, max_seq_len=1000):
        return ops.pack(*tensors.values(), torch.tensor(row_offsets), DSU_OFFSET, True, max_seq_len, 0)

    n = len(tensors["sample_limit"])
    assert pack([0, n - 1, n])[0].shape == (2, 1000)
    with pytest.raises(RuntimeError, match="row_sample_offsets must end at the number of samples"):
        pack([0, n - 1])
    with pytest.raises(RuntimeError, match="row_sample_offsets decreases at index 2"):
        pack([0, 3, 2, n])
    with pytest.raises(RuntimeError, match="row 0 holds .* tokens, more than max_seq_len 8"):
        pack([0, n], max_seq_len=8)
    with pytest.raises(RuntimeError, match="max_seq_len must be positive"):
        pack([0, n], max_seq_len=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_ops_equal_cpu_ops_on_large_batches(extension):
    assert extension.with_cuda, "torch sees a GPU but the extension was built without CUDA (is nvcc installed?)"
    rng = np.random.default_rng(11)
    samples = adversarial_pieces(2048) + [sample_pieces(rng, max_pieces=12, max_len=400) for _ in range(3000)]
    ops = torch.ops.speech_llama
    for deduplicate in (True, False):
        cpu = dsu_ops.assemble_batch(samples, DSU_OFFSET, deduplicate)
        gpu = dsu_ops.assemble_batch(samples, DSU_OFFSET, deduplicate, device="cuda")
        assert gpu.tokens.is_cuda
        for name, a, b in zip(dsu_ops.Assembled._fields, cpu, gpu):
            assert torch.equal(a, b.cpu()), name

        lengths = np.diff(cpu.sample_offsets.numpy())
        fits = [i for i, n in enumerate(lengths) if n <= 2048]
        rows = [[samples[fits[i]] for i in row] for row in dsu_ops.place(lengths[fits], 2048, 64)]
        packed_cpu = dsu_ops.pack(rows, DSU_OFFSET, deduplicate, 2048, 128004)
        packed_gpu = dsu_ops.pack(rows, DSU_OFFSET, deduplicate, 2048, 128004, device="cuda")
        assert packed_gpu.tokens.is_cuda
        for name, a, b in zip(dsu_ops.Packed._fields, packed_cpu, packed_gpu):
            assert torch.equal(a, b.cpu()), name
    with pytest.raises(RuntimeError, match="more than max_seq_len 16"):
        dsu_ops.pack([samples[-10:]], DSU_OFFSET, True, 16, 0, device="cuda")


def test_build_cache_is_keyed_by_the_build_flags(monkeypatch):
    # A change of compiler or linker flags (a fix) must reach users who built before it.
    before = build.build_directory(False)
    monkeypatch.setattr(build, "LDFLAGS", [*build.LDFLAGS, "-Wl,--as-needed"])
    assert build.build_directory(False) != before
    monkeypatch.undo()
    assert build.build_directory(False) == before


def test_the_extension_loads_again_in_the_same_process(extension):
    # A second load (a cleared cache, another caller) must find the same build, not register the
    # ops twice, which aborts the process.
    build.extension.cache_clear()
    assert build.extension() == extension
    assert dsu_ops.measure(dsu_ops.flatten(adversarial_pieces(8)[:4]), True).tolist() == [0, 0, 1, 1]


def test_build_cache_key_reads_only_the_sources(monkeypatch, tmp_path):
    # A folder or cache left in kernels/ by an older layout (csrc/, __pycache__/) must not stop the build.
    for path in build.SOURCES.iterdir():
        if path.is_file():
            (tmp_path / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(build, "SOURCES", tmp_path)
    clean = build.build_directory(False)
    (tmp_path / "csrc").mkdir()
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "packing.cpython-311.pyc").write_bytes(b"\0")
    assert build.build_directory(False) == clean
    (tmp_path / "pack.cpp").write_bytes((tmp_path / "pack.cpp").read_bytes() + b"\n")
    assert build.build_directory(False) != clean

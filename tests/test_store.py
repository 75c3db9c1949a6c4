"""data.store: a source converted once into memory-mapped arrays gives back exactly the rows that
data.dataset loads, is reused while the source is unchanged, and never leaves a partial copy."""

import copy
import json
import os
import signal
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import train
from data import batches
from data import store as store_module
from data.dataset import ASR_FIELDS, SCHEMA_FIELDS, DataError, load_rows
from data.store import open_store
from data.tokenizer import Tokenizer
from tests import tiny

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "seed_compat_5000.json"
N_DSUS = 5000


@pytest.fixture(scope="module")
def golden_rows():
    return json.loads(GOLDEN.read_text())["samples"]


def odd_rows(golden_rows) -> list[dict]:
    """Golden rows plus edge cases: non-ASCII and quoted words, no words, no DSUs, the largest DSU."""
    rows = copy.deepcopy(golden_rows[:6])
    rows[1].update(transcript="naïve “café” \\ done", tokenized=["naïve", "“café”", "\\", "done"],
                   aligned_token_start_time=[0.1, 0.5, 0.9, 1.2], aligned_token_end_time=[0.4, 0.8, 1.1, 1.5])
    rows[2].update(transcript="", tokenized=[], aligned_token_start_time=[], aligned_token_end_time=[])
    rows[3]["speech_tokens"] = []
    rows[4]["speech_tokens"] = [N_DSUS - 1, 0, N_DSUS - 1]
    for i, row in enumerate(rows):
        row["id"] = f"utt-{i}-ü"
    return rows


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def assert_same_rows(got_store, expected: list[dict]) -> None:
    assert len(got_store) == len(expected)
    for i, want in enumerate(expected):
        got = got_store[i]
        assert got["speech_tokens"].dtype == np.int64
        np.testing.assert_array_equal(got["speech_tokens"], want["speech_tokens"])
        assert {k: v for k, v in got.items() if k != "speech_tokens"} == {
            k: v for k, v in want.items() if k != "speech_tokens" and k in (*SCHEMA_FIELDS, "id")
        }


@pytest.mark.parametrize("fields", [SCHEMA_FIELDS, ASR_FIELDS])
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_rows_come_back_exactly_as_loaded(tmp_path, golden_rows, monkeypatch, fields, fmt):
    monkeypatch.setattr(store_module, "FLUSH_ROWS", 2)  # several chunked writes per column
    rows = odd_rows(golden_rows)
    if fmt == "jsonl":
        source = write_jsonl(tmp_path / "rows.jsonl", rows)
    else:
        source = tmp_path / "rows.parquet"
        pq.write_table(pa.Table.from_pylist(rows), source)
    store = open_store(str(source), tmp_path / "cache", n_dsus=N_DSUS, fields=fields, progress=False)
    assert_same_rows(store, load_rows(str(source), n_dsus=N_DSUS, fields=fields))
    # float64 word times survive bit for bit: CPT's DSU spans floor and ceil them
    if "aligned_token_end_time" in fields:
        assert store[1]["aligned_token_end_time"] == rows[1]["aligned_token_end_time"]
    with pytest.raises(IndexError):
        store[len(rows)]


def test_unchanged_source_is_reused_and_a_changed_one_is_read_again(tmp_path, golden_rows, monkeypatch):
    rows = odd_rows(golden_rows)
    source = write_jsonl(tmp_path / "rows.jsonl", rows[:4])
    first = open_store(str(source), tmp_path / "cache", n_dsus=N_DSUS, progress=False)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    with monkeypatch.context() as patch:
        patch.setattr(store_module, "convert", no_conversion)
        assert open_store(str(source), tmp_path / "cache", n_dsus=N_DSUS, progress=False).directory == first.directory
    write_jsonl(source, rows)
    again = open_store(str(source), tmp_path / "cache", n_dsus=N_DSUS, progress=False)
    assert again.directory != first.directory and len(again) == len(rows)
    other_fields = open_store(str(source), tmp_path / "cache", n_dsus=N_DSUS, fields=ASR_FIELDS, progress=False)
    assert other_fields.directory != again.directory


def test_bad_row_is_named_and_nothing_is_left_behind(tmp_path, golden_rows):
    rows = odd_rows(golden_rows)
    rows[4]["speech_tokens"] = [3, N_DSUS]
    source = write_jsonl(tmp_path / "bad.jsonl", rows)
    cache = tmp_path / "run" / "cache"
    with pytest.raises(DataError, match=r"bad\.jsonl:5: field 'speech_tokens': DSU 5000"):
        open_store(str(source), cache, n_dsus=N_DSUS, progress=False)
    assert not (tmp_path / "run").exists()


def test_duplicate_ids_name_both_places(tmp_path, golden_rows):
    rows = odd_rows(golden_rows)
    rows[5]["id"] = rows[1]["id"]
    source = write_jsonl(tmp_path / "dup.jsonl", rows)
    with pytest.raises(DataError, match=r"dup\.jsonl:6: field 'id': duplicate id 'utt-1-ü', first at .*dup\.jsonl:2"):
        open_store(str(source), tmp_path / "cache", n_dsus=N_DSUS, progress=False)
    assert not (tmp_path / "cache").exists()


def test_an_interrupted_conversion_leaves_no_store(tmp_path, golden_rows, monkeypatch):
    source = write_jsonl(tmp_path / "rows.jsonl", odd_rows(golden_rows))
    real_iter_rows = store_module.iter_rows

    def interrupted(*args, **kwargs):
        for n, row in enumerate(real_iter_rows(*args, **kwargs)):
            if n == 3:
                raise KeyboardInterrupt
            yield row

    monkeypatch.setattr(store_module, "iter_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        open_store(str(source), tmp_path / "cache", n_dsus=N_DSUS, progress=False)
    assert not (tmp_path / "cache").exists()
    monkeypatch.setattr(store_module, "iter_rows", real_iter_rows)
    # a conversion killed outright leaves its partial copy: the next conversion removes it
    key = store_module.store_key(str(source), SCHEMA_FIELDS, N_DSUS)
    dead = tmp_path / "cache" / f".{key}.{socket.gethostname()}.999999999.partial"
    dead.mkdir(parents=True)
    assert len(open_store(str(source), tmp_path / "cache", n_dsus=N_DSUS, progress=False)) == 6
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [key]


@pytest.mark.parametrize("overrides", [
    ["data.task=cpt"],
    ["data.task=cpt", "data.cpt.sequence_type=concatenated_dsu_txt", "data.deduplicate=false"],
    ["data.task=sft", "data.sft.train_on_input=true"],
])
def test_training_sequences_from_the_store_equal_those_from_loaded_rows(tmp_path, overrides):
    model = tiny.extended_model(tmp_path)
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.rows(40, seed=4, prefix="t"))
    cfg = train.load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpt.json", [
        f"run_dir={tmp_path / 'run'}", f"model.path={model}", f"data.train={data}", f"data.n_dsus={tiny.N_DSUS}",
        *overrides,
    ])
    tok = Tokenizer(model / "original" / "tokenizer.model")
    from_store, _ = batches.load_data(cfg["data"], Path(cfg["run_dir"]), tok)
    assert (tmp_path / "run" / "data_cache").is_dir()
    in_memory = batches.Sequences.from_config(load_rows(str(data), n_dsus=tiny.N_DSUS), cfg["data"], tok)
    for epoch in (0, 1):
        for i in range(len(in_memory)):
            for a, b in zip(tiny.built(from_store, i, epoch), tiny.built(in_memory, i, epoch)):
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("harm", ["fifo", "garbage", "missing"])
def test_a_damaged_store_is_refused_naming_it_and_never_blocks(tmp_path, golden_rows, harm):
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("blocked on a FIFO"))
    signal.alarm(60)
    try:
        refuse_damaged_store(tmp_path, golden_rows, harm)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def refuse_damaged_store(tmp_path, golden_rows, harm):
    source = write_jsonl(tmp_path / "rows.jsonl", golden_rows[:3])
    directory = open_store(str(source), tmp_path / "cache", n_dsus=N_DSUS, progress=False).directory
    target = directory / ("dsus.u16" if harm == "fifo" else "meta.json" if harm == "garbage" else "text.u8")
    target.unlink()
    if harm == "fifo":
        os.mkfifo(target)
    elif harm == "garbage":
        target.write_text("{not json")
    with pytest.raises(DataError, match=rf"{directory}: not a readable data store .*remove it"):
        open_store(str(source), tmp_path / "cache", n_dsus=N_DSUS, progress=False)

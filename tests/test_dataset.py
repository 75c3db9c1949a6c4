import copy
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.dataset import (
    ASR_FIELDS,
    DataError,
    Source,
    count_rows,
    iter_rows,
    load_rows,
    resolve_files,
)

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "seed_compat_5000.json"
N_DSUS = 5000


@pytest.fixture(scope="module")
def golden_samples():
    return json.loads(GOLDEN.read_text())["samples"][:4]


@pytest.fixture
def samples(golden_samples):
    return copy.deepcopy(golden_samples)


def write_jsonl(path: Path, rows, blank_lines=False) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    separator = "\n\n" if blank_lines else "\n"
    path.write_text(separator.join(lines) + "\n")
    return path


def write_parquet(path: Path, rows) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def assert_same_rows(loaded, expected):
    assert len(loaded) == len(expected)
    for got, want in zip(loaded, expected):
        assert got["speech_tokens"].dtype == np.int64
        np.testing.assert_array_equal(got["speech_tokens"], want["speech_tokens"])
        assert {k: v for k, v in got.items() if k != "speech_tokens"} == {
            k: v for k, v in want.items() if k != "speech_tokens"
        }


# --- round trips and sources ---------------------------------------------------------------


def test_jsonl_round_trip(tmp_path, samples):
    path = write_jsonl(tmp_path / "train.jsonl", samples)
    assert_same_rows(load_rows(str(path), n_dsus=N_DSUS), samples)


def test_parquet_round_trip(tmp_path, samples):
    path = write_parquet(tmp_path / "train.parquet", samples)
    assert_same_rows(load_rows(str(path), n_dsus=N_DSUS), samples)


def test_parquet_streams_in_batches_across_many_rows(tmp_path, samples):
    rows = [dict(samples[i % len(samples)], id=f"u{i}") for i in range(2500)]
    path = tmp_path / "many.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=700)
    loaded = load_rows(str(path), n_dsus=N_DSUS)
    assert [r["id"] for r in loaded] == [r["id"] for r in rows]
    np.testing.assert_array_equal(loaded[2499]["speech_tokens"], rows[2499]["speech_tokens"])


def test_non_schema_fields_are_kept(tmp_path, samples):
    samples[0]["speaker"] = "spk1"
    path = write_jsonl(tmp_path / "train.jsonl", samples[:1])
    assert load_rows(str(path))[0]["speaker"] == "spk1"


def test_directory_and_glob_sources_are_sorted_and_mixed(tmp_path, samples):
    write_parquet(tmp_path / "b.parquet", samples[2:])
    write_jsonl(tmp_path / "a.jsonl", samples[:1])
    write_jsonl(tmp_path / "a2.json", samples[1:2])
    (tmp_path / "notes.txt").write_text("not data")
    expected_files = [tmp_path / "a.jsonl", tmp_path / "a2.json", tmp_path / "b.parquet"]

    assert resolve_files(str(tmp_path)) == expected_files
    assert resolve_files(str(tmp_path / "a*")) == expected_files[:2]
    assert resolve_files(str(tmp_path / "b.parquet")) == expected_files[2:]
    assert [r["id"] for r in load_rows(str(tmp_path))] == [s["id"] for s in samples]
    assert count_rows(str(tmp_path)) == len(samples)


def test_unknown_extension_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    for source in (tmp_path / "notes.txt", tmp_path / "*"):
        with pytest.raises(DataError, match=r"notes\.txt.*unknown extension"):
            resolve_files(str(source))


@pytest.mark.parametrize("source", ["missing.jsonl", "nothing-*.jsonl", "empty_dir"])
def test_empty_source_is_rejected(tmp_path, source):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=source.replace("*", r"\*")):
        load_rows(str(tmp_path / source))


def test_count_rows_skips_blank_lines_and_reads_parquet_metadata(tmp_path, samples):
    write_jsonl(tmp_path / "a.jsonl", samples, blank_lines=True)
    write_parquet(tmp_path / "b.parquet", samples)
    assert count_rows(str(tmp_path / "a.jsonl")) == len(samples)
    assert count_rows(str(tmp_path / "b.parquet")) == len(samples)


# --- ids ---------------------------------------------------------------------------------------


def test_missing_ids_are_derived_from_file_stem_and_row_index(tmp_path, samples):
    for s in samples:
        del s["id"]
    write_jsonl(tmp_path / "part_a.jsonl", samples, blank_lines=True)
    write_parquet(tmp_path / "part_b.parquet", samples)
    ids = [r["id"] for r in iter_rows(str(tmp_path))]
    assert ids == [f"part_a:{i}" for i in range(4)] + [f"part_b:{i}" for i in range(4)]


@pytest.mark.parametrize("second_file", ["b.jsonl", "b.parquet"])
def test_duplicate_ids_name_both_places(tmp_path, samples, second_file):
    write_jsonl(tmp_path / "a.jsonl", samples[:2])
    duplicate = [samples[2], dict(samples[3], id=samples[1]["id"])]
    writer = write_parquet if second_file.endswith(".parquet") else write_jsonl
    writer(tmp_path / second_file, duplicate)
    where = "b.parquet: row 1" if second_file.endswith(".parquet") else "b.jsonl:2"
    with pytest.raises(DataError, match=rf"{where}: field 'id': duplicate .* first at .*a\.jsonl:2"):
        load_rows(str(tmp_path))


def test_duplicate_ids_within_one_file(tmp_path, samples):
    path = write_jsonl(tmp_path / "a.jsonl", [samples[0], samples[1], samples[0]])
    with pytest.raises(DataError, match=r"a\.jsonl:3: field 'id': duplicate .*a\.jsonl:1"):
        load_rows(str(path))


# --- field subsets -------------------------------------------------------------------------------


def test_subset_of_fields_skips_checks_and_columns_of_the_rest(tmp_path, samples):
    for s in samples:
        del s["aligned_token_end_time"]
        s["speech_tokens"][0] = N_DSUS + 7
    for path in (write_jsonl(tmp_path / "a.jsonl", samples), write_parquet(tmp_path / "a.parquet", samples)):
        rows = load_rows(str(path), fields=("transcript",), n_dsus=N_DSUS)
        assert [r["transcript"] for r in rows] == [s["transcript"] for s in samples]
        assert all(set(r) == {"id", "transcript"} for r in rows)
        with pytest.raises(DataError, match="speech_tokens"):
            load_rows(str(path), fields=ASR_FIELDS, n_dsus=N_DSUS)


def test_unknown_field_name_is_a_programming_error(tmp_path, samples):
    path = write_jsonl(tmp_path / "a.jsonl", samples)
    with pytest.raises(ValueError, match="transcrpt"):
        load_rows(str(path), fields=("transcrpt",))


# --- bad input -----------------------------------------------------------------------------------


def _set(field, value):
    def edit(row):
        row[field] = value
        return row

    return edit


def _delete(field):
    def edit(row):
        del row[field]
        return row

    return edit


def _swap_first_word_times(row):
    starts, ends = row["aligned_token_start_time"], row["aligned_token_end_time"]
    starts[0], ends[0] = ends[0], starts[0]
    return row


# Problems with a value of one row: a JSONL line or a Parquet row can hold each of them.
BAD_VALUES = {
    "missing field": (_delete("speech_tokens"), "speech_tokens", "missing"),
    "DSU too large": (_set("speech_tokens", [0, 4999, 5003]), "speech_tokens", r"DSU 5003 .*\[0, 5000\)"),
    "DSU negative": (_set("speech_tokens", [1, -1, 2]), "speech_tokens", r"DSU -1 .*\[0, 5000\)"),
    "fewer end times": (
        lambda r: _set("aligned_token_end_time", r["aligned_token_end_time"][:-1])(r),
        "aligned_token_end_time",
        "entries",
    ),
    "fewer words": (
        lambda r: _set("tokenized", r["tokenized"][1:])(r),
        "aligned_token_start_time",
        "entries",
    ),
    "start after end": (_swap_first_word_times, "aligned_token_start_time", "word 0"),
    "negative time": (
        lambda r: _set("aligned_token_start_time", [-1.0] + r["aligned_token_start_time"][1:])(r),
        "aligned_token_start_time",
        "word 0",
    ),
}

# Wrong types in one row: JSONL only, since a Parquet column has one type for all its rows.
BAD_TYPES = {
    "transcript not a string": (_set("transcript", 12), "transcript", "string"),
    "words not strings": (_set("tokenized", ["a", 3]), "tokenized", "strings"),
    "times not a list": (_set("aligned_token_start_time", "0.5"), "aligned_token_start_time", "list"),
    "time not a number": (_set("aligned_token_end_time", ["1"]), "aligned_token_end_time", "number"),
    "DSUs not integers": (_set("speech_tokens", [1.5, 2.0]), "speech_tokens", "integers"),
    "DSUs nested": (_set("speech_tokens", [[1, 2], [3]]), "speech_tokens", "integers"),
    "id not a string": (_set("id", 5), "id", "string"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES) + list(BAD_TYPES))
def test_bad_jsonl_row_names_file_line_and_field(tmp_path, samples, case):
    edit, field, problem = {**BAD_VALUES, **BAD_TYPES}[case]
    path = write_jsonl(tmp_path / "bad.jsonl", [samples[0], edit(samples[1]), samples[2]])
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: field '{field}': .*{problem}"):
        load_rows(str(path), n_dsus=N_DSUS)


@pytest.mark.parametrize("case", BAD_VALUES)
def test_bad_parquet_row_names_file_row_and_field(tmp_path, samples, case):
    edit, field, problem = BAD_VALUES[case]
    path = write_parquet(tmp_path / "bad.parquet", [samples[0], edit(samples[1]), samples[2]])
    with pytest.raises(DataError, match=rf"bad\.parquet: row 1: field '{field}': .*{problem}"):
        load_rows(str(path), n_dsus=N_DSUS)


@pytest.mark.parametrize(
    "column, arrow_type, problem",
    [
        ("speech_tokens", pa.list_(pa.float64()), "integers"),
        ("transcript", pa.int64(), "string"),
        ("tokenized", None, "missing"),
    ],
)
def test_bad_parquet_column_is_named_at_row_0(tmp_path, samples, column, arrow_type, problem):
    table = pa.Table.from_pylist(samples)
    index = table.schema.get_field_index(column)
    if arrow_type is None:
        table = table.remove_column(index)
    else:
        values = [[float(u) for u in s[column]] if column == "speech_tokens" else 7 for s in samples]
        table = table.set_column(index, column, pa.array(values, type=arrow_type))
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=rf"bad\.parquet: row 0: field '{column}': .*{problem}"):
        load_rows(str(tmp_path / "bad.parquet"), n_dsus=N_DSUS)


def test_dsus_beyond_the_largest_vocabulary_are_rejected_without_n_dsus(tmp_path, samples):
    samples[0]["speech_tokens"] = [70000]
    path = write_jsonl(tmp_path / "a.jsonl", samples[:1])
    with pytest.raises(DataError, match=r"a\.jsonl:1: field 'speech_tokens': DSU 70000"):
        load_rows(str(path))


@pytest.mark.parametrize(
    "line, problem",
    [('{"transcript": "a",', "malformed JSON"), ("[1, 2]", "expected a JSON object, got list")],
)
def test_bad_json_line_is_named(tmp_path, samples, line, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [samples[0], line, samples[1]], blank_lines=True)
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: {problem}"):
        load_rows(str(path))


def test_unreadable_parquet_is_named(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"broken\.parquet"):
        load_rows(str(path))


def test_rows_stream_lazily_before_a_late_error(tmp_path, samples):
    rows = [dict(samples[i % len(samples)], id=str(i)) for i in range(999)] + ["{broken"]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    stream = iter_rows(str(path), n_dsus=N_DSUS)
    assert [next(stream)["id"] for _ in range(999)] == [str(i) for i in range(999)]
    with pytest.raises(DataError, match=r"long\.jsonl:1000: malformed JSON"):
        next(stream)



# --- dataset directories: one split at a time --------------------------------------------------


def test_split_named_files_are_read_one_split_at_a_time(tmp_path, samples):
    write_jsonl(tmp_path / "train.jsonl", samples[:2])
    write_jsonl(tmp_path / "dev.jsonl", samples[2:3])
    write_parquet(tmp_path / "test-00000-of-00001.parquet", samples[3:])
    with pytest.raises(DataError, match="one split is read at a time"):
        load_rows(str(tmp_path))
    assert [r["id"] for r in load_rows(Source(tmp_path, "train"))] == [s["id"] for s in samples[:2]]
    assert [r["id"] for r in load_rows(Source(tmp_path, "validation"))] == [samples[2]["id"]]
    assert [r["id"] for r in load_rows(Source(tmp_path, "dev"))] == [samples[2]["id"]]  # the reference's name
    assert count_rows(Source(tmp_path, "test")) == 1
    assert load_rows(Source(tmp_path / "train.jsonl", "test"))[0]["id"] == samples[0]["id"]  # a file is what it is


def test_split_named_files_beside_others_are_refused(tmp_path, samples):
    write_jsonl(tmp_path / "train.jsonl", samples[:2])
    write_jsonl(tmp_path / "extra.jsonl", samples[2:])
    with pytest.raises(DataError, match=r"extra\.jsonl"):
        load_rows(Source(tmp_path, "train"))


def test_arrow_ipc_file_format_and_stream_format_read_alike(tmp_path, samples):
    table = pa.Table.from_pylist(samples)
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=3)
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=3)
    for name in ("file.arrow", "stream.arrow"):
        assert_same_rows(load_rows(str(tmp_path / name), n_dsus=N_DSUS), samples)
        assert count_rows(str(tmp_path / name)) == len(samples)
    (tmp_path / "bad.arrow").write_bytes(b"not arrow")
    with pytest.raises(DataError, match=r"bad\.arrow: not a readable Arrow file"):
        load_rows(str(tmp_path / "bad.arrow"))


def test_a_hub_cache_entry_reads_the_snapshot_its_ref_names(tmp_path, samples):
    entry = tmp_path / "datasets--someone--corpus"
    (entry / "refs").mkdir(parents=True)
    (entry / "snapshots" / "r1" / "data").mkdir(parents=True)
    write_parquet(entry / "snapshots" / "r1" / "data" / "test-00000-of-00001.parquet", samples)
    (entry / "refs" / "main").write_text("r2\n")
    with pytest.raises(DataError, match="names snapshot r2"):
        load_rows(Source(entry, "test"))
    (entry / "refs" / "main").write_text("r1\n")
    assert len(load_rows(Source(entry, "test"))) == len(samples)


# --- a split is complete or refused -------------------------------------------------------------


def hub_dataset(root: Path, samples, shards: dict[str, int], present=None) -> Path:
    """A hub dataset directory: `data/<split>-0000K-of-0000N.parquet`, one sample per shard; with
    `present`, only those file names are written."""
    (root / "data").mkdir(parents=True)
    for split, count in shards.items():
        for k in range(count):
            name = f"{split}-{k:05d}-of-{count:05d}.parquet"
            if present is None or name in present:
                write_parquet(root / "data" / name, [dict(samples[k % len(samples)], id=f"{split}{k}")])
    return root


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_split_with_a_missing_shard_is_refused_naming_it(tmp_path, samples, split):
    present = {f"{split}-00000-of-00003.parquet", f"{split}-00002-of-00003.parquet", "train-00000-of-00001.parquet"}
    root = hub_dataset(tmp_path / "ds", samples, {split: 3}, present=present)
    # the reads of training (its store counts and streams the rows) and of generate.py (ASR fields)
    for read in (lambda s: load_rows(s, n_dsus=N_DSUS), lambda s: load_rows(s, n_dsus=N_DSUS, fields=ASR_FIELDS),
                 count_rows):
        with pytest.raises(DataError, match=rf"incomplete split: 2 of the 3 shards .*missing {split}-00001-of-00003"
                                            r"\.parquet in .*ds/data"):
            read(Source(root, split))
    with pytest.raises(DataError, match=rf"missing {split}-00001-of-00003\.parquet"):  # a glob of the split too
        load_rows(str(root / "data" / f"{split}-*.parquet"))
    write_parquet(root / "data" / f"{split}-00001-of-00003.parquet", [dict(samples[1], id="late")])
    assert len(load_rows(Source(root, split), n_dsus=N_DSUS, fields=ASR_FIELDS)) == 3


def test_shards_must_agree_on_their_count_and_appear_once(tmp_path, samples):
    root = hub_dataset(tmp_path / "ds", samples, {"test": 2})
    write_parquet(root / "data" / "test-00002-of-00003.parquet", samples[2:3])
    with pytest.raises(DataError, match=r"disagree on how many there are: .*test-00002-of-00003\.parquet \(of 3\)"):
        load_rows(Source(root, "test"))
    (root / "data" / "test-00002-of-00003.parquet").unlink()
    write_jsonl(root / "data" / "test-00001-of-00002.jsonl", samples[3:])
    with pytest.raises(DataError, match=r"shard 1 of .*test-\* twice: test-00001-of-00002\.jsonl, "
                                        r"test-00001-of-00002\.parquet"):
        load_rows(Source(root, "test"))


def test_hub_shard_names_with_a_hash_suffix_and_a_file_named_alone(tmp_path, samples):
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "part-00000-of-00002-5f1c.jsonl", samples[:2])
    with pytest.raises(DataError, match=r"missing part-00001-of-00002\*"):
        load_rows(str(tmp_path / "d"))
    # a shard named alone is read as it is: the user chose that file
    assert len(load_rows(str(tmp_path / "d" / "part-00000-of-00002-5f1c.jsonl"))) == 2


def test_generate_refuses_a_test_split_with_a_missing_shard(tmp_path, samples, capsys):
    import generate
    from tests import tiny

    model = tiny.extended_model(tmp_path / "model")
    rows = tiny.rows(3, seed=1, prefix="u")
    (tmp_path / "ds" / "data").mkdir(parents=True)
    tiny.write_jsonl(tmp_path / "ds" / "data" / "test-00000-of-00002.jsonl", rows)
    out = tmp_path / "out"
    assert generate.main([str(model), "--data", str(tmp_path / "ds"), "--n-dsus", str(tiny.N_DSUS),
                          "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "incomplete split" in err and "test-00001-of-00002.jsonl" in err and "Traceback" not in err, err
    assert not out.exists()


# --- files that are not regular files --------------------------------------------------------------


def test_a_fifo_or_a_symlink_loop_where_data_is_expected_is_refused_without_blocking(tmp_path, samples):
    os.mkfifo(tmp_path / "rows.jsonl")
    (tmp_path / "loop.parquet").symlink_to(tmp_path / "loop.parquet")
    for source, problem in [(tmp_path / "rows.jsonl", "is a FIFO"), (tmp_path / "loop.parquet", "cannot be read"),
                            (tmp_path / "*.jsonl", "is a FIFO"), (tmp_path, r"loop\.parquet: cannot be read")]:
        with pytest.raises(DataError, match=problem):
            load_rows(str(source))
    (tmp_path / "rows.jsonl").unlink()
    split = tmp_path / "split"
    split.mkdir()
    write_jsonl(split / "train.jsonl", samples)
    os.mkfifo(split / "test.jsonl")
    with pytest.raises(DataError, match=r"test\.jsonl: is a FIFO"):
        load_rows(Source(split, "train"))


def test_a_save_to_disk_split_listing_a_fifo_is_refused(tmp_path, samples):
    split = tmp_path / "train"
    split.mkdir()
    os.mkfifo(split / "data-00000-of-00001.arrow")
    (split / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    with pytest.raises(DataError, match=r"state\.json: lists data-00000-of-00001\.arrow, .*a FIFO"):
        load_rows(str(split))
    (split / "state.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(DataError, match=r"state\.json: not UTF-8 text"):
        load_rows(str(split))


# --- booleans are not DSU ids ----------------------------------------------------------------------


@pytest.mark.parametrize("fields", [ASR_FIELDS, ("tokenized", "speech_tokens"), None], ids=["asr", "cpt", "all"])
def test_a_boolean_among_the_dsus_is_refused_naming_file_line_and_position(tmp_path, samples, fields):
    samples[1]["speech_tokens"] = [5, True, 7]
    path = write_jsonl(tmp_path / "rows.jsonl", samples)
    with pytest.raises(DataError, match=r"rows\.jsonl:2: field 'speech_tokens': position 1: true is a boolean"):
        load_rows(str(path), n_dsus=N_DSUS, **({"fields": fields} if fields else {}))


def test_a_parquet_column_of_booleans_is_not_dsus(tmp_path, samples):
    rows = [dict(s, speech_tokens=[False, True]) for s in samples]
    path = write_parquet(tmp_path / "bool.parquet", rows)
    with pytest.raises(DataError, match=r"bool\.parquet: row 0: field 'speech_tokens': position 0: false is a boolean"):
        load_rows(str(path), n_dsus=N_DSUS, fields=ASR_FIELDS)

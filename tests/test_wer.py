import json
import math
import os
import threading
from contextlib import contextmanager

import jiwer
import pytest

from wer import main, score


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def generations(tmp_path, records):
    return write_jsonl(tmp_path / "generations.jsonl", records)


def run(capsys, *argv):
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@contextmanager
def fifo(path):
    """A FIFO at `path` whose reader, if one opens it, gets an empty file at once: code that reads
    it ends (and fails the test) instead of waiting forever for a writer."""
    os.mkfifo(path)
    done = threading.Event()

    def end_readers():
        while not done.wait(0.05):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # succeeds only while a reader waits
            except OSError:
                pass

    thread = threading.Thread(target=end_readers, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        done.set()
        thread.join()


# Three utterances with one substitution, one deletion and two insertions.
REFS = ["a b c d", "e f g", "h i"]
HYPS = ["a x c d", "e g", "h i j k"]


def test_corpus_wer_is_total_edits_over_total_reference_words():
    result = score(HYPS, REFS, "none", bootstrap=0)
    assert (result["substitutions"], result["deletions"], result["insertions"]) == (1, 1, 2)
    assert result["hits"] == 7
    assert result["n_ref_words"] == 9
    assert result["n_utterances"] == 3
    assert result["wer"] == pytest.approx(4 / 9)
    # not the mean of per-utterance rates (1/4, 1/3, 2/2)
    assert result["wer"] != pytest.approx((1 / 4 + 1 / 3 + 1) / 3)


@pytest.mark.parametrize("refs, hyps", [
    (REFS, HYPS),
    (["the quick brown fox", "jumps over the lazy dog"], ["the quick brown box", "jumped over a lazy dog today"]),
    (["one two three four five"], [""]),
    (["hello there"], ["hello there"]),
])
def test_wer_and_cer_equal_jiwer(refs, hyps):
    result = score(hyps, refs, "none", bootstrap=0)
    assert result["wer"] == pytest.approx(jiwer.wer(refs, hyps))
    assert result["cer"] == pytest.approx(jiwer.cer(refs, hyps))


@pytest.mark.parametrize("reference, hypothesis", [
    ("Colour", "color"),
    ("twenty-one", "21"),
    ("don't", "do not"),
    ("Hello, World!", "hello world"),
    ("I analysed it", "I analyzed it"),
    ("Mr. Smith", "mister smith"),
    ("um the end", "the end"),  # hesitations are dropped
])
def test_whisper_normaliser_matches_spelling_variants_and_none_does_not(reference, hypothesis):
    assert score([hypothesis], [reference], "whisper", bootstrap=0)["wer"] == 0
    assert score([hypothesis], [reference], "none", bootstrap=0)["wer"] > 0


def test_empty_normalised_reference_counts_hypothesis_words_as_insertions():
    result = score(["oh well", "a b"], ["um", "a b"], "whisper", ids=["filler", "ok"], bootstrap=0)
    assert result["insertions"] == 2
    assert result["n_ref_words"] == 2
    assert result["n_empty_references"] == 1
    assert result["wer"] == 1.0
    assert result["worst"] == [{"id": "filler", "reference": "", "hypothesis": "0 well", "errors": 2, "wer": None}]


def test_all_references_empty_is_an_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="every reference is empty"):
        score(["a"], [" "], "none")
    path = generations(tmp_path, [{"id": "u1", "text": "hi", "reference": "hmm"}])
    code, _, err = run(capsys, path)
    assert code == 2
    assert "every reference is empty" in err and str(path) in err
    assert not (tmp_path / "wer.json").exists()


def test_worst_lists_utterances_with_errors_most_first():
    result = score(HYPS, REFS, "none", ids=["sub", "del", "ins"], worst=2, bootstrap=0)
    assert [entry["id"] for entry in result["worst"]] == ["ins", "del"]  # 2 errors, then 1 error at WER 1/3 > 1/4
    assert result["worst"][0] == {"id": "ins", "reference": "h i", "hypothesis": "h i j k", "errors": 2, "wer": 1.0}
    assert score(REFS, REFS, "none", bootstrap=0)["worst"] == []


def test_bootstrap_interval_contains_estimate_and_is_seeded():
    refs = [f"w{i} x y z" for i in range(40)]
    hyps = [ref if i % 3 else "w x" for i, ref in enumerate(refs)]
    first = score(hyps, refs, "none", seed=7)
    interval = first["wer_interval"]
    assert interval["low"] < first["wer"] < interval["high"]
    assert (interval["confidence"], interval["resamples"], interval["seed"]) == (0.95, 1000, 7)
    assert score(hyps, refs, "none", seed=7)["wer_interval"] == interval
    assert score(hyps, refs, "none", seed=8)["wer_interval"] != interval
    assert score(hyps, refs, "none", bootstrap=0)["wer_interval"] is None


def test_bootstrap_resamples_the_corpus_ratio():
    # every utterance has the same error rate, so each resample's corpus WER is exactly it
    result = score(["a x"] * 5 + ["b c y z"] * 5, ["a b"] * 5 + ["b c d e"] * 5, "none", bootstrap=200)
    assert result["wer"] == 0.5
    assert result["wer_interval"]["low"] == result["wer_interval"]["high"] == 0.5


def test_cli_writes_report_beside_input(tmp_path, capsys):
    path = generations(tmp_path, [
        {"id": i, "text": h, "reference": r, "finish_reason": "stop", "token_ids": [1, 2]}
        for i, h, r in zip("abc", HYPS, REFS)
    ])
    code, out, _ = run(capsys, path, "--normalizer", "none", "--seed", "3", "--bootstrap", "50")
    assert code == 0
    report = json.loads((tmp_path / "wer.json").read_text())
    assert report["input"] == str(path)
    assert report["references"] is None
    assert report["normalizer"] == "none"
    assert report["wer"] == pytest.approx(4 / 9)
    assert report["cer"] == pytest.approx(jiwer.cer(REFS, HYPS))
    assert {k: report[k] for k in ("substitutions", "deletions", "insertions", "hits", "n_ref_words", "n_utterances")} == {
        "substitutions": 1, "deletions": 1, "insertions": 2, "hits": 7, "n_ref_words": 9, "n_utterances": 3}
    assert report["wer_interval"]["seed"] == 3 and report["wer_interval"]["resamples"] == 50
    assert report["worst"][0]["id"] == "c"
    assert "44.44%" in out and "wer.json" in out


def test_cli_refuses_to_overwrite(tmp_path, capsys):
    path = generations(tmp_path, [{"id": "a", "text": "x", "reference": "y"}])
    out = tmp_path / "scores.json"
    out.write_text("keep me")
    code, _, err = run(capsys, path, "--out", out)
    assert code == 2
    assert "already exists" in err and "--overwrite" in err
    assert out.read_text() == "keep me"
    assert run(capsys, path, "--out", out, "--overwrite")[0] == 0
    assert json.loads(out.read_text())["wer"] == 1.0


def test_scoring_again_without_flags_scores_as_the_report_was_scored(tmp_path, capsys):
    # make demo scores with --references --by speaker --worst 5: scoring again must keep its by-voice groups
    path = generations(tmp_path, [{"id": i, "text": h} for i, h in zip("abc", HYPS)])
    dataset = write_jsonl(tmp_path / "test.jsonl", [
        {"id": i, "transcript": r, "speaker": s} for i, r, s in zip("abc", REFS, ["v2", "v1", "v2"])])
    assert run(capsys, path, "--references", dataset, "--by", "speaker", "--worst", "2")[0] == 0
    first = (tmp_path / "wer.json").read_bytes()
    mtime = (tmp_path / "wer.json").stat().st_mtime_ns

    code, out, err = run(capsys, path)
    assert code == 0 and "is unchanged" in out and "--by speaker" in err and "--worst 2" in err
    assert (tmp_path / "wer.json").read_bytes() == first and (tmp_path / "wer.json").stat().st_mtime_ns == mtime

    code, _, err = run(capsys, path, "--references", dataset, "--worst", "1")  # other settings: other figures
    assert code == 2 and "--overwrite" in err and (tmp_path / "wer.json").read_bytes() == first
    assert run(capsys, path, "--references", dataset, "--worst", "1", "--overwrite")[0] == 0
    report = json.loads((tmp_path / "wer.json").read_text())
    assert "groups" not in report and len(report["worst"]) == 1 and report["scored_with"]["worst"] == 1


def test_a_report_from_before_the_record_is_replaced_only_with_overwrite(tmp_path, capsys):
    path = generations(tmp_path, [{"id": "a", "text": "x", "reference": "y"}])
    assert run(capsys, path)[0] == 0
    old = json.loads((tmp_path / "wer.json").read_text())
    del old["scored_with"]
    (tmp_path / "wer.json").write_text(json.dumps(old))
    code, _, err = run(capsys, path)
    assert code == 2 and "--overwrite" in err and "scored_with" not in (tmp_path / "wer.json").read_text()


@pytest.mark.parametrize("content, message", [
    ("", "no generations"),
    ("\n\n", "no generations"),
    ('{"id": "a", "text": "x", "reference": "x"}\n{"id": "b", "text": \n', ":2: not valid JSON"),
    ('["a", "x", "x"]\n', ":1: expected a JSON object, got list"),
    ('{"text": "x", "reference": "x"}\n', ":1: missing field 'id'"),
    ('{"id": "a", "reference": "x"}\n', ":1: missing field 'text'"),
    ('{"id": "a", "text": "x"}\n', ":1: missing field 'reference'"),
    ('{"id": "a", "text": null, "reference": "x"}\n', ":1: field 'text' must be a string, got null"),
    ('{"id": "a", "text": "x", "reference": "x"}\n\n{"id": "a", "text": "y", "reference": "y"}\n',
     ":3: duplicate id 'a' (first on line 1)"),
    (b'{"id": "a", "text": "x", "reference": "x"}\n{"id": "b", "text": "\xff", "reference": "y"}\n', ":2: not UTF-8"),
])
def test_bad_generations_exit_2_naming_file_and_line(tmp_path, capsys, content, message):
    path = tmp_path / "generations.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, out, err = run(capsys, path)
    assert code == 2
    assert str(path) in err and message in err
    assert not (tmp_path / "wer.json").exists()


def test_references_joined_by_id_from_dataset(tmp_path, capsys):
    path = generations(tmp_path, [{"id": i, "text": h} for i, h in zip("abc", HYPS)])
    dataset = write_jsonl(tmp_path / "test.jsonl", [
        {"id": i, "transcript": r, "speech_tokens": [1, 2]} for i, r in reversed(list(zip("abc", REFS)))
    ])
    code, _, _ = run(capsys, path, "--references", dataset, "--normalizer", "none")
    assert code == 0
    report = json.loads((tmp_path / "wer.json").read_text())
    assert report["wer"] == pytest.approx(4 / 9)
    assert report["references"] == str(dataset)


def test_reference_ids_must_match_both_ways(tmp_path, capsys):
    path = generations(tmp_path, [{"id": f"g{i}", "text": "x"} for i in range(12)] + [{"id": "shared", "text": "x"}])
    dataset = write_jsonl(tmp_path / "test.jsonl", [{"id": "shared", "transcript": "x"}, {"id": "r0", "transcript": "y"}])
    code, _, err = run(capsys, path, "--references", dataset)
    assert code == 2
    assert f"12 generation id(s) not in {dataset}" in err
    assert "'g0'" in err and "'g9'" in err and "'g10'" not in err and "(2 more)" in err
    assert f"1 reference id(s) with no generation in {path}: 'r0'" in err
    assert not (tmp_path / "wer.json").exists()


def test_bad_reference_dataset_exits_2(tmp_path, capsys):
    path = generations(tmp_path, [{"id": "a", "text": "x"}])
    dataset = tmp_path / "test.jsonl"
    dataset.write_text('{"id": "a"}\n')
    code, _, err = run(capsys, path, "--references", dataset)
    assert code == 2
    assert str(dataset) in err and "transcript" in err
    assert not (tmp_path / "wer.json").exists()


def test_an_empty_reference_dataset_is_called_empty(tmp_path, capsys):
    path = generations(tmp_path, [{"id": "a", "text": "x"}])
    dataset = tmp_path / "test.jsonl"
    dataset.write_text("")
    code, _, err = run(capsys, path, "--references", dataset)
    assert code == 2
    assert f"{dataset}: no references (the dataset is empty)" in err and "do not match" not in err
    assert not (tmp_path / "wer.json").exists()


def test_by_scores_each_value_of_a_dataset_field_on_its_own(tmp_path, capsys):
    path = generations(tmp_path, [{"id": i, "text": h} for i, h in zip("abc", HYPS)])
    dataset = write_jsonl(tmp_path / "test.jsonl", [
        {"id": i, "transcript": r, "speaker": s} for i, r, s in zip("abc", REFS, ["v2", "v1", "v2"])
    ])
    code, out, _ = run(capsys, path, "--references", dataset, "--normalizer", "none", "--by", "speaker")
    assert code == 0
    report = json.loads((tmp_path / "wer.json").read_text())
    assert report["wer"] == pytest.approx(4 / 9)  # the corpus figures are unchanged
    assert report["by"] == "speaker" and list(report["groups"]) == ["v1", "v2"]
    v1, v2 = report["groups"]["v1"], report["groups"]["v2"]
    assert (v1["errors"], v1["n_ref_words"], v1["n_utterances"]) == (1, 3, 1)  # "e f g" -> "e g"
    assert (v2["errors"], v2["n_ref_words"], v2["n_utterances"]) == (3, 6, 2)  # pooled, not averaged
    assert v2["wer"] == pytest.approx(3 / 6) and v1["wer"] == pytest.approx(1 / 3)
    assert "by speaker:" in out and "v1" in out


def test_by_needs_references_and_the_field_on_every_row(tmp_path, capsys):
    path = generations(tmp_path, [{"id": i, "text": h, "reference": r} for i, h, r in zip("abc", HYPS, REFS)])
    code, _, err = run(capsys, path, "--by", "speaker")
    assert code == 2 and "--references" in err
    dataset = write_jsonl(tmp_path / "test.jsonl", [
        {"id": "a", "transcript": REFS[0], "speaker": "v1"}, {"id": "b", "transcript": REFS[1]},
        {"id": "c", "transcript": REFS[2], "speaker": "v1"},
    ])
    code, _, err = run(capsys, path, "--references", dataset, "--by", "speaker")
    assert code == 2 and "'speaker'" in err and "'b'" in err
    assert not (tmp_path / "wer.json").exists()


def test_a_run_directory_gets_a_table_and_a_plot_of_wer_by_step(tmp_path, capsys):
    run_dir = tmp_path / "run"
    # Step 200 fixes most step-100 errors: 4 edits in 9 words, then 1 (the last hypothesis keeps an insertion).
    later = ["a b c d", "e f g", "h i j"]
    for step, hyps in ((100, HYPS), (200, later)):
        out = run_dir / "generations" / str(step) / "mini" / "test"
        out.mkdir(parents=True)
        write_jsonl(out / "generations.jsonl",
                    [{"id": f"u{i}", "text": h, "reference": r} for i, (h, r) in enumerate(zip(hyps, REFS))])
    (run_dir / "generations" / "untrained" / "mini" / "test").mkdir(parents=True)  # not a checkpoint's: ignored
    write_jsonl(run_dir / "generations" / "untrained" / "mini" / "test" / "generations.jsonl", [{"id": "x"}])

    code, out, _ = run(capsys, run_dir, "--normalizer", "none", "--bootstrap", "200")
    assert code == 0
    lines = (run_dir / "wer_by_step.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["step", "set", "n_utterances", "wer", "cer", "wer_low", "wer_high"]
    rows = [line.split("\t") for line in lines[1:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [("100", "mini/test", "3"), ("200", "mini/test", "3")]
    assert [float(r[3]) for r in rows] == pytest.approx([4 / 9, 1 / 9])
    assert all(float(r[5]) <= float(r[3]) <= float(r[6]) for r in rows)
    assert (run_dir / "wer_by_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "44.44%" in out and "11.11%" in out

    before = (run_dir / "wer_by_step.tsv").read_text()
    code, _, err = run(capsys, run_dir)  # never overwritten without --overwrite
    assert code == 2 and "already exist" in err and (run_dir / "wer_by_step.tsv").read_text() == before
    assert run(capsys, run_dir, "--overwrite", "--bootstrap", "0", "--out", tmp_path / "report")[0] == 0
    assert (tmp_path / "report" / "wer_by_step.png").exists()


def test_a_run_directory_without_generations_exits_2(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    code, _, err = run(capsys, tmp_path / "run")
    assert code == 2 and "no generations/<step>" in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]


# -- wer.py --compare ------------------------------------------------------------------------------

def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def report(wer, cer, interval=None, normalizer="whisper", groups=None):
    """A wer.json as wer.py writes it (the fields --compare reads), optionally scored --by speaker."""
    body = {"normalizer": normalizer, "wer": wer, "cer": cer, "wer_interval": interval and {
        "low": interval[0], "high": interval[1], "confidence": 0.95, "resamples": 1000, "seed": 0}}
    if groups is not None:
        body |= {"by": "speaker", "groups": {
            speaker: {"wer": e / n, "cer": 0.1, "errors": e, "n_ref_words": n, "n_utterances": 2}
            for speaker, (e, n) in groups.items()}}
    return body


def crafted_matrix(root):
    """Two cells as the matrix driver lays them out: units/regime/{wer,cell}.json."""
    sft = root / "mfcc-k128-25hz" / "sft"
    write_json(sft / "wer.json", report(0.25, 0.125, (0.2, 0.3), groups={
        "v1": (2, 10), "v2": (4, 10), "held1": (9, 30), "held2": (1, 10)}))
    write_json(sft / "cell.json", {
        "cell": "mfcc-k128-25hz/sft", "units": "mfcc-k128-25hz", "regime": "sft",
        "options": {"deduplicate": True, "dsu_bpe": 0}, "speech_tokens_per_utterance": 36.14,
        "training_tokens": 1234567, "unseen_speakers": ["held1", "held2", "absent"],
        "seconds": {"sft": 200.0, "generate": 40.0, "total": 330.0}, "complete": True})
    cpt = root / "mfcc-k128-25hz" / "cpt-interleaved+sft"
    write_json(cpt / "wer.json", report(0.0625, 0.03, (0.05, 0.08)))
    write_json(cpt / "cell.json", {
        "cell": "mfcc-k128-25hz/cpt-interleaved+sft", "units": "mfcc-k128-25hz", "regime": "cpt-interleaved+sft",
        "options": {"deduplicate": False, "dsu_bpe": 512}, "training_tokens": 2000, "seconds": {"total": 90}})
    return root


def test_compare_writes_the_expected_table_csv_and_chart(tmp_path, capsys):
    matrix = crafted_matrix(tmp_path / "matrix")
    code, out, _ = run(capsys, "--compare", matrix)
    assert code == 0
    lines = (matrix / "compare.csv").read_text().splitlines()
    assert lines[0] == ("cell,units,regime,options,wer,wer_low,wer_high,wer_seen,wer_unseen,cer,"
                        "speech_tokens_per_utterance,training_tokens,seconds")
    # in path order: cpt-interleaved+sft before sft; seen = v1+v2 = 6/20, unseen = held1+held2 = 10/40
    assert lines[1:] == [
        'mfcc-k128-25hz/cpt-interleaved+sft,mfcc-k128-25hz,cpt-interleaved+sft,"no dedup, bpe 512",'
        "0.0625,0.05,0.08,,,0.03,,2000,90",
        "mfcc-k128-25hz/sft,mfcc-k128-25hz,sft,-,0.25,0.2,0.3,0.3,0.25,0.125,36.14,1234567,330.0",
    ]
    markdown = (matrix / "compare.md").read_text()
    assert "whisper normaliser" in markdown and "95% bootstrap" in markdown
    assert ("| mfcc-k128-25hz/sft | mfcc-k128-25hz | sft | - | 25.0 | [20.0, 30.0] | 30.0 | 25.0 | 12.5 | 36.1 "
            "| 1,234,567 | 5.5 |") in markdown
    assert "| no dedup, bpe 512 | 6.2 | [5.0, 8.0] |  |  | 3.0 |  | 2,000 | 1.5 |" in markdown
    assert markdown in out  # the table is printed too
    assert "compare.md" in out and "compare.csv" in out and "compare.png" in out
    assert (matrix / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_calls_a_difference_only_where_it_holds_across_seeds(tmp_path, capsys):
    """Three seeds of three cells, as matrix.py lays them out (seed 0's directory without a tag): A
    beats C on every seed; B and C overlap; A and B differ by more than their bootstrap intervals on seed 0, but
    their seed ranges overlap, so that difference is not called."""
    root = tmp_path / "matrix"
    wers = {"A": (0.30, 0.34, 0.36), "B": (0.40, 0.33, 0.42), "C": (0.50, 0.41, 0.55)}
    for cell, values in wers.items():
        for seed, wer in enumerate(values):
            folder = root / "u" / (cell + (f"+seed{seed}" if seed else ""))
            write_json(folder / "wer.json", report(wer, wer / 2, (wer - 0.02, wer + 0.02)))
            write_json(folder / "cell.json", {"cell": f"u/{cell}", "seed": seed, "units": "u", "regime": cell})
    code, _, _ = run(capsys, "--compare", root)
    assert code == 0
    markdown = (root / "compare.md").read_text()
    assert "| u/A (seed 0) | u | A |  | 30.0 | [28.0, 32.0] |" in markdown
    assert "| u/A | 3 | 33.3 | 3.1 | 30.0-36.0 | 2.0 |" in markdown  # mean, sample sd, range, bootstrap ±
    called = markdown.split("Differences that hold across seeds")[1]
    assert "- u/A < u/C (36.0% at worst against 41.0% at best)" in called
    assert "- u/B < u/C" not in called and "u/A < u/B" not in called  # B's 0.33 lies inside A's range
    assert (root / "compare.csv").read_text().splitlines()[0].endswith(",seconds,seed")


def test_compare_without_cell_json_names_cells_by_directory_and_leaves_columns_blank(tmp_path, capsys):
    root = tmp_path / "runs"
    write_json(root / "a" / "deep" / "cell1" / "wer.json", report(0.5, 0.25, groups={"v1": (1, 2)}))
    write_json(root / "b" / "wer.json", report(0.1, 0.05))
    single = write_json(tmp_path / "elsewhere" / "one" / "wer.json", report(0.2, 0.1, (0.1, 0.3)))
    out_dir = tmp_path / "table"
    code, _, _ = run(capsys, "--compare", root, single, "--out", out_dir)
    assert code == 0
    rows = (out_dir / "compare.csv").read_text().splitlines()[1:]
    # nested cells are found; without unseen_speakers there is no seen/unseen split
    assert rows == ["a/deep/cell1,,,,0.5,,,,,0.25,,,", "b,,,,0.1,,,,,0.05,,,", "one,,,,0.2,0.1,0.3,,,0.1,,,"]
    assert "| b |  |  |  | 10.0 |  |  |  | 5.0 |  |  |  |" in (out_dir / "compare.md").read_text()
    assert not (root / "compare.csv").exists()


def test_compare_defaults_to_the_first_reports_directory_for_a_file(tmp_path, capsys):
    path = write_json(tmp_path / "cell" / "wer.json", report(0.2, 0.1))
    assert run(capsys, "--compare", path)[0] == 0
    assert sorted(p.name for p in (tmp_path / "cell").iterdir()) == [
        "compare.csv", "compare.md", "compare.png", "wer.json"]


def test_compare_of_reports_in_several_folders_writes_where_they_meet(tmp_path, capsys):
    a = write_json(tmp_path / "runs" / "a" / "wer.json", report(0.2, 0.1))
    b = write_json(tmp_path / "runs" / "b" / "deep" / "wer.json", report(0.3, 0.1))
    code, out, _ = run(capsys, "--compare", a, b)
    assert code == 0 and str(tmp_path / "runs" / "compare.md") in out
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["a", "b", "compare.csv", "compare.md", "compare.png"]
    assert sorted(p.name for p in a.parent.iterdir()) == ["wer.json"]


def test_compare_refuses_to_overwrite(tmp_path, capsys):
    matrix = crafted_matrix(tmp_path / "matrix")
    (matrix / "compare.csv").write_text("keep me")
    code, _, err = run(capsys, "--compare", matrix)
    assert code == 2
    assert f"{matrix / 'compare.csv'}" in err and "--overwrite" in err
    assert (matrix / "compare.csv").read_text() == "keep me"
    assert not (matrix / "compare.md").exists() and not (matrix / "compare.png").exists()
    assert run(capsys, "--compare", matrix, "--overwrite")[0] == 0
    assert (matrix / "compare.csv").read_text().startswith("cell,units,")


def test_compare_refuses_mixed_normalisers(tmp_path, capsys):
    whisper = write_json(tmp_path / "a" / "wer.json", report(0.2, 0.1))
    none = write_json(tmp_path / "b" / "wer.json", report(0.3, 0.1, normalizer="none"))
    code, _, err = run(capsys, "--compare", tmp_path)
    assert code == 2
    assert str(whisper) in err and str(none) in err and "not comparable" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


@pytest.mark.parametrize("name, content, message", [
    ("missing", None, "no such file or directory"),
    ("empty", "dir", "no wer.json"),
    ("wer.json", "{not json", ":1:2: invalid JSON"),
    ("wer.json", "[1, 2]", "expected a JSON object, got an array"),
    ("wer.json", json.dumps({"cer": 0.1}), "no 'wer' field"),
    ("wer.json", json.dumps({"wer": "high"}), "'wer' must be a finite number >= 0"),
    ("cell.json", "{", ":1:2: invalid JSON"),
    ("cell.json", json.dumps({"training_tokens": "many"}), "'training_tokens' must be an integer >= 0"),
])
def test_compare_bad_input_exits_2_naming_the_file(tmp_path, capsys, name, content, message):
    cell = tmp_path / "cells" / "c1"
    write_json(cell / "wer.json", report(0.2, 0.1))
    target = tmp_path / "cells" / name
    if name in ("wer.json", "cell.json"):
        target = cell / name
        target.write_text(content)
    elif content == "dir":
        target.mkdir()
    extra = [] if name in ("wer.json", "cell.json") else [target]  # a bad report or cell.json is found in c1
    code, _, err = run(capsys, "--compare", cell, *extra)
    assert code == 2
    assert str(target) in err and message in err
    assert not list(tmp_path.rglob("compare.*"))


def test_compare_and_generations_are_mutually_exclusive(tmp_path, capsys):
    path = generations(tmp_path, [{"id": "a", "text": "x", "reference": "y"}])
    for argv in ([str(path), "--compare", str(tmp_path)], []):
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "not allowed with" in err and "one of the arguments generations --compare is required" in err


# -- bad input, refused in one line with exit status 2 and nothing written ---------------------------

def test_a_fifo_is_refused_where_generations_are_expected(tmp_path, capsys):
    with fifo(tmp_path / "generations.jsonl") as path:
        code, _, err = run(capsys, path)
    assert code == 2 and f"{path}: is a FIFO" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generations.jsonl"]


def test_a_fifo_is_refused_where_a_cell_json_is_expected(tmp_path, capsys):
    cell = tmp_path / "cells" / "c1"
    write_json(cell / "wer.json", report(0.2, 0.1))
    with fifo(cell / "cell.json"):
        code, _, err = run(capsys, "--compare", tmp_path / "cells")
    assert code == 2 and f"{cell / 'cell.json'}: is a FIFO" in err
    assert not list(tmp_path.rglob("compare.*"))


@pytest.mark.parametrize("interval, message", [
    ({"low": 0.1, "confidence": 0.95}, "'wer_interval' needs numbers low <= high"),
    ({"low": 0.3, "high": 0.1, "confidence": 0.95}, "'wer_interval' needs numbers low <= high"),
    ({"low": 0.1, "high": 0.3, "confidence": "95%"}, "'wer_interval.confidence' must be a number between 0 and 1"),
    ({"low": 0.1, "high": 0.3, "confidence": True}, "'wer_interval.confidence' must be a number between 0 and 1"),
    ({"low": 0.1, "high": 0.3}, "'wer_interval.confidence' must be a number between 0 and 1"),
    ({"low": math.nan, "high": 0.3, "confidence": 0.95}, "'wer_interval.low' must be a finite number >= 0, got NaN"),
    ("[0.1, 0.3]", "'wer_interval' must be an object or null"),
])
def test_compare_refuses_a_malformed_interval_and_writes_nothing(tmp_path, capsys, interval, message):
    write_json(tmp_path / "good" / "wer.json", report(0.25, 0.1, (0.2, 0.3)))  # the first row is fine
    bad = write_json(tmp_path / "bad" / "wer.json", {**report(0.2, 0.1), "wer_interval": interval})
    code, _, err = run(capsys, "--compare", tmp_path, "--out", tmp_path / "table")
    assert code == 2 and f"{bad}: {message}" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "table").exists() and not list(tmp_path.rglob("compare.*"))


@pytest.mark.parametrize("file, field, value, message", [
    ("wer.json", "wer", math.nan, "'wer' must be a finite number >= 0, got NaN"),
    ("wer.json", "wer", math.inf, "'wer' must be a finite number >= 0, got Infinity"),
    ("wer.json", "wer", True, "'wer' must be a finite number >= 0, got true"),
    ("wer.json", "cer", -0.1, "'cer' must be a finite number >= 0"),
    ("wer.json", "normalizer", None, "'normalizer' must be whisper or none, got null"),
    ("cell.json", "training_tokens", True, "'training_tokens' must be an integer >= 0, got true"),
    ("cell.json", "training_tokens", 1.5, "'training_tokens' must be an integer >= 0"),
    ("cell.json", "speech_tokens_per_utterance", math.nan, "'speech_tokens_per_utterance' must be a finite number"),
    ("cell.json", "options", {"dsu_bpe": True}, "'options.dsu_bpe' must be an integer >= 0, got true"),
    ("cell.json", "options", {"deduplicate": "no"}, "'options.deduplicate' must be true or false"),
    ("cell.json", "options", "bpe", "'options' must be an object"),
    ("cell.json", "seconds", 330, "'seconds' must be an object"),
    ("cell.json", "seconds", {"total": math.nan}, "'seconds.total' must be a finite number >= 0, got NaN"),
    ("cell.json", "cell", 7, "'cell' must be a string, got 7"),
    ("cell.json", "unseen_speakers", "held1", "'unseen_speakers' must be a list of speaker names"),
])
def test_compare_refuses_nan_booleans_and_wrong_types(tmp_path, capsys, file, field, value, message):
    matrix = crafted_matrix(tmp_path / "matrix")
    target = matrix / "mfcc-k128-25hz" / "sft" / file
    target.write_text(json.dumps({**json.loads(target.read_text()), field: value}))  # json writes NaN as NaN
    code, _, err = run(capsys, "--compare", matrix)
    assert code == 2 and f"{target}: {message}" in err
    assert not list(tmp_path.rglob("compare.*"))


@pytest.mark.parametrize("group, message", [
    ({"errors": True, "n_ref_words": 10}, "'groups.v1.errors' must be an integer >= 0, got true"),
    ({"errors": 2, "n_ref_words": 10.0}, "'groups.v1.n_ref_words' must be an integer >= 0"),
    ({"errors": None, "n_ref_words": 10}, "'groups.v1' needs n_ref_words and, when it is not 0, errors"),
    ("v1", "'groups.v1' must be an object"),
])
def test_compare_refuses_speaker_groups_that_are_not_counts(tmp_path, capsys, group, message):
    matrix = crafted_matrix(tmp_path / "matrix")
    target = matrix / "mfcc-k128-25hz" / "sft" / "wer.json"
    body = json.loads(target.read_text())
    body["groups"]["v1"] = group
    target.write_text(json.dumps(body))
    code, _, err = run(capsys, "--compare", matrix)
    assert code == 2 and f"{target}: {message}" in err
    assert not list(tmp_path.rglob("compare.*"))


@pytest.mark.parametrize("errors", [None, 3])
def test_a_speaker_without_reference_words_adds_nothing_to_seen_or_unseen(tmp_path, capsys, errors):
    matrix = crafted_matrix(tmp_path / "matrix")
    target = matrix / "mfcc-k128-25hz" / "sft" / "wer.json"
    body = json.loads(target.read_text())
    body["groups"]["held3"] = {"wer": None, "cer": None, "errors": errors, "n_ref_words": 0, "n_utterances": 1}
    target.write_text(json.dumps(body))
    assert run(capsys, "--compare", matrix)[0] == 0
    row = (matrix / "compare.csv").read_text().splitlines()[2].split(",")
    assert row[7:9] == ["0.3", "0.25"]  # as without held3


def test_compare_draws_an_interval_that_misses_its_estimate(tmp_path, capsys):
    write_json(tmp_path / "a" / "wer.json", report(0.5, 0.1, (0.1, 0.3)))
    assert run(capsys, "--compare", tmp_path / "a")[0] == 0
    assert (tmp_path / "a" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_tells_cells_of_the_same_name_apart_by_their_paths(tmp_path, capsys):
    for run_name, wer in (("run1", 0.25), ("run2", 0.5)):
        cell = tmp_path / run_name / "cells" / "u" / "sft"
        write_json(cell / "wer.json", report(wer, 0.1))
        write_json(cell / "cell.json", {"cell": "u/sft", "units": "u", "regime": "sft"})
    code, _, _ = run(capsys, "--compare", tmp_path / "run1", tmp_path / "run2", "--out", tmp_path / "table")
    assert code == 0
    rows = [line.split(",")[:5] for line in (tmp_path / "table" / "compare.csv").read_text().splitlines()[1:]]
    assert rows == [[f"u/sft ({tmp_path / 'run1' / 'cells' / 'u' / 'sft'})", "u", "sft", "", "0.25"],
                    [f"u/sft ({tmp_path / 'run2' / 'cells' / 'u' / 'sft'})", "u", "sft", "", "0.5"]]


@pytest.mark.parametrize("out, message", [
    ("file", "{tmp}/file is a regular file, where a directory is expected"),
    ("file/below", "{tmp}/file/below cannot be created: {tmp}/file is a regular file"),
    ("loop", "{tmp}/loop is a symlink loop, where a directory is expected"),
])
def test_compare_refuses_an_out_that_is_a_file_or_lies_below_one(tmp_path, capsys, out, message):
    matrix = crafted_matrix(tmp_path / "matrix")
    (tmp_path / "file").write_text("keep me")
    (tmp_path / "loop").symlink_to("loop")
    code, _, err = run(capsys, "--compare", matrix, "--out", tmp_path / out)
    assert code == 2 and f"--out: {message.format(tmp=tmp_path)}" in err
    assert (tmp_path / "file").read_text() == "keep me" and not list(tmp_path.rglob("compare.*"))


@pytest.mark.parametrize("out, message", [
    ("somedir", "{tmp}/somedir is a directory, where the report file is expected"),
    ("file/wer.json", "{tmp}/file is a regular file, where a directory is expected"),
    ("file/below/wer.json", "{tmp}/file/below cannot be created: {tmp}/file is a regular file"),
])
def test_an_out_that_is_a_directory_or_lies_below_a_file_is_refused(tmp_path, capsys, out, message):
    path = generations(tmp_path, [{"id": "a", "text": "x", "reference": "y"}])
    (tmp_path / "somedir").mkdir()
    (tmp_path / "file").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        code, _, err = run(capsys, path, "--out", tmp_path / out, *extra)
        assert code == 2 and f"--out: {message.format(tmp=tmp_path)}" in err
    assert not list((tmp_path / "somedir").iterdir()) and (tmp_path / "file").read_text() == "keep me"
    assert not (tmp_path / "wer.json").exists()


def test_a_run_directory_refuses_an_out_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "run" / "generations" / "100" / "mini" / "test"
    out.mkdir(parents=True)
    write_jsonl(out / "generations.jsonl", [{"id": "u", "text": "a", "reference": "a"}])
    (tmp_path / "file").write_text("keep me")
    code, _, err = run(capsys, tmp_path / "run", "--out", tmp_path / "file")
    assert code == 2 and f"--out: {tmp_path / 'file'} is a regular file, where a directory is expected" in err
    assert (tmp_path / "file").read_text() == "keep me" and not list(tmp_path.rglob("wer_by_step*"))


def test_a_negative_seed_is_a_usage_error(tmp_path, capsys):
    path = generations(tmp_path, [{"id": "a", "text": "x", "reference": "y"}])
    with pytest.raises(SystemExit) as stopped:
        main([str(path), "--seed", "-1"])
    assert stopped.value.code == 2 and "--seed: must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "wer.json").exists()


def test_a_fifo_among_a_runs_generations_is_refused(tmp_path, capsys):
    out = tmp_path / "run" / "generations" / "100" / "mini" / "test"
    out.mkdir(parents=True)
    with fifo(out / "generations.jsonl") as path:
        code, _, err = run(capsys, tmp_path / "run")
    assert code == 2 and f"{path}: is a FIFO" in err
    assert not list(tmp_path.rglob("wer_by_step*"))


def test_compare_refuses_a_directory_in_an_outputs_place_and_replaces_nothing(tmp_path, capsys):
    matrix = crafted_matrix(tmp_path / "matrix")
    (matrix / "compare.csv").write_text("keep me")
    (matrix / "compare.md").mkdir()
    code, _, err = run(capsys, "--compare", matrix, "--overwrite")
    assert code == 2 and f"{matrix / 'compare.md'} is a directory, where an output file goes" in err
    assert (matrix / "compare.csv").read_text() == "keep me" and not (matrix / "compare.png").exists()

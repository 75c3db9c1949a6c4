"""Scoring speech units (unit_scores.py, through wer.py): the unit edit rate against hand-computed
cases, its bootstrap interval and groups, refusals of bad records, the run table and --compare with
unit reports, and the round-trip WER of generated units transcribed by a memorising ASR checkpoint."""

import json
import random
import time
from pathlib import Path

import pytest

import extend
import train
import unit_scores
from tiny_model import make_tiny_model
from unit_scores import score_units
from wer import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def run(capsys, *argv):
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def record(id, hyp, ref, task="tts", text="the cat", **more):
    """A record as generate.py --task tts|continue writes it."""
    return {"id": id, "task": task, "text": text, "speech_tokens": hyp, "reference_speech_tokens": ref,
            "token_ids": [], "finish_reason": "stop", "prompt_len": 12, **more}


def edits(result):
    return result["substitutions"], result["deletions"], result["insertions"]


# -- the unit edit rate ------------------------------------------------------------------------------


@pytest.mark.parametrize("hyp, ref, expected", [
    ([1, 9, 3], [1, 2, 3], (1, 0, 0)),            # a substitution
    ([1, 3], [1, 2, 3], (0, 1, 0)),               # a deletion
    ([1, 2, 4, 3], [1, 2, 3], (0, 0, 1)),         # an insertion
    ([], [1, 2, 3], (0, 3, 0)),                   # nothing generated: all deletions
    ([3, 2, 1], [1, 2, 3], (2, 0, 0)),
])
def test_edits_are_counted_by_kind(hyp, ref, expected):
    result = score_units([hyp], [ref])
    assert edits(result) == expected
    assert result["unit_edit_rate"] == sum(expected) / 3 and result["n_ref_units"] == 3
    assert result["hits"] == 3 - expected[0] - expected[1]


def test_repeats_are_collapsed_on_both_sides_before_scoring():
    # [1, 1, 2, 2, 2, 3] is [1, 2, 3]: a model trained without deduplication is scored like one trained with it
    result = score_units([[1, 1, 2, 2, 2, 3]], [[1, 2, 3, 3]])
    assert edits(result) == (0, 0, 0) and result["n_ref_units"] == 3 and result["n_hyp_units"] == 3
    # a unit repeated after another is a new run, kept
    assert score_units([[1, 2, 1]], [[1, 1, 2, 1, 1]])["unit_edit_rate"] == 0


def test_the_rate_is_corpus_level_not_a_mean_of_utterances():
    # 1 edit in 1 unit (100%) and none in 9 (0%): 1/10, not the mean 50%
    result = score_units([[7], list(range(9))], [[5], list(range(9))])
    assert result["unit_edit_rate"] == pytest.approx(0.1)
    assert result["errors"] == 1 and result["n_ref_units"] == 10 and result["n_utterances"] == 2


def test_a_reference_without_units_counts_insertions_and_no_length():
    result = score_units([[4, 5], [1, 2]], [[], [1, 2]])
    assert edits(result) == (0, 0, 2) and result["n_ref_units"] == 2 and result["n_empty_references"] == 1
    assert result["worst"][0] == {"id": "0", "errors": 2, "ref_units": 0, "hyp_units": 2, "unit_edit_rate": None}
    with pytest.raises(ValueError, match="every reference has no units"):
        score_units([[1]], [[]])


def levenshtein(a, b):
    """The textbook dynamic programme, to check jiwer's alignment gives the fewest edits."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, start=1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


def test_the_edits_are_the_levenshtein_distance():
    rng = random.Random(0)
    for _ in range(200):
        ref = unit_scores.collapse_repeats([rng.randrange(6) for _ in range(rng.randint(1, 12))])
        hyp = unit_scores.collapse_repeats([rng.randrange(6) for _ in range(rng.randint(0, 12))])
        assert score_units([hyp], [ref])["errors"] == levenshtein(ref, hyp)


def test_a_thousand_utterances_of_200_units_score_in_well_under_5_seconds():
    rng = random.Random(1)
    refs = [[rng.randrange(500) for _ in range(200)] for _ in range(1000)]
    hyps = [[u if rng.random() < 0.7 else rng.randrange(500) for u in ref if rng.random() < 0.9] for ref in refs]
    started = time.perf_counter()
    result = score_units(hyps, refs)
    assert time.perf_counter() - started < 5
    assert 0 < result["unit_edit_rate"] < 1


# -- wer.py on unit records ----------------------------------------------------------------------------

RECORDS = [record("a", [1, 1, 2, 3, 4], [1, 2, 3, 4]),            # 0 edits in 4
           record("b", [5, 9, 7], [5, 6, 7, 7, 8], text="a dog"),  # 6 -> 9, 8 deleted: 2 in 4
           record("c", [], [3, 4], text="red")]                    # nothing generated: 2 deletions in 2
SPEAKERS = {"a": "v1", "b": "v2", "c": "v2"}


def references(tmp_path):
    return write_jsonl(tmp_path / "refs.jsonl", [
        {"id": i, "transcript": r["text"], "speech_tokens": r["reference_speech_tokens"], "speaker": SPEAKERS[i]}
        for i, r in zip("abc", RECORDS)])


def test_wer_py_reports_the_unit_edit_rate_with_its_interval_and_groups(tmp_path, capsys):
    path = write_jsonl(tmp_path / "generations.jsonl", RECORDS)
    code, out, _ = run(capsys, path, "--references", references(tmp_path), "--by", "speaker", "--seed", "3")
    assert code == 0
    report = json.loads((tmp_path / "wer.json").read_text())
    assert report["metric"] == "unit_edit_rate" and report["task"] == "tts" and report["deduplicated"] is True
    assert report["unit_edit_rate"] == pytest.approx(4 / 10) and edits(report) == (1, 3, 0)
    assert report["n_empty_hypotheses"] == 1 and report["round_trip"] is None
    interval = report["unit_edit_rate_interval"]
    assert interval["low"] <= report["unit_edit_rate"] <= interval["high"] and interval["seed"] == 3
    assert [w["id"] for w in report["worst"]] == ["c", "b"]  # 2 edits each, c's rate higher
    assert report["groups"] == {
        "v1": {"unit_edit_rate": 0.0, "errors": 0, "n_ref_units": 4, "n_utterances": 1},
        "v2": {"unit_edit_rate": pytest.approx(4 / 6), "errors": 4, "n_ref_units": 6, "n_utterances": 2}}
    assert "unit edit rate   40.00%" in out and "consecutive repeats collapsed" in out and "v2   unit edit rate" in out

    # the same seed gives the same interval: the report comes out the same and is left as it is
    code, out, _ = run(capsys, path, "--references", tmp_path / "refs.jsonl", "--by", "speaker", "--seed", "3")
    assert code == 0 and "is unchanged" in out
    # another seed, another interval: a report with other figures is only replaced with --overwrite
    assert run(capsys, path, "--seed", "4")[0] == 2
    assert run(capsys, path, "--seed", "4", "--overwrite")[0] == 0
    other = json.loads((tmp_path / "wer.json").read_text())["unit_edit_rate_interval"]
    assert (other["low"], other["high"], other["seed"]) != (interval["low"], interval["high"], 3)


BAD = [
    ('"speech_tokens": [1, "2"]', "field 'speech_tokens', position 1: '2' is str, not a unit id"),
    ('"speech_tokens": [1, 2.0]', "field 'speech_tokens', position 1: 2.0 is float, not a unit id"),
    ('"speech_tokens": [1, true]', "field 'speech_tokens', position 1: true is a boolean, not a unit id"),
    ('"speech_tokens": [1, -2]', "field 'speech_tokens', position 1: -2 is not a unit id"),
    ('"speech_tokens": 5', "field 'speech_tokens' must be a list of unit ids"),
    ('"reference_speech_tokens": null', "field 'reference_speech_tokens' must be a list"),
    (None, "missing field 'reference_speech_tokens'"),
    ('"task": "asr"', "field 'task' must be one of tts, continue"),
    ('"id": 7', "field 'id' must be a string"),
]


@pytest.mark.parametrize("change, message", BAD)
def test_bad_unit_records_exit_2_naming_file_and_line_and_write_nothing(tmp_path, capsys, change, message):
    bad = record("b", [1, 2], [1, 2])
    if change is None:
        del bad["reference_speech_tokens"]
    else:
        bad |= json.loads("{" + change + "}")
    path = write_jsonl(tmp_path / "generations.jsonl", [record("a", [1], [1]), bad])
    code, _, err = run(capsys, path)
    assert code == 2 and f"{path}:2: " in err and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generations.jsonl"]


@pytest.mark.parametrize("second, message", [
    ({"id": "b", "text": "x", "reference": "x"}, "mixes speech unit records"),
    (record("b", [1], [1], task="continue"), ":2: a continue record among tts records"),
    (record("a", [1], [1]), ":2: duplicate id 'a'"),
])
def test_a_file_of_unit_records_holds_one_task_and_unique_ids(tmp_path, capsys, second, message):
    path = write_jsonl(tmp_path / "generations.jsonl", [record("a", [1], [1]), second])
    code, _, err = run(capsys, path)
    assert code == 2 and message in err and not (tmp_path / "wer.json").exists()


def test_round_trip_flags_are_refused_where_they_cannot_apply(tmp_path, capsys):
    units = write_jsonl(tmp_path / "u" / "generations.jsonl", RECORDS)
    continued = write_jsonl(tmp_path / "c" / "generations.jsonl", [record("a", [1], [1], task="continue")])
    transcripts = write_jsonl(tmp_path / "t" / "generations.jsonl", [{"id": "a", "text": "x", "reference": "x"}])
    not_a_checkpoint = tmp_path / "nothing"
    not_a_checkpoint.mkdir()
    for argv, message in [
        ((units, "--backend", "torch"), "--backend chooses the round trip's engine; it needs --asr"),
        ((continued, "--asr", not_a_checkpoint), "only tts records have"),
        ((transcripts, "--asr", not_a_checkpoint), "holds transcripts"),
        ((units, "--asr", not_a_checkpoint), "not a checkpoint directory (no config.json)"),
        ((tmp_path / "t", "--asr", not_a_checkpoint), "score one generations file"),
    ]:
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err, (argv, err)
    assert not list(tmp_path.rglob("wer.json")) and not list(tmp_path.rglob("round_trip"))


def test_records_without_units_are_empty_transcripts_and_need_no_transcribing(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint"  # never run: there are no units to transcribe
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    path = write_jsonl(tmp_path / "generations.jsonl", [record("a", [], [1, 2], text="the cat sits"),
                                                        record("b", [], [3], text="a dog")])
    code, out, _ = run(capsys, path, "--asr", checkpoint, "--bootstrap", "0")
    assert code == 0 and "2 utterance(s) with no generated units" in out
    trip = json.loads((tmp_path / "wer.json").read_text())["round_trip"]
    assert trip["wer"] == 1 and trip["deletions"] == 5 and trip["n_empty_hypotheses"] == 2
    assert trip["transcripts"] is None
    assert not (tmp_path / "round_trip").exists()


def test_a_runs_table_labels_the_unit_edit_rate_and_compare_shows_it_as_such(tmp_path, capsys):
    run_dir = tmp_path / "run"
    step = run_dir / "generations" / "100" / "mini"
    write_jsonl(step / "test" / "generations.jsonl", [{"id": "a", "text": "a b", "reference": "a b c d"}])
    write_jsonl(step / "test-tts" / "generations.jsonl", RECORDS)
    # a round trip's transcripts beside a tts report are not a checkpoint's generations of their own
    write_jsonl(step / "test-tts" / "round_trip" / "generations.jsonl", [{"id": "a", "text": "x", "reference": "y"}])
    code, out, _ = run(capsys, run_dir, "--normalizer", "none", "--bootstrap", "0")
    assert code == 0
    lines = [line.split("\t") for line in (run_dir / "wer_by_step.tsv").read_text().splitlines()]
    assert lines[0][-1] == "metric"
    assert lines[1:] == [["100", "mini/test", "1", "0.5", str(4 / 7), "", "", "WER"],
                         ["100", "mini/test-tts", "3", "0.4", "", "", "", "unit edit rate"]]
    assert "unit edit rate" in out

    # --compare: the unit report's rate in the WER column, labelled by a metric column
    cells = tmp_path / "cells"
    asr_report = cells / "asr" / "wer.json"
    assert run(capsys, step / "test" / "generations.jsonl", "--normalizer", "none", "--out", asr_report)[0] == 0
    assert run(capsys, step / "test-tts" / "generations.jsonl", "--out", cells / "tts" / "wer.json")[0] == 0
    code, out, _ = run(capsys, "--compare", cells)
    assert code == 0
    csv_lines = (cells / "compare.csv").read_text().splitlines()
    assert csv_lines[0].endswith(",seconds,metric")
    assert csv_lines[2].startswith("tts,,,,0.4,") and csv_lines[2].endswith(",unit edit rate")
    assert "| tts |  |  |  | unit edit rate | 40.0 |" in out and "holds that in the WER columns" in out


# -- round-trip WER --------------------------------------------------------------------------------

N_DSUS = 64
WORDS = "the a cat dog red blue runs sits near over one two three big small bird sings and green".split()


@pytest.fixture(scope="module")
def asr(tmp_path_factory) -> dict:
    """An ASR checkpoint that memorised 8 utterances of random units (as tests/test_generate.py's
    `trained`: nothing links units to words, so only memorisation transcribes them), and their rows."""
    root = tmp_path_factory.mktemp("asr")
    rng = random.Random(1)
    base = make_tiny_model(root / "base", " ".join(rng.choice(WORDS) for _ in range(3000)), vocab_size=300,
                           hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, seed=0)
    model = extend.extend(base, N_DSUS, modality_tokens=True, out_dir=root / "extended")
    rng = random.Random(0)
    rows = [{"id": f"utt{i}", "transcript": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4))),
             "speech_tokens": [rng.randrange(N_DSUS) for _ in range(rng.randint(8, 16))]} for i in range(8)]
    data = write_jsonl(root / "train.jsonl", rows)
    steps = 120
    assert train.main([
        str(CONFIGS / "tiny_sft.json"), f"run_dir={root / 'run'}", f"model.path={model}", f"data.train={data}",
        f"data.n_dsus={N_DSUS}", "data.sft.system_prompt=Transcribe the speech.", "optim.lr=1e-2",
        "train.batch_size=8", "train.grad_accum=1", f"train.max_steps={steps}", f"train.save_steps={steps}",
        f"train.eval_steps={steps}",
    ]) == 0
    return {"checkpoint": root / "run" / "checkpoints" / f"step_{steps:07d}", "rows": rows}


def test_round_trip_wer_is_zero_for_the_memorised_units_and_worse_for_shuffled_ones(asr, tmp_path, capsys):
    records, speakers = [], {}
    for row in asr["rows"]:
        units = unit_scores.collapse_repeats(row["speech_tokens"])  # as generate.py --task tts writes them
        shuffled = list(units)
        random.Random(row["id"]).shuffle(shuffled)
        assert shuffled != units
        records += [record(row["id"], units, units, text=row["transcript"]),
                    record(f"{row['id']}-shuffled", shuffled, units, text=row["transcript"])]
        speakers |= {row["id"]: "exact", f"{row['id']}-shuffled": "shuffled"}
    records.append(record("silent", [], [1, 2, 3], text="two birds sing"))  # no units: an empty transcript
    speakers["silent"] = "silent"
    path = write_jsonl(tmp_path / "gen" / "generations.jsonl", records)
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"id": r["id"], "transcript": r["text"], "speech_tokens": [0],
                                                  "speaker": speakers[r["id"]]} for r in records])

    code, out, _ = run(capsys, path, "--asr", asr["checkpoint"], "--references", refs, "--by", "speaker")
    assert code == 0
    report = json.loads((tmp_path / "gen" / "wer.json").read_text())
    trip = report["round_trip"]
    assert trip["asr_checkpoint"] == str(asr["checkpoint"].resolve()) and trip["backend"] == "torch"
    assert trip["n_empty_hypotheses"] == 1 and trip["n_utterances"] == 17
    groups = trip["groups"]
    assert groups["exact"]["wer"] == 0  # the memorised units transcribe to the text they were "spoken" from
    assert groups["shuffled"]["wer"] > 0  # worse: the model has not heard these orders
    assert groups["silent"]["wer"] == 1 and groups["silent"]["errors"] == 3  # all deletions
    assert report["groups"]["exact"]["unit_edit_rate"] == 0 and report["groups"]["shuffled"]["unit_edit_rate"] > 0
    assert report["scored_with"]["asr"] == str(asr["checkpoint"]) and report["scored_with"]["backend"] == "torch"

    dataset = [json.loads(line) for line in (tmp_path / "gen" / "round_trip" / "units.jsonl").read_text().splitlines()]
    assert len(dataset) == 16 and dataset[0] == {"id": "utt0", "speech_tokens": records[0]["speech_tokens"],
                                                 "transcript": records[0]["text"], "speaker": "exact"}
    transcripts = [json.loads(line) for line in
                   (tmp_path / "gen" / "round_trip" / "generations.jsonl").read_text().splitlines()]
    assert [t["id"] for t in transcripts] == [d["id"] for d in dataset]
    assert "round-trip WER" in out and "1 utterance(s) with no generated units" in out
    assert "exact" in out and "shuffled" in out

    # again, without flags: scored as before, the transcripts reused (no second generate.py), the report unchanged
    before = (tmp_path / "gen" / "round_trip" / "generations.jsonl").stat().st_mtime_ns
    code, out, err = run(capsys, path)
    assert code == 0 and "is unchanged" in out and "reusing the transcripts" in err
    assert (tmp_path / "gen" / "round_trip" / "generations.jsonl").stat().st_mtime_ns == before

    # other units in the same place are transcribed again only with --overwrite
    other = write_jsonl(tmp_path / "gen" / "other.jsonl", records[:2])
    code, _, err = run(capsys, other, "--asr", asr["checkpoint"], "--out", tmp_path / "gen" / "other.json")
    assert code == 2 and "pass --overwrite to transcribe again" in err
    assert not (tmp_path / "gen" / "other.json").exists()

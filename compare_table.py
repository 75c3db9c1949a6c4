"""The table of cells side by side: `python wer.py --compare WER_JSON_OR_DIR [...] [--out DIR] [--overwrite]`.

Each PATH is a `wer.json` or a directory searched recursively for them (in path order). Each report
is one row, named and described by the `cell.json` beside it when the matrix driver wrote one
(`cell`, `seed`, `units`, `regime`, `options`, `speech_tokens_per_utterance`, `training_tokens`,
`unseen_speakers`, `seconds.total`; every field optional), else by its directory relative to PATH.

Columns: WER and its bootstrap interval, WER on seen and on unseen voices (errors over reference
words pooled over the speakers of `unseen_speakers` and over the rest, from a report scored `--by
speaker`), CER, speech tokens per utterance, training tokens and wall-clock. Options show when not
default (deduplication on, no speech BPE): "no dedup", "bpe 512"; "-" when all are default. A speech
task's report is a row whose WER columns hold its unit edit rate (no CER); the tables then get a
`metric` column naming each row's. Cells of the same name are told apart by their seeds, else by
their reports' directories.

Seeds: a cell trained with several seeds (cell.json's `seed`, as matrix.py writes it) has a row per
seed, named `CELL (seed S)`, and below the table its mean WER, standard deviation and range over
seeds beside its bootstrap interval's half-width. A difference between two such cells is called only
where every seed of one beats every seed of the other.

Outputs: `compare.md` (percent), `compare.csv` (fractions and seconds, empty where unknown) and
`compare.png` (WER bars by cell, colored by regime), into `--out DIR` (default: the deepest directory
holding every PATH), all three or none, never over existing ones without `--overwrite`. Refused:
reports scored with different normalisers (their WERs are not comparable), and a report or
cell.json whose figures are not finite numbers >= 0 (counts: integers, never booleans) or whose
interval is not {low <= high, confidence in (0, 1)}.
"""

import csv
import io
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

import unit_scores
from report_io import NORMALIZERS, InputError, check_output, check_overwrite, read_json_object, write_into

PHRASED_OPTIONS = ("deduplicate", "dsu_bpe")  # the cell options format_options words; others show as key=value
COMPARE_OUTPUTS = ("compare.md", "compare.csv", "compare.png")
CSV_COLUMNS = ["cell", "units", "regime", "options", "wer", "wer_low", "wer_high", "wer_seen", "wer_unseen", "cer",
               "speech_tokens_per_utterance", "training_tokens", "seconds"]


def find_reports(paths: list[Path]) -> list[tuple[Path, str]]:
    """(wer.json, fallback cell name) for each PATH: a file, or every wer.json under a directory in
    path order, named by its directory relative to PATH. A report reached twice is listed once."""
    found, seen = [], set()
    for path in paths:
        if not path.exists():
            raise InputError(f"{path}: no such file or directory")
        if path.is_dir():
            reports = sorted(path.rglob("wer.json"))
            if not reports:
                raise InputError(f"{path}: no wer.json under this directory")
            named = [(report, report.parent.relative_to(path).as_posix()) for report in reports]
        else:
            named = [(path, path.absolute().parent.name)]
        for report, name in named:
            if report.resolve() not in seen:
                seen.add(report.resolve())
                # a wer.json directly in PATH is named after PATH itself
                found.append((report, path.resolve().name if name == "." else name))
    return found




def shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def number(value, path: Path, key: str) -> float | None:
    """`value` if a finite number >= 0 (every figure a report or cell.json holds), None if absent;
    anything else, a boolean or NaN included, is bad input: it would be drawn and tabled."""
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
            or isinstance(value, float) and not math.isfinite(value)):  # NaN is not < 0
        raise InputError(f"{path}: '{key}' must be a finite number >= 0, got {shown(value)}")
    return value


def count(value, path: Path, key: str) -> int | None:
    """`value` if an integer >= 0 (a boolean is not one), None if absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"{path}: '{key}' must be an integer >= 0, got {shown(value)}")
    return value


def text(value, path: Path, key: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InputError(f"{path}: '{key}' must be a string, got {shown(value)}")
    return value


def wer_interval(report: dict, path: Path, name: str = "wer_interval") -> dict:
    """The report's WER interval {low, high, confidence} (or another, `name`d, as the unit edit rate's);
    {} when it was scored without one (null)."""
    interval = report.get(name)
    if interval is None:
        return {}
    if not isinstance(interval, dict):
        raise InputError(f"{path}: '{name}' must be an object or null, got {shown(interval)}")
    low, high = (number(interval.get(key), path, f"{name}.{key}") for key in ("low", "high"))
    if low is None or high is None or low > high:
        raise InputError(f"{path}: '{name}' needs numbers low <= high, as wer.py writes it, got {shown(interval)}")
    confidence = interval.get("confidence")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise InputError(f"{path}: '{name}.confidence' must be a number between 0 and 1 (0.95 for 95%), "
                         f"got {shown(confidence)}")
    return {"low": low, "high": high, "confidence": confidence}


def speaker_counts(groups, path: Path, length: str = "n_ref_words") -> dict[str, tuple[int, int]]:
    """{speaker: (errors, reference words)} of a report scored `--by speaker` (reference units:
    `length` n_ref_units). A speaker whose references are all empty has no words, and no error
    count (null) in wer.json."""
    if not isinstance(groups, dict):
        raise InputError(f"{path}: 'groups' is not {{speaker: {{errors, {length}, ...}}}} as wer.py --by "
                         f"writes it, got {shown(groups)}")
    counts = {}
    for speaker, group in groups.items():
        if not isinstance(group, dict):
            raise InputError(f"{path}: 'groups.{speaker}' must be an object, got {shown(group)}")
        words = count(group.get(length), path, f"groups.{speaker}.{length}")
        errors = count(group.get("errors"), path, f"groups.{speaker}.errors")
        if words is None or (words and errors is None):
            raise InputError(f"{path}: 'groups.{speaker}' needs {length} and, when it is not 0, errors")
        counts[speaker] = (errors if words else 0, words)  # no words: nothing to pool
    return counts


def pooled_wer(counts: list[tuple[int, int]]) -> float | None:
    """Total errors over total reference words of some speakers (None without any word)."""
    words = sum(w for _, w in counts)
    return sum(e for e, _ in counts) / words if words else None


def seen_unseen_wer(report: dict, unseen, report_path: Path, cell_path: Path,
                    length: str = "n_ref_words") -> tuple[float | None, float | None]:
    """WER (or unit edit rate: `length` n_ref_units) on the speakers not in `unseen` and on those
    in it, from a report scored `--by speaker`."""
    if unseen is not None and (not isinstance(unseen, list) or not all(isinstance(s, str) for s in unseen)):
        raise InputError(f"{cell_path}: 'unseen_speakers' must be a list of speaker names, got {shown(unseen)}")
    if unseen is None or report.get("by") != "speaker":
        return None, None
    counts = speaker_counts(report.get("groups"), report_path, length)
    return (pooled_wer([c for speaker, c in counts.items() if speaker not in unseen]),
            pooled_wer([c for speaker, c in counts.items() if speaker in unseen]))


def format_options(options, cell_path: Path) -> str:
    """The non-default options as a short phrase ("no dedup, bpe 512"), "-" when all are default,
    "" when unknown."""
    if options is None:
        return ""
    if not isinstance(options, dict):
        raise InputError(f"{cell_path}: 'options' must be an object, got {shown(options)}")
    if not isinstance(options.get("deduplicate", True), bool):
        raise InputError(f"{cell_path}: 'options.deduplicate' must be true or false, got {shown(options['deduplicate'])}")
    bpe = count(options.get("dsu_bpe"), cell_path, "options.dsu_bpe")
    parts = (["no dedup"] if options.get("deduplicate") is False else []) + ([f"bpe {bpe}"] if bpe else [])
    parts += [f"{key}={value}" for key, value in options.items() if key not in PHRASED_OPTIONS]
    return ", ".join(parts) or "-"


def compare_row(report_path: Path, fallback_name: str) -> dict:
    """One table row from a wer.json and the cell.json beside it (every cell.json field optional)."""
    report = read_json_object(report_path)
    # a speech task's report (metric unit_edit_rate) is a row too: its rate in the WER column, labelled
    units = report.get("metric") == unit_scores.METRIC
    if report.get("metric") not in (None, "wer", unit_scores.METRIC):
        raise InputError(f"{report_path}: 'metric' must be wer or {unit_scores.METRIC}, got "
                         f"{shown(report['metric'])}")
    rate, length = ("unit_edit_rate", "n_ref_units") if units else ("wer", "n_ref_words")
    if report.get(rate) is None:
        raise InputError(f"{report_path}: no '{rate}' field; not a report written by wer.py")
    wer = number(report[rate], report_path, rate)
    if not units and report.get("normalizer") not in NORMALIZERS:
        raise InputError(f"{report_path}: 'normalizer' must be {' or '.join(NORMALIZERS)}, got "
                         f"{shown(report.get('normalizer'))}")
    cell_path = report_path.with_name("cell.json")
    cell = read_json_object(cell_path) if os.path.lexists(cell_path) else {}
    interval = wer_interval(report, report_path, f"{rate}_interval")
    seconds = {} if cell.get("seconds") is None else cell["seconds"]
    if not isinstance(seconds, dict):
        raise InputError(f"{cell_path}: 'seconds' must be an object of seconds per stage, got {shown(seconds)}")
    seen, unseen = seen_unseen_wer(report, cell.get("unseen_speakers"), report_path, cell_path, length)
    return {
        "cell": text(cell.get("cell"), cell_path, "cell") or fallback_name,
        "units": text(cell.get("units"), cell_path, "units") or "",
        "regime": text(cell.get("regime"), cell_path, "regime") or "",
        "options": format_options(cell.get("options"), cell_path),
        "wer": wer,
        "wer_low": interval.get("low"), "wer_high": interval.get("high"),
        "wer_seen": seen, "wer_unseen": unseen,
        "cer": None if units else number(report.get("cer"), report_path, "cer"),
        "speech_tokens_per_utterance": number(cell.get("speech_tokens_per_utterance"), cell_path,
                                              "speech_tokens_per_utterance"),
        "training_tokens": count(cell.get("training_tokens"), cell_path, "training_tokens"),
        "seconds": number(seconds.get("total"), cell_path, "seconds.total"),
        "seed": count(cell.get("seed"), cell_path, "seed"),
        # not columns: what the header line and the normaliser check need
        "normalizer": None if units else report["normalizer"], "confidence": interval.get("confidence"),
        "source": report_path, "metric": unit_scores.LABEL if units else "WER",
    }


def compare_rows(paths: list[Path]) -> list[dict]:
    """Every report's row; reports scored with different normalisers are refused (their WERs differ
    in kind). Cells of the same name are told apart by their seeds when each has its own (the row's
    `seeds_of` then names the cell), else by where their reports are."""
    rows = [compare_row(path, name) for path, name in find_reports(paths)]
    scored = [row for row in rows if row["normalizer"] is not None]  # unit edit rates have none
    for row in scored[1:]:
        if row["normalizer"] != scored[0]["normalizer"]:
            raise InputError(f"{scored[0]['source']} was scored with the {scored[0]['normalizer']} normaliser but "
                             f"{row['source']} with {row['normalizer']}: their WERs are not comparable")
    named = Counter(row["cell"] for row in rows)
    seeds = {name: {row["seed"] for row in rows if row["cell"] == name} for name in named}
    for row in rows:
        if named[row["cell"]] > 1 and None not in seeds[row["cell"]] and len(seeds[row["cell"]]) == named[row["cell"]]:
            row["seeds_of"] = row["cell"]  # one training of a cell trained with several seeds
            row["cell"] += f" (seed {row['seed']})"
        elif named[row["cell"]] > 1:
            source = row["source"]
            row["cell"] += f" ({source.parent if source.name == 'wer.json' else source})"
    return rows


def seed_groups(rows: list[dict]) -> list[dict]:
    """The cells trained with several seeds (WER rows whose cell.json names the cell and a seed), in
    table order: {cell, seeds, mean, sd (sample), low, high (the lowest and highest seed's WER),
    half_width (the mean half-width of the seeds' bootstrap intervals, or None)}."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("seeds_of") is not None and row["metric"] == "WER":
            groups.setdefault(row["seeds_of"], []).append(row)
    out = []
    for cell, members in groups.items():
        wers = [row["wer"] for row in members]
        widths = [(row["wer_high"] - row["wer_low"]) / 2 for row in members if row["wer_low"] is not None]
        out.append({"cell": cell, "seeds": [row["seed"] for row in members],
                    "mean": float(np.mean(wers)), "sd": float(np.std(wers, ddof=1)), "low": min(wers), "high": max(wers),
                    "half_width": float(np.mean(widths)) if len(widths) == len(members) else None})
    return out


def differences_across_seeds(groups: list[dict]) -> list[tuple[dict, dict]]:
    """(better, worse) pairs of cells where every seed of one has a lower WER than every seed of the
    other: the only differences the table calls, however far apart the bootstrap intervals are."""
    return [(a, b) for a in groups for b in groups if a is not b and a["high"] < b["low"]]


def format_seed_summary(groups: list[dict]) -> str:
    """The across-seeds table and the differences that hold across seeds, in markdown."""
    def pct(value):
        return f"{100 * value:.1f}"

    lines = ["", "Across training seeds (each cell's rows above): the mean WER, the sample standard deviation and "
             "the range over seeds, beside the mean half-width of one seed's bootstrap interval.", "",
             "| cell | seeds | mean WER % | sd | lowest-highest % | bootstrap ± |", "|---|---:|---:|---:|---|---:|"]
    for g in groups:
        width = "" if g["half_width"] is None else pct(g["half_width"])
        lines.append(f"| {g['cell']} | {len(g['seeds'])} | {pct(g['mean'])} | {pct(g['sd'])} | "
                     f"{pct(g['low'])}-{pct(g['high'])} | {width} |")
    called = differences_across_seeds(groups)
    lines += ["", "Differences that hold across seeds (every seed of the first below every seed of the second):"]
    lines += [f"- {a['cell']} < {b['cell']} ({pct(a['high'])}% at worst against {pct(b['low'])}% at best)"
              for a, b in called] or ["- none: every pair's seed ranges overlap"]
    return "\n".join(lines) + "\n"


def labelled(rows: list[dict]) -> bool:
    """Whether some row is not a WER (a unit edit rate): then the tables get a `metric` column."""
    return any(row["metric"] != "WER" for row in rows)


def format_compare_csv(rows: list[dict]) -> str:
    """Fractions and plain numbers at full precision, empty where unknown."""
    columns = CSV_COLUMNS + (["metric"] if labelled(rows) else []) + (
        ["seed"] if any(row["seed"] is not None for row in rows) else [])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(["" if row[column] is None else row[column] for column in columns] for row in rows)
    return buffer.getvalue()


def confidence_label(rows: list[dict]) -> str:
    levels = sorted({row["confidence"] for row in rows if row["confidence"] is not None})
    return "/".join(f"{level:.0%}" for level in levels)


def format_compare_markdown(rows: list[dict]) -> str:
    """A header line, then the table: rates in percent, the interval as [low, high], tokens with separators."""
    def pct(value):
        return "" if value is None else f"{100 * value:.1f}"

    def interval(row):
        return "" if row["wer_low"] is None else f"[{pct(row['wer_low'])}, {pct(row['wer_high'])}]"

    def optional(value, spec):
        return "" if value is None else format(value, spec)

    confidence = confidence_label(rows)
    normalizer = next((row["normalizer"] for row in rows if row["normalizer"] is not None), None)
    header = (("WER and CER (%)" + (f" after the {normalizer} normaliser" if normalizer else ""))
              + ("; a row whose metric is 'unit edit rate' holds that in the WER columns (generated speech units "
                 "against the reference units, both deduplicated), and no CER" if labelled(rows) else "")
              + "; WER interval: "
              + (f"{confidence} bootstrap over utterances" if confidence else "none (scored with --bootstrap 0)")
              + "; seen/unseen: WER on the voices trained on and on those held out (cell.json's unseen_speakers).")
    columns = [("cell", "---"), ("units", "---"), ("regime", "---"), ("options", "---"),
               *([("metric", "---")] if labelled(rows) else []), ("WER %", "---:"),
               (f"{confidence or 'no'} interval", "---"), ("seen %", "---:"), ("unseen %", "---:"), ("CER %", "---:"),
               ("speech tokens/utt", "---:"), ("training tokens", "---:"), ("wall-clock min", "---:")]
    lines = [header, "", "| " + " | ".join(name for name, _ in columns) + " |",
             "|" + "|".join(align for _, align in columns) + "|"]
    for row in rows:
        minutes = None if row["seconds"] is None else row["seconds"] / 60
        cells = [row["cell"], row["units"], row["regime"], row["options"],
                 *([row["metric"]] if labelled(rows) else []), pct(row["wer"]), interval(row),
                 pct(row["wer_seen"]), pct(row["wer_unseen"]), pct(row["cer"]),
                 optional(row["speech_tokens_per_utterance"], ".1f"), optional(row["training_tokens"], ",.0f"),
                 optional(minutes, ".1f")]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    groups = seed_groups(rows)
    return "\n".join(lines) + "\n" + (format_seed_summary(groups) if groups else "")


def plot_compare(rows: list[dict]) -> bytes:
    """Horizontal WER bars, one per cell in table order, colored by regime, the bootstrap interval
    as error bars and seen/unseen WER as markers on the cell's row, as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    def regime(row):
        return row["regime"] or "(no regime)"

    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.45 * len(rows)))
    for i, name in enumerate(dict.fromkeys(regime(row) for row in rows)):
        ys = [y for y, row in enumerate(rows) if regime(row) == name]
        ax.barh(ys, [100 * rows[y]["wer"] for y in ys], color=f"C{i % 10}", label=name)
    bounded = [(y, row) for y, row in enumerate(rows) if row["wer_low"] is not None]
    if bounded:
        ax.errorbar([100 * row["wer"] for _, row in bounded], [y for y, _ in bounded], fmt="none", color="black",
                    # a percentile interval may miss its estimate: no bar then, rather than a negative one
                    capsize=3, xerr=[[100 * max(0, row["wer"] - row["wer_low"]) for _, row in bounded],
                                     [100 * max(0, row["wer_high"] - row["wer"]) for _, row in bounded]])
    for key, marker, label in (("wer_seen", "o", "seen voices"), ("wer_unseen", "x", "unseen voices")):
        marked = [(100 * row[key], y) for y, row in enumerate(rows) if row[key] is not None]
        if marked:
            ax.scatter(*zip(*marked), marker=marker, color="black", zorder=3, label=label)
    ax.set_yticks(range(len(rows)), [row["cell"] + ("" if row["metric"] == "WER" else f" ({row['metric']})")
                                     for row in rows])
    ax.invert_yaxis()  # first cell on top, as in the table
    confidence = confidence_label(rows)
    normalizer = next((row["normalizer"] for row in rows if row["normalizer"] is not None), None)
    metric = "WER or unit edit rate" if labelled(rows) else "WER"
    ax.set(xlabel=f"{metric} (%)" + (f", {confidence} bootstrap interval" if confidence else ""),
           title=f"{metric} by cell" + (f" ({normalizer} normaliser)" if normalizer else ""))
    ax.set_xlim(left=0)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: bars fill the axes
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return png.getvalue()


def compare_out_dir(paths: list[Path]) -> Path:
    """Where --compare writes by default: the deepest directory holding every report it was given
    (a directory given stands for itself, a wer.json for its folder)."""
    folders = [(path if path.is_dir() else path.parent).absolute() for path in paths]
    common = Path(os.path.commonpath(folders))
    if common == Path(common.anchor):
        raise InputError("the reports share no directory but the file system's root: pass --out")
    return common


def main(paths: list[Path], out: Path | None, overwrite: bool) -> int:
    """wer.py --compare: the table (markdown, CSV) and the chart, or exit status 2 and nothing written."""
    try:
        rows = compare_rows(paths)
        out_dir = out or compare_out_dir(paths)
        check_output(out_dir, directory=True)
        outputs = [out_dir / name for name in COMPARE_OUTPUTS]
        check_overwrite(outputs, overwrite)
        markdown = format_compare_markdown(rows)
        contents = (markdown.encode(), format_compare_csv(rows).encode(), plot_compare(rows))
        write_into(out_dir, dict(zip(outputs, contents)))
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown)
    print(f"wrote {', '.join(map(str, outputs[:-1]))} and {outputs[-1]}")
    return 0

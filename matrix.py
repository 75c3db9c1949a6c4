"""The methods matrix: which speech units and which training regime integrate speech best, by test WER.

    python matrix.py configs/matrix.json [--grid default|small|tiny] [--out DIR] [--cache DIR] [--list]
    make matrix [MATRIX=small|tiny] [MATRIX_DIR=DIR] [MATRIX_CACHE=DIR]

A grid (configs/matrix.json) names unit variants, regimes, option cells and a training budget in
optimizer steps per cell. Every key of the file is declared below (FILE, GRID, UNIT, ...) with its
type and rule; an unknown key, a wrong type or a name that is not a plain directory name (the
names of units, regimes and grids become directories) is refused, naming the file and the key,
before anything runs. Each cell is the chain a user would type by hand, run as subprocesses
whose commands are printed:

    units   the bundled data/mini, or a variant of it: the corpus re-synthesised once with its audio
            kept (python -m speech_units.corpus build --save-wav: the same sentences, voices, splits and
            ids), then python -m speech_units learn-kmeans and encode with the variant's features,
            K and frame rate; the one encoding path of this project. Both are cached (--cache) and
            shared by every grid and output directory
    model   tiny_model.py once, then extend.py by the variant's K (with a speech BPE if the cell asks)
    cpt     train.py on the CPT config for the regime's share of the steps (regimes with CPT)
    sft     train.py on the SFT config for the rest, from the CPT run's last checkpoint
    test    generate.py on the test split, then wer.py --by speaker into CELL/wer.json

With `seeds: N`, every cell trains N times, seed s = 1..N-1 in CELL+seedS beside seed 0's CELL
(train.py seed=s, extend.py --seed s); the comparison shows each cell's mean and spread over them.

CELL/cell.json records the cell's settings and seed, the speech tokens per test utterance as the model
reads them, the training tokens and the wall-clock of each stage. Finished stages are skipped, so
an interrupted matrix resumes where it stopped (an interrupted training run from its last
checkpoint; a stage's seconds are those of the attempt that finished it). A cell started with
other settings is refused, never mixed. At the end, wer.py --compare writes compare.md,
compare.csv and compare.png into the output directory.

Why a driver rather than Makefile rules: a cell's stages depend on its settings (K, frame rate,
steps, options), resuming needs a check per stage, and the grid is data that researchers extend.
It sits at the root beside the stage scripts, and runs them and the speech_units tools whose outputs
it arranges as commands, never importing a stage.
"""

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from config import COMMENT, REQUIRED, Key, at_least, choice, nonempty, positive
from data import dataset
from data.samples import CPT_SEQUENCE_TYPES, deduplicate_runs
from data.tokenizer import MAX_DSUS, Tokenizer
import files
import model_dir
from files import NotRegularFile, directory_problem, regular_file
from speech_units import shards

ROOT = Path(__file__).resolve().parent
BUNDLED = ROOT / "data" / "mini"
SPLIT_PREFIXES = {"train": "train", "dev": "validation", "test": "test"}  # speech_units shard names


class MatrixError(ValueError):
    """A bad grid or a failed stage; the message names the file, key or command."""


# ---------------------------------------------------------------------------------------------
# The grid file's schema, in config.py's style: every key with its type, rule and meaning, declared
# once and checked before anything runs, so that a typo is refused instead of silently ignored.


@dataclass(frozen=True)
class Section:
    """An object of the declared `keys`."""
    keys: dict
    help: str
    default: object = REQUIRED


@dataclass(frozen=True)
class Named:
    """An object of entries the user names, each an object of `keys` (those in `optional` may be
    given elsewhere). The names become directory names, so each must be a plain name."""
    keys: dict
    help: str
    default: object = REQUIRED
    optional: tuple = ()


@dataclass(frozen=True)
class Each:
    """A list of objects of `keys`."""
    keys: dict
    help: str
    default: object = None


def strings(value: list) -> bool:
    return all(isinstance(item, str) for item in value)


def overrides(value: list) -> bool:
    return all(isinstance(item, str) and item.partition("=")[0] and "=" in item for item in value)


UNIT = {
    "bundled": Key(False, bool, "data/mini's own units (MFCC, K=128, 50 Hz); then no encoder, k or stack"),
    "encoder": choice(None, "the features k-means clusters (python -m speech_units --encoder)", "mfcc", "logmel"),
    "k": Key(None, int, "the codebook size: DSUs in the vocabulary", f"an integer in 1..{MAX_DSUS}",
             lambda v: 1 <= v <= MAX_DSUS),
    "stack": positive(int, 1, "frames joined per unit: 50/stack units per second"),
}
REGIME = {  # {} is SFT alone
    "cpt": choice(None, "CPT's sequence type, before SFT", *CPT_SEQUENCE_TYPES),
    "cpt_share": Key(None, float, "the share of the steps spent on CPT", "a number between 0 and 1",
                     lambda v: 0 < v < 1),
    "sft_overrides": Key([], list, "train.py overrides of the SFT stage, e.g. [\"data.sft.tasks.tts=1\"] for a "
                         "multi-task SFT", "a list of key=value strings", overrides),
}
OPTION_DEFAULTS = {"deduplicate": True, "dsu_bpe": 0}
OPTIONS = {
    "deduplicate": Key(OPTION_DEFAULTS["deduplicate"], bool, "collapse runs of a repeated DSU (data.deduplicate)"),
    "dsu_bpe": at_least(int, 0, OPTION_DEFAULTS["dsu_bpe"], "merged-unit tokens of a speech BPE (extend.py --dsu-bpe)"),
}
EXTRA = {
    "units": nonempty(REQUIRED, "a name declared under the top-level 'units'"),
    "regime": nonempty(REQUIRED, "a name declared under the top-level 'regimes'"),
    "options": Section(OPTIONS, "the cell's options; those not given are the defaults", default=None),
}
CORPUS = {
    "n_train": at_least(int, 1, REQUIRED, "training utterances (python -m speech_units.corpus build --n-train)"),
    "n_dev": at_least(int, 0, REQUIRED, "dev utterances"),
    "n_test": at_least(int, 1, REQUIRED, "test utterances, those scored"),
    "seed": at_least(int, 0, REQUIRED, "the seed of the corpus's sentences and voices, and of k-means"),
}
CONFIGS = {
    "cpt": nonempty(REQUIRED, "train.py's config of the CPT stage, relative to the project root"),
    "sft": nonempty(REQUIRED, "train.py's config of the SFT stage, relative to the project root"),
}
SETTINGS = {  # at the top of the file for every grid, or in a grid for itself alone
    "steps": at_least(int, 2, REQUIRED, "optimizer steps per cell, CPT and SFT together"),
    "save_steps": positive(int, None, "a checkpoint every this many steps (default: only the last)"),
    "corpus": Section(CORPUS, "the corpus every cell trains and is tested on"),
    "configs": Section(CONFIGS, "the stages' train.py configs"),
    "base_model": Key(REQUIRED, list, "tiny_model.py's arguments for the base model", "a list of strings", strings),
    "generate": Key([], list, "generate.py's further arguments", "a list of strings", strings),
    "train_overrides": Key([], list, "train.py overrides of every stage", "a list of key=value strings", overrides),
    "seeds": positive(int, 1, "trainings of every cell, each with its own seed s = 0..N-1: s = 0 is train.py's and "
                      "extend.py's default seed, s > 0 gives train.py seed=s (data order, SFT task draws) and "
                      "extend.py --seed s (the new embedding rows)"),
}
GRID = {
    **SETTINGS,
    "units": Key(REQUIRED, list, "the unit variants crossed with the regimes", "a list of names declared under 'units'",
                 strings),
    "regimes": Key(REQUIRED, list, "the regimes crossed with the unit variants",
                   "a list of names declared under 'regimes'", strings),
    "extra": Each(EXTRA, "cells beyond the cross, each {units, regime, options}"),
}
FILE = {
    **SETTINGS,
    "units": Named(UNIT, "the unit variants, by name"),
    "regimes": Named(REGIME, "the training regimes, by name"),
    "grids": Named(GRID, "the grids, by name (--grid NAME)", optional=tuple(SETTINGS)),  # shared at the top
}


def shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_object(value, keys: dict, source: str, dotted: str, optional=()) -> None:
    """`value` against `keys`: an object with no other key ("//" is a comment), each value of its
    declared type and rule, every required key given (but those in `optional`)."""
    if not isinstance(value, dict):
        raise MatrixError(f"{source}: '{dotted}' must be an object of {', '.join(keys)}, got {shown(value)}")
    for name, item in value.items():
        if name == COMMENT:
            continue
        where = f"{dotted}.{name}" if dotted else name
        if name not in keys:
            raise MatrixError(f"{source}: unknown key '{where}' (the keys {'of ' + repr(dotted) if dotted else 'here'}: "
                              f"{', '.join(keys)})")
        check_value(item, keys[name], source, where)
    for name, node in keys.items():
        if node.default is REQUIRED and value.get(name) is None and name not in optional:
            raise MatrixError(f"{source}: '{f'{dotted}.{name}' if dotted else name}' must be given: {node.help}")


def check_value(value, node, source: str, dotted: str) -> None:
    if isinstance(node, Key):
        try:
            problem = node.problem(value)
        except OverflowError:  # an integer too large for the float rule's finiteness check
            problem = f"must be {node.rule}"
        if problem is not None:
            raise MatrixError(f"{source}: '{dotted}' {problem}, got {shown(value)}")
    elif isinstance(node, Section):
        check_object(value, node.keys, source, dotted)
    elif isinstance(node, Each):
        if not isinstance(value, list):
            raise MatrixError(f"{source}: '{dotted}' must be a list of objects ({node.help}), got {shown(value)}")
        for i, item in enumerate(value):
            check_object(item, node.keys, source, f"{dotted}[{i}]")
    else:
        if not isinstance(value, dict):
            raise MatrixError(f"{source}: '{dotted}' must be an object of {node.help}, got {shown(value)}")
        for name, item in value.items():
            if name != COMMENT:
                check_plain_name(name, source, dotted)
                check_object(item, node.keys, source, f"{dotted}.{name}", node.optional)


def check_plain_name(name: str, source: str, dotted: str) -> None:
    """A name that becomes a directory stays inside its parent: one path component."""
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise MatrixError(f"{source}: the name {name!r} in '{dotted}' is not a plain name: it becomes a directory, "
                          "so it must not be empty, '.' or '..', nor hold '/' or '\\'")


def without_comments(entries: dict) -> dict:
    return {name: value for name, value in entries.items() if name != COMMENT}


def read_grid_file(path: Path) -> dict:
    """The grid file as JSON, refused unless a regular UTF-8 file of a JSON object without a
    repeated key (the later one would silently win)."""
    def unique(pairs):
        keys = [key for key, _ in pairs]
        repeated = next((key for key in keys if keys.count(key) > 1), None)
        if repeated is not None:
            raise MatrixError(f"{path}: the key {repeated!r} is given twice in one object")
        return dict(pairs)

    try:
        spec = json.loads(regular_file(path).read_bytes().decode("utf-8"), object_pairs_hook=unique)
    except NotRegularFile as error:
        raise MatrixError(f"{error} (the grid file)") from None
    except OSError as error:
        raise MatrixError(f"{path}: cannot read the grid file ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise MatrixError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise MatrixError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    except RecursionError:
        raise MatrixError(f"{path}: nested too deeply to be a grid file") from None
    if not isinstance(spec, dict):
        raise MatrixError(f"{path}: a grid file is a JSON object, got {type(spec).__name__}")
    return spec


def check_declarations(units: dict, regimes: dict, source: str) -> None:
    """What no single key's rule says: a unit variant is bundled or encoded, a regime is SFT alone
    or CPT with its share (without the share it would silently train SFT alone)."""
    for name, unit in units.items():
        encoded = {key for key in ("encoder", "k", "stack") if unit.get(key) is not None}
        if encoded if unit.get("bundled") else not {"encoder", "k"} <= encoded:
            raise MatrixError(f"{source}: 'units.{name}' {shown(unit)}: give bundled: true alone, or an encoder "
                              "and k (and stack)")
    for name, regime in regimes.items():
        if (regime.get("cpt") is None) != (regime.get("cpt_share") is None):
            raise MatrixError(f"{source}: 'regimes.{name}' {shown(regime)}: SFT alone is {{}}; CPT then SFT needs "
                              "both cpt and cpt_share")


def load_grid(path: Path, name: str) -> dict:
    """The named grid with the shared settings it does not override, and its cells; the whole file
    is checked against the schema first."""
    spec, source = read_grid_file(path), str(path)
    check_object(spec, FILE, source, "", optional=SETTINGS)
    units, regimes, grids = (without_comments(spec[key]) for key in ("units", "regimes", "grids"))
    check_declarations(units, regimes, source)
    if name not in grids:
        raise MatrixError(f"{path}: no grid {name!r}; the grids are {', '.join(grids)}")
    own, where = grids[name], f"{path}: grid {name!r}"
    grid = {key: own[key] if own.get(key) is not None else spec.get(key) for key in SETTINGS}  # the grid's own first
    for key, node in SETTINGS.items():
        if grid[key] is None and node.default is REQUIRED:
            raise MatrixError(f"{where} has no {key!r}, in the grid or at the top of the file ({node.help})")
        if grid[key] is None:
            grid[key] = json.loads(json.dumps(node.default))  # a copy
    grid.update(name=name, units=own["units"], regimes=own["regimes"], extra=own.get("extra") or [])
    grid["cells"] = grid_cells(grid, units, regimes, where)
    check_grid(grid, where)
    return grid


def grid_cells(grid: dict, units: dict, regimes: dict, where: str) -> list[dict]:
    """The grid's cells in order: units x regimes, then the extra cells; each declared, none twice."""
    listed = [(u, r, {}) for u in grid["units"] for r in grid["regimes"]]
    listed += [(e["units"], e["regime"], without_comments(e.get("options") or {})) for e in grid["extra"]]
    cells, names = [], set()
    for unit_name, regime_name, options in listed:
        if unit_name not in units:
            raise MatrixError(f"{where}: unknown units {unit_name!r}; declared: {', '.join(units)}")
        if regime_name not in regimes:
            raise MatrixError(f"{where}: unknown regime {regime_name!r}; declared: {', '.join(regimes)}")
        cell = {"units": unit_name, "unit_spec": units[unit_name], "regime": regime_name,
                "regime_spec": regimes[regime_name], "options": {**OPTION_DEFAULTS, **options}, "seed": 0}
        if cell_name(cell) in names:  # one directory, two settings
            raise MatrixError(f"{where}: the cell {cell_name(cell)} is listed twice")
        names.add(cell_name(cell))
        cells += [{**cell, "seed": seed} for seed in range(grid["seeds"])]
    if not cells:
        raise MatrixError(f"{where} has no cells: give it units and regimes, or extra cells")
    return cells


def check_grid(grid: dict, where: str) -> None:
    """What depends on the grid as a whole, before anything runs: a bad one would otherwise fail a
    cell an hour in, or train on other utterances than the test references'."""
    for cell in grid["cells"]:
        if cell["unit_spec"].get("bundled") and not bundled_matches(grid["corpus"]):
            raise MatrixError(f"{where}: units {cell['units']!r} are the bundled corpus's, but the grid's corpus "
                              f"settings {grid['corpus']} are not data/mini's: its variants would come from other "
                              "utterances")
        share = cell["regime_spec"].get("cpt_share")
        if share is not None and not 0 < round(grid["steps"] * share) < grid["steps"]:
            raise MatrixError(f"{where}: regime {cell['regime']!r}: a cpt_share of {share} of {grid['steps']} steps "
                              "leaves CPT or SFT no step")
    uses_cpt = any(cell["regime_spec"].get("cpt") for cell in grid["cells"])
    for stage in ("cpt", "sft") if uses_cpt else ("sft",):
        try:
            regular_file(ROOT / grid["configs"][stage])
        except ValueError as error:  # NotRegularFile, or a NUL in the name
            raise MatrixError(f"{where}: configs.{stage}: {error}") from None


def cell_name(cell: dict) -> str:
    """The cell's settings as a name (and its directory under cells/), without its seed."""
    tags = (["no-dedup"] if not cell["options"]["deduplicate"] else []) + (
        [f"bpe{cell['options']['dsu_bpe']}"] if cell["options"]["dsu_bpe"] else [])
    return f"{cell['units']}/{cell['regime']}" + "".join(f"+{t}" for t in tags)


def cell_dir_name(cell: dict) -> str:
    """The training's directory under cells/: the cell's name, then +seedS for seeds other than 0
    (seed 0's directory is what a single-seed grid writes, so adding seeds reuses it)."""
    return cell_name(cell) + (f"+seed{cell['seed']}" if cell["seed"] else "")


# ---------------------------------------------------------------------------------------------
# Running stages


def run(command: list, what: str) -> float:
    """Run one stage's command from the project root, printed first; its seconds."""
    command = [str(c) for c in command]
    print("$ " + shlex.join(command), flush=True)
    started = time.time()
    code = subprocess.run(command, cwd=ROOT).returncode
    if code != 0:
        raise MatrixError(f"{what} failed (exit {code}): {shlex.join(command)}")
    seconds = time.time() - started
    print(f"   {what}: {seconds:.0f} s", flush=True)
    return seconds


def python(*args) -> list:
    return [sys.executable, *args]


def read_json(path: Path) -> dict:
    """A JSON object that this driver or a stage wrote: a damaged one is named, not a traceback."""
    try:
        return files.read_json(path)
    except files.JsonFileError as error:
        raise MatrixError(f"{error}; remove it to redo what wrote it") from None


def bundled_matches(corpus: dict) -> bool:
    """Whether the grid's corpus settings are those data/mini was built with."""
    meta = read_json(BUNDLED / "corpus.json")
    sizes = {split: meta["sizes"][split]["utterances"] for split in ("train", "dev", "test")}
    return sizes == {s: corpus[f"n_{s}"] for s in sizes} and meta["seed"] == corpus["seed"]


def corpus_dir(grid: dict) -> Path:
    """The re-synthesised corpus with its audio, built once into the cache that grids share."""
    c = grid["corpus"]
    path = grid["cache"] / f"corpus-{c['n_train']}-{c['n_dev']}-{c['n_test']}-seed{c['seed']}"
    if not (path / "corpus.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        run(python("-m", "speech_units.corpus", "build", path, "--n-train", c["n_train"], "--n-dev", c["n_dev"],
                   "--n-test", c["n_test"], "--seed", c["seed"], "--save-wav"), "synthesising the corpus")
    return path


def text_corpus(grid: dict) -> Path:
    """The corpus whose transcripts, voices and test references every cell uses, and whose own units
    (MFCC, K=128, 50 Hz) the bundled units are: data/mini, unless the grid also needs re-synthesised
    audio and this machine's espeak-ng makes it differently; then the re-synthesised corpus (built
    the same way), so that every cell hears the same audio."""
    if not bundled_matches(grid["corpus"]):
        return corpus_dir(grid)
    if all(cell["unit_spec"].get("bundled") for cell in grid["cells"]):
        return BUNDLED
    rebuilt = corpus_dir(grid)
    if (rebuilt / "train.jsonl").read_bytes() == (BUNDLED / "train.jsonl").read_bytes():
        return BUNDLED
    print(f"note: {rebuilt} differs from {BUNDLED} although built with its settings (another espeak-ng version?): "
          f"the bundled units of this grid are the re-synthesised corpus's own", file=sys.stderr)
    return rebuilt


def prepare_units(grid: dict, name: str, spec: dict) -> dict:
    """Train, dev and test data of a unit variant and the train.py settings it implies; built on
    first use into the cache, under the corpus they encode."""
    if spec.get("bundled"):
        meta = read_json(grid["text"] / "corpus.json")
        info = {"n_dsus": meta["n_dsus"], "sampling_rate": meta["sample_rate"],
                "downsampling_ratio": meta["downsampling_ratio"]}
        return {"seconds": 0.0, "overrides": shards.overrides(info), "n_dsus": meta["n_dsus"],
                **{split: str(grid["text"] / f"{split}.jsonl") for split in SPLIT_PREFIXES}}
    corpus = corpus_dir(grid)
    where, seconds = corpus / "units" / f"{spec['encoder']}-k{spec['k']}-stack{spec.get('stack', 1)}", 0.0
    encoder = ["--encoder", spec["encoder"], "--stack", spec.get("stack", 1), "--quiet"]
    kmeans = where / "kmeans.npy"
    if not kmeans.exists():
        where.mkdir(parents=True, exist_ok=True)
        seconds += run(python("-m", "speech_units", "learn-kmeans", *encoder, "--k", spec["k"], "--seed",
                              grid["corpus"]["seed"], kmeans, corpus / "wav" / "train.jsonl"), f"k-means of {name}")
    data = {}
    for split, prefix in SPLIT_PREFIXES.items():
        target = where / split
        info_path = target / "units.json"
        if not (info_path.exists() and read_json(info_path).get("complete")):
            resume = ["--resume"] if info_path.exists() else []
            seconds += run(python("-m", "speech_units", "encode", target, *encoder, "--kmeans", kmeans, "--split", prefix,
                                  *resume, corpus / "wav" / f"{split}.jsonl"), f"encoding {split} with {name}")
        data[split] = str(target / "data")
    info = read_json(where / "train" / "units.json")
    return {"seconds": seconds, "overrides": shards.overrides(info), "n_dsus": info["n_dsus"], **data}


def extended_model(grid: dict, out: Path, unit_name: str, data: dict, options: dict,
                   seed: int) -> tuple[Path, float]:
    """The base model (once) extended by the variant's DSUs with new rows drawn by `seed` (0:
    extend.py's default), and the seconds spent making them."""
    seconds = 0.0
    base = out / "base"
    if not base.exists():
        transcripts = grid["text"] / "train.jsonl"
        seconds += run(python("tiny_model.py", base, "--transcripts", transcripts, *grid["base_model"]), "the base model")
    bpe = options["dsu_bpe"]
    path = out / "extended" / (unit_name + (f"-bpe{bpe}" if bpe else "") + ("-raw" if bpe and not options["deduplicate"] else "")
                               + (f"-seed{seed}" if seed else ""))
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        command = python("extend.py", "--base", base, "--n-dsus", data["n_dsus"], "--out", path)
        command += ["--seed", seed] if seed else []
        if bpe:
            command += ["--dsu-bpe", bpe, "--dsu-bpe-data", data["train"]]
            command += [] if options["deduplicate"] else ["--no-deduplicate"]
        seconds += run(command, f"extending the model by {unit_name}")
    return path, seconds


def last_checkpoint(run_dir: Path, steps: int) -> Path:
    return model_dir.step_dir(run_dir, steps)


def train(grid: dict, config: str, run_dir: Path, model: Path, data: dict, options: dict, steps: int,
          extra: list, out: Path, seed: int) -> float:
    """One training stage, resumed from its last checkpoint if it was interrupted; 0 s if finished."""
    if last_checkpoint(run_dir, steps).exists():
        return 0.0
    overrides = [
        f"run_dir={run_dir}", f"model.path={model}", f"data.train={data['train']}", f"data.dev={data['dev']}",
        *data["overrides"], f"data.deduplicate={str(options['deduplicate']).lower()}",
        f"data.cache_dir={out / 'data_cache'}", f"train.max_steps={steps}", f"train.eval_steps={steps}",
        f"train.save_steps={grid['save_steps'] or steps}", "resume=auto", *extra, *grid["train_overrides"],
        *([f"seed={seed}"] if seed else []),
    ]
    if cuda_available():
        overrides.append("train.device=cuda")
    return run(python("train.py", config, *overrides), f"training {run_dir}")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def training_tokens(run_dir: Path) -> int:
    """Tokens the run trained on, from the last logged totals in its metrics.jsonl."""
    tokens = 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        tokens = json.loads(line).get("tokens", tokens)
    return tokens


def speech_tokens_per_utterance(test: str, model: Path, deduplicate: bool) -> float:
    """Mean speech tokens of a test utterance as the model reads them: deduplicated and merged by
    the speech BPE as the cell trains."""
    tok = Tokenizer(model / "original" / "tokenizer.model")
    counts = []
    for row in dataset.iter_rows(dataset.Source(test, split="test"), fields=("speech_tokens",)):
        dsus = deduplicate_runs(row["speech_tokens"]) if deduplicate else row["speech_tokens"]
        counts.append(len(tok.speech_ids(dsus)))
    return sum(counts) / len(counts)


# ---------------------------------------------------------------------------------------------
# A cell


def run_cell(grid: dict, cell: dict, out: Path) -> None:
    name = cell_name(cell)
    cell_dir = out / "cells" / cell_dir_name(cell)
    plan = {"cell": name, "seed": cell["seed"], "units": cell["units"], "unit_spec": cell["unit_spec"], "regime": cell["regime"],
            "regime_spec": cell["regime_spec"], "options": cell["options"], "steps": grid["steps"],
            "corpus": grid["corpus"], "configs": grid["configs"], "base_model": grid["base_model"],
            "train_overrides": grid["train_overrides"], "generate": grid["generate"]}
    started_path = cell_dir / "plan.json"
    if started_path.exists():
        before = read_json(started_path)
        differ = sorted(k for k in plan if before.get(k, 0 if k == "seed" else None) != plan[k])  # seed 0 before seeds
        if differ:
            raise MatrixError(f"{cell_dir} was started with other settings ({', '.join(differ)}): remove it, or "
                              "choose another output directory")
    else:
        cell_dir.mkdir(parents=True, exist_ok=True)
        files.write_json(started_path, plan)
    if (cell_dir / "cell.json").exists():
        print(f"   done: {cell_dir / 'wer.json'}")
        return
    seconds_path = cell_dir / "seconds.json"
    seconds = read_json(seconds_path) if seconds_path.exists() else {}

    def stage(key: str, spent: float) -> None:
        if spent:  # a skipped stage keeps the seconds of the attempt that finished it
            seconds[key] = round(spent, 1)
            files.write_json(seconds_path, seconds)

    data = prepare_units(grid, cell["units"], cell["unit_spec"])
    model, spent = extended_model(grid, out, cell["units"], data, cell["options"], cell["seed"])
    stage("preparation", data["seconds"] + spent)  # shared: paid by the first cell that needs it
    regime, steps, runs = cell["regime_spec"], grid["steps"], []
    cpt_steps = round(steps * regime.get("cpt_share", 0)) if regime.get("cpt") else 0
    if cpt_steps:
        cpt = cell_dir / "cpt"
        stage("cpt", train(grid, grid["configs"]["cpt"], cpt, model, data, cell["options"], cpt_steps,
                           [f"data.cpt.sequence_type={regime['cpt']}"], out, cell["seed"]))
        model, runs = last_checkpoint(cpt, cpt_steps), [cpt]
    sft = cell_dir / "sft"
    stage("sft", train(grid, grid["configs"]["sft"], sft, model, data, cell["options"], steps - cpt_steps,
                       regime.get("sft_overrides", []), out, cell["seed"]))
    runs.append(sft)
    generations = cell_dir / "test" / "generations.jsonl"
    if not generations.exists():
        stage("generate", run(python("generate.py", last_checkpoint(sft, steps - cpt_steps), "--data", data["test"],
                                     "--out", generations.parent, *grid["generate"]), f"generating for {name}"))
    references = grid["text"]
    if not (cell_dir / "wer.json").exists():
        stage("wer", run(python("wer.py", generations, "--references", references / "test.jsonl", "--by", "speaker",
                                "--worst", 0, "--out", cell_dir / "wer.json"), f"scoring {name}"))
    seconds["total"] = round(sum(v for k, v in seconds.items() if k not in ("total", "preparation")), 1)
    files.write_json(cell_dir / "cell.json", {
        "cell": name, "seed": cell["seed"], "units": cell["units"], "regime": cell["regime"],
        "options": cell["options"], "n_dsus": data["n_dsus"], "overrides": data["overrides"],
        "steps": {"cpt": cpt_steps, "sft": steps - cpt_steps},
        "speech_tokens_per_utterance": speech_tokens_per_utterance(data["test"], model, cell["options"]["deduplicate"]),
        "training_tokens": sum(training_tokens(r) for r in runs),
        "unseen_speakers": read_json(references / "corpus.json")["voices"]["test_only"],
        "seconds": seconds, "complete": True,
    })


def output_directory(path: Path, flag: str) -> Path:
    """`path` resolved, refused before anything runs unless it is a directory or can be made one
    (a symlink loop is neither, and would stop resolve())."""
    problem = directory_problem(path)
    if problem:
        raise MatrixError(f"{flag}: {problem}")
    return path.resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python matrix.py", description=__doc__.split("\n\n")[0],
                                     epilog="Read matrix.py's docstring for the stages of a cell.")
    parser.add_argument("grid_file", type=Path, help="the grids, e.g. configs/matrix.json")
    parser.add_argument("--grid", default="default", help="which grid of the file to run (default: default)")
    parser.add_argument("--out", type=Path, help="output directory, reused to resume (default: runs/matrix-GRID)")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "matrix-cache",
                        help="re-synthesised corpora and their unit variants, shared by grids (default: runs/matrix-cache)")
    parser.add_argument("--list", action="store_true", help="list the grid's cells and whether each is done, and stop")
    args = parser.parse_args(argv)
    out = args.out or ROOT / "runs" / f"matrix-{args.grid}"
    try:
        grid = load_grid(args.grid_file, args.grid)
        if args.list:
            for cell in grid["cells"]:
                done = (out / "cells" / cell_dir_name(cell) / "cell.json").exists()
                print(f"{'done   ' if done else 'pending'}  {cell_dir_name(cell)}")
            return 0
        out, grid["cache"] = output_directory(out, "--out"), output_directory(args.cache, "--cache")
        grid["text"] = text_corpus(grid)
        started = time.time()
        for i, cell in enumerate(grid["cells"], 1):
            print(f"\n== matrix {grid['name']}: cell {i}/{len(grid['cells'])}: {cell_dir_name(cell)}", flush=True)
            run_cell(grid, cell, out)
        cells = [out / "cells" / cell_dir_name(cell) for cell in grid["cells"]]  # the table in the grid's order
        run(python("wer.py", "--compare", *cells, "--out", out, "--overwrite"), "comparing the cells")
    except MatrixError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: run the same command again to resume in {out}", file=sys.stderr)
        return 130
    print(f"\nmatrix {grid['name']}: {len(grid['cells'])} cells in {out}; this run took "
          f"{(time.time() - started) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

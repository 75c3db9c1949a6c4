"""The methods matrix: which speech units and which training regime integrate speech best, by test WER.

    python -m data.matrix configs/matrix.json [--grid default|small|tiny] [--out DIR] [--cache DIR] [--list]
    make matrix [MATRIX=small|tiny] [MATRIX_DIR=DIR] [MATRIX_CACHE=DIR]

A grid (configs/matrix.json) names unit variants, regimes, option cells and a training budget in
optimizer steps per cell. Each cell is the chain a user would type by hand, run as subprocesses
whose commands are printed:

    units   the bundled data/mini, or a variant of it: the corpus re-synthesised once with its audio
            kept (python -m data.corpus build --save-wav: the same sentences, voices, splits and
            ids), then python -m data.units learn-kmeans and encode with the variant's features,
            K and frame rate; the one encoding path of this project. Both are cached (--cache) and
            shared by every grid and output directory
    model   tiny_model.py once, then extend.py by the variant's K (with a speech BPE if the cell asks)
    cpt     train.py on the CPT config for the regime's share of the steps (regimes with CPT)
    sft     train.py on the SFT config for the rest, from the CPT run's last checkpoint
    test    generate.py on the test split, then wer.py --by speaker into CELL/wer.json

CELL/cell.json records the cell's settings, the speech tokens per test utterance as the model
reads them, the training tokens and the wall-clock of each stage. Finished stages are skipped, so
an interrupted matrix resumes where it stopped (an interrupted training run from its last
checkpoint; a stage's seconds are those of the attempt that finished it). A cell started with
other settings is refused, never mixed. At the end, wer.py --compare writes compare.md,
compare.csv and compare.png into the output directory.

Why a driver rather than Makefile rules: a cell's stages depend on its settings (K, frame rate,
steps, options), resuming needs a check per stage, and the grid is data that researchers extend.
It sits in data/ beside the corpus and units tools whose outputs it arranges, and runs the stage
scripts only as commands, never importing them.
"""

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from data import dataset, units
from data.samples import CPT_SEQUENCE_TYPES, deduplicate_runs
from data.tokenizer import MAX_DSUS, Tokenizer
from files import atomic_write

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "data" / "mini"
SPLIT_PREFIXES = {"train": "train", "dev": "validation", "test": "test"}  # data.units shard names
OPTION_DEFAULTS = {"deduplicate": True, "dsu_bpe": 0}


class MatrixError(ValueError):
    """A bad grid or a failed stage; the message names the file, key or command."""


# ---------------------------------------------------------------------------------------------
# The grid


def load_grid(path: Path, name: str) -> dict:
    """The named grid with the shared settings it does not override, and its cells."""
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MatrixError(f"{path}: cannot read the grid file ({e})") from None
    grids = spec.get("grids", {})
    if not isinstance(grids, dict) or not isinstance(grids.get(name), dict):
        raise MatrixError(f"{path}: no grid {name!r}; the grids are {', '.join(grids)}")
    for key in ("units", "regimes"):  # declared at the top by name, listed by each grid
        if not isinstance(spec.get(key), dict) or not all(isinstance(v, dict) for v in spec[key].values()):
            raise MatrixError(f"{path}: needs a top-level {key!r} object declaring each by name as an object")
        listed = grids[name].get(key)
        if not isinstance(listed, list) or not all(isinstance(v, str) for v in listed):
            raise MatrixError(f"{path}: grid {name!r} needs {key!r}: a list of names from the top-level {key!r}")
    grid = {**{k: v for k, v in spec.items() if k != "grids"}, **grids[name], "name": name}
    where = f"{path}: grid {name!r}"
    for key in ("steps", "corpus", "configs", "base_model"):
        if key not in grid:
            raise MatrixError(f"{where} has no {key!r}")
    check_settings(grid, spec, where)
    cells = [(u, r, {}) for u in grid["units"] for r in grid["regimes"]]
    cells += [(e.get("units"), e.get("regime"), e.get("options", {})) for e in grid.get("extra", [])]
    grid["cells"] = []
    for unit_name, regime_name, options in cells:
        if unit_name not in spec["units"]:
            raise MatrixError(f"{where}: unknown units {unit_name!r}; declared: {', '.join(spec['units'])}")
        if regime_name not in spec["regimes"]:
            raise MatrixError(f"{where}: unknown regime {regime_name!r}; declared: {', '.join(spec['regimes'])}")
        if spec["units"][unit_name].get("bundled") and not bundled_matches(grid["corpus"]):
            raise MatrixError(f"{where}: units {unit_name!r} are the bundled corpus's, but the grid's corpus settings "
                              f"{grid['corpus']} are not data/mini's: its variants would come from other utterances")
        unknown = set(options) - set(OPTION_DEFAULTS)
        if unknown:
            raise MatrixError(f"{where}: unknown options {sorted(unknown)}; choose from {sorted(OPTION_DEFAULTS)}")
        if not isinstance(options.get("deduplicate", True), bool) or not is_count(options.get("dsu_bpe", 0), 0):
            raise MatrixError(f"{where}: options {options}: deduplicate must be true or false, dsu_bpe an integer >= 0")
        grid["cells"].append({"units": unit_name, "unit_spec": spec["units"][unit_name], "regime": regime_name,
                              "regime_spec": spec["regimes"][regime_name], "options": {**OPTION_DEFAULTS, **options}})
    return grid


def is_count(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_settings(grid: dict, spec: dict, where: str) -> None:
    """The grid's numbers and the declarations it uses, before anything runs: a bad one would
    otherwise fail a cell an hour in, or (a CPT regime without its share) silently train another."""
    if not is_count(grid["steps"], 2):
        raise MatrixError(f"{where}: steps must be an integer >= 2, got {grid['steps']!r}")
    corpus = grid["corpus"]
    if not all(is_count(corpus.get(key), 1 if key == "n_train" else 0) for key in ("n_train", "n_dev", "n_test", "seed")):
        raise MatrixError(f"{where}: corpus {corpus} needs integers n_train >= 1, n_dev, n_test, seed >= 0")
    if not isinstance(grid.get("extra", []), list) or not all(isinstance(e, dict) for e in grid.get("extra", [])):
        raise MatrixError(f"{where}: extra must be a list of {{units, regime, options}} objects")
    for name in {*grid["units"], *(e.get("units") for e in grid.get("extra", []))} & set(spec["units"]):
        unit = spec["units"][name]
        stack = unit.get("stack", 1)
        if not unit.get("bundled") and not (unit.get("encoder") in ("mfcc", "logmel") and is_count(unit.get("k"), 1)
                                            and unit["k"] <= MAX_DSUS and is_count(stack, 1)):
            raise MatrixError(f"{where}: units {name!r} {unit}: give bundled: true, or encoder mfcc or logmel, "
                              f"k in 1..{MAX_DSUS} and stack >= 1")
    for name in {*grid["regimes"], *(e.get("regime") for e in grid.get("extra", []))} & set(spec["regimes"]):
        regime = spec["regimes"][name]
        share = regime.get("cpt_share")
        if regime and not (regime.get("cpt") in CPT_SEQUENCE_TYPES and isinstance(share, (int, float))
                           and 0 < round(grid["steps"] * share) < grid["steps"]):
            raise MatrixError(f"{where}: regime {name!r} {regime}: SFT alone is {{}}; CPT then SFT needs cpt in "
                              f"{', '.join(CPT_SEQUENCE_TYPES)} and a cpt_share leaving both stages steps")


def cell_name(cell: dict) -> str:
    tags = (["no-dedup"] if not cell["options"]["deduplicate"] else []) + (
        [f"bpe{cell['options']['dsu_bpe']}"] if cell["options"]["dsu_bpe"] else [])
    return f"{cell['units']}/{cell['regime']}" + "".join(f"+{t}" for t in tags)


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


def write_json(path: Path, value: dict) -> None:
    with atomic_write(path) as temporary:
        temporary.write_text(json.dumps(value, indent=2) + "\n")


def bundled_matches(corpus: dict) -> bool:
    """Whether the grid's corpus settings are those data/mini was built with."""
    meta = json.loads((BUNDLED / "corpus.json").read_text())
    sizes = {split: meta["sizes"][split]["utterances"] for split in ("train", "dev", "test")}
    return sizes == {s: corpus[f"n_{s}"] for s in sizes} and meta["seed"] == corpus["seed"]


def corpus_dir(grid: dict) -> Path:
    """The re-synthesised corpus with its audio, built once into the cache that grids share."""
    c = grid["corpus"]
    path = grid["cache"] / f"corpus-{c['n_train']}-{c['n_dev']}-{c['n_test']}-seed{c['seed']}"
    if not (path / "corpus.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        run(python("-m", "data.corpus", "build", path, "--n-train", c["n_train"], "--n-dev", c["n_dev"],
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
        meta = json.loads((grid["text"] / "corpus.json").read_text())
        info = {"n_dsus": meta["n_dsus"], "sampling_rate": meta["sample_rate"],
                "downsampling_ratio": meta["downsampling_ratio"]}
        return {"seconds": 0.0, "overrides": units.overrides(info), "n_dsus": meta["n_dsus"],
                **{split: str(grid["text"] / f"{split}.jsonl") for split in SPLIT_PREFIXES}}
    corpus = corpus_dir(grid)
    where, seconds = corpus / "units" / f"{spec['encoder']}-k{spec['k']}-stack{spec.get('stack', 1)}", 0.0
    encoder = ["--encoder", spec["encoder"], "--stack", spec.get("stack", 1), "--quiet"]
    kmeans = where / "kmeans.npy"
    if not kmeans.exists():
        where.mkdir(parents=True, exist_ok=True)
        seconds += run(python("-m", "data.units", "learn-kmeans", *encoder, "--k", spec["k"], "--seed",
                              grid["corpus"]["seed"], kmeans, corpus / "wav" / "train.jsonl"), f"k-means of {name}")
    data = {}
    for split, prefix in SPLIT_PREFIXES.items():
        target = where / split
        info_path = target / "units.json"
        if not (info_path.exists() and json.loads(info_path.read_text()).get("complete")):
            resume = ["--resume"] if info_path.exists() else []
            seconds += run(python("-m", "data.units", "encode", target, *encoder, "--kmeans", kmeans, "--split", prefix,
                                  *resume, corpus / "wav" / f"{split}.jsonl"), f"encoding {split} with {name}")
        data[split] = str(target / "data")
    info = json.loads((where / "train" / "units.json").read_text())
    return {"seconds": seconds, "overrides": units.overrides(info), "n_dsus": info["n_dsus"], **data}


def extended_model(grid: dict, out: Path, unit_name: str, data: dict, options: dict) -> tuple[Path, float]:
    """The base model (once) extended by the variant's DSUs, and the seconds spent making them."""
    seconds = 0.0
    base = out / "base"
    if not base.exists():
        transcripts = grid["text"] / "train.jsonl"
        seconds += run(python("tiny_model.py", base, "--transcripts", transcripts, *grid["base_model"]), "the base model")
    bpe = options["dsu_bpe"]
    path = out / "extended" / (unit_name + (f"-bpe{bpe}" if bpe else "") + ("-raw" if bpe and not options["deduplicate"] else ""))
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        command = python("extend.py", "--base", base, "--n-dsus", data["n_dsus"], "--out", path)
        if bpe:
            command += ["--dsu-bpe", bpe, "--dsu-bpe-data", data["train"]]
            command += [] if options["deduplicate"] else ["--dsu-bpe-keep-repeats"]
        seconds += run(command, f"extending the model by {unit_name}")
    return path, seconds


def last_checkpoint(run_dir: Path, steps: int) -> Path:
    return run_dir / "checkpoints" / f"step_{steps:07d}"


def train(grid: dict, config: str, run_dir: Path, model: Path, data: dict, options: dict, steps: int,
          extra: list, out: Path) -> float:
    """One training stage, resumed from its last checkpoint if it was interrupted; 0 s if finished."""
    if last_checkpoint(run_dir, steps).exists():
        return 0.0
    overrides = [
        f"run_dir={run_dir}", f"model.path={model}", f"data.train={data['train']}", f"data.dev={data['dev']}",
        *data["overrides"], f"data.deduplicate={str(options['deduplicate']).lower()}",
        f"data.cache_dir={out / 'data_cache'}", f"train.max_steps={steps}", f"train.eval_steps={steps}",
        f"train.save_steps={grid.get('save_steps', steps)}", "resume=auto", *extra, *grid.get("train_overrides", []),
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
    cell_dir = out / "cells" / name
    plan = {"cell": name, "units": cell["units"], "unit_spec": cell["unit_spec"], "regime": cell["regime"],
            "regime_spec": cell["regime_spec"], "options": cell["options"], "steps": grid["steps"],
            "corpus": grid["corpus"], "configs": grid["configs"], "base_model": grid["base_model"],
            "train_overrides": grid.get("train_overrides", []), "generate": grid.get("generate", [])}
    started_path = cell_dir / "plan.json"
    if started_path.exists():
        before = json.loads(started_path.read_text())
        differ = sorted(k for k in plan if before.get(k) != plan[k])
        if differ:
            raise MatrixError(f"{cell_dir} was started with other settings ({', '.join(differ)}): remove it, or "
                              "choose another output directory")
    else:
        cell_dir.mkdir(parents=True, exist_ok=True)
        write_json(started_path, plan)
    if (cell_dir / "cell.json").exists():
        print(f"   done: {cell_dir / 'wer.json'}")
        return
    seconds_path = cell_dir / "seconds.json"
    seconds = json.loads(seconds_path.read_text()) if seconds_path.exists() else {}

    def stage(key: str, spent: float) -> None:
        if spent:  # a skipped stage keeps the seconds of the attempt that finished it
            seconds[key] = round(spent, 1)
            write_json(seconds_path, seconds)

    data = prepare_units(grid, cell["units"], cell["unit_spec"])
    model, spent = extended_model(grid, out, cell["units"], data, cell["options"])
    stage("preparation", data["seconds"] + spent)  # shared: paid by the first cell that needs it
    regime, steps, runs = cell["regime_spec"], grid["steps"], []
    cpt_steps = round(steps * regime.get("cpt_share", 0)) if regime.get("cpt") else 0
    if cpt_steps:
        cpt = cell_dir / "cpt"
        stage("cpt", train(grid, grid["configs"]["cpt"], cpt, model, data, cell["options"], cpt_steps,
                           [f"data.cpt.sequence_type={regime['cpt']}"], out))
        model, runs = last_checkpoint(cpt, cpt_steps), [cpt]
    sft = cell_dir / "sft"
    stage("sft", train(grid, grid["configs"]["sft"], sft, model, data, cell["options"], steps - cpt_steps, [], out))
    runs.append(sft)
    generations = cell_dir / "test" / "generations.jsonl"
    if not generations.exists():
        stage("generate", run(python("generate.py", last_checkpoint(sft, steps - cpt_steps), "--data", data["test"],
                                     "--out", generations.parent, *grid.get("generate", [])), f"generating for {name}"))
    references = grid["text"]
    if not (cell_dir / "wer.json").exists():
        stage("wer", run(python("wer.py", generations, "--references", references / "test.jsonl", "--by", "speaker",
                                "--worst", 0, "--out", cell_dir / "wer.json"), f"scoring {name}"))
    seconds["total"] = round(sum(v for k, v in seconds.items() if k not in ("total", "preparation")), 1)
    write_json(cell_dir / "cell.json", {
        "cell": name, "units": cell["units"], "regime": cell["regime"], "options": cell["options"],
        "n_dsus": data["n_dsus"], "overrides": data["overrides"],
        "steps": {"cpt": cpt_steps, "sft": steps - cpt_steps},
        "speech_tokens_per_utterance": speech_tokens_per_utterance(data["test"], model, cell["options"]["deduplicate"]),
        "training_tokens": sum(training_tokens(r) for r in runs),
        "unseen_speakers": json.loads((references / "corpus.json").read_text())["voices"]["test_only"],
        "seconds": seconds, "complete": True,
    })


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.matrix", description=__doc__.split("\n\n")[0],
                                     epilog="Read data/matrix.py's docstring for the stages of a cell.")
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
                done = (out / "cells" / cell_name(cell) / "cell.json").exists()
                print(f"{'done   ' if done else 'pending'}  {cell_name(cell)}")
            return 0
        out, grid["cache"] = out.resolve(), args.cache.resolve()
        grid["text"] = text_corpus(grid)
        started = time.time()
        for i, cell in enumerate(grid["cells"], 1):
            print(f"\n== matrix {grid['name']}: cell {i}/{len(grid['cells'])}: {cell_name(cell)}", flush=True)
            run_cell(grid, cell, out)
        cells = [out / "cells" / cell_name(cell) for cell in grid["cells"]]  # the table in the grid's order
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

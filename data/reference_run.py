"""What the reference implementation (`speech-integration`, torchtune + Hydra) leaves in a run
directory, read as data: its training config and its checkpoints (their step directories are named here;
model_dir.py lists them and says where their generations go).

A reference run looks like
    <run>/checkpoints/torchtune_config.yaml                    the training config (OmegaConf YAML)
    <run>/checkpoints/epoch_E/global_step_N/                   weights (ft-model-*.safetensors + index)
    <run>/checkpoints/epoch_E/recipe_state.pt or ...           (older) optimizer, epoch, step, seed
    <run>/checkpoints/step_N/ + checkpoints/training_state.pt  (newer) its own resume schema
    <run>/generations/epoch_E/global_step_N/<dataset>/<split>/generations.jsonl

`torchtune_config.yaml` is saved unresolved: it holds `${...}` interpolations (some of them Hydra's
`${hydra:...}`, which only exist while Hydra runs), `???` for values never given, and Python tags
such as `!!python/object/apply:pathlib.PosixPath`. It is read here with a YAML loader that turns
every tag into plain data (never an object), and interpolations between its own keys are resolved
when a setting is asked for; anything else stays unresolved and is reported by name. It is read
only as the config of a checkpoint in the layout above, and within limits of size, nesting, and
alias and `${...}` expansion (MAX_* below): past them the file is refused, naming the key.
"""

import glob
import json
import os
import re
from pathlib import Path

import yaml

import files

CONFIG_NAME = "torchtune_config.yaml"
TRAINING_CONFIG = "training_config.json"  # this project's own checkpoints carry it
MISSING = "???"  # OmegaConf's mandatory-but-missing value
STEP_DIR = re.compile(r"global_step_(\d+)")
EPOCH_DIR = re.compile(r"epoch_\d+")

# Settings that change token ids, as this project names them (generate.py's data.* keys), and the
# places in the reference's config that hold them, first found first. `speech.*` is what the user
# sets; the data sections interpolate it. The newer reference moved n_dsus into the data group.
TOKEN_SETTINGS = {
    "n_dsus": ("speech.n_dsus", "data.n_dsus"),
    "deduplicate": ("speech.deduplicate", "data.test.dataset.deduplicate", "data.train.dataset.deduplicate"),
    "modality_tokens": (
        "speech.use_modality_tokens",
        "data.test.dataset.use_modality_tokens",
        "data.train.dataset.use_modality_tokens",
    ),
    "sft.system_prompt": ("data.test.dataset.new_system_prompt", "data.train.dataset.new_system_prompt"),
}
HOW_TO_GIVE = {
    "n_dsus": "--n-dsus N",
    "deduplicate": "data.deduplicate=true|false",
    "modality_tokens": "data.modality_tokens=true|false",
    "sft.system_prompt": 'data.sft.system_prompt="..."',
}


class ReferenceError(ValueError):
    """A reference artifact that cannot be used as it is; the message names the file and the setting."""


# -- the YAML, as data -------------------------------------------------------------------------

# The file is read with limits, as a hostile one (billion laughs, a self-referencing anchor, a
# tower of `${...}`) would otherwise take all memory or end in a RecursionError. A real config is
# about 10 KB, 300 values and 6 levels deep, its references a few levels more.
MAX_BYTES = 4 << 20
MAX_VALUES = 100_000  # values in the file with every alias expanded
MAX_DEPTH = 64  # levels of nesting, through aliases; and, resolving, nesting plus references
MAX_RESOLVED = 1 << 20  # values and characters that resolving one key may produce


class _Refused(Exception):
    """A bound that the file passes at `node` (a yaml.Node, for its line) under key `key`."""

    def __init__(self, node, key: str, why: str):
        super().__init__(why)
        key = key if len(key) <= 80 else key[:77] + "..."
        self.line, self.key, self.why = node.start_mark.line + 1, key or "(top)", why


def _key_name(keys: list) -> str:
    """`a.b[2].c` for the keys and positions the composer descends through."""
    name = ""
    for index in keys:
        if isinstance(index, int):
            name += f"[{index}]"
        elif isinstance(index, yaml.ScalarNode):
            name += f".{index.value}" if name else index.value
        else:  # a mapping key being composed, or a key that is itself a collection
            name += ".?" if name else "?"
    return name


class _DataLoader(yaml.SafeLoader):
    """SafeLoader that reads any tag as the plain data under it (a path tag as its path string),
    and refuses nesting past MAX_DEPTH while composing (the composer recurses once per level)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._keys = []

    def compose_node(self, parent, index):
        self._keys.append(index)
        try:
            if len(self._keys) > MAX_DEPTH + 1:  # the document itself is the first
                raise _Refused(self.peek_event(), _key_name(self._keys[1:]), f"nests deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._keys.pop()


def _plain(loader: _DataLoader, suffix: str, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        items = loader.construct_sequence(node, deep=True)
        # pathlib.PosixPath / WindowsPath / Path are pickled as apply(<class>, [part, part, ...])
        if re.search(r"pathlib\.\w*Path$", suffix) and all(isinstance(i, str) for i in items):
            return str(Path(*items)) if items else "."
        return items
    return loader.construct_scalar(node)


_DataLoader.add_multi_constructor("", _plain)


def _check_aliases(root: yaml.Node) -> None:
    """Refuse a node graph that refers to itself through an alias, or that aliases expand past
    MAX_VALUES values or MAX_DEPTH levels. Each node is counted once (an alias only refers to
    an anchor already composed), so this takes time linear in the file."""
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values, levels) once expanded
    open_nodes: set[int] = set()

    def children(node, key):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                name = k.value if isinstance(k, yaml.ScalarNode) else "?"
                yield k, key
                yield v, f"{key}.{name}" if key else name
        elif isinstance(node, yaml.SequenceNode):
            yield from ((item, f"{key}[{i}]") for i, item in enumerate(node.value))

    def walk(node, key):
        if id(node) in open_nodes:
            raise _Refused(node, key, "refers to itself through an alias")
        if id(node) not in sizes:
            open_nodes.add(id(node))
            values, levels = 1, 1
            for child, child_key in children(node, key):
                child_values, child_levels = walk(child, child_key)
                values, levels = values + child_values, max(levels, child_levels + 1)
                if values > MAX_VALUES:
                    raise _Refused(node, key, f"expands through aliases to more than {MAX_VALUES} values")
                if levels > MAX_DEPTH:
                    raise _Refused(node, key, f"nests through aliases deeper than {MAX_DEPTH} levels")
            open_nodes.discard(id(node))
            sizes[id(node)] = values, levels
        return sizes[id(node)]

    walk(root, "")


def _load(path: Path):
    """The YAML document at `path` as plain data, within the limits above."""
    loader = _DataLoader(path.read_text(encoding="utf-8"))
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_aliases(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


class Unresolved(str):
    """A value that cannot be known from the file alone; the str says why."""


class ReferenceConfig:
    """A `torchtune_config.yaml`, with `get("a.b.c")` resolving `${...}` between its own keys."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = files.regular_file(self.path).stat().st_size
        except files.NotRegularFile as e:  # a FIFO would block the read
            raise ReferenceError(str(e)) from None
        except OSError as e:
            raise ReferenceError(f"{self.path}: cannot read ({e})") from None
        if size > MAX_BYTES:
            raise ReferenceError(f"{self.path}: larger than {MAX_BYTES >> 20} MiB, where a training config is a "
                                 "few KB: refused")
        try:
            tree = _load(self.path)
        except (OSError, UnicodeDecodeError) as e:
            raise ReferenceError(f"{self.path}: cannot read ({e})") from None
        except _Refused as e:
            raise ReferenceError(f"{self.path}:{e.line}: key '{e.key}' {e.why}: refused") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ReferenceError(f"{self.path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
        except (ValueError, TypeError, OverflowError) as e:  # a scalar its tag cannot hold, e.g. `!!int abc`
            raise ReferenceError(f"{self.path}: not valid YAML ({e})") from None
        if not isinstance(tree, dict):
            raise ReferenceError(f"{self.path}: expected a YAML mapping at the top")
        self.tree = tree
        self._asked, self._budget = "", 0  # the key get() resolves, and what it may still produce

    def get(self, dotted: str):
        """The value at `dotted`, interpolations resolved; None when the key is absent;
        an `Unresolved` when it is `???` or depends on something outside the file. Resolving
        past MAX_RESOLVED values and characters, or MAX_DEPTH levels, raises ReferenceError."""
        self._asked, self._budget = dotted, MAX_RESOLVED
        return self._get(dotted, 0)

    def _get(self, dotted: str, depth: int):
        node = self.tree
        for key in dotted.split("."):
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return self._resolve(node, dotted, depth)

    def _refuse(self, why: str) -> ReferenceError:
        return ReferenceError(f"{self.path}: key '{self._asked}' resolves through ${{...}} {why}: refused")

    def _spend(self, amount: int) -> None:
        self._budget -= amount
        if self._budget < 0:
            raise self._refuse(f"to more than {MAX_RESOLVED} values and characters")

    def _resolve(self, value, where: str, depth: int):
        if depth > MAX_DEPTH:
            raise self._refuse(f"deeper than {MAX_DEPTH} levels (a cycle?)")
        self._spend(1 + (len(value) if isinstance(value, str) else 0))
        if isinstance(value, dict):
            return {k: self._resolve(v, f"{where}.{k}", depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [self._resolve(v, where, depth + 1) for v in value]
        if not isinstance(value, str):
            return value
        if value == MISSING:
            return Unresolved(f"{where} is '???' (never given)")
        pieces = re.split(r"(\$\{[^${}]*\})", value)
        if len(pieces) == 1:
            return value
        resolved = []
        for piece in pieces:
            if not (piece.startswith("${") and piece.endswith("}")):
                resolved.append(piece)
                continue
            ref = piece[2:-1].strip()
            if ":" in ref:  # a resolver (hydra:, oc.env:, ...): only known while the reference ran
                return Unresolved(f"{where} is {value!r}, which needs the resolver '{ref.split(':')[0]}:'")
            target = self._absolute(ref, where)
            got = self._get(target, depth + 1)
            if got is None:
                return Unresolved(f"{where} is {value!r}, and {target} is not in the file")
            if isinstance(got, Unresolved):
                return Unresolved(f"{where} is {value!r}, and {got}")
            if value.strip() == piece:
                return got  # a whole-value interpolation keeps the target's type
            text = got if isinstance(got, str) else json.dumps(got, default=str)
            self._spend(len(text))
            resolved.append(text)
        return "".join(resolved)

    @staticmethod
    def _absolute(ref: str, where: str) -> str:
        """`${.x}` is relative to the node holding the value, `${..x}` to its parent, and so on."""
        if not ref.startswith("."):
            return ref
        dots = len(ref) - len(ref.lstrip("."))
        parent = where.split(".")[:-1]
        return ".".join(parent[: len(parent) - (dots - 1)] + [ref[dots:]])


def find_config(checkpoint: Path) -> Path | None:
    """The reference's training config of a checkpoint in its run's layout, and nowhere else:
    `<run>/checkpoints/torchtune_config.yaml` for `<run>/checkpoints/epoch_E/global_step_N` (or the
    newer reference's `<run>/checkpoints/step_N`). A checkpoint elsewhere (an extended model, this
    project's own) has none, whatever YAML lies in a directory above it."""
    checkpoint = Path(checkpoint).absolute()
    older = STEP_DIR.fullmatch(checkpoint.name) and EPOCH_DIR.fullmatch(checkpoint.parent.name)
    newer = re.fullmatch(r"step_\d+", checkpoint.name) and not (checkpoint / "training_state.pt").exists()
    checkpoints = checkpoint.parent.parent if older else checkpoint.parent if newer else None
    if checkpoints is None or checkpoints.name != "checkpoints":
        return None
    path = checkpoints / CONFIG_NAME
    return path if os.path.lexists(path) else None  # ReferenceConfig refuses one that is no regular file


# -- settings for generation ------------------------------------------------------------------


def _data_keys(training_config: Path) -> set[str]:
    """The data.* keys a checkpoint's training_config.json sets (dotted, below data)."""
    try:
        data = files.read_json(training_config).get("data", {})
    except files.JsonFileError:  # absent, no regular file, not a JSON object: generate.py reports it
        return set()
    keys = set()
    for key, value in data.items() if isinstance(data, dict) else ():
        if isinstance(value, dict):
            keys |= {f"{key}.{sub}" for sub in value}
        keys.add(key)
    return keys


def generation_settings(checkpoint: Path, overrides: list[str], n_dsus: int | None):
    """The token-id settings of `checkpoint` that come from a reference `torchtune_config.yaml`.

    Returns (from_yaml, sources): {setting: (value, where)} for the settings that neither the
    command line (`overrides`, `n_dsus`) nor the checkpoint's training_config.json gives, `where`
    naming the file and key (for the caller to check the value against its schema and name them),
    and {setting: where it came from} for all four. Without a reference config it returns
    ({}, sources of what the command line and training_config.json give). A setting that is needed
    but unresolved in the YAML raises ReferenceError naming it and how to give it.
    """
    checkpoint = Path(checkpoint)
    given = {text.partition("=")[0].removeprefix("data.") for text in overrides}
    if n_dsus is not None:
        given.add("n_dsus")
    own = checkpoint / TRAINING_CONFIG
    saved = _data_keys(own)
    sources, from_yaml = {}, {}
    yaml_path = find_config(checkpoint) if not saved >= set(TOKEN_SETTINGS) else None
    config = ReferenceConfig(yaml_path) if yaml_path else None
    for setting, places in TOKEN_SETTINGS.items():
        if setting in given:
            sources[setting] = "command line"
        elif setting in saved:
            sources[setting] = str(own)
        elif config is not None:
            value, place = _first_value(config, places)
            if value is None or isinstance(value, Unresolved):
                why = value if isinstance(value, Unresolved) else f"none of {', '.join(places)} is in it"
                raise ReferenceError(
                    f"{setting}: not on the command line nor in a {TRAINING_CONFIG}, and {config.path} does not "
                    f"resolve it ({why}); pass {HOW_TO_GIVE[setting]}"
                )
            sources[setting] = f"{config.path}, key '{place}'"
            from_yaml[setting] = value, sources[setting]
    return from_yaml, sources


def describe_settings(data: dict, sources: dict[str, str]) -> list[str]:
    """One line per token-id setting: its value and where it came from."""
    lines = []
    for setting in TOKEN_SETTINGS:
        value = data["sft"]["system_prompt"] if setting == "sft.system_prompt" else data[setting]
        lines.append(f"{setting}={json.dumps(value)}  ({sources.get(setting, 'train.py default')})")
    return lines


def _first_value(config: ReferenceConfig, places):
    """The first place that holds a value; an unresolved one only when no later place resolves."""
    first_unresolved = None
    for place in places:
        value = config.get(place)
        if value is None:
            continue
        if isinstance(value, Unresolved):
            first_unresolved = first_unresolved or (value, place)
            continue
        return value, place
    return first_unresolved or (None, None)


# -- checkpoints and outputs ------------------------------------------------------------------


def reference_checkpoints(run_dir: Path) -> list[Path]:
    """The reference's checkpoints in a run directory (or in its `checkpoints/`), oldest first:
    `epoch_E/global_step_N/` (older, with `recipe_state.pt`) and `step_N/` beside a
    `training_state.pt` in the reference's schema (newer)."""
    found = []
    for root in (Path(run_dir) / "checkpoints", Path(run_dir)):
        if not root.is_dir():
            continue
        for step_dir in root.glob("epoch_*/global_step_*"):
            match = STEP_DIR.fullmatch(step_dir.name)
            if match and step_dir.is_dir():
                found.append((int(match.group(1)), step_dir))
        if (root / "training_state.pt").is_file() or (root / CONFIG_NAME).is_file():
            for step_dir in root.glob("step_*"):
                # this project's own are step_NNNNNNN with their training_state.pt inside
                if re.fullmatch(r"step_\d+", step_dir.name) and not (step_dir / "training_state.pt").exists():
                    found.append((int(step_dir.name[5:]), step_dir))
    return [path for _, path in sorted(set(found))]


def is_reference_checkpoint(path: Path) -> bool:
    if STEP_DIR.fullmatch(path.name) and EPOCH_DIR.fullmatch(path.parent.name):
        return path.is_dir()
    return path in reference_checkpoints(path.parent)  # the newer step_N, beside its training_state.pt


def refuse_to_resume(run_dir: Path, resume: str) -> None:
    """Raise ReferenceError when `run_dir` holds the reference's checkpoints (or `resume` names
    one): this project cannot continue them exactly, and must not start over beside them."""
    if resume in ("", "auto"):
        found = reference_checkpoints(run_dir)
    else:
        found = [Path(resume)] if is_reference_checkpoint(Path(resume)) else []
    if not found:
        return
    latest = found[-1]
    why = (
        "their optimizer state is keyed by torchtune's parameter order and their data position by the reference's "
        "sampler, neither of which this training loop reproduces, so continuing them would not be the same run"
    )
    verbs = {"auto": "resume=auto cannot continue", "": "a new run would start over beside"}
    verb = verbs.get(resume, "resume cannot continue")
    settings = ""
    config_path = find_config(latest)
    if config_path is not None:
        config = ReferenceConfig(config_path)
        for setting in ("n_dsus", "deduplicate", "modality_tokens"):
            value, _ = _first_value(config, TOKEN_SETTINGS[setting])
            if value is not None and not isinstance(value, Unresolved):
                settings += f" data.{setting}={json.dumps(value)}"
    raise ReferenceError(
        f"{run_dir} holds checkpoints made by the reference implementation (latest: {latest}); {verb} them: {why}. "
        f"To continue training from those weights, start a new run from them: "
        f"python train.py CONFIG run_dir=NEW_RUN_DIR model.path={latest}{settings} ..."
    )


# -- generations and references ----------------------------------------------------------------


def vllm_text(record: dict, where: str) -> str:
    """The text of a vLLM `RequestOutput` record as the reference writes them (one completion in
    `outputs`, its decoded text in `outputs[0].text`)."""
    outputs = record.get("outputs")
    if not isinstance(outputs, list) or len(outputs) != 1 or not isinstance(outputs[0], dict):
        count = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
        raise ReferenceError(f"{where}: field 'outputs': expected a list of one completion, got {count}")
    text = outputs[0].get("text")
    if not isinstance(text, str):
        raise ReferenceError(f"{where}: field 'outputs[0].text': expected a string, got {json.dumps(text)}")
    return text


def hub_cache_dataset(name: str) -> Path | None:
    """A dataset in the local Hugging Face hub cache, by `owner/name` or `name` (the reference's
    wer.py takes its owner's datasets by name); None when it is not there or is ambiguous."""
    roots = [os.environ.get("HF_HUB_CACHE"), os.environ.get("HF_HOME") and os.path.join(os.environ["HF_HOME"], "hub"),
             os.path.expanduser("~/.cache/huggingface/hub")]
    escaped = glob.escape(name)  # a name is a name, never a pattern that could match another dataset
    pattern = "datasets--" + (escaped.replace("/", "--") if "/" in name else f"*--{escaped}")
    found = {p for root in roots if root and Path(root).is_dir() for p in Path(root).glob(pattern) if p.is_dir()}
    return found.pop() if len(found) == 1 else None


def cached_dataset(checkpoint: Path) -> Path | None:
    """The local hub cache entry of the dataset a reference checkpoint's config names, if there;
    ReferenceError when the config cannot be read."""
    path = find_config(checkpoint)
    if path is None:
        return None
    config = ReferenceConfig(path)
    for place in ("data.test.dataset.source", "data.train.dataset.source"):
        source = config.get(place)
        if isinstance(source, str) and not isinstance(source, Unresolved):
            return hub_cache_dataset(source)
    return None


def infer_split(generations: Path) -> str | None:
    """The split a reference generations file was made for, from its directory (`.../<dataset>/<split>/`)."""
    name = Path(generations).absolute().parent.name
    return name if name in ("train", "validation", "dev", "test") else None


def holds_vllm_records(path: Path) -> bool:
    """Whether a generations file's first record is a vLLM one (`outputs`, no `text`)."""
    try:
        with open(files.regular_file(path), encoding="utf-8") as f:  # never a FIFO: it would block
            first = next((line for line in f if line.strip()), "")
        record = json.loads(first) if first else None
    except (OSError, ValueError):  # no regular file, not UTF-8, not JSON: wer.py reports the file's problem itself
        return False
    return isinstance(record, dict) and "outputs" in record and "text" not in record

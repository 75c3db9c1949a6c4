"""train.py end to end on a tiny extended model: learning, checkpoints, exact resume (also after
SIGKILL), two processes vs one, transformers compatibility, and refusals of bad input."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import config
import train
from model_dir import load_model
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# One thread everywhere: the runs compared with == must do their float sums in the same order.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
HF_FILES = ["config.json", "generation_config.json", "model.safetensors", "original/tokenizer.model",
            "original/params.json", "training_config.json", "training_state.pt"]

# The reference CPT run: 8 steps per epoch (64 rows, 4 x 2 per step), so 12 steps cross an epoch.
MAX_STEPS, SAVE_STEPS = 12, 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_assets")
    return SimpleNamespace(
        root=root,
        model=tiny.extended_model(root),
        train=tiny.write_jsonl(root / "train.jsonl", tiny.rows(64, seed=2, prefix="train")),
        dev=tiny.write_jsonl(root / "dev.jsonl", tiny.rows(8, seed=3, prefix="dev")),
    )


def cpt_args(assets, run_dir: Path, *overrides: str, config: Path = CONFIGS / "tiny_cpt.json") -> list[str]:
    return [str(config), f"run_dir={run_dir}", f"model.path={assets.model}", f"data.train={assets.train}",
            f"data.dev={assets.dev}", f"data.n_dsus={tiny.N_DSUS}", "data.max_seq_len=128",
            f"train.max_steps={MAX_STEPS}", f"train.save_steps={SAVE_STEPS}", "train.eval_steps=4", *overrides]


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """An uninterrupted CPT run that the resumed and killed runs must reproduce exactly."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert train.main(cpt_args(assets, run_dir)) == 0
    return run_dir


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    steps = [r["step"] for r in records(run_dir) if key in r]
    assert len(steps) == len(set(steps)), f"{key} logged twice for a step: {steps}"
    return {r["step"]: r[key] for r in records(run_dir) if key in r}


def last_totals(run_dir: Path) -> dict[str, int]:
    last = [r for r in records(run_dir) if "tokens" in r][-1]
    return {k: last[k] for k in ("tokens", "text_tokens", "dsu_tokens", "special_tokens", "target_tokens")}


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:07d}"


def step_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


# -- learning, metrics and checkpoint layout ------------------------------------------------------


def check_run(run_dir: Path, max_steps: int, eval_steps: int, save_steps: int, min_drop: float) -> None:
    by_step = losses(run_dir)
    assert sorted(by_step) == list(range(1, max_steps + 1))
    first, last = by_step[1], min(by_step[s] for s in range(max_steps - 2, max_steps + 1))
    assert last < first - min_drop, f"loss did not fall: {by_step}"

    totals = [r for r in records(run_dir) if "tokens" in r]
    assert totals and all(r["text_tokens"] > 0 and r["dsu_tokens"] > 0 and r["special_tokens"] > 0 for r in totals)
    assert all(r["tokens"] == r["text_tokens"] + r["dsu_tokens"] + r["special_tokens"] for r in totals)
    assert all(0 < r["target_tokens"] <= r["tokens"] for r in totals)
    assert [r["tokens"] for r in totals] == sorted(r["tokens"] for r in totals)  # running totals

    eval_at = [s for s in range(1, max_steps + 1) if s % eval_steps == 0 or s == max_steps]
    assert sorted(losses(run_dir, "dev_loss")) == eval_at
    assert all(0 < v < 10 for v in losses(run_dir, "dev_loss").values())

    saved_at = [s for s in range(1, max_steps + 1) if s % save_steps == 0 or s == max_steps]
    assert step_dirs(run_dir) == [f"step_{s:07d}" for s in saved_at]
    for step in saved_at:
        ckpt = checkpoint(run_dir, step)
        for name in HF_FILES:
            assert (ckpt / name).is_file(), f"{ckpt} lacks {name}"
        assert train.read_training_state(ckpt)["step"] == step  # as data: weights_only
        umask = os.umask(0)
        os.umask(umask)
        assert {oct((ckpt / name).stat().st_mode & 0o777) for name in HF_FILES} == {oct(0o666 & ~umask)}, ckpt
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_cpt_run_learns_logs_and_checkpoints(reference):
    check_run(reference, MAX_STEPS, eval_steps=4, save_steps=SAVE_STEPS, min_drop=0.5)


def test_sft_run_learns_logs_and_checkpoints(assets, tmp_path):
    run_dir = tmp_path / "sft"
    args = cpt_args(assets, run_dir, "data.max_seq_len=512", "train.save_steps=5", "train.eval_steps=5",
                    config=CONFIGS / "tiny_sft.json")
    assert train.main(args) == 0
    check_run(run_dir, MAX_STEPS, eval_steps=5, save_steps=5, min_drop=0.5)
    assert json.loads((checkpoint(run_dir, 12) / "training_config.json").read_text())["data"]["task"] == "sft"


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_a_compiled_model_trains_without_recompiling_per_batch(assets, reference, tmp_path, monkeypatch, packed):
    # Padded batches change width every step; packed rows keep theirs, but what they hold changes;
    # in both the number of targets changes every micro-batch. Compiled (the default on CUDA), the
    # model must settle, not recompile per batch until torch's limit and fall back to eager.
    # Dynamo alone (backend "eager") makes the same guards and recompiles as on a GPU, without
    # generating code.
    layout = ["data.packed=true"] if packed else []
    eager = tmp_path / "eager"
    if packed:
        assert train.main(cpt_args(assets, eager, *layout)) == 0
    else:
        eager = reference
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend="eager"))
    torch._dynamo.reset()
    run_dir = tmp_path / "compiled"
    with torch._dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
        assert train.main(cpt_args(assets, run_dir, "model.compile=true", *layout)) == 0
    torch._dynamo.reset()
    assert losses(run_dir).keys() == losses(eager).keys()
    assert losses(run_dir) == pytest.approx(losses(eager), rel=1e-4)
    assert losses(run_dir, "dev_loss") == pytest.approx(losses(eager, "dev_loss"), rel=1e-4)


def test_checkpoint_loads_in_transformers_with_the_same_logits(reference):
    from transformers import LlamaForCausalLM

    ckpt = checkpoint(reference, MAX_STEPS)
    tokens = torch.tensor([[366, 5, 40, 300, 363, 364, 365, 120, 7, 367], [366, 301, 330, 331, 9, 9, 2, 0, 621, 1]])
    ours = load_model(ckpt, dtype=torch.float32).eval()
    hf, info = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    with torch.no_grad():
        expected = ours.logits(ours(tokens))
        got = hf.eval()(tokens).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


# -- exact resume ------------------------------------------------------------------------------


def test_resume_auto_continues_with_identical_losses(assets, reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    for step in (8, 12):
        shutil.rmtree(checkpoint(run_dir, step))
    assert train.main(cpt_args(assets, run_dir, "resume=auto")) == 0
    assert f"resuming from {checkpoint(run_dir, 4)}" in capsys.readouterr().out
    # metrics.jsonl lost the old lines after step 4 and got the resumed run's: the same values
    assert losses(run_dir) == losses(reference)
    assert losses(run_dir, "dev_loss") == losses(reference, "dev_loss")
    assert last_totals(run_dir) == last_totals(reference)
    assert step_dirs(run_dir) == step_dirs(reference)
    assert_same_weights(checkpoint(run_dir, 12), checkpoint(reference, 12))


def test_resume_from_a_checkpoint_path_into_a_new_run_dir(assets, reference, tmp_path):
    run_dir = tmp_path / "branch"
    assert train.main(cpt_args(assets, run_dir, f"resume={checkpoint(reference, 4)}")) == 0
    assert losses(run_dir) == {s: v for s, v in losses(reference).items() if s > 4}
    assert last_totals(run_dir) == last_totals(reference)
    assert_same_weights(checkpoint(run_dir, 12), checkpoint(reference, 12))


def test_resume_auto_skips_incomplete_checkpoints(assets, reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (checkpoint(run_dir, 8) / train.STATE_FILE).unlink()  # a step_N without its training state
    partial = checkpoint(run_dir, 12).with_name(".tmp-step_0000012")  # a save cut short
    checkpoint(run_dir, 12).rename(partial)
    (partial / train.STATE_FILE).unlink()
    (partial / "model.safetensors").write_bytes(b"cut short")

    assert train.main(cpt_args(assets, run_dir, "resume=auto")) == 0
    assert f"resuming from {checkpoint(run_dir, 4)}" in capsys.readouterr().out
    assert losses(run_dir) == losses(reference)
    assert step_dirs(run_dir) == step_dirs(reference)
    assert (checkpoint(run_dir, 8) / train.STATE_FILE).is_file()
    assert not partial.exists()
    assert_same_weights(checkpoint(run_dir, 12), checkpoint(reference, 12))


def kill_during_checkpoints(args: list[str], run_dir: Path) -> int:
    """Start a run saving every step; SIGKILL it after two checkpoints, preferably while it writes a third."""
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=SUBPROCESS_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(run_dir.glob("checkpoints/step_*"))) < 2 and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoints appeared"
            time.sleep(0.002)
        writing_deadline = time.monotonic() + 1
        while not list(run_dir.glob("checkpoints/.tmp-*")) and time.monotonic() < writing_deadline:
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigkill_leaves_loadable_checkpoints_and_resume_matches(assets, reference, tmp_path, capsys):
    run_dir = tmp_path / "killed"
    args = cpt_args(assets, run_dir, "train.save_steps=1")
    assert kill_during_checkpoints(args, run_dir) == -signal.SIGKILL, "the run ended before it was killed"

    saved = step_dirs(run_dir)
    assert len(saved) >= 2 and int(saved[-1].split("_")[1]) < MAX_STEPS
    for name in saved:  # every complete checkpoint is whole
        ckpt = run_dir / "checkpoints" / name
        with safe_open(ckpt / "model.safetensors", framework="pt") as f:
            assert all(f.get_tensor(k).isfinite().all() for k in f.keys())
        assert train.read_training_state(ckpt)["step"] == int(name.split("_")[1])

    assert train.main(args + ["resume=auto"]) == 0
    assert f"resuming from {run_dir / 'checkpoints' / saved[-1]}" in capsys.readouterr().out  # not a .tmp-
    assert losses(run_dir) == losses(reference)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert_same_weights(checkpoint(run_dir, MAX_STEPS), checkpoint(reference, MAX_STEPS))


# -- two processes -----------------------------------------------------------------------------


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_match_one_with_twice_the_batch(assets, tmp_path, fsdp):
    # 5 dev rows in batches of 2 over 2 ranks: the ranks have different numbers of dev batches
    dev = tiny.write_jsonl(tmp_path / "dev5.jsonl", tiny.rows(5, seed=4, prefix="dev"))
    common = ["train.max_steps=4", "train.eval_steps=2", f"data.dev={dev}"]
    two, one = tmp_path / "two", tmp_path / "one"
    command = [*tiny.TORCHRUN_TWO, "train.py",
               *cpt_args(assets, two, *common, "train.batch_size=2", f"model.fsdp={json.dumps(fsdp)}")]
    done = subprocess.run(command, cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert train.main(cpt_args(assets, one, *common, "train.batch_size=4")) == 0

    for key in ("loss", "dev_loss"):
        got, expected = losses(two, key), losses(one, key)
        assert got.keys() == expected.keys()
        assert all(got[s] == pytest.approx(expected[s], rel=1e-5) for s in got), (got, expected)
    assert last_totals(two) == last_totals(one)
    assert step_dirs(two) == step_dirs(one) == ["step_0000004"]
    w2, w1 = weights(checkpoint(two, 4)), weights(checkpoint(one, 4))
    assert w2.keys() == w1.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=1e-5, rtol=1e-4)


# -- refusals ----------------------------------------------------------------------------------


def refused(args: list[str], capsys, *words: str) -> None:
    assert train.main(args) == 2
    message = capsys.readouterr().err
    for word in words:
        assert word in message, message


def test_refuses_unknown_key_in_the_file(assets, tmp_path, capsys):
    config = json.loads((CONFIGS / "tiny_cpt.json").read_text())
    config["optim"]["learning_rate"] = 0.1
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    refused(cpt_args(assets, tmp_path / "run", config=path), capsys, str(path), "optim.learning_rate")
    assert not (tmp_path / "run").exists()


def test_refuses_unknown_key_in_an_override(assets, tmp_path, capsys):
    refused(cpt_args(assets, tmp_path / "run", "train.batchsize=2"), capsys, "train.batchsize")
    assert not (tmp_path / "run").exists()


def test_refuses_a_missing_required_key(assets, tmp_path, capsys):
    args = [a for a in cpt_args(assets, tmp_path / "run") if not a.startswith("data.train=")]
    refused(args, capsys, "data.train")
    assert not (tmp_path / "run").exists()


def test_refuses_a_missing_data_file(assets, tmp_path, capsys):
    missing = tmp_path / "nowhere.jsonl"
    refused(cpt_args(assets, tmp_path / "run", f"data.train={missing}"), capsys, str(missing))
    assert not (tmp_path / "run").exists()


def test_refuses_n_dsus_that_the_model_does_not_have(assets, tmp_path, capsys):
    refused(cpt_args(assets, tmp_path / "run", "data.n_dsus=32"), capsys, "64 DSUs", "data.n_dsus is 32")
    assert not (tmp_path / "run").exists()


def test_n_dsus_and_modality_tokens_are_read_from_the_model(assets, tmp_path, reference):
    args = [a for a in cpt_args(assets, tmp_path / "run", "train.max_steps=2", "train.save_steps=2")
            if not a.startswith("data.n_dsus=")]
    assert train.main(args) == 0
    saved = json.loads((checkpoint(tmp_path / "run", 2) / "training_config.json").read_text())["data"]
    assert saved["n_dsus"] == tiny.N_DSUS and saved["modality_tokens"] is True  # the tiny model has them
    # the same losses as the reference run, which gave n_dsus
    assert losses(tmp_path / "run", "loss") == {s: v for s, v in losses(reference, "loss").items() if s <= 2}


def test_refuses_a_dsu_outside_the_vocabulary(assets, tmp_path, capsys):
    rows = tiny.rows(16, seed=5, prefix="bad")
    rows[9]["speech_tokens"][3] = tiny.N_DSUS
    data = tiny.write_jsonl(tmp_path / "bad.jsonl", rows)
    refused(cpt_args(assets, tmp_path / "run", f"data.train={data}"), capsys, str(data), "speech_tokens", "DSU 64")
    assert not (tmp_path / "run").exists()


def test_refuses_a_bad_dev_set_after_caching_the_train_set_and_leaves_nothing(assets, tmp_path, capsys):
    rows = tiny.rows(4, seed=6, prefix="dev")
    rows[2]["aligned_token_end_time"] = rows[2]["aligned_token_end_time"][:-1]
    dev = tiny.write_jsonl(tmp_path / "dev.jsonl", rows)
    refused(cpt_args(assets, tmp_path / "run", f"data.dev={dev}"), capsys, f"{dev}:3", "aligned_token_end_time")
    assert not (tmp_path / "run").exists()


def test_refuses_a_resume_with_another_batch_size_unless_forced(assets, reference, tmp_path, capsys):
    resume = f"resume={checkpoint(reference, 8)}"
    refused(cpt_args(assets, tmp_path / "run", resume, "train.batch_size=2"), capsys, "batch_size", "resume_force")
    assert not (tmp_path / "run").exists()
    assert train.main(cpt_args(assets, tmp_path / "run", resume, "train.batch_size=2", "resume_force=true")) == 0
    assert sorted(losses(tmp_path / "run")) == list(range(9, MAX_STEPS + 1))


def test_refuses_a_run_dir_with_checkpoints_without_resume(assets, reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    refused(cpt_args(assets, run_dir), capsys, str(run_dir), "resume=auto")
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


# -- damaged checkpoints, non-finite losses, data that does not fit ---------------------------------


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGES = {
    "truncated_weights": (lambda ckpt: truncate(ckpt / "model.safetensors"), "model.safetensors: truncated"),
    "weights_header_cut": (lambda ckpt: truncate(ckpt / "model.safetensors", 0.00001), "model.safetensors"),
    "truncated_state": (lambda ckpt: truncate(ckpt / train.STATE_FILE), f"{train.STATE_FILE} is truncated"),
    "missing_config": (lambda ckpt: (ckpt / "config.json").unlink(), "config.json is missing"),
    "missing_tokenizer": (lambda ckpt: (ckpt / "original" / "tokenizer.model").unlink(),
                          "original/tokenizer.model is missing"),
}


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_resume_auto_passes_over_a_damaged_checkpoint_and_says_why(assets, reference, tmp_path, capsys, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    harm, reason = DAMAGES[damage]
    harm(checkpoint(run_dir, 12))
    assert train.main(cpt_args(assets, run_dir, "resume=auto")) == 0
    out, err = capsys.readouterr()
    assert f"resume=auto: skipping {checkpoint(run_dir, 12)}: " in err and reason in err, err
    assert f"resuming from {checkpoint(run_dir, 8)}" in out
    assert losses(run_dir) == losses(reference)
    assert_same_weights(checkpoint(run_dir, 12), checkpoint(reference, 12))  # the damaged one is written anew


def test_resume_refuses_when_no_checkpoint_is_intact_and_changes_nothing(assets, reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    for step in (4, 8, 12):
        truncate(checkpoint(run_dir, step) / "model.safetensors")
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    refused(cpt_args(assets, run_dir, "resume=auto"), capsys, "no intact checkpoint", "resume=PATH")
    refused(cpt_args(assets, tmp_path / "new", f"resume={checkpoint(run_dir, 8)}"), capsys,
            f"{checkpoint(run_dir, 8)} cannot be resumed from", "truncated")
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
    assert not (tmp_path / "new").exists()


def test_a_non_finite_loss_stops_the_run_before_it_is_stepped_or_saved(assets, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    real_forward_loss, calls, poison_at = train.forward_loss, [], [12]

    def poisoned(model, batch, device):  # step 6's second micro-batch (2 per step) goes NaN
        loss_sum, count = real_forward_loss(model, batch, device)
        if model.training:
            calls.append(None)
            if len(calls) == poison_at[0]:
                return loss_sum * float("nan"), count
        return loss_sum, count

    monkeypatch.setattr(train, "forward_loss", poisoned)
    assert train.main(cpt_args(assets, run_dir)) == 1
    err = capsys.readouterr().err
    for words in ("step 6: loss nan", "micro-batch (2 of 2 on rank 0) starts with row", "of epoch 0 (id 'train",
                  f"The newest checkpoint is {checkpoint(run_dir, 4)}", "resume=auto", "train.skip_nonfinite=true"):
        assert words in err, err
    assert step_dirs(run_dir) == ["step_0000004"]
    assert sorted(losses(run_dir)) == [1, 2, 3, 4, 5]

    calls.clear()
    poison_at[0] = 4  # resumed after step 4: step 6's second micro-batch again
    assert train.main(cpt_args(assets, run_dir, "resume=auto", "train.skip_nonfinite=true")) == 0
    printed = "".join(capsys.readouterr())
    assert "step 6: loss nan" in printed and "update skipped (train.skip_nonfinite)" in printed
    skipped = [r["step"] for r in records(run_dir) if "skipped" in r]
    assert skipped == [6] and sorted(losses(run_dir)) == [s for s in range(1, MAX_STEPS + 1) if s != 6]
    state = train.read_training_state(checkpoint(run_dir, MAX_STEPS))
    assert all(torch.isfinite(w).all() for w in weights(checkpoint(run_dir, MAX_STEPS)).values())
    assert state["step"] == MAX_STEPS


def test_refuses_word_times_beyond_the_speech_tokens(assets, tmp_path, capsys):
    rows = tiny.rows(16, seed=7, prefix="late")
    rows[5]["aligned_token_end_time"][-1] = 999.0  # an 18 s word in a short utterance
    data = tiny.write_jsonl(tmp_path / "late.jsonl", rows)
    refused(cpt_args(assets, tmp_path / "run", f"data.train={data}"), capsys, f"{data}:6", "aligned_token_end_time",
            f"word {len(rows[5]['tokenized']) - 1} ({rows[5]['tokenized'][-1]!r}) ends at 999.0 s")
    assert not (tmp_path / "run").exists()
    # concatenated CPT and SFT do not use word times: the same rows train
    ok = cpt_args(assets, tmp_path / "sft", f"data.train={data}", "data.task=sft", "train.max_steps=1")
    assert train.main(ok) == 0


def test_a_refused_run_leaves_an_existing_run_dir_as_it_was(assets, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine\n")
    rows = tiny.rows(4, seed=6, prefix="dev")
    rows[1]["speech_tokens"] = "not a list"
    dev = tiny.write_jsonl(tmp_path / "dev.jsonl", rows)
    refused(cpt_args(assets, run_dir, f"data.dev={dev}"), capsys, f"{dev}:2", "speech_tokens")
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]  # no data_cache, no train store


# -- resume refuses settings that change token ids; checkpoints and files that are not what they seem --


def unchanged(run_dir: Path):
    """A snapshot of every path under `run_dir` with its modification time."""
    return {p: p.lstat().st_mtime_ns for p in run_dir.rglob("*")}


def swap_two_ranks(tokenizer_file: Path) -> None:
    """Another valid tokenizer of the same size and DSUs: the tokens of ranks 100 and 101 traded."""
    lines = tokenizer_file.read_bytes().splitlines(keepends=True)
    (a, _), (b, _) = lines[100].split(), lines[101].split()
    lines[100], lines[101] = b + b" 100\n", a + b" 101\n"
    tokenizer_file.write_bytes(b"".join(lines))


ID_CHANGES = {  # override: (what the checkpoint has, what this run has)
    "data.deduplicate=false": ("data.deduplicate true", "data.deduplicate false"),
    "data.modality_tokens=false": ("data.modality_tokens true", "data.modality_tokens false"),
    "data.max_seq_len=96": ("data.max_seq_len 128", "data.max_seq_len 96"),
    "data.cpt.sequence_type=concatenated_dsu_txt": ('data.cpt.sequence_type "interleaved"',
                                                   'data.cpt.sequence_type "concatenated_dsu_txt"'),
    "data.cpt.binom_prob=0.2": ("data.cpt.binom_prob 0.1", "data.cpt.binom_prob 0.2"),
    "data.task=sft": ('data.task "cpt"', 'data.task "sft"'),
}


@pytest.mark.parametrize("change", ID_CHANGES)
def test_resume_auto_refuses_settings_that_change_token_ids(assets, reference, tmp_path, capsys, change):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    before = unchanged(run_dir)
    then, now = ID_CHANGES[change]
    ckpt = checkpoint(run_dir, MAX_STEPS)
    refused(cpt_args(assets, run_dir, "resume=auto", change), capsys, f"was trained with {then}",
            f"this run has {now}", f"model.path={ckpt} run_dir=<a new directory>")
    assert unchanged(run_dir) == before


def test_resume_refuses_a_checkpoint_whose_training_config_was_edited(assets, reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    saved = checkpoint(run_dir, MAX_STEPS) / "training_config.json"
    edited = json.loads(saved.read_text())
    edited["data"]["n_dsus"] = 32
    saved.write_text(json.dumps(edited))
    before = unchanged(run_dir)
    refused(cpt_args(assets, run_dir, "resume=auto"), capsys, f"was trained with data.n_dsus 32 (per {saved})",
            "this run has data.n_dsus 64")
    assert unchanged(run_dir) == before


@pytest.mark.parametrize("where", ["model_path", "checkpoint"])
def test_resume_refuses_another_tokenizer_file(assets, reference, tmp_path, capsys, where):
    run_dir, model = tmp_path / "run", assets.model
    shutil.copytree(reference, run_dir)
    if where == "model_path":  # the run's model directory got another extension's tokenizer
        model = shutil.copytree(assets.model, tmp_path / "model")
        swap_two_ranks(model / "original" / "tokenizer.model")
        source = checkpoint(run_dir, MAX_STEPS) / train.STATE_FILE
    else:  # the checkpoint's own copy was replaced
        swap_two_ranks(checkpoint(run_dir, MAX_STEPS) / "original" / "tokenizer.model")
        source = checkpoint(run_dir, MAX_STEPS) / "original"
    args = [a if not a.startswith("model.path=") else f"model.path={model}" for a in cpt_args(assets, run_dir)]
    refused(args + ["resume=auto"], capsys, "was trained with tokenizer.sha256 ", f"(per {source})",
            "this run has tokenizer.sha256 ")


def test_the_settings_are_recorded_in_the_training_state(assets, reference):
    settings = train.read_training_state(checkpoint(reference, 4))["settings"]
    tokenizer = (assets.model / "original" / "tokenizer.model").read_bytes()
    assert settings["tokenizer.sha256"] == hashlib.sha256(tokenizer).hexdigest()
    assert settings["tokenizer.speech_bpe"] is None
    assert settings["data.n_dsus"] == tiny.N_DSUS and settings["data.deduplicate"] is True
    assert settings["data.task"] == "cpt" and settings["data.max_seq_len"] == 128
    assert settings["data.sft.system_prompt"] == config.DEFAULT_SYSTEM_PROMPT


def without_settings_record(ckpt: Path) -> None:
    """The training state as checkpoints saved before the settings record had it."""
    state = train.read_training_state(ckpt)
    del state["settings"]
    torch.save(state, ckpt / train.STATE_FILE)


def test_an_older_checkpoint_is_compared_through_its_training_config_and_tokenizer_copy(assets, reference, tmp_path,
                                                                                         capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    ckpt = checkpoint(run_dir, MAX_STEPS)
    without_settings_record(ckpt)
    refused(cpt_args(assets, run_dir, "resume=auto", "data.deduplicate=false"), capsys,
            f"data.deduplicate true (per {ckpt / 'training_config.json'})", "this run has data.deduplicate false")
    model = shutil.copytree(assets.model, tmp_path / "model")
    swap_two_ranks(model / "original" / "tokenizer.model")
    args = [a if not a.startswith("model.path=") else f"model.path={model}" for a in cpt_args(assets, run_dir)]
    refused(args + ["resume=auto"], capsys, f"(per {ckpt / 'original'})", "tokenizer.sha256")
    assert train.main(cpt_args(assets, run_dir, "resume=auto")) == 0  # the same settings: it resumes, saying how
    assert "has no record of the settings" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["checkpoints_loop", "step_loop", "checkpoints_file"])
def test_a_checkpoints_path_that_is_not_a_directory_is_refused_up_front(assets, tmp_path, capsys, what):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").parent.mkdir()
    if what == "checkpoints_loop":
        (run_dir / "checkpoints").symlink_to(run_dir / "checkpoints")
        bad = run_dir / "checkpoints"
    elif what == "step_loop":
        (run_dir / "checkpoints").mkdir()
        bad = run_dir / "checkpoints" / "step_0000004"
        bad.symlink_to(bad)
    else:
        (run_dir / "checkpoints").write_text("")
        bad = run_dir / "checkpoints"
    kind = "a regular file" if what == "checkpoints_file" else "a symlink loop"
    for resume in ([], ["resume=auto"]):
        refused(cpt_args(assets, run_dir, *resume), capsys, f"{bad} is {kind}", "checkpoints")
        assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints"]  # no data cache, no metrics


def test_a_fifo_in_the_newest_checkpoint_is_passed_over_without_blocking(assets, reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (checkpoint(run_dir, 12) / train.STATE_FILE).unlink()
    os.mkfifo(checkpoint(run_dir, 12) / train.STATE_FILE)
    (checkpoint(run_dir, 8) / "model.safetensors").unlink()
    os.mkfifo(checkpoint(run_dir, 8) / "model.safetensors")
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("blocked on a FIFO"))
    signal.alarm(120)
    try:
        assert train.main(cpt_args(assets, run_dir, "resume=auto")) == 0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out, err = capsys.readouterr()
    assert f"{checkpoint(run_dir, 12) / train.STATE_FILE}: is a FIFO" in err, err
    assert f"{checkpoint(run_dir, 8) / 'model.safetensors'}: is a FIFO" in err, err
    assert f"resuming from {checkpoint(run_dir, 4)}" in out
    assert losses(run_dir) == losses(reference)


def test_metrics_cut_short_by_a_kill_resume_and_a_damaged_line_is_refused(assets, reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(checkpoint(run_dir, 12))
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n")
    before = unchanged(run_dir)
    refused(cpt_args(assets, run_dir, "resume=auto"), capsys, f"{metrics}:4: not a metrics record")
    assert unchanged(run_dir) == before
    metrics.write_text("\n".join(lines) + '\n{"step": 1')  # the last line cut short
    assert train.main(cpt_args(assets, run_dir, "resume=auto")) == 0
    assert losses(run_dir) == losses(reference)


def test_refuses_a_boolean_among_the_training_dsus(assets, tmp_path, capsys):
    rows = tiny.rows(16, seed=5, prefix="bool")
    rows[6]["speech_tokens"][2] = True
    data = tmp_path / "bool.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused(cpt_args(assets, tmp_path / "run", f"data.train={data}", "data.task=sft"), capsys,
            f"{data}:7: field 'speech_tokens': position 2: true is a boolean")
    assert not (tmp_path / "run").exists()


def test_refuses_a_train_split_with_a_missing_shard(assets, tmp_path, capsys):
    shards = tmp_path / "ds" / "data"
    shards.mkdir(parents=True)
    rows = tiny.rows(64, seed=2, prefix="train")
    tiny.write_jsonl(shards / "train-00000-of-00002.jsonl", rows[:32])
    tiny.write_jsonl(shards / "validation-00000-of-00001.jsonl", rows[32:40])
    refused(cpt_args(assets, tmp_path / "run", f"data.train={tmp_path / 'ds'}", f"data.dev={tmp_path / 'ds'}"), capsys,
            "incomplete split", "missing train-00001-of-00002.jsonl")
    assert not (tmp_path / "run").exists()


def test_a_failed_loss_plot_leaves_the_previous_one_and_no_partial_file(tmp_path, monkeypatch):
    import matplotlib.figure

    metrics, png = tmp_path / train.METRICS, tmp_path / "losses.png"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5, "dev_loss": 1.7}\n')
    train.plot_losses(metrics, png)
    previous = png.read_bytes()
    assert previous.startswith(b"\x89PNG")

    def savefig_cut_short(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig_cut_short)
    with pytest.raises(OSError, match="disk full"):
        train.plot_losses(metrics, png)
    assert png.read_bytes() == previous and sorted(p.name for p in tmp_path.iterdir()) == ["losses.png", "metrics.jsonl"]


def test_the_resume_rewrite_of_the_metrics_is_atomic(tmp_path, monkeypatch):
    metrics = tmp_path / train.METRICS
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.2}\n')
    kept = train.kept_metrics(tmp_path, 2)
    cfg = {"wandb": {"project": ""}}
    real_write_text = Path.write_text

    def write_cut_short(self, text, *args, **kwargs):
        real_write_text(self, text[:5], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", write_cut_short)
    with pytest.raises(OSError, match="disk full"):
        train.MetricsLog(tmp_path, kept, cfg, enabled=True)
    monkeypatch.undo()
    assert len(metrics.read_text().splitlines()) == 3 and os.listdir(tmp_path) == [train.METRICS]
    log = train.MetricsLog(tmp_path, kept, cfg, enabled=True)
    log.write({"step": 3, "loss": 1.0})
    log.file.close()
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]

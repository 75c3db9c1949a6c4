"""The reference's training stack on train.py's padded batches: real tokens per second (bench/gpu.sh, step 6).

The reference (speech-integration, https://github.com/anilkeshwani/speech-integration) trains with
torchtune 0.6.1. This runs its stack, called from the torchtune wheel that gpu.sh installs into a
private target directory (PYTHONPATH for this step only):

- the model: `torchtune.models.llama3_2.llama3_2` with Llama-3.2-1B's parameters and the vocabulary
  extended as the trained model's (ssi/llama_configs.py `configllama3_2_1b`, whose `vocab_size` adds
  the DSUs and modality tokens), built in the model dtype on the device (ssi/model.py
  `setup_llama3_2_1b`), holding the same weights as train.py's runs (converted by torchtune's own
  `convert_weights.hf_to_tune`, as its Hugging Face checkpointer does);
- no torch.compile and no activation checkpointing: conf/common.yaml sets `compile: false`, and
  ssi/model.py compiles only when it is true and never enables activation checkpointing;
- the loss: `torchtune.modules.loss.CEWithChunkedOutputLoss` with its default 8 chunks and
  `model.set_num_output_chunks` (ssi/trainer.py `_setup_loss`);
- the optimizer: `torch.optim.AdamW` with conf/training.yaml's settings (lr 2e-4, betas (0.9, 0.999),
  eps 1e-8, weight decay 0.01, fused), torchtune's cosine schedule with 1000 warm-up steps;
- the step (ssi/trainer.py `_train_step` and `_optimizer_step`): per micro-batch, forward, the mean
  loss times the micro-batch's target count, backward, and the host reads the reference makes (the
  target count, the loss, the token-type counts); every `grad_accum` micro-batches, the gradients
  scaled by 1 / the step's targets (`torchtune.training.scale_grads`), no clipping (`clip_grad_norm: null`),
  an optimizer and scheduler step.

The batches are train.py's padded ones (`data.batches.step_micro_batches` with the same config: batches
of 2, accumulation 4, the same seed and order), made before timing: the reference's own data pipeline
(tokenising each sample's strings) is not timed, which can only favour it. Tokens/s counts real
(non-pad) input tokens, as train.py's metrics do.

Hugging Face `datasets`: torchtune's package imports it at the top (`torchtune.datasets`,
`torchtune.data`) for dataset builders this run never calls. Where it is not installed (or does not
import), a stand-in module written into the work directory provides the two names torchtune imports,
each raising if called; no other part of torchtune is replaced.
"""

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

STANDIN_RAISES = ("    raise RuntimeError('Hugging Face datasets is not installed: this is the stand-in of "
                  "bench/reference_stack.py')\n")
DATASETS_STANDIN = {
    "__init__.py": ('"""Stand-in for Hugging Face datasets (bench/reference_stack.py): torchtune imports these names '
                    'at\nimport time; the reference-stack check never loads a dataset through them."""\n\n\n'
                    "def load_dataset(*args, **kwargs):\n" + STANDIN_RAISES),
    "distributed.py": "def split_dataset_by_node(*args, **kwargs):\n" + STANDIN_RAISES,
}


def import_torchtune(work: Path):
    """torchtune's modules this run uses; with the `datasets` stand-in where the real one does not import."""
    try:
        import datasets  # noqa: F401
    except Exception as error:  # noqa: BLE001 - absent, or present but broken against this environment
        for name in [n for n in sys.modules if n == "datasets" or n.startswith("datasets.")]:
            del sys.modules[name]
        standin = work / "datasets-standin"
        (standin / "datasets").mkdir(parents=True, exist_ok=True)
        for name, text in DATASETS_STANDIN.items():
            (standin / "datasets" / name).write_text(text)
        sys.path.insert(0, str(standin))
        print(f"reference: Hugging Face datasets does not import ({type(error).__name__}: {error}); using the "
              f"stand-in in {standin} for the two names torchtune imports from it", flush=True)
    import torchtune
    from torchtune import training
    from torchtune.models.convert_weights import hf_to_tune
    from torchtune.models.llama3_2 import llama3_2
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    print(f"reference: torchtune {torchtune.__version__} from {Path(torchtune.__file__).parent}", flush=True)
    return training, hf_to_tune, llama3_2, CEWithChunkedOutputLoss


def padded_batches(work: Path, train_argv: list[str], steps: int):
    """(config, tokenizer, [each step's micro-batches of (inputs, shifted targets)]), the batches exactly as
    train.py's padded run makes them, on the CPU."""
    sys.path.insert(0, str(ROOT))
    from config import load_config
    from data.batches import load_data, step_micro_batches
    from model_dir import model_tokenizer

    cfg = load_config(train_argv[0], [a for a in train_argv[1:] if not a.startswith("run_dir=")]
                      + [f"run_dir={work / 'reference'}"])
    tok = model_tokenizer(Path(cfg["model"]["path"]), cfg["data"])
    seqs, _ = load_data(cfg["data"], work / "reference", tok)
    shape = dict(batch_size=cfg["train"]["batch_size"], grad_accum=cfg["train"]["grad_accum"], seed=cfg["seed"],
                 shuffle=cfg["data"]["shuffle"], rank=0, world=1)
    return cfg, tok, [step_micro_batches(seqs, step, **shape)[1] for step in range(steps)]


def token_type_ranges(tok) -> list[tuple[int, int]]:
    """Inclusive id ranges the reference counts per micro-batch: text, DSUs, modality, special."""
    ranges = [(0, tok.dsu_offset - 1), (tok.dsu_offset, tok.dsu_offset + tok.n_dsus - 1)]
    if tok.speech_id is not None:
        ranges.append((min(tok.speech_id, tok.text_id), max(tok.speech_id, tok.text_id)))
    return ranges + [(tok.n_file_tokens, tok.vocab_size - 1)]


def main(work: Path, train_argv: list[str], shape: dict) -> int:
    training, hf_to_tune, llama3_2, CEWithChunkedOutputLoss = import_torchtune(work)
    from model import DTYPES, ModelConfig
    from model_dir import load_state_dict

    cfg, tok, batches = padded_batches(work, train_argv, shape["steps"])
    device = torch.device("cuda" if cfg["train"]["device"] != "cpu" and torch.cuda.is_available() else "cpu")
    dtype = DTYPES[cfg["model"]["dtype"]]
    model_dir = Path(cfg["model"]["path"])
    config = ModelConfig.from_file(model_dir / "config.json")
    with training.set_default_dtype(dtype), device:
        model = llama3_2(vocab_size=config.vocab_size, num_layers=config.num_hidden_layers,
                         num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
                         embed_dim=config.hidden_size, max_seq_len=config.max_position_embeddings,
                         intermediate_dim=config.intermediate_size, attn_dropout=0.0, norm_eps=config.rms_norm_eps,
                         rope_base=int(config.rope_theta), scale_factor=int(config.rope_scaling["factor"]))
    state = hf_to_tune(load_state_dict(model_dir), num_heads=config.num_attention_heads,
                       num_kv_heads=config.num_key_value_heads, dim=config.hidden_size, head_dim=config.head_dim)
    model.load_state_dict(state)
    del state
    training.validate_expected_param_dtype(model.named_parameters(), dtype=dtype)
    model.train()
    loss_fn = CEWithChunkedOutputLoss()
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    opt = cfg["optim"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"],
                                  weight_decay=opt["weight_decay"], amsgrad=False, fused=device.type == "cuda")
    scheduler = training.get_cosine_schedule_with_warmup(optimizer, opt["warmup_steps"], cfg["train"]["max_steps"],
                                                         opt["num_cycles"])
    ranges = token_type_ranges(tok)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    durations, real_tokens, losses = [], [], []
    for micro in batches:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        targets_in_step, loss_in_step, real = 0, 0.0, 0
        for inputs, targets in micro:
            inputs, targets = inputs.to(device), targets.to(device)
            for low, high in ranges:  # ssi/trainer.py counts token types with a host read each
                ((inputs >= low) & (inputs <= high)).sum().item()
            real += int((inputs != tok.pad_id).sum().item())
            n_targets = int((targets != loss_fn.ignore_index).sum().item())
            targets_in_step += n_targets
            loss = loss_fn(model(inputs), targets) * n_targets  # targets are already shifted, as its compute_loss does
            loss.backward()
            loss_in_step += loss.item()
        training.scale_grads(model, torch.tensor(1 / targets_in_step))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        durations.append(time.perf_counter() - start)
        real_tokens.append(real)
        losses.append(loss_in_step / targets_in_step)

    warmup = shape["warmup"]
    rate = sum(real_tokens[warmup:]) / sum(durations[warmup:])
    if device.type == "cuda":
        memory, kind = torch.cuda.max_memory_allocated() / 2**30, "GPU allocated"
    else:
        import resource

        memory, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process RSS"
    from model import flops_per_token

    padded = json.loads((work / "padded.json").read_text()) if (work / "padded.json").exists() else None
    note = ""
    if padded is not None:  # same weights, same first batch: the first losses must agree (up to rounding)
        note = f"train.py padded's step-1 loss {padded['loss_step1']:.4f}"
    result = {"run": "reference", "tokens_per_s": rate, "timed_steps": len(durations) - warmup, "warmup_steps": warmup,
              "first_step_s": durations[0], "loss_step1": losses[0], "peak_memory_gib": memory,
              "peak_memory_kind": kind, "flops_per_token": flops_per_token(config, cfg["data"]["max_seq_len"]),
              "flops_seq_len": cfg["data"]["max_seq_len"], "tokens": sum(real_tokens), "device": device.type,
              "note": note}
    (work / "reference.json").write_text(json.dumps(result, indent=1))
    print(f"reference: {rate:,.0f} real tokens/s over steps {warmup + 1}..{len(durations)}, first step "
          f"{durations[0]:.1f} s, step-1 loss {losses[0]:.5f}, peak memory {memory:.2f} GiB ({kind})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit("run it through bench/gpu_check.py reference (bench/gpu.sh step 6)")

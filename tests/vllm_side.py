"""The vLLM side of tests/test_vllm.py, run in the vLLM environment: one engine for a checkpoint,
then every sampling config of a request, answered as JSON.

    .venv-vllm/bin/python tests/vllm_side.py REQUEST.json ANSWER.json

A script of its own, not part of the test module: vLLM's CPU build spawns its workers, which
re-import the main module, and the test module imports pytest, which that environment lacks.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def answer(checkpoint: str, prompts: list[list[int]], stop_ids: list[int], configs: dict) -> dict:
    from generate import Sampling, start_vllm, vllm_generate

    settings = {name: Sampling(**{**config, "stop_token_ids": tuple(config.get("stop_token_ids", ()))})
                for name, config in configs.items()}
    widest = max(settings.values(), key=lambda s: (s.n, s.max_tokens))  # sizes the engine for all of them
    llm = start_vllm(Path(checkpoint), prompts, widest, enforce_eager=True)
    return {name: [[g.token_ids, g.finish_reason] for g in
                   vllm_generate(llm, prompts, sampling, set(stop_ids) | set(sampling.stop_token_ids))]
            for name, sampling in settings.items()}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    request = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(answer(**request)))

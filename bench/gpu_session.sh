#!/usr/bin/env bash
# One call on a GPU machine, in order of what decides the next change, each step capped within what is left of
# BUDGET_S: install; 1. the CUDA-marked tests natively (correctness first); 2. the kernel-config sweeps (one-pass
# and U configs, each with its float64 error: bench/gpu_layer.py --sweep-only); 3. the Triton layer benchmark
# with the sweeps' best configs (correctness check, timings, per-kernel profile, host time: issue 3's ratios to
# the floor and to peft+opacus); 4. the 1B-Llama DP step through GraphedAccumulator (a CUDA graph) beside the
# eager one (its own process: a failed capture cannot take the others down), then what a replay of each
# micro-batch size costs (--graph-sizes: the fixed cost a + c per row, i.e. GraphedAccumulator's
# replay_cost = a/c); 5. the profiled end-to-end 1B DP step; then the diagnostics, as time allows: 6. Nsight
# Compute on one layer step's kernels (bench/ncu_layer.py, where ncu exists); 7. the host cost per launch by
# path (bench/launch.py); 8. ghost norms and clipping of a Llama-7B lm_head and embedding against per-sample
# tensors (bench/ghost.py), then DP noise draws: the ChaCha20 kernel against Philox and os.urandom copied over
# (bench/chacha20.py; step 8 is opt-in: GHOST_S). When time runs short, 8, 7 and then 6 are the steps skipped
# (without ncu, step 6's time goes to the others).
#
# Logs and results go to $OUT (default bench/results/gpu_session); the console (pip, nvidia-smi, versions,
# each step's summary) is also kept there as session.log. With TAR_TO set, $OUT is packed into that archive
# after every step, every PACK_EVERY_S seconds (default 30) and when the script is stopped (TERM/INT): a kill
# at any point keeps what was done. The one-call command on a lent machine (carry .whl; run timeout 600 s):
#
#   R=$OUT; export OUT=/tmp/gs TAR_TO=$R/gs.tgz; timeout -k 5 580 bash bench/gpu_session.sh
#
# Per-step caps (seconds; a cap of 0 skips that step) and the whole budget (seconds from the start), defaults:
#   TEST_S=165 SWEEP_S=85 LAYER_S=130 GRAPH_S=70 STEP_S=45 NCU_S=30 LAUNCH_S=15 GHOST_S=0 BUDGET_S=570
# (540 s of steps + ~20 s of install and versions + a 5 s margin, inside the outer 580 s; step 8 is opt-in).
# A step may also take what earlier steps left unused beyond the caps of the steps after it, never more than
# what is left.
# Other knobs: TEST_FILES, TEST_K (pytest -k), TEST_WORKERS, TEST_TIMEOUT_S, SWEEP_ARGS, LAYER_ARGS, GRAPH_VARIANTS, GRAPH_SIZES,
# STEP_VARIANTS, STEP_ARGS, NCU_ARGS, LAUNCH_ARGS, LAUNCH_4K_ARGS (empty or blank: no 4k-token launch.py run), PYTHON.
#
# Wheels in .whl/ (e.g. opacus, when the machine cannot reach PyPI) are installed to /tmp/site first.
# The package is installed without its native CPU extension (FEDLORA_FAST_NO_NATIVE=1): nothing here uses it.
set -uo pipefail
START=$(date +%s)
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results/gpu_session}
# a machine may keep /tmp from an earlier session (2026-11-27: a fresh H100 machine's /tmp/gs held the night
# session's test logs): files this run did not write must not be packed with its results, so move them aside
if [ -d "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
    OLD=$(mktemp -d "${OUT%/}.old.XXXXXX") && mv "$OUT" "$OLD/" && echo "# $OUT held earlier files: moved to $OLD"
fi
mkdir -p "$OUT"
# the console from here on is also in $OUT/session.log (tee ignores an outer timeout's TERM: it keeps the
# last lines and ends when the script does)
exec > >(trap '' TERM INT; exec tee -a "$OUT/session.log") 2>&1
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-570}
MARGIN_S=${MARGIN_S:-5}     # left at the end for the last pack
TAR_TO=${TAR_TO:-}
PACK_EVERY_S=${PACK_EVERY_S:-30}

pack() {  # $OUT into $TAR_TO, atomically: a kill during the tar leaves the previous archive whole
    [ -n "$TAR_TO" ] || return 0
    local tmp="$TAR_TO.${1:-part}"
    tar --warning=no-file-changed --exclude="./$(basename "$TAR_TO")*" -czf "$tmp" -C "$OUT" . 2>/dev/null
    (( $? <= 1 )) && mv -f "$tmp" "$TAR_TO"  # 1: a log grew while read (still a whole archive)
}
TICK=
if [ -n "$TAR_TO" ] && (( PACK_EVERY_S > 0 )); then
    (trap - TERM INT; while sleep "$PACK_EVERY_S"; do pack tick; done) >/dev/null 2>&1 &
    TICK=$!
fi
CUR=  # the running step's `timeout` (it passes a TERM on to the step's processes)
# shellcheck disable=SC2329  # invoked by the trap
finish() {
    [ -n "$CUR" ] && kill -TERM "$CUR" 2>/dev/null
    echo "!! stopped at +$(( $(date +%s) - START ))s (signal): packing what was done"
    [ -n "$TICK" ] && kill "$TICK" 2>/dev/null
    pack
    exit 124
}
trap finish TERM INT

CAPS=("${TEST_S:=165}" "${SWEEP_S:=85}" "${LAYER_S:=130}" "${GRAPH_S:=70}" "${STEP_S:=45}" "${NCU_S:=30}" "${LAUNCH_S:=15}"
      "${GHOST_S:=0}")
NCU=$(command -v ncu) || for f in /opt/nvidia/nsight-compute/*/ncu; do [ -x "$f" ] && NCU=$f; done  # the newest
[ -z "$NCU" ] && CAPS[5]=0  # no ncu: step 6's time goes to the others
left() { echo $(( BUDGET_S - ($(date +%s) - START) - MARGIN_S )); }
# cap I: what step I (1..8) may take: its own cap, or more where earlier steps left time unused beyond the caps
# of the steps after it; never more than what is left (so when time runs short, the last steps lose it)
cap() {
    local i=$1 l own=${CAPS[$1 - 1]} later=0 j e
    (( own <= 0 )) && { echo 0; return; }
    for (( j = i; j < ${#CAPS[@]}; j++ )); do later=$(( later + CAPS[j] )); done
    l=$(left); e=$(( l - later ))
    (( e < own )) && e=$own
    (( e > l )) && e=$l
    echo "$e"
}
# run LOG CAP CMD...: CMD under `timeout -k 5 CAP`, its output in LOG; waited for in the background, so that a
# TERM to this script is handled at once (the step stopped, the results packed), not after the step
run() {
    local log=$1 lim=$2 t0 rc; shift 2
    t0=$(date +%s)
    timeout -k 5 "$lim" "$@" >"$log" 2>&1 &
    CUR=$!
    wait "$CUR"; rc=$?
    CUR=
    echo "-- rc=$rc after $(( $(date +%s) - t0 ))s (cap ${lim}s)$( (( rc == 124 || rc == 137 )) && echo ': cut by its cap')"
    return "$rc"
}
# begin N TITLE CAP MIN: print the step's header; false (and say why) when it is to be skipped
begin() {
    echo "== $1/${#CAPS[@]} $2, ${3}s (at +$(( $(date +%s) - START ))s)"
    if (( $1 == 6 )) && [ -z "$NCU" ]; then
        echo "-- skipped: ncu neither on the PATH nor at /opt/nvidia/nsight-compute/*/ncu"; return 1
    fi
    if (( CAPS[$1 - 1] <= 0 )); then echo "-- skipped: cap 0"; return 1; fi
    if (( $3 < $4 )); then echo "-- skipped: only ${3}s left of BUDGET_S=${BUDGET_S} (needs ${4}s)"; return 1; fi
}

if compgen -G ".whl/*.whl" >/dev/null; then
    timeout -k 5 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
FEDLORA_FAST_NO_NATIVE=1 timeout -k 5 120 "$PY" -m pip install -e . --no-deps --no-build-isolation -q 2>&1 | tail -3
timeout -k 5 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv
timeout -k 5 60 "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
date -u
pack

# 1. Correct first: the CUDA-marked tests (every kernel against float64, natively), files in order of what is
# newest. -v into the log: each test's PASSED/FAILED line is there as it finishes, so a cut names what failed.
TEST_FILES=${TEST_FILES:-tests/test_layer.py tests/test_chacha20.py tests/test_dp_group.py tests/test_ghost.py tests/test_per_sample_functional.py tests/test_graphed.py \
tests/test_bench_smoke.py tests/test_kernels_triton.py tests/test_ffa_linear.py}
TESTS=()  # the files that exist (one missing path would make pytest run nothing)
for f in $TEST_FILES; do if [ -e "$f" ]; then TESTS+=("$f"); else echo "# $f does not exist: left out"; fi; done
TEST_TIMEOUT=()
if timeout -k 5 30 "$PY" -c "import pytest_timeout" 2>/dev/null; then
    TEST_TIMEOUT=(--timeout="${TEST_TIMEOUT_S:-240}")
else
    echo "# pytest-timeout not installed: no per-test timeout"
fi
TEST_WORKERS_ARGS=()
if timeout -k 5 30 "$PY" -c "import xdist" 2>/dev/null; then
    TEST_WORKERS_ARGS=(-n "${TEST_WORKERS:-14}")
else
    echo "# pytest-xdist not installed: the tests run in one process"
fi
L=$(cap 1)
if begin 1 "CUDA tests, natively (pytest -m cuda: $TEST_FILES)" "$L" 20; then
    TEST_K_ARGS=(); [ -n "${TEST_K:-}" ] && TEST_K_ARGS=(-k "$TEST_K")
    # every failure's traceback lands in test_failures.log as it happens (tests/conftest.py): a cut keeps them
    FEDLORA_FAST_FAILURE_LOG="$OUT/test_failures.log" \
    run "$OUT/tests_cuda.log" "$L" "$PY" -m pytest ${TESTS[@]+"${TESTS[@]}"} -m cuda -v ${TEST_WORKERS_ARGS[@]+"${TEST_WORKERS_ARGS[@]}"} \
        ${TEST_K_ARGS[@]+"${TEST_K_ARGS[@]}"} \
        -p no:cacheprovider -p no:benchmark -rfE --durations=15 --junitxml="$OUT/junit_cuda.xml" \
        ${TEST_TIMEOUT[@]+"${TEST_TIMEOUT[@]}"}
    echo "# $(grep -c " PASSED" "$OUT/tests_cuda.log") passed, $(grep -cE " (FAILED|ERROR) " "$OUT/tests_cuda.log") failed or errors so far; failures:"
    grep -E "\b(FAILED|ERROR)\b" "$OUT/tests_cuda.log" | head -40
    tail -n 3 "$OUT/tests_cuda.log"
    echo  # a log cut mid-line by its cap must not swallow the next step's header
fi
pack

# 2. The sweeps: the U pass depends on `in`, the one-pass backward on `out`: 4096x11008 and 11008x4096 cover
# both sizes for each.
L=$(cap 2)
rm -f "$OUT/sweep.json"  # step 3 applies this call's sweep only: never one a warm machine kept from an earlier call
if begin 2 "kernel-config sweeps (bench/gpu_layer.py --sweep-only)" "$L" 20; then
    # shellcheck disable=SC2086
    run "$OUT/sweep.log" "$L" "$PY" bench/gpu_layer.py --sweep-only --json "$OUT/sweep.json" \
        ${SWEEP_ARGS:---shapes 4096x11008,11008x4096 --tokens 8x2048}
    tail -n 110 "$OUT/sweep.log"  # two shapes: ~35 outer, 2 x 12 U and 2 x 19 merge lines
fi
pack

# steps 3 and 6 take step 2's fastest configs that held 1e-6 (ACCURACY_BOUND; the default configs' numbers: the
# H200 run of 2026-11-26). The layer bench's 8x2048 rows (GPU-bound: what the kernels decide) come first.
BLOCKS=(); [ -s "$OUT/sweep.json" ] && BLOCKS=(--blocks-from "$OUT/sweep.json")
# the default path, the kept merged weight (FEDLORA_FAST_KEEP_MERGED=1, opt-in) and the cached one (=cache: the
# micro-batches of one logical batch) beside it, each eager and from a CUDA graph, per-layer clipping and the peer
# (the pinned paths, [merged] included: on request, LAYER_ARGS)
LAYER_VARIANTS="floor,ffa_flat[auto],ffa_flat[keep],ffa_flat[cache],ffa_flat[graph],ffa_flat[graph_keep],ffa_flat[graph_cache],ffa_per_layer,peft_opacus"
L=$(cap 3)
if begin 3 "Triton layer benchmark with the sweeps' best configs (bench/gpu_layer.py --blocks-from)" "$L" 30; then
    # shellcheck disable=SC2086
    run "$OUT/gpu_layer.log" "$L" "$PY" bench/gpu_layer.py --profile --host --json "$OUT/gpu_layer.json" \
        ${BLOCKS[@]+"${BLOCKS[@]}"} ${LAYER_ARGS:---tokens 8x2048,8x512 --variants "$LAYER_VARIANTS"}
    grep -E "^n=|^# |failed" "$OUT/gpu_layer.log" | cut -c1-600 | head -60
fi
pack

L=$(cap 4)
if begin 4 "the 1B DP step replayed from a CUDA graph (ffa_dp_flat_graph: GraphedAccumulator; own process)" "$L" 20; then
    run "$OUT/step_graph.log" "$L" "$PY" bench/step.py --device cuda --no-mem --json "$OUT/step_graph.json" \
        --variants "${GRAPH_VARIANTS:-floor,ffa_dp_flat,ffa_dp_flat_graph,peft_opacus}" --graph-sizes "${GRAPH_SIZES:-8,4,2,1}"
    grep -v '^# round' "$OUT/step_graph.log" | tail -n 14
fi
pack

L=$(cap 5)
if begin 5 "end-to-end DP step (bench/step.py, random Llama 1B, bf16, profiled)" "$L" 30; then
    # shellcheck disable=SC2086
    run "$OUT/step.log" "$L" "$PY" bench/step.py --device cuda --no-mem --json "$OUT/step.json" --profile "$OUT/step_profile" \
        --variants "${STEP_VARIANTS:-floor,ffa_nodp,ffa_dp_flat,ffa_dp_flat@torch,ffa_dp_per_layer,peft_lora,peft_opacus}" ${STEP_ARGS:-}
    tail -n 25 "$OUT/step.log"
fi
pack

L=$(cap 6)
if begin 6 "Nsight Compute on one layer step's kernels (bench/ncu_layer.py; ${NCU:-no ncu})" "$L" 20; then
    # shellcheck disable=SC2086
    run "$OUT/ncu_layer.log" "$L" "$NCU" --nvtx --nvtx-include "profile/" --section SpeedOfLight \
        --section ComputeWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats \
        --section MemoryWorkloadAnalysis "$PY" bench/ncu_layer.py ${BLOCKS[@]+"${BLOCKS[@]}"} ${NCU_ARGS:-}
    grep -E "^  [_a-z].*\(|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Issue Slots Busy|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Stall|^    ---|==ERROR==|==WARNING==" \
        "$OUT/ncu_layer.log" | head -80
fi
pack

# unless LAUNCH_ARGS is set (even empty): where the ffa_flat and DP steps' host time goes, function by function
LAUNCH_PROFILE="--profile layer_step_ps,layer_step_ps_direct,layer_step_dp --profile-calls 200"
LAUNCH_4K_DEFAULT="--shape 8,512,4096,4096,16 --layer-gemm auto --calls 30 --rounds 5 --profile layer_step_ps,layer_step_ps_direct --profile-calls 40"
L=$(cap 7)
if begin 7 "host cost per launch, by path (bench/launch.py)" "$L" 10; then
    # shellcheck disable=SC2086
    run "$OUT/launch.log" "$L" "$PY" bench/launch.py --json "$OUT/launch.json" ${LAUNCH_ARGS-$LAUNCH_PROFILE}
    cat "$OUT/launch.log"
    # then, as time allows, the same at the 4k-token Llama-7B 4096^2 layer with "auto", the GEMM users run: the
    # eager 4k rows of the layer bench are host-bound, and this profile says where that host time goes
    L=$(( $(left) - 1 ))
    A4K=${LAUNCH_4K_ARGS-$LAUNCH_4K_DEFAULT}
    if [ -n "${A4K// /}" ] && (( L >= 25 )); then
        # shellcheck disable=SC2086
        run "$OUT/launch_4k.log" "$L" "$PY" bench/launch.py --json "$OUT/launch_4k.json" $A4K
        cat "$OUT/launch_4k.log"
    fi
fi

L=$(cap 8)
if begin 8 "ghost norms and clipping of a trained lm_head and embedding vs per-sample tensors (bench/ghost.py); DP noise draws (bench/chacha20.py)" "$L" 10; then
    run "$OUT/ghost.log" "$(( L > 20 ? L - 10 : L ))" "$PY" bench/ghost.py --device cuda --out "$OUT/ghost.json"
    cat "$OUT/ghost.log"
    L=$(( $(left) - 1 ))
    if (( L >= 5 )); then
        run "$OUT/chacha20.log" "$L" "$PY" bench/chacha20.py --device cuda --out "$OUT/chacha20.json"
        cat "$OUT/chacha20.log"
    fi
fi
pack

echo "== done at +$(( $(date +%s) - START ))s of BUDGET_S=${BUDGET_S}; $(date -u)"
[ -n "$TICK" ] && kill "$TICK" 2>/dev/null
pack
exit 0

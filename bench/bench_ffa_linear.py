"""Microbenchmarks of the ffa_linear ops on every backend available here (pytest-benchmark), plus a script mode.

Follows the Liger-Kernel / Triton-tutorial bench layout: one harness, every backend at the same shapes,
the PyTorch reference (``fedlora_fast.reference``) as the baseline. Ops run through the public custom
ops with ``FEDLORA_FAST_BACKEND`` set, i.e. what a user gets.

    pytest bench/bench_ffa_linear.py                          # full shapes (BERT/MiniLM: n=32, T=128, r=8)
    FEDLORA_FAST_BENCH_SMOKE=1 pytest bench/bench_ffa_linear.py   # toy shapes, seconds: for CI
    python bench/bench_ffa_linear.py [--reps 11] [--json out.json] [--smoke] [--cpu-time]
        # script mode: backward with per-sample norms, native vs torch, at in/out 384<->1536 (ratio printed)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch

from fedlora_fast import reference as ref
from fedlora_fast.ops import backends, ffa_linear_bwd, ffa_linear_clip_reduce, ffa_linear_fwd

SMOKE = os.environ.get("FEDLORA_FAST_BENCH_SMOKE", "") not in ("", "0")
# (n, T, in, out, r): MiniLM/BERT attention-output/FFN shapes of the issue, or toy ones for CI
SHAPES = [(2, 4, 37, 53, 3)] if SMOKE else [(32, 128, 384, 1536, 8), (32, 128, 1536, 384, 8)]
CPU_BACKENDS = [b for b in ("torch", "native") if backends.available(b, "cpu")]


@contextlib.contextmanager
def backend(name: str):
    """Run the custom ops on backend ``name`` (through FEDLORA_FAST_BACKEND), restoring the environment."""
    import harness  # bench/harness.py (imported where used, as in main)

    try:
        with harness.env_var(backends.ENV_VAR, name):
            backends.clear_cache()
            yield
    finally:
        backends.clear_cache()


def make_inputs(n: int, T: int, inp: int, out: int, r: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, inp, generator=gen)
    t = dict(
        x=x,
        weight=torch.randn(out, inp, generator=gen) * inp**-0.5,
        bias=torch.randn(out, generator=gen),
        A=torch.randn(r, inp, generator=gen) * inp**-0.5,
        B=torch.randn(out, r, generator=gen) * 0.1,
        g=torch.randn(n, T, out, generator=gen),
    )
    t["u"] = x @ t["A"].t()
    return t


def bwd_call(t: dict, mode: int = ref.MODE_PER_SAMPLE, need_dx: bool = True, lora: bool = False):
    """The layer's backward: input gradient + B's per-sample gradients and norms (FFA mode by default)."""
    xa = t["x"] if lora else None
    return lambda: ffa_linear_bwd(t["g"], t["u"], t["weight"], t["A"], t["B"], xa, 2.0, need_dx, False, mode, 1.0, 1.0)


# ---------------------------------------------------------------- pytest-benchmark cases
def _bench(benchmark, name, fn):
    with backend(name):
        fn()  # warm-up (allocator, OpenMP pool)
        benchmark(fn)


try:
    import pytest
except ImportError:  # script mode does not need pytest
    pytest = None

if pytest is not None:
    _params = dict(argnames="name", argvalues=CPU_BACKENDS)

    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    @pytest.mark.parametrize(**_params)
    @pytest.mark.parametrize(
        "mode", [ref.MODE_SUM, ref.MODE_PER_SAMPLE, ref.MODE_CLIP], ids=["sum", "per_sample", "clip"]
    )
    @pytest.mark.parametrize("need_dx", [True, False], ids=["dx", "no_dx"])
    def test_ffa_linear_bwd(benchmark, name, shape, mode, need_dx):
        t = make_inputs(*shape)
        _bench(benchmark, name, bwd_call(t, mode, need_dx))

    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    @pytest.mark.parametrize(**_params)
    def test_ffa_linear_bwd_lora(benchmark, name, shape):
        t = make_inputs(*shape)
        _bench(benchmark, name, bwd_call(t, ref.MODE_PER_SAMPLE, True, lora=True))

    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    @pytest.mark.parametrize(**_params)
    def test_ffa_linear_fwd(benchmark, name, shape):
        t = make_inputs(*shape)
        _bench(benchmark, name, lambda: ffa_linear_fwd(t["x"], t["x"], t["weight"], t["bias"], t["A"], t["B"], 2.0))

    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    @pytest.mark.parametrize(**_params)
    def test_ffa_linear_clip_reduce(benchmark, name, shape):
        n, _, _, out, r = shape
        P, coef = torch.randn(n, out, r), torch.rand(n)
        _bench(benchmark, name, lambda: ffa_linear_clip_reduce(P, coef))


# ---------------------------------------------------------------- script mode
def cpu_time_interleaved(fns: dict, reps: int) -> dict:
    """Like ``harness.time_interleaved`` but in process CPU seconds (all threads): on a box shared with other
    jobs, time spent descheduled does not count, so it tracks the work done (OpenMP spin-waits included)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    names = list(fns)
    for k in range(reps):
        for name in names[k % len(names):] + names[: k % len(names)]:
            t0 = time.process_time()
            fns[name]()
            times[name].append(time.process_time() - t0)
    return times


def script(reps: int, shapes: list, json_path: str | None, cpu_time: bool = False) -> dict:
    """torch vs native at each shape: backward with dx + per-sample norms (the issue's goal), clip, no dx,
    LoRA with split dx, forward."""
    import harness  # bench/harness.py: interleaved timing, provenance, atomic JSON

    if "native" not in CPU_BACKENDS:
        raise SystemExit(f"native backend unavailable: {backends._probe('native', 'cpu')[1]}")
    info = harness.machine_info("cpu")
    print(f"# {info['device']}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load {info['load_avg_1_5_15']}; median of {reps} interleaved rounds, "
          f"{'process CPU time (ms of CPU, both threads)' if cpu_time else 'wall clock'}")
    print(f"{'n,T,in,out,r':>24} {'case':>20} {'torch ms':>9} {'native ms':>9} {'torch/native':>12}")
    rows = []
    for shape in shapes:
        t = make_inputs(*shape)
        cases = {
            "bwd per-sample + dx": bwd_call(t, ref.MODE_PER_SAMPLE, True),
            "bwd clip + dx": bwd_call(t, ref.MODE_CLIP, True),
            "bwd per-sample": bwd_call(t, ref.MODE_PER_SAMPLE, False),
            "bwd lora + split dx": lambda: ffa_linear_bwd(t["g"], t["u"], t["weight"], t["A"], t["B"], t["x"], 2.0,
                                                          True, True, ref.MODE_PER_SAMPLE, 1.0, 1.0),
            "fwd (xa = x)": lambda: ffa_linear_fwd(t["x"], t["x"], t["weight"], t["bias"], t["A"], t["B"], 2.0),
        }
        for case, fn in cases.items():
            def on(name, fn=fn):
                def run():
                    with backend(name):
                        return fn()
                return run

            fns = {b: on(b) for b in ("torch", "native")}
            if cpu_time:
                times = cpu_time_interleaved(fns, reps)
            else:
                times = harness.time_interleaved(fns, device="cpu", reps=reps)
            m = {b: harness.median(v) for b, v in times.items()}
            ratio = m["torch"] / m["native"]
            print(f"{str(shape):>24} {case:>20} {m['torch'] * 1e3:9.2f} {m['native'] * 1e3:9.2f} {ratio:12.2f}")
            rows.append(dict(shape=list(shape), case=case, torch_s=m["torch"], native_s=m["native"],
                             torch_over_native=ratio, spread={b: harness.spread(v) for b, v in times.items()}))
        # the floor of any backward that returns dx: PyTorch's GEMM G W alone
        gemm = {"gemm": lambda: torch.matmul(t["g"], t["weight"])}
        floor = harness.median((cpu_time_interleaved(gemm, reps) if cpu_time else
                                harness.time_interleaved(gemm, device="cpu", reps=reps))["gemm"])
        print(f"{str(shape):>24} {'GEMM G W alone':>20} {floor * 1e3:9.2f}")
        rows.append(dict(shape=list(shape), case="GEMM G W alone", torch_s=floor))
    result = dict(machine=info, bench="ffa_linear", clock="process_cpu" if cpu_time else "wall", rows=rows)
    if json_path:
        harness.write_json(json_path, result)
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=11, help="timed interleaved rounds (median reported)")
    ap.add_argument("--shape", action="append", default=None, help="n,T,in,out,r (repeatable)")
    ap.add_argument("--json", default=None, help="write the rows (with machine info) to this JSON file")
    ap.add_argument("--smoke", action="store_true", help="toy shapes, 2 rounds: checks the script runs")
    ap.add_argument("--cpu-time", action="store_true", help="time in process CPU seconds (for a loaded box)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (the native module shares torch's OpenMP runtime, so both follow)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.shape:
        shapes = [tuple(int(v) for v in s.split(",")) for s in a.shape]
    elif a.smoke:
        shapes = [(2, 4, 37, 53, 3)]
    else:
        shapes = [(32, 128, 384, 1536, 8), (32, 128, 1536, 384, 8)]
    script(2 if a.smoke else a.reps, shapes, a.json, a.cpu_time)

"""GPU benchmark of one FFA-LoRA layer (Triton kernels) against the floor and peft LoRA + opacus per-sample grads.

Issue 3's benchmark. Follows the Triton tutorials' ``do_bench`` (CUDA events, L2 flushed, median) and the
shared provenance of ``bench/harness.py``. At Llama-7B projection shapes (4096->4096, 4096->11008,
11008->4096), 4k and 16k tokens per batch (8x512, 8x2048), r=16, bf16, it

1. checks the Triton ops against the PyTorch reference (float64) on random inputs of each row's shape and
   dtype (drawn for the check, not the timed tensors), along every GEMM path ``auto`` may take,
2. times forward and the full step (forward + backward; backward = their difference) of
   - ``floor``: the frozen base ``nn.Linear``: forward + input-gradient backward only,
   - ``ffa_flat[gemm]``: ``FFALoRALinear`` with per-sample gradients and norms (flat clipping: every P_i
     kept), base GEMM by the fused Triton kernel (``triton``), its persistent TMA twin (``tma``, on request:
     measured slower on an H200), by cuBLAS + a Triton epilogue (``cublas``), by cuBLAS accumulating onto the
     low-rank term (``cublas_acc``), by cuBLAS on the merged weight ``W + s B A`` both ways with no V in
     the backward (``merged``), or as chosen by timing per shape (``auto``, the default: the headline
     ratios use it); ``ffa_flat[reference]`` (the PyTorch ops) on request,
   - ``ffa_flat[graph]``: ``ffa_flat[auto]`` replayed from CUDA graphs (CUDA only): its GPU time without
     the host's issue cost, which sets the eager pace at 8x512 4096->4096; ``ffa_flat[direct]`` and
     ``ffa_flat[jit]`` (on request): ``ffa_flat[auto]`` with each launch mode (``FEDLORA_FAST_LAUNCH``; the
     default is direct with Triton 3.4-3.9, so there ``[auto]`` runs as ``[direct]`` and ``[jit]`` is the A/B),
     ``ffa_flat[keep]`` (on request): ``ffa_flat[auto]`` with ``FEDLORA_FAST_KEEP_MERGED=1`` (a merged forward's
     ``W + s B A`` kept for its backward: one merge per step instead of two, a W-sized buffer held between them),
     ``ffa_flat[graph_keep]`` (on request, CUDA): ``ffa_flat[keep]`` captured and replayed as ``[graph]`` is,
     ``ffa_flat[cache]`` (on request): ``ffa_flat[auto]`` with ``FEDLORA_FAST_KEEP_MERGED=cache`` (B's W' kept
     across steps and only checked against B and A at each forward: B does not change between the timed
     steps, so this is the steady state of the micro-batches of one DP logical batch; a step after an
     optimizer update costs one merge more, timed as ``merge_ms``), ``ffa_flat[graph_cache]`` its graphs,
   - ``ffa_per_layer``: the same with per-layer clipping (clipped sum inside the backward, no P kept),
   - ``peft_opacus``: peft's LoRA layer (A frozen, as FFA; ``--peft-train-A`` for vanilla LoRA) wrapped in
     opacus' ``GradSampleModule`` (hooks), per-sample gradients + their norms,
3. prints ratios, achieved TFLOP/s and GB/s (from the formulas in bench/NOTES.md) against the card's
   measured bf16 matmul and copy ceilings, and writes ``bench/results/gpu_layer_<device>_<date>.json``:
   one row per shape and dtype with ``device``, the shape, ``ratio_to_floor`` (ours / floor, full step;
   goal <= 1.10) and ``ratio_to_peft_opacus`` (ours / peft+opacus; goal <= 0.5, i.e. >= 2x faster), both
   the median of within-round ratios over ``--rounds`` interleaved rounds (free of the card's drift).

    python bench/gpu_layer.py                 # CUDA, all shapes
    python bench/gpu_layer.py --smoke         # tiny shapes on CPU through TRITON_INTERPRET=1: seconds, for CI
    python bench/gpu_layer.py --shapes 4096x4096 --tokens 8x512 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

LLAMA7B = [(4096, 4096), (4096, 11008), (11008, 4096)]  # q/k/v/o, gate/up, down projections
TOKENS = [(8, 512), (8, 2048)]
SMOKE_SHAPES, SMOKE_TOKENS = [(72, 80)], [(2, 5)]  # in, out > 64 and multiples of 8: the TMA GEMM runs too
ELEM = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4}
GRAPH = "graph"  # ffa_flat[graph]: ffa_flat[auto]'s forward and step replayed from CUDA graphs (host cost gone)
DIRECT = "direct"  # ffa_flat[direct]: ffa_flat[auto] with FEDLORA_FAST_LAUNCH=direct (compiled kernels, no JIT)
JIT = "jit"  # ffa_flat[jit]: ffa_flat[auto] with FEDLORA_FAST_LAUNCH=jit (every launch through Triton's JIT)
LAUNCH_VARIANTS = {DIRECT: "direct", JIT: "jit"}  # variant -> FEDLORA_FAST_LAUNCH
KEEP = "keep"  # ffa_flat[keep]: ffa_flat[auto] with FEDLORA_FAST_KEEP_MERGED=1 (the forward's W' kept for dX)
GRAPH_KEEP = "graph_keep"  # ffa_flat[graph_keep]: ffa_flat[keep] replayed from CUDA graphs (captured with it)
CACHE = "cache"  # ffa_flat[cache]: ffa_flat[auto] with FEDLORA_FAST_KEEP_MERGED=cache (B's W' kept across steps)
GRAPH_CACHE = "graph_cache"  # ffa_flat[graph_cache]: ffa_flat[cache] replayed from CUDA graphs
KEEP_SETTINGS = {KEEP: "1", CACHE: "cache"}  # _with_gemm setting -> its FEDLORA_FAST_KEEP_MERGED
GRAPHS = {GRAPH: None, GRAPH_KEEP: KEEP, GRAPH_CACHE: CACHE}  # graph variant -> the setting its capture runs under
KEEP_VARIANTS = (KEEP, GRAPH_KEEP, CACHE, GRAPH_CACHE)  # the variants that set FEDLORA_FAST_KEEP_MERGED themselves
AUTO_LIKE = ("auto", *GRAPHS, *LAUNCH_VARIANTS, KEEP, CACHE)  # ffa_flat[...] variants that run auto's GEMM choice
# the ratio to the floor of each auto-like variant beside the headline (row key -> ffa_flat[...] variant)
VARIANT_RATIOS = {"ratio_to_floor_graph": GRAPH, "ratio_to_floor_direct": DIRECT, "ratio_to_floor_jit": JIT,
                  "ratio_to_floor_keep": KEEP, "ratio_to_floor_graph_keep": GRAPH_KEEP,
                  "ratio_to_floor_cache": CACHE, "ratio_to_floor_graph_cache": GRAPH_CACHE}


DEFINITIONS = {
    "ratio_to_floor": "full step (fwd+bwd) of ours (ffa_flat[auto], the default GEMM choice; else the fastest "
                      "ffa_flat variant with a pinned GEMM; absent if neither ran) / floor (frozen nn.Linear fwd + dX)",
    "ratio_to_floor_best_pinned": "the same for the fastest ffa_flat variant with a pinned GEMM (not auto, which "
                                  "may mix paths per op, nor graph)",
    "ratio_to_floor_graph": "ffa_flat[graph] (ffa_flat[auto]'s step replayed from a CUDA graph: no host issue "
                            "cost) / floor (eager: its host cost is below its GPU time at every shape)",
    "ratio_to_floor_direct": "ffa_flat[direct] (ffa_flat[auto] with FEDLORA_FAST_LAUNCH=direct: the compiled "
                             "kernels launched without Triton's per-call JIT work; the default with Triton "
                             "3.4-3.9 since 2026-11-27, opt-in before) / floor: against ratio_to_floor_jit, what "
                             "direct launches save an eager step (host-bound at 4k tokens)",
    "ratio_to_floor_jit": "ffa_flat[jit] (ffa_flat[auto] with FEDLORA_FAST_LAUNCH=jit: every launch through "
                          "Triton's JIT, the default before 2026-11-27 and with other Triton releases) / floor",
    "ratio_to_floor_keep": "ffa_flat[keep] (ffa_flat[auto] with FEDLORA_FAST_KEEP_MERGED=1: a merged forward keeps "
                           "its W + s B A for the backward, one W-sized buffer per layer between them; opt-in) / "
                           "floor: against ratio_to_floor, what one merge fewer per step saves",
    "ratio_to_floor_graph_keep": "ffa_flat[graph_keep] (ffa_flat[keep]'s step captured and replayed from a CUDA "
                                 "graph) / floor: against ratio_to_floor_graph, the kept W' without host cost",
    "ratio_to_floor_cache": "ffa_flat[cache] (ffa_flat[auto] with FEDLORA_FAST_KEEP_MERGED=cache: B's W + s B A "
                            "kept across steps, checked against B and A at each forward, re-merged where they "
                            "changed; opt-in, one W-sized buffer per layer for good) / floor. B is the same in "
                            "every timed step: the steady state of the micro-batches of one DP logical batch (no "
                            "optimizer step between them); the first micro-batch after a step pays one merge "
                            "more (the row's merge_ms)",
    "ratio_to_floor_graph_cache": "ffa_flat[graph_cache] (ffa_flat[cache]'s step captured and replayed from a CUDA "
                                  "graph, the check inside the graph) / floor",
    "merge_ms": "one full merge W + s B A alone (the kernel the cache skips while B is unchanged), CUDA events",
    "ratio_to_peft_opacus": "full step of ours / peft LoRA + opacus hooks + norms",
    "headline ratios": "ratio_to_floor, ratio_to_peft_opacus, ratio_to_floor_graph, ratio_to_floor_direct, "
                       "ratio_to_floor_jit, ratio_to_floor_keep, ratio_to_floor_graph_keep, ratio_to_floor_cache, "
                       "ratio_to_floor_graph_cache, "
                       "ratio_to_floor_best_pinned "
                       "and overhead_ratio_to_peft_opacus are the interleaved medians where --rounds ran (see "
                       "below; the one-after-another timings are then *_sequential), else sequential; "
                       "ratio_to_floor_fwd/bwd are always sequential (only full steps run in rounds). Files written "
                       "before commit ea190b3 (e.g. gpu_layer_*_20261126_pm_run*.json) hold the sequential values "
                       "under the plain names",
    "work timed": "ffa_flat and peft_opacus alike stop at every sample's gradient and norm (flat clipping's "
                  "first half, as opacus's DPOptimizer forms them); the clip and clipped sum are in neither. "
                  "ffa_per_layer includes them (the clipped sum comes out of the pass over G)",
    "overhead_ratio_to_peft_opacus": "(ours - floor) / (peft+opacus - floor), full step: what each adds to the "
                                     "frozen layer's own work (the 2x goal restated where peft+opacus < 2x the "
                                     "floor makes the plain ratio unreachable; bench/NOTES.md)",
    "ratio_to_floor_kernel_time": "with --profile: each variant's GPU kernel time per full step (the profiler's "
                                  "per-kernel sums) / the floor's, by variant name: free of host gaps and of "
                                  "clock drift between rounds; not a wall-clock ratio (it leaves out the time the "
                                  "GPU idles between kernels, which an eager host-bound step is made of)",
    "tflops, gbps": "formula FLOPs / bytes of bench/NOTES.md (Triton section) over the full-step time",
    "floor_drift": "the floor's full step timed again after every variant / its first timing: the variants are "
                   "timed one after another, so a drift of the card's clocks over the row shows here (the "
                   "sequential ratios are against the first timing)",
    "*_interleaved": "the median over --rounds rounds (every variant's full step once per round, the order "
        "rotated) of the within-round ratio: free of the drift that floor_drift shows; interleaved_full_ms "
        "holds the rounds",
}


# ffa_flat[...] variants that are not one pinned GEMM path
UNPINNED = ("reference", *AUTO_LIKE)


def gemm_of(name: str) -> str | None:
    """The ``X`` of an ``ffa_flat[X]`` variant name (a GEMM path, or reference/auto/graph), else None."""
    return name[len("ffa_flat[") : -1] if name.startswith("ffa_flat[") else None


def pinned_gemm(name: str) -> str | None:
    """The one GEMM path an ``ffa_flat[<gemm>]`` variant pins, or None (not ffa_flat, or ``UNPINNED``)."""
    gemm = gemm_of(name)
    return None if gemm in UNPINNED else gemm


MERGED_KEPT = "merged+keep"  # a check_ops path: FEDLORA_FAST_GEMM=merged with FEDLORA_FAST_KEEP_MERGED=1
MERGED_CACHED = "merged+cache"  # a check_ops path: FEDLORA_FAST_KEEP_MERGED=cache, made, re-merged, checked
CHECK_KEEP = {MERGED_KEPT: "1", MERGED_CACHED: "cache"}  # those paths' FEDLORA_FAST_KEEP_MERGED


def gemms_to_check(which: list[str], device_type: str) -> list[str]:
    """The base-GEMM paths (FEDLORA_FAST_GEMM) whose ops check_ops compares with the float64 reference: every
    pinned ``ffa_flat[<gemm>]`` variant timed, and with any variant that takes auto's choice (``[auto]``,
    ``[graph]``, the launch modes, ``[keep]``, ``[graph_keep]``) every path auto may pick (on CUDA
    ``AUTO_CANDIDATES``; elsewhere it picks triton): the timed path is checked. With ``[keep]`` or
    ``[graph_keep]`` also ``MERGED_KEPT``, the merged backward on the forward's kept W'; with ``[cache]`` or
    ``[graph_cache]`` ``MERGED_CACHED``, the forward on the cached W' (made, then checked) and the backward
    on it."""
    gemms = [g for g in map(pinned_gemm, which) if g is not None]
    if any(f"ffa_flat[{k}]" in which for k in AUTO_LIKE):
        from fedlora_fast.kernels import ffa_linear as K

        gemms += [c for c in (K.AUTO_CANDIDATES if device_type == "cuda" else ("triton",)) if c not in gemms]
    if any(f"ffa_flat[{k}]" in which for k in (KEEP, GRAPH_KEEP)):
        gemms.append(MERGED_KEPT)
    if any(f"ffa_flat[{k}]" in which for k in (CACHE, GRAPH_CACHE)):
        gemms.append(MERGED_CACHED)
    return gemms or ["triton"]


# --- the model of the work: FLOPs and minimum bytes (bench/NOTES.md, "Triton (GPU) kernels") ------------
def floor_work(N: int, inp: int, out: int, e: int) -> tuple[float, float]:
    """FLOPs and minimum bytes of the floor's full step: Y = X W^T, dX = G W (weight read twice)."""
    flops = 4.0 * N * inp * out
    bytes_ = e * 2.0 * (N * inp + N * out + inp * out)
    return flops, bytes_


def ffa_work(n: int, N: int, inp: int, out: int, r: int, e: int) -> tuple[float, float]:
    """FLOPs and minimum bytes of the FFA layer's full step with per-sample P_i and norms (flat clipping).

    Adds to the floor: U = X A^T, U B^T, V = G B, V A, P_i = s G_i^T U_i; U (fp32) written once and read
    once, P (fp32, n x out x r) written once. X and G are read once each by a perfect fusion.
    """
    flops, bytes_ = floor_work(N, inp, out, e)
    flops += 2.0 * N * r * (2 * inp + 3 * out)
    bytes_ += 4.0 * (2 * N * r + n * out * r)
    return flops, bytes_


# --- timing ---------------------------------------------------------------------------------------------
def interleave(variants: dict, device: torch.device, reps: int, rounds: int) -> dict[str, list[float]]:
    """``{name: [full-step ms per round]}``: ``rounds`` rounds timing every variant once (``bench_ms``), the
    order rotated by one each round, so a ratio of two variants in one round compares them under the same
    clocks."""
    names = list(variants)
    out: dict[str, list[float]] = {name: [] for name in names}
    for k in range(rounds):
        for name in names[k % len(names):] + names[: k % len(names)]:
            out[name].append(bench_ms(variants[name].step, device, reps))
    return out


def bench_ms(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds of ``fn()``: triton.testing.do_bench on CUDA, perf_counter medians on CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=max(100, 10 * reps), return_mode="median"))
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def queued_times(fn, n: int, flush, spin, event) -> list[float]:
    """``n`` timed calls of ``fn``, each after ``flush()`` (L2 emptied) and ``spin()`` (the GPU kept busy while
    the host issues the call), between two ``event()`` records; the milliseconds of each once all ran."""
    marks = []
    for _ in range(n):
        flush()
        spin()
        start, end = event(), event()
        start.record()
        fn()
        end.record()
        marks.append((start, end))
    marks[-1][1].synchronize()
    return [start.elapsed_time(end) for start, end in marks]


def kernel_ms(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds of GPU time per call of ``fn``, for the kernel sweeps.

    do_bench's method (L2 flushed before each call, CUDA events around it, median), with each call also queued
    behind a spin kernel (``torch.cuda._sleep``) that lasts twice the host's issue time of one call: without it,
    a call whose host work outlasts the flush (a memset and a Triton launch: ~0.1 ms on an H100 VM's CPU,
    2026-11-26, against ~85 us of GPU time for the 256 MB flush) is timed by its host work. That made rows of
    one config differ 2.5x in the 4k-token U sweep (28 vs 71 us). Off CUDA, or without ``_sleep``: ``bench_ms``."""
    from fedlora_fast.kernels import ffa_linear as K

    rate = K._sleep_cycles_per_ms(device) if device.type == "cuda" else None
    if rate is None:
        return bench_ms(fn, device, reps)
    with torch.cuda.device(device):  # the spin and the events on the stream the kernels run on
        return _kernel_ms_here(fn, device, reps, rate, K._SLEEP_CAP_MS)


def _kernel_ms_here(fn, device: torch.device, reps: int, rate: float, cap_ms: float) -> float:
    """``kernel_ms`` on the current CUDA device: ``rate`` cycles of ``torch.cuda._sleep`` per ms."""
    fn()
    torch.cuda.synchronize(device)
    issue_ms = 0.0
    for _ in range(3):  # the slowest of three issues (the GPU may still be running them: not waited for)
        t0 = time.perf_counter()
        fn()
        issue_ms = max(issue_ms, (time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize(device)
    cache = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    cycles = int(rate * min(cap_ms, 2.0 * issue_ms + 0.05))

    def timed(n):
        return queued_times(fn, n, cache.zero_, lambda: torch.cuda._sleep(cycles),
                            lambda: torch.cuda.Event(enable_timing=True))

    estimate = statistics.median(timed(5))
    n = max(5, min(300, int(max(100, 10 * reps) / max(estimate, 1e-3))))  # ~do_bench's budget in ms of kernel time
    return float(statistics.median(timed(n)))


def ceilings(device: torch.device, dtype: torch.dtype) -> dict:
    """Measured matmul TFLOP/s (8192^3 in ``dtype``) and device-to-device copy GB/s (1 GiB) of this card."""
    if device.type != "cuda":
        return {"matmul_tflops": None, "copy_gbps": None, "note": "no ceilings on CPU (smoke)"}
    s = 8192
    a, b = torch.randn(s, s, device=device, dtype=dtype), torch.randn(s, s, device=device, dtype=dtype)
    ms = bench_ms(lambda: torch.matmul(a, b), device, 20)
    src = torch.empty(2**29, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms_copy = bench_ms(lambda: dst.copy_(src), device, 20)
    return {
        "matmul_tflops": 2.0 * s**3 / (ms * 1e-3) / 1e12,
        "copy_gbps": 2.0 * src.numel() * 2 / (ms_copy * 1e-3) / 1e9,
        "matmul_shape": [s, s, s],
        "copy_bytes": src.numel() * 2,
    }


# --- variants ------------------------------------------------------------------------------------------
class Variant:
    """One layer under test: ``forward()`` (graph recorded, as in training) and ``step()`` (forward + backward)."""

    def __init__(self, name: str, module, x: torch.Tensor, g: torch.Tensor, reset):
        self.name, self.module, self.x, self.g, self._reset = name, module, x, g, reset

    def forward(self):
        return self.module(self.x)

    def step(self):
        self._reset()
        self.module(self.x).backward(self.g)


def make_variants(base: torch.nn.Linear, x, g, r: int, alpha: float, *, peft_train_A: bool, which: list[str],
                  failed: dict | None = None):
    from fedlora_fast import per_sample
    from fedlora_fast.layers import FFALoRALinear
    from fedlora_fast.reference import MODE_CLIP, MODE_PER_SAMPLE

    out = {}

    def clear_x():
        x.grad = None

    if "floor" in which:
        out["floor"] = Variant("floor", base, x, g, clear_x)

    def ffa(mode):
        layer = FFALoRALinear(base, r=r, alpha=alpha, seed=0, name="proj")
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.02)
        ctx = per_sample.PerSampleContext(mode=mode)
        if mode == MODE_CLIP:
            ctx.clip = {id(layer.lora_B): 1.0}
        layer.ps_ctx = ctx

        def reset():
            x.grad = None
            layer.lora_B.grad = None
            per_sample.clear(layer.lora_B)

        return layer, reset

    for name in which:
        if name.startswith("ffa_flat[") or name == "ffa_per_layer":
            layer, reset = ffa(MODE_PER_SAMPLE if name.startswith("ffa_flat") else MODE_CLIP)
            gemm = gemm_of(name)
            if gemm in GRAPHS:
                if x.device.type != "cuda":
                    print(f"# {name} skipped: CUDA graphs need a CUDA device", flush=True)
                    continue
                try:
                    out[name] = graph_variant(Variant(name, layer, x, g, reset), gemm)
                except Exception as e:  # noqa: BLE001  (a failed capture must not cost the other variants)
                    print(f"# {name} failed: capture failed: {e!r}"[:300], flush=True)
                    if failed is not None:  # (the row is then not correct: a variant asked for did not run)
                        failed[name] = f"capture failed: {e!r}"[:300]
                continue
            out[name] = _with_gemm(Variant(name, layer, x, g, reset), gemm)
    if "peft_opacus" in which:
        try:
            out["peft_opacus"] = make_peft_opacus(base, x, g, r, alpha, peft_train_A)
        except ImportError as e:  # a GPU machine without opacus/peft: time ours, say what is missing
            print(f"# peft_opacus failed: {e} (carry the wheels in .whl/, see bench/README.md)", flush=True)
            if failed is not None:
                failed["peft_opacus"] = f"ImportError: {e}"[:300]
        except Exception as e:  # noqa: BLE001  (a peft/opacus/torch mismatch must not cost the row's other variants)
            print(f"# peft_opacus failed: {e!r}"[:300], flush=True)
            if failed is not None:
                failed["peft_opacus"] = f"{type(e).__name__}: {e}"[:300]
    return out


def graph_variant(v: Variant, graph: str) -> Variant:
    """``ffa_flat[graph]`` / ``[graph_keep]`` / ``[graph_cache]``: the variant captured (``_graphed``) under its
    ``GRAPHS`` setting."""
    return _graphed(_with_gemm(v, GRAPHS[graph]))


def _graphed(v: Variant, warmup: int = 3) -> Variant:
    """The variant's forward and its full step (default GEMM choice) each captured once in a CUDA graph and
    replayed: the GPU time of the same work with the host's issue cost gone (what ``GraphedAccumulator``
    gives a training step). Warm-ups run eagerly on a side stream first (compiles, autotuning, ``auto``)."""
    step_graph = harness.capture_cuda_graph(v.step, warmup)
    fwd_graph = harness.capture_cuda_graph(v.forward, warmup=0)  # the step's warm-ups compiled its kernels
    v.step, v.forward = step_graph.replay, fwd_graph.replay
    v.graphs = (step_graph, fwd_graph)  # kept alive with the variant
    return v


def _with_gemm(v: Variant, gemm: str | None) -> Variant:
    """Run the variant's calls with FEDLORA_FAST_GEMM=gemm (None: leave the default); ``reference`` runs the
    same layer on the PyTorch reference ops instead (FEDLORA_FAST_BACKEND=torch: cuBLAS and a few torch
    kernels, fewer host-side launches than Triton's: where it wins, the step is host-bound); ``direct`` and
    ``jit`` run it with the default GEMM choice and that FEDLORA_FAST_LAUNCH; ``keep`` and ``cache`` with the
    default GEMM choice and FEDLORA_FAST_KEEP_MERGED=1 / =cache."""
    if gemm is None:
        return v
    from fedlora_fast.kernels import ffa_linear as K
    from fedlora_fast.ops import backends

    if gemm == "reference":
        var, value = backends.ENV_VAR, "torch"
    elif gemm in LAUNCH_VARIANTS:
        var, value = K.LAUNCH_ENV_VAR, LAUNCH_VARIANTS[gemm]
    elif gemm in KEEP_SETTINGS:
        var, value = K.KEEP_ENV_VAR, KEEP_SETTINGS[gemm]
    else:
        var, value = K.GEMM_ENV_VAR, gemm

    def wrap(fn):
        def run():
            with harness.env_var(var, value):
                return fn()

        return run

    v.forward, v.step = wrap(v.forward), wrap(v.step)
    return v


def cache_applies(v: Variant, captured: bool = False) -> None:
    """RuntimeError unless the merged-weight cache holds an entry for the variant's layer after its warm-up
    step (``captured``: one a CUDA graph captured): where it does not apply (float16, a GEMM pinned globally
    to a path other than merged, adapter dropout; a capture that fell back to ``keep``), ``[cache]`` and
    ``[graph_cache]`` would time another path under their names."""
    from fedlora_fast.kernels import ffa_linear as K

    B = v.module.lora_B
    if not any(e.refs[2]() is B and (e.captured or not captured) for e in K._MERGED_CACHE.values()):
        raise RuntimeError(f"{v.name}: the merged-weight cache did not apply{' in the capture' if captured else ''} "
                           f"(dtype {v.module.weight.dtype}, {K.GEMM_ENV_VAR}={os.environ.get(K.GEMM_ENV_VAR)!r}): "
                           "it would time another path")


def make_peft_opacus(base, x, g, r: int, alpha: float, train_A: bool) -> Variant:
    """peft LoRA around a copy of ``base`` inside opacus' GradSampleModule (hooks); norms as DPOptimizer does."""
    import copy

    from opacus import GradSampleModule
    from peft import LoraConfig, get_peft_model

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = copy.deepcopy(base)

        def forward(self, inp):
            return self.proj(inp)

    model = get_peft_model(Wrap(), LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(train_A)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", force_functorch=False)
    params = [p for p in gsm.parameters() if p.requires_grad]

    def reset():
        x.grad = None
        for p in params:
            p.grad = None
            p.grad_sample = None

    class PeftVariant(Variant):
        def forward(self):
            y = super().forward()
            # a forward without backward leaves opacus' hook state half-way (saved activations, forward
            # counters); drop it so the next step's backward produces grad_sample (opacus 1.6 internals)
            for m in gsm.modules():
                if hasattr(m, "activations"):
                    m.activations.clear()
                if hasattr(m, "max_batch_len"):
                    del m.max_batch_len
            for p in params:
                p._forward_counter = 0
            return y

        def step(self):
            super().step()
            self.norms()

        def norms(self):
            n = x.shape[0]
            per_param = [p.grad_sample.reshape(n, -1).norm(2, dim=1) for p in params]
            return torch.stack(per_param, dim=1).norm(2, dim=1)

    return PeftVariant("peft_opacus", gsm, x, g, reset)


# --- where the time goes: per-kernel profile and the one-pass backward's block sizes -------------------
def kernel_table(fn, steps: int = 3, top: int = 12) -> list[dict]:
    """Device time per step of every kernel ``fn`` launches (torch.profiler), largest first: the ``top`` largest,
    then one row summing the rest (so the table's ``us_per_step`` add up to the step's kernel time)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None)
        if us is None:
            us = getattr(ev, "self_cuda_time_total", 0.0)
        if us and us > 0:
            rows.append({"kernel": ev.key[:90], "us_per_step": us / steps, "calls_per_step": ev.count / steps,
                         "us_per_call": us / ev.count})  # us_per_step sums a step's calls of the kernel
    rows.sort(key=lambda r: -r["us_per_step"])
    rest = rows[top:]
    if rest:
        calls = sum(r["calls_per_step"] for r in rest)
        us = sum(r["us_per_step"] for r in rest)
        rows = rows[:top] + [{"kernel": f"({len(rest)} more kernels)", "us_per_step": us, "calls_per_step": calls,
                              "us_per_call": us / calls if calls else 0.0}]
    return rows


def kernel_time_ratios(profiles: dict[str, list[dict]]) -> dict[str, float]:
    """Each profiled variant's GPU kernel time per step (the sum of its ``kernel_table``) over the floor's: the
    ratio free of host gaps, launch order and clock drift between rounds (bench/NOTES.md, 2026-11-27: at 16k
    tokens it read 1.09-1.12 where the interleaved wall-clock ratio read 1.00-1.07). Empty without a usable
    floor profile; a variant whose profile failed (a row with no time) is left out."""
    def total(table):
        if not table or any(k.get("us_per_step", 0.0) <= 0.0 for k in table):
            return None
        return sum(k["us_per_step"] for k in table)

    floor = total(profiles.get("floor"))
    if not floor:
        return {}
    return {name: t / floor for name, table in profiles.items()
            if name != "floor" and (t := total(table)) is not None}


def host_ms(fn, device: torch.device, steps: int = 40) -> float:
    """CPU time to issue one call of ``fn`` (no waiting on the GPU in between; the launch queue absorbs
    the work). When this exceeds the device time, the step is CPU-bound and do_bench measures this."""
    fn()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize(device)
    return 1e3 * (t1 - t0) / steps


def python_profile(fn, steps: int = 30, top: int = 25) -> str:
    """cProfile of ``steps`` calls of ``fn``, the ``top`` functions by own time (where the host time goes)."""
    import cProfile
    import io
    import pstats

    fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        fn()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


OUTER_SWEEP = [  # (BLOCK_T, BLOCK_A, num_warps, num_stages, PROMOTE, PACK[, PRESPLIT]); the first is shipped.
    # In order of what they decide (a sweep cut short by its time budget keeps the first ones): the options
    # first, then other tiles. Shipped since the H100 sweep of 2026-11-26 (64 x 128, 2 stages before).
    (64, 64, 4, 3, 1, False),
    # the shipped tile's neighbours, since the loop lost its per-row division (SAMPLE_SEG, 2026-11-26: 157-159 us
    # at out = 11008 and 16k tokens against ~120 us for G's bytes): a deeper pipeline, two warpgroups, taller tiles
    (64, 64, 4, 4, 1, False), (64, 64, 8, 3, 1, False), (128, 64, 8, 3, 1, False),
    # R's three split terms packed into one 64-wide operand, and U's bf16 terms made once per call instead of
    # in every a-tile's loop (sm90 SASS, r16 without V: 1672 -> 1432 instructions), chained or packed, on the
    # tiles shipped before
    (64, 128, 4, 2, 1, False), (64, 128, 4, 2, 1, True), (64, 128, 4, 2, 1, False, True), (64, 128, 4, 2, 1, True, True),
    # P's tensor-core accumulator over 2 / 4 row blocks before promotion (bench/NOTES.md, "v3 on an H200", "v4")
    (64, 128, 4, 2, 2, False), (64, 128, 4, 2, 4, False), (64, 128, 4, 2, 2, True),
    # packed with two warpgroups (each takes 64 of the 128 features: 12 HGMMA in 2 groups per tile, 64/84 KiB
    # of shared memory) or a deeper pipeline on 32-row tiles (52 KiB); sm90 SASS, no spills (2026-11-26)
    (64, 128, 8, 2, 1, True), (64, 128, 8, 2, 1, True, True), (64, 128, 4, 3, 1, True), (64, 128, 8, 3, 1, True),
    (32, 128, 4, 4, 1, True), (64, 256, 8, 2, 1, True), (128, 128, 8, 2, 1, True),
    # other tiles of the shipped (chained) loop
    (32, 128, 4, 3, 1, False), (64, 128, 8, 3, 1, False), (128, 128, 8, 2, 1, False),
    (64, 256, 8, 2, 1, False), (32, 256, 8, 3, 1, False), (128, 64, 4, 2, 1, False),
]  # fmt: skip


@contextlib.contextmanager
def blocks_override(kind: str, cfg: dict):
    """The kernels' ``_blocks(kind, ...)`` answer ``cfg`` for the duration (a sweep's config)."""
    from fedlora_fast.kernels import ffa_linear as K

    real = K._blocks
    K._blocks = lambda k, dev, dtype=None, **dims: dict(cfg) if k == kind else real(k, dev, dtype, **dims)
    try:
        yield
    finally:
        K._blocks = real


@contextlib.contextmanager
def nan_outputs():
    """The kernels' output buffers start as NaN (``K.alloc_hook``) for a config's accuracy call: an element the
    config leaves unwritten then fails the float64 check, instead of passing on the previous config's values
    that a reused allocation (CUDA's caching allocator) still holds."""
    from fedlora_fast.kernels import ffa_linear as K

    prev = K.alloc_hook
    K.alloc_hook = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    try:
        yield
    finally:
        K.alloc_hook = prev


def sweep_error(err: Exception) -> dict:
    """A config that raised: its error. ``OutOfResources`` (more shared memory than this GPU has) also marks
    it ``does_not_fit``: never chosen, but not a fault of the run (the row stays ``correct``)."""
    entry = {"error": repr(err)[:200]}
    if type(err).__name__ == "OutOfResources":
        entry["does_not_fit"] = True
    return entry


def sweep_row_correct(row: dict) -> bool:
    """A sweep row ran correctly: no config raised, except for not fitting this GPU (cuBLAS baselines aside)."""
    return all("error" not in sw or sw.get("does_not_fit")
               for sw in row.get("sweep_u", []) + row.get("sweep_outer", []) + row.get("sweep_merge", [])
               if not sw.get("baseline"))


def sweep_outer(n, T, out, r, dtype, device, reps: int, progress=None) -> list[dict]:
    """Time the one-pass backward over G for each block config of ``OUTER_SWEEP``: with V = G B (``ms``: the
    fused-dX GEMMs need it) and without (``ms_nov``: the pass of ``FEDLORA_FAST_GEMM=merged``, P_i and norms
    only), with each config's relative error in P and the norms against float64 (a faster config must also
    hold ``ACCURACY_BOUND`` to be shipped)."""
    from fedlora_fast.kernels import ffa_linear as K
    from fedlora_fast.reference import MODE_PER_SAMPLE

    g = torch.randn(n, T, out, device=device, dtype=dtype)
    u = torch.randn(n, T, r, device=device, dtype=torch.float32)
    Bm = torch.randn(out, r, device=device, dtype=torch.float32)
    p64 = 2.0 * g.double().transpose(1, 2) @ u.double()  # (n, out, r)
    nu64 = p64.square().sum((1, 2))
    rows = []
    for bt, ba, warps, stages, promote, pack, *presplit in OUTER_SWEEP:
        cfg = dict(BLOCK_T=bt, BLOCK_A=ba, num_warps=warps, num_stages=stages, PROMOTE=promote, PACK=pack,
                   PRESPLIT=bool(presplit and presplit[0]))
        try:
            with blocks_override("outer", cfg):
                timed = {}
                err_p = err_nu = 0.0
                for key, bm in (("ms", Bm), ("ms_nov", None)):
                    fn = lambda bm=bm: K._per_sample_outer(g, u, 2.0, MODE_PER_SAMPLE, "ar", Bmat=bm, v_rounded=True, prec_dtype=dtype)  # noqa: E731
                    with nan_outputs():
                        P, nu, _ = fn()
                    err_p = max(err_p, float((P.double() - p64).abs().max() / p64.abs().max()))
                    err_nu = max(err_nu, float(((nu.double() - nu64).abs() / nu64).max()))
                    timed[key] = kernel_ms(fn, device, reps)
            ms = timed["ms"]
            rows.append({"config": cfg, **timed, "g_gbps": g.numel() * g.element_size() / (ms * 1e-3) / 1e9,
                         "g_gbps_nov": g.numel() * g.element_size() / (timed["ms_nov"] * 1e-3) / 1e9,
                         "rel_err_P": err_p, "rel_err_nu": err_nu})
        except Exception as e:  # noqa: BLE001  (a config that fails to compile or fit: report, keep sweeping)
            rows.append({"config": cfg, **sweep_error(e)})
        if progress is not None:
            progress(rows)
    return rows


U_SWEEP = [  # (BLOCK_M, BLOCK_K, num_warps, num_stages, PACK_W, PRESPLIT_W) of U = X A^T; the first is shipped
    # (since the H100 sweep of 2026-11-26; 32-row tiles before). A's terms split once per call by their own
    # kernel (sm90 SASS of the 32-row tile: 1240 -> 672 instructions, no conversions left in the loop, no
    # spills; the same U to 4 decimals on the H100, not bit for bit), packed or not, come next
    (64, 128, 4, 3, False, False), (32, 128, 4, 3, False, False), (32, 128, 4, 3, False, True),
    (64, 128, 4, 3, True, True), (64, 128, 4, 3, False, True), (128, 128, 8, 3, True, True),
    (64, 128, 4, 3, True, False), (64, 64, 4, 4, True, False),
    (128, 128, 8, 3, True, False), (64, 256, 4, 2, True, False),
]  # fmt: skip


def sweep_u(n, T, inp, r, dtype, device, reps: int) -> list[dict]:
    """Time the U pass (U = X A^T, float32-accurate) for each config of ``U_SWEEP``, with its error vs float64."""
    from fedlora_fast.kernels import ffa_linear as K

    x = torch.randn(n, T, inp, device=device, dtype=dtype)
    A = torch.randn(r, inp, device=device, dtype=torch.float32) / inp**0.5
    u64 = x.double() @ A.double().T
    def fn():  # U in the kernels' allocator: NaN for the accuracy call (nan_outputs)
        u = K._alloc((n, T, r), torch.float32, device)
        K._launch_gemm(x, (A, A.stride(1), A.stride(0)), None, None, u, 1.0, main_fp32=True, prec_dtype=dtype)
        return u

    def config(bm, bk, warps, stages, pack, presplit, **split):
        return dict(BLOCK_M=bm, BLOCK_K=bk, GROUP_M=1, num_warps=warps, num_stages=stages, PACK_W=pack,
                    PRESPLIT_W=presplit, **split)

    runs = [(config(*c), {}) for c in U_SWEEP]
    # then the shipped config with K unsplit and in two halves (SPLIT_K; the kernels choose by _split_k's rule):
    # whether the rule's split pays at this token count. Never shipped by choose_blocks (a rule, not a tile)
    rule = K._split_k(device, K._cdiv(n * T, U_SWEEP[0][0]), inp, U_SWEEP[0][1])
    runs += [(config(*U_SWEEP[0], SPLIT_K=split), {"split_k": split, "rule": rule}) for split in (1, 2)]
    rows = []
    for cfg, probe in runs:
        # split_taken: K in halves where the config or the rule splits at this config's tiles
        entry = {"config": cfg, **probe, "split_taken": K._split_k(
            device, K._cdiv(n * T, cfg["BLOCK_M"]), inp, cfg["BLOCK_K"], cfg.get("SPLIT_K"))}
        try:
            with blocks_override("narrow", cfg):
                with nan_outputs():  # U's buffer, and PRESPLIT_W's split terms
                    entry["rel_err_U"] = float((fn().double() - u64).abs().max() / u64.abs().max())
                entry["ms"] = kernel_ms(fn, device, reps)
            entry["x_gbps"] = x.numel() * x.element_size() / (entry["ms"] * 1e-3) / 1e9
        except Exception as e:  # noqa: BLE001  (a config that fails to compile or fit: report, keep sweeping)
            entry.update(sweep_error(e))
        rows.append(entry)
    rows += u_cublas_baselines(x, A, u64, device, reps)
    return rows


MERGE_SWEEP = [  # (BLOCK_O, BLOCK_I, num_warps, num_stages[, LOOP_I[, LR_PREC[, BLOCK_RK]]]) of W' = W + s B A
    # (FEDLORA_FAST_GEMM=merged); the first is shipped at r <= 16, the last (128 x 64, _CUDA_MERGE_WIDE) at
    # 16 < r <= 64 in bf16. On an H100 (2026-11-26, night sweep) they took 71-73 us per call at r = 16 and
    # 108-110 us at r = 64 (the first 160-163 us there), out x in = 4096 x 11008 / 11008 x 4096 bf16, against
    # ~60 us for W's own bytes at 3 TB/s. Without LOOP_I (1) a program does one tile and no loop: num_stages (None:
    # Triton's default) pipelines nothing. Each program reads its B rows (BLOCK_O x r) and A columns (r x
    # BLOCK_I LOOP_I), float32: over the grid 4 r out in (1/BLOCK_O + 1/(BLOCK_I LOOP_I)) bytes (mostly L2
    # hits), against W's 2 out in itemsize. LOOP_I > 1: B's tile loaded once, A's and W's tiles pipelined over
    # the loop (AOT sm90 r = 64: 120 KiB of shared memory at 64 x 128, 160 KiB at 128 x 128 w8, no spills).
    # LR_PREC "ieee": the product as float32 FMAs on the CUDA cores (r per element: 0.72 / 2.9 GFMA at r = 16 /
    # 64 and 4096 x 11008, ~24 / ~97 us of an H100's FP32 issue at 1.75 GHz) instead of a TF32 dot; BLOCK_RK:
    # the rank in slices of that depth, pipelined (the FMA dot holds a slice's operands in registers: at r = 64
    # in one slice it spills 6.8 KB with 4 warps, AOT sm90; 16-deep slices: 104-182 registers, no spills)
    (64, 128, 4, None),
    (64, 128, 4, 3, 1, "ieee", 16), (64, 128, 8, 3, 1, "ieee", 16), (128, 128, 8, 3, 1, "ieee", 16),
    (32, 128, 4, 3, 1, "ieee", 16), (64, 256, 8, 3, 1, "ieee", 16), (64, 128, 8, 3, 4, "ieee", 16),
    (64, 128, 4, 3, 1, None, 16), (128, 128, 8, 3, 1, None, 16),
    (64, 128, 4, 3, 4), (64, 128, 4, 3, 16), (128, 128, 8, 3, 4),
    (128, 128, 4, None), (128, 128, 8, None), (64, 256, 4, None),
    (128, 256, 8, None), (256, 128, 8, None), (32, 256, 4, None), (128, 64, 4, None),
]  # fmt: skip
# a merged weight must stay within half an ulp of W's dtype of the exact float64 sum, beyond the low-rank
# product's own (TF32) error (fedlora_fast.testing.merged_weight_bounds, as test_merged_weight_poisoned), as a
# ratio (ulp_err_W = max over W' of (|got - exact| - low-rank error) / half an ulp of |exact|; <= 1 holds it)
MERGE_ULP_BOUND = 1.0


def merge_config(bo: int, bi: int, warps: int, stages, loop_i: int = 1, prec: str | None = None,
                 block_rk: int | None = None) -> dict:
    """A ``MERGE_SWEEP`` entry as the kernels' ``_CUDA_BLOCKS["merge"]`` dict (num_stages only where set,
    LOOP_I only above 1, LR_PREC and BLOCK_RK only where given)."""
    cfg = dict(BLOCK_O=bo, BLOCK_I=bi, num_warps=warps)
    if stages is not None:
        cfg["num_stages"] = stages
    if loop_i > 1:
        cfg["LOOP_I"] = loop_i
    if prec is not None:
        cfg["LR_PREC"] = prec
    if block_rk is not None:
        cfg["BLOCK_RK"] = block_rk
    return cfg


def time_merge(out, inp, r, dtype, device, reps: int) -> float:
    """Milliseconds of one full merge ``W + s B A`` at W (out, in) on the shipped config (``_merged_weight``,
    ``kernel_ms``): what ``ffa_flat[cache]``'s first step after an optimizer update adds to its timed steps."""
    from fedlora_fast.kernels import ffa_linear as K

    w = torch.randn(out, inp, device=device).to(dtype)
    A = torch.randn(r, inp, device=device)
    B = torch.randn(out, r, device=device)
    return kernel_ms(lambda: K._merged_weight(w, A, B, 2.0), device, reps)


def sweep_merge(out, inp, r, dtype, device, reps: int) -> list[dict]:
    """Time the merge kernel alone (``_merged_weight``: W' = W + s B A, rounded once to W's dtype) for each
    config of ``MERGE_SWEEP`` at W (out, in), with its error vs float64 in half-ulps of W's dtype
    (``ulp_err_W``, beyond the TF32 product's allowance: a config must hold ``MERGE_ULP_BOUND`` to be
    shipped; ``ulp_err_W_strict``, with no allowance: about 1 where the products are exact, "ieee", and
    above where they are TF32, which shows that a config's LR_PREC took effect) and GB/s of W's traffic
    (read W, write W')."""
    from fedlora_fast.kernels import ffa_linear as K
    from fedlora_fast.testing import merged_weight_bounds

    w = (torch.randn(out, inp, device=device) * inp**-0.5).to(dtype)
    A = torch.randn(r, inp, device=device, dtype=torch.float32) * inp**-0.5
    B = torch.randn(out, r, device=device, dtype=torch.float32) * 0.05
    s = 2.0
    exact, half_ulp, lowrank_err = merged_weight_bounds(w, A, B, s)
    w_bytes = 2 * w.numel() * w.element_size()
    fn = lambda: K._merged_weight(w, A, B, s)  # noqa: E731
    rows = []
    for bo, bi, warps, stages, *loop in MERGE_SWEEP:
        cfg = merge_config(bo, bi, warps, stages, *loop)
        try:
            with blocks_override("merge", cfg):
                with nan_outputs():
                    got = fn()
                if got.dtype != dtype or got.shape != (out, inp):
                    raise RuntimeError(f"merged weight {got.dtype} {tuple(got.shape)}")
                diff = (got.double() - exact).abs()
                ulp_err = float(((diff - lowrank_err) / half_ulp).max())
                ulp_err_strict = float((diff / half_ulp).max())
                rel_err = float(diff.max() / exact.abs().max())
                del got, diff
                ms = kernel_ms(fn, device, reps)
                launch = K._merge_launch(device, dtype, r, out, inp)  # as the kernel ran: BLOCK_RK clamped
            # A and B as read: B's tile once per program, or once per LOOP_I step where the rank is sliced
            b_steps = 1 if launch["BLOCK_RK"] == launch["BLOCK_R"] else launch["LOOP_I"]
            ab_bytes = 4 * r * out * inp * (1 / bo + b_steps / (bi * launch["LOOP_I"]))
            rows.append({"config": cfg, "ms": ms, "w_gbps": w_bytes / (ms * 1e-3) / 1e9,
                         "ab_bytes_per_w_byte": ab_bytes / w_bytes, "ulp_err_W": ulp_err,
                         "ulp_err_W_strict": ulp_err_strict, "rel_err_W": rel_err})
        except Exception as e:  # noqa: BLE001  (a config that fails to compile or fit: report, keep sweeping)
            rows.append({"config": cfg, **sweep_error(e)})
    return rows


def u_cublas_baselines(x, A, u64, device, reps: int) -> list[dict]:
    """What cuBLAS makes of the U pass, for the notes (never shipped by ``choose_blocks``): A split into
    ``terms`` bfloat16 terms (1: A rounded once, as peft's bf16 LoRA; 3: float32-accurate, as our kernel),
    one GEMM with float32 output (``torch.mm(..., out_dtype=float32)``, CUDA) and the terms' partial U summed.
    If the 3-term GEMM runs near X's copy speed, a cuBLAS U pass is the next candidate to build."""
    if x.dtype != torch.bfloat16 or device.type != "cuda":
        return []
    x2 = x.reshape(-1, x.shape[-1])
    r = A.shape[0]
    rows = []
    for terms in (1, 3):
        parts, rest = [], A
        for _ in range(terms):
            parts.append(rest.to(torch.bfloat16))
            rest = rest - parts[-1].float()
        at = torch.cat(parts).t()  # (in, terms * r): one GEMM for every term

        def fn(at=at, terms=terms):
            u = torch.mm(x2, at, out_dtype=torch.float32)
            return u if terms == 1 else u.view(-1, terms, r).sum(1)

        entry = {"config": {"cublas_terms": terms}, "baseline": True}
        try:
            entry["rel_err_U"] = float((fn().double().view_as(u64) - u64).abs().max() / u64.abs().max())
            entry["ms"] = kernel_ms(fn, device, reps)
            entry["x_gbps"] = x.numel() * x.element_size() / (entry["ms"] * 1e-3) / 1e9
        except Exception as e:  # noqa: BLE001  (torch without mm's out_dtype: say so, keep going)
            entry["error"] = repr(e)[:200]
        rows.append(entry)
    return rows


# relative error vs float64 that U, P and the norms must hold at every swept shape for a config to be shipped:
# float32-class. On an H100 (2026-11-26) the chained split paths held 1.3e-7..4.3e-7 (PROMOTE = 1); the packed
# ones (PACK / PACK_W: each term's sum promoted per K block) mostly 1.1e-6..3.7e-6 for P and the norms and
# 1.3e-5 for U, as did cuBLAS on the three terms. 4e-6, the CUDA accuracy test's guard, let PACK through by 7 %.
ACCURACY_BOUND = 1e-6
SWEEP_ERRORS = {"sweep_outer": ("rel_err_P", "rel_err_nu"), "sweep_u": ("rel_err_U",), "sweep_merge": ("ulp_err_W",)}
SWEEP_KIND = {"sweep_outer": "outer", "sweep_u": "narrow", "sweep_merge": "merge"}  # the _CUDA_BLOCKS entry each tunes
ERROR_BOUNDS = {"ulp_err_W": MERGE_ULP_BOUND}  # errors in other units than choose_blocks' relative ``bound``


def choose_blocks(rows: list[dict], bound: float = ACCURACY_BOUND) -> dict[str, dict]:
    """From a sweep results file's rows: per kernel kind, the config with the least total time over every
    swept shape among those that ran at every shape and held ``bound`` there (None where none did); the merged
    weight's error is in half-ulps, held to ``ERROR_BOUNDS``. A kind is judged over the rows that swept it."""
    chosen = {}
    for sweep, errs in SWEEP_ERRORS.items():
        totals: dict[str, list] = {}
        for row in rows:
            for entry in row.get(sweep, []):
                if entry.get("baseline") or "split_k" in entry:  # a reference point for the notes / U's
                    continue  # split rule's probe, not a config to ship
                key = json.dumps(entry["config"], sort_keys=True)
                ok = "error" not in entry and all(entry[e] <= ERROR_BOUNDS.get(e, bound) for e in errs)
                t = totals.setdefault(key, [entry["config"], 0.0, 0, True])
                t[1] += entry.get("ms", 0.0) + entry.get("ms_nov", 0.0)  # the pass with V and without
                t[2] += 1
                t[3] &= ok
        shapes = sum(1 for row in rows if sweep in row)
        good = [t for t in totals.values() if t[3] and t[2] == shapes and shapes > 0]
        chosen[SWEEP_KIND[sweep]] = min(good, key=lambda t: t[1])[0] if good else None
    return chosen


def apply_blocks(chosen: dict[str, dict | None]) -> dict[str, dict]:
    """Make the kernels use ``chosen`` configs (this process only); returns what was applied.

    ``_blocks(kind, ...)`` on CUDA then answers the chosen config for that kind at every rank and dtype, as
    during the sweep (``blocks_override``), with only the stage cap applied: the kernels' rank rules
    (``_CUDA_MERGE_WIDE``, ``_CUDA_NARROW_WIDE_SM90``, ...) would otherwise replace a tile swept at r = 64 by
    the shipped r = 64 one, and the layer would run a config other than the one the sweep chose."""
    from fedlora_fast.kernels import ffa_linear as K

    applied = {kind: dict(cfg) for kind, cfg in chosen.items() if cfg is not None}
    if applied:
        real = K._blocks

        def chosen_blocks(kind, device, dtype=None, **dims):
            if kind not in applied or device.type != "cuda":
                return real(kind, device, dtype, **dims)
            cfg = dict(applied[kind])
            cap = getattr(K._LAUNCH, "stage_cap", None)
            if cap is not None:
                cfg["num_stages"] = min(cfg.get("num_stages", 3), cap)
            return cfg

        K._blocks = chosen_blocks
    return {kind: dict(cfg) for kind, cfg in applied.items()}


def blocks_from_file(path: str, r: int, dtype: str) -> dict[str, dict] | None:
    """``--blocks-from``: ``apply_blocks(choose_blocks(rows))`` of a sweep results file, where it was swept at this
    run's rank and dtype only (``apply_blocks`` answers its configs at every rank and dtype: a file swept at
    r = 16 or in bf16 would put untimed tiles, or tiles that spill or do not fit, on an r = 64 or a float32
    run). Returns what was applied, or None (with the reason printed) where the file does not match."""
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)["rows"]
    swept = sorted({(row.get("r"), row.get("dtype")) for row in rows}, key=str)
    if swept != [(r, dtype)]:
        print(f"# kernel configs from {path}: NOT applied: swept at (r, dtype) {swept}, this run is r={r} {dtype}; "
              "the shipped configs run", flush=True)
        return None
    return apply_blocks(choose_blocks(rows))


def print_sweeps(row: dict) -> None:
    for sw in row.get("sweep_u", []):
        print(f"## U n={row['n']} T={row['T']} in={row['in']} {sw['config']}"
              + (f" (the rule takes SPLIT_K={sw['rule']})" if "split_k" in sw else "")
              + (f" [K in {sw['split_taken']} part(s)]" if "split_taken" in sw else "") + ": "
              + (f"{sw['ms'] * 1e3:.0f}us ({sw['x_gbps']:.0f} GB/s of X; rel. error {sw['rel_err_U']:.1e})"
                 if "ms" in sw else sw["error"]), flush=True)
    for sw in row.get("sweep_outer", []):
        print(f"## outer n={row['n']} T={row['T']} out={row['out']} {sw['config']}: "
              + (f"{sw['ms'] * 1e3:.0f}us with V, {sw['ms_nov'] * 1e3:.0f}us without ({sw['g_gbps']:.0f} / "
                 f"{sw['g_gbps_nov']:.0f} GB/s of G; rel. error P {sw['rel_err_P']:.1e}, norms {sw['rel_err_nu']:.1e})"
                 if "ms" in sw else sw["error"]), flush=True)
    for sw in row.get("sweep_merge", []):
        print(f"## merge n={row['n']} out={row['out']} in={row['in']} {sw['config']}: "
              + (f"{sw['ms'] * 1e3:.0f}us ({sw['w_gbps']:.1f} GB/s of W; err {sw['ulp_err_W']:.2f} half-ulp "
                 f"({sw['ulp_err_W_strict']:.2f} with no TF32 allowance), "
                 f"rel. {sw['rel_err_W']:.1e}; A+B reads {sw['ab_bytes_per_w_byte']:.2f}x W's bytes)"
                 if "ms" in sw else sw["error"]), flush=True)


# --- correctness -----------------------------------------------------------------------------------------
def check_ops(n, T, inp, out, r, dtype, device, gemms) -> list[dict]:
    """The Triton ops vs the float64 reference, one entry per base-GEMM path in ``gemms`` (FEDLORA_FAST_GEMM);
    low precision judged against PyTorch's own error (as tests/test_ffa_linear.py):
    err <= 2 * err(torch, same dtype) + 1e-3 * max|ref|.

    The inputs and both references (float64, and PyTorch in ``dtype``) are built once for every path (at
    8x2048 4096->11008 that is seconds of random numbers drawn on the CPU). A path that raises is recorded as
    ``{"ok": False, "gemm": ..., "error": ...}`` and the other paths are still checked."""
    from fedlora_fast import reference as ref
    from fedlora_fast.kernels import ffa_linear as K

    gemms = [gemms] if isinstance(gemms, str) else list(gemms)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    x = rnd(n, T, inp).to(dtype)
    w, b = rnd(out, inp, scale=inp**-0.5).to(dtype), rnd(out).to(dtype)
    A, B = rnd(r, inp, scale=inp**-0.5), rnd(out, r, scale=0.05)
    gy = rnd(n, T, out, scale=0.01).to(dtype)
    s = 2.0
    d = lambda t: t.double()  # noqa: E731
    modes = (ref.MODE_PER_SAMPLE, ref.MODE_CLIP)
    args = (w, A, B, None, s, True, False)
    tail = (1.0, 0.0)
    y64, u64 = ref.ffa_linear_fwd(d(x), d(x), d(w), d(b), d(A), d(B), s)
    ylp, ulp = ref.ffa_linear_fwd(x, x, w, b, A, B, s)
    exp_bwd = {m: ref.ffa_linear_bwd(d(gy), u64, d(w), d(A), d(B), None, s, True, False, m, *tail) for m in modes}
    lowp_bwd = {m: ref.ffa_linear_bwd(gy, ulp, *args, m, *tail) for m in modes}

    def judge(worst, name, got, exp64, lowp):
        e = (got.double() - exp64).abs().max().item()
        t = (lowp.double() - exp64).abs().max().item()
        scale = exp64.abs().max().item()
        # U, the per-sample gradients and their norms are float32 maths whatever the input dtype (the
        # norms decide the clipping): held to float32-class error, not to the bf16 output's 1e-3
        fp32_class = name.split("[")[0] in ("u", "gB", "nuB")
        rel = 4e-6 if fp32_class else 1e-3
        ok = e <= 2 * t + rel * scale if dtype != torch.float32 else e <= 1e-5 * scale + 1e-7
        worst[name] = {"err": e, "torch_err": t, "scale": scale, "ok": bool(ok)}

    results = []
    for gemm in gemms:
        worst: dict = {}
        keep = CHECK_KEEP.get(gemm)  # the bwd calls below reuse the fwd's U: its kept W'
        # the cache keys on a layer's weight Parameter (a plain tensor would run keep_merged under its name)
        wg = torch.nn.Parameter(w, requires_grad=False) if gemm == MERGED_CACHED else w
        with harness.env_var(K.GEMM_ENV_VAR, "merged" if keep else gemm), harness.env_var(K.KEEP_ENV_VAR, keep):
            try:
                if gemm == MERGED_CACHED:  # W' made from another B, then checked against B (a re-merge of
                    kept_B = B.clone()  # every tile, as after an optimizer step), then checked again (no
                    B.data.add_(0.5)  # change: the steady state the steps time)
                    K.ffa_linear_fwd(x, x, wg, b, A, B, s)
                    B.data.copy_(kept_B)
                    judge(worst, "y[re-merged]", K.ffa_linear_fwd(x, x, wg, b, A, B, s)[0], y64, ylp)
                y, u = K.ffa_linear_fwd(x, x, wg, b, A, B, s)
                if gemm == MERGED_CACHED and not any(e.refs[0]() is wg for e in K._MERGED_CACHE.values()):
                    raise RuntimeError("the merged-weight cache did not apply: the check would pass another path")
                judge(worst, "y", y, y64, ylp)
                judge(worst, "u", u, u64, ulp)
                for mode in modes:
                    got = K.ffa_linear_bwd(gy, u, wg, *args[1:], mode, *tail)
                    for name, a_, e_, l_ in zip(["dx", "dxa", "gB", "nuB"], got, exp_bwd[mode], lowp_bwd[mode]):
                        if e_.numel():
                            judge(worst, f"{name}[mode={mode}]", a_, e_, l_)
                results.append({"ok": all(v["ok"] for v in worst.values()), "gemm": gemm, "details": worst})
            except Exception as err:  # noqa: BLE001  (one GEMM path failing must not cost the others' checks)
                results.append({"ok": False, "gemm": gemm, "error": f"{type(err).__name__}: {err}"[:300],
                                "details": worst})
                print(f"# check of ffa_flat[{gemm}] failed at n={n} T={T} {inp}->{out}: {results[-1]['error']}",
                      flush=True)
    return results


# --- driver ----------------------------------------------------------------------------------------------
def parse_pairs(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        a, _, b = item.strip().lower().partition("x")
        if not (a.isdigit() and b.isdigit()):
            raise SystemExit(f"expected comma-separated AxB pairs such as 4096x11008, got {item!r}")
        out.append((int(a), int(b)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    ap.add_argument("--shapes", default=None, help="in x out pairs, e.g. 4096x4096,4096x11008 (default Llama-7B)")
    ap.add_argument("--tokens", default=None, help="n x T pairs, e.g. 8x512,8x2048")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--reps", type=int, default=10, help="CUDA: do_bench rep budget x10 ms; CPU: timed calls")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds of every variant's full step (ratios within a round; 0: none; "
                         "default 5, 1 with --smoke: three rounds left the ratio's run-to-run spread at "
                         "0.02-0.05 on an H100, and a round costs ~1 s per shape)")
    ap.add_argument("--variants", default="floor,ffa_flat[auto],ffa_flat[graph],ffa_flat[triton],ffa_flat[cublas],ffa_flat[cublas_acc],ffa_flat[merged],ffa_per_layer,peft_opacus",
                    help="ffa_flat[reference] is the same layer on the PyTorch reference ops (not counted as ours)")
    ap.add_argument("--peft-train-A", action="store_true", help="peft+opacus trains A too (vanilla LoRA)")
    ap.add_argument("--json", default=None, help="results file (default bench/results/gpu_layer_<device>_<date>.json)")
    ap.add_argument("--profile", action="store_true", help="CUDA: per-kernel device time of every variant (profiler)")
    ap.add_argument("--sweep-outer", action="store_true",
                    help="CUDA: time the one-pass backward's, the U pass's and the merged weight's block configs "
                         "(with their errors)")
    ap.add_argument("--sweep-only", action="store_true",
                    help="only the --sweep-outer sweeps (one-pass, U and merge configs, each with its float64 "
                         "error), no variants: the short GPU step that decides the kernel configs")
    ap.add_argument("--sweeps", default="u,merge,outer",
                    help="which sweeps --sweep-only / --sweep-outer run (comma-separated: u, merge, outer; "
                         "--blocks-from keeps the defaults of the kernels not swept)")
    ap.add_argument("--blocks-from", default=None, metavar="SWEEP_JSON",
                    help="use, for this run, the fastest one-pass, U and merge configs of a --sweep-only results file "
                         f"that held {ACCURACY_BOUND:g} relative error (merge: half an ulp of W's dtype) at every "
                         "swept shape")
    ap.add_argument("--host", action="store_true",
                    help="CUDA: CPU time to issue each variant's step, and a cProfile of ours at the first shape")
    args = ap.parse_args(argv)

    if args.smoke and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the interpreter's dots are small numpy matmuls
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_layer.py needs a CUDA device (use --smoke for the CPU interpreter run)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.environ["FEDLORA_FAST_BACKEND"] = "triton"
    dtype = getattr(torch, args.dtype)
    elem = ELEM[dtype]  # bytes per element (not `e`: an `except ... as e` in main would unbind it)
    shapes = parse_pairs(args.shapes) if args.shapes else (SMOKE_SHAPES if args.smoke else LLAMA7B)
    tokens = parse_pairs(args.tokens) if args.tokens else (SMOKE_TOKENS if args.smoke else TOKENS)
    reps = 2 if args.smoke and args.reps == 10 else args.reps
    if args.rounds is None:
        args.rounds = 1 if args.smoke else 5
    which = [v.strip() for v in args.variants.split(",") if v.strip()]
    if any(f"ffa_flat[{k}]" in which for k in KEEP_VARIANTS):
        harness.refuse_global("FEDLORA_FAST_KEEP_MERGED",
                              "ffa_flat[keep] and [cache] set it for themselves; the others would keep too")
    sweeps = {v.strip() for v in args.sweeps.split(",") if v.strip()}
    if not sweeps or sweeps - {"u", "merge", "outer"}:
        ap.error(f"--sweeps: expected a comma-separated subset of u, merge, outer; got {args.sweeps!r}")
    if sweeps != {"u", "merge", "outer"} and not (args.sweep_only or args.sweep_outer):
        ap.error(f"--sweeps {args.sweeps!r} chooses the sweeps of --sweep-only or --sweep-outer: give one of them")

    blocks_applied = {}
    if args.blocks_from:
        blocks_applied = blocks_from_file(args.blocks_from, args.r, args.dtype)
        if blocks_applied is not None:
            print(f"# kernel configs from {args.blocks_from}: {blocks_applied or 'none held the bound: defaults'}")
        blocks_applied = blocks_applied or {}
    info = harness.machine_info(device)
    ceil = ceilings(device, dtype)
    print(f"# {info['device']}  load {info['load_avg_1_5_15']}  dtype {args.dtype}  r={args.r}")
    if ceil["matmul_tflops"] is not None:
        print(f"# ceilings: matmul {ceil['matmul_tflops']:.0f} TFLOP/s, copy {ceil['copy_gbps']:.0f} GB/s")
    path = args.json
    if path is None:
        # bfloat16 (the issue's dtype) keeps the plain name; another dtype's run must not overwrite it
        tag = "" if dtype == torch.bfloat16 else f"_{args.dtype}"
        name = f"gpu_layer_{harness.device_slug(device)}_{harness.utc_date()}{tag}.json"
        results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        folder = tempfile.mkdtemp(prefix="gpu_layer_smoke_") if args.smoke else results
        path = os.path.join(folder, name)

    def write(rows: list) -> None:
        tuned = {}
        if device.type == "cuda":
            from fedlora_fast.kernels import ffa_linear as K

            tuned = {str(k): str(v) for k, v in getattr(K._gemm_lowrank_tuned, "cache", {}).items()}
            tuned.update({f"tma {k}": str(v) for k, v in getattr(K._gemm_tma_tuned, "cache", {}).items()})
            tuned.update({f"auto {k}": v for k, v in K._AUTO_CHOICE.items()})
        harness.write_json(path, {
            "bench": "gpu_layer",
            "gemm_autotune_choices": tuned,
            "blocks_applied": blocks_applied,
            "machine": info,
            "ceilings": ceil,
            "definitions": DEFINITIONS,
            "smoke": bool(args.smoke),
            "complete": len(rows) == len(tokens) * len(shapes),
            "rows": rows,
        })  # fmt: skip

    rows = []
    merged_shapes: set = set()  # the (in, out) whose merge sweep ran
    for (n, T) in tokens:
        for (inp, out) in shapes:
            N = n * T
            if args.sweep_only:
                row = {"device": info["device"], "n": n, "T": T, "tokens": N, "in": inp, "out": out, "r": args.r,
                       "dtype": args.dtype}
                if "u" in sweeps:
                    row["sweep_u"] = sweep_u(n, T, inp, args.r, dtype, device, reps)
                if "merge" in sweeps and (inp, out) not in merged_shapes:  # W' depends on the shape, not the tokens
                    merged_shapes.add((inp, out))
                    row["sweep_merge"] = sweep_merge(out, inp, args.r, dtype, device, reps)
                    write(rows + [row])
                if "outer" in sweeps:  # written after every config: a sweep cut short keeps what it timed
                    row["sweep_outer"] = sweep_outer(n, T, out, args.r, dtype, device, reps,
                                                     progress=lambda done: write(rows + [dict(row, sweep_outer=done)]))
                # every config of ours ran (cuBLAS's U baselines are reference points: their failure is no fault)
                row["correct"] = sweep_row_correct(row)
                rows.append(row)
                write(rows)
                print_sweeps(row)
                continue
            torch.manual_seed(0)
            base = torch.nn.Linear(inp, out, device=device, dtype=dtype)
            base.requires_grad_(False)
            x = torch.randn(n, T, inp, device=device, dtype=dtype, requires_grad=True)
            g = torch.randn(n, T, out, device=device, dtype=dtype) * 0.01
            try:  # inputs and references built once per row; each GEMM path's failure is its own entry
                checks = check_ops(n, T, inp, out, args.r, dtype, device, gemms_to_check(which, device.type))
            except Exception as err:  # noqa: BLE001  (e.g. out of memory building the references: time anyway)
                checks = [{"ok": False, "gemm": "references", "error": f"{type(err).__name__}: {err}"[:300]}]
                print(f"# checks failed at n={n} T={T} {inp}->{out}: {checks[0]['error']}", flush=True)
            times, failed = {}, {}
            variants = make_variants(base, x, g, args.r, args.alpha, peft_train_A=args.peft_train_A, which=which,
                                     failed=failed)
            for name, v in list(variants.items()):
                try:
                    v.step()  # warm-up: autotune, caches, lazily built hooks
                    if gemm_of(name) in (CACHE, GRAPH_CACHE):
                        cache_applies(v, captured=gemm_of(name) == GRAPH_CACHE)
                    fwd = bench_ms(v.forward, device, reps)
                    full = bench_ms(v.step, device, reps)
                except Exception as err:  # noqa: BLE001  (one variant failing must not cost the others' numbers)
                    failed[name] = f"{type(err).__name__}: {err}"[:300]
                    print(f"# {name} failed at n={n} T={T} {inp}->{out}: {failed[name]}", flush=True)
                    del variants[name]
                    continue
                # backward = full - forward: opacus' hooks consume the forward's activations, so a retained
                # graph cannot be re-run for it alone; the same derivation for every variant
                times[name] = {"fwd_ms": fwd, "bwd_ms": full - fwd, "full_ms": full}
            if "floor" in variants:  # the floor again, after every variant: the clock's drift over the row
                times["floor"]["full_ms_again"] = bench_ms(variants["floor"].step, device, reps)
            # rounds of every variant's full step, the order rotated each round: ratios taken within a round
            # do not drift with the card's clocks the way the sequential timings above can (7-9 % over a row
            # on an H100, 2026-11-26)
            interleave_error = None
            try:  # a failure in a later round (out of memory, say) keeps the row's sequential numbers
                interleaved = interleave(variants, device, reps, args.rounds) if args.rounds > 0 else {}
            except Exception as err:  # noqa: BLE001  (a timing failure, not a correctness one: own key)
                interleave_error = f"{type(err).__name__}: {err}"[:300]
                print(f"# interleaved rounds failed at n={n} T={T} {inp}->{out}: {interleave_error}", flush=True)
                interleaved = {}
            if args.host and device.type == "cuda":
                for name, v in variants.items():
                    try:  # a diagnostic, as the profile below: never lose the row's timings
                        times[name]["host_ms"] = host_ms(v.step, device)
                    except Exception as err:  # noqa: BLE001
                        times[name]["host_error"] = f"{type(err).__name__}: {err}"[:300]
                ours = next((k for k in variants if k.startswith("ffa_flat")), None)
                if ours and not rows:
                    try:
                        text = python_profile(variants[ours].step)
                    except Exception as err:  # noqa: BLE001
                        text = f"failed: {type(err).__name__}: {err}"[:300]
                    print(f"## cProfile of {ours}.step (n={n} T={T} {inp}->{out}), 30 steps:\n{text}")
            profiles = {}
            if args.profile and device.type == "cuda":
                for name, v in variants.items():
                    try:
                        profiles[name] = kernel_table(v.step)
                    except Exception as err:  # noqa: BLE001  (the profile is a diagnostic: never lose the timings)
                        profiles[name] = [{"kernel": f"profile failed: {err!r}"[:200], "us_per_step": 0.0, "calls_per_step": 0}]
            variants.clear()
            merge_ms = None
            if any(f"ffa_flat[{k}]" in times for k in (CACHE, GRAPH_CACHE)):  # what a step after an update adds
                try:
                    merge_ms = time_merge(out, inp, args.r, dtype, device, reps)
                except Exception as err:  # noqa: BLE001  (a reference time: never lose the row's timings)
                    print(f"# merge_ms failed at n={n} T={T} {inp}->{out}: {err!r}"[:300], flush=True)
            swept = sweeps if args.sweep_outer and device.type == "cuda" else set()
            sweep = sweep_outer(n, T, out, args.r, dtype, device, reps) if "outer" in swept else None
            sweep_x = sweep_u(n, T, inp, args.r, dtype, device, reps) if "u" in swept else None
            sweep_m = None
            if "merge" in swept and (inp, out) not in merged_shapes:
                merged_shapes.add((inp, out))
                sweep_m = sweep_merge(out, inp, args.r, dtype, device, reps)
            pinned = [k for k in times if pinned_gemm(k) is not None]
            best = min(pinned, key=lambda k: times[k]["full_ms"]) if pinned else None
            # the headline is what a user gets by default (FEDLORA_FAST_GEMM=auto); else the best pinned GEMM
            ours = "ffa_flat[auto]" if "ffa_flat[auto]" in times else best
            ff_flops, ff_bytes = ffa_work(n, N, inp, out, args.r, elem)
            fl_flops, fl_bytes = floor_work(N, inp, out, elem)
            row = {
                "device": info["device"],
                "n": n, "T": T, "tokens": N, "in": inp, "out": out, "r": args.r, "dtype": args.dtype,
                "correct": all(c["ok"] for c in checks),
                "checks": checks,
                "times_ms": times,
                "best_ffa": best,
                "ours": ours,
            }  # fmt: skip
            if interleave_error:
                row["interleave_error"] = interleave_error
            if merge_ms is not None:
                row["merge_ms"] = merge_ms
            if failed:
                row["failed"] = failed
                row["correct"] = False  # a variant that cannot run is not a pass
            if profiles:
                row["kernels"] = profiles
                ratios = kernel_time_ratios(profiles)
                if ratios:
                    row["ratio_to_floor_kernel_time"] = ratios  # every profiled variant's, by name
            if sweep is not None:
                row["sweep_outer"] = sweep
            if sweep_x is not None:
                row["sweep_u"] = sweep_x
            if sweep_m is not None:
                row["sweep_merge"] = sweep_m
            if ours and "floor" in times:  # replaced by the interleaved median below where rounds ran
                row["ratio_to_floor"] = times[ours]["full_ms"] / times["floor"]["full_ms"]
                row["ratio_to_floor_fwd"] = times[ours]["fwd_ms"] / times["floor"]["fwd_ms"]
                row["ratio_to_floor_bwd"] = times[ours]["bwd_ms"] / times["floor"]["bwd_ms"]
                if best:
                    row["ratio_to_floor_best_pinned"] = times[best]["full_ms"] / times["floor"]["full_ms"]
            pairs = (("ratio_to_floor", ours, "floor"), ("ratio_to_peft_opacus", ours, "peft_opacus"),
                     *((key, f"ffa_flat[{v}]", "floor") for key, v in VARIANT_RATIOS.items()),
                     ("ratio_to_floor_best_pinned", best, "floor"))
            if interleaved:
                row["interleaved_full_ms"] = interleaved
                for key, a, b in pairs:
                    if a in interleaved and b in interleaved:
                        row[f"{key}_interleaved"] = statistics.median(
                            x / y for x, y in zip(interleaved[a], interleaved[b]))
                if all(v in interleaved for v in (ours, "floor", "peft_opacus")):
                    over = [(o - f) / (p - f) for o, f, p in
                            zip(interleaved[ours], interleaved["floor"], interleaved["peft_opacus"]) if p > f]
                    if over:
                        row["overhead_ratio_to_peft_opacus_interleaved"] = statistics.median(over)
            if "full_ms_again" in times.get("floor", {}):
                row["floor_drift"] = times["floor"]["full_ms_again"] / times["floor"]["full_ms"]
            for key, v in VARIANT_RATIOS.items():
                name = f"ffa_flat[{v}]"
                if name in times and "floor" in times:
                    row[key] = times[name]["full_ms"] / times["floor"]["full_ms"]
            if ours and "peft_opacus" in times:
                row["ratio_to_peft_opacus"] = times[ours]["full_ms"] / times["peft_opacus"]["full_ms"]
                if "floor" in times and times["peft_opacus"]["full_ms"] > times["floor"]["full_ms"]:
                    row["overhead_ratio_to_peft_opacus"] = (
                        (times[ours]["full_ms"] - times["floor"]["full_ms"])
                        / (times["peft_opacus"]["full_ms"] - times["floor"]["full_ms"])
                    )
            for key in [p[0] for p in pairs] + ["overhead_ratio_to_peft_opacus"]:  # drift-free where rounds ran
                if f"{key}_interleaved" in row and key in row:
                    row[f"{key}_sequential"] = row[key]
                    row[key] = row[f"{key}_interleaved"]
            for k, t in times.items():
                flops, bytes_ = (fl_flops, fl_bytes) if k == "floor" else (ff_flops, ff_bytes)
                t["tflops"] = flops / (t["full_ms"] * 1e-3) / 1e12
                t["gbps"] = bytes_ / (t["full_ms"] * 1e-3) / 1e9
                if ceil["matmul_tflops"] is not None:
                    t["frac_matmul_ceiling"] = t["tflops"] / ceil["matmul_tflops"]
                    t["frac_copy_ceiling"] = t["gbps"] / ceil["copy_gbps"]
            rows.append(row)
            write(rows)  # after every row: a run cut short by its time budget keeps what it measured
            print(
                f"n={n} T={T} {inp}->{out}: correct={row['correct']}  "
                + "  ".join(
                    f"{k} {t['full_ms']:.3f}ms ({t['tflops']:.0f} TF/s"
                    + (f", host {t['host_ms']:.3f}ms)" if "host_ms" in t else ")")
                    for k, t in times.items()
                )
            )
            print(  # (a line of its own: the session log keeps only each line's first 600 characters)
                f"n={n} T={T} {inp}->{out} ratios:"
                + (f"  ours/floor {row['ratio_to_floor']:.3f}" if "ratio_to_floor" in row else "")
                + "".join(f" ({v.replace('_', ' ')} {row[key]:.3f})"  # ours/floor of each variant beside the headline
                          for key, v in VARIANT_RATIOS.items() if key in row)
                + (f" (merge {row['merge_ms']:.3f}ms)" if "merge_ms" in row else "")
                + (f"  ours/peft+opacus {row['ratio_to_peft_opacus']:.3f}" if "ratio_to_peft_opacus" in row else "")
                + (f" (overhead {row['overhead_ratio_to_peft_opacus']:.3f})" if "overhead_ratio_to_peft_opacus" in row else "")
                + (f"  | sequential: ours/floor {row['ratio_to_floor_sequential']:.3f}"
                   if "ratio_to_floor_sequential" in row else "")
                + (f" ours/peft+opacus {row['ratio_to_peft_opacus_sequential']:.3f}"
                   if "ratio_to_peft_opacus_sequential" in row else "")
                + (f"  floor drift {row['floor_drift']:.3f}" if "floor_drift" in row else "")
            )
    if args.profile:
        for row in rows:
            for name, table in row.get("kernels", {}).items():
                print(f"## n={row['n']} T={row['T']} {row['in']}->{row['out']} {name}: "
                      + "; ".join(f"{k['kernel'][:40]} {k['us_per_step']:.0f}us/step = {k['calls_per_step']:.0f} x "
                                  f"{k.get('us_per_call', 0.0):.0f}us" for k in table[:6])
                      + (f" | kernel time x floor {row['ratio_to_floor_kernel_time'][name]:.3f}"
                         if name in row.get("ratio_to_floor_kernel_time", {}) else ""))
    if not args.sweep_only:
        for row in rows:
            print_sweeps(row)
    write(rows)
    print(f"# wrote {path}")
    return 0 if all(r["correct"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Shared benchmark helpers: interleaved timing, peak memory in a fresh process, results rows with provenance.

Follows the shared-harness pattern of Liger-Kernel's ``benchmark/scripts/utils.py`` and the Triton
tutorials' ``do_bench`` (warm-up first, then the median of repeated runs), with two changes for noisy
shared CPUs: variants are interleaved round by round (rotating the order) so that a load spike hits all of
them alike, and peak memory is taken in a fresh subprocess per variant so no variant pays for another's
allocations.

Timing: ``time.perf_counter`` around one call, with ``torch.cuda.synchronize`` before and after on CUDA;
on a loaded CPU, ``clock="cpu"`` takes the process's CPU time instead (see ``time_interleaved``).
Memory:
- CUDA: ``torch.cuda.max_memory_allocated`` in a fresh process holding only that variant (model, adapters,
  optimizer state, activations: everything the caching allocator handed out).
- CPU: the peak resident set size (``VmHWM`` from ``/proc/self/status``) of a fresh process holding only
  that variant, with the high-water mark reset (``/proc/self/clear_refs`` = 5) after the model is built, so
  the load-time peak is not counted. glibc is told to serve blocks >= 64 KiB with mmap
  (``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave the RSS and the peak tracks live memory.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch

MIN_REPS = 5
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
MMAP_THRESHOLD = 65536  # bytes; see the module docstring (CPU memory)
_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


# --- provenance ----------------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    """A human-readable name of the device: the GPU's name, or the CPU model with its usable core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({len(os.sched_getaffinity(0))} cores)"


def device_slug(device: torch.device | str) -> str:
    """A file-name-safe short device name, e.g. ``cpu2`` or ``NVIDIA_H100_80GB_HBM3``."""
    device = torch.device(device)
    if device.type == "cuda":
        return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(device)).strip("_")
    return f"cpu{len(os.sched_getaffinity(0))}"


def versions() -> dict[str, str]:
    """Versions of Python and of the packages whose code is timed (absent ones are left out)."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("fedlora_fast", "transformers", "peft", "opacus", "triton"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        out[name] = getattr(module, "__version__", "unknown")
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def machine_info(device: torch.device | str) -> dict:
    """Where and when a result was taken: device name, host load, versions, UTC date."""
    load = os.getloadavg()
    return {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "cpu": _cpu_name(),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1_5_15": [round(x, 2) for x in load],
        "platform": platform.platform(),
        "versions": versions(),
        # the library's settings in the environment the run started with (GEMM path, launch mode, kept W'...)
        "fedlora_fast_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("FEDLORA_FAST_")},
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def refuse_global(var: str, why: str) -> None:
    """SystemExit if ``var`` is set in the environment: a variant that sets it for itself is compared with
    variants that must run without it (``why``)."""
    if os.environ.get(var) is not None:
        raise SystemExit(f"{var}={os.environ[var]!r} is set in the environment: unset it ({why})")


def utc_date() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d")


@contextlib.contextmanager
def env_var(name: str, value: str | None):
    """``os.environ[name] = value`` for the block (None: left as it is), then restored (unset if it was): how
    the benches switch the ops' backend, GEMM and launch path (read per call) around one variant's calls."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


# --- timing ----------------------------------------------------------------------------------------------
def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def capture_cuda_graph(fn: Callable[[], object], warmup: int = 3) -> "torch.cuda.CUDAGraph":
    """``fn`` captured in a new CUDA graph, after ``warmup`` eager runs on a side stream (Triton compiles and
    autotunes, ``auto`` picks its GEMMs, cuBLAS sets up: none of that may happen inside a capture)."""
    if warmup:
        current, side = torch.cuda.current_stream(), torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    device: torch.device | str,
    reps: int = MIN_REPS,
    warmup: int = 1,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Time each callable ``reps`` times, interleaved: round k runs every variant once, order rotated by k.

    Args:
        fns: ``{name: fn}``; each ``fn()`` runs one complete unit of work (e.g. one training step).
        device: where the work runs (CUDA is synchronised around every call).
        reps: timed rounds (the median of >= 5 is what benchmarks report; fewer only for smoke runs).
        warmup: untimed calls of every variant before the first round (allocator, oneDNN/cuBLAS caches,
            lazily built hooks).
        on_round: called after each round with ``(round_index, {name: seconds})`` (progress printing).
        clock: ``"wall"`` (``time.perf_counter``, what a user waits) or ``"cpu"`` (``time.process_time``:
            CPU seconds of all this process's threads, so time spent descheduled by other jobs on a shared
            machine does not count; CPU devices only; with one torch thread it is the work itself).
    Returns:
        ``{name: [seconds per round]}`` in round order.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock: expected one of {tuple(CLOCKS)}, got {clock!r}")
    if clock == "cpu" and torch.device(device).type != "cpu":
        raise ValueError(f"clock='cpu' measures host CPU time: expected a cpu device, got {device}")
    now = CLOCKS[clock]
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps, warmup: expected reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
            sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for k in range(reps):
        order = names[k % len(names):] + names[: k % len(names)]
        this_round = {}
        for name in order:
            sync(device)
            t0 = now()
            fns[name]()
            sync(device)
            this_round[name] = now() - t0
            times[name].append(this_round[name])
        if on_round is not None:
            on_round(k, this_round)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(xs: list[float], ys: list[float]) -> float:
    """Median over rounds of ``xs[k] / ys[k]``: the ratio of two interleaved variants, robust to load drift.

    Each round runs both variants back to back, so a load change between rounds cancels in the per-round
    ratio; the ratio of the two medians does not have that property.
    """
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"xs, ys: expected two equally long non-empty lists, got {len(xs)} and {len(ys)}")
    return statistics.median(x / y for x, y in zip(xs, ys))


def spread(xs: list[float]) -> float:
    """Relative spread ``(max - min) / median`` of repeated timings: a noise indicator."""
    m = statistics.median(xs)
    return (max(xs) - min(xs)) / m if m > 0 else float("nan")


# --- memory ----------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open(_STATUS, encoding="utf-8") as f:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
    if m is None:
        raise RuntimeError(f"{_STATUS} has no {field} line")
    return int(m.group(1))


def _reset_rss_peak() -> bool:
    try:
        with open(_CLEAR_REFS, "w", encoding="utf-8") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak_memory(fn: Callable[[], object], *, device: torch.device | str, calls: int = 2) -> dict:
    """Peak memory of ``calls`` calls of ``fn`` in THIS process; meant for a fresh process per variant.

    Returns:
        ``{"mem_mb": peak, "mem_step_mb": peak - resident before the first call, "mem_method": ...}``
        in MiB (2**20 bytes).
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(calls):
            fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        method = "cuda max_memory_allocated, fresh process per variant"
        return {"mem_mb": peak / 2**20, "mem_step_mb": (peak - base) / 2**20, "mem_method": method}
    base_kb = _status_kb("VmRSS")
    reset = _reset_rss_peak()
    for _ in range(calls):
        fn()
    peak_kb = _status_kb("VmHWM")
    method = "cpu peak RSS (VmHWM), fresh process per variant, " + (
        "peak reset after model build" if reset else "peak NOT reset (includes model loading)"
    )
    return {"mem_mb": peak_kb / 1024, "mem_step_mb": (peak_kb - base_kb) / 1024, "mem_method": method}


def run_memory_child(argv: list[str], *, timeout: float = 1800) -> dict:
    """Run ``python argv...`` in a fresh process whose last stdout line is a JSON object; return it.

    The child inherits the environment plus ``MALLOC_MMAP_THRESHOLD_`` (see the module docstring).
    """
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    proc = subprocess.run(
        [sys.executable, *argv], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"memory child {argv} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}"
        )
    return json.loads(lines[-1])


# --- results ---------------------------------------------------------------------------------------------
def write_json(path: str, obj: dict) -> None:
    """Write ``obj`` as indented JSON atomically (temp file in the same folder, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

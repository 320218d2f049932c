"""Host (CPU) cost of issuing one piece of GPU work, path by path: where a host-bound step's time goes.

Issue 3: on the H100 machine the 1B-Llama DP step was host-bound (154 adapted layers, ~6 Triton launches
each; bench/NOTES.md). This measures, in microseconds of wall time per call *issued* (the GPU is waited
for only between rounds; every kernel here is tiny, so the launch queue never fills):

    torch_add         ``torch.add(a, b, out=c)``: PyTorch's dispatch floor
    gemm_jit          one recorded launch of our GEMM kernel through Triton's JIT (``kernel[grid](...)``:
                      argument binding, specialisation, cache key, then the driver launch)
    gemm_compiled     the same launch through the compiled kernel's own launcher (``CompiledKernel[grid]``):
                      what a launcher that skips the JIT's per-call work would cost; checked bit-equal
    spec_key          what the direct path spends per launch on its own cache key (``_spec_key``)
    ffa_fwd / ffa_bwd the Triton ops as the layer calls them (wrapper + 2 / 3-4 launches), per-sample mode
    *_direct          the same with FEDLORA_FAST_LAUNCH=direct (compiled kernels launched without the JIT),
                      in rounds alternating with the JIT's (CUDA: the row without the suffix sets
                      FEDLORA_FAST_LAUNCH=jit; direct is the default with Triton 3.4-3.9)
    floor_step        frozen ``nn.Linear`` forward + input-gradient backward (autograd), tiny shape
    layer_step        ``FFALoRALinear`` forward + backward (no DP), same shape
    layer_step_ps     the same keeping every sample's gradient and norm, no engine (gpu_layer.py's ffa_flat step)
    layer_step_dp     the same under ``DPSGD`` (flat clipping): forward, backward, ``step``, ``zero_grad``
    graph_replay      ``layer_step`` captured once in a CUDA graph, replayed
    layer_step_dp_graphed  ``layer_step_dp`` through ``GraphedAccumulator`` (CUDA: replayed from a graph)

With ``--stub-kernels`` (CPU) the Triton backend runs with every kernel launch replaced by a no-op (and
the GEMM's tuned-config path taken, as on CUDA): what remains is our own host cost per op and layer step,
the part of a host-bound GPU step that any machine can measure and that this repository can cut.

    python bench/launch.py [--json OUT]      # CUDA
    python bench/launch.py --stub-kernels    # any CPU: our wrappers' host cost, Triton's launch excluded
    python bench/launch.py --calls 2 --rounds 1  # CPU: the torch rows (+ Triton under TRITON_INTERPRET=1, untimed)
    python bench/launch.py --profile layer_step_ps,layer_step_ps_direct  # + where those rows' host time goes
    python bench/launch.py --shape 8,512,4096,4096,16 --layer-gemm auto --profile layer_step_ps  # at 4k tokens

``--profile ROWS`` runs each named row (a ``*_direct`` name: with FEDLORA_FAST_LAUNCH=direct) under cProfile
right after its timing, in the same state, and prints its functions by own time and by cumulative time: the
split of a GPU machine's host cost (driver calls, the JIT, the allocator, autograd) that --stub-kernels cannot
show on a CPU.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402


def per_call_us(fn, sync, calls: int, rounds: int) -> float:
    """Median over ``rounds`` of the wall time per call of ``calls`` back-to-back calls (not waited for)."""
    per = []
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per.append((time.perf_counter() - t0) / calls * 1e6)
    sync()
    return statistics.median(per)


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: records each ``kernel[grid](*args, **kw)`` and forwards it."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getattr__(self, name):
        return getattr(self.fn, name)

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.calls.append((grid, args, kw))
            return self.fn[grid](*args, **kw)

        return launch


def compiled_launcher(fn, grid, args: tuple, kw: dict):
    """``(runner, positional args)`` launching the already compiled ``fn`` without the JIT's per-call work.

    The positional list is every kernel parameter in signature order, constexprs included (what Triton's
    JIT hands its launcher); raises if this Triton version does not expose the compiled kernel.
    """
    compiled = fn[grid](*args, **kw)  # the JIT returns the CompiledKernel it launched
    if compiled is None or not hasattr(compiled, "run"):
        raise RuntimeError(f"kernel[grid](...) returned {type(compiled).__name__}, not a compiled kernel")
    names = list(fn.arg_names)
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kw.items() if k in names})
    missing = [n for n in names if n not in bound]
    if missing:
        raise RuntimeError(f"cannot bind {missing} (defaults or autotuned parameters)")
    g = grid(bound) if callable(grid) else grid
    g = tuple(g) + (1,) * (3 - len(g))
    return compiled[g], [bound[n] for n in names]


class _NoLaunch:
    """A kernel whose launches do nothing but evaluate the grid (as Triton does); as an autotuner it reports
    a best config, so the caller caches it and takes the direct tuned-config path, as on CUDA."""

    def __init__(self, best=None):
        self.best_config = best

    def __getitem__(self, grid):
        def launch(*args, **kw):
            if callable(grid):
                grid({"BLOCK_M": 128, "BLOCK_N": 128, **kw})

        return launch


def stub_kernels() -> None:
    """Replace every Triton kernel of ``fedlora_fast.kernels.ffa_linear`` by ``_NoLaunch`` (for --stub-kernels)."""
    import triton

    from fedlora_fast.kernels import ffa_linear as K

    cfg = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3)
    for name in [n for n in vars(K) if n.startswith("_") and n.endswith("_kernel")]:  # every kernel, new ones too
        setattr(K, name, _NoLaunch())
    K._gemm_lowrank_tuned = _NoLaunch(cfg)
    K._gemm_tma_tuned = _NoLaunch(cfg)
    K._autotune = lambda device: True


def _short(path: str) -> str:
    """A profiled function's file: from its package down where it is installed (torch/autograd/graph.py),
    else its last two path components (kernels/ffa_linear.py)."""
    for mark in ("site-packages/", "dist-packages/"):
        if mark in path:
            return path.split(mark, 1)[1]
    parts = path.replace(os.sep, "/").split("/")
    return "/".join(parts[-2:])


def profile_row(name: str, fn, mode: str | None, calls: int, top: int, sync) -> str:
    """``calls`` calls of a row's ``fn`` under cProfile (FEDLORA_FAST_LAUNCH=``mode`` where given), right after
    the row was timed, in the same state; the report lists the ``top`` functions by own time, then by
    cumulative time, in microseconds per profiled call (cProfile's own overhead included: shares, not timings)."""
    prof = cProfile.Profile()
    try:
        with harness.env_var("FEDLORA_FAST_LAUNCH", mode):
            fn()  # warm (a direct row's first call per specialisation goes through the JIT)
            sync()
            prof.enable()
            try:
                for _ in range(calls):
                    fn()
            finally:
                prof.disable()
            sync()
    except Exception as e:  # report and go on
        return f"== profile {name}: failed: {type(e).__name__}: {e}"[:300]
    stats = pstats.Stats(prof)
    total_us = stats.total_tt / calls * 1e6
    lines = [f"== profile {name}: {calls} calls, {total_us:.1f} us per call under cProfile "
             "(per call: calls, own us, cumulative us)"]
    for order, col in (("own time", 2), ("cumulative time", 3)):
        lines.append(f"-- by {order}")
        ranked = sorted(stats.stats.items(), key=lambda kv: kv[1][col], reverse=True)[:top]
        for (path, line, func), (_, nc, tt, ct, _) in ranked:
            where = func if path == "~" else f"{_short(path)}:{line}({func})"
            lines.append(f"{nc / calls:8.1f} {tt / calls * 1e6:9.1f} {ct / calls * 1e6:9.1f}  {where}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=200, help="calls per round")
    p.add_argument("--rounds", type=int, default=7, help="rounds (median)")
    p.add_argument("--shape", default="2,8,128,256,16", help="n,T,in,out,r of the tiny layer")
    p.add_argument("--json", default=None, help="write the rows here (atomic)")
    p.add_argument("--stub-kernels", action="store_true",
                   help="CPU: the Triton backend with no-op kernel launches (our own host cost per op)")
    p.add_argument("--layer-gemm", default=None, choices=("triton", "auto", "cublas", "cublas_acc", "merged"),
                   help="FEDLORA_FAST_GEMM for the layer-step rows (default: triton where the op rows pinned it, on "
                        "CUDA as in the earlier runs, else the environment's; auto: what users run, e.g. at --shape "
                        "8,512,4096,4096,16, the 4k-token Llama-7B rows of gpu_layer.py)")
    p.add_argument("--profile", default="",
                   help="comma-separated rows to run under cProfile, each right after its own timing (a *_direct "
                        "name: that row with FEDLORA_FAST_LAUNCH=direct), e.g. layer_step_ps,layer_step_dp")
    p.add_argument("--profile-calls", type=int, default=300, help="profiled calls per --profile row")
    p.add_argument("--profile-top", type=int, default=30, help="functions listed per ordering")
    args = p.parse_args(argv)
    if args.stub_kernels:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the backend accepts CPU tensors
        os.environ["FEDLORA_FAST_BACKEND"] = "triton"
        stub_kernels()
    cuda = torch.cuda.is_available() and not args.stub_kernels
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = lambda: harness.sync(device)  # noqa: E731
    n, T, inp, out, r = (int(v) for v in args.shape.split(","))
    rows: dict[str, float | str] = {}
    layer_gemm = None  # FEDLORA_FAST_GEMM of the layer rows, once they start
    wanted = [v for v in args.profile.split(",") if v]  # --profile rows, each profiled right after its timing
    profiles: dict[str, str] = {}  # --profile row -> its report

    def maybe_profile(name, fn, mode=None):
        if name in wanted:
            profiles[name] = profile_row(name, fn, mode, args.profile_calls, args.profile_top, sync)
            print(profiles[name], flush=True)

    # once: machine_info imports transformers, peft and opacus for their versions (seconds, not per row)
    info = harness.machine_info(device) if args.json else {}

    def save():  # after every row: a run stopped by its time cap keeps what it measured
        if args.json:
            harness.write_json(args.json, {**info, "shape": args.shape,
                                           "dtype": str(dtype).replace("torch.", ""),
                                           "kernels_stubbed": bool(args.stub_kernels), "calls": args.calls,
                                           "rounds": args.rounds, "layer_gemm": layer_gemm, "us_per_call": rows,
                                           **({"profiles": profiles} if profiles else {})})  # fmt: skip

    def measure(name, fn):
        try:
            fn()  # warm-up (compiles, tunes)
            rows[name] = round(per_call_us(fn, sync, args.calls, args.rounds), 2)
        except Exception as e:  # report and go on: one path failing must not hide the others
            rows[name] = f"failed: {type(e).__name__}: {e}"[:300]
        print(f"{name:16s} {rows[name]}", flush=True)
        maybe_profile(name, fn)
        save()

    def measure_direct(name, fn):
        """On CUDA, ``name`` and ``name_direct`` (FEDLORA_FAST_LAUNCH=jit / direct) in alternating rounds, so
        that a shared host's drift falls on both alike; elsewhere ``name`` alone."""
        if not cuda:
            measure(name, fn)
            return
        modes = {name: "jit", name + "_direct": "direct"}
        per = {k: [] for k in modes}
        try:
            with harness.env_var("FEDLORA_FAST_LAUNCH", None):  # restored afterwards
                for rnd in range(args.rounds + 1):  # round 0: warm-up (compiles, tunes, caches the launchers)
                    for k, mode in modes.items():
                        os.environ["FEDLORA_FAST_LAUNCH"] = mode  # set per round, outside the timed calls
                        if rnd == 0:
                            fn()
                        else:
                            per[k].append(per_call_us(fn, sync, args.calls, 1))
            for k in modes:
                rows[k] = round(statistics.median(per[k]), 2)
        except Exception as e:  # report and go on
            for k in modes:
                rows.setdefault(k, f"failed: {type(e).__name__}: {e}"[:300])
        for k in modes:
            print(f"{k:16s} {rows[k]}", flush=True)
        for k, mode in modes.items():
            maybe_profile(k, fn, mode)
        save()

    a, b, c = (torch.randn(1024, device=device) for _ in range(3))
    measure("torch_add", lambda: torch.add(a, b, out=c))

    import fedlora_fast as ff
    from fedlora_fast.ops.backends import triton_interprets
    from fedlora_fast.reference import MODE_PER_SAMPLE

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, T, inp, generator=gen).to(device, dtype)
    g = torch.randn(n, T, out, generator=gen).to(device, dtype)
    base = torch.nn.Linear(inp, out, bias=False).to(device, dtype)
    W = base.weight.detach()
    A = (torch.randn(r, inp, generator=gen) / inp**0.5).to(device)
    B = (torch.randn(out, r, generator=gen) * 0.1).to(device)

    if args.stub_kernels:
        from fedlora_fast import kernels

        fwd = lambda: kernels.ffa_linear_fwd(x, x, W, None, A, B, 2.0)  # noqa: E731
        u = fwd()[1]
        measure("ffa_fwd", fwd)
        measure("ffa_bwd", lambda: kernels.ffa_linear_bwd(g, u, W, A, B, None, 2.0, True, False, MODE_PER_SAMPLE, 0.0, 0.0))
    elif cuda or triton_interprets():  # interpreted on CPU: a smoke check, not a timing
        # the fused Triton GEMM, pinned: "auto" could pick cuBLAS + the in-place epilogue at this tiny shape,
        # and the recorded launch would then accumulate into its output (no longer a pure rerun to compare)
        os.environ["FEDLORA_FAST_GEMM"] = "triton"
        from fedlora_fast import kernels
        from fedlora_fast.kernels import ffa_linear as K

        fwd = lambda: kernels.ffa_linear_fwd(x, x, W, None, A, B, 2.0)  # noqa: E731
        u = fwd()[1]
        bwd = lambda: kernels.ffa_linear_bwd(g, u, W, A, B, None, 2.0, True, False, MODE_PER_SAMPLE, 0.0, 0.0)  # noqa: E731
        measure_direct("ffa_fwd", fwd)
        measure_direct("ffa_bwd", bwd)
        recorder = _Recorder(K._gemm_lowrank_kernel)
        K._gemm_lowrank_kernel = recorder
        try:
            fwd()  # records the U launch and the (tuned-config) Y launch
        finally:
            K._gemm_lowrank_kernel = recorder.fn
        grid, largs, lkw = recorder.calls[-1]
        measure("gemm_jit", lambda: recorder.fn[grid](*largs, **lkw))
        measure("spec_key", lambda: K._spec_key(largs))  # the direct path's own per-launch key
        try:
            runner, full = compiled_launcher(recorder.fn, grid, largs, lkw)
            out_t = largs[5]  # out_ptr: the sixth argument of _gemm_lowrank_kernel
            recorder.fn[grid](*largs, **lkw)
            want = out_t.clone()
            out_t.fill_(float("nan"))
            runner(*full)
            sync()
            rows["gemm_compiled_equal"] = bool(torch.equal(out_t, want))
            measure("gemm_compiled", lambda: runner(*full))
        except Exception as e:
            rows["gemm_compiled"] = f"failed: {type(e).__name__}: {e}"[:300]
            print(f"gemm_compiled    {rows['gemm_compiled']}", flush=True)

    if args.layer_gemm is not None:  # the layer rows' base GEMM (the op rows above pinned triton on CUDA)
        os.environ["FEDLORA_FAST_GEMM"] = args.layer_gemm
    layer_gemm = os.environ.get("FEDLORA_FAST_GEMM", "auto")
    xg = x.clone().requires_grad_(True)

    def floor_step():
        base(xg).backward(g)

    measure("floor_step", floor_step)
    model = torch.nn.Sequential(torch.nn.Linear(inp, out, bias=False)).to(device, dtype)
    ff.inject_adapters(model, ["0"], r=r, alpha=2.0 * r)

    def layer_step():
        model(xg).backward(g)

    measure_direct("layer_step", layer_step)
    # the layer with every sample's gradient and norm kept, no engine: gpu_layer.py's ffa_flat step
    from fedlora_fast import per_sample
    from fedlora_fast.layers import FFALoRALinear

    ps_layer = FFALoRALinear(torch.nn.Linear(inp, out, bias=False).to(device, dtype), r=r, alpha=2.0 * r, name="ps")
    ps_layer.ps_ctx = per_sample.PerSampleContext(mode=MODE_PER_SAMPLE)

    def layer_step_ps():  # (x's gradient accumulates as in the rows above; the per-sample state is cleared)
        per_sample.clear(ps_layer.lora_B)
        ps_layer(xg).backward(g)

    measure_direct("layer_step_ps", layer_step_ps)
    if cuda:
        try:
            model[0].lora_B.grad = None
            measure("graph_replay", harness.capture_cuda_graph(layer_step, warmup=3).replay)
        except Exception as e:
            rows["graph_replay"] = f"failed: {type(e).__name__}: {e}"[:300]
            print(f"graph_replay     {rows['graph_replay']}", flush=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    dp = ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=n, noise_seed=0)

    def layer_step_dp():
        model(xg).backward(g)
        dp.step()
        dp.zero_grad()

    measure_direct("layer_step_dp", layer_step_dp)
    # the same DP step through GraphedAccumulator (CUDA: forward, backward and clipping replayed from a graph;
    # elsewhere the same padded computation, eagerly): what is left of the host cost with graphs
    def per_sample_loss(m, b):  # the gradient g per sample, and dX as in layer_step_dp (x requires grad)
        return (m(b["x"].detach().requires_grad_(True)) * b["g"]).flatten(1).sum(1)

    acc = ff.GraphedAccumulator(dp, per_sample_loss, micro_batch_size=n)
    batch = {"x": x, "g": g}

    def layer_step_dp_graphed():
        acc.accumulate(batch)
        dp.step()
        dp.zero_grad()

    measure("layer_step_dp_graphed", layer_step_dp_graphed)
    for name in wanted:
        if name not in profiles:
            profiles[name] = f"== profile {name}: no such row here (rows: {', '.join(rows)})"
            print(profiles[name], flush=True)
    save()
    if args.json:
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ghost norms and clipping of trained modules against per-sample tensors: time and peak memory, as ratios.

What a trained ``lm_head`` (a Linear, vocabulary x hidden) or input embedding costs per backward under flat
clipping, from its backward's own tensors to the clipped sum:

- ``dense``: the (n, rows, cols) per-sample gradients (what the engine built before, and what opacus's
  grad samplers build: the same einsum / one-hot scatter), their norms, the clip-reduce;
- ``ghost``: ``fedlora_fast.reference.ghost`` (``per_sample.Factors``): norms from (T, T) Gram matrices or, for
  a table, one sort; the clipped sum one float64 matrix product or scatter-add.

Checks first (the same norms and clipped sums, 1e-4 relative), then interleaved timing and the peak memory
of each variant (``harness``: on a CPU in a fresh process per variant; on CUDA the allocator's peak, reset per
variant). Prints ghost / dense ratios and writes
``bench/results/ghost_<device>_<date>.json``.

Run: ``python bench/ghost.py`` (CPU shapes), ``python bench/ghost.py --device cuda`` (Llama-7B's lm_head and
embedding at 8 x 512 tokens). Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from fedlora_fast.reference import (  # noqa: E402
    clip_coef,
    ffa_linear_clip_reduce,
    ghost_clip_reduce,
    ghost_grad_sample,
    ghost_norm2,
)

SHAPES = {  # case: (n, T, rows, cols)
    "cpu": {"lm_head": (4, 128, 32000, 512), "embedding": (32, 128, 30522, 384)},
    "cuda": {"lm_head": (8, 512, 32000, 4096), "embedding": (8, 512, 32000, 4096)},
}


def make_terms(case: str, n: int, T: int, rows: int, cols: int, device: str) -> list:
    gen = torch.Generator().manual_seed(0)
    right = torch.randn(n, T, cols, generator=gen).to(device)
    if case == "lm_head":  # (g, x): the logits' gradient and the hidden states
        left = (torch.randn(n, T, rows, generator=gen) * rows**-0.5).to(device)
    else:  # (ids, g)
        left = torch.randint(0, rows, (n, T), generator=gen).to(device)
    return [(left, right)]


def dense(terms: list, rows: int, C: float) -> torch.Tensor:
    left, right = terms[0]
    if left.is_floating_point():
        P = torch.einsum("ntr,ntc->nrc", left, right)
    else:
        P = ghost_grad_sample(terms, rows)
    norm2 = P.flatten(1).pow(2).sum(1)
    return ffa_linear_clip_reduce(P, clip_coef(norm2, C))


def ghost(terms: list, rows: int, C: float) -> torch.Tensor:
    norm2 = ghost_norm2(terms)
    return ghost_clip_reduce(terms, clip_coef(norm2, C), rows, norm2)


VARIANTS = {"dense": dense, "ghost": ghost}


def child(args) -> None:
    """One variant's peak memory in this (fresh) process; prints one JSON line."""
    n, T, rows, cols = SHAPES[args.device][args.case] if args.shape is None else args.shape
    terms = make_terms(args.case, n, T, rows, cols, args.device)
    fn = VARIANTS[args.variant]
    print(json.dumps(harness.measure_peak_memory(lambda: fn(terms, rows, 1.0), device=args.device)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--reps", type=int, default=harness.MIN_REPS)
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--shape", type=int, nargs=4, default=None, metavar=("N", "T", "ROWS", "COLS"))
    p.add_argument("--out", default=None)
    p.add_argument("--child", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        args.case, args.variant = args.child
        child(args)
        return
    rows_out = []
    for case in ("lm_head", "embedding"):
        n, T, rows, cols = SHAPES[args.device][case] if args.shape is None else args.shape
        terms = make_terms(case, n, T, rows, cols, args.device)
        # correct first: one norm scale, so the clip binds for some samples only
        C = float(ghost_norm2(terms).sqrt().median())
        want, got = dense(terms, rows, C), ghost(terms, rows, C)
        err = float((got.double() - want.double()).norm() / want.double().norm())
        if not err < 1e-4:
            raise SystemExit(f"{case}: ghost and dense clipped sums differ by {err:.3g} (relative)")
        times = harness.time_interleaved({v: (lambda f=f: f(terms, rows, C)) for v, f in VARIANTS.items()},
                                         device=args.device, reps=args.reps)
        mem = {}
        for v, f in VARIANTS.items():
            if args.device == "cuda":  # (the allocator's own peak, reset per variant: no process needed)
                torch.cuda.empty_cache()
                mem[v] = harness.measure_peak_memory(lambda f=f: f(terms, rows, C), device=args.device)
                continue
            argv = [os.path.abspath(__file__), "--device", args.device, "--child", case, v]
            if args.shape is not None:
                argv += ["--shape", *map(str, args.shape)]
            if args.threads:
                argv += ["--threads", str(args.threads)]
            mem[v] = harness.run_memory_child(argv)
        row = {
            "device": harness.device_name(args.device), "case": case, "n": n, "T": T, "rows": rows, "cols": cols,
            "check_rel_err": err,
            **{f"{v}_s": harness.median(times[v]) for v in VARIANTS},
            **{f"{v}_spread": harness.spread(times[v]) for v in VARIANTS},
            **{f"{v}_mem_step_mb": mem[v]["mem_step_mb"] for v in VARIANTS},
            "time_ratio_ghost_to_dense": harness.paired_ratio(times["ghost"], times["dense"]),
            "mem_ratio_ghost_to_dense": mem["ghost"]["mem_step_mb"] / max(mem["dense"]["mem_step_mb"], 1e-9),
            "mem_method": mem["ghost"]["mem_method"],
        }
        rows_out.append(row)
        print(f"{case:10s} n={n} T={T} {rows}x{cols}: dense {row['dense_s'] * 1e3:8.1f} ms "
              f"{row['dense_mem_step_mb']:8.0f} MiB | ghost {row['ghost_s'] * 1e3:8.1f} ms "
              f"{row['ghost_mem_step_mb']:8.0f} MiB | ghost/dense time {row['time_ratio_ghost_to_dense']:.3f} "
              f"memory {row['mem_ratio_ghost_to_dense']:.3f} (check {err:.1e})", flush=True)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"ghost_{harness.device_slug(args.device)}_{harness.utc_date()}.json")
    harness.write_json(out, {"machine": harness.machine_info(args.device), "rows": rows_out})
    print("wrote", out)


if __name__ == "__main__":
    main()

"""One FFA-LoRA layer step (Triton ops, per-sample mode) inside an NVTX range named ``profile``, for Nsight Compute.

bench/NOTES.md ("v3 on an H200"): the one-pass backward read G at ~1 TB/s on the H200, slower than the same
kernel family on the H100 although the H200 moves 40 % more bytes, so it is not memory-bound; the U pass
likewise. This script gives ``ncu`` exactly one step of our kernels to explain that (speed of light of memory
vs the tensor pipe, warp stall reasons), after warm-up steps that compile and autotune outside the range:

    ncu --nvtx --nvtx-include "profile/" --section SpeedOfLight --section ComputeWorkloadAnalysis \\
        --section WarpStateStats --section Occupancy --section LaunchStats python bench/ncu_layer.py
    python bench/ncu_layer.py --tokens 8x2048 --shape 4096x11008 --r 16     # the defaults
    TRITON_INTERPRET=1 python bench/ncu_layer.py --tokens 2x5 --shape 72x80 --r 4   # CPU smoke (no NVTX)

The GEMM is pinned to our Triton kernel (``FEDLORA_FAST_GEMM=triton`` unless set), so the U, Y and dX launches
are ours too and the profile names every launch of a step.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="8x2048", help="n x T")
    p.add_argument("--shape", default="4096x11008", help="in x out")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2, help="steps before the profiled one (compile, autotune)")
    p.add_argument("--blocks-from", default=None, metavar="SWEEP_JSON",
                   help="profile the one-pass and U configs gpu_layer.py --blocks-from would take from this sweep file")
    args = p.parse_args(argv)
    if args.blocks_from:
        import torch

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import gpu_layer

        # the step below runs bf16 on CUDA, float32 on the CPU: a sweep file applies only at its rank and dtype
        applied = gpu_layer.blocks_from_file(args.blocks_from, args.r,
                                             "bfloat16" if torch.cuda.is_available() else "float32")
        if applied is not None:
            print(f"# kernel configs from {args.blocks_from}: {applied or 'none held the bound: defaults'}")
    os.environ.setdefault("FEDLORA_FAST_GEMM", "triton")
    import torch

    from fedlora_fast import kernels
    from fedlora_fast.reference import MODE_PER_SAMPLE

    n, T = (int(v) for v in args.tokens.split("x"))
    inp, out = (int(v) for v in args.shape.split("x"))
    cuda = torch.cuda.is_available()
    if not cuda and not kernels.ffa_linear._INTERPRET:  # (TRITON_INTERPRET as Triton reads it: 1, true, on...)
        print("no CUDA: run with TRITON_INTERPRET=1 (a smoke run) or on a GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, T, inp, generator=gen).to(device, dtype)
    g = torch.randn(n, T, out, generator=gen).to(device, dtype)
    W = (torch.randn(out, inp, generator=gen) / inp**0.5).to(device, dtype)
    A = (torch.randn(args.r, inp, generator=gen) / inp**0.5).to(device)
    B = (torch.randn(out, args.r, generator=gen) * 0.02).to(device)

    def step():
        y, u = kernels.ffa_linear_fwd(x, x, W, None, A, B, 2.0)
        return y, kernels.ffa_linear_bwd(g, u, W, A, B, None, 2.0, True, False, MODE_PER_SAMPLE, 0.0, 0.0)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    rng = torch.cuda.nvtx.range("profile") if cuda else contextlib.nullcontext()
    with rng:
        y, (dx, _, pb, nu, _, _) = step()
    if cuda:
        torch.cuda.synchronize()
    print(f"# one step profiled: n={n} T={T} {inp}->{out} r={args.r} {dtype}; y {tuple(y.shape)}, dx {tuple(dx.shape)}, "
          f"per-sample dB {tuple(pb.shape)}, norms {tuple(nu.shape)} finite={bool(torch.isfinite(nu).all())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

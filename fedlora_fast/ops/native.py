"""Native CPU backend of the ffa_linear ops: the C++/OpenMP module ``fedlora_fast._native`` over zero-copy buffers.

Same functions and signatures as ``fedlora_fast.reference.ffa_linear`` (maths in DESIGN.md; FFA-LoRA,
Sun et al., ICLR 2024, arXiv 2403.12313). The C++ side (``csrc/ffa_linear.cpp``) does the adapter work of
the backward in one pass over ``g`` per sample: ``V = G B`` when needed, every ``P_i``, its squared norm
``nu_i``, and the per-layer clipped sum. The base input gradient stays a PyTorch GEMM (MKL/oneDNN: our own
blocked GEMM would not beat it; see bench/NOTES.md). In float32, unless dx is split, it absorbs the adapter
term once there are enough tokens (``_fold_pays``): ``dx = G W + s (G B) A = G (W + s B A)``, one GEMM
instead of a GEMM, a rank-r GEMM and an add; with few tokens, ``dx += s V A`` runs natively in place.

Dtypes: the kernels take float32 buffers. float32 calls run natively; bfloat16/float16 ``g`` is cast to
float32 for the adapter maths (the reference casts too) while ``dx`` stays in the input dtype as in the
reference; float64 calls (the tests' ground truth) run the reference. The forward computes ``U`` natively
and folds the adapter into the base GEMM the same way (``Y = x (W + s B A)^T + b`` when ``xa`` is ``x``).

Per-shape choice: every float32 shape measured ran faster here than on the reference but one, LoRA-mode sum
at r = 64 on a 32000-wide layer (training A and B without DP on a vocabulary head: 1.1-1.6x the reference's
time, its V = G B pass being a GEMM MKL does better; bench/NOTES.md, "Native CPU backend"), left native for
now; a shape found clearly slower belongs in a rule at the top of the function concerned. Importing this
module fails with ImportError when the extension was not built, or when it was built for instruction sets
this CPU lacks (``-march=native`` on another machine: checked against the build's record before the
extension is loaded, since running it would die of SIGILL); ``fedlora_fast.ops.backends`` then falls back
to the reference with one warning that says how to rebuild.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlora_fast import env as _env

_isa_problem = _env.isa_problem()
if _isa_problem:  # checked BEFORE loading the extension: its first vector instruction would kill the process
    raise ImportError(_isa_problem)
try:
    from fedlora_fast import _native  # noqa: F401  (ImportError here = not built: the backend probe reports it)
except ImportError as e:
    raise ImportError(_env.native_import_error(e), name=e.name, path=e.path) from e
from fedlora_fast.reference import ffa_linear as _ref

MODE_SUM, MODE_PER_SAMPLE, MODE_CLIP = _ref.MODE_SUM, _ref.MODE_PER_SAMPLE, _ref.MODE_CLIP


def _buf(t: Tensor):
    """A float32 CPU input tensor as a numpy view of its memory (zero-copy when contiguous, else one copy)."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.numpy()


def _out(t: Tensor):
    """A freshly allocated output tensor as a writable numpy view (it must be contiguous: no hidden copy)."""
    if not t.is_contiguous():
        raise AssertionError("native output buffers must be contiguous")
    return t.detach().numpy()


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """``b`` is ``a`` (same memory, shape, strides, dtype): the layer passes ``xa = x`` when dropout is off."""
    return a is b or (
        a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
    )


def _fold_pays(tokens: int, inp: int, out: int) -> bool:
    """Whether ``W + s B A`` (2 out in r FLOPs, once) is cheaper than the rank-r terms per token
    (2 N r (in + out) FLOPs and a read-modify-write pass over the output): when N (in + out) >= in out,
    e.g. N >= 308 tokens at 384<->1536. Below that (a few tokens) the rank-r path is the cheaper one."""
    return tokens * (inp + out) >= inp * out


def ffa_linear_fwd(
    x: Tensor, xa: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """``Y = x W^T + b + s (xa A^T) B^T`` and ``U = xa A^T``: the reference's contract.

    ``U`` comes from the native rank-r kernel; ``Y`` is one PyTorch GEMM on ``W + s B A`` when ``xa`` is
    ``x`` (no adapter dropout) and there are enough tokens for that to pay (``_fold_pays``), else the
    base GEMM plus a native in-place rank-r update ``Y += s U B^T``.
    float32 only; other dtypes run the reference.

    Args:
        x, xa: (n, T, in); weight: (out, in); bias: (out,) or None; A: (r, in); B: (out, r).
    Returns:
        y: (n, T, out) float32; u: (n, T, r) float32.
    """
    if x.dtype != torch.float32 or xa.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu":
        return _ref.ffa_linear_fwd(x, xa, weight, bias, A, B, scale)
    n, T, _ = x.shape
    A32, B32 = _f32(A), _f32(B)
    u = x.new_empty((n, T, A.shape[0]))
    _native.lowrank_in(_buf(xa), _buf(A32), _out(u))
    if _same_tensor(x, xa) and _fold_pays(n * T, x.shape[-1], weight.shape[0]):
        y = _ref.base_linear(x, torch.addmm(weight, B32, A32, alpha=scale), bias)
    else:
        y = _ref.base_linear(x, weight, bias)  # (contiguous: the native update writes it in place)
        _native.lowrank_out(_buf(u), _buf(B32.t()), _out(y), float(scale), True)
    return y, u


def ffa_linear_bwd(
    g: Tensor,
    u: Tensor,
    weight: Tensor,
    A: Tensor,
    B: Tensor,
    xa: Tensor | None,
    scale: float,
    need_dx: bool,
    split_dx: bool,
    mode: int,
    clip_B: float,
    clip_A: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of ``ffa_linear_fwd``: the reference's contract (see ``fedlora_fast.reference.ffa_linear_bwd``).

    Args:
        g: (n, T, out) upstream gradient; u: (n, T, r) float32; weight: (out, in); A: (r, in); B: (out, r);
        xa: (n, T, in) in LoRA mode, else None. Other arguments as in the reference.
    Returns:
        dx, dxa, gB, nuB, gA, nuA with the reference's shapes and dtypes.
    """
    if mode not in (MODE_SUM, MODE_PER_SAMPLE, MODE_CLIP):
        raise ValueError(f"mode: expected 0 (sum), 1 (per-sample) or 2 (clip), got {mode}")
    if g.dtype == torch.float64 or u.dtype != torch.float32 or g.device.type != "cpu":
        return _ref.ffa_linear_bwd(g, u, weight, A, B, xa, scale, need_dx, split_dx, mode, clip_B, clip_A)
    n, T, out = g.shape
    r, inp = A.shape
    lora = xa is not None
    f32 = g.dtype == torch.float32 and weight.dtype == torch.float32
    fold = need_dx and not split_dx and f32 and _fold_pays(n * T, inp, out)
    need_v = lora or (need_dx and not fold)

    g32 = _f32(g)
    B32 = _f32(B)
    xa32 = _f32(xa) if lora else None
    per_sample = mode == MODE_PER_SAMPLE
    gB = u.new_empty((n, out, r) if per_sample else (out, r))
    nuB = u.new_empty((0,) if mode == MODE_SUM else (n,))
    gA, nuA = u.new_empty((0,)), u.new_empty((0,))
    if lora:
        gA = u.new_empty((n, r, inp) if per_sample else (r, inp))
        nuA = u.new_empty((0,) if mode == MODE_SUM else (n,))
    v = u.new_empty((n, T, r)) if need_v else None
    _native.ffa_linear_bwd(
        _buf(g32),
        _buf(u),
        _buf(B32),
        _buf(xa32) if lora else None,
        _out(v) if need_v else None,
        _out(gB),
        _out(nuB) if mode != MODE_SUM else None,
        _out(gA) if lora else None,
        _out(nuA) if lora and mode != MODE_SUM else None,
        float(scale),
        int(mode),
        float(clip_B) if mode == MODE_CLIP else 0.0,  # (unused outside clip mode, as by the other backends)
        float(clip_A) if mode == MODE_CLIP and lora else 0.0,
    )

    dx, dxa = g.new_empty((0,)), g.new_empty((0,))
    if need_dx:
        if fold:
            # G W + s (G B) A == G (W + s B A): the adapter term rides on the base GEMM
            dx = torch.matmul(g, torch.addmm(weight, B32, _f32(A), alpha=scale))
        else:
            dx = torch.matmul(g, weight).contiguous()
            if f32 and not split_dx:  # dx += s V A in place, one pass
                _native.lowrank_out(_buf(v), _buf(_f32(A)), _out(dx), float(scale), True)
            else:
                adapter = v.new_empty((n, T, inp))  # s V A in float32, as the reference
                _native.lowrank_out(_buf(v), _buf(_f32(A)), _out(adapter), float(scale), False)
                adapter = adapter.to(dx.dtype)
                if split_dx:
                    dxa = adapter
                else:
                    dx = dx + adapter
    return dx, dxa, gB, nuB, gA, nuA


def ffa_linear_clip_reduce(P: Tensor, coef: Tensor) -> Tensor:
    """``sum_i coef_i P_i`` skipping ``coef_i == 0``: the reference's contract, natively for float32 ``P``.

    Args:
        P: (n, a, b) per-sample gradients; coef: (n,) clipping factors.
    Returns:
        (a, b) in P's dtype.
    """
    if P.dtype != torch.float32 or P.device.type != "cpu" or P.dim() != 3:
        return _ref.ffa_linear_clip_reduce(P, coef)
    out = P.new_empty(P.shape[1:])
    _native.ffa_linear_clip_reduce(_buf(P), _buf(_f32(coef)), _out(out))
    return out

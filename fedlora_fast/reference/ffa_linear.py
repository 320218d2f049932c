"""PyTorch reference of the ``ffa_linear`` ops: ground truth, CPU fallback and benchmark baseline.

Follows the maths of DESIGN.md (FFA-LoRA, Sun et al., ICLR 2024, arXiv 2403.12313). Every backend
(Triton in ``kernels/ffa_linear.py``, C++ in ``csrc/ffa_linear.cpp``) computes exactly these functions;
tests compare them against these, evaluated in float64.

Shapes (the layer flattens every middle dim into one token dim ``T``):
    x, xa: (n, T, in)   base input and adapter input (``xa`` is ``dropout(x)``, or ``x`` itself)
    weight: (out, in)   frozen base weight;  bias: (out,) or None
    A: (r, in)          frozen (FFA) or trained (LoRA);  B: (out, r) trained
    g: (n, T, out)      upstream gradient dL/dY
    u: (n, T, r)        ``xa @ A.T`` saved by the forward, float32

Adapter maths (U, V, per-sample gradients, norms) runs in float32 (float64 for float64 inputs);
the base GEMMs run in the input dtype, as ``nn.Linear`` does.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Modes of ``ffa_linear_bwd``: what it returns for the trainable adapter tensors.
MODE_SUM = 0  # no DP: the batch gradient, no per-sample work at all
MODE_PER_SAMPLE = 1  # flat clipping: every sample's gradient (n, *shape) and its squared norm
MODE_CLIP = 2  # per-layer clipping: sum_i c_i P_i with c_i from this tensor's own threshold

NORM_EPS = 1e-6  # c_i = min(1, C / (N_i + eps)), as in opacus


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the adapter maths: float64 stays float64, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def clip_coef(norm2: Tensor, max_norm: float) -> Tensor:
    """Per-sample clipping factors ``min(1, C / (sqrt(norm2) + eps))``; 0 where the norm is not finite.

    Args:
        norm2: (n,) squared per-sample norms.
        max_norm: the clipping threshold C > 0.
    Returns:
        (n,) factors in [0, 1], same dtype as ``norm2``.
    """
    norm = norm2.sqrt()
    coef = (max_norm / (norm + NORM_EPS)).clamp(max=1.0)
    return torch.where(torch.isfinite(norm), coef, torch.zeros_like(coef))


def base_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x W^T + b`` for a (n, T, in) ``x`` as a (n, T, out) tensor of its own, written by one (add)mm.

    ``F.linear`` folds a 3-D input into one matrix product and returns a *view* of its 2-D result. An op's
    output must not be one: autograd refuses an in-place change of a custom Function's view output
    (``y += residual`` after the layer), so whether user code ran would depend on the backend and, under
    ``FEDLORA_FAST_GEMM=auto``, on which GEMM timed fastest. ``weight`` and ``bias`` are in ``x``'s dtype.
    """
    n, T, inp = x.shape
    y = x.new_empty((n, T, weight.shape[0]))
    y2, x2 = y.view(n * T, weight.shape[0]), x.reshape(n * T, inp)
    if bias is None:
        torch.mm(x2, weight.t(), out=y2)
    else:
        torch.addmm(bias, x2, weight.t(), out=y2)  # (the same cuBLAS(Lt) bias epilogue as F.linear's addmm)
    return y


def ffa_linear_fwd(
    x: Tensor, xa: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """``Y = x W^T + b + s (xa A^T) B^T`` and ``U = xa A^T``.

    Returns:
        y: (n, T, out) in x's dtype; u: (n, T, r) in the accumulation dtype.
    """
    acc = acc_dtype(x.dtype)
    u = torch.matmul(xa.to(acc), A.to(acc).t())
    y = torch.nn.functional.linear(x, weight, bias)
    y = y + (scale * torch.matmul(u, B.to(acc).t())).to(y.dtype)
    return y, u


def ffa_linear_clip_reduce(P: Tensor, coef: Tensor) -> Tensor:
    """``sum_i coef_i P_i``, skipping samples with ``coef_i == 0`` (so a NaN in a dropped P_i stays out).

    Args:
        P: (n, a, b) per-sample gradients.
        coef: (n,) clipping factors.
    Returns:
        (a, b) in P's dtype.
    """
    coef = coef.to(P.dtype)  # first: a float64 coefficient that is 0 in P's dtype skips its sample, as in the kernels
    keep = coef != 0
    P = torch.where(keep[:, None, None], P, torch.zeros((), dtype=P.dtype, device=P.device))
    return torch.einsum("n,nab->ab", coef, P)


def _grad_param(left: Tensor, right: Tensor, scale: float, mode: int, clip: float) -> tuple[Tensor, Tensor]:
    """Gradient of ``scale * left^T right`` per sample, reduced according to ``mode``.

    left: (n, T, a), right: (n, T, b) -> P_i = scale * left_i^T right_i, (a, b).
    """
    n = left.shape[0]
    if mode == MODE_SUM:
        grad = scale * left.reshape(-1, left.shape[-1]).t() @ right.reshape(-1, right.shape[-1])
        return grad, left.new_empty((0,))
    P = scale * torch.einsum("nta,ntb->nab", left, right)
    norm2 = P.flatten(1).pow(2).sum(1)
    if mode == MODE_PER_SAMPLE:
        return P, norm2
    if mode == MODE_CLIP:
        return ffa_linear_clip_reduce(P, clip_coef(norm2, clip)), norm2
    raise ValueError(f"mode: expected 0 (sum), 1 (per-sample) or 2 (clip), got {mode}")


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
    """Backward of ``ffa_linear_fwd`` in one pass over ``g``.

    Args:
        xa: the adapter input, given only in LoRA mode (``train_A=True``) to form A's gradient.
        need_dx: compute the input gradient at all (False when x does not require grad).
        split_dx: return the base part ``g W`` as ``dx`` and the adapter part ``s V A`` as ``dxa``
            (needed when ``xa`` is a dropout of ``x``); otherwise ``dx`` holds their sum.
        mode: MODE_SUM, MODE_PER_SAMPLE or MODE_CLIP.
        clip_B, clip_A: per-tensor thresholds for MODE_CLIP.
    Returns:
        dx (n,T,in) or empty; dxa (n,T,in) or empty;
        gB: (out,r) for SUM/CLIP, (n,out,r) for PER_SAMPLE; nuB: (n,) squared norms (empty for SUM);
        gA, nuA: likewise for A in LoRA mode, empty otherwise.
    """
    acc = u.dtype
    g_acc = g.to(acc)
    v = torch.matmul(g_acc, B.to(acc))  # (n, T, r)
    dx, dxa = g.new_empty((0,)), g.new_empty((0,))  # separate tensors: op outputs must not alias
    if need_dx:
        dx = torch.matmul(g, weight)
        adapter = (scale * torch.matmul(v, A.to(acc))).to(dx.dtype)
        if split_dx:
            dxa = adapter
        else:
            dx = dx + adapter
    gB, nuB = _grad_param(g_acc, u, scale, mode, clip_B)
    gA, nuA = u.new_empty((0,)), u.new_empty((0,))
    if xa is not None:
        gA, nuA = _grad_param(v, xa.to(acc), scale, mode, clip_A)
    return dx, dxa, gB, nuB, gA, nuA

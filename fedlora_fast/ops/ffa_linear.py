"""The ``ffa_linear`` op contract: declared once as ``torch.library`` custom ops, with fake implementations.

Each op runs the implementation that ``fedlora_fast.ops.backends`` picks for its tensors' device
(CUDA -> Triton, CPU -> native C++ when built, else the PyTorch reference in
``fedlora_fast.reference.ffa_linear``, which documents shapes and semantics). Being custom ops, they
trace under ``torch.compile`` without graph breaks and are checked with ``torch.library.opcheck``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlora_fast.ops.backends import implementation
from fedlora_fast.reference.ffa_linear import MODE_PER_SAMPLE, MODE_SUM, acc_dtype


@torch.library.custom_op("fedlora_fast::ffa_linear_fwd", mutates_args=())
def ffa_linear_fwd(
    x: Tensor, xa: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    return implementation("ffa_linear_fwd", x.device.type)(x, xa, weight, bias, A, B, scale)


@ffa_linear_fwd.register_fake
def _(x, xa, weight, bias, A, B, scale):
    n, T, _ = x.shape
    return x.new_empty((n, T, weight.shape[0])), x.new_empty((n, T, A.shape[0]), dtype=acc_dtype(x.dtype))


@torch.library.custom_op("fedlora_fast::ffa_linear_bwd", mutates_args=())
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
    return implementation("ffa_linear_bwd", g.device.type)(
        g, u, weight, A, B, xa, scale, need_dx, split_dx, mode, clip_B, clip_A
    )


@ffa_linear_bwd.register_fake
def _(g, u, weight, A, B, xa, scale, need_dx, split_dx, mode, clip_B, clip_A):
    n, T, _ = g.shape
    out, r = B.shape
    inp = A.shape[1]

    def param_grad(a: int, b: int) -> tuple[Tensor, Tensor]:
        shape = (n, a, b) if mode == MODE_PER_SAMPLE else (a, b)
        norms = u.new_empty((0,) if mode == MODE_SUM else (n,))
        return u.new_empty(shape), norms

    dx = g.new_empty((n, T, inp) if need_dx else (0,))
    dxa = g.new_empty((n, T, inp) if need_dx and split_dx else (0,))
    gB, nuB = param_grad(out, r)
    gA, nuA = param_grad(r, inp) if xa is not None else (u.new_empty((0,)), u.new_empty((0,)))
    return dx, dxa, gB, nuB, gA, nuA


@torch.library.custom_op("fedlora_fast::ffa_linear_clip_reduce", mutates_args=())
def ffa_linear_clip_reduce(P: Tensor, coef: Tensor) -> Tensor:
    return implementation("ffa_linear_clip_reduce", P.device.type)(P, coef)


@ffa_linear_clip_reduce.register_fake
def _(P, coef):
    return P.new_empty(P.shape[1:])


_OP_NAMES = {ffa_linear_fwd: "ffa_linear_fwd", ffa_linear_bwd: "ffa_linear_bwd", ffa_linear_clip_reduce: "ffa_linear_clip_reduce"}


def call(op, *args):
    """Run one of the ops above: the custom op itself while ``torch.compile`` traces (no graph break), and
    the selected backend's function directly in eager mode, with the same arguments and results.

    The dispatcher's custom-op wrapper (autograd shim, redispatch, dynamo guard) costs tens of microseconds
    of CPU per call; on a GPU that is often longer than the kernels it launches.
    """
    if torch.compiler.is_compiling():
        return op(*args)
    return implementation(_OP_NAMES[op], args[0].device.type)(*args)

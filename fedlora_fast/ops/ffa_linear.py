"""The ``ffa_linear`` op contract: declared once as ``torch.library`` custom ops, with fake implementations.

Each op runs the implementation that ``fedlora_fast.ops.backends`` picks for its tensors' device
(CUDA -> Triton, CPU -> native C++ when built, else the PyTorch reference in
``fedlora_fast.reference.ffa_linear``, which documents shapes and semantics). Being custom ops, they
trace under ``torch.compile`` without graph breaks and are checked with ``torch.library.opcheck``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import Parameter

from fedlora_fast.ops.backends import implementation
from fedlora_fast.reference.ffa_linear import MODE_CLIP, MODE_PER_SAMPLE, MODE_SUM, acc_dtype

# --- argument checks: shapes, devices and scalars, before any backend sees them (never tensor values: that
# would read the device back). A wrong shape would otherwise broadcast into a wrong answer in the reference
# (which also serves float64 calls of the other backends) or read out of bounds in a kernel; a tensor on
# another device (meta) would make the dispatcher run the fake implementation and return uninitialised memory.


def check_shape(name: str, t: Tensor | None, shape: tuple) -> None:
    """Raise ValueError unless ``t`` is a tensor of ``shape`` (None: any size), naming ``name``."""
    if isinstance(t, Tensor):  # a plain loop: this runs ~10 times per layer step, on the host's critical path
        got = t.shape
        if len(got) == len(shape):
            for a, e in zip(got, shape):
                if e is not None and a != e:
                    break
            else:
                return
    want = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ("," if len(shape) == 1 else "") + ")"
    got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
    raise ValueError(f"{name}: expected shape {want}, got {got}")


def _devices(ref_name: str, ref: Tensor, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name}: expected a tensor on {ref.device} (where {ref_name} is), got {t.device}")


_FP32_MAX = torch.finfo(torch.float32).max


def _finite(name: str, v: float, positive: bool = False) -> None:
    try:  # (an int beyond float64's range overflows in isfinite itself)
        finite = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:
        finite = False
    if not finite or (positive and v <= 0):
        raise ValueError(f"{name}: expected a finite number{' > 0' if positive else ''}, got {v!r}")


def _scale(v: float, dtype: torch.dtype) -> None:
    """The scale is finite, and within float32's range unless the call is float64: the kernels take it as a
    float32, where a larger value would become inf (and inf * 0 = NaN where B is zero)."""
    _finite("scale", v)
    if dtype != torch.float64 and abs(v) > _FP32_MAX:
        raise ValueError(f"scale: expected |scale| <= {_FP32_MAX:.4g} (float32's range) for {dtype} inputs, got {v!r}")


def check_dtype(name: str, t: Tensor | None, dtype: torch.dtype, why: str = "") -> None:
    """Raise TypeError unless ``t`` is None or of ``dtype``, naming ``name`` (and ``why`` that dtype)."""
    if t is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}{f' ({why})' if why else ''}, got {t.dtype}")


def _sizes_and_factors(weight: Tensor, A: Tensor, B: Tensor) -> None:
    """in, out and r are >= 1 (the layer's own rule; the backends disagreed on empty layers), and A and B are
    floating point (an integer A was cast silently by one backend)."""
    out, inp = weight.shape
    if out < 1 or inp < 1 or A.shape[0] < 1:
        raise ValueError(f"weight, A: expected out, in and r >= 1, got weight {tuple(weight.shape)} and A "
                         f"{tuple(A.shape)}")
    for name, t in (("A", A), ("B", B)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point dtype, got {t.dtype}")


def _floating(name: str, t: Tensor) -> None:
    """Real floating point: an integer x would come back truncated, a complex one without its imaginary part."""
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point dtype (float32/bfloat16/float16/float64), got {t.dtype}")


def check_fwd(x, xa, weight, bias, A, B, scale) -> None:
    """Raise ValueError (TypeError for a dtype) naming the argument that does not fit ``ffa_linear_fwd``."""
    check_shape("x", x, (None, None, None))
    _floating("x", x)
    n, T, inp = x.shape
    check_shape("xa", xa, (n, T, inp))
    check_shape("weight", weight, (None, inp))
    out = weight.shape[0]
    if bias is not None:
        check_shape("bias", bias, (out,))
    # xa is dropout(x): the same dtype (a reinterpreting view would be read as x); the base GEMM is in x's dtype
    check_dtype("xa", xa, x.dtype, "x's")
    check_dtype("weight", weight, x.dtype, "x's")
    check_dtype("bias", bias, x.dtype, "x's")
    check_shape("A", A, (None, inp))
    check_shape("B", B, (out, A.shape[0]))
    _sizes_and_factors(weight, A, B)
    _scale(scale, x.dtype)
    _devices("x", x, xa=xa, weight=weight, bias=bias, A=A, B=B)


def check_bwd(g, u, weight, A, B, xa, scale, need_dx, split_dx, mode, clip_B, clip_A) -> None:
    """Raise ValueError (TypeError for a dtype) naming the argument that does not fit ``ffa_linear_bwd``."""
    check_shape("g", g, (None, None, None))
    _floating("g", g)
    n, T, out = g.shape
    check_shape("weight", weight, (out, None))
    inp = weight.shape[1]
    try:
        check_shape("A", A, (None, inp))
    except ValueError as e:  # in comes from weight: a weight of another width would read as A's mistake
        raise ValueError(f"{e} (in = {inp}, from weight {tuple(weight.shape)})") from None
    r = A.shape[0]
    check_shape("B", B, (out, r))
    check_shape("u", u, (n, T, r))
    if xa is not None:
        check_shape("xa", xa, (n, T, inp))
    check_dtype("weight", weight, g.dtype, "g's")
    check_dtype("xa", xa, g.dtype, "g's")
    check_dtype("u", u, acc_dtype(g.dtype), "the forward's U: the adapter's maths runs in it")
    _sizes_and_factors(weight, A, B)
    if isinstance(mode, bool) or mode not in (MODE_SUM, MODE_PER_SAMPLE, MODE_CLIP):
        raise ValueError(f"mode: expected 0 (sum), 1 (per-sample) or 2 (clip), got {mode!r}")
    _scale(scale, g.dtype)
    if mode == MODE_CLIP:
        _finite("clip_B", clip_B, positive=True)
        if xa is not None:
            _finite("clip_A", clip_A, positive=True)
    _devices("g", g, u=u, weight=weight, A=A, B=B, xa=xa)


def check_clip_reduce(P, coef) -> None:
    """Raise ValueError (TypeError for a dtype) naming the argument that does not fit ``ffa_linear_clip_reduce``."""
    check_shape("P", P, (None, None, None))
    check_shape("coef", coef, (P.shape[0],))
    _floating("P", P)
    _floating("coef", coef)
    _devices("P", P, coef=coef)


_CHECKS = {"ffa_linear_fwd": check_fwd, "ffa_linear_bwd": check_bwd, "ffa_linear_clip_reduce": check_clip_reduce}


@torch.library.custom_op("fedlora_fast::ffa_linear_fwd", mutates_args=())
def ffa_linear_fwd(
    x: Tensor, xa: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    check_fwd(x, xa, weight, bias, A, B, scale)
    return implementation("ffa_linear_fwd", x.device.type)(x, xa, weight, bias, A, B, scale)


@ffa_linear_fwd.register_fake
def _(x, xa, weight, bias, A, B, scale):
    check_fwd(x, xa, weight, bias, A, B, scale)
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
    check_bwd(g, u, weight, A, B, xa, scale, need_dx, split_dx, mode, clip_B, clip_A)
    return implementation("ffa_linear_bwd", g.device.type)(
        g, u, weight, A, B, xa, scale, need_dx, split_dx, mode, clip_B, clip_A
    )


@ffa_linear_bwd.register_fake
def _(g, u, weight, A, B, xa, scale, need_dx, split_dx, mode, clip_B, clip_A):
    check_bwd(g, u, weight, A, B, xa, scale, need_dx, split_dx, mode, clip_B, clip_A)
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
    check_clip_reduce(P, coef)
    return implementation("ffa_linear_clip_reduce", P.device.type)(P, coef)


@ffa_linear_clip_reduce.register_fake
def _(P, coef):
    check_clip_reduce(P, coef)
    return P.new_empty(P.shape[1:])


# A backend may leave state for the backward on the forward's U, as an attribute of this name: the Triton
# backend's kept merged weight (FEDLORA_FAST_KEEP_MERGED). It lives as long as U: the layer saves U for the
# backward, and drops the state where no backward will read it (drop_backward_state).
BACKWARD_STATE_ATTR = "_fedlora_fast_backward_state"


def drop_backward_state(u: Tensor) -> None:
    """Free what a backend left on ``u`` for a backward that will not read it (no input gradient, split dX).
    Nothing to do while ``torch.compile`` traces (the op's outputs carry no state there; touching a traced
    tensor's ``__dict__`` would break the graph)."""
    if not torch.compiler.is_compiling():
        u.__dict__.pop(BACKWARD_STATE_ATTR, None)


_OP_NAMES = {ffa_linear_fwd: "ffa_linear_fwd", ffa_linear_bwd: "ffa_linear_bwd", ffa_linear_clip_reduce: "ffa_linear_clip_reduce"}


_SCALAR_TYPES = frozenset({type(None), float, int, bool})


def _plain(args: tuple) -> bool:
    """Every argument a plain tensor (or Parameter) without a negative bit, or a scalar, and not on meta: what
    the backends can be handed directly. The rest needs the dispatcher: a negative-bit view (``z.conj().imag``)
    read by a kernel as its storage would have its sign lost; tensor subclasses (FakeTensor, DTensor) and
    meta tensors have no memory for a backend to read and go to the op's own handling (its fake
    implementation). ~1 us per call on the dev box."""
    for t in args:
        c = t.__class__
        if c is Tensor or c is Parameter:
            if t.is_neg():
                return False
        elif c not in _SCALAR_TYPES:
            return False
    return isinstance(args[0], Tensor) and not args[0].is_meta  # (None, a number: the op names the argument)


def call(op, *args):
    """Run one of the ops above: the custom op itself while ``torch.compile`` traces (no graph break), and
    the selected backend's function directly in eager mode, with the same arguments and results (tensors the
    backends cannot read directly go through the op too: ``_plain``).

    The dispatcher's custom-op wrapper (autograd shim, redispatch, dynamo guard) costs tens of microseconds
    of CPU per call; on a GPU that is often longer than the kernels it launches.
    """
    if torch.compiler.is_compiling() or not _plain(args):
        return op(*args)
    name = _OP_NAMES[op]
    _CHECKS[name](*args)
    if torch.is_grad_enabled():  # as behind the op: no autograd (``out=`` GEMMs refuse inputs that need grad)
        with torch.no_grad():
            return implementation(name, args[0].device.type)(*args)
    return implementation(name, args[0].device.type)(*args)

"""The ffa_linear ops, every backend, against the float64 PyTorch reference on random, odd shapes."""

import pytest
import torch

from fedlora_fast import reference as ref
from fedlora_fast.ops import ffa_linear_bwd, ffa_linear_clip_reduce, ffa_linear_fwd
from fedlora_fast.testing import assert_close_verbose, f64, ffa_inputs

from conftest import backend_params

# (n, T, in, out, r), each hitting a different path
SHAPES = [
    (5, 17, 37, 53, 3),  # odd everything: in/out not multiples of any block size
    (1, 1, 37, 53, 3),  # n=1, T=1: a single token
    (3, 1, 64, 32, 8),  # T=1 with power-of-two features
    (2, 7, 130, 67, 1),  # r=1, in just over a 128 block
    (2, 5, 33, 19, 64),  # r=64, r larger than in/out
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check(actual, expected, lowp_expected, dtype, name):
    """fp32: 1e-5 relative to the tensor's scale; low precision: at most 2x PyTorch's own error."""
    expected = expected.double()
    scale = expected.abs().max().item() if expected.numel() else 1.0
    if dtype in (torch.float32, torch.float64):
        assert_close_verbose(actual, expected, atol=1e-5 * scale + 1e-7, rtol=1e-5, name=name)
        return
    torch_err = (lowp_expected.double() - expected).abs().max().item()
    err = (actual.double() - expected).abs().max().item()
    assert err <= 2 * torch_err + 1e-3 * scale, f"{name}: error {err:.3g} vs PyTorch's own {torch_err:.3g}"


@pytest.mark.parametrize("use_backend", backend_params(), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fwd(use_backend, dtype, shape):
    _, device = use_backend
    t = ffa_inputs(*shape, dtype, device)
    s = 2.0 / shape[-1] ** 0.5
    y, u = ffa_linear_fwd(t["x"], t["xa"], t["weight"], t["bias"], t["A"], t["B"], s)
    y64, u64 = ref.ffa_linear_fwd(f64(t["x"]), f64(t["xa"]), f64(t["weight"]), f64(t["bias"]), f64(t["A"]), f64(t["B"]), s)
    y_lp, u_lp = ref.ffa_linear_fwd(t["x"], t["xa"], t["weight"], t["bias"], t["A"], t["B"], s)
    assert y.dtype == dtype and u.dtype == ref.acc_dtype(dtype)
    check(u, u64, u_lp, dtype, "u")
    check(y, y64, y_lp, dtype, "y")


@pytest.mark.parametrize("use_backend", backend_params(), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", [ref.MODE_SUM, ref.MODE_PER_SAMPLE, ref.MODE_CLIP], ids=["sum", "per_sample", "clip"])
@pytest.mark.parametrize("lora", [False, True], ids=["ffa", "lora"])
@pytest.mark.parametrize("split_dx", [False, True], ids=["fused_dx", "split_dx"])
def test_bwd(use_backend, dtype, shape, mode, lora, split_dx):
    _, device = use_backend
    t = ffa_inputs(*shape, dtype, device)
    s = 2.0 / shape[-1] ** 0.5
    _, u = ref.ffa_linear_fwd(t["x"], t["xa"], t["weight"], t["bias"], t["A"], t["B"], s)
    u64 = ref.ffa_linear_fwd(f64(t["x"]), f64(t["xa"]), f64(t["weight"]), f64(t["bias"]), f64(t["A"]), f64(t["B"]), s)[1]
    xa = t["xa"] if lora else None
    # thresholds around the median norm so that some samples clip and some do not
    clip_B, clip_A = 0.7, 0.3
    args = (t["weight"], t["A"], t["B"], xa, s, True, split_dx, mode, clip_B, clip_A)
    got = ffa_linear_bwd(t["g"], u, *args)
    exp = ref.ffa_linear_bwd(f64(t["g"]), u64, f64(t["weight"]), f64(t["A"]), f64(t["B"]), f64(xa), s, True, split_dx, mode, clip_B, clip_A)
    lowp = ref.ffa_linear_bwd(t["g"], u, *args)
    names = ["dx", "dxa", "gB", "nuB", "gA", "nuA"]
    for name, a, e, lp in zip(names, got, exp, lowp):
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        if e.numel():
            check(a, e, lp, dtype, name)


@pytest.mark.parametrize("use_backend", backend_params(), indirect=True)
def test_bwd_without_dx(use_backend):
    _, device = use_backend
    t = ffa_inputs(3, 4, 37, 53, 3, torch.float32, device)
    _, u = ref.ffa_linear_fwd(t["x"], t["x"], t["weight"], t["bias"], t["A"], t["B"], 1.0)
    dx, dxa, gB, *_ = ffa_linear_bwd(t["g"], u, t["weight"], t["A"], t["B"], None, 1.0, False, False, ref.MODE_SUM, 0.0, 0.0)
    assert dx.numel() == 0 and dxa.numel() == 0 and gB.shape == (53, 3)


@pytest.mark.parametrize("use_backend", backend_params(), indirect=True)
@pytest.mark.parametrize("shape", [(1, 4, 3), (7, 53, 3), (33, 3, 130)], ids=str)
def test_clip_reduce(use_backend, shape):
    _, device = use_backend
    gen = torch.Generator().manual_seed(1)
    P = torch.randn(*shape, generator=gen).to(device)
    coef = torch.rand(shape[0], generator=gen).to(device)
    coef[0] = 0.0
    P[0, 0, 0] = float("nan")  # a dropped sample's NaN must not reach the sum
    got = ffa_linear_clip_reduce(P, coef)
    exp = ref.ffa_linear_clip_reduce(P.double(), coef.double())
    assert torch.isfinite(got).all()
    check(got, exp, exp, torch.float32, "clip_reduce")


def test_clip_coef_exact():
    norm2 = torch.tensor([0.0, 0.25, 4.0, float("nan"), float("inf")], dtype=torch.float64)
    c = ref.clip_coef(norm2, 1.0)
    assert c[0] == 1.0 and c[1] == 1.0
    assert abs(c[2].item() - 1.0 / (2.0 + ref.NORM_EPS)) < 1e-15
    assert c[3] == 0.0 and c[4] == 0.0


@pytest.mark.parametrize("use_backend", backend_params(), indirect=True)
def test_opcheck(use_backend):
    """The custom ops satisfy torch.library's contract (fake impls, no aliasing) so torch.compile traces them."""
    _, device = use_backend
    t = ffa_inputs(3, 5, 37, 19, 3, torch.float32, device)
    _, u = ref.ffa_linear_fwd(t["x"], t["x"], t["weight"], t["bias"], t["A"], t["B"], 0.5)
    torch.library.opcheck(ffa_linear_fwd, (t["x"], t["xa"], t["weight"], t["bias"], t["A"], t["B"], 0.5))
    for mode in (ref.MODE_SUM, ref.MODE_PER_SAMPLE, ref.MODE_CLIP):
        torch.library.opcheck(
            ffa_linear_bwd, (t["g"], u, t["weight"], t["A"], t["B"], t["xa"], 0.5, True, True, mode, 1.0, 1.0)
        )
    torch.library.opcheck(ffa_linear_clip_reduce, (torch.randn(4, 19, 3, device=device), torch.rand(4, device=device)))


@pytest.mark.parametrize("use_backend", backend_params(), indirect=True)
def test_bad_arguments_are_named_before_any_backend_runs(use_backend):
    """Shapes, devices and scalars are checked at the op boundary (the custom op and the eager ``call`` path):
    a wrong shape would broadcast into a wrong answer in the reference (which also serves the other
    backends' float64 calls) or read out of bounds in a kernel; a tensor on ``meta`` would make the
    dispatcher run the fake implementation and return uninitialised memory."""
    from fedlora_fast.ops.ffa_linear import call

    _, device = use_backend
    t = ffa_inputs(2, 5, 12, 7, 3, torch.float32, device)
    x, w, b, A, B = t["x"], t["weight"], t["bias"], t["A"], t["B"]
    y, u = ffa_linear_fwd(x, x, w, b, A, B, 2.0)
    g = torch.randn_like(y)
    fwd_cases = [
        (dict(A=A.to("meta")), r"A: expected a tensor on .* \(where x is\), got meta"),
        (dict(bias=b[:1]), r"bias: expected shape \(7,\), got \(1,\)"),
        (dict(bias=torch.randn(14, device=device)[::2].clone()[:6]), r"bias: expected shape \(7,\), got \(6,\)"),
        (dict(B=B[:, :2]), r"B: expected shape \(7, 3\), got \(7, 2\)"),
        (dict(xa=x[:1]), r"xa: expected shape \(2, 5, 12\), got \(1, 5, 12\)"),
        (dict(scale=float("inf")), r"scale: expected a finite number, got inf"),
        # finite in Python, inf as the float32 the kernels take (then inf * 0 = NaN where B is zero)
        (dict(scale=1e39), r"scale: expected \|scale\| <= 3.403e\+38 \(float32's range\) for torch.float32 inputs, got 1e\+39"),
    ]
    for change, match in fwd_cases:
        args = {"x": x, "xa": x, "weight": w, "bias": b, "A": A, "B": B, "scale": 2.0, **change}
        for op in (ffa_linear_fwd, lambda *a: call(ffa_linear_fwd, *a)):
            with pytest.raises(ValueError, match=match):
                op(*args.values())
    for op in (ffa_linear_fwd, lambda *a: call(ffa_linear_fwd, *a)):  # xa is dropout(x): x's dtype
        with pytest.raises(TypeError, match=r"xa: expected dtype torch.float32 \(x's\), got torch.int32"):
            op(x, x.view(torch.int32), w, b, A, B, 2.0)
    # the base GEMM runs in x's dtype: a weight or bias in another is named here, not deep in a backend
    for change, match in ((dict(weight=w.double()), r"weight: expected dtype torch.float32 \(x's\), got torch.float64"),
                          (dict(bias=b.half()), r"bias: expected dtype torch.float32 \(x's\), got torch.float16")):  # fmt: skip
        args = {"x": x, "xa": x, "weight": w, "bias": b, "A": A, "B": B, "scale": 2.0, **change}
        for op in (ffa_linear_fwd, lambda *a: call(ffa_linear_fwd, *a)):
            with pytest.raises(TypeError, match=match):
                op(*args.values())
    for change, match in ((dict(u=u.half()), r"u: expected dtype torch.float32 \(the forward's U"),
                          (dict(weight=w.double()), r"weight: expected dtype torch.float32 \(g's\), got torch.float64"),
                          (dict(xa=x.double()), r"xa: expected dtype torch.float32 \(g's\), got torch.float64")):  # fmt: skip
        args = dict(g=g, u=u, weight=w, A=A, B=B, xa=None, scale=2.0, need_dx=True, split_dx=False, mode=2,
                    clip_B=0.5, clip_A=0.5) | change
        for op in (ffa_linear_bwd, lambda *a: call(ffa_linear_bwd, *a)):
            with pytest.raises(TypeError, match=match):
                op(*args.values())
    for op in (ffa_linear_fwd, lambda *a: call(ffa_linear_fwd, *a)):  # an integer factor was cast by one backend
        with pytest.raises(TypeError, match=r"A: expected a floating-point dtype, got torch.int64"):
            op(x, x, w, b, A.long(), B, 2.0)
        with pytest.raises(ValueError, match=r"weight, A: expected out, in and r >= 1"):
            op(x, x, w, b, A[:0], B[:, :0], 2.0)
    yd, _ = ffa_linear_fwd(x.double(), x.double(), w.double(), b.double(), A, B, 1e39)  # float64: float64's range
    assert yd.dtype == torch.float64
    bwd = dict(g=g, u=u, weight=w, A=A, B=B, xa=None, scale=2.0, need_dx=True, split_dx=False, mode=2, clip_B=0.5, clip_A=0.5)
    bwd_cases = [
        (dict(g=g[:1]), r"u: expected shape \(1, 5, 3\), got \(2, 5, 3\)"),
        (dict(B=B.to("meta")), r"B: expected a tensor on .*, got meta"),
        (dict(clip_B=-1.0), r"clip_B: expected a finite number > 0, got -1.0"),
        (dict(clip_B=float("nan")), r"clip_B: expected a finite number > 0, got nan"),
        (dict(mode=3), r"mode: expected 0 \(sum\), 1 \(per-sample\) or 2 \(clip\), got 3"),
        # an empty layer: the backends disagreed (the reference returned empty gradients, native refused)
        (dict(A=A[:0], B=B[:, :0], u=u[..., :0]), r"weight, A: expected out, in and r >= 1, got weight \(7, 12\) and A \(0, 12\)"),
    ]
    for change, match in bwd_cases:
        args = {**bwd, **change}
        for op in (ffa_linear_bwd, lambda *a: call(ffa_linear_bwd, *a)):
            with pytest.raises(ValueError, match=match):
                op(*args.values())
    # real floating point only: an integer x came back truncated, a complex one without its imaginary part
    for bad in (x.long(), torch.complex(x, x)):
        for op in (ffa_linear_fwd, lambda *a: call(ffa_linear_fwd, *a)):
            with pytest.raises(TypeError, match=rf"x: expected a floating-point dtype .*got {bad.dtype}"):
                op(bad, bad, w.to(bad.dtype), b.to(bad.dtype), A, B, 2.0)
        for op in (ffa_linear_bwd, lambda *a: call(ffa_linear_bwd, *a)):
            with pytest.raises(TypeError, match=rf"g: expected a floating-point dtype .*got {bad.dtype}"):
                op(*{**bwd, "g": g.to(bad.dtype), "weight": w.to(bad.dtype)}.values())
    P, coef = torch.randn(3, 4, 5, device=device), torch.ones(3, device=device)
    for args, name in (((P.long(), coef), "P"), ((P, coef.long()), "coef")):
        for op in (ffa_linear_clip_reduce, lambda *a: call(ffa_linear_clip_reduce, *a)):
            with pytest.raises(TypeError, match=rf"{name}: expected a floating-point dtype .*got torch.int64"):
                op(*args)
    for args, match in (((P[0], coef), r"P: expected shape \(\*, \*, \*\), got \(4, 5\)"),
                        ((P, coef[:2]), r"coef: expected shape \(3,\), got \(2,\)"),
                        ((P, coef.to("meta")), r"coef: expected a tensor on .*, got meta")):  # fmt: skip
        for op in (ffa_linear_clip_reduce, lambda *a: call(ffa_linear_clip_reduce, *a)):
            with pytest.raises(ValueError, match=match):
                op(*args)


@pytest.mark.parametrize("use_backend", backend_params(), indirect=True)
def test_the_eager_path_takes_what_the_op_takes(use_backend):
    """``call`` on inputs that require grad, with grad mode on (the native forward's ``out=`` GEMM raised
    there), and with an unused threshold of None outside clip mode (the native binding raised TypeError):
    the same results as the op and the reference."""
    from fedlora_fast.ops.ffa_linear import call

    _, device = use_backend
    t = ffa_inputs(2, 5, 12, 7, 3, torch.float32, device)
    x = t["x"].clone().requires_grad_(True)
    args = (x, x, t["weight"], t["bias"], t["A"], t["B"], 2.0)
    for got, want in zip(call(ffa_linear_fwd, *args), ref.ffa_linear_fwd(*(a.detach() if a is x else a for a in args))):
        assert not got.requires_grad
        assert_close_verbose(got, want, atol=1e-5, rtol=1e-5, name="fwd")
    _, u = ref.ffa_linear_fwd(t["x"], t["x"], t["weight"], t["bias"], t["A"], t["B"], 2.0)
    for mode in (ref.MODE_SUM, ref.MODE_PER_SAMPLE):
        for xa in (None, t["xa"]):
            bwd = (t["g"], u, t["weight"], t["A"], t["B"], xa, 2.0, True, False, mode, None, None)
            for got, want in zip(call(ffa_linear_bwd, *bwd), ref.ffa_linear_bwd(*bwd)):
                assert_close_verbose(got, want, atol=1e-5, rtol=1e-5, name=f"bwd mode {mode}")


def test_non_tensor_arguments_are_named_on_the_eager_path_too():
    """``call`` (the layer's and the engine's eager path) raised AttributeError ('NoneType' object has no attribute
    'is_meta' / 'float' object has no attribute 'dtype') where the op names the argument; a weight of another
    width in the backward was blamed on A alone; mode=True passed as per-sample."""
    from fedlora_fast.ops.ffa_linear import call

    x, w, b, A, B = torch.randn(2, 5, 12), torch.randn(7, 12), torch.randn(7), torch.randn(3, 12), torch.randn(7, 3)
    y, u = ffa_linear_fwd(x, x, w, b, A, B, 2.0)
    g = torch.randn_like(y)
    for op in (ffa_linear_fwd, lambda *a: call(ffa_linear_fwd, *a)):
        with pytest.raises((ValueError, RuntimeError), match="x"):
            op(None, x, w, b, A, B, 2.0)
        with pytest.raises((ValueError, RuntimeError), match="bias"):  # (the op's schema check: RuntimeError)
            op(x, x, w, 1.0, A, B, 2.0)
    with pytest.raises(ValueError, match=r"bias: expected shape \(7,\), got float"):
        call(ffa_linear_fwd, x, x, w, 1.0, A, B, 2.0)
    with pytest.raises(ValueError, match=r"weight: expected shape \(\*, 12\), got int"):
        call(ffa_linear_fwd, x, x, 2, b, A, B, 2.0)
    bwd = (g, u, w, A, B, None, 2.0, True, False, 1, 0.5, 0.5)
    for op in (ffa_linear_bwd, lambda *a: call(ffa_linear_bwd, *a)):
        with pytest.raises(ValueError, match=r"A: expected shape \(\*, 6\), got \(3, 12\) \(in = 6, from weight \(7, 6\)\)"):
            op(*bwd[:2], torch.randn(7, 6), *bwd[3:])
    # (through the op, torch's schema has already made True the int 1)
    with pytest.raises(ValueError, match=r"mode: expected 0 \(sum\), 1 \(per-sample\) or 2 \(clip\), got True"):
        call(ffa_linear_bwd, *bwd[:9], True, *bwd[10:])
    for op in (ffa_linear_clip_reduce, lambda *a: call(ffa_linear_clip_reduce, *a)):
        with pytest.raises(ValueError, match=r"P: expected shape \(\*, \*, \*\), got NoneType"):
            op(None, torch.ones(3))


def test_reference_clip_reduce_skips_a_coefficient_that_is_zero_in_ps_dtype():
    """A float64 coefficient of 1e-50 is 0 in float32: the reference tested it in float64, kept the sample and
    multiplied its NaN by 0 (NaN in the sum); the kernels cast first and skip it. Both skip it now."""
    from fedlora_fast.reference import ffa_linear_clip_reduce as ref_clip_reduce

    P = torch.ones(2, 2, 3)
    P[0, 0, 0] = float("nan")
    got = ref_clip_reduce(P, torch.tensor([1e-50, 0.5], dtype=torch.float64))
    assert torch.equal(got, torch.full((2, 3), 0.5))


@pytest.mark.parametrize("use_backend", backend_params(), indirect=True)
def test_what_a_backend_cannot_read_goes_through_the_op(use_backend):
    """The eager path hands plain tensors to the backend directly (``call``); a negative-bit view (public:
    ``z.conj().imag``), a FakeTensor or meta tensors go through the op instead: the values of the
    materialised tensor (a kernel reading the view's storage lost the sign), and shapes without memory."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fedlora_fast.ops.ffa_linear import call

    _, device = use_backend
    t = ffa_inputs(2, 5, 12, 7, 3, torch.float32, device)
    x, w, b, A, B = t["x"], t["weight"], t["bias"], t["A"], t["B"]
    neg = torch.complex(torch.zeros_like(x), -x).conj().imag  # x's values, negative bit set
    assert neg.is_neg() and torch.equal(neg, x)
    y, u = call(ffa_linear_fwd, x, x, w, b, A, B, 2.0)
    y_neg, u_neg = call(ffa_linear_fwd, neg, neg, w, b, A, B, 2.0)
    assert_close_verbose(y_neg, y, atol=1e-6, rtol=1e-6, name="y of a negative-bit x")
    assert_close_verbose(u_neg, u, atol=1e-6, rtol=1e-6, name="u of a negative-bit x")
    g = torch.randn_like(y)
    g_neg = torch.complex(torch.zeros_like(g), -g).conj().imag
    bwd = (u, w, A, B, None, 2.0, True, False, ref.MODE_PER_SAMPLE, 1.0, 1.0)
    for got, want in zip(call(ffa_linear_bwd, g_neg, *bwd), call(ffa_linear_bwd, g, *bwd)):
        assert_close_verbose(got, want, atol=1e-5, rtol=1e-5, name="backward of a negative-bit g")
    meta = [v.to("meta") if isinstance(v, torch.Tensor) else v for v in (x, x, w, b, A, B, 2.0)]
    ym, um = call(ffa_linear_fwd, *meta)
    assert (ym.device.type, ym.shape, um.shape, um.dtype) == ("meta", y.shape, u.shape, torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        xf = mode.from_tensor(x)
        yf, uf = call(ffa_linear_fwd, xf, xf, w, b, A, B, 2.0)
    assert yf.shape == y.shape and uf.shape == u.shape


# (FEDLORA_FAST_GEMM, FEDLORA_FAST_KEEP_MERGED) for the Triton backend: each way its forward makes Y
Y_PATHS = [("triton", "0"), ("cublas", "0"), ("cublas_acc", "0"), ("merged", "0"), ("merged", "1"), ("merged", "cache")]


def _y_path_cases():
    """(backend, device), Triton's Y path, the native backend's fold: each backend with the ways it makes Y."""
    out = []
    for p in backend_params():
        name, device = p.values[0]
        for path in Y_PATHS if name == "triton" else Y_PATHS[:1]:
            for fold in (False, True) if name == "native" else (False,):
                extra = f"-{path[0]}-keep{path[1]}" if name == "triton" else ("-fold" if fold else "")
                out.append(pytest.param((name, device), path, fold, id=p.id + extra, marks=p.marks))
    return out


@pytest.mark.parametrize("use_backend,path,fold", _y_path_cases(), indirect=["use_backend"])
def test_the_layer_output_can_be_changed_in_place(use_backend, path, fold, monkeypatch):
    """``y += residual; y.mul_(2)`` after the layer, then a backward: the op's output is a tensor of its own
    (autograd refuses an in-place change of a custom Function's view output), on every backend and every way
    the forward makes Y (the Triton GEMM settings; the native backend's folded ``W + s B A`` and its in-place
    rank-r update), and x's and B's gradients are the float64 ones of that in-place computation."""
    from torch import nn

    from fedlora_fast.layers import FFALoRALinear

    name, device = use_backend
    monkeypatch.setenv("FEDLORA_FAST_GEMM", path[0])
    monkeypatch.setenv("FEDLORA_FAST_KEEP_MERGED", path[1])
    if name == "native":
        from fedlora_fast.ops import native

        monkeypatch.setattr(native, "_fold_pays", lambda *a: fold)
    torch.manual_seed(0)
    layer = FFALoRALinear(nn.Linear(13, 11).to(device), r=3, alpha=6.0, seed=0, name="p")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 3, 13, device=device, requires_grad=True)
    res = torch.randn(2, 3, 11, device=device)
    try:
        y = layer(x)
        assert not y._is_view()
        y += res
        y.mul_(2)
        y.pow(2).sum().backward()
    finally:
        if name == "triton":
            from fedlora_fast.kernels.ffa_linear import clear_merged_cache

            clear_merged_cache()
    W, b, A = (t.detach().double() for t in (layer.weight, layer.bias, layer.lora_A))
    x64, B64 = x.detach().double().requires_grad_(), layer.lora_B.detach().double().requires_grad_()
    y64 = (x64 @ W.T + b + layer.scale * (x64 @ A.T) @ B64.T + res.double()) * 2
    y64.pow(2).sum().backward()
    for got, exp, what in ((y, y64, "y"), (x.grad, x64.grad, "x.grad"), (layer.lora_B.grad, B64.grad, "B.grad")):
        assert_close_verbose(got.detach(), exp.detach(), atol=1e-5 * exp.abs().max().item(), rtol=1e-5, name=what)

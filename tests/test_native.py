"""The native CPU backend (csrc/, fedlora_fast._native): its checks, its edge cases, its fallback.

The numerical contract against the float64 reference on every dtype is tests/test_ffa_linear.py (which
covers native automatically); here: what only the native path has (buffer checks, register-tile edges,
threads, zero-copy), and how the dispatcher behaves when the extension is missing.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fedlora_fast
from fedlora_fast import reference as ref
from fedlora_fast.ops import backends
from fedlora_fast.testing import assert_close_verbose


def _native_or_skip():
    module, why = backends._probe("native", "cpu")
    if module is None:
        pytest.skip(f"native backend unavailable: {why}")
    return module


@pytest.fixture
def nat():
    return _native_or_skip()


@pytest.fixture
def ext():
    _native_or_skip()
    from fedlora_fast import _native

    return _native


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def inputs(n, T, inp, out, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        g=torch.randn(n, T, out, generator=g),
        u=torch.randn(n, T, r, generator=g),
        weight=torch.randn(out, inp, generator=g) * inp**-0.5,
        A=torch.randn(r, inp, generator=g) * inp**-0.5,
        B=torch.randn(out, r, generator=g),
        xa=torch.randn(n, T, inp, generator=g),
    )


def compare(got, exp, names=("dx", "dxa", "gB", "nuB", "gA", "nuA")):
    for name, a, e in zip(names, got, exp):
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        if e.numel():
            scale = e.abs().max().item()
            assert_close_verbose(a, e, atol=1e-5 * scale + 1e-7, rtol=1e-5, name=name)


def run_both(nat, t, lora, mode, need_dx=True, split_dx=False, clip=(0.7, 0.3), scale=0.5):
    xa = t["xa"] if lora else None
    args = (t["weight"], t["A"], t["B"], xa, scale, need_dx, split_dx, mode, *clip)
    got = nat.ffa_linear_bwd(t["g"], t["u"], *args)
    d = {k: (v.double() if v is not None else None) for k, v in t.items()}
    exp = ref.ffa_linear_bwd(d["g"], d["u"], d["weight"], d["A"], d["B"], d["xa"] if lora else None, scale,
                             need_dx, split_dx, mode, *clip)
    return got, exp


MODES = [ref.MODE_SUM, ref.MODE_PER_SAMPLE, ref.MODE_CLIP]


def bwd(impl, t, xa=None, scale=1.0, need_dx=True, split_dx=False, mode=ref.MODE_PER_SAMPLE, clip=(1.0, 1.0), g=None):
    """``impl.ffa_linear_bwd`` on the tensors of ``inputs`` (``g`` overrides ``t["g"]``)."""
    g = t["g"] if g is None else g
    return impl.ffa_linear_bwd(g, t["u"], t["weight"], t["A"], t["B"], xa, scale, need_dx, split_dx, mode, *clip)


# (n, T, in, out, r): each hits a path of csrc/ffa_linear.cpp
@pytest.mark.parametrize(
    "shape",
    [
        (3, 9, 40, 64, 8),  # out = 2 full 32-column tiles, r = one 8-rank tile: no edge code; dx on W + s B A
        (3, 9, 40, 70, 9),  # out edge tile of 6 columns; r = 9: a second, zero-padded rank tile
        (2, 3, 31, 16, 16),  # out < 32 (edge tile only), r = 2 rank tiles, in < 32; 6 tokens: dx += s V A in place
        (1, 33, 65, 97, 5),  # n = 1 < threads: one thread does everything
        (4, 0, 8, 8, 2),  # T = 0: every gradient is exactly zero
        (3, 300, 33, 70, 9),  # sum mode: 900 tokens, 4 blocks of 256 added into the output
    ],
    ids=str,
)
@pytest.mark.parametrize("mode", MODES, ids=["sum", "per_sample", "clip"])
@pytest.mark.parametrize("lora", [False, True], ids=["ffa", "lora"])
def test_tiles_against_reference(nat, shape, mode, lora):
    t = inputs(*shape)
    got, exp = run_both(nat, t, lora, mode, split_dx=lora)
    compare(got, exp)


@pytest.mark.parametrize("same", [True, False], ids=["xa_is_x", "xa_dropout"])
@pytest.mark.parametrize("shape", [(3, 7, 40, 70, 9), (1, 1, 5, 3, 1), (0, 4, 8, 8, 2)], ids=str)
def test_fwd_against_reference(nat, shape, same):
    """xa is x: one GEMM on W + s B A; xa a dropout of x: base GEMM + native in-place Y += s U B^T."""
    n, T, inp, out, r = shape
    t = inputs(*shape)
    x = t["xa"]
    xa = x if same else x * (rnd(n, T, inp, seed=3) > 0)
    bias = rnd(out, seed=4)
    y, u = nat.ffa_linear_fwd(x, xa, t["weight"], bias, t["A"], t["B"], 0.7)
    y64, u64 = ref.ffa_linear_fwd(x.double(), xa.double(), t["weight"].double(), bias.double(), t["A"].double(),
                                  t["B"].double(), 0.7)
    assert y.dtype == u.dtype == torch.float32
    compare((y, u), (y64, u64), names=("y", "u"))


def test_the_scale_multiplies_the_rank_r_product_not_its_factor(nat):
    """s (U B^T) and s (V A), as the reference: s U first overflowed to inf at U = 2e38, s = 2 (finite results
    of 8e37), and lost 15 % of Y to float32's denormals at s = 1e-30 (a report-only review found both)."""
    w = torch.zeros(4, 4)
    x = torch.zeros(1, 1, 4)
    x[0, 0, 0] = 2e38
    A = torch.zeros(2, 4)
    A[:, 0] = 1.0
    y, _ = nat.ffa_linear_fwd(x, x * 1.0, w, None, A, torch.full((4, 2), 0.1), 2.0)  # (xa not x: Y += s U B^T)
    assert torch.allclose(y, torch.full((1, 1, 4), 8e37), rtol=1e-6)
    g = torch.zeros(1, 1, 4)
    g[0, 0, 0] = 2e38
    B = torch.zeros(4, 2)
    B[0, :] = 1.0
    _, dxa, *_ = nat.ffa_linear_bwd(g, torch.zeros(1, 1, 2), w, torch.full((2, 4), 0.1), B, None, 2.0, True, True,
                                    0, 1.0, 1.0)
    assert torch.allclose(dxa, torch.full((1, 1, 4), 8e37), rtol=1e-6)
    x = torch.zeros(1, 1, 4)
    x[0, 0, 0] = 3.3e-15
    y, _ = nat.ffa_linear_fwd(x, x * 1.0, w, None, A[:1], torch.full((4, 1), 1e15), 1e-30)
    assert torch.allclose(y.double(), torch.full((1, 1, 4), 3.3e-30, dtype=torch.float64), rtol=1e-6)


def test_fwd_low_precision_runs_reference(nat):
    t = inputs(2, 3, 8, 8, 2)
    x = t["xa"].bfloat16()
    got = nat.ffa_linear_fwd(x, x, t["weight"].bfloat16(), None, t["A"], t["B"], 1.0)
    exp = ref.ffa_linear_fwd(x, x, t["weight"].bfloat16(), None, t["A"], t["B"], 1.0)
    assert all(a.dtype == e.dtype and torch.equal(a, e) for a, e in zip(got, exp))


def test_empty_batch(nat):
    """n = 0 (Poisson sampling can draw an empty batch): zero sums, empty per-sample tensors.

    Checked against the expected shapes, not the reference: ``reference._grad_param`` cannot reshape
    an empty P (``P.reshape(0, -1)``), a reference bug reported to the lead.
    """
    t = inputs(0, 4, 8, 6, 2)
    for mode in MODES:
        dx, dxa, gB, nuB, gA, nuA = nat.ffa_linear_bwd(
            t["g"], t["u"], t["weight"], t["A"], t["B"], t["xa"], 1.0, True, False, mode, 1.0, 1.0
        )
        assert dx.shape == (0, 4, 8) and dxa.numel() == 0
        if mode == ref.MODE_PER_SAMPLE:
            assert gB.shape == (0, 6, 2) and gA.shape == (0, 2, 8)
        else:
            assert gB.shape == (6, 2) and gA.shape == (2, 8)
            assert (gB == 0).all() and (gA == 0).all()
        assert nuB.shape == nuA.shape == (0,)


def test_clip_drops_nan_sample(nat):
    """A sample whose gradient is NaN gets c_i = 0 and stays out of the clipped sum, as in the reference."""
    t = inputs(4, 5, 12, 40, 3)
    t["g"][2, 1, 7] = float("nan")
    got, exp = run_both(nat, t, False, ref.MODE_CLIP)
    assert torch.isnan(got[3][2]) and torch.isfinite(got[2]).all()
    compare(got[2:3], exp[2:3], names=("gB",))


def test_clip_threshold_extremes(nat):
    """C huge: nothing clips (= sum mode); C = 0: everything is dropped (exact zeros)."""
    t = inputs(3, 6, 16, 24, 4)
    total = bwd(nat, t, need_dx=False, mode=ref.MODE_SUM)[2]
    big = bwd(nat, t, need_dx=False, mode=ref.MODE_CLIP, clip=(1e30, 0.0))[2]
    zero = bwd(nat, t, need_dx=False, mode=ref.MODE_CLIP, clip=(0.0, 0.0))[2]
    assert_close_verbose(big, total, atol=1e-5, rtol=1e-5, name="gB")
    assert (zero == 0).all()


@pytest.mark.parametrize("T", [11, 20], ids=["sum_one_pass", "sum_per_sample"])  # sum mode's route: T <= 3 r
@pytest.mark.parametrize("n", [7, 40, 1], ids=["samples_over_threads", "chunks", "tiles_over_threads"])
def test_deterministic_and_thread_count(nat, n, T):
    """Same input, same bits; the adapter's (per-sample, clipped or summed) gradients and norms also whatever
    the thread count: they must not change with the machine's cores (the clipped sums are added over fixed
    chunks of samples, in chunk order).

    n = 7 and 40 spread samples (chunks) over the threads; n = 1 (fewer samples than threads) spreads one
    sample's tiles. Every mode; LoRA, so that A's sums are covered too.
    """
    from fedlora_fast import _native

    t = inputs(n, T, 20, 45, 6)
    threads = torch.get_num_threads()
    for mode in (ref.MODE_SUM, ref.MODE_PER_SAMPLE, ref.MODE_CLIP):
        call = lambda: bwd(nat, t, t["xa"], 0.3, True, True, mode, (0.5, 0.5))  # noqa: E731
        a, b = call(), call()
        for x, y in zip(a, b):
            assert torch.equal(x, y)
        for k in sorted({1, 2, 3, threads}):
            try:
                torch.set_num_threads(k)  # the extension shares torch's OpenMP runtime, so this reaches it too
                assert _native.max_threads() == k
                other = call()
            finally:
                torch.set_num_threads(threads)
            # the adapter's gradients and norms (ours); dx comes from torch's GEMM, which need not be
            for name, x, y in list(zip(("dx", "dxa", "gB", "nuB", "gA", "nuA"), other, a))[2:]:
                assert torch.equal(x, y), f"mode {mode}, {k} threads vs {threads}: {name} differs"


_WIDE_SCRATCH = r"""
import resource, sys, torch
from fedlora_fast import _native
from fedlora_fast.reference import ffa_linear as ref
torch.set_num_threads(int(sys.argv[1]))
n, out, r = 40, 40000, 64
gen = torch.Generator().manual_seed(0)
g, u, B = torch.randn(n, 1, out, generator=gen), torch.randn(n, 1, r, generator=gen), torch.randn(out, r, generator=gen)
gB, nuB = torch.full((out, r), float("nan")), torch.full((n,), float("nan"))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
_native.ffa_linear_bwd(g.numpy(), u.numpy(), B.numpy(), None, None, gB.numpy(), nuB.numpy(), None, None, 0.5,
                       ref.MODE_CLIP, 40.0, 0.0)
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
P = 0.5 * torch.einsum("no,nr->nor", g[:, 0].double(), u[:, 0].double())
nu = P.pow(2).sum((1, 2))
c = (40.0 / (nu.sqrt() + 1e-6)).clamp(max=1.0)
err = ((gB.double() - torch.einsum("n,nor->or", c, P)).abs().max() / P.abs().max()).item()
nu_err = ((nuB.double() - nu).abs() / nu).max().item()
torch.save({"gB": gB, "nuB": nuB}, sys.argv[2])
print(f"{grown:.0f} {err:.3g} {nu_err:.3g}")
"""


def test_wide_layer_sum_scratch_is_bounded(nat, tmp_path):
    """The clipped sums run over up to 32 chunks of samples, each with its own out x r buffer: 328 MB at
    out = 40000, r = 64. Wide layers (a vocabulary head) get fewer chunks, 64 MiB in all, still fixed by the
    shape alone: the result stays exact and the same bits for 1 and 2 threads. Fresh processes, so that peak
    memory is this call's."""
    import subprocess

    script = tmp_path / "wide.py"
    script.write_text(_WIDE_SCRATCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(fedlora_fast.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}  # this package
    res = {}
    for k in (1, 2):
        run = subprocess.run([sys.executable, str(script), str(k), str(tmp_path / f"{k}.pt")], capture_output=True,
                             text=True, timeout=300, env=env)
        assert run.returncode == 0, run.stderr
        grown, err, nu_err = map(float, run.stdout.split())
        assert err < 1e-5 and nu_err < 1e-5, (k, err, nu_err)
        assert grown < 160, f"{k} threads: peak memory grew {grown:.0f} MiB in the call (32 chunks: 313 MiB)"
        res[k] = torch.load(tmp_path / f"{k}.pt")
    assert torch.equal(res[1]["gB"], res[2]["gB"]) and torch.equal(res[1]["nuB"], res[2]["nuB"])


def test_one_sample_norm_is_the_same_bits_whatever_the_thread_count(nat):
    """One sample, two 32-row tiles: the one-thread path summed the norm in one running double, the
    tile-parallel path per tile; they rounded differently on this input (a reviewer's), so nu and the clip
    coefficient (hence the clipped sum) changed with the thread count. Both now add per-tile partials."""
    from fedlora_fast import _native

    out, r = 64, 1
    g = torch.zeros(1, 1, out)
    g[0, 0, 0], g[0, 0, 1] = 1.77001953125, 0.92041015625
    g[0, 0, 2:4] = 2.0**-12
    g[0, 0, 32:] = 2.0**-27
    u, B = torch.ones(1, 1, r), torch.ones(out, r)
    threads = torch.get_num_threads()
    got = {}
    for mode, shape in ((ref.MODE_PER_SAMPLE, (1, out, r)), (ref.MODE_CLIP, (out, r))):
        for k in (1, 2):
            try:
                torch.set_num_threads(k)
                gB, nuB = torch.empty(shape), torch.empty(1)
                _native.ffa_linear_bwd(g.numpy(), u.numpy(), B.numpy(), None, None, gB.numpy(), nuB.numpy(), None,
                                       None, 1.0, mode, 0.5, 0.0)
            finally:
                torch.set_num_threads(threads)
            got[mode, k] = (gB, nuB)
        for a_, b_ in zip(got[mode, 1], got[mode, 2]):
            assert torch.equal(a_, b_), f"mode {mode}: 1 vs 2 threads differ ({a_.flatten()[:2]} vs {b_.flatten()[:2]})"


def test_a_threshold_beyond_float32_clips_nothing(nat):
    """The op boundary takes any finite threshold; one past float32's range (the extension's) clips nothing,
    as the sum of the per-sample gradients (it was turned into inf and refused). Sum mode adds the tokens in
    another order (all samples' at once), hence float32 rounding apart, not bitwise."""
    t = inputs(3, 5, 16, 24, 4)
    huge = bwd(nat, t, t["xa"], 0.3, True, True, ref.MODE_CLIP, (1e39, 1e39))
    total = bwd(nat, t, t["xa"], 0.3, True, True, ref.MODE_SUM, (0.5, 0.5))
    per_sample = bwd(nat, t, t["xa"], 0.3, True, True, ref.MODE_PER_SAMPLE, (0.5, 0.5))
    assert_close_verbose(huge[2], per_sample[2].sum(0), atol=1e-7, rtol=1e-7, name="gB")  # c_i = 1: clipped nothing
    assert_close_verbose(huge[4], per_sample[4].sum(0), atol=1e-7, rtol=1e-7, name="gA")
    assert_close_verbose(huge[2], total[2], atol=1e-6, rtol=1e-6, name="gB")
    assert_close_verbose(huge[4], total[4], atol=1e-6, rtol=1e-6, name="gA")


def test_non_contiguous_inputs(nat):
    """Strided tensors are made contiguous in native.py (a copy), never misread."""
    t = inputs(3, 5, 16, 24, 4)
    g_t = t["g"].transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    B_t = t["B"].t().contiguous().t()
    assert not g_t.is_contiguous() and not B_t.is_contiguous()
    got = bwd(nat, {**t, "B": B_t}, g=g_t)
    exp = bwd(nat, t)
    for x, y in zip(got, exp):
        assert torch.equal(x, y)


def test_zero_copy(nat):
    t = torch.zeros(3, 4)
    assert nat._buf(t).__array_interface__["data"][0] == t.data_ptr()


def test_float64_runs_reference(nat):
    t = {k: v.double() for k, v in inputs(2, 3, 8, 8, 2).items()}
    got, exp = bwd(nat, t), bwd(ref, t)
    assert all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(got, exp))


def test_bad_mode(nat):
    t = inputs(2, 3, 8, 8, 2)
    with pytest.raises(ValueError, match="mode: expected 0"):
        bwd(nat, t, mode=3)


# ---------------------------------------------------------------- the binding's checks (raw module)
def _bufs(n=2, T=3, out=5, r=2):
    f = lambda *s: np.zeros(s, dtype=np.float32)  # noqa: E731
    return dict(g=f(n, T, out), u=f(n, T, r), B=f(out, r), gB=f(n, out, r), nuB=f(n))


def _call(ext, **kw):
    b = _bufs()
    b.update(kw)
    ext.ffa_linear_bwd(b["g"], b["u"], b["B"], None, None, b["gB"], b["nuB"], None, None, 1.0,
                       kw.pop("mode", ref.MODE_PER_SAMPLE), kw.pop("clip_B", 1.0), 1.0)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(g=np.zeros((2, 3, 5), dtype=np.float64)), "g: expected float32, got buffer format 'd'"),
        (dict(u=np.zeros((2, 3), dtype=np.float32)), r"u: expected 3-D, got shape \(2, 3\)"),
        (dict(B=np.zeros((5, 3), dtype=np.float32)), r"u: expected shape \(2, 3, 3\), got \(2, 3, 2\)"),
        (dict(gB=np.zeros((2, 5, 3), dtype=np.float32)), r"gB: expected shape \(2, 5, 2\), got \(2, 5, 3\)"),
        (dict(nuB=np.zeros((3,), dtype=np.float32)), r"nuB: expected shape \(2,\), got \(3,\)"),
        (dict(g=np.zeros((2, 5, 3), dtype=np.float32).transpose(0, 2, 1)), "g: expected a C-contiguous buffer"),
    ],
    ids=["dtype", "rank", "B_rank_mismatch", "out_shape", "norms_shape", "strided"],
)
def test_binding_rejects_bad_buffers(ext, bad, match):
    with pytest.raises(ValueError, match=match):
        _call(ext, **bad)


def test_binding_rejects_bad_scalars(ext):
    b = _bufs()
    with pytest.raises(ValueError, match="mode: expected 0"):
        ext.ffa_linear_bwd(b["g"], b["u"], b["B"], None, None, b["gB"], b["nuB"], None, None, 1.0, 7, 1.0, 1.0)
    gB = np.zeros((5, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="clip_B must be finite and >= 0"):
        ext.ffa_linear_bwd(b["g"], b["u"], b["B"], None, None, gB, b["nuB"], None, None, 1.0, 2, -1.0, 1.0)
    with pytest.raises(ValueError, match="nuB output must be given"):
        ext.ffa_linear_bwd(b["g"], b["u"], b["B"], None, None, gB, None, None, None, 1.0, 2, 1.0, 1.0)
    with pytest.raises(ValueError, match="gA: an output buffer is required"):
        xa = np.zeros((2, 3, 4), dtype=np.float32)
        ext.ffa_linear_bwd(b["g"], b["u"], b["B"], xa, None, gB, b["nuB"], None, None, 1.0, 2, 1.0, 1.0)
    ro = np.zeros((5, 2), dtype=np.float32)
    ro.setflags(write=False)
    with pytest.raises((ValueError, BufferError)):
        ext.ffa_linear_bwd(b["g"], b["u"], b["B"], None, None, ro, None, None, None, 1.0, 0, 1.0, 1.0)


def test_binding_clip_reduce_checks(ext):
    P, coef, out = np.ones((3, 4, 2), np.float32), np.ones(3, np.float32), np.zeros((4, 2), np.float32)
    ext.ffa_linear_clip_reduce(P, coef, out)
    assert (out == 3).all()
    with pytest.raises(ValueError, match=r"coef: expected shape \(3,\), got \(2,\)"):
        ext.ffa_linear_clip_reduce(P, coef[:2], out)
    with pytest.raises(ValueError, match=r"out: expected shape \(4, 2\), got \(2, 4\)"):
        ext.ffa_linear_clip_reduce(P, coef, np.zeros((2, 4), np.float32))


def test_binding_lowrank_checks(ext):
    x, A, u = np.ones((2, 3, 5), np.float32), np.ones((4, 5), np.float32), np.zeros((2, 3, 4), np.float32)
    ext.lowrank_in(x, A, u)
    assert (u == 5).all()
    with pytest.raises(ValueError, match=r"A: expected shape \(4, 5\), got \(4, 6\)"):
        ext.lowrank_in(x, np.ones((4, 6), np.float32), u)
    out = np.ones((2, 3, 5), np.float32)
    ext.lowrank_out(u, A, out, 0.5, True)  # 1 + 0.5 * (5 * 4)
    assert (out == 11).all()
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 3, 5\), got \(2, 3, 4\)"):
        ext.lowrank_out(u, A, np.zeros((2, 3, 4), np.float32), 1.0, False)


def test_binding_refuses_outputs_sharing_memory_with_another_argument(ext):
    """An output aliasing an input was a silent wrong answer (lowrank_out with out = L, r = cols = 80: max error
    42.6, its second 64-column block read rows the first had overwritten): every binding refuses overlap, a
    partial one (a view into the same array) too, and takes disjoint views of one array."""
    big = np.random.default_rng(0).standard_normal((2, 3, 80 * 2)).astype(np.float32)
    R = np.random.default_rng(1).standard_normal((80, 80)).astype(np.float32)
    L = np.ascontiguousarray(big[..., :80])
    with pytest.raises(ValueError, match="out: expected an output buffer sharing no memory with L"):
        ext.lowrank_out(L, R, L, 0.5, False)
    flat = np.zeros(2 * 3 * 80 + 10, np.float32)
    with pytest.raises(ValueError, match="out: .*sharing no memory with L"):  # shifted by 10 floats: partial
        ext.lowrank_out(flat[: 480].reshape(2, 3, 80), R, flat[10:490].reshape(2, 3, 80), 0.5, False)
    two = np.zeros((2, 2, 3, 80), np.float32)
    two[0] = L
    ext.lowrank_out(two[0], R, two[1], 0.5, False)  # disjoint halves of one array: fine
    np.testing.assert_allclose(two[1], 0.5 * (L @ R), rtol=1e-5, atol=1e-4)
    x, A = np.ones((2, 3, 5), np.float32), np.ones((4, 5), np.float32)
    with pytest.raises(ValueError, match="u: .*sharing no memory with x"):
        ext.lowrank_in(x, A, x.reshape(-1)[:24].reshape(2, 3, 4))
    P, coef = np.ones((3, 4, 2), np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match="out: .*sharing no memory with P"):
        ext.ffa_linear_clip_reduce(P, coef, P[0])
    b = _bufs()
    for out, clash in (("gB", "g"), ("nuB", "u"), ("nuB", "gB")):
        kw = dict(b)
        kw[out] = kw[clash].reshape(-1)[: kw[out].size].reshape(kw[out].shape)
        with pytest.raises(ValueError, match=f"{out}: .*sharing no memory with {clash}|{clash}: .*with {out}"):
            _call(ext, **kw)


def test_build_info(ext):
    info = ext.build_info()
    assert info["max_threads"] >= 1 and "compiler" in info and "flags" in info
    for name in ("ffa_linear_bwd", "ffa_linear_clip_reduce", "lowrank_in", "lowrank_out", "build_info", "max_threads"):
        assert getattr(ext, name).__doc__, f"{name} has no docstring"


def test_env_report(monkeypatch):
    from fedlora_fast import env

    monkeypatch.setenv("FEDLORA_FAST_KEEP_MERGED", "1")
    monkeypatch.delenv("FEDLORA_FAST_LAUNCH", raising=False)
    r = env.report()
    assert r["native"]["loaded"] == backends.available("native", "cpu")
    assert r["backends"]["cpu"]["backend"] in backends.BACKENDS
    K = pytest.importorskip("fedlora_fast.kernels.ffa_linear", reason="Triton reads these settings")
    # with Triton, as its kernels read them: an empty or upper-case FEDLORA_FAST_LAUNCH as the other variables
    # read theirs (it stopped the first Triton op), a bad value as its error (it was printed back as in effect)
    assert (r["backends"]["keep_merged"], r["backends"]["launch"]) == ("backward", K.launch_default()), r["backends"]
    for launch, want in (("", K.launch_default()), (" JIT ", "jit"), ("Direct", "direct")):
        monkeypatch.setenv("FEDLORA_FAST_LAUNCH", launch)
        assert K.launch_mode() == want and env.backend_info()["launch"] == want, launch
    monkeypatch.setenv("FEDLORA_FAST_GEMM", "bogus")
    assert env.backend_info()["gemm"].startswith("error: FEDLORA_FAST_GEMM: expected one of")


# ---------------------------------------------------------------- dispatcher without the extension
@pytest.fixture
def native_missing(monkeypatch):
    """Make ``import fedlora_fast.ops.native`` fail as it does when the extension was not built (its wrapper is
    imported afresh, the extension itself cannot be)."""
    monkeypatch.delitem(sys.modules, "fedlora_fast.ops.native", raising=False)
    monkeypatch.setitem(sys.modules, "fedlora_fast._native", None)
    monkeypatch.delattr(fedlora_fast, "_native", raising=False)
    backends.clear_cache()
    yield
    backends.clear_cache()


def test_missing_native_falls_back_with_one_warning(native_missing, monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    with pytest.warns(RuntimeWarning, match="native backend unavailable") as rec:
        assert backends.backend_for("cpu") == "torch"
        assert backends.backend_for("cpu") == "torch"
    assert len([w for w in rec if "native backend unavailable" in str(w.message)]) == 1
    assert backends.implementation("ffa_linear_bwd", "cpu") is ref.ffa_linear_bwd


def test_missing_native_requested_raises(native_missing, monkeypatch):
    from fedlora_fast import env

    monkeypatch.setenv(backends.ENV_VAR, "native")
    with pytest.raises(backends.BackendUnavailableError, match="needs a C\\+\\+17 compiler and CMake") as e:
        backends.backend_for("cpu")
    msg = str(e.value)
    assert msg.count(env.REBUILD_HINT) == 1 and "CMake (pip install -e ." not in msg, msg  # one rebuild hint
    assert "python -m fedlora_fast.env` reports what was built" in msg, msg


# ---------------------------------------------------------------- built for another CPU (-march=native)
@pytest.fixture
def fresh_native_import(monkeypatch):
    """Let ``fedlora_fast.ops.native`` be imported afresh (its checks run at import), without the extension
    already loaded, so the test can see whether the extension is imported."""
    monkeypatch.delitem(sys.modules, "fedlora_fast.ops.native", raising=False)
    monkeypatch.delitem(sys.modules, "fedlora_fast._native", raising=False)
    monkeypatch.delattr(fedlora_fast, "_native", raising=False)  # else `from fedlora_fast import _native` reuses it
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    backends.clear_cache()
    yield
    backends.clear_cache()


def test_native_built_for_missing_instructions_is_not_loaded(fresh_native_import, monkeypatch):
    """A -march=native module (a wheel from a pip cache, a Docker image) on a CPU without its instruction
    sets would die of SIGILL at the first op: the recorded ISA is checked before the extension is loaded,
    and the fallback warning names the missing flags and how to rebuild."""
    from fedlora_fast import env

    record = {"march_native": True, "isa": ["sse2", "avx2", "avx512f", "amx_tile"]}
    monkeypatch.setattr(env, "native_isa", lambda path=None: record)
    monkeypatch.setattr(env, "cpu_flags", lambda: {"sse2", "avx2"})
    with pytest.warns(RuntimeWarning, match="native backend unavailable") as rec:
        assert backends.backend_for("cpu") == "torch"
        assert backends.backend_for("cpu") == "torch"
    msgs = [str(w.message) for w in rec if "native backend unavailable" in str(w.message)]
    assert len(msgs) == 1
    assert "instruction sets this CPU lacks: avx512f, amx_tile" in msgs[0], msgs[0]
    assert "--no-cache-dir --force-reinstall --no-deps --no-binary fedlora_fast" in msgs[0], msgs[0]
    assert "FEDLORA_FAST_MARCH_NATIVE=OFF" in msgs[0], msgs[0]
    assert "fedlora_fast._native" not in sys.modules, "the extension was loaded before the check"
    assert backends.implementation("ffa_linear_bwd", "cpu") is ref.ffa_linear_bwd
    info = env.native_info()
    if info["built"]:
        assert info["loaded"] is False and "avx512f, amx_tile" in info["error"], info
        assert info["isa"]["missing_here"] == ["avx512f", "amx_tile"]
    assert "fedlora_fast._native" not in sys.modules, "env.native_info loaded the extension"


def test_isa_check_passes_when_flags_are_present_or_unknown(monkeypatch):
    from fedlora_fast import env

    record = {"march_native": True, "isa": ["sse2", "avx2"]}
    assert env.missing_isa(record, {"sse2", "avx2", "avx512f"}) == []
    assert env.missing_isa(record, {"sse2"}) == ["avx2"]
    monkeypatch.setattr(env, "cpu_flags", lambda: None)  # not Linux: cannot tell, do not refuse
    assert env.missing_isa(record) == []
    assert env.missing_isa({"isa": None}, {"sse2"}) == []  # the build could not list its ISA
    # a record of another architecture (x86 emulated on an ARM host reads the host's cpuinfo): unknown
    monkeypatch.setattr(env.platform, "machine", lambda: "x86_64")
    assert env.missing_isa({"processor": "aarch64", "isa": ["avx2"]}, {"fp", "asimd"}) == []
    assert env.missing_isa({"processor": "AMD64", "isa": ["avx2"]}, {"sse2"}) == ["avx2"]
    # an odd record (entries that are not names) is no record, never an error out of the backend probe
    assert env.missing_isa({"isa": ["avx2", None, 5]}, {"sse2"}) == ["avx2"]
    monkeypatch.setattr(env, "native_isa", lambda path=None: {"isa": [["x"]]})
    monkeypatch.setattr(env, "cpu_flags", lambda: {"sse2"})
    assert env.isa_problem() is None


def test_cpu_flags_read_only_an_x86_flags_line(tmp_path, monkeypatch):
    """Under x86 emulation on an ARM host /proc/cpuinfo has the host's "Features" line: not this CPU's."""
    from fedlora_fast import env

    real_open = open
    for text, want in (("processor\t: 0\nFeatures\t: fp asimd evtstrm\n", None),
                       ("processor\t: 0\nflags\t\t: fpu sse2 avx2\n", {"fpu", "sse2", "avx2"})):  # fmt: skip
        (tmp_path / "cpuinfo").write_text(text)
        monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(tmp_path / "cpuinfo", *a, **k)
                            if p == "/proc/cpuinfo" else real_open(p, *a, **k))
        assert env.cpu_flags() == want


def test_isa_recorded_next_to_the_built_module():
    """The module the tests load carries the record of what it needs, and this CPU has all of it."""
    _native_or_skip()
    from fedlora_fast import env

    path = env.native_path()
    record = env.native_isa(path)
    assert record is not None, f"no {env.ISA_FILE} next to {path}: rebuild (setup.py build_ext --inplace)"
    assert isinstance(record["isa"], list) and isinstance(record["march_native"], bool)
    if record["processor"] in ("x86_64", "AMD64"):
        assert "sse2" in record["isa"]
    flags = env.cpu_flags()
    if flags is not None:
        assert env.missing_isa(record, flags) == []
        if record["march_native"] and "avx2" in flags:
            assert "avx2" in record["isa"]


def test_failed_build_is_quoted_by_the_runtime_warning(fresh_native_import, monkeypatch, tmp_path):
    """pip hides a failed (optional) native build and may cache the wheel: the reason setup.py recorded
    and the cache-bypassing reinstall command reach the fallback warning."""
    from fedlora_fast import env

    (tmp_path / env.BUILD_ERROR_FILE).write_text("CMake configuring failed: the C++ compiler is broken\n")
    monkeypatch.setattr(env, "_package_dir", lambda: tmp_path)
    monkeypatch.setitem(sys.modules, "fedlora_fast._native", None)  # not built
    with pytest.warns(RuntimeWarning, match="native backend unavailable") as rec:
        assert backends.backend_for("cpu") == "torch"
    msg = str(rec[0].message)
    assert "native build failed when fedlora_fast was installed: CMake configuring failed" in msg, msg
    assert "pip install --no-cache-dir --force-reinstall" in msg, msg

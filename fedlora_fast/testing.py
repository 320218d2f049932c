"""Public test utilities: a verbose allclose, the batch-of-one per-sample gradient oracle, random op inputs.

The oracle runs every sample through the model alone and takes its gradient with plain autograd (no
per-sample machinery), the way opacus checks its grad samplers; use it to check any per-sample engine.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch
from torch import Tensor, nn


def assert_close_verbose(actual: Tensor, expected: Tensor, *, atol: float, rtol: float, name: str = "tensor") -> None:
    """``torch.testing.assert_close`` that also reports NaN/inf mismatches and the worst elements."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    nan_mismatch = torch.isnan(a) != torch.isnan(e)
    inf_mismatch = torch.isinf(a) != torch.isinf(e)
    diff = (a - e).abs()
    bad = (diff > atol + rtol * e.abs()) | nan_mismatch | inf_mismatch
    bad |= torch.isnan(diff) & ~(torch.isnan(a) & torch.isnan(e))
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        worst = [(tuple(i), a[tuple(i)].item(), e[tuple(i)].item()) for i in idx]
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"max abs diff {torch.nan_to_num(diff, nan=float('inf')).max().item():.3g}; "
            f"NaN mismatches {int(nan_mismatch.sum())}, inf mismatches {int(inf_mismatch.sum())}; "
            f"first (index, actual, expected): {worst}"
        )


def ffa_inputs(n: int, T: int, inp: int, out: int, r: int, dtype: torch.dtype, device, seed: int = 0,
               bias: bool = True) -> dict[str, Tensor | None]:
    """Random inputs of the ``ffa_linear`` ops from a seeded CPU generator (the same on every device):
    ``x`` (n, T, in), ``weight`` (out, in), ``bias`` (out,) or None, ``A`` (r, in) and ``B`` (out, r) float32,
    ``g`` (n, T, out), and ``xa``: x with inverted dropout (p=0.3). Scales keep outputs O(1)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cpu") * scale).to(device)

    x = rnd(n, T, inp).to(dtype)
    return dict(
        x=x,
        weight=rnd(out, inp, scale=inp**-0.5).to(dtype),
        bias=rnd(out).to(dtype) if bias else None,
        A=rnd(r, inp, scale=inp**-0.5),
        B=rnd(out, r, scale=0.5),
        g=rnd(n, T, out).to(dtype),
        xa=(x.float() * (torch.rand(n, T, inp, generator=gen, device="cpu").to(device) > 0.3) / 0.7).to(dtype),
    )


def merged_weight_bounds(w: Tensor, A: Tensor, B: Tensor, s: float) -> tuple[Tensor, Tensor, Tensor]:
    """What ``W' = W + s B A`` rounded once to W's dtype must hold: the exact float64 sum, half an ulp of W's
    dtype at each element (subnormals: half their spacing), and the low-rank product's own error. For
    bf16/fp16 that is one TF32 dot, whose operands keep their top 10 mantissa bits (truncated: 2^-9 + 2^-19
    of |s||B||A|); for float32 r roundings (r 2^-23). A W' within half an ulp beyond that error is right."""
    exact = w.double() + s * (B.double() @ A.double())
    fi = torch.finfo(w.dtype)
    half = fi.eps / 2  # bf16 2^-8, fp16 2^-11, fp32 2^-24
    half_ulp = (exact.abs() * half).clamp_min(fi.smallest_normal * half)
    dot = (2**-9 + 2**-19) if w.dtype != torch.float32 else A.shape[0] * 2.0**-23
    return exact, half_ulp, dot * abs(s) * (B.double().abs() @ A.double().abs())


def f64(t: Tensor | None) -> Tensor | None:
    """``t`` in float64 (None stays None): the reference's precision."""
    return None if t is None else t.double()


@contextlib.contextmanager
def dp_paused(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with its per-sample machinery off (plain autograd), restoring it afterwards."""
    from fedlora_fast.privacy.dpsgd import per_sample_modules

    modules = list(per_sample_modules(model).values())
    saved = [m.ps_ctx for m in modules]
    for m in modules:
        m.ps_ctx = None
    try:
        yield
    finally:
        for m, c in zip(modules, saved):
            m.ps_ctx = c


def per_sample_grads_loop(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, dict], Tensor],
    batch: dict[str, Tensor],
) -> dict[str, Tensor]:
    """Every sample's gradient of every trainable parameter, by a batch-of-one autograd loop.

    Args:
        loss_fn: ``loss_fn(model, sub_batch) -> scalar``, the loss of the samples in ``sub_batch``
            summed over samples (so that sample i's gradient is the gradient of its own loss).
        batch: tensors whose first dim is the sample.
    Returns:
        ``{param_name: (n, *param.shape)}``, float64.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    n = next(iter(batch.values())).shape[0]
    out: dict[str, list[Tensor]] = {k: [] for k in names}
    with dp_paused(model):
        for i in range(n):
            sub = {k: v[i : i + 1] for k, v in batch.items()}
            grads = torch.autograd.grad(loss_fn(model, sub), params, allow_unused=True)
            for k, p, g in zip(names, params, grads):
                out[k].append((g if g is not None else torch.zeros_like(p)).double())
    return {k: torch.stack(v) for k, v in out.items()}


def per_sample_grads_engine(model: nn.Module) -> dict[str, Tensor]:
    """The per-sample gradients a flat-clipping ``DPSGD`` kept from the last backward, by parameter name."""
    from fedlora_fast import per_sample

    records = {n: per_sample.pending(p) for n, p in model.named_parameters() if p.requires_grad}
    return {n: per_sample.dense_grad_sample(r.grad_sample).double() for n, r in records.items()
            if r is not None and r.grad_sample is not None}


def assert_engine_matches_loop(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, dict], Tensor],
    batch: dict[str, Tensor],
    *,
    atol: float = 1e-7,
    rtol: float = 1e-5,
) -> dict[str, Tensor]:
    """One backward under a fresh flat-clipping ``DPSGD`` (no clipping in effect, no noise) against the
    batch-of-one loop: the same tensors, each sample's gradient equal. Steps (lr 0) and detaches the engine.

    Returns:
        The engine's per-sample gradients (``per_sample_grads_engine``), float64.
    """
    from fedlora_fast.privacy.dpsgd import DPSGD

    loop = per_sample_grads_loop(model, loss_fn, batch)
    n = next(iter(batch.values())).shape[0]
    dp = DPSGD(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0),
               max_grad_norm=1e6, noise_multiplier=0.0, expected_batch_size=max(n, 1))
    loss_fn(model, batch).backward()
    ours = per_sample_grads_engine(model)
    assert sorted(ours) == sorted(loop), (sorted(ours), sorted(loop))
    for k in loop:
        assert_close_verbose(ours[k], loop[k], atol=atol, rtol=rtol, name=k)
    dp.step()
    dp.detach()
    return ours


def spy_kept_weight(monkeypatch) -> list[tuple[str | None, bool]]:
    """Record every backward's lookup of its forward's kept merged weight (the Triton backend's
    ``_kept_weight``, ``FEDLORA_FAST_KEEP_MERGED``) as (the variable's value at that moment, whether one was
    found); the lookups return what they did. ``monkeypatch``: pytest's fixture (undone with the test)."""
    from fedlora_fast.kernels import ffa_linear as K

    seen: list[tuple[str | None, bool]] = []
    real = K._kept_weight

    def spy(*args):
        w = real(*args)
        seen.append((os.environ.get(K.KEEP_ENV_VAR), w is not None))
        return w

    monkeypatch.setattr(K, "_kept_weight", spy)
    return seen


class StandInCudaGraphs:
    """``torch.cuda``'s stream and graph API replaced by CPU stand-ins while used as a context manager, so that
    code that captures and replays CUDA graphs (``GraphedAccumulator``) runs its control flow on a machine
    without a GPU. A capture runs its body once (a real one only records it); ``replay(graph)`` is what each
    graph replay does (default: nothing, the GPU's time rather than the host's; tests pass a function that
    reruns the graph's captured work into its captured outputs in place, as a real replay rewrites its
    output memory).
    ``captures`` counts captures; ``capturing`` is true inside one.
    """

    def __init__(self, replay: Callable[[], None] | None = None):
        self.replay, self.captures, self.capturing = replay, 0, False
        self._saved: dict = {}

    def __enter__(self) -> "StandInCudaGraphs":
        state = self

        class Graph:
            def replay(self):
                if state.replay is not None:
                    state.replay(self)

        class Capture:
            def __init__(self, graph, pool=None):
                pass

            def __enter__(self):
                state.captures += 1
                state.capturing = True

            def __exit__(self, *exc):
                state.capturing = False
                return False

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                pass

        stand_ins = dict(CUDAGraph=Graph, graph=Capture, Stream=Stream, current_stream=lambda device=None: Stream(),
                         stream=lambda s: contextlib.nullcontext(), device=lambda d: contextlib.nullcontext(),
                         graph_pool_handle=object)  # fmt: skip
        self._saved = {k: getattr(torch.cuda, k) for k in stand_ins}
        for k, v in stand_ins.items():
            setattr(torch.cuda, k, v)
        return self

    def __exit__(self, *exc) -> bool:
        for k, v in self._saved.items():
            setattr(torch.cuda, k, v)
        return False


def seeded_from_32_bits(gen: torch.Generator) -> bool:
    """Whether a CPU generator that has drawn nothing yet holds the Mersenne Twister's initialisation from a
    32-bit seed, as ``manual_seed`` gives it (whatever the seed's width: it keeps the low 32 bits): each state
    word is a fixed function of the one before. A state drawn from the OS (``privacy.sampling.seed_from_os``)
    meets that by chance for ~1 word in 2^32."""
    import struct

    raw = gen.get_state().numpy().tobytes()
    w = struct.unpack("<624Q", raw[24 : 24 + 624 * 8])
    follows = sum(w[i] == (1812433253 * (w[i - 1] ^ (w[i - 1] >> 30)) + i) & 0xFFFFFFFF for i in range(1, 624))
    return follows > 600

"""Triton kernels of the ``ffa_linear`` ops: fused FFA-LoRA forward, one-pass backward, clip-reduce.

Follows the maths of DESIGN.md (FFA-LoRA, Sun et al., ICLR 2024, arXiv 2403.12313) and computes exactly
``fedlora_fast.reference.ffa_linear`` (same names, signatures, shapes and dtypes). Kernel style after
the Triton matmul tutorial and Liger-Kernel (pointers + strides, sizes, scalars, constexpr flags/blocks).

Design (numbers in bench/NOTES.md):
- ``_gemm_lowrank_kernel``: ``out = [C] + [X Wt] + [bias] + s * L R`` with ``L`` (M, r) float32 and ``R``
  (r, N). One kernel serves the forward ``Y = X W^T + b + s U B^T`` (low-rank term added in the GEMM's
  epilogue, so Y is written once), ``U = xa A^T`` (N = r, float32), ``dX = G W + s V A`` and the split
  ``dxa = s V A``. With ``FEDLORA_FAST_GEMM=cublas`` the base GEMM goes to ``torch.matmul`` and the same
  kernel adds the low-rank term in place (one more read+write of Y/dX); the default ``auto`` times both per
  shape on CUDA and keeps the faster (``gemm_impl``). U alone may run in two halves of K (``SPLIT_K``,
  where its row tiles leave half the SMs idle), each added with one float32 atomic into a zeroed U: two
  addends into zero sum to the same bits in either order, so U stays deterministic (``_split_k``).
- ``_merge_kernel`` (``FEDLORA_FAST_GEMM=merged``): ``W' = W + s B A`` once per op, so that both base GEMMs
  are plain cuBLAS GEMMs on W' and the backward needs no V (``dX = G W'``). With
  ``FEDLORA_FAST_KEEP_MERGED=1`` the forward's W' rides on its U to the backward, which then merges nothing
  (``keep_merged``).
- ``_gemm_tma_kernel`` (``FEDLORA_FAST_GEMM=tma``, sm90+): the same GEMM + epilogue as a persistent kernel
  loading X and W through TMA descriptors; a candidate until timed on a GPU (bench/NOTES.md, v3).
- ``_outer_kernel``: the one pass over ``G``. Program (segment, split, out-tile) streams its rows of ``G``
  once, accumulating ``P = s G^T U`` (out-tile x r, float32, in registers), and ``V = G B`` restricted to
  its out-tile. Segments are samples (MODE_PER_SAMPLE / MODE_CLIP) or all rows (MODE_SUM). Cross-program
  sums go through small float32 scratch buffers (V partials: out/BLOCK_A x M x r; P partials when a
  sample's rows are split for parallelism) reduced afterwards in a fixed order: deterministic, no atomics
  (the interpreter has no fp16 atomics, and fp32 atomics of many addends would make DP results
  run-dependent).
- Norms: when a sample is not split, the kernel writes ``||P_i[out-tile]||^2`` partials straight from
  registers; otherwise ``_split_sum_kernel`` sums the split partials and takes the norms.
- Per-layer clipping: ``c_i`` needs the whole ``nu_i`` (every out-tile) before ``sum_i c_i P_i``. Instead
  of a second pass over ``G`` (``G^T (c * U)``, another M*out read) the per-sample ``P`` goes to a
  transient n*out*r float32 workspace (2 MiB for n=8, out=4096, r=16: L2-sized, 2r/T = 1/16 of G's
  bytes at T=512) that ``_clip_reduce_kernel`` reads once and then is freed: no per-sample state outlives the op.
- LoRA mode (``xa`` given): a second pass over ``xa`` with the same kernel gives ``Q_i = s V_i^T xa_i``.

Precision: base GEMMs in the input dtype with float32 accumulation (as cuBLAS); adapter maths in float32:
``input_precision="ieee"`` for float32 inputs; for bfloat16 inputs the big operand (G, X) stays bfloat16 and
the small float32 one (U, A, B) is split into three bfloat16 terms, each block's products summed from a zero
accumulator and promoted to float32 on the CUDA cores (``SPLIT_BF16`` / ``SPLIT_W``: float32-accurate U, P_i
and norms); fp16 inputs use ``"tf32x3"``; terms rounded to bf16/fp16 at once use one TF32 dot or two bf16
terms (see ``_prec``). Under
``TRITON_INTERPRET=1`` every dot is upcast to float32 (numpy has no bf16 dot) and bf16 stores are rounded
to nearest-even by hand (the interpreter's cast truncates).
float64 inputs, empty tensors and devices other than CUDA (CPU only under the interpreter) are handed to
the PyTorch reference. Inputs may be non-contiguous: every kernel takes strides.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import warnings
import weakref
from typing import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

from fedlora_fast.ops import backends
from fedlora_fast.ops.ffa_linear import BACKWARD_STATE_ATTR, check_dtype, check_shape

try:  # raised at a launch that needs more shared memory (or registers) than the device has
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover  (another Triton layout: nothing to catch)
    class OutOfResources(Exception):  # type: ignore[no-redef]
        pass
from fedlora_fast.reference import ffa_linear as _ref
from fedlora_fast.reference.ffa_linear import MODE_CLIP, MODE_PER_SAMPLE, MODE_SUM, clip_coef

GEMM_ENV_VAR = "FEDLORA_FAST_GEMM"  # "auto" (default), "triton", "cublas", "cublas_acc", "merged", "tma"

# Tests set this to a function ``(shape, dtype, device) -> Tensor`` (e.g. filled with NaN) so that any
# element of an output or scratch buffer a kernel fails to write shows up.
alloc_hook: Callable[[tuple, torch.dtype, torch.device], Tensor] | None = None


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    if alloc_hook is not None:
        return alloc_hook(tuple(shape), dtype, device)
    return torch.empty(shape, dtype=dtype, device=device)


# what Triton decided when it decorated the kernels below (at this import): read as Triton reads it
_INTERPRET = backends.triton_interprets()


def _interpret() -> bool:
    return _INTERPRET


GEMM_IMPLS = ("auto", "triton", "cublas", "cublas_acc", "merged", "tma")
# what "auto" times on the first call per shape (CUDA). "tma" measured slower on an H200 (2026-11-26) and is
# out; "cublas_acc" rounds as often as "cublas" (one term before the sum, then the sum: the low-rank term
# there, the base GEMM in "cublas"), so taking it changes no result beyond what "auto" already allows;
# "merged": rounding W + s B A once to the input dtype measured no less accurate than PyTorch's own bf16/fp16
# path (tests hold it to the same bound as the others). Both kept after their first timing (an H100,
# 2026-11-26): auto took "merged" for the forward and dX at every 16k-token Llama-7B shape (1.09-1.15x the
# floor) and "cublas_acc" for two 4k-token forwards (bench/NOTES.md)
AUTO_CANDIDATES = ("triton", "cublas", "cublas_acc", "merged")
# rounds of "auto"'s one-time timing, the candidates' order reversed in every other round, each candidate's
# fastest round kept: on an H100 (2026-11-26) a single round chose differently between runs at 16k tokens
# (4096->11008 dX: "triton" in 3 of 5 runs, "merged" in 2) while the merged path's profiled kernels were
# 240 us faster (run 2)
AUTO_ROUNDS = 2


def gemm_impl() -> str:
    """Which base GEMM the fused ops use (``FEDLORA_FAST_GEMM``):

    - ``"auto"`` (default): on CUDA, the first call per (op, token bucket, sizes, rank, dtype) times each of
      ``AUTO_CANDIDATES`` (triton, cublas, cublas_acc, merged) on the call's own inputs (``AUTO_ROUNDS`` rounds,
      each candidate's fastest kept; GPU time, the host's issue time hidden: ``_time_ms``) and keeps the
      fastest for the process (on an H100, v1:
      cuBLAS + epilogue 4-5 % faster at 2 of 6 Llama-7B shapes, Triton 3-35 % faster at the others;
      bench/NOTES.md); elsewhere ``"triton"``. Results agree to rounding, not bit for bit, across choices:
      pin a value for bitwise-reproducible runs.
    - ``"triton"``: the fused Triton GEMM; ``"cublas"``: ``torch.matmul`` + the low-rank term added in place
      by our kernel (one more read and write of the output);
    - ``"cublas_acc"``: the low-rank term (and bias) written first by our kernel, then cuBLAS accumulates the
      base GEMM onto it in place (``addmm_``, beta = 1: the output is written once by each, read once by
      cuBLAS's epilogue). The low-rank term is rounded to the input dtype before the sum (twice in all,
      once in ``"cublas"``/``"triton"``); auto took it for some 4k-token forwards on an H100 (2026-11-26);
    - ``"merged"``: ``W' = W + s B A`` made by our kernel (W read once, W' written once, per call), then one
      cuBLAS GEMM each way: ``Y = x W'^T + b`` and ``dX = G W'`` (exact algebra: ``G W + s (G B) A``), so the
      backward's one pass over G computes no V at all (FFA mode). The adapter's cost becomes two weight-sized
      passes per layer step instead of the output epilogues and V: it wins when tokens outnumber the
      weight's rows (bench/NOTES.md has the arithmetic). W' is rounded to the input dtype once (the adapter's
      term at W's scale): measured no less accurate than PyTorch's own bf16/fp16 path; a term under half an
      ulp of W is lost, the threshold at which "cublas" (and peft) lose it at Y's scale. Only where the
      adapter input is the base input (no adapter dropout) and dX is not split; elsewhere it runs as
      ``"cublas"``. Never in float16, pinned or not (W' can overflow where Y does not, and fp16's
      subnormals lose the term at an absolute threshold): a pinned "merged" runs as ``"triton"`` there.
      ``"auto"`` takes only ``"triton"`` in float16: "cublas" rounds x W^T to fp16 before the term is
      added, and "cublas_acc" gave inf on an H100 (2026-11-26, torch 2.11 defaults) where x W^T alone
      passes 65504 and the sum does not (cuBLAS's fp16 epilogue). Auto's choice at 16k tokens on an H100
      (2026-11-26);
    - ``"tma"``: a persistent Triton GEMM loading X and W through TMA descriptors (sm90+, bf16/fp16,
      16-byte-aligned rows, else ``"triton"``), the same epilogue; measured slower than ``"triton"`` and
      cuBLAS on an H200 (bench/NOTES.md).
    """
    name = os.environ.get(GEMM_ENV_VAR, "auto").strip().lower() or "auto"
    if name not in GEMM_IMPLS:
        raise ValueError(f"{GEMM_ENV_VAR}: expected one of {', '.join(map(repr, GEMM_IMPLS))}, got {name!r}")
    return name


KEEP_ENV_VAR = "FEDLORA_FAST_KEEP_MERGED"  # "1": the forward's W' kept for its backward; "cache": and across steps
_KEEP_VALUES = {"": "off", "0": "off", "false": "off", "no": "off", "off": "off",
                "1": "backward", "true": "backward", "yes": "backward", "on": "backward", "cache": "cache"}  # fmt: skip
_KEPT_ATTR = BACKWARD_STATE_ATTR  # the attribute of U that carries the forward's W' (a _Kept)


def keep_mode() -> str:
    """``FEDLORA_FAST_KEEP_MERGED`` as "off" (unset, 0/false/no/off), "backward" (1/true/yes/on:
    ``keep_merged``) or "cache" (``merged_cache``); anything else is a ValueError naming the variable."""
    v = os.environ.get(KEEP_ENV_VAR, "0").strip().lower()
    if v not in _KEEP_VALUES:
        raise ValueError(f"{KEEP_ENV_VAR}: expected 1 or 0 (true/false, yes/no, on/off) or cache, got {v!r}")
    return _KEEP_VALUES[v]


def merged_cache() -> bool:
    """``FEDLORA_FAST_KEEP_MERGED=cache`` (opt-in): ``keep_merged``, and each adapter's W' = W + s B A is also kept
    across forwards, one per (W, A, B) tensors (W an ``nn.Parameter``: a weight made per call, as a float32 weight
    cast under bf16 autocast is, runs as with ``keep_merged``), and brought up to date at each forward by two small
    launches: ``_changed_kernel`` compares B's and A's bits with their snapshots, and ``_merge_kernel``'s ``CHECK``
    re-merges only the tiles whose B rows or A columns changed (an unchanged W' costs a read of B and A, not of W).
    Between optimizer steps, i.e. over the micro-batches of one DP logical batch (``micro_batches``,
    ``GraphedAccumulator``) and in evaluation, the forward is then one cuBLAS GEMM on W' (plus U) and the backward's
    dX another, with no merge at all; after a step, one merge, as with ``keep_merged``. ``auto`` takes ``merged``
    without timing where the cache applies (no other candidate does less), and so does the backward given the
    forward's W'.

    What is checked: B and A by content, so writes that bypass the version counter and CUDA graph replays are seen.
    W (frozen) on the host only: its storage (weakly referenced, so a new tensor at a reused address is seen),
    address, layout and version counter, as ``keep_merged`` does. A new W, a new scale, or any forward while a
    backward still holds the current W' get a new W' (the old one is never rewritten; so a layer applied twice in
    one forward merges afresh for its second call). Not seen: a base weight changed through ``.data`` (no version
    bump), eagerly or between replays of a graph (a replay runs no host check; ``GraphedAccumulator`` refuses to
    replay after a version-bumping change of a base weight it captured). ``torch.compile(mode="reduce-overhead")``
    with the cache is untested (its warm-ups may allocate from the graphs' pool outside a capture): use
    ``GraphedAccumulator``.

    The price: one W-sized buffer per adapted layer for as long as its W, A and B live (13 GB for a bf16 Llama-7B
    with every projection adapted, 2 GB for q and v only), until ``clear_merged_cache()``. A CUDA graph replays the
    W' it captured: those stay allocated (not freed by ``clear_merged_cache``) until their W, A or B is freed. Under
    capture no new W' is made: the call merges for itself and keeps that for its backward, as ``keep_merged`` with
    ``merged`` pinned does (never an untimed GEMM choice, whose first launch could autotune inside the capture)."""
    return keep_mode() == "cache"


def keep_merged() -> bool:
    """``FEDLORA_FAST_KEEP_MERGED=1`` (opt-in, default off): a forward that runs the ``merged`` GEMM keeps its ``W'
    = W + s B A`` for its own backward, which then runs ``dX = G W'`` without merging W' again (one W-sized pass
    fewer per layer step: a merge took ~25 us at 4096 x 4096 and ~70 us at 4096 x 11008, r = 16, bf16, on an H100,
    bench/NOTES.md). The price is memory: one W-sized buffer per adapted layer from its forward until its backward
    is done (13 GB for a bf16 Llama-7B forward with every projection adapted; under activation checkpointing only
    the recomputed block's; in a CUDA graph, the graph's memory pool holds it for as long as the graph lives). The
    layer drops it at once where the backward will not read it (no input gradient wanted, or adapter dropout
    active). With it on, ``auto`` credits the forward's ``merged`` candidate with the merge it saves the backward
    (the merge alone is timed once per shape), so it takes ``merged`` in both directions where that is the fastest
    step (a backward given the forward's W' takes ``merged`` untimed under ``auto``: ``dX = G W'`` is the floor's
    own GEMM, so the credit is earned). The kept W' rides on the forward's U as an attribute: it is freed with U
    (when autograd frees the backward's saved tensors), and used only while W, A and B are the same memory at the
    same version counter and the scale is the same; a saved-tensor hook that copies U, or an in-place change of W, A
    or B through autograd, merges again. Writes that bypass the version counter (``p.data.add_(...)``, a raw kernel,
    a collective) between a forward and its backward are not seen: the backward then uses the forward's W', the one
    the forward computed with, where the option off would merge the changed weights. True also for
    ``merged_cache``'s value ("cache")."""
    return keep_mode() != "off"


class _Kept:
    """A forward's merged weight and what it was merged from (``_merge_sig``)."""

    __slots__ = ("weight", "sig", "__weakref__")  # (weakly held by the cache entry it came from: _Cached.holders)

    def __init__(self, weight: Tensor, sig: tuple):
        self.weight, self.sig = weight, sig


def _merge_sig(weight: Tensor, A: Tensor, B: Tensor, scale: float) -> tuple | None:
    """What W' = W + s B A depends on: each tensor's memory, layout and version counter, and the scale.
    None for inference tensors (no version counter: nothing to check a kept W' against)."""
    sig = [float(scale)]
    for t in (weight, A, B):
        if t.is_inference():
            return None
        sig += (t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.stride())
    return tuple(sig)


def _keep(u: Tensor, wm: Tensor, weight: Tensor, A: Tensor, B: Tensor, scale: float) -> _Kept | None:
    sig = _merge_sig(weight, A, B, scale)
    if sig is None:
        return None
    kept = _Kept(wm, sig)
    setattr(u, _KEPT_ATTR, kept)
    return kept


def _kept_weight(u: Tensor, weight: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor | None:
    """The merged weight the forward that made ``u`` kept, if it was merged from these very W, A, B (same
    memory, layout, version) and scale; else None."""
    kept = getattr(u, _KEPT_ATTR, None)
    if not isinstance(kept, _Kept) or kept.sig != _merge_sig(weight, A, B, scale):
        return None
    return kept.weight


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # a float type's bits, by element size


class _Cached:
    """One adapter's cached W' (``merged_cache``): what it was merged from, B's and A's bits then, and the
    kept W' handed to pending backwards (``holders``: while one lives, W' is not written in place)."""

    __slots__ = ("refs", "storage", "sig", "weight", "b_snap", "a_snap", "captured", "holders")

    def __init__(self, weight: Tensor, A: Tensor, B: Tensor, sig: tuple, wm: Tensor):
        self.refs = tuple(map(weakref.ref, (weight, A, B)))
        # W's memory, weakly: a tensor given to W later (``param.data = ...`` keeps the version counter) is
        # another storage even where it reuses the old address (CUDA's caching allocator); not held, so that
        # ``module.to(...)`` or ``.cpu()`` frees the old memory at once
        self.storage = StorageWeakRef(weight.untyped_storage())
        self.sig, self.weight = sig, wm
        self.b_snap = torch.empty(B.shape, dtype=_BITS[B.element_size()], device=B.device)
        self.a_snap = torch.empty(A.shape, dtype=_BITS[A.element_size()], device=A.device)
        self.captured = False
        self.holders: weakref.WeakSet = weakref.WeakSet()

    def matches(self, weight: Tensor, A: Tensor, B: Tensor, sig: tuple) -> bool:
        return (self.sig == sig and all(r() is t for r, t in zip(self.refs, (weight, A, B)))
                and not self.storage.expired() and self.storage.cdata == weight.untyped_storage()._cdata)


_MERGED_CACHE: dict[tuple, _Cached] = {}  # (id(W), id(A), id(B)) -> their W'; leaves when one of them is freed
# W' and snapshots a CUDA graph may replay into, after their entry was replaced or cleared: freed with the key's
# tensors (a graph replaying after those are freed reads freed memory anyway)
_CAPTURED: dict[tuple, list] = {}
_WATCHED: dict[tuple, list] = {}  # key -> the finalizers of its W, A and B (one set per key, however often made)


def clear_merged_cache() -> None:
    """Free every W' of ``merged_cache`` (``FEDLORA_FAST_KEEP_MERGED=cache``), except those a CUDA graph
    captured (it may replay into them: freed when their W, A or B is), and drop the finalizers watching the
    tensors of the rest: a tensor with a weak reference cannot be swapped (``torch.utils.swap_tensors``), so
    ``load_state_dict`` or ``.to()`` under ``torch.__future__.set_swap_module_params_on_conversion(True)``
    failed on every cached layer's W, A and B until this ran."""
    for key, e in list(_MERGED_CACHE.items()):
        _retire(key, e)
    _MERGED_CACHE.clear()
    for key in [k for k in _WATCHED if k not in _CAPTURED]:
        for f in _WATCHED.pop(key):
            f.detach()


def _retire(key: tuple, e: _Cached) -> None:
    if e.captured:
        _CAPTURED.setdefault(key, []).append((e.weight, e.b_snap, e.a_snap))


def _forget(key: tuple) -> None:
    """The finalizer of an entry's W, A and B: the entry and what graphs captured of it."""
    _MERGED_CACHE.pop(key, None)
    _CAPTURED.pop(key, None)
    for f in _WATCHED.pop(key, ()):
        f.detach()  # the other two tensors' finalizers: their key is gone (its ids may be reused)


def _watch(key: tuple, tensors: tuple) -> None:
    if not any(f.alive for f in _WATCHED.get(key, ())):
        _WATCHED[key] = [weakref.finalize(t, _forget, key) for t in tensors]


def captured_base_weights(params) -> list[tuple]:
    """Of the tensors in ``params``, the base weights whose cached W' a CUDA graph captured (``merged_cache``),
    as (weak reference, address, version counter) now: what ``changed_base_weights`` compares against later.
    ``GraphedAccumulator`` records them after each capture."""
    ids = {id(p) for p in params}
    out = []
    for e in list(_MERGED_CACHE.values()):
        w = e.refs[0]()
        if e.captured and w is not None and id(w) in ids:
            out.append((e.refs[0], w.data_ptr(), w._version))
    return out


def changed_base_weights(records: list[tuple]) -> list[str]:
    """Of ``captured_base_weights``' records, the base weights since changed through an op that bumps their
    version counter (``copy_`` under ``no_grad``, ``load_state_dict``, the layer's ``merge``) or given new
    memory: a replay re-checks B and A, never W, so it would go on using the W' merged from the old W
    (whether or not the entry is still in the cache: a replay writes into the buffers it captured)."""
    out = []
    for ref, ptr, version in records:
        w = ref()
        if w is not None and (w.data_ptr(), w._version) != (ptr, version):
            out.append(f"a base weight of shape {tuple(w.shape)} (FEDLORA_FAST_KEEP_MERGED=cache: the graph replays "
                       "its W' merged from the old values)")
    return out


def _cache_sig(weight: Tensor, A: Tensor, B: Tensor, scale: float) -> tuple | None:
    """What a cached W' is checked against on the host (B and A by content, on the device): W's memory,
    layout and version counter, the scale, and A's and B's types and shapes. None where W has no version
    counter (an inference tensor)."""
    if weight.is_inference():
        return None
    return (float(scale), weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape), weight.stride(),
            weight.device, A.dtype, tuple(A.shape), A.device, B.dtype, tuple(B.shape), B.device)  # fmt: skip


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _weight_owner(weight: Tensor) -> torch.nn.Parameter | None:
    """The parameter a base weight is: itself, or, for a transformers ``Conv1D`` base (GPT-2's), the (in, out)
    parameter whose transpose the layer passes (a new view each call: the cache keys on the parameter, and
    ``_cache_sig`` still checks the view's memory, strides and version counter). None for anything else."""
    if isinstance(weight, torch.nn.Parameter):
        return weight
    base = weight._base
    if (isinstance(base, torch.nn.Parameter) and weight.dim() == base.dim() == 2
            and weight.shape == base.shape[::-1] and weight.stride() == base.stride()[::-1]
            and weight.data_ptr() == base.data_ptr()):
        return base
    return None


def _cached_merged_weight(weight: Tensor, A: Tensor, B: Tensor, scale: float) -> _Cached | None:
    """The cache entry of (W, A, B) (``merged_cache``), its W' brought up to date with them and the scale.

    A new W' (made and merged in full; the old one left to whoever holds it) on first use, when W or the
    scale changed, or while a pending backward holds the current one (a content change written in place
    would change the W' that backward reads: a B swapped through ``.data`` for an eval forward and back, say).
    Otherwise merged again in place only where B's or A's bits changed. None where it cannot be cached (no
    version counter on W; a new W' needed under CUDA graph capture, whose pool must not feed the cache)."""
    sig = _cache_sig(weight, A, B, scale)
    owner = _weight_owner(weight)
    if sig is None or owner is None:  # a W made per call (an fp32 weight cast under autocast, say) has a new
        return None  # identity each forward: a W' per call, as keep_merged
    key = (id(owner), id(A), id(B))
    e = _MERGED_CACHE.get(key)
    capturing = _capturing(weight.device)
    if e is None or not e.matches(owner, A, B, sig) or len(e.holders):
        if capturing:
            return None
        out, inp = weight.shape
        new = _Cached(owner, A, B, sig, _alloc((out, inp), weight.dtype, weight.device))
        _launch_merge(weight, A, B, scale, new.weight)
        _snapshot(new, A, B)
        # in the cache only once whole: a merge that raised (a launch out of resources, which the op retries)
        # must not leave a W' whose snapshots claim bits it was never merged from
        if e is not None:
            _retire(key, e)
        _watch(key, (owner, A, B))
        _MERGED_CACHE[key] = new
        return new
    e.captured = e.captured or capturing
    try:
        _launch_merge(weight, A, B, scale, e.weight, (e.b_snap, e.a_snap))  # (the snapshots updated there)
    except BaseException:  # the snapshots may hold the new bits while W' does not: the entry goes
        _retire(key, e)
        _MERGED_CACHE.pop(key, None)
        raise
    return e


def _snapshot(e: _Cached, A: Tensor, B: Tensor) -> None:
    """B's and A's bits into the entry's snapshots, after the merge that read the old ones (stream order)."""
    torch._foreach_copy_([e.b_snap, e.a_snap], [B.view(e.b_snap.dtype), A.view(e.a_snap.dtype)])


# ---------------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _round_bf16_rne(x):
    """Round float32 to the nearest-even bfloat16 value (kept in float32). The interpreter's float32 ->
    bfloat16 cast truncates (1 ulp errors); after this it is exact. Not needed on GPUs (cvt.rn)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _split_bf16(x):
    """float32 ``x`` as three bfloat16 terms, ``hi + lo + lo2 = x`` to ~2^-24 (each the rounded remainder)."""
    hi = x.to(tl.bfloat16)
    rest = x - hi.to(tl.float32)
    lo = rest.to(tl.bfloat16)
    lo2 = (rest - lo.to(tl.float32)).to(tl.bfloat16)
    return hi, lo, lo2


@triton.jit
def _tc_dot(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b`` on the tensor cores in the operands' 16-bit dtype (float32 accumulation). ``UPCAST``:
    the interpreter has no bfloat16 dot, so the same products run in float32 there."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _dot_split_into(a, hi, lo, lo2, acc, TERMS: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ (hi + lo [+ lo2])``, ``a`` exact in bfloat16, ``TERMS`` (2 or 3) split terms chained on the
    tensor cores' own float32 accumulation, smallest terms first (the one-pass kernel's ``PROMOTE`` chains
    them across several row blocks before promoting)."""
    if TERMS == 3:
        acc = _tc_dot(a, lo2, acc, UPCAST)
    acc = _tc_dot(a, lo, acc, UPCAST)
    return _tc_dot(a, hi, acc, UPCAST)


@triton.jit
def _dot_split(a, hi, lo, lo2, TERMS: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ (hi + lo [+ lo2])`` in float32 from a zero accumulator (``_dot_split_into``).

    The caller adds this block's result to its running float32 sum on the CUDA cores. Accumulating every
    block into one tensor-core accumulator measured 1.4e-5..6.9e-5 relative error in U/P/nu on an H100 (v1,
    bench/NOTES.md): their float32 accumulation truncates at each MMA step, ~3*K/16 times; promoting per
    block keeps it to ~3*BLOCK/16 truncations of a block-sized sum (~6e-7 predicted by an RZ model that
    reproduced the v1 errors; 4e-7 measured on an H200, v2).
    """
    return _dot_split_into(a, hi, lo, lo2, tl.zeros((a.shape[0], hi.shape[1]), dtype=tl.float32), TERMS, UPCAST)


@triton.jit
def _split_bf16_packed(x):
    """float32 ``x`` (m, k) as one bfloat16 operand (m, 4 k) of its three ``_split_bf16`` terms: column
    4 j + t holds term t of column j (t = 3: zero), so one tensor-core instruction multiplies all three."""
    hi, lo, lo2 = _split_bf16(x)
    return tl.reshape(tl.join(tl.join(hi, lo), tl.join(lo2, tl.zeros_like(lo2))), (x.shape[0], 4 * x.shape[1]))


@triton.jit
def _sum_packed(acc):
    """Products with a ``_split_bf16_packed`` operand, (m, 4 k), back to (m, k): each column's terms added in
    float32."""
    return tl.sum(tl.reshape(acc, (acc.shape[0], acc.shape[1] // 4, 4)), axis=2)


@triton.jit
def _gemm_lowrank_kernel(
    x_ptr, w_ptr, bias_ptr, l_ptr, r_ptr, out_ptr,
    stride_xn, stride_xt, stride_xk,
    stride_wk, stride_wn,
    stride_ln, stride_lt, stride_lj,
    stride_rj, stride_rn,
    stride_on, stride_ot, stride_of,
    M, N, K, T, RANK, scale,
    HAS_MAIN: tl.constexpr, HAS_C: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr,
    MAIN_FP32: tl.constexpr, MAIN_PREC: tl.constexpr, LR_PREC: tl.constexpr, FIX_BF16_ROUNDING: tl.constexpr,
    SPLIT_W: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, PACK_W: tl.constexpr, PRESPLIT_W: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    """out[m, :] (=|+=) X[m] @ Wt + bias + scale * L[m] @ R; row m is (m // T, m % T) of a 3-D tensor.

    ``SPLIT_W``: X is bfloat16 and Wt float32 (U = X A^T): Wt is split into three bfloat16 terms
    (hi + lo + lo2 = Wt to ~2^-24) and X (exact in bfloat16) multiplies each on the bfloat16 tensor cores,
    float32 accumulation: float32-accurate without upcasting the X tile. ``EVEN_K``: K % BLOCK_K == 0 (no
    K mask in the main loop). ``PACK_W`` (with ``SPLIT_W``): the three terms interleaved with a zero into one
    operand 4 * BLOCK_N wide, one tensor-core instruction group per K step instead of three chained ones
    (as the one-pass kernel's ``PACK``); each term's sum kept apart until after the K loop. ``PRESPLIT_W``
    (with ``SPLIT_W``, N <= BLOCK_N): Wt arrives already split, bfloat16, in the layout the loop multiplies
    (``_split_terms_kernel``, once per call): the conversions leave the K loop, where every program of M
    rows repeated them for the same Wt. Rows/columns
    past M/N are loaded wrapped (valid addresses, results discarded by the store mask), as in the Triton
    matmul tutorial, so that only the store is masked. ``SPLIT_K`` (1 or 2; 2 only for ``out += X Wt`` into a
    zeroed float32 ``out``, nothing else): grid axis 1 splits K in two halves of whole blocks, each program
    adds its partial sum with one float32 atomic add. Two addends into zero: ``(0 + a) + b == (0 + b) + a``
    exactly, so the result does not depend on which half lands first (three or more would). The atomic
    flushes a float32 subnormal to zero (sm90 SASS: ``REDG.E.ADD.F32x4.FTZ``), deterministically. Whether a
    launch splits depends on its row count and the GPU's SM count (``_split_k``), so U's last bits may
    differ between token counts or GPU models, never between runs of one shape on one GPU.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n  # grouped order: consecutive programs share X rows in L2
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # int32: M = tokens and N = features fit
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    rm_ld = rm % M  # wrapped for loads
    rn_ld = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
    # 64-bit element offsets of the rows (n * T * features may pass 2^31)
    x_row = (rm_ld // T).to(tl.int64) * stride_xn + (rm_ld % T).to(tl.int64) * stride_xt
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PACK_W:
        acc4 = tl.zeros((BLOCK_M, 4 * BLOCK_N), dtype=tl.float32)
    if HAS_MAIN:
        if SPLIT_K > 1:  # this program's K range: whole blocks, so only the last block of K is partial
            part = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
            k_lo = tl.program_id(1) * part
            k_hi = tl.minimum(K, k_lo + part)
        else:
            k_lo = 0
            k_hi = K
        rk = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + x_row[:, None] + (k_lo + rk).to(tl.int64)[None, :] * stride_xk  # K * stride may pass 2^31
        if PRESPLIT_W and PACK_W:  # Wt's terms made by _split_terms_kernel, interleaved: (K, 4 BLOCK_N) bf16
            w_ptrs = w_ptr + (k_lo + rk)[:, None] * stride_wk + tl.arange(0, 4 * BLOCK_N)[None, :] * stride_wn
        elif PRESPLIT_W:  # side by side, [hi | lo | lo2]: (K, 3 BLOCK_N) bf16, zero past N
            w_ptrs = w_ptr + (k_lo + rk)[:, None] * stride_wk + tl.arange(0, BLOCK_N)[None, :] * stride_wn
        else:
            w_ptrs = w_ptr + (k_lo + rk)[:, None] * stride_wk + rn_ld.to(tl.int64)[None, :] * stride_wn
        for k0 in range(k_lo, k_hi, BLOCK_K):
            mask_k = (k0 + rk) < K
            if EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                a = tl.load(x_ptrs, mask=mask_k[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=mask_k[:, None], other=0.0)
            if PRESPLIT_W and PACK_W:  # the packed terms as loaded: no conversion in the loop
                acc4 += _tc_dot(a, b, tl.zeros_like(acc4), MAIN_FP32)
            elif PRESPLIT_W:
                if EVEN_K:
                    b_lo = tl.load(w_ptrs + BLOCK_N * stride_wn)
                    b_lo2 = tl.load(w_ptrs + 2 * BLOCK_N * stride_wn)
                else:
                    b_lo = tl.load(w_ptrs + BLOCK_N * stride_wn, mask=mask_k[:, None], other=0.0)
                    b_lo2 = tl.load(w_ptrs + 2 * BLOCK_N * stride_wn, mask=mask_k[:, None], other=0.0)
                acc += _dot_split(a, b, b_lo, b_lo2, 3, MAIN_FP32)
            elif PACK_W:  # one instruction group for the three terms, promoted per K block
                acc4 += _tc_dot(a, _split_bf16_packed(b.to(tl.float32)), tl.zeros_like(acc4), MAIN_FP32)
            elif SPLIT_W:  # MAIN_FP32 is set only under the interpreter here (see _launch_gemm)
                b_hi, b_lo, b_lo2 = _split_bf16(b.to(tl.float32))
                acc += _dot_split(a, b_hi, b_lo, b_lo2, 3, MAIN_FP32)
            else:
                if MAIN_FP32:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                else:
                    b = b.to(a.dtype)
                acc = tl.dot(a, b, acc, input_precision=MAIN_PREC)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
    if PACK_W:
        acc += _sum_packed(acc4)
    smp = (rm // T).to(tl.int64)
    tok = (rm % T).to(tl.int64)
    if HAS_LOWRANK:
        rj = tl.arange(0, BLOCK_R)
        mask_j = rj < RANK
        lo = tl.load(
            l_ptr + (smp * stride_ln + tok * stride_lt)[:, None] + rj[None, :] * stride_lj,
            mask=mask_m[:, None] & mask_j[None, :],
            other=0.0,
        ).to(tl.float32)
        hi = tl.load(
            r_ptr + rj[:, None] * stride_rj + rn[None, :] * stride_rn,
            mask=mask_j[:, None] & mask_n[None, :],
            other=0.0,
        ).to(tl.float32)
        # into the same accumulator: a second BLOCK_M x BLOCK_N result would double the registers (spills)
        acc = tl.dot(lo * scale, hi, acc, input_precision=LR_PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    o_ptrs = out_ptr + (smp * stride_on + tok * stride_ot)[:, None] + rn[None, :] * stride_of
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_C:
        acc += tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    if FIX_BF16_ROUNDING:
        acc = _round_bf16_rne(acc)
    if SPLIT_K > 1:
        tl.atomic_add(o_ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_tma_kernel(
    x_desc, w_desc, out_ptr, bias_ptr, l_ptr, r_ptr,
    stride_om, stride_of, stride_lm, stride_lj, stride_rj, stride_rn,
    M, N, K, RANK, scale,
    W_KN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr, LR_PREC: tl.constexpr,
    FIX_BF16_ROUNDING: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
):  # fmt: skip
    """Persistent ``out = X Wt + bias + scale * L R`` over 2-D row-major X (M, K) and out (M, N), loading X
    and W through TMA descriptors (Hopper+; the Triton persistent-matmul tutorial's structure).

    ``W_KN``: ``w_desc`` describes Wt itself, (K, N) (dX = G W: W is (out, in) = (K, N)); else W, (N, K),
    transposed in registers (Y = X W^T). Each program walks tiles ``pid, pid + NUM_SMS, ...`` in grouped
    order. TMA zero-fills out-of-bounds loads (no K/M/N masks in the main loop). The epilogue is
    ``_gemm_lowrank_kernel``'s: the low-rank term into the same accumulator, bias, a masked store.
    """
    start = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    group = GROUP_M * num_n
    for tile in tl.range(start, num_m * num_n, NUM_SMS, flatten=True):
        first_m = (tile // group) * GROUP_M
        group_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % group) % group_m
        pid_n = (tile % group) // group_m
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(k_tiles):
            off_k = kt * BLOCK_K
            a = x_desc.load([off_m, off_k])
            if W_KN:
                b = w_desc.load([off_k, off_n])
            else:
                b = w_desc.load([off_n, off_k]).T
            acc = _tc_dot(a, b, acc, UPCAST)
        rm = off_m + tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, BLOCK_N)
        if HAS_LOWRANK:
            rj = tl.arange(0, BLOCK_R)
            mask_j = rj < RANK
            lo = tl.load(
                l_ptr + rm.to(tl.int64)[:, None] * stride_lm + rj[None, :] * stride_lj,
                mask=(rm < M)[:, None] & mask_j[None, :],
                other=0.0,
            ).to(tl.float32)
            hi = tl.load(
                r_ptr + rj[:, None] * stride_rj + rn[None, :] * stride_rn,
                mask=mask_j[:, None] & (rn < N)[None, :],
                other=0.0,
            ).to(tl.float32)
            acc = tl.dot(lo * scale, hi, acc, input_precision=LR_PREC)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if FIX_BF16_ROUNDING:
            acc = _round_bf16_rne(acc)
        # a masked pointer store: a TMA store's staging tile (BLOCK_M x BLOCK_N) would not fit in shared
        # memory beside the pipeline's stages at 128 x 256 (232 KiB > 227 on sm90)
        o_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_of
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _outer_kernel(
    l_ptr, r_ptr, b_ptr, p_ptr, nu_ptr, v_ptr,
    stride_ln, stride_lt, stride_la,
    stride_rn, stride_rt, stride_rj,
    stride_ba, stride_bj,
    stride_pi, stride_ps, stride_pa, stride_pj,
    stride_vtile, stride_vm,
    SEG, T, A, RANK, ROWS_PER_SPLIT, NSPLIT, NUM_A_TILES, scale,
    HAS_V: tl.constexpr, HAS_NORM: tl.constexpr, PREC: tl.constexpr, V_PREC: tl.constexpr,
    SPLIT_BF16: tl.constexpr, V_TERMS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_R: tl.constexpr, PROMOTE: tl.constexpr,
    PACK: tl.constexpr, PRESPLIT: tl.constexpr, SAMPLE_SEG: tl.constexpr,
):  # fmt: skip
    """One pass over L (rows of a segment split): P = scale * L^T R per (segment, split, a-tile), V = L Bm.

    Rows of segment ``seg`` are ``seg * SEG .. seg * SEG + SEG - 1`` of the (M, ·) row space; row m is
    (m // T, m % T) of the 3-D tensors L (n, T, A) and R (n, T, RANK). ``SAMPLE_SEG`` (SEG == T): a segment
    is one sample, row t of segment seg is (seg, t), and the loop computes no division per row (the divided
    path: six integer divisions per row block per thread, ~120 of its ~540 instructions, AOT sm90). The
    host passes T = M (one sample of M rows, ``stride_ln`` unused) for a sum over rows evenly spaced
    across samples.

    ``SPLIT_BF16`` (bfloat16 L): L stays bfloat16 (exact) and the small float32 operands R and Bm are split
    into bfloat16 terms (hi + lo + lo2 = R to ~2^-24), each multiplied on the bfloat16 tensor cores with
    float32 accumulation: P is float32-accurate without upcasting the big L tile (3xTF32 would split
    both operands). ``V_TERMS`` terms of Bm for V (2: ~2^-16, enough for a term rounded to bfloat16).
    ``PROMOTE``: P's tensor-core accumulator spans this many row blocks before it is added to the float32
    running sum on the CUDA cores (1: every block, as v2 measured at 4e-7 on an H200; more blocks mean fewer
    waits for the tensor cores and more of their truncating accumulation, see _dot_split).
    ``PACK`` (with ``SPLIT_BF16``, BLOCK_R = 16): R's three bfloat16 terms interleaved as one operand of
    4 * BLOCK_R columns (``_split_bf16_packed``), so P takes one tensor-core instruction per step
    instead of three chained ones (m64n64k16 for m64n16k16 x 3, each waited for: the v2 kernel issued 40
    such instructions in five waited groups per 16 KiB of L, bench/NOTES.md); each term's sum stays apart
    until the end, where the four are added in float32. V likewise: Bm's three terms in one operand (one
    instruction group instead of ``V_TERMS`` chained ones; all three terms, whatever ``V_TERMS``), added per
    row block.
    ``PRESPLIT`` (with ``SPLIT_BF16``): R arrives as its bfloat16 terms, made once per call by
    ``_split_terms_kernel`` (n, T, 3 BLOCK_R) side by side, or (n, T, 4 BLOCK_R) interleaved with ``PACK``,
    zero past RANK: every a-tile's program loaded and split the same R rows in its loop before.
    ``UPCAST``: the interpreter has no bfloat16 dot, so the same products run in float32 there.
    """
    pid_s = tl.program_id(0)
    pid_a = tl.program_id(1)
    seg = pid_s // NSPLIT
    split = pid_s % NSPLIT
    t_start = split * ROWS_PER_SPLIT
    t_end = tl.minimum(SEG, t_start + ROWS_PER_SPLIT)
    ra = pid_a.to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)
    rj = tl.arange(0, BLOCK_R)
    mask_a = ra < A
    mask_j = rj < RANK
    rt = tl.arange(0, BLOCK_T)
    P_WIDTH: tl.constexpr = 4 * BLOCK_R if PACK else BLOCK_R  # P's accumulator: packed terms side by side
    acc = tl.zeros((BLOCK_A, P_WIDTH), dtype=tl.float32)
    if HAS_V:
        bm = tl.load(
            b_ptr + ra[:, None] * stride_ba + rj[None, :] * stride_bj,
            mask=mask_a[:, None] & mask_j[None, :],
            other=0.0,
        ).to(tl.float32)
        if SPLIT_BF16:
            b_hi, b_lo, b_lo2 = _split_bf16(bm)
            if PACK:  # V's operand as P's: Bm's three terms and a zero interleaved, one 64-wide operand
                b4 = _split_bf16_packed(bm)
    for t_group in range(t_start, t_end, BLOCK_T * PROMOTE):
        part = tl.zeros((BLOCK_A, P_WIDTH), dtype=tl.float32)
        for k in tl.static_range(PROMOTE):
            t0 = t_group + k * BLOCK_T
            mask_t = (t0 + rt) < t_end
            m = seg.to(tl.int64) * SEG + t0 + rt
            if SAMPLE_SEG:
                smp = seg.to(tl.int64)
                tok = (t0 + rt).to(tl.int64)
            else:
                smp = m // T
                tok = m % T
            lt = tl.load(
                l_ptr + (smp * stride_ln + tok * stride_lt)[:, None] + ra[None, :] * stride_la,
                mask=mask_t[:, None] & mask_a[None, :],
                other=0.0,
            )
            r_row = r_ptr + (smp * stride_rn + tok * stride_rt)[:, None]
            if PRESPLIT and PACK:  # the packed terms as made by _split_terms_kernel: no conversion here
                r4 = tl.load(r_row + tl.arange(0, 4 * BLOCK_R)[None, :] * stride_rj, mask=mask_t[:, None], other=0.0)
                part = _tc_dot(tl.trans(lt), r4, part, UPCAST)
            elif PRESPLIT:
                r_hi = tl.load(r_row + rj[None, :] * stride_rj, mask=mask_t[:, None], other=0.0)
                r_lo = tl.load(r_row + (BLOCK_R + rj)[None, :] * stride_rj, mask=mask_t[:, None], other=0.0)
                r_lo2 = tl.load(r_row + (2 * BLOCK_R + rj)[None, :] * stride_rj, mask=mask_t[:, None], other=0.0)
                part = _dot_split_into(tl.trans(lt), r_hi, r_lo, r_lo2, part, 3, UPCAST)
            else:
                rr = tl.load(r_row + rj[None, :] * stride_rj, mask=mask_t[:, None] & mask_j[None, :], other=0.0)
                rr = rr.to(tl.float32)
                if PACK:  # the three terms (and a zero) interleaved: one instruction group
                    part = _tc_dot(tl.trans(lt), _split_bf16_packed(rr), part, UPCAST)
                elif SPLIT_BF16:  # P on the tensor cores' accumulator for PROMOTE blocks, then promoted
                    r_hi, r_lo, r_lo2 = _split_bf16(rr)
                    part = _dot_split_into(tl.trans(lt), r_hi, r_lo, r_lo2, part, 3, UPCAST)
                else:
                    part = tl.dot(tl.trans(lt.to(tl.float32)), rr, part, input_precision=PREC)
            if HAS_V:
                if PACK:  # one instruction group for all three terms, added in float32 per row block
                    vp = _sum_packed(_tc_dot(lt, b4, tl.zeros((BLOCK_T, P_WIDTH), dtype=tl.float32), UPCAST))
                elif SPLIT_BF16:
                    vp = _dot_split(lt, b_hi, b_lo, b_lo2, V_TERMS, UPCAST)
                else:
                    vp = tl.dot(lt.to(tl.float32), bm, input_precision=V_PREC)
            if HAS_V:
                tl.store(
                    v_ptr + pid_a.to(tl.int64) * stride_vtile + m[:, None] * stride_vm + rj[None, :],
                    vp,
                    mask=mask_t[:, None] & mask_j[None, :],
                )
        acc += part
    if PACK:  # each term's sum kept apart until here: added in float32
        acc = _sum_packed(acc)
    acc = acc * scale
    tl.store(  # (64-bit offsets: n * out * r of a per-sample workspace can pass 2^31 elements)
        p_ptr + seg.to(tl.int64) * stride_pi + split.to(tl.int64) * stride_ps + ra[:, None] * stride_pa
        + rj[None, :] * stride_pj,
        acc.to(p_ptr.dtype.element_ty),
        mask=mask_a[:, None] & mask_j[None, :],
    )
    if HAS_NORM:
        # over the stored elements only: a padded rank column holds inf * 0 = NaN for a sample with an inf
        sq = tl.where(mask_a[:, None] & mask_j[None, :], acc * acc, 0.0)
        tl.store(nu_ptr + seg.to(tl.int64) * NUM_A_TILES + pid_a, tl.sum(tl.sum(sq, axis=1), axis=0))


@triton.jit
def _split_sum_kernel(
    pp_ptr, p_ptr, nu_ptr,
    stride_qi, stride_qs, stride_qa, stride_qj,
    stride_pi, stride_pa, stride_pj,
    A, RANK, NSPLIT, NUM_A_TILES,
    HAS_NORM: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """P[i] = sum_j Ppart[i, j] over a rows-split sample, and its squared-norm partial per a-tile."""
    seg = tl.program_id(0)
    pid_a = tl.program_id(1)
    ra = pid_a.to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)
    rj = tl.arange(0, BLOCK_R)
    mask = (ra < A)[:, None] & (rj < RANK)[None, :]
    offs = ra[:, None] * stride_qa + rj[None, :] * stride_qj
    acc = tl.zeros((BLOCK_A, BLOCK_R), dtype=tl.float32)
    q = pp_ptr + seg.to(tl.int64) * stride_qi + offs  # a running pointer: 64-bit, as in the one-pass kernel
    for _ in range(0, NSPLIT):
        acc += tl.load(q, mask=mask, other=0.0)
        q += stride_qs
    tl.store(p_ptr + seg.to(tl.int64) * stride_pi + ra[:, None] * stride_pa + rj[None, :] * stride_pj, acc, mask=mask)
    if HAS_NORM:
        tl.store(nu_ptr + seg.to(tl.int64) * NUM_A_TILES + pid_a, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


@triton.jit
def _clip_reduce_kernel(
    p_ptr, c_ptr, out_ptr,
    stride_pn, stride_pa, stride_pb, stride_c, stride_oa, stride_ob,
    N, A, B,
    ACC_FP64: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """out = sum_i c_i P_i over samples with c_i != 0 (a dropped sample's NaN never reaches the sum). One grid
    axis over (a, b) tiles, b fastest: CUDA caps the grid's y axis at 65535 (b > 4M columns at BLOCK_B = 64)."""
    num_b = tl.cdiv(B, BLOCK_B)
    pid_a = tl.program_id(0) // num_b
    pid_b = tl.program_id(0) % num_b
    ra = pid_a.to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)
    rb = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = (ra < A)[:, None] & (rb < B)[None, :]
    offs = ra[:, None] * stride_pa + rb[None, :] * stride_pb
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=acc_ty)
    pi = p_ptr + offs  # a running pointer over samples: 64-bit offsets past 2^31 elements
    for i in range(0, N):  # fixed order over samples: deterministic
        c = tl.load(c_ptr + i * stride_c).to(acc_ty)
        p = tl.load(pi, mask=mask, other=0.0).to(acc_ty)
        pi += stride_pn
        acc += tl.where(c != 0, c * p, 0.0)
    tl.store(out_ptr + ra[:, None] * stride_oa + rb[None, :] * stride_ob, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _merge_kernel(
    w_ptr, b_ptr, a_ptr, out_ptr, flags_ptr,
    stride_wo, stride_wi, stride_bo, stride_bj, stride_aj, stride_ai, stride_oo, stride_oi,
    OUT, IN, RANK, N_O, scale,
    LR_PREC: tl.constexpr, FIX_BF16_ROUNDING: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr, LOOP_I: tl.constexpr,
    BLOCK_RK: tl.constexpr, CHECK: tl.constexpr,
):  # fmt: skip
    """out = W + scale * B @ A (out, in): the base weight with the adapter merged in, rounded once to W's
    dtype (``FEDLORA_FAST_GEMM=merged``). The low-rank product is float32 (``LR_PREC`` as the GEMM
    epilogue's, or "ieee": exact float32 FMAs on the CUDA cores) from a zero accumulator; W is added to it
    once, in float32, and the sum rounded to W's dtype (W as each slice's accumulator took a rounding at W's
    scale per slice: float32 W drifted by a few ulps; on a GPU the compiler still folds the add into the
    accumulator of a single dot, up to r such roundings, far below bf16's). A program covers
    ``LOOP_I`` tiles along ``in`` (1: one tile); each tile's product runs in ``BLOCK_RK``-deep slices of the
    rank (``BLOCK_R``: one dot, B's tile loaded once per program; less: a loop over the slices, B's and A's
    pipelined, each slice's operands a fraction of the registers).

    ``CHECK`` (the merged-weight cache, ``FEDLORA_FAST_KEEP_MERGED=cache``): ``out`` already holds a W', and
    ``flags`` (``_changed_kernel``'s: N_O for the row blocks of B, then one per program column for A) say
    which of its row and column blocks changed since. A program merges its tiles only where its row block's
    or its column block's flag is set; otherwise it reads two flags and writes nothing."""
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    todo = True
    if CHECK:
        todo = (tl.load(flags_ptr + pid_o) + tl.load(flags_ptr + N_O + pid_i)) > 0
    if todo:  # (always without CHECK)
        _merge_tiles(w_ptr, b_ptr, a_ptr, out_ptr, pid_o, pid_i,
                     stride_wo, stride_wi, stride_bo, stride_bj, stride_aj, stride_ai, stride_oo, stride_oi,
                     OUT, IN, RANK, scale, LR_PREC, FIX_BF16_ROUNDING, BLOCK_O, BLOCK_I, BLOCK_R, LOOP_I,
                     BLOCK_RK)  # fmt: skip


@triton.jit
def _merge_tiles(
    w_ptr, b_ptr, a_ptr, out_ptr, pid_o, pid_i,
    stride_wo, stride_wi, stride_bo, stride_bj, stride_aj, stride_ai, stride_oo, stride_oi,
    OUT, IN, RANK, scale,
    LR_PREC: tl.constexpr, FIX_BF16_ROUNDING: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr, LOOP_I: tl.constexpr,
    BLOCK_RK: tl.constexpr,
):  # fmt: skip
    """``_merge_kernel``'s work for program (pid_o, pid_i)."""
    ro = pid_o.to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    rj = tl.arange(0, BLOCK_RK)
    mask_o = ro < OUT
    if BLOCK_RK == BLOCK_R:  # the whole rank in one dot: B's tile is the same for every step
        b = tl.load(b_ptr + ro[:, None] * stride_bo + rj[None, :] * stride_bj,
                    mask=mask_o[:, None] & (rj < RANK)[None, :], other=0.0).to(tl.float32)  # fmt: skip
        b = b * scale
    for step in range(LOOP_I):
        ri = (pid_i.to(tl.int64) * LOOP_I + step) * BLOCK_I + tl.arange(0, BLOCK_I)
        mask_i = ri < IN
        mask = mask_o[:, None] & mask_i[None, :]
        if BLOCK_RK == BLOCK_R:
            a = tl.load(a_ptr + rj[:, None] * stride_aj + ri[None, :] * stride_ai,
                        mask=(rj < RANK)[:, None] & mask_i[None, :], other=0.0).to(tl.float32)  # fmt: skip
            acc = tl.dot(b, a, input_precision=LR_PREC)
        else:
            acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
            for k in range(0, RANK, BLOCK_RK):
                rk = k + rj
                mask_k = rk < RANK
                bk = tl.load(b_ptr + ro[:, None] * stride_bo + rk[None, :] * stride_bj,
                             mask=mask_o[:, None] & mask_k[None, :], other=0.0).to(tl.float32)  # fmt: skip
                ak = tl.load(a_ptr + rk[:, None] * stride_aj + ri[None, :] * stride_ai,
                             mask=mask_k[:, None] & mask_i[None, :], other=0.0).to(tl.float32)  # fmt: skip
                acc = tl.dot(bk * scale, ak, acc, input_precision=LR_PREC)
        w = tl.load(w_ptr + ro[:, None] * stride_wo + ri[None, :] * stride_wi, mask=mask, other=0.0)
        acc += w.to(tl.float32)
        if FIX_BF16_ROUNDING:
            acc = _round_bf16_rne(acc)
        tl.store(out_ptr + ro[:, None] * stride_oo + ri[None, :] * stride_oi, acc.to(out_ptr.dtype.element_ty),
                 mask=mask)  # fmt: skip


@triton.jit
def _changed_kernel(
    b_bits_ptr, b_snap_ptr, a_bits_ptr, a_snap_ptr, flags_ptr,
    stride_bo, stride_bj, stride_aj, stride_ai, OUT, IN, RANK, N_O,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, LOOP_I: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Which blocks of a cached W' (``merged_cache``) a change of B or A makes stale, for ``_merge_kernel``'s
    CHECK: program p < N_O compares B's rows [p BLOCK_O, (p+1) BLOCK_O) with their snapshot (``b_snap``
    (OUT, RANK), contiguous), program N_O + q A's columns [q BLOCK_I LOOP_I, ...) (``a_snap`` (RANK, IN)),
    each writes 1 or 0 to ``flags[p]`` and its rows or columns' current bits into the snapshot. Each program
    owns what it reads and writes: no races. Bits (B and A viewed as the integer type of their element size),
    not values: -0.0 against 0.0, and any NaN, count as changed, so a tile merged again is the one a fresh
    merge writes."""
    p = tl.program_id(0)
    rr = tl.arange(0, BLOCK_R)
    mask_r = rr < RANK
    if p < N_O:
        ro = p.to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
        mask = (ro < OUT)[:, None] & mask_r[None, :]
        now = tl.load(b_bits_ptr + ro[:, None] * stride_bo + rr[None, :] * stride_bj, mask=mask, other=0)
        snap = b_snap_ptr + ro[:, None] * RANK + rr[None, :]
        changed = tl.max(tl.max((now != tl.load(snap, mask=mask, other=0)).to(tl.int32), axis=1), axis=0)
        tl.store(snap, now, mask=mask)
    else:
        changed = tl.zeros((), dtype=tl.int32)
        for step in range(LOOP_I):
            ri = ((p - N_O).to(tl.int64) * LOOP_I + step) * BLOCK_I + tl.arange(0, BLOCK_I)
            mask = mask_r[:, None] & (ri < IN)[None, :]
            now = tl.load(a_bits_ptr + rr[:, None] * stride_aj + ri[None, :] * stride_ai, mask=mask, other=0)
            snap = a_snap_ptr + rr[:, None] * IN + ri[None, :]
            changed = tl.maximum(changed, tl.max(tl.max((now != tl.load(snap, mask=mask, other=0)).to(tl.int32),
                                                        axis=1), axis=0))  # fmt: skip
            tl.store(snap, now, mask=mask)
    tl.store(flags_ptr + p, changed)


@triton.jit
def _split_terms_kernel(
    w_ptr, t_ptr, stride_wk, stride_wn, stride_tk, K, N,
    PACKED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Wt (K, N) float32 as its three bfloat16 ``_split_bf16`` terms, zero past N, for ``PRESPLIT_W``:
    side by side ``[hi | lo | lo2]`` (K, 3 BLOCK_N), or interleaved as ``_split_bf16_packed`` (K, 4 BLOCK_N)."""
    rk = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tl.arange(0, BLOCK_N)
    mask_k = rk < K
    w = tl.load(w_ptr + rk[:, None] * stride_wk + rn[None, :] * stride_wn,
                mask=mask_k[:, None] & (rn < N)[None, :], other=0.0).to(tl.float32)  # fmt: skip
    if PACKED:
        rc = tl.arange(0, 4 * BLOCK_N)
        tl.store(t_ptr + rk[:, None] * stride_tk + rc[None, :], _split_bf16_packed(w), mask=mask_k[:, None])
    else:
        hi, lo, lo2 = _split_bf16(w)
        t = t_ptr + rk[:, None] * stride_tk + rn[None, :]
        tl.store(t, hi, mask=mask_k[:, None])
        tl.store(t + BLOCK_N, lo, mask=mask_k[:, None])
        tl.store(t + 2 * BLOCK_N, lo2, mask=mask_k[:, None])


def _gemm_configs() -> list:
    """Autotune space of the base GEMM on CUDA (Triton matmul tutorial sizes for Hopper/Ampere)."""
    cfgs = []
    for bm, bn, bk, stages, warps in [
        (128, 256, 64, 3, 8),
        (128, 256, 64, 4, 8),
        (256, 128, 64, 3, 8),
        (256, 128, 64, 4, 8),
        (128, 128, 128, 3, 8),
        (128, 128, 64, 4, 8),
        (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
    ]:
        cfgs.append(
            triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages, num_warps=warps
            )
        )
    return cfgs


# Autotuned variant for the base GEMM on CUDA (never under the interpreter, and never with HAS_C: the
# tuner reruns the kernel, which would add the low-rank term several times into an in-place output).
_gemm_lowrank_tuned = triton.autotune(
    configs=_gemm_configs(), key=["M", "N", "K", "HAS_BIAS", "HAS_LOWRANK", "MAIN_FP32"]
)(triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_gemm_lowrank_kernel))


# ---------------------------------------------------------------------------------------------------------
# block sizes and launch helpers
# ---------------------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    """Host-side ceiling division (``triton.cdiv`` is a constexpr function: ~4 us per host call)."""
    return -(-a // b)


def _next_pow2(v: int) -> int:
    return 1 if v <= 1 else 1 << (int(v) - 1).bit_length()


def _pow2(v: int, lo: int = 16) -> int:
    return max(lo, _next_pow2(int(v)))


@functools.lru_cache(maxsize=None)
def _sms_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the current one for a bare ``cuda``)."""
    return _sms_of(device.index if device.index is not None else torch.cuda.current_device())


def _target_programs(device: torch.device) -> int:
    """Programs wanted in flight for the one-pass backward: 2 per SM on CUDA, a few under the interpreter
    (small, so that the tests' tiny shapes also take the rows-split path)."""
    if device.type == "cuda":
        return 2 * _num_sms(device)
    return 4


def _interp_block(dim: int) -> int:
    """Interpreter block for a dim: 32 for test-sized dims (so they have masked tails and several tiles),
    128 for model-sized dims (the interpreter's cost is per op, so fewer, bigger programs run faster)."""
    return 32 if dim <= 256 else 128


_CUDA_BLOCKS = {
    "gemm": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    # U = xa A^T: N = r, memory bound on xa. The sweep on an H100 (2026-11-26, bench/gpu_layer.py --sweep-u,
    # 16k tokens): 64-row tiles 67/146 us at in = 4096/11008 against 104/265 us for the 32-row tiles shipped
    # before (1.55-1.81x), within 10 % of cuBLAS for A rounded to one bf16 term (61/141 us) and as fast as
    # cuBLAS on A's three terms, with float32-class error (4.3e-7). PACK_W (A's split terms as one 64-wide operand) was as fast but 1.3e-5 off; PRESPLIT_W
    # (the terms made once per call by a small kernel) no faster at 64 rows (faster at 32): both stay opt-in
    "narrow": dict(BLOCK_M=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3, PACK_W=False, PRESPLIT_W=False),
    # one pass over G, P tile BLOCK_A x r float32 in registers. The H100 sweep (2026-11-26, 16k tokens, out =
    # 11008/4096, with V and without): 64 rows x 64 features, 3 stages, 706 us over the four passes against
    # 899 us for the 64 x 128, 2-stage tiles shipped before; error 2.7e-7. PACK (R's split terms as one
    # operand) with two warpgroups was 8 % faster (651 us) but 1.1e-6..3.7e-6 off (gpu_layer.ACCURACY_BOUND);
    # PRESPLIT (U's terms made once per call) slower over the four passes at every tile: both stay opt-in. With V above
    # r = 16: _CUDA_V_WIDE
    "outer": dict(BLOCK_T=64, BLOCK_A=64, num_warps=4, num_stages=3, PROMOTE=1, PACK=False, PRESPLIT=False),
    "finish": dict(BLOCK_A=256, num_warps=4),
    "clip": dict(BLOCK_A=64, BLOCK_B=64, num_warps=4),
    # W + s B A (FEDLORA_FAST_GEMM=merged): memory bound (W read once, W' written once), 64 x 128 tiles, the rank
    # in one TF32 dot: 71 / 73 us per call at r = 16 and 4096 x 11008 / 11008 x 4096 on an H100 (W's bytes ~60 us;
    # 2026-11-26 night sweep, bench/results/gpu_session_NVIDIA_H100_80GB_HBM3_20261126_night). No other config was
    # clearly faster at r = 16 (the best, 32 x 256, 69 / 72 us: noise); LOOP_I and LR_PREC "ieee" (float32 FMAs)
    # were slower (76-114 us). Above r = 16: _CUDA_MERGE_WIDE
    "merge": dict(BLOCK_O=64, BLOCK_I=128, num_warps=4),
    # a float32 operand's bf16 split terms (PRESPLIT_W / PRESPLIT): a few KiB, one pass
    "split": dict(BLOCK_K=128, num_warps=4),
}
# float32 models: the exact ("ieee") dots run on the CUDA cores with their operands in registers, and the
# tiles above spilled (AOT sm90, 2026-11-26: the pass over G 800 B of stack at r = 16, 8632 B at r = 64 with
# V; the in-place low-rank epilogue 4800 / 11152 B). These keep r = 16 free of spills and r = 64 near it:
# the pass over G 0 / 8 B, U 0 / 0 B, the epilogue 0 / 3984 B. The main float32 GEMM is autotuned.
_CUDA_FP32_BLOCKS = {
    "outer": dict(BLOCK_T=16, BLOCK_A=64, num_stages=2),
    "narrow": dict(BLOCK_K=32),
    "gemm": dict(BLOCK_M=64, BLOCK_N=64, num_warps=8),
    # W + s B A: the bf16 tile spilled 4.8 / 11.6 KB per thread at r = 16 / 64 (the FMA dot holds its operands
    # in registers); 8 warps and the rank in 16-deep slices: 250 / 112 registers, no spills (AOT sm90)
    "merge": dict(num_warps=8, BLOCK_RK=16),
}
# The pass over G with V at r > 16 keeps the 128-wide tile shipped before (the sweep measured r = 16 only):
# V's per-tile partials are (out / BLOCK_A) x rows x r float32, written and read back, 4 r / BLOCK_A times
# G's own bytes (bf16): at r = 64 a 64-wide tile would move 4x G's bytes in partials, and hold 720 MB of
# them at 16k tokens and out = 11008; 128 wide halves both
_CUDA_V_WIDE = dict(BLOCK_A=128, num_stages=2)
_V_WIDE_R = 16
# U's 64-row tile was swept at r = 16; at 32 < r <= 64 it keeps the 32-row tile measured before: at r = 64
# the 64-row one needs 160 KiB of shared memory on sm90 (163 KiB on sm80) and spills 1392 B on sm86 (AOT,
# 2026-11-26), 32 rows 80 KiB and none. Above r = 64 U is no "narrow" launch: the autotuned GEMM takes it
_NARROW_WIDE_R = 32
# ... except on sm90 and sm100, where the H100 sweep at r = 64 (2026-11-26, 16k tokens, bench/results/
# gpu_session_NVIDIA_H100_80GB_HBM3_20261126_eve) timed 128-row tiles with 8 warps at 77 / 191 us for in =
# 4096 / 11008 against the 32-row tiles' 133 / 333 us (cuBLAS on A's three bf16 terms: 73 / 165 us), at the
# same error (3.1e-7 / 5.3e-7). They need 208 KiB of shared memory (AOT sm90): sm90 and sm100 only
_CUDA_NARROW_WIDE_SM90 = dict(BLOCK_M=128, num_warps=8)
# The pass over G without V (the merged and cuBLAS dX paths) at 16 < r <= 64, bf16, from the same sweep: 64 x 128
# tiles with 8 warps, 3 stages, 115 / 292 us at out = 4096 / 11008 against 150 / 413 us for r = 16's 64 x 64
# tile with 4 warps (2.0e-7 / 3.1e-7 error). With V the 128-wide tile above stayed the best (254 / 615 us)
_CUDA_OUTER_WIDE_NO_V = dict(BLOCK_A=128, num_warps=8)
# The merged weight at 16 < r <= 64, bf16, from the same night's sweep at r = 64 (W of 4096 x 11008 and 11008 x
# 4096 only): 128 x 64 tiles with 4 warps, 108 / 110 us per call against the r = 16 tile's 160 / 163 us, at the
# same error (0.69 / 0.72 of half a bf16 ulp); the FMA ("ieee") variants no faster (159-206 us)
_CUDA_MERGE_WIDE = dict(BLOCK_O=128, BLOCK_I=64, num_warps=4)
# the r = 64 sweeps' tiles by kind, for 16 < r <= _WIDE_MAX_R in bf16 (the pass over G: without V only)
_CUDA_BF16_WIDE = {"outer": _CUDA_OUTER_WIDE_NO_V, "merge": _CUDA_MERGE_WIDE}
_WIDE_MAX_R = 64  # above this, the rules above were not measured: the r = 16 configs


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of CUDA ``device`` (cached: ``_blocks`` runs at every launch)."""
    return torch.cuda.get_device_capability(device)


# (op, device index, r, dtype) -> the most software-pipeline stages that op's launches may use on this
# device: set where a launch as configured ran out of shared memory (GPUs with less per block than sm90:
# sm80 163 KiB, sm86/sm89 99 KiB, sm75 64 KiB). Before this, such a launch ran the reference; fewer stages
# fit there at every rank the AOT checks (sm86: the pass over G at r = 128 fits with 2 stages). The cap is
# per op, so it also slows that op's launches that did fit (a with-V backward's cap applies to FFA's too)
_STAGE_CAP: dict[tuple, int] = {}
# .stage_cap: the cap for the op running on this thread (None: as configured); .refused_stages: the stages of
# its launch that ran out of shared memory
_LAUNCH = threading.local()


def _blocks(kind: str, device: torch.device, dtype: torch.dtype | None = None, **dims: int) -> dict:
    """Block sizes and warps for every launch (a fresh dict); one place to tune (no autotune under the
    interpreter).

    ``dims`` are the sizes the blocks tile (M/N/K, T/A, A/B, O/I), for the pass over G and the merge ``RANK``
    (r), and for the pass over G ``V_RANK`` (r where it computes V, else 0); ``dtype`` the model's (float32
    takes smaller CUDA tiles).
    CUDA sizes: swept on an H100 for bf16 at r = 16 and r = 64 (bench/gpu_layer.py; the r = 64 tiles are
    bf16's only), AOT-checked for spills and shared memory elsewhere. An op whose launch ran out of shared
    memory on this device runs with fewer pipeline stages (``_STAGE_CAP``).
    """
    cap = getattr(_LAUNCH, "stage_cap", None)
    if device.type == "cuda":
        cfg = dict(_CUDA_BLOCKS[kind])
        if dtype == torch.float32:
            cfg.update(_CUDA_FP32_BLOCKS.get(kind, {}))
        if kind == "narrow" and dims.get("N", 0) > _NARROW_WIDE_R:
            # as measured: bf16 on an H100; sm90/sm100 have 227 KiB per block, sm12x (consumer Blackwell) 99
            sm90 = dtype == torch.bfloat16 and _capability(device)[0] in (9, 10)
            cfg.update(_CUDA_NARROW_WIDE_SM90 if sm90 else dict(BLOCK_M=32))
        if kind == "outer" and dims.get("V_RANK", 0) > _V_WIDE_R and dtype != torch.float32:
            cfg.update(_CUDA_V_WIDE)
        elif kind in _CUDA_BF16_WIDE and _V_WIDE_R < dims.get("RANK", 0) <= _WIDE_MAX_R and dtype == torch.bfloat16:
            cfg.update(_CUDA_BF16_WIDE[kind])
        if cap is not None:
            cfg["num_stages"] = min(cfg.get("num_stages", 3), cap)  # Triton's default is 3
        return cfg
    cfg = _interp_blocks(kind, {k: _interp_block(v) for k, v in dims.items() if k not in ("V_RANK", "RANK")})
    if cap is not None:  # the interpreter ignores it: what the tests of the cap see
        cfg["num_stages"] = cap
    return cfg


def _interp_blocks(kind: str, b: dict) -> dict:
    """The interpreter's blocks of ``kind`` from each tiled dim's block ``b``."""
    if kind == "gemm":
        return dict(BLOCK_M=b["M"], BLOCK_N=b["N"], BLOCK_K=b["K"], GROUP_M=4)
    if kind == "narrow":
        return dict(BLOCK_M=b["M"], BLOCK_K=b["K"], GROUP_M=1, PACK_W=False, PRESPLIT_W=False)
    if kind == "outer":
        return dict(BLOCK_T=b["T"] // 2, BLOCK_A=b["A"], PROMOTE=1, PACK=False, PRESPLIT=False)
    if kind == "finish":
        return dict(BLOCK_A=b["A"])
    if kind == "merge":
        return dict(BLOCK_O=b["O"], BLOCK_I=b["I"])
    if kind == "split":
        return dict(BLOCK_K=b["K"])
    return dict(BLOCK_A=b["A"], BLOCK_B=b["B"])  # clip


def _prec(dtype: torch.dtype, rounded: bool = False) -> str:
    """tl.dot input precision of the float32 adapter maths.

    fp32 inputs: exact fp32 ("ieee", as PyTorch's default matmul without TF32). fp16 inputs (and the dots
    that take float32 operands on both sides): U and the per-sample P and norms use float32-accurate 3xTF32
    (plain TF32 would lose ~3 digits in the norms); terms that are ``rounded`` to bf16/fp16 right away
    (s U B^T in Y, V for s V A in dX) use one TF32 dot: its 2^-11 relative error is below the output's own
    rounding, at a third of the tensor-core time. bf16 inputs take the split-bf16 path of the one-pass
    kernel and of U instead (the kernels' ``SPLIT_BF16`` / ``SPLIT_W``), where this precision is unused.
    """
    if dtype == torch.float32:
        return "ieee"
    return "tf32" if rounded else "tf32x3"


def _launch_gemm(
    x: Tensor | None,
    wt: tuple[Tensor, int, int] | None,
    bias: Tensor | None,
    lowrank: tuple[Tensor, Tensor, int, int] | None,
    out: Tensor,
    scale: float,
    *,
    accumulate: bool = False,
    main_fp32: bool = False,
    prec_dtype: torch.dtype,
    tma: bool = False,
) -> None:
    """out (n,T,N) (+)= x (n,T,K) @ Wt (K,N) + bias + scale * L (n,T,r) @ R (r,N).

    ``wt`` is (tensor, stride_k, stride_n) so W^T and W are read in place; ``lowrank`` is
    (L, R, stride_rj, stride_rn). ``tma``: take the TMA kernel where its rules hold.
    """
    n, T, N = out.shape
    M = n * T
    device = out.device
    dummy = out
    K = x.shape[2] if x is not None else 0
    w, swk, swn = wt if wt is not None else (dummy, 0, 0)
    L, R, srj, srn = lowrank if lowrank is not None else (dummy, dummy, 0, 0)
    rank = L.shape[2] if lowrank is not None else 1
    flags = _gemm_flags(
        x.dtype if x is not None else None, out.dtype, prec_dtype, main_fp32, accumulate, bias is not None,
        lowrank is not None, _pow2(rank),
        prec_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32,  # (read only where it counts: ~1 us)
    )  # fmt: skip
    args = (
        x if x is not None else dummy, w, bias if bias is not None else dummy, L, R, out,
        *(x.stride() if x is not None else (0, 0, 0)), swk, swn,
        *(L.stride() if lowrank is not None else (0, 0, 0)), srj, srn, *out.stride(),
        M, N, K, T, rank, float(scale),
    )  # fmt: skip
    grid = lambda meta: (_cdiv(M, meta["BLOCK_M"]) * _cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    if tma and x is not None and not accumulate and not main_fp32 and N > 64:
        if _launch_gemm_tma(x, wt, bias, lowrank, out, scale, flags["LR_PREC"], flags["FIX_BF16_ROUNDING"]):
            return
    with _device_guard(device):
        if _autotune(device) and x is not None and not accumulate and N > 64:
            key = (device.index, _tokens_bucket(M), N, K, w.dtype, R.dtype, L.dtype, id(flags))
            _launch_tuned(key, grid, args, flags, K)
            return
        cfg = _blocks("gemm" if N > 64 else "narrow", device, prec_dtype, M=M, N=N, K=max(K, 1))
        if N <= 64:  # narrow outputs (U = xa A^T): one column tile of width next_pow2(N)
            cfg["BLOCK_N"] = _pow2(N)
            if cfg.pop("PACK_W", False) and flags["SPLIT_W"] and cfg["BLOCK_N"] == 16:
                flags = dict(flags, PACK_W=True)
            if cfg.pop("PRESPLIT_W", False) and flags["SPLIT_W"]:  # Wt's terms once, not in every program
                flags = dict(flags, PRESPLIT_W=True)
                terms = _split_terms(w, swk, swn, K, N, cfg["BLOCK_N"], flags["PACK_W"])
                args = (*args[:1], terms, *args[2:9], terms.stride(0), terms.stride(1), *args[11:])
            asked = cfg.pop("SPLIT_K", None)  # a sweep's config may set it; else _split_k's rule
            if asked not in (None, 1, 2):
                raise ValueError(f"SPLIT_K: expected 1 or 2 (a third addend would make U's sum order-dependent), "
                                 f"got {asked!r}")
            # U only (main_fp32: U = xa A^T, float32, nothing else in the output): the rule was measured for it
            if main_fp32 and x is not None and not (accumulate or bias is not None or lowrank is not None) \
                    and out.dtype == torch.float32:
                programs = _cdiv(M, cfg["BLOCK_M"])
                if _split_k(device, programs, K, cfg["BLOCK_K"], asked) == 2:  # halves, added atomically into zeros
                    flags = dict(flags, SPLIT_K=2)
                    out.zero_()
                    grid = (programs, 2)
        if x is None:
            cfg["BLOCK_K"] = 16
        cfg["EVEN_K"] = K % cfg["BLOCK_K"] == 0
        _run(_gemm_lowrank_kernel, grid, *args, **flags, **cfg)


_INTERP_SMS = 2  # the interpreter's stand-in for a GPU's SM count in _split_k: one-program launches split


def _split_k(device: torch.device, programs: int, K: int, block_k: int, asked: int | None = None) -> int:
    """2 where a narrow float32 GEMM (U = xa A^T) has at most half as many programs as the GPU has SMs and K
    more than one block, else 1. U's programs are bound by their own issue rate (A split into bfloat16
    terms in every K step; on an H100 a lone program per SM streamed X at the same ~17-19 GB/s as two
    did, 2026-11-26): with 64 programs on 132 SMs (4k tokens, 64-row tiles) half the GPU idles, and two
    halves of K per row tile use all of it. Where 2 * programs > SMs some SM runs two halves, as slow as
    one whole program: no gain. Never more than 2 halves: the float32 atomic sum of two partials into
    zero is exact-order-free (``_gemm_lowrank_kernel``), of three it is not, and U must not change from
    run to run. ``asked``: a config's own SPLIT_K, taken instead of the rule (but K of one block never splits)."""
    if K <= block_k:
        return 1
    if asked is not None:
        return asked
    sms = _num_sms(device) if device.type == "cuda" else _INTERP_SMS
    return 2 if 2 * programs <= sms else 1


def _split_terms(w: Tensor, swk: int, swn: int, K: int, N: int, block_n: int, packed: bool) -> Tensor:
    """Wt (K, N) float32, read through (swk, swn), as the bfloat16 terms ``PRESPLIT_W`` loads (see
    ``_split_terms_kernel``): (K, 4 block_n) packed, else (K, 3 block_n). A few KiB per call (r x in)."""
    terms = _alloc((K, (4 if packed else 3) * block_n), torch.bfloat16, w.device)
    cfg = _blocks("split", w.device, K=K)
    with _device_guard(w.device):
        _run(_split_terms_kernel, (_cdiv(K, cfg["BLOCK_K"]),), w, terms, swk, swn, terms.stride(0), K, N,
             PACKED=packed, BLOCK_N=block_n, **cfg)  # fmt: skip
    return terms


@functools.lru_cache(maxsize=None)
def _gemm_flags(
    x_dtype, out_dtype, prec_dtype, main_fp32: bool, accumulate: bool, has_bias: bool, has_lowrank: bool,
    block_r: int, allow_tf32: bool,
) -> dict:
    """The constexpr flags of one ``_gemm_lowrank_kernel`` launch (cached: one dict per combination, never
    mutated; its ``id`` keys the tuned-config cache)."""
    prec = _prec(prec_dtype)
    # U = xa A^T with bfloat16 xa: A split into bfloat16 terms instead of upcasting the xa tile
    split_w = main_fp32 and x_dtype == torch.bfloat16
    base_prec = "ieee" if prec_dtype == torch.float32 and not allow_tf32 else "tf32"  # what cuBLAS does
    return dict(
        HAS_MAIN=x_dtype is not None,
        HAS_C=accumulate,
        HAS_BIAS=has_bias,
        HAS_LOWRANK=has_lowrank,
        SPLIT_W=split_w,
        MAIN_FP32=(main_fp32 and not split_w) or _interpret(),
        MAIN_PREC=prec if main_fp32 else base_prec,
        LR_PREC=_prec(prec_dtype, rounded=out_dtype != torch.float32),
        FIX_BF16_ROUNDING=_interpret() and out_dtype == torch.bfloat16,
        BLOCK_R=block_r,
        PACK_W=False,
        PRESPLIT_W=False,
        SPLIT_K=1,
    )


def _tma_2d(t: Tensor, rows: int, cols: int) -> tuple[int, int] | None:
    """(row stride, 1) when ``t`` addresses as a row-major (rows, cols) matrix a TMA descriptor can take
    (16-byte aligned base and row stride, unit column stride), else None."""
    if t.dim() == 3:  # (n, T, cols): rows n*T must be evenly spaced
        n, T, _ = t.shape
        if t.stride(2) != 1 or (n > 1 and t.stride(0) != T * t.stride(1)):
            return None
        row = t.stride(1)
    else:
        if t.stride(1) != 1:
            return None
        row = t.stride(0)
    e = t.element_size()
    if t.data_ptr() % 16 or (row * e) % 16 or (rows > 1 and row < cols):
        return None
    return row, 1


def _tma_configs() -> list:
    """Autotune space of the TMA GEMM on CUDA (the persistent-matmul tutorial's Hopper sizes)."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=st, num_warps=w,
                      pre_hook=_tma_block_shapes)
        for bm, bn, bk, st, w in [(128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (256, 128, 64, 3, 8),
                                  (128, 128, 64, 4, 8), (128, 128, 64, 4, 4), (128, 128, 128, 3, 8)]
    ]  # fmt: skip


def _tma_block_shapes(nargs: dict) -> None:
    """Point the descriptors at the launch's block sizes (autotune pre-hook; also called before direct launches)."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bk, bn] if nargs["W_KN"] else [bn, bk]


_gemm_tma_tuned = triton.autotune(configs=_tma_configs(), key=["M", "N", "K", "W_KN", "HAS_BIAS", "HAS_LOWRANK"])(
    _gemm_tma_kernel
)


def _launch_gemm_tma(x, wt, bias, lowrank, out, scale, lr_prec: str, fix_rounding: bool) -> bool:
    """``out = x Wt + bias + scale L R`` with the persistent TMA kernel; False (nothing launched) when the
    operands break the descriptors' rules (then the caller takes the pointer-based GEMM)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    n, T, N = out.shape
    M, K = n * T, x.shape[2]
    w, swk, swn = wt
    if x.dtype not in (torch.bfloat16, torch.float16) or w.dtype != x.dtype or out.dtype != x.dtype:
        return False
    if out.device.type == "cuda" and torch.cuda.get_device_capability(out.device)[0] < 9:
        return False  # TMA is Hopper's (sm90+)
    xs, os_ = _tma_2d(x, M, K), _tma_2d(out, M, N)
    w_kn = swn == 1  # Wt (K, N) is row-major in memory (dX: W itself); else W (N, K) is (Y: W^T)
    ws = _tma_2d(w, K, N) if w_kn else _tma_2d(w, N, K) if swk == 1 else None
    L, R, srj, srn = lowrank if lowrank is not None else (out, out, 0, 0)
    if lowrank is not None and (L.dim() != 3 or (n > 1 and L.stride(0) != T * L.stride(1))):
        return False
    if None in (xs, os_, ws):
        return False
    device = out.device
    x_desc = TensorDescriptor(x, [M, K], list(xs), [16, 16])  # block shapes: set per config
    w_desc = TensorDescriptor(w, [K, N] if w_kn else [N, K], list(ws), [16, 16])
    args = (
        x_desc, w_desc, out, bias if bias is not None else out, L, R, os_[0], 1,
        L.stride(1) if lowrank is not None else 0, L.stride(2) if lowrank is not None else 0, srj, srn,
        M, N, K, L.shape[2] if lowrank is not None else 1, float(scale),
    )  # fmt: skip
    flags = dict(
        W_KN=w_kn, HAS_BIAS=bias is not None, HAS_LOWRANK=lowrank is not None, LR_PREC=lr_prec,
        FIX_BF16_ROUNDING=fix_rounding, UPCAST=_interpret(), BLOCK_R=_pow2(L.shape[2] if lowrank is not None else 1),
    )  # fmt: skip
    with _device_guard(device):
        if not _autotune(device):  # interpreter: fixed blocks, a few "SMs" so the persistent loop repeats
            cfg = _blocks("gemm", device, M=M, N=N, K=K)
            _tma_block_shapes({**cfg, **flags, "x_desc": x_desc, "w_desc": w_desc})
            tiles = _cdiv(M, cfg["BLOCK_M"]) * _cdiv(N, cfg["BLOCK_N"])
            _gemm_tma_kernel[(min(4, tiles),)](*args, **flags, **cfg, NUM_SMS=4)
            return True
        sms = _num_sms(device)
        grid = lambda meta: (min(sms, _cdiv(M, meta["BLOCK_M"]) * _cdiv(N, meta["BLOCK_N"])),)  # noqa: E731
        key = ("tma", device.index, _tokens_bucket(M), N, K, *flags.items(), x.dtype)
        cfg = _tuned_config(_gemm_tma_tuned, key, grid, args, dict(flags, NUM_SMS=sms))
        if cfg is None:  # this call was the tuning run
            return True
        _tma_block_shapes({**cfg, **flags, "x_desc": x_desc, "w_desc": w_desc})
        _gemm_tma_kernel[grid](*args, **flags, **cfg, NUM_SMS=sms)
    return True


def _tokens_bucket(M: int) -> int:
    """The token count M as the tuning caches see it: the next power of two. DP training draws Poisson
    batches, so M = n * T changes almost every step; keyed on M itself, every new batch size would autotune
    the GEMM again (~10 configs timed) and re-time "auto". Within a factor of 2 of M the best tile choice is
    the same one in practice (the tile count changes, not the per-tile work)."""
    return _next_pow2(M)


def _autotune(device: torch.device) -> bool:
    """Whether the base GEMM is autotuned on this device (CUDA; tests fake it under the interpreter)."""
    return device.type == "cuda"


# (device, token bucket, sizes, flags, dtypes) -> the autotuner's choice as launch kwargs. After the first
# call for a key, the GEMM is launched straight with it: the autotuner's own per-call work (a dict of every argument, its
# key, the config merge) measured ~90 us per launch under cProfile on the H100 machine's CPU (v1 log).
_TUNED_CONFIGS: dict[tuple, dict] = {}


def _tuned_config(tuned, key: tuple, grid, args: tuple, kwargs: dict) -> dict | None:
    """The autotuner's launch kwargs cached for ``key``; on the first call for ``key``, runs ``tuned`` (which
    tunes and launches), caches its choice and returns None: the caller has nothing left to launch."""
    cfg = _TUNED_CONFIGS.get(key)
    if cfg is None:
        tuned[grid](*args, **kwargs)
        best = getattr(tuned, "best_config", None)  # set by the autotuner's run
        if best is not None and hasattr(best, "all_kwargs"):
            _TUNED_CONFIGS[key] = {k: v for k, v in best.all_kwargs().items() if k != "pre_hook"}
    return cfg


def _launch_tuned(key: tuple, grid, args: tuple, flags: dict, K: int) -> None:
    """Launch the base GEMM with the autotuned config for ``key`` (tuning it on the first call)."""
    cfg = _tuned_config(_gemm_lowrank_tuned, key, grid, args, flags)
    if cfg is None:
        return
    entry = _TUNED_LAUNCH.get(key)
    if entry is None or entry[0] is not flags or entry[1] is not cfg:  # (dict(**a, **b) refuses a shared name)
        entry = _TUNED_LAUNCH[key] = (flags, cfg, dict(**flags, **cfg, EVEN_K=K % cfg["BLOCK_K"] == 0))
    _run(_gemm_lowrank_kernel, grid, *args, **entry[2])


# key of _TUNED_CONFIGS -> (the flags dict, the autotuner's config, the launch's whole kwargs): merged once, not
# per call; used only while both are the very objects it was made from (a re-tune or new flags make it again)
_TUNED_LAUNCH: dict[tuple, tuple] = {}


# (op, device index, token bucket, sizes incl. the rank r, dtype, flags) -> the GEMM "auto" measured fastest in
# this process (r changes the adapter's share of the work: r = 64 and r = 8 layers of one size may differ)
_AUTO_CHOICE: dict[tuple, str] = {}


def _auto_times(device: torch.device) -> bool:
    """Whether "auto" times its candidates on this device (CUDA, outside graph capture; tests fake it)."""
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


# device index -> cycles of ``torch.cuda._sleep`` per millisecond (None: no such function here)
_SLEEP_CYCLES_PER_MS: dict[int, float | None] = {}
_SLEEP_CAP_MS = 50.0  # the longest head start _time_ms gives the host


def _sleep_cycles_per_ms(device: torch.device) -> float | None:
    """How many cycles of ``torch.cuda._sleep`` (a spin kernel) last one millisecond on ``device``: measured
    once per device with CUDA events; None where this torch has no ``_sleep``."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SLEEP_CYCLES_PER_MS:
        sleep = getattr(torch.cuda, "_sleep", None)
        rate = None
        if sleep is not None:
            cycles = 10_000_000
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            sleep(cycles // 10)  # the spin kernel's own first launch
            start.record()
            sleep(cycles)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
            rate = cycles / ms if ms > 0 else None
        _SLEEP_CYCLES_PER_MS[index] = rate
    return _SLEEP_CYCLES_PER_MS[index]


def _time_ms(fn: Callable[[], object], device: torch.device, reps: int = 3) -> float:
    """Milliseconds of device time per call of ``fn`` after one warm-up call (which compiles and autotunes).

    On CUDA the timed calls are queued behind a spin kernel (``torch.cuda._sleep``) that lasts longer than
    the host takes to issue them, so the events see the GPU run them back to back: the GPU time of each
    candidate, not the host's issue time. Without it a host-bound call (small layers: ~1.4 ms of host
    work against ~0.4 ms of GPU work per layer step at 4k tokens on an H100, 2026-11-26) is timed by its
    Python and launch overhead, and "auto" picks by that; but under a CUDA graph (``GraphedAccumulator``,
    the recommended way to run such layers) only the GPU time is left, and it is also what a GPU-bound
    step waits for."""
    fn()
    if device.type == "cuda":  # (on the current stream of the tensors' device: _kernels_or_reference's guard)
        rate = _sleep_cycles_per_ms(device)
        t0 = time.perf_counter()
        fn()  # one call's issue time (the GPU may still be running it: not waited for)
        issue_ms = (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if rate is not None:  # twice the time to issue every timed call, + 0.1 ms: the head start
            torch.cuda._sleep(int(rate * min(_SLEEP_CAP_MS, 2.0 * issue_ms * (reps + 1) + 0.1)))
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def _choose_gemm(
    key: tuple, device: torch.device, run: Callable[[str], object], merged_ok: bool = True,
    dtype: torch.dtype | None = None, credit: Callable[[], object] | None = None,
) -> str:  # fmt: skip
    """The GEMM for this call: ``FEDLORA_FAST_GEMM`` if pinned; for "auto" the fastest of ``AUTO_CANDIDATES``
    timed once per ``key`` on ``run(impl)`` (a pure function of the call's inputs: timing it has no effect
    but the time), or "triton" where nothing is timed. Where the call cannot merge (``merged_ok`` False:
    the adapter input or the input gradient is split from the base one) "merged" is out, and a pinned
    "merged" runs as "cublas". Nor is float16 (``dtype``) ever merged, pinned or not: W + s B A can leave
    fp16's range where Y and dX do not (then 0 * inf = NaN at every token), and in its subnormals the
    adapter's term is lost at an absolute threshold; a pinned "merged" runs as "triton" there (the one
    path that adds the term to x W^T in float32 before rounding). "auto" takes "triton" for float16 too,
    untimed: "cublas" rounds x W^T to fp16 before adding the adapter's term, and "cublas_acc" gave inf on
    an H100 (2026-11-26) where x W^T alone passes 65504 and the sum does not (cuBLAS's fp16 epilogue), so
    an output whose base part alone overflows would be inf on those paths only, and whether a sample's
    loss is inf (and DP drops it) must not depend on which GEMM timed faster.

    ``credit``: work the "merged" candidate saves elsewhere (the backward's merge, ``keep_merged``), timed
    alone (its fastest of ``AUTO_ROUNDS``) and taken off merged's time."""
    impl = gemm_impl()
    if impl != "auto":
        if impl == "merged" and dtype == torch.float16:
            return "triton"
        return "cublas" if impl == "merged" and not merged_ok else impl
    if dtype == torch.float16:
        return "triton"
    choice = _AUTO_CHOICE.get(key)
    if choice is not None:
        return choice
    if not _auto_times(device):
        return "triton"
    times: dict[str, float] = {}
    cands = [c for c in AUTO_CANDIDATES if merged_ok or c != "merged"]
    failed = set()
    for rnd in range(AUTO_ROUNDS):  # the order reversed every other round: a GPU's clock drifting under
        for c in cands if rnd % 2 == 0 else cands[::-1]:  # load falls on every candidate alike; the best kept
            if c in failed:
                continue
            try:
                t = _time_ms(lambda c=c: run(c), device)
            except OutOfResources:  # the op reruns with fewer stages (_kernels_or_reference), times again there
                raise
            except Exception as e:  # noqa: BLE001  (a candidate that cannot run here must not stop training)
                if _compile_failure(e):  # a kernel Triton cannot compile: the op's fallback, with its warning
                    raise
                failed.add(c)
                warnings.warn(f"fedlora_fast: {GEMM_ENV_VAR}=auto could not time the {c} GEMM ({e!r}); skipping it",
                              RuntimeWarning, stacklevel=3)  # fmt: skip
                continue
            times[c] = min(t, times.get(c, t))
    if credit is not None and "merged" in times:  # merged ran, so its merge runs: no failure to catch here
        times["merged"] -= min(_time_ms(credit, device) for _ in range(AUTO_ROUNDS))
    choice = _AUTO_CHOICE[key] = min(times, key=times.get) if times else "triton"
    return choice


LAUNCH_ENV_VAR = "FEDLORA_FAST_LAUNCH"  # "direct": see _launch; "jit": kernel[grid](...); unset: _LAUNCH_DEFAULT
LAUNCH_MODES = ("direct", "jit")
# The Triton releases whose JIT specialiser the direct launch's key was checked against (3.4-3.5's Python one,
# 3.6-3.9's C++ one: test_direct_launch_key_refines_tritons_specialisation) and whose launch call it mirrors (the
# JIT's ``kernel.run(grid, stream, function, metadata, hooks, *bound args)`` and ``CompiledKernel.__getitem__``:
# read in 3.3.1, 3.4.0, 3.5.1, 3.6.0 and 3.9.0, the same call). Direct launches are the default there: on an
# H100 (2026-11-27, Triton 3.6.0) they took the eager 4k-token layer step from 1.35 / 1.56 / 4.51x the floor to
# 1.16 / 1.32 / 4.11x and left the 16k-token one within noise (bench/NOTES.md). Other releases (3.3, and
# any later one, whose specialisation may be finer than the key) launch through the JIT unless
# FEDLORA_FAST_LAUNCH=direct asks for it.
_DIRECT_TRITON = ((3, 4), (3, 10))  # [first, past-the-last) (major, minor)


def launch_default(version: str | None = None) -> str:
    """The launch mode used where FEDLORA_FAST_LAUNCH is unset, for Triton ``version`` (default: the installed
    one): "direct" for the releases in ``_DIRECT_TRITON``, else "jit"."""
    v = backends._version(triton.__version__ if version is None else version)  # () where unreadable: the JIT
    return "direct" if _DIRECT_TRITON[0] <= v < _DIRECT_TRITON[1] else "jit"


_LAUNCH_DEFAULT = launch_default()


def launch_mode() -> str:
    """How kernels are launched now: FEDLORA_FAST_LAUNCH where set ("direct" or "jit"), else the default for
    the installed Triton (``launch_default``); the interpreter always goes through the JIT."""
    mode = os.environ.get(LAUNCH_ENV_VAR, "").strip().lower()  # empty: unset, as FEDLORA_FAST_GEMM reads it
    if not mode:
        return _LAUNCH_DEFAULT
    if mode not in LAUNCH_MODES:
        raise ValueError(f"{LAUNCH_ENV_VAR}={mode!r}: expected one of {', '.join(LAUNCH_MODES)} (or unset: "
                         f"{_LAUNCH_DEFAULT} with this Triton, {triton.__version__})")
    return mode


def _run(fn, grid, *args, **kw) -> None:
    """Launch ``fn`` (``_launch``). A launch refused for lack of shared memory leaves its stage count in
    ``_LAUNCH.refused_stages``: the op's rerun (``_kernels_or_reference``) caps the stages below it."""
    try:
        _launch(fn, grid, args, kw)
    except OutOfResources:
        _LAUNCH.refused_stages = kw.get("num_stages", 3)  # Triton's default where a config names none
        raise


def _launch(fn, grid, args: tuple, kw: dict) -> None:
    """``fn[grid](*args, **kw)``, or in the direct launch mode (CUDA; ``launch_mode``) the same compiled kernel
    launched through its own launcher, skipping the JIT's per-call argument binding, specialisation and
    cache key (tens of microseconds of host time per launch on the H100 machine's CPU; bench/launch.py
    measures both). The first launch per specialisation goes through the JIT, which compiles and returns the
    kernel; later ones reuse it when every argument specialises the same way (``_spec_key``). Kernels must
    take their non-constexpr parameters positionally and every constexpr by keyword (all of ours do). What
    else the JIT does per call is skipped after a specialisation's first launch: its compile-time knobs
    (TRITON_DEBUG, instrumentation hooks), its check of changed globals and its ``pre_run_hooks``; change them
    before the first launch, not between launches."""
    if launch_mode() != "direct" or _INTERPRET:  # the mode first: a bad value fails under the interpreter too
        fn[grid](*args, **kw)
        return
    key = (id(fn), torch.cuda.current_device(), _spec_key(args), tuple(kw.items()))
    entry = _DIRECT.get(key)
    if entry is None or entry[0] is not fn:  # (defensive: an entry holds its kernel, so its id stays taken)
        compiled = fn[grid](*args, **kw)  # compiles if needed, launches, returns the CompiledKernel
        params = getattr(fn, "params", None)
        if params is None:  # not a JITFunction (a stand-in): launched through fn[grid] every time
            return
        names = [p.name for p in params if p.is_constexpr]
        # the launcher takes every parameter in signature order: ours are the positional ones, then constexprs
        laid_out = len(args) + len(names) == len(params) and not any(p.is_constexpr for p in params[: len(args)])
        if compiled is not None and hasattr(compiled, "run") and laid_out and all(n in kw for n in names):
            if len(_DIRECT) >= _DIRECT_MAX:  # ints are keyed by value: bound the entries a run of many shapes makes
                _DIRECT.clear()
            _DIRECT[key] = (fn, compiled, [kw[n] for n in names])
        return
    _, compiled, constexprs = entry
    g = grid(kw) if callable(grid) else grid
    compiled[(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1)](*args, *constexprs)


# (id of the kernel, device, argument specialisation, constexprs and options) -> (the kernel, its CompiledKernel,
# constexpr values)
_DIRECT: dict[tuple, tuple] = {}
_DIRECT_MAX = 4096


def _spec_key(args: tuple) -> tuple:
    """The direct launch's cache key for the non-constexpr arguments: an int by its value, a tensor by dtype
    and 16-byte alignment, a float as "a float", a bool or None as itself. Triton's JIT specialises on no
    more than that (an int by ``== 1``, divisibility by 16 and its 32/64-bit range; a tensor by dtype and
    16-byte alignment; every non-constexpr float as fp32): two calls with equal keys get the same compiled
    kernel from it, so the direct launch may reuse it (``test_direct_launch_key_refines_tritons_specialisation``
    checks this against the installed Triton's own specialiser). Ints, most of the arguments, go in as they are:
    finer than Triton's classes (one cache entry per shape, not per class) and ~2x cheaper to key."""
    return tuple([a if type(a) is int else _spec_key_other(a) for a in args])


def _spec_key_other(a) -> object:
    if isinstance(a, Tensor):
        return (a.dtype, not a.data_ptr() & 15)
    if a is None:
        return None
    if isinstance(a, bool):
        return (bool, a)  # not equal to the int 1 or 0 in the key (True == 1 in Python)
    if isinstance(a, float):
        return float  # Triton passes every non-constexpr float as fp32, whatever its value
    if isinstance(a, int):
        return int(a)  # an int subclass (IntEnum): as its value, like a plain int
    raise TypeError(f"direct launch: unexpected argument type {type(a).__name__}")


_NO_GUARD = contextlib.nullcontext()  # stateless and reentrant: one instance serves every call


class _CudaGuard:
    """``torch.cuda.device(d)`` that also records ``d`` as this thread's innermost guarded device while it is
    held (``_LAUNCH.device``), restoring the previous one on exit."""

    __slots__ = ("device", "guard", "prev")

    def __init__(self, device: torch.device):
        self.device, self.guard = device, torch.cuda.device(device)

    def __enter__(self):
        self.guard.__enter__()
        self.prev, _LAUNCH.device = getattr(_LAUNCH, "device", None), self.device

    def __exit__(self, *exc):
        _LAUNCH.device = self.prev
        return self.guard.__exit__(*exc)


def _device_guard(device: torch.device):
    """``torch.cuda.device(d)`` for CUDA tensors (Triton launches on the current device), no-op otherwise,
    and a no-op where the innermost guard this thread holds is already ``device`` (``_kernels_or_reference``
    enters one per op: the launch helpers' own guards cost ~2-4 us of host time each, ~6 per layer step)."""
    if device.type != "cuda" or getattr(_LAUNCH, "device", None) == device:
        return _NO_GUARD
    return _CudaGuard(device)


def _per_sample_outer(
    L: Tensor,
    R: Tensor,
    scale: float,
    mode: int,
    p_layout: str,
    *,
    Bmat: Tensor | None = None,
    v_rounded: bool = False,
    prec_dtype: torch.dtype,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``P_i = scale * L_i^T R_i`` (per sample, or summed for MODE_SUM), norms, and optionally ``V = L Bmat``.

    Args:
        L: (n, T, a) the big operand (G or xa), any strides.  R: (n, T, r) float32 (U or V).
        p_layout: ``"ar"`` stores P as (…, a, r) (gradient of B), ``"ra"`` as (…, r, a) (gradient of A).
        Bmat: (a, r) B, to also return V = L Bmat (n, T, r) float32.
        v_rounded: V only feeds a term rounded to the input dtype (dX), so one TF32 dot is accurate enough.
    Returns:
        P: (a, r)/(r, a) for MODE_SUM, else (n, ·, ·); nu: (n,) squared norms (None for MODE_SUM);
        V or None.
    """
    n, T, a = L.shape
    r = R.shape[2]
    M = n * T
    device = L.device
    acc = R.dtype
    nseg, seg_rows = (1, M) if mode == MODE_SUM else (n, T)
    cfg = _blocks("outer", device, L.dtype, T=seg_rows, A=a, RANK=r, V_RANK=r if Bmat is not None else 0)
    block_a, block_t = cfg["BLOCK_A"], cfg["BLOCK_T"]
    block_r = _pow2(r)
    pack = bool(cfg.pop("PACK", False)) and L.dtype == torch.bfloat16 and block_r == 16
    presplit = bool(cfg.pop("PRESPLIT", False)) and L.dtype == torch.bfloat16
    if presplit:  # R's bf16 terms once (n T r elements), not once per a-tile program in its loop
        R2 = R.reshape(n * T, r)
        R = _split_terms(R2, R2.stride(0), R2.stride(1), n * T, r, block_r, pack).view(n, T, -1)
    a_tiles = _cdiv(a, block_a)
    # split a segment's rows over programs only when segments x a-tiles cannot fill the device
    nsplit = max(1, min(_cdiv(_target_programs(device), nseg * a_tiles), _cdiv(seg_rows, block_t)))
    rows_per_split = _cdiv(_cdiv(seg_rows, nsplit), block_t) * block_t
    nsplit = _cdiv(seg_rows, rows_per_split)  # no empty split

    def shaped(shape_ar):  # final P buffer in the requested layout
        shape = shape_ar if p_layout == "ar" else (*shape_ar[:-2], shape_ar[-1], shape_ar[-2])
        return _alloc(shape, acc, device)

    def ar_strides(t):  # strides of (…, a, r) indexing into t
        return (t.stride(-2), t.stride(-1)) if p_layout == "ar" else (t.stride(-1), t.stride(-2))

    p_shape = (a, r) if mode == MODE_SUM else (n, a, r)
    P = shaped(p_shape)
    per_sample = mode != MODE_SUM
    nu_part = None
    if nsplit == 1:
        dest, sd_i, sd_s = P, (P.stride(0) if per_sample else 0), 0
        nu_part = _alloc((nseg, a_tiles), torch.float32, device) if per_sample else None
    else:
        dest = _alloc((nseg, nsplit, a, r), torch.float32, device)
        sd_i, sd_s = dest.stride(0), dest.stride(1)
    sd_a, sd_j = ar_strides(P) if dest is P else (dest.stride(2), dest.stride(3))
    vpart = _alloc((a_tiles, M, r), torch.float32, device) if Bmat is not None else None
    dummy = R
    grid = (nseg * nsplit, a_tiles)
    # rows evenly spaced over samples (stride(0) == T stride(1) for L and R: contiguous rows, feature slices,
    # every k-th token, expanded): one sample of M rows, whose segment the kernel indexes without a division
    t_arg = M if nseg == 1 and L.stride(0) == T * L.stride(1) and R.stride(0) == T * R.stride(1) else T
    with _device_guard(device):
        _run(
            _outer_kernel, grid, L, R, Bmat if Bmat is not None else dummy, dest,
            nu_part if nu_part is not None else dummy, vpart if vpart is not None else dummy,
            *L.stride(), *R.stride(),
            *(Bmat.stride() if Bmat is not None else (0, 0)),
            sd_i, sd_s, sd_a, sd_j,
            *(vpart.stride()[:2] if vpart is not None else (0, 0)),
            seg_rows, t_arg, a, r, rows_per_split, nsplit, a_tiles, float(scale),
            HAS_V=Bmat is not None, HAS_NORM=nu_part is not None, PREC=_prec(prec_dtype),
            V_PREC=_prec(prec_dtype, rounded=v_rounded),
            SPLIT_BF16=L.dtype == torch.bfloat16, V_TERMS=2 if v_rounded else 3, UPCAST=_interpret(),
            BLOCK_R=block_r, PACK=pack, PRESPLIT=presplit, SAMPLE_SEG=seg_rows == t_arg, **cfg,
        )  # fmt: skip
        if nsplit > 1:
            fcfg = _blocks("finish", device, A=a)
            f_tiles = _cdiv(a, fcfg["BLOCK_A"])
            nu_part = _alloc((nseg, f_tiles), torch.float32, device) if per_sample else None
            pa, pj = ar_strides(P)
            _run(
                _split_sum_kernel, (nseg, f_tiles), dest, P, nu_part if nu_part is not None else dest,
                *dest.stride(), P.stride(0) if per_sample else 0, pa, pj,
                a, r, nsplit, f_tiles,
                HAS_NORM=nu_part is not None, BLOCK_R=_pow2(r), **fcfg,
            )  # fmt: skip
    nu = nu_part.sum(1).to(acc) if nu_part is not None else None  # fixed-order reduction of the partials
    v = None
    if vpart is not None:
        v = (vpart[0] if a_tiles == 1 else vpart.sum(0)).view(n, T, r)
    return P, nu, v


def _merge_launch(device: torch.device, dtype: torch.dtype, r: int, out: int, inp: int) -> dict:
    """The merge kernel's config for W (out, in) of ``dtype`` at rank r: ``_blocks("merge")`` with
    ``LOOP_I``, ``BLOCK_R``, ``BLOCK_RK`` (at most BLOCK_R) and ``LR_PREC`` (a config may ask for "ieee",
    CUDA-core FMAs, where W is rounded to bf16 anyway; float32 W always takes it) filled in."""
    cfg = _blocks("merge", device, dtype, O=out, I=inp, RANK=r)
    cfg.setdefault("LOOP_I", 1)
    cfg["BLOCK_R"] = block_r = _pow2(r)
    rk = cfg.get("BLOCK_RK", block_r)
    if not (isinstance(rk, int) and rk >= 16 and rk & (rk - 1) == 0):
        raise ValueError(f"merge config: BLOCK_RK must be a power of two >= 16 (a tl.dot depth), got {rk!r}")
    cfg["BLOCK_RK"] = min(rk, block_r)
    prec = cfg.pop("LR_PREC", None) or _prec(dtype, rounded=True)
    cfg["LR_PREC"] = "ieee" if dtype == torch.float32 else prec
    return cfg


def _merged_weight(weight: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """``W + scale * B A`` (out, in) in W's dtype, contiguous: the one weight of ``FEDLORA_FAST_GEMM=merged``
    (``Y = x W'^T + b`` and ``dX = G W'``). Made per call; ``keep_merged`` (opt-in) holds the forward's from
    the forward to its backward, ``merged_cache`` (opt-in) across steps as well (a W' per layer held for good
    adds the adapted layers' weight memory once more)."""
    out, inp = weight.shape
    wm = _alloc((out, inp), weight.dtype, weight.device)
    _launch_merge(weight, A, B, scale, wm)
    return wm


def _launch_merge(
    weight: Tensor, A: Tensor, B: Tensor, scale: float, wm: Tensor, snaps: tuple[Tensor, Tensor] | None = None
) -> None:  # fmt: skip
    """W + scale * B A into ``wm``; with ``snaps`` (B's and A's bits when ``wm`` was last merged, as
    ``_Cached`` holds them) only its tiles whose B rows or A columns changed since (``_changed_kernel``,
    which also brings the snapshots up to date: two launches, the first reading B, A and the snapshots once)."""
    out, inp = weight.shape
    r = A.shape[0]
    cfg = _merge_launch(weight.device, weight.dtype, r, out, inp)
    grid = (_cdiv(out, cfg["BLOCK_O"]), _cdiv(inp, cfg["BLOCK_I"] * cfg["LOOP_I"]))
    flags = wm  # (unread without CHECK)
    with _device_guard(weight.device):
        if snaps is not None:  # which row and column blocks changed; the snapshots brought up to date
            flags = torch.empty(grid[0] + grid[1], dtype=torch.int32, device=weight.device)
            b_bits, a_bits = B.view(snaps[0].dtype), A.view(snaps[1].dtype)
            _run(
                _changed_kernel, (grid[0] + grid[1],), b_bits, snaps[0], a_bits, snaps[1], flags,
                *b_bits.stride(), *a_bits.stride(), out, inp, r, grid[0],
                BLOCK_O=cfg["BLOCK_O"], BLOCK_I=cfg["BLOCK_I"], LOOP_I=cfg["LOOP_I"], BLOCK_R=cfg["BLOCK_R"],
            )  # fmt: skip
        _run(
            _merge_kernel, grid, weight, B, A, wm, flags, *weight.stride(), *B.stride(), *A.stride(), *wm.stride(),
            out, inp, r, grid[0], float(scale),
            FIX_BF16_ROUNDING=_interpret() and weight.dtype == torch.bfloat16, CHECK=snaps is not None, **cfg,
        )  # fmt: skip


def _clip_reduce(P: Tensor, coef: Tensor) -> Tensor:
    n, A, B = P.shape
    out = _alloc((A, B), P.dtype, P.device)
    cfg = _blocks("clip", P.device, A=A, B=B)
    if B <= 64:  # (n, out, r): whole rank in one tile
        cfg["BLOCK_B"] = _pow2(B, lo=1)
    grid = (_cdiv(A, cfg["BLOCK_A"]) * _cdiv(B, cfg["BLOCK_B"]),)
    with _device_guard(P.device):
        _run(
            _clip_reduce_kernel, grid, P, coef, out, *P.stride(), coef.stride(0), *out.stride(), n, A, B,
            ACC_FP64=P.dtype == torch.float64, **cfg,
        )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------
# the ops (same names, signatures and semantics as fedlora_fast.reference.ffa_linear)
# ---------------------------------------------------------------------------------------------------------


def _use_reference(*tensors: Tensor | None) -> bool:
    """Inputs the kernels leave to the reference: float64, empty tensors, devices Triton cannot run."""
    for t in tensors:  # (on the host's critical path, every op call: attribute reads only)
        if t is None:
            continue
        if t.dtype is torch.float64 or not t.numel() or not (t.is_cuda or (_INTERPRET and t.is_cpu)):
            return True
    return False


# The largest rank the kernels take. The pass over G keeps a (rows x r) float32 accumulator per program: at
# r = 128 it still compiles for sm90 (176-208 KiB of shared memory) but spills registers (368-704 B of stack,
# AOT, 2026-11-26); beyond, it would not fit shared memory and fail at the first launch. Larger ranks run
# the reference (torch ops, on the same device), with one warning.
MAX_RANK = 128
_RANK_WARNED: set[int] = set()


def _rank_too_large(r: int) -> bool:
    if r <= MAX_RANK:
        return False
    if r not in _RANK_WARNED:
        _RANK_WARNED.add(r)
        warnings.warn(f"fedlora_fast: rank r={r} is above the Triton kernels' {MAX_RANK}: this layer runs the PyTorch "
                      "reference instead (correct, slower)", RuntimeWarning, stacklevel=4)  # fmt: skip
    return True


# a launch Triton could not compile (its frontend, an MLIR pass or ptxas): a compiler bug for that argument
# specialisation, e.g. Triton 3.6-3.9's "Illegal shared layout" for U with the opt-in PACK_W operand in 64-row
# tiles where in_features is not a multiple of 16 (reproduced ahead of time, 2026-11-26). Calls that Triton
# specialises the same way run the reference from then on, with one warning per op, r and dtype, rather than
# stop training; the test suite makes the warning an error (pyproject.toml), so a kernel that does not compile
# still fails there.
COMPILE_FALLBACK_MESSAGE = "fedlora_fast: Triton could not compile"
_COMPILE_FAILED: set[tuple] = set()  # _call_shape keys
_COMPILE_WARNED: set[tuple] = set()  # (op, device index, r, dtype) warned about


def _compile_failure(err: BaseException) -> bool:
    """Whether ``err`` is Triton failing to compile a kernel (not a launch or input error)."""
    if type(err).__name__ in ("CompilationError", "CompileTimeAssertionFailure", "PTXASError"):
        return True
    return isinstance(err, RuntimeError) and "PassManager::run failed" in str(err)


def _call_shape(op: str, tensors: tuple, r: int) -> tuple:
    """What a compile failure depends on: the op, r, and each tensor's device, dtype, 16-byte alignment, and
    which sizes and strides are 1 or divisible by 16 (how Triton specialises a launch: a new batch size
    with the same specialisation does not try to compile again)."""
    spec = lambda v: (v == 1, v % 16 == 0)  # noqa: E731
    return (op, r, *((t.device, t.dtype, t.data_ptr() % 16 == 0, tuple(map(spec, t.shape)),
                      tuple(map(spec, t.stride()))) for t in tensors if t is not None))


# (op, device index, r, dtype) whose kernels a launch refused for lack of resources (shared memory): a GPU with
# less than sm90's 227 KiB per block (sm86/sm89: 99 KiB, sm75: 64 KiB) at a large rank (AOT, 2026-11-26: the
# pass over G at r = 128 on sm86, r = 32 in bf16 on sm75). Those calls run the reference, with one warning.
_OUT_OF_RESOURCES: set[tuple] = set()


def _too_big_here(op: str, t: Tensor, r: int) -> bool:
    return (op, t.device.index, r, t.dtype) in _OUT_OF_RESOURCES


def _out_of_resources(op: str, t: Tensor, r: int, err: Exception) -> None:
    _OUT_OF_RESOURCES.add((op, t.device.index, r, t.dtype))
    where = torch.cuda.get_device_name(t.device) if t.is_cuda else t.device.type
    warnings.warn(f"fedlora_fast: the Triton {op} kernels for r={r}, {t.dtype} do not fit this {where} ({err}); "
                  "these calls run the PyTorch reference instead (correct, slower)", RuntimeWarning, stacklevel=4)


def _kernels_or_reference(op: str, tensors: tuple, r: int, kernels: Callable, reference: Callable, args: tuple):
    """``kernels(*args)``, or ``reference(*args)`` where the kernels do not take the call: inputs they leave to
    the reference (``_use_reference``), a rank above ``MAX_RANK``, or a launch this device refused for lack of
    resources even with one pipeline stage (remembered per op, device, r and dtype, with one warning). A
    refused launch first reruns the op with fewer stages (one fewer than the refused launch had, down to 1;
    remembered in ``_STAGE_CAP``): the ops are pure, so a rerun after a partial one gives the same result. A
    launch Triton cannot compile runs the reference for that call shape (``_COMPILE_FAILED``, one warning).
    ``tensors[0]`` names the device."""
    lead = tensors[0]
    if _use_reference(*tensors) or _rank_too_large(r) or _too_big_here(op, lead, r):
        return reference(*args)
    if _COMPILE_FAILED and _call_shape(op, tensors, r) in _COMPILE_FAILED:
        return reference(*args)
    launch_mode()  # a bad FEDLORA_FAST_LAUNCH fails here, before auto's GEMM timing could take it for a GEMM failing
    key = (op, lead.device.index, r, lead.dtype)
    cap = _STAGE_CAP.get(key)
    while True:
        _LAUNCH.stage_cap, _LAUNCH.refused_stages = cap, None
        try:
            with _device_guard(lead.device):  # once for the op's launches (they skip their own: same device)
                return kernels(*args)
        except OutOfResources as e:
            # one below the refused launch's stages, never above the cap (an autotuned launch ignores it)
            refused = min(_LAUNCH.refused_stages or 3, cap or 3)
            if refused <= 1:
                _out_of_resources(op, lead, r, e)
                return reference(*args)
            cap = _STAGE_CAP[key] = refused - 1
        except Exception as e:
            if not _compile_failure(e):
                raise
            if key not in _COMPILE_WARNED:  # once per op, r and dtype (a test makes it an error: nothing recorded)
                warnings.warn(f"{COMPILE_FALLBACK_MESSAGE} the {op} kernels for r={r}, {lead.dtype}, shapes "
                              f"{[tuple(t.shape) for t in tensors if t is not None]} ({type(e).__name__}: "
                              f"{str(e)[:200]}); calls of such shapes run the PyTorch reference instead (correct, "
                              "slower). Please report it with your Triton version", RuntimeWarning, stacklevel=3)
                _COMPILE_WARNED.add(key)
            _COMPILE_FAILED.add(_call_shape(op, tensors, r))
            return reference(*args)
        finally:
            _LAUNCH.stage_cap = _LAUNCH.refused_stages = None


def ffa_linear_fwd(
    x: Tensor, xa: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """``Y = x W^T + b + s (xa A^T) B^T`` and ``U = xa A^T`` (see the reference for the contract).

    Args:
        x, xa: (n, T, in);  weight: (out, in);  bias: (out,) or None;  A: (r, in);  B: (out, r).
    Returns:
        y: (n, T, out) in x's dtype; u: (n, T, r) float32.
    """
    return _kernels_or_reference("forward", (x, xa, weight, bias, A, B), A.shape[0], _fwd, _ref.ffa_linear_fwd,
                                 (x, xa, weight, bias, A, B, scale))


def _fwd(
    x: Tensor, xa: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    out, inp = weight.shape
    r = A.shape[0]
    check_shape("x", x, (None, None, inp))
    check_shape("xa", xa, tuple(x.shape))
    check_dtype("weight", weight, x.dtype)
    if bias is not None:
        check_dtype("bias", bias, x.dtype)
        check_shape("bias", bias, (out,))
        bias = bias.contiguous()  # the GEMM epilogues read it at unit stride
    if tuple(A.shape) != (r, inp) or tuple(B.shape) != (out, r):
        raise ValueError(f"A, B: expected ({r}, {inp}) and ({out}, {r}), got {tuple(A.shape)} and {tuple(B.shape)}")
    n, T, _ = x.shape
    u = _alloc((n, T, r), torch.float32, x.device)
    # U = xa A^T, float32 (read A^T through A's strides)
    _launch_gemm(xa, (A, A.stride(1), A.stride(0)), None, None, u, 1.0, main_fp32=True, prec_dtype=x.dtype)
    lowrank = (u, B, B.stride(1), B.stride(0))  # R = B^T (r, out)

    merged_ok = xa is x or (xa.data_ptr() == x.data_ptr() and xa.shape == x.shape and xa.stride() == x.stride())
    mode = keep_mode()  # (read once per call: the variable is parsed on the host's hot path)
    keep = mode != "off" and merged_ok and x.dtype != torch.float16  # (fp16 never merges: _choose_gemm)

    def y_with(impl: str) -> tuple[Tensor, Tensor | None]:  # y, and the merged weight where one was made
        if impl == "merged":  # y = x (W + s B A)^T + b: one cuBLAS GEMM, U is only saved for the backward
            wm = _merged_weight(weight, A, B, scale)
            return _ref.base_linear(x, wm, bias), wm
        if impl == "cublas":
            y = _ref.base_linear(x, weight, bias)
            _launch_gemm(None, None, None, lowrank, y, scale, accumulate=True, prec_dtype=x.dtype)
            return y, None
        if impl == "cublas_acc":  # y = bias + s U B^T, then y += x W^T by cuBLAS (beta = 1, in place)
            y = _alloc((n, T, out), x.dtype, x.device)
            _launch_gemm(None, None, bias, lowrank, y, scale, prec_dtype=x.dtype)
            y.view(n * T, out).addmm_(x.reshape(n * T, inp), weight.t())
            return y, None
        y = _alloc((n, T, out), x.dtype, x.device)
        w_t = (weight, weight.stride(1), weight.stride(0))
        _launch_gemm(x, w_t, bias, lowrank, y, scale, prec_dtype=x.dtype, tma=impl == "tma")
        return y, None

    if keep and mode == "cache" and gemm_impl() in ("auto", "merged"):  # B's W' kept across steps: one GEMM
        e = _cached_merged_weight(weight, A, B, scale)
        if e is not None:
            kept = _keep(u, e.weight, weight, A, B, scale)
            if kept is not None:
                e.holders.add(kept)  # until its backward is done (or the layer drops it), W' is not rewritten
            return _ref.base_linear(x, e.weight, bias), u
        if (isinstance(weight, torch.nn.Parameter) and _capturing(x.device)
                and _cache_sig(weight, A, B, scale) is not None):
            # no new cached W' under capture (a layer applied twice, say: eagerly its second call made a new
            # entry and ran merged, so auto never timed or autotuned this key): merged here too, kept for the
            # backward, rather than an untimed choice whose first launch would autotune inside the capture (a
            # weight the cache never takes, an inference tensor, went through auto eagerly: its stored choice)
            y, wm = y_with("merged")
            _keep(u, wm, weight, A, B, scale)
            return y, u
    key = ("fwd", x.device.index, _tokens_bucket(n * T), out, inp, r, x.dtype, bias is not None, merged_ok, keep)
    credit = functools.partial(_merged_weight, weight, A, B, scale) if keep else None  # the backward's merge
    impl = _choose_gemm(key, x.device, y_with, merged_ok, x.dtype, credit)  # (the op's device guard: its events too)
    y, wm = y_with(impl)  # (auto's timed calls dropped theirs: only this call's W' can be kept)
    if keep and wm is not None:
        _keep(u, wm, weight, A, B, scale)
    return y, u


def ffa_linear_clip_reduce(P: Tensor, coef: Tensor) -> Tensor:
    """``sum_i coef_i P_i``, skipping samples with ``coef_i == 0``.

    Args:
        P: (n, a, b) per-sample gradients;  coef: (n,) clipping factors.
    Returns:
        (a, b) in P's dtype.
    """
    if P.dim() != 3:
        raise ValueError(f"P: expected shape (n, a, b), got {tuple(P.shape)}")
    if coef.shape != (P.shape[0],):
        raise ValueError(f"coef: expected shape ({P.shape[0]},), got {tuple(coef.shape)}")
    if _use_reference(P) or P.shape[0] == 0 or coef.device != P.device:
        return _ref.ffa_linear_clip_reduce(P, coef)
    return _clip_reduce(P, coef)


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
    """Backward of ``ffa_linear_fwd`` with one pass over ``g`` (see the reference for the contract).

    Args:
        g: (n, T, out);  u: (n, T, r) float32;  weight: (out, in);  A: (r, in);  B: (out, r);
        xa: (n, T, in) in LoRA mode, else None.
    Returns:
        dx, dxa, gB, nuB, gA, nuA with the reference's shapes and dtypes.
    """
    if mode not in (MODE_SUM, MODE_PER_SAMPLE, MODE_CLIP):
        raise ValueError(f"mode: expected 0 (sum), 1 (per-sample) or 2 (clip), got {mode}")
    return _kernels_or_reference("backward", (g, u, weight, A, B, xa), A.shape[0], _bwd, _ref.ffa_linear_bwd,
                                 (g, u, weight, A, B, xa, scale, need_dx, split_dx, mode, clip_B, clip_A))


def _bwd(
    g: Tensor, u: Tensor, weight: Tensor, A: Tensor, B: Tensor, xa: Tensor | None, scale: float, need_dx: bool,
    split_dx: bool, mode: int, clip_B: float, clip_A: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    out, inp = weight.shape
    r = A.shape[0]
    check_shape("g", g, (None, None, out))
    n, T, _ = g.shape
    check_shape("u", u, (n, T, r))
    check_dtype("u", u, torch.float32)
    check_dtype("weight", weight, g.dtype)
    if tuple(A.shape) != (r, inp) or tuple(B.shape) != (out, r):
        raise ValueError(f"A, B: expected ({r}, {inp}) and ({out}, {r}), got {tuple(A.shape)} and {tuple(B.shape)}")
    if xa is not None:
        check_shape("xa", xa, (n, T, inp))
    dt = g.dtype
    acc = u.dtype
    empty = u.new_empty((0,))
    lowrank_of = lambda v: (v, A, A.stride(0), A.stride(1))  # noqa: E731  (R = A (r, in))
    w_main = (weight, weight.stride(0), weight.stride(1))  # dx = G W: Wt is W itself (K=out, N=in)

    def dx_with(impl: str, v: Tensor) -> Tensor:  # G W (+ s V A unless split)
        lowrank = lowrank_of(v)
        if impl == "cublas" or (impl == "cublas_acc" and split_dx):
            dx = torch.matmul(g, weight)
            if not split_dx:
                _launch_gemm(None, None, None, lowrank, dx, scale, accumulate=True, prec_dtype=dt)
            return dx
        if impl == "cublas_acc":  # dx = s V A, then dx += G W by cuBLAS (beta = 1, in place)
            dx = _alloc((n, T, inp), dt, g.device)
            _launch_gemm(None, None, None, lowrank, dx, scale, prec_dtype=dt)
            dx.view(n * T, inp).addmm_(g.reshape(n * T, out), weight)
            return dx
        dx = _alloc((n, T, inp), dt, g.device)
        _launch_gemm(g, w_main, None, None if split_dx else lowrank, dx, 1.0 if split_dx else scale,
                     prec_dtype=dt, tma=impl == "tma")  # fmt: skip
        return dx

    kept = _kept_weight(u, weight, A, B, scale) if need_dx and not split_dx else None  # the forward's W'

    def pass_and_dx(impl: str) -> tuple:
        """The one pass over G (P_i = s G_i^T U_i, norms, and V = G B where something needs it) and dx.
        "merged": dx = G (W + s B A), one cuBLAS GEMM (on the forward's W' where it kept it), and no V at all
        in FFA mode."""
        merged = impl == "merged" and need_dx
        need_v = (need_dx and not merged) or xa is not None
        gB, nuB, v = _per_sample_outer(
            g, u, scale, mode, "ar", Bmat=B if need_v else None, v_rounded=xa is None, prec_dtype=dt
        )  # in LoRA mode V also makes A's per-sample gradients: keep it float32-accurate
        dx = g.new_empty((0,))
        if merged:
            dx = torch.matmul(g, kept if kept is not None else _merged_weight(weight, A, B, scale))
        elif need_dx:
            dx = dx_with(impl, v)
        return gB, nuB, v, dx

    impl = "triton"
    if kept is not None and gemm_impl() in ("auto", "merged"):  # dX = G W' is the floor's own GEMM: nothing
        impl = "merged"  # does less, so auto takes it untimed (and the forward's credit is earned)
    elif need_dx:
        key = ("dx", g.device.index, _tokens_bucket(n * T), inp, out, r, dt, split_dx, mode, xa is None)
        impl = _choose_gemm(key, g.device, pass_and_dx, merged_ok=not split_dx, dtype=dt)  # (the op's device guard)
    gB, nuB, v, dx = pass_and_dx(impl)
    if mode == MODE_CLIP:
        gB = _clip_reduce(gB, clip_coef(nuB, clip_B))
    gA, nuA = empty, u.new_empty((0,))
    if xa is not None:  # LoRA: Q_i = s V_i^T xa_i, stored as (r, in)
        gA, nuA, _ = _per_sample_outer(xa, v, scale, mode, "ra", prec_dtype=dt)
        if mode == MODE_CLIP:
            gA = _clip_reduce(gA, clip_coef(nuA, clip_A))
        if mode == MODE_SUM:
            nuA = u.new_empty((0,))
    if mode == MODE_SUM:
        nuB = u.new_empty((0,))
    dxa = g.new_empty((0,))
    if need_dx and split_dx:
        dxa = _alloc((n, T, inp), dt, g.device)
        _launch_gemm(None, None, None, lowrank_of(v), dxa, scale, prec_dtype=dt)
    if gB.dtype != acc:
        gB = gB.to(acc)
    return dx, dxa, gB, nuB, gA, nuA

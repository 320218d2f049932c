"""DP micro-batches of a fixed shape, replayed from a CUDA graph: the host cost of a step, gone.

A DP-SGD step of a model with many small adapters is host-bound on a GPU: issuing the forward, backward
and clipping of a 1B Llama's 154 adapters took longer than the GPU needed to run them (bench/NOTES.md: 158
ms per step, of which the GPU was busy 71). A CUDA graph issues the same work in microseconds, but it needs
fixed shapes and no value read back to the host, while Poisson sampling, which the privacy accounting
assumes, draws batches of a random size.

``GraphedAccumulator`` reconciles the two: every micro-batch is padded to one fixed size. Padding rows are
copies of the micro-batch's first sample (valid inputs, finite activations) with loss weight 0, so their
per-sample gradients are exactly zero; the clipping gives them coefficient 0 besides (nothing they hold,
not even a non-finite value, reaches the sum) and does not count them as dropped or as samples. The
clipped sum of the real samples is what the eager ``loss.backward(); dp.accumulate()`` computes, up to the
order of floating-point sums. Only the forward, backward and clip-reduce are captured; noise, accounting,
scaling and the optimizer stay in ``DPSGD.step``, eager: nothing about the noise changes.

    dp = DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=m, sample_rate=q)
    acc = GraphedAccumulator(dp, per_sample_loss, micro_batch_size=16)
    for batch in poisson_loader:                      # any size, 0 included
        if acc.accumulate(batch) == 0:
            dp.step(empty_batch=True)
        else:
            dp.step()
        dp.zero_grad()

Off CUDA (or with ``graph=False``) the same padding and masking run eagerly: the same results, no graph.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import traceback
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import SUPPORTED_NODES, tree_flatten, tree_unflatten

from fedlora_fast import per_sample
from fedlora_fast.privacy.dpsgd import DPSGD, attached_engine
from fedlora_fast.privacy.sampling import _per_sample_values, _same_mapping

log = logging.getLogger(__name__)

REDUCTIONS = ("sum", "mean")
# aten ops that read a device value back to the host (item(), bool(), a data-dependent output shape): each
# is a synchronisation, which a CUDA graph capture refuses
HOST_READ_OPS = frozenset(
    {
        "aten._local_scalar_dense.default",
        "aten.is_nonzero.default",
        "aten.equal.default",
        "aten.nonzero.default",  # (nonzero_static, with its fixed size, does not read back)
        "aten.masked_select.default",
        "aten._unique2.default",
        "aten.unique_dim.default",
        "aten.unique_consecutive.default",
        "aten.bincount.default",
    }
)
# (with a trailing separator: site-packages/torch must not also match torchvision/ or torch_geometric/)
_OWN_DIRS = tuple(
    os.path.join(d, "") for d in (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))
)


def _caller(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frame outside torch and this module: where the read was asked for."""
    for frame in reversed(stack):
        if not os.path.abspath(frame.filename).startswith(_OWN_DIRS):
            return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return "(inside torch)"


_MISSING = object()  # a setting deleted since the capture
class _TensorSlot:
    """Where a batch's tensor goes among its leaves (a leaf may itself be None)."""

    def __repr__(self) -> str:
        return "a tensor"


_TENSOR_SLOT = _TensorSlot()
_SCALARS = (int, float, complex, str, bytes, type(None))  # bool and IntEnum are ints


def _is_setting(v: Any) -> bool:
    """A scalar, or a flat dict/list/tuple/set of scalars (peft's ``scaling``, ``merged_adapters``)."""
    if isinstance(v, _SCALARS):
        return True
    if isinstance(v, dict):
        return all(isinstance(k, _SCALARS) and isinstance(x, _SCALARS) for k, x in v.items())
    return isinstance(v, (list, tuple, set, frozenset)) and all(isinstance(x, _SCALARS) for x in v)


# nn.Module's own bookkeeping (parameter, buffer, submodule and hook dicts: checked apart), ``training`` aside
_MODULE_INTERNALS = frozenset(torch.nn.Module().__dict__) - {"training"}


def _setting_names(d: dict) -> tuple[str, ...]:
    return tuple([k for k, v in d.items() if k not in _MODULE_INTERNALS and _is_setting(v)])


def _settings(d: dict, names: tuple[str, ...], copy: bool = False) -> tuple:
    """The values of ``names`` in a module's ``__dict__`` (containers copied with ``copy``: the snapshot must
    not change with the live dict it was taken from)."""
    get = d.get
    vals = [get(k, _MISSING) for k in names]
    if copy:  # plain copies (a defaultdict's constructor takes no dict); a subclass compares equal to them
        vals = [dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else set(v)
                if isinstance(v, set) else v for v in vals]
    return tuple(vals)


def _as_pytree(batch: Any) -> Any:
    """``batch`` with every mapping torch's pytree does not know (Hugging Face's ``BatchEncoding``, a
    ``UserDict``) as a plain dict, which ``loss_fn`` then gets (flattened, it was one opaque leaf: refused as
    "no tensors"). Everything else keeps its type (a container holding such a mapping is rebuilt as itself)."""
    if isinstance(batch, Mapping):
        items = {k: _as_pytree(v) for k, v in batch.items()}
        if type(batch) not in SUPPORTED_NODES:
            return items
        return batch if all(items[k] is v for k, v in batch.items()) else _same_mapping(batch, items)
    if isinstance(batch, (list, tuple)):
        values = [_as_pytree(v) for v in batch]
        if all(a is b for a, b in zip(values, batch)):
            return batch
        return type(batch)(*values) if hasattr(batch, "_fields") else type(batch)(values)
    return batch


def _per_sample_lists(batch: Any, n: int):
    """The lists/tuples in ``batch``, at any depth, that ``sampling.micro_batches`` would split as per-sample
    values of a batch of ``n``: plain values, one per sample (``sampling._per_sample_values``), or lists of
    them, one per sample (a custom collate's tags per sample) or one per field, each with a value per sample
    (``default_collate``'s transposed layout)."""
    if _per_sample_values(batch):
        if len(batch) == n:
            yield batch
    elif isinstance(batch, (list, tuple)) and batch and all(_per_sample_values(v) for v in batch):
        if len(batch) == n or any(len(v) == n for v in batch):
            yield batch
    elif isinstance(batch, Mapping):
        for v in batch.values():
            yield from _per_sample_lists(v, n)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            yield from _per_sample_lists(v, n)


def _global_hooks() -> tuple[dict, ...]:
    """``nn.Module``'s global forward/backward hooks (``register_module_forward_hook`` and its kin)."""
    m = torch.nn.modules.module
    names = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
             "_global_backward_hooks")
    return tuple([getattr(m, n) for n in names if isinstance(getattr(m, n, None), dict)])


class _HostReads(TorchDispatchMode):
    def __init__(self, device_type: str | None):
        super().__init__()
        self.device_type = device_type
        self.found: list[tuple[str, str]] = []

    def _on_device(self, args, kwargs) -> bool:
        if self.device_type is None:
            return True
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        return any(t.device.type == self.device_type for t in tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        to_host = name in ("aten._to_copy.default", "aten.copy_.default") and _to_host(func, args, kwargs)
        reads = name in HOST_READ_OPS or _data_dependent(name, args, kwargs)
        if to_host or (reads and self._on_device(args, kwargs)):
            self.found.append((name, _caller(traceback.extract_stack())))
        return func(*args, **kwargs)


# indexing with a boolean (or uint8) mask is nonzero() inside the op: its output size (or the positions it
# writes) is read back, which no separate aten op shows at this level; likewise repeat_interleave with a
# tensor of repeats and no output_size
_MASK_INDEX_OPS = ("aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default", "aten._index_put_impl_.default")


def _data_dependent(name: str, args, kwargs) -> bool:
    if name in _MASK_INDEX_OPS and len(args) > 1:
        return any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ()))
    if name == "aten.repeat_interleave.Tensor":
        return kwargs.get("output_size") is None
    if name == "aten.repeat_interleave.self_Tensor":
        return kwargs.get("output_size") is None
    return False


def _to_host(func, args, kwargs) -> bool:
    """A copy from a device tensor into CPU memory (``.cpu()``, ``.tolist()``, ``copy_`` into a CPU tensor)."""
    if str(func) == "aten.copy_.default":
        dst, src = args[0], args[1]
        return isinstance(src, Tensor) and src.device.type != "cpu" and dst.device.type == "cpu"
    src, device = args[0], kwargs.get("device")
    return src.device.type != "cpu" and device is not None and torch.device(device).type == "cpu"


# Python-level calls a capture refuses that no aten op shows: a device synchronisation, and reading the CUDA
# generator's state (activation checkpointing saves it to replay dropout: torch.utils.checkpoint's
# preserve_rng_state); then methods of torch.cuda's classes that wait for or ask about device work
HOST_READ_CALLS = ("synchronize", "get_rng_state", "get_rng_state_all")
HOST_READ_METHODS = {"Stream": ("synchronize", "query"), "Event": ("synchronize", "query", "elapsed_time")}
_INHERITED = object()


# The patches are process-wide and shared: the first probe (of any thread) installs them, the last one to end
# puts the originals back (two threads' probes each restoring what it saw would leave a recorder in place for
# good when they overlap). A recorder reports to the probes running on its own thread only: the probe's
# dispatch mode sees that thread alone, and another thread's prints are not the probed function's.
_PROBES: dict[int, list[tuple[list, str | None]]] = {}  # thread id -> its probes (found, device_type), nested
_PATCH_LOCK = threading.Lock()
_PATCHED: list[tuple[Any, str, Any]] = []  # (owner, name, what the owner itself held) while any probe runs


def _probes_here() -> list[tuple[list, str | None]]:
    return _PROBES.get(threading.get_ident(), [])


def _recorder(label: str, original: Callable) -> Callable:
    def call(*args, **kwargs):
        probes = _probes_here()
        if probes:
            at = _caller(traceback.extract_stack())
            for found, _ in probes:
                found.append((label, at))
        return original(*args, **kwargs)

    return call


def _repr_recorder(original: Callable) -> Callable:
    def call(self, *args, **kwargs):
        probes = [found for found, dev in _probes_here() if dev is None or self.device.type == dev]
        if probes:
            at = _caller(traceback.extract_stack())
            for found in probes:
                found.append(("torch.Tensor.__repr__ (print / str / f-string of a tensor)", at))
        return original(self, *args, **kwargs)

    return call


def _install() -> None:
    targets = [(torch.cuda, name, f"torch.cuda.{name}") for name in HOST_READ_CALLS]
    for cls_name, methods in HOST_READ_METHODS.items():  # (torch.Stream / torch.Event are immutable C types)
        cls = getattr(torch.cuda, cls_name, None)
        targets += [(cls, m, f"torch.cuda.{cls_name}.{m}") for m in methods if hasattr(cls, m)]
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "synchronize"):
        targets.append((accelerator, "synchronize", "torch.accelerator.synchronize"))
    # what each owner itself held (a method defined on a base class is not put back as the owner's own)
    _PATCHED[:] = [(owner, name, vars(owner).get(name, _INHERITED)) for owner, name, _ in targets]
    _PATCHED.append((Tensor, "__repr__", vars(Tensor)["__repr__"]))
    for owner, name, label in targets:
        setattr(owner, name, _recorder(label, getattr(owner, name)))
    Tensor.__repr__ = _repr_recorder(vars(Tensor)["__repr__"])


def _uninstall() -> None:
    for owner, name, original in _PATCHED:
        if original is _INHERITED:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    _PATCHED.clear()


@contextlib.contextmanager
def _record_calls(found: list[tuple[str, str]], device_type: str | None = None):
    """``torch.cuda``'s HOST_READ_CALLS and HOST_READ_METHODS recorded (with their caller) while the block runs,
    and ``torch.accelerator.synchronize``; they still run (the device-generic ``torch.Stream`` / ``torch.Event``
    are immutable types: not seen). Also the ``repr`` (``print(t)``, ``f"{t}"``) of a tensor on ``device_type``
    (any, for None): it reads every value back, below the dispatch level the probe sees (``torch._tensor_str``
    disables modes). Only calls made on this thread are recorded."""
    me = threading.get_ident()
    with _PATCH_LOCK:
        if not _PROBES:
            _install()
        _PROBES.setdefault(me, []).append((found, device_type))
    try:
        yield
    finally:
        with _PATCH_LOCK:
            mine = _PROBES[me]
            mine.pop()
            if not mine:
                del _PROBES[me]
            if not _PROBES:
                _uninstall()


def find_host_reads(fn: Callable[[], Any], device_type: str | None = None) -> list[tuple[str, str]]:
    """Run ``fn()`` once and list every op in it (backward included) that reads a device value back to the
    host, as ``(aten op or torch.cuda call, "file:line in function")``; empty when ``fn`` can be captured in
    a CUDA graph as far as reads go. ``device_type``: only reads of tensors on that device (``"cuda"``: what
    a capture refuses; reading a CPU tensor is harmless there); None: of any tensor, so that a CPU run finds
    what would synchronise on a GPU (except plain device-to-host copies, which only exist there). Calls of
    ``torch.cuda.synchronize`` / ``get_rng_state``, ``torch.accelerator.synchronize``, a ``torch.cuda.Stream``'s
    or ``Event``'s ``synchronize`` / ``query`` (``elapsed_time``), and printing a tensor (``repr``, ``str``, an
    f-string) are found on every device type but the CPU alone; the device-generic ``torch.Stream`` /
    ``torch.Event`` methods are not (immutable types).
    """
    probe = _HostReads(device_type)
    with probe, (_record_calls(probe.found, device_type) if device_type != "cpu" else contextlib.nullcontext()):
        fn()
    return probe.found


def capturable_attention_mask(model: torch.nn.Module, mask: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A 2-D (n, T) padding mask (1 = token, 0 = padding) as the 4-D additive mask (n, 1, T, T) that Hugging
    Face models take as given, with no read-back (their 2-D mask path asks whether every entry is 1, which
    a CUDA graph cannot hold): 0 where a query may attend to a key, the dtype's lowest value where not (what
    both eager attention, which adds the mask to the scores, and sdpa take; a boolean mask would be added as
    +1/+0 by eager attention, and a row with no key left gives NaN in sdpa, finite here). Causal models
    (attention modules with ``is_causal=True``, e.g. Llama) get the causal triangle too; bidirectional
    encoders (BERT) only the padding. ``dtype``: the attention's (default: the input embeddings').

    Raises:
        ValueError: a mask that is not 2-D; a model whose attention modules do not say (or disagree on)
            whether they are causal; an attention implementation other than eager or sdpa (flash and flex
            attention take no 4-D mask); sequences longer than the model's sliding attention window
            (Mistral, Gemma...: within the window the mask is the same, beyond it one 4-D mask cannot
            express it).
    """
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask: expected a 2-D (n, T) padding mask, got {got}")
    causal = {m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)}
    if len(causal) != 1:
        raise ValueError(
            f"model: cannot tell from its attention modules whether {type(model).__name__} is causal (is_causal "
            f"values {sorted(causal)}); build the 4-D mask (n, 1, T, T) yourself"
        )
    T = mask.shape[1]
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in (None, "eager", "sdpa"):
        raise ValueError(
            f"model: attention implementation {impl!r} takes no 4-D mask; load the model with "
            "attn_implementation='sdpa' or 'eager' for a CUDA graph, or run with graph=False"
        )
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and 0 < window < T and getattr(config, "use_sliding_window", True) is not False:
        raise ValueError(
            f"mask: {T} tokens exceed the model's sliding attention window ({window}), which its own mask code "
            "applies (per layer, in some models) and one 4-D mask cannot: pad to at most the window, or run "
            "without a CUDA graph (graph=False) with the 2-D mask"
        )
    if dtype is None:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        weight = getattr(embeddings, "weight", None)
        dtype = weight.dtype if isinstance(weight, Tensor) and weight.is_floating_point() else torch.float32
    keep = mask.bool()[:, None, None, :].expand(-1, 1, T, T)
    if causal == {True}:
        keep = keep & torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device)
    return torch.where(keep, torch.zeros((), dtype=dtype, device=mask.device), blocked)


def plan_micro_batches(n: int, sizes: Sequence[int], replay_cost: float = 1.0) -> list[int]:
    """The micro-batch sizes a batch of ``n`` samples runs as, in order (every one full but possibly the last,
    which is padded): of all ways to cover n with ``sizes``, the one of least ``rows + replay_cost *
    replays`` (rows computed, padding included; ``replay_cost``: one replay's fixed cost in rows of work),
    fewer replays on a tie. With powers of two down to 1, nothing is padded unless a replay costs more than
    the rows it saves. ``[]`` for n = 0."""
    return _Planner(_check_sizes(sizes), _check_replay_cost(replay_cost)).plan(_check_n(n))


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    return n


def _check_sizes(micro_batch_size) -> tuple[int, ...]:
    sizes = (micro_batch_size,) if isinstance(micro_batch_size, int) else micro_batch_size
    try:
        sizes = tuple(sizes)
    except TypeError:
        sizes = (micro_batch_size,)
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in sizes):
        raise ValueError(
            f"micro_batch_size: expected a positive int or a non-empty sequence of them, got {micro_batch_size!r}"
        )
    return sizes


def _check_replay_cost(replay_cost) -> float:
    if isinstance(replay_cost, bool) or not isinstance(replay_cost, (int, float)) or not 0 <= replay_cost < math.inf:
        raise ValueError(f"replay_cost: expected a finite number >= 0 (rows of work), got {replay_cost!r}")
    return float(replay_cost)


def graph_micro_batch_sizes(largest: int) -> tuple[int, ...]:
    """``largest`` and every power of two below it, e.g. (14, 8, 4, 2, 1): micro-batch sizes that cover any
    batch without padding (one graph each, one memory pool); the plan still pads a row where that saves a
    replay costing more."""
    if isinstance(largest, bool) or not isinstance(largest, int) or largest <= 0:
        raise ValueError(f"largest: expected a positive int, got {largest!r}")
    return (largest, *(1 << k for k in reversed(range(largest.bit_length())) if 1 << k < largest))


class _Planner:
    """``plan_micro_batches`` for one set of sizes, its table extended as larger batches arrive (Poisson
    batch sizes repeat: each n is planned once, in O(n * len(sizes)) the first time a larger n comes)."""

    def __init__(self, sizes: tuple[int, ...], replay_cost: float):
        self.sizes = tuple(sorted(set(sizes), reverse=True))
        self.replay_cost = replay_cost
        # best[m]: (cost, replays, size of the first micro-batch) to cover m samples; m = 0 costs nothing
        self.best: list[tuple[float, int, int]] = [(0.0, 0, 0)]

    def _extend(self, n: int) -> None:
        best, c = self.best, self.replay_cost
        for m in range(len(best), n + 1):
            options = []
            for s in self.sizes:
                if s >= m:  # one (padded) replay covers the rest
                    options.append((s + c, 1, -s))
                else:
                    cost, replays, _ = best[m - s]
                    options.append((cost + s + c, replays + 1, -s))
            cost, replays, s = min(options)  # least cost, then fewest replays, then the largest size first
            best.append((cost, replays, -s))

    def plan(self, n: int) -> list[int]:
        if n >= len(self.best):
            self._extend(n)
        out, m = [], n
        while m > 0:
            s = self.best[m][2]
            out.append(s)
            m -= s
        # the walk ends with the one micro-batch that may be padded (size >= what is left): it stays last,
        # the full ones before it go largest first
        return sorted(out[:-1], reverse=True) + out[-1:]


class _Slot:
    """One micro-batch size: its fixed input buffers, loss weights, real-row mask and (graph mode) capture."""

    def __init__(self, size: int, tensors: list[Tensor], device: torch.device):
        self.size = size
        self.static = [torch.empty((size, *x.shape[1:]), dtype=x.dtype, device=device) for x in tensors]
        self.weight = torch.zeros(size, dtype=torch.float32, device=device)
        self.valid = torch.zeros(size, dtype=torch.bool, device=device)
        self.graph = None
        self.out: tuple[Tensor, Tensor, Tensor] | None = None


class GraphedAccumulator:
    """``loss.backward(); dp.accumulate()`` for micro-batches padded to fixed shapes, replayed from CUDA graphs.

    Args:
        dp: the ``DPSGD`` engine (flat or per-layer clipping); its ``step``/``zero_grad`` stay the caller's.
        loss_fn: ``loss_fn(model, batch) -> (b,)`` per-sample losses of a micro-batch (``batch`` has the
            input batch's structure, a mapping torch's pytree does not know, such as Hugging Face's
            ``BatchEncoding``, as a dict; tensors are fixed buffers of b rows; other leaves are passed as given,
            so a list of plain values, one per sample, is refused where the batch is split: keep per-sample data
            in tensors). It must be a pure function of the
            tensors: under a graph its Python runs only while capturing. Hugging Face attention masks as 2-D
            padding masks read a value back (``find_host_reads`` says where): pass
            ``capturable_attention_mask(model, mask)`` instead. Under autocast inside ``loss_fn``, pass
            ``cache_enabled=False`` (PyTorch's rule for autocast in a captured region).
        micro_batch_size: b, the fixed number of rows per replay, or several sizes (e.g. ``(16, 8, 4, 2,
            1)``): one graph each, captured the first time a batch needs it, all in one memory pool (its
            largest's). A batch of n samples runs as ``plan(n)`` (``plan_micro_batches``): the cover of
            least rows + ``replay_cost`` x replays, so that a Poisson batch need not be padded to the
            largest size (a padded row costs as much GPU work as a real one). Sequences of varied length:
            pad them to one length, or bucket them with one accumulator per padded length on the same
            engine (each holds its own graphs and memory).
        replay_cost: one replay's fixed cost, in rows of work (default 1): only matters with several sizes.
            Large models with long sequences: less (a row is much work); small ones: more. Measured: 1.76
            rows for a 1B Llama at T = 512, r = 8, bf16 on an H100 (14.0 ms + 8.0 ms per row; bench/NOTES.md).
        reduction: ``"sum"`` (each real sample's loss weight 1, the DP-SGD convention) or ``"mean"`` (weight
            1/m, m the engine's ``expected_batch_size``: the loss as a mean over the *expected* batch). Never
            1/n for the batch's actual n: one sample's presence would rescale every other's gradient, and
            the step's sum could move by up to about 2C when one sample is removed (the noise is for C).
            With ``"mean"``, C bounds each sample's gradient of ``loss_i / m``, and ``DPSGD.step`` still
            divides the noised sum by m: the update is ``"sum"``'s with C and the learning rate both scaled,
            not opacus's ``loss_reduction="mean"`` (which undoes the 1/m before clipping).
        graph: capture CUDA graphs; None (default): when the engine's parameters are on CUDA. The graph
            reads the parameters' memory: optimizers update them in place, which it sees; a parameter or
            buffer replaced by another tensor after the first capture (not copied into) is refused at the
            next ``accumulate`` (a new accumulator captures the new one), and so is a change to what a replay
            runs no Python for: a module's plain settings (train/eval, an adapter's ``scale`` or merge,
            dropout's ``p``), a parameter's ``requires_grad``, a submodule, a hook.
        warmup: eager runs before each capture (Triton compiles and autotunes, ``auto`` picks its GEMMs:
            none of that may happen inside a capture); the read-back probe is one more. Their results are
            discarded: nothing is released. A capture thus costs ``warmup + 2`` micro-batches of work once
            per size.
    Raises:
        ValueError: bad arguments; later (``accumulate``) a batch whose non-batch shapes, dtypes or structure
            differ from the first one's, or a ``loss_fn`` that reads device values back (graph mode).
    """

    def __init__(
        self,
        dp: DPSGD,
        loss_fn: Callable[[torch.nn.Module, Any], Tensor],
        *,
        micro_batch_size: int | Sequence[int],
        replay_cost: float = 1.0,
        reduction: str = "sum",
        graph: bool | None = None,
        warmup: int = 1,
    ):
        if not isinstance(dp, DPSGD):
            raise TypeError(f"dp: expected a DPSGD engine, got {type(dp).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable loss_fn(model, batch) -> (b,) losses, got {loss_fn!r}")
        sizes, replay_cost = _check_sizes(micro_batch_size), _check_replay_cost(replay_cost)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup: expected an int >= 1, got {warmup!r}")
        self.device = dp._device
        if graph is None:
            graph = self.device.type == "cuda"
        if graph and self.device.type != "cuda":
            raise ValueError(f"graph: CUDA graphs need the engine's parameters on CUDA, they are on {self.device}")
        self._planner = _Planner(sizes, replay_cost)
        self.dp, self.loss_fn = dp, loss_fn
        self.micro_batch_sizes: tuple[int, ...] = self._planner.sizes  # largest first
        self.micro_batch_size = self.micro_batch_sizes[0]
        self.reduction, self.graph, self.warmup = reduction, bool(graph), warmup
        self.last_loss: Tensor | None = None  # the last accumulate()'s weighted loss (0-dim, on the device)
        self.replays = 0
        self._spec = None  # the batch structure and its non-tensor leaves (the first batch's)
        self._const: list = []
        self._shapes: list[tuple[tuple[int, ...], torch.dtype]] = []  # each tensor leaf's per-sample shape
        self._slots: dict[int, _Slot] = {}
        self._pool = None  # the graphs' shared memory pool
        self._captured = False  # a capture exists: its snapshot below is checked before every replay
        # base weights whose cached merged weight a capture replays (FEDLORA_FAST_KEEP_MERGED=cache), as the
        # capture found them: a replay never re-checks them (kernels.ffa_linear.captured_base_weights)
        self._cached_weights: list[tuple] = []
        self._memory: list[tuple[str, int]] = []  # (name, data_ptr) of every parameter and buffer at capture
        self._modules: list[torch.nn.Module] = []
        self._module_names: list[str] = []
        self._setting_names: list[tuple[str, ...]] = []
        self._captured_fingerprint: list[tuple] = []
        self._captured_clipping: tuple = ()

    def plan(self, n: int) -> list[int]:
        """The micro-batch sizes a batch of n samples runs as (``plan_micro_batches``)."""
        return self._planner.plan(_check_n(n))

    # --- the batch ---------------------------------------------------------------------------------------
    def _split(self, batch: Any) -> tuple[list[Tensor], list, Any, int]:
        """``(tensors, constants, spec, n)``: the batch's tensor leaves, its leaves with each tensor as None
        (what the capture takes as given), its structure, and its number of samples."""
        leaves, spec = tree_flatten(_as_pytree(batch))
        tensors = [x for x in leaves if isinstance(x, Tensor)]
        if not tensors:
            raise ValueError(f"batch: expected tensors with the samples along dim 0, got a {type(batch).__name__}")
        if any(x.dim() == 0 for x in tensors):
            raise ValueError("batch: every tensor needs the samples along dim 0, got a 0-dim tensor")
        sizes = sorted({x.shape[0] for x in tensors})
        if len(sizes) != 1:
            raise ValueError(f"batch: tensors disagree on the number of samples (dim 0): {sizes}")
        n = sizes[0]
        # the capture takes non-tensor leaves as given: a list with one value per sample (collated ids) would
        # reach every micro-batch whole, row i paired with another sample's value
        plan = self.plan(n) if n > 1 else [n]
        per_sample = next(_per_sample_lists(batch, n), None) if len(plan) > 1 else None
        if per_sample is not None:
            raise ValueError(
                f"batch: a {type(per_sample).__name__} of plain values ({repr(per_sample)[:60]}) that reads as one "
                f"value per sample of a batch of {n}, split into micro-batches {plan}: a GraphedAccumulator "
                "cannot split values that are not tensors (keep per-sample data in tensors, per-batch constants in "
                "a 0-dim tensor or a string)"
            )
        constants = [_TENSOR_SLOT if isinstance(x, Tensor) else x for x in leaves]
        return tensors, constants, spec, n

    def _fix_or_check_shapes(self, tensors: list[Tensor]) -> None:
        """The first batch (an empty one too) fixes the tensors' per-sample shapes and dtypes; later ones are
        checked against them."""
        if self._shapes:
            self._check_tensors(tensors)
        else:
            self._shapes = [(tuple(x.shape[1:]), x.dtype) for x in tensors]

    def _check(self, tensors: list[Tensor], constants: list, spec) -> None:
        """The batch has the first batch's structure, non-tensor values and per-sample shapes and dtypes."""
        if spec != self._spec:
            raise ValueError(
                f"batch: its structure differs from the first batch's ({spec} vs {self._spec}); "
                "a GraphedAccumulator replays one fixed computation"
            )
        if constants != self._const:
            differ = ", ".join(f"{c!r} vs {k!r}" for c, k in zip(constants, self._const) if c != k)
            raise ValueError(
                f"batch: its non-tensor values differ from the first batch's ({differ}); "
                "a GraphedAccumulator replays one fixed computation"
            )
        self._check_tensors(tensors)

    def _check_tensors(self, tensors: list[Tensor]) -> None:
        """The batch's tensors are the first batch's in number, per-sample shape and dtype."""
        if len(tensors) != len(self._shapes):
            raise ValueError(f"batch: {len(tensors)} tensors, the first batch had {len(self._shapes)}; a "
                             "GraphedAccumulator replays one fixed computation")
        for i, (x, (shape, dtype)) in enumerate(zip(tensors, self._shapes)):
            if tuple(x.shape[1:]) != shape or x.dtype != dtype:
                raise ValueError(
                    f"batch: tensor {i} has per-sample shape {tuple(x.shape[1:])} {x.dtype}, expected "
                    f"{shape} {dtype} (the first batch's): pad sequences to one fixed length, or "
                    "use one GraphedAccumulator per shape"
                )

    def _slot(self, size: int, tensors: list[Tensor]) -> _Slot:
        slot = self._slots.get(size)
        if slot is None:
            slot = self._slots[size] = _Slot(size, tensors, self.device)
        return slot

    def _fill(self, slot: _Slot, tensors: list[Tensor], start: int, k: int) -> None:
        """Copy the batch's samples [start, start + k) into the slot's buffers; rows k.. repeat the first
        (loss weight 0)."""
        b = slot.size
        for x, s in zip(tensors, slot.static):
            part = x[start : start + k].detach()  # (a batch tensor that requires grad: its values only)
            s[:k].copy_(part, non_blocking=True)
            if k < b:
                s[k:].copy_(part[:1].expand(b - k, *part.shape[1:]), non_blocking=True)
        slot.weight.zero_()
        slot.weight[:k] = 1.0 if self.reduction == "sum" else 1.0 / self.dp.expected_batch_size  # fixed, never n
        slot.valid.zero_()
        slot.valid[:k] = True

    # --- the captured work -------------------------------------------------------------------------------
    def _batch(self, slot: _Slot) -> Any:
        it = iter(slot.static)
        return tree_unflatten([next(it) if c is _TENSOR_SLOT else c for c in self._const], self._spec)

    def _device_work(self, slot: _Slot) -> tuple[Tensor, Tensor, Tensor]:
        """Forward, backward and the clip-reduce of a slot's buffers: (clipped sum, dropped count, loss).
        It starts from no per-sample state or ``.grad`` and leaves none (``_clip_batch`` frees them): a
        replay reads only the slot's buffers and the model, and writes only its outputs."""
        b = slot.size
        losses = self.loss_fn(self.dp.model, self._batch(slot))
        if not isinstance(losses, Tensor) or losses.shape != (b,):
            got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(f"loss_fn: expected ({b},) per-sample losses (one per row of the micro-batch), got {got}")
        if not losses.requires_grad:
            raise ValueError("loss_fn: returned losses that do not require grad (detached, or computed under "
                             "torch.no_grad()): there is no backward to take per-sample gradients from")
        # padding rows masked, not only weighted 0: a copied inf loss would make 0 * inf = NaN of the reported
        # loss (their gradients are 0 either way: where's backward gives them none)
        total = torch.where(slot.valid, losses.float() * slot.weight, 0.0).sum()
        total.backward()
        clipped, dropped, _ = self.dp._clip_batch(slot.valid)
        return clipped, dropped, total.detach()

    def _capture(self, slot: _Slot) -> None:
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._device_work(slot)  # discarded: compiles, autotunes; nothing is added or released
            reads = find_host_reads(lambda: self._device_work(slot), self.device.type)
        current.wait_stream(side)
        if reads:
            where = "; ".join(f"{op} at {at}" for op, at in dict.fromkeys(reads))
            hint = ""
            if any(op.startswith("torch.cuda.get_rng_state") for op, _ in reads):
                hint = (" Activation checkpointing saves the CUDA RNG state: enable it with preserve_rng_state=False "
                        "(Hugging Face: gradient_checkpointing_kwargs={'use_reentrant': False, "
                        "'preserve_rng_state': False}; exact for models without dropout).")
            raise ValueError(
                f"loss_fn: reads device values back to the host, which a CUDA graph cannot hold: {where}. "
                "Hugging Face 2-D attention masks do (pass capturable_attention_mask(model, mask) instead), or "
                f"use graph=False.{hint}"
            )
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            # One pool for every size: a replay needs only its own temporaries (``_device_work`` carries no
            # state from one micro-batch to the next) and every graph's outputs stay referenced (slot.out),
            # so graphs replayed one after another on one stream, in any order, never overwrite what another
            # still needs; the pool holds the largest graph's temporaries, not their sum.
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._device_work(slot)
        except Exception as e:  # what the failed capture left is cleared by accumulate (as any failure's)
            raise RuntimeError(
                f"CUDA graph capture of loss_fn's forward/backward failed ({type(e).__name__}: {e}); "
                "GraphedAccumulator(..., graph=False) runs the same padded computation eagerly"
            ) from e
        # the snapshot before the graph is kept: a graph without one would replay unchecked (_check_captured
        # runs only once something was captured), whatever changed since
        cached = []
        cache = sys.modules.get("fedlora_fast.kernels.ffa_linear")  # (imported only where the Triton ops ran)
        if cache is not None:
            cached = cache.captured_base_weights(self.dp.model.parameters())
        if not self._captured:
            try:
                self._snapshot()
            except RuntimeError as e:  # (a tensor without storage: a sparse buffer, some wrapper subclasses)
                raise RuntimeError(
                    f"GraphedAccumulator: cannot record where the model's parameters and buffers live, which every "
                    f"replay checks ({e}); graph=False runs the same padded computation eagerly"
                ) from e
        self._cached_weights += cached
        slot.graph, slot.out = graph, out
        log.info("GraphedAccumulator: forward, backward and clipping of %d-row micro-batches captured in a CUDA graph",
                 slot.size)

    def _model_memory(self) -> list[tuple[str, int]]:
        """(name, data_ptr) of every parameter and buffer (for the error message: ~1 ms on a 1B Llama)."""
        model = self.dp.model
        return [(n, t.data_ptr()) for n, t in [*model.named_parameters(), *model.named_buffers()]]

    def _fingerprint(self, copy: bool = False) -> list[tuple]:
        """What the capture took as given, one entry per captured module (then the global module hooks):
        where each parameter and buffer lives and whether it requires grad, which submodules and hooks the
        module holds (the engine's own hooks aside: a rebound engine has new ones, and a replay runs no
        hook), and its plain settings, the attributes that were scalars at capture (``training``, an
        adapter's ``scale`` and ``merged``, dropout's ``p``) or flat containers of them (peft's ``scaling``
        dict). The per-``accumulate`` check: 0.87-0.97 ms for a 16-layer Llama's 439 modules on the 2-core
        dev box (0.56-0.64 ms when it covered only tensors, submodules, ``training`` and ``merged``)."""
        own = {h.id for h in self.dp._hooks}
        out = []
        add = out.append
        for module, names in zip(self._modules, self._setting_names):
            hooks = (module._forward_pre_hooks, module._forward_hooks, module._backward_pre_hooks,
                     module._backward_hooks)
            add((
                tuple([None if t is None else (t.data_ptr(), t.requires_grad) for t in module._parameters.values()]),
                tuple([0 if t is None else t.data_ptr() for t in module._buffers.values()]),
                tuple(map(id, module._modules.values())),
                tuple([tuple([k for k in h if k not in own]) for h in hooks]) if any(hooks) else (),
                _settings(module.__dict__, names, copy),
            ))
        out.append(tuple([tuple(h) for h in _global_hooks()]))
        return out

    def _snapshot(self) -> None:
        """What the capture read and baked in, for ``_check_captured`` to compare against later."""
        named = list(self.dp.model.named_modules())
        self._module_names = [n or "(the model)" for n, _ in named]
        self._modules = [m for _, m in named]
        self._setting_names = [_setting_names(m.__dict__) for m in self._modules]
        self._captured_fingerprint, self._memory = self._fingerprint(copy=True), self._model_memory()
        self._captured_clipping = self._clipping()
        self._captured = True  # last: a snapshot that failed part-way is not checked against

    def _changes(self, now: list[tuple]) -> list[str]:
        """What differs between ``now`` and the captured fingerprint, in words (the error message's)."""
        parts = ("parameters (memory, requires_grad)", "buffers", "submodules", "hooks")
        out = []
        for name, names, a, b in zip(self._module_names, self._setting_names, now, self._captured_fingerprint):
            if a != b:
                out += [f"{name}: {what} changed" for what, x, y in zip(parts, a, b) if x != y]
                out += [f"{name}.{k}: {y!r} -> {x!r}" for k, x, y in zip(names, a[4], b[4]) if x != y]
        if now[-1] != self._captured_fingerprint[-1]:  # the entry after the modules': the global hooks
            out.append("a global module hook was added or removed")
        return out

    def _clipping(self, dp: DPSGD | None = None) -> tuple:
        """What the captured clipping baked in as constants: the mode, C and the per-layer thresholds."""
        dp = dp or self.dp
        per_layer = dp.ctx.clip or {}
        return dp.clipping, dp.max_grad_norm, tuple(per_layer.get(id(p)) for p in dp.params)

    def _check_captured(self) -> None:
        """Refuse to replay over parameters or buffers that are no longer where the capture read them, or with
        clipping thresholds other than the ones the capture baked in (the noise follows the engine's current
        C: replaying an older, larger C would add noise too small for the sensitivity)."""
        if attached_engine(self.dp.model) is not self.dp:
            raise ValueError("dp: this engine is no longer attached to its model (detached, or replaced by another "
                             "DPSGD): build a new GraphedAccumulator for the engine in use")
        if self._clipping() != self._captured_clipping:
            raise ValueError(
                f"dp: clipping changed since the CUDA graph was captured ({self._captured_clipping} -> "
                f"{self._clipping()}; the graph clips with the old thresholds): build a new GraphedAccumulator"
            )
        now = self._fingerprint()
        cache = sys.modules.get("fedlora_fast.kernels.ffa_linear")
        stale = cache.changed_base_weights(self._cached_weights) if cache is not None else []
        if stale:
            raise ValueError(f"model: {'; '.join(stale[:3])} changed since the CUDA graph was captured: build a new "
                             "GraphedAccumulator (or run without the cache)")
        if now != self._captured_fingerprint:
            memory = self._model_memory()
            moved = [n for (n, p), (m, q) in zip(memory, self._memory) if n != m or p != q]
            changes = ([f"{moved[:4]} replaced by other tensors"] if moved else []) + self._changes(now)
            raise ValueError(
                f"model: changed since the CUDA graph was captured, which would replay the old memory, "
                f"settings and hooks: {'; '.join(changes[:6])}. Copy new values in place (param.data.copy_(...), "
                "load_state_dict; with FEDLORA_FAST_KEEP_MERGED=cache not into frozen base weights), restore the "
                "settings (train/eval, merge, scale, dropout p, requires_grad), "
                "or build a new GraphedAccumulator"
            )

    def rebind(self, dp: DPSGD) -> None:
        """Feed a new engine on the same model from the same capture (a federated client builds one engine,
        with a fresh optimizer, per round: re-capturing would cost ``warmup + 2`` micro-batches each time).

        Raises:
            ValueError: ``dp`` is on another model, trains other tensors, or clips differently (the capture
                baked the old engine's clipping in).
        """
        if not isinstance(dp, DPSGD):
            raise TypeError(f"dp: expected a DPSGD engine, got {type(dp).__name__}")
        old = self.dp
        if dp.model is not old.model or [id(p) for p in dp.params] != [id(p) for p in old.params]:
            raise ValueError("dp: a GraphedAccumulator can only move to an engine on the same model and tensors")
        if self._captured and self._clipping(dp) != self._captured_clipping:
            raise ValueError(
                f"dp: clips differently ({self._captured_clipping} captured) -> build a new GraphedAccumulator"
            )
        self.dp = dp

    # --- the public step ---------------------------------------------------------------------------------
    def accumulate(self, batch: Any) -> int:
        """Clip-accumulate every sample of ``batch`` into the engine (as ``dp.accumulate()`` after each
        micro-batch's backward); returns the number of samples n (0: nothing done, step with
        ``dp.step(empty_batch=True)``). ``batch``: a tensor or a (nested) dict/list/tuple of tensors with the
        samples along dim 0; its per-sample shapes and dtypes must stay those of the first batch. It runs as
        the micro-batches ``plan(n)``. Tensors are copied into the fixed buffers with ``non_blocking=True``:
        a batch in pinned host memory is read by the device later, so it must not be modified in place until
        the step's device work has run (PyTorch's rule for asynchronous copies; DataLoader's pinned batches
        are fresh tensors each time)."""
        tensors, constants, spec, n = self._split(batch)
        if n == 0:  # nothing runs: an empty Poisson batch's non-tensor leaves are None and its value lists empty
            # (poisson_dataloader's stand-ins), so only its tensors are checked (or, first, fix the shapes), never
            # its structure or values
            self._fix_or_check_shapes(tensors)
            self.last_loss = None
            return 0
        if self._spec is None:  # the first batch with samples fixes the structure and the non-tensor values
            self._fix_or_check_shapes(tensors)
            self._spec, self._const = spec, constants
        self._check(tensors, constants, spec)
        if not torch.is_grad_enabled():
            raise RuntimeError("accumulate: grad mode is off (inside torch.no_grad() or inference_mode()): the "
                               "per-sample gradients need a backward; call it with grad enabled")
        if self._captured:
            self._check_captured()
        # all or nothing: the engine gets the batch's clipped sums only once every micro-batch has run (a
        # failure part-way, e.g. a capture refused for a new size, must not leave some samples clipped in
        # the step: a retry of the batch would count them twice)
        done, total, start = [], None, 0
        try:
            for size in self._planner.plan(n):
                k = min(size, n - start)
                slot = self._slot(size, tensors)
                self._fill(slot, tensors, start, k)
                start += k
                if not self.graph:
                    clipped, dropped, loss = self._device_work(slot)
                else:
                    with torch.cuda.device(self.device):  # the engine's GPU, whichever is current
                        if slot.graph is None:
                            self._capture(slot)
                        slot.graph.replay()
                    self.replays += 1
                    # the graph rewrites its outputs at every replay: the engine keeps copies
                    clipped, dropped, loss = (t.clone() for t in slot.out)
                done.append((clipped, dropped, k))
                total = loss if total is None else total + loss
        except BaseException:
            # a failure inside a micro-batch's forward/backward (eager, a capture, its warm-ups or read-back probe)
            # leaves its padded rows' per-sample state: a later dp.step() would clip it with no padding mask
            for p in self.dp.params:
                per_sample.clear(p)
                p.grad = None
            raise
        for clipped, dropped, k in done:
            self.dp._add_clipped(clipped, dropped, k)
        self.last_loss = total
        return n

"""Per-sample gradient state shared by the adapter layers, the per-sample head modules and ``DPSGD``.

A DP engine attaches one ``PerSampleContext`` to every module that computes per-sample gradients. In the
backward, each such module hands its per-sample results to ``store``, which keeps them on the parameter, in
one ``Pending`` record (``param.ff_pending``; ``pending(param)`` reads it):

- ``grad_sample``: (n, *param.shape) float32 per-sample gradients (flat clipping only), or ``Factors``: a trained
  embedding's looked-up ids and rows' gradients, a trained Linear's input and output gradient where those are
  smaller (n x T x (rows + cols) numbers, not n x rows x cols),
- ``clipped``: the float32 clipped sum ``sum_i c_i P_i`` (per-layer clipping only),
- ``norm2``: (n,) float32 squared per-sample norms (both modes),
- ``batch``: the forward pass (batch id) they came from; ``fwds``: the module forwards (``forward_id``).

The record refuses to be pickled or copied: whatever pickles the Parameter mid-step (``torch.save`` of the
model, of ``state_dict(keep_vars=True)`` or of an optimizer) fails instead of writing one sample's unclipped
gradient into a file.

With per-layer clipping the module clips inside its own backward; no per-sample gradient outlives the
layer. The clipped sum stays float32 until the noise is added (as flat clipping's does): rounded to a bf16
``.grad`` first, one sample could move a large sum by more than its threshold. Nothing reaches ``.grad``
from a per-sample module (zeros, under compiled autograd: ``_nothing``). Without a context (DP off) none of
this runs: modules take their plain, per-sample-free path.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedlora_fast.reference import (
    MODE_CLIP,
    MODE_PER_SAMPLE,
    ghost_clip_reduce,
    ghost_grad_sample,
    ghost_norm2,
)
from fedlora_fast.reference.ghost import is_ids

PS_ATTR = "ff_pending"  # the one attribute per-sample state lives in, on each trained Parameter
CONSUMED_KEPT = 1 << 16  # forward ids remembered as consumed; older ones fall under the watermark


@dataclass
class PerSampleContext:
    """What the per-sample modules need to know during a backward.

    Attributes:
        mode: MODE_PER_SAMPLE (flat clipping: keep every P_i) or MODE_CLIP (per-layer clipping).
        clip: per-tensor thresholds for MODE_CLIP, keyed by ``id(param)``.
        batch_id: incremented by the engine at every model forward, to tell a layer used twice in one
            forward (whose contributions add up) from a backward whose results were never consumed.
        forwards: counts the per-sample modules' forwards (``forward_id``): each backward result carries
            the id of the module forward it came from. Unlike ``batch_id`` it needs no hook on the model (a
            loss may call submodules directly) and recomputation (activation checkpointing) gets a new one.
        consumed: the module forwards whose per-sample gradients the engine has clipped into a step: a
            backward of one of them again (a retained graph) would count its samples twice, and is refused.
            Forwards not yet backwarded stay usable (several micro-batches' forwards, then their backwards).
            Only the latest ``CONSUMED_KEPT`` ids are kept; ``consumed_below`` refuses every older one.
        closed: the engine was detached (or replaced): a backward of a forward run under it has no engine
            to clip it, and is refused rather than clipped by another engine under other thresholds.
        failed: a per-sample module's own backward (an adapter's, a trained module's) raised: the per-sample
            gradients kept are those of the layers the backward reached before, part of each sample's gradient,
            and are not clipped. Cleared by the engine's ``zero_grad``, or by the next forward when nothing was
            kept. (An error raised by another node of the backward, a frozen layer's, is not seen.)
    """

    mode: int = MODE_PER_SAMPLE
    clip: dict[int, float] = field(default_factory=dict)
    batch_id: int = 0
    forwards: int = 0
    consumed: set[int] = field(default_factory=set)
    consumed_below: int = 0
    closed: bool = False
    failed: bool = False

    def consume(self, fwds: set[int]) -> None:
        """Mark these module forwards' per-sample gradients as clipped into a step."""
        self.consumed |= fwds
        if len(self.consumed) > CONSUMED_KEPT:  # bounded memory: forget the oldest half, refuse all below them
            keep = sorted(self.consumed)[-CONSUMED_KEPT // 2 :]
            self.consumed_below = keep[0]
            self.consumed = set(keep)

    def threshold(self, param: Tensor) -> float:
        """The per-layer threshold of ``param`` (MODE_CLIP); fails closed for a parameter it does not know."""
        if self.mode != MODE_CLIP:
            return 0.0  # unused: flat clipping happens in the engine, once every norm is known
        try:
            return self.clip[id(param)]
        except KeyError:
            raise PerSampleStateError(
                f"per-layer clipping has no threshold for a parameter of shape {tuple(param.shape)}: it was "
                "made trainable after the DP engine was built; build DPSGD after inject_adapters"
            ) from None


def forward_id(ctx: PerSampleContext) -> int:
    """A new id for one per-sample module forward (called in the module's autograd forward)."""
    ctx.forwards += 1
    return ctx.forwards


class PerSampleStateError(RuntimeError):
    """Per-sample gradients were produced but not consumed, or cannot be combined."""


_ESCAPE = (
    "a trained tensor holds per-sample gradients of a backward not yet stepped (each one sample's, unclipped): "
    "pickling or copying it (torch.save of the model, of state_dict(keep_vars=True) or of an optimizer; "
    "copy.deepcopy) would carry them out of the DP step; call dp.step() (or dp.zero_grad()) first"
)


class _Sealed:
    """Refuses pickling and copying (``PerSampleStateError``): it holds one sample's unclipped gradients."""

    __slots__ = ()

    def __reduce_ex__(self, protocol):
        raise PerSampleStateError(_ESCAPE)

    def __copy__(self):
        raise PerSampleStateError(_ESCAPE)

    def __deepcopy__(self, memo):
        raise PerSampleStateError(_ESCAPE)


class Pending(_Sealed):
    """One backward's per-sample results on a trained tensor (``param.ff_pending``, module docstring).

    Refuses pickling and copying (``PerSampleStateError``): what pickles the Parameter mid-step would otherwise
    write every sample's unclipped gradient with it (a Parameter pickles its ``__dict__``).
    """

    __slots__ = ("grad_sample", "clipped", "norm2", "batch", "fwds")

    def __init__(self, grad_sample: Tensor | None, norm2: Tensor, batch: int, fwds: set[int]):
        self.grad_sample, self.clipped, self.norm2, self.batch, self.fwds = grad_sample, None, norm2, batch, fwds


class Factors(_Sealed):
    """Per-sample gradients of one trained tensor kept as their factors, not as (n, rows, cols)
    (``fedlora_fast.reference.ghost``): ``P_i = sum over terms of left_i^T right_i``, a term ``(g, x)`` for a
    Linear's weight, ``(ids, g)`` for a lookup table (one-hot rows).

    ``shape`` is the dense shape (n, rows, cols). Two uses of one tensor in a forward add up: their tokens side
    by side (``+``, exact), at most one term of ids and one dense. Refuses pickling and copying, as ``Pending``.
    """

    __slots__ = ("terms", "rows", "_norm2", "_versions")

    def __init__(self, terms: list[tuple[Tensor, Tensor]], rows: int):
        for left, right in terms:
            if left.shape[:2] != right.shape[:2] or right.dim() != 3 or left.dim() != (2 if is_ids(left) else 3):
                raise ValueError(f"Factors: a term's left {tuple(left.shape)} and right {tuple(right.shape)} must "
                                 "be (n, T) ids or (n, T, rows), and (n, T, cols)")
        self.terms = [(left.long() if is_ids(left) else left.float(), right.float()) for left, right in terms]
        self.rows, self._norm2 = rows, None
        # the norms are taken now, the clipped sum at the step: a factor changed in place in between (a reused
        # input buffer) would be summed under the old norm's coefficient, beyond C. The rules keep copies of
        # what the caller owns; the version counters catch the rest, except writes that bypass them (through
        # .data, numpy or DLPack) to an output gradient the caller passed to backward() and kept.
        self._versions = [t._version for pair in self.terms for t in pair]

    def _check_unchanged(self) -> None:
        if [t._version for pair in self.terms for t in pair] != self._versions:
            raise PerSampleStateError(
                "a tensor a trained module's per-sample gradient was kept as (its input, or its output's gradient) "
                "was changed in place after the backward: its clipped sum would no longer match the norm it was "
                "clipped by; call dp.zero_grad() and run the batch again, and leave a batch's tensors unchanged "
                "until dp.step() (or dp.accumulate())"
            )

    @property
    def shape(self) -> torch.Size:
        right = self.terms[0][1]
        return torch.Size((right.shape[0], self.rows, right.shape[2]))

    def norm2(self) -> Tensor:
        if self._norm2 is None:
            self._norm2 = ghost_norm2(self.terms)
        return self._norm2

    def clip_reduce(self, coef: Tensor) -> Tensor:
        """``sum_i coef_i P_i``, (rows, cols) float32 (samples with coefficient 0 skipped; a sample whose tokens
        cancel capped: ``fedlora_fast.reference.ghost``)."""
        self._check_unchanged()
        return ghost_clip_reduce(self.terms, coef, self.rows, self.norm2())

    def dense(self) -> Tensor:
        self._check_unchanged()
        return ghost_grad_sample(self.terms, self.rows)

    def __add__(self, other: "Factors") -> "Factors":
        """The per-sample sum of two uses of the tensor in one forward (its shape checked by ``store``)."""
        kinds: dict[bool, tuple[Tensor, Tensor]] = {}
        for left, right in self.terms + other.terms:
            held = kinds.get(is_ids(left))
            kinds[is_ids(left)] = (left, right) if held is None else (torch.cat([held[0], left], 1),
                                                                      torch.cat([held[1], right], 1))
        return Factors(list(kinds.values()), self.rows)


def dense_grad_sample(gs: "Tensor | Factors") -> Tensor:
    """A record's ``grad_sample`` as a dense (n, *param.shape) tensor (``Factors`` expanded)."""
    return gs.dense() if isinstance(gs, Factors) else gs


def squared_norms(gs: "Tensor | Factors") -> Tensor:
    """(n,) squared norms of per-sample gradients (dense or ``Factors``)."""
    return gs.norm2() if isinstance(gs, Factors) else gs.flatten(1).pow(2).sum(1)


def state_for_copy(module) -> dict:
    """``module.__dict__`` for ``copy.deepcopy`` and pickling (the ``__getstate__`` of the per-sample modules).

    The copy is not under the DP engine: its ``ps_ctx`` is None (the engine's context stays with the original,
    and the engine's hooks, which hold its noise generator, become no-ops in a copy: ``DPSGD``). A module whose
    tensors hold a backward's per-sample gradients, not yet clipped by a step, is refused: those are one
    sample's data each, unclipped, and a copy or a file (``torch.save(model)``) would carry them out of the step.
    (What pickles the Parameters themselves mid-step, such as ``state_dict(keep_vars=True)`` or an
    optimizer, is refused by their ``Pending`` record.)

    Raises:
        PerSampleStateError: per-sample gradients are pending on the module's own tensors.
    """
    pending_names = [n for n, p in module.named_parameters(recurse=False) if has_state(p)]
    if pending_names:
        raise PerSampleStateError(
            f"{type(module).__name__}: its tensors {pending_names} hold per-sample gradients of a backward not yet "
            "stepped (each one sample's, unclipped): a copy or a pickle would carry them out of the DP step; call "
            "dp.step() (or dp.zero_grad()) first"
        )
    state = torch.nn.Module.__getstate__(module)  # (drops a .compile()d call bound to the original module)
    state["ps_ctx"] = None
    return state


def pending(param: Tensor) -> Pending | None:
    """The per-sample results ``param`` holds from a backward not yet consumed, or None."""
    return getattr(param, PS_ATTR, None)


def has_state(param: Tensor) -> bool:
    return getattr(param, PS_ATTR, None) is not None


def clear(param: Tensor) -> None:
    if getattr(param, PS_ATTR, None) is not None:
        setattr(param, PS_ATTR, None)


def store(
    param: Tensor, ctx: PerSampleContext, batch_id: int, grad_sample: Tensor | Factors | None, norm2: Tensor,
    fwd: int
) -> Pending:
    """Keep one backward's per-sample results on ``param`` (returns its new ``Pending`` record).

    Args:
        grad_sample: (n, *param.shape) per-sample gradients, or a ``Factors`` (flat mode); None in per-layer
            mode.
        norm2: (n,) squared norms of those per-sample gradients.
        batch_id: ``ctx.batch_id`` captured at the forward that produced them.
        fwd: the module forward's ``forward_id``.
    Raises:
        PerSampleStateError: state from an earlier forward was not consumed by the engine, or a layer
            used twice in one forward under per-layer clipping (its clip would not be per sample).
    """
    if ctx.closed:
        raise PerSampleStateError(
            "a backward of a forward run under a DP engine that has since been detached (or replaced): its "
            "per-sample gradients have no engine to clip them; run the forward again under the current engine"
        )
    if fwd in ctx.consumed or fwd < ctx.consumed_below:
        raise PerSampleStateError(
            "a second backward through a forward whose per-sample gradients were already clipped into the "
            "step (a retained graph): its samples would count twice; run the forward again"
        )
    held = pending(param)
    if held is not None:
        if held.batch != batch_id:
            raise PerSampleStateError(
                "per-sample gradients of an earlier batch were never consumed: call dp.step() (or "
                "dp.accumulate() for micro-batches) after each backward, before the next forward. A loss that "
                "runs the model more than once per backward (siamese or consistency losses) is not supported: "
                "each sample's gradient would span two forwards"
            )
        if ctx.mode == MODE_CLIP or grad_sample is None:
            raise PerSampleStateError(
                "a module was used twice in one forward; per-layer clipping cannot clip it inside its "
                "backward (the sample's gradient is the sum of both uses): use clipping='flat'"
            )
        if held.grad_sample.shape != grad_sample.shape:
            raise PerSampleStateError(
                f"per-sample gradients of one forward disagree in shape: {tuple(held.grad_sample.shape)} "
                f"vs {tuple(grad_sample.shape)}"
            )
        if isinstance(held.grad_sample, Factors) and isinstance(grad_sample, Factors):
            grad_sample = held.grad_sample + grad_sample  # (a tied lm_head and its embedding: two terms)
        else:
            grad_sample = dense_grad_sample(held.grad_sample) + dense_grad_sample(grad_sample)
        norm2 = squared_norms(grad_sample)
        fwds = held.fwds | {fwd}
    else:
        fwds = {fwd}
    record = Pending(grad_sample, norm2.float(), batch_id, fwds)
    setattr(param, PS_ATTR, record)
    return record


def param_result(
    param: Tensor, ctx: PerSampleContext | None, batch_id: int, grad: Tensor, norm2: Tensor, fwd: int
) -> Tensor | None:
    """Keep a per-sample backward result on ``param``; returns what autograd should accumulate in ``.grad``:
    nothing (None) in both modes, or zeros under compiled autograd (``_nothing``).

    ``grad`` is (n, *shape) (or a ``Factors``) in flat mode and the clipped sum in per-layer mode (kept
    float32, with the norms).
    """
    if ctx.mode == MODE_PER_SAMPLE:
        store(param, ctx, batch_id, grad if isinstance(grad, Factors) else grad.float(), norm2, fwd)
    else:
        store(param, ctx, batch_id, None, norm2, fwd).clipped = grad.float()
    return _nothing(param)


def _nothing(param: Tensor) -> Tensor | None:
    """The "no gradient" a per-sample backward hands autograd for ``param``: None, except under compiled
    autograd, where it is a zero tensor (a stride-0 view of one zero).

    Compiled autograd traces the sum of a tensor's gradients from two uses (a layer run twice in one forward)
    as ``torch.add`` of the two backward outputs before it knows them: a None there crashed with a TypeError.
    Zeros add up to zeros; the engine drops them as it drops every ``.grad`` (``DPSGD._warn_outside_grads``
    names only non-zero ones)."""
    ca = sys.modules.get("torch._dynamo.compiled_autograd")  # not imported: compiled autograd cannot be on
    if ca is None or not ca.in_compiled_autograd_region:
        return None
    return param.new_zeros(()).expand(param.shape)


def active(ctx: PerSampleContext | None) -> bool:
    return ctx is not None and torch.is_grad_enabled()


def input_nodes(ctx, k: int) -> tuple:
    """The gradient nodes (AccumulateGrad for a leaf; None for a tensor that needs no gradient) of the last
    ``k`` tensor inputs of the custom Function whose backward is running, for ``accumulates``.

    ``ctx`` is the Function's own graph node there: its edges are its tensor inputs' gradient nodes, in
    order (non-tensor arguments and ``None`` have none). Read in the backward, they cost nothing in the
    forward (``torch.autograd.graph.get_gradient_edge`` per tensor cost ~4 us each on the host's critical
    path). A backward traced without a graph node (no ``next_functions``) keeps the state (as before)."""
    edges = getattr(ctx, "next_functions", None)
    if edges is None or len(edges) < k:
        return (None,) * k
    return tuple(node for node, _ in edges[len(edges) - k :])


def accumulates(node) -> bool:
    """Whether the running backward delivers a gradient through ``node`` (``input_nodes``).

    ``torch.autograd.grad(loss, x)`` and ``loss.backward(inputs=[x])`` run the layers' backward for x's
    gradient only: the engine skips the parameters' gradient nodes, so a per-sample result stored then would
    be a gradient nobody asked for, counted into the next step (a retained graph's second, input-only
    backward doubled every norm and clipped sum). ``autograd.grad(loss, [param])`` asks for the parameter
    itself: it counts as delivered (the engine cannot tell for a leaf then, and raises)."""
    if node is None:
        return True
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:  # "a leaf node was passed ... while running autograd.grad()": the leaf is an input
        return True


def failing(ctx: PerSampleContext | None):
    """Wrap a per-sample backward: an exception from it marks ``ctx`` failed (``PerSampleContext.failed``)."""
    return _Failing(ctx)


class _Failing:
    __slots__ = ("ctx",)

    def __init__(self, ctx):
        self.ctx = ctx

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is not None and self.ctx is not None:
            self.ctx.failed = True
        return False

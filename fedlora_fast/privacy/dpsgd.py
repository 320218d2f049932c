"""DP-SGD over the adapters: per-sample clipping (flat or per-layer), Gaussian noise, one optimizer step.

Follows Abadi et al. 2016 (DP-SGD) and opacus's ``DPOptimizer`` staging (``clip_and_accumulate -> add_noise ->
scale_grad -> step``): ``g = (sum_i c_i P_i + sigma S xi) / m`` with ``c_i = min(1, C / (N_i + 1e-6))``, ``xi ~
N(0, I)``, ``m`` the expected batch size and ``S`` the sensitivity of the clipped sum (``C`` flat; per-layer
``sqrt(sum_l C_l^2) <= C``: the noise is ``sigma S``, which is ``sigma C`` with the default thresholds).
Per-sample gradients come from the fused backward of the adapter layers (and the per-sample head modules) in the
same backward pass as the loss gradient; nothing is computed twice. Flat clipping keeps each tensor's P until
every norm is known; per-layer clipping clips inside each layer's backward with threshold ``C_l`` (default ``C /
sqrt(L)`` for L tensors).

Large logical batches: ``accumulate()`` after each physical micro-batch's backward (every sample clipped
once, clipped sums added), then one ``step()``: noise once, one accountant step. Poisson sampling
(``fedlora_fast.privacy.sampling``) is what the accountant assumes; empty batches step with noise only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
import warnings
import weakref
from collections.abc import Mapping
from typing import Callable

import torch
from torch import Tensor, nn

from fedlora_fast import per_sample
from fedlora_fast.layers.ffa_linear import FFALoRALinear
from fedlora_fast.layers.per_sample_modules import _PerSampleMixin
from fedlora_fast.ops.ffa_linear import call, ffa_linear_clip_reduce
from fedlora_fast.privacy import group
from fedlora_fast.privacy.accounting import ACCOUNTANTS, Accountant, check_sample_rate
from fedlora_fast.privacy.sampling import os_normal
from fedlora_fast.reference import MODE_CLIP, MODE_PER_SAMPLE, clip_coef

log = logging.getLogger(__name__)

CLIPPING = ("flat", "per_layer")
# device type -> whether flat clipping concatenates the tensors' per-sample gradients (in groups of up to
# GROUP_BYTES) and clip-reduces each group in one launch (see DPSGD._clip_flat); tests flip both
GROUPED_CLIP_REDUCE = {"cuda": True}
GROUP_BYTES = 64 << 20
UNREACHED_WARNINGS = 3  # sets of trained tensors without a per-sample gradient named per engine
# device type -> whether the count of dropped (non-finite) samples stays on the device and reaches the host
# later, without a sync in the step (see _DroppedCounter); tests flip it
DEFERRED_DROP_COUNT = {"cuda": True}


class _DroppedCounter:
    """Samples dropped for a non-finite per-sample gradient norm: counted, and warned about.

    Where ``DEFERRED_DROP_COUNT`` says so (CUDA), a micro-batch's count stays a device tensor: ``end_step``
    sends the step's count to the host with a non-blocking copy, and it is read back (and warned about) once
    it has arrived, at a later step or when a total is asked for. Reading it at once would stall the host
    until the GPU has finished the whole backward at every micro-batch. Elsewhere (CPU) it is read at once.
    Dropping itself never waits for this: the sample's clipping coefficient is 0 on the device.
    """

    def __init__(self, device: torch.device):
        self.deferred = DEFERRED_DROP_COUNT.get(device.type, False)
        self.total = 0  # counts read back so far (every micro-batch, stepped or discarded)
        self.last_step = 0  # of the last step read back
        self._pending: list[tuple[int | Tensor, int]] = []  # this step's micro-batches: (count, n)
        self._inflight: list[tuple[Tensor | None, Callable[[], bool], Callable[[], None], int, int, bool]] = []

    def add(self, bad: Tensor, n: int) -> None:
        """One micro-batch of ``n`` samples, ``bad`` (0-dim) of them dropped."""
        if not self.deferred:
            k = int(bad)
            self._warn(k, n)
            self.total += k
            bad = k
        self._pending.append((bad, n))

    def end_step(self, stepped: bool) -> None:
        """The pending micro-batches were stepped (``stepped``) or discarded (``zero_grad``)."""
        pending, self._pending = self._pending, []
        if not pending and not stepped:
            return  # nothing discarded
        if not self.deferred:
            if stepped:
                self.last_step = sum(k for k, _ in pending)
            return
        n = sum(m for _, m in pending)
        if pending:
            count = pending[0][0] if len(pending) == 1 else torch.stack([k for k, _ in pending]).sum()
            host, ready, wait = self._transfer(count)
        else:
            host, ready, wait = None, (lambda: True), (lambda: None)
        self._inflight.append((host, ready, wait, n, len(pending), stepped))
        self.reap(block=False)

    @staticmethod
    def _transfer(count: Tensor) -> tuple[Tensor, Callable[[], bool], Callable[[], None]]:
        """A host copy of the device scalar ``count`` that is filled without blocking: (copy, arrived?, wait)."""
        if count.device.type != "cuda":  # another accelerator: a plain (blocking) copy
            host = count.to("cpu")
            return host, (lambda: True), (lambda: None)
        host = torch.empty((), dtype=count.dtype, device="cpu", pin_memory=True)
        host.copy_(count, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event.query, event.synchronize

    def reap(self, block: bool) -> None:
        """Read back the counts that have arrived (all of them, waiting if ``block``), oldest first."""
        while self._inflight:
            host, ready, wait, n, batches, stepped = self._inflight[0]
            if not block and not ready():
                return
            wait()
            self._inflight.pop(0)
            k = int(host) if host is not None else 0
            self._warn(k, n, batches)
            self.total += k
            if stepped:
                self.last_step = k

    @staticmethod
    def _warn(k: int, n: int, batches: int = 1) -> None:
        if k:
            log.warning(
                "DPSGD: dropped %d of %d sample(s) with non-finite per-sample gradient norms%s",
                k, n, "" if batches == 1 else f" (over {batches} micro-batches)",
            )


def _check_positive(name: str, value: float, allow_zero: bool = False) -> float:
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected a finite number {bound}, got {value!r}")
    return v


# The smallest clipping threshold. A clipped gradient is c_i P_i with c_i = C / (N_i + 1e-6) in float32: c_i
# must stay a normal float32, or it rounds to a multiple of 2^-149 (a reviewer's C = 2^-100 with N_i ~ C 2^149
# gave a clipped norm of 1.9 C against noise for C); a float32 norm is below 2^64 (beyond: inf, the sample is
# dropped), so C >= 2^-60 keeps c_i >= 2^-124. The entries' own roundings (subnormal ones: 2^-150 absolute) then
# add at most float32's relative rounding. (2^-100 first, 2026-11-28: it bounded the entries, not c_i.)
MIN_CLIP_NORM = 2.0**-60  # ~8.7e-19


def check_clip_norm(name: str, value: float) -> float:
    """A clipping threshold: a finite number of at least ``MIN_CLIP_NORM``."""
    v = _check_positive(name, value)
    if v < MIN_CLIP_NORM:
        raise ValueError(
            f"{name}: expected at least {MIN_CLIP_NORM:.3g} (2^-60: below, float32 rounding of the clip coefficient "
            f"is no longer small, and a sample's clipped norm can exceed the threshold), got {value!r}"
        )
    return v


def per_layer_thresholds(max_grad_norm: float, num_tensors: int) -> list[float]:
    """Per-layer clipping's default thresholds: ``max_grad_norm / sqrt(L)`` for each of the L trainable tensors
    (``sqrt(sum C_l^2) = C``), refused by ``max_grad_norm``'s name where they fall below ``MIN_CLIP_NORM``."""
    c = max_grad_norm / math.sqrt(num_tensors)
    if c < MIN_CLIP_NORM:
        raise ValueError(
            f"max_grad_norm: with clipping='per_layer' each of the {num_tensors} trainable tensors is clipped to "
            f"max_grad_norm / sqrt({num_tensors}) = {c:.3g}, below the floor {MIN_CLIP_NORM:.3g} (2^-60, see "
            f"check_clip_norm); expected max_grad_norm of at least {MIN_CLIP_NORM * math.sqrt(num_tensors):.3g}, "
            f"got {max_grad_norm!r}"
        )
    return [c] * num_tensors


# The largest noise std sigma * C: the noise is drawn in float32 (as the clipped sum is kept), and a draw of
# a few dozen std must still be finite there, else the step would write inf/NaN into every trained tensor.
MAX_NOISE_STD = torch.finfo(torch.float32).max / 64  # ~5.3e36


def _check_noise_std(noise_multiplier: float, max_grad_norm: float, expected_batch_size: int | None = None,
                     dtypes=()) -> None:
    """Refuse noise that cannot be represented: sigma C beyond float32 (the noise and the clipped sum), and
    sigma C / m beyond a trained tensor's own dtype (``.grad`` is the noisy sum / m cast to it: a float16 B,
    whose largest value is 65504, would get inf from a noise std of ~1e3 m)."""
    std = noise_multiplier * max_grad_norm
    if std > MAX_NOISE_STD:
        raise ValueError(
            f"noise_multiplier * max_grad_norm: expected at most {MAX_NOISE_STD:.3g} (the noise is float32), got "
            f"{noise_multiplier!r} * {max_grad_norm!r} = {std:.3g}"
        )
    if expected_batch_size is None:
        return
    for dtype in dtypes:
        top = torch.finfo(dtype).max / 64
        if top < MAX_NOISE_STD and std / expected_batch_size > top:
            raise ValueError(
                f"noise_multiplier * max_grad_norm / expected_batch_size: expected at most {top:.3g} for trained "
                f"tensors of dtype {dtype} (their .grad is the noisy sum / m in that dtype), got {noise_multiplier!r}"
                f" * {max_grad_norm!r} / {expected_batch_size!r} = {std / expected_batch_size:.3g}: keep the "
                "trained tensors float32 (FFALoRALinear's B is float32 unless cast), or lower sigma C"
            )


def _check_batch_size(m) -> None:
    if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
        raise ValueError(f"expected_batch_size: expected a positive int, got {m!r}")


# model -> weakref(engine); weak both ways so that neither keeps the other alive
_ENGINES: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def attached_engine(model: nn.Module) -> "DPSGD | None":
    """The ``DPSGD`` engine currently attached to ``model``, if any."""
    ref = _ENGINES.get(model)
    engine = ref() if ref is not None else None
    return engine if engine is not None and engine._hooks else None


class _NoHook:
    """What an engine's hook becomes in a copy or a pickle of the model (``_EngineHook``)."""

    def __call__(self, module, *args):
        return None


class _EngineHook:
    """A forward pre-hook calling one of its engine's methods. The model holds the engine through it (an engine
    lives as long as its model uses it); a ``copy.deepcopy`` or a pickle of the model gets a ``_NoHook`` in its
    place: the copy is not under the engine (its layers' ``ps_ctx`` is None too: ``per_sample.state_for_copy``),
    and ``torch.save(model)`` must not write the engine, whose noise generator is the noise's secret."""

    def __init__(self, method):
        self.method = method

    def __call__(self, module, *args):  # (args) or, registered with_kwargs, (args, kwargs)
        return self.method(module, *args)

    def __reduce__(self):
        return (_NoHook, ())


class _WeakEngineHook(_EngineHook):
    """An ``_EngineHook`` that does not keep its engine alive (a no-op once the engine is gone)."""

    def __init__(self, method):
        self.method = weakref.WeakMethod(method)

    def __call__(self, *args):
        method = self.method()
        return None if method is None else method(*args)


def _torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The innermost torch optimizer under wrappers that hold one as ``.optimizer`` (accelerate's)."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def _calling_grad_scaler():
    """An enabled ``torch.amp.GradScaler`` whose ``step`` is on the call stack (the optimizer step pre-hook's
    caller, a few frames up), or None."""
    scalers = tuple(c for c in (getattr(torch.amp, "GradScaler", None),
                                getattr(getattr(torch.cuda, "amp", None), "GradScaler", None)) if isinstance(c, type))
    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if scalers and isinstance(owner, scalers) and owner.is_enabled():
            return owner
        frame = frame.f_back
    return None


def _trained_device(model) -> torch.device:
    """The device of ``model``'s first trainable tensor (CPU where it has none: ``DPSGD`` refuses it then)."""
    params = model.parameters() if isinstance(model, nn.Module) else ()
    return next((p.device for p in params if p.requires_grad), torch.device("cpu"))


_SAMPLE_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")
# keyword arguments of a packed (padding-free) batch: several sequences in one row, which DPSGD would clip as one
_PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens", "seq_idx")
_WALK_LIMIT = 256  # tensors looked at for a keyed input before settling for the first one (a KV cache, say)


def _tensors(obj, path: tuple, depth: int = 0):
    """(path, tensor) for every tensor in ``obj``, depth first: mappings, lists, tuples and dataclasses are
    opened (a model's batch as one argument: a dict, a ``BatchEncoding``, an ``(x, y)`` pair, a dataclass). A
    ``PackedSequence`` is refused: its rows are tokens of several sequences."""
    if isinstance(obj, Tensor):
        yield path, obj
    elif isinstance(obj, nn.utils.rnn.PackedSequence):
        raise ValueError(
            f"model: called with a PackedSequence ({_path_str(path)}): its rows are the tokens of all sequences, "
            "and DPSGD would clip each as a sample. Pass a padded batch (one sequence per row)"
        )
    elif depth >= 4:
        return
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _tensors(v, (*path, k), depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, (*path, i), depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name, None), (*path, f".{f.name}"), depth + 1)


def _path_str(path: tuple) -> str:
    """``("positional argument 0", "x", 1, ".a")`` -> ``positional argument 0['x'][1].a`` (a keyword: its name)."""
    head, *rest = path
    return str(head) + "".join(k if isinstance(k, str) and k.startswith(".") else f"[{k!r}]" for k in rest)


def _model_samples(args: tuple, kwargs: dict) -> tuple[int, str] | None:
    """The number of samples in a model call and where it was read: dim 0 of the Hugging Face input
    (``input_ids``, ``inputs_embeds``, ``pixel_values``, ``input_values``, ``input_features``, as a keyword or
    a key anywhere in the call's dicts), else of the call's first tensor (positional arguments first, opening
    dicts, lists, tuples and dataclasses, 4 levels deep). None: the call holds no tensor with a dim 0."""
    for key in _SAMPLE_KEYS:  # the usual call, model(**batch): no walk
        t = kwargs.get(key)
        if isinstance(t, Tensor) and t.dim() >= 1:
            return int(t.shape[0]), key
    first = keyed = None
    walks = [_tensors(a, (f"positional argument {i}",)) for i, a in enumerate(args)]
    walks += [_tensors(v, (k,)) for k, v in kwargs.items()]
    seen = 0
    for path, t in (item for walk in walks for item in walk):
        if t.dim() < 1:
            continue
        first = first or (path, t)
        rank = _SAMPLE_KEYS.index(path[-1]) if path[-1] in _SAMPLE_KEYS else None
        if rank is not None and (keyed is None or rank < keyed[0]):
            keyed = (rank, path, t)
        seen += 1
        if seen >= _WALK_LIMIT:
            break
    path, t = keyed[1:] if keyed is not None else first or (None, None)
    return None if t is None else (int(t.shape[0]), _path_str(path))


def _gathered_rows(model: nn.Module, trained: list[str]) -> list[str]:
    """Of the trained per-sample modules ``trained``, those whose rows are tokens gathered from the whole batch
    rather than samples, named by where they sit: a mixture of experts' routed experts (``...experts.3.wi``:
    the tokens routed to that expert; Switch Transformers, NLLB-MoE, older Mixtral and Qwen-MoE), and the
    masked-token head of ``ModernBertForMaskedLM`` with ``sparse_prediction`` (the masked tokens). ``_check_rows``
    sees them only when the gathered count differs from the batch's."""
    out = [n for n in trained if "experts" in n.split(".")]
    return out + _trained_under(
        model, trained, out, ("head", "decoder"),
        lambda sub: type(sub).__name__ == "ModernBertForMaskedLM" and getattr(sub.config, "sparse_prediction", False))


def _trained_under(model: nn.Module, trained: list[str], found: list[str], children: tuple[str, ...],
                   match: Callable[[nn.Module], bool]) -> list[str]:
    """Of ``trained`` (not already ``found``), the modules that are, or sit under, the given ``children`` of any
    module of ``model`` for which ``match(module)`` holds."""
    out: list[str] = []
    for prefix, sub in model.named_modules():
        if match(sub):
            heads = tuple(f"{prefix}.{c}" if prefix else c for c in children)
            under = tuple(h + "." for h in heads)
            out += [n for n in trained if n not in found and n not in out and (n in heads or n.startswith(under))]
    return out


def _position_rows(model: nn.Module, trained: list[str]) -> list[str]:
    """Of ``trained``, the modules whose rows are positions shared by the whole batch, not samples: the T5 family's
    ``relative_attention_bias`` (looked up with (query, key) buckets, broadcast over the batch) and DeBERTa's
    relative embeddings (``rel_embeddings``, read as a weight, and the encoder's ``LayerNorm`` over them).
    ``_check_rows`` sees them only when the batch's size differs from their row count (n = T for T5)."""
    out = [n for n in trained if "relative_attention_bias" in n.split(".")]
    deberta = ("DebertaEncoder", "DebertaV2Encoder")
    return out + _trained_under(model, trained, out, ("rel_embeddings", "LayerNorm"),
                                lambda sub: type(sub).__name__ in deberta and getattr(sub, "relative_attention", False))


# modules whose output for one sample can depend on the batch's other samples: class name -> whether it does now
_BATCH_MIXERS = {
    # the expert capacity is counted over the whole batch's tokens: other samples decide which of this
    # sample's tokens reach their expert (none is dropped in eval mode with a capacity fraction >= 1)
    "NllbMoeTop2Router": lambda m: m.training or not m.moe_eval_capacity_token_fraction >= 1,
}


def per_sample_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules of ``model`` that compute per-sample gradients (adapters and per-sample heads)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (FFALoRALinear, _PerSampleMixin))}


class DPSGD:
    """Differentially private SGD step over a model's trainable adapter tensors.

    Typical loop (Poisson batches from ``poisson_dataloader``)::

        dp = DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=0.9, expected_batch_size=round(q * N),
                   sample_rate=q)                       # accountant="rdp" by default when q is given
        for batch in loader:
            if batch_size(batch) == 0:
                dp.step(empty_batch=True)                # noise only; still one accountant step
            else:
                for mb in micro_batches(batch, 16):      # large logical batch, small physical ones
                    loss_fn(model, mb).backward()        # loss summed over the micro-batch's samples
                    dp.accumulate()
                dp.step()
            dp.zero_grad()
        dp.epsilon(1e-5)

    The loss must be a **sum** over the micro-batch's samples (or a mean with a fixed divisor, such as the
    expected batch size): never ``loss.mean()`` over the actual batch. With the actual n as divisor, one
    sample's presence rescales every other sample's gradient, and the step's sum can move by up to about 2C
    when one sample is removed (the noise is calibrated to C). A mean over tokens *within* a sample is fine.
    Dim 0 of every adapted or trained layer's input must be the sample. A layer that sees samples folded into rows
    (OPT's ``fc1``/``fc2``, MoE shared experts, multiple-choice models: n samples -> n·T or n·c rows) or a
    sequence-first layout (XLNet, FSMT) would be clipped per row, which bounds no sample's contribution by C: the
    engine compares every trained tensor's per-sample rows with dim 0 of the model's input (``_model_samples``) and
    refuses the step, naming them, and refuses gradients of a forward it cannot count (fails closed). Layers fed
    tokens gathered from the batch (routed experts, a sparse masked-LM head: ``_gathered_rows``) are refused when
    the engine is built, packed batches (``cu_seq_lens_*``, ``seq_idx``, a ``PackedSequence``) and a batch-wide
    expert capacity (``_BATCH_MIXERS``) at the forward. Under reentrant activation checkpointing only one forward
    may be open per clip (a recomputed layer's gradients cannot tell their forward). It cannot see a sequence-first
    layer in a batch of as many samples as positions, a model whose own input is sequence-first
    (``nn.TransformerEncoderLayer(batch_first=False)``), nor sequences packed into a row by ``position_ids`` alone.
    Likewise each backward must follow one call of the model on one batch: a loss that runs the whole model twice is
    refused, but one that calls its *submodules* on two chunks of the size of the model's last call, then one
    backward, cannot be told apart from weight sharing, and row i of each chunk would be clipped as one sample.
    Per-sample gradients, norms, clipped sums and noise are float32, also for a float64 model.

    The optimizer steps once per release: an optimizer step with no ``scale_grad()`` (or ``step()``) since the last
    one is refused (an extra ``optimizer.step()`` after ``step()`` would apply the same noisy gradient twice; a
    framework's own step, e.g. ``transformers.Trainer``'s, needs the release first), and so is a step through an
    enabled ``torch.amp.GradScaler``: its loss scale multiplies every per-sample gradient before the clip (C would
    mean C / scale), and the engine's finite ``.grad`` never lets it back off. Use bf16 autocast, or fp16 autocast
    without a scaler. accelerate's gradient accumulation: ``accumulate()`` on the micro-batches that do not sync,
    ``step()`` on the one that does (``step()`` refuses while accelerate is accumulating).

    Args:
        model: a model with adapters from ``inject_adapters`` (and optional ``trainable_modules``).
        optimizer: any torch optimizer over the model's trainable parameters.
        max_grad_norm: clipping threshold C (flat: over all trainable tensors of a sample).
        noise_multiplier: sigma; the noise std is ``sigma * S`` for the clipped sum's sensitivity S (``C``; per-layer
            ``sqrt(sum C_l^2)``, which is C with the default thresholds). 0 disables noise (no privacy: epsilon
            inf).
        expected_batch_size: m, the divisor (with Poisson sampling: ``q * dataset size``).
        clipping: ``"flat"`` or ``"per_layer"``.
        generator: the noise generator (on the parameters' device). None (default): the noise from the
            operating system's cryptographically secure generator at every draw (``sampling.os_normal``: on a CPU
            ``os.urandom``, on CUDA a ChaCha20 keystream under a fresh key from it; a generator's stream is
            predictable from a release of noise alone). Reproducible runs only: pass a seeded one, or
            ``noise_seed``; either is logged as a warning.
        per_layer_max_grad_norm: per-tensor thresholds (a list in ``parameters()`` order) for per-layer
            clipping; default ``C / sqrt(L)`` each. ``sqrt(sum C_l^2)`` must not exceed C.
        sample_rate: Poisson sampling rate q of the batches; required for privacy accounting.
        accountant: ``"rdp"`` or ``"prv"`` (a new ``Accountant``), or an ``Accountant`` to continue (a
            federated client passes its one accountant to every round's engine). Default: ``"rdp"`` when
            ``sample_rate`` is given, else no accounting.
        noise_seed: an explicit seed for the noise generator (reproducible experiments only).
        secure_mode: draw each step's noise from the OS's secure generator (as the default does), as the sum of
            four normals scaled by 1/2 (opacus's secure mode: Holohan & Braghin, arXiv 2107.10138, against the
            floating-point attack on Gaussian samplers of arXiv 2112.05307). About 4x the noise cost; excludes
            ``generator``/``noise_seed``.
        process_group: a ``torch.distributed`` process group for data-parallel training (one silo's GPUs, say;
            ``fedlora_fast.privacy.group``). Each process Poisson-samples its own disjoint shard of the data at
            ``sample_rate``; ``expected_batch_size`` is the group's (q times the whole data's size). Each
            process clips its own samples, the clipped sums are summed over the group (one ``all_reduce`` per
            step) and the group's rank 0 alone adds the noise, so the release is the single-process one. Every
            process calls ``step`` once per step (``step(empty_batch=True)`` for an empty batch). Settings and
            the trained tensors' values must be the same on every process (checked when built; the settings
            again before every release). Per-process: ``clipped_sum``, ``last_step_samples``, the dropped
            counts. Default None: this process alone.
    Raises:
        ValueError: out-of-range arguments, an accountant without ``sample_rate``, trainable parameters
            without per-sample gradients, an optimizer missing trainable parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        max_grad_norm: float,
        noise_multiplier: float,
        expected_batch_size: int,
        clipping: str = "flat",
        generator: torch.Generator | None = None,
        per_layer_max_grad_norm: list[float] | None = None,
        sample_rate: float | None = None,
        accountant: str | Accountant | None = None,
        noise_seed: int | None = None,
        secure_mode: bool = False,
        process_group=None,
    ):
        self.process_group, self.rank = None, 0
        device = _trained_device(model)
        if process_group is not None:
            self.rank = group.check_group(process_group, device)
            self.process_group = process_group
        with self._group_refusal("building DPSGD", device):
            self._configure(model, optimizer, max_grad_norm, noise_multiplier, expected_batch_size, clipping,
                            generator, per_layer_max_grad_norm, sample_rate, accountant, noise_seed, secure_mode)
        if self.process_group is not None:
            group.agree(self.process_group, self._device, self._group_fields(initial=True), what="building DPSGD")
        self._attach(model)

    def _configure(self, model, optimizer, max_grad_norm, noise_multiplier, expected_batch_size, clipping,
                   generator, per_layer_max_grad_norm, sample_rate, accountant, noise_seed, secure_mode) -> None:
        """``__init__``'s checks and settings, before anything is attached to the model."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(secure_mode, bool):
            raise TypeError(f"secure_mode: expected True or False, got {secure_mode!r}")
        self._max_grad_norm = check_clip_norm("max_grad_norm", max_grad_norm)
        self.noise_multiplier = _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
        _check_noise_std(self.noise_multiplier, self._max_grad_norm)
        _check_batch_size(expected_batch_size)
        if clipping not in CLIPPING:
            raise ValueError(f"clipping: expected one of {CLIPPING}, got {clipping!r}")
        self.sample_rate = None if sample_rate is None else check_sample_rate(sample_rate)
        self.accountant = self._make_accountant(accountant)
        self.model, self.optimizer = model, optimizer
        self._expected_batch_size, self.clipping = expected_batch_size, clipping
        self.modules = per_sample_modules(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._check_params(model, optimizer)
        self._check_noise_range()
        # every trainable tensor's clipped sum, noise and gradient live in one flat float32 buffer: the step
        # is a handful of launches for any number of adapters (per-tensor ops cost one launch each: ~5 per
        # adapter per step, which dominated the step of a 154-layer model on a GPU)
        self._sizes = [p.numel() for p in self.params]
        self._device = self.params[0].device
        self.ctx = per_sample.PerSampleContext(mode=MODE_PER_SAMPLE if clipping == "flat" else MODE_CLIP)
        self.sensitivity = self.max_grad_norm
        self._per_layer_default = per_layer_max_grad_norm is None  # thresholds follow C (C / sqrt(L))
        if clipping == "per_layer":
            self._set_per_layer(per_layer_max_grad_norm)
        elif per_layer_max_grad_norm is not None:
            raise ValueError("per_layer_max_grad_norm: only used with clipping='per_layer', got clipping='flat'")
        self.secure_mode = bool(secure_mode)
        if self.secure_mode and (generator is not None or noise_seed is not None):
            raise ValueError("secure_mode: the noise comes from the OS's secure generator at every step; pass no "
                             "generator/noise_seed")
        self.generator = self._make_generator(generator, noise_seed)

    # An engine is not pickled or copied: it holds the noise generator (the noise's secret: a file holding its
    # state predicts every later draw) and, between accumulate() and step(), the pre-noise clipped sum
    _NOT_COPIED = (
        "DPSGD cannot be pickled or copied: it holds the noise generator's state (the noise's secret) and the "
        "step's clipped sum before noise. Save the trained tensors (safetensors) and dp.accountant.state_dict(), "
        "and build a new engine on the loaded model"
    )

    def __reduce_ex__(self, protocol):
        raise TypeError(self._NOT_COPIED)

    def __copy__(self):
        raise TypeError(self._NOT_COPIED)

    def __deepcopy__(self, memo):
        raise TypeError(self._NOT_COPIED)

    def _attach(self, model: nn.Module) -> None:
        """All checks passed: attach (one engine per model; a new one detaches the last, and any engine on a
        model sharing one of its per-sample modules: an engine on the outer model left open after one on an
        inner model took its layers would step sums clipped under the other engine's thresholds)."""
        ours = {id(m) for m in self.modules.values()}
        for other in [ref() for ref in list(_ENGINES.values())]:
            if other is not None and (other.model is model or ours & {id(m) for m in other.modules.values()}):
                log.info("DPSGD: detaching the engine previously attached to this model (or sharing its layers): "
                         "one engine per layer")
                other.detach()
        _ENGINES[model] = weakref.ref(self)
        for p in self.params:  # a gradient from before (non-private training) must not enter the first step
            per_sample.clear(p)
            p.grad = None
        for m in self.modules.values():
            m.ps_ctx = self.ctx
        # batch statistics mix samples: one sample's data would reach every other sample's gradient
        self._batch_norms = [  # (InstanceNorm normalises each sample by its own statistics: not these)
            n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        self._mixers = [(n, _BATCH_MIXERS[type(m).__name__]) for n, m in model.named_modules()
                        if type(m).__name__ in _BATCH_MIXERS]
        self._hooks = [model.register_forward_pre_hook(_EngineHook(self._new_batch), with_kwargs=True)]
        self._batch_rows: dict[int, tuple[int, str]] = {}  # batch id -> (samples, where read): _new_batch
        # forwards with grad since the last clip (their batch ids), and whether a layer was recomputed in a
        # backward since (activation checkpointing): a recomputed layer's gradients carry the latest batch id
        self._open_forwards: list[int] = []
        self._recomputed = False
        guard = _EngineHook(self._guard_unconsumed)
        self._hooks += [m.register_forward_pre_hook(guard) for m in self.modules.values()]
        inner = _torch_optimizer(self.optimizer)  # the one whose step updates the tensors (under any wrapper)
        # the .grad tensors of a release (scale_grad) the optimizer has not stepped on yet, else False
        self._released: list | bool = False
        self._hooks += [inner.register_step_pre_hook(_EngineHook(self._before_optimizer_step)),
                        inner.register_step_post_hook(_EngineHook(self._after_optimizer_step))]
        # a gradient accumulated into a trained tensor's .grad (in place: the same tensor) after a release would
        # ride on it into the optimizer's step, unclipped: it withdraws the release (the per-sample backwards
        # hand autograd nothing for these tensors, so only a use outside their modules accumulates)
        # (weakly: a hook held by a tensor and holding the engine, which holds the tensor, kept parameters alive
        # past their model, e.g. the merged-weight cache's entries watched by their finalizers)
        withdraw = _WeakEngineHook(self._withdraw_release)
        self._hooks += [p.register_post_accumulate_grad_hook(withdraw) for p in self.params]
        self._trainable = {id(m): [p for p in m.parameters() if p.requires_grad] for m in self.modules.values()}
        self._summed: Tensor | None = None  # (total,) float32: the clipped sums since the last step
        self._unreached_warned: set[frozenset] = set()  # (_warn_unreached: said once per set of tensors)
        self._noised = False  # add_noise ran since the last step (scale_grad refuses otherwise)
        self._pending_samples = 0  # samples clipped into _summed since the last step
        self._pending_batches = 0
        self._grads_stale = False  # .grad holds the last step's gradient, to be dropped before new backward
        self._dropped = _DroppedCounter(self._device)
        self.steps = 0
        self.last_step_samples = 0

    def _group_fields(self, initial: bool) -> dict:
        """What every process of a data-parallel engine must hold alike (``group.agree``): the release's
        settings before every release, and once, when the engine is built, the rest, the trained tensors'
        values and the frozen A's (the processes average nothing: equal tensors stay equal only if they
        start so)."""
        thresholds = [self.ctx.clip[id(p)] for p in self.params] if self.clipping == "per_layer" else []
        fields = {
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "expected_batch_size": float(self.expected_batch_size),
            "per_layer_max_grad_norm": group.digest({"C_l": torch.tensor(thresholds, dtype=torch.float64)}),
        }
        if initial:
            names = {id(p): n for n, p in self.model.named_parameters()}
            fields |= {
                "sample_rate": -1.0 if self.sample_rate is None else self.sample_rate,
                "clipping": float(CLIPPING.index(self.clipping)),
                "secure_mode": float(self.secure_mode),
                "the accountant's steps": -1.0 if self.accountant is None else float(self.accountant.steps),
                "the trained tensors (names, shapes, dtypes, values)":
                    group.digest({names.get(id(p), str(i)): p for i, p in enumerate(self.params)}),
                "the adapters' frozen A": group.digest(
                    {n: m.lora_A for n, m in self.modules.items() if isinstance(m, FFALoRALinear)}
                ),
            }
        return fields

    @property
    def expected_batch_size(self) -> int:
        """m: the clipped, noised sum is divided by it (``(sum_i c_i P_i + N(0, (sigma S)^2)) / m``); the expected
        size of a Poisson batch, q N. May change between steps (it scales the update, not the privacy)."""
        return self._expected_batch_size

    @expected_batch_size.setter
    def expected_batch_size(self, value: int) -> None:
        _check_batch_size(value)  # (0 wrote inf into every trained tensor, a negative m reversed the update)
        _check_noise_std(self.noise_multiplier, self.max_grad_norm, value, self._grad_dtypes())
        self._expected_batch_size = value

    @property
    def max_grad_norm(self) -> float:
        """C: the flat clipping threshold, and the bound on the sensitivity S the noise ``sigma S`` is calibrated to
        (S = C flat; per-layer ``sqrt(sum C_l^2) <= C``).

        It may change between steps (a schedule): the per-layer thresholds follow it when they are the
        default ``C / sqrt(L)``, and explicit ones must still fit under it. Never within a step: samples
        already clipped with one C would be noised for another.
        """
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        value = check_clip_norm("max_grad_norm", value)
        _check_noise_std(self.noise_multiplier, value, self.expected_batch_size, self._grad_dtypes())
        pending = self._pending_batches or (self.clipping == "per_layer" and self._have_backward())
        if pending and value != self._max_grad_norm:
            raise RuntimeError(
                f"max_grad_norm: cannot change from {self._max_grad_norm} to {value} in the middle of a step "
                "(samples already clipped with the old C would be noised for the new one): step() or "
                "zero_grad() first"
            )
        old, self._max_grad_norm = self._max_grad_norm, value
        if self.clipping == "flat":
            self.sensitivity = value
        else:
            try:
                self._set_per_layer(None if self._per_layer_default else [self.ctx.clip[id(p)] for p in self.params])
            except ValueError:
                self._max_grad_norm = old
                raise

    @property
    def samples_dropped(self) -> int:
        """Samples dropped for a non-finite per-sample gradient norm, over the engine's life (every
        micro-batch clipped, stepped or discarded). On CUDA reading it waits for the counts still in flight."""
        self._dropped.reap(block=True)
        return self._dropped.total

    @property
    def last_step_dropped(self) -> int:
        """Of the last step's samples, how many were dropped (see ``samples_dropped``)."""
        self._dropped.reap(block=True)
        return self._dropped.last_step

    # --- construction helpers ----------------------------------------------------------------------------
    def _make_accountant(self, accountant: str | Accountant | None) -> Accountant | None:
        if accountant is None:
            return Accountant("rdp") if self.sample_rate is not None else None
        if isinstance(accountant, str):
            if accountant not in ACCOUNTANTS:
                raise ValueError(f"accountant: expected one of {ACCOUNTANTS} or an Accountant, got {accountant!r}")
            accountant = Accountant(accountant)
        if not isinstance(accountant, Accountant):
            raise TypeError(
                f"accountant: expected one of {ACCOUNTANTS} or an Accountant, got {type(accountant).__name__}"
            )
        if self.sample_rate is None:
            raise ValueError(
                "sample_rate: required with an accountant (got None): the accountants bound Poisson sampling "
                "with rate q; build the loader with poisson_dataloader(dataset, sample_rate=q) and pass the "
                "same q here. Fixed-size shuffled batches are not Poisson sampling and are not accounted for"
            )
        return accountant

    def _check_params(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        names = {id(p): n for n, p in model.named_parameters()}
        if not self.params:
            raise ValueError("model: no trainable parameters; call inject_adapters first")
        trained = [n for n, m in self.modules.items() if any(p.requires_grad for p in m.parameters(recurse=False))]
        gathered = _gathered_rows(model, trained)
        if gathered:
            raise ValueError(
                f"model: {gathered[:6]} see tokens gathered from the whole batch (a mixture of experts' routed "
                "experts; a masked-LM head with sparse_prediction), not one row per sample: their per-sample "
                "gradients would be per token, and clipping them would not bound one sample's contribution by C. "
                "Adapt other layers (attention; shared experts where batch-first, not Qwen2-MoE's), or turn "
                "sparse_prediction off"
            )
        positions = _position_rows(model, trained)
        if positions:
            raise ValueError(
                f"model: {positions[:6]} are looked up by positions shared by the whole batch (T5's relative "
                "attention bias; DeBERTa's relative embeddings and the LayerNorm over them), not one row per sample: "
                "the batch's gradients reach them already summed, and clipping their rows would not bound one "
                "sample's contribution by C. Leave them out of trainable_modules"
            )
        devices = sorted({str(p.device) for p in self.params})
        if len(devices) > 1:
            raise ValueError(
                f"model: trainable parameters on several devices {devices}; DPSGD draws one noise vector on one "
                "device: put the adapters (and trained modules) on one device"
            )
        # only a module's own tensors have a per-sample rule (an adapter's base layer has none)
        covered = {id(p) for m in self.modules.values() for p in m.parameters(recurse=False) if p.requires_grad}
        uncovered = [names[id(p)] for p in self.params if id(p) not in covered]
        if uncovered:
            raise ValueError(
                f"model: trainable parameters without per-sample gradients: {uncovered[:8]}; freeze them, "
                "or train them through inject_adapters(..., trainable_modules=[...])"
            )
        # a trainable tensor also held by another module (tied weights) would get gradients that bypass
        # clipping in that module's backward
        per_sample_ids = {id(m) for m in self.modules.values()}
        for mod_name, mod in model.named_modules(remove_duplicate=False):
            if id(mod) in per_sample_ids:
                continue
            tied = [n for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
            if tied:
                raise ValueError(
                    f"model: module {mod_name or type(model).__name__!r} ({type(mod).__name__}) holds trainable "
                    f"tensors {tied} of a per-sample module (tied weights); their gradients there would not be "
                    f"clipped per sample: untie or freeze them, or train {mod_name!r} too (inject_adapters' "
                    "trainable_modules; flat clipping sums a sample's gradients from both before its clip)"
                )
        opt_params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [names[id(p)] for p in self.params if id(p) not in opt_params]
        if missing:
            raise ValueError(f"optimizer: does not hold the trainable parameters {missing[:8]}")

    def _set_per_layer(self, thresholds: list[float] | None) -> None:
        L = len(self.params)
        if thresholds is None:
            thresholds = per_layer_thresholds(self.max_grad_norm, L)
        try:
            thresholds = list(thresholds)
        except TypeError:
            raise TypeError(
                f"per_layer_max_grad_norm: expected a sequence of {L} thresholds (one per trainable tensor), "
                f"got {thresholds!r}"
            ) from None
        if len(thresholds) != L:
            raise ValueError(
                f"per_layer_max_grad_norm: expected {L} thresholds (one per trainable tensor), got {len(thresholds)}"
            )
        values = [check_clip_norm(f"per_layer_max_grad_norm[{i}]", c) for i, c in enumerate(thresholds)]
        total = math.sqrt(sum(c * c for c in values))
        if total > self.max_grad_norm * (1 + 1e-9):
            raise ValueError(
                f"per_layer_max_grad_norm: sqrt(sum C_l^2) = {total:.6g} exceeds max_grad_norm = "
                f"{self.max_grad_norm:.6g}, which the noise is calibrated to; scale the thresholds down"
            )
        self.sensitivity = total
        self.ctx.clip = {id(p): c for p, c in zip(self.params, values)}

    def _make_generator(self, generator: torch.Generator | None, noise_seed: int | None) -> torch.Generator | None:
        device = self.params[0].device
        if generator is not None and noise_seed is not None:
            raise ValueError("generator, noise_seed: pass at most one")
        if noise_seed is not None:
            if isinstance(noise_seed, bool) or not isinstance(noise_seed, int):
                raise TypeError(f"noise_seed: expected an int, got {noise_seed!r}")
            generator = torch.Generator(device=device).manual_seed(noise_seed)
        if generator is None:  # (the noise from the OS's secure generator at every draw: no generator to keep)
            self.seeded = False
            return None
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        if torch.device(generator.device).type != device.type:
            raise ValueError(
                f"generator: expected one on {device.type} (the parameters' device), got {generator.device}"
            )
        self.seeded = True
        log.warning(
            "DPSGD: noise generator explicitly seeded by the caller (%s): for reproducible experiments only; "
            "noise that can be predicted gives no privacy",
            "noise_seed" if noise_seed is not None else "generator",
        )
        return generator

    # --- per-sample state ------------------------------------------------------------------------------
    def _new_batch(self, module, args, kwargs):
        self.ctx.batch_id += 1
        if not torch.is_grad_enabled():
            return  # evaluation: nothing per-sample happens
        if self.ctx.failed and not self._have_backward():  # (a failed backward that kept nothing is behind us)
            self.ctx.failed = False
        packed = [k for k in _PACKED_KEYS if kwargs.get(k) is not None]
        if packed:
            raise ValueError(
                f"model: called with {packed}, a packed (padding-free) batch: several sequences share one row, "
                "and DPSGD clips each row as one sample, so one sequence's removal could move the sum by 2C "
                "under noise calibrated to C. Pad the batch instead (one sequence per row)"
            )
        # the samples this forward's per-sample gradients must have (None: nothing to count by, refused then);
        # the last few forwards, by batch id: a backward may follow an earlier one
        self._batch_rows[self.ctx.batch_id] = _model_samples(args, kwargs)
        if len(self._batch_rows) > 16:
            del self._batch_rows[next(iter(self._batch_rows))]
        self._open_forwards = [*self._open_forwards[-15:], self.ctx.batch_id]
        training = [n for n in self._batch_norms if self.model.get_submodule(n).training]
        if training:
            raise ValueError(
                f"model: {training[:4]} normalise with batch statistics in training mode, which mixes "
                "samples (per-sample gradients and their clipping would not bound one sample's influence); "
                "put them in eval mode or replace them with GroupNorm/LayerNorm"
            )
        mixing = [n for n, now in self._mixers if now(self.model.get_submodule(n))]
        if mixing:
            raise ValueError(
                f"model: {mixing[:4]} route tokens to experts up to a capacity shared by the whole batch, so "
                "other samples decide which of a sample's tokens are dropped (its per-sample gradient depends on "
                "them, like batch statistics). Use eval mode with moe_eval_capacity_token_fraction = 1.0 (no token "
                "dropped), set in the config before the model is built or on each router"
            )
        # the last step's gradient (views of one buffer, already used by the optimizer) is freed. Nothing in
        # the engine reads .grad: per-sample modules keep their results (float32) in the per-sample state and
        # scale_grad overwrites every .grad, so a gradient from a plain backward (the engine paused, or set
        # by hand) never reaches a step
        if self._grads_stale:
            for p in self.params:
                p.grad = None
            self._grads_stale = False
            self._released = False  # (that release is gone: an optimizer step now would apply something else)

    def _guard_unconsumed(self, module, args):
        if not torch.is_grad_enabled():
            return  # no_grad (the graph task is not read: torch.compile breaks its graph there)
        if torch._C._current_graph_task_id() != -1:  # a recomputation inside backward (activation checkpointing)
            self._recomputed = True
            return
        if not module.training:
            return  # eval
        if any(per_sample.has_state(p) for p in self._trainable.get(id(module), ())):
            raise per_sample.PerSampleStateError(
                "per-sample gradients of an earlier backward were never consumed: call dp.accumulate() (micro-"
                "batches) or dp.step() after each backward, before the next forward"
            )

    def _have_backward(self) -> bool:
        return any(per_sample.has_state(p) for p in self.params)

    def per_sample_norms(self) -> Tensor:
        """(n,) total per-sample gradient norms ``sqrt(sum over tensors of nu_i)`` of the last backward.

        With per-layer clipping these are the pre-clipping norms. Non-finite entries mark samples that
        ``step`` drops.

        Raises:
            RuntimeError: no backward since the last ``accumulate``/``step``.
            ValueError: a trained tensor's rows are not the model input's samples (``_check_rows``).
        """
        return self._norms2().sqrt()

    def _norms2(self) -> Tensor:
        held = [(p, r) for p, r in zip(self.params, map(per_sample.pending, self.params)) if r is not None]
        if not held:
            raise RuntimeError(
                "per_sample_norms(): no per-sample gradients: run loss.backward() on a batch through the "
                "model first (in training mode, with grad enabled)"
            )
        self._check_rows(held)
        n = {r.norm2.shape[0] for _, r in held}
        if len(n) != 1:
            rows = {name: r.norm2.shape[0] for name, (_, r) in zip(self._names_of([p for p, _ in held]), held)}
            raise RuntimeError(f"per-sample gradients disagree on the number of samples: {rows}")
        return torch.stack([r.norm2 for _, r in held]).sum(0)

    def _check_rows(self, held: list) -> None:
        """Every trained tensor's per-sample gradients have one row per sample of the model's input (dim 0 of
        what ``_model_samples`` reads, at the forward they came from). A layer that sees samples folded into
        rows (OPT's ``fc1``/``fc2`` reshape (B, T, H) to (B T, H); a multiple-choice model's (B, C, T) to
        (B C, T)), or batch and sequence transposed (XLNet, FSMT), has per-row gradients: clipping each row to
        C would let one sample move the sum by up to T C, under noise calibrated to C. Refused before anything
        is clipped, summed or accounted, as are gradients whose forward cannot be counted (fails closed).

        A layer recomputed in the backward (reentrant activation checkpointing) records the latest forward's
        batch id, not its own: then exactly one forward with grad may be open since the last clip, and every
        gradient is checked against it."""
        recover = "; dp.zero_grad() drops this backward (and the step's micro-batches accumulated so far)"
        only = None  # the one open forward every gradient is checked against (recomputed layers)
        if self._recomputed:
            if len(self._open_forwards) != 1:
                raise ValueError(
                    f"model: {len(self._open_forwards)} forwards with grad since the last clip, and layers were "
                    "recomputed in the backward (activation checkpointing), whose gradients cannot tell which "
                    "forward they came from, so their rows cannot be checked against its samples. With "
                    "checkpointing, run each forward's backward and dp.accumulate()/step() before the next "
                    "forward" + recover
                )
            only = self._open_forwards[0]
        counts = [self._batch_rows.get(r.batch if only is None else only) for _, r in held]
        uncounted = [p for (p, _), count in zip(held, counts) if count is None]
        if uncounted:
            raise ValueError(
                f"model: cannot count the samples of the forward that {self._names_of(uncounted)[:6]} came from: "
                "the call of the model given to DPSGD held no tensor (in its arguments, or dicts, lists, tuples "
                "or dataclasses up to 4 levels deep), or it was not called with grad enabled (only its submodules, "
                "or model.forward directly), or more than 16 forwards with grad ago. DPSGD checks that every "
                "trained tensor has one per-sample row per sample of the model's input; call the model itself on "
                "the batch's tensors before each backward" + recover
            )
        wrong = [(p, r.norm2.shape[0], *count) for (p, r), count in zip(held, counts) if r.norm2.shape[0] != count[0]]
        if wrong:
            _, _, samples, where = wrong[0]
            rows = dict(zip(self._names_of([w[0] for w in wrong]), (w[1] for w in wrong)))
            raise ValueError(
                f"model: the per-sample gradients of {rows} (tensor: rows) do not have one row per sample: the "
                f"model was called on {samples} samples ({where}, dim 0; padding rows included). Those layers "
                "see the samples folded into rows (e.g. OPT's fc1/fc2, which reshape (batch, tokens, hidden) "
                "to (batch*tokens, hidden)), a sequence-first layout (XLNet, FSMT), or positions shared by the "
                "whole batch (BERT's and GPT-2's position embeddings, looked up with (1, T) ids: pass position_ids "
                "expanded to (n, T) with the batch), and clipping each row to "
                "C would not bound one sample's contribution by C. Adapt or train other layers (inject_adapters' "
                "targets / trainable_modules), or make dim 0 of their input the sample. (A multiple-choice "
                "model folds the choices into every layer's rows: no layer of it can be trained so.) If the "
                f"count is what is wrong ({where} is not the batch, or model.forward was called directly, "
                "bypassing the count), call the model with the batch's input first" + recover
            )

    # --- the staged step ---------------------------------------------------------------------------------
    def clip_and_accumulate(self) -> int:
        """Clip the last backward's per-sample gradients and add them to the running sum; free them.

        Call once per physical micro-batch for large logical batches (``step`` calls it for the last one).
        A sample whose total norm is not finite is dropped (coefficient 0, counted in ``samples_dropped``;
        on CUDA the count is read back without stalling the step, so its warning may come a step later).
        With per-layer clipping the layers already clipped inside their backward: a sample with a
        non-finite gradient in one tensor is dropped from that tensor's sum only (its other tensors, each
        clipped to ``C_l``, stay: sensitivity is unchanged).

        Returns:
            the micro-batch size n.
        Raises:
            RuntimeError: a trainable tensor this engine does not clip (``_check_trainable``): refused before
                anything is summed, noised or accounted.
            ValueError: a trained tensor's rows are not the model input's samples (``_check_rows``): refused
                alike.
        Data parallel: a refusal here also reaches the group's other processes, at their next release
        (``_group_refusal``), instead of leaving them waiting for this one.
        """
        with self._group_refusal():
            return self._clip_and_accumulate()

    def _clip_and_accumulate(self) -> int:
        self._check_not_noised()
        self._check_trainable()
        clipped, dropped, n = self._clip_batch()
        self._add_clipped(clipped, dropped, n)
        return n

    def _check_not_noised(self) -> None:
        """Nothing joins a sum that already has its noise: its release and its one accountant step would cover
        samples of another Poisson draw (a higher rate than the one accounted)."""
        if self._noised:
            raise RuntimeError("accumulate(): this step's sum already has its noise (add_noise ran): call "
                               "scale_grad() and the optimizer's step (or zero_grad()) before clipping the next "
                               "batch into a sum")

    def _clip_batch(self, valid: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
        """The last backward's clipped sum as one (total,) float32 vector, how many samples it dropped (a
        0-dim device tensor) and n; frees the per-sample gradients. Device work only, no bookkeeping and no
        read-back (a CUDA graph holds it: ``GraphedAccumulator``).

        ``valid``: an (n,) bool mask of real samples in a padded batch. Padding rows get coefficient 0 (they
        add nothing, even a non-finite gradient: the clip-reduce skips coefficient 0) and are not counted
        as dropped. Their gradients must not reach the per-layer sums (per-layer clipping sums inside the
        backward): give them loss weight 0, which makes them exactly zero (``GraphedAccumulator`` does).
        """
        self._check_attached()
        if self.ctx.failed and self._have_backward():
            raise RuntimeError(
                "a backward under this engine raised since its last zero_grad(): the per-sample gradients kept are "
                "those of the layers it reached, part of each sample's gradient; call dp.zero_grad() and run the "
                "batch again"
            )
        norms2 = self._norms2()  # the clear error when there is no backward
        self._warn_outside_grads()
        n = norms2.shape[0]
        bad = ~torch.isfinite(norms2)
        if valid is not None:
            if valid.shape != (n,) or valid.dtype != torch.bool:
                raise ValueError(f"valid: expected a ({n},) bool mask, got {tuple(valid.shape)} {valid.dtype}")
            bad = bad & valid
        records = [per_sample.pending(p) for p in self.params]
        self._warn_unreached(records)
        if self.clipping == "flat":
            coef = clip_coef(norms2, self.max_grad_norm)
            if valid is not None:
                coef = torch.where(valid, coef, torch.zeros_like(coef))
            clipped = self._clip_flat(coef, n)
        else:  # the layers' backwards already clipped and summed, in float32 (None: unused)
            clipped = self._flatten([r.clipped if r is not None else None for r in records])
        self.ctx.consume(set().union(*(r.fwds for r in records if r is not None)))
        self._open_forwards, self._recomputed = [], False
        for p in self.params:
            per_sample.clear(p)
            p.grad = None
        # exactly the (real) samples clip_coef gave coefficient 0
        return clipped, bad.sum(), n

    def _warn_unreached(self, records: list) -> None:
        """Once per set of tensors (at most ``UNREACHED_WARNINGS`` sets per engine): trained tensors with no
        per-sample gradient in a backward that gave others one. Their module's forward did not run, or its output
        did not reach the loss: they get noise only. Often a branch the batch did not take; but a model that
        reads a layer's weight directly never runs the adapter on it (Mamba's ``conv1d`` and ``dt_proj``), and
        its B would train on noise alone, silently."""
        missing = frozenset(i for i, r in enumerate(records) if r is None)
        if (not missing or len(missing) == len(records) or missing in self._unreached_warned
                or len(self._unreached_warned) >= UNREACHED_WARNINGS):
            return
        self._unreached_warned.add(missing)
        last = len(self._unreached_warned) == UNREACHED_WARNINGS  # (layer drop, routed experts: a new set per step)
        what = self._names_of([self.params[i] for i in sorted(missing)])
        warnings.warn(
            f"DPSGD: {what[:6]}{' and more' if len(what) > 6 else ''} got no per-sample gradient in this backward "
            "(their module's forward did not run, or its output did not reach the loss): this step gives them noise "
            "only. If they should train, check that the model calls the module itself: a model that reads a "
            "layer's weight directly (Mamba's conv1d and dt_proj, say) never runs an adapter on it (said once per "
            f"set of tensors{'; further sets are not reported' if last else ''})", RuntimeWarning, stacklevel=4,
        )

    def _warn_outside_grads(self) -> None:
        """A ``.grad`` on a tensor this engine trains, at clipping time, came from around its per-sample module
        (the weight used outside its module, a loss term on the tensor itself such as a regulariser, a
        backward with the engine paused, or set by hand). It was never clipped per sample, so it never enters
        a step (``_clip_batch`` clears it): say so, since for a functional use or a regulariser that silently
        trains another objective than the one written. (After a step whose next forward skipped the model's
        own forward, ``.grad`` still holds that step's gradient and cannot tell: nothing is said then.)"""
        if self._grads_stale:
            return
        outside = [p for p in self.params if p.grad is not None]
        # compiled autograd hands zeros where eager hands None (per_sample._nothing): not outside. (Not read back
        # while a CUDA graph captures, GraphedAccumulator: a sync there fails the capture; all are named then.)
        if outside and not (self._device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            nonzero = torch.stack([g.ne(0).any() for g in (p.grad for p in outside)]).tolist()
            outside = [p for p, keep in zip(outside, nonzero) if keep]
        if outside:
            what = self._names_of(outside)
            warnings.warn(
                f"DPSGD: {what[:6]} had a gradient from around their per-sample modules (the weight used outside "
                "its module, e.g. F.linear(h, head.weight); a loss term on the tensor itself, e.g. a regulariser; "
                "or a backward with the engine paused). DP-SGD cannot clip it per sample: it is discarded. Use "
                "trained tensors only through their modules (a regulariser: the optimizer's weight_decay)",
                RuntimeWarning, stacklevel=4,
            )

    def _names_of(self, tensors) -> list[str]:
        """The model's names of ``tensors`` (for error messages), or their shapes where the model has none."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [names.get(id(p), f"a tensor of shape {tuple(p.shape)}") for p in tensors]

    def _add_clipped(self, clipped: Tensor, dropped: Tensor, n: int) -> None:
        """Add one micro-batch's ``_clip_batch`` results to the running sum and the step's counts (the dropped
        count stays on the device: _DroppedCounter)."""
        self._check_not_noised()
        self._summed = clipped if self._summed is None else self._summed + clipped
        self._dropped.add(dropped, n)
        self._pending_samples += n
        self._pending_batches += 1

    accumulate = clip_and_accumulate

    def _flatten(self, tensors: list[Tensor | None]) -> Tensor:
        """One (total,) float32 vector from per-tensor pieces in ``params`` order (None: zeros)."""
        parts = [
            t.reshape(-1).float() if t is not None else torch.zeros(k, dtype=torch.float32, device=self._device)
            for t, k in zip(tensors, self._sizes)
        ]
        return torch.cat(parts)

    def _clip_flat(self, coef: Tensor, n: int) -> Tensor:
        """``sum_i c_i P_i`` of every trainable tensor, as one (total,) float32 vector.

        On CUDA the per-sample gradients are concatenated in groups of up to ``GROUP_BYTES`` and each group
        is clip-reduced in one launch (a 1B model's 154 adapters: 2 launches instead of 154; the copy is
        ~0.1 ms and at most ``GROUP_BYTES`` of extra memory); elsewhere each tensor is reduced in place (a
        copy costs more than a launch on a CPU).
        """
        grads = []
        pieces: list[Tensor | None] = [None] * len(self.params)
        for i, p in enumerate(self.params):
            record = per_sample.pending(p)  # None: unused in this forward, contributes zero
            gs = record.grad_sample if record is not None else None
            if gs is not None and gs.shape[0] != n:
                raise RuntimeError(f"per-sample gradients of one tensor have {gs.shape[0]} samples, expected {n}")
            if isinstance(gs, per_sample.Factors):  # (kept as factors: reference.ghost's clip-reduce)
                pieces[i], gs = gs.clip_reduce(coef), None
            grads.append(gs)
        if GROUPED_CLIP_REDUCE.get(self._device.type, False) and n > 0:
            group: list[int] = []

            def flush():
                P = torch.cat([grads[i].reshape(n, -1) for i in group], dim=1)
                cols = math.gcd(P.shape[1], 64)  # (n, rows, cols): the op's (n, a, b), tiles it handles well
                summed = call(ffa_linear_clip_reduce, P.view(n, P.shape[1] // cols, cols), coef).reshape(-1)
                for i, part in zip(group, summed.split([self._sizes[i] for i in group])):
                    pieces[i] = part
                group.clear()

            size = 0
            for i, g in enumerate(grads):
                if g is None:
                    continue
                group.append(i)
                size += g.numel() * g.element_size()
                if size >= GROUP_BYTES:
                    flush()
                    size = 0
            if group:
                flush()
        else:
            for i, (g, p) in enumerate(zip(grads, self.params)):
                if g is not None:
                    rows = p.shape[0] if p.dim() > 1 else 1  # (n, *shape) -> (n, rows, cols); n may be 0
                    pieces[i] = call(ffa_linear_clip_reduce, g.reshape(n, rows, p.numel() // rows), coef)
        return self._flatten(pieces)

    def _split(self, flat: Tensor) -> list[Tensor]:
        """Per-tensor views of a (total,) vector, shaped like ``params``."""
        return [v.view(p.shape) for v, p in zip(flat.split(self._sizes), self.params)]

    def clipped_sum(self) -> list[Tensor]:
        """The pre-noise clipped sums accumulated since the last step, one float32 tensor per trainable tensor.

        For tests and audits (``sum_i c_i P_i``); it consumes nothing.
        """
        if self._summed is None:
            return [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in self.params]
        return [v.clone() for v in self._split(self._summed)]

    def add_noise(self) -> None:
        """Add ``N(0, (sigma S)^2)`` noise to every trainable tensor's clipped sum (float32), in one draw: S is the
        sum's sensitivity (``self.sensitivity``: C flat; per-layer ``sqrt(sum C_l^2) <= C``, which the noise
        multiplier sigma the accountant records is relative to).

        The noisy sum is a release: this is where the accountant takes its step (every call, so driving the
        stages by hand is accounted too). sigma is checked here too: set by hand to a negative or NaN value,
        it would release the sum with no noise (C is checked by its setter)."""
        with self._group_refusal():
            self._check_attached()
            if self._noised:  # (data parallel, a second all_reduce would multiply the noisy sum by the world size)
                raise RuntimeError("add_noise(): this step's sum already has its noise (and its accountant step): "
                                   "call scale_grad() (or zero_grad()) before the next add_noise()")
            self._check_optimizer_syncs()
            self.noise_multiplier = _check_positive("noise_multiplier", self.noise_multiplier, allow_zero=True)
            self._check_noise_range()  # (sigma may have been set by hand, a tensor cast since)
        if self.process_group is not None:
            group.agree(self.process_group, self._device, self._group_fields(initial=False), what="this release")
        std = self.noise_multiplier * self.sensitivity
        total = self._summed
        if total is None:
            total = torch.zeros(sum(self._sizes), dtype=torch.float32, device=self._device)
        if std > 0 and self.rank == 0:  # (data parallel: rank 0 alone adds the noise to the group's sum)
            total = total + self._noise(std, total.shape[0])
        elif self.process_group is not None:
            total = total.clone()  # (the all_reduce writes in place)
        if self.process_group is not None:
            torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=self.process_group)
        self._summed = total  # stays float32 until scale_grad casts it (a bf16 .grad can't take it)
        if self.accountant is not None:
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self._noised = True

    def _grad_dtypes(self) -> set[torch.dtype]:
        return {p.dtype for p in self.params}

    def _check_noise_range(self) -> None:
        _check_noise_std(self.noise_multiplier, self.max_grad_norm, self.expected_batch_size, self._grad_dtypes())

    def _noise(self, std: float, size: int) -> Tensor:
        """(size,) float32 N(0, std^2) on the parameters' device. A caller-seeded engine draws from its generator
        (reproducible). Otherwise from the OS's cryptographically secure generator at every draw (``os_normal``:
        ``os.urandom`` on a CPU, a ChaCha20 keystream under a fresh OS key on CUDA; a generator's stream, even
        OS-seeded, is predictable from a release of noise alone, such as an empty batch's). Secure mode sums four
        draws scaled by 1/2 (Holohan & Braghin 2021), one at a time (two float64 vectors live, not five)."""
        device = self._device
        if self.secure_mode or not self.seeded:
            draws = os_normal((size,), dtype=torch.float64, device=device)
            for _ in range(3 if self.secure_mode else 0):
                draws += os_normal((size,), dtype=torch.float64, device=device)
            return (draws * (std / 2 if self.secure_mode else std)).float()
        return torch.normal(0.0, std, size=(size,), generator=self.generator, device=device, dtype=torch.float32)

    def _check_optimizer_syncs(self) -> None:
        """accelerate's ``AcceleratedOptimizer`` skips its step on micro-batches that do not sync: a release
        there would be noised and accounted, never applied."""
        state = getattr(self.optimizer, "gradient_state", None)
        if state is not None and getattr(state, "sync_gradients", True) is False:
            raise RuntimeError(
                "accelerate is accumulating gradients (sync_gradients is False) and would skip the optimizer's "
                "step, so this release would be noised and accounted but never applied: call dp.accumulate() on the "
                "micro-batches that do not sync and dp.step() on the one that does"
            )

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        """The optimizer's step pre-hook: one optimizer step per release, never through a GradScaler."""
        released = self._released
        if not released or any(p.grad is not g for p, g in zip(self.params, released)):
            self._released = False
            raise RuntimeError(
                "optimizer.step(): no DP-SGD release since the optimizer's last step, or its .grad changed since: it "
                "would apply a gradient the engine did not clip and noise, or the last release a second time (an "
                "optimizer.step() after dp.step(), which steps already). Step with dp.step(), or "
                "dp.clip_and_accumulate(), dp.add_noise(), dp.scale_grad() and then optimizer.step() (a framework's "
                "own step, e.g. transformers.Trainer's: run those three in its pre-optimizer-step callback)"
            )
        scaler = _calling_grad_scaler()
        if scaler is not None:
            self._released = False
            raise RuntimeError(
                "optimizer.step(): called through an enabled torch.amp.GradScaler, which DP-SGD does not support: the "
                "loss scale multiplies every per-sample gradient before the clip (max_grad_norm would mean "
                "max_grad_norm / scale, drifting with it), and the engine's always finite .grad never lets the scaler "
                "back off. Use bf16 autocast, or fp16 autocast without a GradScaler (per-sample maths is float32)"
            )

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        self._released = False

    def _withdraw_release(self, param) -> None:
        self._released = False

    def scale_grad(self) -> None:
        """Set ``.grad`` to the noisy sum divided by the expected batch size m, in the parameter's dtype, and
        end the logical step (its counts reset; the optimizer's step is the caller's).

        Raises:
            RuntimeError: no ``add_noise`` since the last step (a clipped sum without noise must not reach
                ``.grad``); or a trainable tensor this engine does not clip (``_check_trainable``): the
                caller's optimizer step would apply its raw gradient.
        """
        self._check_attached()
        if not self._noised:
            raise RuntimeError("scale_grad(): call add_noise() first: the clipped sum has no noise yet")
        self._check_trainable()
        scaled = self._summed / self.expected_batch_size
        cast: dict[torch.dtype, Tensor] = {}  # one cast per parameter dtype; every .grad is a view of it
        offset = 0
        for p, k in zip(self.params, self._sizes):
            src = cast.get(p.dtype)
            if src is None:
                src = cast[p.dtype] = scaled if p.dtype == torch.float32 else scaled.to(p.dtype)
            p.grad = src[offset : offset + k].view(p.shape)
            offset += k
        self.steps += 1
        self.last_step_samples = self._pending_samples
        self._end_step(stepped=True)
        self._released = [p.grad for p in self.params]  # the release, as the optimizer's step must find it

    def step(self, *, empty_batch: bool = False) -> None:
        """One DP-SGD step: clip what the last backward left, add noise once, divide by m, step.

        Every call that releases a noisy gradient is one accountant step, empty batches included.

        Args:
            empty_batch: the (Poisson-sampled) logical batch had no samples: step with noise only.
        Raises:
            RuntimeError: no per-sample gradients since the last step (it refuses to step twice on the
                same gradients) and ``empty_batch`` was not set; or ``empty_batch`` set while samples are
                pending.
        """
        with self._group_refusal():
            self._check_optimizer_syncs()  # (before this batch is clipped into the sum: accumulate() it instead)
            self.noise_multiplier = _check_positive("noise_multiplier", self.noise_multiplier, allow_zero=True)
            self._check_noise_range()
            self._check_trainable()
            if self._have_backward():
                self._clip_and_accumulate()  # (inside this refusal: the group hears of a refusal once)
            if empty_batch and self._pending_samples > 0:
                raise RuntimeError(
                    f"step(empty_batch=True): {self._pending_samples} sample(s) were accumulated since the last "
                    "step; call step() without empty_batch"
                )
            if self._pending_batches == 0 and not empty_batch:
                raise RuntimeError(
                    "step(): no per-sample gradients since the last step (a step on the same gradients twice, "
                    "or no backward): run loss.backward() first, or step(empty_batch=True) for an empty batch"
                )
        self.add_noise()  # the noisy gradient exists from here on: the accountant's step is spent
        self.scale_grad()
        self.optimizer.step()
        if self._released:  # the optimizer's step returned without reaching torch's (a wrapper skipped it)
            self._released = False
            raise RuntimeError(
                f"step(): {type(self.optimizer).__name__}.step() returned without stepping the optimizer it wraps: "
                "this release was noised and accounted but not applied; step through an optimizer that steps, or "
                "accumulate() the micro-batches it would skip"
            )

    @contextlib.contextmanager
    def _group_refusal(self, what: str = "this release", device: torch.device | None = None):
        """Data parallel: an error raised inside, before the collectives of ``what``, first tells the group's
        other processes (``group.agree``), which then raise too instead of waiting for this one for ever."""
        try:
            yield
        except Exception:
            if self.process_group is not None:
                group.agree(self.process_group, device or self._device, None, what=what)
            raise

    def _check_trainable(self) -> None:
        """Refuse a step that would apply a gradient this engine did not clip and noise: a tensor made
        trainable after the engine was built, or one the optimizer holds with a ``.grad`` set elsewhere; and
        one frozen after it was built, which would still be given noise as its gradient and moved.
        Checked by ``step``, and by the stages driven by hand (``clip_and_accumulate``, ``scale_grad``)."""
        frozen = [p for p in self.params if not p.requires_grad]
        if frozen:
            raise RuntimeError(
                f"model: {self._names_of(frozen)[:6]} were frozen after the engine was built: each step would "
                "still set their .grad to noise and the optimizer would move them; build a new DPSGD after "
                "changing what trains (pass accountant=this_engine.accountant to keep the privacy spent)"
            )
        ours = {id(p) for p in self.params}
        new = [p for p in self.model.parameters() if p.requires_grad and id(p) not in ours]
        other = [p for g in self.optimizer.param_groups for p in g["params"] if id(p) not in ours and p.grad is not None]
        if new or other:
            what = self._names_of({id(p): p for p in [*new, *other]}.values())
            raise RuntimeError(
                f"model/optimizer: {what[:6]} would be updated with a gradient DPSGD neither clipped nor "
                "noised (made trainable after the engine was built, or a .grad set outside it): build a new "
                "DPSGD after changing what trains, or freeze them and clear their .grad"
            )

    def epsilon(self, delta: float) -> float:
        """The epsilon spent so far at ``delta`` by this engine's accountant (all of its steps, every round).

        Raises:
            RuntimeError: the engine has no accountant (no ``sample_rate`` was given).
        """
        if self.accountant is None:
            raise RuntimeError(
                "epsilon(): this DPSGD has no accountant; pass sample_rate=q (Poisson sampling) and optionally "
                "accountant='rdp'|'prv'|Accountant when building it"
            )
        return self.accountant.epsilon(delta)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients, per-sample state and any un-stepped clipped sum (with a warning if there is one)."""
        if self._pending_batches:
            log.warning(
                "DPSGD.zero_grad(): discarding %d accumulated micro-batch(es) (%d samples) that were never stepped",
                self._pending_batches, self._pending_samples,
            )
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for p in self.params:
            per_sample.clear(p)
            p.grad = None
        self._open_forwards, self._recomputed = [], False
        self.ctx.failed = False
        self._end_step(stepped=False)

    def _end_step(self, stepped: bool) -> None:
        """Close the logical step: the running sum and its counts start again. ``stepped``: its gradient
        went to ``.grad`` (dropped before the next backward), else it was discarded."""
        self._summed, self._noised = None, False
        self._dropped.end_step(stepped=stepped)
        self._pending_samples = self._pending_batches = 0
        self._grads_stale = stepped
        self._released = False  # (scale_grad sets it after this; zero_grad's discard clears it)

    def _check_attached(self) -> None:
        """Refuse the DP stages (clip, noise, scale, step) of an engine that was detached, or replaced by a
        new DPSGD on the same model. The model's layers then clip under the new engine (per-layer clipping
        clips inside their backward with its thresholds), so this engine's noise, scaled to its own bound,
        would not cover what it sums. ``epsilon`` and the counts stay readable."""
        if self.ctx.closed:
            raise RuntimeError(
                "DPSGD: this engine was detached (or replaced by a new DPSGD on the same model): it no longer "
                "clips this model's per-sample gradients, so it must not clip, noise or step them; use the "
                "engine now attached (GraphedAccumulator.rebind(new_engine) for an accumulator)"
            )

    def detach(self) -> None:
        """Stop per-sample work: the modules return to their plain, DP-free path. The engine's DP stages
        (``accumulate``, ``add_noise``, ``scale_grad``, ``step``) are refused from then on."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        ref = _ENGINES.get(self.model)
        if ref is not None and ref() in (None, self):
            del _ENGINES[self.model]
        self.ctx.closed = True  # a backward of a forward run under this engine is refused from now on
        for m in self.modules.values():
            m.ps_ctx = None
        for p in self.params:
            per_sample.clear(p)

"""DP-SGD over the adapters: per-sample clipping (flat or per-layer), Gaussian noise, one optimizer step.

Staged like opacus's DPOptimizer (``clip_and_accumulate -> add_noise -> scale_grad -> step``):
``g = (sum_i c_i P_i + sigma C xi) / m`` with ``c_i = min(1, C / (N_i + 1e-6))``, ``xi ~ N(0, I)``,
``m`` the expected batch size. Per-sample gradients come from the fused backward of the adapter layers
(and the per-sample head modules) in the same backward pass as the loss gradient; nothing is computed
twice. Flat clipping keeps each tensor's P until every norm is known; per-layer clipping clips inside each
layer's backward with threshold ``C_l`` (default ``C / sqrt(L)`` for L tensors, so ``sqrt(sum C_l^2) = C``).
"""

from __future__ import annotations

import logging
import math
import secrets

import torch
from torch import Tensor, nn

from fedlora_fast import per_sample
from fedlora_fast.layers.ffa_linear import FFALoRALinear
from fedlora_fast.layers.per_sample_modules import _PerSampleMixin
from fedlora_fast.reference import MODE_CLIP, MODE_PER_SAMPLE, clip_coef
from fedlora_fast.ops.ffa_linear import ffa_linear_clip_reduce

log = logging.getLogger(__name__)

CLIPPING = ("flat", "per_layer")


def _check_positive(name: str, value: float, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected a finite number {bound}, got {value!r}")
    return v


def per_sample_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules of ``model`` that compute per-sample gradients (adapters and per-sample heads)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (FFALoRALinear, _PerSampleMixin))}


class DPSGD:
    """Differentially private SGD step over a model's trainable adapter tensors.

    Args:
        model: a model with adapters from ``inject_adapters`` (and optional ``trainable_modules``).
        optimizer: any torch optimizer over the model's trainable parameters.
        max_grad_norm: clipping threshold C (flat: over all trainable tensors of a sample).
        noise_multiplier: sigma; the noise std is ``sigma * C``. 0 disables noise (no privacy).
        expected_batch_size: m, the divisor (with Poisson sampling: ``q * dataset size``).
        clipping: ``"flat"`` or ``"per_layer"``.
        generator: the noise generator (on the parameters' device). None: a fresh generator seeded from
            the operating system's entropy. Pass an explicitly seeded one only for reproducible experiments.
        per_layer_max_grad_norm: per-tensor thresholds (a list in ``parameters()`` order) for per-layer
            clipping; default ``C / sqrt(L)`` each.
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
    ):
        self.max_grad_norm = _check_positive("max_grad_norm", max_grad_norm)
        self.noise_multiplier = _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
        if isinstance(expected_batch_size, bool) or not isinstance(expected_batch_size, int) or expected_batch_size <= 0:
            raise ValueError(f"expected_batch_size: expected a positive int, got {expected_batch_size!r}")
        if clipping not in CLIPPING:
            raise ValueError(f"clipping: expected one of {CLIPPING}, got {clipping!r}")
        self.model, self.optimizer = model, optimizer
        self.expected_batch_size, self.clipping = expected_batch_size, clipping
        self.modules = per_sample_modules(model)
        covered = {id(p) for m in self.modules.values() for p in m.parameters() if p.requires_grad}
        self.params = [p for p in model.parameters() if p.requires_grad]
        names = {id(p): n for n, p in model.named_parameters()}
        uncovered = [names[id(p)] for p in self.params if id(p) not in covered]
        if uncovered:
            raise ValueError(
                f"model: trainable parameters without per-sample gradients: {uncovered[:8]}; freeze them, "
                "or train them through inject_adapters(..., trainable_modules=[...])"
            )
        if not self.params:
            raise ValueError("model: no trainable parameters; call inject_adapters first")
        opt_params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [names[id(p)] for p in self.params if id(p) not in opt_params]
        if missing:
            raise ValueError(f"optimizer: does not hold the trainable parameters {missing[:8]}")
        self.ctx = per_sample.PerSampleContext(mode=MODE_PER_SAMPLE if clipping == "flat" else MODE_CLIP)
        if clipping == "per_layer":
            if per_layer_max_grad_norm is None:
                per_layer_max_grad_norm = [self.max_grad_norm / math.sqrt(len(self.params))] * len(self.params)
            if len(per_layer_max_grad_norm) != len(self.params):
                raise ValueError(
                    f"per_layer_max_grad_norm: expected {len(self.params)} thresholds (one per trainable "
                    f"tensor), got {len(per_layer_max_grad_norm)}"
                )
            self.ctx.clip = {
                id(p): _check_positive("per_layer_max_grad_norm", c) for p, c in zip(self.params, per_layer_max_grad_norm)
            }
        for m in self.modules.values():
            m.ps_ctx = self.ctx
        self._hook = model.register_forward_pre_hook(self._new_batch)
        device = self.params[0].device
        self.seeded = generator is not None
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(secrets.randbits(63))
        else:
            log.warning("DPSGD: noise generator explicitly seeded by the caller: for reproducible experiments only")
        self.generator = generator
        self._summed: list[Tensor | None] = [None] * len(self.params)
        self._pending_samples = 0  # samples clipped into _summed since the last step
        self._pending_batches = 0
        self.samples_dropped = 0  # non-finite per-sample gradients dropped, over the engine's life
        self.steps = 0

    # --- per-sample state ------------------------------------------------------------------------------
    def _new_batch(self, module, args):
        self.ctx.batch_id += 1

    def _have_backward(self) -> bool:
        return any(per_sample.has_state(p) for p in self.params)

    def per_sample_norms(self) -> Tensor:
        """(n,) total per-sample gradient norms ``sqrt(sum over tensors of nu_i)`` of the last backward.

        With per-layer clipping these are the pre-clipping norms.
        """
        if not self._have_backward():
            raise RuntimeError(
                "per_sample_norms(): no per-sample gradients: run loss.backward() on a batch through the "
                "model first (in training mode, with grad enabled)"
            )
        norms2 = [p.ff_norm2 for p in self.params if per_sample.has_state(p)]
        n = {t.shape[0] for t in norms2}
        if len(n) != 1:
            raise RuntimeError(f"per-sample norms disagree on the batch size: {sorted(n)}")
        return torch.stack(norms2).sum(0).sqrt()

    # --- the staged step ---------------------------------------------------------------------------------
    def clip_and_accumulate(self) -> int:
        """Clip the last backward's per-sample gradients and add them to the running sum; free them.

        Call once per physical micro-batch for large logical batches. Returns the micro-batch size.
        """
        norms = self.per_sample_norms()
        n = norms.shape[0]
        finite = torch.isfinite(norms)
        if self.clipping == "flat":
            coef = clip_coef(norms.pow(2), self.max_grad_norm)
            for i, p in enumerate(self.params):
                if getattr(p, "ff_grad_sample", None) is None:
                    continue  # unused in this forward: contributes zero
                gs = p.ff_grad_sample
                part = ffa_linear_clip_reduce(gs.reshape(n, gs.shape[1] if gs.dim() > 2 else 1, -1), coef)
                self._add(i, part.reshape(p.shape))
        else:
            for i, p in enumerate(self.params):
                if p.grad is not None:  # the layer's backward already clipped and summed
                    self._add(i, p.grad.float())
        dropped = int((~finite).sum())
        if dropped:
            log.warning("DPSGD: dropped %d sample(s) with non-finite per-sample gradients", dropped)
        self.samples_dropped += dropped
        for p in self.params:
            per_sample.clear(p)
            p.grad = None
        self._pending_samples += n
        self._pending_batches += 1
        return n

    accumulate = clip_and_accumulate

    def _add(self, i: int, t: Tensor) -> None:
        self._summed[i] = t if self._summed[i] is None else self._summed[i] + t

    def add_noise(self) -> None:
        """Set ``.grad`` of every trainable tensor to its clipped sum plus ``N(0, (sigma C)^2)`` noise."""
        std = self.noise_multiplier * self.max_grad_norm
        for i, p in enumerate(self.params):
            total = self._summed[i]
            if total is None:
                total = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            if std > 0:
                noise = torch.normal(0.0, std, size=p.shape, generator=self.generator, device=p.device)
                total = total + noise
            p.grad = total
        self._summed = [None] * len(self.params)

    def scale_grad(self) -> None:
        for p in self.params:
            p.grad = (p.grad / self.expected_batch_size).to(p.dtype)

    def step(self, *, empty_batch: bool = False) -> None:
        """One DP-SGD step: clip what the last backward left, add noise once, divide by m, step.

        Args:
            empty_batch: the (Poisson-sampled) logical batch had no samples: step with noise only.
        Raises:
            RuntimeError: no per-sample gradients since the last step (it refuses to step twice on the
                same gradients) and ``empty_batch`` was not set.
        """
        if self._have_backward():
            self.clip_and_accumulate()
        if self._pending_batches == 0 and not empty_batch:
            raise RuntimeError(
                "step(): no per-sample gradients since the last step (a step on the same gradients twice, "
                "or no backward): run loss.backward() first, or step(empty_batch=True) for an empty batch"
            )
        self.add_noise()
        self.scale_grad()
        self.optimizer.step()
        self.steps += 1
        self.last_step_samples = self._pending_samples
        self._pending_samples = self._pending_batches = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients, per-sample state and any un-stepped clipped sum."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for p in self.params:
            per_sample.clear(p)
            p.grad = None
        self._summed = [None] * len(self.params)
        self._pending_samples = self._pending_batches = 0

    def detach(self) -> None:
        """Stop per-sample work: the modules return to their plain, DP-free path."""
        self._hook.remove()
        for m in self.modules.values():
            m.ps_ctx = None

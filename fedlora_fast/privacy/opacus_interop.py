"""opacus interoperability: per-sample gradient (and ghost-clipping norm) samplers for our layers.

Follows opacus's extension API (``opacus.grad_sample.register_grad_sampler`` / ``register_norm_sampler``,
opacus >= 1.5): opacus's hooks hand a sampler the module input (``activations``) and the gradient of the
module output (``backprops``); the sampler returns every sample's gradient (or its norm) per parameter.
For ``FFALoRALinear`` we run our own fused backward op in per-sample mode on those, so opacus gets the same
numbers our ``DPSGD`` engine uses. Users of opacus switch by one call::

    from fedlora_fast.privacy.opacus_interop import prepare_for_opacus
    prepare_for_opacus(model)                      # registers samplers, detaches our own engine
    model, opt, loader = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader, ...)

Limits: adapter dropout must be off in training (opacus hooks see the input before our dropout, so they
cannot rebuild the adapter's input), and a merged adapter has no adapter gradient.
"""

from __future__ import annotations

from torch import Tensor, nn

from fedlora_fast import per_sample
from fedlora_fast.layers.ffa_linear import FFALoRALinear, flat3
from fedlora_fast.layers.per_sample_modules import PerSampleEmbedding, PerSampleLayerNorm, PerSampleLinear
from fedlora_fast.ops.ffa_linear import ffa_linear_bwd
from fedlora_fast.reference import MODE_PER_SAMPLE, acc_dtype

_REGISTERED = False


def _check_layer(layer: FFALoRALinear) -> None:
    name = layer.name or "FFALoRALinear"
    if layer.ps_ctx is not None:
        raise RuntimeError(
            f"{name}: a fedlora_fast DPSGD engine is attached; call dp.detach() (or prepare_for_opacus(model)) "
            "before make_private, so that only one DP engine computes per-sample gradients"
        )
    if layer.merged:
        raise RuntimeError(f"{name}: merged adapter has no adapter gradient; unmerge() before training")
    if layer.training and isinstance(layer.dropout, nn.Dropout) and layer.dropout.p > 0:
        raise NotImplementedError(
            f"{name}: adapter dropout p={layer.dropout.p} under opacus: opacus's hooks see the input before "
            "dropout, so per-sample gradients cannot be rebuilt; use dropout=0 or fedlora_fast's own DPSGD"
        )


def _ffa_per_sample(layer: FFALoRALinear, activations: list[Tensor], backprops: Tensor) -> tuple[Tensor, ...]:
    """(gB (n,out,r), nuB (n,), gA (n,r,in) or empty, nuA) from opacus's captured input and output gradient."""
    _check_layer(layer)
    x = activations[0]
    n = x.shape[0]
    g3 = backprops.reshape(n, -1, layer.out_features)
    # under torch.autocast our forward ran in the autocast dtype (the output's, so the gradient's), while
    # opacus captured the input before that cast: rebuild what the forward computed in, in its dtype
    x3 = x.reshape(n, -1, layer.in_features).to(g3.dtype)
    weight = layer.weight.to(g3.dtype)  # not read (need_dx is False) but checked against g's dtype
    acc = acc_dtype(x3.dtype)
    u = x3.to(acc) @ layer.lora_A.to(acc).t()  # the U our forward saved
    _, _, gB, nuB, gA, nuA = ffa_linear_bwd(
        g3, u, weight, layer.lora_A, layer.lora_B, x3 if layer.lora_A.requires_grad else None,
        layer.scale, False, False, MODE_PER_SAMPLE, 0.0, 0.0,
    )
    return gB, nuB, gA, nuA


def compute_ffa_linear_grad_sample(
    layer: FFALoRALinear, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """opacus grad sampler: ``{lora_B: (n, out, r), lora_A: (n, r, in) in LoRA mode}``.

    Args:
        activations: ``[x]``, x: (n, ..., in) the layer input.
        backprops: (n, ..., out) gradient of the layer output (opacus has scaled it for the loss reduction).
    """
    gB, _, gA, _ = _ffa_per_sample(layer, activations, backprops)
    out = {}
    if layer.lora_B.requires_grad:
        out[layer.lora_B] = gB.to(layer.lora_B.dtype)
    if layer.lora_A.requires_grad:
        out[layer.lora_A] = gA.to(layer.lora_A.dtype)
    return out


def compute_ffa_linear_norm_sample(
    layer: FFALoRALinear, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """opacus norm sampler (ghost clipping): ``{param: (n,) per-sample gradient norm}``.

    The per-sample gradient of B is rank-r data (n*out*r floats), so it is formed directly by the fused op
    rather than by the ghost ``(g g^T)(a a^T)`` trick, whose cost grows with T^2.
    """
    _, nuB, _, nuA = _ffa_per_sample(layer, activations, backprops)
    out = {}
    if layer.lora_B.requires_grad:
        out[layer.lora_B] = nuB.sqrt()
    if layer.lora_A.requires_grad:
        out[layer.lora_A] = nuA.sqrt()
    return out


def register_with_opacus() -> None:
    """Register our grad and norm samplers with opacus (idempotent). Needs opacus >= 1.5."""
    global _REGISTERED
    if _REGISTERED:
        return
    try:
        from opacus.grad_sample import register_grad_sampler, register_norm_sampler
        from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
        from opacus.grad_sample.linear import compute_linear_grad_sample, compute_linear_norm_sample
    except ImportError as e:  # pragma: no cover - depends on the installed opacus
        raise ImportError(
            f"opacus interop needs opacus >= 1.5 (register_grad_sampler and register_norm_sampler): {e}"
        ) from None
    register_grad_sampler(FFALoRALinear)(compute_ffa_linear_grad_sample)
    register_norm_sampler(FFALoRALinear)(compute_ffa_linear_norm_sample)
    # the per-sample heads are nn.Linear / nn.LayerNorm subclasses; opacus looks samplers up by exact type
    register_grad_sampler(PerSampleLinear)(compute_linear_grad_sample)
    register_norm_sampler(PerSampleLinear)(compute_linear_norm_sample)
    register_grad_sampler(PerSampleLayerNorm)(compute_layer_norm_grad_sample)
    register_grad_sampler(PerSampleEmbedding)(compute_per_sample_embedding_grad_sample)
    _REGISTERED = True


def compute_per_sample_embedding_grad_sample(layer: PerSampleEmbedding, activations, backprops) -> dict:
    """opacus grad sampler for a trained embedding: the module's own rule (opacus 1.6's ``nn.Embedding``
    sampler leaves the padding row's per-sample gradient non-zero, where torch's gradient is zero)."""
    if not layer.weight.requires_grad:
        return {}
    # (the rule takes the output's gradient as (n, T, dim), as the layer's own backward hands it: flat3)
    rows = layer.per_sample_grads(activations[0], flat3(backprops))[0]
    return {layer.weight: per_sample.dense_grad_sample(rows).to(backprops.dtype)}


def prepare_for_opacus(model: nn.Module) -> nn.Module:
    """Register the samplers and detach any fedlora_fast DP engine from ``model``; returns ``model``.

    After this, ``opacus.PrivacyEngine().make_private(module=model, ...)`` computes per-sample gradients of
    the adapters (and ``trainable_modules`` heads) through our fused backward op.
    """
    from fedlora_fast.per_sample import clear
    from fedlora_fast.privacy.dpsgd import attached_engine, per_sample_modules

    register_with_opacus()
    engine = attached_engine(model)
    if engine is not None:
        engine.detach()
    for m in per_sample_modules(model).values():
        m.ps_ctx = None
    for p in model.parameters():
        clear(p)
    return model

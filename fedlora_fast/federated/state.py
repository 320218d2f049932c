"""The adapter state clients and server exchange, and the fingerprint that says two adapters are compatible.

FFA-LoRA (Sun et al., ICLR 2024, arXiv 2403.12313): every client regenerates the same frozen A from
``(seed, layer name)``, so the exchanged state is B (plus any fully trained head); in LoRA mode A and B.
Two parties may only exchange updates when method, rank, alpha, seed, scaling and targets agree: the
fingerprint hashes exactly these.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import Tensor, nn

from fedlora_fast.inject import adapter_layers


def trainable_state(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of every trainable parameter (what a client sends), in ``named_parameters`` order."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def check_tensor(what: str, t, shape) -> None:
    """Raise ValueError naming ``what`` unless ``t`` is a finite floating-point tensor of ``shape`` (a tensor of
    another shape would broadcast silently where it is copied or averaged)."""
    if not isinstance(t, Tensor) or tuple(t.shape) != tuple(shape) or not t.is_floating_point():
        got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{what}: expected a floating-point tensor of shape {tuple(shape)}, got {got}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what}: has non-finite values")


@torch.no_grad()
def load_trainable(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``state`` into the model's trainable parameters (the keys must be exactly those).

    Raises:
        KeyError: a key is missing or unexpected.
        ValueError: a tensor of another shape (``copy_`` would broadcast it silently), not floating point,
            or not finite. Nothing is copied then.
    """
    params = trainable_state(model)
    if params.keys() != state.keys():
        missing, extra = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
        raise KeyError(f"state: missing keys {missing[:6]}, unexpected keys {extra[:6]}")
    for k, p in params.items():
        check_tensor(f"state[{k!r}]", state[k], p.shape)
    for k, p in params.items():
        p.copy_(state[k].to(device=p.device, dtype=p.dtype))


def adapter_config(model: nn.Module) -> dict:
    """The settings every party must share: method, r, alpha, seed, rslora, targets, trained tensors."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model: no FFA-LoRA/LoRA adapters; call inject_adapters first")
    first = next(iter(layers.values()))
    for name, layer in layers.items():
        same = (layer.r, layer.alpha, layer.seed, layer.train_A, layer.use_rslora) == (
            first.r, first.alpha, first.seed, first.train_A, first.use_rslora
        )
        if not same:
            raise ValueError(f"model: adapter {name!r} differs from {first.name!r} in r/alpha/seed/method")
    return {
        "method": "lora" if first.train_A else "ffa",
        "r": first.r,
        "alpha": first.alpha,
        "seed": first.seed,
        "use_rslora": first.use_rslora,
        "targets": sorted(layers),
        "tensors": {k: [list(p.shape), str(p.dtype).removeprefix("torch.")] for k, p in trainable_state(model).items()},
    }


def fingerprint(config: dict) -> str:
    """SHA-256 (hex, 16 chars) of the canonical JSON of an ``adapter_config``."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]

"""The adapter state clients and server exchange, and the fingerprint that says two adapters are compatible.

FFA-LoRA (Sun et al., ICLR 2024, arXiv 2403.12313): every client regenerates the same frozen A from
``(seed, layer name)``, so the exchanged state is B (plus any fully trained head); in LoRA mode A and B.
Two parties may only exchange updates when method, rank, alpha, seed, scaling, targets and (FFA-LoRA) the
frozen A's values agree: the fingerprint hashes exactly these.
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


def check_state(what: str, tensors: dict, reference: dict[str, Tensor], reference_name: str) -> None:
    """Raise ValueError naming ``what`` unless ``tensors`` holds exactly ``reference``'s keys, each a finite
    tensor of its shape and dtype (``check_tensor``): a client's update against the global state, a server's
    broadcast against a node's own. ``reference_name`` says what ``reference`` is in the messages."""
    if set(tensors) != set(reference):
        extra, missing = sorted(set(tensors) - set(reference)), sorted(set(reference) - set(tensors))
        raise ValueError(f"{what}: expected {reference_name}'s keys, got {len(extra)} unexpected {extra[:3]} and "
                         f"{len(missing)} missing {missing[:3]}")
    for k, g in reference.items():
        check_tensor(f"{what}: {k}", tensors[k], g.shape)
        if tensors[k].dtype != g.dtype:
            raise ValueError(f"{what}: {k}: expected {g.dtype} ({reference_name}'s), got {tensors[k].dtype}")


@torch.no_grad()
def load_trainable(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``state`` into the model's trainable parameters (the keys must be exactly those).

    Raises:
        KeyError: a key is missing or unexpected.
        ValueError: a tensor of another shape (``copy_`` would broadcast it silently), not floating point,
            or not finite; or an adapter merged into its weight (``unmerge()`` would then subtract the new
            B's delta from a weight that holds the old one's). Nothing is copied then.
    """
    merged = [n for n, layer in adapter_layers(model).items() if layer.merged]
    if merged:
        raise ValueError(f"model: adapters {merged[:6]} are merged into their weights: unmerge() them before "
                         "loading new adapter tensors (as load_state_dict requires)")
    params = trainable_state(model)
    if params.keys() != state.keys():
        missing, extra = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
        raise KeyError(f"state: missing keys {missing[:6]}, unexpected keys {extra[:6]}")
    for k, p in params.items():
        check_tensor(f"state[{k!r}]", state[k], p.shape)
        # (in the parameter's own dtype too: a float64 1e300 is finite, and inf once cast to float32)
        if state[k].dtype != p.dtype and not bool(torch.isfinite(state[k].to(p.dtype)).all()):
            raise ValueError(f"state[{k!r}]: {state[k].dtype} values beyond the range of the model's {p.dtype}")
    for k, p in params.items():
        p.copy_(state[k].to(device=p.device, dtype=p.dtype))


def frozen_A_digest(layers: dict) -> str:
    """SHA-256 (hex) of every frozen A (FFA-LoRA) in name order: its name, shape and float32 bytes.

    The seed and the layer names do not pin A down alone: A comes from the name a layer was *created* with
    (``inject_adapters(model.backbone, ...)`` names it inside the backbone), ``load_peft`` may bring a file's A
    and ``from_peft`` peft's own random A, and another torch release may draw other numbers from one seed.
    Averaging B over clients holding different A is silently wrong, so the fingerprint hashes A itself."""
    for name in sorted(layers):
        if layers[name].lora_A.is_meta:
            raise ValueError(f"model: adapter {name!r} is on the meta device (no A yet): to_empty() it first")
    return _float32_sha256((name, layers[name].lora_A) for name in sorted(layers))


def frozen_new_digest(model: nn.Module) -> str | None:
    """SHA-256 (hex) of the frozen tensors of the modules the base checkpoint lacked (``model.fedlora_new_modules``,
    set by the simulation's ``load_model``: a classification head drawn from the seed), in name order; None
    where there are none. Every party draws such a head itself, and it is never exchanged when frozen
    (``--trainable-modules ''``): like A, another torch or transformers release may draw other numbers."""
    frozen = [(f"{m}.{n}", p) for m in sorted(getattr(model, "fedlora_new_modules", ()))
              for n, p in model.get_submodule(m).named_parameters() if not p.requires_grad]
    return _float32_sha256(frozen) if frozen else None


def _float32_sha256(named) -> str:
    """SHA-256 (hex) of ``(name, tensor)`` pairs in the given order: each name, shape and float32 bytes."""
    h = hashlib.sha256()
    for name, t in named:
        h.update(f"{name}:{tuple(t.shape)}:".encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def adapter_config(model: nn.Module) -> dict:
    """The settings every party must share: method, r, alpha, scale, seed, rslora, targets, trained tensors,
    (FFA-LoRA) a digest of the frozen A's values (``frozen_A_digest``), and of the frozen modules the base
    checkpoint lacked, where there are any (``frozen_new_digest``)."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model: no FFA-LoRA/LoRA adapters; call inject_adapters first")
    first = next(iter(layers.values()))
    for name, layer in layers.items():
        same = (layer.r, layer.alpha, layer.scale, layer.seed, layer.train_A, layer.use_rslora) == (
            first.r, first.alpha, first.scale, first.seed, first.train_A, first.use_rslora
        )
        if not same:
            raise ValueError(f"model: adapter {name!r} differs from {first.name!r} in r/alpha/scale/seed/method")
    config = {
        "method": "lora" if first.train_A else "ffa",
        "r": first.r,
        "alpha": first.alpha,
        "scale": first.scale,  # (a mutable attribute: what the forward multiplies by, whatever alpha says)
        "seed": first.seed,
        "use_rslora": first.use_rslora,
        "targets": sorted(layers),
        "tensors": {k: [list(p.shape), str(p.dtype).removeprefix("torch.")] for k, p in trainable_state(model).items()},
    }
    if not first.train_A:  # (LoRA's A is trained and exchanged: the server's state holds it)
        config["A_sha256"] = frozen_A_digest(layers)
    new = frozen_new_digest(model)
    if new is not None:  # (only then: a run without such modules keeps the fingerprint it had)
        config["new_frozen_sha256"] = new
    return config


def fingerprint(config: dict) -> str:
    """SHA-256 (hex, 16 chars) of the canonical JSON of an ``adapter_config``."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]

"""``inject_adapters``: put FFA-LoRA (or LoRA) adapters on a model's linear layers and freeze the rest.

Target names follow peft: a module matches a target when its qualified name equals it or ends with
``"." + target``; ``"all-linear"`` takes every ``nn.Linear`` except the output layer (the model's output
embeddings and heads named ``classifier``/``score``/``lm_head``, and any ``trainable_modules``).
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from fedlora_fast.layers.ffa_linear import FFALoRALinear
from fedlora_fast.layers.per_sample_modules import _PerSampleMixin, make_per_sample

ALL_LINEAR = "all-linear"
OUTPUT_LAYER_NAMES = ("classifier", "score", "lm_head")


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _as_list(value: str | Iterable[str] | None, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    out = list(value)
    if not all(isinstance(v, str) for v in out):
        raise TypeError(f"{what}: expected a string or a list of strings, got {value!r}")
    return out


def _output_layer_names(model: nn.Module) -> set[str]:
    out = set()
    get_out = getattr(model, "get_output_embeddings", None)
    emb = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if module is emb or name.split(".")[-1] in OUTPUT_LAYER_NAMES:
            out.add(name)
    return out


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def find_targets(model: nn.Module, target_modules: str | Iterable[str], exclude: Iterable[str] = ()) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules ``target_modules`` selects.

    Raises:
        ValueError: a target matches nothing, or matches a module that is not an ``nn.Linear``.
    """
    targets = _as_list(target_modules, "target_modules")
    if not targets:
        raise ValueError("target_modules: expected at least one module name or 'all-linear', got none")
    excluded = set(exclude)
    modules = dict(model.named_modules())
    adapted = [n for n, m in modules.items() if isinstance(m, FFALoRALinear)]
    # not adaptable: an adapter's own base layer (wrapping it again would bypass the adapter), and the linear
    # children of nn.MultiheadAttention, which reads their weight and bias directly (an adapter never runs)
    owner = {n: a for n in modules for a in adapted if n.startswith(a + ".")}
    mha = {f"{n}.{c}" if n else c: n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)
           for c, _ in m.named_children()}  # fmt: skip
    trained = {n for n, m in modules.items() if isinstance(m, _PerSampleMixin)}  # trained in full by an earlier call
    linear = [n for n, m in modules.items() if isinstance(m, nn.Linear) and not isinstance(m, FFALoRALinear)
              and n not in owner and n not in mha and n not in trained]  # fmt: skip
    if ALL_LINEAR in targets:
        skip = _output_layer_names(model) | excluded
        chosen = [n for n in linear if not any(_matches(n, s) or n.startswith(s + ".") for s in skip)]
        if not chosen:
            raise ValueError("target_modules='all-linear': the model has no nn.Linear besides its output layer")
        return chosen
    chosen = []
    for target in targets:
        hits = [n for n in modules if n and _matches(n, target)]
        if not hits:
            sample = sorted({n.split(".")[-1] for n in linear})[:12]
            raise ValueError(
                f"target_modules: {target!r} matches no module of {type(model).__name__}; "
                f"linear layer names there include {sample}"
            )
        for n in hits:
            m = modules[n]
            if isinstance(m, FFALoRALinear):
                raise ValueError(f"target_modules: {n!r} already has an adapter")
            if n in owner:
                raise ValueError(f"target_modules: {n!r} is inside the adapter {owner[n]!r}; it already has one")
            if n in trained:
                raise ValueError(f"target_modules: {n!r} is trained in full (trainable_modules of an earlier call); "
                                 "an adapter would freeze it")
            if n in mha:
                raise ValueError(
                    f"target_modules: {n!r} belongs to nn.MultiheadAttention {mha[n] or type(model).__name__!r}, "
                    "which reads its weight directly: an adapter there would never run"
                )
            if not isinstance(m, nn.Linear):
                raise ValueError(f"target_modules: {n!r} is a {type(m).__name__}, expected torch.nn.Linear")
            if n not in chosen:
                chosen.append(n)
    return chosen


def inject_adapters(
    model: nn.Module,
    target_modules: str | Iterable[str] = ("q_proj", "v_proj"),
    r: int = 8,
    alpha: float = 16.0,
    seed: int = 0,
    train_A: bool = False,
    dropout: float = 0.0,
    *,
    trainable_modules: str | Iterable[str] | None = None,
    use_rslora: bool = False,
) -> dict[str, FFALoRALinear]:
    """Replace the targeted linear layers by ``FFALoRALinear`` and freeze every other parameter.

    Args:
        model: any ``nn.Module`` (Hugging Face BERT/RoBERTa ``query``/``value``…, Llama ``q_proj``…).
        target_modules: names (peft matching) or ``"all-linear"``.
        r, alpha, seed, train_A, dropout, use_rslora: see ``FFALoRALinear``.
        trainable_modules: extra modules trained in full with exact per-sample gradients, e.g.
            ``["classifier"]`` for a classification head.
    Returns:
        ``{qualified_name: layer}`` for every adapter added.
    """
    extra = _as_list(trainable_modules, "trainable_modules")
    extra_names = []
    for target in extra:
        hits = [n for n, _ in model.named_modules() if n and _matches(n, target)]
        if not hits:
            raise ValueError(f"trainable_modules: {target!r} matches no module of {type(model).__name__}")
        extra_names += [h for h in hits if not any(h.startswith(e + ".") for e in hits if e != h)]
    names = find_targets(model, target_modules, exclude=extra_names)
    clash = [n for n in names if any(n == e or n.startswith(e + ".") for e in extra_names)]
    if clash:
        raise ValueError(f"target_modules and trainable_modules overlap: {clash}")
    # everything else is frozen; adapters and trainable modules of an earlier call keep what they train
    kept = {id(p) for m in model.modules() if isinstance(m, FFALoRALinear) for p in (m.lora_A, m.lora_B) if p.requires_grad}
    kept |= {id(p) for m in model.modules() if isinstance(m, _PerSampleMixin) for p in m.parameters() if p.requires_grad}
    for p in model.parameters():
        p.requires_grad_(id(p) in kept)
    adapters = {}
    for name in names:
        layer = FFALoRALinear(
            model.get_submodule(name), r, alpha, seed=seed, name=name, train_A=train_A,
            dropout=dropout, use_rslora=use_rslora,
        )
        _set_submodule(model, name, layer)
        adapters[name] = layer
    for name in extra_names:
        make_per_sample(model.get_submodule(name), name)
    return adapters


def adapter_layers(model: nn.Module) -> dict[str, FFALoRALinear]:
    """Every ``FFALoRALinear`` in ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FFALoRALinear)}

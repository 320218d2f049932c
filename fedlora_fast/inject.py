"""``inject_adapters``: put FFA-LoRA (or LoRA) adapters on a model's linear layers and freeze the rest.

Target names follow peft's list form: a module matches a target when its qualified name equals it or ends
with ``"." + target``; ``"all-linear"`` takes every ``nn.Linear`` (and transformers ``Conv1D``, GPT-2's) except
the output layer (the model's output embeddings and heads named ``classifier``/``score``/``lm_head``, and any
``trainable_modules``). Unlike peft, a single string is one such name, not a regular expression.
"""

from __future__ import annotations

import sys
from typing import Iterable

import torch
from torch import nn

from fedlora_fast.layers.ffa_linear import FFALoRALinear, base_problem, check_layer_args, is_conv1d
from fedlora_fast.layers.per_sample_modules import (
    _PerSampleMixin,
    make_per_sample,
    per_sample_error,
    per_sample_problems,
)

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


def peft_modules(model: nn.Module) -> list[str]:
    """``"name (module.Class)"`` of every peft tuner layer or ``modules_to_save`` wrapper in ``model``.

    Adapters injected there would nest inside peft's layers (or wrap its ``base_layer``) and peft would keep
    running its own adapter around them. peft is imported only if already loaded (a peft module cannot exist
    otherwise); without it, any class from a ``peft`` package counts.
    """
    classes: tuple[type, ...] = ()
    if "peft" in sys.modules:
        try:
            from peft.tuners.tuners_utils import BaseTunerLayer
            from peft.utils.other import AuxiliaryTrainingWrapper

            classes = (BaseTunerLayer, AuxiliaryTrainingWrapper)
        except ImportError:  # pragma: no cover - a peft without these names
            pass
    out = []
    for name, m in model.named_modules():
        cls = type(m)
        if isinstance(m, classes) or (not classes and cls.__module__.split(".")[0] == "peft"):
            out.append(f"{name or type(model).__name__} ({cls.__module__}.{cls.__name__})")
    return out


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
    if isinstance(module, FFALoRALinear) and isinstance(parent, nn.TransformerEncoderLayer):
        _no_fused_encoder(model, parent)


def _slow_path(module: nn.Module, args) -> None:
    """A forward pre-hook that changes nothing: its presence keeps ``nn.TransformerEncoderLayer`` off its fused
    path. It refuses a nested tensor (what an ``nn.TransformerEncoder`` built around the layer after injection
    packs a padded eval batch into): the adapters cannot take one."""
    if args and isinstance(args[0], torch.Tensor) and args[0].is_nested:
        raise ValueError(
            f"{type(module).__name__} with adapters got a nested tensor: its nn.TransformerEncoder packs padded eval "
            "batches into nested tensors, which the adapters cannot take; set encoder.use_nested_tensor = False, or "
            "build the encoder first and inject the adapters into it (inject_adapters then sets that itself)"
        )
    return None


def _no_fused_encoder(model: nn.Module, layer: nn.TransformerEncoderLayer) -> None:
    """Keep an adapted ``nn.TransformerEncoderLayer`` on its module-by-module path.

    In eval mode (no autocast, grad off or nothing requiring it) the layer runs one fused op on
    ``linear1.weight`` and ``linear2.weight`` read directly: an adapter there never ran, and eval outputs were the
    base model's. The layer leaves that path whenever a submodule has a forward hook: it gets a no-op pre-hook.
    An ``nn.TransformerEncoder`` holding it stops packing padded batches into nested tensors in eval, which the
    layers' module-by-module path (and the adapter) would get instead (``use_nested_tensor = False``)."""
    if _slow_path not in layer._forward_pre_hooks.values():
        layer.register_forward_pre_hook(_slow_path)
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(sub is layer for sub in m.layers):
            m.use_nested_tensor = False


_REGEX_CHARS = set("*+?[]()|\\^$")


def find_targets(model: nn.Module, target_modules: str | Iterable[str], exclude: Iterable[str] = ()) -> list[str]:
    """Qualified names of the ``nn.Linear`` (or transformers ``Conv1D``) modules ``target_modules`` selects.

    Raises:
        ValueError: a target matches nothing, or matches a module that is not an ``nn.Linear`` or ``Conv1D``.
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
    linear = [n for n, m in modules.items() if (isinstance(m, nn.Linear) or is_conv1d(m))
              and not isinstance(m, FFALoRALinear)
              and n not in owner and n not in mha and n not in trained]  # fmt: skip
    if ALL_LINEAR in targets:
        skip = _output_layer_names(model) | excluded
        chosen = [n for n in linear if not any(_matches(n, s) or n.startswith(s + ".") for s in skip)]
        if not chosen:
            raise ValueError("target_modules='all-linear': the model has no nn.Linear (or Conv1D) besides its output "
                             "layer")
        odd = [f"{n} ({base_problem(modules[n])})" for n in chosen if base_problem(modules[n])]
        if odd:
            raise ValueError(f"target_modules='all-linear': cannot adapt {odd[:4]}; list the targets to adapt instead")
        return chosen
    chosen = []
    for target in targets:
        hits = [n for n in modules if n and _matches(n, target)]
        if not hits:
            sample = sorted({n.split(".")[-1] for n in linear})[:12]
            regex = "; it is matched as a name, not as a regex (as a string is in peft)" if _REGEX_CHARS & set(target) \
                else ""
            raise ValueError(
                f"target_modules: {target!r} matches no module of {type(model).__name__}; "
                f"linear layer names there include {sample}{regex}"
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
            if not isinstance(m, nn.Linear) and not is_conv1d(m):
                raise ValueError(f"target_modules: {n!r} is a {type(m).__name__}, expected torch.nn.Linear or "
                                 "transformers' Conv1D")
            if base_problem(m):
                raise ValueError(f"target_modules: {n!r}: {base_problem(m)}")
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
        target_modules: names, matched as peft matches a list (a module's qualified name equals the
            target or ends with ``"." + target``), or ``"all-linear"``. A single string is one name: peft
            reads a string as a regex (``re.fullmatch``), this does not.
        r, alpha, seed, train_A, dropout, use_rslora: see ``FFALoRALinear``.
        trainable_modules: extra modules trained in full with exact per-sample gradients, e.g.
            ``["classifier"]`` for a classification head. ``nn.Linear``, ``nn.LayerNorm`` (last dim) and
            ``nn.Embedding`` have rules of their own; other leaves with parameters go through ``torch.func``
            (``layers.per_sample_modules``).
    Returns:
        ``{qualified_name: layer}`` for every adapter added.
    Raises:
        ValueError, TypeError: targets, trainable modules or arguments it cannot use; checked before the
            model is changed, so a refused call leaves it as it was.
    """
    peft_layers = peft_modules(model)
    if peft_layers:
        raise ValueError(
            f"model: has peft layers {peft_layers[:4]}; adapters would nest inside them: convert the peft "
            "model with ff.from_peft(peft_model) instead"
        )
    extra = _as_list(trainable_modules, "trainable_modules")
    extra_names = []
    for target in extra:
        hits = [n for n, _ in model.named_modules() if n and _matches(n, target)]
        if not hits:
            # the names a target can end with, as target_modules' error lists linear layer names, so the user
            # sees the model's spelling; list indices ("0") only in qualified names ("layers.0"), the sole
            # names of a bare nn.Sequential
            qualified = [n for n, _ in model.named_modules() if n]
            known = sorted({n.rpartition(".")[2] for n in qualified if not n.rpartition(".")[2].isdigit()})
            known = known or qualified
            more = f" and {len(known) - 20} more" if len(known) > 20 else ""
            raise ValueError(
                f"trainable_modules: {target!r} matches no module of {type(model).__name__}; "
                f"module names there include {known[:20]}{more}"
            )
        extra_names += [h for h in hits if not any(h.startswith(e + ".") for e in hits if e != h)]
    names = find_targets(model, target_modules, exclude=extra_names)
    clash = [n for n in names if any(n == e or n.startswith(e + ".") for e in extra_names)]
    if clash:
        raise ValueError(f"target_modules and trainable_modules overlap: {clash}")
    for name in names:
        check_layer_args(model.get_submodule(name), r, alpha, dropout, seed)
    unsupported = [u for name in extra_names for u in per_sample_problems(model.get_submodule(name), name)]
    if unsupported:
        raise per_sample_error(unsupported, "trainable_modules")
    empty = [n for n in extra_names if not any(True for _ in model.get_submodule(n).parameters())]
    if empty:
        raise ValueError(f"trainable_modules: {empty[:8]} hold no parameters (nothing to train); name modules with "
                         "weights (a parameter-free norm, say, is not one)")
    bases = {id(t): n for n in names for t in (model.get_submodule(n).weight, model.get_submodule(n).bias)
             if t is not None}
    tied = sorted({f"{e} and {bases[id(p)]}" for e in extra_names for p in model.get_submodule(e).parameters()
                   if id(p) in bases})
    if tied:
        raise ValueError(f"trainable_modules and target_modules: {tied[:4]} share a tensor (tied weights): an "
                         "adapter's base weight stays frozen, so it cannot be trained as well; adapt it or train it")
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
    mark_tied_bases(model, adapters)
    for name in extra_names:
        make_per_sample(model.get_submodule(name), name)
    return adapters


def mark_tied_bases(model: nn.Module, layers: dict[str, FFALoRALinear]) -> None:
    """Record on each layer the model's other names of its base weight (``FFALoRALinear.tied_with``): a tied
    ``lm_head`` shares its weight with the input embedding, which ``merge()`` must not change."""
    names: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(pname)
    paths: dict[int, list[str]] = {}  # every path to a module (a block reused at several depths has several)
    for mname, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(mname)
    for n, layer in layers.items():
        # the weight reached through the adapter itself, under any of the adapter's paths, is not a tie (W += s B A
        # is what every such alias computes); a path to the plain base layer that skips the adapter is one
        own = {f"{q}.base_layer.weight" if q else "base_layer.weight" for q in paths.get(id(layer), ())}
        layer.tied_with = tuple(sorted(x for x in names.get(id(layer.base_layer.weight), ()) if x not in own))


def adapter_layers(model: nn.Module) -> dict[str, FFALoRALinear]:
    """Every ``FFALoRALinear`` in ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FFALoRALinear)}

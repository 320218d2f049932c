"""Drop-in for peft: convert a peft LoRA model to ``FFALoRALinear`` and exchange peft adapter directories.

Follows peft's on-disk LoRA format (``PeftModel.save_pretrained``; checked against peft 0.21.2): ``adapter_config.json``
(a ``LoraConfig``) and ``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight``
(r, in) and ``...lora_B.weight`` (out, r), and, for ``modules_to_save``, the module's own state-dict keys
``base_model.model.<module>.<param>``. ``<module>`` is the qualified name in the original model, which is
also the name our layers carry, so ``PeftModel.from_pretrained(base, dir)`` loads what ``export_peft`` writes.
What peft has no field for (FFA-LoRA or LoRA, A's seed) goes to a side file, ``fedlora_fast.json``: peft
warns on unknown keys in its config, so none are added there.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from fedlora_fast.inject import _matches, _set_submodule, adapter_layers, mark_tied_bases, peft_modules
from fedlora_fast.io import atomic_write_bytes, atomic_write_text
from fedlora_fast.layers.ffa_linear import (
    FFALoRALinear,
    base_features,
    base_problem,
    check_layer_args,
    has_listed_linear_forward,
    init_lora_A,
    is_conv1d,
)
from fedlora_fast.layers.per_sample_modules import make_per_sample, per_sample_error, per_sample_problems

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
META_NAME = "fedlora_fast.json"
PREFIX = "base_model.model."
META_FORMAT = "fedlora_fast.peft_export"

# Model class name suffix -> peft TaskType (which PeftModel subclass from_pretrained builds).
_TASK_TYPES = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


# peft's LoraConfig default for lora_alpha (8 in peft 0.21, not r): a config without it is read so, as
# PeftModel.from_pretrained reads it (scale 8 / r), whatever r is
PEFT_DEFAULT_LORA_ALPHA = 8


# peft's TaskType values, and the heads its task classes add to modules_to_save (whatever the config says)
PEFT_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
_TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"], "QUESTION_ANS": ["qa_outputs"]}


def _overlaps(name: str, others: Iterable[str]) -> bool:
    """``name`` is one of ``others``, sits inside one or holds one (qualified module names)."""
    return any(name == o or name.startswith(o + ".") or o.startswith(name + ".") for o in others)


def _peft_wraps(modules: dict, saved: list[str]) -> set[str]:
    """The module names peft's ``modules_to_save`` rule wraps for ``saved``: a plain suffix (``classifier`` also
    takes ``pre_classifier``)."""
    return {k for k in modules for m in saved if k and k.endswith(m)}


def _suffix_clashes(modules: dict, saved: list[str], adapters: list[str]) -> list[str]:
    """Module names that peft would wrap for ``saved`` (``_peft_wraps``) and that are, hold or sit inside an
    adapter layer: peft refuses those."""
    return sorted(k for k in _peft_wraps(modules, saved) if _overlaps(k, adapters))


def _export_alpha(layer: FFALoRALinear) -> float:
    """peft's ``lora_alpha`` for the scale the layer computes with (``scale`` may have been set by hand)."""
    denom = math.sqrt(layer.r) if layer.use_rslora else layer.r
    return layer.alpha if math.isclose(layer.scale, layer.alpha / denom, rel_tol=1e-12) else layer.scale * denom


def _method(layer: FFALoRALinear) -> str:
    return "lora" if layer.train_A else "ffa"


def _infer_task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task in _TASK_TYPES:
        if name.endswith(suffix):
            return task
    return None


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's ``OptimizedModule``, (Distributed)DataParallel and peft's wrappers.

    Their qualified names gain a prefix (``_orig_mod.``, ``module.``, ``base_model.model.``) that the model peft
    loads into does not have: peft silently ignores keys written with it. A peft model passed to ``from_peft``
    (converted in place) exported itself under ``base_model.model.base_model.model.``: a directory neither peft
    nor ``load_peft`` could load.
    """
    wrappers: tuple[type, ...] = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    if "torch._dynamo" in sys.modules:  # torch.compile was used: its wrapper class exists
        from torch._dynamo.eval_frame import OptimizedModule

        wrappers += (OptimizedModule,)
    while True:
        if isinstance(model, wrappers):
            model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
            continue
        inner = _peft_inner(model)
        if inner is None:
            return model
        model = inner


def _peft_inner(model: nn.Module) -> nn.Module | None:
    """The model inside one of peft's wrappers: a ``PeftModel`` (and its task subclasses), a ``PeftMixedModel``
    (``get_peft_model(..., mixed=True)``), a tuner (``LoraModel``: ``PeftModel.base_model``); None for anything
    else (a model ``peft.inject_adapter_in_model`` changed; everything where peft was never imported)."""
    if "peft" not in sys.modules:
        return None
    from peft import PeftMixedModel, PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        return model.get_base_model()
    if isinstance(model, PeftMixedModel):  # (no get_base_model: its tuner's model)
        return model.base_model.model
    if isinstance(model, BaseTuner):  # names without "model."
        return model.model
    return None


def _infer_modules_to_save(model: nn.Module, adapters: dict[str, FFALoRALinear]) -> list[str]:
    """The outermost modules whose parameters are all trainable, outside the adapters (a head, a norm).

    A tied tensor (``lm_head.weight`` is ``embed_tokens.weight``) is listed under each module holding it:
    peft unties ``modules_to_save``, so a module left out would keep the old weight.
    """
    in_adapter = {id(p) for layer in adapters.values() for p in layer.parameters()}
    modules = dict(model.named_modules())

    def all_trainable(name: str) -> bool:
        params = list(modules[name].parameters())
        return bool(params) and all(p.requires_grad and id(p) not in in_adapter for p in params)

    out: set[str] = set()
    for pname, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad or id(p) in in_adapter:
            continue
        owner = pname.rpartition(".")[0]
        while owner and "." in owner and all_trainable(owner.rpartition(".")[0]):
            owner = owner.rpartition(".")[0]
        if not owner:
            raise ValueError(f"model: trainable parameter {pname!r} belongs to no submodule; peft cannot save it")
        out.add(owner)
    return sorted(out)


def _outermost(module_names: list[str]) -> list[str]:
    """``module_names`` without repeats and without those inside another listed module, in order."""
    names = list(dict.fromkeys(module_names))
    return [m for m in names if not any(m.startswith(o + ".") for o in names)]


def _tied_outside(model: nn.Module, module_names: list[str]) -> list[str]:
    """Names, outside ``module_names``, of parameters that the listed modules hold too (tied weights)."""
    ids = {id(p) for m in module_names for p in model.get_submodule(m).parameters()}
    return sorted(
        pname for pname, p in model.named_parameters(remove_duplicate=False)
        if id(p) in ids and not any(pname.startswith(m + ".") for m in module_names)
    )


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """peft ``target_modules``: the short names (``q_proj``) when they select exactly ``names``, else full names."""
    short = sorted({n.rpartition(".")[2] for n in names})
    selected = {n for n, _ in model.named_modules() if n and any(_matches(n, s) for s in short)}
    return short if selected == set(names) else sorted(names)


def _pattern(values: dict[str, float | int], default: float | int, names: list[str]) -> dict[str, float | int]:
    """peft's ``rank_pattern``/``alpha_pattern`` for the odd ones out. peft (0.21) matches a key as
    ``(.*\\.)?(key)$``, so a bare ``enc\\.q`` would also set ``dec.enc.q``: where another adapted layer's name
    (``names``) ends with ``.`` + this one, ``^`` anchors the key to the full name. Elsewhere the key stays
    bare, as every peft version since 0.13 reads it."""
    out = {}
    for n, v in sorted(values.items()):
        if v != default:
            clash = any(m != n and m.endswith("." + n) for m in names)
            out[("^" if clash else "") + re.escape(n)] = v
    return out


def _pattern_value(pattern: dict[str, Any], name: str, default: Any) -> Any:
    for key, value in pattern.items():  # peft.utils.other.get_pattern_key: first match wins
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_peft(
    model: nn.Module,
    save_dir: str | os.PathLike,
    *,
    modules_to_save: Iterable[str] | None = None,
    also_save: Iterable[str] = (),
    task_type: str | None = "auto",
    base_model_name_or_path: str | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write ``model``'s adapters as a peft LoRA adapter directory that ``PeftModel.from_pretrained`` loads.

    Args:
        model: a model with ``FFALoRALinear`` layers (``inject_adapters`` or ``from_peft``); names are
            qualified names in ``model``, so pass the same model class peft will load into.
        save_dir: directory to create (or update: the two peft files and ``fedlora_fast.json`` are replaced).
        modules_to_save: fully trained modules to save with the adapters (peft's ``modules_to_save``);
            default: the outermost modules whose parameters are all trainable (e.g. ``["classifier"]``).
            peft also wraps every module whose name ends with an entry (``classifier`` takes DistilBERT's
            ``pre_classifier``) and wants its weights: such modules are saved too (their current weights, so the
            load computes what ``model`` does), unless they hold an adapter (warned: peft cannot load that).
        also_save: modules saved in full besides ``modules_to_save``, though frozen: those the base checkpoint
            lacks, such as a classification head initialised anew, which each load would otherwise draw anew.
        task_type: peft TaskType (``"SEQ_CLS"``, ``"CAUSAL_LM"``...); ``"auto"`` infers it from the model's
            class name; None leaves it unset (``PeftModel.from_pretrained`` then builds a plain ``PeftModel``).
        base_model_name_or_path: recorded in the config; default ``model.config.name_or_path`` if any.
        metadata: extra JSON-serialisable data stored in ``fedlora_fast.json`` under ``"user"``.
    Returns:
        The directory path.
    Raises:
        ValueError: no adapters, adapters that peft's single LoraConfig cannot describe (mixed
            ``use_rslora`` or dropout), adapters whose qualified name does not end with the one they were
            created with (a wrapper other than torch.compile's, DataParallel's, DistributedDataParallel's or
            peft's, which are unwrapped), or
            ``modules_to_save`` holding weights tied to a module not listed.
    """
    from safetensors.torch import save as save_bytes

    if task_type not in (None, "auto", *PEFT_TASK_TYPES):
        raise ValueError(f"task_type: expected None, 'auto' or one of peft's {PEFT_TASK_TYPES}, got {task_type!r}")
    model = _unwrap(model)
    adapters = adapter_layers(model)
    if not adapters:
        raise ValueError("model: no FFALoRALinear adapters to export; call inject_adapters or from_peft first")
    names = list(adapters)
    # a layer created under a submodule (inject_adapters(model.backbone, ...)) exports under its full name here,
    # which is what peft loads into this model (A's seed name is kept in the metadata); a name that does not
    # end with the creation name was changed by something else (a wrapper that is not unwrapped)
    renamed = [f"{n} (created as {l.name!r})" for n, l in adapters.items()
               if l.name and l.name != n and not n.endswith("." + l.name)]
    if renamed:
        raise ValueError(
            f"model: adapters under a name that does not end with the one they were created with: {renamed[:4]} "
            "(a wrapper fedlora_fast does not unwrap?); export the model inject_adapters was called on, or the "
            "model it is part of"
        )
    for what in ("use_rslora", "dropout"):
        values = {n: (l.use_rslora if what == "use_rslora" else _dropout_p(l)) for n, l in adapters.items()}
        if len(set(values.values())) > 1:
            raise ValueError(f"model: peft's LoraConfig holds one {what} for all layers, the adapters have {values}")
    rs = {n: l.r for n, l in adapters.items()}
    alphas = {n: _num(_export_alpha(l)) for n, l in adapters.items()}
    r = Counter(rs.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    if modules_to_save is None:
        modules_to_save = _infer_modules_to_save(model, adapters)
    else:
        modules_to_save = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save)
    also_save = [also_save] if isinstance(also_save, str) else list(also_save)
    all_modules = dict(model.named_modules())
    for arg, listed in (("modules_to_save", modules_to_save), ("also_save", also_save)):
        for m in listed:
            if not isinstance(m, str) or m not in all_modules or not m:
                raise ValueError(f"{arg}: {m!r} is not a submodule of {type(model).__name__}")
            if _overlaps(m, names):
                raise ValueError(f"{arg}: {m!r} overlaps an adapter layer")
    modules_to_save = _outermost([*modules_to_save, *also_save])  # (peft cannot wrap a module inside a wrapped one)
    inferred = task_type == "auto"
    if inferred:
        task_type = _infer_task_type(model)
    heads = _TASK_HEADS.get(task_type, [])
    # peft's task class wraps its head whole (RoBERTa's classifier, for a trained classifier.out_proj): saved whole
    for k in sorted(_peft_wraps(all_modules, heads)):
        inner = [m for m in modules_to_save if m.startswith(k + ".")]
        if inner and not _overlaps(k, names):
            modules_to_save = [m for m in modules_to_save if m not in inner] + [k]
    while True:  # peft's suffix rule wraps these too (DistilBERT's frozen pre_classifier for "classifier"): save them
        wrapped = sorted(k for k in _peft_wraps(all_modules, modules_to_save)
                         if not _overlaps(k, modules_to_save) and not _overlaps(k, names))
        if not wrapped:
            break
        modules_to_save += wrapped
    tied = _tied_outside(model, modules_to_save)
    if tied:
        raise ValueError(
            f"modules_to_save: {modules_to_save} share weights with {tied[:8]} (tied); peft unties modules_to_save, "
            "so the unlisted module would keep the old weight: list its module too"
        )
    clashes = _suffix_clashes(all_modules, heads, names)
    # peft's task class also expects a saved copy of every module its head names match; a frozen head that
    # this export does not save (RoBERTa's classifier with adapters elsewhere) fails its load with a KeyError
    unsaved = sorted(k for k in _peft_wraps(all_modules, heads) if not _overlaps(k, names)
                     and not any(k == m or k.startswith(m + ".") for m in modules_to_save))
    if (clashes or unsaved) and inferred:  # a plain PeftModel loads these; the task's class would not
        task_type = None
    elif clashes or unsaved:
        raise ValueError(
            f"task_type: peft's {task_type} saves {heads} in full (modules_to_save), and "
            + (f"{clashes[:4]} hold adapters, which peft cannot wrap" if clashes else
               f"{unsaved[:4]} are not saved (not trained), so peft would find no weights for them")
            + ": pass task_type=None"
        )
    # peft also wraps every other module whose name ends with an entry: the unsaved ones were added above; one
    # that holds (or sits in) an adapter layer it cannot wrap
    clashes = _suffix_clashes(all_modules, modules_to_save, names)
    if clashes:
        warnings.warn(
            f"export_peft: peft matches modules_to_save {modules_to_save} as plain suffixes, so it would also wrap "
            f"the adapted {clashes[:4]} and PeftModel.from_pretrained will refuse {str(save_dir)!r}; "
            "fedlora_fast.load_peft reads it (or adapt/train modules whose names are not suffixes of each other)",
            RuntimeWarning, stacklevel=2,
        )
    if base_model_name_or_path is None:
        cfg = getattr(model, "config", None)
        base_model_name_or_path = getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None) or None
    first = adapters[names[0]]
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": _target_modules(model, names),
        "lora_dropout": _dropout_p(first),
        # peft sets it per layer from the base's type anyway (True for a Conv1D, False for nn.Linear, with a
        # warning where the config says otherwise): the config follows the adapted layers to spare that warning
        "fan_in_fan_out": all(adapters[n].fan_in_fan_out for n in names),
        "bias": "none",
        "use_rslora": first.use_rslora,
        "modules_to_save": modules_to_save or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": _pattern(rs, r, names),
        "alpha_pattern": _pattern(alphas, alpha, names),
        "use_dora": False,
    }
    held = Counter(i for m in modules_to_save for i in {id(p) for p in all_modules[m].parameters()})
    if any(c > 1 for c in held.values()):
        # a tied pair (lm_head, embed_tokens) saved both: peft keeps them tied (one trained copy) only when
        # told, and warns otherwise; set only then, as a peft older than the field warns on it
        config["ensure_weight_tying"] = True
    tensors: dict[str, Tensor] = {}
    for n, layer in adapters.items():
        tensors[f"{PREFIX}{n}.lora_A.weight"] = layer.lora_A.detach()
        tensors[f"{PREFIX}{n}.lora_B.weight"] = layer.lora_B.detach()
    for m in modules_to_save:
        for k, v in all_modules[m].state_dict().items():
            tensors[f"{PREFIX}{m}.{k}"] = v.detach()
    # own storage per tensor (safetensors refuses shared memory), on the CPU, contiguous
    tensors = {k: v.to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    methods = {n: _method(l) for n, l in adapters.items()}
    # the seed is recorded only where A is still the one it derives (not after from_peft or LoRA training)
    seeds = {n: l.seed if _a_from_seed(l) else None for n, l in adapters.items()}
    meta = {
        "format": META_FORMAT,
        "version": 1,
        "method": methods[names[0]] if len(set(methods.values())) == 1 else "mixed",
        "seed": seeds[names[0]] if len(set(seeds.values())) == 1 else None,
        "layers": {
            n: {"method": methods[n], "seed": seeds[n], "seed_name": adapters[n].name, "r": rs[n], "alpha": alphas[n]}
            for n in names
        },
        "user": metadata,
    }
    json.dumps(meta)  # fail before touching the disk on unserialisable metadata

    save_dir = Path(save_dir)
    fresh = not save_dir.exists()
    if not fresh and not save_dir.is_dir():
        raise ValueError(f"save_dir: {str(save_dir)!r} exists and is not a directory")
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    # A new directory is built aside and renamed into place (all or nothing); an existing one (which may
    # hold other files) gets each file replaced atomically, the config last: no reader ever sees a partial
    # file, though one reading during the update may pair the new weights with the old config.
    target = Path(tempfile.mkdtemp(dir=save_dir.parent, prefix=f".{save_dir.name}.tmp")) if fresh else save_dir
    try:
        if fresh:
            os.chmod(target, 0o777 & ~_umask())  # mkdtemp makes 0700
        st_meta = {"format": "pt"}
        atomic_write_bytes(target / WEIGHTS_NAME, save_bytes(tensors, metadata=st_meta))
        atomic_write_text(target / META_NAME, json.dumps(meta, indent=2) + "\n")
        atomic_write_text(target / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
        if fresh:
            os.rename(target, save_dir)
    except BaseException:
        if fresh:
            shutil.rmtree(target, ignore_errors=True)
        raise
    return save_dir


def _a_from_seed(layer: FFALoRALinear) -> bool:
    """Whether the layer's A is exactly the one ``init_lora_A`` derives from its (seed, name)."""
    expected = init_lora_A(layer.r, layer.in_features, layer.seed, layer.name)
    return torch.equal(layer.lora_A.detach().float().cpu(), expected)


def _dropout_p(layer: FFALoRALinear) -> float:
    return float(layer.dropout.p) if isinstance(layer.dropout, nn.Dropout) else 0.0


def _read_dir(load_dir: Path) -> tuple[dict, dict[str, Tensor], dict | None]:
    from safetensors.torch import load_file

    cfg_path, w_path = load_dir / CONFIG_NAME, load_dir / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"load_dir: {str(load_dir)!r} has no {p.name} (expected a peft adapter directory)")
    config = json.loads(cfg_path.read_text())
    meta = json.loads((load_dir / META_NAME).read_text()) if (load_dir / META_NAME).is_file() else None
    if meta is not None and meta.get("format") != META_FORMAT:
        raise ValueError(f"{META_NAME}: expected format {META_FORMAT!r}, got {meta.get('format')!r}")
    return config, load_file(str(w_path)), meta


# LoRA config fields that plain LoRA sets or that do not change what the adapter computes (the checked ones
# are checked below); any other field with a value is a variant this loader does not implement
_PLAIN_LORA_FIELDS = frozenset({
    "peft_type", "task_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "modules_to_save", "rank_pattern",
    "alpha_pattern", "use_rslora", "init_lora_weights", "layers_to_transform", "layers_pattern", "fan_in_fan_out",
    "bias", "use_dora", "lora_bias", "megatron_config", "megatron_core", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config", "runtime_config", "qalora_group_size", "trainable_token_indices",
    "layer_replication", "target_parameters", "ensure_weight_tying",
})  # fmt: skip


_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _check_config(config: dict) -> None:
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type={config.get('peft_type')!r} (expected 'LORA')")
    # (fan_in_fan_out is not checked: peft sets it from each layer's type, True exactly for a Conv1D base, and
    # the adapter's A and B are the same either way)
    for key, ok in (("use_dora", False), ("bias", "none")):
        if config.get(key, ok) != ok:
            problems.append(f"{key}={config.get(key)!r} (supported: {ok!r})")
    # fields of LoRA variants that compute something else (peft adds them over time): any that is set
    variants = [k for k, v in config.items() if k not in _PLAIN_LORA_FIELDS and v not in (None, False, [], {}, "", 0)]
    for key in ("trainable_token_indices", "layer_replication", "target_parameters", *variants):
        if config.get(key):
            problems.append(f"{key}={config.get(key)!r} (unsupported)")
    if config.get("lora_bias"):
        problems.append("lora_bias=True (unsupported)")
    # initialisations that also change the base weights (W - s B A at creation, or a quantised residual):
    # peft redoes that change when it loads the adapter; loading it onto the unchanged base would be wrong
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        problems.append(f"init_lora_weights={init!r} (it changes the base weights: save the adapter with peft's "
                        "path_initial_model_for_weight_conversion to get a plain LoRA adapter)")
    if problems:
        raise ValueError(f"{CONFIG_NAME}: unsupported LoRA configuration: {'; '.join(problems)}")


def load_peft(
    model: nn.Module,
    load_dir: str | os.PathLike,
    *,
    train_A: bool | None = None,
    seed: int | None = None,
) -> dict[str, FFALoRALinear]:
    """Load a peft LoRA adapter directory into ``model``, injecting ``FFALoRALinear`` layers if it has none.

    A model that already has adapters must have exactly the file's adapted layers, with the same shapes and
    scale; their B is overwritten, and A too where it is trained (LoRA). A frozen A (FFA-LoRA) is shared by the
    whole federation and stays: a file with another A is refused (load it into the base model instead). A
    model without adapters gets them where the file has them (r from the shapes, alpha/use_rslora/dropout from
    the config), every other parameter frozen and the ``modules_to_save`` made trainable with per-sample
    gradients, as ``inject_adapters`` does.

    Args:
        model: the base model (the same class the adapters were trained on).
        load_dir: a directory from ``export_peft`` or ``PeftModel.save_pretrained``.
        train_A: for injected layers: train A (vanilla LoRA) or not (FFA-LoRA); default: the method
            recorded in ``fedlora_fast.json``, else False.
        seed: recorded on injected layers; default: the seed in ``fedlora_fast.json``, else 0. When the file
            says FFA-LoRA with a seed, A must equal the A regenerated from (seed, name) (checked).
    Returns:
        ``{qualified_name: layer}`` of the loaded adapters.
    Raises:
        FileNotFoundError, ValueError: a missing file, an unsupported config, names/shapes that do not
            fit the model (every offending name listed), FFA adapters whose frozen A differs from the file's,
            or a model that already has peft layers (use ``from_peft``); nothing of the model is changed before
            a refusal.
    """
    if train_A is not None and not isinstance(train_A, bool):  # ("no" would read as True: A trained and sent)
        raise TypeError(f"train_A: expected True, False or None, got {train_A!r}")
    load_dir = Path(load_dir)
    config, tensors, meta = _read_dir(load_dir)
    _check_config(config)
    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        raise ValueError(f"{WEIGHTS_NAME}: keys without the {PREFIX!r} prefix: {bad[:8]}")
    A_file: dict[str, Tensor] = {}
    B_file: dict[str, Tensor] = {}
    other: dict[str, Tensor] = {}
    unsupported = []
    for key, t in tensors.items():
        k = key[len(PREFIX):]
        if k.endswith(".lora_A.weight"):
            A_file[k[: -len(".lora_A.weight")]] = t
        elif k.endswith(".lora_B.weight"):
            B_file[k[: -len(".lora_B.weight")]] = t
        elif re.search(r"\.lora_(embedding_[AB]|magnitude_vector|[AB]\.bias)\b", k):
            unsupported.append(key)
        else:
            other[k] = t
    if unsupported:
        raise ValueError(f"{WEIGHTS_NAME}: LoRA weights of kinds FFALoRALinear cannot hold: {unsupported[:8]}")
    if set(A_file) != set(B_file):
        raise ValueError(
            f"{WEIGHTS_NAME}: layers with lora_A but no lora_B: {sorted(set(A_file) - set(B_file))[:8]}; "
            f"with lora_B but no lora_A: {sorted(set(B_file) - set(A_file))[:8]}"
        )
    if not A_file:
        raise ValueError(f"{WEIGHTS_NAME}: no lora_A/lora_B weights")
    names = sorted(A_file)
    model = _unwrap(model)
    peft_layers = peft_modules(model)
    if peft_layers:
        raise ValueError(f"model: has peft layers {peft_layers[:4]}; load the adapter into the base model, or "
                         "convert the peft model with ff.from_peft(peft_model)")
    modules = dict(model.named_modules())
    existing = adapter_layers(model)
    inject = not existing
    if not inject:
        missing, unexpected = sorted(set(existing) - set(names)), sorted(set(names) - set(existing))
        if missing or unexpected:
            raise ValueError(
                f"load_dir: adapted layers differ from the model's: in the model only {missing[:8]}, "
                f"in the file only {unexpected[:8]}"
            )
        if train_A is not None and any(l.train_A != bool(train_A) for l in existing.values()):
            raise ValueError(f"train_A: {train_A} differs from the model's existing adapters")

    meta_layers = (meta or {}).get("layers", {})
    use_rslora = bool(config.get("use_rslora", False))
    problems = []
    specs = {}
    for n in names:
        A, B = A_file[n], B_file[n]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            problems.append(f"{n}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not (r, in) and (out, r)")
            continue
        r = int(A.shape[0])
        r_cfg = _pattern_value(config.get("rank_pattern") or {}, n, config.get("r", r))
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, n,
                                     config.get("lora_alpha", PEFT_DEFAULT_LORA_ALPHA)))
        if r_cfg != r:
            problems.append(f"{n}: rank {r} in the weights, {r_cfg} in the config")
        module = modules.get(n)
        if module is None:
            problems.append(f"{n}: no such module in {type(model).__name__}")
            continue
        base = module.base_layer if isinstance(module, FFALoRALinear) else module
        why = base_problem(base)
        if why is not None:
            problems.append(f"{n}: {why}")
            continue
        fin, fout = base_features(base)
        if (B.shape[0], A.shape[1]) != (fout, fin):
            problems.append(f"{n}: adapter maps {A.shape[1]} -> {B.shape[0]}, the layer {fin} -> {fout}")
            continue
        if isinstance(module, FFALoRALinear):
            if module.merged:
                problems.append(f"{n}: the model's adapter is merged into its weight; unmerge() it first")
            scale = alpha / (math.sqrt(r) if use_rslora else r)
            if module.r != r or not math.isclose(module.scale, scale, rel_tol=1e-9):
                problems.append(f"{n}: the model's adapter has r={module.r}, scale={module.scale:g}; the file r={r}, scale={scale:g}")
            elif module.lora_A.is_meta or module.lora_B.is_meta:  # (a copy into meta is dropped silently)
                problems.append(f"{n}: the model's adapter is on the meta device (no A yet): to_empty() it first")
            elif not module.train_A and not torch.equal(A.float(), module.lora_A.detach().float().cpu()):
                # FFA-LoRA's A is frozen and shared: replacing it would leave this model with another A than the
                # rest of its federation (its fingerprint changes with A, so a server would refuse its updates)
                problems.append(
                    f"{n}: the file's lora_A is not the model's frozen A (FFA-LoRA, from seed {module.seed} and name "
                    f"{module.name!r}); load the file into the base model without adapters to take its A"
                )
        info = meta_layers.get(n, {})
        if info.get("method") == "ffa" and info.get("seed") is not None:
            expected = init_lora_A(r, base_features(base)[0], int(info["seed"]), info.get("seed_name", n))
            if not torch.equal(A.float(), expected):
                raise ValueError(
                    f"load_dir: {n}.lora_A is not the A that FFA-LoRA derives from seed {info['seed']}; "
                    "the file was altered or written for another layer name"
                )
        specs[n] = (r, alpha)
    # peft also saves an adapted layer's own weight (``<layer>.base_layer.weight``) when it adapts an embedding
    # layer name (lm_head: the vocabulary may have been resized), and with save_embedding_layers the input and
    # output embeddings (``<embedding>.weight``); PeftModel.from_pretrained loads both into the model, so do we
    state = model.state_dict()
    to_model: dict[str, str] = {}  # file key -> key in the model as it is now
    for k in other:
        owner, _, leaf = k.rpartition(".base_layer.")
        if owner in A_file and leaf in ("weight", "bias"):
            to_model[k] = k if isinstance(modules.get(owner), FFALoRALinear) else f"{owner}.{leaf}"
    extra_modules: list[str] = []
    for k, t in other.items():
        mk = to_model.get(k, k)
        if mk not in state:
            problems.append(f"{k}: not a parameter or buffer of {type(model).__name__} (nor a LoRA weight)")
        elif tuple(state[mk].shape) != tuple(t.shape):
            problems.append(f"{k}: shape {tuple(t.shape)} in the file, {tuple(state[mk].shape)} in the model")
    saved = [k for k in other if k not in to_model]
    if saved:
        for m in config.get("modules_to_save") or []:
            # peft's own rule for modules_to_save is a plain suffix (its "classifier" also saves DistilBERT's
            # "pre_classifier"), not the dot-bounded target match
            hits = [n for n in modules if n and n.endswith(m) and any(k.startswith(n + ".") for k in saved)]
            extra_modules += [h for h in hits if h not in extra_modules]
        embeddings = _embedding_names(model)
        orphans = [k for k in saved if not any(k.startswith(e + ".") for e in extra_modules + embeddings)]
        if orphans:
            problems.append(f"weights outside the adapters and the config's modules_to_save: {orphans[:8]}")
    if inject:  # checked here, not when making them per-sample: a refusal must leave the model unchanged
        no_rule = [u for m in extra_modules for u in per_sample_problems(modules[m], m)]
        if no_rule:
            problems.append(str(per_sample_error(no_rule, "modules_to_save")))
        layer_args = {}  # what each layer is built with below, checked as FFALoRALinear checks it
        try:
            dropout = float(config.get("lora_dropout", 0.0) or 0.0)
        except (TypeError, ValueError):
            problems.append(f"adapter_config.json: lora_dropout: expected a number, got {config.get('lora_dropout')!r}")
            dropout = 0.0
        for n, (r, alpha) in specs.items():
            layer_seed = seed if seed is not None else meta_layers.get(n, {}).get("seed") or 0
            try:
                check_layer_args(modules[n], r, alpha, dropout, layer_seed)
            except (TypeError, ValueError) as e:
                problems.append(f"{n}: {e} (from adapter_config.json's r / lora_alpha / rank_pattern / "
                                "alpha_pattern / lora_dropout, or the seed)")
            else:
                layer_args[n] = (r, alpha, int(layer_seed))
    if problems:
        raise ValueError(f"load_dir: {str(load_dir)!r} does not fit the model: " + "; ".join(problems))

    if inject:
        for p in model.parameters():
            p.requires_grad_(False)
        for n in names:
            info = meta_layers.get(n, {})
            layer_train_A = bool(train_A) if train_A is not None else info.get("method") == "lora"
            r, alpha, layer_seed = layer_args[n]
            layer = FFALoRALinear(
                modules[n], r, alpha, seed=layer_seed, name=n, train_A=layer_train_A,
                dropout=dropout, use_rslora=use_rslora,
            )
            _set_submodule(model, n, layer)
        mark_tied_bases(model, {n: m for n, m in adapter_layers(model).items() if n in names})
        for m in extra_modules:
            make_per_sample(model.get_submodule(m), m, what="modules_to_save")
    layers = adapter_layers(model)
    with torch.no_grad():
        for n in names:
            layer = layers[n]
            layer.lora_A.copy_(A_file[n].to(layer.lora_A.device, layer.lora_A.dtype))
            layer.lora_B.copy_(B_file[n].to(layer.lora_B.device, layer.lora_B.dtype))
        if other:
            # every name of a tied tensor (lm_head.weight is embed_tokens.weight): the file may key either
            params = dict(model.named_parameters(remove_duplicate=False))
            params.update(dict(model.named_buffers(remove_duplicate=False)))
            for k, t in other.items():
                params[k].copy_(t.to(params[k].device, params[k].dtype))
    return {n: layers[n] for n in names}


def _embedding_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's input and output embeddings (Hugging Face models), if any."""
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model, getter, None)
        try:
            emb = get() if callable(get) else None
        except (NotImplementedError, AttributeError):
            emb = None
        if emb is not None:
            found += [n for n, m in model.named_modules(remove_duplicate=False) if m is emb and n]
    return found


def _peft():
    try:
        import peft  # noqa: F401
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
    except ImportError as e:  # pragma: no cover - the extra is not installed
        raise ImportError(f"from_peft needs peft (pip install 'fedlora_fast[peft]'): {e}") from e
    return LoraLayer, LoraLinear, BaseTunerLayer, AuxiliaryTrainingWrapper, ModulesToSaveWrapper


def _lora_problem(layer, LoraLinear) -> str | None:
    """Why a peft LoraLayer cannot become an FFALoRALinear, or None."""
    if type(layer) is not LoraLinear:
        return f"{type(layer).__module__}.{type(layer).__name__} (only peft.tuners.lora.Linear is supported)"
    base = layer.get_base_layer()
    # exactly nn.Linear or transformers' Conv1D, or a subclass whose forward is F.linear's maths (Falcon's
    # FalconLinear): FFALoRALinear computes F.linear(x, weight, bias) itself
    conv = is_conv1d(base)
    if (type(base) is not nn.Linear and not (isinstance(base, nn.Linear) and has_listed_linear_forward(type(base)))
            and not conv):
        return f"base layer is a {type(base).__name__}, expected torch.nn.Linear or transformers' Conv1D"
    keys = list(layer.lora_A.keys())
    if len(keys) != 1:
        return f"{len(keys)} adapters {keys} (exactly one supported)"
    if len(layer.lora_embedding_A) or len(getattr(layer, "lora_embedding_B", {})):
        return "embedding LoRA"
    key = keys[0]
    if layer.use_dora.get(key, False):
        return "DoRA (use_dora=True)"
    if key in getattr(layer, "lora_variant", {}):
        return f"LoRA variant {type(layer.lora_variant[key]).__name__}"
    if getattr(layer, "lora_bias", {}).get(key, False):
        return "lora_bias=True"
    if bool(getattr(layer, "fan_in_fan_out", False)) != conv:  # (peft sets it so: a Conv1D's weight is (in, out))
        return f"fan_in_fan_out={getattr(layer, 'fan_in_fan_out', False)!r} on a {type(base).__name__} base"
    if layer.merged:
        return "merged adapter (call unmerge_adapter() first)"
    if getattr(layer, "disable_adapters", False):  # (the converted layer would compute the adapter again)
        return "adapters disabled (disable_adapter_layers()): enable them, or use the base model without them"
    if layer.lora_A[key].bias is not None or layer.lora_B[key].bias is not None:
        return "lora_A/lora_B with a bias"
    return None


def from_peft(peft_model: nn.Module, *, seed: int = 0) -> nn.Module:
    """Replace every peft LoRA layer of a peft model by an ``FFALoRALinear`` with the same A, B, scale, dropout.

    Args:
        peft_model: a ``peft.PeftModel`` (``get_peft_model``/``PeftModel.from_pretrained``) or a model that
            ``peft.inject_adapter_in_model`` changed; exactly one LoRA adapter on ``nn.Linear`` layers.
        seed: recorded on the new layers (their A is peft's, kept as is, not regenerated).
    Returns:
        The underlying model (``peft_model.get_base_model()``), changed in place: layer names are those of the
        original model, ``train_A`` follows whether peft's A was trainable, B keeps its ``requires_grad``,
        each ``modules_to_save`` wrapper is replaced by its trained copy (made per-sample if trainable).
        Use the returned model; the peft wrapper must not be used afterwards.
    Raises:
        ValueError: layers it cannot convert (DoRA, embedding/conv LoRA, several adapters, merged, hooks on
            the base layer, alpha <= 0...) and a seed that is not an int, all listed at once, before anything
            is changed.
    """
    LoraLayer, LoraLinear, BaseTunerLayer, AuxWrapper, ModulesToSaveWrapper = _peft()
    model = _peft_inner(peft_model)
    if model is None:  # a model that peft.inject_adapter_in_model changed
        model = peft_model
    problems, loras, wrappers = [], {}, {}
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):  # (1.5 would read as seed 1, silently)
        problems.append(f"seed: expected an int, got {seed!r}")
    cfgs = getattr(peft_model, "peft_config", {}) or {}
    if len(cfgs) > 1:
        problems.append(f"the model has {len(cfgs)} adapters {sorted(cfgs)}; exactly one is supported")
    for name, cfg in cfgs.items():
        if getattr(cfg, "peft_type", None) is not None and str(getattr(cfg.peft_type, "value", cfg.peft_type)) != "LORA":
            problems.append(f"adapter {name!r} is {cfg.peft_type}, not LoRA")
        if getattr(cfg, "bias", "none") != "none":
            problems.append(f"adapter {name!r} trains base biases (bias={cfg.bias!r})")
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            why = _lora_problem(module, LoraLinear)
            if why:
                problems.append(f"{name}: {why}")
            else:
                loras[name] = module
        elif isinstance(module, ModulesToSaveWrapper):
            keys = list(module.modules_to_save.keys())
            if len(keys) != 1:
                problems.append(f"{name}: modules_to_save wrapper with {len(keys)} copies {keys}")
            else:
                wrappers[name] = module.modules_to_save[keys[0]]
                # a trained copy becomes per-sample: checked now, so that a refusal changes nothing
                if any(p.requires_grad for p in wrappers[name].parameters()):
                    no_rule = per_sample_problems(wrappers[name], name)
                    if no_rule:
                        problems.append(f"{name}: " + str(per_sample_error(no_rule, "trained modules_to_save copy")))
        elif isinstance(module, (BaseTunerLayer, AuxWrapper)):
            problems.append(f"{name}: {type(module).__module__}.{type(module).__name__} (not a LoRA linear layer)")
    built = {}
    for name, layer in loras.items():
        key = next(iter(layer.lora_A.keys()))
        r, alpha, scaling = int(layer.r[key]), float(layer.lora_alpha[key]), float(layer.scaling[key])
        use_rslora = r > 1 and math.isclose(scaling, alpha / math.sqrt(r), rel_tol=1e-9)
        if not math.isclose(scaling, alpha / (math.sqrt(r) if use_rslora else r), rel_tol=1e-9):
            problems.append(f"{name}: scaling {scaling:g} is neither alpha/r nor alpha/sqrt(r) (set_scale?)")
            continue
        if any(q.requires_grad for q in layer.get_base_layer().parameters()):
            problems.append(f"{name}: the base layer is trainable; freeze it before converting")
            continue
        drop = layer.lora_dropout[key]
        p = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
        if not isinstance(drop, (nn.Dropout, nn.Identity)):
            problems.append(f"{name}: lora_dropout is a {type(drop).__name__}")
            continue
        try:  # FFALoRALinear's own checks (hooks on the base layer, alpha <= 0), here: a refusal changes nothing
            check_layer_args(layer.get_base_layer(), r, alpha, p)  # (the seed is checked once, above)
        except (TypeError, ValueError) as e:
            problems.append(f"{name}: {e}")
            continue
        built[name] = (key, r, alpha, use_rslora, p)
    if not loras and not problems:
        raise ValueError(f"peft_model: no peft LoRA layers in {type(peft_model).__name__}")
    if problems:
        raise ValueError("from_peft: cannot convert: " + "; ".join(problems))

    for name, inner in wrappers.items():
        if any(p.requires_grad for p in inner.parameters()):
            make_per_sample(inner, name, what="modules_to_save")
        _set_submodule(model, name, inner)
    for name, (key, r, alpha, use_rslora, p) in built.items():
        layer = loras[name]
        A, B = layer.lora_A[key].weight, layer.lora_B[key].weight
        new = FFALoRALinear(
            layer.get_base_layer(), r, alpha, seed=seed, name=name, train_A=A.requires_grad, dropout=p,
            use_rslora=use_rslora,
        )
        with torch.no_grad():
            new.lora_A.copy_(A.to(new.lora_A.device, new.lora_A.dtype))
            new.lora_B.copy_(B.to(new.lora_B.device, new.lora_B.dtype))
        new.lora_B.requires_grad_(B.requires_grad)
        new.train(layer.training)
        _set_submodule(model, name, new)
    mark_tied_bases(model, {n: m for n, m in adapter_layers(model).items() if n in built})
    return model

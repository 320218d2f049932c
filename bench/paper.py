"""The FFA-LoRA paper's main experiment at laptop scale: LoRA vs FFA-LoRA under DP and label skew.

Follows Sun et al., "Improving LoRA in Privacy-preserving Federated Learning" (ICLR 2024, arXiv 2403.12313),
the DP table of the heterogeneous setting: 3 clients with binary label proportions [0.1, 0.9] / [0.9, 0.1] /
[0.5, 0.5], LoRA and FFA-LoRA at the same rank and targets, sample-level DP-SGD at epsilon in {inf, 6, 3, 1}
(delta 1e-5, every client spends at most epsilon), a small learning-rate grid per method. Here: the packaged
all-MiniLM-L6-v2 on the bundled SMS Spam Collection (any csv/tsv/json/parquet via ``--data``).

Protocol (no test-set leakage):
    1. The data's test split is held out; a stratified validation split is carved from the training split.
    2. Tuning: for every (method, epsilon) each lr of the method's grid runs on the first ``--tune-seeds``
       seeds; the lr with the best mean validation accuracy (ties: lower validation loss) is chosen.
    3. Evaluation: the chosen lr runs on every seed (tuning runs are reused); the table reports the mean
       and sample standard deviation over seeds of the *test* accuracy of those runs.
    ``epsilon = inf`` is DP-SGD's clipping without noise (noise multiplier 0): it isolates the noise.

Outputs (``--out DIR``, file stem ``--name``): ``NAME.json`` (settings, machine, every run's config and
result, the chosen lrs, the table), ``NAME.md`` (the table) and ``NAME.png`` (test accuracy vs epsilon).
``NAME.json`` is rewritten atomically after every run; ``--resume`` skips runs it already holds.

Usage:
    python bench/paper.py                          # the default grid: 32 runs, ~91 s of 1-thread CPU each
    # the same grid as two 1-thread processes (one per method), then one table (bench/results/paper.*):
    python bench/paper.py --methods lora --threads 1 --name paper_part_lora &
    python bench/paper.py --methods ffa --threads 1 --name paper_part_ffa; wait
    python bench/paper.py --merge bench/results/paper_part_lora.json bench/results/paper_part_ffa.json
    python bench/paper.py --seeds 0 --max-train 1500 --name paper_reduced
    python bench/paper.py --data my.csv --text-column text --label-column label --epsilons inf 3
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedlora_fast.data import TextClassificationData, collate, load_text_classification, tokenize, train_test_split
from fedlora_fast.federated.simulation import FederatedConfig, Federation

DEFAULT_EPSILONS = (math.inf, 6.0, 3.0, 1.0)
DEFAULT_LRS = {"ffa": (3e-3, 1e-2), "lora": (3e-3, 1e-2)}
METHOD_NAMES = {"ffa": "FFA-LoRA", "lora": "LoRA"}
RESULTS = Path(__file__).resolve().parent / "results"

log = logging.getLogger("bench.paper")


# --- arguments ----------------------------------------------------------------------------------------------
def _epsilon(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'inf', got {text!r}") from None
    if not v > 0 or math.isnan(v):
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'inf', got {text!r}")
    return v


def _positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} > 0, got {text!r}") from None
        if not v > 0 or (isinstance(v, float) and not math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"expected a finite {kind.__name__} > 0, got {text!r}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/paper.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("model and data")
    d.add_argument("--model", default=None, help="local model directory or hub name (default: packaged MiniLM)")
    d.add_argument("--data", default=None, help="csv/tsv/json/jsonl/parquet or hub dataset (default: bundled SMS)")
    d.add_argument("--text-column", default=None)
    d.add_argument("--label-column", default=None)
    d.add_argument("--test-fraction", type=float, default=0.2, help="held-out test share when the data has no test split")
    d.add_argument("--val-fraction", type=float, default=0.15, help="validation share carved from the training split")
    d.add_argument("--max-train", type=_positive(int), default=None,
                   help="stratified subsample of the training split (before the validation carve)")
    d.add_argument("--max-val", type=_positive(int), default=400, help="stratified subsample of the validation split")
    d.add_argument("--max-test", type=_positive(int), default=600, help="stratified subsample of the test split")
    d.add_argument("--split-seed", type=int, default=0, help="seed of the test/validation splits (fixed across seeds)")
    d.add_argument("--max-length", type=_positive(int), default=32, help="tokens per text (truncation)")
    g = p.add_argument_group("grid")
    g.add_argument("--methods", nargs="+", choices=("lora", "ffa"), default=["lora", "ffa"])
    g.add_argument("--epsilons", nargs="+", type=_epsilon, default=list(DEFAULT_EPSILONS),
                   help="target epsilons per client ('inf': clipping without noise)")
    g.add_argument("--delta", type=float, default=1e-5)
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    g.add_argument("--tune-seeds", type=_positive(int), default=1,
                   help="the lr is chosen on the validation accuracy of the first K seeds")
    g.add_argument("--lrs", nargs="+", type=_positive(float), default=None, help="lr grid of every method")
    g.add_argument("--lrs-ffa", nargs="+", type=_positive(float), default=None,
                   help=f"lr grid of FFA-LoRA (default {list(DEFAULT_LRS['ffa'])})")
    g.add_argument("--lrs-lora", nargs="+", type=_positive(float), default=None,
                   help=f"lr grid of LoRA (default {list(DEFAULT_LRS['lora'])})")
    t = p.add_argument_group("training (one run)")
    t.add_argument("--rounds", type=_positive(int), default=5)
    t.add_argument("--local-steps", type=_positive(int), default=10)
    t.add_argument("--batch-size", type=_positive(int), default=32, help="expected Poisson batch per client")
    t.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adam")
    t.add_argument("--r", type=_positive(int), default=8)
    t.add_argument("--alpha", type=_positive(float), default=16.0)
    t.add_argument("--targets", nargs="+", default=["query", "value"])
    t.add_argument("--max-grad-norm", type=_positive(float), default=1.0)
    t.add_argument("--clipping", choices=("flat", "per_layer"), default="flat")
    t.add_argument("--eval-batch-size", type=_positive(int), default=128)
    o = p.add_argument_group("output")
    o.add_argument("--out", default=str(RESULTS), help="output directory")
    o.add_argument("--name", default="paper", help="file stem of NAME.json / NAME.md / NAME.png")
    o.add_argument("--resume", action="store_true", help="skip runs already in NAME.json (same settings)")
    o.add_argument("--threads", type=_positive(int), default=None, help="torch.set_num_threads")
    o.add_argument("--quiet", action="store_true")
    o.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="run nothing: tabulate the runs of these NAME.json files for this grid (e.g. one process "
                        "per --methods, or fewer --seeds of an interrupted grid)")
    return p


def lr_grid(args, method: str) -> list[float]:
    own = getattr(args, f"lrs_{method}")
    return list(own or args.lrs or DEFAULT_LRS[method])


def validate_args(args) -> None:
    """Raise ``ValueError`` naming the first bad argument, the expected and the actual value."""
    for name in ("test_fraction", "val_fraction"):
        v = getattr(args, name)
        if not 0 < v < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a number in (0, 1), got {v!r}")
    if not 0 < args.delta < 1:
        raise ValueError(f"--delta: expected a number in (0, 1), got {args.delta!r}")
    if args.tune_seeds > len(args.seeds):
        raise ValueError(f"--tune-seeds: expected at most the number of --seeds ({len(args.seeds)}), got {args.tune_seeds}")
    for name in ("seeds", "epsilons", "methods"):
        vals = getattr(args, name)
        if len(set(vals)) != len(vals):
            raise ValueError(f"--{name}: expected distinct values, got {vals}")
    for m in args.methods:
        lrs = lr_grid(args, m)
        if len(set(lrs)) != len(lrs):
            raise ValueError(f"--lrs-{m}: expected distinct values, got {lrs}")


# --- data ---------------------------------------------------------------------------------------------------
def stratified_subsample(data: TextClassificationData, n: int | None, seed: int) -> TextClassificationData:
    """About ``n`` examples of ``data``, every class keeping its share (``round(count * n / N)`` each, give or take
    the groups of identical texts ``train_test_split`` keeps together: 601 for n = 600 on the bundled data)."""
    if n is None or n >= len(data):
        return data
    _, sub = train_test_split(data, n / len(data), seed)
    return sub


def prepare_data(args) -> dict[str, TextClassificationData]:
    """``{"train", "val", "test"}``: the source's test split (subsampled), a validation split carved from train.

    The validation split is disjoint from both: it is taken out of the training split, which never overlaps
    the test split.
    """
    train_full, test = load_text_classification(args.data, text_column=args.text_column, label_column=args.label_column,
                                                test_fraction=args.test_fraction, seed=args.split_seed)
    test = stratified_subsample(test, args.max_test, args.split_seed + 1)
    train_full = stratified_subsample(train_full, args.max_train, args.split_seed + 2)
    train, val = train_test_split(train_full, args.val_fraction, args.split_seed + 3)
    val = stratified_subsample(val, args.max_val, args.split_seed + 4)  # the rest of the carve stays unused
    return {"train": train, "val": val, "test": test}


# --- one run ------------------------------------------------------------------------------------------------
def make_config(args, method: str, epsilon: float, lr: float, seed: int) -> FederatedConfig:
    private = math.isfinite(epsilon)
    return FederatedConfig(
        model=args.model, data=args.data, text_column=args.text_column, label_column=args.label_column,
        test_fraction=args.test_fraction, max_length=args.max_length, num_clients=3, partition="label_skew",
        label_proportions=[[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]], rounds=args.rounds, local_steps=args.local_steps,
        batch_size=args.batch_size, lr=lr, optimizer=args.optimizer, method=method, r=args.r, alpha=args.alpha,
        targets=list(args.targets), epsilon=epsilon if private else None, noise_multiplier=None if private else 0.0,
        delta=args.delta, max_grad_norm=args.max_grad_norm, clipping=args.clipping, seed=seed,
        eval_every=args.rounds, eval_batch_size=args.eval_batch_size,
        lr_schedule="constant",  # the committed results (bench/results/paper.*) were run with a constant lr
    )


@torch.no_grad()
def evaluate_split(model: nn.Module, input_ids: list[list[int]], labels: list[int], pad_id: int,
                   num_classes: int, batch_size: int) -> dict:
    """Accuracy, balanced accuracy (mean per-class recall) and mean cross-entropy over a labelled set."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(input_ids)), key=lambda i: len(input_ids[i]))  # less padding, same result
    y = torch.as_tensor(labels, dtype=torch.long)
    pred = torch.empty_like(y)
    loss = 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = collate([input_ids[i] for i in idx], pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
        loss += float(nn.functional.cross_entropy(logits, y[idx], reduction="sum"))
        pred[idx] = logits.argmax(-1)
    model.train(was_training)
    recalls = [float((pred[y == c] == c).float().mean()) for c in range(num_classes) if bool((y == c).any())]
    n = max(1, len(labels))
    return {"accuracy": float((pred == y).float().mean()) if len(labels) else 0.0,
            "balanced_accuracy": sum(recalls) / max(1, len(recalls)), "loss": loss / n}


def run_one(args, data: dict, method: str, epsilon: float, lr: float, seed: int) -> dict:
    """Train one federation on ``data["train"]``; evaluate the final global adapter on validation and test."""
    cfg = make_config(args, method, epsilon, lr, seed)
    t0, c0 = time.perf_counter(), time.process_time()
    # Federation evaluates on its "test" split, here the validation split; the test split is scored below,
    # after training, and only reported: selection reads "val" alone.
    fed = Federation(cfg, data=(data["train"], data["val"]))
    t_build = time.perf_counter() - t0
    records = [fed.run_round() for _ in range(cfg.rounds)]
    t_train = time.perf_counter() - t0 - t_build
    val = {"accuracy": records[-1]["accuracy"], "loss": records[-1]["loss"]}
    test_ids = tokenize(fed.tokenizer, data["test"].texts, cfg.max_length)
    test = evaluate_split(fed.model, test_ids, data["test"].labels, fed.pad_id, fed.num_labels, cfg.eval_batch_size)
    metrics = fed.metrics()
    final = metrics["final"]
    return {
        "method": method, "epsilon": _json_eps(epsilon), "lr": lr, "seed": seed,
        "config": {**cfg.to_dict(), "model_resolved": fed.model_name},
        "data": metrics["data"],
        "val": val, "test": test,
        "epsilon_spent": final["epsilon"],
        "clients": final["clients"],
        "bytes_up_per_round": [r["bytes_up"] for r in records],
        "payload_up_per_round": [r["payload_up"] for r in records],
        "bytes_down_per_round": [r["bytes_down"] for r in records],
        "train_loss_per_round": [r["train_loss"] for r in records],
        "seconds": {"build": t_build, "train": t_train, "total": time.perf_counter() - t0,
                    "cpu": time.process_time() - c0},  # CPU time of this process (all its threads)
    }


def _json_eps(eps: float | str) -> float | str:
    """JSON has no infinity: epsilon is stored as a float or the string ``"inf"``."""
    eps = _eps_value(eps)
    return "inf" if math.isinf(eps) else eps


def _eps_value(e) -> float:
    return math.inf if e == "inf" else float(e)


def _eps_label(e) -> str:
    return "∞" if math.isinf(_eps_value(e)) else f"{_eps_value(e):g}"


# --- selection and summary ----------------------------------------------------------------------------------
def _key(method, eps, lr, seed) -> tuple:
    return (method, _json_eps(_eps_value(eps)), float(lr), int(seed))


def select_lr(runs: list[dict], method: str, eps, lrs: list[float], tune_seeds: list[int]) -> dict:
    """The lr of ``lrs`` with the best mean validation accuracy over ``tune_seeds`` (ties: lower val loss).

    Reads only the runs' ``val`` results, never ``test``.
    """
    by = {_key(r["method"], r["epsilon"], r["lr"], r["seed"]): r for r in runs}
    scores = []
    for lr in lrs:
        vals = [by[_key(method, eps, lr, s)]["val"] for s in tune_seeds]
        acc = float(np.mean([v["accuracy"] for v in vals]))
        loss = float(np.mean([v["loss"] for v in vals]))
        scores.append({"lr": lr, "val_accuracy": acc, "val_loss": loss})
    best = max(scores, key=lambda s: (s["val_accuracy"], -s["val_loss"]))
    return {"lr": best["lr"], "scores": scores}


def summarize(runs: list[dict], selected: dict, methods, epsilons, seeds) -> list[dict]:
    """One row per (method, epsilon): mean and std over seeds of the chosen lr's test metrics."""
    by = {_key(r["method"], r["epsilon"], r["lr"], r["seed"]): r for r in runs}
    rows = []
    for m in methods:
        for e in epsilons:
            sel = selected[m][str(_json_eps(e))]
            rs = [by[_key(m, e, sel["lr"], s)] for s in seeds]
            acc = [r["test"]["accuracy"] for r in rs]
            bal = [r["test"]["balanced_accuracy"] for r in rs]
            rows.append({
                "method": m, "epsilon": _json_eps(e), "lr": sel["lr"], "seeds": list(seeds),
                "test_accuracy_mean": float(np.mean(acc)), "test_accuracy_std": _std(acc),
                "test_balanced_accuracy_mean": float(np.mean(bal)), "test_balanced_accuracy_std": _std(bal),
                "val_accuracy_of_choice": max(s["val_accuracy"] for s in sel["scores"]),
                "epsilon_spent_max": max(r["epsilon_spent"] for r in rs),
                "noise_multiplier": rs[0]["clients"][0]["noise_multiplier"],
                "bytes_up_per_round": float(np.mean([np.mean(r["bytes_up_per_round"]) for r in rs])),
                "payload_up_per_round": float(np.mean([np.mean(r["payload_up_per_round"]) for r in rs])),
            })
    return rows


def _std(xs) -> float:
    return float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def markdown_table(result: dict) -> str:
    rows, s = result["table"], result["settings"]
    eps_cols = [str(_json_eps(e)) for e in s["epsilons"]]
    cell = {(r["method"], str(r["epsilon"])): r for r in rows}
    head = "| method | upload / round (3 clients) | " + " | ".join(f"ε = {_eps_label(e)}" for e in eps_cols) + " |"
    sep = "| --- | --- | " + " | ".join("---" for _ in eps_cols) + " |"
    out = [f"Test accuracy, mean ± std over seeds {s['seeds']} (lr chosen on validation, shown as lr=); "
           f"δ = {s['delta']:g}.", "", head, sep]
    for m in s["methods"]:
        r0 = cell[(m, eps_cols[0])]
        kb = f"{r0['bytes_up_per_round'] / 1e3:.1f} kB ({r0['payload_up_per_round'] / 1e3:.1f} kB tensors)"
        out.append(f"| {METHOD_NAMES[m]} | {kb} | " + " | ".join(
            f"{cell[(m, e)]['test_accuracy_mean']:.4f} ± {cell[(m, e)]['test_accuracy_std']:.4f} (lr={cell[(m, e)]['lr']:g})"
            for e in eps_cols) + " |")
    out += ["", "Balanced test accuracy (mean per-class recall), same runs:", "", head.replace(
        "upload / round (3 clients)", "noise multiplier σ"), sep]
    for m in s["methods"]:
        out.append(f"| {METHOD_NAMES[m]} | " + " / ".join(f"{cell[(m, e)]['noise_multiplier']:.3g}" for e in eps_cols)
                   + " | " + " | ".join(
            f"{cell[(m, e)]['test_balanced_accuracy_mean']:.4f} ± {cell[(m, e)]['test_balanced_accuracy_std']:.4f}"
            for e in eps_cols) + " |")
    d = result["data"]
    maj = max(d["test_class_counts"]) / max(1, sum(d["test_class_counts"]))
    out += ["", f"Majority-class test accuracy: {maj:.4f} (test class counts {d['test_class_counts']}).",
            f"Data: {d['source']}; train {d['train_examples']} (clients use {d['client_examples']}), "
            f"validation {d['val_examples']}, test {d['test_examples']}.",
            f"Per run: {s['rounds']} rounds x {s['local_steps']} local steps, expected batch {s['batch_size']}, "
            f"r={s['r']}, alpha={s['alpha']:g}, targets {s['targets']}, {s['optimizer']}, C={s['max_grad_norm']:g}, "
            f"max_length {s['max_length']}; lr grids {s['lrs']}, tuned on seeds {s['seeds'][:s['tune_seeds']]}.",
            f"Runs: {len(result['runs'])}; wall time {result['wall_seconds'] / 60:.1f} min on {result['machine']['name']}"
            + (f" ({len(result['merged_from'])} processes in parallel, merged)" if result.get("merged_from") else "")
            + f"; CPU time of all runs {result['run_cpu_seconds_sum'] / 60:.1f} min."]
    return "\n".join(out) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["settings"]
    eps_cols = [str(_json_eps(e)) for e in s["epsilons"]]
    cell = {(r["method"], str(r["epsilon"])): r for r in result["table"]}
    x = np.arange(len(eps_cols))
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, m in enumerate(s["methods"]):
        mean = [cell[(m, e)]["test_accuracy_mean"] for e in eps_cols]
        std = [cell[(m, e)]["test_accuracy_std"] for e in eps_cols]
        ax.errorbar(x + (i - 0.5) * 0.08, mean, yerr=std, marker="o", capsize=4, label=METHOD_NAMES[m])
    d = result["data"]
    ax.axhline(max(d["test_class_counts"]) / sum(d["test_class_counts"]), color="grey", ls="--", lw=1,
               label="majority class")
    ax.set_xticks(x, [f"ε={_eps_label(e)}" for e in eps_cols])
    ax.set_ylabel(f"test accuracy (mean ± std, {len(s['seeds'])} seeds)")
    ax.set_title(f"{len(s['seeds'])} seeds, 3 label-skewed clients, r={s['r']}, δ={s['delta']:g}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _machine() -> dict:
    return {"name": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})",
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


# --- the grid -----------------------------------------------------------------------------------------------
def plan(args) -> list[tuple]:
    """Tuning runs first (every lr on the tuning seeds), then the remaining seeds at the chosen lr."""
    tune = args.seeds[:args.tune_seeds]
    return [(m, e, lr, s) for m in args.methods for e in args.epsilons for lr in lr_grid(args, m) for s in tune]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def _settings(args) -> dict:
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "name", "resume", "quiet", "threads", "merge")}
    settings["epsilons"] = [_json_eps(e) for e in args.epsilons]
    settings["lrs"] = {m: lr_grid(args, m) for m in args.methods}
    return settings


def finish(args, result: dict, data: dict, paths: tuple[Path, Path, Path], echo) -> dict:
    """Choose the lrs (validation only), tabulate the test results, write NAME.json / .md / .png."""
    json_path, md_path, png_path = paths
    runs = result["runs"]
    have = {_key(r["method"], r["epsilon"], r["lr"], r["seed"]) for r in runs}
    tune_seeds = args.seeds[:args.tune_seeds]
    missing = [k for k in plan(args) if _key(*k) not in have]
    if missing:
        raise SystemExit(f"--merge: no run for (method, epsilon, lr, seed) {missing[0]} ({len(missing)} tuning runs missing)")
    selected = {m: {str(_json_eps(e)): select_lr(runs, m, e, lr_grid(args, m), tune_seeds) for e in args.epsilons}
                for m in args.methods}
    result["selected"] = selected
    missing = [(m, _json_eps(e), selected[m][str(_json_eps(e))]["lr"], s) for s in args.seeds for m in args.methods
               for e in args.epsilons if _key(m, e, selected[m][str(_json_eps(e))]["lr"], s) not in have]
    if missing:
        raise SystemExit(f"--merge: no run for (method, epsilon, chosen lr, seed) {missing[0]} ({len(missing)} missing); "
                         "tabulate fewer --seeds")
    first = runs[0]["data"]
    result["data"] = {"source": data["train"].source, "label_names": data["train"].label_names,
                      "train_examples": len(data["train"]), "train_class_counts": data["train"].class_counts(),
                      "client_examples": [c["examples"] for c in first["clients"]],
                      "val_examples": len(data["val"]), "test_examples": len(data["test"]),
                      "test_class_counts": data["test"].class_counts()}
    result["table"] = summarize(runs, selected, args.methods, args.epsilons, args.seeds)
    used = {_key(m, e, lr, s) for m in args.methods for e in args.epsilons for s in args.seeds
            for lr in lr_grid(args, m)}
    result["run_seconds_sum"] = sum(r["seconds"]["total"] for r in runs if _key(r["method"], r["epsilon"], r["lr"], r["seed"]) in used)
    result["run_cpu_seconds_sum"] = sum(r["seconds"].get("cpu", 0.0) for r in runs
                                        if _key(r["method"], r["epsilon"], r["lr"], r["seed"]) in used)
    result["updated_utc"] = _now()
    _atomic_write(json_path, json.dumps(result, indent=1))
    _atomic_write(md_path, markdown_table(result))
    plot(result, png_path)
    echo(markdown_table(result))
    echo(f"wrote {json_path}, {md_path}, {png_path}")
    return result


def merge(args, paths: tuple[Path, Path, Path], echo) -> dict:
    """Tabulate runs from several NAME.json files (e.g. one process per method) for ``args``' grid."""
    settings = _settings(args)
    runs, parts = {}, []
    for src in args.merge:
        part = json.loads(Path(src).read_text())
        ps = part["settings"]
        diff = sorted(k for k in settings if k not in ("methods", "seeds", "lrs") and ps.get(k) != settings[k])
        diff += [f"lrs[{m}]" for m in ps["methods"] if m in settings["lrs"] and ps["lrs"][m] != settings["lrs"][m]]
        if diff:
            raise SystemExit(f"--merge: {src} was run with other settings: {diff}")
        for r in part["runs"]:
            runs.setdefault(_key(r["method"], r["epsilon"], r["lr"], r["seed"]), r)
        parts.append({"file": str(src), "started_utc": part["started_utc"], "updated_utc": part.get("updated_utc"),
                      "runs": len(part["runs"])})
    start = min(_dt.datetime.fromisoformat(p["started_utc"]) for p in parts)
    end = max(_dt.datetime.fromisoformat(p["updated_utc"]) for p in parts if p["updated_utc"])
    result = {"settings": settings, "machine": json.loads(Path(args.merge[0]).read_text())["machine"],
              "started_utc": start.isoformat(), "merged_from": parts, "runs": list(runs.values()),
              "wall_seconds": (end - start).total_seconds()}
    return finish(args, result, prepare_data(args), paths, echo)


def main(argv: list[str] | None = None) -> dict:
    """Run the grid; write NAME.json / NAME.md / NAME.png under ``--out``; return the result dict."""
    args = build_parser().parse_args(argv)
    try:
        validate_args(args)
    except ValueError as e:
        build_parser().error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    echo = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    logging.getLogger("fedlora_fast.federated.simulation").setLevel(logging.ERROR)  # the seeded-noise notice
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / f"{args.name}.json", out / f"{args.name}.md", out / f"{args.name}.png")
    if args.merge:
        return merge(args, paths, echo)
    settings = _settings(args)
    result = {"settings": settings, "machine": _machine(), "started_utc": _now(), "runs": [], "selected": {},
              "table": [], "wall_seconds": None}
    if args.resume and paths[0].exists():
        old = json.loads(paths[0].read_text())
        if old["settings"] != settings:
            diff = sorted(k for k in settings if old["settings"].get(k) != settings[k])
            raise SystemExit(f"--resume: {paths[0]} was written with other settings ({diff}); use another --name")
        result.update(runs=old["runs"], started_utc=old["started_utc"], resumed_utc=_now())
    runs = result["runs"]
    n_loaded = len(runs)
    started = time.perf_counter()
    data = prepare_data(args)
    done = {_key(r["method"], r["epsilon"], r["lr"], r["seed"]) for r in runs}

    def execute(todo):
        for m, e, lr, s in todo:
            if _key(m, e, lr, s) in done:
                continue
            r = run_one(args, data, m, e, lr, s)
            runs.append(r)
            done.add(_key(m, e, lr, s))
            result["updated_utc"] = _now()
            _atomic_write(paths[0], json.dumps(result, indent=1))
            echo(f"[{len(runs)}] {METHOD_NAMES[m]} eps={_eps_label(e)} lr={lr:g} seed={s}: val {r['val']['accuracy']:.4f} "
                 f"test {r['test']['accuracy']:.4f} (spent eps {r['epsilon_spent']:.3f}) {r['seconds']['total']:.0f}s "
                 f"wall, {r['seconds']['cpu']:.0f}s cpu | elapsed {(time.perf_counter() - started) / 60:.1f} min")

    execute(plan(args))
    tune_seeds = args.seeds[:args.tune_seeds]
    chosen = {(m, e): select_lr(runs, m, e, lr_grid(args, m), tune_seeds)["lr"] for m in args.methods for e in args.epsilons}
    # seed-major: an interrupted grid leaves whole seeds done (--merge tabulates them with fewer --seeds)
    execute([(m, e, chosen[(m, e)], s) for s in args.seeds for m in args.methods for e in args.epsilons])
    # a resumed grid adds the run time of the runs it loaded (their wall time between runs is not known)
    result["wall_seconds"] = time.perf_counter() - started + sum(r["seconds"]["total"] for r in runs[:n_loaded])
    return finish(args, result, data, paths, echo)


if __name__ == "__main__":
    main(sys.argv[1:])

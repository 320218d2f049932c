"""``fedlora-fast``: the command line. ``fedlora-fast train`` runs a differentially private federated FFA-LoRA job
(a text classifier, simulated clients); ``fedlora-fast train-lm`` one of a causal language model.

FFA-LoRA (Sun et al., ICLR 2024, arXiv 2403.12313) in the embedded simulation of ``fedlora_fast.federated``.
Subcommands register in ``SUBCOMMANDS`` (name -> function adding its parser); each parser sets ``func``.
Bad input ends with one clear line on stderr and exit status 2, never a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Callable

from fedlora_fast.federated import causal_lm
from fedlora_fast.federated.aggregation import AGGREGATORS
from fedlora_fast.federated.checkpoint import CHECKPOINT_NAME
from fedlora_fast.federated.client import LR_SCHEDULES, OPTIMIZERS
from fedlora_fast.federated.partition import SCHEMES
from fedlora_fast.federated.simulation import METHODS, FederatedConfig
from fedlora_fast.io import unwritable
from fedlora_fast.privacy.dpsgd import CLIPPING

EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad command-line input."""


def _proportions(text: str) -> list[list[float]]:
    """``"0.1,0.9;0.9,0.1"`` or a JSON list of rows."""
    try:
        rows = json.loads(text) if text.strip().startswith("[") else [
            [float(x) for x in row.split(",")] for row in text.split(";") if row.strip()
        ]
    except (ValueError, json.JSONDecodeError):
        raise argparse.ArgumentTypeError(
            f"expected rows like '0.1,0.9;0.9,0.1;0.5,0.5' or a JSON list of lists, got {text!r}"
        ) from None
    if not rows or not all(isinstance(r, list) and r for r in rows):
        raise argparse.ArgumentTypeError(f"expected at least one non-empty row, got {text!r}")
    return [[float(x) for x in r] for r in rows]


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults as a user types them: none where the help says it already or there is none (None), a list
    comma-joined (``query,value``, not ``['query', 'value']``)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default:" in text or action.default is None or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action.default, (list, tuple)):
            return f"{text} (default: {','.join(map(str, action.default))})"
        return super()._get_help_string(action)


def add_train_parser(sub) -> argparse.ArgumentParser:
    d = FederatedConfig()
    p = sub.add_parser(
        "train",
        help="federated DP fine-tuning of a text classifier with FFA-LoRA (simulation)",
        description=(
            "Fine-tune a text classifier across several simulated clients, each training FFA-LoRA's B under "
            "DP-SGD with its own privacy accountant and sending only B (and the head) to a server that "
            "validates and averages the updates. With no flags: the packaged all-MiniLM-L6-v2, the bundled SMS "
            "Spam Collection (20% held out for test), the paper's 3-client label skew, epsilon 8 at delta 1e-5. "
            "Writes OUT/metrics.json, OUT/curves.png, OUT/adapter/ (peft format) and a checkpoint after "
            "every round (--resume continues it)."
        ),
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("model and adapter")
    g.add_argument("--model", default=None,
                   help="local model directory, or hub name such as org/name (a path that exists, or starts with /, "
                        "./, ../ or ~, is local) (default: the packaged all-MiniLM-L6-v2)")
    g.add_argument("--method", choices=METHODS, default=d.method, help="ffa: frozen random A, train and send B; lora: train and send A and B")
    g.add_argument("-r", "--rank", dest="r", type=int, default=d.r, help="adapter rank r")
    g.add_argument("--alpha", type=float, default=d.alpha, help="adapter scale numerator (scale = alpha / r)")
    g.add_argument("--targets", type=_names, default=d.targets, help="comma-separated module names to adapt (peft matching) or all-linear")
    g.add_argument("--trainable-modules", type=_names, default=d.trainable_modules,
                   help="comma-separated modules trained in full under DP (the classification head); '' for none")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="csv/tsv/json/jsonl/parquet file with a header row (UTF-8), or hub dataset name such as org/name "
                        "(default: bundled SMS spam). CSV uses standard quoting (a text with a comma is written "
                        "\"like, this\"); TSV is read WITHOUT quoting: a quote is part of the text, and a text "
                        "cannot contain a tab or a line break. A row with more or fewer fields than the header "
                        "is an error; parquet needs pip install 'fedlora_fast[data]'")
    g.add_argument("--text-column", default=None, help="column with the text (default: guessed; SMS for the bundled data)")
    g.add_argument("--label-column", default=None, help="column with the class label (default: guessed; Label for the bundled data)")
    g.add_argument("--labels", type=_names, default=None,
                   help="comma-separated class names in id order (default: the classes in the data); fixes the "
                        "classifier head when Flower nodes train on their own data files (data-path); a list "
                        "starting with '-' goes after '=' (--labels=-1,1)")
    g.add_argument("--test-fraction", type=float, default=d.test_fraction, help="stratified share held out for test when the data has no test split")
    g.add_argument("--max-length", type=int, default=d.max_length, help="tokens per text (truncation; batches pad dynamically)")
    g = p.add_argument_group("federation")
    g.add_argument("--clients", dest="num_clients", type=int, default=d.num_clients, help="number of clients")
    g.add_argument("--partition", choices=SCHEMES, default=d.partition,
                   help="iid; label_skew (each client's class proportions, default the paper's); dirichlet")
    g.add_argument("--label-proportions", type=_proportions, default=None,
                   help="label_skew rows, one per client, e.g. '0.1,0.9;0.9,0.1;0.5,0.5' (the default)")
    g.add_argument("--dirichlet-alpha", type=float, default=d.dirichlet_alpha, help="Dirichlet concentration (smaller: more skew)")
    g.add_argument("--rounds", type=int, default=d.rounds, help="federated rounds R")
    g.add_argument("--local-steps", type=int, default=d.local_steps, help="DP-SGD steps per client per round K")
    g.add_argument("--aggregator", choices=sorted(AGGREGATORS), default=d.aggregator,
                   help="fedavg: example-weighted mean; central_dp: clip each client's update, average, add noise (user-level DP)")
    g.add_argument("--server-clip-norm", type=float, default=d.server_clip_norm, help="central_dp: L2 bound on a client's update")
    g.add_argument("--server-noise-multiplier", type=float, default=d.server_noise_multiplier, help="central_dp: noise multiplier")
    g.add_argument("--min-clients", type=int, default=d.min_clients,
                   help="fewest accepted updates that change the global adapter (FedAvg; central_dp releases every round)")
    g.add_argument("--max-update-norm", type=float, default=d.max_update_norm,
                   help="reject a client update further than this (L2, all sent tensors) from the global adapter (default: no bound)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="expected Poisson batch size per step (sample rate = batch / client size)")
    g.add_argument("--lr", type=float, default=d.lr, help="local learning rate")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                   help="learning rate over rounds: constant, or cosine from --lr down to --lr/10 in the last round")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="local optimizer (fresh every round)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    g.add_argument("--physical-batch-size", type=int, default=None, help="split sampled batches into micro-batches of this size (less memory; with dropout, other masks)")
    g = p.add_argument_group("privacy (sample-level DP-SGD per client)")
    eps = g.add_mutually_exclusive_group()
    eps.add_argument("--epsilon", type=float, default=d.epsilon, help="target epsilon per client; the noise is calibrated to it")
    eps.add_argument("--noise-multiplier", type=float, default=None, help="fixed noise multiplier instead of --epsilon (0: no DP)")
    g.add_argument("--delta", type=float, default=d.delta, help="delta")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="per-sample clipping threshold C")
    g.add_argument("--clipping", choices=CLIPPING, default=d.clipping, help="flat: one threshold over all tensors; per_layer: C/sqrt(L) each")
    g.add_argument("--secure-noise", action="store_true", help="DP-SGD secure mode: every step's noise four draws from the OS's secure generator summed (os.urandom on a CPU, ChaCha20 under a fresh OS key on a GPU), and the Poisson sampling and dropout masks OS-seeded (not reproducible from --seed)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of split, partition, A and (unless --secure-noise) dropout, sampling and noise")
    g.add_argument("--out", default="runs/fedlora-fast", help="output directory")
    g.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out (same settings)")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a run")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate on the test split every N rounds (and at the end)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="evaluation batch size")
    g.add_argument("--device", default=d.device, help="torch device (cpu, cuda)")
    g.add_argument("--cuda-graph", action="store_true",
                   help="replay each client's fixed-shape micro-batches (forward, backward, clipping) from a CUDA graph")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (round summaries still printed)")
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run_train)
    return p


def config_from_args(args: argparse.Namespace) -> FederatedConfig:
    fields = FederatedConfig.__dataclass_fields__
    kw = {k: v for k, v in vars(args).items() if k in fields}
    if args.noise_multiplier is not None:
        kw["epsilon"] = None
    return FederatedConfig(**kw)


# (flag, its FederatedConfig field, the setting it belongs to, whether that setting is in force)
_MODE_FLAGS = (
    ("--label-proportions", "label_proportions", "--partition label_skew", lambda c: c.partition == "label_skew"),
    ("--dirichlet-alpha", "dirichlet_alpha", "--partition dirichlet", lambda c: c.partition == "dirichlet"),
    ("--server-clip-norm", "server_clip_norm", "--aggregator central_dp", lambda c: c.aggregator == "central_dp"),
    ("--server-noise-multiplier", "server_noise_multiplier", "--aggregator central_dp",
     lambda c: c.aggregator == "central_dp"),
    ("--momentum", "momentum", "--optimizer sgd", lambda c: c.optimizer == "sgd"),
)


def check_mode_flags(config: FederatedConfig, prefix: str = "--") -> None:
    """Refuse a flag set away from its default where the chosen mode ignores it (``--dirichlet-alpha`` with an
    iid split): the run would silently not do what the command line says. ``prefix=""``: named as a Flower
    run config's keys (``dirichlet-alpha``)."""
    defaults = FederatedConfig()
    for flag, field_name, belongs, active in _MODE_FLAGS:
        if getattr(config, field_name) != getattr(defaults, field_name) and not active(config):
            flag, belongs = (flag, belongs) if prefix == "--" else (flag[2:], belongs[2:].replace(" ", " = "))
            raise UsageError(f"{flag}: applies only with {belongs}, which this run does not use; drop it or "
                             f"set {belongs}")


def _file_id(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime in ns, size) of ``path``, or None where there is none: a checkpoint rewritten (atomically,
    a new file renamed over the old) has another."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def run_train(args: argparse.Namespace) -> int:
    from fedlora_fast.federated.simulation import run_simulation

    config = config_from_args(args)
    config.validate()
    check_mode_flags(config)
    try:
        import torch

        if config.device != "cpu":
            device = torch.device(config.device)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise UsageError(f"device: {config.device!r}, but this machine's PyTorch sees no CUDA device")
            if device.type == "meta":  # tensors without memory: nothing to train or evaluate
                raise UsageError(f"device: {config.device!r} holds no data; use cpu or cuda")
            torch.empty(0, device=device)  # a device this PyTorch cannot use fails here, with its reason
    except (RuntimeError, AssertionError) as e:  # torch says "not compiled with X enabled" with an assert
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]  # (mps on Linux: a 55-line dispatcher table)
        raise UsageError(f"device: {config.device!r}: {first}") from None
    if not args.out:  # (Path('') is the current directory: the run would be written there)
        raise UsageError(f"out: expected a directory, got {args.out!r}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # (else found only after the model is loaded and the noise calibrated)
        raise UsageError(f"out: {str(out)!r} is a file; expected a directory for the run (new, or one to --resume)")
    if not args.resume or out.is_dir():  # (--resume into nothing: run_simulation says there is no checkpoint)
        why = unwritable(out)  # creates it, as the run would; a probe file is written and removed there
        if why is not None:
            raise UsageError(f"out: expected a writable directory, got {str(out)!r} ({why})")
    metrics = run_simulation(config, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    final = metrics["final"]
    wrote = [str(out / "metrics.json")]
    if (out / "curves.png").exists():
        wrote.append(str(out / "curves.png"))
    if (out / "adapter").exists():
        wrote.append(str(out / "adapter") + "/")
    server = final.get("server_privacy") or {}
    server_eps = server.get("epsilon")
    server_eps = f" | server (user-level) epsilon {server_eps:.3f}" if isinstance(server_eps, float) else ""
    print(
        f"final: test accuracy {final['accuracy']:.4f} | epsilon {final['epsilon']:.3f} (delta {final['delta']:g}, "
        f"largest over {len(final['clients'])} clients){server_eps} | {final['seconds']:.0f} s of rounds | wrote "
        f"{', '.join(wrote)}"
    )
    if final["noise"].startswith("seeded"):  # the seed is in metrics.json and the adapter's metadata
        print("note: the DP noise was seeded from --seed (reproducible): this epsilon holds only against someone who "
              "does not know the seed; train on real private data with --secure-noise")
    return 0


def add_train_lm_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train-lm",
        help="federated DP fine-tuning of a causal language model (Llama-class) with FFA-LoRA",
        description=(
            "Fine-tune a causal language model (a local Hugging Face checkpoint directory: Llama, Mistral, Qwen...; "
            "bf16 on a GPU) across several clients, each training FFA-LoRA's B on every projection under DP-SGD "
            "with its own accountant; the server averages B. --tiny: a random 2-layer Llama on synthetic "
            "sequences (CPU, seconds). Data parallel under torchrun: torchrun --nproc-per-node N -m fedlora_fast "
            "train-lm .... Writes OUT/metrics.json, OUT/adapter/ (peft format) and a checkpoint after every round "
            "(--resume continues it)."
        ),
        formatter_class=_HelpFormatter,
    )
    causal_lm.add_arguments(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=lambda args: run_train_lm(args, p))
    return p


def run_train_lm(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    causal_lm.train(causal_lm.finish_args(args, parser.error))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # under torchrun: the results are written and the group torn down; the interpreter's teardown is skipped,
        # where gloo's threads aborted a process now and then ("terminate called without an active exception":
        # once in six runs of the data-parallel test seen on 2026-11-28, after its results; as
        # tests/dp_group_worker.py does)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


SUBCOMMANDS: dict[str, Callable] = {"train": add_train_parser, "train-lm": add_train_lm_parser}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlora-fast",
        description="Differentially private federated fine-tuning with FFA-LoRA and fused per-sample-gradient kernels.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="fedlora-fast: %(levelname)s: %(message)s")
    # opacus notes that the optimal RDP order is at the edge of its grid; the bound is still valid.
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    shown = warnings.showwarning  # a warning is one line on stderr, not Python's file:line and source echo
    warnings.showwarning = lambda message, *a, **k: print(f"fedlora-fast: warning: {message}", file=sys.stderr)
    out = getattr(args, "out", None)
    checkpoint = Path(out) / CHECKPOINT_NAME if out else None
    # the checkpoint --out holds before this run (an interrupt tells its own first checkpoint from it)
    checkpoint_before = _file_id(checkpoint) if checkpoint is not None else None
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if checkpoint is not None and getattr(args, "overwrite", False) and checkpoint.exists() and (
                _file_id(checkpoint) == checkpoint_before):
            # --overwrite removes the previous run only once the new one is built: its checkpoint is still there
            print(f"fedlora-fast {args.command}: interrupted before this run checkpointed a round; the previous "
                  f"run in {out} is untouched: rerun with --overwrite to replace it", file=sys.stderr)
        elif checkpoint is not None and checkpoint.exists():
            print(f"fedlora-fast {args.command}: interrupted; the last completed round is checkpointed: "
                  "rerun with --resume to continue", file=sys.stderr)
        elif getattr(args, "overwrite", False):  # (the previous run's outputs may still be there: not resumable)
            print(f"fedlora-fast {args.command}: interrupted before this run checkpointed a round: rerun with "
                  "--overwrite", file=sys.stderr)
        else:
            print(f"fedlora-fast {args.command}: interrupted before a round completed (no checkpoint): rerun without "
                  "--resume", file=sys.stderr)
        return 130
    except (ValueError, TypeError, KeyError, OSError) as e:
        if getattr(args, "debug", False):
            raise
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"fedlora-fast {args.command}: error: {_as_flag(msg, parser, args.command)}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        warnings.showwarning = shown


# library argument names that are not a flag's dest (inject_adapters' target_modules is --targets, the data
# loader's label_names --labels)
_ARG_ALIASES = {"target_modules": "targets", "label_names": "labels"}
# a message's leading setting names: "name: ...", "name=value: ...", "a and b: ...", "a and b overlap: ..."
_LEADING_NAMES = re.compile(r"(?P<a>[A-Za-z_]\w*)(?:(?=: |=)| and (?P<b>[A-Za-z_]\w*)(?=:| \w+:))")


def _as_flag(msg: str, parser: argparse.ArgumentParser, command: str) -> str:
    """A message that begins with a setting's name (``num_clients: ...``, ``test_fraction=0.99: ...``,
    ``text_column and label_column: ...``, as ``FederatedConfig.validate`` and the library name their
    arguments) begins with its flag on the command line (``--clients: ...``); only where every name it
    begins with is a flag's (``_ARG_ALIASES``: the library's name for it), the rest of the text unchanged."""
    m = _LEADING_NAMES.match(msg)
    if m is None:
        return msg
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    sub = sub.choices.get(command) if sub is not None else None
    flags = {a.dest: a.option_strings[-1] for a in (sub._actions if sub is not None else []) if a.option_strings}
    names = [_ARG_ALIASES.get(n, n) for n in m.group("a", "b") if n is not None]
    if not all(n in flags for n in names):
        return msg
    return " and ".join(flags[n] for n in names) + msg[m.end():]


if __name__ == "__main__":
    sys.exit(main())

"""The Flower run config -> ``FederatedConfig``, through the ``fedlora-fast train`` parser itself.

A Flower run config (``[tool.flwr.app.config]`` in the app's ``pyproject.toml``, overridden with
``flwr run --run-config 'key=value ...'``) holds TOML scalars. Its keys are the long flags of
``fedlora-fast train`` without the dashes (``--local-steps`` -> ``local-steps``, ``--clients`` ->
``clients``), with the same defaults, and its values are parsed by that command's own argument parser
(``fedlora_fast.cli.add_train_parser``) and turned into a ``FederatedConfig`` by ``config_from_args``: a
Flower run and a ``fedlora-fast train`` run with the same settings build the same federation; each value
reaches the parser as one ``--key=value`` token, so a value starting with ``-`` (``labels = "-1,1"``,
``delta = -1e-06``) is that flag's value, as ``--labels=-1,1`` on the command line. TOML has no null: ``""``
means "not given" (the flag's default) only for the settings whose flag has no default (those declared
``""`` in ``examples/flower/pyproject.toml``: ``model``, ``data``, ``labels``, ``noise-multiplier``, ...), for
``out`` and for ``flower-dump-dir`` (off); for a list setting (``targets``, ``trainable-modules``) it is the
empty list, as ``--trainable-modules ""``; any other key takes ``""`` as its value, as the command line
would (``epsilon = ""``: "invalid float value: ''"). Lists are written as on the command line (``targets =
"query,value"``). Keys that only exist under Flower start with ``flower-``; command-line switches that make
no sense there (``resume``, ``overwrite``, ``no-progress``, ``debug``, ``secure-noise``, which is always on)
are not run-config keys.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
from collections.abc import Mapping

from fedlora_fast.cli import add_train_parser, check_mode_flags, config_from_args
from fedlora_fast.federated.simulation import FederatedConfig

OUT_KEY = "out"  # the ServerApp's output directory (metrics.json, adapter/, checkpoint), as --out
DUMP_KEY = "flower-dump-dir"  # audit: the ServerApp writes each aggregate ("" = off; nodes: node config dump-dir)
TIMEOUT_KEY = "flower-round-timeout"  # seconds the ServerApp waits for the replies of one round
NOT_UNDER_FLOWER = ("help", "resume", "overwrite", "no_progress", "debug", "secure_noise")


def train_parser() -> argparse.ArgumentParser:
    """The ``fedlora-fast train`` argument parser."""
    root = argparse.ArgumentParser(prog="fedlora-fast")
    return add_train_parser(root.add_subparsers())


def _setting_actions() -> dict[str, argparse.Action]:
    """``{run-config key: parser action}`` for every flag that is a setting of the run (or ``out``)."""
    out = {}
    for action in train_parser()._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.dest in NOT_UNDER_FLOWER:
            continue
        if action.dest not in FederatedConfig.__dataclass_fields__ and action.dest != OUT_KEY:
            raise RuntimeError(f"fedlora-fast train --{longs[0]}: not a FederatedConfig field; map it here")
        if action.nargs not in (None, 0):  # parse_run_config passes one --key=value token (or a bare switch)
            raise RuntimeError(f"fedlora-fast train --{longs[0]}: nargs={action.nargs!r}; map it here")
        out[max(longs, key=len)[2:]] = action
    return out


def _toml_default(action: argparse.Action):
    value = action.default
    if value is None:
        return ""
    if isinstance(value, list):  # as typed on the command line (comma-separated)
        return ",".join(map(str, value))
    return value


SERVER_DATA_KEY = "flower-server-data"  # false: the ServerApp loads no data (needs labels; no data summary)
OVERWRITE_KEY = "flower-overwrite"  # true: the ServerApp replaces a run already in `out` (else it refuses)
# true: nodes with their own data-path send exact accuracy/loss on their held-out rows (outside the DP guarantee)
EVAL_LOCAL_KEY = "flower-eval-local"
FLOWER_DEFAULTS = {DUMP_KEY: "", TIMEOUT_KEY: 3600.0, SERVER_DATA_KEY: True, OVERWRITE_KEY: False, EVAL_LOCAL_KEY: False}


def default_run_config() -> dict:
    """Every run-config key with its default (what ``examples/flower/pyproject.toml`` declares)."""
    out = {k: _toml_default(a) for k, a in _setting_actions().items()}
    out.update(FLOWER_DEFAULTS)
    return out


def parse_run_config(run_config: Mapping) -> tuple[FederatedConfig, argparse.Namespace]:
    """``(validated FederatedConfig, the parsed namespace)`` from a Flower run config.

    Values equal to their default are left to the parser's defaults (so a default ``epsilon`` does not
    clash with a given ``noise-multiplier``, exactly as on the command line).

    Raises:
        ValueError: an unknown key, a value the ``fedlora-fast train`` parser refuses, or an invalid
            setting (the message names the key, what was expected and what was found).
    """
    actions = _setting_actions()
    unknown = sorted(k for k in run_config if k not in actions and k not in FLOWER_DEFAULTS)
    if unknown:
        raise ValueError(f"run config: unknown keys {unknown}; expected fedlora-fast train settings {sorted(actions)}")
    defaults = default_run_config()
    argv = []
    for key, value in run_config.items():
        if key not in actions or value == defaults[key] and type(value) is type(defaults[key]):
            continue
        if isinstance(actions[key], argparse._StoreTrueAction):  # a switch: true turns it on
            if not isinstance(value, bool):
                raise ValueError(f"run config {key!r}: expected true or false, got {value!r}")
            if value:
                argv.append(f"--{key}")
            continue
        if isinstance(value, bool):
            raise ValueError(f"run config {key!r}: expected a value for --{key}, got {value!r}")
        if isinstance(value, str) and value.strip() == "" and (actions[key].default is None or key == OUT_KEY):
            # "not given": the parser's default (for a list flag, "" is the empty list, as on the CLI); a blank
            # out is not the SuperLink's working directory
            continue
        # one token: a value starting with "-" (labels "-1,1", delta -1e-06) is the flag's value, not an option
        argv.append(f"--{key}={value}")
    parser = train_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
    except SystemExit:
        msg = err.getvalue().strip().splitlines()
        raise ValueError(f"run config: {msg[-1] if msg else 'invalid settings'} (from {argv})") from None
    cfg = config_from_args(args)
    cfg.validate()
    check_mode_flags(cfg, prefix="")  # as `fedlora-fast train` refuses them: a setting the run would ignore
    return cfg, args


def federated_config(run_config: Mapping) -> FederatedConfig:
    """The validated ``FederatedConfig`` of a Flower run config (see ``parse_run_config``)."""
    return parse_run_config(run_config)[0]


def flower_setting(run_config: Mapping, key: str):
    """``out`` (the CLI's ``--out``) or a Flower-only setting (``flower-*``), with its default."""
    if key == OUT_KEY:
        return parse_run_config({k: v for k, v in run_config.items() if k == OUT_KEY})[1].out
    value = run_config.get(key, FLOWER_DEFAULTS[key])
    expected = type(FLOWER_DEFAULTS[key])
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected):
        raise ValueError(f"run config {key!r}: expected a {expected.__name__}, got {value!r}")
    if key == TIMEOUT_KEY and not (math.isfinite(value) and value > 0):
        # 0, negative or NaN: Flower still sends the round's messages (clients train and spend budget) but
        # waits for no reply, so every round would aggregate nothing
        raise ValueError(f"run config {key!r}: expected a finite number of seconds > 0, got {value!r}")
    return value

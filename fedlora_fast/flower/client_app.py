"""The Flower ``ClientApp``: one fedlora_fast federated client per SuperNode.

Flower Message API (``flwr`` >= 1.20): the train handler receives the global adapter tensors, runs the
client's local DP-SGD (``fedlora_fast.federated.client.Client.fit``: Poisson sampling, per-sample
clipping, Gaussian noise; Abadi et al., CCS 2016) and replies with only the trainable tensors (B, plus the
head if trained: FFA-LoRA, Sun et al., ICLR 2024, arXiv 2403.12313), the update metadata and the client's
privacy record; the evaluate handler scores the global adapter on the node's shard of the test split.

The node's data and client are built exactly as in the simulation (``Federation``, same run config, same
partition); the node picks its client with ``--node-config "partition-id=K num-partitions=N"``. A silo with
its own examples adds ``data-path="/its/file.tsv"`` to that node config: the node then trains on every
training row of that file (its held-out share for evaluation) instead of a partition of the run's ``data``;
the run config must then name the classes (``labels = "ham,spam"``) so that every silo's classifier head,
and so the model fingerprint the server checks, is the same. Each message
runs in a fresh process, so the client's privacy state (noise multiplier, accountant) and its RNG states
live in the run's ``context.state`` between rounds, and the accountant with the noise multiplier also in a
privacy ledger on the node's own disk (``ledger_path``), so that a restarted SuperNode keeps counting. DP noise
is always drawn from the operating system's secure generator here (``os_normal``, at every draw) and batch
sampling seeded from the OS: the server knows the run config (and its ``seed``), and noise it could regenerate
protects nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import stat
import tempfile
import threading
import time
import warnings
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora_fast.data import TextClassificationData, load_text_classification, same_text_key, train_test_split
from fedlora_fast.federated import checkpoint, serialization
from fedlora_fast.federated.client import Client
from fedlora_fast.federated.server import short_repr
from fedlora_fast.federated.simulation import Federation, FederatedConfig, seed_dropout
from fedlora_fast.federated.simulation import evaluate as evaluate_model
from fedlora_fast.federated.state import check_state, load_trainable
from fedlora_fast.io import LockedError, atomic_write_new, exclusive_lock, unwritable
from fedlora_fast.flower import node, records
from fedlora_fast.flower.config import EVAL_LOCAL_KEY, federated_config, flower_setting
from fedlora_fast.flower.strategy import FIRST_EXAMPLES_KEY, MIN_NOISE_KEY, ROUND_KEY
from fedlora_fast.privacy.accounting import (
    MAX_TARGET_EPSILON, Accountant, calibrate_noise_multiplier, check_sample_rate,
)
from fedlora_fast.privacy.sampling import seed_from_os

DATA_PATH_KEY = "data-path"  # node config: this silo's own data file (else: partition-id of the run's data)
LEDGER_DIR_KEY = "privacy-dir"  # node config: the directory of the node's privacy ledger (default: below)
LEDGER_OFF = "none"  # privacy-dir=none (or $FEDLORA_FAST_PRIVACY_DIR=none): no ledger (see _count_earlier_rounds)
# The node's own limits: the run config is the server's, and the server is not trusted with the silo's privacy.
MAX_EPSILON_KEY = "max-epsilon"  # node config: refuse a run whose planned epsilon (at its delta) exceeds this
MAX_DELTA_KEY = "max-delta"  # node config: refuse a run whose delta exceeds this
ALLOW_NO_NOISE_KEY = "allow-no-noise"  # node config: true = train with noise multiplier 0 (no privacy) if asked
EVAL_LOCAL_NODE_KEY = "eval-local"  # node config: true = score own held-out rows when the run config asks too
DUMP_DIR_KEY = "dump-dir"  # node config: audit: write each update sent to this directory
SHARED_DATA_KEY = "shared-data"  # node config: the run config's `data` this node agrees to read (partition mode)
SHARED_MODEL_KEY = "shared-model"  # node config: the run config's `model` this node agrees to load (not the default)
TEST_FRACTION_KEY = "test-fraction"  # node config: a data-path silo's held-out share of its file (default 0.2)
SILO_SPLIT_SEED = 1_000_003  # a data-path silo's split of its own file: fixed, never the run's seed
REPLY_AFTER_KEY = "reply-after"  # node config: seconds: hold each train reply until this long after its message
TEXT_COLUMN_KEY = "text-column"  # node config: a data-path silo's text column (default: guessed); never the run's
LABEL_COLUMN_KEY = "label-column"  # node config: a data-path silo's label column (default: guessed); never the run's
EVAL_MIN_ROWS_KEY = "eval-min-rows"  # node config: eval-local scores only a held-out set of at least this many rows
EVAL_MIN_ROWS = 20  # its default
EVAL_MAX_ANSWERS_KEY = "eval-max-answers"  # node config: eval-local answers at most this many times per run
EVAL_MAX_ANSWERS = 10  # its default
PRIVACY_DIR_ENV = "FEDLORA_FAST_PRIVACY_DIR"  # the ledger directory where the node config names none
STATE_KEY = "fedlora-client"  # context.state ConfigRecord: the client's JSON state (accountant, sigma)
RNG_KEY = "fedlora-rng"  # context.state ArrayRecord: the sampling and noise generator states

app = ClientApp()
log = logging.getLogger(__name__)


class NodeError(RuntimeError):
    """An error whose message quotes no data of the node (settings, budget): Flower sends it to the server as is."""


class NodeConfigError(NodeError, ValueError):
    """A bad node or run config setting (no data in the message): the server sees how to start the node."""


class ServerMessageError(NodeError, ValueError):
    """The server's message is malformed (its round, its tensors): nothing of the node's data in it."""


def _server_round(config, cfg: FederatedConfig) -> int:
    """The message's round number: an int in [0, rounds). ``int()`` of it took "0", 0.9 and True, trained round
    -1 (spending budget on an update the server then rejects as stale), and took 10**12 for a noise problem."""
    if ROUND_KEY not in config:
        raise ServerMessageError(f"server message: no '{ROUND_KEY}' in its config record")
    r = config[ROUND_KEY]
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < cfg.rounds:
        raise ServerMessageError(f"server message: '{ROUND_KEY}': expected an int in [0, {cfg.rounds}) (the run's "
                                 f"rounds), got {r!r}")
    return r


def _server_tensors(msg: Message, fed: Federation) -> dict:
    """The message's global tensors, checked against the node's own (keys, shapes, dtypes, finite values) before
    any step: a malformed broadcast is the server's error, said to it by name, not a node-data error."""
    if "arrays" not in msg.content.array_records:
        raise ServerMessageError("server message: no 'arrays' record (the global tensors)")
    try:
        tensors = records.to_tensors(msg.content.array_records["arrays"])
    except (ValueError, TypeError) as e:
        raise ServerMessageError(f"server message: its 'arrays' record does not load ({e})") from None
    try:
        check_state("server message", tensors, fed.server.global_state, "the run's global state")
    except ValueError as e:
        raise ServerMessageError(str(e)) from None
    return tensors


def _kept_private(handler):
    """Flower sends a handler's exception text to the server (and the strategy writes it to metrics.json). A
    data error may quote the silo's rows (a label, a text): anything but a ``NodeError`` is logged here in
    full and reaches the server as its type only."""

    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except NodeError:
            raise
        except Exception as e:
            log.exception("fedlora_fast node: %s failed", handler.__name__)
            raise NodeError(
                f"{type(e).__name__} in the node's {handler.__name__} (its message stays in the node's log: it may "
                "quote the node's data)"
            ) from None

    return run


_FEDERATIONS: dict[str, Federation] = {}  # one per config per process (a process may serve several messages)


NODE_KEYS = ("partition-id", "num-partitions", DATA_PATH_KEY, LEDGER_DIR_KEY, MAX_EPSILON_KEY, MAX_DELTA_KEY,
             ALLOW_NO_NOISE_KEY, EVAL_LOCAL_NODE_KEY, DUMP_DIR_KEY, SHARED_DATA_KEY, SHARED_MODEL_KEY, REPLY_AFTER_KEY,
             TEST_FRACTION_KEY, TEXT_COLUMN_KEY, LABEL_COLUMN_KEY, EVAL_MIN_ROWS_KEY, EVAL_MAX_ANSWERS_KEY)


def _compact(key: str) -> str:
    return "".join(ch for ch in key.lower() if ch.isalnum())


def check_node_config(context: Context) -> None:
    """Refuse a node-config key spelled like one of ours but not as ours (``max_epsilon``, ``MaxEpsilon``,
    ``"max-epsilon "``): Flower passes it on as written and a lookup of ``max-epsilon`` would not see it, so a
    typo would silently drop the node's own privacy limit (a reviewer's ``max_epsilon=1.0`` trained to epsilon
    6.07), or its ledger directory, or its own data. Other keys are left alone: a SuperNode's node config serves
    every app it runs."""
    ours = {_compact(k): k for k in NODE_KEYS}
    for key in context.node_config:
        want = ours.get(_compact(str(key)))
        if want is not None and key != want:
            raise NodeConfigError(f"node config {key!r}: did you mean {want!r}? (node-config keys are spelled "
                                  f"{', '.join(NODE_KEYS)}; this one would be ignored)")


def node_partition(context: Context, cfg: FederatedConfig) -> int:
    """This node's client index from ``--node-config "partition-id=K num-partitions=N"``.

    Raises:
        ValueError: a missing or out-of-range ``partition-id``, or ``num-partitions`` != the run config's ``clients``.
    """
    nc = context.node_config
    pid = nc.get("partition-id")
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise NodeConfigError(
            f"node config 'partition-id': expected an int in [0, {cfg.num_clients}), got {pid!r}; start the "
            "SuperNode with --node-config \"partition-id=K num-partitions=N\""
        )
    parts = nc.get("num-partitions", cfg.num_clients)
    if parts != cfg.num_clients:
        raise NodeConfigError(
            f"node config 'num-partitions': expected the run config's clients={cfg.num_clients}, got {parts!r}"
        )
    if not 0 <= pid < cfg.num_clients:
        raise NodeConfigError(f"node config 'partition-id': expected an int in [0, {cfg.num_clients}), got {pid}")
    return pid


def node_data_path(context: Context) -> str | None:
    """This silo's own data file from ``--node-config "... data-path=PATH"``, or None (a partition of ``data``)."""
    path = context.node_config.get(DATA_PATH_KEY)
    if path is None or path == "":
        return None
    if not isinstance(path, str):
        raise NodeConfigError(f"node config '{DATA_PATH_KEY}': expected a file path string, got {path!r}")
    return path


def _same_data(a: str, b: str) -> bool:
    """Whether two ``data`` values name the same dataset: the same file, or the same hub name."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() or pb.exists():
        return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
    return a == b


def _check_pinned(context: Context, what: str, named: str | None, key: str, otherwise: str) -> None:
    """The run config's ``what`` (``data``, ``model``), ``named`` by whoever submits the run, is read only where
    the node config's ``key`` names the same (``_same_data``: the same file, or the same hub name); None (the
    packaged default) needs no pin.

    Partition mode reads the run's ``data``: any file the node can read would do, and each evaluation's exact
    accuracy on a crafted head is a counting query on it (a reviewer read a private file elsewhere on the node's
    disk that way). The run's ``model`` likewise: a reviewer had a node load a private model directory from its
    disk (any model of the same architecture passes the fingerprint) and read it through exact scores."""
    if named is None:
        return
    pinned = context.node_config.get(key)
    if pinned is None or pinned == "":
        raise NodeConfigError(
            f"run config '{what}' names {named!r}, and this node's config does not agree to read it: a node reads "
            f"a {what} the run names only where its node config pins the same ({key}='...'){otherwise}"
        )
    if not isinstance(pinned, str):
        raise NodeConfigError(f"node config '{key}': expected a path or hub name, got {pinned!r}")
    if not _same_data(pinned, named):
        raise NodeConfigError(f"run config '{what}' names {named!r}, not the node config's {key}={pinned!r}: refused")


def _node_test_fraction(context: Context) -> float:
    """A data-path silo's held-out share of its own file: the node config's ``test-fraction`` (default 0.2), never
    the run config's. With the run's fraction and seed the server chose how many of the silo's rows, and which,
    are scored outside the DP guarantee under ``eval-local`` (a reviewer moved 18 of 48 DP-trained rows into the
    exactly scored set across three runs, and shrank that set to 2 rows)."""
    v = context.node_config.get(TEST_FRACTION_KEY)
    if v is None or v == "":
        return 0.2
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
        raise NodeConfigError(f"node config '{TEST_FRACTION_KEY}': expected a number in (0, 1), got {v!r}")
    return float(v)


def _node_column(context: Context, key: str) -> str | None:
    """A data-path silo's column name from the node config (``text-column``, ``label-column``), or None (guessed
    from common names). The run config's columns name the run's ``data`` only: a server naming a silo's columns
    chose which of its file's columns are trained on and, under ``eval-local``, exactly scored."""
    v = context.node_config.get(key)
    if v is None or v == "":
        return None
    if not isinstance(v, str) or not v.strip():
        raise NodeConfigError(f"node config '{key}': expected a column name of the node's data-path file, got {v!r}")
    return v


def _silo_split(cfg: FederatedConfig) -> tuple[TextClassificationData, TextClassificationData]:
    """A data-path silo's ``(train, test)``: its file's rows (class ids in the run's ``labels`` order, as its
    head needs) split by ``train_test_split`` at the node's ``test_fraction`` and ``SILO_SPLIT_SEED``, on the
    rows in a canonical order (by text, then class name) with the classes present in name order. The run config
    reaches the split only through the file it names: reordering ``labels`` or adding classes the file lacks
    moved a reviewer's held-out rows (19 of 50 scored over four runs) before the rows and classes were put in a
    canonical order."""
    train, test = load_text_classification(
        cfg.data, text_column=cfg.text_column, label_column=cfg.label_column, test_fraction=cfg.test_fraction,
        seed=SILO_SPLIT_SEED, label_names=list(cfg.labels),
    )
    names = train.label_names
    rows = sorted(((t, names[y]) for part in (train, test) for t, y in zip(part.texts, part.labels)),
                  key=lambda r: (same_text_key(r[0]), r[0], r[1]))
    present = sorted({name for _, name in rows})
    canon = TextClassificationData([t for t, _ in rows], [present.index(n) for _, n in rows], present, train.source)
    sides = train_test_split(canon, cfg.test_fraction, SILO_SPLIT_SEED)
    return tuple(TextClassificationData(s.texts, [names.index(present[y]) for y in s.labels], names, s.source)
                 for s in sides)


def load_node(context: Context) -> tuple[FederatedConfig, Federation, int, int]:
    """``(config, federation, node's client id, its index in federation.clients)``, built once per process
    (no noise calibrated). With a node ``data-path`` the federation holds this silo's client alone.

    Raises:
        ValueError: a bad ``partition-id``/``num-partitions``/``data-path``, or ``data-path`` without the run
            config's ``labels``.
    """
    check_node_config(context)
    try:
        run_cfg = federated_config(context.run_config)
    except ValueError as e:  # the run config's own errors: settings, no data of the node
        raise NodeConfigError(str(e)) from None
    cfg = dataclasses.replace(run_cfg, secure_noise=True)
    pid = node_partition(context, cfg)
    local = node_data_path(context)
    if local is not None:
        if cfg.labels is None:
            raise NodeConfigError(
                f"run config 'labels': name the classes in id order (e.g. labels = \"ham,spam\") when nodes train "
                f"on their own '{DATA_PATH_KEY}': every silo's classifier head must have the same classes"
            )
        # this silo's examples only: one client holding every training row of the file, split by the node's own
        # fraction and a fixed seed (the run's would let the server size and move the held-out rows)
        # its own file's columns, as its node config names them (the run's name the run's data)
        cfg = dataclasses.replace(cfg, data=local, num_clients=1, min_clients=1, partition="iid",
                                  test_fraction=_node_test_fraction(context),
                                  text_column=_node_column(context, TEXT_COLUMN_KEY),
                                  label_column=_node_column(context, LABEL_COLUMN_KEY))
    else:
        _check_pinned(context, "data", cfg.data, SHARED_DATA_KEY,
                      f", or trains on its own file ({DATA_PATH_KEY}='...')")
    _check_pinned(context, "model", cfg.model, SHARED_MODEL_KEY, " (none is needed for the packaged default model)")
    key = json.dumps(cfg.to_dict(), sort_keys=True)
    if key not in _FEDERATIONS:
        _FEDERATIONS.clear()
        fed = node.build(cfg, _silo_split(cfg) if local is not None else None)
        if local is not None:
            fed.clients[0].client_id = pid
        _FEDERATIONS[key] = fed
    return cfg, _FEDERATIONS[key], pid, 0 if local is not None else pid


def _restore(
    fed: Federation, pid: int, state: RecordDict, ledger: Path | None = None, use_state: bool = True
) -> Client:
    """The node's client with its noise multiplier, accountant and RNG states from earlier rounds of the run.

    On its first round (or after a restart) its generators are seeded from the OS (under secure noise, every
    Flower run's, it has only the sampler's: the noise comes from the OS's secure generator) and the noise
    multiplier is calibrated, or, given the node's privacy ``ledger`` file (a restarted SuperNode; ``train``
    passes it only where it exists), taken from it with the accountant: one that does not load is a ``NodeError``.
    ``use_state=False``: the saved state is behind the ledger (``train``) and is not read at all.
    """
    client = fed.clients[pid]
    if use_state and STATE_KEY in state.config_records:
        saved = json.loads(state.config_records[STATE_KEY]["state"])
        node.calibrate(fed, pid, saved["noise_multiplier"])
        client.load_state_dict(saved["client"])
        client.load_tensor_state(records.to_tensors(state.array_records[RNG_KEY]))
    else:
        if ledger is not None:  # a restarted SuperNode: its own disk has the count
            _load_ledger(ledger, fed, pid, client)
        else:
            node.calibrate(fed, pid)
            client.load_state_dict({"accountant": Accountant().state_dict()})  # a cached process may hold an old one
        seed_from_os(client.sample_generator)
        if client.noise_generator is not None:  # (none under secure noise, every Flower run's)
            seed_from_os(client.noise_generator)
    return client


def _persist(client: Client, state: RecordDict) -> None:
    state[STATE_KEY] = ConfigRecord(
        {"state": json.dumps({"client": client.state_dict(), "noise_multiplier": client.noise_multiplier})}
    )
    state[RNG_KEY] = records.to_array_record(client.tensor_state())


def _check_budget(client: Client, cfg: FederatedConfig, pid: int) -> None:
    """Refuse a round that would take the node's DP-SGD steps past the rounds x local-steps its noise and
    epsilon were planned for (a faulty or hostile server asking for more), or, with an ``epsilon`` target,
    one that would spend more than it: the noise was calibrated for the sample rate of the node's data when
    it was first read, and a silo's file that shrank since raises the rate (q = batch / examples) of every
    step to come."""
    planned = cfg.rounds * cfg.local_steps
    if client.accountant.steps + cfg.local_steps > planned:
        raise NodeError(
            f"node {pid}: another round would take its DP-SGD steps from {client.accountant.steps} to "
            f"{client.accountant.steps + cfg.local_steps}, past the {planned} (rounds x local-steps) its noise and "
            "epsilon were planned for: refused"
        )
    if cfg.epsilon is None:
        return  # a fixed noise multiplier: no target to hold (the reply reports the epsilon spent)
    after = Accountant.from_state_dict(client.accountant.state_dict())
    after.step(noise_multiplier=client.noise_multiplier, sample_rate=client.sample_rate, num_steps=cfg.local_steps)
    spent = after.epsilon(cfg.delta)
    if spent > cfg.epsilon:
        earlier = sorted({f"{h[0]:.4g}" for h in client.accountant.history})
        raise NodeError(
            f"node {pid}: another round at sample rate {client.sample_rate:.4g} ({client.num_examples} examples now) "
            f"would spend epsilon {spent:.4g}, past the run's target {cfg.epsilon} its noise multiplier "
            f"{client.noise_multiplier:.4g} was calibrated for"
            + (f" (its {client.accountant.steps} earlier steps counted at noise multiplier {', '.join(earlier)})"
               if earlier else "") + ": refused"
        )


def _node_number(context: Context, key: str) -> float | None:
    """A positive finite number from the node config, or None where it is not set (blank counts as not set)."""
    v = context.node_config.get(key)
    if v is None or v == "":
        return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    if not ok:
        raise NodeConfigError(f"node config '{key}': expected a finite number > 0, got {v!r}")
    return float(v)


def _node_flag(context: Context, key: str) -> bool:
    v = context.node_config.get(key, False)
    if not isinstance(v, bool):
        raise NodeConfigError(f"node config '{key}': expected true or false, got {v!r}")
    return v


def _check_node_limits(context: Context, client: Client, cfg: FederatedConfig, pid: int) -> None:
    """Refuse a run whose privacy the node did not agree to. The run config (noise multiplier or epsilon,
    delta, rounds) comes from whoever submitted the run: by default a node refuses to train without noise
    (``allow-no-noise``): a noise multiplier of 0, or one so small that the planned epsilon is infinite or above
    ``MAX_TARGET_EPSILON`` (1000: sigma 1e-12 gave 1e24, no privacy either) unless the node's own ``max-epsilon``
    allows that much; and a delta of 1/n or more for its n examples (such a delta allows publishing a whole
    record) unless its ``max-delta`` allows it. With ``max-epsilon`` / ``max-delta`` it refuses a run planned to
    spend more (the planned epsilon: its noise multiplier at its sample rate over rounds x local-steps, at the
    run's delta)."""
    # the steps spent (at the sample rates they had) and the rest of the run at today's
    plan = Accountant.from_state_dict(client.accountant.state_dict())
    rest = max(0, cfg.rounds * cfg.local_steps - plan.steps)
    plan.step(noise_multiplier=client.noise_multiplier, sample_rate=client.sample_rate, num_steps=rest)
    planned = plan.epsilon(cfg.delta)
    max_eps = _node_number(context, MAX_EPSILON_KEY)
    no_noise = not math.isfinite(planned) or (planned > MAX_TARGET_EPSILON and (max_eps is None or planned > max_eps))
    if no_noise and not _node_flag(context, ALLOW_NO_NOISE_KEY):
        limit = max(MAX_TARGET_EPSILON, max_eps or 0.0)
        raise NodeError(
            f"node {pid}: the run asks for DP-SGD without noise (noise multiplier {client.noise_multiplier:.4g}: "
            f"planned epsilon {planned:.4g}, above {limit:g}: no privacy for this silo's data): refused; "
            f"start the SuperNode with node config {ALLOW_NO_NOISE_KEY}=true to allow it"
        )
    max_delta = _node_number(context, MAX_DELTA_KEY)
    if max_delta is not None and cfg.delta > max_delta:
        raise NodeError(f"node {pid}: the run's delta {cfg.delta:g} exceeds this node's {MAX_DELTA_KEY}={max_delta:g}: "
                        "refused")
    if max_delta is None and cfg.delta >= 1.0 / client.num_examples:
        raise NodeError(
            f"node {pid}: the run's delta {cfg.delta:g} is at least 1/n for this node's {client.num_examples} examples "
            f"(a mechanism may then publish a whole record and still be (epsilon, delta)-DP): refused; start the "
            f"SuperNode with node config {MAX_DELTA_KEY} set to allow it"
        )
    if max_eps is not None:
        if planned > max_eps:
            raise NodeError(
                f"node {pid}: the run is planned to spend epsilon {planned:.4g} at delta {cfg.delta:g} (noise "
                f"multiplier {client.noise_multiplier:.4g}, sample rate {client.sample_rate:.4g}, {plan.steps} "
                f"steps with the {plan.steps - rest} already spent), past this node's {MAX_EPSILON_KEY}={max_eps:g}: "
                "refused"
            )


def _absolute_dir(value: str, source: str) -> Path:
    """``value`` (stripped, not blank) as a ledger directory: ``~`` expanded, and absolute, else a NodeConfigError.
    The message names the setting, not the value (which stays in the node's log)."""
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # "~" or "~user" with no such home directory
        log.error("fedlora_fast node: %s=%r: '~' cannot be expanded", source, value)
        raise NodeConfigError(f"{source}: its '~' cannot be expanded on the node (no such home directory): give an "
                              "absolute directory path") from None
    if not path.is_absolute():
        log.error("fedlora_fast node: %s=%r is a relative path", source, value)
        raise NodeConfigError(
            f"{source}: expected an absolute directory path (or '{LEDGER_OFF}'), got a relative one: it would resolve "
            "against the node's working directory, which may differ after a restart, and the restarted node would "
            "miss its privacy ledger"
        )
    return path


def default_privacy_dir() -> Path | None:
    """Where a node keeps its privacy ledger when its config names no ``privacy-dir``: ``$FEDLORA_FAST_PRIVACY_DIR``
    if set (an absolute path after ``~`` expansion; blank counts as unset; ``none``, in any case, means no ledger:
    None), else ``$XDG_STATE_HOME/fedlora_fast/privacy`` (an absolute ``XDG_STATE_HOME`` only, as the XDG spec
    says), else ``~/.local/state/fedlora_fast/privacy``.

    Raises:
        NodeConfigError: ``$FEDLORA_FAST_PRIVACY_DIR`` is a relative path (it would resolve against the working
            directory, which may differ after a restart), or its ``~`` cannot be expanded.
        RuntimeError: no home directory can be determined (and neither variable is set).
    """
    env = os.environ.get(PRIVACY_DIR_ENV, "").strip()
    if env.lower() == LEDGER_OFF:
        return None
    if env:
        return _absolute_dir(env, f"${PRIVACY_DIR_ENV}")
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "state"
    return base / "fedlora_fast" / "privacy"


def _unwritable(d: Path) -> str | None:
    """Why the ledger (or a dump-dir's update) cannot be written in ``d`` (created with mode 0o700 where missing),
    or None: a file is created and removed there, as an atomic write (a temporary file renamed) will need. The reason
    names the error, never the path (it may reach the server in a ``NodeError``)."""
    return unwritable(d, mode=0o700)


def _no_ledger_limits() -> str:
    return ("the node keeps its count in a volatile ledger under the system's temporary directory, which a reboot "
            "(or a temporary directory cleaned, or another one) loses: a SuperNode restarted after that counts the "
            "rounds the server says came before at its data's current sample rate, or the larger one implied by the "
            "server's record of its first accepted example count: if this node's data grew since and the server has "
            "no such record, earlier rounds are undercounted")


def _ledger_name(context: Context, pid: int) -> str:
    return f"fedlora_fast-privacy-run{context.run_id}-node{pid}.json"


def ledger_path(context: Context, pid: int) -> Path | None:
    """The node's privacy ledger for this run, ``DIR/fedlora_fast-privacy-run<RUN_ID>-node<K>.json``, or None.

    ``context.state`` lives in the SuperNode's memory: a restart loses it, and without a ledger the node can
    only count the rounds the *server* says came before (``_count_earlier_rounds``), at its data's sample rate
    *now* or the larger one the server's record of its first accepted example count implies. With one, the
    node's own disk says how many DP-SGD steps (and at which noise and sample rate) its data already took in
    this run; it is written atomically (mode 0o600) after every round's training, before the reply leaves the
    node. It holds the accountant's history (noise multiplier, sample rate, steps) and the noise multiplier:
    no example of the node's data. ``DIR`` must persist across restarts (a volume in a container): a restart
    that finds no ledger there counts as a node without one, and warns.

    ``DIR`` is, in this order (each value stripped; blank, ``""`` included, means "not set"; a path must be
    absolute after ``~`` expansion, since a relative one would resolve against a working directory that may
    differ after a restart):

    - the node config's ``privacy-dir=DIR``: created (mode 0o700) where missing; not writable is an error;
    - ``$FEDLORA_FAST_PRIVACY_DIR``: the same (it too is the user's explicit choice);
    - the per-user default (``default_privacy_dir``): where it cannot be created or written (a read-only
      container file system, no home directory), the node trains without a ledger, as before ledgers were on
      by default, and warns (RuntimeWarning) naming the directory and ``privacy-dir``.

    ``privacy-dir=none`` (any case), or ``$FEDLORA_FAST_PRIVACY_DIR=none`` where the node config names no
    directory, turns the persistent ledger off (None, with a RuntimeWarning each round): for nodes whose restarts
    cannot happen or are accounted for elsewhere. ``train`` then keeps a volatile ledger (``_volatile_ledger``)
    under the system's temporary directory, as it does where the default directory is unusable (and refuses to
    train where that is unusable too): a node restarted after a reboot has lost it, and counts as
    ``_count_earlier_rounds`` can.

    The errors below reach the server: they name the setting and the ledger's file name, never the node's
    directory (its path, e.g. a home directory, would tell the server the user's name); the node's log has it.

    Raises:
        NodeConfigError: ``privacy-dir`` is not a string, or it or ``$FEDLORA_FAST_PRIVACY_DIR`` is a relative path.
        NodeError: an explicit directory (node config or environment) cannot be created or written; or the
            default directory is unusable but already holds this run's ledger (a record the node could no longer
            update: refused rather than ignored; copy it to a writable ``privacy-dir``).
    """
    name = _ledger_name(context, pid)
    d = context.node_config.get(LEDGER_DIR_KEY)
    if d is not None and not isinstance(d, str):
        raise NodeConfigError(
            f"node config '{LEDGER_DIR_KEY}': expected a directory path string (or '{LEDGER_OFF}'), "
            f"got {type(d).__name__}"
        )
    d = (d or "").strip()  # blank: not set (the default below)
    env = os.environ.get(PRIVACY_DIR_ENV, "").strip()
    off = (f"node config {LEDGER_DIR_KEY}={LEDGER_OFF}" if d.lower() == LEDGER_OFF
           else f"${PRIVACY_DIR_ENV}={LEDGER_OFF}" if not d and env.lower() == LEDGER_OFF else None)
    if off is not None:
        warnings.warn(f"node {pid}: {off}: no privacy ledger; {_no_ledger_limits()}", RuntimeWarning, stacklevel=3)
        return None
    # the user's own choice: not writable is an error
    explicit = f"node config '{LEDGER_DIR_KEY}'" if d else f"${PRIVACY_DIR_ENV}" if env else None
    try:
        path = _absolute_dir(d, explicit) if d else default_privacy_dir()
    except NodeError:
        raise  # a relative path named by the user
    except RuntimeError as e:  # Path.home(): no home directory to put the default under
        path, why = None, f"{type(e).__name__}: {e}"
    else:
        why = _unwritable(path)
    if why is None:
        return path / name
    if explicit is not None:
        log.error("fedlora_fast node: %s: privacy ledger directory %s is not writable (%s)", explicit, path, why)
        raise NodeError(f"{explicit}: the node's privacy ledger directory is not writable ({why}); refusing to train "
                        "without the ledger asked for (the node's log names the directory)")
    try:
        exists = path is not None and (path / name).exists()
    except OSError:
        exists = True  # cannot tell: a ledger may be there
    if exists:
        log.error("fedlora_fast node: privacy ledger %s exists but its directory is not writable (%s): copy it into "
                  "a writable directory and set node config '%s' to that directory", path / name, why, LEDGER_DIR_KEY)
        raise NodeError(
            f"privacy ledger {name} exists in the node's default privacy ledger directory, which is not writable "
            f"({why}); refusing to train without updating it: copy {name} into a writable directory and set node "
            f"config '{LEDGER_DIR_KEY}' (or ${PRIVACY_DIR_ENV}) to that directory (the node's log names the default "
            "one)"
        )
    warnings.warn(
        f"node {pid}: the default privacy ledger directory {path if path is not None else '(none: no home directory)'} "
        f"is not writable ({why}): training without a privacy ledger; {_no_ledger_limits()}. Set node config "
        f"'{LEDGER_DIR_KEY}=DIR' (or ${PRIVACY_DIR_ENV}) to a writable directory",
        RuntimeWarning, stacklevel=3,
    )
    return None


def _unloadable_ledger(path: Path, e: Exception) -> NodeError:
    """A ledger that does not load must not mean "no steps": logged with its directory (the node's log), and the
    error the server sees names the file only."""
    log.error("fedlora_fast node: privacy ledger %s does not load (%s: %s)", path, type(e).__name__, e)
    return NodeError(f"privacy ledger {path.name} does not load ({type(e).__name__}); refusing to train without "
                     "it (the node's log names its directory)")


def _read_ledger(path: Path) -> tuple[dict, Accountant]:
    """The ledger's JSON and its accountant; one that does not load is a ``NodeError`` (never "no steps")."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        return saved, Accountant.from_state_dict(saved["accountant"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _unloadable_ledger(path, e) from None


def _load_ledger(path: Path, fed: Federation, k: int, client: Client) -> None:
    """Take the node's accountant and noise multiplier from its ledger (a restarted SuperNode)."""
    saved, accountant = _read_ledger(path)
    try:
        node.calibrate(fed, k, saved["noise_multiplier"])
    except (ValueError, KeyError, TypeError) as e:
        raise _unloadable_ledger(path, e) from None
    client.accountant = accountant


def _state_steps(state: RecordDict) -> int:
    """The DP-SGD steps the node's saved ``context.state`` counts (0 where it holds none)."""
    if STATE_KEY not in state.config_records:
        return 0
    saved = json.loads(state.config_records[STATE_KEY]["state"])
    return Accountant.from_state_dict(saved["client"]["accountant"]).steps


_NO_LOCK_WARNED: list[bool] = []


# One message at a time in a process: the handlers share ``_FEDERATIONS``' model and clients (a Flower simulation
# may run several messages in one process's threads; a reviewer's two threads for one node corrupted each other).
_MESSAGE_LOCK = threading.Lock()


def _volatile_ledger(context: Context, pid: int) -> Path | None:
    """Where ``ledger_path`` gives none (``privacy-dir=none``, an unusable default directory), still a privacy
    ledger for the run and node, with its lock: the same file name, in a per-user directory under the system's
    temporary directory (created mode 0o700; one that is not a directory owned by this user and closed to others
    is not used). A deployment starts a ClientApp process per message, and this one counts what the node released
    across them and across a SuperNode restart, until a reboot (or a cleaner) clears it: one mechanism for both
    cases, read and written like the persistent one. Without it, a reviewer's two processes under privacy-dir=none
    both trained and both reported one round's epsilon (3.853 for 4.530 spent); a duplicate message, whose state
    is a snapshot from before a round already answered, is now counted from the ledger as a lost save is.
    None where no such directory is usable (logged: the caller refuses, ``_no_ledger_at_all``)."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    if uid is None:  # pragma: no cover (Windows: no flock either)
        log.error("fedlora_fast node %s: no privacy ledger, and no volatile one on this platform (no user id for a "
                  "per-user directory): set node config '%s' to a writable directory", pid, LEDGER_DIR_KEY)
        return None
    d = Path(tempfile.gettempdir()) / f"fedlora_fast-{uid}"
    try:
        d.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(d)
        why = (None if stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o077
               else "not a directory of this user's closed to others")
    except OSError as e:
        why = f"{type(e).__name__}: {e.strerror or e}"
    if why is not None:  # (another local user may have taken the name in a shared /tmp: said, not silent)
        log.error("fedlora_fast node %s: no privacy ledger, and %s cannot hold a volatile one (%s)", pid, d, why)
        return None
    return d / _ledger_name(context, pid)


def _node_ledger(context: Context, pid: int, refusing: str) -> tuple[Path, bool]:
    """``(ledger, volatile)``: the node's privacy ledger for this run (``ledger_path``), else its volatile one
    (``_volatile_ledger``, ``volatile`` True); with neither, ``refusing`` is refused (``_no_ledger_at_all``)."""
    ledger = ledger_path(context, pid)
    if ledger is not None:
        return ledger, False
    ledger = _volatile_ledger(context, pid)
    if ledger is None:
        raise _no_ledger_at_all(pid, refusing)
    return ledger, True


def _no_ledger_at_all(pid: int, refusing: str) -> NodeError:
    """No persistent ledger and no volatile one: what ``refusing`` would spend would be counted on no disk (a
    duplicate message in another process, or a restart, would spend it again unseen): refused. The error names
    the setting, never the node's directories (its log has them)."""
    return NodeError(f"node {pid}: no privacy ledger (privacy-dir={LEDGER_OFF}, or its default directory not "
                     "writable) and the system's temporary directory cannot hold a volatile one (the node's log says "
                     f"why): refusing {refusing} with its count on no disk; set node config '{LEDGER_DIR_KEY}' to a "
                     "writable directory")


@contextlib.contextmanager
def _ledger_lock(path: Path, refusing: str = "to train this round"):
    """Hold the ledger's lock file (``<ledger>.lock``, ``io.exclusive_lock``) for a whole round's training: from
    reading the ledger to writing it, so that two processes for one silo (two SuperNodes, or two train calls in
    one process) cannot both read N steps and both write N + k. Taken without waiting: held elsewhere, the round
    is refused (``NodeError``), the conservative answer, since the other holder is spending the same data's
    budget. A killed node leaves no stale lock. Local disks only (``flock``). Without ``fcntl`` (Windows) the
    round is not locked, with one RuntimeWarning per process. ``refusing``: what the error says is refused (the
    evaluate handler holds it too, to count its exact answers)."""
    lock = path.with_name(path.name + ".lock")
    stack = contextlib.ExitStack()
    try:  # (only taking the lock is translated here: the round's own errors pass as they are)
        held = stack.enter_context(exclusive_lock(lock))
    except LockedError:
        raise NodeError(
            f"privacy ledger {path.name} is locked by another process training this node's data (two SuperNodes "
            f"for one silo?); refusing {refusing}"
        ) from None
    except OSError as e:
        log.error("fedlora_fast node: privacy ledger lock %s cannot be opened (%s)", lock, e)
        raise NodeError(f"privacy ledger lock {lock.name} cannot be opened ({type(e).__name__}); refusing {refusing} "
                        "without it (the node's log names its directory)") from None
    with stack:
        if not held and not _NO_LOCK_WARNED:  # pragma: no cover (Windows)
            _NO_LOCK_WARNED.append(True)
            warnings.warn("fedlora_fast node: no fcntl on this platform: the privacy ledger is not locked; run "
                          "one SuperNode per silo", RuntimeWarning, stacklevel=3)
        yield


def _write_ledger(path: Path, client: Client, round_idx: int | None = None) -> None:
    """Write the node's steps before its update leaves, with the round (``round_idx``, the server's 0-based index)
    it has just trained added to the ledger's ``trained_rounds``: the rounds this node's data really trained, which
    the accountant's steps cannot tell (they also count earlier rounds a restarted node cannot rule out). The
    ledger never goes down: a file that already counts more steps than this process (another process writing it
    for the same node) stops the release."""
    trained: set[int] = set()
    if path.exists():
        saved, before = _read_ledger(path)
        if before.steps > client.accountant.steps:
            raise NodeError(
                f"privacy ledger {path.name} counts {before.steps} DP-SGD steps, this node's state "
                f"{client.accountant.steps}: another process writes it (two SuperNodes for one silo?); refusing to "
                "release the update"
            )
        trained = _trained_rounds(path, saved)
    if round_idx is not None:
        trained.add(round_idx)
    checkpoint.atomic_write_text(path, json.dumps({  # 0o600 whatever the umask: the node's own record
        "accountant": client.state_dict()["accountant"], "noise_multiplier": client.noise_multiplier,
        "trained_rounds": sorted(trained)}), mode=0o600)


def _trained_rounds(path: Path, saved: dict) -> set[int]:
    """The ledger's ``trained_rounds`` (none in a ledger written before 2026-11-29); malformed: a ``NodeError``."""
    rounds = saved.get("trained_rounds", [])
    if not isinstance(rounds, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in rounds):
        raise _unloadable_ledger(path, ValueError("trained_rounds: not a list of round indices"))
    return set(rounds)


def _hinted_sample_rate(client: Client, pid: int, hint) -> float | None:
    """The sample rate the node's data had at the server's record of its first accepted example count
    (``hint``, the train config's ``FIRST_EXAMPLES_KEY``), by the client's own formula q = min(1, batch / n); None
    without a hint. A malformed hint (not a positive int) is ignored with a RuntimeWarning, never an error: a
    faulty server must not stop the node, and ignoring it is what a node without a hint does."""
    if hint is None:
        return None
    if not isinstance(hint, int) or isinstance(hint, bool) or hint <= 0:
        _ignore_hint(pid, FIRST_EXAMPLES_KEY, hint, "a positive int (the server's record of this node's first "
                     "accepted example count)")
        return None
    return check_sample_rate(min(1.0, client.batch_size / hint))


def _hinted_noise(pid: int, hint) -> float | None:
    """The server's record of the smallest noise multiplier this node's client id reported with an accepted
    update (``hint``, the train config's ``MIN_NOISE_KEY``); None without one. A malformed hint (not a finite
    number >= 0) is ignored with a RuntimeWarning, as ``_hinted_sample_rate`` ignores its own."""
    if hint is None:
        return None
    if isinstance(hint, bool) or not isinstance(hint, (int, float)) or not math.isfinite(hint) or hint < 0:
        _ignore_hint(pid, MIN_NOISE_KEY, hint, "a finite number >= 0 (the smallest noise multiplier this node "
                     "reported with an accepted update)")
        return None
    return float(hint)


def _ignore_hint(pid: int, key: str, hint, expected: str) -> None:
    """Warn that the train config's ``key`` = ``hint`` is malformed and ignored (``_count_earlier_rounds``'s hints)."""
    warnings.warn(f"node {pid}: ignoring the server's '{key}' = {short_repr(hint)}: expected {expected}; earlier "
                  "rounds are counted without it", RuntimeWarning, stacklevel=5)


def _count_earlier_rounds(
    client: Client, cfg: FederatedConfig, pid: int, round_idx: int, *, loaded: bool = False,
    looked_in: Path | None = None, first_examples=None, min_noise=None,
) -> None:
    """A node with no saved state at round ``round_idx`` > 0 either joins late or lost its state (a SuperNode
    restart clears ``context.state``). Its data may have trained in every earlier round, so its accountant
    counts them all as its own: a restarted node must not report a fresh epsilon (and get a fresh budget)
    while the steps it took before still count. Over-counting for a node that really joined late is safe.

    The steps are counted at the largest sample rate the node knows its data had in this run: its rate now,
    or a larger one in the history of the ledger it ``loaded``. With this run's ledger file loaded, the rounds
    it lacks are rounds the node did not train (its ledger is written before every reply): over-counted, safe.
    Without it, nothing on the node bounds its *past* sample rate and noise: a silo file that grew since
    (smaller q now) had a larger q in the rounds counted here; with an ``epsilon`` target, one that shrank since
    (larger q now, so a larger noise multiplier calibrated now) had a smaller noise multiplier then. Either way
    they are undercounted. That is so with no ledger (``privacy-dir=none``, an unwritable default directory,
    after the volatile ledger those keep was lost)
    and with a ledger directory where this run's file was not found (``looked_in``: a directory moved or
    another ``HOME`` since the last start, a container layer that did not persist, a node upgraded mid-run; or
    a node that really joins late). The warning says so and,
    in the second case, where the node looked (warnings stay on the node; the server sees none of this).

    Without a loaded ledger the server's record helps: ``first_examples`` (the train config's
    ``FIRST_EXAMPLES_KEY``) is the example count of this node's client id's first accepted update, fixed for
    the run (the server refuses later updates with another count), and the rounds are counted at no less than
    the rate it implies, ``min(1, batch / first_examples)``, and, with an ``epsilon`` target, at no more than the
    noise multiplier calibrated at that rate (what its first rounds ran with). The hint can only raise the
    count, never lower it below what the node computes alone: the rate used is ``max(rate now, ledger history,
    hinted rate)``, the noise multiplier ``min(now, calibrated at the hinted rate)``. A
    hostile or faulty server can send a smaller count (a larger q: more steps' worth of epsilon counted, more
    conservative, at worst a node that refuses to train, which such a server can cause anyway) or a larger
    one (a smaller q: ``max`` ignores it for the rate; with an ``epsilon`` target it lowers the noise multiplier
    counted, so more epsilon, never less: a wrong one can make the node refuse its remaining rounds); a
    malformed one is ignored with a warning (``_hinted_sample_rate``). ``min_noise`` (``MIN_NOISE_KEY``), the
    smallest noise multiplier the node's id reported with an accepted update, bounds the noise counted too
    (``min`` with the rest): it covers the rounds of an earlier process of this node with a smaller sigma still
    (one that had loaded a ledger from a process with more data). A smaller one from a faulty server only
    counts more.
    Rounds whose update the server refused (another count: data that changed mid-run) are not bounded by it.
    With a loaded ledger the hint is not used: the ledger's own history is the node's record."""
    steps = round_idx * cfg.local_steps - client.accountant.steps  # beyond what a ledger already holds
    if steps <= 0 or client.noise_multiplier == 0:  # no noise: epsilon is inf whatever the count
        return
    known = max([client.sample_rate] + [h[1] for h in client.accountant.history])
    hinted = None if loaded else _hinted_sample_rate(client, pid, first_examples)
    q = known if hinted is None else max(known, hinted)
    sigma = client.noise_multiplier
    if hinted is not None and cfg.epsilon is not None and hinted < client.sample_rate:
        # data that shrank since its first update: the noise then was calibrated at that (smaller) rate, smaller
        try:
            sigma = min(sigma, calibrate_noise_multiplier(target_epsilon=cfg.epsilon, delta=cfg.delta,
                                                          sample_rate=hinted, steps=cfg.rounds * cfg.local_steps))
        except ValueError:  # (a smaller rate always meets a target the larger one meets: not expected)
            pass
    reported = None if loaded else _hinted_noise(pid, min_noise)
    if reported is not None:
        sigma = min(sigma, reported)
    if loaded:
        limits = ""
    elif hinted is not None and hinted > known:
        limits = (
            f" (the rate at {first_examples} examples, from the server's record of this node's first accepted example "
            f"count; its data has {client.num_examples} now. No privacy ledger"
            + (f" found at {looked_in}" if looked_in is not None else "")
            + ": rounds in which its data was smaller still (before its first accepted update, or whose update the "
            "server refused) are undercounted; "
            f"keep node config '{LEDGER_DIR_KEY}' on a writable directory that persists across restarts)"
        )
    elif looked_in is not None:
        limits = (
            f" (no privacy ledger found at {looked_in}: if this node trained earlier rounds of this run with its "
            f"ledger elsewhere (another '{LEDGER_DIR_KEY}', $HOME or $XDG_STATE_HOME, a container layer that did not "
            "persist) and its data changed since, earlier rounds are undercounted; keep the ledger directory on "
            "storage that persists across restarts. A node that joins the run late has no ledger yet: nothing is lost)"
        )
    else:
        limits = (
            f" (no privacy ledger: if this node's data changed since (grew: a larger sample rate then; shrank, with "
            f"an epsilon target: a smaller noise multiplier then), earlier rounds are undercounted; set node config "
            f"'{LEDGER_DIR_KEY}' to a writable directory)"
        )
    warnings.warn(
        f"node {pid}: no privacy state from earlier rounds at round {round_idx} (a restarted SuperNode, or its "
        f"first round): counting {steps} earlier DP-SGD steps as its own at sample rate {q:.4g} and noise "
        f"multiplier {sigma:.4g}{limits}",
        RuntimeWarning, stacklevel=3,
    )
    client.accountant.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)


@app.train()
@_kept_private
def train(msg: Message, context: Context) -> Message:
    """Local DP-SGD from the received global tensors; reply with the trainable tensors and privacy record.

    With the node config ``reply-after=SECONDS`` the reply (or the error) leaves no sooner than that long after
    the handler started: the training time tracks the secret Poisson batch sizes (see ``_hold_reply``)."""
    started = time.monotonic()
    hold = _node_number(context, REPLY_AFTER_KEY)
    try:
        with _MESSAGE_LOCK:  # (waits: another node's message in this process shares the model)
            cfg, fed, pid, k = load_node(context)
            ledger, volatile = _node_ledger(context, pid, "to train")
            # from reading the ledger to writing it: one process per silo's data
            with _ledger_lock(ledger):
                return _train(msg, context, cfg, fed, pid, k, ledger, volatile)
    finally:
        if hold is not None:
            _hold_reply(started, hold)


def _hold_reply(started: float, hold: float) -> None:
    """Sleep until ``hold`` seconds after ``started`` (``time.monotonic``). How long a round takes tracks its
    Poisson batch sizes, which the accountant assumes secret (a reviewer's 55 fits: correlation 0.87 between fit
    time and the examples sampled); a reply held to a fixed time tells a server that times it nothing of them.
    A round that ran past ``hold`` replies when done, with a warning in the node's log: its time then leaks."""
    late = time.monotonic() - started - hold
    if late < 0:
        time.sleep(-late)
    else:
        log.warning("fedlora_fast node: this round took %.3g s, past reply-after = %g s: its reply leaves when done "
                    "(its timing tracks the secret batch sizes); raise reply-after", hold + late, hold)


def _dump_dir(context: Context) -> Path | None:
    """The node config's ``dump-dir`` (audit: each update sent is written there), created and probed, or None
    (not set, or ""). Checked before training, as ``privacy-dir`` is: found unusable only after the round, the
    node would have counted the steps (its ledger) and released nothing.

    Raises:
        NodeConfigError: ``dump-dir`` is not a string.
        NodeError: the directory cannot be created or written (the message names the error, never the path).
    """
    dump = context.node_config.get(DUMP_DIR_KEY)  # the node's own choice: never a path the run config names
    if dump is None or dump == "":
        return None
    if not isinstance(dump, str):
        raise NodeConfigError(f"node config '{DUMP_DIR_KEY}': expected a directory path string, got {dump!r}")
    path = Path(dump)
    why = _unwritable(path)
    if why is not None:
        log.error("fedlora_fast node: node config '%s': directory %s is not writable (%s)", DUMP_DIR_KEY, path, why)
        raise NodeError(f"node config '{DUMP_DIR_KEY}': expected a writable directory, got one that is not ({why}); "
                        "refusing to train (the node's log names the directory)")
    return path


def _train(msg: Message, context: Context, cfg: FederatedConfig, fed: Federation, pid: int, k: int,
           ledger: Path, volatile: bool = False) -> Message:
    dump = _dump_dir(context)  # before any step is counted: an update that cannot be dumped is never sent
    fresh = STATE_KEY not in context.state.config_records
    on_disk = ledger.exists()
    if not fresh and on_disk and _read_ledger(ledger)[1].steps > _state_steps(context.state):
        # Flower saves context.state after the reply has left: a save lost then (a killed process, a failed
        # push) leaves a state behind the steps released. The ledger, written before every reply, has them; the
        # state's generators would replay the lost round's noise draws, so they are drawn afresh from the OS
        warnings.warn(
            f"node {pid}: its saved state counts fewer DP-SGD steps than its privacy ledger (a state save lost after "
            "a reply left): the ledger's count is taken, with fresh OS-seeded generators",
            RuntimeWarning, stacklevel=2,
        )
        fresh = True
    loaded = fresh and on_disk  # this run's ledger file is read (not just its dir)
    client = _restore(fed, k, context.state, ledger if loaded else None, use_state=not fresh)
    _check_node_limits(context, client, cfg, pid)
    _check_budget(client, cfg, pid)
    # the server's message, checked before anything is counted or trained
    if "config" not in msg.content.config_records:
        raise ServerMessageError("server message: no 'config' record")
    train_config = msg.content.config_records["config"]
    round_idx = _server_round(train_config, cfg)
    global_state = _server_tensors(msg, fed)
    if fresh:
        _count_earlier_rounds(client, cfg, pid, round_idx, loaded=loaded,
                              looked_in=None if loaded or volatile else ledger,
                              first_examples=train_config.get(FIRST_EXAMPLES_KEY),
                              min_noise=train_config.get(MIN_NOISE_KEY))
        _check_node_limits(context, client, cfg, pid)  # (again: with the earlier rounds now counted)
        _check_budget(client, cfg, pid)
    seed_dropout(cfg, round_idx, pid)  # dropout masks, as in the simulation: secret here
    update = client.fit(
        fed.model, serialization.encode(global_state, {"round": round_idx}), round_idx=round_idx,
        fingerprint=fed.fingerprint,
    )
    _write_ledger(ledger, client, round_idx)  # before the update leaves the node: the steps are spent once it has
    _persist(client, context.state)
    if dump is not None:
        # named by the node's own step count (the server's round number may repeat), never replacing a copy
        stem = dump / f"round{round_idx + 1}-client{pid}-step{client.accountant.steps}"
        atomic_write_new(stem, ".safetensors", update)
    arrays, meta = records.from_message(update)
    privacy = client.privacy_record(cfg.delta)
    metrics = MetricRecord({
        "num-examples": client.num_examples,
        **{k: privacy[k] for k in ("noise_multiplier", "sample_rate", "steps", "epsilon")},
    })
    return Message(RecordDict({"arrays": arrays, "config": meta, "metrics": metrics}), reply_to=msg)


@app.evaluate()
@_kept_private
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy and loss of the global adapter on this node's shard of the test split.

    Shard k holds test examples k, k+N, k+2N, ... of the N clients: the example-weighted mean over all
    shards is the accuracy on the whole test split, the number the simulation reports. A node with its own
    ``data-path`` scores its own held-out share of that file only if the run config says
    ``flower-eval-local = true`` *and* its own node config says ``eval-local=true``: those rows are the silo's
    private data, and their exact accuracy and loss are not covered by the DP guarantee, so the server alone
    cannot ask for them. Otherwise it replies ``num-examples`` 0 and no scores.

    Each such answer is an exact counting query on private rows, and the server chooses the adapter scored (a
    crafted head can single rows out). So the node answers for each round of the run (the round index of the
    training the evaluation follows, ``ROUND_KEY``) at most once, only a round its own data trained (the ledger's
    ``trained_rounds``, written by ``train`` before each reply), and at most ``eval-max-answers`` times per run
    (node config; default ``EVAL_MAX_ANSWERS``: ``rounds`` is the server's number), counted in
    ``<ledger>.evals.json`` beside that ledger (persistent or volatile) before scoring. Every run starts a count
    of its own, as its ledger does; a volatile ledger lost at a reboot loses it too. It answers only from at
    least ``eval-min-rows`` held-out rows (node config; default ``EVAL_MIN_ROWS``): a floor against the trivial
    case, not a privacy guarantee. A silo reads its file's columns from its own node config (``text-column``,
    ``label-column``), never the run config's: the server does not choose which column is scored.
    """
    with _MESSAGE_LOCK:  # (the model is shared with every other message this process handles)
        return _evaluate(msg, context)


def _evaluate(msg: Message, context: Context) -> Message:
    cfg, fed, pid, k = load_node(context)
    try:
        asked = flower_setting(context.run_config, EVAL_LOCAL_KEY)
    except ValueError as e:  # the run config's own error (no data of the node): the server sees it as is
        raise NodeConfigError(str(e)) from None
    own_ok = asked and _node_flag(context, EVAL_LOCAL_NODE_KEY)
    silo = node_data_path(context) is not None
    if silo and not own_ok:
        # a silo's held-out rows are its private data: exact scores on them are outside the DP guarantee
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 0})}), reply_to=msg)
    tensors = _server_tensors(msg, fed)
    if not silo:  # (a shard of the run's shared test split: the data every node and the server agreed on)
        return _scores(msg, cfg, fed, k, tensors)
    # a silo's own held-out rows: at most one exact answer per round of the run, from a set not too small
    least = _node_count(context, EVAL_MIN_ROWS_KEY, EVAL_MIN_ROWS)
    if len(fed.test_ids) < least:
        raise NodeError(f"node {pid}: its held-out rows are fewer than its {EVAL_MIN_ROWS_KEY}={least}: no exact "
                        f"scores sent (on so few rows they come close to single rows' labels); lower "
                        f"{EVAL_MIN_ROWS_KEY} or raise {TEST_FRACTION_KEY} in the node config to allow them")
    rnd = _eval_round(msg, cfg)
    ledger, _ = _node_ledger(context, pid, "to score its held-out rows")
    most = _node_count(context, EVAL_MAX_ANSWERS_KEY, EVAL_MAX_ANSWERS)
    with _ledger_lock(ledger, "to score its held-out rows"):
        answers = ledger.with_name(ledger.name[: -len(".json")] + ".evals.json")
        done = _read_answers(answers)
        if rnd in done:
            raise NodeError(f"node {pid}: it has already sent exact scores on its held-out rows for round index {rnd} "
                            "of this run: one answer per round (each is a query on private rows): refused")
        # only for a round its own data trained (in the ledger's trained rounds): the run's rounds are the server's
        # number (a reviewer's rounds=10**6 had 40 answers from a node that refused to train), and the accountant's
        # steps also count rounds a restart cannot rule out (one train message at round R - 1 unlocked R answers in
        # a re-review)
        trained = _trained_rounds(ledger, _read_ledger(ledger)[0]) if ledger.exists() else set()
        if rnd not in trained:
            raise NodeError(f"node {pid}: its data did not train round index {rnd} of this run (its privacy ledger's "
                            "trained rounds): no exact scores on its held-out rows for it; refused")
        if len(done) >= most:
            raise NodeError(f"node {pid}: it has sent exact scores on its held-out rows {len(done)} times in this run, "
                            f"its {EVAL_MAX_ANSWERS_KEY}={most}: refused (raise it in the node config to allow more)")
        # counted before scoring: whatever happens next (a failure that depends on the rows, a reply lost) is an
        # answer spent, never one more
        checkpoint.atomic_write_text(answers, json.dumps(sorted(done | {rnd})), mode=0o600)
    # (scored with the lock released: a train message for the next round need not wait for it)
    return _scores(msg, cfg, fed, k, tensors)


def _scores(msg: Message, cfg: FederatedConfig, fed: Federation, k: int, tensors: dict) -> Message:
    """The evaluate reply: accuracy and loss of the global ``tensors`` on test shard ``k`` (see ``evaluate``)."""
    load_trainable(fed.model, tensors)
    idx = range(k, len(fed.test_ids), len(fed.clients))  # a silo's own build holds one client: all of its test rows
    result = evaluate_model(
        fed.model, [fed.test_ids[i] for i in idx], [fed.test.labels[i] for i in idx], fed.pad_id,
        cfg.eval_batch_size, fed.device,
    )
    metrics = MetricRecord({"num-examples": len(idx), "accuracy": result["accuracy"], "loss": result["loss"]})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _node_count(context: Context, key: str, default: int) -> int:
    """A node-config int >= 1 (``default`` where not set or blank)."""
    v = context.node_config.get(key)
    if v is None or v == "":
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise NodeConfigError(f"node config '{key}': expected an int >= 1, got {v!r}")
    return v


def _eval_round(msg: Message, cfg: FederatedConfig) -> int:
    """The round index of the training an evaluate message follows (``ROUND_KEY``, as the train messages carry it;
    ``FedLoRAStrategy.configure_evaluate`` names it): an int in [0, rounds), else the server's error."""
    config = msg.content.config_records.get("config")
    r = None if config is None else config.get(ROUND_KEY)
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < cfg.rounds:
        raise ServerMessageError(f"server message: '{ROUND_KEY}' in its 'config' record: expected an int in "
                                 f"[0, {cfg.rounds}) (the round index of the training it follows), got {short_repr(r)}")
    return r


def _read_answers(path: Path) -> set[int]:
    """The rounds whose exact scores on the held-out rows a silo has sent in this run (beside its ledger); one
    that does not read is a ``NodeError`` (never "none sent")."""
    if not path.exists():
        return set()
    try:
        done = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(done, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in done):
            raise ValueError("not a list of rounds")
        return set(done)
    except (OSError, ValueError) as e:
        log.error("fedlora_fast node: %s does not load (%s: %s)", path, type(e).__name__, e)
        raise NodeError(f"{path.name} does not load ({type(e).__name__}); refusing to score the held-out rows without "
                        "it (the node's log names its directory)") from None

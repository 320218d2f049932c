"""The Flower ``ServerApp``: fedlora_fast's server, aggregation and outputs over a Flower federation.

Flower Message API (``flwr`` >= 1.20): ``@app.main()`` builds the same model, adapter fingerprint, server and
aggregator as the simulation (``fedlora_fast.federated.simulation.Federation`` over the same run config),
then runs ``FedLoRAStrategy.start``: per round, every SuperNode trains under DP and evaluates, the strategy
validates and aggregates the updates. After every round it writes ``OUT/metrics.json`` (the simulation's
layout: config, adapter, data, one record per round, final privacy record per client) and a checkpoint;
at the end ``OUT/adapter/`` (peft format) and ``OUT/curves.png``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedlora_fast.federated import checkpoint as ckpt
from fedlora_fast.federated import serialization
from fedlora_fast.federated.simulation import (
    Federation,
    adapter_metadata,
    dump_metrics,
    export_adapter,
    final_record,
    format_round,
    held_run_outputs,
    noise_source,
    plot_curves,
    remove_run_outputs,
    run_lock,
)
from fedlora_fast.federated.state import load_trainable
from fedlora_fast.flower import node, records
from fedlora_fast.flower.config import (
    DUMP_KEY,
    EVAL_LOCAL_KEY,
    OUT_KEY,
    OVERWRITE_KEY,
    SERVER_DATA_KEY,
    TIMEOUT_KEY,
    federated_config,
    flower_setting,
)
from fedlora_fast.flower.strategy import FedLoRAStrategy
from fedlora_fast.io import atomic_write_new, unwritable

CHECKPOINT_NAME = ckpt.FLOWER_CHECKPOINT_NAME  # not the simulation's: it cannot resume a Flower run

log = logging.getLogger(__name__)
app = ServerApp()


def metrics_document(fed: Federation | node.ServerOnly, strategy: FedLoRAStrategy, extra: dict) -> dict:
    """``metrics.json`` in the simulation's layout, with the clients' privacy records as they reported them."""
    cfg = fed.config
    doc = fed.metrics()
    doc["rounds"] = strategy.rounds
    doc["final"] = None
    doc["flower"] = extra
    if strategy.rounds and strategy.rounds[-1]["round"] == cfg.rounds:
        doc["final"] = final_record(
            strategy.rounds, delta=cfg.delta, epsilon=strategy.epsilon(),
            clients=[strategy.clients[k] for k in sorted(strategy.clients)],
            server_privacy=fed.server.aggregator.privacy(cfg.delta), totals=("bytes_up", "bytes_down", "seconds"),
            # every node and the server draw their noise from the OS under Flower
            noise=noise_source(True, [c.get("noise_multiplier") for c in strategy.clients.values()],
                               getattr(fed.server.aggregator, "noise_multiplier", 0.0)),
        )  # fmt: skip
    return doc


def save_checkpoint(path: Path, fed: Federation, strategy: FedLoRAStrategy) -> None:
    """Global tensors, the aggregator's accountant and the round records, written atomically (safetensors +
    JSON, owner-only). No noise generator state: a ServerApp always runs in secure mode, where the central-DP
    noise comes from the OS's secure generator at every draw (``os_normal``), with no state to save."""
    tensors = {f"global/{k}": v for k, v in fed.server.global_state.items()}
    state = {
        "flower": True,
        "config": fed.config.to_dict(),
        "fingerprint": fed.fingerprint,
        "round": fed.server.round,
        "records": strategy.rounds,
        "clients": strategy.clients,
        "aggregator": fed.server.aggregator.state_dict(),
    }
    ckpt.save_checkpoint(path, tensors, state)


def _writable_dir(path: Path, key: str) -> Path:
    """``path``, created where missing, after a probe file was written and removed there (``io.unwritable``); else a
    ValueError naming the run-config ``key``: a directory the ServerApp first writes after round 1 must fail before
    nodes train."""
    why = unwritable(path)
    if why is not None:
        raise ValueError(f"run config {key!r}: expected a writable directory, got {str(path)!r} ({why})")
    return path


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``rounds`` rounds of federated FFA-LoRA under DP over the connected SuperNodes."""
    cfg = dataclasses.replace(federated_config(context.run_config), secure_noise=True)
    out = Path(flower_setting(context.run_config, OUT_KEY)).expanduser()
    dump = flower_setting(context.run_config, DUMP_KEY)
    timeout = flower_setting(context.run_config, TIMEOUT_KEY)
    server_data = flower_setting(context.run_config, SERVER_DATA_KEY)
    # read by the nodes only: checked here, or a bad value fails every evaluation while the run spends its budget
    flower_setting(context.run_config, EVAL_LOCAL_KEY)
    overwrite = flower_setting(context.run_config, OVERWRITE_KEY)
    if dump:  # first written after round 1's training: a directory that cannot be written fails now, not then
        dump = _writable_dir(Path(dump).expanduser(), DUMP_KEY)
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out, f"out: {out}", "set another 'out'"):  # one run per directory, as `fedlora-fast train`'s
        _main(grid, context, cfg, out, dump, timeout, server_data, overwrite)


def _main(grid: Grid, context: Context, cfg, out: Path, dump, timeout, server_data: bool, overwrite: bool) -> None:
    """``main`` with ``out``'s lock held."""
    held = held_run_outputs(out)
    if held and not overwrite:
        raise ValueError(f"out: {out} already holds a run ({', '.join(held)}); set another 'out', or "
                         "flower-overwrite = true to replace it")
    remove_run_outputs(out, held)
    # the server needs no client's noise; with flower-server-data = false, no data either (silos hold it all)
    # on the device the nodes train on, or the CPU where this machine has no GPU (node.for_server); the run's
    # record (metrics.json, the checkpoint) keeps the run config as given
    side = node.for_server(cfg)
    fed = node.build(side) if server_data else node.ServerOnly(side)
    fed.config = cfg
    strategy = FedLoRAStrategy(fed.server, num_clients=cfg.num_clients, delta=cfg.delta, num_rounds=cfg.rounds,
                               eval_every=cfg.eval_every)
    extra = {"run_id": context.run_id}

    def end_of_round(server_round: int, arrays) -> None:
        # Flower calls this after each round's training and evaluation (and once before round 1).
        if server_round == 0:
            return None
        record = strategy.close_round()
        save_checkpoint(out / CHECKPOINT_NAME, fed, strategy)
        ckpt.atomic_write_text(out / "metrics.json", dump_metrics(metrics_document(fed, strategy, extra)))
        if dump:
            atomic_write_new(  # (never replacing another run's copy: -1, -2... where one exists)
                dump / f"round{server_round}-global", ".safetensors",
                serialization.encode(fed.server.global_state, {"round": server_round, "fingerprint": fed.fingerprint}),
            )
        print(format_round(record, cfg.rounds), flush=True)  # the one-line summary, in the streamed log
        return None

    strategy.start(
        grid=grid,
        initial_arrays=records.to_array_record(fed.server.global_state),
        num_rounds=cfg.rounds,
        timeout=timeout,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=end_of_round,
    )
    doc = metrics_document(fed, strategy, extra)
    ckpt.atomic_write_text(out / "metrics.json", dump_metrics(doc))
    write_final_outputs(fed, doc, out)


def write_final_outputs(fed, doc: dict, out: Path) -> None:
    """``curves.png`` and ``adapter/`` after the last round. No adapter where no round applied an update (every
    node refused or failed, as when a run's ``clients`` did not match the SuperNodes'): the global state is
    still the initial one, and an adapter labelled with the run's metadata would pass for a trained one."""
    if doc["final"] is None:
        return
    if any(r["accuracy"] is not None for r in doc["rounds"]):
        plot_curves(doc, out / "curves.png")
    if not any(r.get("applied") for r in doc["rounds"]):
        log.warning("adapter/ not written: no round applied an update (every node refused or failed; "
                    "metrics.json has each round's rejections): the global state is the initial one")
        return
    load_trainable(fed.model, fed.server.global_state)
    reason = export_adapter(fed.model, out / "adapter", metadata=adapter_metadata(fed, doc["final"]))
    if reason:
        log.warning("adapter/ not written: %s", reason)

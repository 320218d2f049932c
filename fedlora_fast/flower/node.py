"""Build one Flower participant's share of a federation: the simulation's ``Federation``, noise calibrated lazily.

``Federation(config)`` (``fedlora_fast.federated.simulation``) builds the data split, the model with its
adapters, every client and the server exactly as ``fedlora-fast train`` does. Under Flower each message runs
in a fresh process that needs one client (a SuperNode) or none (the ServerApp, evaluation), so calibrating
every client's noise multiplier there (opacus's search, seconds per client) would be wasted: ``build``
calibrates none and marks every noise multiplier NaN (any use before ``calibrate`` fails loudly instead of
training without noise); ``calibrate`` sets one client's with the same call and arguments as ``Federation``
(per-client sample rate ``batch_size / n_k``, ``rounds * local_steps`` steps).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from fedlora_fast.federated.simulation import Federation, FederatedConfig, adapted_model, describe_run, make_server
from fedlora_fast.federated.state import adapter_config, fingerprint
from fedlora_fast.privacy.accounting import calibrate_noise_multiplier

log = logging.getLogger(__name__)


def for_server(cfg: FederatedConfig) -> FederatedConfig:
    """The config the ServerApp builds its side with: ``cfg`` unless it names CUDA on a coordinator without a
    GPU; then the CPU, without CUDA graphs. The run config's ``device`` is the SuperNodes' training device;
    the server only aggregates, evaluates (with its own data) and exports, which the CPU can do, and its
    model, adapters and fingerprint are the same on any device. Callers keep ``cfg`` as the run's record."""
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        log.info("ServerApp: no CUDA device here; the server side runs on the CPU (the nodes train on %s)",
                 cfg.device)
        return dataclasses.replace(cfg, device="cpu", cuda_graph=False)
    return cfg


def build(cfg: FederatedConfig, data=None) -> Federation:
    """``Federation(cfg, data)`` without calibrating any client's noise (see ``calibrate``); ``fed.config`` is ``cfg``.
    Its server takes example counts as sent: over Flower a silo may train on its own data file, whose size
    the ServerApp's partition of its own copy of the data does not know."""
    if cfg.epsilon is None:
        fed = Federation(cfg, data)
    else:
        fed = Federation(dataclasses.replace(cfg, epsilon=None, noise_multiplier=0.0), data)
        fed.config = cfg
        for c in fed.clients:
            c.noise_multiplier = float("nan")  # DPSGD refuses NaN: nothing trains without its calibrated noise
    fed.server.example_counts = None
    return fed


def calibrate(fed: Federation, client: int, noise_multiplier: float | None = None) -> float:
    """Set (and return) client ``client``'s noise multiplier, as ``Federation`` calibrates it.

    Args:
        fed: a federation from ``build``.
        client: the client index.
        noise_multiplier: the value an earlier round of the same run calibrated (skips the search).
    Raises:
        ValueError: ``epsilon`` cannot be met by that client (the message names it).
    """
    cfg, c = fed.config, fed.clients[client]
    if cfg.epsilon is None:
        return c.noise_multiplier
    if noise_multiplier is None:
        try:
            noise_multiplier = calibrate_noise_multiplier(
                target_epsilon=cfg.epsilon, delta=cfg.delta, sample_rate=c.sample_rate,
                steps=cfg.rounds * cfg.local_steps,
            )
        except ValueError as e:
            raise ValueError(
                f"epsilon: client {client} ({c.num_examples} examples, sample rate {c.sample_rate:.4g}): {e}"
            ) from None
    c.noise_multiplier = float(noise_multiplier)
    return c.noise_multiplier


class ServerOnly:
    """The ServerApp's side of a run that holds no data (run config ``flower-server-data = false``).

    The model with its adapters, the fingerprint and the server, built as ``Federation`` builds them, with
    the classes from the run config's ``labels`` instead of a dataset: what a coordinator needs when every
    silo trains on its own file. ``metrics()`` has the simulation's layout with no data summary.

    Raises:
        ValueError: the run config names no ``labels``.
    """

    def __init__(self, cfg: FederatedConfig):
        if cfg.labels is None:
            raise ValueError(
                "run config 'labels': a ServerApp without data (flower-server-data = false) needs the classes "
                "named in id order, e.g. labels = \"ham,spam\""
            )
        self.config = cfg
        self.model_name, self.tokenizer, self.model = adapted_model(cfg, len(cfg.labels))
        self.adapter_config = adapter_config(self.model)
        self.fingerprint = fingerprint(self.adapter_config)
        self.server = make_server(cfg, self.model, self.fingerprint)

    def metrics(self) -> dict:
        return {
            **describe_run(self),
            "data": {"source": None, "label_names": list(self.config.labels), "note": "the ServerApp holds no data"},
            "rounds": [],
            "final": None,
        }

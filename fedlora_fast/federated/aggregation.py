"""Server-side aggregation rules, in a registry by name.

- ``fedavg`` (default): the example-count-weighted mean of the sent tensors (McMahan et al., AISTATS 2017).
  For FFA-LoRA the mean of B is exact: ``mean(B_k) A = mean(B_k A)`` (Sun et al., ICLR 2024, arXiv 2403.12313).
- ``central_dp``: user-level central DP, DP-FedAvg with a fixed clip (McMahan et al., ICLR 2018, "Learning
  differentially private recurrent language models"): each client's update ``delta_k = t_k - global`` is
  clipped to L2 norm S over all tensors, the clipped updates are averaged with equal weights and Gaussian
  noise ``N(0, (sigma S / K)^2)`` is added; its own accountant counts one step per round at sample rate
  ``K_round / K_total``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedlora_fast.federated.state import check_state
from fedlora_fast.privacy.accounting import Accountant, check_noise_multiplier
from fedlora_fast.privacy.sampling import os_normal


@dataclass
class ClientUpdate:
    """One accepted client update: the sent tensors, the client's example count and its metrics."""

    client_id: int
    tensors: dict[str, Tensor]
    num_examples: int
    metrics: dict = field(default_factory=dict)


class Aggregator:
    """Base class: ``aggregate(global_state, updates) -> new global state`` (same keys, dtypes, shapes)."""

    name = ""
    # a DP release: every round releases (``Server.run_round``), whatever was accepted, since a round skipped for
    # too few updates would tell whether one client took part; an empty round is noise alone
    releases_noise = False

    def aggregate(self, global_state: dict[str, Tensor], updates: list[ClientUpdate]) -> dict[str, Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """JSON-safe state for checkpoints (stateless by default)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def tensor_state(self) -> dict[str, Tensor]:
        """Tensor state for checkpoints (RNG states)."""
        return {}

    def load_tensor_state(self, tensors: dict[str, Tensor]) -> None:
        pass

    def privacy(self, delta: float) -> dict | None:
        """The server's own privacy record, or None when it adds no noise."""
        return None


def check_updates(global_state: dict[str, Tensor], updates: list[ClientUpdate]) -> None:
    """Raise ValueError unless there is an update, one per client, and every one holds exactly the global
    state's keys with its shapes, dtypes and finite values (``Server.validate`` checks messages so; this guards
    direct callers): a (1, r) tensor would otherwise broadcast into a wrong mean, an extra key would be
    dropped silently, a float64 value beyond float32 would average to inf in a float32 state, and a client
    counted twice would have twice its weight (and, under ``CentralDP``, twice the sensitivity)."""
    if not updates:
        raise ValueError("updates: expected at least one client update, got none")
    ids = [u.client_id for u in updates]
    if len(set(ids)) != len(ids):
        raise ValueError(f"updates: expected one update per client, got client ids {sorted(ids)[:8]} with repeats")
    for u in updates:
        if isinstance(u.num_examples, bool) or not isinstance(u.num_examples, int) or u.num_examples <= 0:
            raise ValueError(f"client {u.client_id}: num_examples: expected a positive int, got {u.num_examples!r}")
        check_state(f"client {u.client_id}", u.tensors, global_state, "the global state")


class FedAvg(Aggregator):
    """Weighted FedAvg: ``sum_k n_k t_k / sum_k n_k``, accumulated in float64."""

    name = "fedavg"

    def aggregate(self, global_state, updates):
        check_updates(global_state, updates)
        total = sum(u.num_examples for u in updates)
        out = {}
        for k, g in global_state.items():
            acc = torch.zeros(g.shape, dtype=torch.float64, device=g.device)  # (not the default device)
            for u in updates:
                acc += u.tensors[k].to(acc.device, torch.float64) * (u.num_examples / total)
            out[k] = acc.to(g.dtype)
        return out


class CentralDP(Aggregator):
    """User-level DP at the server: clip every client's update to ``clip_norm``, average, add noise.

    Args:
        clip_norm: S, the L2 bound on one client's update over all sent tensors.
        noise_multiplier: sigma; the noise std on the mean is ``sigma * S / K`` for the K clients selected per
            round. The noisy sum is divided by that fixed K, never by the number of updates accepted: with the
            accepted count as divisor, one client more or less would change the released mean's noise scale
            (add/remove) or double the sum's sensitivity (replace-one), and the accountant's epsilon would not
            hold (McMahan et al., ICLR 2018, divide by the expected count likewise). A rejected or missing
            update contributes zero.
        num_clients: clients in the federation.
        clients_per_round: clients *selected* every round: all of them (the default, as the simulation and the
            Flower strategy do; the accountant's sample rate is 1). Fewer is refused: a fixed number drawn per
            round is not the Poisson sampling the accountant's rate ``K / N`` would assume (its epsilon would not
            hold: 7.9 vs 14.1 for 100 rounds of 10 of 100 clients, a review's dp_accounting check), and Poisson
            selection would give a varying number of updates, which this class does not take. An update
            rejected or lost after selection still counts (q stays 1).
        generator: noise generator, for a reproducible run (whoever knows its seed can remove the noise); None:
            every draw from the operating system's cryptographically secure generator (``os_normal``).

    Every round is a release, even one with no update accepted (noise alone): ``Server`` does not skip a round
    below its ``min_clients`` under this aggregator, since whether a round moved the state would tell whether
    a client took part (the accountant's epsilon covers the noisy release only).
    """

    name = "central_dp"
    releases_noise = True

    def __init__(self, *, clip_norm: float, noise_multiplier: float, num_clients: int,
                 clients_per_round: int | None = None, generator: torch.Generator | None = None):
        if not math.isfinite(float(clip_norm)) or float(clip_norm) <= 0:
            raise ValueError(f"server_clip_norm: expected a finite number > 0, got {clip_norm!r}")
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = check_noise_multiplier(noise_multiplier)
        if int(num_clients) <= 0:
            raise ValueError(f"num_clients: expected a positive int, got {num_clients!r}")
        self.num_clients = int(num_clients)
        per_round = self.num_clients if clients_per_round is None else clients_per_round
        if isinstance(per_round, bool) or not isinstance(per_round, int) or not 0 < per_round <= self.num_clients:
            raise ValueError(f"clients_per_round: expected an int in 1..{self.num_clients} (num_clients), got {clients_per_round!r}")
        if per_round != self.num_clients:
            raise ValueError(
                f"clients_per_round: {per_round} of {self.num_clients} clients per round is a fixed-size draw, not the "
                "Poisson sampling the accountant's rate would assume (its epsilon would not hold): select every "
                "client (the default)"
            )
        self.clients_per_round = per_round
        self.sample_rate = per_round / self.num_clients
        # (None: every draw from the OS's cryptographically secure generator, os_normal; a generator's stream, even
        # OS-seeded, is predictable after a round of noise alone, which a round without updates releases)
        self.generator = generator
        self.accountant = Accountant()

    def aggregate(self, global_state, updates):
        if updates:  # (none accepted: the release is noise alone, and it is accounted as every round is)
            check_updates(global_state, updates)
        if len(updates) > self.clients_per_round:
            raise ValueError(f"updates: {len(updates)} accepted, more than the {self.clients_per_round} clients selected "
                             "per round (clients_per_round) the noise and accounting are calibrated for")
        n = self.clients_per_round  # fixed: see the class docstring
        summed = {k: torch.zeros(g.shape, dtype=torch.float64, device=g.device) for k, g in global_state.items()}
        for u in updates:
            delta = {k: u.tensors[k].double() - global_state[k].double() for k in global_state}
            norm = math.sqrt(sum(float(d.pow(2).sum()) for d in delta.values()))
            coef = min(1.0, self.clip_norm / (norm + 1e-12))
            for k in summed:
                summed[k] += delta[k] * coef
        std = self.noise_multiplier * self.clip_norm
        # one noise stream over the keys in name order (their order never matters); the output keeps the input's
        # drawn where the generator is (a factory call would follow torch.set_default_device, and refuse it)
        gen = self.generator
        noise = {k: (torch.normal(0.0, std, size=global_state[k].shape, generator=gen, dtype=torch.float64,
                                  device=gen.device) if gen is not None
                     else os_normal(tuple(global_state[k].shape), dtype=torch.float64, device=global_state[k].device)
                     * std).to(global_state[k].device)
                 for k in sorted(global_state)} if std > 0 else {}
        out = {k: (g.double() + (summed[k] + noise.get(k, 0.0)) / n).to(g.dtype) for k, g in global_state.items()}
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return out

    def state_dict(self):
        return {"accountant": self.accountant.state_dict()}

    def load_state_dict(self, state):
        self.accountant = Accountant.from_state_dict(state["accountant"])

    def tensor_state(self):
        return {} if self.generator is None else {"generator": self.generator.get_state()}

    def load_tensor_state(self, tensors):
        if self.generator is not None:
            self.generator.set_state(tensors["generator"])

    def privacy(self, delta):
        return {
            "level": "user",
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "steps": self.accountant.steps,
            "epsilon": self.accountant.epsilon(delta),
        }


AGGREGATORS: dict[str, type[Aggregator]] = {FedAvg.name: FedAvg, CentralDP.name: CentralDP}


def make_aggregator(name: str, **kwargs) -> Aggregator:
    """An aggregator by registry name (``fedavg`` takes no arguments; ``central_dp`` see ``CentralDP``)."""
    if name not in AGGREGATORS:
        raise ValueError(f"aggregator: expected one of {sorted(AGGREGATORS)}, got {name!r}")
    cls = AGGREGATORS[name]
    return cls(**kwargs) if kwargs else cls()

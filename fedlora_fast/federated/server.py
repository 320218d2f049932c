"""The federated server: broadcasts the global adapter state, validates every update, aggregates the good ones.

Nothing unvalidated reaches the global state: an update is rejected (and logged with its reason) when it
cannot be decoded, belongs to another round, carries another adapter fingerprint (seed, rank, alpha,
targets, method), has missing or unexpected tensors, a wrong shape or dtype, or a non-finite value; and, where
the server is told what to expect, moves the global state further than ``max_update_norm`` or claims another
example count than the client holds (FedAvg weights by it: a client claiming 10^15 examples would own the
average). The round goes on with the rest when at least ``min_clients`` updates are accepted; otherwise the
global state stays as it was, except under an aggregator that releases with noise (``CentralDP``), which
releases every round: a round skipped for want of one client would tell whether that client took part.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedlora_fast.federated import serialization
from fedlora_fast.federated.aggregation import Aggregator, ClientUpdate, FedAvg

log = logging.getLogger(__name__)

CLIENT_METRICS = ("steps", "train_loss")  # what an update's metadata may report beside its tensors


def short_repr(value, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: what a client or a server sent reaches logs, metrics.json
    and checkpoints."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _finite_number(v) -> bool:
    """A JSON number a client may report: a finite float, or an int a float64 holds exactly (JSON allows
    integers of thousands of digits, and ``math.isfinite(10**400)`` raises instead of answering)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return abs(v) <= 2**53
    return isinstance(v, float) and math.isfinite(v)


# The largest example count an update may claim: FedAvg weights by it as a float (exact up to 2**53), and
# Flower's records carry it as a 64-bit int (a larger count ended the ServerApp when configuring the next round)
MAX_EXAMPLES = 2**53


@dataclass
class RoundResult:
    """What the server did with one round's messages."""

    round: int
    accepted: list[ClientUpdate] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # {"client": id or None, "reason": str}
    accepted_from: list[int] = field(default_factory=list)  # the message index of each accepted update
    applied: bool = False  # the global state was updated (>= min_clients accepted)
    bytes_up: int = 0
    payload_up: int = 0


class Server:
    """Holds the global trainable state and the round counter.

    Args:
        initial_state: ``{name: tensor}`` the global trainable tensors (copied).
        fingerprint: the adapter fingerprint every update must carry.
        aggregator: an ``Aggregator`` (FedAvg by default).
        min_clients: fewest accepted updates that move the global state (not applied under ``CentralDP``: every
            round is its noisy release, see the module docstring).
        max_update_norm: reject an update whose L2 distance from the global state (over every tensor) is
            larger; None: no bound (finite values only). FedAvg has no other defence against one client
            sending huge values; central DP clips them instead.
        example_counts: ``{client id: examples}`` the server knows each client holds (a simulation does);
            an update from another id, or claiming another count, is rejected. None: counts are taken as sent.
        num_clients: client ids run from 0 to ``num_clients - 1``; an update under any other id is rejected
            (None: any int id).
    """

    def __init__(self, initial_state: dict[str, Tensor], fingerprint: str, aggregator: Aggregator | None = None,
                 min_clients: int = 1, *, max_update_norm: float | None = None,
                 example_counts: dict[int, int] | None = None, num_clients: int | None = None):
        if int(min_clients) < 1:
            raise ValueError(f"min_clients: expected an int >= 1, got {min_clients!r}")
        if max_update_norm is not None and not (
            isinstance(max_update_norm, (int, float)) and not isinstance(max_update_norm, bool)
            and math.isfinite(max_update_norm) and max_update_norm > 0
        ):  # fmt: skip
            raise ValueError(f"max_update_norm: expected None or a finite number > 0, got {max_update_norm!r}")
        self.max_update_norm = None if max_update_norm is None else float(max_update_norm)
        self.example_counts = None if example_counts is None else {int(k): int(v) for k, v in example_counts.items()}
        if num_clients is not None and (isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1):
            raise ValueError(f"num_clients: expected None or an int >= 1, got {num_clients!r}")
        self.num_clients = num_clients
        self.global_state = serialization.clone_state(initial_state)
        self.fingerprint = fingerprint
        self.aggregator = aggregator or FedAvg()
        self.min_clients = int(min_clients)
        self.round = 0  # rounds completed: the protocol's 0-based index of the round under way (logs count from 1)

    def broadcast(self) -> bytes:
        """The message every client of the next round receives."""
        return serialization.encode(self.global_state, {"round": self.round, "fingerprint": self.fingerprint})

    def validate(self, message: bytes, seen: set[int] | None = None) -> tuple[ClientUpdate | None, int | None, str | None]:
        """``(update, client_id, None)`` for a good message, ``(None, client_id or None, reason)`` for a bad one."""
        try:
            tensors, meta = serialization.decode(message)
        except serialization.MessageError as e:
            return None, None, f"undecodable message: {e}"
        cid = meta.get("client_id")
        if not isinstance(cid, int) or isinstance(cid, bool):
            return None, None, f"metadata: client_id must be an int, got {short_repr(cid)}"
        if self.num_clients is not None and not 0 <= cid < self.num_clients:
            return None, cid, f"client_id {cid}: not one of the federation's clients 0..{self.num_clients - 1}"
        rnd = meta.get("round")
        if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd != self.round:
            return None, cid, (f"stale or future round: update for round index {short_repr(rnd)}, server is at "
                               f"round index {self.round} (round {self.round + 1}, counting from 1)")
        if meta.get("fingerprint") != self.fingerprint:
            return None, cid, (
                f"adapter fingerprint {short_repr(meta.get('fingerprint'))} differs from the server's "
                f"{self.fingerprint!r} (seed, rank, alpha, targets or method differ)"
            )
        n = meta.get("num_examples")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= MAX_EXAMPLES:
            return None, cid, f"metadata: num_examples must be a positive int of at most 2**53, got {short_repr(n)}"
        if self.example_counts is not None and self.example_counts.get(cid) != n:
            if cid not in self.example_counts:
                return None, cid, f"client_id {cid}: not one of the federation's clients {sorted(self.example_counts)[:8]}"
            return None, cid, f"metadata: num_examples {n} differs from the {self.example_counts[cid]} client {cid} holds"
        if seen is not None and cid in seen:
            return None, cid, f"duplicate update from client {cid} in round {self.round}"
        missing = sorted(self.global_state.keys() - tensors.keys())
        extra = sorted(tensors.keys() - self.global_state.keys())
        if missing or extra:
            return None, cid, f"tensors: missing {missing[:4]}, unexpected {[short_repr(k) for k in extra[:4]]}"
        for k, g in self.global_state.items():
            t = tensors[k]
            if t.shape != g.shape or t.dtype != g.dtype:
                return None, cid, f"tensor {k!r}: expected {tuple(g.shape)} {g.dtype}, got {tuple(t.shape)} {t.dtype}"
            if not bool(torch.isfinite(t).all()):
                return None, cid, f"tensor {k!r}: has non-finite values"
        if self.max_update_norm is not None:
            norm = math.sqrt(sum(float((tensors[k].double() - g.double()).pow(2).sum()) for k, g in self.global_state.items()))
            if norm > self.max_update_norm:
                # under central DP the outputs must not carry a client's exact update norm (metrics.json has them)
                shown = "" if self.aggregator.releases_noise else f" {norm:.4g}"
                return None, cid, (f"update norm{shown} (L2 distance from the global state) exceeds "
                                   f"max_update_norm={self.max_update_norm:g}")
        sent = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
        # only the known numeric keys (a client's metrics reach metrics.json): nothing else a client chose to send
        metrics = {k: sent[k] for k in CLIENT_METRICS if _finite_number(sent.get(k))}
        return ClientUpdate(cid, tensors, n, metrics), cid, None

    def run_round(self, messages: list[bytes]) -> RoundResult:
        """Validate the round's messages, aggregate the accepted ones, advance the round counter."""
        result = RoundResult(round=self.round)
        seen: set[int] = set()
        for i, msg in enumerate(messages):
            result.bytes_up += len(msg)
            try:
                result.payload_up += serialization.payload_size(msg)
            except serialization.MessageError:
                pass
            try:
                update, cid, reason = self.validate(msg, seen)
            except Exception as e:  # noqa: BLE001  (one client's message must never end the round for all)
                update, cid, reason = None, None, f"invalid message ({type(e).__name__}: {str(e)[:200]})"
            if update is None:
                log.warning("round %d: rejected the update of client %s: %s", self.round + 1, cid, reason)
                result.rejected.append({"client": cid, "reason": reason})
                continue
            seen.add(cid)
            result.accepted.append(update)
            result.accepted_from.append(i)
        releases = self.aggregator.releases_noise
        if len(result.accepted) >= self.min_clients or releases:
            if len(result.accepted) < self.min_clients:
                log.warning(
                    "round %d: only %d update(s) accepted, fewer than min_clients=%d: released all the same (%s "
                    "adds noise every round: a round skipped would tell whether a client took part)",
                    self.round + 1, len(result.accepted), self.min_clients, self.aggregator.name,
                )
            new_state = self.aggregator.aggregate(self.global_state, result.accepted)
            if all(bool(torch.isfinite(t).all()) for t in new_state.values()):
                self.global_state = new_state
                result.applied = True
            else:  # cannot happen with finite inputs; guard the global state all the same
                log.error("round %d: aggregation produced non-finite values; global state kept", self.round + 1)
        else:
            log.error(
                "round %d: only %d update(s) accepted, fewer than min_clients=%d; global state kept",
                self.round + 1, len(result.accepted), self.min_clients,
            )
        self.round += 1
        return result

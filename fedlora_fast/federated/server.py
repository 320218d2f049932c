"""The federated server: broadcasts the global adapter state, validates every update, aggregates the good ones.

Nothing unvalidated reaches the global state: an update is rejected (and logged with its reason) when it
cannot be decoded, belongs to another round, carries another adapter fingerprint (seed, rank, alpha,
targets, method), has missing or unexpected tensors, a wrong shape or dtype, or a non-finite value. The round
goes on with the rest when at least ``min_clients`` updates are accepted; otherwise the global state stays
as it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedlora_fast.federated import serialization
from fedlora_fast.federated.aggregation import Aggregator, ClientUpdate, FedAvg

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What the server did with one round's messages."""

    round: int
    accepted: list[ClientUpdate] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # {"client": id or None, "reason": str}
    applied: bool = False  # the global state was updated (>= min_clients accepted)
    bytes_up: int = 0
    payload_up: int = 0


class Server:
    """Holds the global trainable state and the round counter.

    Args:
        initial_state: ``{name: tensor}`` the global trainable tensors (copied).
        fingerprint: the adapter fingerprint every update must carry.
        aggregator: an ``Aggregator`` (FedAvg by default).
        min_clients: fewest accepted updates that move the global state.
    """

    def __init__(self, initial_state: dict[str, Tensor], fingerprint: str, aggregator: Aggregator | None = None,
                 min_clients: int = 1):
        if int(min_clients) < 1:
            raise ValueError(f"min_clients: expected an int >= 1, got {min_clients!r}")
        self.global_state = serialization.clone_state(initial_state)
        self.fingerprint = fingerprint
        self.aggregator = aggregator or FedAvg()
        self.min_clients = int(min_clients)
        self.round = 0  # rounds completed

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
            return None, None, f"metadata: client_id must be an int, got {cid!r}"
        rnd = meta.get("round")
        if rnd != self.round:
            return None, cid, f"stale or future round: update for round {rnd!r}, server is at round {self.round}"
        if meta.get("fingerprint") != self.fingerprint:
            return None, cid, (
                f"adapter fingerprint {meta.get('fingerprint')!r} differs from the server's {self.fingerprint!r} "
                "(seed, rank, alpha, targets or method differ)"
            )
        n = meta.get("num_examples")
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            return None, cid, f"metadata: num_examples must be a positive int, got {n!r}"
        if seen is not None and cid in seen:
            return None, cid, f"duplicate update from client {cid} in round {self.round}"
        missing = sorted(self.global_state.keys() - tensors.keys())
        extra = sorted(tensors.keys() - self.global_state.keys())
        if missing or extra:
            return None, cid, f"tensors: missing {missing[:4]}, unexpected {extra[:4]}"
        for k, g in self.global_state.items():
            t = tensors[k]
            if t.shape != g.shape or t.dtype != g.dtype:
                return None, cid, f"tensor {k!r}: expected {tuple(g.shape)} {g.dtype}, got {tuple(t.shape)} {t.dtype}"
            if not bool(torch.isfinite(t).all()):
                return None, cid, f"tensor {k!r}: has non-finite values"
        metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
        return ClientUpdate(cid, tensors, n, metrics), cid, None

    def run_round(self, messages: list[bytes]) -> RoundResult:
        """Validate the round's messages, aggregate the accepted ones, advance the round counter."""
        result = RoundResult(round=self.round)
        seen: set[int] = set()
        for msg in messages:
            result.bytes_up += len(msg)
            try:
                result.payload_up += serialization.payload_size(msg)
            except serialization.MessageError:
                pass
            update, cid, reason = self.validate(msg, seen)
            if update is None:
                log.warning("round %d: rejected the update of client %s: %s", self.round, cid, reason)
                result.rejected.append({"client": cid, "reason": reason})
                continue
            seen.add(cid)
            result.accepted.append(update)
        if len(result.accepted) >= self.min_clients:
            new_state = self.aggregator.aggregate(self.global_state, result.accepted)
            if all(bool(torch.isfinite(t).all()) for t in new_state.values()):
                self.global_state = new_state
                result.applied = True
            else:  # cannot happen with finite inputs; guard the global state all the same
                log.error("round %d: aggregation produced non-finite values; global state kept", self.round)
        else:
            log.error(
                "round %d: only %d update(s) accepted, fewer than min_clients=%d; global state kept",
                self.round, len(result.accepted), self.min_clients,
            )
        self.round += 1
        return result

"""``FedLoRAStrategy``: Flower's FedAvg whose aggregation is fedlora_fast's validated server round.

Subclasses ``flwr.serverapp.strategy.FedAvg`` (Flower Message API; McMahan et al., AISTATS 2017) and keeps
its node sampling and message construction, but replaces both aggregation steps:

- ``aggregate_train`` turns every reply into a fedlora_fast update message and hands the round to
  ``fedlora_fast.federated.server.Server.run_round``: each update is validated (keys, shapes, dtypes,
  finiteness, round, adapter fingerprint, example count, duplicates) and a bad one is rejected and logged
  while the round goes on with the rest; the accepted ones are combined by the configured aggregator
  (weighted FedAvg of B for FFA-LoRA, Sun et al., ICLR 2024, arXiv 2403.12313; or user-level central DP).
  Flower's own ``validate_message_reply_consistency`` is not used: it aborts the whole round when a single
  reply differs from the others, which would let one malformed client stop the federation.
- ``aggregate_evaluate`` averages the clients' accuracy and loss weighted by their test example counts
  (disjoint test shards covering the test split: the result is the accuracy on the whole split).

The client-reported privacy records (noise multiplier, sample rate, steps, epsilon) are kept per client; the
round's epsilon is the largest any client has spent. A reply without a well-formed record is rejected like any
malformed update: every aggregated update has its client's record (metrics.json's final clients, noise source).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlora_fast.federated import serialization
from fedlora_fast.federated.server import Server, short_repr
from fedlora_fast.flower import records

log = logging.getLogger(__name__)

ROUND_KEY = "fedlora-round"  # the server's round counter, echoed by clients in their update metadata
# train config, per node: the example count of the node's client id's first accepted update (bound nodes only), a
# bound on the node's past sample rate for a restart without its privacy ledger (client_app._count_earlier_rounds)
FIRST_EXAMPLES_KEY = "fedlora-first-examples"
# train config, per bound node: the smallest noise multiplier its client id reported with an accepted update, a
# bound on the noise of rounds a restarted node without its ledger counts (client_app._count_earlier_rounds)
MIN_NOISE_KEY = "fedlora-min-noise"
PRIVACY_KEYS = ("noise_multiplier", "sample_rate", "steps", "epsilon")  # clients' MetricRecord (with num-examples)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite_number(value) -> bool:
    return _number(value) and math.isfinite(value)


def _privacy_problem(metrics: MetricRecord | None) -> str | None:
    """Why a reply's privacy record (its MetricRecord's ``PRIVACY_KEYS``) is unusable, or None. Epsilon may be
    inf (a client without noise has no privacy), never NaN: a NaN would be neither counted nor refused."""
    if metrics is None:
        return f"expected a MetricRecord with {', '.join(PRIVACY_KEYS)}, got none"
    expected = {
        "noise_multiplier": ("a finite number >= 0", lambda v: math.isfinite(v) and v >= 0),
        "sample_rate": ("a number in [0, 1]", lambda v: 0 <= v <= 1),
        "steps": ("a finite number >= 0", lambda v: math.isfinite(v) and v >= 0),
        "epsilon": ("a number >= 0 (inf: no privacy)", lambda v: v >= 0),  # NaN fails every comparison
    }
    for key in PRIVACY_KEYS:
        what, ok = expected[key]
        value = metrics.get(key)
        if not (_number(value) and ok(value)):
            return f"{key!r}: expected {what}, got {short_repr(value)}"
    return None


class FedLoRAStrategy(FedAvg):
    """FedAvg over Flower with fedlora_fast's update validation and aggregator registry.

    Args:
        server: the fedlora_fast ``Server`` holding the global trainable tensors, the adapter fingerprint,
            the aggregator and ``min_clients``; it is the single source of the global state.
        num_clients: nodes sampled for every round (all of them: the federation is cross-silo).
        delta: the delta at which epsilons are reported.
        num_rounds, eval_every: clients evaluate the global adapter every ``eval_every`` rounds and after the
            last one (``eval-every``, as in the simulation).
        **kwargs: other ``FedAvg`` arguments.
    """

    def __init__(self, server: Server, *, num_clients: int, delta: float, num_rounds: int, eval_every: int = 1,
                 **kwargs):
        kwargs.setdefault("min_train_nodes", num_clients)
        kwargs.setdefault("min_evaluate_nodes", num_clients)
        kwargs.setdefault("min_available_nodes", num_clients)
        super().__init__(**kwargs)
        self.server, self.delta, self.num_clients = server, float(delta), int(num_clients)
        self.num_rounds, self.eval_every = int(num_rounds), int(eval_every)
        self.clients: dict[int, dict] = {}  # client id -> latest privacy record (from the node it is bound to)
        # Trust on first use: a client id belongs to the node whose update under that id was first accepted,
        # and a node speaks for one client id. Flower's node authentication is what makes a node's identity
        # itself trustworthy; this keeps a node from taking over another's id (its updates, its duplicates
        # check, its privacy record) once both have spoken.
        self._node_of: dict[int, int] = {}  # client id -> node
        self._client_of: dict[int, int] = {}  # node -> client id
        # FedAvg weights by the example count a client sends, and a Flower server cannot check it against data
        # it does not hold: an id's count is fixed by its first accepted update (a client's data does not change
        # within a run), so a node cannot grow its weight round by round; max_update_norm bounds what any
        # weight can do, central DP clips per client whatever its count
        self._examples_of: dict[int, int] = {}  # client id -> its example count
        self._min_noise_of: dict[int, float] = {}  # client id -> smallest noise multiplier of its accepted reports
        self._reports: dict[int, dict] = {}  # node -> its largest privacy report: epsilon() is the max over all
        # client id -> the example count of its first accepted evaluation reply, fixed for the run (a silo's own
        # held-out rows are not the server's to count: aggregate_evaluate)
        self._eval_examples_of: dict[int, int] = {}
        self.rounds: list[dict] = []  # one record per completed round (metrics.json "rounds")
        # the round index (ROUND_KEY) of the last train messages: the evaluation that follows names it, so a silo
        # scores its held-out rows only for a round its data trained, by the index its train message carried
        # (today always Flower's server-round - 1: Server.run_round advances every round; named, not assumed)
        self._train_round: int | None = None
        self._pending: dict = {}
        self._round_start = time.perf_counter()

    # --- configure -----------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling, with the fedlora_fast round counter in the config (clients echo it back).

        A node bound to a client id (its update under that id was accepted) also gets, in its own copy of the
        config, the id's first accepted example count (``FIRST_EXAMPLES_KEY``) and the smallest noise multiplier
        it reported with an accepted update (``MIN_NOISE_KEY``): a restarted node without its privacy ledger
        counts the earlier rounds at no less than the sample rate that count implies, no more than that noise. FedAvg's
        messages share one ``RecordDict``: a bound node's message gets a new one with its own ``ConfigRecord``,
        so no node's count reaches another node; unbound nodes get the shared config, without the key.
        """
        self._round_start = time.perf_counter()
        config[ROUND_KEY] = self._train_round = self.server.round
        config.pop(FIRST_EXAMPLES_KEY, None)  # per node only, never in the config every node gets
        config.pop(MIN_NOISE_KEY, None)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for msg in messages:
            cid = self._client_of.get(msg.metadata.dst_node_id)
            if cid is None or cid not in self._examples_of:
                continue
            content = msg.content
            own = ConfigRecord(dict(content.config_records[self.configrecord_key]))
            own[FIRST_EXAMPLES_KEY] = self._examples_of[cid]
            if cid in self._min_noise_of:
                own[MIN_NOISE_KEY] = self._min_noise_of[cid]
            msg.content = RecordDict({**dict(content.items()), self.configrecord_key: own})
        broadcast = self.server.broadcast()  # what the simulation sends: counts bytes the same way
        self._pending = {
            "round": server_round,
            "bytes_down": len(broadcast) * len(messages),
            "payload_down": serialization.payload_size(broadcast) * len(messages),
        }
        return messages

    # --- train -------------------------------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply with ``Server.run_round`` and aggregate the accepted ones. A reply whose privacy
        record is missing or malformed (``_privacy_problem``) is rejected before it, as a malformed reply is.

        Returns:
            ``(new global arrays or None, aggregated train metrics or None)``; None arrays leave Flower's
            global state as it was, exactly like the fedlora_fast server when fewer than ``min_clients``
            updates were accepted.
        """
        replies = list(replies)
        messages, nodes, cids, reports, rejected = [], [], [], [], []  # nodes, cids, reports: per message
        refused_reports = []  # (client id, privacy record) of the id's own node, refused before the server
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                rejected.append({"client": None, "node": node, "reason": f"client error: {str(msg.error.reason)[:300]}"})
                continue
            try:
                content = msg.content
                arrays = content.array_records.get(self.arrayrecord_key)
                meta = content.config_records.get(self.configrecord_key)
                if arrays is None or meta is None:
                    raise records.RecordError(
                        f"expected an ArrayRecord {self.arrayrecord_key!r} and a ConfigRecord "
                        f"{self.configrecord_key!r}, got {sorted(content.keys())}"
                    )
                message = records.to_message(arrays, meta)
                sent_meta = records.read_meta(meta)
                cid = sent_meta.get("client_id")
            except Exception as e:  # malformed content of any kind: reject this reply only
                rejected.append({"client": None, "node": node, "reason": f"malformed reply: {str(e)[:300]}"})
                continue
            if not (isinstance(cid, int) and not isinstance(cid, bool)):
                messages.append(message)  # the server rejects it, naming the bad client_id
                nodes.append(node)
                cids.append(None)
                reports.append(None)
                continue
            metrics = next(iter(content.metric_records.values()), None)
            problem = _privacy_problem(metrics)
            if problem is not None:  # aggregated, its client would be missing from the run's privacy record
                rejected.append({"client": cid, "node": node, "reason": f"malformed privacy record: {problem}"})
                continue
            rec = {"num_examples": metrics.get(self.weighted_by_key), **{k: metrics[k] for k in PRIVACY_KEYS}}
            # every node's report counts in epsilon(), before any check of its update: a node refused below
            # (a restarted SuperNode gets a new node id without node authentication, and its old client id
            # stays bound to the old one) has trained all the same
            self._report(node, {"client": cid, "node": node, **rec})
            owner, claimed = self._node_of.get(cid), self._client_of.get(node)
            if (owner is not None and owner != node) or (claimed is not None and claimed != cid):
                reason = (f"node {node} claims client id {cid}, which belongs to node {owner}" if owner not in (None, node)
                          else f"node {node} speaks for client id {claimed}, not {cid}")
                rejected.append({"client": cid, "node": node, "reason": f"{reason} (their first accepted updates; a "
                                 "SuperNode restarted without node authentication comes back under a new node id)"})
                continue
            sent = sent_meta.get("num_examples")
            if cid in self._examples_of and sent != self._examples_of[cid]:
                rejected.append({"client": cid, "node": node, "reason": (
                    f"num_examples {short_repr(sent)} differs from the {self._examples_of[cid]} client {cid} sent in "
                    "its first accepted update (FedAvg weights by it)")})
                refused_reports.append((cid, rec))  # it trained: its privacy record still counts
                continue
            messages.append(message)
            nodes.append(node)
            cids.append(cid)
            reports.append(rec)
        for r in rejected:
            log.warning("round %d: rejected the reply of node %s: %s", server_round, r["node"], r["reason"])
        result = self.server.run_round(messages)
        for r in result.rejected:
            log.warning("round %d: rejected the update of client %s: %s", server_round, r["client"], r["reason"])
        # bind each accepted id to the node whose message the server accepted (first accepted: for good), and
        # take that message's privacy record for the id
        privacy = {}
        for u, i in zip(result.accepted, result.accepted_from):
            self._node_of.setdefault(u.client_id, nodes[i])
            self._client_of.setdefault(nodes[i], u.client_id)
            self._examples_of.setdefault(u.client_id, u.num_examples)
            if reports[i] is not None:
                privacy[u.client_id] = reports[i]
                sigma = float(reports[i]["noise_multiplier"])
                if math.isfinite(sigma) and sigma >= 0:
                    self._min_noise_of[u.client_id] = min(sigma, self._min_noise_of.get(u.client_id, sigma))
        # A client whose update failed validation has still spent its budget: the record of the first message
        # under its id counts (ids outside [0, num_clients) are ignored, so a malformed reply cannot invent
        # clients). Only a node's own id (unbound yet, or bound to it) reaches here; every node's latest report
        # also counts in epsilon(), so a node cannot lower the epsilon another node reported.
        for cid, rec in [*zip(cids, reports), *refused_reports]:
            if rec is not None and cid not in privacy:
                privacy[cid] = rec
        for cid, rec in privacy.items():
            if 0 <= cid < self.num_clients:
                self.clients[cid] = {"client": cid, **rec}
        # Our clients keep their training loss local (it is not differentially private); a client of another
        # make that reports one still gets it averaged here, as the simulation's metrics.json would show it.
        train_loss = _weighted_mean([(1, u.metrics.get("train_loss")) for u in result.accepted])
        self._pending.update(
            accepted=sorted(u.client_id for u in result.accepted),
            rejected=list(result.rejected) + rejected,
            applied=result.applied,
            train_loss=train_loss,
            bytes_up=result.bytes_up,
            payload_up=result.payload_up,
        )
        metrics = MetricRecord({"accepted": len(result.accepted), "rejected": len(self._pending["rejected"]),
                                "epsilon": self.epsilon()})
        if train_loss is not None:
            metrics["train-loss"] = train_loss
        arrays = records.to_array_record(self.server.global_state) if result.applied else None
        return arrays, metrics

    def _report(self, node: int, rec: dict) -> None:
        """Keep ``rec`` as the node's report unless it already reported a larger epsilon: a node's spending
        only grows within a run, so a lower figure later (a node's mistake or lie) must not lower the run's."""
        old = self._reports.get(node)
        eps, before = rec["epsilon"], None if old is None else old["epsilon"]
        if before is None or math.isnan(before) or (not math.isnan(eps) and eps >= before):
            self._reports[node] = rec

    def epsilon(self) -> float:
        """The largest epsilon any client or node has reported (0 before any report)."""
        recs = [*self.clients.values(), *self._reports.values()]
        # inf counts (a client without noise has no privacy: the run must not read as epsilon 0); NaN does not
        eps = [c["epsilon"] for c in recs if _number(c.get("epsilon")) and not math.isnan(c["epsilon"])]
        return float(max(eps)) if eps else 0.0

    # --- evaluate ----------------------------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's evaluation messages on the rounds the simulation evaluates; none on the others. The config
        names the round index of the training it follows (``ROUND_KEY``)."""
        if server_round % self.eval_every != 0 and server_round != self.num_rounds:
            self._pending.update(accuracy=None, loss=None)
            return []
        if self._train_round is None:
            config.pop(ROUND_KEY, None)
        else:
            config[ROUND_KEY] = self._train_round
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the clients' ``accuracy`` and ``loss``. Skipped (and logged): malformed
        replies, scores out of range (accuracy outside [0, 1], a negative loss), and replies from nodes not
        bound to a client id (no accepted update yet): the weight is the count a node claims, so an unknown
        node claiming 2**62 examples would set the run's accuracy alone. A bound id's count is fixed by its first
        accepted reply (trust on first use, as the training count is)."""
        good = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log.warning("round %d: evaluation error from node %s: %s", server_round, node, str(msg.error.reason)[:300])
                continue
            m = next(iter(msg.content.metric_records.values()), None)
            n = None if m is None else m.get(self.weighted_by_key)
            if n == 0 and isinstance(n, int) and not isinstance(n, bool):
                continue  # a node that scores nothing (a silo keeping its own held-out rows private)
            scores_ok = m is not None and all(_finite_number(m.get(k)) for k in ("accuracy", "loss"))
            if not (scores_ok and _number(n) and isinstance(n, int) and n > 0):
                log.warning("round %d: malformed evaluation reply from node %s skipped", server_round, node)
                continue
            acc, loss = float(m["accuracy"]), float(m["loss"])
            cid = self._client_of.get(node)
            want = None if cid is None else self._eval_examples_of.get(cid)
            why = ("its node is bound to no client id (no accepted update)" if cid is None
                   else f"{n} examples, client {cid} has {want}" if want is not None and n != want
                   else f"accuracy {acc!r} outside [0, 1] or loss {loss!r} < 0" if not (0 <= acc <= 1 and loss >= 0)
                   else None)
            if why:
                log.warning("round %d: evaluation reply from node %s skipped: %s", server_round, node, why)
                continue
            self._eval_examples_of.setdefault(cid, n)
            good.append((n, acc, loss))
        acc = _weighted_mean([(n, a) for n, a, _ in good])
        loss = _weighted_mean([(n, v) for n, _, v in good])
        total = sum(n for n, _, _ in good)
        self._pending.update(accuracy=acc, loss=loss, eval_examples=total)
        if not good:
            return None
        return MetricRecord({"accuracy": acc, "loss": loss, self.weighted_by_key: total})

    # --- end of round ------------------------------------------------------------------------------------
    def close_round(self) -> dict:
        """The finished round's record, with the fields of the simulation's ``metrics.json`` rounds."""
        p = self._pending
        rec = {
            "round": p.get("round"),
            "accepted": p.get("accepted", []),
            "rejected": p.get("rejected", []),
            "applied": p.get("applied", False),
            "train_loss": p.get("train_loss"),
            "epsilon": self.epsilon(),
            "bytes_up": p.get("bytes_up", 0),
            "bytes_down": p.get("bytes_down", 0),
            "payload_up": p.get("payload_up", 0),
            "payload_down": p.get("payload_down", 0),
            "accuracy": p.get("accuracy"),
            "loss": p.get("loss"),
        }
        if self.server.aggregator.privacy(self.delta) is not None:
            rec["server_epsilon"] = self.server.aggregator.privacy(self.delta)["epsilon"]
        rec["seconds"] = time.perf_counter() - self._round_start
        self.rounds.append(rec)
        self._pending = {}
        return rec


def _weighted_mean(pairs) -> float | None:
    good = [(n, float(v)) for n, v in pairs if _finite_number(v)]
    total = sum(n for n, _ in good)
    return sum(n * v for n, v in good) / total if total else None

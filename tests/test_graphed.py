"""GraphedAccumulator: padded fixed-shape micro-batches equal the eager accumulate; host-read detection.

The padding, masking and bookkeeping run eagerly on the CPU (graph=False: the same code a CUDA graph
captures); the capture itself is checked against the eager path on CUDA (marked, skipped without one).
"""

import collections
import itertools
import logging
import os
import traceback

import pytest
import torch
from torch import nn

import fedlora_fast as ff
from fedlora_fast.ops import backends
from fedlora_fast.privacy import dpsgd
from fedlora_fast.privacy.graphed import GraphedAccumulator, find_host_reads, plan_micro_batches
from fedlora_fast.testing import StandInCudaGraphs, assert_close_verbose, spy_kept_weight

IN, HID, OUT, R = 7, 6, 3, 3


pytestmark = pytest.mark.usefixtures("reference_backend")


def make_model(seed=0, device="cpu", train_A=False):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, OUT)).to(device)
    ff.inject_adapters(model, ["0"], r=R, alpha=6.0, seed=seed, trainable_modules=["2"], train_A=train_A)
    with torch.no_grad():
        model[0].lora_B.normal_(0, 0.5)
    return model


def make_dp(model, **kw):
    kw = {"max_grad_norm": 1.0, "noise_multiplier": 0.0, "expected_batch_size": 4, **kw}
    return ff.DPSGD(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0), **kw)


def make_batch(n, T=5, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return {"x": 2 * torch.randn(n, T, IN, generator=g).to(device), "y": torch.randn(n, T, OUT, generator=g).to(device)}


def per_sample_loss(model, batch):
    return ((model(batch["x"]) - batch["y"]) ** 2).flatten(1).sum(1)


def eager_sum(batch, sizes, clipping, reduction="sum", train_A=False, **kw):
    """The reference: plain micro-batches through loss.backward(); dp.accumulate()."""
    model = make_model(train_A=train_A)
    dp = make_dp(model, clipping=clipping, **kw)
    start = 0
    for s in sizes:
        mb = {k: v[start : start + s] for k, v in batch.items()}
        start += s
        losses = per_sample_loss(model, mb)
        (losses.sum() if reduction == "sum" else losses.sum() / dp.expected_batch_size).backward()
        dp.accumulate()
    return torch.cat([t.flatten() for t in dp.clipped_sum()]), dp


def graphed_sum(batches, b, clipping, reduction="sum", train_A=False, **kw):
    model = make_model(train_A=train_A)
    dp = make_dp(model, clipping=clipping, **kw)
    acc = GraphedAccumulator(dp, per_sample_loss, micro_batch_size=b, reduction=reduction, graph=False)
    counts = [acc.accumulate(batch) for batch in batches]
    return torch.cat([t.flatten() for t in dp.clipped_sum()]), dp, counts


class _FakeCuda:
    """Graph mode on the CPU: ``StandInCudaGraphs`` whose replay reruns the accumulator's captured work into
    the captured outputs in place, as a real replay rewrites its output memory."""

    def __init__(self):
        self.acc = None
        self.stand_ins = StandInCudaGraphs(replay=self._replay)

    def _replay(self, graph):
        slot = next(s for s in self.acc._slots.values() if s.graph is graph)
        for out, new in zip(slot.out, self.acc._device_work(slot)):
            out.copy_(new)

    @property
    def captures(self):
        return self.stand_ins.captures

    @property
    def capturing(self):
        return self.stand_ins.capturing

    def accumulator(self, dp, loss, **kw):
        acc = GraphedAccumulator(dp, loss, graph=False, **kw)
        acc.graph = True  # graph mode on the CPU: only through these stand-ins
        self.acc = acc
        return acc


@pytest.fixture
def fake():
    """``_FakeCuda`` for one test: torch.cuda's graph API is the stand-ins' inside it, the real one after."""
    f = _FakeCuda()
    with f.stand_ins:
        yield f


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("n, b", [(7, 3), (2, 5), (6, 6), (1, 4)])
@pytest.mark.parametrize("train_A", [False, True], ids=["ffa", "lora"])
def test_padded_micro_batches_equal_the_eager_accumulate(clipping, n, b, train_A, monkeypatch):
    monkeypatch.setitem(dpsgd.GROUPED_CLIP_REDUCE, "cpu", True)  # CUDA's grouped clip-reduce
    batch = make_batch(n)
    want, _ = eager_sum(batch, [n], clipping, train_A=train_A)
    got, dp, counts = graphed_sum([batch], b, clipping, train_A=train_A)
    assert counts == [n]
    assert dp._pending_samples == n and dp._pending_batches == -(-n // b), "padding rows are not samples"
    assert_close_verbose(got, want, atol=1e-5, rtol=1e-5, name="clipped sum")
    dp.step()
    assert dp.last_step_samples == n and dp.samples_dropped == 0


def _best_cover(n, sizes, c):
    """Brute force: every count of each size that covers n with at most one micro-batch not full; the least
    (rows + c * replays, replays)."""
    best = None
    for counts in itertools.product(*(range(n // s + 2) for s in sizes)):
        used = [s for s, k in zip(sizes, counts) for _ in range(k)]
        rows = sum(used)
        if rows < n or (used and rows - min(used) >= n):  # short, or a whole micro-batch of padding
            continue
        key = (rows + c * len(used), len(used))
        best = key if best is None or key < best else best
    return best


@pytest.mark.parametrize("sizes", [(3,), (4, 1), (16, 8, 4, 2, 1), (5, 3), (6, 4)])
@pytest.mark.parametrize("c", [0.0, 1.0, 2.5])
def test_plan_is_the_cheapest_cover(sizes, c):
    for n in range(0, 21):
        plan = plan_micro_batches(n, sizes, c)
        assert sum(plan) >= n and all(s in sizes for s in plan), (n, plan)
        assert sum(plan[:-1]) < n or n == 0, f"only the last micro-batch may hold padding: {n} -> {plan}"
        assert plan[:-1] == sorted(plan[:-1], reverse=True)
        if n:
            assert (sum(plan) + c * len(plan), len(plan)) == _best_cover(n, sizes, c), (n, plan)
    assert plan_micro_batches(0, sizes, c) == []


def test_plan_examples_and_errors():
    pow2 = (16, 8, 4, 2, 1)
    assert plan_micro_batches(13, pow2) == [8, 4, 1]  # 13 rows + 3 replays < 16 + 1
    assert plan_micro_batches(15, pow2) == [16]  # 16 + 1 < 15 + 4
    assert plan_micro_batches(15, pow2, replay_cost=0.2) == [8, 4, 2, 1]  # 15.8 < 16.2
    assert plan_micro_batches(40, pow2) == [16, 16, 8]
    assert plan_micro_batches(7, (3,)) == [3, 3, 3]
    model = make_model()
    acc = GraphedAccumulator(make_dp(model), per_sample_loss, micro_batch_size=[2, 8, 4, 8])
    assert acc.micro_batch_sizes == (8, 4, 2) and acc.micro_batch_size == 8
    assert acc.plan(7) == [8] and acc.plan(6) == [4, 2] and acc.plan(0) == []  # 8 + 1 < 8 + 2; 6 + 2 < 8 + 1
    for bad in ([], (4, 0), (2.0,), (True,), "4"):
        with pytest.raises(ValueError, match="micro_batch_size: expected a positive int or a non-empty sequence"):
            GraphedAccumulator(make_dp(model), per_sample_loss, micro_batch_size=bad)
    for bad in (-1, float("inf"), float("nan"), None):
        with pytest.raises(ValueError, match="replay_cost: expected a finite number >= 0"):
            GraphedAccumulator(make_dp(model), per_sample_loss, micro_batch_size=4, replay_cost=bad)
    with pytest.raises(ValueError, match="n: expected an int >= 0"):
        acc.plan(-1)
    with pytest.raises(ValueError, match="n: expected an int >= 0"):
        plan_micro_batches(2.0, pow2)
    with pytest.raises(ValueError, match="micro_batch_size: expected a positive int or a non-empty sequence"):
        plan_micro_batches(3, (4, 0))
    with pytest.raises(ValueError, match="replay_cost: expected a finite number >= 0"):
        plan_micro_batches(3, pow2, replay_cost=-1)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("n", [1, 6, 7, 13])
def test_several_micro_batch_sizes_equal_the_eager_accumulate(clipping, n):
    batch = make_batch(n, seed=n)
    want, _ = eager_sum(batch, [n], clipping)
    model = make_model()
    dp = make_dp(model, clipping=clipping)
    acc = GraphedAccumulator(dp, per_sample_loss, micro_batch_size=(4, 2, 1), graph=False)
    assert acc.accumulate(batch) == n
    plan = acc.plan(n)
    assert dp._pending_samples == n and dp._pending_batches == len(plan)
    assert sorted(acc._slots) == sorted(set(plan)), "a size's buffers exist once it is used"
    got = torch.cat([t.flatten() for t in dp.clipped_sum()])
    assert_close_verbose(got, want, atol=1e-5, rtol=1e-5, name=f"clipped sum, plan {plan}")
    dp.step()
    assert dp.last_step_samples == n


def test_mean_reduction_divides_by_the_expected_batch_size_however_it_is_split():
    """reduction="mean" weighs each sample 1/m, m the engine's expected batch size (fixed): never 1/n for the
    batch's actual n, which would let one sample rescale every other's gradient (the step's sum could move by
    ~2C without it). The split (which a speed setting, replay_cost, decides) must not change it either."""
    batch = make_batch(7)
    want, dp0 = eager_sum(batch, [7], "flat", reduction="mean", max_grad_norm=100.0)
    m = dp0.expected_batch_size
    assert m != 7, "the test needs a batch whose size is not the expected one"
    want_loss = float(per_sample_loss(make_model(), batch).sum()) / m
    for sizes, cost in ((3, 1.0), ((4, 2, 1), 0.0), ((8, 4, 2, 1), 1.0)):
        model = make_model()
        dp = make_dp(model, max_grad_norm=100.0)
        acc = GraphedAccumulator(dp, per_sample_loss, micro_batch_size=sizes, replay_cost=cost, reduction="mean", graph=False)
        acc.accumulate(batch)
        got = torch.cat([t.flatten() for t in dp.clipped_sum()])
        assert_close_verbose(got, want, atol=1e-5, rtol=1e-5, name=f"clipped sum (mean), plan {acc.plan(7)}")
        assert float(acc.last_loss) == pytest.approx(want_loss, rel=1e-5)
    # leave one out: with the fixed divisor the sum moves by at most C when a sample is removed
    C = 0.5
    sums = []
    for drop in (None, 3):
        b = batch if drop is None else {k: torch.cat([v[:drop], v[drop + 1 :]]) for k, v in batch.items()}
        model = make_model()
        dp = make_dp(model, max_grad_norm=C)
        GraphedAccumulator(dp, per_sample_loss, micro_batch_size=4, reduction="mean", graph=False).accumulate(b)
        sums.append(torch.cat([t.flatten().double() for t in dp.clipped_sum()]))
    assert float((sums[0] - sums[1]).norm()) <= C * (1 + 1e-5)


def test_an_eager_failure_inside_a_backward_leaves_no_per_sample_state():
    """graph=False: a backward that fails after the adapters stored their per-sample state (here a hook on
    the input, which runs last) must not leave it for a later dp.step() to clip without the padding mask."""
    from fedlora_fast import per_sample

    model = make_model()
    dp = make_dp(model)

    def loss(model, mb):
        if mb["x"].shape[0] == 1:  # the plan's second micro-batch
            x = mb["x"].clone().requires_grad_()
            x.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("backward failed late")))
            return ((model(x) - mb["y"]) ** 2).flatten(1).sum(1)
        return per_sample_loss(model, mb)

    acc = GraphedAccumulator(dp, loss, micro_batch_size=(4, 1), replay_cost=0.0, graph=False)
    with pytest.raises(RuntimeError, match="backward failed late"):
        acc.accumulate(make_batch(5))
    assert not any(per_sample.has_state(p) for p in dp.params)
    assert dp._pending_samples == 0 and dp._summed is None


def test_a_failure_part_way_leaves_nothing_in_the_engine(fake):
    """Plan [4, 1]: the 1-row capture fails after the 4-row micro-batch ran. Nothing of the batch may stay in
    the step (a retry, e.g. with graph=False as the error suggests, would clip those samples twice)."""
    model = make_model()
    dp = make_dp(model)

    def loss(model, mb):
        if fake.capturing and mb["x"].shape[0] == 1:
            raise RuntimeError("operation not permitted when stream is capturing")
        return per_sample_loss(model, mb)

    acc = fake.accumulator(dp, loss, micro_batch_size=(4, 1), replay_cost=0.0)
    batch = make_batch(5)
    assert acc.plan(5) == [4, 1]
    with pytest.raises(RuntimeError, match="capture of loss_fn's forward/backward failed"):
        acc.accumulate(batch)
    assert dp._pending_samples == 0 and dp._pending_batches == 0 and dp._summed is None
    retry = GraphedAccumulator(dp, per_sample_loss, micro_batch_size=(4, 1), graph=False)
    assert retry.accumulate(batch) == 5 and dp._pending_samples == 5
    want, _ = eager_sum(batch, [5], "flat")
    assert_close_verbose(torch.cat([t.flatten() for t in dp.clipped_sum()]), want, atol=1e-5, rtol=1e-5, name="retry")


def test_eval_mode_or_a_merge_after_the_capture_is_refused(fake):
    """train/eval (dropout) and an adapter's merge are Python-level switches a replay would not see."""
    model = make_model()
    acc = fake.accumulator(make_dp(model), per_sample_loss, micro_batch_size=4)
    acc.accumulate(make_batch(3))
    acc.dp.step()
    acc.dp.zero_grad()
    model.eval()
    with pytest.raises(ValueError, match=r"changed since the CUDA graph was captured.*0\.training: True -> False"):
        acc.accumulate(make_batch(3))
    model.train()
    acc.accumulate(make_batch(3))
    acc.dp.step()
    acc.dp.zero_grad()
    model[0].merge()
    with pytest.raises(ValueError, match=r"0\.merged: False -> True"):
        acc.accumulate(make_batch(3))
    model[0].unmerge()
    acc.accumulate(make_batch(3))


def _refused_then_accepted(acc, change, undo, match):
    change()
    with pytest.raises(ValueError, match=match):
        acc._check_captured()
    undo()
    acc._check_captured()


def test_a_cached_base_weight_changed_after_a_capture_is_refused(fake, monkeypatch):
    """FEDLORA_FAST_KEEP_MERGED=cache in a capture (the Triton ops on the CPU, the capture stood in for): a
    replay re-checks B and A but never the base weight W. B changing in place between replays is what the
    cache is for (accepted, and replayed right); W changed through a version-bumping op afterwards is refused,
    naming the cache, where the plain fingerprint (memory only) would have let the replay go on with the old
    W's W'."""
    from fedlora_fast.kernels import ffa_linear as K

    monkeypatch.setenv(backends.ENV_VAR, "triton")
    monkeypatch.setenv(K.KEEP_ENV_VAR, "cache")
    monkeypatch.delenv(K.GEMM_ENV_VAR, raising=False)
    backends.clear_cache()
    if backends._probe("triton", "cpu")[0] is None:
        pytest.skip(f"triton backend unavailable: {backends._probe('triton', 'cpu')[1]}")
    monkeypatch.setattr(K, "_capturing", lambda device: fake.capturing)
    K.clear_merged_cache()
    model = make_model()
    acc = fake.accumulator(make_dp(model), per_sample_loss, micro_batch_size=4)
    acc.accumulate(make_batch(3))
    acc.dp.step()  # B changes in place
    acc.dp.zero_grad()
    assert fake.captures and any(e.captured for e in K._MERGED_CACHE.values())
    ref_model = make_model()
    ref_model.load_state_dict(model.state_dict())  # the stepped B, eagerly
    ref_dp = make_dp(ref_model)
    per_sample_loss(ref_model, make_batch(3, seed=2)).sum().backward()
    ref_dp.accumulate()
    want = torch.cat([t.flatten() for t in ref_dp.clipped_sum()])
    got = acc.accumulate(make_batch(3, seed=2))  # a replay after B changed: fine
    sums = torch.cat([t.flatten() for t in acc.dp.clipped_sum()])
    assert got == 3
    assert_close_verbose(sums, want, atol=1e-5, rtol=1e-5, name="clipped sum after B changed")
    acc.dp.zero_grad()
    with torch.no_grad():
        model[0].weight.add_(0.125)
    with pytest.raises(ValueError, match="FEDLORA_FAST_KEEP_MERGED=cache"):
        acc._check_captured()
    # still refused once the captured entry left the cache (a replay writes into the buffers it captured):
    # an eval forward (a new W' for the new W), then the cache cleared
    with torch.no_grad():
        model(make_batch(2)["x"])
    assert not any(e.captured for e in K._MERGED_CACHE.values())
    with pytest.raises(ValueError, match="FEDLORA_FAST_KEEP_MERGED=cache"):
        acc._check_captured()
    K.clear_merged_cache()
    with pytest.raises(ValueError, match="FEDLORA_FAST_KEEP_MERGED=cache"):
        acc._check_captured()
    # a new accumulator on the changed model captures the new W': accepted
    acc2 = fake.accumulator(make_dp(model), per_sample_loss, micro_batch_size=4)
    acc2.accumulate(make_batch(3))
    acc2._check_captured()
    K.clear_merged_cache()


def test_settings_hooks_and_requires_grad_changed_after_a_capture_are_refused(fake):
    """A replay runs no Python: an adapter's scale, a dropout probability, a peft-style settings dict, a
    parameter's requires_grad, a hook added to a module or globally would all be ignored by the replay (the
    old computation, silently). Each is refused with its name, and accepted again once restored; the
    engine's own hooks (a rebound engine's are new) are not the model's."""
    model = make_model()
    model[2].scaling = {"default": 2.0}  # as peft's LoRA layers hold it
    model[2].counts = collections.defaultdict(int)  # a container whose constructor takes no copy
    acc = fake.accumulator(make_dp(model), per_sample_loss, micro_batch_size=4)
    acc.accumulate(make_batch(3))
    acc.dp.step()
    acc.dp.zero_grad()
    layer = model[0]
    _refused_then_accepted(acc, lambda: setattr(layer, "scale", 4.0), lambda: setattr(layer, "scale", 2.0),
                           r"0\.scale: 2\.0 -> 4\.0")
    layer.dropout = nn.Dropout(0.1)  # a new submodule
    with pytest.raises(ValueError, match=r"0: submodules changed"):
        acc._check_captured()
    layer.dropout = acc._modules[acc._module_names.index("0.dropout")]
    acc._check_captured()
    model[2].scaling["default"] = 3.0
    with pytest.raises(ValueError, match=r"2\.scaling: \{'default': 2\.0\} -> \{'default': 3\.0\}"):
        acc._check_captured()
    model[2].scaling["default"] = 2.0
    acc._check_captured()
    model[2].counts["x"] += 1
    with pytest.raises(ValueError, match=r"2\.counts: \{\} -> defaultdict"):
        acc._check_captured()
    del model[2].counts["x"]
    acc._check_captured()
    _refused_then_accepted(acc, lambda: layer.lora_B.requires_grad_(False), lambda: layer.lora_B.requires_grad_(True),
                           r"0: parameters \(memory, requires_grad\) changed")
    handle = None

    def add_hook():
        nonlocal handle
        handle = model[1].register_forward_hook(lambda m, i, o: o * 2)

    _refused_then_accepted(acc, add_hook, lambda: handle.remove(), r"1: hooks changed")

    def add_global():
        nonlocal handle
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)

    _refused_then_accepted(acc, add_global, lambda: handle.remove(), "a global module hook was added or removed")
    del layer.train_A  # a setting deleted
    with pytest.raises(ValueError, match=r"0\.train_A: False -> <object"):
        acc._check_captured()
    layer.train_A = False
    old = acc.dp
    old.detach()
    acc.rebind(make_dp(model))  # new engine hooks on the model: not a change of the captured computation
    acc.accumulate(make_batch(3))
    assert acc.dp is not old


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("bad_row", [0, 2])
def test_non_finite_sample_dropped_once_even_when_it_pads(clipping, bad_row, caplog):
    """Row 0 of a short micro-batch is copied into its padding: a NaN there must be dropped (and counted)
    once, and its padded copies must neither poison the sum nor count."""
    batch = make_batch(3)
    batch["x"][bad_row, 1, 0] = float("nan")
    keep = [i for i in range(3) if i != bad_row]
    want, _ = eager_sum({k: v[keep] for k, v in batch.items()}, [2], clipping)
    with caplog.at_level(logging.WARNING, logger="fedlora_fast.privacy.dpsgd"):
        got, dp, _ = graphed_sum([batch], 8, clipping)
        dp.step()
    assert torch.isfinite(got).all()
    assert_close_verbose(got, want, atol=1e-5, rtol=1e-5, name="clipped sum without the NaN sample")
    assert dp.samples_dropped == 1 and dp.last_step_samples == 3
    assert "dropped 1 of 3" in caplog.text


def test_padding_repeats_a_real_sample_so_the_loss_stays_finite():
    """A loss undefined at all-zero inputs (here: normalised by the input's size) stays finite, because
    the padding rows are copies of a real sample (zero rows would give 0 * nan = nan in the weighted sum)."""
    model = make_model()
    dp = make_dp(model)

    def loss(model, mb):
        return per_sample_loss(model, mb) / mb["x"].abs().flatten(1).sum(1)

    acc = GraphedAccumulator(dp, loss, micro_batch_size=5, graph=False)
    batch = make_batch(2)
    acc.accumulate(batch)
    want = loss(model, batch).sum()
    dp.zero_grad()
    assert_close_verbose(acc.last_loss, want.detach(), atol=1e-5, rtol=1e-5, name="weighted loss")


def test_an_infinite_first_loss_is_reported_as_inf_not_nan():
    """Padding rows copy the micro-batch's first sample: with its loss inf, 0 * inf in the padding would make
    the reported loss NaN (the client's train_loss metric). The padding is masked out: the loss is inf, the
    sample is dropped as non-finite, the other sample's clipped gradient is kept."""
    model = make_model()
    dp = make_dp(model)

    def loss(model, mb):  # inf where x[:, 0, 0] == 200 (only there)
        return per_sample_loss(model, mb) / (mb["x"][:, 0, 0] - 200.0).abs()

    batch = make_batch(2)
    batch["x"][0, 0, 0] = 200.0
    acc = GraphedAccumulator(dp, loss, micro_batch_size=4, graph=False)
    assert acc.accumulate(batch) == 2
    assert acc.last_loss.item() == float("inf")
    dp_ok = make_dp(make_model())
    GraphedAccumulator(dp_ok, loss, micro_batch_size=1, graph=False).accumulate({k: v[1:] for k, v in batch.items()})
    want = torch.cat([t.flatten() for t in dp_ok.clipped_sum()])
    assert want.abs().sum() > 0
    assert_close_verbose(torch.cat([t.flatten() for t in dp.clipped_sum()]), want, atol=1e-6, rtol=1e-6, name="sum")
    dp.step()
    assert dp.samples_dropped == 1


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_clip_batch_valid_mask_excludes_rows_that_have_gradients(clipping):
    """Defence in depth: rows marked invalid add nothing and are not counted even when their gradients are
    not zero (the loss weight 0 normally makes them zero)."""
    batch = make_batch(4)
    batch["x"][3, 0, 0] = float("inf")
    valid = torch.tensor([True, False, True, False])
    want, _ = eager_sum({k: v[[0, 2]] for k, v in batch.items()}, [2], clipping)
    model = make_model()
    dp = make_dp(model, clipping=clipping)
    per_sample_loss(model, batch).sum().backward()
    clipped, dropped, n = dp._clip_batch(valid)
    assert n == 4 and int(dropped) == 0
    if clipping == "flat":  # per-layer clipping sums inside the backward: there the loss weight is the guard
        assert_close_verbose(clipped, want, atol=1e-5, rtol=1e-5, name="clipped sum over valid rows")
    with pytest.raises(ValueError, match=r"valid: expected a \(4,\) bool mask"):
        per_sample_loss(model, batch).sum().backward()
        dp._clip_batch(valid.float())


def test_several_batches_and_an_empty_one():
    a, b = make_batch(5, seed=3), make_batch(2, seed=4)
    both = {k: torch.cat([a[k], b[k]]) for k in a}
    want, _ = eager_sum(both, [7], "flat")
    empty = {k: v[:0] for k, v in a.items()}
    got, dp, counts = graphed_sum([a, empty, b], 4, "flat")
    assert counts == [5, 0, 2] and dp._pending_samples == 7
    assert_close_verbose(got, want, atol=1e-5, rtol=1e-5, name="clipped sum")
    # an empty batch is checked like any other: a wrong per-sample shape is the caller's bug even at n = 0
    acc = GraphedAccumulator(make_dp(make_model()), per_sample_loss, micro_batch_size=4, graph=False)
    assert acc.accumulate(empty) == 0
    with pytest.raises(ValueError, match="tensor 0 has per-sample shape"):
        acc.accumulate({"x": torch.zeros(0, 6, IN), "y": torch.zeros(0, 5, OUT)})
    with pytest.raises(ValueError, match="batch: 1 tensors, the first batch had 2"):
        acc.accumulate({"x": torch.zeros(0, 5, IN)})
    with pytest.raises(ValueError, match="tensor 0 has per-sample shape"):  # (a first, non-empty batch too)
        acc.accumulate({"x": torch.zeros(3, 6, IN), "y": torch.zeros(3, 5, OUT)})


def test_length_buckets_one_accumulator_each_on_one_engine():
    """Two padded lengths, two accumulators, one engine and one step: the sum of both eager accumulates."""
    short, long = make_batch(3, T=2, seed=5), make_batch(4, T=6, seed=6)
    model = make_model()
    dp = make_dp(model)
    for b in (short, long):
        per_sample_loss(model, b).sum().backward()
        dp.accumulate()
    want = torch.cat([t.flatten() for t in dp.clipped_sum()])
    dp.zero_grad()
    buckets = {T: GraphedAccumulator(dp, per_sample_loss, micro_batch_size=4, graph=False) for T in (2, 6)}
    assert buckets[2].accumulate(short) == 3 and buckets[6].accumulate(long) == 4
    assert dp._pending_samples == 7
    assert_close_verbose(torch.cat([t.flatten() for t in dp.clipped_sum()]), want, atol=1e-5, rtol=1e-5, name="sum")
    dp.step()


def test_tuple_batches_and_non_tensor_leaves():
    batch = make_batch(3)
    model = make_model()
    dp = make_dp(model)
    seen = []

    def loss(model, mb):
        x, y, tag = mb
        seen.append(tag)
        return ((model(x) - y) ** 2).flatten(1).sum(1)

    acc = GraphedAccumulator(dp, loss, micro_batch_size=2, graph=False)
    assert acc.accumulate((batch["x"], batch["y"], "t")) == 3
    assert seen == ["t", "t"]
    with pytest.raises(ValueError, match="non-tensor values differ"):
        acc.accumulate((batch["x"], batch["y"], "other"))


def test_bad_inputs_raise_clear_errors():
    model = make_model()
    dp = make_dp(model)
    with pytest.raises(ValueError, match="micro_batch_size: expected a positive int or a non-empty sequence of them, got 0"):
        GraphedAccumulator(dp, per_sample_loss, micro_batch_size=0)
    with pytest.raises(ValueError, match="reduction"):
        GraphedAccumulator(dp, per_sample_loss, micro_batch_size=2, reduction="max")
    with pytest.raises(ValueError, match="graph: CUDA graphs need the engine's parameters on CUDA"):
        GraphedAccumulator(dp, per_sample_loss, micro_batch_size=2, graph=True)
    with pytest.raises(TypeError, match="dp: expected a DPSGD"):
        GraphedAccumulator(object(), per_sample_loss, micro_batch_size=2)
    acc = GraphedAccumulator(dp, per_sample_loss, micro_batch_size=2)
    assert acc.graph is False, "graph=None is off on the CPU"
    acc.accumulate(make_batch(3, T=5))
    with pytest.raises(ValueError, match=r"tensor 0 has per-sample shape \(4, 7\) torch.float32, expected \(5, 7\)"):
        acc.accumulate(make_batch(3, T=4))
    with pytest.raises(ValueError, match="disagree on the number of samples"):
        acc.accumulate({"x": torch.zeros(3, 5, IN), "y": torch.zeros(2, 5, OUT)})
    dp.zero_grad()
    summed = GraphedAccumulator(dp, lambda m, mb: per_sample_loss(m, mb).sum(), micro_batch_size=2)
    with pytest.raises(ValueError, match=r"loss_fn: expected \(2,\) per-sample losses"):
        summed.accumulate(make_batch(3))


def test_replaced_parameters_are_refused_after_a_capture():
    """A captured graph reads the parameters' memory: a parameter replaced by another tensor (not copied
    into) must be refused, in-place updates (optimizers, load_state_dict) accepted. The check itself, with
    the capture's snapshot taken by hand (CUDA graphs need a GPU)."""
    model = make_model()
    acc = GraphedAccumulator(make_dp(model), per_sample_loss, micro_batch_size=2)
    acc._snapshot()
    with torch.no_grad():
        model[0].lora_B.add_(1.0)
    model.load_state_dict(model.state_dict())
    acc._check_captured()
    bias = model[2].bias.data
    model[2].bias.data = bias.clone()
    with pytest.raises(ValueError, match=r"model: changed .*\['2.bias'\] replaced by other tensors"):
        acc._check_captured()
    model[2].bias.data = bias
    acc._check_captured()
    model[2].bias = nn.Parameter(bias.clone())  # a new Parameter object
    with pytest.raises(ValueError, match=r"model: changed .*\['2.bias'\] replaced"):
        acc._check_captured()
    model[2].bias = nn.Parameter(bias)  # the same memory again: nothing the graph reads has moved
    acc._check_captured()
    model[1] = nn.Tanh()  # a submodule replaced (no tensors of its own)
    with pytest.raises(ValueError, match=r"\(the model\): submodules changed"):
        acc._check_captured()


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_changed_clipping_thresholds_are_refused_after_a_capture(clipping, fake):
    """The captured clipping baked C (and the per-layer thresholds) in; the noise follows the engine's
    current C. Replaying after C changed would clip with the old threshold: refused (privacy, not speed)."""
    model = make_model()
    dp = make_dp(model, clipping=clipping)
    acc = fake.accumulator(dp, per_sample_loss, micro_batch_size=4)
    acc.accumulate(make_batch(3))
    dp.step()
    dp.zero_grad()
    if clipping == "flat":
        dp.max_grad_norm = 0.5
    else:  # the same thresholds, swapped between tensors
        dp._set_per_layer([0.1 * (i + 1) for i in range(len(dp.params))])
        acc._captured_clipping = acc._clipping()
        dp._set_per_layer([0.1 * (len(dp.params) - i) for i in range(len(dp.params))])
    with pytest.raises(ValueError, match="dp: clipping changed since the CUDA graph was captured"):
        acc.accumulate(make_batch(3))
    make_dp(model)  # a new engine on the model detaches this one
    with pytest.raises(ValueError, match="dp: this engine is no longer attached to its model"):
        acc.accumulate(make_batch(3))


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_graph_mode_control_flow_with_stand_ins(clipping, fake):
    """Warm-ups, the read-back probe and one capture, then replays whose outputs are copied before the engine
    keeps them (several micro-batches per step: kept without a copy, the first would be overwritten)."""
    calls = []

    def loss(model, mb):
        calls.append(1)
        return per_sample_loss(model, mb)

    batches = [make_batch(7, seed=3), make_batch(2, seed=4)]
    model, twin = make_model(), make_model()  # the twin steps through the eager path (checked above)
    dp, dp_twin = make_dp(model, clipping=clipping), make_dp(twin, clipping=clipping)
    acc = fake.accumulator(dp, loss, micro_batch_size=3, warmup=2)
    eager = GraphedAccumulator(dp_twin, per_sample_loss, micro_batch_size=3, graph=False)
    for batch in batches:
        acc.accumulate(batch)
        eager.accumulate(batch)
        got, want = (torch.cat([t.flatten() for t in d.clipped_sum()]) for d in (dp, dp_twin))
        assert_close_verbose(got, want, atol=1e-6, rtol=1e-6, name="sum")
        for d in (dp, dp_twin):
            d.step()
            d.zero_grad()
    assert fake.captures == 1 and acc.replays == 3 + 1
    assert len(calls) == 2 + 1 + 1 + acc.replays  # warm-ups, probe, capture, one per replay
    model[2].weight.data = model[2].weight.data.clone()
    with pytest.raises(ValueError, match=r"model: changed .*\['2.weight'\] replaced by other tensors"):
        acc.accumulate(batches[1])


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_graph_mode_captures_each_size_once_when_first_needed(clipping, fake):
    """Sizes (4, 2, 1): a batch of 7 runs as 4 + 4 (one capture; one row padded saves a replay), 6 as 4 + 2
    (a second), 5 as 4 + 1 (a third), 8 as 4 + 4 (none); each replay rewrites only its own graph's outputs;
    sums equal an eager twin's."""
    model, twin = make_model(), make_model()
    dp, dp_twin = make_dp(model, clipping=clipping), make_dp(twin, clipping=clipping)
    acc = fake.accumulator(dp, per_sample_loss, micro_batch_size=(4, 2, 1))
    eager = GraphedAccumulator(dp_twin, per_sample_loss, micro_batch_size=(4, 2, 1), graph=False)
    captures, replays = [], []
    for seed, n in enumerate((7, 6, 5, 8)):
        batch = make_batch(n, seed=seed)
        acc.accumulate(batch)
        eager.accumulate(batch)
        captures.append(fake.captures)
        replays.append(acc.replays)
        got, want = (torch.cat([t.flatten() for t in d.clipped_sum()]) for d in (dp, dp_twin))
        assert_close_verbose(got, want, atol=1e-6, rtol=1e-6, name=f"sum of {n}, plan {acc.plan(n)}")
        for d in (dp, dp_twin):
            d.step()
            d.zero_grad()
    assert [acc.plan(n) for n in (7, 6, 5, 8)] == [[4, 4], [4, 2], [4, 1], [4, 4]]
    assert captures == [1, 2, 3, 3] and replays == [2, 4, 6, 8]
    assert acc._captured and all(slot.graph is not None for slot in acc._slots.values())


def test_rebind_feeds_a_new_engine_from_the_same_capture(fake):
    """A federated client's next round: a new engine (fresh optimizer, same model and clipping) takes over
    the capture; sums equal an eager twin's; another model, other tensors or other clipping are refused."""
    model, twin = make_model(), make_model()
    acc = fake.accumulator(make_dp(model), per_sample_loss, micro_batch_size=3)
    eager = GraphedAccumulator(make_dp(twin), per_sample_loss, micro_batch_size=3, graph=False)
    for rnd in range(2):
        if rnd:
            acc.dp.detach()
            acc.rebind(make_dp(model))
            eager.rebind(make_dp(twin))
        for seed in (3, 4):
            batch = make_batch(5, seed=seed + 10 * rnd)
            acc.accumulate(batch)
            eager.accumulate(batch)
            got, want = (torch.cat([t.flatten() for t in a.dp.clipped_sum()]) for a in (acc, eager))
            assert_close_verbose(got, want, atol=1e-6, rtol=1e-6, name=f"round {rnd} sum")
            for a in (acc, eager):
                a.dp.step()
                a.dp.zero_grad()
    assert fake.captures == 1
    with pytest.raises(ValueError, match="only move to an engine on the same model"):
        acc.rebind(make_dp(twin))
    with pytest.raises(ValueError, match="dp: clips differently"):
        acc.rebind(make_dp(model, max_grad_norm=0.5))


def test_graph_mode_refuses_read_backs_and_cleans_up_a_failed_capture(fake):
    model = make_model()
    dp = make_dp(model)

    def reading(model, mb):
        out = per_sample_loss(model, mb)
        return out * (2.0 if float(out.detach().max()) > 0 else 1.0)

    with pytest.raises(ValueError, match=r"reads device values back.*_local_scalar_dense.*test_graphed.py"):
        fake.accumulator(dp, reading, micro_batch_size=4).accumulate(make_batch(3))
    dp.zero_grad()

    def fail_mid_backward(grad):  # after the head's backward (its per-sample state is set), before layer 0's
        raise RuntimeError("operation not permitted when stream is capturing")

    def failing(model, mb):
        h = model[0](mb["x"])
        if fake.capturing:
            h.register_hook(fail_mid_backward)
        return ((model[2](model[1](h)) - mb["y"]) ** 2).flatten(1).sum(1)

    acc = fake.accumulator(dp, failing, micro_batch_size=4)
    with pytest.raises(RuntimeError, match="capture of loss_fn's forward/backward failed.*graph=False"):
        acc.accumulate(make_batch(3))
    assert all(slot.graph is None for slot in acc._slots.values()) and not acc._captured
    # nothing left behind: the engine works eagerly right after
    per_sample_loss(model, make_batch(3)).sum().backward()
    dp.step()


def test_find_host_reads_names_the_op_and_the_line():
    x = torch.randn(4)

    def reads():
        if (x > 0).any():  # bool(): a read-back
            return x.sum().item()

    found = find_host_reads(reads)
    assert [op for op, _ in found] == ["aten.is_nonzero.default", "aten._local_scalar_dense.default"] or all(
        op == "aten._local_scalar_dense.default" for op, _ in found
    ), found
    assert all("test_graphed.py" in at and "reads" in at for _, at in found), found
    assert find_host_reads(lambda: (x * 2).sum()) == []
    # boolean-mask indexing and tensor repeats read a size back inside one aten op
    mask, reps = x > 0, torch.tensor([1, 2, 0, 1])
    assert [op for op, _ in find_host_reads(lambda: x[mask])] == ["aten.index.Tensor"]
    assert [op for op, _ in find_host_reads(lambda: x.clone().__setitem__(mask, 0.0))] == ["aten.index_put_.default"]
    assert [op for op, _ in find_host_reads(lambda: torch.repeat_interleave(x, reps))] == ["aten.repeat_interleave.Tensor"]
    assert find_host_reads(lambda: x[torch.tensor([0, 2])]) == [], "integer indices read nothing back"
    assert find_host_reads(lambda: torch.repeat_interleave(x, reps, output_size=4)) == []
    # restricted to one device type: a read of a CPU tensor does not stop a CUDA capture
    assert find_host_reads(reads, device_type="cuda") == []
    assert find_host_reads(reads, device_type="cpu") == found


def test_find_host_reads_sees_cuda_syncs_and_rng_state_reads(monkeypatch):
    """torch.cuda.synchronize and get_rng_state (activation checkpointing's saved RNG state) show no aten op;
    the probe records them too (stand-ins here: this box has no CUDA), and not for a CPU-only capture."""
    calls = []

    def sync(*a, **k):
        calls.append("sync")

    monkeypatch.setattr(torch.cuda, "synchronize", sync)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a, **k: calls.append("rng") or torch.zeros(8, dtype=torch.uint8))

    def user_code():
        torch.cuda.get_rng_state()
        torch.cuda.synchronize()

    found = find_host_reads(user_code, device_type="cuda")
    assert [op for op, _ in found] == ["torch.cuda.get_rng_state", "torch.cuda.synchronize"], found
    assert all("test_graphed.py" in at and "user_code" in at for _, at in found), found
    assert calls == ["rng", "sync"], "the recorded calls still run"
    assert find_host_reads(user_code, device_type="cpu") == []
    assert torch.cuda.synchronize is sync, "the originals are put back"


def test_find_host_reads_sees_stream_and_event_waits(monkeypatch):
    """A Stream's or Event's synchronize / query (and an Event's elapsed_time) wait for or ask about device
    work, which a capture refuses, without any aten op (stand-in methods here: no CUDA on this box)."""
    calls = []
    for cls, name in ((torch.cuda.Stream, "synchronize"), (torch.cuda.Event, "query"), (torch.cuda.Event, "elapsed_time")):
        monkeypatch.setattr(cls, name, lambda self, *a, _n=name: calls.append(_n))
    stub = torch.cuda.Event.query

    def user_code():
        torch.cuda.Stream.synchronize(None)  # what stream.synchronize() calls
        torch.cuda.Event.query(None)
        torch.cuda.Event.elapsed_time(None, None)

    found = find_host_reads(user_code, device_type="cuda")
    assert [op for op, _ in found] == ["torch.cuda.Stream.synchronize", "torch.cuda.Event.query",
                                       "torch.cuda.Event.elapsed_time"], found  # fmt: skip
    assert all("user_code" in at for _, at in found) and calls == ["synchronize", "query", "elapsed_time"]
    assert torch.cuda.Event.query is stub, "the originals are put back"
    # a method a class inherits (ExternalStream's synchronize is Stream's) is recorded, then not left behind
    from fedlora_fast.privacy import graphed

    monkeypatch.setitem(graphed.HOST_READ_METHODS, "ExternalStream", ("synchronize",))
    before = {c: dict(vars(c)) for c in (torch.cuda.Stream, torch.cuda.ExternalStream)}
    found = find_host_reads(lambda: torch.cuda.ExternalStream.synchronize(None), device_type="cuda")
    assert [op for op, _ in found] == ["torch.cuda.ExternalStream.synchronize", "torch.cuda.Stream.synchronize"], found
    assert {c: dict(vars(c)) for c in before} == before, "nothing added to or left on the classes"


def _hf_classifier(kind, attn="sdpa"):
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_labels=2, pad_token_id=0,
                          attn_implementation=attn)  # fmt: skip
        model = LlamaForSequenceClassification(cfg)
    else:
        cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=32, num_labels=2,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation=attn)  # fmt: skip
        model = BertForSequenceClassification(cfg)
    head = "score" if kind == "llama" else "classifier"
    ff.inject_adapters(model, "all-linear", r=4, trainable_modules=[head])
    return model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_capturable_attention_mask_same_model_and_no_host_reads(kind, attn):
    """The 2-D padding mask reads back (transformers' sdpa mask skip); capturable_attention_mask's 4-D mask
    gives the same logits (causal for Llama, padding only for BERT) and a step without any read-back, the
    engine's clipping included, under sdpa and eager attention (which adds the mask to the scores: a boolean
    mask there would count as +1/+0 and drop the causal triangle)."""
    model = _hf_classifier(kind, attn)
    dp = make_dp(model)
    ids = torch.randint(1, 64, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    ids[1, 6:] = 0  # right padding (Llama's classifier pools the last non-pad token)
    labels = torch.tensor([0, 1, 1])

    def step(attention_mask):
        def fn():
            logits = model(input_ids=ids, attention_mask=attention_mask).logits
            nn.functional.cross_entropy(logits.float(), labels, reduction="sum").backward()
            dp._clip_batch()

        return fn

    if attn == "sdpa":
        found = find_host_reads(step(mask))
        assert found and all(op == "aten._local_scalar_dense.default" for op, _ in found), found
        assert any("masking_utils" in at for _, at in found), found
    four = ff.capturable_attention_mask(model, mask)
    assert four.shape == (3, 1, 9, 9) and four.dtype == torch.float32
    assert set(four.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
    assert find_host_reads(step(four)) == []
    model.eval()
    real = mask.bool()
    with torch.no_grad():
        hidden = {k: model.base_model(input_ids=ids, attention_mask=m).last_hidden_state[real]
                  for k, m in (("2d", mask), ("4d", four), ("none", None))}  # fmt: skip
        want = model(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=four).logits
    assert_close_verbose(hidden["4d"], hidden["2d"], atol=1e-5, rtol=1e-5, name="hidden states, 4-D vs 2-D mask")
    assert_close_verbose(got, want, atol=1e-5, rtol=1e-5, name="logits, 4-D vs 2-D mask")
    # the comparison can fail: ignoring the padding changes BERT (bidirectional) at the padded sample's tokens
    assert (kind == "llama") == torch.allclose(hidden["none"], hidden["2d"], atol=1e-4)
    if kind == "llama":  # causal: a later token never changes an earlier one's state
        later = ids.clone()
        later[0, 5] = (later[0, 5] % 63) + 1
        with torch.no_grad():
            a = model.base_model(input_ids=ids, attention_mask=four).last_hidden_state[0, :5]
            b = model.base_model(input_ids=later, attention_mask=four).last_hidden_state[0, :5]
        assert torch.equal(a, b)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attention implementation 'flash_attention_2' takes no 4-D mask"):
        ff.capturable_attention_mask(model, mask)


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False, "preserve_rng_state": False}],
                         ids=["default", "no_rng_state"])
def test_padded_path_under_gradient_checkpointing_equals_the_eager_accumulate(kwargs):
    """Hugging Face gradient checkpointing (recomputed forwards inside the backward) with the padded path
    (eager here): the same clipped sum as a plain backward + accumulate without checkpointing; also without
    the saved RNG state, the setting a CUDA capture needs (nothing to replay in a model without dropout)."""
    sums = []
    for ckpt in (False, True):
        model = _hf_classifier("llama")
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.train()
        dp = make_dp(model)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(1, 64, (5, 8), generator=gen)
        batch = {"input_ids": ids, "mask": torch.ones(5, 8, dtype=torch.long), "labels": torch.tensor([0, 1, 1, 0, 1])}

        def loss(model, b):
            mask = ff.capturable_attention_mask(model, b["mask"])
            logits = model(input_ids=b["input_ids"], attention_mask=mask).logits
            return nn.functional.cross_entropy(logits.float(), b["labels"], reduction="none")

        if ckpt:
            GraphedAccumulator(dp, loss, micro_batch_size=3, graph=False).accumulate(batch)
        else:
            loss(model, batch).sum().backward()
            dp.accumulate()
        sums.append(torch.cat([t.flatten() for t in dp.clipped_sum()]))
    assert sums[0].abs().sum() > 0
    assert_close_verbose(sums[1], sums[0], atol=1e-5, rtol=1e-5, name="checkpointed padded sum")


def test_capturable_attention_mask_and_sliding_windows():
    """A sliding window no shorter than the sequence changes nothing (the same logits as the 2-D mask); a
    shorter one, which one 4-D mask cannot express, is refused; a window the config switches off is ignored."""
    pytest.importorskip("transformers")
    from transformers import MistralConfig, MistralForSequenceClassification

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_labels=2, pad_token_id=0, sliding_window=9)  # fmt: skip
    model = MistralForSequenceClassification(cfg).eval()
    ids = torch.randint(1, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    ids[1, 5:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=ff.capturable_attention_mask(model, mask)).logits
    assert_close_verbose(got, want, atol=1e-5, rtol=1e-5, name="logits within the window")
    model.config.sliding_window = 4
    with pytest.raises(ValueError, match=r"9 tokens exceed the model's sliding attention window \(4\)"):
        ff.capturable_attention_mask(model, mask)
    model.config.use_sliding_window = False  # Qwen2-style: a window in the config, not in use
    assert ff.capturable_attention_mask(model, mask).shape == (2, 1, 9, 9)


def test_capturable_attention_mask_refuses_what_it_cannot_tell():
    with pytest.raises(ValueError, match=r"mask: expected a 2-D \(n, T\) padding mask, got \(3,\)"):
        ff.capturable_attention_mask(make_model(), torch.ones(3))
    with pytest.raises(ValueError, match="cannot tell from its attention modules whether Sequential is causal"):
        ff.capturable_attention_mask(make_model(), torch.ones(3, 4))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("sizes", [4, (4, 2, 1)], ids=["one_size", "three_sizes"])
def test_cuda_graph_replays_equal_the_eager_accumulate(clipping, sizes, monkeypatch):
    """One size: 7, 2, 5, 1 samples as 2 + 1 + 2 + 1 replays, 4 of them padded. Three sizes (one memory
    pool): [4, 4], [2], [4, 1], [1], the graphs replayed in changing orders."""
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    backends.clear_cache()
    sums = {}
    for graph in (False, True):
        model = make_model(device="cuda")
        dp = make_dp(model, clipping=clipping, noise_multiplier=1.0, noise_seed=0)
        acc = GraphedAccumulator(dp, per_sample_loss, micro_batch_size=sizes, graph=graph)
        total = []
        for seed, n in ((1, 7), (2, 2), (3, 5), (4, 1)):
            assert acc.accumulate(make_batch(n, seed=seed, device="cuda")) == n
            total.append(torch.cat([t.flatten() for t in dp.clipped_sum()]))
            dp.step()
            dp.zero_grad()
        sums[graph] = torch.stack(total)
        assert acc.replays == (sum(len(acc.plan(n)) for n in (7, 2, 5, 1)) if graph else 0)
        assert dp.samples_dropped == 0 and dp.steps == 4
    assert_close_verbose(sums[True], sums[False], atol=1e-5, rtol=1e-5, name="replayed clipped sums")


@pytest.mark.parametrize("device", [
    pytest.param("cpu", id="cpu_eager"),
    pytest.param("cuda", id="cuda_graph", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")]),
])
def test_dp_steps_with_the_kept_merged_weight(device, monkeypatch):
    """FEDLORA_FAST_GEMM=merged with FEDLORA_FAST_KEEP_MERGED=1 or =cache in DP steps (on CUDA captured in a
    graph: the backward reads the forward's W' from the graph's pool, or the cached W' the capture found,
    which each replay brings up to date with B as the optimizer changes it; on the CPU eagerly, Triton
    interpreted): the second adapted layer's backward gets the kept W' (the first's input wants no gradient:
    nothing kept there), and the clipped sums equal those of eager steps without the option."""
    from fedlora_fast.kernels import ffa_linear as K

    monkeypatch.setenv(backends.ENV_VAR, "triton")
    monkeypatch.setenv(K.GEMM_ENV_VAR, "merged")
    backends.clear_cache()
    if backends._probe("triton", device)[0] is None:
        pytest.skip(f"triton backend unavailable on {device}: {backends._probe('triton', device)[1]}")
    lookups = spy_kept_weight(monkeypatch)  # the capture's among them (replays call nothing)
    sums = {}
    for keep in ("0", "1", "cache"):
        monkeypatch.setenv(K.KEEP_ENV_VAR, keep)
        K.clear_merged_cache()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, OUT)).to(device)
        ff.inject_adapters(model, ["0", "2"], r=R, alpha=6.0, seed=0)
        with torch.no_grad():
            model[0].lora_B.normal_(0, 0.5)
            model[2].lora_B.normal_(0, 0.5)
        dp = make_dp(model, noise_multiplier=1.0, noise_seed=0)
        graph = device == "cuda" and keep != "0"
        acc = GraphedAccumulator(dp, per_sample_loss, micro_batch_size=4, graph=graph)
        total = []
        for seed, n in ((1, 7), (2, 3)):
            assert acc.accumulate(make_batch(n, seed=seed, device=device)) == n
            total.append(torch.cat([t.flatten() for t in dp.clipped_sum()]))
            dp.step()
            dp.zero_grad()
        sums[keep] = torch.stack(total)
        used = [got for _, got in lookups]  # backward calls that got the forward's W'
        assert any(used) is (keep != "0") and all(used) is (keep != "0"), lookups
        lookups.clear()
        if keep == "cache":  # both layers' W' cached (and, in the graph, replayed into)
            assert len(K._MERGED_CACHE) == 2 and all(e.captured is graph for e in K._MERGED_CACHE.values())
            K.clear_merged_cache()
    assert_close_verbose(sums["1"], sums["0"], atol=1e-6, rtol=1e-6, name="clipped sums (kept W')")
    assert_close_verbose(sums["cache"], sums["0"], atol=1e-6, rtol=1e-6, name="clipped sums (cached W')")


class _Twice(nn.Module):
    """One adapted layer applied twice in a forward (weight sharing), then a trained head."""

    def __init__(self):
        super().__init__()
        self.shared, self.head = nn.Linear(IN, IN), nn.Linear(IN, OUT)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


@pytest.mark.parametrize("device", [
    pytest.param("cpu", id="cpu_eager"),
    pytest.param("cuda", id="cuda_graph", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")]),
])
def test_dp_steps_with_a_shared_layer_under_the_merged_cache_and_auto(device, monkeypatch):
    """FEDLORA_FAST_KEEP_MERGED=cache with the default FEDLORA_FAST_GEMM=auto, one adapted layer applied twice in
    each forward, DP steps through ``GraphedAccumulator`` (on CUDA captured in a graph: the second call finds no
    cached W' it may make under capture and merges for itself; before that fix it fell through to an untimed
    Triton GEMM that would autotune inside the capture; on the CPU eagerly, Triton interpreted): the clipped sums
    equal those of eager steps without the cache, and the captured cache entry is marked so."""
    from fedlora_fast.kernels import ffa_linear as K

    monkeypatch.setenv(backends.ENV_VAR, "triton")
    monkeypatch.delenv(K.GEMM_ENV_VAR, raising=False)
    backends.clear_cache()
    if backends._probe("triton", device)[0] is None:
        pytest.skip(f"triton backend unavailable on {device}: {backends._probe('triton', device)[1]}")
    sums = {}
    for keep in ("0", "cache"):
        monkeypatch.setenv(K.KEEP_ENV_VAR, keep)
        K.clear_merged_cache()
        torch.manual_seed(0)
        model = _Twice().to(device)
        ff.inject_adapters(model, ["shared"], r=R, alpha=6.0, seed=0, trainable_modules=["head"])
        with torch.no_grad():
            model.shared.lora_B.normal_(0, 0.5)
        dp = make_dp(model, noise_multiplier=1.0, noise_seed=0)
        graph = device == "cuda" and keep == "cache"
        acc = GraphedAccumulator(dp, per_sample_loss, micro_batch_size=4, graph=graph)
        total = []
        for seed, n in ((1, 7), (2, 3), (3, 5)):
            assert acc.accumulate(make_batch(n, seed=seed, device=device)) == n
            total.append(torch.cat([t.flatten() for t in dp.clipped_sum()]))
            dp.step()
            dp.zero_grad()
        sums[keep] = torch.stack(total)
        assert dp.samples_dropped == 0 and dp.steps == 3
        if keep == "cache":  # W' cached (and, in the graph, replayed into)
            assert K._MERGED_CACHE and any(e.captured for e in K._MERGED_CACHE.values()) is graph
            assert (acc.replays > 0) is graph
        K.clear_merged_cache()
    assert_close_verbose(sums["cache"], sums["0"], atol=1e-5, rtol=1e-5, name="clipped sums (shared layer, cache)")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_capture_refuses_a_loss_that_reads_back():
    model = make_model(device="cuda")
    dp = make_dp(model)

    def loss(model, mb):
        out = per_sample_loss(model, mb)
        return out * (1.0 if float(out.max()) > 0 else 2.0)

    acc = GraphedAccumulator(dp, loss, micro_batch_size=4)
    with pytest.raises(ValueError, match="reads device values back.*_local_scalar_dense"):
        acc.accumulate(make_batch(3, device="cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_cuda_graph_hugging_face_classifier_with_padding_masks(kind, monkeypatch):
    """A Hugging Face classifier in bf16 on the Triton kernels, padded sequences through the 4-D mask,
    Poisson-like batch sizes: the replayed clipped sums equal the eager path's (same kernels, same order:
    bitwise up to the GEMM choice, pinned to Triton by conftest), noise seeded alike."""
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    backends.clear_cache()

    def loss(model, b):
        logits = model(input_ids=b["input_ids"], attention_mask=ff.capturable_attention_mask(model, b["mask"])).logits
        return nn.functional.cross_entropy(logits.float(), b["labels"], reduction="none")

    gen = torch.Generator().manual_seed(0)
    batches = []
    for n in (5, 3, 6):
        lengths = torch.randint(3, 12, (n,), generator=gen)
        mask = (torch.arange(12)[None] < lengths[:, None]).long()
        ids = torch.randint(1, 64, (n, 12), generator=gen) * mask
        batches.append({"input_ids": ids, "mask": mask, "labels": torch.randint(0, 2, (n,), generator=gen)})
    sums = {}
    for graph in (False, True):
        model = _hf_classifier(kind).to("cuda", torch.bfloat16)
        dp = make_dp(model, noise_multiplier=0.5, noise_seed=0)
        acc = GraphedAccumulator(dp, loss, micro_batch_size=4, graph=graph)
        got = []
        for b in batches:
            acc.accumulate(b)
            got.append(torch.cat([t.flatten() for t in dp.clipped_sum()]))
            dp.step()
            dp.zero_grad()
        sums[graph] = torch.stack(got)
        assert dp.samples_dropped == 0 and dp.steps == 3
    assert torch.isfinite(sums[True]).all() and sums[True].abs().sum() > 0
    assert_close_verbose(sums[True], sums[False], atol=1e-5, rtol=1e-4, name="replayed clipped sums")


def test_an_accumulator_of_a_replaced_engine_is_refused_before_capture():
    """An accumulator whose engine was replaced by a new DPSGD on the same model (not rebound) refuses the next
    batch on its eager path too (and before a first capture), not only when replaying: otherwise per-layer
    clipping would run with the new engine's thresholds under the old engine's noise."""
    model = make_model()
    acc = GraphedAccumulator(make_dp(model, clipping="per_layer", max_grad_norm=1e-3), per_sample_loss,
                             micro_batch_size=3, graph=False)
    make_dp(model, clipping="per_layer", max_grad_norm=100.0)
    with pytest.raises(RuntimeError, match="this engine was detached"):
        acc.accumulate(make_batch(3))
    assert acc.dp.clipped_sum()[0].abs().sum() == 0  # nothing was summed


def test_a_capture_whose_snapshot_fails_is_not_kept(fake):
    """The graph was kept before the snapshot of what it takes as given: when that failed (a sparse buffer
    has no data pointer), every later batch replayed it unchecked (after model.eval() and a smaller C here).
    Now no graph is kept without its snapshot, and the error names the cause and graph=False."""
    model = make_model()
    model[1].register_buffer("table", torch.eye(3).to_sparse())  # unused by the forward
    dp = make_dp(model)
    acc = fake.accumulator(dp, per_sample_loss, micro_batch_size=4)
    with pytest.raises(RuntimeError, match="cannot record where the model's parameters and buffers live.*graph=False"):
        acc.accumulate(make_batch(3))
    assert all(s.graph is None for s in acc._slots.values()) and not acc._captured
    with pytest.raises(RuntimeError, match="cannot record"):
        acc.accumulate(make_batch(3, seed=5))  # tried again (and refused again), never replayed unchecked
    assert acc.replays == 0 and dp._pending_samples == 0


def test_empty_batches_inputs_that_require_grad_and_grad_mode():
    """poisson_dataloader's empty batch has None for its non-tensor leaves: the README's loop crashed on it
    (and an empty first batch fixed None as the value every later batch had to hold). A batch tensor that
    requires grad (inputs_embeds) put the fixed buffers into the autograd graph for good. No grad mode, and
    detached losses, are named instead of torch's generic "does not require grad"."""
    model = make_model()
    dp = make_dp(model)
    acc = GraphedAccumulator(dp, lambda m, b: per_sample_loss(m, b[0]), micro_batch_size=2, graph=False)
    full = (make_batch(3), "regression")
    empty = ({k: v[:0] for k, v in full[0].items()}, None)
    assert acc.accumulate(empty) == 0 and acc.accumulate(full) == 3 and acc.accumulate(empty) == 0
    with pytest.raises(ValueError, match="non-tensor values differ from the first batch's \\('other' vs 'regression'\\)"):
        acc.accumulate((full[0], "other"))
    x = full[0]["x"].clone().requires_grad_(True)
    for _ in range(2):
        assert acc.accumulate(({"x": x, "y": full[0]["y"]}, "regression")) == 3
    assert x.grad is None and not any(s.requires_grad for slot in acc._slots.values() for s in slot.static)
    with torch.no_grad(), pytest.raises(RuntimeError, match="accumulate: grad mode is off"):
        acc.accumulate(full)
    detached = GraphedAccumulator(dp, lambda m, b: per_sample_loss(m, b).detach(), micro_batch_size=2, graph=False)
    with pytest.raises(ValueError, match="loss_fn: returned losses that do not require grad"):
        detached.accumulate(make_batch(2))


def test_find_host_reads_sees_a_printed_tensor_and_the_generic_synchronize(monkeypatch):
    """torch._tensor_str switches dispatch modes off, so print(t) / f"{t}" of a device tensor (a read-back)
    passed the probe; so did torch.accelerator.synchronize(). A frame in torchvision/ is not torch's own."""
    from fedlora_fast.privacy import graphed

    t = torch.ones(3)
    found = find_host_reads(lambda: f"{t}", device_type=None)
    assert [op for op, _ in found] == ["torch.Tensor.__repr__ (print / str / f-string of a tensor)"]
    assert "test_graphed.py" in found[0][1]
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda *a, **k: None)  # (no device to wait for here)
    assert [op for op, _ in find_host_reads(lambda: torch.accelerator.synchronize(), device_type=None)] == [
        "torch.accelerator.synchronize"]
    assert find_host_reads(lambda: f"{t}", device_type="cuda") == []  # a CPU tensor: harmless there
    torch_dir = graphed._OWN_DIRS[0]
    beside = os.path.join(os.path.dirname(torch_dir.rstrip(os.sep)), "torchvision", "ops", "boxes.py")
    frame = traceback.FrameSummary(beside, 42, "nms")
    assert graphed._caller([frame]) == f"{beside}:42 in nms"


def test_find_host_reads_patches_are_shared_and_per_thread():
    """The recorders are process-wide patches: another thread's prints during a probe are not the probed
    function's reads (413 of them were, in a reviewer's run), and two overlapping probes in two threads leave
    the originals in place (each restoring what it saw left a recorder installed for good)."""
    import threading
    import time

    original = vars(torch.Tensor)["__repr__"]
    stop = threading.Event()

    def chatter():
        while not stop.is_set():
            repr(torch.zeros(1))
            time.sleep(0.001)

    other = threading.Thread(target=chatter)
    other.start()
    try:
        assert find_host_reads(lambda: time.sleep(0.05), device_type=None) == []
    finally:
        stop.set()
        other.join()
    a_in, b_in = threading.Event(), threading.Event()
    found = {}

    def probe(name, mine, theirs):
        found[name] = find_host_reads(lambda: (mine.set(), theirs.wait(5), repr(torch.ones(1))), device_type=None)

    threads = [threading.Thread(target=probe, args=("a", a_in, b_in)), threading.Thread(target=probe, args=("b", b_in, a_in))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [len(found[k]) for k in "ab"] == [1, 1], found
    assert vars(torch.Tensor)["__repr__"] is original and torch.cuda.synchronize.__qualname__ == "synchronize"


def test_a_none_leaf_in_the_batch_is_a_value_not_a_tensor_slot():
    """None marked "a tensor goes here" among the batch's leaves: a batch holding a real None crashed with a bare
    StopIteration."""
    dp = make_dp(make_model())
    acc = GraphedAccumulator(dp, lambda m, b: per_sample_loss(m, {"x": b["x"], "y": b["y"]}) if b["extra"] is None
                             else None, micro_batch_size=2, graph=False)
    assert acc.accumulate({"extra": None, **make_batch(3)}) == 3 and dp._pending_samples == 3


def test_a_mapping_torch_cannot_flatten_is_read_as_a_dict_and_per_sample_value_lists_are_refused():
    """A Hugging Face ``BatchEncoding`` (a UserDict: one opaque leaf to torch's pytree) was refused as "no
    tensors"; it now runs as the plain dict it holds, with the sums of a dict batch. A list of plain values, one
    per sample (collated ids), had every micro-batch get the whole list (row i paired with another sample's
    id): it is refused where the batch is split, naming it, also nested in a dict or a namedtuple; per-batch
    constants, such a list in a batch that fits one micro-batch, and the types of torch's own mappings stay."""
    from transformers import BatchEncoding

    batch = make_batch(5)
    want, _, _ = graphed_sum([batch], 2, "flat")
    got, _, counts = graphed_sum([BatchEncoding(batch)], 2, "flat")
    assert counts == [5]
    assert_close_verbose(got, want, atol=0, rtol=0, name="BatchEncoding")
    Pair = collections.namedtuple("Pair", "data ids")
    tags = [["keep"], ["keep"], ["drop"], ["drop"], ["keep"]]  # one list per sample (a custom collate's)
    for bad in ((batch, ["a", "b", "c", "d", "e"]), ({**batch, "ids": (1, 2, 3, 4, 5)},), Pair(batch, list("abcde")),
                (batch, tags), (batch, [list("abcde"), list("vwxyz")])):
        acc = GraphedAccumulator(make_dp(make_model()), lambda m, b: per_sample_loss(m, b[0]), micro_batch_size=2,
                                 graph=False)
        with pytest.raises(ValueError, match=r"a (list|tuple) of plain values .* per sample of a batch of 5, split"):
            acc.accumulate(bad)
    # kept: per-batch constants, a list that fits one micro-batch, and the mapping types torch knows
    seen = []

    def loss(m, b):
        seen.append((type(b[0]), getattr(b[0], "default_factory", None), b[1]))
        return per_sample_loss(m, {"x": b[0]["x"], "y": b[0]["y"]})

    for mb, wrap in ((2, collections.OrderedDict), (2, lambda d: collections.defaultdict(list, d)), (8, dict)):
        acc = GraphedAccumulator(make_dp(make_model()), loss, micro_batch_size=mb, graph=False)
        ids = ["a", "b", "c", "d", "e"] if mb == 8 else ("mean",)
        assert acc.accumulate((wrap({**batch, "tags": ["t"]}), ids)) == 5
        kind = type(wrap({}))
        assert all(t is kind and b == ids for t, _, b in seen), seen
        assert kind is not collections.defaultdict or all(f is list for _, f, _ in seen)
        seen.clear()
    # an empty Poisson batch (its constant tuple emptied by poisson_dataloader's stand-in) is not a new structure
    from fedlora_fast.privacy.sampling import _empty_like_batch

    acc = GraphedAccumulator(make_dp(make_model()), lambda m, b: per_sample_loss(m, b[0]), micro_batch_size=2,
                             graph=False)
    assert acc.accumulate((batch, ("sum",))) == 5
    assert acc.accumulate(_empty_like_batch((batch, ("sum",)))) == 0 and acc.accumulate((batch, ("sum",))) == 5
    with pytest.raises(ValueError, match="batch: 1 tensors, the first batch had 2"):
        acc.accumulate(({"x": batch["x"][:0]}, ()))

"""DPSGD: per-sample gradients vs a batch-of-one loop, the clipped-sum update, sensitivity, noise, robustness.

Small models on CPU with the PyTorch reference backend: the maths of the engine, not the kernels (those are
checked backend by backend in test_ffa_linear.py).
"""

import dataclasses
import logging
import math
import re
import warnings

import pytest
import torch
from torch import nn

import fedlora_fast as ff
from fedlora_fast import per_sample
from fedlora_fast.per_sample import PerSampleStateError
from fedlora_fast.privacy import Accountant, batch_size, dpsgd, micro_batches
from fedlora_fast.testing import assert_close_verbose, per_sample_grads_engine, per_sample_grads_loop

IN, HID, OUT, R = 7, 6, 3, 3  # odd sizes on purpose


pytestmark = pytest.mark.usefixtures("reference_backend")


@pytest.fixture(params=["per_tensor", "grouped", "grouped_small"])
def grouped(request, monkeypatch):
    """Flat clipping's paths on CPU: one clip-reduce per tensor, all tensors in one (CUDA's default), or
    groups closed by a 64-byte limit (one tensor each here)."""
    monkeypatch.setitem(dpsgd.GROUPED_CLIP_REDUCE, "cpu", request.param != "per_tensor")
    if request.param == "grouped_small":
        monkeypatch.setattr(dpsgd, "GROUP_BYTES", 64)
    return request.param


def make_model(train_A=False, seed=0):
    """Adapter on a hidden linear layer + a fully trainable per-sample head; B random so A's grad is not 0."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, OUT))
    ff.inject_adapters(model, ["0"], r=R, alpha=6.0, seed=seed, train_A=train_A, trainable_modules=["2"])
    with torch.no_grad():
        model[0].lora_B.normal_(0, 0.5)
    return model


def params(model):
    return [p for p in model.parameters() if p.requires_grad]


def make_dp(model, lr=1.0, **kw):
    kw = {"max_grad_norm": 1.0, "noise_multiplier": 0.0, "expected_batch_size": 4, **kw}
    return ff.DPSGD(model, torch.optim.SGD(params(model), lr=lr), **kw)


def make_batch(n, T, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, IN) if T is None else (n, T, IN)
    out = (n, OUT) if T is None else (n, T, OUT)
    return {"x": scale * torch.randn(shape, generator=g), "y": torch.randn(out, generator=g)}


def loss_fn(model, batch):
    return ((model(batch["x"]) - batch["y"]) ** 2).sum()


def hand_clipped_sum(loop, names, thresholds=None, C=1.0):
    """sum_i c_i P_i from batch-of-one gradients, float64: flat (one C) or per tensor (thresholds[name])."""
    n = next(iter(loop.values())).shape[0]
    if thresholds is None:
        norms = torch.sqrt(sum(loop[k].reshape(n, -1).pow(2).sum(1) for k in names))
        coef = (C / (norms + 1e-6)).clamp(max=1.0)
        return {k: torch.einsum("n,n...->...", coef, loop[k]) for k in names}
    out = {}
    for k in names:
        norms = loop[k].reshape(n, -1).norm(dim=1)
        coef = (thresholds[k] / (norms + 1e-6)).clamp(max=1.0)
        out[k] = torch.einsum("n,n...->...", coef, loop[k])
    return out


# --- per-sample gradients vs the batch-of-one loop ----------------------------------------------------------
@pytest.mark.parametrize("train_A", [False, True], ids=["ffa", "lora"])
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("T", [None, 1, 17], ids=["2d", "T1", "T17"])
def test_per_sample_grads_match_loop(train_A, n, T):
    model = make_model(train_A)
    batch = make_batch(n, T)
    loop = per_sample_grads_loop(model, loss_fn, batch)
    dp = make_dp(model)
    loss_fn(model, batch).backward()
    got = per_sample_grads_engine(model)
    assert set(got) == set(loop) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert ("0.lora_A" in got) == train_A
    for k in loop:
        assert_close_verbose(got[k], loop[k], atol=1e-5, rtol=1e-5, name=k)
    norms = torch.sqrt(sum(v.reshape(n, -1).pow(2).sum(1) for v in loop.values()))
    assert_close_verbose(dp.per_sample_norms(), norms, atol=1e-5, rtol=1e-5, name="norms")


@pytest.mark.parametrize("train_A", [False, True], ids=["ffa", "lora"])
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("T", [None, 1, 17], ids=["2d", "T1", "T17"])
def test_per_layer_norms_and_clipped_sum_match_loop(train_A, n, T):
    model = make_model(train_A)
    batch = make_batch(n, T, scale=3.0)
    loop = per_sample_grads_loop(model, loss_fn, batch)
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    dp = make_dp(model, clipping="per_layer", max_grad_norm=2.0)
    loss_fn(model, batch).backward()
    norms = torch.sqrt(sum(v.reshape(n, -1).pow(2).sum(1) for v in loop.values()))
    assert_close_verbose(dp.per_sample_norms(), norms, atol=1e-5, rtol=1e-5, name="norms")
    dp.accumulate()
    C_l = 2.0 / math.sqrt(len(names))
    want = hand_clipped_sum(loop, names, thresholds={k: C_l for k in names})
    for k, got in zip(names, dp.clipped_sum()):
        assert_close_verbose(got, want[k], atol=1e-5, rtol=1e-5, name=k)


# --- the update with noise 0 ----------------------------------------------------------------------------
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("train_A", [False, True], ids=["ffa", "lora"])
def test_noise_free_update_is_clipped_sum_over_m(clipping, train_A, grouped):
    model = make_model(train_A)
    batch = make_batch(5, 4, scale=2.0)  # large enough that most samples clip
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    loop = per_sample_grads_loop(model, loss_fn, batch)
    C, m, lr = 0.7, 4, 0.5
    thresholds = None
    if clipping == "per_layer":
        thresholds = {k: C / math.sqrt(len(names)) for k in names}
    want = hand_clipped_sum(loop, names, thresholds, C=C)
    n_clipped = int((torch.sqrt(sum(v.reshape(5, -1).pow(2).sum(1) for v in loop.values())) > C).sum())
    assert n_clipped >= 3, "the check must exercise clipping"
    before = {k: p.detach().double().clone() for k, p in model.named_parameters() if p.requires_grad}
    dp = make_dp(model, lr=lr, clipping=clipping, max_grad_norm=C, expected_batch_size=m)
    loss_fn(model, batch).backward()
    dp.step()
    assert dp.last_step_samples == 5 and dp.steps == 1
    for k, p in model.named_parameters():
        if p.requires_grad:
            assert_close_verbose(p.detach().double(), before[k] - lr * want[k] / m, atol=1e-6, rtol=1e-5, name=k)


# --- sensitivity ---------------------------------------------------------------------------------------------
def _pre_noise_sum(model, dp, batch):
    loss_fn(model, batch).backward()
    dp.accumulate()
    out = torch.cat([t.double().flatten() for t in dp.clipped_sum()])
    dp.zero_grad()
    return out


@pytest.mark.parametrize("clipping,thresholds", [("flat", None), ("per_layer", None), ("per_layer", [0.1, 0.5, 0.3])])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_removing_one_sample_moves_pre_noise_sum_by_at_most_sensitivity(clipping, thresholds, seed, caplog, grouped):
    model = make_model(train_A=False, seed=seed)
    C = 1.3
    if thresholds is not None:
        thresholds = [t * C / math.sqrt(sum(u * u for u in thresholds)) for t in thresholds]
    dp = make_dp(model, max_grad_norm=C, clipping=clipping, per_layer_max_grad_norm=thresholds)
    bound = C if thresholds is None else math.sqrt(sum(t * t for t in thresholds))
    assert dp.sensitivity == pytest.approx(bound)
    g = torch.Generator().manual_seed(100 + seed)
    n = 6
    # mixed scales: some samples far above the threshold, some below
    batch = {"x": torch.randn(n, 5, IN, generator=g) * torch.tensor([0.05, 0.3, 1, 3, 10, 30])[:, None, None],
             "y": torch.randn(n, 5, OUT, generator=g)}
    full = _pre_noise_sum(model, dp, batch)
    moves = []
    with caplog.at_level(logging.WARNING):
        for i in range(n):
            keep = [j for j in range(n) if j != i]
            sub = {k: v[keep] for k, v in batch.items()}
            moves.append((full - _pre_noise_sum(model, dp, sub)).norm().item())
    assert max(moves) <= bound * (1 + 1e-5), (moves, bound)
    assert max(moves) >= 0.5 * bound, "the batch must contain samples that clip"


# --- noise ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("clipping,secure", [("flat", False), ("per_layer", False), ("flat", True)])
def test_noise_std_is_sigma_times_C(clipping, secure):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64))
    ff.inject_adapters(model, ["0"], r=8)
    sigma, C = 0.8, 2.5
    dp = make_dp(model, clipping=clipping, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=1,
                 secure_mode=secure)
    draws = []
    for _ in range(4):  # 4 empty steps of a 64x8 tensor: 2048 draws, lr 1, m 1 -> the update is the noise
        before = model[0].lora_B.detach().clone()
        dp.step(empty_batch=True)
        draws.append((before - model[0].lora_B.detach()).flatten())
        dp.zero_grad()
    x = torch.cat(draws).double()
    std = x.std().item()
    # the std estimate's relative standard error is 1/sqrt(2*2048) = 1.6%: 10% is ~6 SE; a factor 2 fails
    assert abs(std / (sigma * C) - 1) < 0.10, std
    assert abs(x.mean().item()) < 5 * sigma * C / math.sqrt(x.numel())
    assert dp.steps == 4


def test_per_layer_noise_is_sigma_times_the_sensitivity_of_explicit_thresholds():
    """Per-layer thresholds below the default bound the sum's sensitivity by S = sqrt(sum C_l^2) < C; the noise
    is sigma S, the noise multiplier the accountant records (sigma C would deliver sigma C / S, reported as sigma)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64))
    ff.inject_adapters(model, ["0"], r=8)
    sigma, C, C_l = 0.8, 2.5, 0.5
    dp = make_dp(model, clipping="per_layer", noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=1,
                 per_layer_max_grad_norm=[C_l])
    assert dp.sensitivity == C_l
    draws = []
    for _ in range(4):
        before = model[0].lora_B.detach().clone()
        dp.step(empty_batch=True)
        draws.append((before - model[0].lora_B.detach()).flatten())
        dp.zero_grad()
    std = torch.cat(draws).double().std().item()
    assert abs(std / (sigma * C_l) - 1) < 0.10, std  # (2048 draws: 10 % is ~6 standard errors; sigma C is 5x)


def test_noise_generator_os_seeded_by_default_and_explicit_seed_logged(caplog):
    outs = []
    for _ in range(2):
        model = make_model()
        dp = make_dp(model, noise_multiplier=1.0)
        assert dp.seeded is False
        dp.step(empty_batch=True)
        outs.append(model[0].lora_B.detach().clone())
    assert not torch.equal(outs[0], outs[1]), "two default engines drew the same noise"
    seeded = []
    for _ in range(2):
        model = make_model()
        with caplog.at_level(logging.WARNING, logger="fedlora_fast.privacy.dpsgd"):
            dp = make_dp(model, noise_multiplier=1.0, noise_seed=1234)
        assert dp.seeded is True
        dp.step(empty_batch=True)
        seeded.append(model[0].lora_B.detach().clone())
    assert torch.equal(seeded[0], seeded[1])
    assert "explicitly seeded" in caplog.text


# --- micro-batches -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_accumulated_micro_batches_equal_one_big_batch(clipping, grouped):
    batch = make_batch(7, 5, scale=2.0)
    sums = []
    for sizes in ([7], [3, 3, 1], [1] * 7):
        model = make_model(train_A=True)
        dp = make_dp(model, clipping=clipping, sample_rate=0.1, noise_multiplier=1.0)
        start = 0
        for s in sizes:
            mb = {k: v[start : start + s] for k, v in batch.items()}
            start += s
            loss_fn(model, mb).backward()
            dp.accumulate()
        sums.append(torch.cat([t.flatten() for t in dp.clipped_sum()]))
        dp.step()
        assert dp.last_step_samples == 7
        assert dp.accountant.steps == 1, "one accountant step per logical step"
    for other in sums[1:]:
        assert_close_verbose(other, sums[0], atol=1e-6, rtol=1e-6, name="accumulated sum")


def test_a_copy_or_pickle_of_the_model_leaves_the_engine_and_its_noise_secret_behind():
    """``copy.deepcopy(model)`` / ``torch.save(model)`` with an engine attached: the copy is a plain model (its
    layers compute ``.grad``; an EMA, eval or teacher copy must not silently stop training) and holds no engine
    (whose OS-seeded generator is the noise's secret: a file holding it predicts every later noise draw). Between
    a backward and its step the per-sample gradients (unclipped) are pending: copying is refused then."""
    import copy
    import io
    import pickle

    model = make_model()
    dp = make_dp(model, noise_multiplier=1.0)
    batch = make_batch(4, 5)
    loss_fn(model, batch).backward()
    for attempt in (lambda: copy.deepcopy(model), lambda: torch.save(model, io.BytesIO())):
        with pytest.raises(PerSampleStateError, match=r"\['lora_B'\] hold per-sample gradients of a backward not yet "
                                                      r"stepped"):
            attempt()
    dp.step()
    dp.zero_grad()
    twin = copy.deepcopy(model)
    assert all(m.ps_ctx is None for m in dpsgd.per_sample_modules(twin).values())
    loss_fn(twin, batch).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params(twin)), "the copy trains plainly"
    data = pickle.dumps(model)
    assert b"DPSGD" not in data and b"Generator" not in data, "the engine (and its noise generator) stays behind"
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    hooks = [h for m in loaded.modules() for h in m._forward_pre_hooks.values()]
    assert hooks and all(isinstance(h, dpsgd._NoHook) for h in hooks)
    loss_fn(loaded, batch).backward()
    assert all(p.grad is not None for p in params(loaded))
    loss_fn(model, batch).backward()  # the original is still under its engine
    assert dp.per_sample_norms().shape == (4,) and all(p.grad is None for p in params(model))
    dp.step()
    dp.zero_grad()
    model[0].compile(backend="eager")  # a compiled call is bound to the original module: not copied with it
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].lora_B.add_(1.0)
    assert not torch.equal(twin(batch["x"]), model(batch["x"])), "the copy runs its own tensors"
    loss_fn(twin, batch).backward()
    assert twin[0].lora_B.grad is not None and not per_sample.has_state(model[0].lora_B)
    pickle.dumps(model)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_pickling_the_trained_tensors_mid_step_is_refused_and_after_the_step_carries_nothing(clipping):
    """The per-sample results live on the trained Parameters, and a Parameter pickles its ``__dict__``: between
    a backward and its step, ``torch.save`` of ``state_dict(keep_vars=True)``, of the optimizer or of one tensor
    would write every sample's unclipped gradient (flat) or the pre-noise clipped sum (per-layer) into the file.
    Refused; after the step the same saves work and hold no per-sample data."""
    import copy
    import io
    import pickle

    model = make_model()
    dp = make_dp(model, clipping=clipping, noise_multiplier=1.0)
    loss_fn(model, make_batch(4, 5)).backward()
    lora_B = model[0].lora_B
    assert per_sample.has_state(lora_B)
    attempts = {
        "state_dict(keep_vars=True)": lambda: torch.save(model.state_dict(keep_vars=True), io.BytesIO()),
        "optimizer": lambda: torch.save(dp.optimizer, io.BytesIO()),
        "tensor": lambda: pickle.dumps(lora_B),
        "record": lambda: copy.deepcopy(per_sample.pending(lora_B)),
        "a plain tensor's deepcopy": lambda: copy.deepcopy(plain),
    }
    plain = torch.zeros(3)
    per_sample.store(plain, dp.ctx, dp.ctx.batch_id, torch.zeros(2, 3), torch.zeros(2), per_sample.forward_id(dp.ctx))
    for what, attempt in attempts.items():
        with pytest.raises(PerSampleStateError, match="unclipped"):
            attempt()
    per_sample.clear(plain)
    dp.step()
    for what, save in (("state_dict", lambda b: torch.save(model.state_dict(keep_vars=True), b)),
                       ("tensor", lambda b: torch.save(lora_B, b))):
        buf = io.BytesIO()
        save(buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        tensors = loaded.values() if isinstance(loaded, dict) else [loaded]
        assert not any(per_sample.has_state(t) for t in tensors), what
    pickle.dumps(dp.optimizer.state_dict())


def test_the_engine_itself_is_never_pickled_or_copied():
    """After ``accumulate()`` the per-sample records are gone, but the engine holds the step's pre-noise clipped
    sum, and always its noise generator: ``torch.save({"model": ..., "dp": dp})`` for a resumable checkpoint
    wrote both (a reviewer found the sum and the generator in the file). Refused by name."""
    import copy
    import io
    import pickle

    model = make_model()
    dp = make_dp(model, noise_multiplier=1.0, sample_rate=0.1)
    loss_fn(model, make_batch(4, 5)).backward()
    dp.accumulate()
    attempts = (lambda: torch.save({"dp": dp}, io.BytesIO()), lambda: pickle.dumps(dp), lambda: copy.deepcopy(dp),
                lambda: copy.copy(dp))
    for attempt in attempts:
        with pytest.raises(TypeError, match="DPSGD cannot be pickled or copied: it holds the noise generator"):
            attempt()
    dp.step()
    torch.save(model.state_dict(), io.BytesIO())  # what to save instead
    pickle.dumps(dp.accountant.state_dict())


def test_micro_batches_helper_splits_and_counts():
    batch = make_batch(7, 3)
    parts = list(micro_batches(batch, 3))
    assert [batch_size(p) for p in parts] == [3, 3, 1]
    assert torch.equal(torch.cat([p["x"] for p in parts]), batch["x"])
    assert list(micro_batches({"x": torch.zeros(0, IN)}, 3)) == []
    with pytest.raises(ValueError, match="max_size"):
        list(micro_batches(batch, 0))


# --- empty batches, step discipline --------------------------------------------------------------------------
def test_empty_batch_steps_with_noise_only_and_counts_as_a_step():
    model = make_model()
    dp = make_dp(model, noise_multiplier=0.0, sample_rate=0.01)
    before = [p.detach().clone() for p in params(model)]
    dp.step(empty_batch=True)
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, params(model)))
    assert dp.steps == 1 and dp.accountant.steps == 1 and dp.last_step_samples == 0
    loss_fn(model, make_batch(2, None)).backward()
    with pytest.raises(RuntimeError, match="empty_batch"):
        dp.step(empty_batch=True)


def test_refuses_to_step_twice_and_norms_before_backward():
    model = make_model()
    dp = make_dp(model)
    with pytest.raises(RuntimeError, match="no per-sample gradients"):
        dp.per_sample_norms()
    with pytest.raises(RuntimeError, match="no per-sample gradients since the last step"):
        dp.step()
    loss_fn(model, make_batch(3, 2)).backward()
    dp.step()
    with pytest.raises(RuntimeError, match="twice"):
        dp.step()
    with pytest.raises(RuntimeError, match="no per-sample gradients"):
        dp.per_sample_norms()


def test_unconsumed_backward_is_refused_at_next_forward():
    model = make_model()
    make_dp(model)
    loss_fn(model, make_batch(3, 2)).backward()
    with pytest.raises(PerSampleStateError, match="never consumed"):
        loss_fn(model, make_batch(3, 2, seed=5))
    with torch.no_grad():  # evaluation between backward and step stays allowed
        model(make_batch(3, 2)["x"])


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_a_second_backward_of_a_consumed_forward_is_refused(clipping):
    """A retained graph run backward again after accumulate() would put the same samples in the step twice
    (the sum of one sample at 2C): the engine refuses it, before and after a step."""
    model = make_model()
    dp = make_dp(model, clipping=clipping)
    loss = loss_fn(model, make_batch(1, 2))
    loss.backward(retain_graph=True)
    dp.accumulate()
    with pytest.raises(PerSampleStateError, match="second backward through a forward whose per-sample"):
        loss.backward(retain_graph=True)
    dp.step()
    with pytest.raises(RuntimeError):  # after the step: autograd's in-place check on the updated weights
        loss.backward()
    loss_fn(model, make_batch(2, 2)).backward()  # a new forward trains as usual
    dp.step()
    for seed in range(3):  # a loss that calls submodules (no model-level forward) trains step after step too
        b = make_batch(2, 2, seed=seed)
        ((model[2](model[1](model[0](b["x"]))) - b["y"]) ** 2).sum().backward()
        dp.step()
    # the forwards of two micro-batches first, then their backwards: each counted once, as one after the other
    first, second = make_batch(2, 2, seed=7), make_batch(3, 2, seed=8)
    l1, l2 = loss_fn(model, first), loss_fn(model, second)
    l1.backward()
    dp.accumulate()
    l2.backward()
    dp.accumulate()
    both = torch.cat([t.flatten() for t in dp.clipped_sum()])
    dp.zero_grad()
    for b in (first, second):
        loss_fn(model, b).backward()
        dp.accumulate()
    assert_close_verbose(torch.cat([t.flatten() for t in dp.clipped_sum()]), both, atol=0, rtol=0, name="order")


def test_consumed_forward_ids_stay_bounded(monkeypatch):
    from fedlora_fast import per_sample

    monkeypatch.setattr(per_sample, "CONSUMED_KEPT", 8)
    ctx = per_sample.PerSampleContext()
    ctx.consume(set(range(1, 10)))  # 9 > 8: the oldest half is forgotten, and refused by the watermark
    assert ctx.consumed == {6, 7, 8, 9} and ctx.consumed_below == 6
    with pytest.raises(PerSampleStateError, match="second backward"):
        per_sample.store(torch.zeros(2), ctx, 0, torch.zeros(1, 2), torch.zeros(1), fwd=3)
    per_sample.store(torch.zeros(2), ctx, 0, torch.zeros(1, 2), torch.zeros(1), fwd=10)


def test_a_backward_of_a_forward_under_a_replaced_engine_is_refused():
    """Per-layer clipping clips inside the backward with the engine of the forward: a backward after that
    engine was replaced would reach the new engine clipped to the old thresholds (10x the new C here)."""
    model = make_model()
    make_dp(model, clipping="per_layer", max_grad_norm=10.0)
    loss = loss_fn(model, make_batch(1, 2, scale=50.0))
    new = make_dp(model, clipping="per_layer", max_grad_norm=1.0)
    with pytest.raises(PerSampleStateError, match="detached \\(or replaced\\)"):
        loss.backward()
    loss_fn(model, make_batch(1, 2, scale=50.0)).backward()
    new.accumulate()
    assert float(torch.cat([t.flatten() for t in new.clipped_sum()]).norm()) <= new.sensitivity * (1 + 1e-6)


def test_add_noise_refuses_a_noise_multiplier_set_by_hand_out_of_range():
    model = make_model()
    dp = make_dp(model, noise_multiplier=1.0)
    loss_fn(model, make_batch(2, 2)).backward()
    dp.accumulate()
    for bad in (-1.0, float("nan"), 1e39):  # (1e39: sigma * C beyond float32, the noise would be inf)
        dp.noise_multiplier = bad
        with pytest.raises(ValueError, match="noise_multiplier"):
            dp.add_noise()
        with pytest.raises(ValueError, match="noise_multiplier"):
            dp.step()
    dp.noise_multiplier = 1e36  # C = 1: sigma * C within range; C itself cannot be set past it either
    with pytest.raises(ValueError, match=r"noise_multiplier \* max_grad_norm: expected at most .* = 1e\+37"):
        dp.max_grad_norm = 10.0
    assert dp.max_grad_norm == 1.0
    dp.add_noise()
    assert all(torch.isfinite(t).all() for t in dp.clipped_sum())


def test_the_largest_noise_std_is_finite_in_float32():
    """MAX_NOISE_STD leaves room for draws of dozens of std in float32, and not much more than that."""
    f32 = torch.finfo(torch.float32).max
    assert 30 * dpsgd.MAX_NOISE_STD < f32 < 100 * dpsgd.MAX_NOISE_STD


def test_noise_beyond_a_half_precision_trained_tensor_is_refused_before_release():
    """.grad is the noisy sum / m cast to the tensor's dtype: a float16 B (largest value 65504) got inf from a
    noise std of ~1e3 m. The engine refuses it at construction and, for a tensor cast later, before the release
    (nothing accounted); within range the step stays finite."""
    model = make_model()
    model[0].lora_B.data = model[0].lora_B.data.half()
    with pytest.raises(ValueError, match=r"expected_batch_size: expected at most .* torch.float16 .* = 2\.5e\+05"):
        make_dp(model, noise_multiplier=1e6, expected_batch_size=4)
    model = make_model()
    dp = make_dp(model, noise_multiplier=1e6, expected_batch_size=4, sample_rate=0.1)
    model[0].lora_B.data = model[0].lora_B.data.half()
    with pytest.raises(ValueError, match="torch.float16"):
        dp.step(empty_batch=True)
    assert dp.accountant.history == [] and dp.steps == 0
    dp.noise_multiplier = 4000.0  # std / m = 1000: 65 std below float16's largest value
    dp.step(empty_batch=True)
    assert torch.isfinite(model[0].lora_B.grad).all() and model[0].lora_B.grad.dtype == torch.float16


def test_expected_batch_size_set_by_hand_is_checked():
    """m divides the noisy sum: set by hand to 0 it wrote inf into every trained tensor, to -4 it reversed the
    update. The setter refuses both, and an m that would put the noise beyond a float16 B."""
    model = make_model()
    dp = make_dp(model, noise_multiplier=2000.0, expected_batch_size=4)
    for bad in (0, -4, 2.5, True, None):
        with pytest.raises(ValueError, match=f"expected_batch_size: expected a positive int, got {bad!r}"):
            dp.expected_batch_size = bad
    assert dp.expected_batch_size == 4
    dp.expected_batch_size = 8
    loss_fn(model, make_batch(2, 2)).backward()
    dp.step()
    assert dp.expected_batch_size == 8 and all(torch.isfinite(p.grad).all() for p in params(model))
    model[0].lora_B.data = model[0].lora_B.data.half()  # sigma C / m = 2000 / m: float16's bound is ~1023
    with pytest.raises(ValueError, match="torch.float16"):
        dp.expected_batch_size = 1
    assert dp.expected_batch_size == 8


def test_per_layer_next_backward_without_zero_grad_is_not_contaminated():
    """Per-layer clipping accumulates into .grad: the previous step's gradient must not leak into the next."""
    model = make_model()
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    dp = make_dp(model, clipping="per_layer", noise_multiplier=0.0, expected_batch_size=1, lr=1.0)
    loss_fn(model, make_batch(3, 2)).backward()
    dp.step()  # no zero_grad on purpose
    batch = make_batch(3, 2, seed=9)
    loop = per_sample_grads_loop(model, loss_fn, batch)
    want = hand_clipped_sum(loop, names, thresholds={k: 1.0 / math.sqrt(len(names)) for k in names})
    loss_fn(model, batch).backward()
    dp.accumulate()
    for k, got in zip(names, dp.clipped_sum()):
        assert_close_verbose(got, want[k], atol=1e-5, rtol=1e-5, name=k)


# --- robustness ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_non_finite_sample_is_dropped_and_counted(clipping, caplog, grouped):
    model = make_model()
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    batch = make_batch(4, 3)
    batch["x"][2, 1, 0] = float("nan")
    good = {k: v[[0, 1, 3]] for k, v in batch.items()}
    loop = per_sample_grads_loop(model, loss_fn, good)
    thresholds = None if clipping == "flat" else {k: 1.0 / math.sqrt(len(names)) for k in names}
    want = hand_clipped_sum(loop, names, thresholds)
    dp = make_dp(model, clipping=clipping)
    loss_fn(model, batch).backward()
    assert not torch.isfinite(dp.per_sample_norms()[2])
    with caplog.at_level(logging.WARNING, logger="fedlora_fast.privacy.dpsgd"):
        dp.accumulate()
    assert "dropped 1 of 4" in caplog.text
    for k, got in zip(names, dp.clipped_sum()):
        assert torch.isfinite(got).all(), k
        assert_close_verbose(got, want[k], atol=1e-5, rtol=1e-5, name=k)
    dp.step()
    assert dp.samples_dropped == 1 and dp.last_step_dropped == 1 and dp.last_step_samples == 4
    assert all(torch.isfinite(p).all() for p in params(model))


class _FakeTransfer:
    """Stands in for the pinned-memory copy + CUDA event of a deferred drop count: not arrived until released."""

    def __init__(self):
        self.sent, self.arrived, self.waited = [], False, 0

    def __call__(self, count):
        assert isinstance(count, torch.Tensor) and count.dim() == 0  # the device tensor, not a host int
        self.sent.append(count.clone())

        def wait():
            self.waited += 1

        return self.sent[-1], (lambda: self.arrived), wait


@pytest.fixture
def deferred(monkeypatch):
    """CUDA's drop counting (on the device, read back later) on the CPU, with a transfer that arrives on cue."""
    monkeypatch.setitem(dpsgd.DEFERRED_DROP_COUNT, "cpu", True)
    fake = _FakeTransfer()
    monkeypatch.setattr(dpsgd._DroppedCounter, "_transfer", staticmethod(fake))
    return fake


def test_deferred_drop_count_never_reads_the_device_in_the_step(deferred, caplog, monkeypatch):
    """The step reads no device value back (no host sync on CUDA); the count and its warning arrive later,
    the totals are exact once read, and the dropped sample is out of the sum all along."""
    model = make_model()
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    dp = make_dp(model)
    batches = []
    for seed, bad in ((3, (1,)), (4, (0, 2))):
        b = make_batch(4, 3, seed=seed)
        for i in bad:
            b["x"][i, 0, 0] = float("nan")
        batches.append(b)
    good = {k: torch.cat([batches[0][k][[0, 2, 3]], batches[1][k][[1, 3]]]) for k in batches[0]}
    want = hand_clipped_sum(per_sample_grads_loop(model, loss_fn, good), names)

    def no_read(*a, **kw):
        raise AssertionError("a device value was read back inside the DP step")

    with caplog.at_level(logging.WARNING, logger="fedlora_fast.privacy.dpsgd"):
        with monkeypatch.context() as m:
            for attr in ("__int__", "__bool__", "item", "tolist"):
                m.setattr(torch.Tensor, attr, no_read)
            for b in batches:
                loss_fn(model, b).backward()
                dp.accumulate()
            sums = dp.clipped_sum()
            dp.step()
        assert "dropped" not in caplog.text  # not arrived yet
        assert len(deferred.sent) == 1 and int(deferred.sent[0]) == 3  # one transfer per step, summed
        for k, got in zip(names, sums):
            assert_close_verbose(got, want[k], atol=1e-5, rtol=1e-5, name=k)
        dp.zero_grad()
        loss_fn(model, make_batch(4, 3, seed=5)).backward()
        dp.step()  # the first step's count has not arrived: still nothing read, nothing blocked
        assert "dropped" not in caplog.text and deferred.waited == 0
        deferred.arrived = True
        loss_fn(model, make_batch(4, 3, seed=6)).backward()
        dp.accumulate()
        dp.zero_grad()  # a discarded micro-batch (nothing dropped): counted, never a step
        loss_fn(model, make_batch(4, 3, seed=7)).backward()
        dp.step()  # arrived: read back without waiting for anything else
        assert "dropped 3 of 8 sample(s) with non-finite per-sample gradient norms (over 2 micro-batches)" in caplog.text
    assert dp.samples_dropped == 3 and dp.last_step_dropped == 0 and dp.last_step_samples == 4


def test_deferred_drop_count_waits_when_asked(deferred):
    """Asking for the totals waits for the counts in flight (the one place the host blocks)."""
    model = make_model()
    dp = make_dp(model)
    b = make_batch(4, 3)
    b["x"][3, 2, 1] = float("inf")
    loss_fn(model, b).backward()
    dp.step()
    assert deferred.waited == 0
    assert dp.last_step_dropped == 1 and deferred.waited == 1
    assert dp.samples_dropped == 1 and dp.last_step_samples == 4
    assert all(torch.isfinite(p).all() for p in params(model))


# --- accountant wiring ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_accountant_is_shared_across_rounds(mechanism):
    acc = Accountant(mechanism)
    model = make_model()
    for _round in range(3):
        dp = make_dp(model, noise_multiplier=1.1, sample_rate=0.05, accountant=acc)
        for _ in range(4):
            loss_fn(model, make_batch(2, None)).backward()
            dp.step()
            dp.zero_grad()
        dp.step(empty_batch=True)
        dp.detach()
    assert acc.steps == 15 and acc.history == [(1.1, 0.05, 15)]
    assert dp.epsilon(1e-5) == acc.epsilon(1e-5) > 0


def test_poisson_training_loop_epsilon_matches_opacus():
    """Poisson loader with empty batches, micro-batches, then epsilon == opacus on the same (sigma, q, k)."""
    from opacus.accountants import RDPAccountant

    from fedlora_fast.privacy import poisson_dataloader

    model = make_model()
    data = make_batch(40, 3)
    ds = torch.utils.data.TensorDataset(data["x"], data["y"])
    q, sigma, k = 0.05, 1.2, 30
    loader = poisson_dataloader(ds, sample_rate=q, steps=k, generator=torch.Generator().manual_seed(3))
    dp = make_dp(model, noise_multiplier=sigma, sample_rate=q, expected_batch_size=2, lr=0.1)
    empty = 0
    for x, y in loader:
        if batch_size(x) == 0:
            empty += 1
            dp.step(empty_batch=True)
        else:
            for mb in micro_batches({"x": x, "y": y}, 2):
                loss_fn(model, mb).backward()
                dp.accumulate()
            dp.step()
        dp.zero_grad()
    assert empty > 0, "the check must include empty batches"
    ref = RDPAccountant()
    for _ in range(k):
        ref.step(noise_multiplier=sigma, sample_rate=q)
    assert dp.steps == dp.accountant.steps == k
    assert dp.epsilon(1e-5) == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-12)


def test_a_new_engine_detaches_the_previous_one():
    model = make_model()
    old = make_dp(model)
    new = make_dp(model)
    assert old._hooks == [] and all(m.ps_ctx is new.ctx for m in new.modules.values())
    loss_fn(model, make_batch(3, 2)).backward()
    new.step()


def test_epsilon_without_accountant_is_refused():
    dp = make_dp(make_model())
    assert dp.accountant is None
    with pytest.raises(RuntimeError, match="sample_rate"):
        dp.epsilon(1e-5)


# --- bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,exc,match",
    [
        ({"noise_multiplier": -0.5}, ValueError, "noise_multiplier"),
        ({"noise_multiplier": float("nan")}, ValueError, "noise_multiplier"),
        ({"noise_multiplier": float("inf")}, ValueError, "noise_multiplier"),
        ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm"),
        ({"max_grad_norm": -1.0}, ValueError, "max_grad_norm"),
        ({"max_grad_norm": float("nan")}, ValueError, "max_grad_norm"),
        ({"max_grad_norm": "big"}, TypeError, "max_grad_norm"),
        ({"max_grad_norm": 1e20, "noise_multiplier": 1e19}, ValueError, r"noise_multiplier \* max_grad_norm"),
        ({"max_grad_norm": 1e39, "noise_multiplier": 1.0}, ValueError, r"noise_multiplier \* max_grad_norm"),
        ({"expected_batch_size": 0}, ValueError, "expected_batch_size"),
        ({"expected_batch_size": 2.5}, ValueError, "expected_batch_size"),
        ({"clipping": "global"}, ValueError, "clipping"),
        ({"accountant": "rdp"}, ValueError, "sample_rate: required"),
        ({"accountant": Accountant()}, ValueError, "sample_rate: required"),
        ({"accountant": "moments", "sample_rate": 0.1}, ValueError, "accountant"),
        ({"sample_rate": 0.0}, ValueError, "sample_rate"),
        ({"sample_rate": 1.5}, ValueError, "sample_rate"),
        ({"sample_rate": float("nan")}, ValueError, "sample_rate"),
        ({"clipping": "per_layer", "per_layer_max_grad_norm": [1.0, 1.0, 1.0]}, ValueError, "exceeds max_grad_norm"),
        ({"clipping": "per_layer", "per_layer_max_grad_norm": [0.1, 0.1]}, ValueError, "expected 3 thresholds"),
        ({"clipping": "per_layer", "per_layer_max_grad_norm": [0.1, -0.1, 0.1]}, ValueError, r"norm\[1\]"),
        ({"per_layer_max_grad_norm": [0.1, 0.1, 0.1]}, ValueError, "only used with clipping='per_layer'"),
        ({"noise_seed": 1, "generator": torch.Generator()}, ValueError, "at most one"),
        ({"noise_seed": 1, "secure_mode": True}, ValueError, "secure_mode"),
        ({"generator": "cpu"}, TypeError, "generator"),
    ],
)
def test_bad_arguments_raise_clear_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        make_dp(make_model(), **kw)


def test_tied_trainable_weight_is_refused():
    model = make_model()
    model.append(nn.Linear(HID, OUT))
    model[3].bias.requires_grad_(False)
    model[3].weight = model[2].weight  # tied to the per-sample head: its gradient there is not clipped
    with pytest.raises(ValueError, match="tied"):
        make_dp(model)


def test_trainable_parameter_without_per_sample_rule_is_refused():
    model = make_model()
    model[0].base_layer.bias.requires_grad_(True)
    with pytest.raises(ValueError, match="without per-sample gradients"):
        make_dp(model)


def test_batch_norm_in_training_mode_is_refused():
    model = make_model()
    model.insert(2, nn.BatchNorm1d(HID))
    for p in model[2].parameters():
        p.requires_grad_(False)
    dp = make_dp(model)
    with pytest.raises(ValueError, match="batch statistics"):
        loss_fn(model, make_batch(4, None))
    model[2].eval()  # running statistics: per sample again
    loss_fn(model, make_batch(4, None)).backward()
    dp.step()


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_gradients_from_before_the_engine_never_enter_a_step(clipping):
    model = make_model()
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    loss_fn(model, make_batch(3, 2, seed=4)).backward()  # non-private gradients already in .grad
    dp = make_dp(model, clipping=clipping)
    assert all(p.grad is None for p in params(model))
    batch = make_batch(3, 2)
    loop = per_sample_grads_loop(model, loss_fn, batch)
    thresholds = None if clipping == "flat" else {k: 1.0 / math.sqrt(len(names)) for k in names}
    want = hand_clipped_sum(loop, names, thresholds)
    loss_fn(model, batch).backward()
    dp.accumulate()
    for k, got in zip(names, dp.clipped_sum()):
        assert_close_verbose(got, want[k], atol=1e-5, rtol=1e-5, name=k)
    from fedlora_fast.testing import dp_paused

    with dp_paused(model):  # a plain backward between steps: raw gradients, no per-sample state
        loss_fn(model, batch).backward()
    loss_fn(model, batch).backward()
    dp.accumulate()
    for k, got in zip(names, dp.clipped_sum()):
        assert_close_verbose(got, 2 * want[k], atol=1e-5, rtol=1e-5, name=k + " (twice)")


def _backward(loss_of, how):
    """``loss_of().backward()`` eagerly or under compiled autograd (aot_eager)."""
    if how != "compiled_autograd":
        return loss_of().backward()
    torch._dynamo.reset()
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
        loss_of().backward()


@pytest.mark.parametrize("how", ["eager", "compiled_autograd"])
def test_a_gradient_from_around_the_per_sample_modules_is_named_not_silently_lost(how):
    """A regulariser on a trained tensor (or the weight used functionally) sends its gradient straight to
    .grad, around the per-sample machinery: it cannot be clipped per sample and is discarded, with a warning
    naming the tensor (silently, it trained another objective than the one written). Under compiled autograd
    the per-sample modules hand zeros to .grad (None crashes its sum of two uses): those are not named, a
    regulariser's gradient added to them is."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 3))
    ff.inject_adapters(model, target_modules=["0"], r=2, trainable_modules=["1"])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    dp = ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=4)
    x = torch.randn(4, 8)
    _backward(lambda: model(x).sum(), how)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dp.step()  # a clean backward: nothing to say
    dp.zero_grad()
    _backward(lambda: model(x).sum() + 100 * model[1].weight.square().sum(), how)
    with pytest.warns(RuntimeWarning, match=r"\['1.weight'\] had a gradient from around their per-sample modules"):
        dp.step()
    torch._dynamo.reset()


class _UsedTwice(nn.Module):
    """An adapted layer and a trained head, each run twice in one forward (weight sharing across depth)."""

    def __init__(self):
        super().__init__()
        self.l, self.h = nn.Linear(IN, IN), nn.Linear(IN, OUT)

    def forward(self, x):
        return self.h(torch.tanh(self.l(torch.tanh(self.l(x))))) + self.h(x)


@pytest.mark.parametrize("how", ["eager", "compile", "compiled_autograd"])
@pytest.mark.parametrize("train_A", [False, True], ids=["ffa", "lora"])
def test_a_module_used_twice_in_one_forward_gets_the_sum_of_both_uses_per_sample(how, train_A):
    """Flat clipping sums each sample's gradients of both uses before its norm (the batch-of-one loop's
    gradient), eagerly, under ``torch.compile`` and under compiled autograd (which had crashed: a TypeError
    adding the two uses' None gradients); per-layer clipping refuses, naming flat."""
    batch = make_batch(3, 4)
    for clipping in ("flat", "per_layer"):
        torch.manual_seed(0)
        model = _UsedTwice()
        ff.inject_adapters(model, ["l"], r=R, alpha=6.0, seed=0, train_A=train_A, trainable_modules=["h"])
        with torch.no_grad():
            model.l.lora_B.normal_(0, 0.5)
        loop = per_sample_grads_loop(model, loss_fn, batch)
        names = list(loop)
        dp = make_dp(model, clipping=clipping)
        run = torch.compile(model, backend="aot_eager") if how == "compile" else model
        torch._dynamo.reset()
        if clipping == "per_layer":
            with pytest.raises(PerSampleStateError, match="used twice in one forward.*clipping='flat'"):
                _backward(lambda: loss_fn(run, batch), how)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # (not torch's own DeprecationWarnings)
            _backward(lambda: loss_fn(run, batch), how)
            got = per_sample_grads_engine(model)
            for k in names:
                assert_close_verbose(got[k], loop[k], atol=1e-5, rtol=1e-5, name=f"{how} {k}")
            norms = torch.sqrt(sum(v.reshape(3, -1).pow(2).sum(1) for v in loop.values()))
            assert_close_verbose(dp.per_sample_norms(), norms, atol=1e-5, rtol=1e-5, name=f"{how} norms")
            dp.accumulate()
            want = hand_clipped_sum(loop, names)
            for k, c in zip(names, dp.clipped_sum()):
                assert_close_verbose(c, want[k], atol=1e-5, rtol=1e-5, name=f"{how} clipped {k}")
    torch._dynamo.reset()


def test_step_on_a_bf16_model_with_a_trained_head(grouped):
    """Noise is added to float32 sums and cast once: a bf16 parameter never receives a float32 .grad."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Linear(12, 3)).to(torch.bfloat16)
    ff.inject_adapters(model, target_modules=["0"], r=2, trainable_modules=["1"])
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    dp = ff.DPSGD(model, torch.optim.SGD(params, lr=0.1), max_grad_norm=1.0, noise_multiplier=1.0,
                  expected_batch_size=4, noise_seed=0)
    model(torch.randn(4, 5, 16, dtype=torch.bfloat16)).float().sum().backward()
    dp.step()
    for p, b in zip(params, before):
        assert p.grad.dtype == p.dtype
        assert not torch.equal(p, b)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_bf16_clipped_sums_stay_float32_so_one_sample_moves_them_by_at_most_C(clipping):
    """Sensitivity on a bf16 model: k identical samples that all clip, against k - 1. Rounded to bf16 before
    the noise (a per-layer sum kept in a bf16 .grad), a sum of 300 samples moved by 1.27 C, or not at all at
    1000; kept float32 until the noise, by C (to float32 rounding)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Linear(12, 3)).to(torch.bfloat16)
    ff.inject_adapters(model, target_modules=["0"], r=2, trainable_modules=["1"])
    dp = ff.DPSGD(model, torch.optim.SGD(params(model), lr=0.1), max_grad_norm=1.0, noise_multiplier=0.0,
                  expected_batch_size=4, clipping=clipping)  # fmt: skip
    x1 = (10 * torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1))).to(torch.bfloat16)

    def clipped(k):
        model(x1.expand(k, 5, 16).contiguous()).float().sum().backward()
        dp.accumulate()
        out = torch.cat([t.double().flatten() for t in dp.clipped_sum()])
        dp.zero_grad()
        return out

    for k in (300, 1000):
        moved = float((clipped(k) - clipped(k - 1)).norm())
        assert moved == pytest.approx(1.0, rel=1e-3), (k, moved)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_max_grad_norm_changes_only_between_steps_and_per_layer_thresholds_follow(clipping):
    """Samples clipped with one C must not be noised for another: a change within a step is refused; between
    steps it is taken, and the default per-layer thresholds C/sqrt(L) follow it (the noise is sigma * C)."""
    model = make_model()
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    dp = make_dp(model, clipping=clipping)
    loss_fn(model, make_batch(3, 2)).backward()
    if clipping == "per_layer":  # already clipped inside the backward
        with pytest.raises(RuntimeError, match="max_grad_norm: cannot change from 1.0 to 0.1 in the middle of a step"):
            dp.max_grad_norm = 0.1
    dp.accumulate()
    with pytest.raises(RuntimeError, match="max_grad_norm: cannot change from 1.0 to 0.1 in the middle of a step"):
        dp.max_grad_norm = 0.1
    dp.max_grad_norm = 1.0  # the same value: nothing changes
    dp.step()
    dp.max_grad_norm = 0.1
    batch = make_batch(3, 2, seed=4)
    loop = per_sample_grads_loop(model, loss_fn, batch)
    thresholds = {k: 0.1 / math.sqrt(len(names)) for k in names} if clipping == "per_layer" else None
    want = hand_clipped_sum(loop, names, thresholds, C=0.1)
    loss_fn(model, batch).backward()
    dp.accumulate()
    for k, got in zip(names, dp.clipped_sum()):
        assert_close_verbose(got, want[k], atol=1e-6, rtol=1e-5, name=k)
    assert dp.sensitivity == pytest.approx(0.1)
    with pytest.raises(ValueError, match="max_grad_norm: expected a finite number > 0"):
        dp.max_grad_norm = -1.0


def test_explicit_per_layer_thresholds_must_fit_under_a_new_max_grad_norm():
    model = make_model()
    dp = make_dp(model, clipping="per_layer", per_layer_max_grad_norm=[0.3, 0.4, 0.5])
    dp.max_grad_norm = 2.0  # sqrt(0.5) ~ 0.707 still fits
    with pytest.raises(ValueError, match="exceeds max_grad_norm = 0.5"):
        dp.max_grad_norm = 0.5
    assert dp.max_grad_norm == 2.0, "a refused value leaves C as it was"


def test_a_tensor_unfrozen_after_the_engine_is_built_is_refused_at_step():
    """An optimizer over model.parameters() and a layer unfrozen later: its plain gradient would be applied
    unclipped and un-noised by the optimizer's step. Refused, as is a .grad set on a frozen tensor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, OUT))
    ff.inject_adapters(model, ["0"], r=R)
    dp = ff.DPSGD(model, torch.optim.SGD(model.parameters(), lr=1.0), max_grad_norm=1e-3, noise_multiplier=5.0,
                  expected_batch_size=4, noise_seed=0)  # fmt: skip
    model[2].weight.requires_grad_(True)
    before = model[2].weight.detach().clone()
    loss_fn(model, make_batch(4, None, scale=100.0)).backward()
    with pytest.raises(RuntimeError, match=r"model/optimizer: \['2.weight'\] would be updated with a gradient"):
        dp.step()
    assert torch.equal(model[2].weight, before)
    model[2].weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"\['2.weight'\]"):  # frozen again, but its .grad is still there
        dp.step()
    model[2].weight.grad = None
    dp.step()
    assert torch.equal(model[2].weight, before) and dp.steps == 1


def test_a_tensor_frozen_after_the_engine_is_built_is_refused_at_step():
    """The opposite change: a trained B frozen later gets no per-sample gradient, yet each step would still
    give it noise as its gradient and the optimizer would move it. Refused before anything is noised or
    accounted; unfrozen again, the engine steps it as before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, OUT))
    ff.inject_adapters(model, ["0", "2"], r=R)
    dp = make_dp(model, noise_multiplier=1.0, noise_seed=0, sample_rate=0.1)
    model[2].lora_B.requires_grad_(False)
    before = model[2].lora_B.detach().clone()
    loss_fn(model, make_batch(4, None)).backward()
    with pytest.raises(RuntimeError, match=r"model: \['2.lora_B'\] were frozen after the engine was built"):
        dp.step()
    assert torch.equal(model[2].lora_B, before) and dp.accountant.steps == 0 and dp.steps == 0
    with pytest.raises(RuntimeError, match=r"\['2.lora_B'\] were frozen"):
        dp.clip_and_accumulate()
    model[2].lora_B.requires_grad_(True)
    dp.step()  # (the backward before the refusals: layer 2 contributes no sample, only noise)
    assert dp.steps == 1 and not torch.equal(model[2].lora_B, before)


def test_a_tensor_unfrozen_after_the_engine_is_built_is_refused_when_driving_the_stages_by_hand():
    """clip_and_accumulate -> add_noise -> scale_grad -> the caller's optimizer.step: step()'s refusal must
    hold there too (a reviewer's run moved the unfrozen layer by its raw gradient)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, OUT))
    ff.inject_adapters(model, ["0"], r=R)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dp = ff.DPSGD(model, opt, max_grad_norm=1e-3, noise_multiplier=5.0, expected_batch_size=4, noise_seed=0,
                  sample_rate=0.1)  # fmt: skip
    model[2].weight.requires_grad_(True)
    loss_fn(model, make_batch(4, None, scale=100.0)).backward()
    with pytest.raises(RuntimeError, match=r"model/optimizer: \['2.weight'\] would be updated with a gradient"):
        dp.clip_and_accumulate()  # before anything is summed, noised or accounted
    assert dp.accountant.steps == 0
    model[2].weight.requires_grad_(False)
    model[2].weight.grad = None
    dp.clip_and_accumulate()
    dp.add_noise()
    model[2].weight.requires_grad_(True)  # unfrozen between the stages, with a .grad of its own
    model[2].weight.grad = torch.ones_like(model[2].weight)
    with pytest.raises(RuntimeError, match=r"\['2.weight'\] would be updated"):
        dp.scale_grad()
    assert all(p.grad is None for p in dp.params), "nothing reached .grad"


def test_driving_the_stages_by_hand_is_accounted():
    """clip_and_accumulate -> add_noise -> scale_grad -> optimizer.step (opacus's staging): every noisy
    release is an accountant step, the step's counts end, and no clipped sum reaches .grad without noise."""
    model = make_model()
    opt = torch.optim.SGD(params(model), lr=0.1)
    dp = ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4, sample_rate=0.01)
    for _ in range(3):
        loss_fn(model, make_batch(4, None)).backward()
        dp.clip_and_accumulate()
        dp.add_noise()
        dp.scale_grad()
        opt.step()
        dp.zero_grad()
    assert dp.accountant.steps == 3 and dp.steps == 3 and dp.last_step_samples == 4 and dp.epsilon(1e-5) > 0
    loss_fn(model, make_batch(4, None)).backward()
    dp.clip_and_accumulate()
    dp.add_noise()
    with pytest.raises(RuntimeError, match=r"add_noise\(\): this step's sum already has its noise"):
        dp.add_noise()  # (a group's second all_reduce would multiply the release by the world size)
    assert dp.accountant.steps == 4
    loss_fn(model, make_batch(4, None, seed=9)).backward()  # another batch into the released sum: refused
    with pytest.raises(RuntimeError, match=r"accumulate\(\): this step's sum already has its noise"):
        dp.clip_and_accumulate()
    assert dp._pending_samples == 4 and dp.accountant.steps == 4
    dp.zero_grad()
    loss_fn(model, make_batch(4, None)).backward()
    dp.clip_and_accumulate()
    with pytest.raises(RuntimeError, match="scale_grad\\(\\): call add_noise\\(\\) first"):
        dp.scale_grad()
    dp.step()
    assert dp.accountant.steps == 5


def test_bad_construction_arguments_name_themselves():
    model = make_model()
    opt = torch.optim.SGD(params(model), lr=0.1)
    kw = {"max_grad_norm": 1.0, "noise_multiplier": 1.0, "expected_batch_size": 4}
    with pytest.raises(TypeError, match="per_layer_max_grad_norm: expected a sequence of 3 thresholds"):
        ff.DPSGD(model, opt, clipping="per_layer", per_layer_max_grad_norm=0.5, **kw)
    with pytest.raises(TypeError, match="optimizer: expected a torch.optim.Optimizer, got NoneType"):
        ff.DPSGD(model, None, **kw)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module, got NoneType"):
        ff.DPSGD(None, opt, **kw)
    with pytest.raises(TypeError, match="secure_mode: expected True or False, got 'no'"):
        ff.DPSGD(model, opt, secure_mode="no", **kw)


def test_an_adapter_whose_forward_never_runs_is_named_once():
    """A model that reads a layer's weight directly (Mamba's conv1d/dt_proj, a fused eval path) never runs the
    adapter on it: its B got no per-sample gradient and trained on noise alone, silently. The engine names such
    tensors once per set (a branch the batch did not take looks the same), and says nothing when every tensor
    got one."""

    class Direct(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(IN, HID)
            self.b = nn.Linear(HID, OUT)

        def forward(self, x):
            return nn.functional.linear(torch.tanh(self.a(x)), self.b.weight, self.b.bias)  # b's weight read

    torch.manual_seed(0)
    model = Direct()
    ff.inject_adapters(model, ["a", "b"], r=R, alpha=6.0)
    dp = make_dp(model, max_grad_norm=0.5)
    batch = make_batch(3, 2)
    with pytest.warns(RuntimeWarning, match=r"\['b.lora_B'\] got no per-sample gradient in this backward"):
        loss_fn(model, batch).backward()
        dp.step()
    dp.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # said once for that set
        loss_fn(model, batch).backward()
        dp.step()
        dp.zero_grad()
    dp.detach()
    # a new set every step (layer drop, routed experts): three sets named, the third saying it is the last
    class LayerDrop(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(IN, IN) for _ in range(5))

        def forward(self, x, skip):
            for i, layer in enumerate(self.layers):
                x = x if i == skip else torch.tanh(layer(x))
            return x

    drop = LayerDrop()
    ff.inject_adapters(drop, [f"layers.{i}" for i in range(5)], r=R, alpha=6.0)
    dp = make_dp(drop, max_grad_norm=0.5)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for skip in range(5):
            drop(batch["x"], skip).pow(2).sum().backward()
            dp.step()
            dp.zero_grad()
    named = [str(w.message) for w in seen if "got no per-sample gradient" in str(w.message)]
    assert len(named) == 3 and all(f"'layers.{i}.lora_B'" in m for i, m in enumerate(named)), named
    assert "further sets are not reported" in named[-1] and "further" not in named[0]
    dp.detach()
    full = nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, OUT))
    ff.inject_adapters(full, ["0", "2"], r=R, alpha=6.0)
    dp = make_dp(full, max_grad_norm=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        loss_fn(full, batch).backward()
        dp.step()
    dp.detach()


def test_grouped_clip_reduce_equals_per_tensor_with_an_unused_adapter(monkeypatch):
    """The one-launch path (CUDA's) and the per-tensor path give the same clipped sums, zeros for an adapter
    the forward never used, and drop a NaN sample in both."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, OUT), nn.Linear(HID, OUT))
    ff.inject_adapters(model, ["0", "2", "3"], r=R, alpha=6.0, trainable_modules=[])
    for m in (model[0], model[2], model[3]):
        with torch.no_grad():
            m.lora_B.normal_(0, 0.5)
    batch = make_batch(5, 4, scale=2.0)
    batch["x"][3, 0, 0] = float("nan")
    sums = {}
    for flag, limit in ((False, None), (True, None), ("small", 64)):
        monkeypatch.setitem(dpsgd.GROUPED_CLIP_REDUCE, "cpu", bool(flag))
        if limit:
            monkeypatch.setattr(dpsgd, "GROUP_BYTES", limit)
        dp = make_dp(model, max_grad_norm=0.5)
        model.forward = lambda x: model[3](model[1](model[0](x)))  # model[2] unused (called as the model: counted)
        ((model(batch["x"]) - batch["y"]) ** 2).sum().backward()
        dp.accumulate()
        sums[flag] = dp.clipped_sum()
        dp.zero_grad()
        dp.detach()
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    assert names == ["0.lora_B", "2.lora_B", "3.lora_B"]
    for flag in (False, True, "small"):
        assert torch.equal(sums[flag][1], torch.zeros(OUT, R)), flag
    for k, a, b, c in zip(names, sums[False], sums[True], sums["small"]):
        assert torch.isfinite(a).all() and (a.abs().sum() > 0 or k == "2.lora_B"), k
        assert_close_verbose(b, a, atol=1e-6, rtol=1e-6, name=k)
        assert_close_verbose(c, a, atol=1e-6, rtol=1e-6, name=f"{k} (groups of 64 bytes)")


def test_trainable_parameters_on_two_devices_are_refused():
    model = nn.Sequential(nn.Linear(IN, HID), nn.Linear(HID, OUT))
    ff.inject_adapters(model, ["0", "1"], r=R)
    model[1].to("meta")
    with pytest.raises(ValueError, match=r"several devices \['cpu', 'meta'\]"):
        make_dp(model)


def test_gradients_after_a_step_are_views_of_one_buffer_in_the_parameter_dtype():
    model = make_model()
    model[2].to(torch.float64)  # a head in another dtype: its own cast of the flat buffer
    dp = make_dp(model, noise_multiplier=1.0, noise_seed=0)
    x = make_batch(3, 2)["x"]
    model.forward = lambda x: model[2](model[1](model[0](x)).double())  # called as the model: its samples counted
    (model(x) ** 2).sum().backward()
    dp.step()
    grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    assert grads["0.lora_B"].dtype == torch.float32 and grads["2.weight"].dtype == torch.float64
    assert grads["2.weight"].untyped_storage().data_ptr() == grads["2.bias"].untyped_storage().data_ptr()
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_a_replaced_or_detached_engine_refuses_to_clip_noise_or_step(clipping):
    """A second DPSGD on the same model takes over its clipping (per-layer: inside the backward, with its own
    thresholds). The first one's noise is scaled to its own bound, which would not cover a sum clipped under
    the second one (a reviewer's reproduction: C = 1e-3 noise on a sum clipped at C = 100): every DP stage of
    the replaced engine, and of a detached one, is refused; its epsilon and counts stay readable."""
    model = make_model()
    old = make_dp(model, clipping=clipping, max_grad_norm=1e-3, noise_multiplier=1.0, sample_rate=0.1)
    loss_fn(model, make_batch(3, 4)).backward()
    old.accumulate()  # clipped under its own bound: fine while it is attached
    new = make_dp(model, clipping=clipping, max_grad_norm=100.0)
    loss_fn(model, make_batch(3, 4, seed=2)).backward()  # clipped by the new engine's layers
    for stage in (old.accumulate, old.step, old.add_noise, old.scale_grad, lambda: old.step(empty_batch=True)):
        with pytest.raises(RuntimeError, match="this engine was detached"):
            stage()
    assert old.epsilon(1e-5) == 0.0 and old.samples_dropped == 0  # nothing released, nothing accounted
    new.step()  # the attached engine steps as usual
    new.detach()
    loss_fn(model, make_batch(3, 4, seed=3)).backward()  # plain, DP-free backward
    with pytest.raises(RuntimeError, match="this engine was detached"):
        new.step(empty_batch=True)


def _loss(model, x, y):
    return ((model(x) - y) ** 2).sum()


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("train_A", [False, True], ids=["ffa", "lora"])
def test_an_input_only_backward_keeps_no_per_sample_gradients(clipping, train_A):
    """``torch.autograd.grad(loss, x)`` and ``loss.backward(inputs=[x])`` (saliency, adversarial terms on
    inputs) deliver no parameter gradient, as in plain PyTorch: no per-sample state may come of them. After a
    full backward with the graph retained, an input-only one changes neither the norms nor the clipped sums
    (it had doubled both under flat clipping); alone, it leaves nothing to step on. Asking for the
    parameters themselves (``autograd.grad(loss, params)``) still keeps their per-sample results."""
    b = make_batch(4, 3)
    model = make_model(train_A)
    dp = make_dp(model, clipping=clipping)
    x = b["x"].clone().requires_grad_(True)
    loss = _loss(model, x, b["y"])
    loss.backward(retain_graph=True)
    norms = dp.per_sample_norms().clone()
    gx = torch.autograd.grad(loss, x, retain_graph=True)[0]
    loss.backward(inputs=[x])
    assert torch.equal(dp.per_sample_norms(), norms)
    dp.accumulate()
    once = dp.clipped_sum()

    model2 = make_model(train_A)  # the same model and batch through one plain backward
    dp2 = make_dp(model2, clipping=clipping)
    x2 = b["x"].clone().requires_grad_(True)
    _loss(model2, x2, b["y"]).backward()
    assert torch.equal(dp2.per_sample_norms(), norms)
    dp2.accumulate()
    for a, e in zip(once, dp2.clipped_sum()):
        assert torch.equal(a, e)
    assert torch.equal(gx, x2.grad)

    model3 = make_model(train_A)
    dp3 = make_dp(model3, clipping=clipping)
    for run in (lambda l: torch.autograd.grad(l, x3), lambda l: l.backward(inputs=[x3])):
        x3 = b["x"].clone().requires_grad_(True)
        run(_loss(model3, x3, b["y"]))
        with pytest.raises(RuntimeError, match="no per-sample gradients"):
            dp3.per_sample_norms()
        with pytest.raises(RuntimeError, match="no per-sample gradients"):
            dp3.step()
    torch.autograd.grad(_loss(model3, b["x"], b["y"]), params(model3), allow_unused=True)
    assert torch.equal(dp3.per_sample_norms(), norms)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_torch_compile_and_compiled_autograd_keep_the_per_sample_results(clipping):
    """The backward finds A's and B's gradient nodes on its own graph node (``per_sample.input_nodes``): under
    ``torch.compile`` (aot_eager) and compiled autograd the norms and clipped sums equal eager ones, and an
    input-only ``autograd.grad`` through the compiled model still keeps nothing."""
    b = make_batch(4, 3)
    want = []
    for how in ("eager", "compile", "compiled_autograd"):
        torch._dynamo.reset()
        model = make_model()
        dp = make_dp(model, clipping=clipping)
        run = torch.compile(model, backend="aot_eager") if how == "compile" else model
        if how == "compiled_autograd":
            with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
                _loss(run, b["x"], b["y"]).backward()
        else:
            _loss(run, b["x"], b["y"]).backward()
        got = [dp.per_sample_norms().clone()]
        dp.accumulate()
        got += dp.clipped_sum()
        if not want:
            want = got
        for a, e in zip(got, want):
            assert_close_verbose(a, e, atol=1e-6, rtol=1e-6, name=how)
        x = b["x"].clone().requires_grad_(True)
        torch.autograd.grad(_loss(run, x, b["y"]), x)
        with pytest.raises(RuntimeError, match="no per-sample gradients"):
            dp.per_sample_norms()
    torch._dynamo.reset()


# --- layers whose dim 0 is not the sample -------------------------------------------------------------------
class _Folding(nn.Module):
    """An adapted layer fed the samples' positions as rows: ``fold`` reshapes (n, T, IN) to (n T, IN), as OPT's
    decoder layers do before fc1/fc2; ``transpose`` makes it (T, n, IN), sequence-first, as XLNet and FSMT
    do."""

    def __init__(self, how):
        super().__init__()
        self.how, self.lin = how, nn.Linear(IN, OUT)

    def forward(self, x):
        if self.how == "fold":
            return self.lin(x.reshape(-1, IN)).reshape(*x.shape[:-1], OUT)
        return self.lin(x.transpose(0, 1)).transpose(0, 1)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("how", ["fold", "transpose"])
@pytest.mark.parametrize("call", ["positional", "keyword", "dict"])
def test_a_layer_that_sees_rows_other_than_samples_is_refused_before_anything_is_clipped(how, clipping, call):
    """One sample of T positions through a folding (or sequence-first) adapted layer has T rows of per-sample
    gradients: clipping each to C bounded that sample's contribution by T C under noise calibrated to C, and
    the engine could not tell (a review measured 3.6 C from one 16-token sample of a tiny OPT). The engine now
    compares the rows with the model input's samples and refuses before anything is clipped or accounted."""
    torch.manual_seed(0)
    model = _Folding(how)
    ff.inject_adapters(model, ["lin"], r=R, alpha=6.0)
    with torch.no_grad():
        model.lin.lora_B.normal_(0, 0.5)
    before = [p.detach().clone() for p in params(model)]
    dp = make_dp(model, clipping=clipping, sample_rate=0.5)
    b = make_batch(3, 5)
    run = {"positional": lambda x: model(x), "keyword": lambda x: model(x=x), "dict": None}[call]
    if call == "dict":
        model.forward = lambda d, _f=model.forward: _f(d["x"])  # a model taking its batch as one dict
        run = lambda x: model({"x": x})  # noqa: E731
    ((run(b["x"]) - b["y"]) ** 2).sum().backward()
    where = {"positional": "positional argument 0", "keyword": "x", "dict": "positional argument 0['x']"}[call]
    rows = 15 if how == "fold" else 5  # n T rows folded, or T positions sequence-first
    wanted = rf"\{{'lin\.lora_B': {rows}\}} .* model was called on 3 samples \({re.escape(where)}, dim 0;"
    for stage in (dp.per_sample_norms, dp.step):
        with pytest.raises(ValueError, match=wanted):
            stage()
    assert dp.accountant.steps == 0 and dp.steps == 0
    for p, p0 in zip(params(model), before):
        assert torch.equal(p, p0)


def test_the_rows_are_checked_against_the_forward_they_came_from():
    """A second forward with grad before the first one's backward (a side computation) does not hide the
    first's folded rows: each forward's sample count is kept by its batch id."""
    torch.manual_seed(0)
    model = _Folding("fold")
    ff.inject_adapters(model, ["lin"], r=R, alpha=6.0)
    dp = make_dp(model)
    b = make_batch(3, 5)
    loss = ((model(b["x"]) - b["y"]) ** 2).sum()
    model(torch.randn(15, 1, IN))  # 15 samples of one position: 15 rows, the first forward's row count
    loss.backward()
    with pytest.raises(ValueError, match=r"\{'lin\.lora_B': 15\} .* model was called on 3 samples"):
        dp.step()


def _tiny_opt():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.OPTConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64, dropout=0.0,
                                 attention_dropout=0.0, pad_token_id=1)
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(cfg).eval()


def _lm_loss(model, batch):
    """Each sample's mean next-token loss, summed over the batch."""
    logits = model(input_ids=batch["ids"]).logits[:, :-1]
    per_token = nn.functional.cross_entropy(logits.transpose(1, 2), batch["ids"][:, 1:], reduction="none")
    return per_token.mean(1).sum()


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_opt_fc_layers_are_refused_and_its_attention_layers_match_the_batch_of_one_loop(clipping):
    """OPT's decoder layers reshape (B, T, H) to (B T, H) before fc1/fc2: adapting them is refused by name (it
    had clipped each token to C, silently). Its attention projections are batch-first: their per-sample
    gradients equal a batch-of-one loop."""
    ids = torch.randint(3, 97, (3, 6), generator=torch.Generator().manual_seed(1))
    model = _tiny_opt()
    ff.inject_adapters(model, ["fc1", "fc2"], r=4, alpha=8.0)
    dp = make_dp(model, clipping=clipping, expected_batch_size=3)
    _lm_loss(model, {"ids": ids}).backward()
    with pytest.raises(ValueError, match=r"'model\.decoder\.layers\.0\.fc1\.lora_B': 18.*on 3 samples \(input_ids"):
        dp.step()

    model = _tiny_opt()
    ff.inject_adapters(model, ["q_proj", "v_proj"], r=4, alpha=8.0)
    with torch.no_grad():
        for layer in ff.adapter_layers(model).values():
            layer.lora_B.normal_(0, 0.3)
    dp = make_dp(model, expected_batch_size=3)
    loop = per_sample_grads_loop(model, _lm_loss, {"ids": ids})
    _lm_loss(model, {"ids": ids}).backward()
    got = per_sample_grads_engine(model)
    assert got.keys() == loop.keys() and len(got) == 4
    for name in loop:
        assert_close_verbose(got[name], loop[name], atol=1e-5, rtol=1e-4, name=name)
    dp.step()


def test_the_model_inputs_sample_count_is_read_from_the_input_not_a_mask_or_labels():
    """``_model_samples``: the Hugging Face input first (whatever the keyword order, also a key inside a batch
    passed whole), else the call's first tensor, opening dicts, lists, tuples and dataclasses; nothing to count
    by gives None (refused by ``_check_rows``)."""
    ids, mask, pos = torch.zeros(4, 7), torch.zeros(4, 7), torch.zeros(1, 7)
    assert dpsgd._model_samples((), {"position_ids": pos, "attention_mask": mask, "input_ids": ids}) == (4, "input_ids")
    assert dpsgd._model_samples((), {"position_ids": pos, "inputs_embeds": ids}) == (4, "inputs_embeds")
    got = dpsgd._model_samples(({"labels": mask[:1, 0], "pixel_values": ids},), {})
    assert got == (4, "positional argument 0['pixel_values']")
    assert dpsgd._model_samples((3.0, ids), {"position_ids": pos}) == (4, "positional argument 1")
    assert dpsgd._model_samples((torch.tensor(2.0),), {"h": ids}) == (4, "h")
    assert dpsgd._model_samples(((ids, mask[:1]),), {}) == (4, "positional argument 0[0]")
    assert dpsgd._model_samples((), {"batch": [pos[0, :1], {"x": ids}]}) == (1, "batch[0]")

    @dataclasses.dataclass
    class Batch:
        x: torch.Tensor
        n: int = 0

    assert dpsgd._model_samples((Batch(ids),), {}) == (4, "positional argument 0.x")
    assert dpsgd._model_samples(([1, "a"],), {"scale": 2.0, "s": torch.tensor(1.0)}) is None


@pytest.mark.parametrize("call", ["tuple", "list", "keyword_tuple", "keyword_dict", "dataclass"])
def test_a_batch_passed_whole_is_counted_and_a_call_with_nothing_to_count_is_refused(call):
    """A batch passed as one tuple, list, dict or dataclass is opened to count its samples (a review found
    ``model((x, y))`` with folded rows stepped: 15 rows clipped as samples). Gradients of a forward whose samples
    cannot be counted (no tensor in the call; submodules called instead of the model) are refused: the check
    fails closed."""

    @dataclasses.dataclass
    class Batch:
        x: torch.Tensor

    torch.manual_seed(0)
    model = _Folding("fold")
    ff.inject_adapters(model, ["lin"], r=R, alpha=6.0)
    take = {"tuple": lambda b: b[0], "list": lambda b: b[0], "keyword_tuple": lambda b: b[0],
            "keyword_dict": lambda b: b["x"], "dataclass": lambda b: b.x}[call]
    wrap = {"tuple": lambda x: (x, 1.0), "list": lambda x: [x], "keyword_tuple": lambda x: (x,),
            "keyword_dict": lambda x: {"x": x}, "dataclass": lambda x: Batch(x)}[call]
    forward = model.forward
    if call.startswith("keyword"):
        model.forward = lambda batch: forward(take(batch))
        run = lambda x: model(batch=wrap(x))  # noqa: E731
    else:
        model.forward = lambda b: forward(take(b))
        run = lambda x: model(wrap(x))  # noqa: E731
    dp = make_dp(model)
    b = make_batch(3, 5)
    ((run(b["x"]) - b["y"]) ** 2).sum().backward()
    with pytest.raises(ValueError, match=r"\{'lin\.lora_B': 15\} .* called on 3 samples"):
        dp.step()
    dp.zero_grad()
    # nothing to count by: the model called with a callable holding the batch; then a submodule called alone
    model.forward = lambda get: forward(get())
    ((model(lambda: b["x"]) - b["y"]) ** 2).sum().backward()
    with pytest.raises(ValueError, match=r"cannot count the samples .* \['lin\.lora_B'\].*dp\.zero_grad\(\)"):
        dp.step()
    dp.zero_grad()
    model.forward = forward
    model(b["x"][:, :1])  # a counted forward (3 samples, 3 rows), then a submodule alone on 15 rows
    ((model.lin(b["x"].reshape(-1, IN)) - b["y"].reshape(-1, OUT)) ** 2).sum().backward()
    with pytest.raises(ValueError, match=r"called on 3 samples"):
        dp.step()
    assert dp.steps == 0


def test_routed_experts_and_a_sparse_masked_lm_head_are_refused_when_the_engine_is_built():
    """A routed expert's rows are the tokens routed to it, and ModernBERT's masked-LM head with
    ``sparse_prediction`` sees the masked tokens: when their count equals the batch's the row check cannot
    tell (a review found Switch Transformers' experts and that head clipped per token, silently). Refused by
    where they sit; shared experts are batch-first and accepted."""

    class Moe(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList([nn.Linear(IN, OUT), nn.Linear(IN, OUT)])
            self.shared_experts = nn.ModuleList([nn.Linear(IN, OUT)])

        def forward(self, x):
            return self.shared_experts[0](x) + self.experts[0](x[:1])

    model = Moe()
    ff.inject_adapters(model, ["experts.0", "shared_experts.0"], r=R, alpha=6.0)
    with pytest.raises(ValueError, match=r"\['experts\.0'\] see tokens gathered from the whole batch"):
        make_dp(model)
    model = Moe()
    ff.inject_adapters(model, ["shared_experts.0"], r=R, alpha=6.0)
    make_dp(model)

    transformers = pytest.importorskip("transformers")
    for sparse in (True, False):
        cfg = transformers.ModernBertConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, sparse_prediction=sparse, pad_token_id=0)
        model = transformers.ModernBertForMaskedLM(cfg)
        ff.inject_adapters(model, ["Wqkv", "decoder"], r=4, alpha=8.0, trainable_modules=["head.norm"])
        if sparse:
            with pytest.raises(ValueError, match=r"\['head\.norm', 'decoder'\] see tokens gathered"):
                make_dp(model)
        else:
            make_dp(model)


def _tiny_nllb_moe(fraction):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.NllbMoeConfig(
        vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_experts=4, expert_capacity=3,
        encoder_sparse_step=2, decoder_sparse_step=2, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        moe_token_dropout=0.0, max_position_embeddings=32, moe_eval_capacity_token_fraction=fraction,
        router_z_loss_coef=0.0, router_aux_loss_coef=0.0,
    )
    model = transformers.NllbMoeForConditionalGeneration(cfg)
    ff.inject_adapters(model, ["q_proj", "v_proj"], r=4, alpha=8.0)
    return model


def test_an_expert_capacity_shared_by_the_batch_is_refused_like_batch_statistics_and_instance_norm_is_not():
    """NLLB-MoE's router drops the tokens past an expert's capacity, counted over the whole batch: one sample's
    tokens decide another's, so even plain attention adapters' per-sample gradients depend on other samples (a
    review measured 0.3% off the batch-of-one loop). Refused in training mode and in eval mode with a capacity
    fraction below 1; eval mode with fraction 1 drops nothing and runs. InstanceNorm normalises each sample by
    its own statistics: no longer refused as batch norm."""
    ids = torch.randint(3, 97, (3, 6), generator=torch.Generator().manual_seed(1))
    dec = torch.randint(3, 97, (3, 4), generator=torch.Generator().manual_seed(2))
    for fraction, mode, refused in ((1.0, "train", True), (0.2, "eval", True), (1.0, "eval", False)):
        model = _tiny_nllb_moe(fraction)
        getattr(model, mode)()
        make_dp(model, expected_batch_size=3)
        run = lambda: model(input_ids=ids, decoder_input_ids=dec).logits.sum()  # noqa: E731
        if refused:
            with pytest.raises(ValueError, match=r"route tokens to experts up to a capacity shared by the whole"):
                run()
        else:
            run().backward()
            assert per_sample_grads_engine(model)["model.encoder.layers.0.self_attn.q_proj.lora_B"].shape[0] == 3

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HID), nn.InstanceNorm1d(5), nn.Linear(HID, OUT)).train()  # (n, 5, HID)
    ff.inject_adapters(model, ["0"], r=R, alpha=6.0)
    dp = make_dp(model)
    b = make_batch(3, 5)
    ((model(b["x"]) - b["y"]) ** 2).sum().backward()
    dp.step()


def test_a_packed_batch_is_refused():
    """A padding-free batch (``cu_seq_lens_*``: several sequences in one row, as ``DataCollatorWithFlattening``
    makes) would be clipped as one sample per row."""
    model = make_model()
    make_dp(model)
    x = make_batch(1, 6)["x"]
    with pytest.raises(ValueError, match=r"\['cu_seq_lens_q'\], a packed \(padding-free\) batch"):
        model.forward = lambda x, cu_seq_lens_q=None: model[2](model[1](model[0](x)))
        model(x, cu_seq_lens_q=torch.tensor([0, 2, 6]))


def test_a_packed_sequence_and_seq_idx_are_refused_as_packed_batches():
    """A ``PackedSequence`` is a tuple whose ``data`` has one row per token of all sequences: counted as the
    batch it let every token be clipped as a sample (a review: 8 rows stepped for 2 sequences). ``seq_idx``
    (``DataCollatorWithFlattening(return_seq_idx=True)``) marks a packed row."""
    model = make_model()
    make_dp(model)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(2, 5, IN), torch.tensor([5, 3]), batch_first=True)
    model.forward = lambda p, seq_idx=None: model[2](model[1](model[0](p.data if seq_idx is None else p)))
    with pytest.raises(ValueError, match=r"called with a PackedSequence \(positional argument 0\)"):
        model(packed)
    with pytest.raises(ValueError, match=r"\['seq_idx'\], a packed \(padding-free\) batch"):
        model(torch.randn(1, 6, IN), seq_idx=torch.tensor([[0, 0, 1, 1, 1, 2]]))


def test_an_engine_on_an_inner_model_detaches_the_one_on_the_outer_model():
    """One engine per layer: an engine built on an inner model took the outer engine's layers, while the outer
    engine stayed open and could step sums clipped under the inner engine's thresholds (a review: per-layer
    C = 100 inside, noise for C = 1 outside, a clipped sum of norm 360 for 4 samples)."""
    outer = make_model()
    dp_outer = make_dp(outer, clipping="per_layer")
    inner = nn.Sequential(*outer[:2])  # shares outer[0], the adapted layer
    inner_params = [p for p in inner.parameters() if p.requires_grad]
    dp_inner = ff.DPSGD(inner, torch.optim.SGD(inner_params, lr=1.0), max_grad_norm=100.0, noise_multiplier=0.0,
                        expected_batch_size=4, clipping="per_layer")
    assert dpsgd.attached_engine(outer) is None and dpsgd.attached_engine(inner) is dp_inner
    b = make_batch(4, 3)
    (inner(b["x"]) ** 2).sum().backward()
    with pytest.raises(RuntimeError, match="this engine was detached"):
        dp_outer.step()
    dp_inner.step()


class _Checkpointed(nn.Module):
    """``_Folding`` run under reentrant activation checkpointing: its layer is recomputed in the backward."""

    def __init__(self, how):
        super().__init__()
        self.inner = _Folding(how)

    def forward(self, x):  # (reentrant checkpointing trains parameters only through an input with grad)
        return torch.utils.checkpoint.checkpoint(self.inner, x.requires_grad_(True), use_reentrant=True)


def test_reentrant_checkpointing_checks_rows_against_the_one_open_forward():
    """A layer recomputed in the backward records the latest forward's batch id, not its own: a folded forward
    followed by another forward on as many samples as it has rows stepped (a review), and a batch-first one
    followed by a smaller forward was refused as folded. With one open forward each is checked against it;
    with more, refused, saying why."""
    torch.manual_seed(0)
    b, x15 = make_batch(3, 5), torch.randn(15, 5, IN)
    for how, rows in (("fold", 15), ("transpose", 5)):
        model = _Checkpointed(how)
        ff.inject_adapters(model, ["inner.lin"], r=R, alpha=6.0)
        dp = make_dp(model)
        ((model(b["x"].clone()) - b["y"]) ** 2).sum().backward()  # one open forward: refused
        with pytest.raises(ValueError, match=rf"'inner\.lin\.lora_B': {rows}\}} .* called on 3 samples"):
            dp.step()
        dp.zero_grad()
        loss = ((model(b["x"].clone()) - b["y"]) ** 2).sum()
        model(x15.clone() if how == "fold" else torch.randn(5, 5, IN))  # a second forward as large as the rows
        loss.backward()
        with pytest.raises(ValueError, match=r"2 forwards with grad since the last clip, and layers were recomputed"):
            dp.step()
        dp.zero_grad()

    # batch-first under checkpointing: the usual loop steps; two open forwards are refused, not misread
    model = make_model()
    model.forward = lambda x: torch.utils.checkpoint.checkpoint(lambda h: model[2](model[1](model[0](h))),
                                                                x.clone().requires_grad_(True), use_reentrant=True)
    dp = make_dp(model)
    for n in (4, 3):
        bn = make_batch(n, 2)
        ((model(bn["x"]) - bn["y"]) ** 2).sum().backward()
        dp.step()
        dp.zero_grad()
    first, second = make_batch(4, 2), make_batch(3, 2)
    loss = ((model(first["x"]) - first["y"]) ** 2).sum()
    model(second["x"])
    loss.backward()
    with pytest.raises(ValueError, match=r"2 forwards with grad since the last clip"):
        dp.accumulate()
    assert dp.steps == 2


def test_a_clipping_threshold_too_small_for_float32_is_refused():
    """A reviewer's finding (2026-11-28): max_grad_norm = 2.1e-45 (1.5 float32 subnormal steps) was accepted, and
    every entry of a clipped gradient rounded to a whole subnormal step: a sample's clipped norm was 1.886 C
    against noise for C (a reported epsilon of 8 was ~22). A re-review: at 2^-100 the clip coefficient C / N itself
    went subnormal for N ~ C 2^149 (clipped norm 1.9 C). Thresholds below 2^-60 are refused (the engine's, the
    per-layer ones, the federated run's); at 2^-60 a clipped sample stays within float32 rounding of C, for
    norms up to float32's largest."""
    from fedlora_fast.federated.simulation import FederatedConfig

    model = make_model()
    for bad in (2.1e-45, 1e-35, 2.0**-100, 2.0**-61):
        with pytest.raises(ValueError, match=r"max_grad_norm: expected at least 8.67e-19 \(2\^-60"):
            make_dp(model, max_grad_norm=bad)
        with pytest.raises(ValueError, match=r"max_grad_norm: expected at least 8.67e-19"):
            FederatedConfig(max_grad_norm=bad).validate()
    C = 2.0**-60
    dp = make_dp(model, max_grad_norm=C, expected_batch_size=1)
    for seed in range(5):  # (norms up to ~1e17: C / N near float32's smallest normal)
        loss_fn(model, make_batch(1, 3, seed=seed, scale=10.0 ** (4 * seed - 3))).backward()
        dp.accumulate()
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in dp.clipped_sum()))
        assert 0 < norm <= C * (1 + 1e-6), (seed, norm / C)
        dp.zero_grad()
    with pytest.raises(ValueError, match=r"max_grad_norm: expected at least"):
        dp.max_grad_norm = 1e-40
    L = len(params(model))
    with pytest.raises(ValueError, match=r"per_layer_max_grad_norm\[0\]: expected at least 8.67e-19"):
        make_dp(model, clipping="per_layer", per_layer_max_grad_norm=[1e-40] + [0.1] * (L - 1))


def test_per_layer_default_thresholds_below_the_floor_are_refused_by_max_grad_norm():
    """A re-review (2026-11-28): with clipping='per_layer' the default thresholds C / sqrt(L) fell below 2^-60 for
    C just above it, refused under another name (per_layer_max_grad_norm[0]) and, in a federated run, only at the
    first fit. The engine and the run's model build now refuse it naming max_grad_norm and the least C."""
    model = make_model()
    L = len(params(model))
    assert L > 1
    C = 2.0**-60 * math.sqrt(L) * 0.99
    with pytest.raises(ValueError, match=rf"max_grad_norm: with clipping='per_layer' each of the {L} trainable "
                                         rf"tensors is clipped to max_grad_norm / sqrt\({L}\) = .* expected "
                                         rf"max_grad_norm of at least"):
        make_dp(model, clipping="per_layer", max_grad_norm=C)
    dp = make_dp(model, clipping="per_layer", max_grad_norm=2.0**-60 * math.sqrt(L) * 1.01)
    assert dp.sensitivity == pytest.approx(2.0**-60 * math.sqrt(L) * 1.01)
    with pytest.raises(ValueError, match=r"max_grad_norm: with clipping='per_layer'"):
        dp.max_grad_norm = C
    make_dp(model, max_grad_norm=C)  # flat: C itself is above the floor

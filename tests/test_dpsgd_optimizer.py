"""The engine and the optimizer's step: one optimizer step per release; GradScaler and accelerate's skipped steps.

An extra ``optimizer.step()`` after ``dp.step()`` applied the same noisy gradient twice (opacus users' habit, and
``transformers.Trainer`` stepping after a callback's ``dp.step()``); an enabled GradScaler multiplied every
per-sample gradient by its scale before the clip, and never backed off; accelerate's optimizer skipped the
step of micro-batches that do not sync, after the release was noised and accounted.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fedlora_fast as ff


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
    ff.inject_adapters(model, ["0"], r=2, alpha=4.0, trainable_modules=["2"])
    with torch.no_grad():
        model[0].lora_B.normal_(0, 0.5)
    return model


def trained(model):
    return [p for p in model.parameters() if p.requires_grad]


def loss(model, seed=1, n=4):
    g = torch.Generator().manual_seed(seed)
    return model(torch.randn(n, 5, generator=g)).pow(2).sum()


def release(model, dp):
    """A backward, then the release driven by hand (opacus's staging), without the optimizer's step."""
    loss(model).backward()
    dp.clip_and_accumulate()
    dp.add_noise()
    dp.scale_grad()


def snapshot(model):
    return [p.detach().clone() for p in trained(model)]


def test_an_optimizer_step_after_dp_step_or_without_a_release_is_refused():
    model = make()
    opt = torch.optim.SGD(trained(model), lr=0.1, momentum=0.9)
    dp = ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4, sample_rate=0.01)
    loss(model).backward()
    dp.step()
    after = snapshot(model)
    with pytest.raises(RuntimeError, match=r"optimizer.step\(\): no DP-SGD release since the optimizer's last step"):
        opt.step()  # the same noisy gradient again (it moved the weights twice as far)
    assert all(torch.equal(a, p) for a, p in zip(after, trained(model)))
    assert dp.accountant.steps == 1 and dp.steps == 1
    dp.zero_grad()
    with pytest.raises(RuntimeError, match=r"no DP-SGD release"):
        opt.step()  # a framework's own step with nothing released (Trainer without the callback)
    # the staged release, then the optimizer's own step: allowed once
    loss(model, seed=2).backward()
    dp.clip_and_accumulate()
    dp.add_noise()
    dp.scale_grad()
    opt.step()
    with pytest.raises(RuntimeError, match=r"no DP-SGD release"):
        opt.step()
    assert dp.accountant.steps == 2
    dp.zero_grad()
    dp.detach()
    opt.step()  # detached: the optimizer is the caller's again


@pytest.mark.parametrize("enabled", [True, False])
def test_a_step_through_an_enabled_grad_scaler_is_refused(enabled):
    """The scaler's scale multiplied each per-sample gradient before the clip (the reviewer's run: updates 1/1024
    of DP-SGD's with C; the scale grew until every sample overflowed and was dropped, each step still counted)."""
    model = make()
    opt = torch.optim.SGD(trained(model), lr=0.1)
    dp = ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=enabled)
    scaler.scale(loss(model)).backward()
    dp.clip_and_accumulate()
    dp.add_noise()
    dp.scale_grad()
    before = snapshot(model)
    if enabled:
        with pytest.raises(RuntimeError, match=r"called through an enabled torch.amp.GradScaler"):
            scaler.step(opt)
        assert all(torch.equal(a, p) for a, p in zip(before, trained(model)))
    else:  # a disabled scaler steps the optimizer itself, unscaled: allowed
        scaler.step(opt)
        assert not all(torch.equal(a, p) for a, p in zip(before, trained(model)))
    dp.detach()


class SkippingWrapper(torch.optim.Optimizer):
    """A wrapper whose step sometimes does not reach the optimizer it wraps (as accelerate's does)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.skip = True

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def step(self, closure=None):
        if not self.skip:
            self.optimizer.step(closure)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none)


def test_a_release_the_optimizer_wrapper_did_not_apply_is_reported():
    model = make()
    opt = SkippingWrapper(torch.optim.SGD(trained(model), lr=0.1))
    dp = ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4, sample_rate=0.01)
    loss(model).backward()
    with pytest.raises(RuntimeError, match=r"SkippingWrapper.step\(\) returned without stepping the optimizer"):
        dp.step()
    assert dp.accountant.steps == 1  # (released and counted: an unapplied release is never uncounted)
    opt.skip = False
    dp.zero_grad()
    loss(model).backward()
    before = snapshot(model)
    dp.step()
    assert not all(torch.equal(a, p) for a, p in zip(before, trained(model)))


def test_accelerate_gradient_accumulation_steps_only_when_it_syncs():
    accelerate = pytest.importorskip("accelerate")
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = make()
    applied = []
    inner = torch.optim.SGD(trained(model), lr=0.1)
    inner.register_step_post_hook(lambda *a: applied.append(1))
    model, opt = acc.prepare(model, inner)
    dp = ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=8, sample_rate=0.1)
    # accelerate's own idiom with dp.step() where optimizer.step() goes: refused where it does not sync
    with acc.accumulate(model):
        acc.backward(loss(model, seed=0))
        with pytest.raises(RuntimeError, match=r"accelerate is accumulating gradients .*call dp.accumulate\(\)"):
            dp.step()
        assert dp.accountant.steps == 0 and dp._pending_batches == 0  # nothing clipped, noised or counted
        dp.accumulate()  # the micro-batch goes into the step instead
        with pytest.raises(RuntimeError, match=r"accelerate is accumulating"):
            dp.add_noise()  # (driving the stages by hand: refused where the release is made)
    for step in range(1, 4):
        with acc.accumulate(model):
            acc.backward(loss(model, seed=step))
            if acc.sync_gradients:
                dp.step()
                dp.zero_grad()
            else:
                dp.accumulate()
    assert dp.steps == dp.accountant.steps == len(applied) == 2


class WithLoss(nn.Module):
    """A model as transformers.Trainer takes one: keyword inputs, a loss (the per-sample sum) in its output."""

    def __init__(self):
        super().__init__()
        self.net = make()

    def forward(self, x, y):
        return {"loss": (self.net(x) - y).pow(2).sum()}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_transformers_trainer_with_the_documented_callback(tmp_path, accumulation):
    """The README's pattern: the three stages in on_pre_optimizer_step, accumulate() in on_substep_end. Trainer's
    own optimizer.step() then applies each release once; without the callback its step is refused."""
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(5, generator=g), "y": torch.randn(2, generator=g)} for _ in range(16)]

    def run(callback: bool):
        model = WithLoss()
        opt = torch.optim.SGD(trained(model), lr=0.1)
        dp = ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=0.5, expected_batch_size=4, sample_rate=0.25)

        class Staged(transformers.TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kw):
                dp.clip_and_accumulate()
                dp.add_noise()
                dp.scale_grad()

            def on_substep_end(self, args, state, control, **kw):
                dp.accumulate()

            def on_step_end(self, args, state, control, **kw):
                dp.zero_grad()

        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=4 // accumulation, max_steps=3,
            gradient_accumulation_steps=accumulation, learning_rate=0.1, report_to=[], use_cpu=True,
            save_strategy="no", lr_scheduler_type="constant", disable_tqdm=True, remove_unused_columns=False,
        )
        applied = []
        opt.register_step_post_hook(lambda *a: applied.append(1))
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None),
                                       callbacks=[Staged()] if callback else [])
        trainer.train()
        return dp, applied

    dp, applied = run(callback=True)
    assert dp.steps == dp.accountant.steps == len(applied) == 3 and dp.last_step_samples == 4
    # without it: Trainer's step is refused (with accumulation, the next micro-batch's forward is, first)
    refused = "no DP-SGD release since the optimizer's last step" if accumulation == 1 else "never consumed"
    with pytest.raises(RuntimeError, match=refused):
        run(callback=False)


def test_a_release_discarded_or_replaced_before_the_optimizer_step_is_not_stepped():
    """After scale_grad(), dp.zero_grad() (or the next forward's drop of the stale .grad) discards the release, but
    the step guard still took it as pending: a bare optimizer.step() then applied whatever .grad held, e.g. an
    unclipped gradient from the head's weight used outside its module (the reviewer's run moved it by 0.34)."""
    model = make()
    opt = torch.optim.SGD(trained(model), lr=0.1)
    dp = ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)
    release(model, dp)
    dp.zero_grad()
    h = torch.randn(4, 6)
    nn.functional.linear(h, model[2].weight).pow(2).sum().backward()  # raw, unclipped
    assert model[2].weight.grad is not None
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"no DP-SGD release since the optimizer's last step"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, trained(model)))
    # a release whose .grad is replaced by hand before the step is refused too
    dp.zero_grad()
    release(model, dp)
    model[2].weight.grad = torch.ones_like(model[2].weight)
    with pytest.raises(RuntimeError, match=r"or its .grad changed since"):
        opt.step()
    # and one dropped by the next forward (its optimizer step skipped) as well
    dp.zero_grad()
    release(model, dp)
    model(torch.randn(2, 5))  # drops the released .grad
    with pytest.raises(RuntimeError, match=r"no DP-SGD release"):
        opt.step()
    dp.detach()


def test_a_raw_gradient_added_in_place_to_a_release_withdraws_it():
    """Autograd adds into an existing .grad in place (the same tensor): a backward using the head's weight outside
    its module, between the release and the optimizer's step, rode on the release unclipped (the reviewer's step
    moved the head by 3.0, the release alone by 0.19)."""
    model = make()
    opt = torch.optim.SGD(trained(model), lr=0.1)
    dp = ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)
    release(model, dp)
    released = model[2].weight.grad
    nn.functional.linear(torch.randn(4, 6), model[2].weight).pow(2).sum().backward()
    assert model[2].weight.grad is released  # (in place)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"no DP-SGD release since the optimizer's last step"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, trained(model)))
    dp.zero_grad()
    dp.detach()
    assert not model[2].weight._post_accumulate_grad_hooks  # (detach removes them)

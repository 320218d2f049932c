"""Per-sample gradients kept as their factors (``fedlora_fast.reference.ghost``, ``per_sample.Factors``).

A trained Linear whose (n, out, in) per-sample gradients would be larger than its input and output gradient
(a vocabulary-sized ``lm_head``, a classifier head) and a trained embedding keep the factors; norms come from
(T, T) Gram matrices in float64 and the clipped sum from one matrix product or scatter-add. Checked against
float64 per-sample gradients built by a loop and against the batch-of-one loop through the engine.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fedlora_fast as ff
from fedlora_fast import per_sample
from fedlora_fast.reference import ghost
from fedlora_fast.testing import (
    assert_close_verbose, assert_engine_matches_loop, per_sample_grads_engine, per_sample_grads_loop,
)


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def _dense64(terms, rows):
    """The float64 per-sample gradients of ``terms``, summed token by token."""
    right = terms[0][1]
    n, cols = right.shape[0], right.shape[2]
    out = torch.zeros(n, rows, cols, dtype=torch.float64)
    terms = [(left.cpu(), r.cpu()) for left, r in terms]
    for left, r in terms:
        for i in range(n):
            for t in range(left.shape[1]):
                row = torch.zeros(rows, dtype=torch.float64)
                if left.is_floating_point():
                    row = left[i, t].double()
                else:
                    row[left[i, t]] = 1.0
                out[i] += torch.outer(row, r[i, t].double())
    return out


def _terms(kind, n, T, rows, cols, gen):
    dense = (torch.randn(n, T, rows, generator=gen), torch.randn(n, T, cols, generator=gen))
    ids = (torch.randint(0, rows, (n, T + 2), generator=gen), torch.randn(n, T + 2, cols, generator=gen))
    return {"dense": [dense], "ids": [ids], "both": [ids, dense]}[kind]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["dense", "ids", "both"])
@pytest.mark.parametrize("n, T, rows, cols", [(1, 1, 1, 1), (5, 3, 7, 4), (3, 6, 13, 5), (0, 2, 3, 2)])
def test_norms_clipped_sum_and_dense_form_equal_the_float64_loop(kind, n, T, rows, cols, device):
    gen = torch.Generator().manual_seed(n * 1000 + T * 100 + rows)
    terms = [(left.to(device), right.to(device)) for left, right in _terms(kind, n, T, rows, cols, gen)]
    want = _dense64(terms, rows)
    assert_close_verbose(ghost.ghost_grad_sample(terms, rows), want, atol=1e-5, rtol=1e-5, name="dense")
    norm2 = ghost.ghost_norm2(terms)
    assert norm2.dtype == torch.float32 and norm2.shape == (n,)
    assert_close_verbose(norm2, want.flatten(1).pow(2).sum(1), atol=1e-5, rtol=1e-5, name="norm2")
    coef = torch.rand(n, generator=gen)
    coef[:1] = 0.0
    got = ghost.ghost_clip_reduce(terms, coef.to(device), rows)
    assert_close_verbose(got, torch.einsum("n,nrc->rc", coef.double(), want), atol=1e-5, rtol=1e-5, name="sum")


@pytest.mark.parametrize("kind", ["dense", "both"])
def test_a_non_finite_factor_drops_its_own_sample_only(kind):
    gen = torch.Generator().manual_seed(3)
    terms = _terms(kind, 4, 3, 6, 5, gen)
    norm2 = ghost.ghost_norm2(terms)
    bad = [(left.clone(), right.clone()) for left, right in terms]
    bad[-1][0][1, 0, 2] = float("nan")  # sample 1's left factor
    bad[-1][1][2, 1, 0] = float("inf")  # sample 2's right factor
    got = ghost.ghost_norm2(bad)
    assert not torch.isfinite(got[1:3]).any()
    assert_close_verbose(got[[0, 3]], norm2[[0, 3]], atol=0, rtol=0, name="the other samples' norms")
    coef = torch.tensor([0.5, 0.0, 0.0, 0.25])
    want = torch.einsum("n,nrc->rc", coef.double(), _dense64(terms, 6))
    assert_close_verbose(ghost.ghost_clip_reduce(bad, coef, 6), want, atol=1e-5, rtol=1e-5, name="sum")


def test_tokens_that_cancel_give_the_norm_of_what_is_left_not_a_rounding_error():
    """Sample i's second token undoes its first (-3 g and x / 3): its gradient is what x / 3 rounded leaves,
    ~1e-7 of |g| |x|. A float32 Gram would round |P|^2 to within ~1e-7 of |g|^2 |x|^2 (a sample of norm
    ~3e-4 |g| |x| could pass for a norm of 0); the float64 Gram gets it to 1e-12 of that scale."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3, 1, 300, generator=gen) * 30
    x = torch.randn(3, 1, 200, generator=gen) * 30
    terms = [(torch.cat([g, -3 * g], 1), torch.cat([x, x / 3], 1))]
    want = _dense64(terms, 300).flatten(1).pow(2).sum(1)
    scale = (g.flatten(1).norm(dim=1).double() * x.flatten(1).norm(dim=1).double() * 2) ** 2
    assert bool((want < 1e-10 * scale).all())  # (the tokens do cancel)
    err = (ghost.ghost_norm2(terms).double() - want).abs()
    assert bool((err < 1e-12 * scale).all()), (err / scale).tolist()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["dense", "ids"])
def test_a_sample_of_huge_tokens_that_cancel_moves_the_clipped_sum_by_at_most_C(kind, device):
    """The last sample's two tokens cancel exactly (G u x^T and -G u x^T, G = 1e18): its gradient is 0, so no
    clip scales it down, yet summed in one product with the other samples' tokens its first term absorbs their
    sum (rounded away at ~1e-16 G, 100 here) and its second takes it back to 0: the other samples vanish from
    those elements (1.36 against C = 0.5 without the cap). The cap (``CANCEL_CAP``) drops it. (A table's rows of
    equal id are summed per sample before any other sample's: there the cap is a second line.)"""
    gen = torch.Generator().manual_seed(8)
    n, rows, cols, C = 8, 3, 5, 0.5
    right = torch.randn(n, 3, cols, generator=gen)
    if kind == "dense":
        left = torch.randn(n, 3, rows, generator=gen)
        left[-1, 0], left[-1, 2] = 1e18 * left[-1, 0], -1e18 * left[-1, 0]
        right[-1, 2] = right[-1, 0]
    else:
        left = torch.randint(0, rows, (n, 3), generator=gen)
        left[-1, 2] = left[-1, 0]
        right[-1, 0] *= 1e18
        right[-1, 2] = -right[-1, 0]
    right[-1, 1] = 0.0  # (its middle token adds nothing)
    terms = [(left.to(device), right.to(device))]
    norm2 = ghost.ghost_norm2(terms)
    assert float(norm2[-1]) == 0.0
    coef = (C / (norm2.sqrt() + 1e-6)).clamp(max=1.0)
    with_it = ghost.ghost_clip_reduce(terms, coef, rows)
    without = ghost.ghost_clip_reduce(terms, torch.cat([coef[:-1], torch.zeros(1, device=device)]), rows)
    assert float(without.norm()) > 2 * C  # (the others' sum is large enough to lose)
    assert float((with_it.double() - without.double()).norm()) <= C


def test_chunks_of_samples_and_tiles_of_rows_give_the_same_results(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    terms = _terms("both", 7, 4, 9, 5, gen)
    coef = torch.rand(7, generator=gen)
    whole, summed = ghost.ghost_norm2(terms), ghost.ghost_clip_reduce(terms, coef, 9)
    monkeypatch.setattr(ghost, "CHUNK_BYTES", 1)  # one sample per chunk, one row per tile
    assert_close_verbose(ghost.ghost_norm2(terms), whole, atol=0, rtol=1e-6, name="norms by chunks")
    assert_close_verbose(ghost.ghost_clip_reduce(terms, coef, 9), summed, atol=1e-6, rtol=1e-6, name="sum by tiles")


def test_a_factor_changed_in_place_after_the_backward_is_refused_and_callers_tensors_are_copied():
    """The norm is taken in the backward, the clipped sum at the step: an id buffer refilled in between (all ids
    0 here) summed every token's row into one under the old norm's coefficient, 3.75 C for one sample (a
    reviewer's run; sqrt(T) C at most). The rules copy what the caller owns (ids, a float32 input), and a kept
    factor changed in place is refused."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(40, 8)
            self.body = nn.Linear(8, 8)
            self.head = nn.Linear(8, 30)

        def forward(self, ids, x):
            return self.body(self.emb(ids)).sum() + self.head(x).pow(2).sum()

    torch.manual_seed(0)
    model = M()
    ff.inject_adapters(model, ["body"], r=1, trainable_modules=["emb", "head"])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    dp = ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=1)
    ids, x = torch.arange(16).unsqueeze(0), torch.randn(1, 4, 8)
    sums = []
    for refill in (False, True):
        ids_buf, x_buf = ids.clone(), x.clone()
        model(ids_buf, x_buf).backward()
        if refill:  # (a loader refilling its buffers before the step)
            ids_buf.zero_()
            x_buf.mul_(100.0)
        assert isinstance(per_sample.pending(model.emb.weight).grad_sample, per_sample.Factors)
        assert isinstance(per_sample.pending(model.head.weight).grad_sample, per_sample.Factors)
        dp.accumulate()
        sums.append(torch.cat([t.flatten() for t in dp.clipped_sum()]))
        dp.zero_grad()
    assert float(sums[1].norm()) <= 1.0 + 1e-6
    assert_close_verbose(sums[1], sums[0], atol=0, rtol=0, name="clipped sum after the caller's buffers changed")
    dp.detach()
    f = per_sample.Factors(_terms("both", 2, 3, 5, 4, torch.Generator().manual_seed(1)), 5)
    f.terms[1][1].add_(1.0)
    with pytest.raises(per_sample.PerSampleStateError, match="changed in place after the backward"):
        f.clip_reduce(torch.ones(2))


def test_a_table_of_few_rows_keeps_dense_per_sample_gradients():
    """BERT's token types (2 rows) at many tokens: the dense (n, 2, dim) form is smaller than the factors."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Embedding(2, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    ff.inject_adapters(model, ["2"], r=1, trainable_modules=["0"])
    ids = torch.randint(0, 2, (3, 9), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    dp = ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=3)
    model(ids).pow(2).sum().backward()
    kept = per_sample.pending(model[0].weight).grad_sample
    assert isinstance(kept, torch.Tensor) and kept.shape == (3, 2, 6)
    dp.zero_grad()
    dp.detach()
    assert_engine_matches_loop(model, lambda m, b: m(b["ids"]).pow(2).sum(), {"ids": ids})


def test_factors_add_up_two_uses_and_refuse_copies():
    gen = torch.Generator().manual_seed(5)
    a = per_sample.Factors(_terms("both", 3, 2, 6, 4, gen), 6)
    b = per_sample.Factors(_terms("both", 3, 4, 6, 4, gen), 6)
    s = a + b
    assert len(s.terms) == 2 and s.shape == (3, 6, 4)
    assert_close_verbose(s.dense(), a.dense().double() + b.dense().double(), atol=1e-5, rtol=1e-5, name="sum")
    assert_close_verbose(s.norm2(), (a.dense() + b.dense()).flatten(1).pow(2).sum(1), atol=1e-4, rtol=1e-5,
                         name="norm2 of the sum")
    with pytest.raises(per_sample.PerSampleStateError, match="unclipped"):
        copy.deepcopy(s)
    with pytest.raises(ValueError, match="must be"):
        per_sample.Factors([(torch.zeros(2, 3, 4), torch.zeros(2, 4, 4))], 4)


class _Head(nn.Module):
    """A wide head (kept as factors) applied to every token, used twice in a forward, and a narrow one with
    many tokens (kept dense)."""

    def __init__(self, twice: bool):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.wide = nn.Linear(6, 40)
        self.narrow = nn.Linear(6, 2)
        self.twice = twice  # (per-layer clipping refuses a module used twice in a forward)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        y = self.wide(h).pow(2).sum(-1) + self.narrow(h).sum(-1)
        return y + self.wide(h * 0.5).sum(-1) if self.twice else y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_a_linear_kept_as_factors_equals_the_loop(clipping, device):
    torch.manual_seed(1)
    model = _Head(twice=clipping == "flat").double().to(device)
    ff.inject_adapters(model, ["body"], r=2, alpha=4.0, trainable_modules=["wide", "narrow"])
    gen = torch.Generator().manual_seed(2)
    scale = torch.tensor([0.1, 1, 3, 10, 30.0], dtype=torch.float64).view(5, 1, 1)
    batch = {"x": (torch.randn(5, 3, 4, generator=gen, dtype=torch.float64) * scale).to(device)}

    def loss(m, b):
        return m(b["x"]).sum()

    loop = per_sample_grads_loop(model, loss, batch)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    thresholds = [0.02, 0.05, 0.01, 0.03, 0.005]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    kw = {"per_layer_max_grad_norm": thresholds} if clipping == "per_layer" else {}
    dp = ff.DPSGD(model, opt, max_grad_norm=0.3 if clipping == "flat" else 0.1, noise_multiplier=0.0,
                  expected_batch_size=5, clipping=clipping, **kw)
    loss(model, batch).backward()
    if clipping == "flat":
        assert isinstance(per_sample.pending(model.wide.weight).grad_sample, per_sample.Factors)
        assert isinstance(per_sample.pending(model.narrow.weight).grad_sample, torch.Tensor)  # 3 (6+2)+9 > 12
        ours = per_sample_grads_engine(model)
        for k in names:
            assert_close_verbose(ours[k], loop[k], atol=1e-6, rtol=1e-5, name=k)
        norms = torch.sqrt(sum(loop[k].reshape(5, -1).pow(2).sum(1) for k in names))
        coef = {k: (0.3 / (norms + 1e-6)).clamp(max=1.0) for k in names}
    else:
        coef = {k: (c / (loop[k].reshape(5, -1).norm(dim=1) + 1e-6)).clamp(max=1.0) for k, c in zip(names, thresholds)}
    assert all(bool((c < 1).any()) for c in coef.values())  # every tensor clips some sample
    dp.accumulate()
    for k, got in zip(names, dp.clipped_sum()):
        assert_close_verbose(got, torch.einsum("n,n...->...", coef[k], loop[k]), atol=1e-6, rtol=1e-5, name=k)
    dp.zero_grad()
    dp.detach()


@pytest.mark.parametrize("kind", ["ids", "dense", "both"])
def test_the_clipped_sum_over_several_chunks_and_tiles_equals_the_float64_loop(kind, monkeypatch):
    """Chunks of 2 samples and tiles of 8, 7 or 15 of the 40 rows (the tiles a dense term is summed over; a table
    alone needs none): ids repeated within a sample and across samples, at 0 (the unused segments' id) and at the
    last row, and a dropped sample (coefficient 0) holding inf and NaN in its factors."""
    gen = torch.Generator().manual_seed(11)
    n, rows, cols = 6, 40, 48
    ids = torch.randint(0, rows, (n, 4), generator=gen)
    ids[:, 1] = ids[:, 0]  # (a row twice in each sample)
    ids[0, 3], ids[3, 2], ids[1, 2], ids[4, 0] = 0, rows - 1, ids[0, 0], ids[5, 3]  # (0, the last row; shared)
    table = (ids, torch.randn(n, 4, cols, generator=gen))
    dense = (torch.randn(n, 2, rows, generator=gen), torch.randn(n, 2, cols, generator=gen))
    terms = {"ids": [table], "dense": [dense], "both": [table, dense]}[kind]
    coef = torch.rand(n, generator=gen) + 0.1
    coef[2] = 0.0
    want = torch.einsum("n,nrc->rc", coef.double(), _dense64(terms, rows))
    bad = [(left.clone(), right.clone()) for left, right in terms]  # sample 2 (dropped): inf and NaN
    for left, right in bad:
        right[2, 1, 3], right[2, 0, 0] = float("inf"), float("nan")
        if left.is_floating_point():
            left[2, 0, 5] = float("nan")
    per_sample = sum(left[0].numel() + right[0].numel() for left, right in terms) * 8
    monkeypatch.setattr(ghost, "CHUNK_BYTES", 2 * per_sample + 8)
    assert [e - s for s, e in ghost._chunks(terms)] == [2, 2, 2]
    assert rows // (ghost.CHUNK_BYTES // (cols * 8)) >= 2  # (several tiles of rows)
    for norm2 in (None, ghost.ghost_norm2(terms)):
        got = ghost.ghost_clip_reduce(bad, coef, rows, norm2)
        assert_close_verbose(got, want, atol=1e-5, rtol=1e-5, name=f"sum (norm2 given: {norm2 is not None})")

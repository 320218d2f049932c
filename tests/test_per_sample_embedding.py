"""Per-sample gradients of a trained nn.Embedding (``PerSampleEmbedding``) against a batch-of-one loop.

A trained embedding (new tokens' rows, ``modules_to_save=["embed_tokens"]``) and a tied ``lm_head`` (one
tensor, two modules: each sample's gradient is the sum of both uses, clipped as one) had no per-sample rule:
``inject_adapters`` and ``load_peft`` refused them.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fedlora_fast as ff
from fedlora_fast.testing import (
    assert_close_verbose, assert_engine_matches_loop, per_sample_grads_engine, per_sample_grads_loop,
)

transformers = pytest.importorskip("transformers")

VOCAB = 101


def tiny_llama(tied: bool) -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).double()


def causal_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, :-1] == 0, -100)
    return nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum")


def llama_batch(seed: int = 1) -> dict:
    """3 samples, one right-padded with the padding id 0 (its row's gradient stays 0 in the embedding)."""
    x = torch.randint(1, VOCAB, (3, 7), generator=torch.Generator().manual_seed(seed))
    x[1, 5:] = 0
    x[2, 3] = x[2, 1]  # a token twice in one sample: its rows add up before the norm
    return {"input_ids": x, "attention_mask": (x != 0).long()}


def hand_clipped(loop: dict, C: float) -> dict:
    n = next(iter(loop.values())).shape[0]
    norms = torch.sqrt(sum(v.reshape(n, -1).pow(2).sum(1) for v in loop.values()))
    coef = (C / (norms + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("n,n...->...", coef, v) for k, v in loop.items()}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied_lm_head"])
def test_embedding_per_sample_grads_and_flat_clip_match_the_loop(tied):
    model = tiny_llama(tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    trained = ["model.embed_tokens", "lm_head"] if tied else ["model.embed_tokens"]
    ff.inject_adapters(model, ["q_proj"], r=2, alpha=4.0, trainable_modules=trained)
    assert type(model.model.embed_tokens) is ff.PerSampleEmbedding
    batch = llama_batch()
    loop = per_sample_grads_loop(model, causal_loss, batch)
    emb = loop["model.embed_tokens.weight"]
    if not tied:  # (tied, lm_head's logits reach row 0 too)
        assert emb[:, 0].abs().max() == 0
    assert (emb.abs().sum(-1) > 0).sum(1).tolist() != [0, 0, 0]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    C = 0.05  # every sample clipped
    dp = ff.DPSGD(model, opt, max_grad_norm=C, noise_multiplier=0.0, expected_batch_size=3)
    causal_loss(model, batch).backward()
    ours = per_sample_grads_engine(model)
    assert sorted(ours) == sorted(loop) == sorted(names)
    for k in loop:
        assert_close_verbose(ours[k], loop[k], atol=1e-7, rtol=1e-5, name=k)
    norms = dp.per_sample_norms()
    expected_norms = torch.sqrt(sum(v.reshape(3, -1).pow(2).sum(1) for v in loop.values()))
    assert_close_verbose(norms, expected_norms, atol=1e-7, rtol=1e-5, name="norms")
    assert bool((norms > C).all())
    dp.accumulate()
    want = hand_clipped(loop, C)
    for k, got in zip(names, dp.clipped_sum()):
        assert_close_verbose(got, want[k], atol=1e-7, rtol=1e-5, name=k)
    dp.step()
    dp.detach()


def test_embedding_per_layer_clip_matches_the_loop_and_a_tied_pair_is_refused():
    model = tiny_llama(False)
    ff.inject_adapters(model, ["q_proj"], r=2, alpha=4.0, trainable_modules=["model.embed_tokens"])
    batch = llama_batch(2)
    loop = per_sample_grads_loop(model, causal_loss, batch)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    thresholds = [0.03, 0.002, 0.004]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    dp = ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=3, clipping="per_layer",
                  per_layer_max_grad_norm=thresholds)
    causal_loss(model, batch).backward()
    dp.accumulate()
    for k, C, got in zip(names, thresholds, dp.clipped_sum()):
        n = loop[k].shape[0]
        norms = loop[k].reshape(n, -1).norm(dim=1)
        assert bool((norms > C).any()), k
        coef = (C / (norms + 1e-6)).clamp(max=1.0)
        assert_close_verbose(got, torch.einsum("n,n...->...", coef, loop[k]), atol=1e-7, rtol=1e-5, name=k)
    dp.detach()
    # a tied pair is one tensor used by two modules: a per-layer clip inside one module's backward would clip
    # half of each sample's gradient
    tied = tiny_llama(True)
    ff.inject_adapters(tied, ["q_proj"], r=2, alpha=4.0, trainable_modules=["model.embed_tokens", "lm_head"])
    opt = torch.optim.SGD([p for p in tied.parameters() if p.requires_grad], lr=0.0)
    dp = ff.DPSGD(tied, opt, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=3, clipping="per_layer")
    with pytest.raises(Exception, match="per-layer clipping cannot clip it"):
        causal_loss(tied, batch).backward()
    dp.detach()


def test_one_id_per_sample_and_ids_of_any_shape():
    """1-D ids (one token per sample) and (n, a, b) ids: rows are samples either way."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Embedding(11, 5, padding_idx=4), nn.Tanh(), nn.Linear(5, 1)).double()
    ff.inject_adapters(model, ["2"], r=2, alpha=4.0, trainable_modules=["0"])
    for shape in [(6,), (4, 3), (3, 2, 5)]:
        ids = torch.randint(0, 11, shape, generator=torch.Generator().manual_seed(len(shape)))
        ids.view(-1)[0] = 4  # the padding id: no gradient to its row

        def loss(m, b):
            return m(b["ids"]).pow(2).sum()

        ours = assert_engine_matches_loop(model, loss, {"ids": ids})
        assert ours["0.weight"].shape == (shape[0], 11, 5)
        assert ours["0.weight"][:, 4].abs().max() == 0


@pytest.mark.parametrize("kwargs, why", [
    ({"max_norm": 1.0}, "max_norm"), ({"scale_grad_by_freq": True}, "scale_grad_by_freq"),
    ({"sparse": True}, "sparse=True"),
])
def test_embeddings_without_a_per_sample_rule_are_refused_before_any_change(kwargs, why):
    """max_norm rewrites the looked-up rows of the weight in the forward (data-dependent, no noise covers it);
    scale_grad_by_freq scales a token's gradient by its count in the whole batch (samples mixed)."""
    model = nn.Sequential(nn.Embedding(11, 5, **kwargs), nn.Linear(5, 1))
    with pytest.raises(TypeError, match=rf"trainable_modules: no per-sample gradient rule for 0 \(Embedding with {why}"):
        ff.inject_adapters(model, ["1"], r=2, alpha=4.0, trainable_modules=["0"])
    assert type(model[0]) is nn.Embedding and not isinstance(model[1], ff.FFALoRALinear)


def test_a_position_embedding_shared_by_the_batch_is_refused():
    """BERT looks its position embeddings up with (1, T) ids broadcast over the batch: one row holds every
    sample's gradient summed, and the engine's row check refuses it rather than clip the batch as one sample."""
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg)
    ff.inject_adapters(model, ["query"], r=2, alpha=4.0, trainable_modules=["embeddings.position_embeddings"])
    dp = ff.DPSGD(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0),
                  max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=3)
    x = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(0))
    model(input_ids=x).last_hidden_state.pow(2).sum().backward()
    with pytest.raises(Exception, match="embeddings.position_embeddings.*pass position_ids expanded to"):
        dp.step()
    assert dp.steps == 0
    dp.zero_grad()
    # as the message says: position ids of the batch's own shape make each row a sample
    model.double()

    def loss(m, b):
        return m(input_ids=b["x"], position_ids=b["pos"]).last_hidden_state.pow(2).sum()

    batch = {"x": x, "pos": torch.arange(6).expand(3, 6)}
    loop = per_sample_grads_loop(model, loss, batch)
    dp.max_grad_norm = 1e6
    loss(model, batch).backward()
    ours = per_sample_grads_engine(model)
    for k in loop:
        assert_close_verbose(ours[k], loop[k], atol=1e-7, rtol=1e-5, name=k)
    dp.step()
    dp.detach()


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_graphed_micro_batches_of_token_ids_equal_the_eager_accumulate(clipping):
    """GraphedAccumulator pads integer id batches by repeating a real sample (weight 0, coefficient 0): the
    embedding's clipped sums over padded micro-batches equal plain eager micro-batches."""
    from fedlora_fast.privacy.graphed import GraphedAccumulator

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(17, 6, padding_idx=0), nn.Tanh(), nn.Linear(6, 3))
        ff.inject_adapters(model, ["2"], r=2, alpha=4.0, trainable_modules=["0"])
        with torch.no_grad():
            model[2].lora_B.normal_(0, 0.5)
        dp = ff.DPSGD(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0),
                      max_grad_norm=0.5, noise_multiplier=0.0, expected_batch_size=4, clipping=clipping)
        return model, dp

    def per_sample_loss(model, batch):
        return ((model(batch["ids"]) - batch["y"]) ** 2).flatten(1).sum(1)

    g = torch.Generator().manual_seed(5)
    batch = {"ids": torch.randint(0, 17, (7, 5), generator=g), "y": torch.randn(7, 5, 3, generator=g)}
    model, dp = make()
    for s in (slice(0, 4), slice(4, 7)):
        per_sample_loss(model, {k: v[s] for k, v in batch.items()}).sum().backward()
        dp.accumulate()
    want = torch.cat([t.flatten() for t in dp.clipped_sum()])
    model, dp = make()
    GraphedAccumulator(dp, per_sample_loss, micro_batch_size=4, graph=False).accumulate(batch)  # 4 + 3 padded to 4
    got = torch.cat([t.flatten() for t in dp.clipped_sum()])
    assert dp._pending_samples == 7
    assert_close_verbose(got, want, atol=1e-6, rtol=1e-5, name="clipped sums")


@pytest.mark.parametrize("n, T, rows, d", [(1, 1, 3, 1), (4, 9, 5, 7), (3, 13, 200, 6), (0, 4, 5, 3), (2, 0, 5, 3)])
def test_the_sparse_norms_and_clipped_sum_equal_the_dense_float64_ones(n, T, rows, d):
    """``fedlora_fast.reference.embedding`` against the dense per-sample gradients built in float64 by a loop:
    ids with repeats (a few rows: most ids repeat), a zero row (padding), and a sample with a NaN and one
    with an inf row, which make their own norms non-finite only and stay out of the clipped sum."""
    from fedlora_fast.reference import embedding_grad_sample, ghost_clip_reduce, ghost_norm2

    gen = torch.Generator().manual_seed(n * 100 + T * 10 + rows)
    ids = torch.randint(0, rows, (n, T), generator=gen)
    g = torch.randn(n, T, d, generator=gen) * torch.rand(n, 1, 1, generator=gen) * 3
    if n * T:
        g[0, -1] = 0.0
    want = torch.zeros(n, rows, d, dtype=torch.float64)
    for i in range(n):
        for t in range(T):
            want[i, ids[i, t]] += g[i, t].double()
    assert_close_verbose(embedding_grad_sample(ids, g, rows), want, atol=1e-6, rtol=1e-6, name="dense")
    norm2 = ghost_norm2([(ids, g)])
    assert norm2.dtype == torch.float32 and norm2.shape == (n,)
    assert_close_verbose(norm2, want.flatten(1).pow(2).sum(1), atol=1e-5, rtol=1e-5, name="norm2")
    coef = torch.rand(n, generator=gen)
    want_sum = torch.einsum("n,nrd->rd", coef.double(), want)
    assert_close_verbose(ghost_clip_reduce([(ids, g)], coef, rows), want_sum, atol=1e-5, rtol=1e-5, name="clipped")
    if n >= 3 and T >= 2:
        bad = g.clone()
        bad[1, 0, 0] = float("nan")
        bad[2, 1, -1] = float("inf")
        norm2_bad = ghost_norm2([(ids, bad)])
        assert not torch.isfinite(norm2_bad[1:3]).any()
        keep = torch.ones(n, dtype=torch.bool)
        keep[1:3] = False
        assert_close_verbose(norm2_bad[keep], norm2[keep], atol=0, rtol=0, name="others' norms")
        coef_bad = torch.where(keep, coef, torch.zeros(()))
        got = ghost_clip_reduce([(ids, bad)], coef_bad, rows)
        assert_close_verbose(got, torch.einsum("n,nrd->rd", coef_bad.double(), want), atol=1e-5, rtol=1e-5,
                             name="clipped without the non-finite samples")


class _TwoLookups(nn.Module):
    """One table looked up twice in a forward (a question and its context, say): each sample's gradient of
    the table is the sum of both lookups'."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(23, 4, padding_idx=1)
        self.head = nn.Linear(4, 2)

    def forward(self, a, b):
        return self.head(torch.tanh(self.emb(a).sum(1) * self.emb(b).mean(1)))


def test_the_engine_keeps_an_embeddings_looked_up_rows_not_the_dense_table():
    """A backward keeps n x T x dim numbers for the table (not n x rows x dim), also when the table is looked
    up twice in one forward (both lookups' rows side by side), and the result still equals the loop."""
    from fedlora_fast import per_sample

    torch.manual_seed(4)
    model = _TwoLookups().double()
    ff.inject_adapters(model, ["head"], r=2, alpha=4.0, trainable_modules=["emb"])
    gen = torch.Generator().manual_seed(7)
    batch = {"a": torch.randint(0, 23, (5, 3), generator=gen), "b": torch.randint(0, 23, (5, 4), generator=gen)}
    batch["a"][0, 0] = 1  # the padding id

    def loss(m, bt):
        return m(bt["a"], bt["b"]).pow(2).sum()

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    dp = ff.DPSGD(model, opt, max_grad_norm=1e6, noise_multiplier=0.0, expected_batch_size=5)
    loss(model, batch).backward()
    kept = per_sample.pending(model.emb.weight).grad_sample
    assert isinstance(kept, per_sample.Factors) and kept.shape == (5, 23, 4)
    (ids, g), = kept.terms  # (both lookups' tokens side by side)
    assert g.shape == (5, 3 + 4, 4) and ids.shape == (5, 7)
    dp.zero_grad()
    dp.detach()
    ours = assert_engine_matches_loop(model, loss, batch)
    assert ours["emb.weight"][:, 1].abs().max() == 0

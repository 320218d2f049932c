"""``inject_adapters`` on model-zoo layers: Falcon's ``FalconLinear`` (an nn.Linear subclass whose forward is
F.linear's maths) is adapted, other overriding subclasses stay refused; a ``trainable_modules`` name that
matches nothing is reported with the model's module names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedlora_fast as ff
from fedlora_fast.testing import assert_close_verbose


def tiny_falcon(seed: int = 0, **config):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.FalconConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    **config)
    torch.manual_seed(seed)
    return transformers.FalconForCausalLM(cfg).eval()


def falcon_linear():
    return pytest.importorskip("transformers.models.falcon.modeling_falcon").FalconLinear


@pytest.mark.parametrize("bias", [True, False])
def test_falcon_linear_forward_is_f_linear_and_its_adapter_computes_base_plus_lora(bias):
    """The allow-list's premise, checked on the installed transformers: FalconLinear's output equals
    F.linear(x, W, b); adapted, it equals the original at init (B = 0) and W x + b + s B A x once B is set."""
    FalconLinear = falcon_linear()
    torch.manual_seed(0)
    base = FalconLinear(8, 6, bias=bias)
    x = torch.randn(3, 5, 8)
    assert_close_verbose(base(x), F.linear(x, base.weight, base.bias), atol=1e-6, rtol=1e-6, name="FalconLinear")
    want = base(x).detach()
    layer = ff.FFALoRALinear(base, r=2, alpha=4.0, seed=3, name="fc")
    assert layer.base_layer is base
    assert_close_verbose(layer(x).detach(), want, atol=1e-6, rtol=1e-6, name="adapted at init")
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(1)))
    lora = layer.scale * (x @ layer.lora_A.T @ layer.lora_B.T)
    assert_close_verbose(layer(x).detach(), want + lora, atol=1e-5, rtol=1e-5, name="adapted with B")


def test_inject_adapters_on_a_tiny_falcon_keeps_its_output_at_init_and_trains_b():
    model = tiny_falcon()
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = model(ids).logits
    adapters = ff.inject_adapters(model, "all-linear", r=4, alpha=8.0, seed=0)
    assert sorted(n.rpartition(".")[2] for n in adapters) == sorted(
        ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"] * 2)
    assert all(type(a.base_layer).__name__ == "FalconLinear" for a in adapters.values())
    with torch.no_grad():
        got = model(ids).logits
    assert_close_verbose(got, want, atol=1e-5, rtol=1e-5, name="logits at init (B = 0)")
    # the adapter runs (not bypassed): a B changes the output, and the loss reaches every B
    with torch.no_grad():
        for a in adapters.values():
            a.lora_B.normal_(0, 0.1)
        assert not torch.allclose(model(ids).logits, want, atol=1e-4)
    model(ids, labels=ids).loss.backward()
    assert all(a.lora_B.grad is not None and a.lora_B.grad.abs().sum() > 0 for a in adapters.values())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"{n}.lora_B" for n in adapters
    ]


def test_the_allow_list_is_the_class_not_its_name_nor_an_overriding_subclass():
    """A subclass of FalconLinear with its own forward, and another class named FalconLinear, stay refused."""
    FalconLinear = falcon_linear()

    class ScaledFalconLinear(FalconLinear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    class SubFalconLinear(FalconLinear):  # forward inherited: FalconLinear's own, adapted
        pass

    impostor = type("FalconLinear", (nn.Linear,), {"forward": lambda self, x: 2.0 * F.linear(x, self.weight)})
    impostor.__module__ = FalconLinear.__module__
    for cls in (ScaledFalconLinear, impostor):
        with pytest.raises(TypeError, match=r"base: .*FalconLinear overrides nn.Linear.forward"):
            ff.FFALoRALinear(cls(4, 3), r=2)
        model = nn.Sequential(nn.Linear(4, 4), cls(4, 3))
        with pytest.raises(ValueError, match=r"'1'.*FalconLinear overrides nn.Linear.forward"):
            ff.inject_adapters(model, ["0", "1"])
        assert not ff.adapter_layers(model) and all(p.requires_grad for p in model.parameters())
    assert isinstance(ff.FFALoRALinear(SubFalconLinear(4, 3), r=2).base_layer, SubFalconLinear)


def test_trainable_modules_matching_nothing_lists_the_model_s_module_names():
    model = tiny_falcon()
    with pytest.raises(ValueError) as err:
        ff.inject_adapters(model, ["query_key_value"], trainable_modules=["lm_haed"])
    msg = str(err.value)
    assert msg.startswith("trainable_modules: 'lm_haed' matches no module of FalconForCausalLM; module names")
    for name in ("lm_head", "word_embeddings", "ln_f", "h", "dense_4h_to_h"):
        assert repr(name) in msg
    assert "'0'" not in msg  # list indices only in qualified names
    assert not ff.adapter_layers(model) and all(p.requires_grad for p in model.parameters())


def test_trainable_modules_error_lists_at_most_20_names_and_counts_the_rest():
    model = nn.Module()
    for i in range(25):
        model.add_module(f"block{i:02d}", nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"'head' matches no module of Module; module names there include "
                                         r"\['block00', .*'block19'\] and 5 more$"):
        ff.inject_adapters(model, ["block00"], trainable_modules="head")
    bare = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))  # only indices: the qualified names
    with pytest.raises(ValueError, match=r"module names there include \['0', '1', '1.0'\]$"):
        ff.inject_adapters(bare, ["0"], trainable_modules="head")

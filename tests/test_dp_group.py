"""Data-parallel DPSGD (``process_group``): two gloo processes on CPU against one process on the union of their
batches, with the same noise seed; and the group's refusals (tests/dp_group_worker.py runs each process)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import dp_group_worker as worker

pytestmark = pytest.mark.usefixtures("reference_backend")
WORLD = 2


def _run_group(tmp_path, clipping: str, world: int = WORLD, device: str = "cpu") -> list[dict]:
    env = {**os.environ, "PYTHONFAULTHANDLER": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "FEDLORA_FAST_BACKEND": "torch"}
    procs = [
        subprocess.Popen([sys.executable, worker.__file__, str(r), str(world), str(tmp_path / "init"), str(tmp_path),
                          clipping, device], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            p.kill()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-3000:]}"
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_two_processes_release_what_one_process_releases_on_their_union(tmp_path, clipping):
    """Rank 0 alone adds the noise (the same seed draws the same noise as one process), the clipped sums are
    summed over the group, and every rank ends with the same tensors: those of one process stepping on the
    union of the shards' batches (micro-batches on rank 0, an empty batch on rank 1 at step 1). The refusals
    reach every rank, and the group stays usable after each."""
    results = _run_group(tmp_path, clipping)
    model = worker.make_model()
    dp = worker.make_dp(model, clipping)
    worker.train(dp, model, [sum(worker.step_members(s, WORLD), []) for s in range(worker.STEPS)])
    want = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(WORLD)]
    start = {n: p.detach() for n, p in worker.make_model().named_parameters() if p.requires_grad}
    for name, w in want.items():
        assert not torch.equal(w, start[name]), "the steps moved the tensor"
        torch.testing.assert_close(ranks[0][name], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        assert torch.equal(ranks[1][name], ranks[0][name]), f"{name}: the ranks diverged"
    for res in results:
        assert res["train"] == {"epsilon": pytest.approx(dp.epsilon(1e-5), rel=1e-12), "steps": worker.STEPS}
    for scenario, field in [("build_sigma", "noise_multiplier"), ("build_B", r"the trained tensors"),
                            ("release_sigma", "noise_multiplier")]:
        for r, res in enumerate(results):
            assert res[scenario]["error"] == "ValueError", (scenario, r, res[scenario])
            assert res[scenario]["message"].startswith(f"process_group: {field}"), (scenario, r, res[scenario])
    mine, other = results[1]["step_refused"], results[0]["step_refused"]
    assert mine["error"] == "RuntimeError" and "no per-sample gradients since the last step" in mine["message"]
    assert other["error"] == "RuntimeError" and "rank(s) [1] refused this release" in other["message"]
    mine, other = results[1]["accumulate_rows"], results[0]["accumulate_rows"]
    assert mine["error"] == "ValueError" and "cannot count the samples" in mine["message"], mine
    assert other["error"] == "RuntimeError" and "rank(s) [1] refused this release" in other["message"], other


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (an NCCL group)")
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_an_nccl_group_of_one_releases_what_the_plain_engine_releases(tmp_path, clipping):
    """The NCCL path on one GPU (NCCL refuses two ranks on one device): the group's checks read their numbers
    back from the GPU, the release goes through an ``all_reduce`` of CUDA tensors. A group of one must release
    exactly what the engine without a group does, with the same noise seed (same CUDA generator)."""
    (result,) = _run_group(tmp_path, clipping, world=1, device="cuda")
    model = worker.make_model().cuda()
    dp = worker.make_dp(model, clipping)
    worker.train(dp, model, [worker.step_members(s, 1)[0] for s in range(worker.STEPS)], micro=2, device="cuda")
    got = load_file(tmp_path / "rank0.safetensors")
    start = {n: p.detach() for n, p in worker.make_model().named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(got[name], start[name]), "the steps moved the tensor"
            torch.testing.assert_close(got[name], p.detach().cpu(), rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert result["train"] == {"epsilon": pytest.approx(dp.epsilon(1e-5), rel=1e-12), "steps": worker.STEPS}


def test_process_group_needs_torch_distributed():
    import torch.distributed as dist

    model = worker.make_model()
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(ValueError, match="process_group: torch.distributed is not initialised"):
        worker.make_dp(model, "flat", process_group=object())

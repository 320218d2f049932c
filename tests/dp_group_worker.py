"""One process of tests/test_dp_group.py's data-parallel DPSGD runs (gloo, CPU): ``python dp_group_worker.py RANK
WORLD INIT_FILE OUT_DIR CLIPPING [DEVICE]``. Also imported by the test for the single-process run it compares
against. DEVICE ``cuda``: an NCCL group on the GPU, the ``train`` scenario only (one GPU holds one rank).

Scenarios, in order, on one process group (each refusal is raised on every rank after complete collectives, so
the group stays usable for the next):
  1. ``train``: STEPS steps over shards of one dataset (rank k holds samples k, k + WORLD, ...), micro-batches
     on rank 0, an empty batch on the last rank at step 1; final trained tensors saved, epsilon recorded.
  2. ``build_sigma``: the last rank builds its engine with another noise multiplier: refused on every rank.
  3. ``build_B``: the last rank's B differs: refused on every rank.
  4. ``step_refused``: the last rank steps without a backward: its own error, the others' "refused".
  5. ``release_sigma``: rank 0 changes the noise multiplier by hand between two steps: refused on every rank.
  6. ``accumulate_rows``: the last rank's ``accumulate()`` refuses gradients whose forward it cannot count (its
     submodules called without the model): its own error, the others' "refused" at their step.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
from torch import nn

IN, HID, OUT, R = 7, 6, 3, 3
N, STEPS, SIGMA, C, SEED = 12, 3, 0.7, 1.0, 123


def make_model():
    import fedlora_fast as ff

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, OUT))
    ff.inject_adapters(model, ["0"], r=R, alpha=6.0, seed=0, trainable_modules=["2"])
    with torch.no_grad():
        model[0].lora_B.normal_(0, 0.5)
    return model


def data():
    g = torch.Generator().manual_seed(1)
    return 3 * torch.randn(N, 5, IN, generator=g), torch.randn(N, 5, OUT, generator=g)


def step_members(step: int, world: int) -> list[list[int]]:
    """Per rank, the samples of its shard in step ``step`` (the last rank's batch at step 1 is empty)."""
    members = []
    for rank in range(world):
        shard = list(range(rank, N, world))
        take = shard[step % 2::2] if step != 1 else shard[: len(shard) - 1]
        members.append([] if (step == 1 and rank == world - 1) else take)
    return members


def make_dp(model, clipping: str, **kw):
    import fedlora_fast as ff

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    kw = {"max_grad_norm": C, "noise_multiplier": SIGMA, "expected_batch_size": 6, "sample_rate": 0.5,
          "noise_seed": SEED, "clipping": clipping, **kw}
    return ff.DPSGD(model, opt, **kw)


def loss(model, x, y):
    return ((model(x) - y) ** 2).sum()


def train(dp, model, idx_per_step, micro: int | None = None, device: str = "cpu"):
    """STEPS steps, each over the samples ``idx_per_step[step]`` (micro-batches of ``micro`` if given)."""
    x, y = (t.to(device) for t in data())
    for idx in idx_per_step:
        if not idx:
            dp.step(empty_batch=True)
        else:
            parts = [idx] if micro is None else [idx[i:i + micro] for i in range(0, len(idx), micro)]
            for part in parts[:-1]:
                loss(model, x[part], y[part]).backward()
                dp.accumulate()
            loss(model, x[parts[-1]], y[parts[-1]]).backward()
            dp.step()
        dp.zero_grad()


def _outcome(fn) -> dict:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 (the test reads the type and message)
        return {"error": type(e).__name__, "message": str(e)}
    return {"error": None}


def main(rank: int, world: int, init_file: str, out: str, clipping: str, device: str = "cpu") -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    kw = {"device_id": torch.device(device, rank)} if device == "cuda" else {}
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60), **kw)
    pg = dist.group.WORLD
    last = world - 1
    results = {}
    model = make_model().to(device)
    dp = make_dp(model, clipping, process_group=pg)
    train(dp, model, [step_members(s, world)[rank] for s in range(STEPS)], micro=2 if rank == 0 else None,
          device=device)
    save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
              os.path.join(out, f"rank{rank}.safetensors"))
    results["train"] = {"epsilon": dp.epsilon(1e-5), "steps": dp.steps}
    dp.detach()
    if device != "cpu":
        _finish(out, rank, results)

    results["build_sigma"] = _outcome(lambda: make_dp(
        make_model(), clipping, process_group=pg, noise_multiplier=SIGMA + (0.1 if rank == last else 0.0)))

    def build_b():
        m = make_model()
        if rank == last:
            with torch.no_grad():
                m[0].lora_B[0, 0] += 1e-3
        make_dp(m, clipping, process_group=pg)

    results["build_B"] = _outcome(build_b)

    x, y = data()
    m = make_model()
    dp = make_dp(m, clipping, process_group=pg)

    def step_refused():
        if rank != last:
            loss(m, x[:2], y[:2]).backward()
        dp.step()

    results["step_refused"] = _outcome(step_refused)
    dp.zero_grad()

    def release_sigma():
        loss(m, x[:2], y[:2]).backward()
        dp.step()
        dp.zero_grad()
        if rank == 0:
            dp.noise_multiplier = SIGMA * 2
        loss(m, x[:2], y[:2]).backward()
        dp.step()

    results["release_sigma"] = _outcome(release_sigma)
    dp.zero_grad()
    m = make_model()
    dp = make_dp(m, clipping, process_group=pg)  # (release_sigma left rank 0's sigma changed)

    def accumulate_rows():
        if rank == last:
            ((m[2](m[1](m[0](x[:2]))) - y[:2]) ** 2).sum().backward()  # submodules alone: nothing counted
        else:
            loss(m, x[:2], y[:2]).backward()
        dp.accumulate()
        dp.step()

    results["accumulate_rows"] = _outcome(accumulate_rows)
    dp.zero_grad()
    _finish(out, rank, results)


def _finish(out: str, rank: int, results: dict) -> None:
    import torch.distributed as dist

    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()  # (no rank tears gloo down while another still talks to it)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # (the results are on disk: skip the interpreter's teardown, where gloo's threads aborted the process in
    # ~1 run in 10 on a loaded 2-core box, "terminate called without an active exception")
    os._exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], *sys.argv[6:7])

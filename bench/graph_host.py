"""Host (CPU) cost of one DP step through ``GraphedAccumulator`` against the eager step, on any machine.

The 1B-Llama DP step was host-bound on the H200 (158 ms per step, 71 ms of GPU work; bench/NOTES.md). A CUDA
graph removes the issue cost of the forward, backward and clipping; what stays on the host is the
accumulator's own work (filling the buffers, the pre-replay checks, copying the outputs) and the eager
``dp.step()`` (noise, accounting, optimizer). This measures that remainder without a GPU: ``torch.cuda``'s
stream/graph API is replaced by stand-ins whose capture runs the work once and whose replay does nothing
(the replay is the GPU's time, not the host's), on the CPU, so the rest of the step runs as it would.

    python bench/graph_host.py                      # the 1B Llama's 154 adapters at width 64 (llama-1b-narrow)
    python bench/graph_host.py --smoke              # a tiny Llama, one round (CI)

Prints ms per step (median of rounds, interleaved) for ``graphed`` (replay stubbed) and ``eager`` (the same
model, batch and engine: forward, backward, ``dp.step()``), and ms per pre-replay check.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny Llama, one round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=5, help="steps per round and variant")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    import fedlora_fast as ff
    from fedlora_fast.privacy.graphed import GraphedAccumulator
    from fedlora_fast.testing import StandInCudaGraphs

    torch.set_num_threads(args.threads)
    rounds, steps = (1, 1) if args.smoke else (args.rounds, args.steps)
    model, head = step.build_model("llama-tiny" if args.smoke else "llama-1b-narrow", torch.device("cpu"), torch.float32)
    adapters = ff.inject_adapters(model, step.adapter_targets(model, head), r=8, trainable_modules=[head])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    n = 8
    dp = ff.DPSGD(model, opt, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=n, noise_seed=0)
    b = step.make_batch(model, n, 16, torch.device("cpu"))
    batch = {"input_ids": b["input_ids"], "labels": b["labels"]}

    def loss(m, bb):
        return torch.nn.functional.cross_entropy(m(input_ids=bb["input_ids"]).logits.float(), bb["labels"], reduction="none")

    with StandInCudaGraphs():  # replay: nothing (the GPU's time, not the host's)
        acc = GraphedAccumulator(dp, loss, micro_batch_size=n, graph=False)
        acc.graph = True  # graph mode on the CPU: only with the stand-ins

        def graphed():
            acc.accumulate(batch)
            dp.step()
            dp.zero_grad()

        def eager():
            loss(model, batch).sum().backward()
            dp.step()
            dp.zero_grad()

        fns = {"graphed": graphed, "eager": eager}
        for f in fns.values():  # warm-up (the graphed one captures here)
            f()
        times = {k: [] for k in fns}
        for _ in range(rounds):
            for k, f in fns.items():
                t = time.perf_counter()
                for _ in range(steps):
                    f()
                times[k].append((time.perf_counter() - t) / steps * 1e3)
        t = time.perf_counter()
        for _ in range(20):
            acc._check_captured()
        check_ms = (time.perf_counter() - t) / 20 * 1e3
    out = {k: statistics.median(v) for k, v in times.items()}
    out["check"] = check_ms
    print(f"# {len(adapters)} adapters, n={n}, T=16, {args.threads} torch thread(s), load {os.getloadavg()[0]:.2f}")
    for k, v in out.items():
        print(f"{k:8s} {v:8.3f} ms" + (" per step" if k != "check" else " per pre-replay check"))
    return out


if __name__ == "__main__":
    main()

"""DP noise draws: the ``chacha20_normal`` op (what ``os_normal`` runs on CUDA) against the other sources.

Variants, each drawing ``n`` standard normals on the device (float64 Box-Muller where the source is ours):
- ``chacha20``: the op under a fresh key from ``os.urandom`` (the Triton kernel on CUDA, the reference
  elsewhere): on CUDA exactly what ``privacy.sampling.os_normal`` runs;
- ``urandom``: ``os_normal`` on the CPU (every bit from ``os.urandom``: DP noise on a CPU), then copied to the
  device (on CUDA, what a GPU run would do without the kernel);
- ``philox``: ``torch.randn`` from a torch generator (float32; the GPU's default noise before 2026-11-28: fast,
  not a cryptographic generator) — the speed it is compared with.
Checks first (the kernel against the reference on the device, to float64 rounding; the normals' first four
moments), then interleaved timing. Prints each variant's time, normals per second and the ratio to ``philox``,
and writes ``bench/results/chacha20_<device>_<date>.json``.

Floor (an H100: ~30 T 32-bit integer operations/s, 3.35 TB/s): ChaCha20 costs ~980 integer operations per block
of eight normals (~122 per normal) plus a float64 log, sqrt, cos and sin per pair; 8 bytes written per normal.
Predicted for n = 22M (every B of Llama-7B's linear layers at r = 16): ~0.1 ms of integer work, ~0.05 ms of
writes, the float64 maths alike: a fraction of a millisecond per draw, 4x that in secure mode, against
seconds per DP step at that model size.

Run: ``python bench/chacha20.py --device cuda`` (n = 22M and 4.2M), ``python bench/chacha20.py`` (CPU,
smaller n: the op runs its reference there). Not a test.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from fedlora_fast.ops.chacha20 import chacha20_normal  # noqa: E402
from fedlora_fast.privacy.sampling import os_normal  # noqa: E402
from fedlora_fast.reference import chacha20 as ref  # noqa: E402

# normals per draw: every B of Llama-7B's seven linear layers at r = 16 (21.8M), and q_proj + v_proj only (4.2M)
SIZES = {"cuda": [21_823_488, 4_194_304], "cpu": [1_000_000]}


def check(n: int, device: str) -> dict:
    state = tuple(int(w) for w in torch.randint(0, 2**32, (12,), dtype=torch.int64))
    state = state[:ref.COUNTER_AT] + (0,) + state[ref.COUNTER_AT + 1:]
    m = min(n, 1 << 20)
    got = chacha20_normal(state, m, device).cpu()
    want = ref.chacha20_normal(state, m)
    err = float((got - want).abs().max())
    if not err < 1e-12:
        raise SystemExit(f"chacha20_normal on {device} differs from the reference by {err:.3g}")
    z = os_normal((n,), dtype=torch.float64, device=device)
    moments = {"mean": float(z.mean()), "var": float(z.var()), "kurtosis": float((z**4).mean())}
    bounds = {"mean": (0, 5), "var": (1, 10), "kurtosis": (3, 50)}  # (~5-7 standard errors of each)
    if any(abs(moments[k] - mu) > s / n**0.5 for k, (mu, s) in bounds.items()):
        raise SystemExit(f"os_normal on {device}: moments {moments} are not a standard normal's")
    return {"check_max_abs_err": err, **moments}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--n", type=int, nargs="*", default=None, help="normals per draw (default by device)")
    p.add_argument("--reps", type=int, default=harness.MIN_REPS)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = args.device
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for n in args.n or SIZES[device]:
        checked = check(n, device)
        fns = {
            "chacha20": lambda n=n: chacha20_normal((*struct.unpack("<8I", os.urandom(32)), 0, 0, 0, 0), n, device),
            "urandom": lambda n=n: os_normal((n,), dtype=torch.float64).to(device),
            "philox": lambda n=n: torch.randn(n, generator=gen, device=device),
        }
        times = harness.time_interleaved(fns, device=device, reps=args.reps)
        row = {"device": harness.device_name(device), "n": n, **checked,
               **{f"{v}_s": harness.median(t) for v, t in times.items()},
               **{f"{v}_spread": harness.spread(t) for v, t in times.items()},
               **{f"ratio_{v}_to_philox": harness.paired_ratio(times[v], times["philox"])
                  for v in ("chacha20", "urandom")}}
        rows.append(row)
        print(f"n={n}: " + " | ".join(f"{v} {row[v + '_s'] * 1e3:8.3f} ms ({n / row[v + '_s'] / 1e9:6.2f} G/s)"
                                      for v in fns)
              + f" | chacha20/philox {row['ratio_chacha20_to_philox']:.2f} urandom/philox "
                f"{row['ratio_urandom_to_philox']:.2f} (check {checked['check_max_abs_err']:.1e})", flush=True)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"chacha20_{harness.device_slug(device)}_{harness.utc_date()}.json")
    harness.write_json(out, {"machine": harness.machine_info(device), "rows": rows})
    print("wrote", out)


if __name__ == "__main__":
    main()

"""Data-parallel DP-SGD: one logical batch over the processes of a ``torch.distributed`` group.

Each process (a GPU of one silo, say) Poisson-samples its own shard of the silo's data at the run's rate q,
so the union of the shards' batches is a Poisson sample of the whole data at q: the accountant is the
single-process one. Each process clips its own samples (every sample lives on one process, so flat clipping
is unchanged), and ``DPSGD.add_noise`` sums the clipped sums over the group with one ``all_reduce``, to which
the group's rank 0 alone adds the noise ``N(0, (sigma S)^2)``: the released sum is exactly the single-process
one, ``sum_i c_i P_i + sigma S xi``, and every process steps its optimizer with the same gradient.

What the group must agree on is checked with two small ``all_gather``s (``agree``) when the engine is built
(the noise settings, the trained tensors and the frozen A's values) and before every release (the settings
that may be changed by hand between steps). A process whose step refuses (``DPSGD.step``'s own checks) takes
part in that check before raising, so the others raise too instead of waiting in the ``all_reduce`` forever.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def check_group(process_group, device: torch.device) -> int:
    """The rank of this process in ``process_group``, after checking it can carry ``device`` tensors.

    Raises:
        TypeError: ``process_group`` is not a ``torch.distributed.ProcessGroup``.
        ValueError: ``torch.distributed`` is not initialised; or an NCCL group with tensors off CUDA.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group: torch.distributed is not initialised: call "
                         "torch.distributed.init_process_group(...) on every process first")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group: expected a torch.distributed.ProcessGroup (torch.distributed.group.WORLD, "
                        f"or one from new_group), got {type(process_group).__name__}")
    backend = str(dist.get_backend(process_group)).lower()
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"process_group: an NCCL group carries CUDA tensors only, and the trained tensors are on "
                         f"{device}: use a gloo group for CPU training")
    return dist.get_rank(process_group)


def digest(tensors: dict[str, Tensor]) -> list[float]:
    """SHA-256 of ``tensors`` (name, shape, dtype and bytes, in name order), as 32 numbers for ``agree``."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return [float(b) for b in h.digest()]


def _gather(process_group, row: list[float], device: torch.device) -> list[list[float]]:
    import torch.distributed as dist

    mine = torch.tensor(row, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, mine, group=process_group)
    return torch.stack(gathered).cpu().tolist()


def agree(process_group, device: torch.device, fields: dict[str, float | list[float]] | None, *, what: str) -> None:
    """Check that every process of the group holds the same ``fields`` (compared exactly, as float64): two
    ``all_gather``s, the first of which says whether a process is refusing ``what``. ``fields=None``: this
    process is about to raise its own error; it returns after the first, so that it can, and every other
    process raises a RuntimeError naming it (none is left waiting in a later collective).

    Raises:
        RuntimeError: another process of the group refused ``what``.
        ValueError: a field differs between processes (named, with each rank's value where it is a number).
    """
    names, flat = [], []
    for name, value in (fields or {}).items():
        values = value if isinstance(value, list) else [value]
        names.append((name, len(values)))
        flat.extend(float(v) for v in values)
    status = _gather(process_group, [1.0 if fields is None else 0.0, float(len(flat))], device)
    if fields is None:
        return
    refused = [r for r, row in enumerate(status) if row[0] != 0.0]
    if refused:
        raise RuntimeError(f"process_group: rank(s) {refused} refused {what} (a refusal on that process: its error "
                           "is in its own output); every rank stops here rather than wait for it")
    if any(row[1] != status[0][1] for row in status):
        raise ValueError(f"process_group: the processes check different settings ({what}): by rank, "
                         f"{[int(row[1]) for row in status]} numbers; run the same fedlora_fast on every process")
    rows = _gather(process_group, flat, device)
    at = 0
    for name, k in names:
        column = [row[at:at + k] for row in rows]
        if any(c != column[0] for c in column[1:]):
            shown = [c[0] for c in column] if k == 1 else "differ"
            raise ValueError(f"process_group: {name} differs between the group's processes ({what}): by rank, "
                             f"{shown}; every process of a data-parallel DPSGD must use the same")
        at += k

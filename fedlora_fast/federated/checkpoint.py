"""Atomic checkpoints of a federated run: one safetensors file (tensors + a JSON state in its metadata).

Everything (global adapter, RNG states, accountants, server state, per-round records) sits in one file, so
one ``os.replace`` of a fully written, fsynced temporary file makes the new checkpoint visible at once: a
run killed at any moment leaves either the previous checkpoint or the new one, never a mix. No pickle.
"""

from __future__ import annotations

import json
import os

from safetensors import safe_open
from safetensors.torch import save as _st_save
from torch import Tensor

from fedlora_fast.io import atomic_write_bytes, atomic_write_text  # noqa: F401  (re-exported)

CHECKPOINT_NAME = "checkpoint.safetensors"
# the Flower ServerApp's (it cannot resume a Flower run, so it is not the simulation's name); here so that
# the simulation, which cannot import flwr, knows it too
FLOWER_CHECKPOINT_NAME = "flower_checkpoint.safetensors"
FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, Tensor], state: dict) -> None:
    """Atomically write ``tensors`` and the JSON-safe ``state`` to ``path``."""
    meta = {"format": "fedlora_fast.checkpoint", "version": str(FORMAT_VERSION), "state": json.dumps(state)}
    data = _st_save({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, metadata=meta)
    atomic_write_bytes(path, data)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """``(tensors, state)`` from a checkpoint written by ``save_checkpoint``.

    Raises:
        ValueError: the file is not a fedlora_fast checkpoint or has another format version.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"resume: {path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if meta.get("format") != "fedlora_fast.checkpoint":
        raise ValueError(f"resume: {path} is not a fedlora_fast checkpoint")
    if meta.get("version") != str(FORMAT_VERSION):
        raise ValueError(f"resume: {path} has checkpoint format version {meta.get('version')}, expected {FORMAT_VERSION}")
    return tensors, json.loads(meta["state"])

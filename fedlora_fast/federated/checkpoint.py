"""Atomic checkpoints of a federated run: one safetensors file (tensors + a JSON state in its metadata).

Everything (global adapter, RNG states, accountants, server state, per-round records) sits in one file, so
one ``os.replace`` of a fully written, fsynced temporary file makes the new checkpoint visible at once: a
run killed at any moment leaves either the previous checkpoint or the new one, never a mix. No pickle.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

from safetensors import safe_open
import torch
from safetensors.torch import save as _st_save
from torch import Tensor

from fedlora_fast.io import atomic_write_bytes, atomic_write_text  # noqa: F401  (re-exported)

CHECKPOINT_NAME = "checkpoint.safetensors"
# the Flower ServerApp's (it cannot resume a Flower run, so it is not the simulation's name); here so that
# the simulation, which cannot import flwr, knows it too
FLOWER_CHECKPOINT_NAME = "flower_checkpoint.safetensors"
FORMAT_VERSION = 1
# beside a checkpoint: the secret key of its data fingerprint (``keyed``); part of the run's outputs
RUN_KEY_NAME = "checkpoint.key"
RUN_KEY_BYTES = 32


def run_key(directory: str | os.PathLike, *, create: bool) -> bytes:
    """The key of the data fingerprint a checkpoint in ``directory`` carries: ``directory/checkpoint.key``,
    ``RUN_KEY_BYTES`` from ``os.urandom``, written (atomically, owner-only) where missing if ``create``.

    A checkpoint carried an unkeyed SHA-256 of the data a run trained on, so that a resume can tell other data; a
    reviewer pointed out that whoever holds the checkpoint and can list candidate datasets could then confirm
    which one was used. Keyed (HMAC-SHA-256), the fingerprint says nothing to whoever lacks the key (other fields
    of a checkpoint still may: the README's privacy notes): keep the key with the run's directory, never share it
    (``adapter/`` is what is shared).

    Raises:
        ValueError: the key is missing (and not ``create``), unreadable, or not ``RUN_KEY_BYTES`` long.
    """
    path = Path(directory) / RUN_KEY_NAME
    if not path.exists():
        if not create:
            raise ValueError(f"resume: {path} is missing: the checkpoint's data fingerprint is keyed with it, and "
                             "without it the data cannot be checked; resume from the directory the run wrote")
        atomic_write_bytes(path, os.urandom(RUN_KEY_BYTES), mode=0o600)
    try:
        key = path.read_bytes()
    except OSError as e:
        raise ValueError(f"resume: {path} does not read ({type(e).__name__}: {e})") from None
    if len(key) != RUN_KEY_BYTES:
        raise ValueError(f"resume: {path}: expected {RUN_KEY_BYTES} bytes, got {len(key)} (a damaged key)")
    return key


def keyed(key: bytes, fingerprint: str) -> str:
    """HMAC-SHA-256 of ``fingerprint`` under ``key`` (``run_key``), hex: what a checkpoint stores of its data."""
    return hmac.new(key, fingerprint.encode(), hashlib.sha256).hexdigest()


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, Tensor], state: dict) -> None:
    """Atomically write ``tensors`` and the JSON-safe ``state`` to ``path``, readable by its owner only (run
    state: accountants, and generator states where a run is seeded)."""
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    state_json = json.dumps(state)
    meta = {"format": "fedlora_fast.checkpoint", "version": str(FORMAT_VERSION), "state": state_json,
            "sha256": _digest(tensors, state_json)}
    atomic_write_bytes(path, _st_save(tensors, metadata=meta), mode=0o600)


def _digest(tensors: dict[str, Tensor], state_json: str) -> str:
    """SHA-256 over the state and every tensor (name, dtype, shape, bytes; in name order): a flipped bit in a
    checkpoint fails the resume instead of resuming silently from wrong values."""
    h = hashlib.sha256(state_json.encode())
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"\0{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """``(tensors, state)`` from a checkpoint written by ``save_checkpoint``.

    Raises:
        ValueError: the file is not a fedlora_fast checkpoint, has another format version, or its content
            does not match the checksum written with it.
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
    if "state" not in meta:
        raise ValueError(f"resume: {path} has no run state in its metadata")
    if "sha256" not in meta:  # written since the checksum came in: its absence is damage or an older release
        raise ValueError(f"resume: {path} has no checksum in its metadata (a damaged or edited checkpoint, or one "
                         "written by a release before checksums: start a new run)")
    if meta["sha256"] != _digest(tensors, meta["state"]):
        raise ValueError(f"resume: {path} is corrupted (its content does not match the checksum written with it)")
    try:
        state = json.loads(meta["state"])
    except json.JSONDecodeError as e:
        raise ValueError(f"resume: {path} has an unreadable run state ({e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"resume: {path}: expected the run state to be a JSON object, got {type(state).__name__}")
    return tensors, state

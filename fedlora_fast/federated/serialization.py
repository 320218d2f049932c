"""Wire format of the federated messages: safetensors bytes (tensors + string metadata), never pickle.

What a client uploads and what the server broadcasts is exactly these bytes, so the communication cost
of a round is counted from them (``len(message)``), with the tensor payload (the bytes after the
safetensors header) reported apart: the payload is what halves from LoRA to FFA-LoRA (Sun et al., ICLR
2024, arXiv 2403.12313, Sec. 4: only B is sent), the JSON header is a few hundred bytes of names and shapes.
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import Tensor


class MessageError(ValueError):
    """A message that cannot be decoded (truncated, corrupted, or not a safetensors message)."""


def encode(tensors: dict[str, Tensor], metadata: dict[str, object] | None = None) -> bytes:
    """Serialise ``tensors`` (contiguous CPU copies) and ``metadata`` (values JSON-encoded) to bytes."""
    meta = {str(k): json.dumps(v) for k, v in (metadata or {}).items()}
    return _st_save({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, metadata=meta)


def header_size(message: bytes) -> int:
    """Bytes of the safetensors header (the 8-byte length + the JSON header) at the start of ``message``."""
    if len(message) < 8:
        raise MessageError(f"message: {len(message)} bytes, shorter than the 8-byte safetensors length prefix")
    (n,) = struct.unpack("<Q", message[:8])
    if 8 + n > len(message):
        raise MessageError(f"message: header length {n} runs past the message end ({len(message)} bytes)")
    return 8 + n


def payload_size(message: bytes) -> int:
    """Bytes of tensor data in ``message`` (its length minus the header)."""
    return len(message) - header_size(message)


def decode(message: bytes) -> tuple[dict[str, Tensor], dict[str, object]]:
    """Inverse of ``encode``: ``(tensors, metadata)``.

    Raises:
        MessageError: the bytes are not a well-formed message.
    """
    if not isinstance(message, (bytes, bytearray)):
        raise MessageError(f"message: expected bytes, got {type(message).__name__}")
    hsize = header_size(bytes(message))
    try:
        header = json.loads(bytes(message[8:hsize]))
        tensors = _st_load(bytes(message))
        meta = {k: json.loads(v) for k, v in (header.get("__metadata__") or {}).items()}
    except Exception as e:  # safetensors raises its own error types; any failure means a bad message
        raise MessageError(f"message: not a valid safetensors message ({type(e).__name__}: {e})") from None
    return tensors, meta


def clone_state(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached CPU copies (the server's global state never aliases a model's parameters)."""
    return {k: t.detach().to("cpu").clone() for k, t in tensors.items()}


def state_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    """Same keys, dtypes, shapes and bit-identical values."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )

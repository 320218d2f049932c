"""Flower records <-> fedlora_fast's federated messages.

Flower (Beutel et al., arXiv 2007.14390; Message API of ``flwr`` >= 1.20) carries tensors in an
``ArrayRecord`` (numpy ``.npy`` bytes, loaded with ``allow_pickle=False``) and small values in
``ConfigRecord``/``MetricRecord``. fedlora_fast's server validates and aggregates its own wire format
(``fedlora_fast.federated.serialization``: safetensors bytes + JSON metadata). These functions convert
between the two without changing a value, so one validation path serves the simulation and Flower alike.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from torch import Tensor

from fedlora_fast.federated import serialization

META_KEY = "fedlora-meta"  # the ConfigRecord entry holding the message metadata as JSON


class RecordError(ValueError):
    """A Flower record that cannot be turned into a fedlora_fast message (missing, mistyped or corrupted)."""


BF16_KEY = "fedlora-bf16"  # metadata entry: the tensors sent as float32 that are bfloat16 (numpy has no bf16)


def _numpy(t: Tensor) -> np.ndarray:
    t = t.detach().to("cpu")
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: float32 holds every bf16 value exactly
        t = t.float()
    return t.contiguous().numpy()


def to_array_record(tensors: dict[str, Tensor]) -> ArrayRecord:
    """``{name: tensor}`` -> ``ArrayRecord`` (CPU copies; order kept; bfloat16 as float32, exactly)."""
    return ArrayRecord({k: Array(_numpy(t)) for k, t in tensors.items()})


def to_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    """``ArrayRecord`` -> ``{name: tensor}``.

    Raises:
        RecordError: an entry that does not load as a numeric numpy array (corrupted bytes, another
            serialisation type, an object array) or whose loaded shape/dtype disagrees with its declaration.
    """
    if not isinstance(record, ArrayRecord):
        raise RecordError(f"arrays: expected an ArrayRecord, got {type(record).__name__}")
    out = {}
    for k, arr in record.items():
        try:
            a = arr.numpy()
        except Exception as e:  # np.load raises several types on bad bytes; any of them means a bad record
            raise RecordError(f"arrays[{k!r}]: does not load as a numpy array ({type(e).__name__}: {e})") from None
        if not isinstance(a, np.ndarray) or a.dtype.kind not in "fiub":
            raise RecordError(f"arrays[{k!r}]: expected a numeric array, got {getattr(a, 'dtype', type(a).__name__)}")
        if tuple(a.shape) != tuple(arr.shape) or str(a.dtype) != arr.dtype:
            raise RecordError(
                f"arrays[{k!r}]: declared {arr.dtype}{list(arr.shape)} but holds {a.dtype}{list(a.shape)}"
            )
        try:  # in native byte order (a big-endian array is the same values; torch takes native only)
            out[k] = torch.from_numpy(np.array(a, dtype=a.dtype.newbyteorder("="), copy=True))
        except Exception as e:  # any numpy array torch cannot hold
            raise RecordError(f"arrays[{k!r}]: {a.dtype} does not convert to a tensor ({type(e).__name__}: {e})") from None
    return out


def meta_record(meta: dict) -> ConfigRecord:
    """Message metadata -> a ``ConfigRecord`` with one JSON string entry."""
    return ConfigRecord({META_KEY: json.dumps(meta)})


def read_meta(record: ConfigRecord) -> dict:
    """Inverse of ``meta_record``.

    Raises:
        RecordError: the entry is missing or is not a JSON object.
    """
    if not isinstance(record, ConfigRecord) or META_KEY not in record:
        raise RecordError(f"config: expected a ConfigRecord with a {META_KEY!r} entry")
    try:
        meta = json.loads(record[META_KEY])
    except (TypeError, ValueError) as e:
        raise RecordError(f"config[{META_KEY!r}]: not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise RecordError(f"config[{META_KEY!r}]: expected a JSON object, got {type(meta).__name__}")
    return meta


def to_message(arrays: ArrayRecord, meta: ConfigRecord) -> bytes:
    """A Flower (arrays, metadata) pair -> fedlora_fast message bytes (what ``Server.validate`` reads); the
    tensors ``from_message`` sent as float32 for bfloat16 are bfloat16 again (the server checks dtypes)."""
    tensors, info = to_tensors(arrays), read_meta(meta)
    bf16 = info.pop(BF16_KEY, [])
    if not isinstance(bf16, list):
        raise RecordError(f"config[{META_KEY!r}][{BF16_KEY!r}]: expected a list of tensor names, got {bf16!r}")
    for k in bf16:
        if k in tensors and tensors[k].dtype == torch.float32:
            tensors[k] = tensors[k].to(torch.bfloat16)  # exact: they were bfloat16 values
    return serialization.encode(tensors, info)


def from_message(message: bytes) -> tuple[ArrayRecord, ConfigRecord]:
    """fedlora_fast message bytes -> the Flower (arrays, metadata) pair."""
    tensors, meta = serialization.decode(message)
    bf16 = [k for k, t in tensors.items() if t.dtype == torch.bfloat16]
    if bf16:
        meta = {**meta, BF16_KEY: bf16}
    return to_array_record(tensors), meta_record(meta)

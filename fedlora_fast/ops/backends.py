"""Backend choice for the custom ops: automatic by device, overridable with ``FEDLORA_FAST_BACKEND``.

Backends are modules exposing functions named like the ops (``ffa_linear_fwd`` …):
- ``torch``:  ``fedlora_fast.reference`` (always available; the fallback),
- ``triton``: ``fedlora_fast.kernels`` (CUDA; CPU only under ``TRITON_INTERPRET=1``),
- ``native``: ``fedlora_fast.ops.native`` over the C++/OpenMP extension ``fedlora_fast._native`` (CPU).
A backend module may leave an op out (e.g. native has no forward when PyTorch's GEMM is faster): that op
then runs on the reference. An explicitly requested backend that is unavailable raises
``BackendUnavailableError`` with a diagnosis; the automatic choice falls back with one warning.
Triton is imported only when its backend is used.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import os
import warnings
from types import ModuleType
from typing import Callable

ENV_VAR = "FEDLORA_FAST_BACKEND"
BACKENDS = ("torch", "triton", "native")
OPS = ("ffa_linear_fwd", "ffa_linear_bwd", "ffa_linear_clip_reduce", "chacha20_normal")
_MODULES = {
    "torch": "fedlora_fast.reference",
    "triton": "fedlora_fast.kernels",
    "native": "fedlora_fast.ops.native",
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and what to do."""


def requested_backend() -> str | None:
    """The backend named by ``FEDLORA_FAST_BACKEND``, or None for the automatic choice."""
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in BACKENDS:
        raise BackendUnavailableError(
            f"{ENV_VAR}: expected one of {', '.join(BACKENDS)} or auto, got {name!r}"
        )
    return name


# The oldest Triton the shipped launches compile with for sm90 (2026-11-27, ahead of time: all of them with 3.4.0,
# 3.5.1, 3.6.0 and 3.9.0, all but the opt-in TMA GEMM's with 3.3.1; natively: 3.6.0 on an H100; 3.1 and 3.2
# could not be checked): an older one runs the reference
MIN_TRITON = (3, 3)


def _version(v: str) -> tuple[int, ...]:
    """(3, 4, 0) from "3.4.0", "3.4.0+git1234" or "3.5.0.dev20250101"; non-numeric parts end it."""
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        out.append(int(digits))
        if len(digits) < len(part):
            break
    return tuple(out)


def triton_interprets() -> bool:
    """Whether ``triton.jit`` now makes interpreted kernels: Triton's own reading of ``TRITON_INTERPRET``.

    Triton >= 3.4 reads it as a boolean (``1``, ``true``, ``on``, ``yes`` …; its ``knobs``), 3.3 as the string
    ``"1"``. Comparing with ``"1"`` here too took ``TRITON_INTERPRET=true`` for compiled kernels: the CPU backend
    was refused as uninterpreted, and on CUDA the kernels ran interpreted without the float32 upcast the
    interpreter's dots need (bf16 per-sample norms of ~5e22 for a true ~400, in a reviewer's call). Imports Triton;
    False without it.
    """
    try:
        import triton
    except ImportError:
        return False

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _probe(name: str, device_type: str) -> tuple[ModuleType | None, str]:
    """(module, "") when backend ``name`` can run on ``device_type``, else (None, diagnosis)."""
    if name == "torch":
        return importlib.import_module(_MODULES["torch"]), ""
    if name == "triton":
        if device_type not in ("cpu", "cuda"):
            return None, f"the triton backend supports cuda (and cpu under TRITON_INTERPRET=1), not {device_type}"
        try:
            import triton
        except ImportError as e:
            return None, f"the triton backend needs the 'triton' package ({e}); pip install triton"
        if device_type == "cpu" and not triton_interprets():
            return None, (
                "the triton backend runs CPU tensors only through the interpreter: "
                "set TRITON_INTERPRET=1 before Python starts (tests do this), or move tensors to CUDA"
            )
        version = getattr(triton, "__version__", "0")
        if _version(version) < MIN_TRITON:
            return None, (
                f"triton {version} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest release the kernels "
                "are compiled against (bench/NOTES.md); torch >= 2.7 brings a newer one (upgrade torch with its "
                "own Triton rather than Triton alone: torch pins the release it was built with)"
            )
    if name == "native" and device_type != "cpu":
        return None, f"the native backend runs on CPU tensors only, got {device_type}"
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as e:  # native: e says what happened (not built, or refused on this CPU) and how to rebuild
        hint = "`python -m fedlora_fast.env` reports what was built" if name == "native" else "see the import error"
        return None, f"cannot import {_MODULES[name]}: {e}; {hint}"
    if not any(hasattr(module, op) for op in OPS):
        return None, f"{_MODULES[name]} implements none of the ops {OPS} yet"
    return module, ""


def available(name: str, device_type: str) -> bool:
    return _probe(name, device_type)[0] is not None


def auto_backend(device_type: str) -> str:
    """The backend the automatic choice takes for a device (before per-shape preferences)."""
    preferred = {"cuda": "triton", "cpu": "native"}.get(device_type)
    if preferred and available(preferred, device_type):
        return preferred
    if preferred:
        _warn_fallback(preferred, device_type)
    return "torch"


@functools.lru_cache(maxsize=None)
def _warn_fallback(name: str, device_type: str) -> None:
    warnings.warn(
        f"fedlora_fast: {name} backend unavailable for {device_type} ({_probe(name, device_type)[1]}); "
        "using the PyTorch reference",
        RuntimeWarning,
        stacklevel=3,
    )


def backend_for(device_type: str) -> str:
    """The backend used for tensors on ``device_type``: the requested one (or an error), else automatic."""
    name = requested_backend()
    if name is None:
        return auto_backend(device_type)
    module, why = _probe(name, device_type)
    if module is None:
        raise BackendUnavailableError(f"{ENV_VAR}={name} was requested but {why}")
    return name


# (op, device type, FEDLORA_FAST_BACKEND as set) -> function: every op call asks, once per layer and pass
_IMPLEMENTATIONS: dict[tuple[str, str, str | None], Callable] = {}


def implementation(op: str, device_type: str) -> Callable:
    """The function computing ``op`` for tensors on ``device_type`` (cached per value of the variable)."""
    key = (op, device_type, os.environ.get(ENV_VAR))
    fn = _IMPLEMENTATIONS.get(key)
    if fn is None:
        module, _ = _probe(backend_for(device_type), device_type)
        fn = getattr(module, op, None)
        if fn is None:  # the backend leaves this op to the reference
            fn = getattr(_probe("torch", device_type)[0], op)
        _IMPLEMENTATIONS[key] = fn
    return fn


def clear_cache() -> None:
    """Forget probes (tests change the environment between cases)."""
    _probe.cache_clear()
    _warn_fallback.cache_clear()
    _IMPLEMENTATIONS.clear()

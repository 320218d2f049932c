"""What fedlora_fast was built with and which backend each device uses: ``python -m fedlora_fast.env``.

Modelled on ``torch.utils.collect_env``: one report for bug reports and CI logs. ``report()`` returns
the same facts as a dict (JSON-serialisable); ``--json`` prints that.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import sys
import warnings


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def native_info() -> dict:
    """Whether ``fedlora_fast._native`` imports, where from, and its build info (or the import error)."""
    try:
        native = importlib.import_module("fedlora_fast._native")
    except ImportError as e:
        skipped = os.environ.get("FEDLORA_FAST_NO_NATIVE", "")
        return dict(built=False, error=str(e), hint=(
            "reinstall with a C++17 compiler and CMake (pip install -e .)"
            + (f"; note FEDLORA_FAST_NO_NATIVE={skipped} is set here" if skipped else "")
        ))
    return dict(built=True, path=native.__file__, **native.build_info())


def backend_info() -> dict:
    """Per device: the backend the ops use and, per op, the module that implements it (or the error)."""
    import torch

    from fedlora_fast.ops import backends

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    # FEDLORA_FAST_GEMM: the triton backend's base GEMM (auto: timed per shape on CUDA; kernels/ffa_linear.py)
    out = {"requested": os.environ.get(backends.ENV_VAR) or "auto", "gemm": os.environ.get("FEDLORA_FAST_GEMM") or "auto"}
    for device in devices:
        entry: dict = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                entry["backend"] = backends.backend_for(device)
                entry["ops"] = {op: backends.implementation(op, device).__module__ for op in backends.OPS}
            except backends.BackendUnavailableError as e:
                entry["error"] = str(e)
        if caught:
            entry["warnings"] = [str(w.message) for w in caught]
        entry["available"] = {
            name: (backends.available(name, device) or backends._probe(name, device)[1]) for name in backends.BACKENDS
        }
        out[device] = entry
    return out


def report() -> dict:
    """Versions, the native build and the backend choice, as a JSON-serialisable dict."""
    import torch

    import fedlora_fast

    return dict(
        fedlora_fast=fedlora_fast.__version__,
        python=sys.version.split()[0],
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        cuda=torch.version.cuda if torch.cuda.is_available() else None,
        triton=_version("triton"),
        numpy=_version("numpy"),
        native=native_info(),
        backends=backend_info(),
    )


def _print(d: dict, indent: int = 0) -> None:
    for k, v in d.items():
        if isinstance(v, dict):
            print(" " * indent + f"{k}:")
            _print(v, indent + 2)
        else:
            print(" " * indent + f"{k}: {v}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedlora_fast.env", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    r = report()
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        _print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())

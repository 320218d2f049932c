"""What fedlora_fast was built with and which backend each device uses: ``python -m fedlora_fast.env``.

Modelled on ``torch.utils.collect_env``: one report for bug reports and CI logs. ``report()`` returns
the same facts as a dict (JSON-serialisable); ``--json`` prints that.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import warnings
from pathlib import Path


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- the native module's build record (setup.py, CMakeLists.txt) -------------------------------------------
ISA_FILE = "_native_isa.json"  # next to the module: the instruction sets it was compiled to use
BUILD_ERROR_FILE = "_native_build_error.txt"  # in the package: why the install-time build failed
REBUILD_HINT = (
    "pip install --no-cache-dir --force-reinstall --no-deps --no-binary fedlora_fast fedlora_fast "
    "(in a checkout: pip install --no-cache-dir --force-reinstall --no-deps -e .)"
)
PORTABLE_HINT = (
    "or build a portable module with FEDLORA_FAST_CMAKE_ARGS=-DFEDLORA_FAST_MARCH_NATIVE=OFF set during the "
    "install (for a wheel shared between machines or baked into an image)"
)


def cpu_flags() -> set[str] | None:
    """This x86 CPU's feature flags as /proc/cpuinfo names (``avx2``, ``avx512f`` …); None where unknown.

    Only an x86 ``flags`` line counts: under x86 emulation on an ARM host (Docker ``--platform linux/amd64``
    on Apple silicon, qemu-user) /proc/cpuinfo describes the ARM host (a ``Features`` line), which says
    nothing of what the emulator runs."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return set(value.split())
    except OSError:
        pass
    return None


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def native_path() -> Path | None:
    """Where ``fedlora_fast._native`` would be imported from, found without importing it."""
    try:
        spec = importlib.util.find_spec("fedlora_fast._native")
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin else None


def native_isa(path: Path | None = None) -> dict | None:
    """The build's record of the instruction sets the module may use (``isa``: /proc/cpuinfo names;
    ``march_native``: tuned for the build machine), or None when there is no record (older or hand builds)."""
    path = native_path() if path is None else path
    if path is None:
        return None
    try:
        record = json.loads((path.parent / ISA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def missing_isa(record: dict | None = None, flags: set[str] | None = None) -> list[str]:
    """The recorded instruction sets this CPU lacks ([] when none, or when either side is unknown: no
    record, a record for another processor than this interpreter's, no x86 flags line)."""
    record = native_isa() if record is None else record
    flags = cpu_flags() if flags is None else flags
    required = (record or {}).get("isa")
    if not isinstance(required, list) or flags is None:
        return []
    arch = {"amd64": "x86_64"}  # Windows' name for it
    built_for = str((record or {}).get("processor", "")).lower()
    here = platform.machine().lower()
    if built_for and arch.get(built_for, built_for) != arch.get(here, here):
        return []  # a record of another architecture: nothing to compare with this CPU's flags
    return [f for f in required if isinstance(f, str) and f not in flags]


def isa_problem(record: dict | None = None) -> str | None:
    """Why the built module must not be loaded on this CPU (it would die of SIGILL), or None. ``record``:
    the module's build record when the caller has read it already (None: read it here)."""
    try:
        record = native_isa() if record is None else record
        if not record:
            return None  # no record (an older or hand build): nothing to check
        missing = missing_isa(record)
    except Exception:  # noqa: BLE001  (an odd record must not stop the backend probe: it means "no record")
        return None
    if not missing:
        return None
    tuned = " (it was compiled with -march=native on another machine)" if record.get("march_native") else ""
    return (
        f"fedlora_fast._native was built for instruction sets this CPU lacks: {', '.join(missing)}{tuned}; "
        f"not loading it. Rebuild it on this machine: {REBUILD_HINT}; {PORTABLE_HINT}"
    )


def native_build_error() -> str | None:
    """The reason the install-time native build failed, when setup.py recorded one."""
    try:
        return (_package_dir() / BUILD_ERROR_FILE).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def native_import_error(error: ImportError) -> str:
    """The message for a failed ``import fedlora_fast._native``: the error, the install-time build failure
    when there was one, and how to rebuild (pip may be reinstalling a cached wheel built without it)."""
    failed = native_build_error()
    skipped = os.environ.get("FEDLORA_FAST_NO_NATIVE", "")
    return (
        f"{error}"
        + (f"; the native build failed when fedlora_fast was installed: {failed}" if failed else "")
        + (f"; FEDLORA_FAST_NO_NATIVE={skipped} is set here" if skipped else "")
        + f"; to build it (needs a C++17 compiler and CMake), reinstall bypassing pip's wheel cache: {REBUILD_HINT}"
    )


def native_info() -> dict:
    """Whether ``fedlora_fast._native`` is built, usable on this CPU and imports; where from; its build
    info, the instruction sets it needs (or the error)."""
    path = native_path()
    record = native_isa(path) if path is not None else None
    isa = dict(required=record.get("isa"), march_native=record.get("march_native"),
               missing_here=missing_isa(record)) if record else None
    if path is None:
        return dict(built=False, loaded=False,
                    error=native_import_error(ImportError("No module named 'fedlora_fast._native'")))
    problem = isa_problem(record) if record else None
    if problem:
        return dict(built=True, loaded=False, path=str(path), error=problem, isa=isa)
    try:
        native = importlib.import_module("fedlora_fast._native")
    except ImportError as e:
        return dict(built=True, loaded=False, path=str(path), error=native_import_error(e), isa=isa)
    return dict(built=True, loaded=True, path=native.__file__, **native.build_info(),
                isa=isa if isa else "not recorded (a build from before the record, or by hand): not checked")


def _triton_settings() -> dict[str, str]:
    """The Triton backend's settings as its kernels read them (a bad value: its error), or as set without Triton."""
    raw = {"gemm": ("FEDLORA_FAST_GEMM", "auto"), "launch": ("FEDLORA_FAST_LAUNCH", "default"),
           "keep_merged": ("FEDLORA_FAST_KEEP_MERGED", "0")}
    try:
        from fedlora_fast.kernels import ffa_linear as K
    except ImportError:  # no Triton: nothing reads them
        return {k: os.environ.get(var) or default for k, (var, default) in raw.items()}
    out = {}
    for key, read in (("gemm", K.gemm_impl), ("launch", K.launch_mode), ("keep_merged", K.keep_mode)):
        try:
            out[key] = read()
        except ValueError as e:
            out[key] = f"error: {e}"
    return out


def backend_info() -> dict:
    """Per device: the backend the ops use and, per op, the module that implements it (or the error)."""
    import torch

    from fedlora_fast.ops import backends

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    # the triton backend's settings (kernels/ffa_linear.py): FEDLORA_FAST_GEMM, the base GEMM (auto: timed per
    # shape on CUDA); FEDLORA_FAST_LAUNCH, direct or JIT launches (unset: by Triton version);
    # FEDLORA_FAST_KEEP_MERGED, the forward's merged weight kept for its backward (1) or across steps (cache)
    out = {"requested": os.environ.get(backends.ENV_VAR) or "auto", **_triton_settings()}
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

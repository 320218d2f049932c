"""PyTorch references of every op: the one place tests, fallback and benchmarks import them from."""

from fedlora_fast.reference.chacha20 import chacha20_normal  # noqa: F401

from fedlora_fast.reference.ghost import (  # noqa: F401
    embedding_grad_sample,
    ghost_clip_reduce,
    ghost_grad_sample,
    ghost_norm2,
)
from fedlora_fast.reference.ffa_linear import (  # noqa: F401
    MODE_CLIP,
    MODE_PER_SAMPLE,
    MODE_SUM,
    NORM_EPS,
    acc_dtype,
    clip_coef,
    ffa_linear_bwd,
    ffa_linear_clip_reduce,
    ffa_linear_fwd,
)

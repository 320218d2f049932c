"""Modules: the adapter layer and the per-sample trainable extra modules."""

from fedlora_fast.layers.ffa_linear import FFALoRALinear, adapter_seed, init_lora_A  # noqa: F401
from fedlora_fast.layers.per_sample_modules import (  # noqa: F401
    PerSampleEmbedding,
    PerSampleLayerNorm,
    PerSampleLinear,
    make_per_sample,
)

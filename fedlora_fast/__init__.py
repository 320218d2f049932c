"""fedlora_fast: fused kernels and wrappers for differentially private federated fine-tuning with FFA-LoRA.

FFA-LoRA (Sun et al., ICLR 2024, arXiv 2403.12313) freezes LoRA's A (regenerated from a seed by every
client) and trains only B; the ``ffa_linear`` ops compute the adapter's forward, backward and every
sample's gradient norm for DP-SGD clipping in one pass.
"""

from fedlora_fast.inject import adapter_layers, inject_adapters  # noqa: F401
from fedlora_fast.layers import FFALoRALinear, PerSampleLayerNorm, PerSampleLinear  # noqa: F401
from fedlora_fast.privacy.dpsgd import DPSGD  # noqa: F401

__version__ = "0.1.0"

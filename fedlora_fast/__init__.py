"""fedlora_fast: fused kernels and wrappers for differentially private federated fine-tuning with FFA-LoRA.

FFA-LoRA (Sun et al., ICLR 2024, arXiv 2403.12313) freezes LoRA's A (regenerated from a seed by every
client) and trains only B; the ``ffa_linear`` ops compute the adapter's forward, backward and every
sample's gradient norm for DP-SGD clipping in one pass.
"""

from fedlora_fast.inject import adapter_layers, inject_adapters  # noqa: F401
from fedlora_fast.layers import FFALoRALinear, PerSampleEmbedding, PerSampleLayerNorm, PerSampleLinear  # noqa: F401
from fedlora_fast.peft_compat import export_peft, from_peft, load_peft  # noqa: F401
from fedlora_fast.privacy import (  # noqa: F401
    DPSGD,
    Accountant,
    GraphedAccumulator,
    capturable_attention_mask,
    PoissonSampler,
    calibrate_noise_multiplier,
    poisson_dataloader,
)


def __getattr__(name):  # opacus's grad-sampler machinery is imported only when asked for
    if name == "prepare_for_opacus":
        from fedlora_fast.privacy.opacus_interop import prepare_for_opacus

        return prepare_for_opacus
    raise AttributeError(f"module 'fedlora_fast' has no attribute {name!r}")

__version__ = "0.1.0"

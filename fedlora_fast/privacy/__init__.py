"""Privacy: the DP-SGD engine, Poisson sampling, accounting (opacus RDP/PRV) and opacus interoperability."""

from fedlora_fast.privacy.accounting import Accountant, calibrate_noise_multiplier  # noqa: F401
from fedlora_fast.privacy.dpsgd import DPSGD  # noqa: F401
from fedlora_fast.privacy.graphed import (  # noqa: F401
    GraphedAccumulator,
    capturable_attention_mask,
    find_host_reads,
    graph_micro_batch_sizes,
    plan_micro_batches,
)
from fedlora_fast.privacy.sampling import (  # noqa: F401
    PoissonSampler,
    batch_size,
    check_poisson_loader,
    micro_batches,
    poisson_dataloader,
)

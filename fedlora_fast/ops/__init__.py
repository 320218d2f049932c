"""Op contract (custom ops) and backend dispatch."""

from fedlora_fast.ops.backends import BACKENDS, BackendUnavailableError, backend_for  # noqa: F401
from fedlora_fast.ops.ffa_linear import (  # noqa: F401
    ffa_linear_bwd,
    ffa_linear_clip_reduce,
    ffa_linear_fwd,
)

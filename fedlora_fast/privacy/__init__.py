"""Privacy: the DP-SGD engine, sampling and accounting."""

from fedlora_fast.privacy.dpsgd import DPSGD  # noqa: F401

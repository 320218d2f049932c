"""Privacy accounting: a thin, persistable object over opacus's accountants (RDP default, PRV optional).

The maths lives in opacus (``opacus.accountants``); this module adds argument checks, a JSON-safe state
(so a federated client's accountant persists across rounds and checkpoints) and noise calibration.
"""

from __future__ import annotations

import math

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("rdp", "prv")


def check_delta(delta: float) -> float:
    d = float(delta)
    if not (0.0 < d < 1.0) or not math.isfinite(d):
        raise ValueError(f"delta: expected a number in (0, 1), got {delta!r}")
    return d


def check_sample_rate(sample_rate: float) -> float:
    q = float(sample_rate)
    if not (0.0 < q <= 1.0) or not math.isfinite(q):
        raise ValueError(f"sample_rate: expected a number in (0, 1], got {sample_rate!r}")
    return q


def check_noise_multiplier(noise_multiplier: float) -> float:
    s = float(noise_multiplier)
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"noise_multiplier: expected a finite number >= 0, got {noise_multiplier!r}")
    return s


class Accountant:
    """Tracks every DP-SGD step of one data holder; ``epsilon(delta)`` is the budget spent so far.

    Args:
        mechanism: ``"rdp"`` (default) or ``"prv"``.
    """

    def __init__(self, mechanism: str = "rdp"):
        if mechanism not in ACCOUNTANTS:
            raise ValueError(f"mechanism: expected one of {ACCOUNTANTS}, got {mechanism!r}")
        self.mechanism = mechanism
        self._acc = create_accountant(mechanism)

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        sigma = check_noise_multiplier(noise_multiplier)
        q = check_sample_rate(sample_rate)
        for _ in range(int(num_steps)):
            self._acc.step(noise_multiplier=sigma, sample_rate=q)

    @property
    def steps(self) -> int:
        return sum(int(n) for _, _, n in self._acc.history)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """[(noise_multiplier, sample_rate, steps), ...] as opacus keeps it (runs of equal steps merged)."""
        return [(float(s), float(q), int(n)) for s, q, n in self._acc.history]

    def epsilon(self, delta: float) -> float:
        """The epsilon spent so far at ``delta``; 0 before any step, inf if any step had no noise."""
        d = check_delta(delta)
        if not self._acc.history:
            return 0.0
        if any(s == 0 for s, _, _ in self._acc.history):
            return math.inf
        return float(self._acc.get_epsilon(delta=d))

    def state_dict(self) -> dict:
        """JSON-safe state (no pickle)."""
        return {"mechanism": self.mechanism, "history": [list(h) for h in self.history]}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Accountant":
        acc = cls(state["mechanism"])
        acc._acc.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        return acc


def calibrate_noise_multiplier(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, mechanism: str = "rdp"
) -> float:
    """The noise multiplier that spends ``target_epsilon`` at ``delta`` over ``steps`` Poisson steps.

    Raises:
        ValueError: arguments out of range, or a budget that no noise level can meet.
    """
    eps = float(target_epsilon)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"target_epsilon: expected a finite number > 0, got {target_epsilon!r}")
    d, q = check_delta(delta), check_sample_rate(sample_rate)
    if isinstance(steps, bool) or int(steps) != steps or steps <= 0:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    if mechanism not in ACCOUNTANTS:
        raise ValueError(f"mechanism: expected one of {ACCOUNTANTS}, got {mechanism!r}")
    try:
        sigma = get_noise_multiplier(
            target_epsilon=eps, target_delta=d, sample_rate=q, steps=int(steps), accountant=mechanism
        )
    except ValueError as e:
        raise ValueError(
            f"target_epsilon={eps} at delta={d} cannot be met with sample_rate={q} over {steps} steps ({e}); "
            "raise epsilon or delta, or take fewer steps or a smaller sample rate"
        ) from None
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"target_epsilon={eps}: calibration gave noise_multiplier={sigma}, not usable")
    return float(sigma)

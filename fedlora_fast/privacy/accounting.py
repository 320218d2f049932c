"""Privacy accounting: a thin, persistable object over opacus's accountants (RDP default, PRV optional).

The maths lives in opacus (``opacus.accountants``: RDP of the Poisson-subsampled Gaussian, Mironov et al.
2019; PRV, Gopi et al. 2021); this module adds argument checks, a validated JSON state (so one federated
client's accountant persists across rounds and checkpoints: R rounds of K steps are R*K steps) and noise
calibration. Every bound here assumes Poisson sampling (see ``fedlora_fast.privacy.sampling``).
"""

from __future__ import annotations

import json
import math
import os
import warnings


ACCOUNTANTS = ("rdp", "prv")
STATE_VERSION = 1
# RDP orders: opacus's grid (1.1 .. 10.9 by 0.1, then 12 .. 63) extended to 1024. A small epsilon needs a large
# order: the conversion's floor is about (log(1/delta) - log(order)) / (order - 1), 0.10 at order 63 and
# delta = 1e-5, so opacus's grid alone refuses such budgets. epsilon is a minimum over the orders, so a larger
# grid never raises it, and at epsilon >= 1 the optimum lies well inside opacus's grid: the same number (tested).
_RDP_EXTRA_ORDERS = (*range(64, 129), *range(132, 257, 4), 288, 320, 384, 448, 512, 640, 768, 1024)


# PRV's discretisation grows without bound as sigma shrinks (opacus 1.6, q = 0.01, 100 steps: sigma 0.1 took 7 s
# and 1.5 GB on the dev box, 0.05 over a minute; 0.001 asked for 84 GiB in a reviewer's run). Below this sigma,
# where epsilon is in the hundreds anyway, the PRV accountant reports RDP's bound for the same steps: also a valid
# upper bound.
PRV_MIN_SIGMA = 0.2
# PRV's discretisation grid grows with the steps and the domain (``_prv_grid_points``): beyond this many points
# (~0.8 GB of peak memory; 7.5e6 took 1.55 GB and 6.7 s in a reviewer's run) the PRV accountant reports RDP's
# bound: valid, and looser by some per cent (1e5 steps at q = 0.01, sigma = 1: 27.23 against PRV's 25.58).
PRV_MAX_POINTS = 4_000_000
# opacus discretises one PRV per history entry (one per change of sigma or q: a noise schedule makes one per step),
# so the cap counts entries x points; past this many entries PRV is not tried (800 entries of a sigma schedule:
# 88 s and 2 GB for one epsilon in a reviewer's run; the grid estimate alone runs one RDP conversion per entry)
PRV_MAX_ENTRIES = 100
# The largest budget calibration accepts: beyond it there is no meaningful guarantee to calibrate for, and the
# search would chase sigma towards 0 (at 1e30 it never ended: an absolute 0.01 is below float64's resolution).
MAX_TARGET_EPSILON = 1000.0
_MAX_SIGMA = 1e6  # calibration's upper end (opacus's MAX_SIGMA)
# Below this sigma epsilon is inf: no finite bound is computable (epsilon would exceed 1e190), and opacus's
# RDP loop for fractional orders never ended for sigma ~1e-162..1e-154 (1/sigma^2 overflows, its terms NaN).
_MIN_FINITE_SIGMA = 1e-100


def _rdp_orders() -> list[float]:
    from opacus.accountants import RDPAccountant

    return [*RDPAccountant.DEFAULT_ALPHAS, *_RDP_EXTRA_ORDERS]


def _epsilon_kwargs(mechanism: str) -> dict:
    """Keyword arguments of opacus's ``get_epsilon`` for our accountants (RDP: the extended order grid)."""
    return {"alphas": _rdp_orders()} if mechanism == "rdp" else {}


def _number(name: str, value) -> float:
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number, got {value!r}") from None


def check_delta(delta: float) -> float:
    """``delta`` as a float in (0, 1), else ValueError."""
    d = _number("delta", delta)
    if not (0.0 < d < 1.0):
        raise ValueError(f"delta: expected a number in (0, 1), got {delta!r}")
    return d


def check_sample_rate(sample_rate: float) -> float:
    """``sample_rate`` (Poisson q) as a float in (0, 1], else ValueError."""
    q = _number("sample_rate", sample_rate)
    if not (0.0 < q <= 1.0):
        raise ValueError(f"sample_rate: expected a number in (0, 1], got {sample_rate!r}")
    return q


def check_noise_multiplier(noise_multiplier: float) -> float:
    """``noise_multiplier`` (sigma) as a finite float >= 0, else ValueError."""
    s = _number("noise_multiplier", noise_multiplier)
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"noise_multiplier: expected a finite number >= 0, got {noise_multiplier!r}")
    return s


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


class Accountant:
    """Tracks every DP-SGD step of one data holder; ``epsilon(delta)`` is the budget spent so far.

    One object per data holder for its whole life: a federated client passes the same accountant to every
    round's ``DPSGD`` (or restores it with ``from_state_dict``), so its epsilon covers all its steps.

    Args:
        mechanism: ``"rdp"`` (default) or ``"prv"``.
    """

    def __init__(self, mechanism: str = "rdp"):
        if mechanism not in ACCOUNTANTS:
            raise ValueError(f"mechanism: expected one of {ACCOUNTANTS}, got {mechanism!r}")
        self.mechanism = mechanism
        from opacus.accountants import create_accountant  # imported on use: opacus takes seconds to load

        self._acc = create_accountant(mechanism)

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` Poisson-subsampled Gaussian steps (runs of equal steps merged, as opacus does)."""
        sigma = check_noise_multiplier(noise_multiplier)
        q = check_sample_rate(sample_rate)
        k = _check_count("num_steps", num_steps, 0)
        if k == 0:
            return
        hist = self._acc.history
        if hist and hist[-1][0] == sigma and hist[-1][1] == q:
            hist[-1] = (sigma, q, hist[-1][2] + k)
        else:
            hist.append((sigma, q, k))

    @property
    def steps(self) -> int:
        """Total steps recorded."""
        return sum(n for _, _, n in self._acc.history)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """``[(noise_multiplier, sample_rate, steps), ...]`` as opacus keeps it (runs of equal steps merged)."""
        return [(float(s), float(q), int(n)) for s, q, n in self._acc.history]

    def epsilon(self, delta: float) -> float:
        """The epsilon spent so far at ``delta``: 0 before any step, inf if any step had no noise.

        RDP: opacus's RDP-to-(eps, delta) conversion, minimised over orders 1.1 to 1024; PRV: the smaller of
        opacus's PRV upper bound (``eps_error=0.01``: it never goes below ~0.01, and gives inf for some sigma
        RDP bounds) and RDP's, both valid upper bounds; RDP's alone where a step's sigma is below
        ``PRV_MIN_SIGMA`` (PRV's cost explodes there), where PRV's grids would pass ``PRV_MAX_POINTS`` points or
        ``PRV_MAX_ENTRIES`` entries (many steps, a large q, a noise schedule: memory and time) or where PRV's
        numerics refuse (a tiny delta). inf where
        the arithmetic overflows (a sigma so small that no finite bound is computable).
        """
        d = check_delta(delta)
        history = self._acc.history
        if not history:
            return 0.0
        if any(s < _MIN_FINITE_SIGMA for s, _, _ in history):  # (0: no noise at all)
            return math.inf
        if self.mechanism == "rdp":
            return self._bound(self._acc, "rdp", d)
        from opacus.accountants import RDPAccountant

        rdp = RDPAccountant()
        rdp.history = list(history)
        eps = self._bound(rdp, "rdp", d)
        if (any(s < PRV_MIN_SIGMA for s, _, _ in history) or len(history) > PRV_MAX_ENTRIES
                or len(history) * _prv_grid_points(history, d) > PRV_MAX_POINTS):
            return eps
        try:
            return min(eps, self._bound(self._acc, "prv", d))
        except (ValueError, RuntimeError, MemoryError):  # "Floating point errors will dominate" (tiny delta); OOM
            return eps

    @staticmethod
    def _bound(acc, mechanism: str, d: float) -> float:
        try:
            eps = acc.get_epsilon(delta=d, **_epsilon_kwargs(mechanism))
        except (ZeroDivisionError, OverflowError, FloatingPointError):  # (RDP at sigma 1e-200 divided by 0)
            return math.inf
        # the conversion may go below 0 for a large delta (valid: eps >= log(1 - delta)); a budget spent is >= 0.
        # NaN (never seen from opacus) is no bound at all: inf, never max(0, NaN) = 0
        eps = float(eps)
        return math.inf if math.isnan(eps) else max(0.0, eps)

    def state_dict(self) -> dict:
        """JSON-safe state (no pickle): ``{"version", "mechanism", "history": [[sigma, q, steps], ...]}``."""
        return {"version": STATE_VERSION, "mechanism": self.mechanism, "history": [list(h) for h in self.history]}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Accountant":
        """Rebuild an accountant from ``state_dict()``; every field is validated (it may come from disk).

        Raises:
            ValueError: a missing or malformed field (named in the message).
        """
        if not isinstance(state, dict):
            raise ValueError(f"state: expected a dict from Accountant.state_dict(), got {type(state).__name__}")
        version = state.get("version", STATE_VERSION)
        if version != STATE_VERSION:
            raise ValueError(f"state['version']: expected {STATE_VERSION}, got {version!r}")
        if "mechanism" not in state or "history" not in state:
            raise ValueError(f"state: expected keys 'mechanism' and 'history', got {sorted(state)}")
        acc = cls(state["mechanism"])
        history = state["history"]
        if not isinstance(history, (list, tuple)):
            raise ValueError(f"state['history']: expected a list of [sigma, q, steps], got {history!r}")
        for i, entry in enumerate(history):
            if not isinstance(entry, (list, tuple)) or len(entry) != 3:
                raise ValueError(f"state['history'][{i}]: expected [sigma, q, steps], got {entry!r}")
            s, q, n = entry
            acc._acc.history.append(
                (check_noise_multiplier(s), check_sample_rate(q), _check_count(f"state['history'][{i}] steps", n, 1))
            )
        return acc

    def save(self, path: str | os.PathLike) -> None:
        """Write ``state_dict()`` as JSON, atomically (temporary file + rename)."""
        from fedlora_fast.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.state_dict()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Accountant":
        """Read an accountant written by ``save``."""
        with open(path) as f:
            return cls.from_state_dict(json.load(f))

    def __repr__(self) -> str:
        return f"Accountant(mechanism={self.mechanism!r}, steps={self.steps}, history={self.history})"


def _prv_grid_points(history, delta: float) -> float:
    """The number of points opacus's PRV accountant would discretise ``history``'s privacy loss on: the size of
    its own ``_get_domain`` at ``get_epsilon``'s default errors, without discretising anything; inf where that
    cannot be computed. It grows with the steps (the mesh shrinks as 1/sqrt(steps), the RDP-based domain
    grows) and with q: 1e6 steps at q = 0.01, sigma = 1 need ~1e8 points (a MemoryError, or the process
    killed, after ~40 s), which RDP answers in ~0.1 s."""
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (opacus's "optimal order is the smallest alpha")
            domain = PRVAccountant()._get_domain(
                prvs=[PoissonSubsampledGaussianPRV(q, s) for s, q, _ in history],
                num_self_compositions=[n for _, _, n in history], eps_error=0.01, delta_error=delta / 1000,
            )
        return float(domain.size)
    except (ArithmeticError, ValueError, RuntimeError, AttributeError, TypeError):  # (a private API: RDP then)
        return math.inf


def calibrate_noise_multiplier(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, mechanism: str = "rdp"
) -> float:
    """The noise multiplier that spends at most ``target_epsilon`` at ``delta`` over ``steps`` Poisson steps.

    opacus's search (``get_noise_multiplier``: sigma doubled from 20 until the budget is met, then bisected
    from [0, sigma], stopping within 0.01 of the target, or within 1 % of it below epsilon = 1), run over this
    module's ``Accountant.epsilon`` (its extended RDP orders, PRV's cut-off) and bounded to 200 bisections; the
    result is checked again with a fresh accountant, so the returned sigma never exceeds the budget.

    Raises:
        ValueError: arguments out of range (``target_epsilon`` above ``MAX_TARGET_EPSILON`` too), or a budget
            that no noise level can meet (e.g. with RDP, epsilon below the conversion's floor at the largest
            order, 1024: about 0.0035 at delta = 1e-5).
    """
    eps = _number("target_epsilon", target_epsilon)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"target_epsilon: expected a finite number > 0, got {target_epsilon!r}")
    if eps > MAX_TARGET_EPSILON:
        raise ValueError(f"target_epsilon: expected at most {MAX_TARGET_EPSILON:g} (beyond it there is no meaningful "
                         f"guarantee to calibrate for; set the noise multiplier itself), got {target_epsilon!r}")
    d, q = check_delta(delta), check_sample_rate(sample_rate)
    k = _check_count("steps", steps, 1)
    if mechanism not in ACCOUNTANTS:
        raise ValueError(f"mechanism: expected one of {ACCOUNTANTS}, got {mechanism!r}")

    def eps_of(sigma: float) -> float:
        acc = Accountant(mechanism)
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=k)
        return acc.epsilon(d)

    try:
        sigma = _search_sigma(eps_of, eps, min(0.01, 0.01 * eps))
    except (ValueError, ArithmeticError, RuntimeError) as e:
        raise ValueError(
            f"target_epsilon={eps} at delta={d} cannot be met with sample_rate={q} over {k} steps "
            f"({mechanism} accountant: {e}); raise epsilon or delta, or take fewer steps or a smaller sample rate"
        ) from None
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"target_epsilon={eps}: calibration gave noise_multiplier={sigma}, not usable")
    check = Accountant(mechanism)
    check.step(noise_multiplier=sigma, sample_rate=q, num_steps=k)
    spent = check.epsilon(d)
    if not spent <= eps:
        raise ValueError(
            f"target_epsilon={eps}: calibrated noise_multiplier={sigma} spends epsilon={spent} > target "
            f"({mechanism} accountant); the budget cannot be met reliably"
        )
    return float(sigma)


def _search_sigma(eps_of, target: float, tolerance: float) -> float:
    """opacus's ``get_noise_multiplier`` search over ``eps_of(sigma)``, with at most 200 bisections (where
    ``eps_of`` jumps, as at PRV's cut-off, the bracket can shrink to nothing above the tolerance: the sigma
    found then meets the budget, only less tightly)."""
    sigma_low, sigma_high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target:
        sigma_high = 2 * sigma_high
        eps_high = eps_of(sigma_high)
        if sigma_high > _MAX_SIGMA:
            raise ValueError("The privacy budget is too low.")
    for _ in range(200):
        if target - eps_high <= tolerance:
            break
        sigma = (sigma_low + sigma_high) / 2
        if sigma in (sigma_low, sigma_high):
            break
        e = eps_of(sigma)
        if e < target:
            sigma_high, eps_high = sigma, e
        else:
            sigma_low = sigma
    return sigma_high

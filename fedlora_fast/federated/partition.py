"""Split a labelled training set across clients: IID, label skew with explicit proportions, Dirichlet(alpha).

The label-skew scheme follows the FFA-LoRA paper's heterogeneous setting (Sun et al., ICLR 2024, arXiv
2403.12313): three clients holding binary labels in proportions [0.1, 0.9], [0.9, 0.1] and [0.5, 0.5].
Dirichlet label skew follows Hsu et al. 2019 (arXiv 1909.06335). Every scheme is a pure function of
``(labels, arguments, seed)`` and returns sorted index lists.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

PAPER_LABEL_SKEW = [[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]]
SCHEMES = ("iid", "label_skew", "dirichlet")


def _check(labels: Sequence[int], num_clients: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels: expected a non-empty 1-D sequence of class ids, got shape {y.shape}")
    if y.dtype == bool:  # a binary encoding: False, True are classes 0, 1
        y = y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels: expected class ids, ints >= 0, got dtype {y.dtype}")
    if y.min() < 0:
        raise ValueError(f"labels: expected class ids, ints >= 0, got {int(y.min())}")
    if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients <= 0:
        raise ValueError(f"num_clients: expected a positive int, got {num_clients!r}")
    if num_clients > y.size:
        raise ValueError(
            f"num_clients: {num_clients} clients but only {y.size} training examples; every client needs at "
            "least one: use fewer clients or more data"
        )
    return y


def iid(labels: Sequence[int], num_clients: int, seed: int) -> list[list[int]]:
    """A uniform random split into ``num_clients`` near-equal parts (sizes differ by at most one)."""
    y = _check(labels, num_clients)
    perm = np.random.default_rng(seed).permutation(y.size)
    return [sorted(p.tolist()) for p in np.array_split(perm, num_clients)]


def _positive_ints(values: Sequence[int], k: int) -> bool:
    try:
        return len(values) == k and all(
            not isinstance(v, bool) and int(v) == v and v >= 1 for v in values)
    except (TypeError, ValueError, OverflowError):
        return False


def label_skew(
    labels: Sequence[int], proportions: Sequence[Sequence[float]], seed: int, sizes: Sequence[int] | None = None,
    num_classes: int | None = None,
) -> list[list[int]]:
    """Client k holds classes in exactly the proportions ``proportions[k]`` (one row per client).

    Args:
        labels: (N,) class ids in ``[0, C)``.
        proportions: (K, C) rows of non-negative numbers summing to 1.
        sizes: examples per client; None: equal sizes, as large as the scarcest class allows
            (``min_c count_c / sum_k p_kc``), so some examples of the other classes stay unused.
        num_classes: C, where the classes are known (a class may have no example here); None: max id + 1.
    Returns:
        K sorted, disjoint index lists; client k's class-c count is ``round(sizes[k] * p_kc)``.
    Raises:
        ValueError: malformed labels, proportions or sizes, or more examples of a class asked for than exist.
    """
    y = _check(labels, len(proportions))
    try:
        p = np.asarray(proportions, dtype=np.float64)
    except (TypeError, ValueError):  # rows of different lengths, or not numbers (numpy's text named no argument)
        lengths = [len(row) if hasattr(row, "__len__") else None for row in proportions]
        raise ValueError(f"proportions: expected one row of C numbers per client, got rows of lengths {lengths}: "
                         f"{proportions!r}"[:300]) from None
    num_classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if y.max() >= num_classes:
        raise ValueError(f"labels: class id {int(y.max())} is outside [0, num_classes = {num_classes})")
    if p.ndim != 2 or p.shape[1] != num_classes:
        raise ValueError(
            f"proportions: expected one row of {num_classes} class proportions per client, got shape {p.shape}"
        )
    if (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-6):
        raise ValueError(f"proportions: every row must be non-negative and sum to 1, got {p.tolist()}")
    counts = np.bincount(y, minlength=num_classes)
    demand = p.sum(0)
    absent = [c for c in range(num_classes) if counts[c] == 0 and demand[c] > 0]
    if absent:
        raise ValueError(f"proportions: class id(s) {absent} have no example in the data, yet a client is to hold a "
                         "share of them; give them proportion 0 (or add their examples)")
    if sizes is None:
        n = min(math.floor(counts[c] / demand[c]) for c in range(num_classes) if demand[c] > 0)
        # each client's share is rounded on its own, so the rounded shares of a class can exceed what the
        # bound above allows by up to K/2 examples: the largest n whose rounded shares all fit
        while n > 0 and (np.rint(n * p).astype(np.int64).sum(0) > counts).any():
            n -= 1
        sizes = [n] * p.shape[0]
    elif not _positive_ints(sizes, p.shape[0]):
        # a negative size would be a slice end counted from the pool's end (overlapping clients), a short
        # list would broadcast: both silent
        raise ValueError(f"sizes: expected {p.shape[0]} ints >= 1 (one per client), got {list(sizes)!r}")
    per = np.rint(np.asarray(sizes, dtype=np.float64)[:, None] * p).astype(np.int64)  # (K, C)
    short = [c for c in range(num_classes) if per[:, c].sum() > counts[c]]
    if short:
        c = short[0]
        raise ValueError(
            f"proportions: clients need {int(per[:, c].sum())} examples of class {c}, only {int(counts[c])} exist"
        )
    if (per.sum(1) == 0).any():
        raise ValueError(f"proportions: a client would get no examples (sizes {list(sizes)})")
    rng = np.random.default_rng(seed)
    out: list[list[int]] = [[] for _ in range(p.shape[0])]
    for c in range(num_classes):
        pool = rng.permutation(np.flatnonzero(y == c))
        start = 0
        for k in range(p.shape[0]):
            out[k] += pool[start:start + per[k, c]].tolist()
            start += per[k, c]
    return [sorted(o) for o in out]


def dirichlet(labels: Sequence[int], num_clients: int, alpha: float, seed: int, min_size: int = 1) -> list[list[int]]:
    """Each class is split across clients by proportions drawn from Dirichlet(alpha) (Hsu et al. 2019).

    Redraws (up to 100 times) until every client has at least ``min_size`` examples.
    """
    y = _check(labels, num_clients)
    if not math.isfinite(float(alpha)) or float(alpha) <= 0:
        raise ValueError(f"dirichlet_alpha: expected a finite number > 0, got {alpha!r}")
    rng = np.random.default_rng(seed)
    for _ in range(100):
        out: list[list[int]] = [[] for _ in range(num_clients)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients))[:-1] * idx.size).astype(int)
            for k, part in enumerate(np.split(idx, cuts)):
                out[k] += part.tolist()
        if min(len(o) for o in out) >= min_size:
            return [sorted(o) for o in out]
    raise ValueError(
        f"dirichlet_alpha={alpha}: could not give each of {num_clients} clients >= {min_size} examples in 100 "
        "draws; raise alpha or use fewer clients"
    )


def partition(
    labels: Sequence[int],
    scheme: str,
    num_clients: int,
    seed: int,
    *,
    proportions: Sequence[Sequence[float]] | None = None,
    alpha: float = 0.5,
    num_classes: int | None = None,
) -> list[list[int]]:
    """Dispatch to a scheme by name (``iid``, ``label_skew``, ``dirichlet``); ``num_classes``: the run's
    classes (``label_skew``'s proportions have one column per class, present in the data or not)."""
    if scheme == "iid":
        return iid(labels, num_clients, seed)
    if scheme == "label_skew":
        props = PAPER_LABEL_SKEW if proportions is None else proportions
        if len(props) != num_clients:
            raise ValueError(
                f"num_clients: label_skew has {len(props)} rows of proportions (one per client), got "
                f"num_clients={num_clients}; pass --clients {len(props)}, or --label-proportions with "
                f"{num_clients} rows (one per client)"
            )
        return label_skew(labels, props, seed, num_classes=num_classes)
    if scheme == "dirichlet":
        return dirichlet(labels, num_clients, alpha, seed)
    raise ValueError(f"partition: expected one of {SCHEMES}, got {scheme!r}")

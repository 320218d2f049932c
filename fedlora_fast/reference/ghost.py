"""Per-sample gradients kept as their factors, never as (n, rows, cols) tensors ("ghost" norms and clipping).

A trained Linear's weight gradient of sample i is ``P_i = sum_t g[i, t] x[i, t]^T`` (g the output's gradient, x
the input), a lookup table's is ``sum_t onehot(ids[i, t]) e[i, t]^T``, and one tensor used by two modules (a
tied ``lm_head`` and its embedding) has the sum of both. Each such gradient is a sum of *terms* ``(left,
right)``: ``left`` (n, T, rows) float or (n, T) int64 ids (one-hot over the rows), ``right`` (n, T, cols).

- ``ghost_norm2``: ``|P_i|^2 = sum_{a, b} sum_{t, t'} <left_a[t], left_b[t']> <right_a[t], right_b[t']>``, the
  (T_a, T_b) Gram matrices of each pair of terms. A single table lookup sums its rows of equal id after one
  sort instead (O(n T dim)).
- ``ghost_clip_reduce``: ``sum_i c_i P_i``: one matrix product per dense term, one scatter-add per table
  lookup, samples with ``c_i == 0`` skipped (a NaN or inf of a dropped sample stays out).
- ``ghost_grad_sample``: the dense (n, rows, cols) float32 form, for checks and for opacus.

**Why float64, and the cap.** A dense per-sample gradient is clipped as it was computed, rounding included.
Here the norm and the sum are two computations, and a sample whose tokens cancel (``g`` and ``-3 g`` against
``x`` and ``x / 3``) has a tiny gradient made of huge factors: float32 rounding in the sum, of order
``2^-24 K M_i`` for ``M_i = sum_t |left_t| |right_t|`` and K terms summed, would ride on the sum unclipped, and
a float32 Gram would misjudge its norm by as much. So both are computed in float64 (results float32), and a
sample's coefficient is capped so that ``c_i M_i <= CANCEL_CAP |c_i P_i| <= CANCEL_CAP C``: its rounding then
stays ~1e-16 K CANCEL_CAP C. The cap binds only for a sample whose gradient is below 1/CANCEL_CAP of its
factors' magnitude; for independent tokens that ratio is ~1/sqrt(T).

Static shapes throughout (no ``unique``, no read-back): a CUDA graph can hold them. Memory: the factors
(n x T x (rows + cols)) and, transiently, float64 copies and (T_a, T_b) Grams for a chunk of samples
(``CHUNK_BYTES``), against n x rows x cols (a 32k x 4096 ``lm_head`` at 8 x 512 tokens: 0.5 GiB of g against
3.9 GiB of per-sample gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor

Term = tuple[Tensor, Tensor]
CHUNK_BYTES = 1 << 26  # float64 copies of one chunk of samples' factors
CANCEL_CAP = 1e3


def _is_ids(left: Tensor) -> bool:
    return not left.is_floating_point()


def _chunks(terms: list[Term]):
    """(start, stop) ranges of samples whose factors take ~CHUNK_BYTES in float64."""
    n = terms[0][1].shape[0]
    per_sample = sum(left[0].numel() + right[0].numel() for left, right in terms) * 8 if n else 1
    step = max(1, CHUNK_BYTES // max(per_sample, 1))
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def embedding_grad_norm2(ids: Tensor, g: Tensor) -> Tensor:
    """(n,) float64 squared norms of the per-sample gradients ``sum_t onehot(ids[i, t]) g[i, t]^T`` of a table.

    Args:
        ids: (n, T) integer ids of the rows each sample looked up.
        g: (n, T, dim) gradient of the looked-up rows (zero where a row takes no gradient: padding).
    A non-finite row makes its own sample's norm non-finite only.
    """
    n, T, d = g.shape
    if n == 0 or T == 0:
        return torch.zeros(n, dtype=torch.float64, device=g.device)
    sid, order = ids.sort(dim=1)
    gs = g.double().gather(1, order.unsqueeze(-1).expand(n, T, d))
    start = torch.ones_like(sid, dtype=torch.bool)
    start[:, 1:] = sid[:, 1:] != sid[:, :-1]  # the first of each run of equal ids opens a segment
    seg = start.long().cumsum(1) - 1 + torch.arange(n, device=g.device).unsqueeze(1) * T
    summed = gs.new_zeros(n * T, d).index_add_(0, seg.flatten(), gs.reshape(-1, d))
    return summed.pow(2).sum(1).view(n, T).sum(1)


def _left_gram(a: Tensor, b: Tensor) -> Tensor:
    """(n, T_a, T_b) float64 ``<left_a[t], left_b[t']>`` (ids are one-hot rows)."""
    if _is_ids(a) and _is_ids(b):
        return (a.unsqueeze(2) == b.unsqueeze(1)).double()
    if _is_ids(a):  # <onehot(a[t]), b[t']> = b[t', a[t]]
        return b.double().gather(2, a.unsqueeze(1).expand(-1, b.shape[1], -1)).transpose(1, 2)
    if _is_ids(b):
        return _left_gram(b, a).transpose(1, 2)
    return torch.bmm(a.double(), b.double().transpose(1, 2))


def _norm2_64(terms: list[Term]) -> Tensor:
    if len(terms) == 1 and _is_ids(terms[0][0]):
        return embedding_grad_norm2(*terms[0])
    out = []
    for s, e in _chunks(terms):
        chunk = [(left[s:e], right[s:e]) for left, right in terms]
        total = torch.zeros(e - s, dtype=torch.float64, device=chunk[0][1].device)
        for a, (la, ra) in enumerate(chunk):
            for b in range(a, len(chunk)):
                lb, rb = chunk[b]
                gram = _left_gram(la, lb) * torch.bmm(ra.double(), rb.double().transpose(1, 2))
                total += gram.sum((1, 2)) * (1 if a == b else 2)
        out.append(total)
    if not out:
        return torch.zeros(0, dtype=torch.float64, device=terms[0][1].device)
    return torch.cat(out).clamp_min(0)  # (a zero gradient may round to a tiny negative; NaN stays NaN)


def ghost_norm2(terms: list[Term]) -> Tensor:
    """(n,) float32 squared norms of ``P_i = sum over terms of left_i^T right_i`` (module docstring).

    A non-finite factor makes its own sample's norm non-finite only (NaN or inf: the sample is dropped).
    """
    return _norm2_64(terms).float()


def ghost_magnitude(terms: list[Term]) -> Tensor:
    """(n,) float64 ``M_i = sum over terms and tokens of |left_t| |right_t|`` (>= |P_i|; a one-hot row has
    norm 1)."""
    total = 0
    for left, right in terms:
        r = right.double().norm(dim=2)
        total = total + (r if _is_ids(left) else left.double().norm(dim=2) * r).sum(1)
    return total


def ghost_clip_reduce(terms: list[Term], coef: Tensor, rows: int, norm2: Tensor | None = None) -> Tensor:
    """``sum_i c_i P_i`` as a (rows, cols) float32 tensor, accumulated in float64, skipping samples with
    ``c_i == 0``; ``c_i`` capped at ``CANCEL_CAP |P_i| / M_i`` (module docstring). ``norm2``: the (n,)
    squared norms ``|P_i|^2`` if known (``ghost_norm2``)."""
    right0 = terms[0][1]
    n, cols = right0.shape[0], right0.shape[2]
    norm = (norm2.double() if norm2 is not None else _norm2_64(terms)).sqrt()
    mag = ghost_magnitude(terms)
    cap = torch.where(mag > 0, CANCEL_CAP * norm / mag, torch.ones((), dtype=torch.float64, device=mag.device))
    coef = coef.double() * cap.clamp(max=1.0)
    coef = torch.where(torch.isfinite(coef), coef, torch.zeros((), dtype=torch.float64, device=coef.device))
    out = torch.zeros(rows, cols, dtype=torch.float64, device=right0.device)
    for s, e in _chunks(terms):
        c = coef[s:e].view(-1, 1, 1)
        drop = c == 0
        for left, right in terms:
            scaled = right[s:e].double().mul_(c).masked_fill_(drop, 0.0).reshape(-1, cols)
            if _is_ids(left):
                out.index_add_(0, left[s:e].reshape(-1), scaled)
            else:
                out.addmm_(left[s:e].double().masked_fill_(drop, 0.0).reshape(-1, rows).t(), scaled)
    return out.float()


def ghost_grad_sample(terms: list[Term], rows: int) -> Tensor:
    """The dense (n, rows, cols) float32 per-sample gradients (accumulated in float64)."""
    right0 = terms[0][1]
    n, cols = right0.shape[0], right0.shape[2]
    out = torch.zeros(n, rows, cols, dtype=torch.float64, device=right0.device)
    for left, right in terms:
        if _is_ids(left):
            flat = (left + torch.arange(n, device=left.device).unsqueeze(1) * rows).reshape(-1)
            out.view(n * rows, cols).index_add_(0, flat, right.double().reshape(-1, cols))
        else:
            out.baddbmm_(left.double().transpose(1, 2), right.double())
    return out.float()


def embedding_grad_sample(ids: Tensor, g: Tensor, rows: int) -> Tensor:
    """The dense (n, rows, dim) float32 per-sample table gradients."""
    return ghost_grad_sample([(ids, g)], rows)

"""Per-sample gradients kept as their factors, never as (n, rows, cols) tensors ("ghost" norms and clipping).

A trained Linear's weight gradient of sample i is ``P_i = sum_t g[i, t] x[i, t]^T`` (g the output's gradient, x
the input), a lookup table's is ``sum_t onehot(ids[i, t]) e[i, t]^T``, and one tensor used by two modules (a
tied ``lm_head`` and its embedding) has the sum of both. Each such gradient is a sum of *terms* ``(left,
right)``: ``left`` (n, T, rows) float or (n, T) int64 ids (one-hot over the rows), ``right`` (n, T, cols).

- ``ghost_norm2``: ``|P_i|^2 = sum_{a, b} sum_{t, t'} <left_a[t], left_b[t']> <right_a[t], right_b[t']>``, the
  (T_a, T_b) Gram matrices of each pair of terms. A single table lookup sums its rows of equal id after one
  sort instead (O(n T dim)).
- ``ghost_clip_reduce``: ``sum_i c_i P_i``: matrix products for dense terms, each sample's rows of equal id
  summed, then a chunk's of equal id, then scattered for a table lookup, samples with ``c_i == 0`` skipped (a
  NaN or inf of a dropped sample stays out).
- ``ghost_grad_sample``: the dense (n, rows, cols) float32 form, for checks and for opacus.

**Why float64, and the cap.** A dense per-sample gradient is clipped as it was computed, rounding included.
Here the norm and the sum are two computations, and a sample whose tokens cancel (``g`` and ``-3 g`` against
``x`` and ``x / 3``) has a tiny gradient made of huge factors: float32 rounding in the sum, of order
``2^-24 K M_i`` for ``M_i = sum_t |left_t| |right_t|`` and K terms summed, would ride on the sum unclipped, and
a float32 Gram would misjudge its norm by as much. So both are computed in float64, a chunk of samples at a
time (each chunk's sum, of clipped contributions, is added to the float32 result), and a sample's coefficient
is capped so that ``c_i M_i <= CANCEL_CAP |c_i P_i| <= CANCEL_CAP C``: its rounding then stays ~1e-16 K
CANCEL_CAP C. The cap binds only for a sample whose gradient is below 1/CANCEL_CAP of its
factors' magnitude; for independent tokens that ratio is ~1/sqrt(T).

Static shapes throughout (no ``unique``, no read-back): a CUDA graph can hold them. Memory: the factors
(n x T x (rows + cols)), the float32 (rows, cols) sum, and transiently float64 copies of one chunk of samples'
factors, their (T_a, T_b) Grams and one float64 tile of rows of the sum (~``CHUNK_BYTES`` each, 16 MiB on a CPU,
256 MiB on a GPU; a table alone has no tile: its chunk's float64 sums, one per distinct id, are no larger than
the chunk's factors), against n x rows x cols for the per-sample tensors (a 32k x 4096 ``lm_head`` at 8 x 512
tokens: 0.5 GiB of g and 0.5 GiB of sum against 3.9 GiB). The float64 products cost what float32 ones do on
H100/H200-class GPUs, 2x on a CPU (the whole clip measured ~1x the dense path's there: ``bench/ghost.py``), and
far more on GPUs with slow float64 (consumer cards: 1/64 rate).
"""

from __future__ import annotations

import torch
from torch import Tensor

Term = tuple[Tensor, Tensor]
CHUNK_BYTES = 1 << 24  # float64 copies of one chunk of samples' factors, one tile of the sum (CPU: cache-sized)
CHUNK_BYTES_GPU = 1 << 28  # (fewer, larger products on a GPU)
CANCEL_CAP = 1e3


def is_ids(left: Tensor) -> bool:
    """Whether a term's left factor is ids (one-hot rows) rather than a float (n, T, rows) tensor."""
    return not left.is_floating_point()


def _budget(t: Tensor) -> int:
    return CHUNK_BYTES if t.device.type == "cpu" else CHUNK_BYTES_GPU


def _chunks(terms: list[Term]):
    """(start, stop) ranges of samples whose factors take ~``_budget`` bytes in float64."""
    n = terms[0][1].shape[0]
    per_sample = sum(left[0].numel() + right[0].numel() for left, right in terms) * 8 if n else 1
    step = max(1, _budget(terms[0][1]) // max(per_sample, 1))
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def _segment_sums(ids: Tensor, vals: Tensor) -> tuple[Tensor, Tensor]:
    """Each sample's rows of equal id summed: ``(seg_ids, sums)``, (n T,) int64 and (n T, dim) in ``vals``'s
    dtype, one segment per distinct id of a sample, in order of id (the unused segments, at the end of each
    sample's: id 0, sum 0). One sort of the ids (not of ``vals``: each row is added where it stands), static
    shapes."""
    n, T, d = vals.shape
    sid, order = ids.sort(dim=1)
    start = torch.ones_like(sid, dtype=torch.bool)
    start[:, 1:] = sid[:, 1:] != sid[:, :-1]  # the first of each run of equal ids opens a segment
    seg = start.long().cumsum(1) - 1 + torch.arange(n, device=vals.device).unsqueeze(1) * T
    seg_of_row = torch.empty_like(seg).scatter_(1, order, seg)  # (the segment of each row where it stands)
    sums = vals.new_zeros(n * T, d).index_add_(0, seg_of_row.flatten(), vals.reshape(-1, d))
    seg_ids = torch.zeros(n * T, dtype=torch.long, device=vals.device).scatter_(0, seg.flatten(), sid.flatten())
    return seg_ids, sums


def embedding_grad_norm2(ids: Tensor, g: Tensor) -> Tensor:
    """(n,) float64 squared norms of the per-sample gradients ``sum_t onehot(ids[i, t]) g[i, t]^T`` of a table.

    Args:
        ids: (n, T) integer ids of the rows each sample looked up.
        g: (n, T, dim) gradient of the looked-up rows (zero where a row takes no gradient: padding).
    A non-finite row makes its own sample's norm non-finite only.
    """
    n, T, _ = g.shape
    if n == 0 or T == 0:
        return torch.zeros(n, dtype=torch.float64, device=g.device)
    _, sums = _segment_sums(ids, g.double())
    return sums.pow(2).sum(1).view(n, T).sum(1)


def _left_gram(a: Tensor, b: Tensor) -> Tensor:
    """(n, T_a, T_b) float64 ``<left_a[t], left_b[t']>`` (ids are one-hot rows; floats given in float64)."""
    if is_ids(a) and is_ids(b):
        return (a.unsqueeze(2) == b.unsqueeze(1)).double()
    if is_ids(a):  # <onehot(a[t]), b[t']> = b[t', a[t]]
        return b.gather(2, a.unsqueeze(1).expand(-1, b.shape[1], -1)).transpose(1, 2)
    if is_ids(b):
        return _left_gram(b, a).transpose(1, 2)
    return torch.bmm(a, b.transpose(1, 2))


def _wide(t: Tensor) -> Tensor:
    return t if is_ids(t) else t.double()


def _norm2_64(terms: list[Term]) -> Tensor:
    if len(terms) == 1 and is_ids(terms[0][0]):
        return embedding_grad_norm2(*terms[0])
    out = []
    for s, e in _chunks(terms):
        chunk = [(_wide(left[s:e]), right[s:e].double()) for left, right in terms]  # (one float64 copy each)
        total = torch.zeros(e - s, dtype=torch.float64, device=chunk[0][1].device)
        for a, (la, ra) in enumerate(chunk):
            for b in range(a, len(chunk)):
                lb, rb = chunk[b]
                gram = _left_gram(la, lb) * torch.bmm(ra, rb.transpose(1, 2))
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
    norm 1), chunk by chunk."""
    out = []
    for s, e in _chunks(terms):
        total = 0
        for left, right in terms:
            r = torch.linalg.vector_norm(right[s:e], dim=2, dtype=torch.float64)
            if not is_ids(left):
                r = r * torch.linalg.vector_norm(left[s:e], dim=2, dtype=torch.float64)
            total = total + r.sum(1)
        out.append(total)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=terms[0][1].device)


def ghost_clip_reduce(terms: list[Term], coef: Tensor, rows: int, norm2: Tensor | None = None) -> Tensor:
    """``sum_i c_i P_i`` as a (rows, cols) float32 tensor, skipping samples with ``c_i == 0``; ``c_i`` capped at
    ``CANCEL_CAP |P_i| / M_i`` (module docstring). ``norm2``: the (n,) squared norms ``|P_i|^2`` if known.

    Each chunk of samples is summed in float64 over tiles of rows (a table's rows of equal id first summed per
    sample, then over the chunk) and added to the float32 result: what one sample's tokens cancel is resolved in
    float64, and the float32 additions are of clipped sums (each sample's at most C). A table alone needs no
    tiles: its chunk's sums (one per distinct id, within the chunk's float64 budget) are added row by row."""
    right0 = terms[0][1]
    n, cols = right0.shape[0], right0.shape[2]
    norm = (norm2.double() if norm2 is not None else _norm2_64(terms)).sqrt()
    mag = ghost_magnitude(terms)
    one = torch.ones((), dtype=torch.float64, device=mag.device)
    cap = torch.where(mag > 0, CANCEL_CAP * norm / mag, one).clamp(max=1.0)
    coef = coef.double() * cap
    coef = torch.where(torch.isfinite(coef), coef, torch.zeros_like(coef))
    out = torch.zeros(rows, cols, dtype=torch.float32, device=right0.device)
    tile = max(1, min(rows, _budget(right0) // (cols * 8)))
    for s, e in _chunks(terms):
        c = coef[s:e].view(-1, 1, 1)
        drop = c == 0
        products, lookups = [], []
        for left, right in terms:
            scaled = right[s:e].double().mul_(c).masked_fill_(drop, 0.0)  # (a dropped sample's inf or NaN: 0)
            if is_ids(left):
                lookups.append(_segment_sums(left[s:e], scaled))
            else:
                products.append((left[s:e].double().masked_fill_(drop, 0.0).reshape(-1, rows),
                                 scaled.reshape(-1, cols)))
        del scaled
        if lookups:  # the chunk's segments (every sample's, every table's) of equal id summed in float64
            ids, sums = lookups[0] if len(lookups) == 1 else (
                torch.cat([i for i, _ in lookups]), torch.cat([v for _, v in lookups]))
            del lookups
            ids, sums = _segment_sums(ids.unsqueeze(0), sums.unsqueeze(0))  # (ids: (1, K), each distinct once)
            if not products:  # a table alone: float64 only for the chunk's segments, each row added once, no tiles
                out.index_add_(0, ids.view(-1), sums.float())
                continue
            table = ids.view(-1), sums
        else:
            table = None
        for r0 in range(0, rows, tile):
            r1 = min(rows, r0 + tile)
            h = r1 - r0
            acc = torch.zeros(h + (table is not None), cols, dtype=torch.float64, device=out.device)
            for left64, scaled in products:
                acc[:h].addmm_(left64[:, r0:r1].t(), scaled)
            if table is not None:  # a segment of another tile goes to the extra row, dropped (no masked copy)
                ids, sums = table
                acc.index_add_(0, torch.where((ids >= r0) & (ids < r1), ids - r0, h), sums)
            out[r0:r1] += acc[:h].float()
    return out


def ghost_grad_sample(terms: list[Term], rows: int) -> Tensor:
    """The dense (n, rows, cols) float32 per-sample gradients (float32 sums, as a dense per-sample rule's)."""
    right0 = terms[0][1]
    n, cols = right0.shape[0], right0.shape[2]
    out = torch.zeros(n, rows, cols, dtype=torch.float32, device=right0.device)
    for left, right in terms:
        if is_ids(left):
            flat = (left + torch.arange(n, device=left.device).unsqueeze(1) * rows).reshape(-1)
            out.view(n * rows, cols).index_add_(0, flat, right.float().reshape(-1, cols))
        else:
            out.baddbmm_(left.float().transpose(1, 2), right.float())
    return out


def embedding_grad_sample(ids: Tensor, g: Tensor, rows: int) -> Tensor:
    """The dense (n, rows, dim) float32 per-sample table gradients."""
    return ghost_grad_sample([(ids, g)], rows)

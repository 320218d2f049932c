"""Poisson sampling, the scheme the accountants assume: each example joins a step independently with prob. q.

Follows opacus's ``UniformWithReplacementSampler`` / ``DPDataLoader`` semantics (Abadi et al. 2016;
Mironov et al. 2019 analyse exactly this subsampling). Batches have variable size and may be empty: the
DP step still runs then, with noise only (``DPSGD.step(empty_batch=True)``). Fixed-size shuffled batches
are a different mechanism that the Poisson accountants do not bound; ``check_poisson_loader`` refuses them.
"""

from __future__ import annotations

import math
import os
import secrets
import struct
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data import default_collate

from fedlora_fast.ops.chacha20 import chacha20_normal
from fedlora_fast.privacy.accounting import check_sample_rate
from fedlora_fast.reference.chacha20 import normals_from_words


# torch's CPU generator state (a Mersenne Twister): the legacy THGeneratorState (the initial seed u64, left i32,
# seeded i32, next u64, 624 state words as u64, the cached double normal: three f64 and a validity i32) and the
# cached float normal (f32, a validity bool), padded: 5056 bytes
_MT_STATE_BYTES, _MT_WORDS, _MT_WORDS_AT, _MT_DOUBLE_VALID_AT, _MT_FLOAT_VALID_AT = 5056, 624, 24, 5040, 5052


def seed_from_os(gen: torch.Generator) -> torch.Generator:
    """``gen`` (returned) with its whole state drawn from the operating system's entropy: for Poisson sampling and
    dropout whose draws must stay secret (DP noise itself is drawn by ``os_normal``, with no generator kept).

    A CPU generator (Mersenne Twister) gets its 624 state words from ``os.urandom`` (19,968 bits):
    ``manual_seed`` keeps only the low 32 bits of a seed there, and a search over those 2^32 states recovers the
    noise, and with it the clipped sum it hides (a reviewer's estimate: about a day of one CPU core). A CUDA
    generator (Philox) takes a 64-bit seed whole.
    """
    if gen.device.type != "cpu":
        return gen.manual_seed(secrets.randbits(64))
    state = bytearray(gen.get_state().numpy().tobytes())
    if len(state) != _MT_STATE_BYTES:  # (a torch whose CPU generator changed layout: refuse rather than guess)
        raise RuntimeError(f"seed_from_os: expected torch's CPU generator state of {_MT_STATE_BYTES} bytes, got "
                           f"{len(state)} (torch {torch.__version__}): this torch is not supported")
    words = struct.unpack(f"<{_MT_WORDS}I", os.urandom(4 * _MT_WORDS))
    struct.pack_into("<QiiQ", state, 0, 0, 1, 1, 0)  # no initial seed; left = 1: the first draw twists the state
    struct.pack_into(f"<{_MT_WORDS}Q", state, _MT_WORDS_AT, *words)
    struct.pack_into("<i", state, _MT_DOUBLE_VALID_AT, 0)  # no cached normal sample (double or float)
    state[_MT_FLOAT_VALID_AT] = 0
    gen.set_state(torch.frombuffer(state, dtype=torch.uint8).clone())
    return gen


@torch.compiler.disable  # always run, never traced: a trace could keep one draw's key (and its noise) as a constant
def os_normal(shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
              device: str | torch.device | None = None) -> Tensor:
    """Standard normal draws on ``device`` (default the CPU) from the operating system's cryptographically secure
    generator: nothing drawn before (noise released included) tells anything of what is drawn next.

    On a CPU every bit comes from ``os.urandom``; on CUDA from a ChaCha20 keystream (RFC 8439) under a fresh
    256-bit key from ``os.urandom`` at every call (the ``chacha20_normal`` op: a Triton kernel; ~2 MB of OS bytes
    per million normals would otherwise cross to the GPU at every step); on another device the CPU's draws are
    moved there. Both are Box-Muller over 53-bit uniforms in float64 (``reference.chacha20.normals_from_words``),
    then cast to ``dtype``. A generator's stream does not give that even when its state came from the OS
    (``seed_from_os``): a Mersenne Twister's output is linear in its state, and ~20,000 observed bits of it (one
    release of noise alone: an empty Poisson batch, a central-DP round without updates) determine the state and
    with it all the noise still to come (a reviewer's attack recovered the next release's clipped sum to 2e-7, in
    seconds); Philox is not a cryptographic generator. DP noise that is not caller-seeded is drawn here."""
    device = torch.device("cpu" if device is None else device)
    n = math.prod(shape)
    if n == 0:  # (an empty buffer is refused by torch.frombuffer)
        return torch.zeros(shape, dtype=dtype, device=device)
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "os_normal: called during a CUDA graph capture, which would keep this draw's key in the graph: every "
                "replay would add the same noise. Draw DP noise outside the capture (GraphedAccumulator keeps it eager)"
            )
        key = struct.unpack("<8I", os.urandom(32))  # (counter and nonce 0: a key serves one call only)
        return chacha20_normal((*key, 0, 0, 0, 0), n, device).view(shape).to(dtype)
    values = torch.frombuffer(bytearray(os.urandom(16 * ((n + 1) // 2))), dtype=torch.int64)
    return normals_from_words(values)[:n].view(shape).to(dtype=dtype, device=device)


def os_seeded_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A generator on ``device`` whose state comes from the operating system's entropy (``seed_from_os``; torch's
    global RNG untouched)."""
    return seed_from_os(torch.Generator(device=device))


def seed_global_from_os() -> None:
    """torch's global generators (dropout masks) seeded from the operating system: the CPU's whole state
    (``seed_from_os``), every CUDA device's with 64 bits."""
    seed_from_os(torch.default_generator)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(secrets.randbits(64))


class PoissonSampler(torch.utils.data.Sampler):
    """Yields ``steps`` index batches; each index is included independently with probability ``sample_rate``.

    Build the loader with ``poisson_dataloader``, whose collate turns an empty batch into a 0-sample batch (to
    step with ``DPSGD.step(empty_batch=True)``, never skip). In ``DataLoader(ds, batch_sampler=PoissonSampler(
    ...))`` the collate gets the empty lists this yields: ``default_collate`` fails on them
    (``check_poisson_loader`` refuses such a loader).

    Args:
        num_examples: dataset size N.
        sample_rate: q in (0, 1]; the expected batch size is q N.
        steps: batches per pass (default ``round(1 / q)``: one expected epoch).
        generator: a CPU generator; None draws a seed from the OS.
    """

    def __init__(
        self, num_examples: int, sample_rate: float, steps: int | None = None, generator: torch.Generator | None = None
    ):
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples <= 0:
            raise ValueError(f"num_examples: expected a positive int, got {num_examples!r}")
        self.num_examples = num_examples
        self.sample_rate = check_sample_rate(sample_rate)
        if steps is None:
            steps = max(1, int(round(1 / self.sample_rate)))
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise ValueError(f"steps: expected a positive int, got {steps!r}")
        self.steps = steps
        if generator is not None and (
            not isinstance(generator, torch.Generator) or torch.device(generator.device).type != "cpu"
        ):
            raise ValueError(f"generator: expected a CPU torch.Generator, got {generator!r}")
        self.generator = os_seeded_generator() if generator is None else generator
        grid = math.floor(self.sample_rate * 2**24)  # see __iter__
        self._threshold = grid / 2**24
        self._tie_rate = math.floor((self.sample_rate * 2**24 - grid) * 2**53) / 2**53

    @property
    def expected_batch_size(self) -> float:
        """``q N``, the divisor DP-SGD uses (``DPSGD(expected_batch_size=round(...))``)."""
        return self.sample_rate * self.num_examples

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            # float32 draws are multiples of 2^-24: ``u < q`` would include a sample with probability
            # ceil(q 2^24) / 2^24 > q (+19 % at q = 3e-7), more than the accountant assumes. So: included if
            # u < t = floor(q 2^24) / 2^24, and where u == t (probability 2^-24) with the probability left,
            # q 2^24 - floor(q 2^24), by a second, float64 draw (rounded down to its 2^-53 grid): in all
            # exactly q (less by under 2^-77), also below 2^-24. The second draw happens only on a tie, so
            # the draws of a seeded run are those of ``u < q`` unless a tie occurs.
            u = torch.rand(self.num_examples, generator=self.generator, device="cpu")  # (not the default device)
            mask = u < self._threshold
            if self._tie_rate > 0:
                ties = (u == self._threshold).nonzero().flatten()
                if len(ties):
                    second = torch.rand(len(ties), generator=self.generator, dtype=torch.float64, device="cpu")
                    mask[ties[second < self._tie_rate]] = True
            yield mask.nonzero().flatten().tolist()


def _same_mapping(batch: Mapping, items: dict) -> Mapping:
    """``items`` in a mapping of ``batch``'s type: a ``defaultdict`` keeps its factory (its constructor takes
    that first), a type whose constructor takes no dict (a custom ``Mapping``) becomes a plain dict."""
    if type(batch) is defaultdict:
        return defaultdict(batch.default_factory, items)
    try:
        return type(batch)(items)
    except TypeError:
        pass
    if isinstance(batch, defaultdict):  # (a subclass keeping defaultdict's constructor)
        try:
            return type(batch)(batch.default_factory, items)
        except TypeError:
            pass
    return dict(items)


def _empty_like_batch(batch: Any) -> Any:
    """The same nested structure with every tensor sliced to 0 samples and nothing of the example it was
    shaped from: a list of per-sample values (collated strings, ids) becomes empty, any other leaf None, a
    0-dim tensor (a per-batch scalar a collate computed, e.g. a token count) too. (The structure comes from
    collating ``dataset[0]``, which was not sampled: none of its data may reach a step.)"""
    if isinstance(batch, Tensor):  # (new storage: a [:0] view would keep the example's values with it)
        return batch.new_empty((0, *batch.shape[1:])) if batch.dim() else None
    if isinstance(batch, Mapping):
        return _same_mapping(batch, {k: _empty_like_batch(v) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_empty_like_batch(v) for v in batch))
    if _per_sample_values(batch):
        return type(batch)()  # one value per sample (default_collate's list of strings): no samples
    if isinstance(batch, (list, tuple)):
        return type(batch)(_empty_like_batch(v) for v in batch)
    return None


class _EmptySafeCollate:
    """Collate that turns an empty index batch into a 0-sample batch shaped like ``dataset[0]``'s."""

    def __init__(self, dataset: Dataset, collate_fn: Callable):
        self.dataset, self.collate_fn = dataset, collate_fn

    def __call__(self, samples: list) -> Any:
        if len(samples) == 0:
            return _empty_like_batch(self.collate_fn([self.dataset[0]]))
        return self.collate_fn(samples)


def poisson_dataloader(
    dataset: Dataset,
    *,
    sample_rate: float,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    collate_fn: Callable | None = None,
    **loader_kwargs,
) -> DataLoader:
    """A ``DataLoader`` whose batches are Poisson samples of ``dataset`` (the sampling the accountants assume).

    Empty batches come out as 0-sample batches of the usual structure (``batch_size(b) == 0``); step those
    with ``DPSGD.step(empty_batch=True)``.

    Args:
        dataset: a map-style dataset of N examples.
        sample_rate: q in (0, 1].
        steps: batches per pass (default ``round(1/q)``).
        generator: a CPU generator for the sampling; None draws a seed from the OS.
        collate_fn: as for ``DataLoader`` (default ``default_collate``).
        loader_kwargs: other ``DataLoader`` arguments (``num_workers``, ``pin_memory``...). ``batch_size``,
            ``shuffle``, ``sampler``, ``batch_sampler`` and ``drop_last`` are refused: they would change
            the sampling.
    """
    bad = sorted(set(loader_kwargs) & {"batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"})
    if bad:
        raise ValueError(
            f"poisson_dataloader: {bad} would replace Poisson sampling (each example joins a batch "
            "independently with probability sample_rate), which the privacy accounting assumes; remove them"
        )
    sampler = PoissonSampler(len(dataset), sample_rate, steps, generator)
    collate = _EmptySafeCollate(dataset, collate_fn or default_collate)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, **loader_kwargs)


def check_poisson_loader(loader: DataLoader, sample_rate: float | None = None) -> float:
    """The Poisson sample rate of ``loader``; refuses loaders whose batches are not Poisson samples.

    Args:
        loader: the training ``DataLoader``.
        sample_rate: if given, must equal the loader's rate.
    Returns:
        q, the loader's sample rate.
    Raises:
        ValueError: ``loader`` draws fixed-size (shuffled or sequential) batches or another custom
            sampler: the Poisson accountants do not bound that mechanism, so its epsilon would be false; or
            its collate fails on an empty batch (``poisson_dataloader``'s does not).
    """
    sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(sampler, PoissonSampler):
        raise ValueError(
            f"loader: expected Poisson sampling (a DataLoader with batch_sampler=PoissonSampler, e.g. from "
            f"poisson_dataloader), got batches from {type(sampler).__name__}"
            f"{' of fixed size ' + str(loader.batch_size) if getattr(loader, 'batch_size', None) else ''}; "
            "the RDP/PRV accountants assume each example joins each step independently with probability q, "
            "and would report an epsilon that does not hold for fixed-size shuffled batches"
        )
    if sample_rate is not None and check_sample_rate(sample_rate) != sampler.sample_rate:
        raise ValueError(f"sample_rate: {sample_rate} differs from the loader's Poisson rate {sampler.sample_rate}")
    collate = getattr(loader, "collate_fn", None)
    if not isinstance(collate, _EmptySafeCollate):
        try:  # (an empty Poisson batch, probability (1 - q)^N per step: 37 % at N = 1000, q = 0.001)
            collate([])
        except Exception as e:
            raise ValueError(
                f"loader: its collate_fn fails on an empty Poisson batch ({type(e).__name__}: {str(e)[:120]}); "
                "build it with poisson_dataloader(dataset, sample_rate=q, collate_fn=...), whose empty batches "
                "come out as 0-sample batches: step them with DPSGD.step(empty_batch=True), never skip them"
            ) from None
    return sampler.sample_rate


def batch_size(batch: Any) -> int:
    """Number of samples in a (nested dict/list/tuple of tensors) batch: the first dim of its first tensor
    with one (a 0-dim tensor is a per-batch value, e.g. a token count a collate computed)."""
    if isinstance(batch, Tensor):
        if batch.dim() == 0:
            raise TypeError("batch: a 0-dim tensor has no samples dim")
        return batch.shape[0]
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else []
    for v in values:
        try:
            return batch_size(v)
        except TypeError:
            continue
    raise TypeError(f"batch: no tensor with a samples dim found in a {type(batch).__name__}")


def _per_sample_values(batch: Any) -> bool:
    """A list/tuple of plain values, one per sample (``default_collate``'s list of strings)."""
    return isinstance(batch, (list, tuple)) and len(batch) > 0 and not hasattr(batch, "_fields") and all(
        not isinstance(v, (Tensor, Mapping, list, tuple)) for v in batch
    )


def _slice(batch: Any, start: int, stop: int, n: int) -> Any:
    """Samples ``start:stop`` of a batch of ``n``: tensors and per-sample value lists sliced, 0-dim tensors
    and other leaves (per-batch values) passed on whole."""
    if isinstance(batch, Tensor):
        return batch[start:stop] if batch.dim() else batch
    if isinstance(batch, Mapping):
        return _same_mapping(batch, {k: _slice(v, start, stop, n) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_slice(v, start, stop, n) for v in batch))
    if _per_sample_values(batch):  # (as _empty_like_batch reads them): each micro-batch gets its own values
        if (start, stop) == (0, n):  # not split (one micro-batch): passed on whole, whatever its length
            return batch
        if len(batch) != n:
            raise ValueError(
                f"batch: a list of {len(batch)} plain values in a batch of {n} samples: expected one value per "
                "sample (or put per-batch values in a 0-dim tensor)"
            )
        return type(batch)(batch[start:stop])
    if isinstance(batch, (list, tuple)) and batch and all(_per_sample_values(v) for v in batch):
        # lists of plain values: one per sample (a custom collate: [tags of sample 0, tags of sample 1, ...])
        # or one per field, each with a value per sample (default_collate's transposed [(a0, a1), (b0, b1)])
        per_sample, per_field = len(batch) == n, all(len(v) == n for v in batch)
        if (start, stop) == (0, n):  # the whole batch (one micro-batch): both readings give it unchanged
            return batch
        if per_sample != per_field:
            if per_sample:
                return type(batch)(batch[start:stop])
            return type(batch)(_slice(v, start, stop, n) for v in batch)
        if per_sample:
            raise ValueError(
                f"batch: a list of {n} lists of {n} plain values in a batch of {n} samples, split into micro-batches: "
                "cannot tell whether the samples run along the outer or the inner lists; use tensors"
            )
        raise ValueError(
            f"batch: a list of {len(batch)} lists of plain values (of {sorted({len(v) for v in batch})} values) in a "
            f"batch of {n} samples: neither one list per sample nor one value per sample in each list"
        )
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice(v, start, stop, n) for v in batch)
    return batch


def micro_batches(batch: Any, max_size: int) -> Iterator[Any]:
    """Split a logical batch into physical micro-batches of at most ``max_size`` samples (along dim 0).

    For large logical batches under DP: run forward/backward and ``DPSGD.accumulate()`` on each, then one
    ``DPSGD.step()``. An empty batch yields nothing (step it with ``step(empty_batch=True)``).

    Tensors are split along dim 0; a list of plain values (``default_collate``'s strings) is read as one value
    per sample and split with them (when the batch is split, it must have one per sample); a list of such
    lists, as one list per sample or (``default_collate``'s transposed layout) one per field, whichever
    length fits n (a list that fits both ways is refused when split); 0-dim tensors and other leaves go whole
    to every micro-batch (per-batch values: keep them out of the per-sample lists). An unsplit batch (one
    micro-batch) passes every list on whole.
    """
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size <= 0:
        raise ValueError(f"max_size: expected a positive int, got {max_size!r}")
    n = batch_size(batch)
    for start in range(0, n, max_size):
        yield _slice(batch, start, min(n, start + max_size), n)

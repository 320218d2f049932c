"""Poisson sampling, the scheme the accountants assume: each example joins a step independently with prob. q.

Batches have variable size and may be empty (the DP step still runs, with noise only).
"""

from __future__ import annotations

from typing import Iterator

import torch

from fedlora_fast.privacy.accounting import check_sample_rate


class PoissonSampler(torch.utils.data.Sampler):
    """Yields ``steps`` index batches; each index is included independently with probability ``sample_rate``.

    Use as ``DataLoader(ds, batch_sampler=PoissonSampler(...))``. Empty batches are yielded as empty lists.

    Args:
        num_examples: dataset size N.
        sample_rate: q in (0, 1]; the expected batch size is q N.
        steps: batches per pass (default ``round(1 / q)``: one expected epoch).
        generator: a CPU generator; None draws a seed from the OS.
    """

    def __init__(self, num_examples: int, sample_rate: float, steps: int | None = None, generator: torch.Generator | None = None):
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples <= 0:
            raise ValueError(f"num_examples: expected a positive int, got {num_examples!r}")
        self.num_examples = num_examples
        self.sample_rate = check_sample_rate(sample_rate)
        self.steps = int(round(1 / self.sample_rate)) if steps is None else int(steps)
        if self.steps <= 0:
            raise ValueError(f"steps: expected a positive int, got {steps!r}")
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.seed()))
        self.generator = generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = torch.rand(self.num_examples, generator=self.generator) < self.sample_rate
            yield mask.nonzero().flatten().tolist()

"""The ``chacha20_normal`` op: standard normals from a ChaCha20 keystream, for DP noise on a GPU.

``chacha20_normal(state, n, device) -> (n,) float64`` on ``device``; the PyTorch reference
(``fedlora_fast.reference.chacha20``) documents the state and the transform. CUDA runs the Triton kernel
(``fedlora_fast.kernels.chacha20``); other devices, or CUDA without a usable Triton, run the reference, which is
exact there too (int64 tensor maths; ~1,000 elementwise launches). Not a ``torch.library`` op: its key comes from
the host at every call (``privacy.sampling.os_normal``), so there is nothing to trace or capture, and its state
is 12 host integers, checked here without reading anything back from a device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlora_fast.ops.backends import implementation
from fedlora_fast.reference.chacha20 import COUNTER_AT, MAX_BLOCKS, NORMALS_PER_BLOCK, STATE_WORDS


def chacha20_normal(state, n: int, device: torch.device | str = "cpu") -> Tensor:
    """(n,) float64 standard normals on ``device`` from the ChaCha20 keystream of ``state`` (12 ints in
    [0, 2^32): the key's eight words, the first block's counter, the nonce's three words)."""
    words = tuple(state) if isinstance(state, (tuple, list)) else None
    if words is None or len(words) != STATE_WORDS or any(
        isinstance(w, bool) or not isinstance(w, int) or not 0 <= w < 2**32 for w in words
    ):
        raise ValueError(f"state: expected {STATE_WORDS} ints in [0, 2^32) (key 8, counter 1, nonce 3), got {state!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    blocks = -(-n // NORMALS_PER_BLOCK)
    if words[COUNTER_AT] + blocks > MAX_BLOCKS:
        raise ValueError(
            f"n: {n} normals need {blocks} blocks from counter {words[COUNTER_AT]}, past the 32-bit counter's "
            f"{MAX_BLOCKS} (a keystream must not repeat): use another key or nonce for the rest"
        )
    device = torch.device(device)
    return implementation("chacha20_normal", device.type)(words, n, device)

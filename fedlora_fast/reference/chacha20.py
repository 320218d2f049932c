"""PyTorch reference of the ``chacha20_normal`` op: standard normals from a ChaCha20 keystream (RFC 8439).

DP noise must be unpredictable from everything released before it, noise included. A Mersenne Twister's output
is linear in its state and a release of noise alone determines it; Philox is not a cryptographic generator.
ChaCha20 is: a stream cipher whose keystream, under a secret 256-bit key, is computationally indistinguishable
from random (Bernstein 2008; RFC 8439, used by TLS and by Linux's ``getrandom``). ``privacy.sampling.os_normal``
draws a fresh key from ``os.urandom`` for every call on a GPU and runs this op there (the Triton kernel
``fedlora_fast.kernels.chacha20``; this reference elsewhere, and as the ground truth of tests and benchmarks).

The op, on any device:
    ``chacha20_normal(state, n, device) -> (n,) float64``
``state`` holds the ChaCha20 state's words 4..15 as 12 Python ints in [0, 2^32): the key's eight little-endian
words, the 32-bit block counter of the first block, the nonce's three words (host values: a kernel takes them
as launch arguments, with no copy to the device and nothing read back). Block ``b``
(counter ``state[8] + b``; it may not pass 2^32 - 1) gives 16 keystream words ``w``, read as eight
little-endian 64-bit values ``v_j = w[2j] + 2^32 w[2j+1]``. Each keeps its low 53 bits, a uniform
``u_j = (bits + 1/2) 2^-53`` in (0, 1] (never 0: the log is finite; 1 where ``bits + 1/2`` rounds up to 2^53),
and each pair ``(u_2p, u_2p+1)`` gives two normals by Box-Muller in float64: ``r cos(t), r sin(t)`` with
``r = sqrt(-2 ln u_2p)``, ``t = 2 pi u_2p+1``. Normal ``8b + j`` is block ``b``'s ``j``-th; the last block's
surplus is dropped. The same transform of 64-bit words to normals serves ``os_normal``'s CPU path, there over
``os.urandom``'s bytes (``normals_from_words``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# "expand 32-byte k", the state's words 0..3
CONSTANTS = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)
STATE_WORDS = 12  # the op's state: words 4..15 (key 8, counter 1, nonce 3)
COUNTER_AT = 8  # the block counter's place in the op's state
NORMALS_PER_BLOCK = 8  # 16 32-bit words: 8 uniforms of 53 bits, 4 Box-Muller pairs
MAX_BLOCKS = 1 << 32  # the 32-bit counter's range, for one (key, nonce)
_MASK32 = 0xFFFFFFFF
_MASK53 = (1 << 53) - 1
# one double round: four column quarter rounds, then four diagonal ones (RFC 8439, 2.3)
QUARTER_ROUNDS = ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
                  (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14))
DOUBLE_ROUNDS = 10


def _rotl(x: Tensor, n: int) -> Tensor:
    return ((x << n) | (x >> (32 - n))) & _MASK32


def chacha20_blocks(state: tuple[int, ...], blocks: int, device: torch.device | str = "cpu") -> Tensor:
    """(blocks, 16) int64 on ``device``: the keystream words (each in [0, 2^32)) of ``blocks`` consecutive blocks
    from the op's ``state`` (module docstring). Exact: int64 arithmetic masked to 32 bits."""
    counter = state[COUNTER_AT] + torch.arange(blocks, dtype=torch.int64, device=device)
    init = [torch.full((blocks,), w, dtype=torch.int64, device=device) for w in CONSTANTS + tuple(state)]
    init[4 + COUNTER_AT] = counter
    x = list(init)
    for _ in range(DOUBLE_ROUNDS):
        for a, b, c, d in QUARTER_ROUNDS:
            x[a] = (x[a] + x[b]) & _MASK32
            x[d] = _rotl(x[d] ^ x[a], 16)
            x[c] = (x[c] + x[d]) & _MASK32
            x[b] = _rotl(x[b] ^ x[c], 12)
            x[a] = (x[a] + x[b]) & _MASK32
            x[d] = _rotl(x[d] ^ x[a], 8)
            x[c] = (x[c] + x[d]) & _MASK32
            x[b] = _rotl(x[b] ^ x[c], 7)
    return torch.stack([(xi + ii) & _MASK32 for xi, ii in zip(x, init)], dim=1)


def normals_from_words(values: Tensor) -> Tensor:
    """(..., 2k) int64 of 64-bit values (any bits; the low 53 are used) -> (..., 2k) float64 standard normals:
    each consecutive pair by Box-Muller (module docstring)."""
    bits = values & _MASK53
    u = (bits.double() + 0.5) * 2.0**-53
    u = u.unflatten(-1, (-1, 2))
    r, theta = torch.sqrt(-2.0 * torch.log(u[..., 0])), (2 * math.pi) * u[..., 1]
    return torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=-1).flatten(-2)


def chacha20_normal(state: tuple[int, ...], n: int, device: torch.device | str = "cpu") -> Tensor:
    """(n,) float64 standard normals on ``device`` from the ChaCha20 keystream of ``state`` (module docstring).
    Arguments are checked by ``fedlora_fast.ops.chacha20``."""
    blocks = -(-n // NORMALS_PER_BLOCK)
    words = chacha20_blocks(state, blocks, device)
    values = words[:, 0::2] | (words[:, 1::2] << 32)  # little-endian 64-bit values (sign bit may be set)
    return normals_from_words(values).reshape(-1)[:n]

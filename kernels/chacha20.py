"""Triton kernel of the ``chacha20_normal`` op: standard normals from a ChaCha20 keystream (RFC 8439).

Computes exactly ``fedlora_fast.reference.chacha20`` (its docstring has the op and why DP noise needs a
cryptographic generator). One program lane per ChaCha20 block: the 16 state words live in registers as 16
vectors of ``BLOCK`` lanes, the 20 rounds are 32-bit adds, xors and rotations, and each lane writes its
block's eight normals (Box-Muller in float64 over 53-bit uniforms). Nothing is read (the 12 state words are
launch arguments): the op is ALU-bound, ~980 32-bit integer operations per block of eight normals (20 rounds of
four quarter rounds of 12) and a float64 log, sqrt, cos and sin per pair, against 8 bytes written per normal.
Bit-identical keystream to the reference (integer maths); the normals agree to float64 rounding of
``log``/``cos``/``sin`` (libdevice on a GPU, numpy under the interpreter). Devices other than CUDA (CPU only
under ``TRITON_INTERPRET=1``) are handed to the reference.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from fedlora_fast.ops import backends
from fedlora_fast.reference import chacha20 as _ref

BLOCK = 128  # ChaCha20 blocks (lanes) per program: 1,024 normals
# Tests set this to a function ``(shape, dtype, device) -> Tensor`` (NaN-filled, say) so that an element the kernel
# fails to write shows up.
alloc_hook: Callable[[tuple, torch.dtype, torch.device], Tensor] | None = None


@triton.jit
def _rotl(x, n: tl.constexpr):
    return (x << n) | (x >> (32 - n))


@triton.jit
def _quarter(a, b, c, d):
    a = a + b
    d = _rotl(d ^ a, 16)
    c = c + d
    b = _rotl(b ^ c, 12)
    a = a + b
    d = _rotl(d ^ a, 8)
    c = c + d
    b = _rotl(b ^ c, 7)
    return a, b, c, d


@triton.jit
def _box_muller(out_ptr, idx, n, lo0, hi0, lo1, hi1):
    """Normals ``idx`` and ``idx + 1`` from two 64-bit values (each as its low and high 32-bit words)."""
    two32: tl.constexpr = 4294967296.0
    u0 = (lo0.to(tl.float64) + (hi0 & 0x1FFFFF).to(tl.float64) * two32 + 0.5) * 1.1102230246251565e-16  # 2^-53
    u1 = (lo1.to(tl.float64) + (hi1 & 0x1FFFFF).to(tl.float64) * two32 + 0.5) * 1.1102230246251565e-16
    r = tl.sqrt(-2.0 * tl.log(u0))
    theta = 6.283185307179586 * u1
    tl.store(out_ptr + idx, r * tl.cos(theta), mask=idx < n)
    tl.store(out_ptr + idx + 1, r * tl.sin(theta), mask=idx + 1 < n)


_WORDS = ("k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "ctr0", "n0", "n1", "n2")


@triton.jit(do_not_specialize=_WORDS)
def _chacha20_normal_kernel(out_ptr, n, k0, k1, k2, k3, k4, k5, k6, k7, ctr0, n0, n1, n2, BLOCK: tl.constexpr):
    """The state's words 4..15 arrive as int32 bit patterns (one signature whatever their values: no compile per
    key, nothing copied to the device); each is reinterpreted as uint32."""
    lane = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (int64: 2^32 blocks pass int32's range)
    zero = tl.zeros([BLOCK], dtype=tl.uint32)
    k0 = zero + k0.to(tl.uint32, bitcast=True)
    k1 = zero + k1.to(tl.uint32, bitcast=True)
    k2 = zero + k2.to(tl.uint32, bitcast=True)
    k3 = zero + k3.to(tl.uint32, bitcast=True)
    k4 = zero + k4.to(tl.uint32, bitcast=True)
    k5 = zero + k5.to(tl.uint32, bitcast=True)
    k6 = zero + k6.to(tl.uint32, bitcast=True)
    k7 = zero + k7.to(tl.uint32, bitcast=True)
    ctr = ctr0.to(tl.uint32, bitcast=True) + lane.to(tl.uint32)  # (the op keeps the used lanes below 2^32)
    n0 = zero + n0.to(tl.uint32, bitcast=True)
    n1 = zero + n1.to(tl.uint32, bitcast=True)
    n2 = zero + n2.to(tl.uint32, bitcast=True)
    c0 = zero + 0x61707865
    c1 = zero + 0x3320646E
    c2 = zero + 0x79622D32
    c3 = zero + 0x6B206574
    x0, x1, x2, x3, x4, x5, x6, x7 = c0, c1, c2, c3, k0, k1, k2, k3
    x8, x9, x10, x11, x12, x13, x14, x15 = k4, k5, k6, k7, ctr, n0, n1, n2
    for _ in range(10):  # double rounds: columns, then diagonals
        x0, x4, x8, x12 = _quarter(x0, x4, x8, x12)
        x1, x5, x9, x13 = _quarter(x1, x5, x9, x13)
        x2, x6, x10, x14 = _quarter(x2, x6, x10, x14)
        x3, x7, x11, x15 = _quarter(x3, x7, x11, x15)
        x0, x5, x10, x15 = _quarter(x0, x5, x10, x15)
        x1, x6, x11, x12 = _quarter(x1, x6, x11, x12)
        x2, x7, x8, x13 = _quarter(x2, x7, x8, x13)
        x3, x4, x9, x14 = _quarter(x3, x4, x9, x14)
    base = lane * 8
    _box_muller(out_ptr, base, n, x0 + c0, x1 + c1, x2 + c2, x3 + c3)
    _box_muller(out_ptr, base + 2, n, x4 + k0, x5 + k1, x6 + k2, x7 + k3)
    _box_muller(out_ptr, base + 4, n, x8 + k4, x9 + k5, x10 + k6, x11 + k7)
    _box_muller(out_ptr, base + 6, n, x12 + ctr, x13 + n0, x14 + n1, x15 + n2)


def _int32(w: int) -> int:
    return w - (1 << 32) if w >= 1 << 31 else w


def chacha20_normal(state: tuple[int, ...], n: int, device: torch.device | str = "cpu") -> Tensor:
    """(n,) float64 standard normals on ``device`` from the ChaCha20 keystream of ``state``
    (``fedlora_fast.reference.chacha20``; arguments checked by ``fedlora_fast.ops.chacha20``)."""
    device = torch.device(device)
    if n == 0 or (device.type != "cuda" and not backends.triton_interprets()):
        return _ref.chacha20_normal(state, n, device)
    if alloc_hook is not None:
        out = alloc_hook((n,), torch.float64, device)
    else:
        out = torch.empty(n, dtype=torch.float64, device=device)
    blocks = -(-n // _ref.NORMALS_PER_BLOCK)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _chacha20_normal_kernel[(triton.cdiv(blocks, BLOCK),)](out, n, *map(_int32, state), BLOCK=BLOCK)
    return out

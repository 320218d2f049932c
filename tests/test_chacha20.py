"""The chacha20_normal op: ChaCha20 (RFC 8439) keystream normals, DP noise on a GPU.

The reference against the RFC's test vectors and an independent implementation (``cryptography``); the Triton
kernel against the reference (poisoned outputs, odd sizes, the counter's last block) under the interpreter and
natively on CUDA; the op's argument checks and dispatch; ``os_normal``'s GPU path (a fresh OS key per draw).
"""

import math
import os
import random
import struct
import subprocess
import sys

import pytest
import torch

from fedlora_fast.ops import backends
from fedlora_fast.ops.chacha20 import chacha20_normal
from fedlora_fast.privacy import sampling
from fedlora_fast.reference import chacha20 as ref

INTERPRETED = backends.triton_interprets()
DEVICES = [
    pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(not INTERPRETED, reason="CPU runs the kernel only "
                                                           "under TRITON_INTERPRET=1")),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                 reason="no CUDA device")]),
]


def _state(key: bytes, counter: int, nonce: bytes) -> tuple[int, ...]:
    return (*struct.unpack("<8I", key), counter, *struct.unpack("<3I", nonce))


def _keystream(state, blocks: int) -> bytes:
    words = ref.chacha20_blocks(state, blocks)
    return b"".join(struct.pack("<16I", *map(int, row)) for row in words)


def test_reference_keystream_matches_the_rfc_8439_test_vectors():
    # RFC 8439 2.3.2 (key 00..1f, nonce 00:00:00:09:00:00:00:4a:00:00:00:00, counter 1) and A.1 #1 (all zero)
    rfc_232 = _state(bytes(range(32)), 1, bytes.fromhex("000000090000004a00000000"))
    assert _keystream(rfc_232, 1).hex() == (
        "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
        "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e")
    assert _keystream(_state(bytes(32), 0, bytes(12)), 1).hex() == (
        "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
        "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586")


def test_reference_keystream_matches_an_independent_chacha20():
    ciphers = pytest.importorskip("cryptography.hazmat.primitives.ciphers", reason="cryptography is not installed")
    rng = random.Random(7)
    for counter in (0, 1, 2**31 - 1, 2**32 - 5):
        key, nonce = rng.randbytes(32), rng.randbytes(12)
        enc = ciphers.Cipher(ciphers.algorithms.ChaCha20(key, struct.pack("<I", counter) + nonce), mode=None)
        expected = enc.encryptor().update(bytes(64 * 5))
        assert _keystream(_state(key, counter, nonce), 5) == expected, counter
        # the normals are the keystream's 64-bit little-endian values through normals_from_words
        values = torch.frombuffer(bytearray(expected), dtype=torch.int64)
        z = ref.chacha20_normal(_state(key, counter, nonce), 37)
        assert torch.equal(z, ref.normals_from_words(values)[:37])


def test_normals_from_words_is_box_muller_over_53_bit_uniforms():
    top = (1 << 64) - 1
    cases = [(0, 0), (top, top), (0x123456789ABCDEF0, 0x0FEDCBA987654321), (1 << 52, (1 << 53) - 1)]
    values = torch.tensor([v - (1 << 64) if v >= 1 << 63 else v for pair in cases for v in pair], dtype=torch.int64)
    z = ref.normals_from_words(values)
    for i, (a, b) in enumerate(cases):
        u0 = ((a & ((1 << 53) - 1)) + 0.5) / 2**53
        u1 = ((b & ((1 << 53) - 1)) + 0.5) / 2**53
        r = math.sqrt(-2 * math.log(u0))
        assert z[2 * i].item() == pytest.approx(r * math.cos(2 * math.pi * u1), rel=1e-15, abs=1e-15)
        assert z[2 * i + 1].item() == pytest.approx(r * math.sin(2 * math.pi * u1), rel=1e-15, abs=1e-15)
    assert torch.isfinite(z).all() and z[:2].abs().max() > 8  # (the smallest uniform: r = 8.57, finite)


def test_reference_normals_are_standard_normal():
    z = ref.chacha20_normal(tuple(random.Random(3).getrandbits(32) for _ in range(12)), 400_003)
    assert z.dtype == torch.float64 and z.shape == (400_003,)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert abs(float((z**4).mean()) - 3) < 0.06 and abs(float((z > 1.96).double().mean()) - 0.025) < 0.002
    pairs = z[: 400_000].view(-1, 2)  # the cos and sin halves of a pair are uncorrelated
    assert abs(float((pairs[:, 0] * pairs[:, 1]).mean())) < 0.01


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1023, 1025, 2 * 1024 + 13])
def test_kernel_matches_the_reference(device, n, monkeypatch):
    """Poisoned output; the integer keystream is exact, so the normals agree to float64 rounding of log and
    cos/sin. The state's counter puts the last block at 2^32 - 1 (the wrapper's limit): the lanes past it in
    the last program wrap, masked."""
    from fedlora_fast.kernels import chacha20 as K

    calls = []
    monkeypatch.setattr(K, "alloc_hook", lambda shape, dtype, dev: calls.append(shape) or
                        torch.full(shape, float("nan"), dtype=dtype, device=dev))
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    rng = random.Random(n)
    state = [rng.getrandbits(32) for _ in range(12)]
    state[ref.COUNTER_AT] = 2**32 - -(-n // ref.NORMALS_PER_BLOCK)
    got = chacha20_normal(tuple(state), n, device)
    assert calls == [(n,)], "the kernel did not run"
    expected = ref.chacha20_normal(tuple(state), n)
    assert got.device.type == device and got.dtype == torch.float64 and got.shape == (n,)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-13, atol=1e-13)
    state[ref.COUNTER_AT] = rng.getrandbits(31)  # an ordinary counter and key: the same again
    torch.testing.assert_close(chacha20_normal(tuple(state), n, device).cpu(), ref.chacha20_normal(tuple(state), n),
                               rtol=1e-13, atol=1e-13)


def test_op_checks_its_arguments():
    good = (0,) * 12
    for bad in [(0,) * 11, (0,) * 13, (2**32,) + (0,) * 11, (-1,) + (0,) * 11, (True,) + (0,) * 11,
                (0.0,) + (0,) * 11, torch.zeros(12, dtype=torch.int64), "key"]:
        with pytest.raises(ValueError, match=r"state: expected 12 ints in \[0, 2\^32\)"):
            chacha20_normal(bad, 4)
    for bad in [-1, 1.0, True, None]:
        with pytest.raises(ValueError, match=r"n: expected an int >= 0"):
            chacha20_normal(good, bad)
    last = (0,) * 8 + (2**32 - 1,) + (0,) * 3  # one block left before the counter would wrap
    assert chacha20_normal(last, 8).shape == (8,)
    with pytest.raises(ValueError, match=r"n: 9 normals need 2 blocks from counter 4294967295, past the 32-bit"):
        chacha20_normal(last, 9)
    assert chacha20_normal(good, 0).shape == (0,)


def test_op_dispatch_runs_the_reference_on_a_cpu_by_default(monkeypatch):
    """The native backend leaves the op out: a CPU runs the reference (os_normal's CPU path reads os.urandom
    directly and does not use the op)."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.implementation("chacha20_normal", "cpu") is ref.chacha20_normal
    if INTERPRETED:
        from fedlora_fast.kernels import chacha20 as K

        monkeypatch.setenv(backends.ENV_VAR, "triton")
        assert backends.implementation("chacha20_normal", "cpu") is K.chacha20_normal


def test_os_normal_on_cuda_draws_chacha20_under_a_fresh_os_key_per_call(monkeypatch):
    """The GPU path's wiring, checked on any machine: every call takes 32 new bytes from os.urandom as the key
    (counter and nonce 0) and runs the op on the device asked for."""
    calls, keys = [], []
    real_urandom = os.urandom

    def urandom(k):
        keys.append(real_urandom(k))
        return keys[-1]

    monkeypatch.setattr(sampling.os, "urandom", urandom)
    monkeypatch.setattr(sampling, "chacha20_normal",
                        lambda state, n, device: calls.append((state, n, device)) or ref.chacha20_normal(state, n))
    a = sampling.os_normal((3, 5), dtype=torch.float64, device="cuda")
    b = sampling.os_normal((3, 5), device=torch.device("cuda"))
    assert [len(k) for k in keys] == [32, 32] and keys[0] != keys[1]
    assert [c[0] for c in calls] == [(*struct.unpack("<8I", k), 0, 0, 0, 0) for k in keys]
    assert [(n, torch.device(d).type) for _, n, d in calls] == [(15, "cuda"), (15, "cuda")]
    assert a.shape == b.shape == (3, 5) and a.dtype == torch.float64 and b.dtype == torch.float32
    assert torch.equal(a.view(-1), ref.chacha20_normal(calls[0][0], 15))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_os_normal_on_cuda_is_standard_normal_and_never_repeats():
    z = sampling.os_normal((1_000_001,), dtype=torch.float64, device="cuda")
    assert z.device.type == "cuda" and torch.isfinite(z).all()
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert abs(float((z**4).mean()) - 3) < 0.05 and abs(float((z > 1.96).double().mean()) - 0.025) < 0.002
    assert not torch.equal(sampling.os_normal((8,), device="cuda"), sampling.os_normal((8,), device="cuda"))


_AOT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fedlora_fast.kernels.chacha20 as K
fn = K._chacha20_normal_kernel
sig = {name: "constexpr" if name == "BLOCK" else "*fp64" if name == "out_ptr" else "i32" for name in fn.arg_names}
for cap in (80, 90):
    k = triton.compile(ASTSource(fn, sig, constexprs={"BLOCK": K.BLOCK}), target=GPUTarget("cuda", cap, 32),
                       options={"num_warps": 4})
    print(f"sm{cap}", k.metadata.shared)
"""


def test_kernel_compiles_ahead_of_time():
    """The launch compiles for Ampere and Hopper (float64 log/cos/sin from libdevice, uint32 rotations), so a
    CPU-only CI sees what would otherwise fail only at the first noise draw on a GPU."""
    pytest.importorskip("triton.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "No module named" in proc.stderr and "triton.backends" in proc.stderr:
        pytest.skip(f"this triton build cannot compile ahead of time: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["sm80", "0", "sm90", "0"]


def test_os_normal_refuses_a_cuda_graph_capture(monkeypatch):
    """A capture would keep one draw's key in the graph's launch arguments: every replay the same noise (a
    Philox generator advanced its offset per replay; a reviewer's suspicion, 2026-11-28). Refused, checked here
    with the capture state faked."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=r"os_normal: called during a CUDA graph capture"):
        sampling.os_normal((4,), device="cuda")
    assert sampling.os_normal((4,)).shape == (4,)  # (a CPU draw is never captured)

"""meshpipe's C kernels against torch on random inputs: block products, attention, RMS norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.blocks import tiled
from worker.cpu_kernels import LANES, NativeKernels, load
from worker.model import apply_rotary

pytestmark = pytest.mark.skipif(load() is None, reason="the C kernels need x86 with AVX-512")
ROWS = [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 40]


@pytest.fixture(scope="module")
def native() -> NativeKernels:
    kernels = load()
    assert kernels is not None
    return kernels


def test_q4_1_product_equals_the_dequantized_weight(native: NativeKernels) -> None:
    torch.manual_seed(0)
    n, k = 16 * 11, 32 * 7  # 11 tiles: whole panels and a remainder for every row count
    qs = torch.randint(0, 256, (n, k // 32, 16), dtype=torch.uint8)
    d, m = (torch.rand(n, k // 32) * 0.02).half(), (-torch.rand(n, k // 32) * 0.1).half()
    values = torch.cat([qs & 15, qs >> 4], dim=2).float()  # elements 0-15, then 16-31
    weight = (values * d.float()[..., None] + m.float()[..., None]).reshape(n, k)
    fields = [tiled(field, LANES) for field in (qs, d, m)]
    check_product(native.product("q4_1", fields), weight)


def test_q8_0_product_equals_the_dequantized_weight(native: NativeKernels) -> None:
    torch.manual_seed(1)
    n, k = 16 * 9, 32 * 5
    qs = torch.randint(-128, 128, (n, k // 32, 32), dtype=torch.int8)
    d = (torch.rand(n, k // 32) * 0.02).half()
    weight = (qs.float() * d.float()[..., None]).reshape(n, k)
    fields = [tiled(field, LANES) for field in (qs, d)]
    check_product(native.product("q8_0", fields), weight)


def check_product(product, weight: torch.Tensor) -> None:
    x = torch.randn(max(ROWS), weight.shape[1])
    for rows in ROWS:
        y = product(x[:rows].contiguous())
        expected = (x[:rows].double() @ weight.double().T).float()
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
        # each row alone gives the same bits: a sequence's result does not depend on its batch
        for row in (0, rows - 1):
            assert torch.equal(product(x[row : row + 1].contiguous())[0], y[row])


def test_decode_attention_writes_the_cache_and_attends_like_sdpa(native: NativeKernels) -> None:
    torch.manual_seed(2)
    batch, heads, kv_heads, dim, slots, capacity = 5, 9, 3, 64, 6, 400
    k_cache = torch.randn(slots, kv_heads, capacity, dim)
    v_cache = torch.randn(slots, kv_heads, capacity, dim)
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim)
    positions = torch.tensor([0, 1, 15, 16, 333])  # around the 16-key blocks, and a long one
    slot_of = torch.tensor([0, 2, 3, 1, 5])
    angles = torch.rand(batch, dim // 2) * 3
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    keys, values = k_cache.clone(), v_cache.clone()
    out = native.decode_attention(qkv, cos, sin, slot_of, positions, (k_cache, v_cache), heads)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    q = apply_rotary(q.view(batch, heads, dim), cos, sin)
    keys[slot_of, :, positions] = apply_rotary(k.view(batch, kv_heads, dim), cos, sin)
    values[slot_of, :, positions] = v.reshape(batch, kv_heads, dim)
    torch.testing.assert_close(k_cache, keys, rtol=1e-6, atol=1e-6)
    assert torch.equal(v_cache, values)
    for b in range(batch):
        slot, length = int(slot_of[b]), int(positions[b]) + 1
        expected = F.scaled_dot_product_attention(
            q[b : b + 1].unsqueeze(2),
            keys[slot : slot + 1, :, :length],
            values[slot : slot + 1, :, :length],
            enable_gqa=True,
        )
        torch.testing.assert_close(out[b], expected.reshape(-1), rtol=1e-5, atol=1e-5)


def test_rms_norm_equals_torch(native: NativeKernels) -> None:
    torch.manual_seed(3)
    x, weight = torch.randn(7, 576) * 3, torch.randn(576)
    expected = F.rms_norm(x, (576,), weight, eps=1e-5)
    torch.testing.assert_close(native.rms_norm(x, weight, 1e-5), expected, rtol=1e-5, atol=1e-5)

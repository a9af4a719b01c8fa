"""A decode step's attention inputs made the plain way, for the attention kernels' tests (on a
GPU in tests/test_gpu.py, in Triton's interpreter in tests/worker/test_triton_kernels.py):
worker.model's rotary embedding, and the new keys and values written into the caches."""

from __future__ import annotations

import torch
from torch import Tensor

from worker.model import apply_rotary, rotary_tables


def rotary_at(positions: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
    """cos and sin `[B, hd]` of each row's position, at Llama 3's rope theta (500000)."""
    arange = torch.arange(0, head_dim, 2, device=positions.device)
    return rotary_tables(positions, 1.0 / 500000 ** (arange / head_dim))


def rotate_and_write(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    rows: Tensor,
    positions: Tensor,
    heads: int,
) -> Tensor:
    """q of `qkv` rotated, `[B, H, hd]`; its new keys, rotated, and values are written at
    (rows[b], positions[b]) of the caches `[slots, kvh, L, hd]`."""
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    k_cache[rows, :, positions] = apply_rotary(k.reshape(-1, kv_heads, head_dim), cos, sin)
    v_cache[rows, :, positions] = v.reshape(-1, kv_heads, head_dim)
    return apply_rotary(q.reshape(-1, heads, head_dim), cos, sin)

"""Decode attention that reads each sequence's keys and values where they lie in the KV cache.

A decode step attends one new token of each of B sequences to its own slot's cached prefix.
Gathering those prefixes into a `[B, kv_heads, L, head_dim]` tensor first (index_select) reads
the cache, writes a copy and reads the copy again: at batch 64 on the H200 the gather took 0.54
ms and the attention 0.42 ms of a 3.7 ms 16-layer step. This Triton kernel takes the slot of
each row and reads its keys and values in place, once.

Flash-decoding: the context is cut into `SPLITS` parts, so that a single stream still spreads
over many streaming multiprocessors. Program (row, kv head, split) attends the query heads of
one KV head group (grouped-query attention reads each key once for the whole group) over its
part with an online softmax, and writes its partial output and log-sum-exp; a second kernel
combines the parts (in torch ops, Inductor made the combination two kernels, 2.8-4.8 us a
layer on the H200; this one takes 1.6 us). Wrapped as a torch custom op, so `torch.compile` and
CUDA graphs take it like any other kernel.

CUDA only, where Triton is installed (it comes with CUDA builds of torch), from compute
capability 8.0 (A100 and later); `available()` says so. `MESHPIPE_DECODE_ATTENTION=gathered` in
a worker's environment turns it off (for measuring one against the other: `bench.gpu` passes
its environment on). fp32 inputs are multiplied in full precision (no TF32), so the fp32 GPU
parity tests hold.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None
if not hasattr(torch.library, "triton_op"):  # torch before 2.6
    triton = None

BLOCK_N = 64  # keys per loop iteration
SPLITS = 8  # parts of the context, each a program per (row, kv head)


def available(device: torch.device, head_dim: int) -> bool:
    """Whether the kernel serves a stage on `device` with heads of `head_dim`."""
    power_of_two = head_dim >= 16 and head_dim & (head_dim - 1) == 0
    wanted = os.environ.get("MESHPIPE_DECODE_ATTENTION", "in-place") != "gathered"
    if triton is None or device.type != "cuda" or not (power_of_two and wanted):
        return False
    # measured on sm90 only; bf16 tensor-core dots need sm80, older GPUs keep the gathered path
    return torch.cuda.get_device_capability(device) >= (8, 0)


if triton is not None:

    @triton.jit
    def _attend_split(
        q_ptr,
        k_ptr,
        v_ptr,
        slots_ptr,
        lengths_ptr,
        out_ptr,
        lse_ptr,
        stride_qb,
        stride_qh,
        stride_ks,
        stride_kh,
        stride_kn,
        split_size,
        SCALE: tl.constexpr,  # a constant: a float argument would come from Inductor as fp64
        HEADS: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK: tl.constexpr,
        SPLIT_COUNT: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        slot = tl.load(slots_ptr + row)
        length = tl.load(lengths_ptr + row)
        start = split * split_size
        end = tl.minimum(start + split_size, length)

        group = tl.arange(0, BLOCK_G)
        dims = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + group
        in_group = group < GROUP
        q_offsets = row * stride_qb + heads[:, None] * stride_qh + dims[None, :]
        q = tl.load(q_ptr + q_offsets, mask=in_group[:, None], other=0.0)

        best = tl.full([BLOCK_G], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
        base = slot * stride_ks + kv_head * stride_kh
        for first in range(start, end, BLOCK):
            keys = first + tl.arange(0, BLOCK)
            valid = keys < end
            offsets = base + keys[:, None] * stride_kn + dims[None, :]
            k = tl.load(k_ptr + offsets, mask=valid[:, None], other=0.0)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(valid[None, :], scores * SCALE, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, 1))
            rescale = tl.exp(best - new_best)
            weights = tl.exp(scores - new_best[:, None])
            total = total * rescale + tl.sum(weights, 1)
            v = tl.load(v_ptr + offsets, mask=valid[:, None], other=0.0)
            if IEEE:
                part = tl.dot(weights.to(v.dtype), v, input_precision="ieee")
            else:
                part = tl.dot(weights.to(v.dtype), v)
            acc = acc * rescale[:, None] + part
            best = new_best

        # a split past the sequence's end attended nothing: weight 0 in the combination
        seen = total > 0
        out = tl.where(seen[:, None], acc / tl.where(seen, total, 1.0)[:, None], 0.0)
        lse = tl.where(seen, best + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
        # partial outputs [B, SPLITS, H, D] and log-sum-exps [B, SPLITS, H], in fp32
        at = (row * SPLIT_COUNT + split) * HEADS + heads
        tl.store(out_ptr + at[:, None] * HEAD_DIM + dims[None, :], out, mask=in_group[:, None])
        tl.store(lse_ptr + at, lse, mask=in_group)

    @triton.jit
    def _combine_splits(
        partial_ptr,
        lse_ptr,
        out_ptr,
        HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        SPLIT_COUNT: tl.constexpr,
    ):
        row = tl.program_id(0)
        head = tl.program_id(1)
        at = (row * SPLIT_COUNT + tl.arange(0, SPLIT_COUNT)) * HEADS + head
        lse = tl.load(lse_ptr + at)
        weights = tl.exp(lse - tl.max(lse, 0))  # a split that attended nothing weighs 0
        weights = weights / tl.sum(weights, 0)
        dims = tl.arange(0, HEAD_DIM)
        part = tl.load(partial_ptr + at[:, None] * HEAD_DIM + dims[None, :])
        out = tl.sum(part * weights[:, None], 0)
        out_at = out_ptr + (row * HEADS + head) * HEAD_DIM + dims
        tl.store(out_at, out.to(out_ptr.dtype.element_ty))

    @torch.library.triton_op("meshpipe::decode_attention", mutates_args=())
    def _attend(
        q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, lengths: Tensor, context: int
    ) -> Tensor:
        rows, heads, head_dim = q.shape
        kv_heads = k_cache.shape[1]
        group = heads // kv_heads
        partial = q.new_empty((rows, SPLITS, heads, head_dim), dtype=torch.float32)
        lse = q.new_empty((rows, SPLITS, heads), dtype=torch.float32)
        split_size = -(-context // (SPLITS * BLOCK_N)) * BLOCK_N
        torch.library.wrap_triton(_attend_split)[(rows, kv_heads, SPLITS)](
            q,
            k_cache,
            v_cache,
            slots,
            lengths,
            partial,
            lse,
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            split_size,
            SCALE=head_dim**-0.5,
            HEADS=heads,
            GROUP=group,
            BLOCK_G=max(16, triton.next_power_of_2(group)),
            HEAD_DIM=head_dim,
            BLOCK=BLOCK_N,
            SPLIT_COUNT=SPLITS,
            IEEE=q.dtype == torch.float32,
        )
        out = torch.empty_like(q)
        torch.library.wrap_triton(_combine_splits)[(rows, heads)](
            partial, lse, out, HEADS=heads, HEAD_DIM=head_dim, SPLIT_COUNT=SPLITS
        )
        return out


def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, lengths: Tensor, context: int
) -> Tensor:
    """Attention of one query token per row: `q` `[B, H, hd]`, caches `[slots, kvh, L, hd]`
    (contiguous in their last dimension), row b attending positions [0, lengths[b]) of slot
    slots[b]; `context` bounds the lengths. Returns `[B, H, hd]` in q's dtype."""
    return _attend(q.contiguous(), k_cache, v_cache, slots, lengths, context)

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

A decode step (`decode_step_attention`) goes one further: its kernel reads the qkv
projection's output, rotates q and the new key itself, attends the cached keys before the new
token's position, and adds the new key and value from registers, writing them to the cache as
it goes. Inductor had made the rotary embedding and the cache writes three kernels a layer of
their own (4.6 us together on the H200 at batch 1, and three gaps between kernels).

CUDA only, where Triton is installed (it comes with CUDA builds of torch), from compute
capability 8.0 (A100 and later); `available()` and `fused()` say so.
`MESHPIPE_DECODE_ATTENTION` in a worker's environment chooses for measuring one against the
other (`bench.gpu` passes its environment on): `fused` (the default), `in-place` (the rotary
embedding and cache writes in torch ops, then the in-place kernel) or `gathered` (neither
kernel). fp32 inputs are multiplied in full precision (no TF32), so the fp32 GPU parity tests
hold.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from worker.triton_import import tl, triton

BLOCK_N = 64  # keys per loop iteration
SPLITS = 8  # parts of the context, each a program per (row, kv head)
# Warps a program of the attention kernels: Triton's default, as measured so far. ptxas spills
# registers there (255 and a 528-592 byte stack a thread for Llama 3 8B's heads on sm_90),
# and not at 8 (docs/gpu.md, session 10), yet 8 was no faster in the pipeline on the H200 (4,694
# against 4,926 tok/s at 64 streams, session 11). MESHPIPE_ATTENTION_WARPS=8 is for A/B runs.
WARPS = int(os.environ.get("MESHPIPE_ATTENTION_WARPS", "4"))
# passed to the launches only when it differs: the launches measured so far left it to Triton
# (a launch option under torch.compile turns the kernel into a one-config autotuner)
LAUNCH = {} if WARPS == 4 else {"num_warps": WARPS}


def _mode() -> str:
    return os.environ.get("MESHPIPE_DECODE_ATTENTION", "fused")


def available(device: torch.device, head_dim: int) -> bool:
    """Whether the in-place kernel serves a stage on `device` with heads of `head_dim`."""
    power_of_two = head_dim >= 16 and head_dim & (head_dim - 1) == 0
    wanted = _mode() != "gathered"
    if triton is None or device.type != "cuda" or not (power_of_two and wanted):
        return False
    # measured on sm90 only; bf16 tensor-core dots need sm80, older GPUs keep the gathered path
    return torch.cuda.get_device_capability(device) >= (8, 0)


def fused(device: torch.device, head_dim: int) -> bool:
    """Whether decode steps rotate, write the cache and attend in one kernel."""
    return available(device, head_dim) and _mode() == "fused"


def rotary_kernel() -> bool:
    """Whether a fused decode step's cos and sin come from `rotary_tables`' kernel
    (`MESHPIPE_ROTARY=inline` leaves them to Inductor, for measuring one against the other)."""
    return os.environ.get("MESHPIPE_ROTARY", "kernel") != "inline"


if triton is not None:

    @triton.jit
    def _attend_keys(
        q,
        k_ptr,
        v_ptr,
        start,
        end,
        stride_kn,
        SCALE: tl.constexpr,
        BLOCK_G: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """An online softmax of q's heads `[BLOCK_G, HEAD_DIM]` over the cached keys and values
        at positions [start, end) (pointers to position 0 of one slot's KV head): the scores'
        running maximum, the weights' sum and the weighted values."""
        dims = tl.arange(0, HEAD_DIM)
        best = tl.full([BLOCK_G], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
        for first in range(start, end, BLOCK):
            keys = first + tl.arange(0, BLOCK)
            valid = keys < end
            offsets = keys[:, None] * stride_kn + dims[None, :]
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
        return best, total, acc

    @triton.jit
    def _store_part(out_ptr, lse_ptr, at, in_group, best, total, acc, HEAD_DIM: tl.constexpr):
        """A split's partial output and log-sum-exp at rows `at` of `[B * SPLITS * H, ...]`, in
        fp32 (a split past the sequence's end attended nothing: weight 0 in the combination)."""
        dims = tl.arange(0, HEAD_DIM)
        seen = total > 0
        out = tl.where(seen[:, None], acc / tl.where(seen, total, 1.0)[:, None], 0.0)
        lse = tl.where(seen, best + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
        tl.store(out_ptr + at[:, None] * HEAD_DIM + dims[None, :], out, mask=in_group[:, None])
        tl.store(lse_ptr + at, lse, mask=in_group)

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

        base = slot * stride_ks + kv_head * stride_kh
        best, total, acc = _attend_keys(
            q,
            k_ptr + base,
            v_ptr + base,
            start,
            end,
            stride_kn,
            SCALE,
            BLOCK_G,
            HEAD_DIM,
            BLOCK,
            IEEE,
        )

        at = (row * SPLIT_COUNT + split) * HEADS + heads
        _store_part(out_ptr, lse_ptr, at, in_group, best, total, acc, HEAD_DIM)

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

    @triton.jit
    def _rotate(x, partner_sign, cos, sin):
        """The half-split rotary embedding of x (fp32), as worker.model.apply_rotary."""
        return x * cos + partner_sign * sin

    @triton.jit
    def _attend_new_split(
        qkv_ptr,
        cos_ptr,
        sin_ptr,
        k_ptr,
        v_ptr,
        slots_ptr,
        positions_ptr,
        out_ptr,
        lse_ptr,
        stride_qkv,
        stride_cos,
        stride_ks,
        stride_kh,
        stride_kn,
        split_size,
        SCALE: tl.constexpr,
        HEADS: tl.constexpr,
        KV_HEADS: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK: tl.constexpr,
        SPLIT_COUNT: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """_attend_split for a step's new token, from the qkv projection's output: rotates q
        and the new key, attends the cached keys before the token's position, and the split
        that holds that position adds the new key and value from registers and writes them to
        the cache (no program reads that position, so the write races with nothing)."""
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        slot = tl.load(slots_ptr + row)
        position = tl.load(positions_ptr + row)
        start = split * split_size
        end = tl.minimum(start + split_size, position)
        owns = (position >= start) & (position < start + split_size)

        group = tl.arange(0, BLOCK_G)
        dims = tl.arange(0, HEAD_DIM)
        half: tl.constexpr = HEAD_DIM // 2
        partner = (dims + half) % HEAD_DIM  # rotate_half: (-x2, x1)
        sign = tl.where(dims < half, -1.0, 1.0)
        cos = tl.load(cos_ptr + row * stride_cos + dims)
        sin = tl.load(sin_ptr + row * stride_cos + dims)
        dtype = k_ptr.dtype.element_ty

        heads = kv_head * GROUP + group
        in_group = group < GROUP
        q_at = qkv_ptr + row * stride_qkv + heads[:, None] * HEAD_DIM
        q = tl.load(q_at + dims[None, :], mask=in_group[:, None], other=0.0).to(tl.float32)
        q_partner = tl.load(q_at + partner[None, :], mask=in_group[:, None], other=0.0)
        q = _rotate(q, sign[None, :] * q_partner.to(tl.float32), cos[None, :], sin[None, :])
        q = q.to(dtype)
        k_at = qkv_ptr + row * stride_qkv + (HEADS + kv_head) * HEAD_DIM
        k_new = tl.load(k_at + dims).to(tl.float32)
        k_partner = tl.load(k_at + partner).to(tl.float32)
        k_new = _rotate(k_new, sign * k_partner, cos, sin).to(dtype)
        v_new = tl.load(qkv_ptr + row * stride_qkv + (HEADS + KV_HEADS + kv_head) * HEAD_DIM + dims)

        base = slot * stride_ks + kv_head * stride_kh
        best, total, acc = _attend_keys(
            q,
            k_ptr + base,
            v_ptr + base,
            start,
            end,
            stride_kn,
            SCALE,
            BLOCK_G,
            HEAD_DIM,
            BLOCK,
            IEEE,
        )

        # the new key, in the split that holds its position
        score = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * SCALE
        new_best = tl.where(owns, tl.maximum(best, score), best)
        rescale = tl.where(owns, tl.exp(best - new_best), 1.0)
        weight = tl.where(owns, tl.exp(score - new_best), 0.0)
        total = total * rescale + weight
        acc = acc * rescale[:, None] + weight[:, None] * v_new.to(tl.float32)[None, :]
        best = new_best
        new_at = base + position * stride_kn + dims
        written = (dims < HEAD_DIM) & (dims * 0 + owns.to(tl.int32) > 0)  # owns, per element
        tl.store(k_ptr + new_at, k_new, mask=written)
        tl.store(v_ptr + new_at, v_new, mask=written)

        at = (row * SPLIT_COUNT + split) * HEADS + heads
        _store_part(out_ptr, lse_ptr, at, in_group, best, total, acc, HEAD_DIM)

    @torch.library.triton_op("meshpipe::decode_attention", mutates_args=())
    def _attend(
        q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, lengths: Tensor, context: int
    ) -> Tensor:
        rows, heads, head_dim = q.shape
        partial, lse, constants = _parts(rows, heads, k_cache, q.dtype)
        torch.library.wrap_triton(_attend_split)[(rows, k_cache.shape[1], SPLITS)](
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
            _split_size(context),
            **constants,
            **LAUNCH,
        )
        return _combined(partial, lse, q.new_empty(q.shape))

    @triton.jit
    def _rotary_kernel(positions_ptr, inv_freq_ptr, cos_ptr, sin_ptr, HALF: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        dims = tl.arange(0, 2 * HALF)
        position = tl.load(positions_ptr + row).to(tl.float32)
        angles = position * tl.load(inv_freq_ptr + dims % HALF)  # the half-split layout
        tl.store(cos_ptr + row * 2 * HALF + dims, tl.cos(angles))
        tl.store(sin_ptr + row * 2 * HALF + dims, tl.sin(angles))

    @torch.library.triton_op("meshpipe::rotary_tables", mutates_args=())
    def _rotary(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
        rows, half = positions.shape[0], inv_freq.shape[0]
        cos = inv_freq.new_empty((rows, 2 * half))
        sin = inv_freq.new_empty((rows, 2 * half))
        torch.library.wrap_triton(_rotary_kernel)[(rows,)](positions, inv_freq, cos, sin, HALF=half)
        return cos, sin

    @torch.library.triton_op("meshpipe::decode_step_attention", mutates_args={"k_cache", "v_cache"})
    def _attend_new(
        qkv: Tensor,
        cos: Tensor,
        sin: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        slots: Tensor,
        positions: Tensor,
        context: int,
        heads: int,
    ) -> Tensor:
        rows, (kv_heads, head_dim) = qkv.shape[0], k_cache.shape[1::2]
        partial, lse, constants = _parts(rows, heads, k_cache, qkv.dtype)
        torch.library.wrap_triton(_attend_new_split)[(rows, kv_heads, SPLITS)](
            qkv,
            cos,
            sin,
            k_cache,
            v_cache,
            slots,
            positions,
            partial,
            lse,
            qkv.stride(0),
            cos.stride(0),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            _split_size(context),
            KV_HEADS=kv_heads,
            **constants,
            **LAUNCH,
        )
        return _combined(partial, lse, qkv.new_empty((rows, heads, head_dim)))

    def _parts(
        rows: int, heads: int, k_cache: Tensor, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor, dict]:
        """The splits' partial outputs and log-sum-exps (fp32), and the kernels' constants."""
        head_dim = k_cache.shape[3]
        group = heads // k_cache.shape[1]
        partial = k_cache.new_empty((rows, SPLITS, heads, head_dim), dtype=torch.float32)
        lse = k_cache.new_empty((rows, SPLITS, heads), dtype=torch.float32)
        constants = {
            "SCALE": head_dim**-0.5,
            "HEADS": heads,
            "GROUP": group,
            "BLOCK_G": max(16, triton.next_power_of_2(group)),
            "HEAD_DIM": head_dim,
            "BLOCK": BLOCK_N,
            "SPLIT_COUNT": SPLITS,
            "IEEE": dtype == torch.float32,
        }
        return partial, lse, constants

    def _split_size(context: int) -> int:
        """Keys a split attends: a multiple of the block, SPLITS of them covering `context`."""
        return -(-context // (SPLITS * BLOCK_N)) * BLOCK_N

    def _combined(partial: Tensor, lse: Tensor, out: Tensor) -> Tensor:
        """The splits' parts weighed by their log-sum-exps, into `out` `[B, H, hd]`."""
        rows, heads, head_dim = out.shape
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


def rotary_tables(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin `[T, hd]` (fp32) of the rotary angles at `positions` `[T]`, as
    worker/model.py's `rotary_tables` computes them, in a kernel of their own. In a compiled
    decode step Inductor had computed them inside every layer's qkv product (one kernel, so
    one launch less, but the product's reduction ran 2-3 us slower on the H200)."""
    return _rotary(positions.contiguous(), inv_freq.float().contiguous())


def decode_step_attention(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slots: Tensor,
    positions: Tensor,
    context: int,
    heads: int,
) -> Tensor:
    """A decode step's attention from the qkv projection's output `[B, (H + 2 kvh) hd]`: q and
    the new key rotated by `cos`, `sin` `[B, hd]` (fp32), the new key and value written at
    (slots[b], positions[b]), row b attending positions [0, positions[b]]. What
    apply_rotary, KVCache.update and decode_attention do in three steps, in one kernel."""
    cos, sin = cos.contiguous(), sin.contiguous()
    return _attend_new(
        qkv.contiguous(), cos, sin, k_cache, v_cache, slots, positions, context, heads
    )

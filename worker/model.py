"""One pipeline stage of a Llama-family decoder: layers [start, end) and their KV cache.

In the spirit of gpt-fast: plain modules named after the checkpoint, a KV cache allocated once
and updated in place. A step takes a packed batch: the tokens of several sequences laid end to
end (`[T]` ids on the first stage, `[T, D]` hidden states after it), each sequence a run of
consecutive positions in its own KV slot.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn
from torch.nn.attention.varlen import varlen_attn

from meshpipe.models.config import ModelConfig
from worker import decode_attention, gemv, rms_norm, silu_mul
from worker.cpu_kernels import NativeKernels


@dataclass(frozen=True)
class Span:
    """A run of `length` tokens of one sequence, at positions [start, start + length)."""

    slot: int
    start: int
    length: int


@dataclass(frozen=True)
class StagePlan:
    """Which part of the model a stage holds, and how its KV cache is sized."""

    layer_start: int
    layer_end: int
    num_layers: int
    num_slots: int
    max_seq_len: int

    @property
    def is_first(self) -> bool:
        return self.layer_start == 0

    @property
    def is_last(self) -> bool:
        return self.layer_end == self.num_layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.native: NativeKernels | None = None  # CPU float32: in C (torch's takes ~40 us)
        self.kernel = False  # CUDA: worker/rms_norm.py's kernel, each normed row written once

    def forward(self, x: Tensor) -> Tensor:
        if self.native is not None:
            return self.native.rms_norm(x, self.weight, self.eps)
        if self.kernel:
            return rms_norm.rms_norm(x, self.weight, self.eps)
        # in float32 whatever the dtype, as Hugging Face's
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class KVCache(nn.Module):
    """Keys and values of one layer for every slot: `[slots, kv_heads, max_seq_len, head_dim]`."""

    def __init__(self, shape: tuple[int, int, int, int], dtype, device) -> None:
        super().__init__()
        cache = {"dtype": dtype, "device": device}
        self.register_buffer("k_cache", torch.zeros(shape, **cache), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, **cache), persistent=False)

    def update(self, slots: Tensor, positions: Tensor, k: Tensor, v: Tensor) -> None:
        """Write `k`, `v` `[T, kv_heads, head_dim]` at (slot, position) of each token."""
        self.k_cache[slots, :, positions] = k
        self.v_cache[slots, :, positions] = v


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        bias = config.attention_bias
        # q, k and v in one product (one read of x, one kernel); loaded by concatenating rows
        self.qkv_proj = nn.Linear(config.hidden_size, (heads + 2 * kv_heads) * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, config.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None
        # CPU float32: a decode step's rotation, cache writes and attention in one C call
        self.native: NativeKernels | None = None

    def forward(self, x: Tensor, step: StepInputs) -> Tensor:
        return self.o_proj(self.attend(self.qkv_proj(x), step))

    def attend(self, qkv: Tensor, step: StepInputs) -> Tensor:
        """Attention of each token's q, k and v `[T, (H + 2 kvh) hd]` (writing k and v to the
        cache): `[T, H hd]`, before the output projection."""
        tokens = qkv.shape[0]
        config = self.config
        heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        if step.all_decode and self.native is not None:
            assert self.kv_cache is not None
            caches = (self.kv_cache.k_cache, self.kv_cache.v_cache)
            return self.native.decode_attention(
                qkv, step.cos, step.sin, step.slots, step.positions, caches, heads
            )
        if step.all_decode and step.fused:  # CUDA: the rotation and cache writes in-kernel
            assert self.kv_cache is not None
            caches = (self.kv_cache.k_cache, self.kv_cache.v_cache)
            where = (step.slots, step.positions, step.decode_context)
            out = decode_attention.decode_step_attention(
                qkv, step.cos, step.sin, *caches, *where, heads
            )
            return out.view(tokens, -1)
        sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        q, k, v = qkv.split(sizes, dim=-1)
        q = q.reshape(tokens, heads, head_dim)
        k = k.reshape(tokens, kv_heads, head_dim)
        v = v.reshape(tokens, kv_heads, head_dim)
        q, k = apply_rotary(q, step.cos, step.sin), apply_rotary(k, step.cos, step.sin)
        assert self.kv_cache is not None
        self.kv_cache.update(step.slots, step.positions, k, v)
        if step.all_decode:  # the common case, and the one captured in CUDA graphs
            return self._decode(q, step).reshape(tokens, -1)
        if step.packed is not None:  # CUDA, 16-bit: every span of the step in one call
            return self._packed(q, step.packed).reshape(tokens, -1)
        out = torch.empty_like(q)  # [T, H, hd]
        if step.decode_rows is not None:
            out[step.decode_rows] = self._decode(q[step.decode_rows], step)
        for span, rows in step.prefill:
            out[rows] = self._prefill(q[rows], span)
        return out.view(tokens, -1)

    def _decode(self, q: Tensor, step: StepInputs) -> Tensor:
        """One new token for each of B sequences, attended in one batched call."""
        assert self.kv_cache is not None and step.decode_slots is not None
        if step.decode_lengths is not None:  # CUDA: each slot's keys read in place
            caches = (self.kv_cache.k_cache, self.kv_cache.v_cache)
            lengths = (step.decode_slots, step.decode_lengths, step.decode_context)
            return decode_attention.decode_attention(q, *caches, *lengths)
        assert step.decode_mask is not None
        length = step.decode_mask.shape[-1]
        # index_select, not advanced indexing: its copy runs 5-6x faster on CPU and on CUDA
        keys = self.kv_cache.k_cache[:, :, :length].index_select(0, step.decode_slots)
        values = self.kv_cache.v_cache[:, :, :length].index_select(0, step.decode_slots)
        # keys, values: [B, kvh, L, hd]
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=step.decode_mask, enable_gqa=True
        )  # [B, H, 1, hd]
        return out.squeeze(2)

    def _packed(self, q: Tensor, packed: PackedSpans) -> Tensor:
        """Every span of a step (prompt chunks and decode tokens) in one variable-length
        flash-attention call, each attending to its cached prefix and itself."""
        assert self.kv_cache is not None
        keys = self.kv_cache.k_cache[packed.key_slots, :, packed.key_positions]  # [Tk, kvh, hd]
        values = self.kv_cache.v_cache[packed.key_slots, :, packed.key_positions]
        if not VARLEN_GQA:  # older torch: the wrapper takes as many KV heads as query heads
            group = self.config.num_heads // self.config.num_kv_heads
            keys = keys.repeat_interleave(group, dim=1)
            values = values.repeat_interleave(group, dim=1)
        # flash attention aligns a causal mask bottom-right: a span's queries are the last
        # positions of its keys, which is what a chunk continuing a cached prefix needs
        lengths = (q, keys, values, packed.cu_q, packed.cu_k, packed.max_q, packed.max_k)
        return varlen_attn(*lengths, **VARLEN_CAUSAL)  # [T, H, hd]

    def _prefill(self, q: Tensor, span: Span) -> Tensor:
        """A chunk of one sequence's prompt, attending to its cached prefix and itself."""
        assert self.kv_cache is not None
        end = span.start + span.length
        keys = self.kv_cache.k_cache[span.slot, :, :end].unsqueeze(0)  # [1, kvh, end, hd]
        values = self.kv_cache.v_cache[span.slot, :, :end].unsqueeze(0)
        query = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, hd]
        mask = None
        if span.length > 1:
            rows = torch.arange(span.start, end, device=q.device).unsqueeze(1)
            mask = torch.arange(end, device=q.device).unsqueeze(0) <= rows  # [n, end]
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True)
        return out.squeeze(0).transpose(0, 1)  # [n, H, hd]


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        ffn = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * ffn, bias=False)  # gate rows, then up
        self.down_proj = nn.Linear(ffn, config.hidden_size, bias=False)
        self.activation_kernel = False  # silu(gate) * up by worker/silu_mul.py (CUDA)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.activation(self.gate_up_proj(x)))

    def activation(self, gate_up: Tensor) -> Tensor:
        """silu(gate) * up."""
        if self.activation_kernel:
            return silu_mul.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = FeedForward(config)
        self.row_products = False  # CUDA: a one-row step's products by worker/gemv.py

    def forward(self, x: Tensor, step: StepInputs) -> Tensor:
        if self.row_products and x.shape[0] == 1:
            return self._one_row(x, step)
        h = x + self.self_attn(self.input_layernorm(x), step)
        return h + self.mlp(self.post_attention_layernorm(h))

    def _one_row(self, x: Tensor, step: StepInputs) -> Tensor:
        """The layer on one token: four products, each with the norm before it or the
        residual's add after it in the same kernel."""
        attention, mlp = self.self_attn, self.mlp
        first, second = self.input_layernorm, self.post_attention_layernorm
        qkv_proj = attention.qkv_proj
        qkv = gemv.gemv(x, qkv_proj.weight, norm=first.weight, eps=first.eps, bias=qkv_proj.bias)
        h = gemv.gemv(attention.attend(qkv, step), attention.o_proj.weight, residual=x)
        gate_up = gemv.gemv(h, mlp.gate_up_proj.weight, norm=second.weight, eps=second.eps)
        return gemv.gemv(mlp.activation(gate_up), mlp.down_proj.weight, residual=h)


def rope_frequencies(config: ModelConfig) -> Tensor:
    """Inverse frequencies of the rotary embedding, with Llama 3 scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        inv_freq = _llama3_scaling(inv_freq, scaling)
    return inv_freq.float()


def _llama3_scaling(inv_freq: Tensor, scaling: dict) -> Tensor:
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    smooth = (old_context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
    middle = (wavelength >= old_context / high) & (wavelength <= old_context / low)
    return torch.where(middle, smoothed, scaled)


def rotary_tables(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin `[T, hd]` of the rotary angles at `positions` `[T]` (half-split layout)."""
    angles = positions.float().unsqueeze(1) * inv_freq.unsqueeze(0)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x` `[T, heads, hd]` by the angles of each token (half-split layout, as in HF)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)).to(x.dtype)


def _varlen_keywords() -> tuple[dict, bool]:
    """How this torch's `varlen_attn` asks for a causal mask, and whether it takes fewer KV
    heads than query heads (`enable_gqa`, torch 2.13; 2.11 has `is_causal` and neither)."""
    parameters = inspect.signature(varlen_attn).parameters
    gqa = "enable_gqa" in parameters
    if "window_size" in parameters:
        return {"window_size": (-1, 0), **({"enable_gqa": True} if gqa else {})}, gqa
    return {"is_causal": True}, gqa


VARLEN_CAUSAL, VARLEN_GQA = _varlen_keywords()


@dataclass(frozen=True)
class PackedSpans:
    """The spans of a step laid end to end for one flash-attention call: the (slot, position)
    of every key each span attends to (its cached prefix and itself), and the cumulative query
    and key lengths. On a GPU this replaces a loop of a dozen small kernels per prompt chunk
    and layer, which made a step of 64 short prompts take hundreds of milliseconds."""

    key_slots: Tensor  # [Tk]
    key_positions: Tensor  # [Tk]
    cu_q: Tensor  # [spans + 1] int32
    cu_k: Tensor  # [spans + 1] int32
    max_q: int
    max_k: int

    @classmethod
    def of(cls, spans: list[Span], device: torch.device) -> PackedSpans:
        slots = np.array([span.slot for span in spans], dtype=np.int64)
        lengths = np.array([span.length for span in spans], dtype=np.int64)
        ends = np.array([span.start + span.length for span in spans], dtype=np.int64)
        cu_q = np.concatenate(([0], np.cumsum(lengths)))
        cu_k = np.concatenate(([0], np.cumsum(ends)))
        key_slots = np.repeat(slots, ends)
        key_positions = np.arange(cu_k[-1]) - np.repeat(cu_k[:-1], ends)
        keys = torch.from_numpy(np.stack((key_slots, key_positions)))
        keys = keys.pin_memory().to(device, non_blocking=True)
        offsets = torch.from_numpy(np.stack((cu_q, cu_k)).astype(np.int32))
        offsets = offsets.pin_memory().to(device, non_blocking=True)
        return cls(keys[0], keys[1], offsets[0], offsets[1], int(lengths.max()), int(ends.max()))


@dataclass
class StepInputs:
    """What every layer of one step needs, computed once per step."""

    slots: Tensor  # [T] KV slot of each token
    positions: Tensor  # [T] position of each token
    cos: Tensor  # [T, hd]
    sin: Tensor  # [T, hd]
    decode_rows: Tensor | None  # rows of single-token sequences
    decode_slots: Tensor | None  # [B]
    decode_mask: Tensor | None  # [B, 1, 1, L] True where a key may be attended
    prefill: list[tuple[Span, slice]]  # multi-token spans and their rows
    all_decode: bool = False  # every span is one token: no prefill, rows == decode rows
    packed: PackedSpans | None = None  # every span for one varlen call (CUDA, 16-bit)
    decode_lengths: Tensor | None = None  # [B] keys each decode row attends (in place, CUDA)
    decode_context: int = 0  # bounds decode_lengths
    fused: bool = False  # rotary, cache writes and attention in one kernel (decode, CUDA)


class Stage(nn.Module):
    """Layers [start, end) of the model; the embedding on the first stage, the head on the last."""

    def __init__(self, config: ModelConfig, plan: StagePlan) -> None:
        super().__init__()
        self.config, self.plan = config, plan
        self.packed_attention = False  # set by allocate_cache
        self.in_place_attention = False  # decode steps read the cache in place (CUDA)
        self.fused_decode = False  # and rotate and write it in the same kernel
        self.rotary_kernel = False  # with their cos and sin from a kernel of their own (CUDA)
        self.row_products = False  # a one-row step's products by worker/gemv.py (CUDA)
        if plan.is_first:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config) for _ in range(plan.layer_start, plan.layer_end)
        )
        if plan.is_last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)

    def reset_rope(self) -> None:
        """Recompute the rotary frequencies (after building on the meta device), in fp32."""
        device = self.layers[0].input_layernorm.weight.device if self.layers else "cpu"
        self.inv_freq = rope_frequencies(self.config).to(device)

    def allocate_cache(self, dtype: torch.dtype, extra_slots: int = 0) -> None:
        """Allocate the KV cache once, for every slot and the whole context (plus scratch slots
        that padded rows of CUDA-graph batches write to)."""
        config, plan = self.config, self.plan
        shape = (
            plan.num_slots + extra_slots,
            config.num_kv_heads,
            plan.max_seq_len,
            config.head_dim,
        )
        device = self.inv_freq.device
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(shape, dtype, device)
        # Flash attention's variable-length kernel: CUDA from sm80, 16-bit only (fp32 keeps the
        # per-chunk loop, as the CPU does, where the chunks' compute outweighs their launches).
        self.packed_attention = (
            device.type == "cuda"
            and dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(device) >= (8, 0)
        )
        self.in_place_attention = decode_attention.available(device, config.head_dim)
        self.fused_decode = decode_attention.fused(device, config.head_dim)
        self.rotary_kernel = decode_attention.rotary_kernel()
        self.row_products = gemv.available(device)
        for layer in self.layers:
            layer.mlp.activation_kernel = silu_mul.available(device)
            layer.row_products = self.row_products
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.kernel = rms_norm.available(device)

    def use_native_kernels(self, native: NativeKernels) -> None:
        """RMS norms and decode steps' attention in meshpipe's C kernels (CPU, float32)."""
        assert self.inv_freq.device.type == "cpu"
        for module in self.modules():
            if isinstance(module, RMSNorm | Attention):
                module.native = native

    def rotary(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin `[T, hd]` of each token's position."""
        return rotary_tables(positions, self.inv_freq)

    def decode_inputs(self, slots: Tensor, positions: Tensor, length: int) -> StepInputs:
        """Inputs of a step where every sequence adds one token; tensor ops only (no host
        synchronisation), so CUDA graphs can capture it. `length` bounds the positions."""
        if self.fused_decode and self.rotary_kernel:
            cos, sin = decode_attention.rotary_tables(positions, self.inv_freq)
        else:
            cos, sin = self.rotary(positions)
        if self.in_place_attention:
            step = StepInputs(slots, positions, cos, sin, None, slots, None, [], all_decode=True)
            step.decode_lengths, step.decode_context = positions + 1, length
            step.fused = self.fused_decode
            return step
        keys = torch.arange(length, device=positions.device)
        mask = (keys.unsqueeze(0) <= positions.unsqueeze(1))[:, None, None, :]
        return StepInputs(slots, positions, cos, sin, None, slots, mask, [], all_decode=True)

    def step_inputs(self, spans: list[Span]) -> StepInputs:
        """Inputs of a mixed step, built on the host from the span list, then copied once."""
        device = self.inv_freq.device
        slots = [span.slot for span in spans for _ in range(span.length)]
        positions = [p for span in spans for p in range(span.start, span.start + span.length)]
        decode = [(row, span) for row, span in _rows(spans) if span.length == 1]
        table = torch.tensor([slots, positions], dtype=torch.long).to(device, non_blocking=True)
        if len(decode) == len(spans):
            return self.decode_inputs(table[0], table[1], max(positions) + 1)
        cos, sin = self.rotary(table[1])
        if self.packed_attention:
            packed = PackedSpans.of(spans, device)
            return StepInputs(
                table[0], table[1], cos, sin, None, None, None, prefill=[], packed=packed
            )
        prefill = [
            (span, slice(row, row + span.length)) for row, span in _rows(spans) if span.length > 1
        ]
        step = StepInputs(table[0], table[1], cos, sin, None, None, None, prefill)
        if decode:
            lists = [
                [r for r, _ in decode],
                [s.slot for _, s in decode],
                [s.start for _, s in decode],
            ]
            rows, decode_slots, ends = torch.tensor(lists).to(device, non_blocking=True)
            keys = torch.arange(max(lists[2]) + 1, device=device)
            step.decode_rows, step.decode_slots = rows, decode_slots
            step.decode_mask = (keys.unsqueeze(0) <= ends.unsqueeze(1))[:, None, None, :]
        return step

    @torch.inference_mode()
    def forward(self, inputs: Tensor, spans: list[Span], sample_rows: list[int]) -> Tensor:
        """Run the stage: hidden states `[T, D]` out, or on the last stage the logits
        `[len(sample_rows), V]` of the chosen rows."""
        rows = torch.tensor(sample_rows, dtype=torch.long).to(inputs.device, non_blocking=True)
        return self.run(inputs, self.step_inputs(spans), rows)

    def run(self, inputs: Tensor, step: StepInputs, sample_rows: Tensor | None) -> Tensor:
        """The layers over prepared step inputs (all rows sampled when `sample_rows` is None)."""
        x = self.embed_tokens(inputs) if self.plan.is_first else inputs
        for layer in self.layers:
            x = layer(x, step)
        if not self.plan.is_last:
            return x
        if sample_rows is not None:
            x = x[sample_rows]
        if self.row_products and x.shape[0] == 1:
            norm = self.norm
            return gemv.gemv(x, self.lm_head.weight, norm=norm.weight, eps=norm.eps, fp32_out=True)
        return self.lm_head(self.norm(x)).float()

    @torch.no_grad()
    def load(self, model_dir: Path) -> None:
        """Read only this stage's tensors from the model's safetensors files, each copied into
        its rows of the allocated parameter at once: peak memory is the weights plus one tensor."""
        where: dict[str, tuple[Path, list[int]]] = {}  # checkpoint name -> file, shape
        for path in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as file:
                for name in file.keys():  # noqa: SIM118 - safe_open is not a dict
                    where.setdefault(name, (path, file.get_slice(name).get_shape()))
        parameters = self.state_dict(keep_vars=True)
        copies: dict[Path, list[tuple[str, Tensor]]] = {}
        for own, names in self.checkpoint_parts().items():
            missing = [name for name in names if name not in where]
            if missing:
                raise ValueError(f"{model_dir} lacks tensors: {missing[:4]}")
            row = 0
            for name in names:
                path, shape = where[name]
                copies.setdefault(path, []).append((name, parameters[own][row : row + shape[0]]))
                row += shape[0]
            if row != parameters[own].shape[0]:
                raise ValueError(f"{model_dir}: {names} do not make {own}'s shape")
        device = str(self.inv_freq.device)
        for path, targets in copies.items():
            with safe_open(str(path), framework="pt", device=device) as file:
                for name, target in targets:
                    tensor = file.get_tensor(name)
                    if tensor.shape != target.shape:
                        raise ValueError(f"{model_dir}: {name} is {list(tensor.shape)}")
                    target.copy_(tensor)

    def checkpoint_parts(self) -> dict[str, list[str]]:
        """This stage's parameter name -> the checkpoint tensors it is made of, rows in order
        (fused projections are several; the tied head is the embedding)."""
        parts: dict[str, list[str]] = {}
        for own in self.state_dict():
            if own.startswith("layers."):
                index, rest = own.split(".", 2)[1:]
                prefix = f"model.layers.{int(index) + self.plan.layer_start}."
                parts[own] = [prefix + name for name in _unfused(rest)]
            elif own == "lm_head.weight":
                tied = self.config.tie_word_embeddings
                parts[own] = ["model.embed_tokens.weight" if tied else own]
            else:
                parts[own] = [f"model.{own}"]
        return parts


FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def _unfused(name: str) -> list[str]:
    """A layer parameter's checkpoint names: `self_attn.qkv_proj.bias` -> the q, k, v biases."""
    module, _, kind = name.rpartition(".")
    return [f"{part}.{kind}" for part in FUSED[module]] if module in FUSED else [name]


def _rows(spans: list[Span]) -> list[tuple[int, Span]]:
    """Each span with the row of its first token in the packed batch."""
    rows, row = [], 0
    for span in spans:
        rows.append((row, span))
        row += span.length
    return rows

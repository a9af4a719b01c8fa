"""meshpipe's Triton kernels checked without a GPU: compiled for sm_90, and run in fp32 in
Triton's interpreter against torch.

The GPU tests (tests/test_gpu.py) run the kernels on a device, which CI has not. Here each one
is compiled to a cubin for an H100/H200 (Triton bundles ptxas), so a kernel that does not
compile fails in CI, and the decode step's kernels run in Triton's CPU interpreter against
torch's rotary embedding, cache writes and attention. fp32 only: the interpreter's bf16 does
not round as a GPU does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

COMPILED = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from worker import decode_attention, gemv, rms_norm, silu_mul

# Llama 3 8B's heads: 32 query heads over 8 KV heads of 128
HEADS = {"HEADS": 32, "GROUP": 4, "BLOCK_G": 16, "HEAD_DIM": 128, "SPLIT_COUNT": 8}
SPLIT = {"SCALE": 128**-0.5, "BLOCK": decode_attention.BLOCK_N, **HEADS}
STRIDES = ("stride_ks", "stride_kh", "stride_kn", "split_size")


def compiled(kernel, pointers, integers, constants, warps=4, floats=()):
    signature = pointers | dict.fromkeys(integers, "i64") | dict.fromkeys(floats, "fp32")
    signature |= dict.fromkeys(constants, "constexpr")
    # pointers and sizes divisible by 16, as Triton's launcher specialises them at run time
    aligned = [*pointers, *integers]
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = ASTSource(kernel, signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


count = 0
for dtype, ieee, warps in (("bf16", False, 4), ("fp32", True, 4), ("bf16", False, 8)):
    cache = {"k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "slots_ptr": "*i64"}
    parts = {"out_ptr": "*fp32", "lse_ptr": "*fp32"}
    kernels = [
        compiled(
            decode_attention._attend_split,
            {"q_ptr": f"*{dtype}", **cache, "lengths_ptr": "*i64", **parts},
            ("stride_qb", "stride_qh", *STRIDES),
            SPLIT | {"IEEE": ieee},
            warps,  # MESHPIPE_ATTENTION_WARPS
        ),
        compiled(
            decode_attention._attend_new_split,
            {"qkv_ptr": f"*{dtype}", "cos_ptr": "*fp32", "sin_ptr": "*fp32", **cache}
            | {"positions_ptr": "*i64", **parts},
            ("stride_qkv", "stride_cos", *STRIDES),
            SPLIT | {"KV_HEADS": 8, "IEEE": ieee},
            warps,
        ),
        compiled(
            decode_attention._combine_splits,
            {"partial_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": f"*{dtype}"},
            (),
            {"HEADS": 32, "HEAD_DIM": 128, "SPLIT_COUNT": 8},
        ),
        compiled(
            silu_mul._silu_mul_kernel,
            {"gate_up_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"},
            ("width",),
            {"BLOCK": silu_mul.BLOCK},
        ),
        compiled(
            rms_norm._rms_norm_kernel,
            {"x_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"},
            ("width",),
            {"BLOCK": rms_norm.block_for(4096)},
            floats=("eps",),
        ),
    ]
    # the one-row products as a decoder layer calls them (Llama 3 8B's), and the lm_head's
    products = (
        ((6144, 4096), dict(NORM=True, BIAS=True), dtype),  # qkv, with a bias as Qwen's has
        ((4096, 4096), dict(RESIDUAL=True), dtype),  # o
        ((28672, 4096), dict(NORM=True), dtype),  # gate/up
        ((4096, 14336), dict(RESIDUAL=True), dtype),  # down
        ((128256, 4096), dict(NORM=True), "fp32"),  # the lm_head's fp32 logits
    )
    for (rows, width), flags, out in products:
        block_n, block_k, launch_warps = gemv.launch_for(rows, width)
        flags = dict(NORM=False, BIAS=False, RESIDUAL=False) | flags
        operands = ("x_ptr", "weight_ptr", "norm_ptr", "bias_ptr", "residual_ptr")
        kernels.append(
            compiled(
                gemv._gemv_kernel,
                dict.fromkeys(operands, f"*{dtype}") | {"out_ptr": f"*{out}"},
                ("rows", "width"),
                flags | {"BLOCK_N": block_n, "BLOCK_K": block_k, "EVEN_K": True},
                launch_warps,
                floats=("eps",),
            )
        )
        assert "ld.global.v4" in kernels[-1].asm["ptx"]  # the weights read 16 bytes a load
    assert all(kernel.asm["cubin"] for kernel in kernels)  # ptxas's machine code for sm_90
    count += len(kernels)
rotary = compiled(
    decode_attention._rotary_kernel,
    {"positions_ptr": "*i64", "inv_freq_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32"},
    (),
    {"HALF": 64},
)
assert rotary.asm["cubin"]
count += 1
print(f"compiled: {count} kernels")
"""

INTERPRETED = """
import torch
from tests.decode_reference import rotary_at, rotate_and_write
from worker import decode_attention, gemv, model, rms_norm

generator = torch.Generator().manual_seed(0)
heads, kv_heads, head_dim, context = 6, 2, 32, 256
k_cache = torch.randn((5, kv_heads, 320, head_dim), generator=generator)
v_cache = torch.randn(k_cache.shape, generator=generator)
rows = torch.tensor([4, 0, 3, 1, 2])
positions = torch.tensor([0, 1, 63, 64, 255])  # block and split boundaries, the bound
qkv = torch.randn((5, (heads + 2 * kv_heads) * head_dim), generator=generator)
cos, sin = rotary_at(positions, head_dim)

ours_k, ours_v = k_cache.clone(), v_cache.clone()
ours = decode_attention.decode_step_attention(
    qkv, cos, sin, ours_k, ours_v, rows, positions, context, heads
)
q = rotate_and_write(qkv, cos, sin, k_cache, v_cache, rows, positions, heads)
in_place = decode_attention.decode_attention(q, k_cache, v_cache, rows, positions + 1, context)
keys = k_cache[:, :, :context].index_select(0, rows)
values = v_cache[:, :, :context].index_select(0, rows)
mask = (torch.arange(context) <= positions[:, None])[:, None, None, :]
theirs = torch.nn.functional.scaled_dot_product_attention(
    q.unsqueeze(2), keys, values, attn_mask=mask, enable_gqa=True
).squeeze(2)
for name, result in (("fused", ours), ("in-place", in_place)):
    error = ((result - theirs).norm() / theirs.norm()).item()
    assert error < 1e-5, (name, error)
torch.testing.assert_close(ours_k, k_cache)
assert torch.equal(ours_v, v_cache)

# the rotary tables: positions up to a long context's, Llama 3's frequencies
inv_freq = 1.0 / 500000.0 ** (torch.arange(0, 128, 2).float() / 128)
at = torch.tensor([0, 1, 255, 8191, 131071])
theirs = model.rotary_tables(at, inv_freq)
for ours, table in zip(decode_attention.rotary_tables(at, inv_freq), theirs):
    torch.testing.assert_close(ours, table)

# a power of two and a width the block masks; a scale where eps is a tenth of the mean square
for width, scale in ((4096, 3.0), (1000, 0.01)):
    x = torch.randn((3, width), generator=generator) * scale
    weight = torch.randn(width, generator=generator)
    theirs = weight * torch.nn.functional.rms_norm(x, (width,), eps=1e-5)
    torch.testing.assert_close(rms_norm.rms_norm(x, weight, 1e-5), theirs)

# the one-row products: norm and bias, the residual; block sizes that
# mask rows and columns, and launch_for's
close = dict(rtol=1e-4, atol=1e-4)
for rows, width, launch in ((64, 64, None), (38, 100, (4, 32, 4)), (512, 2048, None)):
    x = torch.randn((1, width), generator=generator)
    weight = torch.randn((rows, width), generator=generator) * width**-0.5
    norm, bias = torch.randn(width, generator=generator), torch.randn(rows, generator=generator)
    residual = torch.randn((1, rows), generator=generator)
    normed = norm * torch.nn.functional.rms_norm(x, (width,), eps=1e-5)
    cases = (
        (dict(norm=norm, bias=bias), normed @ weight.T + bias),
        (dict(residual=residual), x @ weight.T + residual),
    )
    for keywords, theirs in cases:
        if launch is None:
            ours = gemv.gemv(x, weight, eps=1e-5, **keywords)
        else:
            ours = torch.empty_like(theirs)
            operands = [keywords.get(k) for k in ("norm", "bias", "residual")]
            gemv.launch(x, weight, *operands, 1e-5, ours, *launch)
        torch.testing.assert_close(ours, theirs, **close)
print("interpreted: equal")
"""


def run_with_triton(script: str, **environment: str) -> str:
    """`script` in a Python of its own, which imports Triton on this CPU build of torch
    (worker/triton_import.py); its output."""
    environment = os.environ | {"MESHPIPE_TRITON": "1"} | environment
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=Path(__file__).parents[2],  # the repository: `tests` and `worker` import from it
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_kernel_compiles_for_sm90() -> None:
    """The decode attention's three kernels, the activation's, the RMS norm's and the one-row
    products' (each of a decoder layer's, with its norm, add or activation, and the lm_head's,
    their weights read with 16-byte loads), bf16 and fp32 (and bf16 at 8 warps a program), and
    the rotary tables', compiled to machine code for an H100/H200 (Llama 3 8B's shapes)."""
    assert "compiled: 31 kernels" in run_with_triton(COMPILED)


def test_the_decode_kernels_equal_torch_in_the_interpreter() -> None:
    """The fused decode step and the in-place attention, fp32, against apply_rotary, the cache
    writes and scaled_dot_product_attention, the rotary tables, the RMS norm and the one-row
    products against worker/model.py's and torch's (the interpreter
    is chosen when the kernels are defined, so it has a process of its own too)."""
    assert "interpreted: equal" in run_with_triton(INTERPRETED, TRITON_INTERPRET="1")

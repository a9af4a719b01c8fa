"""SwiGLU's activation, silu(gate) * up, as a kernel of its own on CUDA.

At batch 1 TorchInductor turns each matrix product into a reduction (coordinate-descent tuning
decomposes an `mm` of one row) and inlines into it the elementwise work that feeds it. The down
projection's input, silu(gate) * up, is then computed again by every program of that reduction:
with Llama 3 8B's shapes each of 4096 output rows evaluates 14336 sigmoids. A custom op is a
boundary that Inductor does not inline across, so here the activation is computed once, written
(28 KB a row in bf16) and read by the down projection. On the H200 at batch 1 that projection
went from 40.7 us a layer (2.9 TB/s) to 27.9 us (4.2 TB/s), for 1.25 us of this kernel.

CUDA only, where Triton is installed; `available()` says so. `MESHPIPE_SILU_MUL=inline` in a
worker's environment turns it off (for measuring one against the other). The product is formed
in fp32 and rounded once, as Inductor's fused code does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from worker.triton_import import kernel_serves, tl, triton

BLOCK = 1024  # columns a program


def available(device: torch.device) -> bool:
    """Whether the kernel serves a stage on `device` (`MESHPIPE_SILU_MUL=inline` turns it off)."""
    return kernel_serves(device, "MESHPIPE_SILU_MUL")


if triton is not None:

    @triton.jit
    def _silu_mul_kernel(gate_up_ptr, out_ptr, width, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = columns < width
        gate_at = gate_up_ptr + row.to(tl.int64) * 2 * width + columns
        gate = tl.load(gate_at, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(gate_at + width, mask=inside, other=0.0).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        out_at = out_ptr + row.to(tl.int64) * width + columns
        tl.store(out_at, out.to(out_ptr.dtype.element_ty), mask=inside)

    @torch.library.triton_op("meshpipe::silu_mul", mutates_args=())
    def _silu_mul(gate_up: Tensor) -> Tensor:
        rows, width = gate_up.shape[0], gate_up.shape[1] // 2
        out = gate_up.new_empty((rows, width))
        grid = (rows, triton.cdiv(width, BLOCK))
        torch.library.wrap_triton(_silu_mul_kernel)[grid](gate_up, out, width, BLOCK=BLOCK)
        return out


def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up of `gate_up` `[..., 2F]` (the gate's F columns, then the up's): `[..., F]`."""
    width = gate_up.shape[-1]
    rows = gate_up.reshape(-1, width).contiguous()
    return _silu_mul(rows).view(*gate_up.shape[:-1], width // 2)

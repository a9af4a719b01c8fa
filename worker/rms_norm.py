"""RMS norm as a kernel of its own on CUDA: each normed row written once, for the products to read.

At batch 1 TorchInductor turns each matrix product into a reduction and inlines into it the
elementwise work that feeds it (worker/silu_mul.py says more). Where a norm feeds a product,
every program of that reduction read the row before the norm, often the residual sum's two
addends, and the norm's weight, and scaled and rounded them again: three rows of reads a
program where one would do. Inductor did so in about half the layers, its choice varying
between layers of one stage; on the H200 those layers' gate/up product took 61.8 us alone
(72 in the pipeline) where the others' took 53.7 (55.7). A custom op is a boundary that
Inductor does not inline across, so here the normed row is computed once (8 KB in bf16 for a
hidden size of 4096) and every product reads it as it is: with it the gate/up product took
52.6-53.4 us in every layer of stage 0's shape alone, for 2.3 us of this kernel a norm
(docs/gpu.md, session 13).

It computes what `RMSNorm`'s torch expression does: the mean square in fp32, the row scaled
in fp32 and rounded to the input's dtype, then multiplied by the weight and rounded again, as
Hugging Face's `LlamaRMSNorm` does. CUDA only, where Triton is installed; `available()` says
so. `MESHPIPE_RMS_NORM=inline` in a worker's environment turns it off (for measuring one
against the other).
"""

from __future__ import annotations

import torch
from torch import Tensor

from worker.triton_import import kernel_serves, tl, triton


def available(device: torch.device) -> bool:
    """Whether the kernel serves a stage on `device` (`MESHPIPE_RMS_NORM=inline` turns it off)."""
    return kernel_serves(device, "MESHPIPE_RMS_NORM")


def block_for(width: int) -> int:
    """The columns a program holds: the row, padded to a power of two."""
    return triton.next_power_of_2(width)


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, weight_ptr, out_ptr, width, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        columns = tl.arange(0, BLOCK)
        inside = columns < width
        x = tl.load(x_ptr + row * width + columns, mask=inside, other=0.0).to(tl.float32)
        scale = tl.math.rsqrt(tl.sum(x * x, axis=0) / width + eps)
        normed = (x * scale).to(out_ptr.dtype.element_ty).to(tl.float32)
        weight = tl.load(weight_ptr + columns, mask=inside, other=0.0).to(tl.float32)
        out = (weight * normed).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * width + columns, out, mask=inside)

    @torch.library.triton_op("meshpipe::rms_norm", mutates_args=())
    def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
        rows, width = x.shape
        out = x.new_empty((rows, width))
        block = block_for(width)
        warps = 4 if block <= 4096 else 8
        kernel = torch.library.wrap_triton(_rms_norm_kernel)
        kernel[(rows,)](x, weight, out, width, eps, BLOCK=block, num_warps=warps)
        return out


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The RMS norm of each row of `x` `[..., H]` (16-bit or fp32), times `weight` `[H]`."""
    width = x.shape[-1]
    rows = x.reshape(-1, width).contiguous()
    return _rms_norm(rows, weight, eps).view(x.shape)

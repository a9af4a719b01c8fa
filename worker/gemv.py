"""A decode step's matrix products for one row, as a kernel of meshpipe's own on CUDA.

A single stream's decode step multiplies one row by each weight: the GPU's time is the time to
read the weights, and what counts is how close each product comes to the memory's bandwidth
and what it costs around it. At batch 1 TorchInductor turns each product into a reduction of
its own, with the elementwise work around it fused in or not as its heuristics choose, and
worker/rms_norm.py's norm is a kernel between them. Here each product is one kernel that also
does what lies next to it in a decoder layer:

- the RMS norm that feeds it: the norm's scale is one number a row, so the product of the
  normed row is the product of the row times the norm's weight, scaled at the end by the
  reciprocal root mean square, which the same pass over the row sums up (each program reads
  the whole row anyway). No norm kernel, and no normed row written and read again;
- the bias, and the residual's add after the output and down projections.

`BLOCK_N` weight rows a program, `BLOCK_K` columns a pass, fp32 sums; the sizes are
`launch_for`'s, measured on an H200 with `python -m bench.gemv`. One row only: a batch of
several rows keeps torch's products (cuBLAS or Inductor), which read each weight once for all
of them. CUDA only, where Triton is installed; `available()` says so, and
`MESHPIPE_GEMV=inline` in a worker's environment turns it off (for measuring one against the
other). The arithmetic differs from the torch expression only in rounding: the normed row is not
rounded to the dtype before the product, and the residual is added to the fp32 sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from worker.triton_import import kernel_serves, tl, triton


def available(device: torch.device) -> bool:
    """Whether the kernel serves a stage on `device` (`MESHPIPE_GEMV=inline` turns it off)."""
    return kernel_serves(device, "MESHPIPE_GEMV")


def launch_for(rows: int, width: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, warps) for a product of `rows` weight rows of `width` columns: the
    fastest of `python -m bench.gemv --sweep` for each of Llama 3 8B's products on an H200
    (bench/results/gemv-sweep-h200-s14.json). The long rows of the down projection and the
    output projection's few rows went fastest with many small programs (2 rows a program,
    2,048 columns a pass, 2 warps); the others with 8 rows a program at 4 warps."""
    columns = triton.next_power_of_2(width)
    if width > 4096 or rows <= 4096:
        return 2, min(2048, columns), 2
    return 8, min(512 if rows < 16384 else 1024, columns), 4


if triton is not None:

    @triton.jit
    def _gemv_kernel(
        x_ptr,
        weight_ptr,
        norm_ptr,
        bias_ptr,
        residual_ptr,
        out_ptr,
        rows,
        width,
        eps,
        NORM: tl.constexpr,
        BIAS: tl.constexpr,
        RESIDUAL: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
    ):
        outputs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        inside = outputs < rows
        weight_rows = weight_ptr + outputs.to(tl.int64)[:, None] * width
        sums = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for start in range(0, width, BLOCK_K):
            columns = start + tl.arange(0, BLOCK_K)
            within = columns < width
            if EVEN_K:  # no column masks: wider loads
                where = inside[:, None]
                x = tl.load(x_ptr + columns).to(tl.float32)
            else:
                where = inside[:, None] & within[None, :]
                x = tl.load(x_ptr + columns, mask=within, other=0.0).to(tl.float32)
            if NORM:
                squares += x * x
                if EVEN_K:
                    x = x * tl.load(norm_ptr + columns).to(tl.float32)
                else:
                    x = x * tl.load(norm_ptr + columns, mask=within, other=0.0).to(tl.float32)
            w = tl.load(weight_rows + columns[None, :], mask=where, other=0.0)
            sums += w.to(tl.float32) * x[None, :]
        out = tl.sum(sums, axis=1)
        if NORM:
            out = out * tl.math.rsqrt(tl.sum(squares, axis=0) / width + eps)
        if BIAS:
            out += tl.load(bias_ptr + outputs, mask=inside, other=0.0).to(tl.float32)
        if RESIDUAL:
            out += tl.load(residual_ptr + outputs, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + outputs, out.to(out_ptr.dtype.element_ty), mask=inside)

    @torch.library.triton_op("meshpipe::gemv", mutates_args=())
    def _gemv(
        x: Tensor,
        weight: Tensor,
        norm: Tensor | None,
        bias: Tensor | None,
        residual: Tensor | None,
        eps: float,
        fp32_out: bool,
    ) -> Tensor:
        rows, width = weight.shape
        out = x.new_empty((1, rows), dtype=torch.float32 if fp32_out else x.dtype)
        launch(x, weight, norm, bias, residual, eps, out, *launch_for(rows, width))
        return out


def launch(x, weight, norm, bias, residual, eps, out, block_n, block_k, warps) -> None:
    """The kernel on `x` `[1, K]` and `weight` `[N, K]` into `out` `[1, N]`, with the given
    block sizes (`bench.gemv` tries them all)."""
    rows, width = weight.shape
    unused = x  # a pointer the kernel does not read where its flag is off
    kernel = torch.library.wrap_triton(_gemv_kernel)
    kernel[(triton.cdiv(rows, block_n),)](
        x,
        weight,
        unused if norm is None else norm,
        unused if bias is None else bias,
        unused if residual is None else residual,
        out,
        rows,
        width,
        eps,
        NORM=norm is not None,
        BIAS=bias is not None,
        RESIDUAL=residual is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        EVEN_K=width % block_k == 0,
        num_warps=warps,
    )


def gemv(
    x: Tensor,
    weight: Tensor,
    *,
    norm: Tensor | None = None,
    eps: float = 0.0,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    fp32_out: bool = False,
) -> Tensor:
    """`x` `[1, K]` times `weight` `[N, K]` transposed: `[1, N]` in x's dtype (fp32 with
    `fp32_out`). With `norm` (`[K]`), of the row RMS-normed with that weight and `eps`; plus
    `bias` `[N]` and `residual` `[1, N]`."""
    return _gemv(x.contiguous(), weight, norm, bias, residual, eps, fp32_out)

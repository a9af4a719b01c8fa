"""Triton for meshpipe's CUDA kernels (worker/decode_attention.py, worker/silu_mul.py), or None.

CUDA builds of torch bring Triton, and their workers compile these kernels with it. A CPU build
cannot run them, and importing Triton there added about 0.5 s to every CPU worker's start, so
on a CPU build it is imported only when `MESHPIPE_TRITON=1` asks for it: the kernels' checks
without a GPU do (tests/worker/test_triton_kernels.py, which compile them for sm_90 and run
them in Triton's interpreter).
"""

from __future__ import annotations

import os

import torch

triton = tl = None
wanted = torch.version.cuda is not None or os.environ.get("MESHPIPE_TRITON") == "1"
if wanted and hasattr(torch.library, "triton_op"):  # torch.library.triton_op: torch 2.6
    try:
        import triton
        import triton.language as tl
    except ImportError:  # a CUDA build without it, or a CPU build
        triton = tl = None


def kernel_serves(device: torch.device, switch: str) -> bool:
    """Whether one of meshpipe's Triton kernels serves a stage on `device`: Triton is here, the
    device is CUDA, and the environment's `switch` is not `inline` (that variable gives the
    work back to Inductor, for measuring one against the other)."""
    wanted = os.environ.get(switch, "kernel") != "inline"
    return triton is not None and device.type == "cuda" and wanted

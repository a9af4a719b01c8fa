"""meshpipe's native CPU kernels (`cpu_kernels.c`): block products and decode attention.

The C file is compiled once per machine with the system compiler (`cc -O3 -march=native`) into
the cache dir and called through ctypes on tensors' memory. Where it cannot be built (no
compiler, no AVX-512, not x86), `load()` returns None and the callers keep their torch paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from meshpipe.dirs import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_suffix(".c")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC", "-std=c11"]
LANES = 16  # outputs per weight tile: one AVX-512 register of float32

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
SIGNATURES = {
    "q4_1_matmul": [_ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _ptr],
    "q8_0_matmul": [_ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr],
    "decode_attention": [*[_ptr] * 8, *[_i64] * 5, _ptr],
    "rms_norm": [_ptr, _ptr, _i64, _i64, ctypes.c_float, _ptr],
}


class NativeKernels:
    """The compiled library, with typed wrappers that allocate outputs as tensors."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.library = library
        for name, arguments in SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes, function.restype = arguments, None

    def q4_1_matmul(self, x: Tensor, qs: Tensor, d: Tensor, m: Tensor) -> Tensor:
        """`x` `[R, K]` float32 times Q4_1 blocks tiled by `LANES` -> `[R, N]`."""
        rows, k = x.shape
        n = d.numel() // (k // 32)
        y = torch.empty(rows, n)
        self.library.q4_1_matmul(
            x.data_ptr(), rows, k, qs.data_ptr(), d.data_ptr(), m.data_ptr(), n, y.data_ptr()
        )
        return y

    def q8_0_matmul(self, x: Tensor, qs: Tensor, d: Tensor) -> Tensor:
        """`x` `[R, K]` float32 times Q8_0 blocks tiled by `LANES` -> `[R, N]`."""
        rows, k = x.shape
        n = d.numel() // (k // 32)
        y = torch.empty(rows, n)
        self.library.q8_0_matmul(
            x.data_ptr(), rows, k, qs.data_ptr(), d.data_ptr(), n, y.data_ptr()
        )
        return y

    def decode_attention(
        self,
        qkv: Tensor,
        cos: Tensor,
        sin: Tensor,
        slots: Tensor,
        positions: Tensor,
        caches: tuple[Tensor, Tensor],
        heads: int,
    ) -> Tensor:
        """A decode step's attention from the fused projection `qkv` `[B, (H + 2 kvh) * hd]`:
        rotate q and k (cos, sin `[B, hd]`), write k and v at each sequence's (slot, position)
        of the caches `[S, kvh, capacity, hd]`, attend over the slot's keys -> `[B, H * hd]`."""
        k_cache, v_cache = caches
        _, kv_heads, capacity, dim = k_cache.shape
        batch = qkv.shape[0]
        assert qkv.shape[1] == (heads + 2 * kv_heads) * dim and k_cache.is_contiguous()
        assert dim % LANES == 0 and dim <= 256
        qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
        out = torch.empty(batch, heads * dim)
        scratch = torch.empty(capacity + dim)
        pointers = [qkv, cos, sin, slots.contiguous(), positions.contiguous(), k_cache, v_cache]
        self.library.decode_attention(
            *(tensor.data_ptr() for tensor in pointers),
            out.data_ptr(),
            batch,
            heads,
            kv_heads,
            capacity,
            dim,
            scratch.data_ptr(),
        )
        return out

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """`x / sqrt(mean(x^2) + eps) * weight` over the last dimension of float32 `x`."""
        x = x.contiguous()
        out = torch.empty_like(x)
        dim = x.shape[-1]
        rows = x.numel() // dim
        self.library.rms_norm(x.data_ptr(), weight.data_ptr(), rows, dim, eps, out.data_ptr())
        return out


def _library_path() -> Path:
    compiler = shutil.which(os.environ.get("CC", "cc")) or "cc"
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode())
    return cache_dir() / "kernels" / f"cpu_kernels-{key.hexdigest()[:16]}.so"


def _build(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"],
            check=True,
            capture_output=True,
            text=True,
        )
        os.replace(built, target)  # atomic: processes building at once all see a whole file


@cache
def load() -> NativeKernels | None:
    """The kernels for this machine, built on first use; None where they cannot be built."""
    if not _x86_with_avx512():
        return None
    try:
        path = _library_path()
        if not path.is_file():
            _build(path)
        return NativeKernels(ctypes.CDLL(str(path)))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        log.warning("native CPU kernels unavailable, using torch's: %s", detail.strip()[:300])
        return None


def _x86_with_avx512() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512f " in flags and " f16c " in flags

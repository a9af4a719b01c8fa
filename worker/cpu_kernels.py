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
from collections.abc import Callable
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

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.library, self.path = library, path
        for name, arguments in SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes, function.restype = arguments, None

    def product(self, kind: str, fields: list[Tensor]) -> BlockProduct:
        """`x @ W.T` for W in Q4_1 (`qs`, `d`, `m`) or Q8_0 (`qs`, `d`) blocks tiled by `LANES`."""
        function = self.library.q4_1_matmul if kind == "q4_1" else self.library.q8_0_matmul
        return BlockProduct(function, fields)

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


class BlockProduct:
    """One weight's block product, its pointers bound once: a stage makes about a hundred of
    these calls a token, each a few microseconds of Python around the C."""

    def __init__(self, function: Callable[..., None], fields: list[Tensor]) -> None:
        tiles, blocks = fields[1].shape[:2]  # d: [N / LANES, K / 32, LANES]
        self.function, self.fields = function, fields  # the fields stay alive with the pointers
        self.pointers = [field.data_ptr() for field in fields]
        self.n, self.k = tiles * LANES, blocks * 32

    def __call__(self, x: Tensor) -> Tensor:
        """`x` `[R, K]` float32, contiguous -> `[R, N]`."""
        rows = x.shape[0]
        assert x.shape[1] == self.k and x.is_contiguous() and x.dtype == torch.float32
        y = torch.empty(rows, self.n)
        self.function(x.data_ptr(), rows, self.k, *self.pointers, self.n, y.data_ptr())
        return y


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
        return NativeKernels(ctypes.CDLL(str(path)), path)
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

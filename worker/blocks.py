"""Steps on the GGUF's own blocks: Q4_1 and Q8_0 weights read as 4 and 8 bits.

A decode step is a chain of matrix products with a few rows (one per sequence), bound by the
bytes of weight read. The default model arrives as Q4_1 (with a Q8_0 embedding); its float32 form
is four to eight times the bytes. A `BlockLinear` computes the same product from the blocks
themselves: `y[n] = sum_b sum_j x[b, j] * (d[b, n] * q[b, j, n] + m[b, n])`, the weights
numerically those of the float32 tensor (`d * q + m` is exact in float32), only summed in
another order.

Two implementations:
- meshpipe's C kernels (`worker/cpu_kernels.c`, AVX-512), where they build: each block is
  dequantized once for all the rows of a call, so a row costs a fraction of a one-row call, and
  inputs of up to `NATIVE_MAX_ROWS` rows (batched decodes and short prompt chunks) run on blocks;
- elsewhere, plain tensor expressions compiled by TorchInductor into one fused C++ loop each, for
  inputs of up to `MAX_ROWS` rows (they dequantize once per row).
Wider inputs are compute-bound and keep the float32 GEMM.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch._inductor
from safetensors import safe_open
from torch import Tensor, nn
from torch.fx.experimental.proxy_tensor import make_fx

from meshpipe.models.gguf_convert import BLOCKS_FILE
from worker.cpu_kernels import LANES, NativeKernels
from worker.cpu_kernels import load as load_native
from worker.model import Stage

TILE = 32  # outputs per tile: a tile's block rows are contiguous, so weights stream in order
BLOCK = 32  # elements per GGUF block (Q4_1 and Q8_0)
# The kernels dequantize once per row, so their cost grows with the rows; MKL's float32 GEMM is
# slow at 2-3 rows. A whole-model step on one thread, float32 vs blocks: 1 row 64 vs 27 ms,
# 2 rows 108 vs 40, 3 rows 143 vs 53, 4 rows 107 vs 88, 6 rows 111 vs 109, 8 rows 109 vs 143.
MAX_ROWS = 3  # 4 rows would gain little for another compilation per shape at load
# The C kernels against float32 (MKL) on one thread, all 30 layers' projections of SmolLM2-135M
# (random blocks of the same shapes, each layer its own): 1 row 8.8 vs 28.7 ms, 8 rows 17.4 vs
# 69.6, 16 rows 32.2 vs 70.1, 32 rows 59.4 vs 91.0, 64 rows 116.6 vs 129.8.
NATIVE_MAX_ROWS = 48


def q4_1_matmul(x: Tensor, qs: Tensor, d: Tensor, m: Tensor) -> Tensor:
    """`x` `[R, K]` times Q4_1 weights: `qs` `[T, nb, 16, TILE]` uint8, `d`, `m` `[T, nb, TILE]`."""
    tiles, blocks, _, tile = qs.shape
    rows = x.shape[0]
    xb = x.view(rows, 1, blocks, BLOCK, 1)
    low, high = (qs & 15).float(), (qs >> 4).float()  # elements j and j + 16 of each block
    dots = (low * xb[:, :, :, :16] + high * xb[:, :, :, 16:]).sum(3)  # [R, T, nb, TILE]
    return (dots * d.float() + m.float() * xb.sum(3)).sum(2).view(rows, tiles * tile)


def q8_0_matmul(x: Tensor, qs: Tensor, d: Tensor) -> Tensor:
    """`x` `[R, K]` times Q8_0 weights: `qs` `[T, nb, 32, TILE]` int8, `d` `[T, nb, TILE]`."""
    tiles, blocks, _, tile = qs.shape
    rows = x.shape[0]
    xb = x.view(rows, 1, blocks, BLOCK, 1)
    return ((qs.float() * xb).sum(3) * d.float()).sum(2).view(rows, tiles * tile)


def tiled(value: Tensor, tile: int = TILE) -> Tensor:
    """`[N, nb, ...]` (rows first, as stored) -> `[N / tile, nb, ..., tile]`."""
    rows = value.shape[0]
    value = value.view(rows // tile, tile, *value.shape[1:])
    return value.movedim(1, -1).contiguous()


class Kernels:
    """The block kernels of a worker: the C kernels where they build, else Inductor kernels
    compiled once per (kind, rows, weight shape) and shared by the layers.

    The Inductor kernels are compiled straight from a traced graph (`make_fx` then Inductor), not
    through `torch.compile`: a call then costs about 9 us instead of about 60 us of guard
    checks, and a stage makes several hundred calls per token."""

    def __init__(self, native: bool = True) -> None:
        self.native: NativeKernels | None = load_native() if native else None
        self.compiled: dict[tuple, Callable[..., Tensor]] = {}

    @property
    def max_rows(self) -> int:
        """The widest input that runs on the blocks (wider ones take the float32 GEMM)."""
        return NATIVE_MAX_ROWS if self.native is not None else MAX_ROWS

    def __str__(self) -> str:
        return "C kernels" if self.native is not None else "Inductor kernels"

    def get(self, kind: str, x: Tensor, fields: list[Tensor]) -> Callable[..., Tensor]:
        key = (kind, tuple(x.shape), *(tuple(field.shape) for field in fields))
        if key not in self.compiled:
            kernel = q4_1_matmul if kind == "q4_1" else q8_0_matmul
            graph = make_fx(kernel)(x, *fields)
            self.compiled[key] = torch._inductor.compile(graph, [x, *fields])
        return self.compiled[key]


class BlockLinear(nn.Module):
    """A bias-free linear layer: GGUF blocks for inputs of up to `max_rows` rows, the float32
    weight for wider ones."""

    def __init__(self, linear: nn.Linear, kind: str, fields: dict[str, Tensor], kernels: Kernels):
        super().__init__()
        assert linear.bias is None
        self.weight = linear.weight
        names = [name for name in ("qs", "d", "m") if name in fields]
        self.max_rows = kernels.max_rows
        self.native = kernels.native
        if self.native is not None:
            self.fields = [tiled(fields[name], LANES) for name in names]
            self.product = self.native.product(kind, self.fields)
            return
        self.fields = [tiled(fields[name]) for name in names]
        with torch.inference_mode():
            self.kernels = [
                kernels.get(kind, torch.zeros(rows, linear.in_features), self.fields)
                for rows in range(1, MAX_ROWS + 1)
            ]

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[0]
        if not 0 < rows <= self.max_rows:
            return nn.functional.linear(x, self.weight)
        if self.native is not None:
            return self.product(x.contiguous())
        return self.kernels[rows - 1](x.contiguous(), *self.fields)


def usable(linear: nn.Linear, fields: dict[str, Tensor]) -> bool:
    """Blocks fit the kernels: float32 CPU layer, rows in whole tiles, the shapes agree."""
    rows, columns = linear.weight.shape
    return (
        linear.weight.device.type == "cpu"
        and linear.weight.dtype == torch.float32
        and linear.bias is None
        and rows % TILE == 0
        and columns % BLOCK == 0
        and fields["qs"].shape[:2] == (rows, columns // BLOCK)
    )


def read_blocks(model_dir: Path, names: set[str]) -> dict[str, tuple[str, dict[str, Tensor]]]:
    """Checkpoint weight name -> (kind, fields) for the wanted names the blocks file holds."""
    path = model_dir / BLOCKS_FILE
    if not path.is_file():
        return {}
    found: dict[str, tuple[str, dict[str, Tensor]]] = {}
    with safe_open(str(path), framework="pt") as file:
        for key in file.keys():  # noqa: SIM118 - safe_open is not a dict
            weight, kind, field = key.rsplit(".", 2)
            if weight in names:
                found.setdefault(weight, (kind, {}))[1][field] = file.get_tensor(key)
    return found


def joined(parts: list[tuple[str, dict[str, Tensor]]]) -> tuple[str, dict[str, Tensor]] | None:
    """The blocks of a fused layer: its parts' rows concatenated, if all share one kind."""
    kinds = {kind for kind, _ in parts}
    if len(kinds) != 1:
        return None
    names = parts[0][1].keys()
    return kinds.pop(), {name: torch.cat([fields[name] for _, fields in parts]) for name in names}


def use_blocks(stage: Stage, model_dir: Path, kernels: Kernels | None = None) -> int:
    """Swap every linear layer of `stage` whose blocks the model has for a `BlockLinear` (its
    kernel compiled now, not on the first request); return how many were swapped. A worker
    passes its own `kernels`, so a new plan reuses what an earlier one compiled."""
    parts = stage.checkpoint_parts()
    linears = {name: module for name, module in stage.named_modules() if type(module) is nn.Linear}
    wanted = {name for linear in linears for name in parts[f"{linear}.weight"]}
    blocks = read_blocks(model_dir, wanted)
    kernels = kernels or Kernels()
    swapped = 0
    for name, linear in linears.items():
        names = parts[f"{name}.weight"]
        if not all(part in blocks for part in names):
            continue
        fused = joined([blocks[part] for part in names])
        if fused is None or not usable(linear, fused[1]):
            continue
        parent, _, attribute = name.rpartition(".")
        module = stage.get_submodule(parent) if parent else stage
        setattr(module, attribute, BlockLinear(linear, *fused, kernels))
        swapped += 1
    return swapped

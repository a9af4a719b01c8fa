"""One row's matrix products on the GPU: worker/gemv.py's kernel against what the worker had.

    python -m bench.gemv [--preset llama3-8b] [--sweep] [--output PATH]

For each product of a decode step of one row (the qkv projection with the norm before it, the
output projection with the residual's add, gate/up with its norm, down with its add, the
lm_head with the final norm and fp32 logits), in the same process:

- `kernel`: `worker.gemv.gemv`, with `launch_for`'s block sizes;
- `inductor`: the worker's step before it: `worker/rms_norm.py`'s norm where there is one,
  then `F.linear` (plus the add) compiled by TorchInductor as the decode graphs compile it
  (coordinate-descent tuning);
- `cublas`: `F.linear` alone, eager;

and with `--sweep` every block size (`BLOCK_N` x `BLOCK_K` x warps) of the kernel. Each is
captured in a CUDA graph that calls it once for each of several copies of the weight, more
bytes than the L2 cache holds, as a step's layers read weights that are not cached; the time of a
call is the graph's replay over the copies, median of 20. Prints microseconds and the weight's
bytes a second for each, and the best sweep entry per product, and a greedy step's argmax over
the vocabulary (torch's, and `worker.sampling.greedy_tokens`); writes JSON with `--output`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config
import torch.nn.functional as F

from meshpipe.models.synth import PRESETS, preset_config
from worker import gemv, rms_norm
from worker.sampling import greedy_tokens
from worker.triton_import import triton

CACHE_BYTES = 512 * 2**20  # the copies of a weight a graph reads: more than any GPU's L2


def products(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """(rows, width, norm, residual, fp32_out) of each product of one decoder layer and the head."""
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    qkv = (heads + 2 * kv_heads) * head_dim
    return {
        "qkv": {"rows": qkv, "width": hidden, "norm": True},
        "o": {"rows": hidden, "width": heads * head_dim, "residual": True},
        "gate_up": {"rows": 2 * ffn, "width": hidden, "norm": True},
        "down": {"rows": hidden, "width": ffn, "residual": True},
        "lm_head": {"rows": config["vocab_size"], "width": hidden, "norm": True, "fp32": True},
    }


def graph_time(calls: list[Callable[[], Any]]) -> float:
    """Median microseconds of one of `calls`, all of them replayed from one CUDA graph."""
    for call in calls[:2]:
        call()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm on a side stream, as capture requires
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(calls))
    return statistics.median(times)


def measure(name: str, shape: dict[str, Any], sweep: bool) -> dict[str, Any]:
    rows, width = shape["rows"], shape["width"]
    nbytes = rows * width * 2
    copies = max(2, -(-CACHE_BYTES // nbytes))
    generator = torch.Generator(device="cuda").manual_seed(0)

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        out = torch.randn(size, generator=generator, device="cuda", dtype=torch.float32)
        return (out * scale).to(torch.bfloat16)

    weights = [randn(rows, width, scale=0.02) for _ in range(copies)]
    x, norm_weight = randn(1, width), randn(width) if shape.get("norm") else None
    residual = randn(1, rows) if shape.get("residual") else None
    fp32 = bool(shape.get("fp32"))
    eps = 1e-5

    def ours(weight: torch.Tensor) -> torch.Tensor:
        return gemv.gemv(x, weight, norm=norm_weight, eps=eps, residual=residual, fp32_out=fp32)

    def product(normed: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = F.linear(normed, weight)
        if residual is not None:
            out = out + residual
        return out.float() if fp32 else out

    compiled = torch.compile(product, fullgraph=True, dynamic=False)

    def theirs(weight: torch.Tensor) -> torch.Tensor:
        normed = x if norm_weight is None else rms_norm.rms_norm(x, norm_weight, eps)
        return compiled(normed, weight)

    normed = x if norm_weight is None else rms_norm.rms_norm(x, norm_weight, eps)
    reference = product(normed, weights[0]).float()
    error = float((ours(weights[0]).float() - reference).norm() / reference.norm())
    result: dict[str, Any] = {**shape, "bytes": nbytes, "copies": copies, "rel_error": error}
    timed = {
        "kernel": [lambda w=w: ours(w) for w in weights],
        "inductor": [lambda w=w: theirs(w) for w in weights],
        "cublas": [lambda w=w: F.linear(x, w) for w in weights],
    }
    for label, calls in timed.items():
        us = graph_time(calls)
        result[label] = {"us": us, "GB_s": nbytes / us / 1e3}
    result["launch"] = list(gemv.launch_for(rows, width))
    line = ", ".join(f"{k} {result[k]['us']:.1f} us {result[k]['GB_s']:.0f} GB/s" for k in timed)
    print(f"{name:8s} [{rows} x {width}]: {line}; rel. error {error:.1e}", flush=True)
    if sweep:
        result["sweep"] = sweep_launches(shape, weights, x, norm_weight, residual, fp32, eps)
        best = min(result["sweep"], key=lambda entry: entry["us"])
        result["best"] = best
        print(f"    best of {len(result['sweep'])}: {best}", flush=True)
    return result


def sweep_launches(shape, weights, x, norm_weight, residual, fp32, eps) -> list[dict[str, Any]]:
    """Every (BLOCK_N, BLOCK_K, warps) of the kernel on this product, timed as above."""
    rows, width = shape["rows"], shape["width"]
    out = x.new_empty((1, rows), dtype=torch.float32 if fp32 else x.dtype)
    entries = []
    for block_n in (1, 2, 4, 8, 16):
        for block_k in (512, 1024, 2048):
            if block_n * block_k > 16384 or block_k > triton.next_power_of_2(width):
                continue
            for warps in (2, 4, 8) if block_n <= 2 else (4, 8):

                def call(weight: torch.Tensor, launch=(block_n, block_k, warps)) -> None:
                    gemv.launch(x, weight, norm_weight, None, residual, eps, out, *launch)

                us = graph_time([lambda w=w: call(w) for w in weights])
                entries.append({"block_n": block_n, "block_k": block_k, "warps": warps, "us": us})
    return entries


def greedy(vocab: int) -> dict[str, Any]:
    """A greedy step's argmax over one row of fp32 logits: torch's against `greedy_tokens`,
    both compiled as the decode graphs compile them."""
    logits = torch.randn(1, vocab, device="cuda")
    plain = torch.compile(lambda x: x.argmax(dim=-1), fullgraph=True, dynamic=False)
    parts = torch.compile(greedy_tokens, fullgraph=True, dynamic=False)
    assert torch.equal(plain(logits), parts(logits))
    result = {"argmax_us": graph_time([lambda: plain(logits)] * 8)}
    result["greedy_tokens_us"] = graph_time([lambda: parts(logits)] * 8)
    print(f"argmax of {vocab} logits: {result}", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    parser.add_argument("--sweep", action="store_true", help="every block size of the kernel")
    parser.add_argument("--only", default="", help="products to measure, comma-separated")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    torch._inductor.config.coordinate_descent_tuning = True  # as worker/cuda_graphs.py
    shapes = products(preset_config(PRESETS[args.preset], args.preset))
    wanted = [name for name in args.only.split(",") if name] or list(shapes)
    report: dict[str, Any] = {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name()}
    with torch.inference_mode():
        report["products"] = {name: measure(name, shapes[name], args.sweep) for name in wanted}
        report["greedy"] = greedy(shapes["lm_head"]["rows"])
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

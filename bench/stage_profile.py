"""Where a GPU stage's decode step spends its time: a few layers of a preset's shapes, one process.

    python -m bench.stage_profile --preset llama3-8b --layers 4 --batches 1,64

Builds a stage of `--layers` decoder layers (plus the head with `--head`) with random bf16
weights on the GPU, fills every KV slot to about `--context` tokens, and times one decode step
per batch size for each variant: `graph` (the worker's CUDA graphs of eager ops,
`--no-compile`), `compiled` (the worker's default: the step compiled by TorchInductor, then
captured), `gathered` (compiled, with decode attention over keys gathered from the cache instead
of `worker/decode_attention.py`'s in-place kernel), `unfused` (compiled, with that kernel but
the rotary embedding and the cache writes in torch ops before it) and `inline` (compiled, with
SwiGLU's activation inlined by Inductor into the down projection instead of
`worker/silu_mul.py`'s kernel), `norm-inline` (compiled, with the RMS norms inlined by
Inductor into the products they feed instead of `worker/rms_norm.py`'s kernel) and
`rotary-inline` (compiled, with the rotary cos and sin left to Inductor instead of
`decode_attention.rotary_tables`' kernel) and `gemv-inline` (compiled, with a one-row step's
products left to Inductor and the norms to `worker/rms_norm.py` instead of `worker/gemv.py`'s
kernel). Prints each variant's step time, the bandwidth it reaches on the weight bytes, and the
top kernels of an eager step (of the compiled graph's replay too with `--kernels`); writes JSON
with `--output`. `--matmuls` times each weight's matrix product alone (`F.linear`, as the graphs
call it) against the measured copy bandwidth: what the products can reach at best.

With `--host`, it also times the host side of a worker's step for each batch (compiled
variant): a BATCH frame as the gateway sends it is decoded, parsed and run through the worker's
own `_run` (directly, and through its compute thread as the event loop hands it over), and the
result framed for the next hop. The wall time over the graph replay's device time is what a
single stream pays per stage beyond the GPU work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

from meshpipe.models.config import ModelConfig
from meshpipe.models.synth import PRESETS, preset_config
from meshpipe.wire import Frame, FrameDecoder, Kind
from worker.batch import Batch
from worker.cuda_graphs import DecodeGraphs
from worker.model import RMSNorm, Span, Stage, StagePlan
from worker.node import WorkerNode, WorkerSettings
from worker.step_profile import device_kernels


def build(preset: str, layers: int, head: bool, slots: int, max_seq_len: int) -> Stage:
    config = ModelConfig.from_dict(preset_config(PRESETS[preset], preset))
    start = config.num_layers - layers if head else 0
    plan = StagePlan(start, start + layers, config.num_layers, slots, max_seq_len)
    with torch.device("meta"):
        stage = Stage(config, plan).to(dtype=torch.bfloat16)
    stage = stage.to_empty(device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for parameter in stage.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
        for layer in stage.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
    stage.reset_rope()
    stage.allocate_cache(torch.bfloat16, extra_slots=1)
    with torch.no_grad():
        for layer in stage.layers:
            layer.self_attn.kv_cache.k_cache.normal_(0.0, 1.0, generator=generator)
            layer.self_attn.kv_cache.v_cache.normal_(0.0, 1.0, generator=generator)
    return stage.eval()


def weight_bytes(stage: Stage) -> int:
    skip = {"embed_tokens.weight"}  # a decode step reads B rows of it, not the table
    return sum(p.numel() * p.element_size() for n, p in stage.named_parameters() if n not in skip)


def inputs(stage: Stage, batch: int) -> torch.Tensor:
    if stage.plan.is_first:
        return torch.randint(0, stage.config.vocab_size, (batch,), device="cuda")
    hidden = stage.config.hidden_size
    return torch.randn(batch, hidden, dtype=torch.bfloat16, device="cuda")


def time_graph(
    graphs: DecodeGraphs, batch: int, context: int, repeats: int
) -> tuple[float, float, float]:
    """Median ms of a decode step replayed from the worker's CUDA graphs, the seconds the first
    step took (capture, and compilation), and the relative L2 error against the eager step."""
    stage = graphs.stage
    spans = decode_spans(batch, context)
    x = inputs(stage, batch)
    started = time.perf_counter()
    graphs.run(x, spans)
    torch.cuda.synchronize()
    first = time.perf_counter() - started
    # a decode step writes the same keys and values again, so eager and replay see one cache
    eager = stage(x, spans, list(range(batch))).float()
    replayed = graphs.run(x, spans).float()
    error = float((replayed - eager).norm() / eager.norm())
    for _ in range(3):
        graphs.run(x, spans)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graphs.run(x, spans)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), first, error


def top_kernels(step: Callable[[], Any], count: int = 40) -> tuple[list[dict[str, Any]], float]:
    """The costliest kernels of five calls of `step` (eager ops, or a graph's replay: CUPTI
    records the kernels a replay launches), and the ms a step that all its kernels take."""
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    kernels, total = device_kernels(profile, 5)
    top = [
        {"kernel": name, "ms_per_step": ms, "calls": calls // 5}
        for name, ms, calls in kernels[:count]
    ]
    return top, total


def matmul_rates(stage: Stage, batches: list[int], repeats: int = 50) -> dict[str, Any]:
    """Each distinct weight's product alone at each batch: ms and GB/s of weight bytes."""
    from bench.gpu import copy_bandwidth

    modules = stage.layers[0].named_modules()
    weights = {name: getattr(module, "weight", None) for name, module in modules}
    weights = {name: w for name, w in weights.items() if w is not None and w.dim() == 2}
    if stage.plan.is_last:
        weights["lm_head"] = stage.lm_head.weight
    rates: dict[str, Any] = {"copy_GB_s": copy_bandwidth() / 1e9}
    for name, weight in weights.items():
        for batch in batches:
            x = torch.randn(batch, weight.shape[1], dtype=weight.dtype, device="cuda")
            for _ in range(3):
                torch.nn.functional.linear(x, weight)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                torch.nn.functional.linear(x, weight)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end) / repeats
            gbs = weight.numel() * weight.element_size() / ms / 1e6
            rates[f"{name}/b{batch}"] = {"shape": list(weight.shape), "ms": ms, "GB_s": gbs}
            shape = str(list(weight.shape))
            print(f"matmul {name:22s} {shape:14s} batch {batch:3d}: {ms:.4f} ms {gbs:5.0f} GB/s")
    return rates


def decode_spans(batch: int, context: int) -> list[Span]:
    return [Span(slot, context - 1 - (slot * 7) % 64, 1) for slot in range(batch)]


def worker_node(graphs: DecodeGraphs) -> WorkerNode:
    """A worker holding this stage and its graphs, as after an assignment (no links)."""
    os.environ.setdefault("MESHPIPE_HOME", tempfile.mkdtemp(prefix="meshpipe-profile-"))
    settings = WorkerSettings("127.0.0.1", 0, "profile", "cuda", "bfloat16")
    node = WorkerNode(settings)
    node.stage, node.graphs, node.plan = graphs.stage, graphs, graphs.stage.plan
    node.config, node.plan_id = graphs.stage.config, 1
    return node


def batch_bytes(stage: Stage, batch: int, context: int) -> bytes:
    """A decode BATCH frame as the gateway (or the previous stage) sends it, greedy."""
    spans = [[slot, context - 1 - (slot * 7) % 64, 1] for slot in range(batch)]
    meta = {
        "spans": spans,
        "sample": [[row, 0, 1.0, 0, 0, -1] for row in range(batch)],
        "requests": {str(slot): f"request-{slot}" for slot in range(batch)},
        "timings": [],
        "plan_id": 1,
    }
    return Frame(Kind.BATCH, 7, meta, inputs(stage, batch).cpu()).encode()


def time_host(graphs: DecodeGraphs, batch: int, context: int, repeats: int) -> dict[str, float]:
    """Median ms of each part of a worker's step on the host, with the replay's device time."""
    node = worker_node(graphs)
    data = batch_bytes(graphs.stage, batch, context)
    parts: dict[str, list[float]] = {}

    def timed(name: str, work: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = work()
        parts.setdefault(name, []).append(1000 * (time.perf_counter() - started))
        return result

    async def through_thread(batch: Batch) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(node.executor, node._run, batch)

    def one() -> None:
        frame = timed("decode_frame", lambda: FrameDecoder().feed(data)[0])
        parsed = timed("parse_batch", lambda: node._parse(frame))
        result, _ = timed("run_direct", lambda: node._run(parsed))
        timed("run_via_thread", lambda: asyncio.run(through_thread(parsed)))
        if node._replays_here(parsed):
            timed("replay_on_loop", lambda: asyncio.run(node._replay(parsed)))
        timed("encode_result", lambda: parsed.forward_frame(result).head_and_tensor())

    for _ in range(5):
        one()
    parts.clear()
    for _ in range(repeats):
        one()
    figures = {name: statistics.median(values) for name, values in parts.items()}
    # asyncio.run builds a loop each time: time a bare loop round trip to take it out
    loop_cost = []
    for _ in range(repeats):
        started = time.perf_counter()
        asyncio.run(asyncio.sleep(0))
        loop_cost.append(1000 * (time.perf_counter() - started))
    for name in ("run_via_thread", "replay_on_loop"):
        if name in figures:
            figures[name] -= statistics.median(loop_cost)
    node.executor.shutdown()
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--head", action="store_true", help="the last layers and the lm_head")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--variants", default="graph,compiled")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--host", action="store_true", help="time a worker's host side too")
    parser.add_argument("--kernels", action="store_true", help="the compiled replay's kernels too")
    parser.add_argument("--matmuls", action="store_true", help="each weight's product alone")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    stage = build(args.preset, args.layers, args.head, max(batches), args.context + 64)
    nbytes = weight_bytes(stage)
    result: dict[str, Any] = {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name()}
    result |= {"weight_bytes": nbytes, "layers": args.layers, "head": args.head, "steps": {}}
    if args.matmuls:
        with torch.inference_mode():
            result["matmuls"] = matmul_rates(stage, batches)
    in_place, fused, rotary = stage.in_place_attention, stage.fused_decode, stage.rotary_kernel
    activation = stage.layers[0].mlp.activation_kernel
    norms = [module for module in stage.modules() if isinstance(module, RMSNorm)]
    norm_kernel = norms[0].kernel
    row_products = stage.row_products
    for variant in args.variants.split(","):
        # `gathered`: compiled, with decode attention over gathered keys (before the in-place
        # kernel, and where Triton is missing)
        stage.in_place_attention = in_place and variant != "gathered"
        stage.fused_decode = fused and variant not in ("gathered", "unfused")
        stage.rotary_kernel = rotary and variant != "rotary-inline"
        stage.row_products = row_products and variant != "gemv-inline"
        for layer in stage.layers:
            layer.mlp.activation_kernel = activation and variant != "inline"
            layer.row_products = stage.row_products
        for norm in norms:
            norm.kernel = norm_kernel and variant != "norm-inline"
        torch._dynamo.reset()  # each variant compiled afresh, its compile time its own
        # one DecodeGraphs for every batch, as a worker has: compilations and captures add up
        graphs = DecodeGraphs(stage, compile=variant != "graph")
        for batch in batches:
            with torch.inference_mode():
                ms, first, error = time_graph(graphs, batch, args.context, args.repeats)
            gbs = nbytes / ms / 1e6
            figures = {"ms": ms, "weight_GB_s": gbs, "first_step_s": first, "rel_error": error}
            result["steps"][f"{variant}/b{batch}"] = figures
            print(
                f"{variant:9s} batch {batch:3d}: {ms:7.3f} ms/step  {gbs:5.0f} GB/s of weights"
                f"  first step {first:6.1f} s  rel. error vs eager {error:.1e}"
            )
            if args.host and variant != "graph":
                host = time_host(graphs, batch, args.context, args.repeats)
                result["steps"][f"{variant}/b{batch}"]["host_ms"] = host
                print(
                    "    host side, median ms: "
                    + ", ".join(f"{k} {v:.3f}" for k, v in host.items())
                )
            x, spans = inputs(stage, batch), decode_spans(batch, args.context)
            if variant == "graph":  # the eager ops' kernels (the same as the graph's)
                step = partial(stage, x, spans, list(range(batch)))
            else:  # the compiled graph's replay: Inductor's kernels
                step = partial(graphs.run, x, spans)
            if variant == "graph" or args.kernels:
                with torch.inference_mode():
                    kernels, busy = top_kernels(step)
                figures |= {"kernels": kernels, "kernel_ms": busy, "between_kernels_ms": ms - busy}
                print(f"    kernels {busy:.3f} ms a step, {ms - busy:.3f} ms between them")
                for kernel in kernels:
                    print(
                        f"    {kernel['ms_per_step']:7.3f} ms x{kernel['calls']:3d} {kernel['kernel']}"
                    )
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

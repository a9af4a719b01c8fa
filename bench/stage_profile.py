"""Where a GPU stage's decode step spends its time: a few layers of a preset's shapes, one process.

    python -m bench.stage_profile --preset llama3-8b --layers 4 --batches 1,64

Builds a stage of `--layers` decoder layers (plus the head with `--head`) with random bf16
weights on the GPU, fills every KV slot to about `--context` tokens, and times one decode step
per batch size for each variant: `graph` (the worker's CUDA graphs of eager ops,
`--no-compile`) and `compiled` (the worker's default: the step compiled by TorchInductor, then
captured). Prints each
variant's step time, the bandwidth it reaches on the weight bytes, and the top kernels of an
eager step; writes JSON with `--output`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from meshpipe.models.config import ModelConfig
from meshpipe.models.synth import PRESETS, preset_config
from worker.cuda_graphs import DecodeGraphs
from worker.model import Span, Stage, StagePlan


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
    spans = [Span(slot, context - 1 - (slot * 7) % 64, 1) for slot in range(batch)]
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


def top_kernels(stage: Stage, batch: int, context: int, count: int = 8) -> list[dict[str, Any]]:
    """The costliest kernels of eager decode steps (same kernels as the graph replays)."""
    spans = [Span(slot, context - 1 - (slot * 7) % 64, 1) for slot in range(batch)]
    x = inputs(stage, batch)
    for _ in range(2):
        stage(x, spans, list(range(batch)))
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(5):
            stage(x, spans, list(range(batch)))
        torch.cuda.synchronize()
    events = [e for e in profile.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    return [
        {"kernel": e.key[:90], "ms_per_step": e.device_time_total / 1000 / 5, "calls": e.count // 5}
        for e in events[:count]
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--head", action="store_true", help="the last layers and the lm_head")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--variants", default="graph,compiled")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    stage = build(args.preset, args.layers, args.head, max(batches), args.context + 64)
    nbytes = weight_bytes(stage)
    result: dict[str, Any] = {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name()}
    result |= {"weight_bytes": nbytes, "layers": args.layers, "head": args.head, "steps": {}}
    for variant in args.variants.split(","):
        # one DecodeGraphs for every batch, as a worker has: compilations and captures add up
        graphs = DecodeGraphs(stage, compile=variant == "compiled")
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
            if variant == "graph":
                with torch.inference_mode():
                    kernels = top_kernels(stage, batch, args.context)
                result["steps"][f"{variant}/b{batch}"]["kernels"] = kernels
                for kernel in kernels:
                    print(
                        f"    {kernel['ms_per_step']:7.3f} ms x{kernel['calls']:3d} {kernel['kernel']}"
                    )
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

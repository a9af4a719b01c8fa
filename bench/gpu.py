"""GPU benchmark: an 8B-class model through a 2-stage QUIC pipeline on one GPU, with its anchors.

    python -m bench.gpu --preset llama3-8b

Writes a random-weight model with the preset's shapes (unless --model), starts `meshpipe auto`
(gateway + 2 worker processes on the GPU, bf16, linked by QUIC on loopback) and measures:
single-stream decode tok/s, aggregate tok/s at 16 and 64 concurrent streams, and the TTFT of a
1024-token prompt. In the same run it measures the anchors: `transformers` generate on the same
weights at batch 1 and 64 (static cache), and the bandwidth roofline (weight bytes over the
measured device-to-device copy bandwidth). Results go to bench/results/ as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import shlex
import shutil
import socket
import statistics
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.environment import free_port
from bench.serving import Prompt, stream_request, summarize
from meshpipe import trace
from meshpipe.models.synth import synth
from worker import step_profile

RESULTS = Path(__file__).resolve().parent / "results"


def copy_bandwidth(gib: int = 2, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    source = torch.empty(gib << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / repeats
    del source, target
    torch.cuda.empty_cache()
    return 2 * (gib << 30) / seconds


def weight_bytes(model_dir: Path) -> int:
    return sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))


def start_cluster(
    model_dir: Path,
    slots: int,
    in_flight: int,
    busy_poll_ms: float | None,
    token_loop: bool,
    log: Path,
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "meshpipe",
        "auto",
        "--model",
        str(model_dir),
        "--stages",
        "2",
        "--device",
        "cuda",
        "--dtype",
        "bfloat16",
        "--slots",
        str(slots),
        "--max-seq-len",
        "2048",
        "--max-batch-tokens",
        "2048",
        "--max-in-flight",
        str(in_flight),
        "--port",
        str(port),
        "--mesh-port",
        str(free_port(socket.SOCK_DGRAM)),
    ]
    command += [] if busy_poll_ms is None else [f"--busy-poll-ms={busy_poll_ms:g}"]
    command += [] if token_loop else ["--no-token-loop"]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while "meshpipe is ready" not in (text := log.read_text()):
        failed = "could not load its layers" in text
        if failed or process.poll() is not None or time.monotonic() > deadline:
            process.terminate()
            raise SystemExit(f"cluster failed:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    return process, f"http://127.0.0.1:{port}"


async def level(url: str, model: str, prompts: list[Prompt], concurrency: int, tokens: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()

        async def one(prompt: Prompt):
            async with gate:
                return await stream_request(client, model, prompt, tokens)

        results = await asyncio.gather(*(one(p) for p in prompts))
        figures = summarize(list(results), concurrency, time.perf_counter() - started)
    del figures["per_request"]
    return figures


def letter_prompts(count: int, length: int, seed: int) -> list[Prompt]:
    """Prompts of about `length` tokens for the synthetic byte-level tokenizer (a byte each)."""
    rng = random.Random(seed)
    alphabet = string.ascii_lowercase + " "
    return [Prompt("".join(rng.choice(alphabet) for _ in range(length))) for _ in range(count)]


def stage_totals(url: str) -> dict[str, tuple[float, float]]:
    """Per stage: (seconds of compute, micro-batches) so far, from the gateway's metrics."""
    totals: dict[str, list[float]] = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        for index, suffix in enumerate(("_sum", "_count")):
            if line.startswith(f"meshpipe_stage_step_seconds{suffix}{{"):
                stage = line.split('stage="')[1].split('"')[0]
                totals.setdefault(stage, [0.0, 0.0])[index] = float(line.rsplit(" ", 1)[1])
    return {stage: (value[0], value[1]) for stage, value in totals.items()}


def status_stages(url: str) -> list[dict[str, Any]]:
    return httpx.get(f"{url}/api/status").json()["stages"]


def loop_figures(stages: list[dict[str, Any]]) -> dict[str, int]:
    """The first stage's token-loop counts so far: steps run on fed tokens, feeds that came
    before the gateway's step (the gateway, not the pipeline, was the late one), and steps
    armed on the GPU before their feed (started by it, or cancelled)."""
    names = ("fed_steps", "feeds_ahead", "armed_steps", "armed_cancelled")
    return {name: stages[0][name] for name in names}


def host_ms(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, Any]:
    """Per stage, the mean host time of a step over a level: waiting to start (the queue and
    the parse), and handing the result to the link; and the mean GPU time of a decode step
    replayed from its CUDA graph (`device`: the step's wall time less this is host time)."""
    figures: dict[str, Any] = {}
    if len(before) != len(after):  # planned again during the level: no per-stage figures
        return figures
    for stage, (old, new) in enumerate(zip(before, after, strict=True)):
        if steps := new["steps"] - old["steps"]:
            figures[str(stage)] = {
                part: round(1000 * (new[f"{part}_seconds"] - old[f"{part}_seconds"]) / steps, 3)
                for part in ("wait", "send")
            }
            if replays := new["replays"] - old["replays"]:
                seconds = new["replay_device_seconds"] - old["replay_device_seconds"]
                figures[str(stage)]["device"] = round(1000 * seconds / replays, 3)
    return figures


def measured(url: str, model: str, prompts: list[Prompt], concurrency: int, tokens: int) -> dict:
    """A level's figures, with the mean compute time of a micro-batch on each stage: what is
    left of the inter-token latency after them is transport, scheduling and HTTP."""
    time.sleep(0.6)  # the stages' figures reach the gateway with their heartbeats
    before, stages_before = stage_totals(url), status_stages(url)
    figures = asyncio.run(level(url, model, prompts, concurrency, tokens))
    after = stage_totals(url)
    time.sleep(0.6)
    stages_after = status_stages(url)
    loop_before = loop_figures(stages_before)
    figures["steps_before"] = [stage["steps"] for stage in stages_before]  # for --profile-steps
    figures["token_loop"] = {
        key: value - loop_before[key] for key, value in loop_figures(stages_after).items()
    }
    figures["stage_host_ms"] = host_ms(stages_before, stages_after)
    if len(stages_before) == len(stages_after):  # each stage's steps armed, and cancelled
        figures["armed_by_stage"] = {
            str(stage): [new[name] - old[name] for name in ("armed_steps", "armed_cancelled")]
            for stage, (old, new) in enumerate(zip(stages_before, stages_after, strict=True))
        }
    figures["stage_step_ms"] = {
        stage: round(1000 * (seconds - before.get(stage, (0, 0))[0]) / batches, 3)
        for stage, (seconds, count) in after.items()
        if (batches := count - before.get(stage, (0, 0))[1])
    }
    return figures


def serve_figures(url: str, model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    short = letter_prompts(64, 32, seed=1)
    for concurrency in (1, 16, 64):  # warm-up: captures the CUDA graphs of each batch size
        asyncio.run(level(url, model, short[:concurrency], concurrency, 8))
    begun = time.perf_counter_ns()  # the clock of meshpipe.trace's marks
    figures = {"single_stream": measured(url, model, short[:1], 1, args.single_tokens)}
    figures["single_stream"]["window_ns"] = [begun, time.perf_counter_ns()]
    if args.single_only:
        return figures
    figures["concurrent_16"] = measured(url, model, short[:16], 16, args.tokens)
    figures["concurrent_64"] = measured(url, model, short[:64], 64, args.tokens)
    long = letter_prompts(3, 1024 - 12, seed=2)  # the chat template adds about 12
    ttfts = [asyncio.run(level(url, model, [p], 1, 1))["ttft_ms"]["p50"] for p in long]
    figures["ttft_1024_ms"] = {"runs": ttfts, "median": statistics.median(ttfts)}
    return figures


def step_profiles(stages: int, timeout: float = 30.0) -> dict[str, Any]:
    """The workers' profiles of their steps (MESHPIPE_PROFILE_STEPS), by node id: each is
    written on a thread of its worker once its window ends, so wait a while for them."""
    deadline = time.monotonic() + timeout
    while len(paths := sorted(step_profile.profile_dir().glob("*.json"))) < stages:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return {path.stem: json.loads(path.read_text()) for path in paths}


def loop_parts(directory: Path, window: list[int]) -> dict[str, Any]:
    """The single stream's token loop part by part (meshpipe.trace.segments), over the steps
    that stage 1 completed inside the level's window, and the stages' send calls."""
    processes = trace.load(directory)
    done = sorted(
        (ns, batch_id)
        for (what, batch_id), ns in processes.get("stage1", {}).items()
        if what == "done" and window[0] <= ns <= window[1]
    )
    batches = [batch_id for _, batch_id in done]
    parts = trace.segments(processes, batches)
    parts["sum_p50_us"] = round(sum(part["p50_us"] for part in parts.values()), 1)
    return parts | {"of which": trace.segments(processes, batches, trace.SEND_CALLS)}


def hf_anchor(model_dir: Path, tokens: int) -> dict[str, Any]:
    """transformers generate on the same weights: batch 1 and 64, greedy, static cache."""
    import transformers
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    figures: dict[str, Any] = {"transformers": transformers.__version__}
    # Batch 1 with the default (dynamic) cache; batch 64 with a static cache, which
    # transformers compiles: the warm-up uses the same lengths, so timing excludes compilation.
    for batch, cache in ((1, "dynamic"), (64, "static")):
        ids = torch.randint(2, 1000, (batch, 32), device="cuda")
        kwargs = {
            "max_new_tokens": tokens,
            "min_new_tokens": tokens,
            "do_sample": False,
            "pad_token_id": 1,
            "attention_mask": torch.ones_like(ids),
        }
        if cache == "static":
            kwargs["cache_implementation"] = "static"
        model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        rate = batch * tokens / (time.perf_counter() - started)
        figures[f"batch_{batch}_tok_s"] = round(rate, 1)
        figures[f"batch_{batch}_cache"] = cache
    del model
    torch.cuda.empty_cache()
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.gpu", description=__doc__)
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--model", default=None, help="an existing model dir instead of synth")
    parser.add_argument("--tokens", type=int, default=128, help="output tokens per stream")
    parser.add_argument("--single-tokens", type=int, default=256)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--skip-hf", action="store_true")
    # Both stages share one GPU here: a second micro-batch in flight reads every weight again
    # without adding compute, so one batch at a time is the better use of a single device.
    parser.add_argument("--max-in-flight", type=int, default=1)
    parser.add_argument(
        "--busy-poll-ms", type=float, default=None, help="every process (default: auto's, 20)"
    )
    parser.add_argument(
        "--token-loop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the last stage feeds its tokens straight to the first (default: on)",
    )
    parser.add_argument("--single-only", action="store_true", help="the single stream alone")
    parser.add_argument(
        "--profile-steps",
        metavar="FIRST,COUNT",
        help="profile each worker's steps FIRST+1..FIRST+COUNT where they run "
        "(worker/step_profile.py; a level's steps_before gives the stages' counts at its start)",
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="the single stream's token loop, part by part, from marks the processes make "
        "(meshpipe/trace.py)",
    )
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("MESHPIPE_HOME", "/tmp/meshpipe-gpu-bench")
    started = time.perf_counter()
    model_dir = Path(args.model) if args.model else synth(args.preset, device="cuda")
    print(f"model ready in {time.perf_counter() - started:.0f}s: {model_dir}", flush=True)
    bandwidth = copy_bandwidth()
    weights = weight_bytes(model_dir)
    log = Path(os.environ["MESHPIPE_HOME"]) / "cluster.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if args.profile_steps:
        os.environ[step_profile.ENVIRONMENT] = args.profile_steps
        for old in step_profile.profile_dir().glob("*.json"):
            old.unlink()
    trace_dir = Path(os.environ["MESHPIPE_HOME"]) / "trace"
    if args.trace:
        shutil.rmtree(trace_dir, ignore_errors=True)
        os.environ[trace.ENVIRONMENT] = str(trace_dir)
    process, url = start_cluster(
        model_dir, args.slots, args.max_in_flight, args.busy_poll_ms, args.token_loop, log
    )
    try:
        ours = serve_figures(url, model_dir, args)
        if args.profile_steps:
            ours["step_profiles"] = step_profiles(len(status_stages(url)))
    finally:
        process.terminate()
        process.wait(60)
    window = ours["single_stream"].pop("window_ns")
    if args.trace:
        ours["single_stream"]["loop_us"] = loop_parts(trace_dir, window)
    report = {
        "command": shlex.join([sys.executable, "-m", "bench.gpu", *(argv or sys.argv[1:])]),
        # switches that change what runs (MESHPIPE_ARMED_STEPS, MESHPIPE_SILU_MUL, ...)
        "environment": {
            key: value
            for key, value in os.environ.items()
            if key.startswith("MESHPIPE_") and key != "MESHPIPE_HOME"
        },
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": str(model_dir),
        "synthetic": json.loads((model_dir / "config.json").read_text()).get("meshpipe_synthetic"),
        "weight_bytes": weights,
        "copy_bandwidth_bytes_s": round(bandwidth),
        "roofline_single_stream_tok_s": round(bandwidth / weights, 1),
        "busy_poll_ms": args.busy_poll_ms,
        "token_loop": args.token_loop,
        "meshpipe": ours,
    }
    path = Path(args.output) if args.output else RESULTS / f"gpu-{report['date'][:10]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, report)  # before the anchors too: a run cut short keeps meshpipe's figures
    if not args.skip_hf:
        report["transformers"] = hf_anchor(model_dir, args.tokens)
        write(path, report)
    print(f"wrote {path}")


def write(path: Path, report: dict[str, Any]) -> None:
    report["ratios"] = ratios(report)
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["ratios"], indent=2), flush=True)


def ratios(report: dict[str, Any]) -> dict[str, Any]:
    ours = report["meshpipe"]
    single = ours["single_stream"]["stream_decode_tok_s_mean"] or 0.0
    result = {
        "single_stream_tok_s": single,
        "single_stream_vs_roofline": round(single / report["roofline_single_stream_tok_s"], 3),
    }
    if "concurrent_64" not in ours:  # --single-only
        return result
    result["aggregate_16_tok_s"] = ours["concurrent_16"]["output_tok_s"]
    result["aggregate_64_tok_s"] = ours["concurrent_64"]["output_tok_s"]
    if "transformers" in report:
        hf = report["transformers"]
        result["single_stream_vs_hf_batch_1"] = round(single / hf["batch_1_tok_s"], 2)
        result["aggregate_64_vs_hf_batch_64"] = round(
            ours["concurrent_64"]["output_tok_s"] / hf["batch_64_tok_s"], 2
        )
    return result


if __name__ == "__main__":
    main()

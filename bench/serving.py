"""`meshpipe bench serving`: an OpenAI-API load generator in the spirit of vLLM's benchmark_serving.

Concurrent streaming clients (optionally with Poisson arrivals) send synthetic prompts of an exact
token length and measure on the client side: time to first token (TTFT), inter-token latency (ITL),
output tokens per second, requests per second. `--anchor hf` runs `transformers` generate on the
same weights in the same run, so the figures come with ratios to a reference taken on the same
machine at the same time. Results go to a JSON file together with the exact command.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import random
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from bench.environment import (
    machine,
    resolve_model_dir,
    server_info,
    source_revision,
    started_cluster,
)

if TYPE_CHECKING:
    from bench.hf_anchor import HFAnchor

DEFAULT_URL = "http://127.0.0.1:9337"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# An instruction that invites a long answer, so that few requests stop (EOS) before max_tokens.
INSTRUCTION = "Write a long story that uses all of these words:"
SYLLABLES = ("ka", "lo", "mi", "ter", "san", "vu", "dor", "pe", "ril", "no", "ba", "gen")


@dataclass(frozen=True)
class BenchSettings:
    """Everything one benchmark run needs, built from the command line."""

    url: str
    model: str | None
    model_dir: str | None
    concurrency: tuple[int, ...]
    requests: int
    prompt_tokens: int
    output_tokens: int
    request_rate: float
    seed: int
    output: Path
    start_cluster: bool
    stages: int
    slots: int
    anchor: str | None
    anchor_requests: int
    anchor_threads: tuple[int, ...]
    warmup: int
    timeout: float
    command: str


@dataclass(frozen=True)
class Prompt:
    """One synthetic user message; `ids` is its chat-encoded form when the tokenizer is known."""

    text: str
    ids: tuple[int, ...] = ()


@dataclass
class RequestResult:
    """What one client saw of one streamed completion (times in seconds)."""

    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    chunks: int = 0
    start: float = 0.0
    ttft: float = math.nan
    latency: float = math.nan
    itl: list[float] = field(default_factory=list)


def _counts(value: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        levels = ()
    if not levels or min(levels) < 0:
        raise argparse.ArgumentTypeError(f"expected N or a list like 1,4,16; got {value!r}")
    return levels


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshpipe bench serving", description=__doc__)
    p.add_argument("--url", default=DEFAULT_URL, help="the gateway (ignored with --start-cluster)")
    p.add_argument("--model", default=None, help="model to ask for (default: first of /v1/models)")
    p.add_argument("--model-dir", default=None, help="local model dir or catalog name (tokenizer)")
    p.add_argument("--concurrency", type=_counts, default=(1,), help="N or a sweep: 1,4,16")
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=32, help="max_tokens of every request")
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="JSON results path")
    p.add_argument("--start-cluster", action="store_true", help="run `meshpipe auto` for the run")
    p.add_argument("--stages", type=int, default=2, help="stages of the started cluster")
    p.add_argument("--slots", type=int, default=0, help="slots of the started cluster (0: auto)")
    p.add_argument("--anchor", choices=["hf"], default=None, help="also run transformers")
    p.add_argument("--anchor-requests", type=int, default=6, help="prompts the anchor generates")
    p.add_argument(
        "--anchor-threads", type=_counts, default=(1, 0), help="torch threads to try (0: default)"
    )
    p.add_argument("--warmup", type=int, default=1, help="uncounted requests before the sweep")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    return p


def settings_from(argv: list[str]) -> BenchSettings:
    """Settings from `meshpipe bench serving` arguments (option names are the field names)."""
    cli = parser()
    args = vars(cli.parse_args(argv))
    if min(args["concurrency"]) < 1:
        cli.error("--concurrency must be at least 1")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return BenchSettings(
        **args
        | {
            "url": args["url"].rstrip("/"),
            "output": args["output"] or RESULTS_DIR / f"serving-{stamp}.json",
            "slots": args["slots"] or max(8, *args["concurrency"]),
            "command": shlex.join(["meshpipe", "bench", "serving", *argv]),
        }
    )


def vocabulary_words(tokenizer: Any) -> list[str]:
    """Plain lowercase words that are single tokens when preceded by a space (byte-level BPE)."""
    words = []
    for piece in tokenizer.get_vocab():
        word = piece[1:]
        if piece.startswith("\u0120") and 3 <= len(word) <= 10 and word.isascii():
            if word.isalpha() and word.islower():
                words.append(word)
    return sorted(words)


def exact_prompt(chat: Any, words: list[str], rng: random.Random, length: int) -> Prompt:
    """A user message whose chat-encoded form has `length` tokens (or the nearest reachable)."""

    def encoded(chosen: list[str]) -> list[int]:
        text = " ".join([INSTRUCTION, *chosen])
        return chat.encode_chat([{"role": "user", "content": text}])

    base = len(encoded([]))
    pool = [rng.choice(words) for _ in range(max(0, length - base) + 16)]
    count = max(0, length - base)
    ids = encoded(pool[:count])
    for _ in range(16):  # words at boundaries rarely merge; a few corrections reach the length
        if len(ids) == length or (count == 0 and len(ids) > length):
            break
        count = max(0, min(len(pool), count + length - len(ids)))
        ids = encoded(pool[:count])
    return Prompt(" ".join([INSTRUCTION, *pool[:count]]), tuple(ids))


def word_prompt(rng: random.Random, length: int) -> Prompt:
    """Without a tokenizer: made-up words, about two tokens each; usage reports the real count."""
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(length // 2)]
    return Prompt(" ".join([INSTRUCTION, *words]))


def build_prompts(model_dir: Path | None, count: int, length: int, seed: int) -> list[Prompt]:
    """Deterministic prompts (same seed, same prompts), a different one for every request."""
    rng = random.Random(seed)
    if model_dir is None:
        return [word_prompt(rng, length) for _ in range(count)]
    from gateway.text import ChatFormat

    chat = ChatFormat(model_dir)
    words = vocabulary_words(chat.tokenizer)
    prompts = [exact_prompt(chat, words, rng, length) for _ in range(count)]
    if lengths := sorted({len(prompt.ids) for prompt in prompts} - {length}):
        print(
            f"note: prompts of {lengths} tokens: the chat template alone needs more than {length}"
        )
    return prompts


def request_body(model: str, prompt: Prompt, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt.text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def _record_chunk(result: RequestResult, chunk: dict[str, Any], now: float, last: float) -> float:
    """Update `result` from one SSE chunk; returns the time of the latest content chunk."""
    if "error" in chunk:
        result.error = chunk["error"].get("message", "error in stream")
    if usage := chunk.get("usage"):
        result.prompt_tokens = usage["prompt_tokens"]
        result.completion_tokens = usage["completion_tokens"]
    for choice in chunk.get("choices", []):
        if choice.get("delta", {}).get("content"):
            result.chunks += 1
            if math.isnan(result.ttft):
                result.ttft = now - result.start
            else:
                result.itl.append(now - last)
            last = now
    return last


async def stream_request(
    client: httpx.AsyncClient, model: str, prompt: Prompt, max_tokens: int
) -> RequestResult:
    """POST one streaming chat completion and time every content chunk as it arrives."""
    result = RequestResult(start=time.perf_counter())
    last, done = result.start, False
    try:
        body = request_body(model, prompt, max_tokens)
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return RequestResult(error=f"HTTP {response.status_code}: {response.text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                last = _record_chunk(result, json.loads(payload), time.perf_counter(), last)
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        result.error = f"{type(error).__name__}: {error}"
    result.latency = time.perf_counter() - result.start
    if not result.error and not (done and result.completion_tokens):
        result.error = "stream ended without [DONE] and usage"
    result.ok = not result.error
    return result


def arrival_offsets(count: int, rate: float, rng: random.Random) -> list[float]:
    """Seconds after the start at which each request is sent: all at once, or a Poisson process."""
    if math.isinf(rate):
        return [0.0] * count
    offsets, now = [], 0.0
    for _ in range(count):
        now += rng.expovariate(rate)
        offsets.append(now)
    return offsets


async def run_level(
    settings: BenchSettings, url: str, model: str, prompts: list[Prompt], concurrency: int
) -> tuple[list[RequestResult], float]:
    """All prompts through at most `concurrency` clients at once; returns results and wall time."""
    rng = random.Random(settings.seed + concurrency)
    offsets = arrival_offsets(len(prompts), settings.request_rate, rng)
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=settings.timeout, limits=limits) as client:
        started = time.perf_counter()

        async def one(prompt: Prompt, offset: float) -> RequestResult:
            await asyncio.sleep(max(0.0, started + offset - time.perf_counter()))
            async with gate:
                return await stream_request(client, model, prompt, settings.output_tokens)

        results = await asyncio.gather(*(one(p, o) for p, o in zip(prompts, offsets, strict=True)))
        return list(results), time.perf_counter() - started


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    """p50, p99, mean and max of `values` in ms (None when there are none): a single stall
    shows in the mean and the max, not in the percentiles."""
    if not values:
        return {"p50": None, "p99": None, "mean": None, "max": None}
    array = np.asarray(values) * scale
    return {
        "p50": round(float(np.percentile(array, 50)), 3),
        "p99": round(float(np.percentile(array, 99)), 3),
        "mean": round(float(array.mean()), 3),
        "max": round(float(array.max()), 3),
    }


def _decode_rate(result: RequestResult) -> float | None:
    """Tokens per second after the first token: the stream's own decode speed."""
    if result.completion_tokens < 2 or result.latency <= result.ttft:
        return None
    return (result.completion_tokens - 1) / (result.latency - result.ttft)


def summarize(results: list[RequestResult], concurrency: int, duration: float) -> dict[str, Any]:
    """One concurrency level's figures, as written to JSON and printed."""
    done = [r for r in results if r.ok]
    output_tokens = sum(r.completion_tokens for r in done)
    rates = [rate for r in done if (rate := _decode_rate(r)) is not None]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(done),
        "errors": len(results) - len(done),
        "error_messages": sorted({r.error for r in results if r.error})[:5],
        "duration_s": round(duration, 3),
        "requests_per_s": round(len(done) / duration, 3),
        "output_tokens": output_tokens,
        "output_tok_s": round(output_tokens / duration, 2),
        "prompt_tokens_mean": round(float(np.mean([r.prompt_tokens for r in done] or [0])), 2),
        "output_tokens_mean": round(output_tokens / max(1, len(done)), 2),
        "stream_decode_tok_s_mean": round(float(np.mean(rates)), 2) if rates else None,
        "ttft_ms": percentiles([r.ttft for r in done]),
        "itl_ms": percentiles([gap for r in done for gap in r.itl]),
        "latency_ms": percentiles([r.latency for r in done]),
        "per_request": [
            {key: getattr(r, key) for key in ("ok", "error", "prompt_tokens", "completion_tokens")}
            | {"chunks": r.chunks, "ttft_s": _round(r.ttft), "latency_s": _round(r.latency)}
            for r in results
        ],
    }


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 4)


def ratios(levels: list[dict[str, Any]], anchor: dict[str, Any] | None) -> dict[str, Any]:
    """Our figures over the anchor's, and every level's aggregate over the single stream's."""
    single = next((level for level in levels if level["concurrency"] == 1), None)
    out: dict[str, Any] = {}
    if single:
        out["aggregate_over_single_stream"] = {
            str(level["concurrency"]): round(level["output_tok_s"] / single["output_tok_s"], 2)
            for level in levels
            if single["output_tok_s"]
        }
    if anchor:
        out["aggregate_over_hf"] = {
            str(level["concurrency"]): round(level["output_tok_s"] / anchor["tok_s"], 2)
            for level in levels
        }
        if single:
            out["single_stream_over_hf"] = round(single["output_tok_s"] / anchor["tok_s"], 2)
            ours = single["stream_decode_tok_s_mean"]
            if ours:
                out["single_stream_decode_over_hf"] = round(ours / anchor["decode_tok_s"], 2)
    return out


async def sweep(
    settings: BenchSettings, url: str, model: str, prompts: list[Prompt]
) -> list[dict[str, Any]]:
    """Warm-up, then every concurrency level in turn."""
    async with httpx.AsyncClient(base_url=url, timeout=settings.timeout) as client:
        for prompt in prompts[: settings.warmup]:
            result = await stream_request(client, model, prompt, settings.output_tokens)
            if not result.ok:
                raise SystemExit(f"error: the warm-up request failed: {result.error}")
    levels = []
    for concurrency in settings.concurrency:
        started_at = _now()
        results, duration = await run_level(settings, url, model, prompts, concurrency)
        level = summarize(results, concurrency, duration)
        level["started_at"], level["finished_at"] = started_at, _now()
        levels.append(level)
        print(
            f"  concurrency {concurrency:>3}: {level['output_tok_s']:8.1f} output tok/s", flush=True
        )
    return levels


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def run(settings: BenchSettings) -> dict[str, Any]:
    """The whole benchmark: the cluster (if asked), the sweep between two anchor rounds."""
    started_at, host = _now(), machine()
    spec = settings.model if settings.start_cluster else None
    with _cluster_or_url(settings, spec) as url:
        server = server_info(url, None if settings.start_cluster else settings.model)
        model_dir = resolve_model_dir(settings.model_dir or spec or server["model"])
        prompts = build_prompts(model_dir, settings.requests, settings.prompt_tokens, settings.seed)
        anchor = _anchor(settings, model_dir)
        anchor_prompts = prompts[: settings.anchor_requests]
        half = len(anchor_prompts) // 2
        if anchor:
            anchor.measure(anchor_prompts[:half])
        print(f"benchmarking {server['model']!r} at {url} ({len(server['stages'])} stages)")
        levels = asyncio.run(sweep(settings, url, server["model"], prompts))
        server["stages_after"] = server_info(url, server["model"])["stages"]
    if server["stages_after"] != server["stages"]:
        print("warning: the pipeline changed during the run (see stages_after)", file=sys.stderr)
    if anchor:
        anchor.measure(anchor_prompts[half:])
    summary = anchor.summary() if anchor else None
    server |= {"model_dir": str(model_dir) if model_dir else None}
    server |= {"started_cluster": settings.start_cluster}
    return {
        "benchmark": "serving",
        "command": settings.command,
        "started_at": started_at,
        "finished_at": _now(),
        "machine": host | {"load_average_at_end": [round(v, 2) for v in os.getloadavg()]},
        "source": source_revision(),
        "server": server,
        "argv": sys.argv,
        "settings": _settings_json(settings),
        "levels": levels,
        "anchor": summary,
        "ratios": ratios(levels, summary),
    }


def _anchor(settings: BenchSettings, model_dir: Path | None) -> HFAnchor | None:
    if settings.anchor != "hf":
        return None
    if model_dir is None:
        raise SystemExit("error: --anchor hf needs the model locally (--model-dir)")
    from bench.hf_anchor import HFAnchor  # transformers, a test-only dependency: on demand

    return HFAnchor(model_dir, settings.output_tokens, settings.anchor_threads)


def _settings_json(settings: BenchSettings) -> dict[str, Any]:
    """The settings as strict JSON (an infinite request rate is written "inf")."""
    values = {k: v for k, v in asdict(settings).items() if k not in ("command", "output")}
    return values | {"request_rate": str(settings.request_rate)}


@contextmanager
def _cluster_or_url(settings: BenchSettings, spec: str | None) -> Iterator[str]:
    if not settings.start_cluster:
        yield settings.url
        return
    from meshpipe.models.catalog import DEFAULT_MODEL

    print(f"starting `meshpipe auto` with {settings.stages} stages", flush=True)
    with started_cluster(spec or DEFAULT_MODEL, settings.stages, settings.slots) as url:
        yield url


def _ms(figures: dict[str, float | None], key: str) -> str:
    value = figures[key]
    return "-" if value is None else f"{value:.1f}"


def table(report: dict[str, Any]) -> str:
    """A Markdown table: one row per concurrency level, then the anchor and the ratios."""
    over_hf = report["ratios"].get("aggregate_over_hf", {})
    over_single = report["ratios"].get("aggregate_over_single_stream", {})
    lines = [
        "| conc | reqs | errors | req/s | out tok/s | x c=1 | x HF | TTFT p50 | TTFT p99 "
        "| ITL p50 | ITL p99 | out tok/req |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in report["levels"]:
        key = str(level["concurrency"])
        ttft, itl = level["ttft_ms"], level["itl_ms"]
        lines.append(
            f"| {key} | {level['requests']} | {level['errors']} | {level['requests_per_s']:.2f} "
            f"| {level['output_tok_s']:.1f} | {over_single.get(key, '-')} | {over_hf.get(key, '-')} "
            f"| {_ms(ttft, 'p50')} | {_ms(ttft, 'p99')} | {_ms(itl, 'p50')} | {_ms(itl, 'p99')} "
            f"| {level['output_tokens_mean']} |"
        )
    return "\n".join(lines)


def anchor_lines(report: dict[str, Any]) -> list[str]:
    anchor, found = report["anchor"], report["ratios"]
    if not anchor:
        return []
    tried = ", ".join(
        f"{count} threads {figures['tok_s']:.1f} tok/s (rounds {figures['tok_s_per_round']})"
        for count, figures in anchor["by_threads"].items()
    )
    return [
        f"anchor: {anchor['what']}: {tried}",
        f"anchor at its best ({anchor['torch_threads']} threads): {anchor['tok_s']:.1f} tok/s, "
        f"{anchor['decode_tok_s']:.1f} decode tok/s, TTFT p50 {_ms(anchor['ttft_ms'], 'p50')} ms, "
        f"ITL p50 {_ms(anchor['itl_ms'], 'p50')} ms",
        f"single stream / HF: {found.get('single_stream_over_hf', '-')} (output tok/s), "
        f"{found.get('single_stream_decode_over_hf', '-')} (decode tok/s)",
    ]


def main(argv: list[str]) -> None:
    """Entry point of `meshpipe bench [serving] ARGS`."""
    settings = settings_from(argv)
    report = run(settings)
    settings.output.parent.mkdir(parents=True, exist_ok=True)
    settings.output.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(f"command: {settings.command}")
    print(table(report))
    for line in anchor_lines(report):
        print(line)
    print(f"times in ms; results: {settings.output}")
    failed = sum(level["errors"] for level in report["levels"])
    if failed:
        print(f"warning: {failed} requests failed", file=sys.stderr)

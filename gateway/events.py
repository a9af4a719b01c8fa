"""The console's feeds: `GET /api/events` (the mesh and its figures, live, as SSE) and
`GET /api/models` (what is installed, what is served).

Every figure is read from objects the gateway already keeps: the mesh registry, the engine, and
the Prometheus counters. Rates are differences of cumulative counters over the last few seconds,
computed per connection, so the feed holds no state beyond the life of one client.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.metrics import Metrics
from meshpipe.models.catalog import installed
from meshpipe.quic import MeshConnection

if TYPE_CHECKING:
    from gateway.app import GatewayState

# A client gets an update at least this often, and within POLL_INTERVAL of a topology change.
UPDATE_INTERVAL = 1.0
POLL_INTERVAL = 0.2
# Rates are averaged over this many seconds: long enough to smooth batch arrival, short enough
# that a chart follows a burst.
RATE_WINDOW = 3.0


@dataclass(frozen=True)
class Counters:
    """Cumulative figures read at one moment."""

    at: float
    """`time.monotonic()` when they were read."""
    generated: float
    """Tokens sampled since the gateway started."""
    prompt: float
    """Prompt tokens admitted since the gateway started."""
    stage_tokens: dict[str, float]
    """Tokens each stage (by index) has run through its layers."""
    stage_seconds: dict[str, float]
    """Seconds each stage (by index) has spent computing."""


def _label_sums(histogram: Any) -> dict[str, float]:
    """The `_sum` sample of every `stage` label of a histogram."""
    sums: dict[str, float] = {}
    for family in histogram.collect():
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                sums[sample.labels["stage"]] = sample.value
    return sums


def read_counters(metrics: Metrics) -> Counters:
    """Read the counters the live figures are derived from."""
    value = metrics.registry.get_sample_value
    return Counters(
        at=time.monotonic(),
        generated=value("meshpipe_generation_tokens_total") or 0.0,
        prompt=value("meshpipe_prompt_tokens_total") or 0.0,
        stage_tokens=_label_sums(metrics.stage_batch_tokens),
        stage_seconds=_label_sums(metrics.stage_step),
    )


class RateMeter:
    """Rates of the counters over the last `window` seconds."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self.samples: deque[Counters] = deque()

    def update(self, now: Counters) -> dict[str, Any]:
        self.samples.append(now)
        while len(self.samples) > 2 and now.at - self.samples[1].at >= self.window:
            self.samples.popleft()
        first = self.samples[0]
        elapsed = now.at - first.at

        def rate(current: float, previous: float) -> float:
            return (current - previous) / elapsed if elapsed > 0 else 0.0

        stages = [
            {
                "stage": int(stage),
                "tokens_per_second": rate(tokens, first.stage_tokens.get(stage, 0.0)),
                "busy": rate(
                    now.stage_seconds.get(stage, 0.0), first.stage_seconds.get(stage, 0.0)
                ),
            }
            for stage, tokens in sorted(now.stage_tokens.items(), key=lambda item: int(item[0]))
        ]
        return {
            "generated_tokens_per_second": rate(now.generated, first.generated),
            "prompt_tokens_per_second": rate(now.prompt, first.prompt),
            "stages": stages,
            "generated_tokens": now.generated,
            "prompt_tokens": now.prompt,
        }


def link_rtt_ms(connection: MeshConnection) -> float | None:
    """The smoothed round-trip time of a QUIC connection, in ms, once one has been measured."""
    # aioquic keeps its RTT estimate in its loss recovery, without a public accessor.
    recovery = getattr(getattr(connection, "_quic", None), "_loss", None)
    if recovery is None or not getattr(recovery, "_rtt_initialized", False):
        return None
    return round(float(recovery._rtt_smoothed) * 1000, 3)


def topology(state: GatewayState) -> dict[str, Any]:
    """The mesh's status, each worker with the RTT of its link to the gateway."""
    mesh = state.mesh
    pipeline = mesh.status()
    rtts = {w.node_id: link_rtt_ms(w.connection) for w in list(mesh.workers.values())}
    for worker in pipeline["stages"] + pipeline["workers"]:
        worker["rtt_ms"] = rtts.get(worker["worker_id"])
    return pipeline


def snapshot(state: GatewayState, meter: RateMeter) -> dict[str, Any]:
    """Everything the console shows, at this moment."""
    return {
        "time": time.time(),
        "model": state.service.model_name,
        "uptime": time.time() - state.started,
        "pipeline": topology(state),
        "engine": state.service.engine.status(),
        "rates": meter.update(read_counters(state.metrics)),
    }


def _signature(body: dict[str, Any]) -> tuple:
    """What, when it changes, is worth an update before the next tick."""
    pipeline, engine = body["pipeline"], body["engine"]
    workers = tuple((w["worker_id"], str(w["layers"]), w["ready"]) for w in pipeline["workers"])
    running = tuple(r["id"] for r in engine["running"])
    return pipeline["ready"], pipeline["plan_id"], workers, running, engine["waiting"]


async def _updates(state: GatewayState) -> AsyncIterator[dict[str, str]]:
    meter = RateMeter()
    kind, previous, sent_at = "snapshot", None, 0.0
    while True:
        body = snapshot(state, meter)
        signature = _signature(body)
        if signature != previous or time.monotonic() - sent_at >= UPDATE_INTERVAL:
            yield {"event": kind, "data": json.dumps(body, separators=(",", ":"))}
            kind, previous, sent_at = "update", signature, time.monotonic()
        await asyncio.sleep(POLL_INTERVAL)


async def events(request: Request) -> Response:
    """`GET /api/events`: a snapshot on connect, then updates (SSE)."""
    return EventSourceResponse(_updates(request.app.state.gateway), ping=15)


def _installed_models(model_spec: str) -> list[dict[str, Any]]:
    served = Path(model_spec).resolve()
    return [
        model | {"path": str(model["path"]), "served": Path(model["path"]).resolve() == served}
        for model in installed()
    ]


async def models(request: Request) -> Response:
    """`GET /api/models`: the served model's shape, and every model installed here."""
    state: GatewayState = request.app.state.gateway
    config = state.mesh.config
    models = await asyncio.to_thread(_installed_models, state.mesh.model_spec)
    return JSONResponse(
        {
            "served": {
                "name": state.service.model_name,
                "path": state.mesh.model_spec,
                "model_type": config.model_type,
                "num_layers": config.num_layers,
                "hidden_size": config.hidden_size,
                "vocab_size": config.vocab_size,
                "max_seq_len": state.service.engine.settings.max_seq_len,
            },
            "installed": models,
        }
    )

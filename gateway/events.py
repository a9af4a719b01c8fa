"""The console's feeds: `GET /api/events` (the mesh and its figures, live, as SSE) and
`GET /api/models` (what is installed, what is served).

Every figure is read from objects the gateway already keeps: each served model's mesh registry
and engine (its cumulative `totals`). Rates are differences of those counters over the last few
seconds, computed per connection, so the feed holds no state beyond the life of one client.
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

from gateway.engine import Engine
from gateway.mesh import Mesh
from meshpipe.models.catalog import installed
from meshpipe.quic import MeshConnection

if TYPE_CHECKING:
    from gateway.app import GatewayState, ServedModel

# A client gets an update at least this often, and within POLL_INTERVAL of a topology change.
UPDATE_INTERVAL = 1.0
POLL_INTERVAL = 0.2
# Rates are averaged over this many seconds: long enough to smooth batch arrival, short enough
# that a chart follows a burst.
RATE_WINDOW = 3.0


@dataclass(frozen=True)
class Counters:
    """One engine's cumulative figures, read at one moment."""

    at: float
    """`time.monotonic()` when they were read."""
    prompt: int
    """Prompt tokens admitted since the gateway started."""
    generated: int
    """Tokens sampled since the gateway started."""
    stage_tokens: dict[int, int]
    """Tokens each stage (by index) has run through its layers."""
    stage_seconds: dict[int, float]
    """Seconds each stage (by index) has spent computing."""


def read_counters(engine: Engine) -> Counters:
    """Copy the engine's totals."""
    totals = engine.totals
    return Counters(
        at=time.monotonic(),
        prompt=totals.prompt_tokens,
        generated=totals.generated_tokens,
        stage_tokens=dict(totals.stage_tokens),
        stage_seconds=dict(totals.stage_seconds),
    )


class RateMeter:
    """Rates of one engine's counters over the last `window` seconds."""

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
                "stage": stage,
                "tokens_per_second": rate(tokens, first.stage_tokens.get(stage, 0)),
                "busy": rate(
                    now.stage_seconds.get(stage, 0.0), first.stage_seconds.get(stage, 0.0)
                ),
            }
            for stage, tokens in sorted(now.stage_tokens.items())
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
    # aioquic keeps its RTT estimate in its loss recovery, without a public accessor; it
    # never reads below 1 ms.
    recovery = getattr(getattr(connection, "_quic", None), "_loss", None)
    if recovery is None or not getattr(recovery, "_rtt_initialized", False):
        return None
    return round(float(recovery._rtt_smoothed) * 1000, 3)


def topology(mesh: Mesh) -> dict[str, Any]:
    """The mesh's status, each worker with `rtt_ms`, the RTT of its link to the gateway: the
    mesh's own ping measure (`rtt`, seconds) where it reports one, else QUIC's estimate."""
    pipeline = mesh.status()
    quic_rtts = {w.node_id: link_rtt_ms(w.connection) for w in list(mesh.workers.values())}
    for worker in pipeline["stages"] + pipeline["workers"]:
        if "rtt" in worker:
            rtt = worker["rtt"]
            worker["rtt_ms"] = None if rtt is None else round(rtt * 1000, 3)
        else:
            worker["rtt_ms"] = quic_rtts.get(worker["worker_id"])
    return pipeline


def model_snapshot(model: ServedModel, meter: RateMeter) -> dict[str, Any]:
    """One served model: its pipeline, its engine and its rates."""
    engine = model.service.engine
    return {
        "name": model.name,
        "pipeline": topology(model.mesh),
        "engine": engine.status(),
        "rates": meter.update(read_counters(engine)),
    }


def gateway_figures(models: list[dict[str, Any]]) -> dict[str, Any]:
    """The sums over every served model."""
    engines = [model["engine"] for model in models]
    return {
        "generated_tokens_per_second": sum(
            m["rates"]["generated_tokens_per_second"] for m in models
        ),
        "prompt_tokens_per_second": sum(m["rates"]["prompt_tokens_per_second"] for m in models),
        "running": sum(len(engine["running"]) for engine in engines),
        "waiting": sum(engine["waiting"] for engine in engines),
        "slots": sum(engine["slots"] for engine in engines),
        "slots_used": sum(engine["slots_used"] for engine in engines),
        "batches_in_flight": sum(engine["batches_in_flight"] for engine in engines),
    }


def snapshot(state: GatewayState, meters: dict[str, RateMeter]) -> dict[str, Any]:
    """Everything the console shows, at this moment."""
    models = [
        model_snapshot(model, meters.setdefault(name, RateMeter()))
        for name, model in state.models.items()
    ]
    return {
        "time": time.time(),
        "uptime": time.time() - state.started,
        "gateway": gateway_figures(models),
        "models": models,
    }


def _signature(body: dict[str, Any]) -> tuple:
    """What, when it changes, is worth an update before the next tick."""
    signature = []
    for model in body["models"]:
        pipeline, engine = model["pipeline"], model["engine"]
        workers = [(w["worker_id"], str(w["layers"]), w["ready"]) for w in pipeline["workers"]]
        running = [r["id"] for r in engine["running"]]
        signature.append((pipeline["ready"], pipeline["plan_id"], workers, running))
    return tuple(signature), body["gateway"]["waiting"]


async def _updates(state: GatewayState) -> AsyncIterator[dict[str, str]]:
    meters: dict[str, RateMeter] = {}
    kind, previous, sent_at = "snapshot", None, 0.0
    while True:
        body = snapshot(state, meters)
        signature = _signature(body)
        if signature != previous or time.monotonic() - sent_at >= UPDATE_INTERVAL:
            yield {"event": kind, "data": json.dumps(body, separators=(",", ":"))}
            kind, previous, sent_at = "update", signature, time.monotonic()
        await asyncio.sleep(POLL_INTERVAL)


async def events(request: Request) -> Response:
    """`GET /api/events`: a snapshot on connect, then updates (SSE)."""
    return EventSourceResponse(_updates(request.app.state.gateway), ping=15)


def _installed_models(served: list[str]) -> list[dict[str, Any]]:
    paths = {Path(path).resolve() for path in served}
    return [
        model | {"path": str(model["path"]), "served": Path(model["path"]).resolve() in paths}
        for model in installed()
    ]


def _describe(model: ServedModel) -> dict[str, Any]:
    config = model.mesh.config
    return {
        "name": model.name,
        "path": model.mesh.model_spec,
        "model_type": config.model_type,
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "max_seq_len": model.service.engine.settings.max_seq_len,
    }


async def models(request: Request) -> Response:
    """`GET /api/models`: every served model's shape, and every model installed here."""
    state: GatewayState = request.app.state.gateway
    served = list(state.models.values())
    paths = [model.mesh.model_spec for model in served]
    installed_models = await asyncio.to_thread(_installed_models, paths)
    return JSONResponse(
        {"served": [_describe(model) for model in served], "installed": installed_models}
    )

"""The gateway's side of the mesh: who is connected, the plan of stages, the route, failover.

Workers dial the gateway, prove the join token and REGISTER. Once enough have joined, the
gateway splits the model's layers over them in proportion to the memory each offers and ASSIGNs
every one its range and next hop; the rest wait as standbys. When all report READY the route is
live: batches go to the first stage over its connection, and the last stage sends sampled
tokens back over its own.

Workers send STATUS several times a second; one silent for `HEARTBEAT_TIMEOUT` is gone (one
still loading its layers, for `LOADING_HEARTBEAT_TIMEOUT`). When a
stage goes, the gateway rebuilds the route (a standby takes the lost range, or a new plan over
the workers left) and the engine replays every running sequence on it. Only when no route can
be built do streams end with an error and new requests get 503, until a worker joins.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.engine import Engine
from meshpipe.latency import LinkLatency
from meshpipe.models.config import ModelConfig
from meshpipe.quic import MeshConnection
from meshpipe.reach import Hop
from meshpipe.relay_link import link_kind
from meshpipe.wire import Frame, Kind

log = logging.getLogger(__name__)

# Workers report every 0.25 s: 1.5 s of silence is six missed reports (a SIGKILL is noticed in
# under 2 s), yet a worker starved of CPU on a loaded machine is not declared dead.
HEARTBEAT_TIMEOUT = 1.5
# A worker loading its layers can hold its event loop for seconds (Triton compiling the CUDA
# decode step holds the GIL): dropping it then makes it rejoin, be planned again and load twice.
# Until it is READY it has as long as the QUIC idle timeout, which also notices a dead one.
LOADING_HEARTBEAT_TIMEOUT = 30.0
MONITOR_INTERVAL = 0.2
# How long to wait for the planned number of workers before planning over fewer.
JOIN_GRACE_SECONDS = 5.0


@dataclass(eq=False)
class WorkerInfo:
    """A connected worker, as it described itself."""

    node_id: str
    connection: MeshConnection
    host: str
    port: int
    pid: int
    device: str
    dtype: str
    memory: int
    models: list[str] = field(default_factory=list)
    joined_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    layers: tuple[int, int] | None = None
    ready: bool = False
    figures: dict[str, Any] = field(default_factory=dict)
    latency: LinkLatency = field(default_factory=LinkLatency)
    fingerprint: str = ""
    direct: bool = True
    relay: str = ""
    link: str = "direct"
    """How the link into this stage is carried: the gateway's for the first stage, else the
    one the previous stage dialed (as it reported in READY)."""

    def hop(self) -> Hop:
        """How the previous stage reaches this worker."""
        return Hop(self.node_id, self.host, self.port, self.fingerprint, self.direct, self.relay)

    def describe(self) -> dict[str, Any]:
        return {
            "worker_id": self.node_id,
            "address": f"{self.host}:{self.port}",
            "pid": self.pid,
            "device": self.device,
            "dtype": self.dtype,
            "memory": self.memory,
            "models": self.models,
            "layers": list(self.layers) if self.layers else None,
            "ready": self.ready,
            "role": "stage" if self.layers else "standby",
            "link": self.link,
            "rtt": self.latency.rtt,
            "next_rtt": self.figures.get("next_rtt"),
            "gateway_link": link_kind(self.connection),
            "relay": self.relay or None,
            "active_slots": self.figures.get("active_slots", 0),
            "steps": self.figures.get("steps", 0),
            "step_seconds": self.figures.get("step_seconds", 0.0),
            "wait_seconds": self.figures.get("wait_seconds", 0.0),
            "send_seconds": self.figures.get("send_seconds", 0.0),
            "replays": self.figures.get("replays", 0),
            "replay_device_seconds": self.figures.get("replay_device_seconds", 0.0),
            "fed_steps": self.figures.get("fed_steps", 0),
            "feeds_ahead": self.figures.get("feeds_ahead", 0),
            "armed_steps": self.figures.get("armed_steps", 0),
            "armed_cancelled": self.figures.get("armed_cancelled", 0),
            "last_seen": time.monotonic() - self.last_seen,
        }


def plan_layers(
    num_layers: int, memories: list[int], head_cost: float = 0.0
) -> list[tuple[int, int]]:
    """Contiguous layer ranges (at least one each), each worker's share of the work in proportion
    to its memory. The last stage's head (final norm and lm_head) counts as `head_cost` layers of
    work, so the stages take about equally long and none holds up the pipeline."""
    count = len(memories)
    assert 0 < count <= num_layers
    total = sum(memories)
    weights = [m / total for m in memories] if total else [1 / count] * count
    bounds, acc = [0], 0.0
    for index, weight in enumerate(weights[:-1]):
        acc += weight
        lowest = bounds[-1] + 1
        highest = num_layers - (count - index - 1)
        bounds.append(min(max(round(acc * (num_layers + head_cost)), lowest), highest))
    bounds.append(num_layers)
    return list(itertools.pairwise(bounds))


def head_cost(config: ModelConfig) -> float:
    """The work of the lm_head (a vocabulary-sized matrix) in units of one decoder layer."""
    return config.vocab_size * config.hidden_size / layer_parameters(config)


def layer_parameters(config: ModelConfig) -> int:
    hidden, heads_dim = config.hidden_size, config.num_heads * config.head_dim
    kv_dim = config.num_kv_heads * config.head_dim
    return hidden * (2 * heads_dim + 2 * kv_dim) + 3 * hidden * config.intermediate_size


def stage_bytes(
    config: ModelConfig, layers: tuple[int, int], slots: int, context: int, itemsize: int
) -> int:
    """Memory a stage needs: its layers' weights, its KV cache, and the embedding or head."""
    cache = 2 * slots * context * config.num_kv_heads * config.head_dim
    total = (layers[1] - layers[0]) * (layer_parameters(config) + cache)
    table = config.vocab_size * config.hidden_size
    total += table * ((layers[0] == 0) + (layers[1] == config.num_layers))
    return total * itemsize


class Mesh:
    """Registry, plan, route and failover for one model."""

    def __init__(
        self, engine: Engine, model_spec: str, config: ModelConfig, num_stages: int
    ) -> None:
        self.engine = engine
        self.model_spec = model_spec
        self.config = config
        self.num_stages = num_stages
        self.workers: dict[str, WorkerInfo] = {}
        self.route: list[WorkerInfo] = []
        self.plan_ids = itertools.count(1)
        self.plan_id = 0
        self.live = False
        # the last stage feeds its tokens straight to the first (it reported a link to it)
        self.token_loop = False
        self.first_join: float | None = None
        self.events: list[dict[str, Any]] = []
        # Told of every batch sent and the route it goes through (the contribution ledger).
        self.on_batch: Callable[[list[WorkerInfo], Frame], None] | None = None

    def shortfall(self) -> int:
        """How many more workers this mesh wants (negative: it has standbys)."""
        return self.num_stages - len(self.workers)

    # -- life ------------------------------------------------------------------------------

    async def monitor(self) -> None:
        """Declare silent workers gone, and plan once the join grace period has passed."""
        while True:
            await asyncio.sleep(MONITOR_INTERVAL)
            now = time.monotonic()
            for worker in list(self.workers.values()):
                loading = worker.layers is not None and not worker.ready
                limit = LOADING_HEARTBEAT_TIMEOUT if loading else HEARTBEAT_TIMEOUT
                if now - worker.last_seen > limit:
                    self._lost(worker, "missed its heartbeats")
                    with contextlib.suppress(Exception):
                        worker.connection.close()
                else:
                    worker.latency.ping(worker.connection)
            if not self.route:
                self._maybe_plan()

    def _record(self, kind: str, **details: Any) -> None:
        self.events.append({"time": time.time(), "event": kind, **details})
        del self.events[:-200]

    # -- frames ----------------------------------------------------------------------------

    def on_frame(self, connection: MeshConnection, frame: Frame) -> None:
        worker = self._worker_of(connection)
        if worker is not None:
            worker.last_seen = time.monotonic()
        if frame.kind == Kind.REGISTER:
            self._register(connection, frame.meta)
        elif frame.kind == Kind.STATUS and worker is not None:
            worker.figures = frame.meta
        elif frame.kind == Kind.HEARTBEAT and worker is not None:
            worker.latency.on_frame(frame)
        elif frame.kind == Kind.READY:
            self._ready(worker, frame.meta)
        elif frame.kind == Kind.TOKENS and frame.tensor is not None:
            self.engine.on_tokens(frame.message_id, frame.tensor, frame.meta)
        elif frame.kind == Kind.ERROR:
            self._error(worker, frame)

    def on_closed(self, connection: MeshConnection) -> None:
        worker = self._worker_of(connection)
        if worker is not None:
            self._lost(worker, "closed its connection")

    def _worker_of(self, connection: MeshConnection) -> WorkerInfo | None:
        node_id = connection.peer.get("node_id")
        worker = self.workers.get(node_id) if isinstance(node_id, str) else None
        return worker if worker is not None and worker.connection is connection else None

    def _register(self, connection: MeshConnection, meta: dict[str, Any]) -> None:
        node_id = str(connection.peer.get("node_id", ""))
        try:
            worker = WorkerInfo(
                node_id=node_id,
                connection=connection,
                host=str(meta["host"]),
                port=int(meta["port"]),
                pid=int(meta["pid"]),
                device=str(meta["device"]),
                dtype=str(meta["dtype"]),
                memory=int(meta["memory"]),
                models=[str(m) for m in meta.get("models", [])],
                fingerprint=str(meta.get("fingerprint") or ""),
                direct=bool(meta.get("direct", True)),
                relay=str(meta.get("relay") or ""),
            )
        except (KeyError, TypeError, ValueError):
            connection.send(
                Frame(Kind.ERROR, 0, {"code": "bad_register", "message": "bad REGISTER"})
            )
            return
        previous = self.workers.get(node_id)
        if previous is not None and previous.connection is not connection:
            self._lost(previous, "registered again")
        self.workers[node_id] = worker
        self.first_join = self.first_join or time.monotonic()
        log.info(
            "worker %s joined (%s, %s, %d MB)",
            node_id,
            worker.device,
            worker.dtype,
            worker.memory >> 20,
        )
        self._record("joined", worker=node_id)
        if self.route and len(self.route) < self.num_stages:
            self._replan(f"worker {node_id} joined")
        else:
            self._maybe_plan()

    def _ready(self, worker: WorkerInfo | None, meta: dict[str, Any]) -> None:
        if worker is None or meta.get("plan", {}).get("plan_id") != self.plan_id:
            return
        worker.ready = True
        self._note_links(worker, meta)
        if self.route and worker is self.route[-1]:
            self.token_loop = bool(meta.get("token_loop"))
        if self.route and all(w.ready for w in self.route):
            self.live = True
            log.info("pipeline ready: %s", self.describe_route())
            self._record("route_ready", route=self.describe_route())
            self.engine.on_pipeline_ready(self)

    def _note_links(self, worker: WorkerInfo, meta: dict[str, Any]) -> None:
        if worker not in self.route:
            return
        index = self.route.index(worker)
        if index == 0:
            worker.link = link_kind(worker.connection)
        if index + 1 < len(self.route):
            self.route[index + 1].link = (
                "relayed" if meta.get("next_link") == "relayed" else "direct"
            )

    def _error(self, worker: WorkerInfo | None, frame: Frame) -> None:
        message = str(frame.meta.get("message", "unknown error"))
        log.warning("error from %s: %s", worker.node_id if worker else "?", message)
        code = frame.meta.get("code")
        if frame.message_id:
            self.engine.on_batch_failed(frame.message_id, message)
        elif code == "assign_failed" and worker is not None:
            self._lost(worker, f"could not load its layers: {message}")
        elif code == "loop_lost" and self.route and worker is self.route[-1]:
            # steps waiting at the first stage for the last stage's tokens would never run
            self._replan("the last stage lost its token loop link")

    # -- planning and failover -------------------------------------------------------------

    def _lost(self, worker: WorkerInfo, reason: str) -> None:
        if self.workers.get(worker.node_id) is not worker:
            return
        log.warning("worker %s %s", worker.node_id, reason)
        self._record("left", worker=worker.node_id, reason=reason)
        del self.workers[worker.node_id]
        if worker in self.route:
            self._rebuild(worker, reason)

    def _rebuild(self, lost: WorkerInfo, reason: str) -> None:
        """Replace the lost stage with a standby, or plan anew over the workers left."""
        self.live = False
        self.engine.on_route_lost()
        standby = self._standby_for(lost.layers)
        if standby is not None:
            route = [standby if w is lost else w for w in self.route]
            standby.layers = lost.layers
            self._assign(route, [w.layers for w in route])
            return
        self.route = []
        if not self._maybe_plan(force=True):
            self.engine.on_pipeline_lost(f"worker {lost.node_id} {reason}, and no route is left")

    def _replan(self, reason: str) -> None:
        """Plan again over every worker (one joined a short route); sequences are replayed."""
        log.info("re-planning: %s", reason)
        self.live = False
        self.engine.on_route_lost()
        self.route = []
        self._maybe_plan(force=True)

    def _standby_for(self, layers: tuple[int, int] | None) -> WorkerInfo | None:
        if layers is None:
            return None
        for worker in sorted(self.workers.values(), key=lambda w: w.joined_at):
            if worker not in self.route and worker.memory >= self._need(layers):
                return worker
        return None

    def _need(self, layers: tuple[int, int]) -> int:
        settings = self.engine.settings
        return stage_bytes(self.config, layers, settings.num_slots, settings.max_seq_len, 4)

    def _maybe_plan(self, force: bool = False) -> bool:
        """Plan a route if none exists; True if one is being built."""
        if self.route:
            return True
        waited = (
            self.first_join is not None and time.monotonic() - self.first_join > JOIN_GRACE_SECONDS
        )
        if len(self.workers) < self.num_stages and not (force or waited):
            return False
        candidates = sorted(self.workers.values(), key=lambda w: w.joined_at)
        for count in range(min(self.num_stages, len(candidates), self.config.num_layers), 0, -1):
            chosen = sorted(candidates, key=lambda w: -w.memory)[:count]
            chosen.sort(key=lambda w: w.joined_at)
            memories = [w.memory for w in chosen]
            ranges = plan_layers(self.config.num_layers, memories, head_cost(self.config))
            if all(w.memory >= self._need(r) for w, r in zip(chosen, ranges, strict=True)):
                self._assign(chosen, ranges)
                return True
        return False

    def _assign(self, route: list[WorkerInfo], ranges: list[tuple[int, int] | None]) -> None:
        self.plan_id = next(self.plan_ids)
        self.route = route
        self.token_loop = False
        self.engine.available = True
        for worker in self.workers.values():
            if worker not in route:
                worker.layers, worker.ready = None, False
        for index, (worker, layers) in enumerate(zip(route, ranges, strict=True)):
            assert layers is not None
            worker.layers, worker.ready = layers, False
            following = route[index + 1] if index + 1 < len(route) else None
            worker.connection.send(Frame(Kind.ASSIGN, 0, self._assignment(layers, following)))
        self._record("planned", plan_id=self.plan_id, route=self.describe_route())

    def _assignment(self, layers: tuple[int, int], following: WorkerInfo | None) -> dict:
        settings = self.engine.settings
        return {
            "plan_id": self.plan_id,
            "model": self.model_spec,
            "layer_start": layers[0],
            "layer_end": layers[1],
            "num_slots": settings.num_slots,
            "max_seq_len": settings.max_seq_len,
            "next": None if following is None else following.hop().meta(),
            # the last stage's token loop, and the first stage's address (none if it is the first)
            "token_loop": settings.token_loop,
            "first": self.route[0].hop().meta() if following is None and layers[0] else None,
        }

    # -- the engine's pipeline -------------------------------------------------------------

    def send_batch(self, frame: Frame) -> None:
        frame.meta["plan_id"] = self.plan_id
        if self.on_batch is not None:
            self.on_batch(self.route, frame)
        self.route[0].connection.send(frame)

    def release(self, slots: list[tuple[int, str]]) -> None:
        frame = Frame(Kind.RELEASE, 0, {"slots": [list(pair) for pair in slots]})
        for worker in self.route:
            worker.connection.send(frame)

    # -- status ----------------------------------------------------------------------------

    def describe_route(self) -> str:
        return ", ".join(
            f"{w.node_id}[{w.layers[0]}:{w.layers[1]})" for w in self.route if w.layers
        )

    def status(self) -> dict[str, Any]:
        return {
            "ready": self.live,
            "plan_id": self.plan_id,
            "num_layers": self.config.num_layers,
            "stages": [
                {"index": index} | worker.describe() for index, worker in enumerate(self.route)
            ],
            "workers": [worker.describe() for worker in self.workers.values()],
            "standby": [w.node_id for w in self.workers.values() if w not in self.route],
            "relay": self._relay_status(),
            "events": self.events[-20:],
        }

    def _relay_status(self) -> dict[str, Any] | None:
        """The relay carrying links of the route, if any, and how many it carries."""
        relayed = [
            w for w in self.route if "relayed" in (w.link, link_kind(w.connection)) and w.relay
        ]
        return {"address": relayed[0].relay, "peers": len(relayed)} if relayed else None


class MeshRouter:
    """One QUIC endpoint for the meshes of every served model: a worker belongs to the mesh it
    registered with (the model it asked for, else the one most short of workers)."""

    def __init__(self, meshes: dict[str, Mesh]) -> None:
        self.meshes = meshes
        self.owner: dict[MeshConnection, Mesh] = {}

    def on_frame(self, connection: MeshConnection, frame: Frame) -> None:
        if frame.kind == Kind.REGISTER and connection not in self.owner:
            self.owner[connection] = self._choose(frame.meta)
        mesh = self.owner.get(connection)
        if mesh is not None:
            mesh.on_frame(connection, frame)

    def on_closed(self, connection: MeshConnection) -> None:
        mesh = self.owner.pop(connection, None)
        if mesh is not None:
            mesh.on_closed(connection)

    def _choose(self, meta: dict[str, Any]) -> Mesh:
        wanted = meta.get("model")
        if isinstance(wanted, str) and wanted in self.meshes:
            return self.meshes[wanted]
        return max(self.meshes.values(), key=lambda mesh: mesh.shortfall())

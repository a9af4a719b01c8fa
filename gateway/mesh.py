"""The gateway's side of the mesh: who is connected, the plan of stages, and the route.

Workers dial the gateway and REGISTER; once enough have joined, the gateway splits the model's
layers over them in proportion to the memory each offers and ASSIGNs every one its range and
next hop. When all report READY the route is live: batches go to the first stage over its
connection, and the last stage sends sampled tokens back over its own.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.engine import Engine
from meshpipe.models.config import ModelConfig
from meshpipe.quic import MeshConnection
from meshpipe.wire import Frame, Kind

log = logging.getLogger(__name__)


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
    joined_at: float = field(default_factory=time.time)
    layers: tuple[int, int] | None = None
    ready: bool = False

    def describe(self) -> dict[str, Any]:
        return {
            "worker_id": self.node_id,
            "address": f"{self.host}:{self.port}",
            "pid": self.pid,
            "device": self.device,
            "dtype": self.dtype,
            "memory": self.memory,
            "layers": list(self.layers) if self.layers else None,
            "ready": self.ready,
            "link": "direct",
        }


def plan_layers(num_layers: int, memories: list[int]) -> list[tuple[int, int]]:
    """Contiguous layer ranges, sized in proportion to each worker's memory (at least 1 each)."""
    count = len(memories)
    assert 0 < count <= num_layers
    total = sum(memories) or count
    weights = [m / total if sum(memories) else 1 / count for m in memories]
    bounds, acc = [0], 0.0
    for index, weight in enumerate(weights[:-1]):
        acc += weight
        lowest = bounds[-1] + 1
        highest = num_layers - (count - index - 1)
        bounds.append(min(max(round(acc * num_layers), lowest), highest))
    bounds.append(num_layers)
    return list(itertools.pairwise(bounds))


class Mesh:
    """Registry, plan and route for one model."""

    def __init__(
        self,
        engine: Engine,
        model_spec: str,
        config: ModelConfig,
        num_stages: int,
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

    # -- frames ----------------------------------------------------------------------------

    def on_frame(self, connection: MeshConnection, frame: Frame) -> None:
        if frame.kind == Kind.REGISTER:
            self._register(connection, frame.meta)
        elif frame.kind == Kind.READY:
            self._ready(connection, frame.meta)
        elif frame.kind == Kind.TOKENS and frame.tensor is not None:
            self.engine.on_tokens(frame.message_id, frame.tensor, frame.meta)
        elif frame.kind == Kind.ERROR:
            self._error(connection, frame)

    def on_closed(self, connection: MeshConnection) -> None:
        worker = self._worker_of(connection)
        if worker is None:
            return
        log.warning("worker %s left", worker.node_id)
        del self.workers[worker.node_id]
        if worker in self.route:
            self._break_route(f"worker {worker.node_id} left")
        self._maybe_plan()

    def _worker_of(self, connection: MeshConnection) -> WorkerInfo | None:
        return next((w for w in self.workers.values() if w.connection is connection), None)

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
            )
        except (KeyError, TypeError, ValueError):
            connection.send(
                Frame(Kind.ERROR, 0, {"code": "bad_register", "message": "bad REGISTER"})
            )
            return
        self.workers[node_id] = worker
        log.info("worker %s joined (%s, %s)", node_id, worker.device, worker.dtype)
        self._maybe_plan()

    def _ready(self, connection: MeshConnection, meta: dict[str, Any]) -> None:
        worker = self._worker_of(connection)
        plan = meta.get("plan", {})
        if worker is None or plan.get("plan_id") != self.plan_id:
            return
        worker.ready = True
        if self.route and all(w.ready for w in self.route):
            self.live = True
            log.info("pipeline ready: %s", self.describe_route())
            self.engine.on_pipeline_ready(self)

    def _error(self, connection: MeshConnection, frame: Frame) -> None:
        message = str(frame.meta.get("message", "unknown error"))
        log.warning("error from %s: %s", connection.peer.get("node_id"), message)
        if frame.message_id:
            self.engine.on_batch_failed(frame.message_id, message)
        elif frame.meta.get("code") == "assign_failed":
            worker = self._worker_of(connection)
            if worker is not None and worker in self.route:
                self._break_route(f"worker {worker.node_id} could not load: {message}")

    # -- planning --------------------------------------------------------------------------

    def _maybe_plan(self) -> None:
        if self.route or len(self.workers) < self.num_stages:
            return
        chosen = sorted(self.workers.values(), key=lambda w: w.joined_at)[: self.num_stages]
        ranges = plan_layers(self.config.num_layers, [w.memory for w in chosen])
        self.plan_id = next(self.plan_ids)
        self.route = chosen
        for index, (worker, layers) in enumerate(zip(chosen, ranges, strict=True)):
            worker.layers, worker.ready = layers, False
            following = chosen[index + 1] if index + 1 < len(chosen) else None
            worker.connection.send(Frame(Kind.ASSIGN, 0, self._assignment(layers, following)))

    def _assignment(self, layers: tuple[int, int], following: WorkerInfo | None) -> dict:
        settings = self.engine.settings
        return {
            "plan_id": self.plan_id,
            "model": self.model_spec,
            "layer_start": layers[0],
            "layer_end": layers[1],
            "num_slots": settings.num_slots,
            "max_seq_len": settings.max_seq_len,
            "next": None
            if following is None
            else {"node_id": following.node_id, "host": following.host, "port": following.port},
        }

    def _break_route(self, reason: str) -> None:
        for worker in self.route:
            worker.layers, worker.ready = None, False
        self.route = []
        self.live = False
        self.engine.on_pipeline_lost(reason)

    # -- the engine's pipeline -------------------------------------------------------------

    def send_batch(self, frame: Frame) -> None:
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
            "num_layers": self.config.num_layers,
            "stages": [
                {"index": index} | worker.describe() for index, worker in enumerate(self.route)
            ],
            "workers": [worker.describe() for worker in self.workers.values()],
        }

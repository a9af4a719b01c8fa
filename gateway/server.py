"""The gateway process: HTTP (uvicorn) and the mesh (QUIC) on one event loop."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from gateway.app import GatewayState, build_app
from gateway.engine import Engine, EngineSettings
from gateway.mesh import Mesh
from gateway.metrics import Metrics
from gateway.service import ChatService
from gateway.text import ChatFormat
from meshpipe import dirs
from meshpipe.identity import load_or_create_identity
from meshpipe.models.catalog import resolve
from meshpipe.models.config import ModelConfig
from meshpipe.quic import bound_port, listen

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewaySettings:
    """Everything the gateway is told on its command line."""

    model: str
    token: str
    host: str = "127.0.0.1"
    port: int = 9337
    mesh_host: str = "127.0.0.1"
    mesh_port: int = 9338
    served_name: str = ""
    stages: int = 2
    num_slots: int = 8
    max_seq_len: int = 2048
    max_batch_tokens: int = 256
    max_waiting: int = 64
    max_in_flight: int = 0


def served_name(spec: str, model_dir: Path) -> str:
    """The name clients ask for: the catalog name, or the directory's / file's stem."""
    if "/" not in spec and not spec.endswith(".gguf"):
        return spec
    return Path(spec).stem if spec.endswith(".gguf") else model_dir.name


async def serve(settings: GatewaySettings) -> None:
    model_dir = await asyncio.to_thread(resolve, settings.model, True)
    config = ModelConfig.from_dir(model_dir)
    metrics = Metrics()
    engine_settings = EngineSettings(
        num_slots=settings.num_slots,
        max_seq_len=min(settings.max_seq_len, config.max_position_embeddings),
        max_batch_tokens=settings.max_batch_tokens,
        max_waiting=settings.max_waiting,
        max_in_flight=settings.max_in_flight or settings.stages,
    )
    engine = Engine(engine_settings, ChatFormat(model_dir), set(config.eos_token_ids), metrics)
    mesh = Mesh(engine, str(model_dir), config, settings.stages)
    identity = load_or_create_identity(dirs.config_dir() / "nodes", "gateway")
    quic = await listen(settings.mesh_host, settings.mesh_port, identity, mesh, settings.token)
    name = settings.served_name or served_name(settings.model, model_dir)
    state = GatewayState(ChatService(name, engine), mesh, metrics, settings.token, time.time())
    server = uvicorn.Server(
        uvicorn.Config(
            build_app(state),
            host=settings.host,
            port=settings.port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
    )
    print(
        f"meshpipe gateway: http://{settings.host}:{settings.port}/v1 serving {name!r}, "
        f"mesh on udp {settings.mesh_host}:{bound_port(quic)}",
        flush=True,
    )
    tasks = [asyncio.create_task(engine.run()), asyncio.create_task(mesh.monitor())]
    try:
        await server.serve()
    finally:
        for task in tasks:
            task.cancel()
        quic.close()

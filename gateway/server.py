"""The gateway process: HTTP (uvicorn) and the mesh (QUIC) on one event loop."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from gateway.app import GatewayState, ServedModel, build_app
from gateway.engine import Engine, EngineSettings
from gateway.ledger import Ledger
from gateway.mesh import Mesh, MeshRouter
from gateway.metrics import Metrics
from gateway.service import ChatService
from gateway.text import ChatFormat
from meshpipe import busy_poll, dirs, discovery
from meshpipe.identity import load_or_create_identity
from meshpipe.models.catalog import resolve
from meshpipe.models.config import ModelConfig
from meshpipe.quic import bound_port, listen
from meshpipe.reach import GATEWAY_NODE_ID
from meshpipe.relay_link import RelayLink

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewaySettings:
    """Everything the gateway is told on its command line."""

    models: tuple[str, ...]
    token: str
    host: str = "127.0.0.1"
    port: int = 9337
    mesh_host: str = "127.0.0.1"
    mesh_port: int = 9338
    served_name: str = ""
    stages: int = 2
    num_slots: int = 16
    max_seq_len: int = 2048
    max_batch_tokens: int = 256
    max_waiting: int = 64
    max_in_flight: int = 0
    token_loop: bool = True  # the last stage feeds its tokens to the first (gateway/engine.py)
    # None: announce on the LAN (mDNS) when the mesh endpoint is not on loopback.
    announce: bool | None = None
    # Register with this relay (HOST, PORT), so workers that cannot reach us directly can.
    relay: tuple[str, int] | None = None
    # The event loop's busy-poll window (meshpipe/busy_poll.py).
    busy_poll_ms: float = busy_poll.CPU_WINDOW_MS


def served_name(spec: str, model_dir: Path) -> str:
    """The name clients ask for: the catalog name, or the directory's / file's stem."""
    if "/" not in spec and not spec.endswith(".gguf"):
        return spec
    return Path(spec).stem if spec.endswith(".gguf") else model_dir.name


async def load_model(spec: str, settings: GatewaySettings, metrics: Metrics) -> ServedModel:
    """Tokenizer, engine and mesh of one served model."""
    model_dir = await asyncio.to_thread(resolve, spec, True)
    config = ModelConfig.from_dir(model_dir)
    engine_settings = EngineSettings(
        num_slots=settings.num_slots,
        max_seq_len=min(settings.max_seq_len, config.max_position_embeddings),
        max_batch_tokens=settings.max_batch_tokens,
        max_waiting=settings.max_waiting,
        max_in_flight=settings.max_in_flight or settings.stages,
        token_loop=settings.token_loop,
    )
    engine = Engine(engine_settings, ChatFormat(model_dir), set(config.eos_token_ids), metrics)
    mesh = Mesh(engine, str(model_dir), config, settings.stages)
    name = settings.served_name if len(settings.models) == 1 and settings.served_name else ""
    name = name or served_name(spec, model_dir)
    return ServedModel(
        name, ChatService(name, engine, sampling_defaults(model_dir), config.vocab_size), mesh
    )


def sampling_defaults(model_dir: Path) -> dict[str, float]:
    """temperature, top_p and top_k from the model's generation_config.json, where given."""
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return {key: config[key] for key in ("temperature", "top_p", "top_k") if key in config}


async def serve(settings: GatewaySettings) -> None:
    metrics = Metrics()
    served = [await load_model(spec, settings, metrics) for spec in settings.models]
    models = {model.name: model for model in served}
    if len(models) != len(served):
        raise SystemExit("error: two --model options give the same model name")
    identity = load_or_create_identity(dirs.config_dir() / "nodes", "gateway")
    router = MeshRouter({name: model.mesh for name, model in models.items()})
    quic = await listen(settings.mesh_host, settings.mesh_port, identity, router, settings.token)
    relay = None
    if settings.relay is not None:
        relay = await RelayLink.open(
            settings.relay, GATEWAY_NODE_ID, settings.token, identity, router
        )
    state = GatewayState(models, metrics, settings.token, time.time())
    state.ledger = ledger = Ledger.open(dirs.data_dir())
    for model in served:
        ledger.attach(model.name, model.service.engine, model.mesh)
    announcement = await announce(settings, identity.fingerprint(), bound_port(quic))
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
        f"meshpipe gateway: http://{settings.host}:{settings.port}/v1 serving "
        f"{', '.join(repr(name) for name in models)}, mesh on udp "
        f"{settings.mesh_host}:{bound_port(quic)}",
        flush=True,
    )
    tasks = [asyncio.create_task(model.service.engine.run()) for model in served]
    tasks += [asyncio.create_task(model.mesh.monitor()) for model in served]
    try:
        await server.serve()
    finally:
        for task in tasks:
            task.cancel()
        quic.close()
        if relay is not None:
            relay.close()
        if announcement is not None:
            await announcement.close()
        ledger.close()


async def announce(
    settings: GatewaySettings, fingerprint: str, port: int
) -> discovery.Announcement | None:
    """Announce the mesh endpoint on the LAN when asked, or when it is not on loopback."""
    if not discovery.should_announce(settings.mesh_host, settings.announce):
        return None
    try:
        found = await discovery.announce(settings.mesh_host, port, fingerprint, settings.token)
    except discovery.DiscoveryError as error:
        print(f"warning: LAN discovery is off: {error}", flush=True)
        return None
    print(f"announced on the LAN as {found.name} (certificate sha256 {fingerprint})", flush=True)
    return found

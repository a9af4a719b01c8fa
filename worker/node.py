"""The worker process: joins the gateway, loads its assigned layers, runs batches as they come.

Links: the worker dials the gateway (control, and for the first stage the token batches in,
for the last stage the sampled tokens out); it listens for the previous stage and dials the
next one. The last stage also dials the first one for the token loop: each step's sampled
tokens go straight back to the first stage, where the gateway's next step for those sequences
is already waiting for them (`after` in its metadata), so the gateway is off the path from one
token to the next. A forward pass runs on one thread of its own, not on the event loop, so
QUIC's ACKs and timers keep their pace meanwhile; a decode step captured in CUDA graphs is only
launched from the event loop and polled there (worker/steps.py: how steps run on the device).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from meshpipe import busy_poll, dirs, trace
from meshpipe.identity import load_or_create_identity
from meshpipe.latency import LinkLatency
from meshpipe.models.catalog import installed, resolve
from meshpipe.models.config import ModelConfig
from meshpipe.quic import Dialer, MeshConnection, bound_port, listen
from meshpipe.reach import GATEWAY_NODE_ID, Hop, dial
from meshpipe.relay_link import RelayLink, RelayUnavailable, link_kind
from meshpipe.wire import Frame, FrameError, Kind, Raw, error_frame
from worker.batch import MAX_SPANS, Batch, parse_batch
from worker.blocks import Kernels, use_blocks
from worker.cuda_graphs import DecodeGraphs
from worker.model import Stage, StagePlan
from worker.step_profile import StepProfile
from worker.steps import DeviceSteps

log = logging.getLogger(__name__)
Result = TypeVar("Result")

HEARTBEAT_INTERVAL = 0.25
RECONNECT_DELAY = 0.5
MAX_RECONNECT_DELAY = 5.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SEND_WINDOW_BYTES = 64 << 20
# The first stage of a token loop keeps this many steps that wait for their feed, and this many
# feeds that came before their step; past that the oldest are dropped (a step with an error).
MAX_AWAITING = 64
MAX_FEEDS = 64


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker process is told on its command line."""

    gateway_host: str
    gateway_port: int
    token: str
    device: str
    dtype: str
    host: str = "127.0.0.1"
    port: int = 0
    threads: int = 0
    node_id: str = ""
    max_memory: int = 0
    model: str = ""
    relay: tuple[str, int] | None = None
    relay_only: bool = False
    cuda_graphs: bool = True
    compile: bool = True  # CUDA: the captured decode step compiled by TorchInductor
    block_weights: bool = True  # CPU decode steps on the model's GGUF blocks, if it has them
    native_kernels: bool = True  # CPU float32: meshpipe's C kernels (worker/cpu_kernels.c)
    # The event loop's busy-poll window (meshpipe/busy_poll.py).
    busy_poll_ms: float = busy_poll.CPU_WINDOW_MS

    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def check_device(device: str) -> None:
    """Refuse a device that is not there: no silent fallback to another."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    if device == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("error: --device mps, but torch sees no MPS device")


def free_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as file:
        for line in file:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class WorkerNode(DeviceSteps):
    """One stage of a pipeline, served over QUIC (its steps' device side: worker/steps.py)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.node_id = settings.node_id or f"worker-{uuid.uuid4().hex[:8]}"
        self.identity = load_or_create_identity(dirs.config_dir() / "nodes", self.node_id)
        self.dialer = Dialer(self.identity, settings.token)
        self.gateway: MeshConnection | None = None
        self.next_stage: MeshConnection | None = None
        self.stage: Stage | None = None
        self.plan: StagePlan | None = None
        self.config: ModelConfig | None = None
        # (sender, frame, the batch if parsed already: a step that waited for its feed, when it
        # could run: perf_counter() at its frame's arrival, or at its feed's)
        self.batches: asyncio.Queue[tuple[MeshConnection, Frame, Batch | None, float]] = (
            asyncio.Queue()
        )
        # the token loop: the last stage's link to the first ("local" if it is the first too);
        # on the first stage, steps waiting for their parent's tokens and tokens not awaited yet
        self.first_stage: MeshConnection | None = None
        self.loop_link = ""
        self.awaiting: OrderedDict[int, tuple[MeshConnection, Frame, Batch]] = OrderedDict()
        self.feeds: OrderedDict[int, list[int]] = OrderedDict()
        self.fed_steps = 0  # steps run on fed tokens
        self.feeds_ahead = 0  # feeds that came before their step: the gateway was the late one
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compute")
        # block kernels, kept across plans
        self.kernels = Kernels(settings.native_kernels and settings.device == "cpu")
        self.active_slots: dict[int, str] = {}
        self.steps = 0
        self.step_seconds = 0.0
        # Totals over all steps of the host time around the compute: from a step's being
        # runnable to its start (the queue and the parse), and from its end until its result
        # is handed to the link (framing, and waiting for the link's window).
        self.wait_seconds = 0.0
        self.send_seconds = 0.0
        self.on_thread = 0  # steps or loads running on the compute thread
        self.step_profile = StepProfile.from_environment(self.node_id, settings.device)
        self.gateway_lost = asyncio.Event()
        self.port = 0
        self.plan_id = 0
        self.assignment: dict[str, Any] = {}
        self.assign_lock = asyncio.Lock()
        self.next_latency = LinkLatency()
        self.graphs: DecodeGraphs | None = None
        self.relay: RelayLink | None = None

    # -- life ------------------------------------------------------------------------------

    async def run(self) -> None:
        server = await listen(
            self.settings.host, self.settings.port, self.identity, self, self.settings.token
        )
        self.port = bound_port(server)
        if self.settings.relay is not None:
            self.relay = await RelayLink.open(
                self.settings.relay, self.node_id, self.settings.token, self.identity, self
            )
        tasks = [asyncio.create_task(self._compute_loop()), asyncio.create_task(self._heartbeat())]
        try:
            await self._stay_joined()
        finally:
            for task in tasks:
                task.cancel()
            self._cancel_armed()
            server.close()
            if self.relay is not None:
                self.relay.close()
            await self.dialer.close()
            self.executor.shutdown(wait=False, cancel_futures=True)

    async def _stay_joined(self) -> None:
        """Join the gateway, and join again whenever the link drops (a gateway restart, or a
        heartbeat judged missed on a loaded machine): the worker is a long-lived resource."""
        delay = RECONNECT_DELAY
        while True:
            try:
                self.gateway = await self._dial_gateway()
            except (TimeoutError, ConnectionError, OSError) as error:
                log.warning("gateway unreachable (%s); retrying in %.0fs", error, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, MAX_RECONNECT_DELAY)
                continue
            delay = RECONNECT_DELAY
            self.gateway_lost.clear()
            self.gateway.send(Frame(Kind.REGISTER, 0, self._description()))
            await self.gateway_lost.wait()
            # Whatever the gateway planned before is void: drop batches of that plan.
            self.plan_id = 0
            await asyncio.sleep(RECONNECT_DELAY)

    async def _dial_gateway(self) -> MeshConnection:
        """Directly, or through the relay, where the gateway may not have registered yet."""
        s = self.settings
        hop = Hop(GATEWAY_NODE_ID, s.gateway_host, s.gateway_port)
        for _ in range(20):
            try:
                return await dial(self.dialer, self.relay, hop, self, self._hello(), s.relay_only)
            except RelayUnavailable as error:
                log.warning("gateway not reachable yet: %s", error)
                await asyncio.sleep(1.0)
        return await dial(self.dialer, self.relay, hop, self, self._hello(), s.relay_only)

    def _hello(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "role": "worker"}

    def _description(self) -> dict[str, Any]:
        offered = free_memory(self.settings.device)
        if self.settings.max_memory:
            offered = min(offered, self.settings.max_memory)
        return {
            "node_id": self.node_id,
            "host": self.settings.host,
            "port": self.port,
            "pid": os.getpid(),
            "device": self.settings.device,
            "dtype": self.settings.dtype,
            "memory": offered,
            "model": self.settings.model,
            "models": [model["name"] for model in installed() if model["complete"]],
            "fingerprint": self.identity.fingerprint(),
            "direct": not self.settings.relay_only,
            "relay": self.relay.address if self.relay is not None else None,
        }

    async def _heartbeat(self) -> None:
        """Tell the gateway we are alive, with live figures, several times a second."""
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            if self.gateway is None or self.gateway.closed:
                continue
            status = {
                "plan_id": self.plan_id,
                "active_slots": len(self.active_slots),
                "steps": self.steps,
                "step_seconds": self.step_seconds,
                "wait_seconds": self.wait_seconds,
                "send_seconds": self.send_seconds,
                "replays": self.replays,
                "replay_device_seconds": self.replay_device_seconds,
                "armed_steps": self.armed_steps,
                "armed_cancelled": self.armed_cancelled,
                "queued": self.batches.qsize(),
                "fed_steps": self.fed_steps,
                "feeds_ahead": self.feeds_ahead,
                "next_rtt": self.next_latency.rtt if self.next_stage is not None else None,
            }
            self.gateway.send(Frame(Kind.STATUS, 0, status))
            if self.next_stage is not None:
                self.next_latency.ping(self.next_stage)

    # -- frames ----------------------------------------------------------------------------

    def on_frame(self, connection: MeshConnection, frame: Frame) -> None:
        if frame.kind == Kind.BATCH:
            trace.mark("batch", frame.message_id)
            if self.stage is None:
                raise FrameError("not_ready", "this worker has no assignment yet")
            if self.stage.plan.is_first and "after" in frame.meta:
                self._await_feed(connection, frame)
                return
            batch = None
            if self.predicted is not None:  # a step is armed ahead of this batch
                with contextlib.suppress(FrameError):  # parsed again and reported there
                    batch = self._parse(frame)
                self._start_predicted(batch)
            self.batches.put_nowait((connection, frame, batch, time.perf_counter()))
        elif frame.kind == Kind.FEED:
            trace.mark("feed", frame.message_id)
            self._on_feed(frame)
        elif frame.kind == Kind.ASSIGN and connection is self.gateway:
            asyncio.get_running_loop().create_task(self._assign(frame.meta))
        elif frame.kind == Kind.RELEASE:
            for slot, request_id in frame.meta.get("slots", []):
                if self.active_slots.get(slot) == request_id:
                    del self.active_slots[slot]
                if self.predicted is not None and any(s.slot == slot for s in self.predicted):
                    self._cancel_armed()  # its sequence has ended: no batch will start it
        elif frame.kind == Kind.HEARTBEAT and connection is self.next_stage:
            self.next_latency.on_frame(frame)
        elif frame.kind == Kind.ERROR:
            log.warning("peer error: %s", frame.meta)
            # a batch failed further on: the step waiting for its tokens will not get them
            self._drop_awaiting(frame.message_id)

    def on_closed(self, connection: MeshConnection) -> None:
        if connection is self.gateway:
            log.warning("lost the gateway; joining again")
            self._cancel_armed()  # joining again asks the GPU for its free memory
            self.gateway_lost.set()
        elif connection is self.next_stage:
            log.warning("lost the next stage")
            self.next_stage = None
        elif connection is self.first_stage:
            # Steps waiting at the first stage would wait for ever: the gateway plans again.
            log.warning("lost the token loop's link to the first stage")
            self.first_stage = None
            if self.gateway is not None and not self.gateway.closed:
                self.gateway.send(error_frame("loop_lost", "the last stage lost the first"))

    # -- the token loop --------------------------------------------------------------------

    def _await_feed(self, connection: MeshConnection, frame: Frame) -> None:
        """A step whose inputs include the tokens that batch `after` samples: parsed now, run
        when those tokens arrive (at once if they have)."""
        after = frame.meta.pop("after")
        if type(after) is not int:
            raise FrameError("bad_batch", "after must be a batch id")
        batch = self._parse(frame)
        if batch is None:
            return
        fed = frame.meta.get("fed")
        if type(fed) is not list or not all(
            type(pair) is list
            and len(pair) == 2
            and all(type(i) is int for i in pair)
            and 0 <= pair[0] < len(batch.inputs)
            and 0 <= pair[1] < MAX_SPANS
            for pair in fed
        ):
            raise FrameError("bad_batch", "fed must be [[input row, sampled row], ...]")
        tokens = self.feeds.pop(after, None)
        if tokens is not None:
            self._run_fed(connection, frame, batch, tokens)
            return
        self.awaiting[after] = (connection, frame, batch)
        while len(self.awaiting) > MAX_AWAITING:
            source, lost, _ = self._drop_awaiting(next(iter(self.awaiting)))
            self._report(source, error_frame("feed_lost", "no tokens came", lost.message_id))
        self._arm(batch)

    def _drop_awaiting(self, after: int) -> tuple[MeshConnection, Frame, Batch] | None:
        """Forget the step waiting for batch `after`'s tokens (cancelled if it is armed)."""
        waiting = self.awaiting.pop(after, None)
        if waiting is not None and self.armed is not None and self.armed[0] == waiting[2].batch_id:
            self._cancel_armed()
        return waiting

    def _on_feed(self, frame: Frame) -> None:
        """The tokens a batch sampled, from the last stage."""
        tokens = frame.payload  # None: the batch sampled nothing (a prompt chunk)
        if tokens is not None:
            shape, dtype = frame.shape_and_dtype()
            if dtype != torch.int64 or len(shape) != 1:
                raise FrameError("bad_feed", "a feed carries int64 token ids [n]")
        if self.plan is None or not self.plan.is_first:
            return
        self._feed(frame.message_id, [] if tokens is None else tokens.tolist())

    def _feed(self, batch_id: int, tokens: list[int]) -> None:
        waiting = self.awaiting.pop(batch_id, None)
        if waiting is None:
            self.feeds_ahead += 1
            self.feeds[batch_id] = tokens
            while len(self.feeds) > MAX_FEEDS:
                self.feeds.popitem(last=False)
            return
        source, frame, batch = waiting
        try:
            self._run_fed(source, frame, batch, tokens)
        except FrameError as error:
            self._report(source, error_frame(error.code, str(error), frame.message_id))

    def _run_fed(
        self, source: MeshConnection, frame: Frame, batch: Batch, tokens: list[int]
    ) -> None:
        """Put the fed tokens into the step's inputs and queue it."""
        assert self.config is not None
        vocab, data = self.config.vocab_size, batch.input_bytes()  # no torch call: see Raw
        inputs = data.cast("q")
        for row, sampled in batch.meta.pop("fed"):
            if not (sampled < len(tokens) and 0 <= tokens[sampled] < vocab):
                raise FrameError("bad_batch", f"no token {sampled} in the feed, or out of range")
            inputs[row] = tokens[sampled]
        self.fed_steps += 1
        if self.armed is not None and self.armed[0] == batch.batch_id and self.graphs is not None:
            self.graphs.release(self.armed[1], data)  # the GPU starts it now
            trace.mark("released", batch.batch_id)
        self.batches.put_nowait((source, frame, batch, time.perf_counter()))

    def _feed_first(self, batch_id: int, tokens: torch.Tensor | Raw) -> None:
        """The last stage: a step's tokens to the first stage, before the gateway has them."""
        if self.loop_link == "local":
            self._feed(batch_id, tokens.tolist())
        elif self.first_stage is not None and not self.first_stage.closed:
            self.first_stage.send(Frame(Kind.FEED, batch_id, {}, tokens))

    async def _assign(self, meta: dict[str, Any]) -> None:
        """Load the assigned layers (unless already held), link to the next stage, report READY.

        Batches of an older plan are dropped from now on: after a failover their sequences are
        replayed on the new route, and stale KV writes must not land in the slots."""
        assert self.gateway is not None
        async with self.assign_lock:
            self._cancel_armed()  # before the stream takes a load, or the plan changes
            self.plan_id = int(meta.get("plan_id", 0))
            try:
                if _layout(meta) != _layout(self.assignment) or self.stage is None:
                    self.stage = None
                    await self._load(meta)
                self.assignment = meta
                await self._link_next(meta.get("next"))
                await self._link_first(meta)
            except Exception as error:  # noqa: BLE001 - reported to the gateway, which decides
                log.exception("assignment failed")
                self.gateway.send(error_frame("assign_failed", f"{type(error).__name__}: {error}"))
                return
            self.active_slots.clear()
            ready = {
                "node_id": self.node_id,
                "plan": meta,
                "next_link": link_kind(self.next_stage),
                "token_loop": self.loop_link,
            }
            self.gateway.send(Frame(Kind.READY, 0, ready))

    async def _link_next(self, following: dict[str, Any] | None) -> None:
        old, self.next_stage = self.next_stage, None
        if old is not None and not old.closed:
            old.close()
        if following:
            hop = Hop.from_meta(following)
            self.next_stage = await dial(
                self.dialer, self.relay, hop, self, self._hello(), self.settings.relay_only
            )

    async def _link_first(self, assignment: dict[str, Any]) -> None:
        """The last stage's link to the first, for the token loop, if the gateway has it on.
        Without it (or if the first stage cannot be dialed) the gateway feeds every step."""
        old, self.first_stage, self.loop_link = self.first_stage, None, ""
        if old is not None and not old.closed:
            old.close()
        self.awaiting.clear()
        self.feeds.clear()
        assert self.plan is not None
        if not (self.plan.is_last and assignment.get("token_loop")):
            return
        if self.plan.is_first:
            self.loop_link = "local"
            return
        first = assignment.get("first")
        if not first:
            return
        hop = Hop.from_meta(first)
        try:
            self.first_stage = await dial(
                self.dialer, self.relay, hop, self, self._hello(), self.settings.relay_only
            )
        except (TimeoutError, ConnectionError, OSError, RelayUnavailable) as error:
            log.warning("no token loop: the first stage is unreachable (%s)", error)
            return
        self.loop_link = link_kind(self.first_stage)

    async def _load(self, meta: dict[str, Any]) -> None:
        model_dir = await asyncio.to_thread(resolve, meta["model"], False)
        config = ModelConfig.from_dir(model_dir)
        plan = StagePlan(
            meta["layer_start"],
            meta["layer_end"],
            config.num_layers,
            meta["num_slots"],
            meta["max_seq_len"],
        )
        self.graphs = None
        stage = await self._on_compute_thread(self._build_stage, model_dir, config, plan)
        if self.settings.device == "cuda" and self.settings.cuda_graphs:
            graphs = DecodeGraphs(stage, compile=self.settings.compile)
            await self._on_compute_thread(graphs.warm)
            self.graphs = graphs
        self.config, self.plan, self.stage = config, plan, stage
        trace.rename("stage0" if plan.is_first else "stage1" if plan.is_last else "stage-mid")

    def _build_stage(self, model_dir, config: ModelConfig, plan: StagePlan) -> Stage:
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        dtype = self.settings.torch_dtype()
        # Built on the meta device, so only this stage's weights are ever materialised.
        with torch.device("meta"):
            stage = Stage(config, plan).to(dtype=dtype)
        stage = stage.to_empty(device=self.settings.device)
        stage.load(model_dir)
        stage.reset_rope()
        if self.settings.block_weights and self.settings.device == "cpu":
            swapped = use_blocks(stage, model_dir, self.kernels)
            if swapped:
                kernels, rows = self.kernels, self.kernels.max_rows
                log.info(
                    "%d projections run up to %d rows on the blocks (%s)", swapped, rows, kernels
                )
        if self.kernels.native and dtype == torch.float32:  # built for CPU workers only
            stage.use_native_kernels(self.kernels.native)
        # One scratch slot for the padding rows of CUDA-graph batches.
        stage.allocate_cache(dtype, extra_slots=1 if self.settings.device == "cuda" else 0)
        return stage.eval()

    # -- compute ---------------------------------------------------------------------------

    async def _on_compute_thread(self, work: Callable[..., Result], *args: Any) -> Result:
        """`work(*args)` on the compute thread; the event loop does not poll busily meanwhile,
        which would take the GIL from it (meshpipe/busy_poll.py)."""
        loop = asyncio.get_running_loop()
        self._cancel_armed()  # work there may wait on the GPU's stream
        self.on_thread += 1
        try:
            with busy_poll.paused(loop):
                return await loop.run_in_executor(self.executor, work, *args)
        finally:
            self.on_thread -= 1

    async def _compute_loop(self) -> None:
        while True:
            source, frame, batch, runnable = await self.batches.get()
            try:
                batch = batch or self._parse(frame)
                if batch is None:
                    continue
                started, device = time.perf_counter(), self.replay_device_seconds
                self.wait_seconds += started - runnable
                armed = self._take_armed(batch)
                if armed is not None or self._replays_here(batch):
                    result, logprobs = await self._replay(batch, armed), None
                else:
                    result, logprobs = await self._on_compute_thread(self._run, batch)
                finished = time.perf_counter()
                trace.mark("done", batch.batch_id)
                self.step_seconds = finished - started
                self.steps += 1
                await self._send_on(batch, result, logprobs)
                self.send_seconds += time.perf_counter() - finished
                self.settle_replay()
                self._profile_step(self.replay_device_seconds - device)
                self._arm_successor(batch)
            except FrameError as error:
                self._report(source, error_frame(error.code, str(error), frame.message_id))
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - a failed batch must not stop the stage
                log.exception("batch %d failed", frame.message_id)
                self._report(source, error_frame("stage_failed", str(error), frame.message_id))

    def _profile_step(self, device_seconds: float) -> None:
        """Count a step for MESHPIPE_PROFILE_STEPS (worker/step_profile.py)."""
        if self.step_profile is None:
            return
        if self.step_profile.turns_after():
            self._cancel_armed()  # none is armed (_arm); the profiler synchronises the device
        self.step_profile.after_step(self.step_seconds, device_seconds)

    def _parse(self, frame: Frame) -> Batch | None:
        """Validate a batch (FrameError if malformed); None if it belongs to an older plan."""
        if self.stage is None or self.config is None or self.plan is None:
            raise FrameError("not_ready", "this worker is loading its assignment")
        batch = parse_batch(
            frame,
            self.plan,
            self.config.hidden_size,
            self.config.vocab_size,
            self.settings.torch_dtype(),
        )
        if frame.meta.get("plan_id") != self.plan_id:
            log.info("dropped batch %d of plan %s", frame.message_id, frame.meta.get("plan_id"))
            return None
        requests = frame.meta.get("requests")
        for span in batch.spans:
            owner = requests.get(str(span.slot), "") if isinstance(requests, dict) else ""
            self.active_slots[span.slot] = str(owner)
        return batch

    async def _send_on(
        self, batch: Batch, result: torch.Tensor | Raw, logprobs: list | None
    ) -> None:
        assert self.stage is not None and self.gateway is not None
        timings = batch.meta.get("timings")
        timings = (timings if isinstance(timings, list) else [])[:64] + [self.step_seconds]
        batch.meta["timings"] = timings
        if self.stage.plan.is_last:
            trace.mark("sending", batch.batch_id)
            self._feed_first(batch.batch_id, result)
            trace.mark("sent", batch.batch_id)
            meta = {"timings": timings}
            if logprobs is not None:
                meta["logprobs"] = logprobs
            self.gateway.send(Frame(Kind.TOKENS, batch.batch_id, meta, result))
            return
        if self.next_stage is None or self.next_stage.closed:
            raise FrameError("no_next_stage", "the next stage is not connected")
        await self.next_stage.drain(SEND_WINDOW_BYTES)
        trace.mark("sending", batch.batch_id)
        self.next_stage.send(batch.forward_frame(result))
        trace.mark("sent", batch.batch_id)

    def _report(self, source: MeshConnection, frame: Frame) -> None:
        """Errors about a batch go to its sender and, so it can fail the batch, to the gateway."""
        with contextlib.suppress(Exception):
            source.send(frame)
            if self.gateway is not None and source is not self.gateway:
                self.gateway.send(frame)


def _layout(assignment: dict[str, Any]) -> tuple:
    """What decides the weights and cache a stage holds."""
    keys = ("model", "layer_start", "layer_end", "num_slots", "max_seq_len")
    return tuple(assignment.get(key) for key in keys)

"""Frames from the network that a worker must refuse with an ERROR frame, and keep serving."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import torch

from meshpipe.identity import load_or_create_identity
from meshpipe.quic import Dialer, JoinRefused, MeshConnection
from meshpipe.wire import HEADER, MAGIC, VERSION, DType, Frame, Kind
from tests.cluster import Cluster


class Collector:
    """Keeps every frame a test connection receives."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.arrived = asyncio.Event()

    def on_frame(self, connection: MeshConnection, frame: Frame) -> None:
        self.frames.append(frame)
        self.arrived.set()

    def on_closed(self, connection: MeshConnection) -> None:
        self.arrived.set()

    async def next(self, seconds: float = 10) -> Frame:
        while not self.frames:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), seconds)
        return self.frames.pop(0)


def header(kind: int, dtype: int, shape: tuple[int, ...], meta_length: int, payload: int) -> bytes:
    dims = list(shape) + [0] * (4 - len(shape))
    return HEADER.pack(
        MAGIC, VERSION, kind, dtype, len(shape), 0, 0, 99, meta_length, *dims, payload
    )


def raw_send(connection: MeshConnection, data: bytes, end: bool = True) -> None:
    stream_id = connection._quic.get_next_available_stream_id(is_unidirectional=True)
    connection._quic.send_stream_data(stream_id, data, end_stream=end)
    connection.transmit()


def worker_address(cluster: Cluster, index: int) -> tuple[str, int]:
    host, port = cluster.status()["stages"][index]["address"].rsplit(":", 1)
    return host, int(port)


async def dial(
    cluster: Cluster, home: Path, token: str | None = None, stage: int = 1
) -> tuple[Dialer, MeshConnection, Collector]:
    identity = load_or_create_identity(home / "test-peer", "peer")
    dialer = Dialer(identity, token or cluster.status()["join_token"])
    collector = Collector()
    host, port = worker_address(cluster, stage)
    connection = await dialer.dial(host, port, collector, {"node_id": "test-peer", "role": "test"})
    return dialer, connection, collector


BAD_FRAMES = {
    "bad magic": (b"XXXX" + bytes(HEADER.size - 4), "bad_magic"),
    "bad version": (HEADER.pack(MAGIC, 9, 6, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0), "bad_version"),
    "unknown kind": (header(200, 0, (), 0, 0), "bad_kind"),
    "unknown dtype": (header(Kind.BATCH, 77, (1,), 0, 4), "bad_dtype"),
    "rank too high": (HEADER.pack(MAGIC, VERSION, 6, 1, 9, 0, 0, 1, 0, 1, 1, 1, 1, 4), "bad_rank"),
    "shape and length disagree": (header(Kind.BATCH, DType.FLOAT32, (4, 576), 0, 12), "bad_length"),
    "oversized payload": (
        header(Kind.BATCH, DType.UINT8, (1 << 20, 1 << 20), 0, 1 << 40),
        "too_large",
    ),
    "oversized metadata": (header(Kind.BATCH, 0, (), 1 << 30, 0), "too_large"),
    "truncated header": (header(Kind.BATCH, 0, (), 0, 0)[:20], "truncated"),
    "truncated payload": (
        header(Kind.BATCH, DType.FLOAT32, (2, 576), 0, 4608) + bytes(100),
        "truncated",
    ),
    "metadata not JSON": (header(Kind.BATCH, 0, (), 5, 0) + b"{oops", "bad_meta"),
}


def batch(meta: dict, tensor: torch.Tensor) -> bytes:
    return Frame(Kind.BATCH, 424242, meta, tensor).encode()


BAD_BATCHES = {
    "no spans": batch({"spans": []}, torch.zeros(1, 576)),
    "slot out of range": batch({"spans": [[999, 0, 1]]}, torch.zeros(1, 576)),
    "negative position": batch({"spans": [[0, -3, 1]]}, torch.zeros(1, 576)),
    "beyond the context": batch({"spans": [[0, 2047, 5]]}, torch.zeros(5, 576)),
    "span not integers": batch({"spans": [["a", 0, 1]]}, torch.zeros(1, 576)),
    "rows disagree with spans": batch({"spans": [[0, 0, 3]]}, torch.zeros(2, 576)),
    "wrong hidden size": batch({"spans": [[0, 0, 1]]}, torch.zeros(1, 100)),
    "wrong dtype": batch({"spans": [[0, 0, 1]]}, torch.zeros(1, 576, dtype=torch.float16)),
    "sample of a missing span": batch(
        {"spans": [[0, 0, 1]], "sample": [[5, 0, 1, 0, 0, -1]]}, torch.zeros(1, 576)
    ),
    "logprobs out of range": batch(
        {"spans": [[0, 0, 1]], "sample": [[0, 0, 1, 0, 0, 99]]}, torch.zeros(1, 576)
    ),
    "penalized token beyond the vocabulary": batch(
        {
            "spans": [[0, 0, 1]],
            "sample": [[0, 0, 1, 0, 0, -1]],
            "penalties": [[0, 0.5, 0.5, [[10**9, 1]]]],
        },
        torch.zeros(1, 576),
    ),
    "penalty of a row not sampled": batch(
        {"spans": [[0, 0, 1]], "sample": [], "penalties": [[0, 0.5, 0.5, []]]},
        torch.zeros(1, 576),
    ),
    "bad sampling values": batch(
        {"spans": [[0, 0, 1]], "sample": [[0, -1, 7, 0, 0, -1]]}, torch.zeros(1, 576)
    ),
}


def assert_still_serving(cluster: Cluster, tokens: int) -> None:
    body = {
        "model": cluster.model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": tokens,
    }
    response = httpx.post(f"{cluster.url}/v1/chat/completions", timeout=60, json=body)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == tokens


def test_malformed_frames_get_error_frames(cluster: Cluster, home: Path) -> None:
    async def scenario() -> list[tuple[str, str]]:
        dialer, connection, collector = await dial(cluster, home)
        answers = []
        try:
            for name, (data, _) in {
                **BAD_FRAMES,
                **{k: (v, "bad_batch") for k, v in BAD_BATCHES.items()},
            }.items():
                raw_send(connection, data)
                frame = await collector.next()
                assert frame.kind == Kind.ERROR, name
                answers.append((name, frame.meta["code"]))
            assert not connection.closed
        finally:
            await dialer.close()
        return answers

    answers = asyncio.run(scenario())
    expected = [(name, code) for name, (_, code) in BAD_FRAMES.items()]
    expected += [(name, "bad_batch") for name in BAD_BATCHES]
    assert answers == expected
    assert_still_serving(cluster, 3)


def test_many_frames_on_one_connection(cluster: Cluster, home: Path) -> None:
    """Far more frames than QUIC's initial stream limit (128) on one link."""

    async def scenario() -> int:
        dialer, connection, collector = await dial(cluster, home)
        try:
            for index in range(400):
                connection.send(Frame(Kind.HEARTBEAT, index, {"ping": True}))
                if index % 50 == 49:
                    await asyncio.sleep(0.05)
            deadline = asyncio.get_running_loop().time() + 20
            while len(collector.frames) < 400 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            return sum(
                1 for f in collector.frames if f.kind == Kind.HEARTBEAT and f.meta.get("pong")
            )
        finally:
            await dialer.close()

    assert asyncio.run(scenario()) == 400


def test_wrong_join_token_is_refused(cluster: Cluster, home: Path) -> None:
    async def scenario() -> None:
        await dial(cluster, home, token="mp1-not-the-token")

    with pytest.raises(JoinRefused, match="join token"):
        asyncio.run(scenario())


def test_frames_before_hello_are_refused(cluster: Cluster, home: Path) -> None:
    """A peer that skips HELLO gets an ERROR and the connection is closed; nothing reaches the stage."""

    async def scenario() -> tuple[Frame, bool]:
        from aioquic.asyncio import connect

        from meshpipe.quic import configuration, connection_factory

        identity = load_or_create_identity(home / "test-peer", "peer")
        collector = Collector()
        host, port = worker_address(cluster, 0)
        config = configuration(True, identity, 16000)
        async with connect(
            host, port, configuration=config, create_protocol=connection_factory(collector, "x")
        ) as connection:
            connection.authenticated = True  # skip our own HELLO: send a BATCH straight away
            raw_send(connection, batch({"spans": [[0, 0, 1]]}, torch.zeros(1, dtype=torch.int64)))
            frame = await collector.next()
            await asyncio.sleep(0.5)
            return frame, connection.closed

    frame, closed = asyncio.run(scenario())
    assert frame.kind == Kind.ERROR and frame.meta["code"] == "unauthorized"
    assert closed
    assert json.loads(json.dumps(frame.meta))["message"]


def chained(message_id: int, meta: dict, plan_id: int) -> Frame:
    """A step for the first stage that waits for the tokens of batch `meta["after"]`."""
    spans = {"spans": [[15, 0, 1]], "sample": [], "plan_id": plan_id}
    return Frame(Kind.BATCH, message_id, spans | meta, torch.zeros(1, dtype=torch.int64))


def test_malformed_token_loop_frames_get_error_frames(cluster: Cluster, home: Path) -> None:
    """Steps waiting for a feed and feeds, sent to the first stage: each malformed one gets an
    ERROR, a step whose feed never comes is dropped with one once MAX_AWAITING wait behind it,
    and the stage keeps serving. (Batch ids far above the gateway's own: errors about a step
    are reported to the gateway too.)"""
    from worker.node import MAX_AWAITING

    plan_id = cluster.status()["pipeline"]["plan_id"]
    b = 10**12

    async def scenario() -> list[tuple[int, str]]:
        dialer, connection, collector = await dial(cluster, home, stage=0)
        answers = []
        try:
            frames = [
                chained(b + 1, {"after": "one"}, plan_id),
                chained(b + 2, {"after": 2 * b, "fed": [[5, 0]]}, plan_id),  # no input row 5
                chained(b + 3, {"after": 2 * b, "fed": "all"}, plan_id),
                Frame(Kind.FEED, b + 4, {}, torch.zeros(2)),  # not token ids
                chained(b + 5, {"after": 2 * b + 5, "fed": [[0, 3]]}, plan_id),
                Frame(Kind.FEED, 2 * b + 5, {}, torch.tensor([7])),  # the feed has no token 3
                Frame(Kind.FEED, 2 * b + 6, {}, torch.tensor([-1])),
                chained(b + 6, {"after": 2 * b + 6, "fed": [[0, 0]]}, plan_id),  # out of range
            ]
            for frame in frames:
                connection.send(frame)
            for _ in range(6):
                error = await collector.next()
                answers.append((error.message_id - b, error.meta["code"]))
            # Steps whose feeds never come: the oldest is dropped with an ERROR.
            for index in range(MAX_AWAITING + 1):
                meta = {"after": 3 * b + index, "fed": [[0, 0]]}
                connection.send(chained(b + 100 + index, meta, plan_id))
            error = await collector.next()
            answers.append((error.message_id - b, error.meta["code"]))
            await asyncio.sleep(0.3)
            assert not collector.frames and not connection.closed
        finally:
            await dialer.close()
        return answers

    assert asyncio.run(scenario()) == [
        (1, "bad_batch"),
        (2, "bad_batch"),
        (3, "bad_batch"),
        (4, "bad_feed"),
        (5, "bad_batch"),
        (6, "bad_batch"),
        (100, "feed_lost"),
    ]
    assert_still_serving(cluster, 4)

"""The two ends of `meshpipe bench transport`'s links: the server child and the client's links.

The server child listens for meshpipe QUIC and for plain TCP: it echoes ECHO frames (decode-sized
round trips), acknowledges transfers (prefill-sized), and reports the largest datagrams it saw.
The client holds one `QuicLink` and one `TcpLink` (the anchor: the same payloads, length-prefixed,
over asyncio streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from meshpipe.identity import load_or_create_identity
from meshpipe.quic import MeshConnection, bound_port, listen
from meshpipe.wire import Frame, Kind

TOKEN_ENV = "MESHPIPE_BENCH_TOKEN"
TRANSFER_BUDGET = 512 << 20  # bytes per size and link, so large sizes take few repeats
TCP_HEADER = struct.Struct("<BQ")  # kind, payload length
TCP_ECHO, TCP_ACK = 1, 2
# Not in Python's socket module: IP_MTU_DISCOVER, IPV6_MTU_DISCOVER, IP(V6)_PMTUDISC_DO.
LINUX_IP_MTU_DISCOVER, LINUX_IPV6_MTU_DISCOVER, LINUX_PMTUDISC_DO = 10, 23, 2


# -- wire observation --------------------------------------------------------------------------


class DatagramSizes:
    """The largest UDP datagrams a process sent and received (the bench checks the path MTU)."""

    def __init__(self) -> None:
        self.largest_sent = 0
        self.largest_received = 0
        self.dont_fragment = False
        self.max_datagram_size = 0  # what the link's packets were sized for

    def watch_sends(self, transport: Any) -> None:
        send = transport.sendto

        def sendto(data: bytes, addr: Any = None) -> None:
            self.largest_sent = max(self.largest_sent, len(data))
            send(data, addr)

        # A compiled transport (uvloop's) has read-only methods: the peer's receive side, which
        # is watched too, still sees these datagrams.
        with contextlib.suppress(AttributeError):
            transport.sendto = sendto

    def watch_receives(self, protocol: Any) -> None:
        receive = protocol.datagram_received

        def datagram_received(data: bytes, addr: Any) -> None:
            self.largest_received = max(self.largest_received, len(data))
            receive(data, addr)

        protocol.datagram_received = datagram_received

    def as_dict(self) -> dict[str, int]:
        return {
            "largest_sent": self.largest_sent,
            "largest_received": self.largest_received,
            "dont_fragment": self.dont_fragment,
            "max_datagram_size": self.max_datagram_size,
        }


def forbid_fragmentation(transport: Any) -> bool:
    """Set DF on a UDP socket (Linux): an oversized datagram then fails with EMSGSIZE instead
    of leaving in fragments. A dual-stack socket (aioquic's client) takes both options, the
    IPv4 one governing its IPv4-mapped traffic. True when set."""
    sock = transport.get_extra_info("socket")
    if sock is None or sys.platform != "linux":
        return False
    options = [(socket.IPPROTO_IP, LINUX_IP_MTU_DISCOVER)]
    if sock.family == socket.AF_INET6:
        options.append((socket.IPPROTO_IPV6, LINUX_IPV6_MTU_DISCOVER))
    for level, option in options:
        sock.setsockopt(level, option, LINUX_PMTUDISC_DO)
    return all(sock.getsockopt(level, option) == LINUX_PMTUDISC_DO for level, option in options)


# -- the server child --------------------------------------------------------------------------


class EchoServer:
    """Echoes ECHO frames, acknowledges transfers, reports what it saw on the wire."""

    def __init__(self, sizes: DatagramSizes) -> None:
        self.sizes = sizes
        self.watched = False

    def on_frame(self, connection: MeshConnection, frame: Frame) -> None:
        if not self.watched:
            self.sizes.watch_sends(connection._transport)
            self.sizes.dont_fragment = forbid_fragmentation(connection._transport)
            self.sizes.max_datagram_size = connection._quic._max_datagram_size
            self.watched = True
        if frame.kind != Kind.ECHO:
            return
        if frame.meta.get("ack"):
            received = 0 if frame.payload is None else frame.payload.nbytes
            connection.send(Frame(Kind.ECHO, frame.message_id, {"received": received}))
        elif frame.meta.get("stats"):
            stats = {**self.sizes.as_dict(), "cpu_seconds": time.process_time()}
            connection.send(Frame(Kind.ECHO, frame.message_id, stats))
        else:
            connection.send(Frame(Kind.ECHO, frame.message_id, {}, frame.payload))

    def on_closed(self, connection: MeshConnection) -> None:
        pass


async def serve_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            head = await reader.readexactly(TCP_HEADER.size)
            kind, length = TCP_HEADER.unpack(head)
            body = await reader.readexactly(length)
            if kind == TCP_ECHO:
                writer.writelines((head, body))
            else:
                writer.write(TCP_HEADER.pack(TCP_ACK, 0))
            await writer.drain()
    writer.close()


async def serve(host: str) -> None:
    """Listen on QUIC and TCP, print the ports, serve until stdin closes."""
    token = os.environ[TOKEN_ENV]
    sizes = DatagramSizes()
    with tempfile.TemporaryDirectory() as directory:
        identity = load_or_create_identity(Path(directory), "bench-server")
        quic = await listen(host, 0, identity, EchoServer(sizes), token)
        sizes.watch_receives(quic)
        tcp = await asyncio.start_server(serve_tcp, host, 0, limit=TRANSFER_BUDGET)
        tcp_port = tcp.sockets[0].getsockname()[1]
        print(f"ready {bound_port(quic)} {tcp_port}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        quic.close()
        tcp.close()


# -- the client --------------------------------------------------------------------------------


class Replies:
    """Futures for the answers to ECHO frames, by message id."""

    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future[Frame]] = {}
        self.next_id = 1

    def expect(self) -> tuple[int, asyncio.Future[Frame]]:
        message_id, self.next_id = self.next_id, self.next_id + 1
        future = asyncio.get_running_loop().create_future()
        self.waiting[message_id] = future
        return message_id, future

    def on_frame(self, connection: MeshConnection, frame: Frame) -> None:
        future = self.waiting.pop(frame.message_id, None)
        if future is not None and not future.done():
            future.set_result(frame)

    def on_closed(self, connection: MeshConnection) -> None:
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(ConnectionError("the QUIC link closed"))


class QuicLink:
    """The client end of a meshpipe QUIC link to the server child."""

    def __init__(self, connection: MeshConnection, replies: Replies) -> None:
        self.connection = connection
        self.replies = replies

    async def request(self, meta: dict[str, Any], tensor: torch.Tensor | None) -> Frame:
        message_id, reply = self.replies.expect()
        self.connection.send(Frame(Kind.ECHO, message_id, meta, tensor))
        return await reply

    async def server_cpu(self) -> float:
        return float((await self.request({"stats": True}, None)).meta["cpu_seconds"])

    async def round_trip(self, tensor: torch.Tensor) -> float:
        message_id, reply = self.replies.expect()
        frame = Frame(Kind.ECHO, message_id, {}, tensor)
        start = time.perf_counter()
        self.connection.send(frame)
        await reply
        return time.perf_counter() - start

    async def transfer(self, tensor: torch.Tensor) -> float:
        message_id, reply = self.replies.expect()
        frame = Frame(Kind.ECHO, message_id, {"ack": True}, tensor)
        start = time.perf_counter()
        self.connection.send(frame)
        answer = await reply
        elapsed = time.perf_counter() - start
        assert answer.meta.get("received") == tensor.nbytes, answer.meta
        return elapsed


class TcpLink:
    """The anchor: the same payloads, length-prefixed, over a plain asyncio TCP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def _send(self, kind: int, tensor: torch.Tensor) -> bytes:
        body = memoryview(tensor.numpy()).cast("B")
        self.writer.writelines((TCP_HEADER.pack(kind, body.nbytes), body))
        _, length = TCP_HEADER.unpack(await self.reader.readexactly(TCP_HEADER.size))
        return await self.reader.readexactly(length)

    async def round_trip(self, tensor: torch.Tensor) -> float:
        start = time.perf_counter()
        await self._send(TCP_ECHO, tensor)
        return time.perf_counter() - start

    async def transfer(self, tensor: torch.Tensor) -> float:
        start = time.perf_counter()
        await self._send(TCP_ACK, tensor)
        return time.perf_counter() - start

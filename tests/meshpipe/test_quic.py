"""Real meshpipe QUIC links on loopback: frames, join token, bad frames, backpressure, datagram size."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import torch
from aioquic.asyncio import connect
from aioquic.asyncio import server as aioquic_server
from aioquic.asyncio.server import QuicServer
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import StreamDataReceived
from aioquic.quic.packet_builder import QuicPacketBuilder

from meshpipe.identity import Identity, new_join_token
from meshpipe.quic import (
    LAN_DATAGRAM_SIZE,
    LOOPBACK_DATAGRAM_SIZE,
    SHARED_STREAM_FRAME_LIMIT,
    SMALLEST_DATAGRAM_SIZE,
    Dialer,
    JoinRefused,
    MeshConnection,
    bound_port,
    configuration,
    connection_factory,
    datagram_size_for,
    listen,
)
from meshpipe.wire import HEADER, MAGIC, VERSION, DType, Frame, Kind

HOST = "127.0.0.1"
SECONDS = 5.0


class Recorder:
    """Keeps the frames a connection hands over; echoes ECHO frames when asked to."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.frames: list[Frame] = []
        self.closed: list[MeshConnection] = []
        self.changed = asyncio.Event()

    def on_frame(self, connection: MeshConnection, frame: Frame) -> None:
        self.frames.append(frame)
        self.changed.set()
        if self.echo and frame.kind == Kind.ECHO:
            connection.send(Frame(Kind.ECHO, frame.message_id, frame.meta, frame.tensor))

    def on_closed(self, connection: MeshConnection) -> None:
        self.closed.append(connection)
        self.changed.set()

    def of_kind(self, kind: Kind) -> list[Frame]:
        return [frame for frame in self.frames if frame.kind == kind]

    async def wait_for(self, condition: Callable[[], bool], seconds: float = SECONDS) -> None:
        async def poll() -> None:
            while not condition():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(poll(), seconds)


async def eventually(condition: Callable[[], bool], seconds: float = SECONDS) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), seconds)


@contextlib.asynccontextmanager
async def mesh_server(
    identity: Identity, handler: Recorder, token: str
) -> AsyncIterator[QuicServer]:
    server = await listen(HOST, 0, identity, handler, token)
    try:
        yield server
    finally:
        server.close()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 15))


def raw_send(connection: MeshConnection, data: bytes) -> None:
    """Bytes on a stream of their own, whatever they are (the way a broken peer sends)."""
    stream_id = connection._quic.get_next_available_stream_id(is_unidirectional=True)
    connection._quic.send_stream_data(stream_id, data, end_stream=True)
    connection.transmit()


def header(kind: int, dtype: int, shape: tuple[int, ...], meta_length: int, payload: int) -> bytes:
    dims = list(shape) + [0] * (4 - len(shape))
    return HEADER.pack(
        MAGIC, VERSION, kind, dtype, len(shape), 0, 0, 7, meta_length, *dims, payload
    )


def test_frames_with_tensors_round_trip(identities: tuple[Identity, Identity]) -> None:
    server_identity, peer_identity = identities
    token = new_join_token()
    torch.manual_seed(0)
    tensors = [
        torch.randn(3, 576),
        torch.randn(2, 7).to(torch.bfloat16),
        torch.arange(12, dtype=torch.int64).view(2, 2, 3),
        torch.randn(1024, 1024),  # 4 MiB: many datagrams, and the wide STREAM frames
    ]

    async def scenario() -> None:
        server, client = Recorder(echo=True), Recorder()
        async with mesh_server(server_identity, server, token) as listening:
            port = bound_port(listening)
            dialer = Dialer(peer_identity, token)
            connection = await dialer.dial(HOST, port, client, {"node_id": "peer"})
            for index, tensor in enumerate(tensors, start=1):
                connection.send(Frame(Kind.ECHO, index, {"index": index, "note": "é"}, tensor))
            await client.wait_for(lambda: len(client.frames) == len(tensors))
            await dialer.close()
        # The 4 MiB frame has a stream of its own, so the frames may overtake each other.
        answers = sorted(client.frames, key=lambda frame: frame.message_id)
        for index, (frame, tensor) in enumerate(zip(answers, tensors, strict=True), 1):
            assert (frame.kind, frame.message_id) == (Kind.ECHO, index)
            assert frame.meta == {"index": index, "note": "é"}
            assert frame.tensor is not None and frame.tensor.dtype == tensor.dtype
            assert torch.equal(frame.tensor, tensor)
        assert server.frames[0].kind == Kind.HELLO and server.frames[0].meta["node_id"] == "peer"

    run(scenario)


def test_a_wrong_join_token_is_refused(identities: tuple[Identity, Identity]) -> None:
    server_identity, peer_identity = identities

    async def scenario() -> None:
        server = Recorder(echo=True)
        async with mesh_server(server_identity, server, new_join_token()) as listening:
            port = bound_port(listening)
            dialer = Dialer(peer_identity, new_join_token())
            with pytest.raises(JoinRefused, match="join token"):
                await dialer.dial(HOST, port, Recorder(), {"node_id": "intruder"})
            await dialer.close()
        assert server.frames == [] and server.closed == []

    run(scenario)


def test_frames_before_hello_get_an_error_and_never_reach_the_handler(
    identities: tuple[Identity, Identity],
) -> None:
    server_identity, peer_identity = identities
    token = new_join_token()

    async def scenario() -> None:
        server, client = Recorder(echo=True), Recorder()
        async with mesh_server(server_identity, server, token) as listening:
            port = bound_port(listening)
            config = configuration(True, peer_identity, datagram_size_for(HOST))
            factory = connection_factory(client, token)
            async with connect(HOST, port, configuration=config, create_protocol=factory) as peer:
                assert isinstance(peer, MeshConnection)
                peer.authenticated = True  # skip HELLO; hand the server's answer to `client`
                peer.send(Frame(Kind.ECHO, 1, {}, torch.ones(4)))
                peer.send(Frame(Kind.BATCH, 2, {"spans": [[0, 0, 1]]}, torch.ones(1, 576)))
                await client.wait_for(lambda: bool(client.closed))
        errors = client.of_kind(Kind.ERROR)
        assert errors and errors[0].meta["code"] == "unauthorized"
        assert client.of_kind(Kind.ECHO) == []
        assert server.frames == [] and server.closed == []

    run(scenario)


BAD_FRAMES = {
    "bad magic": (b"XXXX" + bytes(HEADER.size - 4), "bad_magic"),
    "unknown kind": (header(200, 0, (), 0, 0), "bad_kind"),
    "shape and length disagree": (header(Kind.ECHO, DType.FLOAT32, (4, 576), 0, 12), "bad_length"),
    "oversized payload": (
        header(Kind.ECHO, DType.UINT8, (1 << 20, 1 << 20), 0, 1 << 40),
        "too_large",
    ),
    "oversized metadata": (header(Kind.ECHO, 0, (), 1 << 30, 0), "too_large"),
    "tensor without a dimension": (header(Kind.ECHO, DType.FLOAT32, (), 0, 0), "bad_shape"),
    "truncated header": (header(Kind.ECHO, 0, (), 0, 0)[:20], "truncated"),
    "truncated payload": (
        header(Kind.ECHO, DType.FLOAT32, (2, 576), 0, 4608) + bytes(99),
        "truncated",
    ),
    "metadata not JSON": (header(Kind.ECHO, 0, (), 5, 0) + b"{oops", "bad_meta"),
}


def test_bad_frames_get_error_frames_and_the_link_keeps_serving(
    identities: tuple[Identity, Identity],
) -> None:
    server_identity, peer_identity = identities
    token = new_join_token()

    async def scenario() -> None:
        server, client = Recorder(echo=True), Recorder()
        async with mesh_server(server_identity, server, token) as listening:
            port = bound_port(listening)
            dialer = Dialer(peer_identity, token)
            connection = await dialer.dial(HOST, port, client, {"node_id": "peer"})
            for name, (data, code) in BAD_FRAMES.items():
                raw_send(connection, data)
                await client.wait_for(lambda: bool(client.frames))
                answer = client.frames.pop()
                assert (answer.kind, answer.meta.get("code")) == (Kind.ERROR, code), name
            connection.send(Frame(Kind.ECHO, 5, {"still": "serving"}, torch.ones(2, 3)))
            await client.wait_for(lambda: bool(client.frames))
            assert not connection.closed
            await dialer.close()
        echoed = client.frames.pop()
        assert (echoed.kind, echoed.message_id, echoed.meta) == (Kind.ECHO, 5, {"still": "serving"})
        assert [frame.kind for frame in server.frames] == [Kind.HELLO, Kind.ECHO]

    run(scenario)


def test_small_frames_share_a_stream_that_a_refused_frame_replaces(
    identities: tuple[Identity, Identity],
) -> None:
    server_identity, peer_identity = identities
    token = new_join_token()

    async def scenario() -> None:
        server, client = Recorder(echo=True), Recorder()
        async with mesh_server(server_identity, server, token) as listening:
            dialer = Dialer(peer_identity, token)
            connection = await dialer.dial(HOST, bound_port(listening), client, {"node_id": "p"})
            for index in range(1, 4):
                connection.send(Frame(Kind.ECHO, index, {}, torch.ones(576)))
            connection.send(Frame(Kind.ECHO, 4, {}, torch.ones(256, 256)))  # 256 KiB
            await client.wait_for(lambda: len(client.of_kind(Kind.ECHO)) == 4)
            shared = connection._shared_stream
            assert shared is not None
            # HELLO and the small frames on one stream, the large frame on one of its own.
            (accepted,) = set(listening._protocols.values())
            assert isinstance(accepted, MeshConnection)
            assert set(accepted._decoders) == {shared}

            # A frame the receiver refuses leaves the rest of its stream unframeable: the
            # receiver answers ERROR and stops the stream, and later frames take a new one.
            connection._quic.send_stream_data(shared, b"XXXX" + bytes(HEADER.size - 4))
            connection.transmit()
            await client.wait_for(lambda: bool(client.of_kind(Kind.ERROR)))
            assert client.of_kind(Kind.ERROR)[0].meta["code"] == "bad_magic"
            await eventually(lambda: connection._shared_stream is None)
            connection.send(Frame(Kind.ECHO, 5, {"after": "refusal"}, torch.ones(576)))
            await client.wait_for(lambda: len(client.of_kind(Kind.ECHO)) == 5)
            assert connection._shared_stream not in (None, shared)
            assert not connection.closed
            await dialer.close()
        assert client.of_kind(Kind.ECHO)[-1].meta == {"after": "refusal"}

    run(scenario)


def test_the_listener_routes_established_traffic_without_parsing_headers(
    identities: tuple[Identity, Identity], monkeypatch: pytest.MonkeyPatch
) -> None:
    server_identity, peer_identity = identities
    token = new_join_token()
    parsed: list[object] = []
    parse = aioquic_server.pull_quic_header

    def counting(*args: object, **kwargs: object) -> object:
        parsed.append(args)
        return parse(*args, **kwargs)  # type: ignore[arg-type]

    async def scenario() -> None:
        server, client = Recorder(echo=True), Recorder()
        async with mesh_server(server_identity, server, token) as listening:
            dialer = Dialer(peer_identity, token)
            connection = await dialer.dial(HOST, bound_port(listening), client, {"node_id": "p"})
            await asyncio.sleep(0.1)  # the last handshake packets
            monkeypatch.setattr(aioquic_server, "pull_quic_header", counting)
            for index in range(1, 6):
                connection.send(Frame(Kind.ECHO, index, {}, torch.ones(576)))
            await client.wait_for(lambda: len(client.of_kind(Kind.ECHO)) == 5)
            await dialer.close()
        assert parsed == []

    run(scenario)


def test_a_receiver_that_stops_reading_bounds_the_senders_buffer(
    identities: tuple[Identity, Identity],
) -> None:
    server_identity, peer_identity = identities
    token = new_join_token()
    limit, frames = 1 << 20, 24
    tensor = torch.zeros(256, 256)  # 256 KiB a frame
    frame_bytes = len(Frame(Kind.ECHO, 1, {}, tensor).head_and_tensor()[0]) + tensor.nbytes

    async def scenario() -> None:
        server = Recorder()
        async with mesh_server(server_identity, server, token) as listening:
            port = bound_port(listening)
            dialer = Dialer(peer_identity, token)
            connection = await dialer.dial(HOST, port, Recorder(), {"node_id": "peer"})
            seen: list[int] = []

            async def send_all() -> None:
                for index in range(1, frames + 1):
                    await connection.drain(limit)
                    connection.send(Frame(Kind.ECHO, index, {}, tensor))
                    seen.append(connection.buffered_bytes())

            # The receiving process stops reading its socket: nothing is ACKed any more.
            listening._transport.pause_reading()
            sender = asyncio.create_task(send_all())
            await asyncio.sleep(0.5)
            assert not sender.done(), "drain() let the sender run past the limit"
            assert max(seen) <= limit + frame_bytes
            assert connection.buffered_bytes() <= limit + frame_bytes
            listening._transport.resume_reading()
            await asyncio.wait_for(sender, SECONDS)
            await server.wait_for(lambda: len(server.of_kind(Kind.ECHO)) == frames)
            # drain() wakes as ACKs arrive, down to nothing in flight.
            await asyncio.wait_for(connection.drain(0), SECONDS)
            assert connection.buffered_bytes() == 0
            await dialer.close()
        assert max(seen) <= limit + frame_bytes
        received = sorted(frame.message_id for frame in server.of_kind(Kind.ECHO))
        assert received == list(range(1, frames + 1))

    run(scenario)


def test_datagram_size_follows_the_path() -> None:
    assert datagram_size_for("127.0.0.1") == LOOPBACK_DATAGRAM_SIZE
    assert datagram_size_for("::1") == LOOPBACK_DATAGRAM_SIZE
    assert datagram_size_for("0.0.0.0") == LAN_DATAGRAM_SIZE
    assert datagram_size_for("some-host.invalid") == LAN_DATAGRAM_SIZE
    off_host = datagram_size_for("203.0.113.7")  # TEST-NET-3: never this machine
    assert SMALLEST_DATAGRAM_SIZE <= off_host <= LAN_DATAGRAM_SIZE


def test_a_listener_sizes_datagrams_for_each_peers_path(
    identities: tuple[Identity, Identity],
) -> None:
    server_identity, _ = identities

    async def scenario() -> None:
        # Bound to loopback, so configured for loopback; then a peer from off-host arrives.
        config = configuration(False, server_identity, datagram_size_for(HOST))
        quic = QuicConnection(configuration=config, original_destination_connection_id=bytes(8))
        connection = MeshConnection(quic, handler=Recorder(), token="")
        assert connection._quic._max_datagram_size == LOOPBACK_DATAGRAM_SIZE
        connection._fit_datagrams_to("203.0.113.7")
        size = connection._quic._max_datagram_size
        assert SMALLEST_DATAGRAM_SIZE <= size <= LAN_DATAGRAM_SIZE
        assert connection._quic._loss.congestion_window == 10 * size  # aioquic's initial window
        assert "_write_stream_frame" not in connection._quic.__dict__  # aioquic's own writer

    run(scenario)


def connected_pair(
    identities: tuple[Identity, Identity], datagram_size: int = LOOPBACK_DATAGRAM_SIZE
) -> tuple[QuicConnection, QuicConnection]:
    """A client and a server connection, handshake done, pumped in memory (no sockets)."""
    server_identity, peer_identity = identities
    client = QuicConnection(configuration=configuration(True, peer_identity, datagram_size))
    server = QuicConnection(
        configuration=configuration(False, server_identity, datagram_size),
        original_destination_connection_id=client.original_destination_connection_id,
    )
    for quic in (client, server):  # what MeshConnection does to its connection
        MeshConnection(quic, handler=Recorder(), token="")
    client.connect(("server", 1), now=1.0)
    for _ in range(4):
        for sender, receiver, address in ((client, server, "client"), (server, client, "server")):
            for data, _ in sender.datagrams_to_send(now=1.0):
                receiver.receive_datagram(data, (address, 1), now=1.0)
    assert client._handshake_confirmed and server._handshake_confirmed
    return client, server


def test_a_transmit_builds_the_packets_it_needs_and_no_empty_one(
    identities: tuple[Identity, Identity],
) -> None:
    async def scenario() -> None:
        client, server = connected_pair(identities)
        started = 0
        start_packet = QuicPacketBuilder.start_packet

        def counting(builder: QuicPacketBuilder, *args: object) -> None:
            nonlocal started
            started += 1
            start_packet(builder, *args)  # type: ignore[arg-type]

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(QuicPacketBuilder, "start_packet", counting)
            # Time stands still here: without pacing, as when it moves on in a real link.
            patch.setattr(client._loss._pacer, "next_send_time", lambda now: None)
            client.send_stream_data(2, bytes(2304))
            assert len(client.datagrams_to_send(now=2.0)) == 1
            assert started == 1  # aioquic alone starts a second packet, which stays empty
            started = 0
            client.send_stream_data(6, bytes(100_000), end_stream=True)
            sent: list[bytes] = []
            idle = 0  # transmits with nothing left: each sets up one packet, which stays empty
            for step in range(3):
                datagrams = client.datagrams_to_send(now=3.0 + step / 1000)
                sent += [data for data, _ in datagrams]
                idle += not datagrams
        assert started == len(sent) + idle
        assert [len(data) for data in sent[:-1]] == [LOOPBACK_DATAGRAM_SIZE] * (len(sent) - 1)
        for data in sent:
            server.receive_datagram(data, ("client", 1), now=4.0)
        events = iter(server.next_event, None)
        received = [event for event in events if getattr(event, "stream_id", None) == 6]
        assert sum(len(event.data) for event in received) == 100_000 and received[-1].end_stream

    run(scenario)


def pumped_pair(
    identities: tuple[Identity, Identity], datagram_size: int = LOOPBACK_DATAGRAM_SIZE
) -> tuple[QuicConnection, QuicConnection]:
    """connected_pair's connections, made in a loop of their own (MeshConnection needs one)."""

    async def make() -> tuple[QuicConnection, QuicConnection]:
        return connected_pair(identities, datagram_size)

    return asyncio.run(make())


def deliver_with_faults(
    deliver: Callable[[bytes], None], datagrams: list[bytes], step: int, held: bytes | None
) -> bytes | None:
    """One step's datagrams, delivered badly: all of them lost at steps 3 mod 5, one held back
    at steps 1 mod 6 (it arrives after the next one), each delivered twice at steps 0 mod 7.
    Returns the datagram still held back."""
    for data in datagrams:
        if step % 5 == 3:
            continue  # lost
        if step % 6 == 1 and held is None:
            held = data  # arrives after the next one
            continue
        deliver(data)
        if step % 7 == 0:
            deliver(data)  # duplicated
        if held is not None and held is not data:
            deliver(held)
            held = None
    return held


def test_lost_duplicated_and_reordered_datagrams_lose_nothing(
    identities: tuple[Identity, Identity],
) -> None:
    """A link's connections (meshpipe's packet writing included) with datagrams lost,
    duplicated and reordered: after loss recovery every byte arrives once, in order, and
    everything is acknowledged."""
    client, server = pumped_pair(identities)

    def deliver(receiver: QuicConnection, data: bytes, now: float) -> None:
        address = "client" if receiver is server else "server"
        receiver.receive_datagram(data, (address, 1), now=now)

    with pytest.MonkeyPatch.context() as patch:
        for quic in (client, server):  # time stands still between steps: no pacing
            patch.setattr(quic._loss._pacer, "next_send_time", lambda now: None)
        sent, held, now = bytearray(), None, 2.0
        for step in range(60):
            chunk = bytes([step]) * (1000 + 97 * step)
            client.send_stream_data(2, chunk)
            sent += chunk
            datagrams = [data for data, _ in client.datagrams_to_send(now=now)]
            held = deliver_with_faults(
                lambda data, now=now: deliver(server, data, now), datagrams, step, held
            )
            for data, _ in server.datagrams_to_send(now=now):
                deliver(client, data, now)
            now += 0.0005
        for _ in range(200):  # loss recovery, without losses now
            if client._loss.bytes_in_flight == 0 and client._streams[2].sender.buffer_is_empty:
                break
            timer = client.get_timer()
            if timer is not None and timer <= now + 0.001:
                client.handle_timer(now=max(now, timer))
            for sender, receiver in ((client, server), (server, client)):
                for data, _ in sender.datagrams_to_send(now=now):
                    deliver(receiver, data, now)
            now += 0.001
    received = b"".join(
        event.data
        for event in iter(server.next_event, None)
        if isinstance(event, StreamDataReceived) and event.stream_id == 2
    )
    assert received == bytes(sent)
    assert client._loss.bytes_in_flight == 0  # everything acknowledged


def test_a_burst_beyond_the_stream_limit_arrives_whole(
    identities: tuple[Identity, Identity],
) -> None:
    server_identity, peer_identity = identities
    token = new_join_token()
    # Large frames, a stream each: aioquic lets 128 streams be open at once, the rest wait
    # for the MAX_STREAMS credit that finished ones return.
    frames, values = 160, SHARED_STREAM_FRAME_LIMIT // 4 + 1

    async def scenario() -> None:
        server, client = Recorder(echo=True), Recorder()
        async with mesh_server(server_identity, server, token) as listening:
            dialer = Dialer(peer_identity, token)
            connection = await dialer.dial(HOST, bound_port(listening), client, {"node_id": "p"})
            for index in range(1, frames + 1):
                connection.queue(Frame(Kind.ECHO, index, {}, torch.full((values,), float(index))))
            connection.transmit()  # one transmit for the whole batch
            await client.wait_for(lambda: len(client.of_kind(Kind.ECHO)) == frames)
            await dialer.close()
        answers = {frame.message_id: frame.tensor for frame in client.of_kind(Kind.ECHO)}
        assert sorted(answers) == list(range(1, frames + 1))
        assert all(float(tensor[0]) == index for index, tensor in answers.items())

    run(scenario)


class Impostor(MeshConnection):
    """A server outside the mesh that welcomes anyone (it cannot prove the token)."""

    def _authenticate(self, frame: Frame) -> None:
        self.authenticated = True
        self.send(Frame(Kind.WELCOME, 0, {"proof": "0" * 64}))


def test_a_server_without_the_token_is_refused_by_the_client(
    identities: tuple[Identity, Identity],
) -> None:
    """Mutual proof: a worker that finds a 'gateway' (by mDNS, say) checks its WELCOME."""
    server_identity, peer_identity = identities
    token = new_join_token()

    async def scenario() -> None:
        from aioquic.asyncio import serve

        def impostor(*args, **kwargs) -> Impostor:
            return Impostor(*args, handler=Recorder(), token="not-the-token", **kwargs)

        config = configuration(False, server_identity, LOOPBACK_DATAGRAM_SIZE)
        listening = await serve(HOST, 0, configuration=config, create_protocol=impostor)
        try:
            dialer = Dialer(peer_identity, token)
            with pytest.raises(JoinRefused, match="without proving the join token"):
                await dialer.dial(HOST, bound_port(listening), Recorder(), {"node_id": "w"})
            await dialer.close()
        finally:
            listening.close()

    run(scenario)

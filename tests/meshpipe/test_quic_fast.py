"""meshpipe/quic_fast.py: small frames sent as a packet of their own, with aioquic's bookkeeping.

In memory (two connections pumped by hand, as in test_quic.py) for loss, duplication and the
conditions; over real sockets on loopback for the links that use it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import StreamDataReceived
from aioquic.tls import Epoch

from meshpipe.identity import Identity, new_join_token
from meshpipe.quic import LONE_ACK_DELAY, Dialer, MeshConnection, bound_port
from meshpipe.quic_fast import send_alone
from meshpipe.wire import Frame, Kind
from tests.meshpipe.test_quic import (
    HOST,
    Recorder,
    deliver_with_faults,
    mesh_server,
    pumped_pair,
    run,
)


def deliver(receiver: QuicConnection, data: bytes, now: float) -> None:
    """From the address connected_pair's connections know each other by."""
    receiver.receive_datagram(data, ("server" if receiver._is_client else "client", 1), now=now)


def pump(sender: QuicConnection, receiver: QuicConnection, now: float) -> None:
    for data, _ in sender.datagrams_to_send(now=now):
        deliver(receiver, data, now)


def stream_bytes(quic: QuicConnection, stream_id: int) -> bytes:
    return b"".join(
        event.data
        for event in iter(quic.next_event, None)
        if isinstance(event, StreamDataReceived) and event.stream_id == stream_id
    )


def no_pacing(patch: pytest.MonkeyPatch, *connections: QuicConnection) -> None:
    for quic in connections:  # time stands still between steps, as in test_quic.py
        patch.setattr(quic._loss._pacer, "next_send_time", lambda now: None)


def opened(client: QuicConnection, server: QuicConnection, stream_id: int, now: float) -> bytes:
    """A stream opened through aioquic, as MeshConnection opens its shared stream."""
    client.send_stream_data(stream_id, b"opened")
    pump(client, server, now)
    return b"opened"


def test_a_packet_sent_alone_is_received_acknowledged_and_leaves_nothing_due(
    identities: tuple[Identity, Identity],
) -> None:
    client, server = pumped_pair(identities)
    with pytest.MonkeyPatch.context() as patch:
        no_pacing(patch, client, server)
        now = 2.0
        sent = bytearray(opened(client, server, 2, now))
        answered = bytearray(opened(server, client, 3, now))
        stream, space = client._streams[2], client._spaces[Epoch.ONE_RTT]
        acks_sent = 0
        for step in range(40):
            out: list[tuple[bytes, Any]] = []
            chunk = bytes([step]) * (50 + 97 * step)
            number = client._packet_number
            had_ack = space.ack_at is not None and space.ack_at <= now
            assert send_alone(client, stream, chunk, now, lambda d, a, out=out: out.append((d, a)))
            acks_sent += had_ack
            assert client._packet_number == number + 1 and len(out) == 1
            assert out[0][1] == client._network_paths[0].addr
            if had_ack:
                assert space.ack_at is None  # the ACK went with the frame
            sent += chunk
            # aioquic finds nothing else to send: the packet took all that was due.
            assert client.datagrams_to_send(now=now) == []
            deliver(server, out[0][0], now)
            if step % 2:  # the server answers every other step, through aioquic
                server.send_stream_data(3, bytes([step]))
                answered += bytes([step])
                pump(server, client, now)
            now += 0.0005
            if step % 4 == 3:  # the peers' ACK delays expire
                now += 0.002
                pump(server, client, now)
                pump(client, server, now)
        now += 0.05
        pump(server, client, now)
        pump(client, server, now)
        assert stream_bytes(server, 2) == bytes(sent)
        assert stream_bytes(client, 3) == bytes(answered)
        assert acks_sent > 0  # some of the packets carried the client's ACK
        # Everything was acknowledged, in both directions, and the buffers let go of it.
        assert client._loss.bytes_in_flight == 0 and server._loss.bytes_in_flight == 0
        assert stream.sender._buffer_start == len(sent)


def test_lost_duplicated_and_reordered_packets_sent_alone_lose_nothing(
    identities: tuple[Identity, Identity],
) -> None:
    """Packets written by send_alone, mixed with aioquic's on another stream, lost, duplicated
    and reordered: aioquic retransmits the lost ones from the stream's buffer, and every byte
    arrives once, in order."""
    client, server = pumped_pair(identities)
    with pytest.MonkeyPatch.context() as patch:
        no_pacing(patch, client, server)
        now = 2.0
        small = bytearray(opened(client, server, 2, now))
        large = bytearray()
        held: bytes | None = None
        alone = 0
        for step in range(80):
            out: list[bytes] = []
            chunk = bytes([step]) * (200 + 31 * step)
            if send_alone(
                client, client._streams[2], chunk, now, lambda d, a, out=out: out.append(d)
            ):
                alone += 1
            else:  # something else was due: aioquic sends it, as MeshConnection.send would
                client.send_stream_data(2, chunk)
            small += chunk
            if step % 9 == 4:
                big = bytes([step]) * 150_000
                client.send_stream_data(6, big)
                large += big
            out += [data for data, _ in client.datagrams_to_send(now=now)]
            held = deliver_with_faults(
                lambda data, now=now: deliver(server, data, now), out, step, held
            )
            pump(server, client, now)
            now += 0.0005
        for _ in range(300):  # loss recovery, without losses now
            idle = client._loss.bytes_in_flight == 0
            if idle and all(s.sender.buffer_is_empty for s in client._streams.values()):
                break
            timer = client.get_timer()
            if timer is not None and timer <= now + 0.001:
                client.handle_timer(now=max(now, timer))
            pump(client, server, now)
            pump(server, client, now)
            now += 0.001
        events = [event for event in iter(server.next_event, None)]
    received = {
        stream_id: b"".join(
            e.data for e in events if isinstance(e, StreamDataReceived) and e.stream_id == stream_id
        )
        for stream_id in (2, 6)
    }
    assert received[2] == bytes(small) and received[6] == bytes(large)
    # Both paths were taken: alone when nothing else was due, through aioquic while a large
    # frame or a retransmission was.
    assert 20 <= alone < 80
    assert client._loss.bytes_in_flight == 0


def test_send_alone_declines_and_changes_nothing_when_more_is_due(
    identities: tuple[Identity, Identity],
) -> None:
    client, server = pumped_pair(identities)
    with pytest.MonkeyPatch.context() as patch:
        no_pacing(patch, client, server)
        now = 2.0
        opened(client, server, 2, now)
        pump(server, client, now + 0.01)
        stream = client._streams[2]

        def state() -> tuple[Any, ...]:
            sender = stream.sender
            return (
                client._packet_number,
                sender._buffer_stop,
                sender.highest_offset,
                client._remote_max_data_used,
                client._loss.bytes_in_flight,
                client._spaces[Epoch.ONE_RTT].ack_at,
            )

        def declines(data: bytes = b"frame") -> bool:
            before, out = state(), []
            result = send_alone(client, stream, data, now, lambda d, a: out.append(d))
            return not result and not out and state() == before

        client._ping_pending.append(7)  # a PING is due
        assert declines()
        client._ping_pending.clear()
        credit = stream.max_stream_data_remote
        stream.max_stream_data_remote = stream.sender._buffer_stop + 3  # the stream's credit
        assert declines()
        stream.max_stream_data_remote = credit
        assert declines(bytes(client._max_datagram_size))  # it does not fit in a datagram
        client.send_stream_data(6, b"another stream's data")  # due on another stream
        assert declines()
        pump(client, server, now)
        client.send_stream_data(2, b"unsent")  # the stream itself has data waiting
        assert declines()
        pump(client, server, now)
        client.close()  # closing
        assert declines()


def test_links_send_small_frames_alone_at_both_ends(
    identities: tuple[Identity, Identity],
) -> None:
    """Request and answer over real sockets: each small frame is a packet of its own at both
    ends, most ACKs ride in them, and the answers stay right and in order around a large
    frame."""
    server_identity, peer_identity = identities
    token = new_join_token()
    exchanges = 60

    async def scenario() -> None:
        server, client = Recorder(echo=True), Recorder()
        async with mesh_server(server_identity, server, token) as listening:
            dialer = Dialer(peer_identity, token)
            connection = await dialer.dial(HOST, bound_port(listening), client, {"node_id": "p"})
            (accepted,) = set(listening._protocols.values())
            datagrams = 0
            for transport in (connection._transport, listening._transport):
                send = transport.sendto

                def counting(data: bytes, addr: Any = None, send: Any = send) -> None:
                    nonlocal datagrams
                    datagrams += 1
                    send(data, addr)

                transport.sendto = counting  # type: ignore[method-assign]
            alone = (connection.packets_sent_alone, accepted.packets_sent_alone)
            for index in range(1, exchanges + 1):
                tensor = torch.full((576,), float(index)).to(torch.bfloat16)
                if index == exchanges // 2:
                    tensor = torch.full((256, 256), float(index))  # a large frame between
                connection.send(Frame(Kind.ECHO, index, {"i": index}, tensor))
                await client.wait_for(lambda n=index: len(client.of_kind(Kind.ECHO)) == n)
                await asyncio.sleep(0.003)  # past aioquic's 1 ms ACK delay, as between tokens
            answers = client.of_kind(Kind.ECHO)
            assert [frame.meta["i"] for frame in answers] == list(range(1, exchanges + 1))
            assert all(float(frame.tensor.flatten()[0]) == frame.meta["i"] for frame in answers)
            assert connection.packets_sent_alone - alone[0] >= exchanges - 3
            assert accepted.packets_sent_alone - alone[1] >= exchanges - 3
            # Two datagrams an exchange, an ACK alone every other exchange at the client (the
            # ACK of a second packet leaves after aioquic's 1 ms, before the next request), and
            # the large frame's. Had every lone packet's ACK left after 1 ms: four an exchange.
            assert datagrams <= 3 * exchanges + 16
            await dialer.close()

    run(scenario)


class AckWatch(Recorder):
    """Notes, as each frame is handed over, how long the receiver's ACK of it will wait."""

    def __init__(self) -> None:
        super().__init__()
        self.ack_waits: list[float] = []

    def on_frame(self, connection: MeshConnection, frame: Frame) -> None:
        if frame.kind == Kind.ECHO:
            ack_at = connection._quic._spaces[Epoch.ONE_RTT].ack_at
            assert ack_at is not None
            self.ack_waits.append(ack_at - connection._loop.time())
        super().on_frame(connection, frame)


def test_a_lone_packets_ack_waits_for_a_frame_and_a_second_ones_does_not(
    identities: tuple[Identity, Identity],
) -> None:
    """One way only: the ACK of a lone packet waits up to LONE_ACK_DELAY for a frame to carry
    it, the next packet's goes after aioquic's 1 ms, and the sender sees its data
    acknowledged; then request and answer take two datagrams an exchange, no ACK alone."""
    server_identity, peer_identity = identities
    token = new_join_token()

    async def scenario() -> None:
        server = AckWatch()
        async with mesh_server(server_identity, server, token) as listening:
            dialer = Dialer(peer_identity, token)
            connection = await dialer.dial(
                HOST, bound_port(listening), Recorder(), {"node_id": "p"}
            )
            await asyncio.sleep(0.1)  # the handshake's and HELLO's ACKs are all out
            connection.send(Frame(Kind.ECHO, 1, {}, torch.ones(576)))
            await server.wait_for(lambda: len(server.ack_waits) == 1)
            assert 0.5 * LONE_ACK_DELAY < server.ack_waits[0] <= LONE_ACK_DELAY
            assert connection.buffered_bytes() > 0  # not acknowledged yet
            connection.send(Frame(Kind.ECHO, 2, {}, torch.ones(576)))
            await server.wait_for(lambda: len(server.ack_waits) == 2)
            assert server.ack_waits[1] <= connection._quic._ack_delay
            deadline = connection._loop.time() + 5
            while connection.buffered_bytes() and connection._loop.time() < deadline:
                await asyncio.sleep(0.001)
            assert connection.buffered_bytes() == 0
            await dialer.close()

    run(scenario)

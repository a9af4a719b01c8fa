"""meshpipe/quic_fast.py: small frames sent as a packet of their own, with aioquic's bookkeeping.

In memory (two connections pumped by hand, as in test_quic.py) for loss, duplication and the
conditions; over real sockets on loopback for the links that use it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import StreamDataReceived
from aioquic.tls import Epoch

import meshpipe.quic
from meshpipe.identity import Identity, new_join_token
from meshpipe.quic import (
    LAN_DATAGRAM_SIZE,
    LONE_ACK_DELAY,
    LOOPBACK_DATAGRAM_SIZE,
    Dialer,
    MeshConnection,
    bound_port,
)
from meshpipe.quic_fast import (
    BURST_PACKETS,
    MAX_PACKETS_ALONE,
    BurstPacer,
    PeekedDecryption,
    peek,
    send_alone,
)
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
        pacer = quic._loss._pacer
        patch.setattr(pacer, "packet_time", None)
        patch.setattr(pacer, "update_rate", lambda **rate: None)


def opened(client: QuicConnection, server: QuicConnection, stream_id: int, now: float) -> bytes:
    """A stream opened through aioquic, as MeshConnection opens its shared stream."""
    client.send_stream_data(stream_id, b"opened")
    pump(client, server, now)
    return b"opened"


def recover(client: QuicConnection, server: QuicConnection, now: float) -> None:
    """Loss recovery without losses now: timers and pumps, 1 ms a step, until the client has
    nothing in flight or waiting (at most 300 steps)."""
    for _ in range(300):
        idle = client._loss.bytes_in_flight == 0
        if idle and all(s.sender.buffer_is_empty for s in client._streams.values()):
            return
        timer = client.get_timer()
        if timer is not None and timer <= now + 0.001:
            client.handle_timer(now=max(now, timer))
        pump(client, server, now)
        pump(server, client, now)
        now += 0.001


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
        recover(client, server, now)
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
        assert declines(bytes(client._max_datagram_size * MAX_PACKETS_ALONE))  # too many packets
        window = client._loss._cc.congestion_window
        client._loss._cc.congestion_window = client._loss.bytes_in_flight + 1500
        assert declines(bytes(2000)) and not declines(bytes(1000))  # the congestion window
        client._loss._cc.congestion_window = window
        pump(client, server, now)
        client.send_stream_data(6, b"another stream's data")  # due on another stream
        assert declines()
        pump(client, server, now)
        client.send_stream_data(2, b"unsent")  # the stream itself has data waiting
        assert declines()
        pump(client, server, now)
        client.close()  # closing
        assert declines()


def test_a_frame_over_several_small_packets_is_sent_alone_and_survives_loss(
    identities: tuple[Identity, Identity],
) -> None:
    """At a LAN's 1452-byte datagrams a decode-sized frame takes several packets: send_alone
    writes them all, numbered one after another; aioquic retransmits the lost ones from the
    stream's buffer, and every byte arrives once, in order."""
    client, server = pumped_pair(identities, LAN_DATAGRAM_SIZE)
    with pytest.MonkeyPatch.context() as patch:
        no_pacing(patch, client, server)
        now = 2.0
        sent = bytearray(opened(client, server, 2, now))
        stream, held, alone, several = client._streams[2], None, 0, 0
        for step in range(40):
            out: list[bytes] = []
            chunk = bytes([step]) * (900 + 397 * step)  # 1 to 12 packets
            number = client._packet_number
            if send_alone(client, stream, chunk, now, lambda d, a, out=out: out.append(d)):
                assert client._packet_number == number + len(out) and len(out) > step // 4
                assert client.datagrams_to_send(now=now) == []  # nothing else was due
                alone, several = alone + 1, several + (len(out) > 1)
            else:  # a retransmission or the congestion window: aioquic sends it
                client.send_stream_data(2, chunk)
                out = [data for data, _ in client.datagrams_to_send(now=now)]
            assert max((len(data) for data in out), default=0) <= LAN_DATAGRAM_SIZE
            sent += chunk
            held = deliver_with_faults(
                lambda data, now=now: deliver(server, data, now), out, step, held
            )
            now += 0.003
            pump(server, client, now)  # the server's delayed ACK
            client.handle_timer(now=now)  # loss detection
            pump(client, server, now)
        recover(client, server, now)
        assert stream_bytes(server, 2) == bytes(sent)
        assert alone >= 10 and several >= 5 and client._loss.bytes_in_flight == 0


def test_send_alone_declines_what_the_pacer_or_the_packet_count_holds_back(
    identities: tuple[Identity, Identity],
) -> None:
    client, server = pumped_pair(identities, LAN_DATAGRAM_SIZE)
    now = 2.0
    opened(client, server, 2, now)
    pump(server, client, now + 0.01)
    stream, pacer = client._streams[2], client._loss._pacer
    assert isinstance(pacer, BurstPacer)
    out: list[bytes] = []
    too_many = bytes(LAN_DATAGRAM_SIZE * MAX_PACKETS_ALONE)
    assert not send_alone(client, stream, too_many, now, lambda d, a: out.append(d))
    pacer.update_rate(congestion_window=14_520, smoothed_rtt=0.001)  # aioquic's bucket: 2.5 packets
    assert pacer.bucket_max >= BURST_PACKETS * pacer.packet_time
    pacer.bucket_time, pacer.evaluation_time = 4.5 * pacer.packet_time, now
    number = client._packet_number
    six = bytes(6 * 1300)  # six packets: more than the bucket holds now
    assert not send_alone(client, stream, six, now, lambda d, a: out.append(d))
    assert out == [] and client._packet_number == number
    pacer.bucket_time = 5.5 * pacer.packet_time
    assert send_alone(client, stream, six, now, lambda d, a: out.append(d))
    assert len(out) == 6 and pacer.bucket_time == 0.0


@contextlib.asynccontextmanager
async def linked(
    identities: tuple[Identity, Identity], server: Recorder, client: Recorder
) -> AsyncIterator[tuple[MeshConnection, MeshConnection]]:
    """A link over real sockets on loopback: the dialing connection and the accepted one."""
    server_identity, peer_identity = identities
    token = new_join_token()
    async with mesh_server(server_identity, server, token) as listening:
        dialer = Dialer(peer_identity, token)
        connection = await dialer.dial(HOST, bound_port(listening), client, {"node_id": "p"})
        (accepted,) = set(listening._protocols.values())
        try:
            yield connection, accepted
        finally:
            await dialer.close()


@pytest.mark.parametrize(
    ("datagram_size", "elements", "packets"),
    [(LOOPBACK_DATAGRAM_SIZE, 576, 1), (LAN_DATAGRAM_SIZE, 3000, 5)],
)
def test_links_send_small_frames_alone_at_both_ends(
    identities: tuple[Identity, Identity], datagram_size: int, elements: int, packets: int
) -> None:
    """Request and answer over real sockets: each small frame is a packet of its own at both
    ends (at a LAN's datagram size, five of them), most ACKs ride in them, and the answers
    stay right and in order around a large frame. A frame of several packets is handed on
    once its last one is peeked; aioquic receives the others after."""
    exchanges = 60

    async def scenario() -> None:
        server, client = Recorder(echo=True), Recorder()
        async with linked(identities, server, client) as (connection, accepted):
            datagrams = 0
            for transport in (connection._transport, accepted._transport):
                send = transport.sendto

                def counting(data: bytes, addr: Any = None, send: Any = send) -> None:
                    nonlocal datagrams
                    datagrams += 1
                    send(data, addr)

                transport.sendto = counting  # type: ignore[method-assign]
            alone = (connection.packets_sent_alone, accepted.packets_sent_alone)
            for index in range(1, exchanges + 1):
                tensor = torch.full((elements,), float(index)).to(torch.bfloat16)
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
            # Two frames an exchange, every ACK inside a frame, and the large frame's. Had
            # every lone packet's ACK left after aioquic's 1 ms: two more.
            # (at 1452 B the large frame is 188 packets each way, and their ACKs)
            large = 16 if packets == 1 else 16 + 3 * (256 * 256 * 4) // 1400
            assert datagrams <= 2 * packets * exchanges + large
            # The server answered from its peek at the request, before aioquic's receipt.
            assert accepted.packets_peeked >= (exchanges - 3) * packets
            assert connection.packets_peeked >= (exchanges - 3) * packets
            if packets > 1:
                assert accepted.receipts_deferred >= (exchanges - 3) * (packets - 1)
                assert connection.receipts_deferred >= (exchanges - 3) * (packets - 1)
            assert connection._quic._max_datagram_size == datagram_size

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(meshpipe.quic, "LOOPBACK_DATAGRAM_SIZE", datagram_size)
        run(scenario)


def ack_wait(connection: MeshConnection) -> float | None:
    """How long after its newest packet arrived the connection's pending ACK goes."""
    space = connection._quic._spaces[Epoch.ONE_RTT]
    return None if space.ack_at is None else space.ack_at - space.largest_received_time


async def received_by_aioquic(connection: MeshConnection, packets: int) -> None:
    """Until aioquic has received `packets` 1-RTT packets more than now (a peeked packet's
    frames are handed on before aioquic's own receipt, queued right behind them)."""
    space = connection._quic._spaces[Epoch.ONE_RTT]
    target = space.largest_received_packet + packets
    while space.largest_received_packet < target:
        await asyncio.sleep(0)


def test_a_lone_packets_ack_waits_for_a_frame_and_a_second_ones_does_not(
    identities: tuple[Identity, Identity],
) -> None:
    """One way only: the ACK of a lone packet waits LONE_ACK_DELAY for a frame to carry it,
    the next packet's goes after aioquic's 1 ms, and the sender sees its data acknowledged."""

    async def scenario() -> None:
        server = Recorder()
        async with linked(identities, server, Recorder()) as (connection, accepted):
            await asyncio.sleep(0.1)  # the handshake's and HELLO's ACKs are all out
            assert ack_wait(accepted) is None
            connection.send(Frame(Kind.ECHO, 1, {}, torch.ones(576)))
            await received_by_aioquic(accepted, 1)
            assert ack_wait(accepted) == pytest.approx(LONE_ACK_DELAY)
            assert connection.buffered_bytes() > 0  # not acknowledged yet
            connection.send(Frame(Kind.ECHO, 2, {}, torch.ones(576)))
            await received_by_aioquic(accepted, 1)
            assert ack_wait(accepted) == pytest.approx(accepted._quic._ack_delay)
            deadline = connection._loop.time() + 5
            while connection.buffered_bytes() and connection._loop.time() < deadline:
                await asyncio.sleep(0.001)
            assert connection.buffered_bytes() == 0
            assert len(server.of_kind(Kind.ECHO)) == 2

    run(scenario)


def test_peek_reads_a_packets_stream_frames_and_changes_nothing(
    identities: tuple[Identity, Identity],
) -> None:
    """peek decrypts a 1-RTT packet with the connection's keys and returns its STREAM frames,
    leaving aioquic's state as it was; it declines what aioquic must handle itself: a
    duplicate, a forged or misaddressed datagram, a FIN, a new key phase."""
    client, server = pumped_pair(identities)
    now, address = 2.0, ("client", 1)

    def one_datagram() -> bytes:
        (datagram,) = [data for data, _ in client.datagrams_to_send(now=now)]
        return datagram

    def state() -> tuple:
        space = server._spaces[Epoch.ONE_RTT]
        return (
            list(space.ack_queue),
            space.largest_received_packet,
            space.ack_at,
            len(server._events),
            server._cryptos[Epoch.ONE_RTT].recv.key_phase,
        )

    with pytest.MonkeyPatch.context() as patch:
        no_pacing(patch, client, server)
        client.send_stream_data(2, b"first frame")
        datagram = one_datagram()
        before = state()
        assert peek(server, datagram, address) == [(2, 0, b"first frame")]
        assert state() == before
        forged = datagram[:-1] + bytes([datagram[-1] ^ 1])
        assert peek(server, forged, address) is None
        assert peek(server, datagram, ("elsewhere", 1)) is None
        deliver(server, datagram, now)
        assert stream_bytes(server, 2) == b"first frame"
        assert peek(server, datagram, address) is None  # a duplicate
        client.send_stream_data(2, b"next", end_stream=True)
        assert peek(server, one_datagram(), address) is None  # with FIN
        client.send_ping(7)
        assert peek(server, one_datagram(), address) == []  # PING and ACK: no STREAM frame
        client.request_key_update()
        client.send_stream_data(6, b"new keys")
        assert peek(server, one_datagram(), address) is None


def test_a_peeked_packet_is_decrypted_once(identities: tuple[Identity, Identity]) -> None:
    """aioquic's receipt of a datagram that peek has just read takes peek's decryption; any
    other datagram, or the same one after another was received, it decrypts itself."""
    client, server = pumped_pair(identities)
    now, address = 2.0, ("client", 1)
    receiver = server._cryptos[Epoch.ONE_RTT].recv
    decrypt, calls = receiver.decrypt_packet, []

    def counted(*args: Any) -> Any:
        calls.append(args)
        return decrypt(*args)

    def one_datagram(data: bytes) -> bytes:
        client.send_stream_data(2, data)
        (datagram,) = [data for data, _ in client.datagrams_to_send(now=now)]
        return datagram

    with pytest.MonkeyPatch.context() as patch:
        no_pacing(patch, client, server)
        patch.setattr(receiver, "decrypt_packet", counted)
        decrypted = PeekedDecryption(server)
        first = one_datagram(b"first")
        assert peek(server, first, address, decrypted) == [(2, 0, b"first")]
        deliver(server, first, now)
        assert len(calls) == 1  # peek's alone
        assert stream_bytes(server, 2) == b"first"

        second, third = one_datagram(b"second"), one_datagram(b"third")
        assert peek(server, third, address, decrypted) == [(2, 11, b"third")]
        deliver(server, second, now)  # not the datagram peeked: decrypted by aioquic
        deliver(server, third, now)  # no longer the last one peeked: decrypted again
        assert len(calls) == 4
        assert stream_bytes(server, 2) == b"secondthird"
        assert decrypted.last is None


class Faulty:
    """A transport's datagrams sent badly: the 3rd of every 5 lost, the 1st of every 6 held
    back until the next (or 3 ms), every 7th sent twice."""

    def __init__(self, transport: Any) -> None:
        self.send = transport.sendto
        self.count = 0
        self.held: tuple[bytes, Any] | None = None
        transport.sendto = self.sendto

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.count += 1
        if self.count % 5 == 3:
            return
        if self.count % 6 == 1 and self.held is None:
            self.held = (data, addr)
            asyncio.get_running_loop().call_later(0.003, self.release)
            return
        self.send(data, addr)
        if self.count % 7 == 0:
            self.send(data, addr)
        self.release()

    def release(self) -> None:
        if self.held is not None:
            held, self.held = self.held, None
            self.send(*held)


@pytest.mark.parametrize(
    ("datagram_size", "elements"), [(LOOPBACK_DATAGRAM_SIZE, 64), (LAN_DATAGRAM_SIZE, 1500)]
)
def test_peeked_links_lose_nothing_to_loss_duplication_and_reordering(
    identities: tuple[Identity, Identity], datagram_size: int, elements: int
) -> None:
    """Small frames both ways over real sockets whose datagrams are lost, duplicated and
    reordered: frames handed on from peeks and from aioquic's receipts together arrive each
    once and in order; at a LAN's datagram size each frame takes five packets (and a fifth of
    them lost, fewer frames: its congestion window stays small)."""
    count = 150 if elements == 64 else 40

    async def scenario() -> None:
        server, client = Recorder(echo=True), Recorder()
        async with linked(identities, server, client) as (connection, accepted):
            Faulty(connection._transport)
            Faulty(accepted._transport)
            for index in range(1, count + 1):
                tensor = torch.full((elements,), index, dtype=torch.float32)
                connection.send(Frame(Kind.ECHO, index, {"i": index}, tensor))
                if index % 3 == 0:
                    await asyncio.sleep(0.001)
            await client.wait_for(lambda: len(client.of_kind(Kind.ECHO)) == count, 10)
            for recorder in (server, client):
                frames = recorder.of_kind(Kind.ECHO)
                assert [frame.meta["i"] for frame in frames] == list(range(1, count + 1))
                assert all(int(frame.tensor[0]) == frame.meta["i"] for frame in frames)
            assert 0 < accepted.packets_peeked  # and some data came after a gap:
            assert accepted.packets_peeked < count * (1 if elements == 64 else 5)
            assert connection.packets_peeked > 0
            assert connection._quic._max_datagram_size == datagram_size

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(meshpipe.quic, "LOOPBACK_DATAGRAM_SIZE", datagram_size)
        run(scenario)

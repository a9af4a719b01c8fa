"""The hand-off's fast paths around aioquic: a small frame written as 1-RTT packets by
meshpipe (one on loopback, up to MAX_PACKETS_ALONE at a LAN's datagram size), then aioquic's
bookkeeping for them (`send_alone`); and a received packet's stream
data read before aioquic's own receipt runs (`peek`).

aioquic builds every packet by asking each kind of frame whether it is due (ACK, path
validation, connection IDs, limits, pings, crypto, datagrams, every stream) through
`QuicPacketBuilder`, all in Python: most of a decode hop's CPU time (docs/transport.md). When
nothing but one small frame on the shared stream is due, `send_alone` writes its packets
itself (an ACK inside the first if one is due, as aioquic would), encrypts them with the
connection's own keys, hands them to the socket, and only then records them where aioquic's `_flush_builder`
and `_write_application` would have: the stream's sent range, connection credit, loss
recovery (so a lost packet is retransmitted from the stream's buffer by aioquic, as any
other), the idle deadline, the pacer and the path's byte count. If anything else is due, or
the frame does not fit the congestion window, the credit or the datagram, it returns False
before touching any state, and the caller takes aioquic's path.

`peek` decrypts a received 1-RTT packet with the connection's own keys, changing nothing, and
returns its STREAM frames if it holds nothing else but PADDING, PING and ACK frames; the
caller hands the data on at once and gives aioquic the same datagram right after, which then
does all of its bookkeeping (ACKs, loss recovery, credit) as for any packet. The packet is
decrypted once: `PeekedDecryption` hands peek's result to aioquic's receipt of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection, QuicConnectionState
from aioquic.quic.packet import QuicFrameType, QuicPacketType, push_ack_frame
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.quic.recovery import QuicPacketPacer
from aioquic.quic.stream import QuicStream
from aioquic.tls import Epoch

FIXED_BIT = 0x40
PACKET_NUMBER_BYTES = 2  # as aioquic sends them (packet_builder.PACKET_NUMBER_SEND_SIZE)
AEAD_TAG_BYTES = 16
STREAM_FIN_BIT = 1
STREAM_LENGTH_BIT = 2
STREAM_OFFSET_BIT = 4
STREAM_WITH_LENGTH = QuicFrameType.STREAM_BASE | STREAM_LENGTH_BIT
STREAM_HEADER_ROOM = 25  # type, stream id, offset and length: at most 1 + 3 * 8 bytes
ACK_ROOM = 64  # push_ack_frame needs room for four 8-byte fields; older ranges are left out
# A small frame over more packets than this (at 1452-byte datagrams, about 20 KB) is aioquic's.
MAX_PACKETS_ALONE = 16
BURST_PACKETS = 10  # the initial congestion window (RFC 9002 section 7.2)


def send_alone(
    quic: QuicConnection,
    stream: QuicStream,
    data: bytes,
    now: float,
    sendto: Callable[[bytes, Any], None],
) -> bool:
    """Send `data` on `stream` in packets of its own (one, or up to MAX_PACKETS_ALONE where
    the datagrams are small) if nothing else is due; False (and no change anywhere)
    otherwise."""
    sender = stream.sender
    offset, size = sender._buffer_stop, len(data)
    if (
        len(sender._pending)
        or sender._pending_eof
        or sender._buffer_fin is not None
        or sender._reset_error_code is not None
        or sender.highest_offset != offset
        or stream.is_blocked
        or offset + size > stream.max_stream_data_remote
        or quic._remote_max_data_used + size > quic._remote_max_data
        or not only_due(quic, stream)
    ):
        return False
    space = quic._spaces[Epoch.ONE_RTT]
    pn = quic._packet_number
    ack = space.ack_at is not None and space.ack_at <= now
    if ack and len(space.ack_queue) > 1 and pn % 8 == 0:
        return False  # aioquic adds its ACK-of-ACK PING to this packet
    crypto = quic._cryptos[Epoch.ONE_RTT]
    if crypto._update_key_requested:
        return False  # aioquic's next packet changes the keys
    peer_cid = quic._peer_cid.cid
    room = quic._max_datagram_size - 1 - len(peer_cid) - PACKET_NUMBER_BYTES - AEAD_TAG_BYTES
    room -= STREAM_HEADER_ROOM
    # The data's split: the first packet leaves room for the ACK, if one goes.
    first_room = room - (ACK_ROOM if ack else 0)
    bounds = [0, min(size, first_room)]
    while bounds[-1] < size and len(bounds) <= MAX_PACKETS_ALONE:
        bounds.append(min(size, bounds[-1] + room))
    count = len(bounds) - 1
    loss = quic._loss
    if first_room <= 0 or bounds[-1] < size or not paced_through(loss._pacer, count, ack, now):
        return False
    spans = [(offset + bounds[i], offset + bounds[i + 1]) for i in range(count)]  # stream offsets
    payloads, flight = [], 0
    overhead = len(peer_cid) + 1 + PACKET_NUMBER_BYTES + AEAD_TAG_BYTES
    for index, (start, stop) in enumerate(spans):
        payload = Buffer(capacity=stop - start + STREAM_HEADER_ROOM + (ACK_ROOM if ack else 0))
        if index == 0 and ack:
            payload.push_uint_var(QuicFrameType.ACK)
            delay = int((now - space.largest_received_time) * 1_000_000)
            delay >>= quic._local_ack_delay_exponent
            push_ack_frame(payload, space.ack_queue, delay, ACK_ROOM - 1)
        payload.push_uint_var(STREAM_WITH_LENGTH | (STREAM_OFFSET_BIT if start else 0))
        payload.push_uint_var(stream.stream_id)
        if start:
            payload.push_uint_var(start)
        payload.push_uint_var(stop - start)
        payload.push_bytes(data if count == 1 else data[start - offset : stop - offset])
        payloads.append(payload.data)
        flight += payload.tell() + overhead
    if loss.bytes_in_flight + flight > loss.congestion_window:
        return False

    first = FIXED_BIT | (quic._spin_bit << 5) | (crypto.key_phase << 2) | (PACKET_NUMBER_BYTES - 1)
    path = quic._network_paths[0]
    sent_bytes = []
    for index, payload in enumerate(payloads):
        number = pn + index
        header = bytes((first,)) + peer_cid + (number & 0xFFFF).to_bytes(2, "big")
        datagram = crypto.encrypt_packet(header, payload, number)
        sendto(datagram, path.addr)
        sent_bytes.append(len(datagram))

    # What aioquic's _write_application and _flush_builder record for the packets they send.
    quic._packet_number = pn + count
    sender.write(data)
    for index, (start, stop) in enumerate(spans):
        frame = sender.get_frame(stop - start, stop)
        assert frame is not None and frame.offset == start and len(frame.data) == stop - start
        handlers: list[tuple[Any, Any]] = [(sender.on_data_delivery, (start, stop, False))]
        if index == 0 and ack:
            handlers.append((quic._on_ack_delivery, (space, space.largest_received_packet)))
            space.ack_at = None
        packet = QuicSentPacket(
            epoch=Epoch.ONE_RTT,
            in_flight=True,
            is_ack_eliciting=True,
            is_crypto_packet=False,
            packet_number=pn + index,
            packet_type=QuicPacketType.ONE_RTT,
            sent_time=now,
            sent_bytes=sent_bytes[index],
            delivery_handlers=handlers,
        )
        loss.on_packet_sent(packet=packet, space=space)
        loss._pacer.update_after_send(now=now)
        path.bytes_sent += sent_bytes[index]
    sender.buffer_is_empty = True  # what aioquic's next get_frame would find
    quic._remote_max_data_used += size
    if not quic._ack_eliciting_sent_since_receipt:  # RFC 9000 section 10.1
        quic._close_at = now + quic._idle_timeout()
        quic._ack_eliciting_sent_since_receipt = True
    quic._pacing_at = None
    return True


def paced_through(pacer: QuicPacketPacer, count: int, ack: bool, now: float) -> bool:
    """Whether aioquic's pacer lets `count` packets leave now, one after another (it does not
    hold back a packet that carries a due ACK: the first, with `ack`)."""
    if pacer.packet_time is None or (count == 1 and ack):
        return True
    pacer.update_bucket(now=now)  # what its next_send_time does first
    bucket = pacer.bucket_time
    for index in range(count):
        if (index or not ack) and bucket <= 0:
            return False
        bucket = 0.0 if bucket < pacer.packet_time else bucket - pacer.packet_time
    return True


class BurstPacer(QuicPacketPacer):
    """aioquic's pacer, letting a burst of up to BURST_PACKETS leave at once (RFC 9002 section
    7.7: bursts limited to the initial congestion window, ten packets). aioquic's own bucket
    holds about two packets at a small congestion window: at 1452-byte datagrams an 8 KB
    hidden state (six packets) left in three bursts, each wait a timer of the event loop,
    which sleeps in whole milliseconds."""

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        super().update_rate(congestion_window=congestion_window, smoothed_rtt=smoothed_rtt)
        self.bucket_max = max(self.bucket_max, BURST_PACKETS * self.packet_time)  # type: ignore[operator]


def only_due(quic: QuicConnection, ours: QuicStream | None) -> bool:
    """Whether aioquic's next transmit would send nothing but an ACK and `ours`'s new data
    (with None: nothing but an ACK): the conditions of `_write_application`,
    `_write_connection_limits` and `_write_stream_limits`, in their order. A stream whose
    data all went out but that aioquic has not found empty yet counts as due."""
    path = quic._network_paths
    if (
        quic._state is not QuicConnectionState.CONNECTED
        or not quic._handshake_confirmed
        or quic._close_pending
        or quic._quic_logger is not None
        or len(path) != 1
        or not path[0].is_validated
        or path[0].remote_challenges
        or (quic._is_client and quic._remote_preferred_address is not None)
        or quic._handshake_done_pending
        or quic._retire_connection_ids
        or quic._streams_blocked_pending
        or quic._ping_pending
        or quic._probe_pending
        or quic._datagrams_pending
        or not quic._crypto_streams[Epoch.ONE_RTT].sender.buffer_is_empty
    ):
        return False
    for connection_id in quic._host_cids:
        if not connection_id.was_sent:
            return False
    max_data = quic._local_max_data
    if max_data.used * 2 > max_data.value or max_data.value != max_data.sent:
        return False
    for limit in (quic._local_max_streams_bidi, quic._local_max_streams_uni):
        if limit.value != limit.sent and limit.sent - limit.used < limit.value - limit.sent:
            return False  # a MAX_STREAMS frame is due
    for stream in quic._streams.values():
        local = stream.max_stream_data_local
        if (
            local and stream.receiver.highest_offset * 2 > local
        ) or stream.max_stream_data_local_sent != local:
            return False  # a MAX_STREAM_DATA frame is due
    for stream in quic._streams_queue:
        if stream.is_finished or stream.receiver.stop_pending or stream.sender.reset_pending:
            return False
        if stream is not ours and not stream.is_blocked and not stream.sender.buffer_is_empty:
            return False
    return True


STREAM_BASE = int(QuicFrameType.STREAM_BASE)
RESERVED_BITS = 0x18  # of a short header: zero, or aioquic closes the connection


def peek(
    quic: QuicConnection, data: bytes, addr: Any, decrypted: PeekedDecryption | None = None
) -> list[tuple[int, int, bytes]] | None:
    """The STREAM frames of `data` as (stream id, offset, bytes), if it is one 1-RTT packet
    of the current key phase, on the connection's one path, whose frames are all PADDING,
    PING, ACK or STREAM without FIN; None otherwise. No state of `quic` changes; the
    decryption is left in `decrypted` for aioquic's receipt of the packet."""
    host_cid = quic.host_cid
    start = 1 + len(host_cid)
    path = quic._network_paths
    if (
        data[0] & 0x80  # a long header: the handshake's, aioquic's alone
        or len(data) < start + 20
        or data[1:start] != host_cid
        or len(path) != 1
        or path[0].addr != addr
    ):
        return None
    space = quic._spaces[Epoch.ONE_RTT]
    pair = quic._cryptos[Epoch.ONE_RTT]
    receiver, expected = pair.recv, space.expected_packet_number
    keys = receiver.aead  # a key update replaces it (aioquic's apply_key_phase)
    try:
        header, payload, pn, new_phase = receiver.decrypt_packet(data, start, expected)
    except Exception:  # noqa: BLE001 - any packet aioquic would drop or refuse, it will
        return None
    if new_phase or header[0] & RESERVED_BITS or pn in space.received_packets:
        return None
    if decrypted is not None:
        decrypted.remember(data, start, expected, keys, (header, payload, pn))
    buf = Buffer(data=payload)
    frames: list[tuple[int, int, bytes]] = []
    try:
        while not buf.eof():
            kind = buf.pull_uint_var()
            if kind == QuicFrameType.PADDING or kind == QuicFrameType.PING:
                continue
            if kind == QuicFrameType.ACK or kind == QuicFrameType.ACK_ECN:
                buf.pull_uint_var()  # largest acknowledged
                buf.pull_uint_var()  # delay
                ranges = buf.pull_uint_var()
                for _ in range(1 + 2 * ranges + (3 if kind == QuicFrameType.ACK_ECN else 0)):
                    buf.pull_uint_var()
                continue
            if kind & ~7 != STREAM_BASE or kind & STREAM_FIN_BIT:  # not STREAM, or FIN
                return None
            stream_id = buf.pull_uint_var()
            offset = buf.pull_uint_var() if kind & STREAM_OFFSET_BIT else 0
            size = buf.pull_uint_var() if kind & STREAM_LENGTH_BIT else buf.capacity - buf.tell()
            frames.append((stream_id, offset, buf.pull_bytes(size)))
    except Exception:  # noqa: BLE001 - malformed: aioquic closes the connection for it
        return None
    return frames


class PeekedDecryption:
    """The last packet `peek` decrypted, and what came out: aioquic's receipt of the same
    datagram, which `peek`'s caller runs right after, takes it instead of decrypting again
    (one AES-GCM pass and one header-protection pass saved per packet). Used only for the
    very same bytes object at the same offset, packet number expectation and keys; anything
    else is decrypted by aioquic as before. Installed on a connection's 1-RTT keys, whose
    `decrypt_packet` (which aioquic's receive_datagram calls) it replaces on that instance;
    create it once those keys exist."""

    def __init__(self, quic: QuicConnection) -> None:
        self.pair = pair = quic._cryptos[Epoch.ONE_RTT]
        self.decrypt = pair.decrypt_packet
        pair.decrypt_packet = self.decrypt_packet  # type: ignore[method-assign]
        self.last: tuple[bytes, int, int, Any, tuple[bytes, bytes, int]] | None = None

    def remember(
        self, data: bytes, start: int, expected: int, keys: Any, result: tuple[bytes, bytes, int]
    ) -> None:
        self.last = (data, start, expected, keys, result)

    def decrypt_packet(self, packet: bytes, start: int, expected: int) -> tuple[bytes, bytes, int]:
        last, self.last = self.last, None
        if (
            last is not None
            and last[0] is packet  # aioquic slices a one-packet datagram to itself
            and last[1] == start
            and last[2] == expected
            and last[3] is self.pair.recv.aead
        ):
            return last[4]
        return self.decrypt(packet, start, expected)

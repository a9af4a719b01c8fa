"""aioquic's packet paths, adjusted for meshpipe's links (each change measured in
docs/transport.md): STREAM frames longer than 16 KiB for large datagrams, no empty packet set up
after the last one of a transmit, and shortened copies of aioquic's steps for the 1-RTT packets
of an established connection (receiving, frames, sending, packet building), each taking only the
case whose skipped checks cannot apply and handing the rest to aioquic. Each replaces one method
of a `QuicConnection` instance."""

from __future__ import annotations

import types
from typing import Any

from aioquic import tls
from aioquic.buffer import Buffer, BufferReadError, size_uint_var
from aioquic.quic.connection import (
    END_STATES,
    QuicConnection,
    QuicConnectionError,
    QuicConnectionState,
    QuicNetworkPath,
    QuicReceiveContext,
    stream_is_client_initiated,
)
from aioquic.quic.crypto import CryptoError, CryptoPair, KeyUnavailableError
from aioquic.quic.packet import (
    NON_ACK_ELICITING_FRAME_TYPES,
    PACKET_FIXED_BIT,
    PACKET_LONG_HEADER,
    PACKET_SPIN_BIT,
    PROBING_FRAME_TYPES,
    QuicErrorCode,
    QuicFrameType,
    QuicPacketType,
)
from aioquic.quic.packet_builder import QuicPacketBuilder, QuicPacketBuilderStop
from aioquic.quic.recovery import MAX_ACK_RANGES, QuicPacketSpace
from aioquic.quic.stream import QuicStream, StreamFinishedError

# aioquic writes a STREAM frame's length as a 2-byte varint (at most 16383): larger datagrams
# need the 4-byte field of _write_wide_stream_frame below.
NARROW_STREAM_FRAME_LIMIT = 16383
# A 1-RTT packet that ends with more room than this held everything that was due: a frame is
# cut to fit only when the packet is full (see _ApplicationPacketBuilder).
ROOM_LEFT_BYTES = 64
# The first byte's bits that tell a short header (1-RTT) from a long one.
SHORT_HEADER_MASK = PACKET_LONG_HEADER | PACKET_FIXED_BIT


def use_wide_frames_if_needed(quic: QuicConnection) -> None:
    """STREAM frames with a 4-byte length where datagrams exceed what 2 bytes can say."""
    if quic._max_datagram_size > NARROW_STREAM_FRAME_LIMIT:
        quic._write_stream_frame = types.MethodType(  # type: ignore[method-assign]
            _write_wide_stream_frame, quic
        )
    else:  # aioquic's own writer
        quic.__dict__.pop("_write_stream_frame", None)


def send_one_rtt_directly(quic: QuicConnection) -> None:
    """Datagrams of a confirmed connection on one path built by _datagrams_to_send."""
    quic.datagrams_to_send = types.MethodType(  # type: ignore[method-assign]
        _datagrams_to_send, quic
    )


def _datagrams_to_send(self: QuicConnection, now: float) -> list[tuple[bytes, Any]]:
    """aioquic's datagrams_to_send, shortened for a confirmed connection on one validated
    path with no probe due: no INITIAL or HANDSHAKE packets, no anti-amplification limit,
    no other path to probe, no preferred address to try, so what is left is its 1-RTT steps,
    in its order. Anything else (closing included) takes aioquic's own method."""
    paths = self._network_paths
    if (
        self._state is not QuicConnectionState.CONNECTED
        or self._close_pending
        or not self._handshake_confirmed
        or self._probe_pending
        or len(paths) != 1
        or not paths[0].is_validated
        or (self._is_client and self._remote_preferred_address is not None)
        or self._quic_logger is not None
    ):
        return QuicConnection.datagrams_to_send(self, now)
    network_path = paths[0]
    builder = QuicPacketBuilder(
        host_cid=self.host_cid,
        is_client=self._is_client,
        max_datagram_size=self._max_datagram_size,
        packet_number=self._packet_number,
        peer_cid=self._peer_cid.cid,
        peer_token=self._peer_token,
        quic_logger=self._quic_logger,
        spin_bit=self._spin_bit,
        version=self._version,
    )
    self._pacing_at = None  # set again only if pacing holds this attempt back
    builder.max_flight_bytes = self._loss.congestion_window - self._loss.bytes_in_flight
    try:
        self._write_application(builder, network_path, now)
    except QuicPacketBuilderStop:
        pass
    return _flush_one_rtt_builder(self, builder, network_path, now)


def _flush_one_rtt_builder(
    self: QuicConnection, builder: QuicPacketBuilder, network_path: QuicNetworkPath, now: float
) -> list[tuple[bytes, Any]]:
    """aioquic's _flush_builder for _datagrams_to_send's packets (1-RTT only, no logger)."""
    datagrams, packets = builder.flush()
    if datagrams:
        self._packet_number = builder.packet_number
        _, space, _ = _one_rtt_state(self)
        for packet in packets:
            assert packet.epoch is tls.Epoch.ONE_RTT
            packet.sent_time = now
            self._loss.on_packet_sent(packet=packet, space=space)
            # Restart the idle timer on the first ack-eliciting packet sent since the last
            # one received (RFC 9000 section 10.1).
            if packet.is_ack_eliciting and not self._ack_eliciting_sent_since_receipt:
                self._close_at = now + self._idle_timeout()
                self._ack_eliciting_sent_since_receipt = True
    addr = network_path.addr
    sent = []
    for datagram in datagrams:
        network_path.bytes_sent += len(datagram)
        sent.append((datagram, addr))
    return sent


def write_without_empty_packet(quic: QuicConnection) -> None:
    """1-RTT packets built by _ApplicationPacketBuilder."""
    quic._write_application = types.MethodType(  # type: ignore[method-assign]
        _write_application_without_empty_packet, quic
    )


def _write_wide_stream_frame(
    self: QuicConnection,
    builder: QuicPacketBuilder,
    space: QuicPacketSpace,
    stream: QuicStream,
    max_offset: int,
) -> int:
    """aioquic's _write_stream_frame with a 4-byte length field, for datagrams over 16 KiB."""
    sender = stream.sender
    offset_size = size_uint_var(sender.next_offset) if sender.next_offset else 0
    frame_overhead = 5 + size_uint_var(stream.stream_id) + offset_size
    previous_send_highest = sender.highest_offset
    frame = sender.get_frame(builder.remaining_flight_space - frame_overhead, max_offset)
    if frame is None:
        return 0
    frame_type = QuicFrameType.STREAM_BASE | 2  # with length
    if frame.offset:
        frame_type |= 4
    if frame.fin:
        frame_type |= 1
    buf = builder.start_frame(
        frame_type,
        capacity=frame_overhead,
        handler=sender.on_data_delivery,
        handler_args=(frame.offset, frame.offset + len(frame.data), frame.fin),
    )
    buf.push_uint_var(stream.stream_id)
    if frame.offset:
        buf.push_uint_var(frame.offset)
    buf.push_uint32(len(frame.data) | 0x80000000)  # varint, 4-byte form
    buf.push_bytes(frame.data)
    return sender.highest_offset - previous_send_highest


class _ApplicationPacketBuilder(QuicPacketBuilder):
    """aioquic's builder, for the 1-RTT packets of one transmit, without the empty last packet.

    aioquic's _write_application starts one more packet after each it fills, and stops at the
    first that stays empty: a packet set up, and a pass over every kind of frame, on every
    transmit for nothing. A packet that ended with room to spare held all that was due, so
    the next one stops here instead (datagrams_to_send catches QuicPacketBuilderStop as the
    end of the packets). Not when a stream was discarded meanwhile: aioquic announces the
    stream credit that returns in the next packet.
    """

    streams: dict[int, QuicStream]
    stream_count: int

    def start_packet(self, packet_type: QuicPacketType, crypto: CryptoPair) -> None:
        if (
            self._packet is not None
            and not self.packet_is_empty
            and self.remaining_flight_space > ROOM_LEFT_BYTES
            and len(self.streams) == self.stream_count
        ):
            raise QuicPacketBuilderStop
        self.stream_count = len(self.streams)
        super().start_packet(packet_type, crypto)


def _write_application_without_empty_packet(
    self: QuicConnection, builder: QuicPacketBuilder, network_path: Any, now: float
) -> None:
    """aioquic's _write_application, with the builder of _ApplicationPacketBuilder."""
    builder.__class__ = _ApplicationPacketBuilder  # the same object, one method overridden
    assert isinstance(builder, _ApplicationPacketBuilder)
    builder.streams, builder.stream_count = self._streams, len(self._streams)
    if _only_streams_due(self, network_path) and _write_one_packet(self, builder, now):
        return
    QuicConnection._write_application(self, builder, network_path, now)


def _only_streams_due(self: QuicConnection, network_path: QuicNetworkPath) -> bool:
    """Whether the next 1-RTT packet can hold nothing but an ACK, flow-control credit and
    stream frames: none of the frames aioquic's _write_application checks for before those is
    due (path challenges and responses, HANDSHAKE_DONE, connection IDs, STREAMS_BLOCKED, PING,
    CRYPTO, DATAGRAM)."""
    if not self._handshake_complete:
        return False
    crypto, _, _ = _one_rtt_state(self)
    if not (
        crypto.send.is_valid()
        and (network_path.is_validated or network_path.local_challenge_sent)
        and not self._handshake_done_pending
        and not network_path.remote_challenges
        and not self._retire_connection_ids
        and not self._streams_blocked_pending
        and not self._ping_pending
        and not self._probe_pending
        and not self._datagrams_pending
        and _one_rtt_crypto_stream(self).sender.buffer_is_empty
    ):
        return False
    for connection_id in self._host_cids:
        if not connection_id.was_sent:
            return False
    return True


def _write_one_packet(self: QuicConnection, builder: _ApplicationPacketBuilder, now: float) -> bool:
    """One pass of aioquic's _write_application loop where _only_streams_due holds, in its
    order. True when aioquic's loop would stop after it (pacing holds back, nothing was due,
    or the packet held all that was due: see _ApplicationPacketBuilder); otherwise its loop
    goes on with the next packet."""
    crypto, space, _ = _one_rtt_state(self)
    if space.ack_at is None or space.ack_at >= now:
        self._pacing_at = self._loss._pacer.next_send_time(now=now)
        if self._pacing_at is not None:
            return True
    builder.start_packet(QuicPacketType.ONE_RTT, crypto)
    if space.ack_at is not None and space.ack_at <= now:
        self._write_ack_frame(builder=builder, space=space, now=now)
    self._write_connection_limits(builder=builder, space=space)
    for stream in self._streams.values():
        self._write_stream_limits(builder=builder, space=space, stream=stream)
    discarded = _write_streams(self, builder, space)
    if builder.packet_is_empty:
        return not discarded  # discarded streams: the next packet announces MAX_STREAMS
    self._loss._pacer.update_after_send(now=now)
    if (
        builder.remaining_flight_space <= ROOM_LEFT_BYTES
        or len(self._streams) != builder.stream_count
    ):
        return False
    # aioquic's next pass: the pacing check, then start_packet stops it.
    if space.ack_at is None or space.ack_at >= now:
        self._pacing_at = self._loss._pacer.next_send_time(now=now)
    return True


def _write_streams(
    self: QuicConnection, builder: QuicPacketBuilder, space: QuicPacketSpace
) -> bool:
    """aioquic's stream frames of one _write_application pass (its code, with its comments);
    True when a finished stream was discarded."""
    sent: set[QuicStream] = set()
    discarded: set[QuicStream] = set()
    try:
        for stream in self._streams_queue:
            # if the stream is finished, discard it
            if stream.is_finished:
                self._streams.pop(stream.stream_id)
                if stream_is_client_initiated(stream.stream_id) != self._is_client:
                    # Let the peer open a new stream for each one that closes (RFC 9000
                    # section 4.6).
                    self._stream_limit(stream.stream_id).value += 1
                discarded.add(stream)
                continue
            if stream.receiver.stop_pending:
                self._write_stop_sending_frame(builder=builder, stream=stream)
            if stream.sender.reset_pending:
                self._write_reset_stream_frame(builder=builder, stream=stream)
            elif not stream.is_blocked and not stream.sender.buffer_is_empty:
                used = self._write_stream_frame(
                    builder=builder,
                    space=space,
                    stream=stream,
                    max_offset=min(
                        stream.sender.highest_offset
                        + self._remote_max_data
                        - self._remote_max_data_used,
                        stream.max_stream_data_remote,
                    ),
                )
                self._remote_max_data_used += used
                if used > 0:
                    sent.add(stream)
    finally:
        # A new service order, served streams at the end, even after an exception (the
        # same order when none was served or discarded).
        if sent or discarded:
            self._streams_queue = [
                stream
                for stream in self._streams_queue
                if not (stream in discarded or stream in sent)
            ]
            self._streams_queue.extend(sent)
    return bool(discarded)


def receive_one_rtt_directly(quic: QuicConnection) -> None:
    """1-RTT datagrams of an established connection taken by _receive_datagram."""
    quic.receive_datagram = types.MethodType(  # type: ignore[method-assign]
        _receive_datagram, quic
    )


def _receive_datagram(self: QuicConnection, data: bytes, addr: Any, now: float) -> None:
    """aioquic's receive_datagram, shortened for a 1-RTT packet of a connected peer.

    A datagram whose first byte is a short header holds one packet, to its end. When it comes
    from the active, validated path to this connection's current ID, none of aioquic's checks
    for other packet types, new paths or the first flight apply, so what is left is its 1-RTT
    steps, in its order. Anything else, and a packet that fails to decrypt (which changes
    nothing), takes aioquic's own method.
    """
    paths = self._network_paths
    cid_end = 1 + self._configuration.connection_id_length
    if (
        self._state is not QuicConnectionState.CONNECTED
        or self._quic_logger is not None
        or len(data) <= cid_end
        or data[0] & SHORT_HEADER_MASK != PACKET_FIXED_BIT
        or not paths
        or paths[0].addr != addr
        or not paths[0].is_validated
        or self._close_at is None
        or self._peer_cid.sequence_number is None
        or data[1:cid_end] != self.host_cid
    ):
        return QuicConnection.receive_datagram(self, data, addr, now)
    for connection_id in self._host_cids:
        if connection_id.cid == self.host_cid:
            break
    else:  # a retired ID: dropped there
        return QuicConnection.receive_datagram(self, data, addr, now)
    crypto, space, zero_rtt = _one_rtt_state(self)
    try:
        plain_header, payload, packet_number = crypto.decrypt_packet(
            data, cid_end, space.expected_packet_number
        )
    except (KeyUnavailableError, CryptoError):
        return QuicConnection.receive_datagram(self, data, addr, now)
    if packet_number in space.received_packets:
        return  # a duplicate (RFC 9000 section 12.3)
    if plain_header[0] & 0x18:
        self.close(
            error_code=QuicErrorCode.PROTOCOL_VIOLATION,
            frame_type=QuicFrameType.PADDING,
            reason_phrase="Reserved bits must be zero",
        )
        return
    if packet_number > space.expected_packet_number:
        space.expected_packet_number = packet_number + 1
    if not self._is_client and zero_rtt.recv.is_valid():
        zero_rtt.recv.teardown()  # RFC 9001 section 4.9.3
    if packet_number > self._spin_highest_pn:
        spin_bit = bool(plain_header[0] & PACKET_SPIN_BIT)
        self._spin_bit = not spin_bit if self._is_client else spin_bit
        self._spin_highest_pn = packet_number
    _one_rtt_payload_received(self, paths[0], space, data[1:cid_end], payload, packet_number, now)


def _one_rtt_state(self: QuicConnection) -> tuple[CryptoPair, QuicPacketSpace, CryptoPair]:
    """The 1-RTT keys and packet space, and the 0-RTT keys, found once per set of keys
    (a lookup by Epoch costs a Python-level hash): aioquic sets them up anew only before the
    handshake ends (a retry, a version negotiation)."""
    state = self.__dict__.get("_mesh_one_rtt")
    if state is None or state[0] is not self._cryptos:
        state = (
            self._cryptos,
            self._cryptos[tls.Epoch.ONE_RTT],
            self._spaces[tls.Epoch.ONE_RTT],
            self._cryptos[tls.Epoch.ZERO_RTT],
            self._crypto_streams[tls.Epoch.ONE_RTT],
        )
        self.__dict__["_mesh_one_rtt"] = state
    return state[1], state[2], state[3]


def _one_rtt_crypto_stream(self: QuicConnection) -> QuicStream:
    """The 1-RTT CRYPTO stream, found with _one_rtt_state's."""
    _one_rtt_state(self)
    return self.__dict__["_mesh_one_rtt"][4]


def _one_rtt_payload_received(
    self: QuicConnection,
    network_path: QuicNetworkPath,
    space: QuicPacketSpace,
    host_cid: bytes,
    payload: bytes,
    packet_number: int,
    now: float,
) -> None:
    """The rest of aioquic's receive_datagram for a decrypted 1-RTT packet, in its order."""
    context = QuicReceiveContext(
        epoch=tls.Epoch.ONE_RTT,
        host_cid=host_cid,
        network_path=network_path,
        quic_logger_frames=None,
        time=now,
        version=None,
    )
    try:
        is_ack_eliciting, is_probing = _one_rtt_frames_received(self, context, payload)
    except QuicConnectionError as exc:
        self._logger.warning(exc)
        self.close(
            error_code=exc.error_code,
            frame_type=exc.frame_type,
            reason_phrase=exc.reason_phrase,
        )
    if self._state in END_STATES or self._close_pending:
        return
    self._close_at = now + self._idle_timeout()
    self._ack_eliciting_sent_since_receipt = False
    paths = self._network_paths
    if host_cid != self.host_cid or not paths or paths[0] is not network_path:
        # Frames just handled changed the connection's ID or its paths.
        _follow_migration(self, network_path, host_cid, is_probing, packet_number, space)
    if not space.discarded:
        if packet_number > space.largest_received_packet:
            space.largest_received_packet = packet_number
            space.largest_received_time = now
        space.ack_queue.add(packet_number)
        space.received_packets.add(packet_number)
        # RFC 9000 section 13.2.3: the oldest range goes, its packets count as duplicates.
        if len(space.ack_queue) > MAX_ACK_RANGES:
            space.ack_queue.shift()
        if is_ack_eliciting and space.ack_at is None:
            space.ack_at = now + self._ack_delay


def _one_rtt_frames_received(
    self: QuicConnection, context: QuicReceiveContext, payload: bytes
) -> tuple[bool, bool]:
    """aioquic's _payload_received for a 1-RTT packet, with its frame handlers filtered for
    1-RTT once per connection instead of an Epoch hashed per frame; the same errors."""
    handlers = self.__dict__.get("_mesh_one_rtt_handlers")
    if handlers is None:
        handlers = {
            frame_type: handler
            for frame_type, (handler, epochs) in self._QuicConnection__frame_handlers.items()
            if tls.Epoch.ONE_RTT in epochs
        }
        self.__dict__["_mesh_one_rtt_handlers"] = handlers
    buf = Buffer(data=payload)
    frame_found = False
    is_ack_eliciting = False
    is_probing = None
    while not buf.eof():
        try:
            frame_type = buf.pull_uint_var()
        except BufferReadError:
            raise QuicConnectionError(
                error_code=QuicErrorCode.FRAME_ENCODING_ERROR,
                frame_type=None,
                reason_phrase="Malformed frame type",
            ) from None
        handler = handlers.get(frame_type)
        if handler is None:
            known = frame_type in self._QuicConnection__frame_handlers
            raise QuicConnectionError(
                error_code=QuicErrorCode.PROTOCOL_VIOLATION
                if known
                else QuicErrorCode.FRAME_ENCODING_ERROR,
                frame_type=frame_type,
                reason_phrase="Unexpected frame type" if known else "Unknown frame type",
            )
        try:
            handler(context, frame_type, buf)
        except BufferReadError:
            raise QuicConnectionError(
                error_code=QuicErrorCode.FRAME_ENCODING_ERROR,
                frame_type=frame_type,
                reason_phrase="Failed to parse frame",
            ) from None
        except StreamFinishedError:
            pass  # we lack the state for the stream, ignore the frame
        frame_found = True
        if frame_type not in NON_ACK_ELICITING_FRAME_TYPES:
            is_ack_eliciting = True
        if frame_type not in PROBING_FRAME_TYPES:
            is_probing = False
        elif is_probing is None:
            is_probing = True
    if not frame_found:
        raise QuicConnectionError(
            error_code=QuicErrorCode.PROTOCOL_VIOLATION,
            frame_type=QuicFrameType.PADDING,
            reason_phrase="Packet contains no frames",
        )
    return is_ack_eliciting, bool(is_probing)


def _follow_migration(
    self: QuicConnection,
    network_path: QuicNetworkPath,
    host_cid: bytes,
    is_probing: bool | None,
    packet_number: int,
    space: QuicPacketSpace,
) -> None:
    """aioquic's receive_datagram from "Handle migration" to "record packet as received"."""
    if not self._is_client and not is_probing and host_cid != self.host_cid:
        self.host_cid = host_cid
        if network_path.peer_cid is None:
            self.change_connection_id()
    if network_path not in self._network_paths:
        self._add_network_path(network_path)
    index = self._network_paths.index(network_path)
    if (
        not self._is_client
        and index
        and not is_probing
        and packet_number > space.largest_received_packet
    ):
        self._network_paths.pop(index)
        self._network_paths.insert(0, network_path)
        if network_path.peer_cid is not None:
            self._use_reserved_peer_cid(network_path)
        if not network_path.is_validated:
            network_path.local_challenge_sent = False
            network_path.validation_deadline = None

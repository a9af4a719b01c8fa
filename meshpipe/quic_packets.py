"""aioquic's packet writing, adjusted for meshpipe's links (each change measured in
docs/transport.md): STREAM frames longer than 16 KiB for large datagrams, and no empty packet set
up after the last one of a transmit. Both replace one method of a `QuicConnection` instance."""

from __future__ import annotations

import types
from typing import Any

from aioquic.buffer import size_uint_var
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import QuicFrameType, QuicPacketType
from aioquic.quic.packet_builder import QuicPacketBuilder, QuicPacketBuilderStop
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.stream import QuicStream

# aioquic writes a STREAM frame's length as a 2-byte varint (at most 16383): larger datagrams
# need the 4-byte field of _write_wide_stream_frame below.
NARROW_STREAM_FRAME_LIMIT = 16383
# A 1-RTT packet that ends with more room than this held everything that was due: a frame is
# cut to fit only when the packet is full (see _ApplicationPacketBuilder).
ROOM_LEFT_BYTES = 64


def use_wide_frames_if_needed(quic: QuicConnection) -> None:
    """STREAM frames with a 4-byte length where datagrams exceed what 2 bytes can say."""
    if quic._max_datagram_size > NARROW_STREAM_FRAME_LIMIT:
        quic._write_stream_frame = types.MethodType(  # type: ignore[method-assign]
            _write_wide_stream_frame, quic
        )
    else:  # aioquic's own writer
        quic.__dict__.pop("_write_stream_frame", None)


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
    QuicConnection._write_application(self, builder, network_path, now)

"""QUIC links between meshpipe nodes: configuration, authenticated connections, framed messages.

Frames are self-delimiting (the header gives the lengths), so a stream may carry any number of
them. Small frames (decode-sized hidden states, control messages) follow each other on one
long-lived stream per direction: a stream per frame cost its creation, MAX_STREAMS credit and
teardown at both ends on every message. A large frame (a prefill tensor) gets a stream of its
own, ended with FIN, so that it never holds up the small frames behind it and a cut-short one is
detected when its stream ends. Frames on different streams may overtake each other: nothing may
rely on the order of frames on a link. The first frame a client sends is HELLO, which proves it
holds the mesh's join token; a server answers anything else, or a wrong proof, with an ERROR
frame and closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from aioquic.asyncio import QuicConnectionProtocol, connect
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.congestion.base import create_congestion_control
from aioquic.quic.connection import QuicConnectionState
from aioquic.quic.events import (
    ConnectionTerminated,
    QuicEvent,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.tls import Epoch

from meshpipe.identity import (
    WELCOME_CONTEXT,
    Identity,
    certificate_fingerprint,
    check_proof,
    join_proof,
)
from meshpipe.quic_fast import (
    MAX_PACKETS_ALONE,
    BurstPacer,
    PeekedDecryption,
    only_due,
    peek,
    send_alone,
)
from meshpipe.quic_packets import use_wide_frames_if_needed, write_without_empty_packet
from meshpipe.wire import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    Frame,
    FrameDecoder,
    FrameError,
    Kind,
    Raw,
    tensor_bytes,
    tensor_view,
)
from meshpipe.wire import error_frame as make_error_frame

if TYPE_CHECKING:
    import torch

ALPN = "meshpipe/1"
# aioquic's cost is per packet, so on-host links (lo's MTU is 65535/65536) use the largest
# datagram both IP families carry. Measured with `meshpipe bench transport --datagram-size N`
# on the 2-core VM (docs/transport.md), 16 MiB one way: 232 MB/s at 16000, 389 at 32000, 662
# at 65000. 32000 used to break links: aioquic's STREAM length field caps at 16383 (see
# meshpipe/quic_packets.py).
LOOPBACK_DATAGRAM_SIZE = 65000
# Fits a 1500-byte Ethernet MTU under IPv6 (40) and UDP (8) headers.
LAN_DATAGRAM_SIZE = 1452
PATH_HEADER_BYTES = 48  # IPv6 + UDP headers, the larger of the two families
SMALLEST_DATAGRAM_SIZE = 1200  # QUIC's floor (RFC 9000 section 14)
ON_HOST_MTU = 65535  # `lo`'s MTU: a route this wide never leaves the machine
LINUX_IP_MTU, LINUX_IPV6_MTU = 14, 24  # getsockopt options Python's socket module lacks
WINDOW_BYTES = 256 << 20
STREAM_WINDOW_BYTES = 128 << 20
# reno and cubic measured alike on loopback (16 and 64 MiB, three alternating runs each, within
# run-to-run noise; the bottleneck is the receiver's CPU), so aioquic's default stays.
CONGESTION_CONTROL = "reno"
# Kernel socket buffers (clamped to net.core.{r,w}mem_max): the default 208 KiB holds only a
# few large datagrams, and a burst beyond it is dropped and retransmitted.
SOCKET_BUFFER_BYTES = 4 << 20
# Frames up to this size (header, metadata and tensor) share the long-lived stream; larger ones
# are prefill-sized and get a stream of their own (one packet on loopback, 45 at MTU 1500).
SHARED_STREAM_FRAME_LIMIT = 64 << 10
# The application error code of a STOP_SENDING that refuses the rest of a stream.
REFUSED_STREAM_ERROR = 0x10
IDLE_TIMEOUT = 30.0
KEEPALIVE_INTERVAL = 5.0
HELLO_TIMEOUT = 10.0
# How long the ACK of a lone packet waits for a frame to carry it (see _delay_lone_ack): below
# the 25 ms max_ack_delay that aioquic announces, which the peer's loss timer allows for.
LONE_ACK_DELAY = 0.020

log = logging.getLogger(__name__)


class JoinRefused(Exception):
    """The peer refused our HELLO, or never answered it."""


class FrameHandler(Protocol):
    """What a node does with the frames of its authenticated connections."""

    def on_frame(self, connection: MeshConnection, frame: Frame) -> None: ...

    def on_closed(self, connection: MeshConnection) -> None: ...


@dataclass(frozen=True)
class LinkSettings:
    """The tuned parameters of a link."""

    max_datagram_size: int
    max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES


def datagram_size_for(host: str) -> int:
    """The largest datagram the path to `host` carries whole, from its route's MTU.

    On-host paths (loopback, or an address of this machine, routed over `lo`) get large
    datagrams. Elsewhere the route's interface MTU less IP and UDP headers, capped at
    LAN_DATAGRAM_SIZE: aioquic has no path-MTU discovery and a hop beyond our interface may
    have a smaller MTU. A wildcard listener may serve any path, so it stays LAN-sized.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return LOOPBACK_DATAGRAM_SIZE if host == "localhost" else LAN_DATAGRAM_SIZE
    if address.is_loopback:
        return LOOPBACK_DATAGRAM_SIZE
    mtu = None if address.is_unspecified else route_mtu(address)
    if mtu is None:
        return LAN_DATAGRAM_SIZE
    if mtu >= ON_HOST_MTU:
        return LOOPBACK_DATAGRAM_SIZE
    return max(SMALLEST_DATAGRAM_SIZE, min(LAN_DATAGRAM_SIZE, mtu - PATH_HEADER_BYTES))


def route_mtu(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int | None:
    """The MTU of the interface the kernel routes `address` through (Linux), else None."""
    if sys.platform != "linux":
        return None
    family, level, option = (
        (socket.AF_INET, socket.IPPROTO_IP, LINUX_IP_MTU)
        if address.version == 4
        else (socket.AF_INET6, socket.IPPROTO_IPV6, LINUX_IPV6_MTU)
    )
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((str(address), 9))  # a UDP connect only picks the route
            return probe.getsockopt(level, option)
    except OSError:
        return None


def configuration(is_client: bool, identity: Identity, max_datagram_size: int) -> QuicConfiguration:
    """A QUIC configuration with meshpipe's ALPN, windows and certificate."""
    config = QuicConfiguration(
        alpn_protocols=[ALPN],
        is_client=is_client,
        max_datagram_size=max_datagram_size,
        max_data=WINDOW_BYTES,
        max_stream_data=STREAM_WINDOW_BYTES,
        congestion_control_algorithm=CONGESTION_CONTROL,
        idle_timeout=IDLE_TIMEOUT,
    )
    config.load_cert_chain(str(identity.certificate), str(identity.private_key))
    if is_client:
        # Peers use self-signed certificates; trust comes from the join-token proof, which is
        # bound to the server's certificate fingerprint.
        import ssl

        config.verify_mode = ssl.CERT_NONE
    return config


class MeshConnection(QuicConnectionProtocol):
    """One QUIC connection carrying meshpipe frames: small ones on a long-lived stream, large
    ones on a stream each."""

    def __init__(self, *args: Any, handler: FrameHandler, token: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        use_wide_frames_if_needed(self._quic)
        write_without_empty_packet(self._quic)
        self._quic._loss._pacer = BurstPacer(max_datagram_size=self._quic._max_datagram_size)
        self._path_known = self._quic._is_client  # a client dialled a host it sized for
        self._receiving = self._answered = False
        self.handler = handler
        self.token = token
        self.authenticated = False
        self.peer: dict[str, Any] = {}
        self.max_payload = DEFAULT_MAX_PAYLOAD_BYTES
        self._decoders: dict[int, FrameDecoder | None] = {}
        # Per stream: bytes aioquic delivered, and bytes handed to its decoder (a peek may
        # have fed some before aioquic delivered them), see _peek.
        self._delivered: dict[int, int] = {}
        self._fed: dict[int, int] = {}
        self._shared_stream: int | None = None  # opened by the first small frame
        self._unacknowledged = 0  # datagrams received since our last ACK, see _piggyback_ack
        self._space: QuicPacketSpace | None = None  # see _application_space
        self._welcome: asyncio.Future[Frame] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._closed_reported = False
        self._drained = asyncio.Event()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.packets_sent_alone = 0  # small frames sent by meshpipe/quic_fast.py
        self.packets_peeked = 0  # packets whose frames were handed on before aioquic's receipt
        self.receipts_deferred = 0  # peeked packets aioquic received after the next one's peek
        self._peeking = 0  # 1 while a peeked packet's frames are handled
        self._decrypted: PeekedDecryption | None = None  # see _peek
        self._receipts: list[tuple[bytes, Any]] = []  # peeked datagrams aioquic has not had
        self._rest_to_come = False  # the last peek left a small frame incomplete
        self._receipt_call: asyncio.Handle | None = None  # _receive_peeked, scheduled

    # -- sending ---------------------------------------------------------------------------

    def send(self, frame: Frame) -> None:
        """Send a frame now: a small one in a packet of its own where nothing else is due
        (meshpipe/quic_fast.py), anything else queued and transmitted by aioquic."""
        head, tensor = frame.head_and_tensor()
        data = _shared_stream_bytes(head, tensor)
        if data is not None and self._send_alone(data):
            return
        self._queue(head, tensor, data)
        if self._receiving:  # datagram_received transmits once, after all events
            self._answered = True
        else:
            self.transmit()

    def _send_alone(self, data: bytes) -> bool:
        stream = self._quic._streams.get(self._shared_stream)  # type: ignore[arg-type]
        if stream is None:  # the first small frame opens the stream through aioquic
            return False
        self._piggyback_ack()
        if not send_alone(self._quic, stream, data, self._loop.time(), self._transport.sendto):
            return False
        self.bytes_sent += len(data)
        self.packets_sent_alone += 1
        self._arm_timer()
        return True

    def queue(self, frame: Frame) -> None:
        """Queue a frame without transmitting (call transmit() once after a batch of sends)."""
        head, tensor = frame.head_and_tensor()
        self._queue(head, tensor, _shared_stream_bytes(head, tensor))

    def _queue(self, head: bytes, tensor: torch.Tensor | Raw | None, data: bytes | None) -> None:
        """`data`: the frame as its one write on the shared stream, None for a large frame."""
        quic = self._quic
        if data is not None:
            quic.send_stream_data(self._shared_stream_id(), data)
            self.bytes_sent += len(data)
        else:
            payload = None if tensor is None else tensor_view(tensor)
            # Unidirectional: a stream is done (and its credit returned) once its FIN is read;
            # a bidirectional one whose reverse side is never closed would use up the limit.
            stream_id = quic.get_next_available_stream_id(is_unidirectional=True)
            quic.send_stream_data(stream_id, head, end_stream=payload is None)
            if payload is not None:
                quic.send_stream_data(stream_id, payload, end_stream=True)
            self.bytes_sent += len(head) + (0 if payload is None else len(payload))
        self._piggyback_ack()

    def _shared_stream_id(self) -> int:
        """The long-lived stream of small frames; the caller sends on it at once (aioquic hands
        out the same new id until data is sent on it)."""
        if self._shared_stream is None:
            self._shared_stream = self._quic.get_next_available_stream_id(is_unidirectional=True)
        return self._shared_stream

    def _piggyback_ack(self) -> None:
        """Send a pending ACK inside the frame's packet, instead of alone when its delay
        expires (a datagram saved each way in a request/answer exchange), once two packets
        wait for it, or one has waited as long as aioquic would have (1 ms): frames sent
        back to back acknowledge every other packet, as RFC 9000 section 13.2.2 recommends,
        which halves the ACK frames to build and process, and frames paced further apart
        carry every ACK. A lone packet's ACK otherwise waits (`_delay_lone_ack`)."""
        space = self._application_space()
        if space is None or space.ack_at is None:
            return
        # A frame sent while a packet is peeked (see _peek): that packet waits for an ACK too.
        waiting = self._unacknowledged + self._peeking
        quic = self._quic
        if waiting >= 2 or self._loop.time() - space.largest_received_time >= quic._ack_delay:
            space.ack_at = 0.0

    def _application_space(self) -> QuicPacketSpace | None:
        """The 1-RTT packet space, once it exists: aioquic creates it once per connection, and
        a lookup by `Epoch` costs a Python-level `Enum.__hash__` on every datagram."""
        if self._space is None:
            self._space = self._quic._spaces.get(Epoch.ONE_RTT)
        return self._space

    def _count_unacknowledged(self, space: QuicPacketSpace | None, waiting: bool) -> None:
        """After a received datagram: how many packets that need an ACK our next ACK would
        cover. One that set no ACK timer and brought no event (an ACK alone, which needs
        none) does not count: counted, the peer's lone ACK made ours leave alone after 1 ms
        too. A PING while an ACK waits does not count either, and is acknowledged with it."""
        if space is not None and space.ack_at is not None:
            if not waiting:
                self._unacknowledged = 1
            elif self._quic._events:
                self._unacknowledged += 1

    def _delay_lone_ack(self, space: QuicPacketSpace | None, waiting: bool, now: float) -> None:
        """aioquic acknowledges a packet after 1 ms, before most answers are ready: in a
        request/answer exchange every frame was followed by a datagram of an ACK alone each
        way, a packet to build and one to parse. A lone packet's ACK now waits for the next
        frame sent (`_piggyback_ack` puts it in once a second packet waits too) or for
        LONE_ACK_DELAY; from the second packet on, aioquic's 1 ms holds again, so a bulk
        transfer's sender is acknowledged as promptly as before. Only once the link is
        authenticated: a peer whose handshake is not confirmed yet leaves the ACK delay out of
        its loss timer, and would take a waiting ACK for a lost packet."""
        if space is None or space.ack_at is None or not self.authenticated:
            return
        if not waiting:
            space.ack_at = now + LONE_ACK_DELAY
        elif self._unacknowledged == 2:
            space.ack_at = min(space.ack_at, now + self._quic._ack_delay)

    def transmit(self) -> None:
        """Send what is due now; a transmit scheduled for later has nothing left to do."""
        if self._transmit_task is not None:
            self._transmit_task.cancel()
        super().transmit()

    def close(self, error_code: int = 0, reason_phrase: str = "") -> None:
        """Close after sending what is queued: a CONNECTION_CLOSE packet carries nothing else,
        so an ERROR frame queued while receiving would otherwise be lost."""
        self.transmit()
        super().close(error_code=error_code, reason_phrase=reason_phrase)

    def buffered_bytes(self) -> int:
        """Bytes queued on this connection that the peer has not acknowledged yet."""
        # aioquic 1.7: a sender's buffer runs from the first unacknowledged offset (_buffer_start
        # moves only when the ACKed range reaches it) to the end of what was written, sent or
        # not; a finished stream leaves _streams at the next packet it would have been in.
        total = 0
        for stream in self._quic._streams.values():
            sender = stream.sender
            total += sender._buffer_stop - sender._buffer_start
        return total

    async def drain(self, limit: int) -> None:
        """Wait until at most `limit` bytes are in flight: aioquic does not bound its buffers."""
        while self.buffered_bytes() > limit and not self._closed_reported:
            self._drained.clear()
            await self._drained.wait()

    # -- receiving -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)

    def _fit_datagrams_to(self, host: str) -> None:
        """A listener learns its peer's path from the peer's first datagram: size packets for
        that path before sending any (its configuration only knew the bind address)."""
        self._path_known = True
        size = datagram_size_for(host)
        quic = self._quic
        if size == quic._max_datagram_size:
            return
        # What aioquic derives from the size at creation, derived again; nothing is in flight.
        quic._max_datagram_size = size
        algorithm = quic._configuration.congestion_control_algorithm
        quic._loss._cc = create_congestion_control(algorithm, max_datagram_size=size)
        quic._loss._pacer = BurstPacer(max_datagram_size=size)
        use_wide_frames_if_needed(quic)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if self.authenticated and self._peek(cast(bytes, data), addr):
            # aioquic's receipt of it comes after, in a loop callback (_receive_peeked).
            self._receipts.append((cast(bytes, data), addr))
            if self._receipt_call is None:
                self._receipt_call = self._loop.call_soon(self._receive_peeked, 0)
            return
        if self._receipts:  # aioquic receives datagrams in the order they came
            self._receive_peeked(None)
        self._receive(data, addr)

    def _receive_peeked(self, seen: int | None) -> None:
        """aioquic's receipt of the datagrams peeked so far, in their order. The callback runs
        before the loop reads the socket again, unless the last peek left a small frame
        incomplete: then the loop reads once more first, as long as each turn brings a
        datagram (`seen`: how many were waiting a turn ago), up to MAX_PACKETS_ALONE. A frame
        sent in several packets (at a LAN's datagram size) is then handed on once its last
        packet is peeked, without the receipts of the others before it."""
        receipts = self._receipts
        if (
            seen is not None
            and self._rest_to_come
            and seen < len(receipts) < MAX_PACKETS_ALONE
            and not self._closed_reported
        ):
            self._receipt_call = self._loop.call_soon(self._receive_peeked, len(receipts))
            return
        if seen is None and self._receipt_call is not None:  # received ahead of the callback
            self._receipt_call.cancel()
        self._receipt_call = None
        self._receipts = []
        self.receipts_deferred += max(0, len(receipts) - 1)
        for data, addr in receipts:
            self._receive(data, addr)

    def _peek(self, data: bytes, addr: Any) -> bool:
        """Hand on the frames of a packet before aioquic's receipt runs (the frame's answer
        then leaves first): its STREAM data that continues exactly what each stream's decoder
        has had, within the stream's credit. True if any was fed; aioquic must then receive
        the datagram after, and _stream_data drops what was fed already."""
        quic = self._quic
        if quic._state is not QuicConnectionState.CONNECTED or not quic._handshake_confirmed:
            return False
        if self._decrypted is None:  # the 1-RTT keys exist once the handshake is confirmed
            self._decrypted = PeekedDecryption(quic)
        frames = peek(quic, data, addr, self._decrypted)
        if not frames:
            return False
        fed = self._rest_to_come = False
        for stream_id, offset, chunk in frames:
            decoder = self._decoders.get(stream_id)
            stream = quic._streams.get(stream_id)
            if (
                decoder is None
                or stream is None
                or self._fed.get(stream_id) != offset
                or offset + len(chunk) > stream.max_stream_data_local
            ):
                continue
            self._fed[stream_id] = offset + len(chunk)
            fed = True
            try:
                received = decoder.feed(chunk)
            except FrameError as error:
                self._refuse(stream_id, error, False)
                continue
            self._peeking = 1
            try:
                for frame in received:
                    self._dispatch(frame)
            finally:
                self._peeking = 0
            self._rest_to_come |= 0 < decoder.missing() <= SHARED_STREAM_FRAME_LIMIT
        if fed:
            self.packets_peeked += 1
        return fed

    def _receive(self, data: bytes | str, addr: Any) -> None:
        if not self._path_known:
            self._fit_datagrams_to(addr[0])
        self._receiving, self._answered = True, False
        in_flight = self._quic._loss.bytes_in_flight
        space = self._application_space()
        waiting = space is not None and space.ack_at is not None
        try:
            now = self._loop.time()
            self._quic.receive_datagram(cast(bytes, data), addr, now=now)
            # Before the events: an answer sent alone while they are handled adds to it.
            in_flight_changed = self._quic._loss.bytes_in_flight != in_flight
            self._count_unacknowledged(space, waiting)
            self._delay_lone_ack(space, waiting, now)
            self._process_events()
        finally:
            self._receiving = False
        quic = self._quic
        if self._answered:
            self.transmit()  # answers leave at once, with the ACK
        elif (
            (in_flight_changed and not only_due(quic, None))
            or not quic._handshake_confirmed
            or quic._streams_blocked_uni
            or quic._streams_blocked_bidi
        ):
            # Acknowledged or lost packets open the window for something that waits, the
            # handshake goes on, or streams wait for credit the datagram may carry: send
            # soon. A frame that a task sends in this loop turn (the reply a request awaited) carries this transmit along with it.
            self._transmit_soon()
        else:
            # Data that changed nothing on our side (the bulk of a transfer we receive): its ACK
            # and any window update go when the ACK delay expires, not in a transmit per datagram.
            self._arm_timer()
        self._drained.set()

    def _arm_timer(self) -> None:
        """Arm aioquic's timer without building packets. A timer already due earlier stays: the
        idle deadline moves with every datagram, and firing early is harmless (handle_timer acts
        only on passed deadlines, then transmit() arms the timer for the next one)."""
        timer_at = self._quic.get_timer()
        if self._timer is not None:
            if timer_at is None or self._timer_at <= timer_at:
                return
            self._timer.cancel()
        self._timer = None if timer_at is None else self._loop.call_at(timer_at, self._handle_timer)
        self._timer_at = timer_at

    def _process_events(self) -> None:
        """aioquic's event loop, with stream data (nearly every event) handled first: aioquic
        tests each event against five other kinds before handing it on."""
        quic = self._quic
        event = quic.next_event()
        while event is not None:
            if type(event) is StreamDataReceived:
                self._stream_data(event)
            else:
                quic._events.appendleft(event)
                super()._process_events()
            event = quic.next_event()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            self._stream_data(event)
        elif isinstance(event, StreamReset):
            self._forget_stream(event.stream_id)
        elif isinstance(event, StopSendingReceived) and event.stream_id == self._shared_stream:
            # The peer refused a frame on it and aioquic reset it: later frames take a new one.
            self._shared_stream = None
        elif isinstance(event, ConnectionTerminated):
            self._report_closed()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._report_closed()

    def _stream_data(self, event: StreamDataReceived) -> None:
        stream_id, data, end_stream = event.stream_id, event.data, event.end_stream
        self.bytes_received += len(data)
        if stream_id not in self._decoders:
            self._decoders[stream_id] = FrameDecoder(self.max_payload)
        delivered = self._delivered.get(stream_id, 0)
        fed = self._fed.get(stream_id, 0)
        end = delivered + len(data)
        self._delivered[stream_id] = end
        if fed > delivered:  # a peek fed the start of it already
            data = data[fed - delivered :]
        self._fed[stream_id] = max(fed, end)
        decoder = self._decoders[stream_id]
        if decoder is None:  # a stream already refused: ignore the rest of it
            if end_stream:
                self._forget_stream(stream_id)
            return
        try:
            frames = decoder.feed(data) if data else []
            if end_stream:
                decoder.finish()
                self._forget_stream(stream_id)
        except FrameError as error:
            self._refuse(stream_id, error, end_stream)
            return
        for frame in frames:
            self._dispatch(frame)

    def _forget_stream(self, stream_id: int) -> None:
        self._decoders.pop(stream_id, None)
        self._delivered.pop(stream_id, None)
        self._fed.pop(stream_id, None)

    def _refuse(self, stream_id: int, error: FrameError, end_stream: bool) -> None:
        log.warning("refused a frame from %s: %s", self.peer.get("node_id", "?"), error)
        if end_stream:
            self._forget_stream(stream_id)
        else:
            # The rest of the stream cannot be framed: ignore it, and have the peer stop it (its
            # later small frames then move to a new long-lived stream).
            self._decoders[stream_id] = None
            self._quic.stop_stream(stream_id, REFUSED_STREAM_ERROR)
        self.send(make_error_frame(error.code, str(error)))
        if not self.authenticated:
            self.close(error_code=0x100, reason_phrase="unauthenticated")

    def _dispatch(self, frame: Frame) -> None:
        if self._welcome is not None and not self._welcome.done():
            self._welcome.set_result(frame)
            return
        if not self.authenticated:
            self._authenticate(frame)
            return
        if frame.kind == Kind.HEARTBEAT and frame.meta.get("ping"):
            self.send(Frame(Kind.HEARTBEAT, frame.message_id, {"pong": True}))
        try:
            self.handler.on_frame(self, frame)
        except FrameError as error:
            self.send(make_error_frame(error.code, str(error), frame.message_id))

    # -- authentication --------------------------------------------------------------------

    def _own_fingerprint(self) -> str:
        return certificate_fingerprint(self._quic.configuration.certificate)

    def _authenticate(self, frame: Frame) -> None:
        """Server side: accept a HELLO carrying a valid proof, refuse anything else."""
        meta = frame.meta
        valid = (
            frame.kind == Kind.HELLO
            and isinstance(meta.get("nonce"), str)
            and isinstance(meta.get("proof"), str)
            and check_proof(self.token, self._own_fingerprint(), meta["nonce"], meta["proof"])
        )
        if not valid:
            log.warning("refused a peer without a valid join token")
            self.send(make_error_frame("unauthorized", "a valid join token is required"))
            self.close(error_code=0x101, reason_phrase="unauthorized")
            return
        self.authenticated = True
        self.peer = {key: value for key, value in meta.items() if key not in ("nonce", "proof")}
        proof = join_proof(self.token, self._own_fingerprint(), meta["nonce"], WELCOME_CONTEXT)
        self.send(Frame(Kind.WELCOME, 0, {"proof": proof}))
        self._start_keepalive()
        self.handler.on_frame(self, frame)

    async def hello(self, node: dict[str, Any]) -> dict[str, Any]:
        """Client side: prove the join token; returns the WELCOME's metadata."""
        peer_certificate = self._quic.tls._peer_certificate
        if peer_certificate is None:
            raise JoinRefused("the peer presented no certificate")
        nonce = secrets.token_hex(16)
        fingerprint = certificate_fingerprint(peer_certificate)
        proof = join_proof(self.token, fingerprint, nonce)
        self._welcome = asyncio.get_running_loop().create_future()
        self.send(Frame(Kind.HELLO, 0, {**node, "nonce": nonce, "proof": proof}))
        try:
            answer = await asyncio.wait_for(asyncio.shield(self._welcome), HELLO_TIMEOUT)
        except TimeoutError:
            raise JoinRefused("no answer to HELLO") from None
        if answer.kind != Kind.WELCOME:
            raise JoinRefused(answer.meta.get("message", f"refused ({answer.kind.name})"))
        welcome = answer.meta.get("proof")
        if not (
            isinstance(welcome, str)
            and check_proof(self.token, fingerprint, nonce, welcome, WELCOME_CONTEXT)
        ):
            self.close(error_code=0x101, reason_phrase="unauthorized")
            raise JoinRefused("the peer welcomed us without proving the join token")
        self.authenticated = True
        self._start_keepalive()
        return answer.meta

    # -- life ------------------------------------------------------------------------------

    def _start_keepalive(self) -> None:
        self._keepalive = asyncio.get_running_loop().create_task(self._ping_forever())

    async def _ping_forever(self) -> None:
        with contextlib.suppress(ConnectionError):
            while not self._closed_reported:
                await asyncio.sleep(KEEPALIVE_INTERVAL)
                self._quic.send_ping(0)
                self.transmit()

    def _report_closed(self) -> None:
        if self._closed_reported:
            return
        self._closed_reported = True
        self._drained.set()
        if self._welcome is not None and not self._welcome.done():
            self._welcome.set_result(make_error_frame("closed", "connection closed"))
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self.authenticated:
            self.handler.on_closed(self)

    @property
    def closed(self) -> bool:
        return self._closed_reported


def _shared_stream_bytes(head: bytes, tensor: torch.Tensor | Raw | None) -> bytes | None:
    """A frame small enough to share the long-lived stream, as the one write it takes there (a
    copy of a few KB costs less than a second write); None for a large frame."""
    if tensor is None:
        return head if len(head) <= SHARED_STREAM_FRAME_LIMIT else None
    if len(head) + tensor.nbytes > SHARED_STREAM_FRAME_LIMIT:
        return None
    return head + tensor_bytes(tensor)


def connection_factory(handler: FrameHandler, token: str) -> Callable[..., MeshConnection]:
    def create(*args: Any, **kwargs: Any) -> MeshConnection:
        return MeshConnection(*args, handler=handler, token=token, **kwargs)

    return create


class MeshServer(QuicServer):
    """aioquic's listener, handing a known connection's 1-RTT packets straight to it."""

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        # A short header (first bit clear) starts with our connection ID, of our own length:
        # found, the packet needs none of the header parsing that routes the other kinds.
        packet = cast(bytes, data)
        if packet and not packet[0] & 0x80:
            protocol = self._protocols.get(packet[1 : 1 + self._configuration.connection_id_length])
            if protocol is not None:
                protocol.datagram_received(data, addr)
                return
        super().datagram_received(data, addr)


async def listen(
    host: str, port: int, identity: Identity, handler: FrameHandler, token: str
) -> QuicServer:
    """Accept authenticated meshpipe connections on UDP host:port (port 0 picks one)."""
    config = configuration(False, identity, datagram_size_for(host))
    create = connection_factory(handler, token)
    _, server = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: MeshServer(configuration=config, create_protocol=create), local_addr=(host, port)
    )
    return server


def bound_port(server: QuicServer) -> int:
    return server._transport.get_extra_info("sockname")[1]


class Dialer:
    """Opens client connections and keeps them until close()."""

    def __init__(self, identity: Identity, token: str) -> None:
        self.identity = identity
        self.token = token
        self._stack = contextlib.AsyncExitStack()

    async def dial(
        self, host: str, port: int, handler: FrameHandler, node: dict[str, Any]
    ) -> MeshConnection:
        """Connect to host:port, prove the join token, and return the open connection."""
        config = configuration(True, self.identity, datagram_size_for(host))
        connection = await asyncio.wait_for(
            self._stack.enter_async_context(
                connect(
                    host,
                    port,
                    configuration=config,
                    create_protocol=connection_factory(handler, self.token),
                )
            ),
            HELLO_TIMEOUT,
        )
        assert isinstance(connection, MeshConnection)
        await connection.hello(node)
        return connection

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._stack.aclose()

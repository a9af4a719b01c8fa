"""`meshpipe relay`: forwards the opaque QUIC datagrams of peers that cannot reach each other.

A peer registers under its node id with a challenge-response over the relay key (see
`meshpipe.relay_wire`); after that it sends envelopes addressed to another registered node id,
and the relay passes the body on unchanged, with the sender's id in place of the destination's.
The body is a QUIC packet of the peers' own connection, encrypted end to end: the relay never
parses it, and sees node ids, addresses, sizes and timing only.

Limits per peer: the number of peers it sends to at once (its relayed links), a byte rate
(token bucket; excess datagrams are dropped, and QUIC's congestion control backs off), and an
idle lease: a peer silent for `idle_timeout` seconds is forgotten. A datagram from an address
that is not registered (after a relay restart, say) is answered UNKNOWN, so the peer registers
again at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from meshpipe.relay_wire import (
    DATA_KINDS,
    HELLO_SIZE,
    Envelope,
    EnvelopeError,
    Kind,
    check,
    control,
    decode,
    encode,
    fields,
    peer_proof,
    relay_proof,
)

log = logging.getLogger(__name__)

CHALLENGE_LIFETIME = 30.0
EXPIRY_INTERVAL = 1.0
SOCKET_BUFFER_BYTES = 4 << 20
MIN_BURST = 64 << 10
Address = tuple[Any, ...]


@dataclass(frozen=True)
class RelaySettings:
    """Everything the relay is told on its command line."""

    key: str
    host: str = "0.0.0.0"
    port: int = 9339
    status_host: str = "127.0.0.1"
    status_port: int | None = 9339
    max_peers: int = 1024
    max_links: int = 64
    rate: int = 0
    """Bytes per second one peer may send through the relay (0: no limit)."""
    idle_timeout: float = 30.0
    dump: Path | None = None
    """Debug: append every datagram the relay forwards to this file."""


@dataclass
class TokenBucket:
    """A byte rate, with a burst of one second's worth (at least `MIN_BURST`); starts full."""

    rate: int
    stamp: float
    level: float = -1.0

    @property
    def burst(self) -> int:
        return max(self.rate, MIN_BURST)

    def take(self, size: int, now: float) -> bool:
        if not self.rate:
            return True
        if self.level < 0:
            self.level = self.burst
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level < size:
            return False
        self.level -= size
        return True


@dataclass(eq=False)
class Peer:
    """A registered node, and what it has sent and received through the relay."""

    node_id: str
    address: Address
    bucket: TokenBucket
    registered_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    links: dict[str, float] = field(default_factory=dict)
    """The peers it sends to, with when it last did."""
    bytes_in: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    packets_out: int = 0
    dropped: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "address": f"{self.address[0]}:{self.address[1]}",
            "registered_for": round(time.time() - self.registered_at, 1),
            "idle": round(time.monotonic() - self.last_seen, 1),
            "links": sorted(self.links),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "packets_in": self.packets_in,
            "packets_out": self.packets_out,
            "dropped": self.dropped,
        }


class Relay(asyncio.DatagramProtocol):
    """The relay's UDP endpoint: registrations, forwarding, limits."""

    def __init__(self, settings: RelaySettings) -> None:
        self.settings = settings
        self.secret = secrets.token_bytes(32)
        self.peers: dict[str, Peer] = {}
        self.by_address: dict[Address, Peer] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.dump: BinaryIO | None = None
        self.started = time.time()
        self.counters = {"refused": 0, "malformed": 0, "unregistered": 0, "unreachable": 0}

    # -- endpoint --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        if self.settings.dump is not None:
            self.dump = self.settings.dump.open("ab")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.dump is not None:
            self.dump.close()

    def datagram_received(self, data: bytes, address: Address) -> None:
        try:
            envelope = decode(data)
        except EnvelopeError:
            self.counters["malformed"] += 1
            return
        sender = self.by_address.get(address)
        now = time.monotonic()
        if sender is not None:
            sender.last_seen = now
        if envelope.kind in DATA_KINDS:
            self._forward(sender, envelope, data, address, now)
        elif envelope.kind == Kind.PING:
            self._answer(Kind.PONG if sender else Kind.UNKNOWN, envelope.node_id, address)
        elif envelope.kind == Kind.HELLO and len(data) >= HELLO_SIZE:
            self._challenge(envelope, address)
        elif envelope.kind == Kind.REGISTER:
            self._register(envelope, address, now)

    def _answer(self, kind: Kind, node_id: str, address: Address, **body: Any) -> None:
        assert self.transport is not None
        self.transport.sendto(control(kind, node_id, **body), address)

    # -- registration ----------------------------------------------------------------------

    def _nonce(self, address: Address, node_id: str, stamp: int) -> str:
        """A stateless challenge: a timestamp MACed with the address and id it was sent to."""
        message = f"{stamp}|{address[0]}|{address[1]}|{node_id}".encode()
        return f"{stamp}.{hmac.new(self.secret, message, hashlib.sha256).hexdigest()[:32]}"

    def _fresh(self, nonce: object, address: Address, node_id: str) -> bool:
        if not isinstance(nonce, str) or not nonce.partition(".")[0].isdigit():
            return False
        stamp = int(nonce.partition(".")[0])
        if not 0 <= time.time() - stamp <= CHALLENGE_LIFETIME:
            return False
        return hmac.compare_digest(nonce, self._nonce(address, node_id, stamp))

    def _challenge(self, envelope: Envelope, address: Address) -> None:
        nonce = self._nonce(address, envelope.node_id, int(time.time()))
        self._answer(Kind.CHALLENGE, envelope.node_id, address, nonce=nonce)

    def _register(self, envelope: Envelope, address: Address, now: float) -> None:
        node_id = envelope.node_id
        try:
            body = fields(envelope)
        except EnvelopeError:
            body = {}
        nonce, theirs = body.get("nonce"), body.get("peer_nonce")
        valid = (
            self._fresh(nonce, address, node_id)
            and isinstance(theirs, str)
            and len(theirs) <= 128
            and check(peer_proof(self.settings.key, str(nonce), node_id), body.get("proof"))
        )
        if not valid:
            self.counters["refused"] += 1
            log.warning("refused %s from %s: no valid proof of the key", node_id, address)
            self._answer(Kind.REFUSED, node_id, address, reason="a valid join token is required")
            return
        if node_id not in self.peers and len(self.peers) >= self.settings.max_peers:
            self._answer(Kind.REFUSED, node_id, address, reason="the relay is full")
            return
        self._forget(self.peers.get(node_id))
        self._forget(self.by_address.get(address))
        peer = Peer(node_id, address, TokenBucket(self.settings.rate, now))
        self.peers[node_id] = self.by_address[address] = peer
        log.info("registered %s from %s:%s", node_id, address[0], address[1])
        proof = relay_proof(self.settings.key, str(theirs), node_id)
        lease = self.settings.idle_timeout
        self._answer(Kind.REGISTERED, node_id, address, lease=lease, proof=proof)

    def _forget(self, peer: Peer | None) -> None:
        if peer is None:
            return
        if self.peers.get(peer.node_id) is peer:
            del self.peers[peer.node_id]
        if self.by_address.get(peer.address) is peer:
            del self.by_address[peer.address]

    async def expire_forever(self) -> None:
        """Forget peers whose lease ran out, and links unused as long."""
        while True:
            await asyncio.sleep(EXPIRY_INTERVAL)
            horizon = time.monotonic() - self.settings.idle_timeout
            for peer in list(self.peers.values()):
                if peer.last_seen < horizon:
                    log.info("%s expired (idle)", peer.node_id)
                    self._forget(peer)
                for target, used in list(peer.links.items()):
                    if used < horizon or target not in self.peers:
                        del peer.links[target]

    # -- forwarding ------------------------------------------------------------------------

    def _forward(
        self, sender: Peer | None, envelope: Envelope, data: bytes, address: Address, now: float
    ) -> None:
        if sender is None:
            self.counters["unregistered"] += 1
            self._answer(Kind.UNKNOWN, envelope.node_id, address)
            return
        sender.packets_in += 1
        sender.bytes_in += len(data)
        target = self.peers.get(envelope.node_id)
        if target is None:
            self.counters["unreachable"] += 1
            sender.dropped += 1
            self._answer(Kind.UNREACHABLE, envelope.node_id, address)
            return
        if not self._admit(sender, target.node_id, len(data), now):
            sender.dropped += 1
            return
        datagram = encode(envelope.kind, sender.node_id, envelope.body)
        assert self.transport is not None
        self.transport.sendto(datagram, target.address)
        target.packets_out += 1
        target.bytes_out += len(datagram)
        if self.dump is not None:
            self.dump.write(data)
            self.dump.flush()

    def _admit(self, sender: Peer, target: str, size: int, now: float) -> bool:
        """The per-peer limits: relayed links, then bytes per second."""
        if target not in sender.links and len(sender.links) >= self.settings.max_links:
            return False
        if not sender.bucket.take(size, now):
            return False
        sender.links[target] = now
        return True

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        s = self.settings
        return {
            "address": f"{s.host}:{s.port}",
            "uptime": round(time.time() - self.started, 1),
            "limits": {
                "max_peers": s.max_peers,
                "max_links": s.max_links,
                "rate": s.rate,
                "idle_timeout": s.idle_timeout,
            },
            "peers": [peer.describe() for peer in self.peers.values()],
            "counters": dict(self.counters),
        }


async def _status_client(
    relay: Relay, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """A minimal HTTP/1.0 answer: GET /status is the relay's status as JSON."""
    try:
        request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
        found = path.split(b"?")[0] in (b"/", b"/status")
        body = json.dumps(relay.status() if found else {"error": "not found"}).encode()
        head = f"HTTP/1.0 {'200 OK' if found else '404 Not Found'}\r\n"
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        writer.write(head.encode() + body)
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
        pass
    finally:
        writer.close()


async def start(settings: RelaySettings) -> tuple[Relay, asyncio.AbstractServer | None]:
    """Bind the relay's UDP endpoint and, if asked, its HTTP status endpoint."""
    loop = asyncio.get_running_loop()
    _, relay = await loop.create_datagram_endpoint(
        lambda: Relay(settings), local_addr=(settings.host, settings.port)
    )
    status = None
    if settings.status_port is not None:

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _status_client(relay, reader, writer)

        status = await asyncio.start_server(answer, settings.status_host, settings.status_port)
    return relay, status


async def serve(settings: RelaySettings) -> None:
    relay, status = await start(settings)
    assert relay.transport is not None
    line = f"meshpipe relay: udp {settings.host}:{relay.transport.get_extra_info('sockname')[1]}"
    if status is not None:
        host, port = status.sockets[0].getsockname()[:2]
        line += f", status http://{host}:{port}/status"
    print(line, flush=True)
    try:
        await relay.expire_forever()
    finally:
        relay.close()
        if status is not None:
            status.close()

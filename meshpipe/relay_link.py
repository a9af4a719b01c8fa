"""A node's side of the relay: registration, and QUIC connections carried through it.

aioquic's protocols need only a transport with `sendto(data, addr)` and call
`datagram_received(data, addr)`; a `RelayLink` gives them one that wraps every outgoing QUIC
datagram in a relay envelope addressed to the remote node id, and unwraps incoming envelopes
into the right protocol. A remote node appears to aioquic under a made-up address,
`("relay:<node id>", 0)`. Connections dialed through the relay are ordinary `MeshConnection`s
(TLS 1.3 end to end, the join-token HELLO inside it); relayed connections to this node go to a
`QuicServer` of its own, exactly as direct ones go to the node's listener.

The link registers, pings the relay every second (which also keeps a NAT's mapping open), and
registers again whenever the relay stops answering or says it does not know us (it restarted).
QUIC retransmits what was lost meanwhile, so the connections through it survive a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from aioquic.asyncio.server import QuicServer
from aioquic.quic.connection import QuicConnection

from meshpipe.identity import Identity
from meshpipe.quic import (
    HELLO_TIMEOUT,
    FrameHandler,
    MeshConnection,
    configuration,
    connection_factory,
    datagram_size_for,
)
from meshpipe.relay_wire import (
    ENVELOPE_OVERHEAD,
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
    relay_key,
    relay_proof,
)

log = logging.getLogger(__name__)

ADDRESS_PREFIX = "relay:"
KEEPALIVE_INTERVAL = 1.0
LOST_AFTER = 3.0
ANSWER_TIMEOUT = 1.0
FIRST_REGISTRATION_TIMEOUT = 5.0


class RelayRefused(Exception):
    """The relay refused our registration (wrong join token), or is not a real relay."""


class RelayUnavailable(Exception):
    """No registration with the relay, or the remote node is not registered there."""


def relayed_address(node_id: str) -> tuple[str, int]:
    """The address under which aioquic knows a node reached through the relay."""
    return (ADDRESS_PREFIX + node_id, 0)


def link_kind(connection: MeshConnection | None) -> str:
    """'relayed' for a connection carried by a relay, else 'direct', as /api/status shows it."""
    relayed = connection is not None and isinstance(connection._transport, Channel)
    return "relayed" if relayed else "direct"


def _sized_by_link(accept: FrameHandler, token: str) -> Callable[..., MeshConnection]:
    """Accepted connections keep the datagram size the link chose (the relay's path less the
    envelope): a listener otherwise sizes packets from its peer's address, and a made-up
    relayed address says nothing of the path."""
    create = connection_factory(accept, token)

    def sized(*args: Any, **kwargs: Any) -> MeshConnection:
        connection = create(*args, **kwargs)
        connection._path_known = True
        return connection

    return sized


class Channel(asyncio.DatagramTransport):
    """The transport the QUIC protocols of one direction see: sendto goes through the relay."""

    def __init__(self, link: RelayLink, kind: Kind) -> None:
        super().__init__()
        self.link = link
        self.kind = kind

    def sendto(self, data: Any, addr: Any = None) -> None:
        self.link.send(self.kind, str(addr[0]).removeprefix(ADDRESS_PREFIX), bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.link.relay if name == "peername" else default

    def is_closing(self) -> bool:
        return self.link.closed

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class RelayLink(asyncio.DatagramProtocol):
    """One node's registration with a relay, and the QUIC connections carried through it."""

    def __init__(
        self,
        relay: tuple[str, int],
        node_id: str,
        token: str,
        identity: Identity,
        accept: FrameHandler | None = None,
    ) -> None:
        self.relay = relay
        self.node_id = node_id
        self.token = token
        self.key = relay_key(token)
        self.identity = identity
        self.accept = accept
        self.datagram_size = datagram_size_for(relay[0]) - ENVELOPE_OVERHEAD
        self.transport: asyncio.DatagramTransport | None = None
        self.server: QuicServer | None = None
        self.clients: dict[str, MeshConnection] = {}
        self.registered = asyncio.Event()
        self.refused: RelayRefused | None = None
        self.closed = False
        self.registrations = 0
        self.last_pong = 0.0
        self.bytes_sent = 0
        self.bytes_received = 0
        self._answer: asyncio.Future[Envelope] | None = None
        self._unreachable: dict[str, asyncio.Future[None]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        relay: tuple[str, int],
        node_id: str,
        token: str,
        identity: Identity,
        accept: FrameHandler | None = None,
    ) -> RelayLink:
        """Bind a socket towards the relay and register; a refusal (wrong token) raises, a
        relay that does not answer yet is retried in the background."""
        link = cls(relay, node_id, token, identity, accept)
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: link, remote_addr=relay)
        if accept is not None:
            config = configuration(False, identity, link.datagram_size)
            link.server = QuicServer(
                configuration=config, create_protocol=_sized_by_link(accept, token)
            )
            link.server.connection_made(Channel(link, Kind.TO_CLIENT))
        link._task = loop.create_task(link._maintain())
        with contextlib.suppress(RelayUnavailable):
            await link.wait_registered(FIRST_REGISTRATION_TIMEOUT)
        return link

    @property
    def address(self) -> str:
        return f"{self.relay[0]}:{self.relay[1]}"

    async def wait_registered(self, within: float) -> None:
        """Until registered; RelayRefused if the relay refused us, RelayUnavailable on timeout."""
        registered = asyncio.ensure_future(self.registered.wait())
        # The maintaining task ends only when the relay refused us.
        watched = {registered} | ({self._task} if self._task is not None else set())
        try:
            await asyncio.wait(watched, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        finally:
            registered.cancel()
        if self.refused is not None:
            raise self.refused
        if not self.registered.is_set():
            raise RelayUnavailable(f"no registration with {self.address}")

    def close(self) -> None:
        self.closed = True
        for connection in self.clients.values():
            connection.close()
        if self.server is not None:
            for protocol in set(self.server._protocols.values()):
                protocol.close()
        if self._task is not None:
            self._task.cancel()
        if self.transport is not None:
            self.transport.close()

    # -- dialing ---------------------------------------------------------------------------

    async def dial(
        self, node_id: str, handler: FrameHandler, node: dict[str, Any]
    ) -> MeshConnection:
        """Connect to a node registered with the relay and prove the join token."""
        await self.wait_registered(HELLO_TIMEOUT)
        config = configuration(True, self.identity, self.datagram_size)
        connection = MeshConnection(
            QuicConnection(configuration=config), handler=handler, token=self.token
        )
        connection.connection_made(Channel(self, Kind.TO_SERVER))
        previous = self.clients.pop(node_id, None)
        if previous is not None and not previous.closed:
            previous.close()
        self.clients[node_id] = connection
        unreachable = self._unreachable[node_id] = asyncio.get_running_loop().create_future()
        connection.connect(relayed_address(node_id))
        connected = asyncio.ensure_future(connection.wait_connected())
        try:
            done, _ = await asyncio.wait(
                {connected, unreachable}, timeout=HELLO_TIMEOUT, return_when="FIRST_COMPLETED"
            )
            if connected not in done:
                raise RelayUnavailable(f"{node_id} is not reachable through {self.address}")
            connected.result()
            await connection.hello(node)
        except BaseException:
            # Not cancelled: aioquic fails its waiter once the close completes, and this
            # retrieves that error instead of leaving it unread.
            connected.add_done_callback(lambda task: task.cancelled() or task.exception())
            connection.close()
            self.clients.pop(node_id, None)
            raise
        finally:
            self._unreachable.pop(node_id, None)
        return connection

    # -- datagrams -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, kind: Kind, node_id: str, body: bytes) -> None:
        if self.transport is None or self.closed:
            return
        datagram = encode(kind, node_id, body)
        self.bytes_sent += len(datagram)
        self.transport.sendto(datagram)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            envelope = decode(data)
        except EnvelopeError:
            return
        self.bytes_received += len(data)
        if envelope.kind == Kind.TO_SERVER:
            if self.server is not None:
                self.server.datagram_received(envelope.body, relayed_address(envelope.node_id))
        elif envelope.kind == Kind.TO_CLIENT:
            connection = self.clients.get(envelope.node_id)
            if connection is not None and not connection.closed:
                connection.datagram_received(envelope.body, relayed_address(envelope.node_id))
        elif envelope.kind == Kind.PONG:
            self.last_pong = time.monotonic()
        elif envelope.kind == Kind.UNKNOWN:
            self._lost("the relay does not know us (it restarted?)")
        elif envelope.kind == Kind.UNREACHABLE:
            waiter = self._unreachable.get(envelope.node_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif self._answer is not None and not self._answer.done():
            self._answer.set_result(envelope)

    def error_received(self, exc: Exception) -> None:
        # A connected UDP socket reports the relay's ICMP port-unreachable here.
        self._lost(f"relay unreachable: {exc}")

    def _lost(self, reason: str) -> None:
        if self.registered.is_set():
            log.warning("relay registration lost: %s", reason)
            self.registered.clear()
        self._wake.set()

    # -- registration ----------------------------------------------------------------------

    async def _maintain(self) -> None:
        """Register, keep the registration alive, register again when it is lost."""
        backoff = 0.1
        while not self.closed:
            if not self.registered.is_set():
                try:
                    await self._register()
                    backoff = 0.1
                except TimeoutError:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                except RelayRefused as error:
                    log.error("relay %s refused us: %s", self.address, error)
                    self.refused = error
                    return
            await self._keep_alive()

    async def _register(self) -> None:
        """HELLO, CHALLENGE, REGISTER with our proof, REGISTERED with the relay's."""
        challenge = await self._ask(control(Kind.HELLO, self.node_id, HELLO_SIZE))
        relay_nonce = str(self._body(challenge).get("nonce"))
        ours = secrets.token_hex(16)
        proof = peer_proof(self.key, relay_nonce, self.node_id)
        register = control(
            Kind.REGISTER, self.node_id, nonce=relay_nonce, proof=proof, peer_nonce=ours
        )
        answer = await self._ask(register)
        body = self._body(answer)
        if answer.kind != Kind.REGISTERED:
            raise RelayRefused(str(body.get("reason", f"answered {answer.kind.name}")))
        if not check(relay_proof(self.key, ours, self.node_id), body.get("proof")):
            raise RelayRefused("the relay could not prove it holds the mesh's relay key")
        self.registrations += 1
        self.last_pong = time.monotonic()
        self.registered.set()
        log.info("registered with relay %s as %s", self.address, self.node_id)

    @staticmethod
    def _body(envelope: Envelope) -> dict[str, Any]:
        try:
            return fields(envelope)
        except EnvelopeError:
            return {}

    async def _ask(self, datagram: bytes) -> Envelope:
        """Send a control datagram; the next control answer (TimeoutError after a second)."""
        assert self.transport is not None
        self._answer = asyncio.get_running_loop().create_future()
        self.transport.sendto(datagram)
        try:
            return await asyncio.wait_for(self._answer, ANSWER_TIMEOUT)
        finally:
            self._answer = None

    async def _keep_alive(self) -> None:
        """Ping every second until the registration is lost (no PONG, or UNKNOWN)."""
        while self.registered.is_set() and not self.closed:
            self._wake.clear()
            if self.transport is not None:
                self.transport.sendto(encode(Kind.PING, self.node_id))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), KEEPALIVE_INTERVAL)
            if time.monotonic() - self.last_pong > LOST_AFTER:
                self._lost("the relay stopped answering")
            for node_id, connection in list(self.clients.items()):
                if connection.closed:
                    del self.clients[node_id]

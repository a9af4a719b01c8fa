"""The relay on loopback: a real `meshpipe relay` process, peers over real UDP sockets.

Bare peers (a UDP socket and the envelope codec) check registration, forwarding and limits
byte by byte; `RelayLink` peers carry real QUIC connections (TLS, join-token HELLO) through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest
import torch

from meshpipe.identity import load_or_create_identity
from meshpipe.quic import Dialer, JoinRefused, MeshConnection
from meshpipe.reach import Hop, dial
from meshpipe.relay_link import RelayLink, RelayRefused, RelayUnavailable, link_kind
from meshpipe.relay_wire import (
    HELLO_SIZE,
    Envelope,
    Kind,
    control,
    decode,
    encode,
    fields,
    peer_proof,
    relay_key,
)
from meshpipe.wire import Frame
from meshpipe.wire import Kind as FrameKind
from tests.cluster import Process, free_port, meshpipe, start_auto

TOKEN = "mp1-relay-test-token"


@dataclass
class RelayProcess:
    """A running `meshpipe relay` on loopback."""

    process: Process
    port: int
    status_port: int
    arguments: tuple[str, ...]

    def status(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.status_port}/status", timeout=5).json()

    def peer(self, node_id: str) -> dict | None:
        return next((p for p in self.status()["peers"] if p["node_id"] == node_id), None)


def start_relay(*arguments: str, port: int = 0, status_port: int = 0) -> RelayProcess:
    port = port or free_port(socket.SOCK_DGRAM)
    status_port = status_port or free_port()
    process = meshpipe(
        "relay",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--status",
        f"127.0.0.1:{status_port}",
        "--token",
        TOKEN,
        *arguments,
    )
    process.wait_for("meshpipe relay: udp", 30)
    return RelayProcess(process, port, status_port, arguments)


@pytest.fixture
def relay() -> Iterator[RelayProcess]:
    running = start_relay()
    yield running
    running.process.stop()


class BarePeer:
    """A relay peer made of one UDP socket and the envelope codec, nothing else."""

    def __init__(self, port: int, node_id: str) -> None:
        self.node_id = node_id
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(2.0)
        self.sock.connect(("127.0.0.1", port))

    def register(self, token: str = TOKEN) -> Envelope:
        self.sock.send(control(Kind.HELLO, self.node_id, HELLO_SIZE))
        nonce = fields(self.receive())["nonce"]
        proof = peer_proof(relay_key(token), nonce, self.node_id)
        register = control(Kind.REGISTER, self.node_id, nonce=nonce, proof=proof, peer_nonce="n")
        self.sock.send(register)
        return self.receive()

    def send(self, kind: Kind, node_id: str, body: bytes = b"") -> None:
        self.sock.send(encode(kind, node_id, body))

    def receive(self) -> Envelope:
        return decode(self.sock.recv(65536))

    def receive_all(self, quiet: float = 0.5) -> list[Envelope]:
        """Everything that arrives until nothing has for `quiet` seconds."""
        self.sock.settimeout(quiet)
        found = []
        with contextlib.suppress(TimeoutError):
            while True:
                found.append(self.receive())
        self.sock.settimeout(2.0)
        return found

    def close(self) -> None:
        self.sock.close()


class Echo:
    """A frame handler: servers echo ECHO frames back; clients queue what comes back."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[Frame] = asyncio.Queue()

    def on_frame(self, connection: MeshConnection, frame: Frame) -> None:
        if frame.kind != FrameKind.ECHO:
            return
        if connection.peer:  # the accepting side knows its peer from the HELLO
            connection.send(frame)
        else:
            self.received.put_nowait(frame)

    def on_closed(self, connection: MeshConnection) -> None:
        pass


async def echo(connection: MeshConnection, handler: Echo, tensor: torch.Tensor) -> torch.Tensor:
    connection.send(Frame(FrameKind.ECHO, 1, {"note": "through the relay"}, tensor))
    frame = await asyncio.wait_for(handler.received.get(), 10)
    assert frame.tensor is not None
    return frame.tensor


async def open_link(port: int, node_id: str, home: Path, accept: Echo | None) -> RelayLink:
    identity = load_or_create_identity(home / "relay-test", node_id)
    return await RelayLink.open(("127.0.0.1", port), node_id, TOKEN, identity, accept)


# -- registration ---------------------------------------------------------------------------


def test_peer_without_the_token_is_refused(relay: RelayProcess, home: Path) -> None:
    intruder = BarePeer(relay.port, "intruder")
    answer = intruder.register(token="mp1-not-the-mesh-token")
    assert answer.kind == Kind.REFUSED
    assert "join token" in fields(answer)["reason"]

    async def link_with_wrong_token() -> None:
        identity = load_or_create_identity(home / "relay-test", "intruder")
        with pytest.raises(RelayRefused, match="join token"):
            await RelayLink.open(("127.0.0.1", relay.port), "intruder", "mp1-wrong", identity)

    asyncio.run(link_with_wrong_token())
    # Not registered, so whatever it sends is answered UNKNOWN and goes nowhere.
    member = BarePeer(relay.port, "member")
    assert member.register().kind == Kind.REGISTERED
    intruder.send(Kind.TO_SERVER, "member", b"let me in")
    assert intruder.receive().kind == Kind.UNKNOWN
    assert member.receive_all(0.3) == []
    status = relay.status()
    assert [peer["node_id"] for peer in status["peers"]] == ["member"]
    assert status["counters"]["refused"] == 2 and status["counters"]["unregistered"] == 1


def test_relay_given_only_the_relay_key() -> None:
    """A relay run outside the mesh gets the key, not the token: members still register."""
    relay = start_relay("--token", relay_key(TOKEN))
    try:
        assert relay_key(TOKEN) != TOKEN and relay_key(relay_key(TOKEN)) == relay_key(TOKEN)
        assert BarePeer(relay.port, "member").register(TOKEN).kind == Kind.REGISTERED
        assert BarePeer(relay.port, "other").register("mp1-other-mesh").kind == Kind.REFUSED
    finally:
        relay.process.stop()


def test_short_hello_gets_no_answer(relay: RelayProcess) -> None:
    """An unpadded HELLO could be used to reflect larger answers at a spoofed address."""
    peer = BarePeer(relay.port, "short")
    peer.sock.send(control(Kind.HELLO, "short"))
    assert peer.receive_all(0.3) == []


# -- forwarding -----------------------------------------------------------------------------


def test_forwards_opaque_datagrams_between_peers(tmp_path: Path) -> None:
    dump = tmp_path / "forwarded.bin"
    relay = start_relay("--dump", str(dump))
    try:
        alice, bob = BarePeer(relay.port, "alice"), BarePeer(relay.port, "bob")
        assert alice.register().kind == Kind.REGISTERED
        assert bob.register().kind == Kind.REGISTERED
        alice.send(Kind.TO_SERVER, "bob", b"opaque bytes \x00\xff")
        got = bob.receive()
        # The body arrives unchanged, labelled with the sender's id (written by the relay).
        assert (got.kind, got.node_id, got.body) == (
            Kind.TO_SERVER,
            "alice",
            b"opaque bytes \x00\xff",
        )
        bob.send(Kind.TO_CLIENT, "alice", b"answer")
        assert alice.receive() == Envelope(Kind.TO_CLIENT, "bob", b"answer")
        bob.send(Kind.TO_SERVER, "nobody", b"lost")
        assert bob.receive() == Envelope(Kind.UNREACHABLE, "nobody", b"{}")
        peers = {peer["node_id"]: peer for peer in relay.status()["peers"]}
        assert peers["alice"]["packets_in"] == 1 and peers["alice"]["packets_out"] == 1
        assert peers["bob"]["links"] == ["alice"] and peers["bob"]["dropped"] == 1
        # The debug dump holds every forwarded datagram: it does see plaintext, when there is any.
        assert b"opaque bytes" in dump.read_bytes() and b"answer" in dump.read_bytes()
    finally:
        relay.process.stop()


def test_quic_connection_through_the_relay(relay: RelayProcess, home: Path) -> None:
    async def scenario() -> None:
        server = await open_link(relay.port, "listener", home, accept=Echo())
        client = await open_link(relay.port, "dialer", home, accept=None)
        handler = Echo()
        connection = await client.dial("listener", handler, {"node_id": "dialer"})
        assert link_kind(connection) == "relayed"
        tensor = torch.randn(64, 576)  # a prefill-sized hidden state: many datagrams
        assert torch.equal(await echo(connection, handler, tensor), tensor)
        # Both ends size packets for the relay's path less the envelope, never for the made-up
        # address of the peer.
        assert server.server is not None
        (accepted,) = set(server.server._protocols.values())
        assert accepted._quic._max_datagram_size == server.datagram_size
        assert connection._quic._max_datagram_size == client.datagram_size
        started = time.monotonic()
        with pytest.raises(RelayUnavailable):
            await client.dial("not-registered", handler, {"node_id": "dialer"})
        assert time.monotonic() - started < 2, "UNREACHABLE should fail the dial at once"
        client.close()
        server.close()

    asyncio.run(scenario())
    peers = {peer["node_id"]: peer for peer in relay.status()["peers"]}
    assert peers["dialer"]["links"] == ["listener"]
    assert peers["dialer"]["bytes_in"] > 64 * 576 * 4 and peers["listener"]["bytes_in"] > 0


def test_dial_refuses_a_certificate_other_than_the_announced_one(
    relay: RelayProcess, home: Path
) -> None:
    """A relay (or anyone) standing in for a node cannot pass the gateway's certificate pin."""

    async def scenario() -> None:
        server = await open_link(relay.port, "genuine", home, accept=Echo())
        client = await open_link(relay.port, "dialer", home, accept=None)
        dialer = Dialer(client.identity, TOKEN)
        genuine = load_or_create_identity(home / "relay-test", "genuine").fingerprint()
        hop = Hop("genuine", "127.0.0.1", 9, fingerprint=genuine, direct=False)
        node = {"node_id": "dialer"}
        assert link_kind(await dial(dialer, client, hop, Echo(), node)) == "relayed"
        impostor = replace(hop, fingerprint="00" * 32)
        with pytest.raises(JoinRefused, match="certificate other than the announced one"):
            await dial(dialer, client, impostor, Echo(), node)
        client.close()
        server.close()

    asyncio.run(scenario())


# -- limits ---------------------------------------------------------------------------------


def test_byte_rate_limit_drops_the_excess() -> None:
    rate = 20_000  # bytes/s; the bucket holds one second's worth, at least 64 KiB
    relay = start_relay("--rate", str(rate))
    try:
        sender, receiver = BarePeer(relay.port, "sender"), BarePeer(relay.port, "receiver")
        assert sender.register().kind == Kind.REGISTERED
        assert receiver.register().kind == Kind.REGISTERED
        received: list[Envelope] = []
        reader = threading.Thread(target=lambda: received.extend(receiver.receive_all(1.0)))
        reader.start()
        started = time.monotonic()
        for _ in range(200):
            sender.send(Kind.TO_SERVER, "receiver", bytes(1000))
        elapsed = time.monotonic() - started
        reader.join()
        datagram = len(encode(Kind.TO_SERVER, "receiver", bytes(1000)))
        allowed = (64 * 1024 + rate * (elapsed + 0.1)) / datagram
        assert 40 <= len(received) <= allowed + 1, (len(received), allowed)
        assert relay.peer("sender")["dropped"] == 200 - len(received)
    finally:
        relay.process.stop()


def test_link_limit_per_peer() -> None:
    relay = start_relay("--max-links", "1")
    try:
        peers = {name: BarePeer(relay.port, name) for name in ("a", "b", "c")}
        for peer in peers.values():
            assert peer.register().kind == Kind.REGISTERED
        peers["a"].send(Kind.TO_SERVER, "b", b"first link")
        peers["a"].send(Kind.TO_SERVER, "c", b"second link: over the limit")
        assert [e.body for e in peers["b"].receive_all(0.3)] == [b"first link"]
        assert peers["c"].receive_all(0.3) == []
        status = relay.peer("a")
        assert status["links"] == ["b"] and status["dropped"] == 1
    finally:
        relay.process.stop()


def test_idle_peer_expires() -> None:
    relay = start_relay("--idle", "1")
    try:
        peer = BarePeer(relay.port, "sleepy")
        assert peer.register().kind == Kind.REGISTERED
        assert relay.peer("sleepy") is not None
        deadline = time.monotonic() + 5
        while relay.peer("sleepy") is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert relay.peer("sleepy") is None
        peer.send(Kind.PING, "sleepy")
        assert peer.receive().kind == Kind.UNKNOWN  # so it would register again
    finally:
        relay.process.stop()


# -- restart --------------------------------------------------------------------------------


def test_peers_register_again_after_a_relay_restart(home: Path) -> None:
    relay = start_relay()

    async def scenario() -> None:
        nonlocal relay
        server = await open_link(relay.port, "stage-b", home, accept=Echo())
        client = await open_link(relay.port, "stage-a", home, accept=None)
        handler = Echo()
        connection = await client.dial("stage-b", handler, {"node_id": "stage-a"})
        tensor = torch.arange(4096, dtype=torch.float32)
        assert torch.equal(await echo(connection, handler, tensor), tensor)

        relay.process.popen.kill()
        relay.process.popen.wait()
        relay = start_relay(port=relay.port, status_port=relay.status_port)
        deadline = time.monotonic() + 10
        while min(server.registrations, client.registrations) < 2:
            assert time.monotonic() < deadline, "the peers did not register again"
            await asyncio.sleep(0.1)
        # The same QUIC connection carries traffic again: nothing had to be re-dialed.
        assert torch.equal(await echo(connection, handler, tensor * 2), tensor * 2)
        assert not connection.closed
        client.close()
        server.close()

    try:
        asyncio.run(scenario())
        assert {p["node_id"] for p in relay.status()["peers"]} == {"stage-a", "stage-b"}
    finally:
        relay.process.stop()


# -- the whole cluster ----------------------------------------------------------------------


def test_auto_relay_routes_a_stage_through_the_relay(tiny_model: Path) -> None:
    relay_port = free_port(socket.SOCK_DGRAM)
    cluster = start_auto(tiny_model, 2, "--relay", "--relay-port", str(relay_port))
    try:
        pipeline = cluster.status()["pipeline"]
        links = [(stage["link"], stage["gateway_link"]) for stage in pipeline["stages"]]
        assert any("relayed" in pair for pair in links), links
        assert pipeline["relay"]["address"] == f"127.0.0.1:{relay_port}"
        answer = httpx.post(
            f"{cluster.url}/v1/chat/completions",
            json={"model": cluster.model, "messages": [{"role": "user", "content": "hi"}]}
            | {"max_tokens": 8, "temperature": 0},
            timeout=60,
        )
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 8
        status = httpx.get(f"http://127.0.0.1:{relay_port}/status", timeout=5).json()
        registered = {peer["node_id"] for peer in status["peers"]}
        assert registered == {"gateway", "worker-0", "worker-1"}
    finally:
        cluster.process.stop()

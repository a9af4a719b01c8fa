"""The relay's datagram envelope and the proofs of its registration handshake (no I/O).

Every datagram between a peer and the relay is

    magic "MPR" | kind B | id_length B | node id (UTF-8, at most 64 bytes) | body

Data kinds carry one QUIC datagram of the peers' own connections as an opaque body. Towards the
relay the id names the destination; from the relay it names the source, written by the relay
from its registration table, so a peer cannot speak under another's id. Control kinds carry a
small JSON body.

Registration proves the mesh's join token without giving it to the relay: both sides use the
relay key, a one-way derivation of the token. A relay operator can hold the key (to check
registrations) and still not join the mesh, whose HELLO needs the token itself.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

MAGIC = b"MPR"
MAX_ID_BYTES = 64
ENVELOPE_OVERHEAD = len(MAGIC) + 2 + MAX_ID_BYTES
# A HELLO is padded to this size and the relay ignores shorter ones, so its answer (a
# CHALLENGE, smaller) cannot amplify a flood sent under a spoofed source address.
HELLO_SIZE = 256
MAX_CONTROL_BYTES = 4096
RELAY_KEY_PREFIX = "mpr1-"
KEY_CONTEXT = b"meshpipe-relay-key/1"
PEER_CONTEXT = b"meshpipe-relay-peer/1"
RELAY_CONTEXT = b"meshpipe-relay-server/1"


class Kind(enum.IntEnum):
    """What an envelope carries."""

    HELLO = 1  # peer: I want to register as `node_id` (padded to HELLO_SIZE)
    CHALLENGE = 2  # relay: the nonce to prove the key over
    REGISTER = 3  # peer: my proof over your nonce, and a nonce of mine
    REGISTERED = 4  # relay: registered (lease: idle expiry in seconds), my proof over yours
    REFUSED = 5  # relay: registration refused; body: the reason
    PING = 6  # peer: keep my registration (and my NAT's mapping) alive
    PONG = 7  # relay: still registered
    UNKNOWN = 8  # relay: this address is not registered (the relay restarted): register again
    TO_SERVER = 9  # a QUIC datagram for the listener of the peer named
    TO_CLIENT = 10  # a QUIC datagram for a connection the peer named has dialed
    UNREACHABLE = 11  # relay: no peer of that id is registered


DATA_KINDS = frozenset({Kind.TO_SERVER, Kind.TO_CLIENT})


class EnvelopeError(ValueError):
    """A datagram that is not a well-formed envelope."""


@dataclass(frozen=True)
class Envelope:
    """One decoded datagram."""

    kind: Kind
    node_id: str
    """The destination (peer to relay) or the source (relay to peer)."""
    body: bytes


def encode(kind: Kind, node_id: str, body: bytes = b"") -> bytes:
    """One datagram: the envelope header, then the body unchanged."""
    name = node_id.encode()
    if not name or len(name) > MAX_ID_BYTES:
        raise EnvelopeError(f"a node id takes 1 to {MAX_ID_BYTES} bytes, got {len(name)}")
    return b"".join((MAGIC, bytes((kind, len(name))), name, body))


def decode(data: bytes) -> Envelope:
    """Check and split a datagram; EnvelopeError when it is not one of ours."""
    if len(data) < 6 or data[:3] != MAGIC:
        raise EnvelopeError("not a relay envelope")
    try:
        kind = Kind(data[3])
    except ValueError:
        raise EnvelopeError(f"unknown envelope kind {data[3]}") from None
    length = data[4]
    if not 0 < length <= MAX_ID_BYTES or len(data) < 5 + length:
        raise EnvelopeError("bad node id length")
    try:
        node_id = data[5 : 5 + length].decode()
    except UnicodeDecodeError:
        raise EnvelopeError("node id is not UTF-8") from None
    return Envelope(kind, node_id, data[5 + length :])


def control(kind: Kind, node_id: str, pad_to: int = 0, **fields: Any) -> bytes:
    """A control datagram with a JSON body (padded with spaces, which JSON ignores)."""
    datagram = encode(kind, node_id, json.dumps(fields, separators=(",", ":")).encode())
    return datagram + b" " * max(0, pad_to - len(datagram))


def fields(envelope: Envelope) -> dict[str, Any]:
    """The JSON body of a control envelope."""
    if len(envelope.body) > MAX_CONTROL_BYTES:
        raise EnvelopeError("control body too long")
    try:
        value = json.loads(envelope.body or b"{}")
    except ValueError:
        raise EnvelopeError("control body is not JSON") from None
    if not isinstance(value, dict):
        raise EnvelopeError("control body is not an object")
    return value


def relay_key(token: str) -> str:
    """The relay key of a join token (a relay key is returned unchanged)."""
    if token.startswith(RELAY_KEY_PREFIX):
        return token
    return RELAY_KEY_PREFIX + hmac.new(token.encode(), KEY_CONTEXT, hashlib.sha256).hexdigest()


def _mac(key: str, context: bytes, nonce: str, node_id: str) -> str:
    message = context + b"\0" + nonce.encode() + b"\0" + node_id.encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def peer_proof(key: str, nonce: str, node_id: str) -> str:
    """A peer's proof of the relay key over the relay's nonce, bound to the id it registers."""
    return _mac(key, PEER_CONTEXT, nonce, node_id)


def relay_proof(key: str, nonce: str, node_id: str) -> str:
    """The relay's proof of the key over the peer's nonce: a peer talks only to a real relay."""
    return _mac(key, RELAY_CONTEXT, nonce, node_id)


def check(expected: str, given: object) -> bool:
    return isinstance(given, str) and hmac.compare_digest(expected, given)

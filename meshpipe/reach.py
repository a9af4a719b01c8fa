"""How one node reaches another: directly first, through the relay when that fails.

The gateway tells a worker its next hop (ASSIGN `next`): node id, address, certificate
fingerprint, whether it takes direct connections, and the relay it is registered with. The
dialer checks the certificate it gets against that fingerprint, so neither a relay nor anyone on
the path can stand in for the node: the relay forwards packets, it cannot terminate the TLS.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass
from typing import Any

from meshpipe.identity import certificate_fingerprint
from meshpipe.quic import Dialer, FrameHandler, JoinRefused, MeshConnection
from meshpipe.relay_link import RelayLink

log = logging.getLogger(__name__)

# The id the gateway registers under with a relay, where workers find it.
GATEWAY_NODE_ID = "gateway"
# A direct handshake that has not completed by then is taken for a path that does not exist
# (a NAT in between): the relay is tried next.
DIRECT_TIMEOUT = 3.0


@dataclass(frozen=True)
class Hop:
    """Where a node is and how it can be reached."""

    node_id: str
    host: str
    port: int
    fingerprint: str = ""
    """SHA-256 of the node's certificate; empty: not checked."""
    direct: bool = True
    """False for a node that takes relayed connections only (`--relay-only`)."""
    relay: str = ""
    """HOST:PORT of the relay the node is registered with; empty: none."""

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Hop:
        return cls(
            node_id=str(meta["node_id"]),
            host=str(meta["host"]),
            port=int(meta["port"]),
            fingerprint=str(meta.get("fingerprint") or ""),
            direct=bool(meta.get("direct", True)),
            relay=str(meta.get("relay") or ""),
        )

    def meta(self) -> dict[str, Any]:
        return asdict(self)


async def dial(
    dialer: Dialer,
    relay: RelayLink | None,
    hop: Hop,
    handler: FrameHandler,
    node: dict[str, Any],
    relay_only: bool = False,
) -> MeshConnection:
    """Connect to `hop` and prove the join token: without a relay, directly; with one, directly
    unless the hop or we are relay-only, and through the relay when the direct handshake fails."""
    if relay is None:
        connection = await dialer.dial(hop.host, hop.port, handler, node)
        pin(connection, hop)
        return connection
    connection = None
    if hop.direct and not relay_only:
        try:
            connection = await asyncio.wait_for(
                dialer.dial(hop.host, hop.port, handler, node), DIRECT_TIMEOUT
            )
        except (TimeoutError, OSError, ConnectionError) as error:
            log.info("no direct path to %s (%s): via %s", hop.node_id, error, relay.address)
    if connection is None:
        connection = await relay.dial(hop.node_id, handler, node)
    pin(connection, hop)
    return connection


def pin(connection: MeshConnection, hop: Hop) -> None:
    """Refuse a connection whose certificate is not the one announced for the hop."""
    if not hop.fingerprint:
        return
    certificate = connection._quic.tls._peer_certificate
    if certificate is None or certificate_fingerprint(certificate) != hop.fingerprint:
        connection.close()
        raise JoinRefused(f"{hop.node_id} presented a certificate other than the announced one")

"""LAN discovery with mDNS / DNS-SD: a gateway announces its mesh endpoint, a worker finds it.

The gateway registers `<instance>._meshpipe._udp.local.` with the address and UDP port of its
QUIC mesh endpoint. Its TXT record carries the port again, the SHA-256 fingerprint of the
gateway's certificate (so an operator can compare it with the one the gateway prints), and a
mesh id: an HMAC of the join token, so a worker picks the gateway of its own mesh when several
announce on one network. The token itself is never announced, and a worker still has to prove it
holds the token once connected.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import socket
from dataclasses import dataclass

import ifaddr
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

SERVICE_TYPE = "_meshpipe._udp.local."
TXT_VERSION = "1"
MESH_ID_CONTEXT = b"meshpipe-mesh-id/1"
RESOLVE_TIMEOUT_MS = 3000

log = logging.getLogger(__name__)


class DiscoveryError(Exception):
    """No gateway of this mesh announced itself in time, or announcing failed."""


@dataclass(frozen=True)
class FoundGateway:
    """A gateway seen on the network."""

    name: str
    """Its DNS-SD instance name."""
    host: str
    """The address its mesh endpoint listens on."""
    port: int
    """The UDP port of its mesh endpoint."""
    fingerprint: str
    """SHA-256 of its certificate, hex, as announced."""


def mesh_id(token: str) -> str:
    """A public name for the mesh of `token`, from which the token cannot be recovered."""
    return hmac.new(token.encode(), MESH_ID_CONTEXT, hashlib.sha256).hexdigest()[:16]


def should_announce(mesh_host: str, forced: bool | None) -> bool:
    """Announce when told to, else when the mesh endpoint is reachable off this machine."""
    if forced is not None:
        return forced
    try:
        return not ipaddress.ip_address(mesh_host).is_loopback
    except ValueError:
        return mesh_host != "localhost"


def announced_addresses(mesh_host: str) -> list[str]:
    """The addresses to announce: the bound one, or every non-loopback IPv4 one for 0.0.0.0."""
    if mesh_host not in ("0.0.0.0", ""):
        return [socket.gethostbyname(mesh_host)]
    return [
        str(ip.ip)
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
        if ip.is_IPv4 and not ipaddress.ip_address(ip.ip).is_loopback
    ]


class Announcement:
    """A registered gateway service; `close()` withdraws it (with goodbye packets)."""

    def __init__(self, zeroconf: AsyncZeroconf, info: AsyncServiceInfo) -> None:
        self.zeroconf = zeroconf
        self.info = info

    @property
    def name(self) -> str:
        return self.info.name

    async def close(self) -> None:
        await self.zeroconf.async_unregister_service(self.info)
        await self.zeroconf.async_close()


async def announce(mesh_host: str, port: int, fingerprint: str, token: str) -> Announcement:
    """Register the gateway's mesh endpoint on the interfaces it is bound to."""
    addresses = announced_addresses(mesh_host)
    if not addresses:
        raise DiscoveryError("no non-loopback IPv4 address to announce")
    instance = f"meshpipe-{fingerprint[:12]}"
    info = AsyncServiceInfo(
        SERVICE_TYPE,
        f"{instance}.{SERVICE_TYPE}",
        port=port,
        properties={
            "v": TXT_VERSION,
            "port": str(port),
            "fp": fingerprint,
            "mesh": mesh_id(token),
        },
        server=f"{instance}.local.",
        parsed_addresses=addresses,
    )
    # Only the interfaces the endpoint listens on: announcing elsewhere would invite workers
    # to an address that does not answer (and spread packets where nobody asked).
    interfaces = addresses if mesh_host not in ("0.0.0.0", "") else None
    zeroconf = _zeroconf(interfaces)
    try:
        await zeroconf.async_register_service(info)
    except Exception as error:
        await zeroconf.async_close()
        raise DiscoveryError(f"could not announce on {', '.join(addresses)}: {error}") from error
    return Announcement(zeroconf, info)


def _zeroconf(interfaces: list[str] | None) -> AsyncZeroconf:
    if interfaces is None:
        return AsyncZeroconf(ip_version=IPVersion.V4Only)
    return AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)


async def find_gateway(token: str, wait_seconds: float) -> FoundGateway:
    """The first gateway of the mesh of `token` that answers within `wait_seconds`."""
    wanted = mesh_id(token)
    zeroconf = _zeroconf(None)
    found: asyncio.Future[FoundGateway] = asyncio.get_running_loop().create_future()
    seen: list[str] = []

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is not ServiceStateChange.Removed:
            asyncio.ensure_future(_resolve(zeroconf, service_type, name, wanted, found, seen))

    browser = AsyncServiceBrowser(zeroconf.zeroconf, [SERVICE_TYPE], handlers=[on_change])
    try:
        return await asyncio.wait_for(asyncio.shield(found), wait_seconds)
    except TimeoutError:
        others = f" ({len(seen)} of other meshes: {', '.join(seen)})" if seen else ""
        raise DiscoveryError(
            f"no gateway of this mesh announced itself on the local network within "
            f"{wait_seconds:g}s{others}; pass --gateway HOST:PORT, or check the gateway listens on "
            "a LAN address (--mesh-host) or runs with --announce, and that UDP 5353 "
            "(multicast) passes between the machines"
        ) from None
    finally:
        await browser.async_cancel()
        await zeroconf.async_close()


async def _resolve(
    zeroconf: Zeroconf,
    service_type: str,
    name: str,
    wanted: str,
    found: asyncio.Future[FoundGateway],
    seen: list[str],
) -> None:
    info = AsyncServiceInfo(service_type, name)
    if not await info.async_request(zeroconf, RESOLVE_TIMEOUT_MS) or found.done():
        return
    properties = {key.decode(): (value or b"").decode() for key, value in info.properties.items()}
    addresses = info.parsed_addresses(IPVersion.V4Only)
    if properties.get("mesh") != wanted or not addresses or info.port is None:
        if name not in seen:
            seen.append(name)
        return
    found.set_result(FoundGateway(name, addresses[0], info.port, properties.get("fp", "")))


def local_address_towards(host: str) -> str:
    """This machine's address on the route to `host` (loopback for a loopback host).

    Connecting a UDP socket sends nothing; it only asks the kernel which source address the
    route to `host` uses: the address other nodes on that network can dial."""
    address = socket.gethostbyname(host)
    if ipaddress.ip_address(address).is_loopback:
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((address, 9))
        return probe.getsockname()[0]

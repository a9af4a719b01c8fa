"""`meshpipe relay [serve|status|key]`: the relay process, its status table, its key."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import httpx

from meshpipe.relay_wire import relay_key
from relay.server import RelaySettings
from relay.server import serve as serve_relay


def key_of(token: str) -> str:
    """The relay key: what the relay checks registrations with. It cannot be turned back into
    the join token, so a relay run by someone else can be given the key alone."""
    return relay_key(token)


async def serve(args: argparse.Namespace, key: str) -> None:
    settings = RelaySettings(
        key=key,
        host=args.host,
        port=args.port,
        status_host=args.status[0],
        status_port=None if args.no_status else args.status[1],
        max_peers=args.max_peers,
        max_links=args.max_links,
        rate=args.rate,
        idle_timeout=args.idle,
        dump=Path(args.dump) if args.dump else None,
    )
    await serve_relay(settings)


def fetch_status(address: tuple[str, int]) -> dict[str, Any]:
    return httpx.get(f"http://{address[0]}:{address[1]}/status", timeout=5).json()


def render(status: dict[str, Any]) -> str:
    """The status as a table: one line per registered peer."""
    limits = status["limits"]
    rate = f"{limits['rate']} B/s" if limits["rate"] else "no rate limit"
    lines = [
        f"relay {status['address']}, up {status['uptime']:.0f}s, {len(status['peers'])} peers "
        f"(max {limits['max_peers']}; {limits['max_links']} links per peer; {rate}; "
        f"idle expiry {limits['idle_timeout']:g}s)",
        f"{'node':24} {'address':22} {'links':>5} {'in':>12} {'out':>12} {'dropped':>8} {'idle':>6}",
    ]
    for peer in status["peers"]:
        lines.append(
            f"{peer['node_id']:24} {peer['address']:22} {len(peer['links']):>5} "
            f"{peer['bytes_in']:>12} {peer['bytes_out']:>12} {peer['dropped']:>8} "
            f"{peer['idle']:>5.1f}s"
        )
    counters = ", ".join(f"{name} {count}" for name, count in status["counters"].items())
    lines.append(f"datagrams not forwarded: {counters}")
    return "\n".join(lines)


def print_status(address: tuple[str, int], raw: bool) -> None:
    try:
        status = fetch_status(address)
    except httpx.HTTPError as error:
        raise SystemExit(f"error: no relay status at {address[0]}:{address[1]}: {error}") from None
    print(json.dumps(status, indent=2) if raw else render(status))

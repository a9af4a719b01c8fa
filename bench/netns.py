"""An emulated LAN on this machine: two network namespaces joined by a veth pair at MTU 1500.

`meshpipe bench transport --netns` runs its two processes in them, and reads their counters
afterwards to show that no datagram was larger than the path allowed (no IP fragments).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from typing import Any

NETNS_MTU = 1500
NETNS_SUBNET = "10.213.0"


class Namespaces:
    """Two network namespaces joined by a veth pair at MTU 1500, removed on exit."""

    def __init__(self) -> None:
        tag = os.getpid()
        self.client, self.server = f"mpbench-c{tag}", f"mpbench-s{tag}"
        self.client_link, self.server_link = f"mpc{tag}", f"mps{tag}"
        self.client_address, self.server_address = f"{NETNS_SUBNET}.1", f"{NETNS_SUBNET}.2"

    def __enter__(self) -> Namespaces:
        ip = ["ip"]
        try:
            for name in (self.client, self.server):
                run([*ip, "netns", "add", name])
                run([*ip, "-n", name, "link", "set", "lo", "up"])
            run(
                [*ip, "link", "add", self.client_link, "netns", self.client, "mtu", "1500"]
                + ["type", "veth", "peer", "name", self.server_link, "netns", self.server]
                + ["mtu", str(NETNS_MTU)]
            )
            for name, link, address in (
                (self.client, self.client_link, self.client_address),
                (self.server, self.server_link, self.server_address),
            ):
                run([*ip, "-n", name, "addr", "add", f"{address}/24", "dev", link])
                run([*ip, "-n", name, "link", "set", link, "mtu", str(NETNS_MTU), "up"])
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        for name in (self.client, self.server):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)

    def counters(self) -> dict[str, Any]:
        """Fragmentation and UDP error counters of each namespace, and the veth link's."""
        return {
            "client": namespace_counters(self.client, self.client_link),
            "server": namespace_counters(self.server, self.server_link),
        }


def run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"error: {shlex.join(command)}: {done.stderr.strip()}")
    return done.stdout


def namespace_counters(namespace: str, link: str) -> dict[str, Any]:
    snmp = run(["ip", "netns", "exec", namespace, "cat", "/proc/net/snmp"]).splitlines()
    table_rows: dict[str, dict[str, int]] = {}
    for names, values in zip(snmp[::2], snmp[1::2], strict=False):
        section, keys = names.split(":", 1)
        table_rows[section] = dict(
            zip(keys.split(), map(int, values.split(":")[1].split()), strict=False)
        )
    stats = json.loads(run(["ip", "-n", namespace, "-s", "-j", "link", "show", "dev", link]))[0]
    ip, udp = table_rows["Ip"], table_rows["Udp"]
    return {
        "mtu": stats["mtu"],
        "ip_frag_creates": ip["FragCreates"],
        "ip_frag_fails": ip["FragFails"],
        "ip_reassembly_requests": ip["ReasmReqds"],
        "udp_send_buffer_errors": udp["SndbufErrors"],
        "udp_receive_buffer_errors": udp["RcvbufErrors"],
        "udp_in_errors": udp["InErrors"],
        "link_tx_packets": stats["stats64"]["tx"]["packets"],
        "link_tx_bytes": stats["stats64"]["tx"]["bytes"],
        "link_rx_packets": stats["stats64"]["rx"]["packets"],
        "link_rx_bytes": stats["stats64"]["rx"]["bytes"],
    }

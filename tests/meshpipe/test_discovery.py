"""LAN discovery between two network namespaces joined by a veth pair: the gateway announces
itself with mDNS, workers started with only the join token find it, join and serve."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshpipe.discovery import mesh_id, should_announce
from meshpipe.identity import new_join_token
from tests.cluster import Process

GATEWAY_ADDRESS = "10.77.0.1"
WORKER_ADDRESS = "10.77.0.2"
HTTP_PORT = 9337
MESH_PORT = 9338


def test_mesh_id_names_the_mesh_without_the_token() -> None:
    token = new_join_token()
    assert mesh_id(token) == mesh_id(token) != mesh_id(new_join_token())
    assert token not in mesh_id(token) and len(mesh_id(token)) == 16


@pytest.mark.parametrize(
    ("host", "forced", "expected"),
    [
        ("127.0.0.1", None, False),
        ("localhost", None, False),
        ("10.1.2.3", None, True),
        ("0.0.0.0", None, True),
        ("10.1.2.3", False, False),
        ("127.0.0.1", True, True),
    ],
)
def test_announce_when_reachable_from_elsewhere(host: str, forced: bool, expected: bool) -> None:
    assert should_announce(host, forced) is expected


@dataclass(frozen=True)
class Namespaces:
    gateway: str
    worker: str

    def run(self, namespace: str, *command: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", namespace, *command], capture_output=True, text=True, **kwargs
        )

    def start(self, namespace: str, *arguments: str) -> Process:
        popen = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-m", "meshpipe", *arguments],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        return Process(popen)


def _ip(*arguments: str) -> None:
    subprocess.run(["ip", *arguments], check=True, capture_output=True, text=True)


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    """Two fresh namespaces linked by a veth pair; nothing in them reaches any other network."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip netns)")
    suffix = str(os.getpid())[-6:]
    pair = Namespaces(f"mp-gw-{suffix}", f"mp-wk-{suffix}")
    try:
        _ip("netns", "add", pair.gateway)
        _ip("netns", "add", pair.worker)
    except subprocess.CalledProcessError as error:
        for namespace in (pair.gateway, pair.worker):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        pytest.skip(f"cannot make network namespaces here: {error.stderr.strip()}")
    try:
        _ip("link", "add", f"mpg{suffix}", "type", "veth", "peer", "name", f"mpw{suffix}")
        for namespace, device, address in (
            (pair.gateway, f"mpg{suffix}", GATEWAY_ADDRESS),
            (pair.worker, f"mpw{suffix}", WORKER_ADDRESS),
        ):
            _ip("link", "set", device, "netns", namespace)
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", device)
            _ip("-n", namespace, "link", "set", device, "up", "multicast", "on")
            _ip("-n", namespace, "link", "set", "lo", "up")
        yield pair
    finally:
        for namespace in (pair.gateway, pair.worker):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def wait_ready(namespaces: Namespaces, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{HTTP_PORT}"
    while time.monotonic() < deadline:
        result = namespaces.run(
            namespaces.gateway, sys.executable, "-m", "meshpipe", "status", "--url", url, "--json"
        )
        if result.returncode == 0 and json.loads(result.stdout)["pipeline"]["ready"]:
            return json.loads(result.stdout)
        time.sleep(0.5)
    raise TimeoutError("the pipeline across the namespaces never became ready")


@pytest.mark.netns
def test_workers_find_the_gateway_across_namespaces(
    namespaces: Namespaces, tiny_model: Path
) -> None:
    token = new_join_token()
    gateway = namespaces.start(
        namespaces.gateway,
        *("gateway", "--model", str(tiny_model), "--stages", "2", "--token", token),
        *("--port", str(HTTP_PORT), "--mesh-host", GATEWAY_ADDRESS, "--mesh-port", str(MESH_PORT)),
    )
    processes = [gateway]
    try:
        gateway.wait_for("announced on the LAN as meshpipe-", 60)
        stranger = namespaces.start(
            namespaces.worker,
            *("worker", "--join", new_join_token(), "--discover-timeout", "3"),
        )
        processes.append(stranger)
        for index in range(2):
            processes.append(
                namespaces.start(
                    namespaces.worker,
                    *("worker", "--join", token, "--id", f"lan-{index}", "--threads", "1"),
                )
            )
        for worker in processes[2:]:
            worker.wait_for(f"at {GATEWAY_ADDRESS}:{MESH_PORT}", 30)
        status = wait_ready(namespaces, 90)
        stages = status["pipeline"]["stages"]
        assert sorted(stage["worker_id"] for stage in stages) == ["lan-0", "lan-1"]
        # Workers listen on their own side of the link, so the stages reach each other there.
        assert all(stage["address"].startswith(f"{WORKER_ADDRESS}:") for stage in stages)
        answer = namespaces.run(
            namespaces.gateway,
            *(sys.executable, "-m", "meshpipe", "chat", "--url", f"http://127.0.0.1:{HTTP_PORT}"),
            *("--max-tokens", "3", "--temperature", "0"),
            input="hello across the link\n",
            timeout=60,
        )
        assert answer.returncode == 0 and answer.stdout.strip(), answer.stdout + answer.stderr
        # A worker of another mesh sees the announcement but not a gateway of its own mesh.
        assert stranger.popen.wait(30) == 1
        assert "no gateway of this mesh announced itself" in stranger.output()
        assert "1 of other meshes: meshpipe-" in stranger.output()
    finally:
        for process in reversed(processes):
            process.stop()

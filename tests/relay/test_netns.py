"""The relay across a real NAT, in network namespaces made for the test.

    root (this test) --veth-- pub: relay, gateway, worker "pub-worker" (stage 0)
                               |
                              veth
                               |
                 router (nftables masquerade) --veth-- lan: worker "nat-worker" (stage 1)

pub has no route into lan: stage 0 tries to dial stage 1 at its private address, fails, and
reaches it through the relay, with which the NAT'd worker registered from behind the NAT. No
namespace has a route out of these four and the root namespace forwards nothing, so no test
traffic (the gateway's LAN announcement included) leaves the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.cluster import Process, start_auto

pytestmark = pytest.mark.netns

TOKEN = "mp1-netns-relay-test"
MARKER = "QUOKKA-7F3A-MARKER-ZEBRA"
PROMPTS = ["What is the capital of France?", f"Remember the code word {MARKER}, then repeat it."]
MAX_TOKENS = 12
TAG = f"rl{os.getpid() % 100000}"
PUBLIC_HTTP = "10.231.0.2"  # pub's side of the root link: the gateway's HTTP API
PUBLIC = "10.231.1.1"  # pub's side of the router link: the mesh and the relay, "on the internet"
ROUTER_WAN = "10.231.1.2"  # the address the NAT'd worker's traffic appears to come from
PRIVATE = "192.168.231.2"  # the NAT'd worker's own address


def why_no_netns() -> str | None:
    """None if network namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: iproute2, nftables)"
    probe = f"{TAG}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=True)
    return None


def sh(*command: str, stdin: str | None = None) -> None:
    subprocess.run(command, input=stdin, check=True, capture_output=True, text=True)


@dataclass
class Topology:
    """The namespaces, links, routes and NAT of the test, and the processes started in them."""

    pub: str = f"{TAG}-pub"
    router: str = f"{TAG}-rtr"
    lan: str = f"{TAG}-lan"
    processes: list[Process] = field(default_factory=list)

    def create(self) -> None:
        for namespace in (self.pub, self.router, self.lan):
            sh("ip", "netns", "add", namespace)
            sh("ip", "-n", namespace, "link", "set", "lo", "up")
        self._link(None, f"{TAG}r0", "10.231.0.1/24", self.pub, f"{TAG}p0", f"{PUBLIC_HTTP}/24")
        self._link(
            self.pub, f"{TAG}p1", f"{PUBLIC}/24", self.router, f"{TAG}w0", f"{ROUTER_WAN}/24"
        )
        self._link(
            self.router, f"{TAG}l0", "192.168.231.1/24", self.lan, f"{TAG}l1", f"{PRIVATE}/24"
        )
        sh("ip", "-n", self.router, "route", "add", "default", "via", PUBLIC)
        sh("ip", "-n", self.lan, "route", "add", "default", "via", "192.168.231.1")
        sh("ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        rules = f"""table ip nat {{
            chain postrouting {{
                type nat hook postrouting priority srcnat; policy accept;
                oifname "{TAG}w0" masquerade
            }}
        }}"""
        sh("ip", "netns", "exec", self.router, "nft", "-f", "-", stdin=rules)

    @staticmethod
    def _link(
        left: str | None, left_name: str, left_ip: str, right: str, right_name: str, right_ip: str
    ) -> None:
        """A veth pair from `left` (None: the root namespace) to `right`, addressed and up."""
        where = ["netns", left] if left else []
        sh(
            "ip",
            "link",
            "add",
            left_name,
            *where,
            "type",
            "veth",
            "peer",
            "name",
            right_name,
            "netns",
            right,
        )
        for namespace, name, address in ((left, left_name, left_ip), (right, right_name, right_ip)):
            prefix = ["-n", namespace] if namespace else []
            sh("ip", *prefix, "addr", "add", address, "dev", name)
            sh("ip", *prefix, "link", "set", name, "up")

    def destroy(self) -> None:
        for process in self.processes:
            process.stop(10)
        for namespace in (self.pub, self.router, self.lan):
            pids = subprocess.run(
                ["ip", "netns", "pids", namespace], capture_output=True, text=True
            )
            for pid in pids.stdout.split():  # anything still running in our own namespaces
                os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)

    def meshpipe(self, namespace: str, *arguments: str, token: str = TOKEN) -> Process:
        """`python -m meshpipe ARGS` inside a namespace."""
        popen = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-m", "meshpipe", *arguments],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=os.environ | {"PYTHONUNBUFFERED": "1", "MESHPIPE_JOIN_TOKEN": token},
            start_new_session=True,
        )
        process = Process(popen)
        self.processes.append(process)
        return process

    def python(self, namespace: str, code: str) -> str:
        result = subprocess.run(
            ["ip", "netns", "exec", namespace, sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return result.stdout + result.stderr


@dataclass
class RelayedCluster:
    """The relay and the gateway in pub, a worker in pub and one behind the NAT."""

    topology: Topology
    dump: Path
    relay: Process | None = None
    url: str = f"http://{PUBLIC_HTTP}:9337"

    def start_relay(self) -> Process:
        status = f"{PUBLIC_HTTP}:9339"
        relay = self.topology.meshpipe(
            self.topology.pub, "relay", "--status", status, "--dump", str(self.dump)
        )
        relay.wait_for("meshpipe relay: udp", 30)
        self.relay = relay
        return relay

    def relay_status(self) -> dict:
        return httpx.get(f"http://{PUBLIC_HTTP}:9339/status", timeout=5).json()

    def status(self) -> dict:
        return httpx.get(f"{self.url}/api/status", timeout=10).json()

    def answer(self, prompt: str) -> tuple[str, int, str]:
        client = OpenAI(base_url=f"{self.url}/v1", api_key="unused", timeout=60, max_retries=0)
        reply = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        return reply.choices[0].message.content or "", reply.usage.completion_tokens, reply.id


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(what)


@pytest.fixture(scope="module")
def direct_answers(tiny_model: Path) -> list[tuple[str, int]]:
    """The same prompts through an ordinary, direct pipeline on loopback (started and stopped
    before the relayed one: one cluster at a time)."""
    cluster = start_auto(tiny_model, 2)
    try:
        client = OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", timeout=60)
        answers = []
        for prompt in PROMPTS:
            reply = client.chat.completions.create(
                model=cluster.model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=MAX_TOKENS,
                temperature=0,
            )
            answers.append((reply.choices[0].message.content or "", reply.usage.completion_tokens))
        return answers
    finally:
        cluster.process.stop()


@pytest.fixture(scope="module")
def relayed(
    direct_answers: list, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RelayedCluster]:
    reason = why_no_netns()
    if reason is not None:
        pytest.skip(f"no network namespaces here: {reason}")
    topology = Topology()
    try:
        topology.create()
        dump = tmp_path_factory.mktemp("relay") / "forwarded.bin"
        cluster = RelayedCluster(topology, dump)
        cluster.start_relay()
        gateway = topology.meshpipe(
            topology.pub,
            *("gateway", "--model", str(tiny_model), "--name", "tiny", "--stages", "2"),
            *("--host", PUBLIC_HTTP, "--mesh-host", "0.0.0.0"),
        )
        gateway.wait_for("meshpipe gateway:", 60)
        worker = (
            "worker",
            "--gateway",
            f"{PUBLIC}:9338",
            "--relay",
            f"{PUBLIC}:9339",
            "--threads",
            "1",
        )
        topology.meshpipe(topology.pub, *worker, "--host", PUBLIC, "--id", "pub-worker")
        # The first to join gets stage 0: make that the public one, so stage 0 must reach the
        # NAT'd stage 1.
        wait_until(lambda: cluster.status()["pipeline"]["workers"], 60, "pub-worker never joined")
        topology.meshpipe(topology.lan, *worker, "--host", PRIVATE, "--id", "nat-worker")
        # Not just "ready": if the NAT'd worker is slow to start (a loaded machine), the gateway
        # plans over pub-worker alone once its join grace has passed, and that route is ready
        # before nat-worker has even registered with the relay.
        wait_until(lambda: relayed_route(cluster.status()), 90, "no relayed pipeline")
        yield cluster
    finally:
        topology.destroy()


def relayed_route(status: dict) -> bool:
    pipeline = status["pipeline"]
    stages = [stage["worker_id"] for stage in pipeline["stages"]]
    return pipeline["ready"] and stages == ["pub-worker", "nat-worker"]


def test_nat_worker_cannot_be_reached_from_outside(relayed: RelayedCluster) -> None:
    topology = relayed.topology
    probe = f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('{PRIVATE}', 9))"
    assert "Network is unreachable" in topology.python(topology.pub, probe)
    # Its registration arrived from the router's address: it went through the masquerade.
    peers = {peer["node_id"]: peer for peer in relayed.relay_status()["peers"]}
    assert peers["nat-worker"]["address"].startswith(f"{ROUTER_WAN}:")
    assert peers["pub-worker"]["address"].startswith(f"{PUBLIC}:")


def test_relayed_pipeline_gives_the_direct_pipelines_tokens(
    relayed: RelayedCluster, direct_answers: list
) -> None:
    stages = relayed.status()["pipeline"]["stages"]
    assert [stage["worker_id"] for stage in stages] == ["pub-worker", "nat-worker"]
    assert [stage["link"] for stage in stages] == ["direct", "relayed"]
    assert [stage["gateway_link"] for stage in stages] == ["direct", "direct"]
    assert relayed.status()["pipeline"]["relay"] == {"address": f"{PUBLIC}:9339", "peers": 1}
    for prompt, expected in zip(PROMPTS, direct_answers, strict=True):
        assert relayed.answer(prompt)[:2] == expected, prompt
    links = {peer["node_id"]: peer["links"] for peer in relayed.relay_status()["peers"]}
    assert links["pub-worker"] == ["nat-worker"]


def test_relay_sees_no_plaintext(relayed: RelayedCluster) -> None:
    before = relayed.dump.stat().st_size
    _, _, completion_id = relayed.answer(PROMPTS[1])
    dump = relayed.dump.read_bytes()
    # It did carry the hidden states of this request (64 floats per prompt token at least)...
    assert len(dump) - before > 30 * 64 * 4
    assert b"nat-worker" in dump and b"pub-worker" in dump  # envelope headers are clear
    # ...and none of what travels in clear inside the frames: the prompt's marker, the request id
    # that every BATCH frame's metadata carries to every stage, the frame magic, the JSON keys.
    for plaintext in (MARKER.encode(), completion_id.encode(), b"MPIP", b'"requests"'):
        assert plaintext not in dump, plaintext


def test_peer_without_the_token_is_refused(relayed: RelayedCluster) -> None:
    topology = relayed.topology
    intruder = topology.meshpipe(
        topology.lan,
        *("worker", "--gateway", f"{PUBLIC}:9338", "--relay", f"{PUBLIC}:9339"),
        *("--host", PRIVATE, "--id", "intruder", "--join", "mp1-not-the-mesh-token"),
    )
    assert intruder.popen.wait(60) != 0
    assert "the relay refused this worker: a valid join token is required" in intruder.output()
    status = relayed.relay_status()
    assert "intruder" not in {peer["node_id"] for peer in status["peers"]}
    assert status["counters"]["refused"] >= 1


def test_relay_restart_mid_session(relayed: RelayedCluster, direct_answers: list) -> None:
    assert relayed.relay is not None
    relayed.relay.popen.kill()
    relayed.relay.popen.wait()
    relayed.start_relay()
    # The very next request: the peers register again and QUIC resends what was lost.
    started = time.monotonic()
    assert relayed.answer(PROMPTS[0])[:2] == direct_answers[0]
    assert time.monotonic() - started < 30
    registered = {peer["node_id"] for peer in relayed.relay_status()["peers"]}
    assert {"pub-worker", "nat-worker"} <= registered
    assert relayed.status()["pipeline"]["stages"][1]["link"] == "relayed"

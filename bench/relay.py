"""`meshpipe bench relay`: what the relay hop costs, against the direct link in the same run.

Three processes on loopback: this one dials a server child (`python -m bench.relay --serve`)
that listens directly and also takes relayed connections through a `RelayLink`, and a
`meshpipe relay` carries the relayed ones. The same frames go over both links, interleaved:

- hop latency: decode-sized frames (one SmolLM2-135M hidden-state row, 576 fp32 = 2304 B) and
  16 KiB, echoed; half a round trip is the one-way hop, and the relay's cost per hop is the
  relayed hop less the direct one;
- throughput: 16 MiB transfers, acknowledged (prefill-sized);
- the relay's own ceiling: bare envelopes of a LAN-sized QUIC datagram blasted through it from
  one registered peer to another, counted as they arrive;
- with `--pipeline MODEL`: `meshpipe auto` and `meshpipe auto --relay`, the median gap between
  streamed tokens of the same greedy generations (per-token latency, relay included).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.environment import free_port
from bench.links import DatagramSizes, EchoServer, QuicLink, Replies
from bench.transport import payload, percentile
from meshpipe.identity import load_or_create_identity, new_join_token
from meshpipe.quic import Dialer, bound_port, listen
from meshpipe.relay_link import RelayLink
from meshpipe.relay_wire import (
    ENVELOPE_OVERHEAD,
    HELLO_SIZE,
    Kind,
    control,
    decode,
    encode,
    fields,
    peer_proof,
    relay_key,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TOKEN_ENV = "MESHPIPE_JOIN_TOKEN"
SERVER_ID = "bench-server"
LAN_DATAGRAM = 1452 - ENVELOPE_OVERHEAD  # what a relayed link on Ethernet sends
HOP_SIZES = (2304, 16 << 10)
TRANSFER_SIZE = 16 << 20


# -- the server child --------------------------------------------------------------------------


async def serve(relay: tuple[str, int]) -> None:
    """Echo on a direct listener and through the relay; print the port; serve until stdin ends."""
    token = os.environ[TOKEN_ENV]
    with tempfile.TemporaryDirectory() as directory:
        identity = load_or_create_identity(Path(directory), SERVER_ID)
        direct = await listen("127.0.0.1", 0, identity, EchoServer(DatagramSizes()), token)
        link = await RelayLink.open(relay, SERVER_ID, token, identity, EchoServer(DatagramSizes()))
        print(f"ready {bound_port(direct)}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        link.close()
        direct.close()


# -- links -------------------------------------------------------------------------------------


async def measure_links(port: int, relay: tuple[str, int], iterations: int) -> dict[str, Any]:
    token = os.environ[TOKEN_ENV]
    with tempfile.TemporaryDirectory() as directory:
        identity = load_or_create_identity(Path(directory), "bench-client")
        dialer = Dialer(identity, token)
        link = await RelayLink.open(relay, "bench-client", token, identity)
        direct_replies, relayed_replies = Replies(), Replies()
        node = {"node_id": "bench-client"}
        links = {
            "direct": QuicLink(
                await dialer.dial("127.0.0.1", port, direct_replies, node), direct_replies
            ),
            "relayed": QuicLink(await link.dial(SERVER_ID, relayed_replies, node), relayed_replies),
        }
        sizes = {name: q.connection._quic._max_datagram_size for name, q in links.items()}
        latency = [await hop_latency(links, size, iterations) for size in HOP_SIZES]
        throughput = await transfer_rates(links, max(3, iterations // 100))
        link.close()
        await dialer.close()
    return {"max_datagram_size": sizes, "latency": latency, "throughput": throughput}


async def hop_latency(links: dict[str, QuicLink], size: int, iterations: int) -> dict[str, Any]:
    """Round trips over both links, alternating, so both see the same machine load."""
    tensor = payload(size)
    round_trips: dict[str, list[float]] = {name: [] for name in links}
    for _ in range(max(10, iterations // 20)):  # warm-up
        for quic in links.values():
            await quic.round_trip(tensor)
    for _ in range(iterations):
        for name, quic in links.items():
            round_trips[name].append(await quic.round_trip(tensor))
    row: dict[str, Any] = {"size": size}
    for name, values in round_trips.items():
        row[name] = {
            "hop_p50_us": round(percentile(values, 0.5) * 1e6 / 2, 1),
            "hop_p99_us": round(percentile(values, 0.99) * 1e6 / 2, 1),
            "rtt_p50_us": round(percentile(values, 0.5) * 1e6, 1),
        }
    row["relay_adds_us_p50"] = round(row["relayed"]["hop_p50_us"] - row["direct"]["hop_p50_us"], 1)
    row["ratio_p50"] = round(row["relayed"]["hop_p50_us"] / row["direct"]["hop_p50_us"], 2)
    return row


async def transfer_rates(links: dict[str, QuicLink], repeats: int) -> dict[str, Any]:
    tensor = payload(TRANSFER_SIZE)
    seconds: dict[str, list[float]] = {name: [] for name in links}
    for quic in links.values():
        await quic.transfer(tensor)  # warm-up: windows open, congestion control ramps up
    for _ in range(repeats):
        for name, quic in links.items():
            seconds[name].append(await quic.transfer(tensor))
    row: dict[str, Any] = {"size": TRANSFER_SIZE, "repeats": repeats}
    for name, values in seconds.items():
        row[name] = {"mb_per_s": round(TRANSFER_SIZE / statistics.median(values) / 1e6, 1)}
    row["ratio"] = round(row["relayed"]["mb_per_s"] / row["direct"]["mb_per_s"], 2)
    return row


# -- the relay's own ceiling -------------------------------------------------------------------


def bare_peer(port: int, node_id: str, token: str) -> socket.socket:
    """A UDP socket registered with the relay as `node_id`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(2)
    sock.send(control(Kind.HELLO, node_id, HELLO_SIZE))
    nonce = fields(decode(sock.recv(65536)))["nonce"]
    proof = peer_proof(relay_key(token), nonce, node_id)
    sock.send(control(Kind.REGISTER, node_id, nonce=nonce, proof=proof, peer_nonce="bench"))
    assert decode(sock.recv(65536)).kind == Kind.REGISTERED
    return sock


def forwarding_ceiling(port: int, count: int) -> dict[str, Any]:
    """Blast `count` LAN-sized envelopes through the relay in paced bursts; what arrives/s."""
    token = os.environ[TOKEN_ENV]
    sender, sink = bare_peer(port, "blaster", token), bare_peer(port, "sink", token)
    datagram = encode(Kind.TO_SERVER, "sink", bytes(LAN_DATAGRAM))
    arrivals: list[float] = []

    def receive() -> None:
        sink.settimeout(1.0)
        try:
            while True:
                sink.recv(65536)
                arrivals.append(time.perf_counter())
        except TimeoutError:
            pass

    reader = threading.Thread(target=receive)
    reader.start()
    started = time.perf_counter()
    for index in range(count):
        sender.send(datagram)
        if index % 64 == 63:
            time.sleep(0)  # let the relay and the reader run
    reader.join()
    sender.close()
    sink.close()
    elapsed = (arrivals[-1] - started) if arrivals else float("nan")
    rate = len(arrivals) / elapsed
    return {
        "datagram_bytes": len(datagram),
        "sent": count,
        "forwarded": len(arrivals),
        "datagrams_per_s": round(rate),
        "mb_per_s": round(rate * len(datagram) / 1e6, 1),
    }


# -- the pipeline ------------------------------------------------------------------------------


def token_gaps(url: str, model: str, prompt: str, max_tokens: int) -> list[float]:
    """Seconds between streamed tokens of one greedy generation."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True}
    body |= {"max_tokens": max_tokens, "temperature": 0}
    stamps = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {") and '"content"' in line:
                stamps.append(time.perf_counter())
    return [later - earlier for earlier, later in zip(stamps, stamps[1:], strict=False)]


def pipeline_run(model: str, relay: bool, runs: int, max_tokens: int) -> dict[str, Any]:
    """Start `meshpipe auto` (with `--relay` or not), time `runs` greedy generations, stop it."""
    port, mesh = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
    command = [sys.executable, "-m", "meshpipe", "auto", "--model", model, "--port", str(port)]
    command += ["--mesh-port", str(mesh)]
    if relay:
        command += ["--relay", "--relay-port", str(free_port(socket.SOCK_DGRAM))]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if "meshpipe is ready" in line:
                break
        else:
            raise SystemExit(f"error: {shlex.join(command)} exited")
        threading.Thread(target=child.stdout.read, daemon=True).start()
        url = f"http://127.0.0.1:{port}"
        name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        stages = httpx.get(f"{url}/api/status").json()["pipeline"]["stages"]
        token_gaps(url, name, "Warm up.", 8)
        gaps: list[float] = []
        for index in range(runs):
            gaps += token_gaps(url, name, f"Tell me a story about the number {index}.", max_tokens)
        links = [[stage["worker_id"], stage["link"], stage["gateway_link"]] for stage in stages]
        return {"links": links, "gaps": gaps}
    finally:
        child.terminate()
        child.wait(30)


def measure_pipeline(model: str, pairs: int, runs: int, max_tokens: int) -> dict[str, Any]:
    """Direct and relayed clusters in turn, `pairs` times (the machine's load drifts), one at a
    time; the gaps of each kind pooled."""
    gaps: dict[str, list[float]] = {"direct": [], "relayed": []}
    per_cluster: dict[str, list[float]] = {"direct": [], "relayed": []}
    links: list = []
    for _ in range(pairs):
        for kind in gaps:
            run = pipeline_run(model, kind == "relayed", runs, max_tokens)
            gaps[kind] += run["gaps"]
            per_cluster[kind].append(round(statistics.median(run["gaps"]) * 1e3, 2))
            links = run["links"] if kind == "relayed" else links
    result: dict[str, Any] = {"model": model, "relayed_links": links}
    for kind, values in gaps.items():
        result[kind] = {
            "token_gap_ms_p50": round(statistics.median(values) * 1e3, 2),
            "token_gap_ms_p90": round(percentile(values, 0.9) * 1e3, 2),
            "per_cluster_p50_ms": per_cluster[kind],
            "tokens": len(values),
        }
    direct, relayed = result["direct"]["token_gap_ms_p50"], result["relayed"]["token_gap_ms_p50"]
    result["relay_adds_ms_per_token_p50"] = round(relayed - direct, 2)
    result["ratio_p50"] = round(relayed / direct, 3)
    return result


# -- the run -----------------------------------------------------------------------------------


def start_relay(port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "meshpipe", "relay", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--no-status"]
    relay = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert relay.stdout is not None
    if "meshpipe relay: udp" not in relay.stdout.readline():
        raise SystemExit("error: the relay did not start")
    return relay


def start_server(relay_port: int) -> tuple[subprocess.Popen, int]:
    command = [sys.executable, "-m", "bench.relay", "--serve", "--relay-port", str(relay_port)]
    server = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    line = server.stdout.readline().split()
    if line[:1] != ["ready"]:
        raise SystemExit("error: the echo server did not start")
    return server, int(line[1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    relay_port = free_port(socket.SOCK_DGRAM)
    relay = start_relay(relay_port)
    server, port = start_server(relay_port)
    try:
        links = asyncio.run(measure_links(port, ("127.0.0.1", relay_port), args.iterations))
        ceiling = forwarding_ceiling(relay_port, args.blast)
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(10)
        relay.terminate()
        relay.wait(10)
    results: dict[str, Any] = {**links, "relay_ceiling": ceiling}
    if args.pipeline:
        results["pipeline"] = measure_pipeline(
            args.pipeline, args.pairs, args.runs, args.max_tokens
        )
    return results


def table(results: dict[str, Any]) -> str:
    lines = ["hop latency (one way, p50 / p99, us)    direct            relayed        relay adds"]
    for row in results["latency"]:
        d, r = row["direct"], row["relayed"]
        lines.append(
            f"  {row['size']:>6} B   {d['hop_p50_us']:>8.1f} / {d['hop_p99_us']:<8.1f} "
            f"{r['hop_p50_us']:>8.1f} / {r['hop_p99_us']:<8.1f} {row['relay_adds_us_p50']:>8.1f}"
            f"  (x{row['ratio_p50']})"
        )
    t = results["throughput"]
    lines.append(
        f"throughput {t['size'] >> 20} MiB: direct {t['direct']['mb_per_s']} MB/s, "
        f"relayed {t['relayed']['mb_per_s']} MB/s (x{t['ratio']})"
    )
    c = results["relay_ceiling"]
    lines.append(
        f"relay ceiling: {c['datagrams_per_s']} datagrams/s of {c['datagram_bytes']} B = "
        f"{c['mb_per_s']} MB/s ({c['forwarded']} of {c['sent']} forwarded)"
    )
    if "pipeline" in results:
        p = results["pipeline"]
        lines.append(
            f"pipeline {Path(p['model']).name}: token gap p50 direct {p['direct']['token_gap_ms_p50']}"
            f" ms, relayed {p['relayed']['token_gap_ms_p50']} ms "
            f"({p['relay_adds_ms_per_token_p50']:+} ms, x{p['ratio_p50']}); links {p['relayed_links']}"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshpipe bench relay", description=__doc__)
    p.add_argument("--iterations", type=int, default=500, help="round trips per size and link")
    p.add_argument("--blast", type=int, default=50_000, help="envelopes for the relay ceiling")
    p.add_argument("--pipeline", metavar="MODEL", help="also time `meshpipe auto` with MODEL")
    p.add_argument("--pairs", type=int, default=2, help="direct and relayed clusters, in turn")
    p.add_argument("--runs", type=int, default=3, help="generations per cluster")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--output", type=Path, help="JSON path (default bench/results/relay-...)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--relay-port", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    os.environ.setdefault(TOKEN_ENV, new_join_token())
    if args.serve:
        asyncio.run(serve(("127.0.0.1", args.relay_port)))
        return
    results = run(args)
    print(table(results))
    import aioquic

    document = {
        "benchmark": "relay",
        "command": shlex.join(["meshpipe", "bench", "relay", *argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "hostname": socket.gethostname(),
            "cpus": os.cpu_count(),
            "load_average": [round(value, 2) for value in os.getloadavg()],
            "python": platform.python_version(),
            "aioquic": aioquic.__version__,
        },
        **results,
    }
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.output or RESULTS / f"relay-{socket.gethostname()}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

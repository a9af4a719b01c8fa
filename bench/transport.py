"""`meshpipe bench transport`: meshpipe QUIC links against a plain asyncio TCP anchor.

Two processes: this one dials a server child (`python -m bench.transport --serve`) that listens
for meshpipe QUIC and for plain TCP. Sizes below 1 MiB are decode-sized hops: the server echoes
each ECHO frame and the benchmark reports half the measured round trip as the one-way hop (a
round trip is what one clock can measure; half of it is the hop only on a symmetric link).
Sizes of 1 MiB and more are prefill-sized transfers: the server answers each one with a tiny
acknowledgement and throughput is the size over the time from send to acknowledgement.

The TCP anchor carries the same payloads, length-prefixed, over asyncio streams, in the same run.
`--netns` runs the same benchmark between two network namespaces joined by a veth pair at
MTU 1500 and checks that no datagram exceeded the path MTU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.links import (
    TOKEN_ENV,
    TRANSFER_BUDGET,
    DatagramSizes,
    QuicLink,
    Replies,
    TcpLink,
    forbid_fragmentation,
    serve,
)
from bench.netns import NETNS_MTU, Namespaces
from meshpipe import busy_poll, quic
from meshpipe.identity import load_or_create_identity, new_join_token
from meshpipe.quic import (
    Dialer,
    datagram_size_for,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_SIZES = "1K,4K,16K,1M,16M,64M"
QUICK_SIZES = "1K,4K,16K,1M,16M"
TRANSFER_FROM = 1 << 20  # sizes from here on are one-way transfers, below are round trips
TARGETS = {"hop_p50_us": 150.0, "hop_p99_us": 1000.0, "mb_per_s_16m": 300.0, "tcp_ratio": 0.5}


@dataclass(frozen=True)
class Settings:
    """What one benchmark run measures."""

    host: str
    sizes: tuple[int, ...]
    iterations: int
    output: Path | None
    netns: bool
    server_netns: str | None
    datagram_size: int | None
    busy_poll_ms: float  # both processes' event loops (meshpipe/busy_poll.py); 0: no polling


# -- payloads and statistics -------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'16K' -> 16384, '64M' -> 67108864, '2304' -> 2304."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text[-1:] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def label(size: int) -> str:
    for unit, shift in (("M", 20), ("K", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


def payload(size: int) -> torch.Tensor:
    """A [1, size/4] fp32 tensor (a hidden-state row when size = 4 x hidden)."""
    if size % 4:
        raise SystemExit(f"error: size {size} is not a whole number of fp32 values")
    return torch.arange(size // 4, dtype=torch.float32).view(1, -1)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def latency_summary(round_trips: list[float], cpu: Cpu) -> dict[str, float]:
    """Round-trip percentiles, and half of them as the one-way hop, in microseconds."""
    p50, p99 = percentile(round_trips, 0.50) * 1e6, percentile(round_trips, 0.99) * 1e6
    count = len(round_trips)
    return {
        "hop_p50_us": round(p50 / 2, 1),
        "hop_p99_us": round(p99 / 2, 1),
        "rtt_p50_us": round(p50, 1),
        "rtt_p99_us": round(p99, 1),
        "rtt_min_us": round(min(round_trips) * 1e6, 1),
        "samples": count,
        # CPU time both processes spent per round trip: what a quiet machine would need.
        "cpu_us_client": round(cpu.client / count * 1e6, 1),
        "cpu_us_server": round(cpu.server / count * 1e6, 1),
    }


def throughput_summary(size: int, seconds: list[float], cpu: Cpu) -> dict[str, float]:
    rates = [size / elapsed / 1e6 for elapsed in seconds]
    busiest = max(cpu.client, cpu.server) / len(seconds)
    return {
        "mb_per_s": round(statistics.median(rates), 1),
        "mb_per_s_best": round(max(rates), 1),
        "seconds_median": round(statistics.median(seconds), 5),
        "repeats": len(seconds),
        "cpu_ms_client": round(cpu.client / len(seconds) * 1e3, 2),
        "cpu_ms_server": round(cpu.server / len(seconds) * 1e3, 2),
        # The rate if each process had a core to itself: bound by the busier one's CPU time.
        "cpu_bound_mb_per_s": round(size / busiest / 1e6, 1),
    }


def repeats_for(size: int, iterations: int) -> int:
    return max(2, min(iterations // 100, TRANSFER_BUDGET // size))


# -- measurements ----------------------------------------------------------------------------


Measure = Callable[[torch.Tensor], Any]


@dataclass(frozen=True)
class Cpu:
    """CPU seconds (user + system) each process spent on a measurement."""

    client: float
    server: float


async def sample(
    quic: QuicLink, measure: Measure, tensor: torch.Tensor, count: int, warmup: int
) -> tuple[list[float], Cpu]:
    """`count` timings of `measure`, and the CPU both processes spent on them."""
    for _ in range(warmup):
        await measure(tensor)
    client, server = time.process_time(), await quic.server_cpu()
    samples = [await measure(tensor) for _ in range(count)]
    cpu = Cpu(time.process_time() - client, await quic.server_cpu() - server)
    return samples, cpu


async def measure_links(quic: QuicLink, tcp: TcpLink, settings: Settings) -> dict[str, Any]:
    """Round trips for small sizes, transfers for large ones; QUIC and TCP back to back."""
    latency, throughput = [], []
    for size in settings.sizes:
        tensor = payload(size)
        if size < TRANSFER_FROM:
            count, warmup = settings.iterations, max(20, settings.iterations // 10)
            row: dict[str, Any] = {"size": size, "label": label(size)}
            row["quic"] = latency_summary(
                *await sample(quic, quic.round_trip, tensor, count, warmup)
            )
            row["tcp"] = latency_summary(*await sample(quic, tcp.round_trip, tensor, count, warmup))
            row["ratio_p50"] = round(row["quic"]["hop_p50_us"] / row["tcp"]["hop_p50_us"], 2)
            row["ratio_p99"] = round(row["quic"]["hop_p99_us"] / row["tcp"]["hop_p99_us"], 2)
            latency.append(row)
        else:
            count = repeats_for(size, settings.iterations)
            row = {"size": size, "label": label(size)}
            row["quic"] = throughput_summary(
                size, *await sample(quic, quic.transfer, tensor, count, 1)
            )
            row["tcp"] = throughput_summary(
                size, *await sample(quic, tcp.transfer, tensor, count, 1)
            )
            row["ratio"] = round(row["quic"]["mb_per_s"] / row["tcp"]["mb_per_s"], 2)
            throughput.append(row)
        print(f"  measured {label(size)}", file=sys.stderr, flush=True)
    return {"latency": latency, "throughput": throughput}


def server_command(settings: Settings) -> list[str]:
    command = [sys.executable, "-m", "bench.transport", "--serve", "--host", settings.host]
    command += [f"--datagram-size={quic.LOOPBACK_DATAGRAM_SIZE}"] if settings.datagram_size else []
    command += [f"--congestion-control={quic.CONGESTION_CONTROL}"]
    command += [f"--busy-poll-ms={settings.busy_poll_ms:g}"]
    if settings.server_netns:
        command = ["ip", "netns", "exec", settings.server_netns, *command]
    return command


async def run_client(settings: Settings) -> dict[str, Any]:
    """Start the server child, dial it over QUIC and TCP, measure both."""
    token = new_join_token()
    server = await asyncio.create_subprocess_exec(
        *server_command(settings),
        cwd=ROOT,
        env={**os.environ, TOKEN_ENV: token},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert server.stdout is not None and server.stdin is not None
    dialer: Dialer | None = None
    try:
        line = (await asyncio.wait_for(server.stdout.readline(), 60)).decode().split()
        if line[:1] != ["ready"]:
            raise SystemExit(f"error: the server child did not start ({line})")
        quic_port, tcp_port = int(line[1]), int(line[2])
        with tempfile.TemporaryDirectory() as directory:
            identity = load_or_create_identity(Path(directory), "bench-client")
            dialer = Dialer(identity, token)
            replies = Replies()
            connection = await dialer.dial(
                settings.host, quic_port, replies, {"node_id": "bench", "role": "bench"}
            )
        sizes = DatagramSizes()
        sizes.watch_sends(connection._transport)
        sizes.watch_receives(connection)
        sizes.dont_fragment = forbid_fragmentation(connection._transport)
        sizes.max_datagram_size = connection._quic._max_datagram_size
        reader, writer = await asyncio.open_connection(
            settings.host, tcp_port, limit=TRANSFER_BUDGET
        )
        quic = QuicLink(connection, replies)
        results = await measure_links(quic, TcpLink(reader, writer), settings)
        server_sizes = (await quic.request({"stats": True}, None)).meta
        writer.close()
        results["datagrams"] = {"client": sizes.as_dict(), "server": server_sizes}
        return results
    finally:
        if dialer is not None:
            await dialer.close()
        server.stdin.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait(), 10)
        if server.returncode is None:
            server.kill()


# -- report ------------------------------------------------------------------------------------


def check_targets(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's loopback targets, each with the figure it was judged on."""
    checks: dict[str, Any] = {}
    for row in results["latency"]:
        quic = row["quic"]
        checks[f"hop_p50_{row['label']}"] = {
            "value_us": quic["hop_p50_us"],
            "target_us": TARGETS["hop_p50_us"],
            "met": quic["hop_p50_us"] <= TARGETS["hop_p50_us"],
        }
        checks[f"hop_p99_{row['label']}"] = {
            "value_us": quic["hop_p99_us"],
            "target_us": TARGETS["hop_p99_us"],
            "met": quic["hop_p99_us"] <= TARGETS["hop_p99_us"],
        }
    for row in results["throughput"]:
        if row["size"] == 16 << 20:
            checks["mb_per_s_16M"] = {
                "value": row["quic"]["mb_per_s"],
                "target": TARGETS["mb_per_s_16m"],
                "met": row["quic"]["mb_per_s"] >= TARGETS["mb_per_s_16m"],
            }
            checks["tcp_ratio_16M"] = {
                "value": row["ratio"],
                "target": TARGETS["tcp_ratio"],
                "met": row["ratio"] >= TARGETS["tcp_ratio"],
            }
    return checks


def table(results: dict[str, Any]) -> str:
    lines = [
        "one-way hop = half the measured round trip (us); CPU us/RT: both processes' CPU time",
        f"{'size':>6} | {'QUIC p50':>9} {'p99':>9} | {'TCP p50':>9} {'p99':>9} | "
        f"{'QUIC/TCP p50':>12} {'p99':>6} | {'CPU us/RT QUIC':>14} {'TCP':>6}",
    ]
    for row in results["latency"]:
        quic, tcp = row["quic"], row["tcp"]
        lines.append(
            f"{row['label']:>6} | {quic['hop_p50_us']:>9.1f} {quic['hop_p99_us']:>9.1f} | "
            f"{tcp['hop_p50_us']:>9.1f} {tcp['hop_p99_us']:>9.1f} | "
            f"{row['ratio_p50']:>12.2f} {row['ratio_p99']:>6.2f} | "
            f"{cpu_per_round_trip(quic):>14.0f} {cpu_per_round_trip(tcp):>6.0f}"
        )
    lines += [
        "",
        "one-way transfer, median over repeats (MB/s = 1e6 bytes/s); CPU-bound: the rate the"
        " busier process's CPU time allows",
        f"{'size':>6} | {'QUIC MB/s':>10} {'best':>8} | {'TCP MB/s':>10} {'best':>8} | "
        f"{'QUIC/TCP':>8} | {'CPU-bound QUIC':>14} {'TCP':>7}",
    ]
    for row in results["throughput"]:
        quic, tcp = row["quic"], row["tcp"]
        lines.append(
            f"{row['label']:>6} | {quic['mb_per_s']:>10.1f} {quic['mb_per_s_best']:>8.1f} | "
            f"{tcp['mb_per_s']:>10.1f} {tcp['mb_per_s_best']:>8.1f} | {row['ratio']:>8.2f} | "
            f"{quic['cpu_bound_mb_per_s']:>14.1f} {tcp['cpu_bound_mb_per_s']:>7.1f}"
        )
    return "\n".join(lines)


def cpu_per_round_trip(summary: dict[str, float]) -> float:
    return summary["cpu_us_client"] + summary["cpu_us_server"]


def default_output(suffix: str = "") -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return RESULTS / f"transport-{socket.gethostname()}-{stamp}{suffix}.json"


def report(settings: Settings, results: dict[str, Any], command: str) -> dict[str, Any]:
    import aioquic

    return {
        "benchmark": "transport",
        "command": command,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "hostname": socket.gethostname(),
            "cpus": os.cpu_count(),
            # The machine is shared: its load when the run ended (1, 5, 15 min averages).
            "load_average": [round(value, 2) for value in os.getloadavg()],
            "python": platform.python_version(),
            "aioquic": aioquic.__version__,
            "torch": torch.__version__,
        },
        "link": {
            "host": settings.host,
            "max_datagram_size": datagram_size_for(settings.host),
            "congestion_control": quic.CONGESTION_CONTROL,
            "busy_poll_ms": settings.busy_poll_ms,
            "iterations": settings.iterations,
            "transfer_from_bytes": TRANSFER_FROM,
        },
        **results,
        "targets": {
            "apply_to": "loopback (the issue's targets; other paths are reported, not judged)",
            **check_targets(results),
        },
    }


def write(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {path}")


# -- emulated LAN ------------------------------------------------------------------------------


def run_netns(argv: list[str], settings: Settings, command: str) -> None:
    """Re-run this benchmark inside the client namespace against a server in the other one."""
    output = settings.output or default_output("-netns")
    inner = [arg for arg in argv if arg != "--netns"]
    inner = strip_option(strip_option(inner, "--host"), "--output")
    with Namespaces() as spaces:
        done = subprocess.run(
            ["ip", "netns", "exec", spaces.client, sys.executable, "-m", "bench.transport"]
            + inner
            + ["--host", spaces.server_address, "--server-netns", spaces.server]
            + ["--output", str(output), "--command", command],
            cwd=ROOT,
            check=False,
        )
        if done.returncode:
            raise SystemExit(done.returncode)
        document = json.loads(output.read_text())
        counters = spaces.counters()
    datagrams = document["datagrams"]
    largest = max(
        datagrams["client"]["largest_sent"],
        datagrams["client"]["largest_received"],
        datagrams["server"]["largest_sent"],
        datagrams["server"]["largest_received"],
    )
    fragments = sum(
        side["ip_frag_creates"] + side["ip_reassembly_requests"] for side in counters.values()
    )
    document["netns"] = {
        "mtu": NETNS_MTU,
        "largest_udp_payload": largest,
        "largest_ip_packet": largest + 28,
        "fits_path_mtu": largest + 28 <= NETNS_MTU and fragments == 0,
        "dont_fragment": datagrams["client"]["dont_fragment"]
        and datagrams["server"]["dont_fragment"],
        "counters": counters,
    }
    write(output, document)
    print(
        f"netns: largest UDP payload {largest} B (+28 = {largest + 28} <= {NETNS_MTU}), "
        f"IP fragments {fragments}: {'ok' if document['netns']['fits_path_mtu'] else 'FAILED'}"
    )
    if not document["netns"]["fits_path_mtu"]:
        raise SystemExit(1)


def strip_option(argv: list[str], name: str) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            kept.append(arg)
    return kept


# -- entry -------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshpipe bench transport", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address the server child listens on")
    p.add_argument(
        "--sizes",
        help=f"comma-separated sizes (K/M suffixes); below 1M: round trips, from 1M: transfers "
        f"(default {DEFAULT_SIZES}, --quick {QUICK_SIZES})",
    )
    p.add_argument(
        "--iterations", type=int, help="round trips per small size (default 2000, --quick 300)"
    )
    p.add_argument("--quick", action="store_true", help="fewer iterations, no 64M transfer")
    p.add_argument("--output", type=Path, help="JSON path (default bench/results/transport-...)")
    p.add_argument("--netns", action="store_true", help="between two namespaces on a veth pair")
    p.add_argument(
        "--datagram-size", type=int, help="override max_datagram_size on both ends (tuning runs)"
    )
    p.add_argument(
        "--congestion-control", choices=("reno", "cubic"), help="override it on both ends"
    )
    p.add_argument(
        "--busy-poll-ms",
        type=float,
        default=busy_poll.CPU_WINDOW_MS,
        help="both ends poll this long before sleeping (default 0.05, as meshpipe's CPU "
        "processes run; 20 as GPU hosts run; 0: sleep at once)",
    )
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--server-netns", help=argparse.SUPPRESS)
    p.add_argument("--command", help=argparse.SUPPRESS)
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    iterations = args.iterations or (300 if args.quick else 2000)
    return Settings(
        host=args.host,
        sizes=tuple(parse_size(size) for size in sizes.split(",") if size.strip()),
        iterations=iterations,
        output=args.output,
        netns=args.netns,
        server_netns=args.server_netns,
        datagram_size=args.datagram_size,
        busy_poll_ms=args.busy_poll_ms,
    )


def override_link(args: argparse.Namespace) -> None:
    """Tuning runs: replace the link's constants in this process (the child gets the same flags)."""
    if args.datagram_size:
        quic.LOOPBACK_DATAGRAM_SIZE = quic.LAN_DATAGRAM_SIZE = args.datagram_size
    if args.congestion_control:
        quic.CONGESTION_CONTROL = args.congestion_control


def invoked_as(argv: list[str]) -> str:
    """The command line as the user typed it (`meshpipe bench transport ...` or the module)."""
    entry = Path(sys.argv[0])
    if entry.name == "meshpipe":
        return shlex.join(["meshpipe", "bench", "transport", *argv])
    if entry.parent.name == "meshpipe" and entry.name == "__main__.py":
        return shlex.join(["python", "-m", "meshpipe", "bench", "transport", *argv])
    return shlex.join(["python", "-m", "bench.transport", *argv])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    settings = settings_from(args)
    override_link(args)
    if args.serve:
        busy_poll.run(serve(settings.host), settings.busy_poll_ms / 1000)
        return
    command = args.command or invoked_as(argv)
    if settings.netns:
        run_netns(argv, settings, command)
        return
    results = busy_poll.run(run_client(settings), settings.busy_poll_ms / 1000)
    document = report(settings, results, command)
    print(table(results))
    write(settings.output or default_output(), document)


if __name__ == "__main__":
    main()

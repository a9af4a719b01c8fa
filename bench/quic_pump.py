"""aioquic's packet path alone: two QUIC connections pumped in memory, no sockets, no asyncio.

A decode-sized hop between two meshpipe processes (`bench.transport`) pays this in full: one
packet built and sent, one received and parsed, on each side. Here two `QuicConnection`s with
meshpipe's configuration and packet-writing overrides echo a payload on one stream, handing
each other their datagrams directly, in one process and one thread. The time per round trip
is the CPU floor under a hop's round trip before sockets, the event loop and meshpipe's own
framing are added. `--profile` lists the functions that take it.

    python -m bench.quic_pump --sizes 1K,8K,16K --iterations 3000 [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import StreamDataReceived

from bench.transport import label, parse_size
from meshpipe.identity import load_or_create_identity
from meshpipe.quic import LOOPBACK_DATAGRAM_SIZE, configuration
from meshpipe.quic_packets import use_wide_frames_if_needed, write_without_empty_packet

HANDSHAKE_EXCHANGES = 10  # flights each way until both ends have 1-RTT keys
WARMUP_ROUND_TRIPS = 300
CLIENT_ADDRESS, SERVER_ADDRESS = ("127.0.0.1", 40001), ("127.0.0.1", 40002)


class Pair:
    """A client and a server connection, handshaken, with a stream for the echo."""

    def __init__(self, datagram_size: int = LOOPBACK_DATAGRAM_SIZE) -> None:
        with tempfile.TemporaryDirectory() as home:  # the certificate is read here, once
            identity = load_or_create_identity(Path(home), "pump")
            client, server = (
                configuration(side, identity, datagram_size) for side in (True, False)
            )
        self.client = QuicConnection(configuration=client)
        self.server = QuicConnection(
            configuration=server,
            original_destination_connection_id=self.client.original_destination_connection_id,
        )
        self.datagrams = 0  # delivered, either way
        self.client.connect(SERVER_ADDRESS, now=time.monotonic())
        for _ in range(HANDSHAKE_EXCHANGES):
            self.deliver(self.client, self.server, CLIENT_ADDRESS)
            self.deliver(self.server, self.client, SERVER_ADDRESS)
        for connection in (self.client, self.server):
            use_wide_frames_if_needed(connection)
            write_without_empty_packet(connection)
            received(connection)  # the handshake's events
        self.stream_id = self.client.get_next_available_stream_id()

    def deliver(
        self, sender: QuicConnection, receiver: QuicConnection, address: tuple[str, int]
    ) -> None:
        """Every datagram `sender` has to send, received by `receiver`."""
        for data, _ in sender.datagrams_to_send(now=time.monotonic()):
            receiver.receive_datagram(data, address, now=time.monotonic())
            self.datagrams += 1

    def round_trip(self, payload: bytes) -> int:
        """`payload` to the server and back; the bytes that came back."""
        self.client.send_stream_data(self.stream_id, payload)
        self.deliver(self.client, self.server, CLIENT_ADDRESS)
        echoed = received(self.server)
        self.server.send_stream_data(self.stream_id, payload[:echoed])
        self.deliver(self.server, self.client, SERVER_ADDRESS)
        return received(self.client)


def received(connection: QuicConnection) -> int:
    """Stream bytes among `connection`'s pending events."""
    count = 0
    while (event := connection.next_event()) is not None:
        if isinstance(event, StreamDataReceived):
            count += len(event.data)
    return count


def measure(size: int, iterations: int, profile: bool = False) -> dict[str, Any]:
    """Microseconds per round trip of `size` bytes, and datagrams per round trip."""
    pair, payload = Pair(), bytes(size)
    for _ in range(WARMUP_ROUND_TRIPS):
        pair.round_trip(payload)
    pair.datagrams, echoed = 0, 0
    started = time.perf_counter()
    for _ in range(iterations):
        echoed += pair.round_trip(payload)
    elapsed = time.perf_counter() - started
    result = {
        "round_trip_us": elapsed / iterations * 1e6,
        "datagrams_per_round_trip": pair.datagrams / iterations,
        "echoed_bytes": echoed,
    }
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(iterations):
            pair.round_trip(payload)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(20)
        result["profile"] = text.getvalue()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quic_pump", description=__doc__)
    parser.add_argument("--sizes", default="1K,8K,16K", help="payload sizes, comma-separated")
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--profile", action="store_true", help="list the top functions too")
    args = parser.parse_args(argv)
    for size in (parse_size(text) for text in args.sizes.split(",")):
        result = measure(size, args.iterations, args.profile)
        print(
            f"{label(size):>5}: {result['round_trip_us']:.1f} us a round trip, "
            f"{result['datagrams_per_round_trip']:.2f} datagrams"
        )
        if args.profile:
            print(result["profile"])


if __name__ == "__main__":
    main()

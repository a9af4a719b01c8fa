"""Busy polling: the loop keeps polling after traffic, sleeps once the window has passed, and
still runs its timers and receives on time."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path

import httpx
import pytest

from meshpipe import busy_poll
from tests.cluster import descendants, start_auto


def test_the_window_is_on_for_cuda_and_off_elsewhere() -> None:
    assert busy_poll.window_ms(None, "cuda") == busy_poll.GPU_WINDOW_MS > 0
    assert busy_poll.window_ms(None, "cpu") == 0
    assert busy_poll.window_ms(5.0, "cpu") == 5.0
    assert busy_poll.window_ms(0.0, "cuda") == 0
    assert busy_poll.window_ms(-1.0, "cuda") == 0
    assert busy_poll.loop_factory(0) is asyncio.new_event_loop


class Receiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.arrived = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.arrived.done():
            self.arrived.set_result(time.monotonic())


async def cpu_over(seconds: float) -> float:
    """This thread's CPU seconds while the loop waits `seconds` (with nothing else to do)."""
    started = time.thread_time()
    await asyncio.sleep(seconds)
    return time.thread_time() - started


async def traffic_then_quiet(window: float, pause: bool = False) -> tuple[float, float, float]:
    """CPU seconds in the window after a datagram, CPU seconds after it, and how late a
    timer fired while polling (with `pause`, all of it under `busy_poll.paused`)."""
    loop = asyncio.get_running_loop()
    with busy_poll.paused(loop) if pause else contextlib.nullcontext():
        return await _traffic_then_quiet(loop, window)


async def _traffic_then_quiet(
    loop: asyncio.AbstractEventLoop, window: float
) -> tuple[float, float, float]:
    transport, receiver = await loop.create_datagram_endpoint(Receiver, local_addr=("127.0.0.1", 0))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"x", transport.get_extra_info("sockname"))
        await asyncio.wait_for(receiver.arrived, 5)
        planned = loop.time() + window / 4
        fired = loop.create_future()
        loop.call_at(planned, lambda: fired.set_result(loop.time()))
        during = await cpu_over(window / 2)
        late = await fired - planned
        await asyncio.sleep(window / 2)  # the window ends
        after = await cpu_over(window)
        return during, after, late
    finally:
        transport.close()


def test_the_loop_polls_after_traffic_then_sleeps() -> None:
    window = 0.4
    during, after, late = busy_poll.run(traffic_then_quiet(window), window)
    # polling: most of the first half of the window on the CPU (a loaded machine may take some)
    assert during > 0.3 * window / 2, during
    assert after < 0.1 * window, after  # asleep again once the window passed
    assert late < 0.05, late  # timers still fire on time while polling


def test_a_plain_loop_sleeps() -> None:
    during, _, late = busy_poll.run(traffic_then_quiet(0.4), 0)
    assert during < 0.05, during
    assert late < 0.05, late


def test_a_paused_loop_sleeps() -> None:
    """A worker's loop while its compute thread runs: no polling to take the GIL from it."""
    during, _, late = busy_poll.run(traffic_then_quiet(0.4, pause=True), 0.4)
    assert during < 0.05, during
    assert late < 0.05, late


async def received_while_polling() -> float:
    """Seconds from sending a datagram to its protocol seeing it, the loop polling meanwhile."""
    loop = asyncio.get_running_loop()
    transport, receiver = await loop.create_datagram_endpoint(Receiver, local_addr=("127.0.0.1", 0))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"first", transport.get_extra_info("sockname"))
            await asyncio.wait_for(receiver.arrived, 5)  # the window opens
            receiver.arrived = loop.create_future()
            sent = time.monotonic()
            sender.sendto(b"second", transport.get_extra_info("sockname"))
            return await asyncio.wait_for(receiver.arrived, 5) - sent
    finally:
        transport.close()


def test_datagrams_arrive_while_polling() -> None:
    assert busy_poll.run(received_while_polling(), 0.5) < 1.0


@pytest.mark.parametrize(("extra", "expected"), [((), "0"), (("--busy-poll-ms", "15"), "15")])
def test_auto_passes_the_window_to_every_process(
    tiny_model: Path, extra: tuple[str, ...], expected: str
) -> None:
    cluster = start_auto(tiny_model, 2, *extra)  # a CPU cluster: off unless asked for
    try:
        children = descendants(cluster.process.popen.pid)
        commands = [Path(f"/proc/{pid}/cmdline").read_text().split("\0") for pid in children]
        assert len(commands) == 3
        assert all(f"--busy-poll-ms={expected}" in command for command in commands), commands
        body = {"model": cluster.model, "max_tokens": 4}
        body["messages"] = [{"role": "user", "content": "Say hi"}]
        reply = httpx.post(f"{cluster.url}/v1/chat/completions", json=body, timeout=60).json()
        assert reply["usage"]["completion_tokens"] > 0
    finally:
        cluster.process.stop()

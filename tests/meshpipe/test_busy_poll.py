"""Busy polling: the loop keeps polling after traffic (the window counted from when it ran
out of work), sleeps once the window has passed, and still runs its timers and receives on
time."""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import socket
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from meshpipe import busy_poll
from tests.cluster import descendants, start_auto

Result = TypeVar("Result")


def test_the_window_is_long_for_cuda_and_a_short_spin_elsewhere() -> None:
    assert busy_poll.window_ms(None, "cuda") == busy_poll.GPU_WINDOW_MS == 20
    assert busy_poll.window_ms(None, "cpu") == busy_poll.window_ms(None) == 0.05
    assert busy_poll.window_ms(5.0, "cpu") == 5.0
    assert busy_poll.window_ms(0.0, "cuda") == 0
    assert busy_poll.window_ms(-1.0, "cuda") == 0
    assert busy_poll.loop_factory(0) is None  # asyncio.run's own loop


class Receiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.arrived = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.arrived.done():
            self.arrived.set_result(time.monotonic())


class SlowReceiver(Receiver):
    """Takes `seconds` over a datagram, blocking the loop (a long packet receipt)."""

    seconds = 0.0

    def datagram_received(self, data: bytes, addr: object) -> None:
        time.sleep(self.seconds)
        super().datagram_received(data, addr)


class Counting(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Counts the selector calls that BusyPollSelector makes: polls (timeout 0) and waits."""

    def __init__(self) -> None:
        super().__init__()
        self.polls = self.waits = 0

    def select(self, timeout: float | None = None) -> list:
        if timeout == 0:
            self.polls += 1
        else:
            self.waits += 1
        return super().select(timeout)


class CountingBusyPoll(busy_poll.BusyPollSelector, Counting):
    """A BusyPollSelector whose calls to the default selector are counted."""


def counting_run(main: Coroutine[Any, Any, Result], window: float) -> tuple[Result, Counting]:
    selector = CountingBusyPoll(window)
    with asyncio.Runner(loop_factory=lambda: busy_poll.BusyPollLoop(selector)) as runner:
        return runner.run(main), selector


async def calls_over(selector: Counting, seconds: float) -> tuple[int, int]:
    """The polls and waits of the selector while the loop waits `seconds` (nothing else to do)."""
    polls, waits = selector.polls, selector.waits
    await asyncio.sleep(seconds)
    return selector.polls - polls, selector.waits - waits


@contextlib.asynccontextmanager
async def one_datagram_received(protocol: type[Receiver]) -> AsyncIterator[None]:
    """A UDP endpoint on loopback that has received one datagram (closed on exit)."""
    loop = asyncio.get_running_loop()
    transport, receiver = await loop.create_datagram_endpoint(protocol, local_addr=("127.0.0.1", 0))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"x", transport.get_extra_info("sockname"))
        await asyncio.wait_for(receiver.arrived, 5)
        yield
    finally:
        transport.close()


async def traffic_then_quiet(window: float, pause: bool = False) -> dict[str, Any]:
    """Selector calls in the window after a datagram and after it, and how late a timer
    fired meanwhile (with `pause`, all of it under `busy_poll.paused`)."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, busy_poll.BusyPollLoop)
    selector = loop.busy_poll
    assert isinstance(selector, Counting)
    with busy_poll.paused(loop) if pause else contextlib.nullcontext():
        async with one_datagram_received(Receiver):
            planned = loop.time() + window / 4
            fired = loop.create_future()
            loop.call_at(planned, lambda: fired.set_result(loop.time()))
            during = await calls_over(selector, window / 2)
            late = await fired - planned
            await asyncio.sleep(window / 2 + 0.05)  # the window ends
            after = await calls_over(selector, window)
    return {"during": during, "after": after, "late": late}


def test_the_loop_polls_after_traffic_then_sleeps() -> None:
    calls, _ = counting_run(traffic_then_quiet(0.4), 0.4)
    polls, waits = calls["during"]
    assert polls > 100 and waits == 0, calls  # polling, never blocking, in the window
    polls, waits = calls["after"]
    # asleep once the window passed: a loop turn is a poll and one wait, for the one timer
    assert polls <= 4 and 1 <= waits <= 4, calls
    assert calls["late"] < 0.05, calls  # timers still fire on time while polling


async def after_slow_handling(window: float) -> tuple[int, int]:
    """Selector calls in the half window after a datagram whose handling took 1.5 windows."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop.busy_poll, Counting)  # type: ignore[attr-defined]
    SlowReceiver.seconds = 1.5 * window
    async with one_datagram_received(SlowReceiver):
        return await calls_over(loop.busy_poll, window / 2)  # type: ignore[attr-defined]


def test_the_window_starts_when_the_loop_runs_out_of_work() -> None:
    """Counted from the datagram's arrival, a window shorter than its handling would be over
    before the loop could poll: a 50 us spin would never run after a QUIC packet's receipt."""
    (polls, waits), _ = counting_run(after_slow_handling(0.2), 0.2)
    assert polls > 100 and waits == 0, (polls, waits)


def test_a_paused_loop_sleeps() -> None:
    """A worker's loop while its compute thread runs: no polling to take the GIL from it."""
    calls, selector = counting_run(traffic_then_quiet(0.4, pause=True), 0.4)
    polls, waits = calls["during"]
    assert polls <= 4 and 1 <= waits <= 4, calls
    assert calls["late"] < 0.05, calls
    assert selector.pauses == 0  # released


def test_a_plain_loop_is_left_alone() -> None:
    loop = asyncio.new_event_loop()
    try:
        with busy_poll.paused(loop):
            pass
    finally:
        loop.close()


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


@pytest.mark.parametrize(
    ("extra", "expected"),
    [((), "0.05"), (("--busy-poll-ms", "15"), "15"), (("--busy-poll-ms", "0"), "0")],
)
def test_auto_passes_the_window_to_every_process(
    tiny_model: Path, extra: tuple[str, ...], expected: str
) -> None:
    cluster = start_auto(tiny_model, 2, *extra)  # a CPU cluster: a 50 us spin unless asked
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

"""Busy polling: an event loop that keeps polling its sockets for a while before it sleeps.

A process that sleeps in `epoll_wait` between messages pays a wake-up on every message, and on
a virtual machine that wake-up is dear: on the 2-core VM a decode-sized QUIC hop took about
twice as long between two idle processes as between two that kept polling (docs/transport.md),
and a plain TCP hop 65 us against 21. So when the loop runs out of work after traffic it polls
without blocking for up to `window` seconds before it blocks as before: a message that comes
in that window is read at once, and a process that goes quiet sleeps again once it has passed.

Two windows. On GPU hosts 20 ms, longer than the gap between a stage's messages while a single
stream decodes, so a streaming pipeline polls throughout: it costs a core per process while
traffic flows, which GPU workers (waiting on the GPU, not the CPU) can spare. Everywhere else
50 us, a spin before sleeping: it costs at most 50 us of CPU each time the loop goes idle, and
on the VM it took the decode-sized hop from 114-157 us to 85-97 us with less CPU per round trip
than sleeping at once (sleeping and waking cost CPU too); CPU serving throughput did not move
beyond its run-to-run spread.

While another thread of the process computes (a worker's eager steps run on its compute thread)
the loop must not poll: the polling thread takes the GIL back after every `select` and starved
the compute thread, which on the H200 made a 1024-token prompt's first token 63 -> 81 ms.
`paused(loop)` blocks in `select` as a plain loop does for as long as it is held.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

Result = TypeVar("Result")

# Longer than the gap between a stage's messages while a single stream decodes (a few ms on a
# GPU), so a streaming pipeline polls throughout and stops 20 ms after its last message.
GPU_WINDOW_MS = 20.0
# Everywhere else a spin before sleeping: on the VM 30 us caught most of what it gains on a
# decode-sized hop, 100 us no more than 50 (docs/transport.md, session 22).
CPU_WINDOW_MS = 0.05


def window_ms(explicit: float | None, device: str = "cpu") -> float:
    """The busy-poll window of a process: as given, else 20 ms for CUDA and 50 us elsewhere."""
    if explicit is not None:
        return max(0.0, explicit)
    return GPU_WINDOW_MS if device == "cuda" else CPU_WINDOW_MS


class BusyPollSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The default selector, polling without blocking for `window` seconds once the loop has
    run out of work after events. The window starts there, not at the events: handling a
    datagram can take longer than a short window (a QUIC packet's receipt takes tens of us)."""

    def __init__(self, window: float) -> None:
        super().__init__()
        self.window = window
        self.poll_until = -float("inf")
        self.traffic = False  # events since the loop last waited
        self.pauses = 0  # held by `paused`: block as the default selector does

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:  # callbacks are ready: the loop has work
            events = super().select(0)
            self.traffic = self.traffic or bool(events)
            return events
        now = time.monotonic()
        if self.traffic:  # the loop ran out of work after traffic: the window starts
            self.poll_until, self.traffic = now + self.window, False
        deadline = None if timeout is None else now + timeout  # the loop's next timer
        end = self.poll_until if deadline is None else min(self.poll_until, deadline)
        events = super().select(0)
        while not events and not self.pauses and now < end:
            events = super().select(0)
            now = time.monotonic()
        if not events and (deadline is None or now < deadline):
            events = super().select(None if deadline is None else deadline - now)
        self.traffic = bool(events)
        return events


class BusyPollLoop(asyncio.SelectorEventLoop):
    """A selector event loop on a BusyPollSelector."""

    def __init__(self, selector: BusyPollSelector) -> None:
        self.busy_poll = selector
        super().__init__(selector)


@contextlib.contextmanager
def paused(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """No busy polling on `loop` while held (a plain loop is left as it is)."""
    selector = loop.busy_poll if isinstance(loop, BusyPollLoop) else None
    if selector is not None:
        selector.pauses += 1
    try:
        yield
    finally:
        if selector is not None:
            selector.pauses -= 1


def loop_factory(window: float) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """Event loops that poll busily for `window` seconds after traffic (None for 0: the
    runner's own loop, exactly as `asyncio.run` makes it)."""
    if window <= 0:
        return None
    return lambda: BusyPollLoop(BusyPollSelector(window))


def run(main: Coroutine[Any, Any, Result], window: float) -> Result:
    """`asyncio.run(main)` on a loop that polls busily for `window` seconds after traffic."""
    with asyncio.Runner(loop_factory=loop_factory(window)) as runner:
        return runner.run(main)

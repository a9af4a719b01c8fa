"""Busy polling: an event loop that keeps polling its sockets for a while after traffic.

A process that sleeps in `epoll_wait` between messages pays a wake-up on every message, and on
a virtual machine its caches come back cold: on the 2-core VM a decode-sized QUIC hop took
about twice as long between two idle processes as between two that kept polling
(docs/transport.md). A serving pipeline sends a message per stage per token, so while it
streams, its processes keep polling instead: after a `select` that returned events, the next
ones poll without blocking for up to `window` seconds, then block as before. A process that
goes quiet sleeps again once the window has passed.

It costs a core per process while traffic flows, so it suits GPU hosts (their workers wait on
the GPU, not on the CPU); CPU workers need their cores for the forward pass and keep it off.
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


def window_ms(explicit: float | None, device: str) -> float:
    """The busy-poll window of a process: as given, else on for CUDA and off elsewhere."""
    if explicit is not None:
        return max(0.0, explicit)
    return GPU_WINDOW_MS if device == "cuda" else 0.0


class BusyPollSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The default selector, polling without blocking for `window` seconds after events."""

    def __init__(self, window: float) -> None:
        super().__init__()
        self.window = window
        self.last_events = -float("inf")
        self.pauses = 0  # held by `paused`: block as the default selector does

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        now = time.monotonic()
        deadline = None if timeout is None else now + max(0.0, timeout)  # the loop's next timer
        end = self.last_events + self.window
        if deadline is not None:
            end = min(end, deadline)
        events = super().select(0)
        while not events and not self.pauses and now < end:
            events = super().select(0)
            now = time.monotonic()
        if not events and (deadline is None or now < deadline):
            events = super().select(None if deadline is None else deadline - now)
        if events:
            self.last_events = time.monotonic()
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

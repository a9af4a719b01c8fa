"""Round-trip time of a meshpipe link, measured with HEARTBEAT pings.

Every `MeshConnection` answers a HEARTBEAT carrying `ping` with a `pong` of the same message id,
so either end can time its links without help from the other's code. The time includes both
event loops, as a frame on the pipeline sees them. QUIC's own RTT estimate is no substitute:
aioquic clamps it to at least 1 ms and folds in delayed ACKs, while a loopback hop is far less.
"""

from __future__ import annotations

import itertools
import time

from meshpipe.quic import MeshConnection
from meshpipe.wire import Frame, Kind

# Pings unanswered after this long are forgotten (the link's liveness is judged elsewhere).
PING_EXPIRY_SECONDS = 10.0
SMOOTHING = 0.125
# Ping ids of their own range, well away from the small ids tests and tools use.
FIRST_PING_ID = 1 << 48


class LinkLatency:
    """The smoothed round-trip time of one link, from pings sent and pongs received."""

    def __init__(self) -> None:
        self.rtt: float | None = None
        """Smoothed round-trip time in seconds (None before the first pong)."""
        self.latest: float | None = None
        """The last sample, in seconds."""
        self.sent: dict[int, float] = {}
        self.ids = itertools.count(FIRST_PING_ID)

    def ping(self, connection: MeshConnection) -> None:
        """Send a ping on `connection` (nothing when it is closed)."""
        if connection.closed:
            return
        now = time.monotonic()
        self.sent = {i: t for i, t in self.sent.items() if now - t < PING_EXPIRY_SECONDS}
        ping_id = next(self.ids)
        self.sent[ping_id] = now
        connection.send(Frame(Kind.HEARTBEAT, ping_id, {"ping": True}))

    def on_frame(self, frame: Frame) -> bool:
        """Take a pong for one of our pings; True when `frame` was one."""
        if frame.kind != Kind.HEARTBEAT or not frame.meta.get("pong"):
            return False
        sent = self.sent.pop(frame.message_id, None)
        if sent is None:
            return False
        self.latest = time.monotonic() - sent
        self.rtt = (
            self.latest
            if self.rtt is None
            else (1 - SMOOTHING) * self.rtt + SMOOTHING * self.latest
        )
        return True

"""Timestamps of a step's way through the processes, for benchmarks: where a token's host time goes.

With `MESHPIPE_TRACE=DIR` in the environment, every worker records a few marks per step (a
frame's arrival, an armed step's release, the GPU's completion seen, the send of its result),
each with the batch id and `time.perf_counter_ns()`. On Linux that is CLOCK_MONOTONIC, one clock
for every process of the machine, so the marks of different processes can be subtracted: the
time from stage 0's send to stage 1's receipt is the hop. Each process writes its marks to
`DIR/<role>-<pid>.json` when it exits (SIGTERM included). `bench.gpu --trace` sets it up and
reads the files (`segments`). Without the variable, `mark` costs one test of a global.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ENVIRONMENT = "MESHPIPE_TRACE"
MAX_MARKS = 1 << 18  # a bound on memory, about 40 MB; a whole bench.gpu run makes a few thousand

_marks: list[tuple[str, int, int]] | None = None
_role = ""


def start(role: str) -> None:
    """Record this process's marks if MESHPIPE_TRACE names a directory; written at exit."""
    global _marks, _role
    directory = os.environ.get(ENVIRONMENT)
    if not directory or _marks is not None:
        return
    _marks, _role = [], role
    atexit.register(_write, Path(directory))
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # a worker is stopped with SIGTERM, which would end it without running atexit
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def rename(role: str) -> None:
    """The role the marks are written under (a worker learns its stage from its assignment)."""
    global _role
    _role = role


def mark(what: str, batch_id: int) -> None:
    if _marks is not None and len(_marks) < MAX_MARKS:
        _marks.append((what, batch_id, time.perf_counter_ns()))


def _write(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{_role}-{os.getpid()}.json").write_text(json.dumps(_marks))


def load(directory: Path) -> dict[str, dict[tuple[str, int], int]]:
    """Each process's marks by role (`stage0`, `stage1`): {(what, batch id): ns}; a mark made
    twice for one batch keeps its first time."""
    processes: dict[str, dict[tuple[str, int], int]] = {}
    for path in sorted(directory.glob("*.json")):
        role = path.stem.rsplit("-", 1)[0]
        marks = processes.setdefault(role, {})
        for what, batch_id, ns in json.loads(path.read_text()):
            marks.setdefault((what, batch_id), ns)
    return processes


# A single stream's token loop on two stages, mark to mark: stage 1 samples batch n's token and
# feeds it to stage 0, whose step n+1 (armed, waiting for that token) goes on to stage 1. A hop
# runs from the sender's call to send (aioquic's packet, the wire, aioquic's receipt, the frame's
# decoding) to the receiver's handler; SEND_CALLS says what the call itself took. ("sent" is
# marked when the call returns, which a loaded machine can put after the receiver's handler:
# the receiver, woken by the datagram, takes the sender's core.)
TWO_STAGE_LOOP = (
    ("stage 1: tokens to the send", ("stage1", "done", 0), ("stage1", "sending", 0)),
    ("hop 1 -> 0: the feed", ("stage1", "sending", 0), ("stage0", "feed", 0)),
    ("stage 0: feed to release", ("stage0", "feed", 0), ("stage0", "released", 1)),
    ("stage 0: GPU and its completion seen", ("stage0", "released", 1), ("stage0", "done", 1)),
    ("stage 0: hidden states to the send", ("stage0", "done", 1), ("stage0", "sending", 1)),
    ("hop 0 -> 1: the batch", ("stage0", "sending", 1), ("stage1", "batch", 1)),
    ("stage 1: batch to release", ("stage1", "batch", 1), ("stage1", "released", 1)),
    ("stage 1: GPU and its completion seen", ("stage1", "released", 1), ("stage1", "done", 1)),
)
SEND_CALLS = (
    ("stage 0: its send call", ("stage0", "sending", 0), ("stage0", "sent", 0)),
    ("stage 1: its send call (the feed)", ("stage1", "sending", 0), ("stage1", "sent", 0)),
)


def segments(
    processes: dict[str, dict[tuple[str, int], int]],
    batches: list[int],
    parts: tuple = TWO_STAGE_LOOP,
) -> dict[str, Any]:
    """Median and 90th percentile, in us, of each of `parts` over the consecutive batches of
    one stream, `batches` in order; a step missing a mark is left out of that part."""
    figures: dict[str, Any] = {}
    for name, (role_a, what_a, step_a), (role_b, what_b, step_b) in parts:
        times = []
        for index in range(len(batches) - 1):
            a = processes.get(role_a, {}).get((what_a, batches[index + step_a]))
            b = processes.get(role_b, {}).get((what_b, batches[index + step_b]))
            if a is not None and b is not None:
                times.append((b - a) / 1000)
        if times:
            times.sort()
            figures[name] = {
                "p50_us": round(statistics.median(times), 1),
                "p90_us": round(times[int(0.9 * (len(times) - 1))], 1),
                "steps": len(times),
            }
    return figures

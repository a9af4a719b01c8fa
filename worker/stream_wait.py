"""A CUDA stream held at a flag in pinned host memory, and let go by a store from the host.

The driver's stream memory operations (`cuStreamWaitValue32`) put a wait into a stream: work
queued after it starts once a 32-bit word in memory the GPU can read reaches a value. A step
whose inputs are not there yet can then be queued whole (the wait, the inputs' copy, the
graph), and started later by one store into pinned memory: no API call, no launch on the
critical path. On the H200 machine the kernel queued behind a wait was done 12.6 us after
the store that released it (median), where launching the same kernel took 51.9 us to done.

The driver API is called through ctypes (torch does not expose it). The flag is a pinned torch
tensor: with unified addressing its host pointer is the GPU's pointer too.

Two rules keep a held stream from deadlocking the process:
- nothing else is queued on the stream while it is held, by this thread or another, unless
  its release is certain to come from elsewhere;
- no CUDA kernel is used for the first time while it is held: with lazy module loading the
  driver loads a kernel's module on first launch and may wait for the device meanwhile (on
  the H200 machine, a launch of a kernel not used before blocked the host behind a held
  stream until the probe's 25 s timeout). The steps queued behind a wait are replays of
  graphs run at load.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

RELEASE_TIMEOUT_S = 2.0  # the self-test's bound on a released wait


class StreamFlag:
    """A flag in pinned memory that streams wait on: `hold(stream)` queues a wait for the next
    value, `release()` stores it."""

    def __init__(self, wait_value_32: Callable[[int, int, int, int], int]) -> None:
        self._wait = wait_value_32
        self._word = torch.zeros(1, dtype=torch.int32).pin_memory()
        self._view = self._word.numpy()
        self.value = 0  # the last value held for

    def hold(self, stream: torch.cuda.Stream) -> None:
        """Work queued on `stream` from now on waits for the next `release()`."""
        self.value = (self.value + 1) & 0x7FFFFFFF
        result = self._wait(stream.cuda_stream, self._word.data_ptr(), self.value, 0)
        if result != 0:
            raise RuntimeError(f"cuStreamWaitValue32 failed: CUresult {result}")

    def release(self) -> None:
        """Let the waiting stream go on. Host stores before this one are seen by the work
        behind the wait (x86's stores are not reordered; see `supported`)."""
        self._view[0] = self.value


def later_stages_arm() -> bool:
    """Whether stages after the first arm the step they expect next (`MESHPIPE_ARMED_STEPS`:
    `on`, the default; `first` arms only the first stage's fed steps; `off` none)."""
    return os.environ.get("MESHPIPE_ARMED_STEPS", "on") == "on"


def stream_flag(device: torch.device) -> StreamFlag | None:
    """A working StreamFlag for `device`'s streams, or None (with the reason logged): not
    CUDA, not x86-64 (ARM hosts need a store fence before the release, which Python has not),
    `MESHPIPE_ARMED_STEPS=off`, a driver without the call, or a self-test that failed."""
    if device.type != "cuda":
        return None
    if os.environ.get("MESHPIPE_ARMED_STEPS", "on") == "off":
        log.info("armed steps are off (MESHPIPE_ARMED_STEPS=off)")
        return None
    if platform.machine() not in ("x86_64", "AMD64"):
        log.info("armed steps need an x86-64 host; this one is %s", platform.machine())
        return None
    try:
        driver = ctypes.CDLL("libcuda.so.1")
        wait = driver.cuStreamWaitValue32_v2
    except (OSError, AttributeError) as error:
        log.info("armed steps are off: no cuStreamWaitValue32 (%s)", error)
        return None
    wait.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
    wait.restype = ctypes.c_int
    flag = StreamFlag(wait)
    try:
        held = _self_test(flag)
    except RuntimeError as error:
        log.info("armed steps are off: %s", error)
        return None
    if not held:
        log.info("armed steps are off: the stream did not wait for its flag")
        return None
    return flag


def _self_test(flag: StreamFlag) -> bool:
    """Hold the current stream, check that work behind the wait does not run before the
    release and does after it."""
    flag.hold(torch.cuda.current_stream())
    after = torch.cuda.Event()
    after.record()
    time.sleep(0.01)
    held = not after.query()
    flag.release()
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    while not after.query():
        if time.monotonic() > deadline:
            raise RuntimeError("a released wait did not end")
        time.sleep(0.001)
    return held

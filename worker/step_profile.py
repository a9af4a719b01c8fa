"""A worker's steps profiled where they run, inside the pipeline: `MESHPIPE_PROFILE_STEPS`.

`bench.stage_profile` times one stage alone. In a pipeline a stage's GPU time a step did not
follow its kernels: a kernel that saved 0.17 ms a step alone saved none there (docs/gpu.md,
session 10). With `MESHPIPE_PROFILE_STEPS=FIRST,COUNT` in its environment a worker records
its steps FIRST+1 to FIRST+COUNT with torch.profiler (the GPU's kernels on CUDA) and writes a
summary to `<data dir>/step-profiles/<node id>.json`: the steps' wall and GPU times, each
kernel's time a step, and what is left between the kernels.

The profiler synchronises the device when it stops, which would wait for ever on an armed step
(worker/stream_wait.py): the worker arms no step behind the one after which the profile starts
or stops (and cancels one if it had: a cancelled step runs on the scratch slot, and its kernels
would be counted in the window's). The summary is built on a thread of its own, so the event
loop keeps the worker's heartbeats meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
from pathlib import Path
from typing import Any

import torch

from meshpipe import dirs

log = logging.getLogger(__name__)

ENVIRONMENT = "MESHPIPE_PROFILE_STEPS"
TOP_KERNELS = 40


def profile_dir() -> Path:
    path = dirs.data_dir() / "step-profiles"
    path.mkdir(parents=True, exist_ok=True)
    return path


class StepProfile:
    """Counts a worker's steps, and profiles a window of them once."""

    def __init__(self, first: int, count: int, path: Path, cuda: bool) -> None:
        self.first, self.count, self.path, self.cuda = first, count, path, cuda
        self.steps = 0
        self.profile: torch.profiler.profile | None = None
        self.step_ms: list[float] = []
        self.device_ms: list[float] = []
        self.task: asyncio.Task | None = None  # the summary being written

    @classmethod
    def from_environment(cls, node_id: str, device: str) -> StepProfile | None:
        """The profile `MESHPIPE_PROFILE_STEPS` asks for; None if unset (a bad value is an
        error at start, not a silent no-op)."""
        value = os.environ.get(ENVIRONMENT, "")
        if not value:
            return None
        try:
            first, count = (int(part) for part in value.split(","))
        except ValueError:
            raise SystemExit(f"error: {ENVIRONMENT} must be FIRST,COUNT (got {value!r})") from None
        if first < 1 or count < 1:
            raise SystemExit(f"error: {ENVIRONMENT} needs FIRST >= 1 and COUNT >= 1")
        return cls(first, count, profile_dir() / f"{node_id}.json", device == "cuda")

    @property
    def running(self) -> bool:
        return self.profile is not None

    def turns_after(self) -> bool:
        """Whether the profile starts or stops once the step that ran now is counted (so no
        step may be armed then)."""
        return self.steps + 1 in (self.first, self.first + self.count)

    def after_step(self, step_seconds: float, device_seconds: float) -> None:
        """Count a step; start the profile before step FIRST+1, stop it after FIRST+COUNT."""
        if self.running:
            self.step_ms.append(step_seconds * 1000)
            self.device_ms.append(device_seconds * 1000)
        self.steps += 1
        if self.steps == self.first:
            self._start()
        elif self.steps == self.first + self.count and self.running:
            self._stop()

    def _start(self) -> None:
        # the GPU's kernels on CUDA; on a CPU the ops of the event loop's thread (the profiler
        # records no other thread's, so a CPU worker's forward passes are not in it)
        activity = torch.profiler.ProfilerActivity
        self.profile = torch.profiler.profile(
            activities=[activity.CUDA if self.cuda else activity.CPU]
        )
        self.profile.start()

    def _stop(self) -> None:
        assert self.profile is not None
        profile, self.profile = self.profile, None
        profile.stop()
        self.task = asyncio.get_running_loop().create_task(asyncio.to_thread(self._write, profile))

    def _write(self, profile: torch.profiler.profile) -> None:
        summary = self.summary(profile)
        partial = self.path.with_suffix(".partial")  # renamed whole: a reader sees all or none
        partial.write_text(json.dumps(summary, indent=1) + "\n")
        partial.replace(self.path)
        log.info("profiled %d steps: %s", self.count, self.path)

    def summary(self, profile: torch.profiler.profile) -> dict[str, Any]:
        steps = len(self.step_ms)
        events, kernel_ms = device_kernels(profile, steps)
        device_ms = statistics.mean(self.device_ms)
        return {
            "first": self.first,
            "steps": steps,
            "step_ms": {
                "mean": statistics.mean(self.step_ms),
                "p50": statistics.median(self.step_ms),
            },
            # replayed steps' GPU time (worker/steps.py), 0 for steps on the compute thread
            "device_ms": {"mean": device_ms, "p50": statistics.median(self.device_ms)},
            "kernel_ms": kernel_ms,
            "between_kernels_ms": device_ms - kernel_ms,
            "kernels": [
                {"kernel": name, "ms_per_step": ms, "calls_per_step": calls / steps}
                for name, ms, calls in events[:TOP_KERNELS]
            ],
        }


def device_kernels(
    profile: torch.profiler.profile, steps: int
) -> tuple[list[tuple[str, float, int]], float]:
    """A profile's kernels on the device, costliest first: (name, ms a step, calls over the
    `steps` profiled), and the ms a step that all of them take."""
    events = [e for e in profile.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events) / 1000 / steps
    return [(e.key[:90], e.device_time_total / 1000 / steps, e.count) for e in events], total

"""bench.gpu's accounting, read from a real CPU cluster: the per-stage figures it reports."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench import gpu
from meshpipe import trace
from tests.cluster import start_auto


def test_a_level_reports_each_stage_host_time_and_no_gpu_time(tiny_model: Path) -> None:
    """`measured` (one level of the GPU benchmark) against two CPU workers: every stage's mean
    wait, send and step, the token loop's feeds, and no replayed GPU time (CPU workers have no
    CUDA graphs)."""
    cluster = start_auto(tiny_model, 2)
    try:
        prompts = gpu.letter_prompts(2, 24, seed=1)
        figures = gpu.measured(cluster.url, cluster.model, prompts, 2, 12)
        assert figures["completed"] == 2 and figures["errors"] == 0
        assert set(figures["stage_host_ms"]) == set(figures["stage_step_ms"]) == {"0", "1"}
        for stage in figures["stage_host_ms"].values():
            assert set(stage) == {"wait", "send"}  # no "device": nothing was replayed
            assert stage["wait"] > 0 and stage["send"] > 0
        assert all(ms > 0 for ms in figures["stage_step_ms"].values())
        assert figures["token_loop"]["fed_steps"] > 0
        assert len(figures["steps_before"]) == 2  # where --profile-steps' window falls
    finally:
        cluster.process.stop()


def test_no_stage_figures_across_a_new_route() -> None:
    """A level during which the route was planned again (another stage count) gets none."""
    stage = {"steps": 4, "wait_seconds": 0.1, "send_seconds": 0.1, "replays": 0}
    assert gpu.host_ms([stage], [stage, stage]) == {}
    later = stage | {"steps": 8, "wait_seconds": 0.3, "replays": 4, "replay_device_seconds": 0.01}
    assert gpu.host_ms([stage | {"replay_device_seconds": 0.0}], [later]) == {
        "0": {"wait": 50.0, "send": 0.0, "device": 2.5}
    }


def test_the_token_loop_part_by_part_from_the_processes_marks(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bench.gpu --trace`: the stages write their marks when they are stopped, on one clock:
    every step's frame reaches the next stage after the step was done, and its tokens reach
    the first stage after the last one was. CPU workers arm no steps, so the parts of the loop
    that begin or end at a release are missing, not made up."""
    monkeypatch.setenv(trace.ENVIRONMENT, str(tmp_path))
    cluster = start_auto(tiny_model, 2)
    try:
        begun = time.perf_counter_ns()
        figures = gpu.measured(cluster.url, cluster.model, gpu.letter_prompts(1, 24, 1), 1, 16)
        window = [begun, time.perf_counter_ns()]
    finally:
        cluster.process.stop()
    assert figures["completed"] == 1
    marks = trace.load(tmp_path)
    assert set(marks) == {"stage0", "stage1"}
    first, last = marks["stage0"], marks["stage1"]
    steps = sorted(batch for what, batch in last if what == "done")
    assert len(steps) >= 15  # the prompt's step and a step for each later token
    for batch in steps:
        assert first[("done", batch)] < first[("sending", batch)] < last[("batch", batch)]
        assert last[("batch", batch)] < last[("done", batch)] < last[("sending", batch)]
        assert first[("sending", batch)] < first[("sent", batch)]
    for batch in steps[:-1]:  # the last step's tokens feed nothing
        assert last[("sending", batch)] < first[("feed", batch)]
    parts = gpu.loop_parts(tmp_path, window)
    assert set(parts) == {
        "stage 1: tokens to the send",
        "hop 1 -> 0: the feed",
        "stage 0: hidden states to the send",
        "hop 0 -> 1: the batch",
        "sum_p50_us",
        "of which",
    }
    assert set(parts["of which"]) == {"stage 0: its send call", "stage 1: its send call (the feed)"}
    for part in [*parts.values(), *parts["of which"].values()]:
        if isinstance(part, dict) and "steps" in part:
            assert part["steps"] >= 10 and 0 < part["p50_us"] <= part["p90_us"]

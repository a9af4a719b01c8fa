"""bench.gpu's accounting, read from a real CPU cluster: the per-stage figures it reports."""

from __future__ import annotations

from pathlib import Path

from bench import gpu
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

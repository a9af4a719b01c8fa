"""MESHPIPE_PROFILE_STEPS: a worker profiles a window of its steps and keeps serving."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import torch

from bench import gpu
from tests.cluster import start_auto
from worker.step_profile import ENVIRONMENT, StepProfile, profile_dir


def test_a_window_of_steps_is_profiled_once(tmp_path: Path) -> None:
    """Steps FIRST+1..FIRST+COUNT are in the profile, the start and the stop are announced one
    step ahead (so an armed step can be cancelled), and the summary is written whole."""
    path = tmp_path / "node.json"
    profile = StepProfile(2, 3, path, cuda=False)

    async def steps() -> list[bool]:
        turns = []
        for step in range(8):
            turns.append(profile.turns_after())
            torch.ones(4) @ torch.ones(4)  # an op on this thread, for the CPU profile
            profile.after_step(0.001 * (step + 1), 0.0)
        assert profile.task is not None
        await profile.task
        return turns

    assert asyncio.run(steps()) == [False, True, False, False, True, False, False, False]
    summary = json.loads(path.read_text())
    assert summary["first"] == 2 and summary["steps"] == 3
    assert summary["step_ms"]["p50"] == pytest.approx(4.0)  # steps 3, 4 and 5
    assert summary["device_ms"]["mean"] == 0.0
    assert summary["kernels"] == []  # no device: no kernels, whatever ran on the CPU
    assert not path.with_suffix(".partial").exists()


@pytest.mark.parametrize("value", ["5", "0,3", "4,0", "a,b"])
def test_a_bad_window_stops_the_worker(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(ENVIRONMENT, value)
    with pytest.raises(SystemExit, match=ENVIRONMENT):
        StepProfile.from_environment("node", "cpu")


def test_workers_profile_their_steps_and_keep_serving(
    tiny_model: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2-stage CPU cluster with MESHPIPE_PROFILE_STEPS: each worker writes its window's
    summary (which bench.gpu collects), and answers the requests after it as before."""
    for old in profile_dir().glob("*.json"):
        old.unlink()
    monkeypatch.setenv(ENVIRONMENT, "3,4")
    cluster = start_auto(tiny_model, 2)
    try:
        body = {"model": cluster.model, "prompt": "one two three", "max_tokens": 12}
        body["temperature"] = 0
        for _ in range(2):
            response = httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=120)
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] == 12
        profiles = gpu.step_profiles(2)
        assert len(profiles) == 2
        for summary in profiles.values():
            assert summary["first"] == 3 and summary["steps"] == 4
            assert summary["step_ms"]["p50"] > 0
    finally:
        cluster.process.stop()

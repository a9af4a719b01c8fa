"""A living mesh: real workers killed with SIGKILL in the middle of streaming generations."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.cluster import Process, free_port, meshpipe, start_auto

STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
LENGTH = 64


def request(model: str, max_tokens: int = LENGTH) -> dict:
    return {"model": model, "messages": STORY, "max_tokens": max_tokens, "temperature": 0}


def undisturbed(url: str, model: str, max_tokens: int = LENGTH) -> str:
    body = request(model, max_tokens)
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def stream_and_kill(
    url: str, model: str, pid: int, after_chunks: int = 8
) -> tuple[str, list[dict], float]:
    """Stream a generation and SIGKILL `pid` once `after_chunks` content chunks arrived;
    returns the text, every event, and when the kill happened."""
    text, events, seen, killed_at = [], [], 0, 0.0
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=request(model) | {"stream": True}, timeout=120
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            events.append(event)
            if "error" in event:
                break
            content = event["choices"][0]["delta"].get("content")
            if content:
                text.append(content)
                seen += 1
                if seen == after_chunks:
                    killed_at = time.monotonic()
                    os.kill(pid, signal.SIGKILL)
    return "".join(text), events, killed_at


def wait_until(predicate, timeout: float, interval: float = 0.05) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout}s")


def whole(mesh: ManualMesh, stages: int) -> bool:
    """Ready over `stages` stages: a worker slow to start joins after the gateway's join grace,
    and the shorter route planned without it meanwhile is ready too."""
    pipeline = mesh.status()["pipeline"]
    return pipeline["ready"] and len(pipeline["stages"]) == stages


def test_standby_takes_over_mid_stream(default_model: Path) -> None:
    cluster = start_auto(default_model, 2, "--spare", "1")
    try:
        status = cluster.status()
        assert len(status["pipeline"]["standby"]) == 1
        expected = undisturbed(cluster.url, cluster.model)
        victim = status["stages"][1]
        text, events, _ = stream_and_kill(cluster.url, cluster.model, victim["pid"])
        assert not any("error" in e for e in events)
        assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert text == expected
        after = cluster.status()
        assert victim["worker_id"] not in [s["worker_id"] for s in after["stages"]]
        assert [s["layers"] for s in after["stages"]] == [[0, 19], [19, 30]]
        assert any(
            e["event"] == "left" and e["worker"] == victim["worker_id"]
            for e in after["pipeline"]["events"]
        )
    finally:
        cluster.process.stop()


def test_kill_is_noticed_within_two_seconds(tiny_model: Path) -> None:
    cluster = start_auto(tiny_model, 2, "--spare", "1")
    try:
        victim = cluster.status()["stages"][0]
        os.kill(victim["pid"], signal.SIGKILL)

        def gone() -> bool:
            workers = cluster.status()["pipeline"]["workers"]
            return victim["worker_id"] not in [w["worker_id"] for w in workers]

        assert wait_until(gone, 5) < 2.0

        def ready() -> bool:
            return cluster.status()["pipeline"]["ready"]

        wait_until(ready, 30)
        answer = httpx.post(
            f"{cluster.url}/v1/chat/completions", json=request(cluster.model, 4), timeout=60
        )
        assert answer.status_code == 200
    finally:
        cluster.process.stop()


class ManualMesh:
    """A gateway and workers started one by one, each worker offering little memory."""

    def __init__(self, model: Path, stages: int, memory: int) -> None:
        self.port, self.mesh_port = free_port(), free_port(socket.SOCK_DGRAM)
        self.token = "mp1-test-token-for-failover"
        self.memory = memory
        self.model_dir, self.stages = model, stages
        self.env = os.environ | {"MESHPIPE_JOIN_TOKEN": self.token}
        self.start_gateway()
        self.workers: list[Process] = []
        self.url = f"http://127.0.0.1:{self.port}"

    def start_gateway(self) -> None:
        self.gateway = meshpipe(
            "gateway",
            "--model",
            str(self.model_dir),
            "--port",
            str(self.port),
            "--mesh-port",
            str(self.mesh_port),
            "--stages",
            str(self.stages),
            env=self.env,
        )
        self.gateway.wait_for("meshpipe gateway:", 60)

    def add_worker(self, name: str) -> Process:
        worker = meshpipe(
            "worker",
            "--gateway",
            f"127.0.0.1:{self.mesh_port}",
            "--join",
            self.token,
            "--id",
            name,
            "--threads",
            "1",
            "--max-memory",
            str(self.memory),
            env=self.env,
        )
        self.workers.append(worker)
        return worker

    def status(self) -> dict:
        return httpx.get(f"{self.url}/api/status", timeout=10).json()

    def model(self) -> str:
        return httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"][0]["id"]

    def stop(self) -> None:
        for process in [*self.workers, self.gateway]:
            process.stop()


# The default model needs about 2.2 GB at fp32 with its 16-slot KV cache, about 1.1 GB for each
# half: workers offering 1.5 GB each can hold it two by two, but one alone cannot.
SMALL_MEMORY = 3 << 29


@pytest.fixture()
def manual(default_model: Path):
    mesh = ManualMesh(default_model, 2, SMALL_MEMORY)
    yield mesh
    mesh.stop()


def test_no_route_left_ends_streams_then_recovers(manual: ManualMesh) -> None:
    manual.add_worker("alpha")
    manual.add_worker("beta")
    wait_until(lambda: manual.status()["pipeline"]["ready"], 120)
    model = manual.model()
    first, victim = manual.status()["stages"]
    _, events, killed_at = stream_and_kill(manual.url, model, victim["pid"])
    ended = time.monotonic()
    assert "error" in events[-1], events[-1]
    assert events[-1]["error"]["code"] == "pipeline_unavailable"
    assert ended - killed_at < 2.5
    health = httpx.get(f"{manual.url}/health", timeout=5)
    assert health.status_code == 200 and health.json()["ready"] is False
    refused = httpx.post(f"{manual.url}/v1/chat/completions", json=request(model, 4), timeout=10)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "pipeline_unavailable"
    manual.add_worker("gamma")
    wait_until(lambda: manual.status()["pipeline"]["ready"], 120)
    answer = httpx.post(f"{manual.url}/v1/chat/completions", json=request(model, 4), timeout=60)
    assert answer.status_code == 200
    assert {s["worker_id"] for s in manual.status()["stages"]} == {first["worker_id"], "gamma"}


def test_a_worker_busy_loading_is_not_dropped(manual: ManualMesh) -> None:
    """A worker whose event loop stalls while it loads (here: SIGSTOP for twice the heartbeat
    timeout) is not declared gone: it finishes, and the route is the one first planned."""
    manual.add_worker("alpha")
    manual.add_worker("beta")

    def loading() -> dict | None:
        workers = manual.status()["pipeline"]["workers"]
        return next((w for w in workers if w["layers"] and not w["ready"]), None)

    wait_until(lambda: loading() is not None, 60, interval=0.02)
    victim = loading()
    assert victim is not None, "the load ended before the test could pause it"
    os.kill(victim["pid"], signal.SIGSTOP)
    try:
        time.sleep(3.0)
    finally:
        os.kill(victim["pid"], signal.SIGCONT)
    wait_until(lambda: manual.status()["pipeline"]["ready"], 60)
    status = manual.status()
    assert [e for e in status["pipeline"]["events"] if e["event"] == "left"] == []
    assert {s["worker_id"] for s in status["stages"]} == {"alpha", "beta"}
    answer = httpx.post(
        f"{manual.url}/v1/chat/completions", json=request(manual.model(), 4), timeout=60
    )
    assert answer.status_code == 200


def test_worker_joining_mid_load_gets_work(default_model: Path) -> None:
    """Three stages wanted, two workers: the route starts with two, and a third worker joining
    while streams run gets a share of the layers; every stream still completes unchanged."""
    mesh = ManualMesh(default_model, 3, 8 << 30)
    try:
        mesh.add_worker("alpha")
        mesh.add_worker("beta")
        wait_until(lambda: whole(mesh, 2), 120)
        model = mesh.model()
        tokens = 4 * LENGTH
        expected = undisturbed(mesh.url, model, tokens)
        runs: list[tuple[float, float, str]] = []  # each stream's start, end and text

        def stream() -> None:
            start = time.monotonic()
            text = undisturbed(mesh.url, model, tokens)
            runs.append((start, time.monotonic(), text))

        # three streams at a time, replaced as they end, until the route has the third stage:
        # however long the new worker takes to load, streams run while the plan changes
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            running = [pool.submit(stream) for _ in range(3)]
            time.sleep(1.0)
            mesh.add_worker("gamma")
            deadline = time.monotonic() + 120
            while len(mesh.status()["pipeline"]["stages"]) < 3:
                assert time.monotonic() < deadline, "the third worker never took layers"
                for index, future in enumerate(running):
                    if future.done():
                        future.result()
                        running[index] = pool.submit(stream)
                time.sleep(0.05)
            replanned = time.monotonic()
            for future in running:
                future.result(timeout=180)
        assert any(start < replanned < end for start, end, _ in runs), "no stream spanned it"
        assert [text for *_, text in runs] == [expected] * len(runs)
        wait_until(lambda: whole(mesh, 3), 60)
        stages = mesh.status()["stages"]
        assert sorted(s["worker_id"] for s in stages[:2]) == ["alpha", "beta"]
        assert stages[2]["worker_id"] == "gamma"  # the newest joiner
        assert [s["layers"] for s in stages] == [[0, 13], [13, 25], [25, 30]]
        assert undisturbed(mesh.url, model, tokens) == expected
        assert mesh.status()["stages"][2]["steps"] > 0
    finally:
        mesh.stop()


def test_workers_join_a_restarted_gateway(tiny_model: Path) -> None:
    """A gateway restart costs the workers nothing: they join again and serve."""
    mesh = ManualMesh(tiny_model, 2, 8 << 30)
    try:
        mesh.add_worker("alpha")
        mesh.add_worker("beta")
        wait_until(lambda: whole(mesh, 2), 120)
        model = mesh.model()
        before = undisturbed(mesh.url, model)
        mesh.gateway.stop()
        time.sleep(1.0)
        mesh.start_gateway()
        wait_until(lambda: whole(mesh, 2), 60)
        assert {s["worker_id"] for s in mesh.status()["stages"]} == {"alpha", "beta"}
        assert all(worker.popen.poll() is None for worker in mesh.workers)
        assert undisturbed(mesh.url, model) == before
    finally:
        mesh.stop()

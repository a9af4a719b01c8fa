"""Where a benchmark runs: the cluster it starts, the machine, the source revision, the server.

Every result file records these beside its figures, since the figures belong to them.
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def started_cluster(model: str, stages: int, slots: int, timeout: float = 600) -> Iterator[str]:
    """`meshpipe auto` on free loopback ports for the length of the run; yields its URL."""
    port = free_port()
    command = [sys.executable, "-m", "meshpipe", "auto", "--model", model]
    command += ["--stages", str(stages), "--slots", str(slots)]
    command += ["--port", str(port), "--mesh-port", str(free_port(socket.SOCK_DGRAM))]
    with tempfile.NamedTemporaryFile("w+", prefix="meshpipe-bench-", suffix=".log") as log:
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            _wait_ready(process, Path(log.name), timeout)
            yield f"http://127.0.0.1:{port}"
        finally:
            _stop(process)


def _wait_ready(process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while "meshpipe is ready" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
            raise SystemExit(f"error: `meshpipe auto` did not become ready:\n{tail}")
        time.sleep(0.2)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM (auto stops its children), then SIGKILL the process group if it lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def resolve_model_dir(spec: str | None) -> Path | None:
    """The local HF-layout directory of `spec` (catalog name, directory or .gguf), if any."""
    from meshpipe.models.catalog import ModelError, resolve

    if spec is None:
        return None
    try:
        return resolve(spec, True)
    except ModelError as error:
        print(f"note: no local model for {spec!r} ({error}); prompt lengths are approximate")
        return None


def machine() -> dict[str, Any]:
    """What the figures depend on: the CPUs (shared by the client, the stages and the anchor)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line for line in lines if line.startswith("model name")]
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": names[0].split(":", 1)[1].strip() if names else platform.processor(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
    }


def source_revision() -> dict[str, Any]:
    """The commit the benchmark ran from and the files changed since (figures belong to code)."""
    root = Path(__file__).resolve().parent.parent

    def git(*arguments: str) -> str:
        found = subprocess.run(["git", *arguments], cwd=root, capture_output=True, text=True)
        return found.stdout.rstrip() if found.returncode == 0 else ""

    changed = git("status", "--porcelain", "--untracked-files=no").splitlines()
    return {"commit": git("rev-parse", "HEAD") or None, "modified": [line[3:] for line in changed]}


def server_info(url: str, model: str | None) -> dict[str, Any]:
    """The served model name (first of /v1/models unless given) and the pipeline's stages."""
    with httpx.Client(base_url=url, timeout=30) as client:
        name = model or client.get("/v1/models").json()["data"][0]["id"]
        try:
            status = client.get("/api/status").json()
            stages = [
                {key: stage.get(key) for key in ("index", "layers", "worker_id", "device", "dtype")}
                for stage in status.get("stages", [])
            ]
        except (httpx.HTTPError, ValueError):
            stages = []  # not a meshpipe gateway: the benchmark works against any OpenAI server
    return {"url": url, "model": name, "stages": stages}

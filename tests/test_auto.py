"""`meshpipe auto` as a user runs it: start, answer, stop without leaving a process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster import descendants, start_auto


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_leaves_no_child(tiny_model: Path, signum: int) -> None:
    cluster = start_auto(tiny_model, 2)
    root = cluster.process.popen.pid
    children = descendants(root)
    stage_pids = {stage["pid"] for stage in cluster.status()["stages"]}
    assert len(children) == 3 and stage_pids <= set(children)
    cluster.process.popen.send_signal(signum)
    assert cluster.process.popen.wait(30) in (0, 130, -signum)
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in children if alive(pid)]
    assert "stopping the cluster" in cluster.process.output()


def test_children_die_with_a_killed_parent(tiny_model: Path) -> None:
    cluster = start_auto(tiny_model, 2)
    children = descendants(cluster.process.popen.pid)
    os.kill(cluster.process.popen.pid, signal.SIGKILL)
    cluster.process.popen.wait(10)
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in children if alive(pid)]


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "meshpipe", *arguments], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "model",
    ["/nonexistent/model", "no-such-catalog-model", "{tmp}/empty", "{tmp}/broken.gguf"],
)
def test_bad_model_is_a_one_line_error(model: str, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + os.urandom(64))
    result = run_cli("auto", "--model", model.format(tmp=tmp_path), "--port", "1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr

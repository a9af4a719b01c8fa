"""Starting real meshpipe processes for tests: free ports, `meshpipe auto`, clean shutdown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Process:
    """A child process whose output is collected line by line."""

    popen: subprocess.Popen
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.popen.poll() is not None:
                raise RuntimeError(f"process exited ({self.popen.returncode}):\n{self.output()}")
            time.sleep(0.1)
        raise TimeoutError(f"no {text!r} within {timeout}s:\n{self.output()}")

    def stop(self, timeout: float = 20) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()


def meshpipe(*arguments: str, env: dict[str, str] | None = None) -> Process:
    """Start `python -m meshpipe ARGS` with stdout and stderr merged."""
    popen = subprocess.Popen(
        [sys.executable, "-m", "meshpipe", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=(env or os.environ) | {"PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    return Process(popen)


@dataclass
class Cluster:
    """A running `meshpipe auto`."""

    process: Process
    port: int
    model: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self) -> dict:
        return httpx.get(f"{self.url}/api/status", timeout=10).json()


def start_auto(model: Path | str, stages: int = 2, *extra: str, timeout: float = 300) -> Cluster:
    """`meshpipe auto` on free ports; tried again if another process took a port meanwhile."""
    for attempt in range(3):
        try:
            return _start_auto(model, stages, extra, timeout)
        except PortTaken:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class PortTaken(RuntimeError):
    """The free port we picked was bound by someone else before our child could bind it."""


def _start_auto(model: Path | str, stages: int, extra: tuple[str, ...], timeout: float) -> Cluster:
    port = free_port()
    verbose = ["--verbose"] if "--verbose" in extra else []
    extra = tuple(arg for arg in extra if arg != "--verbose")
    process = meshpipe(
        *verbose,
        "auto",
        "--model",
        str(model),
        "--stages",
        str(stages),
        "--port",
        str(port),
        "--mesh-port",
        str(free_port(socket.SOCK_DGRAM)),
        *extra,
    )
    try:
        process.wait_for("meshpipe is ready", timeout)
    except RuntimeError:
        if "address already in use" in process.output():
            raise PortTaken(process.output()) from None
        raise
    name = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"][0]["id"]
    return Cluster(process, port, name)


def descendants(pid: int) -> list[int]:
    """Every process whose ancestry reaches `pid` (read from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        children = [child for child, parent in parents.items() if parent == current]
        found += children
        frontier += children
    return found


def save_random_llama(path: Path, tokenizer_dir: Path, **shape: int) -> Path:
    """A random 4-layer GQA Llama saved by transformers, with large weights (confident,
    well-separated logits) and the tokenizer files of `tokenizer_dir`."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        **shape,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, path / name)
    return path

"""`meshpipe auto`: a whole cluster on this machine, the gateway and N workers as child processes.

Children get SIGTERM if this process dies (PR_SET_PDEATHSIG), and on Ctrl-C or SIGTERM every
child is stopped and reaped, so no process outlives the cluster.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

from meshpipe import busy_poll
from meshpipe.identity import new_join_token
from meshpipe.models.catalog import resolve

PR_SET_PDEATHSIG = 1
STOP_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class AutoSettings:
    models: tuple[str, ...]
    stages: int = 2
    spare: int = 0
    max_waiting: int = 64
    max_batch_tokens: int = 256
    max_in_flight: int = 0
    token_loop: bool = True
    port: int = 9337
    mesh_port: int = 9338
    slots: int = 16
    max_seq_len: int = 2048
    device: str = "cpu"
    dtype: str = "float32"
    ready_timeout: float = 600.0
    verbose: bool = False
    # Start a relay too, and make one worker take relayed connections only.
    relay: bool = False
    relay_port: int = 9339
    block_weights: bool = True
    native_kernels: bool = True
    busy_poll_ms: float = busy_poll.CPU_WINDOW_MS  # every process (meshpipe/busy_poll.py)


class ClusterFailed(Exception):
    """A child process died, or the pipeline never answered."""


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(arguments: list[str], env: dict[str, str], verbose: bool) -> subprocess.Popen:
    command = [sys.executable, "-m", "meshpipe", *(["-v"] if verbose else []), *arguments]
    return subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)


class Cluster:
    """The child processes of one local cluster."""

    def __init__(self, settings: AutoSettings) -> None:
        self.settings = settings
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.url = f"http://127.0.0.1:{settings.port}"

    def start(self) -> None:
        s = self.settings
        env = os.environ | {"MESHPIPE_JOIN_TOKEN": new_join_token(), "PYTHONUNBUFFERED": "1"}
        gateway = ["gateway", *(arg for model in s.models for arg in ("--model", model))]
        gateway += [
            "--port",
            str(s.port),
            "--mesh-port",
            str(s.mesh_port),
            "--stages",
            str(s.stages),
            "--slots",
            str(s.slots),
            "--max-seq-len",
            str(s.max_seq_len),
            "--max-waiting",
            str(s.max_waiting),
            "--max-batch-tokens",
            str(s.max_batch_tokens),
            "--max-in-flight",
            str(s.max_in_flight),
            "--token-loop" if s.token_loop else "--no-token-loop",
            f"--busy-poll-ms={s.busy_poll_ms:g}",
        ]
        relay = f"127.0.0.1:{s.relay_port}"
        if s.relay:
            gateway += ["--relay", relay]
        self.children.append(("gateway", _spawn(gateway, env, s.verbose)))
        if s.relay:
            command = ["relay", "--host", "127.0.0.1", "--port", str(s.relay_port)]
            command += ["--status", relay]  # TCP, the same port number
            command += [f"--busy-poll-ms={s.busy_poll_ms:g}"]
            self.children.append(("relay", _spawn(command, env, s.verbose)))
        count = s.stages * len(s.models) + s.spare
        threads = max(1, (os.cpu_count() or 1) // count) if s.device == "cpu" else 0
        for index in range(count):
            worker = [
                "worker",
                "--gateway",
                f"127.0.0.1:{s.mesh_port}",
                "--device",
                s.device,
                "--dtype",
                s.dtype,
                "--threads",
                str(threads),
                "--id",
                f"worker-{index}",
                f"--busy-poll-ms={s.busy_poll_ms:g}",
            ]
            worker += [] if s.block_weights else ["--no-block-weights"]
            worker += [] if s.native_kernels else ["--no-native-kernels"]
            if s.relay:
                worker += ["--relay", relay]
                worker += ["--relay-only"] if index == s.stages - 1 else []
            self.children.append((f"worker-{index}", _spawn(worker, env, s.verbose)))

    def check_alive(self) -> None:
        for name, child in self.children:
            if child.poll() is not None:
                raise ClusterFailed(f"{name} exited with status {child.returncode}")

    def check_gateway(self) -> None:
        """Workers may come and go (the gateway re-plans); the gateway may not."""
        name, gateway = self.children[0]
        if gateway.poll() is not None:
            raise ClusterFailed(f"{name} exited with status {gateway.returncode}")

    def wait_ready(self) -> dict:
        """Poll until every model answers a real one-token completion; returns /api/status."""
        deadline = time.monotonic() + self.settings.ready_timeout
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while time.monotonic() < deadline:
                self.check_alive()
                try:
                    if client.get("/health").json().get("ready") and self._all_answer(client):
                        return client.get("/api/status").json()
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)
        raise ClusterFailed(f"the pipeline did not answer within {self.settings.ready_timeout}s")

    @staticmethod
    def _all_answer(client: httpx.Client) -> bool:
        names = [model["id"] for model in client.get("/v1/models").json()["data"]]
        hello = [{"role": "user", "content": "hi"}]
        return all(
            client.post(
                "/v1/chat/completions", json={"model": name, "max_tokens": 1, "messages": hello}
            ).status_code
            == 200
            for name in names
        )

    def stop(self) -> None:
        """SIGTERM every child, then SIGKILL what is still there after a grace period."""
        for _, child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for _, child in self.children:
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _print_ready(url: str, status: dict, seconds: float) -> None:
    print(f"\nmeshpipe is ready after {seconds:.1f}s: {url}/v1")
    for model in status["models"]:
        print(f"  model {model['name']!r}:")
        for stage in model["pipeline"]["stages"]:
            start, end = stage["layers"]
            via = f", reached via relay {stage['relay']}" if stage.get("link") == "relayed" else ""
            print(
                f"    stage {stage['index']}: layers [{start}, {end}) on {stage['worker_id']} "
                f"(pid {stage['pid']}, {stage['device']}, {stage['dtype']}, {stage['address']}{via})"
            )
        for standby in model["pipeline"]["standby"]:
            print(f"    standby: {standby}")
    print(f"  console: {url}/   metrics: {url}/metrics   Ctrl-C stops the cluster\n", flush=True)


def run(settings: AutoSettings) -> None:
    started = time.monotonic()
    for model in settings.models:
        resolve(model, True)  # pull or convert once, here, with a progress bar
    cluster = Cluster(settings)

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        cluster.start()
        _print_ready(cluster.url, cluster.wait_ready(), time.monotonic() - started)
        while True:
            cluster.check_gateway()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping the cluster", flush=True)
    except ClusterFailed as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cluster.stop()

"""The operator's CLI against a running cluster: status, ledger, chat (through a pty), doctor."""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pexpect
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshpipe.identity import new_join_token
from tests.cluster import Cluster, free_port, meshpipe, start_auto
from worker import cpu_kernels

DEFAULT_MODEL = "smollm2-135m-instruct"
# Wide enough that rich never wraps a cell, so the assertions can look for whole phrases.
WIDE = {"COLUMNS": "250"}


@pytest.fixture(scope="module")
def tiny_cluster(tiny_model: Path) -> Iterator[Cluster]:
    cluster = start_auto(tiny_model, 2)
    yield cluster
    cluster.process.stop()


def mesh_port(cluster: Cluster) -> int:
    found = re.search(r"mesh on udp [\d.]+:(\d+)", cluster.process.output())
    assert found, cluster.process.output()
    return int(found.group(1))


def run_cli(*arguments: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "meshpipe", *arguments],
        capture_output=True,
        text=True,
        timeout=180,
        env=os.environ | WIDE | (env or {}),
    )


def ask(cluster: Cluster, messages: list[dict[str, str]], max_tokens: int) -> dict:
    body = {"model": cluster.model, "messages": messages, "max_tokens": max_tokens}
    response = httpx.post(
        f"{cluster.url}/v1/chat/completions", json=body | {"temperature": 0}, timeout=60
    )
    assert response.status_code == 200, response.text
    return response.json()


# -- status and ledger ---------------------------------------------------------------------------


def test_status_shows_the_pipeline(tiny_cluster: Cluster) -> None:
    # Link latencies come from pings a few times a second: wait for the first stage's first
    # measurement of its link to the next, as a user would see once the pipeline has run a moment.
    deadline = time.monotonic() + 10
    while tiny_cluster.status()["stages"][0].get("next_rtt") is None:
        assert time.monotonic() < deadline, "the first stage never timed its next hop"
        time.sleep(0.1)
    result = run_cli("status", "--url", tiny_cluster.url)
    assert result.returncode == 0, result.stderr
    rows = {line.split("│")[2].strip(): line for line in result.stdout.splitlines() if "│" in line}
    stages = tiny_cluster.status()["stages"]
    assert len(rows) == 2 and f"{tiny_cluster.model}: ready" in result.stdout
    for stage in stages:
        row = rows[stage["worker_id"]]
        start, end = stage["layers"]
        for cell in (f"[{start}, {end})", "cpu float32", "GiB", "s ago", "direct"):
            assert cell in row, row
    # The gateway times its link to every stage, and the first stage its link to the next.
    first = rows[stages[0]["worker_id"]]
    assert len(re.findall(r"\d+\.\d+ ms", first)) == 2, first

    as_json = json.loads(run_cli("status", "--url", tiny_cluster.url, "--json").stdout)
    assert [stage["worker_id"] for stage in as_json["stages"]] == [s["worker_id"] for s in stages]
    assert "join_token" not in as_json


def test_status_without_a_gateway_is_a_one_line_error() -> None:
    result = run_cli("status", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no gateway answers at"), result.stderr


def test_ledger_lists_workers_and_requests(tiny_cluster: Cluster) -> None:
    answer = ask(tiny_cluster, [{"role": "user", "content": "for the ledger"}], 4)
    result = run_cli("ledger", "--url", tiny_cluster.url, "--limit", "5")
    assert result.returncode == 0, result.stderr
    assert "contributions per worker" in result.stdout and answer["id"] in result.stdout
    for stage in tiny_cluster.status()["stages"]:
        start, end = stage["layers"]
        assert f"{stage['worker_id']} [{start}, {end})" in result.stdout
    as_json = json.loads(run_cli("ledger", "--url", tiny_cluster.url, "--json").stdout)
    assert as_json["recent"][0]["request_id"] == answer["id"]
    # The ledger lives in the data dir, which every cluster of this test session shares.
    assert {"worker-0", "worker-1"} <= {w["worker_id"] for w in as_json["workers"]}


# -- chat ----------------------------------------------------------------------------------------


def test_chat_streams_and_keeps_the_history(tiny_cluster: Cluster) -> None:
    chat = pexpect.spawn(
        sys.executable,
        ["-m", "meshpipe", "chat", "--url", tiny_cluster.url, "--temperature", "0"]
        + ["--max-tokens", "5"],
        encoding="utf-8",
        timeout=60,
        env=os.environ | {"NO_COLOR": "1"},
    )
    chat.expect("you> ")
    chat.sendline("Hello there")
    chat.expect("you> ")
    first = chat.before
    chat.sendline("Tell me more")
    chat.expect("you> ")
    chat.sendline("/quit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0

    recent = httpx.get(f"{tiny_cluster.url}/api/ledger", timeout=10).json()["recent"]
    second_turn, first_turn = recent[0], recent[1]
    # The second turn sent the first question and answer along with the new question.
    assert (
        second_turn["prompt_tokens"] > first_turn["prompt_tokens"] + first_turn["generated_tokens"]
    )
    # What the terminal showed is the model's (greedy) answer to the first question.
    expected = ask(tiny_cluster, [{"role": "user", "content": "Hello there"}], 5)
    shown = first.replace("\r\n", "\n").split("\n", 1)[1].rstrip("\n")
    assert shown == expected["choices"][0]["message"]["content"]


# -- doctor --------------------------------------------------------------------------------------


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def home_with_model(default_model: Path, home: Path) -> Path:
    """A fresh MESHPIPE_HOME holding the default model (hard links: no 500 MB copy)."""
    target = home / "cache" / "models" / DEFAULT_MODEL
    shutil.copytree(default_model, target, copy_function=_link_or_copy)
    return target


def rewrite(path: Path, data: bytes) -> None:
    """Replace a file (not write through it: it may be a hard link to the real cache)."""
    path.unlink()
    path.write_bytes(data)


def findings(output: str) -> dict[str, tuple[str, str]]:
    """check -> (result, detail) from doctor's table."""
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) == 3 and cells[1] in ("ok", "warn", "FAIL"):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def doctor(
    cluster_url: str, mesh: int, home: Path, relay_port: int = 0, *extra: str
) -> subprocess.CompletedProcess:
    relay_port = relay_port or free_port(socket.SOCK_DGRAM)
    return run_cli(
        "doctor",
        "--url",
        cluster_url,
        "--mesh-port",
        str(mesh),
        "--relay-port",
        str(relay_port),
        *extra,
        env={"MESHPIPE_HOME": str(home)},
    )


def test_doctor_passes_against_a_running_cluster(
    tiny_cluster: Cluster, default_model: Path, tmp_path: Path
) -> None:
    home_with_model(default_model, tmp_path / "home")
    result = doctor(tiny_cluster.url, mesh_port(tiny_cluster), tmp_path / "home")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = findings(result.stdout)
    checks = ("python", "torch", "device cpu", f"model {DEFAULT_MODEL}", "gateway")
    for check in checks:
        assert rows[check][0] == "ok", rows
    # the C kernels need AVX-512: a machine without it gets the warning, and torch's kernels
    assert rows["cpu kernels"][0] == ("ok" if cpu_kernels.load() is not None else "warn"), rows
    assert rows[f"model {DEFAULT_MODEL}"][1].endswith("checksums match")
    assert "ready" in rows["gateway"][1]
    for port in (f"{tiny_cluster.port}/tcp", f"{mesh_port(tiny_cluster)}/udp"):
        status, detail = rows[f"port {port}"]
        assert status == "ok" and "held by meshpipe (pid" in detail and "meshpipe gateway" in detail
    assert "QUIC handshake done" in rows["mesh endpoint"][1]
    assert rows["relay"][0] == "warn"  # no relay here, and none was asked for


def test_doctor_reaches_a_relay(tiny_cluster: Cluster, tmp_path: Path) -> None:
    port = free_port(socket.SOCK_DGRAM)
    relay = meshpipe(
        *("relay", "--host", "127.0.0.1", "--port", str(port), "--no-status"),
        *("--token", new_join_token()),
    )
    try:
        relay.wait_for("meshpipe relay: udp", 30)
        result = doctor(
            tiny_cluster.url,
            mesh_port(tiny_cluster),
            tmp_path / "home",
            port,
            *("--relay", f"127.0.0.1:{port}"),
        )
    finally:
        relay.stop()
    rows = findings(result.stdout)
    assert rows["relay"] == ("ok", f"udp 127.0.0.1:{port}: the relay answered (CHALLENGE)")
    assert "meshpipe relay" in rows[f"port {port}/udp"][1]
    silent = doctor(
        tiny_cluster.url,
        mesh_port(tiny_cluster),
        tmp_path / "home",
        port,
        *("--relay", f"127.0.0.1:{port}"),
    )
    assert silent.returncode == 1 and findings(silent.stdout)["relay"][0] == "FAIL"


@pytest.mark.parametrize("damage", ["altered", "resized", "unfinished"])
def test_doctor_reports_a_broken_model_cache(
    tiny_cluster: Cluster, default_model: Path, tmp_path: Path, damage: str
) -> None:
    model = home_with_model(default_model, tmp_path / "home")
    config = (model / "config.json").read_bytes()
    if damage == "altered":  # same size, one byte changed
        rewrite(model / "config.json", config.replace(b"{", b" ", 1))
    elif damage == "resized":
        rewrite(model / "config.json", config + b"\n")
    else:  # the manifest is written last: without it the conversion never finished
        (model / ".meshpipe-manifest.json").unlink()
    result = doctor(tiny_cluster.url, mesh_port(tiny_cluster), tmp_path / "home")
    assert result.returncode == 1, result.stdout
    status, detail = findings(result.stdout)[f"model {DEFAULT_MODEL}"]
    assert status == "FAIL"
    assert {
        "altered": "config.json sha256 differs from the manifest",
        "resized": f"config.json has size {len(config) + 1}, expected {len(config)}",
        "unfinished": "never completed",
    }[damage] in detail
    fix = f"meshpipe models rm {DEFAULT_MODEL} && meshpipe models pull {DEFAULT_MODEL}"
    assert fix in result.stdout
    assert findings(result.stdout)["gateway"][0] == "ok"  # only the cache is wrong


def write_certificate(directory: Path, name: str, days: tuple[int, int]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=days[0]))
        .not_valid_after(now + datetime.timedelta(days=days[1]))
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path = directory / f"{name}.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)


def test_doctor_without_a_gateway_and_with_an_expired_certificate(tmp_path: Path) -> None:
    home = tmp_path / "home"
    nodes = home / "config" / "nodes"
    write_certificate(nodes, "old", (-400, -10))
    write_certificate(nodes, "fine", (-1, 3650))
    (nodes / "fine.key").chmod(0o644)
    port = free_port()
    result = doctor(f"http://127.0.0.1:{port}", free_port(socket.SOCK_DGRAM), home)
    assert result.returncode == 1, result.stdout
    rows = findings(result.stdout)
    assert rows["gateway"][0] == "FAIL" and "no gateway answers" in rows["gateway"][1]
    assert rows["mesh endpoint"][0] == "FAIL"
    assert rows["models"][0] == "warn"
    assert rows["certificate old"][0] == "FAIL" and "expired on" in rows["certificate old"][1]
    assert rows["certificate fine"] == ("FAIL", "fine.key is readable by others")
    assert f"chmod 600 {nodes / 'fine.key'}" in result.stdout
    assert rows[f"port {port}/tcp"][0] == "ok"
    assert "start it with `meshpipe auto`" in result.stdout

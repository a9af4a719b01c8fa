"""The contribution ledger: durable records of who served what, across restarts and crashes."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from gateway.ledger import LEDGER_FILE, Contribution, LedgerStore, RequestRecord
from tests.cluster import Cluster, start_auto


def record(index: int) -> RequestRecord:
    return RequestRecord(
        request_id=f"chatcmpl-{index}",
        model="tiny",
        finish_reason="stop" if index % 2 else "length",
        prompt_tokens=10 + index,
        generated_tokens=5,
        created=1000.0 + index,
        first_token_at=1000.5 + index,
        finished=1001.0 + index,
        contributions=(
            Contribution("worker-a", 0, 2, 14 + index),
            Contribution("worker-b", 2, 4, 14 + index),
        ),
    )


def test_store_totals_and_recent(tmp_path: Path) -> None:
    store = LedgerStore(tmp_path / LEDGER_FILE)
    for index in range(3):
        store.write(record(index))
    assert store.totals() == {
        "requests": 3,
        "prompt_tokens": 33,
        "generated_tokens": 15,
        "since": 1000.0,
    }
    workers = {worker["worker_id"]: worker for worker in store.workers()}
    assert workers["worker-a"]["tokens"] == 14 + 15 + 16
    assert workers["worker-b"]["layer_tokens"] == 2 * (14 + 15 + 16)
    assert workers["worker-a"]["layers"] == [[0, 2]] and workers["worker-a"]["requests"] == 3
    recent = store.recent(2)
    assert [r["request_id"] for r in recent] == ["chatcmpl-2", "chatcmpl-1"]
    assert recent[0]["workers"] == [
        {"worker_id": "worker-a", "layers": [0, 2], "tokens": 16},
        {"worker_id": "worker-b", "layers": [2, 4], "tokens": 16},
    ]
    store.close()
    reopened = LedgerStore(tmp_path / LEDGER_FILE)
    assert reopened.totals()["requests"] == 3
    reopened.close()


WRITER = textwrap.dedent(
    """
    import sys
    from gateway.ledger import LedgerStore
    from tests.gateway.test_ledger import record

    store = LedgerStore(__import__("pathlib").Path(sys.argv[1]))
    index = 0
    while True:
        store.write(record(index))
        print(index, flush=True)
        index += 1
    """
)


def test_a_crash_mid_write_loses_no_committed_record(tmp_path: Path) -> None:
    """SIGKILL a process writing records as fast as it can: every record it reported as
    written is there afterwards, and the database is intact."""
    path = tmp_path / LEDGER_FILE
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert writer.stdout is not None
    written = [int(writer.stdout.readline()) for _ in range(200)]
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    written += [int(line) for line in writer.stdout.read().split()]
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    connection.close()
    store = LedgerStore(path)
    ids = {r["request_id"] for r in store.recent(1_000_000)}
    assert {f"chatcmpl-{index}" for index in written} <= ids
    # A record is whole or absent: never a request without its contributions.
    orphans = store.connection.execute(
        "SELECT count(*) FROM requests r WHERE"
        " (SELECT count(*) FROM contributions c WHERE c.request = r.id) != 2"
    ).fetchone()[0]
    assert orphans == 0
    store.close()


def ask(cluster: Cluster, content: str, max_tokens: int) -> dict:
    body = {
        "model": cluster.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    response = httpx.post(f"{cluster.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def ledger(cluster: Cluster, limit: int = 20) -> dict:
    response = httpx.get(f"{cluster.url}/api/ledger", params={"limit": limit}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def test_ledger_survives_a_gateway_restart(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHPIPE_HOME", str(tmp_path / "home"))
    cluster = start_auto(tiny_model, 2)
    try:
        # `meshpipe auto` asks each model for one token before it says it is ready.
        before = ledger(cluster)["totals"]["requests"]
        answers = [ask(cluster, f"count to {n}", 3 + n) for n in range(3)]
        summary = ledger(cluster)
        stages = cluster.status()["stages"]
    finally:
        cluster.process.stop()
    assert summary["totals"]["requests"] == before + 3
    by_id = {r["request_id"]: r for r in summary["recent"]}
    for answer in answers:
        entry = by_id[answer["id"]]
        usage = answer["usage"]
        assert entry["model"] == cluster.model
        assert entry["finish_reason"] == answer["choices"][0]["finish_reason"]
        assert entry["prompt_tokens"] == usage["prompt_tokens"]
        assert entry["generated_tokens"] == usage["completion_tokens"]
        assert entry["created"] <= entry["first_token_at"] <= entry["finished"]
        # Every stage ran the prompt and each generated token but the last (never fed back).
        fed = usage["prompt_tokens"] + usage["completion_tokens"] - 1
        assert entry["workers"] == [
            {"worker_id": stage["worker_id"], "layers": stage["layers"], "tokens": fed}
            for stage in stages
        ]
    assert [stage["layers"] for stage in stages] == [[0, 3], [3, 4]]
    workers = {w["worker_id"]: w for w in summary["workers"]}
    assert sorted(workers) == ["worker-0", "worker-1"]
    assert all(worker["requests"] == before + 3 for worker in workers.values())
    assert workers["worker-0"]["tokens"] == workers["worker-1"]["tokens"]

    restarted = start_auto(tiny_model, 2)
    try:
        again = ledger(restarted, limit=100)
        assert {r["request_id"] for r in summary["recent"]} <= {
            r["request_id"] for r in again["recent"]
        }
        assert (
            again["totals"]["requests"] == summary["totals"]["requests"] + 1
        )  # its readiness check
        ask(restarted, "and once more", 2)
        assert ledger(restarted)["totals"]["requests"] == summary["totals"]["requests"] + 2
        assert ledger(restarted, limit=0)["recent"] == []
        bad = httpx.get(f"{restarted.url}/api/ledger", params={"limit": "-1"}, timeout=10)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"
    finally:
        restarted.process.stop()

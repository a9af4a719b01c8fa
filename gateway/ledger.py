"""The contribution ledger: which workers served which layers of every finished request.

While a request runs, every micro-batch sent into the pipeline credits each stage of the route
it went to with the request's tokens in it (a failover replay is credited to the workers that
really recomputed it). When the request retires, its record (model, finish reason, token counts,
timestamps, and per worker its layers and tokens) is written to SQLite in one transaction.

The database lives in the data dir, in WAL mode with `synchronous=FULL`: a committed record
survives a crash of the gateway (or of the machine), and a crash in the middle of a write loses
only that one uncommitted record, never an earlier one. Writes run on one thread of their own,
so the event loop never waits for the disk; reads go through the same thread, so a request that
finished before a read is always in it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import sqlite3
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.engine import Engine, Sequence
from gateway.mesh import Mesh, WorkerInfo
from meshpipe.wire import Frame

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.sqlite3"
SCHEMA_VERSION = 1
MAX_RECENT = 1000
SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    model TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    generated_tokens INTEGER NOT NULL,
    created REAL NOT NULL,
    first_token_at REAL,
    finished REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS contributions (
    request INTEGER NOT NULL REFERENCES requests(id),
    worker_id TEXT NOT NULL,
    layer_start INTEGER NOT NULL,
    layer_end INTEGER NOT NULL,
    tokens INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS contributions_by_request ON contributions(request);
CREATE INDEX IF NOT EXISTS contributions_by_worker ON contributions(worker_id);
"""


@dataclass(frozen=True)
class Contribution:
    """What one worker did for one request."""

    worker_id: str
    layer_start: int
    layer_end: int
    tokens: int
    """Tokens of the request this worker ran through its layers (replays included)."""


@dataclass(frozen=True)
class RequestRecord:
    """One finished request, as the ledger keeps it. Times are Unix seconds."""

    request_id: str
    model: str
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    created: float
    first_token_at: float | None
    finished: float
    contributions: tuple[Contribution, ...]


class LedgerStore:
    """The SQLite side: one connection, used from one thread at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.connection.row_factory = sqlite3.Row
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA synchronous=FULL")
        self.connection.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self) -> None:
        version = self.connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} has schema {version}, newer than this meshpipe")
        self.connection.executescript(SCHEMA)
        self.connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def write(self, record: RequestRecord) -> None:
        """The request and its contributions, in one transaction."""
        with self._transaction() as cursor:
            cursor.execute(
                "INSERT INTO requests (request_id, model, finish_reason, prompt_tokens,"
                " generated_tokens, created, first_token_at, finished)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.request_id,
                    record.model,
                    record.finish_reason,
                    record.prompt_tokens,
                    record.generated_tokens,
                    record.created,
                    record.first_token_at,
                    record.finished,
                ),
            )
            row = cursor.lastrowid
            cursor.executemany(
                "INSERT INTO contributions VALUES (?, ?, ?, ?, ?)",
                [
                    (row, c.worker_id, c.layer_start, c.layer_end, c.tokens)
                    for c in record.contributions
                ],
            )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK when the body raises."""
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield self.connection.cursor()
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")

    def totals(self) -> dict[str, Any]:
        """Requests and tokens over the whole ledger."""
        row = self.connection.execute(
            "SELECT count(*) AS requests, coalesce(sum(prompt_tokens), 0) AS prompt_tokens,"
            " coalesce(sum(generated_tokens), 0) AS generated_tokens,"
            " min(created) AS since FROM requests"
        ).fetchone()
        return dict(row)

    def workers(self) -> list[dict[str, Any]]:
        """Per worker: requests served, tokens, layer-tokens (the work), layers, when."""
        rows = self.connection.execute(
            "SELECT c.worker_id, count(DISTINCT c.request) AS requests,"
            " sum(c.tokens) AS tokens,"
            " sum(c.tokens * (c.layer_end - c.layer_start)) AS layer_tokens,"
            " group_concat(DISTINCT r.model) AS models,"
            " group_concat(DISTINCT c.layer_start || '-' || c.layer_end) AS layers,"
            " min(r.created) AS first_seen, max(r.finished) AS last_seen"
            " FROM contributions c JOIN requests r ON r.id = c.request"
            " GROUP BY c.worker_id ORDER BY layer_tokens DESC, c.worker_id"
        ).fetchall()
        return [_worker_totals(row) for row in rows]

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The last `limit` finished requests, newest first, with their contributions."""
        rows = self.connection.execute(
            "SELECT * FROM requests ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        by_request: dict[int, list[dict[str, Any]]] = defaultdict(list)
        if rows:
            marks = ",".join("?" * len(rows))
            for c in self.connection.execute(
                f"SELECT * FROM contributions WHERE request IN ({marks}) ORDER BY rowid",
                [row["id"] for row in rows],
            ):
                by_request[c["request"]].append(
                    {
                        "worker_id": c["worker_id"],
                        "layers": [c["layer_start"], c["layer_end"]],
                        "tokens": c["tokens"],
                    }
                )
        return [
            {key: row[key] for key in row.keys() if key != "id"}
            | {"workers": by_request[row["id"]]}
            for row in rows
        ]

    def close(self) -> None:
        self.connection.close()


def _worker_totals(row: sqlite3.Row) -> dict[str, Any]:
    layers = sorted(
        (tuple(int(n) for n in span.split("-")) for span in (row["layers"] or "").split(",")),
    )
    return {
        "worker_id": row["worker_id"],
        "requests": row["requests"],
        "tokens": row["tokens"],
        "layer_tokens": row["layer_tokens"],
        "models": sorted((row["models"] or "").split(",")),
        "layers": [list(span) for span in layers],
        "first_seen": row["first_seen"],
        "last_seen": row["last_seen"],
    }


Tally = dict[tuple[str, int, int], int]


class Ledger:
    """The gateway's side: tallies work per running request, writes records off the loop."""

    def __init__(self, store: LedgerStore) -> None:
        self.store = store
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ledger")
        self.tallies: dict[str, Tally] = {}
        self.closed = False

    @classmethod
    def open(cls, directory: Path) -> Ledger:
        return cls(LedgerStore(directory / LEDGER_FILE))

    def attach(self, model: str, engine: Engine, mesh: Mesh) -> None:
        """Record every request `engine` retires, crediting the stages of `mesh`."""
        mesh.on_batch = self.on_batch
        engine.on_finished = lambda sequence: self.on_finished(model, sequence)

    def on_batch(self, route: list[WorkerInfo], frame: Frame) -> None:
        """Credit every stage of `route` with the tokens of each request in the batch."""
        requests = frame.meta.get("requests", {})
        for slot, _start, length in frame.meta.get("spans", []):
            request_id = requests.get(str(slot))
            if request_id is None:
                continue
            tally = self.tallies.setdefault(request_id, {})
            for worker in route:
                if worker.layers is not None:
                    key = (worker.node_id, worker.layers[0], worker.layers[1])
                    tally[key] = tally.get(key, 0) + length

    def on_finished(self, model: str, sequence: Sequence) -> None:
        """The engine retired a sequence: queue its record for the writer thread."""
        record = self._record(model, sequence)
        if self.closed:
            log.warning("ledger closed; request %s not recorded", sequence.request_id)
            return
        future = self.executor.submit(self.store.write, record)
        future.add_done_callback(_log_failure)

    def _record(self, model: str, sequence: Sequence) -> RequestRecord:
        # The engine keeps monotonic times; the ledger keeps wall-clock ones.
        offset = time.time() - time.monotonic()
        tally = self.tallies.pop(sequence.request_id, {})
        first = sequence.first_token_at
        return RequestRecord(
            request_id=sequence.request_id,
            model=model,
            finish_reason="cancelled" if sequence.cancelled else sequence.finish_reason or "error",
            prompt_tokens=len(sequence.prompt),
            generated_tokens=len(sequence.generated),
            created=sequence.created + offset,
            first_token_at=None if first is None else first + offset,
            finished=time.time(),
            contributions=tuple(
                Contribution(worker, start, end, tokens)
                for (worker, start, end), tokens in tally.items()
            ),
        )

    async def summary(self, limit: int = 20) -> dict[str, Any]:
        """Totals, per-worker totals and the last `limit` requests (for `GET /api/ledger`)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._summary, limit)

    def _summary(self, limit: int) -> dict[str, Any]:
        return {
            "totals": self.store.totals(),
            "workers": self.store.workers(),
            "recent": self.store.recent(max(0, min(limit, MAX_RECENT))),
        }

    def close(self) -> None:
        """Write what is queued, then close the database."""
        self.closed = True
        self.executor.shutdown(wait=True)
        self.store.close()


def _log_failure(future: concurrent.futures.Future) -> None:
    error = future.exception()
    if error is not None:
        log.error("could not write a ledger record: %s", error)

"""`meshpipe status` and `meshpipe ledger`: a running gateway's pipeline and ledger as tables."""

from __future__ import annotations

import datetime
import os
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

DASH = "-"
PIPE_WIDTH = 160


def _milliseconds(seconds: float | None) -> str:
    return DASH if seconds is None else f"{seconds * 1e3:.2f} ms"


def _gibibytes(size: int | None) -> str:
    return DASH if not size else f"{size / 2**30:.1f} GiB"


def _age(seconds: float | None) -> str:
    return DASH if seconds is None else f"{seconds:.1f} s ago"


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return DASH
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _layers(layers: list[int] | None) -> str:
    return DASH if not layers else f"[{layers[0]}, {layers[1]})"


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


# -- status ------------------------------------------------------------------------------------


def served_models(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Every served model with its pipeline and engine (older gateways report only one)."""
    if status.get("models"):
        return status["models"]
    return [{"name": status.get("model", "?"), "pipeline": status["pipeline"], **status}]


def pipeline_table(model: dict[str, Any]) -> Table:
    """One model's stages, then its standbys."""
    pipeline, engine = model["pipeline"], model.get("engine", {})
    state = "ready" if pipeline.get("ready") else "NOT READY"
    title = (
        f"{model['name']}: {state}, plan {pipeline.get('plan_id', 0)}, "
        f"{pipeline.get('num_layers', '?')} layers; slots {engine.get('slots_used', 0)}/"
        f"{engine.get('slots', 0)} used, {engine.get('waiting', 0)} waiting"
    )
    table = Table(title=title, title_justify="left")
    for column in ("stage", "worker", "layers", "device", "memory", "rtt"):
        table.add_column(column, no_wrap=True)
    for column in ("next hop", "heartbeat", "link", "slots", "steps"):
        table.add_column(column, no_wrap=True)
    for stage in pipeline.get("stages", []):
        table.add_row(str(stage["index"]), *_worker_cells(stage))
    in_route = {stage["worker_id"] for stage in pipeline.get("stages", [])}
    for worker in pipeline.get("workers", []):
        if worker["worker_id"] not in in_route:
            table.add_row("standby", *_worker_cells(worker), style="dim")
    if not pipeline.get("workers"):
        table.add_row(DASH, "no worker has joined", *[""] * 9)
    return table


def _worker_cells(worker: dict[str, Any]) -> list[str]:
    return [
        worker["worker_id"],
        _layers(worker.get("layers")),
        f"{worker.get('device', '?')} {worker.get('dtype', '')}".strip(),
        _gibibytes(worker.get("memory")),
        _milliseconds(worker.get("rtt")),
        _milliseconds(worker.get("next_rtt")),
        _age(worker.get("last_seen")),
        _link(worker),
        str(worker.get("active_slots", 0)),
        str(worker.get("steps", 0)),
    ]


def _link(worker: dict[str, Any]) -> str:
    """How the stage's incoming link is carried, and through which relay."""
    link = worker.get("link", "direct")
    return f"{link} via {worker['relay']}" if link == "relayed" and worker.get("relay") else link


def render_status(status: dict[str, Any]) -> Group:
    """Every served model's pipeline; rtt is gateway <-> worker, next hop worker -> next."""
    parts: list[Any] = [Text(f"gateway up {_duration(status.get('uptime', 0))}")]
    parts += [pipeline_table(model) for model in served_models(status)]
    return Group(*parts)


# -- ledger ------------------------------------------------------------------------------------


def workers_table(workers: list[dict[str, Any]]) -> Table:
    """Totals per worker; the share is of layer-tokens (tokens times layers: the work done)."""
    total = sum(worker["layer_tokens"] for worker in workers) or 1
    table = Table(title="contributions per worker", title_justify="left")
    for column in ("worker", "requests", "tokens", "layer-tokens", "share", "layers"):
        table.add_column(column, no_wrap=True)
    table.add_column("models")
    table.add_column("last served", no_wrap=True)
    for worker in workers:
        table.add_row(
            worker["worker_id"],
            str(worker["requests"]),
            str(worker["tokens"]),
            str(worker["layer_tokens"]),
            f"{100 * worker['layer_tokens'] / total:.1f}%",
            ", ".join(_layers(span) for span in worker["layers"]),
            ", ".join(worker["models"]),
            _when(worker["last_seen"]),
        )
    return table


def recent_table(recent: list[dict[str, Any]]) -> Table:
    """The latest requests, newest first."""
    table = Table(title="recent requests", title_justify="left")
    for column in ("finished", "request", "model", "finish", "prompt", "generated", "ttft"):
        table.add_column(column, no_wrap=True)
    table.add_column("workers (layers: tokens)")
    for record in recent:
        first = record["first_token_at"]
        ttft = DASH if first is None else _milliseconds(first - record["created"])
        table.add_row(
            _when(record["finished"]),
            record["request_id"],
            record["model"],
            record["finish_reason"],
            str(record["prompt_tokens"]),
            str(record["generated_tokens"]),
            ttft,
            ", ".join(
                f"{w['worker_id']} {_layers(w['layers'])}: {w['tokens']}" for w in record["workers"]
            ),
        )
    return table


def render_ledger(ledger: dict[str, Any]) -> Group:
    totals = ledger["totals"]
    since = f" since {_when(totals['since'])}" if totals.get("since") else ""
    summary = Text(
        f"{totals['requests']} requests{since}: {totals['prompt_tokens']} prompt tokens, "
        f"{totals['generated_tokens']} generated"
    )
    return Group(summary, workers_table(ledger["workers"]), recent_table(ledger["recent"]))


def console() -> Console:
    """A console that does not squeeze tables to 80 columns when printing to a pipe."""
    terminal = Console()
    if terminal.is_terminal or "COLUMNS" in os.environ:
        return terminal
    return Console(width=PIPE_WIDTH)

"""The operator's commands, all talking to a running gateway: status, chat, ledger, doctor.

Only argparse is imported up front, so `meshpipe --help` stays fast; each command imports what
it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

DEFAULT_URL = "http://127.0.0.1:9337"


def _add_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the gateway (default {DEFAULT_URL})")


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The operator's subcommands."""
    status = sub.add_parser("status", help="the running pipeline as a table")
    _add_url(status)
    status.add_argument("--json", action="store_true", help="print /api/status as JSON")

    chat = sub.add_parser("chat", help="a streaming chat in the terminal")
    _add_url(chat)
    chat.add_argument("--model", default="", help="default: the first model served")
    chat.add_argument("--system", default="", help="a system message")
    chat.add_argument("--max-tokens", type=int, default=512)
    chat.add_argument("--temperature", type=float, default=None)
    chat.add_argument("--seed", type=int, default=None)

    ledger = sub.add_parser("ledger", help="contributions per worker and recent requests")
    _add_url(ledger)
    ledger.add_argument("--limit", type=int, default=20, help="recent requests shown")
    ledger.add_argument("--json", action="store_true", help="print /api/ledger as JSON")

    doctor = sub.add_parser("doctor", help="check the set-up and say what to fix")
    _add_url(doctor)
    doctor.add_argument("--device", choices=["cpu", "cuda", "mps"], default=None)
    doctor.add_argument("--mesh-port", type=int, default=9338)
    doctor.add_argument("--relay-port", type=int, default=9339)
    doctor.add_argument("--relay", type=_host_port, default=None, help="a relay that must answer")


def _gateway_errors(command: Callable[[argparse.Namespace], None]) -> Callable:
    """A gateway that cannot be reached is a one-line error, not a traceback."""

    def run(args: argparse.Namespace) -> None:
        from meshpipe.client import GatewayError

        try:
            command(args)
        except GatewayError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(1) from None

    return run


@_gateway_errors
def run_status(args: argparse.Namespace) -> None:
    from meshpipe.client import GatewayClient
    from meshpipe.views import console, render_status

    with GatewayClient(args.url) as client:
        status = client.status()
    status.pop("join_token", None)  # a secret has no place on a shared screen or in a log
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        console().print(render_status(status))


@_gateway_errors
def run_ledger(args: argparse.Namespace) -> None:
    from meshpipe.client import GatewayClient
    from meshpipe.views import console, render_ledger

    with GatewayClient(args.url) as client:
        ledger = client.ledger(args.limit)
    if args.json:
        print(json.dumps(ledger, indent=2))
    else:
        console().print(render_ledger(ledger))


@_gateway_errors
def run_chat(args: argparse.Namespace) -> None:
    from meshpipe.chat import ChatSettings, chat
    from meshpipe.client import GatewayClient

    settings = ChatSettings(args.model, args.system, args.max_tokens, args.temperature, args.seed)
    with GatewayClient(args.url) as client:
        chat(client, settings)


def run_doctor(args: argparse.Namespace) -> None:
    from rich.table import Table
    from rich.text import Text

    from meshpipe.doctor import DoctorSettings, Status, run_checks
    from meshpipe.views import console

    settings = DoctorSettings(args.url, args.device, args.mesh_port, args.relay, args.relay_port)
    styles = {Status.OK: "green", Status.WARN: "yellow", Status.FAIL: "bold red"}
    table = Table(title="meshpipe doctor", title_justify="left")
    table.add_column("check", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("detail")
    findings = []
    screen = console()
    with screen.status("checking..."):
        for finding in run_checks(settings):
            findings.append(finding)
            result = Text(finding.status.value, style=styles[finding.status])
            table.add_row(finding.check, result, finding.detail)
    screen.print(table)
    fixes = [f for f in findings if f.fix and f.status is not Status.OK]
    for finding in fixes:
        screen.print(
            f"[{styles[finding.status]}]{finding.check}[/]: {finding.fix}", highlight=False
        )
    failed = sum(finding.status is Status.FAIL for finding in findings)
    if failed:
        screen.print(f"{failed} check(s) failed")
        raise SystemExit(1)
    screen.print("no problem found" if not fixes else "works, with warnings")


COMMANDS = {
    "status": run_status,
    "chat": run_chat,
    "ledger": run_ledger,
    "doctor": run_doctor,
}

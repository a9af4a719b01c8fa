"""`meshpipe doctor`: check this machine's set-up and a running gateway, and say what to fix.

Each check gives findings: ok, warn (works, but worth a look) or fail (something is broken).
The command exits non-zero when any check fails.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import errno
import re
import socket
import ssl
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
from aioquic.asyncio import QuicConnectionProtocol, connect
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, QuicEvent
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshpipe import dirs
from meshpipe.client import GatewayClient, GatewayError
from meshpipe.identity import certificate_fingerprint
from meshpipe.models import catalog

MIN_PYTHON = (3, 11)
MIN_TORCH = (2, 10)  # torch.nn.attention.varlen
QUIC_PROBE_SECONDS = 3.0
RELAY_PROBE_SECONDS = 3.0
EXPIRY_WARNING = datetime.timedelta(days=30)


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Finding:
    """The outcome of one check."""

    check: str
    status: Status
    detail: str
    fix: str = ""
    """What the operator should do, when something is wrong."""


@dataclass(frozen=True)
class DoctorSettings:
    """What `meshpipe doctor` is told on its command line."""

    url: str
    device: str | None = None
    """None: cpu, plus cuda or mps where torch sees them."""
    mesh_port: int = 9338
    relay: tuple[str, int] | None = None
    """An explicit relay must answer; without one, the default port is probed as a hint."""
    relay_port: int = 9339

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def http_port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)


# -- this machine ------------------------------------------------------------------------------


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def check_python() -> Iterator[Finding]:
    version = ".".join(str(part) for part in sys.version_info[:3])
    if sys.version_info[:2] >= MIN_PYTHON:
        yield Finding("python", Status.OK, f"{version} ({sys.executable})")
    else:
        needed = ".".join(map(str, MIN_PYTHON))
        yield Finding("python", Status.FAIL, version, f"use Python >= {needed}")


def check_torch() -> Iterator[Finding]:
    needed = ".".join(map(str, MIN_TORCH))
    try:
        import torch
    except ImportError as error:
        yield Finding("torch", Status.FAIL, str(error), f"pip install 'torch>={needed}'")
        return
    if _version(torch.__version__)[:2] < MIN_TORCH:
        yield Finding("torch", Status.FAIL, torch.__version__, f"pip install 'torch>={needed}'")
        return
    builds = [f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"]
    yield Finding("torch", Status.OK, f"{torch.__version__} ({', '.join(builds)})")


def _devices(asked: str | None) -> list[str]:
    import torch

    if asked is not None:
        return [asked]
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def _tiny_matmul(device: str) -> str:
    """A small computation on `device`, checked against its known result."""
    import torch

    a = torch.arange(6.0, device=device).reshape(2, 3)  # [2, 3]
    product = (a @ a.T).cpu()  # [2, 2]
    if device == "cuda":
        torch.cuda.synchronize()
    assert product.tolist() == [[5.0, 14.0], [14.0, 50.0]], product.tolist()
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return f"{torch.cuda.get_device_name()}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free"
    return "a matmul gives the right result"


def check_devices(asked: str | None) -> Iterator[Finding]:
    try:
        devices = _devices(asked)
    except ImportError:
        return  # reported by check_torch
    for device in devices:
        try:
            detail = _tiny_matmul(device)
        except Exception as error:  # noqa: BLE001 - any failure of the device is the finding
            fix = {
                "cuda": "check `nvidia-smi`, and that torch is a CUDA build (torch.version.cuda)",
                "mps": "needs Apple silicon, macOS >= 12.3 and an arm64 Python",
            }.get(device, "reinstall torch")
            yield Finding(f"device {device}", Status.FAIL, f"{type(error).__name__}: {error}", fix)
        else:
            yield Finding(f"device {device}", Status.OK, detail)


def check_cpu_kernels() -> Iterator[Finding]:
    """meshpipe's C kernels for CPU workers: built (or taken from the cache) and checked."""
    import torch

    from worker.cpu_kernels import load

    native = load()
    if native is None:
        yield Finding(
            "cpu kernels",
            Status.WARN,
            "not available: CPU workers use torch's kernels (slower decode steps)",
            "they need x86 with AVX-512 and a C compiler (`cc`); see the worker's log",
        )
        return
    x, weight = torch.arange(32.0).view(2, 16), torch.ones(16)
    expected = x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    if not torch.allclose(native.rms_norm(x, weight, 1e-5), expected, rtol=1e-5, atol=1e-6):
        yield Finding("cpu kernels", Status.FAIL, "a test RMS norm is wrong", "report this")
        return
    yield Finding("cpu kernels", Status.OK, f"AVX-512, {native.path}")


def _refetch(name: str) -> str:
    if name in catalog.CATALOG:
        return f"meshpipe models rm {name} && meshpipe models pull {name}"
    return f"meshpipe models rm {name}; it is converted again the next time it is used"


def check_models() -> Iterator[Finding]:
    models = catalog.installed()
    if not models:
        fix = f"meshpipe models pull {catalog.DEFAULT_MODEL}"
        yield Finding("models", Status.WARN, f"none installed in {dirs.models_dir()}", fix)
    for model in models:
        name = model["name"]
        problems = catalog.verify(model["path"])
        if problems:
            shown = "; ".join(problems[:3]) + (
                f"; {len(problems) - 3} more" if problems[3:] else ""
            )
            yield Finding(f"model {name}", Status.FAIL, shown, _refetch(name))
        else:
            size = model["size"] / 2**20
            yield Finding(f"model {name}", Status.OK, f"{size:.0f} MiB, checksums match")


def _owner(port: int, kind: str) -> psutil.Process | None:
    """The process holding a local TCP listening socket or UDP socket on `port`."""
    try:
        connections = psutil.net_connections(kind=kind)
    except psutil.AccessDenied:
        return None
    for connection in connections:
        listening = kind == "udp" or connection.status == psutil.CONN_LISTEN
        if connection.laddr and connection.laddr.port == port and listening and connection.pid:
            return psutil.Process(connection.pid)
    return None


def _port_free(port: int, kind: str) -> bool:
    family_type = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, family_type) as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def check_port(port: int, kind: str, role: str) -> Iterator[Finding]:
    name = f"port {port}/{kind}"
    if _port_free(port, kind):
        yield Finding(name, Status.OK, f"free for the {role}")
        return
    try:
        owner = _owner(port, kind)
        command = " ".join(owner.cmdline()) if owner else ""
    except psutil.Error:
        owner, command = None, ""
    if owner is None:
        yield Finding(name, Status.WARN, f"in use by a process this user cannot see ({role})")
    elif "meshpipe" in command:
        shown = command[command.index("meshpipe") :][:60]
        yield Finding(name, Status.OK, f"held by meshpipe (pid {owner.pid}: {shown})")
    else:
        fix = f"stop {owner.name()} (pid {owner.pid}), or give meshpipe another port"
        yield Finding(name, Status.FAIL, f"held by {owner.name()} (pid {owner.pid})", fix)


def _certificate_problems(certificate_path: Path) -> list[str]:
    now = datetime.datetime.now(datetime.UTC)
    certificate = x509.load_pem_x509_certificate(certificate_path.read_bytes())
    problems = []
    if certificate.not_valid_after_utc <= now:
        problems.append(f"expired on {certificate.not_valid_after_utc:%Y-%m-%d}")
    elif certificate.not_valid_after_utc - now < EXPIRY_WARNING:
        problems.append(f"expires on {certificate.not_valid_after_utc:%Y-%m-%d}")
    if certificate.not_valid_before_utc > now:
        problems.append(f"not valid before {certificate.not_valid_before_utc:%Y-%m-%d}")
    key_path = certificate_path.with_suffix(".key")
    if not key_path.is_file():
        return problems + [f"{key_path.name} is missing"]
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(encoding, public) != certificate.public_key().public_bytes(
        encoding, public
    ):
        problems.append(f"{key_path.name} does not match the certificate")
    if stat.S_IMODE(key_path.stat().st_mode) & 0o077:
        problems.append(f"{key_path.name} is readable by others")
    return problems


def check_certificates() -> Iterator[Finding]:
    directory = dirs.config_dir() / "nodes"
    certificates = sorted(directory.glob("*.crt"))
    broken = 0
    for path in certificates:
        try:
            problems = _certificate_problems(path)
        except (ValueError, TypeError) as error:
            problems = [f"unreadable: {error}"]
        if problems:
            broken += 1
            only_soon = all(problem.startswith("expires on") for problem in problems)
            fix = f"delete {path} and {path.with_suffix('.key')}: a new identity is made at start"
            if problems == [f"{path.with_suffix('.key').name} is readable by others"]:
                fix = f"chmod 600 {path.with_suffix('.key')}"
            status = Status.WARN if only_soon else Status.FAIL
            yield Finding(f"certificate {path.stem}", status, "; ".join(problems), fix)
    if not certificates:
        yield Finding("certificates", Status.OK, f"none yet in {directory} (made at first start)")
    elif broken < len(certificates):
        valid = len(certificates) - broken
        yield Finding("certificates", Status.OK, f"{valid} valid with their keys in {directory}")


# -- the running mesh ------------------------------------------------------------------------


def check_gateway(url: str) -> Iterator[Finding]:
    with GatewayClient(url) as client:
        try:
            health = client.get("/health")
            status = client.status()
        except GatewayError as error:
            fix = "start it with `meshpipe auto` (or `meshpipe gateway`), or pass --url"
            yield Finding("gateway", Status.FAIL, str(error).split(";")[0], fix)
            return
    models = status.get("models") or [{"name": status.get("model"), "pipeline": status["pipeline"]}]
    for model in models:
        pipeline = model["pipeline"]
        stages, workers = len(pipeline["stages"]), len(pipeline["workers"])
        detail = f"{url}: {model['name']} on {stages} stages, {workers} workers"
        if pipeline["ready"]:
            yield Finding("gateway", Status.OK, detail + ", ready")
        else:
            fix = "start workers: meshpipe worker --gateway HOST:PORT --join TOKEN"
            yield Finding("gateway", Status.WARN, detail + ", NOT ready", fix)
    if not health.get("ready") and not models:
        yield Finding("gateway", Status.WARN, f"{url} answers but serves no model")


class _Probe(QuicConnectionProtocol):
    """A client connection that only reports how its handshake ended."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outcome: asyncio.Future[str] = self._loop.create_future()

    def quic_event_received(self, event: QuicEvent) -> None:
        if self.outcome.done():
            return
        if isinstance(event, HandshakeCompleted):
            certificate = self._quic.tls._peer_certificate
            fingerprint = certificate_fingerprint(certificate) if certificate else "?"
            self.outcome.set_result(
                f"QUIC handshake done (certificate sha256 {fingerprint[:16]}...)"
            )
        elif isinstance(event, ConnectionTerminated):
            reason = event.reason_phrase or f"error {event.error_code:#x}"
            self.outcome.set_result(
                f"a QUIC endpoint answered and refused the handshake ({reason})"
            )


async def quic_probe(host: str, port: int) -> str:
    """Open a QUIC handshake to host:port; says what answered (TimeoutError if nothing did)."""
    from meshpipe.quic import ALPN

    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE)
    async with connect(
        host, port, configuration=config, create_protocol=_Probe, wait_connected=False
    ) as probe:
        assert isinstance(probe, _Probe)
        probe.transmit()
        return await asyncio.wait_for(probe.outcome, QUIC_PROBE_SECONDS)


def check_mesh_endpoint(host: str, port: int) -> Iterator[Finding]:
    try:
        detail = asyncio.run(quic_probe(host, port))
    except (TimeoutError, OSError) as error:
        reason = "no answer" if isinstance(error, TimeoutError) else str(error)
        fix = "is the gateway's mesh port this one (--mesh-port), and does UDP pass the firewall?"
        yield Finding("mesh endpoint", Status.FAIL, f"udp {host}:{port}: {reason}", fix)
        return
    yield Finding("mesh endpoint", Status.OK, f"udp {host}:{port}: {detail}")


def relay_probe(host: str, port: int) -> str:
    """Send the relay a registration HELLO: a live relay answers with a CHALLENGE (no key is
    needed for that step). Raises TimeoutError or OSError when nothing answers."""
    from meshpipe.relay_wire import HELLO_SIZE, EnvelopeError, Kind, control, decode

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(RELAY_PROBE_SECONDS)
        probe.connect((socket.gethostbyname(host), port))
        probe.send(control(Kind.HELLO, "meshpipe-doctor", HELLO_SIZE))
        data = probe.recv(65536)
    try:
        answer = decode(data)
    except EnvelopeError as error:
        raise OSError(f"something answered, but not a meshpipe relay ({error})") from None
    return f"the relay answered ({answer.kind.name})"


def check_relay(settings: DoctorSettings) -> Iterator[Finding]:
    host, port = settings.relay or (settings.host, settings.relay_port)
    explicit = settings.relay is not None
    try:
        detail = relay_probe(host, port)
    except (TimeoutError, OSError) as error:
        reason = "no answer" if isinstance(error, TimeoutError) else str(error)
        if explicit:
            fix = "start it there (`meshpipe relay`), or check the address and the firewall"
        else:
            fix = "only workers behind NAT need a relay; check one with --relay HOST:PORT"
        status = Status.FAIL if explicit else Status.WARN
        yield Finding("relay", status, f"udp {host}:{port}: {reason}", fix)
        return
    yield Finding("relay", Status.OK, f"udp {host}:{port}: {detail}")


# -- all of it ---------------------------------------------------------------------------------


def checks(settings: DoctorSettings) -> list[tuple[str, Callable[[], Iterator[Finding]]]]:
    """Every check with its name, in the order they are shown."""
    return [
        ("python", check_python),
        ("torch", check_torch),
        ("devices", lambda: check_devices(settings.device)),
        ("cpu kernels", check_cpu_kernels),
        ("models", check_models),
        ("ports", lambda: check_port(settings.http_port, "tcp", "gateway's HTTP API")),
        ("ports", lambda: check_port(settings.mesh_port, "udp", "gateway's mesh endpoint")),
        ("ports", lambda: check_port(settings.relay_port, "udp", "relay")),
        ("gateway", lambda: check_gateway(settings.url)),
        ("mesh endpoint", lambda: check_mesh_endpoint(settings.host, settings.mesh_port)),
        ("relay", lambda: check_relay(settings)),
        ("certificates", check_certificates),
    ]


def run_checks(settings: DoctorSettings) -> Iterator[Finding]:
    for name, check in checks(settings):
        try:
            yield from check()
        except Exception as error:  # noqa: BLE001 - a check that breaks is itself a finding
            yield Finding(name, Status.FAIL, f"the check itself failed: {error!r}")

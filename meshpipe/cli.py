"""The `meshpipe` command: one subcommand per process kind, plus the operator's tools."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from meshpipe import busy_poll, operator, trace
from meshpipe.models.catalog import ModelError

DEFAULT_MODEL = "smollm2-135m-instruct"
TOKEN_ENV = "MESHPIPE_JOIN_TOKEN"


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def _add_gateway(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gateway", help="run the HTTP gateway and the mesh's QUIC endpoint")
    p.add_argument(
        "--model", action="append", help=f"model to serve, repeatable (default {DEFAULT_MODEL})"
    )
    p.add_argument("--name", default="", help="name served to clients (a single model only)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (loopback by default)")
    p.add_argument("--port", type=int, default=9337)
    p.add_argument("--mesh-host", default="127.0.0.1")
    p.add_argument("--mesh-port", type=int, default=9338)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--slots", type=int, default=16, help="KV slots: concurrent sequences")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context length per slot")
    p.add_argument("--max-batch-tokens", type=int, default=256)
    p.add_argument("--max-waiting", type=int, default=64, help="queued requests before 429")
    p.add_argument(
        "--max-in-flight", type=int, default=0, help="micro-batches in the pipeline (0: stages)"
    )
    _add_token_loop_flag(p)
    p.add_argument("--token", default=None, help=f"join token (default: ${TOKEN_ENV} or kept)")
    p.add_argument(
        "--announce",
        action=argparse.BooleanOptionalAction,
        help="announce on the LAN with mDNS (default: when --mesh-host is not loopback)",
    )
    p.add_argument("--relay", type=_host_port, help="register with this relay (HOST:PORT)")
    _add_busy_poll_flag(p, "default 0.05; `auto --device cuda` sets 20")


def _add_worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run one pipeline stage")
    p.add_argument(
        "--gateway", type=_host_port, help="the gateway's mesh endpoint (default: find it by mDNS)"
    )
    p.add_argument("--discover-timeout", type=float, default=10.0, help="seconds to look for it")
    p.add_argument("--join", default=None, help=f"the mesh's join token (or ${TOKEN_ENV})")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument(
        "--host",
        help="address the previous stage dials (default: this machine's, towards the gateway)",
    )
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--id", default="", help="node id (default: random)")
    p.add_argument("--max-memory", type=int, default=0, help="bytes offered to the planner")
    p.add_argument("--model", default="", help="serve this model (default: where needed)")
    p.add_argument("--relay", type=_host_port, help="a relay for links a NAT blocks (HOST:PORT)")
    p.add_argument("--relay-only", action="store_true", help="every link through the relay")
    _add_busy_poll_flag(p, "default 20 with --device cuda, else 0.05; 0: off")
    _add_cpu_kernel_flags(p)
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replay decode steps from CUDA graphs (cuda only)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CUDA: compile the captured decode step with TorchInductor",
    )


def _add_token_loop_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--token-loop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the last stage feeds each step's tokens straight to the first (default: on)",
    )


def _add_busy_poll_flag(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--busy-poll-ms",
        type=float,
        default=None,
        help=f"poll the sockets this long after traffic instead of sleeping ({default})",
    )


def _add_cpu_kernel_flags(p: argparse.ArgumentParser) -> None:
    """The CPU path's switches, shared by `worker` and `auto`."""
    p.add_argument(
        "--block-weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CPU: run decode steps and short chunks on the model's GGUF Q4_1/Q8_0 blocks",
    )
    p.add_argument(
        "--native-kernels",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CPU float32: meshpipe's C kernels (AVX-512) for block products and decode attention",
    )


def _add_auto(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("auto", help="start a whole local cluster: gateway plus N workers")
    p.add_argument(
        "--model", action="append", help=f"model to serve, repeatable (default {DEFAULT_MODEL})"
    )
    p.add_argument("--stages", type=int, default=2, help="stages per model")
    p.add_argument("--spare", type=int, default=0, help="standby workers for failover")
    p.add_argument("--port", type=int, default=9337)
    p.add_argument("--mesh-port", type=int, default=9338)
    p.add_argument("--slots", type=int, default=16, help="KV slots per model")
    p.add_argument("--max-waiting", type=int, default=64, help="queued requests before 429")
    p.add_argument("--max-batch-tokens", type=int, default=256, help="tokens per micro-batch")
    p.add_argument(
        "--max-in-flight", type=int, default=0, help="micro-batches in the pipeline (0: stages)"
    )
    _add_token_loop_flag(p)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--relay", action="store_true", help="start a relay and route a stage via it")
    p.add_argument("--relay-port", type=int, default=9339)
    _add_busy_poll_flag(p, "every process; default 20 with --device cuda, else 0.05; 0: off")
    _add_cpu_kernel_flags(p)


def _add_relay(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("relay", help="forward QUIC packets for peers behind NAT; `relay status`")
    p.add_argument("action", nargs="?", choices=["serve", "status", "key"], default="serve")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9339)
    p.add_argument("--token", default=None, help=f"join token or relay key (or ${TOKEN_ENV})")
    p.add_argument("--status", type=_host_port, default=("127.0.0.1", 9339), help="HTTP status")
    p.add_argument("--no-status", action="store_true", help="serve no HTTP status endpoint")
    p.add_argument("--json", action="store_true", help="status: print the raw JSON")
    p.add_argument("--max-peers", type=int, default=1024)
    p.add_argument("--max-links", type=int, default=64, help="peers one peer may send to")
    p.add_argument("--rate", type=int, default=0, help="bytes/s one peer may send (0: no limit)")
    p.add_argument("--idle", type=float, default=30.0, help="seconds before a silent peer expires")
    p.add_argument("--dump", default=None, help="debug: append every forwarded datagram here")
    _add_busy_poll_flag(p, "default 0.05; `auto --relay --device cuda` sets 20")


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="manage the model cache")
    actions = p.add_subparsers(dest="action", required=True)
    pull = actions.add_parser("pull", help="fetch and convert a catalog model")
    pull.add_argument("name")
    actions.add_parser("list", help="installed models")
    remove = actions.add_parser("rm", help="remove an installed model")
    remove.add_argument("name")
    synth = actions.add_parser("synth", help="write a random-weight model with known shapes")
    synth.add_argument("--preset", required=True, help="llama3-8b, llama3.2-1b or tiny")
    synth.add_argument("--out", default=None, help="directory (default: the model cache)")
    synth.add_argument("--device", default="cpu", help="where to draw the random numbers")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="benchmarks: `bench serving ...` (default), `bench transport|relay ...`"
    )
    p.add_argument("arguments", nargs=argparse.REMAINDER)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="meshpipe", description=__doc__)
    root.add_argument("-v", "--verbose", action="store_true")
    sub = root.add_subparsers(dest="command", required=True)
    _add_auto(sub)
    _add_gateway(sub)
    _add_worker(sub)
    _add_models(sub)
    _add_bench(sub)
    _add_relay(sub)
    operator.add_parsers(sub)
    return root


def _token(explicit: str | None, create: bool) -> str:
    token = explicit or os.environ.get(TOKEN_ENV)
    if token:
        return token
    if not create:
        raise SystemExit(f"error: a join token is required (--join or ${TOKEN_ENV})")
    from meshpipe import dirs
    from meshpipe.identity import load_or_create_join_token

    return load_or_create_join_token(dirs.config_dir())


def run_gateway(args: argparse.Namespace) -> None:
    from gateway.server import GatewaySettings, serve

    token = _token(args.token, create=True)
    print(f"join token: {token}", flush=True)
    settings = GatewaySettings(
        models=tuple(args.model or [DEFAULT_MODEL]),
        token=token,
        host=args.host,
        port=args.port,
        mesh_host=args.mesh_host,
        mesh_port=args.mesh_port,
        served_name=args.name,
        stages=args.stages,
        num_slots=args.slots,
        max_seq_len=args.max_seq_len,
        max_batch_tokens=args.max_batch_tokens,
        max_waiting=args.max_waiting,
        max_in_flight=args.max_in_flight,
        token_loop=args.token_loop,
        announce=args.announce,
        relay=args.relay,
        busy_poll_ms=busy_poll.window_ms(args.busy_poll_ms),
    )
    busy_poll.run(serve(settings), settings.busy_poll_ms / 1000)


def run_worker(args: argparse.Namespace) -> None:
    from meshpipe.discovery import local_address_towards
    from worker.node import WorkerNode, WorkerSettings, check_device

    check_device(args.device)
    token = _token(args.join, create=False)
    gateway = args.gateway or _discover(token, args.discover_timeout)
    settings = WorkerSettings(
        gateway_host=gateway[0],
        gateway_port=gateway[1],
        token=token,
        device=args.device,
        dtype=args.dtype,
        host=args.host or local_address_towards(gateway[0]),
        port=args.port,
        threads=args.threads,
        node_id=args.id,
        max_memory=args.max_memory,
        model=args.model,
        cuda_graphs=args.cuda_graphs,
        compile=args.compile,
        block_weights=args.block_weights,
        native_kernels=args.native_kernels,
        relay=args.relay,
        relay_only=args.relay_only,
        busy_poll_ms=busy_poll.window_ms(args.busy_poll_ms, args.device),
    )
    if settings.relay_only and settings.relay is None:
        raise SystemExit("error: --relay-only needs --relay HOST:PORT")
    from meshpipe.relay_link import RelayRefused

    trace.start("worker")  # MESHPIPE_TRACE: marks of its steps, for benchmarks
    try:
        busy_poll.run(WorkerNode(settings).run(), settings.busy_poll_ms / 1000)
    except RelayRefused as error:
        raise SystemExit(f"error: the relay refused this worker: {error}") from None


def _discover(token: str, wait_seconds: float) -> tuple[str, int]:
    """The mesh endpoint of the gateway of this token's mesh, found on the LAN (mDNS)."""
    from meshpipe.discovery import DiscoveryError, find_gateway

    print(f"looking for the gateway on the local network (up to {wait_seconds:g}s)", flush=True)
    try:
        found = asyncio.run(find_gateway(token, wait_seconds))
    except DiscoveryError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"found {found.name} at {found.host}:{found.port} (sha256 {found.fingerprint})")
    return found.host, found.port


def run_models(args: argparse.Namespace) -> None:
    from meshpipe.models import catalog

    if args.action == "pull":
        print(catalog.pull(args.name, progress=True))
    elif args.action == "list":
        for model in catalog.installed():
            state = "complete" if model["complete"] else "INCOMPLETE"
            print(f"{model['name']:32} {model['size'] / 1e6:9.1f} MB  {state}  {model['path']}")
    elif args.action == "synth":
        from pathlib import Path

        from meshpipe.models.synth import PRESETS, synth

        if args.preset not in PRESETS:
            raise ModelError(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
        print(synth(args.preset, Path(args.out) if args.out else None, device=args.device))
    elif args.action == "rm":
        if not catalog.remove(args.name):
            raise ModelError(f"model {args.name!r} is not installed")
        print(f"removed {args.name}")


def run_auto(args: argparse.Namespace) -> None:
    from meshpipe.auto import AutoSettings, run

    run(
        AutoSettings(
            models=tuple(args.model or [DEFAULT_MODEL]),
            stages=args.stages,
            spare=args.spare,
            max_waiting=args.max_waiting,
            max_batch_tokens=args.max_batch_tokens,
            max_in_flight=args.max_in_flight,
            token_loop=args.token_loop,
            verbose=args.verbose,
            port=args.port,
            mesh_port=args.mesh_port,
            slots=args.slots,
            max_seq_len=args.max_seq_len,
            device=args.device,
            dtype=args.dtype,
            ready_timeout=args.ready_timeout,
            relay=args.relay,
            relay_port=args.relay_port,
            block_weights=args.block_weights,
            native_kernels=args.native_kernels,
            busy_poll_ms=busy_poll.window_ms(args.busy_poll_ms, args.device),
        )
    )


def run_bench(args: argparse.Namespace) -> None:
    arguments = list(args.arguments)
    if arguments[:1] == ["transport"]:
        from bench.transport import main as bench_main

        arguments = arguments[1:]
    elif arguments[:1] == ["relay"]:
        from bench.relay import main as bench_main

        arguments = arguments[1:]
    else:
        from bench.serving import main as bench_main

        arguments = arguments[1:] if arguments[:1] == ["serving"] else arguments
    bench_main(arguments)


def run_relay(args: argparse.Namespace) -> None:
    from relay import command

    if args.action == "status":
        command.print_status(args.status, args.json)
        return
    key = command.key_of(_token(args.token, create=False))
    if args.action == "key":
        print(key)
        return
    busy_poll.run(command.serve(args, key), busy_poll.window_ms(args.busy_poll_ms) / 1000)


COMMANDS = {
    "gateway": run_gateway,
    "worker": run_worker,
    "models": run_models,
    "auto": run_auto,
    "bench": run_bench,
    "relay": run_relay,
    **operator.COMMANDS,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        # argparse's REMAINDER drops options that come first: hand the benchmarks their argv.
        run_bench(argparse.Namespace(arguments=argv[1:]))
        return
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        COMMANDS[args.command](args)
    except ModelError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None

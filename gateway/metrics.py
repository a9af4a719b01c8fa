"""Prometheus metrics of one gateway (its own registry: no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Request latencies, token counts, queue sizes and per-stage step figures."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.ttft = Histogram(
            "meshpipe_time_to_first_token_seconds",
            "Time to first token",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token = Histogram(
            "meshpipe_inter_token_latency_seconds",
            "Time between tokens of a stream",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "meshpipe_prompt_tokens", "Prompt tokens processed", registry=registry
        )
        self.generated_tokens = Counter(
            "meshpipe_generation_tokens", "Tokens generated", registry=registry
        )
        self.requests = Counter(
            "meshpipe_requests", "Finished requests", ["finish_reason"], registry=registry
        )
        self.running = Gauge(
            "meshpipe_requests_running", "Requests holding a KV slot", registry=registry
        )
        self.waiting = Gauge(
            "meshpipe_requests_waiting", "Requests queued for a slot", registry=registry
        )
        self.slots_used = Gauge("meshpipe_kv_slots_used", "KV slots in use", registry=registry)
        self.batches_in_flight = Gauge(
            "meshpipe_batches_in_flight", "Micro-batches inside the pipeline", registry=registry
        )
        self.stage_step = Histogram(
            "meshpipe_stage_step_seconds",
            "Compute time of one micro-batch on a stage",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.stage_batch_tokens = Histogram(
            "meshpipe_stage_batch_tokens",
            "Tokens in one micro-batch",
            ["stage"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

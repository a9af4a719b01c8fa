"""Continuous batching: shared forward passes, per-request sampling, cancellation, back-pressure."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import random
import time
from pathlib import Path

import httpx
import pytest

from tests.cluster import Cluster, start_auto

PROMPTS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Why is the sky blue?",
    "Write one sentence about cats.",
    "What is 12 times 12?",
    "Give me a synonym for happy.",
]


LONG_STORY = "Write a long story about a dragon who learns to bake bread."


def complete(url: str, model: str, prompt: str, **fields) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 16,
        "temperature": 0,
    }
    response = httpx.post(f"{url}/v1/chat/completions", json=body | fields, timeout=180)
    assert response.status_code == 200, response.text
    return response.json()


def text_of(answer: dict) -> str:
    return answer["choices"][0]["message"]["content"]


def test_batched_equals_alone(cluster: Cluster) -> None:
    """Greedy and seeded requests give the same tokens alone and sharing batches."""
    seeded = {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 1234}
    alone = [text_of(complete(cluster.url, cluster.model, p)) for p in PROMPTS]
    alone_seeded = text_of(complete(cluster.url, cluster.model, PROMPTS[0], **seeded))
    steps_before = sum(s["steps"] for s in cluster.status()["stages"])
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS) + 1) as pool:
        greedy = [pool.submit(complete, cluster.url, cluster.model, p) for p in PROMPTS]
        sampled = pool.submit(complete, cluster.url, cluster.model, PROMPTS[0], **seeded)
        together = [text_of(f.result()) for f in greedy]
        together_seeded = text_of(sampled.result())
    assert together == alone
    assert together_seeded == alone_seeded
    steps = sum(s["steps"] for s in cluster.status()["stages"]) - steps_before
    tokens = 16 * (len(PROMPTS) + 1)
    # Shared forward passes: far fewer stage steps than the tokens of all requests.
    assert steps < tokens, (steps, tokens)


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def slots_in_use(cluster: Cluster) -> tuple[int, list[int]]:
    status = cluster.status()
    return status["engine"]["slots_used"], [s["active_slots"] for s in status["stages"]]


def test_disconnect_frees_the_slot_everywhere(cluster: Cluster) -> None:
    body = {
        "model": cluster.model,
        # greedy, this prompt runs to max_tokens (a short answer could end before the check)
        "messages": [{"role": "user", "content": LONG_STORY}],
        "max_tokens": 500,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{cluster.url}/v1/chat/completions", json=body, timeout=60
    ) as response:
        chunks: list[str] = []
        # Held, so that leaving the loop does not close the generator (and with it the stream):
        # the client must stay connected until the with-block ends.
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                chunks.append(line)
            if len(chunks) == 4:
                break
        used, per_stage = slots_in_use(cluster)
        assert used == 1, (chunks, used, per_stage)
    closed = time.monotonic()
    while slots_in_use(cluster) != (0, [0, 0]):
        assert time.monotonic() - closed < 1.0, slots_in_use(cluster)
        time.sleep(0.05)
    assert metric(cluster.url, "meshpipe_kv_slots_used") == 0
    assert metric(cluster.url, "meshpipe_requests_running") == 0


async def one_request(client: httpx.AsyncClient, model: str, index: int, rng: random.Random) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
        "max_tokens": rng.randint(2, 20),
        "temperature": rng.choice([0, 0.8]),
        "seed": index,
        "stream": True,
    }
    if index % 4 == 2:  # ends on a stop string, often while its next step is out already
        body["stop"] = ["e", "a"]
    cancel_after = rng.randint(1, 4) if index % 4 == 0 else None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code == 429:
            return "rejected"
        assert response.status_code == 200
        chunks = 0
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                return "done"
            if line.startswith("data: "):
                assert "error" not in json.loads(line[6:])
                chunks += 1
                if cancel_after is not None and chunks >= cancel_after:
                    return "cancelled"
    return "cut"


def test_many_mixed_requests_leak_no_slot(tiny_model: Path) -> None:
    """200 requests, 16 at a time, greedy and sampled, a quarter ended by stop strings, a quarter
    cancelled mid-stream."""
    tiny = start_auto(tiny_model, 2, "--slots", "8", "--max-waiting", "64")
    try:

        async def run_all() -> list[str]:
            rng = random.Random(0)
            limit = asyncio.Semaphore(16)
            async with httpx.AsyncClient(base_url=tiny.url, timeout=120) as client:

                async def guarded(index: int) -> str:
                    async with limit:
                        return await one_request(client, tiny.model, index, rng)

                return await asyncio.gather(*(guarded(i) for i in range(200)))

        outcomes = asyncio.run(run_all())
        assert outcomes.count("done") + outcomes.count("cancelled") == 200, outcomes
        assert outcomes.count("cancelled") == 50
        deadline = time.monotonic() + 2
        while slots_in_use(tiny) != (0, [0, 0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        status = tiny.status()
        assert status["engine"]["slots_used"] == 0 and status["engine"]["running"] == []
        assert status["engine"]["waiting"] == 0 and status["engine"]["batches_in_flight"] == 0
        assert [s["active_slots"] for s in status["stages"]] == [0, 0]
        assert metric(tiny.url, "meshpipe_kv_slots_used") == 0
        assert complete(tiny.url, tiny.model, "Still there?")["usage"]["completion_tokens"] > 0
    finally:
        tiny.process.stop()


def test_full_queue_answers_429_then_recovers(tiny_model: Path) -> None:
    tiny = start_auto(tiny_model, 2, "--slots", "1", "--max-waiting", "1")
    try:
        body = {
            "model": tiny.model,
            "messages": [{"role": "user", "content": "Go on."}],
            "max_tokens": 200,
            "temperature": 0,
        }

        def post(_: int) -> httpx.Response:
            return httpx.post(f"{tiny.url}/v1/chat/completions", json=body, timeout=120)

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(post, range(6)))
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 2 and 429 in codes, codes
        for response in responses:
            if response.status_code == 429:
                error = response.json()["error"]
                assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
        assert complete(tiny.url, tiny.model, "Hello")["choices"][0]["finish_reason"] in (
            "stop",
            "length",
        )
    finally:
        tiny.process.stop()


@pytest.mark.parametrize("field", ["top_k"])
def test_top_k_one_is_greedy(cluster: Cluster, field: str) -> None:
    greedy = text_of(complete(cluster.url, cluster.model, PROMPTS[2]))
    top1 = text_of(complete(cluster.url, cluster.model, PROMPTS[2], temperature=1.5, **{field: 1}))
    assert top1 == greedy

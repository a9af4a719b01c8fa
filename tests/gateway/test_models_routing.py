"""Several models in one gateway, each on its own pipeline, routed by the request's model."""

from __future__ import annotations

from pathlib import Path

import httpx
from openai import OpenAI

from tests.cluster import start_auto
from tests.test_parity import reference


def test_two_models_in_one_auto(default_model: Path, tiny_model: Path) -> None:
    cluster = start_auto(default_model, 2, "--model", str(tiny_model))
    try:
        client = OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", timeout=120)
        names = [model.id for model in client.models.list().data]
        assert names == [default_model.name, tiny_model.name]
        status = cluster.status()
        pipelines = {model["name"]: model["pipeline"] for model in status["models"]}
        workers = [{s["worker_id"] for s in p["stages"]} for p in pipelines.values()]
        assert all(len(w) == 2 for w in workers) and not workers[0] & workers[1]
        assert [s["layers"] for s in pipelines[tiny_model.name]["stages"]] == [[0, 3], [3, 4]]
        for name, directory in ((default_model.name, default_model), (tiny_model.name, tiny_model)):
            prompt = "What is the capital of France?"
            answer = client.chat.completions.create(
                model=name,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=8,
                temperature=0,
            )
            assert (answer.choices[0].message.content, answer.usage.completion_tokens) == reference(
                directory, prompt, 8
            )
        missing = httpx.post(
            f"{cluster.url}/v1/chat/completions",
            json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            timeout=10,
        )
        assert missing.status_code == 404
    finally:
        cluster.process.stop()

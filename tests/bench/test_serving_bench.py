"""`meshpipe bench serving`: tiny runs against a live cluster; the JSON report and its figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.serving import build_prompts, main
from tests.cluster import Cluster, descendants

LEVEL_FIELDS = {
    "concurrency",
    "requests",
    "completed",
    "errors",
    "duration_s",
    "requests_per_s",
    "output_tokens",
    "output_tok_s",
    "ttft_ms",
    "itl_ms",
    "latency_ms",
    "per_request",
    "started_at",
    "finished_at",
}


def run_bench(tmp_path: Path, *arguments: str) -> dict:
    output = tmp_path / "serving.json"
    main([*arguments, "--seed", "7", "--output", str(output)])
    return json.loads(output.read_text())


def check_levels(report: dict, levels: list[int], requests: int, output_tokens: int) -> None:
    assert [level["concurrency"] for level in report["levels"]] == levels
    for level in report["levels"]:
        assert LEVEL_FIELDS <= level.keys()
        assert level["errors"] == 0, level["error_messages"]
        assert level["completed"] == requests
        for percentiles in (level["ttft_ms"], level["itl_ms"]):
            assert 0 < percentiles["p50"] <= percentiles["p99"]
        for request in level["per_request"]:
            assert 1 <= request["completion_tokens"] <= output_tokens
        assert level["output_tok_s"] > 0 and level["requests_per_s"] > 0


def test_prompts_have_the_exact_token_length(default_model: Path) -> None:
    """Synthetic prompts: the requested chat-encoded length, the same for the same seed."""
    prompts = build_prompts(default_model, 6, 96, seed=3)
    assert [len(prompt.ids) for prompt in prompts] == [96] * 6
    assert len({prompt.text for prompt in prompts}) == 6
    assert build_prompts(default_model, 6, 96, seed=3) == prompts


def test_report_has_every_figure(cluster: Cluster, default_model: Path, tmp_path: Path) -> None:
    """A two-level sweep: every request succeeds and the JSON holds the figures and the command."""
    report = run_bench(
        tmp_path,
        *("--url", cluster.url, "--model-dir", str(default_model)),
        *("--concurrency", "1,3", "--requests", "3"),
        *("--prompt-tokens", "48", "--output-tokens", "6"),
    )
    check_levels(report, [1, 3], requests=3, output_tokens=6)
    assert report["command"].startswith("meshpipe bench serving --url ")
    assert report["server"]["model"] == cluster.model
    assert report["server"]["stages"] and report["server"]["stages_after"]
    assert report["machine"]["cpu_count"] == os.cpu_count()
    assert report["started_at"] <= report["finished_at"]
    assert report["anchor"] is None
    assert set(report["ratios"]["aggregate_over_single_stream"]) == {"1", "3"}
    prompt_tokens = {r["prompt_tokens"] for r in report["levels"][0]["per_request"]}
    assert prompt_tokens == {48}  # the server's usage agrees with the exact prompt length


def test_poisson_arrivals(cluster: Cluster, default_model: Path, tmp_path: Path) -> None:
    report = run_bench(
        tmp_path,
        *("--url", cluster.url, "--model-dir", str(default_model)),
        *("--concurrency", "2", "--requests", "3", "--request-rate", "20"),
        *("--prompt-tokens", "48", "--output-tokens", "4"),
    )
    check_levels(report, [2], requests=3, output_tokens=4)
    assert report["settings"]["request_rate"] == "20.0"


def test_anchor_hf(cluster: Cluster, default_model: Path, tmp_path: Path) -> None:
    """`--anchor hf` runs transformers around the sweep and reports the ratios to it."""
    report = run_bench(
        tmp_path,
        *("--url", cluster.url, "--model-dir", str(default_model)),
        *("--concurrency", "1,2", "--requests", "2", "--anchor", "hf", "--anchor-requests", "2"),
        *("--anchor-threads", "1"),
        *("--prompt-tokens", "48", "--output-tokens", "4"),
    )
    check_levels(report, [1, 2], requests=2, output_tokens=4)
    anchor = report["anchor"]
    assert anchor["kind"] == "hf" and anchor["requests"] == 2
    assert len(anchor["tok_s_per_round"]) == 2  # one round before the sweep, one after
    assert set(anchor["by_threads"]) == {"1"}
    assert anchor["tok_s"] > 0 and anchor["decode_tok_s"] > 0 and anchor["torch_threads"] >= 1
    ratios = report["ratios"]
    assert ratios["single_stream_over_hf"] > 0 and ratios["single_stream_decode_over_hf"] > 0
    assert set(ratios["aggregate_over_hf"]) == {"1", "2"}


@pytest.mark.slow
def test_start_cluster_leaves_no_process(default_model: Path, tmp_path: Path) -> None:
    """`--start-cluster` runs its own `meshpipe auto` and stops all of it afterwards."""
    output = tmp_path / "serving.json"
    before = set(descendants(os.getpid()))
    command = [sys.executable, "-m", "meshpipe", "bench", "serving", "--start-cluster"]
    command += ["--model", str(default_model), "--stages", "1", "--requests", "2"]
    command += ["--prompt-tokens", "48", "--output-tokens", "4", "--output", str(output)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "| conc |" in finished.stdout
    report = json.loads(output.read_text())
    check_levels(report, [1], requests=2, output_tokens=4)
    assert report["server"]["started_cluster"] and len(report["server"]["stages"]) == 1
    assert set(descendants(os.getpid())) <= before

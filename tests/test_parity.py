"""Greedy tokens through the QUIC pipeline equal transformers' greedy generation, token for token.

The pipeline's answer is compared as text and token count: the HF tokens, cut at the first
end-of-sequence token, decoded with the model's tokenizer, must give exactly the streamed text,
and `usage.completion_tokens` must equal their number.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from openai import OpenAI

from gateway.text import ChatFormat
from meshpipe.models.config import ModelConfig
from tests.cluster import Cluster, start_auto

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
]
MAX_TOKENS = 24


def reference(model_dir: Path, prompt: str, max_tokens: int) -> tuple[str, int]:
    """transformers greedy generation on the same weights: (text, number of tokens)."""
    ids = ChatFormat(model_dir).encode_chat([{"role": "user", "content": prompt}])
    return reference_ids(model_dir, ids, max_tokens)


def reference_ids(
    model_dir: Path, ids: list[int], max_tokens: int, logits_processor=None
) -> tuple[str, int]:
    """transformers greedy generation continuing the token ids `ids` (with an optional
    `LogitsProcessorList`): (text, token count)."""
    from transformers import AutoModelForCausalLM

    config = ModelConfig.from_dir(model_dir)
    model = _hf_model(model_dir, AutoModelForCausalLM)
    with torch.inference_mode():
        output = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=list(config.eos_token_ids),
            pad_token_id=config.eos_token_ids[0],
            logits_processor=logits_processor,
        )
    new = output[0, len(ids) :].tolist()
    for index, token in enumerate(new):
        if token in config.eos_token_ids:
            new = new[: index + 1]
            break
    return ChatFormat(model_dir).decode(new), len(new)


_models: dict[Path, object] = {}


def _hf_model(model_dir: Path, factory):
    if model_dir not in _models:
        _models[model_dir] = factory.from_pretrained(model_dir, dtype=torch.float32).eval()
    return _models[model_dir]


def pipeline_answer(cluster: Cluster, prompt: str, max_tokens: int) -> tuple[str, int]:
    client = OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", timeout=120)
    answer = client.chat.completions.create(
        model=cluster.model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
    )
    return answer.choices[0].message.content or "", answer.usage.completion_tokens


def assert_parity(cluster: Cluster, model_dir: Path, prompts: list[str], max_tokens: int) -> None:
    for prompt in prompts:
        expected = reference(model_dir, prompt, max_tokens)
        got = pipeline_answer(cluster, prompt, max_tokens)
        print(
            f"{len(cluster.status()['stages'])} stages | {prompt!r} -> {got[0]!r} ({got[1]} tokens)"
        )
        assert got == expected, f"prompt {prompt!r}"


def test_default_model_two_stages(cluster: Cluster, default_model: Path) -> None:
    """Single-token steps run on the GGUF blocks (the default), prefills on float32."""
    assert len(cluster.status()["stages"]) == 2
    assert_parity(cluster, default_model, PROMPTS, MAX_TOKENS)


def test_default_model_three_stages(default_model: Path) -> None:
    """Every step on the float32 weights."""
    three = start_auto(default_model, 3, "--no-block-weights")
    try:
        stages = three.status()["stages"]
        # Balanced by work: the lm_head of the last stage weighs about 8 layers.
        assert [stage["layers"] for stage in stages] == [[0, 13], [13, 25], [25, 30]]
        assert_parity(three, default_model, PROMPTS[:2], MAX_TOKENS)
    finally:
        three.process.stop()


@pytest.mark.parametrize(
    ("stages", "loop"),
    [(1, True), (2, True), (3, True), (2, False)],
    ids=["1-stage", "2-stages", "3-stages", "2-stages-no-token-loop"],
)
def test_tiny_random_llama(tiny_model: Path, stages: int, loop: bool) -> None:
    """With the token loop (one stage feeds itself; the last of two or three dials the first)
    and without it (the gateway sends every step)."""
    tiny = start_auto(tiny_model, stages, *([] if loop else ["--no-token-loop"]))
    try:
        assert tiny.status()["engine"]["token_loop"] is loop
        started = time.perf_counter()
        assert_parity(tiny, tiny_model, PROMPTS, 16)
        elapsed = time.perf_counter() - started
        time.sleep(0.6)  # the stages' figures come with their heartbeats
        first = tiny.status()["stages"][0]
        if loop:
            assert first["fed_steps"] > 0
        else:  # nothing fed, nothing sent to the first stage for nothing
            assert first["fed_steps"] == first["feeds_ahead"] == 0
        for stage in tiny.status()["stages"]:  # the host time around each stage's steps
            assert stage["steps"] > 0
            assert 0 < stage["send_seconds"] < elapsed  # one send after another
            assert 0 < stage["wait_seconds"] / stage["steps"] < elapsed
            assert stage["replays"] == stage["replay_device_seconds"] == 0  # no CUDA graphs
            assert stage["armed_steps"] == stage["armed_cancelled"] == 0
    finally:
        tiny.process.stop()

"""The OpenAI API as clients see it: the official client, curl, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai import OpenAI

from gateway.text import ChatFormat
from tests.cluster import Cluster
from tests.test_parity import reference_ids

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture()
def client(cluster: Cluster) -> OpenAI:
    return OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", timeout=120, max_retries=0)


def test_non_streaming(client: OpenAI, cluster: Cluster) -> None:
    answer = client.chat.completions.create(
        model=cluster.model, messages=QUESTION, max_tokens=12, temperature=0
    )
    choice = answer.choices[0]
    assert answer.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = answer.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 < usage.completion_tokens <= 12


def test_streaming_with_usage(client: OpenAI, cluster: Cluster) -> None:
    stream = client.chat.completions.create(
        model=cluster.model,
        messages=QUESTION,
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(
        model=cluster.model, messages=QUESTION, max_tokens=5, temperature=0
    )
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_models(client: OpenAI, cluster: Cluster) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [cluster.model]


def test_curl_streaming(cluster: Cluster) -> None:
    body = json.dumps(
        {
            "model": cluster.model,
            "messages": QUESTION,
            "stream": True,
            "temperature": 0,
            "max_tokens": 16,
        }
    )
    result = subprocess.run(
        [
            "curl",
            "-sN",
            f"{cluster.url}/v1/chat/completions",
            "-H",
            "content-type: application/json",
            "-d",
            body,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    events = [
        line[len("data: ") :] for line in result.stdout.splitlines() if line.startswith("data: ")
    ]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert "Paris" in text


def test_stop_sequence(client: OpenAI, cluster: Cluster) -> None:
    full = (
        client.chat.completions.create(
            model=cluster.model, messages=QUESTION, max_tokens=12, temperature=0
        )
        .choices[0]
        .message.content
    )
    assert " is " in full
    cut = client.chat.completions.create(
        model=cluster.model, messages=QUESTION, max_tokens=12, temperature=0, stop=[" is", "zzz"]
    )
    assert cut.choices[0].message.content == full[: full.index(" is")]
    assert cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client: OpenAI, cluster: Cluster) -> None:
    def sample(seed: int) -> str:
        return (
            client.chat.completions.create(
                model=cluster.model,
                messages=QUESTION,
                max_tokens=10,
                temperature=1.0,
                top_p=0.95,
                seed=seed,
            )
            .choices[0]
            .message.content
        )

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in (1, 2, 3)}) > 1


def post(cluster: Cluster, body: object, raw: bytes | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(
        f"{cluster.url}/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
        timeout=60,
    )


BAD_REQUESTS = [
    ("malformed json", None, b'{"model": ', 400, None),
    ("nested too deeply", None, b"[" * 100_000 + b"]" * 100_000, 400, None),
    (
        "unpaired surrogate",
        None,
        b'{"model": "m", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
        400,
        None,
    ),
    ("not an object", [1, 2], None, 400, None),
    ("no messages", {"model": "M"}, None, 400, "messages"),
    ("empty messages", {"model": "M", "messages": []}, None, 400, "messages"),
    (
        "bad role",
        {"model": "M", "messages": [{"role": "robot", "content": "x"}]},
        None,
        400,
        "messages.0.role",
    ),
    ("message not an object", {"model": "M", "messages": ["hi"]}, None, 400, "messages.0"),
    (
        "user content null",
        {"model": "M", "messages": [{"role": "user", "content": None}]},
        None,
        400,
        "messages.0",
    ),
    (
        "image content part",
        {
            "model": "M",
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ],
        },
        None,
        400,
        "messages.0.content",
    ),
    (
        "max_tokens 0",
        {"model": "M", "messages": QUESTION, "max_tokens": 0},
        None,
        400,
        "max_tokens",
    ),
    (
        "max_tokens negative",
        {"model": "M", "messages": QUESTION, "max_tokens": -5},
        None,
        400,
        "max_tokens",
    ),
    (
        "temperature < 0",
        {"model": "M", "messages": QUESTION, "temperature": -0.1},
        None,
        400,
        "temperature",
    ),
    (
        "temperature > 2",
        {"model": "M", "messages": QUESTION, "temperature": 2.5},
        None,
        400,
        "temperature",
    ),
    ("top_p 0", {"model": "M", "messages": QUESTION, "top_p": 0}, None, 400, "top_p"),
    (
        "max_tokens a string",
        {"model": "M", "messages": QUESTION, "max_tokens": "3"},
        None,
        400,
        "max_tokens",
    ),
    ("stream a string", {"model": "M", "messages": QUESTION, "stream": "yes"}, None, 400, "stream"),
    ("top_p > 1", {"model": "M", "messages": QUESTION, "top_p": 1.5}, None, 400, "top_p"),
    ("unknown model", {"model": "gpt-9", "messages": QUESTION}, None, 404, "model"),
    (
        "tools",
        {"model": "M", "messages": QUESTION, "tools": [{"type": "function", "function": {}}]},
        None,
        400,
        "tools",
    ),
    (
        "json mode",
        {"model": "M", "messages": QUESTION, "response_format": {"type": "json_object"}},
        None,
        400,
        "response_format",
    ),
    (
        "presence penalty over 2",
        {"model": "M", "messages": QUESTION, "presence_penalty": 2.5},
        None,
        400,
        "presence_penalty",
    ),
    (
        "top_logprobs without logprobs",
        {"model": "M", "messages": QUESTION, "top_logprobs": 2},
        None,
        400,
        "top_logprobs",
    ),
    (
        "top_logprobs over 20",
        {"model": "M", "messages": QUESTION, "logprobs": True, "top_logprobs": 21},
        None,
        400,
        "top_logprobs",
    ),
    (
        "context exceeded",
        {"model": "M", "messages": QUESTION, "max_tokens": 100000},
        None,
        400,
        "max_tokens",
    ),
    (
        "prompt too long",
        {"model": "M", "messages": [{"role": "user", "content": "word " * 5000}]},
        None,
        400,
        "messages",
    ),
]


@pytest.mark.parametrize(
    ("name", "body", "raw", "status", "param"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_request(cluster: Cluster, name, body, raw, status, param) -> None:
    if isinstance(body, dict) and body.get("model") == "M":
        body = body | {"model": cluster.model}
    response = post(cluster, body, raw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    if status == 404:
        assert error["code"] == "model_not_found"
    if name.startswith(("context", "prompt")):
        assert error["code"] == "context_length_exceeded"
    if name == "image content part":
        assert "'image_url' are not supported" in error["message"], error
    good = post(cluster, {"model": cluster.model, "messages": QUESTION, "max_tokens": 2})
    assert good.status_code == 200, good.text


def test_openai_client_sees_error_objects(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="nope", messages=QUESTION)
    assert raised.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="nope", messages=[])


def test_unknown_route_and_method(cluster: Cluster) -> None:
    missing = httpx.get(f"{cluster.url}/v1/nothing", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    # a POST the console's static files would have refused with 405
    unserved = httpx.post(f"{cluster.url}/v1/embeddings", json={"input": "x"}, timeout=10)
    assert unserved.status_code == 404 and unserved.json()["error"]["code"] == "not_found"
    wrong = httpx.get(f"{cluster.url}/v1/chat/completions", timeout=10)
    assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "invalid_request_error"


def test_an_unexpected_error_is_an_error_object() -> None:
    """A route that fails for a reason no check foresaw answers 500 with an OpenAI error
    object, through the gateway's own exception handlers."""
    from starlette.applications import Starlette
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from gateway.app import EXCEPTION_HANDLERS

    async def failing(request: object) -> None:
        raise RuntimeError("unforeseen")

    app = Starlette(routes=[Route("/x", failing)], exception_handlers=EXCEPTION_HANDLERS)
    response = TestClient(app, raise_server_exceptions=False).get("/x")
    assert response.status_code == 500
    assert response.json()["error"] == {
        "message": "internal error: RuntimeError",
        "type": "server_error",
        "param": None,
        "code": None,
    }


def test_body_over_the_limit_is_refused(cluster: Cluster) -> None:
    """413 for a body over MAX_BODY_BYTES, declared (refused before it is read) or chunked
    without a length (cut off at the limit); the gateway then serves the next request."""
    from gateway.app import MAX_BODY_BYTES

    text = b"a" * (MAX_BODY_BYTES + 1)
    body = b'{"model": "m", "messages": [{"role": "user", "content": "' + text + b'"}]}'
    declared = post(cluster, None, body)

    def chunks():
        for start in range(0, len(body), 1 << 20):
            yield body[start : start + (1 << 20)]

    chunked = httpx.post(
        f"{cluster.url}/v1/chat/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "request_too_large"
    good = post(cluster, {"model": cluster.model, "messages": QUESTION, "max_tokens": 2})
    assert good.status_code == 200, good.text


def test_status_and_health(cluster: Cluster) -> None:
    assert httpx.get(f"{cluster.url}/health", timeout=10).json() == {"status": "ok", "ready": True}
    status = cluster.status()
    stages = status["stages"]
    assert [s["layers"] for s in stages] == [[0, 19], [19, 30]]  # the head weighs 8 layers
    for stage in stages:
        assert stage["pid"] > 0 and stage["device"] == "cpu" and stage["dtype"] == "float32"
        assert stage["address"].startswith("127.0.0.1:")
    assert status["join_token"].startswith("mp1-")


def test_sampling_defaults_come_from_the_model(default_model) -> None:
    """Fields a request leaves out take the model's generation_config values (else OpenAI's)."""
    import json as json_module

    from gateway.server import sampling_defaults

    config = json_module.loads((default_model / "generation_config.json").read_text())
    expected = {key: config[key] for key in ("temperature", "top_p", "top_k") if key in config}
    assert sampling_defaults(default_model) == expected
    if not os.environ.get("MESHPIPE_TEST_MODEL_DIR"):  # freshly pulled: the catalog's defaults
        assert expected == {"temperature": 0.2, "top_p": 0.9}


# -- the legacy text completion and the model object ------------------------------------------

PROMPT = "The capital of France is"


def test_text_completion_equals_transformers(
    client: OpenAI, cluster: Cluster, default_model
) -> None:
    """A text completion continues the prompt as it is (no chat template): greedy, it is
    transformers' greedy continuation of the same tokens; token ids give the same answer."""
    ids = ChatFormat(default_model).tokenizer.encode(PROMPT).ids
    expected, count = reference_ids(default_model, ids, 12)
    answer = client.completions.create(
        model=cluster.model, prompt=PROMPT, max_tokens=12, temperature=0
    )
    assert answer.object == "text_completion" and answer.id.startswith("cmpl-")
    assert answer.choices[0].text == expected
    assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == count
    by_ids = client.completions.create(
        model=cluster.model, prompt=ids, max_tokens=12, temperature=0
    )
    assert by_ids.choices[0].text == expected
    echoed = client.completions.create(
        model=cluster.model, prompt=[PROMPT], max_tokens=12, temperature=0, echo=True
    )
    assert echoed.choices[0].text == PROMPT + expected
    default = client.completions.create(model=cluster.model, prompt=PROMPT, temperature=0)
    assert default.usage.completion_tokens <= 16  # OpenAI's default max_tokens for completions


def test_text_completion_streaming(client: OpenAI, cluster: Cluster) -> None:
    stream = client.completions.create(
        model=cluster.model,
        prompt=PROMPT,
        max_tokens=6,
        temperature=0,
        stream=True,
        echo=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(chunk.object == "text_completion" for chunk in chunks)
    assert chunks[0].choices[0].text == PROMPT  # the echo comes first
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    whole = client.completions.create(
        model=cluster.model, prompt=PROMPT, max_tokens=6, temperature=0, echo=True
    )
    assert text == whole.choices[0].text


BAD_COMPLETIONS = [
    ("no prompt", {"model": "M"}, 400, "prompt"),
    ("two prompts", {"model": "M", "prompt": ["a", "b"]}, 400, "prompt"),
    ("empty prompt", {"model": "M", "prompt": ""}, 400, "prompt"),
    ("prompt not text or ids", {"model": "M", "prompt": [1, "a"]}, 400, "prompt"),
    ("token id out of range", {"model": "M", "prompt": [1, 10**9]}, 400, "prompt"),
    ("negative token id", {"model": "M", "prompt": [-1]}, 400, "prompt"),
    ("logprobs over 5", {"model": "M", "prompt": PROMPT, "logprobs": 6}, 400, "logprobs"),
    (
        "logprobs of an echoed prompt",
        {"model": "M", "prompt": PROMPT, "echo": True, "logprobs": 1},
        400,
        "logprobs",
    ),
    ("suffix", {"model": "M", "prompt": PROMPT, "suffix": "end"}, 400, "suffix"),
    ("max_tokens 0", {"model": "M", "prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ("n over 8", {"model": "M", "prompt": PROMPT, "n": 9}, 400, "n"),
    ("context exceeded", {"model": "M", "prompt": PROMPT, "max_tokens": 10**5}, 400, "max_tokens"),
    ("unknown model", {"model": "gpt-9", "prompt": PROMPT}, 404, "model"),
]


@pytest.mark.parametrize(
    ("name", "body", "status", "param"), BAD_COMPLETIONS, ids=[b[0] for b in BAD_COMPLETIONS]
)
def test_bad_text_completion(cluster: Cluster, name, body, status, param) -> None:
    url = f"{cluster.url}/v1/completions"
    if body.get("model") == "M":
        body = body | {"model": cluster.model}
    response = httpx.post(url, json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if name.startswith("context"):
        assert error["code"] == "context_length_exceeded"
    good = httpx.post(
        url, json={"model": cluster.model, "prompt": PROMPT, "max_tokens": 2}, timeout=60
    )
    assert good.status_code == 200, good.text


def test_model_object(client: OpenAI, cluster: Cluster) -> None:
    model = client.models.retrieve(cluster.model)
    assert model.id == cluster.model and model.object == "model"
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("gpt-9")
    assert raised.value.body["code"] == "model_not_found"


# -- log-probabilities -------------------------------------------------------------------------


def hf_greedy_logprobs(model_dir, prompt: list[int], count: int) -> Iterator[tuple[int, float]]:
    """transformers' greedy tokens after `prompt`, each with its log-probability."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.test_parity import _hf_model

    model = _hf_model(model_dir, AutoModelForCausalLM)
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(count):
            scores = model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
            ids.append(int(scores.argmax()))
            yield ids[-1], scores[ids[-1]].item()


def test_chat_logprobs_equal_transformers(client: OpenAI, cluster: Cluster, default_model) -> None:
    """Each token's log-probability is the model's (log-softmax of its logits): equal to
    transformers' on the same weights; greedy, the token is the likeliest of its alternatives."""
    answer = client.chat.completions.create(
        model=cluster.model,
        messages=QUESTION,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    entries = answer.choices[0].logprobs.content
    assert len(entries) == answer.usage.completion_tokens == 6
    assert "".join(entry.token for entry in entries) == answer.choices[0].message.content
    chat = ChatFormat(default_model)
    expected = list(hf_greedy_logprobs(default_model, chat.encode_chat(QUESTION), 6))
    for entry, (token, value) in zip(entries, expected, strict=True):
        assert entry.token == chat.tokenizer.decode([token])
        assert abs(entry.logprob - value) < 1e-3, (entry, value)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == entry.logprob
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    plain = client.chat.completions.create(
        model=cluster.model, messages=QUESTION, max_tokens=6, temperature=0
    )
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == answer.choices[0].message.content


def test_text_completion_logprobs_streamed(client: OpenAI, cluster: Cluster) -> None:
    stream = client.completions.create(
        model=cluster.model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2, stream=True
    )
    chunks = [chunk for chunk in stream if chunk.choices and chunk.choices[0].logprobs]
    text = "".join(chunk.choices[0].text for chunk in chunks)
    tokens = [token for chunk in chunks for token in chunk.choices[0].logprobs.tokens]
    offsets = [offset for chunk in chunks for offset in chunk.choices[0].logprobs.text_offset]
    assert len(tokens) == 5 and "".join(tokens) == text
    assert offsets == [sum(len(token) for token in tokens[:i]) for i in range(5)]
    whole = client.completions.create(
        model=cluster.model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2
    )
    logprobs = whole.choices[0].logprobs
    assert logprobs.tokens == tokens and whole.choices[0].text == text
    for token, value, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert value <= 0 and len(top) == 2 and max(top, key=top.get) == token


def test_neutral_values_of_unimplemented_fields_are_accepted(
    client: OpenAI, cluster: Cluster
) -> None:
    """What many clients send by default asks for nothing meshpipe lacks: it is served."""
    answer = client.chat.completions.create(
        model=cluster.model,
        messages=QUESTION,
        max_tokens=2,
        tools=[],
        tool_choice="none",
        response_format={"type": "text"},
        presence_penalty=0,
        frequency_penalty=0,
        logit_bias={},
        user="someone",
    )
    assert answer.choices[0].finish_reason == "length"
    # an assistant turn without content (as one that called tools is sent back) is a turn
    history = [*QUESTION, {"role": "assistant", "content": None}, *QUESTION]
    again = client.chat.completions.create(model=cluster.model, messages=history, max_tokens=2)
    assert again.choices[0].finish_reason in ("length", "stop")  # sampled: it may end at once
    assert again.usage.prompt_tokens > answer.usage.prompt_tokens  # both turns were read


# -- several choices (n) -----------------------------------------------------------------------


def test_several_choices(client: OpenAI, cluster: Cluster) -> None:
    """Choice i of a seeded request is the request with seed + i alone; usage adds them up."""
    sampled = {"temperature": 1.0, "seed": 7, "max_tokens": 8}
    many = client.chat.completions.create(model=cluster.model, messages=QUESTION, n=3, **sampled)
    assert [choice.index for choice in many.choices] == [0, 1, 2]
    alone = [
        client.chat.completions.create(
            model=cluster.model, messages=QUESTION, **(sampled | {"seed": 7 + index})
        )
        for index in range(3)
    ]
    assert [c.message.content for c in many.choices] == [
        a.choices[0].message.content for a in alone
    ]
    assert many.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert many.usage.prompt_tokens == alone[0].usage.prompt_tokens
    greedy = client.completions.create(
        model=cluster.model, prompt=PROMPT, n=2, max_tokens=6, temperature=0
    )
    single = client.completions.create(
        model=cluster.model, prompt=PROMPT, max_tokens=6, temperature=0
    )
    assert [c.text for c in greedy.choices] == [single.choices[0].text] * 2


def test_several_choices_streamed_and_left(client: OpenAI, cluster: Cluster) -> None:
    stream = client.chat.completions.create(
        model=cluster.model,
        messages=QUESTION,
        n=2,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finals, chunks = ["", ""], [], list(stream)
    for chunk in chunks[:-1]:
        choice = chunk.choices[0]
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finals.append(choice.index)
    whole = client.chat.completions.create(
        model=cluster.model, messages=QUESTION, max_tokens=6, temperature=0
    )
    assert texts == [whole.choices[0].message.content] * 2
    assert sorted(finals) == [0, 1]
    assert chunks[-1].usage.completion_tokens == 2 * whole.usage.completion_tokens
    # a client that leaves mid-stream frees both choices' slots
    body = {"model": cluster.model, "messages": QUESTION, "n": 2, "max_tokens": 400, "stream": True}
    with httpx.stream(
        "POST", f"{cluster.url}/v1/chat/completions", json=body, timeout=60
    ) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if '"content":"' in line and '"content":""' not in line)
        assert cluster.status()["engine"]["slots_used"] == 2, first
    left = time.monotonic()
    while cluster.status()["engine"]["slots_used"]:
        assert time.monotonic() - left < 2.0, cluster.status()["engine"]
        time.sleep(0.05)


# -- presence and frequency penalties ----------------------------------------------------------

REPEAT = "cat cat cat cat cat cat cat cat"


def hf_penalized(model_dir, prompt: list[int], count: int, presence: float, frequency: float):
    """transformers' greedy answer with OpenAI's penalties applied to the logits."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Penalties(LogitsProcessor):
        def __call__(self, input_ids, scores):
            for row, ids in enumerate(input_ids[:, len(prompt) :]):
                tokens, counts = ids.unique(return_counts=True)
                scores[row, tokens] -= frequency * counts.to(scores.dtype) + presence
            return scores

    return reference_ids(model_dir, prompt, count, LogitsProcessorList([Penalties()]))[0]


def test_penalties_equal_transformers(client: OpenAI, cluster: Cluster, default_model) -> None:
    """Greedy with presence and frequency penalties is transformers' greedy with the same
    penalties on the logits, and differs from greedy without them on a repetitive text."""
    chat = ChatFormat(default_model)
    prompt = chat.tokenizer.encode(REPEAT).ids
    plain = client.completions.create(
        model=cluster.model, prompt=REPEAT, max_tokens=12, temperature=0
    )
    penalized = client.completions.create(
        model=cluster.model,
        prompt=REPEAT,
        max_tokens=12,
        temperature=0,
        presence_penalty=0.5,
        frequency_penalty=1.0,
    )
    expected = hf_penalized(default_model, prompt, penalized.usage.completion_tokens, 0.5, 1.0)
    assert penalized.choices[0].text == expected
    assert penalized.choices[0].text != plain.choices[0].text, plain.choices[0].text

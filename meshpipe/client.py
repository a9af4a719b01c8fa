"""A running gateway, seen over HTTP: what the operator's commands ask of it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:9337"
TIMEOUT = httpx.Timeout(10.0)
# A streamed answer may pause for a long prefill before its first token.
STREAM_TIMEOUT = httpx.Timeout(10.0, read=600.0)


class GatewayError(Exception):
    """The gateway could not be reached, or answered with an error."""


class GatewayUnreachable(GatewayError):
    """Nothing answers HTTP at the gateway's URL."""


class GatewayClient:
    """The gateway's management and chat API."""

    def __init__(self, url: str = DEFAULT_URL) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=TIMEOUT)

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.http.close()

    def get(self, path: str, **params: Any) -> Any:
        """GET a JSON document; GatewayError when unreachable or not 200."""
        try:
            response = self.http.get(path, params=params)
        except httpx.TransportError as error:
            raise self._unreachable(error) from None
        if response.status_code != 200:
            raise GatewayError(f"GET {path}: {_error_message(response.status_code, response.text)}")
        return response.json()

    def _unreachable(self, error: Exception) -> GatewayUnreachable:
        return GatewayUnreachable(
            f"no gateway answers at {self.url} ({error or type(error).__name__}); start one with "
            "`meshpipe auto` or `meshpipe gateway`, or pass --url"
        )

    def status(self) -> dict[str, Any]:
        return self.get("/api/status")

    def ledger(self, limit: int) -> dict[str, Any]:
        return self.get("/api/ledger", limit=limit)

    def models(self) -> list[str]:
        return [model["id"] for model in self.get("/v1/models")["data"]]

    def stream_chat(self, body: dict[str, Any]) -> Iterator[str]:
        """POST a streaming chat completion; yields the text of each chunk as it arrives."""
        body = body | {"stream": True}
        try:
            with self.http.stream(
                "POST", "/v1/chat/completions", json=body, timeout=STREAM_TIMEOUT
            ) as response:
                if response.status_code != 200:
                    text = response.read().decode(errors="replace")
                    raise GatewayError(_error_message(response.status_code, text))
                yield from _chunk_texts(response.iter_lines())
        except httpx.TransportError as error:
            raise self._unreachable(error) from None


def _chunk_texts(lines: Iterator[str]) -> Iterator[str]:
    """The content deltas of an OpenAI chat-completion SSE stream."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        chunk = json.loads(payload)
        if "error" in chunk:
            raise GatewayError(chunk["error"].get("message", "the gateway reported an error"))
        for choice in chunk.get("choices", []):
            text = choice.get("delta", {}).get("content")
            if text:
                yield text


def _error_message(status: int, text: str) -> str:
    """The message of an OpenAI error object, or the raw body."""
    try:
        return f"{status}: {json.loads(text)['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{status}: {text.strip()[:200]}"

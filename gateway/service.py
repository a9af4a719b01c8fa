"""Chat completions: request -> prompt -> engine -> OpenAI response objects or stream chunks."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from gateway.engine import Delta, Engine, GenerationParams, Sequence
from gateway.errors import ContextTooLong
from gateway.protocol import ChatCompletionRequest


@dataclass
class Completion:
    """A request accepted by the engine, with what its responses need."""

    completion_id: str
    model: str
    created: int
    sequence: Sequence
    include_usage: bool

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }

    def usage(self) -> dict[str, int]:
        prompt, completion = len(self.sequence.prompt), len(self.sequence.generated)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


class ChatService:
    """Serves one model name through one engine."""

    def __init__(
        self, model_name: str, engine: Engine, defaults: dict[str, float] | None = None
    ) -> None:
        self.model_name = model_name
        self.engine = engine
        # Sampling defaults for fields a request leaves out: the model's generation_config,
        # else OpenAI's (temperature 1, top_p 1).
        self.defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0} | (defaults or {})

    def start(self, request: ChatCompletionRequest) -> Completion:
        """Validate against the model and context, then queue in the engine."""
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        prompt = self.engine.chat.encode_chat(messages)
        context = self.engine.settings.max_seq_len
        room = context - len(prompt)
        limit = request.token_limit()
        if room <= 0 or (limit is not None and limit > room):
            wanted = len(prompt) + (limit or 1)
            raise ContextTooLong(
                f"This model's maximum context length is {context} tokens; the request needs "
                f"{wanted} ({len(prompt)} in the messages, {limit or 1} to generate)",
                "max_tokens" if limit is not None and room > 0 else "messages",
            )
        params = GenerationParams(
            max_tokens=limit or room,
            temperature=self._field(request.temperature, "temperature"),
            top_p=self._field(request.top_p, "top_p"),
            top_k=int(self._field(request.top_k, "top_k")),
            seed=random.getrandbits(62) if request.seed is None else request.seed,
            stops=tuple(request.stop_sequences()),
        )
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        sequence = self.engine.submit(completion_id, prompt, params)
        return Completion(
            completion_id, request.model, int(time.time()), sequence, request.include_usage()
        )

    def _field(self, value: float | None, name: str) -> float:
        return self.defaults[name] if value is None else value

    async def deltas(self, completion: Completion) -> AsyncIterator[Delta]:
        """The engine's deltas until the sequence finishes; cancels it if the caller leaves."""
        sequence = completion.sequence
        try:
            while True:
                delta = await sequence.events.get()
                yield delta
                if delta.finish_reason is not None or delta.error is not None:
                    return
        finally:
            if not sequence.finished:
                self.engine.cancel(sequence)

    async def stream(self, completion: Completion) -> AsyncIterator[dict[str, Any]]:
        """OpenAI chunks: the role first, then content, then the finish reason (and usage)."""
        yield completion.chunk({"role": "assistant", "content": ""})
        async for delta in self.deltas(completion):
            if delta.error is not None:
                yield delta.error.body()
                return
            if delta.text:
                yield completion.chunk({"content": delta.text})
            if delta.finish_reason is not None:
                final = completion.chunk({}, delta.finish_reason)
                final["usage"] = None
                if completion.include_usage:
                    yield final
                    usage = completion.chunk({})
                    usage["choices"] = []
                    usage["usage"] = completion.usage()
                    yield usage
                else:
                    del final["usage"]
                    yield final

    async def complete(self, completion: Completion) -> dict[str, Any]:
        """The whole answer as one chat.completion object."""
        parts, finish_reason = [], None
        async for delta in self.deltas(completion):
            if delta.error is not None:
                raise delta.error
            parts.append(delta.text)
            finish_reason = delta.finish_reason
        return {
            "id": completion.completion_id,
            "object": "chat.completion",
            "created": completion.created,
            "model": completion.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(parts), "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": completion.usage(),
        }

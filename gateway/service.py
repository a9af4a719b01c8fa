"""Completions: request -> prompt -> engine -> OpenAI response objects or stream chunks.

Chat completions render their messages through the model's chat template; text completions
(the legacy `/v1/completions`) continue their prompt as it is. Both share the engine, the
sampling fields and the streaming; only the objects' shapes differ."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.engine import Delta, Engine, GenerationParams, Sequence, TokenLogprob
from gateway.errors import ContextTooLong, InvalidRequest
from gateway.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest


@dataclass
class Completion:
    """A request accepted by the engine, with what its responses need: one sequence per choice."""

    completion_id: str
    model: str
    created: int
    sequences: list[Sequence]
    include_usage: bool
    chat: bool = True
    """A chat completion; else a text completion."""
    echo: str = ""
    """The prompt's text, which a text completion with `echo` puts before its answer."""
    emitted: list[int] = field(default_factory=list)
    """Characters of text sent so far, per choice (a text completion's `text_offset`)."""

    def chunk(self, index: int, text: str | None, finish_reason: str | None = None) -> dict:
        """A stream chunk of choice `index` carrying `text` (None: none, as in the final one)."""
        if self.chat:
            choice = {"index": index, "delta": {} if text is None else {"content": text}}
        else:
            choice = {"index": index, "text": text or ""}
        return {
            "id": self.completion_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [choice | {"logprobs": None, "finish_reason": finish_reason}],
        }

    def usage(self) -> dict[str, int]:
        prompt = len(self.sequences[0].prompt)
        completion = sum(len(sequence.generated) for sequence in self.sequences)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


class ChatService:
    """Serves one model name through one engine."""

    def __init__(
        self,
        model_name: str,
        engine: Engine,
        defaults: dict[str, float] | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.model_name = model_name
        self.engine = engine
        # Sampling defaults for fields a request leaves out: the model's generation_config,
        # else OpenAI's (temperature 1, top_p 1).
        self.defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0} | (defaults or {})
        self.vocab_size = vocab_size or engine.chat.tokenizer.get_vocab_size()

    def start(self, request: ChatCompletionRequest) -> Completion:
        """Validate against the model and context, then queue in the engine."""
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        prompt = self.engine.chat.encode_chat(messages)
        return self._submit(request, prompt, "messages", f"chatcmpl-{uuid.uuid4().hex[:24]}")

    def start_text(self, request: CompletionRequest) -> Completion:
        """A text completion: the prompt's tokens (or the ids given) continued as they are."""
        if isinstance(request.prompt, str):
            prompt = self.engine.chat.tokenizer.encode(request.prompt).ids
        else:
            prompt = request.prompt
            if not all(0 <= token < self.vocab_size for token in prompt):
                raise InvalidRequest(f"token ids must lie in [0, {self.vocab_size})", "prompt")
        if not prompt:
            raise InvalidRequest("the prompt has no tokens", "prompt")
        completion = self._submit(request, prompt, "prompt", f"cmpl-{uuid.uuid4().hex[:24]}")
        completion.chat = False
        if request.echo:
            text = request.prompt
            completion.echo = text if isinstance(text, str) else self.engine.chat.decode(text)
        return completion

    def _submit(
        self, request: SamplingRequest, prompt: list[int], field: str, completion_id: str
    ) -> Completion:
        context = self.engine.settings.max_seq_len
        room = context - len(prompt)
        limit = request.token_limit()
        if room <= 0 or (limit is not None and limit > room):
            wanted = len(prompt) + (limit or 1)
            raise ContextTooLong(
                f"This model's maximum context length is {context} tokens; the request needs "
                f"{wanted} ({len(prompt)} in the {field}, {limit or 1} to generate)",
                "max_tokens" if limit is not None and room > 0 else field,
            )
        params = GenerationParams(
            max_tokens=limit or room,
            temperature=self._field(request.temperature, "temperature"),
            top_p=self._field(request.top_p, "top_p"),
            top_k=int(self._field(request.top_k, "top_k")),
            seed=random.getrandbits(62) if request.seed is None else request.seed,
            stops=tuple(request.stop_sequences()),
            logprobs=request.logprob_count(),
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
        )
        # Choices differ by seed (a seeded request stays reproducible, choice by choice).
        choices = [replace(params, seed=params.seed + index) for index in range(request.n or 1)]
        sequences = self.engine.submit_all(completion_id, prompt, choices)
        return Completion(
            completion_id, request.model, int(time.time()), sequences, request.include_usage()
        )

    def _field(self, value: float | None, name: str) -> float:
        return self.defaults[name] if value is None else value

    async def deltas(self, completion: Completion) -> AsyncIterator[tuple[int, Delta]]:
        """(choice, delta) from the engine until every choice has finished, or one failed;
        whatever is unfinished is cancelled when the caller leaves (a client disconnect)."""
        merged: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()

        async def forward(index: int, sequence: Sequence) -> None:
            while True:
                delta = await sequence.events.get()
                merged.put_nowait((index, delta))
                if delta.finish_reason is not None or delta.error is not None:
                    return

        sequences = completion.sequences
        tasks = [asyncio.create_task(forward(i, s)) for i, s in enumerate(sequences)]
        try:
            running = len(sequences)
            while running:
                index, delta = await merged.get()
                yield index, delta
                if delta.error is not None:
                    return
                running -= delta.finish_reason is not None
        finally:
            for task in tasks:
                task.cancel()
            for sequence in sequences:
                if not sequence.finished:
                    self.engine.cancel(sequence)

    async def stream(self, completion: Completion) -> AsyncIterator[dict[str, Any]]:
        """OpenAI chunks: each choice's role first (chat) or its echoed prompt (text, with
        `echo`), then the text as it comes (with each token's log-probabilities, if asked),
        then each choice's finish reason, and at the end the usage if asked."""
        choices = range(len(completion.sequences))
        completion.emitted = [len(completion.echo)] * len(choices)
        for index in choices:
            if completion.chat:
                first = completion.chunk(index, "")
                first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                yield first
            elif completion.echo:
                yield completion.chunk(index, completion.echo)
        async for index, delta in self.deltas(completion):
            if delta.error is not None:
                yield delta.error.body()
                return
            if delta.text or delta.logprob:
                chunk = completion.chunk(index, delta.text)
                if delta.logprob:
                    logprobs = self._logprobs(completion, index, [delta])
                    chunk["choices"][0]["logprobs"] = logprobs
                completion.emitted[index] += len(delta.text)
                yield chunk
            if delta.finish_reason is not None:
                final = completion.chunk(index, None, delta.finish_reason)
                if completion.include_usage:
                    final["usage"] = None
                yield final
        if completion.include_usage:
            usage = completion.chunk(0, None)
            usage["choices"] = []
            usage["usage"] = completion.usage()
            yield usage

    async def complete(self, completion: Completion) -> dict[str, Any]:
        """The whole answer as one chat.completion or text_completion object."""
        deltas: list[list[Delta]] = [[] for _ in completion.sequences]
        async for index, delta in self.deltas(completion):
            if delta.error is not None:
                raise delta.error
            deltas[index].append(delta)
        completion.emitted = [len(completion.echo)] * len(deltas)
        choices = [self._choice(completion, index, part) for index, part in enumerate(deltas)]
        return {
            "id": completion.completion_id,
            "object": "chat.completion" if completion.chat else "text_completion",
            "created": completion.created,
            "model": completion.model,
            "system_fingerprint": None,
            "choices": choices,
            "usage": completion.usage(),
        }

    def _choice(self, completion: Completion, index: int, deltas: list[Delta]) -> dict:
        text = "".join(delta.text for delta in deltas)
        if completion.chat:
            body = {"message": {"role": "assistant", "content": text, "refusal": None}}
        else:
            body = {"text": completion.echo + text}
        logprobs = None
        if completion.sequences[index].params.logprobs is not None:
            logprobs = self._logprobs(completion, index, deltas)
        finish_reason = deltas[-1].finish_reason
        return {"index": index} | body | {"logprobs": logprobs, "finish_reason": finish_reason}

    # -- log-probabilities -----------------------------------------------------------------

    def _logprobs(self, completion: Completion, index: int, deltas: list[Delta]) -> dict:
        """The `logprobs` of a choice for these deltas' tokens, in the shape of its endpoint:
        chat's `content` entries, or the text completion's parallel lists."""
        pairs = [(delta, delta.logprob) for delta in deltas if delta.logprob is not None]
        if completion.chat:
            return {"content": [self._chat_entry(logprob) for _, logprob in pairs], "refusal": None}
        tokens, offsets, offset = [], [], completion.emitted[index]
        for delta, logprob in pairs:
            tokens.append(self._token_text(logprob.token))
            offsets.append(offset)
            offset += len(delta.text)
        return {
            "tokens": tokens,
            "token_logprobs": [logprob.logprob for _, logprob in pairs],
            "top_logprobs": [
                {self._token_text(token): value for token, value in logprob.top}
                for _, logprob in pairs
            ],
            "text_offset": offsets,
        }

    def _chat_entry(self, logprob: TokenLogprob) -> dict[str, Any]:
        def entry(token: int, value: float) -> dict[str, Any]:
            text = self._token_text(token)
            return {"token": text, "logprob": value, "bytes": list(text.encode())}

        top = [entry(token, value) for token, value in logprob.top]
        return entry(logprob.token, logprob.logprob) | {"top_logprobs": top}

    def _token_text(self, token: int) -> str:
        return self.engine.chat.tokenizer.decode([token], skip_special_tokens=False)

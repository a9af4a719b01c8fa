"""The step scheduler: continuous batching with chunked prefill over a pipeline of stages.

Each running sequence owns a KV slot (the same slot index on every stage). A sequence's tokens
are `prompt + generated`; `computed` of them are in the KV cache. Whatever is not computed yet
is its next input: a prompt chunk while prefilling, the last sampled token while decoding, or
the whole history again after a failover. A micro-batch samples a token for every sequence
whose input reaches its end.

Up to `max_in_flight` micro-batches (lanes) are inside the pipeline at once (one per stage by
default), so all stages compute at the same time.

The token loop: where the last stage reaches the first, each lane's next step is sent as soon as
the lane's batch leaves, and waits at the first stage (`after`) for that batch's sampled tokens,
which the last stage sends there straight away (`fed` says which inputs they fill). The gateway
is then off the path from one token to the next. A sequence is in at most two batches: one in
the pipeline and its next step waiting behind it. What the gateway learns only from a token
(an end-of-sequence token, a stop string) may find the sequence in a step already sent: that
step's token is dropped and the slot freed after it, as for a sequence cancelled meanwhile.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gateway.errors import APIError, GenerationFailed, Overloaded, Unavailable
from gateway.metrics import Metrics
from gateway.text import ChatFormat, Detokenizer, StopMatcher
from meshpipe.wire import Frame, Kind

SEED_MULTIPLIER = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class EngineSettings:
    """Sizes of the serving engine."""

    num_slots: int = 8
    max_seq_len: int = 2048
    max_batch_tokens: int = 256
    max_waiting: int = 64
    max_in_flight: int = 2
    token_loop: bool = True  # where the pipeline has the last stage's link to the first


@dataclass(frozen=True)
class GenerationParams:
    """Per-request sampling and stopping."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stops: tuple[str, ...] = ()
    logprobs: int | None = None
    """None: no log-probabilities; else each token's, and this many likeliest alternatives."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(frozen=True)
class Delta:
    """What a stream receives: new text, and at the end a finish reason or an error."""

    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    error: APIError | None = None
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability, and the likeliest tokens' (id, log-probability)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    @classmethod
    def from_wire(cls, token: int, value: Any) -> TokenLogprob | None:
        """From a TOKENS frame's `[logprob, [[id, logprob], ...]]`; None if malformed."""
        try:
            chosen, top = value
            return cls(token, float(chosen), tuple((int(i), float(v)) for i, v in top))
        except (TypeError, ValueError):
            return None


@dataclass(eq=False)
class Sequence:
    """One request's state inside the engine."""

    request_id: str
    prompt: list[int]
    params: GenerationParams
    detokenizer: Detokenizer
    stop: StopMatcher
    slot: int | None = None
    computed: int = 0
    generated: list[int] = field(default_factory=list)
    in_flight: int = 0  # batches holding it: one in the pipeline, and its next step behind it
    finish_reason: str | None = None
    cancelled: bool = False
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    events: asyncio.Queue[Delta] = field(default_factory=asyncio.Queue)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.generated)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def tokens(self, start: int, length: int) -> list[int]:
        """Its tokens `start` to `start + length` (prompt, then generated)."""
        end, prompted = start + length, len(self.prompt)
        generated = self.generated[max(start - prompted, 0) : max(end - prompted, 0)]
        return self.prompt[start:end] + generated

    @property
    def penalized(self) -> bool:
        return bool(self.params.presence_penalty or self.params.frequency_penalty)

    def token_seed(self, position: int) -> int:
        """A seed for the token at `position`: reproducible whatever batch computes it."""
        return (self.params.seed * SEED_MULTIPLIER + position) & ((1 << 63) - 1)


@dataclass(frozen=True)
class Entry:
    """One sequence's part in a micro-batch: positions `start` to `start + length`."""

    sequence: Sequence
    start: int
    length: int
    sampled: bool
    fed: bool = False  # its one input is the token that the batch before it samples


@dataclass
class Totals:
    """Cumulative counts since the engine started; the console turns them into rates."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    stage_tokens: dict[int, int] = field(default_factory=dict)
    stage_seconds: dict[int, float] = field(default_factory=dict)


class Pipeline:
    """What the engine needs of the mesh: send a batch to the first stage, release slots."""

    token_loop: bool = False  # the last stage feeds its tokens to the first

    def send_batch(self, frame: Frame) -> None: ...

    def release(self, slots: list[tuple[int, str]]) -> None: ...


class Engine:
    """Admission, batching and token delivery for one model."""

    def __init__(
        self, settings: EngineSettings, chat: ChatFormat, eos_ids: set[int], metrics: Metrics
    ) -> None:
        self.settings = settings
        self.chat = chat
        self.eos_ids = eos_ids
        self.metrics = metrics
        self.pipeline: Pipeline | None = None
        # False while no route through the model exists or is being built: requests get 503.
        self.available = False
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(settings.num_slots - 1, -1, -1))
        self.in_flight: dict[int, list[Entry]] = {}
        self.next_steps: dict[int, int] = {}  # batch in the pipeline -> the step waiting on it
        self.batch_ids = itertools.count(1)
        self.wakeup = asyncio.Event()
        self.on_finished: Callable[[Sequence], None] | None = None
        self.totals = Totals()

    # -- requests --------------------------------------------------------------------------

    def submit_all(
        self, request_id: str, prompt: list[int], choices: list[GenerationParams]
    ) -> list[Sequence]:
        """Queue one sequence per choice of a request, all or none: 503 without a pipeline,
        429 when they do not all fit in the queue."""
        if not self.available:
            raise Unavailable("no pipeline is serving this model right now; retry shortly")
        if len(self.waiting) + len(choices) > self.settings.max_waiting:
            raise Overloaded("the request queue is full; retry later")
        ids = (
            [request_id]
            if len(choices) == 1
            else [f"{request_id}-{i}" for i in range(len(choices))]
        )
        sequences = [
            Sequence(name, prompt, params, Detokenizer(self.chat), StopMatcher(list(params.stops)))
            for name, params in zip(ids, choices, strict=True)
        ]
        self.waiting.extend(sequences)
        self._update_gauges()
        self.wakeup.set()
        return sequences

    def cancel(self, sequence: Sequence) -> None:
        """The client went away: free the slot now, or when its batch comes back."""
        if sequence.finished:
            return
        sequence.cancelled = True
        if sequence in self.waiting:
            self.waiting.remove(sequence)
        elif not sequence.in_flight:
            self._retire(sequence)
        self._update_gauges()
        self.wakeup.set()

    # -- scheduling ------------------------------------------------------------------------

    async def run(self) -> None:
        """The scheduler loop: fill the pipeline whenever a batch slot or work appears."""
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            self.fill()

    def fill(self) -> None:
        """Start a micro-batch in every free lane; with the token loop, queue each lane's next
        step behind its batch."""
        while self.pipeline is not None and self._lanes() < self.settings.max_in_flight:
            entries = self._next_batch()
            if not entries:
                break
            self._send(entries)
        if not self.token_loop:
            return
        # the lanes' batches in the pipeline that have no next step yet
        busy = set(self.next_steps) | set(self.next_steps.values())
        for batch_id in [b for b in self.in_flight if b not in busy]:
            entries = self._next_batch(batch_id)
            if entries:
                self._send(entries, batch_id)

    @property
    def token_loop(self) -> bool:
        """Whether steps are queued behind their parents: on, and the pipeline has the loop."""
        return self.settings.token_loop and self.pipeline is not None and self.pipeline.token_loop

    def _lanes(self) -> int:
        return len(self.in_flight) - len(self.next_steps)

    def _admit(self) -> None:
        while self.waiting and self.free_slots:
            sequence = self.waiting.popleft()
            sequence.slot = self.free_slots.pop()
            self.running.append(sequence)
            self.metrics.prompt_tokens.inc(len(sequence.prompt))
            self.totals.prompt_tokens += len(sequence.prompt)
        self._update_gauges()

    def _next_batch(self, after: int | None = None) -> list[Entry]:
        """Decodes first, then prompt chunks, under the token budget; a new lane takes its share
        of the sequences ready. The next step of batch `after` continues its sequences first."""
        self._admit()
        budget, entries = self.settings.max_batch_tokens, []
        if after is not None:
            for entry in self._continuations(after):
                if entry.length <= budget:
                    entries.append(entry)
                    budget -= entry.length
        ready = [s for s in self.running if not s.in_flight and not s.finished]
        ready.sort(key=lambda s: (s.length - s.computed > 1, s.created))
        if after is None and ready:
            free_lanes = self.settings.max_in_flight - self._lanes()
            ready = ready[: math.ceil(len(ready) / free_lanes)]
        for sequence in ready:
            length = min(sequence.length - sequence.computed, budget)
            if length <= 0:
                break
            sampled = sequence.computed + length == sequence.length
            entries.append(Entry(sequence, sequence.computed, length, sampled))
            budget -= length
        return entries

    def _continuations(self, batch_id: int) -> list[Entry]:
        """The next step of each sequence in batch `batch_id` that it can take before that
        batch's tokens are known: not when the batch's token may end it by length, nor with
        penalties (their counts need that token)."""
        entries = []
        for entry in self.in_flight[batch_id]:
            sequence, start = entry.sequence, entry.start + entry.length
            if sequence.finished or sequence.penalized:
                continue
            if not entry.sampled:  # the next chunk of its prompt
                length = min(sequence.length - start, self.settings.max_batch_tokens)
                entries.append(Entry(sequence, start, length, start + length == sequence.length))
            elif (
                len(sequence.generated) + 1 < sequence.params.max_tokens
                and start + 1 < self.settings.max_seq_len
            ):
                entries.append(Entry(sequence, start, 1, True, fed=True))
        return entries

    def _send(self, entries: list[Entry], after: int | None = None) -> None:
        assert self.pipeline is not None
        batch_id = next(self.batch_ids)
        # the row of each sequence among the tokens that batch `after` samples
        sampled_rows = {}
        if after is not None:
            sampled = [e.sequence for e in self.in_flight[after] if e.sampled]
            sampled_rows = {sequence: row for row, sequence in enumerate(sampled)}
        ids: list[int] = []
        spans, sample, requests, penalties, fed = [], [], {}, [], []
        for index, entry in enumerate(entries):
            sequence = entry.sequence
            if entry.fed:
                fed.append([len(ids), sampled_rows[sequence]])
                ids.append(0)
            else:
                ids += sequence.tokens(entry.start, entry.length)
            spans.append([sequence.slot, entry.start, entry.length])
            requests[str(sequence.slot)] = sequence.request_id
            if entry.sampled:
                p = sequence.params
                seed = sequence.token_seed(entry.start + entry.length)
                logprobs = -1 if p.logprobs is None else p.logprobs
                sample.append([index, p.temperature, p.top_p, p.top_k, seed, logprobs])
                if sequence.penalized:
                    counts = Counter(sequence.generated)
                    row, pairs = len(sample) - 1, [list(pair) for pair in counts.items()]
                    penalties.append([row, p.presence_penalty, p.frequency_penalty, pairs])
            sequence.in_flight += 1
        meta = {"spans": spans, "sample": sample, "requests": requests, "timings": []}
        if penalties:
            meta["penalties"] = penalties
        if after is not None:
            meta["after"], meta["fed"] = after, fed
            self.next_steps[after] = batch_id
        self.in_flight[batch_id] = entries
        self.metrics.batches_in_flight.set(len(self.in_flight))
        self.pipeline.send_batch(Frame(Kind.BATCH, batch_id, meta, torch.tensor(ids)))

    # -- results ---------------------------------------------------------------------------

    def on_tokens(self, batch_id: int, tokens: torch.Tensor, meta: dict) -> None:
        """The last stage sampled one token per sampled entry of a batch."""
        entries = self.in_flight.pop(batch_id, None)
        if entries is None:
            return  # a batch of a pipeline that has since been replaced
        self.next_steps.pop(batch_id, None)  # the step waiting on it is in the pipeline now
        self._record_timings(meta, entries)
        sampled = iter(tokens.tolist())
        logprobs = meta.get("logprobs")
        logprobs = iter(logprobs if isinstance(logprobs, list) else [])
        accepted = []
        for entry in entries:
            sequence = entry.sequence
            sequence.in_flight -= 1
            sequence.computed = entry.start + entry.length
            # every sampled row has its token (and log-probabilities), in the batch's order
            token, logprob = (
                (next(sampled), next(logprobs, None)) if entry.sampled else (None, None)
            )
            if sequence.finished:  # ended while this was out: its token, if any, is dropped
                if not sequence.in_flight:
                    self._retire(sequence)
            elif token is not None:
                sequence.generated.append(token)
                sequence.finish_reason = self._finish_reason(sequence, token)
                if sequence.finish_reason is not None and not sequence.in_flight:
                    self._retire(sequence)  # its slot can serve the next step already
                accepted.append((sequence, token, TokenLogprob.from_wire(token, logprob)))
        self.metrics.batches_in_flight.set(len(self.in_flight))
        # The next step leaves now, before the tokens become text: the stages compute while the
        # gateway detokenizes, matches stop strings and queues SSE chunks (with 64 sequences a
        # step, that work took milliseconds of every step). A sequence that a stop string ends
        # rides in that step once more; its extra token is dropped and its slot freed after it.
        self.fill()
        for sequence, token, logprob in accepted:
            self._deliver(sequence, token, logprob)

    def _deliver(self, sequence: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        """A sampled token to its stream: metrics, text, stop strings, the end."""
        now = time.monotonic()
        if sequence.first_token_at is None:
            sequence.first_token_at = now
            self.metrics.ttft.observe(now - sequence.created)
        else:
            self.metrics.inter_token.observe(now - (sequence.last_token_at or now))
        sequence.last_token_at = now
        self.metrics.generated_tokens.inc()
        self.totals.generated_tokens += 1
        text, stopped = ("", False)
        if token not in self.eos_ids:
            text, stopped = sequence.stop.push(sequence.detokenizer.push(token))
        if stopped:
            sequence.finish_reason = "stop"
        reason = sequence.finish_reason
        if reason is None:
            sequence.events.put_nowait(Delta(text, 1, logprob=logprob))
            return
        if reason == "length":
            text += sequence.stop.flush()
        sequence.events.put_nowait(Delta(text, 1, reason, logprob=logprob))
        if sequence.slot is not None and not sequence.in_flight:  # a stop string, not scheduled
            self._retire(sequence)
            self.wakeup.set()

    def _finish_reason(self, sequence: Sequence, token: int) -> str | None:
        """An end known from the token alone (stop strings need its text: `_deliver`)."""
        if token in self.eos_ids:
            return "stop"
        if len(sequence.generated) >= sequence.params.max_tokens:
            return "length"
        if sequence.length >= self.settings.max_seq_len:
            return "length"
        return None

    def _record_timings(self, meta: dict, entries: list[Entry]) -> None:
        tokens = sum(entry.length for entry in entries)
        timings = meta.get("timings", [])
        for stage, seconds in enumerate(timings if isinstance(timings, list) else []):
            if isinstance(seconds, (int, float)):
                self.metrics.stage_step.labels(str(stage)).observe(seconds)
                self.metrics.stage_batch_tokens.labels(str(stage)).observe(tokens)
                totals = self.totals
                totals.stage_tokens[stage] = totals.stage_tokens.get(stage, 0) + tokens
                totals.stage_seconds[stage] = totals.stage_seconds.get(stage, 0.0) + seconds

    def _leave(self, sequence: Sequence) -> None:
        """A batch that held `sequence` is done with it; an ended sequence that no batch holds
        any more gives its slot back (its stream has ended already: only the slot is left)."""
        sequence.in_flight -= 1
        if sequence.finished and not sequence.in_flight:
            self._retire(sequence)

    def _retire(self, sequence: Sequence) -> None:
        """Give the sequence's slot back, here and on every stage."""
        if sequence in self.running:
            self.running.remove(sequence)
        if sequence.slot is not None:
            self.free_slots.append(sequence.slot)
            if self.pipeline is not None:
                self.pipeline.release([(sequence.slot, sequence.request_id)])
            sequence.slot = None
        reason = "cancelled" if sequence.cancelled else sequence.finish_reason or "error"
        self.metrics.requests.labels(reason).inc()
        self._update_gauges()
        if self.on_finished is not None:
            self.on_finished(sequence)

    # -- failures --------------------------------------------------------------------------

    def on_batch_failed(self, batch_id: int, message: str) -> None:
        """A stage refused or failed a batch: its sequences end with an error."""
        entries = self.in_flight.pop(batch_id, None) or []
        # The step waiting on this batch will not run: its other sequences are scheduled again.
        for entry in self.in_flight.pop(self.next_steps.pop(batch_id, 0), []):
            self._leave(entry.sequence)
        for entry in entries:
            self._leave(entry.sequence)
            if not entry.sequence.finished:
                self._fail(entry.sequence, GenerationFailed(f"a pipeline stage failed: {message}"))
        self.metrics.batches_in_flight.set(len(self.in_flight))
        self.wakeup.set()

    def on_route_lost(self) -> None:
        """A stage went away but a new route is being built: keep every sequence, and replay
        its prompt and generated tokens on the new route to rebuild its KV cache."""
        self.pipeline = None
        self.in_flight.clear()
        self.next_steps.clear()
        self.metrics.batches_in_flight.set(0)
        for sequence in list(self.running):
            sequence.in_flight = 0
            sequence.computed = 0
            if sequence.finished:  # ended while its batch was out: that batch will not return
                self._retire(sequence)

    def on_pipeline_lost(self, reason: str) -> None:
        """No route through the model any more: every running sequence ends with an error."""
        self.pipeline = None
        self.available = False
        self.in_flight.clear()
        self.next_steps.clear()
        error = Unavailable(f"the pipeline was lost: {reason}")
        for sequence in list(self.running) + list(self.waiting):
            sequence.in_flight = 0
            if sequence.finished:
                self._retire(sequence)
            else:
                self._fail(sequence, error)
        self.waiting.clear()
        self.free_slots = list(range(self.settings.num_slots - 1, -1, -1))
        self._update_gauges()

    def on_pipeline_ready(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.available = True
        self.wakeup.set()

    def _fail(self, sequence: Sequence, error: APIError) -> None:
        if sequence.finished:
            return
        sequence.finish_reason = "error"
        sequence.events.put_nowait(Delta(error=error))
        if sequence in self.waiting:
            self.waiting.remove(sequence)
        self._retire(sequence)

    def _update_gauges(self) -> None:
        self.metrics.running.set(len(self.running))
        self.metrics.waiting.set(len(self.waiting))
        self.metrics.slots_used.set(self.settings.num_slots - len(self.free_slots))

    def status(self) -> dict:
        return {
            "slots": self.settings.num_slots,
            "slots_used": self.settings.num_slots - len(self.free_slots),
            "running": [
                {
                    "id": s.request_id,
                    "prompt_tokens": len(s.prompt),
                    "generated_tokens": len(s.generated),
                    "ttft": None if s.first_token_at is None else s.first_token_at - s.created,
                }
                for s in self.running
            ],
            "waiting": len(self.waiting),
            "batches_in_flight": len(self.in_flight),
            "token_loop": self.token_loop,
        }

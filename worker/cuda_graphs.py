"""Decode steps replayed from CUDA graphs: one graph per (batch bucket, context bucket).

A decode step (every sequence adds one token) has static shapes once the batch is padded to a
bucket and attention is bounded by a context bucket, so it is captured once and replayed with
a single launch. Padding rows write their keys and values to a scratch KV slot that no request
owns. Steps with prompt chunks run eagerly.

With `compile` (the default) the captured step is first compiled by TorchInductor: the
elementwise work between the matrix products (norms, rotary, SiLU, residuals, the KV writes and
gathers) fuses into a few Triton kernels instead of dozens of small launches. Batch size and
context are dynamic (a batch of one is specialised, as torch does for sizes 0 and 1), so two
compilations serve every bucket; `warm` does both when the stage loads, not on a request.

A step can also be armed (`arm`): queued whole on the stream behind a wait for a flag in pinned
memory (worker/stream_wait.py) before its inputs have come, and started by `release` once they
have, with one store. `cancel` starts it on the scratch slot instead, so that it writes nothing
a request owns and its output is dropped.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass

import torch
import torch._inductor.config
from torch import Tensor

from meshpipe.wire import tensor_view
from worker.model import Span, Stage
from worker.sampling import greedy_tokens
from worker.stream_wait import StreamFlag, stream_flag

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTEXT_BUCKET = 256
# Buckets every CONTEXT_BUCKET tokens up to here, then each about 1.5 times the last: every
# graph is captured at load, and a 128K context needs 16 context buckets instead of 512.
FINE_CONTEXT_LIMIT = 1024
WARMUP_STEPS = 2


def context_buckets(limit: int) -> list[int]:
    """The context lengths that decode graphs are captured for, the last one `limit`."""
    buckets, end = [], CONTEXT_BUCKET
    while end < limit:
        buckets.append(end)
        grown = end + CONTEXT_BUCKET if end < FINE_CONTEXT_LIMIT else end * 3 // 2
        end = -(-grown // CONTEXT_BUCKET) * CONTEXT_BUCKET
    return [*buckets, limit]


def context_bucket(context: int, buckets: list[int]) -> int:
    """The smallest bucket that holds `context` positions (the last one if none does)."""
    return buckets[min(bisect.bisect_left(buckets, context), len(buckets) - 1)]


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    output: Tensor  # [bucket, D] hidden states, or [bucket, V] logits on the last stage
    tokens: Tensor | None  # [bucket] the greedy token of each row, on the last stage


@dataclass
class ArmedStep:
    """A decode step queued behind the stream's wait for its inputs."""

    count: int  # its rows
    bucket: int
    output: Tensor  # what `run` would return
    begun: torch.cuda.Event  # recorded behind the wait: when it was let go
    released: bool = False  # by `release`, on its inputs


class DecodeGraphs:
    """Captures and replays the decode step of one stage."""

    def __init__(self, stage: Stage, compile: bool = True) -> None:
        self.stage = stage
        self.step = self._step
        if compile:
            # Tunes the Triton kernels' launch shapes once, on first use (as gpt-fast does).
            torch._inductor.config.coordinate_descent_tuning = True
            self.step = torch.compile(self._step, fullgraph=True, dynamic=True)
        self.device = stage.inv_freq.device
        self.max_batch = max(b for b in BATCH_BUCKETS if b <= max(stage.plan.num_slots, 1) * 2)
        self.scratch_slot = stage.plan.num_slots  # allocated by allocate_cache(extra_slots=1)
        self.contexts = context_buckets(stage.plan.max_seq_len)
        # slots, positions (and token ids on the first stage) of a step: one copy to the device
        rows = 3 if stage.plan.is_first else 2
        self.indices = torch.zeros(rows, self.max_batch, dtype=torch.long, device=self.device)
        self.indices[0].fill_(self.scratch_slot)
        self.slots, self.positions = self.indices[0], self.indices[1]
        if stage.plan.is_first:
            self.inputs = self.indices[2]
        else:
            dtype = stage.layers[0].input_layernorm.weight.dtype
            shape = (self.max_batch, stage.config.hidden_size)
            self.inputs = torch.zeros(shape, dtype=dtype, device=self.device)
        self.host_indices = torch.zeros(rows, self.max_batch, dtype=torch.long).pin_memory()
        self.host_view = self.host_indices.numpy()  # written with numpy: no torch op per field
        # hidden states from the host are staged here, so that their copy is a DMA from pinned
        # memory, queued like the indices' (not a synchronous copy from the frame's bytes)
        self.host_inputs = (
            None
            if stage.plan.is_first
            else torch.empty_like(self.inputs, device="cpu").pin_memory()
        )
        # `release` writes through these views of the pinned buffers, and copies whole rows
        self.host_ids = memoryview(self.host_view[2]).cast("B") if stage.plan.is_first else None
        self.host_input_bytes = None if self.host_inputs is None else tensor_view(self.host_inputs)
        self.row_bytes = 0 if self.host_inputs is None else self.host_inputs[0].nbytes
        self.copied = torch.cuda.Event()  # the last copy out of host_indices and host_inputs
        self.flag: StreamFlag | None = None  # set by warm() where steps can be armed
        self.pool = torch.cuda.graph_pool_handle()
        self.captured: dict[tuple[int, int], CapturedStep] = {}

    @torch.inference_mode()
    def warm(self) -> None:
        """Capture every (batch bucket, context bucket) when the stage loads: the compilations
        and the captures happen here, not on a request. A graph captured on first use had
        stalled its stream for about 150 ms each time a sequence's context entered a new
        bucket (on an H200 with Llama 3 8B shapes), which a single stream of 256 tokens paid
        once in its first 256 positions and again after them."""
        started = time.perf_counter()
        for context in self.contexts:
            for bucket in BATCH_BUCKETS:
                if bucket <= self.max_batch and (bucket, context) not in self.captured:
                    self._capture(bucket, context)
        log.info(
            "captured %d decode graphs (batches up to %d, contexts up to %d) in %.1f s",
            len(self.captured),
            self.max_batch,
            self.stage.plan.max_seq_len,
            time.perf_counter() - started,
        )
        self.flag = stream_flag(self.device)

    def handles(self, spans: list[Span]) -> bool:
        return all(span.length == 1 for span in spans) and len(spans) <= self.max_batch

    def captured_for(self, spans: list[Span]) -> bool:
        """Whether a decode batch replays a graph captured already (no capture, no compile)."""
        return self.handles(spans) and self._key(spans) in self.captured

    def _key(self, spans: list[Span]) -> tuple[int, int]:
        """(batch bucket, context bucket) of a decode batch."""
        bucket = next(b for b in BATCH_BUCKETS if b >= len(spans))
        return bucket, context_bucket(max(span.start for span in spans) + 1, self.contexts)

    @torch.inference_mode()
    def run(self, inputs: Tensor, spans: list[Span], greedy: bool = False) -> Tensor:
        """The stage's output for a decode batch: hidden states, or on the last stage the
        logits (the greedy token ids with `greedy`). `inputs` may be on the host.

        The host side of a step is what a single stream waits for between stages, so it is
        kept to a few launches: the indices are written into a pinned buffer with numpy and
        copied in one transfer, hidden states through a pinned buffer of their own."""
        step, count, bucket = self._stage_indices(spans)
        if self.stage.plan.is_first:
            self.host_view[2, :count] = inputs.numpy(force=True)
        elif inputs.is_cuda:
            self.inputs[:count].copy_(inputs)
        else:
            self.host_inputs[:count].copy_(inputs)
        self._queue(step, count, bucket, inputs.is_cuda)
        return self._output(step, count, greedy)

    @torch.inference_mode()
    def arm(self, spans: list[Span], greedy: bool = False) -> ArmedStep:
        """Queue a decode step (captured already) whose inputs have not come: it waits on the
        stream for `release` or `cancel`. Until then nothing else may be queued on the stream
        (worker/stream_wait.py)."""
        assert self.flag is not None, "steps are armed only where warm() found the flag working"
        step, count, bucket = self._stage_indices(spans)
        self.flag.hold(torch.cuda.current_stream())
        begun = torch.cuda.Event(enable_timing=True)
        begun.record()
        self._queue(step, count, bucket, False)
        return ArmedStep(count, bucket, self._output(step, count, greedy), begun)

    def release(self, armed: ArmedStep, inputs: memoryview) -> None:
        """Start an armed step on `inputs`, the bytes of its token ids (int64) or hidden states
        (the stage's dtype, as `parse_batch` checked). On the path from one stage's output to
        the next stage's kernels, so without a torch call: a torch slice and copy of a row took
        10 us on the project's VM, a memoryview's copy takes a microsecond."""
        assert self.flag is not None
        if self.stage.plan.is_first:
            size, target = 8 * armed.count, self.host_ids
        else:
            size, target = self.row_bytes * armed.count, self.host_input_bytes
        assert target is not None
        if len(inputs) != size:
            raise ValueError(f"an armed step takes {armed.count} rows like its inputs'")
        target[:size] = inputs
        self.flag.release()
        armed.released = True

    def cancel(self, armed: ArmedStep) -> None:
        """Start an armed step on the scratch slot: it writes no request's cache, and its
        output is not read."""
        assert self.flag is not None
        self.host_view[0, : armed.bucket] = self.scratch_slot
        self.host_view[1:, : armed.bucket] = 0
        self.flag.release()

    def _stage_indices(self, spans: list[Span]) -> tuple[CapturedStep, int, int]:
        """The step's graph, with its slots and positions written into the pinned buffer."""
        count = len(spans)
        bucket, context = self._key(spans)
        self.copied.synchronize()  # the previous step's transfers have left the pinned buffers
        host = self.host_view
        host[:, count:bucket] = 0
        host[0, count:bucket] = self.scratch_slot
        host[0, :count] = [span.slot for span in spans]
        host[1, :count] = [span.start for span in spans]
        step = self.captured.get((bucket, context)) or self._capture(bucket, context)
        return step, count, bucket

    def _queue(self, step: CapturedStep, count: int, bucket: int, inputs_there: bool) -> None:
        """The inputs' copies and the graph, on the current stream."""
        # all of the buffer, so that the copy is one DMA that reads it when it runs: a column
        # slice is not contiguous, and torch would gather it on the host at once, before an
        # armed step's tokens are written
        self.indices.copy_(self.host_indices, non_blocking=True)
        if self.host_inputs is not None and not inputs_there:
            self.inputs[:count].copy_(self.host_inputs[:count], non_blocking=True)
        self.copied.record()
        step.graph.replay()

    def _output(self, step: CapturedStep, count: int, greedy: bool) -> Tensor:
        if greedy:
            assert step.tokens is not None, "greedy tokens come from the last stage"
            return step.tokens[:count]
        return step.output[:count]

    def _step(
        self, inputs: Tensor, slots: Tensor, positions: Tensor, context: int
    ) -> tuple[Tensor, Tensor | None]:
        step = self.stage.decode_inputs(slots, positions, context)
        output = self.stage.run(inputs, step, None)
        # the argmax in the graph: a greedy step needs no launch after the replay but the copy
        return output, greedy_tokens(output) if self.stage.plan.is_last else None

    def _capture(self, bucket: int, context: int) -> CapturedStep:
        def body() -> tuple[Tensor, Tensor | None]:
            slots, positions = self.slots[:bucket], self.positions[:bucket]
            return self.step(self.inputs[:bucket], slots, positions, context)

        # Warm up on a side stream (lazy initialisation must not be captured); the padding
        # slot receives the warm-up's writes, so no request's cache is touched.
        saved = self.slots.clone(), self.positions.clone()
        self.slots.fill_(self.scratch_slot)
        self.positions.zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output, tokens = body()
        self.slots.copy_(saved[0])
        self.positions.copy_(saved[1])
        self.captured[(bucket, context)] = CapturedStep(graph, output, tokens)
        return self.captured[(bucket, context)]

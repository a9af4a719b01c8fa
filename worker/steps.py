"""The device side of a worker's steps: the forward pass, decode steps replayed from CUDA graphs
on the event loop, the armed step, and the copies of results to the host.

A mixin of `worker.node.WorkerNode`, which decides when a step runs (its queue, the token loop,
the plans); this module is how it runs on the stage's device. It uses the node's stage, graphs
and settings, and the two facts about the node that decide whether a step may be armed: what
is on the compute thread, and what is queued.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import torch

from meshpipe import trace
from meshpipe.wire import WIRE_DTYPES, Raw, tensor_view
from worker.batch import Batch
from worker.cuda_graphs import ArmedStep, DecodeGraphs
from worker.model import Span, Stage
from worker.sampling import apply_penalties, sample, token_logprobs
from worker.stream_wait import later_stages_arm

if TYPE_CHECKING:
    from worker.node import WorkerSettings
    from worker.step_profile import StepProfile


class DeviceSteps:
    """How a stage's steps run: mixed into the worker node."""

    settings: WorkerSettings
    stage: Stage | None
    graphs: DecodeGraphs | None
    batches: asyncio.Queue
    on_thread: int  # steps or loads running on the compute thread
    step_profile: StepProfile | None
    # CUDA decode steps replayed on the event loop, and their GPU time (the inputs' copy, the
    # graph and the result's copy): the step's wall time less this is host time
    replays = 0
    replay_device_seconds = 0.0
    # On the first stage, the held step that is armed: queued on the GPU behind a wait,
    # started by its feed's arrival (worker/stream_wait.py). At most one; every other use of
    # the GPU cancels it first.
    armed: tuple[int, ArmedStep] | None = None  # (batch id, step)
    armed_steps = 0  # armed steps started by their feed (or, later on, by their batch)
    armed_cancelled = 0
    # On a later stage, the spans of the step armed ahead of its batch (the successor of the
    # step before), and of the last decode step run
    predicted: list[Span] | None = None
    last_decode: list[Span] | None = None
    _pinned: torch.Tensor | None = None  # the reused pinned buffer for results
    _pinned_bytes: memoryview | None = None  # its bytes, which a replay's result is sent from
    _replayed: tuple[torch.cuda.Event, torch.cuda.Event] | None = None  # see settle_replay

    def _arm(self, batch: Batch) -> None:
        """Queue a held decode step on the GPU now, so that its feed only has to start it:
        issuing a step took 0.33 ms of host time on the H200 machine, on the path from one
        token to the next. Only when the GPU's stream has nothing that could wait on it: no
        other armed step, nothing on the compute thread, no step queued to run before it."""
        if self.armed is not None or self.on_thread or self.graphs is None:
            return
        if not self.batches.empty():
            return
        if self.graphs.flag is None or not self._replays_here(batch):
            return
        if self.step_profile is not None and self.step_profile.turns_after():
            # the profile starts or stops after the step that runs now: an armed step would
            # have to be cancelled then, and its scratch run would be in the profile's kernels
            return
        greedy = self.graphs.stage.plan.is_last  # a single stage: its own greedy tokens
        self.armed = (batch.batch_id, self.graphs.arm(batch.spans, greedy))

    def _arm_successor(self, batch: Batch) -> None:
        """A later stage, after a decode step: arm the step that follows it in a steady
        single stream (the same sequences, each a position on), before its batch has come.
        Its hidden states then only have to be copied in and the flag stored
        (`_start_predicted`), instead of a launch on the path from one stage to the next.
        Armed only for a lone sequence whose steps have followed each other so: a wrong guess
        is cancelled, and a cancelled step runs on the scratch slot, a step's GPU time spent
        for nothing, which a batch of many sequences (joining and leaving) would pay often
        and a single stream only when another joins it."""
        assert self.stage is not None
        decode = len(batch.spans) == 1 and batch.spans[0].length == 1
        previous, self.last_decode = self.last_decode, batch.spans if decode else None
        if previous is None or not decode or batch.spans != _successor(previous):
            return
        if self.stage.plan.is_first or not later_stages_arm():
            return
        if self.armed is not None or self.on_thread or self.graphs is None:
            return
        if not self.batches.empty() or self.graphs.flag is None or not self._replays_here(batch):
            return
        predicted = _successor(batch.spans)
        if predicted[-1].start >= self.stage.plan.max_seq_len:
            return
        if not self.graphs.captured_for(predicted):
            return
        if self.step_profile is not None and self.step_profile.turns_after():
            return
        self.armed = (-1, self.graphs.arm(predicted, self.stage.plan.is_last))
        self.predicted = predicted

    def _start_predicted(self, batch: Batch | None) -> None:
        """A later stage's batch has come while a step is armed ahead of it (None: it did not
        parse): start the armed step on its hidden states if it is the step that was guessed,
        else cancel it."""
        predicted, self.predicted = self.predicted, None
        assert self.stage is not None and self.graphs is not None and self.armed is not None
        hit = (
            batch is not None
            and batch.spans == predicted
            and (not self.stage.plan.is_last or _greedy_decode(batch))
        )
        if not hit:
            self._cancel_armed()
            return
        assert batch is not None
        step = self.armed[1]
        self.graphs.release(step, batch.input_bytes())  # the GPU starts it now
        trace.mark("released", batch.batch_id)
        self.armed = (batch.batch_id, step)

    def _cancel_armed(self) -> None:
        """Let an armed step go on the scratch slot (its output is dropped)."""
        if self.armed is not None and self.graphs is not None:
            self.graphs.cancel(self.armed[1])
            self.armed_cancelled += 1
        self.armed, self.predicted = None, None

    def _run(self, batch: Batch) -> tuple[torch.Tensor, list | None]:
        """The forward pass (compute thread): hidden states out, or sampled token ids with the
        log-probabilities of the rows that asked for them."""
        assert self.stage is not None
        if self.graphs is not None and self.graphs.handles(batch.spans):
            if self.stage.plan.is_last and _greedy_decode(batch):  # the graph's own argmax
                return self._to_host(self.graphs.run(batch.inputs, batch.spans, True)), None
            output = self.graphs.run(batch.inputs, batch.spans)
            if self.stage.plan.is_last:
                output = output[batch.sample_rows()]
        else:
            inputs = batch.inputs.to(self.settings.device, non_blocking=True)
            output = self.stage(inputs, batch.spans, batch.sample_rows())
        if not self.stage.plan.is_last:
            return self._to_host(output), None
        tokens = sample(apply_penalties(output, batch.penalties), batch.sampling)
        return self._to_host(tokens), token_logprobs(output, tokens, batch.sampling)

    def _replays_here(self, batch: Batch) -> bool:
        """A decode step whose CUDA graph is captured already, and which needs nothing on the
        host after the replay (hidden states out, or the graph's greedy tokens)."""
        assert self.stage is not None
        if self.graphs is None or not self.graphs.captured_for(batch.spans):
            return False
        return not self.stage.plan.is_last or _greedy_decode(batch)

    def _take_armed(self, batch: Batch) -> ArmedStep | None:
        """The armed step if it is `batch` (started by its feed already); any other armed step
        is cancelled, since `batch` is queued on the GPU after it."""
        if self.armed is not None and self.armed[0] == batch.batch_id and self.armed[1].released:
            armed, self.armed = self.armed[1], None
            self.armed_steps += 1
            return armed
        self._cancel_armed()
        return None

    async def _replay(self, batch: Batch, armed: ArmedStep | None = None) -> Raw:
        """A captured decode step on the event loop's own thread (or an armed one, running
        already). Launching it takes tens of microseconds; its completion is then polled while
        the loop keeps serving QUIC. A round trip through the compute thread cost about 0.45
        ms a step on an H200 machine (two thread wake-ups and the GIL), which a single stream
        pays on every stage. The result is the pinned buffer's bytes (a `Raw`, described before
        the wait), so that nothing between the GPU's completion and the send calls torch."""
        assert self.graphs is not None and self.stage is not None
        self.settle_replay()  # a replay whose result was not sent (its send failed)
        done = torch.cuda.Event(enable_timing=True)
        if armed is not None:
            begun, output = armed.begun, armed.output
        else:
            begun = torch.cuda.Event(enable_timing=True)
            begun.record()
            output = self.graphs.run(batch.inputs, batch.spans, greedy=self.stage.plan.is_last)
        host = self._pinned_like(output)
        host.copy_(output, non_blocking=True)
        done.record()
        assert self._pinned_bytes is not None
        result = Raw(WIRE_DTYPES[host.dtype], tuple(host.shape), self._pinned_bytes[: host.nbytes])
        while not done.query():  # noqa: ASYNC110 - a CUDA event has nothing to await
            await asyncio.sleep(0)
        self.replays += 1
        self._replayed = (begun, done)
        return result

    def settle_replay(self) -> None:
        """Count the last replay's GPU time; called once its result is sent (reading the
        events' times is a driver call that need not come first)."""
        if self._replayed is not None:
            begun, done = self._replayed
            self.replay_device_seconds += begun.elapsed_time(done) / 1000
            self._replayed = None

    def _to_host(self, output: torch.Tensor) -> torch.Tensor:
        """Copy a result to the host; from the GPU through one reused pinned buffer."""
        if output.device.type != "cuda":
            return output
        host = self._pinned_like(output)
        host.copy_(output, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return host

    def _pinned_like(self, output: torch.Tensor) -> torch.Tensor:
        """The reused pinned buffer, shaped as `output` (the frame is queued, and aioquic has
        copied its bytes, before the next step reuses it)."""
        size = output.numel() * output.element_size()
        if self._pinned is None or self._pinned.numel() < size:
            self._pinned = torch.empty(2 * size, dtype=torch.uint8).pin_memory()
            self._pinned_bytes = tensor_view(self._pinned)
        return self._pinned[:size].view(output.dtype).view(output.shape)


def _successor(spans: list[Span]) -> list[Span]:
    """The decode step after `spans`: each sequence one position on."""
    return [Span(span.slot, span.start + 1, 1) for span in spans]


def _greedy_decode(batch: Batch) -> bool:
    """A last-stage decode step whose every row is sampled greedily, with neither penalties
    nor log-probabilities: its tokens are the argmax that the CUDA graph computes."""
    return (
        batch.sample_spans == list(range(len(batch.spans)))
        and not batch.penalties
        and all(p.temperature == 0 and p.logprobs < 0 for p in batch.sampling)
    )

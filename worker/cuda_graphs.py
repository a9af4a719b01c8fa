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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch._inductor.config
from torch import Tensor

from worker.model import Span, Stage

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTEXT_BUCKET = 256
WARMUP_STEPS = 2


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    output: Tensor


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
        hidden = stage.config.hidden_size
        if stage.plan.is_first:
            self.inputs = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)
        else:
            dtype = stage.layers[0].input_layernorm.weight.dtype
            self.inputs = torch.zeros(self.max_batch, hidden, dtype=dtype, device=self.device)
        self.slots = torch.full((self.max_batch,), self.scratch_slot, device=self.device)
        self.positions = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)
        self.host_indices = torch.zeros(2, self.max_batch, dtype=torch.long).pin_memory()
        self.pool = torch.cuda.graph_pool_handle()
        self.captured: dict[tuple[int, int], CapturedStep] = {}

    @torch.inference_mode()
    def warm(self) -> None:
        """Capture a batch of one and of two: every compilation happens here, at load time."""
        for bucket in sorted({1, min(2, self.max_batch)}):
            context = min(CONTEXT_BUCKET, self.stage.plan.max_seq_len)
            if (bucket, context) not in self.captured:
                self._capture(bucket, context)

    def handles(self, spans: list[Span]) -> bool:
        return all(span.length == 1 for span in spans) and len(spans) <= self.max_batch

    @torch.inference_mode()
    def run(self, inputs: Tensor, spans: list[Span]) -> Tensor:
        """The stage's output for a decode batch: hidden states, or logits on the last stage."""
        count = len(spans)
        bucket = next(b for b in BATCH_BUCKETS if b >= count)
        context = max(span.start for span in spans) + 1
        context = min(-(-context // CONTEXT_BUCKET) * CONTEXT_BUCKET, self.stage.plan.max_seq_len)
        host = self.host_indices
        host[0].fill_(self.scratch_slot)
        host[1].zero_()
        host[0, :count] = torch.tensor([span.slot for span in spans])
        host[1, :count] = torch.tensor([span.start for span in spans])
        self.slots.copy_(host[0], non_blocking=True)
        self.positions.copy_(host[1], non_blocking=True)
        self.inputs[:count].copy_(inputs, non_blocking=True)
        step = self.captured.get((bucket, context)) or self._capture(bucket, context)
        step.graph.replay()
        return step.output[:count]

    def _step(self, inputs: Tensor, slots: Tensor, positions: Tensor, context: int) -> Tensor:
        step = self.stage.decode_inputs(slots, positions, context)
        return self.stage.run(inputs, step, None)

    def _capture(self, bucket: int, context: int) -> CapturedStep:
        def body() -> Tensor:
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
            output = body()
        self.slots.copy_(saved[0])
        self.positions.copy_(saved[1])
        self.captured[(bucket, context)] = CapturedStep(graph, output)
        return self.captured[(bucket, context)]

"""A micro-batch as it travels between stages: validated layout, no I/O.

Metadata of a BATCH frame:
    spans:  [[slot, start, length], ...]   the sequences, laid end to end in the tensor
    sample: [[span_index, temperature, top_p, top_k, seed, logprobs], ...]   spans whose last
            token yields a new token on the last stage (logprobs: -1, or how many alternatives)
    penalties (optional): [[sample_index, presence, frequency, [[token, count], ...]], ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from meshpipe.wire import Frame, FrameError, Kind, Raw, tensor_view
from worker.model import Span, StagePlan
from worker.sampling import MAX_LOGPROBS, Penalty, SamplingParams

MAX_SPANS = 4096


@dataclass(frozen=True)
class Batch:
    """A validated micro-batch: its frame (id, metadata, inputs) and what parsing it found."""

    frame: Frame  # the inputs: see `inputs` and `input_bytes`
    spans: list[Span]
    sample_spans: list[int]
    sampling: list[SamplingParams]
    penalties: dict[int, Penalty] = field(default_factory=dict)  # by sampled row

    @property
    def batch_id(self) -> int:
        return self.frame.message_id

    @property
    def meta(self) -> dict:
        return self.frame.meta

    @property
    def inputs(self) -> Tensor:
        """Token ids (the first stage) or hidden states, as a torch tensor (made on first use)."""
        tensor = self.frame.tensor
        assert tensor is not None  # parse_batch checked that there is one
        return tensor

    def input_bytes(self) -> memoryview:
        """The inputs' bytes, writable, without a torch call for a batch that came over the
        network (an armed step's release copies them straight into its pinned buffer)."""
        return tensor_view(self.frame.payload)  # type: ignore[arg-type]

    @property
    def num_tokens(self) -> int:
        return sum(span.length for span in self.spans)

    def sample_rows(self) -> list[int]:
        """Row of the last token of each sampled span."""
        ends, total = [], 0
        for span in self.spans:
            total += span.length
            ends.append(total - 1)
        return [ends[index] for index in self.sample_spans]

    def forward_frame(self, hidden: Tensor | Raw) -> Frame:
        """The frame that carries this batch's hidden states to the next stage."""
        return Frame(Kind.BATCH, self.batch_id, self.meta, hidden)


def _ints(entry: object, length: int, what: str) -> list[int]:
    """`entry` as a list of `length` integers (JSON booleans are not integers here)."""
    if type(entry) is not list or len(entry) != length:
        raise FrameError("bad_batch", f"{what} must be a list of {length}")
    for item in entry:
        if type(item) is not int:
            raise FrameError("bad_batch", f"{what} must hold integers")
    return entry


def parse_spans(meta: dict, plan: StagePlan) -> list[Span]:
    raw = meta.get("spans")
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_SPANS:
        raise FrameError("bad_batch", f"spans must be a list of 1..{MAX_SPANS}")
    # A step of a large batch carries a span per sequence: these checks are kept to plain
    # comparisons, as they run on every stage for every step.
    spans, slots, context = [], plan.num_slots, plan.max_seq_len
    for entry in raw:
        slot, start, length = _ints(entry, 3, "a span")
        if not 0 <= slot < slots:
            raise FrameError("bad_batch", f"slot {slot} outside 0..{slots - 1}")
        if start < 0 or length < 1 or start + length > context:
            raise FrameError("bad_batch", f"span [{start}, {start + length}) outside the context")
        spans.append(Span(slot, start, length))
    if len({span.slot for span in spans}) != len(spans):
        raise FrameError("bad_batch", "a slot appears twice in one batch")
    return spans


NUMBER = (int, float)


def parse_sampling(meta: dict, num_spans: int) -> tuple[list[int], list[SamplingParams]]:
    raw = meta.get("sample", [])
    if not isinstance(raw, list):
        raise FrameError("bad_batch", "sample must be a list")
    indices, params = [], []
    for entry in raw:
        if type(entry) is not list or len(entry) != 6:
            raise FrameError(
                "bad_batch", "a sample entry is [span, temperature, top_p, top_k, seed, logprobs]"
            )
        index, temperature, top_p, top_k, seed, logprobs = entry
        if type(index) is not int or not 0 <= index < num_spans:
            raise FrameError("bad_batch", f"sample span {index} does not exist")
        if not (type(temperature) in NUMBER and type(top_p) in NUMBER):
            raise FrameError("bad_batch", "sampling values must be numbers")
        if not (type(top_k) is int and type(seed) is int and type(logprobs) is int):
            raise FrameError("bad_batch", "top_k, seed and logprobs must be integers")
        values_ok = 0 <= temperature <= 100 and 0 < top_p <= 1 and top_k >= 0
        if not (values_ok and -1 <= logprobs <= MAX_LOGPROBS):
            raise FrameError("bad_batch", "sampling values out of range")
        indices.append(index)
        params.append(SamplingParams(float(temperature), float(top_p), top_k, seed, logprobs))
    return indices, params


def parse_batch(
    frame: Frame, plan: StagePlan, hidden_size: int, vocab_size: int, dtype: torch.dtype
) -> Batch:
    """Check a BATCH frame against this stage; raise FrameError on anything inconsistent."""
    spans = parse_spans(frame.meta, plan)
    sample_spans, sampling = parse_sampling(frame.meta, len(spans))
    tokens = sum(span.length for span in spans)
    if frame.payload is None:
        raise FrameError("bad_batch", "a batch carries a tensor")
    shape, tensor_dtype = frame.shape_and_dtype()  # hidden states: no torch call (see Raw)
    if plan.is_first:
        if tensor_dtype != torch.int64 or shape != (tokens,):
            raise FrameError("bad_batch", f"the first stage takes int64 ids [{tokens}]")
        ids = frame.tensor
        assert ids is not None
        if tokens and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise FrameError("bad_batch", f"token ids must lie in [0, {vocab_size})")
    elif tensor_dtype != dtype or shape != (tokens, hidden_size):
        raise FrameError(
            "bad_batch",
            f"expected {dtype} [{tokens}, {hidden_size}], got {tensor_dtype} {list(shape)}",
        )
    penalties = parse_penalties(frame.meta, len(sampling), vocab_size)
    return Batch(frame, spans, sample_spans, sampling, penalties)


def parse_penalties(meta: dict, num_sampled: int, vocab_size: int) -> dict[int, Penalty]:
    """`penalties`: `[[sampled row, presence, frequency, [[token, count], ...]], ...]`."""
    raw = meta.get("penalties", [])
    if not isinstance(raw, list):
        raise FrameError("bad_batch", "penalties must be a list")
    penalties: dict[int, Penalty] = {}
    for entry in raw:
        try:
            row, presence, frequency, counted = entry
            pairs = [(int(token), int(count)) for token, count in counted]
            presence, frequency = float(presence), float(frequency)
        except (TypeError, ValueError):
            raise FrameError(
                "bad_batch", "a penalty is [row, presence, frequency, counts]"
            ) from None
        if not (isinstance(row, int) and 0 <= row < num_sampled and row not in penalties):
            raise FrameError("bad_batch", f"penalty row {row} is not a sampled row")
        if not (-2 <= presence <= 2 and -2 <= frequency <= 2 and len(pairs) <= MAX_SPANS * 16):
            raise FrameError("bad_batch", "penalty values out of range")
        if any(not (0 <= token < vocab_size and count > 0) for token, count in pairs):
            raise FrameError("bad_batch", f"penalized tokens must lie in [0, {vocab_size})")
        tokens, counts = zip(*pairs, strict=True) if pairs else ((), ())
        penalties[row] = Penalty(presence, frequency, tuple(tokens), tuple(counts))
    return penalties

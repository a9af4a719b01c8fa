"""Per-sequence sampling on the last stage: greedy, temperature, top-k, top-p, seeded; and, for
the sequences that ask, the log-probabilities of the model's distribution (before temperature)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_LOGPROBS = 20  # as OpenAI's top_logprobs
GREEDY_PART = 256  # the logits a first reduction of `greedy_tokens` takes


@dataclass(frozen=True)
class SamplingParams:
    """How to pick one token. `seed` is derived per token by the gateway, so sampling is
    reproducible whatever batch the token is computed in."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    logprobs: int = -1
    """-1: none; else the sampled token's log-probability and the `logprobs` likeliest."""

    def to_wire(self) -> list:
        return [self.temperature, self.top_p, self.top_k, self.seed, self.logprobs]


def sample(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    """One token id per row of `logits` `[B, V]`."""
    tokens = logits.argmax(dim=-1)
    for row, param in enumerate(params):
        if param.temperature > 0:
            tokens[row] = _sample_row(logits[row], param)
    return tokens


def greedy_tokens(logits: Tensor) -> Tensor:
    """`logits.argmax(dim=-1)` of `[B, V]` in two reductions, for a compiled graph: the maximum
    and its index within each part of GREEDY_PART logits, then the best part. Inductor makes an
    argmax one reduction a row, a single program for the whole vocabulary at batch 1: 32.6 us
    for 128K logits on the H200, against 3.8 us this way, where the first reduction has a
    program for each part (`python -m bench.gemv`). Ties go to the first index, as argmax's do:
    to the first within a part, then to the first part."""
    rows, vocab = logits.shape
    parts = -(-vocab // GREEDY_PART)
    padded = F.pad(logits, (0, parts * GREEDY_PART - vocab), value=float("-inf"))
    best, within = padded.view(rows, parts, GREEDY_PART).max(dim=-1)
    part = best.argmax(dim=-1, keepdim=True)
    return (part * GREEDY_PART + within.gather(-1, part)).squeeze(-1)


def _sample_row(logits: Tensor, param: SamplingParams) -> Tensor:
    scores = logits.float() / param.temperature
    if 0 < param.top_k < scores.shape[-1]:
        threshold = torch.topk(scores, param.top_k).values[-1]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    if param.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = cumulative - sorted_scores.softmax(-1) >= param.top_p
        scores = scores.scatter(0, order[drop], float("-inf"))
    generator = torch.Generator(device="cpu").manual_seed(param.seed)
    probabilities = scores.softmax(-1).cpu()
    return torch.multinomial(probabilities, 1, generator=generator)[0].to(logits.device)


def token_logprobs(logits: Tensor, tokens: Tensor, params: list[SamplingParams]) -> list | None:
    """Per sampled row: None, or `[logprob of its token, [[id, logprob], ...] likeliest first]`
    from the model's own distribution (log-softmax of the logits); None if no row asks."""
    rows = [row for row, param in enumerate(params) if param.logprobs >= 0]
    if not rows:
        return None
    result: list = [None] * len(params)
    scores = logits[rows].float().log_softmax(-1)
    chosen = scores.gather(1, tokens[rows].view(-1, 1).to(scores.device)).view(-1).tolist()
    most = max(params[row].logprobs for row in rows)
    values, ids = scores.topk(most, dim=-1) if most else (scores[:, :0], scores[:, :0].long())
    values, ids = values.tolist(), ids.tolist()
    for index, row in enumerate(rows):
        count = params[row].logprobs
        top = [list(pair) for pair in zip(ids[index][:count], values[index][:count], strict=True)]
        result[row] = [chosen[index], top]
    return result


@dataclass(frozen=True)
class Penalty:
    """OpenAI's presence and frequency penalties of one sampled row, with the tokens its
    sequence has generated so far and how often each."""

    presence: float
    frequency: float
    tokens: tuple[int, ...]
    counts: tuple[int, ...]


def apply_penalties(logits: Tensor, penalties: dict[int, Penalty]) -> Tensor:
    """`logits[row, t] -= frequency * count(t) + presence` for every generated token t."""
    if not penalties:
        return logits
    logits = logits.clone()
    for row, penalty in penalties.items():
        ids = torch.tensor(penalty.tokens, dtype=torch.long, device=logits.device)
        counts = torch.tensor(penalty.counts, dtype=logits.dtype, device=logits.device)
        logits[row, ids] -= penalty.frequency * counts + penalty.presence
    return logits

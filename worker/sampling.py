"""Per-sequence sampling on the last stage: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How to pick one token. `seed` is derived per token by the gateway, so sampling is
    reproducible whatever batch the token is computed in."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @classmethod
    def from_wire(cls, values: list) -> SamplingParams:
        temperature, top_p, top_k, seed = values
        return cls(float(temperature), float(top_p), int(top_k), int(seed))

    def to_wire(self) -> list:
        return [self.temperature, self.top_p, self.top_k, self.seed]


def sample(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    """One token id per row of `logits` `[B, V]`."""
    tokens = logits.argmax(dim=-1)
    for row, param in enumerate(params):
        if param.temperature > 0:
            tokens[row] = _sample_row(logits[row], param)
    return tokens


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

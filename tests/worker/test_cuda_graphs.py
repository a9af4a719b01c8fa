"""The context buckets of the CUDA-graph decode steps and their greedy tokens (on the CPU: runs
without a GPU)."""

from __future__ import annotations

import pytest
import torch

from worker.cuda_graphs import CONTEXT_BUCKET, context_bucket, context_buckets
from worker.sampling import greedy_tokens


@pytest.mark.parametrize("limit", [1, 100, 256, 300, 1024, 2048, 4096, 8192, 32768, 131072])
def test_buckets_cover_every_context_and_end_at_the_limit(limit: int) -> None:
    buckets = context_buckets(limit)
    assert buckets[-1] == limit
    assert buckets == sorted(set(buckets))
    assert all(bucket % CONTEXT_BUCKET == 0 for bucket in buckets[:-1])
    for context in {1, limit // 3 + 1, limit // 2, limit - 1, limit} - {0}:
        bucket = context_bucket(context, buckets)
        assert bucket >= context
        smaller = [b for b in buckets if b < bucket]
        assert not smaller or smaller[-1] < context  # the smallest that holds it


def test_buckets_are_fine_up_to_1024_then_grow_by_about_half() -> None:
    assert context_buckets(2048) == [256, 512, 768, 1024, 1536, 2048]
    buckets = context_buckets(131072)
    assert len(buckets) == 16  # every graph is captured at load: few enough for long contexts
    for smaller, larger in zip(buckets[3:-2], buckets[4:-1], strict=True):
        assert 1.5 * smaller <= larger < 1.5 * smaller + CONTEXT_BUCKET


def test_a_context_past_the_limit_takes_the_last_bucket() -> None:
    assert context_bucket(5000, context_buckets(2048)) == 2048


@pytest.mark.parametrize("vocab", [128256, 49152, 1000, 7])
def test_greedy_tokens_equal_the_argmax_ties_included(vocab: int) -> None:
    """The decode graphs' two-reduction argmax gives torch's, eager and compiled (dynamic, as the
    graphs compile it), ties to the first index: within a part, across parts, a row all equal;
    vocabularies that fill their parts of 256 and ones that pad the last."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn((5, vocab), generator=generator)
    logits[1] = 0.0
    logits[2, [3, vocab - 1]] = 100.0
    logits[3, [min(300, vocab - 2), min(301, vocab - 1)]] = 50.0
    theirs = logits.argmax(dim=-1)
    for ours in (greedy_tokens(logits), torch.compile(greedy_tokens, dynamic=True)(logits)):
        assert torch.equal(ours, theirs)

"""The `--anchor hf` of `meshpipe bench serving`: `transformers` generate on the same weights.

Greedy, batch 1, one prompt after the other, timed per token through a streamer the way the
benchmark times a streamed request, so the two sets of figures compare directly. `transformers`
is a test-only dependency: this module is imported only when the anchor is asked for.
"""

from __future__ import annotations

import time
from itertools import pairwise
from pathlib import Path
from typing import Any

from bench.serving import Prompt, RequestResult, percentiles


class TokenClock:
    """A transformers streamer that records when each new token is handed over."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.calls = 0

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls > 1:  # the first put is the prompt
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_generate(
    model: Any, ids: tuple[int, ...], max_new_tokens: int, eos: list[int]
) -> RequestResult:
    """One greedy transformers generate, batch 1, timed per token like a streamed request."""
    import torch

    clock, tokens = TokenClock(), torch.tensor([ids])
    result = RequestResult(ok=True, prompt_tokens=len(ids), start=time.perf_counter())
    with torch.inference_mode():
        output = model.generate(
            tokens,
            attention_mask=torch.ones_like(tokens),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos[0],
            streamer=clock,
        )
    result.latency = time.perf_counter() - result.start
    result.completion_tokens = output.shape[1] - len(ids)
    result.ttft = clock.times[0] - result.start
    result.itl = [later - earlier for earlier, later in pairwise(clock.times)]
    return result


class HFAnchor:
    """transformers greedy generate on the same weights, batch 1, one prompt after the other.

    Measured in rounds, one before the sweep and one after it, so that load drifting during the
    run (a shared machine) shows as a spread between them; each round tries every torch thread
    count asked for, and the fastest is the anchor: the ratios are against transformers at its
    best here, not at a setting that collapses when the cores are oversubscribed."""

    def __init__(self, model_dir: Path, output_tokens: int, threads: tuple[int, ...]) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from meshpipe.models.config import ModelConfig

        self.threads = tuple(dict.fromkeys(count or torch.get_num_threads() for count in threads))
        self.eos = list(ModelConfig.from_dir(model_dir).eos_token_ids)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.output_tokens = output_tokens
        self.rounds: dict[int, list[list[RequestResult]]] = {count: [] for count in self.threads}

    def measure(self, prompts: list[Prompt]) -> None:
        import torch

        previous = torch.get_num_threads()  # a process-wide setting: give it back afterwards
        try:
            for count in self.threads if prompts else ():
                torch.set_num_threads(count)
                self._round(count, prompts)
        finally:
            torch.set_num_threads(previous)

    def _round(self, count: int, prompts: list[Prompt]) -> None:
        if not self.rounds[count]:
            hf_generate(self.model, prompts[0].ids, 4, self.eos)  # warm-up
        print(f"transformers anchor: {len(prompts)} requests, {count} threads", flush=True)
        results = [hf_generate(self.model, p.ids, self.output_tokens, self.eos) for p in prompts]
        self.rounds[count].append(results)

    def summary(self) -> dict[str, Any]:
        import torch
        import transformers

        by_threads = {
            count: _anchor_figures([result for batch in rounds for result in batch])
            | {"tok_s_per_round": [_anchor_figures(batch)["tok_s"] for batch in rounds]}
            for count, rounds in self.rounds.items()
        }
        best = max(by_threads, key=lambda count: by_threads[count]["tok_s"])
        return by_threads[best] | {
            "kind": "hf",
            "what": "transformers generate, greedy, batch 1, sequential, float32",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "torch_threads": best,
            "by_threads": {str(count): figures for count, figures in by_threads.items()},
        }


def _anchor_figures(results: list[RequestResult]) -> dict[str, Any]:
    tokens = sum(r.completion_tokens for r in results)
    seconds = sum(r.latency for r in results)
    decode = [(r.completion_tokens - 1, r.latency - r.ttft) for r in results]
    return {
        "requests": len(results),
        "output_tokens": tokens,
        "output_tokens_mean": round(tokens / len(results), 2),
        "tok_s": round(tokens / seconds, 2),
        "decode_tok_s": round(sum(n for n, _ in decode) / sum(s for _, s in decode), 2),
        "ttft_ms": percentiles([r.ttft for r in results]),
        "itl_ms": percentiles([gap for r in results for gap in r.itl]),
    }

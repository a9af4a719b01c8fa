"""The GGUF blocks a CPU worker decodes on are the same weights as the float32 checkpoint, and
both block kernels (meshpipe's C kernels and the Inductor ones) compute like float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from meshpipe.models.config import ModelConfig
from worker.blocks import BlockLinear, Kernels, use_blocks
from worker.cpu_kernels import load
from worker.model import Span, Stage, StagePlan

needs_native = pytest.mark.skipif(load() is None, reason="the C kernels need x86 with AVX-512")
BOTH = [pytest.param(True, id="native", marks=needs_native), pytest.param(False, id="inductor")]


def dequantized(kind: str, fields: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 weight of blocks, by GGUF's own definition (element j of a block)."""
    d = fields["d"].float().unsqueeze(-1)
    if kind == "q8_0":
        return (fields["qs"].float() * d).flatten(1)
    qs = fields["qs"]
    values = torch.cat([(qs & 15), (qs >> 4)], dim=-1).float()  # elements 0-15, then 16-31
    return (d * values + fields["m"].float().unsqueeze(-1)).flatten(1)


def read_all(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as file:
        return {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118


def test_blocks_equal_the_float32_weights(default_model: Path) -> None:
    weights = read_all(default_model / "model.safetensors")
    blocks: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in read_all(default_model / "blocks.safetensors").items():
        weight, kind, field = key.rsplit(".", 2)
        blocks.setdefault((weight, kind), {})[field] = value
    # every projection of every layer (Q/K rows in HF order) and the Q8_0 embedding
    assert len(blocks) == 7 * 30 + 1
    for (weight, kind), fields in blocks.items():
        assert torch.equal(dequantized(kind, fields), weights[weight]), weight


def build_stage(model_dir: Path, layers: tuple[int, int]) -> Stage:
    config = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        stage = Stage(config, StagePlan(*layers, config.num_layers, 8, 128))
    stage = stage.to_empty(device="cpu")
    stage.load(model_dir)
    stage.reset_rope()
    stage.allocate_cache(torch.float32)
    return stage.eval()


def greedy(stage: Stage, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Prefill (float32 GEMM), then one-token steps; the tokens and the last logits."""
    with torch.inference_mode():
        logits = stage(torch.tensor(prompt), [Span(0, 0, len(prompt))], [len(prompt) - 1])
        tokens = [int(logits.argmax())]
        for index in range(steps):
            span = Span(0, len(prompt) + index, 1)
            logits = stage(torch.tensor(tokens[-1:]), [span], [0])
            tokens.append(int(logits.argmax()))
    return tokens, logits


def prefill(
    stages: list[Stage], prompts: list[list[int]]
) -> tuple[torch.Tensor, list[Span], list[int]]:
    """Each prompt prefilled into its own slot of every stage; the inputs of one decode step of
    them all (last tokens, spans, sampled rows)."""
    for stage in stages:
        for slot, prompt in enumerate(prompts):
            stage(torch.tensor(prompt), [Span(slot, 0, len(prompt))], [len(prompt) - 1])
    tokens = torch.tensor([prompt[-1] for prompt in prompts])
    spans = [Span(slot, len(prompt), 1) for slot, prompt in enumerate(prompts)]
    return tokens, spans, list(range(len(prompts)))


@pytest.mark.parametrize("native", BOTH)
def test_a_stage_on_blocks_decodes_like_float32(default_model: Path, native: bool) -> None:
    float32 = build_stage(default_model, (0, 30))
    blocked = build_stage(default_model, (0, 30))
    assert use_blocks(blocked, default_model, Kernels(native)) == 4 * 30 + 1  # and the head
    assert isinstance(blocked.layers[0].self_attn.qkv_proj, BlockLinear)
    assert isinstance(blocked.lm_head, BlockLinear)
    prompt = [1, 504, 3458, 282, 4649, 314, 30, 2]
    expected, expected_logits = greedy(float32, prompt, 24)
    tokens, logits = greedy(blocked, prompt, 24)
    assert tokens == expected
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("native", BOTH)
def test_narrow_inputs_use_blocks_and_wide_ones_float32(default_model: Path, native: bool) -> None:
    stage = build_stage(default_model, (28, 30))
    use_blocks(stage, default_model, Kernels(native))
    for name in ("self_attn.qkv_proj", "mlp.down_proj"):  # Q4_1 blocks
        check_rows(stage.layers[0].get_submodule(name))
    check_rows(stage.lm_head)  # Q8_0 blocks


def check_rows(linear: nn.Module) -> None:
    assert isinstance(linear, BlockLinear)
    limit = linear.max_rows
    x = torch.randn(limit + 1, linear.weight.shape[1])
    with torch.inference_mode():
        assert torch.equal(linear(x), nn.functional.linear(x, linear.weight))
        for rows in sorted({1, 2, 3, 5, 8, 13, 16, 17, limit}):
            expected = nn.functional.linear(x[:rows], linear.weight)
            torch.testing.assert_close(linear(x[:rows]), expected, rtol=1e-4, atol=1e-4)
            # a row's result does not depend on the rows beside it
            assert torch.equal(linear(x[:rows])[rows - 1 :], linear(x[rows - 1 : rows]))


@pytest.mark.parametrize("native", BOTH)
def test_a_batch_of_sequences_decodes_like_float32(default_model: Path, native: bool) -> None:
    float32 = build_stage(default_model, (0, 30))
    blocked = build_stage(default_model, (0, 30))
    kernels = Kernels(native)
    use_blocks(blocked, default_model, kernels)
    prompts = [[1, 504, 3458, 282], [1, 42, 17, 99], [1, 7, 7, 7], [1, 9, 8], [1, 3000, 12, 4, 5]]
    prompts = prompts[: 5 if native else 3]
    with torch.inference_mode():
        tokens, spans, rows = prefill([float32, blocked], prompts)
        expected = float32(tokens, spans, rows)
        logits = blocked(tokens, spans, rows)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-3)


def test_a_model_without_blocks_keeps_float32(tiny_model: Path) -> None:
    stage = build_stage(tiny_model, (0, 3))
    assert use_blocks(stage, tiny_model) == 0
    assert type(stage.layers[0].self_attn.qkv_proj) is nn.Linear


@needs_native
def test_native_attention_decodes_like_torch_and_alone_like_in_a_batch(default_model: Path) -> None:
    reference = build_stage(default_model, (0, 30))  # torch's attention over float32 weights
    stage = build_stage(default_model, (0, 30))  # as a CPU worker runs: blocks, C attention
    kernels = Kernels(True)
    use_blocks(stage, default_model, kernels)
    assert kernels.native is not None
    stage.use_native_kernels(kernels.native)
    prompts = [[1, 504, 3458, 282, 4649, 314], [1, 42], [1, 7, 7, 7, 9], [2] * 40, [1, 99, 3]]
    with torch.inference_mode():
        tokens, spans, rows = prefill([reference, stage], prompts)
        expected = reference(tokens, spans, rows)
        batched = stage(tokens, spans, rows)
        alone = [stage(tokens[i : i + 1], [spans[i]], [0])[0] for i in rows]
    assert torch.equal(batched.argmax(-1), expected.argmax(-1))
    torch.testing.assert_close(batched, expected, rtol=1e-4, atol=1e-3)
    for row in rows:  # bit for bit: a sequence's result does not depend on its batch
        assert torch.equal(alone[row], batched[row])

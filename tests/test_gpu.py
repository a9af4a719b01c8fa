"""The CUDA path: greedy parity in fp32, bf16 logits within tolerance, CUDA graphs equal eager.

Skipped without a CUDA device (CI has none); run on a GPU machine with `pytest -m gpu`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from functools import partial
from pathlib import Path

import pytest
import torch

from bench import gpu
from meshpipe.models.config import ModelConfig
from meshpipe.models.synth import synth
from meshpipe.wire import Frame, Kind, error_frame, tensor_view
from tests.cluster import Cluster, save_random_llama, start_auto
from tests.decode_reference import rotary_at, rotate_and_write
from tests.test_parity import PROMPTS, pipeline_answer, reference
from tests.worker.test_frames import chained, dial
from worker import decode_attention, gemv, rms_norm, silu_mul
from worker.cuda_graphs import DecodeGraphs
from worker.model import Span, Stage, StagePlan, rotary_tables
from worker.step_profile import ENVIRONMENT, profile_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# Relative L2 error of bf16 last-position logits against transformers in bf16 (both on the
# GPU): measured well under this on random-weight models; fp32 agrees to ~1e-6.
BF16_TOLERANCE = 3e-2


@pytest.fixture(scope="module")
def gpu_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-layer Llama with confident logits, and the synthetic byte-level tokenizer."""
    tokenizer_source = synth("tiny", tmp_path_factory.mktemp("synth") / "tiny")
    path = save_random_llama(
        tmp_path_factory.mktemp("gpu-tiny"),
        tokenizer_source,
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=256,
        max_position_embeddings=1024,
        bos_token_id=0,
        eos_token_id=1,
    )
    return path


def cancel_two_armed_steps(cluster: Cluster, home: Path) -> None:
    """As a peer of the first stage: a held step (armed) whose parent fails (an ERROR), and
    one that another batch overtakes and whose feed comes after: both are cancelled, the
    second runs when fed."""
    plan_id = cluster.status()["pipeline"]["plan_id"]
    b = 10**12

    async def scenario() -> None:
        dialer, connection, _ = await dial(cluster, home, stage=0)
        try:
            connection.send(chained(b + 1, {"after": 2 * b, "fed": [[0, 0]]}, plan_id))
            await asyncio.sleep(0.2)
            connection.send(error_frame("test", "this batch failed", 2 * b))
            connection.send(chained(b + 2, {"after": 2 * b + 2, "fed": [[0, 0]]}, plan_id))
            await asyncio.sleep(0.2)
            spans = {"spans": [[14, 0, 1]], "sample": [], "plan_id": plan_id}
            connection.send(Frame(Kind.BATCH, b + 3, spans, torch.tensor([5])))
            await asyncio.sleep(0.2)
            connection.send(Frame(Kind.FEED, 2 * b + 2, {}, torch.tensor([7])))
            await asyncio.sleep(0.3)
        finally:
            await dialer.close()

    asyncio.run(scenario())


def test_greedy_parity_fp32_on_cuda(gpu_tiny: Path, home: Path) -> None:
    """Greedy tokens equal transformers', also after armed steps were cancelled."""
    cluster = start_auto(gpu_tiny, 2, "--device", "cuda", "--dtype", "float32")
    try:
        assert {s["device"] for s in cluster.status()["stages"]} == {"cuda"}
        cancel_two_armed_steps(cluster, home)
        for prompt in PROMPTS:
            assert pipeline_answer(cluster, prompt, 24) == reference(gpu_tiny, prompt, 24)
        time.sleep(0.6)  # the stages' figures come with their heartbeats
        stages = cluster.status()["stages"]
        for stage in stages:  # decode steps replayed, with their GPU time
            assert 0 < stage["replays"] <= stage["steps"]
            assert 0 < stage["replay_device_seconds"] / stage["replays"] < 0.1
        # the first stage armed the steps that waited for their tokens, and they ran
        first = next(stage for stage in stages if stage["layers"][0] == 0)
        assert 0 < first["armed_steps"] <= first["fed_steps"]
        assert first["armed_cancelled"] == 2
        # the second armed each step of a steady stream ahead of its batch, and cancelled
        # the one after each stream's end
        second = next(stage for stage in stages if stage["layers"][0] != 0)
        assert second["armed_steps"] >= len(PROMPTS) * 10
        assert second["armed_cancelled"] >= len(PROMPTS)
        # streams that join and leave one another: the step the second stage armed is not the
        # batch that comes, and is cancelled; every answer is still transformers'
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = []
            for prompt in PROMPTS:
                answers.append(pool.submit(pipeline_answer, cluster, prompt, 48))
                time.sleep(0.05)
            for prompt, answer in zip(PROMPTS, answers, strict=True):
                assert answer.result() == reference(gpu_tiny, prompt, 48)
        time.sleep(0.6)
        later = next(stage for stage in cluster.status()["stages"] if stage["layers"][0] != 0)
        assert later["armed_cancelled"] > second["armed_cancelled"]  # when a second joins one
    finally:
        cluster.process.stop()


def test_workers_profile_their_kernels_in_the_pipeline(
    gpu_tiny: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MESHPIPE_PROFILE_STEPS on CUDA workers: each writes its window's kernels (the fused
    decode step's among them) and GPU time, no step armed across the profile's start or stop
    (the profiler synchronises the device), and the greedy tokens are still transformers'."""
    for old in profile_dir().glob("*.json"):
        old.unlink()
    monkeypatch.setenv(ENVIRONMENT, "6,8")
    cluster = start_auto(gpu_tiny, 2, "--device", "cuda", "--dtype", "float32")
    try:
        prompt = PROMPTS[0]
        assert pipeline_answer(cluster, prompt, 24) == reference(gpu_tiny, prompt, 24)
        profiles = gpu.step_profiles(2)
        assert len(profiles) == 2
        attention_calls = 0.0
        for summary in profiles.values():
            assert summary["steps"] == 8 and summary["kernel_ms"] > 0
            assert summary["device_ms"]["p50"] > 0  # the window's steps were replayed
            calls = [
                k["calls_per_step"]
                for k in summary["kernels"]
                if k["kernel"].startswith("_attend_new_split")
            ]
            assert calls
            attention_calls += calls[0]
        # one attention a layer a step: no cancelled armed step ran inside a window
        assert attention_calls == ModelConfig.from_dir(gpu_tiny).num_layers
    finally:
        cluster.process.stop()


def stage_of(
    model_dir: Path, start: int, end: int, dtype: torch.dtype = torch.float32, slots: int = 4
) -> Stage:
    """Layers [start, end) of a model as one stage on the GPU, as a CUDA worker builds it."""
    config = ModelConfig.from_dir(model_dir)
    plan = StagePlan(start, end, config.num_layers, slots, 512)
    with torch.device("meta"):
        stage = Stage(config, plan).to(dtype=dtype)
    stage = stage.to_empty(device="cuda")
    stage.load(model_dir)
    stage.reset_rope()
    stage.allocate_cache(dtype, extra_slots=1)
    return stage.eval()


def whole_model(model_dir: Path, dtype: torch.dtype, slots: int = 4) -> Stage:
    layers = ModelConfig.from_dir(model_dir).num_layers
    return stage_of(model_dir, 0, layers, dtype, slots)


def test_bf16_logits_within_tolerance(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    model_dir = synth("tiny", tmp_path / "tiny")
    ids = torch.randint(2, 4096, (40,), generator=torch.Generator().manual_seed(0))
    stage = whole_model(model_dir, torch.bfloat16)
    prompt, last = ids[:-1], ids[-1:]
    ours = [stage(prompt.cuda(), [Span(0, 0, len(prompt))], [len(prompt) - 1]).float()[0]]
    # and a decode step after it: one row, whose products are worker/gemv.py's
    ours.append(stage(last.cuda(), [Span(0, len(prompt), 1)], [0]).float()[0])
    reference_model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
    with torch.inference_mode():
        logits = reference_model(ids[None].cuda()).logits[0].float()
    for mine, theirs in zip(ours, (logits[-2], logits[-1]), strict=True):
        error = ((mine - theirs).norm() / theirs.norm()).item()
        print(f"bf16 relative logit error vs transformers: {error:.2e}")
        assert error < BF16_TOLERANCE


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_cuda_graph_decode_equals_eager(gpu_tiny: Path, batch: int) -> None:
    stage = whole_model(gpu_tiny, torch.float32, slots=16)
    graphs = DecodeGraphs(stage)
    prompts = [torch.randint(2, 4096, (5 + i,)) for i in range(batch)]
    spans = [Span(slot, 0, len(p)) for slot, p in enumerate(prompts)]
    stage(torch.cat(prompts).cuda(), spans, [0])
    tokens = torch.randint(2, 4096, (batch,)).cuda()
    decode = [Span(slot, len(p), 1) for slot, p in enumerate(prompts)]
    captured = graphs.run(tokens, decode).clone()
    eager = stage(tokens, decode, list(range(batch)))
    assert torch.allclose(captured, eager, atol=1e-4, rtol=1e-4)
    assert torch.equal(captured.argmax(-1), eager.argmax(-1))


def test_greedy_tokens_of_the_graph_equal_the_argmax(gpu_tiny: Path) -> None:
    stage = whole_model(gpu_tiny, torch.float32, slots=4)
    graphs = DecodeGraphs(stage, compile=False)  # the argmax is captured either way
    stage(torch.arange(2, 12).cuda(), [Span(0, 0, 6), Span(1, 0, 4)], [0])
    tokens = torch.tensor([5, 9])
    decode = [Span(0, 6, 1), Span(1, 4, 1)]
    greedy = graphs.run(tokens, decode, greedy=True).clone()  # host inputs, as a worker gives
    assert torch.equal(greedy, graphs.run(tokens, decode).argmax(-1))


def caches(stage: Stage) -> list[torch.Tensor]:
    return [c.clone() for layer in stage.layers for c in layer.self_attn.kv_cache.buffers()]


@pytest.mark.parametrize("half", ["first", "last"])
def test_an_armed_step_waits_for_its_inputs_then_equals_a_run(gpu_tiny: Path, half: str) -> None:
    """An armed step holds the stream until released, then computes what `run` does on the
    same inputs; a cancelled one writes only the scratch slot. Both halves: token ids into the
    indices' buffer, hidden states through their pinned buffer."""
    first = half == "first"
    stage = stage_of(gpu_tiny, *((0, 2) if first else (2, 4)))
    graphs = DecodeGraphs(stage, compile=False)
    graphs.warm()
    assert graphs.flag is not None, "cuStreamWaitValue32 works on this GPU"
    width = stage.config.hidden_size
    prompt = torch.arange(2, 12) if first else torch.randn(10, width)
    stage(prompt.cuda(), [Span(0, 0, 6), Span(1, 0, 4)], [0])
    decode = [Span(0, 6, 1), Span(1, 4, 1)]
    inputs = torch.tensor([5, 9]) if first else torch.randn(2, width)
    expected = graphs.run(inputs, decode).clone()

    armed = graphs.arm(decode)
    after = torch.cuda.Event()
    after.record()
    time.sleep(0.05)
    assert not after.query(), "the armed step ran before its inputs came"
    graphs.release(armed, tensor_view(inputs))  # the bytes, as a received frame has them
    after.synchronize()
    assert torch.allclose(armed.output, expected, atol=1e-5, rtol=1e-5)

    kept = caches(stage)
    armed = graphs.arm(decode)
    graphs.cancel(armed)
    torch.cuda.synchronize()
    scratch = graphs.scratch_slot
    for before, now in zip(kept, caches(stage), strict=True):
        assert torch.equal(before[:scratch], now[:scratch]), "a cancelled step wrote a slot"
    assert torch.allclose(graphs.run(inputs, decode), expected, atol=1e-5, rtol=1e-5)


def test_packed_attention_equals_per_chunk(tmp_path: Path) -> None:
    """The spans of a step in one variable-length flash-attention call (bf16) give what a call
    per chunk gives: fresh prompts, a chunk continuing a cached prefix, decode rows beside."""
    model_dir = synth("tiny", tmp_path / "tiny")  # 8 heads over 4 KV heads: grouped queries
    stage = whole_model(model_dir, torch.bfloat16, slots=4)
    assert stage.packed_attention
    generator = torch.Generator().manual_seed(0)
    steps = [
        [Span(0, 0, 37), Span(1, 0, 20)],
        [Span(0, 37, 15), Span(2, 0, 9), Span(1, 20, 1), Span(3, 0, 64)],
        [Span(0, 52, 1), Span(1, 21, 1), Span(2, 9, 30)],
    ]
    for spans in steps:
        tokens = sum(span.length for span in spans)
        ids = torch.randint(2, 4096, (tokens,), generator=generator).cuda()
        rows = list(range(tokens))
        packed = stage(ids, spans, rows).float()  # writes the same keys the loop then reads
        stage.packed_attention = False
        looped = stage(ids, spans, rows).float()
        stage.packed_attention = True
        error = ((packed - looped).norm() / looped.norm()).item()
        print(f"packed vs per-chunk attention, relative logit error: {error:.2e}")
        assert error < 1e-2


# the attention kernels' shapes: (dtype, heads, KV heads, head size)
ATTENTION_SHAPES = [
    (torch.bfloat16, 32, 8, 128),  # Llama 3 8B's heads
    (torch.float32, 32, 8, 128),
    (torch.bfloat16, 8, 8, 64),  # no grouping
    (torch.float32, 9, 3, 32),  # a group of 3: not a power of two
]


CONTEXT = 768  # the attention tests' context bound


def random_caches(
    dtype: torch.dtype, kv_heads: int, head_dim: int
) -> tuple[torch.Generator, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A seeded generator, random key and value caches of 12 slots, and 10 rows' slots (out
    of order)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    shape = (12, kv_heads, 1024, head_dim)
    k_cache = torch.randn(shape, device="cuda", dtype=dtype, generator=generator)
    v_cache = torch.randn(shape, device="cuda", dtype=dtype, generator=generator)
    rows = torch.tensor([11, 0, 5, 3, 9, 1, 7, 2, 10, 4], device="cuda")
    return generator, k_cache, v_cache, rows


@pytest.mark.parametrize(("dtype", "heads", "kv_heads", "head_dim"), ATTENTION_SHAPES)
def test_in_place_decode_attention_equals_gathered(dtype, heads, kv_heads, head_dim) -> None:
    """The Triton kernel that reads each slot's keys in place gives what gathering them and
    scaled_dot_product_attention give: lengths of one key, at block and split boundaries, up
    to the context bound, slots out of order."""
    assert decode_attention.available(torch.device("cuda"), head_dim)
    generator, k_cache, v_cache, rows = random_caches(dtype, kv_heads, head_dim)
    context = CONTEXT
    lengths = torch.tensor([1, 2, 63, 64, 65, 96, 97, 500, 767, 768], device="cuda")
    q = torch.randn((len(rows), heads, head_dim), device="cuda", dtype=dtype, generator=generator)
    ours = decode_attention.decode_attention(q, k_cache, v_cache, rows, lengths, context)
    keys = k_cache[:, :, :context].index_select(0, rows).float()
    values = v_cache[:, :, :context].index_select(0, rows).float()
    mask = (torch.arange(context, device="cuda") < lengths[:, None])[:, None, None, :]
    theirs = torch.nn.functional.scaled_dot_product_attention(
        q.float().unsqueeze(2), keys, values, attn_mask=mask, enable_gqa=True
    ).squeeze(2)
    assert ours.dtype == dtype and ours.shape == q.shape
    error = ((ours.float() - theirs).norm() / theirs.norm()).item()
    print(f"in-place decode attention, {dtype}, relative error: {error:.2e}")
    assert error < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize(("dtype", "heads", "kv_heads", "head_dim"), ATTENTION_SHAPES)
def test_fused_decode_step_equals_rotary_cache_write_and_attention(
    dtype, heads, kv_heads, head_dim
) -> None:
    """The decode step's one kernel gives what apply_rotary, KVCache.update and the in-place
    attention give, eager and compiled: the same output, the new keys and values at their
    positions (at block and split boundaries, the first and the last position), and nothing
    else in the cache changed."""
    assert decode_attention.fused(torch.device("cuda"), head_dim)
    generator, k_cache, v_cache, rows = random_caches(dtype, kv_heads, head_dim)
    shape, context = k_cache.shape, CONTEXT
    positions = torch.tensor([0, 1, 62, 63, 64, 95, 96, 499, 766, 767], device="cuda")
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn((len(rows), width), device="cuda", dtype=dtype, generator=generator)
    cos, sin = rotary_at(positions, head_dim)

    theirs_k, theirs_v = k_cache.clone(), v_cache.clone()
    q = rotate_and_write(qkv, cos, sin, theirs_k, theirs_v, rows, positions, heads)
    where = (rows, positions + 1, context)
    theirs = decode_attention.decode_attention(q, theirs_k, theirs_v, *where).float()

    step = decode_attention.decode_step_attention
    for run in (step, torch.compile(step, fullgraph=True)):
        ours_k, ours_v = k_cache.clone(), v_cache.clone()
        ours = run(qkv, cos, sin, ours_k, ours_v, rows, positions, context, heads)
        assert ours.dtype == dtype and ours.shape == q.shape
        error = ((ours.float() - theirs).norm() / theirs.norm()).item()
        print(f"fused decode step, {dtype}, relative error: {error:.2e}")
        assert error < (1e-2 if dtype == torch.bfloat16 else 1e-5)
        tolerance = {"atol": 2e-2, "rtol": 1e-2} if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(ours_k, theirs_k, **tolerance)
        torch.testing.assert_close(ours_v, theirs_v, atol=0, rtol=0)  # v is only copied
        written = torch.zeros(shape[0], shape[2], dtype=torch.bool, device="cuda")
        written[rows, positions] = True
        untouched = ~written[:, None, :, None].expand(shape)
        assert torch.equal(ours_k[untouched], k_cache[untouched])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_activation_kernel_equals_silu_times_up(dtype, rows) -> None:
    """worker/silu_mul.py's kernel gives silu(gate) * up: widths that are and are not a
    multiple of its block, one row and many, eager and compiled (as the decode graphs run it)."""
    assert silu_mul.available(torch.device("cuda"))
    generator = torch.Generator(device="cuda").manual_seed(0)
    for width in (14336, 1000):
        gate_up = torch.randn((rows, 2 * width), device="cuda", dtype=dtype, generator=generator)
        gate, up = gate_up.float().chunk(2, dim=-1)
        theirs = torch.nn.functional.silu(gate) * up
        for ours in (silu_mul.silu_mul(gate_up), torch.compile(silu_mul.silu_mul)(gate_up)):
            assert ours.dtype == dtype and ours.shape == (rows, width)
            error = ((ours.float() - theirs).norm() / theirs.norm()).item()
            assert error < (4e-3 if dtype == torch.bfloat16 else 1e-6), error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_rms_norm_kernel_equals_the_torch_norm(dtype, rows) -> None:
    """worker/rms_norm.py's kernel gives RMSNorm's torch expression (fp32 mean square, rounded
    to the dtype, times the weight): a power-of-two width and one the block masks, one row and
    many, eager and compiled (as the decode graphs run it)."""
    assert rms_norm.available(torch.device("cuda"))
    generator = torch.Generator(device="cuda").manual_seed(0)
    for width in (4096, 1000):
        x = torch.randn((rows, width), device="cuda", dtype=dtype, generator=generator) * 5
        weight = torch.randn(width, device="cuda", dtype=dtype, generator=generator)
        normed = torch.nn.functional.rms_norm(x.float(), (width,), eps=1e-5)
        theirs = (weight * normed.to(dtype)).float()
        kernel = partial(rms_norm.rms_norm, eps=1e-5)
        for ours in (kernel(x, weight), torch.compile(kernel)(x, weight)):
            assert ours.dtype == dtype and ours.shape == (rows, width)
            error = ((ours.float() - theirs).norm() / theirs.norm()).item()
            assert error < (4e-3 if dtype == torch.bfloat16 else 1e-6), error


def test_rotary_tables_kernel_equals_the_torch_tables() -> None:
    """decode_attention.rotary_tables' kernel gives worker/model.py's cos and sin (what a fused
    decode step rotates by), at positions up to 128K with Llama 3's frequencies."""
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, device="cuda").float() / 128)
    positions = torch.tensor([0, 1, 255, 1000, 8191, 131071], device="cuda")
    theirs = rotary_tables(positions, inv_freq)
    for run in (decode_attention.rotary_tables, torch.compile(decode_attention.rotary_tables)):
        for ours, table in zip(run(positions, inv_freq), theirs, strict=True):
            assert ours.dtype == torch.float32 and ours.shape == (6, 128)
            error = (ours - table).abs().max().item()
            assert error < 1e-5, error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "rows, width", [(6144, 4096), (4096, 14336), (128256, 4096), (1000, 576), (37, 100)]
)
def test_gemv_kernel_equals_the_torch_products(dtype, rows, width) -> None:
    """worker/gemv.py's one-row product gives the layer's torch expressions: the RMS norm then
    the product (plus the bias), the product plus the residual, the fp32 logits; Llama 3 8B's
    qkv, down and lm_head shapes, SmolLM2-135M's hidden size and a width the blocks mask; eager
    and compiled (as the decode graphs run it)."""
    assert gemv.available(torch.device("cuda"))
    generator = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        out = torch.randn(shape, device="cuda", generator=generator) * scale
        return out.to(dtype)

    x, weight = randn(1, width, scale=3.0), randn(rows, width, scale=width**-0.5)
    norm, bias, residual = randn(width), randn(rows), randn(1, rows)
    normed = (norm * torch.nn.functional.rms_norm(x.float(), (width,), eps=1e-5).to(dtype)).float()
    cases = [
        (dict(norm=norm, eps=1e-5, bias=bias), normed @ weight.float().T + bias.float()),
        (dict(residual=residual), x.float() @ weight.float().T + residual.float()),
        (dict(norm=norm, eps=1e-5, fp32_out=True), normed @ weight.float().T),
    ]
    for keywords, theirs in cases:
        kernel = partial(gemv.gemv, **keywords)
        for ours in (kernel(x, weight), torch.compile(kernel)(x, weight)):
            wanted = torch.float32 if keywords.get("fp32_out") else dtype
            assert ours.dtype == wanted and ours.shape == theirs.shape
            error = ((ours.float() - theirs).norm() / theirs.norm()).item()
            assert error < (1e-2 if dtype == torch.bfloat16 else 1e-5), (keywords.keys(), error)

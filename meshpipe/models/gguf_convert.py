"""Turn a Llama-architecture GGUF file into a Hugging Face layout directory in float32.

Beside `model.safetensors` (float32, what transformers and every batched step read) the directory
keeps the GGUF's own Q4_1 and Q8_0 blocks in `blocks.safetensors`, unpacked into plain arrays: a
CPU worker runs single-token steps on them (worker/blocks.py), reading a quarter of the bytes for
numerically the same weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from rich.console import Console
from rich.progress import Progress
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from meshpipe.models.errors import GGUFError

# llama.cpp tensor names -> Hugging Face Llama names.
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# `tokenizer.ggml.pre` values whose llama.cpp pre-tokenizer splits every digit off first.
DIGIT_SPLIT_PRE = {"smollm", "starcoder"}
PLAIN_BYTE_LEVEL_PRE = {"default", "gpt-2", "gpt2"}
BLOCKS_FILE = "blocks.safetensors"
# Errors the gguf library and numpy raise on malformed or truncated input.
READ_ERRORS = (ValueError, IndexError, KeyError, TypeError, struct.error, UnicodeDecodeError)


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> None:
    """Dequantize `gguf_path` and write it as an HF Llama directory at `out_dir`, atomically."""
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    reader = _open(gguf_path)
    metadata = _metadata(reader, gguf_path)
    config = hf_config(metadata, {tensor.name for tensor in reader.tensors})
    config["meshpipe_source"] = _source(gguf_path, metadata)
    tokenizer = build_tokenizer(metadata)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent)
    )
    try:
        staging.chmod(0o755)
        _write_tensors(reader, config, staging / "model.safetensors", gguf_path, progress)
        _write_blocks(reader, config, staging / BLOCKS_FILE)
        tokenizer.save(str(staging / "tokenizer.json"))
        _write_json(staging / "tokenizer_config.json", tokenizer_config(metadata))
        _write_json(staging / "generation_config.json", generation_config(metadata))
        _write_json(staging / "config.json", config)
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _open(gguf_path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(gguf_path)
    except READ_ERRORS as exc:
        detail = _first_line(exc)
        raise GGUFError(f"{gguf_path.name} is truncated or not a GGUF file ({detail})") from exc


def _metadata(reader: gguf.GGUFReader, gguf_path: Path) -> dict[str, Any]:
    try:
        return {key: field.contents() for key, field in reader.fields.items()}
    except READ_ERRORS as exc:
        raise GGUFError(f"{gguf_path.name} has unreadable metadata ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _require(metadata: dict[str, Any], key: str) -> Any:
    if key not in metadata:
        raise GGUFError(f"GGUF metadata has no {key!r}")
    return metadata[key]


def _float32(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (9.99999e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def hf_config(metadata: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """The HF `config.json` of the Llama model the metadata describes."""
    arch = _require(metadata, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    scaling = metadata.get("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_names:
        raise GGUFError("GGUF files with RoPE scaling are not supported yet")
    heads = _require(metadata, "llama.attention.head_count")
    hidden = _require(metadata, "llama.embedding_length")
    tokens = _require(metadata, "tokenizer.ggml.tokens")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": _require(metadata, "llama.feed_forward_length"),
        "num_hidden_layers": _require(metadata, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": metadata.get("llama.attention.head_count_kv", heads),
        "head_dim": metadata.get("llama.attention.key_length", hidden // heads),
        "hidden_act": "silu",
        "rms_norm_eps": _float32(_require(metadata, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32(metadata.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": _require(metadata, "llama.context_length"),
        "vocab_size": metadata.get("llama.vocab_size", len(tokens)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def _source(gguf_path: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    file_type = metadata.get("general.file_type")
    try:
        file_type = gguf.LlamaFileType(file_type).name if file_type is not None else None
    except ValueError:
        pass
    return {
        "format": "gguf",
        "file": gguf_path.name,
        "sha256": file_sha256(gguf_path),
        "name": metadata.get("general.name"),
        "file_type": file_type,
        "converter": "meshpipe.models.gguf_convert",
    }


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def hf_tensor_name(gguf_name: str) -> str:
    """The HF Llama name of a llama.cpp tensor, e.g. blk.3.attn_q.weight -> model.layers.3...."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    prefix, _, rest = gguf_name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix != "blk" or not layer.isdigit() or suffix not in LAYER_TENSORS:
        raise GGUFError(f"GGUF tensor {gguf_name!r} has no Llama counterpart")
    return f"model.layers.{layer}.{LAYER_TENSORS[suffix]}"


def unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (it interleaves the two rotary halves of each head)."""
    # llama.cpp wrote reshape(n_head, 2, half, ...).swapaxes(1, 2); swapping back restores HF rows.
    half = weight.shape[0] // n_head // 2
    interleaved = weight.reshape(n_head, half, 2, *weight.shape[1:])
    return interleaved.swapaxes(1, 2).reshape(weight.shape)


def _dequantize(tensor: Any, config: dict[str, Any]) -> np.ndarray:
    shape = tuple(int(dim) for dim in reversed(tensor.shape))  # GGUF lists dims fastest-first
    weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    weight = np.asarray(weight, dtype=np.float32).reshape(shape)
    if tensor.name.endswith(".attn_q.weight"):
        weight = unpermute_rows(weight, config["num_attention_heads"])
    elif tensor.name.endswith(".attn_k.weight"):
        weight = unpermute_rows(weight, config["num_key_value_heads"])
    return weight


def _safetensors_header(entries: list[tuple[str, tuple[int, ...]]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        size = 4 * math.prod(shape)
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps the tensor data 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _write_tensors(
    reader: gguf.GGUFReader, config: dict[str, Any], path: Path, gguf_path: Path, progress: bool
) -> None:
    """Stream every tensor into one safetensors file, so only one tensor is in memory at a time."""
    tensors = list(reader.tensors)
    entries = [(hf_tensor_name(t.name), tuple(int(d) for d in reversed(t.shape))) for t in tensors]
    total = sum(4 * math.prod(shape) for _, shape in entries)
    console = Console(stderr=True)
    with path.open("wb") as file, Progress(console=console, disable=not progress) as bar:
        task = bar.add_task(f"Converting {gguf_path.name}", total=total)
        file.write(_safetensors_header(entries))
        for tensor in tensors:
            try:
                weight = _dequantize(tensor, config)
            except READ_ERRORS as exc:
                raise GGUFError(
                    f"{gguf_path.name}: cannot read tensor {tensor.name} ({exc})"
                ) from exc
            file.write(np.ascontiguousarray(weight, dtype="<f4").data)
            bar.advance(task, weight.nbytes)


def block_arrays(tensor: Any, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """The Q4_1 or Q8_0 blocks of one GGUF tensor as arrays named after the GGUF fields, rows in
    HF order: `qs` `[rows, blocks, 16]` uint8 (Q4_1: low nibble = element j, high = j + 16) or
    `[rows, blocks, 32]` int8 (Q8_0), `d` (and Q4_1's `m`) `[rows, blocks]` float16.
    Dequantized, element j of a block is `d * q_j + m` (Q4_1) or `d * q_j` (Q8_0)."""
    rows = int(tensor.shape[-1])
    kind = gguf.GGMLQuantizationType(tensor.tensor_type)
    raw = np.asarray(tensor.data, dtype=np.uint8).reshape(rows, -1)
    if kind == gguf.GGMLQuantizationType.Q4_1:
        blocks = raw.reshape(rows, -1, 20)  # d fp16, m fp16, 16 bytes of nibbles
        fields = {"d": blocks[..., 0:2], "m": blocks[..., 2:4]}
        arrays = {name: value.copy().view(np.float16)[..., 0] for name, value in fields.items()}
        arrays["qs"] = blocks[..., 4:].copy()
    else:
        blocks = raw.reshape(rows, -1, 34)  # d fp16, 32 int8
        arrays = {"d": blocks[..., 0:2].copy().view(np.float16)[..., 0]}
        arrays["qs"] = blocks[..., 2:].copy().view(np.int8)
    heads = {".attn_q.weight": "num_attention_heads", ".attn_k.weight": "num_key_value_heads"}
    for suffix, key in heads.items():
        if tensor.name.endswith(suffix):
            arrays = {name: unpermute_rows(value, config[key]) for name, value in arrays.items()}
    return {name: np.ascontiguousarray(value) for name, value in arrays.items()}


def _write_blocks(reader: gguf.GGUFReader, config: dict[str, Any], path: Path) -> None:
    """Keep the Q4_1 and Q8_0 tensors' own blocks (about a quarter of the float32 bytes)."""
    kinds = {gguf.GGMLQuantizationType.Q4_1: "q4_1", gguf.GGMLQuantizationType.Q8_0: "q8_0"}
    arrays: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        kind = kinds.get(gguf.GGMLQuantizationType(tensor.tensor_type))
        if kind is None or len(tensor.shape) != 2:
            continue
        name = hf_tensor_name(tensor.name)
        for field, value in block_arrays(tensor, config).items():
            arrays[f"{name}.{kind}.{field}"] = value
    if arrays:
        save_file(arrays, str(path))
        path.chmod(0o644)


def build_tokenizer(metadata: dict[str, Any]) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from the GGUF vocabulary and merges."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"GGUF tokenizer {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = _require(metadata, "tokenizer.ggml.tokens")
    merges = [tuple(merge.split(" ", 1)) for merge in _require(metadata, "tokenizer.ggml.merges")]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(metadata.get("tokenizer.ggml.pre", "default"))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _post_processor(metadata, tokens)
    kinds = metadata.get("tokenizer.ggml.token_type", [])
    tokenizer.add_special_tokens(_added(tokens, kinds, gguf.TokenType.CONTROL, special=True))
    tokenizer.add_tokens(_added(tokens, kinds, gguf.TokenType.USER_DEFINED, special=False))
    return tokenizer


def _added(tokens: list[str], kinds: list[int], kind: int, special: bool) -> list[AddedToken]:
    return [
        AddedToken(token, special=special, normalized=False)
        for token, token_kind in zip(tokens, kinds, strict=False)
        if token_kind == kind
    ]


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in PLAIN_BYTE_LEVEL_PRE:
        return byte_level
    if pre in DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise GGUFError(f"GGUF pre-tokenizer {pre!r} is not supported yet")


def _post_processor(metadata: dict[str, Any], tokens: list[str]) -> processors.PostProcessor:
    byte_level = processors.ByteLevel(trim_offsets=False)
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    if not metadata.get("tokenizer.ggml.add_bos_token", False) or bos_id is None:
        return byte_level
    bos = tokens[bos_id]
    template = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )
    return processors.Sequence([byte_level, template])


def _token(metadata: dict[str, Any], key: str) -> str | None:
    index = metadata.get(f"tokenizer.ggml.{key}_token_id")
    tokens = metadata["tokenizer.ggml.tokens"]
    return tokens[index] if index is not None and 0 <= index < len(tokens) else None


def tokenizer_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """`tokenizer_config.json`: special token strings, chat template and context length."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": _token(metadata, "bos"),
        "eos_token": _token(metadata, "eos"),
        "unk_token": _token(metadata, "unknown"),
        "pad_token": _token(metadata, "padding"),
        "chat_template": metadata.get("tokenizer.chat_template"),
        "model_max_length": metadata.get("llama.context_length"),
        "clean_up_tokenization_spaces": False,
    }
    return {key: value for key, value in config.items() if value is not None}


def generation_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """`generation_config.json`: BOS, every end-of-turn id as EOS, and padding."""
    stops = [metadata.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    eos = list(dict.fromkeys(token for token in stops if token is not None))
    config = {
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
    }
    return {key: value for key, value in config.items() if value is not None}


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

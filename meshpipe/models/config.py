"""The shape of a Llama-family model, read from a Hugging Face `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshpipe.models.errors import ModelError

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    """What the engine needs to build a Llama/SmolLM2/Qwen2/Mistral decoder."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    rope_scaling: dict[str, Any] | None  # e.g. llama3 scaling; stored, applied by the engine
    sliding_window: int | None = None

    @classmethod
    def from_dir(cls, path: Path) -> ModelConfig:
        """Read `config.json` (and `generation_config.json` when present) from a model directory."""
        path = Path(path)
        config = _read_json(path / "config.json")
        if config is None:
            raise ModelError(f"{path} has no config.json")
        return cls.from_dict(config, _read_json(path / "generation_config.json"))

    @classmethod
    def from_dict(
        cls, config: dict[str, Any], generation: dict[str, Any] | None = None
    ) -> ModelConfig:
        """Build from parsed `config.json` and optional `generation_config.json` contents."""
        model_type = config.get("model_type", "llama")
        if model_type not in SUPPORTED_TYPES:
            raise ModelError(
                f"model_type {model_type!r} is not supported ({', '.join(SUPPORTED_TYPES)})"
            )
        try:
            return cls._build(model_type, config, generation or {})
        except KeyError as exc:
            raise ModelError(f"config.json has no {exc.args[0]!r}") from exc

    @classmethod
    def _build(
        cls, model_type: str, config: dict[str, Any], generation: dict[str, Any]
    ) -> ModelConfig:
        heads = config["num_attention_heads"]
        rope = config.get("rope_parameters") or {}  # transformers 5 nests rope settings here
        uses_window = config.get("use_sliding_window", model_type == "mistral")
        return cls(
            model_type=model_type,
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            vocab_size=config["vocab_size"],
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=_eos_ids(config.get("eos_token_id"), generation.get("eos_token_id")),
            rope_scaling=_rope_scaling(config.get("rope_scaling"), rope),
            sliding_window=config.get("sliding_window") if uses_window else None,
        )


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelError(f"{path} is not valid JSON ({exc})") from exc


def _eos_ids(*values: int | list[int] | None) -> tuple[int, ...]:
    """Every end-of-sequence id from config and generation config, in order, without repeats."""
    ids: list[int] = []
    for value in values:
        ids += [value] if isinstance(value, int) else list(value or [])
    return tuple(dict.fromkeys(ids))


def _rope_scaling(scaling: dict[str, Any] | None, rope: dict[str, Any]) -> dict[str, Any] | None:
    """The scaling dict, whether given as `rope_scaling` or inside `rope_parameters`."""
    if not scaling:
        scaling = {key: value for key, value in rope.items() if key != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return None if kind == "default" else dict(scaling)

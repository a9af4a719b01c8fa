"""Text in and out: the chat template, the tokenizer, incremental detokenization, stop strings."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from gateway.errors import InvalidRequest


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


class ChatFormat:
    """A model's tokenizer and chat template (from tokenizer.json and tokenizer_config.json)."""

    def __init__(self, model_dir: Path) -> None:
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined
        )
        environment.globals["raise_exception"] = _raise_exception
        environment.filters["tojson"] = lambda value, **kwargs: json.dumps(value, **kwargs)
        template = config.get("chat_template") or DEFAULT_TEMPLATE
        self.template = environment.from_string(template)

    def render(self, messages: list[dict[str, Any]]) -> str:
        try:
            return self.template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as error:
            message = f"messages rejected by the chat template: {error}"
            raise InvalidRequest(message, "messages") from None

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of the rendered conversation (special tokens come from the template)."""
        return self.tokenizer.encode(self.render(messages), add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("content", "")
    return value or ""


# ChatML, for a model directory that ships no template.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class Detokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a UTF-8 character.

    Decodes only a short window of recent ids each time (the prefix re-decoded gives the
    context that byte-level BPE needs for spaces)."""

    format: ChatFormat
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.format.decode(self.ids[self.prefix_offset : self.read_offset])
        after = self.format.decode(self.ids[self.prefix_offset :])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""  # an incomplete character, or a token that adds no text (special)
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before) :]


@dataclass
class StopMatcher:
    """Holds back text that might be the start of a stop sequence; finds the first full one."""

    stops: list[str]
    pending: str = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Text that is safe to emit, and whether a stop sequence was reached."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [index for stop in self.stops if (index := self.pending.find(stop)) >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = self._held_back()
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of pending that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:size]):
                    best = size
                    break
        return best

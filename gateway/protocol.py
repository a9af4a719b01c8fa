"""The OpenAI completion requests (chat and legacy text), validated at the HTTP boundary."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 8  # n: each choice is a sequence of its own in a KV slot
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI's
MAX_COMPLETION_LOGPROBS = 5  # the text completion's logprobs, as OpenAI's


class Strict(BaseModel):
    """Fields take their own JSON types, as OpenAI's API: "3" is no max_tokens and "yes" no
    stream (pydantic's lax mode took both)."""

    model_config = ConfigDict(strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        # said plainly: the union's own error for an image part is "Input should be a valid string"
        if isinstance(value, list):
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind is not None and kind != "text":
                    raise PydanticCustomError(
                        "unsupported_content",
                        "content parts of type '{kind}' are not supported: the model reads text",
                        {"kind": kind},
                    )
        return value

    @model_validator(mode="after")
    def _content_unless_assistant(self) -> Message:
        # as OpenAI's API: only an assistant's turn (one that called tools) may omit its content
        if self.content is None and self.role != "assistant":
            raise PydanticCustomError(
                "missing_content", "a {role} message needs content", {"role": self.role}
            )
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


# Fields meshpipe does not implement, with the values that ask for nothing (accepted).
UNHONOURED = {
    "tools": lambda value: not value,
    "functions": lambda value: not value,
    "tool_choice": lambda value: value in (None, "none"),
    "function_call": lambda value: value in (None, "none"),
    "response_format": lambda value: (
        value is None or (isinstance(value, dict) and value.get("type") == "text")
    ),
    "logit_bias": lambda value: not value,
}


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingRequest(Strict):
    """What both completion endpoints share. Other OpenAI fields are accepted and ignored
    (`user`, `metadata`, ...), except those that would change the answer (`UNHONOURED`)."""

    model_config = ConfigDict(extra="allow")  # and strict, as every Strict model

    model: str
    stream: bool = False
    max_tokens: Annotated[int, Field(gt=0)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not stop for stop in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @model_validator(mode="after")
    def _unsupported_fields(self) -> SamplingRequest:
        """Fields that change what is generated are refused when meshpipe cannot honour them,
        rather than ignored: a client asking for tools or JSON would get plain text."""
        extra = self.model_extra or {}
        for name, honoured in UNHONOURED.items():
            if name in extra and not honoured(extra[name]):
                raise PydanticCustomError(
                    "unsupported", "not supported by meshpipe", {"name": name}
                )
        return self

    def stop_sequences(self) -> list[str]:
        return list(self.stop or [])

    def token_limit(self) -> int | None:
        return self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def logprob_count(self) -> int | None:
        """None: no log-probabilities; else how many likeliest alternatives each token has."""
        return None


class ChatCompletionRequest(SamplingRequest):
    """`POST /v1/chat/completions`: messages rendered through the model's chat template."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(gt=0)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    """`POST /v1/completions`: one prompt (text, or token ids) continued as it is, no template.

    As OpenAI's, `max_tokens` defaults to 16 and `echo` puts the prompt before the answer.
    One prompt per request; `logprobs` and `suffix` are refused rather than ignored."""

    prompt: str | list[int]
    max_tokens: Annotated[int, Field(gt=0)] | None = 16
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> str | list[int]:
        if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
            if len(value) > 1:
                raise ValueError("one prompt per request")
            value = value[0]
        is_ids = isinstance(value, list) and all(type(item) is int for item in value)
        if not (isinstance(value, str) or is_ids):
            raise ValueError("the prompt must be a string or a list of token ids")
        if not value:
            raise ValueError("the prompt must not be empty")
        return value

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("echo"):
            raise ValueError("logprobs of the prompt (with echo) are not supported")
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> None:
        if value:
            raise ValueError("suffix is not supported")
        return None

    def logprob_count(self) -> int | None:
        return self.logprobs

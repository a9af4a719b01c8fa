"""`meshpipe chat`: a streaming chat in the terminal, with the conversation's history.

Reads one message per line from standard input and streams the answer as it is generated.
`/reset` forgets the history, `/quit` (or end of input) leaves. Ctrl-C while an answer streams
stops that answer (closing the stream frees its slot in the gateway) and keeps the chat going.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from meshpipe.client import GatewayClient, GatewayError

PROMPT = "you> "
HELP = "/reset forgets the conversation, /quit leaves (so does Ctrl-D)"


@dataclass(frozen=True)
class ChatSettings:
    """What `meshpipe chat` is told on its command line."""

    model: str = ""
    system: str = ""
    max_tokens: int = 512
    temperature: float | None = None
    seed: int | None = None


@dataclass
class Conversation:
    """The messages so far, sent whole with every turn."""

    system: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        self.messages.clear()

    def request(self, settings: ChatSettings, model: str) -> dict[str, Any]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        body: dict[str, Any] = {
            "model": model,
            "messages": system + self.messages,
            "max_tokens": settings.max_tokens,
        }
        if settings.temperature is not None:
            body["temperature"] = settings.temperature
        if settings.seed is not None:
            body["seed"] = settings.seed
        return body


def _read_line(interactive: bool, source: TextIO) -> str | None:
    """The next line the user typed; None at end of input."""
    if interactive:
        try:
            return input(PROMPT)
        except EOFError:
            return None
    line = source.readline()
    return None if not line else line.rstrip("\n")


def _answer(client: GatewayClient, body: dict[str, Any], out: TextIO) -> str:
    """Stream one answer to `out`; returns its text (what arrived, if interrupted)."""
    parts: list[str] = []
    try:
        for text in client.stream_chat(body):
            parts.append(text)
            out.write(text)
            out.flush()
    except KeyboardInterrupt:
        out.write(" [stopped]")
    out.write("\n")
    out.flush()
    return "".join(parts)


def chat(
    client: GatewayClient,
    settings: ChatSettings,
    source: TextIO = sys.stdin,
    out: TextIO = sys.stdout,
) -> None:
    """The chat loop, until /quit or the end of input."""
    model = settings.model or client.models()[0]
    interactive = source.isatty()
    if interactive:
        out.write(f"chatting with {model} at {client.url}; {HELP}\n")
    conversation = Conversation(settings.system)
    while (line := _read_line(interactive, source)) is not None:
        line = line.strip()
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            conversation.reset()
            out.write("(conversation forgotten)\n")
            continue
        if not line or line.startswith("/"):
            out.write(f"{HELP}\n" if line else "")
            continue
        conversation.messages.append({"role": "user", "content": line})
        try:
            reply = _answer(client, conversation.request(settings, model), out)
        except GatewayError as error:
            conversation.messages.pop()
            out.write(f"\nerror: {error}\n")
            continue
        conversation.messages.append({"role": "assistant", "content": reply})

"""The console in a real browser: Debian's chromium, headless, driven by Playwright, against a
live `meshpipe auto` with two stages. Each test leaves a screenshot in artifacts/."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from tests.cluster import Cluster, start_auto

CHROMIUM = Path("/usr/bin/chromium")
# Nothing but loopback: no GPU, no QUIC to the outside, no background fetches of any kind.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
QUESTION = "Write a short poem about the sea."
MAX_TOKENS = 40

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"
)


@dataclass
class Console:
    """A browser tab on the console, with every error it reported."""

    page: Page
    cluster: Cluster
    errors: list[str] = field(default_factory=list)

    def record(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text} ({message.location})")

    def wait_live(self) -> None:
        expect(self.page.locator("#feed-state")).to_have_attribute("data-state", "live")
        expect(self.page.locator("#topology g.node.stage")).to_have_count(2, timeout=15_000)


@pytest.fixture(scope="module")
def console_cluster(default_model: Path) -> Iterator[Cluster]:
    """A cluster of its own: the last test kills one of its workers."""
    running = start_auto(default_model, 2, "--verbose")
    yield running
    running.process.stop()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "console-cluster.log").write_text(running.process.output())


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def console(
    browser: Browser, console_cluster: Cluster, request: pytest.FixtureRequest
) -> Iterator[Console]:
    context = browser.new_context(viewport={"width": 1440, "height": 1000}, color_scheme="dark")
    page = context.new_page()
    tab = Console(page, console_cluster)
    page.on("console", tab.record)
    page.on("pageerror", lambda error: tab.errors.append(f"page: {error}"))
    page.goto(f"{console_cluster.url}/")
    yield tab
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"console-{request.node.name}.png", full_page=True)
    context.close()


def test_page_loads_without_console_errors(console: Console) -> None:
    console.wait_live()
    page = console.page
    expect(page.locator("#pipeline-state")).to_have_attribute("data-state", "ready")
    expect(page.locator("#chat-model option")).to_have_count(1)
    expect(page.locator("#models tbody")).to_contain_text(console.cluster.model)
    expect(page.locator("#models tbody")).to_contain_text("served")
    page.wait_for_timeout(2500)  # a few live updates, the charts redrawn each time
    assert console.errors == []


def test_shows_both_stages_with_their_layer_ranges(console: Console) -> None:
    console.wait_live()
    stages = console.cluster.status()["stages"]
    assert len(stages) == 2
    for stage in stages:
        start, end = stage["layers"]
        node = console.page.locator(f'#topology g.node.stage[data-worker="{stage["worker_id"]}"]')
        expect(node).to_contain_text(f"stage {stage['index']}")
        expect(node).to_contain_text(f"layers [{start}, {end})")
        expect(node).to_contain_text(f"pid {stage['pid']}")
        expect(node).to_have_attribute("data-state", "ready")
        expect(console.page.locator("#layer-map")).to_contain_text(f"[{start}, {end})")
    assert console.errors == []


def test_chat_message_streams_an_answer(console: Console) -> None:
    console.wait_live()
    page = console.page
    page.fill("#chat-max-tokens", str(MAX_TOKENS))
    page.fill("#chat-temperature", "0")
    page.fill("#chat-input", QUESTION)
    page.click("#chat-send")
    # Part of the answer is on the page while the rest is still being generated.
    page.wait_for_function(
        "() => { const m = document.querySelector('.message.assistant.streaming');"
        " return m && m.textContent.length > 0; }",
        polling="raf",
        timeout=60_000,
    )
    expect(page.locator(".message.assistant .meta")).to_contain_text("finished", timeout=60_000)
    answer = page.evaluate("document.querySelector('.message.assistant').firstChild.nodeValue")
    expect(page.locator("#chat-stats")).to_contain_text("tok/s")

    reference = httpx.post(
        f"{console.cluster.url}/v1/chat/completions",
        json={
            "model": console.cluster.model,
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        },
        timeout=120,
    ).json()
    assert answer == reference["choices"][0]["message"]["content"]
    tokens = reference["usage"]["completion_tokens"]
    expect(page.locator("#chat-stats")).to_contain_text(f"{tokens} tokens")
    assert console.errors == []


# Runs last in this module: it leaves the cluster with one worker.
def test_killed_worker_shows_as_lost(console: Console) -> None:
    console.wait_live()
    page = console.page
    status = console.cluster.status()
    victim, num_layers = status["stages"][1], status["pipeline"]["num_layers"]
    node = page.locator(f'#topology g.node[data-worker="{victim["worker_id"]}"]')
    expect(node).to_have_attribute("data-state", "ready")

    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    expect(node).to_have_attribute("data-state", "lost", timeout=5_000)
    shown_after = time.monotonic() - killed_at
    expect(node).to_contain_text("lost")
    expect(page.locator("#events")).to_contain_text(f"{victim['worker_id']} left")
    # The gateway plans a route over the worker left; the graph follows.
    survivor = page.locator("#topology g.node.stage")
    expect(survivor).to_have_count(1, timeout=60_000)
    expect(survivor).to_contain_text(f"layers [0, {num_layers})", timeout=60_000)
    expect(survivor).to_have_attribute("data-state", "ready", timeout=60_000)
    print(f"lost worker shown {shown_after:.2f}s after SIGKILL")
    assert console.errors == []

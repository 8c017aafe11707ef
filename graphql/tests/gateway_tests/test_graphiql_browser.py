"""GraphiQL in a real browser (Debian's chromium driven by Playwright): the page renders, a query
and a subscription run from the run button, the Headers tab's headers are sent, and no request
leaves 127.0.0.1."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

CHROMIUM = Path(os.environ.get("GPUDECK_TEST_CHROMIUM", "/usr/bin/chromium"))
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

QUERY_EDITOR = ".graphiql-query-editor .CodeMirror"
HEADERS_EDITOR = ".graphiql-editor-tool .graphiql-editor:not(.hidden) .CodeMirror"  # tab open

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"no chromium at {CHROMIUM}: `apt-get install chromium` to run the GraphiQL test",
    ),
]

playwright_api = pytest.importorskip("playwright.async_api")


class Traffic:
    """Every URL the page asked for (HTTP and websockets), and what was sent on websockets."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.blocked: list[str] = []
        self.ws_sent: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.graphql_headers: list[dict[str, str]] = []
        self.graphql_bodies: list[str] = []

    def foreign(self) -> list[str]:
        return [u for u in self.urls if urlsplit(u).hostname != "127.0.0.1"]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield browser
        await browser.close()


async def open_graphiql(browser: Any, url: str, traffic: Traffic) -> Any:
    context = await browser.new_context()

    async def only_local(route: Any) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            await route.continue_()
        else:
            traffic.blocked.append(route.request.url)
            await route.abort()

    await context.route("**/*", only_local)
    page = await context.new_page()

    def on_request(request: Any) -> None:
        traffic.urls.append(request.url)
        if urlsplit(request.url).path == "/graphql" and request.method == "POST":
            traffic.graphql_headers.append(request.headers)
            traffic.graphql_bodies.append(request.post_data or "")

    def on_websocket(ws: Any) -> None:
        traffic.urls.append(ws.url)
        ws.on("framesent", lambda payload: traffic.ws_sent.append(json.loads(payload)))

    page.on("request", on_request)
    page.on("websocket", on_websocket)
    page.on("pageerror", lambda exc: traffic.problems.append(f"page error: {exc}"))
    page.on(
        "console",
        lambda msg: (
            traffic.problems.append(f"console: {msg.text}") if msg.type == "error" else None
        ),
    )
    await page.goto(url)
    await page.wait_for_selector(".graphiql-container .graphiql-query-editor .CodeMirror")
    return page


async def set_editor(page: Any, selector: str, text: str) -> None:
    """Replace an editor's text as typing would; GraphiQL takes it in after a short debounce
    (until then it would still run the old text, e.g. a query over HTTP, not a subscription)."""
    await page.evaluate(
        "([sel, text]) => document.querySelector(sel).CodeMirror.setValue(text)", [selector, text]
    )
    await page.wait_for_timeout(1000)


async def wait_for_response(page: Any, needle: str) -> str:
    script = """needle => {
        const cm = document.querySelector('.graphiql-response .CodeMirror');
        return cm && cm.CodeMirror.getValue().includes(needle) ? cm.CodeMirror.getValue() : null;
    }"""
    handle = await page.wait_for_function(script, arg=needle, timeout=15_000)
    value: str = await handle.json_value()
    return value


async def test_graphiql_renders_and_runs_the_health_query(fleet, gateway, browser) -> None:
    await fleet.set_status("storage", serving=False)
    traffic = Traffic()
    page = await open_graphiql(browser, str(gateway.make_url("/graphql")), traffic)

    await page.get_by_role("button", name="Headers").click()
    headers = '{"Authorization": "Bearer admin-token"}'
    await set_editor(page, HEADERS_EDITOR, headers)
    await set_editor(page, QUERY_EDITOR, "{ health { service status } }")
    await page.click(".graphiql-execute-button")

    text = await wait_for_response(page, "node-agent")
    result = json.loads(text)
    statuses = {h["service"]: h["status"] for h in result["data"]["health"]}
    assert statuses["storage"] == "NOT_SERVING"
    assert statuses["wallet"] == "SERVING"
    assert any(h.get("authorization") == "Bearer admin-token" for h in traffic.graphql_headers)

    # Introspection needs a token too: re-fetching the schema sends the Headers tab's.
    sent = len(traffic.graphql_headers)
    await page.get_by_role("button", name="Re-fetch GraphQL schema").click()
    for _ in range(50):
        if len(traffic.graphql_headers) > sent:
            break
        await page.wait_for_timeout(100)
    refetched = list(zip(traffic.graphql_headers, traffic.graphql_bodies, strict=True))[sent:]
    assert any(
        "__schema" in body and h.get("authorization") == "Bearer admin-token"
        for h, body in refetched
    ), refetched

    assert traffic.foreign() == [] and traffic.blocked == []
    assert traffic.problems == []


async def test_graphiql_runs_a_subscription_over_a_websocket(fleet, gateway, browser) -> None:
    traffic = Traffic()
    page = await open_graphiql(browser, str(gateway.make_url("/graphql")), traffic)
    await page.get_by_role("button", name="Headers").click()
    await set_editor(page, HEADERS_EDITOR, '{"Authorization": "Bearer t"}')
    query = "subscription { health(intervalSeconds: 1) { service status } }"
    await set_editor(page, QUERY_EDITOR, query)
    await page.click(".graphiql-execute-button")
    await wait_for_response(page, "SERVING")

    await fleet.set_status("compute", serving=False)
    await wait_for_response(page, "NOT_SERVING")  # pushed by the server, nothing clicked
    await page.click(".graphiql-execute-button")  # stop

    ws_urls = [u for u in traffic.urls if u.startswith("ws://")]
    assert ws_urls == [str(gateway.make_url("/graphql")).replace("http://", "ws://")]
    init = next(m for m in traffic.ws_sent if m.get("type") == "connection_init")
    assert init.get("payload") == {"Authorization": "Bearer t"}
    assert traffic.foreign() == [] and traffic.blocked == []
    assert traffic.problems == []

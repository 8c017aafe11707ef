"""The GraphiQL page and its files, all served by the gateway itself (no CDN)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gpudeck.gateway import graphiql

STATIC = Path(graphiql.static_dir())
ASSETS = {
    "graphiql.min.js": "application/javascript",
    "graphiql.min.css": "text/css",
    "react.production.min.js": "application/javascript",
    "react-dom.production.min.js": "application/javascript",
    "gpudeck-graphiql.js": "application/javascript",
    "gpudeck-graphiql.css": "text/css",
}
THIRD_PARTY = {
    "graphiql.min.js": "3.9.0",
    "graphiql.min.css": "3.9.0",
    "react.production.min.js": "18.3.1",
    "react-dom.production.min.js": "18.3.1",
}


async def test_a_browser_gets_graphiql_at_graphql(gateway) -> None:
    resp = await gateway.get("/graphql", headers={"Accept": "text/html,application/xhtml+xml"})
    assert resp.status == 200
    assert resp.content_type == "text/html"
    csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    html = await resp.text()
    urls = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sorted(u for u in urls if u != "data:,") == sorted(
        f"/graphiql/static/{name}" for name in ASSETS
    )
    assert "://" not in html  # nothing from anywhere else


async def test_a_client_without_html_gets_graphql_not_the_page(gateway) -> None:
    resp = await gateway.get(
        "/graphql",
        params={"query": "{ health { service } }"},
        headers={"Accept": "application/json"},
    )
    assert resp.status == 200
    assert resp.content_type == "application/json"


@pytest.mark.parametrize(("name", "content_type"), sorted(ASSETS.items()))
async def test_static_files_are_served_with_their_content_type(
    gateway, name: str, content_type: str
) -> None:
    resp = await gateway.get(f"/graphiql/static/{name}")
    assert resp.status == 200
    assert resp.content_type == content_type
    assert await resp.read() == (STATIC / name).read_bytes()


async def test_the_static_folder_is_not_listed_nor_escaped(gateway) -> None:
    assert (await gateway.get("/graphiql/static/")).status in (403, 404)
    assert (await gateway.get("/graphiql/static/../graphiql.py")).status in (403, 404)
    assert (await gateway.get("/graphiql/static/%2e%2e/config.py")).status in (403, 404)


def test_every_third_party_file_is_named_with_version_and_license() -> None:
    notice = (STATIC / "THIRD_PARTY_LICENSES.txt").read_text()
    for name, version in THIRD_PARTY.items():
        row = next(line for line in notice.splitlines() if line.startswith(name + " "))
        assert version in row and row.rstrip().endswith("MIT")
    assert "MIT License" in notice and "BSD-2-Clause" in notice


def test_graphiql_bundles_the_websocket_client() -> None:
    bundle = (STATIC / "graphiql.min.js").read_text()
    assert "graphql-transport-ws" in bundle  # graphql-ws, for subscriptions from GraphiQL
    assert "createFetcher" in bundle

"""The playground's files over real HTTP: the page at / and its files under /playground/,
with a Content-Security-Policy that keeps it on this server; every URL it references is
one this server answers; it loads without the API key the API needs; --no-playground
leaves / a 404; and the files are package data, so a regular install serves them too."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
import tomllib

from palm_serve.server import routes_playground

from server_helpers import ServerThread, model_dir, running_server  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
KEY = "playground-test-key"
# Namespaces name things; nothing is fetched from them.
NAMESPACE = re.compile(r'xmlns="http://www\.w3\.org/2000/svg"')


@pytest.fixture(scope="module")
def keyed_server(model_dir: Path) -> Iterator[ServerThread]:  # noqa: F811
    # The engine in a thread: these tests are about the page's routes, and starting a core
    # process would triple their time.
    with running_server(model_dir, api_key=KEY, engine_process=False, engine_cpus=None) as s:
        yield s


class _References(HTMLParser):
    """Every src and href of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def references(html: str) -> list[str]:
    parser = _References()
    parser.feed(html)
    return parser.urls


def test_the_page_loads_without_the_key_the_api_needs(keyed_server: ServerThread) -> None:
    page = httpx.get(f"{keyed_server.url}/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    api = httpx.post(f"{keyed_server.url}/v1/generate", json={"prompt": "a", "max_tokens": 1})
    assert api.status_code == 401
    authorized = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{keyed_server.url}/v1/models", headers=authorized).status_code == 200


def test_every_reference_of_the_page_is_served_from_this_server(
    keyed_server: ServerThread,
) -> None:
    html = httpx.get(f"{keyed_server.url}/").text
    urls = references(html)
    assert sorted(urls) == [
        "/playground/app.js",
        "/playground/favicon.svg",
        "/playground/style.css",
    ]
    for url in urls:
        response = httpx.get(f"{keyed_server.url}{url}")
        assert response.status_code == 200, url
        expected = routes_playground.MEDIA_TYPES[url.rsplit("/", 1)[1]]
        assert response.headers["content-type"] == expected
        # No absolute URL anywhere: nothing is fetched from another origin at run time.
        assert "://" not in NAMESPACE.sub("", response.text), url
    assert "://" not in html


def test_unknown_playground_files_are_404(keyed_server: ServerThread) -> None:
    for path in ("/playground/index.html", "/playground/secret.py", "/playground/..%2Fapp.py"):
        response = httpx.get(f"{keyed_server.url}{path}")
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"


def test_the_playground_is_not_in_the_api_schema(keyed_server: ServerThread) -> None:
    paths = httpx.get(f"{keyed_server.url}/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/playground") for p in paths)


def test_no_playground_leaves_the_root_a_404(model_dir: Path) -> None:  # noqa: F811
    with running_server(
        model_dir, playground=False, api_key=KEY, engine_process=False, engine_cpus=None
    ) as server:
        for path in ("/", "/playground/app.js"):
            response = httpx.get(f"{server.url}{path}")
            # With the playground off its paths are no longer open: the key comes first.
            assert response.status_code == 401, path
            authorized = {"Authorization": f"Bearer {KEY}"}
            assert httpx.get(f"{server.url}{path}", headers=authorized).status_code == 404


def test_the_playground_files_are_package_data() -> None:
    """Every file the route serves exists, and pyproject.toml ships the folder with the
    server package (a non-editable install has them: see the README's check)."""
    on_disk = {p.name for p in routes_playground.PLAYGROUND_DIR.iterdir()}
    assert set(routes_playground.MEDIA_TYPES) == on_disk
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data = pyproject["tool"]["setuptools"]["package-data"]["palm_serve.server"]
    assert "playground/*" in package_data

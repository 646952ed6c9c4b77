"""Fixtures for the tests that meet lumen's outside parties: a real browser
(Debian's Chromium driven by Playwright) and clients generated from the
served document (openapi-python-client, openapi-typescript + openapi-fetch).

Each server is a real `lumen serve` on the embedded shapes model, on a free
loopback port (LUMEN_BIN: the binary, default target/debug/lumen)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "tests" / "fixtures" / "images" / "shapes-guide.png"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Chromium on a machine with no outside network: no background fetches.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
API_KEY = "playground-test-key"


class Server:
    """A running `lumen serve`; `log` is its JSON log so far."""

    def __init__(self, tmp: Path, name: str, *flags: str):
        self.log_path = tmp / f"{name}.log"
        binary = os.environ.get("LUMEN_BIN", str(ROOT / "target" / "debug" / "lumen"))
        self.proc = subprocess.Popen(
            [binary, "serve", "--host", "127.0.0.1", "--port", "0", "--log-format", "json", *flags],
            stdout=self.log_path.open("w"),
            stderr=subprocess.STDOUT,
        )
        self.url = self._wait_ready()

    def log(self) -> list[dict]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return lines

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + 180
        url = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lumen serve exited:\n{self.log_path.read_text()}")
            if url is None:
                for rec in self.log():
                    fields = rec.get("fields", rec)
                    if fields.get("message") == "listening":
                        url = f"http://{fields['address']}"
            if url is not None:
                try:
                    if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                        return url
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"lumen serve never became ready:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("lumen"), "open")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("lumen"), "keyed", "--api-key", API_KEY)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    out = Path(os.environ.get("SCREENSHOTS", ROOT / "target" / "web-screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture
def page(browser, screenshots, request):
    """A fresh page; page errors (uncaught exceptions) fail the test."""
    ctx = browser.new_context(viewport={"width": 1200, "height": 1000}, accept_downloads=True)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert not errors, f"errors in the page: {errors}"

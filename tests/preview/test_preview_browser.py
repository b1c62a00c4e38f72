"""Headless Debian chromium opens a preview whose JavaScript echoes over a WebSocket through the proxy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.preview.conftest import PreviewBox

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@pytest.mark.skipif(not shutil.which(CHROMIUM), reason="scripts/setup-browser.sh installs chromium")
def test_browser_page_websocket_echo(box: PreviewBox) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    port = box.server.base_url.rsplit(":", 1)[1]
    url = f"http://{box.host(8000)}:{port}/?stacyvm_preview_token={box.token(8000)}"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )
        try:
            page = browser.new_page()
            page.goto(url)  # the token is exchanged for a cookie: the page and its WebSocket use it
            assert "stacyvm_preview_token" not in page.url
            page.wait_for_function("document.getElementById('echo').textContent.length > 0", timeout=15000)
            assert page.inner_text("#echo") == "echo: hello from the browser"
            page.screenshot(path=str(ARTIFACTS / "preview-browser.png"))
        finally:
            browser.close()

"""The page at ``/`` in headless Chromium (Debian's package, driven by Playwright): it loads, a real
held-out seven is classified as "seven", and ticking the "seven" patch makes that bar drop.

``FORGETPACK_SCREENSHOT=1`` also writes the screenshot to docs/serve-page.png (CI leaves the tree alone).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from serve_helpers import digit_names, digits, forget_patches, free_port, png, serve_export

import runtime
from forgetpack.format.patch import read_patch
from runtime.serve import ServeConfig, create_app

CHROMIUM = os.environ.get("FORGETPACK_CHROMIUM", "/usr/bin/chromium")  # what tools/run_tests.sh installs
DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """uvicorn in this process, on 127.0.0.1 and a free port, with the forget patches registered by name."""
    import uvicorn

    patches = forget_patches(tmp_path_factory)
    config = ServeConfig(source=str(serve_export(tmp_path_factory)), patches_dir=str(tmp_path_factory.mktemp("page-registry")),
                         threads=2)
    app = create_app(config)
    for name, path in patches.items():
        app.state.service.registry.add_file(path, name)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(3000):  # until it listens (bounded)
        if server.started or not thread.is_alive():
            break
        threading.Event().wait(0.01)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", patches
    server.should_exit = True
    thread.join(30)


def bar(page, column: str, label: str) -> float:
    return float(page.locator(f'#bars-{column} .row[data-label="{label}"]').get_attribute("data-prob"))


def test_page_shows_a_seven_forgotten_when_its_patch_is_ticked(server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, patches = server
    seven = read_patch(patches["seven"]).digest
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 620})
            page.goto(url + "/")
            page.wait_for_selector('body[data-ready="1"]')
            assert "mini via onnx" in page.locator("#model").inner_text()
            page.fill("#labels", ", ".join(digit_names()))
            page.set_input_files("#file", files=[{"name": "seven.png", "mimeType": "image/png", "buffer": png(digits("seven", 1)[0])}])
            page.wait_for_selector(f'body[data-state="{runtime.state_digest([])}"][data-busy="0"]')
            before_without, before_with = bar(page, "without", "seven"), bar(page, "with", "seven")
            assert before_without == before_with and before_without > 0.5  # nothing ticked: both columns agree

            page.locator("label.patch", has_text="forgets seven").locator("input").check()
            page.wait_for_selector(f'body[data-state="{runtime.state_digest([seven])}"][data-busy="0"]')
            after_without, after_with = bar(page, "without", "seven"), bar(page, "with", "seven")
            assert after_without == before_without  # the unpatched column is untouched
            assert after_with < 0.5 * before_with  # the seven bar drops
            assert page.locator("#status").inner_text() == ""
            page.screenshot(path=str(tmp_path / "serve-page.png"), full_page=True)
            if os.environ.get("FORGETPACK_SCREENSHOT") == "1":
                page.screenshot(path=str(DOCS / "serve-page.png"), full_page=True)
        finally:
            browser.close()

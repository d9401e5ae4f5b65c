"""Fixtures for the browser test: a real ComfyUI server with the pack and the generated tiny
model, and Debian's headless Chromium driven by Playwright (nothing is downloaded by Playwright:
it launches the system browser through ``executable_path``).

A missing Playwright or Chromium fails the test with what to install; it never skips."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from devkit.comfy_host import ComfyServer, make_base_directory
from devkit.fixtures import DATASET_NAME, motif_dataset, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "browser"
CHROMIUM = os.environ.get("LORALAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
INSTALL_HINT = ("run `make setup` (scripts/setup_host.sh installs Debian's chromium with apt-get and the "
                "Python playwright package from requirements-dev.txt), or `apt-get install chromium` and "
                "set LORALAB_CHROMIUM to another Chromium binary if it is not /usr/bin/chromium")

_screenshots: list[Path] = []


# Module scope: Playwright's sync API keeps an asyncio loop running in this thread while it is
# open, which would break asyncio.run in the tests that come after the browser test.
@pytest.fixture(scope="module")
def browser_server(tmp_path_factory):
    """A ComfyUI of its own (fresh user settings, an empty output/) with the tiny checkpoint under
    models/checkpoints and the motif image set under input/, as template 1 expects."""
    base = make_base_directory(tmp_path_factory.mktemp("browser_comfy"), [tiny_checkpoint()],
                               {DATASET_NAME: motif_dataset()})
    srv = ComfyServer(base)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def chromium():
    """Headless Chromium at ``CHROMIUM``; a clear failure if Playwright or the browser is missing."""
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.fail(f"the Python package playwright is not installed ({e}): {INSTALL_HINT}", pytrace=False)
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no Chromium at {CHROMIUM}: {INSTALL_HINT}", pytrace=False)
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        except PlaywrightError as e:
            pytest.fail(f"Chromium at {CHROMIUM} did not start: {e}\n{INSTALL_HINT}", pytrace=False)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def screenshot():
    """``screenshot(target, name, **options)``: saves ``target``'s screenshot (a page or a locator)
    as artifacts/browser/<name>.png and returns the path; the paths are listed after the run."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def take(target, name: str, **options) -> Path:
        path = ARTIFACTS / f"{name}.png"
        target.screenshot(path=str(path), **options)
        _screenshots.append(path)
        return path

    return take


def pytest_terminal_summary(terminalreporter):
    if _screenshots:
        terminalreporter.write_sep("-", "browser test screenshots")
        for path in _screenshots:
            terminalreporter.write_line(str(path))

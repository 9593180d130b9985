"""A real browser for the e2e tests: Playwright driving Debian's chromium (no browser download)."""
import os
import shutil
import tempfile
from contextlib import contextmanager

import pytest

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]


def chromium_path():
    return os.environ.get("TUNE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def page(url: str, width: int = 1400, height: int = 1000):
    sync_api = pytest.importorskip("playwright.sync_api")
    exe = chromium_path()
    if not exe:
        pytest.skip("no chromium on PATH (.ci/run installs Debian's chromium)")
    profile = tempfile.mkdtemp(prefix="tune-chromium-")
    try:
        with sync_api.sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(profile, executable_path=exe, headless=True,
                                                       args=CHROMIUM_ARGS,
                                                       viewport={"width": width, "height": height})
            try:
                pg = ctx.pages[0] if ctx.pages else ctx.new_page()
                pg.goto(url, wait_until="load", timeout=60000)
                yield pg
            finally:
                ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)

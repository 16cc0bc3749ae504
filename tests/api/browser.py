"""Headless Chromium for the console tests (Debian chromium + chromium-driver).

Every call into the browser blocks, so tests run these helpers in a thread
(``threads.deferToThread``) while the router keeps serving in the reactor.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from typing import Any, Callable

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Where the suite's screenshots go besides the test's own directory (docs/images: the
#: pictures of docs/operations.md are taken by the suite: make screenshots).
SCREENSHOT_DIR = os.environ.get("DCROUTER_SCREENSHOT_DIR", "")

#: The screenshots docs/operations.md shows (the others stay in the test's directory).
DOC_SCREENSHOTS = ("console-overview-5min", "console-proxy", "console-mail", "console-confirm",
                   "console-certificates", "console-dns", "console-phone-overview",
                   "console-phone-mail")

DESKTOP = (1280, 800)
PHONE = (390, 844)


class Browser:
    """One headless Chromium with its own profile directory."""

    def __init__(self) -> None:
        for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
            if not os.path.exists(path):
                raise AssertionError(f"{path} is missing: install the Debian package {package} "
                                     "(make test installs TEST_DEBS)")
        self.profile = tempfile.mkdtemp(prefix="dcrouter-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                     "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--hide-scrollbars",
                     "--force-device-scale-factor=1", f"--user-data-dir={self.profile}"):
            options.add_argument(flag)
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_page_load_timeout(30)
        self.viewport(*DESKTOP)

    def quit(self) -> None:
        """Close the browser and remove its profile."""
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    # -- page state -------------------------------------------------------------------------
    def viewport(self, width: int, height: int, mobile: bool = False) -> None:
        """Emulate a viewport of ``width`` x ``height`` CSS pixels (a phone with ``mobile``)."""
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})

    def color_scheme(self, scheme: str) -> None:
        """Emulate ``prefers-color-scheme: light|dark``."""
        self.driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {
            "features": [{"name": "prefers-color-scheme", "value": scheme}]})

    def js(self, script: str, *args: Any) -> Any:
        """Run ``script`` in the page (one call: the page may re-render between two)."""
        return self.driver.execute_script(script, *args)

    def wait(self, predicate: Callable[["Browser"], Any], timeout: float = 20.0,
             what: str = "") -> Any:
        """Poll ``predicate(self)`` until it is truthy; returns its value."""
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.1,
                                 ignored_exceptions=(StaleElementReferenceException,)).until(
                lambda d: predicate(self))
        except WebDriverException as e:
            raise AssertionError(f"timed out waiting for {what or predicate}: {e.msg}") from None

    def text(self, selector: str) -> str:
        """innerText of the first element matching ``selector`` ('' when there is none)."""
        return self.js("const e = document.querySelector(arguments[0]);"
                       "return e ? e.innerText.trim() : '';", selector)

    def table(self, tbody: str, key: str) -> dict[str, dict[str, str]]:
        """Rows of ``tbody`` by their ``key`` attribute: {data-field: text}."""
        pairs = self.js("""
            return Array.from(document.querySelectorAll(arguments[0] + ' > tr')).map(r => [
              r.getAttribute(arguments[1]),
              Object.fromEntries(Array.from(r.children).filter(c => c.dataset.field)
                .map(c => [c.dataset.field, c.innerText.trim()]))]);""", tbody, key)
        return {k: v for k, v in pairs if k is not None}

    def rendered(self, view: str, after: int = 0) -> int:
        """Wait until ``view`` was rendered by a refresh later than ``after``; its number."""
        def done(b: "Browser") -> int:
            value = b.js("return parseInt(document.body.getAttribute("
                         "'data-rendered-' + arguments[0]) || '0', 10);", view)
            return value if value > after else 0
        return self.wait(done, what=f"the {view} view to render")

    def open_view(self, view: str) -> int:
        """Show ``view`` by its navigation link and wait for fresh data."""
        before = self.js("return parseInt(document.body.getAttribute('data-refreshes') || '0', "
                         "10);")
        self.js("document.querySelector('nav a[data-view=\"' + arguments[0] + '\"]').click();",
                view)
        return self.rendered(view, before)

    def console_errors(self) -> list[str]:
        """Errors the page logged since the last call (script errors, CSP refusals, failed
        requests)."""
        return [e["message"] for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]

    def screenshot(self, directory: str, name: str) -> str:
        """Save a PNG of the viewport as ``name``.png in ``directory`` (and in
        DCROUTER_SCREENSHOT_DIR when set); returns the path."""
        path = os.path.join(directory, f"{name}.png")
        self.driver.save_screenshot(path)
        if SCREENSHOT_DIR and name in DOC_SCREENSHOTS:
            os.makedirs(SCREENSHOT_DIR, exist_ok=True)
            shutil.copyfile(path, os.path.join(SCREENSHOT_DIR, f"{name}.png"))
        return path

    def full_page(self, directory: str, name: str, width: int) -> str:
        """A screenshot of the whole page at ``width`` CSS pixels (the viewport grows)."""
        height = int(self.js("return Math.ceil(document.documentElement.scrollHeight);"))
        self.viewport(width, min(max(height, 400), 6000))
        try:
            return self.screenshot(directory, name)
        finally:
            self.viewport(*DESKTOP)


def png_size(path: str) -> tuple[int, int]:
    """Width and height of a PNG file (AssertionError when it is not a non-empty PNG)."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert os.path.getsize(path) > 1000, f"{path} is (nearly) empty"
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])

"""The status page in headless Chromium (Debian chromium + chromium-driver), running router."""

from __future__ import annotations

import shutil
import tempfile

import pytest_twisted
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from twisted.internet import threads

from dcrouter import __version__
from dcrouter.message import ReceivedMessage, SessionInfo
from tests.api.support import TOKEN, hold_items

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _start_browser(profile: str) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    return driver


def _text(driver: webdriver.Chrome, element_id: str) -> str:
    # one script call: the page re-renders every interval, so a found element may be
    # replaced before its text is read
    return driver.execute_script(
        "const e = document.getElementById(arguments[0]); return e ? e.innerText.trim() : '';",
        element_id)


def _rows(driver: webdriver.Chrome) -> dict:
    """The services table at one instant: data-service -> cell texts."""
    pairs = driver.execute_script(
        "return Array.from(document.querySelectorAll('#services tr')).map(r => "
        "[r.getAttribute('data-service'), Array.from(r.querySelectorAll('td'))"
        ".map(c => c.innerText.trim())]);")
    return {name: cells for name, cells in pairs}


def _wait(driver: webdriver.Chrome, predicate, timeout: float = 20.0) -> None:
    WebDriverWait(driver, timeout, poll_frequency=0.1,
                  ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: predicate(d))


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return -1.0


@pytest_twisted.ensureDeferred
async def test_status_page_shows_services_queue_depth_and_rates(running):
    router, client, queue = running
    await hold_items(router, ["one@b.test", "two@b.test"])
    profile = tempfile.mkdtemp(prefix="dcrouter-chromium-")
    driver = await threads.deferToThread(_start_browser, profile)
    try:
        # 1. with the token in the URL fragment (never sent to the server)
        def load_with_token() -> dict:
            driver.get(f"{client.base}/?interval=0.5#token={TOKEN}")
            _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#services tr")) == 4)
            return {"rows": _rows(driver), "version": _text(driver, "version"),
                    "depth": _text(driver, "queue-depth"), "url": driver.current_url,
                    "queue_state": _text(driver, "queue-state"),
                    "form_shown": driver.find_element(By.ID, "token-form").is_displayed()}

        page = await threads.deferToThread(load_with_token)
        assert set(page["rows"]) == {"api", "dns", "email", "proxy"}
        api_port = router.by_name["api"].listeners.port_for("api.port")
        assert page["rows"]["api"][1] == "running"
        assert f"tcp 127.0.0.1:{api_port}" in page["rows"]["api"][2]
        assert page["version"] == __version__
        assert page["depth"] == "2" and page["queue_state"] == "paused"
        assert "token" not in page["url"] and not page["form_shown"]

        # 2. figures follow the router: a new queue item and a burst of accepted messages
        await hold_items(router, ["three@b.test"])
        await threads.deferToThread(
            _wait, driver, lambda d: _text(d, "queue-depth") == "3")
        events = router.by_name["api"].metrics.email_events
        session = SessionInfo("c", "127.0.0.1", 4000, 25)
        for i in range(30):
            events.connection_made(session)
            events.message_received(session, ReceivedMessage(
                f"M{i}", "a@localhost", ["b@localhost"], "/none", 100, session), [f"M{i}"])
        await threads.deferToThread(
            _wait, driver, lambda d: _number(_text(d, "msg-rate")) > 0)
        figures = await threads.deferToThread(lambda: {
            name: _text(driver, name) for name in
            ("msg-rate", "conn-rate", "smtp-rate", "msg-total", "smtp-total", "smtp-active")})
        assert _number(figures["msg-rate"]) > 0 and _number(figures["conn-rate"]) > 0
        assert figures["msg-total"] == "30" and figures["smtp-total"] == "30"
        assert figures["smtp-active"] == "30"

        # 3. without a token: the form appears; entering the token loads the figures
        def load_without_token() -> dict:
            driver.execute_script("sessionStorage.clear()")
            driver.get(f"{client.base}/?interval=0.5")
            _wait(driver, lambda d: d.find_element(By.ID, "token-form").is_displayed())
            error = _text(driver, "error")
            driver.find_element(By.ID, "token-input").send_keys(TOKEN)
            driver.find_element(By.CSS_SELECTOR, "#token-form button").click()
            _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#services tr")) == 4)
            return {"error": error, "depth": _text(driver, "queue-depth"),
                    "form_shown": driver.find_element(By.ID, "token-form").is_displayed()}

        page = await threads.deferToThread(load_without_token)
        assert "needs a token" in page["error"]
        assert page["depth"] == "3" and not page["form_shown"]
    finally:
        await threads.deferToThread(driver.quit)
        shutil.rmtree(profile, ignore_errors=True)

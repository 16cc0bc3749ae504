"""The console in headless Chromium against a running router with traffic.

Each view is loaded, its rendered values are read and compared with the API's
JSON; the queue actions are exercised with the mouse and with the keyboard
only; desktop (1280x800) and phone (390x844) screenshots, light and dark, are
saved and checked to be real PNGs (``make screenshots`` copies them to
docs/images for docs/operations.md).
"""

from __future__ import annotations

import time
from typing import Any

import pytest_twisted
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.keys import Keys
from twisted.internet import threads

from tests.api.browser import DESKTOP, PHONE, Browser, png_size
from tests.api.console_env import (REJECT_REPLY, REJECTED, _send_mail, make_traffic,
                                   settled_history, sleep, start_console_env,
                                   stop_console_env, wait_until)
from tests.api.support import TOKEN


@pytest_twisted.async_yield_fixture(scope="module")
async def env(tmp_path_factory):
    """A router with traffic, shared by the tests of this module (the last one acts)."""
    environment = await start_console_env(str(tmp_path_factory.mktemp("console-browser")))
    try:
        await make_traffic(environment)
        await settled_history(environment)
        yield environment
    finally:
        await stop_console_env(environment)


@pytest_twisted.async_yield_fixture(scope="module")
async def browser(env, tmp_path_factory):
    """One Chromium showing the console, with the token from the URL fragment."""
    b = await threads.deferToThread(Browser)
    b.shots = str(tmp_path_factory.mktemp("screenshots"))

    def load() -> None:
        b.driver.get(f"{env.client.base}/?interval=1#token={TOKEN}")
        b.rendered("overview")
    try:
        await threads.deferToThread(load)
        yield b
    finally:
        await threads.deferToThread(b.quit)


def in_thread(function: Any, *args: Any) -> Any:
    """Run a blocking browser step off the reactor."""
    return threads.deferToThread(function, *args)


async def api(env, path: str) -> Any:
    response = await env.client.get(path)
    assert response.status == 200, (path, response.text)
    return response.json()


def check_screenshot(path: str, width: int, min_height: int) -> None:
    size = png_size(path)
    assert size[0] == width and size[1] >= min_height, (path, size)


# -- overview ----------------------------------------------------------------------------

def _legends(b: Browser, chart: str) -> dict[str, dict[str, str]]:
    return {item["series"]: item for item in b.js("""
        return Array.from(document.querySelectorAll('#' + arguments[0] + ' .legend li')).map(li => ({
          series: li.dataset.series, total: li.dataset.total, last: li.dataset.last,
          max: li.dataset.max, shown_last: li.querySelector('[data-field=last]').innerText,
          shown_total: (li.querySelector('[data-field=total]') || {}).innerText || '',
          vertices: Array.from(document.querySelectorAll('#' + arguments[0] +
            ' g.series[data-series="' + li.dataset.series + '"] polyline')).reduce(
            (n, p) => n + p.getAttribute('points').split(' ').length, 0) +
            document.querySelectorAll('#' + arguments[0] + ' g.series[data-series="' +
              li.dataset.series + '"] circle').length}));""", chart)}


CHARTS = {"chart-mail": ["email.accepted", "email.delivered", "email.deferred", "email.bounced"],
          "chart-queue": ["queue.depth", "queue.deferred"],
          "chart-proxy": ["proxy.connections", "proxy.requests", "proxy.errors"],
          "chart-bytes": ["proxy.bytes_in", "proxy.bytes_out"],
          "chart-dns": ["dns.queries.NOERROR", "dns.queries.NXDOMAIN"]}


@pytest_twisted.ensureDeferred
async def test_overview_charts_and_figures_match_the_api(env, browser):
    history = await api(env, "/api/history?minutes=60&step=60")
    charts = await in_thread(lambda: {c: _legends(browser, c) for c in CHARTS})
    for chart, names in CHARTS.items():
        assert list(charts[chart]) == names, chart
        for name in names:
            series = history["series"][name]
            points = [p for p in series["points"] if p is not None]
            shown = charts[chart][name]
            assert shown["vertices"] == len(points), (chart, name)
            assert float(shown["last"]) == points[-1], (chart, name)
            if series["kind"] == "counter":
                assert float(shown["total"]) == sum(points), (chart, name)
                if chart != "chart-bytes":
                    assert shown["shown_total"] == f"{sum(points):,.0f}"
            else:
                assert float(shown["max"]) == max(points)
    # the numbers behind the charts are the traffic that was sent
    assert float(charts["chart-mail"]["email.accepted"]["total"]) == 6
    assert float(charts["chart-dns"]["dns.queries.NXDOMAIN"]["total"]) == 2
    assert charts["chart-bytes"]["proxy.bytes_out"]["shown_total"] == "153 B"
    # each chart is an accessible image with a title naming its values
    titles = await in_thread(browser.js, "return Array.from(document.querySelectorAll("
                             "'figure.chart svg')).map(s => [s.getAttribute('role'), "
                             "s.querySelector('title').textContent]);")
    assert len(titles) == 5 and all(role == "img" and "last 60 min" in t for role, t in titles)

    stats = await api(env, "/api/stats")
    status = await api(env, "/api/status")
    page = await in_thread(lambda: {
        "depth": browser.text("#queue-depth"), "total": browser.text("#msg-total"),
        "services": browser.table("#services", "data-service"),
        "rows": browser.js("return Array.from(document.querySelectorAll('#services tr'))"
                           ".map(r => r.children[1].innerText);")})
    assert page["depth"] == str(int(stats["summary"]["queue_depth"])) == "2"
    assert page["total"] == str(int(stats["summary"]["messages_accepted_total"]))
    assert sorted(page["services"]) == sorted(status["services"])
    assert page["rows"] == ["running"] * 4

    path = await in_thread(browser.full_page, browser.shots, "console-overview", DESKTOP[0])
    check_screenshot(path, DESKTOP[0], DESKTOP[1])

    # a shorter range: buckets of the sample interval's multiple, as the API gives them
    def short_range() -> Any:
        browser.js("const s = document.getElementById('chart-range'); s.value = '5:10';"
                   "s.dispatchEvent(new Event('change'));")
        browser.wait(lambda b: b.js("return document.querySelector('#chart-mail svg')"
                                    ".dataset.buckets") == "30", what="30 buckets")
        return _legends(browser, "chart-mail")
    short = await in_thread(short_range)
    five = await api(env, "/api/history?minutes=5&step=10")
    assert len(five["times"]) == 30
    assert float(short["email.accepted"]["total"]) == sum(
        p for p in five["series"]["email.accepted"]["points"] if p is not None) == 6
    await in_thread(browser.full_page, browser.shots, "console-overview-5min", DESKTOP[0])
    assert await in_thread(browser.console_errors) == []


# -- proxy -------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_proxy_view_shows_each_route_and_target_like_the_api(env, browser):
    await in_thread(browser.open_view, "proxy")
    data = await api(env, "/api/proxy/routes")
    rows = await in_thread(browser.js, """
        return Array.from(document.querySelectorAll('#proxy-routes tr')).map(r => ({
          route: r.dataset.route, target: r.dataset.target || null,
          cells: Object.fromEntries(Array.from(r.children).filter(c => c.dataset.field)
            .map(c => [c.dataset.field, c.innerText.trim(), ])),
          titles: Object.fromEntries(Array.from(r.children).filter(c => c.dataset.field)
            .map(c => [c.dataset.field, c.getAttribute('title')]))}));""")
    routes = {r["route"]: r for r in rows if r["target"] is None}
    targets = {(r["route"], r["target"]): r for r in rows if r["target"] is not None}
    assert list(routes) == [r["name"] for r in data["routes"]]
    for route in data["routes"]:
        shown = routes[route["name"]]
        stats = route["stats"]
        assert shown["cells"]["connections"] == str(stats["total_connections"])
        assert shown["cells"]["requests"] == str(stats["requests"])
        assert shown["titles"]["bytes_in"] == str(stats["bytes_in"])
        assert shown["titles"]["bytes_out"] == str(stats["bytes_out"])
        assert shown["cells"]["errors"] == str(sum(stats["errors"].values()))
        assert shown["cells"]["match"].startswith("ports " + ", ".join(map(str, route["ports"])))
        for label, target in stats["targets"].items():
            row = targets[(route["name"], label)]
            assert row["cells"]["health"] == ("up" if target["healthy"] else "down")
            assert row["cells"]["last_error"] == target["last_error"]
            assert row["cells"]["failures"] == str(target["failures"])
            assert row["cells"]["since"].endswith(" ago")
    assert routes["web"]["cells"]["health"] == "0/1 up"
    assert "refused" in targets[("web", "127.0.0.1:9")]["cells"]["last_error"]
    assert routes["web"]["cells"]["mode"] == "tls passthrough"
    assert "expiring.console.test" in routes["secure"]["cells"]["match"]
    path = await in_thread(browser.full_page, browser.shots, "console-proxy", DESKTOP[0])
    check_screenshot(path, DESKTOP[0], DESKTOP[1])
    assert await in_thread(browser.console_errors) == []


# -- mail --------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_mail_view_rules_queue_deliveries_and_suppression_match_the_api(env, browser):
    await in_thread(browser.open_view, "mail")
    routing = await api(env, "/api/email/routing")
    summary = await api(env, "/api/queue/summary")
    recent = await api(env, "/api/email/deliveries?limit=20")
    suppressed = await api(env, "/api/email/suppression")
    page = await in_thread(lambda: {
        "rules": browser.table("#rules", "data-rule"),
        "order": browser.js("return Array.from(document.querySelectorAll('#rules tr'))"
                            ".map(r => r.dataset.rule);"),
        "destinations": browser.table("#q-destinations", "data-destination"),
        "items": browser.table("#q-items", "data-queue-id"),
        "deliveries": browser.js("return Array.from(document.querySelectorAll("
                                 "'#deliveries tr')).map(r => r.dataset.queueId);"),
        "failures": browser.table("#failures", "data-queue-id"),
        "suppression": browser.table("#suppression", "data-address"),
        "size": browser.text("#q-size"), "deferred": browser.text("#q-deferred")})
    assert page["order"] == [r["pattern"] for r in routing["rules"]] + [""] + [
        o["pattern"] for o in routing["other"]]
    for rule in routing["rules"]:
        shown = page["rules"][rule["pattern"]]
        assert shown["position"] == str(rule["position"]) and shown["detail"] == rule["detail"]
        for counter in ("accepted", "delivered", "deferred", "bounced"):
            assert shown[counter] == str(rule["counters"][counter]), (rule["pattern"], counter)
    assert page["rules"]["(dsn)"]["delivered"] == "1"

    assert page["size"] == str(summary["size"]) and page["deferred"] == \
        str(summary["by_status"]["deferred"])
    for destination in summary["destinations"]:
        shown = page["destinations"][destination["destination"]]
        assert shown["total"] == str(destination["total"])
        assert shown["deferred"] == str(destination["by_status"]["deferred"])
        assert shown["last_error"] == destination["last_error"]
    assert sorted(page["items"]) == sorted(i["id"] for i in summary["items"])
    for item in summary["items"]:
        shown = page["items"][item["id"]]
        assert shown["status"] == item["status"] and shown["attempts"] == str(item["attempts"])
        assert shown["to"] == ", ".join(r["address"] for r in item["recipients"])

    assert page["deliveries"] == [d["queue_id"] for d in recent["deliveries"]]
    bounced = next(f for f in recent["failures"] if f["outcome"] == "bounced")
    shown = page["failures"][bounced["queue_id"]]
    assert shown["outcome"] == "bounced (attempt 1)"
    assert REJECT_REPLY[4:] in shown["reply"] and f"{REJECTED} (failed)" in shown["recipients"]

    assert list(page["suppression"]) == [s["address"] for s in suppressed["suppressed"]] == \
        [REJECTED]
    assert REJECT_REPLY[4:] in page["suppression"][REJECTED]["reason"]
    # the remote server's markup is text on the page, never an element
    assert await in_thread(browser.js, "return document.querySelectorAll('main img').length;") == 0
    path = await in_thread(browser.full_page, browser.shots, "console-mail", DESKTOP[0])
    check_screenshot(path, DESKTOP[0], DESKTOP[1])
    assert await in_thread(browser.console_errors) == []


# -- certificates ----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_certificates_view_matches_the_api(env, browser):
    await in_thread(browser.open_view, "certificates")
    data = await api(env, "/api/certificates")
    page = await in_thread(lambda: {
        "certs": browser.table("#certs", "data-sha256"),
        "acme": browser.table("#acme", "data-name"),
        "dkim": browser.table("#dkim", "data-record"),
        "warnings": browser.js("return Array.from(document.querySelectorAll("
                               "'#cert-warnings li')).map(l => [l.className, l.innerText]);")})
    assert sorted(page["certs"]) == sorted(c["sha256"] for c in data["certificates"])
    for cert in data["certificates"]:
        shown = page["certs"][cert["sha256"]]
        assert shown["service"] == cert["service"] and shown["source"] == cert["source"]
        assert shown["days_left"] == f"{cert['days_left']:,.0f}"
        assert shown["served_for"] == ", ".join(cert["served_for"])
        assert shown["issuer"].startswith(cert["issuer"])
    assert [text for _, text in page["warnings"]] == [w["message"] for w in data["warnings"]]
    assert page["warnings"][0][0] == "warning error"
    (order,) = data["acme"]
    assert page["acme"][order["name"]]["state"] == "failed"
    assert page["acme"][order["name"]]["last_error"] == order["last_error"]
    for key in data["dkim"]:
        shown = page["dkim"][key["record_name"]]
        assert shown["record"] == key["record"]
        assert shown["published"] == ("yes" if key["published"] else "no")
    path = await in_thread(browser.full_page, browser.shots, "console-certificates", DESKTOP[0])
    check_screenshot(path, DESKTOP[0], DESKTOP[1])
    assert await in_thread(browser.console_errors) == []


# -- DNS ---------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_dns_view_matches_the_api(env, browser):
    await in_thread(browser.open_view, "dns")
    zones = (await api(env, "/api/dns/zones?records=false"))["zones"]
    stats = (await api(env, "/api/stats"))["dns"]
    page = await in_thread(lambda: {
        "zones": browser.table("#zones", "data-zone"),
        "queries": browser.text("#dns-queries"),
        "rcodes": dict(browser.js("return Array.from(document.querySelectorAll("
                                  "'#dns-rcodes [data-rcode]')).map(f => [f.dataset.rcode, "
                                  "f.querySelector('.value').innerText]);"))})
    assert sorted(page["zones"]) == sorted(z["origin"] for z in zones)
    for zone in zones:
        shown = page["zones"][zone["origin"]]
        assert shown["serial"] == str(zone["serial"])
        assert shown["records"] == str(zone["record_count"])
        assert shown["allow_transfer"] == ", ".join(zone["allow_transfer"])
        for notify in zone["notify"]:
            assert f"{notify['target']}: {notify['result']} (serial {notify['serial']}" \
                in shown["notify"]
    assert "acknowledged" in page["zones"]["console.test."]["notify"]
    assert page["queries"] == str(stats["queries"])
    assert page["rcodes"] == {k: str(v) for k, v in stats["queries_by_rcode"].items()}
    path = await in_thread(browser.full_page, browser.shots, "console-dns", DESKTOP[0])
    check_screenshot(path, DESKTOP[0], DESKTOP[1])
    assert await in_thread(browser.console_errors) == []


# -- phone, dark mode ----------------------------------------------------------------------

def _background(b: Browser) -> tuple[int, ...]:
    color = b.js("return getComputedStyle(document.body).backgroundColor;")
    return tuple(int(float(c)) for c in color[color.index("(") + 1:-1].split(",")[:3])


@pytest_twisted.ensureDeferred
async def test_phone_viewport_and_dark_mode(env, browser):
    def phone() -> dict:
        out: dict[str, Any] = {"light": _background(browser)}
        browser.color_scheme("dark")
        browser.viewport(*PHONE, mobile=True)
        out["dark"] = browser.wait(lambda b: _background(b) if sum(_background(b)) < 150
                                   else None, what="the dark colour scheme")
        out["shots"] = {}
        out["overflow"] = {}
        for view in ("overview", "mail", "proxy", "certificates", "dns"):
            browser.open_view(view)
            browser.js("window.scrollTo(0, 0);")
            out["overflow"][view] = browser.js(
                "return [document.documentElement.scrollWidth, window.innerWidth, "
                "Math.max(...Array.from(document.querySelectorAll('svg.plot'))"
                ".filter(s => s.getBoundingClientRect().width > 0)"
                ".map(s => s.getBoundingClientRect().right), 0)];")
            out["shots"][view] = browser.screenshot(browser.shots, f"console-phone-{view}")
        out["nav"] = browser.js("return getComputedStyle(document.querySelector('nav ul'))"
                                ".overflowX;")
        browser.color_scheme("light")
        browser.viewport(*DESKTOP)
        return out
    result = await in_thread(phone)
    assert sum(result["light"]) > 600 and sum(result["dark"]) < 150
    for view, (scroll_width, width, chart_right) in result["overflow"].items():
        assert width == PHONE[0] and scroll_width <= width, view  # tables scroll inside
        assert chart_right <= width, view                          # charts fit the screen
    assert result["nav"] == "auto"
    for path in result["shots"].values():
        check_screenshot(path, PHONE[0], PHONE[1])


# -- queue actions -------------------------------------------------------------------------

def _focus_key(b: Browser) -> Any:
    return b.js("const e = document.activeElement; return e ? [e.tagName, "
                "e.getAttribute('data-focus-key') || e.id || e.textContent.trim().slice(0, 30), "
                "e.matches(':focus-visible'), getComputedStyle(e).outlineStyle] : null;")


def _press(b: Browser, key: str, times: int = 1) -> None:
    actions = ActionChains(b.driver)
    for _ in range(times):
        actions.send_keys(key)
    actions.perform()


def _dialog_open(b: Browser) -> bool:
    return bool(b.js("return document.getElementById('confirm').open;"))


@pytest_twisted.ensureDeferred
async def test_queue_actions_behind_a_confirmation_with_mouse_and_keyboard(env, browser):
    queue = env.router.email.queue
    await in_thread(browser.open_view, "mail")
    items = (await api(env, "/api/queue/summary"))["items"]
    first, second = items[0]["id"], items[1]["id"]
    before = (await api(env, f"/api/queue/{first}"))["item"]

    # 1. retry with the mouse: Cancel changes nothing, Confirm retries now
    def retry_cancelled() -> None:
        browser.js("document.querySelector('[data-focus-key=\"retry-' + arguments[0] + '\"]')"
                   ".click();", first)
        browser.wait(_dialog_open, what="the confirmation")
        assert "Retry queue item " + first in browser.text("#confirm-text")
        browser.js("document.getElementById('confirm-cancel').click();")
        browser.wait(lambda b: not _dialog_open(b), what="the dialog to close")
        assert browser.text("#notice") == "Nothing was changed."
    await in_thread(retry_cancelled)
    unchanged = (await api(env, f"/api/queue/{first}"))["item"]
    assert unchanged["attempts"] == before["attempts"]
    assert unchanged["next_attempt"] == before["next_attempt"]

    def retry_confirmed() -> str:
        browser.js("document.querySelector('[data-focus-key=\"retry-' + arguments[0] + '\"]')"
                   ".click();", first)
        browser.wait(_dialog_open, what="the confirmation")
        path = browser.screenshot(browser.shots, "console-confirm")
        browser.js("document.getElementById('confirm-ok').click();")
        browser.wait(lambda b: "will be attempted now" in b.text("#notice"), what="the notice")
        return path
    check_screenshot(await in_thread(retry_confirmed), DESKTOP[0], DESKTOP[1])

    async def attempted() -> bool:
        item = (await api(env, f"/api/queue/{first}"))["item"]
        return item["attempts"] > before["attempts"]
    deadline = time.monotonic() + 20
    while not await attempted():
        assert time.monotonic() < deadline, "the retried item was not attempted"
        await sleep(0.2)

    # 2. delete with the keyboard only: Tab to the button, Enter, Escape cancels;
    #    again, Tab from Cancel to Delete, Enter deletes
    def keyboard_delete() -> dict:
        browser.driver.refresh()                 # a fresh page: focus starts at the top
        browser.rendered("mail")
        stops = []
        for _ in range(300):
            _press(browser, Keys.TAB)
            focused = _focus_key(browser)
            stops.append(focused)
            if focused[1] == f"delete-{second}":
                break
        out: dict[str, Any] = {"stops": stops}
        _press(browser, Keys.ENTER)
        browser.wait(_dialog_open, what="the confirmation")
        out["dialog_focus"] = _focus_key(browser)
        _press(browser, Keys.ESCAPE)
        browser.wait(lambda b: not _dialog_open(b), what="Escape to close the dialog")
        out["after_escape"] = _focus_key(browser)
        _press(browser, Keys.ENTER)
        browser.wait(_dialog_open, what="the confirmation again")
        _press(browser, Keys.TAB)
        out["confirm_focus"] = _focus_key(browser)
        _press(browser, Keys.ENTER)
        browser.wait(lambda b: "deleted" in b.text("#notice"), what="the deletion notice")
        browser.wait(lambda b: not b.js("return !!document.querySelector("
                                        "'#q-items tr[data-queue-id=\"' + arguments[0] + '\"]');",
                                        second), what="the row to go")
        out["after_delete"] = _focus_key(browser)
        return out
    result = await in_thread(keyboard_delete)
    stops = result["stops"]
    assert stops[-1][1] == f"delete-{second}", stops[-5:]
    # tab order: skip link, live toggle, the five views, then the page in reading order
    assert [s[1] for s in stops[:7]] == ["Skip to content", "live-toggle", "Overview", "Proxy",
                                         "Mail", "Certificates", "DNS"]
    assert all(s[2] and s[3] != "none" for s in stops), "focus must be visible"
    assert [s[0] for s in stops if s[1].startswith(("retry-", "delete-"))] == \
        ["BUTTON"] * len([s for s in stops if s[1].startswith(("retry-", "delete-"))])
    assert result["dialog_focus"][1] == "confirm-cancel"      # the safe choice first
    assert result["after_escape"][1] == f"delete-{second}"    # focus returns to the button
    assert result["confirm_focus"][1] == "confirm-ok"
    assert result["after_delete"][0] == "DIV"                 # its table keeps the focus
    response = await env.client.get(f"/api/queue/{second}")
    assert response.status == 404
    assert (await api(env, f"/api/queue/{first}"))["item"]["status"] == "deferred"

    # 3. pause and resume the queue (both confirmed)
    def pause() -> None:
        browser.js("document.getElementById('q-pause').click();")
        browser.wait(_dialog_open, what="the confirmation")
        browser.js("document.getElementById('confirm-ok').click();")
        browser.wait(lambda b: b.text("#q-paused") == "deliveries paused", what="paused")
    await in_thread(pause)
    assert queue.paused and (await api(env, "/api/queue/summary"))["paused"]

    def resume() -> None:
        browser.js("document.getElementById('q-resume').click();")
        browser.wait(_dialog_open, what="the confirmation")
        browser.js("document.getElementById('confirm-ok').click();")
        browser.wait(lambda b: b.text("#q-paused") == "deliveries running", what="resumed")
    await in_thread(resume)
    assert not queue.paused

    # 4. every deferred item now (confirmed), then lift the suppression (confirmed)
    attempts = (await api(env, f"/api/queue/{first}"))["item"]["attempts"]

    def confirm(selector: str, notice: str) -> None:
        browser.js("document.querySelector(arguments[0]).click();", selector)
        browser.wait(_dialog_open, what="the confirmation")
        browser.js("document.getElementById('confirm-ok').click();")
        browser.wait(lambda b: notice in b.text("#notice"), what=notice)
    await in_thread(confirm, "#q-retry-all", "Every deferred item will be attempted now.")
    deadline = time.monotonic() + 20
    while (await api(env, f"/api/queue/{first}"))["item"]["attempts"] == attempts:
        assert time.monotonic() < deadline, "retry all did not reach the deferred item"
        await sleep(0.2)
    await in_thread(confirm, f'[data-focus-key="lift-{REJECTED}"]',
                    f"Suppression of {REJECTED} lifted.")
    assert (await api(env, "/api/email/suppression"))["count"] == 0
    await in_thread(browser.wait, lambda b: not b.table("#suppression", "data-address"),
                    20.0, "the suppression list to empty")
    assert await in_thread(browser.console_errors) == []


@pytest_twisted.ensureDeferred
async def test_the_token_travels_in_a_header_never_in_a_url(env, browser):
    root = env.router.by_name["api"].root
    seen: list[tuple[bytes, Any]] = []
    original = root.render

    def recording(request: Any) -> Any:
        seen.append((request.uri, request.getHeader(b"authorization")))
        return original(request)
    root.render = recording  # type: ignore[method-assign]
    try:
        def reload() -> str:
            browser.js("sessionStorage.clear();")
            before = browser.js("return parseInt(document.body.dataset.refreshes, 10);")
            # a bookmark with the token, opened in the tab that shows the console already
            browser.driver.get(f"{env.client.base}/?interval=1#token={TOKEN}&view=mail")
            browser.rendered("mail", before)
            return browser.driver.current_url
        url = await in_thread(reload)
    finally:
        root.render = original  # type: ignore[method-assign]
    assert TOKEN not in url and url.endswith("#mail")
    api_calls = [(uri, auth) for uri, auth in seen if uri.startswith(b"/api/")]
    assert api_calls and all(TOKEN.encode() not in uri for uri, _ in seen)
    assert all(auth == f"Bearer {TOKEN}".encode() for uri, auth in api_calls
               if not uri.startswith(b"/api/openapi"))
    # the deleted item's twin arrives by SMTP meanwhile: the view follows without a reload
    await threads.deferToThread(_send_mail, env.ports["smtp"], ["c@hold.test"], "held 3")
    await wait_until(lambda: env.router.email.queue.get_stats()["size"] == 2,
                     what="the new item")
    await in_thread(browser.wait, lambda b: len(b.table("#q-items", "data-queue-id")) == 2,
                    20.0, "the new item on the page")


def test_the_operations_guide_shows_every_view_with_a_screenshot_of_the_suite():
    import os
    import re
    from tests.api.browser import DOC_SCREENSHOTS
    from tests.support.proc import REPO
    with open(os.path.join(REPO, "docs", "operations.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## The console"):text.index("## Watching the queue")]
    shown = re.findall(r"!\[[^\]]+\]\(images/([\w-]+)\.png\)", section)
    assert sorted(shown) == sorted(DOC_SCREENSHOTS)     # each view, as make screenshots takes it
    for name in shown:
        width = png_size(os.path.join(REPO, "docs", "images", f"{name}.png"))[0]
        assert width == (PHONE[0] if "phone" in name else DESKTOP[0]), name

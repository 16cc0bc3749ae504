"""Hostile input to a running API (hypothesis): every answer is a clear 4xx, never a 500."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Optional

import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import threads

from tests.api.support import TOKEN

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                      children, max_size=4),
    max_leaves=12)

RULE_KEYS = ("pattern", "mode", "target", "mta_options", "content_scanning", "scanners",
             "transformations", "rate_limits", "reject_on_dmarc_fail", "extra")

PATTERNS = st.one_of(
    st.text(max_size=30),
    st.builds(lambda local, domain: f"{local}@{domain}",
              st.text("ab*?.-+/%", min_size=1, max_size=6),
              st.text("xyz*?.-", min_size=1, max_size=10)))

RULES = st.fixed_dictionaries({}, optional={
    "pattern": PATTERNS,
    "mode": st.sampled_from(["forward", "mta", "process", "teleport", ""]) | JSON_VALUES,
    "target": st.fixed_dictionaries({}, optional={
        "server": st.text(max_size=10) | JSON_VALUES,
        "port": st.integers(-5, 70000) | JSON_VALUES}) | JSON_VALUES,
    "mta_options": st.dictionaries(st.sampled_from(["allow_local_delivery", "dkim_sign",
                                                    "local_delivery_path", "nope"]),
                                   JSON_VALUES, max_size=3) | JSON_VALUES,
    "content_scanning": JSON_VALUES,
    "scanners": st.lists(st.dictionaries(st.sampled_from(["type", "action", "threshold"]),
                                         st.sampled_from(["virus", "spam", "reject", "tag"])
                                         | JSON_VALUES, max_size=3), max_size=2) | JSON_VALUES,
    "transformations": JSON_VALUES,
    "rate_limits": JSON_VALUES,
    "reject_on_dmarc_fail": JSON_VALUES,
    "extra": JSON_VALUES,
})


def _call(base: str, method: str, path: str, body: Optional[bytes] = None,
          content_type: str = "application/json") -> tuple[int, Any]:
    request = urllib.request.Request(base + path, data=body, method=method, headers={
        "Authorization": f"Bearer {TOKEN}", "Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            status, kind, raw = response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as e:
        status, kind, raw = e.code, e.headers["Content-Type"], e.read()
    if status >= 400:
        assert kind == "application/json", (status, kind, raw[:200])
    return status, json.loads(raw) if kind == "application/json" else raw


def _fuzz_rules(base: str) -> dict[int, int]:
    seen: dict[int, int] = {}

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(RULES)
    def post(rule: dict) -> None:
        status, body = _call(base, "POST", "/api/email/rules", json.dumps(rule).encode())
        seen[status] = seen.get(status, 0) + 1
        assert status in (201, 400, 409, 422), (status, body, rule)
        if status == 201:
            quoted = urllib.parse.quote(body["rule"]["pattern"], safe="")
            assert _call(base, "GET", f"/api/email/rules/{quoted}")[0] == 200
            assert _call(base, "DELETE", f"/api/email/rules/{quoted}")[0] == 200
        else:
            assert set(body) == {"error"} and body["error"]["message"]
            if status == 422:  # the rule's own key, or its place in email.domain_rules
                assert body["error"]["path"].startswith(("rule", "email.domain_rules[1]"))

    post()
    return seen


@pytest_twisted.ensureDeferred
async def test_random_rules_get_201_or_a_clear_error(running):
    router, client, queue = running
    seen = await threads.deferToThread(_fuzz_rules, client.base)
    assert seen.get(422, 0) > 10  # the strategy reaches validation, not only JSON errors
    assert [r.pattern for r in router.options.email.domain_rules] == ["*@localhost"]


def _fuzz_paths_and_bodies(base: str) -> None:
    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
           st.sampled_from(["/api/queue/", "/api/email/rules/", "/api/", "/", "/api/queue?",
                            "/api/queue?limit=", "/api/queue?status="]),
           st.text(max_size=30), st.binary(max_size=200),
           st.sampled_from(["application/json", "text/plain", ""]))
    def request(method: str, prefix: str, tail: str, body: bytes, content_type: str) -> None:
        path = prefix + urllib.parse.quote(tail, safe="/?=&%")
        status, answer = _call(base, method, path, body if method != "GET" else None,
                               content_type)
        assert status < 500, (method, path, body, answer)
        if status >= 400:
            assert set(answer) == {"error"} and answer["error"]["code"]

    request()


@pytest_twisted.ensureDeferred
async def test_random_paths_and_bodies_never_fail_the_server(running):
    router, client, queue = running
    queue.pause()  # nothing gets delivered while random requests run
    await threads.deferToThread(_fuzz_paths_and_bodies, client.base)
    assert (await client.get("/api/status")).status == 200

"""Every API endpoint over real HTTP (treq) against a running router: happy and error paths."""

from __future__ import annotations

import os
import time
import tomllib

import pytest_twisted

from dcrouter.api.handlers import ENDPOINTS
from tests.api.support import (
    TOKEN, UNREACHABLE_PORT, Client, InMemoryQueue, StandInItem, assert_error, hold_items,
    start_api_router,
)
from tests.support.configs import write_config
from tests.support.router import stop_router


def _concrete(template: str) -> str:
    return template.replace("{pattern}", "%2A%40localhost").replace("{id}", "X1")


# -- authentication ---------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_every_protected_endpoint_refuses_a_request_without_token(running):
    router, client, queue = running
    protected = [e for e in ENDPOINTS if not e.public]
    assert len(protected) >= 18
    for endpoint in protected:
        response = await client.request(endpoint.method, _concrete(endpoint.template),
                                        token=None)
        assert_error(response, 401, "unauthorized")
        assert response.header("WWW-Authenticate") == 'Bearer realm="dcrouter"'
    assert router.by_name["api"].get_stats()["auth_failures"] == len(protected)


@pytest_twisted.ensureDeferred
async def test_wrong_token_and_malformed_headers_are_refused(running):
    router, client, queue = running
    assert_error(await client.get("/api/status", token="wrong"), 401, "unauthorized")
    for header in (f"Basic {TOKEN}", f"Bearer{TOKEN}", "Bearer ", TOKEN):
        response = await client.get("/api/status", token=None,
                                    headers={"Authorization": header})
        assert_error(response, 401, "unauthorized")
    assert (await client.get("/api/status", token=None,
                             headers={"Authorization": f"bearer {TOKEN}"})).status == 200


@pytest_twisted.ensureDeferred
async def test_repeated_failures_are_rate_limited_per_ip_then_429(tmp_path):
    router, port = start_api_router(str(tmp_path / "var"), max_auth_failures_per_minute=3)
    client = Client(port)
    try:
        for _ in range(3):
            assert_error(await client.get("/api/stats", token="guess"), 401, "unauthorized")
        limited = await client.get("/api/stats", token="guess")
        error = assert_error(limited, 429, "too_many_requests")
        assert 1 <= error["retry_after"] <= 60
        assert limited.header("Retry-After") == str(error["retry_after"])
        # while limited, even the right token is not checked: brute force gains nothing
        assert_error(await client.get("/api/stats"), 429, "too_many_requests")
        stats = router.by_name["api"].get_stats()
        assert stats["auth_failures"] == 3 and stats["auth_rate_limited"] == 2
    finally:
        await stop_router(router)


@pytest_twisted.ensureDeferred
async def test_public_paths_need_no_token(running):
    router, client, queue = running
    for path in ("/", "/app.js", "/style.css", "/api/openapi.json"):
        response = await client.get(path, token=None)
        assert response.status == 200, path
    page = await client.get("/", token=None)
    assert page.header("Content-Type") == "text/html; charset=utf-8"
    assert "script-src 'self'" in page.header("Content-Security-Policy")


@pytest_twisted.ensureDeferred
async def test_open_api_without_token_on_loopback(tmp_path):
    router, port = start_api_router(str(tmp_path / "var"), token="")
    try:
        response = await Client(port, token=None).get("/api/status")
        assert response.status == 200
    finally:
        await stop_router(router)


@pytest_twisted.ensureDeferred
async def test_cross_origin_browser_requests_are_refused(running):
    router, client, queue = running
    host = client.base.split("//")[1]
    for origin in ("http://evil.example", "null", f"http://{host}.evil.example"):
        response = await client.post("/api/queue/pause", headers={"Origin": origin})
        assert_error(response, 403, "forbidden")
    assert queue.paused is False
    same = await client.post("/api/queue/pause", headers={"Origin": f"http://{host}"})
    assert same.status == 200 and queue.paused is True


@pytest_twisted.ensureDeferred
async def test_open_api_answers_only_to_ip_and_localhost_hosts(tmp_path):
    """Without a token, a DNS-rebinding page (Host: its own name) gets nothing."""
    router, port = start_api_router(str(tmp_path / "var"), token="")
    client = Client(port, token=None)
    try:
        error = assert_error(await client.post("/api/reload", headers={
            "Host": f"rebind.attacker.example:{port}"}), 403, "forbidden")
        assert "only to IP addresses and localhost" in error["message"]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "[::1]", "localhost"):
            assert (await client.get("/api/status", headers={"Host": host})).status == 200
    finally:
        await stop_router(router)


# -- routing and error shape --------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_unknown_path_and_wrong_method_are_json_errors(running):
    router, client, queue = running
    assert_error(await client.get("/api/nothing"), 404, "not_found")
    assert_error(await client.get("/favicon.ico"), 404, "not_found")
    response = await client.request("PATCH", "/api/status")
    error = assert_error(response, 405, "method_not_allowed")
    assert error["allowed"] == ["GET"] and response.header("Allow") == "GET"
    response = await client.post("/api/email/rules/x%40y.test", body={})
    assert_error(response, 405, "method_not_allowed")
    assert set(response.header("Allow").split(", ")) == {"GET", "PUT", "DELETE"}
    assert_error(await client.post("/", body={}), 405, "method_not_allowed")


@pytest_twisted.ensureDeferred
async def test_unexpected_failure_is_a_500_without_traceback(running):
    router, client, queue = running

    class BrokenQueue(InMemoryQueue):
        def list_items(self, status=None, limit=100, cursor=None):
            raise RuntimeError("disk on fire at /secret/path")

    router.by_name["email"].queue = BrokenQueue()
    response = await client.get("/api/queue")
    error = assert_error(response, 500, "internal")
    assert "secret" not in response.text and "RuntimeError" not in response.text
    assert "see the dcrouter log" in error["message"]


@pytest_twisted.ensureDeferred
async def test_body_errors(running):
    router, client, queue = running
    assert_error(await client.post("/api/email/rules", raw=b"{not json",
                                   headers={"Content-Type": "application/json"}),
                 400, "bad_request")
    assert_error(await client.post("/api/email/rules", raw=b""), 400, "bad_request")
    assert_error(await client.post("/api/email/rules", raw=b"pattern=x",
                                   headers={"Content-Type": "application/x-www-form-urlencoded"}),
                 415, "unsupported_media_type")
    assert_error(await client.post("/api/email/rules", body=["a", "list"]), 400, "bad_request")
    big = b'{"pattern": "' + b"a" * (1024 * 1024 + 10) + b'"}'
    assert_error(await client.post("/api/email/rules", raw=big,
                                   headers={"Content-Type": "application/json"}),
                 413, "payload_too_large")


# -- status and stats ------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_status_lists_services_with_real_ports(running):
    router, client, queue = running
    response = await client.get("/api/status")
    assert response.status == 200 and response.header("Content-Type") == "application/json"
    status = response.json()
    assert status["version"] and status["uptime"] >= 0
    assert set(status["services"]) == {"dns", "email", "proxy", "api"}
    for name, service in status["services"].items():
        assert service["running"] is True
        listed = {(l["protocol"], l["port"]) for l in service["listeners"]}
        assert listed == {(p, port) for p, _h, port in router.by_name[name].bound_addresses()}
    api_port = status["services"]["api"]["listeners"][0]["port"]
    assert client.base.endswith(f":{api_port}")


@pytest_twisted.ensureDeferred
async def test_stats_has_every_service_and_a_summary(running):
    router, client, queue = running
    await hold_items(router, ["b@y.test", "c@y.test"])
    stats = (await client.get("/api/stats")).json()
    assert {"version", "uptime", "email", "proxy", "dns", "api", "summary"} <= set(stats)
    assert stats["email"]["queue"]["by_status"]["pending"] == 2
    assert stats["email"]["queue"]["size"] == 2
    summary = stats["summary"]
    assert summary["queue_depth"] == 2 and summary["queue_paused"] is True
    assert summary["messages_accepted_total"] == 0
    assert stats["api"]["requests"] >= 1


# -- email rules --------------------------------------------------------------------------

FORWARD = {"pattern": "*@example.org", "mode": "forward",
           "target": {"server": "127.0.0.1", "port": 2526}}


@pytest_twisted.ensureDeferred
async def test_rule_crud_goes_through_the_router_and_routes_the_next_lookup(running):
    router, client, queue = running
    rules = (await client.get("/api/email/rules")).json()
    assert [r["pattern"] for r in rules["rules"]] == ["*@localhost"] and rules["persisted"]

    created = await client.post("/api/email/rules", body=FORWARD)
    assert created.status == 201, created.text
    assert created.json()["rule"]["target"]["port"] == 2526
    assert created.json()["position"] == 1
    # the router's options are the single source of truth, and the domain router follows
    assert [r.pattern for r in router.options.email.domain_rules] == ["*@localhost",
                                                                      "*@example.org"]
    matched = router.email.domain_router.match_rule("someone@example.org")
    assert matched is not None and matched.mode == "forward"

    for path in ("/api/email/rules/%2A%40example.org", "/api/email/rules/*@example.org",
                 "/api/email/rules/example.org", "/api/email/rules/%2A%40EXAMPLE.org"):
        got = await client.get(path)
        assert got.status == 200, path
        assert got.json()["rule"]["pattern"] == "*@example.org"

    replaced = await client.put("/api/email/rules/%2A%40example.org",
                                body={"mode": "mta", "mta_options": {"dkim_sign": False}})
    assert replaced.status == 200, replaced.text
    assert replaced.json() == {"rule": {"pattern": "*@example.org", "mode": "mta",
                                        "mta_options": {"domain": "", "allow_local_delivery":
                                                        False, "local_delivery_path": "",
                                                        "dkim_sign": False},
                                        "content_scanning": False, "scanners": [],
                                        "transformations": [],
                                        "reject_on_dmarc_fail": False, "recipients": [],
                                        "recipients_file": "", "recipient_check": ""},
                               "position": 1}
    assert router.email.domain_router.match_rule("x@example.org").mode == "mta"

    removed = await client.delete("/api/email/rules/%2A%40example.org")
    assert removed.status == 200 and removed.json()["removed"]["pattern"] == "*@example.org"
    assert router.email.domain_router.match_rule("x@example.org") is None
    assert_error(await client.get("/api/email/rules/%2A%40example.org"), 404, "not_found")


@pytest_twisted.ensureDeferred
async def test_rule_insert_position(running):
    router, client, queue = running
    response = await client.post("/api/email/rules?position=0", body=FORWARD)
    assert response.status == 201 and response.json()["position"] == 0
    assert router.options.email.domain_rules[0].pattern == "*@example.org"
    assert_error(await client.post("/api/email/rules?position=9",
                                   body=dict(FORWARD, pattern="*@a.test")), 400, "bad_request")
    assert_error(await client.post("/api/email/rules?position=x",
                                   body=dict(FORWARD, pattern="*@a.test")), 400, "bad_request")


@pytest_twisted.ensureDeferred
async def test_rule_validation_reads_like_a_config_error(running):
    router, client, queue = running
    cases = [
        ({"pattern": "*@a.test", "mode": "forward"}, "rule.target",
         "rule.target: forward mode needs a target"),
        ({"pattern": "*@a.test", "mode": "forward", "target": {"server": "h", "port": "x"}},
         "rule.target.port", "must be an integer"),
        ({"pattern": "*@a.test", "mode": "teleport"}, "rule.mode", "must be one of"),
        ({"pattern": "*@a.test", "mode": "mta", "target_server": "h"}, "rule.target_server",
         "unknown key"),
        ({"pattern": "a@@b", "mode": "mta"}, "rule.pattern", "malformed pattern"),
        ({"mode": "mta"}, "rule.pattern", "required key is missing"),
        ({"pattern": "*@a.test", "mode": "forward",
          "target": {"server": "h", "port": 70000}}, "rule.target.port", "must be 1..65535"),
    ]
    for body, path, text in cases:
        error = assert_error(await client.post("/api/email/rules", body=body), 422,
                             "invalid_config")
        assert error["path"] == path, error
        assert text in error["message"], error
    assert len(router.options.email.domain_rules) == 1


@pytest_twisted.ensureDeferred
async def test_rule_conflicts_and_missing_rules(running):
    router, client, queue = running
    assert (await client.post("/api/email/rules", body=FORWARD)).status == 201
    assert_error(await client.post("/api/email/rules", body=dict(FORWARD, pattern="*@EXAMPLE.ORG")),
                 409, "conflict")
    assert_error(await client.put("/api/email/rules/%2A%40example.org",
                                  body=dict(FORWARD, pattern="*@localhost")), 409, "conflict")
    assert_error(await client.put("/api/email/rules/nobody%40none.test", body=FORWARD),
                 404, "not_found")
    assert_error(await client.delete("/api/email/rules/nobody%40none.test"), 404, "not_found")
    error = assert_error(await client.put("/api/email/rules/%2A%40example.org",
                                          body={"mode": "forward"}), 422, "invalid_config")
    assert error["path"] == "rule.target"
    # a rename through PUT keeps the position
    renamed = await client.put("/api/email/rules/%2A%40example.org",
                               body=dict(FORWARD, pattern="*@example.net"))
    assert renamed.status == 200 and renamed.json()["position"] == 1
    assert [r.pattern for r in router.options.email.domain_rules] == ["*@localhost",
                                                                      "*@example.net"]


@pytest_twisted.ensureDeferred
async def test_rule_changes_persist_across_a_restart(tmp_path):
    state_dir = str(tmp_path / "var")
    router, port = start_api_router(state_dir)
    try:
        client = Client(port)
        assert (await client.post("/api/email/rules", body=FORWARD)).status == 201
        assert (await client.delete("/api/email/rules/%2A%40localhost")).status == 200
    finally:
        await stop_router(router)
    path = os.path.join(state_dir, "rules.toml")
    with open(path, "rb") as f:
        saved = tomllib.load(f)
    assert [r["pattern"] for r in saved["domain_rules"]] == ["*@example.org"]
    assert os.stat(path).st_mode & 0o077 == 0
    router, port = start_api_router(state_dir)
    try:
        assert [r.pattern for r in router.options.email.domain_rules] == ["*@example.org"]
        listed = (await Client(port).get("/api/email/rules")).json()["rules"]
        assert [r["pattern"] for r in listed] == ["*@example.org"]
    finally:
        await stop_router(router)


@pytest_twisted.ensureDeferred
async def test_rule_changes_without_persistence_leave_no_file(tmp_path):
    state_dir = str(tmp_path / "var")
    router, port = start_api_router(state_dir, persist_rules=False)
    try:
        client = Client(port)
        assert (await client.post("/api/email/rules", body=FORWARD)).status == 201
        assert (await client.get("/api/email/rules")).json()["persisted"] is False
        assert not os.path.exists(os.path.join(state_dir, "rules.toml"))
    finally:
        await stop_router(router)


# -- queue ----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_queue_listing_is_paginated_and_filtered(running):
    router, client, queue = running
    ids = sorted(await hold_items(router, [f"r{i}@b.test" for i in range(5)]))
    first = (await client.get("/api/queue?limit=2")).json()
    assert [i["id"] for i in first["items"]] == ids[:2] and first["next_cursor"] == ids[1]
    second = (await client.get(f"/api/queue?limit=2&cursor={first['next_cursor']}")).json()
    assert [i["id"] for i in second["items"]] == ids[2:4]
    last = (await client.get(f"/api/queue?limit=2&cursor={second['next_cursor']}")).json()
    assert [i["id"] for i in last["items"]] == ids[4:] and last["next_cursor"] is None
    pending = (await client.get("/api/queue?status=pending")).json()
    assert [i["id"] for i in pending["items"]] == ids and pending["count"] == 5
    assert pending["items"][0]["mode"] == "forward"
    assert pending["items"][0]["recipients"][0]["address"].endswith("@b.test")
    assert (await client.get("/api/queue?status=deferred")).json()["items"] == []
    error = assert_error(await client.get("/api/queue?status=lost"), 400, "bad_request")
    assert "unknown status" in error["message"]
    for bad in ("0", "1001", "ten", "-1"):
        assert_error(await client.get(f"/api/queue?limit={bad}"), 400, "bad_request")


@pytest_twisted.ensureDeferred
async def test_queue_item_get_retry_delete(running):
    router, client, queue = running
    first, second, third = await hold_items(router, ["a@b.test", "c@b.test", "d@b.test"], 500)
    item = (await client.get(f"/api/queue/{first}")).json()["item"]
    assert item["status"] == "pending" and item["size"] > 500 and item["attempts"] == 0
    assert item["via"]["nexthop"]["port"] == UNREACHABLE_PORT
    assert_error(await client.get("/api/queue/NOPE"), 404, "not_found")

    before = time.time()
    retried = await client.post(f"/api/queue/{first}/retry")
    assert retried.json() == {"id": first, "retried": True}
    item = (await client.get(f"/api/queue/{first}")).json()["item"]
    assert before - 1 <= item["next_attempt"] <= time.time()
    assert_error(await client.post("/api/queue/NOPE/retry"), 404, "not_found")
    assert (await client.post("/api/queue/retry")).json() == {"retried": 3}

    assert (await client.delete(f"/api/queue/{third}")).json() == {"id": third, "deleted": True}
    assert await queue.get_item(third) is None
    assert_error(await client.delete(f"/api/queue/{third}"), 404, "not_found")
    assert_error(await client.get(f"/api/queue/{third}"), 404, "not_found")
    listed = (await client.get("/api/queue")).json()["items"]
    assert sorted(i["id"] for i in listed) == sorted([first, second])


@pytest_twisted.ensureDeferred
async def test_queue_item_being_delivered_cannot_be_retried(standin):
    router, client, queue = standin
    queue.add(StandInItem("Q1", "s@a.test", ["r@b.test"], 100, status="delivering"))
    error = assert_error(await client.post("/api/queue/Q1/retry"), 409, "conflict")
    assert error["message"] == "queue item 'Q1' is delivering and cannot be retried " \
        "(only waiting items can be)"


@pytest_twisted.ensureDeferred
async def test_queue_pause_resume_flush_are_observable(running):
    router, client, queue = running
    assert (await client.post("/api/queue/pause")).json() == {"paused": True}
    stats = (await client.get("/api/stats")).json()
    assert stats["email"]["queue"]["paused"] is True and stats["summary"]["queue_paused"]
    assert queue.paused is True
    assert (await client.post("/api/queue/resume")).json() == {"paused": False}
    assert (await client.get("/api/stats")).json()["summary"]["queue_paused"] is False
    assert queue.paused is False
    assert (await client.post("/api/queue/flush")).json() == {"flushed": 0}


@pytest_twisted.ensureDeferred
async def test_queue_without_management_methods_is_a_503(tmp_path):
    router, port = start_api_router(str(tmp_path / "var"))

    class MinimalQueue:
        """A queue that only reports figures (like the placeholder)."""

        def get_stats(self):
            return {"size": 0}

    router.by_name["email"].queue = MinimalQueue()
    client = Client(port)
    try:
        for method, path in (("GET", "/api/queue"), ("GET", "/api/queue/X"),
                             ("POST", "/api/queue/X/retry"), ("DELETE", "/api/queue/X"),
                             ("POST", "/api/queue/pause"), ("POST", "/api/queue/resume"),
                             ("POST", "/api/queue/flush"), ("POST", "/api/queue/retry")):
            error = assert_error(await client.request(method, path), 503, "service_unavailable")
            assert "queue does not support" in error["message"]
    finally:
        await stop_router(router)


# -- proxy, DNS, sections absent --------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_proxy_routes_and_dns_zones(running):
    router, client, queue = running
    routes = (await client.get("/api/proxy/routes")).json()["routes"]
    assert [r["name"] for r in routes] == ["web", "http"]
    assert routes[0]["tls"] == "passthrough" and routes[0]["targets"] == ["127.0.0.1:9443"]
    assert routes[0]["ports"] == [router.options.proxy.routes[0].ports[0]]
    zones = {z["origin"]: z for z in (await client.get("/api/dns/zones")).json()["zones"]}
    zone = zones["dcrouter.test."]
    assert zone["serial"] > 0
    records = {(r["name"], r["type"]): r["value"] for r in zone["records"]}
    assert records[("dcrouter.test.", "A")] == "127.0.0.1"
    assert records[("mail.dcrouter.test.", "A")] == "127.0.0.1"


@pytest_twisted.ensureDeferred
async def test_absent_sections_give_503(tmp_path):
    from tests.support.net import free_port
    from tests.support.router import options_from, start_router
    options = options_from({"api": {"port": free_port(), "token": TOKEN}}, str(tmp_path / "v"))
    router = start_router(options)
    client = Client(router.by_name["api"].listeners.port_for("api.port"))
    try:
        for method, path in (("GET", "/api/email/rules"), ("POST", "/api/email/rules"),
                             ("GET", "/api/email/rules/a%40b.c"), ("GET", "/api/queue"),
                             ("POST", "/api/queue/pause"), ("GET", "/api/proxy/routes"),
                             ("GET", "/api/dns/zones")):
            body = FORWARD if method == "POST" and "rules" in path else None
            error = assert_error(await client.request(method, path, body=body), 503,
                                 "service_unavailable")
            assert "not configured" in error["message"]
        status = (await client.get("/api/status")).json()
        assert list(status["services"]) == ["api"]
    finally:
        await stop_router(router)


# -- reload -------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_reload_without_a_file_is_a_conflict(running):
    router, client, queue = running
    error = assert_error(await client.post("/api/reload"), 409, "conflict")
    assert "not started from a configuration file" in error["message"]


@pytest_twisted.ensureDeferred
async def test_reload_applies_the_file_and_refuses_a_broken_one(tmp_path):
    from tests.api.support import router_config
    from tests.support.router import options_from, start_router
    state_dir = str(tmp_path / "var")
    data, _ports = router_config(state_dir)
    path = write_config(str(tmp_path / "dcrouter.toml"), data)
    router = start_router(options_from(data, state_dir), config_path=path)
    port = router.by_name["api"].listeners.port_for("api.port")
    client = Client(port)
    try:
        data["email"]["domain_rules"].append(dict(FORWARD))
        write_config(path, data)
        response = await client.post("/api/reload")
        assert response.status == 200, response.text
        assert response.json() == {"reloaded": True, "config_path": path}
        assert router.email.domain_router.match_rule("a@example.org").mode == "forward"

        broken = dict(data, email=dict(data["email"], ports=[2525, 99999]))
        write_config(path, broken)
        error = assert_error(await client.post("/api/reload"), 422, "invalid_config")
        assert error["path"] == "email.ports[1]"
        assert error["message"] == "email.ports[1]: must be 1..65535, got 99999"
        assert router.email.domain_router.match_rule("a@example.org").mode == "forward"

        data["api"]["token"] = "rotated-token"
        write_config(path, data)
        assert (await client.post("/api/reload")).status == 200
        assert_error(await client.get("/api/status"), 401, "unauthorized")
        assert (await client.get("/api/status", token="rotated-token")).status == 200
    finally:
        await stop_router(router)


# -- OpenAPI ---------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_openapi_document_is_valid_and_describes_every_endpoint(running):
    from openapi_spec_validator import validate

    router, client, queue = running
    response = await client.get("/api/openapi.json", token=None)
    assert response.status == 200 and response.header("Content-Type") == "application/json"
    document = response.json()
    validate(document)
    assert document["openapi"].startswith("3.")
    for endpoint in ENDPOINTS:
        operation = document["paths"][endpoint.template][endpoint.method.lower()]
        assert operation["summary"] and operation["responses"]
        if not endpoint.public:
            assert operation["security"] == [{"bearer": []}]
            assert {"401", "429"} <= set(operation["responses"])
    documented = {(path, method.upper()) for path, item in document["paths"].items()
                  for method in item}
    assert documented == {(e.template, e.method) for e in ENDPOINTS}
    handlers = router.by_name["api"].handlers
    assert all(callable(handlers.handler_for(e)) for e in ENDPOINTS
               if e.handler != "prometheus_metrics")  # /metrics is rendered by the resource
    # every documented operation is served (none answers "no endpoint")
    for path, method in documented:
        answer = await client.request(method, _concrete(path))
        if answer.status == 404:
            assert "no endpoint" not in answer.json()["error"]["message"], (method, path)
        assert answer.status not in (405, 500), (method, path, answer.text)


@pytest_twisted.ensureDeferred
async def test_concurrent_rule_changes_are_serialised(running):
    from twisted.internet import defer
    router, client, queue = running
    bodies = [dict(FORWARD, pattern=f"*@c{i}.test") for i in range(8)]
    answers = await defer.gatherResults([
        defer.ensureDeferred(client.post("/api/email/rules", body=b)) for b in bodies])
    assert [a.status for a in answers] == [201] * 8
    patterns = {r.pattern for r in router.options.email.domain_rules}
    assert patterns == {"*@localhost"} | {b["pattern"] for b in bodies}
    with open(os.path.join(router.options.router.state_dir, "rules.toml"), "rb") as f:
        assert len(tomllib.load(f)["domain_rules"]) == 9


@pytest_twisted.ensureDeferred
async def test_head_requests_get_headers_only(running):
    router, client, queue = running
    response = await client.request("HEAD", "/api/status")
    assert response.status == 200 and response.text == ""
    assert response.header("Content-Type") == "application/json"


@pytest_twisted.ensureDeferred
async def test_rule_the_processor_refuses_changes_nothing(running):
    router, client, queue = running
    rule = {"pattern": "*@t.test", "mode": "process",
            "transformations": [{"type": "no_such_transformation"}]}
    error = assert_error(await client.post("/api/email/rules", body=rule), 422,
                         "invalid_config")
    assert "no_such_transformation" in error["message"] and error["path"]
    assert [r.pattern for r in router.options.email.domain_rules] == ["*@localhost"]
    assert not os.path.exists(os.path.join(router.options.router.state_dir, "rules.toml"))
    assert router.email.domain_router.match_rule("a@t.test") is None
    fine = dict(rule, transformations=[{"type": "add_header", "header": "X-T", "value": "1"}])
    assert (await client.post("/api/email/rules", body=fine)).status == 201


@pytest_twisted.ensureDeferred
async def test_a_service_that_never_answers_is_a_503_after_the_timeout(standin):
    from twisted.internet import defer
    router, client, queue = standin
    hanging: list = []

    def list_items(status=None, limit=100, cursor=None):
        d = defer.Deferred()
        hanging.append(d)
        return d

    queue.list_items = list_items  # type: ignore[method-assign]
    router.by_name["api"].root.timeout = 0.3
    error = assert_error(await client.get("/api/queue"), 503, "service_unavailable")
    assert error["message"] == "the service did not answer within 0.3s; try again"
    assert hanging and hanging[0].called  # cancelled, not left dangling
    assert (await client.get("/api/status")).status == 200

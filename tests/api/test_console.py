"""The console's JSON (/api/history, routing, deliveries, queue summary, certificates, proxy,
DNS) against a running router with real traffic, and against its OpenAPI schemas."""

from __future__ import annotations

import hashlib
import socket
import ssl
import time

import pytest_twisted
from openapi_schema_validator import OAS30Validator
from twisted.internet import defer, threads

from tests.api.console_env import (REJECT_REPLY, REJECTED, make_traffic, settled_history,
                                   start_console_env, stop_console_env)
from tests.api.support import assert_error

CONSOLE_PATHS = ["/api/history", "/api/email/routing", "/api/email/deliveries",
                 "/api/queue/summary", "/api/certificates", "/api/proxy/routes",
                 "/api/dns/zones", "/api/dns/zones?records=false", "/api/status"]


@pytest_twisted.async_yield_fixture(scope="module")
async def env(tmp_path_factory):
    """One router with traffic for every test of this module (they only read)."""
    environment = await start_console_env(str(tmp_path_factory.mktemp("console")))
    try:
        await make_traffic(environment)
        await settled_history(environment)
        yield environment
    finally:
        await stop_console_env(environment)


async def _json(env, path: str) -> dict:
    response = await env.client.get(path)
    assert response.status == 200, (path, response.text)
    assert response.header("Content-Type") == "application/json"
    return response.json()


@pytest_twisted.ensureDeferred
async def test_every_console_answer_validates_against_its_openapi_schema(env):
    document = (await env.client.get("/api/openapi.json", token=None)).json()
    for path in CONSOLE_PATHS:
        template = path.split("?")[0]
        schema = document["paths"][template]["get"]["responses"]["200"]["content"][
            "application/json"]["schema"]
        body = await _json(env, path)
        errors = sorted(OAS30Validator(schema).iter_errors(body), key=str)
        assert not errors, (path, [str(e)[:300] for e in errors[:3]])
    status = await _json(env, "/api/status")
    assert status["console"] == {"interval": 5.0}          # api.console_interval


@pytest_twisted.ensureDeferred
async def test_console_endpoints_need_the_token(env):
    for path in CONSOLE_PATHS:
        assert_error(await env.client.get(path, token=None), 401, "unauthorized")


@pytest_twisted.ensureDeferred
async def test_history_counts_the_traffic_that_was_sent(env):
    history = await _json(env, "/api/history?minutes=10&step=60")
    assert history["step"] == 60 and len(history["times"]) == 10 and history["interval"] == 1
    series = history["series"]

    def total(name: str) -> float:
        return sum(p for p in series[name]["points"] if p is not None)
    stats = env.router.get_stats()
    # the first sample was taken at start (all zero): every message since is in a bucket
    assert total("email.accepted") == stats["email"]["server"]["messages_accepted"] == 6
    assert total("email.delivered") == stats["email"]["delivery"]["counters"]["delivered"]
    assert total("email.bounced") == 1
    assert total("email.deferred") >= 2
    assert series["email.accepted"]["kind"] == "counter"
    assert series["queue.depth"]["kind"] == "gauge"
    assert [p for p in series["queue.depth"]["points"] if p is not None][-1] == \
        stats["email"]["queue"]["size"]
    routes = stats["proxy"]["routes"]
    assert total("proxy.connections") == sum(r["total_connections"] for r in routes.values())
    assert total("proxy.bytes_out") == sum(r["bytes_out"] for r in routes.values()) > 0
    sent = env.sent["dns"]
    assert total("dns.queries.NOERROR") == list(sent.values()).count("NOERROR") == 3
    assert total("dns.queries.NXDOMAIN") == list(sent.values()).count("NXDOMAIN") == 2


@pytest_twisted.ensureDeferred
async def test_history_parameters_are_checked(env):
    for query in ("minutes=0", "minutes=-5", "step=0", "step=3601", "step=x",
                  "minutes=" + "9" * 30):
        assert_error(await env.client.get(f"/api/history?{query}"), 400, "bad_request")
    small = await _json(env, "/api/history?minutes=1&step=1")
    assert small["step"] == 1 and len(small["times"]) == 60   # not below history_interval
    whole = await _json(env, "/api/history?minutes=600&step=60")
    assert len(whole["times"]) == 60                           # the window: an hour


@pytest_twisted.ensureDeferred
async def test_rules_in_precedence_order_with_their_counters(env):
    routing = await _json(env, "/api/email/routing")
    assert routing["priority_order"] == "most-specific"
    rules = {r["pattern"]: r for r in routing["rules"]}
    assert [r["position"] for r in routing["rules"]] == list(range(1, 5))
    expected = env.router.email.domain_router.rules_in_match_order()
    assert [r["pattern"] for r in routing["rules"]] == [r.pattern for r in expected]
    assert rules["*@localhost"]["counters"]["accepted"] == 2
    assert rules["*@sink.test"]["counters"] == {"accepted": 2, "delivered": 2, "deferred": 0,
                                                "bounced": 0}
    assert rules["*@reject.test"]["counters"] == {"accepted": 2, "delivered": 1,
                                                  "deferred": 0, "bounced": 1}
    assert rules["*@hold.test"]["counters"]["accepted"] == 2
    assert rules["*@hold.test"]["counters"]["deferred"] >= 2
    assert rules["*@hold.test"]["detail"] == "forward (127.0.0.1:9)"
    # the DSN to ops@localhost is counted apart from the rules
    other = {o["pattern"]: o for o in routing["other"]}
    assert other["(dsn)"]["counters"]["delivered"] == 1


@pytest_twisted.ensureDeferred
async def test_last_deliveries_and_failures_carry_the_reply_text(env):
    recent = await _json(env, "/api/email/deliveries")
    by_rule = {}
    for entry in recent["deliveries"]:
        by_rule.setdefault(entry["rule"], []).append(entry)
    sink = by_rule["*@sink.test"][0]
    assert {r["address"] for r in sink["recipients"]} == {"one@sink.test", "two@sink.test"}
    assert all(r["status"] == "delivered" and r["code"] == 250 for r in sink["recipients"])
    bounced = [f for f in recent["failures"] if f["outcome"] == "bounced"]
    assert len(bounced) == 1
    gone = next(r for r in bounced[0]["recipients"] if r["address"] == REJECTED)
    assert gone["code"] == 550 and REJECT_REPLY[4:] in gone["reply"]
    deferred = [f for f in recent["failures"] if f["outcome"] == "deferred"]
    assert {f["rule"] for f in deferred} == {"*@hold.test"}
    assert all(f["error"] for f in deferred)
    times = [e["time"] for e in recent["deliveries"]]
    assert times == sorted(times, reverse=True)      # newest first
    assert len((await _json(env, "/api/email/deliveries?limit=1"))["deliveries"]) == 1
    assert_error(await env.client.get("/api/email/deliveries?limit=51"), 400, "bad_request")


@pytest_twisted.ensureDeferred
async def test_queue_summary_by_destination_with_the_oldest_age(env):
    summary = await _json(env, "/api/queue/summary")
    assert summary["size"] == 2 and summary["complete"] and summary["scanned"] == 2
    assert summary["by_status"]["deferred"] == 2
    (held,) = summary["destinations"]
    assert held["destination"] == "127.0.0.1:9" and held["total"] == 2
    assert held["by_status"] == {"pending": 0, "processing": 0, "deferred": 2}
    oldest = min(i["created_at"] for i in summary["items"])
    assert abs(held["oldest_age"] - (summary["time"] - oldest)) < 0.01
    assert held["last_error"] and held["next_attempt"] > time.time()
    assert {r["address"] for i in summary["items"] for r in i["recipients"]} == \
        {"a@hold.test", "b@hold.test"}


@pytest_twisted.ensureDeferred
async def test_the_summary_is_computed_once_for_many_clients(env):
    console = env.router.by_name["api"].handlers.groups["console"]
    before = console.cache.computed
    answers = await defer.gatherResults([defer.ensureDeferred(env.client.get(
        "/api/queue/summary")) for _ in range(30)])
    assert all(a.status == 200 for a in answers)
    assert console.cache.computed - before <= 2      # at most once per second


def _served_certificate(port: int, server_name: str) -> str:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with context.wrap_socket(s, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest()


def _smtp_certificate(port: int) -> str:
    import smtplib
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.starttls(context=context)
        der = smtp.sock.getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest()


@pytest_twisted.ensureDeferred
async def test_certificates_are_those_tls_clients_get(env):
    data = await _json(env, "/api/certificates")
    by_sha = {c["sha256"]: c for c in data["certificates"]}
    expiring = await threads.deferToThread(_served_certificate, env.ports["secure"],
                                           "expiring.console.test")
    cert = by_sha[expiring]
    assert cert["service"] == "proxy" and cert["source"] == "config"
    assert cert["served_for"] == ["expiring.console.test"]
    assert cert["issuer"] == "expiring.console.test, Console Test CA"
    assert 4.9 < cert["days_left"] <= 5.0
    shop = by_sha[await threads.deferToThread(_served_certificate, env.ports["secure"],
                                              "shop.console.test")]
    assert shop["source"] == "self-signed" and shop["names"] == ["shop.console.test"]
    default = [c for c in data["certificates"] if c["source"] == "default"]
    assert [c["subject"] for c in default] == ["dcrouter-default.invalid"]
    smtp = by_sha[await threads.deferToThread(_smtp_certificate, env.ports["smtp"])]
    assert smtp["service"] == "smtp" and smtp["self_signed"]
    # the certificate within the renewal threshold (30 days) is warned about, nothing else
    assert data["threshold_days"] == 30
    expiry = [w for w in data["warnings"] if w["kind"] == "expiry"]
    assert [w["subject"] for w in expiry] == ["expiring.console.test, Console Test CA"]
    assert expiry[0]["level"] == "error" and "expires in 5 days" in expiry[0]["message"]
    # the ACME order cannot reach its server: failed, with the error and the next try
    (order,) = data["acme"]
    assert order["name"] == "shop.console.test" and order["state"] == "failed"
    assert order["failures"] == 1 and order["last_error"]
    assert order["renew_at"] == order["retry_at"] > time.time() + 3000
    assert any(w["kind"] == "acme" for w in data["warnings"])
    # DKIM: one key's record is served by this router's DNS, the other is not
    keys = {k["domain"]: k for k in data["dkim"]}
    assert keys["console.test"]["record_name"] == "dcrouter._domainkey.console.test"
    assert keys["console.test"]["published"] and keys["console.test"]["signing"]
    assert keys["console.test"]["record"].startswith("v=DKIM1; k=rsa; p=")
    assert keys["console.test"]["bits"] == 2048
    assert not keys["elsewhere.test"]["published"] and keys["elsewhere.test"]["signing"]
    assert any(w["kind"] == "dkim" and w["subject"] == "dcrouter._domainkey.elsewhere.test"
               for w in data["warnings"])


@pytest_twisted.ensureDeferred
async def test_proxy_routes_show_targets_with_health_since_and_last_error(env):
    data = await _json(env, "/api/proxy/routes")
    routes = {r["name"]: r for r in data["routes"]}
    assert list(routes) == ["web", "http", "secure", "shop"]
    web = routes["web"]
    assert web["mode"] == "tls" and web["tls"] == "passthrough"
    (dead,) = web["stats"]["targets"].values()
    assert not dead["healthy"] and "refused" in dead["last_error"].lower()
    assert time.time() - 60 < dead["since"] <= time.time()
    (alive,) = routes["http"]["stats"]["targets"].values()
    assert alive["healthy"] and alive["last_error"] == ""
    assert routes["http"]["stats"]["total_connections"] == 3
    assert routes["http"]["stats"]["bytes_out"] == sum(len(a) for a in env.sent["proxy_answers"])
    assert routes["web"]["stats"]["errors"]


@pytest_twisted.ensureDeferred
async def test_dns_zones_with_counts_transfer_peers_and_the_last_notify(env):
    full = await _json(env, "/api/dns/zones")
    short = await _json(env, "/api/dns/zones?records=false")
    zone = next(z for z in full["zones"] if z["origin"] == "console.test.")
    brief = next(z for z in short["zones"] if z["origin"] == "console.test.")
    assert "records" not in brief and brief["record_count"] == len(zone["records"])
    assert brief["records_by_type"]["A"] == 3 and brief["records_by_type"]["MX"] == 1
    assert brief["allow_transfer"] == ["127.0.0.1/32"]
    target = f"127.0.0.1:{env.ports['secondary']}"
    assert brief["notify_targets"] == [target]
    (notify,) = brief["notify"]
    assert notify["target"] == target and notify["result"] == "acknowledged"
    assert notify["serial"] == brief["serial"]
    assert_error(await env.client.get("/api/dns/zones?records=maybe"), 400, "bad_request")


@pytest_twisted.ensureDeferred
async def test_a_big_queue_is_summarised_from_its_oldest_items_and_says_so(standin):
    from tests.api.support import StandInItem
    router, client, queue = standin
    for i in range(2500):
        queue.add(StandInItem(f"ID{i:05d}", "s@a.test", [f"r{i}@b.test"], 10,
                              created_at=1000.0 + i))
    response = await client.get("/api/queue/summary")
    assert response.status == 200, response.text
    summary = response.json()
    assert summary["size"] == 2500 and summary["scanned"] == 2000
    assert not summary["complete"]
    assert len(summary["items"]) == 50 and summary["items"][0]["id"] == "ID00000"
    (row,) = summary["destinations"]
    assert row["total"] == 2000 and row["by_status"]["deferred"] == 2000


def test_the_snapshot_cache_computes_once_per_ttl_and_never_caches_a_failure():
    from twisted.internet import defer as tdefer

    from dcrouter.api.console import SnapshotCache
    now = [100.0]
    cache = SnapshotCache(clock=lambda: now[0], max_keys=2)
    running: list = []

    def produce():
        d = tdefer.Deferred()
        running.append(d)
        return d
    first, second = cache.get("k", 1.0, produce), cache.get("k", 1.0, produce)
    assert len(running) == 1 and not first.called
    running[0].callback({"n": 1})
    assert first.result == second.result == {"n": 1}
    assert cache.get("k", 1.0, produce).result == {"n": 1} and len(running) == 1
    now[0] += 1.5                                       # stale: computed again
    failing = cache.get("k", 1.0, produce)
    running[1].errback(RuntimeError("store down"))
    failure = []
    failing.addErrback(failure.append)
    assert failure and failure[0].check(RuntimeError)
    again = cache.get("k", 1.0, lambda: {"n": 2})      # the failure was not cached
    assert again.result == {"n": 2}
    for key in ("a", "b", "c"):                         # bounded number of keys
        cache.get(key, 1.0, lambda: 0)
    assert len(cache._values) <= 2


@pytest_twisted.ensureDeferred
async def test_a_hung_queue_gives_503_and_its_summary_is_cancelled(standin):
    router, client, queue = standin
    hanging: list = []

    def list_items(status=None, limit=100, cursor=None):
        d = defer.Deferred()
        hanging.append(d)
        return d
    queue.list_items = list_items  # type: ignore[method-assign]
    router.by_name["api"].root.timeout = 0.3
    answers = await defer.gatherResults([defer.ensureDeferred(client.get("/api/queue/summary"))
                                         for _ in range(3)])
    for answer in answers:
        assert_error(answer, 503, "service_unavailable")
    assert len(hanging) == 1 and hanging[0].called      # one read, cancelled, not dangling
    console = router.by_name["api"].handlers.groups["console"]
    assert not console.cache._running and not console.cache._producing


def _curl_json(url: str) -> dict:
    import json
    import subprocess
    from tests.api.support import TOKEN
    done = subprocess.run(["curl", "-sk", "--max-time", "20", "-H",
                           f"Authorization: Bearer {TOKEN}", url],
                          capture_output=True, timeout=30, check=True)
    return json.loads(done.stdout)


@pytest_twisted.ensureDeferred
async def test_the_https_apis_own_certificate_is_listed(tmp_path):
    from tests.api.support import start_api_router
    from tests.support.router import stop_router
    router, port = start_api_router(str(tmp_path / "var"), tls=True)
    try:
        data = await threads.deferToThread(_curl_json, f"https://127.0.0.1:{port}/api/certificates")
        served = await threads.deferToThread(_served_certificate, port, "localhost")
        (api,) = [c for c in data["certificates"] if c["service"] == "api"]
        assert api["sha256"] == served and api["source"] == "self-signed"
        assert "127.0.0.1" in api["names"] and api["served_for"] == ["management API (HTTPS)"]
    finally:
        await stop_router(router)

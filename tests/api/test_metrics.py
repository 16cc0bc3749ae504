"""/metrics: parsed with prometheus_client's own parser; observers and scrape-time figures."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from dcrouter.api.metrics import DeliveryMetrics, StatsCollector
from dcrouter.config import parse_config
from dcrouter.message import DeliveryRequest, Destination, ReceivedMessage, Route, SessionInfo
from dcrouter.service import Extensions, ManagedService, RouterContext
from tests.api.support import assert_error, hold_items


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


@pytest_twisted.ensureDeferred
async def test_metrics_parse_and_carry_the_routers_figures(running):
    router, client, queue = running
    await hold_items(router, ["a@b.test", "b@b.test", "c@b.test"])
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.header("Content-Type").startswith("text/plain; version=")
    families = _families(response.text)
    samples = _samples(response.text)
    assert families["dcrouter_info"].samples[0].labels["version"]
    for service in ("dns", "email", "proxy", "api"):
        assert samples[("dcrouter_service_running", (("service", service),))] == 1.0
    assert samples[("dcrouter_queue_depth", (("status", "pending"),))] == 3.0
    assert samples[("dcrouter_queue_depth", (("status", "deferred"),))] == 0.0
    assert samples[("dcrouter_service_stat", (("key", "queue.size"), ("service", "email")))] == 3
    assert samples[("dcrouter_uptime_seconds", ())] >= 0
    assert families["dcrouter_delivery_duration_seconds"].type == "histogram"
    assert families["dcrouter_smtp_sessions"].type == "counter"


@pytest_twisted.ensureDeferred
async def test_metrics_need_the_token_and_speak_openmetrics_on_request(running):
    router, client, queue = running
    assert_error(await client.get("/metrics", token=None), 401, "unauthorized")
    response = await client.get("/metrics", headers={
        "Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.header("Content-Type").startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


@pytest_twisted.ensureDeferred
async def test_email_events_count_sessions_messages_by_mode_and_rejections(running):
    router, client, queue = running
    forward = {"pattern": "*@relay.test", "mode": "forward",
               "target": {"server": "127.0.0.1", "port": 2526}}
    assert (await client.post("/api/email/rules", body=forward)).status == 201
    # the observer the router handed to its SMTP server, called as the server calls it
    observer = router.by_name["api"].metrics.email_events
    session = SessionInfo("c1", "127.0.0.1", 40000, 25)
    observer.connection_made(session)
    observer.auth_succeeded(session, b"demo", b"PLAIN")
    observer.auth_failed(session, b"demo", b"LOGIN")
    observer.message_received(session, ReceivedMessage(
        "Q1", "me@localhost", ["alice@localhost", "bob@relay.test"], "/nonexistent", 5000,
        session), ["Q1a", "Q1b"])
    observer.message_received(session, ReceivedMessage(
        "Q2", "me@localhost", ["carol@localhost"], "/nonexistent", 300, session), ["Q2"])
    observer.message_rejected(session, "relay", 554)
    observer.message_rejected(session, "rate_limit", 451)
    observer.connection_made(SessionInfo("c2", "127.0.0.1", 40001, 25))

    samples = _samples((await client.get("/metrics")).text)
    assert samples[("dcrouter_smtp_sessions_total", ())] == 2
    assert samples[("dcrouter_smtp_sessions_active", ())] == 2
    observer.connection_lost(session, None)
    assert samples[("dcrouter_messages_total", (("mode", "mta"), ("outcome", "accepted")))] == 2
    assert samples[("dcrouter_messages_total", (("mode", "forward"),
                                                ("outcome", "accepted")))] == 1
    assert samples[("dcrouter_smtp_auth_total", (("mechanism", "PLAIN"),
                                                 ("result", "success")))] == 1
    assert samples[("dcrouter_smtp_auth_total", (("mechanism", "LOGIN"),
                                                 ("result", "failure")))] == 1
    assert samples[("dcrouter_smtp_rejections_total", (("reason", "relay"),
                                                       ("reply_class", "5xx")))] == 1
    assert samples[("dcrouter_smtp_rejections_total", (("reason", "rate_limit"),
                                                       ("reply_class", "4xx")))] == 1
    assert samples[("dcrouter_message_size_bytes_count", ())] == 2
    assert samples[("dcrouter_message_size_bytes_sum", ())] == 5300
    summary = (await client.get("/api/stats")).json()["summary"]
    assert summary["smtp_sessions_total"] == 2 and summary["smtp_sessions_active"] == 1
    assert summary["messages_accepted_total"] == 2  # messages, not (message, mode) pairs


def _request(queue_id: str, mode: str) -> DeliveryRequest:
    return DeliveryRequest(queue_id, mode, "*@x.test", "a@x.test", ["b@x.test"], Destination.to(Route("mx")),
                           "/nonexistent", "corr")


def test_delivery_observer_counts_attempts_and_measures_latency():
    from prometheus_client import CollectorRegistry, Counter
    now = [100.0]
    registry = CollectorRegistry()
    messages = Counter("m", "m", ["mode", "outcome"], registry=registry)
    observer = DeliveryMetrics(registry, messages, clock=lambda: now[0])
    first, second = _request("D1", "mta"), _request("D2", "forward")
    observer.on_delivery_start(first)
    observer.on_delivery_start(second)
    assert registry.get_sample_value("dcrouter_delivery_in_progress") == 2
    now[0] += 0.2
    observer.on_delivery_success(first, None)
    now[0] += 3.0
    observer.on_delivery_failed(second, Exception("451"), False)
    observer.on_delivery_start(second)
    now[0] += 1.0
    observer.on_delivery_failed(second, Exception("550"), True)
    value = registry.get_sample_value
    assert value("dcrouter_delivery_attempts_total", {"mode": "mta", "outcome": "success"}) == 1
    assert value("dcrouter_delivery_attempts_total",
                 {"mode": "forward", "outcome": "transient"}) == 1
    assert value("dcrouter_delivery_attempts_total",
                 {"mode": "forward", "outcome": "permanent"}) == 1
    assert abs(value("dcrouter_delivery_duration_seconds_sum", {"mode": "mta"}) - 0.2) < 1e-9
    assert abs(value("dcrouter_delivery_duration_seconds_sum", {"mode": "forward"}) - 4.2) < 1e-9
    assert value("dcrouter_delivery_duration_seconds_bucket", {"mode": "mta", "le": "0.25"}) == 1
    assert value("dcrouter_delivery_in_progress") == 0
    assert value("m_total", {"mode": "mta", "outcome": "delivered"}) == 1
    assert value("m_total", {"mode": "forward", "outcome": "deferred"}) == 1
    assert value("m_total", {"mode": "forward", "outcome": "bounced"}) == 1


class _Figures(ManagedService):
    """A service reporting fixed figures (the shapes the collector labels)."""

    def __init__(self, name: str, context: RouterContext, figures: Any) -> None:
        super().__init__(name, context)
        self.figures = figures

    def get_stats(self) -> dict:
        if isinstance(self.figures, Exception):
            raise self.figures
        return self.figures


def test_collector_labels_proxy_routes_dns_rcodes_and_scan_verdicts(tmp_path):
    context = RouterContext(parse_config({"router": {"state_dir": str(tmp_path)}}), None,
                            Extensions())
    context.services["proxy"] = _Figures("proxy", context, {"routes": {
        "web": {"connections_total": 7, "active_connections": 2, "bytes_in": 100,
                "bytes_out": 900, "requests": 31}}})
    context.services["dns"] = _Figures("dns", context, {"queries_by_rcode": {
        "NOERROR": 40, "NXDOMAIN": 3}, "queries_total": 43})
    context.services["email"] = _Figures("email", context, {
        "processor": {"scan_verdicts": {"spam": {"clean": 5, "spam": 1}}},
        "queue": {"size": 4}})
    context.services["broken"] = _Figures("broken", context, RuntimeError("boom"))
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import generate_latest
    collector = StatsCollector(context)
    registry = CollectorRegistry()
    registry.register(collector)
    samples = _samples(generate_latest(registry).decode())
    assert samples[("dcrouter_proxy_connections_total", (("route", "web"),))] == 7
    assert samples[("dcrouter_proxy_connections_active", (("route", "web"),))] == 2
    assert samples[("dcrouter_proxy_http_requests_total", (("route", "web"),))] == 31
    assert samples[("dcrouter_proxy_bytes_total", (("direction", "in"), ("route", "web")))] == 100
    assert samples[("dcrouter_proxy_bytes_total", (("direction", "out"), ("route", "web")))] == 900
    assert samples[("dcrouter_dns_queries_total", (("rcode", "NXDOMAIN"),))] == 3
    assert samples[("dcrouter_scan_verdicts_total", (("scanner", "spam"),
                                                     ("verdict", "spam")))] == 1
    assert samples[("dcrouter_queue_depth", (("status", "all"),))] == 4
    assert samples[("dcrouter_service_stat", (("key", "queries_total"), ("service", "dns")))] == 43
    assert samples[("dcrouter_stats_errors_total", ())] == 1
    # the processor's flat counters (scan_<scanner>_<verdict>) give the same family
    context.services["email"].figures = {"processor": {"counters": {
        "messages": 9, "scan_virus_clean": 4, "scan_attachment_reject": 2}}}
    samples = _samples(generate_latest(registry).decode())
    assert samples[("dcrouter_scan_verdicts_total", (("scanner", "virus"),
                                                     ("verdict", "clean")))] == 4
    assert samples[("dcrouter_scan_verdicts_total", (("scanner", "attachment"),
                                                     ("verdict", "reject")))] == 2



def _smtp_sessions(port: int, count: int) -> None:
    import smtplib
    for _ in range(count):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            assert smtp.ehlo("client.test")[0] == 250


async def _scrape_until(client, predicate) -> dict:
    from twisted.internet import reactor, task
    for _ in range(200):
        samples = _samples((await client.get("/metrics")).text)
        if predicate(samples):
            return samples
        await task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"metrics never matched: {samples}")


@pytest_twisted.ensureDeferred
async def test_real_smtp_sessions_are_counted(running):
    from twisted.internet import threads
    from tests.support.router import port_of
    router, client, queue = running
    await threads.deferToThread(_smtp_sessions, port_of(router, "email"), 3)
    samples = await _scrape_until(
        client, lambda s: s.get(("dcrouter_smtp_sessions_active", ())) == 0)
    assert samples[("dcrouter_smtp_sessions_total", ())] == 3
    assert samples[("dcrouter_service_stat", (("key", "server.connections_total"),
                                              ("service", "email")))] == 3


def _dns_and_proxy_traffic(dns_port: int, http_port: int) -> list[str]:
    import socket

    import dns.message
    import dns.query
    rcodes = []
    for name in ("dcrouter.test.", "nothing-here.dcrouter.test."):
        reply = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=dns_port,
                              timeout=10)
        rcodes.append(dns.rcode.to_text(reply.rcode()))
    with socket.create_connection(("127.0.0.1", http_port), timeout=10) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: www.dcrouter.test\r\n\r\n")
        while conn.recv(4096):
            pass
    return rcodes


@pytest_twisted.ensureDeferred
async def test_real_dns_queries_and_proxy_connections_are_exposed(running):
    from twisted.internet import threads
    from tests.support.router import port_of
    router, client, queue = running
    http_port = router.options.proxy.routes[1].ports[0]
    rcodes = await threads.deferToThread(_dns_and_proxy_traffic,
                                         port_of(router, "dns", protocol="udp"), http_port)
    assert rcodes == ["NOERROR", "NXDOMAIN"]
    samples = await _scrape_until(client, lambda s: s.get(
        ("dcrouter_proxy_connections_active", (("route", "http"),))) == 0)
    assert samples[("dcrouter_dns_queries_total", (("rcode", "NOERROR"),))] == 1
    assert samples[("dcrouter_dns_queries_total", (("rcode", "NXDOMAIN"),))] == 1
    assert samples[("dcrouter_dns_queries_by_type_total", (("qtype", "A"),))] == 2
    assert samples[("dcrouter_proxy_connections_total", (("route", "http"),))] == 1
    assert samples[("dcrouter_proxy_connections_total", (("route", "web"),))] == 0
    summary = (await client.get("/api/stats")).json()["summary"]
    assert summary["dns_queries_total"] == 2 and summary["proxy_connections_total"] == 1

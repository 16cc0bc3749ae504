"""The connection front end against hostile input: no tracebacks, and the proxy keeps serving."""

from __future__ import annotations

import json
import random
import socket

import pytest_twisted
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher

from dcrouter.proxy import proxyprotocol
from tests.proxy.conftest import http_get, proxy_port, tls_exchange
from tests.proxy.test_sni import capture_client_hello


def throw(port: int, payloads: list[bytes]) -> None:
    for payload in payloads:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                s.settimeout(2)
                while s.recv(65536):
                    pass
        except OSError:
            pass


@pytest_twisted.inlineCallbacks
def test_garbage_on_every_kind_of_port_logs_no_failure(proxy_router, backends, test_ca):
    failures: list[dict] = []

    def observer(event: dict) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            failures.append(event)
    globalLogPublisher.addObserver(observer)
    try:
        echo = backends("e")
        web = backends("w", kind="http")
        tls_port, http_port, pp_port = proxy_port(), proxy_port(), proxy_port()
        proxy_router({"accept_proxy_protocol": True, "proxy_ips": ["127.0.0.2/32"],
                               "routes": [
            {"name": "tls", "ports": [tls_port], "domains": ["*"], "tls": "terminate", "http": False,
             "targets": [echo.address], "initial_data_timeout": 1},
            {"name": "pass", "ports": [tls_port], "domains": ["p.test"], "tls": "passthrough",
             "targets": [echo.address]},
            {"name": "web", "ports": [http_port], "domains": ["w.test"], "targets": [web.address],
             "add_forwarded_headers": True, "initial_data_timeout": 1},
            {"name": "tcp", "ports": [pp_port], "targets": [echo.address],
             "send_proxy_protocol": "v2"},
        ]})
        rng = random.Random(5)
        hello = capture_client_hello("fuzz.test")
        payloads = [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 400)))
                    for _ in range(25)]
        payloads += [hello[:n] + bytes(rng.getrandbits(8) for _ in range(50))
                     for n in (5, 9, 40, len(hello) - 1)]
        payloads += [hello + b"\x17\x03\x03\x00\x05hello", b"\x16\x03\x01\xff\xff" + b"A" * 100,
                     b"GET / HTTP/1.1\r\nHost: \r\n\r\n", b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n",
                     b"GET http://w.test HTTP/1.1\r\n\r\n", b"\r\n\r\n", b"GET / HTTP/2.0\r\n\r\n",
                     proxyprotocol.encode_v1(("10.0.0.1", 1), ("10.0.0.2", 2)) + b"x"]
        for port in (tls_port, http_port, pp_port):
            yield deferToThread(throw, port, payloads)
        # still serving every mode afterwards
        r = yield deferToThread(tls_exchange, tls_port, "any.test", b"ok")
        assert r["reply"] == b"e:ok"
        status, _h, body = yield deferToThread(http_get, http_port, "w.test")
        assert status == 200 and json.loads(body)["tag"] == "w"
    finally:
        globalLogPublisher.removeObserver(observer)
    assert failures == [], [e.get("log_format") for e in failures]

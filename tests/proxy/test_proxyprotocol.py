"""PROXY protocol v1/v2: sent to targets, accepted from trusted load balancers."""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import time

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from dcrouter.proxy import proxyprotocol
from tests.proxy.conftest import proxy_port, recv_all

#: every test here that starts a proxy runs on the splice relay and on the Twisted fallback
BOTH_RELAYS = True


def backend_parse(data: bytes) -> tuple[tuple[str, int], tuple[str, int], bytes]:
    """The backend's own reading of a PROXY header (independent of dcrouter's parser)."""
    if data.startswith(b"PROXY "):
        line, rest = data.split(b"\r\n", 1)
        _p, _fam, src, dst, sport, dport = line.decode().split(" ")
        return (src, int(sport)), (dst, int(dport)), rest
    assert data[:12] == b"\r\n\r\n\x00\r\nQUIT\n"
    ver_cmd, fam, length = struct.unpack("!BBH", data[12:16])
    assert ver_cmd == 0x21 and fam == 0x11
    body = data[16:16 + length]
    src = str(ipaddress.IPv4Address(body[:4]))
    dst = str(ipaddress.IPv4Address(body[4:8]))
    sport, dport = struct.unpack("!HH", body[8:12])
    return (src, sport), (dst, dport), data[16 + length:]


def test_encode_and_parse_round_trip() -> None:
    for version in ("v1", "v2"):
        for src, dst in ((("192.0.2.1", 1234), ("198.51.100.2", 443)),
                         (("2001:db8::1", 5), ("2001:db8::2", 6)),
                         (("192.0.2.1", 7), ("2001:db8::2", 8))):
            header = proxyprotocol.encode(version, src, dst)
            parser = proxyprotocol.ProxyHeaderParser()
            state = None
            for i in range(len(header)):
                state = parser.feed(header[i:i + 1])
            assert state == proxyprotocol.DONE
            assert ipaddress.ip_address(parser.source[0]) in (
                ipaddress.ip_address(src[0]), ipaddress.ip_address(f"::ffff:{src[0]}")
                if "." in src[0] else ipaddress.ip_address(src[0]))
            assert parser.source[1] == src[1]
    local = proxyprotocol.ProxyHeaderParser()
    assert local.feed(proxyprotocol.V2_SIGNATURE + b"\x20\x00\x00\x00rest") == proxyprotocol.DONE
    assert local.source is None and local.rest == b"rest"
    assert proxyprotocol.ProxyHeaderParser().feed(b"GET / HTTP/1.1\r\n") == proxyprotocol.INVALID
    assert proxyprotocol.ProxyHeaderParser().feed(b"PROXY TCP4 x y 1 2\r\n") == proxyprotocol.INVALID
    assert proxyprotocol.ProxyHeaderParser().feed(b"PROXY " + b"1" * 120) == proxyprotocol.INVALID


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest_twisted.inlineCallbacks
def test_targets_receive_a_proxy_header(proxy_router, backends, version):
    backend = backends("pp")
    port = proxy_port()
    proxy_router({"routes": [{"name": "pp", "ports": [port], "targets": [backend.address],
                              "send_proxy_protocol": version}]})

    def client() -> tuple[bytes, int]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"payload")
            reply = b""
            while b"payload" not in reply:      # the echo answers chunk by chunk
                reply += s.recv(1000)
            return reply, s.getsockname()[1]
    reply, client_port = yield deferToThread(client)
    received = backend.connections[0].received
    src, dst, rest = backend_parse(received)
    assert src == ("127.0.0.1", client_port)
    assert dst == ("127.0.0.1", port)
    assert rest == b"payload"
    assert reply.startswith(b"pp:")


@pytest_twisted.inlineCallbacks
def test_client_address_survives_a_chain_of_proxies(proxy_router, backends):
    tcp_backend = backends("chain")
    http_backend = backends("web", kind="http")
    tcp_port, http_port = proxy_port(), proxy_port()
    router = proxy_router({"accept_proxy_protocol": True, "proxy_ips": ["127.0.0.1/32"], "routes": [
        {"name": "tcp", "ports": [tcp_port], "targets": [tcp_backend.address],
         "send_proxy_protocol": "v2", "blocked_ips": ["198.51.100.0/24"],
         "initial_data_timeout": 0.3},
        {"name": "web", "ports": [http_port], "domains": ["w.test"], "targets": [http_backend.address],
         "add_forwarded_headers": True},
    ]})

    def via_balancer(port: int, header: bytes, payload: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            try:
                s.sendall(header + payload)
                if payload.startswith(b"GET"):
                    return recv_all(s)
                data = b""
                while not data.endswith(payload):   # the echo answers chunk by chunk
                    chunk = s.recv(1000)
                    if not chunk:
                        break
                    data += chunk
                return data
            except (ConnectionResetError, BrokenPipeError):
                return b""
    header = proxyprotocol.encode_v1(("203.0.113.7", 40000), ("192.0.2.10", 443))
    reply = yield deferToThread(via_balancer, tcp_port, header, b"hi")
    assert reply.startswith(b"chain:") and reply.endswith(b"hi")
    src, _dst, rest = backend_parse(tcp_backend.connections[0].received)
    assert src == ("203.0.113.7", 40000) and rest == b"hi"
    # the header's deadline does not cut the tunnel that follows it
    def long_lived() -> bytes:
        with socket.create_connection(("127.0.0.1", tcp_port), timeout=10) as s:
            s.sendall(proxyprotocol.encode_v2(("203.0.113.9", 1), ("192.0.2.10", 443)) + b"a")
            first = s.recv(1000)
            time.sleep(0.6)
            s.sendall(b"b")
            return first + s.recv(1000)
    assert (yield deferToThread(long_lived)).endswith(b"chain:b")
    # v2 header from the balancer, HTTP route: X-Forwarded-For carries the original client
    header = proxyprotocol.encode_v2(("203.0.113.8", 40001), ("192.0.2.10", 80))
    reply = yield deferToThread(via_balancer, http_port, header,
                                b"GET / HTTP/1.1\r\nHost: w.test\r\nConnection: close\r\n\r\n")
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert body["headers"]["X-Forwarded-For"] == "203.0.113.8"
    # IP rules apply to the address from the PROXY header
    header = proxyprotocol.encode_v1(("198.51.100.9", 1), ("192.0.2.10", 443))
    assert (yield deferToThread(via_balancer, tcp_port, header, b"x")) == b""
    # a trusted peer that sends no PROXY header is refused
    assert (yield deferToThread(via_balancer, tcp_port, b"", b"no header")) == b""
    stats = router.get_stats()["proxy"]
    assert stats["routes"]["tcp"]["errors"] == {"blocked": 1}
    assert stats["unrouted"] == {"bad_proxy_header": 1}


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200),
                 st.binary(max_size=60).map(lambda b: proxyprotocol.V2_SIGNATURE + b),
                 st.text(max_size=80).map(lambda t: ("PROXY " + t + "\r\n").encode("utf-8"))))
def test_header_parser_never_raises(data):
    state = proxyprotocol.ProxyHeaderParser().feed(data)
    assert state in (proxyprotocol.NEED_MORE, proxyprotocol.DONE, proxyprotocol.INVALID)

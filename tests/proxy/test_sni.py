"""SNI passthrough: the ClientHello parser and routing by server name through real sockets."""

from __future__ import annotations

import socket
import ssl
import struct
import time
from typing import Optional

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from dcrouter.proxy import sni
from tests.proxy.conftest import closed_without_reply, proxy_port, tls_exchange

#: every test here that starts a proxy runs on the splice relay and on the Twisted fallback
BOTH_RELAYS = True


def capture_client_hello(server_name: Optional[str], alpn: Optional[list[str]] = None) -> bytes:
    """The ClientHello record(s) Python's ssl module sends for ``server_name``."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def split_into_records(record: bytes, cut: int) -> bytes:
    """Re-frame one handshake record as two records split at ``cut`` bytes of payload."""
    rtype, version, length = record[0], record[1:3], struct.unpack("!H", record[3:5])[0]
    payload = record[5:5 + length]
    first, second = payload[:cut], payload[cut:]
    return (bytes([rtype]) + version + struct.pack("!H", len(first)) + first
            + bytes([rtype]) + version + struct.pack("!H", len(second)) + second)


def test_parser_reads_server_name_and_alpn() -> None:
    hello = capture_client_hello("Api.Example.Test", ["h2", "http/1.1"])
    parser = sni.ClientHelloParser()
    assert parser.feed(hello) == sni.DONE
    assert parser.hello.server_name == "api.example.test"
    assert parser.hello.alpn == ("h2", "http/1.1")
    assert bytes(parser.buffered) == hello


def test_parser_byte_by_byte_and_over_several_records() -> None:
    hello = split_into_records(capture_client_hello("a.example.test"), 40)
    parser = sni.ClientHelloParser()
    states = [parser.feed(hello[i:i + 1]) for i in range(len(hello))]
    assert states[-1] == sni.DONE and set(states[:-1]) == {sni.NEED_MORE}
    assert parser.hello.server_name == "a.example.test"


def test_parser_without_sni() -> None:
    parser = sni.ClientHelloParser()
    assert parser.feed(capture_client_hello(None)) == sni.DONE
    assert parser.hello.server_name is None


def test_parser_refuses_non_tls_and_oversized() -> None:
    assert sni.ClientHelloParser().feed(b"GET / HTTP/1.1\r\n\r\n") == sni.NOT_TLS
    assert sni.ClientHelloParser().feed(b"\x16\x03") == sni.NEED_MORE
    huge = b"\x16\x03\x01\x40\x00" + b"\x01" + (17000).to_bytes(3, "big")
    parser = sni.ClientHelloParser()
    assert parser.feed(huge) == sni.NOT_TLS
    assert "larger" in parser.error
    # a ClientHello close to 16 KB (big padding extension) is still read
    hello = capture_client_hello("pad.example.test")
    body = bytearray(hello[9:])
    # rebuild with a 15000-byte padding extension (type 21): skip version+random, session id,
    # cipher suites and compression methods to reach the extensions length
    pos = 34
    pos += 1 + body[pos]
    pos += 2 + int.from_bytes(body[pos:pos + 2], "big")
    pos += 1 + body[pos]
    ext_total = int.from_bytes(body[pos:pos + 2], "big")
    padding = struct.pack("!HH", 21, 15000) + bytes(15000)
    new_body = bytes(body[:pos]) + struct.pack("!H", ext_total + len(padding)) \
        + bytes(body[pos + 2:]) + padding
    handshake = b"\x01" + len(new_body).to_bytes(3, "big") + new_body
    records = b""
    for i in range(0, len(handshake), 4000):
        chunk = handshake[i:i + 4000]
        records += b"\x16\x03\x01" + struct.pack("!H", len(chunk)) + chunk
    parser = sni.ClientHelloParser()
    assert parser.feed(records) == sni.DONE
    assert parser.hello.server_name == "pad.example.test"
    assert len(records) > 15000


def fragmented_tls_exchange(port: int, server_name: str, ca_path: str) -> tuple[bytes, str]:
    """A TLS handshake whose ClientHello goes out as two records in 7-byte TCP segments."""
    ctx = ssl.create_default_context(cafile=ca_path)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello = split_into_records(outgoing.read(), 50)
        for i in range(0, len(hello), 7):
            s.sendall(hello[i:i + 7])
            if i < 70:
                time.sleep(0.005)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pending = outgoing.read()
                if pending:
                    s.sendall(pending)
                data = s.recv(65536)
                if not data:
                    raise ConnectionError("closed during handshake")
                incoming.write(data)
        s.sendall(outgoing.read())
        tls.write(b"hello")
        s.sendall(outgoing.read())
        while True:
            try:
                return tls.read(1024), tls.getpeercert()["subject"][0][0][1]
            except ssl.SSLWantReadError:
                pending = outgoing.read()
                if pending:
                    s.sendall(pending)
                incoming.write(s.recv(65536))


@pytest_twisted.inlineCallbacks
def test_passthrough_routes_by_sni_to_different_backends(proxy_router, backends, test_ca):
    api = backends("api", tls=test_ca.issue(["api.example.test"]))
    www = backends("www", tls=test_ca.issue(["www.example.test", "*.example.test"], "www"))
    other = backends("other", tls=test_ca.issue(["other.test"]))
    port = proxy_port()
    proxy_router({"routes": [
        {"name": "wild", "ports": [port], "domains": ["*.example.test"], "tls": "passthrough",
         "targets": [www.address]},
        {"name": "api", "ports": [port], "domains": ["api.example.test"], "tls": "passthrough",
         "targets": [api.address]},
        {"name": "rest", "ports": [port], "domains": ["*"], "tls": "passthrough",
         "targets": [other.address]},
    ]})
    ctx = test_ca.client_context()
    r = yield deferToThread(tls_exchange, port, "api.example.test", b"one", ctx)
    assert r["reply"] == b"api:one" and r["names"] == ["api.example.test"]
    r = yield deferToThread(tls_exchange, port, "x.example.test", b"two", ctx)
    assert r["reply"] == b"www:two"
    r = yield deferToThread(tls_exchange, port, "other.test", b"three", ctx)
    assert r["reply"] == b"other:three"
    # no SNI at all: the '*' route
    r = yield deferToThread(tls_exchange, port, None, b"four")
    assert r["reply"] == b"other:four"
    reply, subject = yield deferToThread(fragmented_tls_exchange, port, "api.example.test",
                                         test_ca.path)
    assert reply == b"api:hello" and subject == "api.example.test"


@pytest_twisted.inlineCallbacks
def test_no_sni_without_star_route_and_non_tls_are_closed(proxy_router, backends, test_ca):
    api = backends("api", tls=test_ca.issue(["api.example.test"]))
    port = proxy_port()
    router = proxy_router({"routes": [
        {"name": "api", "ports": [port], "domains": ["api.example.test"], "tls": "passthrough",
         "targets": [api.address], "initial_data_timeout": 0.5},
    ]})
    assert (yield deferToThread(closed_without_reply, port, capture_client_hello(None)))
    assert (yield deferToThread(closed_without_reply, port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert (yield deferToThread(closed_without_reply, port, capture_client_hello("nope.test")))

    def slowloris() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"\x16\x03\x01")          # a TLS record that never completes
            try:
                return s.recv(10)
            except ConnectionResetError:      # closed by abort: no reply either
                return b""
    assert (yield deferToThread(slowloris)) == b""
    assert api.connections == []
    unrouted = router.get_stats()["proxy"]["unrouted"]
    assert unrouted == {"no_route": 2, "not_tls": 1, "initial_timeout": 1}


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=50))
def test_parser_never_raises_on_arbitrary_bytes(data, step):
    parser = sni.ClientHelloParser()
    for i in range(0, len(data), step):
        state = parser.feed(data[i:i + step])
        assert state in (sni.NEED_MORE, sni.DONE, sni.NOT_TLS)


FUZZ_HELLO = capture_client_hello("fuzz.example.test")


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=400), st.binary(min_size=1, max_size=8))
def test_parser_survives_corrupted_client_hellos(position, garbage):
    hello = bytearray(FUZZ_HELLO)
    position = min(position, len(hello) - 1)
    hello[position:position + len(garbage)] = garbage
    state = sni.ClientHelloParser().feed(bytes(hello))
    assert state in (sni.NEED_MORE, sni.DONE, sni.NOT_TLS)

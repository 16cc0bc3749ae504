"""Helpers of the DNS tests: a DnsService in the test reactor and dnspython in threads."""

from __future__ import annotations

from typing import Any, Optional

import dns.message
import dns.query
import dns.rdatatype
import pytest_twisted
from twisted.internet import defer, reactor, threads

from dcrouter.dns.service import DnsService
from dcrouter.service import Extensions, RouterContext
from tests.support.net import free_tcp_udp_port
from tests.support.router import options_from

ZONE = {
    "origin": "example.test",
    "ttl": 300,
    "records": [
        {"name": "@", "type": "A", "value": "192.0.2.1"},
        {"name": "www", "type": "A", "value": "192.0.2.10"},
        {"name": "www", "type": "AAAA", "value": "2001:db8::10"},
        {"name": "alias", "type": "CNAME", "value": "www"},
        {"name": "chain", "type": "CNAME", "value": "alias.example.test."},
        {"name": "outside", "type": "CNAME", "value": "www.elsewhere.invalid."},
        {"name": "loop1", "type": "CNAME", "value": "loop2"},
        {"name": "loop2", "type": "CNAME", "value": "loop1"},
        {"name": "dangling", "type": "CNAME", "value": "nothing"},
        {"name": "@", "type": "MX", "value": "10 mx1"},
        {"name": "@", "type": "MX", "value": "20 mx2.example.test."},
        {"name": "mx1", "type": "A", "value": "192.0.2.25"},
        {"name": "@", "type": "TXT", "value": "v=spf1 ip4:192.0.2.0/24 -all"},
        {"name": "multi", "type": "TXT", "value": '"first string" "second \\"quoted\\""'},
        {"name": "long", "type": "TXT", "value": "x" * 600},
        {"name": "@", "type": "NS", "value": "ns1"},
        {"name": "ns1", "type": "A", "value": "192.0.2.53"},
        {"name": "_sip._tcp", "type": "SRV", "value": "10 60 5060 sip"},
        {"name": "@", "type": "CAA", "value": '0 issue "ca.example.test"'},
        {"name": "1.2.0.192.in-addr", "type": "PTR", "value": "www"},
        {"name": "*.wild", "type": "A", "value": "192.0.2.99"},
        {"name": "*.wild", "type": "TXT", "value": "wildcard"},
        {"name": "deep.ent.sub", "type": "A", "value": "192.0.2.77"},
        {"name": "Upper", "type": "A", "value": "192.0.2.88"},
        {"name": "deleg", "type": "NS", "value": "ns1.deleg"},
        {"name": "ns1.deleg", "type": "A", "value": "192.0.2.5"},
        {"name": "into-deleg", "type": "CNAME", "value": "www.deleg"},
    ],
}


def dns_config(port: Optional[int] = None, **dns_keys: Any) -> dict[str, Any]:
    """A configuration with only [dns] on 127.0.0.1:port (default: free for UDP and TCP)."""
    section = {"listen": "127.0.0.1", "port": free_tcp_udp_port() if port is None else port, "zones": [ZONE], "rate_limit": 0}
    section.update(dns_keys)
    return {"dns": section}


class Running:
    """A started DnsService and its ports."""

    def __init__(self, service: DnsService) -> None:
        self.service = service
        addrs = service.bound_addresses()
        self.udp_port = next(p for proto, _h, p in addrs if proto == "udp")
        self.tcp_port = next(p for proto, _h, p in addrs if proto == "tcp")


def start_dns(data: dict[str, Any], state_dir: str, extensions: Optional[Extensions] = None
              ) -> Running:
    """Build and start a DnsService from config ``data``."""
    options = options_from(data, state_dir)
    context = RouterContext(options, reactor, extensions or Extensions())
    service = DnsService(context)
    service.startService()
    return Running(service)


@pytest_twisted.async_yield_fixture
async def server(tmp_path: Any) -> Any:
    """The example zone on ephemeral loopback ports; stopped after the test."""
    running = start_dns(dns_config(), str(tmp_path))
    await running.service.ready
    yield running
    await defer.maybeDeferred(running.service.stopService)


def ask(port: int, name: str, rdtype: str = "A", tcp: bool = False, **kw: Any
        ) -> defer.Deferred:
    """dnspython query in a thread: fires with the dns.message.Message response."""
    def run() -> Any:
        query = dns.message.make_query(name, dns.rdatatype.from_text(rdtype), **kw)
        if tcp:
            return dns.query.tcp(query, "127.0.0.1", port=port, timeout=3)
        return dns.query.udp(query, "127.0.0.1", port=port, timeout=3, ignore_trailing=False)
    return threads.deferToThread(run)


def send_raw(port: int, data: bytes, timeout: float = 2.0) -> defer.Deferred:
    """Send raw UDP bytes; fires with the reply bytes or None (in a thread)."""
    import socket

    def run() -> Optional[bytes]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(data, ("127.0.0.1", port))
            try:
                return s.recv(65535)
            except socket.timeout:
                return None
    return threads.deferToThread(run)


"""Finding the hosts to deliver a domain's mail to (RFC 5321 section 5.1, RFC 7505).

MX records by preference (random order among equal preferences), each
host's IPv4 and IPv6 addresses; no MX record: the domain's own addresses; a
null MX (a single ``MX 0 .``) or a domain that does not exist: permanent
failure; resolver trouble (timeout, SERVFAIL): transient.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.names import dns, error

from dcrouter.errors import PermanentDeliveryError, TransientDeliveryError
from dcrouter.logsetup import get_logger

log = get_logger("email.delivery")


def make_resolver(nameservers: tuple[str, ...]) -> Any:
    """A twisted.names resolver for ``ip:port`` servers (empty: the system's)."""
    from twisted.names import client
    if not nameservers:
        return client.createResolver()
    servers = []
    for spec in nameservers:
        if spec.startswith("["):
            host, _, port = spec[1:].partition("]:")
        elif spec.count(":") == 1:
            host, _, port = spec.partition(":")
        else:
            host, port = spec, "53"
        servers.append((host, int(port or 53)))
    return client.createResolver(servers=servers)


class MxResolver:
    """Resolves a recipient domain to an ordered list of (host name, IP address)."""

    def __init__(self, resolver: Any, timeout: float = 10.0) -> None:
        self.resolver = resolver
        self.timeout = (timeout,)

    @defer.inlineCallbacks
    def hosts_for(self, domain: str) -> Any:
        """Fires with [(mx host, ip), ...] in delivery order."""
        domain = domain.rstrip(".").lower()
        if isIPAddress(domain) or isIPv6Address(domain):
            return [(domain, domain)]
        try:
            answers, _, additional = yield self.resolver.lookupMailExchange(domain, self.timeout)
        except error.DNSNameError:
            raise PermanentDeliveryError(f"550 5.1.2 domain {domain} does not exist") from None
        except (error.DNSQueryTimeoutError, defer.TimeoutError, error.DNSServerError,
                error.DNSQueryRefusedError, error.DNSUnknownError) as e:
            raise TransientDeliveryError(f"451 4.4.3 MX lookup for {domain} failed: "
                                         f"{type(e).__name__}") from None
        mx = [(rr.payload.preference, rr.payload.name.name.decode("ascii").rstrip("."))
              for rr in answers if rr.type == dns.MX]
        if len(mx) == 1 and mx[0][1] == "":
            raise PermanentDeliveryError(f"556 5.1.10 domain {domain} accepts no mail (null MX)")
        mx = [m for m in mx if m[1]]
        if not mx:
            names = [domain]
        else:
            random.shuffle(mx)
            mx.sort(key=lambda m: m[0])
            names = [name for _, name in mx]
        glue: dict[str, list[str]] = {}
        for rr in additional or []:
            if rr.type in (dns.A, dns.AAAA):
                glue.setdefault(rr.name.name.decode("ascii").lower().rstrip("."), []).append(
                    rr.payload.dottedQuad() if rr.type == dns.A else
                    _ipv6(rr.payload))
        results: list[tuple[str, str]] = []
        for name in names:
            addresses = glue.get(name.lower()) or (yield self._addresses(name))
            results.extend((name, ip) for ip in addresses)
        if not results:
            if not mx:
                raise PermanentDeliveryError(f"550 5.1.2 domain {domain} has no MX or address "
                                             "records")
            raise TransientDeliveryError(f"451 4.4.4 no address for the MX hosts of {domain}")
        return results

    @defer.inlineCallbacks
    def _addresses(self, name: str) -> Any:
        if isIPAddress(name) or isIPv6Address(name):
            return [name]
        out: list[str] = []
        for lookup, rtype in ((self.resolver.lookupAddress, dns.A),
                              (self.resolver.lookupIPV6Address, dns.AAAA)):
            try:
                answers, _, _ = yield lookup(name, self.timeout)
            except Exception:
                continue
            for rr in answers:
                if rr.type == dns.A == rtype:
                    out.append(rr.payload.dottedQuad())
                elif rr.type == dns.AAAA == rtype:
                    out.append(_ipv6(rr.payload))
        return out


def _ipv6(payload: Any) -> str:
    import socket
    return socket.inet_ntop(socket.AF_INET6, payload.address)

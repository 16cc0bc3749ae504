"""TLSA records of the SMTP certificate (inbound DANE, RFC 7672 and RFC 7671).

For every MX host that reaches this dcrouter - ``email.hostname`` and
``dns.dane.hosts`` - whose closest served zone is signed, the DNS service
publishes ``_25._tcp.<host> TLSA 3 1 1 <SHA-256 of the key>`` ("DANE-EE,
SubjectPublicKeyInfo": the key alone, so a renewed certificate with the same
key needs no change) for each digest the SMTP certificate manager
(:class:`dcrouter.smtpcerts.SmtpCertificates`) lists: the presented key and
the next or pending one.  :func:`hold_for` is how long a new key must have
been published before it is presented: two TTLs (RFC 7671 8.1's "TTL
twice") plus the propagation delay.  An operator's own TLSA at such a name
wins over the generated ones.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from dcrouter.config.dns import RecordOptions
from dcrouter.config.options import DcRouterOptions
from dcrouter.dns.zone import ZoneSet, in_zone, normalize_origin, to_ascii
from dcrouter.errors import ConfigError
from dcrouter.logsetup import get_logger

log = get_logger("dns.dane")

TLSA = 52


def dane_hosts(options: DcRouterOptions) -> list[tuple[str, int]]:
    """(host, TLSA TTL) of every MX host whose closest configured zone is signed."""
    dns_options, email = options.dns, options.email
    if dns_options is None or email is None or not dns_options.dane.enabled:
        return []
    zones = []
    for i, zone in enumerate(dns_options.zones):
        try:
            zones.append((normalize_origin(zone.origin, f"dns.zones[{i}].origin"), zone))
        except ConfigError:
            continue
    out: list[tuple[str, int]] = []
    for raw in (email.hostname, *dns_options.dane.hosts):
        try:
            host = to_ascii(raw, "dns.dane.hosts")
        except ConfigError:
            continue
        containing = [(origin, z) for origin, z in zones if in_zone(host, origin)]
        if not host or not containing or any(h == host for h, _ in out):
            continue
        origin, zone = max(containing, key=lambda c: len(c[0]))
        if zone.dnssec:
            out.append((host, dns_options.dane.ttl or zone.ttl))
    return out


def tlsa_records(options: DcRouterOptions, digests: Iterable[str]) -> list[RecordOptions]:
    """``_25._tcp.<host> TLSA 3 1 1 <digest>`` for every DANE host and digest."""
    digests = list(digests)
    return [RecordOptions(name=f"_25._tcp.{host}.", type="TLSA", value=f"3 1 1 {digest}",
                          ttl=ttl)
            for host, ttl in dane_hosts(options) for digest in digests]


def hold_for(options: DcRouterOptions) -> float:
    """Seconds a new key's TLSA must be served before the key is presented (0: no TLSA)."""
    hosts = dane_hosts(options)
    if not hosts:
        return 0.0
    assert options.dns is not None
    return 2.0 * max(ttl for _h, ttl in hosts) + options.dns.dnssec.propagation_delay


def served_digests(zones: ZoneSet, options: DcRouterOptions) -> list[str]:
    """The 3 1 1 digests the served zones hold at the DANE hosts' TLSA names."""
    out: list[str] = []
    for host, _ttl in dane_hosts(options):
        name = f"_25._tcp.{host}"
        zone = zones.find(name)
        node: Optional[dict[int, Any]] = zone.nodes.get(name) if zone is not None else None
        for rec in (node or {}).get(TLSA, ()):
            fields = rec.text.split()
            if fields[:3] == ["3", "1", "1"] and len(fields) >= 4:
                out.append("".join(fields[3:]).lower())
    return out

"""Options of ``[dns]`` and ``[[dns.zones]]``: the authoritative DNS server."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Optional

from dcrouter.config.base import (check_networks, check_non_negative, check_port, check_positive,
                                  one_of, option, split_host_port)
from dcrouter.errors import ConfigError

def check_notify_targets(value: tuple[str, ...], path: str) -> tuple[str, ...]:
    """Secondaries to NOTIFY: ``IP:port``, ``[IPv6]:port`` or a bare IP (port 53)."""
    for i, item in enumerate(value):
        host, _port = split_host_port(item, f"{path}[{i}]", default_port=53)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"{path}[{i}]", f"must be an IP address with a port like "
                              f"'192.0.2.53:53' or '[2001:db8::53]:53', got '{item}'") from None
    return value


RECORD_TYPES = ("A", "AAAA", "CNAME", "MX", "TXT", "NS", "SOA", "SRV", "CAA", "PTR", "DS", "TLSA")
DNSSEC_ALGORITHMS = ("ECDSAP256SHA256", "ED25519")
DAY = 86400


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecordOptions:
    """One resource record in zone-file presentation format."""

    name: str = option(doc="'@' for the origin, a relative name, or a name ending in '.'.")
    type: str = option(check=one_of(*RECORD_TYPES), doc="Record type.")
    value: str = option(doc="Presentation format: MX '10 mail.example.test.', TXT 'v=spf1 -all'.")
    ttl: Optional[int] = option(None, check=check_non_negative, doc="TTL; default: the zone's.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ZoneOptions:
    """A zone dcrouter answers for authoritatively."""

    origin: str = option(doc="Zone apex, e.g. 'example.test'.")
    ttl: int = option(3600, check=check_non_negative, doc="Default TTL.")
    records: tuple[RecordOptions, ...] = option((), doc="Records.")
    primary_ns: str = option("", doc="MNAME of the generated SOA; default ns1.<origin>.")
    admin_email: str = option("", doc="RNAME of the generated SOA; default hostmaster.<origin>.")
    dnssec: bool = option(False, doc="Sign this zone online (keys under state_dir/dnssec, "
                          "policy in [dns.dnssec]); publish the DS that `dcrouterctl dns ds` "
                          "prints at the registrar.")

    def validate(self, path: str) -> None:
        """An origin is required."""
        if not self.origin.strip("."):
            raise ConfigError(f"{path}.origin", "must not be empty")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DnssecOptions:
    """The signing policy of the zones with ``dnssec = true`` (times in seconds)."""

    algorithm: str = option("ECDSAP256SHA256", check=one_of(*DNSSEC_ALGORITHMS),
                            doc="Algorithm of new keys: ECDSAP256SHA256 (13) or ED25519 (15); "
                            "existing keys keep theirs.")
    signature_validity: int = option(14 * DAY, check=check_positive,
                                     doc="Lifetime of a signature from its inception.")
    signature_refresh: int = option(7 * DAY, check=check_positive,
                                    doc="A signature is replaced when less than this is left.")
    signature_jitter: int = option(DAY // 2, check=check_non_negative,
                                   doc="Expirations are spread over this much, so signatures "
                                   "are not all refreshed at once.")
    inception_offset: int = option(3600, check=check_non_negative,
                                   doc="Inception is backdated by this much (validators with "
                                   "a slow clock).")
    zsk_lifetime: int = option(30 * DAY, check=check_non_negative,
                               doc="A zone-signing key is rolled (pre-publication) after this "
                               "long; 0: never.")
    ksk_lifetime: int = option(0, check=check_non_negative,
                               doc="A key-signing key is rolled (double-KSK with CDS) after "
                               "this long; 0: only when asked (the parent's DS must change).")
    propagation_delay: int = option(3600, check=check_non_negative,
                                    doc="Time for a change to reach every secondary, added "
                                    "to each TTL the rollovers wait for.")
    dnskey_ttl: int = option(0, check=check_non_negative,
                             doc="TTL of DNSKEY, CDS and CDNSKEY; 0: the zone's TTL.")
    parent_ds_ttl: int = option(DAY, check=check_non_negative,
                                doc="TTL of the DS records at the parent (what a KSK "
                                "rollover waits for after the new DS is seen).")
    parent_servers: tuple[str, ...] = option((), check=check_notify_targets,
                                             doc="Authoritative servers of the parent zones "
                                             "('IP:port'): a KSK rollover proceeds once they "
                                             "all serve the new DS. Empty: a served parent is "
                                             "updated directly; otherwise wait for `dcrouterctl "
                                             "dns ds ZONE --submitted`.")
    publish_cds: bool = option(True, doc="Publish CDS and CDNSKEY (RFC 7344) for the key "
                               "the parent should have.")

    def validate(self, path: str) -> None:
        """A signature must outlive its refresh point by more than the jitter (and the two
        hours signing times are rounded by)."""
        if self.signature_refresh + self.signature_jitter + 7200 > self.signature_validity:
            raise ConfigError(f"{path}.signature_refresh",
                              f"signature_refresh + signature_jitter + 2 hours must not be "
                              f"more than signature_validity ({self.signature_validity})")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DaneOptions:
    """Inbound DANE: TLSA records of the SMTP certificate (RFC 7672) in signed zones."""

    enabled: bool = option(True, doc="Publish `_25._tcp.<host> TLSA 3 1 1` for every MX "
                           "host of a signed zone that the SMTP listeners answer for "
                           "(email.hostname, plus hosts).")
    hosts: tuple[str, ...] = option((), doc="More MX host names that reach this dcrouter.")
    ttl: int = option(0, check=check_non_negative, doc="TTL of the TLSA records; 0: the "
                      "zone's. A key change waits two TTLs after the new TLSA appears.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DnsOptions:
    """The authoritative DNS server."""

    listen: str = option("0.0.0.0", doc="Address for UDP and TCP.", reload="rebind")
    port: int = option(53, check=check_port, doc="UDP and TCP port.", reload="rebind")
    publish_email_records: bool = option(False, doc="Publish MX, SPF, DKIM and DMARC for the "
                                         "mail domains served.")
    spf_mechanisms: tuple[str, ...] = option(("mx",), doc="SPF mechanisms before '-all'.")
    spf_all: str = option("-all", check=one_of("-all", "~all", "?all"), doc="SPF default.")
    dmarc_policy: str = option("none", check=one_of("none", "quarantine", "reject"),
                               doc="DMARC p= policy.")
    dmarc_rua: str = option("", doc="DMARC aggregate report address (mailto:...).")
    zones: tuple[ZoneOptions, ...] = option((), doc="Zones.")
    rate_limit: int = option(100, check=check_non_negative,
                             doc="Responses a second per client IP over UDP (0: off).")
    rate_limit_slip: int = option(2, check=check_non_negative,
                                  doc="Over the rate limit, every n-th query still gets a "
                                  "truncated (TC) answer no larger than the query, so real "
                                  "clients retry over TCP (0: drop all).")
    max_tcp_connections: int = option(1000, check=check_positive, doc="Concurrent TCP clients.")
    tcp_timeout: float = option(10.0, check=check_positive, doc="Idle TCP seconds.")
    max_udp_payload: int = option(1232, check=check_positive,
                                  doc="Largest UDP response with EDNS(0), in bytes (the client's "
                                  "advertised size is used when smaller; at least 512).")
    allow_transfer: tuple[str, ...] = option((), check=check_networks,
                                             doc="Client networks (CIDR, IPv4 or IPv6) allowed "
                                             "zone transfers (AXFR/IXFR over TCP); empty: nobody.")
    notify: tuple[str, ...] = option((), check=check_notify_targets,
                                     doc="Secondaries sent a NOTIFY (UDP) when a zone's serial "
                                     "changes: 'IP:port', '[IPv6]:port' or an IP (port 53).")
    dnssec: DnssecOptions = option(default_factory=DnssecOptions,
                                   doc="Signing policy of zones with dnssec = true.")
    dane: DaneOptions = option(default_factory=DaneOptions, doc="TLSA records of the SMTP "
                               "certificate.")

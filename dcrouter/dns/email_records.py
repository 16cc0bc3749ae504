"""The MX, SPF, DKIM and DMARC records of the domains dcrouter serves mail for.

With ``dns.publish_email_records = true`` the DNS service adds, for every
*mail domain*:

* ``<domain> MX 10 <email.hostname>.``
* ``<domain> TXT "v=spf1 <dns.spf_mechanisms> <dns.spf_all>"``
* ``_dmarc.<domain> TXT "v=DMARC1; p=<dns.dmarc_policy>[; rua=<dns.dmarc_rua>]"``

and, for every DKIM key in the shared key store (``context.dkim_keys``, the
store the delivery system signs with) whose domain is a mail domain or lies
in a served zone, ``<selector>._domainkey.<domain> TXT "v=DKIM1; k=rsa;
p=..."`` (split into 255-byte strings).

**Mail domains** are the literal domains of ``mta`` rules (``*@example.test``,
``user@example.test``; patterns with wildcards in the domain part such as
``*@*.example.net`` name no single domain and are skipped), the
``mta_options.domain`` of those rules, and the origin of the configured zone
that contains ``email.hostname`` (a host ``mail.example.test`` in zone
``example.test`` makes ``example.test`` a mail domain).

The records go into the configured zone containing the domain; a domain
outside every configured zone gets a zone of its own (generated SOA and NS).
When ``email.hostname`` lies in a served zone without an address of its own,
an A/AAAA record from ``email.listen`` is added if that is a specific
address, so the MX target resolves.  Records the operator configured win:
an explicit MX, SPF TXT, or TXT at a DKIM/DMARC name is kept and the
generated one left out.

Keys are created at start and on reload, in a thread, for the configured
signing identities (:mod:`dcrouter.dkimpolicy`: ``email.dkim.domains``, rules
with ``mta_options.dkim_sign``, ``dkim_sign`` transformations) and never for
a domain only a message named; the publisher re-reads the store when it
reports a new key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Iterable, Optional

from dcrouter.config.dns import RecordOptions, ZoneOptions
from dcrouter.config.options import DcRouterOptions
from dcrouter.dkimkeys import DkimKey, DkimKeyStore
from dcrouter.dkimpolicy import SigningIdentity, SigningPolicy
from dcrouter.dns.zone import in_zone, normalize_origin, to_ascii
from dcrouter.errors import ConfigError
from dcrouter.logsetup import get_logger

log = get_logger("dns")

_GLOB = frozenset("*?[]!")


def literal_domain(pattern: str) -> Optional[str]:
    """The domain of an address pattern when it names exactly one domain."""
    _local, at, domain = pattern.rpartition("@")
    if not at or not domain or any(c in _GLOB for c in domain):
        return None
    try:
        return normalize_origin(domain, "pattern")
    except ConfigError:
        return None


def mail_domains(options: DcRouterOptions) -> list[str]:
    """Every mail domain (see the module documentation), sorted, lower-case."""
    email = options.email
    if email is None:
        return []
    found: set[str] = set()
    for rule in email.domain_rules:
        if rule.mode != "mta":
            continue
        domain = literal_domain(rule.pattern)
        if domain:
            found.add(domain)
        if rule.mta_options is not None and rule.mta_options.domain:
            domain = literal_domain("@" + rule.mta_options.domain)
            if domain:
                found.add(domain)
    zone = _hostname_zone(options)
    if zone is not None:
        found.add(zone)
    return sorted(found)


def _hostname(options: DcRouterOptions) -> str:
    assert options.email is not None
    try:
        return to_ascii(options.email.hostname, "email.hostname")
    except ConfigError:
        return ""


def _configured_origins(options: DcRouterOptions) -> list[str]:
    assert options.dns is not None
    return [normalize_origin(z.origin, f"dns.zones[{i}].origin")
            for i, z in enumerate(options.dns.zones)]


def _containing(name: str, origins: Iterable[str]) -> Optional[str]:
    best: Optional[str] = None
    for origin in origins:
        if in_zone(name, origin) and (best is None or len(origin) > len(best)):
            best = origin
    return best


def _hostname_zone(options: DcRouterOptions) -> Optional[str]:
    if options.dns is None or options.email is None:
        return None
    return _containing(_hostname(options), _configured_origins(options))


#: A key the configuration signs with (domain, selector, key source).
DkimSpec = SigningIdentity


def dkim_specs(options: DcRouterOptions) -> list[DkimSpec]:
    """The keys the configuration signs with (:mod:`dcrouter.dkimpolicy`): created when
    missing, so DNS publishes exactly the keys the delivery system signs with."""
    if options.email is None:
        return []
    try:
        return SigningPolicy(options.email).identities()
    except ConfigError as e:
        log.error("DKIM signing identities not published: {error}", error=str(e))
        return []


def load_dkim_keys(store: DkimKeyStore, specs: Iterable[DkimSpec]) -> list[DkimKey]:
    """Blocking (run in a thread): make sure ``specs`` exist, then every key the store knows."""
    store.ensure(specs)
    keys: dict[tuple[str, str], DkimKey] = {}
    for key in store.known_keys():
        keys[(key.domain, key.selector)] = key
    return list(keys.values())


@dataclasses.dataclass
class EmailZonePlan:
    """Records to add per zone origin, and the zones to create for mail domains."""

    records: dict[str, list[RecordOptions]] = dataclasses.field(default_factory=dict)
    new_zones: list[ZoneOptions] = dataclasses.field(default_factory=list)

    def add(self, origin: str, name: str, rtype: str, value: str) -> None:
        """Queue one record (absolute ``name``) for the zone ``origin``."""
        self.records.setdefault(origin, []).append(
            RecordOptions(name=name + ".", type=rtype, value=value))


def spf_value(options: DcRouterOptions) -> str:
    """``v=spf1 <mechanisms> <all>``."""
    assert options.dns is not None
    return " ".join(["v=spf1", *options.dns.spf_mechanisms, options.dns.spf_all])


def dmarc_value(options: DcRouterOptions) -> str:
    """``v=DMARC1; p=<policy>[; rua=<address>]``."""
    assert options.dns is not None
    value = f"v=DMARC1; p={options.dns.dmarc_policy}"
    if options.dns.dmarc_rua:
        rua = options.dns.dmarc_rua
        value += f"; rua={rua if rua.startswith('mailto:') else 'mailto:' + rua}"
    return value


def plan_email_records(options: DcRouterOptions, keys: Iterable[DkimKey]) -> EmailZonePlan:
    """Where each generated record goes (see the module documentation)."""
    plan = EmailZonePlan()
    if options.dns is None or options.email is None or not options.dns.publish_email_records:
        return plan
    origins = _configured_origins(options)
    domains = sorted(mail_domains(options), key=lambda d: (d.count("."), d))
    hostname = _hostname(options)
    zone_of: dict[str, str] = {}
    for domain in domains:
        origin = _containing(domain, origins)
        if origin is None:
            origin = domain
            origins.append(domain)
            plan.new_zones.append(ZoneOptions(origin=domain))
        zone_of[domain] = origin
    for domain in domains:
        origin = zone_of[domain]
        if hostname:
            plan.add(origin, domain, "MX", f"10 {hostname}.")
        plan.add(origin, domain, "TXT", spf_value(options))
        plan.add(origin, f"_dmarc.{domain}", "TXT", dmarc_value(options))
    for key in keys:
        origin = _containing(key.domain, origins)
        if origin is None:
            continue
        try:
            value = key.public_record()
        except (ValueError, TypeError) as e:
            log.error("DKIM key {path} is not a usable private key: {error}", path=key.path,
                      error=str(e))
            continue
        plan.add(origin, key.record_name, "TXT", value)
    host_origin = _containing(hostname, origins) if hostname else None
    if host_origin is not None:
        try:
            address = ipaddress.ip_address(options.email.listen)
        except ValueError:
            address = None
        if address is not None and not address.is_unspecified:
            plan.add(host_origin, hostname, "A" if address.version == 4 else "AAAA", str(address))
    return plan

"""Key rollovers on an injected clock (task.Clock): ZSK pre-publication, double-KSK with CDS.

The DNS service signs with its ``clock``; the test moves the clock from one of
the service's own wake-ups to the next and, at each, asks the service what
it serves.  A simulated validator keeps every answer it has seen for its TTL
(DNSKEY sets, signed RRsets, the parent's DS set as the parent follows CDS)
and checks every combination of cached and fresh data validates, which is
what the pre-publication intervals promise: no validator ever fails.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import dns.dnssec
import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
import pytest_twisted
from twisted.internet import defer, task

from dcrouter.dns import rollover
from dcrouter.dns.rollover import KeyTimes, RolloverPolicy
from tests.dns.conftest import ZONE, start_dns
from tests.support.net import free_tcp_udp_port

ORIGIN = dns.name.from_text("example.test.")
DAY = 86400
POLICY = {"zsk_lifetime": 2 * DAY, "ksk_lifetime": 0, "propagation_delay": 600,
          "parent_ds_ttl": 7200}


def config(**policy: Any) -> dict[str, Any]:
    """example.test signed with a short ZSK lifetime."""
    return {"dns": {"listen": "127.0.0.1", "port": free_tcp_udp_port(), "rate_limit": 0,
                    "zones": [dict(ZONE, dnssec=True)], "dnssec": dict(POLICY, **policy)}}


def ask(service: Any, name: str, rdtype: str) -> dns.message.Message:
    """A DO query answered by the service's query engine (the same bytes as over TCP)."""
    query = dns.message.make_query(name, rdtype, want_dnssec=True)
    wire = service.responder.handle_tcp(query.to_wire())
    return dns.message.from_wire(wire)


def rrset_and_sigs(msg: dns.message.Message, rdtype: int) -> tuple[dns.rrset.RRset, Any]:
    """The answer RRset of ``rdtype`` and its RRSIG set."""
    data = next(r for r in msg.answer if r.rdtype == rdtype)
    sigs = next(r for r in msg.answer if r.rdtype == dns.rdatatype.RRSIG and
                r.covers == rdtype)
    return data, sigs


class CachingValidator:
    """Remembers every DNSKEY set, signed RRset and DS set for its TTL; checks that each
    combination a cache could hold at a moment validates."""

    def __init__(self) -> None:
        self.dnskeys: list[tuple[float, dns.rrset.RRset, Any]] = []
        self.data: list[tuple[float, str, dns.rrset.RRset, Any]] = []
        self.ds_sets: list[tuple[float, frozenset[str]]] = []
        self.checks = 0

    def _alive(self, entries: list[Any], now: float) -> list[Any]:
        return [e for e in entries if e[0] > now]

    def observe(self, service: Any, now: float, parent_ds: frozenset[str],
                ds_expires: float) -> None:
        """Fetch what is served at ``now`` and check every cached combination."""
        keys, key_sigs = rrset_and_sigs(ask(service, "example.test", "DNSKEY"),
                                        dns.rdatatype.DNSKEY)
        self.dnskeys = self._alive(self.dnskeys, now) + [(now + keys.ttl, keys, key_sigs)]
        for name, rdtype in (("www.example.test", "A"), ("example.test", "MX"),
                             ("x.wild.example.test", "TXT")):
            data, sigs = rrset_and_sigs(ask(service, name, rdtype),
                                        dns.rdatatype.from_text(rdtype))
            self.data.append((now + data.ttl, name, data, sigs))
        negative = ask(service, "nope.example.test", "A")
        for rrset in negative.authority:
            if rrset.rdtype in (dns.rdatatype.NSEC, dns.rdatatype.SOA):
                sigs = next(r for r in negative.authority if r.rdtype == dns.rdatatype.RRSIG
                            and r.name == rrset.name and r.covers == rrset.rdtype)
                self.data.append((now + rrset.ttl, "negative", rrset, sigs))
        self.data = self._alive(self.data, now)
        self.ds_sets = self._alive(self.ds_sets, now) + [(ds_expires, parent_ds)]
        for _exp, keyset, keyset_sigs in self.dnskeys:
            for _dexp, ds in self.ds_sets:  # a cached DS must find a KSK signing the set
                anchors = [k for k in keyset if dns.dnssec.make_ds(
                    ORIGIN, k, "SHA256").to_text() in ds]
                assert anchors, f"at {now}: no DNSKEY matches the cached DS {sorted(ds)}"
                anchor_set = dns.rrset.from_rdata_list(ORIGIN, keyset.ttl, anchors)
                dns.dnssec.validate(keyset, keyset_sigs, {ORIGIN: anchor_set}, now=now)
                self.checks += 1
            for _exp2, what, data, sigs in self.data:
                try:
                    dns.dnssec.validate(data, sigs, {ORIGIN: keyset}, now=now)
                except dns.dnssec.ValidationFailure as e:
                    raise AssertionError(f"at {now}: cached {what} {data.name} with "
                                         f"{[s.key_tag for s in sigs]} does not validate "
                                         f"with DNSKEY {[dns.dnssec.key_id(k) for k in keyset]}"
                                         f": {e}") from None
                self.checks += 1


def cds_of(service: Any) -> frozenset[str]:
    """The DS records the zone's CDS set asks the parent for."""
    msg = ask(service, "example.test", "CDS")
    out = set()
    for rrset in msg.answer:
        if rrset.rdtype == dns.rdatatype.CDS:
            out.update(f"{rd.key_tag} {rd.algorithm} {rd.digest_type} {rd.digest.hex()}"
                       for rd in rrset)
    return frozenset(out)


def tags(service: Any, role: str) -> list[int]:
    """Key tags of ``role`` in the DNSKEY set."""
    keys, _sigs = rrset_and_sigs(ask(service, "example.test", "DNSKEY"), dns.rdatatype.DNSKEY)
    want = 257 if role == "ksk" else 256
    return sorted(dns.dnssec.key_id(k) for k in keys if k.flags == want)


def signers(service: Any) -> set[int]:
    """Key tags signing www.example.test A."""
    _data, sigs = rrset_and_sigs(ask(service, "www.example.test", "A"), dns.rdatatype.A)
    return {s.key_tag for s in sigs}


@pytest_twisted.ensureDeferred
async def test_zsk_and_ksk_rollovers_never_break_a_caching_validator(tmp_path: Any) -> None:
    running = start_dns(config(), str(tmp_path))
    service = running.service
    await service.ready
    clock = task.Clock()
    clock.advance(time.time())
    service.clock = clock
    await service.publish()
    validator = CachingValidator()
    parent_ds = cds_of(service)          # the registrar got `dcrouterctl dns ds` at start
    pending: Optional[tuple[float, frozenset[str]]] = None
    registrar_delay = 3 * 3600
    history: list[tuple[float, list[int], set[int], list[int]]] = []
    start = clock.seconds()
    ksk_rolled = False
    try:
        while clock.seconds() < start + 9 * DAY:
            now = clock.seconds()
            # the parent follows CDS after a delay; dcrouter is told (as by --submitted)
            cds = cds_of(service)
            if cds != parent_ds and pending is None:
                pending = (now + registrar_delay, cds)
            if pending is not None and now >= pending[0]:
                parent_ds, pending = pending[1], None
                await defer.maybeDeferred(service.dnssec.mark_submitted, "example.test", now)
                await service.publish()
            validator.observe(service, now, parent_ds, now + POLICY["parent_ds_ttl"])
            history.append((now, tags(service, "zsk"), signers(service), tags(service, "ksk")))
            if not ksk_rolled and now > start + 3 * DAY:
                service.dnssec.request_roll("example.test", "ksk")
                ksk_rolled = True
                await service.publish()
                continue
            timer = service._timer
            assert timer is not None and timer.active()
            wake = timer.getTime()
            if pending is not None:
                wake = min(wake, pending[0])
            clock.advance(max(wake - now, 1))
            await service.publish()
    finally:
        await defer.maybeDeferred(service.stopService)
    zsks = {t for _n, published, _s, _k in history for t in published}
    ksks = {t for _n, _z, _s, published in history for t in published}
    assert len(zsks) >= 4, history   # the first ZSK and three successors in nine days
    assert len(ksks) == 2, history   # one KSK rollover, asked for
    # pre-publication: every ZSK was in the DNSKEY set before it signed, and stayed after
    for tag in zsks:
        published = [n for n, z, _s, _k in history if tag in z]
        signing = [n for n, _z, s, _k in history if tag in s]
        if signing and signing[0] > start:
            assert published[0] < signing[0]
        if signing and published[-1] < history[-1][0]:
            assert published[-1] > signing[-1]
    # the old KSK left (after the parent changed and its DS TTL passed): the new one alone
    first_ksk = history[0][3]
    assert len(first_ksk) == 1 and len(history[-1][3]) == 1
    assert history[-1][3] != first_ksk
    assert validator.checks > 500


def times(role: str, tag: int, publish: float, active: float) -> KeyTimes:
    """A key timeline entry."""
    return KeyTimes(tag, role, 13, publish, publish, active)


def test_timeline_arithmetic_of_a_zsk_rollover() -> None:
    policy = RolloverPolicy(13, zsk_lifetime=30 * DAY, ksk_lifetime=0, dnskey_ttl=3600,
                            propagation_delay=3600, parent_ds_ttl=DAY, max_ttl=7200)
    t0 = 1_800_000_000.0
    made: list[KeyTimes] = []

    def new_key(role: str, publish: float, active: float) -> KeyTimes:
        key = times(role, 100 + len(made), publish, active)
        made.append(key)
        return key
    keys, _dropped, changed = rollover.advance([], policy, t0, new_key)
    assert changed and {k.role for k in keys} == {"ksk", "zsk"}
    zsk1 = next(k for k in keys if k.role == "zsk")
    due = rollover.roll_due(keys, "zsk", policy)
    assert due == t0 + 30 * DAY - 7200    # Ipub = DNSKEY TTL + propagation delay
    assert rollover.next_event(keys, policy, t0) == due
    keys, _d, changed = rollover.advance(keys, policy, due - 1, new_key)
    assert not changed
    keys, _d, changed = rollover.advance(keys, policy, due, new_key)
    zsk2 = next(k for k in keys if k.role == "zsk" and k is not zsk1)
    assert (zsk2.publish, zsk2.active) == (due, due + 7200)
    assert zsk1.retire == zsk2.active and zsk1.remove == zsk2.active + 7200 + 3600  # Iret
    assert rollover.zsk_signing(keys, due + 7199) == [zsk1]
    assert rollover.zsk_signing(keys, due + 7200) == [zsk2]
    assert zsk1 in [k for k in keys if rollover.published(k, due + 7200 + 10799)]
    keys, dropped, _c = rollover.advance(keys, policy, due + 7200 + 10800, new_key)
    assert dropped == [zsk1] and zsk1 not in keys

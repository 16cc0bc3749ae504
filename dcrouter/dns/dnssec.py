"""DNSSEC of the DNS service: each signed zone's keys, rollovers and signatures.

:class:`DnssecZones` holds a :class:`~dcrouter.dns.signer.ZoneSigner` per
signed zone and the key store (:mod:`dcrouter.dns.dnssec_keys`).  For a
build at time ``now`` :meth:`DnssecZones.prepare` (blocking: the service
calls it in a thread) advances the zone's key timeline
(:mod:`dcrouter.dns.rollover`) under the zone's lock, loads the keys of the
moment and signs; :meth:`DnssecZones.finish` signs the SOA once the serial
is chosen.  :meth:`status` and :meth:`mark_submitted` serve ``dcrouterctl
dns ds``; :func:`parent_has_ds` asks the parent's servers whether they serve
a DS (the KSK rollover waits for it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional

import dns.dnssec
import dns.message
import dns.name
import dns.query
import dns.rdatatype

from dcrouter.config.base import split_host_port
from dcrouter.config.dns import DnssecOptions
from dcrouter.dns import rollover
from dcrouter.dns.denial import DnssecData
from dcrouter.dns.dnssec_keys import ALGORITHMS, DnssecKey, DnssecKeyStore, ds_text
from dcrouter.dns.rollover import KeyTimes, RolloverPolicy
from dcrouter.dns.signer import SigningKeys, ZoneSigner
from dcrouter.dns.zone import Zone, ZoneContent
from dcrouter.logsetup import get_logger

log = get_logger("dns.dnssec")


@dataclasses.dataclass
class Prepared:
    """One zone signed at one moment, waiting for its serial and SOA signature."""

    origin: str
    data: DnssecData
    keys: SigningKeys
    times: list[KeyTimes]
    #: When the keys' roles change next (a rebuild is due), or None.
    next_event: Optional[float]
    #: The new KSK whose DS the parent has not been seen serving, or None.
    waiting: Optional[DnssecKey]


def policy_for(content: ZoneContent, options: DnssecOptions, algorithm: int) -> RolloverPolicy:
    """The rollover intervals of ``content`` under ``options``."""
    dnskey_ttl = options.dnskey_ttl or content.ttl
    soa = content.soa
    max_ttl = max([soa.ttl, dnskey_ttl] + [r.ttl for r in content.records])
    return RolloverPolicy(algorithm, options.zsk_lifetime, options.ksk_lifetime, dnskey_ttl,
                          options.propagation_delay, options.parent_ds_ttl, max_ttl)


class DnssecZones:
    """Keys, timelines and signers of every signed zone (one per DNS service)."""

    def __init__(self, state_dir: str) -> None:
        self.store = DnssecKeyStore(state_dir)
        self.signers: dict[str, ZoneSigner] = {}
        #: Rollovers asked for (origin -> roles), done at the next build.
        self.roll_requests: dict[str, set[str]] = {}

    def signer(self, origin: str, options: DnssecOptions) -> ZoneSigner:
        """The zone's signer (created on first use, given the current options)."""
        signer = self.signers.get(origin)
        if signer is None:
            signer = self.signers[origin] = ZoneSigner(origin, options)
        signer.options = options
        return signer

    def forget_except(self, origins: Iterable[str]) -> None:
        """Drop the signers of zones no longer signed (their keys stay on disk)."""
        keep = set(origins)
        for origin in list(self.signers):
            if origin not in keep:
                del self.signers[origin]

    def prepare(self, content: ZoneContent, options: DnssecOptions, now: float) -> Prepared:
        """Advance the key timeline and sign ``content`` (blocking)."""
        origin = content.origin
        store = self.store
        roll = tuple(self.roll_requests.pop(origin, ()))
        with store.locked(origin):
            times = store.load_times(origin)
            algorithm = times[0].algorithm if times else ALGORITHMS[options.algorithm]
            policy = policy_for(content, options, algorithm)

            def new_key(role: str, publish: float, active: float) -> KeyTimes:
                tag, _private = store.create(origin, role, algorithm, {k.tag for k in times})
                key = KeyTimes(tag, role, algorithm, now, publish, active)
                times.append(key)
                return key

            kept, dropped, changed = rollover.advance(times, policy, now, new_key, roll)
            if changed:
                store.save_times(origin, kept)
                for key in dropped:
                    store.delete(origin, key)
                    log.info("DNSSEC {role} {tag} of {zone} removed", role=key.role.upper(),
                             tag=key.tag, zone=origin)
        times = kept
        by_tag = {k.tag: store.load_key(origin, k) for k in times if rollover.published(k, now)}
        keys = SigningKeys(
            published=list(by_tag.values()),
            ksk=[by_tag[k.tag] for k in rollover.ksk_signing(times, now)],
            zsk=[by_tag[k.tag] for k in rollover.zsk_signing(times, now)],
            parent=[by_tag[k.tag] for k in rollover.parent_set(times, now)])
        data = self.signer(origin, options).sign(content, keys, now)
        waiting = rollover.waiting_for_ds(times, now)
        return Prepared(origin, data, keys, times, rollover.next_event(times, policy, now),
                        by_tag.get(waiting.tag) if waiting is not None else None)

    def finish(self, zone: Zone, prepared: Prepared, now: float) -> None:
        """Sign the SOA of ``zone`` (built with ``prepared.data``)."""
        self.signers[zone.origin].sign_soa(zone, prepared.keys, now)

    def mark_submitted(self, origin: str, now: float, tag: Optional[int] = None
                       ) -> Optional[int]:
        """Record that the parent serves the DS of the waiting KSK (or of ``tag``); the tag
        marked, or None when no KSK waits (blocking)."""
        with self.store.locked(origin):
            times = self.store.load_times(origin)
            waiting = rollover.waiting_for_ds(times, now)
            target = tag if tag is not None else (waiting.tag if waiting else None)
            if target is None or not rollover.mark_ds_seen(times, target, now):
                return None
            self.store.save_times(origin, times)
        log.info("the parent of {zone} serves the DS of KSK {tag}", zone=origin, tag=target)
        return target

    def request_roll(self, origin: str, role: str) -> None:
        """Roll ``role`` ('ksk' or 'zsk') of ``origin`` at the next build."""
        self.roll_requests.setdefault(origin, set()).add(role)

    def status(self, origin: str, now: float) -> dict[str, Any]:
        """Keys with their state and times, and the DS records the parent should hold."""
        times = self.store.load_times(origin)
        keys = []
        ds: list[str] = []
        parent = {k.tag for k in rollover.parent_set(times, now)}
        for key_times in times:
            key = self.store.load_key(origin, key_times)
            entry = dict(key_times.as_dict(), state=rollover.describe(key_times, now),
                         dnskey=f"{origin}. IN DNSKEY {key.dnskey.to_text()}")
            if key.is_ksk:
                entry["ds"] = ds_text(origin, key)
                if key.tag in parent:
                    ds.append(entry["ds"])
            keys.append(entry)
        waiting = rollover.waiting_for_ds(times, now)
        return {"zone": origin + ".", "ds": ds, "keys": keys,
                "waiting_for_ds": waiting.tag if waiting else None}


def parent_has_ds(servers: Iterable[str], origin: str, key: DnssecKey,
                  timeout: float = 3.0) -> bool:
    """Every one of ``servers`` ('IP:port') answers DS ``origin`` with the DS of ``key``,
    asked over TCP (blocking: in a thread)."""
    wanted = dns.dnssec.make_ds(dns.name.from_text(origin + "."), key.dnskey, "SHA256")
    servers = list(servers)
    if not servers:
        return False
    for server in servers:
        host, port = split_host_port(server, "dns.dnssec.parent_servers", default_port=53)
        query = dns.message.make_query(origin + ".", dns.rdatatype.DS)
        try:  # over TCP: an off-path attacker cannot forge the answer that ends a rollover
            reply = dns.query.tcp(query, host, port=port, timeout=timeout)
        except Exception as e:  # any network failure: not seen (checked again later)
            log.info("DS check of {zone} at {server} failed: {error}", zone=origin,
                     server=server, error=str(e))
            return False
        found = [rd for rrset in reply.answer if rrset.rdtype == dns.rdatatype.DS
                 for rd in rrset]
        if wanted not in found:
            return False
    return True

"""The DNS service: authoritative zones over UDP and TCP, with the mail domains' records.

:class:`DnsService` builds the zones from ``[[dns.zones]]`` plus the email
records (:mod:`dcrouter.dns.email_records`), serves them through one
:class:`~dcrouter.dns.server.Responder` on a UDP and a TCP listener, and
swaps in a whole new zone set on reload, rule change or new DKIM key: a
query is answered either from the old or from the new zones, never dropped.
A zone's serial increases whenever its content changes (it starts at the
configured SOA serial, or at the current Unix time).  Secondaries in
``dns.allow_transfer`` may transfer the zones over TCP
(:mod:`dcrouter.dns.transfer`); those in ``dns.notify`` are told of every
new serial (:mod:`dcrouter.dns.notify`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping, Optional, Sequence

from twisted.internet import defer, threads
from twisted.names import dns as dns_types
from zope.interface import implementer

from dcrouter.config.base import build
from dcrouter.config.dns import RecordOptions, ZoneOptions
from dcrouter.config.options import DcRouterOptions
from dcrouter.dkimkeys import DkimKey
from dcrouter.dns.authority import Authority
from dcrouter.dns.dane import dane_hosts, hold_for, served_digests, tlsa_records
from dcrouter.dns.dnssec import DnssecZones, Prepared, parent_has_ds
from dcrouter.dns.dnssec_keys import DnssecKeyError
from dcrouter.dns.email_records import dkim_specs, load_dkim_keys, plan_email_records
from dcrouter.dns.notify import Notifier
from dcrouter.dns.protocol import DnsDatagramProtocol, DnsTcpFactory, RateLimiter
from dcrouter.dns.server import Responder
from dcrouter.dns.transfer import TransferAcl, TransferHandler
from dcrouter.dns.zone import (DS, Zone, ZoneContent, ZoneSet, build_zone_content, in_zone,
                               normalize_origin, wire_record)
from dcrouter.errors import ConfigError
from dcrouter.interfaces import IDnsChallengePublisher
from dcrouter.logsetup import get_logger
from dcrouter.service import ListenerSet, ListenSpec, ManagedService, RouterContext
from dcrouter.tlsutil import ensure_private_dir, write_private

log = get_logger("dns")

#: A signed zone is rebuilt at least this often (seconds): other worker processes may have
#: moved its keys on (cheap: unchanged signatures are kept).
RESCAN_INTERVAL = 3600
#: While a new KSK waits for its DS at the parent, the parent is checked this often.
DS_CHECK_INTERVAL = 600
#: With DANE records published, the SMTP certificate files are looked at this often.
CERT_CHECK_INTERVAL = 60


class SerialKeeper:
    """Chooses serials so they increase whenever a zone's content changes.

    With a ``path`` the last serial and content fingerprint of each zone are
    kept in a small JSON file, so serials keep increasing across restarts
    (read at start; written in a thread after each change).
    """

    def __init__(self, path: str = "") -> None:
        self.path = path
        self.known: dict[str, tuple[str, int]] = {}
        self._saving: defer.Deferred = defer.succeed(None)
        if path:
            try:
                with open(path, "r", encoding="utf-8") as f:
                    data = json.load(f)
                self.known = {str(origin): (str(v["fingerprint"]), int(v["serial"]))
                              for origin, v in data.items()}
            except FileNotFoundError:
                pass
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
                log.warn("ignoring unreadable DNS serial file {path}: {error}", path=path,
                         error=str(e))

    def serial_for(self, content: ZoneContent, extra: str = "") -> int:
        """The serial ``content`` should carry (not yet remembered: see :meth:`commit`);
        ``extra`` digests what signing adds (see :attr:`Zone.fingerprint`)."""
        fingerprint = content.fingerprint() + (":" + extra if extra else "")
        configured = content.soa.serial
        previous = self.known.get(content.origin)
        if previous is None:
            return configured if configured is not None else int(time.time())
        old_fingerprint, old_serial = previous
        if old_fingerprint == fingerprint:
            return max(old_serial, configured or 0)
        return max(old_serial + 1, configured if configured is not None else int(time.time()))

    def commit(self, zones: ZoneSet) -> Optional[defer.Deferred]:
        """Remember the serials of the zones now being served (and save them if changed)."""
        known = dict(self.known)
        known.update({z.origin: (z.fingerprint, z.serial) for z in zones})
        changed = known != self.known
        self.known = known
        if not self.path or not changed:
            return None
        data = json.dumps({o: {"fingerprint": f, "serial": s} for o, (f, s) in known.items()},
                          indent=1, sort_keys=True).encode("utf-8")
        self._saving = self._saving.addBoth(
            lambda _: threads.deferToThread(self._write, data)).addErrback(
            lambda f: log.error("cannot save DNS serials to {path}: {error}", path=self.path,
                                error=str(f.value)))
        return self._saving

    def _write(self, data: bytes) -> None:
        ensure_private_dir(os.path.dirname(self.path))
        write_private(self.path, data)

    def saved(self) -> defer.Deferred:
        """Fires when every save so far has been written."""
        d: defer.Deferred = defer.Deferred()

        def done(result: Any) -> Any:
            d.callback(None)
            return result
        self._saving.addBoth(done)
        return d


def _not_a_table(index: int) -> Any:
    raise ConfigError(f"dns.zones[{index}]", "must be a table")


@implementer(IDnsChallengePublisher)
class DnsService(ManagedService):
    """The authoritative DNS server (``[dns]``); also publishes ACME dns-01 TXT records."""

    def __init__(self, context: RouterContext) -> None:
        super().__init__("dns", context)
        self.options = context.options
        self.serials = SerialKeeper(os.path.join(context.state_dir, "dns", "serials.json"))
        self.dkim_keys: list[DkimKey] = []
        #: ACME dns-01 values being validated: absolute name -> TXT values.
        self.challenge_records: dict[str, list[str]] = {}
        #: DNSSEC keys and signers; what the last build signed, by origin.
        self.dnssec = DnssecZones(context.state_dir)
        self.prepared: dict[str, Prepared] = {}
        #: The clock of signature refreshes and key rollovers (a task.Clock in tests).
        self.clock: Any = context.reactor
        self._timer: Any = None
        self._publish_lock = defer.DeferredLock()
        self.publishes = 0
        #: The SMTP certificate whose TLSA records the signed zones carry (DANE).
        self.certs = context.smtp_certs
        self.certs.clock = lambda: float(self.clock.seconds())
        self.certs.on_digests_change(self._published_records_changed)
        context.dns_records.add_listener(self._published_records_changed)
        self.certs.hold = hold_for(self.options)
        # signed at start (blocking, before anything is served); later builds sign in a thread
        zones, self.prepared = self._sign_zones(self._contents(self.options), self.options,
                                                self.clock.seconds())
        self.zone_set = zones
        dns_options = self._dns(self.options)
        self.responder = Responder(Authority(zones), dns_options.max_udp_payload)
        self.limiter = RateLimiter(dns_options.rate_limit, slip=dns_options.rate_limit_slip)
        self.udp = DnsDatagramProtocol(self.responder, self.limiter)
        self.tcp = DnsTcpFactory(self.responder, dns_options.max_tcp_connections,
                                 dns_options.tcp_timeout)
        self.transfers = TransferHandler(self.zone, TransferAcl(dns_options.allow_transfer),
                                         self.responder.max_udp_payload)
        self.tcp.transfers = self.transfers
        self.notifier = Notifier(context.reactor, dns_options.notify, dns_options.listen)
        self.listeners = ListenerSet(context.reactor, self._target)
        self._refresh_lock = defer.DeferredLock()
        self.refreshes = 0
        #: Fires when the email records (with DKIM keys) of the start are published.
        self.ready: defer.Deferred = defer.succeed(None)
        context.dkim_keys.add_listener(self._keys_changed)

    @staticmethod
    def _dns(options: DcRouterOptions) -> Any:
        assert options.dns is not None
        return options.dns

    # -- zones ----------------------------------------------------------------
    def _contents(self, options: DcRouterOptions) -> list[tuple[ZoneContent, bool]]:
        """Parse every zone (raises ConfigError naming the key); with its dnssec flag."""
        dns_options = self._dns(options)
        plan = plan_email_records(options, self.dkim_keys)
        contents: list[tuple[ZoneContent, bool]] = []
        seen: dict[str, str] = {}
        origins = [normalize_origin(z.origin, f"dns.zones[{i}].origin")
                   for i, z in enumerate(dns_options.zones)]
        challenges = self._challenges_by_origin(origins + [z.origin for z in plan.new_zones])
        published = self._published_by_origin(options, origins + [z.origin
                                                                  for z in plan.new_zones])
        for i, zone in enumerate(dns_options.zones):
            path = f"dns.zones[{i}]"
            origin = origins[i]
            if origin in seen:
                raise ConfigError(f"{path}.origin", f"zone {origin} repeats {seen[origin]}")
            seen[origin] = path
            contents.append((build_zone_content(zone, path, plan.records.get(origin, ()),
                                                challenges.get(origin, ()),
                                                published.get(origin, ())), zone.dnssec))
        for zone in plan.new_zones:
            contents.append((build_zone_content(
                zone, f"dns.(zone of mail domain {zone.origin})",
                plan.records.get(zone.origin, ()), challenges.get(zone.origin, ()),
                published.get(zone.origin, ())), False))
        return contents

    def _published_by_origin(self, options: DcRouterOptions, origins: list[str]
                             ) -> dict[str, list[RecordOptions]]:
        """TLSA records of the SMTP certificate and the records other parts asked for
        (``context.dns_records``), each in the closest zone containing it."""
        out: dict[str, list[RecordOptions]] = {}
        for rec in tlsa_records(options, self.certs.tlsa_digests()) + \
                self.context.dns_records.records():
            name = rec.name.lower().rstrip(".")
            containing = [o for o in origins if in_zone(name, o)]
            if containing:
                out.setdefault(max(containing, key=len), []).append(rec)
        return out

    def _published_records_changed(self) -> None:
        """The TLSA digests or another part's records changed: republish."""
        if self.running:
            self.publish().addErrback(lambda f: log.error(
                "publishing the records failed: {error}", error=str(f.value)))

    def _build(self, options: DcRouterOptions) -> ZoneSet:
        """Parse every zone, unsigned (validation: raises ConfigError naming the key)."""
        return ZoneSet(Zone(c, self.serials.serial_for(c)) for c, _ in self._contents(options))

    def _sign_zones(self, contents: list[tuple[ZoneContent, bool]], options: DcRouterOptions,
                    now: float) -> tuple[ZoneSet, dict[str, Prepared]]:
        """The zones to serve, the signed ones signed at ``now`` (blocking when any is)."""
        policy = self._dns(options).dnssec
        by_origin = {c.origin: (c, signed) for c, signed in contents}
        zones: dict[str, Zone] = {}
        prepared: dict[str, Prepared] = {}
        for origin in sorted(by_origin, key=lambda o: -len(o.split("."))):  # children first
            content, signed = by_origin[origin]
            if not signed:
                zones[origin] = Zone(content, self.serials.serial_for(content))
                continue
            self._check_parent_ds(origin, policy, now)
            try:
                p = self.dnssec.prepare(content, policy, now)
                zone = Zone(content, self.serials.serial_for(content, p.data.fingerprint), p.data)
                self.dnssec.finish(zone, p, now)
            except (DnssecKeyError, OSError, ValueError) as e:
                old = self.zone_set.zones.get(origin) if hasattr(self, "zone_set") else None
                log.error("cannot sign zone {zone}: {error}; serving {what}", zone=origin,
                          error=str(e), what="the last signed version" if old else "it unsigned")
                zones[origin] = old or Zone(content, self.serials.serial_for(content))
                continue
            zones[origin] = zone
            prepared[origin] = p
            parent = self._delegating_parent(by_origin, origin)
            if parent is not None and p.keys.parent:
                parent_content, parent_signed = by_origin[parent]
                ds = [wire_record(origin, DS, policy.parent_ds_ttl, rd.to_wire(), rd.to_text())
                      for rd in (k.ds(origin) for k in p.keys.parent)]
                by_origin[parent] = (dataclasses.replace(
                    parent_content, records=parent_content.records + tuple(ds)), parent_signed)
        return ZoneSet(zones[c.origin] for c, _ in contents if c.origin in zones), prepared

    @staticmethod
    def _delegating_parent(by_origin: Mapping[str, tuple[ZoneContent, bool]], origin: str
                           ) -> Optional[str]:
        """The served, signed zone that delegates ``origin`` without configured DS records
        there: dcrouter keeps its DS set (automatic DS, as a CDS-reading parent would)."""
        name = origin
        while name:
            name = name.partition(".")[2]
            entry = by_origin.get(name)
            if entry is None:
                continue
            content, signed = entry
            at_cut = [r.rtype for r in content.records if r.owner == origin]
            if signed and dns_types.NS in at_cut and DS not in at_cut:
                return name
            return None
        return None

    def _check_parent_ds(self, origin: str, policy: Any, now: float) -> None:
        """Blocking: when a new KSK waits for its DS, look at the parent (a served parent's
        zone here, or ``dnssec.parent_servers``) and record it when it is there."""
        previous = self.prepared.get(origin) if hasattr(self, "prepared") else None
        if previous is None or previous.waiting is None:
            return
        key = previous.waiting
        wanted = key.ds(origin).to_wire()
        served = self.zone_set.find(origin.partition(".")[2]) if origin else None
        seen = False
        if served is not None and served.origin != origin:
            node = served.nodes.get(origin, {})
            seen = any(r.rdata_wire() == wanted for r in node.get(DS, ()))
        if not seen and policy.parent_servers:
            seen = parent_has_ds(policy.parent_servers, origin, key)
        if seen:
            self.dnssec.mark_submitted(origin, now, key.tag)

    def _challenges_by_origin(self, origins: list[str]) -> dict[str, list[RecordOptions]]:
        """Challenge TXT records, each in the zone with the longest origin containing it."""
        out: dict[str, list[RecordOptions]] = {}
        for name, values in self.challenge_records.items():
            containing = [o for o in origins if in_zone(name, o)]
            if not containing:
                continue
            origin = max(containing, key=len)
            out.setdefault(origin, []).extend(
                RecordOptions(name=name + ".", type="TXT", value=f'"{v}"', ttl=60)
                for v in values)
        return out

    # -- ACME dns-01 (IDnsChallengePublisher) ----------------------------------------
    def serves(self, name: str) -> bool:
        """True when one of the served zones contains ``name``."""
        return self.zone_set.find(name.lower().rstrip(".")) is not None

    def add_txt(self, name: str, value: str) -> defer.Deferred:
        """Serve one more TXT value at ``name`` (fires once answers carry it)."""
        name = name.lower().rstrip(".")
        if not self.serves(name):
            return defer.fail(ConfigError("dns.zones", f"no served zone contains {name}"))
        self.challenge_records.setdefault(name, []).append(value)
        log.info("publishing an ACME challenge at {name}", name=name)
        return self._republish()

    def remove_txt(self, name: str, value: str) -> defer.Deferred:
        """Stop serving one TXT value published by :meth:`add_txt`."""
        name = name.lower().rstrip(".")
        values = self.challenge_records.get(name, [])
        if value in values:
            values.remove(value)
        if not values:
            self.challenge_records.pop(name, None)
        return self._republish()

    def _republish(self) -> defer.Deferred:
        return self.publish()

    def publish(self) -> defer.Deferred:
        """Rebuild the zones from the current options (signing in a thread) and serve them;
        fires once they are served (a ConfigError fails it and keeps the running zones)."""
        return self._publish_lock.run(self._publish)

    @defer.inlineCallbacks
    def _publish(self) -> Any:
        options = self.options
        try:
            contents = self._contents(options)
        except ConfigError as e:
            log.error("cannot publish the zones: {error}", error=str(e))
            raise
        now = self.clock.seconds()
        self.certs.hold = hold_for(options)
        if any(signed for _c, signed in contents):
            zones, prepared = yield threads.deferToThread(self._sign_zones, contents, options,
                                                          now)
        else:
            zones, prepared = self._sign_zones(contents, options, now)
        self.prepared = prepared
        self.dnssec.forget_except(prepared)
        self.publishes += 1
        if not self._same(zones):
            self._swap(zones)
        elif self.running:  # nothing new to serve; targets added since are still told
            self.notifier.zones_changed(self.zone_set)
        self.certs.mark_published(served_digests(self.zone_set, options), now)
        self._schedule(now)
        return None

    def _same(self, zones: ZoneSet) -> bool:
        """``zones`` serve exactly what is served now (the swap can be skipped)."""
        served = self.zone_set.zones
        return served.keys() == zones.zones.keys() and all(
            served[o].serial == z.serial and served[o].fingerprint == z.fingerprint
            for o, z in zones.zones.items())

    def _schedule(self, now: float) -> None:
        """Wake up for the next signature refresh, key event or DS check."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        dane = bool(dane_hosts(self.options))
        if not self.running or not (self.prepared or dane):
            return
        times = [now + RESCAN_INTERVAL]  # other workers may have moved the keys on
        if dane:  # a new certificate file is seen within a minute; key switches on time
            times.append(now + CERT_CHECK_INTERVAL)
            times.extend(t for t in (self.certs.next_check(now),) if t)
        for p in self.prepared.values():
            times.extend(t for t in (p.next_event, p.data.refresh_at) if t)
            if p.waiting is not None:
                times.append(now + DS_CHECK_INTERVAL)
        delay = max(1.0, min(times) - now)
        self._timer = self.clock.callLater(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if dane_hosts(self.options):
            try:
                self.certs.check(self.clock.seconds())
            except (OSError, ValueError) as e:
                log.error("checking the SMTP certificate failed: {error}", error=str(e))
        self.publish().addErrback(lambda f: log.error("DNSSEC re-signing failed: {error}",
                                                      error=str(f.value)))

    def _swap(self, zones: ZoneSet) -> None:
        self.serials.commit(zones)
        self.zone_set = zones
        self.responder.set_authority(Authority(zones))
        if self.running:
            self.notifier.zones_changed(zones)
        log.info("DNS zones loaded: {zones}",
                 zones=", ".join(f"{z.origin or '.'} (serial {z.serial})" for z in zones))

    def refresh_email_records(self) -> defer.Deferred:
        """Re-read DKIM keys (creating those mta rules need, in a thread) and republish.

        Fires when the new zones are being served.
        """
        return self._refresh_lock.run(self._refresh)

    @defer.inlineCallbacks
    def _refresh(self) -> Any:
        options = self.options
        if not self._dns(options).publish_email_records:
            return None
        keys = yield threads.deferToThread(load_dkim_keys, self.context.dkim_keys,
                                           dkim_specs(options))
        self.dkim_keys = keys
        try:
            yield self.publish()
        except ConfigError:
            return None
        self.refreshes += 1
        return None

    def _keys_changed(self) -> None:
        """The key store has a new key (maybe told from a worker thread)."""
        self.context.reactor.callFromThread(self._on_keys_changed)

    def _on_keys_changed(self) -> None:
        if self.running:
            self.refresh_email_records().addErrback(
                lambda f: log.error("DKIM refresh failed: {error}", error=str(f.value)))

    # -- service ----------------------------------------------------------------
    def _target(self, spec: ListenSpec) -> Any:
        return self.udp if spec.protocol == "udp" else self.tcp

    def _specs(self, options: DcRouterOptions) -> list[ListenSpec]:
        d = self._dns(options)
        return [ListenSpec("udp", d.listen, d.port, "dns.port"),
                ListenSpec("tcp", d.listen, d.port, "dns.port")]

    def startService(self) -> None:
        """Bind UDP and TCP, then publish DKIM keys (read or generated in a thread)."""
        self.listeners.start(self._specs(self.options))
        self.serials.commit(self.zone_set)
        super().startService()
        self._schedule(self.clock.seconds())
        self.ready = self.refresh_email_records()
        self.ready.addErrback(lambda f: log.error("publishing email records failed: {error}",
                                                  error=str(f.value)))
        # every zone is announced once at start (those the refresh swapped in already are)
        self.ready.addCallback(lambda _: self.notifier.zones_changed(self.zone_set)
                               if self.running else None)

    def stopService(self) -> Any:
        """Close the listeners; let the serial file be written."""
        super().stopService()
        self._schedule(0)  # not running: cancels the timer
        self.notifier.stop()
        return defer.gatherResults([self.listeners.stop(), self.serials.saved()],
                                   consumeErrors=True)

    def bound_addresses(self) -> list[tuple[str, str, int]]:
        """The UDP and TCP listeners."""
        return self.listeners.addresses()

    def check_options(self, options: DcRouterOptions) -> None:
        """The new zones must build (ConfigError naming the key otherwise)."""
        self._build(options)

    @defer.inlineCallbacks
    def reconfigure(self, options: DcRouterOptions) -> Any:
        """New zones (swapped atomically), limits, and a re-bind when the address changed.

        Invalid zone data is logged and the running zones are kept.
        """
        try:
            zones = self._build(options)
        except ConfigError as e:
            log.error("DNS reload refused, keeping the running zones: {error}", error=str(e),
                      path=e.path if hasattr(e, "path") else "")
            return None
        self.options = options
        d = self._dns(options)
        self.transfers.acl = TransferAcl(d.allow_transfer)
        self.notifier.configure(d.notify, d.listen)
        yield self.publish()
        self.limiter.limit = d.rate_limit
        self.limiter.slip = d.rate_limit_slip
        self.responder.max_udp_payload = max(512, d.max_udp_payload)
        self.transfers.udp_payload = self.responder.max_udp_payload
        self.tcp.max_connections = d.max_tcp_connections
        self.tcp.timeout = d.tcp_timeout
        if self.running:
            yield self.listeners.update(self._specs(options))
            yield self.refresh_email_records()
        return None

    def update_zones(self, zones: Sequence[Mapping[str, Any]]) -> defer.Deferred:
        """Replace the configured zones at runtime (for the management API).

        ``zones`` are ``[[dns.zones]]`` tables as plain data (parsed JSON).
        Invalid data raises :class:`ConfigError` naming the key, before
        anything changes; otherwise the new zones are served atomically and
        the returned Deferred fires once the email records are republished.
        The change lasts until the next reload from the configuration file.
        """
        parsed = tuple(build(ZoneOptions, zone, f"dns.zones[{i}]") if isinstance(zone, Mapping)
                       else _not_a_table(i) for i, zone in enumerate(zones))
        options = dataclasses.replace(
            self.options, dns=dataclasses.replace(self._dns(self.options), zones=parsed))
        self._build(options)
        self.options = options
        d = self.publish()
        if self.running:
            d.addCallback(lambda _: self.refresh_email_records())
        return d

    # -- DNSSEC (for the API and dcrouterctl dns ds) -------------------------------
    def dnssec_status(self, origin: str) -> defer.Deferred:
        """Fires with the DS records the parent should hold and the keys' states, or None
        when ``origin`` is not a signed zone served here."""
        origin = origin.lower().rstrip(".")
        if origin not in self.prepared:
            return defer.succeed(None)
        return threads.deferToThread(self.dnssec.status, origin, self.clock.seconds())

    @defer.inlineCallbacks
    def ds_submitted(self, origin: str) -> Any:
        """The operator says the parent serves the new KSK's DS: record it (the rollover
        goes on), republish; fires with the status and the tag marked (None: no KSK was
        waiting), or None when ``origin`` is not signed here."""
        origin = origin.lower().rstrip(".")
        if origin not in self.prepared:
            return None
        tag = yield threads.deferToThread(self.dnssec.mark_submitted, origin,
                                          self.clock.seconds())
        yield self.publish()
        status = yield self.dnssec_status(origin)
        return dict(status or {}, marked=tag)

    # -- figures -----------------------------------------------------------------
    def zones(self) -> list[dict]:
        """Every zone with its serial and records (for the API)."""
        return [z.as_dict() for z in self.zone_set]

    def get_stats(self) -> dict:
        """Queries by rcode and type, rate-limited and TCP figures, zones and serials."""
        stats = self.responder.stats()
        stats.update({
            "rate_limited": self.limiter.limited,
            "tcp_connections": self.tcp.connections,
            "tcp_refused": self.tcp.refused,
            "tcp_oversized": self.tcp.oversized,
            "internal_errors": self.udp.errors + self.tcp.errors,
            **self.transfers.stats(),
            **self.notifier.stats(),
            "zones": [{"origin": z.origin, "serial": z.serial,
                       "records": len(z.content.records) + 1, "signed": z.dnssec is not None}
                      for z in self.zone_set],
            "dnssec_signatures_made": sum(s.signed for s in self.dnssec.signers.values()),
            "dnssec_signatures_reused": sum(s.reused for s in self.dnssec.signers.values()),
            "dnssec_waiting_for_ds": sorted(o for o, p in self.prepared.items() if p.waiting),
        })
        return stats

    def zone(self, origin: str) -> Optional[Zone]:
        """The zone served for ``origin`` (any case, with or without the dot)."""
        return self.zone_set.zones.get(origin.lower().rstrip("."))

"""MultiModeDeliverySystem: takes due items from the queue and delivers them.

For each item: resolve its destination to transports with the rules in force
(:mod:`dcrouter.delivery.transport`: a reload reaches queued mail, credentials
are looked up now and never stored), read the body, bring it to CRLF lines of
at most 998 octets for SMTP (:mod:`dcrouter.delivery.lines`), DKIM-sign it when
the item says so (after that, so the signature covers the bytes sent), then
deliver by transport - **forward** to ``server:port``, **mx** to the recipient
domain's MX hosts, **local** into Maildirs - and record every recipient's
outcome: delivered; deferred with exponential backoff (4xx, timeouts,
connection trouble, a rule that no longer exists); or failed (5xx, null MX,
retries exhausted), which for hard bounces suppresses the recipient.  The RFC
3464 reports that follow (failure, delay, success as NOTIFY asked) are decided
and queued by :mod:`dcrouter.delivery.notices`.

SMTP deliveries go through one :class:`DestinationWorker` per transport: its
jobs wait in a deque and at most ``per_destination_concurrency`` connections
take jobs from it, each sending up to ``connection_reuse`` messages before
QUIT.  ``concurrent_deliveries`` caps the items in flight overall.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet import defer, endpoints, ssl, task, threads

from dcrouter.config.email import EmailOptions
from dcrouter.delivery import dkimsign, maildir
from dcrouter.delivery.classify import classify
from dcrouter.delivery.lines import normalise
from dcrouter.delivery.mx import MxResolver, make_resolver
from dcrouter.delivery.notices import Notices, envelope_dsn
from dcrouter.delivery.payload import Payload
from dcrouter.delivery.reputation import SenderReputation
from dcrouter.delivery.smtpclient import (
    ClientSettings, DeliveryClient, Job, OneConnection, Outcome, has_reply_code,
)
from dcrouter.delivery.suppression import SuppressionList
from dcrouter.delivery.transport import Resolution, RuleLookup, Transport, TransportResolver
from dcrouter.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from dcrouter.logsetup import get_logger
from dcrouter.queue.item import DELIVERED, FAILED, QueueItem

log = get_logger("email.delivery")

#: Seconds between looks at the other worker processes' suppression files.
SUPPRESSION_SYNC_INTERVAL = 5.0


class DestinationWorker:
    """Jobs waiting for one transport and the connections serving them."""

    def __init__(self, transport: Transport) -> None:
        self.key = transport
        self.transport = transport
        self.destination = transport.destination
        self.jobs: collections.deque[Job] = collections.deque()
        self.connections = 0

    def take(self) -> Optional[Job]:
        """The next waiting job (JobSource)."""
        return self.jobs.popleft() if self.jobs else None


def _error_outcome(error: Exception) -> tuple[int, str, bool]:
    text = str(error)
    code = int(text[:3]) if has_reply_code(text) else -1
    return code, text, isinstance(error, PermanentDeliveryError)


class MultiModeDeliverySystem(Service):
    """The outbound delivery service (a child of the email gateway)."""

    name: Optional[str] = "delivery"  # type: ignore[assignment]

    def __init__(self, queue: Any, options: EmailOptions, dkim_keys: Any, state_dir: str = "",
                 resolver: Any = None, observers: Optional[list[Any]] = None,
                 reactor: Any = None, suppression_file: str = "suppression.json",
                 rules: Optional[RuleLookup] = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.queue = queue
        self.options = options
        self.dkim_keys = dkim_keys
        self.state_dir = state_dir
        self.reactor = reactor
        self._resolver = resolver
        self._mx: Optional[MxResolver] = None
        self.observers: list[Any] = list(observers or [])
        store = getattr(queue, "store", None)
        shared = getattr(store, "shared", False)
        self.suppression = SuppressionList(
            os.path.join(state_dir, suppression_file) if state_dir else "",
            options.delivery.suppression_ttl,
            redis=(lambda: getattr(store, "redis", None)) if shared else None,
            redis_key=f"{getattr(store, 'prefix', 'dcrouter')}:suppression")
        self.reputation = SenderReputation(options.delivery.reputation_window)
        #: Destinations to transports, with the rules in force (``rules``: the DomainRouter).
        self.transports = TransportResolver(options, rules, state_dir)
        self.in_flight: dict[str, QueueItem] = {}
        self.dest_in_flight: collections.Counter[str] = collections.Counter()
        self.workers: dict[Transport, DestinationWorker] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self.notices = Notices(self)
        self._pumping = False
        self._pump_again = False
        self._loop: Optional[task.LoopingCall] = None
        self._sync_loop: Optional[task.LoopingCall] = None
        self._drain_waiters: list[defer.Deferred] = []
        queue.add_listener(self.wake)

    # -- service --------------------------------------------------------------------
    @property
    def delivery(self) -> Any:
        """The ``[email.delivery]`` options."""
        return self.options.delivery

    def startService(self) -> None:
        """Load the suppression list and start looking for due items."""
        super().startService()
        self.queue.when_ready().addCallback(lambda _: self.suppression.load()).addErrback(
            lambda f: log.failure("suppression list not loaded", f))
        self._loop = task.LoopingCall(self._pump)
        self._loop.clock = self.reactor
        self._loop.start(self.queue.options.check_interval, now=True).addErrback(
            lambda f: log.failure("delivery loop stopped", f))
        if self.suppression.path:
            # other worker processes' bounces (their own suppression files)
            self._sync_loop = task.LoopingCall(self.suppression.sync)
            self._sync_loop.clock = self.reactor
            self._sync_loop.start(SUPPRESSION_SYNC_INTERVAL, now=False)

    def stopService(self) -> Optional[defer.Deferred]:
        """Stop taking items; wait a little for deliveries in flight."""
        super().stopService()
        for loop in (self._loop, self._sync_loop):
            if loop is not None and loop.running:
                loop.stop()
        if not self.in_flight:
            return None
        d = self.drain()
        timeout = self.reactor.callLater(5.0, d.cancel)
        d.addErrback(lambda f: None)
        d.addBoth(lambda _: timeout.cancel() if timeout.active() else None)
        return d

    def use_rules(self, rules: RuleLookup) -> None:
        """Resolve queued destinations with ``rules`` (the processor's table, built-in rules
        included)."""
        self.transports.rules = rules

    def update_options(self, options: EmailOptions) -> None:
        """Apply a new ``[email]`` section (limits, timeouts, resolver)."""
        if options.delivery.nameservers != self.options.delivery.nameservers:
            self._mx = None
        self.options = options
        self.transports.update_options(options)
        self.suppression.ttl = options.delivery.suppression_ttl
        self.reputation.window = options.delivery.reputation_window

    def add_observer(self, observer: Any) -> None:
        """Add an IDeliveryObserver."""
        self.observers.append(observer)

    def drain(self) -> defer.Deferred:
        """Fires when no delivery is in flight."""
        if not self.in_flight:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._drain_waiters.append(d)
        return d

    def get_stats(self) -> dict[str, Any]:
        """In-flight counts, outcome counters, suppression size, per-domain reputation."""
        return {
            "in_flight": len(self.in_flight),
            "in_flight_by_destination": dict(self.dest_in_flight),
            "connections": sum(w.connections for w in self.workers.values()),
            "counters": dict(self.counters),
            "suppressed": len(self.suppression),
            "reputation": self.reputation.get_stats(),
        }

    @property
    def mx(self) -> MxResolver:
        """The MX resolver (built from ``delivery.nameservers`` on first use)."""
        if self._mx is None:
            resolver = self._resolver or make_resolver(self.delivery.nameservers)
            self._mx = MxResolver(resolver, timeout=min(10.0, self.delivery.connect_timeout))
        return self._mx

    # -- scheduling -------------------------------------------------------------------
    def wake(self) -> None:
        """Items may be due: look soon (not re-entrantly)."""
        if self.running:
            self.reactor.callLater(0, self._pump)

    def _accept(self, item: QueueItem) -> bool:
        return self.dest_in_flight[item.destination] < self.delivery.per_destination_concurrency * 2

    def _pump(self) -> None:
        if not self.running:
            return
        if self._pumping:
            self._pump_again = True
            return
        free = self.delivery.concurrent_deliveries - len(self.in_flight)
        if free <= 0:
            return
        self._pumping = True
        d = self.queue.claim(free, self._accept)
        d.addCallback(self._start_all)
        d.addErrback(lambda f: log.failure("could not take items from the queue", f))

        def done(_: Any) -> None:
            self._pumping = False
            if self._pump_again:
                self._pump_again = False
                self._pump()
        d.addBoth(done)

    def _start_all(self, items: list[QueueItem]) -> None:
        for item in items:
            if item.id in self.in_flight:
                continue
            self.in_flight[item.id] = item
            self.dest_in_flight[item.destination] += 1
            defer.ensureDeferred(self._deliver(item)).addErrback(self._crashed, item.id)

    @staticmethod
    def _crashed(failure: Any, item_id: str) -> None:
        log.failure("delivery of {queue_id} crashed", failure, queue_id=item_id)

    def _finished(self, item: QueueItem) -> None:
        self.in_flight.pop(item.id, None)
        self.dest_in_flight[item.destination] -= 1
        if self.dest_in_flight[item.destination] <= 0:
            del self.dest_in_flight[item.destination]
        if not self.in_flight:
            waiters, self._drain_waiters = self._drain_waiters, []
            for d in waiters:
                d.callback(None)
        self.wake()

    # -- one item -----------------------------------------------------------------------------
    def _notify(self, method: str, *args: Any) -> None:
        for observer in list(self.observers):
            try:
                getattr(observer, method)(*args)
            except Exception:
                log.failure("delivery observer {observer!r} failed in {method}",
                            observer=observer, method=method)

    async def _deliver(self, item: QueueItem) -> None:
        try:
            await self._attempt(item)
        finally:
            self._finished(item)

    async def _attempt(self, item: QueueItem) -> None:
        item.attempts += 1
        self._notify("on_delivery_start", item)
        recipients = [r.address for r in item.open_recipients]
        results: dict[str, Outcome] = {}
        body = Payload(lambda: self.queue.read_body(item),
                       lambda data, smtp: self._prepare(item, data, smtp),
                       in_thread=item.dkim is not None)
        try:
            groups = self.transports.resolve(item, recipients)
            for group in groups:
                if group.transport is None:
                    log.info("{queue_id} not resolved: {reason}", queue_id=item.id,
                             reason=group.error, correlation_id=item.correlation_id)
                    results.update({r: Outcome(-1, group.error, False, False)
                                    for r in group.recipients})
            sendable = [g for g in groups if g.transport is not None]
            if sendable:
                await body.read()
                done = await defer.gatherResults(
                    [defer.ensureDeferred(self._send_group(item, g, body)) for g in sendable],
                    consumeErrors=True)
                for outcomes in done:
                    results.update(outcomes)
        except DeliveryError as e:
            code, text, permanent = _error_outcome(e)
            results = {r: Outcome(code, text, False, permanent) for r in recipients}
        except Exception as e:
            if isinstance(e, defer.FirstError):
                e = e.subFailure.value  # type: ignore[assignment]
            log.failure("delivery of {queue_id} failed unexpectedly", queue_id=item.id,
                        correlation_id=item.correlation_id)
            results = {r: Outcome(-1, f"451 4.3.0 internal error: {type(e).__name__}", False,
                                  False) for r in recipients}
        await self._record(item, results, body)

    async def _send_group(self, item: QueueItem, group: Resolution, body: "Payload"
                          ) -> dict[str, Outcome]:
        transport = group.transport
        assert transport is not None
        try:
            data = await body.prepared(transport.smtp)
            return await self._send(item, transport, data, group.recipients)
        except DeliveryError as e:
            code, text, permanent = _error_outcome(e)
            return {r: Outcome(code, text, False, permanent) for r in group.recipients}

    def _prepare(self, item: QueueItem, data: bytes, smtp: bool) -> bytes:
        """Line discipline for SMTP, then the DKIM signature over exactly those bytes."""
        if smtp:
            data = normalise(data)
        if item.dkim is not None:
            data = self._sign(item, data)
        return data

    def _sign(self, item: QueueItem, data: bytes) -> bytes:
        """The DKIM signature the processor decided on (:mod:`dkimsign`); unsigned on trouble."""
        data, ok = dkimsign.signed(self.dkim_keys, item.dkim, data, item.id,
                                   item.correlation_id)
        # _prepare may run in a thread: count in the reactor
        self.reactor.callFromThread(self.counters.update,
                                    {"dkim_signed" if ok else "dkim_unsigned": 1})
        return data

    async def _record(self, item: QueueItem, results: dict[str, Outcome], body: "Payload"
                      ) -> None:
        sender_domain = item.mail_from.rpartition("@")[2]
        newly_failed = []
        errors = []
        by_address = {r.address: r for r in item.recipients}
        for address, outcome in results.items():
            rcpt = by_address.get(address)
            if rcpt is None:
                continue
            rcpt.code, rcpt.message = outcome.code, outcome.message
            if outcome.delivered:
                rcpt.status = DELIVERED
                self.reputation.record(sender_domain, "sent")
                self.counters["delivered"] += 1
                log.info("delivered {queue_id} to {recipient}: {reply}", queue_id=item.id,
                         recipient=address, reply=outcome.message[:200],
                         correlation_id=item.correlation_id)
            elif outcome.permanent:
                rcpt.status = FAILED
                newly_failed.append(rcpt)
                errors.append(outcome.message)
            else:
                errors.append(outcome.message)
        if not item.finished and item.attempts > self.queue.options.max_retries:
            for rcpt in item.open_recipients:
                rcpt.status = FAILED
                rcpt.message = (f"{rcpt.message or 'temporary failure'} "
                                f"(gave up after {item.attempts} attempts)")
                newly_failed.append(rcpt)
        for rcpt in newly_failed:
            verdict = classify(rcpt.code, rcpt.message)
            self.counters["failed"] += 1
            self.reputation.record(sender_domain, "bounced")
            if verdict.permanent and verdict.hard:
                self.suppression.add(rcpt.address, rcpt.message)
            log.warn("failed {queue_id} to {recipient} ({kind}, {status}): {reply}",
                     queue_id=item.id, recipient=rcpt.address, kind=verdict.kind,
                     status=verdict.status, reply=rcpt.message[:300],
                     correlation_id=item.correlation_id)
        await self.notices.after_attempt(item, results, newly_failed, body)
        if item.finished:
            await self.queue.complete(item)
            if item.status == DELIVERED:
                self._notify("on_delivery_success", item, results)
            else:
                self._notify("on_delivery_failed", item, item.last_error or
                             (newly_failed[0].message if newly_failed else ""), True)
        else:
            error = errors[0] if errors else "deferred"
            self.counters["deferred"] += 1
            self.reputation.record(sender_domain, "deferred")
            await self.notices.after_deferral(item, body)
            await self.queue.defer_item(item, error)
            log.info("deferred {queue_id} (attempt {attempts}): {reply}", queue_id=item.id,
                     attempts=item.attempts, reply=error[:300],
                     correlation_id=item.correlation_id)
            self._notify("on_delivery_failed", item, error, False)

    # -- sending --------------------------------------------------------------------------------
    async def _send(self, item: QueueItem, transport: Transport, data: bytes,
                    recipients: list[str]) -> dict[str, Outcome]:
        if transport.kind == "local":
            return await self._send_local(transport, data, recipients, item.mail_from)
        if not transport.smtp:
            raise PermanentDeliveryError(f"554 5.3.5 unknown transport {transport.kind!r}")
        worker = self.workers.get(transport)
        if worker is None:
            worker = self.workers[transport] = DestinationWorker(transport)
        job = Job(item.id, item.mail_from, recipients, data, item.correlation_id,
                  envelope_dsn(item))
        worker.jobs.append(job)
        self._ensure_connections(worker)
        results: dict[str, Outcome] = await job.deferred
        return results

    async def _send_local(self, transport: Transport, data: bytes, recipients: list[str],
                          mail_from: str = "") -> dict[str, Outcome]:
        root = transport.local_path or os.path.join(self.state_dir or ".", "mail")
        results = {}
        for rcpt in recipients:
            try:
                path = await threads.deferToThread(maildir.deliver, root, rcpt, data,
                                                    maildir.new_name(), mail_from)
                results[rcpt] = Outcome(250, f"250 2.0.0 stored in {os.path.basename(path)}",
                                        True, False, final=True)
            except PermanentDeliveryError as e:
                results[rcpt] = Outcome(550, str(e), False, True)
            except OSError as e:
                results[rcpt] = Outcome(-1, f"451 4.3.0 maildir write failed: {e.strerror}",
                                        False, False)
        return results

    def _ensure_connections(self, worker: DestinationWorker) -> None:
        limit = self.delivery.per_destination_concurrency
        while worker.jobs and worker.connections < limit and (
                worker.connections == 0 or len(worker.jobs) > worker.connections):
            worker.connections += 1
            defer.ensureDeferred(self._connection(worker)).addErrback(
                lambda f: log.failure("connection worker failed", f))

    async def _hosts(self, worker: DestinationWorker) -> list[tuple[str, str, int]]:
        transport = worker.transport
        if transport.kind == "forward":
            return [(transport.server, transport.server, transport.port)]
        hosts = await self.mx.hosts_for(transport.server)
        return [(name, ip, self.delivery.mx_port) for name, ip in hosts]

    def _settings(self, worker: DestinationWorker, host: str) -> ClientSettings:
        transport = worker.transport
        if transport.require_tls:
            context = ssl.optionsForClientTLS(host,
                                              trustRoot=self._trust_root(transport.ca_path))
        elif transport.kind == "mx" and self.delivery.verify_certificates:
            context = ssl.optionsForClientTLS(host,
                                              trustRoot=self._trust_root(self.delivery.ca_path))
        else:
            context = ssl.CertificateOptions()
        credentials = transport.credentials
        return ClientSettings(identity=self.delivery.helo_name or self.options.hostname,
                              command_timeout=self.delivery.command_timeout, context=context,
                              require_tls=transport.require_tls,
                              auth_user=credentials.user if credentials else "",
                              auth_password=credentials.password if credentials else "",
                              reuse_limit=max(1, self.delivery.connection_reuse), host=host)

    @staticmethod
    def _trust_root(ca_path: str) -> Any:
        if not ca_path:
            return ssl.platformTrust()
        with open(ca_path, "rb") as f:
            pem = f.read()
        certs = []
        marker = b"-----END CERTIFICATE-----"
        for chunk in pem.split(marker):
            if b"-----BEGIN CERTIFICATE-----" in chunk:
                certs.append(ssl.Certificate.loadPEM(chunk + marker + b"\n"))
        return ssl.trustRootFromCertificates(certs)

    async def _connection(self, worker: DestinationWorker) -> None:
        # a connection that reached no host must not open another one in its place while
        # siblings still try: the last of them defers what is waiting (no reconnect loop)
        gave_up = False
        try:
            try:
                hosts = await self._hosts(worker)
            except DeliveryError as e:
                code, text, permanent = _error_outcome(e)
                self._fail_waiting(worker, code, text, permanent, only_if_alone=False)
                return
            index = 0
            last_error = "no host to deliver to"
            while worker.jobs and index < len(hosts):
                name, address, port = hosts[index]
                client = DeliveryClient(self._settings(worker, name), worker, self.counters)
                endpoint = endpoints.HostnameEndpoint(self.reactor, address, port,
                                                      timeout=self.delivery.connect_timeout)
                try:
                    await endpoint.connect(OneConnection(client))
                except Exception as e:
                    last_error = (f"connect to {name}[{address}]:{port} failed: "
                                  f"{type(e).__name__}: {e}")
                    log.info("{error}", error=last_error)
                    index += 1
                    continue
                await client.done
                self.counters["connections"] += 1
                if client.pulled:
                    continue  # progress: go on with the same host while jobs wait
                last_error = f"{name}[{address}]:{port}: {client.error or 'session failed'}"
                index += 1
            if worker.jobs:
                gave_up = True
                self._fail_waiting(worker, -1, f"451 4.4.1 {last_error}"
                                   if not has_reply_code(last_error) else last_error, False,
                                   only_if_alone=True)
        finally:
            worker.connections -= 1
            if worker.jobs and not (gave_up and worker.connections > 0):
                self._ensure_connections(worker)
            elif worker.connections == 0 and self.workers.get(worker.key) is worker:
                del self.workers[worker.key]

    def _fail_waiting(self, worker: DestinationWorker, code: int, text: str, permanent: bool,
                      only_if_alone: bool) -> None:
        if only_if_alone and worker.connections > 1:
            return
        while worker.jobs:
            worker.jobs.popleft().fail_all(code, text, permanent)


__all__ = ["MultiModeDeliverySystem", "DestinationWorker", "TransientDeliveryError"]

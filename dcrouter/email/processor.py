"""MultiModeProcessor: relay policy and limits at RCPT, then route, scan, transform, enqueue.

The SMTP server calls it through :class:`dcrouter.interfaces.IMessageHandler`:

* ``check_sender`` (MAIL FROM) starts a transaction and takes the
  message-level rate-limit tokens (global, per client IP, per AUTH user).
* ``check_recipient`` (RCPT TO) applies the relay policy (Postfix model: a
  client that is neither authenticated nor in ``relay_networks`` may only
  send to addresses a domain rule matches), the recipient checks of
  :mod:`dcrouter.email.recipients` (sender-specified routing, Maildir names,
  recipient lists and plug-ins, postmaster), the suppression list, the rule's
  ``max_recipients_per_message``, queue back-pressure and the rule's rate
  limit - each refusal a :class:`~dcrouter.errors.PolicyRejection` with the
  SMTP reply.
* ``handle_message`` (end of DATA) splits the recipients by matched rule and
  runs each group through the same stages - scan, transform, sign, enqueue -
  with the stages its mode enables:

  ========  =====  =========  =========================================
  mode      scan   transform  delivery (resolved at delivery time)
  ========  =====  =========  =========================================
  forward   -      -          ``forward`` to the rule's target
  mta       -      -          ``local`` Maildir or ``mx``
  process   yes    yes        ``forward`` if a target, else as mta
  ========  =====  =========  =========================================

  Whether a group is DKIM-signed at delivery, and with which ``d=``, is
  decided here too (:mod:`dcrouter.email.signing`): only for sessions that
  may relay, only with a configured domain aligned with ``From:``.

  The queue request names the rule (its pattern), not a resolved route: the
  delivery system looks the target and its credentials up at every attempt
  (:mod:`dcrouter.delivery.transport`), so nothing secret is queued.

  Scanning runs before the reply to DATA (:mod:`dcrouter.email.scanning.runner`,
  the built-in scanners' work in killable worker processes): a ``reject``
  verdict raises ``550 5.7.1``, a passed scan limit ``554 5.7.1``, a failed
  scanner ``451 4.7.0`` (``scan_fail_mode = "closed"``), and nothing is queued.  Groups without changes share the
  spool file as their body; changed groups get their own file.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Optional

from twisted.internet import defer, threads

from dcrouter.config.email import (
    DomainRuleOptions, EmailOptions, MtaOptions, ScannerOptions, check_address_pattern,
)
from dcrouter.delivery.transport import transport_for_rule
from dcrouter.email.authcheck import InboundAuthChecker
from dcrouter.email.ratelimit import make_rate_limiter
from dcrouter.email.recipients import RecipientPolicy, is_postmaster
from dcrouter.email.routing import ANY_DOMAIN, DomainRouter, pattern_rank, split_address
from dcrouter.email.scanning import (
    ClamdClient, ScanContext, ScanResult, ScanRunner, SpamdClient, build_scanner, mime,
)
from dcrouter.email.signing import SigningDecider
from dcrouter.email.transform import TransformContext, build_transformation
from dcrouter.errors import ConfigError, PolicyRejection, QueueFullError
from dcrouter.interfaces import IMessageHandler
from dcrouter.logsetup import get_logger
from dcrouter.message import (
    RULE_DESTINATION, DeliveryRequest, DkimSigning, ReceivedMessage, SessionInfo,
)
from dcrouter.psl import suffix_list
from zope.interface import implementer

log = get_logger("email.processor")

#: Headers dcrouter sets after scanning; incoming copies are removed first.
SCAN_HEADERS = ("X-Spam-Status", "X-Spam-Score", "X-Dcrouter-Scan")

#: Open transactions remembered at most (sessions that vanish mid-transaction age out).
MAX_TRANSACTIONS = 50000


@dataclasses.dataclass
class _Transaction:
    """Per-transaction state between MAIL FROM and the end of DATA."""

    mail_from: str
    recipients_per_rule: dict[str, int] = dataclasses.field(default_factory=dict)


class RulePipeline:
    """A rule's stages, built once: its scanners (with options) and transformations."""

    def __init__(self, rule: Optional[DomainRuleOptions], path: str, processor: "MultiModeProcessor"
                 ) -> None:
        self.rule = rule
        self.scanners: list[tuple[Any, Optional[ScannerOptions]]] = []
        self.transformations: list[Any] = []
        if rule is None or rule.mode != "process":
            return
        if rule.content_scanning:
            for k, opts in enumerate(rule.scanners):
                self.scanners.append((build_scanner(opts, processor.spamd, processor.clamd,
                                                    f"{path}.scanners[{k}]",
                                                    processor.scan_runner.analysis), opts))
            for plugin in processor.context.extensions.scanners:
                self.scanners.append((plugin, None))
        for j, t in enumerate(rule.transformations):
            self.transformations.append(build_transformation(
                t, f"{path}.transformations[{j}]", processor.context.extensions.transformations))

    @property
    def changes_message(self) -> bool:
        """Does this pipeline write its own copy of the message?"""
        return bool(self.scanners or self.transformations)


@dataclasses.dataclass
class _Group:
    """One rule's recipients of one message, on its way through the stages."""

    key: str
    rule: Optional[DomainRuleOptions]
    pipeline: RulePipeline
    recipients: list[str]
    mode: str
    message: Any = None
    scan_results: list[ScanResult] = dataclasses.field(default_factory=list)
    scan_error: bool = False
    subject_prefixes: list[str] = dataclasses.field(default_factory=list)
    body_path: str = ""
    dkim_signed: bool = False   # a dkim_sign transformation signed the body already


@implementer(IMessageHandler)
class MultiModeProcessor:
    """Decides, per recipient, how mail is handled, and hands it to the queue."""

    def __init__(self, options: EmailOptions, domain_router: DomainRouter, queue: Any,
                 context: Any, suppression: Any = None) -> None:
        self.context = context
        self.reactor = context.reactor
        self.domain_router = domain_router
        self.queue = queue
        self.suppression = suppression
        self.limiter = make_rate_limiter(options, reactor=self.reactor)
        self._transactions: "collections.OrderedDict[str, _Transaction]" = \
            collections.OrderedDict()
        self.stats: collections.Counter = collections.Counter()
        self.rejections: collections.Counter = collections.Counter()
        self.scan_verdicts: dict[str, collections.Counter] = collections.defaultdict(
            collections.Counter)
        self.signing = SigningDecider(context.dkim_keys)
        self.scan_runner = ScanRunner(self.reactor, self.scan_verdicts)
        self._pipelines: dict[int, tuple[DomainRuleOptions, RulePipeline]] = {}
        self.options = options
        self._apply(options)

    # -- configuration -----------------------------------------------------------

    def _apply(self, options: EmailOptions) -> None:
        self.spamd = SpamdClient.from_options(self.reactor, options.spamd) \
            if options.spamd is not None else None
        self.clamd = ClamdClient.from_options(self.reactor, options.clamd) \
            if options.clamd is not None else None
        pipelines = {}
        for i, rule in enumerate(options.domain_rules):
            pipelines[id(rule)] = (rule, RulePipeline(rule, f"email.domain_rules[{i}]", self))
        self._pipelines = pipelines
        self._default_pipeline = RulePipeline(None, "email", self)
        self.scan_runner.configure(options)
        self.recipient_policy = RecipientPolicy(options.domain_rules, options.hostname,
                                                options.case_sensitive)
        self._postmaster_rule = _postmaster_rule(options.hostname)
        auth = options.inbound_auth
        self.auth_checker: Optional[InboundAuthChecker] = None
        if auth.enabled or any(r.reject_on_dmarc_fail for r in options.domain_rules):
            self.auth_checker = InboundAuthChecker(options.hostname, options.delivery.nameservers,
                                                   auth.timeout, options.max_message_size,
                                                   suffix_list(auth.public_suffix_list))
        self.signing.configure(options)   # last: its ConfigError leaves it unchanged
        self.options = options

    def update_options(self, email: EmailOptions) -> None:
        """Apply a new ``[email]`` section (ConfigError leaves the old one in force)."""
        old = self.options, self._pipelines
        try:
            self._apply(email)
        except ConfigError:
            self.options, self._pipelines = old
            raise

    def _pipeline(self, rule: Optional[DomainRuleOptions]) -> RulePipeline:
        if rule is None:
            return self._default_pipeline
        entry = self._pipelines.get(id(rule))
        if entry is None or entry[0] is not rule:  # a rule added at runtime through the API
            index = len(self._pipelines)
            entry = (rule, RulePipeline(rule, f"email.domain_rules[{index}]", self))
            self._pipelines[id(rule)] = entry
        return entry[1]

    # -- routes ------------------------------------------------------------------

    def _destination(self, rule: Optional[DomainRuleOptions], recipient: str) -> str:
        """The scheduling key of mail for ``recipient`` under ``rule`` (the queue's limits).

        Only a key: the queue holds the rule reference, and the delivery system
        resolves the transport (target, TLS, credentials) at every attempt.
        """
        return transport_for_rule(rule, self.options, self.context.state_dir,
                                  split_address(recipient)[1]).destination

    def get_rule(self, pattern: str) -> Optional[DomainRuleOptions]:
        """The rule in force with ``pattern``, the built-in postmaster rule included
        (:class:`dcrouter.delivery.transport.RuleLookup`: delivery resolves queued mail so)."""
        rule = self.domain_router.get_rule(pattern)
        builtin = self._postmaster_rule
        if rule is None and builtin is not None and pattern == builtin.pattern:
            return builtin
        return rule

    def match_rule(self, address: str) -> Optional[DomainRuleOptions]:
        """The rule handling mail to ``address`` now (RuleLookup; DSNs are routed so)."""
        return self._rule_for(address)

    def _rule_for(self, recipient: str) -> Optional[DomainRuleOptions]:
        """The matching rule; for ``postmaster@<hostname>`` that no rule matches, the
        built-in one delivering to the Maildir ``postmaster`` (RFC 5321 4.5.1)."""
        rule = self.domain_router.match_rule(recipient)
        if rule is None and self._postmaster_rule is not None \
                and is_postmaster(recipient, self.options.hostname):
            return self._postmaster_rule
        return rule

    # -- SMTP envelope checks ------------------------------------------------------

    def _transaction(self, session: SessionInfo, mail_from: str) -> _Transaction:
        txn = self._transactions.get(session.correlation_id)
        if txn is None:
            txn = _Transaction(mail_from)
            self._transactions[session.correlation_id] = txn
            if len(self._transactions) > MAX_TRANSACTIONS:
                self._transactions.popitem(last=False)
        return txn

    def _message_limits(self, session: SessionInfo) -> list[tuple[str, int]]:
        limits = []
        rl = self.options.rate_limits
        if rl.max_messages_per_minute:
            limits.append(("global", rl.max_messages_per_minute))
        if rl.max_messages_per_minute_per_ip and session.client_ip:
            limits.append((f"ip:{session.client_ip}", rl.max_messages_per_minute_per_ip))
        if rl.max_messages_per_minute_per_user and session.auth_user:
            limits.append((f"user:{session.auth_user}", rl.max_messages_per_minute_per_user))
        return limits

    def _rate_refused(self, key: str, session: SessionInfo) -> PolicyRejection:
        scope = key.split(":", 1)[0]
        self.rejections["rate_limit"] += 1
        log.info("rate limit {scope} reached for {client_ip}", scope=scope,
                 client_ip=session.client_ip, correlation_id=session.correlation_id)
        return PolicyRejection(451, "4.7.1", "Rate limit exceeded, try again later",
                               reason="rate_limit", scope=scope)

    @defer.inlineCallbacks
    def check_sender(self, session: SessionInfo, mail_from: str) -> Any:
        """Start a transaction; take the global, per-IP and per-user message tokens."""
        self._transactions.pop(session.correlation_id, None)
        limits = self._message_limits(session)
        if limits:
            empty = yield self.limiter.acquire(limits)
            if empty is not None:
                raise self._rate_refused(empty, session)
        self._transaction(session, mail_from)
        return None

    @defer.inlineCallbacks
    def check_recipient(self, session: SessionInfo, mail_from: str, recipient: str) -> Any:
        """Relay policy, recipient checks, suppression, per-rule recipient cap, queue room,
        per-rule rate."""
        rule = self._rule_for(recipient)
        if not session.may_relay and (rule is None or not _names_a_domain(rule)):
            self.rejections["relay"] += 1
            log.info("relay denied for {recipient} from {client_ip}", recipient=recipient,
                     client_ip=session.client_ip, correlation_id=session.correlation_id)
            raise PolicyRejection(554, "5.7.1", "Relay access denied", reason="relay")
        try:
            yield self.recipient_policy.check(session, recipient, rule)
        except PolicyRejection as e:
            self.rejections[e.reason] += 1
            raise
        if self.suppression is not None and self.suppression.is_suppressed(recipient):
            self.rejections["suppressed"] += 1
            raise PolicyRejection(550, "5.1.1", f"<{recipient}>: recipient suppressed after "
                                  "permanent delivery failures", reason="suppressed")
        txn = self._transaction(session, mail_from)
        key = rule.pattern if rule is not None else ""
        seen = txn.recipients_per_rule.get(key, 0)
        limits = rule.rate_limits if rule is not None else None
        if limits is not None and limits.max_recipients_per_message is not None \
                and seen >= limits.max_recipients_per_message:
            self.rejections["recipients"] += 1
            raise PolicyRejection(452, "4.5.3", "Too many recipients", reason="recipients")
        check_capacity = getattr(self.queue, "check_capacity", None)
        try:
            if check_capacity is not None:
                check_capacity([self._destination(rule, recipient)])
        except QueueFullError:
            self.rejections["queue_full"] += 1
            raise PolicyRejection(452, "4.3.1", "Insufficient system storage",
                                  reason="queue_full") from None
        if seen == 0 and limits is not None and limits.max_messages_per_minute:
            empty = yield self.limiter.acquire([(f"rule:{key}", limits.max_messages_per_minute)])
            if empty is not None:
                raise self._rate_refused(empty, session)
        txn.recipients_per_rule[key] = seen + 1
        return None

    # -- the message -----------------------------------------------------------------

    def _groups(self, message: ReceivedMessage) -> list[_Group]:
        groups: dict[str, _Group] = {}
        for rcpt in message.recipients:
            rule = self._rule_for(rcpt)
            key = rule.pattern if rule is not None else ""
            group = groups.get(key)
            if group is None:
                mode = rule.mode if rule is not None else self.options.default_mode
                pipeline = self._pipeline(rule)
                group = groups[key] = _Group(key, rule, pipeline, [], mode)
            group.recipients.append(rcpt)
        return list(groups.values())

    @defer.inlineCallbacks
    def handle_message(self, message: ReceivedMessage) -> Any:
        """Route, scan, transform and enqueue; fires with the queue ids (durable)."""
        session = message.session
        self._transactions.pop(session.correlation_id, None)
        cid = session.correlation_id
        created: list[str] = []
        try:
            groups = self._groups(message)
            base_path = message.spool_path
            if self.auth_checker is not None:
                base_path = yield self._authenticate(message, groups, created)
            for group in groups:
                if group.pipeline.scanners:
                    yield self._scan(group, message, base_path)
            for n, group in enumerate(groups):
                if group.pipeline.changes_message:
                    group.body_path = yield self._rewrite(group, message, base_path, n, created)
                else:
                    group.body_path = base_path
            requests = []
            authors: dict[str, Optional[str]] = {}
            for n, group in enumerate(groups):
                dkim = None
                if self.signing.active and not group.dkim_signed:
                    dkim = yield self.signing.decide(session, group.rule, group.body_path,
                                                     authors)
                size = message.size if group.body_path == message.spool_path else \
                    os.path.getsize(group.body_path)
                # the rule is kept by reference (its pattern); MX mail is split per domain
                hop = transport_for_rule(group.rule, self.options, self.context.state_dir)
                key = "" if hop.kind == "mx" else hop.destination
                requests.append(DeliveryRequest(
                    queue_id=message.queue_id if n == 0 else f"{message.queue_id}-{n}",
                    mode=group.mode, rule_pattern=group.key, mail_from=message.mail_from,
                    recipients=list(group.recipients), via=RULE_DESTINATION,
                    body_path=group.body_path, correlation_id=cid, size=size,
                    destination=key, dkim=dkim, dsn=message.dsn))
            ids = yield self.queue.enqueue(requests)
        except PolicyRejection as e:
            self.rejections[e.reason] += 1
            self._cleanup(created)
            log.info("message {queue_id} rejected: {reason}", queue_id=message.queue_id,
                     reason=e.reason, code=e.code, correlation_id=cid)
            raise
        except QueueFullError:
            self._cleanup(created)
            self.rejections["queue_full"] += 1
            raise PolicyRejection(452, "4.3.1", "Insufficient system storage",
                                  reason="queue_full") from None
        except BaseException:
            self._cleanup(created)
            raise
        if all(g.body_path != message.spool_path for g in groups):
            # every part has its own body: the queue holds no claim on the spool file
            self._cleanup([message.spool_path])
        self.stats["messages"] += 1
        for group in groups:
            self.stats[f"mode_{group.mode}"] += 1
        log.info("message {queue_id} queued as {ids}", queue_id=message.queue_id, ids=ids,
                 groups=len(groups), correlation_id=cid)
        return list(ids)

    @staticmethod
    def _cleanup(paths: list[str]) -> None:
        for path in paths:
            try:
                os.unlink(path)
            except OSError:
                pass

    @defer.inlineCallbacks
    def _authenticate(self, message: ReceivedMessage, groups: list[_Group],
                      created: list[str]) -> Any:
        """SPF/DKIM/DMARC; returns the path of the spool file with Authentication-Results."""
        session = message.session
        assert self.auth_checker is not None
        results = yield self.auth_checker.check(message.spool_path, session.client_ip,
                                                session.helo, message.mail_from)
        self.stats[f"dmarc_{results.dmarc}"] += 1
        if results.dmarc_rejects and any(g.rule is not None and g.rule.reject_on_dmarc_fail
                                         for g in groups):
            raise PolicyRejection(550, "5.7.1", "Message rejected: DMARC policy of the sender's "
                                  "domain", reason="dmarc")
        if not self.options.inbound_auth.enabled:
            return message.spool_path
        path = message.spool_path + ".ar"
        created.append(path)
        yield threads.deferToThread(_prepend_file, message.spool_path, path, results.header())
        return path

    @defer.inlineCallbacks
    def _scan(self, group: _Group, message: ReceivedMessage, base_path: str) -> Any:
        """Run the group's scanners (scanning.runner): reject, tempfail, or tag."""
        session = message.session
        context = ScanContext(mail_from=message.mail_from, recipients=group.recipients,
                              size=message.size, spool_path=base_path, session=session,
                              rule_pattern=group.key, correlation_id=session.correlation_id)
        outcome = yield self.scan_runner.run(
            group.pipeline.scanners, context,
            lambda: threads.deferToThread(mime.parse_file, base_path))
        group.message = outcome.message
        group.scan_results = outcome.results
        group.scan_error = outcome.scan_error
        group.subject_prefixes = outcome.subject_prefixes

    @defer.inlineCallbacks
    def _rewrite(self, group: _Group, message: ReceivedMessage, base_path: str, n: int,
                 created: list[str]) -> Any:
        """Tag headers and transformations; writes the group's own body file."""
        if group.message is None:
            group.message = yield threads.deferToThread(mime.parse_file, base_path)
        msg = group.message
        if group.scan_results:
            _apply_scan_headers(msg, group)
        context = TransformContext(mail_from=message.mail_from, recipients=group.recipients,
                                   rule_pattern=group.key, dkim_keys=self.context.dkim_keys,
                                   correlation_id=message.session.correlation_id,
                                   session=message.session, dkim_signer=self.signing)
        if self.signing.active:
            yield self.signing.wait_ready()
        for transformation in group.pipeline.transformations:
            if getattr(transformation, "thread_safe", False):
                yield threads.deferToThread(transformation.transform, msg, context)
            else:
                yield defer.maybeDeferred(transformation.transform, msg, context)
        group.dkim_signed = bool(context.dkim_signed)
        path = f"{message.spool_path}.{n}"
        created.append(path)
        yield threads.deferToThread(_write_message, path, msg, context.prepend)
        return path

    def close(self) -> defer.Deferred:
        """Release the rate limiter's Redis connection (call when the gateway stops)."""
        return defer.maybeDeferred(self.limiter.close)

    def get_stats(self) -> dict:
        """Messages, modes, scanner verdicts, refusals by reason, limiter and routing figures."""
        return {"messages": self.stats["messages"],
                "counters": dict(self.stats),
                "rejections": dict(self.rejections),
                "scan_verdicts": {name: dict(v) for name, v in self.scan_verdicts.items()},
                "scan_workers": self.scan_runner.pool.get_stats(),
                "open_transactions": len(self._transactions),
                "rate_limits": self.limiter.get_stats(),
                "routing": self.domain_router.get_stats(),
                "dkim": self.signing.get_stats()}


def _names_a_domain(rule: DomainRuleOptions) -> bool:
    """Does the rule's pattern end in a literal domain label (``*@example.com``,
    ``*@*.example.com``)?  Rules like ``*@*`` or ``info@*`` match every domain;
    they do not make dcrouter a relay for clients that may not relay."""
    return pattern_rank(check_address_pattern(rule.pattern, "pattern"))[0] != ANY_DOMAIN


def _apply_scan_headers(msg: Any, group: _Group) -> None:
    for name in SCAN_HEADERS:
        del msg[name]
    spam = next((r for r in group.scan_results if r.scanner == "spam" and r.verdict != "error"),
                None)
    if spam is not None:
        tests = ", ".join(spam.details[:40]) or "none"
        msg["X-Spam-Status"] = (f"{'Yes' if spam.flagged else 'No'}, score={spam.score:.1f} "
                                f"required={spam.threshold or 0:.1f} tests={tests}")
        msg["X-Spam-Score"] = f"{spam.score:.1f}"
    summary = "; ".join(r.summary() for r in group.scan_results)
    msg["X-Dcrouter-Scan"] = ("error; " + summary) if group.scan_error else summary
    if group.subject_prefixes:
        subject = mime.header_text(msg, "Subject") or ""
        prefix = " ".join(p.strip() for p in dict.fromkeys(group.subject_prefixes))
        if not subject.startswith(prefix):
            del msg["Subject"]
            msg["Subject"] = f"{prefix} {subject}".strip()


def _write_message(path: str, msg: Any, prepend: list[bytes]) -> None:
    with open(path, "wb") as f:
        for line in prepend:
            f.write(line)
        f.write(mime.to_bytes(msg))


def _prepend_file(source: str, target: str, head: bytes) -> None:
    """Copy ``source`` to ``target`` with ``head`` first.

    (``Authentication-Results`` fields claiming our authserv-id never reach the
    spool file: :class:`dcrouter.email.spool.ResultsFilter` drops them.)
    """
    with open(source, "rb") as src, open(target, "wb") as dst:
        dst.write(head)
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                break
            dst.write(chunk)


def _postmaster_rule(hostname: str) -> Optional[DomainRuleOptions]:
    """``postmaster@<hostname>`` into the Maildir ``state_dir/mail/postmaster``."""
    try:
        return DomainRuleOptions(pattern=check_address_pattern(f"postmaster@{hostname}",
                                                               "email.hostname"),
                                 mode="mta", mta_options=MtaOptions(allow_local_delivery=True))
    except ConfigError:  # a hostname that makes no pattern: no built-in postmaster
        return None


__all__ = ["MultiModeProcessor", "RulePipeline", "SCAN_HEADERS"]

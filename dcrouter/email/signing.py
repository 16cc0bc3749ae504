"""The processor's DKIM decision: whether an accepted message is signed, and with which key.

:class:`SigningDecider` holds the :class:`~dcrouter.dkimpolicy.SigningPolicy`
of the running configuration and makes sure its keys exist: on every
configuration (start, reload, rule change through the API) it loads or
creates them in a thread; a message waits for that, never triggers it.

For each group of recipients, :meth:`SigningDecider.decide` answers a
:class:`~dcrouter.message.DkimSigning` (``d=``, ``s=``) that goes into the
queue request, or None:

* None when the session may not relay (not authenticated, outside
  ``relay_networks``) - whatever ``MAIL FROM`` or ``From:`` claim;
* None when the route has no signing identity;
* None when the body's ``From:`` is missing, repeated, or names no single
  address whose domain is a signing identity of the route (or, with
  ``email.dkim.sign_subdomains``, a subdomain of one);
* None when that identity's key could not be loaded (logged at start).
"""

from __future__ import annotations

import collections
from typing import Any, Optional

from twisted.internet import defer, threads

from dcrouter.config.email import DomainRuleOptions, EmailOptions
from dcrouter.dkimkeys import DkimKeyStore
from dcrouter.dkimpolicy import SigningIdentity, SigningPolicy, read_author_domain
from dcrouter.logsetup import get_logger
from dcrouter.message import DkimSigning, SessionInfo

log = get_logger("email.dkim")


class SigningDecider:
    """Signing identities of the configuration, their keys, and the per-message decision."""

    def __init__(self, store: DkimKeyStore) -> None:
        self.store = store
        self.policy = SigningPolicy(None)
        self.ready_keys: set[tuple[str, str]] = set()
        self.counters: collections.Counter[str] = collections.Counter()
        self._preparing: Optional[defer.Deferred] = None
        self._generation = 0
        #: Does the configuration sign anything at all? (checked per message: kept cheap)
        self.active = False

    def configure(self, options: EmailOptions) -> None:
        """Switch to ``options`` (ConfigError: nothing changes) and load or create its keys."""
        self.policy = SigningPolicy(options)
        self.active = bool(self.policy.identities())
        self._prepare()


    def _prepare(self) -> None:
        identities = self.policy.identities()
        self._generation += 1
        generation = self._generation
        if not identities:
            self._preparing = None
            return
        d = threads.deferToThread(self.store.ensure, identities)
        self._preparing = d

        def done(ready: set[tuple[str, str]]) -> None:
            if generation == self._generation:
                self.ready_keys = ready
                self._preparing = None
                log.info("DKIM keys ready: {keys}", keys=", ".join(
                    f"{s}._domainkey.{d}" for d, s in sorted(ready)) or "none")

        def failed(failure: Any) -> None:
            log.failure("DKIM keys not loaded", failure)
            if generation == self._generation:
                self._preparing = None
        d.addCallbacks(done, failed)

    def wait_ready(self) -> defer.Deferred:
        """Fires once the keys of the current configuration are loaded (or failed to)."""
        pending = self._preparing
        if pending is None:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()

        def fire(result: Any) -> Any:
            waiter.callback(None)
            return result
        pending.addBoth(fire)
        return waiter

    def key_ready(self, identity: SigningIdentity) -> bool:
        """Was ``identity``'s key loaded for the current configuration?"""
        return identity.name in self.ready_keys

    @defer.inlineCallbacks
    def decide(self, session: SessionInfo, rule: Optional[DomainRuleOptions], body_path: str,
               cache: Optional[dict[str, Optional[str]]] = None) -> Any:
        """A DkimSigning for the group of ``rule`` whose body is ``body_path``, or None.

        ``cache`` (one dict per message) keeps the From: domain of each body file.
        """
        candidates = self.policy.for_rule(rule)
        if not candidates:
            return None
        if not session.may_relay:
            self.counters["not_relay_client"] += 1
            return None
        yield self.wait_ready()
        if cache is not None and body_path in cache:
            author = cache[body_path]
        else:
            try:
                author = yield threads.deferToThread(read_author_domain, body_path)
            except OSError as e:
                log.error("cannot read {path} for DKIM: {error}", path=body_path,
                          error=e.strerror, correlation_id=session.correlation_id)
                author = None
            if cache is not None:
                cache[body_path] = author
        identity = self.policy.choose(author, candidates)
        if identity is None:
            self.counters["not_aligned" if author else "no_from"] += 1
            log.info("not DKIM-signing: {why}", why=(
                f"From: domain {author} is not a signing domain of this route" if author else
                "no single From: address"), correlation_id=session.correlation_id)
            return None
        if identity.name not in self.ready_keys:
            self.counters["no_key"] += 1
            log.error("not DKIM-signing for {domain}: its key {selector} is not loaded",
                      domain=identity.domain, selector=identity.selector,
                      correlation_id=session.correlation_id)
            return None
        self.counters["signed"] += 1
        return DkimSigning(identity.domain, identity.selector)

    def get_stats(self) -> dict[str, Any]:
        """Decisions so far by outcome, and the loaded keys."""
        return {"decisions": dict(self.counters),
                "keys": sorted(f"{s}._domainkey.{d}" for d, s in self.ready_keys)}


__all__ = ["SigningDecider"]

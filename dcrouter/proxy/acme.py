"""Automatic certificates for terminating routes: ACME http-01 with the ``acme`` library.

:class:`AcmeManager` checks every ``check_interval`` seconds which names of
``terminate`` routes (``acme = true``, no ``cert_path``) lack a certificate or
expire within ``renew_threshold_days``, and orders one certificate per name,
one at a time.  The whole exchange with the ACME server (account, order,
challenge, finalize, download) runs in a worker thread via ``deferToThread``
because the ``acme`` library is blocking; the reactor only publishes the
http-01 key authorizations (answered by the proxy's HTTP listeners before any
route) and loads the stored certificate afterwards.

Challenges: ``http-01`` by default; ``dns-01`` for wildcard names (http-01
cannot validate them) and, with ``challenge = "dns-01"``, for every name
inside a zone that the DNS publisher (dcrouter's own DNS server, or an
:class:`~dcrouter.interfaces.IDnsChallengePublisher` plug-in) serves. The
TXT record is published before the ACME server is asked to validate and
withdrawn afterwards. A wildcard name outside every served zone is skipped,
with the reason in the status.

Files: the account key is ``state_dir/acme/account.key``; certificates and
keys are ``state_dir/certs/acme/<name>.crt|.key``.  A failed order backs the
name off for ``retry_backoff`` seconds, doubling per failure (capped at a day).
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable, Optional

from twisted.internet import defer, threads
from twisted.internet.task import LoopingCall

from dcrouter.config.proxy import AcmeOptions
from dcrouter.logsetup import get_logger
from dcrouter.proxy.certs import acme_dir, acme_paths, certificate_expiry
from dcrouter.tlsutil import ensure_private_dir, write_private

log = get_logger("proxy.acme")

MAX_BACKOFF = 86400.0


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class AcmeIssuer:
    """The blocking ACME client (runs only in worker threads)."""

    def __init__(self, options: AcmeOptions, state_dir: str,
                 publish: Callable[[str, Optional[str]], None],
                 dns_publish: Optional[Callable[[str, str, bool], None]] = None) -> None:
        self.options = options
        self.state_dir = state_dir
        self.publish = publish      # (token, key authorization or None to remove); thread-safe
        # (record name, value, present): blocks until the DNS answers carry the change
        self.dns_publish = dns_publish

    def _account_key(self) -> Any:
        import josepy as jose
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        directory = ensure_private_dir(os.path.join(self.state_dir, "acme"))
        path = os.path.join(directory, "account.key")
        if os.path.exists(path):
            with open(path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
        return jose.JWKRSA(key=key)

    def _client(self) -> Any:
        from acme import client, errors, messages
        key = self._account_key()
        verify: Any = self.options.directory_ca_path or True
        net = client.ClientNetwork(key, user_agent="dcrouter", verify_ssl=verify, timeout=30)
        directory = client.ClientV2.get_directory(self.options.directory_url, net)
        acme_client = client.ClientV2(directory, net=net)
        contact = (f"mailto:{self.options.account_email}",) if self.options.account_email else ()
        registration = messages.NewRegistration(contact=contact, terms_of_service_agreed=True)
        try:
            acme_client.new_account(registration)
        except errors.ConflictError as e:     # the key already has an account
            net.account = messages.RegistrationResource(uri=e.location,
                                                        body=messages.Registration())
        return acme_client

    def issue(self, name: str) -> datetime.datetime:
        """Order, validate, finalize and store a certificate for ``name``; returns its expiry."""
        from acme import challenges, crypto_util, messages
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        acme_client = self._client()
        cert_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_pem = cert_key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        order = acme_client.new_order(crypto_util.make_csr(key_pem, [name]))
        tokens: list[str] = []
        records: list[tuple[str, str]] = []
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:   # reused authorization
                    continue
                kind = challenges.DNS01 if self.dns_publish is not None else challenges.HTTP01
                chosen = [c for c in authz.body.challenges if isinstance(c.chall, kind)]
                if not chosen:
                    raise RuntimeError(f"no {kind.typ} challenge offered for {name}")
                challenge = chosen[0]
                response, validation = challenge.response_and_validation(acme_client.net.key)
                if self.dns_publish is not None:
                    record = challenge.chall.validation_domain_name(authz.body.identifier.value)
                    self.dns_publish(record, validation, True)
                    records.append((record, validation))
                else:
                    token = challenge.chall.encode("token")
                    self.publish(token, validation)
                    tokens.append(token)
                acme_client.answer_challenge(challenge, response)
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=90)
            finished = acme_client.poll_and_finalize(order, deadline)
        finally:
            for token in tokens:
                self.publish(token, None)
            for record, validation in records:
                try:
                    self.dns_publish(record, validation, False)  # type: ignore[misc]
                except Exception as e:  # noqa: BLE001 - clean-up must not hide the result
                    log.warn("could not withdraw the challenge at {record}: {error}",
                             record=record, error=repr(e))
        chain = finished.fullchain_pem.encode("ascii")
        ensure_private_dir(acme_dir(self.state_dir))
        cert_path, key_path = acme_paths(self.state_dir, name)
        write_private(key_path, key_pem)
        write_private(cert_path, chain)
        expiry = certificate_expiry(cert_path)
        assert expiry is not None
        return expiry


class _Backoff:
    def __init__(self) -> None:
        self.failures = 0
        self.until = 0.0
        self.last_error = ""


class AcmeManager:
    """Keeps a certificate for every ACME name; never blocks the reactor."""

    def __init__(self, reactor: Any, options: AcmeOptions, state_dir: str,
                 challenges: dict[str, str], on_issued: Callable[[str], None],
                 dns_publisher: Callable[[], Any] = lambda: None) -> None:
        self.reactor = reactor
        self.options = options
        self.state_dir = state_dir
        self.challenges = challenges
        self.on_issued = on_issued
        #: Returns the current IDnsChallengePublisher, or None (services come and go).
        self.dns_publisher = dns_publisher
        #: Names that cannot be ordered now, with the reason (shown in the status).
        self.skipped: dict[str, str] = {}
        self.names: list[str] = []
        self.backoff: dict[str, _Backoff] = {}
        self.expiry: dict[str, Optional[datetime.datetime]] = {}
        self._loop: Optional[LoopingCall] = None
        self._running: Optional[defer.Deferred] = None
        #: The name being ordered right now (shown in the status), or None.
        self.ordering: Optional[str] = None

    def update(self, options: AcmeOptions, names: list[str]) -> None:
        """New options and the names that need certificates."""
        interval_changed = options.check_interval != self.options.check_interval
        self.options = options
        self.names = list(names)
        if interval_changed and self._loop is not None:
            self.stop()

    def start(self) -> None:
        """Check now and then every ``check_interval`` seconds."""
        if self._loop is None:
            self._loop = LoopingCall(self.check)
            self._loop.clock = self.reactor
            self._loop.start(self.options.check_interval, now=True).addErrback(
                lambda f: log.failure("ACME checks stopped", f))
        else:
            self.check()

    def stop(self) -> None:
        """Stop checking (an order in a thread finishes on its own)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _publish(self, token: str, validation: Optional[str]) -> None:
        """From the worker thread: (un)publish a key authorization.

        A single dict store or pop is atomic in CPython, and it must be visible
        before the thread tells the ACME server to validate, so it is done here
        rather than scheduled on the reactor (which may already be stopping).
        """
        if validation is None:
            self.challenges.pop(token, None)
        else:
            self.challenges[token] = validation

    def expires(self, name: str) -> Optional[datetime.datetime]:
        """Expiry of the stored certificate for ``name`` (read from disk once, then cached)."""
        if name not in self.expiry:
            self.expiry[name] = certificate_expiry(acme_paths(self.state_dir, name)[0])
        return self.expiry[name]

    def _dns_for(self, name: str) -> Optional[Any]:
        """The DNS publisher when ``name`` is validated by dns-01, else None."""
        publisher = self.dns_publisher()
        base = name[2:] if name.startswith("*.") else name
        if publisher is None or not publisher.serves(base):
            return None
        if name.startswith("*.") or self.options.challenge == "dns-01":
            return publisher
        return None

    def due(self) -> list[str]:
        """Names without a certificate or within ``renew_threshold_days`` of expiry."""
        now = _now()
        threshold = datetime.timedelta(days=self.options.renew_threshold_days)
        wall = self.reactor.seconds()
        out = []
        for name in self.names:
            state = self.backoff.get(name)
            if state is not None and state.until > wall:
                continue
            if name.startswith("*.") and self._dns_for(name) is None:
                if name not in self.skipped:
                    log.warn("no certificate for {name}: a wildcard needs dns-01, and no zone "
                             "served here contains {base}", name=name, base=name[2:])
                self.skipped[name] = (f"wildcard needs dns-01: no served zone contains "
                                      f"{name[2:]}")
                continue
            self.skipped.pop(name, None)
            expiry = self.expires(name)
            if expiry is None or expiry - now < threshold:
                out.append(name)
        return out

    def _blocking_dns(self, publisher: Any) -> Callable[[str, str, bool], None]:
        """For the worker thread: publish/withdraw through the reactor and wait."""
        from twisted.internet.threads import blockingCallFromThread

        def change(record: str, value: str, present: bool) -> None:
            method = publisher.add_txt if present else publisher.remove_txt
            blockingCallFromThread(self.reactor, method, record, value)
        return change

    def check(self) -> defer.Deferred:
        """Issue what is due, one name after another; fires when done."""
        if self._running is not None:
            return self._running
        self._running = self._issue_all(self.due())

        def done(result: Any) -> Any:
            self._running = None
            return result
        self._running.addBoth(done)
        return self._running

    @defer.inlineCallbacks
    def _issue_all(self, names: list[str]) -> Any:
        for name in names:
            publisher = self._dns_for(name)
            issuer = AcmeIssuer(self.options, self.state_dir, self._publish,
                                self._blocking_dns(publisher) if publisher else None)
            log.info("ordering a certificate for {name} from {directory} ({challenge})",
                     name=name, directory=self.options.directory_url,
                     challenge="dns-01" if publisher else "http-01")
            self.ordering = name
            try:
                expiry = yield threads.deferToThreadPool(
                    self.reactor, self.reactor.getThreadPool(), issuer.issue, name)
            except Exception as e:
                self.ordering = None
                state = self.backoff.setdefault(name, _Backoff())
                state.failures += 1
                delay = min(self.options.retry_backoff * 2 ** (state.failures - 1), MAX_BACKOFF)
                state.until = self.reactor.seconds() + delay
                state.last_error = f"{type(e).__name__}: {e}"
                log.error("certificate order for {name} failed ({error}); next try in "
                          "{delay:.0f}s", name=name, error=state.last_error, delay=delay)
                continue
            self.ordering = None
            self.backoff.pop(name, None)
            self.expiry[name] = expiry
            log.info("certificate for {name} issued, valid until {expiry}", name=name,
                     expiry=expiry.isoformat())
            self.on_issued(name)

    def status(self) -> dict[str, Any]:
        """Per name: expiry of the stored certificate, failures, next attempt."""
        out: dict[str, Any] = {}
        for name in self.names:
            expiry = self.expires(name)
            state = self.backoff.get(name)
            out[name] = {"expires": expiry.isoformat() if expiry else None,
                         "failures": state.failures if state else 0,
                         "last_error": (state.last_error if state else
                                        self.skipped.get(name, "")),
                         "retry_at": state.until if state else None,
                         "ordering": name == self.ordering}
        return out

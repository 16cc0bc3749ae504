"""AUTH (RFC 4954) in an ESMTP session: SASL PLAIN, LOGIN and XOAUTH2 against twisted.cred.

Only over TLS, once per session, outside a transaction; failures are counted
per client IP (``email.auth.max_failures_per_minute``, then 421 and close).
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.cred import error as cred_error
from twisted.python.failure import Failure

from dcrouter.email.auth import ISmtpUser
from dcrouter.email.sasl import Challenge, Credentials, Refusal, SaslExchange, Step
from dcrouter.email.sessioncore import Closed, SessionCore
from dcrouter.logsetup import get_logger

log = get_logger("email.server")


class AuthCommands(SessionCore):
    """The AUTH command and its SASL exchange."""

    def do_AUTH(self, arg: str) -> None:
        """AUTH (RFC 4954): only over TLS, once, outside a transaction."""
        if not self.info.tls:
            self.host.stats.rejected("auth_needs_tls")
            self._error("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        if not self.info.helo or not self._esmtp:
            self._error("503 5.5.1 Error: send EHLO first")
            return
        if self.info.auth_user:
            self._error("503 5.5.1 Error: already authenticated")
            return
        if self.mail_from is not None:
            self._error("503 5.5.1 Error: MAIL transaction in progress")
            return
        if self.host.auth_limiter.blocked(self.info.client_ip):
            self._auth_rate_limited()
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in self.host.auth_mechanisms():
            self._error("504 5.5.4 Unrecognized authentication type")
            return
        self._sasl = SaslExchange(mechanism)
        self._mode = "auth"
        self._auth_step(self._sasl.start(initial.strip()))

    def _auth_line(self, line: bytes) -> None:
        assert self._sasl is not None
        self._auth_step(self._sasl.respond(line))

    def _auth_step(self, step: Step) -> None:
        if isinstance(step, Challenge):
            self._send(f"334 {step.text}")
        elif isinstance(step, Refusal):
            self._end_auth()
            self._error(step.reply)
        else:
            self._login(step)

    def _end_auth(self) -> None:
        self._mode = "command"
        self._sasl = None

    def _auth_rate_limited(self) -> None:
        self.host.stats.rejected("auth_rate_limit")
        log.info("too many failed AUTH attempts from {client_ip}", client_ip=self.info.client_ip,
                 correlation_id=self.info.correlation_id)
        self.close_idle(f"421 4.7.0 {self.host.options.hostname} Error: too many failed "
                        "authentication attempts")
        raise Closed()

    def _login(self, step: Credentials) -> None:
        sasl = self._sasl
        assert sasl is not None
        mechanism = sasl.mechanism
        self.busy = True
        d = self.host.portal.login(step.creds, None, ISmtpUser)

        def ok(result: Any) -> None:
            user = str(result[1])
            if step.authzid is not None and step.authzid != user:
                # RFC 4616 authzid: Postfix/Cyrus accept it only when the login may
                # act for others (email.auth.proxy_users); otherwise a failed AUTH.
                if (user not in self.host.options.auth.proxy_users
                        or not step.authzid.isprintable() or len(step.authzid) > 255):
                    log.info("AUTH {mechanism} for {username} refused: not authorized as "
                             "{authzid}", mechanism=mechanism, username=user,
                             authzid=step.authzid[:100],
                             correlation_id=self.info.correlation_id)
                    failed(sasl.not_authorized())
                    return
                log.info("AUTH {mechanism}: {username} acts as {authzid}",
                         mechanism=mechanism, username=user, authzid=step.authzid[:100],
                         correlation_id=self.info.correlation_id)
                user = step.authzid
            self._end_auth()
            self.info.auth_user = user
            self.host.stats.auth_succeeded += 1
            log.info("AUTH {mechanism} succeeded for {username}", mechanism=mechanism,
                     username=self.info.auth_user, correlation_id=self.info.correlation_id)
            self.host.emit("auth_succeeded", self.info, self.info.auth_user, mechanism)
            self._send("235 2.7.0 Authentication successful")

        def fail(failure: Failure) -> None:
            if not failure.check(cred_error.UnauthorizedLogin, cred_error.UnhandledCredentials):
                log.failure("AUTH checker failed", failure,
                            correlation_id=self.info.correlation_id)
            failed(None)

        def failed(answer: Optional[Step]) -> None:
            self.host.stats.auth_failed += 1
            log.info("AUTH {mechanism} failed for {username}", mechanism=mechanism,
                     username=step.username, correlation_id=self.info.correlation_id)
            self.host.emit("auth_failed", self.info, step.username, mechanism)
            if self.host.auth_limiter.record_failure(self.info.client_ip):
                self._end_auth()
                try:
                    self._auth_rate_limited()
                except Closed:
                    return
            if answer is None:
                answer = sasl.failed()
            if isinstance(answer, Challenge):
                self._send(f"334 {answer.text}")
            else:
                self._end_auth()
                self._send(answer.reply)

        d.addCallbacks(ok, fail)
        d.addErrback(lambda f: log.failure("AUTH reply failed", f,
                                           correlation_id=self.info.correlation_id))
        d.addBoth(lambda _: self._resume())

"""The outbound SMTP client: one connection that sends a destination's messages in turn.

:class:`DeliveryClient` subclasses ``twisted.mail.smtp.ESMTPClient`` (EHLO,
STARTTLS - required or opportunistic -, AUTH) and adds what dcrouter needs:
it pulls :class:`Job` objects from a :class:`JobSource` (connection reuse:
after one message it sends RSET and takes the next), pipelines ``MAIL``/``RCPT``
when the server offers PIPELINING (RFC 2920), passes ``SIZE=`` and refuses
locally a message larger than the server's SIZE limit, passes the client's
DSN parameters on when the server offers DSN (RFC 3461 5.2.1: ``RET`` and
``ENVID`` as received, ``NOTIFY`` as received, ``ORCPT`` as received or made up
from the address, as Postfix does), and reports a result for every recipient.

Two defences of Postfix's SMTP client are built in: at STARTTLS every byte the
server sent after its ``220`` in clear text is discarded (CVE-2011-0411 class:
a line injected there must not be read as the reply to the encrypted EHLO),
and AUTH is never sent over a connection without TLS
(``smtp_sasl_security_options = noplaintext``): the attempt fails with a reason
and the message is deferred.  Data goes out with CRLF line ends only and no line
over 998 octets (:mod:`dcrouter.delivery.lines`).
"""

from __future__ import annotations

import collections
import dataclasses
import io
from typing import Any, Optional, Protocol

from twisted.internet import defer, protocol
from twisted.mail import smtp
from twisted.python.failure import Failure

from dcrouter.delivery.lines import dot_stuff, normalise
from dcrouter.dsn import EnvelopeDsn, RecipientDsn
from dcrouter.logsetup import get_logger

log = get_logger("email.delivery")


@dataclasses.dataclass
class Outcome:
    """What happened to one recipient in one attempt."""

    code: int
    message: str
    delivered: bool
    permanent: bool
    #: the host whose reply this is ("" when none answered)
    remote: str = ""
    #: the next hop offered DSN and got the client's parameters: reports are its job now
    dsn_passed: bool = False
    #: final delivery (into a Maildir), not a relay
    final: bool = False


def wire_data(message: bytes) -> bytes:
    """``message`` as DATA carries it: CRLF line ends only, no line over 998 octets,
    ending in CRLF, dot-stuffed (a no-op but the stuffing for normalised data)."""
    return dot_stuff(normalise(message))


class Job:
    """One item's attempt over SMTP: envelope, data, and a Deferred of per-recipient outcomes."""

    def __init__(self, item_id: str, mail_from: str, recipients: list[str], message: bytes,
                 correlation_id: str = "", dsn: Optional[EnvelopeDsn] = None) -> None:
        self.item_id = item_id
        self.mail_from = mail_from
        self.recipients = recipients
        self.data = wire_data(message)
        self.correlation_id = correlation_id
        self.dsn = dsn or EnvelopeDsn()
        self.dsn_passed = False  # sent to a server that offers DSN
        self.deferred: defer.Deferred = defer.Deferred()
        self.host = ""
        self.needs_smtputf8 = not (mail_from.isascii() and all(r.isascii() for r in recipients))
        # never a bare CR or LF on the wire, in the envelope either (RFC 5321 2.3.8)
        self.bad_envelope = any(_control(a) for a in [mail_from, *recipients])

    def finish(self, results: dict[str, Outcome]) -> None:
        """Report outcomes (once), with the host that answered."""
        if not self.deferred.called:
            for outcome in results.values():
                outcome.remote = outcome.remote or self.host
                outcome.dsn_passed = self.dsn_passed
            self.deferred.callback(results)

    def rcpt_line(self, address: str) -> bytes:
        """``RCPT TO:<address>``, with NOTIFY and ORCPT for a server that offers DSN."""
        line = b"RCPT TO:" + quote_address(address)
        if self.dsn_passed:
            line += self.dsn.recipients.get(address, _NO_DSN).rcpt_params(address)
        return line

    def fail_all(self, code: int, message: str, permanent: bool) -> None:
        """The same failure for every recipient."""
        text = message if has_reply_code(message) or code <= 0 else f"{code} {message}"
        self.finish({r: Outcome(code, text, False, permanent) for r in self.recipients})


_NO_DSN = RecipientDsn()


def has_reply_code(text: str) -> bool:
    """Does ``text`` start with an SMTP reply code (``451 ...``; not an IP address)?"""
    return len(text) >= 4 and text[:3].isascii() and text[:3].isdigit() and text[3] in " -"


def _control(address: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in address)


class JobSource(Protocol):
    """Where a connection takes its next message from."""

    def take(self) -> Optional[Job]:
        """The next job, or None when there is nothing (more) to send."""


@dataclasses.dataclass
class ClientSettings:
    """How to talk to one host."""

    identity: str
    command_timeout: float
    context: Any = None
    require_tls: bool = False
    auth_user: str = ""
    auth_password: str = dataclasses.field(default="", repr=False)
    reuse_limit: int = 100
    host: str = ""


def quote_address(address: str) -> bytes:
    """``<address>`` in UTF-8 (plain ASCII unless SMTPUTF8 is in use)."""
    return b"<" + address.strip("<>").encode("utf-8") + b">"


def _text(resp: Any) -> str:
    if isinstance(resp, bytes):
        return resp.decode("utf-8", "replace")
    return str(resp or "")


class DeliveryClient(smtp.ESMTPClient):
    """Sends jobs from a :class:`JobSource` over one SMTP connection."""

    # no conversation log: Twisted puts it into its exceptions, and it would hold the
    # base64 AUTH exchange
    debug = False

    def __init__(self, settings: ClientSettings, source: JobSource,
                 counters: Optional[collections.Counter[str]] = None) -> None:
        secret = settings.auth_password.encode("utf-8") if settings.auth_user else None
        super().__init__(secret, settings.context, settings.identity)
        self.settings = settings
        self.source = source
        self.timeout = settings.command_timeout  # type: ignore[assignment]
        self.requireTransportSecurity = settings.require_tls
        self.requireAuthentication = bool(settings.auth_user)
        self.heloFallback = not (settings.require_tls or settings.auth_user)
        if settings.auth_user:
            user = settings.auth_user.encode("utf-8")
            self.registerAuthenticator(smtp.PLAINAuthenticator(user))
            self.registerAuthenticator(smtp.LOGINAuthenticator(user))
            self.registerAuthenticator(smtp.CramMD5ClientAuthenticator(user))
        self.extensions: dict[bytes, Optional[bytes]] = {}
        self.current: Optional[Job] = None
        self.pulled = 0
        self.sent = 0
        self.pipelined = 0
        # the delivery system's counters, updated as transactions happen (not when the
        # connection, which may stay open for reuse, finally closes)
        self.counters = counters if counters is not None else collections.Counter()
        self.error: Optional[str] = None
        self.error_code = 0
        self.tls = False
        self.done: defer.Deferred = defer.Deferred()
        self._pipeline: list[str] = []
        self._mail_reply: Optional[tuple[int, bytes]] = None

    # -- capabilities -------------------------------------------------------------
    def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
        """Remember the EHLO keywords (SIZE, PIPELINING...) before going on."""
        items: dict[bytes, Optional[bytes]] = {}
        for line in resp.splitlines():
            parts = line.split(None, 1)
            if parts:
                items[parts[0].upper()] = parts[1] if len(parts) > 1 else None
        self.extensions = items
        super().esmtpState_serverConfig(code, resp)

    def esmtpState_starttls(self, code: int, resp: bytes) -> None:
        """STARTTLS accepted: drop what came after the 220 in clear, start TLS, re-EHLO.

        Bytes the server sent behind its 220 in the same packet were never
        protected by TLS; read after the handshake they would pass for the reply
        to the new EHLO (a forged ``250 PIPELINING``, or no STARTTLS/AUTH at all).
        Postfix purges its input buffer here; so does this client.
        """
        injected = self.clearLineBuffer()
        if injected:
            log.warn("{host} sent {count} bytes after its 220 to STARTTLS in clear text: "
                     "discarded", host=self.settings.host, count=len(injected),
                     event="delivery.starttls_injection")
            self.counters["starttls_injections"] += 1
        self.tls = True
        super().esmtpState_starttls(code, resp)

    def authenticate(self, code: int, resp: bytes, items: Any) -> None:
        """AUTH only inside TLS (noplaintext): without it the session fails, nothing is sent."""
        if self.secret and not self._tlsMode:
            reason = (f"refusing to send AUTH credentials to {self.settings.host} without TLS "
                      "(it offered no STARTTLS)")
            log.warn("{reason}", reason=reason, host=self.settings.host,
                     event="delivery.auth_without_tls")
            self.sendError(smtp.SMTPClientError(-1, reason.encode("utf-8")))
            return
        super().authenticate(code, resp, items)

    def _size_limit(self) -> int:
        value = self.extensions.get(b"SIZE")
        try:
            return int(value) if value else 0
        except ValueError:
            return 0

    # -- one message after the other ---------------------------------------------------
    def _next_job(self) -> Optional[Job]:
        while self.pulled < max(1, self.settings.reuse_limit):
            job = self.source.take()
            if job is None:
                return None
            self.pulled += 1
            job.host = self.settings.host
            limit = self._size_limit()
            if limit and len(job.data) > limit:
                job.fail_all(552, f"552 5.3.4 message size {len(job.data)} exceeds the limit "
                             f"{limit} of {self.settings.host}", permanent=True)
                continue
            if job.bad_envelope:
                job.fail_all(553, "553 5.1.3 an envelope address holds a line break or a "
                             "control character; not sent", permanent=True)
                continue
            if job.needs_smtputf8 and b"SMTPUTF8" not in self.extensions:
                job.fail_all(553, f"553 5.6.7 non-ASCII address and {self.settings.host} does "
                             "not offer SMTPUTF8", permanent=True)
                continue
            return job
        return None

    def smtpState_from(self, code: int, resp: bytes) -> None:
        """Start the next message (MAIL FROM, pipelined with RCPT TO when offered)."""
        self._failresponse = self.smtpTransferFailed
        job = self._next_job()
        if job is None:
            self._from = None
            self._disconnectFromServer()
            return
        self.current = job
        self._from = job.mail_from
        mail = b"MAIL FROM:" + quote_address(job.mail_from)
        if b"SIZE" in self.extensions:
            mail += b" SIZE=%d" % len(job.data)
        if b"8BITMIME" in self.extensions and not job.data.isascii():
            mail += b" BODY=8BITMIME"
        if job.needs_smtputf8:
            mail += b" SMTPUTF8"
        job.dsn_passed = b"DSN" in self.extensions
        if job.dsn_passed:
            mail += job.dsn.mail_params()
        if b"PIPELINING" in self.extensions:
            self.pipelined += 1
            self.counters["pipelined_transactions"] += 1
            self.toAddressesResult = []
            self.successAddresses = []
            self._pipeline = list(job.recipients)
            self._mail_reply = None
            lines = [mail] + [job.rcpt_line(r) for r in job.recipients]
            self.transport.write(b"\r\n".join(lines) + b"\r\n")
            self._expected = range(0, 1000)
            self._okresponse = self._pipelined_reply
        else:
            self.sendLine(mail)
            self._expected = [250]
            self._okresponse = self.smtpState_to

    def _pipelined_reply(self, code: int, resp: bytes) -> Any:
        if self._mail_reply is None:
            self._mail_reply = (code, resp)
            return None
        address = self._pipeline.pop(0)
        mail_code, mail_resp = self._mail_reply
        if mail_code != 250:
            self.toAddressesResult.append((address, mail_code, mail_resp))
        else:
            self.toAddressesResult.append((address, code, resp))
            if 200 <= code < 300:
                self.successAddresses.append(address)
        if self._pipeline:
            return None
        if self.successAddresses:
            self.sendLine(b"DATA")
            self._expected = [354]
            self._okresponse = self.smtpState_data
            return None
        return self.smtpState_msgSent(mail_code if mail_code != 250 else -1,
                                      b"No recipients accepted")

    def smtpState_toOrData(self, code: int, resp: bytes) -> Any:
        """One RCPT after the other (no PIPELINING), then DATA; addresses may be UTF-8."""
        if self.lastAddress is not None:
            self.toAddressesResult.append((self.lastAddress, code, resp))
            if 200 <= code < 300:
                self.successAddresses.append(self.lastAddress)
        try:
            self.lastAddress = next(self.toAddresses)
        except StopIteration:
            if self.successAddresses:
                self.sendLine(b"DATA")
                self._expected = [354]
                self._okresponse = self.smtpState_data
                return None
            return self.smtpState_msgSent(code, b"No recipients accepted")
        assert self.current is not None
        self.sendLine(self.current.rcpt_line(self.lastAddress))
        return None

    def getMailFrom(self) -> Optional[str]:
        """Unused: :meth:`smtpState_from` takes jobs itself."""
        return self.current.mail_from if self.current else None

    def getMailTo(self) -> list[str]:
        """The current job's recipients."""
        return list(self.current.recipients) if self.current else []

    def getMailData(self) -> io.BytesIO:
        """The current job's dot-stuffed CRLF data."""
        assert self.current is not None
        return io.BytesIO(self.current.data)

    def transformChunk(self, chunk: bytes) -> bytes:
        """Data is prepared already (CRLF, dot-stuffed): only keep the timeout alive."""
        self.resetTimeout()
        return chunk

    def sentMail(self, code: int, resp: Any, numOk: int, addresses: Any, log: Any) -> None:
        """Turn Twisted's report into per-recipient outcomes."""
        job, self.current = self.current, None
        if job is None:
            return
        self.sent += 1
        per_rcpt = {str(a): (c, r) for a, c, r in addresses}
        results: dict[str, Outcome] = {}
        for rcpt in job.recipients:
            c, r = per_rcpt.get(rcpt, (code, resp))
            if 200 <= c < 300:
                c, r = code, resp
            text = _text(r).replace("\n", " ")
            results[rcpt] = Outcome(c, f"{c} {text}" if c > 0 else text, 200 <= c < 300, c >= 500)
        job.finish(results)

    # -- failures -------------------------------------------------------------------------
    def sendError(self, exc: Exception) -> None:
        """An error outside a message's normal replies: fail the current job or the session."""
        code = int(getattr(exc, "code", -1) or -1)
        text = _text(getattr(exc, "resp", "") or exc)
        if self.current is not None:
            job, self.current = self.current, None
            job.fail_all(code, text if code > 0 else f"{text} ({self.settings.host})",
                         permanent=code >= 500)
        elif self.error is None:
            self.error, self.error_code = text, code
        super().sendError(exc)

    def timeoutConnection(self) -> None:
        """No reply in command_timeout: fail and abort (the peer may be hung)."""
        message = f"timeout after {self.timeout:.0f}s waiting for {self.settings.host}"
        if self.current is not None:
            job, self.current = self.current, None
            job.fail_all(-1, message, permanent=False)
        elif self.error is None:
            self.error, self.error_code = message, -1
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = smtp.protocol.connectionDone) -> None:
        """Whatever was in progress is deferred; tell the owner the session is over."""
        super().connectionLost(reason)
        if self.current is not None:
            job, self.current = self.current, None
            job.fail_all(-1, f"connection to {self.settings.host} lost: "
                         f"{reason.getErrorMessage()}", permanent=False)
        if self.error is None and self.pulled == 0 and self._okresponse != \
                self.smtpState_disconnect:
            self.error, self.error_code = (f"connection to {self.settings.host} closed: "
                                           f"{reason.getErrorMessage()}"), -1
        if not self.done.called:
            self.done.callback(self)


class OneConnection(protocol.Factory):
    """Hands one :class:`DeliveryClient` to an endpoint, quietly (no "Starting factory" line
    for every outbound connection)."""

    noisy = False

    def __init__(self, client: DeliveryClient) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> DeliveryClient:
        """The client, once."""
        return self.client

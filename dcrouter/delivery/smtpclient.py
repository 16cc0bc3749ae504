"""The outbound SMTP client: one connection that sends a destination's messages in turn.

:class:`DeliveryClient` subclasses ``twisted.mail.smtp.ESMTPClient`` (EHLO,
STARTTLS - required or opportunistic -, AUTH) and adds what dcrouter needs:
it pulls :class:`Job` objects from a :class:`JobSource` (connection reuse: the
next message follows the reply to the last one's end of data, no RSET between
them; with nothing waiting the connection is parked in its source's connection
cache, Postfix's ``smtp_connection_cache_on_demand``), pipelines ``MAIL``,
``RCPT`` and ``DATA`` in one write when the server offers PIPELINING (RFC 2920),
passes ``SIZE=`` and refuses locally a message larger than the server's SIZE
limit, passes the client's DSN parameters on when the server offers DSN (RFC
3461 5.2.1: ``RET`` and ``ENVID`` as received, ``NOTIFY`` as received,
``ORCPT`` as received or made up from the address, as Postfix does), and reports
a result for every recipient.

On the wire it behaves as Postfix's client does: ``TCP_NODELAY`` is set and every
group of commands, and a message's data with its terminating dot, leaves in one
write - never a small segment behind an unacknowledged one, which Nagle would
hold until the server's delayed ACK (40 ms on Linux). A job taken on a reused
connection that is lost before the server answered anything is handed back to
the source once (the server may have closed the idle connection just then), not
deferred.

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
import socket
import time
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
                 correlation_id: str = "", dsn: Optional[EnvelopeDsn] = None,
                 normalised: bool = False) -> None:
        self.item_id = item_id
        self.mail_from = mail_from
        self.recipients = recipients
        # ``normalised``: the caller brought it to CRLF lines of at most 998 octets already
        self.data = dot_stuff(message) if normalised else wire_data(message)
        self.correlation_id = correlation_id
        self.dsn = dsn or EnvelopeDsn()
        self.dsn_passed = False  # sent to a server that offers DSN
        self.deferred: defer.Deferred = defer.Deferred()
        self.host = ""
        self.needs_smtputf8 = not (mail_from.isascii() and all(r.isascii() for r in recipients))
        #: Handed back once already after a reused connection died before any reply.
        self.handed_back = False
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

    def park(self, client: "DeliveryClient") -> bool:
        """Nothing to send now: keep ``client`` idle for the next job (True), or not (False:
        the client quits). A parked client is resumed with :meth:`DeliveryClient.resume`
        or told to quit with :meth:`DeliveryClient.quit`."""

    def unpark(self, client: "DeliveryClient") -> None:
        """``client`` is no longer idle (its connection is gone)."""

    def give_back(self, job: Job) -> None:
        """Put ``job`` first in line again (its connection died before sending it)."""


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
    #: Seconds from connect after which a connection takes no new message
    #: (Postfix smtp_connection_reuse_time_limit); 0: no limit.
    reuse_time: float = 300.0


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
        #: The current message's data went out: the next reply ends the transaction.
        self._data_sent = False
        #: The server answered something since the current job's first command.
        self._answered = False
        self.parked = False
        self._ignoring = False
        self.connected_at = 0.0

    # -- the connection -------------------------------------------------------------
    def connectionMade(self) -> None:
        """TCP_NODELAY (we write whole command groups and whole messages), then greet."""
        set_no_delay(self.transport)
        self.connected_at = time.monotonic()
        super().connectionMade()

    def lineReceived(self, line: bytes) -> Any:
        """Note that the current job got an answer; an unsolicited reply while parked
        (a 421 before an idle close) ends the connection."""
        if self._ignoring:
            return None
        if self.parked:
            self._parked_reply(line)
            return None
        if self.current is not None and line[3:4] != b"-":
            self._answered = True
        return super().lineReceived(line)

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
        if self.pulled and self.settings.reuse_time and \
                time.monotonic() - self.connected_at > self.settings.reuse_time:
            return None
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
            if not self._park():
                self._disconnectFromServer()
            return
        self._answered = self._data_sent = False
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
            self._send_group(lines)
            self._expected = range(0, 1000)
            self._okresponse = self._pipelined_reply
        else:
            self.sendLine(mail)
            self._expected = [250]
            self._okresponse = self.smtpState_to

    def _send_group(self, lines: list[bytes]) -> None:
        """MAIL and RCPT commands, and DATA last (RFC 2920 3.1), in one write."""
        self.transport.write(b"\r\n".join(lines) + b"\r\nDATA\r\n")

    def _pipelined_reply(self, code: int, resp: bytes) -> Any:
        if self._mail_reply is None:
            self._mail_reply = (code, resp)
            return None
        mail_code, mail_resp = self._mail_reply
        if self._pipeline:
            address = self._pipeline.pop(0)
            if mail_code != 250:
                self.toAddressesResult.append((address, mail_code, mail_resp))
            else:
                self.toAddressesResult.append((address, code, resp))
                if 200 <= code < 300:
                    self.successAddresses.append(address)
            return None
        # the reply to DATA
        if code == 354 and self.successAddresses:
            return self.smtpState_data(code, resp)
        refused = mail_code if mail_code != 250 else -1
        if code == 354:
            # no recipient, yet the server wants data: end an empty message at once; the
            # transaction ends with the reply to the dot
            self.transport.write(b".\r\n")
            self._data_sent = True
            self._expected = range(0, 1000)
            self._okresponse = lambda c, r: self.smtpState_msgSent(refused,
                                                                   b"No recipients accepted")
            return None
        if self.successAddresses:
            return self.smtpState_msgSent(code, resp)  # DATA refused: so is the message
        return self.smtpState_msgSent(refused, b"No recipients accepted")

    def smtpState_data(self, code: int, resp: bytes) -> None:
        """354: the whole prepared message and its terminating dot in one write."""
        assert self.current is not None
        self.resetTimeout()
        self.transport.writeSequence([self.current.data, b".\r\n"])
        self._data_sent = True
        self._expected = range(200, 300)
        self._okresponse = self.smtpState_msgSent
        self._failresponse = self.smtpTransferFailed

    def smtpState_msgSent(self, code: int, resp: bytes) -> Any:
        """Report the message; after the reply to its end of data the next one may start
        at once (RFC 5321 4.1.1.4), after an aborted transaction RSET comes first."""
        if self._from is not None:
            self.sentMail(code, resp, len(self.successAddresses), self.toAddressesResult,
                          self.log)
        self.toAddressesResult = []
        self._from = None
        completed, self._data_sent = self._data_sent, False
        if completed:
            return self.smtpState_from(code, resp)
        self.sendLine(b"RSET")
        self._expected = [250]
        self._okresponse = self.smtpState_from
        self._failresponse = self._rset_refused
        return None

    def _rset_refused(self, code: int, resp: bytes) -> None:
        self.error, self.error_code = f"RSET refused: {code} {_text(resp)}", code
        self._disconnectFromServer()

    # -- the connection cache -------------------------------------------------------------
    def _park(self) -> bool:
        """Nothing to send: wait in the source's cache (no timeout of ours meanwhile)."""
        if self.pulled >= max(1, self.settings.reuse_limit) or (
                self.settings.reuse_time and
                time.monotonic() - self.connected_at > self.settings.reuse_time):
            return False
        if not self.source.park(self):
            return False
        self.parked = True
        self.setTimeout(None)
        return True

    def resume(self) -> None:
        """A job is waiting (called by the source of a parked client): send it."""
        if not self.parked:
            return
        self.parked = False
        self.setTimeout(self.timeout)
        self.counters["connection_cache_hits"] += 1
        self.smtpState_from(0, b"")

    def quit(self) -> None:
        """Leave the cache: QUIT and close."""
        if not self.parked:
            return
        self.parked = False
        self.setTimeout(self.timeout)
        self._disconnectFromServer()

    def _parked_reply(self, line: bytes) -> None:
        self.source.unpark(self)
        self.parked = False
        self._ignoring = True
        log.info("{host} said {reply!r} on an idle connection: closed", host=self.settings.host,
                 reply=line[:100].decode("utf-8", "replace"))
        self.transport.loseConnection()

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
        """Whatever was in progress is deferred - or handed back once, when a reused
        connection died before any reply to it; tell the owner the session is over."""
        super().connectionLost(reason)
        if self.parked:
            self.parked = False
            self.source.unpark(self)
        if self.current is not None:
            job, self.current = self.current, None
            if self.sent and not self._answered and not job.handed_back:
                job.handed_back = True
                self.pulled -= 1
                self.counters["jobs_handed_back"] += 1
                self.source.give_back(job)
            else:
                job.fail_all(-1, f"connection to {self.settings.host} lost: "
                             f"{reason.getErrorMessage()}", permanent=False)
        if self.error is None and self.pulled == 0 and self._okresponse != \
                self.smtpState_disconnect:
            self.error, self.error_code = (f"connection to {self.settings.host} closed: "
                                           f"{reason.getErrorMessage()}"), -1
        if not self.done.called:
            self.done.callback(self)


def set_no_delay(transport: Any) -> None:
    """TCP_NODELAY on the socket under ``transport`` (plain or TLS), when it is TCP."""
    for _ in range(3):
        sock = getattr(transport, "socket", None)
        if isinstance(sock, socket.socket):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            return
        transport = getattr(transport, "transport", None)
        if transport is None:
            return


class OneConnection(protocol.Factory):
    """Hands one :class:`DeliveryClient` to an endpoint, quietly (no "Starting factory" line
    for every outbound connection)."""

    noisy = False

    def __init__(self, client: DeliveryClient) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> DeliveryClient:
        """The client, once."""
        return self.client

"""One inbound ESMTP session: the protocol the listeners of :mod:`dcrouter.email.server` speak.

Written on :class:`twisted.internet.protocol.Protocol` rather than
``twisted.mail.smtp.ESMTP`` (see ``docs/decisions.md``): the session parses
lines itself so that it can enforce the 512-octet command limit, stream DATA
and BDAT chunks (RFC 3030 CHUNKING) into a spool file with the size limit
checked while streaming, keep reading pipelined commands in order while the
message handler answers asynchronously, and reply with enhanced status codes
everywhere.

The session talks to its server only through the small surface of
:class:`SessionHost` (options, handler, portal, limits, stats, events).
"""

from __future__ import annotations

import email.utils
import re
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.cred import error as cred_error
from twisted.internet import defer, interfaces, tcp
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.address import AddressError, parse_params, parse_path, split_argument
from dcrouter.email.auth import ISmtpUser
from dcrouter.email.clientcert import ClientCert
from dcrouter.email.data import ChunkReader, DotDecoder, NewlineNormaliser
from dcrouter.email.sasl import Challenge, Credentials, Refusal, SaslExchange, Step
from dcrouter.email.spool import SpoolWriter
from dcrouter.errors import PolicyRejection
from dcrouter.logsetup import get_logger
from dcrouter.message import ReceivedMessage, SessionInfo, new_correlation_id, new_queue_id

if TYPE_CHECKING:  # pragma: no cover
    from dcrouter.email.server import ListenerConfig, UnifiedEmailServer

log = get_logger("email.server")

#: RFC 5321 4.5.3.1.4: a command line is at most 512 octets including CRLF.
COMMAND_LINE_LIMIT = 512
#: RFC 4954 4: AUTH lines (initial responses, continuations) may reach 12288 octets.
AUTH_LINE_LIMIT = 12288
#: While a command waits for the handler, read at most this much ahead before pausing.
READ_AHEAD_LIMIT = 1024 * 1024

_HELO_CLEAN = re.compile(r"[^A-Za-z0-9.\-\[\]:_]")

COMMANDS = frozenset({"EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY",
                      "EXPN", "HELP", "STARTTLS", "AUTH", "BDAT", "ETRN", "TURN"})


_date_cache: list = [0, ""]


def _received_date() -> str:
    """RFC 5322 date of now (local time), computed once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0], _date_cache[1] = now, email.utils.formatdate(now, localtime=True)
    return _date_cache[1]


class _Closed(Exception):
    """Raised internally once the session has been told to close."""


@implementer(interfaces.IHandshakeListener)
class SmtpSession(Protocol):
    """One ESMTP session (server side)."""

    def __init__(self, host: "UnifiedEmailServer", listener: "ListenerConfig") -> None:
        self.host = host
        self.listener = listener
        self.info: SessionInfo = SessionInfo(correlation_id=new_correlation_id(), client_ip="",
                                             client_port=0, local_port=listener.port)
        self.counted = False
        self.closed = False
        self.busy = False
        self._processing = False
        self._paused = False
        self._buf = b""
        self._mode = "command"
        self._discarding = False
        self._errors = 0
        self._idle_call: Any = None
        self._esmtp = False
        self._sasl: Optional[SaslExchange] = None
        self._direct_send = False
        self.client_cert: Optional[ClientCert] = None
        self._out: list[bytes] = []
        self._decoder = DotDecoder()
        self._chunk: Optional[ChunkReader] = None
        self._chunk_refusal: Optional[Callable[[], None]] = None
        self._bdat = False
        self._newlines = NewlineNormaliser()
        #: Bare LF/CR refused (email.bare_newline = "reject", client not excluded).
        self._bare_reject = False
        self.mail_from: Optional[str] = None
        self.recipients: list[str] = []
        self.smtputf8 = False
        self.body_8bitmime = False
        self.spool: Optional[SpoolWriter] = None
        self.queue_id = ""

    # -- connection life cycle ----------------------------------------------------

    def connectionMade(self) -> None:
        """Apply the connection caps, fill the session record, greet."""
        self._direct_send = isinstance(self.transport, tcp.Connection) and hasattr(
            self.transport, "socket")
        peer: Any = self.transport.getPeer()
        self.info.client_ip = getattr(peer, "host", "")
        self.info.client_port = getattr(peer, "port", 0)
        local: Any = self.transport.getHost()
        self.info.local_port = getattr(local, "port", self.listener.port)
        self.info.submission = self.listener.submission
        self.info.tls = self.listener.implicit_tls
        self.info.relay_permitted = self.host.relay_permitted(self.info.client_ip)
        self._bare_reject = self.host.bare_newline_rejected(self.info.client_ip)
        cap = self.host.connections.admit(self.info.client_ip)
        if cap:
            self.host.stats.rejected("connection_limit")
            log.info("connection from {client_ip} refused: {cap} connection limit",
                     client_ip=self.info.client_ip, cap=cap,
                     correlation_id=self.info.correlation_id)
            self._send(f"421 4.7.0 {self.host.options.hostname} Error: too many connections"
                       f"{' from your address' if cap == 'per_ip' else ''}, try again later")
            self._close()
            return
        self.counted = True
        self.host.session_opened(self)
        self._reset_idle()
        options = self.host.options
        self._send(f"220 {options.hostname} {options.banner or 'ESMTP dcrouter'}")

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        """Drop an unfinished spool file and release the session's slot."""
        self.closed = True
        self._cancel_idle()
        if self.spool is not None and not self.busy:
            self.spool.abort()
            self.spool = None
            self.host.stats.rejected("client_aborted")
            log.info("client went away during DATA", correlation_id=self.info.correlation_id)
        if self.counted:
            self.counted = False
            self.host.session_closed(self, reason)

    def handshakeCompleted(self) -> None:
        """TLS is up (implicit or after STARTTLS): record version and cipher."""
        try:
            conn: Any = self.transport.getHandle()  # type: ignore[attr-defined]
            self.info.tls_version = conn.get_protocol_version_name() or ""
            self.info.tls_cipher = conn.get_cipher_name() or ""
            if self.host.client_certs is not None:
                self.client_cert = self.host.client_certs.describe(conn)
        except Exception:  # a handle without these methods: leave them empty
            log.failure("cannot read TLS session details", correlation_id=self.info.correlation_id)
        self.info.tls = True
        log.debug("TLS established {tls_version} {tls_cipher}", tls_version=self.info.tls_version,
                  tls_cipher=self.info.tls_cipher, correlation_id=self.info.correlation_id)

    # -- output ---------------------------------------------------------------------

    def _send(self, line: str) -> None:
        if self.closed:
            return
        data = line.encode("utf-8", "replace") + b"\r\n"
        if self._processing:
            # Replies to pipelined commands leave together when the input is used up.
            self._out.append(data)
            return
        self._write(data)

    def _flush(self) -> None:
        if self._out:
            data = b"".join(self._out)
            self._out = []
            self._write(data)

    def _write(self, data: bytes) -> None:
        transport: Any = self.transport
        if (self._direct_send and not transport.TLS and not transport.dataBuffer
                and not transport._tempDataBuffer and not transport.disconnecting):
            # Fast path for plain TCP with nothing queued: one send() instead of
            # Twisted's addWriter / send / removeWriter on the next reactor turn.
            try:
                sent = transport.socket.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                return  # the connection is going away; connectionLost follows
            data = data[sent:]
            if not data:
                return
        transport.write(data)

    def _close(self) -> None:
        if not self.closed:
            self._flush()
            self.closed = True
            self._cancel_idle()
            self.transport.loseConnection()

    def close_idle(self, code: str) -> None:
        """Send ``code`` (a full reply line) and close; used for shutdown and limits."""
        self._send(code)
        self._close()

    # -- idle timeout -------------------------------------------------------------------

    def _reset_idle(self) -> None:
        timeout = self.host.options.connection_timeout
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(timeout)
        else:
            self._idle_call = self.host.reactor.callLater(timeout, self._idle_timeout)

    def _cancel_idle(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def _idle_timeout(self) -> None:
        self._idle_call = None
        if self.closed:
            return
        if self.busy:  # waiting for us, not silent
            self._reset_idle()
            return
        self.host.stats.rejected("timeout")
        log.info("idle timeout", correlation_id=self.info.correlation_id)
        if self.spool is not None:
            self.spool.abort()
            self.spool = None
        self.close_idle(f"421 4.4.2 {self.host.options.hostname} Error: timeout exceeded")

    # -- input ---------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Buffer input; parse it unless a handler answer is outstanding."""
        if self.closed:
            return
        self._reset_idle()
        self._buf = self._buf + data if self._buf else data
        if self.busy:
            if len(self._buf) > READ_AHEAD_LIMIT and not self._paused:
                self._paused = True
                self.transport.pauseProducing()  # type: ignore[attr-defined]
            return
        self._process()

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while self._buf and not self.busy and not self.closed:
                if self._mode == "data":
                    if not self._consume_data():
                        break
                elif self._mode == "bdat":
                    if not self._consume_chunk():
                        break
                elif not self._consume_line():
                    break
        except _Closed:
            pass
        except Exception:
            # A bug or a local failure (disk full while spooling): the session's state
            # cannot be trusted any more.  Say so without details and hang up.
            log.failure("unexpected error in SMTP session",
                        correlation_id=self.info.correlation_id)
            self.host.stats.rejected("internal_error")
            self.close_idle(f"421 4.3.0 {self.host.options.hostname} Error: temporary local "
                            "problem, closing connection")
        finally:
            self._processing = False
            if not self.closed:
                self._flush()
        if self._paused and not self.busy and not self.closed:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _resume(self) -> None:
        """A waited-for result was answered: go on with buffered input."""
        self.busy = False
        if self.closed:
            return
        self._reset_idle()
        self._process()

    def _line_limit(self, line: bytes) -> int:
        if self._mode == "auth" or line[:5].upper() == b"AUTH ":
            return AUTH_LINE_LIMIT
        return COMMAND_LINE_LIMIT

    def _consume_line(self) -> bool:
        """Take one command line off the buffer; False when none is complete."""
        index = self._buf.find(b"\n")
        if index < 0:
            if len(self._buf) > self._line_limit(self._buf):
                self._buf = b""
                if not self._discarding:
                    self._discarding = True
                    self._line_too_long()
            return False
        line, self._buf = self._buf[:index], self._buf[index + 1:]
        if self._discarding:
            self._discarding = False
            return True
        if line.endswith(b"\r"):
            line = line[:-1]
        elif self._bare_reject:
            self._bare_newline("command")
            return True
        if len(line) + 2 > self._line_limit(line):
            self._line_too_long()
            return True
        if self._mode == "auth":
            self._auth_line(line)
        else:
            self._command(line)
        return True

    def _bare_newline(self, where: str) -> None:
        """A bare LF (or CR) from a client that may not send one: 550 and hang up
        (Postfix's ``smtpd_forbid_bare_newline = reject``)."""
        self.host.stats.rejected("bare_newline")
        self._emit_rejected("bare_newline", 550, log_it=False)
        log.info("bare newline in {where} refused", where=where,
                 correlation_id=self.info.correlation_id)
        self._reset_transaction()
        self.close_idle("550 5.5.2 Error: bare <LF> received")
        raise _Closed()

    def _line_too_long(self) -> None:
        self.host.stats.rejected("line_too_long")
        if self._mode == "auth":
            self._end_auth()
        self._error("500 5.5.2 Error: line too long")

    def _error(self, reply: str) -> None:
        """Reply with a client error and count it; too many and the session closes."""
        self._errors += 1
        if self._errors >= self.host.options.max_errors:
            self.host.stats.rejected("too_many_errors")
            log.info("too many errors, closing", correlation_id=self.info.correlation_id)
            self.close_idle(f"421 4.7.0 {self.host.options.hostname} Error: too many errors")
            raise _Closed()
        self._send(reply)

    # -- commands ------------------------------------------------------------------------

    def _command(self, raw: bytes) -> None:
        if b"\x00" in raw:
            self.host.stats.rejected("syntax")
            self._error("500 5.5.2 Error: bad syntax")
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.host.stats.rejected("syntax")
            self._error("500 5.5.2 Error: bad UTF-8 syntax")
            return
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        if verb not in COMMANDS:
            self.host.stats.rejected("unknown_command")
            self._error("502 5.5.2 Error: command not recognized")
            return
        getattr(self, "do_" + verb, self._not_implemented)(arg.strip())

    def _not_implemented(self, arg: str) -> None:
        self._error("502 5.5.1 Error: command not implemented")

    def do_HELO(self, arg: str) -> None:
        """HELO: plain SMTP greeting."""
        if not arg:
            self._error("501 5.5.4 Syntax: HELO hostname")
            return
        self._reset_transaction()
        self.info.helo = arg
        self._esmtp = False
        self._send(f"250 {self.host.options.hostname}")

    def do_EHLO(self, arg: str) -> None:
        """EHLO: greet and list the extensions (AUTH only over TLS)."""
        if not arg:
            self._error("501 5.5.4 Syntax: EHLO hostname")
            return
        self._reset_transaction()
        self.info.helo = arg
        self._esmtp = True
        options = self.host.options
        lines = [options.hostname, "PIPELINING", f"SIZE {options.max_message_size}",
                 "ENHANCEDSTATUSCODES", "8BITMIME"]
        if options.chunking:
            lines.append("CHUNKING")
        lines.append("SMTPUTF8")
        if not self.info.tls and self.host.tls_available:
            lines.append("STARTTLS")
        mechanisms = self.host.auth_mechanisms()
        if self.info.tls and mechanisms and not self.info.auth_user:
            lines.append("AUTH " + " ".join(mechanisms))
        for extension in lines[:-1]:
            self._send(f"250-{extension}")
        self._send(f"250 {lines[-1]}")

    def do_NOOP(self, arg: str) -> None:
        """NOOP."""
        self._send("250 2.0.0 Ok")

    def do_HELP(self, arg: str) -> None:
        """HELP."""
        self._send("214 2.0.0 See RFC 5321")

    def do_VRFY(self, arg: str) -> None:
        """VRFY: never reveals whether a user exists."""
        self._send("252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery")

    def do_EXPN(self, arg: str) -> None:
        """EXPN: not offered."""
        self._send("502 5.5.1 Error: command not implemented")

    def do_RSET(self, arg: str) -> None:
        """RSET: forget the transaction."""
        self._reset_transaction()
        self._send("250 2.0.0 Ok")
        self.host.transaction_finished(self)

    def do_QUIT(self, arg: str) -> None:
        """QUIT: say goodbye and close."""
        self._reset_transaction()
        self._send("221 2.0.0 Bye")
        self._close()
        raise _Closed()

    def do_STARTTLS(self, arg: str) -> None:
        """STARTTLS (RFC 3207): start TLS and forget the session state."""
        if arg:
            self._error("501 5.5.4 Syntax: STARTTLS")
            return
        if self.info.tls:
            self._error("503 5.5.1 Error: TLS already active")
            return
        if not self.host.tls_available:
            self._error("502 5.5.1 Error: command not implemented")
            return
        self._send("220 2.0.0 Ready to start TLS")
        # RFC 3207 5: forget everything the client said before TLS (and what it pipelined).
        self._buf = b""
        self._reset_transaction()
        self.info.helo = ""
        self._esmtp = False
        self._flush()  # the 220 goes out in clear text, before the handshake
        self.transport.startTLS(self.host.tls_context(), True)  # type: ignore[attr-defined]
        self.info.tls = True

    # -- the mail transaction ------------------------------------------------------------

    def _reset_transaction(self) -> None:
        if self.spool is not None:
            self.spool.abort()
        self.mail_from = None
        self.recipients = []
        self.smtputf8 = False
        self.body_8bitmime = False
        self.spool = None
        self.queue_id = ""
        self._bdat = False
        self._newlines = NewlineNormaliser()

    @property
    def in_transaction(self) -> bool:
        """MAIL given, DATA or a BDAT chunk streaming, or a handler answer outstanding."""
        return self.mail_from is not None or self.busy or self._mode in ("data", "bdat")

    def do_MAIL(self, arg: str) -> None:
        """MAIL FROM: checks AUTH requirement, SIZE/BODY/SMTPUTF8, then the handler."""
        if not self.info.helo:
            self._error("503 5.5.1 Error: send HELO/EHLO first")
            return
        if self.mail_from is not None:
            self._error("503 5.5.1 Error: nested MAIL command")
            return
        if self.host.draining:
            self.close_idle(f"421 4.3.2 {self.host.options.hostname} Service shutting down")
            raise _Closed()
        if (self.info.submission or self.host.options.auth.required) and not self.info.auth_user:
            self.host.stats.rejected("auth_required")
            self._emit_rejected("auth_required", 530)
            self._send("530 5.7.0 Authentication required")
            return
        try:
            path, text = split_argument(arg, "FROM")
        except AddressError as e:
            if e.detail == "keyword":
                self._error("501 5.5.4 Syntax: MAIL FROM:<address>")
            else:
                self._bad_address(e, "sender", "5.1.7")
            return
        params = parse_params(text)
        if params is None:
            self._error("501 5.5.4 Bad parameter syntax")
            return
        if params and not self._esmtp:
            self._error("555 5.5.4 Unsupported option: parameters need EHLO")
            return
        smtputf8 = body_8bitmime = False
        for key, value in params.items():
            if key == "SIZE":
                if not (value.isascii() and value.isdigit()):
                    self._error("501 5.5.4 Bad SIZE parameter")
                    return
                if int(value) > self.host.options.max_message_size:
                    self.host.stats.rejected("size")
                    self._emit_rejected("size", 552)
                    self._send("552 5.3.4 Message size exceeds fixed limit")
                    return
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    self._error("555 5.5.4 Unsupported option: BODY=" + value[:20])
                    return
                body_8bitmime = value.upper() == "8BITMIME"
            elif key == "SMTPUTF8" and not value:
                smtputf8 = True
            elif key != "AUTH":
                self._error(f"555 5.5.4 Unsupported option: {key[:20]}")
                return
        try:
            mailbox = parse_path(path, utf8=smtputf8, null_ok=True)
        except AddressError as e:
            self._bad_address(e, "sender", "5.1.7")
            return
        address = mailbox.address if mailbox is not None else ""

        def accepted(_: Any) -> None:
            self.mail_from = address
            self.smtputf8, self.body_8bitmime = smtputf8, body_8bitmime
            self._send("250 2.1.0 Ok")

        self._ask("check_sender", (self.info, address), accepted, "sender")

    def do_RCPT(self, arg: str) -> None:
        """RCPT TO: recipient cap, then the handler (relay policy)."""
        if self.mail_from is None:
            self._error("503 5.5.1 Error: need MAIL command")
            return
        if self._bdat:
            self._error("503 5.5.1 Error: RCPT not allowed after BDAT")
            return
        try:
            path, text = split_argument(arg, "TO")
        except AddressError as e:
            if e.detail == "keyword":
                self._error("501 5.5.4 Syntax: RCPT TO:<address>")
            else:
                self._bad_address(e, "recipient", "5.1.3")
            return
        params = parse_params(text)
        if params is None:
            self._error("501 5.5.4 Bad parameter syntax")
            return
        if params:
            self._error(f"555 5.5.4 Unsupported option: {next(iter(params))[:20]}")
            return
        try:
            mailbox = parse_path(path, utf8=self.smtputf8, postmaster_ok=True)
        except AddressError as e:
            self._bad_address(e, "recipient", "5.1.3")
            return
        assert mailbox is not None
        # RFC 5321 4.5.1: <postmaster> without a domain is this host's postmaster.
        address = mailbox.address if mailbox.domain else \
            f"postmaster@{self.host.options.hostname}"
        if len(self.recipients) >= self.host.options.max_recipients:
            self.host.stats.rejected("too_many_recipients")
            self._emit_rejected("too_many_recipients", 452)
            self._send("452 4.5.3 Error: too many recipients")
            return
        mail_from = self.mail_from

        def accepted(_: Any) -> None:
            if self.mail_from is mail_from:
                self.recipients.append(address)
            self._send("250 2.1.5 Ok")

        self._ask("check_recipient", (self.info, mail_from, address), accepted, "recipient")

    def _bad_address(self, error: AddressError, role: str, enhanced: str) -> None:
        """Reply to a MAIL/RCPT path the grammar refused (Postfix's codes)."""
        self.host.stats.rejected("address_syntax")
        if error.kind == "utf8":
            self._error("553 5.6.7 Must declare SMTPUTF8 to send unicode address")
        elif error.kind == "too_long":
            self._error(f"501 {enhanced} Bad {role} address syntax: path too long")
        else:
            self._error(f"501 {enhanced} Bad {role} address syntax")

    def do_DATA(self, arg: str) -> None:
        """DATA: open a spool file with the Received header and start streaming."""
        if arg:
            self._error("501 5.5.4 Syntax: DATA")
            return
        if self.mail_from is None:
            self._error("503 5.5.1 Error: need MAIL command")
            return
        if self._bdat:
            self._error("503 5.5.1 Error: DATA not allowed after BDAT in the same transaction")
            return
        if not self.recipients:
            self._error("554 5.5.1 Error: no valid recipients")
            return
        if not self._open_spool():
            self._send("451 4.3.0 Temporary local problem, try again later")
            return
        self._mode = "data"
        self._decoder = DotDecoder()
        self._send("354 End data with <CR><LF>.<CR><LF>")

    def _open_spool(self) -> bool:
        """Give the transaction a queue id and a spool file holding the Received header."""
        self.queue_id = new_queue_id()
        try:
            path, fd = self.host.spool_files.take()
            spool = SpoolWriter(path, fd, self.host.options.max_message_size,
                                authserv_id=self.host.options.hostname)
            self.spool = spool
            spool.write_header(self._received_header())
        except OSError as e:
            log.error("cannot open spool file: {error}", error=str(e),
                      correlation_id=self.info.correlation_id)
            if self.spool is not None:
                self.spool.abort()
            self.spool = None
            return False
        return True

    def do_BDAT(self, arg: str) -> None:
        """BDAT <size> [LAST] (RFC 3030): read exactly <size> octets into the spool.

        A refused BDAT whose size could be read still has its octets read (and
        thrown away) so that the session stays in step with the client; its
        reply goes out after the chunk, as every BDAT reply does.
        """
        if not self.host.options.chunking:
            self._not_implemented(arg)
            return
        parts = arg.split()
        if (not 1 <= len(parts) <= 2 or not (parts[0].isascii() and parts[0].isdigit())
                or len(parts[0]) > 20 or (len(parts) == 2 and parts[1].upper() != "LAST")):
            self._error("501 5.5.4 Syntax: BDAT count [LAST]")
            return
        size, last = int(parts[0]), len(parts) == 2
        refusal: Optional[Callable[[], None]] = None
        if self.mail_from is None:
            refusal = self._refuse_chunk("503 5.5.1 Error: need MAIL command")
        elif not self.recipients:
            refusal = self._refuse_chunk("503 5.5.1 Error: need RCPT command")
        elif self.spool is None and not self._bdat and not self._open_spool():
            refusal = self._refuse_chunk("451 4.3.0 Temporary local problem, try again later",
                                         counted=False, reset=True)
        elif self.spool is not None and self.spool.size + size > self.spool.limit:
            # It cannot fit: drop what was received and throw the chunk away unread.
            received = self.spool.size + size
            self.spool.abort()
            self.spool = None
            refusal = lambda: self._too_big(received)  # noqa: E731
        if refusal is None:
            self._bdat = True
        self._chunk = ChunkReader(size, last, keep=refusal is None)
        self._chunk_refusal = refusal
        self._mode = "bdat"
        if size == 0:
            self._end_of_chunk()

    def _refuse_chunk(self, reply: str, counted: bool = True,
                      reset: bool = False) -> Callable[[], None]:
        """A refusal of a BDAT command, to be sent once its chunk has been read.

        ``counted``: a client error (toward ``max_errors``); ``reset``: the
        transaction is over (its later chunks are refused too).
        """
        def refuse() -> None:
            if reset:
                self._reset_transaction()
            if counted:
                self._error(reply)
            else:
                self._send(reply)
        return refuse

    def _received_header(self) -> bytes:
        helo = _HELO_CLEAN.sub("?", self.info.helo)[:100]
        hostname = self.host.options.hostname
        ip = self.info.client_ip
        literal = f"IPv6:{ip}" if ":" in ip else ip
        parts = [f"Received: from {helo} ([{literal}])",
                 f"\tby {hostname} (dcrouter) with {self.info.protocol} id {self.queue_id}"]
        if self.info.tls:
            parts.append(f"\t(using {self.info.tls_version or 'TLS'} with cipher "
                         f"{self.info.tls_cipher or 'unknown'})")
            if self.client_cert is not None:
                parts.append("\t" + self.client_cert.received_comment())
        date = _received_date()
        if len(self.recipients) == 1:
            rcpt = self.recipients[0].replace("\r", "").replace("\n", "")
            parts.append(f"\tfor <{rcpt}>; {date}")
        else:
            parts[-1] += ";"
            parts.append(f"\t{date}")
        return ("\r\n".join(parts) + "\r\n").encode("utf-8", "replace")

    # -- DATA and BDAT streaming ---------------------------------------------------------

    def _consume_chunk(self) -> bool:
        """Move octets of the current BDAT chunk into the spool; True at its end."""
        chunk = self._chunk
        assert chunk is not None
        out, self._buf, finished = chunk.feed(self._buf)
        if out and chunk.keep and self.spool is not None:
            out = self._newlines.feed(out)
            if not (self._bare_reject and self._newlines.bare):
                self.spool.write(out)
        if finished:
            self._end_of_chunk()
        return finished

    def _end_of_chunk(self) -> None:
        """A chunk was read completely: reply to its BDAT command."""
        chunk, self._chunk = self._chunk, None
        refusal, self._chunk_refusal = self._chunk_refusal, None
        self._mode = "command"
        assert chunk is not None
        if refusal is not None:
            refusal()
        elif self._bare_reject and self._newlines.bare:
            self._bare_newline("BDAT")
        elif chunk.last:
            if self.spool is not None:
                rest = self._newlines.feed(b"", final=True)
                if rest:
                    self.spool.write(rest)
            if self._bare_reject and self._newlines.bare:
                self._bare_newline("BDAT")
            self._end_of_data()
        else:
            self._send(f"250 2.0.0 {chunk.size} octets received")

    def _consume_data(self) -> bool:
        """Move decoded lines from the buffer into the spool; True at end of data."""
        assert self.spool is not None
        out, self._buf, finished = self._decoder.feed(self._buf)
        if out and not (self._bare_reject and self._decoder.bare):
            self.spool.write(out)
        if finished:
            self._mode = "command"
            if self._bare_reject and self._decoder.bare:
                self._bare_newline("DATA")
            self._end_of_data()
        return finished

    def _end_of_data(self) -> None:
        spool, self.spool = self.spool, None
        assert spool is not None and self.mail_from is not None
        if spool.oversize:
            self._too_big(spool.size)
            return
        try:
            path = spool.finish()
        except OSError as e:
            log.error("cannot write spool file: {error}", error=str(e),
                      correlation_id=self.info.correlation_id)
            spool.abort()
            self._reset_transaction()
            self._send("451 4.3.0 Temporary local problem, try again later")
            self.host.transaction_finished(self)
            return
        body_command = "BDAT" if self._bdat else "DATA"
        bare = self._newlines if self._bdat else self._decoder
        if bare.bare_lf or bare.bare_cr:
            log.info("bare {kinds} in {command} written as CRLF",
                     kinds=" and ".join(k for k, seen in (("<LF>", bare.bare_lf),
                                                          ("<CR>", bare.bare_cr)) if seen),
                     command=body_command, correlation_id=self.info.correlation_id)
        if spool.results is not None and spool.results.removed:
            log.info("removed {count} Authentication-Results claiming {authserv_id}",
                     count=spool.results.removed, authserv_id=self.host.options.hostname,
                     correlation_id=self.info.correlation_id)
        message = ReceivedMessage(queue_id=self.queue_id, mail_from=self.mail_from,
                                  recipients=list(self.recipients), spool_path=path,
                                  size=spool.total_size, session=self.info,
                                  smtputf8=self.smtputf8, body_8bit=spool.has_8bit)
        self.host.stats.bytes_received += spool.size

        def queued(queue_ids: Any) -> None:
            ids = list(queue_ids or [])
            first = ids[0] if ids else message.queue_id
            self.host.stats.accepted()
            log.info("accepted {queue_id} from <{mail_from}> for {count} recipients, "
                     "{size} bytes", queue_id=first, mail_from=message.mail_from,
                     count=len(message.recipients), size=message.size,
                     body_command=body_command, correlation_id=self.info.correlation_id)
            self.host.emit("message_received", self.info, message, ids)
            self._send(f"250 2.0.0 Ok: queued as {first}")

        def failed(_: Any) -> None:
            spool.abort()

        self.mail_from = None  # the transaction is with the handler now
        self._ask("handle_message", (message,), queued, "message",
                  on_failure=failed, finished=True)

    def _too_big(self, size: int) -> None:
        """The message passed ``max_message_size``: 552 and the transaction is over."""
        self.host.stats.rejected("size")
        self._emit_rejected("size", 552)
        log.info("message too big: {size} bytes", size=size,
                 correlation_id=self.info.correlation_id)
        self._reset_transaction()
        self._send("552 5.3.4 Error: message file too big")
        self.host.transaction_finished(self)

    # -- asking the handler ------------------------------------------------------------------

    def _ask(self, method: str, args: tuple, on_success: Callable[[Any], None],
             what: str, on_failure: Optional[Callable[[Any], None]] = None,
             finished: bool = False) -> None:
        """Call handler ``method``, reply from its result, then continue with buffered input."""
        self.busy = True
        handler = self.host.handler
        d = defer.maybeDeferred(lambda: getattr(handler, method)(*args))

        def ok(result: Any) -> None:
            on_success(result)

        def fail(failure: Failure) -> None:
            if on_failure is not None:
                on_failure(failure)
            if failure.check(PolicyRejection):
                rejection: Any = failure.value
                self.host.stats.rejected(rejection.reason)
                self._emit_rejected(rejection.reason, rejection.code, log_it=False)
                log.info("{what} rejected: {code} {enhanced} {text}", what=what,
                         code=rejection.code, enhanced=rejection.enhanced, text=rejection.text,
                         correlation_id=self.info.correlation_id)
                self._send(f"{rejection.code} {rejection.enhanced} {rejection.text}")
            else:
                self.host.stats.rejected("handler_error")
                self._emit_rejected("handler_error", 451, log_it=False)
                log.failure("handler failed on {what}", failure, what=what,
                            correlation_id=self.info.correlation_id)
                self._send("451 4.3.0 Temporary local problem, try again later")

        def done(_: Any) -> None:
            if finished:
                self._reset_transaction()
                self.host.transaction_finished(self)
            self._resume()

        d.addCallbacks(ok, fail)
        d.addErrback(lambda f: log.failure("reply failed", f,
                                           correlation_id=self.info.correlation_id))
        d.addBoth(done)

    def _emit_rejected(self, reason: str, code: int, log_it: bool = True) -> None:
        """Tell observers (and the log) that something was refused for ``reason``."""
        if log_it:
            log.info("refused ({reason}): {code}", reason=reason, code=code,
                     correlation_id=self.info.correlation_id)
        self.host.emit("message_rejected", self.info, reason, code)

    # -- AUTH ------------------------------------------------------------------------------------

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
        raise _Closed()

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
                except _Closed:
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

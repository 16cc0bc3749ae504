"""The core of an inbound ESMTP session: connection, input framing, replies, the handler.

:class:`SessionCore` is the part of :class:`dcrouter.email.session.SmtpSession`
that every command uses: the connection life cycle, output (one ``send()`` for
plain TCP, replies to pipelined commands collected), the idle timeout, reading
input (command lines bounded at 2048 octets - 12288 for AUTH -, a bare LF
refused when ``email.bare_newline = "reject"``), the error count, the command
dispatch and asking the message handler.  The commands themselves live in
:mod:`dcrouter.email.session` (greeting, TLS, reset), :mod:`dcrouter.email.transaction`
(MAIL, RCPT, DATA, BDAT) and :mod:`dcrouter.email.sessionauth` (AUTH).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.internet import defer, tcp
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from dcrouter.dsn import RecipientDsn
from dcrouter.email.clientcert import ClientCert
from dcrouter.email.data import ChunkReader, DotDecoder, NewlineNormaliser
from dcrouter.email.sasl import SaslExchange
from dcrouter.email.spool import SpoolWriter
from dcrouter.errors import PolicyRejection
from dcrouter.logsetup import get_logger
from dcrouter.message import SessionInfo, new_correlation_id

if TYPE_CHECKING:  # pragma: no cover
    from dcrouter.email.server import ListenerConfig, UnifiedEmailServer

log = get_logger("email.server")

#: Octets of a command line, CRLF included.  RFC 5321 4.5.3.1.4 says 512 at least, and
#: extensions add to it (RFC 3461: 500 for ORCPT and NOTIFY, 100 for ENVID and RET;
#: RFC 6531 addresses in UTF-8); Postfix reads 2048 (``line_length_limit``).
COMMAND_LINE_LIMIT = 2048
#: RFC 4954 4: AUTH lines (initial responses, continuations) may reach 12288 octets.
AUTH_LINE_LIMIT = 12288
#: While a command waits for the handler, read at most this much ahead before pausing.
READ_AHEAD_LIMIT = 1024 * 1024

COMMANDS = frozenset({"EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY",
                      "EXPN", "HELP", "STARTTLS", "AUTH", "BDAT", "ETRN", "TURN"})


class Closed(Exception):
    """Raised internally once the session has been told to close."""


class SessionCore(Protocol):
    """Connection, input, output and handler plumbing of one ESMTP session (server side)."""

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
        #: RET/ENVID of MAIL and NOTIFY/ORCPT of each RCPT that gave them (RFC 3461).
        self.dsn_ret = ""
        self.dsn_envid = ""
        self.rcpt_dsn: dict[str, RecipientDsn] = {}
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
        except Closed:
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
        raise Closed()

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
            raise Closed()
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
            # RFC 5321 4.2.4: 500 for a command not recognized, 502 for one recognized
            # but not implemented (EXPN, TURN...)
            self.host.stats.rejected("unknown_command")
            self._error("500 5.5.2 Error: command not recognized")
            return
        getattr(self, "do_" + verb, self._not_implemented)(arg.strip())

    def _not_implemented(self, arg: str) -> None:
        self._error("502 5.5.1 Error: command not implemented")


    # -- the mail transaction ------------------------------------------------------------

    def _reset_transaction(self) -> None:
        if self.spool is not None:
            self.spool.abort()
        self.mail_from = None
        self.recipients = []
        self.dsn_ret = self.dsn_envid = ""
        self.rcpt_dsn = {}
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


    # -- provided by the command mix-ins ----------------------------------------------------

    def _consume_data(self) -> bool:
        """Stream DATA octets into the spool (:mod:`dcrouter.email.transaction`)."""
        raise NotImplementedError

    def _consume_chunk(self) -> bool:
        """Stream BDAT octets into the spool (:mod:`dcrouter.email.transaction`)."""
        raise NotImplementedError

    def _auth_line(self, line: bytes) -> None:
        """One line of a SASL exchange (:mod:`dcrouter.email.sessionauth`)."""
        raise NotImplementedError

    def _end_auth(self) -> None:
        """Leave a SASL exchange (:mod:`dcrouter.email.sessionauth`)."""
        raise NotImplementedError

"""One inbound ESMTP session: the protocol the listeners of :mod:`dcrouter.email.server` speak.

Written on :class:`twisted.internet.protocol.Protocol` rather than
``twisted.mail.smtp.ESMTP`` (see ``docs/decisions.md``): the session parses
lines itself so that it can enforce its command line limit, stream DATA
and BDAT chunks (RFC 3030 CHUNKING) into a spool file with the size limit
checked while streaming, keep reading pipelined commands in order while the
message handler answers asynchronously, and reply with enhanced status codes
everywhere.

:class:`SmtpSession` is assembled from :class:`dcrouter.email.sessioncore.SessionCore`
(connection, input, output, handler), :class:`dcrouter.email.transaction.TransactionCommands`
(MAIL, RCPT, DATA, BDAT) and :class:`dcrouter.email.sessionauth.AuthCommands` (AUTH);
this module adds the greeting, TLS and reset commands.  The session talks to
its server only through the small surface the server offers (options,
handler, portal, limits, stats, events).
"""

from __future__ import annotations

from twisted.internet import interfaces
from zope.interface import implementer

from dcrouter.email.sessionauth import AuthCommands
from dcrouter.email.sessioncore import Closed
from dcrouter.email.transaction import TransactionCommands


@implementer(interfaces.IHandshakeListener)
class SmtpSession(TransactionCommands, AuthCommands):
    """One ESMTP session (server side)."""

    def do_HELO(self, arg: str) -> None:
        """HELO: plain SMTP greeting."""
        if not arg:
            self._error("501 5.5.4 Syntax: HELO hostname")
            return
        self._reset_transaction()
        self.info.helo = arg
        self._esmtp = self.info.esmtp = False
        self._send(f"250 {self.host.options.hostname}")

    def do_EHLO(self, arg: str) -> None:
        """EHLO: greet and list the extensions (AUTH only over TLS)."""
        if not arg:
            self._error("501 5.5.4 Syntax: EHLO hostname")
            return
        self._reset_transaction()
        self.info.helo = arg
        self._esmtp = self.info.esmtp = True
        options = self.host.options
        lines = [options.hostname, "PIPELINING", f"SIZE {options.max_message_size}",
                 "ENHANCEDSTATUSCODES", "8BITMIME"]
        if options.dsn:
            lines.append("DSN")
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
        """VRFY: never reveals whether a user exists (501 without an argument, as Postfix)."""
        if not arg:
            self._error("501 5.5.4 Syntax: VRFY address")
            return
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
        raise Closed()

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


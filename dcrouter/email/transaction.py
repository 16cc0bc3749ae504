"""The mail transaction of an ESMTP session: MAIL, RCPT, DATA and BDAT.

MAIL and RCPT paths are read by the RFC 5321 grammar of :mod:`dcrouter.address`
(501 for what it refuses, 553 5.6.7 for UTF-8 without SMTPUTF8) before the
message handler is asked; their DSN parameters (RET, ENVID, NOTIFY, ORCPT) by
:mod:`dcrouter.dsn` (501 5.5.4 for bad syntax or a repeated parameter, 555 for
a parameter dcrouter does not know).  DATA is streamed through the dot decoder of
:mod:`dcrouter.email.data`, BDAT chunks octet-exact through its newline
normaliser, into a spool file that starts with dcrouter's ``Received:`` header.
"""

from __future__ import annotations

import email.utils
import re
import time
from typing import Any, Callable, Optional

from dcrouter.address import AddressError, parse_params, parse_path, split_argument
from dcrouter.dsn import (
    DsnSyntaxError, EnvelopeDsn, RecipientDsn, parse_envid, parse_notify, parse_orcpt, parse_ret,
)
from dcrouter.email.data import ChunkReader, DotDecoder
from dcrouter.email.sessioncore import Closed, SessionCore
from dcrouter.email.spool import SpoolWriter
from dcrouter.logsetup import get_logger
from dcrouter.message import ReceivedMessage, new_queue_id

log = get_logger("email.server")

_HELO_CLEAN = re.compile(r"[^A-Za-z0-9.\-\[\]:_]")
_date_cache: list = [0, ""]


def _repeated(text: str, names: tuple[str, ...]) -> Optional[str]:
    """The first of ``names`` given more than once among the parameters ``text``."""
    seen: set[str] = set()
    for item in text.split():
        key = item.partition("=")[0].upper()
        if key in names:
            if key in seen:
                return key
            seen.add(key)
    return None


def _received_date() -> str:
    """RFC 5322 date of now (local time), computed once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0], _date_cache[1] = now, email.utils.formatdate(now, localtime=True)
    return _date_cache[1]


class TransactionCommands(SessionCore):
    """MAIL, RCPT, DATA and BDAT, and streaming the message into the spool."""

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
            raise Closed()
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
        repeated = _repeated(text, ("RET", "ENVID"))
        if repeated:
            self._error(DsnSyntaxError(repeated, "given twice").reply)
            return
        smtputf8 = body_8bitmime = False
        ret = envid = ""
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
            elif key in ("RET", "ENVID"):
                if not self._dsn_offered():
                    return
                try:
                    if key == "RET":
                        ret = parse_ret(value)
                    else:
                        envid = parse_envid(value)
                except DsnSyntaxError as e:
                    self._error(e.reply)
                    return
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
            self.dsn_ret, self.dsn_envid = ret, envid
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
        if params and not self._esmtp:
            self._error("555 5.5.4 Unsupported option: parameters need EHLO")
            return
        repeated = _repeated(text, ("NOTIFY", "ORCPT"))
        if repeated:
            self._error(DsnSyntaxError(repeated, "given twice").reply)
            return
        notify = orcpt = ""
        for key, value in params.items():
            if key not in ("NOTIFY", "ORCPT"):
                self._error(f"555 5.5.4 Unsupported option: {key[:20]}")
                return
            if not self._dsn_offered():
                return
            try:
                if key == "NOTIFY":
                    notify = parse_notify(value)
                else:
                    orcpt = parse_orcpt(value, utf8=self.smtputf8)
            except DsnSyntaxError as e:
                self._error(e.reply)
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
                if notify or orcpt:
                    self.rcpt_dsn[address] = RecipientDsn(notify, orcpt)
                else:
                    self.rcpt_dsn.pop(address, None)
            self._send("250 2.1.5 Ok")

        self._ask("check_recipient", (self.info, mail_from, address), accepted, "recipient")

    def _dsn_offered(self) -> bool:
        """DSN parameters are allowed (``email.dsn``); otherwise refuse them as Postfix does
        with the keyword discarded."""
        if self.host.options.dsn:
            return True
        self._error("501 5.7.1 DSN support is disabled")
        return False

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
                 f"\tby {hostname} (dcrouter) with {self.info.protocol_for(self.smtputf8)} "
                 f"id {self.queue_id}"]
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
                                  smtputf8=self.smtputf8, body_8bit=spool.has_8bit,
                                  dsn=self._envelope_dsn())
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

    def _envelope_dsn(self) -> Optional[EnvelopeDsn]:
        """The transaction's DSN parameters (None when the client gave none)."""
        dsn = EnvelopeDsn(self.dsn_ret, self.dsn_envid, dict(self.rcpt_dsn))
        return dsn if dsn else None

    def _too_big(self, size: int) -> None:
        """The message passed ``max_message_size``: 552 and the transaction is over."""
        self.host.stats.rejected("size")
        self._emit_rejected("size", 552)
        log.info("message too big: {size} bytes", size=size,
                 correlation_id=self.info.correlation_id)
        self._reset_transaction()
        self._send("552 5.3.4 Error: message file too big")
        self.host.transaction_finished(self)


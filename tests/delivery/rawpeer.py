"""A scripted SMTP next hop on a raw socket: every byte the client sends is recorded.

aiosmtpd normalises what it receives; this peer does not.  It serves one
connection after the other in a thread and can misbehave on purpose (bytes
injected behind the 220 to STARTTLS, AUTH offered without TLS).
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
from typing import Optional

from tests.support.net import free_port


class RawNextHop:
    """Greets, answers EHLO/STARTTLS/AUTH/MAIL/RCPT/DATA/RSET/QUIT, records everything.

    ``ehlo`` and ``tls_ehlo``: the EHLO keywords before and after TLS;
    ``starttls_reply``: the bytes sent in one packet in answer to STARTTLS;
    ``rcpt_replies``: address -> reply line; ``ehlo_wait``: seconds to watch for
    client bytes before answering the EHLO after TLS (they would prove the
    client took something else for that answer).
    """

    def __init__(self, ehlo: tuple[str, ...] = ("8BITMIME",),
                 tls_ehlo: tuple[str, ...] = ("8BITMIME",),
                 tls: Optional[ssl.SSLContext] = None,
                 starttls_reply: bytes = b"220 2.0.0 ready\r\n",
                 rcpt_replies: Optional[dict[str, str]] = None,
                 ehlo_wait: float = 0.0) -> None:
        self.ehlo = ehlo
        self.tls_ehlo = tls_ehlo
        self.tls = tls
        self.starttls_reply = starttls_reply
        self.rcpt_replies = rcpt_replies or {}
        self.ehlo_wait = ehlo_wait
        self.port = free_port()
        self.host = "127.0.0.1"
        self.lines: list[bytes] = []         # every command line, as received (without CRLF)
        self.data: list[bytes] = []          # every DATA payload, raw, up to and with CRLF.CRLF
        self.spoke_early: list[bytes] = []   # bytes that came before the EHLO answer after TLS
        self.sessions = 0
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((self.host, self.port))
        self._listener.listen(8)
        self._listener.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> "RawNextHop":
        """Serve in a thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listener."""
        self._stop.set()
        self._thread.join(5)
        self._listener.close()

    @property
    def commands(self) -> list[str]:
        """The verbs received, upper case."""
        return [line.split(b" ", 1)[0].split(b":", 1)[0].upper().decode("ascii", "replace")
                for line in self.lines]

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.sessions += 1
            try:
                self._session(conn)
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        sock: socket.socket = conn
        buf = b""
        tls = False

        def send(data: bytes) -> None:
            sock.sendall(data)

        def reply_ehlo(words: tuple[str, ...]) -> None:
            lines = ["raw.test"] + list(words)
            out = "".join(f"250{'-' if i < len(lines) - 1 else ' '}{w}\r\n"
                          for i, w in enumerate(lines))
            send(out.encode("ascii"))

        send(b"220 raw.test ESMTP\r\n")
        while not self._stop.is_set():
            while b"\r\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
            line, buf = buf.split(b"\r\n", 1)
            self.lines.append(line)
            verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
            if verb in (b"EHLO", b"HELO"):
                if tls and self.ehlo_wait:
                    readable, _, _ = select.select([sock], [], [], self.ehlo_wait)
                    if readable or buf or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                        early = buf + (sock.recv(65536) if readable else b"")
                        self.spoke_early.append(early)
                        buf = early
                reply_ehlo(self.tls_ehlo if tls else
                           self.ehlo + (("STARTTLS",) if self.tls is not None else ()))
            elif verb == b"STARTTLS" and self.tls is not None and not tls:
                send(self.starttls_reply)
                buf = b""  # a correct server forgets what came before the handshake
                assert self.tls is not None
                sock = self.tls.wrap_socket(conn, server_side=True)
                tls = True
            elif verb == b"AUTH":
                send(b"235 2.7.0 Authentication successful\r\n")
            elif verb == b"MAIL":
                send(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                path = line.split(b":", 1)[1].strip()   # <address> [PARAMETERS]
                address = path.split(b">", 1)[0].lstrip(b"<").decode("utf-8", "replace")
                send((self.rcpt_replies.get(address, "250 2.1.5 Ok") + "\r\n").encode())
            elif verb == b"DATA":
                send(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                while b"\r\n.\r\n" not in buf:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                end = buf.index(b"\r\n.\r\n") + 5
                self.data.append(buf[:end])
                buf = buf[end:]
                send(b"250 2.0.0 Ok: queued\r\n")
            elif verb == b"RSET":
                send(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                send(b"221 2.0.0 Bye\r\n")
                return
            else:
                send(b"500 5.5.2 Error: command not recognized\r\n")

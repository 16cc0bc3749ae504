"""A next hop on raw sockets for the delivery client's transport behaviour.

Each connection is served in its own thread and recorded as a :class:`Session`
(command lines, whether the pipelined group arrived whole, how it ended). It can
misbehave on purpose: close a reused connection at its Nth MAIL without a reply
(as a server closing an idle connection just as a message comes), or send a 421
on an idle connection.
"""

from __future__ import annotations

import dataclasses
import select
import socket
import threading
import time
from typing import Optional

from tests.support.net import free_port


@dataclasses.dataclass
class Session:
    """What one connection did."""

    commands: list[str] = dataclasses.field(default_factory=list)
    #: For each MAIL: was the whole group, through DATA, there before we answered MAIL?
    grouped: list[bool] = dataclasses.field(default_factory=list)
    messages: int = 0
    #: MAIL commands that came inside an open transaction (a missing RSET).
    nested: int = 0
    ended: str = ""          # "quit", "eof", "dropped", "421"


class ScriptedHop:
    """Greets, offers PIPELINING (unless told not to), accepts every message."""

    def __init__(self, pipelining: bool = True, drop_at_mail: Optional[tuple[int, int]] = None,
                 idle_421: float = 0.0, refuse_rcpt: tuple[str, ...] = ()) -> None:
        self.pipelining = pipelining
        #: (session number from 1, MAIL number in it from 1): close there, no reply.
        self.drop_at_mail = drop_at_mail
        #: After a message, this many seconds of client silence bring a 421 and a close.
        self.idle_421 = idle_421
        self.refuse_rcpt = refuse_rcpt
        self.port = free_port()
        self.sessions: list[Session] = []
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(16)
        self._listener.settimeout(0.2)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> "ScriptedHop":
        """Serve in threads."""
        self._accepter.start()
        return self

    def stop(self) -> None:
        """Stop serving (open sessions end within a second)."""
        self._stop.set()
        self._accepter.join(5)
        for thread in self._threads:
            thread.join(5)
        self._listener.close()

    @property
    def messages(self) -> int:
        """Messages accepted over all sessions."""
        return sum(s.messages for s in self.sessions)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            session = Session()
            self.sessions.append(session)
            thread = threading.Thread(target=self._serve, args=(conn, session, len(self.sessions)),
                                      daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, session: Session, number: int) -> None:
        try:
            self._session(conn, session, number)
        except OSError:
            session.ended = session.ended or "error"
        finally:
            conn.close()

    def _session(self, conn: socket.socket, session: Session, number: int) -> None:
        buf = b""
        mails = 0
        in_transaction, accepted = False, 0
        conn.sendall(b"220 hop.test ESMTP\r\n")

        def fill(wait: float) -> bool:
            """Read what comes within ``wait`` seconds; False at end of stream."""
            nonlocal buf
            readable, _, _ = select.select([conn], [], [], wait)
            if not readable:
                return True
            chunk = conn.recv(65536)
            if not chunk:
                return False
            buf += chunk
            return True

        idle_since = time.monotonic()
        while not self._stop.is_set():
            if b"\r\n" not in buf:
                if self.idle_421 and session.messages and \
                        time.monotonic() - idle_since > self.idle_421:
                    conn.sendall(b"421 4.4.2 hop.test Error: timeout exceeded\r\n")
                    session.ended = "421"
                    return
                if not fill(0.05):
                    session.ended = session.ended or "eof"
                    return
                continue
            line, buf = buf.split(b"\r\n", 1)
            verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper().decode("ascii", "replace")
            session.commands.append(verb)
            if verb == "EHLO":
                words = ["hop.test"] + (["PIPELINING"] if self.pipelining else []) + ["8BITMIME"]
                conn.sendall("".join(f"250{'-' if i < len(words) - 1 else ' '}{w}\r\n"
                                     for i, w in enumerate(words)).encode())
            elif verb == "MAIL":
                mails += 1
                if self.drop_at_mail == (number, mails):
                    session.ended = "dropped"
                    return
                # causality, not timing: a pipelining client sends RCPT and DATA without
                # waiting for this reply, so they arrive while we hold it back
                deadline = time.monotonic() + (3.0 if self.pipelining else 0.0)
                while b"DATA\r\n" not in buf and time.monotonic() < deadline:
                    if not fill(0.05):
                        break
                session.grouped.append(b"DATA\r\n" in buf)
                if in_transaction:
                    session.nested += 1
                    conn.sendall(b"503 5.5.1 Error: nested MAIL command\r\n")
                    continue
                in_transaction = True
                conn.sendall(b"250 2.1.0 Ok\r\n")
            elif verb == "RCPT":
                address = line.split(b":", 1)[1].strip().strip(b"<>").decode()
                if not in_transaction:
                    conn.sendall(b"503 5.5.1 Error: need MAIL command\r\n")
                elif address in self.refuse_rcpt:
                    conn.sendall(b"550 5.1.1 no such user\r\n")
                else:
                    accepted += 1
                    conn.sendall(b"250 2.1.5 Ok\r\n")
            elif verb == "DATA":
                if not accepted:
                    conn.sendall(b"554 5.5.1 Error: no valid recipients\r\n")
                    continue
                conn.sendall(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                while b"\r\n.\r\n" not in buf:
                    if not fill(1.0):
                        session.ended = "eof"
                        return
                buf = buf[buf.index(b"\r\n.\r\n") + 5:]
                session.messages += 1
                in_transaction, accepted = False, 0
                conn.sendall(b"250 2.0.0 Ok: queued\r\n")
                idle_since = time.monotonic()
            elif verb == "RSET":
                in_transaction, accepted = False, 0
                conn.sendall(b"250 2.0.0 Ok\r\n")
            elif verb == "QUIT":
                conn.sendall(b"221 2.0.0 Bye\r\n")
                session.ended = "quit"
                return
            else:
                conn.sendall(b"500 5.5.2 Error: command not recognized\r\n")

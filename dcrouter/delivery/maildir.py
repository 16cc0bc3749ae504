"""Local delivery into Maildirs: ``<root>/<local part>/{tmp,new,cur}``.

This is final delivery, so the message gets what RFC 5321 4.4 and Postfix's
local(8) put in front of it: ``Return-Path: <envelope sender>`` and
``Delivered-To: <recipient>``.  A message that already carries a
``Delivered-To`` for this recipient has been here before: it is refused as a
mail forwarding loop (``5.4.6``, bounced) instead of being stored again.  The
mailbox directory is the local part lower-cased, in Unicode NFC
(:func:`dcrouter.address.maildir_name`): UTF-8 local parts (SMTPUTF8) get
UTF-8 directory names.

Each message is written to ``tmp/`` under a unique name from
``twisted.mail.maildir``'s generator (mode 0600), fsynced, renamed into
``new/`` and the directory fsynced.  Directories it creates - the root, the
mailbox and its ``tmp``, ``new``, ``cur`` - are 0700.  Blocking: call
:func:`deliver` in a thread.

Directory fsyncs are shared (group commit): deliveries into one ``new/`` that
finish while a directory fsync is running wait for the next one, which covers
all of their renames at once (:class:`DirectorySyncer`).
"""

from __future__ import annotations

import os
import re
import threading
import unicodedata
from typing import Optional

from twisted.mail import maildir

from dcrouter.address import header_text, maildir_name
from dcrouter.errors import PermanentDeliveryError
from dcrouter.tlsutil import ensure_private_dir

_names = maildir._MaildirNameGenerator(maildir.reactor)  # type: ignore[attr-defined]
#: The header section is looked at for Delivered-To up to this many bytes.
HEADER_SCAN_LIMIT = 256 * 1024
_DELIVERED_TO = re.compile(rb"^delivered-to[ \t]*:(.*)$", re.IGNORECASE | re.MULTILINE)


def mailbox_for(root: str, recipient: str) -> str:
    """The Maildir of ``recipient`` under ``root`` (local part, lower-cased, NFC)."""
    name = maildir_name(recipient)
    if name is None:
        raise PermanentDeliveryError(f"550 5.1.1 <{header_text(recipient)}>: bad local part "
                                     "for a mailbox")
    return os.path.join(root, name)


def _header_section(data: bytes) -> bytes:
    head = data[:HEADER_SCAN_LIMIT]
    end = head.find(b"\r\n\r\n")
    if end < 0 and head.startswith(b"\r\n"):
        return b""
    return head if end < 0 else head[:end + 2]


def delivered_to(data: bytes) -> list[str]:
    """The values of the message's ``Delivered-To`` header fields (unfolded, stripped)."""
    head = re.sub(rb"\r?\n[ \t]+", b" ", _header_section(data))
    return [m.group(1).decode("utf-8", "replace").strip()
            for m in _DELIVERED_TO.finditer(head.replace(b"\r\n", b"\n"))]


def _same(a: str, b: str) -> bool:
    """Addresses equal ignoring case and Unicode normalisation (for loop detection)."""
    return unicodedata.normalize("NFC", a).lower() == unicodedata.normalize("NFC", b).lower()


def trace_headers(recipient: str, mail_from: Optional[str]) -> bytes:
    """``Return-Path`` (when the sender is known) and ``Delivered-To`` for one delivery."""
    lines = []
    if mail_from is not None:
        lines.append(f"Return-Path: <{header_text(mail_from)}>\r\n")
    lines.append(f"Delivered-To: {header_text(recipient)}\r\n")
    return "".join(lines).encode("utf-8")


def new_name() -> str:
    """A unique Maildir file name (call in the reactor thread)."""
    return str(_names.generate().decode("ascii"))


class _DirState:
    def __init__(self) -> None:
        self.requested = 0
        self.done = 0
        self.running = False


class DirectorySyncer:
    """Makes renames into a directory durable with as few directory fsyncs as possible.

    :meth:`sync` returns once an fsync of the directory that *started after the
    call* has finished; callers that arrive while one runs share the next one.
    Thread-safe; ``fsyncs`` counts the fsyncs done.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._dirs: dict[str, _DirState] = {}
        self.fsyncs = 0

    def sync(self, path: str) -> None:
        """Block until ``path`` was fsynced after this call began."""
        with self._lock:
            state = self._dirs.setdefault(path, _DirState())
            state.requested += 1
            mine = state.requested
            while True:
                if state.done >= mine:
                    return
                if not state.running:
                    state.running = True
                    covers = state.requested
                    break
                self._changed.wait()
        synced = False
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            synced = True
        finally:
            with self._lock:
                state.running = False
                if synced:   # a failed fsync covers nobody: a waiter starts another one
                    self.fsyncs += 1
                    state.done = max(state.done, covers)
                self._changed.notify_all()


_directories = DirectorySyncer()


def deliver(root: str, recipient: str, data: bytes, name: str = "",
            mail_from: Optional[str] = None) -> str:
    """Store ``data`` in the recipient's Maildir under ``name``; returns the new file's path.

    ``mail_from`` is the envelope sender (``""`` for the null sender) for
    ``Return-Path``.  PermanentDeliveryError when the local part cannot be a
    mailbox or the message loops (it already has ``Delivered-To: recipient``).
    """
    box = mailbox_for(root, recipient)
    if any(_same(value, recipient) for value in delivered_to(data)):
        raise PermanentDeliveryError(f"554 5.4.6 mail forwarding loop for "
                                     f"<{header_text(recipient)}>")
    data = trace_headers(recipient, mail_from) + data
    for sub in ("tmp", "new", "cur"):
        # the root and the mailbox too, when this creates them: 0700 all the way down
        ensure_private_dir(os.path.join(box, sub))
    name = name or new_name()
    tmp = os.path.join(box, "tmp", name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    final = os.path.join(box, "new", name)
    os.rename(tmp, final)
    _directories.sync(os.path.join(box, "new"))
    return final

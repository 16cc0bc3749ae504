"""Local delivery into Maildirs: ``<root>/<local part>/{tmp,new,cur}``.

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

from twisted.mail import maildir

from dcrouter.errors import PermanentDeliveryError
from dcrouter.tlsutil import ensure_private_dir

_SAFE_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+\-=?^_`{|}~][A-Za-z0-9!#$%&'*+\-=?^_`{|}~.]*$")
_names = maildir._MaildirNameGenerator(maildir.reactor)  # type: ignore[attr-defined]


def mailbox_for(root: str, recipient: str) -> str:
    """The Maildir of ``recipient`` under ``root`` (local part, lower-cased)."""
    local = recipient.rpartition("@")[0].lower() or recipient.lower()
    if not _SAFE_LOCAL.match(local) or ".." in local or len(local) > 64:
        raise PermanentDeliveryError(f"550 5.1.3 bad local part for a mailbox: {local!r}")
    return os.path.join(root, local)


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


def deliver(root: str, recipient: str, data: bytes, name: str = "") -> str:
    """Store ``data`` in the recipient's Maildir under ``name``; returns the new file's path."""
    box = mailbox_for(root, recipient)
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

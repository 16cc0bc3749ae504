"""Local delivery into Maildirs: ``<root>/<local part>/{tmp,new,cur}``.

Each message is written to ``tmp/`` under a unique name from
``twisted.mail.maildir``'s generator, fsynced, renamed into ``new/`` and the
directory fsynced.  Blocking: call :func:`deliver` in a thread.
"""

from __future__ import annotations

import os
import re

from twisted.mail import maildir

from dcrouter.errors import PermanentDeliveryError

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


def deliver(root: str, recipient: str, data: bytes, name: str = "") -> str:
    """Store ``data`` in the recipient's Maildir under ``name``; returns the new file's path."""
    box = mailbox_for(root, recipient)
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(box, sub), mode=0o700, exist_ok=True)
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
    dfd = os.open(os.path.join(box, "new"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return final

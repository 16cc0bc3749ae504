"""Starting as root and dropping privileges, the way Postfix, NSD and HAProxy do.

``twistd --uid U --gid G dcrouter`` started as root runs in three phases:

1. ``makeService`` (root): the configuration is read; :func:`prepare_state_dir`
   creates ``router.state_dir`` for U if it is missing (and refuses one U cannot
   write); the service tree is then built *as U* (:func:`running_as`: effective
   uid, gid and groups of U), so the certificates, DKIM keys, queue and log file
   it creates belong to U and every file it reads must be readable by U, as it
   must be for every later reload;
2. ``privilegedStartService`` (root): only sockets are bound
   (:mod:`dcrouter.sockets`);
3. twistd switches to U for good (``setgid``, ``initgroups``, ``setuid``) and
   ``startService`` starts the services on the pre-bound sockets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import os
import pwd
from typing import Any, Iterator, Optional

from dcrouter.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DropTarget:
    """Who twistd will run as after the privileged start."""

    uid: int
    gid: int

    @property
    def user(self) -> str:
        """The user name (the uid as text when it has none)."""
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)

    @property
    def groups(self) -> list[int]:
        """``gid`` and the user's supplementary groups (what ``initgroups`` will set)."""
        try:
            return os.getgrouplist(pwd.getpwuid(self.uid).pw_name, self.gid)
        except KeyError:
            return [self.gid]

    def describe(self) -> str:
        """``user:group (uid N, gid M)``."""
        try:
            group = grp.getgrgid(self.gid).gr_name
        except KeyError:
            group = str(self.gid)
        return f"{self.user}:{group} (uid {self.uid}, gid {self.gid})"


def drop_target(twistd_options: Any) -> Optional[DropTarget]:
    """The ``--uid/--gid`` twistd will switch to, when it runs as root and will switch.

    ``twistd_options`` are twistd's own options (the plugin's ``parent``); as
    twistd does, a missing ``--gid`` is the user's primary group.
    """
    if twistd_options is None or os.geteuid() != 0:
        return None
    uid = twistd_options.get("uid")
    if uid is None or uid == 0:
        return None
    gid = twistd_options.get("gid")
    if gid is None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            raise ConfigError("--uid", f"no user with uid {uid}; give --gid too") from None
    return DropTarget(int(uid), int(gid))


@contextlib.contextmanager
def running_as(target: Optional[DropTarget]) -> Iterator[None]:
    """Run the block with the effective ids of ``target`` (nothing when None).

    The real and saved uid stay 0, so root comes back at the end of the block
    (binding and twistd's final switch need it).
    """
    if target is None:
        yield
        return
    saved_groups = os.getgroups()
    os.setgroups(target.groups)
    os.setegid(target.gid)
    os.seteuid(target.uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(saved_groups)


def prepare_state_dir(path: str, target: Optional[DropTarget]) -> None:
    """Make ``router.state_dir`` the target user's before anything is built.

    Missing: created (mode 0700, parents 0755) and given to the user.  Present:
    it must be writable by the user, or the start stops with a ConfigError that
    says how to fix it.  Nothing inside is touched.
    """
    if target is None:
        return
    path = os.path.abspath(path)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        os.mkdir(path, 0o700)
        os.chown(path, target.uid, target.gid)
        return
    with running_as(target):
        writable = os.access(path, os.W_OK | os.X_OK, effective_ids=True)
    if not writable:
        raise ConfigError("router.state_dir",
                          f"{path} is not writable by {target.describe()}, the user dcrouter "
                          f"runs as after binding its ports: chown -R {target.user}: {path}")


def check_log_file(path: str, target: Optional[DropTarget]) -> None:
    """``router.log_file`` must be writable by the target user (it is reopened after
    logrotate, by that user)."""
    if target is None or not path:
        return
    path = os.path.abspath(path)
    with running_as(target):
        if os.path.exists(path):
            ok = os.access(path, os.W_OK, effective_ids=True)
        else:
            ok = os.access(os.path.dirname(path), os.W_OK | os.X_OK, effective_ids=True)
    if not ok:
        raise ConfigError("router.log_file",
                          f"{path} cannot be written by {target.describe()}, the user "
                          f"dcrouter runs as (and reopens its log as on SIGHUP): use a "
                          f"directory that user owns, e.g. /var/log/dcrouter/")

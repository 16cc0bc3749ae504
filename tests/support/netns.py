"""Processes in a private network namespace (real port numbers, own loopback), as root.

:class:`NamespacedProcess` starts a command under ``unshare --net --mount``:
the namespace has only its loopback (brought up), so ports 25, 53, 80... are
free and nothing leaves the machine.  The private mount namespace makes the
interpreter, the virtualenv and the checkout readable by an unprivileged user
when one of their parent directories is not (pyenv under ``/root`` is 0700):
each such path is bind-mounted back over a tmpfs laid on the closed parent, in
that namespace only.  :func:`in_namespace` runs a client command inside the
same network namespace (``nsenter --net``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

from tests.support.proc import REPO, twistd_env


def _closed_ancestor(path: str) -> Optional[str]:
    """The top-most parent of ``path`` that others cannot traverse (None: all open)."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        candidate = os.sep.join(parts[:i]) or os.sep
        try:
            mode = os.stat(candidate).st_mode
        except OSError:
            return None
        if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
            return candidate
    return None


def _opening_script(paths: Sequence[str], keep_dir: str) -> list[str]:
    """Shell lines that make ``paths`` reachable for every user in this mount namespace."""
    lines: list[str] = []
    by_ancestor: dict[str, list[str]] = {}
    for path in paths:
        ancestor = _closed_ancestor(path)
        if ancestor is not None and ancestor != path:
            by_ancestor.setdefault(ancestor, []).append(os.path.abspath(path))
    for n, (ancestor, inside) in enumerate(sorted(by_ancestor.items())):
        kept = []
        for m, path in enumerate(inside):
            keep = os.path.join(keep_dir, f"{n}-{m}")
            lines.append(f"mkdir -p {keep} && mount --bind {shlex.quote(path)} {keep}")
            kept.append((keep, path))
        lines.append(f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(ancestor)}")
        for keep, path in kept:
            lines.append(f"mkdir -p {shlex.quote(path)} && mount --bind {keep} "
                         f"{shlex.quote(path)}")
    return lines


def readable_paths() -> list[str]:
    """What a dcrouter dropped to another user must still read: Python, the venv, the repo."""
    return [os.path.realpath(sys.base_prefix), os.path.dirname(os.path.dirname(sys.executable)),
            REPO]


class NamespacedProcess:
    """A command (normally twistd) as root in its own network and mount namespace."""

    def __init__(self, args: Sequence[str], cwd: str, log_path: str,
                 env: Optional[dict[str, str]] = None) -> None:
        self.keep_dir = tempfile.mkdtemp(prefix="dcrouter-ns-")
        setup = ["ip link set lo up", *_opening_script(readable_paths(), self.keep_dir)]
        script = " && ".join(setup) + ' && exec "$@"'
        self.log_path = log_path
        self._log = open(log_path, "wb")
        full_env = twistd_env()
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            ["unshare", "--net", "--mount", "--propagation", "private", "--",
             "sh", "-c", script, "sh", *args],
            cwd=cwd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        """The process id (unshare and sh exec the command: the same pid)."""
        return self.proc.pid

    def output(self) -> str:
        """Everything printed so far."""
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def run(self, args: Sequence[str], timeout: float = 60,
            input: Optional[str] = None) -> subprocess.CompletedProcess:
        """Run a client command inside this network namespace (as root)."""
        return in_namespace(self.pid, args, timeout=timeout, input=input)

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM and wait; the exit status."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(timeout)
        finally:
            self.close()

    def kill(self) -> None:
        """SIGKILL (after a failure)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.close()

    def close(self) -> None:
        """Close the log; remove the mount points' directory."""
        self._log.close()
        shutil.rmtree(self.keep_dir, ignore_errors=True)


def in_namespace(pid: int, args: Sequence[str], timeout: float = 60,
                 input: Optional[str] = None) -> subprocess.CompletedProcess:
    """``nsenter --net=/proc/PID/ns/net ARGS`` -> CompletedProcess with text output."""
    return subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", *args], env=twistd_env(),
                          capture_output=True, text=True, timeout=timeout, input=input)

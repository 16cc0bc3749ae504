"""A private Postfix instance on loopback for tests: its own config, queue and log.

``postfix -c DIR start`` with ``main.cf``/``master.cf`` written here: smtpd on
127.0.0.1:PORT, every other service it needs, no chroot, nothing of the
system's Postfix (``/etc/postfix`` is not read for the instance's settings).
The directory lives under /tmp with mode 0755 because Postfix's daemons run as
the ``postfix`` user and must reach the queue (pytest's tmp_path is 0700).
Debian package: ``postfix`` (see TEST_DEBS in the Makefile).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Optional

import pytest

from tests.support.net import free_port

SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
"""


def require_postfix() -> None:
    """Fail (never skip) when Postfix is not installed, naming the package."""
    for tool in ("postfix", "sendmail", "postconf"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            pytest.fail(f"{tool} not found: install the Debian package 'postfix' "
                        "(make test installs it)")


class PrivatePostfix:
    """One private Postfix: ``start()``, send with ``sendmail()``, read ``log``, ``stop()``.

    ``main``: extra main.cf settings; ``transports``: transport_maps entries
    (domain -> transport) as an inline table.
    """

    def __init__(self, main: Optional[dict[str, str]] = None,
                 transports: Optional[dict[str, str]] = None, port: int = 0) -> None:
        require_postfix()
        self.root = tempfile.mkdtemp(prefix="dcr-postfix-")
        os.chmod(self.root, 0o755)
        self.port = port or free_port()
        self.conf = os.path.join(self.root, "conf")
        self.maillog = os.path.join(self.root, "maillog")
        self.main = {
            "compatibility_level": "3.6",
            "queue_directory": os.path.join(self.root, "queue"),
            "data_directory": os.path.join(self.root, "data"),
            "command_directory": "/usr/sbin", "daemon_directory": "/usr/lib/postfix/sbin",
            "mail_owner": "postfix", "setgid_group": "postdrop",
            "myhostname": "postfix.test", "mydomain": "postfix.test",
            "myorigin": "postfix.test", "mydestination": "",
            "inet_interfaces": "127.0.0.1", "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "maillog_file": self.maillog, "maillog_file_prefixes": self.root,
            "alias_maps": "", "alias_database": "", "local_recipient_maps": "",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtp_dns_support_level": "disabled", "biff": "no",
            "default_transport": "discard",
        }
        if transports:
            table = ", ".join(f"{{ {domain} = {target} }}" for domain, target in transports.items())
            self.main["transport_maps"] = f"inline:{{ {table} }}"
        self.main.update(main or {})

    def start(self, timeout: float = 30.0) -> "PrivatePostfix":
        """Write the configuration and start the instance; wait until smtpd listens."""
        os.makedirs(self.conf)
        os.makedirs(self.main["queue_directory"])
        os.makedirs(self.main["data_directory"])
        shutil.chown(self.main["data_directory"], "postfix")
        with open(os.path.join(self.conf, "main.cf"), "w") as f:
            f.writelines(f"{k} = {v}\n" for k, v in self.main.items())
        with open(os.path.join(self.conf, "master.cf"), "w") as f:
            f.write(f"127.0.0.1:{self.port} inet n - n - - smtpd\n" + SERVICES)
        result = self._postfix("start")
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Postfix did not start: {result}\n{self.log[-3000:]}")
                time.sleep(0.1)

    def _postfix(self, command: str) -> str:
        done = subprocess.run(["postfix", "-c", self.conf, command], capture_output=True,
                              text=True, timeout=60)
        return (done.stdout + done.stderr).strip()

    def sendmail(self, args: list[str], message: bytes) -> None:
        """Submit ``message`` with Postfix's sendmail(1) into this instance."""
        subprocess.run(["sendmail", "-C", self.conf, *args], input=message, check=True,
                       timeout=30)

    @property
    def log(self) -> str:
        """The instance's maillog so far."""
        try:
            with open(self.maillog, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_log(self, needle: str, timeout: float = 20.0) -> str:
        """Block until ``needle`` is in the log; returns the log."""
        deadline = time.monotonic() + timeout
        while needle not in self.log:
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not in the Postfix log:\n{self.log[-3000:]}")
            time.sleep(0.1)
        return self.log

    def stop(self) -> None:
        """Stop the instance (``abort`` if its master outlives ``stop``) and remove it."""
        pid_file = os.path.join(self.main["queue_directory"], "pid", "master.pid")
        try:
            pid = 0
            if os.path.exists(pid_file):
                with open(pid_file) as f:
                    pid = int(f.read().split()[0])
            self._postfix("stop")
            deadline = time.monotonic() + 10
            while pid and _alive(pid):
                if time.monotonic() > deadline:
                    self._postfix("abort")
                    break
                time.sleep(0.1)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True

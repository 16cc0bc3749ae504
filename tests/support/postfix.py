"""A private Postfix instance on loopback, for tests and benchmarks (Debian package ``postfix``).

:class:`PostfixInstance` writes its own ``main.cf`` and ``master.cf`` into a
directory (queue, data directory and maillog below it, chroot off, smtpd bound
to 127.0.0.1 on a free port, nothing on port 25), runs ``postfix -c DIR
start-fg`` and stops it by the master's PID. Settings are Postfix's defaults
except what a loopback peer needs (``mynetworks``, no local delivery) and what
the caller passes in ``main`` (``relayhost``, ``smtp_tls_security_level``...).

:class:`SmtpSink` runs ``smtp-sink`` (from the same package) with ``-c`` and
reads its running counters (messages received, sessions) from its output.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Optional

from tests.support.net import free_port, wait_for_tcp

POSTFIX = "/usr/sbin/postfix"
SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"


def require_postfix() -> None:
    """Fail (never skip) with the package's name when Postfix is not installed."""
    for path in (POSTFIX, SMTP_SINK, SMTP_SOURCE):
        if not os.path.exists(path):
            raise AssertionError(f"{path} is missing: install the Debian package 'postfix' "
                                 "(it is in TEST_DEBS of the Makefile; run `make debs`)")


#: Daemons of a standard master.cf, chroot off (their inet smtpd is added per instance).
_MASTER = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixInstance:
    """A private Postfix (own config, queue and data directories) with smtpd on ``port``."""

    def __init__(self, main: Optional[dict[str, str]] = None,
                 smtpd_options: Optional[dict[str, str]] = None,
                 hostname: str = "postfix.test",
                 extra_smtpd: Optional[list[dict[str, str]]] = None) -> None:
        require_postfix()
        # Postfix's daemons open their files as the postfix user: every directory above
        # them must be searchable by it (pytest's tmp_path is not), so the instance lives in
        # a directory of its own, removed by stop()
        self.root = tempfile.mkdtemp(prefix="dcrouter-postfix-")
        os.chmod(self.root, 0o755)
        self.config_dir = os.path.join(self.root, "etc")
        self.queue_dir = os.path.join(self.root, "queue")
        self.data_dir = os.path.join(self.root, "data")
        self.maillog = os.path.join(self.root, "log", "maillog")
        self.port = free_port()
        self.hostname = hostname
        self.main = dict(main or {})
        self.smtpd_options = dict(smtpd_options or {})
        #: More smtpd listeners, each with its own -o options (e.g. wrapper mode TLS).
        self.extra_smtpd = [dict(o) for o in extra_smtpd or []]
        self.extra_ports = [free_port() for _ in self.extra_smtpd]
        self.proc: Optional[subprocess.Popen] = None
        self._out: Optional[object] = None

    def _main_cf(self) -> str:
        settings = {
            "compatibility_level": "3.6",
            "config_directory": self.config_dir,
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": self.hostname,
            "mydomain": "postfix.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "maillog_file": self.maillog,
            "maillog_file_prefixes": self.root,
            "smtputf8_enable": "no",
            "biff": "no",
            "append_dot_mydomain": "no",
        }
        settings.update(self.main)
        return "".join(f"{key} = {value}\n" for key, value in settings.items())

    def _master_cf(self) -> str:
        lines = []
        for port, opts in [(self.port, self.smtpd_options)] + list(zip(self.extra_ports,
                                                                       self.extra_smtpd)):
            options = "".join(f"\n  -o {key}={value}" for key, value in opts.items())
            lines.append(f"127.0.0.1:{port} inet n - n - - smtpd{options}\n")
        return "".join(lines) + _MASTER

    def start(self, timeout: float = 30.0) -> "PostfixInstance":
        """Write the configuration, start the master in the foreground, wait for smtpd."""
        for path in (self.config_dir, os.path.dirname(self.maillog)):
            os.makedirs(path, exist_ok=True)
        os.makedirs(self.queue_dir, exist_ok=True)
        os.chmod(self.root, 0o755)
        os.makedirs(self.data_dir, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        shutil.chown(self.data_dir, "postfix", "postfix")
        with open(os.path.join(self.config_dir, "main.cf"), "w") as f:
            f.write(self._main_cf())
        with open(os.path.join(self.config_dir, "master.cf"), "w") as f:
            f.write(self._master_cf())
        for name in ("dynamicmaps.cf", "postfix-files"):
            src = os.path.join("/etc/postfix", name)
            if os.path.exists(src):
                shutil.copy(src, self.config_dir)
        for name in ("dynamicmaps.cf.d", "postfix-files.d"):
            src = os.path.join("/etc/postfix", name)
            if os.path.isdir(src) and not os.path.exists(os.path.join(self.config_dir, name)):
                shutil.copytree(src, os.path.join(self.config_dir, name))
        self._out = open(os.path.join(self.root, "log", "master.out"), "wb")
        # postfix says nothing on a pipe without a tty: script gives it one
        self.proc = subprocess.Popen(
            ["script", "-qefc", f"{POSTFIX} -c {self.config_dir} start-fg", "/dev/null"],
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            wait_for_tcp(self.port, timeout=timeout)
        except TimeoutError:
            self.stop()
            raise AssertionError(f"postfix did not start:\n{self.output()}\n{self.log()}")
        return self

    def output(self) -> str:
        """What ``postfix start-fg`` printed."""
        path = os.path.join(self.root, "log", "master.out")
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def log(self) -> str:
        """The maillog so far."""
        try:
            with open(self.maillog, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 30.0, count: int = 1) -> list[str]:
        """Lines of the maillog matching the regular expression ``pattern`` once there are
        ``count`` of them; AssertionError with the log after ``timeout``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.log().splitlines() if regex.search(line)]
            if len(lines) >= count:
                return lines
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} maillog lines matching {pattern!r} after "
                                     f"{timeout}s:\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def queue_empty(self) -> bool:
        """No message files in the active, incoming, deferred or maildrop queues."""
        for sub in ("incoming", "active", "deferred", "maildrop", "hold"):
            for _, _, files in os.walk(os.path.join(self.queue_dir, sub)):
                if files:
                    return False
        return True

    def master_pid(self) -> Optional[int]:
        """The PID in the master's pid file."""
        try:
            with open(os.path.join(self.queue_dir, "pid", "master.pid")) as f:
                text = f.read().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    def stop(self) -> None:
        """``postfix stop`` (the master and its children), then reap the wrapper."""
        if self.proc is None:
            return
        pid = self.master_pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None
        if self._out is not None:
            self._out.close()  # type: ignore[attr-defined]
            self._out = None

    def cleanup(self) -> None:
        """Stop, then remove the instance's directory."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class SmtpSink:
    """``smtp-sink -c``: accepts every message; counts from its running counters."""

    _COUNTERS = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")

    def __init__(self, root: str, backlog: int = 1024, extra: Optional[list[str]] = None
                 ) -> None:
        require_postfix()
        self.root = root
        self.port = free_port()
        self.path = os.path.join(root, f"smtp-sink-{self.port}.out")
        os.makedirs(root, exist_ok=True)
        self._out = open(self.path, "wb")
        self.proc = subprocess.Popen(
            [SMTP_SINK, "-u", "postfix", "-c", *(extra or []), f"127.0.0.1:{self.port}",
             str(backlog)], stdin=subprocess.DEVNULL, stdout=self._out,
            stderr=subprocess.STDOUT)
        wait_for_tcp(self.port)

    def counters(self) -> tuple[int, int]:
        """(messages, sessions) received so far."""
        with open(self.path, "rb") as f:
            f.seek(max(0, os.path.getsize(self.path) - 200))
            tail = f.read()
        found = self._COUNTERS.findall(tail)
        if not found:
            return 0, 0
        sess, _, mesg = found[-1]
        return int(mesg), int(sess)

    def messages(self) -> int:
        """Messages received so far."""
        return self.counters()[0]

    def stop(self) -> None:
        """Kill it by PID."""
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._out.close()

"""NSD serving the same zones as a dcrouter under test, for side-by-side answers.

NSD (Debian package ``nsd``, see the Makefile's TEST_DEBS) runs unprivileged
from a temporary directory on a free loopback port, with response rate
limiting off (the differential tests send thousands of queries from one
address) and the CHAOS-class version/identity answers off (dcrouter answers
CHAOS with REFUSED).  Everything else is NSD's default configuration.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Optional

import dns.message
import dns.query

from dcrouter.dns.zone import ZoneSet
from tests.support.net import free_tcp_udp_port


def require_nsd() -> str:
    """The nsd binary; fails (never skips) naming the package when it is missing."""
    path = shutil.which("nsd") or ("/usr/sbin/nsd" if os.path.exists("/usr/sbin/nsd") else None)
    assert path, "NSD is needed: install the Debian package 'nsd' (make test does)"
    return path


class Nsd:
    """A running NSD; ``port`` answers UDP and TCP on 127.0.0.1.

    ``texts`` replaces the zone files written from ``zones`` (e.g. zones
    signed by ldns-signzone, origin -> master-file text).
    """

    def __init__(self, folder: str, zones: ZoneSet,
                 texts: Optional[dict[str, str]] = None) -> None:
        self.folder = folder
        self.port = free_tcp_udp_port()
        os.makedirs(folder, exist_ok=True)
        blocks = []
        for zone in zones:
            file_name = f"{zone.origin}.zone"
            with open(os.path.join(folder, file_name), "w") as f:
                f.write(texts[zone.origin] if texts else zone.to_zone_file())
            blocks.append(f'zone:\n  name: "{zone.origin}"\n  zonefile: "{file_name}"\n')
        conf = os.path.join(folder, "nsd.conf")
        with open(conf, "w") as f:
            f.write(f"""server:
  ip-address: 127.0.0.1
  port: {self.port}
  username: ""
  chroot: ""
  zonesdir: "{folder}"
  pidfile: "{folder}/nsd.pid"
  zonelistfile: "{folder}/zone.list"
  xfrdfile: "{folder}/xfrd.state"
  xfrdir: "{folder}"
  database: ""
  server-count: 1
  rrl-ratelimit: 0
  rrl-whitelist-ratelimit: 0
  hide-version: yes
  hide-identity: yes
  verbosity: 1
  logfile: "{folder}/nsd.log"
remote-control:
  control-enable: no
""" + "".join(blocks))
        self.proc: Optional[subprocess.Popen] = subprocess.Popen(
            [require_nsd(), "-d", "-c", conf], stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT)
        self._wait(next(iter(zones)).origin)

    def _wait(self, origin: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        query = dns.message.make_query(origin, "SOA")
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"nsd exited: {self.log()}")
            try:
                reply = dns.query.udp(query, "127.0.0.1", port=self.port, timeout=0.3)
                if reply.answer:
                    return
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"nsd did not answer: {self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        """NSD's log file (zone parse errors end up here)."""
        try:
            with open(os.path.join(self.folder, "nsd.log")) as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Terminate by PID and wait."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

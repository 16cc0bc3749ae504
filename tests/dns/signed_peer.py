"""Independent DNSSEC tools on dcrouter's zones: ldns-signzone as a second signer, the
verifiers (dnssec-verify, ldns-verify-zone) and the validating resolver (Unbound).

Every tool is a Debian package named in the Makefile's TEST_DEBS; a missing one
fails the test naming its package (never a skip).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
from typing import Optional

import dns.message
import dns.query

from dcrouter.dns.zone import NSEC, RRSIG, Zone

PACKAGES = {"ldns-signzone": "ldnsutils", "ldns-verify-zone": "ldnsutils",
            "ldns-dane": "ldnsutils", "dnssec-verify": "bind9-utils",
            "dnssec-signzone": "bind9-utils", "delv": "bind9-dnsutils", "unbound": "unbound",
            "posttls-finger": "postfix", "dig": "dnsutils"}


def require(tool: str) -> str:
    """The path of ``tool``; fails naming its Debian package when it is missing."""
    path = shutil.which(tool) or next(
        (p for p in (f"/usr/sbin/{tool}", f"/usr/bin/{tool}") if os.path.exists(p)), None)
    assert path, (f"{tool} is needed: install the Debian package '{PACKAGES.get(tool, tool)}' "
                  "(make test does)")
    return path


def unsigned_text(zone: Zone) -> str:
    """``zone`` as a master file without its NSEC and RRSIG records (what a signer gets:
    the data, DNSKEY, CDS and CDNSKEY included)."""
    lines = [f"$ORIGIN {zone.origin}.", f"$TTL {zone.content.ttl}"]
    for r in zone.records:
        if r.rtype not in (NSEC, RRSIG):
            lines.append(f"{r.owner}. {r.ttl} IN {r.type_name} {r.text}")
    return "\n".join(lines) + "\n"


def key_bases(state_dir: str, origin: str) -> list[str]:
    """dcrouter's key files of ``origin`` (``K<zone>.+alg+tag`` without extension)."""
    return sorted(p[:-len(".private")] for p in
                  glob.glob(os.path.join(state_dir, "dnssec", origin, "K*.private")))


def ldns_sign(zone: Zone, state_dir: str, work: str) -> str:
    """``zone`` signed by ldns-signzone with dcrouter's own keys (master-file text)."""
    os.makedirs(work, exist_ok=True)
    source = os.path.join(work, f"{zone.origin}.unsigned")
    with open(source, "w") as f:
        f.write(unsigned_text(zone))
    out = source + ".signed"
    proc = subprocess.run([require("ldns-signzone"), "-f", out, "-o", zone.origin + ".",
                           source, *key_bases(state_dir, zone.origin)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and os.path.exists(out), proc.stderr
    with open(out) as f:
        return f.read()


def axfr_text(port: int, origin: str) -> str:
    """The zone as dig transfers it from 127.0.0.1:port (master-file lines)."""
    proc = subprocess.run([require("dig"), "@127.0.0.1", "-p", str(port), origin + ".", "AXFR",
                           "+nocomments", "+nostats", "+nocmd", "+onesoa"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "Transfer failed" not in proc.stdout, proc.stdout
    return proc.stdout


def dnssec_verify(text: str, origin: str, work: str) -> subprocess.CompletedProcess:
    """BIND's dnssec-verify on a zone file."""
    path = os.path.join(work, f"{origin}.verify")
    with open(path, "w") as f:
        f.write(text)
    return subprocess.run([require("dnssec-verify"), "-o", origin + ".", path],
                          capture_output=True, text=True, timeout=60)


def ldns_verify(text: str, work: str, name: str = "zone") -> subprocess.CompletedProcess:
    """ldns-verify-zone on a zone file."""
    path = os.path.join(work, f"{name}.ldns")
    with open(path, "w") as f:
        f.write(text)
    return subprocess.run([require("ldns-verify-zone"), path], capture_output=True, text=True,
                          timeout=60)


class Unbound:
    """A validating Unbound on 127.0.0.1 with ``anchor`` (DS or DNSKEY lines) as its trust
    anchor and stub zones pointing at dcrouter (``stubs``: zone -> port)."""

    def __init__(self, folder: str, port: int, anchor: str, stubs: dict[str, int],
                 extra: str = "", stub_host: str = "127.0.0.1") -> None:
        self.folder = folder
        self.port = port
        os.makedirs(folder, exist_ok=True)
        anchor_path = os.path.join(folder, "anchor.txt")
        with open(anchor_path, "w") as f:
            f.write(anchor.strip() + "\n")
        stub_text = "".join(f'stub-zone:\n  name: "{z}."\n  stub-addr: {stub_host}@{p}\n'
                            for z, p in stubs.items())
        conf = os.path.join(folder, "unbound.conf")
        with open(conf, "w") as f:
            f.write(f"""server:
  interface: 127.0.0.1
  port: {port}
  username: ""
  chroot: ""
  directory: "{folder}"
  pidfile: "{folder}/unbound.pid"
  logfile: "{folder}/unbound.log"
  use-syslog: no
  verbosity: 1
  do-not-query-localhost: no
  do-ip6: no
  access-control: 127.0.0.0/8 allow
  trust-anchor-file: "{anchor_path}"
  local-zone: "test." nodefault
  val-log-level: 2
  harden-referral-path: no
  qname-minimisation: no
  {extra}
{stub_text}""")
        self.proc: Optional[subprocess.Popen] = subprocess.Popen(
            [require("unbound"), "-d", "-c", conf], stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT)
        self._wait()

    def _wait(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        query = dns.message.make_query(".", "NS")
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"unbound exited: {self.log()}")
            try:
                dns.query.udp(query, "127.0.0.1", port=self.port, timeout=0.3)
                return
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"unbound did not answer: {self.log()}")
            time.sleep(0.05)

    def ask(self, name: str, rdtype: str) -> dns.message.Message:
        """A recursive query with DO (the AD bit says validated)."""
        query = dns.message.make_query(name, rdtype, want_dnssec=True)
        return dns.query.udp(query, "127.0.0.1", port=self.port, timeout=10)

    def log(self) -> str:
        """The end of Unbound's log."""
        try:
            with open(os.path.join(self.folder, "unbound.log")) as f:
                return f.read()[-4000:]
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

"""Run inside a private network and mount namespace (``unshare -n -m``): dcrouter on the
real ports (SMTP 25 on 127.0.0.1, DNS 53 on 127.0.0.2), a validating Unbound on
127.0.0.1:53 as the system resolver (``/etc/resolv.conf`` bind-mounted with
``options trust-ad``), and Postfix's ``posttls-finger`` looking up the MX, the
A record and the TLSA of ``example.test`` through it, as a DANE sender does.

    unshare -n -m -- python tests/dns/dane_netns.py WORKDIR

Two destinations: ``example.test`` (its MX ``mail.example.test``, the TLSA
dcrouter publishes) and ``[mx2.example.test]`` (the same listener, but an
operator's TLSA naming another key, which wins over the generated one).
Prints one JSON object: each posttls-finger run's output and exit status,
Unbound's AD for the TLSA lookups.  Every process it starts is stopped by
PID before it exits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import dns.dnssec
import dns.flags
import dns.message
import dns.query
import dns.rdatatype

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tests.dns.signed_peer import Unbound, require  # noqa: E402

HOST = "mail.example.test"


def config(work: str) -> str:
    """dcrouter's configuration: signed example.test, SMTP on 25, DNS on 127.0.0.2:53."""
    extra = (f'  {{ name = "mx2", type = "A", value = "127.0.0.1" }},\n'
             f'  {{ name = "_25._tcp.mx2", type = "TLSA", value = "3 1 1 {"ab" * 32}" }},\n')
    path = os.path.join(work, "dcrouter.toml")
    with open(path, "w") as f:
        f.write(f"""[router]
state_dir = "{work}/state"
log_level = "info"

[email]
hostname = "{HOST}"
listen = "127.0.0.1"
ports = [25]
queue = {{ storage_type = "memory" }}

[[email.domain_rules]]
pattern = "*@example.test"
mode = "mta"
mta_options = {{ local_delivery_path = "{work}/mail" }}

[dns]
listen = "127.0.0.2"
port = 53
rate_limit = 0
publish_email_records = true
dane = {{ hosts = ["mx2.example.test"] }}

[[dns.zones]]
origin = "example.test"
ttl = 300
dnssec = true
records = [
  {{ name = "www", type = "A", value = "192.0.2.10" }},
{extra}]
""")
    return path


def wait_dns(host: str, port: int, name: str, rdtype: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            reply = dns.query.udp(dns.message.make_query(name, rdtype), host, port=port,
                                  timeout=0.5)
            if reply.answer:
                return reply
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"no DNS answer for {name} {rdtype} at {host}:{port}")
        time.sleep(0.1)


def main() -> None:
    work = sys.argv[1]
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    resolv = os.path.join(work, "resolv.conf")
    with open(resolv, "w") as f:
        f.write("nameserver 127.0.0.1\noptions trust-ad edns0\n")
    subprocess.run(["mount", "--bind", resolv, "/etc/resolv.conf"], check=True)
    env = dict(os.environ, PYTHONPATH=REPO)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    procs: list[Any] = []
    unbound = None
    try:
        procs.append(subprocess.Popen(
            [twistd, "-n", "--pidfile=", "dcrouter", "--config", config(work)],
            cwd=work, env=env, stdout=open(os.path.join(work, "dcrouter.log"), "wb"),
            stderr=subprocess.STDOUT))
        keys = wait_dns("127.0.0.2", 53, "example.test.", "DNSKEY")
        wait_dns("127.0.0.2", 53, f"_25._tcp.{HOST}.", "TLSA")
        ksk = next(k for rrset in keys.answer for k in rrset if k.flags == 257)
        anchor = f"example.test. IN DS {dns.dnssec.make_ds('example.test.', ksk, 'SHA256')}"
        unbound = Unbound(os.path.join(work, "unbound"), 53, anchor, {"example.test": 53},
                          stub_host="127.0.0.2")
        postfix = os.path.join(work, "postfix")
        os.makedirs(postfix, exist_ok=True)
        with open(os.path.join(postfix, "main.cf"), "w") as f:
            f.write("compatibility_level = 3.6\nsmtp_dns_support_level = dnssec\n"
                    "smtp_tls_security_level = dane\n")
        out = {}
        for label, destination, tlsa_name in (
                ("right", "example.test", f"_25._tcp.{HOST}."),
                ("wrong", "[mx2.example.test]", "_25._tcp.mx2.example.test.")):
            query = dns.message.make_query(tlsa_name, "TLSA", want_dnssec=True)
            reply = dns.query.udp(query, "127.0.0.1", port=53, timeout=10)
            finger = subprocess.run(
                [require("posttls-finger"), "-c", "-l", "dane", "-t", "10", "-T", "10",
                 "-L", "summary,certmatch", destination],
                capture_output=True, text=True, timeout=60,
                env=dict(os.environ, MAIL_CONFIG=postfix))
            out[label] = {"tlsa_ad": bool(reply.flags & dns.flags.AD),
                          "exit": finger.returncode, "output": finger.stdout + finger.stderr}
        out["unbound_log"] = unbound.log()[-1500:]
        print(json.dumps(out))
    finally:
        if unbound is not None:
            unbound.stop()
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


if __name__ == "__main__":
    main()

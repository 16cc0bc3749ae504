"""TLS handshakes per second on SMTP, full against resumed, dcrouter beside Postfix's smtpd.

Both servers use the same RSA-2048 certificate (made here) and their defaults otherwise:
dcrouter (``twistd -n dcrouter``: session tickets on, ``email.tls.session_cache_timeout``
3600 s) with one STARTTLS port and one implicit-TLS port; a private Postfix 3.7 (smtpd
with ``smtpd_tls_security_level = may``, its default ``smtpd_tls_session_cache_timeout``
of 3600 s, which turns session tickets on) with a STARTTLS smtpd and a
``smtpd_tls_wrappermode = yes`` one. ``bench/tls_handshake.c`` (built here with cc,
``-lssl -lcrypto``, Debian ``libssl-dev``) makes one connection after the other for
``--seconds`` (``--clients`` of them at once): ``new`` = a full handshake each time, ``resume`` = the previous
connection's session (ticket) offered. Targets alternate, round by round.

Usage::

    .venv/bin/python bench/tls_resume.py                 # 2 rounds, 4 s per measurement
    .venv/bin/python bench/tls_resume.py --rounds 1 --seconds 2 --versions 1.3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.smtp_accept import tree_cpu_seconds  # noqa: E402
from dcrouter.tlsutil import make_self_signed  # noqa: E402
from tests.support.net import free_port, wait_for_tcp  # noqa: E402
from tests.support.postfix import PostfixInstance  # noqa: E402


def build_client(out_dir: str) -> str:
    """Compile bench/tls_handshake.c."""
    binary = os.path.join(out_dir, "tls_handshake")
    subprocess.run(["cc", "-O2", "-o", binary, os.path.join(REPO, "bench", "tls_handshake.c"),
                    "-lssl", "-lcrypto"], check=True)
    return binary


class Servers:
    """dcrouter and Postfix, each with a STARTTLS and an implicit-TLS listener."""

    def __init__(self, work: str) -> None:
        cert, key = make_self_signed(["bench.test", "127.0.0.1"])
        self.cert = os.path.join(work, "cert.pem")
        self.key = os.path.join(work, "key.pem")
        with open(self.cert, "wb") as f:
            f.write(cert)
        with open(self.key, "wb") as f:
            f.write(key)
        os.chmod(self.key, 0o600)
        os.chmod(work, 0o755)
        # dcrouter
        self.state = tempfile.mkdtemp(prefix="bench-tls-dcrouter-")
        self.d_plain, self.d_tls = free_port(), free_port()
        cfg = os.path.join(self.state, "dcrouter.toml")
        with open(cfg, "w") as f:
            f.write(f"""
[router]
state_dir = "{self.state}"
log_file = "{self.state}/dcrouter.log"

[email]
hostname = "bench.test"
listen = "127.0.0.1"
ports = [{self.d_plain}, {self.d_tls}]
submission_ports = []
implicit_tls_ports = [{self.d_tls}]

[email.tls]
cert_path = "{self.cert}"
key_path = "{self.key}"
""")
        self._out = open(os.path.join(self.state, "twistd.out"), "wb")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.proc = subprocess.Popen([twistd, "-n", "--pidfile=", "dcrouter", "--config", cfg],
                                     env=dict(os.environ, PYTHONPATH=REPO), cwd=self.state,
                                     stdout=self._out, stderr=subprocess.STDOUT)
        wait_for_tcp(self.d_plain, timeout=60)
        # Postfix
        tls = {"smtpd_tls_cert_file": self.cert, "smtpd_tls_key_file": self.key,
               "smtpd_tls_security_level": "may"}
        self.postfix = PostfixInstance(main=tls, extra_smtpd=[
            {"smtpd_tls_wrappermode": "yes", "smtpd_tls_security_level": "encrypt"}])
        self.postfix.start()
        self.p_plain, self.p_tls = self.postfix.port, self.postfix.extra_ports[0]
        wait_for_tcp(self.p_tls)

    def cpu(self, name: str) -> float:
        """CPU seconds of the server so far (Postfix: master and its live children)."""
        if name == "dcrouter":
            return tree_cpu_seconds(self.proc.pid)
        pid = self.postfix.master_pid()
        return tree_cpu_seconds(pid) if pid else 0.0

    def port(self, name: str, starttls: bool) -> int:
        if name == "dcrouter":
            return self.d_plain if starttls else self.d_tls
        return self.p_plain if starttls else self.p_tls

    def stop(self) -> None:
        self.postfix.cleanup()
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._out.close()
        shutil.rmtree(self.state, ignore_errors=True)


def measure(client: str, port: int, seconds: float, mode: str, version: str,
            starttls: bool, clients: int) -> dict[str, float]:
    """``clients`` client processes at once; their connections summed."""
    procs = [subprocess.Popen([client, "127.0.0.1", str(port), str(seconds), mode, version,
                               "1" if starttls else "0"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(clients)]
    total: dict[str, float] = {"connections": 0.0, "reused": 0.0, "failed": 0.0}
    longest = 0.0
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 60)
        fields = out.split()
        values = dict(zip(fields[::2], (float(v) for v in fields[1::2])))
        if proc.returncode != 0 or "per_second" not in values:
            raise RuntimeError(f"tls_handshake failed: {out} {err}")
        for key in total:
            total[key] += values[key]
        longest = max(longest, values["seconds"])
    total["per_second"] = total["connections"] / longest
    return total


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--versions", default="1.3,1.2")
    parser.add_argument("--starttls", default="implicit,starttls")
    parser.add_argument("--clients", type=int, default=4,
                        help="client processes at once (each: one connection after another)")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench-tls-")
    client = build_client(work)
    servers = Servers(work)
    load = os.getloadavg()
    print(f"cores: {os.cpu_count()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"{args.seconds:.0f} s per measurement, {args.clients} clients, {args.rounds} rounds",
          flush=True)
    results: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    try:
        for n in range(args.rounds):
            for version in args.versions.split(","):
                for how in args.starttls.split(","):
                    for mode in ("new", "resume"):
                        for name in ("postfix", "dcrouter"):
                            cpu0 = servers.cpu(name)
                            r = measure(client, servers.port(name, how == "starttls"),
                                        args.seconds, mode, version, how == "starttls",
                                        args.clients)
                            r["cpu_ms"] = 1000 * (servers.cpu(name) - cpu0) / max(
                                1.0, r["connections"])
                            results.setdefault((version, how, mode, name), []).append(r)
                            print(f"round {n + 1} TLS {version} {how:8s} {mode:6s} "
                                  f"{name:8s} {r['per_second']:7.1f} handshakes/s  "
                                  f"reused {int(r['reused'])}/{int(r['connections'])}  "
                                  f"failed {int(r['failed'])}  server CPU "
                                  f"{r['cpu_ms']:.2f} ms each", flush=True)
    finally:
        servers.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("\nmedians (handshakes/s; resumed share):")
    for (version, how, mode, name), rs in results.items():
        rate = statistics.median(r["per_second"] for r in rs)
        share = sum(r["reused"] for r in rs) / max(1.0, sum(r["connections"] for r in rs))
        cpu = statistics.median(r["cpu_ms"] for r in rs)
        print(f"  TLS {version} {how:8s} {mode:6s} {name:8s} {rate:7.1f}/s  "
              f"resumed {100 * share:5.1f}%  server CPU {cpu:.2f} ms each")


if __name__ == "__main__":
    main()

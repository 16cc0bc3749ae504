"""Benchmark: TCP/TLS proxy figures of dcrouter beside HAProxy 2.6, measured with C clients.

Everything runs on loopback with ephemeral ports; every peer is started once and the rounds are
interleaved (round 1 of every peer, then round 2 ...), so a load spike from other work on the
machine hits all peers alike.  The load generators are C: ``bench/proxy_load.c`` (built here with
``cc -O2``) and ``openssl s_time``; the backend is the same C epoll server for every peer.

Peers:

* ``haproxy``: HAProxy ``nbthread 1``, ``mode tcp``, route by ``req.ssl_sni``;
* ``haproxy-splice``: the same plus ``option splice-auto`` (the upper reference);
* ``dcrouter``: a real ``twistd -n dcrouter`` with one ``tls = "passthrough"`` route (splice relay);
* ``dcrouter-twisted``: the same with ``[proxy] splice = false`` (the Twisted relay);
* ``dcrouter-workers=N`` (``--router-workers N``): ``router.workers = N``;
* ``direct``: the backend itself.

Figures (SNI passthrough):

* **bulk**: ``proxy_load bulk``: one connection, a ClientHello then ``--mib`` MiB, EOF, the clock
  stops at the EOF the backend sends back after reading everything;
* **new connections/s**: ``--clients`` processes of ``proxy_load conn`` with ``--inflight``
  connections each for ``--seconds``: connect, ClientHello with SNI, read ``ok``, close (RST).
  Beside the wall-clock rate the proxy's CPU time (user + system, all its processes) gives
  **connections per CPU-second**: the per-core figure, and the basis of the projection for
  ``router.workers`` on more cores (workers share nothing, SO_REUSEPORT spreads connections).

TLS termination (``--tls``; the same certificate for both; ``--cert ecdsa|rsa``): dcrouter
``tls = "terminate"``, ``http = false`` beside HAProxy ``bind ... ssl crt``, both relaying to the
backend; ``--tls-clients`` parallel ``openssl s_time -new -www /`` (full handshakes, each
connection then relays one HTTP/1.0 request to the backend and its answer; TLS 1.3 unless
``--tls12``) and ``-reuse`` (resumed sessions; TLS 1.2 tickets, since s_time never reads the
tickets TLS 1.3 sends after the handshake) for ``--tls-seconds``.

Usage::

    python bench/proxy_throughput.py [--mib 1024] [--seconds 5] [--runs 3] [--clients 4]
        [--inflight 64] [--router-workers 0] [--tls] [--tls-seconds 5] [--tls-clients 2]
        [--cert ecdsa] [--peers haproxy,haproxy-splice,dcrouter,dcrouter-twisted,direct]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "bench.example.test"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int, timeout: float = 30.0, log: str = "") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                if log:
                    with open(log, errors="replace") as f:
                        sys.stderr.write(f.read()[-3000:])
                raise
            time.sleep(0.05)


def client_hello(name: str) -> bytes:
    """The ClientHello Python's ssl module sends for ``name``."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def build_load(tmp: str) -> str:
    exe = os.path.join(tmp, "proxy_load")
    subprocess.run(["cc", "-O2", "-Wall", "-o", exe, os.path.join(REPO, "bench", "proxy_load.c")],
                   check=True)
    return exe


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry))
            except OSError:
                continue
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        todo.extend(children.get(p, ()))
    return total


# -- peers ------------------------------------------------------------------------------

class Peer:
    """A started proxy (or the backend itself): name, port, process."""

    def __init__(self, name: str, port: int, proc: Optional[subprocess.Popen]) -> None:
        self.name = name
        self.port = port
        self.proc = proc

    def cpu(self) -> float:
        return tree_cpu(self.proc.pid) if self.proc is not None else 0.0

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def write_cert(tmp: str, kind: str) -> tuple[str, str, str]:
    """A self-signed certificate: (cert, key, cert+key for HAProxy)."""
    sys.path.insert(0, REPO)
    from dcrouter.tlsutil import make_self_signed
    cert, key = make_self_signed([NAME], key_type=kind)
    paths = [os.path.join(tmp, f"bench-{kind}.{n}") for n in ("crt", "key", "pem")]
    for path, data in zip(paths, (cert, key, cert + key)):
        with open(path, "wb") as f:
            f.write(data)
    return paths[0], paths[1], paths[2]


def start_dcrouter(tmp: str, name: str, backend: int, splice: bool = True, workers: int = 1,
                   tls: Optional[tuple[str, str]] = None) -> Peer:
    port = free_port()
    mode = f'tls = "passthrough"\ndomains = ["{NAME}"]\n'
    if tls is not None:
        mode = (f'tls = "terminate"\ndomains = ["*"]\nhttp = false\n'
                f'cert_path = "{tls[0]}"\nkey_path = "{tls[1]}"\n')
    state = os.path.join(tmp, f"state-{name}")
    config = os.path.join(tmp, f"{name}.toml")
    with open(config, "w") as f:
        f.write(f"""[router]
state_dir = "{state}"
log_level = "warn"
workers = {workers}

[proxy]
listen = "127.0.0.1"
splice = {"true" if splice else "false"}

[[proxy.routes]]
name = "bench"
ports = [{port}]
{mode}targets = ["127.0.0.1:{backend}"]
health_check_interval = 0
max_connections = 1000000
max_connections_per_ip = 1000000
""")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    proc = subprocess.Popen([twistd, "-n", "--pidfile=", "dcrouter", "--config", config],
                            cwd=tmp, env=env, stdout=open(os.path.join(tmp, f"{name}.log"), "wb"),
                            stderr=subprocess.STDOUT)
    wait_for(port, log=os.path.join(tmp, f"{name}.log"))
    if workers > 1:
        time.sleep(3.0)  # worker 0 answers first; the others start once it is ready
    return Peer(name, port, proc)


def start_haproxy(tmp: str, name: str, backend: int, splice: bool = False,
                  tls_pem: str = "") -> Peer:
    port = free_port()
    config = os.path.join(tmp, f"{name}.cfg")
    if tls_pem:
        frontend = (f"    bind 127.0.0.1:{port} ssl crt {tls_pem} ssl-min-ver TLSv1.2\n"
                    f"    default_backend be\n")
    else:
        frontend = (f"    bind 127.0.0.1:{port}\n    tcp-request inspect-delay 5s\n"
                    f"    tcp-request content accept if {{ req.ssl_hello_type 1 }}\n"
                    f"    use_backend be if {{ req.ssl_sni -i {NAME} }}\n")
    with open(config, "w") as f:
        f.write(f"""global
    nbthread 1
    maxconn 4000
defaults
    mode tcp
{"    option splice-auto" + chr(10) if splice else ""}    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
{frontend}backend be
    server s1 127.0.0.1:{backend}
""")
    proc = subprocess.Popen(["haproxy", "-db", "-f", config],
                            stdout=open(os.path.join(tmp, f"{name}.log"), "wb"),
                            stderr=subprocess.STDOUT)
    wait_for(port, log=os.path.join(tmp, f"{name}.log"))
    return Peer(name, port, proc)


# -- measurements --------------------------------------------------------------------------

def bulk(load: str, hello: str, peer: Peer, mib: int) -> tuple[float, float]:
    """(MiB/s, proxy CPU seconds per GiB) of one connection."""
    cpu = peer.cpu()
    out = subprocess.run([load, "bulk", str(peer.port), hello, str(mib)], check=True,
                         capture_output=True, text=True).stdout
    used = peer.cpu() - cpu
    return float(out.split()[0]), used * 1024 / mib


def connections(load: str, hello: str, peer: Peer, seconds: float, clients: int,
                inflight: int) -> tuple[float, float, int]:
    """(connections/s, connections per proxy CPU-second, failures)."""
    cpu = peer.cpu()
    procs = [subprocess.Popen([load, "conn", str(peer.port), hello, str(seconds), str(inflight)],
                              stdout=subprocess.PIPE, text=True) for _ in range(clients)]
    done = failed = 0
    for p in procs:
        out, _ = p.communicate()
        ok, bad = out.split()
        done += int(ok)
        failed += int(bad)
    used = peer.cpu() - cpu
    return done / seconds, (done / used if used > 0 else 0.0), failed


def handshakes(peer: Peer, seconds: int, clients: int, reuse: bool,
               tls12: bool) -> tuple[float, float]:
    """(handshakes/s, handshakes per proxy CPU-second) with ``openssl s_time``."""
    # -www: each connection sends a request the proxy must relay to the backend and reads the
    # answer (without it HAProxy never connects the backend of a client that leaves at once)
    cmd = ["openssl", "s_time", "-connect", f"127.0.0.1:{peer.port}", "-time", str(seconds),
           "-reuse" if reuse else "-new", "-www", "/"]
    if tls12:
        cmd.append("-tls1_2")
    cpu = peer.cpu()
    start = time.monotonic()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(clients)]
    total = 0
    for p in procs:
        out, _ = p.communicate()
        match = re.search(r"(\d+) connections in [\d.]+s", out)
        if match is None:
            raise RuntimeError(f"s_time against {peer.name}: {out[-500:]}")
        total += int(match.group(1))
    elapsed = time.monotonic() - start
    used = peer.cpu() - cpu
    return total / elapsed, (total / used if used > 0 else 0.0)


def rounds(peers: list[Peer], runs: int, measure: Callable[[Peer], tuple]) -> dict[str, list]:
    """``runs`` interleaved rounds over ``peers``; each peer's list of results."""
    results: dict[str, list] = {p.name: [] for p in peers}
    for _ in range(runs):
        for peer in peers:
            results[peer.name].append(measure(peer))
    return results


def med(values: list[tuple], i: int) -> float:
    return statistics.median(v[i] for v in values)


def report(title: str, columns: list[str], results: dict[str, list], fmt: list[str],
           ref: str, ratio_cols: list[int]) -> None:
    print(f"\n{title}")
    print("| peer | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for name, values in results.items():
        cells = []
        for i, f in enumerate(fmt):
            runs = ", ".join(f.format(v[i]) for v in values)
            cells.append(f"{f.format(med(values, i))} ({runs})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if ref in results:
        for name in results:
            if name.startswith("dcrouter"):
                ratios = [f"{columns[i]} {med(results[name], i) / med(results[ref], i):.2f}x"
                          for i in ratio_cols if med(results[ref], i)]
                print(f"{name} / {ref}: " + ", ".join(ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--router-workers", type=int, default=0,
                        help="also measure dcrouter with router.workers = N")
    parser.add_argument("--peers", default="haproxy,haproxy-splice,dcrouter,dcrouter-twisted,direct")
    parser.add_argument("--no-passthrough", action="store_true")
    parser.add_argument("--tls", action="store_true", help="also TLS termination handshakes/s")
    parser.add_argument("--tls-seconds", type=int, default=5)
    parser.add_argument("--tls-clients", type=int, default=2)
    parser.add_argument("--tls12", action="store_true")
    parser.add_argument("--cert", choices=("ecdsa", "rsa"), default="ecdsa")
    args = parser.parse_args()
    wanted = args.peers.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        load = build_load(tmp)
        hello = os.path.join(tmp, "hello.bin")
        with open(hello, "wb") as f:
            f.write(client_hello(NAME))
        backend_port = free_port()
        backend = subprocess.Popen([load, "backend", str(backend_port)])
        wait_for(backend_port)
        peers: list[Peer] = []
        try:
            if not args.no_passthrough:
                starters: dict[str, Callable[[], Peer]] = {
                    "haproxy": lambda: start_haproxy(tmp, "haproxy", backend_port),
                    "haproxy-splice": lambda: start_haproxy(tmp, "haproxy-splice", backend_port,
                                                            splice=True),
                    "dcrouter": lambda: start_dcrouter(tmp, "dcrouter", backend_port),
                    "dcrouter-twisted": lambda: start_dcrouter(tmp, "dcrouter-twisted",
                                                               backend_port, splice=False),
                    "direct": lambda: Peer("direct", backend_port, None),
                }
                for n in wanted:                        # one by one: a failed start
                    if n in starters:                   # still stops those started
                        peers.append(starters[n]())
                if args.router_workers > 1:
                    peers.append(start_dcrouter(tmp, f"dcrouter-workers={args.router_workers}",
                                                backend_port, workers=args.router_workers))
                for peer in peers:                      # warm-up
                    bulk(load, hello, peer, 16)
                    connections(load, hello, peer, 0.5, 1, 8)
                print(f"cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; "
                      f"medians of {args.runs} interleaved rounds")
                res = rounds(peers, args.runs, lambda p: bulk(load, hello, p, args.mib))
                report(f"SNI passthrough, bulk: one connection, {args.mib} MiB",
                       ["MiB/s", "proxy CPU s per GiB"], res, ["{:,.0f}", "{:.2f}"],
                       "haproxy", [0])
                res = rounds(peers, args.runs, lambda p: connections(
                    load, hello, p, args.seconds, args.clients, args.inflight))
                report(f"SNI passthrough, new connections ({args.clients} clients x "
                       f"{args.inflight} in flight, {args.seconds:g} s)",
                       ["connections/s", "per proxy CPU-second", "failed"], res,
                       ["{:,.0f}", "{:,.0f}", "{:d}"], "haproxy", [0, 1])
                print(f"load average after: {os.getloadavg()[0]:.1f}")
                for peer in peers:
                    peer.stop()
                peers = []
            if args.tls:
                cert, key, pem = write_cert(tmp, args.cert)
                peers.append(start_haproxy(tmp, "haproxy-tls", backend_port, tls_pem=pem))
                peers.append(start_dcrouter(tmp, "dcrouter-tls", backend_port, tls=(cert, key)))
                for peer in peers:
                    handshakes(peer, 1, 1, False, args.tls12)
                for reuse in (False, True):
                    # s_time never reads after the handshake, so it never receives TLS 1.3
                    # tickets (sent after it): resumption is measured with TLS 1.2 tickets
                    tls12 = args.tls12 or reuse
                    version = "TLS 1.2" if tls12 else "TLS 1.3"
                    res = rounds(peers, args.runs, lambda p: handshakes(
                        p, args.tls_seconds, args.tls_clients, reuse, tls12))
                    report(f"TLS termination, {version}, {args.cert} certificate, "
                           f"{'resumed sessions (s_time -reuse)' if reuse else 'full handshakes (s_time -new)'}, "
                           f"{args.tls_clients} clients",
                           ["handshakes/s", "per proxy CPU-second"], res, ["{:,.0f}", "{:,.0f}"],
                           "haproxy-tls", [0, 1])
        finally:
            for peer in peers:
                peer.stop()
            backend.terminate()
            backend.wait()


if __name__ == "__main__":
    main()

"""Benchmark: SNI passthrough throughput and new connections/s, dcrouter vs HAProxy.

Starts, on loopback with ephemeral ports:

* a backend (asyncio, its own process) that answers ``ok`` to the first bytes
  of a connection and reads everything else;
* dcrouter as a real ``twistd`` process with one ``tls = "passthrough"`` route
  for ``bench.example.test``;
* HAProxy (``mode tcp``, ``req.ssl_sni``) configured the same way;
* bare ``twistd portforward`` (no SNI reading) as the floor of a Twisted relay;

and measures, for the backend directly and through each proxy:

* bulk: one connection sends a real ClientHello (for the SNI) and then
  ``--mib`` MiB; the clock stops when the backend has read it all (its EOF);
* new connections/s: ``--workers`` client processes for ``--seconds`` open a
  connection, send the ClientHello, wait for ``ok`` and close (RST, so client
  ports do not pile up in TIME_WAIT).

Medians of ``--runs`` runs.  Usage::

    python bench/proxy_throughput.py [--mib 512] [--seconds 2] [--runs 3] [--workers 2] [--terminate]
                                     [--router-workers 2] [--only-workers]

``--router-workers N`` (default 2) adds dcrouter with ``router.workers = N``:
N processes sharing the port with SO_REUSEPORT (0 leaves it out).

``--terminate`` adds the same two figures for TLS termination (a self-signed
certificate; HAProxy ``bind ... ssl crt``), each new connection a full handshake.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "bench.example.test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
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


# -- backend ---------------------------------------------------------------------------

class _Backend(asyncio.Protocol):
    """Answers ``ok`` to the first bytes; a stream starting ``BULK<8-byte length>`` gets
    ``done`` once that many bytes have arrived (for TLS, which has no half-close)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.answered = False
        self.expected = -1
        self.seen = 0

    def data_received(self, data: bytes) -> None:
        if not self.answered:
            self.answered = True
            if data.startswith(b"BULK"):
                self.expected = int.from_bytes(data[4:12], "big")
                data = data[12:]
            else:
                self.transport.write(b"ok")  # type: ignore[attr-defined]
        if self.expected >= 0:
            self.seen += len(data)
            if self.seen >= self.expected:
                self.expected = -1
                self.transport.write(b"done")  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        return False


def run_backend(port: int) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Backend, "127.0.0.1", port, backlog=4096)
        await server.serve_forever()
    asyncio.run(main())


# -- clients ------------------------------------------------------------------------------

def bulk(port: int, mib: int, hello: bytes) -> float:
    """MiB/s of ``mib`` MiB after a ClientHello, until the backend has read everything."""
    block = b"\x17" * (1024 * 1024)
    with socket.create_connection(("127.0.0.1", port)) as s:
        start = time.perf_counter()
        s.sendall(hello)
        for _ in range(mib):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
        elapsed = time.perf_counter() - start
    return mib / elapsed


def tls_bulk(port: int, mib: int) -> float:
    """MiB/s of ``mib`` MiB sent over TLS (terminated by the proxy) until the backend has it."""
    block = b"\x17" * (1024 * 1024)
    ctx = _client_tls()
    with socket.create_connection(("127.0.0.1", port)) as raw:
        start = time.perf_counter()
        with ctx.wrap_socket(raw, server_hostname=NAME) as s:
            s.sendall(b"BULK" + (mib * len(block)).to_bytes(8, "big"))
            for _ in range(mib):
                s.sendall(block)
            reply = s.recv(16)
            elapsed = time.perf_counter() - start
    assert reply == b"done", reply
    return mib / elapsed


def _client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _conn_worker(port: int, seconds: float, hello: bytes, tls: bool,
                 out: "multiprocessing.Queue[int]") -> None:
    linger = struct.pack("ii", 1, 0)
    ctx = _client_tls()
    count = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        s: socket.socket = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        try:
            s.connect(("127.0.0.1", port))
            if tls:
                s = ctx.wrap_socket(s, server_hostname=NAME)
                s.sendall(b"x")
            else:
                s.sendall(hello)
            if s.recv(16) == b"ok":
                count += 1
        except OSError:
            pass
        finally:
            s.close()
    out.put(count)


def connections(port: int, seconds: float, workers: int, hello: bytes, tls: bool = False) -> float:
    """New connections per second (ClientHello in, or a full TLS handshake; ``ok`` back)."""
    queue: "multiprocessing.Queue[int]" = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_conn_worker, args=(port, seconds, hello, tls, queue))
             for _ in range(workers)]
    for p in procs:
        p.start()
    total = sum(queue.get() for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


# -- peers ----------------------------------------------------------------------------------

def write_cert(tmp: str) -> tuple[str, str, str]:
    """A self-signed certificate for NAME: (cert, key, cert+key for HAProxy)."""
    sys.path.insert(0, REPO)
    from dcrouter.tlsutil import make_self_signed
    cert, key = make_self_signed([NAME])
    paths = [os.path.join(tmp, n) for n in ("bench.crt", "bench.key", "bench.pem")]
    for path, data in zip(paths, (cert, key, cert + key)):
        with open(path, "wb") as f:
            f.write(data)
    return paths[0], paths[1], paths[2]


def start_dcrouter(tmp: str, port: int, backend: int, terminate: bool = False,
                   router_workers: int = 1) -> subprocess.Popen:
    tls = "passthrough"
    extra = ""
    if terminate:
        cert, key, _ = write_cert(tmp)
        tls = "terminate"
        # raw bytes over TLS, as HAProxy's mode tcp below: not HTTP
        extra = f'cert_path = "{cert}"\nkey_path = "{key}"\nhttp = false\n'
    config = os.path.join(tmp, "dcrouter.toml")
    with open(config, "w") as f:
        f.write(f"""[router]
state_dir = "{tmp}/state"
log_level = "warn"
workers = {router_workers}

[proxy]
listen = "127.0.0.1"

[[proxy.routes]]
name = "bench"
ports = [{port}]
domains = ["{NAME}"]
tls = "{tls}"
targets = ["127.0.0.1:{backend}"]
health_check_interval = 0
max_connections = 100000
max_connections_per_ip = 100000
{extra}""")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    proc = subprocess.Popen([twistd, "-n", "--pidfile=", "dcrouter", "--config", config],
                            cwd=tmp, env=env, stdout=open(os.path.join(tmp, "dcrouter.log"), "wb"),
                            stderr=subprocess.STDOUT)
    wait_for(port)
    if router_workers > 1:
        time.sleep(2.0)  # worker 0 answers first; the others start once it is ready
    return proc


def start_dcrouter_workers(n: int):  # type: ignore[no-untyped-def]
    """A starter for dcrouter with ``router.workers = n`` (processes sharing the port)."""
    def start(tmp: str, port: int, backend: int, terminate: bool = False) -> subprocess.Popen:
        return start_dcrouter(tmp, port, backend, terminate, router_workers=n)
    return start


def start_haproxy(tmp: str, port: int, backend: int, terminate: bool = False) -> subprocess.Popen:
    config = os.path.join(tmp, "haproxy.cfg")
    if terminate:
        _c, _k, pem = write_cert(tmp)
        frontend = (f"    bind 127.0.0.1:{port} ssl crt {pem} alpn http/1.1 "
                    f"ssl-min-ver TLSv1.2\n    default_backend be\n")
    else:
        frontend = (f"    bind 127.0.0.1:{port}\n    tcp-request inspect-delay 5s\n"
                    f"    tcp-request content accept if {{ req.ssl_hello_type 1 }}\n"
                    f"    use_backend be if {{ req.ssl_sni -i {NAME} }}\n")
    with open(config, "w") as f:
        f.write(f"""global
    maxconn 9000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
{frontend}backend be
    server s1 127.0.0.1:{backend}
""")
    proc = subprocess.Popen(["haproxy", "-db", "-f", config],
                            stdout=open(os.path.join(tmp, "haproxy.log"), "wb"),
                            stderr=subprocess.STDOUT)
    wait_for(port)
    return proc


def start_portforward(tmp: str, port: int, backend: int) -> subprocess.Popen:
    """Bare ``twisted.protocols.portforward`` (no SNI): the floor of a Twisted relay."""
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    proc = subprocess.Popen([twistd, "-n", "--pidfile=", "portforward", "-p", f"tcp:{port}:interface=127.0.0.1",
                             "-h", "127.0.0.1", "-d", str(backend)], cwd=tmp,
                            stdout=open(os.path.join(tmp, "portforward.log"), "wb"),
                            stderr=subprocess.STDOUT)
    wait_for(port)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(peers: list, backend_port: int, args: argparse.Namespace, hello: bytes,
            terminate: bool) -> dict[str, dict[str, float]]:
    """Run bulk and connection rounds against each peer; prints and returns medians."""
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, starter in peers:
            port = backend_port
            proc = None
            if starter is not None:
                port = free_port()
                proc = starter(tmp, port, backend_port, terminate) if terminate \
                    else starter(tmp, port, backend_port)
            try:
                if terminate:
                    tls_bulk(port, 16)                   # warm-up
                    mibs = [tls_bulk(port, args.mib) for _ in range(args.runs)]
                else:
                    bulk(port, 16, hello)
                    mibs = [bulk(port, args.mib, hello) for _ in range(args.runs)]
                conns = [connections(port, args.seconds, args.workers, hello, terminate)
                         for _ in range(args.runs)]
            finally:
                if proc is not None:
                    stop(proc)
            results[name] = {"mib_s": statistics.median(mibs), "conn_s": statistics.median(conns)}
            print(f"{name:19s} bulk {statistics.median(mibs):8.0f} MiB/s  (runs: "
                  f"{', '.join(f'{m:.0f}' for m in mibs)})   new connections "
                  f"{statistics.median(conns):8.0f}/s  (runs: {', '.join(f'{c:.0f}' for c in conns)})",
                  flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--router-workers", type=int, default=2,
                        help="also measure dcrouter with router.workers = N (0: skip)")
    parser.add_argument("--only-workers", action="store_true",
                        help="passthrough only: haproxy, dcrouter and dcrouter with workers")
    parser.add_argument("--terminate", action="store_true",
                        help="also measure TLS termination (dcrouter vs HAProxy with ssl)")
    args = parser.parse_args()
    hello = client_hello(NAME)
    backend_port = free_port()
    backend = multiprocessing.Process(target=run_backend, args=(backend_port,), daemon=True)
    backend.start()
    wait_for(backend_port)
    print("SNI passthrough:")
    peers = [("direct", None), ("haproxy", start_haproxy),
             ("twisted-portforward", start_portforward), ("dcrouter", start_dcrouter)]
    if args.only_workers:
        peers = [("haproxy", start_haproxy), ("dcrouter", start_dcrouter)]
    workers_name = f"dcrouter-workers={args.router_workers}"
    if args.router_workers > 1:
        peers.append((workers_name, start_dcrouter_workers(args.router_workers)))
    results = measure(peers, backend_port, args, hello, terminate=False)
    d, h = results["dcrouter"], results["haproxy"]
    print(f"\ncores: {os.cpu_count()}; {args.mib} MiB bulk, {args.seconds}s x {args.workers} "
          f"workers for connections, medians of {args.runs}")
    print(f"dcrouter/haproxy: bulk {d['mib_s'] / h['mib_s']:.2f}, "
          f"connections/s {d['conn_s'] / h['conn_s']:.2f}")
    if workers_name in results:
        w = results[workers_name]
        print(f"{workers_name}/haproxy: bulk {w['mib_s'] / h['mib_s']:.2f}, "
              f"connections/s {w['conn_s'] / h['conn_s']:.2f}; {workers_name}/dcrouter: "
              f"connections/s {w['conn_s'] / d['conn_s']:.2f}")
    if args.terminate:
        print("\nTLS termination (full handshake per connection):")
        peers = [("haproxy", start_haproxy), ("dcrouter", start_dcrouter)]
        if args.router_workers > 1:
            peers.append((workers_name, start_dcrouter_workers(args.router_workers)))
        results = measure(peers, backend_port, args, hello, terminate=True)
        d, h = results["dcrouter"], results["haproxy"]
        print(f"dcrouter/haproxy (terminate): bulk {d['mib_s'] / h['mib_s']:.2f}, "
              f"connections/s {d['conn_s'] / h['conn_s']:.2f}")
        if workers_name in results:
            w = results[workers_name]
            print(f"{workers_name}/dcrouter (terminate): bulk {w['mib_s'] / d['mib_s']:.2f}, "
                  f"connections/s {w['conn_s'] / d['conn_s']:.2f}")
    backend.terminate()


if __name__ == "__main__":
    main()

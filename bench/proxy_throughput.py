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

    python bench/proxy_throughput.py [--mib 512] [--seconds 2] [--runs 3] [--workers 2]
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
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.answered = False

    def data_received(self, data: bytes) -> None:
        if not self.answered:
            self.answered = True
            self.transport.write(b"ok")  # type: ignore[attr-defined]

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


def _conn_worker(port: int, seconds: float, hello: bytes, out: "multiprocessing.Queue[int]") -> None:
    linger = struct.pack("ii", 1, 0)
    count = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(hello)
            if s.recv(16) == b"ok":
                count += 1
        except OSError:
            pass
        finally:
            s.close()
    out.put(count)


def connections(port: int, seconds: float, workers: int, hello: bytes) -> float:
    """New connections per second (ClientHello in, ``ok`` back)."""
    queue: "multiprocessing.Queue[int]" = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_conn_worker, args=(port, seconds, hello, queue))
             for _ in range(workers)]
    for p in procs:
        p.start()
    total = sum(queue.get() for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


# -- peers ----------------------------------------------------------------------------------

def start_dcrouter(tmp: str, port: int, backend: int) -> subprocess.Popen:
    config = os.path.join(tmp, "dcrouter.toml")
    with open(config, "w") as f:
        f.write(f"""[router]
state_dir = "{tmp}/state"
log_level = "warn"

[proxy]
listen = "127.0.0.1"

[[proxy.routes]]
name = "bench"
ports = [{port}]
domains = ["{NAME}"]
tls = "passthrough"
targets = ["127.0.0.1:{backend}"]
health_check_interval = 0
max_connections = 100000
max_connections_per_ip = 100000
""")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    proc = subprocess.Popen([twistd, "-n", "--pidfile=", "dcrouter", "--config", config],
                            cwd=tmp, env=env, stdout=open(os.path.join(tmp, "dcrouter.log"), "wb"),
                            stderr=subprocess.STDOUT)
    wait_for(port)
    return proc


def start_haproxy(tmp: str, port: int, backend: int) -> subprocess.Popen:
    config = os.path.join(tmp, "haproxy.cfg")
    with open(config, "w") as f:
        f.write(f"""global
    maxconn 9000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
    bind 127.0.0.1:{port}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend be if {{ req.ssl_sni -i {NAME} }}
backend be
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    hello = client_hello(NAME)
    backend_port = free_port()
    backend = multiprocessing.Process(target=run_backend, args=(backend_port,), daemon=True)
    backend.start()
    wait_for(backend_port)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        peers = [("direct", None), ("haproxy", start_haproxy),
                 ("twisted-portforward", start_portforward), ("dcrouter", start_dcrouter)]
        for name, starter in peers:
            port = backend_port
            proc = None
            if starter is not None:
                port = free_port()
                proc = starter(tmp, port, backend_port)
            try:
                bulk(port, 16, hello)           # warm-up
                mibs = [bulk(port, args.mib, hello) for _ in range(args.runs)]
                conns = [connections(port, args.seconds, args.workers, hello)
                         for _ in range(args.runs)]
            finally:
                if proc is not None:
                    stop(proc)
            results[name] = {"mib_s": statistics.median(mibs), "conn_s": statistics.median(conns)}
            print(f"{name:19s} bulk {statistics.median(mibs):8.0f} MiB/s  (runs: "
                  f"{', '.join(f'{m:.0f}' for m in mibs)})   new connections "
                  f"{statistics.median(conns):8.0f}/s  (runs: {', '.join(f'{c:.0f}' for c in conns)})",
                  flush=True)
    backend.terminate()
    d, h = results["dcrouter"], results["haproxy"]
    print(f"\ncores: {os.cpu_count()}; {args.mib} MiB bulk, {args.seconds}s x {args.workers} "
          f"workers for connections, medians of {args.runs}")
    print(f"dcrouter/haproxy: bulk {d['mib_s'] / h['mib_s']:.2f}, "
          f"connections/s {d['conn_s'] / h['conn_s']:.2f}")


if __name__ == "__main__":
    main()

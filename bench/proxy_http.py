"""Benchmark: HTTP/1.1 keep-alive through the proxy's HTTP routes, dcrouter vs HAProxy.

Starts, on loopback with ephemeral ports:

* a keep-alive HTTP backend (asyncio, its own process) that reads each
  request (``Content-Length`` bodies included) and answers ``200 ok``;
* dcrouter as a real ``twistd`` process with one plain HTTP route for
  ``bench.example.test`` with ``add_forwarded_headers`` (so every request is
  framed, routed and re-rendered);
* HAProxy ``mode http`` (its default ``http-keep-alive``) with ``option forwardfor``;

and measures, for the backend directly and through each proxy:

* requests/s: ``--workers`` client processes, each with one kept-alive
  connection, send a GET and wait for its answer, for ``--seconds``;
* upload: one POST of ``--mib`` MiB (``Content-Length``) on a kept-alive
  connection; the clock stops at the answer.

Medians of ``--runs`` runs.  Usage::

    python bench/proxy_http.py [--seconds 2] [--runs 3] [--workers 2] [--mib 256]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from proxy_throughput import REPO, free_port, stop, wait_for  # noqa: E402

NAME = "bench.example.test"
REQUEST = f"GET /x HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode()


def run_backend(port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                while length:
                    chunk = await reader.read(min(length, 1 << 20))
                    if not chunk:
                        return
                    length -= len(chunk)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()
    asyncio.run(main())


def _read_response(sock: "object", buf: bytes) -> bytes:
    import socket as _s
    assert isinstance(sock, _s.socket)
    while b"\r\n\r\nok" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf.split(b"\r\n\r\nok", 1)[1]


def _worker(port: int, seconds: float, out: "multiprocessing.Queue[int]") -> None:
    import socket
    count = 0
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            s.sendall(REQUEST)
            buf = _read_response(s, buf)
            count += 1
    out.put(count)


def requests_per_second(port: int, seconds: float, workers: int) -> float:
    out: "multiprocessing.Queue[int]" = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_worker, args=(port, seconds, out))
             for _ in range(workers)]
    for p in procs:
        p.start()
    total = sum(out.get() for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def upload(port: int, mib: int) -> float:
    import socket
    block = b"\xab" * (1 << 20)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(REQUEST)
        _read_response(s, b"")
        start = time.monotonic()
        s.sendall(f"POST /up HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: {mib << 20}\r\n\r\n"
                  .encode())
        for _ in range(mib):
            s.sendall(block)
        _read_response(s, b"")
        return mib / (time.monotonic() - start)


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
targets = ["127.0.0.1:{backend}"]
add_forwarded_headers = true
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
    mode http
    option forwardfor
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
    bind 127.0.0.1:{port}
    use_backend be if {{ hdr(host) -i {NAME} }}
backend be
    server s1 127.0.0.1:{backend}
""")
    proc = subprocess.Popen(["haproxy", "-db", "-f", config],
                            stdout=open(os.path.join(tmp, "haproxy.log"), "wb"),
                            stderr=subprocess.STDOUT)
    wait_for(port)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mib", type=int, default=256)
    args = parser.parse_args()
    backend_port = free_port()
    backend = multiprocessing.Process(target=run_backend, args=(backend_port,), daemon=True)
    backend.start()
    wait_for(backend_port)
    print(f"cores: {os.cpu_count()}; workers {args.workers}, {args.seconds}s, runs {args.runs}, "
          f"upload {args.mib} MiB", flush=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, starter in [("backend direct", None), ("haproxy mode http", start_haproxy),
                                  ("dcrouter http", start_dcrouter)]:
                port, proc = backend_port, None
                if starter is not None:
                    port = free_port()
                    proc = starter(tmp, port, backend_port)
                try:
                    upload(port, 8)
                    rates = [requests_per_second(port, args.seconds, args.workers)
                             for _ in range(args.runs)]
                    mibs = [upload(port, args.mib) for _ in range(args.runs)]
                finally:
                    if proc is not None:
                        stop(proc)
                print(f"{name:18s} keep-alive {statistics.median(rates):8.0f} req/s (runs: "
                      f"{', '.join(f'{r:.0f}' for r in rates)})   upload "
                      f"{statistics.median(mibs):6.0f} MiB/s (runs: "
                      f"{', '.join(f'{m:.0f}' for m in mibs)})", flush=True)
    finally:
        backend.terminate()


if __name__ == "__main__":
    main()

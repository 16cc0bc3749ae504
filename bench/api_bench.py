"""Management API throughput and latency, with twisted.web's own static file server as the peer.

Starts dcrouter (the embedded default configuration on free loopback ports, with an API token) as
a real ``twistd`` process, and ``twistd web`` serving a small static JSON file as the baseline of
the same HTTP stack.  Then, for each endpoint, several client threads with keep-alive connections
send requests for a fixed time; the script prints requests per second and latency percentiles as
a Markdown table.

    .venv/bin/python bench/api_bench.py [--seconds 8] [--clients 4] [--queue-items 0]

``--queue-items N`` first pauses the queue and sends N messages over SMTP, so ``/api/queue``,
``/api/stats`` and ``/metrics`` work on a queue holding N items.

``--tls`` serves the API over HTTPS (``api.tls = true``, the self-signed certificate): the
endpoints run over keep-alive TLS connections, and one more row opens a new TLS connection
(full handshake) for every request.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import smtplib
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support.configs import default_config_with_free_ports, write_config  # noqa: E402
from tests.support.net import free_port, wait_for_tcp  # noqa: E402
from tests.support.proc import TWISTD, TwistdProcess, twistd_env  # noqa: E402

TOKEN = "bench-token"


def load(port: int, path: str, seconds: float, clients: int, token: str = "",
         tls: bool = False, reconnect: bool = False) -> dict:
    """``clients`` threads hammer ``path`` for ``seconds``; returns rate and latencies.

    ``tls``: HTTPS (certificate not verified: a benchmark); ``reconnect``: a new
    connection for every request instead of keep-alive.
    """
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    size = [0]
    deadline = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    def connect() -> http.client.HTTPConnection:
        if tls:
            return http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
        return http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def worker(index: int) -> None:
        conn = connect()
        while time.monotonic() < deadline:
            started = time.perf_counter()
            if reconnect:
                conn.close()
                conn = connect()
            try:
                conn.request("GET", path, headers=headers)
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    errors[index] += 1
                size[0] = len(body)
            except (OSError, http.client.HTTPException):
                errors[index] += 1
                conn.close()
                conn = connect()
                continue
            latencies[index].append(time.perf_counter() - started)
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    flat = sorted(x for part in latencies for x in part)
    if not flat:
        return {"rps": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "errors": sum(errors), "bytes": 0}
    return {
        "rps": len(flat) / elapsed,
        "p50_ms": statistics.median(flat) * 1000,
        "p99_ms": flat[min(len(flat) - 1, int(len(flat) * 0.99))] * 1000,
        "errors": sum(errors),
        "bytes": size[0],
    }


def queue_messages(port: int, count: int) -> int:
    """Send ``count`` messages (the queue is paused, so they stay queued)."""
    sent = 0
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        for i in range(count):
            try:
                smtp.sendmail("bench@localhost", [f"user{i}@bench.invalid"],
                              f"Subject: bench {i}\r\n\r\nbody\r\n".encode())
                sent += 1
            except smtplib.SMTPException:
                break
    return sent


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--queue-items", type=int, default=0)
    parser.add_argument("--tls", action="store_true", help="the API over HTTPS")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="dcrouter-api-bench-")
    data, ports = default_config_with_free_ports(os.path.join(work, "var"))
    data["api"]["token"] = TOKEN
    data["api"]["tls"] = args.tls
    data["router"]["log_level"] = "warn"
    data["email"]["domain_rules"].append({"pattern": "*@bench.invalid", "mode": "forward",
                                          "target": {"server": "127.0.0.1",
                                                     "port": free_port()}})
    write_config(os.path.join(work, "dcrouter.toml"), data)
    static_dir = os.path.join(work, "static")
    os.makedirs(static_dir)
    with open(os.path.join(static_dir, "status.json"), "w") as f:
        json.dump({"services": {"api": {"running": True}}, "version": "x"}, f)
    peer_port = free_port()
    router = TwistdProcess(work, config="dcrouter.toml")
    peer_log = open(os.path.join(work, "peer.out"), "wb")
    peer = subprocess.Popen([TWISTD, "-n", "--pidfile=", "web", "--listen",
                             f"tcp:{peer_port}:interface=127.0.0.1", "--path", static_dir],
                            cwd=work, env=twistd_env(), stdout=peer_log,
                            stderr=subprocess.STDOUT)
    try:
        wait_for_tcp(ports["api"], timeout=60)
        wait_for_tcp(peer_port, timeout=60)
        queued = 0
        if args.queue_items:
            unverified = ssl.create_default_context()
            unverified.check_hostname = False
            unverified.verify_mode = ssl.CERT_NONE
            pause = (http.client.HTTPSConnection("127.0.0.1", ports["api"], timeout=30,
                                                 context=unverified) if args.tls else
                     http.client.HTTPConnection("127.0.0.1", ports["api"], timeout=30))
            pause.request("POST", "/api/queue/pause", headers={"Authorization": f"Bearer {TOKEN}"})
            assert pause.getresponse().status == 200
            pause.close()
            queued = queue_messages(ports["smtp"], args.queue_items)
        rows = []
        scheme = "https " if args.tls else ""
        cases = [
            ("peer: twistd web, static 60-byte JSON", peer_port, "/status.json", "", False),
            (f"{scheme}GET /api/status", ports["api"], "/api/status", TOKEN, args.tls),
            (f"{scheme}GET /api/stats", ports["api"], "/api/stats", TOKEN, args.tls),
            (f"{scheme}GET /api/queue?limit=100", ports["api"], "/api/queue?limit=100", TOKEN,
             args.tls),
            (f"{scheme}GET /metrics", ports["api"], "/metrics", TOKEN, args.tls)]
        for label, port, path, token, tls in cases:
            result = load(port, path, args.seconds, args.clients, token, tls)
            rows.append((label, result))
        if args.tls:
            rows.append(("https GET /api/status, new TLS connection per request", load(
                ports["api"], "/api/status", args.seconds, args.clients, TOKEN, True, True)))
        print(f"cores: {os.cpu_count()}, clients: {args.clients}, seconds per endpoint: "
              f"{args.seconds}, queued messages: {queued}, api over https: {args.tls}")
        print()
        print("| endpoint | requests/s | p50 ms | p99 ms | body bytes | errors |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for label, r in rows:
            print(f"| {label} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                  f"{r['bytes']} | {r['errors']} |")
    finally:
        router.stop()
        peer.terminate()
        peer.wait(30)
        peer_log.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

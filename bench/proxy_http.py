"""Benchmark: HTTP through the proxy's HTTP routes, dcrouter vs HAProxy ``mode http``, C tools only.

Everything on loopback with ephemeral ports, started and stopped by this script:

* **nginx** (Debian package ``nginx``; one worker, ``keepalive_requests`` unbounded) serving a
  1 KB file: the backend of both proxies and the "direct" row;
* **dcrouter** as a real ``twistd -n dcrouter`` process: a plain HTTP route for
  ``bench.example.test`` with ``add_forwarded_headers`` (every request head is framed, routed and
  re-rendered, every response framed), and a ``tls = "terminate"`` route on a second port (ALPN
  ``h2`` and ``http/1.1``) for the HTTP/2 rows;
* **HAProxy** ``mode http`` (``nbthread 1``, default ``http-keep-alive``, ``option forwardfor``,
  Host ACL) on the same backend, with a ``bind ... ssl crt ... alpn h2,http/1.1`` frontend for the
  HTTP/2 rows.

Figures (``wrk``, Debian ``wrk``; ``h2load``, Debian ``nghttp2-client``):

* ``keep-alive``: ``wrk -t1 -c50`` GET of the 1 KB file on kept-alive connections;
* ``close``: the same with ``Connection: close`` (a new connection per request);
* ``h2``: ``h2load -c10 -m10`` over TLS with ALPN h2 (10 connections, 10 streams each).

Rounds are interleaved (direct, HAProxy, dcrouter, then again) so a burst of load from other
processes on a shared machine hits every target alike; medians are printed, with every run.

Usage (one command for a quiet machine)::

    .venv/bin/python bench/proxy_http.py --seconds 5 --runs 3
    .venv/bin/python bench/proxy_http.py --only keep-alive --profile prof.txt   # py-spy top

``--profile FILE`` runs ``py-spy record`` (pip ``py-spy``) on the dcrouter process during one extra
keep-alive round and writes its flat profile to FILE.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "bench.example.test"
BODY = b"x" * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(port: int, timeout: float = 20.0, proc: Optional[subprocess.Popen] = None,
             log: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            with open(log) as f:
                raise RuntimeError(f"{proc.args[0]} exited:\n{f.read()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def need(tool: str, package: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}")
                                  else None)
    if path is None:
        sys.exit(f"{tool} is missing: apt-get install {package}")
    return path


def make_cert(tmp: str) -> tuple[str, str]:
    cert, key = os.path.join(tmp, "bench.crt"), os.path.join(tmp, "bench.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    f"/CN={NAME}", "-addext", f"subjectAltName=DNS:{NAME}", "-keyout", key,
                    "-out", cert], check=True, capture_output=True)
    return cert, key


def start_nginx(tmp: str, port: int) -> subprocess.Popen:
    root = os.path.join(tmp, "www")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "1k"), "wb") as f:
        f.write(BODY)
    os.chmod(tmp, 0o755)
    os.chmod(root, 0o755)
    config = os.path.join(tmp, "nginx.conf")
    with open(config, "w") as f:
        f.write(f"""daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 60s;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    server {{
        listen 127.0.0.1:{port} reuseport;
        root {root};
        location / {{ }}
    }}
}}
""")
    proc = subprocess.Popen([need("nginx", "nginx"), "-c", config, "-p", tmp],
                            stdout=open(os.path.join(tmp, "nginx.log"), "wb"),
                            stderr=subprocess.STDOUT)
    wait_for(port, proc=proc, log=os.path.join(tmp, "nginx.log"))
    return proc


def start_dcrouter(tmp: str, port: int, tls_port: int, backend: int, cert: str,
                   key: str) -> subprocess.Popen:
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

[[proxy.routes]]
name = "bench-tls"
ports = [{tls_port}]
domains = ["{NAME}"]
tls = "terminate"
cert_path = "{cert}"
key_path = "{key}"
acme = false
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
    wait_for(port, proc=proc, log=os.path.join(tmp, "dcrouter.log"))
    wait_for(tls_port, proc=proc, log=os.path.join(tmp, "dcrouter.log"))
    return proc


def start_haproxy(tmp: str, port: int, tls_port: int, backend: int, cert: str,
                  key: str) -> subprocess.Popen:
    pem = os.path.join(tmp, "haproxy.pem")
    with open(pem, "w") as out, open(cert) as c, open(key) as k:
        out.write(c.read() + k.read())
    config = os.path.join(tmp, "haproxy.cfg")
    with open(config, "w") as f:
        f.write(f"""global
    maxconn 9000
    nbthread 1
defaults
    mode http
    option forwardfor
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
    bind 127.0.0.1:{port}
    bind 127.0.0.1:{tls_port} ssl crt {pem} alpn h2,http/1.1
    use_backend be if {{ hdr(host),field(1,:) -i {NAME} }}
backend be
    server s1 127.0.0.1:{backend}
""")
    proc = subprocess.Popen([need("haproxy", "haproxy"), "-db", "-f", config],
                            stdout=open(os.path.join(tmp, "haproxy.log"), "wb"),
                            stderr=subprocess.STDOUT)
    wait_for(port, proc=proc, log=os.path.join(tmp, "haproxy.log"))
    return proc


def wrk(port: int, seconds: float, connections: int, close: bool) -> float:
    cmd = [need("wrk", "wrk"), "-t1", f"-c{connections}", f"-d{int(seconds)}s", "-H", f"Host: {NAME}"]
    if close:
        cmd += ["-H", "Connection: close"]
    out = subprocess.run(cmd + [f"http://127.0.0.1:{port}/1k"], capture_output=True, text=True,
                         timeout=seconds + 60).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m is None or errors is not None:
        raise RuntimeError(f"wrk failed:\n{out}")
    return float(m.group(1))


def h2load(port: int, seconds: float, connections: int, streams: int) -> float:
    cmd = [need("h2load", "nghttp2-client"), f"-c{connections}", f"-m{streams}",
           f"-D{int(seconds)}", "-t1", f"https://{NAME}:{port}/1k",
           "--connect-to", f"127.0.0.1:{port}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    ok = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    proto = re.search(r"Application protocol: (\S+)", out)
    if m is None or ok is None or int(ok.group(3)) or int(ok.group(4)) \
            or proto is None or proto.group(1) != "h2":
        raise RuntimeError(f"h2load failed:\n{out}")
    return float(m.group(1))


def profile(pid: int, seconds: float, out_path: str, load: Callable[[], float]) -> None:
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    raw = out_path + ".raw"
    rec = subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                            "--format", "raw", "--output", raw, "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    load()
    rec.wait(60)
    totals: dict[str, int] = {}
    own: dict[str, int] = {}
    samples = 0
    with open(raw) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            n = int(count)
            samples += n
            frames = stack.split(";")
            for frame in set(frames):
                totals[frame] = totals.get(frame, 0) + n
            own[frames[-1]] = own.get(frames[-1], 0) + n
    with open(out_path, "w") as f:
        f.write(f"{samples} samples\n\n# own time\n")
        for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:40]:
            f.write(f"{100 * n / samples:5.1f}%  {frame}\n")
        f.write("\n# total time (with callees)\n")
        for frame, n in sorted(totals.items(), key=lambda kv: -kv[1])[:60]:
            f.write(f"{100 * n / samples:5.1f}%  {frame}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--only", choices=["keep-alive", "close", "h2"], action="append")
    parser.add_argument("--profile", default="", help="py-spy flat profile of dcrouter to FILE")
    args = parser.parse_args()
    figures = args.only or ["keep-alive", "close", "h2"]
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = make_cert(tmp)
        backend_port = free_port()
        nginx = start_nginx(tmp, backend_port)
        procs: list[subprocess.Popen] = [nginx]
        try:
            ports = {"direct": (backend_port, 0)}
            hp, htls = free_port(), free_port()
            procs.append(start_haproxy(tmp, hp, htls, backend_port, cert, key))
            ports["haproxy"] = (hp, htls)
            dp, dtls = free_port(), free_port()
            dcrouter = start_dcrouter(tmp, dp, dtls, backend_port, cert, key)
            procs.append(dcrouter)
            ports["dcrouter"] = (dp, dtls)
            for name, (port, _tls) in ports.items():         # warm up every path
                wrk(port, 1, 4, False)
            load = os.getloadavg()
            print(f"cores: {os.cpu_count()}, load average {load[0]:.2f}; wrk -t1 "
                  f"-c{args.connections}, h2load -c10 -m10, {args.seconds:.0f} s a run, "
                  f"{args.runs} interleaved runs", flush=True)
            results: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.runs):
                for figure in figures:
                    for name, (port, tls_port) in ports.items():
                        if figure == "h2" and not tls_port:
                            continue
                        if figure == "keep-alive":
                            rate = wrk(port, args.seconds, args.connections, False)
                        elif figure == "close":
                            rate = wrk(port, args.seconds, args.connections, True)
                        else:
                            rate = h2load(tls_port, args.seconds, 10, 10)
                        results.setdefault((figure, name), []).append(rate)
            for figure in figures:
                peer: Optional[float] = None
                for name in ports:
                    runs = results.get((figure, name))
                    if not runs:
                        continue
                    median = statistics.median(runs)
                    ratio = ""
                    if name == "haproxy":
                        peer = median
                    elif name == "dcrouter" and peer:
                        ratio = f"  = {median / peer:.2f}x HAProxy"
                    print(f"{figure:10s} {name:9s} {median:9.0f} req/s (runs: "
                          f"{', '.join(f'{r:.0f}' for r in runs)}){ratio}", flush=True)
            if args.profile:
                port = ports["dcrouter"][0]
                profile(dcrouter.pid, args.seconds, args.profile,
                        lambda: wrk(port, args.seconds, args.connections, False))
                print(f"profile written to {args.profile}")
        finally:
            for proc in reversed(procs):
                stop(proc)


if __name__ == "__main__":
    main()

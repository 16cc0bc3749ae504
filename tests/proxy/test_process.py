"""The proxy in a real ``twistd`` process: SIGHUP reload and a graceful SIGTERM with an open tunnel."""

from __future__ import annotations

import http.server
import signal
import socket
import subprocess
import threading
import time
from typing import Any

from tests.support.configs import write_config
from tests.support.net import free_port, wait_for_tcp
from tests.support.proc import TwistdProcess, wait_until


class EchoServer:
    """A threaded echo backend that prefixes replies with a tag."""

    def __init__(self, tag: bytes) -> None:
        self.tag = tag
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(self.tag + b":" + data)

    def close(self) -> None:
        self.server.close()


def config(tmp_path, port: int, target: int) -> dict:
    return {"router": {"state_dir": str(tmp_path / "state"), "shutdown_timeout": 20},
            "proxy": {"listen": "127.0.0.1",
                      "routes": [{"name": "r", "ports": [port], "targets": [f"127.0.0.1:{target}"]}]}}


def test_reload_and_graceful_stop_in_twistd(tmp_path) -> None:
    one, two = EchoServer(b"one"), EchoServer(b"two")
    port = free_port()
    path = write_config(str(tmp_path / "dcrouter.toml"), config(tmp_path, port, one.port))
    proc = TwistdProcess(str(tmp_path), config=path)
    try:
        wait_for_tcp(port)
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.sendall(b"a")
        assert held.recv(100) == b"one:a"
        write_config(path, config(tmp_path, port, two.port))
        proc.signal(signal.SIGHUP)

        def reloaded() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"b")
                return s.recv(100) == b"two:b"
        wait_until(reloaded, timeout=20)
        held.sendall(b"c")
        assert held.recv(100) == b"one:c"        # the open tunnel kept its target
        proc.signal(signal.SIGTERM)
        # listeners close at once; the open tunnel keeps working while the router drains
        wait_until(lambda: _refused(port), timeout=20)
        held.sendall(b"d")
        assert held.recv(100) == b"one:d"
        assert proc.proc.poll() is None
        held.close()
        assert proc.wait(20) == 0
        assert "Traceback" not in proc.output()
    finally:
        proc.kill()
        one.close()
        two.close()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """HTTP/1.0 answers (the backend closes after each), no access log on stderr."""

    def do_GET(self) -> None:
        body = b"backend says hi\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_traffic_leaves_no_factory_lines_and_no_traceback_in_the_log(tmp_path, test_ca) -> None:
    """Issue 13: every connection dcrouter opens for the proxy (targets, health checks,
    re-encryption) and the API is quiet - no "Starting factory"/"Stopping factory" lines -
    and a TLS client closing after a backend EOF leaves no traceback."""
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _QuietHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    cert, key = test_ca.issue(["localhost", "127.0.0.1"], "reencrypt-backend")
    tls_port = free_port()
    tls_backend = subprocess.Popen(["openssl", "s_server", "-quiet", "-accept", str(tls_port),
                                    "-cert", cert, "-key", key, "-www"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tcp, plain, terminate, tunnel, reencrypt, api = (free_port() for _ in range(6))
    target = f"localhost:{web.server_port}"            # a name: HostnameEndpoint
    checks = {"health_check_interval": 0.2}
    data = {"router": {"state_dir": str(tmp_path / "state"), "shutdown_timeout": 5},
            "api": {"listen": "127.0.0.1", "port": api, "token": "quiet-token"},
            "proxy": {"listen": "127.0.0.1", "routes": [
                {"name": "tcp", "ports": [tcp], "targets": [target], **checks},
                {"name": "web", "ports": [plain], "domains": ["a.test"], "targets": [target],
                 "add_forwarded_headers": True, **checks},
                {"name": "tls", "ports": [terminate], "domains": ["*"], "tls": "terminate",
                 "targets": [f"127.0.0.1:{web.server_port}"], **checks},
                {"name": "tls-tunnel", "ports": [tunnel], "domains": ["*"], "tls": "terminate",
                 "http": False, "targets": [target], **checks},
                {"name": "re", "ports": [reencrypt], "domains": ["*"],
                 "tls": "terminate-and-reencrypt", "targets": [f"127.0.0.1:{tls_port}"],
                 "backend_verify": False, **checks}]}}
    path = write_config(str(tmp_path / "dcrouter.toml"), data)
    proc = TwistdProcess(str(tmp_path), config=path)
    try:
        for port in (tcp, plain, terminate, tunnel, reencrypt, api):
            wait_for_tcp(port)
        wait_for_tcp(tls_port)

        def curl(*args: str) -> str:
            return subprocess.run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}",
                                   *args], capture_output=True, text=True, timeout=30).stdout
        for _ in range(3):
            assert curl(f"http://127.0.0.1:{tcp}/") == "200"
            assert curl("-H", "Host: a.test", f"http://127.0.0.1:{plain}/") == "200"
            assert curl(f"https://127.0.0.1:{terminate}/") == "200"
            assert curl(f"https://127.0.0.1:{tunnel}/") == "200"
            assert curl(f"https://127.0.0.1:{reencrypt}/") == "200"
            assert curl(f"http://127.0.0.1:{api}/api/status") == "401"
            assert curl("-H", "Authorization: Bearer quiet-token",
                        f"http://127.0.0.1:{api}/api/stats") == "200"
        time.sleep(1)                                   # a few rounds of health checks
        assert proc.stop(20) == 0
        log = proc.output()
        assert "dcrouter stopped" in log
        for noisy in ("Starting factory", "Stopping factory", "Starting protocol",
                      "Traceback", "Unhandled Error"):
            assert noisy not in log, log[-4000:]
    finally:
        proc.kill()
        web.shutdown()
        tls_backend.terminate()
        tls_backend.wait(10)

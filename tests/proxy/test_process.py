"""The proxy in a real ``twistd`` process: SIGHUP reload and a graceful SIGTERM with an open tunnel."""

from __future__ import annotations

import signal
import socket
import threading

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

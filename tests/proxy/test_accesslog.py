"""The proxy's access log: HAProxy tcplog lines (or JSON) from a real twistd, read by a regex
shaped like HAProxy's format, reopened after a logrotate-style move and SIGHUP."""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import socket
import subprocess
import threading

from tests.support.configs import default_config_with_free_ports, write_config
from tests.support.net import free_port, wait_for_tcp
from tests.support.proc import TwistdProcess, wait_until

TCPLOG = re.compile(
    r"^(?P<ip>[\d.]+):(?P<cport>\d+) \[(?P<date>\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d\.\d{3})\] "
    r"(?P<frontend>:\d+) (?P<route>\S+)/(?P<server>\S+) (?P<tw>-?\d+)/(?P<tc>-?\d+)/(?P<tt>\d+) "
    r"(?P<bytes>\d+) (?P<state>[-A-Za-z]{2}) (?P<conns>\d+/\d+/\d+/\d+/\d+) \d+/\d+$")


class _Backend(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        body = b"x" * 100
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
        pass


def _lines(path) -> list[str]:
    return open(path).read().splitlines() if os.path.exists(path) else []


def test_access_log_lines_for_relayed_refused_and_unreachable_connections(tmp_path):
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    access = tmp_path / "access.log"
    data, ports = default_config_with_free_ports(str(tmp_path / "var"))
    blocked, unreachable = free_port(), free_port()
    data["proxy"]["access_log"] = str(access)
    data["proxy"]["routes"][1]["targets"] = [f"127.0.0.1:{backend.server_address[1]}"]
    data["proxy"]["routes"] += [
        {"name": "closed", "ports": [unreachable], "targets": [f"127.0.0.1:{free_port()}"],
         "health_check_interval": 0},
        {"name": "blocked", "ports": [blocked], "targets": ["127.0.0.1:9"],
         "blocked_ips": ["127.0.0.0/8"]}]
    write_config(str(tmp_path / "dcrouter.toml"), data)
    proc = TwistdProcess(str(tmp_path), config="dcrouter.toml")
    try:
        wait_for_tcp(ports["http"], timeout=30)
        # two requests on one kept-alive connection: one line, both bodies counted
        url = f"http://127.0.0.1:{ports['http']}/"
        ran = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-o", "/dev/null", url, url],
                             capture_output=True, text=True, timeout=30)
        assert ran.returncode == 0, ran.stderr
        for port in (blocked, unreachable):
            # the proxy may reset the connection before connect() has even returned
            # (non-blocking connect: the RST lands before SO_ERROR is read)
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                    c.settimeout(5)
                    c.recv(10)
            except OSError:
                pass
        wait_until(lambda: len(_lines(access)) >= 4, timeout=20)
        parsed = {}
        for line in _lines(access):
            m = TCPLOG.match(line)
            assert m, line
            parsed[m["frontend"]] = m
        http_line = parsed[f":{ports['http']}"]
        assert http_line["route"] == "http"
        assert http_line["server"] == f"127.0.0.1:{backend.server_address[1]}"
        assert http_line["state"] == "--" and int(http_line["tc"]) >= 0
        assert int(http_line["bytes"]) > 200  # two responses of 100 bytes and their heads
        assert parsed[f":{blocked}"]["state"] == "PR"
        assert parsed[f":{blocked}"]["route"] == "blocked"
        assert parsed[f":{blocked}"]["server"] == "<NOSRV>"
        closed = parsed[f":{unreachable}"]
        assert (closed["route"], closed["server"], closed["state"], closed["tc"]) == \
            ("closed", "<NOSRV>", "SC", "-1")
        # logrotate: move the file, SIGHUP; the next lines go to a new file, now as JSON
        os.rename(access, tmp_path / "access.log.1")
        data["proxy"]["access_log_format"] = "json"
        write_config(str(tmp_path / "dcrouter.toml"), data)
        proc.signal(signal.SIGHUP)
        wait_until(lambda: access.exists(), timeout=20)
        subprocess.run(["curl", "-sS", "-o", "/dev/null", url], timeout=30, check=True)
        wait_until(lambda: len(_lines(access)) >= 1, timeout=20)
        record = json.loads(_lines(access)[0])
        assert record["route"] == "http" and isinstance(record["requests"], int)
        assert record["termination_state"] == "--" and record["bytes_read"] > 100
        assert len(_lines(tmp_path / "access.log.1")) == 4  # with wait_for_tcp's probe
    finally:
        status = proc.stop()
        backend.shutdown()
    assert status == 0, proc.output()

"""Root-then-drop start: as root in a private network namespace, on the real port numbers.

``twistd -n --uid nobody --gid nogroup dcrouter --config F`` binds 25, 465, 587,
53 (UDP and TCP), 80, 443 and the API port as root, then runs as nobody: real
clients (smtplib, dnspython, curl) reach every listener from inside the
namespace, ``/proc/PID/status`` shows nobody's ids, and every file under
``state_dir`` belongs to nobody.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, Iterator

import pytest

from tests.support.configs import default_config_with_free_ports, write_config
from tests.support.netns import NamespacedProcess
from tests.support.proc import TWISTD, wait_until

USER = "nobody"
GROUP = "nogroup"
API_PORT = 8088



def _require_root() -> None:
    assert os.geteuid() == 0, "these tests start dcrouter as root (make test runs as root)"
    for tool in ("unshare", "nsenter", "ip", "curl"):
        assert shutil.which(tool), f"{tool} is missing (util-linux, iproute2, curl)"


@pytest.fixture
def world() -> Iterator[str]:
    """A directory every user can traverse (pytest's tmp_path is root's, mode 0700)."""
    path = tempfile.mkdtemp(prefix="dcrouter-drop-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def production_config(base: str, workers: int = 1) -> dict[str, Any]:
    """etc/dcrouter.toml on the production ports (25/587/465, 80/443, 53, API 8088)."""
    state = os.path.join(base, "var")
    data, _ = default_config_with_free_ports(state)
    data["router"]["workers"] = workers
    data["router"]["shutdown_timeout"] = 5
    email = data["email"]
    email["listen"] = "0.0.0.0"
    email["ports"] = [25, 587, 465]
    email["submission_ports"] = [587]
    email["implicit_tls_ports"] = [465]
    email["delivery"]["nameservers"] = ["127.0.0.1:53"]
    data["proxy"]["listen"] = "0.0.0.0"
    data["proxy"]["routes"][0]["ports"] = [443]
    data["proxy"]["routes"][1]["ports"] = [80]
    data["dns"]["listen"] = "0.0.0.0"
    data["dns"]["port"] = 53
    data["api"]["port"] = API_PORT
    return data


def start(base: str, data: dict[str, Any]) -> NamespacedProcess:
    path = os.path.join(base, "dcrouter.toml")
    write_config(path, data)
    os.chmod(path, 0o644)
    proc = NamespacedProcess([TWISTD, "-n", "--pidfile=", "--uid", USER, "--gid", GROUP,
                              "dcrouter", "--config", path], cwd=base,
                             log_path=os.path.join(base, "twistd.out"))
    try:
        wait_until(lambda: "dcrouter ready" in proc.output() or proc.proc.poll() is not None,
                   timeout=60)
    except TimeoutError:
        proc.kill()
        raise AssertionError(proc.output())
    assert proc.proc.poll() is None, proc.output()
    return proc


CLIENTS = r"""
import json, smtplib, socket, ssl, sys, threading, http.server
import dns.message, dns.query
from dcrouter.tlsutil import make_self_signed
out = {}

class Backend(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"backend says hi"
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass

plain = http.server.ThreadingHTTPServer(("127.0.0.1", 9080), Backend)
threading.Thread(target=plain.serve_forever, daemon=True).start()
cert, key = make_self_signed(["www.dcrouter.test"])
open("/tmp/_b.crt", "wb").write(cert); open("/tmp/_b.key", "wb").write(key)
tls = http.server.ThreadingHTTPServer(("127.0.0.1", 9443), Backend)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain("/tmp/_b.crt", "/tmp/_b.key")
tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
threading.Thread(target=tls.serve_forever, daemon=True).start()

client = ssl.create_default_context(); client.check_hostname = False
client.verify_mode = ssl.CERT_NONE
with smtplib.SMTP("127.0.0.1", 25, timeout=10) as s:
    out["smtp_25"] = s.ehlo("client.test")[0]
    s.sendmail("me@client.test", ["alice@localhost"], b"Subject: hi\r\n\r\nfrom port 25\r\n")
with smtplib.SMTP("127.0.0.1", 587, timeout=10) as s:
    s.starttls(context=client)
    out["submission_587"] = s.login("demo", "change-me")[0]
with smtplib.SMTP_SSL("127.0.0.1", 465, timeout=10, context=client) as s:
    code, text = s.ehlo("client.test")
    out["smtps_465"] = code
    out["size"] = [l for l in text.decode().splitlines() if l.startswith("SIZE")]
q = dns.message.make_query("dcrouter.test.", "A")
out["dns_udp_53"] = dns.query.udp(q, "127.0.0.1", port=53, timeout=5).answer[0].to_text()
out["dns_tcp_53"] = dns.query.tcp(q, "127.0.0.1", port=53, timeout=5).answer[0].to_text()
import subprocess
def curl(*args):
    return subprocess.run(["curl", "-sS", "-k", "--max-time", "10", *args],
                          capture_output=True, text=True).stdout
out["http_80"] = curl("http://127.0.0.1/")
out["https_443"] = curl("--resolve", "www.dcrouter.test:443:127.0.0.1",
                        "https://www.dcrouter.test/")
out["api"] = json.loads(curl("http://127.0.0.1:%d/api/status" % int(sys.argv[1])))
print(json.dumps(out))
"""


def _ids(pid: int) -> dict[str, list[int]]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    return {k: [int(x) for x in fields[k].split()] for k in ("Uid", "Gid", "Groups")}


def _owners(root: str) -> dict[str, int]:
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            found[os.path.relpath(path, root)] = os.lstat(path).st_uid
    return found


def test_root_binds_every_port_then_runs_as_nobody(world):
    _require_root()
    nobody = pwd.getpwnam(USER)
    data = production_config(world)
    proc = start(world, data)
    try:
        ran = proc.run([sys.executable, "-c", CLIENTS, str(API_PORT)], timeout=90)
        assert ran.returncode == 0, ran.stderr + proc.output()
        seen = json.loads(ran.stdout)
        assert seen["smtp_25"] == 250 and seen["smtps_465"] == 250
        assert seen["submission_587"] == 235
        assert seen["dns_udp_53"].endswith("A 127.0.0.1") and seen["dns_tcp_53"]
        assert seen["http_80"] == "backend says hi"
        assert seen["https_443"] == "backend says hi"
        assert seen["api"]["version"]
        ids = _ids(proc.pid)
        assert ids["Uid"] == [nobody.pw_uid] * 4, ids
        assert ids["Gid"] == [nobody.pw_gid] * 4, ids
        assert ids["Groups"] == [nobody.pw_gid], ids
        maildir = os.path.join(world, "var", "mail", "alice", "new")
        wait_until(lambda: os.path.isdir(maildir) and os.listdir(maildir), timeout=20)
        owners = _owners(os.path.join(world, "var"))
        assert os.stat(os.path.join(world, "var")).st_uid == nobody.pw_uid
        assert any(p.startswith("certs") for p in owners) and any(
            p.startswith("queue") for p in owners), owners
        assert {p: u for p, u in owners.items() if u != nobody.pw_uid} == {}

        # a reload adding a privileged port is refused whole: a restart is needed
        before = seen["size"]
        data["email"]["ports"] = [25, 587, 465, 24]
        data["email"]["max_message_size"] = 1000
        write_config(os.path.join(world, "dcrouter.toml"), data)
        proc.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in proc.output(), timeout=20)
        out = proc.output()
        assert "email.ports[3]: port 24 is below 1024" in out and "needs a restart" in out, out
        probe = proc.run([sys.executable, "-c", r"""
import smtplib, socket
s = socket.socket(); s.settimeout(3)
refused = s.connect_ex(("127.0.0.1", 24)) != 0
with smtplib.SMTP("127.0.0.1", 25, timeout=10) as c:
    size = [l for l in c.ehlo("x")[1].decode().splitlines() if l.startswith("SIZE")]
print(refused, size)
"""])
        assert probe.stdout.strip() == f"True {before}", probe.stdout + probe.stderr
        # re-creating the listener on 25 (AUTH required there now) would need a new bind
        data["email"]["ports"] = [25, 587, 465]
        data["email"]["submission_ports"] = [587, 25]
        write_config(os.path.join(world, "dcrouter.toml"), data)
        proc.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: proc.output().count("reload refused") >= 2, timeout=20)
        assert "email.submission_ports: changing whether port 25 requires AUTH" in \
            proc.output(), proc.output()
        again = proc.run([sys.executable, "-c", r"""
import smtplib
with smtplib.SMTP("127.0.0.1", 25, timeout=10) as c:
    c.ehlo("x")
    print(c.mail("me@client.test")[0])
"""])
        assert again.stdout.strip() == "250", again.stdout + again.stderr
    finally:
        status = proc.stop()
    assert status == 0, proc.output()
    assert "Traceback" not in proc.output(), proc.output()


def _listening_inodes(proc: NamespacedProcess, port: int) -> set[str]:
    table = proc.run(["cat", "/proc/net/tcp"]).stdout.splitlines()[1:]
    inodes = set()
    for line in table:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":  # LISTEN
            inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_workers_get_the_masters_sockets_under_root_then_drop(world):
    _require_root()
    nobody = pwd.getpwnam(USER)
    data = production_config(world, workers=2)
    data["router"]["log_format"] = "json"
    path = os.path.join(world, "dcrouter.toml")
    write_config(path, data)
    os.chmod(path, 0o644)
    proc = NamespacedProcess([TWISTD, "-n", "--pidfile=", "--uid", USER, "--gid", GROUP,
                              "dcrouter", "--config", path], cwd=world,
                             log_path=os.path.join(world, "twistd.out"))
    try:
        wait_until(lambda: proc.output().count(") ready") >= 2 or proc.proc.poll() is not None,
                   timeout=60)
        assert proc.proc.poll() is None, proc.output()
        workers = _children(proc.pid)
        assert len(workers) == 2, proc.output()
        for pid in [proc.pid, *workers]:
            assert _ids(pid)["Uid"] == [nobody.pw_uid] * 4
        # one listening socket per port, bound by the master, shared by both workers
        for port in (25, 587, 465, 80, 443, 53, API_PORT):
            inodes = _listening_inodes(proc, port)
            assert len(inodes) == 1, (port, inodes)
            assert inodes <= _socket_inodes(proc.pid), port
            holders = [w for w in workers if inodes <= _socket_inodes(w)]
            # the API runs in worker 0 only; the other worker closed its copy
            assert len(holders) == (1 if port == API_PORT else 2), (port, holders)
        served = set()
        deadline = time.monotonic() + 30
        while len(served) < 2 and time.monotonic() < deadline:
            ran = proc.run([sys.executable, "-c", r"""
import smtplib
for i in range(8):
    with smtplib.SMTP("127.0.0.1", 25, timeout=10) as s:
        s.ehlo("x")
"""])
            assert ran.returncode == 0, ran.stderr
            for line in proc.output().splitlines():
                if line.startswith("{"):
                    event = json.loads(line)
                    if event.get("message", "").startswith("connection from") and \
                            event.get("local_port") == 25:
                        served.add(event["pid"])
        assert served == set(workers), (served, workers)
    finally:
        status = proc.stop()
    assert status == 0, proc.output()
    assert "Traceback" not in proc.output()

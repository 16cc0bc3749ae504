"""The twistd plugin and .tac: real processes, every listener reached by a real client."""

from __future__ import annotations

import json
import os
import shutil
import signal
import smtplib
import socket
import ssl
import urllib.request

import dns.message
import dns.query
import pytest

from tests.support.configs import default_config_with_free_ports, write_config
from tests.support.net import wait_for_tcp
from tests.support.proc import REPO, TwistdProcess, wait_until


def _reach_every_listener(ports: dict[str, int]) -> None:
    with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=10) as smtp:
        code, _ = smtp.ehlo("client.test")
        assert code == 250 or code // 100 == 2
    with smtplib.SMTP("127.0.0.1", ports["submission"], timeout=10) as smtp:
        assert smtp.ehlo("client.test")[0] // 100 == 2
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP_SSL("127.0.0.1", ports["smtps"], timeout=10, context=ctx) as smtp:
        assert smtp.ehlo("client.test")[0] // 100 == 2
    for name in ("https", "http"):
        with socket.create_connection(("127.0.0.1", ports[name]), timeout=10):
            pass
    query = dns.message.make_query("dcrouter.test.", "A")
    for send in (dns.query.udp, dns.query.tcp):
        reply = send(query, "127.0.0.1", port=ports["dns"], timeout=10)
        assert reply.id == query.id
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['api']}/api/status", timeout=10) as r:
        assert r.status == 200
        json.loads(r.read())


def _start(tmp_path, **kwargs) -> tuple[TwistdProcess, dict[str, int]]:
    data, ports = default_config_with_free_ports(str(tmp_path / "var"))
    write_config(str(tmp_path / "dcrouter.toml"), data)
    proc = TwistdProcess(str(tmp_path), config="dcrouter.toml", **kwargs)
    try:
        for port in (ports["smtp"], ports["api"], ports["http"]):
            wait_for_tcp(port, timeout=30)
    except TimeoutError:
        proc.kill()
        raise AssertionError(proc.output())
    return proc, ports


def test_plugin_serves_every_listener_and_stops_cleanly(tmp_path):
    proc, ports = _start(tmp_path)
    try:
        _reach_every_listener(ports)
        assert os.stat(tmp_path / "var").st_mode & 0o777 == 0o700
    finally:
        status = proc.stop()
    assert status == 0, proc.output()
    assert "Traceback" not in proc.output()


def test_tac_builds_the_same_tree(tmp_path):
    data, ports = default_config_with_free_ports(str(tmp_path / "var"))
    write_config(str(tmp_path / "dcrouter.toml"), data)
    shutil.copy(os.path.join(REPO, "etc", "dcrouter.tac"), tmp_path / "dcrouter.tac")
    proc = TwistdProcess(str(tmp_path), tac="dcrouter.tac",
                         extra_env={"DCROUTER_CONFIG": "dcrouter.toml"})
    try:
        wait_for_tcp(ports["api"], timeout=30)
        wait_for_tcp(ports["smtp"], timeout=30)
        _reach_every_listener(ports)
    finally:
        status = proc.stop()
    assert status == 0, proc.output()


BAD_CONFIGS = {
    "port": ('[email]\nports = [70000]\n', "email.ports[0]: must be 1..65535, got 70000"),
    "type": ('[email]\nmax_connections = "x"\n', "email.max_connections: must be an integer"),
    "glob": ('[email]\n[[email.domain_rules]]\npattern = "a@b@c"\nmode = "mta"\n',
             "email.domain_rules[0].pattern: malformed pattern"),
    "mode": ('[email]\n[[email.domain_rules]]\npattern = "*@a.test"\nmode = "relay"\n',
             "email.domain_rules[0].mode: must be one of"),
    "unknown": ('[router]\nstate_dri = "x"\n', "router.state_dri: unknown key (did you mean"),
    "syntax": ('[email\n', "invalid TOML"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CONFIGS))
def test_bad_config_prints_one_line_and_exits_nonzero(tmp_path, kind):
    text, expected = BAD_CONFIGS[kind]
    (tmp_path / "bad.toml").write_text(text)
    proc = TwistdProcess(str(tmp_path), config="bad.toml")
    status = proc.wait(60)
    out = proc.output().strip()
    assert status != 0
    assert expected in out
    assert "Traceback" not in out
    assert len(out.splitlines()) == 1, out


def test_missing_config_file(tmp_path):
    proc = TwistdProcess(str(tmp_path), config="absent.toml")
    assert proc.wait(60) != 0
    out = proc.output().strip()
    assert "absent.toml: configuration file not found" in out and "Traceback" not in out


def test_port_in_use_is_one_clear_line(tmp_path):
    data, ports = default_config_with_free_ports(str(tmp_path / "var"))
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    data["api"]["port"] = blocker.getsockname()[1]
    write_config(str(tmp_path / "dcrouter.toml"), data)
    try:
        proc = TwistdProcess(str(tmp_path), config="dcrouter.toml")
        assert proc.wait(60) != 0
    finally:
        blocker.close()
    out = proc.output()
    assert "api.port: cannot listen on 127.0.0.1" in out
    assert "Traceback" not in out


def test_sighup_reload_keeps_running_on_bad_file_and_applies_good_one(tmp_path):
    proc, ports = _start(tmp_path)
    try:
        config = tmp_path / "dcrouter.toml"
        good = config.read_text()
        config.write_text(good.replace("[api]", "[api]\nbogus_key = 1", 1))
        proc.signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in proc.output(), timeout=20)
        assert "api.bogus_key: unknown key" in proc.output()
        wait_for_tcp(ports["api"])
        # a good file that drops the proxy stops its listeners
        data, _ = default_config_with_free_ports(str(tmp_path / "var"))
        import tomllib
        current = tomllib.loads(good)
        del current["proxy"]
        write_config(str(config), current)
        proc.signal(signal.SIGHUP)
        wait_until(lambda: "configuration applied" in proc.output(), timeout=20)
        def proxy_closed() -> bool:
            try:
                socket.create_connection(("127.0.0.1", ports["http"]), timeout=1).close()
                return False
            except OSError:
                return True
        wait_until(proxy_closed, timeout=10)
        wait_for_tcp(ports["smtp"])
    finally:
        status = proc.stop()
    assert status == 0, proc.output()


def test_json_log_format(tmp_path):
    data, ports = default_config_with_free_ports(str(tmp_path / "var"))
    data["router"]["log_format"] = "json"
    write_config(str(tmp_path / "dcrouter.toml"), data)
    proc = TwistdProcess(str(tmp_path), config="dcrouter.toml")
    try:
        wait_for_tcp(ports["api"], timeout=30)
        wait_until(lambda: "dcrouter 0" in proc.output(), timeout=10)
    finally:
        proc.stop()
    events = [json.loads(line) for line in proc.output().splitlines() if line.startswith("{")]
    started = [e for e in events if e.get("namespace") == "dcrouter.router"
               and "started" in e.get("message", "")]
    assert started and started[0]["level"] == "info" and "services" in started[0]

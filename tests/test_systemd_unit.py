"""etc/systemd/: the unit is what docs/deployment.md says, and systemd-analyze accepts it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from dcrouter.config import parse_config
from tests.support.proc import REPO

UNIT = os.path.join(REPO, "etc", "systemd", "dcrouter.service")
TMPFILES = os.path.join(REPO, "etc", "systemd", "dcrouter-tmpfiles.conf")
SYSUSERS = os.path.join(REPO, "etc", "systemd", "dcrouter-sysusers.conf")


def _keys(path: str) -> dict[str, list[str]]:
    """``{"Section.Key": [values...]}`` (a key may repeat, as systemd allows)."""
    out: dict[str, list[str]] = {}
    section = ""
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, _, value = line.partition("=")
            out.setdefault(f"{section}.{key}", []).append(value)
    return out


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: Debian package systemd (in TEST_DEBS)"
    return tool


def _local_copy(tmp_path, text: str) -> str:
    """The unit with /opt/dcrouter/.venv replaced by this test's venv (verify runs it)."""
    venv = os.path.dirname(os.path.dirname(sys.executable))
    path = tmp_path / "dcrouter.service"
    path.write_text(text.replace("/opt/dcrouter/.venv", venv))
    return str(path)


def test_unit_starts_as_root_binds_then_drops_and_is_sandboxed():
    keys = _keys(UNIT)
    service = {k.split(".", 1)[1]: v for k, v in keys.items() if k.startswith("Service.")}
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    # root-then-drop: no User=, no ambient capability; twistd switches after binding
    assert "User" not in service and "AmbientCapabilities" not in service
    start = service["ExecStart"][0].split()
    assert start[start.index("--uid") + 1] == "dcrouter"
    assert start[start.index("--gid") + 1] == "dcrouter"
    assert "--nodaemon" in start and "--pidfile=" in start
    assert start[start.index("--config") + 1] == "/etc/dcrouter/dcrouter.toml"
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    caps = set(service["CapabilityBoundingSet"][0].split())
    assert caps == {"CAP_NET_BIND_SERVICE", "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN"}
    assert service["NoNewPrivileges"] == ["true"] and service["ProtectSystem"] == ["strict"]
    # the only writable place is router.state_dir, which tmpfiles.d gives to dcrouter
    assert service["ReadWritePaths"] == ["/var/lib/dcrouter"]
    assert service["WorkingDirectory"] == ["/var/lib/dcrouter"]
    assert "d /var/lib/dcrouter 0700 dcrouter dcrouter -" in open(TMPFILES).read()
    assert re.search(r"^u dcrouter - .* /var/lib/dcrouter ", open(SYSUSERS).read(), re.M)
    # the stop timeout leaves the default shutdown_timeout and the master's margin room
    from dcrouter.workers import STOP_MARGIN
    default_timeout = parse_config({}).router.shutdown_timeout
    assert int(service["TimeoutStopSec"][0]) > default_timeout + STOP_MARGIN
    assert service["KillMode"] == ["mixed"] and int(service["WatchdogSec"][0]) > 0
    for hardening in ("ProtectHome", "PrivateTmp", "PrivateDevices", "RestrictNamespaces",
                      "RestrictSUIDSGID", "LockPersonality", "ProtectKernelTunables"):
        assert service[hardening] == ["true"], hardening


def test_systemd_analyze_verifies_the_unit_and_would_catch_a_bad_key(tmp_path):
    tool = _analyze()
    text = open(UNIT).read()
    good = subprocess.run([tool, "verify", _local_copy(tmp_path, text)], capture_output=True,
                          text=True, timeout=60)
    assert good.returncode == 0 and good.stderr.strip() == "", good.stderr
    broken = subprocess.run([tool, "verify", _local_copy(tmp_path, text.replace(
        "Type=notify", "Type=notifyy"))], capture_output=True, text=True, timeout=60)
    assert "Failed to parse service type" in broken.stderr, broken.stderr


def test_systemd_analyze_security_rates_the_unit_ok(tmp_path):
    tool = _analyze()
    ran = subprocess.run([tool, "security", "--offline=true", _local_copy(tmp_path,
                          open(UNIT).read())], capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", ran.stdout)
    assert match, ran.stdout + ran.stderr
    assert float(match.group(1)) <= 3.0 and match.group(2) == "OK", match.group(0)


@pytest.mark.parametrize("name", ["dcrouter-tmpfiles.conf", "dcrouter-sysusers.conf"])
def test_companion_files_are_commented_for_where_they_go(name):
    first = open(os.path.join(REPO, "etc", "systemd", name)).readline()
    assert first.startswith("# /etc/") and "dcrouter.conf" in first

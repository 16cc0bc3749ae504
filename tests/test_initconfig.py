"""``python -m dcrouter init`` and ``twistd dcrouter`` without ``--config``."""

from __future__ import annotations

import os
import re
import stat
import subprocess

from dcrouter.config import load_config
from dcrouter.email.auth import verify_password
from dcrouter.initconfig import default_config_text
from dcrouter.tap import find_config
from tests.support.proc import REPO, TWISTD, run_cli, twistd_env


def _secrets(out: str) -> tuple[str, str]:
    token = re.search(r"api\.token:\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    password = re.search(r"password:\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    return token, password


def test_embedded_default_is_the_checkouts_etc_dcrouter_toml():
    with open(os.path.join(REPO, "etc", "dcrouter.toml"), encoding="utf-8") as f:
        assert default_config_text() == f.read()


def test_init_writes_a_private_config_with_fresh_secrets_and_says_how_to_start(tmp_path):
    first = run_cli("init", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    path = tmp_path / "a" / "dcrouter.toml"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    options = load_config(str(path))
    token, password = _secrets(first.stdout)
    assert options.api.token == token and len(token) >= 40
    [demo] = options.email.auth.users
    assert demo.password.startswith("{SCRYPT}") and password not in path.read_text()
    assert verify_password(demo.password, password)
    assert options.router.state_dir == str(tmp_path / "a" / "var")
    assert options.email.queue.persistent_path == str(tmp_path / "a" / "var" / "queue")
    lines = first.stdout.splitlines()
    start = lines.index("start it with:")
    assert lines[start + 1].strip() == f"cd {tmp_path / 'a'}"
    assert lines[start + 2].strip().endswith("twistd -n --pidfile= dcrouter")
    second = run_cli("init", str(tmp_path / "b"))
    assert _secrets(second.stdout)[0] != token and _secrets(second.stdout)[1] != password
    again = run_cli("init", str(tmp_path / "a"))
    assert again.returncode == 2 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr and load_config(str(path)).api.token == token


def test_find_config_takes_the_first_existing_file(tmp_path):
    here, etc = tmp_path / "dcrouter.toml", tmp_path / "etc.toml"
    etc.write_text("")
    assert find_config((str(here), str(etc))) == str(etc)
    here.write_text("")
    assert find_config((str(here), str(etc))) == str(here)


def test_twistd_without_config_uses_dot_dcrouter_toml_or_says_where_it_looked(tmp_path):
    env = twistd_env()
    missing = subprocess.run([TWISTD, "-n", "--pidfile=", "dcrouter"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2
    assert "no configuration file given and none found (looked for ./dcrouter.toml, " \
        "/etc/dcrouter/dcrouter.toml); write one with `python -m dcrouter init`" \
        in missing.stderr, missing.stderr
    (tmp_path / "dcrouter.toml").write_text('[router]\nstate_dir = "var"\nlog_level = "nope"\n')
    found = subprocess.run([TWISTD, "-n", "--pidfile=", "dcrouter"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert found.returncode == 2
    assert found.stderr.startswith("dcrouter: using ./dcrouter.toml (no --config given)\n")
    assert "router.log_level" in found.stderr and "Traceback" not in found.stderr

"""Installed, not cloned: build the sdist and wheel, check them, install the wheel in a fresh
venv, ``init`` there and talk SMTP to the plugin started from it.

The build runs on a copy of the checkout's tracked files (``python -m build
--no-isolation``: the wheel is built from the sdist, so a file missing from the
sdist fails here).  The fresh venv gets the wheel with ``--no-deps --no-index``;
its dependencies come from this test venv's site-packages through a ``.pth``
line (no network, no build of dependencies), and the test checks that every
``Requires-Dist`` of the wheel is met there while ``dcrouter`` itself is
imported from the fresh venv only.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import smtplib
import subprocess
import sys
import sysconfig
import tomllib
import zipfile

from tests.support.configs import write_config
from tests.support.net import free_port, free_tcp_udp_port, wait_for_tcp
from tests.support.proc import REPO, wait_until

VENV_BIN = os.path.dirname(sys.executable)


def _run(args: list[str], cwd: str, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess:
    ran = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert ran.returncode == 0, f"{args}\n{ran.stdout}\n{ran.stderr}"
    return ran


def _tracked_copy(dest: str) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=REPO, capture_output=True,
                           check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        source = os.path.join(REPO, name)
        if not os.path.isfile(source):
            continue
        target = os.path.join(dest, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(source, target)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = "/usr/bin:/bin"
    return env


def test_wheel_installs_in_a_fresh_venv_inits_and_serves_smtp(tmp_path):
    source, dist = str(tmp_path / "src"), str(tmp_path / "dist")
    _tracked_copy(source)
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, "."], cwd=source)
    [wheel] = glob.glob(os.path.join(dist, "*.whl"))
    [sdist] = glob.glob(os.path.join(dist, "*.tar.gz"))
    checked = _run([sys.executable, "-m", "twine", "check", "--strict", wheel, sdist],
                   cwd=source)
    assert checked.stdout.count("PASSED") == 2, checked.stdout
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("dcrouter/defaults/dcrouter.toml", "twisted/plugins/dcrouter_plugin.py",
                   "dcrouter/api/static/index.html", "dcrouter/py.typed"):
        assert needed in names, needed
    # the wheel must not replace Twisted's own plugin package nor ship a stale cache
    assert "twisted/plugins/__init__.py" not in names and "twisted/__init__.py" not in names
    assert not [n for n in names if n.endswith("dropin.cache") or n.startswith("tests/")]

    fresh = str(tmp_path / "fresh")
    _run([sys.executable, "-m", "venv", "--without-pip", fresh], cwd=str(tmp_path))
    python = os.path.join(fresh, "bin", "python")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
          "--no-index", wheel], cwd=str(tmp_path))
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                cwd=str(tmp_path)).stdout.strip()
    with open(os.path.join(site, "zz-test-dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")  # this venv's Twisted, dkimpy...
    env = _clean_env()
    where = _run([python, "-c", "import dcrouter, twisted.plugins.dcrouter_plugin as p; "
                  "print(dcrouter.__file__); print(p.__file__)"], cwd=str(tmp_path), env=env)
    assert all(line.startswith(fresh) for line in where.stdout.split()), where.stdout
    unmet = _run([python, "-c", r"""
from importlib import metadata
from packaging.requirements import Requirement
bad = []
for text in metadata.requires("dcrouter") or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        bad.append(f"{req.name} missing"); continue
    if version not in req.specifier:
        bad.append(f"{req.name} {version} not {req.specifier}")
print(bad)
"""], cwd=str(tmp_path), env=env)
    assert unmet.stdout.strip() == "[]", unmet.stdout

    home = str(tmp_path / "home")
    out = _run([python, "-m", "dcrouter", "init", home], cwd=str(tmp_path), env=env).stdout
    password = re.search(r"password:\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    assert f"  cd {home}\n" in out, out
    # the printed command, with the fixed ports of the default moved to free ones
    path = os.path.join(home, "dcrouter.toml")
    with open(path, "rb") as f:
        data = tomllib.load(f)
    smtp, submission, smtps, dns = free_port(), free_port(), free_port(), free_tcp_udp_port()
    data["email"]["ports"] = [smtp, submission, smtps]
    data["email"]["submission_ports"], data["email"]["implicit_tls_ports"] = [submission], [smtps]
    data["email"]["delivery"]["nameservers"] = [f"127.0.0.1:{dns}"]
    data["dns"]["port"] = dns
    data["api"]["port"] = free_port()
    for route in data["proxy"]["routes"]:
        route["ports"] = [free_port()]
    write_config(path, data)
    log = open(os.path.join(home, "twistd.out"), "wb")
    # what the twistd console script runs (the fresh venv has the wheel's files only)
    twistd = [python, "-c", "import sys; sys.argv[0] = 'twistd'; "
              "from twisted.scripts.twistd import run; run()"]
    proc = subprocess.Popen([*twistd, "-n", "--pidfile=", "dcrouter"],
                            cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_tcp(smtp, timeout=60)
        except TimeoutError:
            raise AssertionError(open(os.path.join(home, "twistd.out")).read()) from None
        with smtplib.SMTP("127.0.0.1", smtp, timeout=10) as client:
            client.sendmail("me@localhost", ["alice@localhost"],
                            b"Subject: from the wheel\r\n\r\nhello\r\n")
        with smtplib.SMTP("127.0.0.1", submission, timeout=10) as client:
            client.starttls()
            assert client.login("demo", password)[0] == 235
        maildir = os.path.join(home, "var", "mail", "alice", "new")
        wait_until(lambda: os.path.isdir(maildir) and os.listdir(maildir), timeout=30)
    finally:
        proc.terminate()
        status = proc.wait(40)
        log.close()
    output = open(os.path.join(home, "twistd.out"), encoding="utf-8", errors="replace").read()
    assert status == 0, output
    assert "dcrouter: using ./dcrouter.toml (no --config given)" in output, output
    assert "Traceback" not in output, output

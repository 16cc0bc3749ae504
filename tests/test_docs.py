"""Every code block of README.md and docs/*.md runs, so the documentation cannot rot.

Conventions (for writers of docs):

* A fenced block's language decides what happens to it:

  - ```` ```toml ````: parsed and validated with :func:`dcrouter.config.parse_config`.
    Every section is optional, so a block holding whole sections (``[proxy]``,
    ``[[email.domain_rules]]``...) is validated as it stands; a full example
    configuration starts with the line ``# dcrouter.toml``.  A block of bare keys
    starts with ``# in [SECTION]`` (e.g. ``# in [email.queue]``) and is validated
    inside that table.
  - ```` ```python ````: executed in a fresh interpreter.  A block whose first line
    is ``# docs/examples/NAME.py`` must be that file, byte for byte.
  - ```` ```sh ````: executed with ``bash -e``; commands in the background
    (``&``) are killed afterwards.

  Blocks of one file run in order, in one scratch directory that looks like a
  checkout (``etc/``, ``docs/examples`` on PYTHONPATH) with a dcrouter running
  from ``etc/dcrouter.toml`` (state in ``var/``), so ``var/mail/alice/new/``,
  ``dcrouterctl`` and ``swaks`` work as in the text.  The documented fixed ports
  (2525, 2587, 2465, 8443, 8080, 5353, 8088, the backends 9443, 9080, 8444 and
  8445 for a second dcrouter, and pebble's 14000, 15000, 15001, 18053, 18055) are
  replaced by the real ephemeral ones, and ``.venv/bin/`` by the test's venv.
* Output and pictures use another language or none (``text``, ``json`` -
  which must parse -, ``yaml``, ``promql``, or a bare fence) and are not run.
* A block that cannot run here (systemd, production ACME, placeholders) has
  ``<!-- not-run: REASON -->`` on the line before its fence.

The last test checks that every block not so marked ran (running those whose
test was deselected).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tomllib
from typing import Any, Iterator, Optional

import pytest

from dcrouter.config import parse_config
from tests.support.configs import default_config_with_free_ports, write_config
from tests.support.net import free_port, free_tcp_udp_port
from tests.support.proc import REPO, TwistdProcess, twistd_env, wait_until

DOC_FILES = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs",
                                                                              "*.md")))
RUNNABLE = {"toml", "python", "sh"}
DISPLAY = {"", "text", "json", "yaml", "promql"}
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(?P<reason>.*?)\s*-->")
VENV_BIN = os.path.dirname(sys.executable)

#: Documented fixed port -> key of the scratch router's port map.
FIXED_PORTS = {2525: "smtp", 2587: "submission", 2465: "smtps", 8443: "https", 8080: "http",
               5353: "dns", 8088: "api", 9443: "backend_tls", 9080: "backend_http",
               8444: "spare_1", 8445: "spare_2",
               14000: "pebble", 15000: "pebble_management", 15001: "pebble_tls",
               18053: "challtestsrv_dns", 18055: "challtestsrv_management"}


@dataclasses.dataclass
class Block:
    """One fenced code block of a Markdown file."""

    path: str
    line: int
    lang: str
    text: str
    not_run: Optional[str] = None

    @property
    def name(self) -> str:
        """``docs/x.md:12``."""
        return f"{os.path.relpath(self.path, REPO)}:{self.line}"


def blocks_of(path: str) -> list[Block]:
    """The fenced blocks of one Markdown file, with their not-run markers."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    out: list[Block] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            lang = line[3:].strip()
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            marker = NOT_RUN.search(lines[j]) if j >= 0 else None
            body = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            out.append(Block(path, i - len(body), lang, "\n".join(body) + "\n",
                             marker.group("reason") if marker else None))
        i += 1
    return out


ALL_BLOCKS = [b for path in DOC_FILES for b in blocks_of(path)]
RUN_BLOCKS = [b for b in ALL_BLOCKS if b.not_run is None and b.lang in RUNNABLE]
RAN: set[str] = set()


def test_every_block_is_runnable_display_or_marked() -> None:
    for block in ALL_BLOCKS:
        if block.not_run is not None:
            assert block.not_run, f"{block.name}: not-run needs a reason"
            continue
        assert block.lang in RUNNABLE | DISPLAY, \
            f"{block.name}: language {block.lang!r} cannot run; mark it <!-- not-run: why -->"
        if block.lang == "json":
            json.loads(block.text)


# -- toml -----------------------------------------------------------------------------------

def toml_data(block: Block) -> dict[str, Any]:
    """The configuration a toml block stands for (see the conventions above)."""
    text = block.text
    first = text.split("\n", 1)[0]
    section = re.match(r"#\s*in\s*\[([\w.]+)\]", first)
    if section:
        text = f"[{section.group(1)}]\n" + text
    return tomllib.loads(text)


@pytest.mark.parametrize("block", [b for b in RUN_BLOCKS if b.lang == "toml"],
                         ids=lambda b: b.name)
def test_toml_block_is_a_valid_configuration(block: Block) -> None:
    parse_config(toml_data(block))
    RAN.add(block.name)


# -- python and sh, against a running router ---------------------------------------------------

@pytest.fixture(scope="module")
def scratch(tmp_path_factory: Any) -> Iterator[dict[str, Any]]:
    """A checkout-like directory with dcrouter running from etc/dcrouter.toml."""
    root = str(tmp_path_factory.mktemp("docs"))
    shutil.copytree(os.path.join(REPO, "etc"), os.path.join(root, "etc"))
    shutil.copytree(os.path.join(REPO, "docs", "examples"), os.path.join(root, "docs", "examples"))
    data, ports = default_config_with_free_ports("var")
    data["email"]["queue"]["persistent_path"] = "var/queue"
    ports["backend_tls"] = free_port()
    ports["backend_http"] = free_port()
    ports["spare_1"] = free_port()  # for a second dcrouter a doc starts
    ports["spare_2"] = free_port()
    for name in ("pebble", "pebble_management", "pebble_tls", "challtestsrv_management"):
        ports[name] = free_port()  # the local ACME server of proxy-guide.md
    ports["challtestsrv_dns"] = free_tcp_udp_port()
    data["proxy"]["routes"][0]["targets"] = [f"127.0.0.1:{ports['backend_tls']}"]
    data["proxy"]["routes"][1]["targets"] = [f"127.0.0.1:{ports['backend_http']}"]
    write_config(os.path.join(root, "etc", "dcrouter.toml"), data)
    proc = TwistdProcess(root, config="etc/dcrouter.toml")

    def smtp_up() -> bool:
        if proc.proc.poll() is not None:
            raise RuntimeError("dcrouter exited:\n" + proc.output())
        try:
            with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=2) as s:
                return s.noop()[0] == 250
        except OSError:
            return False
    try:
        wait_until(smtp_up, timeout=40)
        env = twistd_env()
        env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "docs", "examples"),
                                             env.get("PYTHONPATH", "")])
        env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
        env["DCROUTER_API_URL"] = f"http://127.0.0.1:{ports['api']}"
        yield {"root": root, "ports": ports, "env": env, "proc": proc}
    finally:
        proc.stop()


def localise(text: str, ports: dict[str, int]) -> str:
    """Documented ports and paths -> the scratch router's."""
    for fixed, key in FIXED_PORTS.items():
        text = re.sub(rf"(?<![\d.]){fixed}(?!\d)", str(ports[key]), text)
    return text.replace(".venv/bin/", VENV_BIN + "/")


def run_block(block: Block, scratch: dict[str, Any]) -> subprocess.CompletedProcess:
    """Run one python or sh block in the scratch directory; kill what it left behind."""
    text = localise(block.text, scratch["ports"])
    if block.lang == "python":
        script = os.path.join(scratch["root"], "_doc_block.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(text)
        args = [sys.executable, script]
    else:
        args = ["bash", "-e", "-o", "pipefail", "-c", text]
    log_path = os.path.join(scratch["root"], "_doc_block.out")
    with open(log_path, "w", encoding="utf-8") as log:
        # output to a file: a background command keeps a pipe open after the block ends
        proc = subprocess.Popen(args, cwd=scratch["root"], env=scratch["env"], text=True,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=90)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # background commands of the block
            except ProcessLookupError:
                pass
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    with open(log_path, encoding="utf-8", errors="replace") as f:
        out = f.read()
    return subprocess.CompletedProcess(args, proc.returncode, out, "")


def _files_with_code() -> list[str]:
    return sorted({b.path for b in RUN_BLOCKS if b.lang in ("python", "sh")})


@pytest.mark.parametrize("path", _files_with_code(), ids=lambda p: os.path.relpath(p, REPO))
def test_code_blocks_of_a_file_run_in_order(path: str, scratch: dict[str, Any]) -> None:
    for block in [b for b in RUN_BLOCKS if b.path == path and b.lang in ("python", "sh")]:
        first = block.text.split("\n", 1)[0]
        included = re.match(r"#\s*(docs/examples/\w+\.py)\s*$", first)
        if included:
            with open(os.path.join(REPO, included.group(1)), encoding="utf-8") as f:
                assert block.text == f.read(), f"{block.name} differs from {included.group(1)}"
        result = run_block(block, scratch)
        print(f"--- {block.name}\n{result.stdout}")  # shown with -s or on failure
        assert result.returncode == 0, f"{block.name} failed:\n{block.text}\n---\n{result.stdout}"
        RAN.add(block.name)


def test_every_unmarked_block_ran(scratch: dict[str, Any]) -> None:
    # blocks whose test was not selected (pytest -k ...) run here, so the count always holds
    for block in RUN_BLOCKS:
        if block.lang == "toml" and block.name not in RAN:
            test_toml_block_is_a_valid_configuration(block)
    for path in _files_with_code():
        if any(b.name not in RAN for b in RUN_BLOCKS if b.path == path):
            test_code_blocks_of_a_file_run_in_order(path, scratch)
    expected = {b.name for b in RUN_BLOCKS}
    assert RAN == expected, f"did not run: {sorted(expected - RAN)}"
    marked = [b for b in ALL_BLOCKS if b.not_run is not None]
    print(f"{len(RAN)} code blocks ran; {len(marked)} marked not-run")
    assert len(RAN) >= 40


# -- links ------------------------------------------------------------------------------------

def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def test_relative_links_and_anchors_resolve() -> None:
    broken = []
    for path in DOC_FILES:
        with open(path, encoding="utf-8") as f:
            text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) \
                if file_part else path
            if not os.path.exists(resolved):
                broken.append(f"{os.path.relpath(path, REPO)}: {target} (no such file)")
            elif anchor and resolved.endswith(".md") and anchor not in _anchors(resolved):
                broken.append(f"{os.path.relpath(path, REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_example_file_is_shown_in_the_docs() -> None:
    shown = {m.group(1) for b in ALL_BLOCKS if b.lang == "python"
             for m in [re.match(r"#\s*(docs/examples/\w+\.py)\s*$", b.text.split("\n", 1)[0])] if m}
    files = {os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "examples",
                                                                      "*.py"))}
    assert files and files == shown, f"not shown: {sorted(files - shown)}"

"""``dcrouterctl`` as a real subprocess against a running router: tables, --json, exit codes."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

import pytest_twisted
from twisted.internet import utils

from tests.api.support import TOKEN, StandInItem, hold_items
from tests.support.net import free_port
from tests.support.proc import twistd_env
from tests.support.router import port_of

CTL = os.path.join(os.path.dirname(sys.executable), "dcrouterctl")


class Result:
    """Exit code and output of one dcrouterctl run."""

    def __init__(self, out: bytes, err: bytes, code: int) -> None:
        self.out = out.decode()
        self.err = err.decode()
        self.code = code

    def json(self):
        return json.loads(self.out)


async def ctl(url: Optional[str], *args: str, token: Optional[str] = TOKEN,
              env_token: Optional[str] = None) -> Result:
    """Run the installed console script (importing this checkout through PYTHONPATH)."""
    env = twistd_env()
    env.pop("DCROUTER_API_TOKEN", None)
    env.pop("DCROUTER_API_URL", None)
    if env_token is not None:
        env["DCROUTER_API_TOKEN"] = env_token
    argv = []
    if url:
        argv += ["--url", url]
    if token is not None:
        argv += ["--token", token]
    out, err, code = await utils.getProcessOutputAndValue(CTL, argv + list(args), env=env)
    return Result(out, err, code)


def _url(client) -> str:
    return client.base


@pytest_twisted.ensureDeferred
async def test_status_table_and_json(running):
    router, client, queue = running
    result = await ctl(_url(client), "status")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].startswith("dcrouter ") and ", up " in lines[0]
    assert lines[1].split() == ["SERVICE", "STATE", "LISTENERS"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == {"api", "dns", "email", "proxy"}
    api_port = router.by_name["api"].listeners.port_for("api.port")
    assert f"tcp 127.0.0.1:{api_port}" in rows["api"] and "running" in rows["api"]
    result = await ctl(_url(client), "--json", "status")
    assert result.code == 0
    assert set(result.json()["services"]) == {"api", "dns", "email", "proxy"}


@pytest_twisted.ensureDeferred
async def test_stats_table_and_json(running):
    router, client, queue = running
    await hold_items(router, ["c@d.test"])
    result = await ctl(_url(client), "stats")
    assert result.code == 0, result.err
    figures = dict(line.split(None, 1) for line in result.out.splitlines()[2:])
    assert figures["summary.queue_depth"].strip() == "1"
    assert figures["email.queue.size"].strip() == "1"
    assert figures["email.queue.paused"].strip() == "yes"
    data = (await ctl(_url(client), "--json", "stats")).json()
    assert data["summary"]["queue_depth"] == 1


@pytest_twisted.ensureDeferred
async def test_queue_list_like_postqueue(running):
    router, client, queue = running
    result = await ctl(_url(client), "queue", "list")
    assert result.code == 0 and result.out.strip() == "Mail queue is empty"
    ids = await hold_items(router, ["one@b.test", "two@b.test"], size=1500)
    result = await ctl(_url(client), "queue", "list")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].startswith("-Queue ID-")
    rows = [line.split() for line in lines if line[:1].strip()][1:-1]
    assert [r[0] for r in rows] == sorted(ids)
    assert all(r[-1] == "sender@localhost" and int(r[1]) > 1500 for r in rows)
    assert {line.strip() for line in lines if line.startswith(" " * 40)} == {
        "one@b.test", "two@b.test"}
    assert lines[-1] == "-- 4 Kbytes in 2 Requests."
    listed = (await ctl(_url(client), "--json", "queue", "list", "--status", "pending")).json()
    assert listed["count"] == 2 and {i["id"] for i in listed["items"]} == set(ids)
    assert (await ctl(_url(client), "--json", "queue", "list", "--status",
                      "deferred")).json()["count"] == 0


@pytest_twisted.ensureDeferred
async def test_queue_list_marks_and_errors(standin):
    router, client, queue = standin
    queue.add(StandInItem("AAA1", "sender@a.test", ["one@b.test", "two@b.test"], 1500,
                          created_at=1795597200.0))
    queue.add(StandInItem("AAA2", "", ["three@b.test"], 600, status="processing",
                          last_error=""))
    result = await ctl(_url(client), "queue", "list")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    first = lines[1].split()
    assert first[0] == "AAA1" and first[1] == "1500" and first[-1] == "sender@a.test"
    assert lines[2].strip() == "(451 4.3.0 try later)"
    assert [lines[3].strip(), lines[4].strip()] == ["one@b.test", "two@b.test"]
    assert lines[6].split()[0] == "AAA2*" and lines[6].split()[-1] == "MAILER-DAEMON"
    assert lines[-1] == "-- 3 Kbytes in 2 Requests."


@pytest_twisted.ensureDeferred
async def test_queue_list_follows_cursors(running):
    router, client, queue = running
    ids = await hold_items(router, [f"r{i}@b.test" for i in range(1203)])
    listed = (await ctl(_url(client), "--json", "queue", "list")).json()
    assert listed["count"] == 1203
    assert [i["id"] for i in listed["items"]] == sorted(ids)
    limited = (await ctl(_url(client), "--json", "queue", "list", "--limit", "7")).json()
    assert limited["count"] == 7


@pytest_twisted.ensureDeferred
async def test_queue_retry_delete_and_their_exit_codes(running):
    router, client, queue = running
    first, second, third = await hold_items(router, ["a@b.test", "c@b.test", "d@b.test"])
    result = await ctl(_url(client), "queue", "retry", first)
    assert (result.code, result.out.strip()) == (0, f"{first}: retry scheduled")
    assert (await queue.get_item(first)).next_attempt <= time.time()
    result = await ctl(_url(client), "queue", "retry", "--all")
    assert (result.code, result.out.strip()) == (0, "retrying 3 item(s)")
    result = await ctl(_url(client), "queue", "delete", second)
    assert (result.code, result.out.strip()) == (0, f"{second}: deleted")
    assert await queue.get_item(second) is None
    missing = await ctl(_url(client), "queue", "delete", second)
    assert missing.code == 1 and "no queue item" in missing.err and "HTTP 404" in missing.err
    missing = await ctl(_url(client), "--json", "queue", "retry", "NOPE")
    assert missing.code == 1 and missing.json()["error"]["code"] == "not_found"
    usage = await ctl(_url(client), "queue", "retry")
    assert usage.code == 2 and "queue id or --all" in usage.err
    for item_id in (first, third):  # an empty queue: resuming starts no delivery
        assert (await ctl(_url(client), "queue", "delete", item_id)).code == 0
    for action, paused in (("resume", False), ("pause", True)):
        assert (await ctl(_url(client), "queue", action)).code == 0
        assert queue.paused is paused
    flushed = await ctl(_url(client), "--json", "queue", "flush")
    assert flushed.code == 0 and flushed.json() == {"flushed": 0}


@pytest_twisted.ensureDeferred
async def test_rules_list_add_remove(running):
    router, client, queue = running
    result = await ctl(_url(client), "rules", "list")
    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[0].split() == ["#", "PATTERN", "MODE", "TARGET"]
    assert lines[1].split()[:3] == ["0", "*@localhost", "mta"]
    added = await ctl(_url(client), "rules", "add", "*@relay.test", "--mode", "forward",
                      "--target", "127.0.0.1:2526")
    assert added.code == 0, added.err
    assert added.out.strip() == "added *@relay.test (forward) at position 1"
    assert router.email.domain_router.match_rule("x@relay.test").target.port == 2526
    listed = (await ctl(_url(client), "--json", "rules", "list")).json()
    assert [r["pattern"] for r in listed["rules"]] == ["*@localhost", "*@relay.test"]
    invalid = await ctl(_url(client), "rules", "add", "*@bad.test", "--mode", "forward")
    assert invalid.code == 1
    assert "rule.target: forward mode needs a target" in invalid.err and "HTTP 422" in invalid.err
    removed = await ctl(_url(client), "rules", "remove", "*@relay.test")
    assert (removed.code, removed.out.strip()) == (0, "removed *@relay.test")
    again = await ctl(_url(client), "rules", "remove", "*@relay.test")
    assert again.code == 1 and "no domain rule" in again.err


@pytest_twisted.ensureDeferred
async def test_reload_refused_is_exit_1(running):
    router, client, queue = running
    result = await ctl(_url(client), "reload")
    assert result.code == 1 and "not started from a configuration file" in result.err


@pytest_twisted.ensureDeferred
async def test_connection_and_auth_failures_are_exit_3(running):
    router, client, queue = running
    no_token = await ctl(_url(client), "status", token=None)
    assert no_token.code == 3 and "authentication refused" in no_token.err
    assert "DCROUTER_API_TOKEN" in no_token.err
    wrong = await ctl(_url(client), "status", token="nope")
    assert wrong.code == 3
    from_env = await ctl(_url(client), "status", token=None, env_token=TOKEN)
    assert from_env.code == 0
    closed = await ctl(f"http://127.0.0.1:{free_port()}", "status")
    assert closed.code == 3 and "cannot reach the dcrouter API" in closed.err
    smtp_port = port_of(router, "email")
    not_http = await ctl(f"http://127.0.0.1:{smtp_port}", "--timeout", "5", "status")
    assert not_http.code == 3 and "did not answer like the dcrouter API" in not_http.err


@pytest_twisted.ensureDeferred
async def test_usage_errors_are_exit_2_and_help_documents_exit_codes(running):
    router, client, queue = running
    assert (await ctl(_url(client), "frobnicate")).code == 2
    assert (await ctl(_url(client), "queue")).code == 2
    helped = await ctl(None, "--help", token=None)
    assert helped.code == 0
    assert "3  cannot talk to the API" in helped.out and "DCROUTER_API_TOKEN" in helped.out


def _run_ctl(url: str, *args: str) -> "subprocess.CompletedProcess[str]":
    import subprocess
    env = twistd_env()
    env["DCROUTER_API_TOKEN"] = TOKEN
    env["DCROUTER_API_URL"] = url
    return subprocess.run([CTL, *args], env=env, capture_output=True, text=True, timeout=60)


def test_rules_survive_a_restart_of_the_twistd_process_and_reload_works(tmp_path):
    """End to end with a real twistd process: add a rule, restart, reload, the rule stays."""
    from tests.api.support import router_config
    from tests.support.configs import write_config
    from tests.support.net import wait_for_tcp
    from tests.support.proc import TwistdProcess

    data, ports = router_config(str(tmp_path / "var"))
    write_config(str(tmp_path / "dcrouter.toml"), data)
    url = f"http://127.0.0.1:{ports['api']}"

    def start() -> TwistdProcess:
        proc = TwistdProcess(str(tmp_path), config="dcrouter.toml")
        try:
            wait_for_tcp(ports["api"], timeout=30)
        except TimeoutError:
            proc.kill()
            raise AssertionError(proc.output())
        return proc

    proc = start()
    try:
        added = _run_ctl(url, "rules", "add", "*@kept.test", "--mode", "forward",
                         "--target", "127.0.0.1:2526")
        assert added.returncode == 0, added.stderr
    finally:
        assert proc.stop() == 0
    proc = start()
    try:
        listed = json.loads(_run_ctl(url, "--json", "rules", "list").stdout)
        assert [r["pattern"] for r in listed["rules"]] == ["*@localhost", "*@kept.test"]
        reloaded = _run_ctl(url, "reload")
        assert reloaded.returncode == 0, reloaded.stderr
        assert reloaded.stdout.strip() == "reloaded dcrouter.toml"
        listed = json.loads(_run_ctl(url, "--json", "rules", "list").stdout)
        assert [r["pattern"] for r in listed["rules"]] == ["*@localhost", "*@kept.test"]
        assert "taken from" in proc.output() and "rules.toml" in proc.output()
    finally:
        assert proc.stop() == 0


@pytest_twisted.ensureDeferred
async def test_queue_show_and_rule_from_json_file(running, tmp_path):
    router, client, queue = running
    [item_id] = await hold_items(router, ["show@b.test"])
    shown = await ctl(_url(client), "queue", "show", item_id)
    assert shown.code == 0, shown.err
    fields = dict(line.split(None, 1) for line in shown.out.splitlines()[1:] if " " in line)
    assert fields["id"].strip() == item_id and fields["status"].strip() == "pending"
    assert fields["via.nexthop.port"].strip() == "9"
    missing = await ctl(_url(client), "queue", "show", "NOPE")
    assert missing.code == 1

    rule = tmp_path / "rule.json"
    rule.write_text(json.dumps({"mode": "process", "content_scanning": True,
                                "scanners": [{"type": "virus", "action": "reject"}]}))
    added = await ctl(_url(client), "rules", "add", "*@json.test", "--rule-json", str(rule),
                      "--position", "0")
    assert added.code == 0, added.err
    assert added.out.strip() == "added *@json.test (process) at position 0"
    assert router.options.email.domain_rules[0].scanners[0].action == "reject"
    rule.write_text("{not json")
    broken = await ctl(_url(client), "rules", "add", "*@x.test", "--rule-json", str(rule))
    assert broken.code == 2 and "is not JSON" in broken.err

"""End-to-end relay benchmark: smtp-source -> server -> smtp-sink, dcrouter beside Postfix.

Both servers run with their shipped defaults and relay everything to one next hop:

* ``postfix`` - a private Postfix instance (``postfix -c DIR start-fg``: own queue and data
  directories, smtpd on 127.0.0.1 on a free port, maillog file) with
  ``relayhost = [127.0.0.1]:SINK`` and nothing else changed (destination concurrency 20,
  connection cache, pipelining are Postfix's defaults).
* ``dcrouter`` - ``twistd -n dcrouter`` with one SMTP port, the disk queue, and
  ``default_mode = "forward"`` to the sink; every other setting is the default (log level info
  into a log file, as Postfix writes its maillog).

Each round starts a fresh ``smtp-sink`` and a fresh server, then runs ``smtp-source`` (C,
Postfix's load generator) with ``--messages`` messages of ``--size`` bytes over ``--sessions``
sessions (a new connection per message, as smtp-source does without ``-d``). Reported per
round: **accepted** msg/s (until smtp-source exits: every message got its 250), **relayed** msg/s
(until the sink has counted every message), the server's CPU time (all its processes, also
those that ended) and how many sessions the sink saw end (cached ones still open are not
counted).
Targets alternate round by round; the summary gives medians and the ratio dcrouter/Postfix.

Usage::

    .venv/bin/python bench/relay.py                  # 3 rounds each, 5,000 x 10 KB, 50 sessions
    .venv/bin/python bench/relay.py --rounds 1 --messages 1000
    .venv/bin/python bench/relay.py --targets dcrouter --keep   # leave the state dir for a look
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.smtp_accept import raise_fd_limit, tree_cpu_seconds  # noqa: E402
from tests.support.net import free_port, wait_for_tcp  # noqa: E402
from tests.support.postfix import SMTP_SOURCE, PostfixInstance, SmtpSink  # noqa: E402


def dcrouter_config(port: int, state_dir: str, sink_port: int, extra: str = "") -> str:
    """Defaults everywhere; one listener on ``port``; everything forwarded to the sink."""
    return f"""
[router]
state_dir = "{state_dir}"
log_file = "{state_dir}/dcrouter.log"

[email]
hostname = "dcrouter.bench.test"
listen = "127.0.0.1"
ports = [{port}]
submission_ports = []
implicit_tls_ports = []
default_mode = "forward"
default_server = "127.0.0.1"
default_port = {sink_port}
{extra}
"""


class Server:
    """One round's server (Postfix or dcrouter) relaying to ``sink``."""

    def __init__(self, name: str, sink: SmtpSink, extra: str = "") -> None:
        self.name = name
        self.sink = sink
        self.postfix: Optional[PostfixInstance] = None
        self.proc: Optional[subprocess.Popen] = None
        self.state = ""
        if name == "postfix":
            self.postfix = PostfixInstance(main={"relayhost": f"[127.0.0.1]:{sink.port}"})
            self.postfix.start()
            self.port = self.postfix.port
        elif name == "dcrouter":
            self.state = tempfile.mkdtemp(prefix="bench-relay-dcrouter-")
            self.port = free_port()
            cfg = os.path.join(self.state, "dcrouter.toml")
            with open(cfg, "w") as f:
                f.write(dcrouter_config(self.port, self.state, sink.port, extra))
            self._out = open(os.path.join(self.state, "twistd.out"), "wb")
            twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
            self.proc = subprocess.Popen([twistd, "-n", "--pidfile=", "dcrouter", "--config", cfg],
                                         env=dict(os.environ, PYTHONPATH=REPO), cwd=self.state,
                                         stdout=self._out, stderr=subprocess.STDOUT)
            wait_for_tcp(self.port, timeout=60)
        else:
            raise ValueError(f"unknown target {name!r}")

    def pids(self) -> list[int]:
        """The processes whose CPU time is the server's."""
        if self.proc is not None:
            return [self.proc.pid]
        assert self.postfix is not None
        pid = self.postfix.master_pid()
        return [pid] if pid else []

    def cpu(self) -> float:
        """CPU seconds of the server so far: the process, the children it reaped and its live
        descendants (Postfix: the master and smtpd, cleanup, qmgr, smtp, postlogd...)."""
        return sum(tree_cpu_seconds(pid) for pid in self.pids())

    def stop(self, keep: bool = False) -> None:
        """Stop it; remove its directory unless ``keep``."""
        if self.postfix is not None:
            self.postfix.stop()
            if keep:
                print(f"  postfix directory kept: {self.postfix.root}")
            else:
                self.postfix.cleanup()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self._out.close()
            if keep:
                print(f"  dcrouter state kept: {self.state}")
            else:
                shutil.rmtree(self.state, ignore_errors=True)


def one_round(name: str, messages: int, sessions: int, size: int, timeout: float,
              extra: str = "", keep: bool = False, source_args: tuple[str, ...] = ()
              ) -> dict[str, Any]:
    """Start sink and server, run smtp-source, wait until the sink has every message."""
    tmp = tempfile.mkdtemp(prefix="bench-relay-sink-")
    sink = SmtpSink(tmp)
    server = Server(name, sink, extra)
    try:
        time.sleep(0.5)
        base = sink.messages()
        cpu0 = server.cpu()
        started = time.monotonic()
        source = subprocess.run(
            [SMTP_SOURCE, *source_args, "-l", str(size), "-m", str(messages), "-s", str(sessions),
             "-f", "bench@source.test", "-t", "rcpt@sink.test", f"127.0.0.1:{server.port}"],
            capture_output=True, timeout=timeout)
        accepted_at = time.monotonic()
        cpu_accept = server.cpu() - cpu0
        errors = (source.stdout + source.stderr).decode(errors="replace").strip()
        deadline = started + timeout
        while sink.messages() - base < messages and time.monotonic() < deadline:
            time.sleep(0.01)
        relayed_at = time.monotonic()
        received = sink.messages() - base
        sessions_at_sink = sink.counters()[1]
        cpu_total = server.cpu() - cpu0
    finally:
        server.stop(keep)
        sink.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    accept_s = accepted_at - started
    relay_s = relayed_at - started
    return {
        "target": name, "accepted_s": accept_s, "accepted_rate": messages / accept_s,
        "relayed_s": relay_s, "received": received,
        "relayed_rate": received / relay_s if received >= messages else 0.0,
        "cpu_accept_s": cpu_accept, "cpu_total_s": cpu_total,
        "sink_sessions": sessions_at_sink, "source_rc": source.returncode,
        "source_output": errors[-300:],
    }


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="postfix,dcrouter")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--size", type=int, default=10240)
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds a round may take at most")
    parser.add_argument("--dcrouter-extra", default="",
                        help="TOML lines added to dcrouter's [email] section "
                        "(e.g. to compare a tuned setting)")
    parser.add_argument("--source-args", default="",
                        help="extra smtp-source options, e.g. '-d' (one connection per session)")
    parser.add_argument("--keep", action="store_true", help="keep state directories")
    args = parser.parse_args(argv)
    raise_fd_limit()
    targets = args.targets.split(",")
    load = os.getloadavg()
    print(f"cores: {os.cpu_count()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"{args.messages} messages of {args.size} bytes over {args.sessions} sessions, "
          f"{args.rounds} rounds, targets interleaved", flush=True)
    results: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
    for n in range(args.rounds):
        for name in targets:
            r = one_round(name, args.messages, args.sessions, args.size, args.timeout,
                          args.dcrouter_extra, args.keep, tuple(args.source_args.split()))
            results[name].append(r)
            note = "" if r["source_rc"] == 0 and not r["source_output"] else \
                f"  smtp-source rc={r['source_rc']}: {r['source_output'][-160:]!r}"
            if r["received"] < args.messages:
                note += f"  ONLY {r['received']} AT THE SINK"
            print(f"round {n + 1} {name:9s} accepted {r['accepted_rate']:6.0f} msg/s "
                  f"({r['accepted_s']:5.1f} s)  relayed {r['relayed_rate']:6.0f} msg/s "
                  f"({r['relayed_s']:5.1f} s)  server CPU {r['cpu_total_s']:5.1f} s "
                  f"({1000 * r['cpu_total_s'] / args.messages:.2f} ms/msg)  "
                  f"sink sessions ended {r['sink_sessions']}{note}", flush=True)
    print("\nmedians:")
    medians: dict[str, tuple[float, float]] = {}
    for name, rs in results.items():
        acc = statistics.median(r["accepted_rate"] for r in rs)
        rel = statistics.median(r["relayed_rate"] for r in rs)
        cpu = statistics.median(1000 * r["cpu_total_s"] / args.messages for r in rs)
        medians[name] = (acc, rel)
        print(f"  {name:9s} accepted {acc:6.0f} msg/s  relayed {rel:6.0f} msg/s  "
              f"server CPU {cpu:.2f} ms/msg")
    if "postfix" in medians and "dcrouter" in medians:
        pa, pr = medians["postfix"]
        da, dr = medians["dcrouter"]
        print(f"  ratio dcrouter/postfix: accepted {da / pa:.2f}x, relayed "
              f"{(dr / pr) if pr else 0:.2f}x")


if __name__ == "__main__":
    main()

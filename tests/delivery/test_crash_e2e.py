"""The Postfix promise, end to end: a 250 survives kill -9 of the router at any moment.

dcrouter runs as a real ``twistd`` process with a forward rule to an aiosmtpd
sink; a thread sends messages with smtplib and remembers every one answered
250; the router is SIGKILLed at a random moment (during acceptance, queueing
or delivery) and restarted, many times; finally every acknowledged message
must have reached the sink at least once.  ``bench/crash_soak.py`` runs more
cycles.
"""

from __future__ import annotations

import os
import random
import signal
import smtplib
import threading
import time
import uuid
from typing import Optional

from tests.delivery.peers import Sink
from tests.support.configs import write_config
from tests.support.net import free_port, wait_for_tcp
from tests.support.proc import TwistdProcess, wait_until


def crash_config(state_dir: str, smtp_port: int, sink_port: int) -> dict:
    """A minimal router: one SMTP port, a forward rule to the sink, fast retries."""
    return {
        "router": {"state_dir": state_dir},
        "email": {
            "hostname": "crash.test", "listen": "127.0.0.1", "ports": [smtp_port],
            "submission_ports": [], "implicit_tls_ports": [],
            "relay_networks": ["127.0.0.0/8"],
            "domain_rules": [{"pattern": "*@example.com", "mode": "forward",
                              "target": {"server": "127.0.0.1", "port": sink_port}}],
            "queue": {"storage_type": "disk", "base_retry_delay": 0.2, "max_retry_delay": 1.0,
                      "check_interval": 0.1, "max_retries": 50},
            "delivery": {"connect_timeout": 2.0, "command_timeout": 5.0,
                         "per_destination_concurrency": 10, "concurrent_deliveries": 50},
        },
    }


class Sender(threading.Thread):
    """Sends messages until stopped or the server goes away; records the acknowledged ones."""

    def __init__(self, port: int, acked: set[str]) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.acked = acked
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=5) as client:
                    while not self.stop_flag.is_set():
                        mid = uuid.uuid4().hex
                        body = (f"From: <s@sender.test>\r\nTo: <r@example.com>\r\n"
                                f"Subject: crash\r\nMessage-ID: <{mid}@crash.test>\r\n\r\n"
                                f"body {mid}\r\n")
                        client.sendmail("s@sender.test", ["r@example.com"], body)
                        self.acked.add(mid)
            except (OSError, smtplib.SMTPException):
                return


def delivered_ids(sink: Sink) -> set[str]:
    """Message-ids the sink has received."""
    out = set()
    for m in list(sink.messages):
        for line in m.content.split(b"\r\n"):
            if line.lower().startswith(b"message-id:"):
                out.add(line.split(b"<")[1].split(b"@")[0].decode())
    return out


def run_cycles(workdir: str, cycles: int, seed: int = 50, max_delay: float = 0.6,
               final_timeout: float = 60.0, sink: Optional[Sink] = None,
               sink_delay: float = 0.0) -> dict:
    """Start/kill the router ``cycles`` times while sending; then check delivery."""
    rng = random.Random(seed)
    own_sink = sink is None
    sink = sink or Sink().start()
    sink.handler.delay = sink_delay
    smtp_port = free_port()
    config = write_config(os.path.join(workdir, "dcrouter.toml"),
                          crash_config(os.path.join(workdir, "var"), smtp_port, sink.port))
    acked: set[str] = set()
    kills_before_ack = 0
    try:
        for _ in range(cycles):
            proc = TwistdProcess(workdir, config=config)
            try:
                try:
                    wait_for_tcp(smtp_port, timeout=30)
                except TimeoutError:
                    raise AssertionError("dcrouter did not start:\n" +
                                         proc.output()[-3000:]) from None
                sender = Sender(smtp_port, acked)
                before = len(acked)
                sender.start()
                time.sleep(rng.uniform(0.0, max_delay))
                proc.signal(signal.SIGKILL)
                proc.proc.wait(10)
                sender.stop_flag.set()
                sender.join(10)
                kills_before_ack += len(acked) == before
            finally:
                proc.kill()
        proc = TwistdProcess(workdir, config=config)
        try:
            final_start = time.monotonic()
            wait_until(lambda: acked <= delivered_ids(sink), timeout=final_timeout, interval=0.2)
            result = {"final_seconds": time.monotonic() - final_start,"acked": len(acked), "delivered": len(delivered_ids(sink)),
                      "sink_messages": len(sink.messages), "cycles": cycles,
                      "kills_before_first_ack": kills_before_ack}
            proc.stop()
            return result
        except TimeoutError:
            missing = acked - delivered_ids(sink)
            raise AssertionError(f"{len(missing)} of {len(acked)} acknowledged messages never "
                                 f"delivered; router output:\n{proc.output()[-3000:]}") from None
        finally:
            proc.kill()
    finally:
        if own_sink:
            sink.stop()


def test_kill_9_never_loses_an_acknowledged_message(tmp_path):
    result = run_cycles(str(tmp_path), cycles=50, max_delay=0.3)
    assert result["acked"] >= 50, result
    assert result["delivered"] >= result["acked"]

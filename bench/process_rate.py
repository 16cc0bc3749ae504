"""Messages per second through MultiModeProcessor.handle_message, per mode.

10 KB messages (plain text plus a small attachment) are written as spool
files and handed to ``handle_message`` one after another (``--concurrency``
at a time) with a queue that accepts instantly, so the figure is the
processor's own cost: routing, and for process mode parsing, the three
built-in scanners, one add_header transformation and writing the rewritten
copy (parsing/scanning/writing run in the reactor's thread pool).

    .venv/bin/python bench/process_rate.py [--messages 500] [--concurrency 10]
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from twisted.internet import defer, task  # noqa: E402

from dcrouter.config import parse_config  # noqa: E402
from dcrouter.email.processor import MultiModeProcessor  # noqa: E402
from dcrouter.email.routing import DomainRouter  # noqa: E402
from dcrouter.message import ReceivedMessage, SessionInfo, new_queue_id  # noqa: E402
from dcrouter.service import Extensions, RouterContext  # noqa: E402

RULES = [
    {"pattern": "*@fwd.test", "mode": "forward", "target": {"server": "127.0.0.1", "port": 2626}},
    {"pattern": "*@mta.test", "mode": "mta"},
    {"pattern": "*@proc.test", "mode": "process", "content_scanning": True,
     "scanners": [{"type": "spam"}, {"type": "virus", "action": "reject"},
                  {"type": "attachment", "blocked_extensions": [".exe"], "action": "reject"}],
     "transformations": [{"type": "add_header", "header": "X-Gateway", "value": "dcrouter"}]},
]


def message_10k() -> bytes:
    text = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 90)[:5000]
    attachment = base64.encodebytes(os.urandom(3500)).replace(b"\n", b"\r\n").decode()
    return ("Received: from client.test ([127.0.0.1]) by mx.test\r\n"
            "From: a@sender.test\r\nTo: b@x.test\r\nSubject: bench\r\n"
            "Date: Wed, 25 Nov 2026 09:00:00 +0000\r\nMessage-ID: <b@sender.test>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
            f"Content-Type: text/plain\r\n\r\n{text}\r\n--B\r\n"
            "Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
            f"Content-Disposition: attachment; filename=a.pdf\r\n\r\n{attachment}--B--\r\n"
            ).encode()


class InstantQueue:
    """Accepts every request and deletes its body (the cost of a real store is not measured)."""

    def check_capacity(self, destinations: list[str]) -> None:
        return None

    def enqueue(self, requests: list[Any]) -> defer.Deferred:
        for path in {r.body_path for r in requests}:
            os.unlink(path)
        return defer.succeed([r.queue_id for r in requests])


@defer.inlineCallbacks
def run(reactor: Any, args: argparse.Namespace) -> Any:
    tmp = tempfile.mkdtemp()
    try:
        options = parse_config({"router": {"state_dir": tmp}, "email": {"domain_rules": RULES}})
        assert options.email is not None
        context = RouterContext(options, reactor, Extensions())
        processor = MultiModeProcessor(options.email, DomainRouter.from_options(options.email),
                                       InstantQueue(), context)
        data = message_10k()
        session = SessionInfo("bench", "127.0.0.1", 1, 25, relay_permitted=True)
        print(f"cores: {os.cpu_count()}, messages: {args.messages} x {len(data)} bytes, "
              f"concurrency {args.concurrency}")
        print("| mode | msg/s |")
        print("|---|---:|")
        for mode, rcpt in (("forward", "b@fwd.test"), ("mta", "b@mta.test"),
                           ("process", "b@proc.test")):
            paths = []
            for _ in range(args.messages):
                qid = new_queue_id()
                path = os.path.join(tmp, qid)
                with open(path, "wb") as f:
                    f.write(data)
                paths.append((qid, path))
            sem = defer.DeferredSemaphore(args.concurrency)
            start = time.perf_counter()

            def one(qid: str, path: str) -> defer.Deferred:
                msg = ReceivedMessage(qid, "a@sender.test", [rcpt], path, len(data), session)
                return processor.handle_message(msg)

            yield defer.gatherResults([sem.run(one, q, p) for q, p in paths],
                                      consumeErrors=True)
            elapsed = time.perf_counter() - start
            print(f"| {mode} | {args.messages / elapsed:,.0f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=10)
    args = parser.parse_args()
    task.react(lambda reactor: run(reactor, args))


if __name__ == "__main__":
    main()

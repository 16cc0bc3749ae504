"""Enqueues messages into a disk queue forever, printing each acknowledged id; killed by the test.

Usage: python -m tests.queue.crash_child STATE_DIR START_TOKEN
Prints ``ACK <item id> <token>`` once ``enqueue`` has fired for that message.
"""

from __future__ import annotations

import os
import sys

from twisted.internet import defer, task

from dcrouter.config.queue import QueueOptions
from dcrouter.message import DeliveryRequest, Destination, Route, new_queue_id
from dcrouter.queue import UnifiedDeliveryQueue


async def run(reactor: object, state_dir: str, start: int) -> None:
    queue = UnifiedDeliveryQueue.from_options(
        QueueOptions(persistent_path=os.path.join(state_dir, "queue")), state_dir)
    queue.startService()
    await queue.when_ready()
    spool = os.path.join(state_dir, "spool")
    os.makedirs(spool, exist_ok=True)
    print("READY", flush=True)
    token = start

    async def one(n: int) -> None:
        path = os.path.join(spool, f"{n}.eml")
        with open(path, "wb") as f:
            f.write(b"Subject: crash\r\nX-Token: %d\r\n\r\nbody %d\r\n" % (n, n))
        ids = await queue.enqueue([DeliveryRequest(
            queue_id=new_queue_id(), mode="forward", rule_pattern="*", mail_from="a@b.test",
            recipients=[f"r{n}@example.com"], via=Destination.to(Route(kind="forward", server="127.0.0.1")),
            body_path=path, correlation_id=str(n))])
        sys.stdout.write(f"ACK {ids[0]} {n}\n")
        sys.stdout.flush()

    while True:
        await defer.gatherResults([defer.ensureDeferred(one(token + i)) for i in range(20)])
        token += 20


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(
        run(reactor, sys.argv[1], int(sys.argv[2]))))

"""Redis queue benchmark: cost of the status counters, and of reading them, as the queue grows.

Starts a private ``redis-server`` on an ephemeral loopback port, fills the
Redis store with N items through the queue (concurrent enqueues), then leases
every item, defers half and completes the other half.  Reports the enqueue
rate, the lease+outcome rate, and the time of one :meth:`RedisStore.refresh`
(the single script behind ``stats()``, ``/api/stats`` and ``/metrics``) at
each size, as the client sees it and as Redis executes it (from SLOWLOG): it must not grow with N, as the counters are kept by the write
scripts instead of counted item by item.

    python bench/redis_queue_stats.py                     # 1,000 and 20,000 items
    python bench/redis_queue_stats.py --sizes 1000 100000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    """An ephemeral loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(workdir: str) -> tuple[subprocess.Popen, int]:
    """A redis-server without persistence; returns (process, port)."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


async def measure(url: str, prefix: str, items: int, concurrency: int, workdir: str) -> dict:
    """Fill, read the counters, lease and settle everything; the figures of one size."""
    from twisted.internet import defer

    from dcrouter.config.queue import QueueOptions
    from dcrouter.message import RULE_DESTINATION, DeliveryRequest, new_queue_id
    from dcrouter.queue import UnifiedDeliveryQueue
    from dcrouter.queue.redisstore import _STATS

    queue = UnifiedDeliveryQueue.from_options(
        QueueOptions(storage_type="redis", redis_url=url, redis_prefix=prefix), workdir)
    queue.startService()
    await queue.when_ready()
    spool = os.path.join(workdir, "spool")
    os.makedirs(spool, exist_ok=True)
    body = b"Subject: bench\r\n\r\n" + b"x" * 2000 + b"\r\n"
    # items as the processor queues them: the rule by reference, 50 next hops as keys
    dests = [f"10.0.0.{i}:25" for i in range(50)]

    async def one(n: int) -> None:
        path = os.path.join(spool, f"{n}.eml")
        with open(path, "wb") as f:
            f.write(body)
        await queue.enqueue([DeliveryRequest(
            queue_id=new_queue_id(), mode="forward", rule_pattern="*@example.com",
            mail_from="bench@example.org", recipients=[f"user{n}@example.com"],
            via=RULE_DESTINATION, destination=dests[n % 50], body_path=path,
            correlation_id="bench", size=len(body))])

    started = time.perf_counter()
    n = 0
    while n < items:
        batch = min(concurrency, items - n)
        await defer.gatherResults([defer.ensureDeferred(one(n + i)) for i in range(batch)])
        n += batch
    enqueue_seconds = time.perf_counter() - started

    async def refresh_ms() -> float:
        times = []
        for _ in range(50):
            t = time.perf_counter()
            await queue.store.refresh()
            times.append((time.perf_counter() - t) * 1000)
        return statistics.median(times)

    full_refresh = await refresh_ms()
    # server-side execution time of the stats script alone (slowlog records every command)
    redis = queue.store.redis
    await redis.execute_command("CONFIG", "SET", "slowlog-log-slower-than", "0")
    await redis.execute_command("SLOWLOG", "RESET")
    for _ in range(50):
        await queue.store.refresh()
    log = await redis.execute_command("SLOWLOG", "GET", "200")
    await redis.execute_command("CONFIG", "SET", "slowlog-log-slower-than", "10000")
    sha = hashlib.sha1(_STATS.encode()).hexdigest().encode()
    server_us = [int(entry[2]) for entry in log
                 if len(entry[3]) > 1 and entry[3][0].upper() == b"EVALSHA"
                 and entry[3][1] == sha]
    assert queue.get_stats()["by_status"]["pending"] == items

    started = time.perf_counter()
    settled = 0
    while True:
        got = await queue.claim(500)
        if not got:
            break
        outcomes = []
        for i, item in enumerate(got):
            if (settled + i) % 2:
                outcomes.append(queue.defer_item(item, "451 bench", delay=3600))
            else:
                for r in item.recipients:
                    r.status = "delivered"
                outcomes.append(queue.complete(item))
        await defer.gatherResults(outcomes)
        settled += len(got)
    settle_seconds = time.perf_counter() - started
    await queue.store.refresh()
    by_status = queue.get_stats()["by_status"]
    await queue.stopService()
    return {"items": items, "enqueue_per_s": round(items / enqueue_seconds),
            "lease_and_outcome_per_s": round(settled / settle_seconds),
            "refresh_ms_median_full": round(full_refresh, 3),
            "stats_script_us_median_in_redis": statistics.median(server_us) if server_us
            else None,
            "by_status_after": {k: v for k, v in by_status.items() if v}}


def main() -> None:
    """Run the sizes in one reactor, print one JSON line per size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000])
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="redis-bench-")
    proc, port = start_redis(workdir)
    try:
        from twisted.internet import defer, task

        async def run(reactor: object) -> None:
            for i, size in enumerate(args.sizes):
                figures = await measure(f"redis://127.0.0.1:{port}/0", f"bench{i}", size,
                                        args.concurrency, workdir)
                print(json.dumps(figures), flush=True)
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

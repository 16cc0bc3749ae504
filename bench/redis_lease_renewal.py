"""Cost of keeping Redis queue leases alive: Redis calls per second per 1,000 leased items.

Starts a private ``redis-server`` (no persistence) on a loopback port, stores N
items, leases all of them to one ``UnifiedDeliveryQueue`` and lets its lease
heartbeat run for ``--seconds`` at ``--interval`` (the queue's counter refresh
is off, nothing else talks to Redis).  Redis's own ``INFO commandstats`` (reset
before each window, so it counts only the renewals; commands that scripts run
are counted too) and ``INFO cpu`` give what it cost: calls from the client,
commands Redis executed, Redis CPU time (less that of an idle window of the
same length, Redis's own background work).  Three ways to renew, on the same
leased items in the same run:

* ``heartbeat`` - dcrouter's: one script per node per interval for all its items
  (``HMGET`` of the holders and one ``ZADD XX`` per 1,000 items, Redis ``TIME``);
* ``per-item script`` - one script per interval that checks and extends each
  item on its own (``HGET`` + ``ZADD`` per item, the previous renewal script);
* ``call per item`` - one script call per item per interval.

The figures per second are scaled to the default renewal interval
(``lease_time`` 15 s / 3 = 5 s) and to 1,000 leased items.  The peer, in the
same run: ``redis-benchmark`` (SET and GET, 50 clients) on the same server,
i.e. what this Redis can execute here.

    .venv/bin/python bench/redis_lease_renewal.py                # 1,000 and 10,000 items
    .venv/bin/python bench/redis_lease_renewal.py --items 1000 --seconds 20
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: The per-item renewal script dcrouter used before the heartbeat (for comparison).
PER_ITEM_SCRIPT = """
local p = ARGV[1]
local n = 0
for i = 4, #ARGV do
  if redis.call('HGET', p..':owner', ARGV[i]) == ARGV[2] then
    redis.call('ZADD', p..':lease', 'XX', ARGV[3], ARGV[i])
    n = n + 1
  end
end
return n
"""


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


def parse_info(text: Any) -> dict[str, str]:
    """``INFO`` text as a dict."""
    if isinstance(text, bytes):
        text = text.decode()
    out = {}
    for line in str(text).splitlines():
        if ":" in line and not line.startswith("#"):
            key, _, value = line.partition(":")
            out[key] = value
    return out


def command_counts(info: dict[str, str]) -> dict[str, int]:
    """cmdstat_NAME -> calls."""
    out = {}
    for key, value in info.items():
        if key.startswith("cmdstat_"):
            m = re.search(r"calls=(\d+)", value)
            if m:
                out[key[len("cmdstat_"):]] = int(m.group(1))
    return out


async def window(redis: Any, seconds: float) -> dict[str, Any]:
    """Reset the counters, wait, and return what Redis executed meanwhile."""
    from twisted.internet import reactor, task
    await redis.execute_command("CONFIG", "RESETSTAT")
    cpu0 = parse_info(await redis.execute_command("INFO", "cpu"))
    started = time.monotonic()
    await task.deferLater(reactor, seconds, lambda: None)
    elapsed = time.monotonic() - started
    counts = command_counts(parse_info(await redis.execute_command("INFO", "commandstats")))
    cpu1 = parse_info(await redis.execute_command("INFO", "cpu"))
    cpu = sum(float(cpu1[k]) - float(cpu0[k]) for k in ("used_cpu_sys", "used_cpu_user"))
    # the INFO/CONFIG calls of this function are not renewals
    for name in ("info", "config"):
        counts.pop(name, None)
    return {"elapsed": elapsed, "counts": counts, "cpu": cpu}


async def measure(url: str, items: int, seconds: float, interval: float, workdir: str
                  ) -> list[dict[str, Any]]:
    """The three renewal ways on ``items`` leased items; one row each."""
    from twisted.internet import defer, task

    from dcrouter.config.queue import QueueOptions
    from dcrouter.message import DeliveryRequest, Route, new_queue_id
    from dcrouter.queue import UnifiedDeliveryQueue
    from dcrouter.queue.redisstore import RedisStore

    RedisStore.refresh_interval = 0  # no counter refresh: only renewals reach Redis
    prefix = f"bench{items}"
    queue = UnifiedDeliveryQueue.from_options(
        QueueOptions(storage_type="redis", redis_url=url, redis_prefix=prefix,
                     lease_time=3 * interval, lease_renew_interval=interval), workdir)
    queue.startService()
    await queue.when_ready()
    body = os.path.join(workdir, f"{prefix}.eml")
    with open(body, "wb") as f:
        f.write(b"Subject: bench\r\n\r\nbody\r\n")
    # one MX request to N domains: N items sharing one body, stored in one script
    await queue.enqueue([DeliveryRequest(
        queue_id=new_queue_id(), mode="mx", rule_pattern="*", mail_from="b@example.org",
        recipients=[f"u@d{n}.example" for n in range(items)], route=Route(kind="mx"),
        body_path=body, correlation_id="bench", size=24)])
    # Redis's own background work (serverCron, INFO) over one window: subtracted below
    idle = await window(queue.store.redis, seconds)
    held = await queue.claim(items)
    assert len(held) == items, len(held)
    assert queue.leases is not None
    store, redis, owner = queue.store, queue.store.redis, queue.owner
    rows = []

    renewals_before = queue.leases.renewals
    result = await window(redis, seconds)
    result["renewals"] = queue.leases.renewals - renewals_before
    result["way"] = "heartbeat (dcrouter)"
    rows.append(result)
    queue.leases.stop()

    def per_item_script() -> Any:
        expiry = repr(time.time() + 3 * interval)
        return redis.eval(PER_ITEM_SCRIPT, [], [prefix, owner, expiry] + [i.id for i in held])

    def call_per_item() -> Any:
        return defer.gatherResults([store.renew([i], owner, 3 * interval) for i in held])

    for name, fn in (("per-item script (before)", per_item_script),
                     ("call per item", call_per_item)):
        await fn()  # leases fresh before the window
        loop = task.LoopingCall(fn)
        loop.start(interval, now=False)
        result = await window(redis, seconds)
        loop.stop()
        result["renewals"] = round(result["elapsed"] / interval)
        result["way"] = name
        rows.append(result)
    still = await redis.execute_command("ZCARD", f"{prefix}:lease")
    assert int(still) == items, f"leases ran out during the benchmark: {still} of {items}"
    await queue.stopService()
    for row in rows:
        row["items"] = items
        row["cpu"] = max(0.0, row["cpu"] - idle["cpu"] * row["elapsed"] / idle["elapsed"])
    return rows


def redis_benchmark(port: int) -> dict[str, float]:
    """``redis-benchmark`` SET/GET requests per second (50 clients) on the same server."""
    out = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "set,get",
                          "-n", "200000", "-c", "50", "-q"], capture_output=True, text=True,
                         timeout=300).stdout
    rates = {}
    for line in out.replace("\r", "\n").splitlines():
        m = re.match(r"(SET|GET): ([\d.]+) requests per second", line.strip())
        if m:
            rates[m.group(1)] = float(m.group(2))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=1.0,
                        help="renewal interval of the run (figures are scaled to 5 s)")
    args = parser.parse_args()
    from dcrouter.config.queue import QueueOptions
    default_interval = QueueOptions().renew_interval
    workdir = tempfile.mkdtemp(prefix="lease-bench-")
    proc, port = start_redis(workdir)
    url = f"redis://127.0.0.1:{port}/0"
    rows: list[dict[str, Any]] = []
    try:
        from twisted.internet import defer, reactor, task

        async def run() -> None:
            for n in args.items:
                rows.extend(await measure(url, n, args.seconds, args.interval, workdir))

        failure: list[Any] = []
        d = defer.ensureDeferred(run())
        d.addErrback(failure.append)
        d.addBoth(lambda _: reactor.callLater(0, reactor.stop))
        task.deferLater(reactor, 0, lambda: None)
        reactor.run()
        if failure:
            failure[0].raiseException()
        peer = redis_benchmark(port)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"cores: {os.cpu_count()}; load average after: {load}; {args.seconds:g} s windows, "
          f"renewal every {args.interval:g} s in the run, scaled to every {default_interval:g} s "
          f"(the default) and to 1,000 leased items")
    print("| leased items | way | client calls / renewal | Redis commands / renewal | "
          "client calls/s per 1,000 items | Redis commands/s per 1,000 items | "
          "Redis CPU µs/s per 1,000 items |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        renewals = max(1, row["renewals"])
        counts = row["counts"]
        calls = counts.get("eval", 0) + counts.get("evalsha", 0)
        commands = sum(counts.values())
        scale = 1000 / row["items"] / default_interval
        cpu_us = row["cpu"] * 1e6 / renewals  # Redis CPU per renewal
        print(f"| {row['items']:,} | {row['way']} | {calls / renewals:,.1f} | "
              f"{commands / renewals:,.0f} | {calls / renewals * scale:,.2f} | "
              f"{commands / renewals * scale:,.1f} | {cpu_us * scale:,.0f} |")
    print(f"\npeer: redis-benchmark on the same server, 50 clients: "
          + ", ".join(f"{k} {v:,.0f} requests/s" for k, v in peer.items()))


if __name__ == "__main__":
    main()

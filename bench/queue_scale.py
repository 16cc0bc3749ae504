"""Queue scale benchmark: fill the disk queue with N items, restart it, claim everything.

Reports the durable enqueue rate (each enqueue fires only after fsync; many
concurrent enqueues share group commits), the restart recovery time (index
rebuilt from disk in a fresh process), the memory per recovered item (RSS
growth / N) and the rate of taking due items from the heap.

    python bench/queue_scale.py                 # 100,000 items
    python bench/queue_scale.py --items 1000000 --concurrency 500
    python bench/queue_scale.py --items 20000 --recovery-items 1000000

``--recovery-items N`` also writes a queue of N items directly in the
store's on-disk format (the journal records only - recovery never reads
bodies - and without per-message fsyncs, to save time) and measures its
recovery in a fresh process with a dropped page cache when permitted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fill(directory: str, items: int, concurrency: int, body_size: int) -> dict:
    """Runs in a fresh process: enqueue ``items`` messages durably; prints the figures."""
    from twisted.internet import defer, task

    from dcrouter.config.queue import QueueOptions
    from dcrouter.message import RULE_DESTINATION, DeliveryRequest, new_queue_id
    from dcrouter.queue import UnifiedDeliveryQueue

    spool = os.path.join(directory, "spool")
    os.makedirs(spool, exist_ok=True)
    body = b"Subject: bench\r\n\r\n" + b"x" * max(0, body_size - 20) + b"\r\n"
    result: dict = {}

    async def run(reactor) -> None:
        queue = UnifiedDeliveryQueue.from_options(
            QueueOptions(persistent_path=os.path.join(directory, "queue")), directory)
        queue.startService()
        await queue.when_ready()
        # items as the processor queues them: the rule by reference, 50 next hops as keys
        dests = [f"10.0.0.{i}:25" for i in range(50)]
        started = time.perf_counter()

        async def one(n: int) -> None:
            path = os.path.join(spool, f"{n}.eml")
            with open(path, "wb") as f:
                f.write(body)
            await queue.enqueue([DeliveryRequest(
                queue_id=new_queue_id(), mode="forward", rule_pattern="*@example.com",
                mail_from="bench@example.org", recipients=[f"user{n}@example.com"],
                via=RULE_DESTINATION, destination=dests[n % 50], body_path=path,
                correlation_id="bench",
                size=len(body))])

        n = 0
        last = started
        while n < items:
            batch = min(concurrency, items - n)
            await defer.gatherResults([defer.ensureDeferred(one(n + i)) for i in range(batch)])
            n += batch
            if time.perf_counter() - last > 10:
                last = time.perf_counter()
                print(f"  {n} items, {n / (last - started):.0f}/s", file=sys.stderr)
        elapsed = time.perf_counter() - started
        result["enqueue_seconds"] = elapsed
        result["enqueue_rate"] = items / elapsed
        result["commit_batches"] = queue.store.committer.batches
        await queue.stopService()
        print(json.dumps(result), flush=True)

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    return result


def write_direct(directory: str, items: int, body_size: int) -> None:
    """N items in the disk store's format, written directly (no fsync per message)."""
    from dcrouter.message import new_queue_id
    from dcrouter.queue.disk import DiskStore, encode_put
    from dcrouter.queue.item import QueueItem, RecipientState

    store = DiskStore(os.path.join(directory, "queue"))
    os.makedirs(store.root, mode=0o700, exist_ok=True)
    store.lock.acquire()
    store._scan()
    store.journal.close()
    body = b"Subject: bench\r\n\r\n" + b"x" * max(0, body_size - 20) + b"\r\n"
    # items as the processor queues them: the rule by reference, 50 next hops as keys
    dests = [f"10.0.0.{i}:25" for i in range(50)]
    path = store.journal._path(store.journal.segment + 1)
    with open(path, "wb") as journal:
        chunk = []
        for n in range(items):
            item_id = new_queue_id()
            item = QueueItem(id=item_id, mode="forward", rule_pattern="*@example.com",
                             mail_from="bench@example.org",
                             recipients=[RecipientState(f"user{n}@example.com")],
                             destination=dests[n % 50], body_ref=item_id, correlation_id="bench",
                             size=len(body))
            chunk.append(encode_put(item_id, item.journal_payload()))
            if len(chunk) == 10000:
                journal.write(b"".join(chunk))
                chunk = []
        journal.write(b"".join(chunk))
    store.lock.release()
    os.sync()


def recover(directory: str) -> dict:
    """Runs in a fresh process: open the queue, time it, measure RSS growth, claim all."""
    from twisted.internet import defer, task

    from dcrouter.config.queue import QueueOptions
    from dcrouter.queue import UnifiedDeliveryQueue
    result: dict = {}

    async def run(reactor) -> None:
        base = rss_bytes()
        queue = UnifiedDeliveryQueue.from_options(
            QueueOptions(persistent_path=os.path.join(directory, "queue")), directory)
        started = time.perf_counter()
        queue.startService()
        await queue.when_ready()
        result["recovery_seconds"] = time.perf_counter() - started
        result["items"] = queue.get_stats()["size"]
        result["rss_growth_bytes"] = rss_bytes() - base
        started = time.perf_counter()
        taken = 0
        while True:
            batch = await queue.claim(1000)
            if not batch:
                break
            taken += len(batch)
        result["claim_seconds"] = time.perf_counter() - started
        result["claimed"] = taken
        await queue.stopService()
        print(json.dumps(result), flush=True)

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    return result


def main() -> None:
    """Fill, restart and measure (each phase in its own process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=200,
                        help="enqueues in flight at once (like concurrent SMTP sessions)")
    parser.add_argument("--body-size", type=int, default=2048)
    parser.add_argument("--dir", default="", help="where to put the queue (default: a temp dir)")
    parser.add_argument("--recover", default="", help=argparse.SUPPRESS)
    parser.add_argument("--fill", default="", help=argparse.SUPPRESS)
    parser.add_argument("--recovery-items", type=int, default=0,
                        help="also measure recovery of a queue of this many items written "
                        "directly in the store's format")
    args = parser.parse_args()
    if args.recover:
        recover(args.recover)
        return
    if args.fill:
        fill(args.fill, args.items, args.concurrency, args.body_size)
        return
    directory = args.dir or tempfile.mkdtemp(prefix="queue-scale-")
    try:
        print(f"filling {args.items} items into {directory} ...", file=sys.stderr)
        out = subprocess.run([sys.executable, __file__, "--fill", directory, "--items",
                              str(args.items), "--concurrency", str(args.concurrency),
                              "--body-size", str(args.body_size)],
                             stdout=subprocess.PIPE, text=True, check=True)
        filled = json.loads(out.stdout.strip().splitlines()[-1])
        out = subprocess.run([sys.executable, __file__, "--recover", directory],
                             stdout=subprocess.PIPE, text=True, check=True)
        recovered = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"items:               {args.items} ({args.body_size}-byte bodies, "
              f"{args.concurrency} concurrent enqueues)")
        print(f"enqueue (durable):   {filled['enqueue_rate']:.0f} items/s "
              f"({filled['enqueue_seconds']:.1f} s, {filled['commit_batches']} group commits)")
        print(f"restart recovery:    {recovered['recovery_seconds']:.2f} s for "
              f"{recovered['items']} items")
        print(f"memory per item:     {recovered['rss_growth_bytes'] / max(1, recovered['items']):.0f}"
              " bytes (RSS growth of the recovering process)")
        print(f"claim due items:     {recovered['claimed'] / recovered['claim_seconds']:.0f} items/s")
        if args.recovery_items:
            big = os.path.join(directory, "big")
            os.makedirs(big)
            started = time.perf_counter()
            write_direct(big, args.recovery_items, args.body_size)
            written = time.perf_counter() - started
            try:
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3\n")
                cache = "cold page cache"
            except OSError:
                cache = "warm page cache"
            out = subprocess.run([sys.executable, __file__, "--recover", big],
                                 stdout=subprocess.PIPE, text=True, check=True)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"large queue:         {args.recovery_items} items written directly in "
                  f"{written:.0f} s")
            print(f"  restart recovery:  {rec['recovery_seconds']:.2f} s for {rec['items']} "
                  f"items ({cache})")
            print(f"  memory per item:   {rec['rss_growth_bytes'] / max(1, rec['items']):.0f} bytes")
            print(f"  claim due items:   {rec['claimed'] / rec['claim_seconds']:.0f} items/s "
                  "(materialising each)")
        print(f"cores:               {os.cpu_count()}")
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()

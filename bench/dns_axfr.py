"""Zone transfer (AXFR) speed: dcrouter against NSD serving the same zone.

The zone (``--records`` records: A, AAAA, MX, TXT in turn, plus SOA and NS) is
served by

* dcrouter (``twistd -n dcrouter`` with only ``[dns]``, ``allow_transfer`` =
  127.0.0.1/32),
* NSD (Debian package, ``provide-xfr: 127.0.0.1 NOKEY``),

both on loopback.  A raw TCP client sends one AXFR query and reads the
length-prefixed messages until the answer record counts add up (no record
parsing, so the client costs little); each server is measured ``--runs`` times,
alternating, and the median counts.  During each dcrouter transfer a second
client sends a UDP query every 10 ms and records the slowest answer, to show
that a transfer does not stall other queries.  The resident memory of
dcrouter is read from /proc before and after the transfers.

    .venv/bin/python bench/dns_axfr.py [--records 100000] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.dns_qps import free_port, wait_udp  # noqa: E402
from bench.dns_qps import start_nsd as start_nsd_with  # noqa: E402
from dcrouter.config import parse_config  # noqa: E402
from dcrouter.dns.zone import Zone, build_zone_content  # noqa: E402


def records(count: int) -> list[dict[str, str]]:
    """``count`` records of four kinds, under distinct names."""
    out = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            out.append({"name": f"h{i}", "type": "A", "value": f"10.{i >> 16 & 255}."
                        f"{i >> 8 & 255}.{i & 255}"})
        elif kind == 1:
            out.append({"name": f"h{i}", "type": "AAAA",
                        "value": f"2001:db8::{i >> 16:x}:{i & 0xffff:x}"})
        elif kind == 2:
            out.append({"name": f"m{i}", "type": "MX", "value": f"10 h{i - 2}"})
        else:
            out.append({"name": f"t{i}", "type": "TXT", "value": f"record number {i}"})
    return out


def zone_options(count: int) -> dict[str, Any]:
    return {"origin": "bench.test", "ttl": 3600, "records": records(count)}


def start_dcrouter(work: str, port: int, count: int) -> subprocess.Popen:
    conf = os.path.join(work, "dcrouter.toml")
    lines = ",\n".join('  { name = "%s", type = "%s", value = "%s" }'
                       % (r["name"], r["type"], r["value"]) for r in records(count))
    with open(conf, "w") as f:
        f.write(f'[router]\nstate_dir = "{work}/state"\nlog_level = "warn"\n\n'
                f'[dns]\nlisten = "127.0.0.1"\nport = {port}\nrate_limit = 0\n'
                f'allow_transfer = ["127.0.0.1/32"]\n\n'
                f'[[dns.zones]]\norigin = "bench.test"\nttl = 3600\nrecords = [\n{lines}\n]\n')
    env = dict(os.environ, PYTHONPATH=REPO)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return subprocess.Popen([twistd, "-n", "--pidfile=", "dcrouter", "--config", conf],
                            cwd=work, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(work, "dcrouter.err"), "wb"))


def start_nsd(work: str, port: int, count: int) -> subprocess.Popen:
    """NSD with the same zone, allowing transfers to loopback."""
    options = parse_config({"dns": {"zones": [zone_options(count)]}})
    assert options.dns is not None
    zone = Zone(build_zone_content(options.dns.zones[0], "bench"), 2026112501)
    return start_nsd_with(work, port, zone.to_zone_file(), "  provide-xfr: 127.0.0.1 NOKEY\n")


def _recv_exact(s: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError("closed")
        data += chunk
    return bytes(data)


def transfer(port: int, expected: int) -> dict[str, float]:
    """One AXFR with a raw client: seconds, bytes, messages, records."""
    qname = b"".join(bytes([len(p)]) + p for p in b"bench.test".split(b".")) + b"\x00"
    query = struct.pack("!HHHHHH", 7, 0, 1, 0, 0, 0) + qname + struct.pack("!HH", 252, 1)
    start = time.perf_counter()
    total = size = messages = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(struct.pack("!H", len(query)) + query)
        while total < expected:
            (length,) = struct.unpack("!H", _recv_exact(s, 2))
            body = _recv_exact(s, length)
            if body[3] & 0xF:
                raise RuntimeError(f"rcode {body[3] & 0xF}")
            total += struct.unpack_from("!H", body, 6)[0]
            size += length + 2
            messages += 1
    return {"seconds": time.perf_counter() - start, "bytes": size, "messages": messages,
            "records": total}


def probe(port: int, stop: threading.Event, worst: list[float]) -> None:
    """A UDP query every 10 ms until ``stop``; the slowest answer goes into ``worst``."""
    qname = b"\x02h0\x05bench\x04test\x00"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        qid = 0
        while not stop.is_set():
            qid = (qid + 1) & 0xFFFF
            start = time.perf_counter()
            s.sendto(struct.pack("!HHHHHH", qid, 0, 1, 0, 0, 0) + qname + b"\x00\x01\x00\x01",
                     ("127.0.0.1", port))
            while True:
                reply = s.recv(4096)
                if struct.unpack_from("!H", reply)[0] == qid:
                    break
            worst.append(time.perf_counter() - start)
            time.sleep(0.01)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="dns-axfr-bench-")
    expected = args.records + 3  # + NS, SOA twice
    procs: dict[str, tuple[subprocess.Popen, int]] = {}
    results: dict[str, list[dict[str, float]]] = {"dcrouter": [], "nsd": []}
    latencies: list[float] = []
    try:
        for name, start in (("dcrouter", start_dcrouter), ("nsd", start_nsd)):
            port = free_port()
            procs[name] = (start(work, port, args.records), port)
        for name, (_proc, port) in procs.items():
            wait_udp(port, timeout=120)
        rss_before = rss_kib(procs["dcrouter"][0].pid)
        for run in range(args.runs):
            for name, (_proc, port) in procs.items():
                stop = threading.Event()
                worst: list[float] = []
                prober = threading.Thread(target=probe, args=(port, stop, worst))
                if name == "dcrouter":
                    prober.start()
                result = transfer(port, expected)
                stop.set()
                if name == "dcrouter":
                    prober.join()
                    latencies.append(max(worst) if worst else 0.0)
                results[name].append(result)
                print(f"run {run + 1} {name}: {result['seconds']:.3f} s, "
                      f"{result['bytes'] / 1e6:.1f} MB in {result['messages']:.0f} messages, "
                      f"{result['records']:.0f} records"
                      + (f"; slowest UDP answer meanwhile {latencies[-1] * 1000:.1f} ms"
                         if name == "dcrouter" else ""), flush=True)
        rss_after = rss_kib(procs["dcrouter"][0].pid)
    finally:
        for proc, _port in procs.values():
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"\ncores: {os.cpu_count()}; load average after: {' '.join(load)}; "
          f"{args.records:,} records, {args.runs} runs; medians:")
    medians = {n: statistics.median(r["seconds"] for r in results[n]) for n in results}
    for name in results:
        print(f"  {name:9s} {medians[name]:.3f} s  {expected / medians[name]:>12,.0f} records/s"
              f"  {results[name][0]['messages']:.0f} messages")
    print(f"  dcrouter/nsd time ratio: {medians['dcrouter'] / medians['nsd']:.2f}")
    print(f"  dcrouter slowest concurrent UDP answer (median of runs): "
          f"{statistics.median(latencies) * 1000:.1f} ms")
    print(f"  dcrouter RSS before/after transfers: {rss_before / 1024:.0f} / "
          f"{rss_after / 1024:.0f} MiB")


if __name__ == "__main__":
    main()

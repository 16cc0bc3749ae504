"""UDP queries per second: dcrouter's DNS server against NSD (and bare twisted.names).

The same zone is served by

* dcrouter (``twistd -n dcrouter`` with only a ``[dns]`` section, rate limit off),
* NSD (Debian package, response rate limiting off: ``rrl-ratelimit: 0``),
* bare twisted.names (``twistd -n dns --bindzone``), for orientation,

all on loopback, and ``dnsperf`` (one client socket, ``-q`` outstanding queries)
sends queries to each for ``--seconds``; each server runs ``--runs`` times,
alternating, and the median counts.  Two query sets:

* ``repeated``: 17 names (A, AAAA, MX, TXT, NXDOMAIN, NODATA) over and over;
* ``distinct``: 50,000 different names answered by a wildcard, so dcrouter's
  answer cache never helps.

Signed (``--signed``, the default; ``--only-signed`` for just these): the same zone
with ``dnssec = true`` served by a second dcrouter, and by a second NSD serving it
pre-signed by ``ldns-signzone`` with dcrouter's own keys (the zone transferred from
dcrouter, its NSEC and RRSIG records dropped, signed again), queried with DO
(``dnsperf -D``):

* ``signed``: the repeated names (positive answers with RRSIGs, NXDOMAIN and NODATA
  with NSEC proofs);
* ``signed-nx``: 50,000 different names that do not exist: every answer is an
  NXDOMAIN with two NSEC records and three signatures, none of them cached.

    .venv/bin/python bench/dns_qps.py [--seconds 5] [--runs 3] [--outstanding 100]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dcrouter.config import parse_config  # noqa: E402
from dcrouter.dns.zone import Zone, build_zone_content  # noqa: E402

ZONE = {
    "origin": "bench.test", "ttl": 3600,
    "records": [
        {"name": "@", "type": "A", "value": "192.0.2.1"},
        {"name": "@", "type": "MX", "value": "10 mail"},
        {"name": "@", "type": "TXT", "value": "v=spf1 mx -all"},
        {"name": "www", "type": "A", "value": "192.0.2.10"},
        {"name": "www", "type": "AAAA", "value": "2001:db8::10"},
        {"name": "mail", "type": "A", "value": "192.0.2.25"},
        {"name": "ns1", "type": "A", "value": "192.0.2.53"},
        {"name": "*.w", "type": "A", "value": "192.0.2.200"},
    ] + [{"name": f"host{i}", "type": "A", "value": f"192.0.2.{100 + i}"} for i in range(50)],
}
QUERIES = ["www.bench.test A", "www.bench.test AAAA", "bench.test MX", "bench.test TXT",
           "mail.bench.test A", "missing.bench.test A", "www.bench.test MX"] + \
          [f"host{i}.bench.test A" for i in range(0, 50, 5)]
#: 50,000 different names (wildcard answers): more than dcrouter's answer cache holds,
#: so every query takes the full path (parse, look up, encode).
DISTINCT = [f"h{i}.w.bench.test A" for i in range(50000)]
#: 50,000 names that do not exist (NXDOMAIN with NSEC proofs when signed).
NXDOMAINS = [f"nx{i}.bench.test A" for i in range(50000)]


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    while True:
        with socket.socket() as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue


def wait_udp(port: int, timeout: float = 20.0) -> None:
    """Until the server answers a query on 127.0.0.1:port."""
    import dns.message
    import dns.query
    deadline = time.monotonic() + timeout
    while True:
        try:
            dns.query.udp(dns.message.make_query("www.bench.test", "A"), "127.0.0.1", port=port,
                          timeout=0.5)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no DNS server on port {port}")
            time.sleep(0.1)


def zone_file_text() -> str:
    """The zone as dcrouter builds it, in master-file format (for NSD and twisted.names)."""
    options = parse_config({"dns": {"zones": [ZONE]}})
    assert options.dns is not None
    return Zone(build_zone_content(options.dns.zones[0], "bench"), 2026112501).to_zone_file()


def start_dcrouter(work: str, port: int, signed: bool = False) -> subprocess.Popen:
    """dcrouter serving bench.test (``signed``: with dnssec = true, its own state_dir)."""
    name = "dcrouter-signed" if signed else "dcrouter"
    conf = os.path.join(work, f"{name}.toml")
    records = ",\n".join("  { name = \"%s\", type = \"%s\", value = \"%s\" }"
                         % (r["name"], r["type"], r["value"]) for r in ZONE["records"])
    with open(conf, "w") as f:
        f.write(f'[router]\nstate_dir = "{work}/{name}"\nlog_level = "warn"\n\n'
                f'[dns]\nlisten = "127.0.0.1"\nport = {port}\nrate_limit = 0\n'
                f'allow_transfer = ["127.0.0.1/32"]\n\n'
                f'[[dns.zones]]\norigin = "bench.test"\nttl = 3600\n'
                f'dnssec = {"true" if signed else "false"}\nrecords = [\n{records}\n]\n')
    env = dict(os.environ, PYTHONPATH=REPO)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return subprocess.Popen([twistd, "-n", "--pidfile=", "dcrouter", "--config", conf],
                            cwd=work, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(work, f"{name}.err"), "wb"))


def signed_zone_text(work: str, dcrouter_port: int) -> str:
    """bench.test as the signed dcrouter serves it, re-signed by ldns-signzone with the same
    keys (NSD's pre-signed peer)."""
    import glob
    out = subprocess.run(["dig", "@127.0.0.1", "-p", str(dcrouter_port), "bench.test", "AXFR",
                          "+nocomments", "+nostats", "+nocmd", "+onesoa"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    unsigned = [line for line in out.splitlines()
                if line and not line.startswith(";") and line.split()[3] not in ("RRSIG", "NSEC")]
    source = os.path.join(work, "bench.test.unsigned")
    with open(source, "w") as f:
        f.write("\n".join(unsigned) + "\n")
    keys = sorted(p[:-len(".private")] for p in glob.glob(
        os.path.join(work, "dcrouter-signed", "dnssec", "bench.test", "K*.private")))
    subprocess.run(["ldns-signzone", "-f", source + ".signed", "-o", "bench.test.", source,
                    *keys], check=True, timeout=60)
    with open(source + ".signed") as f:
        return f.read()


def start_nsd(work: str, port: int, zone_text: str = "", zone_options: str = "",
              folder_name: str = "nsd") -> subprocess.Popen:
    """NSD serving ``bench.test`` (``zone_text``, default this benchmark's zone) on loopback;
    ``zone_options`` adds lines to its zone block (e.g. provide-xfr)."""
    folder = os.path.join(work, folder_name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "bench.test.zone"), "w") as f:
        f.write(zone_text or zone_file_text())
    conf = os.path.join(folder, "nsd.conf")
    with open(conf, "w") as f:
        f.write(f"""server:
  ip-address: 127.0.0.1
  port: {port}
  username: ""
  chroot: ""
  zonesdir: "{folder}"
  pidfile: "{folder}/nsd.pid"
  zonelistfile: "{folder}/zone.list"
  xfrdfile: "{folder}/xfrd.state"
  xfrdir: "{folder}"
  database: ""
  server-count: 1
  rrl-ratelimit: 0
  rrl-whitelist-ratelimit: 0
  verbosity: 0
remote-control:
  control-enable: no
zone:
  name: "bench.test"
  zonefile: "bench.test.zone"
{zone_options}""")
    return subprocess.Popen(["nsd", "-d", "-c", conf], stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(folder, "nsd.err"), "wb"))


def start_twisted_names(work: str, port: int) -> subprocess.Popen:
    path = os.path.join(work, "bench.test.bind")
    with open(path, "w") as f:
        f.write(zone_file_text())
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return subprocess.Popen([twistd, "-n", "--pidfile=", "dns", "--interface", "127.0.0.1",
                             "-p", str(port), "--bindzone", path], cwd=work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def dnsperf(port: int, queries: str, seconds: int, outstanding: int, dnssec: bool = False
            ) -> dict[str, Any]:
    out = subprocess.run(["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", queries,
                          "-l", str(seconds), "-c", "1", "-T", "1", "-q", str(outstanding)] +
                         (["-D"] if dnssec else []),
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))  # type: ignore
    lost = re.search(r"Queries lost:\s+(\d+)", out)
    return {"qps": qps, "lost": int(lost.group(1)) if lost else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--outstanding", type=int, default=100)
    parser.add_argument("--no-twisted", action="store_true", help="skip bare twisted.names")
    parser.add_argument("--no-signed", action="store_true", help="skip the signed zone")
    parser.add_argument("--only-signed", action="store_true", help="only the signed zone")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="dns-bench-")
    sets = {"repeated": QUERIES, "distinct": DISTINCT, "signed": QUERIES, "signed-nx": NXDOMAINS}
    paths = {}
    for name, lines in sets.items():
        paths[name] = os.path.join(work, f"{name}.txt")
        with open(paths[name], "w") as f:
            f.write("\n".join(lines) + "\n")
    plain = [] if args.only_signed else ["dcrouter", "nsd"] + (
        [] if args.no_twisted else ["twisted.names"])
    signed = [] if args.no_signed else ["dcrouter-signed", "nsd-signed"]
    runs = ([("repeated", plain), ("distinct", plain)] if plain else []) + (
        [("signed", signed), ("signed-nx", signed)] if signed else [])
    procs: dict[str, tuple[subprocess.Popen, int]] = {}
    results: dict[tuple[str, str], list[float]] = {}
    try:
        starters = {"dcrouter": start_dcrouter, "nsd": start_nsd,
                    "twisted.names": start_twisted_names,
                    "dcrouter-signed": lambda w, p: start_dcrouter(w, p, signed=True)}
        for name in plain + signed[:1]:
            port = free_port()
            procs[name] = (starters[name](work, port), port)
        for name, (_proc, port) in procs.items():
            wait_udp(port)
        if signed:
            port = free_port()
            text = signed_zone_text(work, procs["dcrouter-signed"][1])
            procs["nsd-signed"] = (start_nsd(work, port, text, folder_name="nsd-signed"), port)
            wait_udp(port)
        for set_name, servers in runs:
            for run in range(args.runs):
                for name in servers:
                    port = procs[name][1]
                    result = dnsperf(port, paths[set_name], args.seconds, args.outstanding,
                                     dnssec=set_name.startswith("signed"))
                    results.setdefault((set_name, name), []).append(result["qps"])
                    print(f"{set_name} run {run + 1} {name}: {result['qps']:,.0f} qps "
                          f"(lost {result['lost']})", flush=True)
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
    print(f"\ncores: {os.cpu_count()}; load average after: {' '.join(load)}; {args.seconds}s "
          f"per run, {args.runs} runs, dnsperf -c 1 -T 1 -q {args.outstanding} (-D for the "
          f"signed sets); median queries/s:")
    for set_name, servers in runs:
        medians = {n: statistics.median(results[(set_name, n)]) for n in servers}
        ratio = medians[servers[0]] / medians[servers[1]]
        print(f"  {set_name:10s} " + " ".join(f"{n}={medians[n]:,.0f}" for n in servers) +
              f"   {servers[0]}/{servers[1]} = {ratio:.2f}")


if __name__ == "__main__":
    main()

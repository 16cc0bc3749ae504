"""NSD as a real secondary of dcrouter: it transfers the zone, and a NOTIFY makes it re-transfer.

NSD (Debian package ``nsd``) runs unprivileged from a temporary directory
(``username: ""``, ``chroot: ""``) on a loopback port, with
``request-xfr`` pointing at dcrouter's TCP port and ``allow-notify`` for
dcrouter's address.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any, Optional

import dns.message
import dns.query
import dns.rdatatype
import pytest_twisted
from twisted.internet import defer, reactor, task, threads

from tests.dns.conftest import ZONE, start_dns
from tests.dns.test_email_records import mail_config
from tests.support.net import free_tcp_udp_port


def nsd_config(folder: str, port: int, primary_port: int) -> str:
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
  verbosity: 2
  logfile: "{folder}/nsd.log"
remote-control:
  control-enable: no
zone:
  name: "example.test"
  zonefile: "example.test.zone"
  request-xfr: 127.0.0.1@{primary_port} NOKEY
  allow-notify: 127.0.0.1 NOKEY
zone:
  name: "big.test"
  zonefile: "big.test.zone"
  request-xfr: AXFR 127.0.0.1@{primary_port} NOKEY
  allow-notify: 127.0.0.1 NOKEY
""")
    return conf


def nsd_answer(port: int, name: str, rdtype: str, tcp: bool = False
               ) -> Optional[dns.message.Message]:
    query = dns.message.make_query(name, rdtype)
    try:
        if tcp:
            return dns.query.tcp(query, "127.0.0.1", port=port, timeout=2)
        return dns.query.udp(query, "127.0.0.1", port=port, timeout=0.5)
    except Exception:
        return None


async def wait_for(predicate: Any, seconds: float = 20.0) -> Any:
    """Poll ``predicate`` in a thread until it returns something true."""
    for _ in range(int(seconds / 0.2)):
        result = await threads.deferToThread(predicate)
        if result:
            return result
        await task.deferLater(reactor, 0.2, lambda: None)
    raise AssertionError("timed out")


@pytest_twisted.ensureDeferred
async def test_nsd_transfers_the_zone_and_follows_notify(tmp_path: Any) -> None:
    data = mail_config(allow_transfer=["127.0.0.1/32"])
    data["dns"]["zones"][0]["records"] = [dict(r) for r in ZONE["records"]]
    # big enough for a transfer of many messages
    data["dns"]["zones"].append({"origin": "big.test", "records": [
        {"name": f"h{i}", "type": "A", "value": f"10.0.{i // 256}.{i % 256}"}
        for i in range(5000)]})
    nsd_port = free_tcp_udp_port()
    data["dns"]["notify"] = [f"127.0.0.1:{nsd_port}"]
    running = start_dns(data, str(tmp_path / "dcrouter"))
    service = running.service
    await service.ready
    folder = str(tmp_path / "nsd")
    os.makedirs(folder)
    conf = nsd_config(folder, nsd_port, running.tcp_port)
    nsd = subprocess.Popen(["nsd", "-d", "-c", conf], stdout=subprocess.DEVNULL,
                           stderr=subprocess.STDOUT)
    try:
        serial = service.zone("example.test").serial

        def nsd_serial() -> int:
            r = nsd_answer(nsd_port, "example.test", "SOA")
            return r.answer[0][0].serial if r is not None and r.answer else 0
        assert await wait_for(nsd_serial) == serial
        # the big zone came in many messages (request-xfr AXFR) and NSD serves all of it
        big_serial = service.zone("big.test").serial

        def nsd_big() -> bool:
            r = nsd_answer(nsd_port, "big.test", "SOA")
            return r is not None and bool(r.answer) and r.answer[0][0].serial == big_serial
        assert await wait_for(nsd_big)
        last = await threads.deferToThread(nsd_answer, nsd_port, "h4999.big.test", "A")
        assert last is not None and last.answer[0][0].address == "10.0.19.135"
        # NSD answers the transferred data, email records and long TXT included
        www = await threads.deferToThread(nsd_answer, nsd_port, "www.example.test", "AAAA")
        assert www is not None and www.answer[0][0].address == "2001:db8::10"
        long_txt = await threads.deferToThread(nsd_answer, nsd_port, "long.example.test", "TXT",
                                              True)
        assert long_txt is not None
        assert b"".join(long_txt.answer[0][0].strings) == b"x" * 600
        dmarc = await threads.deferToThread(nsd_answer, nsd_port, "_dmarc.example.test", "TXT")
        assert dmarc is not None and dmarc.answer[0][0].strings[0].startswith(b"v=DMARC1")

        # a change: dcrouter NOTIFYs, NSD re-transfers (SOA refresh is an hour: only NOTIFY
        # can make it this fast) and serves the new serial and data
        await service.update_zones([dict(ZONE, records=list(ZONE["records"]) + [
            {"name": "added", "type": "A", "value": "192.0.2.222"}])])
        new_serial = service.zone("example.test").serial
        assert new_serial > serial
        assert await wait_for(lambda: nsd_serial() == new_serial)
        added = await threads.deferToThread(nsd_answer, nsd_port, "added.example.test", "A")
        assert added is not None and added.answer[0][0].address == "192.0.2.222"
        stats = service.get_stats()
        assert stats["transfers"] >= 3 and stats["notify_acknowledged"] >= 1
    finally:
        nsd.terminate()
        try:
            await threads.deferToThread(nsd.wait, 10)
        except subprocess.TimeoutExpired:
            nsd.kill()
        await defer.maybeDeferred(service.stopService)


def test_nsd_follows_a_sighup_reload_of_a_twistd_dcrouter(tmp_path: Any) -> None:
    """The production path: a dcrouter process, a changed config file, SIGHUP, NOTIFY, IXFR."""
    import signal

    from tests.support.configs import write_config
    from tests.support.proc import TwistdProcess, wait_until

    port, nsd_port = free_tcp_udp_port(), free_tcp_udp_port()
    zone = {"origin": "example.test", "records": [
        {"name": "www", "type": "A", "value": "192.0.2.10"},
        {"name": "@", "type": "TXT", "value": "x" * 600}]}
    data = {"router": {"state_dir": str(tmp_path / "var")},
            "dns": {"listen": "127.0.0.1", "port": port, "rate_limit": 0, "zones": [zone],
                    "allow_transfer": ["127.0.0.1/32"], "notify": [f"127.0.0.1:{nsd_port}"]}}
    path = write_config(str(tmp_path / "dcrouter.toml"), data)
    proc = TwistdProcess(str(tmp_path), config=path)
    folder = str(tmp_path / "nsd")
    os.makedirs(folder)
    nsd: Optional[subprocess.Popen] = None
    try:
        def serial_at(server_port: int) -> int:
            r = nsd_answer(server_port, "example.test", "SOA")
            return r.answer[0][0].serial if r is not None and r.answer else 0
        wait_until(lambda: serial_at(port) > 0, timeout=30)
        nsd = subprocess.Popen(["nsd", "-d", "-c", nsd_config(folder, nsd_port, port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        first = serial_at(port)
        wait_until(lambda: serial_at(nsd_port) == first, timeout=20)

        zone["records"][0]["value"] = "192.0.2.11"
        write_config(path, data)
        proc.signal(signal.SIGHUP)
        wait_until(lambda: serial_at(port) > first, timeout=20)
        second = serial_at(port)
        wait_until(lambda: serial_at(nsd_port) == second, timeout=20)
        www = nsd_answer(nsd_port, "www.example.test", "A")
        assert www is not None and www.answer[0][0].address == "192.0.2.11"
    finally:
        if nsd is not None:
            nsd.terminate()
            try:
                nsd.wait(10)
            except subprocess.TimeoutExpired:
                nsd.kill()
        status = proc.stop()
    assert status == 0, proc.output()[-2000:]
    with open(os.path.join(folder, "nsd.log")) as f:
        log = f.read()
    assert f"notify for example.test. from 127.0.0.1 serial {second}" in log

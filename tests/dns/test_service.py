"""The DNS service in a real twistd process: the default configuration, SIGHUP reload, dig."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

import dns.message
import dns.query
import dns.rcode

from tests.support.configs import default_config_with_free_ports, write_config
from tests.support.proc import TwistdProcess, wait_until


def query(port: int, name: str, rdtype: str) -> Any:
    return dns.query.udp(dns.message.make_query(name, rdtype), "127.0.0.1", port=port,
                         timeout=2)


def answers(port: int, name: str, rdtype: str) -> list[str]:
    return [r.to_text() for rr in query(port, name, rdtype).answer for r in rr]


def test_default_config_serves_zone_and_mail_records_and_sighup_reloads(tmp_path: Any) -> None:
    state = str(tmp_path / "var")
    data, ports = default_config_with_free_ports(state)
    path = write_config(str(tmp_path / "dcrouter.toml"), data)
    proc = TwistdProcess(str(tmp_path), config=path)
    port = ports["dns"]
    try:
        def up() -> bool:
            try:
                query(port, "dcrouter.test", "A")
                return True
            except Exception:
                return False
        wait_until(up, timeout=30)
        assert answers(port, "dcrouter.test", "A") == ["127.0.0.1"]
        # the embedded default delivers *@localhost itself: its MX is published
        wait_until(lambda: answers(port, "localhost", "MX") == ["10 localhost."])
        assert answers(port, "localhost", "TXT") == ['"v=spf1 mx -all"']
        assert answers(port, "_dmarc.localhost", "TXT") == ['"v=DMARC1; p=none"']
        serial = query(port, "dcrouter.test", "SOA").answer[0][0].serial
        dig = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+short", "+tcp",
                              "mail.dcrouter.test", "A"], capture_output=True, text=True,
                             timeout=10).stdout
        assert dig.strip() == "127.0.0.1"

        data["dns"]["zones"][0]["records"][0]["value"] = "127.0.0.2"
        write_config(path, data)
        proc.signal(signal.SIGHUP)
        wait_until(lambda: answers(port, "dcrouter.test", "A") == ["127.0.0.2"])
        assert query(port, "dcrouter.test", "SOA").answer[0][0].serial > serial
        assert os.path.exists(os.path.join(state, "dns", "serials.json"))
    finally:
        status = proc.stop()
    assert status == 0, proc.output()[-2000:]

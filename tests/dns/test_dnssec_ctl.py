"""``dcrouterctl dns ds ZONE`` (a real subprocess) against a router whose zone is signed."""

from __future__ import annotations

from typing import Any

import dns.dnssec
import dns.message
import dns.name
import dns.query
import dns.rdatatype
import pytest_twisted
from twisted.internet import task, threads

from tests.api.support import TOKEN, Client
from tests.api.test_ctl import ctl
from tests.support.router import options_from, start_router, stop_router
from tests.support.configs import default_config_with_free_ports


@pytest_twisted.async_yield_fixture
async def signed_router(tmp_path: Any) -> Any:
    """The default configuration with its zone signed; (router, API url, DNS port)."""
    state = str(tmp_path / "var")
    data, _ports = default_config_with_free_ports(state)
    data["api"]["token"] = TOKEN
    data["dns"]["zones"][0]["dnssec"] = True
    router = start_router(options_from(data, state))
    await router.by_name["dns"].ready
    api_port = router.by_name["api"].listeners.port_for("api.port")
    dns_port = next(p for proto, _h, p in router.by_name["dns"].bound_addresses()
                    if proto == "udp")
    try:
        yield router, f"http://127.0.0.1:{api_port}", dns_port, data["dns"]["zones"][0]["origin"]
    finally:
        await stop_router(router)


def served_dnskeys(port: int, origin: str) -> Any:
    query = dns.message.make_query(origin + ".", "DNSKEY")
    return dns.query.udp(query, "127.0.0.1", port=port, timeout=3).answer[0]


@pytest_twisted.ensureDeferred
async def test_dns_ds_prints_the_ds_of_the_served_ksk(signed_router: Any) -> None:
    router, url, port, origin = signed_router
    result = await ctl(url, "dns", "ds", origin)
    assert result.code == 0, result.err
    lines = [line for line in result.out.splitlines() if not line.startswith(";")]
    assert len(lines) == 1
    owner, klass, rtype, tag, alg, digest_type, digest = lines[0].split()
    assert (owner, klass, rtype, alg, digest_type) == (origin + ".", "IN", "DS", "13", "2")
    # it is the DS of the KSK the zone serves (what a validator checks against)
    keys = await threads.deferToThread(served_dnskeys, port, origin)
    ksk = next(k for k in keys if k.flags == 257)
    assert dns.dnssec.make_ds(origin + ".", ksk, "SHA256").to_text() == \
        f"{tag} {alg} {digest_type} {digest}".lower()
    result = await ctl(url, "--json", "dns", "ds", origin)
    data = result.json()
    assert data["ds"] == [lines[0]] and data["waiting_for_ds"] is None
    assert {k["role"] for k in data["keys"]} == {"ksk", "zsk"}
    result = await ctl(url, "dns", "ds", origin, "--keys")
    assert "KSK" in result.out and "active" in result.out


@pytest_twisted.ensureDeferred
async def test_dns_ds_submitted_lets_a_waiting_ksk_rollover_finish(signed_router: Any) -> None:
    router, url, _port, origin = signed_router
    service = router.by_name["dns"]
    clock = task.Clock()
    clock.advance(service.clock.seconds())
    service.clock = clock
    service.dnssec.request_roll(origin, "ksk")
    await service.publish()
    status = await service.dnssec_status(origin)
    new = max(k["tag"] for k in status["keys"] if k["role"] == "ksk" and k["state"] ==
              "published")
    # not yet active (Ipub): nothing waits, --submitted changes nothing
    result = await ctl(url, "dns", "ds", origin, "--submitted")
    assert result.code == 0 and "no KSK was waiting" in result.out
    # once active (Ipub later) the new KSK waits for its DS; the command says what to do
    clock.advance(2 * 3600 + 1)
    await service.publish()
    result = await ctl(url, "dns", "ds", origin)
    assert f"KSK {new} is waiting" in result.out and f" {new} 13 2 " in result.out
    result = await ctl(url, "dns", "ds", origin, "--submitted")
    assert result.code == 0 and f"the parent serves the DS of KSK {new}" in result.out
    status = await service.dnssec_status(origin)
    assert status["waiting_for_ds"] is None
    assert any(k["state"] == "retiring" for k in status["keys"])


@pytest_twisted.ensureDeferred
async def test_dns_ds_of_an_unsigned_or_unknown_zone_is_exit_1(signed_router: Any) -> None:
    _router, url, _port, _origin = signed_router
    result = await ctl(url, "dns", "ds", "nowhere.example")
    assert result.code == 1 and "not a signed zone served here" in result.err
    client = Client(int(url.rsplit(":", 1)[1]))
    response = await client.request("GET", "/api/dns/zones/nowhere.example./ds")
    assert response.status == 404


@pytest_twisted.ensureDeferred
async def test_ds_submitted_needs_the_api_token(signed_router: Any) -> None:
    # confirming a DS ends a KSK rollover (the old key goes): only the operator may
    router, url, _port, origin = signed_router
    client = Client(int(url.rsplit(":", 1)[1]))
    for token in (None, "wrong-token"):
        response = await client.request("POST", f"/api/dns/zones/{origin}./ds/submitted",
                                        token=token)
        assert response.status == 401
    response = await client.request("GET", f"/api/dns/zones/{origin}./ds", token=None)
    assert response.status == 401

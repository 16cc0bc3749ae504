"""MX, SPF, DKIM and DMARC of the mail domains, published and kept current."""

from __future__ import annotations

import copy
from typing import Any

import dkim
import dns.message
import dns.query
import dns.rcode
import pytest_twisted
from twisted.internet import defer, reactor, task, threads
from twisted.names import client

from dcrouter.config import parse_config
from dcrouter.dkimkeys import sign_message
from dcrouter.dns.email_records import literal_domain, mail_domains
from tests.dns.conftest import ask, start_dns
from tests.support.net import free_port, free_tcp_udp_port

MESSAGE = (b"From: alice@example.test\r\nTo: bob@other.test\r\nSubject: hello\r\n"
           b"Date: Wed, 25 Nov 2026 09:00:00 +0000\r\nMessage-ID: <1@example.test>\r\n\r\n"
           b"Hello Bob.\r\n")


def mail_config(**dns_keys: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "listen": "127.0.0.1", "port": free_tcp_udp_port(), "rate_limit": 0,
        "publish_email_records": True,
        "zones": [{"origin": "example.test", "records": [
            {"name": "www", "type": "A", "value": "192.0.2.10"}]},
            {"origin": "own.test", "records": [
                {"name": "@", "type": "MX", "value": "5 mx.provider.test."}]}],
    }
    section.update(dns_keys)
    return {
        "email": {
            "hostname": "mail.example.test", "listen": "127.0.0.1", "ports": [free_port()],
            "queue": {"storage_type": "memory"},
            "domain_rules": [
                {"pattern": "*@example.test", "mode": "mta", "mta_options": {"dkim_sign": True}},
                {"pattern": "*@other.test", "mode": "mta",
                 "mta_options": {"dkim_sign": True, "dkim_options": {"key_selector": "sel2"}}},
                {"pattern": "*@own.test", "mode": "mta"},
                {"pattern": "*@*.wild.test", "mode": "mta"},
                {"pattern": "*@relayed.test", "mode": "forward",
                 "target": {"server": "127.0.0.1", "port": 2525}},
            ],
        },
        "dns": section,
    }


@pytest_twisted.async_yield_fixture
async def mail_dns(tmp_path: Any) -> Any:
    data = mail_config()
    running = start_dns(data, str(tmp_path))
    await running.service.ready
    running.data = data
    running.state_dir = str(tmp_path)
    yield running
    await defer.maybeDeferred(running.service.stopService)


def txt(response: Any) -> list[str]:
    return [b"".join(r.strings).decode() for rr in response.answer for r in rr]


def test_mail_domains_are_literal_mta_domains_and_the_hostname_zone(tmp_path: Any) -> None:
    options = parse_config(dict(mail_config(), router={"state_dir": str(tmp_path)}))
    assert mail_domains(options) == ["example.test", "other.test", "own.test"]
    assert literal_domain("*@*.wild.test") is None
    assert literal_domain("user@Example.Test") == "example.test"


@pytest_twisted.ensureDeferred
async def test_mx_spf_dmarc_in_configured_and_created_zones(mail_dns: Any) -> None:
    port = mail_dns.udp_port
    for domain in ("example.test", "other.test"):
        mx = await ask(port, domain, "MX")
        assert [r.to_text() for rr in mx.answer for r in rr] == ["10 mail.example.test."]
        assert txt(await ask(port, domain, "TXT")) == ["v=spf1 mx -all"]
        assert txt(await ask(port, f"_dmarc.{domain}", "TXT")) == ["v=DMARC1; p=none"]
    created = await ask(port, "other.test", "SOA")  # a zone of its own
    assert created.rcode() == dns.rcode.NOERROR and created.answer
    host = await ask(port, "mail.example.test", "A")
    assert [r.address for rr in host.answer for r in rr] == ["127.0.0.1"]
    assert (await ask(port, "www.example.test", "A")).answer  # configured records stay
    relayed = await ask(port, "relayed.test", "MX")  # forward rules publish nothing
    assert relayed.rcode() == dns.rcode.REFUSED
    own = await ask(port, "own.test", "MX")  # the operator's MX wins
    assert [r.to_text() for rr in own.answer for r in rr] == ["5 mx.provider.test."]
    assert txt(await ask(port, "own.test", "TXT")) == ["v=spf1 mx -all"]


@pytest_twisted.ensureDeferred
async def test_dkim_record_verifies_a_signature_made_with_the_delivery_key(mail_dns: Any
                                                                           ) -> None:
    store = mail_dns.service.context.dkim_keys
    port = mail_dns.udp_port

    def sign_and_verify(domain: str, selector: str) -> tuple[bool, bool]:
        key = store.get(domain, selector, create=False)
        assert key is not None  # generated at start for the dkim_sign rule
        signed = sign_message(MESSAGE, key) + MESSAGE

        def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
            query = dns.message.make_query(name.decode(), "TXT", use_edns=0, payload=1232)
            response = dns.query.udp(query, "127.0.0.1", port=port, timeout=3)
            return b"".join(s for rr in response.answer for r in rr for s in r.strings)
        good = dkim.verify(signed, dnsfunc=dnsfunc)
        tampered = dkim.verify(signed.replace(b"Hello Bob", b"Hello Eve"), dnsfunc=dnsfunc)
        return good, tampered

    assert await threads.deferToThread(sign_and_verify, "example.test", "dcrouter") == (
        True, False)
    assert await threads.deferToThread(sign_and_verify, "other.test", "sel2") == (True, False)
    record = await ask(port, "sel2._domainkey.other.test", "TXT", use_edns=0, payload=1232)
    strings = record.answer[0][0].strings
    assert len(strings) >= 2 and all(len(s) <= 255 for s in strings)


@pytest_twisted.ensureDeferred
async def test_new_keys_and_rule_changes_are_published(mail_dns: Any) -> None:
    service = mail_dns.service
    port = mail_dns.udp_port
    serial = service.zone("example.test").serial
    refreshes = service.refreshes
    # an operator creates a key for a new selector: the listener republishes
    await threads.deferToThread(service.context.dkim_keys.get, "example.test", "rotated",
                                create=True)
    for _ in range(100):
        if service.refreshes > refreshes and service.zone("example.test").serial > serial:
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    rotated = await ask(port, "rotated._domainkey.example.test", "TXT", use_edns=0,
                        payload=1232)
    assert txt(rotated)[0].startswith("v=DKIM1; k=rsa; p=")
    assert service.zone("example.test").serial > serial

    # a rule change (as update_domain_rules / SIGHUP apply it) adds a domain
    data = copy.deepcopy(mail_dns.data)
    data["router"] = {"state_dir": mail_dns.state_dir}
    data["email"]["domain_rules"].append({"pattern": "*@third.test", "mode": "mta"})
    data["dns"]["dmarc_policy"] = "reject"
    data["dns"]["spf_mechanisms"] = ["mx", "ip4:192.0.2.0/24"]
    before = service.zone("example.test").serial
    await defer.maybeDeferred(service.reconfigure, parse_config(data))
    mx = await ask(port, "third.test", "MX")
    assert [r.to_text() for rr in mx.answer for r in rr] == ["10 mail.example.test."]
    assert txt(await ask(port, "_dmarc.example.test", "TXT")) == ["v=DMARC1; p=reject"]
    assert txt(await ask(port, "example.test", "TXT")) == ["v=spf1 mx ip4:192.0.2.0/24 -all"]
    assert service.zone("example.test").serial > before


@pytest_twisted.ensureDeferred
async def test_delivery_resolver_finds_the_published_mx(mail_dns: Any) -> None:
    """What email.delivery.nameservers = ["127.0.0.1:<dns port>"] gives the delivery system."""
    resolver = client.createResolver(servers=[("127.0.0.1", mail_dns.udp_port)])
    answers, _auth, _add = await resolver.lookupMailExchange("other.test")
    assert [(a.payload.preference, a.payload.name.name) for a in answers] == [
        (10, b"mail.example.test")]
    assert await resolver.getHostByName("mail.example.test") == "127.0.0.1"


@pytest_twisted.ensureDeferred
async def test_nothing_published_when_off(tmp_path: Any) -> None:
    running = start_dns(mail_config(publish_email_records=False), str(tmp_path))
    try:
        await running.service.ready
        assert (await ask(running.udp_port, "other.test", "MX")).rcode() == dns.rcode.REFUSED
        nodata = await ask(running.udp_port, "example.test", "MX")
        assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    finally:
        await running.service.stopService()


@pytest_twisted.ensureDeferred
async def test_the_whole_router_publishes_records_for_its_rules(tmp_path: Any) -> None:
    """The default configuration's shape: a router with email and dns sections."""
    from tests.support.router import options_from, port_of, start_router, stop_router

    data = mail_config()
    router = start_router(options_from(data, str(tmp_path)))
    try:
        dns_service = router.by_name["dns"]
        await dns_service.ready
        port = port_of(router, "dns", protocol="udp")
        mx = await ask(port, "example.test", "MX")
        assert [r.to_text() for rr in mx.answer for r in rr] == ["10 mail.example.test."]
    finally:
        await stop_router(router)

"""DKIM signing policy end to end: a real DcRouter (SMTP + queue + delivery + DNS), smtplib
clients from inside and outside ``relay_networks``, an aiosmtpd sink, and dkimpy verifying
against the TXT record dcrouter's own DNS server publishes.

* an outsider who forges ``MAIL FROM:<ceo@served.test>`` and ``From: ceo@served.test`` gets
  no signature;
* a relay client (127.0.0.2 in ``relay_networks``) and an AUTH user with an aligned
  ``From:`` get a signature that verifies;
* a ``From:`` that is not a signing domain, a display-name trick, or no ``From:`` at all:
  delivered unsigned, never refused, never retried;
* many new sender domains create no key files (keys come from configuration only).
"""

from __future__ import annotations

import os
import smtplib
import ssl
from typing import Any

import dkim
import dns.message
import dns.query
import pytest
import pytest_twisted
from twisted.internet import defer, threads

from dcrouter.config import parse_config
from tests.delivery.harness import wait_for
from tests.delivery.peers import Sink
from tests.email.conftest import PASSWORD
from tests.support.net import free_port, free_tcp_udp_port
from tests.support.router import start_router, stop_router

INSIDE = "127.0.0.2"      # the only relay network
OUTSIDE = "127.0.0.1"


def message(sender: str, subject: str, to: str = "bob@served.test") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: Wed, 25 Nov 2026 09:00:00 +0000\r\nMessage-ID: <{subject}@client.test>\r\n"
            f"\r\nHello Bob.\r\n").encode()


class Gateway:
    """The running router and its sink, ports and state directory."""

    def __init__(self, router: Any, sink: Sink, ports: dict[str, int], state: str,
                 ca: str, mail_root: str) -> None:
        self.router = router
        self.sink = sink
        self.ports = ports
        self.state = state
        self.ca = ca
        self.mail_root = mail_root

    @property
    def processor(self) -> Any:
        return self.router.by_name["email"].processor

    def key_files(self) -> list[str]:
        root = os.path.join(self.state, "dkim")
        return sorted(os.path.relpath(os.path.join(d, f), root)
                      for d, _subdirs, files in os.walk(root) for f in files)

    def send(self, mail_from: str, rcpts: list[str], data: bytes, source: str = OUTSIDE,
             login: bool = False) -> defer.Deferred:
        port = self.ports["submission" if login else "smtp"]

        def run() -> dict[str, Any]:
            with smtplib.SMTP("127.0.0.1", port, timeout=20, source_address=(source, 0)) as s:
                s.ehlo("client.test")
                if login:
                    s.starttls(context=ssl.create_default_context(cafile=self.ca))
                    s.ehlo("client.test")
                    s.login("alice", PASSWORD)
                return s.sendmail(mail_from, rcpts, data)
        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def received(self, subject: str) -> Any:
        """The sink's copy of the message with ``subject`` (waits for delivery)."""
        tag = f"Subject: {subject}\r\n".encode()
        found = yield wait_for(lambda: [m for m in self.sink.messages if tag in m.content],
                               timeout=20)
        return found[0].content

    def dnsfunc(self, name: bytes, timeout: int = 5) -> bytes:
        """dkimpy's DNS look-up, asked of dcrouter's DNS server over UDP."""
        query = dns.message.make_query(name.decode(), "TXT", use_edns=0, payload=1232)
        response = dns.query.udp(query, "127.0.0.1", port=self.ports["dns"], timeout=3)
        return b"".join(s for rr in response.answer for r in rr for s in r.strings)

    def verify(self, content: bytes) -> defer.Deferred:
        return threads.deferToThread(dkim.verify, content, dnsfunc=self.dnsfunc)


@pytest_twisted.async_yield_fixture
async def gateway(tmp_path: Any, certs: dict[str, str]) -> Any:
    sink = Sink().start()
    ports = {"smtp": free_port(), "submission": free_port(), "dns": free_tcp_udp_port()}
    state = str(tmp_path / "var")
    mail_root = str(tmp_path / "mail")
    options = parse_config({
        "router": {"state_dir": state},
        "email": {
            "hostname": "mail.served.test", "listen": "127.0.0.1",
            "ports": [ports["smtp"], ports["submission"]],
            "submission_ports": [ports["submission"]], "implicit_tls_ports": [],
            "tls": {"cert_path": certs["server.pem"], "key_path": certs["server.key"]},
            "auth": {"users": [{"username": "alice", "password": PASSWORD}]},
            "relay_networks": [f"{INSIDE}/32"],
            "default_mode": "forward", "default_server": "127.0.0.1",
            "default_port": sink.port,
            "dkim": {"domains": ["served.test"], "selector": "s1"},
            "domain_rules": [
                {"pattern": "*@served.test", "mode": "forward",
                 "target": {"server": "127.0.0.1", "port": sink.port}},
                {"pattern": "*@brand-rcpt.test", "mode": "mta", "mta_options": {
                    "allow_local_delivery": True, "local_delivery_path": mail_root,
                    "dkim_sign": True,
                    "dkim_options": {"domain_name": "brand.test", "key_selector": "b1"}}},
            ],
            "queue": {"storage_type": "memory", "check_interval": 0.1,
                      "base_retry_delay": 0.2, "max_retry_delay": 0.5},
        },
        "dns": {"listen": "127.0.0.1", "port": ports["dns"], "rate_limit": 0,
                "publish_email_records": True,
                "zones": [{"origin": "served.test", "records": [
                    {"name": "mail", "type": "A", "value": "127.0.0.1"}]}]},
    })
    router = start_router(options)
    try:
        await router.by_name["email"].processor.signing.wait_ready()
        await router.by_name["dns"].ready
        yield Gateway(router, sink, ports, state, certs["ca.pem"], mail_root)
    finally:
        await stop_router(router)
        sink.stop()


CONFIGURED_KEYS = ["brand.test/b1.key", "served.test/s1.key"]


@pytest_twisted.ensureDeferred
async def test_outsider_forging_a_served_sender_gets_no_signature(gateway: Gateway) -> None:
    assert gateway.key_files() == CONFIGURED_KEYS      # made at start, from configuration
    refused = await gateway.send("ceo@served.test", ["bob@served.test"],
                                 message("CEO <ceo@served.test>", "forged"), source=OUTSIDE)
    assert refused == {}
    content = await gateway.received("forged")
    assert b"DKIM-Signature" not in content
    # outsiders sending as other domains make no keys either
    for n in range(5):
        await gateway.send(f"ceo@outsider{n}.test", ["bob@served.test"],
                           message(f"ceo@outsider{n}.test", f"out{n}"), source=OUTSIDE)
    for n in range(5):
        assert b"DKIM-Signature" not in await gateway.received(f"out{n}")
    assert gateway.key_files() == CONFIGURED_KEYS
    decisions = gateway.processor.get_stats()["dkim"]["decisions"]
    assert decisions == {"not_relay_client": 6}


@pytest_twisted.ensureDeferred
async def test_relay_client_and_auth_user_get_a_signature_the_published_record_verifies(
        gateway: Gateway) -> None:
    await gateway.send("alice@served.test", ["x@far.test"],
                       message("Alice <alice@served.test>", "inside"), source=INSIDE)
    await gateway.send("whatever@bounces.test", ["y@far.test"],
                       message("alice@Served.Test", "authed"), source=OUTSIDE, login=True)
    for subject in ("inside", "authed"):
        content = await gateway.received(subject)
        assert content.startswith(b"DKIM-Signature: ")
        signature = content.split(b"\r\n\r\n", 1)[0]
        assert b"d=served.test" in signature and b"s=s1" in signature
        assert await gateway.verify(content)
        assert not await gateway.verify(content.replace(b"Hello Bob", b"Hello Eve"))
    assert gateway.processor.get_stats()["dkim"]["decisions"] == {"signed": 2}
    assert gateway.router.by_name["email"].delivery.counters["dkim_signed"] == 2


@pytest_twisted.ensureDeferred
async def test_unaligned_or_missing_from_is_delivered_unsigned_and_makes_no_key(
        gateway: Gateway) -> None:
    cases = {
        "unaligned": message("alice@other.test", "unaligned"),
        "subdomain": message("alice@news.served.test", "subdomain"),   # sign_subdomains off
        "display": message('"ceo@served.test" <x@evil.test>', "display"),
        "twofrom": (b"From: a@served.test\r\nFrom: b@served.test\r\nSubject: twofrom\r\n\r\n"
                    b"x\r\n"),
        "nofrom": b"Subject: nofrom\r\nMessage-ID: <nofrom@client.test>\r\n\r\nno author\r\n",
    }
    for data in cases.values():
        assert await gateway.send("alice@served.test", ["x@far.test"], data,
                                  source=INSIDE) == {}
    for subject in cases:
        assert b"DKIM-Signature" not in await gateway.received(subject)
    # N new sender domains from a relay client: still only the configured keys
    for n in range(20):
        await gateway.send(f"a@new{n}.test", ["x@far.test"],
                           message(f"a@new{n}.test", f"new{n}"), source=INSIDE)
    await gateway.received("new19")
    assert gateway.key_files() == CONFIGURED_KEYS
    decisions = gateway.processor.get_stats()["dkim"]["decisions"]
    assert decisions == {"not_aligned": 23, "no_from": 2}
    # every one delivered at the first attempt: nothing deferred, nothing bounced
    counters = gateway.router.by_name["email"].delivery.counters
    assert counters["delivered"] == 25 and counters["deferred"] == 0 and \
        counters["failed"] == 0


@pytest_twisted.ensureDeferred
async def test_rule_signing_domain_signs_its_own_mail_in_local_delivery(
        gateway: Gateway) -> None:
    await gateway.send("x@brand.test", ["box@brand-rcpt.test"],
                       message("x@brand.test", "brand", to="box@brand-rcpt.test"),
                       source=INSIDE)
    # the same From: from outside is not signed
    await gateway.send("x@brand.test", ["box@brand-rcpt.test"],
                       message("x@brand.test", "brand-out", to="box@brand-rcpt.test"))
    new = os.path.join(gateway.mail_root, "box", "new")
    files = await wait_for(lambda: os.path.isdir(new) and len(os.listdir(new)) == 2 and
                           sorted(os.listdir(new)), timeout=20)
    contents = {}
    for name in files:
        with open(os.path.join(new, name), "rb") as f:
            data = f.read()
        contents[b"brand-out" in data] = data
    key = gateway.router.context.dkim_keys.get("brand.test", "b1")
    record = key.public_record().encode()
    stored = contents[False]
    # final delivery puts its trace headers on top; the signature comes right after them
    trace, _, signed = stored.partition(b"Delivered-To: box@brand-rcpt.test\r\n")
    assert trace.startswith(b"Return-Path: <x@brand.test>\r\n")
    assert signed.startswith(b"DKIM-Signature: ") and b"d=brand.test" in signed.split(
        b"\r\n\r\n", 1)[0]
    assert await threads.deferToThread(dkim.verify, signed,
                                       dnsfunc=lambda name, timeout=5: record)
    assert b"DKIM-Signature" not in contents[True]


def test_conflicting_keys_for_one_identity_are_a_config_error(tmp_path: Any) -> None:
    from dcrouter.dkimpolicy import SigningPolicy
    from dcrouter.errors import ConfigError
    options = parse_config({"router": {"state_dir": str(tmp_path)}, "email": {
        "dkim": {"domains": ["a.test"]},
        "domain_rules": [{"pattern": "*@a.test", "mode": "mta", "mta_options": {
            "dkim_sign": True, "dkim_options": {"private_key_path": "/etc/other.key"}}}]}})
    assert options.email is not None
    with pytest.raises(ConfigError) as info:
        SigningPolicy(options.email)
    assert info.value.path == "email.domain_rules[0].mta_options"

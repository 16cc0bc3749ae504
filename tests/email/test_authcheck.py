"""Inbound SPF/DKIM/DMARC against a twisted.names test DNS server on loopback."""

from __future__ import annotations

import email
import email.policy
import os
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.names import authority, dns, server

from dcrouter.dkimkeys import DkimKeyStore, sign_message
from dcrouter.email.authcheck import InboundAuthChecker, aligned, organisational_domain
from dcrouter.errors import PolicyRejection
from dcrouter.psl import PublicSuffixList
from tests.email.support import make_processor, session, simple_message, transaction
from tests.support.net import free_tcp_udp_port


class MemoryAuthority(authority.FileAuthority):
    """An authority for zone ``test`` from a dict name -> records."""

    def loadFile(self, records: Any) -> None:  # type: ignore[override]
        self.soa = (b"test", dns.Record_SOA(mname=b"ns.test", rname=b"root.test", serial=1,
                                            refresh=60, retry=60, expire=60, minimum=60))
        self.records = {b"test": [self.soa[1]]}
        for name, recs in records.items():
            self.records[name.encode().lower()] = list(recs)


def txt(text: str) -> dns.Record_TXT:
    data = text.encode()
    return dns.Record_TXT(*[data[i:i + 255] for i in range(0, len(data), 255)], ttl=60)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> DkimKeyStore:
    store = DkimKeyStore(str(tmp_path_factory.mktemp("dkim")))
    for domain in ("sender.test", "thirdparty.test", "bob.hosting.test"):
        store.get(domain, "s1", create=True)   # looking a key up never creates it
    return store


@pytest.fixture(scope="module")
def nameserver(keys: DkimKeyStore) -> Iterator[str]:
    key = keys.get("sender.test", "s1")
    other = keys.get("thirdparty.test", "s1")
    zone = {
        "sender.test": [txt("v=spf1 ip4:192.0.2.10 -all")],
        "s1._domainkey.sender.test": [txt(key.public_record())],
        "_dmarc.sender.test": [txt("v=DMARC1; p=reject; adkim=r; aspf=r")],
        "s1._domainkey.thirdparty.test": [txt(other.public_record())],
        "strict.test": [txt("v=spf1 ip4:192.0.2.10 -all")],
        "_dmarc.strict.test": [txt("v=DMARC1; p=quarantine; aspf=s")],
        "bounce.strict.test": [txt("v=spf1 ip4:192.0.2.10 -all")],
        "nodmarc.test": [txt("v=spf1 ?all")],
        # two customers under a hosting suffix (like github.io): different organisations
        "_dmarc.alice.hosting.test": [txt("v=DMARC1; p=reject")],
        "s1._domainkey.bob.hosting.test": [txt(keys.get("bob.hosting.test", "s1")
                                               .public_record())],
    }
    factory = server.DNSServerFactory(authorities=[MemoryAuthority(zone)])
    factory.noisy = False
    port = free_tcp_udp_port()
    udp = reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    tcp = reactor.listenTCP(port, factory, interface="127.0.0.1")
    yield f"127.0.0.1:{port}"
    udp.stopListening()
    tcp.stopListening()


def signed(keys: DkimKeyStore, domain: str, data: bytes) -> bytes:
    return sign_message(data, keys.get(domain, "s1")) + data


def write(tmp_path: Any, data: bytes) -> str:
    path = os.path.join(str(tmp_path), "m.eml")
    with open(path, "wb") as f:
        f.write(data)
    return path


def checker(ns: str) -> InboundAuthChecker:
    return InboundAuthChecker("mx.dcrouter.test", (ns,), timeout=5)


def test_organisational_domain_and_alignment() -> None:
    assert organisational_domain("a.b.example.com") == "example.com"
    assert organisational_domain("mail.example.co.uk") == "example.co.uk"
    assert aligned("bounce.example.com", "example.com", "r")
    assert not aligned("bounce.example.com", "example.com", "s")
    assert not aligned("example.net", "example.com", "r")


@pytest_twisted.inlineCallbacks
def test_all_pass(nameserver: str, keys: DkimKeyStore, tmp_path: Any) -> None:
    data = signed(keys, "sender.test", simple_message(sender="alice@sender.test"))
    r = yield checker(nameserver).check(write(tmp_path, data), "192.0.2.10", "mx.sender.test",
                                        "alice@sender.test")
    assert (r.spf, [s.result for s in r.dkim], r.dmarc, r.dmarc_policy) == (
        "pass", ["pass"], "pass", "reject")
    assert r.header() == (
        b"Authentication-Results: mx.dcrouter.test;\r\n\tspf=pass smtp.mailfrom=alice@sender.test"
        b";\r\n\tdkim=pass header.d=sender.test header.s=s1;\r\n\t"
        b"dmarc=pass (p=reject) header.from=sender.test\r\n")


@pytest_twisted.inlineCallbacks
def test_spf_fail_unsigned_dmarc_fail(nameserver: str, tmp_path: Any) -> None:
    data = simple_message(sender="alice@sender.test")
    r = yield checker(nameserver).check(write(tmp_path, data), "203.0.113.5", "evil.test",
                                        "alice@sender.test")
    assert (r.spf, r.dkim, r.dmarc) == ("fail", [], "fail") and r.dmarc_rejects
    assert b"dkim=none" in r.header()


@pytest_twisted.inlineCallbacks
def test_aligned_dkim_rescues_forwarded_mail(nameserver: str, keys: DkimKeyStore,
                                             tmp_path: Any) -> None:
    data = signed(keys, "sender.test", simple_message(sender="alice@sender.test"))
    r = yield checker(nameserver).check(write(tmp_path, data), "203.0.113.5", "list.test",
                                        "bounces@list.test")
    assert r.spf == "none" and r.dkim[0].result == "pass" and r.dmarc == "pass"


@pytest_twisted.inlineCallbacks
def test_unaligned_signature_and_tampering(nameserver: str, keys: DkimKeyStore,
                                           tmp_path: Any) -> None:
    data = signed(keys, "thirdparty.test", simple_message(sender="alice@sender.test"))
    r = yield checker(nameserver).check(write(tmp_path, data), "203.0.113.5", "x.test",
                                        "alice@sender.test")
    assert r.dkim[0].result == "pass" and r.dkim[0].domain == "thirdparty.test"
    assert r.dmarc == "fail"
    tampered = signed(keys, "sender.test", simple_message(sender="alice@sender.test"))
    tampered = tampered.replace(b"friendly", b"hostile")
    r = yield checker(nameserver).check(write(tmp_path, tampered), "203.0.113.5", "x.test",
                                        "alice@sender.test")
    assert r.dkim[0].result == "fail" and r.dmarc == "fail"


@pytest_twisted.inlineCallbacks
def test_strict_spf_alignment_and_no_record(nameserver: str, tmp_path: Any) -> None:
    data = simple_message(sender="a@strict.test")
    r = yield checker(nameserver).check(write(tmp_path, data), "192.0.2.10", "x",
                                        "b@bounce.strict.test")
    assert r.spf == "pass" and r.dmarc == "fail" and r.dmarc_policy == "quarantine"
    r = yield checker(nameserver).check(write(tmp_path, simple_message(sender="a@nodmarc.test")),
                                        "192.0.2.10", "x", "a@nodmarc.test")
    assert (r.spf, r.dmarc) == ("neutral", "none") and not r.dmarc_rejects


@pytest_twisted.inlineCallbacks
def test_processor_header_and_dmarc_reject(nameserver: str, keys: DkimKeyStore,
                                           tmp_path: Any) -> None:
    tmp = str(tmp_path)
    processor, queue = make_processor(tmp, {
        "hostname": "mx.dcrouter.test", "inbound_auth": {"enabled": True, "timeout": 5},
        "delivery": {"nameservers": [nameserver]},
        "domain_rules": [{"pattern": "*@strict-in.test", "mode": "mta",
                          "reject_on_dmarc_fail": True},
                         {"pattern": "*@lax-in.test", "mode": "mta"}]})
    # (headers claiming to be ours never reach the processor: the SMTP server's spool
    # drops them, see test_results_claiming_our_id_removed_over_smtp)
    other = b"Authentication-Results: other.example; spf=pass\r\n"
    good = signed(keys, "sender.test", other + simple_message(sender="alice@sender.test"))
    yield transaction(processor, tmp, good, "alice@sender.test", ["x@strict-in.test"],
                      session("192.0.2.10", helo="mx.sender.test"))
    body = queue.body(queue.requests[-1])
    assert body.startswith(b"Authentication-Results: mx.dcrouter.test;\r\n\tspf=pass")
    assert b"dmarc=pass" in body
    assert b"Authentication-Results: other.example; spf=pass\r\n" in body
    assert body.endswith(b"Just a friendly note.\r\n")
    forged = simple_message(sender="alice@sender.test")
    with pytest.raises(PolicyRejection) as info:
        yield transaction(processor, tmp, forged, "alice@sender.test", ["x@strict-in.test"],
                          session("203.0.113.5", relay=False))
    assert (info.value.code, info.value.enhanced, info.value.reason) == (550, "5.7.1", "dmarc")
    # a rule without reject_on_dmarc_fail takes it, with the verdict in the header
    yield transaction(processor, tmp, forged, "alice@sender.test", ["x@lax-in.test"],
                      session("203.0.113.5", relay=False))
    assert b"dmarc=fail (p=reject)" in queue.body(queue.requests[-1])


@pytest_twisted.inlineCallbacks
def test_relaxed_alignment_follows_the_public_suffix_list(nameserver: str, keys: DkimKeyStore,
                                                         tmp_path: Any) -> None:
    """bob.hosting.test's signature does not vouch for alice.hosting.test when the
    list says hosting.test is a public suffix (the github.io case)."""
    list_file = tmp_path / "psl.dat"
    list_file.write_text("// ===BEGIN PRIVATE DOMAINS===\nhosting.test\n", encoding="utf-8")
    psl = PublicSuffixList.load(str(list_file))
    data = signed(keys, "bob.hosting.test", simple_message(sender="alice@alice.hosting.test"))
    path = write(tmp_path, data)
    strict = InboundAuthChecker("mx.dcrouter.test", (nameserver,), timeout=5, psl=psl)
    r = yield strict.check(path, "203.0.113.5", "x.test", "alice@alice.hosting.test")
    assert r.dkim[0].result == "pass" and r.dkim[0].domain == "bob.hosting.test"
    assert (r.dmarc, r.dmarc_policy) == ("fail", "reject") and r.dmarc_rejects
    # without that rule, both are one organisation (hosting.test) and the signature aligns
    naive = InboundAuthChecker("mx.dcrouter.test", (nameserver,), timeout=5,
                               psl=PublicSuffixList([]))
    r = yield naive.check(path, "203.0.113.5", "x.test", "alice@alice.hosting.test")
    assert r.dmarc == "pass"


def test_processor_uses_the_configured_list(tmp_path: Any) -> None:
    list_file = tmp_path / "custom.dat"
    list_file.write_text("hosting.test\n", encoding="utf-8")
    processor, _ = make_processor(str(tmp_path), {"inbound_auth": {
        "enabled": True, "public_suffix_list": str(list_file)}})
    assert processor.auth_checker is not None
    assert processor.auth_checker.psl.source == str(list_file)
    assert processor.auth_checker.psl.organisational_domain("a.b.hosting.test") == "b.hosting.test"
    missing, _ = make_processor(str(tmp_path), {"inbound_auth": {
        "enabled": True, "public_suffix_list": str(tmp_path / "absent.dat")}})
    assert missing.auth_checker.psl.source == "built-in"
    assert missing.auth_checker.psl.organisational_domain("x.example.co.uk") == "example.co.uk"


# -- through a whole router: spoofed results removed, client values quoted ------------------------

from twisted.internet.threads import deferToThread  # noqa: E402

from tests.email.gateway import gateway, settle, wait_for  # noqa: E402,F401 - the fixture
from tests.email.test_bdat import Client  # noqa: E402

#: Every spelling of a result claiming to come from us (mx.gw.test), RFC 8601 5.
SPOOFS = [b"Authentication-Results: mx.gw.test 1; dkim=pass header.d=paypal.com\r\n",
          b"Authentication-Results: mx.gw.test (verified); spf=pass\r\n",
          b"Authentication-Results: (c) mx.gw.test; dmarc=pass\r\n",
          b"authentication-results: MX.GW.TEST; dkim=pass\r\n",
          b"AUTHENTICATION-RESULTS:\r\n\tmx.gw.test;\r\n\tdkim=pass header.d=bank.test\r\n",
          b"Authentication-Results : \"mx.gw.test\"; spf=pass\r\n",
          b"Authentication-Results: (a (nested) comment)\r\n (more) mx.gw.test.; x=pass\r\n",
          b"Authentication-Results: mx.gw.test\r\n"]
KEPT = b"Authentication-Results: other.example; spf=pass\r\n"
SPOOFED = (b"From: a@nodmarc.test\r\n" + b"".join(SPOOFS[:4]) + KEPT + b"".join(SPOOFS[4:])
           + b"Subject: hi\r\n\r\nAuthentication-Results: mx.gw.test; in the body, kept\r\n")


def _send(port: int, helo: str, mail: str, body: bytes) -> str:
    c = Client(port)
    c.reply()
    c.cmd(f"EHLO {helo}")
    assert c.cmd(f"MAIL FROM:{mail}").startswith("250")
    assert c.cmd("RCPT TO:<b@fwd.test>").startswith("250")
    c.cmd("DATA")
    c.send(body + b".\r\n")
    reply = c.reply()
    c.cmd("QUIT")
    c.close()
    return reply


@pytest.mark.parametrize("enabled", [False, True])
@pytest_twisted.inlineCallbacks
def test_results_claiming_our_id_removed_over_smtp(gateway: Any, nameserver: str,
                                                   enabled: bool) -> None:
    gw = gateway(inbound_auth={"enabled": enabled, "timeout": 5},
                 delivery={"nameservers": [nameserver]})
    reply = yield deferToThread(_send, gw.port, "client.test", "<a@nodmarc.test>", SPOOFED)
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    yield wait_for(lambda: gw.sink.messages)
    content = gw.sink.messages[0].content
    head, _, body = content.partition(b"\r\n\r\n")
    parsed = email.message_from_bytes(content, policy=email.policy.compat32)
    results = [str(v) for v in parsed.get_all("Authentication-Results", [])]
    if enabled:
        assert len(results) == 2 and results[0].startswith("mx.gw.test;\r\n\tspf=")
        assert content.startswith(b"Authentication-Results: mx.gw.test;\r\n\tspf=")
    else:
        assert len(results) == 1
    assert results[-1] == "other.example; spf=pass"
    assert b"paypal" not in head and b"bank.test" not in head and b"x=pass" not in head
    assert KEPT in content
    assert body == b"Authentication-Results: mx.gw.test; in the body, kept\r\n"


@pytest_twisted.inlineCallbacks
def test_client_values_in_our_results_are_quoted(gateway: Any, nameserver: str) -> None:
    gw = gateway(inbound_auth={"enabled": True, "timeout": 5},
                 delivery={"nameservers": [nameserver]})
    body = b"From: a@nodmarc.test\r\nSubject: hi\r\n\r\nhello\r\n"

    def client() -> list[str]:
        return [_send(gw.port, "client.test", '<"x;dkim=pass header.d=paypal.com"@nodmarc.test>',
                      body),
                _send(gw.port, "x;dkim=pass", "<>", body)]

    replies = yield deferToThread(client)
    assert all(r.startswith("250") for r in replies)
    yield wait_for(lambda: len(gw.sink.messages) == 2)
    results = {}
    for m in gw.sink.messages:
        head = m.content.split(b"\r\nReceived: ", 1)[0]
        results[m.mail_from] = head
    quoted = results['"x;dkim=pass header.d=paypal.com"@nodmarc.test']
    assert b"smtp.mailfrom=nodmarc.test;" in quoted and b"paypal" not in quoted
    null = results[""] if "" in results else results["<>"]
    assert b'smtp.mailfrom="postmaster@x;dkim=pass";' in null
    assert null.count(b"\r\n\tdkim=") == 1 and b"\r\n\tdkim=none;" in null

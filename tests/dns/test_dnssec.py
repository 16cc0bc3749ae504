"""Signed zones: key files, signature refresh, and what an outsider cannot make the signer do.

Real DNS clients (dnspython over UDP) against the DNS service; the service's
clock is a task.Clock where time matters.
"""

from __future__ import annotations

import json
import os
import stat
import time
from typing import Any

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest_twisted
from twisted.internet import defer, task, threads

from dcrouter.config import parse_config
from dcrouter.errors import ConfigError
from tests.dns.conftest import ZONE, ask, start_dns
from tests.support.net import free_tcp_udp_port

SIGNED = dict(ZONE, dnssec=True)


def config(**dnssec: Any) -> dict[str, Any]:
    """example.test signed."""
    return {"dns": {"listen": "127.0.0.1", "port": free_tcp_udp_port(), "rate_limit": 0,
                    "zones": [SIGNED], "dnssec": dnssec}}


def expirations(reply: dns.message.Message) -> list[int]:
    """The expiration times of the answer's signatures."""
    return [sig.expiration for rrset in reply.answer if rrset.rdtype == dns.rdatatype.RRSIG
            for sig in rrset]


@pytest_twisted.ensureDeferred
async def test_key_files_are_private_and_in_bind_format(tmp_path: Any) -> None:
    running = start_dns(config(), str(tmp_path))
    await running.service.ready
    try:
        folder = os.path.join(str(tmp_path), "dnssec", "example.test")
        for path in (os.path.join(str(tmp_path), "dnssec"), folder):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
        files = sorted(os.listdir(folder))
        privates = [f for f in files if f.endswith(".private")]
        assert len(privates) == 2 and all(f.startswith("Kexample.test.+013+") for f in privates)
        for name in files:
            assert stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode) == 0o600, name
        with open(os.path.join(folder, privates[0])) as f:
            text = f.read()
        assert text.startswith("Private-key-format: v1.3\nAlgorithm: 13 (ECDSAP256SHA256)\n")
        with open(os.path.join(folder, "keys.json")) as f:
            timeline = json.load(f)
        assert {k["role"] for k in timeline["keys"]} == {"ksk", "zsk"}
    finally:
        await defer.maybeDeferred(running.service.stopService)


@pytest_twisted.ensureDeferred
async def test_ed25519_keys_sign_and_answers_without_do_carry_no_dnssec_records(
        tmp_path: Any) -> None:
    running = start_dns(config(algorithm="ED25519"), str(tmp_path))
    await running.service.ready
    try:
        reply = await ask(running.udp_port, "www.example.test", "A", use_edns=0,
                          want_dnssec=True)
        sigs = [s for r in reply.answer if r.rdtype == dns.rdatatype.RRSIG for s in r]
        assert sigs and sigs[0].algorithm == 15
        for rdtype in ("A", "MX", "TXT"):
            for name in ("www.example.test", "nope.example.test", "x.wild.example.test"):
                plain = await ask(running.udp_port, name, rdtype, use_edns=0)
                kinds = {r.rdtype for s in (plain.answer, plain.authority, plain.additional)
                         for r in s}
                assert not kinds & {dns.rdatatype.RRSIG, dns.rdatatype.NSEC}, (name, rdtype)
                assert not plain.ednsflags & dns.flags.DO
    finally:
        await defer.maybeDeferred(running.service.stopService)


@pytest_twisted.ensureDeferred
async def test_random_names_cost_no_signature(tmp_path: Any) -> None:
    # a flood of names that do not exist, with DO: answered from the precomputed NSEC
    # chain, the signer does no work (online "lies" would sign each of them)
    running = start_dns(config(), str(tmp_path))
    await running.service.ready
    try:
        stats = running.service.get_stats()
        before = stats["dnssec_signatures_made"]
        assert before > 0

        def flood() -> set[int]:
            rcodes = set()
            for i in range(300):
                query = dns.message.make_query(f"r{i}x{time.time_ns()}.example.test", "A",
                                               want_dnssec=True)
                rcodes.add(dns.query.udp(query, "127.0.0.1", port=running.udp_port,
                                         timeout=3).rcode())
            return rcodes
        assert await threads.deferToThread(flood) == {dns.rcode.NXDOMAIN}
        assert running.service.get_stats()["dnssec_signatures_made"] == before
    finally:
        await defer.maybeDeferred(running.service.stopService)


@pytest_twisted.ensureDeferred
async def test_signatures_are_refreshed_before_they_expire(tmp_path: Any) -> None:
    running = start_dns(config(), str(tmp_path))
    service = running.service
    await service.ready
    clock = task.Clock()
    clock.advance(time.time())
    service.clock = clock
    try:
        await service.publish()
        first = await ask(running.udp_port, "www.example.test", "A", want_dnssec=True)
        serial = service.zone("example.test").serial
        old = expirations(first)
        assert old and min(old) - clock.seconds() > 13 * 86400 - 12 * 3600 - 3600
        # the service wakes up when the first signature reaches its refresh point
        wake = service._timer.getTime()
        assert wake <= min(old) - 7 * 86400 + 1
        clock.advance(8 * 86400)
        await service.publish()
        second = await ask(running.udp_port, "www.example.test", "A", want_dnssec=True)
        new = expirations(second)
        assert min(new) - clock.seconds() > 7 * 86400
        assert service.zone("example.test").serial > serial  # secondaries get the new ones
        assert service.get_stats()["dnssec_signatures_reused"] > 0
    finally:
        await defer.maybeDeferred(service.stopService)


@pytest_twisted.ensureDeferred
async def test_an_unreadable_key_keeps_the_last_signed_zone_served(tmp_path: Any) -> None:
    running = start_dns(config(), str(tmp_path))
    service = running.service
    await service.ready
    try:
        signed_serial = service.zone("example.test").serial
        path = os.path.join(str(tmp_path), "dnssec", "example.test", "keys.json")
        with open(path, "w") as f:
            f.write("{not json")
        service.dnssec.store._private.clear()
        await service.update_zones([dict(SIGNED, records=list(SIGNED["records"]) + [
            {"name": "new", "type": "A", "value": "192.0.2.200"}])])
        # the change is not signed: the last signed zone stays, no answer is bogus
        assert service.zone("example.test").serial == signed_serial
        reply = await ask(running.udp_port, "www.example.test", "A", want_dnssec=True)
        assert any(r.rdtype == dns.rdatatype.RRSIG for r in reply.answer)
        assert service.get_stats()["internal_errors"] == 0
    finally:
        await defer.maybeDeferred(service.stopService)


def test_policy_that_would_refresh_signatures_forever_is_refused() -> None:
    try:
        parse_config({"dns": {"dnssec": {"signature_validity": 86400,
                                         "signature_refresh": 80000}}})
    except ConfigError as e:
        assert e.path == "dns.dnssec.signature_refresh"
    else:
        raise AssertionError("accepted")
    try:
        parse_config({"dns": {"dnssec": {"algorithm": "RSASHA1"}}})
    except ConfigError as e:
        assert e.path == "dns.dnssec.algorithm"
    else:
        raise AssertionError("accepted")


@pytest_twisted.ensureDeferred
async def test_transfer_of_a_signed_zone_holds_every_dnssec_record(tmp_path: Any) -> None:
    data = config()
    data["dns"]["allow_transfer"] = ["127.0.0.1/32"]
    running = start_dns(data, str(tmp_path))
    await running.service.ready
    try:
        import dns.query as query
        import dns.zone

        def transfer() -> Any:
            return dns.zone.from_xfr(query.xfr("127.0.0.1", "example.test",
                                               port=running.tcp_port))
        zone = await threads.deferToThread(transfer)
        types = {rdataset.rdtype for _name, node in zone.nodes.items() for rdataset in node}
        assert {dns.rdatatype.DNSKEY, dns.rdatatype.CDS, dns.rdatatype.CDNSKEY,
                dns.rdatatype.NSEC, dns.rdatatype.RRSIG} <= types
        served = running.service.zone("example.test")
        assert len(list(zone.iterate_rdatas())) == len(served.records)
    finally:
        await defer.maybeDeferred(running.service.stopService)


@pytest_twisted.ensureDeferred
async def test_records_other_parts_publish_are_served_signed(tmp_path: Any) -> None:
    from dcrouter.config.dns import RecordOptions
    running = start_dns(config(), str(tmp_path))
    service = running.service
    await service.ready
    try:
        registry = service.context.dns_records
        registry.set("mta-sts", [
            RecordOptions(name="_mta-sts.example.test.", type="TXT", value="v=STSv1; id=1"),
            RecordOptions(name="_smtp._tls.example.test.", type="TXT",
                          value="v=TLSRPTv1; rua=mailto:tls@example.test"),
            RecordOptions(name="www.example.test.", type="A", value="192.0.2.222"),  # clash
            RecordOptions(name="elsewhere.invalid.", type="TXT", value="no zone holds it")])
        await service.publish()
        reply = await ask(running.udp_port, "_mta-sts.example.test", "TXT", want_dnssec=True)
        assert reply.answer[0][0].strings == (b"v=STSv1; id=1",)
        assert any(r.rdtype == dns.rdatatype.RRSIG for r in reply.answer)
        reply = await ask(running.udp_port, "www.example.test", "A")
        assert [rd.address for rd in reply.answer[0]] == ["192.0.2.10"]  # configured wins
        registry.set("mta-sts", [])
        await service.publish()
        reply = await ask(running.udp_port, "_mta-sts.example.test", "TXT", want_dnssec=True)
        assert reply.rcode() == dns.rcode.NXDOMAIN
    finally:
        await defer.maybeDeferred(service.stopService)


def test_hostile_names_with_do_get_well_formed_signed_answers_within_the_limit(
        tmp_path: Any) -> None:
    """Generated queries and names of random bytes (escaped dots, any octet), most with DO,
    against the signed rich zones through the responder: a parseable answer within the UDP
    limit, and every signature in it valid."""
    import random

    import dns.name
    from twisted.internet import reactor

    from dcrouter.dns.service import DnsService
    from dcrouter.service import Extensions, RouterContext
    from tests.dns import differential
    from tests.dns.test_dnssec_nsd import dnskeys, signed_config
    from tests.dns.test_fuzz import _random_label
    from tests.support.router import options_from

    context = RouterContext(options_from(signed_config(free_tcp_udp_port()), str(tmp_path)),
                            reactor, Extensions())
    service = DnsService(context)
    zones, responder = service.zone_set, service.responder
    keys = dnskeys(zones)
    rng = random.Random(18)
    probes = differential.generate(zones, seed=1818, extra=1500, do_rate=0.9)
    suffixes = [z.origin for z in zones] + ["wild.example.test", "deleg.example.test",
                                            "sub.example.test"]
    for i in range(1500):
        labels = b".".join(_random_label(rng).replace(b".", b"\\.").replace(b"\\\\.", b"\\.")
                           for _ in range(rng.randrange(1, 4)))
        name = labels.decode("latin-1") + "." + rng.choice(suffixes)
        try:
            dns.name.from_text(name)
        except Exception:
            continue
        probes.append(differential.Probe(name, rng.choice([1, 15, 16, 43, 46, 47, 48, 255]),
                                         1, 0, rng.choice([512, 1232, 4096]), True, True,
                                         False, i % 5 == 0))
    for i, probe in enumerate(probes):
        query = probe.wire(i & 0xFFFF)
        reply = responder.handle_tcp(query) if probe.tcp else responder.handle_udp(query)
        limit = 65535 if probe.tcp else (
            512 if probe.edns != 0 else min(max(probe.payload, 512), 1232))
        assert reply is not None and len(reply) <= limit, (str(probe), reply and len(reply))
        msg = dns.message.from_wire(reply, ignore_trailing=False)
        assert msg.id == i & 0xFFFF
        if probe.dnssec and probe.rdclass == 1 and not msg.flags & dns.flags.TC:
            assert not differential.verify_signatures(reply, keys), str(probe)
    assert responder.malformed == 0

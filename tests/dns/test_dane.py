"""Inbound DANE: the signed zone's TLSA 3 1 1 names the key the SMTP listener presents,
and a new key is published two TTLs before it is presented.

A whole router (email + DNS) on loopback; the presented certificate is read
with smtplib's STARTTLS, the TLSA set with a DO query (signatures checked);
the key changes run on the DNS service's injected clock (task.Clock).
"""

from __future__ import annotations

import hashlib
import os
import smtplib
import ssl
import time
from typing import Any

import dns.message
import dns.query
import dns.rdatatype
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, task, threads

from dcrouter.smtpcerts import RENEW_BEFORE
from dcrouter.tlsutil import make_self_signed
from tests.support.net import free_port, free_tcp_udp_port
from tests.support.router import options_from, start_router, stop_router

HOST = "mail.example.test"


def dane_config(state_dir: str, cert_path: str = "", key_path: str = "",
                **dane: Any) -> dict[str, Any]:
    """A mail domain whose signed zone the router serves, with its SMTP listener."""
    email: dict[str, Any] = {
        "hostname": HOST, "listen": "127.0.0.1", "ports": [free_port()],
        "queue": {"storage_type": "memory"},
        "domain_rules": [{"pattern": "*@example.test", "mode": "mta",
                          "mta_options": {"local_delivery_path": os.path.join(state_dir, "mail")}}]}
    if cert_path:
        email["tls"] = {"cert_path": cert_path, "key_path": key_path}
    return {"router": {"state_dir": state_dir},
            "email": email,
            "dns": {"listen": "127.0.0.1", "port": free_tcp_udp_port(), "rate_limit": 0,
                    "publish_email_records": True, "dane": dict({"ttl": 300}, **dane),
                    "dnssec": {"propagation_delay": 60},
                    "zones": [{"origin": "example.test", "dnssec": True, "records": [
                        {"name": "www", "type": "A", "value": "192.0.2.10"}]}]}}


def presented_digest(port: int) -> str:
    """SHA-256 of the SubjectPublicKeyInfo the listener presents after STARTTLS."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=context)
        der = client.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    public = x509.load_der_x509_certificate(der).public_key()
    return hashlib.sha256(public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def tlsa(port: int) -> list[str]:
    """The 3 1 1 digests at _25._tcp.<HOST> (answered signed, AA)."""
    query = dns.message.make_query(f"_25._tcp.{HOST}", "TLSA", want_dnssec=True)
    reply = dns.query.udp(query, "127.0.0.1", port=port, timeout=3)
    records = [r for r in reply.answer if r.rdtype == dns.rdatatype.TLSA]
    assert any(r.rdtype == dns.rdatatype.RRSIG for r in reply.answer), reply.to_text()
    return sorted(rd.cert.hex() for r in records for rd in r
                  if (rd.usage, rd.selector, rd.mtype) == (3, 1, 1))


def ports(router: Any) -> tuple[int, int]:
    """(SMTP port, DNS UDP port)."""
    smtp = next(p for proto, _h, p in router.by_name["email"].bound_addresses())
    udp = next(p for proto, _h, p in router.by_name["dns"].bound_addresses() if proto == "udp")
    return smtp, udp


def write_pair(folder: str, name: str) -> tuple[str, str]:
    """A new key and self-signed certificate for HOST (as an operator's files)."""
    cert, key = make_self_signed([HOST])
    paths = (os.path.join(folder, f"{name}.crt"), os.path.join(folder, f"{name}.key"))
    for path, data in zip(paths, (cert, key)):
        with open(path, "wb") as f:
            f.write(data)
    return paths


async def start(data: dict[str, Any], state_dir: str) -> Any:
    router = start_router(options_from(data, state_dir))
    await router.by_name["dns"].ready
    return router


@pytest_twisted.ensureDeferred
async def test_tlsa_names_the_presented_key_and_the_next_one(tmp_path: Any) -> None:
    state = str(tmp_path / "var")
    router = await start(dane_config(state), state)
    try:
        smtp, udp = ports(router)
        presented = await threads.deferToThread(presented_digest, smtp)
        published = await threads.deferToThread(tlsa, udp)
        # the self-signed certificate's key and the pre-generated next key
        assert presented in published and len(published) == 2
        certs = router.by_name["email"].context.smtp_certs
        assert certs.tlsa_digests()[0] == presented
        next_key = os.path.join(state, "dane", HOST, "next.key")
        assert os.stat(next_key).st_mode & 0o777 == 0o600
        assert os.stat(os.path.dirname(next_key)).st_mode & 0o777 == 0o700
    finally:
        await stop_router(router)


@pytest_twisted.ensureDeferred
async def test_a_configured_key_change_is_presented_two_ttls_after_its_tlsa(tmp_path: Any
                                                                            ) -> None:
    state = str(tmp_path / "var")
    files = str(tmp_path / "files")
    os.makedirs(files)
    cert_path, key_path = write_pair(files, "live")
    router = await start(dane_config(state, cert_path, key_path), state)
    dns_service = router.by_name["dns"]
    clock = task.Clock()
    clock.advance(time.time())
    dns_service.clock = clock
    await dns_service.publish()   # its timer now runs on the test's clock
    try:
        smtp, udp = ports(router)
        old = await threads.deferToThread(presented_digest, smtp)
        assert await threads.deferToThread(tlsa, udp) == [old]
        # the operator puts a new pair in place (same paths); the next check sees it
        new_cert, new_key = write_pair(files, "new")
        os.replace(new_key, key_path)
        os.replace(new_cert, cert_path)
        clock.advance(61)
        await dns_service.publish()
        new = router.by_name["email"].context.smtp_certs.pending
        assert new and new != old
        assert await threads.deferToThread(tlsa, udp) == sorted([old, new])
        assert await threads.deferToThread(presented_digest, smtp) == old
        hold = 2 * 300 + 60
        assert dns_service.certs.hold == hold
        clock.advance(hold - 2)   # just short of two TTLs and the delay since the TLSA
        await dns_service.publish()
        assert await threads.deferToThread(presented_digest, smtp) == old
        clock.advance(5)            # the timer's check switches the listener
        await dns_service.publish()
        assert await threads.deferToThread(presented_digest, smtp) == new
        assert await threads.deferToThread(tlsa, udp) == [new]
    finally:
        await stop_router(router)


@pytest_twisted.ensureDeferred
async def test_self_signed_renewal_presents_the_key_published_since_the_start(
        tmp_path: Any) -> None:
    state = str(tmp_path / "var")
    router = await start(dane_config(state), state)
    dns_service = router.by_name["dns"]
    certs = dns_service.certs
    clock = task.Clock()
    clock.advance(time.time())
    dns_service.clock = clock
    await dns_service.publish()   # its timer now runs on the test's clock
    try:
        smtp, udp = ports(router)
        first = await threads.deferToThread(presented_digest, smtp)
        current, next_key = certs.tlsa_digests()
        assert current == first
        with open(os.path.join(state, "certs", f"{HOST}.crt"), "rb") as f:
            expires = x509.load_pem_x509_certificate(f.read()).not_valid_after_utc.timestamp()
        # the renewal is the service's next wake-up but one (within a minute of it)
        assert certs.next_check(clock.seconds()) == expires - RENEW_BEFORE
        clock.advance(expires - RENEW_BEFORE - clock.seconds() + 1)
        await defer.maybeDeferred(lambda: None)
        await dns_service.publish()
        renewed = await threads.deferToThread(presented_digest, smtp)
        assert renewed == next_key           # the key whose TLSA was there for two years
        published = await threads.deferToThread(tlsa, udp)
        assert first not in published and next_key in published and len(published) == 2
        with open(os.path.join(state, "certs", f"{HOST}.crt"), "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        assert cert.not_valid_after_utc.timestamp() > clock.seconds() + 800 * 86400
    finally:
        await stop_router(router)


@pytest_twisted.ensureDeferred
async def test_an_operator_tlsa_wins_and_unsigned_zones_get_none(tmp_path: Any) -> None:
    state = str(tmp_path / "var")
    data = dane_config(state)
    data["dns"]["zones"][0]["records"].append(
        {"name": f"_25._tcp.{HOST}.", "type": "TLSA", "value": "3 1 1 " + "ab" * 32})
    router = await start(data, state)
    try:
        _smtp, udp = ports(router)
        assert await threads.deferToThread(tlsa, udp) == ["ab" * 32]
    finally:
        await stop_router(router)
    data = dane_config(str(tmp_path / "var2"))
    data["dns"]["zones"][0]["dnssec"] = False
    router = await start(data, str(tmp_path / "var2"))
    try:
        _smtp, udp = ports(router)
        query = dns.message.make_query(f"_25._tcp.{HOST}", "TLSA")
        reply = await threads.deferToThread(dns.query.udp, query, "127.0.0.1", 3, udp)
        assert not reply.answer   # DANE needs DNSSEC: no TLSA in an unsigned zone
        assert router.by_name["dns"].certs.hold == 0
    finally:
        await stop_router(router)


def posttls_finger(work: str) -> dict[str, Any]:
    """tests/dns/dane_netns.py in its own network and mount namespace (see there)."""
    import json
    import shutil
    import subprocess
    import sys
    from tests.dns.signed_peer import require
    for tool in ("posttls-finger", "unbound"):
        require(tool)
    unshare = shutil.which("unshare")
    assert unshare, "unshare is needed: install the Debian package 'util-linux'"
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dane_netns.py")
    os.makedirs(work, exist_ok=True)
    proc = subprocess.run([unshare, "-n", "-m", "--", sys.executable, script, work],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest_twisted.ensureDeferred
async def test_posttls_finger_verifies_the_smtp_listener_by_dane(tmp_path: Any) -> None:
    result = await threads.deferToThread(posttls_finger, str(tmp_path))
    # MX, A and TLSA of example.test through a validating Unbound, STARTTLS on port 25
    right = result["right"]
    assert right["tlsa_ad"], result
    assert "Matched DANE EE certificate at depth 0: 3 1 1" in right["output"], result
    assert "Verified TLS connection established to mail.example.test[127.0.0.1]:25" in \
        right["output"], result
    # the same listener under a TLSA that names another key (the operator's): not verified
    wrong = result["wrong"]
    assert wrong["tlsa_ad"], result
    assert "no matching DANE TLSA records" in wrong["output"], result
    assert "Verified TLS connection" not in wrong["output"], result
    assert "Untrusted TLS connection established" in wrong["output"], result

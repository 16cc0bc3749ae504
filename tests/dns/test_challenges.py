"""ACME dns-01 records published by the DNS service (IDnsChallengePublisher), seen by dnspython."""

from __future__ import annotations

from typing import Any

import dns.rcode
import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from dcrouter.errors import ConfigError
from dcrouter.interfaces import IDnsChallengePublisher
from tests.dns.conftest import ask


def txt_values(response: Any) -> list[bytes]:
    return sorted(b"".join(r.strings) for rrset in response.answer for r in rrset)


@pytest_twisted.ensureDeferred
async def test_challenge_values_published_and_withdrawn(server: Any) -> None:
    service = server.service
    assert verifyObject(IDnsChallengePublisher, service)
    name = "_acme-challenge.www.example.test"
    assert service.serves("www.example.test") and service.serves("Deep.Example.Test.")
    assert not service.serves("example.invalid")
    serial = service.zone("example.test").serial
    # two values at one name (a wildcard and its base name share it)
    await service.add_txt(name, "first-value_-")
    await service.add_txt(name.upper(), "second-value")
    response = await ask(server.udp_port, name, "TXT")
    assert response.rcode() == dns.rcode.NOERROR and txt_values(response) == [
        b"first-value_-", b"second-value"]
    assert response.answer[0].ttl == 60
    assert service.zone("example.test").serial > serial
    # the zone's other data is untouched
    response = await ask(server.udp_port, "www.example.test", "A", tcp=True)
    assert [r.address for r in response.answer[0]] == ["192.0.2.10"]
    await service.remove_txt(name, "first-value_-")
    response = await ask(server.udp_port, name, "TXT")
    assert txt_values(response) == [b"second-value"]
    await service.remove_txt(name, "second-value")
    response = await ask(server.udp_port, name, "TXT")
    assert response.rcode() == dns.rcode.NXDOMAIN and service.challenge_records == {}


@pytest_twisted.ensureDeferred
async def test_outside_every_zone_is_refused(server: Any) -> None:
    with pytest.raises(ConfigError):
        await server.service.add_txt("_acme-challenge.other.invalid", "v")
    assert server.service.challenge_records == {}


@pytest_twisted.ensureDeferred
async def test_challenges_survive_a_reload(server: Any) -> None:
    service = server.service
    await service.add_txt("_acme-challenge.example.test", "kept")
    await service.reconfigure(service.options)
    response = await ask(server.udp_port, "_acme-challenge.example.test", "TXT")
    assert txt_values(response) == [b"kept"]

"""The zone model: presentation-format parsing, validation, generated SOA, serials."""

from __future__ import annotations

import dataclasses

import dns.rdata
import dns.wire
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.names import dns as tdns

from dcrouter.config import parse_config
from dcrouter.config.dns import RecordOptions, ZoneOptions
from dcrouter.dns.service import SerialKeeper
from dcrouter.dns.zone import (CAA, Zone, ZoneSet, build_zone_content, caa_rdata_text,
                               parse_record, tokenize)
from dcrouter.errors import ConfigError


def rec(name: str, rtype: str, value: str, ttl: int | None = None) -> RecordOptions:
    return RecordOptions(name=name, type=rtype, value=value, ttl=ttl)


def parse(rtype: str, value: str, name: str = "x") -> object:
    return parse_record(rec(name, rtype, value), "example.test", 300, "r")


def test_every_type_parses_to_its_wire_record() -> None:
    assert parse("A", "192.0.2.1").payload == tdns.Record_A("192.0.2.1", 300)
    assert parse("AAAA", "2001:DB8:0::1").text == "2001:db8::1"
    assert parse("CNAME", "www").text == "www.example.test."
    assert parse("CNAME", "other.test.").text == "other.test."
    mx = parse("MX", "10 mail")
    assert (mx.payload.preference, mx.text) == (10, "10 mail.example.test.")
    assert parse("MX", "0 .").text == "0 ."  # null MX (RFC 7505)
    assert parse("NS", "ns1.example.test.").text == "ns1.example.test."
    srv = parse("SRV", "10 60 5060 sip", name="_sip._tcp")
    assert (srv.owner, srv.text) == ("_sip._tcp.example.test", "10 60 5060 sip.example.test.")
    assert parse("PTR", "host.example.test.").payload == tdns.Record_PTR(b"host.example.test", 300)
    caa = parse("CAA", '0 issue "ca.example.test"')
    assert caa.rtype == CAA
    assert caa_rdata_text(caa.payload.data) == '0 issue "ca.example.test"'


def test_txt_single_string_quoted_strings_and_255_byte_chunks() -> None:
    assert parse("TXT", "v=spf1 mx -all").payload.data == [b"v=spf1 mx -all"]
    assert parse("TXT", '"a b" "c\\"d" "\\065"').payload.data == [b"a b", b'c"d', b"A"]
    long = parse("TXT", "y" * 600).payload.data
    assert [len(c) for c in long] == [255, 255, 90]
    assert b"".join(long) == b"y" * 600
    assert parse("TXT", '""').payload.data == [b""]


def test_names_are_case_insensitive_and_idna() -> None:
    assert parse("A", "192.0.2.1", name="WWW").owner == "www.example.test"
    assert parse("A", "192.0.2.1", name="bücher").owner == "xn--bcher-kva.example.test"
    assert parse("A", "192.0.2.1", name="*.wild").owner == "*.wild.example.test"


@pytest.mark.parametrize("rtype,value,fragment", [
    ("A", "300.1.1.1", "not an IPv4"),
    ("AAAA", "192.0.2.1", "not an IPv6"),
    ("MX", "mail", "expected 2 fields"),
    ("MX", "99999 mail", "0..65535"),
    ("SRV", "1 2 x host", "must be a number"),
    ("CAA", "0 issue", "expected"),
    ("CAA", '0 bad-tag! "x"', "invalid CAA tag"),
    ("CNAME", "bad..name", "invalid label"),
    ("TXT", '"unterminated', "unterminated"),
    ("CNAME", "a" * 64, "invalid label"),
])
def test_bad_values_name_the_key(rtype: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_record(rec("x", rtype, value), "example.test", 300, "dns.zones[0].records[3]")
    assert "dns.zones[0].records[3]" in str(e.value)
    assert fragment in str(e.value)


def test_owner_outside_zone_and_wildcard_in_middle_are_refused() -> None:
    with pytest.raises(ConfigError, match="not inside zone"):
        parse_record(rec("www.other.test.", "A", "192.0.2.1"), "example.test", 300, "r")
    with pytest.raises(ConfigError, match="invalid label"):
        parse_record(rec("a.*.b", "A", "192.0.2.1"), "example.test", 300, "r")


def test_generated_soa_and_ns_and_configured_soa() -> None:
    content = build_zone_content(ZoneOptions(origin="Example.Test.", ttl=600), "z")
    zone = Zone(content, 7)
    assert zone.origin == "example.test"
    assert zone.soa.text == ("ns1.example.test. hostmaster.example.test. 7 3600 600 604800 300")
    assert [r.text for r in zone.nodes["example.test"][tdns.NS]] == ["ns1.example.test."]
    configured = build_zone_content(ZoneOptions(origin="example.test", records=(
        rec("@", "SOA", "a.ns.test. admin@example.test 42 1 2 3 4"),)), "z")
    assert configured.soa.serial == 42
    assert configured.soa.rname == "admin.example.test"
    with pytest.raises(ConfigError, match="apex"):
        build_zone_content(ZoneOptions(origin="example.test", records=(
            rec("sub", "SOA", "a b 1 2 3 4 5"),)), "z")


def test_cname_rules() -> None:
    with pytest.raises(ConfigError, match="apex"):
        build_zone_content(ZoneOptions(origin="example.test", records=(
            rec("@", "CNAME", "other.test."),)), "z")
    with pytest.raises(ConfigError, match="CNAME and other"):
        build_zone_content(ZoneOptions(origin="example.test", records=(
            rec("a", "CNAME", "b"), rec("a", "A", "192.0.2.1"))), "z")


def test_empty_non_terminals_exist_and_zone_lookup_takes_the_longest_origin() -> None:
    parent = Zone(build_zone_content(ZoneOptions(origin="example.test", records=(
        rec("a.b.c", "A", "192.0.2.1"),)), "z"), 1)
    child = Zone(build_zone_content(ZoneOptions(origin="sub.example.test"), "z"), 1)
    assert {"b.c.example.test", "c.example.test"} <= parent.names
    zones = ZoneSet([parent, child])
    assert zones.find("x.sub.example.test") is child
    assert zones.find("sub.example.test") is child
    assert zones.find("example.test") is parent
    assert zones.find("example.org") is None
    assert zones.find("test") is None


def test_serial_follows_content() -> None:
    keeper = SerialKeeper()
    base = ZoneOptions(origin="example.test", records=(rec("a", "A", "192.0.2.1"),))
    first = Zone(build_zone_content(base, "z"), keeper.serial_for(build_zone_content(base, "z")))
    keeper.commit(ZoneSet([first]))
    same = build_zone_content(base, "z")
    assert keeper.serial_for(same) == first.serial
    changed = build_zone_content(dataclasses.replace(
        base, records=(rec("a", "A", "192.0.2.2"),)), "z")
    assert keeper.serial_for(changed) > first.serial


def test_zone_file_text_round_trips_through_dnspython() -> None:
    import dns.zone as dz

    options = parse_config({"dns": {"zones": [{"origin": "example.test", "records": [
        {"name": "@", "type": "MX", "value": "10 mail"},
        {"name": "mail", "type": "A", "value": "192.0.2.1"},
        {"name": "t", "type": "TXT", "value": "z" * 300},
        {"name": "@", "type": "CAA", "value": '0 issue "ca.test"'},
    ]}]}})
    assert options.dns is not None
    zone = Zone(build_zone_content(options.dns.zones[0], "z"), 5)
    parsed = dz.from_text(zone.to_zone_file(), origin="example.test.", relativize=False)
    assert parsed.find_rdataset("t.example.test.", "TXT")[0].strings == (b"z" * 255, b"z" * 45)
    assert parsed.find_rdataset("example.test.", "SOA")[0].serial == 5
    assert str(parsed.find_rdataset("example.test.", "CAA")[0]) == '0 issue "ca.test"'


def test_tokenize_escapes() -> None:
    assert tokenize('a "b c" d\\ e', "p") == [b"a", b"b c", b"d e"]


def _quoted(data: bytes) -> str:
    return '"' + "".join(f"\\{b:03d}" if b in (34, 92) or not 32 <= b < 127 else chr(b)
                         for b in data) + '"'


def test_txt_round_trips_any_bytes_through_wire_format() -> None:
    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=700), min_size=1, max_size=4))
    def check(strings: list[bytes]) -> None:
        record = parse("TXT", " ".join(_quoted(s) for s in strings))
        wire = b"".join(part for _is_name, part in record.parts)
        decoded = dns.rdata.from_wire_parser(1, 16, dns.wire.Parser(wire))
        assert all(len(c) <= 255 for c in decoded.strings)
        expected = [c for s in strings for c in ([s[i:i + 255] for i in range(0, len(s), 255)]
                                                 or [b""])]
        assert list(decoded.strings) == expected
        again = parse("TXT", record.text)  # the canonical text parses to the same record
        assert again.payload.data == record.payload.data
    check()

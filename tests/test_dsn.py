"""The DSN parameter grammar (RFC 3461 xtext, RFC 6533 utf-8 addresses) and its wire forms."""

from __future__ import annotations

import pytest

from dcrouter.dsn import (
    DELAYED, DELIVERED, FAILED, RELAYED, DsnSyntaxError, EnvelopeDsn, RecipientDsn, orcpt_param,
    parse_envid, parse_notify, parse_orcpt, parse_ret, report_address, utf8_addr_decode,
    utf8_addr_encode, wants, xtext_decode, xtext_encode,
)


@pytest.mark.parametrize("value, canonical", [
    ("NEVER", "NEVER"), ("never", "NEVER"), ("SUCCESS", "SUCCESS"),
    ("delay,failure,success", "SUCCESS,FAILURE,DELAY"), ("FAILURE,FAILURE", "FAILURE"),
    ("Failure,Delay", "FAILURE,DELAY"),
])
def test_notify_canonical(value, canonical):
    assert parse_notify(value) == canonical


@pytest.mark.parametrize("value", ["", "NEVER,SUCCESS", "SUCCESS,,FAILURE", "SUCCES",
                                   "SUCCESS;FAILURE", "ALWAYS", "SUCCESS,", ",",
                                   "\u017fuccess"])   # long s: upper() would make it SUCCESS
def test_notify_refused(value):
    with pytest.raises(DsnSyntaxError) as info:
        parse_notify(value)
    assert info.value.reply == "501 5.5.4 Error: Bad NOTIFY parameter syntax"


def test_ret():
    assert parse_ret("full") == "FULL" and parse_ret("HDRS") == "HDRS"
    assert "hdr\u017f".upper() == "HDRS"
    for bad in ("", "HEADERS", "FULL,HDRS", "hdr\u017f"):
        with pytest.raises(DsnSyntaxError) as info:
            parse_ret(bad)
        assert info.value.reply == "501 5.5.4 Bad RET parameter syntax"


def test_xtext_round_trip_and_refusals():
    assert xtext_decode("a+2Bb+3Dc+20d", "ENVID") == "a+b=c d"
    assert xtext_decode("a+2bb", "ENVID") == "a+b"           # lower-case hex too
    assert xtext_encode("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+C3+A9"
    for bad in ("a+2", "a+ZZ", "a=b", "a b", "a\x7fb", "a\x01", "caf\u00e9"):
        with pytest.raises(DsnSyntaxError):
            xtext_decode(bad, "ENVID")


def test_envid():
    assert parse_envid("QQ314159+20x") == "QQ314159 x"
    assert parse_envid("x" * 100) == "x" * 100
    for bad in ("x" * 101, "a+0Db", "a+0Ab", "a+00", "a+C3+A9", "a+09b"):
        with pytest.raises(DsnSyntaxError) as info:
            parse_envid(bad)
        assert info.value.reply == "501 5.5.4 Bad ENVID parameter syntax"


@pytest.mark.parametrize("value, utf8, decoded", [
    ("rfc822;a@b.test", False, "rfc822;a@b.test"),
    ("RFC822;a+2Bx@b.test", False, "rfc822;a+x@b.test"),
    ("rfc822;+22a+20b+22@b.test", False, 'rfc822;"a b"@b.test'),
    ("x400;c+3Dus;a+3Dx", False, "x400;c=us;a=x"),      # other types: only the characters
    ("utf-8;j\\x{F6}rg@b.test", False, "utf-8;j\u00f6rg@b.test"),
    ("UTF-8;j\\x{00F6}rg@\\x{7528}.test", False, "utf-8;j\u00f6rg@\u7528.test"),
    ("utf-8;j\u00f6rg@b.test", True, "utf-8;j\u00f6rg@b.test"),  # unitext with SMTPUTF8
    ("utf-8;a\\x{20}b@b.test", False, "utf-8;a b@b.test"),
])
def test_orcpt_accepted(value, utf8, decoded):
    assert parse_orcpt(value, utf8) == decoded


@pytest.mark.parametrize("value, utf8", [
    ("rfc822", False), (";a@b", False), ("rfc822;", False), ("rfc 822;a@b", False),
    ("rfc822;a+0D+0AX-Injected:+20yes@b", False),   # CR LF decoded: never reaches a header
    ("rfc822;a+00@b", False), ("rfc822;a=b@c", False), ("rfc822;j\u00f6rg@b", True),
    ("rfc822;a+C3+B6@b", False),                     # 8-bit after decoding
    ("utf-8;j\u00f6rg@b.test", False),               # UTF-8 needs SMTPUTF8
    ("utf-8;a+b@c", False), ("utf-8;a\\x{0D}@c", False), ("utf-8;a\\x{D800}@c", False),
    ("utf-8;a\\x{110000}@c", False), ("utf-8;a\\x{F}@c", False), ("utf-8;a\\xF6@c", False),
    ("utf-8;a\\x{2028}@c", False), ("utf-8;a\\", False), ("utf-8;\\x{20}", False),
    ("rfc822;" + "a" * 494, False),                  # 501 characters in all
    ("utf-8;" + "\u00fc" * 100 + "@x", True),        # 108 characters, 608 once escaped
])
def test_orcpt_refused(value, utf8):
    with pytest.raises(DsnSyntaxError) as info:
        parse_orcpt(value, utf8)
    assert info.value.reply == "501 5.5.4 Error: Bad ORCPT parameter syntax"


def test_wire_and_report_forms():
    assert orcpt_param('rfc822;"a b"@x.test') == 'rfc822;"a+20b"@x.test'
    assert orcpt_param("utf-8;j\u00f6rg@x.test") == "utf-8;j\\x{F6}rg@x.test"
    assert utf8_addr_decode(utf8_addr_encode("a+b=c\\d \u7528"), False) == "a+b=c\\d \u7528"
    assert report_address("utf-8;j\u00f6rg@x.test", True) == "utf-8; j\u00f6rg@x.test"
    assert report_address("utf-8;j\u00f6rg@x.test", False) == "utf-8; j\\x{F6}rg@x.test"
    assert report_address("rfc822;a@x.test", False) == "rfc822; a@x.test"
    dsn = EnvelopeDsn("HDRS", "id 1", {"a@x.test": RecipientDsn("SUCCESS", "rfc822;o@y.test")})
    assert dsn.mail_params() == b" RET=HDRS ENVID=id+201"
    assert dsn.for_recipient("a@x.test").rcpt_params("a@x.test") == \
        b" NOTIFY=SUCCESS ORCPT=rfc822;o@y.test"
    # no NOTIFY is never made up; the ORCPT is the address received (RFC 3461 5.2.1)
    assert dsn.for_recipient("b@x.test").rcpt_params("b@x.test") == b" ORCPT=rfc822;b@x.test"
    assert not EnvelopeDsn() and EnvelopeDsn().mail_params() == b""


def test_notify_semantics():
    assert wants("", FAILED) and wants("", DELAYED) and not wants("", DELIVERED)
    assert not any(wants("NEVER", e) for e in (FAILED, DELAYED, DELIVERED, RELAYED))
    assert wants("SUCCESS", DELIVERED) and wants("SUCCESS", RELAYED)
    assert not wants("SUCCESS", FAILED) and not wants("SUCCESS", DELAYED)
    assert wants("FAILURE,DELAY", DELAYED) and not wants("FAILURE", DELAYED)

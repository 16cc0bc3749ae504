"""The RFC 5321 envelope grammar of dcrouter.address: what parses, to what, and what never does."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from dcrouter.address import (
    AddressError, ar_value, header_text, maildir_name, parse_params, parse_path, split_argument,
)

VALID = [
    ("<a@example.com>", False, "a@example.com"),
    ("a@example.com", False, "a@example.com"),                      # unbracketed, as Postfix
    ('<"john.doe"@example.com>', False, "john.doe@example.com"),   # could be a Dot-string
    ('<"a b"@example.com>', False, '"a b"@example.com'),
    ('<"a\\b"@example.com>', False, "ab@example.com"),              # a needless quoted pair
    ('<"a\\"b\\\\c"@example.com>', False, '"a\\"b\\\\c"@example.com'),
    ('<""@example.com>', False, '""@example.com'),
    ("<user+tag@sub.example.com>", False, "user+tag@sub.example.com"),
    ("<no/such@example.com>", False, "no/such@example.com"),        # valid; no Maildir though
    ("<@a.example,@b.example:u@c.example>", False, "u@c.example"),  # source route dropped
    ("<u@[192.0.2.1]>", False, "u@[192.0.2.1]"),
    ("<u@[ipv6:2001:db8::1]>", False, "u@[IPv6:2001:db8::1]"),
    ("<u@[x-tag:some-data]>", False, "u@[x-tag:some-data]"),
    ("<jörg@exämple.com>", True, "jörg@xn--exmple-cua.com"),         # U-labels to A-labels
    ('<"zoë x"@example.com>', True, '"zoë x"@example.com'),
    ("<用户@例子.广告>", True, "用户@xn--fsqu00a.xn--4rr70v"),
]

INVALID = [
    ('<"x";dkim=pass header.d=paypal.com;x="y@out.test>', False, "syntax"),
    ('<"a\rb"@example.com>', False, "syntax"),
    ('<"a\nb"@example.com>', False, "syntax"),
    ('<"a\x00b"@example.com>', False, "syntax"),
    ('<"a\x7fb"@example.com>', False, "syntax"),
    ("<a\rb@example.com>", False, "syntax"),
    ("<a..b@example.com>", False, "syntax"),
    ("<.a@example.com>", False, "syntax"),
    ("<a.@example.com>", False, "syntax"),
    ("<a@b@example.com>", False, "syntax"),
    ("<a@-example.com>", False, "syntax"),
    ("<a@example-.com>", False, "syntax"),
    ("<a@example..com>", False, "syntax"),
    ("<a@example.com.>", False, "syntax"),
    ("<a@" + "x" * 64 + ".com>", False, "syntax"),                    # label over 63
    ("<a@[300.1.1.1]>", False, "syntax"),
    ("<a@[IPv6:zz::1]>", False, "syntax"),
    ("<a@[1.2.3.4>", False, "syntax"),
    ("<a@>", False, "syntax"),
    ("<@example.com>", False, "syntax"),
    ("<>", False, "syntax"),                                          # only with null_ok
    ("<@a:>", False, "syntax"),
    ("<@a.example u@b.example>", False, "syntax"),
    ("<" + "a" * 321 + "@example.com>", False, "too_long"),
    ("<jörg@example.com>", False, "utf8"),
    ("<a@exämple.com>", False, "utf8"),
    ("<a\u2028b@example.com>", True, "syntax"),                       # a line separator
    ('<"a\u0085b"@example.com>', True, "syntax"),                     # NEL, a C1 control
    ("<a\u00a0b@example.com>", True, "syntax"),                       # no-break space unquoted
]


@pytest.mark.parametrize("path,utf8,canonical", VALID)
def test_valid_paths_and_their_canonical_form(path: str, utf8: bool, canonical: str) -> None:
    mailbox = parse_path(path, utf8=utf8)
    assert mailbox is not None and mailbox.address == canonical
    again = parse_path(f"<{canonical}>", utf8=utf8)  # the canonical form is a fixed point
    assert again is not None and again.address == canonical


@pytest.mark.parametrize("path,utf8,kind", INVALID)
def test_invalid_paths(path: str, utf8: bool, kind: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_path(path, utf8=utf8)
    assert info.value.kind == kind


def test_null_path_postmaster_and_routing_characters() -> None:
    assert parse_path("<>", null_ok=True) is None
    postmaster = parse_path("<PostMaster>", postmaster_ok=True)
    assert postmaster is not None and (postmaster.local, postmaster.domain) == ("postmaster", "")
    with pytest.raises(AddressError):
        parse_path("<postmaster>")
    for text in ("<a%b@x.test>", "<a!b@x.test>", '<"a@b"@x.test>'):
        mailbox = parse_path(text)
        assert mailbox is not None and mailbox.sender_routing
    quoted = parse_path('<"a@b"@x.test>')
    assert quoted is not None and quoted.quoted and quoted.local_text == "a@b"
    plain = parse_path("<a.b@x.test>")
    assert plain is not None and not plain.sender_routing and not plain.quoted


def test_split_argument_and_parameters() -> None:
    assert split_argument('FROM:<"a>b c"@x.test> SIZE=10  BODY=8BITMIME', "FROM") == \
        ('<"a>b c"@x.test>', "SIZE=10  BODY=8BITMIME")
    assert split_argument("to: <b@x.test>", "TO") == ("<b@x.test>", "")
    assert split_argument("FROM:a@x.test SIZE=1", "FROM") == ("a@x.test", "SIZE=1")
    for bad in ("FROM<a@x>", "TO:<a@x>", "FROM:<a@x>SIZE=1", 'FROM:<"a>'):
        with pytest.raises(AddressError):
            split_argument(bad, "FROM")
    assert parse_params("SIZE=10 body=8BITMIME SMTPUTF8") == \
        {"SIZE": "10", "BODY": "8BITMIME", "SMTPUTF8": ""}
    for bad in ("SİZE=1", "=1", "X=", "-X=1", "X=a\x01"):
        assert parse_params(bad) is None, bad


def test_maildir_names() -> None:
    assert maildir_name("Box@x.test") == "box"
    assert maildir_name("Zoe\u0308@x.test") == "zo\u00eb"                 # NFC
    assert maildir_name("用户@x.test") == "用户"
    assert maildir_name("postmaster") == "postmaster"
    for unfit in ("no/such@x", '"a b"@x', ".hidden@x", "a..b@x", "☃@x", "a\u200db@x",
                  "l" * 65 + "@x", "@x", ""):
        assert maildir_name(unfit) is None, unfit


def test_header_values() -> None:
    assert header_text("a\r\nBcc: x\x00\x7f\u2028") == "a??Bcc: x???"
    assert header_text("tab\tkept") == "tab\tkept"
    assert ar_value("alice@example.com") == "alice@example.com"
    assert ar_value("postmaster@x;dkim=pass") == '"postmaster@x;dkim=pass"'
    assert ar_value('a"b\\c') == '"a\\"b\\\\c"'
    assert ar_value("a\r\nb") == '"a??b"'
    assert ar_value("") == '""'


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=1000, deadline=None)
@given(inner=st.one_of(_text, st.builds(lambda a, b: f"{a}@{b}", _text, _text),
                       st.builds(lambda a, b: f'"{a}"@{b}', _text, _text)),
       utf8=st.booleans())
def test_any_input_parses_or_is_refused_and_never_keeps_a_control(inner: str, utf8: bool) -> None:
    try:
        mailbox = parse_path(f"<{inner}>", utf8=utf8, null_ok=True, postmaster_ok=True)
    except AddressError as e:
        assert e.kind in ("syntax", "too_long", "utf8")
        return
    if mailbox is None:
        return
    address = mailbox.address
    assert not any(ord(c) < 32 or ord(c) == 127 for c in address)
    assert "\u2028" not in address and "\u2029" not in address
    assert utf8 or address.isascii()
    again = parse_path(f"<{address}>", utf8=utf8, postmaster_ok=True)
    assert again is not None and again.address == address

"""Transformations: each built-in, DKIM verified against the public key, loading by name."""

from __future__ import annotations

import base64
import os
from typing import Any

import dkim
import pytest
from zope.interface import implementer

from dcrouter.config import parse_config
from dcrouter.config.email import TransformationOptions
from dcrouter.dkimkeys import DkimKeyStore
from dcrouter.dkimpolicy import SigningPolicy
from dcrouter.email.signing import SigningDecider
from dcrouter.email.scanning.mime import parse_bytes, to_bytes
from dcrouter.email.transform import (
    AddFooter, AddHeader, DkimSign, RemoveHeader, RewriteSubject, TransformContext,
    TransformationError, build_transformation,
)
from dcrouter.errors import ConfigError
from dcrouter.interfaces import ITransformation
from tests.email.support import session, simple_message


def ctx(**kw: Any) -> TransformContext:
    return TransformContext(mail_from="alice@sender.test", recipients=["b@example.test"], **kw)


def apply(t: Any, data: bytes, context: TransformContext | None = None) -> bytes:
    context = context or ctx()
    msg = parse_bytes(data)
    t.transform(msg, context)
    return b"".join(context.prepend) + to_bytes(msg)


def test_untouched_message_round_trips_byte_for_byte() -> None:
    data = (b"Received: from x\r\n by y; Wed, 25 Nov 2026 09:00:00 +0000\r\n"
            + simple_message(subject="A very long subject " * 6) + b"second line\r\n")
    assert to_bytes(parse_bytes(data)) == data


def test_add_and_remove_header() -> None:
    out = apply(AddHeader(header="X-Gateway", value="dcrouter"), simple_message())
    assert b"\r\nX-Gateway: dcrouter\r\n" in out
    data = simple_message(extra="X-Internal: 1\r\nX-Internal: 2\r\n")
    out = apply(RemoveHeader(header="x-internal"), data)
    assert b"X-Internal" not in out and b"Subject: Hello" in out


def test_rewrite_subject_once() -> None:
    t = RewriteSubject(prefix="[EXT]", suffix="(scanned)")
    once = apply(t, simple_message(subject="Hi"))
    assert b"Subject: [EXT] Hi (scanned)\r\n" in once
    assert apply(t, once).count(b"[EXT]") == 1
    assert b"Subject: [EXT]\r\n" in apply(RewriteSubject(prefix="[EXT]"),
                                          b"From: a@b.test\r\n\r\nbody\r\n")


def test_add_footer_plain() -> None:
    out = apply(AddFooter(text="Sent via dcrouter"), simple_message(body="Hello Bob\r\n"))
    msg = parse_bytes(out)
    assert msg.get_content().endswith("Hello Bob\r\n\r\n-- \r\nSent via dcrouter\r\n")
    assert b"\n" not in out.replace(b"\r\n", b"")  # CRLF only
    assert msg["Subject"] == "Hello" and msg["Message-ID"] == "<m1@sender.test>"


def test_add_footer_alternative_and_attachment_untouched() -> None:
    pdf = base64.b64encode(b"%PDF-1.4 attachment bytes").decode()
    data = ("From: a@sender.test\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=M\r\n\r\n--M\r\n"
            "Content-Type: multipart/alternative; boundary=A\r\n\r\n--A\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n\r\nplain body\r\n--A\r\n"
            "Content-Type: text/html; charset=utf-8\r\n\r\n<html><body><p>html body</p></body>"
            "</html>\r\n--A--\r\n--M\r\nContent-Type: text/plain\r\n"
            "Content-Disposition: attachment; filename=notes.txt\r\n\r\nattached text\r\n"
            f"--M\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
            f"Content-Disposition: attachment; filename=a.pdf\r\n\r\n{pdf}\r\n--M--\r\n").encode()
    out = apply(AddFooter(text="Käse & more"), data)
    msg = parse_bytes(out)
    plain = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert plain.get_content().replace("\r\n", "\n").endswith("-- \nKäse & more\n")
    assert "<p>html body</p><p>Käse &amp; more</p></body>" in html.get_content()
    attachments = {a.get_filename(): a for a in msg.iter_attachments()}
    assert attachments["notes.txt"].get_content() == "attached text"
    assert attachments["a.pdf"].get_content() == b"%PDF-1.4 attachment bytes"


def test_add_footer_leaves_signed_messages_alone() -> None:
    data = (b"From: a@sender.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/signed; "
            b"protocol=\"application/pgp-signature\"; boundary=S\r\n\r\n--S\r\n"
            b"Content-Type: text/plain\r\n\r\nsigned\r\n--S\r\n"
            b"Content-Type: application/pgp-signature\r\n\r\nsig\r\n--S--\r\n")
    assert apply(AddFooter(text="footer"), data) == data


def signer(tmp_path: Any, domains: tuple[str, ...] = ("sender.test",),
           rules: tuple[dict[str, Any], ...] = ()) -> SigningDecider:
    """A SigningDecider whose keys are ready (made here, synchronously)."""
    options = parse_config({"router": {"state_dir": str(tmp_path)},
                            "email": {"dkim": {"domains": list(domains)},
                                      "domain_rules": list(rules)}}).email
    assert options is not None
    decider = SigningDecider(DkimKeyStore(str(tmp_path)))
    decider.policy = SigningPolicy(options)
    decider.ready_keys = decider.store.ensure(decider.policy.identities())
    return decider


def signing_ctx(decider: SigningDecider, relay: bool = True) -> TransformContext:
    return ctx(dkim_keys=decider.store, dkim_signer=decider,
               session=session(relay=relay))


def test_dkim_sign_verifies_with_public_key(tmp_path) -> None:  # type: ignore[no-untyped-def]
    decider = signer(tmp_path, rules=({"pattern": "*@p.test", "mode": "process",
                                       "transformations": [{"type": "dkim_sign",
                                                            "selector": "s1"}]},))
    context = signing_ctx(decider)
    out = apply(DkimSign(selector="s1"), simple_message(), context)
    assert out.startswith(b"DKIM-Signature: ") and context.dkim_signed == ["sender.test"]
    key = decider.store.get("sender.test", "s1")
    record = key.public_record().encode()
    asked = []

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        asked.append(name)
        return record

    assert dkim.verify(out, dnsfunc=dnsfunc)
    assert asked == [b"s1._domainkey.sender.test."]
    tampered = out.replace(b"friendly", b"hostile")
    assert not dkim.verify(tampered, dnsfunc=dnsfunc)


def test_dkim_sign_after_other_transformations(tmp_path) -> None:  # type: ignore
    """Transformations before dkim_sign are covered by the signature."""
    decider = signer(tmp_path, domains=(), rules=(
        {"pattern": "*@p.test", "mode": "process",
         "transformations": [{"type": "dkim_sign", "domain": "signer.test"}]},))
    context = signing_ctx(decider)
    msg = parse_bytes(simple_message(sender="news@signer.test"))
    for t in (AddHeader(header="X-A", value="1"), AddFooter(text="footer"),
              DkimSign(domain="signer.test")):
        t.transform(msg, context)
    out = b"".join(context.prepend) + to_bytes(msg)
    record = decider.store.get("signer.test").public_record().encode()
    assert dkim.verify(out, dnsfunc=lambda name, timeout=5: record)


def test_dkim_sign_only_for_relay_clients_and_aligned_from(tmp_path) -> None:  # type: ignore
    """Outsiders, unconfigured or unaligned From: domains and a missing From: pass unsigned;
    nothing creates a key."""
    decider = signer(tmp_path)
    keys_before = sorted(os.listdir(os.path.join(str(tmp_path), "dkim")))
    cases = [
        (simple_message(), False),                                     # outsider
        (simple_message(sender="ceo@forged.test"), True),              # not a signing domain
        (simple_message(sender="a@news.sender.test"), True),           # subdomain: not by default
        (b"Subject: x\r\n\r\nbody\r\n", True),                         # no From: at all
        (b"From: a@sender.test\r\nFrom: b@sender.test\r\n\r\nx\r\n", True),  # two From:
        (b'From: "ceo@sender.test" <x@evil.test>\r\n\r\nx\r\n', True),       # display-name trick
    ]
    for data, relay in cases:
        context = signing_ctx(decider, relay=relay)
        assert apply(DkimSign(), data, context) == to_bytes(parse_bytes(data))
        assert context.dkim_signed == [] and context.prepend == []
    assert sorted(os.listdir(os.path.join(str(tmp_path), "dkim"))) == keys_before
    with pytest.raises(TransformationError, match="no DKIM signer"):
        DkimSign().transform(parse_bytes(simple_message()), ctx())
    with pytest.raises(ConfigError):
        DkimSign(domain="bad/../domain")


@implementer(ITransformation)
class Upper:
    def __init__(self, header: str) -> None:
        self.header = header

    def transform(self, message: Any, context: Any) -> None:
        value = message[self.header]
        del message[self.header]
        message[self.header] = str(value).upper()


def opts(type_: str, **params: Any) -> TransformationOptions:
    return TransformationOptions(type=type_, params=params)


def test_build_by_registry_and_by_path() -> None:
    t = build_transformation(opts("add_header", header="X-A", value="b"), "p")
    assert isinstance(t, AddHeader)
    t = build_transformation(opts("upper", header="Subject"), "p", {"upper": Upper})
    assert b"Subject: HELLO" in apply(t, simple_message())
    t = build_transformation(opts("tests.email.test_transform:Upper", header="Subject"), "p")
    assert isinstance(t, Upper)


@pytest.mark.parametrize("options,message", [
    (opts("nope"), "p.type: unknown transformation 'nope'"),
    (opts("add_header", value="x"), "p.header: add_header needs a non-empty string 'header'"),
    (opts("add_header", header="Bad Name:", value="x"), "p.header: 'Bad Name:' is not a valid"),
    (opts("add_header", header="X", value="a\nb"), "p.value: must be one line"),
    (opts("add_header", header="X", value="v", colour="red"),
     "p.colour: unknown parameter for add_header"),
    (opts("rewrite_subject"), "p.prefix: rewrite_subject needs a prefix or a suffix"),
    (opts("rewrite_subject", suffix="x\nBcc: y"), "p.suffix: must be one line"),
    (opts("add_footer"), "p.text: add_footer needs 'text'"),
    (opts("tests.email.test_transform:Nothing"), "p.type: 'tests.email.test_transform' has no"),
    (opts("no_such_pkg.mod:Thing"), "p.type: cannot import 'no_such_pkg.mod'"),
    (opts("tests.email.test_transform:Upper"), "p: bad parameters for"),
])
def test_bad_entries(options: TransformationOptions, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_transformation(options, "p")
    assert str(info.value).startswith(message)


def test_8bit_smtputf8_message_kept_byte_for_byte() -> None:
    data = ("From: Jörg <jörg@exämple.test>\r\nSubject: Grüße aus Köln\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            "Umlaute: äöü ß\r\n").encode()
    out = apply(AddHeader(header="X-A", value="b"), data)
    assert out.replace(b"X-A: b\r\n", b"") == data


def test_rewrite_subject_of_8bit_subject_is_encoded_properly() -> None:
    data = "From: a@b.test\r\nSubject: Grüße\r\n\r\nbody\r\n".encode()
    msg = parse_bytes(apply(RewriteSubject(prefix="[EXT]"), data))
    assert msg["Subject"] == "[EXT] Grüße"

"""Built-in scanners: spam rules, EICAR, blocked attachments (nested MIME, ZIP, RFC 2231).

The checks run on the scan worker's report (scanning.analysis over a file);
the scanner classes are driven through a real worker process.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
import zipfile
from typing import Any

import pytest
import pytest_twisted

from dcrouter.email.scanning import AttachmentScanner, ScanContext, SpamScanner, VirusScanner
from dcrouter.email.scanning.analysis import FEATURES, analyse_file
from dcrouter.email.scanning.attachment import blocked_reason, find_blocked as blocked_in
from dcrouter.email.scanning.limits import Limits
from dcrouter.email.scanning.mime import parse_bytes
from dcrouter.email.scanning.spam import GTUBE, score_message
from dcrouter.email.scanning.virus import EICAR
from tests.email.support import multipart, simple_message

BLOCKED = (".exe", ".bat", ".vbs")


def analyse(data: bytes, features: Any = FEATURES, **limits: Any) -> dict:
    """The report of the built-in pass over ``data`` (in this process)."""
    fd, path = tempfile.mkstemp(suffix=".eml")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return analyse_file(path, features, Limits(**limits), timeout=30)
    finally:
        os.unlink(path)


def find_blocked(data: bytes, blocked: tuple[str, ...], scan_zip: bool = True) -> list[str]:
    return blocked_in(analyse(data)["names"], blocked, scan_zip)


def find_eicar(data: bytes) -> bool:
    return bool(analyse(data)["eicar"])


def zip_of(*members: tuple[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members:
            z.writestr(name, data)
    return buf.getvalue()


def ctx(tmp_path: Any, data: bytes) -> ScanContext:
    """A context whose spool file holds ``data`` (the scanners' worker reads it)."""
    path = os.path.join(str(tmp_path), f"spool-{len(os.listdir(str(tmp_path)))}")
    with open(path, "wb") as f:
        f.write(data)
    return ScanContext(mail_from="a@sender.test", recipients=["b@example.test"],
                       size=len(data), spool_path=path)


# -- spam rules -------------------------------------------------------------------

def rules_of(data: bytes) -> list[str]:
    """The rules as the scan worker finds them (streamed text); the same as on a parsed message."""
    report = analyse(data, ["spam"])
    assert report["spam"]["rules"] == score_message(parse_bytes(data))[1]
    return list(report["spam"]["rules"])


def test_clean_message_scores_zero() -> None:
    assert score_message(parse_bytes(simple_message())) == (0.0, [])


def test_missing_date_and_message_id() -> None:
    data = b"From: a@sender.test\r\nSubject: hi\r\n\r\nhello\r\n"
    score, rules = score_message(parse_bytes(data))
    assert rules == ["MISSING_DATE", "MISSING_MESSAGE_ID"] and score == 2.0


def test_all_caps_subject() -> None:
    assert "SUBJECT_ALL_CAPS" in rules_of(simple_message(subject="FREE MONEY NOW!!!"))
    assert "SUBJECT_ALL_CAPS" not in rules_of(simple_message(subject="Meeting at 10 UTC"))
    assert "SUBJECT_ALL_CAPS" not in rules_of(simple_message(subject="OK"))  # too short


def html_message(html: str, with_text: bool = False) -> bytes:
    if not with_text:
        return (b"From: a@sender.test\r\nSubject: x\r\nDate: Wed, 25 Nov 2026 09:00:00 +0000\r\n"
                b"Message-ID: <h@sender.test>\r\nMIME-Version: 1.0\r\n"
                b"Content-Type: text/html; charset=utf-8\r\n\r\n" + html.encode() + b"\r\n")
    return (b"From: a@sender.test\r\nSubject: x\r\nDate: Wed, 25 Nov 2026 09:00:00 +0000\r\n"
            b"Message-ID: <h@sender.test>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/alternative; boundary=B\r\n\r\n--B\r\n"
            b"Content-Type: text/plain\r\n\r\nplain\r\n--B\r\nContent-Type: text/html\r\n\r\n"
            + html.encode() + b"\r\n--B--\r\n")


def test_link_text_mismatch() -> None:
    bad = '<a href="http://evil.example.net/login">https://www.mybank.com/login</a>'
    good = '<a href="https://www.mybank.com/login">mybank.com</a>'
    plain = '<a href="https://evil.example.net/">click here</a>'
    assert "LINK_TEXT_MISMATCH" in rules_of(html_message(bad, True))
    assert "LINK_TEXT_MISMATCH" not in rules_of(html_message(good, True))
    assert "LINK_TEXT_MISMATCH" not in rules_of(html_message(plain, True))


def test_html_only() -> None:
    assert "HTML_ONLY" in rules_of(html_message("<p>hi</p>"))
    assert "HTML_ONLY" not in rules_of(html_message("<p>hi</p>", with_text=True))


def test_excessive_urls() -> None:
    many = " ".join(f"http://site{i}.example/" for i in range(16))
    few = " ".join(f"http://site{i}.example/" for i in range(15))
    assert "EXCESSIVE_URLS" in rules_of(simple_message(body=many))
    assert "EXCESSIVE_URLS" not in rules_of(simple_message(body=few))


def test_phishing_phrases_scale_and_cap() -> None:
    one = score_message(parse_bytes(simple_message(body="Please verify your account today.")))
    two = score_message(parse_bytes(simple_message(
        body="Please verify your account. Confirm your password.")))
    many = score_message(parse_bytes(simple_message(
        body="verify your account, confirm your password, your mailbox is full, you have won, "
             "confirm your identity")))
    assert one == (2.0, ["PHISHING_PHRASE"])
    assert two[0] == 3.0
    assert many[0] == 4.0


def test_phrase_split_across_lines_still_found() -> None:
    assert "PHISHING_PHRASE" in rules_of(simple_message(body="please verify\r\nyour account"))


def test_forged_display_name() -> None:
    forged = b"From: \"support@paypal.com\" <x@evil.example>\r\nSubject: s\r\n\r\nhi\r\n"
    forged_domain = b"From: \"PayPal.com Security\" <x@evil.example>\r\nSubject: s\r\n\r\nhi\r\n"
    honest = b"From: \"alice@sender.test\" <alice@sender.test>\r\nSubject: s\r\n\r\nhi\r\n"
    assert "FORGED_FROM_DISPLAY" in rules_of(forged)
    assert "FORGED_FROM_DISPLAY" in rules_of(forged_domain)
    assert "FORGED_FROM_DISPLAY" not in rules_of(honest)


def test_gtube() -> None:
    score, rules = score_message(parse_bytes(simple_message(body=GTUBE)))
    assert "GTUBE" in rules and score >= 1000


@pytest_twisted.inlineCallbacks
def test_spam_scanner_threshold(tmp_path) -> None:  # type: ignore[no-untyped-def]
    msg = simple_message(subject="URGENT ACCOUNT NOTICE",
                         body="Your account has been suspended. Verify your account.")
    result = yield SpamScanner(threshold=4.5).scan(None, ctx(tmp_path, msg))
    assert result.details == ["SUBJECT_ALL_CAPS", "PHISHING_PHRASE"]
    assert result.verdict == "spam" and result.score == 4.5
    high = yield SpamScanner(threshold=50.0).scan(None, ctx(tmp_path, msg))
    assert high.verdict == "clean" and high.score == result.score
    assert result.summary().startswith("spam=flagged(")


# -- EICAR ---------------------------------------------------------------------------

def test_eicar_in_base64_attachment() -> None:
    data = multipart([("Content-Type: application/octet-stream",
                       "Content-Disposition: attachment; filename=\"test.com\"", EICAR)])
    assert find_eicar(data)


def test_eicar_in_nested_message_and_zip() -> None:
    inner = multipart([("Content-Type: application/zip",
                        "Content-Disposition: attachment; filename=\"a.zip\"",
                        zip_of(("docs/eicar.txt", EICAR)))], boundary="INNER")
    outer = (b"From: a@sender.test\r\nSubject: fwd\r\nMIME-Version: 1.0\r\n"
             b"Content-Type: multipart/mixed; boundary=OUTER\r\n\r\n--OUTER\r\n"
             b"Content-Type: text/plain\r\n\r\nforwarded\r\n--OUTER\r\n"
             b"Content-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--OUTER--\r\n")
    assert find_eicar(outer)


def test_no_eicar_in_clean_message() -> None:
    data = multipart([("Content-Type: application/pdf",
                       "Content-Disposition: attachment; filename=\"a.pdf\"", b"%PDF-1.4 ...")])
    assert not find_eicar(data)


@pytest_twisted.inlineCallbacks
def test_virus_scanner_builtin(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = multipart([("Content-Type: application/octet-stream",
                       "Content-Disposition: attachment; filename=\"x.bin\"", EICAR)])
    result = yield VirusScanner().scan(None, ctx(tmp_path, data))
    assert result.verdict == "virus" and result.reason_text == "virus detected"
    clean = yield VirusScanner().scan(None, ctx(tmp_path, simple_message()))
    assert clean.verdict == "clean"


# -- attachments -----------------------------------------------------------------------

@pytest.mark.parametrize("name,why", [
    ("setup.exe", "extension .exe"),
    ("SETUP.EXE", "extension .exe"),
    ("invoice.pdf.exe", "extension .exe"),
    ("invoice.pdf.exe.", "extension .exe"),      # Windows drops trailing dots
    ("invoice.pdf.exe ", "extension .exe"),
    ("run.BaT", "extension .bat"),
    ("C:\\temp\\x.vbs", "extension .vbs"),
    ("payload.exe.txt", "double extension .exe"),
    ("report.pdf", None),
    ("exe", None),
    ("notes.exec", None),
    ("", None),
])
def test_blocked_reason(name: str, why: str) -> None:
    assert blocked_reason(name, BLOCKED) == why


def test_blocked_by_filename_and_by_name_param() -> None:
    by_disposition = multipart([("Content-Type: application/octet-stream",
                                 "Content-Disposition: attachment; filename=\"a.exe\"", b"MZ")])
    by_name = multipart([("Content-Type: application/octet-stream; name=\"b.bat\"",
                          "Content-Disposition: attachment", b"echo")])
    assert find_blocked((by_disposition), BLOCKED) == ["a.exe: extension .exe"]
    assert find_blocked((by_name), BLOCKED) == ["b.bat: extension .bat"]


def test_rfc2231_encoded_and_continued_names() -> None:
    encoded = multipart([("Content-Type: application/octet-stream",
                          "Content-Disposition: attachment; filename*=UTF-8''Rechnung%20M%C3%A4rz.pdf.exe",
                          b"MZ")])
    continued = multipart([("Content-Type: application/octet-stream",
                            "Content-Disposition: attachment; filename*0=\"long-name-\";"
                            " filename*1=\"part.vbs\"", b"x")])
    encoded_word = multipart([("Content-Type: application/octet-stream; "
                               "name=\"=?utf-8?B?" + base64.b64encode(b"r\xc3\xa9sum\xc3\xa9.exe")
                               .decode() + "?=\"", "Content-Disposition: attachment", b"MZ")])
    assert find_blocked((encoded), BLOCKED) == [
        "Rechnung März.pdf.exe: extension .exe"]
    assert find_blocked((continued), BLOCKED) == ["long-name-part.vbs: extension .vbs"]
    assert find_blocked((encoded_word), BLOCKED) != []


def test_blocked_in_nested_multipart_and_attached_message() -> None:
    inner = multipart([("Content-Type: application/octet-stream",
                        "Content-Disposition: attachment; filename=\"deep.exe\"", b"MZ")],
                      boundary="INNER")
    outer = (b"From: a@sender.test\r\nSubject: fwd\r\nMIME-Version: 1.0\r\n"
             b"Content-Type: multipart/mixed; boundary=OUTER\r\n\r\n--OUTER\r\n"
             b"Content-Type: multipart/alternative; boundary=ALT\r\n\r\n--ALT\r\n"
             b"Content-Type: text/plain\r\n\r\ntext\r\n--ALT--\r\n--OUTER\r\n"
             b"Content-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--OUTER--\r\n")
    assert find_blocked((outer), BLOCKED) == ["deep.exe: extension .exe"]


def test_blocked_inside_zip_and_nested_zip() -> None:
    inner_zip = zip_of(("tool.vbs", b"x"))
    data = multipart([("Content-Type: application/zip",
                       "Content-Disposition: attachment; filename=\"docs.zip\"",
                       zip_of(("readme.txt", b"hi"), ("bin/setup.exe", b"MZ"),
                              ("more.zip", inner_zip)))])
    found = find_blocked((data), BLOCKED)
    assert "docs.zip/bin/setup.exe: extension .exe" in found
    assert "docs.zip/more.zip/tool.vbs: extension .vbs" in found
    assert find_blocked((data), BLOCKED, scan_zip=False) == []


def test_zip_detected_by_magic_name_less() -> None:
    data = multipart([("Content-Type: application/x-zip-compressed",
                       "Content-Disposition: attachment", zip_of(("x.bat", b"x")))])
    assert find_blocked((data), BLOCKED) == ["message/2/x.bat: extension .bat"]  # MIME path


def test_corrupt_zip_is_a_verdict_not_an_error() -> None:
    """What cannot be read cannot be cleared: a broken ZIP is 'unscannable', never a traceback."""
    data = multipart([("Content-Type: application/zip",
                       "Content-Disposition: attachment; filename=\"bad.zip\"", b"PK\x03\x04junk")])
    report = analyse(data)
    assert report["verdict"] == {"kind": "unscannable", "signature": "Heuristics.Broken.Zip",
                                 "detail": "bad.zip: no end of central directory record"}
    assert blocked_in(report["names"], BLOCKED) == []


@pytest_twisted.inlineCallbacks
def test_attachment_scanner_normalises_extensions(tmp_path) -> None:  # type: ignore
    scanner = AttachmentScanner(["EXE", ".Bat"])
    data = multipart([("Content-Type: application/octet-stream",
                       "Content-Disposition: attachment; filename=\"x.exe\"", b"MZ")])
    result = yield scanner.scan(None, ctx(tmp_path, data))
    assert result.verdict == "blocked" and result.reason_text == "blocked attachment type"
    clean = yield scanner.scan(None, ctx(tmp_path, simple_message()))
    assert clean.verdict == "clean"

"""The built-in scan's budgets: zip bombs, nesting, part counts, broken archives, time.

Each hostile input ends in a verdict (``limits`` or ``unscannable``) or a
finding, never a traceback, and the work done is bounded by the limits, not
by what the archive declares (``spent`` shows it).
"""

from __future__ import annotations

import base64
import os
import tempfile
import time
from typing import Any

import pytest

from dcrouter.email.scanning.analysis import FEATURES, analyse_file
from dcrouter.email.scanning.attachment import find_blocked
from dcrouter.email.scanning.limits import Budget, Limits, ScanTimeExceeded
from dcrouter.email.scanning.mimewalk import Base64Decoder
from dcrouter.email.scanning.virus import EICAR
from tests.email.zipcraft import (
    RawEntry, crc_zeros, deep_zip, deflate_zeros, mime_attachment, nested_bomb, overlap_bomb,
    ratio_bomb, raw_zip, zip_of,
)

MB = 1024 * 1024


def analyse(data: bytes, features: Any = FEATURES, timeout: float = 30, **limits: Any) -> dict:
    fd, path = tempfile.mkstemp(suffix=".eml")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return analyse_file(path, features, Limits(**limits), timeout=timeout)
    finally:
        os.unlink(path)


def signature(report: dict) -> str:
    assert report["verdict"] is not None, report
    return str(report["verdict"]["signature"])


# -- zip bombs --------------------------------------------------------------------------

def test_ratio_bomb_stops_on_the_declared_ratio_without_unpacking() -> None:
    report = analyse(mime_attachment(ratio_bomb(20 * MB)))
    assert signature(report) == "Heuristics.Limits.Exceeded.MaxRatio"
    assert "archive.zip/zeros.bin (declared)" in report["verdict"]["detail"]
    assert report["spent"]["bytes"] < 64 * 1024   # nothing was inflated


def test_lying_sizes_are_stopped_by_what_comes_out() -> None:
    """Declares 1,000 bytes, inflates to 20 MB: the ratio of real bytes stops it after ~1 MiB."""
    size = 20 * MB
    liar = raw_zip([RawEntry("small.txt", deflate_zeros(size), size, crc_zeros(size),
                             declared_size=1000)])
    report = analyse(mime_attachment(liar))
    assert signature(report) == "Heuristics.Limits.Exceeded.MaxRatio"
    assert "(declared)" not in report["verdict"]["detail"]
    assert report["spent"]["bytes"] < 2 * MB


def test_huge_declared_size_zip64() -> None:
    huge = raw_zip([RawEntry("disk.img", deflate_zeros(MB), 1 << 40, 0)])
    report = analyse(mime_attachment(huge), max_ratio=0)
    assert signature(report) == "Heuristics.Limits.Exceeded.MaxFileSize"
    assert "1099511627776 bytes" in report["verdict"]["detail"]


def test_42_zip_shape_is_stopped_by_the_total() -> None:
    """16 x 16 x 16 leaves of 1 MiB (4 GiB unpacked): MaxScanSize after 100 MiB, not 4 GiB."""
    bomb = nested_bomb(16, 3, MB)
    assert len(bomb) < 3 * MB
    started = time.process_time()
    report = analyse(mime_attachment(bomb, "42.zip"))
    assert signature(report) == "Heuristics.Limits.Exceeded.MaxScanSize"
    assert report["spent"]["bytes"] <= 100 * MB + 64 * 1024
    assert time.process_time() - started < 20   # a bound, not a benchmark (bench/scan_bomb.py)


def test_overlapping_entries_are_unscannable() -> None:
    bomb = overlap_bomb(200, 512 * 1024)
    report = analyse(mime_attachment(bomb), max_ratio=0)
    assert signature(report) == "Heuristics.Zip.OverlappingFiles"
    assert report["spent"]["bytes"] < 64 * 1024


def test_declared_sizes_add_up_past_the_total() -> None:
    members = [RawEntry(f"{i}.bin", deflate_zeros(MB), 20 * MB, 0) for i in range(6)]
    report = analyse(mime_attachment(raw_zip(members)), max_ratio=0)
    assert signature(report) == "Heuristics.Limits.Exceeded.MaxScanSize"
    assert "declare" in report["verdict"]["detail"]


def test_too_many_members_refused_before_they_are_built() -> None:
    members = [RawEntry(f"f{i}", b"", 0, 0, method=0) for i in range(300)]
    report = analyse(mime_attachment(raw_zip(members)), max_files=100)
    assert signature(report) == "Heuristics.Limits.Exceeded.MaxFiles"
    assert "300 entries" in report["verdict"]["detail"]


def test_within_limits_a_large_member_is_streamed_and_scanned() -> None:
    """20 MB of zeros with EICAR at the end: inflated in chunks and found."""
    blob = zip_of(("big.bin", b"\0" * (20 * MB) + EICAR))
    report = analyse(mime_attachment(blob), max_ratio=0)
    assert report["verdict"] is None and report["eicar"]
    assert report["spent"]["bytes"] > 20 * MB


# -- nesting --------------------------------------------------------------------------

def test_blocked_exe_nested_ten_archives_deep_is_found() -> None:
    report = analyse(mime_attachment(deep_zip(10, "payload.exe", b"MZ"), "docs.zip"))
    assert report["verdict"] is None
    found = find_blocked(report["names"], (".exe",))
    assert found == ["docs.zip/level1.zip/level2.zip/level3.zip/level4.zip/level5.zip/"
                     "level6.zip/level7.zip/level8.zip/level9.zip/payload.exe: extension .exe"]


def test_archives_nested_past_max_recursion() -> None:
    report = analyse(mime_attachment(deep_zip(30, "payload.exe", b"MZ")))
    assert signature(report) == "Heuristics.Limits.Exceeded.MaxRecursion"
    report = analyse(mime_attachment(deep_zip(8, "x.txt", b"x")), max_recursion=5)
    assert signature(report) == "Heuristics.Limits.Exceeded.MaxRecursion"


def nested_multipart(depth: int) -> bytes:
    head = b"From: a@sender.test\r\nSubject: deep\r\nMIME-Version: 1.0\r\n"
    body = b"Content-Type: text/plain\r\n\r\nbottom\r\n"
    for level in range(depth):
        b = f"L{level}".encode()
        body = (b"Content-Type: multipart/mixed; boundary=" + b + b"\r\n\r\n--" + b + b"\r\n"
                + body + b"--" + b + b"--\r\n")
    return head + body


def test_mime_nesting_past_max_recursion() -> None:
    assert analyse(nested_multipart(10))["verdict"] is None
    report = analyse(nested_multipart(500))
    assert signature(report) == "Heuristics.Limits.Exceeded.MaxRecursion"


def test_attached_messages_count_as_nesting() -> None:
    inner = b"From: x@y.test\r\nSubject: in\r\n\r\nhello\r\n"
    for _ in range(25):
        inner = (b"From: x@y.test\r\nMIME-Version: 1.0\r\n"
                 b"Content-Type: message/rfc822\r\n\r\n" + inner)
    assert signature(analyse(inner)) == "Heuristics.Limits.Exceeded.MaxRecursion"


def test_base64_encoded_attached_message_is_walked() -> None:
    exe = mime_attachment(b"MZ", "tool.exe", "application/octet-stream")
    outer = mime_attachment(exe, "forward.eml", "message/rfc822")
    report = analyse(outer)
    assert find_blocked(report["names"], (".exe",)) == ["tool.exe: extension .exe"]


def test_a_million_parts_stop_at_max_files() -> None:
    parts = b"".join(b"--P\r\n\r\nx\r\n" for _ in range(20000))
    data = (b"From: a@sender.test\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=P\r\n\r\n" + parts + b"--P--\r\n")
    report = analyse(data)
    assert signature(report) == "Heuristics.Limits.Exceeded.MaxFiles"
    assert report["spent"]["files"] == 10001


# -- malformed archives: verdicts, never tracebacks -------------------------------------

TEXT = b"".join(b"line %d of a report\r\n" % i for i in range(3000))
GOOD = zip_of(("a.txt", TEXT))


@pytest.mark.parametrize("blob,detail", [
    (b"PK\x03\x04" + bytes(range(256)) * 8, "no end of central directory record"),
    (GOOD[:-30], "no end of central directory record"),                         # truncated
    (GOOD[:200] + bytes(300) + GOOD[500:], "cannot unpack"),                    # corrupt data
    (GOOD[:60] + bytes([GOOD[60] ^ 0x20]) + GOOD[61:], "a.txt"),                # one bit
    (b"PK\x05\x06" + b"\xff" * 18, "ZIP64 sizes without a ZIP64 locator"),      # lying directory
])
def test_malformed_archives_are_unscannable(blob: bytes, detail: str) -> None:
    report = analyse(mime_attachment(blob))
    assert report["verdict"]["kind"] == "unscannable"
    assert signature(report) == "Heuristics.Broken.Zip"
    assert detail in report["verdict"]["detail"]


def test_fuzzed_archives_never_raise() -> None:
    import random
    rng = random.Random(12)
    good = zip_of(("a.txt", b"hello world " * 200), ("b/c.exe", b"MZ" * 300),
                  ("n.zip", zip_of(("d.vbs", b"x" * 100))))
    for _ in range(300):
        blob = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        report = analyse(mime_attachment(bytes(blob)))
        assert report["verdict"] is None or report["verdict"]["kind"] in ("limits", "unscannable")


def test_local_and_central_names_both_checked() -> None:
    sneaky = raw_zip([RawEntry("invoice.pdf", b"MZ", 2, 0, method=0, local_name="invoice.exe")])
    report = analyse(mime_attachment(sneaky))
    assert find_blocked(report["names"], (".exe",)) == \
        ["archive.zip/invoice.exe: extension .exe"]


def test_encrypted_and_unknown_methods_keep_names_checked() -> None:
    blob = raw_zip([RawEntry("secret.exe", b"\x01" * 40, 40, 0, flags=1),
                    RawEntry("weird.bat", b"\x02" * 40, 40, 0, method=99)])
    report = analyse(mime_attachment(blob))
    assert report["verdict"] is None
    assert len(find_blocked(report["names"], (".exe", ".bat"))) == 2
    assert report["notes"] == ["archive.zip/secret.exe: encrypted, content not scanned",
                               "archive.zip/weird.bat: compression method 99, content not "
                               "scanned"]


def test_renamed_zip_found_by_magic() -> None:
    report = analyse(mime_attachment(zip_of(("x.exe", b"MZ")), "photo.jpg", "image/jpeg"))
    assert find_blocked(report["names"], (".exe",)) == ["photo.jpg/x.exe: extension .exe"]


# -- decoding tricks and time ------------------------------------------------------------

def test_base64_padding_in_the_middle_does_not_hide_the_rest() -> None:
    collected: list[bytes] = []

    class Sink:
        def feed(self, data: bytes) -> None:
            collected.append(data)

        def close(self) -> None:
            pass

    decoder = Base64Decoder(Sink())
    decoder.feed(b"QQ==\r\n" + base64.b64encode(EICAR) + b"\r\n")
    decoder.close()
    assert b"".join(collected) == b"A" + EICAR
    data = (b"From: a@b.test\r\nMIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\nQQ==\r\n" + base64.b64encode(EICAR)
            + b"\r\n")
    assert analyse(data)["eicar"]


def test_boundary_split_across_read_blocks() -> None:
    from dcrouter.email.scanning import mimewalk
    pad = b"x" * (mimewalk.BLOCK - 40) + b"\r\n"
    data = (b"From: a@b.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=Q"
            b"\r\n\r\n--Q\r\nContent-Type: text/plain\r\n\r\n" + pad + b"--Q\r\n"
            b"Content-Disposition: attachment; filename=late.exe\r\n\r\nMZ\r\n--Q--\r\n")
    report = analyse(data)
    assert find_blocked(report["names"], (".exe",)) == ["late.exe: extension .exe"]


def test_time_budget_raises_between_chunks() -> None:
    budget = Budget(Limits(), timeout=0.001)
    time.sleep(0.01)
    with pytest.raises(ScanTimeExceeded):
        budget.charge_bytes(1, "x")
    with pytest.raises(ScanTimeExceeded):
        analyse(mime_attachment(ratio_bomb(200 * MB)), timeout=0.05, max_ratio=0,
                max_file_size=0, max_scan_size=0)


def test_raw_utf8_names_and_an_8bit_boundary() -> None:
    data = ("From: a@b.test\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=\"Grenze-ä\"\r\n\r\n"
            "--Grenze-ä\r\nContent-Type: text/plain\r\n\r\nHallo\r\n--Grenze-ä\r\n"
            "Content-Disposition: attachment; filename=\"Rechnung März.pdf.exe\"\r\n\r\n"
            "MZ\r\n--Grenze-ä--\r\n").encode("utf-8")
    report = analyse(data)
    assert report["spent"]["files"] == 3
    assert find_blocked(report["names"], (".exe",)) == [
        "Rechnung März.pdf.exe: extension .exe"]

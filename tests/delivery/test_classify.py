"""Hard/soft/transient classification of SMTP failure replies (RFC 3463)."""

from __future__ import annotations

import pytest

from dcrouter.delivery.classify import classify, enhanced_status


@pytest.mark.parametrize("code,text,kind,status", [
    (550, "5.1.1 <x@y>: Recipient address rejected: User unknown", "hard", "5.1.1"),
    (550, "Requested action not taken: mailbox unavailable", "hard", "5.0.0"),
    (556, "5.1.10 null MX", "hard", "5.1.10"),
    (550, "5.2.1 mailbox disabled", "hard", "5.2.1"),
    (552, "5.2.2 mailbox full", "soft", "5.2.2"),
    (554, "5.7.1 message rejected as spam", "soft", "5.7.1"),
    (552, "5.3.4 message too big", "soft", "5.3.4"),
    (451, "4.7.1 greylisted, try again", "transient", "4.7.1"),
    (421, "service not available", "transient", "4.0.0"),
    (-1, "timeout after 30s", "transient", "4.0.0"),
    (450, "5.1.1 confused server", "transient", "4.0.0"),
])
def test_classify(code, text, kind, status):
    verdict = classify(code, text)
    assert verdict.kind == kind
    assert verdict.status == status
    assert verdict.permanent == (kind != "transient")


def test_enhanced_status_ignores_version_numbers():
    assert enhanced_status("250 2.0.0 Ok: queued as 12.3.4.5") == "2.0.0"
    assert enhanced_status("Postfix 3.7.1 says hi") is None

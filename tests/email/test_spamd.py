"""The spamd client against a real spamd (SPAMC/1.5), alone and inside the processor."""

from __future__ import annotations

import os
from typing import Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor

from dcrouter.email.scanning import ScannerError, SpamdClient
from dcrouter.email.scanning.spam import GTUBE
from dcrouter.email.scanning.spamd import parse_reply
from tests.email.peers import Peer, start_spamd
from tests.email.support import make_processor, simple_message, transaction
from tests.support.net import free_port


@pytest.fixture(scope="module")
def spamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    peer = start_spamd(str(tmp_path_factory.mktemp("spamd")))
    yield peer
    peer.stop()


def write(tmp_path, data: bytes) -> str:  # type: ignore[no-untyped-def]
    path = os.path.join(str(tmp_path), "msg.eml")
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest_twisted.inlineCallbacks
def test_gtube_is_spam(spamd: Peer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    client = SpamdClient(reactor, "127.0.0.1", spamd.port, timeout=30)
    result = yield client.check_file(write(tmp_path, simple_message(body=GTUBE)))
    assert result.is_spam and result.score > 500 and result.threshold == 5.0
    assert "GTUBE" in result.symbols


@pytest_twisted.inlineCallbacks
def test_ordinary_mail_is_not_spam(spamd: Peer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    client = SpamdClient(reactor, "127.0.0.1", spamd.port, timeout=30)
    result = yield client.check_file(write(tmp_path, simple_message()))
    assert not result.is_spam and result.score < 5.0


@pytest_twisted.inlineCallbacks
def test_too_big_is_not_sent(spamd: Peer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    client = SpamdClient(reactor, "127.0.0.1", spamd.port, timeout=30, max_size=100)
    result = yield client.check_file(write(tmp_path, simple_message(body=GTUBE)))
    assert result is None


@pytest_twisted.inlineCallbacks
def test_unreachable_spamd_is_a_scanner_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    client = SpamdClient(reactor, "127.0.0.1", free_port(), timeout=5)
    with pytest.raises(ScannerError, match="spamd at 127.0.0.1"):
        yield client.check_file(write(tmp_path, simple_message()))


def test_parse_reply_errors() -> None:
    with pytest.raises(ScannerError, match="no valid reply"):
        parse_reply(b"garbage")
    with pytest.raises(ScannerError, match="EX_PROTOCOL"):
        parse_reply(b"SPAMD/1.0 76 Bad header line: x\r\n\r\n".replace(b"Bad header line: x",
                                                                       b"EX_PROTOCOL"))
    r = parse_reply(b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 1.5 / 5.0\r\n\r\nA,B")
    assert (r.is_spam, r.score, r.symbols) == (False, 1.5, ["A", "B"])


@pytest_twisted.inlineCallbacks
def test_processor_tags_gtube_via_spamd(spamd: Peer, tmp_path) -> None:  # type: ignore
    """With [email.spamd] the spam scanner asks spamd too; its rules show in X-Spam-Status."""
    processor, queue = make_processor(str(tmp_path), {
        "spamd": {"host": "127.0.0.1", "port": spamd.port, "timeout": 30},
        "domain_rules": [{"pattern": "*@example.test", "mode": "process",
                          "content_scanning": True,
                          "scanners": [{"type": "spam", "threshold": 5.0, "action": "tag",
                                        "subject_prefix": "[SPAM]"}]}]})
    body = simple_message(subject="Offer", body="nothing special\r\n")
    yield transaction(processor, str(tmp_path), body, "alice@sender.test", ["b@example.test"])
    clean = queue.body(queue.requests[-1])
    assert b"X-Spam-Status: No" in clean and b"Subject: Offer" in clean
    yield transaction(processor, str(tmp_path), simple_message(subject="Offer", body=GTUBE),
                      "alice@sender.test", ["b@example.test"])
    tagged = queue.body(queue.requests[-1])
    assert b"X-Spam-Status: Yes" in tagged and b"SPAMD_GTUBE" in tagged
    assert b"Subject: [SPAM] Offer" in tagged

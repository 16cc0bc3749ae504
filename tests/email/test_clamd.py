"""The clamd client against a real clamd (INSTREAM) with a signature database the test writes."""

from __future__ import annotations

import os
from typing import Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor

from dcrouter.email.scanning import ClamdClient, ScannerError
from dcrouter.email.scanning.clamd import parse_reply
from dcrouter.email.scanning.virus import EICAR
from dcrouter.errors import PolicyRejection
from tests.email.peers import CUSTOM_SAMPLE, Peer, start_clamd
from tests.email.support import make_processor, multipart, simple_message, transaction
from tests.support.net import free_port


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    peer = start_clamd(str(tmp_path_factory.mktemp("clamd")))
    yield peer
    peer.stop()


def write(tmp_path, data: bytes, name: str = "msg.eml") -> str:  # type: ignore[no-untyped-def]
    path = os.path.join(str(tmp_path), name)
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest_twisted.inlineCallbacks
def test_eicar_file_found(clamd: Peer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    client = ClamdClient(reactor, "127.0.0.1", clamd.port, chunk_size=16)  # several chunks
    found = yield client.scan_file(write(tmp_path, EICAR))
    assert found == "Test.EICAR-Custom.UNOFFICIAL"


@pytest_twisted.inlineCallbacks
def test_eicar_attachment_in_mail_found(clamd: Peer, tmp_path) -> None:  # type: ignore
    data = multipart([("Content-Type: application/octet-stream",
                       "Content-Disposition: attachment; filename=\"t.bin\"", EICAR)])
    found = yield ClamdClient(reactor, "127.0.0.1", clamd.port).scan_file(write(tmp_path, data))
    assert found == "Test.EICAR-Custom.UNOFFICIAL"


@pytest_twisted.inlineCallbacks
def test_custom_signature_found(clamd: Peer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    found = yield ClamdClient(reactor, "127.0.0.1", clamd.port).scan_file(
        write(tmp_path, CUSTOM_SAMPLE))
    assert found == "Test.Dcrouter-Custom.UNOFFICIAL"


@pytest_twisted.inlineCallbacks
def test_clean_and_large_file(clamd: Peer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    client = ClamdClient(reactor, "127.0.0.1", clamd.port)
    assert (yield client.scan_file(write(tmp_path, simple_message()))) is None
    big = simple_message(body=("x" * 78 + "\r\n") * 13000)   # ~1 MB: 16 chunks
    assert (yield client.scan_file(write(tmp_path, big, "big.eml"))) is None


@pytest_twisted.inlineCallbacks
def test_unreachable_clamd(tmp_path) -> None:  # type: ignore[no-untyped-def]
    client = ClamdClient(reactor, "127.0.0.1", free_port(), timeout=5)
    with pytest.raises(ScannerError, match="clamd at 127.0.0.1"):
        yield client.scan_file(write(tmp_path, EICAR))


def test_parse_reply() -> None:
    assert parse_reply("stream: OK\0") is None
    assert parse_reply("stream: Win.Test FOUND") == "Win.Test"
    with pytest.raises(ScannerError, match="size limit exceeded"):
        parse_reply("INSTREAM size limit exceeded. ERROR")


@pytest_twisted.inlineCallbacks
def test_processor_rejects_what_only_clamd_sees(clamd: Peer, tmp_path) -> None:  # type: ignore
    """A signature clamd knows (the test database) and the built-in EICAR check does not."""
    processor, queue = make_processor(str(tmp_path), {
        "clamd": {"host": "127.0.0.1", "port": clamd.port},
        "domain_rules": [{"pattern": "*@example.test", "mode": "process",
                          "content_scanning": True,
                          "scanners": [{"type": "virus", "action": "reject"}]}]})
    data = multipart([("Content-Type: application/octet-stream",
                       "Content-Disposition: attachment; filename=\"t.bin\"", CUSTOM_SAMPLE)])
    with pytest.raises(PolicyRejection) as info:
        yield transaction(processor, str(tmp_path), data, "a@sender.test", ["b@example.test"])
    assert (info.value.code, info.value.enhanced, info.value.reason) == (550, "5.7.1", "virus")
    assert info.value.text == "Message rejected: virus detected"
    assert queue.requests == []
    yield transaction(processor, str(tmp_path), simple_message(), "a@sender.test",
                      ["b@example.test"])
    assert b"X-Dcrouter-Scan: virus=clean" in queue.body(queue.requests[-1])

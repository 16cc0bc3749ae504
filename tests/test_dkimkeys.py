"""DKIM key store: generation, permissions, public record, and a signature dkimpy verifies."""

from __future__ import annotations

import os

import dkim

from dcrouter.dkimkeys import DkimKeyStore, sign_message


def test_generated_key_signs_and_verifies(tmp_path):
    store = DkimKeyStore(str(tmp_path))
    seen = []
    store.add_listener(lambda: seen.append(1))
    assert store.get("Example.TEST") is None   # looking up never creates
    key = store.get("Example.TEST", create=True)
    assert key.domain == "example.test" and key.selector == "dcrouter"
    assert os.stat(key.path).st_mode & 0o777 == 0o600
    assert os.stat(os.path.dirname(key.path)).st_mode & 0o777 == 0o700
    assert seen == [1]
    message = b"From: a@example.test\r\nTo: b@other.test\r\nSubject: hi\r\n\r\nbody\r\n"
    signed = sign_message(message, key) + message
    record = key.public_record().encode()
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: record)
    assert not dkim.verify(signed.replace(b"body", b"bodY"), dnsfunc=lambda n, timeout=5: record)


def test_key_survives_restart_and_is_listed(tmp_path):
    first = DkimKeyStore(str(tmp_path)).get("a.test", "s1", create=True)
    again = DkimKeyStore(str(tmp_path))
    assert again.get("a.test", "s1", create=False).private_pem == first.private_pem
    assert [(k.domain, k.selector) for k in DkimKeyStore(str(tmp_path)).known_keys()] == \
        [("a.test", "s1")]

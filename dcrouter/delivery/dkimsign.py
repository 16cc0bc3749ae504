"""DKIM signing at delivery: the signature the processor decided on when it accepted the message.

The queue item names what to sign with (:class:`dcrouter.message.DkimSigning`:
``d=`` and ``s=``, no secret); the key comes from the shared key store, which
loaded every configured key at start.  Nothing here creates a key or picks a
domain: an item whose key is gone, or a message dkimpy cannot sign, is
delivered unsigned with an error in the log - never deferred, never bounced
(OpenDKIM's ``On-KeyNotFound = accept``).
"""

from __future__ import annotations

from typing import Optional

from dcrouter.dkimkeys import DkimKeyStore, DkimSignError, sign_message
from dcrouter.errors import ConfigError
from dcrouter.logsetup import get_logger
from dcrouter.message import DkimSigning

log = get_logger("email.delivery")


def signed(store: DkimKeyStore, signing: Optional[DkimSigning], data: bytes,
           queue_id: str = "", correlation_id: str = "") -> tuple[bytes, bool]:
    """``(data with a DKIM-Signature: first, True)``, or ``(data, False)`` when unsigned.

    Blocking (key file I/O on a cache miss, RSA): call it through ``deferToThread``.
    """
    if signing is None:
        return data, False
    try:
        key = store.get(signing.domain, signing.selector, create=False)
        if key is None:
            raise DkimSignError(f"no key {signing.selector}._domainkey.{signing.domain} "
                                "in the key store")
        header = sign_message(data, key)
    except (DkimSignError, ConfigError, OSError) as e:
        log.error("delivering {queue_id} unsigned: DKIM d={domain} s={selector}: {error}",
                  queue_id=queue_id, domain=signing.domain, selector=signing.selector,
                  error=str(e), correlation_id=correlation_id)
        return data, False
    return header + data, True


__all__ = ["signed"]

"""Client certificates on the SMTP listeners (``email.tls.ca_path``), as Postfix's ``ask_ccert``.

When a CA bundle is configured the server asks every TLS client for a
certificate, never requires one, and never fails a handshake over it (an
SMTP server must not lose mail because a client's certificate is odd).  After
the handshake :meth:`ClientCertPolicy.describe` verifies the chain against the
bundle with ``cryptography``'s X.509 verifier and returns what the Received
header records: subject and issuer CN and whether the chain verified.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any, Optional

from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from OpenSSL import SSL

from dcrouter.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ClientCert:
    """What a client's certificate said and whether it verified."""

    subject: str
    issuer: str
    verified: bool

    def received_comment(self) -> str:
        """Postfix's spelling: ``(Client CN "x", Issuer "y" (verified OK))``."""
        state = "verified OK" if self.verified else "not verified"
        return f'(Client CN "{_clean(self.subject)}", Issuer "{_clean(self.issuer)}" ({state}))'


def _clean(text: str) -> str:
    return "".join(c if c.isprintable() and c not in '"\\()' else "?" for c in text)[:64]


def _common_name(name: x509.Name) -> str:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else name.rfc4514_string()


def _accept_any(conn: Any, cert: Any, errno: int, depth: int, ok: int) -> bool:
    return True  # verification happens after the handshake, in ClientCertPolicy.describe


class ClientCertPolicy:
    """Asks TLS clients for certificates and verifies them against ``ca_path``."""

    def __init__(self, ca_path: str, key_path: str = "email.tls.ca_path") -> None:
        self.ca_path = ca_path
        try:
            with open(ca_path, "rb") as f:
                self.roots = x509.load_pem_x509_certificates(f.read())
        except OSError as e:
            raise ConfigError(key_path, f"cannot read CA bundle: {e.strerror}: {ca_path}") from None
        except ValueError as e:
            raise ConfigError(key_path, f"invalid CA bundle {ca_path}: {e}") from None
        self.store = Store(self.roots)

    def apply(self, context_factory: Any) -> Any:
        """Make the server context ask for (not require) client certificates; returns it."""
        context: SSL.Context = context_factory.getContext()
        context.set_verify(SSL.VERIFY_PEER, _accept_any)
        context.load_client_ca(self.ca_path.encode())
        return context_factory

    def describe(self, connection: Any) -> Optional[ClientCert]:
        """The client's certificate after the handshake, or None when it sent none."""
        peer = connection.get_peer_certificate()
        if peer is None:
            return None
        leaf = peer.to_cryptography()
        # On the server side OpenSSL's "peer chain" may or may not hold the leaf.
        others = [c.to_cryptography() for c in connection.get_peer_cert_chain() or []]
        intermediates = [c for c in others if c != leaf]
        verifier = (PolicyBuilder().store(self.store)
                    .time(datetime.datetime.now(datetime.timezone.utc))
                    .build_client_verifier())
        try:
            verifier.verify(leaf, intermediates)
            verified = True
        except (VerificationError, ValueError):
            verified = False
        return ClientCert(_common_name(leaf.subject), _common_name(leaf.issuer), verified)

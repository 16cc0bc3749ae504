"""TLS of the management API: the HTTPS listener's context, with optional mutual TLS.

:func:`build_api_tls` turns ``[api]`` into Twisted ``CertificateOptions``
(TLS 1.2 or newer, the modern AEAD ciphers of :mod:`dcrouter.tlsutil`): the
configured ``tls_cert``/``tls_key``, or a self-signed certificate kept under
``state_dir/api/certs/`` for the listen address, the machine's name,
``localhost`` and the loopback addresses.  With ``tls_client_ca`` the
handshake fails unless the client presents a certificate signed by one of
those CAs.

:class:`SwitchableContext` is what the listening port holds: a reload swaps
the options inside it, so new certificates apply to the next connection
without closing the port.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from dcrouter.config.api import ApiOptions
from dcrouter.errors import ConfigError
from dcrouter.tlsutil import MODERN_CIPHERS, ensure_self_signed, load_certificate_options

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
_WILDCARD = ("0.0.0.0", "::", "")


def self_signed_names(listen: str) -> list[str]:
    """Names the self-signed API certificate is valid for."""
    names = [] if listen in _WILDCARD else [listen]
    for name in (socket.gethostname(), socket.getfqdn(), "localhost", "127.0.0.1", "::1"):
        if name and name not in names:
            names.append(name)
    return names


def self_signed_paths(state_dir: str, listen: str) -> tuple[str, str]:
    """The (created once, then kept) self-signed certificate and key for ``listen``."""
    names = self_signed_names(listen)
    directory = os.path.join(state_dir, "api")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    label = listen if listen not in _WILDCARD else "any"
    return ensure_self_signed(directory, label.replace(":", "_"), names)


def load_client_cas(path: str, key_path: str = "api.tls_client_ca") -> list[Any]:
    """The CA certificates of a PEM file (OpenSSL X509 objects); ConfigError if none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(key_path, f"cannot read {path}: {e.strerror}") from None
    marker = b"-----END CERTIFICATE-----"
    cas = []
    for chunk in data.split(marker):
        start = chunk.find(b"-----BEGIN CERTIFICATE-----")
        if start < 0:
            continue
        try:
            cas.append(ssl.Certificate.loadPEM(chunk[start:] + marker + b"\n").original)
        except Exception as e:  # pyOpenSSL raises several types for bad PEM
            raise ConfigError(key_path, f"invalid certificate in {path}: {e}") from None
    if not cas:
        raise ConfigError(key_path, f"no PEM certificate in {path}")
    return cas


def build_api_tls(options: ApiOptions, state_dir: str) -> ssl.CertificateOptions:
    """The HTTPS listener's TLS options (ConfigError naming the ``api.tls_*`` key at fault)."""
    cert_path, key_path = options.tls_cert, options.tls_key
    if not cert_path:
        cert_path, key_path = self_signed_paths(state_dir, options.listen)
    base = load_certificate_options(cert_path, key_path, options.tls_min_version,
                                    key_path_name="api.tls_cert")
    if not options.tls_client_ca:
        return base
    cas = load_client_cas(options.tls_client_ca)
    return ssl.CertificateOptions(
        privateKey=base.privateKey, certificate=base.certificate,
        extraCertChain=base.extraCertChain,
        raiseMinimumTo=_VERSIONS.get(options.tls_min_version, ssl.TLSVersion.TLSv1_2),
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(MODERN_CIPHERS),
        verify=True, caCerts=cas, requireCertificate=True,
    )


@implementer(IOpenSSLServerConnectionCreator)
class SwitchableContext:
    """A server connection creator whose TLS options a reload can replace."""

    def __init__(self, options: ssl.CertificateOptions) -> None:
        self.options = options

    def switch(self, options: ssl.CertificateOptions) -> None:
        """Use ``options`` for the connections accepted from now on."""
        self.options = options

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        """A TLS connection with the current options (Twisted asks once per connection)."""
        return self.options.serverConnectionForTLS(protocol)

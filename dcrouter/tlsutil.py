"""Certificates and TLS contexts shared by the email server, proxy and API.

* :func:`ensure_self_signed` makes (once) a self-signed certificate under the
  state directory, for the embedded defaults and the proxy's fallback.
* :func:`server_context_factory` builds a Twisted TLS context factory with a
  minimum version and modern ciphers only, and optionally TLS session tickets
  (resumption without server state; the key is random per context, so building a
  new context is how a server rotates it).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Any, Iterable, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import ssl

from dcrouter.errors import ConfigError

#: TLS 1.2 ciphers: AEAD with forward secrecy only (TLS 1.3 suites are always modern).
MODERN_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                  "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                  "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")

_VERSIONS = {
    "TLSv1.2": (SSL.TLS1_2_VERSION, ssl.TLSVersion.TLSv1_2),
    "TLSv1.3": (SSL.TLS1_3_VERSION, ssl.TLSVersion.TLSv1_3),
}


def make_self_signed(names: Iterable[str], days: int = 825,
                     key_type: str = "rsa") -> tuple[bytes, bytes]:
    """A new key (``rsa``: RSA-2048, ``ecdsa``: ECDSA P-256) and self-signed certificate for
    ``names`` (PEM bytes)."""
    names = list(names) or ["localhost"]
    key: Any = ec.generate_private_key(ec.SECP256R1()) if key_type == "ecdsa" \
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_private(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically (temp file + rename)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_private_dir(path: str) -> str:
    """Create ``path`` and every missing parent with mode 0700; return it.

    ``os.makedirs`` applies its mode to the last directory only (parents get
    0777 minus the umask, 0755 usually): here each directory this call
    creates is 0700.  Existing directories are left as they are.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(path))
        if parent == os.path.abspath(path):
            raise
        ensure_private_dir(parent)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:  # created meanwhile (another thread or worker)
            if not os.path.isdir(path):
                raise
    return path


def ensure_self_signed(state_dir: str, name: str, extra_names: Iterable[str] = (),
                       key_type: str = "rsa") -> tuple[str, str]:
    """Paths of a self-signed certificate and key for ``name`` under ``state_dir/certs``.

    Generated on first use and kept, so clients can pin it across restarts.
    """
    cert_dir = ensure_private_dir(os.path.join(state_dir, "certs"))
    safe = name.replace("*", "_wildcard_").replace("/", "_")
    cert_path = os.path.join(cert_dir, f"{safe}.crt")
    key_path = os.path.join(cert_dir, f"{safe}.key")
    if not (os.path.exists(cert_path) and os.path.exists(key_path)):
        names = [name] + [n for n in extra_names if n != name]
        cert, key = make_self_signed(names, key_type=key_type)
        write_private(key_path, key)
        write_private(cert_path, cert)
    return cert_path, key_path


def load_certificate_options(cert_path: str, key_path: str, min_version: str = "TLSv1.2",
                             ciphers: str = "", ca_path: str = "",
                             key_path_name: str = "tls", session_tickets: bool = False,
                             session_timeout: float = 0.0,
                             resumption: bool = False) -> ssl.CertificateOptions:
    """A Twisted ``CertificateOptions`` for a server with the given PEM files.

    ``session_tickets``: resumption by tickets (Twisted turns them off by default);
    OpenSSL encrypts them with a random key of this context, so a new context is a new
    ticket key. ``resumption``: tickets and a server-side session cache.
    ``session_timeout``: seconds a session stays resumable.
    Raises ConfigError (naming ``key_path_name``) for unreadable or mismatched files.
    """
    try:
        with open(cert_path, "rb") as f:
            cert_pem = f.read()
        with open(key_path, "rb") as f:
            key_pem = f.read()
    except OSError as e:
        raise ConfigError(key_path_name, f"cannot read certificate/key: {e.strerror}: "
                          f"{e.filename}") from None
    try:
        cert = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
        chain = [ssl.Certificate.loadPEM(c).original for c in _split_pem(cert_pem)[1:]]
    except Exception as e:  # pyOpenSSL raises several types for bad PEM
        raise ConfigError(key_path_name, f"invalid certificate or key: {e}") from None
    lowest = _VERSIONS.get(min_version, _VERSIONS["TLSv1.2"])[1]
    options = ssl.CertificateOptions(
        privateKey=cert.privateKey.original,
        certificate=cert.original,
        extraCertChain=chain or None,
        raiseMinimumTo=lowest,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(ciphers or MODERN_CIPHERS),
        enableSessions=resumption,
        enableSessionTickets=session_tickets or resumption,
    )
    if session_timeout:
        # the context is built now (once): its lifetime and its random ticket key with it
        options.getContext().set_timeout(int(session_timeout))
    return options


def _split_pem(data: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    parts = []
    for chunk in data.split(marker):
        if b"-----BEGIN CERTIFICATE-----" in chunk:
            parts.append(chunk[chunk.index(b"-----BEGIN"):] + marker + b"\n")
    return parts


def server_context_factory(state_dir: str, hostname: str, cert_path: str = "", key_path: str = "",
                           min_version: str = "TLSv1.2", ciphers: str = "",
                           key_path_name: str = "tls",
                           extra_names: Optional[Iterable[str]] = None,
                           session_tickets: bool = False,
                           session_timeout: float = 0.0) -> ssl.CertificateOptions:
    """Server TLS options from configured files, or the self-signed default."""
    if not cert_path:
        cert_path, key_path = ensure_self_signed(state_dir, hostname, extra_names or ())
    return load_certificate_options(cert_path, key_path, min_version, ciphers,
                                    key_path_name=key_path_name,
                                    session_tickets=session_tickets,
                                    session_timeout=session_timeout)

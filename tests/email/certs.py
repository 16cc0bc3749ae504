"""A test CA, a server and a client certificate it signs, and a client certificate it does not."""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _leaf(signing_key: Any, issuer: x509.Name, key: Any, name: str, now: datetime.datetime,
          usage: Any) -> x509.Certificate:
    """A leaf certificate for ``name`` (DNS SAN) with extended key usage ``usage``."""
    return (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                signing_key.public_key()), critical=False)
            .sign(signing_key, hashes.SHA256()))


def make_ca_and_server(directory: str, hostname: str = "mail.dcrouter.test") -> dict[str, str]:
    """Write ca.pem, server.pem and server.key into ``directory``; returns their paths."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("dcrouter test CA"))
          .issuer_name(_name("dcrouter test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hostname)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _leaf(ca_key, ca.subject, client_key, "client.test", now,
                   x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = _leaf(rogue_key, _name("rogue CA"), rogue_key, "rogue.test", now,
                  x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH)
    for name, (c, k) in {"client": (client, client_key), "rogue": (rogue, rogue_key)}.items():
        with open(os.path.join(directory, f"{name}.pem"), "wb") as f:
            f.write(c.public_bytes(serialization.Encoding.PEM))
        with open(os.path.join(directory, f"{name}.key"), "wb") as f:
            f.write(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    paths = {name: os.path.join(directory, name)
             for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key",
                          "rogue.pem", "rogue.key")}
    with open(paths["ca.pem"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["server.pem"], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["server.key"], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths

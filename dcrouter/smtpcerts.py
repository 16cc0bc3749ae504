"""The certificate the SMTP listeners present, its next key, and the TLSA digests of both.

A DANE sender (RFC 7672) checks the SMTP server's key against the
``_25._tcp.<mx> TLSA 3 1 1`` records it has cached, for up to their TTL.  So
a key may be presented only once its TLSA record has been published long
enough (:attr:`SmtpCertificates.hold`: two TTLs plus the propagation delay,
set by the DNS service, 0 when no TLSA is published) - and then the old
key's record can go.  :class:`SmtpCertificates` (one per router, in
``context.smtp_certs``) keeps that order for the two kinds of certificate:

* **self-signed** (``email.tls`` unset; ``state_dir/certs/<host>.crt``):
  a *next key* (``state_dir/dane/<host>/next.key``) exists from the start
  and its TLSA is published next to the current one; the renewal
  (:data:`RENEW_BEFORE` before expiry) makes the new certificate with that
  key - already published for months - and creates the next one;
* **configured** (``email.tls.cert_path``/``key_path``): the listeners
  present a copy (``state_dir/dane/<host>/serving.*``).  When the files
  hold a new key (seen at reload or by :meth:`check`, once a minute), its
  TLSA is published at once, the copy keeps being presented, and after
  ``hold`` since the new record was first served the copy is replaced.  A
  renewal that keeps the key (``certbot --reuse-key``) is taken at once.

:meth:`tlsa_digests` lists what to publish (SHA-256 of each key's
SubjectPublicKeyInfo, the current key first); :meth:`mark_published`
records when the DNS service first served each; both survive restarts in
``state.json``.  Listeners: ``serving`` ones (the SMTP server reloads its TLS
context) and ``digests`` ones (the DNS server republishes).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from typing import Any, Callable, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from dcrouter.logsetup import get_logger
from dcrouter.tlsutil import ensure_private_dir, ensure_self_signed, write_private

log = get_logger("smtpcerts")

#: A self-signed certificate is renewed (with the pre-published next key) this long before
#: it expires.
RENEW_BEFORE = 30 * 86400
#: Days a self-signed certificate is valid.
SELF_SIGNED_DAYS = 825


def spki_digest(key_or_cert_pem: bytes) -> str:
    """Hex SHA-256 of the SubjectPublicKeyInfo of a PEM certificate or private key (the data
    of ``TLSA 3 1 1``)."""
    public: Any
    if b"CERTIFICATE-----" in key_or_cert_pem:
        public = x509.load_pem_x509_certificate(key_or_cert_pem).public_key()
    else:
        public = serialization.load_pem_private_key(key_or_cert_pem, None).public_key()
    der = public.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _read(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _create_once(path: str, data: bytes) -> None:
    """Store ``data`` at ``path`` (0600) unless another worker process stored a file there
    first (then theirs stays, so every worker publishes the same next key)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    write_private(tmp, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


def _new_key_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _self_signed_with(key_pem: bytes, names: list[str], now: float) -> bytes:
    """A self-signed certificate for ``names`` with the given private key."""
    import ipaddress
    key = serialization.load_pem_private_key(key_pem, None)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    start = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - datetime.timedelta(minutes=5))
            .not_valid_after(start + datetime.timedelta(days=SELF_SIGNED_DAYS))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.PEM)


class SmtpCertificates:
    """The SMTP listeners' certificate and the keys whose TLSA records must be published."""

    def __init__(self, state_dir: str, clock: Callable[[], float] = time.time) -> None:
        self.state_dir = state_dir
        self.clock = clock
        #: Seconds a new key's TLSA must have been served before the key is presented.
        self.hold = 0.0
        self.hostname = ""
        self.cert_path = ""   # configured files ("" : self-signed)
        self.key_path = ""
        self.published: dict[str, float] = {}
        self.pending: Optional[str] = None
        self._serving_listeners: list[Callable[[], None]] = []
        self._digest_listeners: list[Callable[[], None]] = []
        self._digests: list[str] = []
        self._waiting_logged: Optional[str] = None

    # -- listeners ------------------------------------------------------------------
    def on_serving_change(self, callback: Callable[[], None]) -> None:
        """``callback()`` when the certificate to present changes (reload the TLS context)."""
        self._serving_listeners.append(callback)

    def on_digests_change(self, callback: Callable[[], None]) -> None:
        """``callback()`` when the TLSA digests to publish change."""
        self._digest_listeners.append(callback)

    # -- files ----------------------------------------------------------------------
    @property
    def folder(self) -> str:
        """``state_dir/dane/<host>``."""
        safe = self.hostname.replace("/", "_").replace("*", "_wildcard_") or "_"
        return os.path.join(self.state_dir, "dane", safe)

    def _copy_paths(self) -> tuple[str, str]:
        return (os.path.join(self.folder, "serving.crt"), os.path.join(self.folder, "serving.key"))

    def serving_paths(self) -> tuple[str, str]:
        """(certificate, key) files the SMTP listeners present: the configured files, or
        while TLSA records are published (``hold`` > 0) the copy that holds a new key back;
        the self-signed certificate otherwise."""
        if self.cert_path:
            copy = self._copy_paths()
            if self.hold > 0 and os.path.exists(copy[0]) and os.path.exists(copy[1]):
                return copy
            return self.cert_path, self.key_path
        return ensure_self_signed(self.state_dir, self.hostname)

    def _next_key_path(self) -> str:
        return os.path.join(self.folder, "next.key")

    def _load_state(self) -> None:
        data = _read(os.path.join(self.folder, "state.json"))
        try:
            state = json.loads(data) if data else {}
            self.published = {str(k): float(v) for k, v in state.get("published", {}).items()}
            pending = state.get("pending")
            self.pending = str(pending) if pending else None
        except (ValueError, TypeError, AttributeError) as e:
            log.warn("ignoring unreadable {path}: {error}", error=str(e),
                     path=os.path.join(self.folder, "state.json"))
            self.published, self.pending = {}, None

    def _save_state(self) -> None:
        ensure_private_dir(self.folder)
        current = set(self._compute_digests())
        data = {"published": {k: v for k, v in self.published.items() if k in current},
                "pending": self.pending}
        write_private(os.path.join(self.folder, "state.json"),
                      json.dumps(data, indent=1, sort_keys=True).encode("utf-8"))

    # -- the certificate ---------------------------------------------------------------
    def configure(self, hostname: str, cert_path: str = "", key_path: str = "") -> tuple[str, str]:
        """Take the configuration (start, reload); return the files to present.

        Blocking file I/O (small files; key generation the first time).
        """
        hostname = hostname.lower().rstrip(".")
        changed_host = hostname != self.hostname
        self.hostname, self.cert_path, self.key_path = hostname, cert_path, key_path
        if changed_host:
            self._load_state()
        self._refresh(self.clock())
        return self.serving_paths()

    def _refresh(self, now: float) -> bool:
        """Bring the files up to date at ``now``; True when the presented key changed."""
        switched = False
        if self.cert_path:
            switched = self._refresh_configured(now)
        else:
            switched = self._refresh_self_signed(now)
        digests = self._compute_digests()
        if digests != self._digests:
            self._digests = digests
            self._save_state()
            for callback in list(self._digest_listeners):
                callback()
        return switched

    def _refresh_configured(self, now: float) -> bool:
        cert_out, key_out = self._copy_paths()
        if self.hold <= 0:  # no TLSA published: the configured files are presented as they are
            self.pending = None
            for path in (cert_out, key_out):
                if os.path.exists(path):
                    os.unlink(path)
            return False
        cert, key = _read(self.cert_path), _read(self.key_path)
        if cert is None or key is None:
            return False  # the SMTP server reports unreadable files
        served_cert, served_key = _read(cert_out), _read(key_out)
        try:
            new = spki_digest(key)
            if new != spki_digest(cert):
                return False  # a pair being replaced (or a mismatch the SMTP server reports)
            served = spki_digest(served_key) if served_key and served_cert else None
        except (ValueError, TypeError):
            return False
        if served is None or served == new:
            self.pending = None  # the first copy, or a renewal that kept the key: at once
            if (served_cert, served_key) != (cert, key):
                ensure_private_dir(self.folder)
                write_private(key_out, key)
                write_private(cert_out, cert)
                return served is not None  # a renewed certificate: present it now
            return False
        if self.pending != new:
            self.pending = new
            self._save_state()
            log.info("new SMTP key for {host}: its TLSA is published now, presented after "
                     "{hold:.0f} s", host=self.hostname, hold=self.hold)
        since = self.published.get(new)
        if since is not None and now >= since + self.hold:
            ensure_private_dir(self.folder)
            write_private(key_out, key)
            write_private(cert_out, cert)
            self.pending = None
            log.info("SMTP listeners of {host} now present the new key", host=self.hostname)
            return True
        return False

    def _refresh_self_signed(self, now: float) -> bool:
        cert_path, key_path = self.serving_paths()
        next_path = self._next_key_path()
        if _read(next_path) is None:
            ensure_private_dir(self.folder)
            _create_once(next_path, _new_key_pem())
        cert = _read(cert_path)
        if cert is None:
            return False
        try:
            expires = x509.load_pem_x509_certificate(cert).not_valid_after_utc.timestamp()
        except ValueError:
            expires = 0.0
        if expires - now > RENEW_BEFORE:
            return False
        next_key = _read(next_path) or b""
        digest = spki_digest(next_key)
        since = self.published.get(digest)
        if self.hold > 0 and (since is None or now < since + self.hold):
            if self._waiting_logged != digest:
                self._waiting_logged = digest
                log.info("self-signed SMTP certificate of {host} due for renewal: waiting "
                         "until the next key's TLSA has been published {hold:.0f} s",
                         host=self.hostname, hold=self.hold)
            return False
        names = self._names(cert)
        write_private(key_path, next_key)
        write_private(cert_path, _self_signed_with(next_key, names, now))
        os.unlink(next_path)
        _create_once(next_path, _new_key_pem())
        log.info("self-signed SMTP certificate of {host} renewed with its pre-published key",
                 host=self.hostname)
        return True

    def _names(self, cert_pem: bytes) -> list[str]:
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = [str(n.value) for n in san]
        except (ValueError, x509.ExtensionNotFound):
            names = []
        return names or [self.hostname]

    # -- DANE ------------------------------------------------------------------------------
    def _compute_digests(self) -> list[str]:
        if not self.hostname:
            return []
        out: list[str] = []
        cert_path, key_path = self.serving_paths()
        for path in (key_path, self.key_path if self.pending else "",
                     "" if self.cert_path else self._next_key_path()):
            data = _read(path) if path else None
            if data is None:
                continue
            try:
                digest = spki_digest(data)
            except (ValueError, TypeError):
                continue
            if digest not in out:
                out.append(digest)
        return out

    def tlsa_digests(self) -> list[str]:
        """Hex digests for ``TLSA 3 1 1``: the presented key, then a pending or next key."""
        return list(self._digests)

    def mark_published(self, digests: list[str], now: float) -> None:
        """The DNS service serves TLSA records of ``digests`` from ``now`` (or earlier)."""
        new = [d for d in digests if d not in self.published]
        for digest in new:
            self.published[digest] = now
        if new and self.hostname:
            self._save_state()

    def check(self, now: Optional[float] = None) -> bool:
        """Time or files moved on: switch a pending key or renew; True when the presented
        certificate changed (serving listeners have been told)."""
        if not self.hostname:
            return False
        switched = self._refresh(self.clock() if now is None else now)
        if switched:
            for callback in list(self._serving_listeners):
                callback()
        return switched

    def next_check(self, now: float) -> Optional[float]:
        """When :meth:`check` can next change something by time alone (None: only file
        changes, seen by the periodic check)."""
        if not self.hostname:
            return None
        times = []
        if self.pending and self.pending in self.published:
            times.append(self.published[self.pending] + self.hold)
        if not self.cert_path:
            cert = _read(self.serving_paths()[0])
            if cert is not None:
                try:
                    expires = x509.load_pem_x509_certificate(cert).not_valid_after_utc
                    times.append(expires.timestamp() - RENEW_BEFORE)
                except ValueError:
                    pass
        future = [t for t in times if t > now]
        return min(future) if future else None

    def status(self) -> dict[str, Any]:
        """For the API and stats: host, digests, pending key, publication times."""
        return {"hostname": self.hostname, "configured": bool(self.cert_path),
                "tlsa_3_1_1": self.tlsa_digests(), "pending": self.pending,
                "published": dict(self.published), "hold": self.hold}

"""DKIM keys: where signing keys live and the DNS records that publish them.

The delivery system signs with these keys; the DNS server publishes
``<selector>._domainkey.<domain>`` TXT records from the same store, so the
two can never disagree.  Keys are RSA-2048, generated into
``state_dir/dkim/<domain>/<selector>.key`` (mode 0600, directories 0700), or
taken from a configured path.  Only the configured signing identities
(:mod:`dcrouter.dkimpolicy`) are created, by :meth:`DkimKeyStore.ensure` at
start and on reload; looking a key up never creates one unless asked to.
"""

from __future__ import annotations

import base64
import os
import re
import stat
import threading
from typing import Any, Callable, Iterable, Optional

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from dcrouter.errors import ConfigError, DcRouterError
from dcrouter.logsetup import get_logger
from dcrouter.tlsutil import ensure_private_dir

log = get_logger("dkim")

_SAFE = re.compile(r"^[A-Za-z0-9.\-_]+$")
DEFAULT_SELECTOR = "dcrouter"


class DkimKey:
    """One signing key: domain, selector, the PEM private key and its DNS record."""

    def __init__(self, domain: str, selector: str, private_pem: bytes, path: str) -> None:
        self.domain = domain
        self.selector = selector
        self.private_pem = private_pem
        self.path = path

    @property
    def record_name(self) -> str:
        """``<selector>._domainkey.<domain>``."""
        return f"{self.selector}._domainkey.{self.domain}"

    def public_record(self) -> str:
        """The TXT record value: ``v=DKIM1; k=rsa; p=<base64 DER SubjectPublicKeyInfo>``."""
        key = serialization.load_pem_private_key(self.private_pem, password=None)
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"


class DkimKeyStore:
    """Finds, loads and generates DKIM keys under ``state_dir/dkim``.

    Thread-safe so key generation can run in a worker thread (it takes
    ~100 ms, too long for the reactor thread).
    """

    def __init__(self, state_dir: str) -> None:
        self.root = os.path.join(state_dir, "dkim")
        self._keys: dict[tuple[str, str], DkimKey] = {}
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (in the reactor thread) whenever a key is added."""
        self._listeners.append(callback)

    def _notify(self) -> None:
        from twisted.python import threadable
        if self._listeners and not threadable.isInIOThread():
            # generated in a worker thread (deferToThread): tell listeners in the reactor thread
            from twisted.internet import reactor
            reactor.callFromThread(self._notify)  # type: ignore[attr-defined]
            return
        for callback in list(self._listeners):
            callback()

    def path_for(self, domain: str, selector: str = DEFAULT_SELECTOR) -> str:
        """Where the generated key for (domain, selector) lives."""
        domain = domain.lower().rstrip(".")
        if not _SAFE.match(domain) or not _SAFE.match(selector) or ".." in domain:
            raise ConfigError("dkim", f"unsafe DKIM domain or selector: {domain!r} {selector!r}")
        return os.path.join(self.root, domain, f"{selector}.key")

    def get(self, domain: str, selector: str = DEFAULT_SELECTOR,
            private_key_path: str = "", private_key: str = "", create: bool = False
            ) -> Optional[DkimKey]:
        """The key for (domain, selector): cached, configured, on disk, or (``create``) new.

        Blocking (file I/O, maybe key generation): call through
        ``deferToThread`` from the reactor thread when the key may not be cached.
        """
        domain = domain.lower().rstrip(".")
        with self._lock:
            cached = self._keys.get((domain, selector))
            if cached is not None:
                return cached
            created = False
            if private_key:
                pem, path = private_key.encode("ascii"), ""
            elif private_key_path:
                try:
                    with open(private_key_path, "rb") as f:
                        pem = f.read()
                except OSError as e:
                    raise ConfigError("dkim_options.private_key_path",
                                      f"cannot read {private_key_path}: {e.strerror}") from None
                path = private_key_path
            else:
                path = self.path_for(domain, selector)
                if os.path.exists(path):
                    with open(path, "rb") as f:
                        pem = f.read()
                elif not create:
                    return None
                else:
                    ensure_private_dir(os.path.dirname(path))
                    pem = _create_once(path, generate_private_key_pem())
                    created = True
            key = DkimKey(domain, selector, pem, path)
            self._keys[(domain, selector)] = key
        if created:
            self._notify()
        return key

    def ensure(self, identities: Iterable[Any]) -> set[tuple[str, str]]:
        """Load or create the key of every configured identity (blocking: in a thread).

        ``identities`` have ``domain``, ``selector``, ``private_key_path`` and
        ``private_key`` (:class:`dcrouter.dkimpolicy.SigningIdentity`).  Returns the
        ``(domain, selector)`` names now usable; the others are logged.  Also tightens
        ``state_dir/dkim`` and its domain folders to 0700 (older versions left them 0755).
        """
        self.tighten()
        ready: set[tuple[str, str]] = set()
        for identity in identities:
            try:
                key = self.get(identity.domain, identity.selector,
                               private_key_path=identity.private_key_path,
                               private_key=identity.private_key, create=True)
            except (ConfigError, OSError, ValueError) as e:
                log.error("cannot load the DKIM key {selector}._domainkey.{domain}: {error}",
                          domain=identity.domain, selector=identity.selector, error=str(e))
                continue
            if key is not None:
                ready.add((key.domain, key.selector))
        return ready

    def tighten(self) -> None:
        """Make ``state_dir/dkim`` and the folders in it 0700 when they are ours and wider."""
        if not os.path.isdir(self.root):
            return
        folders = [self.root] + [os.path.join(self.root, name) for name in os.listdir(self.root)]
        for folder in folders:
            try:
                st = os.lstat(folder)
                if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o077 and st.st_uid == os.geteuid():
                    os.chmod(folder, 0o700)
                    log.warn("{folder} was mode {mode:o}: now 0700 (it holds private keys)",
                             folder=folder, mode=stat.S_IMODE(st.st_mode))
            except OSError as e:
                log.error("cannot check the mode of {folder}: {error}", folder=folder,
                          error=e.strerror)

    def known_keys(self) -> list[DkimKey]:
        """Every key generated or configured so far, plus those found on disk."""
        if os.path.isdir(self.root):
            for domain in sorted(os.listdir(self.root)):
                folder = os.path.join(self.root, domain)
                if not os.path.isdir(folder):
                    continue
                for name in sorted(os.listdir(folder)):
                    if name.endswith(".key"):
                        try:
                            self.get(domain, name[:-4], create=False)
                        except (ConfigError, OSError):
                            continue
        with self._lock:
            return list(self._keys.values())

    def forget(self, domain: str, selector: str = DEFAULT_SELECTOR) -> None:
        """Drop a cached key (after rotation on disk)."""
        with self._lock:
            self._keys.pop((domain.lower().rstrip("."), selector), None)
        self._notify()


def _create_once(path: str, pem: bytes) -> bytes:
    """Store a new key at ``path`` unless another process (worker) stored one first.

    Returns the key that is on disk, so every worker signs with the key DNS publishes.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic, and fails if the name exists
    except FileExistsError:
        with open(path, "rb") as f:
            pem = f.read()
    finally:
        os.unlink(tmp)
    return pem


def generate_private_key_pem(bits: int = 2048) -> bytes:
    """A new RSA private key in PKCS#1 PEM (what dkimpy expects)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


#: Headers signed when present (RFC 6376 section 5.4.1 recommendations).
SIGNED_HEADERS = (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to",
                  b"in-reply-to", b"references", b"mime-version", b"content-type",
                  b"content-transfer-encoding", b"list-id", b"list-unsubscribe")


class DkimSignError(DcRouterError):
    """A message could not be signed (no From: header, a key dkimpy refuses, ...)."""


def sign_message(message: bytes, key: DkimKey) -> bytes:
    """The ``DKIM-Signature:`` header line (with CRLF) for ``message`` signed with ``key``.

    Relaxed/relaxed canonicalisation, rsa-sha256. CPU-bound (a few ms):
    call it in a thread for large messages.  Raises :class:`DkimSignError`
    (never a dkimpy exception) when the message cannot be signed - for one,
    without a ``From:`` header, which RFC 6376 5.4 requires to be signed.
    """
    import dkim  # dkimpy

    present = {line.split(b":", 1)[0].strip().lower()
               for line in message.split(b"\r\n\r\n", 1)[0].split(b"\r\n") if b":" in line}
    if b"from" not in present:
        raise DkimSignError("no From: header to sign")
    include = [h for h in SIGNED_HEADERS if h in present]
    try:
        signature = dkim.sign(message, key.selector.encode("ascii"), key.domain.encode("ascii"),
                              key.private_pem, canonicalize=(b"relaxed", b"relaxed"),
                              include_headers=include, linesep=b"\r\n")
    except (dkim.DKIMException, ValueError, TypeError) as e:   # ParameterError, KeyFormatError
        raise DkimSignError(f"{type(e).__name__}: {e}") from None
    return bytes(signature)

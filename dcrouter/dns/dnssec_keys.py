"""DNSSEC keys of the signed zones, on disk under ``state_dir/dnssec/<zone>/``.

Every key is a pair of files in the format BIND, ldns and Knot's importers
read (``K<zone>.+<alg>+<tag>.private``, mode 0600, and ``.key`` with the
DNSKEY record), so an operator can take the keys to another signer or check
dcrouter's zone with ``ldns-signzone``/``dnssec-signzone``.  Each zone's
``keys.json`` (0600) holds the timeline of its keys
(:class:`~dcrouter.dns.rollover.KeyTimes`); directories are 0700.

Several worker processes share the files: :meth:`DnssecKeyStore.locked`
takes an exclusive ``flock`` on the zone's ``lock`` file while a worker reads,
advances and writes the timeline, so one of them creates each new key and
the others read it.  Algorithms: ECDSA P-256 with SHA-256 (13) and Ed25519
(15), the two RFC 8624 asks every validator to support.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import json
import os
import re
from typing import Any, Iterator, Optional, Union

import dns.dnssec
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from dcrouter.dns.rollover import KeyTimes
from dcrouter.errors import DcRouterError
from dcrouter.logsetup import get_logger
from dcrouter.tlsutil import ensure_private_dir, write_private

log = get_logger("dns.dnssec")

ECDSAP256SHA256 = 13
ED25519 = 15
ALGORITHMS = {"ECDSAP256SHA256": ECDSAP256SHA256, "ED25519": ED25519}
ALGORITHM_NAMES = {v: k for k, v in ALGORITHMS.items()}
ZONE_FLAGS = 256
SEP_FLAGS = 257
_SAFE = re.compile(r"^[a-z0-9._-]*$")

PrivateKey = Union[ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey]


class DnssecKeyError(DcRouterError):
    """A key file or the key timeline cannot be read or written."""


@dataclasses.dataclass
class DnssecKey:
    """One key: its timeline, private key and DNSKEY record."""

    times: KeyTimes
    private: PrivateKey
    dnskey: Any  # dns.rdtypes.ANY.DNSKEY.DNSKEY

    @property
    def tag(self) -> int:
        """The key tag (RFC 4034 appendix B)."""
        return self.times.tag

    @property
    def is_ksk(self) -> bool:
        """A key-signing key (SEP flag)."""
        return self.times.role == "ksk"

    def ds(self, origin: str, digest: str = "SHA256") -> Any:
        """The DS record of this key for ``origin`` (what the registrar gets)."""
        return dns.dnssec.make_ds(dns.name.from_text(origin or "."), self.dnskey, digest)


def generate_private(algorithm: int) -> PrivateKey:
    """A new private key of ``algorithm`` (13 or 15)."""
    if algorithm == ECDSAP256SHA256:
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    raise DnssecKeyError(f"unsupported DNSSEC algorithm {algorithm}")


def private_to_bind(private: PrivateKey, algorithm: int) -> str:
    """The BIND v1.3 private-key file text (what ldns and BIND tools read)."""
    if isinstance(private, ec.EllipticCurvePrivateKey):
        raw = private.private_numbers().private_value.to_bytes(32, "big")
    else:
        from cryptography.hazmat.primitives import serialization
        raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
    name = ALGORITHM_NAMES.get(algorithm, str(algorithm))
    return (f"Private-key-format: v1.3\nAlgorithm: {algorithm} ({name})\n"
            f"PrivateKey: {base64.b64encode(raw).decode('ascii')}\n")


def private_from_bind(text: str) -> tuple[int, PrivateKey]:
    """Parse a BIND private-key file of algorithm 13 or 15."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip().lower()] = value.strip()
    try:
        algorithm = int(fields["algorithm"].split()[0])
        raw = base64.b64decode(fields["privatekey"], validate=True)
    except (KeyError, ValueError, IndexError) as e:
        raise DnssecKeyError(f"not a BIND private-key file: {e}") from None
    if len(raw) != 32:
        raise DnssecKeyError(f"private key of {len(raw)} bytes (expected 32)")
    if algorithm == ECDSAP256SHA256:
        return algorithm, ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
    if algorithm == ED25519:
        return algorithm, ed25519.Ed25519PrivateKey.from_private_bytes(raw)
    raise DnssecKeyError(f"unsupported DNSSEC algorithm {algorithm}")


def make_dnskey(private: PrivateKey, algorithm: int, ksk: bool) -> Any:
    """The DNSKEY rdata of ``private``."""
    return dns.dnssec.make_dnskey(private.public_key(), algorithm,
                                  flags=SEP_FLAGS if ksk else ZONE_FLAGS)


class DnssecKeyStore:
    """The key files and timelines of every signed zone under ``state_dir/dnssec``.

    Blocking (file I/O, key generation): call from a thread, or at start-up.
    """

    def __init__(self, state_dir: str) -> None:
        self.root = os.path.join(state_dir, "dnssec")
        self._private: dict[tuple[str, str], PrivateKey] = {}

    def folder(self, origin: str) -> str:
        """``state_dir/dnssec/<origin>`` (the root zone: ``_root``)."""
        if not _SAFE.match(origin) or ".." in origin:
            raise DnssecKeyError(f"unsafe zone name for a key folder: {origin!r}")
        return os.path.join(self.root, origin or "_root")

    @contextlib.contextmanager
    def locked(self, origin: str) -> Iterator[None]:
        """Hold the zone's lock (other processes wait) while the timeline is changed."""
        folder = ensure_private_dir(self.folder(origin))
        fd = os.open(os.path.join(folder, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def load_times(self, origin: str) -> list[KeyTimes]:
        """The zone's key timeline (empty when it has no keys yet)."""
        path = os.path.join(self.folder(origin), "keys.json")
        try:
            with open(path, "r", encoding="utf-8") as f:
                data = json.load(f)
            return [KeyTimes.from_dict(k) for k in data["keys"]]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DnssecKeyError(f"cannot read {path}: {e}") from None

    def save_times(self, origin: str, keys: list[KeyTimes]) -> None:
        """Write the timeline (atomically, 0600)."""
        folder = ensure_private_dir(self.folder(origin))
        data = {"zone": origin + ".", "keys": [k.as_dict() for k in keys]}
        write_private(os.path.join(folder, "keys.json"),
                      json.dumps(data, indent=1, sort_keys=True).encode("utf-8"))

    def base_name(self, origin: str, algorithm: int, tag: int) -> str:
        """``K<zone>.+<alg>+<tag>`` (BIND's file name, without extension)."""
        return f"K{origin or ''}.+{algorithm:03d}+{tag:05d}"

    def create(self, origin: str, role: str, algorithm: int, taken: set[int]) -> tuple[
            int, PrivateKey]:
        """Generate a key whose tag no key of the zone has; write its files; return
        (tag, private key)."""
        for _ in range(100):
            private = generate_private(algorithm)
            dnskey = make_dnskey(private, algorithm, role == "ksk")
            tag = dns.dnssec.key_id(dnskey)
            if tag not in taken:
                break
        else:  # pragma: no cover - 100 collisions in a 16-bit space
            raise DnssecKeyError("no free key tag")
        folder = ensure_private_dir(self.folder(origin))
        base = os.path.join(folder, self.base_name(origin, algorithm, tag))
        write_private(base + ".private", private_to_bind(private, algorithm).encode("ascii"))
        kind = "key-signing" if role == "ksk" else "zone-signing"
        write_private(base + ".key", (
            f"; This is a {kind} key, keyid {tag}, for {origin}.\n"
            f"{origin}. IN DNSKEY {dnskey.to_text()}\n").encode("ascii"))
        self._private[(origin, base)] = private
        log.info("new DNSSEC {role} {tag} for {zone}", role=role.upper(), tag=tag,
                 zone=origin, algorithm=algorithm)
        return tag, private

    def load_key(self, origin: str, times: KeyTimes) -> DnssecKey:
        """The private key and DNSKEY of one timeline entry."""
        base = os.path.join(self.folder(origin), self.base_name(origin, times.algorithm,
                                                                times.tag))
        private = self._private.get((origin, base))
        if private is None:
            try:
                with open(base + ".private", "r", encoding="ascii") as f:
                    algorithm, private = private_from_bind(f.read())
            except OSError as e:
                raise DnssecKeyError(f"cannot read {base}.private: {e.strerror}") from None
            if algorithm != times.algorithm:
                raise DnssecKeyError(f"{base}.private holds algorithm {algorithm}")
            self._private[(origin, base)] = private
        dnskey = make_dnskey(private, times.algorithm, times.role == "ksk")
        if dns.dnssec.key_id(dnskey) != times.tag:
            raise DnssecKeyError(f"{base}.private does not have key tag {times.tag}")
        return DnssecKey(times, private, dnskey)

    def delete(self, origin: str, times: KeyTimes) -> None:
        """Remove the files of a key the timeline dropped."""
        base = os.path.join(self.folder(origin), self.base_name(origin, times.algorithm,
                                                                times.tag))
        for ext in (".private", ".key"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(base + ext)
        self._private.pop((origin, base), None)


def parse_dnskey(text: str) -> Any:
    """A DNSKEY rdata from presentation text (tests and the API)."""
    return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.DNSKEY, text)


def ds_text(origin: str, key: DnssecKey, digest: str = "SHA256") -> str:
    """``<zone>. IN DS <tag> <alg> <digest type> <digest>``, one line."""
    return f"{origin}. IN DS {key.ds(origin, digest).to_text()}"



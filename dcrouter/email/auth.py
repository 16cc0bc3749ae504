"""SMTP AUTH for the inbound server: password hashes, twisted.cred checkers, rate limits.

* :func:`verify_password` compares a password with a stored value that may be
  plain text or one of ``{SCRYPT}``, ``{SHA512-CRYPT}``, ``{SSHA512}`` (the
  Dovecot spellings), always in constant time; :func:`hash_password` makes them.
* :class:`ConfigUserChecker` is a ``twisted.cred`` checker over ``email.auth.users``;
  an unknown user name costs one verification of :func:`dummy_stored_password`,
  the same work as a known one.
* :class:`XOAuth2Credentials` carries SASL XOAUTH2 user and token to a checker
  that users plug in (``email.auth.checker = "module:Class"`` or
  ``Extensions.auth_checkers``).
* :func:`build_portal` puts the checkers behind one :class:`twisted.cred.portal.Portal`.
* :class:`AuthFailureLimiter` counts failed attempts per client IP.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import importlib
import os
import time
import warnings
from typing import Any, Callable, Iterable, Optional

from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, threads
from zope.interface import Interface, implementer

from dcrouter.config.email import EmailAuthOptions, UserOptions
from dcrouter.errors import ConfigError
from dcrouter.interfaces import IXOAuth2Credentials

# -- password hashes -------------------------------------------------------------

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 16384, 8, 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, scheme: str = "SCRYPT") -> str:
    """A stored form of ``password``: ``{SCRYPT}``, ``{SSHA512}`` or ``{SHA512-CRYPT}``.

    For the configuration: ``python -m dcrouter hash-password`` (reads the password from a
    prompt or stdin and prints this).
    """
    secret = password.encode("utf-8")
    if scheme == "SCRYPT":
        salt = os.urandom(16)
        digest = hashlib.scrypt(secret, salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P,
                                dklen=32)
        return f"{{SCRYPT}}${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"
    if scheme == "SSHA512":
        salt = os.urandom(16)
        return "{SSHA512}" + _b64(hashlib.sha512(secret + salt).digest() + salt)
    if scheme == "SHA512-CRYPT":
        crypt = _crypt_module()
        return "{SHA512-CRYPT}" + crypt.crypt(password, crypt.mksalt(crypt.METHOD_SHA512))
    raise ValueError(f"unknown password scheme {scheme!r}")


def _crypt_module() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt
    return crypt


def is_hashed(stored: str) -> bool:
    """True when ``stored`` names a hash scheme (costly to verify: use a thread)."""
    return stored.upper().startswith(("{SCRYPT}", "{SHA512-CRYPT}", "{SSHA512}"))


def check_stored_password(stored: str, path: str) -> None:
    """Raise ConfigError when a hashed ``stored`` value is malformed."""
    upper = stored.upper()
    try:
        if upper.startswith("{SCRYPT}"):
            _, n, r, p, salt, digest = stored[len("{SCRYPT}"):].split("$")
            int(n), int(r), int(p)
            base64.b64decode(salt, validate=True), base64.b64decode(digest, validate=True)
        elif upper.startswith("{SSHA512}"):
            raw = base64.b64decode(stored[len("{SSHA512}"):], validate=True)
            if len(raw) <= 64:
                raise ValueError("too short")
        elif upper.startswith("{SHA512-CRYPT}"):
            if not stored[len("{SHA512-CRYPT}"):].startswith("$6$"):
                raise ValueError("must start with $6$")
    except ValueError as e:
        raise ConfigError(path, f"malformed password hash: {e}") from None


def verify_password(stored: str, given: str) -> bool:
    """True when ``given`` matches ``stored`` (plain or hashed); constant-time compare."""
    secret = given.encode("utf-8")
    upper = stored.upper()
    try:
        if upper.startswith("{SCRYPT}"):
            _, n, r, p, salt_b64, digest_b64 = stored[len("{SCRYPT}"):].split("$")
            expected = base64.b64decode(digest_b64)
            got = hashlib.scrypt(secret, salt=base64.b64decode(salt_b64), n=int(n), r=int(r),
                                 p=int(p), dklen=len(expected), maxmem=256 * 1024 * 1024)
            return hmac.compare_digest(got, expected)
        if upper.startswith("{SSHA512}"):
            raw = base64.b64decode(stored[len("{SSHA512}"):])
            digest, salt = raw[:64], raw[64:]
            return hmac.compare_digest(hashlib.sha512(secret + salt).digest(), digest)
        if upper.startswith("{SHA512-CRYPT}"):
            crypted = stored[len("{SHA512-CRYPT}"):]
            got_s = _crypt_module().crypt(given, crypted) or ""
            return hmac.compare_digest(got_s.encode(), crypted.encode())
    except (ValueError, TypeError):
        return False
    if upper.startswith("{PLAIN}"):
        stored = stored[len("{PLAIN}"):]
    return hmac.compare_digest(stored.encode("utf-8"), secret)


def _scheme_of(stored: str) -> tuple[Any, ...]:
    """What verifying ``stored`` costs: its scheme and the parameters that set the work."""
    upper = stored.upper()
    try:
        if upper.startswith("{SCRYPT}"):
            _, n, r, p, salt, digest = stored[len("{SCRYPT}"):].split("$")
            return ("SCRYPT", int(n), int(r), int(p), len(base64.b64decode(salt)),
                    len(base64.b64decode(digest)))
        if upper.startswith("{SHA512-CRYPT}"):
            parts = stored[len("{SHA512-CRYPT}"):].split("$")
            rounds = int(parts[2][len("rounds="):]) if len(parts) > 2 and \
                parts[2].startswith("rounds=") else 0
            return ("SHA512-CRYPT", rounds)
        if upper.startswith("{SSHA512}"):
            return ("SSHA512", len(base64.b64decode(stored[len("{SSHA512}"):])) - 64)
    except (ValueError, TypeError):
        pass
    if upper.startswith("{PLAIN}"):
        stored = stored[len("{PLAIN}"):]
    return ("PLAIN", len(stored.encode("utf-8")))


#: Costliest first: breaks ties between equally common schemes.
_COST_ORDER = ("SCRYPT", "SHA512-CRYPT", "SSHA512", "PLAIN")


def dummy_stored_password(stored_values: Iterable[str]) -> Optional[str]:
    """A stored value no password matches whose verification costs what the configured
    users' does: the most common scheme among ``stored_values`` with the same parameters
    (scrypt N/r/p and lengths, SHA-512-crypt rounds, salt length).  None without users.

    Verified for unknown user names, so they take as long as known ones (no timing oracle).
    """
    kinds = collections.Counter(_scheme_of(v) for v in stored_values)
    if not kinds:
        return None
    kind = max(kinds, key=lambda k: (kinds[k], -_COST_ORDER.index(k[0])))
    scheme = kind[0]
    if scheme == "SCRYPT":
        _, n, r, p, salt_len, digest_len = kind
        return (f"{{SCRYPT}}${n}${r}${p}${_b64(os.urandom(salt_len))}"
                f"${_b64(os.urandom(digest_len))}")
    if scheme == "SHA512-CRYPT":
        crypt = _crypt_module()
        salt = crypt.mksalt(crypt.METHOD_SHA512, rounds=kind[1] or None)
        return "{SHA512-CRYPT}" + crypt.crypt(_b64(os.urandom(24)), salt)
    if scheme == "SSHA512":
        return "{SSHA512}" + _b64(os.urandom(64 + max(0, kind[1])))
    return "{PLAIN}" + _b64(os.urandom(max(1, kind[1])))[:max(1, kind[1])]


# -- credentials and checkers --------------------------------------------------------

@implementer(IXOAuth2Credentials)
class XOAuth2Credentials:
    """SASL XOAUTH2 credentials (``user=...^Aauth=Bearer ...^A^A``)."""

    def __init__(self, username: bytes, token: bytes) -> None:
        self.username = username
        self.token = token

    @classmethod
    def parse(cls, response: bytes) -> "XOAuth2Credentials":
        """Parse the decoded client response; raise ValueError when malformed."""
        user = token = None
        for part in response.split(b"\x01"):
            if part.startswith(b"user="):
                user = part[5:]
            elif part.lower().startswith(b"auth=bearer "):
                token = part[12:]
        if not user or token is None:
            raise ValueError("malformed XOAUTH2 response")
        return cls(user, token)


@implementer(ICredentialsChecker)
class ConfigUserChecker:
    """Checks user name + password against ``email.auth.users`` (plain or hashed).

    Hash verification (scrypt, SHA-512 crypt) runs in a thread so the reactor
    never waits on it.  An unknown user name costs the same work as a known
    one: its password is verified against :func:`dummy_stored_password` (the
    configured users' scheme and parameters), in the same thread pool, and
    then refused - so the answer's timing does not tell which names exist.
    """

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, users: Iterable[UserOptions]) -> None:
        self.users = {u.username: u.password for u in users}
        self.dummy = dummy_stored_password(self.users.values())

    def requestAvatarId(self, creds: Any) -> defer.Deferred:
        """Check the credentials; fires with the avatar id or fails with UnauthorizedLogin."""
        username = creds.username.decode("utf-8", "replace") \
            if isinstance(creds.username, bytes) else creds.username
        password = creds.password.decode("utf-8", "replace") \
            if isinstance(creds.password, bytes) else creds.password
        stored = self.users.get(username)
        known = stored is not None
        if stored is None:
            stored = self.dummy
            if stored is None:   # no users at all: there is no name to find out about
                return defer.fail(error.UnauthorizedLogin())

        def result(ok: bool) -> Any:
            if ok and known:
                return username
            raise error.UnauthorizedLogin()

        if is_hashed(stored):
            d = threads.deferToThread(verify_password, stored, password)
        else:
            d = defer.succeed(verify_password(stored, password))
        return d.addCallback(result)


@implementer(ICredentialsChecker)
class ChainedChecker:
    """Tries several checkers for the same credential interface in order."""

    def __init__(self, checkers: list[Any]) -> None:
        self.checkers = checkers
        self.credentialInterfaces = tuple({i for c in checkers for i in c.credentialInterfaces})

    @defer.inlineCallbacks
    def requestAvatarId(self, creds: Any) -> Any:
        """Check the credentials; fires with the avatar id or fails with UnauthorizedLogin."""
        for checker in self.checkers:
            if not any(i.providedBy(creds) for i in checker.credentialInterfaces):
                continue
            try:
                avatar = yield defer.maybeDeferred(checker.requestAvatarId, creds)
            except error.UnauthorizedLogin:
                continue
            return avatar
        raise error.UnauthorizedLogin()


class ISmtpUser(Interface):
    """The avatar interface of an authenticated SMTP client (its user name)."""


@implementer(IRealm)
class SmtpRealm:
    """Maps an avatar id to itself: the server only needs the user name."""

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple:
        """The avatar is the user name."""
        name = avatarId.decode("utf-8", "replace") if isinstance(avatarId, bytes) else avatarId
        return (ISmtpUser, str(name), lambda: None)


def load_checker(spec: str, path: str = "email.auth.checker") -> Any:
    """Instantiate ``module:Class`` (no arguments); ConfigError when it cannot be loaded."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(path, f"expected 'module:Class', got {spec!r}")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(path, f"cannot load {spec!r}: {e}") from None
    checker = cls()
    if not ICredentialsChecker.providedBy(checker) and not hasattr(checker, "requestAvatarId"):
        raise ConfigError(path, f"{spec!r} is not a twisted.cred credentials checker")
    return checker


def build_portal(options: EmailAuthOptions, extra_checkers: Iterable[Any] = ()) -> Portal:
    """A Portal over the configured users, ``options.checker`` and ``extra_checkers``."""
    for i, user in enumerate(options.users):
        check_stored_password(user.password, f"email.auth.users[{i}].password")
    checkers: list[Any] = [ConfigUserChecker(options.users)]
    if options.checker:
        checkers.append(load_checker(options.checker))
    checkers.extend(extra_checkers)
    by_interface: dict[Any, list[Any]] = collections.defaultdict(list)
    for checker in checkers:
        for iface in checker.credentialInterfaces:
            by_interface[iface].append(checker)
    portal = Portal(SmtpRealm())
    for iface, group in by_interface.items():
        chained = group[0] if len(group) == 1 else ChainedChecker(group)
        portal.checkers[iface] = chained
    return portal


# -- rate limiting -------------------------------------------------------------------

class AuthFailureLimiter:
    """Failed AUTH attempts per client IP in a sliding minute."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic,
                 window: float = 60.0) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self.window = window
        self._failures: dict[str, collections.deque[float]] = {}

    def _recent(self, ip: str) -> Optional[collections.deque[float]]:
        q = self._failures.get(ip)
        if q is None:
            return None
        cutoff = self.clock() - self.window
        while q and q[0] < cutoff:
            q.popleft()
        if not q:
            del self._failures[ip]
            return None
        return q

    def record_failure(self, ip: str) -> bool:
        """Count a failure; True when ``ip`` has now reached its limit."""
        q = self._recent(ip)
        if q is None:
            q = self._failures[ip] = collections.deque()
        q.append(self.clock())
        if len(self._failures) > 100000:
            self._prune()
        return len(q) >= self.per_minute

    def blocked(self, ip: str) -> bool:
        """True while ``ip`` has used up its failures for the current window."""
        q = self._recent(ip)
        return q is not None and len(q) >= self.per_minute

    def _prune(self) -> None:
        for ip in list(self._failures):
            self._recent(ip)

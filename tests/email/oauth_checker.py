"""A pluggable XOAUTH2 checker for the tests: accepts one fixed token per user."""

from __future__ import annotations

from typing import Any

from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from zope.interface import implementer

from dcrouter.interfaces import IXOAuth2Credentials

#: dave's token is as long as real ones get (JWTs): its AUTH line is over 2048 octets.
LONG_TOKEN = b"ya29." + b"J" * 3200
TOKENS = {b"carol@local.test": b"ya29.valid-token", b"dave@local.test": LONG_TOKEN}


@implementer(ICredentialsChecker)
class TokenChecker:
    """Loaded by name from ``email.auth.checker``."""

    credentialInterfaces = (IXOAuth2Credentials,)

    def requestAvatarId(self, credentials: Any) -> defer.Deferred:
        if TOKENS.get(credentials.username) == credentials.token:
            return defer.succeed(credentials.username.decode())
        return defer.fail(error.UnauthorizedLogin())

"""A pluggable XOAUTH2 checker for the tests: accepts one fixed token per user."""

from __future__ import annotations

from typing import Any

from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from zope.interface import implementer

from dcrouter.interfaces import IXOAuth2Credentials

TOKENS = {b"carol@local.test": b"ya29.valid-token"}


@implementer(ICredentialsChecker)
class TokenChecker:
    """Loaded by name from ``email.auth.checker``."""

    credentialInterfaces = (IXOAuth2Credentials,)

    def requestAvatarId(self, credentials: Any) -> defer.Deferred:
        if TOKENS.get(credentials.username) == credentials.token:
            return defer.succeed(credentials.username.decode())
        return defer.fail(error.UnauthorizedLogin())

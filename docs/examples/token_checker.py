# docs/examples/token_checker.py
"""An auth checker plug-in: SASL XOAUTH2 with HMAC-signed bearer tokens.

A token is ``<user>:<expiry>:<signature>`` (base64url), signed with a secret
shared with whatever issues tokens.  Real deployments would ask their OAuth
provider's introspection endpoint instead (with treq, returning its Deferred).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from typing import Any, Optional

from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from zope.interface import implementer

from dcrouter.interfaces import IXOAuth2Credentials


def make_token(user: str, secret: bytes, lifetime: float = 3600.0) -> str:
    """Issue a token for ``user`` valid for ``lifetime`` seconds."""
    payload = f"{user}:{int(time.time() + lifetime)}"
    mac = hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()
    return base64.urlsafe_b64encode(f"{payload}:{mac}".encode()).decode()


@implementer(ICredentialsChecker)
class SignedTokenChecker:
    """Accepts XOAUTH2 logins whose token is signed, unexpired and names the user.

    Built without arguments from ``email.auth.checker`` (the secret then comes
    from ``$DCROUTER_TOKEN_SECRET``), or with one from Python.
    """

    credentialInterfaces = (IXOAuth2Credentials,)

    def __init__(self, secret: Optional[bytes] = None) -> None:
        if secret is None:
            secret = os.environ.get("DCROUTER_TOKEN_SECRET", "").encode()
        if not secret:
            raise ValueError("no token secret: set DCROUTER_TOKEN_SECRET")
        self.secret = secret

    def requestAvatarId(self, credentials: Any) -> defer.Deferred:
        """Fire with the user name, or fail with UnauthorizedLogin."""
        user = credentials.username.decode("utf-8", "replace")
        try:
            raw = base64.urlsafe_b64decode(credentials.token).decode()
            token_user, expiry, mac = raw.rsplit(":", 2)
            good = hmac.new(self.secret, f"{token_user}:{expiry}".encode(),
                            hashlib.sha256).hexdigest()
            valid = (hmac.compare_digest(mac, good) and token_user == user
                     and float(expiry) > time.time())
        except (ValueError, UnicodeDecodeError):
            valid = False
        if not valid:
            return defer.fail(error.UnauthorizedLogin("bad token"))
        return defer.succeed(user)

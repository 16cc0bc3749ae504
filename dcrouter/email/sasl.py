"""The server side of SASL PLAIN, LOGIN and XOAUTH2 as used by SMTP AUTH (RFC 4954).

:class:`SaslExchange` is a small state machine without I/O: the session feeds
it the client's lines and sends what it answers — a :class:`Challenge`
(``334 ...``), the :class:`Credentials` to check with ``twisted.cred``, or a
:class:`Refusal` (a complete reply line).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from typing import Any, Optional, Union

from twisted.cred import credentials

from dcrouter.email.auth import XOAuth2Credentials

MECHANISMS = ("PLAIN", "LOGIN", "XOAUTH2")


@dataclasses.dataclass
class Challenge:
    """Send ``334 <text>`` and wait for the next client line."""

    text: str


@dataclasses.dataclass
class Credentials:
    """Check these credentials; ``username`` is for logs and events.

    ``authzid`` is the authorization identity of a PLAIN response (RFC 4616)
    when the client asked to act as someone other than ``username``; None when
    it left it empty or gave its own login name (the usual case).
    """

    creds: Any
    username: str
    authzid: Optional[str] = None


@dataclasses.dataclass
class Refusal:
    """Send ``reply``; the exchange is over (a client error, counted as such)."""

    reply: str


Step = Union[Challenge, Credentials, Refusal]


class SaslExchange:
    """One AUTH exchange for ``mechanism`` (one of :data:`MECHANISMS`)."""

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism
        self._login_user: Optional[bytes] = None
        self._failed = False

    def start(self, initial: str) -> Step:
        """The AUTH command's initial response ('' for none, '=' for an empty one)."""
        if not initial:
            return Challenge("VXNlcm5hbWU6" if self.mechanism == "LOGIN" else "")
        return self.respond(b"" if initial == "=" else initial.encode("ascii", "replace"))

    def respond(self, line: bytes) -> Step:
        """A client line after a 334 challenge."""
        if line.strip() == b"*":
            return Refusal("501 5.7.0 Authentication aborted")
        if self._failed:  # the client acknowledged the XOAUTH2 error challenge
            return Refusal("535 5.7.8 Error: authentication failed")
        try:
            decoded = base64.b64decode(line, validate=True) if line else b""
        except (binascii.Error, ValueError):
            return Refusal("501 5.5.2 Error: cannot decode response")
        if self.mechanism == "PLAIN":
            parts = decoded.split(b"\x00")
            if len(parts) != 3 or not parts[1]:
                return Refusal("501 5.5.2 Error: malformed PLAIN response")
            authzid = parts[0].decode("utf-8", "replace") \
                if parts[0] and parts[0] != parts[1] else None
            return Credentials(credentials.UsernamePassword(parts[1], parts[2]),
                               _name(parts[1]), authzid)
        if self.mechanism == "LOGIN":
            if self._login_user is None:
                self._login_user = decoded
                return Challenge("UGFzc3dvcmQ6")
            return Credentials(credentials.UsernamePassword(self._login_user, decoded),
                               _name(self._login_user))
        try:
            creds = XOAuth2Credentials.parse(decoded)
        except ValueError:
            return Refusal("501 5.5.2 Error: malformed XOAUTH2 response")
        return Credentials(creds, _name(creds.username))

    def failed(self) -> Step:
        """The credentials were wrong: what to send now."""
        if self.mechanism == "XOAUTH2":
            # The convention of XOAUTH2: an error challenge, the client answers an empty line.
            self._failed = True
            status = json.dumps({"status": "401", "schemes": "bearer"}).encode()
            return Challenge(base64.b64encode(status).decode())
        return Refusal("535 5.7.8 Error: authentication failed")

    @staticmethod
    def not_authorized() -> Refusal:
        """The password was right but the client may not act as the authzid it gave."""
        return Refusal("535 5.7.8 Error: authentication failed: not authorized to act as "
                       "that user")


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")[:100]

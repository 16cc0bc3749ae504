"""Typed errors of dcrouter.

Every error dcrouter raises on purpose derives from :class:`DcRouterError`
and carries the context needed to debug it as attributes (never only inside
a formatted string), so log events can record them as structured fields.

The families are:

* :class:`ConfigError` - a configuration file or API payload is invalid;
  names the key path (``email.domain_rules[2].target.port``).
* :class:`ProtocolError` - a peer spoke a protocol wrongly.
* :class:`PolicyRejection` - a policy (relay, size, scanning, rate limit)
  refuses a message; carries the SMTP reply to send.
* :class:`DeliveryError` - an outbound delivery attempt failed; split into
  :class:`TransientDeliveryError` (retry later) and
  :class:`PermanentDeliveryError` (bounce).
* :class:`QueueError` - the delivery queue refused or lost track of an item.
"""

from __future__ import annotations

from typing import Any, Optional


class DcRouterError(Exception):
    """Base class of every error dcrouter raises on purpose."""

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = context

    def __str__(self) -> str:
        return self.message

    def log_fields(self) -> dict[str, Any]:
        """Fields to attach to a log event describing this error."""
        fields = {"error_type": type(self).__name__, "error": self.message}
        fields.update(self.context)
        return fields


class ConfigError(DcRouterError):
    """A configuration value is invalid.

    ``path`` is the dotted key path (``email.domain_rules[2].target.port``);
    ``str(error)`` is one line an operator can act on.
    """

    def __init__(self, path: str, problem: str, **context: Any) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path else problem, path=path, **context)


class ProtocolError(DcRouterError):
    """A peer (SMTP client, DNS client, proxied client) broke its protocol."""


class PolicyRejection(DcRouterError):
    """A policy refuses a command or a message; carries the SMTP reply.

    ``code`` is the three-digit reply code, ``enhanced`` the RFC 3463 status
    (``5.7.1``), ``text`` the human part shown to the client (never internals),
    ``reason`` a short machine-readable class for metrics (``relay``,
    ``size``, ``virus``...).
    """

    def __init__(self, code: int, enhanced: str, text: str, reason: str = "policy",
                 **context: Any) -> None:
        self.code = code
        self.enhanced = enhanced
        self.text = text
        self.reason = reason
        super().__init__(f"{code} {enhanced} {text}", code=code, enhanced=enhanced,
                         reason=reason, **context)

    @property
    def permanent(self) -> bool:
        """True for 5xx replies, False for 4xx (the client should retry)."""
        return self.code >= 500

    def smtp_reply(self) -> str:
        """The reply line without the code: ``5.7.1 Relay access denied``."""
        return f"{self.enhanced} {self.text}"


class DeliveryError(DcRouterError):
    """An outbound delivery attempt failed.

    ``code`` is the remote SMTP reply code when there was one, ``enhanced`` its
    enhanced status code, ``remote`` the host that answered.
    """

    permanent = False

    def __init__(self, message: str, code: Optional[int] = None,
                 enhanced: Optional[str] = None, remote: Optional[str] = None,
                 **context: Any) -> None:
        self.code = code
        self.enhanced = enhanced
        self.remote = remote
        super().__init__(message, code=code, enhanced=enhanced, remote=remote, **context)


class TransientDeliveryError(DeliveryError):
    """A delivery failure worth retrying (4xx, timeout, refused connection)."""

    permanent = False


class PermanentDeliveryError(DeliveryError):
    """A delivery failure that will not improve (5xx, null MX): bounce."""

    permanent = True


class QueueError(DcRouterError):
    """The delivery queue could not accept or find an item."""


class QueueFullError(QueueError):
    """The queue holds ``max_queue_size`` items (or a destination its cap)."""

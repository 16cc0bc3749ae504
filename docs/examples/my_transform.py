# docs/examples/my_transform.py
"""A transformation plug-in: stamps every message with a ticket header."""

from __future__ import annotations

import itertools
from email.message import EmailMessage

from zope.interface import implementer

from dcrouter.email.transform import TransformContext
from dcrouter.errors import ConfigError
from dcrouter.interfaces import ITransformation


@implementer(ITransformation)
class TicketStamp:
    """Adds ``<header>: <prefix>-<n> (<number of recipients> rcpt)`` to each message.

    The rule's other keys arrive as keyword arguments:
    ``{ type = "my_transform:TicketStamp", prefix = "HELP" }``.
    """

    thread_safe = False  # the counter is shared: run in the reactor thread

    def __init__(self, prefix: str = "T", header: str = "X-Ticket") -> None:
        if not prefix.isalnum():
            raise ConfigError("prefix", "must be letters and digits")
        self.prefix = prefix
        self.header = header
        self._numbers = itertools.count(1)

    def transform(self, message: EmailMessage, context: TransformContext) -> None:
        """Change the message in place (may also return a Deferred)."""
        del message[self.header]
        number = next(self._numbers)
        message[self.header] = f"{self.prefix}-{number} ({len(context.recipients)} rcpt)"

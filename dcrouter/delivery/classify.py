"""Classifying delivery failures from SMTP replies (RFC 3463 enhanced status codes).

Two questions per failure: is it *permanent* (5xx: bounce now) or transient
(4xx: retry), and is it a *hard* bounce - one that says the address itself is
bad (unknown user, bad domain, disabled mailbox) and so puts the recipient on
the suppression list - or a soft one (mailbox full, policy, content, or a
transient problem) that says nothing about the address.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_HARD_TEXT = re.compile(r"user unknown|unknown user|no such (user|mailbox|recipient)|"
                        r"does not exist|mailbox (not found|unavailable)|invalid recipient|"
                        r"recipient (address )?rejected: (user unknown|undeliverable)|"
                        r"address rejected", re.IGNORECASE)
#: Enhanced codes that mean the address is bad (RFC 3463 section 3.2/3.3).
_HARD_CODES = {"5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10", "5.2.1"}


@dataclasses.dataclass(frozen=True)
class Classification:
    """What a failure reply means: permanent or not, hard or soft, its status code."""

    permanent: bool
    hard: bool
    status: str

    @property
    def kind(self) -> str:
        """'hard', 'soft' or 'transient'."""
        if not self.permanent:
            return "transient"
        return "hard" if self.hard else "soft"


def enhanced_status(text: str) -> Optional[str]:
    """The first RFC 3463 status code (``x.y.z``) in a reply text, if any."""
    match = _ENHANCED.search(text)
    return ".".join(match.groups()) if match else None


def classify(code: int, text: str) -> Classification:
    """Classify a reply ``code`` and its text; code <= 0 means no reply (network error)."""
    status = enhanced_status(text)
    if code >= 500:
        permanent = True
    elif code >= 400 or code <= 0:
        permanent = False
    else:
        permanent = bool(status and status.startswith("5."))
    if status is None or status[0] != ("5" if permanent else "4"):
        status = "5.0.0" if permanent else "4.0.0"
    hard = False
    if permanent:
        if status in _HARD_CODES or status.startswith("5.1."):
            hard = True
        elif status in ("5.0.0", "5.5.0") and _HARD_TEXT.search(text):
            hard = True
    return Classification(permanent=permanent, hard=hard, status=status)

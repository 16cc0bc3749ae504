"""Helpers for queue tests: spool files and delivery requests."""

from __future__ import annotations

import os
from typing import Optional

from dcrouter.message import DeliveryRequest, Route, new_correlation_id, new_queue_id


def spool_message(state_dir: str, body: bytes = b"Subject: t\r\n\r\nhello\r\n") -> str:
    """Write a message into state_dir/spool and return its path."""
    spool = os.path.join(state_dir, "spool")
    os.makedirs(spool, exist_ok=True)
    path = os.path.join(spool, new_queue_id() + ".eml")
    with open(path, "wb") as f:
        f.write(body)
    return path


def request(body_path: str, recipients: Optional[list[str]] = None,
            route: Optional[Route] = None, mail_from: str = "sender@example.org",
            queue_id: str = "") -> DeliveryRequest:
    """A forward request to 127.0.0.1:2525 unless a route is given."""
    return DeliveryRequest(queue_id=queue_id or new_queue_id(), mode="forward",
                           rule_pattern="*@example.com", mail_from=mail_from,
                           recipients=recipients or ["a@example.com"],
                           route=route or Route(kind="forward", server="127.0.0.1", port=2525),
                           body_path=body_path, correlation_id=new_correlation_id(),
                           size=os.path.getsize(body_path))

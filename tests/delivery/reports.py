"""Reading delivery status notifications in tests: the parts of a multipart/report.

Parsed by hand from the raw bytes (not only through :mod:`email`), so a test sees
exactly what was sent: each part's content type and body, and the
delivery-status fields as one dict per block (message first, then recipients).
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
import re
from typing import Any


@dataclasses.dataclass
class Report:
    """One DSN: its header, its parts by content type, its status blocks."""

    message: Any
    parts: dict[str, bytes]
    blocks: list[dict[str, str]]

    @property
    def per_message(self) -> dict[str, str]:
        """The per-message fields (Reporting-MTA, Original-Envelope-Id, ...)."""
        return self.blocks[0]

    @property
    def recipients(self) -> dict[str, dict[str, str]]:
        """Per-recipient blocks by their Final-Recipient address."""
        return {b["Final-Recipient"].split(";", 1)[1].strip(): b for b in self.blocks[1:]}

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])


def parse_report(content: bytes) -> Report:
    """Split a DSN into its parts; ValueError when it is not a delivery-status report."""
    message = email.message_from_bytes(content, policy=email.policy.compat32)
    if message.get_content_type() != "multipart/report" or \
            message.get_param("report-type") != "delivery-status":
        raise ValueError(f"not a DSN: {message.get_content_type()}")
    boundary = message.get_boundary()
    assert boundary
    chunks = content.split(b"\r\n--" + boundary.encode())
    parts: dict[str, bytes] = {}
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, body = chunk[2:].partition(b"\r\n\r\n")
        found = re.search(rb"(?im)^Content-Type:\s*([^;\s]+)", head)
        assert found, head
        parts[found.group(1).decode().lower()] = body
    status = parts.get("message/delivery-status", parts.get("message/global-delivery-status"))
    assert status is not None, list(parts)
    blocks = []
    for block in re.split(r"\r\n\r\n+", status.decode("utf-8").strip()):
        fields = {}
        for line in block.split("\r\n"):
            name, _, value = line.partition(":")
            fields[name.strip()] = value.strip()
        blocks.append(fields)
    return Report(message, parts, blocks)

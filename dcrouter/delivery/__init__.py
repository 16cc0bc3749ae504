"""Outbound delivery: SMTP client, MX look-ups, Maildir, bounces, suppression, reputation."""

from __future__ import annotations

from dcrouter.delivery.system import MultiModeDeliverySystem

__all__ = ["MultiModeDeliverySystem"]

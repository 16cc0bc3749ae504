"""Outbound delivery (placeholder until the delivery issue lands)."""

from __future__ import annotations

from typing import Any, Optional

from twisted.application.service import Service

from dcrouter.config.email import EmailOptions


class MultiModeDeliverySystem(Service):
    """Placeholder: delivers nothing."""

    def __init__(self, queue: Any, options: EmailOptions, dkim_keys: Any, state_dir: str = "",
                 resolver: Any = None, observers: Optional[list] = None,
                 reactor: Any = None) -> None:
        self.queue = queue
        self.options = options
        self.suppression = None

    def update_options(self, options: EmailOptions) -> None:
        """Apply new options."""
        self.options = options

    def drain(self) -> None:
        """Nothing in flight."""
        return None

    def get_stats(self) -> dict:
        """No figures yet."""
        return {}


__all__ = ["MultiModeDeliverySystem"]

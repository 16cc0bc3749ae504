"""The multi-mode processor (placeholder until the processing issue lands)."""

from __future__ import annotations

from typing import Any

from dcrouter.config.email import EmailOptions


class MultiModeProcessor:
    """Placeholder: accepts nothing."""

    def __init__(self, options: EmailOptions, domain_router: Any, queue: Any, context: Any,
                 suppression: Any = None) -> None:
        self.options = options
        self.domain_router = domain_router
        self.queue = queue

    def update_options(self, options: EmailOptions) -> None:
        """Apply new options."""
        self.options = options

    def get_stats(self) -> dict:
        """No figures yet."""
        return {}

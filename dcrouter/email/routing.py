"""Pattern routing of recipients to rules (placeholder until the routing issue lands)."""

from __future__ import annotations

import fnmatch
from typing import Optional

from dcrouter.config.email import DomainRuleOptions, EmailOptions


class DomainRouter:
    """Placeholder: first matching rule wins."""

    def __init__(self, rules: tuple[DomainRuleOptions, ...]) -> None:
        self.rules = list(rules)

    @classmethod
    def from_options(cls, options: EmailOptions) -> "DomainRouter":
        """Build from ``[email]``."""
        return cls(options.domain_rules)

    def update_from_options(self, options: EmailOptions) -> None:
        """Replace the rules."""
        self.rules = list(options.domain_rules)

    def match_rule(self, address: str) -> Optional[DomainRuleOptions]:
        """The first rule whose pattern matches."""
        for rule in self.rules:
            if fnmatch.fnmatchcase(address.lower(), rule.pattern.lower()):
                return rule
        return None

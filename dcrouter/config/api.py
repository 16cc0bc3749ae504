"""Options of ``[api]``: the management API, metrics and status page."""

from __future__ import annotations

import dataclasses
import ipaddress

from dcrouter.config.base import check_port, check_positive, option
from dcrouter.errors import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class ApiOptions:
    """The management API."""

    listen: str = option("127.0.0.1", doc="Address; non-loopback needs a token.",
                         reload="rebind")
    port: int = option(8088, check=check_port, doc="Port.", reload="rebind")
    token: str = option("", doc="Bearer token; required when listen is not loopback.")
    max_auth_failures_per_minute: int = option(10, check=check_positive,
                                               doc="Failed token attempts per IP per minute.")
    persist_rules: bool = option(True, doc="Rule changes via the API are written to "
                                 "state_dir/rules.toml and survive a restart: while that file "
                                 "exists it replaces email.domain_rules at start and on reload "
                                 "(delete it to return to the file's rules). false: API "
                                 "changes last until the next restart or reload.")

    def validate(self, path: str) -> None:
        """A non-loopback listener needs a token."""
        try:
            loopback = ipaddress.ip_address(self.listen).is_loopback
        except ValueError:
            loopback = self.listen == "localhost"
        if not loopback and not self.token:
            raise ConfigError(f"{path}.token",
                              f"required when api.listen ({self.listen}) is not a loopback address")

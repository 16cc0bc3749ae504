"""Options of ``[api]``: the management API, metrics and status page."""

from __future__ import annotations

import dataclasses
import ipaddress

from dcrouter.config.base import check_port, check_positive, one_of, option
from dcrouter.errors import ConfigError


def is_loopback(listen: str) -> bool:
    """True for a loopback address (127.0.0.0/8, ::1) or ``localhost``."""
    try:
        return ipaddress.ip_address(listen).is_loopback
    except ValueError:
        return listen == "localhost"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ApiOptions:
    """The management API."""

    listen: str = option("127.0.0.1", doc="Address; non-loopback needs a token.",
                         reload="rebind")
    port: int = option(8088, check=check_port, doc="Port.", reload="rebind")
    token: str = option("", doc="Bearer token; required when listen is not loopback.",
                        secret=True)
    max_auth_failures_per_minute: int = option(10, check=check_positive,
                                               doc="Failed token attempts per IP per minute.")
    persist_rules: bool = option(True, doc="Rule changes via the API are written to "
                                 "state_dir/rules.toml and survive a restart: while that file "
                                 "exists it replaces email.domain_rules at start and on reload "
                                 "(delete it to return to the file's rules). false: API "
                                 "changes last until the next restart or reload.")
    tls: bool = option(False, doc="Serve HTTPS. Without tls_cert/tls_key the router's "
                       "self-signed certificate (state_dir/api/certs/) is used; setting "
                       "tls_cert or tls_client_ca turns HTTPS on as well.", reload="rebind")
    tls_cert: str = option("", doc="PEM certificate (chain) of the HTTPS listener; needs "
                           "tls_key. Re-read on reload.")
    tls_key: str = option("", doc="PEM private key of tls_cert.")
    tls_client_ca: str = option("", doc="PEM CA certificate(s): clients must present a "
                                "certificate they signed (mutual TLS), in addition to the "
                                "token.")
    max_body_size: int = option(1024 * 1024, check=check_positive,
                                doc="Largest request body in bytes (nginx's client_max_body_size): "
                                "a larger Content-Length is answered 413 before the body is "
                                "read or the token checked; a chunked body is cut with 413 at "
                                "the limit.")
    header_timeout: float = option(10.0, check=check_positive,
                                   doc="Seconds for a whole request head to arrive, from its "
                                   "first byte (HAProxy's timeout http-request); else 408.")
    body_timeout: float = option(60.0, check=check_positive,
                                 doc="Seconds for a whole request body to arrive after its "
                                 "head; else 408.")
    idle_timeout: float = option(60.0, check=check_positive,
                                 doc="Seconds an idle keep-alive connection stays open.")
    tls_min_version: str = option("TLSv1.2", check=one_of("TLSv1.2", "TLSv1.3"),
                                  doc="Lowest TLS version of the HTTPS listener.")
    history_interval: float = option(10.0, check=check_positive,
                                     doc="Seconds between two samples of every service's "
                                     "figures kept in memory for the console's charts "
                                     "(1 to 300).")
    history_window: float = option(3600.0, check=check_positive,
                                   doc="Seconds of samples kept (the console charts the last "
                                   "hour by default); at most 10,000 samples are kept "
                                   "whatever the two values say. Prometheus (/metrics) is "
                                   "the long-term store.")
    console_interval: float = option(5.0, check=check_positive,
                                     doc="Seconds between two refreshes of the console in the "
                                     "browser (2 to 300; ?interval= in the page's address "
                                     "overrides it for that tab, down to 0.5). The costlier "
                                     "answers (history, queue summary) are computed at most "
                                     "once a second, certificates every 10 s, for all "
                                     "consoles together.")

    @property
    def https(self) -> bool:
        """Whether the listener speaks HTTPS."""
        return self.tls or bool(self.tls_cert) or bool(self.tls_client_ca)

    @property
    def loopback(self) -> bool:
        """Whether ``listen`` is a loopback address."""
        return is_loopback(self.listen)

    def validate(self, path: str) -> None:
        """A non-loopback listener needs a token; certificate and key come together."""
        if not self.loopback and not self.token:
            raise ConfigError(f"{path}.token",
                              f"required when api.listen ({self.listen}) is not a loopback address")
        if self.tls_cert and not self.tls_key:
            raise ConfigError(f"{path}.tls_key", "required when api.tls_cert is set")
        if self.tls_key and not self.tls_cert:
            raise ConfigError(f"{path}.tls_cert", "required when api.tls_key is set")
        if not 1 <= self.history_interval <= 300:
            raise ConfigError(f"{path}.history_interval",
                              f"must be 1 to 300 seconds, got {self.history_interval:g}")
        if self.history_window < self.history_interval or self.history_window > 86400:
            raise ConfigError(f"{path}.history_window",
                              f"must be history_interval ({self.history_interval:g}) to "
                              f"86400 seconds, got {self.history_window:g}")
        if not 2 <= self.console_interval <= 300:
            raise ConfigError(f"{path}.console_interval",
                              f"must be 2 to 300 seconds, got {self.console_interval:g}")

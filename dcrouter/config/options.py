"""The root of the configuration: :class:`DcRouterOptions`."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from dcrouter.config.api import ApiOptions
from dcrouter.config.base import option
from dcrouter.config.dns import DnsOptions
from dcrouter.config.email import EmailOptions
from dcrouter.config.proxy import ProxyOptions
from dcrouter.config.router import RouterOptions
from dcrouter.errors import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class DcRouterOptions:
    """Everything dcrouter runs; a service runs only when its section is present."""

    router: RouterOptions = option(default_factory=RouterOptions, doc="Process settings.")
    email: Optional[EmailOptions] = option(None, doc="The email gateway.")
    proxy: Optional[ProxyOptions] = option(None, doc="The TCP/TLS proxy.")
    dns: Optional[DnsOptions] = option(None, doc="The DNS server.")
    api: Optional[ApiOptions] = option(None, doc="The management API.")

    def state_path(self, *parts: str) -> str:
        """A path below ``router.state_dir``."""
        return os.path.join(self.router.state_dir, *parts)

    def validate(self, path: str) -> None:
        """Ports must not be shared between services (per protocol)."""
        tcp: dict[int, str] = {}

        def claim(port: int, owner: str) -> None:
            if port == 0:
                return
            if port in tcp:
                raise ConfigError(owner, f"port {port} is already used by {tcp[port]}")
            tcp[port] = owner

        if self.email is not None:
            for i, port in enumerate(self.email.ports):
                claim(port, f"email.ports[{i}]")
        if self.dns is not None:
            claim(self.dns.port, "dns.port")
        if self.api is not None:
            claim(self.api.port, "api.port")
        if self.proxy is not None:
            proxy_ports: dict[int, str] = {}
            for i, route in enumerate(self.proxy.routes):
                for port in route.all_ports():
                    where = f"proxy.routes[{i}].ports"
                    if port in tcp:
                        raise ConfigError(where, f"port {port} is already used by {tcp[port]}")
                    proxy_ports.setdefault(port, where)
            tcp.update(proxy_ports)

"""The DNS service (placeholder until the DNS issue lands)."""

from __future__ import annotations

from typing import Any

from twisted.names import dns, server

from dcrouter.service import ListenerSet, ListenSpec, ManagedService, RouterContext


class DnsService(ManagedService):
    """Placeholder: a twisted.names server with no zones."""

    def __init__(self, context: RouterContext) -> None:
        super().__init__("dns", context)
        self.factory = server.DNSServerFactory(authorities=[])
        self.protocol = dns.DNSDatagramProtocol(self.factory)
        self.listeners = ListenerSet(context.reactor, self._target)

    def _target(self, spec: ListenSpec) -> Any:
        return self.protocol if spec.protocol == "udp" else self.factory

    def startService(self) -> None:
        opts = self.context.options.dns
        self.listeners.start([ListenSpec("udp", opts.listen, opts.port, "dns.port"),
                              ListenSpec("tcp", opts.listen, opts.port, "dns.port")])
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        return self.listeners.stop()

    def bound_addresses(self) -> list[tuple[str, str, int]]:
        return self.listeners.addresses()

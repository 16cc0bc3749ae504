"""The proxy service (placeholder until the proxy issue lands)."""

from __future__ import annotations

from typing import Any

from twisted.protocols.portforward import ProxyFactory

from dcrouter.config.base import split_host_port
from dcrouter.service import ListenerSet, ListenSpec, ManagedService, RouterContext


class ProxyService(ManagedService):
    """Placeholder: forwards each route's ports to its first target."""

    def __init__(self, context: RouterContext) -> None:
        super().__init__("proxy", context)
        self.listeners = ListenerSet(context.reactor, self._factory)

    def _factory(self, spec: ListenSpec) -> Any:
        index = int(spec.key_path.split("[")[1].split("]")[0])
        host, port = split_host_port(self.context.options.proxy.routes[index].targets[0], "")
        return ProxyFactory(host, port)

    def _specs(self) -> list[ListenSpec]:
        proxy = self.context.options.proxy
        out: dict[int, ListenSpec] = {}
        for i, route in enumerate(proxy.routes):
            for port in route.all_ports():
                out.setdefault(port, ListenSpec("tcp", proxy.listen, port, f"proxy.routes[{i}].ports"))
        return list(out.values())

    def startService(self) -> None:
        self.listeners.start(self._specs())
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        return self.listeners.stop()

    def bound_addresses(self) -> list[tuple[str, str, int]]:
        return self.listeners.addresses()

"""The API service (placeholder until the API issue lands)."""

from __future__ import annotations

import json
from typing import Any

from twisted.web import resource, server

from dcrouter.service import ListenerSet, ListenSpec, ManagedService, RouterContext


class _Status(resource.Resource):
    isLeaf = True

    def __init__(self, context: RouterContext) -> None:
        super().__init__()
        self.context = context

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"services": sorted(self.context.services)}).encode()


class ApiService(ManagedService):
    """Placeholder: GET anything -> the list of services."""

    def __init__(self, context: RouterContext) -> None:
        super().__init__("api", context)
        self.site = server.Site(_Status(context))
        self.listeners = ListenerSet(context.reactor, lambda spec: self.site)

    def startService(self) -> None:
        opts = self.context.options.api
        self.listeners.start([ListenSpec("tcp", opts.listen, opts.port, "api.port")])
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        return self.listeners.stop()

    def bound_addresses(self) -> list[tuple[str, str, int]]:
        return self.listeners.addresses()

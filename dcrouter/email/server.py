"""The SMTP server (placeholder until the email server issue lands)."""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol

from dcrouter.config.email import EmailOptions
from dcrouter.service import ListenerSet, ListenSpec, RouterContext
from dcrouter.tlsutil import server_context_factory
from twisted.application.service import Service


class _Greeter(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"220 " + self.factory.hostname.encode() + b" ESMTP dcrouter\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"221 2.0.0 Bye\r\n")
        self.transport.loseConnection()


class UnifiedEmailServer(Service):
    """Placeholder: greets and closes."""

    def __init__(self, options: EmailOptions, handler: Any, context: RouterContext) -> None:
        self.options = options
        self.context = context
        factory = Factory.forProtocol(_Greeter)
        factory.hostname = options.hostname  # type: ignore[attr-defined]
        self.listeners = ListenerSet(context.reactor, lambda spec: factory, self._tls)

    def _tls(self, spec: ListenSpec) -> Any:
        return server_context_factory(self.context.state_dir, self.options.hostname)

    def _specs(self) -> list[ListenSpec]:
        implicit = self.options.effective_implicit_tls_ports
        return [ListenSpec("tcp", self.options.listen, p, f"email.ports[{i}]", tls=p in implicit)
                for i, p in enumerate(self.options.ports)]

    def startService(self) -> None:
        self.listeners.start(self._specs())
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        return self.listeners.stop()

    def bound_addresses(self) -> list[tuple[str, str, int]]:
        return self.listeners.addresses()

    def reconfigure(self, options: EmailOptions) -> Optional[defer.Deferred]:
        self.options = options
        return self.listeners.update(self._specs())

    def stop_accepting(self) -> Any:
        return self.listeners.stop()

    def drain(self) -> None:
        return None

    def get_stats(self) -> dict:
        return {}

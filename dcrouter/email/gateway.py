"""EmailGateway: the email service as one unit in the router's tree.

Holds the queue, the delivery system and the SMTP server as children (in that
start order, so the queue is open before the first message arrives and the
listeners close first on stop), and the processor and domain router beside
them.  It does not build them: :mod:`dcrouter.router` does.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer

from dcrouter.config.options import DcRouterOptions
from dcrouter.service import ManagedService, RouterContext


class EmailGateway(ManagedService):
    """The email service: SMTP in, route and process, queue, deliver."""

    def __init__(self, context: RouterContext, *, server: Any, processor: Any,
                 domain_router: Any, queue: Any, delivery: Any) -> None:
        super().__init__("email", context)
        self.server = server
        self.processor = processor
        self.domain_router = domain_router
        self.queue = queue
        self.delivery = delivery
        for child in (queue, delivery, server):
            child.setServiceParent(self)

    def get_stats(self) -> dict:
        """Server, processor, queue and delivery figures."""
        return {
            "server": self.server.get_stats(),
            "processor": self.processor.get_stats(),
            "queue": self.queue.get_stats(),
            "delivery": self.delivery.get_stats(),
        }

    def bound_addresses(self) -> list[tuple[str, str, int]]:
        """The SMTP listeners."""
        return list(self.server.bound_addresses())

    def reconfigure(self, options: DcRouterOptions) -> Optional[defer.Deferred]:
        """Apply a new ``[email]`` section to every part."""
        email = options.email
        assert email is not None
        # the processor validates (e.g. transformation types) before anything changes
        self.processor.update_options(email)
        self.domain_router.update_from_options(email)
        self.queue.update_options(email.queue)
        self.delivery.update_options(email)
        return self.server.reconfigure(email)

    def stopService(self) -> Optional[defer.Deferred]:
        """Stop the children, then release the processor's connections (Redis rate limits)."""
        d = defer.maybeDeferred(super().stopService)
        d.addBoth(lambda result: defer.maybeDeferred(self.processor.close).addBoth(
            lambda _: result))
        return d

    def stop_accepting(self) -> Optional[defer.Deferred]:
        """Close the SMTP listeners."""
        return self.server.stop_accepting()

    def drain(self) -> Optional[defer.Deferred]:
        """Wait for open SMTP transactions, then for deliveries in progress."""
        d = defer.maybeDeferred(self.server.drain)
        d.addCallback(lambda _: self.delivery.drain())
        return d

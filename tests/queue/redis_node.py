"""A queue + delivery node on a shared Redis queue, run as a subprocess by the two-node test.

Usage: python -m tests.queue.redis_node REDIS_URL PREFIX HELO_NAME STATE_DIR
"""

from __future__ import annotations

import sys

from twisted.internet import reactor

from dcrouter.config.email import EmailOptions
from dcrouter.config.queue import DeliveryOptions, QueueOptions
from dcrouter.delivery import MultiModeDeliverySystem
from dcrouter.dkimkeys import DkimKeyStore
from dcrouter.queue import UnifiedDeliveryQueue


def main() -> None:
    url, prefix, helo, state_dir = sys.argv[1:5]
    options = EmailOptions(
        hostname=helo,
        queue=QueueOptions(storage_type="redis", redis_url=url, redis_prefix=prefix,
                           lease_time=1.5, check_interval=0.1, base_retry_delay=0.2,
                           max_retry_delay=0.5),
        delivery=DeliveryOptions(helo_name=helo, concurrent_deliveries=4,
                                 per_destination_concurrency=2, command_timeout=5.0))
    queue = UnifiedDeliveryQueue.from_options(options.queue, state_dir)
    delivery = MultiModeDeliverySystem(queue, options, DkimKeyStore(state_dir),
                                       state_dir=state_dir)
    queue.startService()
    delivery.startService()
    queue.when_ready().addCallback(lambda _: print("ready", flush=True))
    reactor.run()


if __name__ == "__main__":
    main()

"""Options of ``[email.queue]`` (the durable delivery queue) and
``[email.delivery]`` (outbound SMTP, MX look-ups, bounces)."""

from __future__ import annotations

import dataclasses

from dcrouter.config.base import (
    check_non_negative, check_port, check_positive, one_of, option, split_host_port,
)
from dcrouter.errors import ConfigError
from dcrouter.redisaddr import RedisAddress


def _check_nameservers(value: tuple[str, ...], path: str) -> tuple[str, ...]:
    for i, item in enumerate(value):
        split_host_port(item, f"{path}[{i}]", default_port=53)
    return value


def _check_redis_url(value: str, path: str) -> str:
    try:
        RedisAddress.parse(value)
    except ValueError as e:
        raise ConfigError(path, str(e)) from None
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class QueueOptions:
    """Where queued messages live and how often they are retried."""

    storage_type: str = option("disk", check=one_of("memory", "disk", "redis"),
                               doc="'disk' (durable, default), 'memory' (lost on restart) or "
                               "'redis' (shared by several nodes).", reload="restart")
    persistent_path: str = option("", doc="Disk queue directory; default state_dir/queue.",
                                  reload="restart")
    redis_url: str = option("redis://127.0.0.1:6379/0", check=_check_redis_url,
                            doc="Redis server for storage_type = 'redis'.", reload="restart")
    redis_prefix: str = option("dcrouter", doc="Prefix of every Redis key.", reload="restart")
    max_retries: int = option(5, check=check_non_negative,
                              doc="Delivery attempts after the first before bouncing.")
    base_retry_delay: float = option(60.0, check=check_positive,
                                     doc="Seconds before the first retry; doubled each attempt.")
    max_retry_delay: float = option(3600.0, check=check_positive, doc="Longest retry delay.")
    max_queue_size: int = option(1000000, check=check_positive,
                                 doc="Items queued at most; beyond, new mail gets 452 4.3.1.")
    max_per_destination: int = option(100000, check=check_positive,
                                      doc="Items queued at most for one destination.")
    check_interval: float = option(1.0, check=check_positive,
                                   doc="Seconds between looks for due items.")
    lease_time: float = option(15.0, check=check_positive,
                               doc="Seconds a node's lease on an item lasts without renewal "
                               "(redis): the others take a dead node's items after this "
                               "long at most. The holder renews its leases every "
                               "lease_renew_interval while it works on them.")
    lease_renew_interval: float = option(0.0, check=check_non_negative,
                                         doc="Seconds between renewals of a node's leases "
                                         "(redis; one call for all of them); 0: a third of "
                                         "lease_time.")
    keep_delivered: float = option(3600.0, check=check_non_negative,
                                   doc="Seconds delivered/failed items stay listed.")

    def validate(self, path: str) -> None:
        """max_retry_delay must not be below base_retry_delay; renewals must come at least
        twice a lease, so one missed renewal does not lose the leases."""
        if self.max_retry_delay < self.base_retry_delay:
            raise ConfigError(f"{path}.max_retry_delay",
                              f"must be at least base_retry_delay ({self.base_retry_delay})")
        if self.lease_renew_interval and self.lease_renew_interval > self.lease_time / 2:
            raise ConfigError(f"{path}.lease_renew_interval",
                              f"must be at most half of lease_time ({self.lease_time / 2:g}s)"
                              f", so one missed renewal does not lose the leases")

    @property
    def renew_interval(self) -> float:
        """Seconds between lease renewals (``lease_renew_interval`` or lease_time / 3)."""
        return self.lease_renew_interval or self.lease_time / 3


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeliveryOptions:
    """Outbound delivery: resolver, ports, concurrency, timeouts, bounces."""

    nameservers: tuple[str, ...] = option((), check=_check_nameservers,
                                          doc="Resolvers for MX look-ups as 'ip:port'; "
                                          "empty: the system's.")
    mx_port: int = option(25, check=check_port, doc="Port used when delivering to MX hosts.")
    concurrent_deliveries: int = option(20, check=check_positive,
                                        doc="Deliveries in progress at once.")
    per_destination_concurrency: int = option(5, check=check_positive,
                                              doc="Deliveries in progress per destination.")
    connect_timeout: float = option(30.0, check=check_positive, doc="Seconds to connect.")
    command_timeout: float = option(300.0, check=check_positive,
                                    doc="Seconds to wait for any reply.")
    helo_name: str = option("", doc="Name in EHLO; default email.hostname.")
    verify_certificates: bool = option(False, doc="Verify opportunistic STARTTLS to MX hosts "
                                       "(chain and MX host name); a failed check defers the "
                                       "message instead of sending it in clear.")
    ca_path: str = option("", doc="CA bundle (PEM) for verify_certificates; default: the "
                          "system's CAs.")
    bounce_sender: str = option("", doc="From of DSNs; default MAILER-DAEMON@hostname.")
    bounce_size_limit: int = option(50000, check=check_non_negative,
                                    doc="Bytes of a failed message a failure DSN returns "
                                    "whole; a larger one (or RET=HDRS) is returned as its "
                                    "header only (Postfix's bounce_size_limit; 0: no limit).")
    delay_warning_time: float = option(0.0, check=check_non_negative,
                                       doc="Seconds after arrival when a sender whose mail is "
                                       "still deferred gets one delay DSN (NOTIFY=DELAY, or "
                                       "no NOTIFY); 0: never (Postfix's delay_warning_time, "
                                       "also off by default).")
    suppression_ttl: float = option(2592000.0, check=check_non_negative,
                                    doc="Seconds a hard-bounced recipient stays suppressed "
                                    "(0: off).")
    reputation_window: float = option(86400.0, check=check_positive,
                                      doc="Seconds of the per-domain sent/bounced window.")
    connection_reuse: int = option(100, check=check_non_negative,
                                   doc="Messages sent over one connection at most.")

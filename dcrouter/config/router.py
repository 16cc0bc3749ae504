"""Options of the ``[router]`` section: process-wide settings."""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Mapping

from dcrouter.config.base import check_non_negative, one_of, option
from dcrouter.errors import ConfigError

#: Subsystems that accept a log level in ``router.log_levels``.
LOG_SUBSYSTEMS = (
    "router", "config", "email", "email.server", "email.routing", "email.processing",
    "email.scanning", "email.delivery", "queue", "proxy", "proxy.acme", "dns", "api",
)
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
#: Upper bound of ``router.workers`` (a typo such as 400 should not fork 400 processes).
MAX_WORKERS = 256


def _check_log_levels(value: Mapping[str, str], path: str) -> Mapping[str, str]:
    for subsystem, level in value.items():
        if subsystem not in LOG_SUBSYSTEMS:
            close = difflib.get_close_matches(subsystem, LOG_SUBSYSTEMS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{path}.{subsystem}", f"unknown subsystem{hint}")
        one_of(*LOG_LEVELS)(level, f"{path}.{subsystem}")
    return value


def _check_workers(value: int, path: str) -> int:
    if not 0 <= value <= MAX_WORKERS:
        raise ConfigError(path, f"must be 0..{MAX_WORKERS} (0: one per CPU), got {value}")
    return value


def _check_rate(value: float, path: str) -> float:
    if not 0.0 < value <= 1.0:
        raise ConfigError(path, f"must be in (0, 1], got {value}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class RouterOptions:
    """Process-wide settings: where state lives, how it logs, how it stops."""

    state_dir: str = option("var", doc="Directory for the queue, spool, certificates, DKIM keys "
                            "and Maildirs; created with mode 0700.", reload="restart")
    log_format: str = option("text", doc="'text' (human lines) or 'json' (one JSON object a line).",
                             check=one_of("text", "json"))
    log_level: str = option("info", doc="Default minimum log level.", check=one_of(*LOG_LEVELS))
    log_levels: Mapping[str, str] = option(
        default_factory=dict, check=_check_log_levels,
        doc="Minimum log level per subsystem, e.g. { \"email.delivery\" = \"debug\" }.")
    log_sample_rate: float = option(1.0, check=_check_rate,
                                    doc="Fraction (0..1] of high-volume events that are logged.")
    log_file: str = option("", doc="Write logs here instead of standard output; reopened on "
                           "every reload, so logrotate's postrotate can send SIGHUP.")
    shutdown_timeout: float = option(30.0, check=check_non_negative,
                                     doc="Seconds in-flight SMTP transactions and proxied "
                                     "connections get to finish on SIGTERM.")
    workers: int = option(1, check=_check_workers, reload="restart",
                          doc="Worker processes. 1: one process, as always. N > 1: a master "
                          "process binds every listening port once and starts N workers that "
                          "share those sockets, each with its own disk-queue shard "
                          "(queue/worker-<i>); the API runs in worker 0. 0: one per CPU.")

    @property
    def effective_workers(self) -> int:
        """``workers``, with 0 resolved to the number of CPUs."""
        return self.workers or os.cpu_count() or 1

    def validate(self, path: str) -> None:
        """Cross-field checks."""
        if not self.state_dir:
            raise ConfigError(f"{path}.state_dir", "must not be empty")

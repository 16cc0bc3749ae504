"""The twistd command line of dcrouter: options and ``makeService``.

A configuration error prints one line naming the key and exits with status 2,
before anything binds.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage

from dcrouter.errors import ConfigError


class Options(usage.Options):
    """``twistd dcrouter`` options."""

    synopsis = "[--config FILE]"
    longdesc = ("Runs dcrouter from a TOML configuration file. "
                "See docs/configuration.md for every key.")
    optParameters = [
        ["config", "c", "etc/dcrouter.toml", "TOML configuration file."],
    ]

    def postOptions(self) -> None:
        """Load and validate the file now, so errors come before any bind."""
        from dcrouter.config import load_config
        try:
            self["options"] = load_config(self["config"])
        except ConfigError as e:
            sys.stderr.write(f"dcrouter: configuration error: {e}\n")
            sys.stderr.flush()
            raise SystemExit(2) from None


def makeService(options: Options) -> Any:
    """Build the router's service tree from the validated options.

    With ``router.workers`` > 1 this process becomes the master of that many
    worker processes (:class:`dcrouter.workers.WorkerMaster`).
    """
    if options["options"].router.effective_workers > 1:
        from dcrouter.workers import WorkerMaster
        return WorkerMaster(options["options"], options["config"])
    from dcrouter.router import make_router
    try:
        return make_router(options["options"], config_path=options["config"], exit_on_error=True)
    except ConfigError as e:
        sys.stderr.write(f"dcrouter: configuration error: {e}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None

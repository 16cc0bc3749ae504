"""The twistd command line of dcrouter: options and ``makeService``.

A configuration error prints one line naming the key and exits with status 2,
before anything binds.  Without ``--config`` the file is looked for in
:data:`CONFIG_SEARCH` (``./dcrouter.toml``, then ``/etc/dcrouter/dcrouter.toml``)
and the one used is named on standard error.

Started as root with ``--uid/--gid``, the service tree is built as that user
and only the sockets are bound as root (:mod:`dcrouter.privileges`).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

from twisted.python import usage

from dcrouter.errors import ConfigError

#: Where ``twistd dcrouter`` without ``--config`` looks, in order.
CONFIG_SEARCH = ("dcrouter.toml", "/etc/dcrouter/dcrouter.toml")


def find_config(search: tuple[str, ...] = CONFIG_SEARCH) -> str:
    """The first existing file of ``search`` (ConfigError naming them all if none)."""
    for path in search:
        if os.path.isfile(path):
            return path
    shown = ", ".join(p if os.path.isabs(p) else f"./{p}" for p in search)
    raise ConfigError("--config", f"no configuration file given and none found (looked for "
                      f"{shown}); write one with `python -m dcrouter init` or pass "
                      f"--config FILE")


def _fail(error: ConfigError) -> None:
    sys.stderr.write(f"dcrouter: configuration error: {error}\n")
    sys.stderr.flush()
    raise SystemExit(2) from None


class Options(usage.Options):
    """``twistd dcrouter`` options."""

    synopsis = "[--config FILE]"
    longdesc = ("Runs dcrouter from a TOML configuration file (default: ./dcrouter.toml, "
                "else /etc/dcrouter/dcrouter.toml). See docs/configuration.md for every key.")
    optParameters = [
        ["config", "c", None, "TOML configuration file."],
    ]

    def postOptions(self) -> None:
        """Load and validate the file now, so errors come before any bind."""
        from dcrouter.config import load_config
        try:
            if self["config"] is None:
                found = find_config()
                self["config"] = found
                shown = found if os.path.isabs(found) else f"./{found}"
                sys.stderr.write(f"dcrouter: using {shown} (no --config given)\n")
                sys.stderr.flush()
            self["options"] = load_config(self["config"])
        except ConfigError as e:
            _fail(e)


def _drop_target(options: Options) -> Optional[Any]:
    from dcrouter.privileges import drop_target
    return drop_target(getattr(options, "parent", None))


def makeService(options: Options) -> Any:
    """Build the router's service tree from the validated options.

    With ``router.workers`` > 1 this process becomes the master of that many
    worker processes (:class:`dcrouter.workers.WorkerMaster`).
    """
    from dcrouter.logsetup import get_logger
    from dcrouter.privileges import check_log_file, prepare_state_dir, running_as
    config = options["options"]
    try:
        target = _drop_target(options)
        prepare_state_dir(config.router.state_dir, target)
        check_log_file(config.router.log_file, target)
        with running_as(target):
            service = _build(options)
    except ConfigError as e:
        _fail(e)
    log = get_logger("router")
    log.info("configuration {path}", path=os.path.abspath(options["config"]))
    if target is not None:
        log.info("binding as root, then running as {user}", user=target.describe())
    return service


def _build(options: Options) -> Any:
    if options["options"].router.effective_workers > 1:
        from dcrouter.workers import WorkerMaster
        return WorkerMaster(options["options"], options["config"])
    from dcrouter.daemon import make_daemon
    return make_daemon(options["options"], config_path=options["config"])

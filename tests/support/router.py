"""Running a DcRouter in the test's own reactor (pytest-twisted)."""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer

from dcrouter.config import DcRouterOptions, parse_config
from dcrouter.router import DcRouter, make_router
from dcrouter.service import Extensions


def options_from(data: dict[str, Any], state_dir: str) -> DcRouterOptions:
    """Validate config ``data`` with ``router.state_dir`` forced to ``state_dir``."""
    data = dict(data)
    router = dict(data.get("router", {}))
    router["state_dir"] = state_dir
    data["router"] = router
    return parse_config(data)


def start_router(options: DcRouterOptions, extensions: Optional[Extensions] = None,
                 config_path: Optional[str] = None) -> DcRouter:
    """Build and start a router; stop it with :func:`stop_router`."""
    router = make_router(options, config_path=config_path, extensions=extensions)
    router.startService()
    return router


def stop_router(router: DcRouter) -> defer.Deferred:
    """Stop a router started with :func:`start_router`."""
    return defer.maybeDeferred(router.stopService)


def port_of(router: DcRouter, service: str, index: int = 0, protocol: str = "tcp") -> int:
    """The real port of a service's ``index``-th listener of ``protocol``."""
    ports = [p for proto, _h, p in router.by_name[service].bound_addresses()
             if proto.split("+")[0] == protocol]
    return ports[index]

"""dcrouter: a datacenter traffic router on Twisted.

One process serves an email gateway/MTA, a TCP/TLS proxy, an authoritative
DNS server and a management API.  Build the service tree with
:func:`make_router` (the twistd plugin and ``etc/dcrouter.tac`` both do).
"""

__version__ = "0.1.0"


def make_router(*args, **kwargs):  # type: ignore[no-untyped-def]
    """Build a :class:`dcrouter.router.DcRouter`; see :func:`dcrouter.router.make_router`."""
    from dcrouter.router import make_router as _make_router
    return _make_router(*args, **kwargs)


__all__ = ["__version__", "make_router"]

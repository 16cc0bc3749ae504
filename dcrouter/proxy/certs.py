"""The certificate store of terminating routes, with an SNI callback.

Certificates come from three places, in this order of preference for a name:

1. files configured on a route (``cert_path``/``key_path``) for its domains,
2. ACME-issued certificates under ``state_dir/certs/acme/<name>.crt``,
3. a self-signed certificate for that one name (``dcrouter.tlsutil``), made
   once under ``state_dir/certs/self-signed/<name>.crt``, so a handshake
   always completes.

A client that sends no SNI, or a name no route serves, gets the default
certificate: self-signed for ``dcrouter-default.invalid`` only, so it learns
no name served here (the fallback used to list every terminate route's
names, ``internal.*`` ones included, to anyone who connected).

The server context (TLS >= 1.2, modern ciphers, ALPN ``h2`` where the route
allows HTTP/2 - :func:`alpn_protocols` - then ``http/1.1``) asks the
store for the certificate of the name in the ClientHello through
``OpenSSL.SSL.Context.set_tlsext_servername_callback``.

Self-signed certificates made here use ECDSA P-256 keys by default
(``[proxy] self_signed_key``; a handshake signs in tens of microseconds
instead of the millisecond of RSA-2048); files made earlier are kept as they
are.  Sessions resume (RFC 5077 tickets, TLS 1.3 tickets, and a session
cache): :meth:`CertStore.rotate_tickets` replaces the ticket keys.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Iterable, Optional

from cryptography import x509
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.protocol import Factory
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from dcrouter.logsetup import get_logger
from dcrouter.tlsutil import (ensure_private_dir, ensure_self_signed, load_certificate_options,
                              make_self_signed, write_private)

log = get_logger("proxy")

ALPN = b"http/1.1"
#: Session id context of every terminating context (sessions resume across certificates).
SESSION_ID_CONTEXT = b"dcrouter-proxy"


def acme_dir(state_dir: str) -> str:
    """Where ACME-issued certificates live."""
    return os.path.join(state_dir, "certs", "acme")


def acme_paths(state_dir: str, name: str) -> tuple[str, str]:
    """Certificate and key paths of the ACME certificate for ``name``."""
    safe = name.replace("*", "_wildcard_").replace("/", "_")
    base = acme_dir(state_dir)
    return os.path.join(base, f"{safe}.crt"), os.path.join(base, f"{safe}.key")


#: The name of the certificate for connections without SNI or with an unknown name.
DEFAULT_NAME = "dcrouter-default.invalid"


def self_signed_paths(state_dir: str, name: str) -> tuple[str, str]:
    """Certificate and key paths of the self-signed certificate for ``name``."""
    safe = name.replace("*", "_wildcard_").replace("/", "_")
    base = os.path.join(state_dir, "certs", "self-signed")
    return os.path.join(base, f"{safe}.crt"), os.path.join(base, f"{safe}.key")


def ensure_self_signed_for(state_dir: str, name: str,
                           key_type: str = "ecdsa") -> tuple[str, str]:
    """A self-signed certificate naming only ``name`` (made once, then kept)."""
    cert_path, key_path = self_signed_paths(state_dir, name)
    if not (os.path.exists(cert_path) and os.path.exists(key_path)):
        ensure_private_dir(os.path.dirname(cert_path))
        cert, key = make_self_signed([name], key_type=key_type)
        write_private(key_path, key)
        write_private(cert_path, cert)
    return cert_path, key_path


def certificate_expiry(cert_path: str) -> Optional[datetime.datetime]:
    """``notAfter`` of the first certificate in a PEM file (None if unreadable)."""
    try:
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError):
        return None
    return cert.not_valid_after_utc


H2 = b"h2"


def alpn_protocols(route: Any) -> tuple[bytes, ...]:
    """What a terminated route offers, preferred first: ``h2`` when the route is relayed
    as HTTP and keeps ``http2`` on, then ``http/1.1``."""
    if route.options.relays_http and route.options.http2:
        return (H2, ALPN)
    return (ALPN,)


def _select_alpn(connection: Any, offered: list[bytes]) -> Any:
    ours = getattr(connection.get_app_data(), "alpn_protocols", (ALPN,))
    for protocol in ours:
        if protocol in offered:
            return protocol
    return SSL.NO_OVERLAPPING_PROTOCOLS


@implementer(IOpenSSLContextFactory)
class CertStore:
    """Names -> server ``SSL.Context``; builds the context of terminating listeners."""

    def __init__(self, state_dir: str, key_type: str = "ecdsa") -> None:
        self.state_dir = state_dir
        self.key_type = key_type
        self.contexts: dict[str, SSL.Context] = {}
        self.sources: dict[str, str] = {}
        self.fallback: Optional[SSL.Context] = None
        self._server: Optional[SSL.Context] = None
        #: The certificate (OpenSSL X509) each context serves: a context cannot be asked
        #: without freezing it, and the console shows what is served.
        self.certificates: dict[SSL.Context, Any] = {}
        self._default_files: Optional[tuple[str, str, str]] = None
        self._default: Optional[SSL.Context] = None
        self._selector: Optional[_Selector] = None
        self._tls_factory: Optional[TLSMemoryBIOFactory] = None

    # -- building ------------------------------------------------------------
    def _context(self, cert_path: str, key_path: str, key_name: str) -> SSL.Context:
        options = load_certificate_options(cert_path, key_path, key_path_name=key_name,
                                           resumption=True)
        ctx = options.getContext()
        ctx.set_alpn_select_callback(_select_alpn)
        # one session id context for every certificate: a session (or ticket) made on
        # the context the SNI callback chose is resumable there again
        ctx.set_session_id(SESSION_ID_CONTEXT)
        self.certificates[ctx] = options.certificate
        return ctx

    def add(self, names: Iterable[str], cert_path: str, key_path: str, source: str,
            key_name: str = "proxy") -> None:
        """Serve ``cert_path`` for ``names`` (files win over ACME, ACME over the fallback)."""
        ctx = self._context(cert_path, key_path, key_name)
        rank = {"config": 0, "acme": 1}        # then self-signed
        for name in names:
            name = name.lower()
            if name in self.sources and rank.get(self.sources[name], 2) < rank.get(source, 2):
                continue
            self.contexts[name] = ctx
            self.sources[name] = source
            if name == "*":
                self._default_files = (cert_path, key_path, key_name)

    def load(self, routes: Iterable[Any]) -> None:
        """Load configured files, ACME certificates on disk and the fallback for ``routes``.

        Raises ConfigError naming the route when a configured file is unusable.
        """
        names: list[str] = []
        terminating = False
        for route in routes:
            if not route.tls.startswith("terminate"):
                continue
            terminating = True
            names.extend(d for d in route.domains if d != "*" and d not in names)
            if route.options.cert_path:
                self.add([d for d in route.domains if d != "*"] or ["*"],
                         route.options.cert_path, route.options.key_path, "config",
                         key_name=f"proxy.routes[{route.index}].cert_path")
        for name in names:
            if "*" in name:
                continue
            cert_path, key_path = acme_paths(self.state_dir, name)
            if os.path.exists(cert_path) and os.path.exists(key_path):
                self.add_acme(name)
        if not terminating:
            return
        ensure_private_dir(os.path.join(self.state_dir, "certs"))
        for name in names:
            if name not in self.contexts:
                cert_path, key_path = ensure_self_signed_for(self.state_dir, name,
                                                             self.key_type)
                self.add([name], cert_path, key_path, "self-signed")
        cert_path, key_path = ensure_self_signed(self.state_dir, DEFAULT_NAME,
                                                 key_type=self.key_type)
        self.fallback = self._context(cert_path, key_path, "proxy")
        if self._default_files is None:
            self._default_files = (cert_path, key_path, "proxy")

    def add_acme(self, name: str) -> bool:
        """(Re)load the ACME certificate for ``name`` from disk; False if unusable."""
        cert_path, key_path = acme_paths(self.state_dir, name)
        try:
            self.add([name], cert_path, key_path, "acme")
        except Exception as e:  # a broken file must not stop the proxy
            log.error("cannot load ACME certificate for {name}: {error}", name=name, error=str(e))
            return False
        return True

    # -- serving -------------------------------------------------------------
    def context_for(self, name: Optional[str]) -> SSL.Context:
        """The context for a requested name: exact, then ``*.`` wildcard, then fallback."""
        assert self.fallback is not None
        if name:
            name = name.rstrip(".").lower()
            if name in self.contexts:
                return self.contexts[name]
            labels = name.split(".")
            for i in range(1, len(labels)):
                wildcard = "*." + ".".join(labels[i:])
                if wildcard in self.contexts:
                    return self.contexts[wildcard]
        return self.contexts.get("*", self.fallback)

    def on_servername(self, connection: SSL.Connection) -> None:
        """The SNI callback: switch ``connection`` to the context of its name."""
        raw = connection.get_servername()
        name = raw.decode("ascii", "replace") if raw else None
        ctx = self.context_for(name)
        if ctx is not self._default:        # the session context serves the default itself
            connection.set_context(ctx)

    def getContext(self) -> SSL.Context:
        """The context every terminated connection starts with (old-style context factory).

        It serves the default certificate and is the OpenSSL *session context* of
        every connection, whatever certificate SNI selects: the session cache and
        the session-ticket keys (random, made by OpenSSL with the context) live
        here, so :meth:`rotate_tickets` replaces it.
        """
        if self._server is None:
            assert self._default_files is not None
            self._default = self.context_for(None)
            self._server = self._context(*self._default_files)
            self._selector = _Selector(self)
            self._server.set_tlsext_servername_callback(self._selector)
        return self._server

    def tls_factory(self) -> TLSMemoryBIOFactory:
        """The ``TLSMemoryBIOFactory`` of terminated connections (one per store: building
        one per connection converted this context factory every time)."""
        if self._tls_factory is None:
            self._tls_factory = TLSMemoryBIOFactory(self, False, Factory())
            self._tls_factory.noisy = False
        return self._tls_factory

    def rotate_tickets(self) -> None:
        """New session-ticket keys (and an empty session cache) for new connections.

        Tickets issued before no longer resume (those clients do one full
        handshake); connections in progress keep their context.
        """
        self._server = None

    def adopt_session_context(self, old: "CertStore") -> None:
        """Keep the previous store's session context (tickets stay valid across a reload
        that does not change the default certificate)."""
        if old._server is not None and old._selector is not None \
                and old._default_files == self._default_files:
            self._default = self.context_for(None)
            self._server = old._server
            self._selector = old._selector
            self._selector.store = self         # a used context cannot take a new callback


class _Selector:
    """The SNI callback of a session context, pointing at the current store (a reload
    swaps the store; the context, once used, cannot be given another callback)."""

    def __init__(self, store: CertStore) -> None:
        self.store = store

    def __call__(self, connection: SSL.Connection) -> None:
        self.store.on_servername(connection)

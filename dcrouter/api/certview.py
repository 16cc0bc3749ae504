"""The console's certificates-and-keys view: what each listener serves, ACME, DKIM.

Certificates are read from the live TLS objects (the proxy's store records
the certificate of each context it builds), not from the configuration, so
the view shows what a client gets *now* (after a reload that failed, the old
certificate is still the one served):

* the proxy's certificate store: every name of a terminating route with the
  certificate its SNI selects (configured file, ACME or self-signed), and the
  default certificate of connections without a known name;
* the SMTP server's certificate (STARTTLS and implicit TLS);
* the API's own when it speaks HTTPS.

ACME names come with their order state (valid, due, ordering, failed,
skipped) and the date of the next renewal; DKIM keys with their selector, the
TXT record they need and whether the DNS service serves it.  A warning is
raised for every certificate that expires within the renewal threshold
(``proxy.acme.renew_threshold_days``, 30 days without ACME).

:func:`gather` runs in a worker thread (DKIM keys are listed from disk and
their public halves computed; both are cached by file).
"""

from __future__ import annotations

import datetime
import os
import threading
from typing import Any, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from dcrouter.logsetup import get_logger
from dcrouter.service import RouterContext

log = get_logger("api.console")

DAY = 86400.0
#: Renewal threshold (days) for certificates when ACME is not configured.
DEFAULT_THRESHOLD_DAYS = 30


def _name_text(name: x509.Name) -> str:
    common = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    org = name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    parts = [str(a.value) for a in common[:1]] + [str(a.value) for a in org[:1]]
    return ", ".join(parts) or name.rfc4514_string()


def describe(cert: x509.Certificate, now: float) -> dict[str, Any]:
    """Subject, names, issuer, validity, fingerprint and key of one certificate."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        key_text = f"RSA {key.key_size}"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        key_text = f"EC {key.curve.name}"
    else:
        key_text = type(key).__name__.replace("PublicKey", "")
    not_after = cert.not_valid_after_utc.timestamp()
    return {
        "subject": _name_text(cert.subject),
        "names": names,
        "issuer": _name_text(cert.issuer),
        "self_signed": cert.issuer == cert.subject,
        "not_before": cert.not_valid_before_utc.timestamp(),
        "not_after": not_after,
        "days_left": round((not_after - now) / DAY, 1),
        "serial": format(cert.serial_number, "x"),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
        "key": key_text,
    }


def _from_store(store: Any, ctx: Any) -> Optional[x509.Certificate]:
    """The certificate a proxy context serves, as the store recorded it.

    Never ``SSL.Connection(ctx)``: pyOpenSSL freezes a context once a connection
    was made from it, and the store still sets its SNI callback later.
    """
    cert = (getattr(store, "certificates", None) or {}).get(ctx)
    try:
        return cert.to_cryptography() if cert is not None else None
    except Exception:
        return None


def _from_options(options: Any) -> Optional[x509.Certificate]:
    """The certificate of Twisted ``CertificateOptions``."""
    cert = getattr(options, "certificate", None)
    try:
        return cert.to_cryptography() if cert is not None else None
    except Exception:
        return None


def threshold_days(context: RouterContext) -> int:
    """The renewal threshold every certificate is held to."""
    proxy = context.options.proxy
    if proxy is not None and proxy.acme.enabled:
        return proxy.acme.renew_threshold_days
    return DEFAULT_THRESHOLD_DAYS


def served_certificates(context: RouterContext, now: float) -> list[dict[str, Any]]:
    """One entry per distinct certificate served, with where and for which names."""
    out: list[dict[str, Any]] = []
    proxy = context.services.get("proxy")
    store = getattr(proxy, "certs", None)
    contexts = dict(getattr(store, "contexts", {}) or {})
    sources = dict(getattr(store, "sources", {}) or {})
    grouped: dict[int, dict[str, Any]] = {}
    for name, ctx in sorted(contexts.items()):
        entry = grouped.get(id(ctx))
        if entry is None:
            cert = _from_store(store, ctx)
            if cert is None:
                continue
            entry = grouped[id(ctx)] = dict(describe(cert, now), service="proxy",
                                            source=sources.get(name, ""), served_for=[])
        entry["served_for"].append(name)
    out.extend(grouped.values())
    fallback = getattr(store, "fallback", None)
    if fallback is not None and id(fallback) not in grouped:
        cert = _from_store(store, fallback)
        if cert is not None:
            out.append(dict(describe(cert, now), service="proxy", source="default",
                            served_for=["(no SNI or an unknown name)"]))
    email = context.services.get("email")
    smtp = _from_options(getattr(getattr(email, "server", None), "tls_options", None))
    if smtp is not None and context.options.email is not None:
        configured = bool(context.options.email.tls.cert_path)
        out.append(dict(describe(smtp, now), service="smtp",
                        source="config" if configured else "self-signed",
                        served_for=["STARTTLS and implicit TLS"]))
    api = context.services.get("api")
    switchable = getattr(api, "tls", None)
    api_cert = _from_options(getattr(switchable, "options", None))
    if api_cert is not None and context.options.api is not None and context.options.api.https:
        out.append(dict(describe(api_cert, now), service="api",
                        source="config" if context.options.api.tls_cert else "self-signed",
                        served_for=["management API (HTTPS)"]))
    return out


def acme_orders(context: RouterContext, now: float) -> list[dict[str, Any]]:
    """Each ACME name: state, expiry, next renewal, failures, last error."""
    proxy_options = context.options.proxy
    proxy = context.services.get("proxy")
    if proxy_options is None or proxy is None or not proxy_options.acme.enabled:
        return []
    try:
        status = (proxy.get_stats() or {}).get("acme") or {}
    except Exception as e:
        log.failure("get_stats of proxy failed", error=str(e))
        return []
    threshold = proxy_options.acme.renew_threshold_days * DAY
    out = []
    for name, entry in sorted(status.items()):
        expires = _timestamp(entry.get("expires"))
        retry_at = entry.get("retry_at")
        failures = int(entry.get("failures") or 0)
        if entry.get("ordering"):
            state = "ordering"
        elif failures:
            state = "failed"
        elif entry.get("last_error"):
            state = "skipped"
        elif expires is None or expires - now < threshold:
            state = "due"
        else:
            state = "valid"
        renew_at = expires - threshold if expires is not None else None
        if state == "failed" and isinstance(retry_at, (int, float)):
            renew_at = float(retry_at)
        out.append({"name": name, "state": state, "expires": expires,
                    "days_left": round((expires - now) / DAY, 1) if expires else None,
                    "renew_at": max(now, renew_at) if renew_at is not None else None,
                    "failures": failures, "last_error": str(entry.get("last_error") or ""),
                    "retry_at": retry_at, "directory": proxy_options.acme.directory_url,
                    "challenge": proxy_options.acme.challenge})
    return out


def _timestamp(iso: Any) -> Optional[float]:
    if not isinstance(iso, str) or not iso:
        return None
    try:
        when = datetime.datetime.fromisoformat(iso)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


class DkimRecords:
    """Public DKIM records of the keys on disk, computed once per key file."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, int], tuple[str, int]] = {}
        self._lock = threading.Lock()

    def record(self, key: Any) -> tuple[str, int]:
        """(TXT value, key bits) of a :class:`~dcrouter.dkimkeys.DkimKey`."""
        try:
            st = os.stat(key.path)
            stamp = (key.path, st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = (key.path, 0, len(key.private_pem))
        with self._lock:
            hit = self._cache.get(stamp)
        if hit is not None:
            return hit
        from cryptography.hazmat.primitives import serialization
        private = serialization.load_pem_private_key(key.private_pem, password=None)
        bits = getattr(private, "key_size", 0)
        value = (key.public_record(), int(bits))
        with self._lock:
            if len(self._cache) > 1000:
                self._cache.clear()
            self._cache[stamp] = value
        return value


def _published_txt(zones: list[dict]) -> dict[str, list[str]]:
    """TXT values by absolute owner name (lower case, no dot), quotes and blanks removed."""
    out: dict[str, list[str]] = {}
    for zone in zones:
        for record in zone.get("records", []) if isinstance(zone, dict) else []:
            if record.get("type") != "TXT":
                continue
            name = str(record.get("name", "")).rstrip(".").lower()
            value = "".join(str(record.get("value", "")).replace('"', "").split())
            out.setdefault(name, []).append(value)
    return out


def signing_keys(context: RouterContext) -> set[tuple[str, str]]:
    """(domain, selector) of the keys the email service signs with (read in the reactor)."""
    email = context.services.get("email")
    signing = getattr(getattr(email, "processor", None), "signing", None)
    return set(getattr(signing, "ready_keys", ()) or ())


def dkim_keys(context: RouterContext, records: DkimRecords, zones: list[dict],
              loaded: set[tuple[str, str]]) -> list[dict[str, Any]]:
    """Blocking: each DKIM key with its record and whether DNS serves it and signing uses it
    (``loaded``: :func:`signing_keys`)."""
    store = context.dkim_keys
    published = _published_txt(zones)
    out = []
    for key in store.known_keys():
        try:
            value, bits = records.record(key)
        except Exception as e:  # a damaged key file is shown, not fatal
            out.append({"domain": key.domain, "selector": key.selector,
                        "record_name": key.record_name, "record": "", "bits": 0,
                        "error": f"cannot read the key: {type(e).__name__}",
                        "published": False, "signing": False, "path": key.path})
            continue
        wanted = "".join(value.split())
        served = published.get(key.record_name.lower(), [])
        p_value = wanted.partition("p=")[2]
        out.append({"domain": key.domain, "selector": key.selector,
                    "record_name": key.record_name, "record": value, "bits": bits,
                    "published": any(p_value and p_value in v for v in served),
                    "dns_served": bool(served),
                    "signing": (key.domain, key.selector) in loaded,
                    "path": key.path})
    return out


def warnings_for(certificates: list[dict], orders: list[dict], keys: list[dict],
                 threshold: int) -> list[dict[str, Any]]:
    """Certificates within the threshold (or expired), failed orders, unpublished keys."""
    out = []
    for cert in certificates:
        days = cert["days_left"]
        if days < threshold:
            where = ", ".join(cert["served_for"][:3])
            text = (f"{cert['service']} certificate for {where} "
                    + (f"expired {abs(days):.0f} days ago" if days < 0 else
                       f"expires in {days:.0f} days") + f" (renewal threshold {threshold} days)")
            out.append({"level": "error" if days < 7 else "warning", "kind": "expiry",
                        "subject": cert["subject"], "days_left": days, "message": text})
    for order in orders:
        if order["state"] == "failed":
            out.append({"level": "warning", "kind": "acme", "subject": order["name"],
                        "message": f"ACME order for {order['name']} failed "
                                   f"{order['failures']} time(s): {order['last_error']}"})
    for key in keys:
        if key.get("signing") and not key.get("published") and key.get("dns_served") is False:
            out.append({"level": "info", "kind": "dkim", "subject": key["record_name"],
                        "message": f"DKIM key {key['record_name']} signs mail but this router's "
                                   "DNS does not serve its record: publish it where the zone "
                                   "is hosted"})
    return out


"""Inbound authentication: SPF (pyspf), DKIM verification (dkimpy), DMARC alignment.

The result is one ``Authentication-Results:`` header (RFC 8601), e.g.::

    Authentication-Results: mx.example.net;
        spf=pass smtp.mailfrom=alice@example.com;
        dkim=pass header.d=example.com header.s=sel;
        dmarc=pass (p=reject) header.from=example.com

Every DNS query goes through dnspython to ``email.delivery.nameservers``
(or the system resolver when that list is empty), and the whole check runs
in a worker thread (:func:`twisted.internet.threads.deferToThread`), so the
reactor never waits for DNS.

DMARC uses the record of the From domain, else of its organisational
domain, which comes from the Public Suffix List (:mod:`dcrouter.psl`; the
file of Debian's ``publicsuffix`` package by default, a small built-in list
without it); relaxed alignment compares organisational domains, strict
alignment the exact domains.
"""

from __future__ import annotations

import dataclasses
import threading
from email.utils import getaddresses
from typing import Any, Callable, Optional

import dkim
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver
import spf
from twisted.internet import threads

from dcrouter.address import ar_value, header_text
from dcrouter.config.base import split_host_port
from dcrouter.psl import PublicSuffixList, default_list

MAX_HEADER_BYTES = 256 * 1024


class DnsClient:
    """Blocking TXT/A/MX look-ups through dnspython with the configured nameservers."""

    def __init__(self, nameservers: tuple[str, ...] = (), timeout: float = 10.0) -> None:
        if nameservers:
            self.resolver = dns.resolver.Resolver(configure=False)
            servers = []
            for item in nameservers:
                host, port = split_host_port(item, "email.delivery.nameservers", 53)
                servers.append(dns.nameserver.Do53Nameserver(host, port))
            self.resolver.nameservers = servers  # type: ignore[assignment]
        else:
            self.resolver = dns.resolver.Resolver()
        self.resolver.lifetime = timeout
        self.resolver.timeout = timeout
        self.timeout = timeout

    def spf_lookup(self, name: str, qtype: str, strict: bool = True,
                   timeout: float = 20) -> list[tuple[tuple[str, str], Any]]:
        """Answers in pyspf's ``DNSLookup`` format."""
        out: list[tuple[tuple[str, str], Any]] = []
        try:
            answers = self.resolver.resolve(name, qtype, lifetime=min(timeout, self.timeout),
                                            raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return out
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
            raise spf.TempError(f"DNS {e}") from None
        for rdata in answers:
            if qtype in ("A", "AAAA"):
                out.append(((name, qtype), rdata.address))
            elif qtype == "MX":
                out.append(((name, qtype), (rdata.preference, rdata.exchange)))
            elif qtype == "PTR":
                out.append(((name, qtype), rdata.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                out.append(((name, qtype), rdata.strings))
        return out

    def txt(self, name: str) -> list[bytes]:
        """TXT records of ``name``, each with its strings joined; [] when none."""
        try:
            answers = self.resolver.resolve(name, "TXT", raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers,
                dns.exception.Timeout, dns.name.LabelTooLong, dns.name.EmptyLabel):
            return []
        return [b"".join(r.strings) for r in answers]

    def dkim_dnsfunc(self, name: bytes, timeout: int = 5) -> Optional[bytes]:
        """dkimpy's ``dnsfunc``: the first TXT record of ``name``."""
        records = self.txt(name.decode("ascii", "replace").rstrip("."))
        return records[0] if records else None


# pyspf looks names up through its module-level DNSLookup; route that through
# the DnsClient of the thread doing the check (thread-local, so concurrent
# checks with different resolvers do not mix).
_local = threading.local()
_original_lookup: Callable[..., Any] = spf.DNSLookup


def _thread_lookup(name: str, qtype: str, strict: bool = True, timeout: float = 20) -> Any:
    client: Optional[DnsClient] = getattr(_local, "client", None)
    if client is None:
        return _original_lookup(name, qtype, strict, timeout)
    return client.spf_lookup(name, qtype, strict, timeout)


spf.DNSLookup = _thread_lookup


def organisational_domain(domain: str, psl: Optional[PublicSuffixList] = None) -> str:
    """``a.b.example.co.uk`` -> ``example.co.uk``; ``mail.example.com`` -> ``example.com``."""
    return (psl or default_list()).organisational_domain(domain)


def aligned(domain: str, from_domain: str, mode: str,
            psl: Optional[PublicSuffixList] = None) -> bool:
    """DMARC identifier alignment (``mode`` ``r`` relaxed or ``s`` strict)."""
    domain, from_domain = domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    if mode == "s":
        return domain == from_domain
    return organisational_domain(domain, psl) == organisational_domain(from_domain, psl)


def parse_dmarc(record: bytes) -> Optional[dict[str, str]]:
    """Tags of a ``v=DMARC1`` record, or None when it is not one."""
    text = record.decode("ascii", "replace")
    tags: dict[str, str] = {}
    for piece in text.split(";"):
        if "=" in piece:
            k, v = piece.split("=", 1)
            tags[k.strip().lower()] = v.strip()
    if tags.get("v", "").upper() != "DMARC1":
        return None
    return tags


@dataclasses.dataclass
class DkimSignatureResult:
    """One DKIM signature's verification."""

    result: str
    domain: str
    selector: str


@dataclasses.dataclass
class AuthResults:
    """The outcome of SPF, DKIM and DMARC for one message."""

    hostname: str
    spf: str
    spf_domain: str
    mail_from: str
    dkim: list[DkimSignatureResult]
    dmarc: str
    dmarc_policy: str
    from_domain: str

    def header(self) -> bytes:
        """The ``Authentication-Results:`` header line(s), CRLF-terminated.

        Every property value comes from the client (envelope, HELO, DKIM-Signature
        tags, From:) and is written by :func:`dcrouter.address.ar_value`: as a token
        when it is one, else as a quoted-string, never with CR/LF.  A sender whose
        local part is quoted is reported by its domain only (``smtp.mailfrom=domain``,
        RFC 8601 2.7.2), so no quoted-string of the client's choosing follows ``=``.
        """
        parts = [f"spf={self.spf} smtp.mailfrom={ar_value(self._mailfrom())}"]
        if self.dkim:
            for sig in self.dkim:
                parts.append(f"dkim={sig.result} header.d={ar_value(sig.domain)} "
                             f"header.s={ar_value(sig.selector)}")
        else:
            parts.append("dkim=none")
        dmarc = f"dmarc={self.dmarc}"
        if self.dmarc_policy:
            dmarc += f" (p={_comment(self.dmarc_policy)})"
        if self.from_domain:
            dmarc += f" header.from={ar_value(self.from_domain)}"
        parts.append(dmarc)
        text = (f"Authentication-Results: {header_text(self.hostname)};\r\n\t"
                + ";\r\n\t".join(parts) + "\r\n")
        return text.encode("utf-8", "replace")

    def _mailfrom(self) -> str:
        if not self.mail_from:
            return "postmaster@" + self.spf_domain
        if self.mail_from.startswith('"'):
            return self.spf_domain
        return self.mail_from

    @property
    def dmarc_rejects(self) -> bool:
        """DMARC failed and the domain asks for reject or quarantine."""
        return self.dmarc == "fail" and self.dmarc_policy in ("reject", "quarantine")


def _comment(text: str) -> str:
    """``text`` safe inside an RFC 5322 comment."""
    return "".join(c for c in header_text(text) if c not in "()\\")[:40]


def _read_message(path: str, limit: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(limit)


def _from_domain(message: bytes) -> str:
    head = message.split(b"\r\n\r\n", 1)[0][:MAX_HEADER_BYTES].decode("utf-8", "replace")
    values = []
    current: Optional[list[str]] = None
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t") and current is not None:
            current.append(line)
            continue
        current = None
        if line.lower().startswith("from:"):
            current = [line[5:]]
            values.append(current)
    if len(values) != 1:  # none, or several From headers: DMARC cannot apply (RFC 7489 6.6.1)
        return ""
    addresses = getaddresses(["".join(values[0])])
    if len(addresses) != 1 or "@" not in addresses[0][1]:
        return ""
    return addresses[0][1].rsplit("@", 1)[1].lower().rstrip(".")


class InboundAuthChecker:
    """Runs SPF, DKIM and DMARC for received messages, in a thread."""

    def __init__(self, hostname: str, nameservers: tuple[str, ...] = (),
                 timeout: float = 10.0, max_bytes: int = 52428800,
                 psl: Optional[PublicSuffixList] = None) -> None:
        self.hostname = hostname
        self.psl = psl or default_list()
        self.dns = DnsClient(nameservers, timeout)
        self.timeout = timeout
        self.max_bytes = max_bytes

    def check(self, path: str, client_ip: str, helo: str, mail_from: str) -> Any:
        """Fires with :class:`AuthResults` for the message file at ``path``."""
        return threads.deferToThread(self.check_blocking, path, client_ip, helo, mail_from)

    def check_blocking(self, path: str, client_ip: str, helo: str, mail_from: str
                       ) -> AuthResults:
        """The check itself (blocking; call in a thread)."""
        message = _read_message(path, self.max_bytes)
        _local.client = self.dns
        try:
            spf_result, _explanation = spf.check2(i=client_ip, s=mail_from, h=helo or "unknown",
                                                  timeout=self.timeout, querytime=self.timeout)
        except Exception:  # noqa: BLE001 - pyspf raises assorted errors on odd input
            spf_result = "temperror"
        finally:
            _local.client = None
        spf_domain = mail_from.rsplit("@", 1)[1].lower() if "@" in mail_from else helo.lower()
        signatures = self._verify_dkim(message)
        from_domain = _from_domain(message)
        dmarc, policy = self._dmarc(from_domain, spf_result, spf_domain, signatures)
        return AuthResults(self.hostname, spf_result, spf_domain, mail_from, signatures, dmarc,
                           policy, from_domain)

    def _verify_dkim(self, message: bytes) -> list[DkimSignatureResult]:
        out = []
        try:
            checker = dkim.DKIM(message, timeout=int(self.timeout))
            count = sum(1 for name, _v in checker.headers if name.lower() == b"dkim-signature")
        except Exception:  # noqa: BLE001 - unparsable message: no DKIM result
            return []
        for idx in range(count):
            try:
                ok = checker.verify(idx=idx, dnsfunc=self.dns.dkim_dnsfunc)
                result = "pass" if ok else "fail"
            except dkim.KeyFormatError:
                result = "permerror"
            except dkim.DKIMException:
                result = "fail" if checker.domain else "permerror"
            except Exception:  # noqa: BLE001 - dkimpy raises assorted errors on bad input
                result = "temperror"
            domain = (checker.domain or b"").decode("ascii", "replace")
            selector = (checker.selector or b"").decode("ascii", "replace")
            out.append(DkimSignatureResult(result, domain, selector))
        return out

    def _dmarc(self, from_domain: str, spf_result: str, spf_domain: str,
               signatures: list[DkimSignatureResult]) -> tuple[str, str]:
        if not from_domain:
            return "none", ""
        tags = None
        org = organisational_domain(from_domain, self.psl)
        for name in (from_domain, org) if org != from_domain else (from_domain,):
            for record in self.dns.txt(f"_dmarc.{name}"):
                tags = parse_dmarc(record)
                if tags is not None:
                    break
            if tags is not None:
                break
        if tags is None:
            return "none", ""
        policy = tags.get("p", "none").lower()
        if from_domain != org and "sp" in tags:
            policy = tags["sp"].lower()
        spf_ok = spf_result == "pass" and aligned(spf_domain, from_domain,
                                                  tags.get("aspf", "r").lower(), self.psl)
        dkim_ok = any(s.result == "pass" and aligned(s.domain, from_domain,
                                                     tags.get("adkim", "r").lower(), self.psl)
                      for s in signatures)
        return ("pass" if spf_ok or dkim_ok else "fail"), policy


__all__ = ["AuthResults", "DnsClient", "InboundAuthChecker", "aligned", "organisational_domain",
           "parse_dmarc"]

"""Options of the ``[email]`` section and its sub-tables.

Covers the SMTP server (``[email]``, ``[email.tls]``, ``[email.auth]``),
pattern routing (``[[email.domain_rules]]``), content scanning peers
(``[email.spamd]``, ``[email.clamd]``), global rate limits and inbound
authentication.  ``[email.queue]`` and ``[email.delivery]`` live in
:mod:`dcrouter.config.queue`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional

from dcrouter.config.base import (
    check_networks, check_non_negative, check_port, check_ports, check_positive, one_of, option,
)
from dcrouter.config.queue import DeliveryOptions, QueueOptions
from dcrouter.errors import ConfigError

MODES = ("forward", "mta", "process")
SCANNER_TYPES = ("spam", "virus", "attachment")
SCANNER_ACTIONS = ("tag", "reject")
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")

_LOCAL_PATTERN = re.compile(r"^[A-Za-z0-9!#$%&'+\-/=^_`{|}~.*?]+$")
_LABEL_PATTERN = re.compile(r"^(\*|[A-Za-z0-9?*]([A-Za-z0-9?*\-]*[A-Za-z0-9?*])?)$")


def check_address_pattern(value: str, path: str) -> str:
    """Validate a domain-rule glob pattern: ``local@domain`` with ``*`` and ``?``.

    Local part: RFC 5321 atext, dots, and wildcards.  Domain: dot-separated
    labels of letters, digits, hyphens and wildcards, no empty labels.
    A bare domain (``example.com``) is accepted as shorthand for ``*@example.com``.
    """
    pattern = value.strip()
    if not pattern:
        raise ConfigError(path, "pattern must not be empty")
    if "@" not in pattern:
        pattern = "*@" + pattern
    if pattern.count("@") != 1:
        raise ConfigError(path, f"malformed pattern '{value}': exactly one '@' expected")
    local, domain = pattern.split("@")
    if not local or not _LOCAL_PATTERN.match(local):
        raise ConfigError(path, f"malformed pattern '{value}': bad local part '{local}'")
    if not domain or domain.startswith(".") or domain.endswith(".") or ".." in domain:
        raise ConfigError(path, f"malformed pattern '{value}': bad domain '{domain}'")
    for label in domain.split("."):
        if len(label) > 63 or not _LABEL_PATTERN.match(label):
            raise ConfigError(path, f"malformed pattern '{value}': bad domain label '{label}'")
    return pattern


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmailTlsOptions:
    """Certificate and protocol settings shared by STARTTLS and implicit TLS."""

    cert_path: str = option("", doc="PEM certificate chain; empty: a self-signed certificate "
                            "is generated under state_dir/certs.", reload="rebind")
    key_path: str = option("", doc="PEM private key matching cert_path.", reload="rebind")
    ca_path: str = option("", doc="CA bundle offered to clients that present certificates.",
                          reload="rebind")
    min_version: str = option("TLSv1.2", check=one_of(*TLS_VERSIONS),
                              doc="Lowest TLS version accepted.", reload="rebind")
    ciphers: str = option("", doc="OpenSSL cipher string for TLS 1.2; empty: modern AEAD "
                          "ciphers with forward secrecy only.", reload="rebind")

    def validate(self, path: str) -> None:
        """cert_path and key_path come together."""
        if bool(self.cert_path) != bool(self.key_path):
            missing = "key_path" if self.cert_path else "cert_path"
            raise ConfigError(f"{path}.{missing}", "cert_path and key_path must be given together")


@dataclasses.dataclass(frozen=True, kw_only=True)
class UserOptions:
    """One AUTH account. ``password`` may be plain or hashed (see docs)."""

    username: str = option(doc="Login name.")
    password: str = option(doc="Plain text, or '{SCRYPT}...', '{SHA512-CRYPT}$6$...', "
                           "'{SSHA512}...' hashes.", secret=True)

    def validate(self, path: str) -> None:
        """Usernames must not be empty."""
        if not self.username:
            raise ConfigError(f"{path}.username", "must not be empty")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmailAuthOptions:
    """SMTP AUTH for inbound clients."""

    required: bool = option(False, doc="true: AUTH is required before MAIL FROM on every port.")
    methods: tuple[str, ...] = option(("PLAIN", "LOGIN"), doc="SASL mechanisms offered (over TLS "
                                      "only): PLAIN, LOGIN, XOAUTH2.")
    users: tuple[UserOptions, ...] = option((), doc="Accounts: { username, password }.")
    checker: str = option("", doc="'module:Class' of a twisted.cred checker to use as well "
                          "(e.g. for XOAUTH2 tokens).")
    max_failures_per_minute: int = option(5, check=check_positive,
                                          doc="Failed AUTH attempts per client IP per minute "
                                          "before 421 and close.")
    proxy_users: tuple[str, ...] = option((), doc="Logins allowed to give a different "
                                          "authorization identity in AUTH PLAIN and act as "
                                          "that user (authzid). Everyone else must leave it "
                                          "empty or equal to the login; a different one is "
                                          "a failed AUTH (535 5.7.8), as with Postfix/Cyrus.")

    def validate(self, path: str) -> None:
        """Only known mechanisms."""
        for i, method in enumerate(self.methods):
            one_of("PLAIN", "LOGIN", "XOAUTH2", "OAUTH2")(method, f"{path}.methods[{i}]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetAuthOptions:
    """Credentials dcrouter uses to log in to a forward target."""

    user: str = option("", doc="Username at the target.")
    password: str = option("", key="pass", doc="Password at the target (shown as '********' "
                           "by the API; sent only over TLS).", secret=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetOptions:
    """Where a forward (or process) rule relays its messages."""

    server: str = option(doc="Host name or IP of the downstream SMTP server.")
    port: int = option(25, check=check_port, doc="Its port.")
    use_tls: bool = option(False, doc="true: STARTTLS is required and the certificate verified.")
    authentication: Optional[TargetAuthOptions] = option(None, doc="AUTH at the target.")
    ca_path: str = option("", doc="CA bundle to verify the target with (default: system CAs).")

    def validate(self, path: str) -> None:
        """A server is required."""
        if not self.server:
            raise ConfigError(f"{path}.server", "must not be empty")
        if self.port == 0:
            raise ConfigError(f"{path}.port", "must be 1..65535, got 0")


_DKIM_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


def check_dkim_domain(value: str, path: str) -> str:
    """A signing domain (``d=``): lower-cased, IDNA A-labels, no trailing dot; '' stays ''."""
    domain = value.strip().rstrip(".").lower()
    if not domain:
        if value.strip():
            raise ConfigError(path, f"{value!r} is not a domain name")
        return ""
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise ConfigError(path, f"{value!r} is not a valid domain name") from None
    labels = domain.split(".")
    if len(domain) > 253 or not all(_DKIM_LABEL.match(label) for label in labels):
        raise ConfigError(path, f"{value!r} is not a valid domain name")
    return domain


def check_dkim_selector(value: str, path: str) -> str:
    """A selector (``s=``, RFC 6376 3.1): dot-separated labels of letters, digits, '-', '_'."""
    selector = value.strip()
    if not selector or not all(_DKIM_LABEL.match(label.lower()) for label in selector.split(".")):
        raise ConfigError(path, f"{value!r} is not a valid DKIM selector")
    return selector


def _check_dkim_domains(value: tuple[str, ...], path: str) -> tuple[str, ...]:
    out: list[str] = []
    for i, domain in enumerate(value):
        checked = check_dkim_domain(domain, f"{path}[{i}]")
        if not checked:
            raise ConfigError(f"{path}[{i}]", "must not be empty")
        if checked not in out:
            out.append(checked)
    return tuple(out)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DkimSigningOptions:
    """DKIM signing of mail from clients that may relay (OpenDKIM's Domain and Selector).

    dcrouter signs only mail from clients that authenticated with AUTH or are
    inside ``relay_networks``, and only when the ``From:`` header's domain is a
    signing domain: ``domains`` here (on every route), or a rule's own signing
    domain (``mta_options.dkim_sign``).  Keys exist for these domains only,
    created at start or on reload, never because of a message.
    """

    domains: tuple[str, ...] = option((), check=_check_dkim_domains,
                                      doc="Signing domains (d=): mail from relay-permitted or "
                                      "authenticated clients whose From: domain is one of these "
                                      "is signed, whatever its route. Keys: "
                                      "state_dir/dkim/<domain>/<selector>.key, created at start.")
    selector: str = option("dcrouter", check=check_dkim_selector,
                           doc="s= selector of the keys of `domains`.")
    sign_subdomains: bool = option(False, doc="Also sign mail whose From: domain is a "
                                   "subdomain of a signing domain, with the parent's d= "
                                   "(OpenDKIM's SubDomains; relaxed DMARC alignment).")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DkimOptions:
    """The rule's own DKIM signing identity; without it the rule's literal domain, generated key."""

    domain_name: str = option("", check=check_dkim_domain,
                              doc="d= domain this rule signs with (mail whose From: domain "
                              "is this domain); default: the domain of the rule's pattern "
                              "when it names one ('*@example.com').")
    key_selector: str = option("dcrouter", check=check_dkim_selector, doc="s= selector.")
    private_key_path: str = option("", doc="PEM RSA private key; empty: generated under "
                                   "state_dir/dkim/<domain>/<selector>.key.")
    private_key: str = option("", doc="The PEM key inline (prefer private_key_path).",
                              secret=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MtaOptions:
    """Settings of an mta-mode rule."""

    domain: str = option("", doc="Domain this rule delivers for (informational).")
    allow_local_delivery: bool = option(False, doc="Deliver to Maildirs instead of MX hosts.")
    local_delivery_path: str = option("", doc="Maildir root; one Maildir per local part. "
                                      "Default: state_dir/mail.")
    dkim_sign: bool = option(False, doc="DKIM-sign this rule's mail from relay-permitted or "
                             "authenticated clients whose From: domain is the rule's signing "
                             "domain (or one of email.dkim.domains).")
    dkim_options: Optional[DkimOptions] = option(None, doc="The rule's signing domain, "
                                                 "selector and key.")


def _check_scanner_type(value: str, path: str) -> str:
    """A built-in scanner type, or ``package.module:Class`` of a plug-in scanner."""
    if ":" in value:
        module, _, attr = value.partition(":")
        if module and attr:
            return value
    return one_of(*SCANNER_TYPES)(value, path)  # type: ignore[no-any-return]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScannerOptions:
    """One content scanner of a process rule."""

    type: str = option(check=_check_scanner_type,
                       doc="'spam', 'virus', 'attachment', or 'package.module:Class' (an "
                       "IContentScanner built without arguments).")
    action: str = option("tag", check=one_of(*SCANNER_ACTIONS), doc="'tag' or 'reject'.")
    threshold: float = option(5.0, doc="Spam score at or above which the message is spam.")
    blocked_extensions: tuple[str, ...] = option((), doc="Attachment extensions refused, "
                                                 "e.g. ['.exe']; matched case-insensitively.")
    subject_prefix: str = option("", doc="Prefix added to the Subject of tagged spam.")
    scan_zip: bool = option(True, doc="Also check the names inside ZIP attachments.")
    use_spamd: bool = option(True, doc="Ask spamd when [email.spamd] is configured.")
    use_clamd: bool = option(True, doc="Ask clamd when [email.clamd] is configured.")

    def validate(self, path: str) -> None:
        """Attachment scanners need extensions; a subject prefix is one line."""
        if "\r" in self.subject_prefix or "\n" in self.subject_prefix:
            raise ConfigError(f"{path}.subject_prefix", "must be one line")
        if self.type == "attachment" and not self.blocked_extensions:
            raise ConfigError(f"{path}.blocked_extensions",
                              "an attachment scanner needs at least one extension")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformationOptions:
    """One transformation: a ``type`` plus parameters of that type."""

    __extra_field__ = "params"

    type: str = option(doc="add_header, remove_header, rewrite_subject, dkim_sign, add_footer, "
                       "or 'package.module:Class'.")
    params: Mapping[str, Any] = option(default_factory=dict,
                                       doc="The other keys of the table.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuleRateLimits:
    """Rate limits of one rule."""

    max_messages_per_minute: Optional[int] = option(None, check=check_positive,
                                                    doc="Messages a minute for this rule.")
    max_recipients_per_message: Optional[int] = option(None, check=check_positive,
                                                       doc="Recipients per message.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DomainRuleOptions:
    """A pattern and what to do with mail to addresses it matches."""

    pattern: str = option(check=check_address_pattern,
                          doc="Glob on full addresses: '*@example.com', '*@*.example.net', "
                          "'user@*.example.com', '?' for one character.")
    mode: str = option(check=one_of(*MODES), doc="'forward', 'mta' or 'process'.")
    target: Optional[TargetOptions] = option(None, doc="Relay target (forward; optional for "
                                             "process).")
    mta_options: Optional[MtaOptions] = option(None, doc="mta settings.")
    content_scanning: bool = option(False, doc="Run the scanners (process mode).")
    scanners: tuple[ScannerOptions, ...] = option((), doc="Scanners, in order.")
    transformations: tuple[TransformationOptions, ...] = option((), doc="Transformations, "
                                                                "in order.")
    rate_limits: Optional[RuleRateLimits] = option(None, doc="Limits for this rule.")
    reject_on_dmarc_fail: bool = option(False, doc="Refuse mail whose DMARC evaluation fails "
                                        "and whose policy is reject or quarantine.")
    recipients: tuple[str, ...] = option((), doc="The addresses this rule accepts (full "
                                         "addresses or bare local parts, compared like "
                                         "patterns); any other gets '550 5.1.1 ... User unknown' "
                                         "at RCPT (Postfix's smtpd_reject_unlisted_recipient "
                                         "with relay_recipient_maps). Empty (and no "
                                         "recipients_file): every address the pattern matches.")
    recipients_file: str = option("", doc="A file of accepted addresses, one a line ('#' "
                                  "comments), read at start and on reload; adds to "
                                  "recipients.")
    recipient_check: str = option("", doc="'package.module:Class' of an IRecipientCheck "
                                  "(built without arguments) asked at RCPT whether an address "
                                  "exists: false is 550 5.1.1, an error 451 4.3.0.")

    def validate(self, path: str) -> None:
        """Mode-specific requirements; recipient entries are addresses or local parts."""
        if self.mode == "forward" and self.target is None:
            raise ConfigError(f"{path}.target", "forward mode needs a target = { server, port }")
        for i, entry in enumerate(self.recipients):
            if not entry or entry != entry.strip() or any(ord(c) < 33 for c in entry):
                raise ConfigError(f"{path}.recipients[{i}]",
                                  f"must be an address or a local part, got {entry!r}")
        if self.recipient_check and ":" not in self.recipient_check:
            raise ConfigError(f"{path}.recipient_check",
                              f"must be 'package.module:Class', got '{self.recipient_check}'")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpamdOptions:
    """SpamAssassin's spamd, spoken to over SPAMC."""

    host: str = option("127.0.0.1", doc="spamd host.")
    port: int = option(783, check=check_port, doc="spamd port.")
    timeout: float = option(30.0, check=check_positive, doc="Seconds per scan.")
    max_size: int = option(512000, check=check_positive, doc="Bytes sent to spamd at most.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClamdOptions:
    """ClamAV's clamd, spoken to over INSTREAM."""

    host: str = option("127.0.0.1", doc="clamd host.")
    port: int = option(3310, check=check_port, doc="clamd port.")
    timeout: float = option(30.0, check=check_positive, doc="Seconds per scan.")
    chunk_size: int = option(65536, check=check_positive, doc="INSTREAM chunk size.")


def _check_recursion(value: int, path: str) -> int:
    if not 1 <= value <= 100:
        raise ConfigError(path, f"must be 1..100, got {value}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScanLimitsOptions:
    """Budgets of the built-in scanners' pass over a message (as clamd.conf's Max* limits).

    A message that passes one, or holds an archive that cannot be read (broken,
    entries sharing data), gets the 'unscannable' verdict
    (Heuristics.Limits.Exceeded.MaxRatio ...). 0 turns a limit off."""

    max_scan_size: int = option(100 * 1024 * 1024, check=check_non_negative,
                                doc="Bytes decoded and unpacked per message, all parts and "
                                "archive members together (clamd MaxScanSize).")
    max_file_size: int = option(25 * 1024 * 1024, check=check_non_negative,
                                doc="Unpacked bytes of one archive member, declared or real "
                                "(clamd MaxFileSize).")
    max_files: int = option(10000, check=check_non_negative,
                            doc="MIME parts and archive members per message (clamd MaxFiles).")
    max_recursion: int = option(17, check=_check_recursion,
                                doc="Nesting of multiparts, attached messages and archives "
                                "(clamd MaxRecursion), 1..100.")
    max_ratio: float = option(100.0, check=check_non_negative,
                              doc="Unpacked-to-packed ratio of an archive member once it is "
                              "over 1 MiB (zip bombs inflate by 1000:1).")
    max_memory: int = option(1024 * 1024 * 1024, check=check_non_negative,
                             doc="Address space of a scan worker process in bytes "
                             "(RLIMIT_AS).")
    action: str = option("reject", check=one_of("reject", "tag"),
                         doc="'reject': 554 5.7.1 at DATA, whatever scan_fail_mode says; "
                         "'tag': accept, noted in X-Dcrouter-Scan (clamd without "
                         "AlertExceedsMax).")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GlobalRateLimits:
    """Rate limits across all rules (token buckets)."""

    max_messages_per_minute: Optional[int] = option(None, check=check_positive,
                                                    doc="All messages a minute.")
    max_messages_per_minute_per_ip: Optional[int] = option(None, check=check_positive,
                                                           doc="Messages a minute per client IP.")
    max_messages_per_minute_per_user: Optional[int] = option(None, check=check_positive,
                                                             doc="Messages a minute per AUTH user.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class InboundAuthOptions:
    """SPF, DKIM and DMARC checks of received mail."""

    enabled: bool = option(False, doc="Check SPF/DKIM/DMARC and add Authentication-Results.")
    timeout: float = option(10.0, check=check_positive, doc="Seconds for the DNS look-ups.")
    public_suffix_list: str = option(
        "/usr/share/publicsuffix/public_suffix_list.dat",
        doc="Public Suffix List file (publicsuffix.org format; Debian package 'publicsuffix') "
        "that gives DMARC its organisational domains. Missing or empty: a small built-in list "
        "and a warning in the log.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmailOptions:
    """The email gateway: SMTP listeners, routing, scanning, queue and delivery."""

    hostname: str = option("localhost", doc="Name in the greeting, HELO and Received headers.")
    listen: str = option("0.0.0.0", doc="Address the SMTP listeners bind.", reload="rebind")
    ports: tuple[int, ...] = option((25, 587, 465), check=check_ports,
                                    doc="SMTP listener ports.", reload="rebind")
    submission_ports: Optional[tuple[int, ...]] = option(
        None, check=check_ports, doc="Ports that require AUTH before MAIL FROM; default: 587 "
        "when listed in ports.", reload="rebind")
    implicit_tls_ports: Optional[tuple[int, ...]] = option(
        None, check=check_ports, doc="Ports speaking TLS from the first byte; default: 465 "
        "when listed in ports.", reload="rebind")
    banner: str = option("", doc="Greeting text after the hostname; default 'ESMTP dcrouter'.")
    max_message_size: int = option(52428800, check=check_positive,
                                   doc="Bytes; advertised in SIZE and enforced while streaming.")
    max_connections: int = option(1000, check=check_positive, doc="Concurrent SMTP sessions.")
    max_connections_per_ip: int = option(50, check=check_positive,
                                         doc="Concurrent SMTP sessions per client IP.")
    connection_timeout: float = option(300.0, check=check_positive,
                                       doc="Seconds of client silence before 421 and close.")
    max_recipients: int = option(1000, check=check_positive,
                                 doc="Recipients per message (452 4.5.3 beyond).")
    max_errors: int = option(10, check=check_positive,
                             doc="Unknown or invalid commands before 421 and close.")
    chunking: bool = option(True, doc="Offer CHUNKING (RFC 3030 BDAT) in EHLO; false: not "
                            "offered and BDAT answered 502 (Postfix: smtpd_discard_ehlo_keywords"
                            " = chunking).")
    dsn: bool = option(True, doc="Offer DSN (RFC 3461: NOTIFY, ORCPT, RET, ENVID) in EHLO; "
                       "false: not offered and those parameters answered '501 5.7.1 DSN "
                       "support is disabled' (Postfix: smtpd_discard_ehlo_keywords = dsn).")
    relay_networks: tuple[str, ...] = option(("127.0.0.0/8", "::1/128"), check=check_networks,
                                             doc="Clients that may relay to any domain without "
                                             "AUTH (Postfix mynetworks).")
    bare_newline: str = option(
        "normalize", check=one_of("normalize", "reject"),
        doc="A bare LF or bare CR from a client (RFC 5321 2.3.8 forbids both; SMTP "
        "smuggling uses them). DATA ends only at CRLF.CRLF either way. 'normalize': the "
        "line is taken as if it ended in CRLF and a bare CR is written as CRLF (Postfix 3.9's "
        "default smtpd_forbid_bare_newline = normalize); 'reject': the command or message is "
        "refused with '550 5.5.2 Error: bare <LF> received' and the connection closed.")
    bare_newline_exclusions: Optional[tuple[str, ...]] = option(
        None, check=check_networks, doc="Clients whose bare newlines are normalized even "
        "when bare_newline = 'reject' (Postfix's smtpd_forbid_bare_newline_exclusions); "
        "default: relay_networks.")
    default_mode: str = option("mta", check=one_of(*MODES),
                               doc="Mode for recipients no rule matches (relay-permitted or "
                               "authenticated senders only).")
    default_server: str = option("", doc="Relay host when default_mode = 'forward'.")
    default_port: int = option(25, check=check_port, doc="Its port.")
    default_tls: bool = option(False, doc="Require STARTTLS to default_server.")
    priority_order: str = option("most-specific", check=one_of("most-specific", "first-match"),
                                 doc="How rules are chosen when several match.")
    case_sensitive: bool = option(False, doc="Compare local parts case-sensitively.")
    route_cache_size: int = option(10000, check=check_non_negative,
                                   doc="Entries in the routing LRU cache (0 disables it).")
    scan_fail_mode: str = option("closed", check=one_of("open", "closed"),
                                 doc="When a scanner fails or times out (scan worker, spamd, "
                                 "clamd, plug-in): 'closed' answers 451 4.7.0 so the sender "
                                 "retries; 'open' accepts, tags X-Dcrouter-Scan and logs.")
    scan_timeout: float = option(30.0, check=check_positive,
                                 doc="Seconds per scanner; the built-in scan's worker process "
                                 "is killed when it overruns.")
    scan_workers: int = option(2, check=check_positive,
                               doc="Scan worker processes (the built-in scanners' CPU work "
                               "runs there, never in the gateway).")
    scan_limits: ScanLimitsOptions = option(default_factory=ScanLimitsOptions,
                                            doc="Budgets of the built-in scan.")
    tls: EmailTlsOptions = option(default_factory=EmailTlsOptions, doc="TLS settings.")
    auth: EmailAuthOptions = option(default_factory=EmailAuthOptions, doc="AUTH settings.")
    domain_rules: tuple[DomainRuleOptions, ...] = option((), doc="Routing rules.")
    queue: QueueOptions = option(default_factory=QueueOptions, doc="Delivery queue.")
    delivery: DeliveryOptions = option(default_factory=DeliveryOptions, doc="Outbound delivery.")
    spamd: Optional[SpamdOptions] = option(None, doc="Use spamd for spam scanning.")
    clamd: Optional[ClamdOptions] = option(None, doc="Use clamd for virus scanning.")
    rate_limits: GlobalRateLimits = option(default_factory=GlobalRateLimits,
                                           doc="Global rate limits.")
    inbound_auth: InboundAuthOptions = option(default_factory=InboundAuthOptions,
                                              doc="SPF/DKIM/DMARC checking.")
    dkim: DkimSigningOptions = option(default_factory=DkimSigningOptions,
                                      doc="DKIM signing domains and selector.")

    @property
    def effective_submission_ports(self) -> tuple[int, ...]:
        """submission_ports, or 587 when it is one of ``ports``."""
        if self.submission_ports is not None:
            return self.submission_ports
        return tuple(p for p in self.ports if p == 587)

    @property
    def effective_implicit_tls_ports(self) -> tuple[int, ...]:
        """implicit_tls_ports, or 465 when it is one of ``ports``."""
        if self.implicit_tls_ports is not None:
            return self.implicit_tls_ports
        return tuple(p for p in self.ports if p == 465)

    def validate(self, path: str) -> None:
        """Cross-field checks: special ports must be listener ports, patterns unique."""
        for name in ("submission_ports", "implicit_tls_ports"):
            for i, port in enumerate(getattr(self, name) or ()):
                if port not in self.ports:
                    raise ConfigError(f"{path}.{name}[{i}]",
                                      f"port {port} is not one of email.ports")
        if not self.ports:
            raise ConfigError(f"{path}.ports", "at least one port is needed")
        if self.default_mode == "forward" and not self.default_server:
            raise ConfigError(f"{path}.default_server",
                              "default_mode = 'forward' needs default_server")
        seen: dict[str, int] = {}
        for i, rule in enumerate(self.domain_rules):
            key = rule.pattern if self.case_sensitive else rule.pattern.lower()
            if key in seen:
                raise ConfigError(f"{path}.domain_rules[{i}].pattern",
                                  f"pattern '{rule.pattern}' repeats domain_rules[{seen[key]}]")
            seen[key] = i

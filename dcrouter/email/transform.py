"""Transformations of process mode: the built-in ones, the registry and loading by name.

Each ``[[email.domain_rules.transformations]]`` entry has a ``type`` and the
type's parameters.  Built in:

* ``add_header`` - ``header``, ``value``: append a header.
* ``remove_header`` - ``header``: remove every occurrence.
* ``rewrite_subject`` - ``prefix`` and/or ``suffix`` (not doubled when already there).
* ``dkim_sign`` - ``domain`` (default: the signing domains of ``[email.dkim]``),
  ``selector`` (default ``dcrouter``), ``private_key_path`` (default: generated
  under state_dir/dkim at start): signs the message as it stands, so put it
  last - but only mail from a session that may relay whose ``From:`` domain is
  that domain (:mod:`dcrouter.dkimpolicy`); other mail passes unsigned.
* ``add_footer`` - ``text`` and optionally ``html`` (default: the text,
  HTML-escaped): appended to the message's plain and HTML bodies; MIME
  structure and attachments are kept; signed or encrypted messages are left
  alone.

A type may also be ``"package.module:Class"`` (or a name registered through
``Extensions.transformations``); the class is called with the entry's
parameters as keyword arguments and must provide
:class:`dcrouter.interfaces.ITransformation`.
"""

from __future__ import annotations

import dataclasses
import html
import importlib
import re
from email.message import EmailMessage, Message
from typing import Any, Callable, Mapping, Optional

from zope.interface import implementer

from dcrouter.config.email import TransformationOptions, check_dkim_domain, check_dkim_selector
from dcrouter.dkimkeys import DEFAULT_SELECTOR, DkimKeyStore, DkimSignError, sign_message
from dcrouter.dkimpolicy import author_domain_of_header
from dcrouter.email.scanning import mime
from dcrouter.errors import ConfigError, DcRouterError
from dcrouter.interfaces import ITransformation
from dcrouter.logsetup import get_logger
from dcrouter.message import SessionInfo

log = get_logger("email.transform")


class TransformationError(DcRouterError):
    """A transformation could not be applied to a message."""


@dataclasses.dataclass
class TransformContext:
    """What a transformation may use besides the message.

    ``prepend`` collects raw header lines (bytes with CRLF) written before the
    serialised message; ``dkim_sign`` puts its signature there so the signed
    bytes are exactly the bytes stored, and the ``d=`` it signed with in
    ``dkim_signed``.  ``session`` is the SMTP session the message came in;
    ``dkim_signer`` the processor's :class:`~dcrouter.email.signing.SigningDecider`.
    """

    mail_from: str
    recipients: list[str]
    rule_pattern: str = ""
    dkim_keys: Optional[DkimKeyStore] = None
    correlation_id: str = ""
    prepend: list[bytes] = dataclasses.field(default_factory=list)
    session: Optional[SessionInfo] = None
    dkim_signer: Any = None
    dkim_signed: list[str] = dataclasses.field(default_factory=list)


def _required(params: Mapping[str, Any], name: str, kind: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise ConfigError(name, f"{kind} needs a non-empty string '{name}'")
    return value


_HEADER_NAME = re.compile(r"^[!-9;-~]+$")


def _header_name(params: Mapping[str, Any], kind: str) -> str:
    name = _required(params, "header", kind)
    if not _HEADER_NAME.match(name):
        raise ConfigError("header", f"'{name}' is not a valid header name")
    return name


@implementer(ITransformation)
class AddHeader:
    """Append ``header: value``."""

    thread_safe = True

    def __init__(self, header: str = "", value: str = "", **extra: Any) -> None:
        _reject_extra("add_header", extra)
        self.header = _header_name({"header": header}, "add_header")
        if "\r" in value or "\n" in value:
            raise ConfigError("value", "must be one line")
        self.value = value

    def transform(self, message: Message, context: TransformContext) -> None:
        """Add the header."""
        message[self.header] = self.value


@implementer(ITransformation)
class RemoveHeader:
    """Delete every ``header``."""

    thread_safe = True

    def __init__(self, header: str = "", **extra: Any) -> None:
        _reject_extra("remove_header", extra)
        self.header = _header_name({"header": header}, "remove_header")

    def transform(self, message: Message, context: TransformContext) -> None:
        """Remove the header."""
        del message[self.header]


@implementer(ITransformation)
class RewriteSubject:
    """Add a prefix and/or suffix to the Subject (once)."""

    thread_safe = True

    def __init__(self, prefix: str = "", suffix: str = "", **extra: Any) -> None:
        _reject_extra("rewrite_subject", extra)
        if not prefix and not suffix:
            raise ConfigError("prefix", "rewrite_subject needs a prefix or a suffix")
        for name, value in (("prefix", prefix), ("suffix", suffix)):
            if "\r" in value or "\n" in value:
                raise ConfigError(name, "must be one line")
        self.prefix = prefix
        self.suffix = suffix

    def transform(self, message: Message, context: TransformContext) -> None:
        """Rewrite the Subject."""
        subject = mime.header_text(message, "Subject") or ""
        new = subject
        if self.prefix and not new.startswith(self.prefix):
            new = f"{self.prefix.rstrip()} {new}" if new else self.prefix.rstrip()
        if self.suffix and not new.endswith(self.suffix):
            new = f"{new} {self.suffix.lstrip()}" if new else self.suffix.lstrip()
        if new != subject:
            del message["Subject"]
            message["Subject"] = new


@implementer(ITransformation)
class DkimSign:
    """Sign the message with DKIM (rsa-sha256, relaxed/relaxed)."""

    thread_safe = True

    def __init__(self, domain: str = "", selector: str = DEFAULT_SELECTOR,
                 private_key_path: str = "", **extra: Any) -> None:
        _reject_extra("dkim_sign", extra)
        for name, value in (("domain", domain), ("selector", selector),
                            ("private_key_path", private_key_path)):
            if not isinstance(value, str):
                raise ConfigError(name, "must be a string")
        self.domain = check_dkim_domain(domain, "domain")
        self.selector = check_dkim_selector(selector, "selector")
        self.private_key_path = private_key_path

    def transform(self, message: Message, context: TransformContext) -> None:
        """Sign the serialised message and prepend the signature - when the policy allows."""
        signer = context.dkim_signer
        if signer is None or context.dkim_keys is None:
            raise TransformationError("dkim_sign: no DKIM signer in this context")
        session = context.session
        if session is None or not session.may_relay:
            log.info("dkim_sign: not signing mail from a client that may not relay",
                     correlation_id=context.correlation_id)
            return
        data = b"".join(context.prepend) + mime.to_bytes(message)
        author = author_domain_of_header(data)
        candidates = signer.policy.transform_identities(self.domain, self.selector,
                                                        self.private_key_path)
        identity = signer.policy.choose(author, candidates)
        if identity is None or not signer.key_ready(identity):
            log.info("dkim_sign: not signing: {why}", why=(
                "no single From: address" if not author else
                f"From: domain {author} is not a signing domain" if identity is None else
                f"the key of {identity.domain} is not loaded"),
                correlation_id=context.correlation_id)
            return
        key = context.dkim_keys.get(identity.domain, identity.selector)
        if key is None:
            return
        try:
            context.prepend.insert(0, sign_message(data, key))
        except DkimSignError as e:
            log.error("dkim_sign: not signing: {error}", error=str(e),
                      correlation_id=context.correlation_id)
            return
        context.dkim_signed.append(identity.domain)


@implementer(ITransformation)
class AddFooter:
    """Append a footer to the plain-text and HTML bodies, MIME-safely."""

    thread_safe = True

    def __init__(self, text: str = "", html: Optional[str] = None, **extra: Any) -> None:
        _reject_extra("add_footer", extra)
        if not text and not html:
            raise ConfigError("text", "add_footer needs 'text' (and optionally 'html')")
        self.text = text
        self.html = html if html is not None else "<p>" + _escape(text) + "</p>"

    def transform(self, message: Message, context: TransformContext) -> None:
        """Append to every inline text/plain and text/html body part."""
        ctype = message.get_content_type()
        if ctype in ("multipart/signed", "multipart/encrypted", "application/pkcs7-mime"):
            return
        for part in mime.leaf_parts(message):
            if part.get_content_maintype() != "text" or \
                    part.get_content_disposition() == "attachment":
                continue
            subtype = part.get_content_subtype()
            if subtype not in ("plain", "html"):
                continue
            assert isinstance(part, EmailMessage)
            try:
                content = part.get_content()
            except (LookupError, ValueError):
                continue
            if subtype == "plain":
                new = content.rstrip("\r\n") + "\n\n-- \n" + self.text + "\n"
            else:
                match = re.search(r"</body\s*>", content, re.IGNORECASE)
                if match:
                    new = content[:match.start()] + self.html + content[match.start():]
                else:
                    new = content + self.html
            cte = "quoted-printable" if not new.isascii() else None
            part.set_content(new, subtype=subtype, charset="utf-8", cte=cte)


def _escape(text: str) -> str:
    return html.escape(text).replace("\n", "<br>")


def _reject_extra(kind: str, extra: Mapping[str, Any]) -> None:
    if extra:
        name = sorted(extra)[0]
        raise ConfigError(name, f"unknown parameter for {kind}")


#: Built-in transformation types.
BUILTIN: dict[str, Callable[..., Any]] = {
    "add_header": AddHeader,
    "remove_header": RemoveHeader,
    "rewrite_subject": RewriteSubject,
    "dkim_sign": DkimSign,
    "add_footer": AddFooter,
}


def load_class(spec: str, path: str) -> Callable[..., Any]:
    """Import ``package.module:Class``; ConfigError naming ``path`` when it fails."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(path, f"unknown transformation '{spec}'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(path, f"cannot import '{module_name}': {e}") from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ConfigError(path, f"'{module_name}' has no '{attr}'") from None
    return obj  # type: ignore[no-any-return]


def build_transformation(options: TransformationOptions, path: str,
                         registry: Optional[Mapping[str, Callable[..., Any]]] = None) -> Any:
    """An ITransformation for one configured entry; ConfigError with the key path."""
    type_path = f"{path}.type"
    factory = (registry or {}).get(options.type) or BUILTIN.get(options.type)
    if factory is None:
        if ":" not in options.type:
            raise ConfigError(type_path, f"unknown transformation '{options.type}'")
        factory = load_class(options.type, type_path)
    try:
        instance = factory(**dict(options.params))
    except ConfigError as e:
        raise ConfigError(f"{path}.{e.path}" if e.path else path, e.problem) from None
    except TypeError as e:
        raise ConfigError(path, f"bad parameters for '{options.type}': {e}") from None
    if not ITransformation.providedBy(instance) and not callable(getattr(instance, "transform",
                                                                         None)):
        raise ConfigError(type_path, f"'{options.type}' does not implement ITransformation")
    return instance


__all__ = ["AddFooter", "AddHeader", "BUILTIN", "DkimSign", "RemoveHeader", "RewriteSubject",
           "TransformContext", "TransformationError", "build_transformation", "load_class"]

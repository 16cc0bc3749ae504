"""dcrouter's configuration: TOML files loaded into frozen, typed option objects.

``load_config(path)`` reads and validates a file; every problem is a
:class:`dcrouter.errors.ConfigError` whose message names the key path.
The option classes live in one module per section.
"""

from dcrouter.config.api import ApiOptions
from dcrouter.config.dns import DnsOptions, RecordOptions, ZoneOptions
from dcrouter.config.email import (
    DkimOptions, DomainRuleOptions, EmailAuthOptions, EmailOptions, EmailTlsOptions, MtaOptions,
    ScannerOptions, TargetOptions, TransformationOptions,
)
from dcrouter.config.loader import load_config, parse_config, parse_config_text
from dcrouter.config.options import DcRouterOptions
from dcrouter.config.proxy import AcmeOptions, ProxyOptions, ProxyRouteOptions
from dcrouter.config.queue import DeliveryOptions, QueueOptions
from dcrouter.config.router import RouterOptions

__all__ = [
    "AcmeOptions", "ApiOptions", "DcRouterOptions", "DeliveryOptions", "DkimOptions",
    "DnsOptions", "DomainRuleOptions", "EmailAuthOptions", "EmailOptions", "EmailTlsOptions",
    "MtaOptions", "ProxyOptions", "ProxyRouteOptions", "QueueOptions", "RecordOptions",
    "RouterOptions", "ScannerOptions", "TargetOptions", "TransformationOptions", "ZoneOptions",
    "load_config", "parse_config", "parse_config_text",
]

"""twistd plugin: ``twistd -n dcrouter --config etc/dcrouter.toml``."""

from twisted.application.service import ServiceMaker

dcrouter = ServiceMaker(
    "dcrouter",
    "dcrouter.tap",
    "Datacenter traffic router: email gateway, TCP/TLS proxy, DNS and management API.",
    "dcrouter",
)

# dcrouter configured in Python: twistd -ny etc/dcrouter.tac
#
# Builds the same service tree as `twistd -n dcrouter --config etc/dcrouter.toml`,
# for people who configure in code: load (or build) the options, add plug-ins
# through Extensions, and hand them to make_router.
import os

from twisted.application import service

from dcrouter import make_router
from dcrouter.config import load_config
from dcrouter.service import Extensions

config_path = os.environ.get("DCROUTER_CONFIG", "etc/dcrouter.toml")
options = load_config(config_path)
extensions = Extensions()          # e.g. Extensions(scanners=[MyScanner()])

application = service.Application("dcrouter")
make_router(options, config_path=config_path, extensions=extensions,
            exit_on_error=True).setServiceParent(application)

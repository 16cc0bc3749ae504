"""``python -m dcrouter init [DIR]``: a working configuration for an installed dcrouter.

A ``pip install dcrouter`` has no ``etc/``: the default configuration ships
inside the package (``dcrouter/defaults/dcrouter.toml``, the same file as the
checkout's ``etc/dcrouter.toml``).  ``init`` writes it to ``DIR/dcrouter.toml``
(mode 0600) with

* a fresh random ``api.token`` (the API then needs it, even on loopback);
* the demo user's password replaced by a fresh random one, stored hashed
  (SCRYPT), and shown once;
* ``state_dir`` and the paths under it made absolute (``DIR/var``), so the file
  works from any working directory;

and prints the commands that start it.  An existing file is never overwritten.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
from importlib import resources
from typing import TextIO

from dcrouter.errors import ConfigError

#: The embedded default configuration, inside the package.
DEFAULT_RESOURCE = ("dcrouter", "defaults/dcrouter.toml")


def default_config_text() -> str:
    """The embedded default configuration."""
    package, name = DEFAULT_RESOURCE
    return resources.files(package).joinpath(name).read_text(encoding="utf-8")


def render(directory: str, token: str, password_hash: str) -> str:
    """The default configuration for ``directory`` with this token and demo password hash."""
    text = default_config_text()
    state = os.path.join(os.path.abspath(directory), "var")

    def quoted(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    replacements = [
        (r'^state_dir = "var"', f"state_dir = {quoted(state)}"),
        (r'^persistent_path = "var/queue"', f"persistent_path = {quoted(state + '/queue')}"),
        (r'local_delivery_path = "var/mail"',
         f"local_delivery_path = {quoted(state + '/mail')}"),
        (r'password = "change-me"', f"password = {quoted(password_hash)}"),
        (r'^token = ""', f"token = {quoted(token)}"),
    ]
    for pattern, replacement in replacements:
        text, count = re.subn(pattern, replacement.replace("\\", "\\\\"), text, count=1,
                              flags=re.M)
        if count != 1:
            raise ConfigError("init", f"the embedded configuration has no {pattern!r}")
    return text


def start_commands(directory: str) -> list[str]:
    """What to type to start the configuration in ``directory``."""
    bin_dir = os.path.dirname(sys.executable)
    twistd = os.path.join(bin_dir, "twistd")
    if not os.path.exists(twistd):
        twistd = "twistd"
    return [f"cd {directory}", f"{twistd} -n --pidfile= dcrouter"]


def init(directory: str, out: TextIO) -> int:
    """Write ``directory/dcrouter.toml``; print the secrets once and the start commands."""
    from dcrouter.config import parse_config_text
    from dcrouter.email.auth import hash_password
    directory = os.path.abspath(directory)
    path = os.path.join(directory, "dcrouter.toml")
    if os.path.exists(path):
        raise ConfigError(path, "already exists; init writes a new file only (remove it or "
                          "choose another directory)")
    token = secrets.token_urlsafe(32)
    password = secrets.token_urlsafe(12)
    text = render(directory, token, hash_password(password, "SCRYPT"))
    parse_config_text(text, "dcrouter.toml")  # what is written must load
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise ConfigError(path, f"cannot write: {e.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    out.write(f"wrote {path}\n"
              f"  api.token:           {token}\n"
              f"  user demo, password: {password}   (stored hashed; shown only now)\n"
              "start it with:\n")
    for command in start_commands(directory):
        out.write(f"  {command}\n")
    out.write("then try: swaks --server 127.0.0.1:2525 --to alice@localhost "
              "(mail lands in var/mail/alice/new/)\n")
    return 0

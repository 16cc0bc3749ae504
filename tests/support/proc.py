"""Running dcrouter as a real ``twistd`` process in tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def twistd_env() -> dict[str, str]:
    """Environment in which twistd finds the dcrouter plugin of this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


class TwistdProcess:
    """``twistd -n dcrouter --config FILE`` (or ``-ny TAC``) in a working directory."""

    def __init__(self, cwd: str, config: Optional[str] = None, tac: Optional[str] = None,
                 extra_env: Optional[dict[str, str]] = None) -> None:
        if tac:
            args = [TWISTD, "-n", "--pidfile=", "-y", tac]
        else:
            args = [TWISTD, "-n", "--pidfile=", "dcrouter", "--config", config or "dcrouter.toml"]
        env = twistd_env()
        env.update(extra_env or {})
        self.log_path = os.path.join(cwd, "twistd.out")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def output(self) -> str:
        """Everything the process printed so far."""
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def signal(self, sig: int) -> None:
        """Send a signal."""
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        """SIGKILL."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for exit."""
        return self.proc.wait(timeout)


def run_cli(*args: str, cwd: Optional[str] = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m dcrouter ARGS`` -> CompletedProcess with text output."""
    return subprocess.run([sys.executable, "-m", "dcrouter", *args], cwd=cwd or REPO,
                          env=twistd_env(), capture_output=True, text=True, timeout=timeout)


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05) -> None:  # type: ignore
    """Poll ``predicate()`` until it is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)

"""A scan worker process: ``python -m dcrouter.email.scanning.worker [--memory BYTES]``.

Reads one JSON request a line on stdin (``id``, ``path``, ``features``,
``limits``, ``timeout``, ``blocked``), runs :func:`~dcrouter.email.scanning.analysis.analyse_file`
and writes one JSON reply a line on stdout (after ``{"ready": true}`` once its
imports are done): ``{"id", "report"}`` or
``{"id", "error", "text"}`` (``error`` is ``time``, ``memory``, ``io`` or
``internal``).  It exits at the end of stdin, that is when the gateway goes.

Before the first request it lowers its CPU priority (nice 10: SMTP sessions
come first), caps its address space (``--memory``), disables core dumps and
ignores SIGINT (a Ctrl-C meant for the gateway must not print tracebacks
here; the gateway stops its workers itself).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import traceback
from typing import IO, Any, Optional

#: Longest request line read.
MAX_REQUEST = 1 << 20


def restrict(memory: int) -> None:
    """Lower priority, cap memory, no core files, no SIGINT."""
    try:
        os.nice(10)
    except OSError:
        pass
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory > 0:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard == resource.RLIM_INFINITY or memory < hard:
            resource.setrlimit(resource.RLIMIT_AS, (memory, hard))
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def handle(request: dict[str, Any]) -> dict[str, Any]:
    """One request to one reply (never raises)."""
    from dcrouter.email.scanning.analysis import analyse_file
    from dcrouter.email.scanning.limits import Limits, ScanTimeExceeded
    job = request.get("id")
    try:
        report = analyse_file(str(request["path"]), request.get("features", ()),
                              Limits.from_mapping(request.get("limits", {})),
                              float(request.get("timeout", 0.0)),
                              request.get("tmp_dir") or None,
                              request.get("blocked"))
        return {"id": job, "report": report}
    except ScanTimeExceeded as e:
        return {"id": job, "error": "time", "text": str(e)}
    except MemoryError:
        return {"id": job, "error": "memory", "text": "scan worker out of memory"}
    except OSError as e:
        return {"id": job, "error": "io", "text": f"cannot read the message: {e.strerror}"}
    except Exception as e:  # noqa: BLE001 - a bug must answer, not hang the gateway
        traceback.print_exc(limit=20, file=sys.stderr)
        sys.stderr.flush()
        return {"id": job, "error": "internal", "text": f"scan failed: {type(e).__name__}"}


def serve(stdin: IO[bytes], stdout: IO[bytes]) -> None:
    """Answer requests until the end of ``stdin``."""
    while True:
        line = stdin.readline(MAX_REQUEST)
        if not line:
            return
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            reply: dict[str, Any] = {"id": None, "error": "internal", "text": "bad request"}
        else:
            reply = handle(request)
        stdout.write(json.dumps(reply).encode("ascii") + b"\n")
        stdout.flush()


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the worker process."""
    parser = argparse.ArgumentParser(prog="dcrouter-scan-worker")
    parser.add_argument("--memory", type=int, default=0, help="address space cap in bytes")
    args = parser.parse_args(argv)
    restrict(args.memory)
    import dcrouter.email.scanning.analysis  # noqa: F401 - import before the first request
    sys.stdout.buffer.write(b'{"ready": true}\n')   # the pool sends jobs from now on
    sys.stdout.buffer.flush()
    serve(sys.stdin.buffer, sys.stdout.buffer)
    return 0


if __name__ == "__main__":
    sys.exit(main())

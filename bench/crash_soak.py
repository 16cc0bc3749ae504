"""Crash soak: SIGKILL a real twistd dcrouter many times while mail flows; nothing acknowledged is lost.

Runs the end-to-end cycle of ``tests/delivery/test_crash_e2e.py`` (forward rule
to an aiosmtpd sink, smtplib sender, kill -9 at random moments, restart) for
more cycles than the suite does, then reports how many messages were
acknowledged with 250 and how many of them reached the sink (must be all).

    python bench/crash_soak.py --cycles 300
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    """Run the cycles and print the counts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-delay", type=float, default=1.0,
                        help="longest run of the router before the kill (seconds)")
    args = parser.parse_args()
    from tests.delivery.test_crash_e2e import run_cycles
    workdir = tempfile.mkdtemp(prefix="crash-soak-")
    started = time.monotonic()
    try:
        result = run_cycles(workdir, args.cycles, seed=args.seed, max_delay=args.max_delay,
                            final_timeout=300)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started
    print(f"cycles:                 {result['cycles']} (kill -9 after 0..{args.max_delay}s)")
    print(f"acknowledged (250):     {result['acked']}")
    print(f"delivered (distinct):   {result['delivered']}")
    print(f"sink messages (dups):   {result['sink_messages']}")
    print("lost:                   0 (run_cycles fails otherwise)")
    print(f"time:                   {elapsed:.0f} s")


if __name__ == "__main__":
    main()

"""kill -9 of a process enqueueing into the disk queue: every acknowledged item survives."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest_twisted

from dcrouter.queue.disk import DiskStore
from tests.support.proc import REPO, twistd_env


def run_child_until_killed(state_dir: str, start: int, rng: random.Random) -> list[tuple[str, int]]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.queue.crash_child", state_dir,
                             str(start)], cwd=REPO, env=twistd_env(), stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == b"READY", line
    time.sleep(rng.uniform(0.02, 0.3))
    proc.send_signal(signal.SIGKILL)
    out = proc.stdout.read()
    proc.wait(10)
    acks = []
    for raw in out.splitlines():
        parts = raw.split()
        if len(parts) == 3 and parts[0] == b"ACK":
            acks.append((parts[1].decode(), int(parts[2])))
    return acks


@pytest_twisted.inlineCallbacks
def test_acknowledged_items_survive_sigkill(tmp_path):
    rng = random.Random(4)
    state = str(tmp_path)
    acked: dict[str, int] = {}
    start = 0
    for cycle in range(8):
        acks = run_child_until_killed(state, start, rng)
        acked.update(acks)
        start += 100000
        store = DiskStore(os.path.join(state, "queue"))
        items = yield store.open()
        by_id = {item.id: item for item in items}
        missing = [i for i in acked if i not in by_id]
        assert not missing, f"cycle {cycle}: acknowledged items lost: {missing[:5]}"
        for item_id, token in acked.items():
            body = yield store.read_body(by_id[item_id])
            assert b"X-Token: %d\r\n" % token in body
        assert os.listdir(store.corrupt_dir) == [], "a crash leaves no corrupt files"
        yield store.close()
    assert len(acked) > 20, "the child acknowledged messages before being killed"

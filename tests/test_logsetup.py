"""Logging: JSON lines, per-subsystem levels and sampling of high-volume events."""

from __future__ import annotations

import io
import json
import os

import pytest_twisted

from twisted.logger import Logger

from dcrouter.config import parse_config
from dcrouter.config.toml_writer import dumps
from dcrouter.logsetup import SamplingPredicate, get_logger, make_observer
from tests.support.router import start_router, stop_router


def _emit(observer, namespace: str, level: str, **fields):
    log = Logger(namespace=namespace, observer=observer)
    getattr(log, level)("event {n}", n=fields.pop("n", 0), **fields)


def test_json_lines_with_fields():
    out = io.StringIO()
    options = parse_config({"router": {"log_format": "json"}}).router
    observer = make_observer(options, out)
    _emit(observer, "dcrouter.email.server", "info", n=7, correlation_id="abc", client_ip="::1")
    line = json.loads(out.getvalue())
    assert line["message"] == "event 7"
    assert line["level"] == "info" and line["namespace"] == "dcrouter.email.server"
    assert line["correlation_id"] == "abc" and line["client_ip"] == "::1"


def test_levels_per_subsystem():
    out = io.StringIO()
    options = parse_config({"router": {"log_format": "json", "log_level": "warn",
                                       "log_levels": {"email.delivery": "debug"}}}).router
    observer = make_observer(options, out)
    _emit(observer, "dcrouter.email.delivery", "debug", n=1)
    _emit(observer, "dcrouter.email.server", "info", n=2)
    _emit(observer, "dcrouter.email.server", "error", n=3)
    messages = [json.loads(l)["message"] for l in out.getvalue().splitlines()]
    assert messages == ["event 1", "event 3"]


def test_sampling_only_touches_marked_events():
    values = iter([0.05, 0.95, 0.05, 0.95])
    predicate = SamplingPredicate(0.1, rng=lambda: next(values))
    from twisted.logger import PredicateResult
    assert predicate({"sampled": True}) == PredicateResult.maybe
    assert predicate({"sampled": True}) == PredicateResult.no
    assert predicate({}) == PredicateResult.maybe


def test_sample_rate_from_config():
    out = io.StringIO()
    options = parse_config({"router": {"log_format": "json", "log_sample_rate": 0.5}}).router
    observer = make_observer(options, out)
    log = Logger(namespace="dcrouter.proxy", observer=observer)
    for i in range(400):
        log.info("conn {i}", i=i, sampled=True)
    log.info("always")
    lines = out.getvalue().splitlines()
    assert 100 < len(lines) - 1 < 300
    assert json.loads(lines[-1])["message"] == "always"


def test_get_logger_namespace():
    assert get_logger("email.delivery").namespace == "dcrouter.email.delivery"


def test_apply_changes_levels_and_format_in_place():
    out = io.StringIO()
    observer = make_observer(parse_config({"router": {"log_level": "warn"}}).router, out)
    _emit(observer, "dcrouter.email.server", "info", n=1)
    observer.apply(parse_config({"router": {"log_level": "info", "log_format": "json"}}).router)
    _emit(observer, "dcrouter.email.server", "info", n=2)
    assert [json.loads(l)["message"] for l in out.getvalue().splitlines()] == ["event 2"]


@pytest_twisted.inlineCallbacks
def test_reload_reopens_the_log_file_after_logrotate(tmp_path):
    """SIGHUP after logrotate moved the file: new lines go to a new file at the same path."""
    log_path = tmp_path / "dcrouter.log"
    config = tmp_path / "dcrouter.toml"
    data = {"router": {"state_dir": str(tmp_path / "state"), "log_file": str(log_path)}}
    config.write_text(dumps(data))
    router = start_router(parse_config(data), config_path=str(config))
    try:
        _emit(router.log_observer, "dcrouter.router", "warn", n=1)
        os.rename(log_path, tmp_path / "dcrouter.log.1")
        _emit(router.log_observer, "dcrouter.router", "warn", n=2)   # still the old file
        assert (yield router.reload()) is True
        _emit(router.log_observer, "dcrouter.router", "warn", n=3)
        rotated = (tmp_path / "dcrouter.log.1").read_text()
        assert "event 1" in rotated and "event 2" in rotated and "event 3" not in rotated
        assert "event 3" in log_path.read_text()
        # a log file that cannot be opened refuses the reload and keeps the current one
        data["router"]["log_file"] = str(tmp_path / "no-such-dir" / "x.log")
        config.write_text(dumps(data))
        assert (yield router.reload()) is False
        _emit(router.log_observer, "dcrouter.router", "warn", n=4)
        assert "event 4" in log_path.read_text()
    finally:
        yield stop_router(router)


def test_text_lines_match_twisteds_with_the_time_stamp_cached():
    """The text observer writes exactly textFileLogObserver's lines; the time stamp is
    worked out once a second, not per event."""
    import io
    import time as _time

    from twisted.logger import LogLevel, formatEventAsClassicLogText

    from dcrouter.logsetup import SecondTimeFormatter, text_observer

    now = _time.time()
    events = [dict(log_format="m {n}", n=n, log_time=now + n * 0.4, log_namespace="dcrouter.x",
                   log_level=LogLevel.info) for n in range(6)]
    out = io.StringIO()
    observer = text_observer(out)
    for event in events:
        observer(event)
    assert out.getvalue() == "".join(formatEventAsClassicLogText(e) for e in events)
    stamp = SecondTimeFormatter()
    assert stamp(None) == "-" and stamp(now) is stamp(int(now) + 0.99)

"""MultiModeProcessor over real spool files and a recording queue."""

from __future__ import annotations

import os
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from zope.interface import implementer

from dcrouter.email.processor import MultiModeProcessor
from dcrouter.email.routing import DomainRouter
from dcrouter.email.scanning import ScanResult
from dcrouter.email.scanning.virus import EICAR
from dcrouter.errors import ConfigError, PolicyRejection
from dcrouter.interfaces import IContentScanner, ITransformation
from dcrouter.service import Extensions, RouterContext
from tests.email.support import (
    RecordingQueue, Suppression, make_processor, multipart, session, simple_message, spool,
    transaction, transport_of,
)
from tests.support.router import options_from
from tests.support.net import free_port

FORWARD = {"pattern": "*@fwd.test", "mode": "forward",
           "target": {"server": "127.0.0.1", "port": 2626, "use_tls": True,
                      "authentication": {"user": "u", "pass": "p"}, "ca_path": "/ca.pem"}}
LOCAL = {"pattern": "*@local.test", "mode": "mta",
         "mta_options": {"allow_local_delivery": True}}
MX = {"pattern": "*@mx.test", "mode": "mta", "mta_options": {"dkim_sign": True}}
PROCESS = {"pattern": "*@proc.test", "mode": "process", "content_scanning": True,
           "scanners": [{"type": "spam", "threshold": 5.0, "action": "tag",
                         "subject_prefix": "[SPAM]"},
                        {"type": "virus", "action": "reject"},
                        {"type": "attachment", "blocked_extensions": [".exe"],
                         "action": "reject"}],
           "transformations": [{"type": "add_header", "header": "X-Gateway",
                                "value": "dcrouter"}]}


def rejection(excinfo: Any) -> tuple[int, str, str]:
    e = excinfo.value
    return e.code, e.enhanced, e.reason


@pytest_twisted.inlineCallbacks
def test_split_by_rule_into_modes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tmp = str(tmp_path)
    processor, queue = make_processor(tmp, {"domain_rules": [FORWARD, LOCAL, MX, PROCESS]})
    rcpts = ["a@fwd.test", "b@local.test", "c@mx.test", "d@proc.test", "e@fwd.test",
             "f@elsewhere.test"]
    ids = yield transaction(processor, tmp, simple_message(), "alice@sender.test", rcpts)
    reqs = queue.requests
    assert len(reqs) == 5 and ids == [r.queue_id for r in reqs]
    first = reqs[0].queue_id
    assert [r.queue_id for r in reqs[1:]] == [f"{first}-{n}" for n in range(1, 5)]
    by = {r.rule_pattern: r for r in reqs}
    fwd = by["*@fwd.test"]
    assert fwd.recipients == ["a@fwd.test", "e@fwd.test"] and fwd.mode == "forward"
    # the request names its rule; no credential is in it
    assert fwd.via.kind == "rule" and fwd.destination == "127.0.0.1:2626"
    assert "p" not in (fwd.via.to_dict().values()) and "'p'" not in repr(fwd)
    hop = transport_of(processor, fwd)
    assert (hop.kind, hop.server, hop.port, hop.require_tls, hop.credentials.user,
            hop.credentials.password, hop.ca_path) == (
        "forward", "127.0.0.1", 2626, True, "u", "p", "/ca.pem")
    assert "'p'" not in repr(hop), "the password is not in the transport's repr"
    local = by["*@local.test"]
    hop = transport_of(processor, local)
    assert hop.kind == "local" and hop.local_path == os.path.join(tmp, "mail")
    assert local.destination == "local"
    mx = by["*@mx.test"]
    # From: alice@sender.test is not the rule's signing domain (mx.test): unsigned
    assert transport_of(processor, mx).kind == "mx" and mx.dkim is None
    assert mx.destination == "", "MX requests are split by recipient domain in the queue"
    proc = by["*@proc.test"]
    assert transport_of(processor, proc).kind == "mx" and proc.mode == "process"
    default = by[""]
    assert default.recipients == ["f@elsewhere.test"]
    assert transport_of(processor, default).kind == "mx"
    # unchanged groups share the spool file; the process group has its own
    shared = {fwd.body_path, local.body_path, mx.body_path, default.body_path}
    assert len(shared) == 1 and proc.body_path not in shared
    assert b"X-Gateway: dcrouter" in queue.body(proc)
    assert b"X-Gateway" not in queue.body(fwd)
    assert all(r.correlation_id == fwd.correlation_id for r in reqs)
    assert os.listdir(os.path.join(tmp, "spool")) == []   # all taken over by the queue
    assert processor.get_stats()["messages"] == 1


@pytest_twisted.inlineCallbacks
def test_relay_denied_for_outsiders(tmp_path) -> None:  # type: ignore[no-untyped-def]
    processor, _ = make_processor(str(tmp_path), {"domain_rules": [LOCAL]})
    outsider = session("198.51.100.7")
    yield processor.check_sender(outsider, "x@remote.test")
    yield processor.check_recipient(outsider, "x@remote.test", "b@local.test")
    with pytest.raises(PolicyRejection) as info:
        yield processor.check_recipient(outsider, "x@remote.test", "b@gmail.test")
    assert rejection(info) == (554, "5.7.1", "relay")
    assert info.value.text == "Relay access denied"
    # a catch-all rule does not make dcrouter an open relay
    catch_all, _ = make_processor(str(tmp_path / "c"), {"domain_rules": [
        LOCAL, {"pattern": "*@*", "mode": "mta"}, {"pattern": "info@*", "mode": "mta"}]})
    for rcpt in ("b@gmail.test", "info@gmail.test"):
        with pytest.raises(PolicyRejection) as info:
            yield catch_all.check_recipient(outsider, "x@remote.test", rcpt)
        assert rejection(info) == (554, "5.7.1", "relay")
    yield catch_all.check_recipient(outsider, "x@remote.test", "b@local.test")
    yield catch_all.check_recipient(session(relay=True), "x@remote.test", "b@gmail.test")
    # authenticated or relay_networks clients may relay
    yield processor.check_recipient(session(user="demo"), "x@a.test", "b@gmail.test")
    yield processor.check_recipient(session(relay=True), "x@a.test", "b@gmail.test")


@pytest_twisted.inlineCallbacks
def test_default_forward_for_relay_clients(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tmp = str(tmp_path)
    processor, queue = make_processor(tmp, {"default_mode": "forward",
                                            "default_server": "10.1.1.1", "default_port": 2500,
                                            "default_tls": True})
    yield transaction(processor, tmp, simple_message(), "a@b.test", ["x@anywhere.test"])
    request = queue.requests[0]
    assert request.rule_pattern == "" and request.destination == "10.1.1.1:2500"
    hop = transport_of(processor, request)
    assert (hop.kind, hop.server, hop.port, hop.require_tls) == (
        "forward", "10.1.1.1", 2500, True)


def test_transport_and_signing_per_address(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from dcrouter.delivery.transport import TransportResolver
    processor, _ = make_processor(str(tmp_path), {"domain_rules": [FORWARD, LOCAL, MX]})
    resolver = TransportResolver(processor.options, processor.domain_router, str(tmp_path))
    assert resolver.for_address("a@fwd.test").server == "127.0.0.1"
    assert resolver.for_address("a@local.test").kind == "local"
    assert resolver.for_address("a@mx.test").kind == "mx"
    assert resolver.for_address("a@other.test").kind == "mx"


@pytest_twisted.inlineCallbacks
def test_suppressed_recipient(tmp_path) -> None:  # type: ignore[no-untyped-def]
    processor, _ = make_processor(str(tmp_path), {"domain_rules": [LOCAL]},
                                  suppression=Suppression("gone@local.test"))
    s = session(relay=True)
    with pytest.raises(PolicyRejection) as info:
        yield processor.check_recipient(s, "a@b.test", "Gone@local.test")
    assert rejection(info) == (550, "5.1.1", "suppressed")
    assert "suppressed" in info.value.text and "Gone@local.test" in info.value.text
    yield processor.check_recipient(s, "a@b.test", "here@local.test")


@pytest_twisted.inlineCallbacks
def test_queue_backpressure(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tmp = str(tmp_path)
    processor, queue = make_processor(tmp, {"domain_rules": [FORWARD, LOCAL]})
    queue.full_destinations.add("127.0.0.1:2626")
    s = session(relay=True)
    yield processor.check_recipient(s, "a@b.test", "x@local.test")
    assert queue.checked[-1] == ["local"]
    with pytest.raises(PolicyRejection) as info:
        yield processor.check_recipient(s, "a@b.test", "x@fwd.test")
    assert rejection(info) == (452, "4.3.1", "queue_full")
    assert info.value.text == "Insufficient system storage"
    queue.full = True   # full when the message arrives: 452 too, nothing half-queued
    with pytest.raises(PolicyRejection) as info:
        yield processor.handle_message(spool(tmp, simple_message(), "a@b.test", ["x@local.test"]))
    assert rejection(info) == (452, "4.3.1", "queue_full")


@pytest_twisted.inlineCallbacks
def test_max_recipients_per_rule(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rule = dict(LOCAL, rate_limits={"max_recipients_per_message": 2})
    processor, _ = make_processor(str(tmp_path), {"domain_rules": [rule, FORWARD]})
    s = session(relay=True)
    yield processor.check_sender(s, "a@b.test")
    yield processor.check_recipient(s, "a@b.test", "1@local.test")
    yield processor.check_recipient(s, "a@b.test", "2@local.test")
    yield processor.check_recipient(s, "a@b.test", "3@fwd.test")   # other rule: not counted
    with pytest.raises(PolicyRejection) as info:
        yield processor.check_recipient(s, "a@b.test", "3@local.test")
    assert rejection(info) == (452, "4.5.3", "recipients")
    yield processor.check_sender(s, "a@b.test")   # a new transaction starts afresh
    yield processor.check_recipient(s, "a@b.test", "3@local.test")


@pytest_twisted.inlineCallbacks
def test_rule_rate_limit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rule = dict(LOCAL, rate_limits={"max_messages_per_minute": 2})
    processor, _ = make_processor(str(tmp_path), {"domain_rules": [rule, FORWARD]})
    s = session(relay=True)
    for _ in range(2):
        yield processor.check_sender(s, "a@b.test")
        yield processor.check_recipient(s, "a@b.test", "x@local.test")
        yield processor.check_recipient(s, "a@b.test", "y@local.test")  # same message: 1 token
    yield processor.check_sender(s, "a@b.test")
    with pytest.raises(PolicyRejection) as info:
        yield processor.check_recipient(s, "a@b.test", "x@local.test")
    assert rejection(info) == (451, "4.7.1", "rate_limit")
    yield processor.check_recipient(s, "a@b.test", "x@fwd.test")  # other rules unaffected


@pytest_twisted.inlineCallbacks
def test_global_ip_and_user_limits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    processor, _ = make_processor(str(tmp_path), {"rate_limits": {
        "max_messages_per_minute": 5, "max_messages_per_minute_per_ip": 2,
        "max_messages_per_minute_per_user": 2}})
    a = session("192.0.2.1")
    for _ in range(2):
        yield processor.check_sender(a, "x@y.test")
    with pytest.raises(PolicyRejection) as info:
        yield processor.check_sender(a, "x@y.test")
    assert rejection(info) == (451, "4.7.1", "rate_limit")
    assert info.value.context["scope"] == "ip"
    u1, u2 = session("192.0.2.2", user="carol"), session("192.0.2.3", user="carol")
    yield processor.check_sender(u1, "x@y.test")
    yield processor.check_sender(u2, "x@y.test")
    with pytest.raises(PolicyRejection) as info:
        yield processor.check_sender(session("192.0.2.4", user="carol"), "x@y.test")
    assert info.value.context["scope"] == "user"
    # 4 taken globally (the refused checks took nothing): one more, then global refuses
    yield processor.check_sender(session("192.0.2.5"), "x@y.test")
    with pytest.raises(PolicyRejection) as info:
        yield processor.check_sender(session("192.0.2.6"), "x@y.test")
    assert info.value.context["scope"] == "global"
    assert processor.get_stats()["rejections"]["rate_limit"] == 3


@pytest_twisted.inlineCallbacks
def test_virus_rejected_nothing_queued(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tmp = str(tmp_path)
    processor, queue = make_processor(tmp, {"domain_rules": [PROCESS, LOCAL]})
    data = multipart([("Content-Type: application/octet-stream",
                       "Content-Disposition: attachment; filename=\"x.bin\"", EICAR)])
    with pytest.raises(PolicyRejection) as info:
        yield transaction(processor, tmp, data, "a@b.test", ["x@local.test", "y@proc.test"])
    assert rejection(info) == (550, "5.7.1", "virus")
    assert info.value.text == "Message rejected: virus detected"
    assert queue.requests == []
    assert not [f for f in os.listdir(os.path.join(tmp, "spool")) if "." in f]  # no leftovers


@pytest_twisted.inlineCallbacks
def test_blocked_attachment_rejected(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tmp = str(tmp_path)
    processor, queue = make_processor(tmp, {"domain_rules": [PROCESS]})
    data = multipart([("Content-Type: application/octet-stream",
                       "Content-Disposition: attachment; filename=\"invoice.pdf.exe\"", b"MZ")])
    with pytest.raises(PolicyRejection) as info:
        yield transaction(processor, tmp, data, "a@b.test", ["y@proc.test"])
    assert info.value.text == "Message rejected: blocked attachment type"
    assert queue.requests == []


@pytest_twisted.inlineCallbacks
def test_spam_tagged_with_headers_and_prefix(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tmp = str(tmp_path)
    processor, queue = make_processor(tmp, {"domain_rules": [PROCESS]})
    spam = (b"From: \"service@bank.example\" <x@evil.test>\r\nTo: y@proc.test\r\n"
            b"Subject: URGENT ACCOUNT NOTICE\r\nX-Spam-Status: No, forged by the sender\r\n\r\n"
            b"Your account has been suspended. Verify your account now.\r\n")
    yield transaction(processor, tmp, spam, "x@evil.test", ["y@proc.test"])
    body = queue.body(queue.requests[0])
    assert body.count(b"X-Spam-Status:") == 1   # the sender's copy was removed
    assert b"X-Spam-Status: Yes, score=9.0 required=5.0" in body
    assert b"X-Spam-Score: 9.0" in body
    assert b"X-Dcrouter-Scan: spam=flagged(9.0/5.0); virus=clean; attachment=clean" in body
    assert b"Subject: [SPAM] URGENT ACCOUNT NOTICE" in body
    assert b"X-Gateway: dcrouter" in body
    assert body.endswith(b"Verify your account now.\r\n")
    assert processor.get_stats()["scan_verdicts"] == {
        "spam": {"spam": 1}, "virus": {"clean": 1}, "attachment": {"clean": 1}}
    assert os.listdir(os.path.join(tmp, "spool")) == []  # the unused spool file was removed


@implementer(IContentScanner)
class BrokenScanner:
    name = "broken"

    def scan(self, message: Any, context: Any) -> defer.Deferred:
        return defer.fail(RuntimeError("boom"))


@implementer(IContentScanner)
class HangingScanner:
    name = "hang"

    def scan(self, message: Any, context: Any) -> defer.Deferred:
        return defer.Deferred()


@implementer(IContentScanner)
class KeywordScanner:
    """A plug-in asking for reject itself."""

    name = "keyword"

    def scan(self, message: Any, context: Any) -> ScanResult:
        text = message.get_body().get_content()
        return ScanResult(self.name, "spam" if "forbidden" in text else "clean",
                          action="reject")


@pytest_twisted.inlineCallbacks
def test_scanner_failure_open_tags(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tmp = str(tmp_path)
    rule = dict(PROCESS, transformations=[])
    processor, queue = make_processor(tmp, {"domain_rules": [rule], "scan_timeout": 0.2,
                                            "scan_fail_mode": "open"},
                                      extensions=Extensions(scanners=[BrokenScanner(),
                                                                      HangingScanner()]))
    yield transaction(processor, tmp, simple_message(), "a@b.test", ["y@proc.test"])
    body = queue.body(queue.requests[0])
    assert b"X-Dcrouter-Scan: error; spam=clean(0.0/5.0); virus=clean; attachment=clean;" in body
    assert b"broken=error; hang=error" in body


@pytest_twisted.inlineCallbacks
def test_scanner_failure_closed_tempfails(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tmp = str(tmp_path)
    processor, queue = make_processor(
        tmp, {"domain_rules": [PROCESS], "scan_fail_mode": "closed",
              "clamd": {"host": "127.0.0.1", "port": free_port(), "timeout": 2}})
    with pytest.raises(PolicyRejection) as info:
        yield transaction(processor, tmp, simple_message(), "a@b.test", ["y@proc.test"])
    assert rejection(info) == (451, "4.7.0", "scan_error")
    assert queue.requests == []


@pytest_twisted.inlineCallbacks
def test_plugin_scanner_may_reject(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tmp = str(tmp_path)
    processor, queue = make_processor(tmp, {"domain_rules": [PROCESS]},
                                      extensions=Extensions(scanners=[KeywordScanner()]))
    with pytest.raises(PolicyRejection) as info:
        yield transaction(processor, tmp, simple_message(body="a forbidden word\r\n"),
                          "a@b.test", ["y@proc.test"])
    assert info.value.code == 550 and info.value.text == "Message rejected: spam detected"
    yield transaction(processor, tmp, simple_message(), "a@b.test", ["y@proc.test"])
    assert b"keyword=clean" in queue.body(queue.requests[0])


@implementer(ITransformation)
class Stamp:
    def __init__(self, text: str = "stamp") -> None:
        self.text = text

    def transform(self, message: Any, context: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        reactor.callLater(0, d.callback, None)
        message["X-Stamp"] = self.text
        return d


@pytest_twisted.inlineCallbacks
def test_plugin_transformations_by_name_and_path(tmp_path) -> None:  # type: ignore
    tmp = str(tmp_path)
    rule = {"pattern": "*@proc.test", "mode": "process",
            "transformations": [{"type": "stamp", "text": "registered"},
                                {"type": "tests.email.test_processor:Stamp", "text": "by-path"}]}
    processor, queue = make_processor(tmp, {"domain_rules": [rule]},
                                      extensions=Extensions(transformations={"stamp": Stamp}))
    yield transaction(processor, tmp, simple_message(), "a@b.test", ["y@proc.test"])
    body = queue.body(queue.requests[0])
    assert b"X-Stamp: registered\r\nX-Stamp: by-path\r\n" in body


def test_unknown_transformation_is_a_config_error(tmp_path) -> None:  # type: ignore
    rules = [LOCAL, FORWARD, {"pattern": "*@p.test", "mode": "process",
                              "transformations": [{"type": "x"}]}]
    with pytest.raises(ConfigError) as info:
        make_processor(str(tmp_path), {"domain_rules": rules})
    assert str(info.value) == \
        "email.domain_rules[2].transformations[0].type: unknown transformation 'x'"
    rules[2] = {"pattern": "*@p.test", "mode": "process",
                "transformations": [{"type": "add_header", "value": "v"}]}
    with pytest.raises(ConfigError, match=r"domain_rules\[2\].transformations\[0\].header"):
        make_processor(str(tmp_path), {"domain_rules": rules})
    rules[2] = {"pattern": "*@p.test", "mode": "process",
                "transformations": [{"type": "nosuch.module:Thing"}]}
    with pytest.raises(ConfigError, match="cannot import 'nosuch.module'"):
        make_processor(str(tmp_path), {"domain_rules": rules})


def test_update_options_keeps_old_on_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.support.router import options_from
    processor, _ = make_processor(str(tmp_path), {"domain_rules": [PROCESS]})
    bad = options_from({"email": {"domain_rules": [
        {"pattern": "*@p.test", "mode": "process", "transformations": [{"type": "x"}]}]}},
        str(tmp_path)).email
    with pytest.raises(ConfigError):
        processor.update_options(bad)  # type: ignore[arg-type]
    assert processor.options.domain_rules[0].pattern == "*@proc.test"


@pytest_twisted.inlineCallbacks
def test_process_rule_with_target_forwards(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tmp = str(tmp_path)
    rule = dict(PROCESS, target={"server": "127.0.0.1", "port": 2727})
    processor, queue = make_processor(tmp, {"domain_rules": [rule]})
    yield transaction(processor, tmp, simple_message(), "a@b.test", ["y@proc.test"])
    hop = transport_of(processor, queue.requests[0])
    assert (hop.kind, hop.server, hop.port) == ("forward", "127.0.0.1", 2727)
    assert queue.requests[0].destination == "127.0.0.1:2727"


@pytest_twisted.inlineCallbacks
def test_large_message_keeps_the_reactor_serving(tmp_path) -> None:  # type: ignore
    """Parsing, scanning and rewriting a 6 MB message run in threads: the reactor ticks."""
    from twisted.internet import task
    tmp = str(tmp_path)
    processor, queue = make_processor(tmp, {"domain_rules": [PROCESS]})
    attachment = os.urandom(4 * 1024 * 1024)
    data = multipart([("Content-Type: application/octet-stream",
                       "Content-Disposition: attachment; filename=\"data.bin\"", attachment)])
    ticks = []
    loop = task.LoopingCall(lambda: ticks.append(1))
    loop.start(0.005, now=False)
    try:
        yield transaction(processor, tmp, data, "a@b.test", ["y@proc.test"])
    finally:
        loop.stop()
    assert len(ticks) >= 2
    body = queue.body(queue.requests[0])
    assert b"X-Dcrouter-Scan: spam=clean" in body and len(body) > len(data)


@pytest_twisted.inlineCallbacks
def test_scanner_named_by_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tmp = str(tmp_path)
    rule = {"pattern": "*@proc.test", "mode": "process", "content_scanning": True,
            "scanners": [{"type": "tests.email.test_processor:KeywordScanner",
                          "action": "tag", "subject_prefix": "[KW]"}]}
    processor, queue = make_processor(tmp, {"domain_rules": [rule]})
    yield transaction(processor, tmp, simple_message(subject="Hi", body="forbidden\r\n"),
                      "a@b.test", ["y@proc.test"])
    body = queue.body(queue.requests[0])
    assert b"Subject: [KW] Hi" in body and b"X-Dcrouter-Scan: keyword=spam" in body


@pytest.mark.parametrize("scanner,message", [
    ({"type": "tests.email.test_processor:Nope"},
     "email.domain_rules[0].scanners[0].type: 'tests.email.test_processor' has no 'Nope'"),
    ({"type": "tests.email.test_processor:Stamp"},
     "email.domain_rules[0].scanners[0].type: 'tests.email.test_processor:Stamp' is not an "
     "IContentScanner"),
    ({"type": "spamm"}, "email.domain_rules[0].scanners[0].type: must be one of"),
    ({"type": "spam", "subject_prefix": "[SPAM]\r\nBcc: x@y"},
     "email.domain_rules[0].scanners[0].subject_prefix: must be one line"),
])
def test_bad_scanner_types(tmp_path, scanner: dict, message: str) -> None:  # type: ignore
    rule = {"pattern": "*@proc.test", "mode": "process", "content_scanning": True,
            "scanners": [scanner]}
    with pytest.raises(ConfigError) as info:
        make_processor(str(tmp_path), {"domain_rules": [rule]})
    assert str(info.value).startswith(message)


@pytest_twisted.inlineCallbacks
def test_dkim_key_generated_in_thread_listeners_told_in_reactor(tmp_path) -> None:  # type: ignore
    """The rule's key is made when the configuration is applied, in a thread; a message
    from a new sender domain makes none."""
    import threading
    tmp = str(tmp_path)
    told = []
    options = options_from({"email": {"domain_rules": [MX]}}, tmp)
    context = RouterContext(options, reactor, Extensions())
    context.dkim_keys.add_listener(lambda: told.append(threading.current_thread()))
    queue = RecordingQueue(os.path.join(tmp, "queue"))
    processor = MultiModeProcessor(options.email, DomainRouter.from_options(options.email),
                                   queue, context)
    yield processor.signing.wait_ready()
    from twisted.internet import task
    yield task.deferLater(reactor, 0.05, lambda: None)
    assert told == [threading.main_thread()]
    assert os.listdir(os.path.join(tmp, "dkim")) == ["mx.test"]
    yield transaction(processor, tmp, simple_message(sender="a@fresh.test"), "a@fresh.test",
                      ["x@mx.test"])
    assert os.listdir(os.path.join(tmp, "dkim")) == ["mx.test"] and told == [
        threading.main_thread()]
    assert queue.requests[0].dkim is None


@pytest_twisted.inlineCallbacks
def test_spamd_down_built_in_verdict_still_counts(tmp_path) -> None:  # type: ignore
    from dcrouter.email.scanning.spam import GTUBE
    tmp = str(tmp_path)
    rule = {"pattern": "*@proc.test", "mode": "process", "content_scanning": True,
            "scanners": [{"type": "spam", "action": "tag", "subject_prefix": "[SPAM]"},
                         {"type": "virus", "action": "reject"}]}
    processor, queue = make_processor(tmp, {
        "domain_rules": [rule], "scan_fail_mode": "open",
        "spamd": {"host": "127.0.0.1", "port": free_port(), "timeout": 2},
        "clamd": {"host": "127.0.0.1", "port": free_port(), "timeout": 2}})
    yield transaction(processor, tmp, simple_message(subject="Hi", body=GTUBE), "a@b.test",
                      ["y@proc.test"])
    body = queue.body(queue.requests[0])
    assert b"X-Dcrouter-Scan: error; spam=flagged(1000.0/5.0)+error; virus=clean+error" in body
    assert b"Subject: [SPAM] Hi" in body
    # and an EICAR file is still refused by the built-in check while clamd is down
    data = multipart([("Content-Type: application/octet-stream",
                       "Content-Disposition: attachment; filename=\"x.bin\"", EICAR)])
    with pytest.raises(PolicyRejection) as info:
        yield transaction(processor, tmp, data, "a@b.test", ["y@proc.test"])
    assert rejection(info) == (550, "5.7.1", "virus")


@pytest_twisted.inlineCallbacks
def test_reconfigure_and_runtime_rules(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.support.router import options_from
    tmp = str(tmp_path)
    processor, queue = make_processor(tmp, {"domain_rules": [LOCAL]})
    new_rule = {"pattern": "*@new.test", "mode": "process",
                "transformations": [{"type": "add_header", "header": "X-New", "value": "1"}]}
    email = options_from({"email": {"domain_rules": [LOCAL, new_rule]}}, tmp).email
    assert email is not None
    processor.domain_router.update_from_options(email)   # as EmailGateway.reconfigure does
    processor.update_options(email)
    yield transaction(processor, tmp, simple_message(), "a@b.test", ["x@new.test"])
    assert b"X-New: 1" in queue.body(queue.requests[-1])
    # a rule added to the router directly (DomainRouter API) gets its pipeline on first use
    processor.domain_router.add_rule({"pattern": "*@api.test", "mode": "process",
                                      "transformations": [{"type": "rewrite_subject",
                                                           "prefix": "[API]"}]})
    yield transaction(processor, tmp, simple_message(), "a@b.test", ["x@api.test"])
    assert b"Subject: [API] Hello" in queue.body(queue.requests[-1])

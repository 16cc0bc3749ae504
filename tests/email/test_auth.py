"""AUTH: password hashes, checkers (config users, XOAUTH2 plug-ins), failure rate limits."""

from __future__ import annotations

import base64
import smtplib
from typing import Any

import pytest
import pytest_twisted
from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from dcrouter.config.email import EmailAuthOptions, UserOptions
from dcrouter.email.auth import (
    AuthFailureLimiter, ConfigUserChecker, XOAuth2Credentials, build_portal, hash_password,
    load_checker, verify_password,
)
from dcrouter.errors import ConfigError
from dcrouter.interfaces import IXOAuth2Credentials
from dcrouter.service import Extensions
from tests.email.conftest import PASSWORD
from tests.email.test_server import MSG


@pytest.mark.parametrize("scheme", ["SCRYPT", "SSHA512", "SHA512-CRYPT"])
def test_hashes_verify_and_reject(scheme: str) -> None:
    stored = hash_password("correct horse", scheme)
    assert stored.startswith("{" + scheme + "}")
    assert verify_password(stored, "correct horse")
    assert not verify_password(stored, "correct hors")
    assert not verify_password(stored, "")
    assert hash_password("correct horse", scheme) != stored  # salted


def test_plain_and_malformed_stored_values() -> None:
    assert verify_password("plain", "plain") and not verify_password("plain", "Plain")
    assert verify_password("{PLAIN}x", "x")
    assert not verify_password("{SCRYPT}garbage", "x")
    assert not verify_password("{SSHA512}!!!", "x")
    with pytest.raises(ConfigError, match="email.auth.users\\[0\\].password"):
        build_portal(EmailAuthOptions(users=(UserOptions(username="u",
                                                         password="{SCRYPT}nonsense"),)))


@pytest_twisted.inlineCallbacks
def test_config_checker_unknown_user_and_wrong_password() -> None:
    checker = ConfigUserChecker([UserOptions(username="u", password=hash_password("pw"))])
    assert (yield checker.requestAvatarId(credentials.UsernamePassword(b"u", b"pw"))) == "u"
    for user, password in ((b"u", b"bad"), (b"nobody", b"pw")):
        with pytest.raises(error.UnauthorizedLogin):
            yield checker.requestAvatarId(credentials.UsernamePassword(user, password))


def _recording(monkeypatch: Any, module: Any, name: str, describe: Any) -> list[Any]:
    """Replace ``module.name`` by a wrapper that records ``describe(*args, **kw)`` per call
    (and whether it ran outside the reactor thread)."""
    import threading
    real = getattr(module, name)
    calls: list[Any] = []

    def wrapper(*args: Any, **kw: Any) -> Any:
        calls.append((describe(*args, **kw),
                      threading.current_thread() is not threading.main_thread()))
        return real(*args, **kw)
    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest_twisted.inlineCallbacks
def test_unknown_user_costs_the_same_scrypt_as_a_known_one_over_smtp(
        start_server: Any, monkeypatch: Any) -> None:
    """AUTH for a name that does not exist runs one scrypt with the configured users'
    parameters, in the thread pool, like a known name with a wrong password does."""
    import hashlib
    run = start_server(auth={"users": [{"username": "alice",
                                        "password": hash_password(PASSWORD)}]})
    calls = _recording(monkeypatch, hashlib, "scrypt", lambda secret, salt, n, r, p, dklen,
                       maxmem=0: (n, r, p, dklen, len(salt)))

    def attempt(user: str, mechanism: str = "PLAIN") -> int:
        with run.smtps() as s:
            s.ehlo("client.test")
            s.user, s.password = user, "wrong-password"
            try:
                s.auth(mechanism, s.auth_plain if mechanism == "PLAIN" else s.auth_login)
            except smtplib.SMTPAuthenticationError as e:
                return e.smtp_code
            return 235

    assert (yield deferToThread(attempt, "alice")) == 535
    known = list(calls)
    assert (yield deferToThread(attempt, "nobody")) == 535
    assert (yield deferToThread(attempt, "nobody-either", "LOGIN")) == 535
    assert len(known) == 1 and known[0] == ((16384, 8, 1, 32, 16), True)
    assert calls == known * 3


@pytest_twisted.inlineCallbacks
def test_dummy_verification_follows_the_configured_scheme(monkeypatch: Any) -> None:
    import hashlib
    import threading
    from dcrouter.email import auth
    crypt = auth._crypt_module()
    stored = "{SHA512-CRYPT}" + crypt.crypt("pw", crypt.mksalt(crypt.METHOD_SHA512,
                                                                rounds=20000))
    checker = ConfigUserChecker([UserOptions(username="u", password=stored)])
    calls = _recording(monkeypatch, crypt, "crypt", lambda word, salt: salt.split("$")[2])
    for user in (b"u", b"nobody"):
        with pytest.raises(error.UnauthorizedLogin):
            yield checker.requestAvatarId(credentials.UsernamePassword(user, b"bad"))
    assert calls == [("rounds=20000", True)] * 2
    # SSHA512: one SHA-512 over password + a salt of the configured length
    ssha = ConfigUserChecker([UserOptions(username="u", password=hash_password(
        "pw", "SSHA512"))])
    sha = _recording(monkeypatch, hashlib, "sha512", lambda data=b"": len(data))
    for user in (b"u", b"nobody"):
        with pytest.raises(error.UnauthorizedLogin):
            yield ssha.requestAvatarId(credentials.UsernamePassword(user, b"bad"))
    assert sha == [(3 + 16, True)] * 2
    # the most common scheme wins; plain-text users are compared in the reactor, as known
    # plain-text users are
    mixed = auth.dummy_stored_password(["p1", "p2", hash_password("x")])
    assert mixed is not None and mixed.startswith("{PLAIN}")
    assert auth.dummy_stored_password([]) is None
    plain = ConfigUserChecker([UserOptions(username="u", password="pw")])
    d = plain.requestAvatarId(credentials.UsernamePassword(b"nobody", b"pw"))
    assert threading.current_thread() is threading.main_thread()
    with pytest.raises(error.UnauthorizedLogin):
        yield d
    # an unknown name never logs in, whatever its password
    for candidate in (b"", b"pw", mixed.encode()):
        with pytest.raises(error.UnauthorizedLogin):
            yield plain.requestAvatarId(credentials.UsernamePassword(b"nobody", candidate))


def test_limiter_window() -> None:
    now = [1000.0]
    limiter = AuthFailureLimiter(3, clock=lambda: now[0])
    assert not limiter.record_failure("1.2.3.4")
    assert not limiter.record_failure("1.2.3.4")
    assert not limiter.blocked("1.2.3.4")
    assert limiter.record_failure("1.2.3.4") and limiter.blocked("1.2.3.4")
    assert not limiter.blocked("5.6.7.8")
    now[0] += 61
    assert not limiter.blocked("1.2.3.4")


def test_load_checker_errors() -> None:
    with pytest.raises(ConfigError, match="expected 'module:Class'"):
        load_checker("nocolon")
    with pytest.raises(ConfigError, match="cannot load"):
        load_checker("tests.email.oauth_checker:Missing")
    assert load_checker("tests.email.oauth_checker:TokenChecker") is not None


@pytest_twisted.inlineCallbacks
def test_hashed_passwords_over_smtp(start_server: Any) -> None:
    users = [{"username": f"u-{scheme}", "password": hash_password("pw-" + scheme, scheme)}
             for scheme in ("SCRYPT", "SSHA512", "SHA512-CRYPT")]
    users.append({"username": "plainuser", "password": "pw-plain"})
    run = start_server(auth={"users": users})

    def client(user: str, password: str) -> tuple:
        with run.smtps() as s:
            s.ehlo("client.test")
            s.user, s.password = user, password
            return s.auth("PLAIN", s.auth_plain)

    for scheme in ("SCRYPT", "SSHA512", "SHA512-CRYPT"):
        assert (yield deferToThread(client, f"u-{scheme}", "pw-" + scheme))[0] == 235
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            yield deferToThread(client, f"u-{scheme}", "pw-wrong")
        assert info.value.smtp_code == 535
    assert (yield deferToThread(client, "plainuser", "pw-plain"))[0] == 235
    stats = run.server.get_stats()
    assert stats["auth_succeeded"] == 4 and stats["auth_failed"] == 3


@pytest_twisted.inlineCallbacks
def test_auth_failure_rate_limit_421_and_close(start_server: Any) -> None:
    run = start_server(auth={"max_failures_per_minute": 3})
    bad = base64.b64encode(b"\x00alice\x00wrong").decode()
    good = base64.b64encode(b"\x00alice\x00s3cret-pass").decode()

    def client() -> tuple:
        with run.smtps() as s:
            s.ehlo("client.test")
            replies = [s.docmd("AUTH PLAIN " + bad) for _ in range(3)]
            try:
                closed = s.docmd("NOOP")
            except smtplib.SMTPServerDisconnected:
                closed = "closed"
        with run.smtps() as s:  # a new session from the same IP: still blocked, even if right
            s.ehlo("client.test")
            again = s.docmd("AUTH PLAIN " + good)
        return replies, closed, again

    replies, closed, again = yield deferToThread(client)
    assert replies[0] == replies[1] == (535, b"5.7.8 Error: authentication failed")
    assert replies[2] == (421, b"4.7.0 mail.dcrouter.test Error: too many failed "
                               b"authentication attempts")
    assert closed == "closed"
    assert again[0] == 421
    assert run.server.get_stats()["rejected_by_reason"]["auth_rate_limit"] == 2


@pytest_twisted.inlineCallbacks
def test_auth_protocol_errors(start_server: Any) -> None:
    run = start_server()

    def client() -> list:
        with run.smtps() as s:
            s.ehlo("client.test")
            out = [s.docmd("AUTH CRAM-MD5"), s.docmd("AUTH PLAIN !!notbase64")]
            out.append(s.docmd("AUTH LOGIN"))
            out.append(s.docmd("*"))
            out.append(s.docmd("AUTH PLAIN " + base64.b64encode(b"no-nuls").decode()))
            out.append(s.docmd("AUTH PLAIN"))
            out.append(s.docmd(base64.b64encode(b"\x00alice\x00s3cret-pass").decode()))
            out.append(s.docmd("AUTH PLAIN"))
            return out

    out = yield deferToThread(client)
    assert out[0] == (504, b"5.5.4 Unrecognized authentication type")
    assert out[1] == (501, b"5.5.2 Error: cannot decode response")
    assert out[2] == (334, b"VXNlcm5hbWU6") and out[3] == (501, b"5.7.0 Authentication aborted")
    assert out[4][0] == 501 and out[5] == (334, b"")
    assert out[6][0] == 235 and out[7] == (503, b"5.5.1 Error: already authenticated")


@pytest_twisted.inlineCallbacks
def test_xoauth2_via_configured_checker(start_server: Any) -> None:
    run = start_server(auth={"methods": ["PLAIN", "XOAUTH2"],
                             "checker": "tests.email.oauth_checker:TokenChecker"})

    def xoauth(user: bytes, token: bytes) -> str:
        return base64.b64encode(b"user=" + user + b"\x01auth=Bearer " + token + b"\x01\x01").decode()

    def client() -> tuple:
        with run.smtp("submission") as s:
            s.starttls(context=run.client_context())
            s.ehlo("client.test")
            advertised = s.esmtp_features["auth"]
            bad = s.docmd("AUTH XOAUTH2 " + xoauth(b"carol@local.test", b"expired"))
            bad_end = s.docmd("")
            good = s.docmd("AUTH XOAUTH2 " + xoauth(b"carol@local.test", b"ya29.valid-token"))
            sent = s.sendmail("carol@local.test", ["x@remote.example"], MSG)
            return advertised, bad, bad_end, good, sent

    advertised, bad, bad_end, good, sent = yield deferToThread(client)
    assert advertised.split() == ["PLAIN", "XOAUTH2"]
    assert bad[0] == 334 and b"401" in base64.b64decode(bad[1])
    assert bad_end == (535, b"5.7.8 Error: authentication failed")
    assert good == (235, b"2.7.0 Authentication successful") and sent == {}
    assert run.handler.messages[0]["message"].session.auth_user == "carol@local.test"


@implementer(ICredentialsChecker)
class _PasswordPlugin:
    """An extra checker for user name + password, given through Extensions."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def requestAvatarId(self, creds: Any) -> Any:
        if creds.username == b"ldapuser" and creds.password == b"ldappw":
            return defer.succeed("ldapuser")
        return defer.fail(error.UnauthorizedLogin())


@pytest_twisted.inlineCallbacks
def test_extension_checker_chained_after_config_users(start_server: Any) -> None:
    run = start_server(extensions=Extensions(auth_checkers=[_PasswordPlugin()]))

    def client(user: str, password: str) -> int:
        with run.smtps() as s:
            s.ehlo("client.test")
            s.user, s.password = user, password
            return s.auth("PLAIN", s.auth_plain)[0]

    assert (yield deferToThread(client, "ldapuser", "ldappw")) == 235
    assert (yield deferToThread(client, "alice", "s3cret-pass")) == 235


def test_xoauth2_credentials_parse() -> None:
    creds = XOAuth2Credentials.parse(b"user=a@b\x01auth=Bearer tok\x01\x01")
    assert IXOAuth2Credentials.providedBy(creds)
    assert (creds.username, creds.token) == (b"a@b", b"tok")
    with pytest.raises(ValueError):
        XOAuth2Credentials.parse(b"auth=Bearer tok")




def test_sasl_exchanges_step_by_step() -> None:
    from dcrouter.email.sasl import Challenge, Credentials, Refusal, SaslExchange
    b64 = lambda raw: base64.b64encode(raw)  # noqa: E731
    login = SaslExchange("LOGIN")
    assert login.start("") == Challenge("VXNlcm5hbWU6")
    assert login.respond(b64(b"bob")) == Challenge("UGFzc3dvcmQ6")
    step = login.respond(b64(b"pw"))
    assert isinstance(step, Credentials) and step.username == "bob"
    assert (step.creds.username, step.creds.password) == (b"bob", b"pw")
    assert login.failed() == Refusal("535 5.7.8 Error: authentication failed")
    plain = SaslExchange("PLAIN")
    assert plain.start("=") == Refusal("501 5.5.2 Error: malformed PLAIN response")
    step = SaslExchange("PLAIN").start(b64(b"authz\x00u\x00p").decode())
    assert isinstance(step, Credentials) and step.authzid == "authz" and step.username == "u"
    for same in (b"\x00u\x00p", b"u\x00u\x00p"):  # empty or equal: no authzid to check
        step = SaslExchange("PLAIN").start(b64(same).decode())
        assert isinstance(step, Credentials) and step.authzid is None
    assert SaslExchange("PLAIN").respond(b"*") == Refusal("501 5.7.0 Authentication aborted")
    oauth = SaslExchange("XOAUTH2")
    step = oauth.start(b64(b"user=u@x\x01auth=Bearer t\x01\x01").decode())
    assert isinstance(step, Credentials) and step.creds.token == b"t"
    assert isinstance(oauth.failed(), Challenge)
    assert oauth.respond(b"") == Refusal("535 5.7.8 Error: authentication failed")


def _plain(authzid: bytes, authcid: bytes = b"alice",
           password: bytes = PASSWORD.encode()) -> str:
    return "AUTH PLAIN " + base64.b64encode(authzid + b"\x00" + authcid + b"\x00" +
                                            password).decode()


@pytest_twisted.inlineCallbacks
def test_auth_plain_authzid_empty_or_equal_accepted_other_refused(start_server: Any) -> None:
    from tests.email.handlers import RecordingObserver
    run = start_server(auth={"max_failures_per_minute": 3}, relay_networks=["10.0.0.0/8"])
    observer = RecordingObserver()
    run.server.add_observer(observer)

    def client() -> tuple:
        out = []
        for authzid in (b"", b"alice"):
            with run.smtps() as s:
                s.ehlo("client.test")
                out.append(s.docmd(_plain(authzid)))
                s.sendmail("alice@local.test", ["bob@remote.example"], MSG)
        with run.smtps() as s:
            s.ehlo("client.test")
            out.append(s.docmd(_plain(b"bob")))  # right password, someone else's identity
            out.append(s.docmd("MAIL FROM:<alice@local.test>"))
            out.append(s.docmd("RCPT TO:<x@remote.example>"))  # not authenticated: no relay
            out.append(s.docmd("RSET"))
            out.append(s.docmd(_plain(b"bob", password=b"wrong")))
            out.append(s.docmd(_plain(b"carol")))  # the third failure: limit reached
            try:
                out.append(s.docmd("NOOP"))
            except smtplib.SMTPServerDisconnected:
                out.append("closed")
        return tuple(out)

    out = yield deferToThread(client)
    assert out[0][0] == 235 and out[1][0] == 235
    assert out[2] == (535, b"5.7.8 Error: authentication failed: not authorized to act as "
                           b"that user")
    assert out[3][0] == 250 and out[4] == (554, b"5.7.1 Relay access denied")
    assert out[6] == (535, b"5.7.8 Error: authentication failed")
    assert out[7][0] == 421 and out[8] == "closed"
    assert [m["message"].session.auth_user for m in run.handler.messages] == ["alice", "alice"]
    stats = run.server.get_stats()
    assert stats["auth_succeeded"] == 2 and stats["auth_failed"] == 3
    assert stats["rejected_by_reason"]["auth_rate_limit"] == 1
    failures = [e[1][1:] for e in observer.events if e[0] == "auth_failed"]
    assert failures == [("alice", "PLAIN")] * 3


@pytest_twisted.inlineCallbacks
def test_auth_plain_authzid_for_proxy_users_and_login_unaffected(start_server: Any) -> None:
    run = start_server(auth={"users": [{"username": "alice", "password": PASSWORD},
                                       {"username": "relay", "password": "relay-pw"}],
                             "proxy_users": ["relay"]})

    def client() -> tuple:
        out = []
        with run.smtps() as s:
            s.ehlo("client.test")
            out.append(s.docmd(_plain(b"someone@local.test", b"relay", b"relay-pw")))
            s.sendmail("someone@local.test", ["bob@remote.example"], MSG)
        with run.smtps() as s:  # a proxy user with a control character in the authzid
            s.ehlo("client.test")
            out.append(s.docmd(_plain(b"evil\r\nX: y", b"relay", b"relay-pw")))
        with run.smtps() as s:  # not a proxy user
            s.ehlo("client.test")
            out.append(s.docmd(_plain(b"relay", b"alice")))
        with run.smtps() as s:  # LOGIN has no authzid
            s.ehlo("client.test")
            s.user, s.password = "alice", PASSWORD
            out.append(s.auth("LOGIN", s.auth_login))
        return tuple(out)

    out = yield deferToThread(client)
    assert out[0][0] == 235
    assert run.handler.messages[0]["message"].session.auth_user == "someone@local.test"
    assert out[1][0] == 535 and out[2][0] == 535
    assert out[3][0] == 235

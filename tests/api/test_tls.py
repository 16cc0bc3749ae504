"""The management API over HTTPS: self-signed and CA certificates, mutual TLS, the CLI, reload.

Every check is a real TLS handshake: Python's ``ssl``/urllib clients (in a
thread, the router runs in the test's reactor) and ``dcrouterctl`` as a
subprocess.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import ssl
import sys
import urllib.error
import urllib.request
from typing import Any, Optional

import pytest
import pytest_twisted
from twisted.internet import threads, utils
from twisted.logger import globalLogPublisher

from dcrouter.api.service import ApiService
from dcrouter.config import parse_config
from dcrouter.errors import ConfigError
from tests.api.certs import TestCA
from tests.api.support import TOKEN
from tests.support.net import free_port
from tests.support.proc import twistd_env
from tests.support.router import options_from, start_router, stop_router

CTL = os.path.join(os.path.dirname(sys.executable), "dcrouterctl")


def start_api(state_dir: str, **api: Any):
    """A router with only the API (on a free loopback port); returns (router, port)."""
    section = {"listen": "127.0.0.1", "port": free_port(), "token": TOKEN}
    section.update(api)
    router = start_router(options_from({"api": section}, state_dir))
    return router, router.by_name["api"].listeners.port_for("api.port")


def client_context(cafile: Optional[str] = None, cert: Optional[str] = None,
                   key: Optional[str] = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)
    if cert:
        context.load_cert_chain(cert, key)
    return context


def get(url: str, context: Optional[ssl.SSLContext], token: Optional[str] = TOKEN) -> tuple:
    """Blocking GET; (status, parsed JSON)."""
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def handshake(port: int, context: ssl.SSLContext) -> tuple[str, str]:
    """TLS version and cipher negotiated by a raw ssl socket."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.version() or "", tls.cipher()[0]


def handshake_fails(port: int, context: ssl.SSLContext) -> str:
    """The error text of a handshake (plus one request) that must fail."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                # TLS 1.3: a missing client certificate is reported after the handshake
                tls.sendall(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                data = tls.recv(100)
                return "" if data.startswith(b"HTTP/") else f"closed: {data!r}"
    except (ssl.SSLError, OSError) as e:
        return f"{type(e).__name__}: {e}"


async def ctl(*args: str, env_extra: Optional[dict[str, str]] = None) -> tuple[int, str, str]:
    env = twistd_env()
    for name in ("DCROUTER_API_URL", "DCROUTER_API_TOKEN", "DCROUTER_API_CACERT",
                 "DCROUTER_API_CERT", "DCROUTER_API_KEY"):
        env.pop(name, None)
    env["DCROUTER_API_TOKEN"] = TOKEN
    env.update(env_extra or {})
    out, err, code = await utils.getProcessOutputAndValue(CTL, list(args), env=env)
    return code, out.decode(), err.decode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA with a server certificate for 127.0.0.1/localhost, and a foreign CA."""
    base = tmp_path_factory.mktemp("pki")
    ca = TestCA(str(base / "ca"))
    server = ca.issue("server", ips=("127.0.0.1", "::1"), dns=("localhost",))
    client = ca.issue("operator", client=True)
    other = TestCA(str(base / "other"), name="someone else's CA")
    other_server = other.issue("server", ips=("127.0.0.1",))
    other_client = other.issue("intruder", client=True)
    return {"ca": ca.path, "server": server, "client": client, "other_ca": other.path,
            "other_server": other_server, "other_client": other_client}


@pytest_twisted.ensureDeferred
async def test_self_signed_default_certificate(tmp_path):
    router, port = start_api(str(tmp_path), tls=True)
    try:
        api = router.by_name["api"]
        assert api.bound_addresses() == [("tcp+tls", "127.0.0.1", port)]
        cert = tmp_path / "api" / "certs" / "127.0.0.1.crt"
        assert cert.exists() and oct(cert.stat().st_mode & 0o777) == "0o600"
        assert oct((tmp_path / "api" / "certs" / "127.0.0.1.key").stat().st_mode & 0o777) \
            == "0o600"
        url = f"https://127.0.0.1:{port}/api/status"
        # the certificate verifies as itself, hostname 127.0.0.1 included
        status, body = await threads.deferToThread(get, url, client_context(str(cert)))
        assert status == 200 and "api" in json.dumps(body)
        status, body = await threads.deferToThread(get, url, client_context(str(cert)), "bad")
        assert status == 401 and body["error"]["code"] == "unauthorized"
        # an unconfigured client does not trust it
        with pytest.raises(urllib.error.URLError) as caught:
            await threads.deferToThread(get, url, client_context())
        assert isinstance(caught.value.reason, ssl.SSLCertVerificationError)
        # plain HTTP on the HTTPS port gets no answer
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)) as plain:
            await threads.deferToThread(get, f"http://127.0.0.1:{port}/api/status", None)
        assert not isinstance(plain.value, urllib.error.HTTPError)
        assert api.get_stats()["tls"] is True
        # dcrouterctl pins the self-signed certificate with --cacert
        code, _, err = await ctl("--url", f"https://127.0.0.1:{port}", "--cacert", str(cert),
                                 "status")
        assert code == 0, err
    finally:
        await stop_router(router)


@pytest_twisted.ensureDeferred
async def test_tls_versions_and_ciphers(tmp_path, pki):
    cert, key = pki["server"]
    router, port = start_api(str(tmp_path), tls_cert=cert, tls_key=key)
    try:
        version, cipher = await threads.deferToThread(handshake, port, client_context(pki["ca"]))
        assert version in ("TLSv1.2", "TLSv1.3")
        tls12 = client_context(pki["ca"])
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        version, cipher = await threads.deferToThread(handshake, port, tls12)
        assert version == "TLSv1.2"
        assert cipher.startswith("ECDHE") and ("GCM" in cipher or "CHACHA20" in cipher), cipher
        # a TLS 1.2 client offering only a non-forward-secret CBC cipher is refused
        weak = client_context(pki["ca"])
        weak.maximum_version = ssl.TLSVersion.TLSv1_2
        weak.set_ciphers("AES128-SHA:AES256-SHA")
        assert await threads.deferToThread(handshake_fails, port, weak)
        # and so is a TLS 1.1 client
        old = client_context(pki["ca"])
        old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("ALL:@SECLEVEL=0")
        assert await threads.deferToThread(handshake_fails, port, old)
    finally:
        await stop_router(router)


@pytest_twisted.ensureDeferred
async def test_tls13_minimum(tmp_path, pki):
    cert, key = pki["server"]
    router, port = start_api(str(tmp_path), tls_cert=cert, tls_key=key,
                             tls_min_version="TLSv1.3")
    try:
        version, _ = await threads.deferToThread(handshake, port, client_context(pki["ca"]))
        assert version == "TLSv1.3"
        tls12 = client_context(pki["ca"])
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        assert await threads.deferToThread(handshake_fails, port, tls12)
    finally:
        await stop_router(router)


@pytest_twisted.ensureDeferred
async def test_configured_certificate_and_wrong_ca(tmp_path, pki):
    cert, key = pki["server"]
    router, port = start_api(str(tmp_path), tls_cert=cert, tls_key=key)
    try:
        url = f"https://127.0.0.1:{port}/api/status"
        status, _ = await threads.deferToThread(get, url, client_context(pki["ca"]))
        assert status == 200
        status, _ = await threads.deferToThread(get, f"https://localhost:{port}/api/status",
                                                client_context(pki["ca"]))
        assert status == 200
        with pytest.raises(urllib.error.URLError) as caught:
            await threads.deferToThread(get, url, client_context(pki["other_ca"]))
        assert isinstance(caught.value.reason, ssl.SSLCertVerificationError)
        assert not (tmp_path / "api").exists(), "no self-signed certificate when files are given"
        # the status page's own origin over HTTPS is accepted, a foreign one refused
        def page() -> bytes:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/", timeout=10,
                                        context=client_context(pki["ca"])) as response:
                return response.read()
        assert b"<html" in (await threads.deferToThread(page)).lower()

        def with_origin(origin: str) -> int:
            request = urllib.request.Request(url, headers={
                "Origin": origin, "Authorization": f"Bearer {TOKEN}"})
            try:
                with urllib.request.urlopen(request, timeout=10,
                                            context=client_context(pki["ca"])) as response:
                    return response.status
            except urllib.error.HTTPError as e:
                return e.code
        assert await threads.deferToThread(with_origin, f"https://127.0.0.1:{port}") == 200
        assert await threads.deferToThread(with_origin, "https://evil.example") == 403
    finally:
        await stop_router(router)


@pytest_twisted.ensureDeferred
async def test_cli_over_https(tmp_path, pki):
    cert, key = pki["server"]
    router, port = start_api(str(tmp_path), tls_cert=cert, tls_key=key)
    url = f"https://127.0.0.1:{port}"
    try:
        code, out, err = await ctl("--url", url, "--cacert", pki["ca"], "--json", "status")
        assert code == 0, err
        assert json.loads(out)["services"]
        code, out, err = await ctl("--url", url, "status", env_extra={
            "DCROUTER_API_CACERT": pki["ca"]})
        assert code == 0, err
        # the wrong CA: refused with exit code 3 and a hint
        code, out, err = await ctl("--url", url, "--cacert", pki["other_ca"], "status")
        assert code == 3 and "not trusted" in err and "--cacert" in err, err
        # no CA at all (system store): refused too; --insecure accepts it
        code, _, err = await ctl("--url", url, "status")
        assert code == 3 and "not trusted" in err, err
        code, _, err = await ctl("--url", url, "--insecure", "status")
        assert code == 0, err
        # a missing CA file is a usage error
        code, _, err = await ctl("--url", url, "--cacert", str(tmp_path / "none.pem"), "status")
        assert code == 2 and "--cacert" in err, err
        # http:// against the HTTPS port cannot talk to the API
        code, _, err = await ctl("--url", f"http://127.0.0.1:{port}", "status")
        assert code == 3, err
    finally:
        await stop_router(router)


@pytest_twisted.ensureDeferred
async def test_mutual_tls(tmp_path, pki):
    cert, key = pki["server"]
    router, port = start_api(str(tmp_path), tls_cert=cert, tls_key=key,
                             tls_client_ca=pki["ca"])
    url = f"https://127.0.0.1:{port}"
    try:
        client_cert, client_key = pki["client"]
        good = client_context(pki["ca"], client_cert, client_key)
        status, _ = await threads.deferToThread(get, url + "/api/status", good)
        assert status == 200
        # the certificate does not replace the token
        status, body = await threads.deferToThread(get, url + "/api/status", good, None)
        assert status == 401
        # without a client certificate, or with one of another CA: no HTTP at all
        assert await threads.deferToThread(handshake_fails, port, client_context(pki["ca"]))
        foreign = client_context(pki["ca"], *pki["other_client"])
        assert await threads.deferToThread(handshake_fails, port, foreign)
        # the CLI with and without --cert/--key
        code, _, err = await ctl("--url", url, "--cacert", pki["ca"], "--cert", client_cert,
                                 "--key", client_key, "status")
        assert code == 0, err
        code, _, err = await ctl("--url", url, "--cacert", pki["ca"], "status",
                                 env_extra={"DCROUTER_API_CERT": client_cert,
                                            "DCROUTER_API_KEY": client_key})
        assert code == 0, err
        code, _, err = await ctl("--url", url, "--cacert", pki["ca"], "status")
        assert code == 3 and "client certificate" in err, err
    finally:
        await stop_router(router)


@pytest_twisted.ensureDeferred
async def test_reload_switches_certificate_and_toggles_tls(tmp_path, pki):
    cert, key = pki["server"]
    router, port = start_api(str(tmp_path), tls_cert=cert, tls_key=key)
    api = router.by_name["api"]
    url = f"https://127.0.0.1:{port}/api/status"
    try:
        listening = next(iter(api.listeners.ports.values()))
        other_cert, other_key = pki["other_server"]
        new = dataclasses.replace(router.options, api=dataclasses.replace(
            router.options.api, tls_cert=other_cert, tls_key=other_key))
        await api.reconfigure(new)
        assert next(iter(api.listeners.ports.values())) is listening, "port kept"
        status, _ = await threads.deferToThread(get, url, client_context(pki["other_ca"]))
        assert status == 200
        with pytest.raises(urllib.error.URLError):
            await threads.deferToThread(get, url, client_context(pki["ca"]))
        # a broken certificate path is refused, the running certificate stays
        broken = dataclasses.replace(new, api=dataclasses.replace(
            new.api, tls_cert=str(tmp_path / "missing.crt")))
        with pytest.raises(ConfigError) as caught:
            await api.reconfigure(broken)
        assert caught.value.path == "api.tls_cert"
        status, _ = await threads.deferToThread(get, url, client_context(pki["other_ca"]))
        assert status == 200
        # TLS off: the same port answers plain HTTP
        plain = dataclasses.replace(new, api=dataclasses.replace(
            new.api, tls_cert="", tls_key=""))
        await api.reconfigure(plain)
        assert api.bound_addresses() == [("tcp", "127.0.0.1", port)]
        status, _ = await threads.deferToThread(get, f"http://127.0.0.1:{port}/api/status",
                                                None)
        assert status == 200
    finally:
        await stop_router(router)


def test_certificate_needs_its_key():
    with pytest.raises(ConfigError) as caught:
        parse_config({"api": {"tls_cert": "/etc/dcrouter/api.crt"}})
    assert caught.value.path == "api.tls_key"
    assert "api.tls_cert" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        parse_config({"api": {"tls_key": "/etc/dcrouter/api.key"}})
    assert caught.value.path == "api.tls_cert"
    with pytest.raises(ConfigError) as caught:
        parse_config({"api": {"tls_min_version": "TLSv1.1"}})
    assert caught.value.path == "api.tls_min_version"


def test_non_loopback_needs_token_even_with_tls():
    with pytest.raises(ConfigError) as caught:
        parse_config({"api": {"listen": "10.0.0.5", "tls": True}})
    assert caught.value.path == "api.token"


def test_non_loopback_without_tls_loads_and_warns():
    options = parse_config({"api": {"listen": "10.0.0.5", "token": "t"}}).api
    assert options is not None and not options.https
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        ApiService._warn_plaintext(options)
        ApiService._warn_plaintext(dataclasses.replace(options, tls=True))
        ApiService._warn_plaintext(dataclasses.replace(options, listen="127.0.0.1"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e for e in events if "without TLS" in e.get("log_format", "")]
    assert len(warnings) == 1 and warnings[0]["host"] == "10.0.0.5"


def test_unreadable_files_name_their_key(tmp_path, pki):
    cert, key = pki["server"]
    with pytest.raises(ConfigError) as caught:
        start_api(str(tmp_path / "a"), tls_cert=str(tmp_path / "nope.crt"), tls_key=key)
    assert caught.value.path == "api.tls_cert"
    with pytest.raises(ConfigError) as caught:
        start_api(str(tmp_path / "b"), tls_cert=cert, tls_key=key,
                  tls_client_ca=str(tmp_path / "nope-ca.crt"))
    assert caught.value.path == "api.tls_client_ca"
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as caught:
        start_api(str(tmp_path / "c"), tls_cert=cert, tls_key=key, tls_client_ca=str(empty))
    assert caught.value.path == "api.tls_client_ca"
    with pytest.raises(ConfigError) as caught:  # key of another certificate
        start_api(str(tmp_path / "d"), tls_cert=cert, tls_key=pki["client"][1])
    assert caught.value.path == "api.tls_cert"


@pytest_twisted.ensureDeferred
async def test_dcrouterctl_reload_over_https_switches_the_certificate(tmp_path, pki):
    from tests.support.configs import write_config
    cert, key = pki["server"]
    port = free_port()
    section = {"listen": "127.0.0.1", "port": port, "token": TOKEN, "tls_cert": cert,
               "tls_key": key}
    data = {"router": {"state_dir": str(tmp_path / "var")}, "api": dict(section)}
    path = write_config(str(tmp_path / "dcrouter.toml"), data)
    router = start_router(options_from(data, str(tmp_path / "var")), config_path=path)
    url = f"https://127.0.0.1:{port}"
    try:
        other_cert, other_key = pki["other_server"]
        data["api"].update(tls_cert=other_cert, tls_key=other_key)
        write_config(path, data)
        code, _, err = await ctl("--url", url, "--cacert", pki["ca"], "reload")
        assert code == 0, err
        code, _, err = await ctl("--url", url, "--cacert", pki["ca"], "status")
        assert code == 3 and "not trusted" in err, err
        code, _, err = await ctl("--url", url, "--cacert", pki["other_ca"], "status")
        assert code == 0, err
        # a certificate path that does not exist: the reload is refused, the API keeps serving
        data["api"].update(tls_cert=str(tmp_path / "missing.crt"))
        write_config(path, data)
        code, _, err = await ctl("--url", url, "--cacert", pki["other_ca"], "reload")
        assert code == 1 and "not reloaded" in err, err  # the log names api.tls_cert
        code, _, err = await ctl("--url", url, "--cacert", pki["other_ca"], "status")
        assert code == 0, err
    finally:
        await stop_router(router)


@pytest_twisted.ensureDeferred
async def test_status_page_over_https_in_chromium(tmp_path):
    import shutil
    import tempfile

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.api.test_status_page import CHROMEDRIVER, CHROMIUM

    router, port = start_api(str(tmp_path / "var"), tls=True)
    profile = tempfile.mkdtemp(prefix="dcrouter-chromium-")
    driver = None
    try:
        def load() -> dict:
            nonlocal driver
            options = webdriver.ChromeOptions()
            options.binary_location = CHROMIUM
            for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                         "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync",
                         "--disable-dev-shm-usage", "--ignore-certificate-errors",
                         f"--user-data-dir={profile}"):
                options.add_argument(flag)
            driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
            driver.set_page_load_timeout(30)
            driver.get(f"https://127.0.0.1:{port}/?interval=0.5#token={TOKEN}")
            WebDriverWait(driver, 20, poll_frequency=0.1,
                          ignored_exceptions=(StaleElementReferenceException,)).until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, "#services tr")) == 1)
            # read the row in one script call: the page re-renders it every interval
            service, cells = driver.execute_script(
                "const r = document.querySelector('#services tr'); return "
                "[r.getAttribute('data-service'), Array.from(r.querySelectorAll('td'))"
                ".map(c => c.innerText.trim())];")
            return {"service": service, "cells": cells, "url": driver.current_url}

        page = await threads.deferToThread(load)
        assert page["service"] == "api" and page["cells"][1] == "running"
        assert f"127.0.0.1:{port}" in page["cells"][2] and "tls" in page["cells"][2]
        assert page["url"].startswith("https://") and "token" not in page["url"]
    finally:
        if driver is not None:
            await threads.deferToThread(driver.quit)
        shutil.rmtree(profile, ignore_errors=True)
        await stop_router(router)

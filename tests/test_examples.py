"""Every example configuration passes check-config and builds a service tree."""

from __future__ import annotations

import dataclasses
import glob
import os

import pytest

from dcrouter.config import load_config
from dcrouter.router import make_router
from dcrouter.tlsutil import ensure_self_signed
from tests.support.proc import REPO, run_cli

EXAMPLES = sorted(glob.glob(os.path.join(REPO, "etc", "examples", "*.toml")))


def test_there_are_at_least_six_examples():
    assert len(EXAMPLES) >= 6


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_passes_check_config(path):
    result = run_cli("check-config", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: OK")


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_builds_a_service_tree(path, tmp_path):
    options = load_config(path)
    router_options = dataclasses.replace(options.router, state_dir=str(tmp_path / "state"))
    options = dataclasses.replace(options, router=router_options)
    if options.email is not None and options.email.tls.cert_path:
        # the example names the operator's certificate files; stand in generated ones
        cert, key = ensure_self_signed(str(tmp_path), options.email.hostname)
        tls = dataclasses.replace(options.email.tls, cert_path=cert, key_path=key)
        options = dataclasses.replace(options, email=dataclasses.replace(options.email, tls=tls))
    router = make_router(options)
    expected = {n for n in ("email", "proxy", "dns", "api") if getattr(options, n) is not None}
    assert set(router.by_name) == expected


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_starts_with_a_comment_header(path):
    with open(path, encoding="utf-8") as f:
        head = f.read().split("\n[", 1)[0]
    assert "Use it when" in head

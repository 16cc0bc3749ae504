"""docs/configuration.md must hold the reference generated from the option classes."""

from __future__ import annotations

import os

from dcrouter.config.reference import all_key_paths, render
from tests.support.proc import REPO


def _generated_block() -> str:
    with open(os.path.join(REPO, "docs", "configuration.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index("<!-- BEGIN GENERATED REFERENCE -->") + len("<!-- BEGIN GENERATED REFERENCE -->")
    end = text.index("<!-- END GENERATED REFERENCE -->")
    return text[start:end].strip()


def test_reference_in_docs_matches_the_code():
    assert _generated_block() == render().strip(), (
        "docs/configuration.md is stale: regenerate it with "
        "`python -m dcrouter.config.reference` (see the file's header)")


def test_every_key_is_documented():
    block = _generated_block()
    for path in all_key_paths():
        assert f"`{path}`" in block

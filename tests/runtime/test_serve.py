"""``lcm-run serve`` without a browser: the one-line errors when js/ or its node_modules is missing, and ``serve``
as the first argument leaving ``lcm-run BUNDLE PROMPT`` as it was (the page itself: tests/js/test_browser.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lcm_export.errors import UserError
from lcm_export.runtime.serve import js_roots
from tests.helpers import assert_one_line_error, run_module


def test_js_roots_say_to_run_npm_ci(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "index.js").write_text("")
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "index.html").write_text("")
    with pytest.raises(UserError, match="npm ci"):
        js_roots(tmp_path)


def test_js_roots_need_a_checkout(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="checkout"):
        js_roots(tmp_path)


def test_serve_validates_the_bundle_first(tmp_path: Path) -> None:
    result = run_module("lcm_export.runtime.cli", "serve", tmp_path / "missing", "--port", "0")
    assert_one_line_error(result, "is not a folder")


def test_a_bundle_named_like_the_subcommand_still_runs_as_before(tmp_path: Path) -> None:
    # "./serve" is a bundle path for the generate form (here a missing one), not the subcommand
    result = run_module("lcm_export.runtime.cli", "./serve", "a cat", "--steps", "1")
    assert_one_line_error(result, "BUNDLE 'serve' is not a folder")

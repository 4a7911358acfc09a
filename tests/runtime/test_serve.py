"""``lcm-run serve`` without a browser: the one-line errors when js/ or its node_modules is missing, and ``serve``
as the first argument leaving ``lcm-run BUNDLE PROMPT`` as it was (the page itself: tests/js/test_browser.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lcm_export.errors import UserError
from lcm_export.runtime.serve import bundle_commonjs, js_roots
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


def test_a_symlinked_node_modules_is_bundled(tmp_path: Path) -> None:
    """The CommonJS wrapper finds files through a symlinked node_modules (a git worktree's, pnpm's): they resolve
    outside the link, and the wrapper names them relative to where the link points."""
    real = tmp_path / "store" / "node_modules"
    package = real / "demo-package"
    (package / "lib").mkdir(parents=True)
    (package / "package.json").write_text('{"name": "demo-package", "main": "lib/index.js"}')
    (package / "lib" / "index.js").write_text('module.exports = require("./helper.js");\n')
    (package / "lib" / "helper.js").write_text("module.exports = 42;\n")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "node_modules").symlink_to(real, target_is_directory=True)
    text = bundle_commonjs(checkout / "node_modules", "demo-package").decode()
    assert "// demo-package/lib/index.js" in text and "// demo-package/lib/helper.js" in text

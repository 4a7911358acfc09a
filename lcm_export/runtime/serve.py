"""``lcm-run serve BUNDLE``: the bundle in a browser page, offline, from a stdlib HTTP server (no torch).

The server maps URL prefixes to folders of the repository checkout and the bundle:

- ``/`` and ``/demo/``: the page (``js/demo/``); ``/src/``: the JavaScript runtime's ES modules (``js/src/``);
- ``/node_modules/onnxruntime-web/dist/`` and ``/node_modules/@huggingface/tokenizers/dist/``: the two browser
  dependencies as shipped (ES modules, ``.wasm``), which the page's import map names;
- ``/vendor/ajv-2020.mjs``: ajv (CommonJS only) wrapped into one ES module here, at the first request;
- ``/bundle/``: the bundle's files.

Every response carries ``Cross-Origin-Opener-Policy: same-origin`` and ``Cross-Origin-Embedder-Policy:
require-corp`` (the page is ``crossOriginIsolated``: onnxruntime-web's WASM runs on threads). Nothing else is
served: no directory listings, no path outside those folders (symlinks included).
"""

from __future__ import annotations

import http.server
import io
import json
import posixpath
import re
import sys
import threading
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote, urlsplit

from lcm_export.errors import UserError

# The repository's js/ folder: the page and the runtime are read from the checkout, not installed with the wheel.
JS_DIR = Path(__file__).resolve().parents[2] / "js"
AJV_ENTRY = "ajv/dist/2020.js"
AJV_URL = "/vendor/ajv-2020.mjs"

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".map": "application/json",
    ".css": "text/css; charset=utf-8",
    ".onnx": "application/octet-stream",
}


def js_roots(js_dir: Path = JS_DIR) -> dict[str, Path]:
    """URL prefix -> folder of the page, the runtime and its browser dependencies; a one-line error when js/ or
    its node_modules is missing."""
    if not (js_dir / "src" / "index.js").is_file() or not (js_dir / "demo" / "index.html").is_file():
        raise UserError(
            f"lcm-run serve needs the JavaScript runtime of a repository checkout, and '{js_dir}' has none: run it "
            "from a checkout of lcm-export (git clone), not from an installed wheel"
        )
    modules = js_dir / "node_modules"
    roots = {
        "/demo/": js_dir / "demo",
        "/src/": js_dir / "src",
        "/node_modules/onnxruntime-web/dist/": modules / "onnxruntime-web" / "dist",
        "/node_modules/@huggingface/tokenizers/dist/": modules / "@huggingface" / "tokenizers" / "dist",
    }
    missing = [path for path in (*roots.values(), modules / "ajv" / "dist" / "2020.js") if not path.exists()]
    if missing:
        raise UserError(
            f"lcm-run serve needs the JavaScript runtime's dependencies, and '{missing[0]}' is missing: run "
            f"`ONNXRUNTIME_NODE_INSTALL=skip npm ci` in {js_dir}"
        )
    return roots


_REQUIRE = re.compile(r"""\brequire\(\s*["']([^"']+)["']\s*\)""")


def _resolve_cjs(modules: Path, base: Path, specifier: str) -> Path | None:
    """Node's resolution of ``require(specifier)`` from the file ``base`` for the few packages ajv uses."""
    if specifier.startswith("."):
        target = (base.parent / specifier).resolve()
    else:
        parts = specifier.split("/")
        package_parts = 2 if specifier.startswith("@") else 1
        package = modules.joinpath(*parts[:package_parts])
        rest = parts[package_parts:]
        if not rest:
            try:
                main = json.loads((package / "package.json").read_text()).get("main") or "index.js"
            except (OSError, ValueError):
                return None
            target = (package / main).resolve()
        else:
            target = package.joinpath(*rest)
    for candidate in (
        target,
        target.with_name(target.name + ".js"),
        target.with_name(target.name + ".json"),
        target / "index.js",
    ):
        if candidate.is_file():
            return candidate
    return None


def bundle_commonjs(modules: Path, entry: str) -> bytes:
    """One ES module whose default export is ``require(entry)``: every file it requires (found by the literal
    ``require("…")`` calls, as browserify does) wrapped in a function, with a small ``require`` of its own.
    ``modules`` is resolved first: the files found are resolved paths, and a symlinked node_modules (a git
    worktree's, pnpm's) must still contain them."""
    modules = modules.resolve()
    start = _resolve_cjs(modules, modules / "index.js", entry)
    if start is None:
        raise UserError(
            f"'{modules / entry}' is missing: run `ONNXRUNTIME_NODE_INSTALL=skip npm ci` in {modules.parent}"
        )
    ids: dict[Path, int] = {}
    order: list[Path] = []
    links: dict[int, dict[str, int]] = {}
    pending = [start]
    ids[start] = 0
    order.append(start)
    while pending:
        path = pending.pop()
        text = path.read_text(encoding="utf-8")
        table: dict[str, int] = {}
        if path.suffix != ".json":
            for specifier in set(_REQUIRE.findall(text)):
                target = _resolve_cjs(modules, path, specifier)
                if target is None:
                    continue  # a require in generated code or an optional one: fails only if called
                if target not in ids:
                    ids[target] = len(order)
                    order.append(target)
                    pending.append(target)
                table[specifier] = ids[target]
        links[ids[path]] = table
    out = io.StringIO()
    out.write(f"// {entry} and what it requires, from node_modules, as one ES module (lcm-run serve)\n")
    out.write("const defs = [\n")
    for path in order:
        text = path.read_text(encoding="utf-8")
        body = f"module.exports = {text};" if path.suffix == ".json" else text
        out.write(f"// {path.relative_to(modules).as_posix()}\n")
        out.write(f"[{json.dumps(links[ids[path]])}, function (module, exports, require) {{\n{body}\n}}],\n")
    out.write(
        "];\n"
        "const cache = [];\n"
        "function load(id) {\n"
        "  if (cache[id]) return cache[id].exports;\n"
        "  const module = (cache[id] = { exports: {} });\n"
        "  const [table, define] = defs[id];\n"
        "  const require = (name) => {\n"
        "    if (!(name in table)) throw new Error(`require(${JSON.stringify(name)}) is not in this bundle`);\n"
        "    return load(table[name]);\n"
        "  };\n"
        "  define.call(module.exports, module, module.exports, require);\n"
        "  return module.exports;\n"
        "}\n"
        "export default load(0);\n"
    )
    return out.getvalue().encode("utf-8")


class Handler(http.server.SimpleHTTPRequestHandler):
    """GET and HEAD of the mapped folders, with the cross-origin isolation headers."""

    # Set per server by make_server (a subclass each): the folders, node_modules, the generated modules.
    roots: ClassVar[dict[str, Path]] = {}
    modules: ClassVar[Path] = JS_DIR / "node_modules"
    generated: ClassVar[dict[str, bytes]] = {}
    lock: ClassVar[threading.Lock] = threading.Lock()
    quiet: ClassVar[bool] = True

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def guess_type(self, path) -> str:  # type: ignore[override]
        return TYPES.get(Path(str(path)).suffix.lower(), "application/octet-stream")

    def log_message(self, format: str, *args) -> None:
        if not self.quiet:
            super().log_message(format, *args)

    def list_directory(self, path):  # type: ignore[override]
        self.send_error(404, "no directory listings")
        return None

    def translate_path(self, path: str) -> str:
        """The file for a URL path, or a path that does not exist when it maps to no folder or leaves one."""
        url_path = unquote(urlsplit(path).path)
        if url_path in ("/", "/index.html"):
            url_path = "/demo/index.html"
        for prefix, root in self.roots.items():
            if not url_path.startswith(prefix):
                continue
            relative = posixpath.normpath(url_path[len(prefix) :])
            if relative.startswith("..") or relative.startswith("/"):
                break
            target = (root / relative).resolve()
            if not target.is_relative_to(root.resolve()):
                break
            return str(target)
        return "/nonexistent/lcm-run-serve"

    def send_head(self):  # type: ignore[override]
        if urlsplit(self.path).path == AJV_URL:
            with self.lock:
                if AJV_URL not in self.generated:
                    self.generated[AJV_URL] = bundle_commonjs(self.modules, AJV_ENTRY)
            body = self.generated[AJV_URL]
            self.send_response(200)
            self.send_header("Content-Type", TYPES[".mjs"])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return io.BytesIO(body)
        return super().send_head()


def make_server(
    bundle: Path, host: str = "127.0.0.1", port: int = 8000, js_dir: Path = JS_DIR, quiet: bool = True
) -> http.server.ThreadingHTTPServer:
    """A ThreadingHTTPServer serving ``bundle`` and the page (not started). ``port`` 0 picks a free one."""
    roots = {"/bundle/": Path(bundle).resolve(), **js_roots(js_dir)}
    settings = {"roots": roots, "modules": js_dir / "node_modules", "generated": {}, "quiet": quiet}
    handler = type("BundleHandler", (Handler,), settings)
    try:
        return http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as error:
        raise UserError(
            f"--port {port} on {host} cannot be used ({error.strerror or error}): pass another --port "
            "(0 picks a free one)"
        ) from None


def serve(argv: list[str]) -> int:
    """``lcm-run serve BUNDLE [--port N] [--host H]``."""
    import argparse

    from lcm_export.runtime.manifest import load_manifest

    parser = argparse.ArgumentParser(
        prog="lcm-run serve",
        description="Serve a bundle and the JavaScript runtime's page (onnxruntime-web: WebGPU or WASM), offline.",
    )
    parser.add_argument("bundle", type=Path, help="bundle folder written by lcm-export")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--verbose", "-v", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    # The structure and the sizes here (fast on a large bundle); the page hashes every file it reads.
    load_manifest(args.bundle, verify="size")
    server = make_server(args.bundle, args.host, args.port, quiet=not args.verbose)
    host, port = server.server_address[:2]
    print(f"serving {args.bundle} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(serve(sys.argv[1:]))

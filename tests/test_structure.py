"""Dependencies point one way: runtime <- targets / calibration <- exporter.

Two checks. A static one reads every module's source with ``ast`` and finds each import of a package it must not
depend on, wherever the import sits: module level, inside a function, under ``if TYPE_CHECKING``, relative, or
through ``importlib.import_module("...")`` with a literal name. A function-local import shows no error at import
time, yet makes a circle all the same. The dynamic one imports each module in a fresh interpreter where the heavy
libraries (and, for the targets, the exporter) fail to import, as on a machine without them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import lcm_export

PACKAGE_ROOT = Path(lcm_export.__file__).resolve().parent

EXPORTER = "lcm_export.exporter"
TARGETS = "lcm_export.targets"
CALIBRATION = "lcm_export.calibration"
# folder under lcm_export -> packages nothing in it may import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "runtime": (EXPORTER, TARGETS, CALIBRATION),
    "targets": (EXPORTER,),
    "calibration": (EXPORTER,),
}


@dataclass(frozen=True)
class ImportSite:
    path: str
    line: int
    imported: str  # the module the statement imports (resolved when relative)
    where: str  # "module level", "in a function", "under TYPE_CHECKING", ...

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: imports {self.imported} ({self.where})"


def module_name(path: Path) -> str:
    parts = path.resolve().relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve_relative(module: str | None, level: int, current: str, is_package: bool) -> str:
    """The absolute module of ``from <level dots><module> import ...`` in module ``current``."""
    package = current.split(".") if is_package else current.split(".")[:-1]
    if level > 1:
        package = package[: len(package) - (level - 1)]
    return ".".join([*package, module] if module else package)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(source: str, current: str, is_package: bool) -> list[tuple[int, str, str]]:
    """Every (line, module, context) imported by ``source``; ``from a import b`` yields both ``a`` and ``a.b``
    (``b`` may be a submodule)."""
    found: list[tuple[int, str, str]] = []

    def visit(node: ast.AST, context: str) -> None:
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, context) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(node.module, node.level, current, is_package) if node.level else node.module or ""
            found.append((node.lineno, base, context))
            found.extend((node.lineno, f"{base}.{alias.name}", context) for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value, f"{context}, {name}()"))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, "under TYPE_CHECKING")
            for child in node.orelse:
                visit(child, context)
            visit(node.test, context)
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            context = "in a function"
        for child in ast.iter_child_nodes(node):
            visit(child, context)

    visit(ast.parse(source), "module level")
    return found


def forbidden_imports(path: Path, forbidden: tuple[str, ...], source: str | None = None) -> list[ImportSite]:
    source = path.read_text() if source is None else source
    current = module_name(path)
    sites = []
    seen: set[tuple[int, str]] = set()
    for line, imported, context in imported_modules(source, current, path.name == "__init__.py"):
        target = next((f for f in forbidden if imported == f or imported.startswith(f + ".")), None)
        if target is None or (line, target) in seen:
            continue
        seen.add((line, target))  # "from lcm_export.exporter import x" once, not for both names it yields
        sites.append(ImportSite(str(path.relative_to(PACKAGE_ROOT.parent)), line, imported, context))
    return sites


def modules_under(folder: str) -> list[Path]:
    return sorted((PACKAGE_ROOT / folder).rglob("*.py"))


def test_layers_import_only_downwards() -> None:
    offending: list[ImportSite] = []
    checked = 0
    for folder, forbidden in FORBIDDEN.items():
        for path in modules_under(folder):
            checked += 1
            offending.extend(forbidden_imports(path, forbidden))
    assert checked >= 10, f"only {checked} modules found under {PACKAGE_ROOT}"
    assert not offending, "imports against the layering (runtime <- targets / calibration <- exporter):\n" + "\n".join(
        map(str, offending)
    )


def test_the_import_scanner_finds_every_form() -> None:
    """The check above is only as good as its scanner: every way of importing the exporter is found."""
    source = textwrap.dedent(
        """
        from __future__ import annotations
        import importlib
        from typing import TYPE_CHECKING
        import lcm_export.exporter.bundle                          # 5
        from lcm_export.exporter.components import sample_inputs   # 6
        from lcm_export import exporter                            # 7
        from ..exporter import schedule                            # 8
        from .. import exporter as exporter_package                # 9
        if TYPE_CHECKING:
            from lcm_export.exporter.bundle import ExportConfig    # 11
        def build():
            import lcm_export.exporter                             # 13
            from ..exporter.bundle import engine_shape_range       # 14
            return importlib.import_module("lcm_export.exporter.tiny")  # 15
        import lcm_export.exporters_elsewhere                      # not the exporter
        from lcm_export.runtime import specs                       # allowed
        from . import onnx                                         # allowed: lcm_export.targets.onnx
        """
    )
    path = PACKAGE_ROOT / "targets" / "example.py"  # not read: the source is given
    sites = forbidden_imports(path, (EXPORTER,), source)
    assert [(site.line, site.where) for site in sites] == [
        (5, "module level"),
        (6, "module level"),
        (7, "module level"),
        (8, "module level"),
        (9, "module level"),
        (11, "under TYPE_CHECKING"),
        (13, "in a function"),
        (14, "in a function"),
        (15, "in a function, import_module()"),
    ]
    assert sites[3].imported.startswith("lcm_export.exporter") and str(sites[0]).startswith("lcm_export/targets/")
    # A relative import from a package's __init__ resolves from the package itself.
    init = PACKAGE_ROOT / "runtime" / "__init__.py"
    assert [s.imported for s in forbidden_imports(init, (TARGETS,), "from ..targets import onnx\n")] == [
        "lcm_export.targets",
    ]
    assert forbidden_imports(init, (TARGETS,), "from .backends import BACKENDS\n") == []


# -- imports with the heavy libraries missing ----------------------------------------------------------------------

RUNTIME_BLOCKED = ("torch", "diffusers", "transformers", "onnx", "peft")
TARGETS_BLOCKED = ("diffusers", "transformers", "peft", EXPORTER)


def import_blocked(module: str, blocked: tuple[str, ...], path: Path | None = None) -> subprocess.CompletedProcess:
    """Import ``module`` in a fresh interpreter in which importing any of ``blocked`` (or their submodules) raises
    ImportError; ``path`` is put first on ``sys.path``."""
    code = (
        "import importlib, sys\n"
        f"path = {None if path is None else str(path)!r}\n"
        "if path: sys.path.insert(0, path)\n"
        f"blocked = {list(blocked)!r}\n"
        "for name in blocked: sys.modules[name] = None\n"
        f"importlib.import_module({module!r})\n"
        "loaded = [m for m, v in sys.modules.items() if v is not None and any(\n"
        "    m == name or m.startswith(name + '.') for name in blocked)]\n"
        "assert not loaded, f'loaded despite the block: {loaded}'\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def _last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit {result.returncode}"


@pytest.mark.parametrize("module", [module_name(path) for path in modules_under("runtime")])
def test_runtime_module_imports_without_torch_diffusers_transformers_onnx_peft(module: str) -> None:
    result = import_blocked(module, RUNTIME_BLOCKED)
    assert result.returncode == 0, f"import {module} with {', '.join(RUNTIME_BLOCKED)} missing: {_last_line(result)}"


@pytest.mark.parametrize(
    "module", [module_name(path) for path in (*modules_under("targets"), *modules_under("calibration"))]
)
def test_target_module_imports_without_the_exporter_or_diffusers(module: str) -> None:
    result = import_blocked(module, TARGETS_BLOCKED)
    assert result.returncode == 0, f"import {module} with {', '.join(TARGETS_BLOCKED)} missing: {_last_line(result)}"


def test_the_blocked_import_check_can_fail(tmp_path: Path) -> None:
    (tmp_path / "probe_light.py").write_text("import json\n\ndef later():\n    import torch\n")
    (tmp_path / "probe_heavy.py").write_text("import numpy\nimport torch.nn\n")
    (tmp_path / "probe_layer.py").write_text("from lcm_export.exporter.schedule import scheduler_info\n")
    assert import_blocked("probe_light", RUNTIME_BLOCKED, tmp_path).returncode == 0
    heavy = import_blocked("probe_heavy", RUNTIME_BLOCKED, tmp_path)
    assert heavy.returncode != 0 and "torch" in _last_line(heavy), heavy.stderr
    layer = import_blocked("probe_layer", TARGETS_BLOCKED, tmp_path)
    assert layer.returncode != 0 and EXPORTER in _last_line(layer), layer.stderr


# -- import circles ------------------------------------------------------------------------------------------------

BENCH_ROOT = PACKAGE_ROOT.parent / "bench"


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ``modules`` it imports, wherever the import sits (function-local ones count).

    ``from a import b`` is an edge to ``a.b`` where that is one of the modules, else to ``a`` (``b`` is a name in
    it); any other import is an edge to the longest of the modules its name starts with.
    """

    def owner(name: str) -> str | None:
        parts = name.split(".")
        return next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in modules), None)

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        by_line: dict[int, list[str]] = {}
        for line, imported, _ in imported_modules(path.read_text(), name, path.name == "__init__.py"):
            by_line.setdefault(line, []).append(imported)
        edges: set[str] = set()
        for names in by_line.values():
            for imported in names:
                submodules = [other for other in names if other.startswith(imported + ".") and other in modules]
                if imported in modules and submodules:
                    continue  # "from a import b": the edge is to the submodule a.b
                target = owner(imported)
                if target is not None and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted; a circle is such a group."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.get(module, ())):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(circles)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def bench_modules() -> dict[str, Path]:
    """bench/'s scripts import each other by their bare names (the folder is their sys.path[0])."""
    return {path.stem: path for path in sorted(BENCH_ROOT.glob("*.py"))}


@pytest.mark.parametrize("modules", [package_modules, bench_modules], ids=["lcm_export", "bench"])
def test_no_import_circles(modules) -> None:
    found = modules()
    assert len(found) >= 5, f"only {len(found)} modules found"
    circles = import_circles(import_graph(found))
    assert not circles, "import circles (function-local imports count; move the shared piece below both):\n" + (
        "\n".join(" <-> ".join(circle) for circle in circles)
    )


def test_the_circle_finder_finds_a_function_local_circle(tmp_path: Path) -> None:
    (tmp_path / "low.py").write_text("import json\n")
    (tmp_path / "a.py").write_text("from low import x\n\ndef later():\n    from b import y\n")
    (tmp_path / "b.py").write_text("import a\n")
    (tmp_path / "c.py").write_text("import low\n")
    modules = {path.stem: path for path in sorted(tmp_path.glob("*.py"))}
    graph = import_graph(modules)
    assert graph == {"a": {"low", "b"}, "b": {"a"}, "c": {"low"}, "low": set()}
    assert import_circles(graph) == [["a", "b"]]


@pytest.fixture(scope="module")
def cache_seen_by_a_module_fixture() -> Path:
    """What a module-scoped fixture (the INT8 bundles' exports) resolves the cache to while it is set up."""
    from lcm_export.runtime.cache import cache_root

    return cache_root()


def test_fixtures_of_every_scope_use_this_run_s_cache(cache_seen_by_a_module_fixture, tmp_path_factory) -> None:
    """Never the user's cache: an export's calibration trajectories would land there, and a later run would read
    them instead of recording its own."""
    base = tmp_path_factory.getbasetemp()
    assert cache_seen_by_a_module_fixture.is_relative_to(base), cache_seen_by_a_module_fixture

"""The package's import rules (README, Developers), read from the source with ast: nothing is imported to check."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "octomil_lite"
FRAMEWORK_MODULES = ("octomil_lite.convert.estimators", "octomil_lite.convert.torch", "octomil_lite.convert.tensorflow")
# Which wing may import which; "root" is octomil_lite/__init__ (the version, and the lazy Client export).
WINGS = {
    "face": {"root", "face", "server", "domain", "storage", "convert", "base"},
    "server": {"root", "server", "domain", "storage", "convert", "base"},
    "domain": {"root", "domain", "storage", "convert", "base"},
    "storage": {"root", "storage", "base"},
    "convert": {"root", "convert", "base"},
    "base": {"root", "base"},
    "root": {"face"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _wing(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    if parts[1] in ("server", "storage", "convert"):
        return parts[1]
    if parts[1] in ("cli", "cli_client", "cli_training", "client", "flower", "__main__"):
        return "face"
    if parts[1] in ("registry", "maintenance", "federated", "aggregation", "lifecycle", "direct_uploads",
                    "federations", "optimize", "usage", "bundles", "transfer", "keys", "onnx_uploads", "checked_jobs"):
        return "domain"
    return "base"


def _in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _imports(module: str) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every runtime import; `if TYPE_CHECKING:` blocks are not runtime."""
    tree = ast.parse(MODULES[module].read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom) or _in_type_checking(node, parents):
            continue
        top = parents.get(node) is tree
        if isinstance(node, ast.Import):
            found += [(alias.name, top) for alias in node.names]
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([node.module] if node.module else []))
        for alias in node.names:
            found.append((f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base, top))
    return found


def _ours(name: str) -> bool:
    return name == "octomil_lite" or name.startswith("octomil_lite.")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_inside_the_package_are_relative_and_resolve(module: str) -> None:
    """A moved module then breaks here, not in a sandboxed child that reports it as a conversion failure."""
    tree = ast.parse(MODULES[module].read_text())
    absolute = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)
                and not getattr(n, "level", 0) and any(_ours(m) for m in _names(n))]
    assert not absolute, absolute
    missing = [name for name, _ in _imports(module) if _ours(name) and name not in MODULES]
    assert not missing, missing


def _names(node: ast.Import | ast.ImportFrom) -> list[str]:
    return [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_wing_imports_only_what_it_may(module: str) -> None:
    wrong = [name for name, _ in _imports(module) if _ours(name) and _wing(name) not in WINGS[_wing(module)]]
    assert not wrong, f"{module} ({_wing(module)}) may not import {wrong}"


def test_only_server_imports_litestar_and_only_the_sqlite_store_imports_sqlite() -> None:
    for module in MODULES:
        tops = {name.split(".")[0] for name, _ in _imports(module)}
        if not module.startswith("octomil_lite.server"):
            assert "litestar" not in tops, module
        if module != "octomil_lite.storage.sqlite":
            assert not tops & {"sqlite3", "aiosqlite"}, module


@pytest.mark.parametrize("module", [m for m in sorted(MODULES) if m.startswith("octomil_lite.convert")])
def test_convert_imports_only_the_standard_library_at_module_level(module: str) -> None:
    """The child and the server both import convert/; frameworks load only inside the function that needs them."""
    heavy = [name for name, top in _imports(module)
             if top and not _ours(name) and name.split(".")[0] not in sys.stdlib_module_names]
    assert not heavy, f"{module} imports {heavy} at module level"


@pytest.mark.parametrize("module", FRAMEWORK_MODULES)
def test_framework_modules_never_import_each_other(module: str) -> None:
    others = set(FRAMEWORK_MODULES) - {module}
    assert not {name for name, _ in _imports(module)} & others


def test_there_are_no_import_circles() -> None:
    """Over every runtime import, lazy ones too; a package's own lazy factory of its submodules is not a circle."""
    graph = {m: {n for n, _ in _imports(m) if n in MODULES and n != m and not n.startswith(m + ".")} for m in MODULES}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for nxt in sorted(graph[module]):
            assert state.get(nxt) != "open", " -> ".join([*path, module, nxt])
            if nxt not in state:
                visit(nxt, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_no_module_is_over_about_400_lines() -> None:
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 420}
    assert not long, long

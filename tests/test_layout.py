"""The package layout's rules (docs/LAYOUT.md), checked on the source without importing it.

Every module under src/tcssa is parsed with ``ast``. An import counts where it runs: at module
level (also inside ``try``, ``if`` or a class body) or inside a function (function-local). An
import under ``if TYPE_CHECKING:`` never runs, so it is no import. ``from tcssa.x import y``
imports the module ``tcssa.x.y`` when ``y`` is one, otherwise the module ``tcssa.x``; a
package's ``__init__`` is a module like any other, so its re-exports are edges of the graph.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "tcssa"
LAYOUT_DOC = ROOT / "docs" / "LAYOUT.md"
README = ROOT / "README.md"

#: What each part of tcssa may import from tcssa: part -> the parts (or single modules) it may use.
#: Names are relative to ``tcssa``; "train.metrics" means that module only, not the rest of train.
#: docs/LAYOUT.md shows this same table (test_layout_doc_shows_the_layer_table).
#: The root package ``tcssa`` may be imported by every part: it is loaded before any of its
#: submodules anyway, and loads nothing itself (test_import_tcssa_loads_no_torch_and_sets_nothing).
LAYERS: dict[str, tuple[str, ...]] = {
    "__init__": ("method",),
    "__main__": ("cli",),
    "runtime": (),
    "method": ("method", "runtime"),
    "io": ("io", "method", "runtime"),
    "data": ("data", "io", "method", "runtime"),
    "mil": ("mil", "method", "runtime"),
    "train": ("train", "data", "io", "mil", "method", "runtime"),
    "vlm": ("vlm", "data", "io", "method", "mil", "train", "runtime"),
    "viz": ("viz", "io", "train.metrics", "train.bootstrap", "runtime"),
    "wsi": ("wsi", "io", "method", "runtime"),
    "bench": ("bench", "data", "io", "method", "mil", "train", "vlm", "viz", "runtime"),
    "apps": ("apps", "bench", "data", "io", "method", "mil", "train", "vlm", "viz", "runtime"),
    "cli": ("cli", "apps", "bench", "data", "io", "method", "mil", "train", "vlm", "viz", "runtime"),
}

#: Third-party packages that only one part may import: file formats live in tcssa.io.
FORMAT_LIBRARIES = {"h5py": "io", "safetensors": "io"}

#: Beyond the layer table, the method opens no file: no pathlib, and none of these calls.
METHOD_FORBIDDEN_MODULES = ("h5py", "safetensors", "pathlib")
FILE_OPENING_METHODS = ("open", "read_text", "write_text", "read_bytes", "write_bytes")
FILE_OPENING_FUNCTIONS = ("open", "torch.load", "torch.save")


@dataclass(frozen=True)
class Import:
    importer: str  # the tcssa module that imports
    target: str  # the imported module, dotted (a tcssa module resolved as the module docstring says)
    line: int
    local: bool  # inside a function: runs when the function is called, not when the module loads

    def where(self) -> str:
        kind = "function-local " if self.local else ""
        return f"{self.importer} (line {self.line}) {kind}imports {self.target}"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _package_of(module: str) -> str:
    """The package a relative import in ``module`` starts from."""
    is_package = modules()[module].name == "__init__.py"
    return module if is_package else module.rpartition(".")[0]


def _from_base(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = _package_of(module)
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{node.module}" if node.module else base


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = _from_base(module, node)
    known = modules()
    targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    return list(dict.fromkeys(targets))  # `from m import a, b` of two names imports m once


def _walk(module: str, node: ast.AST, local: bool, found: list[Import]) -> None:
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        for statement in node.orelse:  # the body runs only for type checkers
            _walk(module, statement, local, found)
        return
    if isinstance(node, ast.Import | ast.ImportFrom):
        found.extend(Import(module, t, node.lineno, local) for t in _targets(module, node))
    inside = local or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    for child in ast.iter_child_nodes(node):
        _walk(module, child, inside, found)


@cache
def syntax_tree(module: str) -> ast.Module:
    path = modules()[module]
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@cache
def all_imports() -> tuple[Import, ...]:
    found: list[Import] = []
    for module in modules():
        _walk(module, syntax_tree(module), False, found)
    return tuple(found)


def tcssa_imports(*, local: bool | None = None) -> list[Import]:
    """Imports of tcssa modules; ``local`` picks module-level (False) or function-local (True) ones."""
    return [
        i
        for i in all_imports()
        if (i.target == "tcssa" or i.target.startswith("tcssa.")) and (local is None or i.local is local)
    ]


def part_of(module: str) -> str:
    """The LAYERS key a tcssa module belongs to ("data" for tcssa.data.cohort, "__init__" for tcssa)."""
    if module == "tcssa":
        return "__init__"
    return module.split(".")[1]


def allowed(part: str, target: str) -> bool:
    if target == "tcssa":
        return True
    relative = target.removeprefix("tcssa.")
    return any(relative == rule or relative.startswith(rule + ".") for rule in LAYERS[part])


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (first module repeated at the end) per strongly connected group of modules."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = lowlink[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                lowlink[node] = min(lowlink[node], lowlink[nxt])
            elif nxt in on_stack:
                lowlink[node] = min(lowlink[node], index[nxt])
        if lowlink[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1 or node in edges.get(node, ()):
                groups.append(group)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return [_cycle_within(group, edges) for group in groups]


def _cycle_within(group: set[str], edges: dict[str, set[str]]) -> list[str]:
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first, so the cycle shown is a shortest one through `start`
        following = []
        for node in frontier:
            for nxt in sorted(edges.get(node, set()) & group):
                if nxt == start:
                    return [*paths[node], start]
                if nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")


# ------------------------------------------------------------------ the parser itself


def test_every_module_parses_and_belongs_to_a_part():
    assert "tcssa.method.compressor" in modules() and "tcssa" in modules()
    unplaced = sorted(m for m in modules() if part_of(m) not in LAYERS)
    assert not unplaced, f"modules in no part of LAYERS (add the part here and to docs/LAYOUT.md): {unplaced}"


def test_import_resolution():
    source = (
        "from typing import TYPE_CHECKING\n"
        "import tcssa.io.bag\n"
        "from tcssa.method import routing, TCSSA\n"
        "from . import experts\n"
        "from ..io import features\n"
        "if TYPE_CHECKING:\n"
        "    from tcssa.data import cohort\n"
        "else:\n"
        "    import tcssa.runtime\n"
        "def f():\n"
        "    import h5py\n"
    )
    found: list[Import] = []
    _walk("tcssa.method.compressor", ast.parse(source), False, found)
    assert {(i.target, i.local) for i in found} == {
        ("typing", False),
        ("tcssa.io.bag", False),
        ("tcssa.method.routing", False),
        ("tcssa.method", False),  # TCSSA is a name, not a module: the package is what is imported
        ("tcssa.method.experts", False),
        ("tcssa.io.features", False),
        ("tcssa.runtime", False),
        ("h5py", True),
    }


def test_find_cycles_reports_the_modules():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


# ------------------------------------------------------------------ the rules


def test_no_import_cycle_among_tcssa_modules():
    edges: dict[str, set[str]] = {m: set() for m in modules()}
    for i in tcssa_imports(local=False):
        if i.target in edges:
            edges[i.importer].add(i.target)
    cycles = find_cycles(edges)
    assert not cycles, "module-level import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("local", [False, True], ids=["module-level", "function-local"])
def test_each_part_imports_only_what_the_layer_table_allows(local):
    unknown = sorted({i.where() for i in tcssa_imports(local=local) if i.target not in modules()})
    assert not unknown, "imports of tcssa modules that do not exist:\n" + "\n".join(unknown)
    broken = [
        f"{i.where()}: {part_of(i.importer)} may import {', '.join(LAYERS[part_of(i.importer)]) or 'nothing'}"
        for i in tcssa_imports(local=local)
        if not allowed(part_of(i.importer), i.target)
    ]
    assert not broken, "imports the layer table forbids:\n" + "\n".join(broken)


def test_file_format_libraries_are_imported_only_in_their_home():
    broken = [
        f"{i.where()}: only tcssa.{home} imports {library}"
        for i in all_imports()
        if (library := i.target.split(".")[0]) in FORMAT_LIBRARIES
        and part_of(i.importer) != (home := FORMAT_LIBRARIES[library])
    ]
    assert not broken, "\n".join(broken)


def _called_name(call: ast.Call) -> str:
    func = call.func
    names = []
    while isinstance(func, ast.Attribute):
        names.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        names.append(func.id)
    return ".".join(reversed(names))


def test_the_method_opens_no_file():
    method = [m for m in modules() if part_of(m) == "method"]
    assert method, "no tcssa.method modules found"
    broken = [
        i.where()
        for i in all_imports()
        if i.importer in method and i.target.split(".")[0] in METHOD_FORBIDDEN_MODULES
    ]
    for module in method:
        for node in ast.walk(syntax_tree(module)):
            if not isinstance(node, ast.Call):
                continue
            name = _called_name(node)
            is_method_call = isinstance(node.func, ast.Attribute) and node.func.attr in FILE_OPENING_METHODS
            if name in FILE_OPENING_FUNCTIONS or is_method_call:
                broken.append(f"{module} (line {node.lineno}) calls {name or node.func.attr}(...)")
    assert not broken, "tcssa.method reads and writes no file (tcssa.io does):\n" + "\n".join(broken)


def test_import_tcssa_loads_no_torch_and_sets_nothing():
    check = (
        "import os, sys; before = dict(os.environ); import tcssa; "
        "assert 'torch' not in sys.modules, 'import tcssa loaded torch'; "
        "assert dict(os.environ) == before, 'import tcssa changed the environment'"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # unset: setdefault would show
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(("before", "after"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_cli_main_sets_omp_wait_policy_only_when_unset(monkeypatch, capsys, before, after):
    from tcssa.cli import main

    monkeypatch.setenv("OMP_WAIT_POLICY", "recorded")  # so that monkeypatch restores the original
    if before is None:
        monkeypatch.delenv("OMP_WAIT_POLICY")
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", before)
    assert main([]) == 0  # no command: prints the help
    assert os.environ.get("OMP_WAIT_POLICY") == after
    assert "usage: tcssa" in capsys.readouterr().out


# ------------------------------------------------------------------ the docs


LAYER_TABLE = re.compile(r"<!-- layer-table:start -->\n(.*?)<!-- layer-table:end -->", re.S)


def table_rows(text: str) -> list[list[str]]:
    """The cells of a Markdown table's body rows (the header and the |---| line are left out)."""
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|")
    ]
    return [row for row in rows[2:] if row]


def part_path(part: str) -> str:
    """The README/LAYOUT path of a LAYERS part: a package folder or a top-level module file."""
    return f"src/tcssa/{part}.py" if (PACKAGE / f"{part}.py").is_file() else f"src/tcssa/{part}/"


def test_layout_doc_shows_the_layer_table():
    found = LAYER_TABLE.search(LAYOUT_DOC.read_text(encoding="utf-8"))
    assert found, "docs/LAYOUT.md has no <!-- layer-table:start --> ... :end --> block"
    shown = {}
    for path, _owns, may_import, *_ in table_rows(found.group(1)):
        shown[path.strip("`")] = tuple(re.findall(r"`([^`]+)`", may_import))
    expected = {part_path(part): rules for part, rules in LAYERS.items()}
    assert shown == expected, "docs/LAYOUT.md's layer table differs from LAYERS in tests/test_layout.py"


def top_level_entries() -> set[str]:
    """Every package and top-level module under src/tcssa, as README's Layout table names them."""
    packages = {f"src/tcssa/{p.parent.name}/" for p in PACKAGE.glob("*/__init__.py")}
    files = {f"src/tcssa/{p.name}" for p in PACKAGE.glob("*.py")}
    return packages | files


def test_readme_layout_table_lists_exactly_the_packages_and_top_level_modules():
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert section, 'README.md has no "## Layout" section'
    listed = [row[0].strip("`") for row in table_rows(section.group(1))]
    missing_paths = [path for path in listed if not (ROOT / path).exists()]
    assert not missing_paths, f"README.md's Layout table names paths that do not exist: {missing_paths}"
    assert len(listed) == len(set(listed)), f"README.md's Layout table repeats a row: {listed}"
    assert set(listed) == top_level_entries(), (
        f"README.md's Layout table: missing {sorted(top_level_entries() - set(listed))}, "
        f"not a package or top-level module {sorted(set(listed) - top_level_entries())}"
    )
    assert "docs/LAYOUT.md" in section.group(1), "README.md's Layout section should point to docs/LAYOUT.md"


@pytest.mark.parametrize("script", sorted((ROOT / "scripts").glob("*.py")), ids=lambda p: p.name)
def test_every_script_imports_and_shows_its_help(script):
    # The tuning scripts are run by hand, rarely: a module that moved must not break them unseen.
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]

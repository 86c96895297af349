"""docs/METHOD.md is the project's specification: it must exist, its defaults table must match
the code, and every section the code cites by name must be there."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import math
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "METHOD.md"
TABLE = re.compile(r"<!-- defaults-table:start -->\n(.*?)<!-- defaults-table:end -->", re.S)
ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*`([^`]+)`\s*\|")
CALL = re.compile(r"^([\w.]+)\((\w+)\)$")  # module.Callable(param): a signature default
PATH = re.compile(r"^([\w.]+)((?:\[[^\]]+\])*)$")  # dotted path, then optional ["key"] subscripts
CITATION = re.compile(r'METHOD\.md,\s*"([^"]+)"')


def method_text() -> str:
    assert METHOD.is_file(), "docs/METHOD.md is missing (README.md and docs/RESULTS.md cite it)"
    return METHOD.read_text(encoding="utf-8")


def defaults_table() -> list[tuple[str, str]]:
    found = TABLE.search(method_text())
    assert found, "docs/METHOD.md has no <!-- defaults-table:start --> ... :end --> block"
    rows = [ROW.match(line) for line in found.group(1).splitlines()]
    return [(m.group(1), m.group(2)) for m in rows if m]


def resolve_dotted(path: str) -> Any:
    """The object at ``a.b.C.d``: the longest importable module prefix, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and name in obj.__dataclass_fields__:
                obj = _field_default(obj, name)
            else:
                obj = getattr(obj, name)
        return obj
    raise ImportError(f"no module in {path!r}")


def _field_default(cls: type, name: str) -> Any:
    field = cls.__dataclass_fields__[name]
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise AssertionError(f"{cls.__qualname__}.{name} has no default")


def resolve(ref: str) -> Any:
    call = CALL.match(ref)
    if call:
        target, param = call.groups()
        default = inspect.signature(resolve_dotted(target)).parameters[param].default
        assert default is not inspect.Parameter.empty, f"{ref}: parameter has no default"
        return default
    path = PATH.match(ref)
    assert path, f"defaults table: cannot read reference {ref!r}"
    obj = resolve_dotted(path.group(1))
    for key in re.findall(r"\[([^\]]+)\]", path.group(2)):
        obj = obj[ast.literal_eval(key)]
    return obj


def same(stated: Any, actual: Any) -> bool:
    if isinstance(stated, bool) or isinstance(actual, bool):
        return stated is actual
    if isinstance(stated, int | float) and isinstance(actual, int | float):
        return math.isclose(stated, actual, rel_tol=1e-12, abs_tol=0.0)
    if isinstance(stated, dict) and isinstance(actual, dict):
        return stated.keys() == actual.keys() and all(same(stated[k], actual[k]) for k in stated)
    if isinstance(stated, list | tuple) and isinstance(actual, list | tuple):
        return len(stated) == len(actual) and all(same(a, b) for a, b in zip(stated, actual, strict=True))
    return stated == actual


def test_defaults_table_matches_the_code():
    rows = defaults_table()
    assert len(rows) >= 20, f"the defaults table shrank to {len(rows)} rows"
    wrong = []
    for ref, text in rows:
        stated, actual = ast.literal_eval(text), resolve(ref)
        if not same(stated, actual):
            wrong.append(f"{ref}: docs/METHOD.md says {text}, the code has {actual!r}")
    assert not wrong, "\n".join(wrong)


def test_defaults_table_covers_the_compressor_and_its_copies():
    """Every TCSSAConfig default is in the table, and the constructors that repeat them agree."""
    from tcssa import TCSSA, TCSSAConfig
    from tcssa.mil.tcssa_mil import TCSSAMIL

    listed = {ref for ref, _ in defaults_table()}
    config_defaults = {
        f.name: f.default for f in dataclasses.fields(TCSSAConfig) if f.default is not dataclasses.MISSING
    }
    missing = sorted(name for name in config_defaults if f"tcssa.TCSSAConfig.{name}" not in listed)
    assert not missing, f"TCSSAConfig defaults not stated in docs/METHOD.md: {missing}"
    assert dataclasses.asdict(TCSSA(8).config) == {"dim": 8, **config_defaults}
    for cls in (TCSSA, TCSSAMIL):
        params = inspect.signature(cls).parameters
        for name, value in config_defaults.items():
            assert params[name].default == value, f"{cls.__name__}({name}) default differs from TCSSAConfig"


def headings() -> list[str]:
    return [line.lstrip("#").strip().lower() for line in method_text().splitlines() if line.startswith("#")]


def cited_sections() -> list[tuple[str, str]]:
    cites = []
    for base in ("src", "tests", "docs", "README.md"):
        for path in [ROOT / base] if (ROOT / base).is_file() else sorted((ROOT / base).rglob("*")):
            if path.suffix in (".py", ".md") and path != METHOD and path.is_file():
                for name in CITATION.findall(path.read_text(encoding="utf-8")):
                    cites.append((str(path.relative_to(ROOT)), name))
    return cites


@pytest.mark.parametrize("required", ["where tcssa deviates and why", "known weak points", "uses"])
def test_page_has_its_sections(required):
    assert any(h.startswith(required) for h in headings()), f"docs/METHOD.md lacks a '{required}' section"


def test_sections_cited_by_name_exist():
    """A citation such as docs/METHOD.md, "Uses: MIL slide classification" names headings (":" nests)."""
    have = headings()
    missing = [
        f'{where}: "{name}"'
        for where, name in cited_sections()
        if not all(any(h.startswith(part.strip().lower()) for h in have) for part in name.split(":"))
    ]
    assert not missing, "sections cited but not in docs/METHOD.md:\n" + "\n".join(missing)

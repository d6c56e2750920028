"""The server package's import direction (docs/design.md, "The tree").

Each sub-package of ``tokensvc`` sits on a floor and imports only from lower floors (and from
itself); the client library is imported only through its public modules. The test reads the
source with :mod:`ast`, so an import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "tokensvc"

#: Floors, top to bottom: a module may import its own package and any package on a lower floor.
FLOORS: list[set[str]] = [
    {"__main__"},
    {"cli"},
    {"runtime"},
    {"api"},
    {"observe", "keys", "security", "http"},
    {"store", "config"},
    {"redis"},
    {"proc", "families", "handlers"},
    {"errors"},  # the root exception every floor may raise from
]
FLOOR = {name: depth for depth, names in enumerate(FLOORS) for name in names}


def _unit(path: Path) -> str:
    """The floor unit of a module: its sub-package, or its own name at the top level."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "tokensvc":
                found += [(node.lineno, f"tokensvc.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if _unit(p) != "__init__")


def test_every_module_is_on_a_floor() -> None:
    assert {_unit(p) for p in MODULES} <= set(FLOOR), "a new package needs a floor"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_downwards(path: Path) -> None:
    unit = _unit(path)
    wrong = []
    for line, module in _imports(path):
        parts = module.split(".")
        if parts[0] == "tokensvc" and len(parts) > 1:
            target = parts[1]
            if target != unit and FLOOR.get(target, -1) <= FLOOR[unit]:
                wrong.append(f"line {line}: {module} (floor of {target} is not below {unit})")
        if parts[0] == "tokensvc_client" and any(p.startswith("_") for p in parts[1:]):
            wrong.append(f"line {line}: {module} is private to the client library")
    assert not wrong, "\n".join(wrong)


def test_a_forbidden_import_is_seen(tmp_path: Path) -> None:
    """The walk finds imports inside functions, and of the ``from tokensvc import x`` form."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from tokensvc import cli\n    import tokensvc_client._auth\n")
    assert _imports(source) == [(2, "tokensvc.cli"), (3, "tokensvc_client._auth")]

"""The arrows point one way: the packages never import the `custody` command above them, and only it imports proxy.

`custody/` is the roof (it reads the config file and wires the commands);
`ingest` is the floor; `ledger` and `query` stand on it; nothing but the roof
stands on `proxy`. Checked on the source with `ast`, so an import inside a
function or behind `if TYPE_CHECKING` counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ingest", "ledger", "proxy", "query")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file; relative imports stay inside their package."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def violations(packages: tuple[str, ...], forbidden: str) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line}: imports {module}"
            for package in packages
            for path in sorted((ROOT / package).rglob("*.py"))
            for line, module in imported_modules(path)
            if module == forbidden or module.startswith(f"{forbidden}.")]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_imports_custody(package):
    assert violations((package,), "custody") == []


@pytest.mark.parametrize("package", ("ingest", "ledger", "query"))
def test_only_the_roof_imports_proxy(package):
    assert violations((package,), "proxy") == []

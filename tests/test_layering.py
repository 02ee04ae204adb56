"""
Dependencies run one way: faces (http, wire server) -> broker -> stores and
oauth. The sandbox side (inner) uses the wire clients and the store
interfaces, never the broker; stores and oauth know nothing above them.
Read from the source, so an import added anywhere in a module counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "credproxy"

# package -> the credproxy packages it must never import
FORBIDDEN = {
    "stores": ("broker", "http", "wire", "inner", "oauth", "service", "tap"),
    "oauth": ("broker", "http", "wire", "inner", "service", "tap"),
    "broker": ("http", "wire", "inner", "service", "tap"),
    "inner": ("broker", "http", "service", "tap", "oauth"),
    "http": ("wire", "inner", "service", "tap"),
}


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_nothing_above_it(package: str) -> None:
    offences = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for module in imported_modules(path):
            parts = module.split(".")
            if parts[0] == "credproxy" and len(parts) > 1 and parts[1] in FORBIDDEN[package]:
                offences.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    assert offences == []


def test_the_check_sees_an_offence(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from credproxy.broker import Broker\n")
    assert "credproxy.broker" in imported_modules(module)

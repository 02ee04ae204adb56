"""
Dependencies run one way: faces (http, wire server) -> broker -> stores and
oauth. The sandbox side (inner) uses the wire clients and the store
interfaces, never the broker; stores and oauth know nothing above them.
Read from the source, so an import added anywhere in a module counts.
"""

from __future__ import annotations

import ast
import subprocess
import sys
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


# What runs inside the sandbox of credproxy run --sandbox: it must not carry
# the host's side in with it (the broker, the stores, the service, the run).
SANDBOX_SIDE = (
    "_sandbox_init.py",
    "_relay.py",
    "_sandbox_control.py",
    "_command.py",
    "_transports.py",
)
SANDBOX_SIDE_FORBIDDEN = (
    "broker",
    "stores",
    "oauth",
    "service",
    "tap",
    "cli",
    "wire",
    "inner",
    "_run",
    "_lifecycle",
    "_sandbox",
    "_bwrap",
    "_process",
)


@pytest.mark.parametrize("module", SANDBOX_SIDE)
def test_the_sandbox_side_imports_nothing_of_the_hosts(module: str) -> None:
    offences = [
        name
        for name in imported_modules(PACKAGE / module)
        if name.split(".")[0] == "credproxy"
        and len(name.split(".")) > 1
        and name.split(".")[1] in SANDBOX_SIDE_FORBIDDEN
    ]
    assert offences == []


def test_the_redis_package_is_loaded_only_with_a_redis_store() -> None:
    """
    Every command and the twistd plugin import credproxy whole; a host
    without a Redis store must not pay for (or depend on) the redis package.
    """
    probe = (
        "import sys, credproxy, credproxy.cli, credproxy.tap, credproxy.service, "
        "credproxy.stores, credproxy.broker; print('redis' in sys.modules)"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert loaded.stdout.strip() == "False"

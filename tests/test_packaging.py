"""
What the wheel ships: our plugin file, never Twisted's package markers or a
stale plugin cache; and a plugin file that cannot break twistd at import.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "twisted" / "plugins" / "credproxy_plugin.py"


@pytest.mark.slow
def test_wheel_contents(tmp_path: Path) -> None:
    cache = PLUGIN.parent / "dropin.cache"
    created = not cache.exists()
    if created:
        cache.write_bytes(b"stale")
    try:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "-q",
                "-w",
                str(tmp_path),
                str(ROOT),
            ],
            check=True,
            capture_output=True,
        )
    finally:
        if created:
            cache.unlink()
    (wheel,) = tmp_path.glob("credproxy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/credproxy_plugin.py" in names
    assert "credproxy/tap.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert not any(name.endswith("dropin.cache") for name in names)
    assert not any(name.startswith(("tests/", "bench/")) for name in names)


def test_no_package_markers_in_the_source_tree() -> None:
    assert not (ROOT / "twisted" / "__init__.py").exists()
    assert not (ROOT / "twisted" / "plugins" / "__init__.py").exists()


def test_plugin_imports_nothing_of_ours() -> None:
    tree = ast.parse(PLUGIN.read_text())
    imported = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    ]
    assert imported
    assert all(name and not name.startswith("credproxy") for name in imported)


def test_twistd_lists_the_plugin() -> None:
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    result = subprocess.run([twistd, "--help"], capture_output=True, text=True, check=True)
    assert "credproxy" in result.stdout

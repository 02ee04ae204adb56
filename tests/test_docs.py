"""
The documentation: the Sphinx site in docs/ builds with no warning at all
(warnings are errors), its generated references cover what the code
offers (every public package's __all__, every credproxy command), and no
page points outside the repository. The epytext conversion its extension
applies to every docstring is tested here too.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import re
import secrets
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import credproxy

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXTENSION = DOCS / "_ext" / "credproxy_sphinx"


def public_packages() -> list[str]:
    found = ["credproxy"]
    for module in pkgutil.iter_modules(credproxy.__path__):
        if module.ispkg and not module.name.startswith("_"):
            found.append(f"credproxy.{module.name}")
    return found


def page_sources() -> list[Path]:
    """
    Everything the site is made from: its pages, its configuration and its
    extension (the unit files it includes are data, checked by their own tests).
    """
    return sorted(
        path
        for path in DOCS.rglob("*")
        if path.is_file()
        and path.suffix in (".md", ".rst", ".py", ".txt")
        and "_build" not in path.relative_to(DOCS).parts
    )


# -- the build ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("site")
    canary = secrets.token_hex(16)
    env = {**os.environ, "CREDPROXY_DOCS_CANARY": canary}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "docs",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    return out, canary


@pytest.mark.slow
def test_the_site_builds_with_no_warning(built_site: tuple[Path, str]) -> None:
    out, _ = built_site
    for page in ("index", "quickstart", "threat-model", "configuration", "systemd", "api/index"):
        assert (out / f"{page}.html").is_file(), page


@pytest.mark.slow
def test_the_build_environment_never_reaches_the_site(built_site: tuple[Path, str]) -> None:
    # A default like environ=os.environ must show as written, not as the
    # builder's environment (which may hold anything); and no page names
    # the directory the site was built in.
    out, canary = built_site
    published = [
        path
        for path in out.rglob("*")
        if path.is_file() and ".doctrees" not in path.relative_to(out).parts
    ]
    leaked = [
        f"{path.relative_to(out)}: {what}"
        for path in published
        for what in (canary, str(ROOT))
        if what in path.read_text(errors="replace")
    ]
    assert leaked == []


@pytest.mark.slow
def test_every_public_name_is_documented(built_site: tuple[Path, str]) -> None:
    out, _ = built_site
    for package in public_packages():
        module = importlib.import_module(package)
        page = out / "api" / f"{package.rpartition('.')[2]}.html"
        assert page.is_file(), f"{package} has no API page"
        text = page.read_text()
        # Each name is documented there (its anchor is its full name) or
        # listed there as an alias of where it is documented.
        missing = [name for name in module.__all__ if f"{package}.{name}" not in text]
        assert missing == [], f"{package}: {missing}"


@pytest.mark.slow
def test_the_configuration_reference_is_generated(built_site: tuple[Path, str]) -> None:
    out, _ = built_site
    text = (out / "configuration.html").read_text()
    from credproxy.tap import Options

    for name in Options().longOpt:
        assert f"--{name.rstrip('=')}" in text, name


# -- coverage of the generated references (no build needed) -------------------------


def test_every_public_package_has_an_api_page() -> None:
    directives = {
        match
        for page in (DOCS / "api").glob("*.md")
        for match in re.findall(r"^\.\. credproxy-api:: (\S+)$", page.read_text(), re.M)
    }
    assert directives == set(public_packages())


def test_every_credproxy_command_has_a_reference_section() -> None:
    cli = importlib.import_module("credproxy.cli")
    text = (DOCS / "configuration.md").read_text()
    programs = set(re.findall(r"^\s*:program: credproxy (\S+)$", text, re.M))
    assert programs == set(cli.COMMANDS)


# -- nothing outside the repository ---------------------------------------------------

_LINK = re.compile(r"\]\(([^)\s]+)\)")
_INCLUDE = re.compile(r"^(?:```\{|\.\. )(?:literalinclude|include)\}?:*\s+(\S+)", re.M)


def test_no_page_points_outside_the_repository() -> None:
    problems: list[str] = []
    for path in page_sources():
        text = path.read_text()
        where = path.relative_to(ROOT)
        for forbidden in ("../shared", "/work/", "file://"):
            if forbidden in text:
                problems.append(f"{where}: mentions {forbidden!r}")
        if path.suffix not in (".md", ".rst"):
            continue
        targets = [*_LINK.findall(text), *_INCLUDE.findall(text)]
        for target in targets:
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL (https:, mailto:) or an anchor on this page
            file_part = target.split("#", 1)[0]
            if not file_part:
                continue
            if file_part.startswith("/"):
                problems.append(f"{where}: absolute path {target!r}")
                continue
            resolved = (path.parent / file_part).resolve()
            if not resolved.is_relative_to(ROOT):
                problems.append(f"{where}: {target!r} is outside the repository")
            elif not resolved.exists():
                problems.append(f"{where}: {target!r} does not exist")
    assert problems == []


# -- the epytext conversion -----------------------------------------------------------


def _epytext() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "credproxy_docs_epytext", EXTENSION / "epytext.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


epytext = _epytext()


def convert(text: str) -> str:
    result: str = epytext.convert_text(text)
    return result.strip()


def test_inline_markup_becomes_rest() -> None:
    assert convert("Use C{twistd -n}.") == "Use ``twistd -n``\\ ."
    assert convert("See L{Broker}.") == "See :py:obj:`Broker`\\ ."
    assert convert("See L{the broker <Broker>}.") == "See :py:obj:`the broker <Broker>`\\ ."
    assert convert("I{owner} and B{never}") == "*owner* and **never**"
    assert convert("L{None} or C{x}") == "``None`` or ``x``"


def test_markup_next_to_a_word_stays_markup() -> None:
    assert convert("the C{Token}s") == "the ``Token``\\ s"
    assert convert("(C{a})") == "(\\ ``a``\\ )"


def test_nested_braces_and_escapes() -> None:
    assert convert("C{{x: 1}} and E{lb}") == "``{x: 1}`` and {"
    assert convert("C{f(L{g})}") == "``f(g)``"


def test_prose_is_escaped() -> None:
    assert convert("a *b* `c` name_ x|y") == "a \\*b\\* \\`c\\` name\\_ x\\|y"
    assert convert("snake_case stays") == "snake_case stays"


def test_fields_become_field_lists() -> None:
    text = """
    Do it.

    @param reactor: the reactor (default
        the global one).
    @raise ValueError: when C{x} is bad.
    @return: nothing.
    @ivar code: the C{code}.
    """
    assert convert(text).split("\n") == [
        "Do it.",
        "",
        ":param reactor: the reactor (default",
        "   the global one).",
        ":raises ValueError: when ``x`` is bad.",
        ":returns: nothing.",
        ":ivar code: the ``code``\\ .",
    ]


def test_literal_and_doctest_blocks_are_kept() -> None:
    text = """
    For example::

        x = C{not markup} * 2

    >>> f(*args)
    1
    """
    assert convert(text).split("\n") == [
        "For example::",
        "",
        "    x = C{not markup} * 2",
        "",
        ">>> f(*args)",
        "1",
    ]


def test_a_line_that_reads_as_a_rest_directive_is_escaped() -> None:
    assert convert("..note: plain") == "\\..note: plain"

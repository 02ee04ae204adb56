"""
The C{credproxy-api} directive: one public package's API, from its
C{__all__} and nothing else, so the reference shows exactly what the
package promises and follows it when a name is added or removed.

Classes, exceptions and functions go to autodoc. zope.interface interfaces
(which autodoc takes for plain data) and constants (whose comments autodoc
cannot see, since they sit in a private module) are rendered here. A name
that a deeper public package also exports (C{credproxy.Broker} is
C{credproxy.broker.Broker}) is documented there once and listed here as an
alias.
"""

from __future__ import annotations

import ast
import enum
import importlib
import inspect
import types
from collections.abc import Iterator
from typing import Any, ClassVar

from docutils import nodes
from docutils.parsers.rst.states import RSTState
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from zope.interface.interface import Attribute, InterfaceClass, Method

from credproxy_sphinx import epytext

_GROUPS = (
    ("classes", "Classes"),
    ("interfaces", "Interfaces"),
    ("functions", "Functions"),
    ("exceptions", "Exceptions"),
    ("data", "Constants and type aliases"),
)
_SIMPLE = (str, bytes, int, float, bool, type(None))


def _kind(obj: object) -> str:
    if isinstance(obj, InterfaceClass):
        return "interfaces"
    if isinstance(obj, type):
        return "exceptions" if issubclass(obj, BaseException) else "classes"
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return "functions"
    return "data"


def _indented(lines: list[str], by: str = "   ") -> list[str]:
    return [by + line if line.strip() else "" for line in lines]


def _doc(text: str | None) -> list[str]:
    if not text or not text.strip():
        return []
    return epytext.convert(inspect.cleandoc(text).split("\n"))


def _value_text(value: object) -> str | None:
    """
    A constant's value as it would be written in Python, or None when it is
    not a short literal (the type is shown instead).
    """
    if isinstance(value, _SIMPLE) or (
        isinstance(value, tuple | list) and all(isinstance(v, _SIMPLE) for v in value)
    ):
        text = repr(value)
    elif isinstance(value, frozenset | set) and all(isinstance(v, _SIMPLE) for v in value):
        # Sorted: a set's own order changes from run to run with hashing.
        inner = ", ".join(sorted(repr(v) for v in value))
        text = f"{type(value).__name__}({{{inner}}})"
    elif isinstance(value, types.UnionType):
        text = " | ".join(getattr(arg, "__name__", repr(arg)) for arg in value.__args__)
    else:
        return None
    return text if len(text) <= 120 else None


def _imported_from(package: types.ModuleType) -> dict[str, str]:
    """
    Which module each name of the package's C{__init__} was imported from.
    """
    source = inspect.getsource(package)
    found: dict[str, str] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                found[alias.asname or alias.name] = node.module
    return found


def _comment_above(module_name: str, name: str) -> str | None:
    """
    The comment lines right above C{name = ...} at the top of the module
    (or a C{#:} comment, or a string right after it), as text.
    """
    module = importlib.import_module(module_name)
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return None
    lines = source.splitlines()
    tree = ast.parse(source)
    for position, node in enumerate(tree.body):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        if not any(isinstance(t, ast.Name) and t.id == name for t in targets):
            continue
        following = tree.body[position + 1] if position + 1 < len(tree.body) else None
        if (
            isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            return following.value.value
        comment: list[str] = []
        index = node.lineno - 2
        while index >= 0 and lines[index].lstrip().startswith("#"):
            comment.insert(0, lines[index].lstrip().lstrip("#:").strip())
            index -= 1
        return "\n".join(comment) if comment else None
    return None


class PackageDirective(SphinxDirective):
    """
    C{credproxy-api PACKAGE}: the package's docstring, then every name of
    its C{__all__}, grouped by kind, in C{__all__}'s order.
    """

    required_arguments = 1
    has_content = False
    option_spec: ClassVar[dict[str, Any]] = {}

    def run(self) -> list[nodes.Node]:
        if not isinstance(self.state, RSTState):
            # What it generates is reST: in a MyST page, put it in eval-rst.
            raise self.error("credproxy-api must be used in reST (in MyST: inside {eval-rst})")
        name = self.arguments[0]
        package = importlib.import_module(name)
        exported = list(getattr(package, "__all__", []))
        if not exported:
            raise self.error(f"{name} has no __all__ to document")
        lines = [f".. py:module:: {name}", "", *_doc(package.__doc__)]
        groups: dict[str, list[str]] = {key: [] for key, _ in _GROUPS}
        aliases: list[tuple[str, str]] = []
        for member in exported:
            obj = getattr(package, member)
            owner = self._deeper_owner(name, member, obj)
            if owner is not None:
                aliases.append((member, f"{owner}.{member}"))
            else:
                groups[_kind(obj)].append(member)
        for key, title in _GROUPS:
            if not groups[key]:
                continue
            lines += [f".. rubric:: {title}", ""]
            for member in groups[key]:
                lines += list(self._entry(package, key, member))
        if aliases:
            lines += [
                ".. rubric:: Also exported here",
                "",
                "These names are documented in the package that defines them:",
                "",
            ]
            for member, target in aliases:
                lines.append(f"- ``{name}.{member}``: :py:obj:`{target}`")
            lines.append("")
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source=self._source()), 0, container)
        return list(container.children)

    def _source(self) -> str:
        return f"{self.env.doc2path(self.env.docname)} (credproxy-api {self.arguments[0]})"

    def _deeper_owner(self, name: str, member: str, obj: object) -> str | None:
        """
        The deepest public package below C{name} that exports the same
        object under the same name, if any.
        """
        packages: list[str] = list(self.config.credproxy_api_packages)
        for other in sorted(packages, key=len, reverse=True):
            if not other.startswith(name + "."):
                continue
            module = importlib.import_module(other)
            if member in getattr(module, "__all__", ()) and getattr(module, member) is obj:
                return other
        return None

    def _entry(self, package: types.ModuleType, key: str, member: str) -> Iterator[str]:
        full = f"{package.__name__}.{member}"
        obj = getattr(package, member)
        if key == "interfaces":
            yield from self._interface(member, obj)
        elif key == "data":
            yield from self._data(package, member, obj)
        elif key == "functions":
            yield from (f".. autofunction:: {full}", "")
        else:
            directive = "autoexception" if key == "exceptions" else "autoclass"
            yield f".. {directive}:: {full}"
            yield "   :members:"
            if isinstance(obj, type) and any(
                base is not object and not base.__name__.startswith("_") for base in obj.__bases__
            ):
                yield "   :show-inheritance:"
            if isinstance(obj, type) and issubclass(obj, enum.Enum):
                yield "   :undoc-members:"
            yield ""

    def _interface(self, member: str, iface: InterfaceClass) -> Iterator[str]:
        yield f".. py:class:: {member}"
        yield ""
        bases = [b for b in iface.__bases__ if b.__name__ != "Interface"]
        intro = "A zope.interface interface"
        if bases:
            named = ", ".join(f":py:class:`~{b.__module__}.{b.__name__}`" for b in bases)
            intro += f" extending {named}"
        yield f"   {intro}."
        yield ""
        yield from _indented(_doc(iface.__doc__))
        for attribute, description in iface.namesAndDescriptions(all=False):
            if isinstance(description, Method):
                signature = description.getSignatureString()
                yield f"   .. py:method:: {attribute}{signature}"
            elif isinstance(description, Attribute):
                yield f"   .. py:attribute:: {attribute}"
            else:
                continue
            yield ""
            yield from _indented(_doc(description.getDoc()), "      ")

    def _data(self, package: types.ModuleType, member: str, value: object) -> Iterator[str]:
        yield f".. py:data:: {member}"
        text = _value_text(value)
        if text is not None:
            yield f"   :value: {text}"
        else:
            cls = type(value)
            yield f"   :type: ~{cls.__module__}.{cls.__qualname__}"
        yield ""
        origin = _imported_from(package).get(member, package.__name__)
        comment = _comment_above(origin, member)
        if comment:
            yield from _indented(epytext.convert(comment.split("\n")))


def setup_config(app: Any) -> None:
    app.add_config_value("credproxy_api_packages", [], "env")

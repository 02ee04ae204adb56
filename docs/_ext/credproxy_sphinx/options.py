"""
The C{credproxy-options} directive: a command's options, read from its
C{twisted.python.usage.Options} subclass, so the reference is the code.

It instantiates the class and reads what Twisted itself gathered from it
and its bases: C{optFlags}, C{optParameters} (with their defaults and
coercers' C{coerceDoc}) and every C{opt_*} method (its docstring is its
help). Each option becomes a Sphinx C{option} under C{program}, so pages
link to one with C{:option:}. Metavariables (C{--store KIND}) are taken
from the C{[--name METAVAR]} spellings in the class's and its bases'
docstrings, else C{VALUE}.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any, ClassVar

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.parsers.rst.states import RSTState
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from twisted.python import usage

from credproxy_sphinx import epytext

_LAST = ("help", "version")


def _load(path: str) -> type[usage.Options]:
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"{path!r} is not a dotted path to a class")
    cls = getattr(importlib.import_module(module_name), name)
    if not (isinstance(cls, type) and issubclass(cls, usage.Options)):
        raise ValueError(f"{path} is not a twisted.python.usage.Options subclass")
    return cls


def _metavars(cls: type) -> dict[str, str]:
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        for text in (klass.__dict__.get("__doc__"), klass.__dict__.get("synopsis")):
            if isinstance(text, str):
                for name, metavar in re.findall(r"--([a-z][a-z0-9-]*)[ =]([A-Z][A-Z0-9_]*)", text):
                    found[name] = metavar
    return found


def _default_text(value: object) -> str | None:
    if value is None or value == [] or value == ():
        return None
    return f"``{value}``"


def _one_paragraph(text: str) -> list[str]:
    return epytext.convert(inspect.cleandoc(text).split("\n"))


class OptionsDirective(SphinxDirective):
    """
    C{credproxy-options DOTTED.PATH.TO.Options} with C{:program: NAME}.
    """

    required_arguments = 1
    has_content = False
    option_spec: ClassVar[dict[str, Any]] = {"program": directives.unchanged_required}

    def run(self) -> list[nodes.Node]:
        if not isinstance(self.state, RSTState):
            # What it generates is reST: in a MyST page, put it in eval-rst.
            raise self.error("credproxy-options must be used in reST (in MyST: inside {eval-rst})")
        path = self.arguments[0]
        program = self.options.get("program")
        if not program:
            raise self.error("credproxy-options needs :program:")
        try:
            cls = _load(path)
        except (ImportError, AttributeError, ValueError) as e:
            raise self.error(f"cannot document {path}: {e}") from None
        lines = self._render(cls(), cls, program)
        container = nodes.container()
        source = f"{self.env.doc2path(self.env.docname)} (credproxy-options {path})"
        self.state.nested_parse(StringList(lines, source=source), 0, container)
        return list(container.children)

    def _render(self, opts: usage.Options, cls: type[usage.Options], program: str) -> list[str]:
        synopsis = str(getattr(cls, "synopsis", "") or "[options]").strip()
        synopsis = synopsis.removeprefix("Usage:").strip()
        if not synopsis.startswith(program):
            synopsis = f"{program} {synopsis}"
        lines = [f".. program:: {program}", "", f"Usage: ``{synopsis}``", ""]
        description = getattr(cls, "longdesc", None) or cls.__doc__ or ""
        if description.strip():
            lines += _one_paragraph(description)
        takes_value = {name.rstrip("="): name.endswith("=") for name in opts.longOpt}
        short = {s: long for s, long in opts.synonyms.items() if len(s) == 1 and s != long}
        shorts_of: dict[str, list[str]] = {}
        for s, long in short.items():
            shorts_of.setdefault(long, []).append(s)
        metavars = _metavars(cls)
        names = sorted(
            takes_value, key=lambda n: (n in _LAST, _LAST.index(n) if n in _LAST else 0, n)
        )
        for name in names:
            metavar = f" {metavars.get(name, 'VALUE')}" if takes_value[name] else ""
            spellings = [f"-{s}{metavar}" for s in sorted(shorts_of.get(name, []))]
            spellings.append(f"--{name}{metavar}")
            lines += [f".. option:: {', '.join(spellings)}", ""]
            doc = opts.docs.get(name)
            body = _one_paragraph(doc) if doc else ["(undocumented)", ""]
            dispatch = opts._dispatch.get(name)
            coerce_doc = getattr(dispatch, "doc", "")
            if coerce_doc:
                body += _one_paragraph(coerce_doc)
            default = _default_text(opts.defaults.get(name)) if takes_value[name] else None
            if default is not None:
                body += [f"Default: {default}.", ""]
            lines += ["   " + line if line.strip() else "" for line in body]
        return lines

"""
credproxy's Sphinx extension.

- Docstrings are epytext (Twisted's markup); L{epytext.convert} turns each
  into reST as autodoc reads it.
- C{credproxy-api} documents a public package from its C{__all__}, zope
  interfaces and constants included (L{api}).
- C{credproxy-options} renders a C{twisted.python.usage.Options} subclass
  as a command's option reference, straight from the class (L{options}).
- Cross-references that name an object by a private path or a short name
  are resolved to where the object is documented (L{xref}).
"""

from __future__ import annotations

import re
from typing import Any

from sphinx.application import Sphinx
from zope.interface import implementedBy

from credproxy_sphinx import api, epytext, options, xref


def _process_docstring(
    app: Sphinx, what: str, name: str, obj: object, opts: Any, lines: list[str]
) -> None:
    converted = epytext.convert(lines)
    if what in ("class", "exception") and isinstance(obj, type):
        provided = [
            f":py:class:`~{iface.__module__}.{iface.__name__}`"
            for iface in implementedBy(obj)
            # credproxy's own contracts; Twisted's (IService ...) are noise.
            if iface.__module__.startswith("credproxy.") and not iface.__name__.startswith("_")
        ]
        if provided:
            converted = [f"Provides {', '.join(provided)}.", "", *converted]
    lines[:] = converted


# zope interfaces in annotations stringify as their repr; name them instead,
# so the signature parses and links.
_INTERFACE_REPR = re.compile(r"<InterfaceClass ([\w.]+)>")


def _process_signature(
    app: Sphinx,
    what: str,
    name: str,
    obj: object,
    opts: Any,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str | None, str | None]:
    def named(text: str | None) -> str | None:
        if not text:
            return text
        # A dataclass field's default_factory shows as <factory>, which is
        # not Python: the signature would not parse (nor link) at all.
        return _INTERFACE_REPR.sub(r"~\1", text).replace("<factory>", "...")

    if what == "class" and getattr(obj, "_is_protocol", False):
        # A typing.Protocol is never instantiated: its (*args, **kwargs) says nothing.
        return "", return_annotation
    return named(signature), named(return_annotation)


def setup(app: Sphinx) -> dict[str, Any]:
    app.setup_extension("sphinx.ext.autodoc")
    app.connect("autodoc-process-docstring", _process_docstring)
    app.connect("autodoc-process-signature", _process_signature)
    app.connect("missing-reference", xref.resolve)
    api.setup_config(app)
    app.add_directive("credproxy-api", api.PackageDirective)
    app.add_directive("credproxy-options", options.OptionsDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}

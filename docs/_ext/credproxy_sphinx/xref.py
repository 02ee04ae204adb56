"""
Cross-references the Python domain could not resolve, resolved to the
object's public documentation when there is exactly one sensible target.

Two kinds reach here. Type annotations name an object where it is defined
(C{credproxy.stores._token.Token}), which is private; its public name drops
the private parts (C{credproxy.stores.Token}). And epytext's L{Name} names
an object as its module sees it, often from another package; it is found
by its last components, preferring the object nearest the reference.
Anything else (Twisted's classes, builtins) stays plain text, as before.
"""

from __future__ import annotations

from typing import Any

from docutils import nodes
from sphinx.util.nodes import make_refnode


def _common_prefix(a: str, b: str) -> int:
    count = 0
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y:
            break
        count += 1
    return count


def find(target: str, names: set[str], context: str | None) -> str | None:
    """
    The documented name C{target} means, or None.
    """
    target = target.lstrip("~.")
    if not target:
        return None
    public = ".".join(part for part in target.split(".") if not part.startswith("_"))
    if public in names:
        return public
    parts = target.split(".")
    for size in range(len(parts), 0, -1):
        suffix = ".".join(parts[-size:])
        if suffix.startswith("_"):
            continue
        found = [name for name in names if name == suffix or name.endswith("." + suffix)]
        if found:
            here = context or parts[0]
            found.sort(key=lambda name: (-_common_prefix(name, here), -len(name), name))
            return found[0]
    return None


def resolve(app: Any, env: Any, node: Any, contnode: nodes.Element) -> nodes.Element | None:
    if node.get("refdomain") != "py":
        return None
    objects = env.get_domain("py").objects
    context = ".".join(filter(None, (node.get("py:module"), node.get("py:class"))))
    name = find(node["reftarget"], set(objects), context or None)
    if name is None:
        return None
    entry = objects[name]
    result: nodes.Element = make_refnode(
        app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, name
    )
    return result

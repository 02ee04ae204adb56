"""
Epytext docstrings as reStructuredText, for autodoc.

credproxy's docstrings use the epytext subset Twisted uses: C{code},
L{link} and L{text <target>}, I{italic}, B{bold}, U{url}, E{lb}/E{rb}
escapes, and the fields @param, @type, @return, @rtype, @raise, @ivar,
@cvar, @var, @note, @see, @since. This module turns such a docstring
into reST that Sphinx renders: inline literals, Python cross-references,
and the field lists the Python domain knows. Everything outside the
markup is escaped, so a C{*} or C{_} in prose stays prose.

Pure functions on strings: no Sphinx import, so the tests exercise them
directly.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterable

# Field tags and how each is written in reST. A tag that takes an argument
# (@param NAME:) keeps it; the others take none (@return:).
_FIELD_NAMES = {
    "param": "param",
    "parameter": "param",
    "arg": "param",
    "keyword": "keyword",
    "kwarg": "keyword",
    "type": "type",
    "return": "returns",
    "returns": "returns",
    "rtype": "rtype",
    "returntype": "rtype",
    "raise": "raises",
    "raises": "raises",
    "except": "raises",
    "exception": "raises",
    "ivar": "ivar",
    "cvar": "cvar",
    "var": "var",
    "since": "since",
    "deprecated": "deprecated",
    "author": "author",
    "todo": "todo",
}
# Tags that become admonitions rather than fields.
_ADMONITIONS = {"note": "note", "see": "seealso", "seealso": "seealso", "warning": "warning"}

_FIELD_RE = re.compile(r"^@(?P<tag>[A-Za-z]+)(?:[ \t]+(?P<arg>[\w.*]+))?[ \t]*:(?P<text>.*)$")
_MARKUP_LETTERS = frozenset("BCEGILMSUX")
_ESCAPES = {"lb": "{", "rb": "}", "lt": "<", "gt": ">"}
_LITERAL_NAMES = frozenset({"None", "True", "False"})


def _is_field(line: str) -> bool:
    match = _FIELD_RE.match(line)
    return match is not None and (
        match["tag"].lower() in _FIELD_NAMES or match["tag"].lower() in _ADMONITIONS
    )


# -- inline markup ------------------------------------------------------------------


def _closing_brace(text: str, start: int) -> int:
    """
    The index of the C{}} that closes the C{{} at C{start}, or -1.
    """
    depth = 0
    for index in range(start, len(text)):
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index
    return -1


def _escape(text: str) -> str:
    """
    Plain text as reST that shows exactly that text.
    """
    out: list[str] = []
    for index, char in enumerate(text):
        following = text[index + 1] if index + 1 < len(text) else ""
        if char in "\\*`|":
            out.append("\\" + char)
        elif char == "_" and not (following.isalnum() or following == "_"):
            # name_ and name__ are references in reST; snake_case is not.
            out.append("\\_")
        else:
            out.append(char)
    return "".join(out)


def plain_text(text: str) -> str:
    """
    The text a reader sees of some epytext: the markup's content, without
    the markup (L{text <target>} shows C{text}).
    """
    out: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if (
            char in _MARKUP_LETTERS
            and index + 1 < len(text)
            and text[index + 1] == "{"
            and (end := _closing_brace(text, index + 1)) != -1
        ):
            inner = text[index + 2 : end]
            if char == "E":
                out.append(_ESCAPES.get(inner, inner))
            elif char in "LU":
                shown, _ = _split_target(inner)
                out.append(plain_text(shown))
            elif char != "G":
                out.append(plain_text(inner))
            index = end + 1
        else:
            out.append(char)
            index += 1
    return "".join(out)


def _split_target(inner: str) -> tuple[str, str]:
    """
    C{text <target>} as (text, target); C{target} alone as (target, target).
    """
    match = re.fullmatch(r"(?s)(.*?)\s*<([^<>]+)>\s*", inner)
    if match and match[1].strip():
        return match[1].strip(), match[2].strip()
    return inner.strip(), inner.strip()


def _literal(content: str) -> str:
    content = " ".join(content.split()) if "\n" in content else content.strip()
    if not content:
        return ""
    if "``" in content or content.startswith("`") or content.endswith("`"):
        return ":literal:`" + content.replace("\\", "\\\\").replace("`", "\\`") + "`"
    return f"``{content}``"


def _role_text(text: str) -> str:
    return " ".join(text.split()).replace("\\", "\\\\").replace("`", "\\`")


def _render(letter: str, inner: str) -> str:
    """
    One piece of inline markup as reST (without the separating escapes).
    """
    if letter == "C":
        return _literal(plain_text(inner))
    if letter == "L":
        shown, target = _split_target(inner)
        shown, target = plain_text(shown), plain_text(target).strip()
        if target in _LITERAL_NAMES:
            return _literal(shown)
        if not target:
            return ""
        if shown == target:
            return f":py:obj:`{_role_text(target)}`"
        return f":py:obj:`{_role_text(shown)} <{_role_text(target)}>`"
    if letter == "U":
        shown, target = _split_target(inner)
        shown, target = plain_text(shown), plain_text(target)
        if shown == target:
            return f"`{_role_text(target)} <{_role_text(target)}>`__"
        return f"`{_role_text(shown)} <{_role_text(target)}>`__"
    if letter == "G":
        return ""
    text = " ".join(plain_text(inner).split())
    if not text:
        return ""
    if letter in "IM":
        return f"*{_escape(text)}*"
    if letter == "B":
        return f"**{_escape(text)}**"
    return _escape(text)  # X (index term), S (symbol): the text itself


def inline(text: str) -> str:
    """
    A run of epytext prose (one or more lines) as reST.
    """
    out: list[str] = []
    plain_start = 0
    index = 0

    def flush(upto: int) -> None:
        out.append(_escape(text[plain_start:upto]))

    while index < len(text):
        char = text[index]
        if (
            char in _MARKUP_LETTERS
            and index + 1 < len(text)
            and text[index + 1] == "{"
            and (end := _closing_brace(text, index + 1)) != -1
        ):
            flush(index)
            inner = text[index + 2 : end]
            if char == "E":
                out.append(_escape(_ESCAPES.get(inner, inner)))
            else:
                rendered = _render(char, inner)
                if rendered and rendered != _escape(plain_text(inner)):
                    # Inline markup must stand apart from the words around
                    # it; an escaped space does that and shows nothing.
                    before = next((piece[-1] for piece in reversed(out) if piece), "")
                    if before and not before.isspace():
                        out.append("\\ ")
                    out.append(rendered)
                    after = text[end + 1 : end + 2]
                    if after and not after.isspace():
                        out.append("\\ ")
                else:
                    out.append(rendered)
            index = end + 1
            plain_start = index
        else:
            index += 1
    flush(len(text))
    return "".join(out)


# -- blocks -----------------------------------------------------------------------------


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def _blocks(lines: list[str]) -> list[str]:
    """
    Body lines as reST: prose through L{inline}, literal blocks (after a
    paragraph ending in C{::}) and doctest blocks kept as they are.
    """
    out: list[str] = []
    prose: list[str] = []

    def flush_prose() -> None:
        if prose:
            converted = inline("\n".join(prose)).split("\n")
            for line in converted:
                # A line starting ".." would be a reST comment or directive.
                out.append("\\" + line if line.lstrip().startswith("..") else line)
            prose.clear()

    index = 0
    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        if stripped.startswith(">>>"):
            flush_prose()
            while index < len(lines) and lines[index].strip():
                out.append(lines[index])
                index += 1
            continue
        prose.append(line)
        index += 1
        if stripped.endswith("::"):
            flush_prose()
            base = _indent_of(line)
            while index < len(lines) and (
                not lines[index].strip() or _indent_of(lines[index]) > base
            ):
                out.append(lines[index])
                index += 1
    flush_prose()
    return out


def _field_body(first: str, rest: list[str]) -> list[str]:
    body = [first.strip(), *textwrap.dedent("\n".join(rest)).split("\n")] if rest else [first]
    while body and not body[-1].strip():
        body.pop()
    return _blocks(body)


def _render_field(tag: str, arg: str | None, first: str, rest: list[str]) -> list[str]:
    body = _field_body(first, rest)
    key = tag.lower()
    if key in _ADMONITIONS:
        lines = [f".. {_ADMONITIONS[key]}::", ""]
        lines.extend(f"   {line}" if line.strip() else "" for line in body)
        return [*lines, ""]
    name = _FIELD_NAMES[key]
    head = f":{name} {arg}:" if arg else f":{name}:"
    if body and body[0].strip():
        lines = [f"{head} {body[0].strip()}"]
        continuation = body[1:]
    else:
        lines = [head]
        continuation = body[1:] if body else []
    lines.extend(f"   {line}" if line.strip() else "" for line in continuation)
    return lines


def convert(lines: Iterable[str]) -> list[str]:
    """
    An epytext docstring (dedented, as autodoc hands it over) as reST lines.
    """
    lines = [line.rstrip() for line in lines]
    first_field = next(
        (i for i, line in enumerate(lines) if _indent_of(line) == 0 and _is_field(line)),
        len(lines),
    )
    body = lines[:first_field]
    while body and not body[-1].strip():
        body.pop()
    out = _blocks(body)

    fields: list[tuple[str, str | None, str, list[str]]] = []
    for line in lines[first_field:]:
        match = _FIELD_RE.match(line) if _indent_of(line) == 0 else None
        if match and _is_field(line):
            fields.append((match["tag"], match["arg"], match["text"], []))
        elif fields:
            fields[-1][3].append(line)
    if fields:
        if out:
            out.append("")
        admonitions: list[str] = []
        for tag, arg, first, rest in fields:
            rendered = _render_field(tag, arg, first, rest)
            if tag.lower() in _ADMONITIONS:
                admonitions.extend(["", *rendered])
            else:
                out.extend(rendered)
        out.extend(admonitions)
    out.append("")
    return out


def convert_text(text: str) -> str:
    """
    L{convert} for a docstring as it is written (the first line may follow
    the quotes, the rest indented).
    """
    import inspect

    return "\n".join(convert(inspect.cleandoc(text).split("\n")))

"""
Sphinx configuration for credproxy's documentation.

Build it (warnings are errors, as in the tests):

    .venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The extension in docs/_ext, and the source tree for autodoc (an editable
# install puts it on the path too; a plain checkout needs this).
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent))

from credproxy.tap import credproxy_version  # noqa: E402

project = "credproxy"
author = "the credproxy authors"
copyright = "the credproxy authors"
release = credproxy_version()
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "credproxy_sphinx",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "systemd", "README.md"]

# The pages are MyST markdown; headings get anchors so pages can link to
# sections (broker.md#refresh) as they do when read on a forge.
myst_heading_anchors = 4

# Text as written: "--store" must not become an en dash and a word.
smartquotes = False

# Indented blocks in the pages are shell commands and log lines, not Python.
highlight_language = "none"
pygments_style = "sphinx"

# The API: the public packages' __all__ (credproxy-api), docstrings in
# epytext (converted by credproxy_sphinx.epytext).
credproxy_api_packages = [
    "credproxy",
    "credproxy.broker",
    "credproxy.stores",
    "credproxy.oauth",
    "credproxy.wire",
    "credproxy.http",
    "credproxy.inner",
    "credproxy.testing",
]
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autoclass_content = "class"
autodoc_inherit_docstrings = False
# Defaults as written (os.environ), never as evaluated at build time.
autodoc_preserve_defaults = True
add_module_names = False

html_theme = "alabaster"
html_title = f"credproxy {release}"
html_theme_options = {
    "description": "A credential broker for AI-agent sandboxes",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "240px",
    "show_relbars": True,
}
html_sidebars = {"**": ["about.html", "navigation.html", "relations.html", "searchbox.html"]}
html_static_path: list[str] = []
html_copy_source = False
html_show_sourcelink = False

"""MkDocs hook: render the Sphinx-style roles of dspark's docstrings as API cross-references.

The package docstrings use ``:class:`~dspark.engine.GenerationStats``` and friends, which
mkdocstrings would print literally as ``:class:`` followed by code. After a page is converted,
each such role becomes an optional autorefs link (plain code where the target is not documented);
a leading ``~`` shows only the last component of the dotted name, as in Sphinx.
"""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):<code>(~?)([\w.]+)</code>")


def _link(match: re.Match) -> str:
    short, identifier = match.group(1), match.group(2)
    title = identifier.rsplit(".", 1)[-1] if short else identifier
    return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'


def on_page_content(html: str, **kwargs) -> str:
    """Replace roles in the page's HTML (autorefs resolves the links once every page is built)."""
    return ROLE.sub(_link, html)

"""MkDocs hook: render the Sphinx roles used in gradfn's docstrings (``:func:`x```, ``:class:`~x```).

mkdocstrings renders a docstring's ``:func:`gradfn.conflict.interference``` as the literal text
``:func:`` followed by inline code. This hook drops the role prefix and turns fully qualified
names into optional cross-references (resolved by mkdocs-autorefs when the object is documented,
plain code otherwise). ``~`` keeps only the last component of the name, as in Sphinx.
"""

from __future__ import annotations

import html
import re

_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc):<code>(~?)([^<]+)</code>")


def _replace(match: re.Match[str]) -> str:
    tilde, target = match.group(1), html.unescape(match.group(2)).strip()
    shown = target.rsplit(".", 1)[-1] if tilde else target
    code = f"<code>{html.escape(shown)}</code>"
    if not target.startswith("gradfn."):
        return code
    return f'<autoref identifier="{html.escape(target)}" optional>{code}</autoref>'


def on_page_content(html_text: str, **kwargs: object) -> str:
    return _ROLE.sub(_replace, html_text)

"""MkDocs hook: embed a benchmark result file (``benchmarks/results/*.md``) into a page.

A line ``<!-- include-results: benchmarks/results/songoku.md -->`` (path relative to the
repository root) is replaced by that file's Markdown, with its top-level title turned into a bold
line and its other headings moved down so that its first sub-level becomes ``###``: the file's
sections nest under the page's own ``##`` section. A missing file is an error: the build fails rather than showing a silent gap.
"""

from __future__ import annotations

import re
from pathlib import Path

_DIRECTIVE = re.compile(r"^<!--\s*include-results:\s*(\S+)\s*-->\s*$", re.MULTILINE)
_HEADING = re.compile(r"^(#{1,5})\s+(.*)$")


def _levels(text: str) -> list[int]:
    levels, in_fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        m = None if in_fence else _HEADING.match(line)
        if m is not None:
            levels.append(len(m.group(1)))
    return levels


def _embed(text: str) -> str:
    sub = [lv for lv in _levels(text) if lv > 1]
    shift = 3 - min(sub) if sub else 0  # the file's first sub-level becomes ### under the page's ##
    out = []
    in_fence = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        m = None if in_fence else _HEADING.match(line)
        if m is None:
            out.append(line)
        elif len(m.group(1)) == 1:
            out.append(f"**{m.group(2).strip()}**")
        else:
            out.append(f"{'#' * min(6, len(m.group(1)) + shift)} {m.group(2)}")
    return "\n".join(out)


def on_page_markdown(markdown: str, *, config, **kwargs: object) -> str:
    root = Path(config["config_file_path"]).resolve().parent

    def replace(match: re.Match[str]) -> str:
        path = (root / match.group(1)).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"include-results: {match.group(1)} does not exist")
        # a blank line after the file, so that a table at its end never swallows the next heading
        return _embed(path.read_text(encoding="utf-8")).rstrip("\n") + "\n\n"

    return _DIRECTIVE.sub(replace, markdown)

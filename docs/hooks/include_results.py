"""MkDocs hook: embed Markdown files from outside ``docs/`` into a page.

Two directives, each on a line of its own (paths relative to the repository root):

* ``<!-- include-results: benchmarks/results/songoku.md -->`` is replaced by a benchmark result
  file's Markdown, with its top-level title turned into a bold line and its other headings moved
  down so that its first sub-level becomes ``###``: the file's sections nest under the page's own
  ``##`` section.
* ``<!-- include-markdown: CONTRIBUTING.md -->`` is replaced by a root document (the
  contributing guide, the changelog) as it is, without its top-level title (the page has its
  own). Its relative links are rewritten for the page: ``docs/x.md`` becomes the page-relative
  path of ``x.md``, and links to the root documents shown as pages (``README.md``,
  ``CONTRIBUTING.md``, ``CHANGELOG.md``) point at those pages.

A missing file is an error: the build fails rather than showing a silent gap.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_DIRECTIVE = re.compile(r"^<!--\s*include-(results|markdown):\s*(\S+)\s*-->\s*$", re.MULTILINE)
_HEADING = re.compile(r"^(#{1,5})\s+(.*)$")
_LINK = re.compile(r"(\]\()([^)\s#]+)(#[^)\s]*)?(\))")
# root documents that the site shows as pages
_ROOT_PAGES = {
    "README.md": "index.md",
    "CONTRIBUTING.md": "contributing.md",
    "CHANGELOG.md": "changelog.md",
}


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


def _document(text: str, source: Path, root: Path, docs: Path, page_dir: Path) -> str:
    """``text`` without its first top-level title, relative links rewritten for the page."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# "):
            del lines[i]
            break
        if line.strip():
            break

    def link(m: re.Match[str]) -> str:
        target = m.group(2)
        if "://" in target or target.startswith(("/", "mailto:")):
            return m.group(0)
        path = (source.parent / target).resolve()
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else None
        if rel in _ROOT_PAGES:
            path = docs / _ROOT_PAGES[rel]
        if path.is_relative_to(docs):
            target = Path(os.path.relpath(path, page_dir)).as_posix()
        return f"{m.group(1)}{target}{m.group(3) or ''}{m.group(4)}"

    out, in_fence = [], False
    for line in lines:
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        out.append(line if in_fence else _LINK.sub(link, line))
    return "\n".join(out).strip("\n")


def on_page_markdown(markdown: str, *, page, config, **kwargs: object) -> str:
    root = Path(config["config_file_path"]).resolve().parent
    docs = Path(config["docs_dir"]).resolve()
    page_dir = (docs / page.file.src_uri).parent

    def replace(match: re.Match[str]) -> str:
        kind, name = match.group(1), match.group(2)
        path = (root / name).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"include-{kind}: {name} does not exist")
        text = path.read_text(encoding="utf-8")
        body = _embed(text) if kind == "results" else _document(text, path, root, docs, page_dir)
        # a blank line after the file, so that a table at its end never swallows the next heading
        return body.rstrip("\n") + "\n\n"

    return _DIRECTIVE.sub(replace, markdown)

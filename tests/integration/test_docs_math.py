"""The guides write their equations as mathematics (``pymdownx.arithmatex`` + MathJax), not as
inline code: the extension and MathJax are configured, the key formulas of the SON-GOKU, GCond
and aggregator pages are LaTeX inside ``$…$`` / ``$$…$$``, and no inline code span of a guide
holds a formula (a Greek letter or a mathematical operator). The markdown sources are checked,
which is fast and needs no docs toolchain."""

import re

import pytest

from tests._utils import ROOT

DOCS = ROOT / "docs"
# generated from a benchmark run (benchmarks/quality/report.py), not written by hand
GENERATED = {"results.md"}
MATH_CHARS = "←‖Σρτβαλ∇⟨⟩≤≥√ᵀδεφθπμ∈∝"

KEY_FORMULAS = {
    "songoku.md": [
        r"e_k \leftarrow \beta\, e_k + (1 - \beta)\, g_k",  # EMA update
        r"\rho_{ij} = -\frac{\langle e_i, e_j \rangle}",  # interference ρ = −cos
        r"\rho_{ij} > \tau(t)",  # conflict graph
        r"\sum_{k \in S_t} g_k",  # the group's update (Eq. 6)
        r"\tau_0 \, (\tau^* / \tau_0)^{p}",  # the log schedule
    ],
    "gcond.md": [
        r"A_k = \lambda_k \, \frac{1}{D} \sum_{b \in B_k}",  # accumulation
        r"c_{ij} = \frac{\langle g_i, g_j \rangle}",  # cosine
        r"\alpha(c) =",  # smooth angle rule
        r"s_w = \sin \alpha",  # strengths
        r"g_w \leftarrow g_w - s_w",  # projection
        r"\text{strength}_k = \frac",  # arbitration
        r"U = \hat M = \frac{M}{1 - \beta^{t}}",  # bias-corrected momentum
        r"\operatorname{sign}(\hat M)",  # Lion with trust ratio
    ],
    "aggregators.md": [
        r"G = J J^\top",
        r"d = J^\top w = \sum_{k=1}^{K} w_k\, g_k",
        r"w = \arg\min_{w \in \Delta_K} w^\top G w",  # MGDA
        r"v^{(i)} = \arg\min_{v \ge u_i e_i} v^\top \hat G v",  # UPGrad
    ],
}


def _prose(text: str) -> str:
    """The page without its fenced code blocks."""
    out, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence:
            out.append(line)
    return "\n".join(out)


def _math(text: str) -> str:
    """Everything inside ``$$…$$`` and ``$…$``."""
    display = re.findall(r"\$\$(.+?)\$\$", text, flags=re.S)
    rest = re.sub(r"\$\$.+?\$\$", "", text, flags=re.S)
    return "\n".join(display + re.findall(r"\$([^$\n]+)\$", rest))


def _guides() -> list:
    return sorted(p.name for p in DOCS.glob("*.md") if p.name not in GENERATED)


def test_arithmatex_and_mathjax_are_configured():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert re.search(r"- pymdownx\.arithmatex:\n\s+generic: true", config)
    js = re.search(r"extra_javascript:\n((?:\s+- .+\n)+)", config)
    assert js, "mkdocs.yml has no extra_javascript"
    scripts = js.group(1)
    assert "javascripts/mathjax.js" in scripts and re.search(r"https://\S+/mathjax@3/", scripts)
    setup = (DOCS / "javascripts" / "mathjax.js").read_text(encoding="utf-8")
    assert 'processHtmlClass: "arithmatex"' in setup and "typesetPromise" in setup


@pytest.mark.parametrize("page", sorted(KEY_FORMULAS))
def test_key_formulas_are_latex(page):
    math = _math(_prose((DOCS / page).read_text(encoding="utf-8")))
    missing = [f for f in KEY_FORMULAS[page] if f not in math]
    assert not missing, f"docs/{page}: not written as LaTeX maths: {missing}"


@pytest.mark.parametrize("page", _guides())
def test_no_formula_is_left_as_inline_code(page):
    prose = _prose((DOCS / page).read_text(encoding="utf-8"))
    spans = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", prose)
    bad = [s for s in spans if any(c in MATH_CHARS for c in s)]
    assert not bad, f"docs/{page}: formulas as inline code (write them as $…$): {bad}"


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_no_control_characters(page):
    # a LaTeX command written into an unescaped Python string ("\tilde", "\rvert", "\frac")
    # leaves a tab, carriage return or form feed in the page and breaks the formula
    with open(DOCS / page, encoding="utf-8", newline="") as f:  # keeps a "\r" visible
        text = f.read()
    bad = sorted({repr(c) for c in text if ord(c) < 32 and c != "\n"})
    assert not bad, f"{page}: control characters {bad}"

"""The "which method when" page names every method gradfn ships, so it cannot fall behind."""

from pathlib import Path

import gradfn.aggregators as A

PAGE = Path(__file__).resolve().parents[2] / "docs" / "which-method.md"

NAMES = {  # registry name -> how the page writes it
    "mean": '"mean"',
    "sum": '"sum"',
    "mgda": "MGDA",
    "upgrad": "UPGrad",
    "dualproj": "DualProj",
    "cagrad": "CAGrad",
    "imtl_g": "IMTL-G",
    "aligned_mtl": "Aligned-MTL",
    "config": "ConFIG",
    "gcond": "GCond's resolution",
    "pcgrad": "PCGrad",
    "graddrop": "GradDrop",
    "gradvac": "GradVac",
    "nash_mtl": "Nash-MTL",
    "inverse_norm": "inverse-norm weighting",
    "fairgrad": "FairGrad",
}


def test_every_aggregator_and_both_algorithms_are_on_the_page():
    text = PAGE.read_text(encoding="utf-8")
    assert set(NAMES) == set(A.METHODS), "a new aggregator needs a row on docs/which-method.md"
    missing = [name for name, shown in NAMES.items() if shown not in text]
    assert not missing, missing
    for algorithm in ("SON-GOKU", "GradientConductor", 'ema_mode="refresh"', 'ema_mode="active"'):
        assert algorithm in text

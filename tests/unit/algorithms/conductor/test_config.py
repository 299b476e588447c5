"""ConductorConfig: every field validated at construction (the error names the argument), the
reference implementation's argument names mapped by ``from_reference``, and the builder's own
arguments (``compile``, ``reduce``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradfn.adapters import GradientConductor
from gradfn.algorithms import ConductorConfig, conductor, reference_options

BASE = {"lambdas": (1.0, 0.5), "accumulation_steps": 2}


def _two_losses(p, b):
    return [p["w"].sum() ** 2, (p["w"] - 1).pow(2).sum()]


BAD = [
    ("lambdas", [], ValueError, "lambdas"),
    ("lambdas", "ab", TypeError, "lambdas"),
    ("lambdas", [1.0, float("nan")], ValueError, "lambdas"),
    ("lambdas", [1.0, True], ValueError, "lambdas"),
    ("lambdas", torch.ones(2, 1), ValueError, "lambdas"),
    ("accumulation_steps", 0, ValueError, "accumulation_steps"),
    ("accumulation_steps", 2.0, ValueError, "accumulation_steps"),
    ("accumulation_steps", 3, ValueError, "accumulation_steps"),  # stochastic: N % K != 0
    ("thresholds", (0.0, -0.5, -0.8), ValueError, "thresholds"),
    ("thresholds", (-0.8, 0.0), ValueError, "thresholds"),
    ("thresholds", (-1.5, -0.5, 0.0), ValueError, "thresholds"),
    ("rule", "pcgrad", ValueError, "rule"),
    ("max_iters", -1, ValueError, "max_iters"),
    ("max_iters", 1.5, ValueError, "max_iters"),
    ("remap_power", 0.0, ValueError, "remap_power"),
    ("remap_power", float("inf"), ValueError, "remap_power"),
    ("norm_cap", 0.0, ValueError, "norm_cap"),
    ("norm_cap", -1.0, ValueError, "norm_cap"),
    ("norm_ema_beta", 1.0, ValueError, "norm_ema_beta"),
    ("norm_ema_beta", -0.1, ValueError, "norm_ema_beta"),
    ("momentum_beta", 1.0, ValueError, "momentum_beta"),
    ("momentum_beta", "0.9", ValueError, "momentum_beta"),
    ("trust_ratio_coef", 0.0, ValueError, "trust_ratio_coef"),
    ("trust_ratio_clip", -1.0, ValueError, "trust_ratio_clip"),
    ("dominance_window", -1, ValueError, "dominance_window"),
    ("dominance_window", 2.5, ValueError, "dominance_window"),
    ("dominance", "never", ValueError, "dominance"),
    ("tie_breaking_weights", (1.0, -0.5), ValueError, "tie_breaking_weights"),
    ("tie_breaking_weights", (0.0, 0.0), ValueError, "tie_breaking_weights"),
    ("tie_breaking_weights", (1.0, 1.0, 1.0), ValueError, "tie_breaking_weights"),
    ("eps", 0.0, ValueError, "eps"),
    ("accumulation_dtype", torch.float16, ValueError, "accumulation_dtype"),
    ("stability_source", "both", ValueError, "stability_source"),
    ("min_cosine", "false", ValueError, "min_cosine"),
    ("norm_floor", -1.0, ValueError, "norm_floor"),
    ("norm_floor", float("nan"), ValueError, "norm_floor"),
    ("norm_floor", "x", ValueError, "norm_floor"),
    ("strategy", "vamp", ValueError, "strategy"),
    ("resolution", "vector", ValueError, "resolution"),
]


@pytest.mark.parametrize(("field", "value", "error", "name"), BAD)
def test_each_bad_value_raises_naming_the_argument(field, value, error, name):
    with pytest.raises(error, match=name):
        ConductorConfig(**{**BASE, field: value})
    # the functional builder passes its options through the same checks
    with pytest.raises(error, match=name):
        conductor(_two_losses, **{**BASE, field: value})


def test_valid_values_are_normalised():
    cfg = ConductorConfig(
        lambdas=torch.tensor([2.0, 1.0]),
        accumulation_steps=3,
        stochastic=0,
        thresholds=[-0.9, -0.5, 0],
        tie_breaking_weights=[1, 0],
        use_lion=1,
    )
    assert cfg.lambdas == (2.0, 1.0) and cfg.num_tasks == 2
    assert cfg.stochastic is False and cfg.use_lion is True
    assert cfg.thresholds == (-0.9, -0.5, 0.0)
    assert cfg.tie_breaking_weights == (1.0, 0.0)
    assert cfg.max_iters is None and cfg.rule == "smooth"


def test_from_reference_maps_the_reference_names():
    default = ConductorConfig.from_reference([1.0, 1.0], 4)
    assert default == ConductorConfig(lambdas=(1.0, 1.0), accumulation_steps=4)
    # projection_max_iters=0 means 2K in the reference: None here
    assert ConductorConfig.from_reference([1.0, 1.0], 4, projection_max_iters=0).max_iters is None
    assert ConductorConfig.from_reference([1.0, 1.0], 4, projection_max_iters=5).max_iters == 5
    assert ConductorConfig.from_reference([1.0, 1.0], 4, use_smooth_logic=False).rule == "zones"
    assert ConductorConfig.from_reference([1.0, 1.0], 4, use_smooth_logic=True).rule == "smooth"
    mapped = ConductorConfig.from_reference(
        [1.0, 2.0],
        3,
        conflict_thresholds=(-0.9, -0.4, 0.1),
        stochastic_accumulation=False,
        norm_cap=2.0,
        momentum_beta=None,  # None keeps the default
    )
    assert mapped.thresholds == (-0.9, -0.4, 0.1) and mapped.stochastic is False
    assert mapped.norm_cap == 2.0 and mapped.momentum_beta == 0.85
    # reference=True: the reference's defects (reference_options), which explicit options override
    ref = ConductorConfig.from_reference([1.0, 1.0], 4, reference=True)
    for name, value in reference_options().items():
        assert getattr(ref, name) == value, name
    assert ref.norm_floor == pytest.approx(math.sqrt(1e-8))
    eps = ConductorConfig.from_reference([1.0, 1.0], 4, reference=True, eps=1e-6)
    assert eps.eps == 1e-6 and eps.norm_floor == pytest.approx(1e-3)
    override = ConductorConfig.from_reference(
        [1.0, 1.0], 4, reference=True, accumulation_dtype=torch.float32, arbitrate_weak=None
    )
    assert override.accumulation_dtype == torch.float32 and override.arbitrate_weak is True
    with pytest.raises(TypeError, match="projection_max_itres"):
        ConductorConfig.from_reference([1.0, 1.0], 4, projection_max_itres=3)


def test_resolution_auto_takes_vector_passes_for_bfloat16_only():
    def mode(**options):
        return ConductorConfig(**BASE, **options).resolves_vectors

    assert mode() is False and mode(accumulation_dtype=torch.float64) is False
    assert mode(accumulation_dtype=torch.bfloat16) is True
    assert ConductorConfig.from_reference([1.0, 1.0], 4, reference=True).resolves_vectors
    assert mode(accumulation_dtype=torch.bfloat16, resolution="gramian") is False
    assert mode(resolution="vectors") is True


def test_conductor_takes_a_config_or_options_not_both():
    cfg = ConductorConfig(**BASE)
    assert conductor(_two_losses, config=cfg).config is cfg
    with pytest.raises(TypeError, match="config"):
        conductor(_two_losses, [1.0, 1.0], config=cfg)
    with pytest.raises(TypeError, match="config"):
        conductor(_two_losses, config=cfg, momentum_beta=0.5)
    with pytest.raises(TypeError, match="config"):
        conductor(_two_losses, config=dict(BASE))
    with pytest.raises(TypeError, match="lambdas"):
        conductor(_two_losses, accumulation_steps=2)
    with pytest.raises(TypeError, match="momentum_betta"):
        conductor(_two_losses, [1.0, 1.0], accumulation_steps=2, momentum_betta=0.5)
    with pytest.raises(TypeError, match="reduce"):
        conductor(_two_losses, [1.0, 1.0], accumulation_steps=2, reduce=3)


@pytest.mark.parametrize("compile_arg", [3, 1.0, ["inductor"]])
def test_conductor_rejects_a_non_bool_non_str_compile(compile_arg):
    with pytest.raises(TypeError, match="compile"):
        conductor(_two_losses, [1.0, 1.0], accumulation_steps=2, compile=compile_arg)
    losses = {"a": lambda out, y: out.sum(), "b": lambda out, y: out.mean()}
    with pytest.raises(TypeError, match="compile"):
        GradientConductor(
            nn.Linear(3, 2),
            losses,
            {"a": 1.0, "b": 0.5},
            3,
            stochastic_accumulation=False,
            compile=compile_arg,
        )


@pytest.mark.parametrize("floor", [-1.0, float("nan"), "x"])
def test_conductor_rejects_a_bad_norm_floor(floor):
    with pytest.raises((ValueError, TypeError), match="norm_floor"):
        conductor(_two_losses, [1.0, 1.0], accumulation_steps=2, norm_floor=floor)

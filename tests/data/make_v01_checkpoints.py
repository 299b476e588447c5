"""Write the gradfn 0.1 adapter checkpoints that ``tests/unit/adapters/test_checkpoints.py`` loads
into the gradfn 0.2 adapters.

Run it from the repository root with a gradfn 0.1.0 checkout first on the import path::

    PYTHONPATH=/path/to/gradfn-0.1.0 python tests/data/make_v01_checkpoints.py

It refuses to run under any other gradfn version. For each configuration it builds a tiny model
(``tests._utils.models.TrunkHeads``), trains a few steps with the 0.1 adapter and saves, with
``torch.save``, ``v01_<adapter>_<config>.pt`` next to this file::

    {"gradfn": "0.1.0", "steps": n, "model_init": model state before training,
     "model": model state after n steps, "optimizer": optimizer state, "adapter": state_dict()}

Everything a test needs to rebuild the same run with gradfn 0.2 (the configurations, the model,
the task losses, the data of every step) is defined here at module level, without importing
gradfn, so the test imports this module too. The files are plain tensors and containers:
``torch.load(weights_only=True)`` reads them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after PYTHONPATH: the 0.1 checkout's gradfn wins

from tests._utils.models import TrunkHeads  # noqa: E402

# ---------------------------------------------------------------------------------------------
# SON-GOKU: three scalar tasks on one trunk, task "c" opposes "a"

SONGOKU_STEPS = 5  # saved after step 5 (R = 3: one refresh done, inside the second window)
SONGOKU_MORE = 4  # steps the test runs after loading (refreshes after steps 6 and 9)
SONGOKU_CONFIGS: dict[str, dict[str, Any]] = {
    "vanilla": {},
    "pcgrad": {"base_method": "pcgrad"},
    "adatask": {"base_method": "adatask"},
}
SONGOKU_COMMON: dict[str, Any] = {"refresh_period": 3, "ema_mode": "active", "ema_beta": 0.8}
TAU_TARGET = -0.2  # TauSchedule("constant", tau_target=-0.2): a real split after the refresh


def songoku_model() -> TrunkHeads:
    return TrunkHeads(6, 8, 3, seed=0)


def songoku_task(k: int, sign: float):
    def loss(model, batch):
        x, y = batch
        return ((model(x, k) - sign * y) ** 2).mean()

    return loss


SONGOKU_TASKS = [("a", 0, 1.0), ("b", 1, 0.5), ("c", 2, -1.0)]


def songoku_batch(step: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 6, generator=g)
    y = x.sum(dim=1)
    return {name: (x, y) for name, _, _ in SONGOKU_TASKS}


def songoku_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=0.05)


# ---------------------------------------------------------------------------------------------
# GradientConductor: three losses on a two-output model

CONDUCTOR_STEPS = 3  # cycles before saving
CONDUCTOR_MORE = 3  # cycles the test runs after loading
CONDUCTOR_CONFIGS: dict[str, dict[str, Any]] = {
    "classic": {"stochastic_accumulation": False},
    "classic_lion": {"stochastic_accumulation": False, "use_lion": True},
    "stochastic": {"stochastic_accumulation": True},
    "stochastic_lion": {"stochastic_accumulation": True, "use_lion": True},
}
ACCUMULATION_STEPS = 6
CONDUCTOR_LAMBDAS = {"fit": 1.0, "anti": 0.7, "mix": 0.5}


def conductor_losses() -> dict[str, Any]:
    return {
        "fit": lambda out, y: ((out[:, 0] - y) ** 2).mean(),
        "anti": lambda out, y: ((out[:, 1] + y) ** 2).mean(),
        "mix": lambda out, y: ((out.sum(dim=1) - 0.3 * y) ** 2).mean(),
    }


def conductor_model() -> TrunkHeads:
    return TrunkHeads(5, 6, 1, out=2, seed=0)


def conductor_provider(cycle: int):
    g = torch.Generator().manual_seed(2000 + cycle)

    def provider() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(4, 5, generator=g)
        return x, x[:, 0] - x[:, 1]

    return provider


def conductor_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=0.05, betas=(0.0, 0.99))


def path(adapter: str, config: str) -> Path:
    return HERE / f"v01_{adapter}_{config}.pt"


# ---------------------------------------------------------------------------------------------
# training with whichever gradfn is importable (0.1 to write the files; the test uses 0.2)


def build_songoku(gradfn: Any, config: str) -> tuple[Any, Any, Any]:
    model = songoku_model()
    opt = songoku_optimizer(model)
    tasks = [gradfn.TaskSpec(n, songoku_task(k, s)) for n, k, s in SONGOKU_TASKS]
    tau = gradfn.TauSchedule("constant", tau_target=TAU_TARGET)
    kw = {**SONGOKU_COMMON, **SONGOKU_CONFIGS[config]}
    return model, opt, gradfn.SonGokuScheduler(model, tasks, opt, tau_schedule=tau, **kw)


def build_conductor(gradfn: Any, config: str) -> tuple[Any, Any, Any]:
    model = conductor_model()
    opt = conductor_optimizer(model)
    gc = gradfn.GradientConductor(
        model,
        conductor_losses(),
        CONDUCTOR_LAMBDAS,
        ACCUMULATION_STEPS,
        **CONDUCTOR_CONFIGS[config],
    )
    return model, opt, gc


def conductor_cycle(model: Any, opt: Any, gc: Any, cycle: int) -> dict[str, Any]:
    opt.zero_grad()
    stats = gc.step(conductor_provider(cycle))
    opt.step()
    return stats


def _write(target: Path, steps: int, init: dict, model: Any, opt: Any, adapter: Any) -> None:
    torch.save(
        {
            "gradfn": "0.1.0",
            "steps": steps,
            "model_init": init,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "adapter": adapter.state_dict(),
        },
        target,
    )
    print(f"wrote {target.relative_to(ROOT)} ({target.stat().st_size / 1024:.1f} KiB)")


def main() -> None:
    import gradfn

    if not gradfn.__version__.startswith("0.1"):
        raise SystemExit(
            f"gradfn {gradfn.__version__} from {gradfn.__file__}: run with a gradfn 0.1.0 "
            "checkout first on PYTHONPATH"
        )
    torch.set_num_threads(1)
    for config in SONGOKU_CONFIGS:
        model, opt, sched = build_songoku(gradfn, config)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        for step in range(SONGOKU_STEPS):
            sched.step(songoku_batch(step))
        _write(path("songoku", config), SONGOKU_STEPS, init, model, opt, sched)
    for config in CONDUCTOR_CONFIGS:
        model, opt, gc = build_conductor(gradfn, config)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        for cycle in range(CONDUCTOR_STEPS):
            conductor_cycle(model, opt, gc, cycle)
        _write(path("conductor", config), CONDUCTOR_STEPS, init, model, opt, gc)


if __name__ == "__main__":
    main()

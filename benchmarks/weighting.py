"""Loss weighting: a training step with each ``gradfn.weighting`` method vs plain summation.

A step is ``zero_grad`` + forward + the method's weights + one backward of ``Σ_k w_k L_k`` +
``SGD.step``; the baseline ``sum`` is the same step with ``w = 1`` (one plain backward of the
summed loss). GradNorm's norms are at the trunk's last layer (an ``nn.Linear``, the paper's
choice): ``gradnorm`` passes the layer (``WeightedLoss(layer=model.last)``: ``K`` backward passes
stop at the layer's output, the norms of its weight and bias gradients come from ``N × N``
Gramians, no weight gradient formed), ``gradnorm-autograd`` its parameters (``K``
``autograd.grad`` passes to the weight and bias, each forming the ``512 × 512`` weight
gradient: the same values), ``gradnorm-features`` the trunk's output ``h`` (the passes stop
there; LibMTL's ``rep_grad`` mode; other values). FAMO's step includes its logit
update (from the next step's losses, no extra forward). The
learned weightings (uncertainty, IMTL-L) train their ``(K,)`` parameter with the model.

Model: an MLP trunk (``256 → 512 → 512``, tanh) and ``K`` linear heads of 10 classes each,
cross-entropy losses, batch 128. Every runner of a ``K`` is timed side by side in interleaved
rounds (:func:`benchmarks._common.interleave`); the table gives the median time per step and the
median ratio to ``sum`` with its spread (min–max of the per-round ratios). Targets: ≤ 1.1× for
every method but GradNorm, ≤ 1.5× for GradNorm.

Usage::

    python -m benchmarks.weighting                  # K ∈ {2, 8, 32}
    python -m benchmarks.weighting --quick          # a smoke run
    python -m benchmarks.weighting --out benchmarks/results/weighting.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from collections.abc import Callable

import torch
from torch import nn

import gradfn.weighting as W
from benchmarks._common import add_common_args, environment, interleave, ratio_spread, setup

TARGET = {"gradnorm": 1.5, "gradnorm-features": 1.5}
GRADNORM_OWN = ("gradnorm", "gradnorm-autograd")


class _Model(nn.Module):
    def __init__(self, k: int, d_in: int = 256, width: int = 512) -> None:
        super().__init__()
        self.first = nn.Linear(d_in, width)
        self.last = nn.Linear(width, width)  # GradNorm's layer: the last shared one
        self.heads = nn.ModuleList(nn.Linear(width, 10) for _ in range(k))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = torch.tanh(self.last(torch.tanh(self.first(x))))
        return h, [head(h) for head in self.heads]


def _runner(method: str, k: int, device: torch.device, batch: int) -> Callable[[], object]:
    torch.manual_seed(0)
    model = _Model(k).to(device)
    x = torch.randn(batch, 256, device=device)
    y = torch.randint(0, 10, (batch, k), device=device)
    params = list(model.parameters())
    if method == "sum":
        wl = None
    else:
        name = "gradnorm" if method.startswith("gradnorm") else method
        layers: dict[str, object] = {
            "gradnorm": model.last,  # an nn.Linear: the norms from its calls
            "gradnorm-autograd": list(model.last.parameters()),
        }
        layer = layers.get(method)
        wl = W.WeightedLoss(W.weighting(name), k, layer=layer, device=device)
        params += list(wl.parameters())
    opt = torch.optim.SGD(params, lr=1e-3)

    def step() -> object:
        opt.zero_grad(set_to_none=True)
        h, out = model(x)
        losses = [nn.functional.cross_entropy(o, y[:, i]) for i, o in enumerate(out)]
        if wl is None:
            loss = torch.stack(losses).sum()
        else:
            as_list = method.startswith("gradnorm")
            feats = h if method == "gradnorm-features" else None
            loss = wl(losses if as_list else torch.stack(losses), feats)
        loss.backward()
        opt.step()
        return None

    return step


def _own_work(method: str, k: int, device: torch.device) -> Callable[[], object]:
    """The method's own work alone: weights (+ penalty) and the backward of ``Σ_k w_k L_k`` into
    a ``(K,)`` leaf of losses (``sum``: ``Σ_k L_k``)."""
    leaf = torch.rand(k, device=device, requires_grad=True)
    wl = None if method == "sum" else W.WeightedLoss(W.weighting(method), k, device=device)

    def call() -> object:
        losses = leaf * 1.0
        (losses.sum() if wl is None else wl(losses)).backward()
        return None

    return call


def _gradnorm_work(method: str, k: int, device: torch.device, batch: int) -> Callable[[], object]:
    """GradNorm's own work alone: ``weighted_loss`` (the ``K`` passes to the layer, the norms,
    the weights' update and ``Σ_k w_k L_k``) on one forward's graph, kept; ``gradnorm`` records
    the layer's call once and hands it to each call as a forward would."""
    torch.manual_seed(0)
    model = _Model(k).to(device)
    x = torch.randn(batch, 256, device=device)
    y = torch.randint(0, 10, (batch, k), device=device)
    capture = W.LinearCapture(model.last) if method == "gradnorm" else None
    params: object = capture if capture is not None else list(model.last.parameters())
    _, out = model(x)
    losses = [nn.functional.cross_entropy(o, y[:, i]) for i, o in enumerate(out)]
    recorded = list(capture.calls) if capture is not None else []
    gn = W.gradnorm()
    state = gn.init(k, device=device)

    def call() -> object:
        if capture is not None:
            capture.calls = list(recorded)
        return W.weighted_loss(gn, state, losses, params)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--quick", action="store_true", help="K ∈ {2, 8}, few rounds")
    parser.add_argument("--ks", default=None, help="comma-separated K (default 2,8,32)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per K")
    parser.add_argument("--calls", type=int, default=5, help="steps per timed sample")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    device = setup(args)
    warnings.filterwarnings("ignore")
    ks = [int(x) for x in args.ks.split(",")] if args.ks else [2, 8] if args.quick else [2, 8, 32]
    rounds = args.rounds or (3 if args.quick else 21)
    cmd = "python -m benchmarks.weighting" + "".join(f" {a}" for a in sys.argv[1:])
    lines = [
        f"# Loss weighting: a step vs plain summation (`{cmd}`)",
        "",
        f"{environment(device)}; MLP trunk 256 → 512 → 512, K heads of 10 classes, batch "
        f"{args.batch}; a step is zero_grad + forward + weights + one backward + SGD step; "
        f"{rounds} interleaved rounds of {args.calls} steps. Ratio: median of the per-round "
        "ratios to `sum` [min–max]; target ≤ 1.1× (GradNorm ≤ 1.5×).",
        "",
        "| K | method | ms per step [min–max] | ratio to `sum` | target |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    steps: dict[int, float] = {}
    for k in ks:
        names = ("sum", *W.METHODS, "gradnorm-autograd", "gradnorm-features")
        runners = {m: _runner(m, k, device, args.batch) for m in names}
        t = interleave(runners, device, rounds=rounds, calls=args.calls, warmup=3)
        steps[k] = t["sum"].median
        for m in runners:
            ratio = "—" if m == "sum" else ratio_spread(t[m], t["sum"])
            target = "—" if m in ("sum", "gradnorm-autograd") else f"≤ {TARGET.get(m, 1.1)}×"
            row = f"| {k} | `{m}` | {t[m].ms()} | {ratio} | {target} |"
            lines.append(row)
            print(row, flush=True)
    own = [m for m in W.METHODS if m != "gradnorm"]
    extra = [
        "",
        "The same methods' own work alone (weights, penalty, the backward of `Σ_k w_k L_k` into a "
        "`(K,)` leaf of losses; `sum`: `Σ_k L_k`), interleaved, in µs per call; estimate = "
        "`1 + (own − own(sum)) / step(sum)`: the step ratio with the timing noise of the whole step taken out. "
        "GradNorm's own work: `weighted_loss` on one forward's graph (the `K` passes to its layer, "
        "the norms, the weights' update and `Σ_k w_k L_k`), no backward, timed in rounds beside "
        "the `sum` step itself; its estimate is `1 + own / step(sum)`, the median over rounds.",
        "",
        "| K | method | own work µs [min–max] | estimated step ratio |",
        "|---|---|---|---|",
    ]
    print("\n".join(extra), flush=True)
    lines += extra
    for k in ks:
        step_sum = steps[k]
        runners = {m: _own_work(m, k, device) for m in ("sum", *own)}
        t = interleave(runners, device, rounds=rounds, calls=50, warmup=20)
        # GradNorm's work takes milliseconds: paired round by round with the `sum` step
        runners = {"step": _runner("sum", k, device, args.batch)}
        runners.update({m: _gradnorm_work(m, k, device, args.batch) for m in GRADNORM_OWN})
        slow = interleave(runners, device, rounds=rounds, calls=args.calls, warmup=3)
        t.update({m: slow[m] for m in GRADNORM_OWN})
        for m in (*own, *GRADNORM_OWN):
            lo, hi = t[m].spread
            if m in GRADNORM_OWN:
                pairs = zip(slow[m].samples, slow["step"].samples, strict=True)
                estimate = 1 + statistics.median(a / b for a, b in pairs)
            else:
                estimate = 1 + (t[m].median - t["sum"].median) / step_sum
            row = (
                f"| {k} | `{m}` | {t[m].median * 1e6:.0f} [{lo * 1e6:.0f}–{hi * 1e6:.0f}] "
                f"| {estimate:.3f}× |"
            )
            lines.append(row)
            print(row, flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

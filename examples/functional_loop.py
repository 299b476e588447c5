"""A training loop written only with gradfn's pure functions: no nn.Module, no optimizer object.

Parameters are a pytree (``dict[str, Tensor]``), the model is a function of it, and every step is
``params -> per-task gradients -> one gradient -> optimizer transform -> new params``. Two ways to
get the gradient, chosen with ``--method``:

* an aggregator (default ``upgrad``; any name of ``gradfn.aggregators.METHODS``): per-task
  gradients from ONE shared forward (``value_and_per_task_grads``), the shared trunk's rows
  aggregated, each head's rows summed (a head only receives its own task's gradient);
* ``songoku``: the SON-GOKU algorithm's ``init`` / ``update``; its state (groups, EMAs, ρ, and
  the in-group aggregator's state with ``--aggregator``) is a NamedTuple of tensors carried by the
  loop.

Tasks 0 and 2 want opposite outputs from the same head, so no method fits both; SON-GOKU puts
them in different colour groups (printed at the end with the interference matrix).

The update is a chain of gradient transforms from :mod:`gradfn.transforms` (global norm cap,
then bias-corrected momentum; ``update(state, updates, params) -> (state, updates)``), applied as
plain SGD. Run:

    python examples/functional_loop.py                      # UPGrad
    python examples/functional_loop.py --method songoku
    python examples/functional_loop.py --method songoku --aggregator gradvac   # stateful, in-group
    python examples/functional_loop.py --method mgda --quick
"""

from __future__ import annotations

import argparse

import torch

from gradfn import aggregators, songoku, tree, value_and_per_task_grads
from gradfn.algorithms import group_lists
from gradfn.transforms import chain, momentum, norm_cap

K, D, H = 4, 12, 32  # tasks, input features, hidden units
HEAD = (0, 1, 0, 2)  # the head each task reads


def init_params(generator: torch.Generator) -> dict[str, torch.Tensor]:
    def rnd(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    return {
        "trunk.w1": rnd(H, D, scale=D**-0.5),
        "trunk.b1": torch.zeros(H),
        "trunk.w2": rnd(H, H, scale=H**-0.5),
        "heads.w": rnd(3, H, scale=H**-0.5),  # three linear heads; task 2 reads head 0
        "heads.b": torch.zeros(3),
    }


def loss_fn(params: dict[str, torch.Tensor], batch: tuple) -> list[torch.Tensor]:
    """K losses from ONE forward of the shared trunk (a list: each backward visits its own head)."""
    x, y = batch
    h = torch.relu(x @ params["trunk.w1"].T + params["trunk.b1"])
    h = torch.relu(h @ params["trunk.w2"].T)
    out = h @ params["heads.w"].T + params["heads.b"]  # (B, 3)
    return [((out[:, HEAD[k]] - y[:, k]) ** 2).mean() for k in range(K)]


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tasks 0 and 1 agree; task 2 wants the opposite of task 0 from the same head (a harmful
    auxiliary: its gradients oppose task 0's); task 3 is unrelated."""
    x = torch.randn(n, D, generator=generator)
    w, v = torch.randn(D, generator=generator), torch.randn(D, generator=generator)
    y = torch.stack([x @ w, x @ w + 0.2, -(x @ w), x @ v], dim=1)
    return x, y


def is_shared(name: str) -> bool:
    return name.startswith("trunk.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="upgrad", help="songoku or an aggregator name")
    parser.add_argument(
        "--aggregator", default=None, help="with --method songoku: the in-group aggregator"
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke run)")
    args = parser.parse_args()
    steps = 10 if args.quick else args.steps
    if args.method != "songoku" and args.method not in aggregators.METHODS:
        parser.error(f"--method must be 'songoku' or one of {aggregators.METHODS}")

    gen = torch.Generator().manual_seed(0)
    params = init_params(gen)
    x, y = make_data(1024, gen)

    opt = chain(norm_cap(10.0), momentum(0.9))  # pure (init, update) on pytrees
    opt_state = opt.init(params)

    if args.method == "songoku":
        tx = songoku(
            loss_fn,
            num_tasks=K,
            shared=is_shared,
            refresh_period=8,
            tau_schedule=0.25,
            aggregator=args.aggregator,  # None: the group's sum (paper Eq. 6)
        )
        state = tx.init(params)
    else:
        agg = aggregators.aggregator(args.method)
        state = agg.init(K)

    for step in range(1, steps + 1):
        idx = torch.randint(0, x.shape[0], (64,), generator=gen)
        batch = (x[idx], y[idx])
        if args.method == "songoku":
            state, grads = tx.update(state, params, batch)  # one colour group per step
            losses = state.losses
        else:
            losses, stacked = value_and_per_task_grads(loss_fn, params, batch)  # (K, *shape)
            shared, heads = tree.partition(stacked, is_shared)
            state, out = agg.update(state, shared)  # Aggregated(grad, weights)
            head_grads = tree.weighted_sum(heads, torch.ones(K))  # heads: plain sum over tasks
            grads = {**out.grad, **head_grads}
        opt_state, updates = opt.update(opt_state, grads, params)
        params = {n: p - args.lr * updates[n] for n, p in params.items()}
        if step % max(1, steps // 5) == 0 or step == steps:
            shown = " ".join(f"{v:.3f}" for v in losses.tolist())
            print(f"step {step:4d}  losses [{shown}]")

    if args.method == "songoku":
        print("colour groups (task indices):", group_lists(state))
        print("interference rho = -cos at the last refresh:\n", state.rho)
    else:
        print(f"{args.method} weights of the last step:", out.weights)


if __name__ == "__main__":
    main()

"""SON-GOKU speed and memory, measured side by side in one run (markdown tables on stdout).

Seed-style tasks, as users write them: each ``TaskSpec.loss_fn(model, batch)`` runs the model
(``model(x)`` returns every head) and reads its own head; one batch per step is handed to every
task. K = 8 heads on an MLP trunk, R = 32, Adam; every runner steps the same kind of model
through the same whole refresh windows (refreshes included), interleaved round by round.

1. ``ema_mode="refresh"``: ``SonGokuScheduler.step`` vs the plain one-forward loop (one forward,
   one backward of ``Σ_k L_k``, ``optimizer.step()``) and vs the published reference's way of
   running a step. Target: ≤ 1.15× plain at ≥ 1M parameters.
2. ``ema_mode="active"`` (the paper's mode: each active task's own gradient feeds its EMA): the
   adapter vs the bound ``(F + |S|·B)/(F + B)``, measured directly (one forward, one backward per
   active task on the retained graph, the optimizer step), and vs the reference's way. Targets:
   within 10 % of the bound, faster than the reference in every configuration.
3. Refresh cost vs K ∈ {3, 6, 16, 40} (the paper's Table 2 analogue): time per refresh and peak
   extra memory of a refresh (CPU allocator, via the profiler), dense EMA vs a ``d_sk``-sketch,
   plus the persistent EMA size.

The reference's way (one forward + backward per active task, per-parameter accumulation,
flattened per-task copies, EMA update; written out below) is the published legacy scheduler's
step; it has no refresh mode, so tables 1 and 2 compare both modes of gradfn with its one mode.

Run: ``python -m benchmarks.songoku`` (``--quick`` for a short run, ``--device cuda`` on a GPU).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from benchmarks._common import (
    add_common_args,
    environment,
    interleave,
    progress,
    ratio_spread,
    setup,
    sync,
)
from gradfn import SonGokuScheduler, TaskSpec, TauSchedule, songoku

K, R, BATCH = 8, 32, 128
CONFIGS = {  # name: trunk widths (input first); the last is the feature size the heads read
    "0.46M": (256, 512, 512, 128),
    "1.8M": (512, 1024, 1024, 256),
}
TAUS = {"joint (τ = 1: one group)": 1.0, "scheduled (τ = −0.5)": -0.5}


class SeedNet(nn.Module):
    """An MLP trunk and ``k`` linear heads; ``model(x)`` is every head's output ``(B, k)``."""

    def __init__(self, widths: tuple[int, ...], k: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(widths[-1], 1) for _ in range(k))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        return torch.cat([head(h) for head in self.heads], dim=1)


def task_loss(k: int):
    def loss_fn(model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(model(x)[:, k], y[:, k])

    return loss_fn


def make_batches(widths, k: int, n: int, device, seed: int = 1):
    """``n`` steps, one batch each handed to every task; targets of two opposed teachers."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(widths[0], generator=g) / widths[0] ** 0.5
    sign = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(k)])
    out = []
    for _ in range(n):
        x = torch.randn(BATCH, widths[0], generator=g)
        y = (x @ teacher)[:, None] * sign + 0.1 * torch.randn(BATCH, k, generator=g)
        batch = (x.to(device), y.to(device))
        out.append({f"t{i}": batch for i in range(k)})
    return out


# --------------------------------------------------------------------------------------------
# runners: each takes one step's {task: batch}


def plain_step(model, opt, k):
    def run(batches):
        x, y = batches["t0"]
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = sum(nn.functional.mse_loss(out[:, i], y[:, i]) for i in range(k))
        loss.backward()
        opt.step()

    return run


def bound_step(model, opt, schedule, *, ema_mode="active", with_ema=False, beta=0.9):
    """The least work a step of ``ema_mode`` needs, with no copies: one forward; in
    ``"active"`` mode one backward per active task on the retained graph (each task's gradient
    is needed), in ``"refresh"`` mode one backward of the active tasks' summed loss, except every
    ``R``-th step, which probes every task (one backward each); the optimizer step.
    ``with_ema``: also the EMA update of the differentiated tasks' trunk rows (in place).
    ``schedule``: the active tasks of successive steps, cycled."""
    params = [p for p in model.parameters() if p.requires_grad]
    trunk = list(model.trunk.parameters())
    ema = [torch.zeros((K, *p.shape), device=p.device) for p in trunk]
    count = [0]

    def run(batches):
        x, y = batches["t0"]
        t = count[0]
        active = schedule[t % len(schedule)]
        count[0] += 1
        opt.zero_grad(set_to_none=True)
        out = model(x)
        losses = [nn.functional.mse_loss(out[:, i], y[:, i]) for i in range(K)]
        probe = ema_mode == "refresh" and (t + 1) % R == 0
        if ema_mode == "refresh" and not probe:
            sum(losses[i] for i in active).backward()
        else:
            tasks = range(K) if probe else active
            for pos, i in enumerate(tasks):
                grads = torch.autograd.grad(
                    losses[i], params, retain_graph=pos < len(tasks) - 1, allow_unused=True
                )
                if i in active:
                    for p, g in zip(params, grads, strict=True):
                        if g is not None:
                            p.grad = g if p.grad is None else p.grad.add_(g)
                if with_ema:
                    for e, g in zip(ema, grads[: len(trunk)], strict=True):
                        e[i].lerp_(g, 1.0 - beta)
        opt.step()

    return run


class ReferenceWay:
    """The published reference's legacy step, written out: one forward + backward per active
    task, per-parameter sums, flattened per-task copies for the EMA, recolouring every R steps."""

    def __init__(self, model, opt, k, r_period, tau, beta=0.9):
        self.model, self.opt, self.k, self.r, self.tau, self.beta = (
            model,
            opt,
            k,
            r_period,
            tau,
            beta,
        )
        self.shared = list(model.trunk.parameters())
        self.heads = [list(h.parameters()) for h in model.heads]
        self.ema: list[torch.Tensor | None] = [None] * k
        self.classes = [list(range(k))]
        self.ptr, self.t = 0, 0

    def active(self) -> list[int]:
        return self.classes[self.ptr % len(self.classes)]

    def __call__(self, batch):
        active = self.active()
        shared_sum = [None] * len(self.shared)
        head_sum = {}
        for i in active:
            self.opt.zero_grad(set_to_none=True)
            loss = task_loss(i)(self.model, batch[f"t{i}"])
            loss.backward()
            for j, p in enumerate(self.shared):
                if p.grad is not None:
                    g = p.grad.detach().clone()
                    shared_sum[j] = g if shared_sum[j] is None else shared_sum[j] + g
            head_sum[i] = [p.grad.detach().clone() for p in self.heads[i]]
            float(loss.detach())
            flat = torch.cat([p.grad.reshape(-1) for p in self.shared]).detach().clone()
            with torch.no_grad():
                e = self.ema[i]
                self.ema[i] = (
                    (1 - self.beta) * flat if e is None else self.beta * e + (1 - self.beta) * flat
                )
        self.opt.zero_grad(set_to_none=True)
        for p, g in zip(self.shared, shared_sum, strict=True):
            p.grad = g
        for i in active:
            for p, g in zip(self.heads[i], head_sum[i], strict=True):
                p.grad = g
        self.opt.step()
        self.t += 1
        if self.t % self.r == 0:
            self._refresh()
        self.ptr = (self.ptr + 1) % len(self.classes)

    @torch.no_grad()
    def _refresh(self):
        k = self.k
        norms = [float(e.norm()) + 1e-12 for e in self.ema]
        adj = {i: set() for i in range(k)}
        for i in range(k):
            for j in range(i + 1, k):
                rho = -float(self.ema[i] @ self.ema[j]) / (norms[i] * norms[j])
                if rho > self.tau:
                    adj[i].add(j)
                    adj[j].add(i)
        order = sorted(range(k), key=lambda v: (-len(adj[v]), v))
        classes: list[list[int]] = []
        for v in order:
            for cls in classes:
                if not adj[v] & set(cls):
                    cls.append(v)
                    break
            else:
                classes.append([v])
        self.classes = [sorted(c) for c in classes]
        self.ptr = 0


def adapter(model, opt, k, r_period, tau, ema_mode, share_forward=True):
    tasks = [TaskSpec(f"t{i}", task_loss(i)) for i in range(k)]
    trunk = {id(p) for p in model.trunk.parameters()}
    return SonGokuScheduler(
        model,
        tasks,
        opt,
        shared_param_filter=lambda p: id(p) in trunk,  # as the reference's way: the trunk
        refresh_period=r_period,
        tau_schedule=TauSchedule("constant", tau_target=tau),
        ema_mode=ema_mode,
        share_forward=share_forward,
    )


def schedule_of(sched, n: int) -> list[list[int]]:
    """The active tasks of ``sched``'s next ``n`` steps, if its groups stay as they are."""
    groups = sched.current_groups()
    start = int(sched.state.group_index)
    return [groups[(start + s) % len(groups)] for s in range(n)]


def windows(step, batches):
    """A runner over whole refresh windows: ``step`` on every batch in turn."""

    def run():
        for b in batches:
            step(b)

    return run


def groups_summary(sched) -> str:
    return str([len(g) for g in sched.schedule_snapshot()])


def n_params(model) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"


# --------------------------------------------------------------------------------------------
# measurements


def bench_modes(ema_mode: str, device, quick: bool, names: list[str]) -> list[str]:
    """Table 1 (refresh) or 2 (active): the adapter vs the plain loop, the reference's way and
    the bounds (without and with the EMA update the algorithm needs)."""
    rounds = 3 if quick else 7
    head = (
        "| model | setting | groups | plain (ms) | reference way (ms) | bound (ms) | "
        "bound + EMA (ms) | adapter (ms) | adapter / plain | adapter / bound | "
        "adapter / (bound + EMA) | reference / adapter |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in progress(names, f"songoku ema_mode={ema_mode}"):
        widths = CONFIGS[name]
        batches = make_batches(widths, K, 2 * R, device)
        warm, timed = batches[:R], batches[R:]
        for label, tau in TAUS.items():
            keys = ("plain", "ref", "bound", "bound_ema", "ad")
            models = {key: SeedNet(widths, K).to(device) for key in keys}
            opts = {key: torch.optim.Adam(m.parameters(), lr=1e-3) for key, m in models.items()}
            sched = adapter(models["ad"], opts["ad"], K, R, tau, ema_mode)
            steps = {
                "plain": plain_step(models["plain"], opts["plain"], K),
                "ref": ReferenceWay(models["ref"], opts["ref"], K, R, tau),
                "ad": sched.step,
            }
            for b in warm:  # one window: the first refresh forms the groups
                for fn in steps.values():
                    fn(b)
            # the bounds train the groups the adapter trains, step for step
            schedule = schedule_of(sched, len(timed))
            for key, with_ema in (("bound", False), ("bound_ema", True)):
                steps[key] = bound_step(
                    models[key], opts[key], schedule, ema_mode=ema_mode, with_ema=with_ema
                )
            runners = {key: windows(steps[key], timed) for key in keys}
            t = interleave(runners, device, rounds=rounds)
            per = {key: v.median / len(timed) * 1e3 for key, v in t.items()}
            cells = [name, label, groups_summary(sched)]
            cells += [f"{per[key]:.2f}" for key in keys]
            cells += [
                ratio_spread(t["ad"], t["plain"]),
                ratio_spread(t["ad"], t["bound"]),
                ratio_spread(t["ad"], t["bound_ema"]),
                ratio_spread(t["ref"], t["ad"]),
            ]
            rows.append("| " + " | ".join(cells) + " |")
    return rows


def peak_bytes(fn, device) -> int:
    """Peak extra bytes of the allocator while ``fn`` runs (CPU: profiler memory events)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


def bench_refresh_vs_k(quick: bool, device) -> list[str]:
    hidden, d_sk = 512, 128
    rows = [
        "| K | d (shared) | dense refresh (ms) | dense peak (MiB) | dense EMA (MiB) | "
        "sketch refresh (ms) | sketch peak (KiB) | sketch EMA (KiB) | sketch K grads (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ks = (3, 6, 16) if quick else (3, 6, 16, 40)
    for k in progress(ks, "songoku refresh vs K"):
        model = SeedNet((64, hidden, hidden), k).to(device)
        params = {n: p.detach() for n, p in model.named_parameters()}
        d = sum(p.numel() for n, p in params.items() if n.startswith("trunk"))
        g = torch.Generator().manual_seed(k)
        out = {}
        for label, dim in (("dense", None), ("sketch", d_sk)):
            tx = songoku(
                lambda p, b, k=k: [p["trunk.0.bias"].sum()] * k,
                num_tasks=k,
                shared=lambda n: n.startswith("trunk"),
                sketch_dim=dim,
            )
            state = tx.init(params)
            ema = (
                torch.randn(k, dim, generator=g).to(device)
                if dim is not None
                else {n: torch.randn(e.shape, generator=g).to(device) for n, e in state.ema.items()}
            )
            state = state._replace(ema=ema)
            tx.refresh(state, params)  # warm-up
            reps = 3 if quick else 10
            times = []
            for _ in range(reps):
                sync(device)
                start = time.perf_counter()
                tx.refresh(state, params)
                sync(device)
                times.append(time.perf_counter() - start)
            ema_bytes = sum(
                t.numel() * t.element_size()
                for t in (ema.values() if isinstance(ema, dict) else [ema])
            )
            out[label] = (
                statistics.median(times),
                peak_bytes(
                    lambda tx=tx, state=state, params=params: tx.refresh(state, params), device
                ),
                ema_bytes,
            )
        from gradfn.conflict import sketch

        grads = {
            n: torch.randn((k, *p.shape), generator=g).to(device)
            for n, p in params.items()
            if n.startswith("trunk")
        }
        sketch(grads, d_sk, 0)
        sync(device)
        start = time.perf_counter()
        sketch(grads, d_sk, 0)
        sync(device)
        t_sk = time.perf_counter() - start
        (td, pd, ed), (ts, ps, es) = out["dense"], out["sketch"]
        rows.append(
            f"| {k} | {d:,} | {td * 1e3:.2f} | {pd / 2**20:.2f} | {ed / 2**20:.2f} | "
            f"{ts * 1e3:.2f} | {ps / 2**10:.1f} | {es / 2**10:.1f} | {t_sk * 1e3:.1f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, K ≤ 16 in table 3")
    parser.add_argument("--tables", default="1,2,3", help="which tables to run (default: all)")
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"models of tables 1-2 ({', '.join(CONFIGS)})"
    )
    add_common_args(parser)
    args = parser.parse_args()
    device = setup(args)
    tables = {int(t) for t in args.tables.split(",")}
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {list(CONFIGS)}")
    print(f"{environment(device)}\n")
    print("ms per step (median over interleaved rounds of a whole refresh window); ratios: median")
    print("of per-round ratios [min–max].\n")
    if 1 in tables:
        print(f"### 1. ema_mode='refresh' (K = {K}, R = {R}, batch {BATCH}, seed-style tasks)\n")
        print("\n".join(bench_modes("refresh", device, args.quick, names)) + "\n")
    if 2 in tables:
        print(f"### 2. ema_mode='active' (K = {K}, R = {R}, batch {BATCH}, seed-style tasks)\n")
        print("\n".join(bench_modes("active", device, args.quick, names)) + "\n")
    if 3 in tables:
        print("### 3. Refresh cost vs K (trunk 64→512→512, d_sk = 128)\n")
        print("\n".join(bench_refresh_vs_k(args.quick, device)) + "\n")


if __name__ == "__main__":
    main()

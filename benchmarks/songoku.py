"""SON-GOKU speed and memory, measured side by side in one run (markdown tables on stdout).

1. ``ema_mode="refresh"`` (K = 8, R = 32, MLP trunk + heads): time per ``SonGokuScheduler.step``
   over whole refresh windows (refreshes included) vs a plain summed-loss step
   (``Σ_k L_k(batch_k)``, one backward, ``optimizer.step()``) on the same model and batches.
   Target: ≤ 1.15×.
2. ``ema_mode="active"``: the adapter and the functional core vs the reference's way of running a
   step (one separate forward + backward per active task, per-parameter accumulation, flattened
   per-task copies, EMA update, written out below) on the same model. Target: ≥ 2× faster.
3. Refresh cost vs K ∈ {3, 6, 16, 40} (the paper's Table 2 analogue): time per refresh and peak
   extra memory of a refresh (CPU allocator, via the profiler), dense EMA vs a ``d_sk``-sketch,
   plus the persistent EMA size.

Run: ``python -m benchmarks.songoku`` (``--quick`` for a short run).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from gradfn import SonGokuScheduler, TaskSpec, TauSchedule, songoku

IN, HIDDEN, OUT, BATCH = 64, 256, 8, 64


class MultiHead(nn.Module):
    def __init__(self, k: int, hidden: int = HIDDEN, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(
            nn.Linear(IN, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.heads = nn.ModuleList(nn.Linear(hidden, OUT) for _ in range(k))

    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return self.heads[k](self.trunk(x))


def task_loss(k: int):
    def loss_fn(model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(model(x, k), y)

    return loss_fn


def make_batches(k: int, n: int, seed: int = 1, shared: bool = False):
    """``n`` steps of per-task batches; tasks in two clusters with opposed teachers."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(IN, OUT, generator=g) / IN**0.5
    out = []
    for _ in range(n):
        x = torch.randn(BATCH, IN, generator=g)
        step = {}
        for i in range(k):
            xi = x if shared else torch.randn(BATCH, IN, generator=g)
            sign = 1.0 if i % 2 == 0 else -1.0
            step[f"t{i}"] = (xi, sign * xi @ teacher)
        out.append(step)
    return out


def timed(fn, batches) -> float:
    start = time.perf_counter()
    for b in batches:
        fn(b)
    return (time.perf_counter() - start) / len(batches)


def interleaved(runs: dict, batches, repeats: int) -> dict[str, float]:
    """Median seconds per step of each runner, alternating runners between repeats."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            samples[name].append(timed(fn, batches))
    return {name: statistics.median(v) for name, v in samples.items()}


# --------------------------------------------------------------------------------------------
# baselines


def plain_step(model, opt, k):
    def run(batch):
        opt.zero_grad(set_to_none=True)
        loss = sum(task_loss(i)(model, batch[f"t{i}"]) for i in range(k))
        loss.backward()
        opt.step()

    return run


class ReferenceWay:
    """The reference's legacy step, written out: one forward + backward per active task."""

    def __init__(self, model, opt, k, r_period, tau, beta=0.9, shared_batch=False):
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

    def __call__(self, batch):
        active = self.classes[self.ptr % len(self.classes)]
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


def adapter(model, opt, k, r_period, tau, ema_mode):
    tasks = [TaskSpec(f"t{i}", task_loss(i)) for i in range(k)]
    sched = SonGokuScheduler(
        model,
        tasks,
        opt,
        refresh_period=r_period,
        tau_schedule=TauSchedule("constant", tau_target=tau),
        ema_mode=ema_mode,
    )
    return sched


def core_shared_forward(model, opt, k, r_period, tau):
    """The functional core with ONE trunk forward for all tasks (tasks share the batch)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    named = dict(model.named_parameters())

    def loss_fn(p, batch):
        x = batch["t0"][0]
        h = torch.relu(nn.functional.linear(x, p["trunk.0.weight"], p["trunk.0.bias"]))
        h = torch.relu(nn.functional.linear(h, p["trunk.2.weight"], p["trunk.2.bias"]))
        return [
            nn.functional.mse_loss(
                nn.functional.linear(h, p[f"heads.{i}.weight"], p[f"heads.{i}.bias"]),
                batch[f"t{i}"][1],
            )
            for i in range(k)
        ]

    tx = songoku(
        loss_fn,
        num_tasks=k,
        shared=lambda n: n.startswith("trunk"),
        refresh_period=r_period,
        tau_schedule=tau,
        ema_mode="active",
    )
    holder = {"state": tx.init(params)}

    def run(batch):
        state, grads = tx.update(holder["state"], params, batch)
        holder["state"] = state
        for n, g in grads.items():
            named[n].grad = g
        opt.step()

    return run, holder


# --------------------------------------------------------------------------------------------
# measurements


def groups_summary(sched) -> str:
    return str([len(g) for g in sched.schedule_snapshot()])


def bench_refresh_mode(quick: bool) -> list[str]:
    k, r = 8, 32
    n = 2 * r
    batches = make_batches(k, n + r)
    rows = [
        "| setting | trunk width | plain summed-loss step (ms) | adapter step (ms) | ratio | groups |",
        "|---|---|---|---|---|---|",
    ]
    for label, tau, hidden in (
        ("joint (τ = 1: one group, same work as plain)", 1.0, HIDDEN),
        ("scheduled (τ = −0.5)", -0.5, HIDDEN),
        ("joint (τ = 1: one group, same work as plain)", 1.0, 4 * HIDDEN),
        ("scheduled (τ = −0.5)", -0.5, 4 * HIDDEN),
    ):
        m_plain, m_ad = MultiHead(k, hidden), MultiHead(k, hidden)
        o_plain = torch.optim.Adam(m_plain.parameters(), lr=1e-3)
        o_ad = torch.optim.Adam(m_ad.parameters(), lr=1e-3)
        sched = adapter(m_ad, o_ad, k, r, tau, "refresh")
        for b in batches[:r]:  # warm-up window (and first refresh)
            sched.step(b)
            plain_step(m_plain, o_plain, k)(b)
        res = interleaved(
            {"plain": plain_step(m_plain, o_plain, k), "adapter": sched.step},
            batches[r:],
            2 if quick else 5,
        )
        rows.append(
            f"| {label} | {hidden} | {res['plain'] * 1e3:.3f} | {res['adapter'] * 1e3:.3f} | "
            f"{res['adapter'] / res['plain']:.2f}× | {groups_summary(sched)} |"
        )
    return rows


def bench_active_mode(quick: bool) -> list[str]:
    k, r = 8, 32
    rows = [
        "| setting | reference way (ms) | ours (ms) | speed-up | groups |",
        "|---|---|---|---|---|",
    ]
    for label, tau, shared in (
        ("adapter, per-task batches, joint (τ = 1)", 1.0, False),
        ("adapter, per-task batches, scheduled (τ = −0.5)", -0.5, False),
        ("core, one shared batch + one trunk forward, joint (τ = 1)", 1.0, True),
        ("core, one shared batch + one trunk forward, scheduled (τ = −0.5)", -0.5, True),
    ):
        batches = make_batches(k, 3 * r, shared=shared)
        m_ref, m_ours = MultiHead(k), MultiHead(k)
        ref = ReferenceWay(m_ref, torch.optim.Adam(m_ref.parameters(), lr=1e-3), k, r, tau)
        o_ours = torch.optim.Adam(m_ours.parameters(), lr=1e-3)
        if shared:
            ours, holder = core_shared_forward(m_ours, o_ours, k, r, tau)
            st = holder

            def groups(st=st):
                s = st["state"]
                return str([int(s.groups[g].sum()) for g in range(int(s.num_groups))])
        else:
            sched = adapter(m_ours, o_ours, k, r, tau, "active")
            ours = sched.step

            def groups(sched=sched):
                return groups_summary(sched)

        for b in batches[:r]:
            ref(b)
            ours(b)
        res = interleaved({"ref": ref, "ours": ours}, batches[r:], 2 if quick else 5)
        rows.append(
            f"| {label} | {res['ref'] * 1e3:.3f} | {res['ours'] * 1e3:.3f} | "
            f"{res['ref'] / res['ours']:.2f}× | {groups()} |"
        )
    return rows


def peak_bytes(fn) -> int:
    """Peak of the CPU allocator's live bytes while ``fn`` runs (profiler memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


def bench_refresh_vs_k(quick: bool) -> list[str]:
    hidden, d_sk = 512, 128
    rows = [
        "| K | d (shared) | dense refresh (ms) | dense peak (MiB) | dense EMA (MiB) | "
        "sketch refresh (ms) | sketch peak (KiB) | sketch EMA (KiB) | sketch K grads (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ks = (3, 6, 16) if quick else (3, 6, 16, 40)
    for k in ks:
        model = MultiHead(k, hidden=hidden)
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
                torch.randn(k, dim, generator=g)
                if dim is not None
                else {n: torch.randn(e.shape, generator=g) for n, e in state.ema.items()}
            )
            state = state._replace(ema=ema)
            tx.refresh(state, params)  # warm-up
            reps = 3 if quick else 10
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                tx.refresh(state, params)
                times.append(time.perf_counter() - start)
            ema_bytes = sum(
                t.numel() * t.element_size()
                for t in (ema.values() if isinstance(ema, dict) else [ema])
            )
            out[label] = (
                statistics.median(times),
                peak_bytes(lambda tx=tx, state=state, params=params: tx.refresh(state, params)),
                ema_bytes,
            )
        from gradfn.conflict import sketch

        grads = {
            n: torch.randn((k, *p.shape), generator=g)
            for n, p in params.items()
            if n.startswith("trunk")
        }
        sketch(grads, d_sk, 0)
        start = time.perf_counter()
        sketch(grads, d_sk, 0)
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
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU\n")
    print("### 1. ema_mode='refresh' (K = 8, R = 32): adapter step vs plain summed-loss step\n")
    print("\n".join(bench_refresh_mode(args.quick)) + "\n")
    print("### 2. ema_mode='active' (K = 8, R = 32): ours vs the reference's way\n")
    print("\n".join(bench_active_mode(args.quick)) + "\n")
    print("### 3. Refresh cost vs K (trunk 64→512→512, d_sk = 128)\n")
    print("\n".join(bench_refresh_vs_k(args.quick)) + "\n")


if __name__ == "__main__":
    main()

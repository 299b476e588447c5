"""PyTorch Lightning (``gradfn.integrations.lightning``): a ``GradfnModule`` trained by a Trainer
on the CPU takes the very steps of the plain-PyTorch adapter loop (the oracle) for SON-GOKU,
GradientConductor and an aggregator, in float32 and under ``precision="bf16-mixed"``; a run
checkpointed by the Trainer and resumed by a new one equals an uninterrupted run bit for bit."""

import importlib
import subprocess
import sys
import types

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from gradfn import aggregators
from gradfn.adapters import GradientConductor, SonGokuScheduler, TaskSpec
from gradfn.integrations.lightning import AggregatorBackward, GradfnModule, precision_kwargs
from tests._utils import ROOT
from tests._utils.asserts import tree_equal
from tests._utils.models import TrunkHeads

pytestmark = [  # Lightning's own notices: few dataloader workers, its pytree use on new torch
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)"),
]
KINDS = ("songoku", "gcond", "upgrad")
SIGNS = {"a": 1.0, "b": 0.5, "c": -1.0}  # c opposes a
ACC = 3  # GradientConductor's micro-batches per step
BATCH, PER_EPOCH = 12, 2


def _songoku_loss(k, sign):
    def loss(m, batch):
        x, y = batch
        return ((m(x, k) - sign * y) ** 2).mean()

    return loss


SPECS = [TaskSpec(n, _songoku_loss(k, s)) for k, (n, s) in enumerate(SIGNS.items())]
GC_LOSSES = {
    n: (lambda out, y, k=k, s=s: ((out[:, k] - s * y) ** 2).mean())
    for k, (n, s) in enumerate(SIGNS.items())
}
GC_LAMBDAS = {"a": 1.0, "b": 0.7, "c": 0.5}


def _losses(net, x, y):
    out = net(x)
    return {n: ((out[:, k] - s * y) ** 2).mean() for k, (n, s) in enumerate(SIGNS.items())}


def _method(kind, net, autocast_dtype=None, scaler=None):
    if kind == "songoku":
        return SonGokuScheduler(
            net,
            SPECS,
            None,
            refresh_period=2,
            base_method="pcgrad",
            autocast_dtype=autocast_dtype,
            scaler=scaler,
        )
    if kind == "gcond":
        return GradientConductor(
            net, GC_LOSSES, GC_LAMBDAS, ACC, autocast_dtype=autocast_dtype, scaler=scaler
        )
    return AggregatorBackward(net, "upgrad", task_names=list(SIGNS))


def _micro(x, y):
    return list(zip(x.chunk(ACC), y.chunk(ACC), strict=True))


class Multi(GradfnModule):
    def __init__(self, kind):
        super().__init__()
        self.kind, self.net, self.logged = kind, TrunkHeads(6, 8, 3, seed=0), []

    def configure_gradfn(self, autocast_dtype, scaler):
        self.amp = (autocast_dtype, scaler)
        return _method(self.kind, self.net, autocast_dtype, scaler)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05, weight_decay=0.01)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.kind == "songoku":
            self.gradfn_step({n: (x, y) for n in SIGNS})
        elif self.kind == "gcond":
            self.gradfn_step(_micro(x, y))
        else:
            self.gradfn_step(_losses(self.net, x, y))
        metrics = self.gradfn_metrics()
        self.logged.append(metrics)
        self.log_dict(metrics)


def _data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(BATCH * PER_EPOCH, 6, generator=g)
    return DataLoader(TensorDataset(x, x.sum(dim=1)), batch_size=BATCH, shuffle=False)


def _trainer(epochs, **kw):
    kw = {"enable_checkpointing": False, **kw}
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def _fit(module, epochs, ckpt_path=None, **kw):
    trainer = _trainer(epochs, **kw)
    trainer.fit(module, _data(), ckpt_path=ckpt_path)
    return trainer


def _oracle(kind, epochs, autocast_dtype=None):
    """The plain-PyTorch loop: the adapter (or aggregators.backward) and the optimizer."""
    net = TrunkHeads(6, 8, 3, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=0.05, weight_decay=0.01)
    method = _method(kind, net, autocast_dtype)
    state = None
    for _ in range(epochs):
        for x, y in _data():
            opt.zero_grad()
            if kind == "songoku":
                method.backward({n: (x, y) for n in SIGNS})
            elif kind == "gcond":
                batches = iter(_micro(x, y))
                method.backward(lambda b=batches: next(b))
            else:
                with torch.autocast(
                    "cpu", dtype=torch.bfloat16, enabled=autocast_dtype is not None
                ):
                    losses = _losses(net, x, y)
                state, _ = aggregators.backward(losses, net, "upgrad", state=state)
            opt.step()
    return net, method


def _state(method):
    return method.state_dict()


@pytest.mark.parametrize("kind", KINDS)
def test_lightning_steps_are_the_plain_loops_steps(kind):
    module = Multi(kind)
    _fit(module, 2)
    net, method = _oracle(kind, 2)
    assert tree_equal(dict(module.net.named_parameters()), dict(net.named_parameters()))
    if kind != "upgrad":
        assert tree_equal(_state(module.gradfn), _state(method))
    assert module.amp == (None, None) and len(module.logged) == 2 * PER_EPOCH
    assert all(isinstance(v, float) for v in module.logged[-1].values())
    assert module.logged[-1]  # the metrics of each method are logged


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_mixed_matches_the_plain_loop_under_autocast(kind):
    """gradfn's statistics run outside Lightning's autocast: only the task forwards are bf16."""
    module = Multi(kind)
    _fit(module, 1, precision="bf16-mixed")
    assert module.amp == (torch.bfloat16, None)
    net, method = _oracle(kind, 1, autocast_dtype=torch.bfloat16)
    assert tree_equal(dict(module.net.named_parameters()), dict(net.named_parameters()))
    losses = [v for k, v in module.logged[-1].items() if "loss" in k or "weight" in k]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
    if kind != "upgrad":
        state = _state(module.gradfn)
        assert tree_equal(state, _state(method))
        floats = [t for t in _leaves(state) if t.is_floating_point()]
        assert all(t.dtype != torch.bfloat16 and bool(torch.isfinite(t).all()) for t in floats)


@pytest.mark.parametrize(
    ("kind", "precision", "dtype"),
    [("songoku", "bf16-true", torch.bfloat16), ("gcond", "64-true", torch.float64),
     ("upgrad", "bf16-true", torch.bfloat16)],
)  # fmt: skip
def test_true_precisions_train_in_the_parameters_dtype(kind, precision, dtype):
    module = Multi(kind)
    _fit(module, 1, precision=precision)
    assert module.amp == (None, None) and next(module.parameters()).dtype == dtype
    first, last = module.logged[0], module.logged[-1]
    assert all(torch.isfinite(torch.tensor(v)) for k, v in last.items() if "loss" in k)
    start = TrunkHeads(6, 8, 3, seed=0).to(dtype)
    pairs = zip(module.net.parameters(), start.parameters(), strict=True)
    assert not all(torch.equal(p, q) for p, q in pairs) and first != last


def _leaves(tree):
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in _leaves(v)]
    return []


@pytest.mark.parametrize("kind", ["songoku", "gcond", "gradvac"])  # upgrad has no state
def test_resumed_from_a_trainer_checkpoint_equals_an_uninterrupted_run(kind, tmp_path):
    make = (lambda: Multi(kind)) if kind != "gradvac" else (lambda: _GradVac())
    whole = make()
    _fit(whole, 3)
    first = make()
    trainer = _fit(first, 2)
    path = tmp_path / "two.ckpt"
    trainer.save_checkpoint(path)
    assert "gradfn" in torch.load(path, weights_only=True)  # plain tensors and containers
    resumed = make()
    _fit(resumed, 3, ckpt_path=path)
    params = dict(resumed.named_parameters())
    assert tree_equal(params, dict(whole.named_parameters()))
    assert tree_equal(resumed.gradfn.state_dict(), whole.gradfn.state_dict())
    assert not tree_equal(params, dict(first.named_parameters()))  # it did train on


class _GradVac(Multi):
    """A stateful aggregator: its state (an EMA of cosines) must survive the checkpoint."""

    def __init__(self):
        super().__init__("upgrad")

    def configure_gradfn(self, autocast_dtype, scaler):
        return AggregatorBackward(self.net, "gradvac", task_names=list(SIGNS))


def test_a_gradscaler_plugin_scales_like_the_adapters_own_scaler():
    """'16-mixed' on a GPU: Lightning's MixedPrecision plugin with a GradScaler. On the CPU the
    plugin is built by hand (Trainer(precision='16-mixed') turns into bf16 there)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    def scaler():
        return torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)

    module = Multi("songoku")
    plugin = MixedPrecision("16-mixed", "cpu", scaler())
    _fit(module, 1, plugins=[plugin])
    assert module.amp == (torch.float16, plugin.scaler)
    net = TrunkHeads(6, 8, 3, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=0.05, weight_decay=0.01)
    own = scaler()
    sched = SonGokuScheduler(
        net, SPECS, opt, refresh_period=2, base_method="pcgrad",
        autocast_dtype=torch.float16, scaler=own,
    )  # fmt: skip
    for x, y in _data():
        sched.step({n: (x, y) for n in SIGNS})
    assert plugin.scaler.get_scale() == own.get_scale()
    assert tree_equal(dict(module.net.named_parameters()), dict(net.named_parameters()))


def test_an_aggregator_refuses_a_gradscaler():
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="16-mixed"):
        _fit(Multi("upgrad"), 1, plugins=[plugin])


def test_precision_kwargs_and_misuse():
    assert precision_kwargs(None) == {"autocast_dtype": None, "scaler": None}
    assert precision_kwargs(_trainer(1, precision="bf16-true"))["autocast_dtype"] is None

    class Bad(Multi):
        def configure_gradfn(self, autocast_dtype, scaler):
            return "upgrad"

    with pytest.raises(TypeError, match="configure_gradfn must return"):
        _fit(Bad("upgrad"), 1)

    class WithOptimizer(Multi):
        def configure_gradfn(self, autocast_dtype, scaler):
            return SonGokuScheduler(self.net, SPECS, torch.optim.SGD(self.parameters(), lr=0.1))

    with pytest.raises(ValueError, match="optimizer=None"):
        _fit(WithOptimizer("songoku"), 1)

    class TwoOptimizers(Multi):
        def configure_optimizers(self):
            return [torch.optim.SGD(self.parameters(), lr=0.1)] * 2

    with pytest.raises(ValueError, match="one optimizer, got 2"):
        _fit(TwoOptimizers("upgrad"), 1)

    class TupleMicroBatches(Multi):
        def training_step(self, batch, batch_idx):
            self.gradfn_step(tuple(_micro(*batch)))

    with pytest.raises(TypeError, match="list of accumulation_steps=3 micro-batches"):
        _fit(TupleMicroBatches("gcond"), 1)
    with pytest.raises(TypeError, match="`agg` must be"):
        AggregatorBackward(torch.nn.Linear(2, 2), 3)
    with pytest.raises(ValueError, match="not an AggregatorBackward state_dict"):
        AggregatorBackward(torch.nn.Linear(2, 2), "upgrad").load_state_dict({"version": 0})


def test_the_import_error_names_the_extra(monkeypatch):
    monkeypatch.delitem(sys.modules, "gradfn.integrations.lightning")
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "lightning.pytorch", None)
        with pytest.raises(ImportError, match=r'pip install "gradfn\[lightning\]"'):
            importlib.import_module("gradfn.integrations.lightning")
    # a Lightning older than the floor (no MixedPrecision, … under their 2.2 names)
    monkeypatch.setitem(sys.modules, "lightning.pytorch.plugins.precision", types.ModuleType("old"))
    with pytest.raises(ImportError, match=r"needs lightning>=2\.2, found 2\."):
        importlib.import_module("gradfn.integrations.lightning")


def test_clipping_in_on_before_optimizer_step_is_the_plain_loops_clipping():
    """Manual optimisation has no gradient_clip_val: the docs' recipe clips in the hook Lightning
    calls inside the optimizer step, between gradfn's backward and the update."""

    class Clipped(Multi):
        def on_before_optimizer_step(self, optimizer):
            self.clip_gradients(optimizer, gradient_clip_val=1e-2, gradient_clip_algorithm="norm")

    module = Clipped("songoku")
    _fit(module, 1)
    net = TrunkHeads(6, 8, 3, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=0.05, weight_decay=0.01)
    sched = _method("songoku", net)
    unclipped = []
    for x, y in _data():
        opt.zero_grad()
        sched.backward({n: (x, y) for n in SIGNS})
        unclipped.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), 1e-2)))
        opt.step()
    assert min(unclipped) > 1e-2  # the clip did act
    assert tree_equal(dict(module.net.named_parameters()), dict(net.named_parameters()))


def test_gradfn_imports_without_lightning():
    """Lightning is an optional extra: ``import gradfn`` (integrations included) never loads it."""
    code = (
        "import sys, gradfn, gradfn.integrations, gradfn.adapters; "
        "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)

"""The WeightConstraint callback on LightningModules written here, not ours: the constraint after
every real optimizer step (automatic and manual optimization, any torch optimizer, accumulation, a
step the fp16 scaler skips), the network's certified bound logged, refusals in setup, its state."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from lipschitz_lightning import WeightConstraint
from lipschitz_lightning.constraints import SpectralNormalize, SpectralSoftCap, SvdCap
from lipschitz_lightning.core.bounds import rms_norm
from lipschitz_lightning.errors import ConfigError
from lipschitz_lightning.models.protocol import NotCertifiable, PlainNetwork

W_MAX = 1.0


def images(count: int = 64, seed: int = 0) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.rand(count, 3, 4, 4, generator=generator), torch.randint(0, 5, (count,), generator=generator))
    return torch.utils.data.DataLoader(data, batch_size=8)


class UsersModule(L.LightningModule):
    """A LightningModule as a user writes one: an nn.Sequential, torch's AdamW at a learning rate large
    enough to push every layer far past w_max within a step."""

    def __init__(self, lr: float = 0.5, bias: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(48, 32, bias=bias), nn.ReLU(), nn.Linear(32, 32, bias=bias), nn.ReLU(),
                                 nn.Linear(32, 5, bias=bias))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class NormsAfterEveryStep(L.Callback):
    """Records every linear layer's RMS->RMS norm right after each optimizer step: its hook is
    registered after the constraint's (callbacks start in order), so it sees the projected weights."""

    def __init__(self):
        self.history: list[list[float]] = []
        self.steps: list[int] = []

    def on_train_start(self, trainer, pl_module):
        for optimizer in trainer.optimizers:
            optimizer.register_step_post_hook(lambda *args: self.record(trainer, pl_module))

    def record(self, trainer, pl_module):
        self.steps.append(trainer.global_step)
        self.history.append([rms_norm(m.weight) for m in pl_module.modules() if isinstance(m, nn.Linear)])


def trainer(*callbacks, **settings) -> L.Trainer:
    return L.Trainer(**{"accelerator": "cpu", "max_steps": 6, "logger": False, "enable_checkpointing": False,
                        "enable_progress_bar": False, "enable_model_summary": False, "callbacks": list(callbacks), **settings})


def test_a_users_module_with_torch_adamw_and_accumulation_stays_in_the_ball_after_every_step():
    module, recorder = UsersModule(), NormsAfterEveryStep()
    fit = trainer(WeightConstraint(SpectralSoftCap(w_max=W_MAX)), recorder, accumulate_grad_batches=2, max_steps=4)
    fit.fit(module, images())
    assert recorder.steps == [0, 1, 2, 3]  # once per real step, not per micro-batch
    reached = max(max(norms) for norms in recorder.history)
    print(f"\nlargest RMS->RMS norm after any of 4 AdamW steps: {reached:.6f}")
    assert reached <= W_MAX * (1 + 1e-5)
    assert min(recorder.history[-1]) >= 0.9 * W_MAX  # the cap binds: without it AdamW at lr 0.5 leaves the ball
    unconstrained = UsersModule()
    trainer(max_steps=4).fit(unconstrained, images())
    assert max(rms_norm(m.weight) for m in unconstrained.net if isinstance(m, nn.Linear)) > 2 * W_MAX


def test_the_bound_of_a_plain_network_is_logged_and_biases_are_left_alone(caplog):
    module = UsersModule(bias=True)
    fit = trainer(WeightConstraint(SvdCap(w_max=W_MAX)), max_steps=3, val_check_interval=3, limit_val_batches=2)
    with caplog.at_level("INFO", logger="lipschitz_lightning"):
        fit.fit(module, images(), images(16, seed=1))
    plain = PlainNetwork(module.net)
    assert fit.callback_metrics["lipschitz/bound"] == pytest.approx(plain.certified_bound(), rel=1e-6)
    assert plain.certified_bound() == pytest.approx(math.prod(rms_norm(m.weight) for m in module.net if isinstance(m, nn.Linear)))
    assert plain.certified_bound() <= W_MAX**3 * (1 + 1e-5)
    assert "3 parameters left alone" in caplog.text and "net.1.bias" in caplog.text
    # a bias moves no difference: the bound holds for pairs of inputs
    x = torch.rand(256, 3, 4, 4)
    y = x + 0.01 * torch.randn_like(x)
    with torch.no_grad():
        ratio = (module.net(x) - module.net(y)).pow(2).mean(1).sqrt() / (x - y).flatten(1).pow(2).mean(1).sqrt()
    assert float(ratio.max()) <= plain.certified_bound() * (1 + 1e-5)


class TwoOptimizers(UsersModule):
    """Manual optimization, each layer its own optimizer (SGD and AdamW), stepped one after the other."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        x, y = batch
        for optimizer in (first, second):
            optimizer.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(self.net(x), y))
            optimizer.step()

    def configure_optimizers(self):
        linear = [m for m in self.net if isinstance(m, nn.Linear)]
        return torch.optim.SGD(linear[0].parameters(), lr=5.0), torch.optim.AdamW([p for m in linear[1:] for p in m.parameters()], lr=0.5)


def test_manual_optimization_with_two_optimizers_projects_what_each_one_stepped():
    module, recorder = TwoOptimizers(), NormsAfterEveryStep()
    constraint = WeightConstraint(SpectralNormalize(w_max=W_MAX))
    trainer(constraint, recorder, max_steps=6).fit(module, images())
    assert len(recorder.history) == 6  # Lightning counts both optimizers' steps: 3 batches of two steps each
    assert constraint.projection.steps_applied == 6
    assert max(max(norms) for norms in recorder.history) <= W_MAX * 1.01  # spectral_normalize: power iteration (docs/constraints.md)


class SkipsAStep(UsersModule):
    """At step 2 the loss is infinite: the scaler finds inf gradients and skips the optimizer's step."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.global_step == 2 else loss


def test_a_step_the_fp16_scaler_skips_is_not_projected():
    module = SkipsAStep()
    constraint = WeightConstraint(SpectralSoftCap(w_max=W_MAX))
    weights = []
    watcher = L.Callback()
    watcher.on_train_batch_end = lambda trainer, pl_module, *args: weights.append([p.detach().clone() for p in pl_module.parameters()])
    # Lightning's 16-mixed on a CPU has no scaler: the test gives it torch's, as on a GPU
    precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer(constraint, watcher, max_steps=5, plugins=[precision]).fit(module, images())
    assert constraint.projection.steps_applied == 4  # 5 batches, the third skipped
    assert all(torch.equal(a, b) for a, b in zip(weights[1], weights[2]))  # neither stepped nor projected


def test_what_the_callback_cannot_hold_is_refused_in_setup_with_one_line():
    callback = WeightConstraint(SpectralSoftCap(w_max=W_MAX))
    with pytest.raises(ConfigError, match=r"trainer\.precision=bf16-true") as error:
        callback.setup(SimpleNamespace(strategy=None, precision="bf16-true"), None, "fit")
    assert "\n" not in str(error.value)
    fsdp = FSDPStrategy.__new__(FSDPStrategy)  # constructed bare: no GPU here
    with pytest.raises(ConfigError, match="FSDPStrategy"):
        callback.setup(SimpleNamespace(strategy=fsdp, precision="32-true"), None, "fit")
    callback.setup(SimpleNamespace(strategy=fsdp, precision="bf16-true"), None, "validate")  # only fitting projects
    with pytest.raises(ConfigError, match="bf16-true"):
        trainer(callback, precision="bf16-true").fit(UsersModule(), images())


def test_its_state_is_the_callbacks_and_a_checkpoint_of_the_earlier_layout_loads(tmp_path):
    callback = WeightConstraint(SpectralNormalize(w_max=W_MAX))
    fit = trainer(callback, max_steps=2, enable_checkpointing=True, default_root_dir=tmp_path)
    fit.fit(UsersModule(), images())
    path = tmp_path / "saved.ckpt"
    fit.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["callbacks"]["WeightConstraint"]
    assert state["steps_applied"] == 2 and len(state["power_states"]) == 3
    restored = WeightConstraint(SpectralNormalize(w_max=W_MAX))
    restored.load_state_dict(state)
    assert all(torch.equal(restored.projection.power_states[k], v) for k, v in state["power_states"].items())
    # a checkpoint written while the modules projected themselves keeps the same state under "projection"
    earlier = WeightConstraint(SpectralNormalize(w_max=W_MAX))
    earlier.on_load_checkpoint(None, None, {"projection": state, "callbacks": {}})
    assert earlier.projection.steps_applied == 2 and set(earlier.projection.power_states) == set(state["power_states"])


def test_a_network_with_a_layer_of_unknown_slope_has_no_bound_and_says_which():
    with pytest.raises(NotCertifiable, match=r"1 \(Softmax\)"):
        PlainNetwork(nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=-1)))
    with pytest.raises(NotCertifiable, match="not an nn.Sequential"):
        PlainNetwork(nn.Linear(4, 4))

"""The constraint as a Lightning callback, for any LightningModule (the design card's shape).

    from lipschitz_lightning import WeightConstraint
    from lipschitz_lightning.constraints import SpectralSoftCap

    trainer = L.Trainer(callbacks=[WeightConstraint(SpectralSoftCap(w_max=1.0))])

After every optimizer step, every weight is projected (SPEC §3 step 4). The maths is
``core.projection.Projection``'s; this file only decides when it runs and what it logs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from lipschitz_lightning.core.constraints import Constraint
from lipschitz_lightning.core.projection import Projection
from lipschitz_lightning.core.roles import specs_by_module_type
from lipschitz_lightning.errors import ConfigError
from lipschitz_lightning.models.protocol import LipschitzNetwork, NotCertifiable, lipschitz_network

log = logging.getLogger("lipschitz_lightning")

# Strategies that shard or own the weights (a rank holds a piece of a matrix, or an engine steps
# them): a spectral norm needs the whole matrix where the projection runs.
SHARDED_WEIGHTS = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)
HALF_WEIGHTS = ("16-true", "bf16-true", "transformer-engine", "transformer-engine-float16")


class WeightConstraint(Callback):
    """Applies ``constraint`` to every weight after every optimizer step, and logs the network's
    exact layer norms (``norm/<name>``) and certified Lipschitz bound (``lipschitz/bound``) at every
    validation.

    It hooks each optimizer's own ``step`` (``register_step_post_hook``, through ``Projection.attach``),
    so it holds under automatic and manual optimization, with any torch optimizer and several of
    them, once per real step under ``accumulate_grad_batches``, not at all for a step that the
    ``16-mixed`` scaler skipped, under DDP (every rank projects the same bits), and inside Muon's
    sharded step. It reads each step's ``lr`` (and decoupled decay) from the optimizer's group: the
    soft cap's coupling needs them, and the scheduler moves on only after the hook.

    Which weights: ``weights`` (parameter names) when given; else the network's own ``param_specs()``
    (``models.protocol.LipschitzNetwork``: roles, head, embeddings, target norms); else every
    ``nn.Linear`` weight (a matrix, capped in RMS->RMS units) and ``nn.Embedding`` (token vectors),
    with one line naming what is left alone. The network is ``pl_module.<network>`` (default: ``net``,
    else the module's only child, else the module itself). Its bound is logged where it has one: its
    own ``certified_bound()``, or a plain ``nn.Sequential``'s (``models.protocol.PlainNetwork``).

    Refused in ``setup``, with one line: strategies that shard the weights (FSDP, DeepSpeed) and
    half-precision weights (``16-true``, ``bf16-true``): rounding a projected weight to 16 bits can
    push it past ``w_max``. The power-iteration vectors and the guards' fallback count are this
    callback's ``state_dict`` (a checkpoint written before the callback existed keeps them under
    ``"projection"``, and still loads).
    """

    def __init__(self, constraint: Constraint, weights: Sequence[str] | None = None, network: str | None = None):
        self.constraint = constraint
        self.weights = list(weights) if weights is not None else None
        self.network = network
        self.projection = Projection(constraint)
        self.last_validated_step: int | None = None
        self._certified: LipschitzNetwork | None = None
        self._validated: dict | None = None  # this validation's norms and bound, once its first batch ran

    @property
    def state_key(self) -> str:
        return "WeightConstraint"  # the key checkpoints of earlier versions keep this state under

    # ------------------------------------------------------------------ what it cannot handle

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.constraint.active:
            return
        if isinstance(trainer.strategy, SHARDED_WEIGHTS):
            raise ConfigError(f"WeightConstraint cannot run under {type(trainer.strategy).__name__}: it shards or owns the "
                              f"weights, and a spectral norm needs whole matrices; use DDP (trainer=ddp)")
        precision = str(trainer.precision)
        if precision in HALF_WEIGHTS:
            raise ConfigError(f"WeightConstraint needs float32 weights, got trainer.precision={precision}: rounding a projected "
                              f"weight to 16 bits can push it past w_max (use bf16-mixed or 16-mixed)")

    # ------------------------------------------------------------------ the weights and the hooks

    def network_of(self, pl_module: L.LightningModule) -> nn.Module:
        if self.network is not None:
            return getattr(pl_module, self.network)
        if isinstance(getattr(pl_module, "net", None), nn.Module):
            return pl_module.net
        children = list(pl_module.children())
        return children[0] if len(children) == 1 else pl_module

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = self.network_of(pl_module)
        if self.weights is not None:
            specs, _ = specs_by_module_type(pl_module, self.weights)
        elif isinstance(net, LipschitzNetwork):
            specs = net.param_specs()
        else:
            specs, skipped = specs_by_module_type(pl_module)
            if skipped and self.constraint.active and trainer.is_global_zero:
                log.info(f"WeightConstraint: {len(skipped)} parameters left alone (not nn.Linear or nn.Embedding weights): "
                         f"{', '.join(skipped[:6])}{', ...' if len(skipped) > 6 else ''}")
        self.projection.attach(trainer.optimizers, specs)
        if trainer.global_step == 0:
            self.projection.scale_into_ball()
        try:
            self._certified = lipschitz_network(net)
        except NotCertifiable as reason:
            self._certified = None
            if trainer.is_global_zero:
                log.info(f"WeightConstraint: no certified bound is logged: {reason}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.projection.detach()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.projection.detach()

    # ------------------------------------------------------------------ what it logs

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        # The norms of the weights this validation runs with, taken at its first batch: by then a
        # weight-averaging callback (EMA) has swapped its weights in, whatever the callbacks' order.
        if self._validated is not None or trainer.sanity_checking:
            return
        certified = self._certified if self._certified is not None else _certifiable(self.network_of(pl_module))
        if certified is None or not trainer.is_global_zero:
            # the weights are identical on every rank: at NanoGPT scale 73 exact norms are worth computing once
            self._validated = {}
            return
        norms = certified.layer_norms()
        self._validated = {f"norm/{name}": value for name, value in norms.items()}
        paper_formula = getattr(certified, "paper_formula_bound", None)
        if paper_formula is not None:
            # SPEC §7's formula, for comparison with the paper's numbers: not a certificate
            self._validated["lipschitz/bound_paper_formula"] = paper_formula(norms)
        self._validated["lipschitz/bound"] = certified.certified_bound(norms)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.last_validated_step = trainer.global_step
        if self.projection.stacks:
            # every rank calls the reduction; the guards' fallbacks are counted where they were decided
            count = torch.tensor(float(self.projection.fallback_count()), device=pl_module.device)
            pl_module.log("constraint/guard_fallbacks", trainer.strategy.reduce(count, reduce_op="sum"), rank_zero_only=True)
        metrics, self._validated = self._validated or {}, None
        if "lipschitz/bound" in metrics:
            pl_module.log("lipschitz/bound", metrics.pop("lipschitz/bound"), rank_zero_only=True, prog_bar=True)
            pl_module.log_dict(metrics, rank_zero_only=True)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return self.projection.state_dict()  # a collective under DDP: every rank saves

    def load_state_dict(self, state_dict: dict) -> None:
        self.projection.load_state_dict(state_dict)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # checkpoints written while the module applied the projection itself keep its state here
        if self.state_key not in (checkpoint.get("callbacks") or {}) and checkpoint.get("projection") is not None:
            self.projection.load_state_dict(checkpoint["projection"])


def _certifiable(net: nn.Module) -> LipschitzNetwork | None:
    try:
        return lipschitz_network(net)
    except NotCertifiable:
        return None

"""``trainer=ddp``'s strategy: Lightning's DDP, without DDP's gradient all-reduce for the weights
whose optimizer reduces their gradients itself (Muon's sharded step, ``core.sharding.ShardedStep``).

DDP would all-reduce every gradient (every rank receives all of them) and the sharded step would
then reduce-scatter them again; here the sharded step's reduce-scatter is the only gradient
traffic. If some weight is stepped by another optimizer (none in this project's models), DDP
wraps the model as usual and the sharded steps take the averaged gradients.
Everything else (processes, launch, metric syncs, checkpoints) is Lightning's ``DDPStrategy``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn


class ShardedStepDDP(DDPStrategy):
    def configure_ddp(self) -> None:
        # deferred to setup: whether DDP must reduce anything is known once the optimizers exist
        pass

    def setup(self, trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        sharded = [o for o in self.optimizers if getattr(o, "shards_its_step", False)]
        covered = {id(p) for optimizer in sharded for group in optimizer.param_groups for p in group["params"]}
        if any(p.requires_grad and id(p) not in covered for p in self.model.parameters()):
            # some weight is stepped outside a sharded step: DDP reduces every gradient, and the
            # sharded steps take theirs averaged already (reduce_gradients stays False)
            super().configure_ddp()
            return
        for optimizer in sharded:
            optimizer.reduce_gradients = True
        # every rank starts from rank 0's weights, as DDP's constructor would make sure
        with torch.no_grad():
            for tensor in [*self.model.parameters(), *self.model.buffers()]:
                dist.broadcast(tensor.data, src=0)

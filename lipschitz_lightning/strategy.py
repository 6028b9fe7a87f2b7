"""``trainer=ddp``'s strategy: Lightning's DDP, without DDP's gradient all-reduce for the weights
whose optimizer reduces their gradients itself (Muon's sharded step, ``distributed.ShardedStep``).

DDP would all-reduce every gradient (every rank receives all of them) and the sharded step would
then reduce-scatter them again; here the sharded step's reduce-scatter is the only gradient
traffic. Weights that no such optimizer steps (none in this project's models) stay under DDP.
Everything else (processes, launch, metric syncs, checkpoints) is Lightning's ``DDPStrategy``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.nn.parallel import DistributedDataParallel


class ShardedStepDDP(DDPStrategy):
    def configure_ddp(self) -> None:
        # deferred to setup: which weights DDP must reduce is known once the optimizers exist
        pass

    def setup(self, trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        reduced_by_optimizer: set[int] = set()
        for optimizer in self.optimizers:
            if getattr(optimizer, "shards_its_step", False) and hasattr(optimizer, "reduce_gradients"):
                optimizer.reduce_gradients = True
                reduced_by_optimizer |= {id(p) for group in optimizer.param_groups for p in group["params"]}
        rest = [p for p in self.model.parameters() if p.requires_grad and id(p) not in reduced_by_optimizer]
        if rest:
            ignored = [name for name, p in self.model.named_parameters() if id(p) in reduced_by_optimizer]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, ignored)
            super().configure_ddp()
        # every rank starts from rank 0's weights, as DDP's constructor makes sure for its own
        with torch.no_grad():
            for tensor in [*self.model.parameters(), *self.model.buffers()]:
                dist.broadcast(tensor.data, src=0)

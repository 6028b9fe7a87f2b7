"""Share per-matrix work out across data-parallel ranks (modded-nanogpt's distributed Muon).

Every rank holds the same weights and, after DDP's gradient all-reduce, the same gradients. So
rather than every rank orthogonalizing (or projecting) every matrix, rank ``r`` computes a
contiguous share of a stack of same-shape matrices and one all-gather gives every rank all the
results: bit-identical copies, so the ranks' weights never drift apart.

Without ``torch.distributed`` initialised (one process) this is a plain function call.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(output: Tensor, local: Tensor) -> None:
    if local.device.type == "cpu" and dist.get_backend() == "gloo":
        # gloo has no all_gather_into_tensor; the list form fills the same buffer
        dist.all_gather(list(output.chunk(dist.get_world_size())), local)
    else:
        dist.all_gather_into_tensor(output, local)


def stack(tensors: list[Tensor]) -> Tensor:
    """``torch.stack``, but a view (no copy) for the common stack of one (the MLP's layers)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def shared_out(count: int, compute: Callable[[slice], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    """``compute(rows)`` for ``rows = slice(0, count)``, each rank computing its share.

    ``compute(rows)`` returns tensors whose first dimension has one entry per row. Rank ``r`` of
    ``w`` computes rows ``[r p, (r + 1) p)`` with ``p = ceil(count / w)`` (the last share may be
    short or empty, then padded with zeros), and the shares are all-gathered in rank order.
    """
    rank, world = rank_and_world()
    if world == 1 or count == 0:
        return compute(slice(0, count))
    share = math.ceil(count / world)
    start, stop = min(rank * share, count), min((rank + 1) * share, count)
    # every rank runs compute, on an empty share if need be, to learn the outputs' shapes and dtypes
    mine = compute(slice(start, stop))
    gathered = []
    for local in mine:
        boolean = local.dtype == torch.bool  # NCCL has no bool: travel as bytes
        local = local.to(torch.uint8) if boolean else local
        padded = local.new_zeros((share, *local.shape[1:]))
        padded[: stop - start] = local
        output = local.new_empty((share * world, *local.shape[1:]))
        _all_gather(output, padded.contiguous())
        gathered.append(output[:count].bool() if boolean else output[:count])
    return tuple(gathered)

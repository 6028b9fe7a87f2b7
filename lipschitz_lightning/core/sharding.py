"""Data parallelism without replicated optimizer work (modded-nanogpt's distributed Muon), for the
optimizer step and the constraint's projection alike. Pure torch (``torch.distributed``).

Every rank computes the gradients of its own batch. Then, once per optimizer step:

1. one reduce-scatter of every gradient: rank ``r`` receives the summed gradients of what it owns;
2. each rank steps (momentum, Newton-Schulz, Adam) and projects (the constraint) what it owns;
3. one all-gather of the updated weights: every rank holds every weight again, the same bits.

No rank does another's work and no gradient travels twice (DDP's all-reduce would send every
gradient to every rank, and the ranks would then orthogonalize and project everything 8 times).

Who owns what (``ShardPlan``): a weight is owned whole by one rank, largest Newton-Schulz cost
first to the least loaded rank. A tall matrix larger than a rank's share of all the weights (the
NanoGPT's 50304 x 768 head and embedding: 38.6M elements each, against a share of 20.3M) is split
by rows instead, and its rows fill every rank up to the same size, so that the collectives' equal
chunks carry (almost) no padding. The work that couples the rows of a split matrix is the small
Gram matrix ``M^T M`` (768 x 768): it is summed across ranks (``constraints.RowShard``), the rest is
row by row.

Without ``torch.distributed`` initialised (one process) nothing here communicates.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from lipschitz_lightning.core.linalg import RowShard


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ----------------------------------------------------------------------------- collectives, counted


@dataclass
class Traffic:
    """Bytes this rank sends, per kind of collective, as a ring (bandwidth-optimal) algorithm sends
    them, NCCL's and gloo's for large buffers: a reduce-scatter or an all-gather of a buffer of ``B``
    bytes sends ``B (w - 1) / w``, an all-reduce twice that."""

    sent: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: float) -> None:
        self.sent[kind] = self.sent.get(kind, 0.0) + nbytes
        self.calls[kind] = self.calls.get(kind, 0) + 1

    @property
    def total(self) -> float:
        return sum(self.sent.values())


_traffic: list[Traffic] = []


@contextlib.contextmanager
def count_traffic() -> Iterator[Traffic]:
    """Count the bytes every collective of this module sends while the block runs."""
    traffic = Traffic()
    _traffic.append(traffic)
    try:
        yield traffic
    finally:
        _traffic.remove(traffic)


def _count(kind: str, nbytes: float) -> None:
    for traffic in _traffic:
        traffic.add(kind, nbytes)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """``tensor`` summed over all ranks, in place (and returned)."""
    _, world = rank_and_world()
    if world > 1:
        _count("all_reduce", 2 * tensor.numel() * tensor.element_size() * (world - 1) / world)
        dist.all_reduce(tensor)
    return tensor


def reduce_scatter_sum(output: Tensor, input: Tensor) -> None:
    """``output`` = this rank's chunk of ``input`` summed over all ranks."""
    world = dist.get_world_size()
    _count("reduce_scatter", input.numel() * input.element_size() * (world - 1) / world)
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(output, input)


def all_gather_into(output: Tensor, input: Tensor) -> None:
    """``output`` = every rank's ``input``, in rank order."""
    world = dist.get_world_size()
    _count("all_gather", output.numel() * output.element_size() * (world - 1) / world)
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(output, input)


def stack(tensors: list[Tensor]) -> Tensor:
    """``torch.stack``, but a view (no copy) for the common stack of one (the MLP's layers)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def shared_out(count: int, compute: Callable[[slice], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    """``compute(rows)`` for ``rows = slice(0, count)``, each rank computing its share, then one
    all-gather per output: for a projection after an optimizer that steps every weight on every
    rank (AdamW under DDP). ``compute(rows)`` returns tensors with one entry per row."""
    rank, world = rank_and_world()
    if world == 1 or count == 0:
        return compute(slice(0, count))
    share = math.ceil(count / world)
    start, stop = min(rank * share, count), min((rank + 1) * share, count)
    # every rank runs compute, on an empty share if need be, to learn the outputs' shapes and dtypes
    mine = compute(slice(start, stop))
    gathered = []
    for local in mine:
        padded = local.new_zeros((share, *local.shape[1:]))
        padded[: stop - start] = local
        output = local.new_empty((share * world, *local.shape[1:]))
        all_gather_into(output, padded.contiguous())
        gathered.append(output[:count])
    return tuple(gathered)


# ----------------------------------------------------------------------------- who owns what


@dataclass(frozen=True)
class Piece:
    """Rows ``rows`` of parameter ``index`` (all of it when ``rows`` is None)."""

    index: int
    rows: slice | None
    numel: int


def newton_schulz_cost(shape: Sequence[int]) -> float:
    """Newton-Schulz's FLOPs up to a constant: ``m^2 n`` for an ``m x n`` matrix, ``m <= n``
    (elements for anything that is not a matrix)."""
    if len(shape) != 2:
        return float(math.prod(shape))
    small, large = sorted(shape)
    return float(small) * small * large


@dataclass
class ShardPlan:
    """Which rank owns which weight, or which rows of it, and where each piece sits in the flat
    buffers the collectives move (rank ``r``'s pieces in ``[r S, (r + 1) S)``, ``S = segment``)."""

    shapes: list[tuple[int, ...]]
    world: int
    owner: list[int | None]  # the rank owning each parameter whole; None where it is split
    split_rows: dict[int, list[slice]]  # a split parameter's rows per rank (possibly empty)
    segments: list[list[Piece]]  # every rank's pieces, in buffer order
    segment: int  # elements per rank in the buffers (the largest rank's load)

    @classmethod
    def build(cls, shapes: Sequence[Sequence[int]], world: int) -> ShardPlan:
        shapes = [tuple(int(n) for n in shape) for shape in shapes]
        sizes = [math.prod(shape) for shape in shapes]
        share = math.ceil(sum(sizes) / world)
        # split: a tall matrix larger than a share (owned whole, it would leave its rank the padding)
        split = [i for i, shape in enumerate(shapes) if len(shape) == 2 and shape[0] > shape[1] and sizes[i] > share]
        owner: list[int | None] = [None] * len(shapes)
        load = [0] * world  # elements
        cost = [0.0] * world  # Newton-Schulz FLOPs
        for i in sorted((i for i in range(len(shapes)) if i not in split), key=lambda i: (-newton_schulz_cost(shapes[i]), i)):
            rank = min(range(world), key=lambda r: (cost[r], load[r], r))
            owner[i] = rank
            cost[rank] += newton_schulz_cost(shapes[i])
            load[rank] += sizes[i]
        # the split matrices' rows fill the ranks up to the same size, in order
        target = max(max(load), math.ceil(sum(sizes) / world))
        split_rows: dict[int, list[slice]] = {}
        for i in split:
            rows, width = shapes[i]
            counts = [0] * world
            for rank in range(world):
                counts[rank] = min(rows - sum(counts), max(0, target - load[rank]) // width)
            for extra in range(rows - sum(counts)):  # rounding leftovers: one row each to the emptiest ranks
                rank = min(range(world), key=lambda r: (load[r] + counts[r] * width, r))
                counts[rank] += 1
            starts = [sum(counts[:rank]) for rank in range(world)]
            split_rows[i] = [slice(starts[rank], starts[rank] + counts[rank]) for rank in range(world)]
            for rank in range(world):
                load[rank] += counts[rank] * width
        segments = [[] for _ in range(world)]
        for i in range(len(shapes)):  # parameter order within every segment
            if owner[i] is not None:
                segments[owner[i]].append(Piece(i, None, sizes[i]))
            else:
                for rank, rows in enumerate(split_rows[i]):
                    segments[rank].append(Piece(i, rows, (rows.stop - rows.start) * shapes[i][1]))
        return cls(shapes, world, owner, split_rows, segments, max(load))

    @property
    def split(self) -> list[int]:
        return sorted(self.split_rows)

    def padding(self) -> int:
        """Elements of the buffers that carry nothing (each rank's segment filled to the largest)."""
        return self.world * self.segment - sum(math.prod(shape) for shape in self.shapes)

    def pack(self, rank: int, tensors: Sequence[Tensor | None], out: Tensor) -> Tensor:
        """Rank ``rank``'s pieces of ``tensors`` (full-shaped, one per parameter; None: zeros) into
        ``out`` (``segment`` elements)."""
        offset = 0
        for piece in self.segments[rank]:
            tensor = tensors[piece.index]
            target = out[offset : offset + piece.numel]
            if tensor is None:
                target.zero_()
            else:
                target.copy_((tensor if piece.rows is None else tensor[piece.rows]).reshape(-1))
            offset += piece.numel
        out[offset:].zero_()
        return out

    def unpack(self, rank: int, segment: Tensor, tensors: Sequence[Tensor | None]) -> None:
        """Rank ``rank``'s pieces from its ``segment`` of a buffer into ``tensors`` (full-shaped;
        None: skipped)."""
        offset = 0
        for piece in self.segments[rank]:
            tensor = tensors[piece.index]
            if tensor is not None:
                target = tensor if piece.rows is None else tensor[piece.rows]
                target.copy_(segment[offset : offset + piece.numel].view(target.shape))
            offset += piece.numel

    def views(self, rank: int, segment: Tensor) -> list[Tensor]:
        """Rank ``rank``'s pieces as views into its ``segment``, each shaped as the piece."""
        views, offset = [], 0
        for piece in self.segments[rank]:
            shape = self.shapes[piece.index]
            if piece.rows is not None:
                shape = (piece.rows.stop - piece.rows.start, *shape[1:])
            views.append(segment[offset : offset + piece.numel].view(shape))
            offset += piece.numel
        return views

    def row_shard(self, index: int) -> RowShard:
        """How this process's rows of split parameter ``index`` reach the rest of the matrix."""
        return RowShard(self.shapes[index], all_reduce_sum)

    def ideal_bytes(self, element_size: int) -> float:
        """A reduce-scatter of every gradient and an all-gather of every weight, no padding."""
        total = sum(math.prod(shape) for shape in self.shapes) * element_size
        return 2 * total * (self.world - 1) / self.world


class ShardedStep:
    """The collectives of one sharded optimizer step over ``params`` (in a fixed order, the same on
    every rank): gradients in, weights out."""

    def __init__(self, params: Sequence[Tensor]):
        self.rank, self.world = rank_and_world()
        self.params = list(params)
        self.plan = ShardPlan.build([p.shape for p in self.params], self.world)
        self.dtype = self.params[0].dtype
        if any(p.dtype != self.dtype for p in self.params):
            raise ValueError("a sharded step moves one dtype of weights; got " + ", ".join(sorted({str(p.dtype) for p in self.params})))
        self.pieces = self.plan.segments[self.rank]
        self._indices = {id(p): index for index, p in enumerate(self.params)}

    def gradients(self, reduce: bool) -> list[Tensor]:
        """This rank's pieces of the gradients averaged over the ranks. ``reduce=False``: the
        gradients are averaged already (DDP's all-reduce ran), so this rank only takes its pieces."""
        device = self.params[0].device
        mine = torch.empty(self.plan.segment, dtype=self.dtype, device=device)
        grads = [p.grad for p in self.params]
        if not reduce:
            return self.plan.views(self.rank, self.plan.pack(self.rank, grads, mine))
        flat = torch.empty(self.world * self.plan.segment, dtype=self.dtype, device=device)
        for rank in range(self.world):
            self.plan.pack(rank, grads, flat[rank * self.plan.segment : (rank + 1) * self.plan.segment])
        reduce_scatter_sum(mine, flat)
        mine.div_(self.world)
        return self.plan.views(self.rank, mine)

    def share_weights(self) -> None:
        """Every rank's updated pieces to every rank: one all-gather."""
        segment = self.plan.segment
        mine = self.plan.pack(self.rank, self.params, torch.empty(segment, dtype=self.dtype, device=self.params[0].device))
        flat = torch.empty(self.world * segment, dtype=self.dtype, device=mine.device)
        all_gather_into(flat, mine)
        for rank in range(self.world):
            if rank != self.rank:
                self.plan.unpack(rank, flat[rank * segment : (rank + 1) * segment], self.params)

    def part(self, param: Tensor) -> slice | None | bool:
        """What this rank owns of ``param``: ``None`` all of it, a ``slice`` some rows (of a split
        matrix, maybe none), ``False`` nothing."""
        index = self.index(param)
        if self.plan.owner[index] is None:
            return self.plan.split_rows[index][self.rank]
        return None if self.plan.owner[index] == self.rank else False

    def row_shard(self, param: Tensor) -> RowShard:
        return self.plan.row_shard(self.index(param))

    def index(self, param: Tensor) -> int:
        return self._indices[id(param)]

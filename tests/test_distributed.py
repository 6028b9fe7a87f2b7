"""Distributed Muon and the sharded projection against one process, on two gloo ranks."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lipschitz_lightning.callbacks import WeightConstraint
from lipschitz_lightning.optim import Muon, ParamSpec, Role, param_groups

SHAPES = [(8, 12)] * 5 + [(12, 8)] * 2 + [(6, 6)]  # 5 matrices of one shape: shares of 3 and 2, one padded


def make_weights(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.nn.Parameter(torch.randn(*shape, generator=generator)) for shape in SHAPES]
    grads = [[torch.randn(*shape, generator=generator) for shape in SHAPES] for _ in range(3)]
    table = torch.nn.Parameter(torch.randn(9, 8, generator=generator))
    table_grads = [torch.randn(9, 8, generator=generator) for _ in range(3)]
    return weights, grads, table, table_grads


def run_steps(method: str):
    """Three Muon steps, each followed by the constraint's projection; returns the weights."""
    torch.set_num_threads(1)
    weights, grads, table, table_grads = make_weights()
    specs = [ParamSpec(f"w{i}", w, Role.HEAD if i == len(weights) - 1 else Role.HIDDEN, 0.5) for i, w in enumerate(weights)]
    specs.append(ParamSpec("embed", table, Role.EMBEDDING, 0.5))
    optimizer = Muon(param_groups(specs), lr=0.3, momentum=0.9, nesterov=True, adam_roles=["embedding"], adam_lr=0.05)
    constraint = WeightConstraint(method, w_max=0.8, head_w_max=0.6)
    constraint.scale_into_ball([optimizer])  # as on_train_start does
    for step in range(3):
        for w, g in zip(weights, grads[step]):
            w.grad = g.clone()
        table.grad = table_grads[step].clone()
        optimizer.step()
        constraint.project(optimizer)
    return [w.detach().clone() for w in weights] + [table.detach().clone()], constraint.projector


def worker(rank: int, world: int, init_file: str, out: str, method: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        weights, projector = run_steps(method)
        torch.save({"weights": weights, "states": projector.power_states, "fallbacks": int(projector.fallbacks)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_the_work_and_end_with_the_single_process_weights(tmp_path: Path):
    for method in ("spectral_soft_cap", "spectral_hammer"):
        out = tmp_path / method
        mp.spawn(worker, args=(2, str(tmp_path / f"init-{method}"), str(out), method), nprocs=2, join=True)
        ranks = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
        single, projector = run_steps(method)
        for a, b, expected in zip(ranks[0]["weights"], ranks[1]["weights"], single):
            assert torch.equal(a, b)  # bit-identical across ranks
            torch.testing.assert_close(a, expected, atol=1e-5, rtol=1e-5)
        # every rank holds every power-iteration vector (rank 0's checkpoint must resume all of them)
        assert sorted(ranks[0]["states"]) == sorted(ranks[1]["states"]) == sorted(projector.power_states)
        for name, state in projector.power_states.items():
            torch.testing.assert_close(ranks[1]["states"][name], state, atol=1e-5, rtol=1e-5)
        assert ranks[0]["fallbacks"] == ranks[1]["fallbacks"] == int(projector.fallbacks)


def test_the_rank_checksum_sees_a_one_ulp_difference():
    from lipschitz_lightning.callbacks import RankAgreement

    net = torch.nn.Linear(16, 8)
    before = RankAgreement.checksum(net)
    with torch.no_grad():
        net.weight[3, 5] = torch.nextafter(net.weight[3, 5], torch.tensor(float("inf")))
    assert RankAgreement.checksum(net) != before

"""The loops the benchmark times (``commands.benchmark``): the Lightning pipeline, a plain PyTorch
loop over the same model, optimizer, scheduler, batches and constraint, the step on several ranks
with its bytes counted, and the step's FLOPs beside the machine's GEMM peak.

Step times are the gaps between consecutive batch starts (so a step includes fetching the next
batch and every hook); the first ``WARMUP`` steps are left out.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lipschitz_lightning.commands.cli import quiet_known_warnings
from lipschitz_lightning.config.compose import compose_checked, register_resolvers
from lipschitz_lightning.commands.train import build
from lipschitz_lightning.core.losses import CrossEntropy
from lipschitz_lightning.core.projection import Projection, ShardsItsStep
from lipschitz_lightning.core.roles import param_groups
from lipschitz_lightning.core.sharding import count_traffic
from lipschitz_lightning.errors import (
    LipschitzLightningError,
)
from lipschitz_lightning.models.protocol import NextTokenModel
from lipschitz_lightning.step import StepResult, batch_loss, train_step, training_margin

WARMUP = 5  # the first steps pay for allocator growth and lazy initialisation, not for the loop

# The real pipeline minus what would only add noise to a timing: validation, checkpoints and the
# progress bar. The CSV logger stays, since every real run has one.
PIPELINE_OVERRIDES = [
    "callbacks.progress_bar=null",
    "callbacks.best_checkpoint=null",
    "callbacks.last_checkpoint=null",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "+trainer.enable_checkpointing=false",
    "+trainer.limit_val_batches=0",
    "logger=csv",
]


def compose_config(
    output_dir: str,
    steps: int,
    batch_size: int | None,
    constraint: str | None = None,
    experiment: str | None = None,
    extra: list[str] = (),
) -> DictConfig:
    overrides = [f"paths.output_dir={output_dir}", f"trainer.max_steps={steps}", *PIPELINE_OVERRIDES]
    if experiment is not None:
        overrides.append(f"experiment={experiment}")
    overrides += list(extra)
    if batch_size is not None:
        overrides.append(f"data.batch_size={batch_size}")
    if constraint is not None:
        overrides.append(f"constraint={constraint}")
    register_resolvers()
    return compose_checked("train", overrides)


def make_sync(device: torch.device):
    # CUDA kernels run asynchronously: without a sync the clock would time the launches only
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass
class Timing:
    stamps: list[float]  # perf_counter at every batch start, then once at the end of training
    projection_s: list[float] = field(default_factory=list)
    final_loss: float = float("nan")
    fit_s: float = float("nan")  # the whole trainer.fit call, setup and teardown included
    peak_memory_gib: float = float("nan")  # the device's peak allocated memory (CUDA only)
    subnormals: int = 0  # subnormal floats in the weights and the optimizer's state after the last step

    def quarter_steps(self) -> tuple[float, float]:
        """The median step of the first and of the last quarter of the loop (warm-up left out): a step
        that slows down as training goes on (subnormal floats) shows here."""
        times = self.step_times()
        quarter = max(1, len(times) // 4)
        return statistics.median(times[:quarter]), statistics.median(times[-quarter:])

    def step_times(self) -> list[float]:
        gaps = [b - a for a, b in zip(self.stamps[:-1], self.stamps[1:])]
        return gaps[WARMUP:] if len(gaps) > WARMUP else gaps

    def median_step(self) -> float:
        return statistics.median(self.step_times())

    def loop_s(self) -> float:
        return self.stamps[-1] - self.stamps[0]


# ---------------------------------------------------------------------------------- (a) pipeline


class StepClock(L.Callback):
    def __init__(self, sync):
        self.sync, self.stamps, self.last_loss = sync, [], float("nan")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sync()
        self.stamps.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.sync()
        self.stamps.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # the logged train/loss is only refreshed every log_every_n_steps; keep the one tensor
        # (no .item(): a host sync per step would distort the timing)
        self.last_loss = outputs["loss"]


def run_pipeline(cfg: DictConfig, sync) -> Timing:
    # a fresh log directory per run: the CSV logger warns about (and clears) one already used
    cfg = OmegaConf.merge(cfg, {"paths": {"output_dir": tempfile.mkdtemp(dir=cfg.paths.output_dir)}})
    torch.manual_seed(cfg.seed)  # build seeds again from cfg.seed; this is for symmetry with the plain loop
    run = build(cfg)
    clock = StepClock(sync)
    run.trainer.callbacks.append(clock)
    device = run.trainer.strategy.root_device
    reset_peak_memory(device)
    started = time.perf_counter()
    run.trainer.fit(run.module, datamodule=run.datamodule)
    fit_s = time.perf_counter() - started
    return Timing(clock.stamps, final_loss=float(clock.last_loss), fit_s=fit_s, peak_memory_gib=peak_memory_gib(device))


# ---------------------------------------------------------------------------------- (b) plain loop


def load_train_data(cfg: DictConfig):
    """The datamodule, set up for training: its own train loader gives the plain loop the
    pipeline's batches, and its on-device transform finishes them."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def train_batches(datamodule, device: torch.device):
    for x, y in datamodule.train_dataloader():
        yield datamodule.on_after_batch_transfer((x.to(device), y.to(device)), 0)


def autocast(cfg: DictConfig, device: torch.device):
    """The pipeline's mixed precision, for the plain loop (weights stay float32 in both)."""
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision in ("32", "32-true"):
        return contextlib.nullcontext()
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise LipschitzLightningError(f"trainer.precision={precision}: the benchmark's plain loop runs 32-true or bf16-mixed")


def plain_forward(cfg: DictConfig, net: torch.nn.Module):
    """What the module's training step calls: a language model's features (its loss takes the head
    itself, in chunks), another network's forward; compiled when the config says so."""
    forward = net.features if isinstance(net, NextTokenModel) else net
    return torch.compile(forward) if cfg.model.get("compile", False) else forward


def training_loss(cfg: DictConfig) -> CrossEntropy:
    """The run's loss (``conf/loss/``); plain cross-entropy for a config without one."""
    return instantiate(cfg.loss) if cfg.get("loss") is not None else CrossEntropy()


@dataclass
class PlainRun:
    """What the plain loop steps: the module's network, optimizer, scheduler, projection (attached to
    the optimizer's step, as the WeightConstraint callback attaches it) and loss, built from the
    same config, without Lightning."""

    net: torch.nn.Module
    forward: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    projection: Projection
    loss: CrossEntropy
    loss_chunk: int

    def step(self, x: torch.Tensor, y: torch.Tensor, progress: float) -> StepResult:
        return train_step(self.net, x, y, self.loss, self.optimizer, progress=progress, forward=self.forward,
                          loss_chunk=self.loss_chunk)


def plain_run(cfg: DictConfig, device: torch.device) -> PlainRun:
    torch.manual_seed(cfg.seed)
    net = instantiate(cfg.model.net).to(device)
    optimizer = instantiate(cfg.optimizer)(param_groups(net.param_specs()))
    scheduler = instantiate(cfg.scheduler)(optimizer) if cfg.get("scheduler") is not None else None
    projection = Projection(instantiate(cfg.constraint))
    projection.attach([optimizer], net.param_specs())  # it runs in the optimizer's step hook
    projection.scale_into_ball()
    return PlainRun(net, plain_forward(cfg, net), optimizer, scheduler, projection, training_loss(cfg), cfg.model.get("loss_chunk", 4096))


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def run_plain(cfg: DictConfig, datamodule, device: torch.device, sync, time_projection: bool = False) -> Timing:
    """``step.train_step`` in a loop: the Lightning module's training step and Lightning's automatic
    optimization, without Lightning."""
    run = plain_run(cfg, device)
    batches = train_batches(datamodule, device)
    steps = cfg.trainer.max_steps
    reset_peak_memory(device)

    projection_s = []
    if time_projection:
        project = run.projection.after_step

        def timed_projection(optimizer=None) -> None:
            sync()
            started = time.perf_counter()
            project(optimizer)
            sync()
            projection_s.append(time.perf_counter() - started)

        run.projection.after_step = timed_projection  # the optimizer's hook looks it up at every step

    stamps = []
    for step in range(steps):
        sync()
        stamps.append(time.perf_counter())
        x, y = next(batches)
        with autocast(cfg, device):
            result = run.step(x, y, step / steps)
        run.scheduler.step()
    sync()
    stamps.append(time.perf_counter())
    return Timing(stamps, projection_s, final_loss=result.loss.item(), peak_memory_gib=peak_memory_gib(device),
                  subnormals=subnormal_count(run.net, run.optimizer))


def subnormal_count(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Floats of the weights and the optimizer's state below the smallest normal number of their
    dtype (and not 0): what makes an x86 core's step several times slower (``flush_subnormals``)."""
    tensors = [p.detach() for p in net.parameters()]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
    return sum(int(((t.abs() > 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum()) for t in tensors)


# ---------------------------------------------------------------------------------- (c) communication


def communication_worker(rank: int, world: int, init_file: str, config: dict, steps: int, out: str) -> None:
    """One rank of ``--world-size``: the plain loop's step, its collectives counted by
    ``core.sharding.count_traffic`` and its optimizer step (projection included) timed."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    torch.distributed.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = OmegaConf.create(config)
        run = plain_run(cfg, device)
        optimizer = run.optimizer
        if isinstance(optimizer, ShardsItsStep) and optimizer.shards_its_step:  # no DDP wrapper, as with trainer=ddp's strategy
            optimizer.reduce_gradients = True
        batches, sync = train_batches(load_train_data(cfg), device), make_sync(device)
        sent, step_s, parts = [], [], []

        def counted(function):
            # the optimizer's step with the projection (inside the step when it is sharded, in its
            # hook otherwise), timed and its collectives counted
            def run_counted(*args, **kwargs):
                sync()
                started = time.perf_counter()
                with count_traffic() as traffic:
                    function(*args, **kwargs)
                sync()
                parts.append((time.perf_counter() - started, traffic.sent))
            return run_counted

        optimizer.step = counted(optimizer.step)
        for step in range(steps):
            parts.clear()
            x, y = next(batches)
            with autocast(cfg, device):
                run.step(x, y, step / steps)
            step_s.append(sum(seconds for seconds, _ in parts))
            sent.append({op: sum(counts.get(op, 0) for _, counts in parts) for op in {op for _, counts in parts for op in counts}})
        net = run.net
        if rank == 0:
            plan = optimizer.shard_plan if isinstance(optimizer, ShardsItsStep) else None
            element = next(net.parameters()).element_size()
            torch.save({"sent": sent, "step_s": step_s, "ideal": plan.ideal_bytes(element) if plan else float("nan"),
                        "padding": plan.padding() if plan else 0, "segment": plan.segment if plan else 0,
                        "backend": torch.distributed.get_backend()}, out)
    finally:
        torch.distributed.destroy_process_group()


def communication(cfg: DictConfig, world: int, steps: int) -> dict:
    """Bytes each rank sends per step in a ``world``-rank run of the step, beside the ideal: a
    reduce-scatter of every gradient and an all-gather of every weight, each ``(w - 1) / w`` of
    them (``core.sharding.Traffic`` counts as a ring collective sends)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="lipschitz-communication-") as scratch:
        out = str(Path(scratch) / "rank0.pt")
        config = OmegaConf.to_container(cfg, resolve=True)
        mp.spawn(communication_worker, args=(world, str(Path(scratch) / "init"), config, steps, out), nprocs=world, join=True)
        result = torch.load(out, weights_only=True)
    per_step = result["sent"][-1]  # every step sends the same
    total = sum(per_step.values())
    return {"world_size": world, "backend": result["backend"], "bytes_per_rank_per_step": per_step, "total_bytes": total,
            "ideal_bytes": result["ideal"], "vs_ideal": total / result["ideal"], "padding_elements": result["padding"],
            "optimizer_step_ms": median(result["step_s"][1:]) * 1e3}


# ---------------------------------------------------------------------------------- (d) roofline


def gemm_peak(net: torch.nn.Module, rows: int, device: torch.device, sync) -> dict[str, float]:
    """This machine's fp32 GEMM throughput (GFLOP/s, median of 10) on the step's largest layer shape
    (``rows`` x fanin @ fanin x fanout) and on 1024^3, through ``torch.mm``: the limit a step is
    measured against, read from the machine rather than from a datasheet."""
    layer = max((m for m in net.modules() if isinstance(m, torch.nn.Linear)), key=lambda m: m.weight.numel())
    shapes = {f"{rows}x{layer.in_features}x{layer.out_features}": (rows, layer.in_features, layer.out_features),
              "1024x1024x1024": (1024, 1024, 1024)}
    peaks = {}
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
        times = []
        for repeat in range(13):
            sync()
            started = time.perf_counter()
            a @ b
            sync()
            if repeat >= 3:
                times.append(time.perf_counter() - started)
        peaks[name] = 2 * m * k * n / statistics.median(times) / 1e9
    return peaks


def step_flops(cfg: DictConfig, datamodule, device: torch.device) -> dict[str, float]:
    """FLOPs of one step of the plain loop by phase, counted by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    run = plain_run(cfg, device)
    x, y = next(train_batches(datamodule, device))
    counts = {}
    with FlopCounterMode(display=False) as counter:
        loss = batch_loss(run.net, run.forward, x, y, run.loss, training_margin(run.net, run.loss), 0.0, run.loss_chunk).loss
    counts["forward"] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    counts["backward"] = counter.get_total_flops()
    run.projection.detach()  # counted on its own below
    with FlopCounterMode(display=False) as counter:
        run.optimizer.step()
    counts["optimizer"] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        run.projection.after_step(run.optimizer)
    counts["projection"] = counter.get_total_flops()
    counts["total"] = sum(counts.values())
    return {k: v / 1e9 for k, v in counts.items()}


# ---------------------------------------------------------------------------------- helpers


def quiet() -> None:
    # Lightning's banner ("GPU available ...", "max_steps reached") would bury the tables
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    quiet_known_warnings()
    # and Lightning's hints about the validation the timed runs turn off
    warnings.filterwarnings("ignore", message=r".*(limit_val_batches|val_dataloader).*")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------------- the parts


def framework_overhead(cfg: DictConfig, datamodule, device: torch.device, sync, repeats: int) -> dict:
    """Part 1: the pipeline against the plain loop, interleaved so that drifting machine load hits
    both, and in alternating order: the process's first run is the slowest (allocator, caches, clocks)."""
    pipeline, plain = [], []
    for repeat in range(repeats):
        for run_one in (("pipeline", "plain") if repeat % 2 == 0 else ("plain", "pipeline")):
            if run_one == "pipeline":
                pipeline.append(run_pipeline(cfg, sync))
            else:
                plain.append(run_plain(cfg, datamodule, device, sync))
        print(f"  repeat {repeat + 1}/{repeats}: pipeline {pipeline[-1].median_step() * 1e3:.2f} ms/step, "
              f"plain {plain[-1].median_step() * 1e3:.2f} ms/step", flush=True)
    pipeline_s = median([t.median_step() for t in pipeline])
    plain_s = median([t.median_step() for t in plain])
    steps = cfg.trainer.max_steps
    return {
        "pipeline_s_per_step": pipeline_s,
        "plain_s_per_step": plain_s,
        "ratio": pipeline_s / plain_s,
        "framework_overhead_pct": (pipeline_s / plain_s - 1) * 100,
        "pipeline_runs_s_per_step": [t.median_step() for t in pipeline],
        "plain_runs_s_per_step": [t.median_step() for t in plain],
        # mean over the whole loop, warm-up and any slow outlier steps included
        "pipeline_mean_s_per_step": median([t.loop_s() / steps for t in pipeline]),
        "plain_mean_s_per_step": median([t.loop_s() / steps for t in plain]),
        # trainer.fit minus the training loop: setup, configure_optimizers, teardown
        "pipeline_fit_outside_loop_s": median([t.fit_s - t.loop_s() for t in pipeline]),
        "pipeline_peak_memory_gib": max(t.peak_memory_gib for t in pipeline),
        "plain_peak_memory_gib": max(t.peak_memory_gib for t in plain),
        # the same seed, batches and steps: these should agree, or the comparison is unfair
        "pipeline_final_loss": pipeline[0].final_loss,
        "plain_final_loss": plain[0].final_loss,
        # a step that slows down as training goes on (subnormal floats: flush_subnormals) shows here
        "plain_first_quarter_s_per_step": plain[0].quarter_steps()[0],
        "plain_last_quarter_s_per_step": plain[0].quarter_steps()[1],
        "plain_subnormals_at_the_end": plain[0].subnormals,
    }


def constraint_costs(method_cfgs: dict[str, DictConfig], datamodule, device: torch.device, sync) -> dict:
    """Part 2: the projection's share of a plain step, per method, and the step against the same
    step unconstrained where ``none`` is among the methods."""
    costs = {}
    for method, method_cfg in method_cfgs.items():
        timing = run_plain(method_cfg, datamodule, device, sync, time_projection=True)
        step_s = timing.median_step()
        projection_s = median(timing.projection_s[WARMUP:])
        costs[method] = {"step_ms": step_s * 1e3, "projection_ms": projection_s * 1e3,
                         "share_pct": projection_s / step_s * 100, "peak_memory_gib": timing.peak_memory_gib}
        print(f"  {method}: {step_s * 1e3:.2f} ms/step", flush=True)
    if "none" in costs:
        for row in costs.values():
            row["vs_none"] = row["step_ms"] / costs["none"]["step_ms"]
    return costs

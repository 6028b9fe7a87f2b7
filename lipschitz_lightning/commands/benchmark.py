"""What the Lightning pipeline costs over a plain PyTorch loop, and what each constraint costs.

    LIPSCHITZ_DATA_DIR=../shared/data python -m lipschitz_lightning.benchmark
    python -m lipschitz_lightning.benchmark --steps 20 --repeats 1 --methods none svd_cap
    python -m lipschitz_lightning.benchmark --experiment shakespeare_gpt_cpu --steps 12 --methods
    python -m lipschitz_lightning.benchmark model.net.width=512 --experiment shakespeare_gpt_cpu  # overrides first

Part 1 trains the default config (MLP on CIFAR-10, Muon + spectral soft cap) or ``--experiment``
for ``--steps`` steps through ``commands.train.build`` + ``trainer.fit``, and through a plain loop over the same model,
optimizer, scheduler, batches and projection, alternating the two ``--repeats`` times (and which of
the two goes first). Part 2 runs the plain loop once per constraint method and times the projection
on its own, and its cost against ``none`` where ``none`` is among the methods. With
``--world-size N`` (N GPUs, or N CPU processes), part 3 runs the step on N ranks and counts the
bytes each rank sends per step, beside the ideal.

Step times are the gaps between consecutive batch starts (so a step includes fetching the next
batch and every hook); the first ``timing.WARMUP`` steps are left out and medians are reported.
The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import json
from argparse import Namespace

from lipschitz_lightning.errors import LipschitzLightningError, OneLineParser, exit_with


def read_arguments(argv: list[str] | None) -> tuple[OneLineParser, Namespace]:
    parser = OneLineParser(prog="python -m lipschitz_lightning.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (default 200)")
    parser.add_argument("--repeats", type=int, default=3, help="pipeline/plain pairs in part 1 (default 3)")
    parser.add_argument("--experiment", default=None, help="an experiment config to time instead of the default")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the timed config, e.g. model.net.width=512")
    parser.add_argument("--methods", nargs="*", default=None, metavar="METHOD",
                        help="constraint methods for part 2 (default: every one of conf/constraint; none given: skip)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    parser.add_argument("--no-roofline", dest="roofline", action="store_false", help="skip the FLOP count and the GEMM peak")
    parser.add_argument("--paper-ms-per-step", type=float, default=None, metavar="MS",
                        help="the paper's code's median step on the same config, measured on this machine in this sitting "
                             "(docs/paper_code_timing.md): printed beside the pipeline's, as a ratio")
    parser.add_argument("--world-size", type=int, default=1,
                        help="also run the step on this many ranks (GPUs with NCCL, else CPU processes with gloo) and count the "
                             "bytes each rank sends per step (default 1: no)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.paper_ms_per_step is not None and not args.paper_ms_per_step > 0:
        parser.error(f"--paper-ms-per-step must be a positive number of milliseconds, got {args.paper_ms_per_step}")
    if args.world_size < 1:
        parser.error(f"--world-size must be at least 1, got {args.world_size}")
    return parser, args


def measure(parser: OneLineParser, args: Namespace) -> dict:
    """Every part the arguments ask for; the numbers, as the JSON line prints them."""
    # torch and Lightning load here, once the arguments are read: a mistyped flag costs none of their import
    import tempfile

    import torch
    from hydra.utils import instantiate

    from lipschitz_lightning import CONF_DIR
    from lipschitz_lightning.commands import timing as T
    from lipschitz_lightning.commands.allocator import flush_subnormals, keep_freed_memory
    from lipschitz_lightning.config.settings import validate_config
    from lipschitz_lightning.config.tradeoff import constraint_name

    if args.steps <= T.WARMUP + 1:  # the warm-up belongs to the timed loops: known once they are imported
        parser.error(f"--steps must be more than {T.WARMUP + 1} (the first {T.WARMUP} steps are warm-up)")
    options = sorted(path.stem for path in (CONF_DIR / "constraint").glob("*.yaml"))
    methods = options if args.methods is None else args.methods
    unknown = [m for m in methods if m not in options]
    if unknown:
        parser.error(f"--methods: {', '.join(unknown)} is not a constraint method; one of {', '.join(options)}")
    if torch.cuda.is_available() and args.world_size > torch.cuda.device_count():
        parser.error(f"--world-size must be 1..{torch.cuda.device_count()} (one rank per GPU), got {args.world_size}")
    T.quiet()
    with tempfile.TemporaryDirectory(prefix="lipschitz-benchmark-") as output_dir:
        cfg = T.compose_config(output_dir, args.steps, args.batch_size, None, args.experiment, args.overrides)
        method_cfgs = {m: T.compose_config(output_dir, args.steps, args.batch_size, m, args.experiment, args.overrides) for m in methods}
        for checked in (cfg, *method_cfgs.values()):
            validate_config(checked)  # a bad setting is one line before any data is read
        if cfg.get("keep_freed_memory"):
            keep_freed_memory()  # as train.py does, before either loop runs
        if cfg.get("flush_subnormals"):
            flush_subnormals()
        datamodule = T.load_train_data(cfg)
        sample_x, _ = next(iter(datamodule.train_dataloader()))
        language_model = sample_x.ndim == 2
        items_per_step = sample_x.shape[0] * (sample_x.shape[1] if language_model else 1)

        # the device the pipeline picks (accelerator: auto), so the plain loop runs on the same one
        device = instantiate(cfg.trainer, logger=False).strategy.root_device
        sync = T.make_sync(device)
        T.autocast(cfg, device)  # a precision the plain loop cannot mirror stops here, before any run
        print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
              f"steps {args.steps} (first {T.WARMUP} not counted), batch {cfg.data.batch_size}, "
              f"{cfg.optimizer._target_.rsplit('.', 1)[-1]} + {constraint_name(cfg.constraint)}", flush=True)

        overhead = T.framework_overhead(cfg, datamodule, device, sync, args.repeats)
        overhead.update(items_per_step=items_per_step, items="tokens" if language_model else "examples",
                        pipeline_items_per_s=items_per_step / overhead["pipeline_s_per_step"],
                        plain_items_per_s=items_per_step / overhead["plain_s_per_step"])
        roofline = {}
        if args.roofline:
            flops = T.step_flops(cfg, datamodule, device)
            peaks = T.gemm_peak(instantiate(cfg.model.net), items_per_step if language_model else sample_x.shape[0], device, sync)
            roofline = {"gflop_per_step": flops, "gemm_peak_gflops": peaks,
                        "pipeline_gflops": flops["total"] / overhead["pipeline_s_per_step"],
                        "plain_gflops": flops["total"] / overhead["plain_s_per_step"]}
        methods_cost = T.constraint_costs(method_cfgs, datamodule, device, sync)
        communication = T.communication(cfg, args.world_size, min(args.steps, 3)) if args.world_size > 1 else None

    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "steps": args.steps,
        "warmup_steps": T.WARMUP,
        "repeats": args.repeats,
        "experiment": args.experiment,
        "batch_size": cfg.data.batch_size,
        **overhead,
        "roofline": roofline,
        "paper_ms_per_step": args.paper_ms_per_step,
        "methods": methods_cost,
        "communication": communication,
    }


def report(results: dict) -> None:
    """The tables a reader looks at; the JSON line after them has every number."""
    cuda = results["device"].startswith("cuda")
    ratio = results["ratio"]
    print()
    print("framework overhead (median over repeats of each run's median step)")
    print(f"  {'':<10}{'ms/step':>10}{'mean ms':>10}{'final loss':>12}")
    for name in ("pipeline", "plain"):
        print(f"  {name:<10}{results[f'{name}_s_per_step'] * 1e3:>10.2f}{results[f'{name}_mean_s_per_step'] * 1e3:>10.2f}"
              f"{results[f'{name}_final_loss']:>12.5f}")
    print(f"  ratio pipeline/plain {ratio:.3f}: framework cost {(ratio - 1) * 100:+.1f}%")
    print(f"  throughput: pipeline {results['pipeline_items_per_s']:.0f}, plain {results['plain_items_per_s']:.0f} "
          f"{results['items']}/s")
    if results["paper_ms_per_step"] is not None:
        print(f"  the paper's code, as measured here: {results['paper_ms_per_step']:.1f} ms/step -> the pipeline runs at "
              f"{results['paper_ms_per_step'] / (results['pipeline_s_per_step'] * 1e3):.2f}x its speed")
    print(f"  trainer.fit outside the training loop: {results['pipeline_fit_outside_loop_s']:.2f} s per run")
    if cuda:
        print(f"  peak memory: pipeline {results['pipeline_peak_memory_gib']:.2f} GiB, plain {results['plain_peak_memory_gib']:.2f} GiB")
    roofline = results["roofline"]
    if roofline:
        flops, peaks = roofline["gflop_per_step"], roofline["gemm_peak_gflops"]
        print()
        print("roofline (FLOPs of one step, counted by torch.utils.flop_counter)")
        print("  GFLOP per step: " + ", ".join(f"{k} {v:.3g}" for k, v in flops.items()))
        print(f"  achieved: pipeline {roofline['pipeline_gflops']:.0f} GFLOP/s, plain {roofline['plain_gflops']:.0f} GFLOP/s")
        print("  fp32 GEMM peak measured here (torch.mm): " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
              + f" GFLOP/s: the pipeline runs at {roofline['pipeline_gflops'] / max(peaks.values()):.0%} of it")
    print()
    print("constraint cost in the plain loop (medians)")
    print(f"  {'method':<24}{'step ms':>10}{'proj ms':>10}{'share %':>10}{'x none':>8}" + (f"{'peak GiB':>10}" if cuda else ""))
    for method, row in results["methods"].items():
        print(f"  {method:<24}{row['step_ms']:>10.2f}{row['projection_ms']:>10.3f}{row['share_pct']:>10.1f}{row.get('vs_none', float('nan')):>8.3f}"
              + (f"{row['peak_memory_gib']:>10.2f}" if cuda else ""))
    comm = results["communication"]
    if comm:
        print()
        print(f"communication on {comm['world_size']} ranks ({comm['backend']}), bytes each rank sends per step")
        for kind, nbytes in comm["bytes_per_rank_per_step"].items():
            print(f"  {kind:<16}{nbytes / 2**20:>12.3f} MiB")
        print(f"  {'total':<16}{comm['total_bytes'] / 2**20:>12.3f} MiB, ideal {comm['ideal_bytes'] / 2**20:.3f} MiB "
              f"(a reduce-scatter of every gradient, an all-gather of every weight): {comm['vs_ideal']:.3f}x")
        print(f"  optimizer step with its projection: {comm['optimizer_step_ms']:.2f} ms (median)")


def main(argv: list[str] | None = None) -> None:
    """The command: ``benchmark``, with a user's error as one line ``error: ...`` on stderr and exit status 1."""
    parser, args = read_arguments(argv)
    try:
        results = measure(parser, args)
    except LipschitzLightningError as error:
        exit_with(error)
    report(results)
    print()
    print(json.dumps(results))


if __name__ == "__main__":
    main()

"""The NanoGPT run's check on one GPU, ready for the first machine that has one.

    scripts/gpu_check.sh               # one GPU, full size: about 8 minutes on an H100
    scripts/gpu_check.sh --cpu-smoke   # the same code paths on a CPU at a tiny width: a few minutes
    scripts/gpu_check.sh --data DIR    # FineWeb shards from DIR (default: $LIPSCHITZ_DATA_DIR/fineweb10B
                                       # when it holds them, else random GPT-2 tokens written to a temp dir)

On a GPU, at the recipe's size (width 768, 12 blocks, 6 heads, 50304 tokens, sequences of 48k
tokens): 200 steps of Muon + soft cap through every window of the schedule with a validation on
one 262,144-token sequence at the end, eagerly and with model.compile=true, and 60 unconstrained
steps for the constrained/unconstrained ratio. It prints peak memory, ms per step, tokens/s, MFU
(against the measured bf16 GEMM peak and, for known GPUs, the datasheet's), the host syncs per
step, and fails (exit 1) on a compilation past the expected count or anything else that breaks.

With --cpu-smoke: compiled flex attention, forward only (torch has no flex backward on a CPU),
over every window of the recipe's schedule at both real sequence lengths, at a tiny width (a fixed
count of compilations, the same output as SDPA); then a few training steps of a tiny NanoGPT with
model.compile=true. The test suite runs it.

The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from lipschitz_lightning import CONF_DIR  # noqa: E402
from lipschitz_lightning.data.fineweb import DOCUMENT_START, write_shard  # noqa: E402
from lipschitz_lightning.models.gpt import AttentionMask, flex_attention, sdpa_attention  # noqa: E402

TRAIN_SEQ, VAL_SEQ = 48 * 1024, 4 * 64 * 1024  # the recipe's lengths
RECIPE_STEPS = 6200
# graphs a fresh process compiles: flex attention once per sequence length and grad mode (training,
# validation); compiled, the network's features take those two, and the loss and the rest stay eager
EXPECTED_GRAPHS = {"eager": 2, "compiled": 4}
# dense bf16 tensor-core FLOP/s from the vendors' datasheets (SXM parts, no sparsity)
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


class CheckFailed(Exception):
    pass


def synthetic_shards(directory: Path, train_tokens: int, val_tokens: int, vocab: int = 50257, document: int = DOCUMENT_START,
                     seed: int = 0) -> Path:
    """Random token ids below ``vocab`` in the FineWeb shard format, a ``document`` token every ~1000
    tokens: for speed and memory the values do not matter, the shapes and the masks do."""
    rng = np.random.default_rng(seed)
    for name, count in (("fineweb_train_000001.bin", train_tokens), ("fineweb_val_000000.bin", val_tokens)):
        tokens = rng.integers(0, vocab, count, dtype=np.int64)
        tokens[rng.random(count) < 1e-3] = document
        write_shard(directory / name, tokens.astype(np.uint16))
    return directory


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


# ---------------------------------------------------------------------------- compiled flex over the schedule


def flex_over_the_schedule(width: int, heads: int, device: torch.device) -> dict:
    """Every window of the recipe's schedule (long and short) at both sequence lengths, through the
    project's compiled flex attention, forward: the number of compilations must stay at 2."""
    from lipschitz_lightning.models import GPT

    net = GPT(vocab_size=16, width=width, num_heads=heads, num_blocks=2, seq_len=8, window_pattern="LS")
    windows = sorted({net.window_blocks(step / RECIPE_STEPS) for step in range(RECIPE_STEPS + 1)})
    before, started = graphs(), time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(0)
    for seq in (TRAIN_SEQ, VAL_SEQ):
        q, k, v = (torch.randn(1, heads, seq, width // heads, generator=generator, device=device) for _ in range(3))
        documents = (torch.rand(1, seq, generator=generator, device=device) < 1e-3).cumsum(-1)
        for window in windows:
            long = AttentionMask(documents, torch.tensor(window, dtype=torch.int32, device=device))
            for mask in (long, long.halved()):
                with torch.no_grad():
                    out = flex_attention(q, k, v, 0.2, mask)
                if not bool(torch.isfinite(out).all()):
                    raise CheckFailed(f"flex attention gave non-finite values at {seq} tokens, window {window}")
        if seq == TRAIN_SEQ:  # the same as SDPA with the same mask (the last window)
            with torch.no_grad():
                error = float((out - sdpa_attention(q, k, v, 0.2, mask)).abs().max())
            if error > 1e-3:
                raise CheckFailed(f"flex attention and SDPA differ by {error:.2e} at {seq} tokens")
    compiled = graphs() - before
    if compiled > 2:
        raise CheckFailed(f"flex attention compiled {compiled} graphs over the schedule, expected 2 (one per sequence length)")
    return {"windows": windows, "graphs": compiled, "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------- training runs


class StepClock(Callback):
    """Wall time from step ``first`` to step ``last`` (the device synchronised only there), and, on
    CUDA, the host syncs per step over the steps ``sync_window`` (torch's sync debug mode)."""

    def __init__(self, first: int, last: int, sync_window: tuple[int, int] | None):
        self.first, self.last, self.sync_window = first, last, sync_window
        self.stamps: dict[int, float] = {}
        self.syncs: float | None = None
        self._recording = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step, cuda = trainer.global_step, pl_module.device.type == "cuda"
        if step in (self.first, self.last):
            if cuda:
                torch.cuda.synchronize()
            self.stamps[step] = time.perf_counter()
        if self.sync_window is None or not cuda:
            return
        if step == self.sync_window[0]:
            self._recording = warnings.catch_warnings(record=True)
            self._caught = self._recording.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif step == self.sync_window[1] and self._recording is not None:
            torch.cuda.set_sync_debug_mode("default")
            syncs = sum("synchroniz" in str(w.message) for w in self._caught)
            self.syncs = syncs / (self.sync_window[1] - self.sync_window[0])
            self._recording.__exit__(None, None, None)
            self._recording = None


def train_once(name: str, overrides: list[str], steps: int, expected_graphs: int, sync_window: tuple[int, int] | None = None) -> dict:
    from hydra import compose, initialize_config_dir

    from lipschitz_lightning.config.compose import register_resolvers
    from lipschitz_lightning.commands.train import build, train

    register_resolvers()
    with tempfile.TemporaryDirectory(prefix="gpu-check-run-") as output_dir:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[*overrides, f"trainer.max_steps={steps}", f"paths.output_dir={output_dir}",
                                              "callbacks.progress_bar=null", "callbacks.last_checkpoint=null",
                                              "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"])
        run = build(cfg)
        first = min(20, steps // 4)
        clock = StepClock(first, steps - 1, sync_window)
        run.trainer.callbacks.append(clock)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        before, started = graphs(), time.perf_counter()
        summary = train(cfg, run)
        wall = time.perf_counter() - started
        compiled = graphs() - before
        if compiled > expected_graphs:
            raise CheckFailed(f"{name}: {compiled} graphs compiled, expected at most {expected_graphs}: something recompiles")
        step_s = (clock.stamps[steps - 1] - clock.stamps[first]) / (steps - 1 - first)
        tokens = cfg.data.seq_len * cfg.data.batch_size
        return {
            "name": name, "steps": steps, "wall_s": wall, "ms_per_step": step_s * 1e3, "tokens_per_s": tokens / step_s,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan"),
            "graphs": compiled, "val_loss": summary.get("val/loss"), "bound": summary.get("lipschitz/bound"),
            "syncs_per_step": clock.syncs, "net": dict(cfg.model.net), "mean_window_blocks": mean_window(cfg, first, steps),
        }


def mean_window(cfg, first: int, last: int) -> float:
    from lipschitz_lightning.models import GPT

    net = GPT(**{k: v for k, v in dict(cfg.model.net).items() if k != "_target_"} | {"vocab_size": 16, "seq_len": 8})
    return statistics.mean(net.window_blocks(step / last) for step in range(first, last))


def flops_per_step(result: dict, tokens: int) -> float:
    """6 N per token for the matrices (forward and backward) plus the attention's score and value
    products over the window's keys (12 d keys per token and layer), the long window in the blocks
    marked L and half of it in the others (document boundaries ignored: an upper bound)."""
    net = result["net"]
    width, blocks, vocab = net["width"], net["num_blocks"], net["vocab_size"]
    matrices = blocks * 12 * width * width + vocab * width
    pattern = net["window_pattern"]
    keys = sum((result["mean_window_blocks"] if letter == "L" else max(1.0, result["mean_window_blocks"] / 2)) * 128 - 64
               for letter in pattern)
    return tokens * (6 * matrices + 12 * width * keys)


def gemm_peak_bf16() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    times = []
    for repeat in range(12):
        torch.cuda.synchronize()
        started = time.perf_counter()
        a @ a
        torch.cuda.synchronize()
        if repeat >= 2:
            times.append(time.perf_counter() - started)
    return 2 * 8192**3 / statistics.median(times)


# ---------------------------------------------------------------------------- main


def shard_overrides(data: Path) -> list[str]:
    return ["optimizer=muon", "model=nanogpt", f"data.dir={data}", "trainer.devices=1", "trainer.log_every_n_steps=10"]


def gpu_check(data: Path | None, steps: int) -> dict:
    if not torch.cuda.is_available():
        raise CheckFailed("no CUDA device: run on a GPU machine, or scripts/gpu_check.sh --cpu-smoke")
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # a recompile storm fails here instead of falling back unfused
    with tempfile.TemporaryDirectory(prefix="gpu-check-data-") as scratch:
        if data is None:
            data = synthetic_shards(Path(scratch), (steps + 8) * TRAIN_SEQ + 2, VAL_SEQ + 2)
        full = [*shard_overrides(data), f"data.val_seq_len={VAL_SEQ}", f"data.val_tokens={VAL_SEQ}", "trainer.precision=bf16-mixed"]
        flex = flex_over_the_schedule(768, 6, torch.device("cuda"))
        eager = train_once("soft cap, eager", [*full, "constraint=spectral_soft_cap", f"trainer.val_check_interval={steps}"],
                           steps, EXPECTED_GRAPHS["eager"], sync_window=(100, 110))
        unconstrained = train_once("none, eager", [*full, "constraint=none", "trainer.val_check_interval=60"], 60, EXPECTED_GRAPHS["eager"])
        compiled = train_once("soft cap, model.compile=true", [*full, "constraint=spectral_soft_cap", "model.compile=true",
                                                               f"trainer.val_check_interval={steps}"], steps, EXPECTED_GRAPHS["compiled"])
    peak = gemm_peak_bf16()
    name = torch.cuda.get_device_name()
    datasheet = next((flops for key, flops in DATASHEET_BF16.items() if key in name), None)
    for result in (eager, unconstrained, compiled):
        achieved = flops_per_step(result, TRAIN_SEQ) / (result["ms_per_step"] / 1e3)
        result["mfu_vs_measured_gemm"] = achieved / peak
        result["mfu_vs_datasheet"] = achieved / datasheet if datasheet else None
    return {"device": name, "torch": torch.__version__, "bf16_gemm_tflops": peak / 1e12, "flex": flex,
            "runs": [eager, unconstrained, compiled], "constrained_over_unconstrained": eager["ms_per_step"] / unconstrained["ms_per_step"]}


def cpu_smoke() -> dict:
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    flex = flex_over_the_schedule(32, 2, torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="gpu-check-smoke-") as scratch:
        data = synthetic_shards(Path(scratch), 40_000, 4_000, vocab=512, document=0)
        tiny = [*shard_overrides(data), "trainer.accelerator=cpu", "data.seq_len=512", "data.val_seq_len=1024", "data.val_tokens=2048",
                "data.vocab_size=512", "model.net.vocab_size=512", "model.net.width=32", "model.net.num_heads=2",
                "model.net.num_blocks=2", "model.net.window_pattern=LS", "model.net.document_token=0", "constraint=spectral_soft_cap",
                "model.compile=true",
                "trainer.val_check_interval=4"]
        compiled = train_once("tiny, model.compile=true", tiny, 4, EXPECTED_GRAPHS["compiled"])
    if not math.isfinite(compiled["val_loss"] or math.nan):
        raise CheckFailed("the compiled tiny NanoGPT gave a non-finite validation loss")
    return {"device": "cpu", "torch": torch.__version__, "flex": flex, "runs": [compiled]}


def report(result: dict) -> None:
    print(f"\ndevice {result['device']}, torch {result['torch']}")
    flex = result["flex"]
    print(f"flex attention: {len(flex['windows'])} windows x (long, short) x {TRAIN_SEQ} and {VAL_SEQ} tokens: "
          f"{flex['graphs']} compilations, {flex['seconds']:.1f} s")
    for run in result["runs"]:
        mfu = run.get("mfu_vs_measured_gemm")
        print(f"{run['name']:<32} {run['ms_per_step']:9.1f} ms/step {run['tokens_per_s']:12.0f} tokens/s "
              f"peak {run['peak_memory_gib']:6.2f} GiB  graphs {run['graphs']}  val loss {run['val_loss']:.4f}"
              + (f"  MFU {mfu:.1%} of the measured bf16 GEMM" if mfu is not None else "")
              + (f" ({run['mfu_vs_datasheet']:.1%} of the datasheet)" if run.get("mfu_vs_datasheet") else "")
              + (f"  host syncs/step {run['syncs_per_step']:.1f}" if run.get("syncs_per_step") is not None else ""))
    if "constrained_over_unconstrained" in result:
        print(f"constrained / unconstrained step: {result['constrained_over_unconstrained']:.3f}  "
              f"(bf16 GEMM measured: {result['bf16_gemm_tflops']:.0f} TFLOP/s)")
    for run in result["runs"]:
        run.pop("net", None)
    print(json.dumps(result, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="the same code paths on a CPU, tiny")
    parser.add_argument("--data", type=Path, default=None, help="a folder of fineweb_{train,val}_*.bin shards")
    parser.add_argument("--steps", type=int, default=200, help="constrained steps per run on the GPU (default 200)")
    args = parser.parse_args()
    data = args.data
    if data is None and not args.cpu_smoke:
        default = Path(os.environ.get("LIPSCHITZ_DATA_DIR") or REPO / "data") / "fineweb10B"
        data = default if list(default.glob("fineweb_val_*.bin")) and list(default.glob("fineweb_train_*.bin")) else None
    try:
        report(cpu_smoke() if args.cpu_smoke else gpu_check(data, args.steps))
    except CheckFailed as error:
        print(f"gpu check FAILED: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

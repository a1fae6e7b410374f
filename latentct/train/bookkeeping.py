"""The trainers' shared settings and bookkeeping: resume and checkpoint, running losses with the divergence
guard, throughput, the progress bar. The schedule itself (when to log, evaluate, draw samples, checkpoint and
stop) is written in each script's loop."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from latentct.data.slices import parse_window
from latentct.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from latentct.train.rundir import RunDir
from latentct.train.runtime import Runtime, gather_floats, unwrap, weights_checksum
from latentct.util.settings import UserError, check, setting

SWITCH = ("auto", "on", "off")


@dataclass
class TrainerSettings:
    """Settings every trainer shares; each script's Settings extends this with its own on top."""

    batch_size: int = setting(64, "images (or image pairs) per step and process")
    steps: int = setting(1500, "optimiser steps; given explicitly it beats a preset's --epochs", replaces=("epochs",))
    seed: int = setting(0, "seed for weights, sampling and batches")
    device: str = setting("auto", "auto, cpu or cuda")
    bf16: str = setting("auto", "bf16 autocast: auto (on for GPU), on, off", choices=SWITCH)
    channels_last: str = setting("auto", "channels_last memory format: auto (on for CPU, where it measured faster; "
                                 "off for GPU, where it breaks torch.compile's backward), on, off", choices=SWITCH)
    compile: str = setting("auto", "torch.compile the models: auto (on for GPU), on, off", choices=SWITCH)
    log_every: int = setting(25, "steps between metrics.jsonl lines")
    eval_every: int = setting(500, "steps between evaluations")
    sample_every: int = setting(250, "steps between sample images")
    checkpoint_every: int = setting(250, "steps between checkpoints (one is also written at the end and on a signal)")
    resume: bool = setting(True, "continue from the run folder's checkpoint when there is one")
    tensorboard: bool = setting(False, "also log to TensorBoard (needs the tensorboard package)")
    display_window: str = setting("lung", "HU window of the pictures (independent of the training window): lung "
                                  "[-1000, 400], pulmonary [-1350, 150], mediastinal [-160, 240], default or LOW,HIGH")

    def __post_init__(self):
        for name in ("batch_size", "steps", "log_every", "eval_every", "sample_every", "checkpoint_every"):
            check(getattr(self, name) >= 1, name, f"must be at least 1, got {getattr(self, name)}")
        parse_window(self.display_window, "--display-window")


@dataclass
class ImageTrainerSettings(TrainerSettings):
    """Settings shared by the trainers that read a preprocessed dataset (the generators)."""

    data: str = setting("data/demo/slices_64", "preprocessed dataset folder (preprocess.py output)")
    window: str = setting("default", "HU window to [-1, 1]: default [-1000, 2000], lung, or LOW,HIGH")
    epochs: float | None = setting(None, "passes over the training split; sets --steps")
    augment: bool = setting(True, "the study's augmentation: rotation within 1 degree, zoom 1 to 1.1")
    workers: int = setting(0, "DataLoader worker processes on CPU (0: in the training process; on 2 cores the "
                           "memory-mapped int16 batches are cheap to read and workers only compete for the cores)")
    eval_samples: int = setting(256, "generated and held-out slices per evaluation")

    def __post_init__(self):
        super().__post_init__()
        check(self.epochs is None or self.epochs > 0, "epochs", "must be positive")
        check(self.eval_samples >= 1, "eval_samples", f"must be at least 1, got {self.eval_samples}")
        check(self.workers >= 0, "workers", "must not be negative")


class TrainingDiverged(UserError):
    """A loss became NaN or exploded; the last good checkpoint stays."""


# ------------------------------------------------------------------------------------------ resume, checkpoint

def resume(run: RunDir, cfg, runtime: Runtime, models: dict, optimizers: dict, architecture: dict) -> int:
    """Step to start from: 0, or the checkpoint's step with models, optimisers and RNG restored exactly."""
    if not run.checkpoint.is_file() or not cfg.resume:
        return 0
    state = load_checkpoint(run.checkpoint)  # on the CPU: the RNG setters need it; weights and optimiser
    # state move to their parameters' device as they load
    if state.get("architecture") != architecture:
        raise UserError(f"{run.checkpoint}: checkpoint of a different model ({state.get('architecture')}); "
                        f"use another --output or --no-resume")
    for name, model in models.items():
        unwrap(model).load_state_dict(state["models"][name])
    for name, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    set_rng_state(state["rng"])
    run.truncate_metrics(state["step"])
    if runtime.is_main:
        print(f"resuming {run.path} from step {state['step']}")
    return int(state["step"])


def save_state(run: RunDir, step: int, models: dict, optimizers: dict, architecture: dict) -> None:
    """checkpoint.pt: everything ``resume`` needs (rank 0 only)."""
    if not run.runtime.is_main:
        return
    state = {"step": step, "architecture": architecture,
             "models": {n: {k: v.detach().cpu() for k, v in unwrap(m).state_dict().items()} for n, m in models.items()},
             "optimizers": {n: o.state_dict() for n, o in optimizers.items()},
             "rng": rng_state()}
    save_checkpoint(state, run.checkpoint)


# ------------------------------------------------------------------------------------------ losses, throughput

class LossMeter:
    """Running sums of a step's losses, kept on the device (no host sync per step); ``read`` averages them,
    adds step time, images/s and the share of time spent waiting for data, and starts over."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = self.images = 0
        self.clock = time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor], images: int) -> None:
        for k, v in losses.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1
        self.images += images

    def read(self, data=None) -> tuple[dict, dict]:
        """(mean losses, speed figures) since the last read."""
        now = time.perf_counter()
        elapsed = max(now - self.clock, 1e-9)
        losses = {k: float(v) / self.count for k, v in self.sums.items()}  # the one host sync
        speed = {"step_time": elapsed / self.count, "images_per_s": self.images / elapsed}
        if data is not None:
            speed["data_wait_share"] = min(data.wait / elapsed, 1.0)
            data.wait = 0.0
        self.sums, self.count, self.images, self.clock = {}, 0, 0, now
        return losses, speed


def check_finite(values: dict, step: int, checkpoint, limit: float = 1e6) -> None:
    for name, value in values.items():
        if value is not None and (not math.isfinite(value) or abs(value) > limit):
            kept = f"; the last good checkpoint {checkpoint} is kept" if checkpoint.is_file() else ""
            raise TrainingDiverged(f"{name} is {value} at step {step}: training diverged{kept}. "
                                   "Lower the learning rate or enable the stabilisers.")


def log_losses(run: RunDir, meter: LossMeter, step: int, bar, data=None) -> None:
    """One metrics.jsonl line of the running means since the last one; stops a diverged run."""
    if not meter.count:
        return
    losses, speed = meter.read(data)
    check_finite(losses, step, run.checkpoint)
    run.log({"step": step, **losses, **speed})
    bar.update(step - bar.n)
    bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items()}, refresh=False)


def progress_bar(run: RunDir, total: int, start: int):
    """The loop's tqdm bar (rank 0 only), showing the running losses at each log step."""
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=run.path.name, unit="step", disable=not run.runtime.is_main,
                dynamic_ncols=True)


def log_ddp_checksums(run: RunDir, model: torch.nn.Module, step: int) -> None:
    """Under DDP, every rank's weight checksum in metrics.jsonl: equal numbers mean the ranks stayed in step."""
    if run.runtime.distributed:
        run.log({"step": step, "ddp_weight_checksums": gather_floats(weights_checksum(model), run.runtime)})


def last_evaluation(output) -> str:
    """A generator trainer's one line for the pipeline: its last evaluation's SWD and diversity ratio."""
    lines = (Path(output) / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(line)["eval"] for line in lines if '"eval"' in line]
    return f"SWD {evals[-1]['swd']:.1f}, diversity {evals[-1]['diversity_ratio']:.2f}" if evals else ""

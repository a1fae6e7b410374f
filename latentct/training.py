"""What every training script shares: device and DDP set-up, deterministic per-step batches, the run folder
(config, metrics.jsonl that resumes cleanly, loss plots), stop-on-signal, and the divergence guard.

Batches depend only on (seed, step): step s of epoch e takes rows perm_e[s * B * W + rank * B ...], with
perm_e a seeded permutation. A resumed run therefore sees exactly the batches the uninterrupted run saw.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from latentct.data import CTSlices, hu_to_unit, parse_window, random_affine
from latentct.settings import UserError, save_settings


class TrainingDiverged(UserError):
    """A loss became NaN or exploded; the last good checkpoint stays."""


# ------------------------------------------------------------------------------------------ device, DDP

@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def setup_runtime(device: str = "auto") -> Runtime:
    """CPU or GPU; under torchrun (RANK/WORLD_SIZE set) a process group: NCCL on GPU, gloo on CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device: cuda was asked for but no GPU is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return Runtime(torch.device(device), rank, world, True)
    return Runtime(torch.device(device))


def autocast(runtime: Runtime, enabled: bool):
    """bf16 autocast on a GPU when enabled; a no-op elsewhere."""
    if enabled and runtime.cuda:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_switch(value: str, runtime: Runtime) -> bool:
    """'auto' means on for a GPU, off for a CPU."""
    return runtime.cuda if value == "auto" else value == "on"


def memory_format(value: str, runtime: Runtime) -> torch.memory_format:
    return torch.channels_last if resolve_switch(value, runtime) else torch.contiguous_format


def steps_per_epoch(n: int, batch: int, world: int = 1) -> int:
    """Steps that see each of n rows once, with ``batch`` rows per step on each of ``world`` processes."""
    return max(n // (batch * world), 1)


def wrap_ddp(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    if not runtime.distributed:
        return model
    ids = [runtime.device.index] if runtime.cuda else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def weights_checksum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum().cpu() for p in unwrap(model).parameters()))


def gather_floats(value: float, runtime: Runtime) -> list[float]:
    if not runtime.distributed:
        return [value]
    t = torch.tensor([value], dtype=torch.float64, device=runtime.device)
    out = [torch.zeros_like(t) for _ in range(runtime.world_size)]
    dist.all_gather(out, t)
    return [float(o) for o in out]


# ------------------------------------------------------------------------------------------ data

def step_indices(n: int, batch: int, step: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Rows of this rank's batch at ``step``: a fresh seeded permutation every epoch, no row twice per epoch."""
    per_step = batch * world
    epoch, pos = divmod(step, steps_per_epoch(n, batch, world))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    if n < per_step:
        perm = perm.repeat(-(-per_step // n))
    start = pos * per_step + rank * batch
    return perm[start:start + batch]


class StepBatchSampler(torch.utils.data.Sampler):
    def __init__(self, n, batch, seed, start, stop, rank=0, world=1):
        self.args = (n, batch, seed, rank, world)
        self.start, self.stop = start, stop

    def __len__(self):
        return self.stop - self.start

    def __iter__(self):
        n, batch, seed, rank, world = self.args
        for step in range(self.start, self.stop):
            yield step_indices(n, batch, step, seed, rank, world).tolist()


class TrainData:
    """Training batches in [-1, 1] on the device. On a GPU the whole int16 split lives on the device and is
    indexed there; on a CPU a DataLoader with workers reads the memory map. Augmentation is batched."""

    def __init__(self, folder: str, window, runtime: Runtime, workers: int = 2, resident: bool | None = None):
        self.dataset = CTSlices(folder, "train", window=window)
        if len(self.dataset) == 0:
            raise UserError(f"--data: {folder} has no training slices")
        self.window, self.runtime, self.workers = parse_window(window), runtime, workers
        self.resident = runtime.cuda if resident is None else resident
        self.on_device = self.dataset.tensor(runtime.device) if self.resident else None
        self.image_size = int(self.dataset.manifest["array"]["item_shape"][-1])
        self.wait = 0.0  # seconds the loop spent waiting for batches (host side), read by the Bookkeeper

    def __len__(self):
        return len(self.dataset)

    def batches(self, batch: int, start: int, stop: int, seed: int, augment: bool):
        source = self._batches(batch, start, stop, seed, augment)
        while True:
            began = time.perf_counter()
            item = next(source, None)
            self.wait += time.perf_counter() - began
            if item is None:
                return
            yield item

    def _batches(self, batch: int, start: int, stop: int, seed: int, augment: bool):
        rt = self.runtime
        if self.resident:
            for step in range(start, stop):
                idx = step_indices(len(self), batch, step, seed, rt.rank, rt.world_size).to(rt.device)
                x = hu_to_unit(self.on_device[idx], self.window)
                yield step, (random_affine(x) if augment else x)
            return
        sampler = StepBatchSampler(len(self), batch, seed, start, stop, rt.rank, rt.world_size)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.workers,
                                             generator=torch.Generator(), persistent_workers=False)
        for step, x in zip(range(start, stop), loader):
            x = x.to(rt.device, non_blocking=True)
            yield step, (random_affine(x) if augment else x)

    def held_out(self, folder: str, count: int) -> torch.Tensor:
        """Up to ``count`` test-split slices (evenly spread) for quality metrics; train split if no test."""
        test = CTSlices(folder, "test", window=self.window)
        source = test if len(test) >= 2 else self.dataset
        idx = torch.linspace(0, len(source) - 1, min(count, len(source))).round().long().unique()
        return torch.stack([source[int(i)] for i in idx])


# ------------------------------------------------------------------------------------------ run folder

class RunDir:
    """runs/<name>/: config.json, metrics.jsonl, checkpoint.pt, images. Only rank 0 writes."""

    def __init__(self, folder: str, cfg, runtime: Runtime):
        self.path = Path(folder)
        self.runtime = runtime
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoint = self.path / "checkpoint.pt"
        self.board = None
        if runtime.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            save_settings(cfg, self.path / "config.json")
            if getattr(cfg, "tensorboard", False):
                self.board = _tensorboard(self.path / "tensorboard")

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint's step; those steps run again."""
        if not self.runtime.is_main or not self.metrics.is_file():
            return
        keep = [line for line in self.metrics.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.metrics.write_text("".join(line + "\n" for line in keep))

    def log(self, record: dict) -> None:
        if self.runtime.is_main:
            with open(self.metrics, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            if self.board is not None:
                for key, value in _flatten(record).items():
                    self.board.add_scalar(key, value, record["step"])


    def read_metrics(self) -> list[dict]:
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]


def _tensorboard(folder: Path):
    """A SummaryWriter when the tensorboard package is installed (optional); None otherwise, with a note."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("--tensorboard: the tensorboard package is not installed (pip install tensorboard); "
              "metrics.jsonl is written as always")
        return None
    return SummaryWriter(str(folder))


def _flatten(record: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)):
            out[f"{prefix}{key}"] = value
    return out


def plot_losses(records: list[dict], keys: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from latentct.io import atomic_path

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
        if pts:
            ax.plot(*zip(*pts), label=key, lw=1)
    ax.set_xlabel("step")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ control

class StopSignal:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint at the end of the step and exits."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def check_finite(values: dict, step: int, checkpoint: Path, limit: float = 1e6) -> None:
    for name, value in values.items():
        if value is not None and (not math.isfinite(value) or abs(value) > limit):
            kept = f"; the last good checkpoint {checkpoint} is kept" if checkpoint.is_file() else ""
            raise TrainingDiverged(f"{name} is {value} at step {step}: training diverged{kept}. "
                                   "Lower the learning rate or enable the stabilisers.")


class Throughput:
    def __init__(self):
        self.last, self.images = time.perf_counter(), 0

    def add(self, n: int):
        self.images += n

    def read(self, steps: int, data=None) -> dict:
        now = time.perf_counter()
        elapsed = max(now - self.last, 1e-9)
        out = {"step_time": elapsed / max(steps, 1), "images_per_s": self.images / elapsed}
        if data is not None:
            out["data_wait_share"] = min(data.wait / elapsed, 1.0)
            data.wait = 0.0
        self.last, self.images = now, 0
        return out


# ------------------------------------------------------------------------------------------ bookkeeping

class Bookkeeper:
    """Everything around a training step: resume, running losses, logging, evaluation, sample grids,
    checkpoints every N steps and on SIGTERM/SIGINT, divergence checks. The loop itself stays in the script.

    ``models`` and ``optimizers`` are name -> object dicts saved in the checkpoint; ``evaluate(step)``
    returns a dict of figures (or None); ``samples(step)`` writes images.
    """

    def __init__(self, run: RunDir, cfg, runtime: Runtime, models: dict, optimizers: dict,
                 evaluate=None, samples=None, architecture: dict | None = None, data: TrainData | None = None):
        self.run, self.cfg, self.rt, self.data = run, cfg, runtime, data
        self.models, self.optimizers = models, optimizers
        self.evaluate, self.samples = evaluate, samples
        self.architecture = architecture or {}
        self.running: dict[str, torch.Tensor] = {}
        self.count = 0
        self.speed = Throughput()
        self.stop = StopSignal().__enter__()
        self.last_eval: dict = {}
        self.bar = None

    def resume(self) -> int:
        """Step to start from: 0, or the checkpoint's step with every state restored exactly."""
        from latentct.checkpoint import load_checkpoint, set_rng_state

        if not self.run.checkpoint.is_file() or not getattr(self.cfg, "resume", True):
            return 0
        state = load_checkpoint(self.run.checkpoint, map_location=self.rt.device)
        if state.get("architecture") != self.architecture:
            raise UserError(f"{self.run.checkpoint}: checkpoint of a different model ({state.get('architecture')}); "
                            f"use another --output or --no-resume")
        for name, model in self.models.items():
            unwrap(model).load_state_dict(state["models"][name])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        set_rng_state(state["rng"])
        self.run.truncate_metrics(state["step"])
        if self.rt.is_main:
            print(f"resuming {self.run.path} from step {state['step']}")
        return int(state["step"])

    def progress(self, start: int):
        """The tqdm bar of the loop (rank 0 only), showing the running losses at each log step."""
        from tqdm import tqdm

        self.bar = tqdm(total=self.cfg.steps, initial=start, desc=self.run.path.name, unit="step",
                        disable=not self.rt.is_main, dynamic_ncols=True)
        return self.bar

    def save(self, step: int) -> None:
        from latentct.checkpoint import rng_state, save_checkpoint

        if not self.rt.is_main:
            return
        state = {"step": step, "architecture": self.architecture,
                 "models": {n: {k: v.detach().cpu() for k, v in unwrap(m).state_dict().items()}
                            for n, m in self.models.items()},
                 "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                 "rng": rng_state()}
        save_checkpoint(state, self.run.checkpoint)

    def after_step(self, step: int, losses: dict[str, torch.Tensor], images: int) -> bool:
        """Call after each optimiser step with ``step`` = steps now done. Returns True to stop the loop."""
        for k, v in losses.items():
            v = v.detach().float()
            self.running[k] = self.running[k] + v if k in self.running else v
        self.count += 1
        self.speed.add(images * self.rt.world_size)
        cfg = self.cfg
        final = step >= cfg.steps
        stopping = self.stop.received is not None
        if step % cfg.log_every == 0 or final or stopping or step % cfg.checkpoint_every == 0:
            self._log(step)
        if self.evaluate and (step % cfg.eval_every == 0 or final):
            self.last_eval = self.evaluate(step) or {}
            if self.last_eval:
                self.run.log({"step": step, "eval": self.last_eval})
        if self.samples and (step % cfg.sample_every == 0 or final):
            self.samples(step)
        if step % cfg.checkpoint_every == 0 or final or stopping:
            self.save(step)
        if stopping and self.rt.is_main:
            print(f"stopped by signal {self.stop.received} after step {step}; checkpoint saved, rerun to continue")
        return stopping

    def _log(self, step: int) -> None:
        if not self.count:
            return
        values = {k: float(v) / self.count for k, v in self.running.items()}  # the one host sync
        check_finite(values, step, self.run.checkpoint)
        record = {"step": step, **values, **self.speed.read(self.count, self.data)}
        self.run.log(record)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()}, refresh=False)
        self.running, self.count = {}, 0
        self.last_log = record

    def close(self, model: torch.nn.Module | None = None) -> None:
        """End the loop: restore signal handlers; exit 128 + signal when a signal stopped the run (its
        checkpoint is saved, no final outputs are written); under DDP log every rank's weight checksum."""
        self.stop.__exit__()
        if self.bar is not None:
            self.bar.close()
        if self.stop.received is not None:
            raise SystemExit(128 + self.stop.received)
        if model is not None and self.rt.distributed:
            checksums = gather_floats(weights_checksum(model), self.rt)
            self.run.log({"step": self.cfg.steps, "ddp_weight_checksums": checksums})

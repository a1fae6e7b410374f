"""Where a model runs: CPU or GPU, DistributedDataParallel under torchrun, and the speed switches
(bf16 autocast, channels_last, torch.compile) that are on by default only where they measured faster."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from latentct.util.settings import UserError


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


def memory_format(value: str, runtime: Runtime, compiled: bool = False) -> torch.memory_format:
    """channels_last where it measured faster: 'auto' is on for a CPU (bench/train.py, bench/directions.py) and
    off for a GPU, where bf16 + torch.compile without it was the fastest configuration and torch.compile's
    convolution backward fails with it (torch 2.11 on an H100: bench/gpu.py)."""
    on = not runtime.cuda if value == "auto" else value == "on"
    if on and compiled and runtime.cuda:
        raise UserError("--channels-last on with --compile on fails on a GPU (torch.compile's convolution backward "
                        "rejects channels_last strides): turn one of them off")
    return torch.channels_last if on else torch.contiguous_format


@contextlib.contextmanager
def evaluating(*modules: torch.nn.Module):
    """Eval mode and no gradients for the block; every module's own train/eval mode is restored after."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def wrap_ddp(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    if not runtime.distributed:
        return model
    ids = [runtime.device.index] if runtime.cuda else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside torch.compile and DistributedDataParallel wrappers."""
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

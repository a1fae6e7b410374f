"""Training batches that depend only on (seed, step).

Step s of epoch e takes rows perm_e[s * B * W + rank * B ...], with perm_e a seeded permutation, B the batch
and W the number of processes. A resumed run therefore sees exactly the batches the uninterrupted run saw.
"""
from __future__ import annotations

import time

import torch

from latentct.data.slices import CTSlices, held_out, hu_to_unit, parse_window, random_affine
from latentct.train.runtime import Runtime
from latentct.util.settings import UserError


def steps_per_epoch(n: int, batch: int, world: int = 1) -> int:
    """Steps that see each of n rows once, with ``batch`` rows per step on each of ``world`` processes."""
    return max(n // (batch * world), 1)


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
        self.wait = 0.0  # seconds the loop spent waiting for batches (host side), read by the throughput meter

    def __len__(self):
        return len(self.dataset)

    def batches(self, batch: int, start: int, stop: int, seed: int, augment: bool):
        """Yield (step, images) for steps start .. stop - 1."""
        source = self._batches(batch, start, stop, seed, augment)
        while True:
            began = time.perf_counter()
            item = next(source, None)
            self.wait += time.perf_counter() - began
            if item is None:
                return
            yield item

    def _batches(self, batch: int, start: int, stop: int, seed: int, augment: bool):
        runtime = self.runtime
        if self.resident:
            for step in range(start, stop):
                idx = step_indices(len(self), batch, step, seed, runtime.rank, runtime.world_size).to(runtime.device)
                x = hu_to_unit(self.on_device[idx], self.window)
                yield step, (random_affine(x) if augment else x)
            return
        sampler = StepBatchSampler(len(self), batch, seed, start, stop, runtime.rank, runtime.world_size)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.workers,
                                             generator=torch.Generator(), persistent_workers=False)
        for step, x in zip(range(start, stop), loader):
            x = x.to(runtime.device, non_blocking=True)
            yield step, (random_affine(x) if augment else x)

    def held_out(self, folder: str, count: int) -> torch.Tensor:
        """Up to ``count`` held-out slices (evenly spread) for quality metrics (data.slices.held_out's rule)."""
        source = held_out(folder, self.window)
        idx = torch.linspace(0, len(source) - 1, min(count, len(source))).round().long().unique()
        return torch.stack([source[int(i)] for i in idx])

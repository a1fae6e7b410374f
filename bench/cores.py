"""Benchmark: how this machine's cores serve the pipeline's two ways of running jobs.

    python -m bench.cores [--steps 40] [--cores N]

pipeline.py runs its main lane (the trainings) as one process with every thread, then the pool: N processes of
one thread each, side by side. Which of the two does more work per second depends on the machine: on one whose
cores share execution units, or whose host is busy, N one-thread processes side by side each run slower than one
alone, and the pool's share of the demo's wall time grows (the demo's wall time against 1392116, whose stages ran
one after another with every thread, moved from 101% to 133% between machines of the same name).

The work: one step of the demo DCGAN's training (G and D at the demo preset's widths, 64 px, batch 64,
channels_last, hinge loss) on random images, timed after two warm-up steps, each configuration in its own
process: one thread alone (the reference), every thread in one process (the main lane), and N one-thread
processes at once (the pool; their steps per second added). Prints each as a ratio to the reference.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from latentct.util.settings import parse_settings, setting

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Settings:
    """Steps per second of one training step: one thread, every thread, and one thread per core side by side."""

    steps: int = setting(40, "timed steps per process (after two warm-up steps)")
    cores: int = setting(os.cpu_count() or 1, "threads of the one-process run and processes of the side-by-side run "
                         "(pipeline.py's --parallel is 2 on 2 cores)")
    worker: bool = setting(False, "internal: time the step in this process and print its rate")


def time_steps(steps: int) -> float:
    """Steps per second of the demo DCGAN's training step in this process, with its current thread count."""
    import torch

    from latentct.models.dcgan import Discriminator, Generator, weights_init
    from latentct.util.settings import make_settings
    from Training import TrainGAN

    cfg = make_settings(TrainGAN.Settings, {}, "demo", TrainGAN.PRESETS)  # the demo's widths, batch and loss
    torch.manual_seed(0)
    G = Generator(latent_dim=cfg.latent_dim, image_size=64, ngf=cfg.ngf).apply(weights_init)
    D = Discriminator(image_size=64, ndf=cfg.ndf, spectral=cfg.spectral_norm,
                      minibatch_std=cfg.minibatch_std).apply(weights_init)
    G, D = (m.to(memory_format=torch.channels_last) for m in (G, D))
    opt_g = torch.optim.Adam(G.parameters(), cfg.lr_g, betas=cfg.betas)
    opt_d = torch.optim.Adam(D.parameters(), cfg.lr_d, betas=cfg.betas)
    real = torch.rand(cfg.batch_size, 1, 64, 64).mul(2).sub(1).contiguous(memory_format=torch.channels_last)

    def step():  # the trainer's own losses
        fake = G(torch.randn(cfg.batch_size, cfg.latent_dim))
        loss_d = TrainGAN.d_loss(D(real), True, cfg) + TrainGAN.d_loss(D(fake.detach()), False, cfg)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        loss_g = TrainGAN.g_loss(D(fake), cfg)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

    for _ in range(2):
        step()
    began = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - began)


def launch(steps: int, threads: int, count: int) -> list[float]:
    """``count`` worker processes at once, each with ``threads`` threads: their steps per second."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen([sys.executable, "-m", "bench.cores", "--worker", "--steps", str(steps)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, text=True) for _ in range(count)]
    rates = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"bench/cores.py: a worker with {threads} thread(s) failed (exit {proc.returncode})")
        rates.append(float(out.strip().splitlines()[-1].split()[-1]))
    return rates


def main(cfg: Settings) -> dict:
    if cfg.worker:
        print(f"RATE {time_steps(cfg.steps):.4f}")
        return {}
    one = launch(cfg.steps, 1, 1)[0]
    lane = launch(cfg.steps, cfg.cores, 1)[0]
    pool = launch(cfg.steps, 1, cfg.cores)
    result = {"cores": cfg.cores, "one_thread": one, "main_lane": lane, "pool": sum(pool), "pool_each": pool,
              "main_lane_ratio": lane / one, "pool_ratio": sum(pool) / one, "pool_over_main_lane": sum(pool) / lane}
    print(f"demo DCGAN training step, steps/s: one thread {one:.2f}; one process with {cfg.cores} threads (the main "
          f"lane) {lane:.2f} = {lane / one:.2f}x; {cfg.cores} one-thread processes side by side (the pool) "
          f"{sum(pool):.2f} = {sum(pool) / one:.2f}x (each {', '.join(f'{r:.2f}' for r in pool)}); the pool does "
          f"{sum(pool) / lane:.2f}x the main lane's work per second")
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main(parse_settings(Settings))

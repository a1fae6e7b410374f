"""Stage 2b: train the ResNet VAE (after LukeDitria/CNN-VAE) on preprocessed CT slices.

    python Training/TrainVAE.py --data data/demo/slices_64 --output runs/demo/vae --preset demo

The decoder is the generator (generator.pt, with the encoder stored beside it for embedding real slices).
Rerunning the same command continues from the run folder's checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from latentct.generators import save_generator
from latentct.images import save_grid
from latentct.metrics import compare_sets
from latentct.settings import check, run_cli, setting, user_errors
from latentct.training import (Bookkeeper, RunDir, TrainData, autocast, memory_format, plot_losses,
                               resolve_switch, setup_runtime, steps_per_epoch, unwrap, wrap_ddp)
from models.vae import VAE, kl_divergence


@dataclass
class Settings:
    """Train the ResNet VAE with a vector latent on CT slices."""

    data: str = setting("data/demo/slices_64", "preprocessed dataset folder (preprocess.py output)")
    output: str = setting("runs/demo/vae", "run folder for checkpoints, metrics and generator.pt")
    window: str = setting("default", "HU window to [-1, 1]: default [-1000, 2000], lung, or LOW,HIGH")
    latent_dim: int = setting(32, "size of z (a vector, not a spatial latent)")
    width: int = setting(16, "base channel width (the study: 64)")
    batch_size: int = setting(64, "images per step and process")
    steps: int = setting(1500, "optimiser steps (overridden by --epochs when set)")
    epochs: float | None = setting(None, "passes over the training split; sets --steps")
    lr: float = setting(1e-4, "Adam learning rate")
    betas: tuple[float, float] = setting((0.9, 0.999), "Adam betas")
    loss: str = setting("mse", "reconstruction loss: the study's logmse, or mse", choices=("logmse", "mse"))
    kl_weight: float = setting(0.01, "weight of the KL term (beta)")
    kl_schedule: bool = setting(False, "the study's schedule: beta/32 doubled every 5 epochs")
    augment: bool = setting(True, "the study's augmentation: rotation within 1 degree, zoom 1 to 1.1")
    seed: int = setting(0, "seed for weights, sampling and batches")
    device: str = setting("auto", "auto, cpu or cuda")
    workers: int = setting(2, "DataLoader workers on CPU")
    bf16: str = setting("auto", "bf16 autocast: auto (on for GPU), on, off", choices=("auto", "on", "off"))
    channels_last: str = setting("on", "channels_last memory format (measured faster on CPU too: bench/train.py)",
                                 choices=("auto", "on", "off"))
    compile: str = setting("auto", "torch.compile the model", choices=("auto", "on", "off"))
    log_every: int = setting(25, "steps between metrics.jsonl lines")
    eval_every: int = setting(500, "steps between quality evaluations")
    eval_samples: int = setting(256, "generated and held-out slices per evaluation")
    sample_every: int = setting(250, "steps between sample grids")
    checkpoint_every: int = setting(250, "steps between checkpoints")
    resume: bool = setting(True, "continue from the run folder's checkpoint when there is one")
    tensorboard: bool = setting(False, "also log to TensorBoard (needs the tensorboard package)")

    def __post_init__(self):
        for name in ("latent_dim", "width", "batch_size", "steps", "log_every", "eval_every",
                     "sample_every", "checkpoint_every", "eval_samples"):
            check(getattr(self, name) >= 1, name, f"must be at least 1, got {getattr(self, name)}")
        check(self.lr > 0, "lr", "must be positive")
        check(self.kl_weight >= 0, "kl_weight", "must not be negative")


PRESETS = {
    # The study: 128 px, width 64, batch 128, Adam 1e-4, log-MSE + 0.01 KL with its beta schedule, 50 epochs.
    "paper": dict(width=64, batch_size=128, epochs=50.0, lr=1e-4, loss="logmse", kl_weight=0.01, kl_schedule=True,
                  eval_every=2000, sample_every=1000, checkpoint_every=1000),
    # CPU-sized: a narrower net, a faster learning rate, plain MSE.
    "demo": dict(width=16, batch_size=64, steps=1500, lr=1e-3, loss="mse", kl_weight=0.01, kl_schedule=False),
}


def kl_beta(cfg: Settings, epoch: float) -> float:
    if not cfg.kl_schedule:
        return cfg.kl_weight
    return cfg.kl_weight / 32 * 2 ** ((int(epoch) + 1) // 5)


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    mse = F.mse_loss(recon.float(), target.float())
    return torch.log(mse) if kind == "logmse" else mse


def main(cfg: Settings) -> dict:
    rt = setup_runtime(cfg.device)
    torch.manual_seed(cfg.seed)
    data = TrainData(cfg.data, cfg.window, rt, workers=cfg.workers)
    epoch_steps = steps_per_epoch(len(data), cfg.batch_size, rt.world_size)
    if cfg.epochs is not None:
        cfg.steps = math.ceil(cfg.epochs * epoch_steps)
    run = RunDir(cfg.output, cfg, rt)
    use_bf16, fmt = resolve_switch(cfg.bf16, rt), memory_format(cfg.channels_last, rt)

    args = dict(latent_dim=cfg.latent_dim, image_size=data.image_size, ch=cfg.width)
    with user_errors(f"--data {cfg.data}: "):
        model = VAE(**args).to(rt.device, memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)

    held_out = data.held_out(cfg.data, cfg.eval_samples).to(rt.device)
    eval_z = torch.randn(len(held_out), cfg.latent_dim, generator=torch.Generator().manual_seed(cfg.seed + 1))
    fixed_z = eval_z[:64].to(rt.device)

    def run_eval_mode(fn):
        model.eval()
        with torch.no_grad(), autocast(rt, use_bf16):
            out = fn()
        model.train()
        return out

    def evaluate(step: int) -> dict:
        if not rt.is_main:
            return {}
        fake = run_eval_mode(lambda: torch.cat([model.decoder(z.to(rt.device)).float() for z in eval_z.split(256)]))
        figures = compare_sets(fake.cpu(), held_out.cpu(), data.window)
        recon = run_eval_mode(lambda: model.decoder(model.encoder(held_out)[0]).float())
        figures["test_reconstruction_mse"] = float(F.mse_loss(recon, held_out))
        return figures

    def samples(step: int) -> None:
        if rt.is_main:
            grid = run_eval_mode(lambda: model.decoder(fixed_z).float())
            save_grid(grid, run.path / f"samples_{step:06d}.png")
            save_grid(grid, run.path / "samples_latest.png")
            recon = run_eval_mode(lambda: model.decoder(model.encoder(held_out[:32])[0]).float())
            save_grid(torch.cat([held_out[:32], recon]), run.path / "reconstructions_latest.png")
            plot_losses(run.read_metrics(), ["loss", "reconstruction", "kl"], run.path / "losses.png")

    book = Bookkeeper(run, cfg, rt, {"VAE": model}, {"VAE": opt}, evaluate, samples, architecture={"VAE": args}, data=data)
    start = book.resume()
    book.progress(start)
    trained = wrap_ddp(model, rt)
    if resolve_switch(cfg.compile, rt):
        trained = torch.compile(trained)

    # The loop: reconstruct, add the weighted KL, step.
    for step, real in data.batches(cfg.batch_size, start, cfg.steps, cfg.seed, cfg.augment):
        real = real.contiguous(memory_format=fmt)
        with autocast(rt, use_bf16):
            recon, mu, logvar = trained(real)
        rec = reconstruction_loss(recon, real, cfg.loss)
        kl = kl_divergence(mu.float(), logvar.float())
        loss = rec + kl_beta(cfg, step / epoch_steps) * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if book.after_step(step + 1, {"loss": loss, "reconstruction": rec, "kl": kl}, real.shape[0]):
            break
    book.close(model)

    if rt.is_main:
        vae = unwrap(model)
        save_generator(run.path / "generator.pt", "vae", vae.decoder, args, data.window, cfg.data,
                       encoder=vae.encoder, encoder_args=args)
        print(f"VAE: generator written to {run.path / 'generator.pt'}; last evaluation {book.last_eval}")
    return book.last_eval


if __name__ == "__main__":
    run_cli(main, Settings, presets=PRESETS)

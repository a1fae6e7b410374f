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

from latentct.generators.interface import save_generator
from latentct.models.vae import VAE, kl_divergence
from latentct.show.images import display, save_grid
from latentct.train.batches import TrainData, steps_per_epoch
from latentct.train.bookkeeping import (
    ImageTrainerSettings,
    LossMeter,
    last_evaluation,
    log_ddp_checksums,
    log_losses,
    progress_bar,
    resume,
    save_state,
)
from latentct.train.metrics import compare_sets
from latentct.train.rundir import RunDir
from latentct.train.runtime import autocast, evaluating, memory_format, resolve_switch, setup_runtime, unwrap, wrap_ddp
from latentct.train.signals import StopSignal
from latentct.util.settings import check, run_cli, setting, user_errors


@dataclass
class Settings(ImageTrainerSettings):
    """Train the ResNet VAE with a vector latent on CT slices."""

    output: str = setting("runs/demo/vae", "run folder for checkpoints, metrics and generator.pt")
    latent_dim: int = setting(32, "size of z (a vector, not a spatial latent)")
    width: int = setting(16, "base channel width (the study: 64)")
    lr: float = setting(1e-4, "Adam learning rate")
    betas: tuple[float, float] = setting((0.9, 0.999), "Adam betas")
    loss: str = setting("mse", "reconstruction loss: the study's logmse, or mse", choices=("logmse", "mse"))
    kl_weight: float = setting(0.01, "weight of the KL term (beta)")
    kl_schedule: bool = setting(False, "the study's schedule: beta/32 doubled every 5 epochs")

    def __post_init__(self):
        super().__post_init__()
        for name in ("latent_dim", "width"):
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


def decode(model: VAE, z: torch.Tensor, runtime, use_bf16: bool) -> torch.Tensor:
    """Decoder images of z in eval mode, in chunks, as float32."""
    with evaluating(model), autocast(runtime, use_bf16):
        return torch.cat([model.decoder(part.to(runtime.device)).float() for part in z.split(256)])


def reconstruct(model: VAE, x: torch.Tensor, runtime, use_bf16: bool) -> torch.Tensor:
    """Decoder images of the encoder's means of x, in eval mode, as float32."""
    with evaluating(model), autocast(runtime, use_bf16):
        return model.decoder(model.encoder(x)[0]).float()


def main(cfg: Settings) -> dict:
    # Setup: device, data, run folder.
    runtime = setup_runtime(cfg.device)
    torch.manual_seed(cfg.seed)
    data = TrainData(cfg.data, cfg.window, runtime, workers=cfg.workers)
    epoch_steps = steps_per_epoch(len(data), cfg.batch_size, runtime.world_size)
    if cfg.epochs is not None:
        cfg.steps = math.ceil(cfg.epochs * epoch_steps)
    run = RunDir(cfg.output, cfg, runtime)
    use_bf16, compiled = resolve_switch(cfg.bf16, runtime), resolve_switch(cfg.compile, runtime)
    layout = memory_format(cfg.channels_last, runtime, compiled)

    # Model: encoder and decoder; their args go into generator.pt.
    args = dict(latent_dim=cfg.latent_dim, image_size=data.image_size, ch=cfg.width)
    with user_errors(f"--data {cfg.data}: "):
        raw_model = VAE(**args).to(runtime.device, memory_format=layout)
    opt = torch.optim.Adam(raw_model.parameters(), lr=cfg.lr, betas=cfg.betas)
    models, optimizers, architecture = {"VAE": raw_model}, {"VAE": opt}, {"VAE": args}

    # Evaluation inputs: held-out slices and a fixed z.
    held_out = data.held_out(cfg.data, cfg.eval_samples).to(runtime.device)
    eval_z = torch.randn(len(held_out), cfg.latent_dim, generator=torch.Generator().manual_seed(cfg.seed + 1))
    fixed_z = eval_z[:64]
    start = resume(run, cfg, runtime, models, optimizers, architecture)
    model = wrap_ddp(raw_model, runtime)
    if compiled:
        model = torch.compile(model)

    # The loop: reconstruct, add the weighted KL, step; the schedule at its end.
    meter, bar, last_eval, done = LossMeter(), progress_bar(run, cfg.steps, start), {}, start
    with StopSignal() as stop:
        for step, real in data.batches(cfg.batch_size, start, cfg.steps, cfg.seed, cfg.augment):
            real = real.contiguous(memory_format=layout)
            with autocast(runtime, use_bf16):
                recon, mu, logvar = model(real)
            rec = reconstruction_loss(recon, real, cfg.loss)
            kl = kl_divergence(mu.float(), logvar.float())
            loss = rec + kl_beta(cfg, step / epoch_steps) * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            meter.add({"loss": loss, "reconstruction": rec, "kl": kl}, real.shape[0] * runtime.world_size)

            done = step + 1  # steps completed
            final, stopping = done == cfg.steps, stop.received is not None
            checkpoint_now = done % cfg.checkpoint_every == 0 or final or stopping
            if done % cfg.log_every == 0 or checkpoint_now:  # a checkpoint closes the running means: resumed runs log alike
                log_losses(run, meter, done, bar, data)
            if runtime.is_main and (done % cfg.eval_every == 0 or final):
                last_eval = compare_sets(decode(raw_model, eval_z, runtime, use_bf16).cpu(), held_out.cpu(), data.window)
                last_eval["test_reconstruction_mse"] = float(F.mse_loss(reconstruct(raw_model, held_out, runtime, use_bf16),
                                                                        held_out))
                run.log({"step": done, "eval": last_eval})
            if runtime.is_main and (done % cfg.sample_every == 0 or final):
                grid = display(decode(raw_model, fixed_z, runtime, use_bf16), data.window, cfg.display_window)
                save_grid(grid, run.path / f"samples_{done:06d}.png")
                save_grid(grid, run.path / "samples_latest.png")
                pairs = torch.cat([held_out[:32], reconstruct(raw_model, held_out[:32], runtime, use_bf16)])
                save_grid(display(pairs, data.window, cfg.display_window), run.path / "reconstructions_latest.png")
                run.plot_losses(["loss", "reconstruction", "kl"])
            if checkpoint_now:
                save_state(run, done, models, optimizers, architecture)
            if stopping:
                break
    bar.close()
    stop.exit_if_stopped(done, cfg.steps, runtime.is_main)
    log_ddp_checksums(run, raw_model, done)

    # Save: the decoder is the generator; the encoder is stored beside it.
    if runtime.is_main:
        vae = unwrap(raw_model)
        save_generator(run.path / "generator.pt", "vae", vae.decoder, args, data.window, cfg.data,
                       encoder=vae.encoder, encoder_args=args)
        print(f"VAE: generator written to {run.path / 'generator.pt'}; last evaluation {last_eval}")
    return last_eval


summary_line = last_evaluation  # the pipeline's one line for this stage


if __name__ == "__main__":
    run_cli(main, Settings, presets=PRESETS)

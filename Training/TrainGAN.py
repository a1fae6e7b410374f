"""Stage 2a: train a DCGAN on preprocessed CT slices.

    python Training/TrainGAN.py --data data/demo/slices_64 --output runs/demo/dcgan --preset demo
    torchrun --nproc_per_node=4 Training/TrainGAN.py --preset paper --data data/lidc_128 --output runs/lidc/dcgan

Rerunning the same command continues from runs/.../checkpoint.pt. Outputs: generator.pt (load it with
latentct.generators.interface.load_generator), checkpoint.pt, metrics.jsonl, samples_*.png, losses.png, config.json.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from latentct.generators.interface import save_generator
from latentct.models.dcgan import Discriminator, Generator, weights_init
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
from latentct.train.runtime import autocast, evaluating, memory_format, resolve_switch, setup_runtime, wrap_ddp
from latentct.train.signals import StopSignal
from latentct.util.settings import check, run_cli, setting, user_errors


@dataclass
class Settings(ImageTrainerSettings):
    """Train a DCGAN (the study's generator and discriminator) on CT slices."""

    output: str = setting("runs/demo/dcgan", "run folder for checkpoints, metrics and generator.pt")
    latent_dim: int = setting(32, "size of z")
    ngf: int = setting(32, "generator width (the study: 128)")
    ndf: int = setting(32, "discriminator width (the study: 128)")
    lr_g: float = setting(2e-4, "generator learning rate")
    lr_d: float = setting(2e-4, "discriminator learning rate")
    betas: tuple[float, float] = setting((0.5, 0.999), "Adam betas")
    loss: str = setting("bce", "adversarial loss", choices=("bce", "hinge"))
    instance_noise: bool = setting(True, "Gaussian noise on D's input with the study's decaying schedule")
    label_smoothing: bool = setting(True, "real labels drawn from [0.9, 1.0] (bce loss)")
    spectral_norm: bool = setting(False, "spectral normalisation in D (replaces its BatchNorm)")
    minibatch_std: bool = setting(False, "minibatch standard deviation channel in D")
    r1_gamma: float = setting(0.0, "R1 gradient penalty weight on real images (0 = off)")

    def __post_init__(self):
        super().__post_init__()
        for name in ("latent_dim", "ngf", "ndf"):
            check(getattr(self, name) >= 1, name, f"must be at least 1, got {getattr(self, name)}")
        check(self.lr_g > 0 and self.lr_d > 0, "lr_g", "learning rates must be positive")


PRESETS = {
    # The study: 128 px, widths 128, batch 128, Adam 2e-4 (0.5, 0.999), BCE with smoothed real labels and
    # decaying instance noise, 50 epochs.
    "paper": dict(ngf=128, ndf=128, batch_size=128, epochs=50.0, lr_g=2e-4, lr_d=2e-4, betas=(0.5, 0.999),
                  loss="bce", instance_noise=True, label_smoothing=True, spectral_norm=False,
                  minibatch_std=False, r1_gamma=0.0, eval_every=2000, sample_every=1000, checkpoint_every=1000),
    # What learns the phantom's variety on 2 CPU cores without collapsing: spectral norm and minibatch std in D,
    # hinge loss, TTUR-style learning rates.
    "demo": dict(ngf=32, ndf=32, batch_size=64, steps=1500, lr_g=2e-4, lr_d=2e-4, betas=(0.0, 0.9), loss="hinge",
                 instance_noise=False, label_smoothing=False, spectral_norm=True, minibatch_std=True, r1_gamma=0.0),
}


def instance_noise_std(epoch: float) -> float:
    """The study's schedule: std 1/10, then 1/20, 1/30, ... every 5 epochs, 1/100 at 25, /4 per epoch after."""
    e = int(epoch)
    if e < 25:
        return 1.0 / (10 + 10 * (e // 5))
    if e <= 30:
        return 1.0 / (100 * 4 ** (e - 25))
    return 0.0


def d_loss(logits: torch.Tensor, real: bool, cfg: Settings) -> torch.Tensor:
    if cfg.loss == "hinge":
        return F.relu(1 - logits).mean() if real else F.relu(1 + logits).mean()
    if real and cfg.label_smoothing:
        target = torch.empty_like(logits).uniform_(0.9, 1.0)
    else:
        target = torch.full_like(logits, 1.0 if real else 0.0)
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def g_loss(logits: torch.Tensor, cfg: Settings) -> torch.Tensor:
    if cfg.loss == "hinge":
        return -logits.float().mean()
    return F.binary_cross_entropy_with_logits(logits.float(), torch.ones_like(logits, dtype=torch.float32))


def add_noise(x: torch.Tensor, std: float) -> torch.Tensor:
    """Instance noise on D's input, clipped to the image range (std 0: x unchanged)."""
    return (x + std * torch.randn_like(x)).clamp(-1, 1) if std > 0 else x


def generate(G, z: torch.Tensor, runtime, use_bf16: bool) -> torch.Tensor:
    """G(z) in eval mode, in chunks, as float32."""
    with evaluating(G), autocast(runtime, use_bf16):
        return torch.cat([G(part.to(runtime.device)).float() for part in z.split(256)])


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

    # Models: the generator's args go into generator.pt.
    gen_args = dict(latent_dim=cfg.latent_dim, image_size=data.image_size, ngf=cfg.ngf)
    disc_args = dict(image_size=data.image_size, ndf=cfg.ndf, spectral=cfg.spectral_norm, minibatch_std=cfg.minibatch_std)
    with user_errors(f"--data {cfg.data}: "):
        raw_G = Generator(**gen_args).apply(weights_init).to(runtime.device, memory_format=layout)
        raw_D = Discriminator(**disc_args).apply(weights_init).to(runtime.device, memory_format=layout)
    opt_g = torch.optim.Adam(raw_G.parameters(), lr=cfg.lr_g, betas=cfg.betas)
    opt_d = torch.optim.Adam(raw_D.parameters(), lr=cfg.lr_d, betas=cfg.betas)
    models, optimizers = {"G": raw_G, "D": raw_D}, {"G": opt_g, "D": opt_d}
    architecture = {"G": gen_args, "D": disc_args}

    # Evaluation inputs: held-out slices and a fixed z; a real-vs-real split gives the metrics' floor.
    held_out = data.held_out(cfg.data, cfg.eval_samples).to(runtime.device)
    eval_z = torch.randn(len(held_out), cfg.latent_dim, generator=torch.Generator().manual_seed(cfg.seed + 1))
    fixed_z = eval_z[:64]
    start = resume(run, cfg, runtime, models, optimizers, architecture)
    if start == 0 and runtime.is_main and held_out.shape[0] >= 4:
        half = held_out.shape[0] // 2
        run.log({"step": 0, "real_vs_real": compare_sets(held_out[:half].cpu(), held_out[half:2 * half].cpu(),
                                                         data.window)})
    G, D = wrap_ddp(raw_G, runtime), wrap_ddp(raw_D, runtime)
    if compiled:
        G, D = torch.compile(G), torch.compile(D)

    # The loop: one D step on real and generated images, then one G step; the schedule at its end.
    meter, bar, last_eval, done = LossMeter(), progress_bar(run, cfg.steps, start), {}, start
    with StopSignal() as stop:
        for step, real in data.batches(cfg.batch_size, start, cfg.steps, cfg.seed, cfg.augment):
            real = real.contiguous(memory_format=layout)
            noise = instance_noise_std(step / epoch_steps) if cfg.instance_noise else 0.0
            z = torch.randn(real.shape[0], cfg.latent_dim, device=runtime.device)
            with autocast(runtime, use_bf16):
                fake = G(z)
            opt_d.zero_grad(set_to_none=True)
            real_in = add_noise(real, noise).requires_grad_(cfg.r1_gamma > 0)
            with autocast(runtime, use_bf16):
                out_real = D(real_in)
            loss_real = d_loss(out_real, True, cfg)
            if cfg.r1_gamma > 0:
                grad, = torch.autograd.grad(out_real.float().sum(), real_in, create_graph=True)
                loss_real = loss_real + 0.5 * cfg.r1_gamma * grad.pow(2).flatten(1).sum(1).mean()
            loss_real.backward()
            with autocast(runtime, use_bf16):
                out_fake = D(add_noise(fake.detach(), noise))
            loss_fake = d_loss(out_fake, False, cfg)
            loss_fake.backward()
            opt_d.step()

            opt_g.zero_grad(set_to_none=True)
            with autocast(runtime, use_bf16):
                out_gen = D(add_noise(fake, noise))
            loss_g = g_loss(out_gen, cfg)
            loss_g.backward()
            opt_g.step()
            meter.add({"loss_d": loss_real + loss_fake, "loss_g": loss_g, "d_real": torch.sigmoid(out_real.float()).mean(),
                       "d_fake": torch.sigmoid(out_fake.float()).mean()}, real.shape[0] * runtime.world_size)

            done = step + 1  # steps completed
            final, stopping = done == cfg.steps, stop.received is not None
            checkpoint_now = done % cfg.checkpoint_every == 0 or final or stopping
            if done % cfg.log_every == 0 or checkpoint_now:  # a checkpoint closes the running means: resumed runs log alike
                log_losses(run, meter, done, bar, data)
            if runtime.is_main and (done % cfg.eval_every == 0 or final):
                last_eval = compare_sets(generate(raw_G, eval_z, runtime, use_bf16).cpu(), held_out.cpu(), data.window)
                run.log({"step": done, "eval": last_eval})
            if runtime.is_main and (done % cfg.sample_every == 0 or final):
                grid = display(generate(raw_G, fixed_z, runtime, use_bf16), data.window, cfg.display_window)
                save_grid(grid, run.path / f"samples_{done:06d}.png")
                save_grid(grid, run.path / "samples_latest.png")
                run.plot_losses(["loss_d", "loss_g"])
            if checkpoint_now:
                save_state(run, done, models, optimizers, architecture)
            if stopping:
                break
    bar.close()
    stop.exit_if_stopped(done, cfg.steps, runtime.is_main)
    log_ddp_checksums(run, raw_G, done)

    # Save: the generator file every later stage starts from.
    if runtime.is_main:
        save_generator(run.path / "generator.pt", "dcgan", raw_G, gen_args, data.window, cfg.data)
        print(f"DCGAN: generator written to {run.path / 'generator.pt'}; last evaluation {last_eval}")
    return last_eval


summary_line = last_evaluation  # the pipeline's one line for this stage


if __name__ == "__main__":
    run_cli(main, Settings, presets=PRESETS)

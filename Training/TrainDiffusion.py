"""Stage 2c: train a diffusion model (MONAI's DiffusionModelUNet) on preprocessed CT slices.

    python Training/TrainDiffusion.py --data data/demo/slices_64 --output runs/demo/diffusion --preset latent
    python Training/TrainDiffusion.py --data data/lidc_64 --output runs/lidc/ddpm --preset pixel   # on a GPU

The CPU default is latent diffusion (Rombach et al. 2022), as MONAI's 2D LDM tutorial builds it: an AutoencoderKL
(L1 reconstruction + 1e-6 KL; no perceptual or adversarial term, which need pretrained weights or a GPU's time)
trained first for --autoencoder-steps, then the UNet on its latents scaled by LatentDiffusionInferer's scale
factor (1 / std of the encoded latents) for --steps, epsilon prediction, MSE. --preset pixel is a DDPM in pixel
space (MONAI's 2D DDPM tutorial's shapes), for a GPU. generator.pt (latentct/generators/diffusion.py) samples by
deterministic DDIM; --ddim-steps sets the steps of this script's sample grids and evaluations only.
Rerunning the same command continues from the run folder's checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from latentct.generators.diffusion import LATENT_SCHEDULE, PIXEL_SCHEDULE, DiffusionGenerator
from latentct.generators.interface import save_generator
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
from latentct.train.checkpoint import load_file
from latentct.train.metrics import compare_sets
from latentct.train.rundir import RunDir
from latentct.train.runtime import autocast, evaluating, memory_format, resolve_switch, setup_runtime, unwrap, wrap_ddp
from latentct.train.signals import StopSignal
from latentct.util.settings import UserError, check, run_cli, setting, user_errors


@dataclass
class Settings(ImageTrainerSettings):
    """Train a diffusion model: latent diffusion (an AutoencoderKL, then the UNet in its latent) or pixel-space DDPM."""

    output: str = setting("runs/demo/diffusion", "run folder for checkpoints, metrics and generator.pt")
    space: str = setting("latent", "latent (an AutoencoderKL first, the CPU default) or pixel (a GPU's)",
                         choices=("latent", "pixel"))
    steps: int = setting(4000, "the UNet's optimiser steps (in latent diffusion after the autoencoder's)")
    autoencoder_steps: int = setting(2000, "the autoencoder's optimiser steps, before the UNet's (latent space only)")
    autoencoder: str | None = setting(None, "bring your own autoencoder: a LatentCT diffusion generator.pt, or a file "
                                      "{'args': AutoencoderKL's keyword arguments, 'state_dict'} (weights_only); "
                                      "then no autoencoder steps run")
    ae_channels: tuple[int, ...] = setting((16, 32, 32), "AutoencoderKL widths; each after the first halves the side "
                                           "(64 px -> a 16 x 16 latent)")
    latent_channels: int = setting(4, "channels of the autoencoder's latent")
    ae_norm_groups: int = setting(8, "GroupNorm groups in the autoencoder (divide every width)")
    ae_lr: float = setting(1e-3, "the autoencoder's Adam learning rate")
    kl_weight: float = setting(1e-6, "weight of the autoencoder's KL term (MONAI's LDM tutorial)")
    unet_channels: tuple[int, ...] = setting((32, 64, 64), "DiffusionModelUNet widths per level")
    attention: tuple[bool, ...] = setting((False, False, True), "self-attention per UNet level")
    res_blocks: int = setting(1, "residual blocks per level, in the UNet and the autoencoder")
    unet_norm_groups: int = setting(16, "GroupNorm groups in the UNet (divide every width)")
    head_channels: int = setting(16, "channels per attention head in the UNet")
    lr: float = setting(3e-4, "the UNet's Adam learning rate")
    train_timesteps: int = setting(1000, "diffusion timesteps T")
    beta_schedule: str = setting("scaled_linear_beta", "noise schedule (latent: MONAI's LDM tutorial's; pixel: "
                                 "its DDPM tutorial's linear_beta)",
                                 choices=("linear_beta", "scaled_linear_beta", "sigmoid_beta"))
    beta_start: float = setting(0.0015, "first beta")
    beta_end: float = setting(0.0195, "last beta")
    ddim_steps: int = setting(10, "DDIM steps of this script's sample grids and evaluations")

    def __post_init__(self):
        super().__post_init__()
        check(self.autoencoder_steps >= 0, "autoencoder_steps", "must not be negative")
        check(len(self.attention) == len(self.unet_channels), "attention",
              f"needs one value per UNet level ({len(self.unet_channels)}), got {len(self.attention)}")
        for name, groups, widths in (("ae_norm_groups", self.ae_norm_groups, self.ae_channels),
                                     ("unet_norm_groups", self.unet_norm_groups, self.unet_channels)):
            check(groups >= 1 and all(w % groups == 0 for w in widths), name,
                  f"{groups} does not divide every width {widths}")
        check(all(w % self.head_channels == 0 for w, a in zip(self.unet_channels, self.attention) if a),
              "head_channels", f"{self.head_channels} does not divide the widths of the attention levels")
        check(self.lr > 0 and self.ae_lr > 0, "lr", "learning rates must be positive")
        check(self.ddim_steps >= 1, "ddim_steps", "must be at least 1")

    def schedule(self) -> dict:
        return dict(num_train_timesteps=self.train_timesteps, schedule=self.beta_schedule, beta_start=self.beta_start,
                    beta_end=self.beta_end)


PRESETS = {
    # The CPU default, chosen by measurement (docs/diffusion.md): 2 cores train the autoencoder in about 9 minutes
    # and the UNet in about 10.
    "latent": dict(space="latent", batch_size=32, autoencoder_steps=2000, steps=4000, eval_every=1000,
                   sample_every=1000, checkpoint_every=500, beta_schedule=LATENT_SCHEDULE["schedule"],
                   beta_start=LATENT_SCHEDULE["beta_start"], beta_end=LATENT_SCHEDULE["beta_end"]),
    # Pixel-space DDPM after MONAI's 2D DDPM tutorial (widths 128/256/256, attention on the lower two levels, one
    # residual block, 1,000 linear betas), for a GPU.
    "pixel": dict(space="pixel", batch_size=64, autoencoder_steps=0, steps=10000, unet_channels=(128, 256, 256),
                  attention=(False, True, True), unet_norm_groups=32, head_channels=256, lr=1e-4,
                  beta_schedule=PIXEL_SCHEDULE["schedule"], beta_start=PIXEL_SCHEDULE["beta_start"],
                  beta_end=PIXEL_SCHEDULE["beta_end"], eval_every=2000,
                  sample_every=1000, checkpoint_every=1000),
    # The tests' size: a few steps of each network at 32 px.
    "tiny": dict(space="latent", batch_size=8, autoencoder_steps=4, steps=4, ae_channels=(8, 8), latent_channels=2,
                 ae_norm_groups=4, unet_channels=(8, 16), attention=(False, True), unet_norm_groups=4,
                 head_channels=8, ddim_steps=3, eval_every=4, sample_every=8, checkpoint_every=4, eval_samples=8,
                 augment=False),
}


SCALE_SLICES = 256  # held-out slices whose encodings set LatentDiffusionInferer's scale factor


def own_autoencoder(path: str) -> tuple[dict, dict]:
    """(AutoencoderKL arguments, state dict) from a LatentCT diffusion generator.pt or an {args, state_dict} file."""
    state = load_file(path, "autoencoder file")
    if isinstance(state, dict) and state.get("kind") == "diffusion" and state["args"].get("autoencoder"):
        prefix = "autoencoder."
        return state["args"]["autoencoder"], {k[len(prefix):]: v for k, v in state["state_dict"].items()
                                              if k.startswith(prefix)}
    if isinstance(state, dict) and isinstance(state.get("args"), dict) and isinstance(state.get("state_dict"), dict):
        return state["args"], state["state_dict"]
    raise UserError(f"--autoencoder: {path} is neither a latent-diffusion generator.pt nor a file holding 'args' "
                    "(AutoencoderKL's keyword arguments) and 'state_dict'")


def architecture_args(cfg: Settings, image_size: int, ae_args: dict | None) -> dict:
    """generator.pt's arguments except the scale factor: the UNet's, the autoencoder's, the schedule, x_T's shape."""
    if cfg.space == "latent":
        ae_args = ae_args or dict(in_channels=1, out_channels=1, num_res_blocks=cfg.res_blocks,
                                  channels=list(cfg.ae_channels), attention_levels=[False] * len(cfg.ae_channels),
                                  latent_channels=cfg.latent_channels, norm_num_groups=cfg.ae_norm_groups,
                                  with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
        side = image_size // 2 ** (len(ae_args["channels"]) - 1)
        sample_shape = [ae_args["latent_channels"], side, side]
    else:
        ae_args, sample_shape = None, [1, image_size, image_size]
    unet = dict(in_channels=sample_shape[0], out_channels=sample_shape[0], num_res_blocks=cfg.res_blocks,
                channels=list(cfg.unet_channels), attention_levels=list(cfg.attention),
                norm_num_groups=cfg.unet_norm_groups, num_head_channels=cfg.head_channels)
    return dict(unet=unet, autoencoder=ae_args, schedule=cfg.schedule(), sample_shape=sample_shape)


@torch.no_grad()
def latent_scale(autoencoder, images: torch.Tensor) -> float:
    """LatentDiffusionInferer's scale factor: 1 / the standard deviation of the encoded latents (here the
    posterior means of the held-out slices, so the value depends on the autoencoder's weights alone)."""
    with evaluating(autoencoder):
        z = torch.cat([autoencoder.encode(part)[0] for part in images.split(64)])
    return float(1.0 / z.float().std())


def samples(model: DiffusionGenerator, z: torch.Tensor, runtime, use_bf16: bool) -> torch.Tensor:
    """Images of starting noises z by deterministic DDIM, in eval mode, as float32."""
    with evaluating(model), autocast(runtime, use_bf16):
        return torch.cat([model(part.to(runtime.device)).float() for part in z.split(128)])


def main(cfg: Settings) -> dict:
    # Setup: device, data, run folder.
    runtime = setup_runtime(cfg.device)
    torch.manual_seed(cfg.seed)
    data = TrainData(cfg.data, cfg.window, runtime, workers=cfg.workers)
    if cfg.epochs is not None:
        cfg.steps = math.ceil(cfg.epochs * steps_per_epoch(len(data), cfg.batch_size, runtime.world_size))
    run = RunDir(cfg.output, cfg, runtime)
    use_bf16, compiled = resolve_switch(cfg.bf16, runtime), resolve_switch(cfg.compile, runtime)
    layout = memory_format(cfg.channels_last, runtime, compiled)

    # Models: one DiffusionGenerator holds the UNet and the autoencoder; their args go into generator.pt.
    brought = own_autoencoder(cfg.autoencoder) if cfg.autoencoder and cfg.space == "latent" else None
    ae_steps = 0 if cfg.space == "pixel" or brought else cfg.autoencoder_steps
    args = architecture_args(cfg, data.image_size, brought[0] if brought else None)
    if cfg.space == "latent" and data.image_size % 2 ** (len(args["autoencoder"]["channels"]) - 1):
        raise UserError(f"--ae-channels: {len(args['autoencoder']['channels']) - 1} halvings do not divide the "
                        f"{data.image_size} px slices of --data {cfg.data}")
    with user_errors(f"--data {cfg.data}: "):
        model = DiffusionGenerator(**args, scale_factor=1.0).configure(ddim_steps=cfg.ddim_steps)
        model = model.to(runtime.device, memory_format=layout)
    if brought:
        model.autoencoder.load_state_dict(brought[1])
    ae, unet = model.autoencoder, model.unet
    models = {"unet": unet} | ({"autoencoder": ae} if ae is not None else {})
    optimizers = {"unet": torch.optim.Adam(unet.parameters(), lr=cfg.lr)}
    if ae is not None:
        optimizers["autoencoder"] = torch.optim.Adam(ae.parameters(), lr=cfg.ae_lr)
    architecture = dict(args, autoencoder_steps=ae_steps)
    from monai.networks.schedulers import DDPMScheduler

    noise_scheduler = DDPMScheduler(**args["schedule"])
    total = ae_steps + cfg.steps  # one step counter: the autoencoder's steps, then the UNet's

    # Evaluation inputs: held-out slices and fixed starting noise.
    held_out = data.held_out(cfg.data, cfg.eval_samples).to(runtime.device)
    # The scale factor's slices: a fixed set, so a run resumed with another --eval-samples scales alike.
    scale_slices = data.held_out(cfg.data, SCALE_SLICES).to(runtime.device)
    eval_z = torch.randn(len(held_out), model.x_dim, generator=torch.Generator().manual_seed(cfg.seed + 1))
    fixed_z = eval_z[:64]
    start = resume(run, cfg, runtime, models, optimizers, architecture)
    if ae is not None and start >= ae_steps:  # the autoencoder is done: its scale factor follows from its weights
        model.scale_factor = latent_scale(ae, scale_slices)
    ae_train = wrap_ddp(ae, runtime) if ae is not None and ae_steps else None
    unet_train = wrap_ddp(unet, runtime)
    if compiled:
        unet_train = torch.compile(unet_train)

    # The loop: the autoencoder's steps (L1 + KL), then the UNet's (noise prediction on scaled latents); the
    # schedule at its end.
    meter, bar, last_eval, done = LossMeter(), progress_bar(run, total, start), {}, start
    with StopSignal() as stop:
        for step, real in data.batches(cfg.batch_size, start, total, cfg.seed, cfg.augment):
            real = real.contiguous(memory_format=layout)
            if step < ae_steps:
                ae.train()
                with autocast(runtime, use_bf16):
                    recon, mu, sigma = ae_train(real)
                rec = (recon.float() - real).abs().mean()
                kl = 0.5 * (mu.float().pow(2) + sigma.float().pow(2) - torch.log(sigma.float().pow(2) + 1e-12)
                            - 1).flatten(1).sum(1).mean()
                loss = rec + cfg.kl_weight * kl
                optimizers["autoencoder"].zero_grad(set_to_none=True)
                loss.backward()
                optimizers["autoencoder"].step()
                meter.add({"ae_loss": loss, "ae_l1": rec, "ae_kl": kl}, real.shape[0] * runtime.world_size)
            else:
                if ae is not None and step == ae_steps:
                    model.scale_factor = latent_scale(ae, scale_slices)
                    run.log({"step": step, "scale_factor": model.scale_factor})
                with torch.no_grad():
                    latent = real if ae is None else ae.eval().encode_stage_2_inputs(real) * model.scale_factor
                noise = torch.randn_like(latent)
                t = torch.randint(0, noise_scheduler.num_train_timesteps, (len(latent),), device=latent.device)
                with autocast(runtime, use_bf16):
                    pred = unet_train(noise_scheduler.add_noise(latent, noise, t), t)
                loss = F.mse_loss(pred.float(), noise.float())
                optimizers["unet"].zero_grad(set_to_none=True)
                loss.backward()
                optimizers["unet"].step()
                meter.add({"loss": loss}, real.shape[0] * runtime.world_size)

            done = step + 1  # steps completed
            final, stopping = done == total, stop.received is not None
            phase_end = done == ae_steps
            checkpoint_now = done % cfg.checkpoint_every == 0 or final or stopping or phase_end
            if done % cfg.log_every == 0 or checkpoint_now:  # a checkpoint closes the running means
                log_losses(run, meter, done, bar, data)
            if runtime.is_main and (done % cfg.eval_every == 0 or final or phase_end):
                if done <= ae_steps:
                    with evaluating(ae):
                        recon = torch.cat([ae.reconstruct(part) for part in held_out.split(64)]).clamp(-1, 1)
                    last_eval = {"autoencoder_l1": float((recon - held_out).abs().mean())}
                    save_grid(display(torch.cat([held_out[:32], recon[:32]]).cpu(), data.window, cfg.display_window),
                              run.path / "reconstructions_latest.png")
                else:
                    last_eval = compare_sets(samples(model, eval_z, runtime, use_bf16).cpu(), held_out.cpu(),
                                             data.window)
                run.log({"step": done, "eval": last_eval})
            if runtime.is_main and done > ae_steps and (done % cfg.sample_every == 0 or final):
                grid = display(samples(model, fixed_z, runtime, use_bf16), data.window, cfg.display_window)
                save_grid(grid, run.path / f"samples_{done:06d}.png")
                save_grid(grid, run.path / "samples_latest.png")
                run.plot_losses(["loss", "ae_l1"])
            if checkpoint_now:
                save_state(run, done, models, optimizers, architecture)
            if stopping:
                break
    bar.close()
    stop.exit_if_stopped(done, total, runtime.is_main)
    log_ddp_checksums(run, unet, done)

    # Save: the UNet, the autoencoder and the scale factor: every later stage samples from this file.
    if runtime.is_main:
        saved = dict(args, scale_factor=model.scale_factor)
        save_generator(run.path / "generator.pt", "diffusion", unwrap(model), saved, data.window, cfg.data)
        print(f"diffusion: generator written to {run.path / 'generator.pt'}; last evaluation {last_eval}")
    return last_eval


summary_line = last_evaluation  # the pipeline's one line for this stage


if __name__ == "__main__":
    run_cli(main, Settings, presets=PRESETS)

"""Discover directions by contrast in the variation space: DisCo (Ren et al., ICLR 2022, "Learning Disentangled
Representation by Exploiting Pretrained Generative Models: A Contrastive Learning View"; reference code
xrenaa/DisCo, whose train.py ignores its command-line flags through ``parse_args([])``: the defaults below are
the ones it really runs with, scaled down where the demo preset says so).

    python Training/TrainDisCo.py --preset demo --generator runs/demo/dcgan/generator.pt --output runs/demo/dcgan_disco

A navigator (a deformator: K directions) and an image encoder E are trained together. The *variation* of a
shift is |E(G(z + shift)) - E(G(z))|, normalised. Each step picks one direction: the variations of shifts along
it on one batch (queries) and on other samples (positives) are pulled together, those along other directions
(negatives) pushed apart, with a binary cross-entropy on the similarities; negatives more similar than 0.95
count as positives to that degree (hard negative flipping), and the entropy of the softmax of each query is
added (each direction should change few of E's outputs). G stays frozen. E is kept (encoder.pt): it embeds
real slices in the variation space. RCA is measured afterwards like a baseline's: a fresh reconstructor on the
frozen directions (Training/TrainDirections.py --method file).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from latentct.discover.directions import make_shifts, rca_line, save_directions
from latentct.generators.interface import GeneratorOptions, latent_spread, load_generator, output_size, sample_latents
from latentct.models.deformator import KINDS, Deformator
from latentct.show.render import direction_chart
from latentct.train.bookkeeping import LossMeter, TrainerSettings, log_losses, progress_bar, resume, save_state
from latentct.train.rundir import RunDir
from latentct.train.runtime import autocast, resolve_switch, setup_runtime, unwrap
from latentct.train.signals import StopSignal
from latentct.util.io import atomic_torch_save
from latentct.util.settings import check, run_cli, setting, settings_dict, user_errors


@dataclass
class Settings(GeneratorOptions, TrainerSettings):
    """Train DisCo's navigator and contrastive encoder on a frozen generator."""

    generator: str = setting("runs/demo/dcgan/generator.pt", "generator (as Training/TrainDirections.py takes it)")
    output: str = setting("runs/demo/dcgan_disco", "run folder for directions.pt, encoder.pt and charts")
    directions_count: int | None = setting(None, "K (default: the latent size, as the reference's orthogonal navigator)")
    deformator: str = setting("ortho", "navigator type (the reference's default: ortho, random init)", choices=KINDS)
    code_size: int = setting(64, "outputs of the encoder E (reference: z_dim 64)")
    encoder_width: int = setting(64, "channels of E's first convolution (reference: 64)")
    positives: int = setting(32, "N, shifted samples along the same direction (reference: 32)")
    negatives: int = setting(64, "K, shifted samples along other directions (reference: 64)")
    shift_scale: float = setting(6.0, "shifts are scale x N(0, 1) (reference: 6); evaluation sweeps +-scale")
    min_shift: float = setting(0.5, "smallest |shift| (reference: 0.5; its clamp of small negative shifts never "
                               "fires, here both signs are clamped)")
    flip_threshold: float = setting(0.95, "hard negative flipping: negatives above this similarity (reference 0.95)")
    entropy: bool = setting(True, "the entropy term on the queries' softmax (reference: on)")
    lr: float = setting(1e-4, "Adam learning rate for navigator and encoder (reference: 1e-4, betas 0.9, 0.999)")
    batch_size: int = setting(32, "B, queries per step (reference: 32)")
    steps: int = setting(70000, "optimiser steps (reference: 70,000)")
    sample_every: int = setting(500, "steps between direction charts")

    def __post_init__(self):
        super().__post_init__()
        for name in ("code_size", "encoder_width", "positives", "negatives"):
            check(getattr(self, name) >= 1, name, f"must be at least 1, got {getattr(self, name)}")
        check(self.shift_scale > 0 and 0 <= self.min_shift <= self.shift_scale, "min_shift",
              "must be between 0 and --shift-scale")


PRESETS = {
    # CPU-sized: a projection navigator with the demo's 16 directions, a narrow encoder, half the samples.
    "demo": dict(deformator="proj", directions_count=16, encoder_width=8, code_size=32, positives=16,
                 negatives=32, batch_size=16, steps=300, lr=1e-3, eval_every=300, sample_every=300),
}


class VariationEncoder(nn.Module):
    """The reference's encoder shape: a 7 x 7 convolution, strided 4 x 4 convolutions down to 4 x 4 and three
    linear layers, scaled by ``width``."""

    def __init__(self, image_size: int, code_size: int, width: int = 64, channels: int = 1):
        super().__init__()
        layers, c, size, widths = [nn.Conv2d(channels, width, 7, 1, 3), nn.LeakyReLU()], width, image_size, []
        while size > 4:
            out = min(width * 2 ** (len(widths) + 1), 4 * width)
            widths.append(out)
            layers += [nn.Conv2d(c, out, 4, 2, 1), nn.LeakyReLU()]
            c, size = out, size // 2
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * 16, 256), nn.LeakyReLU(), nn.Linear(256, 256),
                                 nn.LeakyReLU(), nn.Linear(256, code_size))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.net((x + 1) / 2)  # the reference feeds images in [0, 1]


def direction_shifts(index: torch.Tensor, count: int, scale: float, min_shift: float, device) -> torch.Tensor:
    """(n, K) basis shifts along the given directions with sizes scale x N(0, 1), |size| >= min_shift."""
    _, sizes, _ = make_shifts(len(index), count, scale, min_shift, "normal", device)
    out = torch.zeros(len(index), count, device=device)
    out[torch.arange(len(index), device=device), index.to(device)] = sizes
    return out


def variation(G, encoder, z: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Normalised |E(G(z + shift)) - E(G(z))|; G(z) carries no graph (G is frozen)."""
    with torch.no_grad():
        base = G(z)
    return F.normalize((encoder(G(z + shift)) - encoder(base)).abs(), dim=1)


def disco_losses(G, navigator, encoder, cfg: Settings, K: int, spread: float, device):
    """One step's losses: (total, contrastive BCE, entropy, share of negatives flipped). Shifts are in units of
    the latents' ``spread``."""
    scale, least = cfg.shift_scale * spread, cfg.min_shift * spread
    target = torch.randint(0, K, (1,)).item()
    q = variation(G, encoder, sample_latents(G, cfg.batch_size, device=device),
                  navigator(direction_shifts(torch.full((cfg.batch_size,), target), K, scale, least, device)))
    k = variation(G, encoder, sample_latents(G, cfg.positives, device=device),
                  navigator(direction_shifts(torch.full((cfg.positives,), target), K, scale, least, device)))
    others = torch.randint(0, K - 1, (cfg.negatives,))
    others = others + (others >= target).long()  # any direction but the target
    queue = variation(G, encoder, sample_latents(G, cfg.negatives, device=device),
                      navigator(direction_shifts(others, K, scale, least, device))).detach()
    logits = torch.cat([q @ k.t(), q @ queue.t()], dim=1).float()
    labels = torch.zeros_like(logits)
    hard = logits > cfg.flip_threshold
    labels[hard] = logits[hard].detach()
    labels[:, : cfg.positives] = 1.0
    bce = F.binary_cross_entropy_with_logits(logits, labels)
    p = F.softmax(q.float(), dim=1)
    entropy = -(p * torch.log(p + 1e-5)).sum(1).mean()
    loss = bce + (entropy if cfg.entropy else 0.0)
    return loss, bce, entropy, hard[:, cfg.positives:].float().mean()


def main(cfg: Settings) -> dict:
    # Setup: device, run folder, the frozen generator.
    runtime = setup_runtime(cfg.device)
    torch.manual_seed(cfg.seed)
    run = RunDir(cfg.output, cfg, runtime)
    use_bf16 = resolve_switch(cfg.bf16, runtime)
    G = load_generator(cfg.generator, runtime.device, **cfg.generator_options())
    spread = latent_spread(G)  # shifts are given in units of the latents' spread

    # Models: the navigator (a deformator) and the encoder E.
    K = cfg.directions_count or G.latent_dim
    navigator_args = dict(directions_count=K, latent_dim=G.latent_dim, random_init=True, seed=cfg.seed)
    with user_errors():
        navigator = Deformator(cfg.deformator, **navigator_args).to(runtime.device)
    size = output_size(G)
    encoder_args = dict(image_size=size, code_size=cfg.code_size, width=cfg.encoder_width, channels=G.planes)
    encoder = VariationEncoder(**encoder_args).to(runtime.device)
    opt = torch.optim.Adam([*navigator.parameters(), *encoder.parameters()], lr=cfg.lr, betas=(0.9, 0.999))
    models, optimizers = {"navigator": navigator, "encoder": encoder}, {"adam": opt}
    architecture = {"method": "disco", "navigator": navigator_args, "kind": cfg.deformator, "encoder": encoder_args}
    chart_z = sample_latents(G, 1, torch.Generator().manual_seed(cfg.seed + 1), runtime.device)
    start = resume(run, cfg, runtime, models, optimizers, architecture)

    # The loop: one contrastive step per target direction; the schedule at its end.
    meter, bar, done = LossMeter(), progress_bar(run, cfg.steps, start), start
    with StopSignal() as stop:
        for step in range(start, cfg.steps):
            with autocast(runtime, use_bf16):
                loss, bce, entropy, flipped = disco_losses(G, navigator, encoder, cfg, K, spread, runtime.device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            meter.add({"loss": loss, "contrastive": bce, "entropy": entropy, "flipped": flipped},
                      cfg.batch_size + cfg.positives + cfg.negatives)

            done = step + 1  # steps completed
            final, stopping = done == cfg.steps, stop.received is not None
            checkpoint_now = done % cfg.checkpoint_every == 0 or final or stopping
            if done % cfg.log_every == 0 or checkpoint_now:  # a checkpoint closes the running means: resumed runs log alike
                log_losses(run, meter, done, bar)
            if runtime.is_main and (done % cfg.sample_every == 0 or final):
                direction_chart(G, navigator, chart_z, cfg.shift_scale * spread, cfg.display_window,
                                run.path / f"directions_{done:06d}.png")
                run.plot_losses(["loss", "contrastive", "entropy"])
            if checkpoint_now:
                save_state(run, done, models, optimizers, architecture)
            if stopping:
                break
    bar.close()
    stop.exit_if_stopped(done, cfg.steps, runtime.is_main)

    # Save: the directions (RCA measured afterwards on the frozen directions) and the encoder.
    if runtime.is_main:
        atomic_torch_save({"args": encoder_args, "state_dict": {k: v.cpu() for k, v in unwrap(encoder).state_dict().items()}},
                          run.path / "encoder.pt")
        save_directions(run.path / "directions.pt", "disco", unwrap(navigator), G, settings_dict(cfg),
                        None, navigator_args, extra={"encoder": str(run.path / "encoder.pt")})
        print(f"directions (disco, K={K}) -> {run.path / 'directions.pt'}")
    return {"steps": done}


summary_line = rca_line  # the pipeline's one line for this stage


if __name__ == "__main__":
    run_cli(main, Settings, presets=PRESETS)

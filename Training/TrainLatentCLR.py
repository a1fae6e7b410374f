"""Discover global directions by contrasting the changes they cause in an intermediate layer: LatentCLR
(Yüksel et al., ICCV 2021, "LatentCLR: A Contrastive Learning Approach for Unsupervised Discovery of
Interpretable Directions"; reference code catlab-team/latentclr, its "global" model and defaults: K = 32,
alpha 0.1, batch 32, Adam 1e-3 with weight decay 1e-3, steps decayed x0.2 at 1,000 and 5,000, 10,000 iterations,
contrastive loss with temperature factor 0.5 on absolute similarities, mean reduction).

    python Training/TrainLatentCLR.py --preset demo --generator runs/demo/dcgan/generator.pt --output runs/demo/dcgan_latentclr

K directions (a K x d matrix, each row normalised and scaled by alpha) are added to every sample of a batch.
For each (direction, sample) pair the change of the layer's output (both sides normalised, as the
reference's identity projector does) is normalised again; changes caused by the same direction are positives,
changes caused by others negatives: loss = -log(mean exp(0.5 |sim|) over positives / over negatives). Only
the global (z-independent) variant is implemented: it is the one whose directions are one matrix, which the
directions artifact and every metric take. RCA is measured afterwards on the frozen directions
(Training/TrainDirections.py --method file).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from latentct.discover.directions import rca_line, save_directions
from latentct.generators.features import default_layer, layer_features
from latentct.generators.interface import GeneratorOptions, latent_spread, load_generator, sample_latents
from latentct.models.deformator import FixedDirections
from latentct.show.render import direction_chart
from latentct.train.bookkeeping import LossMeter, TrainerSettings, log_losses, progress_bar, resume, save_state
from latentct.train.rundir import RunDir
from latentct.train.runtime import autocast, resolve_switch, setup_runtime
from latentct.train.signals import StopSignal
from latentct.util.settings import UserError, check, run_cli, setting, settings_dict


@dataclass
class Settings(GeneratorOptions, TrainerSettings):
    """Train LatentCLR's global directions on a frozen generator."""

    generator: str = setting("runs/demo/dcgan/generator.pt", "generator (as Training/TrainDirections.py takes it)")
    output: str = setting("runs/demo/dcgan_latentclr", "run folder for directions.pt and charts")
    directions_count: int = setting(32, "K (reference: 32)")
    feature_layer: str | None = setting(None, "the layer whose change is contrasted (default per generator: "
                                       "latentct/generators/features.py)")
    alpha: float = setting(0.1, "size of each shift during training (reference global model: 0.1)")
    temperature: float = setting(0.5, "factor on the similarities before exp (reference: 0.5, a multiplier)")
    lr: float = setting(1e-3, "Adam learning rate (reference: 1e-3)")
    weight_decay: float = setting(1e-3, "Adam weight decay (reference: 1e-3)")
    milestones: tuple[int, int] = setting((1000, 5000), "steps where the learning rate drops x0.2 (reference)")
    shift_scale: float = setting(6.0, "the range evaluation sweeps (+-scale; directions are unit vectors)")
    batch_size: int = setting(32, "samples per step, each shifted by every direction (reference: 32)")
    steps: int = setting(10000, "optimiser steps (reference: 10,000)")
    sample_every: int = setting(500, "steps between direction charts")

    def __post_init__(self):
        super().__post_init__()
        check(self.directions_count >= 2, "directions_count", "needs at least 2 directions to contrast")
        check(self.alpha > 0, "alpha", "must be positive")


PRESETS = {
    # CPU-sized: the demo's 16 directions, a smaller batch.
    "demo": dict(directions_count=16, batch_size=16, steps=300, eval_every=300, sample_every=300,
                 milestones=(150, 250)),
}


class GlobalDirections(nn.Module):
    """K learned directions, independent of z."""

    def __init__(self, count: int, latent_dim: int, seed: int = 0):
        super().__init__()
        self.params = nn.Parameter(torch.randn(count, latent_dim, generator=torch.Generator().manual_seed(seed)))

    def unit(self) -> torch.Tensor:
        return F.normalize(self.params, dim=1)


def contrastive_loss(changes: torch.Tensor, count: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """changes (K * B, m), ordered direction by direction: (loss, share of rows whose positives beat negatives)."""
    n = len(changes)
    sim = torch.exp((changes @ changes.t()).abs() * temperature)
    same = torch.block_diag(*[torch.ones(n // count, n // count, dtype=torch.bool, device=changes.device)] * count)
    not_self = ~torch.eye(n, dtype=torch.bool, device=changes.device)
    pos = sim.masked_select(same & not_self).view(n, -1).mean(1)
    neg = sim.masked_select(~same).view(n, -1).mean(1)
    return -torch.log(pos / neg).mean(), (pos > neg).float().mean()


def main(cfg: Settings) -> dict:
    # Setup: device, run folder, the frozen generator and the layer it is read at.
    runtime = setup_runtime(cfg.device)
    torch.manual_seed(cfg.seed)
    run = RunDir(cfg.output, cfg, runtime)
    use_bf16 = resolve_switch(cfg.bf16, runtime)
    G = load_generator(cfg.generator, runtime.device, **cfg.generator_options())
    if not G.hookable:
        raise UserError(f"--generator: {cfg.generator} is {G.reference['kind']}, which runs without forward hooks: "
                        "LatentCLR needs an intermediate layer (use the learned method, random or coordinate)")
    spread = latent_spread(G)
    layer = cfg.feature_layer or default_layer(G)
    features = layer_features(G, layer)

    # Model: the directions, the optimiser and its step schedule.
    K = cfg.directions_count
    directions = GlobalDirections(K, G.latent_dim, cfg.seed).to(runtime.device)
    opt = torch.optim.Adam(directions.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.milestones), gamma=0.2)
    models, optimizers = {"directions": directions}, {"adam": opt, "schedule": sched}
    architecture = {"method": "latentclr", "K": K, "latent_dim": G.latent_dim, "layer": layer}
    chart_z = sample_latents(G, 1, torch.Generator().manual_seed(cfg.seed + 1), runtime.device)
    start = resume(run, cfg, runtime, models, optimizers, architecture)

    # The loop: every direction on every sample, contrast the normalised changes; the schedule at its end.
    meter, bar, done = LossMeter(), progress_bar(run, cfg.steps, start), start
    with StopSignal() as stop:
        for step in range(start, cfg.steps):
            z = sample_latents(G, cfg.batch_size, device=runtime.device)
            with torch.no_grad(), autocast(runtime, use_bf16):
                base = F.normalize(features(z).float(), dim=1)
            shifted = (z[None] + cfg.alpha * spread * directions.unit()[:, None]).reshape(K * cfg.batch_size, -1)
            with autocast(runtime, use_bf16):
                moved = F.normalize(features(shifted).float(), dim=1)
            changes = F.normalize(moved - base.repeat(K, 1), dim=1)
            loss, accuracy = contrastive_loss(changes, K, cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            meter.add({"loss": loss, "accuracy": accuracy}, K * cfg.batch_size)

            done = step + 1  # steps completed
            final, stopping = done == cfg.steps, stop.received is not None
            checkpoint_now = done % cfg.checkpoint_every == 0 or final or stopping
            if done % cfg.log_every == 0 or checkpoint_now:  # a checkpoint closes the running means: resumed runs log alike
                log_losses(run, meter, done, bar)
            if runtime.is_main and (done % cfg.sample_every == 0 or final):
                fixed = FixedDirections(directions.unit().detach())
                direction_chart(G, fixed, chart_z, cfg.shift_scale * spread, cfg.display_window,
                                run.path / f"directions_{done:06d}.png")
                run.plot_losses(["loss", "accuracy"])
            if checkpoint_now:
                save_state(run, done, models, optimizers, architecture)
            if stopping:
                break
    bar.close()
    stop.exit_if_stopped(done, cfg.steps, runtime.is_main)

    # Save: the unit directions (RCA measured afterwards on them, frozen).
    if runtime.is_main:
        save_directions(run.path / "directions.pt", "latentclr", FixedDirections(directions.unit().detach().cpu()),
                        G, settings_dict(cfg), None, extra={"layer": layer})
        print(f"directions (latentclr, K={K}, layer {layer}) -> {run.path / 'directions.pt'}")
    return {"steps": done}


summary_line = rca_line  # the pipeline's one line for this stage


if __name__ == "__main__":
    run_cli(main, Settings, presets=PRESETS)

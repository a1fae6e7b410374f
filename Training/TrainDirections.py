"""Stage 3: discover latent directions of any generator (Voynov & Babenko 2020), or compute a baseline.

    python Training/TrainDirections.py --generator runs/demo/dcgan/generator.pt --output runs/demo/dcgan_dirs
    python Training/TrainDirections.py --preset unit-lenet --generator ... --output ...      # the study's grid
    python Training/TrainDirections.py --method sefa --generator ... --output runs/demo/dcgan_sefa

A matrix of K directions (the deformator) is trained jointly with a reconstructor that sees
(G(z), G(z + eps * A e_k)) and predicts k and eps; G stays frozen. With --method sefa | pca | random |
coordinate the directions are computed and frozen, and a fresh reconstructor is trained on them for the same
number of steps, so every method's reconstructor classification accuracy (RCA) is measured alike.
Outputs: directions.pt (the artifact every later stage reads), checkpoint.pt, metrics.jsonl, directions_*.png.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from latentct.discover.baselines import baseline_matrix, spectral, supervised
from latentct.discover.directions import (
    load_directions,
    make_shifts,
    reconstructor_accuracy,
    save_directions,
    step_losses,
)
from latentct.generators.interface import GeneratorOptions, latent_spread, load_generator, sample_latents
from latentct.models.deformator import KINDS, Deformator, FixedDirections
from latentct.models.reconstructor import make_reconstructor
from latentct.score.oracle import load_oracle
from latentct.show.render import direction_chart
from latentct.train.bookkeeping import LossMeter, TrainerSettings, log_losses, progress_bar, resume, save_state
from latentct.train.rundir import RunDir
from latentct.train.runtime import autocast, memory_format, resolve_switch, setup_runtime, unwrap, wrap_ddp
from latentct.train.signals import StopSignal
from latentct.util.io import atomic_torch_save
from latentct.util.settings import check, run_cli, setting, settings_dict, user_errors

METHODS = ("learned", "sefa", "pca", "random", "coordinate", "spectral", "supervised", "file")


@dataclass
class Settings(GeneratorOptions, TrainerSettings):
    """Find interpretable latent directions of a generator without labels."""

    generator: str = setting("runs/demo/dcgan/generator.pt", "generator: a generator.pt, file.py:factory, "
                             "package.module:factory, a TorchScript or a torch.export file (README: your own generator)")
    output: str = setting("runs/demo/dcgan_directions", "run folder for directions.pt, checkpoints and charts")
    method: str = setting("learned", "learned (deformator + reconstructor) or a baseline", choices=METHODS)
    directions_count: int = setting(32, "K, the number of directions")
    deformator: str = setting("proj", "deformator type", choices=KINDS)
    deformator_bias: bool = setting(False, "a bias in linear/proj deformators (the original's; +eps, -eps not opposite)")
    random_init: bool = setting(True, "random initialisation of the deformator: the reference code's default "
                                "(GANLatentDiscovery's run_train.py: type=bool, default True, so it was never off); "
                                "here a real boolean. Off: the first K coordinate axes, which on the VAE start in "
                                "dimensions its KL term left unused (RCA 0.58 against 0.79 with random init)")
    reconstructor: str = setting("lenet", "reconstructor network", choices=("lenet", "resnet"))
    reconstructor_width: int | None = setting(None, "reconstructor width (LeNet 2, ResNet 64 when unset)")
    shift_distribution: str = setting("uniform", "distribution of eps", choices=("uniform", "normal"))
    shift_scale: float = setting(6.0, "eps is drawn in [-shift_scale, shift_scale], in units of the latents' spread "
                                 "(1 for N(0, I)); evaluation sweeps the same range")
    min_shift: float = setting(0.5, "smallest |eps|")
    label_weight: float = setting(1.0, "weight of the direction classification loss")
    shift_weight: float = setting(0.25, "weight of the shift regression loss")
    lr_deformator: float = setting(1e-4, "deformator learning rate")
    lr_reconstructor: float = setting(1e-4, "reconstructor learning rate")
    step_form: str = setting("split", "split (G(z) without graph), concat (one G call) or naive (original)",
                             choices=("split", "concat", "naive"))
    rca_batches: int = setting(100, "fresh batches for the reconstructor classification accuracy")
    rca: bool = setting(True, "for fixed directions (the baselines): train a fresh reconstructor for --steps to "
                        "measure their RCA like the learned directions'; off: directions only, RCA not measured")
    oracle: str | None = setting(None, "factor oracle (oracle.pt) the supervised method reads G(z) with")
    feature_layer: str | None = setting(None, "the layer whose Jacobian the spectral method decomposes (default per "
                                        "generator: latentct/generators/features.py)")
    directions_file: str | None = setting(None, "with --method file: a directions.pt (DisCo, LatentCLR) whose frozen "
                                          "directions get a fresh reconstructor, so their RCA is measured like a "
                                          "baseline's")
    supervised_samples: int = setting(2048, "latents the supervised method fits on (half as many more score the fit)")
    batch_size: int = setting(128, "image pairs per step and process")
    steps: int = setting(3000, "optimiser steps")
    eval_every: int = setting(500, "steps between RCA measurements")
    sample_every: int = setting(500, "steps between direction charts")

    def __post_init__(self):
        super().__post_init__()
        for name in ("directions_count", "rca_batches"):
            check(getattr(self, name) >= 1, name, f"must be at least 1, got {getattr(self, name)}")
        check(self.shift_scale > 0 and 0 <= self.min_shift <= self.shift_scale, "min_shift",
              "must be between 0 and --shift-scale")
        check(self.method != "supervised" or self.oracle is not None, "oracle",
              "the supervised method needs a factor oracle (python -m latentct.score.oracle writes one)")
        check(self.method != "file" or self.directions_file is not None, "directions_file",
              "--method file needs the directions.pt whose RCA to measure")
        check(self.rca or self.method != "learned", "rca", "the learned method always trains its reconstructor")


PRESETS = {  # the study's grid: {unit (proj, K=32), ortho (K=32), 100 (proj, K=100)} x {LeNet, ResNet}
    "unit-lenet": dict(deformator="proj", directions_count=32, reconstructor="lenet", batch_size=128, steps=3000),
    "unit-resnet": dict(deformator="proj", directions_count=32, reconstructor="resnet", batch_size=128, steps=3000),
    "ortho-lenet": dict(deformator="ortho", directions_count=32, reconstructor="lenet", batch_size=128, steps=3000),
    "ortho-resnet": dict(deformator="ortho", directions_count=32, reconstructor="resnet", batch_size=128, steps=3000),
    "100-lenet": dict(deformator="proj", directions_count=100, reconstructor="lenet", batch_size=128, steps=3000),
    "100-resnet": dict(deformator="proj", directions_count=100, reconstructor="resnet", batch_size=128, steps=3000),
    # CPU-sized: fewer directions and steps, faster learning rates, a wider LeNet.
    "demo": dict(deformator="proj", directions_count=16, reconstructor="lenet", reconstructor_width=4, batch_size=64,
                 steps=600, lr_deformator=1e-3, lr_reconstructor=1e-3, eval_every=300, rca_batches=20),
}


def main(cfg: Settings) -> dict:
    # Setup: device, run folder.
    rt = setup_runtime(cfg.device)
    torch.manual_seed(cfg.seed)
    run = RunDir(cfg.output, cfg, rt)
    use_bf16, compiled = resolve_switch(cfg.bf16, rt), resolve_switch(cfg.compile, rt)
    fmt = memory_format(cfg.channels_last, rt, compiled)

    # Models: G frozen (no weight gradients ever), the deformator (or fixed baseline directions), the reconstructor.
    G = load_generator(cfg.generator, rt.device, memory_format=fmt, **cfg.generator_options())
    spread = latent_spread(G)  # shifts are given in units of the latents' spread
    extra, method = {}, cfg.method  # what a method reports beside its directions; its name in the artifact
    if cfg.method == "learned":
        d_args = dict(directions_count=cfg.directions_count, latent_dim=G.latent_dim, bias=cfg.deformator_bias,
                      random_init=cfg.random_init, seed=cfg.seed)
        with user_errors():
            deformator = Deformator(cfg.deformator, **d_args).to(rt.device)
    elif cfg.method in ("supervised", "spectral", "file"):
        d_args = None
        if cfg.method == "supervised":
            matrix, extra = supervised(G, load_oracle(cfg.oracle), G.window, cfg.supervised_samples, cfg.seed)
        elif cfg.method == "spectral":
            matrix, extra = spectral(G, cfg.directions_count, cfg.feature_layer, seed=cfg.seed)
        else:
            source, _ = load_directions(cfg.directions_file, cfg.generator)
            matrix, method = source.matrix, source.method
            extra = dict(source.extra, trained_by=str(cfg.directions_file), training=source.state.get("settings"))
        deformator = FixedDirections(matrix).to(rt.device)
    else:
        d_args = None
        deformator = FixedDirections(baseline_matrix(cfg.method, G.cpu(), cfg.directions_count, cfg.seed)).to(rt.device)
        G.to(rt.device)
    if not cfg.rca and not deformator.trainable:  # the directions alone: nothing to train
        save_directions(run.path / "directions.pt", method, deformator, G, settings_dict(cfg), None,
                        extra=extra)
        print(f"directions ({method}, K={deformator.directions_count}, RCA not measured) -> "
              f"{run.path / 'directions.pt'}")
        return {}
    K = deformator.directions_count
    reconstructor = make_reconstructor(cfg.reconstructor, K, cfg.reconstructor_width, G.planes).to(rt.device,
                                                                                                  memory_format=fmt)
    optimizers = {"reconstructor": torch.optim.Adam(reconstructor.parameters(), lr=cfg.lr_reconstructor)}
    models = {"reconstructor": reconstructor}
    if deformator.trainable:
        optimizers["deformator"] = torch.optim.Adam(deformator.parameters(), lr=cfg.lr_deformator)
        models["deformator"] = deformator
    architecture = {"method": cfg.method, "deformator": d_args, "K": K, "R": cfg.reconstructor}
    shift_args = dict(shift_scale=cfg.shift_scale * spread, min_shift=cfg.min_shift * spread,
                      distribution=cfg.shift_distribution)
    chart_z = sample_latents(G, 1, torch.Generator().manual_seed(cfg.seed + 1), rt.device)

    start = resume(run, cfg, rt, models, optimizers, architecture)
    R, Gc = wrap_ddp(reconstructor, rt), G
    if compiled:
        R, Gc = torch.compile(R), torch.compile(G)
    deformator_d = wrap_ddp(deformator, rt) if deformator.trainable else deformator

    # The loop: sample (z, k, eps), reconstruct k and eps from the image pair, update both networks; the
    # schedule at its end.
    meter, bar, last_eval, done = LossMeter(), progress_bar(run, cfg.steps, start), {}, start
    with StopSignal() as stop:
        for step in range(start, cfg.steps):
            z = sample_latents(G, cfg.batch_size, device=rt.device)
            idx, eps, basis = make_shifts(cfg.batch_size, K, device=rt.device, **shift_args)
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            with autocast(rt, use_bf16):
                loss, label_loss, shift_loss, logits = step_losses(Gc, deformator_d, R, z, idx, eps, basis,
                                                                   cfg.label_weight, cfg.shift_weight, cfg.step_form)
            loss.backward()
            for opt in optimizers.values():
                opt.step()
            meter.add({"loss": loss, "label_loss": label_loss, "shift_loss": shift_loss,
                       "accuracy": (logits.argmax(1) == idx).float().mean()}, cfg.batch_size * rt.world_size)

            done = step + 1  # steps completed
            final, stopping = done == cfg.steps, stop.received is not None
            checkpoint_now = done % cfg.checkpoint_every == 0 or final or stopping
            if done % cfg.log_every == 0 or checkpoint_now:  # a checkpoint closes the running means: resumed runs log alike
                log_losses(run, meter, done, bar)
            if rt.is_main and (done % cfg.eval_every == 0 or final):
                with autocast(rt, use_bf16):
                    last_eval = {"rca": reconstructor_accuracy(G, deformator, reconstructor, cfg.rca_batches,
                                                               cfg.batch_size, shift_args, rt.device)}
                run.log({"step": done, "eval": last_eval})
            if rt.is_main and (done % cfg.sample_every == 0 or final):
                direction_chart(G, deformator, chart_z, cfg.shift_scale * spread, cfg.display_window,
                                run.path / f"directions_{done:06d}.png")
                run.plot_losses(["loss", "label_loss", "shift_loss", "accuracy"])
            if checkpoint_now:
                save_state(run, done, models, optimizers, architecture)
            if stopping:
                break
    bar.close()
    stop.exit_if_stopped(done, rt.is_main)

    # Save: the directions artifact every later stage reads, and the reconstructor.
    if rt.is_main:
        rca = last_eval.get("rca")
        save_directions(run.path / "directions.pt", method, unwrap(deformator), G,
                        settings_dict(cfg), rca, d_args, extra=extra)
        atomic_torch_save({k: v.cpu() for k, v in unwrap(reconstructor).state_dict().items()},
                          run.path / "reconstructor.pt")
        print(f"directions ({method}, K={K}): RCA {rca} -> {run.path / 'directions.pt'}")
    return last_eval


if __name__ == "__main__":
    run_cli(main, Settings, presets=PRESETS)

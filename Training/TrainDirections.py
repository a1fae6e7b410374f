"""Stage 3: discover latent directions of any generator (Voynov & Babenko 2020), or compute a baseline.

    python Training/TrainDirections.py --generator runs/demo/dcgan/generator.pt --output runs/demo/dcgan_dirs
    python Training/TrainDirections.py --preset unit-lenet --generator ... --output ...      # the study's grid
    python Training/TrainDirections.py --method sefa --generator ... --output runs/demo/dcgan_sefa
    python Training/TrainDirections.py --method unmix --unmix-from runs/demo/dcgan_sefa/directions.pt ...
    python Training/TrainDirections.py --init-directions runs/demo/dcgan_unmix/directions.pt ...   # learned, from them

A matrix of K directions (the deformator) is trained jointly with a reconstructor that sees
(G(z), G(z + eps * A e_k)) and predicts k and eps; G stays frozen. With --method sefa | pca | random |
coordinate | spectral | ica | spca | unmix the directions are computed and frozen (ICA, sparse PCA and the
unmixed span need not be orthogonal: latentct/discover/unmix.py), and a fresh reconstructor is trained on them
for the same number of steps, so every method's reconstructor classification accuracy (RCA) is measured alike.
Outputs: directions.pt (the artifact every later stage reads), checkpoint.pt, metrics.jsonl, directions_*.png.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from latentct.discover.baselines import baseline_matrix, ica, measurements, sparse_pca, spectral, supervised
from latentct.discover.directions import (
    load_directions,
    make_shifts,
    rca_line,
    reconstructor_accuracy,
    save_directions,
    step_losses,
)
from latentct.discover.metadata import METADATA_UNMIX
from latentct.discover.unmix import UNMIX_BY, unmix, whole_latent
from latentct.generators.interface import (
    GeneratorOptions,
    latent_spread,
    load_generator,
    output_size,
    own_encoder,
    sample_latents,
)
from latentct.models.deformator import KINDS, Deformator, FixedDirections
from latentct.models.reconstructor import make_reconstructor
from latentct.score.oracle import load_oracle
from latentct.show.render import direction_chart
from latentct.train.bookkeeping import LossMeter, TrainerSettings, log_losses, progress_bar, resume, save_state
from latentct.train.rundir import RunDir
from latentct.train.runtime import autocast, memory_format, resolve_switch, setup_runtime, wrap_ddp
from latentct.train.signals import StopSignal
from latentct.util.io import atomic_torch_save
from latentct.util.settings import UserError, check, run_cli, setting, settings_dict, user_errors

METHODS = ("learned", "sefa", "pca", "random", "coordinate", "spectral", "ica", "spca", "unmix", "metadata",
           "measurements", "supervised", "file", "hpca")
# Methods that learn or regress their directions from prior draws of the whole latent: in a diffusion h view those
# draws have dh = 0, and the directions must move dh only.
H_VIEW_REFUSED = ("learned", "ica", "spca", "metadata", "sefa", "pca", "measurements")


@dataclass
class Settings(GeneratorOptions, TrainerSettings):
    """Find interpretable latent directions of a generator without labels."""

    generator: str = setting("runs/demo/dcgan/generator.pt", "generator: a generator.pt, file.py:factory, "
                             "package.module:factory, a TorchScript or a torch.export file (docs/own-generator.md)")
    output: str = setting("runs/demo/dcgan_directions", "run folder for directions.pt, checkpoints and charts")
    method: str = setting("learned", "learned (deformator + reconstructor) or a baseline", choices=METHODS)
    directions_count: int = setting(32, "K, the number of directions")
    deformator: str = setting("proj", "deformator type", choices=KINDS)
    deformator_bias: bool = setting(False, "a bias in linear/proj deformators (the original's; +eps, -eps not opposite)")
    # The reference code always initialised at random (GANLatentDiscovery's run_train.py declares the flag with
    # type=bool, default True, so it could never be turned off); here it is a real boolean. From the first K
    # coordinate axes the VAE's directions start in dimensions its KL term left unused (RCA 0.58 against 0.79).
    random_init: bool = setting(True, "random initialisation of the deformator (off: the first K coordinate axes)")
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
    feature_layer: str | None = setting(None, "the layer the spectral method decomposes and ICA and sparse PCA read "
                                        "(default per generator: latentct/generators/features.py)")
    directions_file: str | None = setting(None, "with --method file: a directions.pt (DisCo, LatentCLR) whose frozen "
                                          "directions get a fresh reconstructor, so their RCA is measured like a "
                                          "baseline's")
    unmix_from: str | None = setting(None, "with --method unmix: the directions.pt of an orthogonal method (SeFa, "
                                     "spectral) whose top --unmix-size directions span the subspace to unmix, or "
                                     "latent: the whole latent (every axis; --unmix-size not used; at most 128)")
    unmix_size: int = setting(8, "m, how many of --unmix-from's top directions span the subspace (label-free: "
                              "the phantom's six factors need not be known; 8 leaves room for two more)")
    unmix_by: str = setting("ajd", "ajd (joint diagonalisation of pullback metrics), ica (FastICA of features), "
                            "steer (least-squares walks for six affine image edits, then --unmix-content for the rest; "
                            "a span of at least 6 + that) or conditional (the steering walks and content directions "
                            "each conditioned on the others)", choices=UNMIX_BY)
    unmix_content: int = setting(2, "with --unmix-by steer or conditional: directions for what no edit explains, "
                                 "beside the six walks (the span needs at least 6 + this)")
    unmix_features: str = setting("layer", "with --unmix-by ica: the features ICA unmixes: layer (the intermediate "
                                  "layer the spectral method reads), encoder (a VAE's codes), image, or a layer name")
    patient_directions: int = setting(11, "with --method metadata: the patient-level subspace's dimension, the top "
                                      "principal components of the series' mean codes (at most the series count - 1; "
                                      "at least 7 with --metadata-unmix conditional)")
    metadata_unmix: str = setting("conditional", "with --method metadata: how the patient-level subspace is cut into "
                                  "directions: ica (FastICA of the series' mean codes, one direction per source) or "
                                  "conditional (the slice-position direction kept, the span of it and the "
                                  "patient-level directions cut by --unmix-by conditional's walks and content)",
                                  choices=METADATA_UNMIX)
    metadata_slices: int | None = setting(None, "with --method metadata: about this many training slices, whole series"
                                          " at random (None: all)")
    metadata_read_back: bool = setting(True, "with --method metadata and a generator with its own encoder (a VAE): "
                                       "fit the directions in the latent from the encoder's readings of G(z) "
                                       "(metadata.read_back) instead of taking them in the codes' space")
    metadata_data: str | None = setting(None, "with --method metadata: a preprocessed dataset (preprocess.py) whose "
                                        "training slices are encoded instead of the generator's own (the pipeline's "
                                        "metadata set: many patients, a few slices each)")
    init_directions: str | None = setting(None, "with --method learned and a proj or linear deformator: a "
                                          "directions.pt whose rows start the deformator's first columns (the rest "
                                          "start at random)")
    supervised_samples: int = setting(2048, "latents the supervised and measurements methods fit on (half as many "
                                      "more score the fit)")
    spectral_samples: int = setting(64, "latents the spectral method averages J^T J over (a diffusion model's "
                                    "Jacobian runs through every DDIM step: fewer there)")
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
        check(self.method != "unmix" or self.unmix_from is not None, "unmix_from",
              "--method unmix needs the directions.pt of the orthogonal method whose span to unmix, or latent")
        check(self.unmix_size >= 2, "unmix_size", f"must be at least 2, got {self.unmix_size}")
        check(self.unmix_content >= 0, "unmix_content", f"must be 0 or more, got {self.unmix_content}")
        check(self.method != "metadata" or self.metadata_unmix != "conditional" or self.patient_directions >= 7,
              "patient_directions", f"with --metadata-unmix conditional: at least 7 (the span the steering walks "
              f"cut holds six edits and the content), got {self.patient_directions}")
        check(self.init_directions is None or (self.method == "learned" and self.deformator in ("proj", "linear")),
              "init_directions", "starts the columns of a learned proj or linear deformator only")


# The study's grid: {unit (proj, K = 32), ortho (K = 32), 100 (proj, K = 100)} x {LeNet, ResNet}, batch 128,
# 3,000 steps each.
STUDY_DEFORMATORS = {"unit": dict(deformator="proj", directions_count=32),
                     "ortho": dict(deformator="ortho", directions_count=32),
                     "100": dict(deformator="proj", directions_count=100)}
PRESETS = {f"{name}-{reconstructor}": dict(deformator_kind, reconstructor=reconstructor, batch_size=128, steps=3000)
           for name, deformator_kind in STUDY_DEFORMATORS.items() for reconstructor in ("lenet", "resnet")}
# CPU-sized: fewer directions and steps, faster learning rates, a wider LeNet.
PRESETS["demo"] = dict(deformator="proj", directions_count=16, reconstructor="lenet", reconstructor_width=4,
                       batch_size=64, steps=600, lr_deformator=1e-3, lr_reconstructor=1e-3, eval_every=300,
                       rca_batches=20)


def directions_for(cfg: Settings, G, device) -> tuple[torch.nn.Module, dict | None, str, dict]:
    """The directions the method gives: a trainable deformator (learned) or fixed directions (every other method).
    Returns them with the deformator's arguments (None when fixed), the method's name in the artifact (a --method
    file run keeps its source's) and what the method reports beside its directions."""
    if getattr(G, "view", None) == "h" and (cfg.method in H_VIEW_REFUSED or (cfg.method == "unmix" and
                                                                         cfg.unmix_by == "ica")):
        method = "unmix --unmix-by ica" if cfg.method == "unmix" else cfg.method
        raise UserError(f"--method {method}: in a diffusion h view directions move dh only, and draws of the prior "
                        "have dh = 0, so this method's directions would move x_T (or nothing): use hpca, spectral, "
                        "unmix (ajd), random, coordinate or supervised there, or --diffusion-view noise")
    if cfg.method == "learned":
        deformator_args = dict(directions_count=cfg.directions_count, latent_dim=G.latent_dim,
                               bias=cfg.deformator_bias, random_init=cfg.random_init, seed=cfg.seed)
        with user_errors():
            deformator = Deformator(cfg.deformator, **deformator_args)
        extra, name = {}, "learned"
        if cfg.init_directions:  # named for its start, so its rows never merge with the plain learned run's
            start, _ = load_directions(cfg.init_directions, cfg.generator)
            m = min(start.count, cfg.directions_count)
            with torch.no_grad():
                deformator.linear.weight[:, :m] = start.matrix[:m].t().to(deformator.linear.weight)
            extra = {"initialised_from": str(cfg.init_directions), "initialised_columns": m,
                     "initial_method": start.method, "supervision": start.supervision}
            name = f"learned_{start.method}"
        return deformator.to(device), deformator_args, name, extra
    method, extra = cfg.method, {}
    if cfg.method == "supervised":
        matrix, extra = supervised(G, load_oracle(cfg.oracle), G.window, cfg.supervised_samples, cfg.seed)
    elif cfg.method == "measurements":
        from latentct.data.slices import dataset_spacing

        spacing, why = dataset_spacing(G.dataset)
        if why:
            print(f"note: {why}")
        matrix, extra = measurements(G, G.window, spacing, cfg.supervised_samples, cfg.seed)
    elif cfg.method == "spectral":
        matrix, extra = spectral(G, cfg.directions_count, cfg.feature_layer, samples=cfg.spectral_samples,
                                 seed=cfg.seed)
    elif cfg.method in ("ica", "spca"):
        solver = ica if cfg.method == "ica" else sparse_pca
        matrix, extra = solver(G.cpu(), cfg.directions_count, cfg.feature_layer, seed=cfg.seed)
        G.to(device)
    elif cfg.method == "unmix":
        if cfg.unmix_from == "latent":
            rows, base_method, inherited = whole_latent(G), "latent", "none"
        else:
            base, _ = load_directions(cfg.unmix_from, cfg.generator)
            rows, base_method = base.matrix[:min(cfg.unmix_size, base.count)], base.method
            inherited = base.supervision
        encoder = own_encoder(G, cfg.generator) if cfg.unmix_features == "encoder" else None
        matrix, extra = unmix(G.cpu(), rows, cfg.unmix_by, cfg.unmix_features, seed=cfg.seed, encoder=encoder,
                              content=cfg.unmix_content)
        extra.update(unmixed=base_method, unmixed_from=str(cfg.unmix_from), m=len(rows), supervision=inherited)
        G.to(device)
    elif cfg.method == "metadata":
        matrix, extra = metadata_method(cfg, G)
        G.to(device)
    elif cfg.method == "file":
        source, _ = load_directions(cfg.directions_file, cfg.generator)
        matrix, method = source.matrix, source.method
        extra = dict(source.extra, trained_by=str(cfg.directions_file), training=source.state.get("settings"))
    else:  # closed form on the CPU (float64 on one thread: the same directions on every run)
        matrix = baseline_matrix(cfg.method, G.cpu(), cfg.directions_count, cfg.seed)
        G.to(device)
    return FixedDirections(matrix).to(device), None, method, extra


def metadata_method(cfg: Settings, G) -> tuple[torch.Tensor, dict]:
    """latentct/discover/metadata.py on real slices' codes: those of a --latents file (a plug-in autoencoder's,
    written by python -m latentct.generators.latents, one row per index row of its split), else the training
    slices of --metadata-data (or the generator's own data) encoded by its encoder (a VAE) or by optimising z (any
    other generator: minutes). With an encoder of its own, the directions are then read back into the latent."""
    from latentct.data.slices import is_dataset, load_manifest, read_index
    from latentct.discover.metadata import (
        cut_by_steering,
        encode_dataset,
        metadata_directions,
        read_back,
        series_groups,
        span_room,
    )
    from latentct.train.checkpoint import load_file

    encoder = None
    if cfg.latents:
        saved = load_file(cfg.latents, "encoded latents")
        index = read_index(saved["data"], saved["split"])
        if len(index) != len(saved["latents"]):
            raise UserError(f"--latents: {cfg.latents} holds {len(saved['latents'])} latents, the index of "
                            f"{saved['data']} ({saved['split']}) {len(index)} rows")
        codes, how = saved["latents"].flatten(1).double(), f"encoded latents {cfg.latents}"
        if cfg.metadata_unmix == "conditional":  # is there room for the steering walks?
            span_room(len(series_groups(index)), cfg.patient_directions, codes.shape[1])
    else:
        data = cfg.metadata_data or G.dataset
        if not is_dataset(data):
            raise UserError(f"--method metadata: {'--metadata-data' if cfg.metadata_data else 'the generator'} names "
                            f"no preprocessed dataset ({data!r}) to encode; pass --metadata-data or --latents")
        encoder = own_encoder(G, cfg.generator)
        if encoder is None:
            print("note: no encoder: every slice is embedded by optimising z (minutes)")
        side, made = load_manifest(data)["settings"]["size"], output_size(G)
        if side != made:
            raise UserError(f"--metadata-data: {data} holds {side} px slices, the generator makes {made} px images")
        if cfg.metadata_unmix == "conditional":  # before minutes of encoding: is there room for the walks?
            span_room(len(series_groups(read_index(data, "train"))), cfg.patient_directions, G.latent_dim)
        codes, index = encode_dataset(G.cpu(), data, G.window, encoder, cfg.metadata_slices, seed=cfg.seed)
        how = "encoder" if encoder is not None else "optimised z"
    matrix, extra, read = metadata_directions(codes, index, cfg.patient_directions + 1, cfg.seed)
    if cfg.metadata_read_back and encoder is not None:
        matrix, back = read_back(G, encoder, read, cfg.supervised_samples, cfg.seed)
        extra.update(back)
    if cfg.metadata_unmix == "conditional":
        matrix, extra["steered"] = cut_by_steering(G.cpu(), matrix, cfg.seed)
    return matrix, dict(extra, encoder=how, fitted_in="latent" if "read_back" in extra else "codes")


def main(cfg: Settings) -> dict:
    # Setup: device, run folder.
    runtime = setup_runtime(cfg.device)
    torch.manual_seed(cfg.seed)
    run = RunDir(cfg.output, cfg, runtime)
    use_bf16, compiled = resolve_switch(cfg.bf16, runtime), resolve_switch(cfg.compile, runtime)
    layout = memory_format(cfg.channels_last, runtime, compiled)

    # Models: G frozen (no weight gradients ever), the deformator (or fixed directions), the reconstructor.
    raw_G = load_generator(cfg.generator, runtime.device, memory_format=layout, **cfg.generator_options())
    spread = latent_spread(raw_G)  # shifts are given in units of the latents' spread
    raw_deformator, deformator_args, method, extra = directions_for(cfg, raw_G, runtime.device)
    K = raw_deformator.directions_count
    if not cfg.rca and not raw_deformator.trainable:  # the directions alone: nothing to train
        save_directions(run.path / "directions.pt", method, raw_deformator, raw_G, settings_dict(cfg), None,
                        extra=extra)
        print(f"directions ({method}, K={K}, RCA not measured) -> {run.path / 'directions.pt'}")
        return {}
    raw_reconstructor = make_reconstructor(cfg.reconstructor, K, cfg.reconstructor_width, raw_G.planes).to(
        runtime.device, memory_format=layout)
    models = {"reconstructor": raw_reconstructor}
    optimizers = {"reconstructor": torch.optim.Adam(raw_reconstructor.parameters(), lr=cfg.lr_reconstructor)}
    if raw_deformator.trainable:
        models["deformator"] = raw_deformator
        optimizers["deformator"] = torch.optim.Adam(raw_deformator.parameters(), lr=cfg.lr_deformator)
    architecture = {"method": cfg.method, "deformator": deformator_args, "K": K, "R": cfg.reconstructor}
    shift_args = dict(shift_scale=cfg.shift_scale * spread, min_shift=cfg.min_shift * spread,
                      distribution=cfg.shift_distribution)
    chart_z = sample_latents(raw_G, 1, torch.Generator().manual_seed(cfg.seed + 1), runtime.device)
    start = resume(run, cfg, runtime, models, optimizers, architecture)
    G, reconstructor = raw_G, wrap_ddp(raw_reconstructor, runtime)  # what the loop calls
    if compiled:
        G, reconstructor = torch.compile(raw_G), torch.compile(reconstructor)
    deformator = wrap_ddp(raw_deformator, runtime) if raw_deformator.trainable else raw_deformator

    # The loop: sample (z, k, eps), reconstruct k and eps from the image pair, update both networks; the
    # schedule at its end.
    meter, bar, last_eval, done = LossMeter(), progress_bar(run, cfg.steps, start), {}, start
    with StopSignal() as stop:
        for step in range(start, cfg.steps):
            z = sample_latents(raw_G, cfg.batch_size, device=runtime.device)
            idx, eps, basis = make_shifts(cfg.batch_size, K, device=runtime.device, **shift_args)
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            with autocast(runtime, use_bf16):
                loss, label_loss, shift_loss, logits = step_losses(G, deformator, reconstructor, z, idx, eps, basis,
                                                                   cfg.label_weight, cfg.shift_weight, cfg.step_form)
            loss.backward()
            for opt in optimizers.values():
                opt.step()
            meter.add({"loss": loss, "label_loss": label_loss, "shift_loss": shift_loss,
                       "accuracy": (logits.argmax(1) == idx).float().mean()}, cfg.batch_size * runtime.world_size)

            done = step + 1  # steps completed
            final, stopping = done == cfg.steps, stop.received is not None
            checkpoint_now = done % cfg.checkpoint_every == 0 or final or stopping
            if done % cfg.log_every == 0 or checkpoint_now:  # a checkpoint closes the running means: resumed runs log alike
                log_losses(run, meter, done, bar)
            if runtime.is_main and (done % cfg.eval_every == 0 or final):
                with autocast(runtime, use_bf16):
                    last_eval = {"rca": reconstructor_accuracy(raw_G, raw_deformator, raw_reconstructor,
                                                               cfg.rca_batches, cfg.batch_size, shift_args,
                                                               runtime.device)}
                run.log({"step": done, "eval": last_eval})
            if runtime.is_main and (done % cfg.sample_every == 0 or final):
                direction_chart(raw_G, raw_deformator, chart_z, cfg.shift_scale * spread, cfg.display_window,
                                run.path / f"directions_{done:06d}.png")
                run.plot_losses(["loss", "label_loss", "shift_loss", "accuracy"])
            if checkpoint_now:
                save_state(run, done, models, optimizers, architecture)
            if stopping:
                break
    bar.close()
    stop.exit_if_stopped(done, cfg.steps, runtime.is_main)

    # Save: the directions artifact every later stage reads, and the reconstructor.
    if runtime.is_main:
        rca = last_eval.get("rca")
        save_directions(run.path / "directions.pt", method, raw_deformator, raw_G, settings_dict(cfg), rca,
                        deformator_args, extra=extra)
        atomic_torch_save({k: v.cpu() for k, v in raw_reconstructor.state_dict().items()},
                          run.path / "reconstructor.pt")
        print(f"directions ({method}, K={K}): RCA {rca} -> {run.path / 'directions.pt'}")
    return last_eval


summary_line = rca_line  # the pipeline's one line for this stage


if __name__ == "__main__":
    run_cli(main, Settings, presets=PRESETS)

"""The main job: every stage in order, on the embedded phantom by default or on a LIDC-IDRI download.

    python pipeline.py                                   # the demo on the phantom, 2 CPU cores, < 15 minutes
    python pipeline.py --lidc /data/LIDC-IDRI --preset paper --run lidc

Stages: phantom -> preprocess -> train_gan, train_vae -> directions (learned + SeFa, PCA, random, coordinate
baselines, for each generator) -> evaluate (GIFs, report, ground truth, gallery). A stage whose outputs exist
with the same settings is skipped, so a rerun after an interruption continues (training stages resume from
their checkpoints); ``--from-stage NAME`` reruns from that stage on. Finally Animations/<run>/index.html links
every gallery and Animations/<run>/summary.json holds the summary table.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
from tqdm import tqdm

import EvalDirections
import preprocess
from latentct.data import phantom
from latentct.discover.unmix import UNMIX_BY, whole_latent
from latentct.score import disentanglement, oracle, validate
from latentct.show.gallery import write_index
from latentct.util.io import atomic_write_json
from latentct.util.settings import (
    UserError,
    check,
    code_version,
    machine_name,
    make_settings,
    run_cli,
    setting,
    settings_dict,
)
from Training import TrainDiffusion, TrainDirections, TrainDisCo, TrainGAN, TrainLatentCLR, TrainVAE

# The one ordering table: every kind of job in the order it runs, with its stage (the name --from-stage takes and
# the summary shows). The main lane runs first, alone with every core, generator by generator in this order; the
# pool then starts its ready jobs in this order, --parallel at a time.
ORDER = {
    "phantom": "phantom", "preprocess": "preprocess", "train_gan": "train_gan", "train_vae": "train_vae",
    "train_diffusion": "train_diffusion",
    "oracle": "oracle", "validate": "validate",
    "learned": "directions",       # the first preset's learned directions: the first gallery shows them
    "evaluate": "evaluate",        # GIFs, report and gallery
    "more_learned": "directions",  # the other presets' learned directions (the study's grid)
    "baselines": "directions",     # closed-form methods, DisCo and LatentCLR, the supervised ceiling
    "ground_truth": "ground_truth", "disentanglement": "disentanglement",
}
STAGES = tuple(dict.fromkeys(ORDER.values()))  # in pipeline order: --from-stage reruns one and every later one
# Closed form, by Training/TrainDirections.py; "metadata" and "measurements" are not label-free: one uses each
# series' patient and slice positions (latentct/discover/metadata.py), the other the anatomy measurements of the
# generator's images (latentct/discover/baselines.py), and the tables say so.
BASELINES = ("sefa", "pca", "random", "coordinate", "spectral", "ica", "spca", "metadata", "measurements")
TRAINED = {"disco": TrainDisCo, "latentclr": TrainLatentCLR}         # their own trainers, then RCA on the result
# The span of --unmix-base's top directions unmixed (latentct/discover/unmix.py), and the study's learned
# deformator started from that unmixed basis.
UNMIXED = ("unmix", "learned_unmix")
# The span each way unmixes: the base's top 8 (six factors and room for two), the steering walks' top 12 (their
# six edits and the content directions need room to be fitted; 8 / 12 / 16 gave the VAE's an area of 0.43 / 0.65
# / 0.69 and the DCGAN's 0.25 / 0.35 / 0.29 on the demo, docs/pipeline.md).
UNMIX_SIZE = {"ajd": 8, "ica": 8, "steer": 12, "conditional": 12}  # of an orthogonal base's top directions
UNMIX_BASES = ("latent", "sefa", "spectral", "pca")
LATENT_DIMS = {"dcgan": TrainGAN.Settings.latent_dim, "vae": TrainVAE.Settings.latent_dim}  # the pipeline's sizes
# The metadata set's phantom seed is the run's plus this: other patients than the generators were trained on.
METADATA_SEED = 1000
METHODS = BASELINES + tuple(TRAINED) + UNMIXED
GENERATORS = ("dcgan", "vae")
# A diffusion model is scored in two views of one trained model (latentct/generators/diffusion.py), each its own
# gallery and table: x_T (noise) and an offset in the UNet's h-space from fixed noise (h). Their methods: those that
# need only G(z), and in the h view PCA of h; sefa and pca need a first layer a sampler does not have.
DIFFUSION_VIEWS = ("noise", "h")
DIFFUSION_METHODS = ("spectral", "random", "coordinate", "unmix", "hpca", "ica")


@dataclass
class Settings:
    """Run the whole LatentCT pipeline."""

    run: str = setting("demo", "name of this run: data/<run>/, runs/<run>/, Animations/<run>/")
    lidc: str | None = setting(None, "a LIDC-IDRI DICOM tree to use instead of the phantom")
    root: str = setting(".", "folder under which data/, runs/ and Animations/ are written")
    phantom_patients: int = setting(32, "patients in the phantom")
    phantom_slices: int = setting(40, "slices per phantom CT series")
    phantom_size: int = setting(128, "phantom matrix size in pixels")
    metadata_patients: int = setting(320, "patients in the metadata method's own phantom set (more than the "
                                     "generators' 32: its patient-level ICA needs hundreds of series)")
    metadata_series_slices: int = setting(4, "slices per series of that set (each series a random stretch of the "
                                          "apex-to-abdomen range)")
    image_size: int = setting(64, "side of the preprocessed slices (the generators' resolution)")
    gan_preset: str = setting("demo", "TrainGAN preset", choices=tuple(TrainGAN.PRESETS))
    gan_steps: int | None = setting(800, "DCGAN steps (None: the preset's)")
    vae_preset: str = setting("demo", "TrainVAE preset", choices=tuple(TrainVAE.PRESETS))
    vae_steps: int | None = setting(800, "VAE steps (None: the preset's)")
    direction_presets: list[str] = setting(["demo"], "TrainDirections presets, one learned run each")
    direction_steps: int | None = setting(300, "steps of every direction run, baselines included (None: preset's)")
    direction_batch: int | None = setting(48, "batch of every direction run (None: the preset's)")
    # Beside random directions, each generator's best label-free method in the last benchmark run under the
    # previous scorer (docs/results.md, benchmark block): SeFa on the DCGAN, the spectral method on the VAE; the
    # whole latent unmixed (latentct/discover/unmix.py); on the VAE the metadata method too, on its own set
    # of 320 patients (it uses patient and slice position, so no table ranks it). The benchmark scores every method.
    dcgan_methods: list[str] = setting(["sefa", "random", "unmix"], "methods scored beside the DCGAN's learned "
                                       "directions")
    vae_methods: list[str] = setting(["random", "spectral", "unmix", "metadata"],
                                     "methods scored beside the VAE's learned directions")
    unmix_rca: bool = setting(False, "measure the unmixed and metadata directions' RCA too (a reconstructor "
                              "trained for --direction-steps; the benchmark's)")
    rca_baselines: list[str] = setting(["random"], "closed-form methods whose RCA is measured (a fresh reconstructor "
                                       "trained for --direction-steps each, about a minute at demo size): the random "
                                       "directions, the reference the learned directions' RCA is read against; the "
                                       "benchmark measures every method's")
    # The span each generator's unmix cuts: the whole latent (32 axes here), or an orthogonal method's top
    # directions. Chosen by docs/pipeline.md's runs on the demo and seeds 835 and 6755 (then scored once on 653):
    # with four content directions the whole latent recovered 11 factors at tau 2/3 over the three DCGANs against
    # SeFa's top 12's 8 (area 1.93 against 1.48), 14 against the spectral top 12's 13 over the VAEs (5.38, 4.57).
    dcgan_unmix_base: str = setting("latent", "the span the DCGAN's unmix and learned_unmix unmix: latent (every "
                                    "axis) or the orthogonal method whose top directions span it",
                                    choices=UNMIX_BASES)
    vae_unmix_base: str = setting("latent", "the same for the VAE", choices=UNMIX_BASES)
    # Eight content rows, not four (docs/pipeline.md): on the demo's and phantom seed 7665's generators, over 14
    # draws of the walks' latents, one factor more at tau 2/3 in 5, one fewer in 1, the larger area in 9, and the
    # DCGANs' counts steadier from draw to draw (3-4, where four rows gave 2-5).
    unmix_content: int = setting(8, "content directions beside the six walks of the DCGAN's and VAE's unmix "
                                 "(TrainDirections --unmix-content; the span needs 6 + this)")
    # How each span is unmixed, chosen by bench.unmixing (docs/results.md) and docs/pipeline.md's runs: the steering
    # walks gave the larger area than joint diagonalisation and ICA on both generators of the demo and of a held-out
    # phantom seed; conditioned on each other (InterFaceGAN's conditional manipulation) they recovered more at tau
    # 2/3 than independent ones on the demo and seed 835 (15 factors against 12 over the four generators, area 3.12
    # against 2.63; the demo DCGAN's area fell, 0.35 -> 0.27), and were then scored once on seed 6755.
    dcgan_unmix_by: str = setting("conditional", "how the DCGAN's span is unmixed (TrainDirections --unmix-by)",
                                  choices=UNMIX_BY)
    vae_unmix_by: str = setting("conditional", "the same for the VAE", choices=UNMIX_BY)
    method_steps: int | None = setting(None, "steps of DisCo and LatentCLR (None: --direction-steps)")
    # 32 latents x 5 shifts cost what 16 x 9 did (1.1x the images); with antithetic latents (report_latents) they
    # cut the spread of the counts over draws of report latents by 60% (docs/ground-truth.md, "How steady the
    # counts are").
    eval_samples: int = setting(32, "samples per direction for the measurements and the ground truth")
    eval_shifts: int = setting(5, "shift values per direction for the measurements (and frames per known-answer "
                               "sweep, which the noise floors need equal)")
    oracle_steps: int | None = setting(None, "factor oracle training steps (None: latentct/score/oracle.py's)")
    oracle_slices: int | None = setting(None, "factor oracle training slices (None: latentct/score/oracle.py's)")
    oracle_test_slices: int | None = setting(None, "factor oracle held-out slices (None: latentct/score/oracle.py's)")
    probe_slices: int | None = setting(None, "VAE reconstructions the readability probe trains on (None: "
                                       "latentct/score/validate.py's)")
    probe_steps: int | None = setting(None, "that probe's steps (None: latentct/score/validate.py's)")
    validate_patients: int | None = setting(None, "patients per known-answer sweep (None: "
                                            "latentct/score/validate.py's)")
    seed_draws: int = setting(1, "seeds (trained methods, unmix's latents) or draws of report latents (the rest) "
                              "each method is scored on; with more than 1 the tables hold the medians and a method is "
                              "above the null on more than half of them")
    dcgan_attainable: bool = setting(False, "the known-answer sweeps' attainable level through the DCGAN too (every "
                                     "frame embedded: minutes; the benchmark's)")
    null_pool: int = setting(256, "random directions in each generator's pooled null (scored once per table)")
    null_sets: int = setting(1000, "sets of each method's direction count drawn from the pool: the p-values")
    disentanglement: bool = setting(False, "MIG and DCI of every method by Khrulkov et al.'s protocol (slow)")
    seed: int = setting(0, "seed for every stage")
    workers: int = setting(2, "processes for the DICOM stages")
    parallel: int = setting(2, "jobs run at once after the main lane, each with cores/parallel threads")
    device: str = setting("auto", "auto, cpu or cuda")
    generator: str | None = setting(None, "explore your own generator instead (file.py:factory, package.module:factory,"
                                    " TorchScript or torch.export file, or a generator.pt): no phantom, no training")
    generator_args: str = setting("{}", "keyword arguments of the --generator factory, as JSON")
    generator_weights: str | None = setting(None, "weights of the --generator factory's module")
    latents: str | None = setting(None, "encoded latents to draw z from (autoencoders; "
                                  "python -m latentct.generators.latents)")
    data: str | None = setting(None, "with --generator: a preprocessed dataset for pixel spacing, real slices and, "
                               "on the phantom, the ground truth")
    methods: list[str] = setting(["sefa", "random"], "with --generator: the methods scored beside the learned "
                                 "directions (those that need forward hooks are left out for TorchScript/export)")
    generators: list[str] = setting(list(GENERATORS), "generators to train and score: dcgan, vae, diffusion")
    diffusion_views: list[str] = setting(list(DIFFUSION_VIEWS), "the diffusion model's views, each scored as its own "
                                         "generator: noise (x_T) and h (an offset after the UNet's middle block)")
    diffusion_preset: str = setting("latent", "TrainDiffusion preset", choices=tuple(TrainDiffusion.PRESETS))
    diffusion_steps: int | None = setting(None, "the diffusion UNet's steps (None: the preset's)")
    autoencoder_steps: int | None = setting(None, "the latent diffusion autoencoder's steps (None: the preset's)")
    diffusion_noise_methods: list[str] = setting(["spectral", "random", "unmix"], "methods of the noise view "
                                                 "(the first one's directions get the view's gallery)")
    diffusion_h_methods: list[str] = setting(["hpca", "spectral", "random", "unmix"], "methods of the h view")
    diffusion_directions: int = setting(8, "K of every diffusion method (each scored direction is 32 samples x 5 "
                                        "shifts of DDIM sampling)")
    ddim_steps: int = setting(10, "deterministic DDIM steps per diffusion sample (the generator's view; not "
                              "training steps)")
    t_edit: int = setting(500, "the h view's edit window: steps with t >= t_edit (Asyrp's interval)")
    spectral_samples: int = setting(16, "latents the spectral method averages over on the diffusion model (its "
                                    "Jacobian runs through every DDIM step)")
    from_stage: str | None = setting(None, "rerun from this stage on, even where outputs exist",
                                     choices=(None, *STAGES))

    def __post_init__(self):
        check(self.lidc is None or Path(self.lidc).exists(), "lidc", f"{self.lidc} does not exist")
        check(self.parallel >= 1, "parallel", "must be at least 1")
        check(self.unmix_content >= 0, "unmix_content", f"must be 0 or more, got {self.unmix_content}")
        for gen in GENERATORS:  # the steering walks fit six edits and the content rows inside the span
            by, base = getattr(self, f"{gen}_unmix_by"), getattr(self, f"{gen}_unmix_base")
            room = LATENT_DIMS[gen] if base == "latent" else UNMIX_SIZE[by]
            if by in ("steer", "conditional"):
                content_fits(self.unmix_content, room, f"the {gen}'s span of {room} (--{gen}-unmix-base {base})")
        unknown = [m for m in self.rca_baselines if m not in BASELINES]
        check(not unknown, "rca_baselines", f"{unknown} are not closed-form methods ({', '.join(BASELINES)})")
        check(self.metadata_patients >= 8, "metadata_patients", f"needs at least 8 (the metadata method's span: the "
              f"slice and 7 or more patient-level directions, one series each), got {self.metadata_patients}")
        check(self.metadata_series_slices >= 2, "metadata_series_slices",
              f"needs at least 2 (a slope along z), got {self.metadata_series_slices}")
        for name in self.direction_presets:
            check(name in TrainDirections.PRESETS, "direction_presets",
                  f"{name!r} is not one of {', '.join(TrainDirections.PRESETS)}")
        for flag_name in ("dcgan_methods", "vae_methods"):
            for name in getattr(self, flag_name):
                check(name in METHODS, flag_name, f"{name!r} is not one of {', '.join(METHODS)}")
        for name in self.generators:
            check(name in (*GENERATORS, "diffusion"), "generators", f"{name!r} is not dcgan, vae or diffusion")
        for name in self.diffusion_views:
            check(name in DIFFUSION_VIEWS, "diffusion_views", f"{name!r} is not noise or h")
        for flag_name in ("diffusion_noise_methods", "diffusion_h_methods"):
            methods = getattr(self, flag_name)
            check(bool(methods), flag_name, "needs at least one method (the first gets the gallery)")
            for name in methods:
                check(name in DIFFUSION_METHODS, flag_name, f"{name!r} is not one of {', '.join(DIFFUSION_METHODS)}")
        check("hpca" not in self.diffusion_noise_methods, "diffusion_noise_methods", "hpca needs the h view")
        check("ica" not in self.diffusion_h_methods, "diffusion_h_methods", "ica regresses on prior draws, whose dh "
              "is 0: it belongs to the noise view")


def content_fits(content: int, room: int, span: str, otherwise: str = "") -> None:
    """The steering walks fit six edits and ``content`` content rows inside a ``span`` of ``room`` axes; if not, a
    one-line error naming --unmix-content and how many would fit (then ``otherwise``)."""
    check(6 + content <= room, "unmix_content", f"{content} content rows and six walks do not fit {span}: pass "
          f"--unmix-content {max(room - 6, 0)} or fewer{otherwise}")


PRESETS = {
    "demo": {},
    # The smallest sizes: the end-to-end test.
    "tiny": dict(phantom_patients=6, phantom_slices=12, phantom_size=64, image_size=32, gan_steps=6, vae_steps=6,
                 direction_steps=4, direction_batch=8, eval_samples=3, oracle_steps=20, oracle_slices=200,
                 oracle_test_slices=100, probe_slices=100, probe_steps=10,
                 validate_patients=3, null_pool=64, null_sets=50, unmix_rca=True, rca_baselines=list(BASELINES),
                 # a DCGAN of 6 steps draws no anatomy, so the measurements method refuses it (its own test is
                 # tests/discover/test_unmix.py)
                 dcgan_methods=[m for m in METHODS if m not in ("metadata", "measurements")],
                 vae_methods=["sefa", "random", "metadata", "unmix"], metadata_patients=12,
                 generators=[*GENERATORS, "diffusion"], diffusion_preset="tiny", ddim_steps=3, diffusion_directions=3,
                 spectral_samples=2),
    # Every baseline beside the learned directions at demo sizes, with MIG and DCI: docs/results.md's benchmark.
    # The DCGAN has no encoder, so its metadata method optimises z for each of the metadata set's 1,280 slices
    # (4 x 200 steps each: about half an hour on 2 CPU cores); only the benchmark runs it (issue 17).
    "benchmark": dict(dcgan_methods=list(METHODS), vae_methods=list(METHODS),
                      disentanglement=True, seed_draws=3, dcgan_attainable=True, unmix_rca=True,
                      rca_baselines=list(BASELINES)),
    # The diffusion model on the demo's phantom and image size (docs/diffusion.md): latent diffusion trained on 2
    # CPU cores, both views scored with K = 8 against the pooled null; one draw of report latents. Its own run
    # name, so the demo's validation and galleries stay as they are (the oracles are shared through their cache).
    "benchmark-diffusion": dict(run="benchmark-diffusion", generators=["diffusion"]),
    # The study on real data: 128 px, its widths and batch, 50 epochs, its direction grid for both generators.
    "paper": dict(image_size=128, gan_preset="paper", gan_steps=None, vae_preset="paper", vae_steps=None,
                  direction_presets=["unit-lenet", "unit-resnet", "ortho-lenet", "ortho-resnet", "100-lenet",
                                     "100-resnet"], direction_steps=None, direction_batch=None, eval_samples=32,
                  dcgan_methods=[m for m in BASELINES if m != "metadata"], vae_methods=list(BASELINES)),
}


# ------------------------------------------------------------------------------------------ stage plans

@dataclass(kw_only=True)
class Job:
    """One run of one script: its module, settings, the file that says it finished (its config file says with
    which settings), where it runs and the one line that says how it went."""

    kind: str  # a key of ORDER
    name: str
    module: object
    cfg: object
    output: Path
    done_file: str
    inputs: tuple = ()  # names of the jobs whose outputs this one reads
    main_lane: bool = False  # alone in this process with every core, before the pool
    generator: int = -1  # which generator's part of the main lane (-1: before every generator)
    summary: object = None  # output folder -> one line; None: the module's summary_line

    @property
    def stage(self) -> str:
        return ORDER[self.kind]

    def done(self) -> bool:
        return (self.output / self.done_file).is_file() and _same_settings(self)

    def summary_line(self) -> str:
        try:
            return (self.summary or self.module.summary_line)(self.output)
        except (OSError, KeyError, IndexError, ValueError):
            return ""


def metadata_set(data: Path, image_size: int) -> Path:
    """Where the pipeline writes the metadata method's own preprocessed set (bench.unmixing reads it there)."""
    return data / f"metadata_slices_{image_size}"


def _comparable(values: dict) -> dict:
    """Settings that decide a stage's result (steps are derived from epochs when those are set)."""
    skip = {"overwrite", "resume", "workers"} | ({"steps"} if values.get("epochs") is not None else set())
    return {k: v for k, v in values.items() if k not in skip}


def _with(module, base: dict, preset: str | None = None):
    """A stage's settings: its preset, under the values the pipeline hands over (which win, as flags do)."""
    return make_settings(module.Settings, {k: v for k, v in base.items() if v is not None}, preset=preset,
                         presets=getattr(module, "PRESETS", None))


def plan(cfg: Settings) -> list[Job]:
    """Every job in the order it runs (ORDER). The main lane runs alone with every core: first what the first
    gallery needs (the DCGAN, its learned directions, their GIFs and report), then the other trainings (the VAE
    and its learned directions), whose results must not depend on how many jobs share the machine. The pool runs
    the rest side by side: galleries, closed-form baselines, the oracle, and the ground truth once every method
    is there."""
    if cfg.generator:
        return plan_own_generator(cfg)
    root = Path(cfg.root)
    data, runs, anim = root / "data" / cfg.run, root / "runs" / cfg.run, root / "Animations" / cfg.run
    dicom = Path(cfg.lidc) if cfg.lidc else data / "phantom"
    slices = data / f"slices_{cfg.image_size}"
    jobs = []
    if not cfg.lidc:
        jobs.append(Job(kind="phantom", name="phantom", module=phantom, cfg=phantom.Settings(
            output=str(dicom), patients=cfg.phantom_patients, slices=cfg.phantom_slices, size=cfg.phantom_size,
            seed=cfg.seed, workers=cfg.workers, overwrite=True), output=dicom, done_file="phantom_factors.csv",
            main_lane=True))
    jobs.append(Job(kind="preprocess", name="preprocess", module=preprocess, cfg=preprocess.Settings(
        input=str(dicom), output=str(slices), size=cfg.image_size, seed=cfg.seed, workers=cfg.workers,
        overwrite=True), output=slices, done_file="manifest.json", inputs=("phantom",), main_lane=True))
    metadata_slices = None  # the metadata method's own set on the phantom (the generators never see it), written in
    # the pool (one process: each pool job already has its share of the cores)
    if not cfg.lidc and any("metadata" in getattr(cfg, f"{gen}_methods") for gen in cfg.generators
                            if gen in GENERATORS):
        meta_dicom, metadata_slices = data / "metadata_phantom", metadata_set(data, cfg.image_size)
        jobs.append(Job(kind="phantom", name="metadata_phantom", module=phantom, cfg=phantom.Settings(
            output=str(meta_dicom), patients=cfg.metadata_patients, slices=cfg.metadata_series_slices,
            extent="random", size=cfg.phantom_size, seed=cfg.seed + METADATA_SEED, repeat_scans=0,
            radiograph_fraction=0.0, workers=1, overwrite=True), output=meta_dicom,
            done_file="phantom_factors.csv"))
        jobs.append(Job(kind="preprocess", name="metadata_preprocess", module=preprocess, cfg=preprocess.Settings(
            input=str(meta_dicom), output=str(metadata_slices), size=cfg.image_size, test_fraction=0.0,
            seed=cfg.seed, workers=1, overwrite=True), output=metadata_slices, done_file="manifest.json",
            inputs=("metadata_phantom",)))
    common = dict(data=str(slices), seed=cfg.seed, device=cfg.device)
    trainers = {"dcgan": ("train_gan", TrainGAN, cfg.gan_steps, cfg.gan_preset),
                "vae": ("train_vae", TrainVAE, cfg.vae_steps, cfg.vae_preset)}
    first_preset = cfg.direction_presets[0]
    phantom_run = not cfg.lidc  # the oracle, validation, supervised ceiling and ground truth need the phantom
    if phantom_run:
        oracle_jobs = oracles(cfg, cfg.image_size, "default")
        jobs += oracle_jobs
        oracle_file, fit_file = (job.output / "oracle.pt" for job in oracle_jobs)
        jobs.append(Job(kind="validate", name="validate", module=validate, cfg=_with(validate, dict(
            output=str(anim / "validation"), seed=cfg.seed, image_size=cfg.image_size, oracle=str(oracle_file),
            fit_oracle=str(fit_file), vae=str(runs / "vae" / "generator.pt") if "vae" in cfg.generators else None,
            patients=cfg.validate_patients,
            render_size=cfg.phantom_size, pair_patients=cfg.validate_patients, scored_samples=cfg.eval_samples,
            frames=cfg.eval_shifts,
            probe_slices=cfg.probe_slices, probe_steps=cfg.probe_steps,
            dcgan=str(runs / "dcgan" / "generator.pt") if cfg.dcgan_attainable else None)),
            output=anim / "validation", done_file="validation.json",
            inputs=("oracle", "oracle_fit", "vae", *(("dcgan",) if cfg.dcgan_attainable else ()))))
    for g, gen in enumerate(GENERATORS):
        if gen not in cfg.generators:
            continue
        kind, module, steps, preset = trainers[gen]
        jobs.append(Job(kind=kind, name=gen, module=module, cfg=_with(module, dict(common, output=str(runs / gen),
                        steps=steps), preset), output=runs / gen, done_file="generator.pt", inputs=("preprocess",),
                        main_lane=True, generator=g))
        shared = dict(generator=str(runs / gen / "generator.pt"), seed=cfg.seed, device=cfg.device,
                      steps=cfg.direction_steps, batch_size=cfg.direction_batch)
        methods = getattr(cfg, f"{gen}_methods")
        for preset in cfg.direction_presets:  # the learned directions: in the main lane
            out = runs / f"{gen}_{preset}"
            jobs.append(Job(kind="learned" if preset == first_preset else "more_learned", name=out.name,
                            module=TrainDirections, cfg=_with(TrainDirections, dict(shared, output=str(out),
                            method="learned"), preset), output=out, done_file="directions.pt", inputs=(gen,),
                            main_lane=True, generator=g))
        for m in (m for m in methods if m in BASELINES):
            out = runs / f"{gen}_{m}"
            meta = m == "metadata" and metadata_slices is not None
            jobs.append(Job(kind="baselines", name=out.name, module=TrainDirections, cfg=_with(TrainDirections, dict(
                shared, output=str(out), method=m, metadata_data=str(metadata_slices) if meta else None,
                rca=cfg.unmix_rca if m == "metadata" else m in cfg.rca_baselines),
                first_preset), output=out, done_file="directions.pt",
                inputs=(gen, *(("metadata_preprocess",) if meta else ()))))
        compared = [f"{gen}_{m}" for m in methods if m in BASELINES]
        if any(m in UNMIXED for m in methods):
            base_method, by = getattr(cfg, f"{gen}_unmix_base"), getattr(cfg, f"{gen}_unmix_by")
            span = dict(unmix_from="latent", unmix_size=UNMIX_SIZE[by])  # the size is unused with the whole latent
            span_inputs = (gen,)
            if base_method != "latent":
                base = runs / f"{gen}_{base_method}"
                span.update(unmix_from=str(base / "directions.pt"))
                span_inputs = (base.name,)
                if base_method not in methods:  # the span to unmix: its directions only
                    jobs.append(Job(kind="baselines", name=base.name, module=TrainDirections, cfg=_with(
                        TrainDirections, dict(shared, output=str(base), method=base_method, rca=False), first_preset),
                        output=base, done_file="directions.pt", inputs=(gen,)))
            unmixed = runs / f"{gen}_unmix"
            jobs.append(Job(kind="baselines", name=unmixed.name, module=TrainDirections, cfg=_with(TrainDirections, dict(
                shared, output=str(unmixed), method="unmix", unmix_by=by, unmix_content=cfg.unmix_content,
                rca="unmix" in methods and cfg.unmix_rca, **span), first_preset), output=unmixed,
                done_file="directions.pt", inputs=span_inputs))
            compared += [unmixed.name] if "unmix" in methods else []
            if "learned_unmix" in methods:
                out = runs / f"{gen}_learned_unmix"
                jobs.append(Job(kind="baselines", name=out.name, module=TrainDirections, cfg=_with(TrainDirections,
                    dict(shared, output=str(out), method="learned", init_directions=str(unmixed / "directions.pt")),
                    first_preset), output=out, done_file="directions.pt", inputs=(unmixed.name,)))
                compared.append(out.name)
        for m in (m for m in methods if m in TRAINED):  # train, then measure RCA on the frozen result
            trained, measured = runs / f"{gen}_{m}", runs / f"{gen}_{m}_rca"
            jobs.append(Job(kind="baselines", name=trained.name, module=TRAINED[m], cfg=_with(TRAINED[m], dict(
                generator=shared["generator"], seed=cfg.seed, device=cfg.device, output=str(trained),
                steps=cfg.method_steps or cfg.direction_steps), "demo"), output=trained, done_file="directions.pt",
                inputs=(gen,)))
            jobs.append(Job(kind="baselines", name=measured.name, module=TrainDirections, cfg=_with(TrainDirections,
                dict(shared, output=str(measured), method="file", directions_file=str(trained / "directions.pt")),
                first_preset), output=measured, done_file="directions.pt", inputs=(trained.name,)))
            compared.append(measured.name)
        if phantom_run:  # the supervised ceiling: its directions only, no reconstructor
            out = runs / f"{gen}_supervised"
            jobs.append(Job(kind="baselines", name=out.name, module=TrainDirections, cfg=_with(TrainDirections, dict(
                shared, output=str(out), method="supervised", oracle=str(fit_file), rca=False), first_preset),
                output=out, done_file="directions.pt", inputs=(gen, "oracle_fit")))
            compared.append(out.name)
        for preset in cfg.direction_presets:
            gallery = anim / (gen if len(cfg.direction_presets) == 1 else f"{gen}_{preset}")
            common_eval = dict(directions=str(runs / f"{gen}_{preset}" / "directions.pt"), output=str(gallery),
                               report_samples=cfg.eval_samples, report_shifts=cfg.eval_shifts, seed=cfg.seed)
            jobs.append(Job(kind="evaluate", name=f"eval_{gallery.name}", module=EvalDirections,
                            cfg=EvalDirections.Settings(**common_eval, ground_truth="off"), output=gallery,
                            done_file="index.html", inputs=(f"{gen}_{preset}",),
                            main_lane=g == 0 and preset == first_preset, generator=g))
            if phantom_run:
                truth = dict(oracle=str(oracle_file), fit_oracle=str(fit_file), null_pool=cfg.null_pool,
                             validation=str(anim / "validation" / "validation.json"), null_sets=cfg.null_sets)
                unmix_job = next((j for j in jobs if j.name == f"{gen}_unmix"), None)
                draws = other_draws(cfg, gen, preset, methods, shared, truth, runs, anim / gallery.name, unmix_job) \
                    if preset == first_preset else []
                jobs += draws
                seed_files = [str(j.output / "ground_truth" / "ground_truth.json") for j in draws
                              if j.kind == "ground_truth"]
                jobs.append(Job(kind="ground_truth", name=f"truth_{gallery.name}", module=EvalDirections,
                                cfg=EvalDirections.Settings(**common_eval, ground_truth="only",
                                compare=[str(runs / c / "directions.pt") for c in compared], seed_runs=seed_files,
                                **truth), output=gallery / "ground_truth", done_file="ground_truth.json",
                                inputs=(f"eval_{gallery.name}", "oracle", "oracle_fit", "validate", *compared,
                                        *(j.name for j in draws if j.kind == "ground_truth")),
                                summary=EvalDirections.ground_truth_line))
            if phantom_run and cfg.disentanglement and preset == first_preset:
                files = [str(runs / name / "directions.pt") for name in (f"{gen}_{preset}", *compared)]
                jobs.append(Job(kind="disentanglement", name=f"mig_{gen}", module=disentanglement,
                                cfg=disentanglement.Settings(generator=str(runs / gen / "generator.pt"),
                                directions=files, seed=cfg.seed, output=str(anim / f"{gen}_disentanglement"),
                                render_size=cfg.phantom_size), output=anim / f"{gen}_disentanglement",
                                done_file="disentanglement.json", inputs=(f"{gen}_{preset}", *compared)))
    if "diffusion" in cfg.generators:
        truth = dict(oracle=str(oracle_file), fit_oracle=str(fit_file), null_pool=cfg.null_pool, null_sets=cfg.null_sets,
                     validation=str(anim / "validation" / "validation.json")) if phantom_run else None
        jobs += diffusion_jobs(cfg, common, runs, anim, truth)
    return in_order(jobs)


def diffusion_jobs(cfg: Settings, common: dict, runs: Path, anim: Path, truth: dict | None) -> list[Job]:
    """The diffusion model: trained in the main lane, then each view as a generator of its own: its methods'
    directions (no reconstructor: an RCA would train one through the DDIM sampler), the gallery of the first
    method, and on the phantom the supervised ceiling and the ground truth against the pooled null."""
    out = runs / "diffusion"
    jobs = [Job(kind="train_diffusion", name="diffusion", module=TrainDiffusion, cfg=_with(TrainDiffusion, dict(
        common, output=str(out), steps=cfg.diffusion_steps, autoencoder_steps=cfg.autoencoder_steps),
        cfg.diffusion_preset), output=out, done_file="generator.pt", inputs=("preprocess",), main_lane=True,
        generator=len(GENERATORS))]
    for view in cfg.diffusion_views:
        gen = f"diffusion_{view}"
        shared = dict(generator=str(out / "generator.pt"), seed=cfg.seed, device=cfg.device, diffusion_view=view,
                      ddim_steps=cfg.ddim_steps, t_edit=cfg.t_edit, spectral_samples=cfg.spectral_samples,
                      directions_count=cfg.diffusion_directions, rca=False)
        methods = getattr(cfg, f"diffusion_{view}_methods")
        names = []
        for m in methods:
            run = runs / f"{gen}_{m}"
            values = dict(shared, output=str(run), method=m)
            inputs = ("diffusion",)
            if m == "unmix":  # the span of the view's spectral directions, unmixed
                base = runs / f"{gen}_spectral"
                if "spectral" not in methods:
                    jobs.append(Job(kind="baselines", name=base.name, module=TrainDirections, cfg=_with(
                        TrainDirections, dict(shared, output=str(base), method="spectral")), output=base,
                        done_file="directions.pt", inputs=("diffusion",)))
                values.update(unmix_from=str(base / "directions.pt"), unmix_size=cfg.diffusion_directions)
                inputs = (base.name,)
            jobs.append(Job(kind="baselines", name=run.name, module=TrainDirections, cfg=_with(TrainDirections,
                            values), output=run, done_file="directions.pt", inputs=inputs))
            names.append(run.name)
        if truth is not None:
            sup = runs / f"{gen}_supervised"
            jobs.append(Job(kind="baselines", name=sup.name, module=TrainDirections, cfg=_with(TrainDirections, dict(
                shared, output=str(sup), method="supervised", oracle=truth["fit_oracle"])), output=sup,
                done_file="directions.pt", inputs=("diffusion", "oracle_fit")))
            names.append(sup.name)
        gallery = anim / gen
        # Real slices by DDIM inversion alone: refining them by optimising z runs back through every step.
        common_eval = dict(directions=str(runs / names[0] / "directions.pt"), output=str(gallery),
                           report_samples=cfg.eval_samples, report_shifts=cfg.eval_shifts, seed=cfg.seed,
                           embed_steps=0)
        jobs.append(Job(kind="evaluate", name=f"eval_{gen}", module=EvalDirections, cfg=EvalDirections.Settings(
            **common_eval, ground_truth="off"), output=gallery, done_file="index.html", inputs=(names[0],)))
        if truth is not None:
            jobs.append(Job(kind="ground_truth", name=f"truth_{gen}", module=EvalDirections, cfg=EvalDirections.Settings(
                **common_eval, ground_truth="only", compare=[str(runs / n / "directions.pt") for n in names[1:]],
                **truth), output=gallery / "ground_truth", done_file="ground_truth.json",
                inputs=(f"eval_{gen}", "oracle", "oracle_fit", "validate", *names[1:]),
                summary=EvalDirections.ground_truth_line))
    return jobs


def other_draws(cfg: Settings, gen: str, preset: str, methods: list[str], shared: dict, truth: dict, runs: Path,
                gallery: Path, unmix_job: Job | None = None) -> list[Job]:
    """For --seed-draws > 1 (the benchmark): the trained methods (learned, DisCo, LatentCLR) trained again on other
    seeds, the unmixed directions (``unmix_job``) taken again from another draw of the walks' latents, every
    method scored again on other draws of report latents (the pool rescored on each), as extra ground-truth tables
    the main one takes the medians of."""
    jobs = []
    for seed in range(cfg.seed + 1, cfg.seed + cfg.seed_draws):
        learned = runs / f"{gen}_{preset}_seed{seed}"
        jobs.append(Job(kind="baselines", name=learned.name, module=TrainDirections, cfg=_with(TrainDirections, dict(
            shared, output=str(learned), method="learned", seed=seed), preset), output=learned,
            done_file="directions.pt", inputs=(gen,)))
        compared = []
        for m in methods:
            if m in BASELINES:
                compared.append(runs / f"{gen}_{m}")
            elif m == "unmix":  # its walks' 64 latents are a draw, and its count moves with them (up to 3 of 6)
                out = runs / f"{gen}_unmix_seed{seed}"  # no RCA: the tables keep the first draw's
                jobs.append(dataclasses.replace(unmix_job, name=out.name, output=out, cfg=dataclasses.replace(
                    unmix_job.cfg, seed=seed, output=str(out), rca=False)))
                compared.append(out)
        if "learned_unmix" in methods:  # trained: again on this seed, from the same unmixed basis
            out = runs / f"{gen}_learned_unmix_seed{seed}"
            jobs.append(Job(kind="baselines", name=out.name, module=TrainDirections, cfg=_with(TrainDirections, dict(
                shared, output=str(out), method="learned", seed=seed,
                init_directions=str(runs / f"{gen}_unmix" / "directions.pt")), preset), output=out,
                done_file="directions.pt", inputs=(f"{gen}_unmix",)))
            compared.append(out)
        for m in (m for m in methods if m in TRAINED):
            trained, measured = runs / f"{gen}_{m}_seed{seed}", runs / f"{gen}_{m}_rca_seed{seed}"
            jobs.append(Job(kind="baselines", name=trained.name, module=TRAINED[m], cfg=_with(TRAINED[m], dict(
                generator=shared["generator"], seed=seed, device=cfg.device, output=str(trained),
                steps=cfg.method_steps or cfg.direction_steps), "demo"), output=trained, done_file="directions.pt",
                inputs=(gen,)))
            jobs.append(Job(kind="baselines", name=measured.name, module=TrainDirections, cfg=_with(TrainDirections,
                dict(shared, output=str(measured), method="file", directions_file=str(trained / "directions.pt"),
                     seed=seed), preset), output=measured, done_file="directions.pt", inputs=(trained.name,)))
            compared.append(measured)
        compared.append(runs / f"{gen}_supervised")
        out = gallery.parent / f"{gallery.name}_seed{seed}"
        scored = EvalDirections.Settings(
            directions=str(learned / "directions.pt"), output=str(out), report_samples=cfg.eval_samples,
            report_shifts=cfg.eval_shifts, seed=seed,
            compare=[str(c / "directions.pt") for c in compared], ground_truth="auto", frames=3, grid_samples=1,
            real_slices=0, **truth)
        jobs.append(Job(kind="ground_truth", name=f"truth_{out.name}", module=EvalDirections, cfg=scored, output=out,
            done_file="report.json", inputs=(learned.name, "oracle", "validate", *(c.name for c in compared)),
            summary=lambda output: EvalDirections.ground_truth_line(output / "ground_truth")))
    return jobs


# The score oracle reads every sweep and direction at latentct/score/oracle.py's sizes. The fit oracle only fits
# the supervised map, a least-squares fit over 2,048 latents that averages its reading noise away: narrower, and
# two thirds of the steps on half the slices (its held-out R2 and its agreement with the score oracle are
# reported in validation.json), so the demo keeps to its time.
SCORE_ORACLE = dict(width=16)
FIT_ORACLE = dict(width=12, steps=2000, train_slices=8000, test_slices=1000)


def oracles(cfg: Settings, image_size: int, window: str) -> list[Job]:
    """Two independent factor oracles: the score oracle reads every sweep and direction; the fit oracle (another
    seed, so other slices, and another width) only fits the supervised ceiling, so "recoverable" is not what one
    oracle can be steered to read."""
    jobs = []
    for name, seed, own in (("oracle", cfg.seed, SCORE_ORACLE), ("oracle_fit", cfg.seed + 1, FIT_ORACLE)):
        sizes = dict(steps=cfg.oracle_steps, train_slices=cfg.oracle_slices, test_slices=cfg.oracle_test_slices)
        sizes = {k: own.get(k) if v is None else v for k, v in sizes.items()}  # what a flag sets goes to both
        job_cfg = _with(oracle, dict(image_size=image_size, window=window, root=cfg.root, render_size=cfg.phantom_size,
                                     seed=seed, width=own["width"], **sizes))
        jobs.append(Job(kind="oracle", name=name, module=oracle, cfg=job_cfg, output=oracle.folder_for(job_cfg),
                        done_file="oracle.pt"))
    return jobs


def in_order(jobs: list[Job]) -> list[Job]:
    """The main lane generator by generator, then the pool, each in ORDER."""
    kinds = list(ORDER)
    main = sorted((j for j in jobs if j.main_lane), key=lambda j: (j.generator, kinds.index(j.kind)))
    return main + sorted((j for j in jobs if not j.main_lane), key=lambda j: kinds.index(j.kind))


HOOKED = ("sefa", "pca", "spectral", "latentclr")  # methods that read an intermediate layer through a hook


def plan_own_generator(cfg: Settings) -> list[Job]:
    """A researcher's generator: its learned directions and their gallery first, then the other methods that
    apply to it; with --data on the phantom, the oracle and the ground truth."""
    from latentct.data.slices import has_factors
    from latentct.generators.interface import load_generator, output_size

    root = Path(cfg.root)
    runs, anim = root / "runs" / cfg.run, root / "Animations" / cfg.run
    options = dict(generator=cfg.generator, generator_args=cfg.generator_args, generator_weights=cfg.generator_weights,
                   latents=cfg.latents, seed=cfg.seed, device=cfg.device)
    G = load_generator(cfg.generator, args=json.loads(cfg.generator_args), weights=cfg.generator_weights,
                       latents=cfg.latents)
    methods = [m for m in cfg.methods if G.hookable or m not in HOOKED]
    if len(methods) < len(cfg.methods):
        print(f"note: {', '.join(m for m in cfg.methods if m not in methods)} left out: a {G.reference['kind']} "
              "generator runs without forward hooks")
    shared = dict(options, steps=cfg.direction_steps, batch_size=cfg.direction_batch)
    preset = cfg.direction_presets[0]
    learned = runs / "model_learned"
    jobs = [Job(kind="learned", name=learned.name, module=TrainDirections, cfg=_with(TrainDirections, dict(
        shared, output=str(learned), method="learned"), preset), output=learned, done_file="directions.pt",
        main_lane=True)]
    gallery = anim / "model"
    jobs.append(Job(kind="evaluate", name="eval_model", module=EvalDirections, cfg=EvalDirections.Settings(
        directions=str(learned / "directions.pt"), output=str(gallery), dataset=cfg.data,
        report_samples=cfg.eval_samples, report_shifts=cfg.eval_shifts, seed=cfg.seed, ground_truth="off"),
        output=gallery, done_file="index.html", inputs=(learned.name,), main_lane=True))
    compared = []
    for m in methods:
        out = runs / f"model_{m}"
        if m in TRAINED:
            jobs.append(Job(kind="baselines", name=out.name, module=TRAINED[m], cfg=_with(TRAINED[m], dict(
                options, output=str(out), steps=cfg.method_steps or cfg.direction_steps), "demo"), output=out,
                done_file="directions.pt"))
            measured = runs / f"model_{m}_rca"
            jobs.append(Job(kind="baselines", name=measured.name, module=TrainDirections, cfg=_with(TrainDirections,
                dict(shared, output=str(measured), method="file", directions_file=str(out / "directions.pt")),
                preset), output=measured, done_file="directions.pt", inputs=(out.name,)))
            out = measured
        else:
            values = dict(shared, output=str(out), method=m, rca=m in cfg.rca_baselines)
            if m == "unmix":  # the whole latent, cut by the conditional walks: is it small enough, before any work?
                axes = len(whole_latent(G, "--methods unmix", "leave unmix out"))
                content_fits(cfg.unmix_content, axes, f"the generator's latent of {axes}", ", or leave unmix out of "
                             "--methods")
                values.update(unmix_from="latent", unmix_by="conditional", unmix_content=cfg.unmix_content)
            jobs.append(Job(kind="baselines", name=out.name, module=TrainDirections, cfg=_with(TrainDirections,
                values, preset), output=out, done_file="directions.pt"))
        compared.append(out.name)
    if cfg.data and G.window is not None and not G.volume and has_factors(cfg.data):
        window = ",".join(f"{v:g}" for v in G.window)
        oracle_jobs = oracles(cfg, output_size(G), window)
        jobs += oracle_jobs
        oracle_file, fit_file = (job.output / "oracle.pt" for job in oracle_jobs)
        jobs.append(Job(kind="validate", name="validate", module=validate, cfg=_with(validate, dict(
            output=str(anim / "validation"), seed=cfg.seed, image_size=output_size(G), window=window,
            oracle=str(oracle_file), fit_oracle=str(fit_file), patients=cfg.validate_patients,
            pair_patients=cfg.validate_patients, render_size=cfg.phantom_size, scored_samples=cfg.eval_samples,
            frames=cfg.eval_shifts)),
            output=anim / "validation", done_file="validation.json", inputs=("oracle", "oracle_fit")))
        jobs.append(Job(kind="ground_truth", name="truth_model", module=EvalDirections, cfg=EvalDirections.Settings(
            directions=str(learned / "directions.pt"), output=str(gallery), dataset=cfg.data,
            report_samples=cfg.eval_samples, report_shifts=cfg.eval_shifts, seed=cfg.seed, ground_truth="only",
            oracle=str(oracle_file),
            fit_oracle=str(fit_file), validation=str(anim / "validation" / "validation.json"),
            compare=[str(runs / c / "directions.pt") for c in compared], null_pool=cfg.null_pool,
            null_sets=cfg.null_sets), output=gallery / "ground_truth", done_file="ground_truth.json",
            inputs=("eval_model", "oracle", "oracle_fit", "validate", *compared),
            summary=EvalDirections.ground_truth_line))
    return in_order(jobs)


# ------------------------------------------------------------------------------------------ running

class Runner:
    """Runs the plan: the main lane one job after another in this process with every core, then the rest
    ``parallel`` at a time in worker processes (each with cores / parallel threads, so a job always runs with
    the same thread count and two runs give the same tables), each as soon as the jobs it reads from are done.
    After every job, summary.json and the index page are rewritten: the index fills in as stages finish."""

    def __init__(self, cfg: Settings, jobs: list[Job]):
        self.cfg, self.jobs = cfg, jobs
        self.anim = Path(cfg.root) / "Animations" / cfg.run
        self.logs = Path(cfg.root) / "runs" / cfg.run / "logs"
        self.first_forced = STAGES.index(cfg.from_stage) if cfg.from_stage else len(STAGES)
        self.names = {job.name for job in jobs}
        self.ran: set[str] = set()
        self.rows: dict[str, dict] = {}
        self.started = time.time()
        self.commit = code_version(Path(__file__).resolve().parent)  # the code this run's figures come from
        self.machine = machine_name()  # and the machine
        self.first_gallery: float | None = None
        # the summary of the run whose outputs this one may reuse: a rerun that runs nothing leaves it as it is,
        # one that reruns some stages keeps its timing and machine under "reused"
        previous = self.anim / "summary.json"
        self.previous = json.loads(previous.read_text()) if previous.is_file() else None
        self.bar = tqdm(total=len(jobs), desc="pipeline", unit="stage")

    def ready(self, job: Job) -> bool:
        return all(name in self.rows for name in job.inputs if name in self.names)

    def forced(self, job: Job) -> bool:
        """--from-stage reaches it, or a job it reads from ran again."""
        return STAGES.index(job.stage) >= self.first_forced or any(name in self.ran for name in job.inputs)

    def is_current(self, job: Job) -> bool:
        """Its outputs exist, with the same settings, and nothing forces it to run again."""
        return not self.forced(job) and job.done()

    def clear_stale(self, job: Job) -> None:
        """Remove output whose inputs or settings changed, so the job starts afresh; otherwise it resumes."""
        if job.output.exists() and (self.forced(job) or not _same_settings(job)):
            shutil.rmtree(job.output)

    def must_run(self, job: Job) -> bool:
        """True when the job must run (its stale output cleared); a current job is recorded as cached."""
        if self.is_current(job):
            self.finish(job, 0.0, cached=True)
            return False
        self.clear_stale(job)
        return True

    def finish(self, job: Job, seconds: float, cached: bool = False) -> None:
        if not cached:
            self.ran.add(job.name)
        at = round(time.time() - self.started, 1)
        if job.stage == "evaluate" and self.first_gallery is None:
            self.first_gallery = at
        self.rows[job.name] = {"stage": job.stage, "name": job.name, "seconds": round(seconds, 1), "cached": cached,
                               "finished_at": at, "output": str(job.output), "metric": job.summary_line()}
        self.bar.set_postfix_str(f"{job.stage}: {job.name} done")
        self.bar.update()
        self.write_summary()

    def write_summary(self) -> dict:
        rows = [self.rows[j.name] for j in self.jobs if j.name in self.rows]
        summary = {"run": self.cfg.run, "commit": self.commit, "settings": settings_dict(self.cfg), "stages": rows,
                   "pending": [j.name for j in self.jobs if j.name not in self.rows],
                   "total_seconds": round(sum(r["seconds"] for r in rows), 1),
                   "wall_seconds": round(time.time() - self.started, 1), "first_gallery_seconds": self.first_gallery,
                   "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": self.machine}
        old = self.previous
        if old and not old.get("pending") and any(r["cached"] for r in rows):
            if not self.ran:  # nothing ran: the summary on disk still tells how its outputs were made
                return summary
            summary["reused"] = old.get("reused") or {key: old.get(key) for key in (
                "wall_seconds", "first_gallery_seconds", "commit", "machine", "written")}
        atomic_write_json(self.anim / "summary.json", summary)
        write_index(self.anim, summary)
        return summary

    def run_here(self, job: Job) -> None:
        if self.must_run(job):
            began = time.time()
            self.bar.set_postfix_str(f"{job.stage}: {job.name}")
            job.module.main(dataclasses.replace(job.cfg))
            self.finish(job, time.time() - began)

    def run_all(self) -> dict:
        first = [j for j in self.jobs if j.main_lane]
        rest = [j for j in self.jobs if not j.main_lane]
        for job in first:
            self.run_here(job)
        if self.cfg.parallel <= 1:
            for job in rest:
                self.run_here(job)
        else:
            self.run_pool(rest)
        self.bar.close()
        return self.write_summary()

    def run_pool(self, pending: list[Job]) -> None:
        threads = max(1, torch.get_num_threads() // self.cfg.parallel)
        self.logs.mkdir(parents=True, exist_ok=True)
        running: dict = {}
        with ProcessPoolExecutor(self.cfg.parallel, mp_context=get_context("spawn"), initializer=_worker_init,
                                 initargs=(threads,)) as pool:
            try:
                while pending or running:
                    for job in [j for j in pending if self.ready(j)]:
                        if len(running) >= self.cfg.parallel:
                            break
                        pending.remove(job)
                        if self.must_run(job):
                            log = self.logs / f"{job.name}.log"
                            future = pool.submit(_run_job, job.module.__name__, dataclasses.replace(job.cfg), str(log))
                            running[future] = (job, time.time(), log)
                    if not running:
                        if pending and not any(self.ready(j) for j in pending):
                            raise UserError(f"pipeline: jobs {[j.name for j in pending]} wait for inputs never run")
                        continue
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        job, began, log = running.pop(future)
                        try:
                            future.result()
                        except (UserError, FileNotFoundError, FileExistsError) as err:
                            raise UserError(f"{job.name}: {err} (log: {log})") from None
                        except Exception as err:
                            raise RuntimeError(f"{job.name} failed ({type(err).__name__}: {err}); log: {log}") from err
                        self.finish(job, time.time() - began)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ["TQDM_DISABLE"] = "1"  # the pipeline's bar shows progress; each job's output goes to its log


def _run_job(module_name: str, cfg, log: str) -> None:
    """One job in a worker process, its output in ``log``."""
    module = importlib.import_module(module_name)
    with open(log, "w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        module.main(cfg)


def main(cfg: Settings) -> dict:
    summary = Runner(cfg, plan(cfg)).run_all()
    print(f"\n{'stage':12s} {'run':18s} {'time':>8s} {'done at':>8s}  key figure")
    for r in summary["stages"]:
        took = "cached" if r["cached"] else f"{r['seconds']:.1f}s"
        print(f"{r['stage']:12s} {r['name']:18s} {took:>8s} {r['finished_at']:7.0f}s  {r['metric']}")
    first = summary["first_gallery_seconds"]
    print(f"\nwall time {summary['wall_seconds']:.0f} s" + (f", first gallery after {first:.0f} s" if first else ""))
    print(f"gallery: {Path(cfg.root) / 'Animations' / cfg.run / 'index.html'}")
    return summary


def _same_settings(job: Job) -> bool:
    saved = job.output / "config.json"
    return saved.is_file() and _comparable(settings_dict(job.cfg)) == _comparable(json.loads(saved.read_text()))


if __name__ == "__main__":
    run_cli(main, Settings, presets=PRESETS)

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

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

import EvalDirections
import preprocess
from latentct import phantom
from latentct.gallery import write_index
from latentct.io import atomic_write_json
from latentct.settings import check, make_settings, run_cli, setting, settings_dict
from Training import TrainDirections, TrainGAN, TrainVAE

STAGES = ("phantom", "preprocess", "train_gan", "train_vae", "directions", "evaluate")
BASELINES = ("sefa", "pca", "random", "coordinate")
GENERATORS = ("dcgan", "vae")


@dataclass
class Settings:
    """Run the whole LatentCT pipeline."""

    run: str = setting("demo", "name of this run: data/<run>/, runs/<run>/, Animations/<run>/")
    lidc: str | None = setting(None, "a LIDC-IDRI DICOM tree to use instead of the phantom")
    root: str = setting(".", "folder under which data/, runs/ and Animations/ are written")
    phantom_patients: int = setting(32, "patients in the phantom")
    phantom_slices: int = setting(40, "slices per phantom CT series")
    phantom_size: int = setting(128, "phantom matrix size in pixels")
    image_size: int = setting(64, "side of the preprocessed slices (the generators' resolution)")
    gan_preset: str = setting("demo", "TrainGAN preset", choices=tuple(TrainGAN.PRESETS))
    gan_steps: int | None = setting(1000, "DCGAN steps (None: the preset's)")
    vae_preset: str = setting("demo", "TrainVAE preset", choices=tuple(TrainVAE.PRESETS))
    vae_steps: int | None = setting(800, "VAE steps (None: the preset's)")
    direction_presets: list[str] = setting(["demo"], "TrainDirections presets, one learned run each")
    direction_steps: int | None = setting(300, "steps of every direction run, baselines included (None: preset's)")
    direction_batch: int | None = setting(48, "batch of every direction run (None: the preset's)")
    baselines: list[str] = setting(list(BASELINES), "baseline methods scored beside the learned directions")
    eval_samples: int = setting(16, "samples per direction for the measurements")
    regressor_steps: int = setting(600, "factor regressor steps (phantom only)")
    seed: int = setting(0, "seed for every stage")
    workers: int = setting(2, "processes for the DICOM stages and data loading")
    device: str = setting("auto", "auto, cpu or cuda")
    from_stage: str | None = setting(None, "rerun from this stage on, even where outputs exist",
                                     choices=(None, *STAGES))

    def __post_init__(self):
        check(self.lidc is None or Path(self.lidc).exists(), "lidc", f"{self.lidc} does not exist")
        for name in self.direction_presets:
            check(name in TrainDirections.PRESETS, "direction_presets",
                  f"{name!r} is not one of {', '.join(TrainDirections.PRESETS)}")
        for name in self.baselines:
            check(name in BASELINES, "baselines", f"{name!r} is not one of {', '.join(BASELINES)}")


PRESETS = {
    "demo": {},
    # The smallest sizes: the end-to-end test.
    "tiny": dict(phantom_patients=6, phantom_slices=12, phantom_size=64, image_size=32, gan_steps=6, vae_steps=6,
                 direction_steps=4, direction_batch=8, eval_samples=3, regressor_steps=10),
    # The study on real data: 128 px, its widths and batch, 50 epochs, its direction grid for both generators.
    "paper": dict(image_size=128, gan_preset="paper", gan_steps=None, vae_preset="paper", vae_steps=None,
                  direction_presets=["unit-lenet", "unit-resnet", "ortho-lenet", "ortho-resnet", "100-lenet",
                                     "100-resnet"], direction_steps=None, direction_batch=None, eval_samples=32),
}


# ------------------------------------------------------------------------------------------ stage plans

@dataclass
class Job:
    """One run of one script: its module, settings and the file that says it finished."""

    stage: str
    name: str
    module: object
    cfg: object
    output: Path
    done_file: str
    inputs: tuple = ()  # names of the jobs whose outputs this one reads

    def done(self) -> bool:
        return (self.output / self.done_file).is_file() and _same_settings(self)


def _comparable(values: dict) -> dict:
    """Settings that decide a stage's result (steps are derived from epochs when those are set)."""
    skip = {"overwrite", "resume", "workers"} | ({"steps"} if values.get("epochs") is not None else set())
    return {k: v for k, v in values.items() if k not in skip}


def _with(module, base: dict, preset: str | None = None):
    """A stage's settings: its preset, under the values the pipeline hands over (which win, as flags do)."""
    return make_settings(module.Settings, {k: v for k, v in base.items() if v is not None}, preset=preset,
                         presets=module.PRESETS)


def plan(cfg: Settings) -> list[Job]:
    root = Path(cfg.root)
    data, runs, anim = root / "data" / cfg.run, root / "runs" / cfg.run, root / "Animations" / cfg.run
    dicom = Path(cfg.lidc) if cfg.lidc else data / "phantom"
    slices = data / f"slices_{cfg.image_size}"
    jobs = []
    if not cfg.lidc:
        jobs.append(Job("phantom", "phantom", phantom, phantom.Settings(
            output=str(dicom), patients=cfg.phantom_patients, slices=cfg.phantom_slices, size=cfg.phantom_size,
            seed=cfg.seed, workers=cfg.workers, overwrite=True), dicom, "phantom_factors.csv"))
    jobs.append(Job("preprocess", "preprocess", preprocess, preprocess.Settings(
        input=str(dicom), output=str(slices), size=cfg.image_size, seed=cfg.seed, workers=cfg.workers,
        overwrite=True), slices, "manifest.json", ("phantom",)))
    common = dict(data=str(slices), seed=cfg.seed, device=cfg.device, workers=cfg.workers)
    jobs.append(Job("train_gan", "dcgan", TrainGAN, _with(TrainGAN, dict(common, output=str(runs / "dcgan"),
                                                                          steps=cfg.gan_steps), cfg.gan_preset),
                    runs / "dcgan", "generator.pt", ("preprocess",)))
    jobs.append(Job("train_vae", "vae", TrainVAE, _with(TrainVAE, dict(common, output=str(runs / "vae"),
                                                                        steps=cfg.vae_steps), cfg.vae_preset),
                    runs / "vae", "generator.pt", ("preprocess",)))
    evaluations = []
    for gen in GENERATORS:
        shared = dict(generator=str(runs / gen / "generator.pt"), seed=cfg.seed, device=cfg.device,
                      steps=cfg.direction_steps, batch_size=cfg.direction_batch)
        first = cfg.direction_presets[0]
        variants = [(p, p, "learned") for p in cfg.direction_presets] + [(m, first, m) for m in cfg.baselines]
        for tag, preset, method in variants:
            out = runs / f"{gen}_{tag}"
            jobs.append(Job("directions", out.name, TrainDirections,
                            _with(TrainDirections, dict(shared, output=str(out), method=method), preset),
                            out, "directions.pt", (gen,)))
        baselines = tuple(f"{gen}_{m}" for m in cfg.baselines)
        for preset in cfg.direction_presets:
            gallery = anim / (gen if len(cfg.direction_presets) == 1 else f"{gen}_{preset}")
            evaluations.append(Job("evaluate", gallery.name, EvalDirections, EvalDirections.Settings(
                directions=str(runs / f"{gen}_{preset}" / "directions.pt"), output=str(gallery),
                compare=[str(runs / b / "directions.pt") for b in baselines], report_samples=cfg.eval_samples,
                regressor=str(anim / "factor_regressor.pt"), regressor_steps=cfg.regressor_steps, seed=cfg.seed),
                gallery, "index.html", (f"{gen}_{preset}", *baselines)))
    return jobs + evaluations


# ------------------------------------------------------------------------------------------ running

def key_metric(job: Job) -> str:
    """The one figure that says how a finished stage went."""
    try:
        if job.stage in ("train_gan", "train_vae"):
            evals = [json.loads(line)["eval"] for line in (job.output / "metrics.jsonl").read_text().splitlines()
                     if '"eval"' in line]
            return f"SWD {evals[-1]['swd']:.1f}, diversity {evals[-1]['diversity_ratio']:.2f}" if evals else ""
        if job.stage == "directions":
            import torch

            return f"RCA {torch.load(job.output / 'directions.pt', weights_only=True)['rca']:.3f}"
        if job.stage == "evaluate":
            report = json.loads((job.output / "report.json").read_text())
            strong = sum(1 for r in report["directions"] if r["r2"][r["dominant"]] >= 0.8)
            gt = report.get("ground_truth")
            recovered = f"{gt['main']['recovered']}/6 factors recovered, " if gt else ""
            return f"{recovered}{strong} directions labelled with R2 >= 0.8"
        if job.stage == "preprocess":
            counts = json.loads((job.output / "manifest.json").read_text())["counts"]["slices"]
            return f"{counts['train']} train / {counts['test']} test slices"
    except (OSError, KeyError, IndexError, ValueError):
        return ""
    return ""


def main(cfg: Settings) -> dict:
    jobs = plan(cfg)
    first_forced = STAGES.index(cfg.from_stage) if cfg.from_stage else len(STAGES)
    ran: set[str] = set()
    rows = []
    bar = tqdm(jobs, desc="pipeline", unit="stage")
    for job in bar:
        bar.set_postfix_str(f"{job.stage}: {job.name}")
        forced = STAGES.index(job.stage) >= first_forced or any(name in ran for name in job.inputs)
        started = time.time()
        if not forced and job.done():
            rows.append({"stage": job.stage, "name": job.name, "seconds": 0.0, "cached": True,
                         "output": str(job.output), "metric": key_metric(job)})
            continue
        if job.output.exists() and (forced or not _same_settings(job)):
            shutil.rmtree(job.output)  # its inputs or settings changed: start afresh; otherwise it resumes
        job.module.main(dataclasses.replace(job.cfg))
        ran.add(job.name)
        rows.append({"stage": job.stage, "name": job.name, "seconds": round(time.time() - started, 1),
                     "cached": False, "output": str(job.output), "metric": key_metric(job)})
    bar.close()
    anim = Path(cfg.root) / "Animations" / cfg.run
    summary = {"run": cfg.run, "settings": settings_dict(cfg), "stages": rows,
               "total_seconds": round(sum(r["seconds"] for r in rows), 1)}
    atomic_write_json(anim / "summary.json", summary)
    page = write_index(anim, summary)
    print(f"\n{'stage':11s} {'run':18s} {'time':>8s}  key figure")
    for r in rows:
        print(f"{r['stage']:11s} {r['name']:18s} {'cached' if r['cached'] else str(r['seconds']) + 's':>8s}  {r['metric']}")
    print(f"\ngallery: {page}")
    return summary


def _same_settings(job: Job) -> bool:
    saved = job.output / "config.json"
    return saved.is_file() and _comparable(settings_dict(job.cfg)) == _comparable(json.loads(saved.read_text()))


if __name__ == "__main__":
    run_cli(main, Settings, presets=PRESETS)

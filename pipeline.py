"""The main job: every stage in order, on the embedded phantom by default or on a LIDC-IDRI download.

    python pipeline.py                       # phantom -> preprocess (demo preset)
    python pipeline.py --lidc /data/LIDC-IDRI --preset paper

A stage whose output folder already holds the same settings is skipped, so a rerun continues where an
interrupted one stopped; ``--from-stage NAME`` reruns from that stage on.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import preprocess
from latentct import phantom
from latentct.settings import check, run_cli, setting, settings_dict

STAGES = ("phantom", "preprocess")
PRESETS = {
    "demo": {},
    "tiny": {"phantom_patients": 6, "phantom_slices": 12, "phantom_size": 64, "image_size": 32},
    "paper": {"image_size": 128},
}


@dataclass
class Settings:
    """Run the whole pipeline."""

    run: str = setting("demo", "name of this run: data/<run>/..., runs/<run>/..., Animations/<run>/")
    lidc: str | None = setting(None, "a LIDC-IDRI DICOM tree to use instead of the phantom")
    root: str = setting(".", "folder under which data/ and runs/ are written")
    phantom_patients: int = setting(32, "patients in the phantom")
    phantom_slices: int = setting(40, "slices per phantom CT series")
    phantom_size: int = setting(128, "phantom matrix size in pixels")
    image_size: int = setting(64, "side of the preprocessed slices")
    seed: int = setting(0, "seed for every stage")
    workers: int = setting(2, "processes for the DICOM stages")
    from_stage: str | None = setting(None, "rerun from this stage on, even where outputs exist",
                                     choices=(None, *STAGES))

    def __post_init__(self):
        check(self.lidc is None or Path(self.lidc).exists(), "lidc", f"{self.lidc} does not exist")


def _cached(out: Path, cfg_obj, forced: bool) -> bool:
    """True when ``out`` holds a finished stage run with exactly these settings."""
    saved = out / "config.json"
    if forced or not saved.is_file():
        return False
    mine = {k: v for k, v in settings_dict(cfg_obj).items() if k != "overwrite"}
    theirs = {k: v for k, v in json.loads(saved.read_text()).items() if k != "overwrite"}
    return mine == theirs


def stage_configs(cfg: Settings) -> dict:
    data = Path(cfg.root) / "data" / cfg.run
    dicom = Path(cfg.lidc) if cfg.lidc else data / "phantom"
    configs = {}
    if not cfg.lidc:
        configs["phantom"] = phantom.Settings(output=str(dicom), patients=cfg.phantom_patients,
                                              slices=cfg.phantom_slices, size=cfg.phantom_size, seed=cfg.seed,
                                              workers=cfg.workers, overwrite=True)
    configs["preprocess"] = preprocess.Settings(input=str(dicom), output=str(data / f"slices_{cfg.image_size}"),
                                                size=cfg.image_size, seed=cfg.seed, workers=cfg.workers,
                                                overwrite=True)
    return configs


def main(cfg: Settings) -> dict:
    runners = {"phantom": (phantom.main, lambda c: Path(c.output)),
               "preprocess": (preprocess.main, lambda c: Path(c.output))}
    configs = stage_configs(cfg)
    forced = False
    summary = {}
    for name in STAGES:
        if name not in configs:
            continue
        forced = forced or name == cfg.from_stage
        run, output = runners[name]
        stage_cfg = configs[name]
        started = time.time()
        if _cached(output(stage_cfg), stage_cfg, forced):
            print(f"[{name}] up to date: {output(stage_cfg)}")
            summary[name] = {"output": str(output(stage_cfg)), "seconds": 0.0, "cached": True}
            continue
        forced = True  # everything after a rerun stage reruns too
        print(f"[{name}] running")
        run(stage_cfg)
        summary[name] = {"output": str(output(stage_cfg)), "seconds": round(time.time() - started, 1), "cached": False}
    for name, info in summary.items():
        print(f"{name:12s} {info['seconds']:8.1f}s  {info['output']}")
    return summary


if __name__ == "__main__":
    run_cli(main, Settings, presets=PRESETS)

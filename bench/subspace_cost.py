"""What the subspace diagnostic's image-change measure and random-span ceilings cost a finished run's ground truth.

    python -m bench.subspace_cost --run demo [--repeats 2] [--threads 2]

Each gallery's ground-truth stage is scored again in a fresh process (bench.stability's way: its own settings,
report and seed), alternately with the run's settings and with the image measure and the random spans' ceilings
off (``--subspace-latents 0 --subspace-randoms 0``: the diagnostic as it was before them), ``--repeats`` times
each. Prints each gallery's median seconds with and without, and the ratio; the demo's wall-time budget (issue
"Counts that hold on any machine") is read against the difference. Counts are checked to come out the same.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.stability import score
from latentct.util.settings import UserError, parse_settings, setting


@dataclass
class Settings:
    """Time a finished run's ground truths with and without the image-change subspace measure."""

    run: str = setting("demo", "the pipeline run whose ground-truth stages to time")
    root: str = setting(".", "folder under which Animations/<run>/ lives")
    repeats: int = setting(2, "timed runs of each variant per gallery (alternating)")
    threads: int = setting(2, "OMP_NUM_THREADS of each run")


WITHOUT = {"subspace_latents": 0, "subspace_randoms": 0}


def main(cfg: Settings) -> dict:
    anim = Path(cfg.root) / "Animations" / cfg.run
    galleries = sorted(p.parent.parent for p in anim.glob("*/ground_truth/config.json"))
    if not galleries:
        raise UserError(f"--run: no ground truth under {anim}; run python pipeline.py --run {cfg.run} first")
    out = {}
    for gallery in galleries:
        config = json.loads((gallery / "ground_truth" / "config.json").read_text())
        if config.get("seed_runs"):
            config = dict(config, seed_runs=[])  # one draw: the diagnostic runs once per ground truth
        seconds, counts = {"with": [], "without": []}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(cfg.repeats):
                for name, change in (("with", {}), ("without", WITHOUT)):
                    start = time.perf_counter()
                    path = score(dict(config, **change), gallery / "report.json", config["seed"], cfg.threads,
                                 Path(tmp) / f"{name}{r}")
                    seconds[name].append(time.perf_counter() - start)
                    gt = json.loads(path.read_text())
                    counts[name] = {m: t["recovered_at"] for m, t in gt["methods"].items()}
        same = counts["with"] == counts["without"]
        row = {name: float(np.median(v)) for name, v in seconds.items()}
        row.update(ratio=row["with"] / row["without"], same_counts=same, seconds=seconds)
        out[gallery.name] = row
        print(f"{gallery.name:8s} ground truth: {row['with']:.1f} s with the image measure and random ceilings, "
              f"{row['without']:.1f} s without (median of {cfg.repeats}); ratio {row['ratio']:.2f}; counts "
              + ("the same" if same else "DIFFER"))
    return out


if __name__ == "__main__":
    main(parse_settings(Settings, sys.argv[1:]))

"""Stability of the ground-truth headline: the ground truth of a finished pipeline run scored again with one and
two threads and with two draws of report latents, each in its own process.

    python -m bench.stability --run demo [--seeds 0 1] [--threads 1 2]

A benchmark run's ground truth is the median of three draws (--seed-draws 3: the trained methods on three seeds,
every method on three draws of report latents); each repeat scores all three again, on report latents no other
repeat uses (repeat s moves each draw's seed by s x the number of draws; s = 0 is the run's own, also for a run
of another --seed). So each repeat of a benchmark gallery costs three ground truths, not one.

Target (issue "Counts that hold on any machine"): no count moves by more than 1 between runs, and no verdict
whose p-value is below 0.01 or above 0.2 flips. Prints one row per (generator, method, run) and the spread of
each method's counts, and writes Animations/<run>/stability.json.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from latentct.util.io import atomic_write_json
from latentct.util.settings import UserError, parse_settings, setting

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Settings:
    """Score a finished run's ground truth again under other thread counts and report latents."""

    run: str = setting("demo", "the pipeline run whose ground-truth stages to repeat")
    root: str = setting(".", "folder under which Animations/<run>/ lives")
    seeds: list[int] = setting([0, 1], "repeats on other report latents: 0 is the run's own; repeat s moves the "
                               "run's report-latent seed (EvalDirections --seed) by s, a benchmark's k draws each "
                               "by s x k")
    threads: list[int] = setting([1, 2], "OMP_NUM_THREADS of each repeat")


def score(config: dict, report: Path, seed: int, threads: int, out: Path) -> Path:
    """One ground-truth stage in a fresh process, with ``report`` as its gallery's report and the report-latent
    ``seed``, written under ``out``: its ground_truth.json."""
    out.mkdir(parents=True)
    shutil.copy(report, out / "report.json")
    flags = []
    for key, value in dict(config, output=str(out), seed=seed, ground_truth="only").items():
        if value is None or value == [] or key in ("null_cache",):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    subprocess.run([sys.executable, str(ROOT / "EvalDirections.py"), *flags], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return out / "ground_truth" / "ground_truth.json"


def draws(config: dict, report: Path) -> list[tuple[dict, Path]]:
    """The draws of report latents a ground truth merges, each as (its settings, its gallery's report.json): its
    own, then those of its --seed-runs (the benchmark's other seeds or draws, each a gallery of its own)."""
    out = [(config, report)]
    for path in config.get("seed_runs") or []:
        gallery = ROOT / Path(path).parent.parent            # a draw's gallery: report.json, config.json, ground_truth/
        found = [f for f in (gallery / "ground_truth" / "config.json", gallery / "config.json") if f.is_file()]
        if not found or not (gallery / "report.json").is_file():
            raise UserError(f"{gallery}: no config.json or report.json; the ground truth's draw {path} cannot be "
                            "repeated")
        out.append((json.loads(found[0].read_text()), gallery / "report.json"))
    return out


def repeat(config: dict, report: Path, seed: int, threads: int) -> tuple[dict, list[int]]:
    """The ground truth again, every one of its draws on other report latents, and the report-latent seeds used.
    Its draws were scored with seeds spanning w values (k consecutive seeds for the benchmark's k draws; one seed
    for the demo): in the repeat of ``seed`` s each draw's seed r becomes r + s w, so that s = 0 is the run itself
    and repeats of two seeds share no draw. The medians then come from the repeated draws, not from the files the
    run kept."""
    parts = draws(config, report)
    recorded = [c["seed"] for c, _ in parts]
    shift = seed * (max(recorded) - min(recorded) + 1)
    with tempfile.TemporaryDirectory() as tmp:
        others = [str(score(dict(c, seed_runs=[]), r, c["seed"] + shift, threads, Path(tmp) / f"draw{j}"))
                  for j, (c, r) in enumerate(parts[1:], 1)]
        path = score(dict(config, seed_runs=others), report, config["seed"] + shift, threads, Path(tmp) / "main")
        return json.loads(path.read_text()), [r + shift for r in recorded]


def main(cfg: Settings) -> list[dict]:
    anim = Path(cfg.root) / "Animations" / cfg.run
    rows = []
    for gallery in sorted(p.parent.parent for p in anim.glob("*/ground_truth/config.json")):
        config = json.loads((gallery / "ground_truth" / "config.json").read_text())
        for seed in cfg.seeds:
            for threads in cfg.threads:
                gt, report_seeds = repeat(config, gallery / "report.json", seed, threads)
                for method, table in gt["methods"].items():
                    p = table["p_value"] or {}
                    rows.append({"generator": gallery.name, "method": method, "seed": seed, "threads": threads,
                                 "report_seeds": report_seeds,
                                 "recovered_at": table["recovered_at"], "auc": table["auc"],
                                 "p": p.get("auc"),
                                 "verdict": table["verdict"]})
                    print(f"{gallery.name:8s} {method:22s} seed {seed} threads {threads}: recovered "
                          f"{table['recovered_at']['0.5']}/{table['recovered_at']['0.67']}/"
                          f"{table['recovered_at']['0.8']} at tau 0.5/0.67/0.8, p {rows[-1]['p']}, {table['verdict']}")
    spread = {}
    for r in rows:
        key = f"{r['generator']} {r['method']}"
        spread.setdefault(key, {t: [] for t in r["recovered_at"]})
        for t, n in r["recovered_at"].items():
            spread[key][t].append(n)
    moved = {k: max(max(v) - min(v) for v in s.values()) for k, s in spread.items()}
    print("largest move of a count across the repeats: " + ", ".join(f"{k} {v}" for k, v in moved.items()))
    atomic_write_json(anim / "stability.json", {"rows": rows, "largest_move": moved})
    return rows


if __name__ == "__main__":
    main(parse_settings(Settings, sys.argv[1:]))

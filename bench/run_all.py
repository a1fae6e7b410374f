"""Run every benchmark and print one table of ratios against their naive references.

    python -m bench.run_all [--quick]

Each benchmark runs as its own process (as it would from the command line); --quick uses smaller inputs
(500 preprocessing slices, fewer timed steps) for a fast check.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from latentct.util.settings import parse_settings, setting

ROOT = Path(__file__).resolve().parents[1]


def run(name: str, *flags: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", f"bench.{name}", *flags], capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"bench/{name}.py failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else ''}")
    print("\n".join(line for line in proc.stdout.splitlines() if not line.startswith("RESULT ")))
    return json.loads(lines[-1][len("RESULT "):])


@dataclass
class Settings:
    """Every benchmark, one table."""

    quick: bool = setting(False, "smaller inputs for a fast check")


def main(cfg: Settings) -> list[tuple]:
    rows = []
    r = run("preprocessing", "--slices", "500" if cfg.quick else "2000")
    rows += [("preprocess vs naive (slices/s)", r["speedup_vs_naive"], ">= 3x"),
             ("preprocess time vs floor", r["ratio_to_floor"], "<= 1.5x")]
    r = run("train", "--steps", "16" if cfg.quick else "40")
    rows += [(f"{k} step vs naive (img/s)", v["ratio"], "") for k, v in r.items() if k in ("gan", "vae")]
    r = run("directions", "--steps", "8" if cfg.quick else "20")
    naive = r["cpu"]["naive (original)"]
    rows += [(f"direction step {name} vs original", value / naive, ">= 1.5x (split)")
             for name, value in r["cpu"].items() if name != "naive (original)"]
    r = run("cores", "--steps", "10" if cfg.quick else "40")
    rows += [("main lane, every thread vs one (steps/s)", r["main_lane_ratio"], ""),
             ("pool, one thread per core vs main lane", r["pool_over_main_lane"], "")]
    r = run("eval")
    rows += [("GIFs + report vs naive GIFs", r["ratio"], ""), ("GIFs vs naive GIFs, same work", r["ratio_same_work"], "")]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"\nall benchmarks ({device}, {torch.get_num_threads()} threads)")
    print(f"{'benchmark':44s} {'ratio':>8s}  target")
    for name, ratio, target in rows:
        print(f"{name:44s} {ratio:7.2f}x  {target}")
    return rows


if __name__ == "__main__":
    main(parse_settings(Settings))

"""How far the ground truth's counts move from one draw of report latents to the next, per scoring design:
samples x shifts, and independent or antithetic latents. A finished run's directions (every method its ground
truth scored) are scored again on ``--draws`` fresh draws of latents per design, with noise floors measured at
that design's own sample and shift counts, so the spread is read off many draws instead of bench.stability's two
(which repeats the whole ground truth, null and verdicts included, for the design the run used).

    python -m bench.latent_draws --run demo [--draws 6] [--designs 16x9 32x5]

Prints per (generator, method, design, latents) the counts at tau 0.5/0.67/0.8 of every draw, the largest range of
a count over the draws and the standard deviation of the mean count over tau (the area before it is divided by the
supervised row's); the last line sums the largest ranges per design. Writes Animations/<run>/latent_draws.json.
The comparison is paired: draw d of a design starts from the same seed with independent and antithetic latents
(the antithetic draw mirrors the first half of the independent one), so the two differ only in the pairing.
The run's ground truth must name its oracle (every pipeline run does).
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from latentct.discover.directions import load_directions
from latentct.generators.interface import pairing, report_latents, sample_latents
from latentct.score import validate
from latentct.score.oracle import load_oracle
from latentct.score.report import sweep
from latentct.score.scoring import TAUS, line_effects, score_directions
from latentct.show.images import display
from latentct.util.io import atomic_write_json
from latentct.util.settings import UserError, check, run_cli, setting


@dataclass
class Settings:
    """Score a finished run's directions on many draws of report latents under several scoring designs."""

    run: str = setting("demo", "the pipeline run whose ground-truth galleries to rescore")
    root: str = setting(".", "folder under which Animations/<run>/ lives")
    draws: int = setting(6, "draws of report latents per design")
    designs: list[str] = setting(["16x9", "32x5"], "SAMPLESxSHIFTS designs to compare (EvalDirections "
                                 "--report-samples x --report-shifts)")
    seed: int = setting(0, "seed of the draws (draw d uses seed + 1000 + d) and of the floors' sweeps")
    render_size: int = setting(128, "matrix size the phantom's sweeps are rendered at (the run's --phantom-size)")

    def __post_init__(self):
        check(self.draws >= 2, "draws", f"needs at least 2 draws for a spread, got {self.draws}")


def parse_design(text: str) -> tuple[int, int]:
    try:
        samples, shifts = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--designs: {text!r} is not SAMPLESxSHIFTS, e.g. 32x5") from None
    if samples < 2 or shifts < 3:
        raise UserError(f"--designs: {text!r} needs at least 2 samples and 3 shifts")
    return samples, shifts


def floors_for(samples: int, shifts: int, oracle, seed: int, render_size: int) -> np.ndarray:
    """Noise floors measured with this oracle at this design's sample and shift counts (validate's defaults: three
    groups of patients per single-factor sweep, one per pair)."""
    with tempfile.TemporaryDirectory() as tmp:
        validate.main(validate.Settings(output=tmp, seed=seed, oracle=str(oracle.path), frames=shifts,
                                        scored_samples=samples, image_size=oracle.image_size,
                                        window=",".join(f"{v:g}" for v in oracle.window), render_size=render_size,
                                        workers=2))
        floor = json.loads((Path(tmp) / "validation.json").read_text())["noise_floor"]
    return np.array(list(floor.values()))


def counts(files: dict, G, oracle, floor: np.ndarray, z: torch.Tensor, eps: torch.Tensor) -> dict:
    """Per method: recovered at each of TAUS and the mean count over tau, on latents ``z`` and shifts ``eps``."""
    out = {}
    for name, dirs in files.items():
        images = sweep(G, dirs, list(range(dirs.count)), eps, z)[:, :, :, :1]
        flat = display(images.reshape(-1, *images.shape[3:]), G.window, oracle.window)
        values = oracle.read_std(flat).reshape(*images.shape[:3], -1)
        table = score_directions(*line_effects(values, eps), floor)
        out[name] = [*(table["recovered_at"][k] for k in TAUS), float(np.mean(table["curve"]))]
    return out


def main(cfg: Settings) -> list[dict]:
    designs = [parse_design(d) for d in cfg.designs]
    anim = Path(cfg.root) / "Animations" / cfg.run
    galleries = sorted(p.parent.parent for p in anim.glob("*/ground_truth/config.json"))
    if not galleries:
        raise UserError(f"--run: {anim} holds no ground truth (run python pipeline.py first)")
    rows, floors = [], {}
    for gallery in galleries:
        config = json.loads((gallery / "ground_truth" / "config.json").read_text())
        oracle = load_oracle(config["oracle"])
        main_dirs, G = load_directions(config["directions"])
        files = {main_dirs.method: main_dirs}
        for path in config["compare"]:
            dirs = load_directions(path)[0]
            files[dirs.method if dirs.method not in files else f"{dirs.method} ({Path(path).parent.name})"] = dirs
        scale = config.get("shift_scale") or main_dirs.shift_scale  # every method on the main file's shifts
        pairings = ("independent",) if pairing(G) == "independent" else ("independent", "antithetic")
        for samples, shifts in designs:
            key = f"{samples}x{shifts}"
            if (config["oracle"], key) not in floors:
                floors[config["oracle"], key] = floors_for(samples, shifts, oracle, cfg.seed, cfg.render_size)
            eps = torch.linspace(-scale, scale, shifts)
            for paired in pairings:
                per_draw = []
                for d in range(cfg.draws):
                    gen = torch.Generator().manual_seed(cfg.seed + 1000 + d)
                    z = (sample_latents(G, samples, gen, part="score") if paired == "independent"
                         else report_latents(G, samples, gen))
                    per_draw.append(counts(files, G, oracle, floors[config["oracle"], key], z, eps))
                for name in files:
                    a = np.array([draw[name] for draw in per_draw])
                    row = {"generator": gallery.name, "method": name, "design": key, "latents": paired,
                           "counts": a[:, :3].astype(int).tolist(),
                           "largest_range": int((a[:, :3].max(0) - a[:, :3].min(0)).max()),
                           "mean_count_sd": round(float(a[:, 3].std(ddof=1)), 3)}
                    rows.append(row)
                    print(f"{row['generator']:8s} {name:22s} {key:5s} {paired:11s} counts "
                          f"{' '.join('/'.join(map(str, c)) for c in row['counts'])}  largest range "
                          f"{row['largest_range']}, sd of the mean count {row['mean_count_sd']:.2f}", flush=True)
    total = {}
    for r in rows:
        total[f"{r['design']} {r['latents']}"] = total.get(f"{r['design']} {r['latents']}", 0) + r["largest_range"]
    print("sum of the largest ranges: " + ", ".join(f"{k} {v}" for k, v in total.items()))
    atomic_write_json(anim / "latent_draws.json", {"draws": cfg.draws, "rows": rows, "sum_of_largest_ranges": total})
    return rows


if __name__ == "__main__":
    run_cli(main, Settings, prog="python -m bench.latent_draws")

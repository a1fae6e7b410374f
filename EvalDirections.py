"""Stage 4: animate every direction and measure what it does.

    python EvalDirections.py --directions runs/demo/dcgan_learned/directions.pt --output Animations/demo_dcgan \
        --compare runs/demo/dcgan_sefa/directions.pt runs/demo/dcgan_random/directions.pt

Writes into the output folder: direction_<k>.gif (a 33-frame back-and-forth sweep per direction),
directions<a>-<b>.gif (10 directions x several samples) and chart<a>-<b>.png, report.json (per direction:
slopes and R2 of anatomy measurements against the shift, the dominant one as a label, disentanglement, image
change; on the phantom the ground-truth table for this method and the compared ones), effect_matrix.png,
real_<i>.gif (test slices embedded and moved along the strongest directions), samples.png and index.html.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from latentct.data import CTSlices, parse_window, read_index, unit_to_hu
from latentct.directions import load_directions
from latentct.embed import embed
from latentct.factors import (dataset_fingerprint, has_factors, load_regressor, match_factors, save_regressor,
                              train_regressor)
from latentct.gallery import write_gallery
from latentct.generators import generator_info, load_encoder
from latentct.images import display, make_grid, save_grid, save_png
from latentct.io import atomic_write_json
from latentct.phantom import FACTORS
from latentct.render import chart, direction_gif, grid_gif, heatmap, sweep_plan
from latentct.report import describe, factor_effects, sweep
from latentct.settings import UserError, check, run_cli, save_settings, setting


@dataclass
class Settings:
    """Animate and measure the directions of one directions file (and score others beside it)."""

    directions: str = setting("runs/demo/dcgan_learned/directions.pt", "directions.pt to evaluate")
    output: str = setting("Animations/demo", "output folder (GIFs, report.json, index.html)")
    compare: list[str] = setting([], "more directions files of the same generator for the ground-truth table")
    generator: str | None = setting(None, "generator file, when not where directions.pt says")
    dataset: str | None = setting(None, "preprocessed dataset (default: the generator's training data)")
    which: list[int] = setting([], "directions to show (default: all)")
    shift_scale: float | None = setting(None, "sweep from -shift_scale to +shift_scale (default: the scale the "
                                        "directions were trained or scored with, from directions.pt)")
    display_window: str = setting("lung", "HU window of the GIFs and charts (measurements use HU): lung [-1000, 400]"
                                  " shows every factor: outline and breasts against black air, lungs, fat, organs; "
                                  "pulmonary [-1350, 150] greys the air, mediastinal [-160, 240] blacks out the lungs")
    frames: int = setting(33, "frames of a back-and-forth sweep")
    frame_ms: int = setting(50, "milliseconds per GIF frame")
    grid_samples: int = setting(5, "samples (columns) in the grid GIFs")
    group: int = setting(10, "directions per grid GIF")
    report_samples: int = setting(16, "samples per direction for the measurements")
    report_shifts: int = setting(9, "shift values per direction for the measurements")
    regressor: str | None = setting(None, "factor regressor file to use or create (default: <output>/factor_regressor.pt)")
    regressor_steps: int = setting(600, "training steps of the factor regressor")
    regressor_slices: int = setting(3000, "freshly rendered phantom slices added to its training data")
    r2_min: float = setting(0.5, "matched R2 a factor needs to count as recovered")
    leakage_max: float = setting(0.5, "largest leakage into other factors for a recovered factor")
    real_slices: int = setting(2, "test slices to embed and move along directions")
    real_directions: int = setting(6, "strongest directions shown for each real slice")
    embed_steps: int = setting(200, "optimisation steps per embedding (DCGAN; the VAE uses its encoder)")
    ground_truth: str = setting("auto", "the phantom's ground-truth table: auto (where the data has the factors), "
                                "off, or only (add it to the report an earlier run wrote)", choices=("auto", "off", "only"))
    seed: int = setting(0, "seed for the samples")
    device: str = setting("cpu", "cpu or cuda")
    channels_last: bool = setting(True, "run the generator channels_last (1.5x faster on CPU: bench/eval.py)")

    def __post_init__(self):
        check(self.frames >= 3, "frames", "needs at least 3 frames")
        check(self.shift_scale is None or self.shift_scale > 0, "shift_scale", "must be positive")
        parse_window(self.display_window, "--display-window")
        check(self.report_shifts >= 3, "report_shifts", "needs at least 3 shifts for a line fit")
        check(self.report_samples >= 2, "report_samples", "needs at least 2 samples")


def dataset_spacing(dataset: str | None) -> tuple[float, str | None]:
    """mm per pixel of the generator's training slices, or (1.0, why) when unknown: lengths are then in pixels
    and areas in pixel units / 100, and the report says so."""
    if not dataset:
        return 1.0, "no dataset known for this generator: lengths are in pixels, not mm (pass --dataset)"
    try:
        rows = read_index(dataset, "train")
        return float(np.median([float(r["pixel_spacing_mm"]) for r in rows])), None
    except (OSError, KeyError, ValueError, TypeError) as err:
        return 1.0, (f"no pixel spacing in {dataset} ({type(err).__name__}): lengths are in pixels, not mm")


def main(cfg: Settings) -> dict:
    # Setup: the directions, their generator, its window, units and the samples every part draws from.
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    directions, G = load_directions(cfg.directions, cfg.generator)
    G = G.to(cfg.device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    generator_file = Path(cfg.generator) if cfg.generator else directions.generator_path()
    info = generator_info(generator_file)
    window = tuple(info["window"])
    dataset = cfg.dataset or info["dataset"]
    scale = cfg.shift_scale or directions.shift_scale
    ks = list(cfg.which) or list(range(directions.count))
    bad = [k for k in ks if not 0 <= k < directions.count]
    if bad:
        raise UserError(f"--which: directions {bad} do not exist (K = {directions.count})")
    gen = torch.Generator().manual_seed(cfg.seed)
    grid_z = torch.randn(cfg.grid_samples, G.latent_dim, generator=gen)
    report_z = torch.randn(cfg.report_samples, G.latent_dim, generator=gen)
    report_eps = torch.linspace(-scale, scale, cfg.report_shifts)

    # What each direction does (GIFs, measurements, real slices), or the report an earlier run wrote.
    if cfg.ground_truth == "only":
        save_settings(cfg, out / "ground_truth" / "config.json")
        report, report_images = _read_report(out, cfg.directions), None
    else:
        save_settings(cfg, out / "config.json")
        report, report_images = animate(cfg, directions, G, generator_file, info, window, dataset, scale, ks,
                                         gen, grid_z, report_z, report_eps, out)

    # Ground truth on the phantom: this method beside every --compare file.
    if cfg.ground_truth != "off":
        all_shown = ks == list(range(directions.count))
        report["ground_truth"] = ground_truth(cfg, directions, G, generator_file, window, dataset, report_z,
                                              report_eps, report_images if all_shown else None, out / "ground_truth")
        atomic_write_json(out / "ground_truth" / "ground_truth.json",
                          report["ground_truth"] or {"available": False, "reason": "no phantom factors in the data"})
    report["summary"] = {"labels": {r["direction"]: r["label"] for r in report["directions"]},
                         "recovered": (report.get("ground_truth") or {}).get("main", {}).get("recovered")}
    atomic_write_json(out / "report.json", report)
    page = write_gallery(out, report)
    rows = report["directions"]
    strong = sum(1 for r in rows if r["r2"][r["dominant"]] >= 0.8 and r["score"] > 0.5)
    print(f"evaluated {len(rows)} directions ({strong} with a measurement R2 >= 0.8); gallery: {page}")
    return report


def _read_report(out: Path, directions_file: str) -> dict:
    path = out / "report.json"
    if not path.is_file():
        raise UserError(f"--ground-truth only: {path} is missing; run EvalDirections.py without it first")
    report = json.loads(path.read_text())
    if report.get("directions_file") != str(directions_file):
        raise UserError(f"--ground-truth only: {path} describes {report.get('directions_file')}, not {directions_file}")
    return report


def animate(cfg: Settings, directions, G, generator_file: Path, info: dict, window, dataset, scale: float,
            ks: list[int], gen, grid_z, report_z, report_eps, out: Path) -> tuple[dict, torch.Tensor]:
    """GIFs, charts, samples, the per-direction measurements and the real-slice edits; returns the report and
    the measurement sweep's images (the ground truth reads the same images)."""
    spacing, spacing_note = dataset_spacing(dataset)
    if spacing_note:
        print(f"note: {spacing_note}")

    # Animations: every frame of every direction in batched generator calls.
    unique, frame_index = sweep_plan(scale, cfg.frames)
    eps = unique[frame_index]
    images = display(sweep(G, directions, ks, unique, grid_z), window, cfg.display_window)
    report_images = sweep(G, directions, ks, report_eps, report_z)
    rows = describe(report_images, report_eps, window, spacing, ks)
    for i, (k, row) in enumerate(zip(ks, rows)):
        row["gif"] = f"direction_{k:03d}.gif"
        direction_gif(images[i, frame_index, 0], eps, scale, out / row["gif"], cfg.frame_ms)
    groups = []
    every = max(len(unique) // 8, 1)
    for start in range(0, len(ks), cfg.group):
        part = slice(start, start + cfg.group)
        name = f"{ks[part][0]}-{ks[part][-1]}"
        grid_gif(images[part][:, frame_index], eps, scale, out / f"directions{name}.gif", cfg.frame_ms)
        chart(images[part][:, ::every, 0], out / f"chart{name}.png")
        groups.append({"title": f"directions {name}", "gif": f"directions{name}.gif", "chart": f"chart{name}.png"})
    with torch.no_grad():
        samples = G(torch.randn(32, G.latent_dim, generator=gen).to(cfg.device)).float()
    save_grid(display(samples, window, cfg.display_window), out / "samples.png")

    report = {"name": out.name, "generator": str(generator_file), "generator_kind": info["kind"],
              "directions_file": str(cfg.directions), "method": directions.method, "directions_count": directions.count,
              "rca": directions.rca, "shift_scale": scale, "display_window": list(parse_window(cfg.display_window)),
              "spacing_mm": spacing, "spacing_note": spacing_note, "directions": rows,
              "groups": groups, "samples": "samples.png", "ground_truth": None}
    report["real"] = real_slices(cfg, G, directions, rows, window, dataset, generator_file, scale, out)
    return report, report_images


def ground_truth(cfg: Settings, directions, G, generator_file: Path, window, dataset, z, eps, main_images,
                 out: Path) -> dict | None:
    """On the phantom: the direction x factor table of this method and of every --compare file (files in ``out``)."""
    if not dataset or not Path(dataset, "manifest.json").is_file() or not has_factors(dataset):
        return None
    path = Path(cfg.regressor) if cfg.regressor else out / "factor_regressor.pt"
    current = path.is_file() and _regressor_fits(load_regressor(path)[1], dataset, window)
    if not current:
        save_regressor(train_regressor(dataset, window, steps=cfg.regressor_steps, seed=cfg.seed,
                                       synthetic=cfg.regressor_slices), path)
    regressor, state = load_regressor(path)
    methods, main_table = {}, None
    for i, file in enumerate([cfg.directions, *cfg.compare]):
        dirs = directions if i == 0 else load_directions(file, generator_file)[0]
        ks = list(range(dirs.count))
        images = main_images if i == 0 and main_images is not None else sweep(G, dirs, ks, eps, z)
        r2, effect = factor_effects(images, eps, regressor)
        table = match_factors(r2, effect, cfg.r2_min, cfg.leakage_max)
        table["rca"] = dirs.rca
        name = dirs.method if dirs.method not in methods else f"{dirs.method} ({Path(file).parent.name})"
        methods[name] = table
        if i == 0:
            main_table = table
            highlight = [(v["direction"], FACTORS.index(f)) for f, v in table["factors"].items()]
            heatmap(r2, [f"k={k}" for k in ks], list(FACTORS), "R2 of each factor against each direction's shift",
                    out / "effect_matrix.png", highlight)
            main_table["r2_matrix"] = r2.round(4).tolist()
    return {"regressor_r2": state["test_r2"], "r2_min": cfg.r2_min, "leakage_max": cfg.leakage_max,
            "heatmap": f"{out.name}/effect_matrix.png", "main": main_table, "methods": methods}


def _regressor_fits(state: dict, dataset, window) -> bool:
    """A saved regressor is reused only for the same data (manifest hash) and the same HU window."""
    same = state.get("dataset_sha256") == dataset_fingerprint(dataset) and tuple(state["window"]) == tuple(window)
    if not same:
        print("factor regressor: trained for other data or another window; training a new one")
    return same


def real_slices(cfg: Settings, G, directions, rows, window, dataset, generator_file: Path, scale: float,
                out: Path) -> list[dict]:
    """Test slices embedded in the latent space and moved along the strongest directions."""
    if cfg.real_slices <= 0 or not dataset or not Path(dataset, "manifest.json").is_file():
        return []
    test = CTSlices(dataset, "test", window=window)
    if len(test) == 0:
        test = CTSlices(dataset, "train", window=window)
    picks = torch.linspace(0, len(test) - 1, cfg.real_slices + 2)[1:-1].round().long().tolist()
    x = torch.stack([test[i] for i in picks]).to(cfg.device)
    if x.shape[-1] != G(torch.zeros(1, G.latent_dim, device=cfg.device)).shape[-1]:
        raise UserError(f"--dataset: {dataset} holds {x.shape[-1]} px slices, the generator makes a different size")
    encoder = load_encoder(generator_file, cfg.device)
    z, mse = embed(G, x, encoder=encoder, steps=0 if encoder is not None else cfg.embed_steps, seed=cfg.seed)
    top = [r["direction"] for r in sorted(rows, key=lambda r: -r["score"])[: cfg.real_directions]]
    unique, frame_index = sweep_plan(scale, cfg.frames)
    eps = unique[frame_index]
    index = read_index(dataset, test.split)
    items = []
    with torch.no_grad():
        recon = G(z).float()
    for i, pick in enumerate(picks):
        images = sweep(G, directions, top, unique, z[i:i + 1])[:, frame_index]  # (directions, frames, 1, 1, H, W)
        grid_gif(display(images, window, cfg.display_window), eps, scale, out / f"real_{i}.gif", cfg.frame_ms)
        pair = display(torch.stack([x[i].cpu(), recon[i].cpu()]), window, cfg.display_window)
        save_png(make_grid(pair, nrow=2), out / f"real_{i}_pair.png")
        mae = float((unit_to_hu(recon[i].cpu(), window) - unit_to_hu(x[i].cpu(), window)).abs().mean())
        row = index[pick] if pick < len(index) else {}
        items.append({"title": f"{row.get('patient_id', 'slice')} slice {row.get('slice_index', pick)}",
                      "gif": f"real_{i}.gif", "pair": f"real_{i}_pair.png", "mse": float(mse[i]), "mae_hu": mae,
                      "directions": top, "embedding": "encoder" if encoder is not None else "optimised z"})
    return items


if __name__ == "__main__":
    run_cli(main, Settings)

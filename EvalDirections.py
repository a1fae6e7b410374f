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
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from latentct.data.phantom import FACTORS
from latentct.data.slices import (
    dataset_spacing,
    has_factors,
    held_out,
    is_dataset,
    parse_window,
    read_index,
    unit_to_hu,
)
from latentct.discover.directions import Directions, load_directions
from latentct.generators.embed import embed
from latentct.generators.interface import (
    direction_block,
    file_hash,
    in_block,
    output_size,
    own_encoder,
    pairing,
    place_generator,
    report_latents,
    sample_latents,
)
from latentct.score.report import STRONG, describe, fold_axes, is_strong, real_spreads, realism, sweep
from latentct.score.scoring import (
    AREA_TAUS,
    HEADLINE,
    R2_MIN,
    TAUS,
    across_seeds,
    area,
    effect_dci,
    line_effects,
    null_sets,
    score_directions,
    significance,
    verdict,
)
from latentct.show.gallery import write_gallery
from latentct.show.images import display, make_grid, save_grid, save_png
from latentct.show.render import chart, direction_gif, grid_gif, heatmap, recovered_plot, sweep_plan
from latentct.train.runtime import Runtime, memory_format
from latentct.util.io import atomic_torch_save, atomic_write_json
from latentct.util.settings import UserError, check, run_cli, save_settings, setting


@dataclass
class Settings:
    """Animate and measure the directions of one directions file (and score others beside it)."""

    directions: str = setting("runs/demo/dcgan_learned/directions.pt", "directions.pt to evaluate")
    output: str = setting("Animations/demo", "output folder (GIFs, report.json, index.html)")
    compare: list[str] = setting([], "more directions files of the same generator for the ground-truth table")
    generator: str | None = setting(None, "generator file, when not where directions.pt says")
    generator_weights: str | None = setting(None, "weights of a --generator factory, when not where directions.pt says")
    generator_args: str | None = setting(None, "a --generator factory's arguments (JSON), when not those recorded")
    dataset: str | None = setting(None, "preprocessed dataset (default: the generator's training data)")
    diffusion_view: str | None = setting(None, "a diffusion generator's view: read from directions.pt; given, it must "
                                         "agree", choices=(None, "noise", "h"))
    ddim_steps: int | None = setting(None, "a diffusion generator's DDIM steps: read from directions.pt; given, it "
                                     "must agree")
    t_edit: int | None = setting(None, "the h view's t_edit: read from directions.pt; given, it must agree")
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
    report_samples: int = setting(32, "samples per direction for the measurements")
    report_shifts: int = setting(5, "shift values per direction for the measurements")
    oracle: str | None = setting(None, "factor oracle (oracle.pt; default: the cached one for this image size and "
                                 "window under <root>/runs/oracle/)")
    root: str = setting(".", "folder under which the oracle cache runs/oracle/ lives")
    fit_oracle: str | None = setting(None, "the oracle the supervised ceiling was fitted with: the subspace diagnostic "
                                     "refits the supervised map inside each method's span with it (the span ceiling)"
                                     "; without it the span ceiling is left out")
    subspace_latents: int = setting(16, "latents the subspace diagnostic's image-change angles and shares average "
                                    "the pullback metric over (0: latent coordinates only; diffusion views always)")
    subspace_randoms: int = setting(8, "random spans of each size whose mean image-change share is the chance level "
                                    "beside a method's (0: no chance level and no random spans' ceiling; otherwise "
                                    "3 random spans also give the span ceiling's, their median)")
    validation: str | None = setting(None, "validation.json of the known-answer sweeps (python -m latentct.score.validate):"
                                     " each factor's noise floor comes from it (the ground truth needs it)")
    null_pool: int = setting(256, "random directions in the null's pool, scored once on the report's own latents "
                             "and shifts (0: no null)")
    null_sets: int = setting(1000, "sets of each method's own direction count drawn from the pool: the p-values")
    seed_runs: list[str] = setting([], "ground_truth.json of the same methods on other seeds (trained methods) or "
                                   "report-latent draws (the rest): counts and p-values become their medians, and "
                                   "a method is above the null on more than half of them")
    null_cache: str | None = setting(None, "a file that keeps the scored null pool, reused while the generator, "
                                     "oracle, latents and shifts are the same (bench/budget.py scores many runs)")
    label_subspace: str = setting("auto", "each method's span (this file's and every --compare file's) against "
                                  "directions fitted to the dataset's label columns (preprocess.py --labels) on "
                                  "encoded real slices: auto (where the generator has an encoder), embed (the others "
                                  "too, every slice embedded by optimising z: minutes) or off",
                                  choices=("auto", "embed", "off"))
    label_slices: int = setting(1024, "real training slices the label fit encodes (two thirds fit, a third scores)")
    real_slices: int = setting(2, "test slices to embed and move along directions")
    real_directions: int = setting(6, "strongest directions shown for each real slice")
    embed_steps: int = setting(200, "optimisation steps per embedding (DCGAN; the VAE uses its encoder)")
    ground_truth: str = setting("auto", "the phantom's ground-truth table: auto (where the data has the factors), "
                                "off, or only (add it to the report an earlier run wrote)", choices=("auto", "off", "only"))
    seed: int = setting(0, "seed for the samples")
    device: str = setting("cpu", "cpu or cuda")
    channels_last: str = setting("auto", "run the generator channels_last: auto (on for a CPU, where it measured 1.5x "
                                 "faster: bench/eval.py; off for a GPU), on or off", choices=("auto", "on", "off"))

    def __post_init__(self):
        check(self.frames >= 3, "frames", "needs at least 3 frames")
        check(self.shift_scale is None or self.shift_scale > 0, "shift_scale", "must be positive")
        parse_window(self.display_window, "--display-window")
        check(self.report_shifts >= 3, "report_shifts", "needs at least 3 shifts for a line fit")
        check(self.report_samples >= 2, "report_samples", "needs at least 2 samples")
        check(self.null_pool == 0 or self.null_pool >= 8, "null_pool", "needs 0 (off) or at least 8 directions")
        check(self.subspace_latents >= 0, "subspace_latents", f"needs 0 (off) or more, got {self.subspace_latents}")
        check(self.subspace_randoms >= 0, "subspace_randoms", f"needs 0 (off) or more, got {self.subspace_randoms}")
        check(self.null_sets >= 1, "null_sets", "needs at least 1 set")


@dataclass
class Subject:
    """What is evaluated: the directions, the generator they move, its HU window (None: undeclared, no anatomy),
    the dataset it was trained on (None: unknown) and the sweep's half-range in latent units."""

    directions: Directions
    G: torch.nn.Module
    generator_file: str
    window: tuple[float, float] | None
    dataset: str | None
    scale: float


def load_subject(cfg: Settings) -> Subject:
    directions, G = load_directions(cfg.directions, cfg.generator, cfg.generator_weights, cfg.generator_args)
    check_view(cfg, directions)
    G = place_generator(G, cfg.device, memory_format(cfg.channels_last, Runtime(torch.device(cfg.device))))
    return Subject(directions, G, cfg.generator or directions.generator_ref(), G.window, cfg.dataset or G.dataset,
                   cfg.shift_scale or directions.shift_scale)


def check_view(cfg: Settings, directions: Directions) -> None:
    """A diffusion generator's view, DDIM steps and t_edit come from directions.pt (they define the latent the
    directions live in); a flag that contradicts them stops here, in one line."""
    recorded = directions.state.get("diffusion") or {}
    given = {"view": cfg.diffusion_view, "ddim_steps": cfg.ddim_steps, "t_edit": cfg.t_edit}
    for key, value in given.items():
        if value is None:
            continue
        flag_name = "--diffusion-view" if key == "view" else f"--{key.replace('_', '-')}"
        if not recorded:
            raise UserError(f"{flag_name}: {cfg.directions} was not found on a diffusion generator")
        if recorded.get(key) != value:
            raise UserError(f"{flag_name}: {value} contradicts {cfg.directions}, whose directions were found with "
                            f"{key} {recorded.get(key)}; leave the flag out (it is read from there)")


def main(cfg: Settings) -> dict:
    # Setup: the directions, their generator, and the samples every part draws from.
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    subject = load_subject(cfg)
    ks = list(cfg.which) or list(range(subject.directions.count))
    bad = [k for k in ks if not 0 <= k < subject.directions.count]
    if bad:
        raise UserError(f"--which: directions {bad} do not exist (K = {subject.directions.count})")
    gen = torch.Generator().manual_seed(cfg.seed)
    grid_z = sample_latents(subject.G, cfg.grid_samples, gen)
    report_z = report_latents(subject.G, cfg.report_samples, gen)
    report_eps = torch.linspace(-subject.scale, subject.scale, cfg.report_shifts)

    # What each direction does: measurements, GIFs, samples and real slices (or the report an earlier run wrote).
    if cfg.ground_truth == "only":
        save_settings(cfg, out / "ground_truth" / "config.json")
        report, report_images = _read_report(out, cfg.directions), None
    else:
        save_settings(cfg, out / "config.json")
        spacing, spacing_note = dataset_spacing(subject.dataset)
        if spacing_note:
            print(f"note: {spacing_note}")
        rows, report_images, anatomy_note = measure(subject, ks, report_z, report_eps, spacing,
                                                    spacing_unknown=spacing_note is not None)
        groups = animate(cfg, subject, ks, rows, grid_z, out)
        with torch.no_grad():
            samples = subject.G(sample_latents(subject.G, 32, gen, cfg.device)).float()
        save_grid(display(samples, subject.window, cfg.display_window), out / "samples.png")
        directions, G = subject.directions, subject.G
        report = {"name": out.name, "generator": str(subject.generator_file), "generator_kind": G.reference["kind"],
                  "generator_note": G.reference["note"], "volume": G.volume, "anatomy": anatomy_note,
                  "diffusion": subject.directions.state.get("diffusion"),
                  "window": list(subject.window) if subject.window is not None else None,
                  "directions_file": str(cfg.directions), "method": directions.method,
                  "directions_count": directions.count, "rca": directions.rca, "shift_scale": subject.scale,
                  "display_window": list(parse_window(cfg.display_window)), "spacing_mm": spacing,
                  "spacing_note": spacing_note, "directions": rows, "groups": groups, "samples": "samples.png",
                  "ground_truth": None, "axes": fold_axes(rows) if subject.window is not None else []}
        report["distinct_effects"] = len(report["axes"]) if subject.window is not None else None  # not measured
        report["real"] = real_slices(cfg, subject, rows, out)

    # Ground truth on the phantom, and the spans against the data's labels: this method beside every --compare file.
    files = method_files(cfg, subject)
    if cfg.ground_truth != "off":
        all_shown = ks == list(range(subject.directions.count))
        table, why = ground_truth(cfg, subject, files, report_z, report_eps, report_images if all_shown else None,
                                  out / "ground_truth")
        if why:
            print(f"note: no ground truth: {why}")
        report["ground_truth"] = table
        atomic_write_json(out / "ground_truth" / "ground_truth.json", table or {"available": False, "reason": why})
    report["label_subspace"], why = label_subspace(cfg, subject, files)
    if why:
        print(f"note: no label subspace: {why}")
    report["summary"] = {"labels": {r["direction"]: r["label"] for r in report["directions"]},
                         "recovered": (report.get("ground_truth") or {}).get("main", {}).get("recovered")}
    atomic_write_json(out / "report.json", report)
    page = write_gallery(out, report)
    print(f"evaluated {len(report['directions'])} directions; {summary_line(out)}; gallery: {page}")
    return report


def summary_line(output: Path) -> str:
    """How an evaluation went, in one line, from its report (the pipeline prints it per stage)."""
    rows = json.loads((Path(output) / "report.json").read_text())["directions"]
    return f"{sum(map(is_strong, rows))} strong ({STRONG})"


def measure(subject: Subject, ks: list[int], z, eps, spacing: float,
            spacing_unknown: bool = False) -> tuple[list[dict], torch.Tensor, str]:
    """Sweeps of the directions ``ks`` at shifts ``eps`` from latents ``z``: per direction the anatomy
    measurements' slopes, R2 and label, and how far the sweep stays realistic; also the sweep's axial images
    (the ground truth reads the same ones) and a note on how the anatomy was measured. A volume is measured on its
    axial mid-plane."""
    images = sweep(subject.G, subject.directions, ks, eps, z)[:, :, :, :1]
    if subject.window is None:
        note = "not measured: the generator declares no output_window (the HU of its output range)"
        return unmeasured(images, ks, note), images, note
    note = "measured on the axial mid-plane of each volume" if subject.G.volume else "measured"
    split = held_out(subject.dataset, subject.window)
    real = None if split is None or len(split) < 4 else lambda n: torch.stack(  # n evenly spread real slices
        [split[i] for i in torch.linspace(0, len(split) - 1, min(n, len(split))).round().long().tolist()])
    spreads = None if real is None else real_spreads(real(256), subject.window, spacing)
    rows = describe(images, eps, subject.window, spacing, ks, spreads, pixel_units=spacing_unknown)
    if real is not None:  # how far each sweep stays realistic
        for row, item in zip(rows, realism(images, eps, real(2 * z.shape[0]))):
            row["realism"] = item
    return rows, images, note


def animate(cfg: Settings, subject: Subject, ks: list[int], rows: list[dict], z, out: Path) -> list[dict]:
    """A back-and-forth GIF per direction (its file name goes into its row), grid GIFs and charts of ``group``
    directions at a time; every frame comes from batched generator calls. Returns the groups."""
    unique, frame_index = sweep_plan(subject.scale, cfg.frames)
    eps = unique[frame_index]
    images = display(sweep(subject.G, subject.directions, ks, unique, z), subject.window, cfg.display_window)
    for i, (k, row) in enumerate(zip(ks, rows)):
        row["gif"] = f"direction_{k:03d}.gif"
        direction_gif(images[i, frame_index, 0], eps, subject.scale, out / row["gif"], cfg.frame_ms)
    groups = []
    every = max(len(unique) // 8, 1)
    for start in range(0, len(ks), cfg.group):
        part = slice(start, start + cfg.group)
        name = f"{ks[part][0]}-{ks[part][-1]}"
        grid_gif(images[part][:, frame_index], eps, subject.scale, out / f"directions{name}.gif", cfg.frame_ms)
        chart(images[part][:, ::every, 0], out / f"chart{name}.png")
        groups.append({"title": f"directions {name}", "gif": f"directions{name}.gif", "chart": f"chart{name}.png"})
    return groups


def unmeasured(images: torch.Tensor, ks: list[int], why: str) -> list[dict]:
    """Rows for a generator without a HU window: only how much each direction changes the image."""
    centre = images.shape[1] // 2
    change = (images[:, [0, -1]] - images[:, centre:centre + 1]).abs().mean(dim=(1, 2, 3, 4, 5))
    return [{"direction": k, "slope": {}, "r2": {"none": 0.0}, "effect": {}, "dominant": "none",
             "score": float(change[i]), "label": why, "disentanglement": 0.0, "image_change": float(change[i])}
            for i, k in enumerate(ks)]


def _read_report(out: Path, directions_file: str) -> dict:
    path = out / "report.json"
    if not path.is_file():
        raise UserError(f"--ground-truth only: {path} is missing; run EvalDirections.py without it first")
    report = json.loads(path.read_text())
    if report.get("directions_file") != str(directions_file):
        raise UserError(f"--ground-truth only: {path} describes {report.get('directions_file')}, not {directions_file}")
    return report


def method_files(cfg: Settings, subject: Subject) -> dict[str, Directions]:
    """This file's directions and every --compare file's, loaded once, by the name the tables give them: the
    method, and for a second of the same method its folder as well."""
    files = {}
    for i, file in enumerate([cfg.directions, *cfg.compare]):
        dirs = subject.directions if i == 0 else \
            load_directions(file, subject.generator_file, cfg.generator_weights, cfg.generator_args)[0]
        view, main_view = dirs.state.get("diffusion"), subject.directions.state.get("diffusion")
        if view != main_view:  # swept in the main file's view, they would be scored in a latent they do not live in
            raise UserError(f"--compare: {file} was found in the diffusion view {view}, {cfg.directions} in "
                            f"{main_view}; compare files of one view")
        files[dirs.method if dirs.method not in files else f"{dirs.method} ({Path(file).parent.name})"] = dirs
    return files


def ground_truth(cfg: Settings, subject: Subject, files: dict[str, Directions], z, eps, main_images,
                 out: Path) -> tuple[dict | None, str | None]:
    """On the phantom: the direction x factor table of this method and of every --compare file (the supervised
    ceiling among them), scored by latentct/score/scoring.py against each factor's noise floor, with p-values
    against a pooled null of random directions on the same latents; files in ``out``. Returns (table, None), or
    (None, why there is none)."""
    G, window = subject.G, subject.window
    if not is_dataset(subject.dataset) or not has_factors(subject.dataset):
        return None, "no phantom factors in the data"
    if window is None or G.volume:
        return None, "the ground truth reads 2D slices in a declared HU window"
    oracle_file = _oracle_file(cfg, G, window)
    missing = None
    if not oracle_file.is_file():
        missing = (f"--oracle: {oracle_file} does not exist; train the factor oracle with python -m "
                   f"latentct.score.oracle --image-size {output_size(G)} --window "
                   f"{','.join(f'{v:g}' for v in window)}, or pass --oracle")
    elif not cfg.validation or not Path(cfg.validation).is_file():
        missing = (f"--validation: {cfg.validation or 'not given'}; the noise floors come from the known-answer "
                   f"sweeps: python -m latentct.score.validate --output DIR --image-size {output_size(G)} "
                   f"--oracle {oracle_file}, then pass --validation DIR/validation.json")
    if missing:
        if cfg.ground_truth == "only" or (cfg.oracle and not oracle_file.is_file()):
            raise UserError(missing)
        return None, missing
    from latentct.score.oracle import load_oracle

    oracle = load_oracle(oracle_file)
    validation = json.loads(Path(cfg.validation).read_text())
    _check_floors(validation, cfg, oracle)
    floor = np.array([validation["noise_floor"][f] for f in FACTORS])
    design = {"samples": int(z.shape[0]), "shifts": int(eps.numel()), "pairing": pairing(G)}
    scorer = {"score oracle": oracle.sha256, "noise floors": dict(zip(FACTORS, floor.tolist())),
              "null pool and sets": [cfg.null_pool, cfg.null_sets] if cfg.null_pool else None}
    others = [_seed_run(path, design, scorer) for path in cfg.seed_runs]  # checked before any work
    out.mkdir(parents=True, exist_ok=True)

    def read(images):  # the oracle's standardised factors of (K, E, Z, 1, H, W) images
        flat = display(images.reshape(-1, *images.shape[3:]), window, oracle.window)
        return oracle.read_std(flat).reshape(*images.shape[:3], -1)

    methods, main = {}, None
    for i, (name, dirs) in enumerate(files.items()):
        ks = list(range(dirs.count))
        images = main_images if i == 0 and main_images is not None else sweep(G, dirs, ks, eps, z)
        r2, effect = line_effects(read(images), eps)
        table = score_directions(r2, effect, floor)
        table.update(rca=dirs.rca, effect_dci=effect_dci(effect, floor), directions_count=dirs.count,
                     supervision=dirs.supervision, file=str(dirs.path),
                     file_sha256=file_hash(dirs.path))
        if dirs.method == "supervised":
            table["supervised"] = dirs.extra
        methods[name] = table
        if i == 0:
            main = dict(table, r2_matrix=r2.round(4).tolist(), effect_matrix=effect.round(4).tolist())
            stands = [(m["direction"], FACTORS.index(m["factor"])) for m in table["matches"][HEADLINE]]
            heatmap(effect, [f"k={k}" for k in ks], list(FACTORS), "effect of each direction on each factor "
                    f"(std units; red: recovered at tau {HEADLINE})", out / "effect_matrix.png", stands)
    supervised = methods.get("supervised")
    sup_curve = np.asarray(supervised["curve"], dtype=float) if supervised else None
    largest = max(t["directions_count"] for t in methods.values())
    if cfg.null_pool and cfg.null_pool < 2 * largest:
        raise UserError(f"--null-pool: {cfg.null_pool} random directions cannot make random sets of {largest} "
                        f"(the largest method's K); pass at least {2 * largest}")
    pool = cached_null(cfg, G, z, eps, read, oracle.sha256) if cfg.null_pool else None
    for table in methods.values():
        table["auc"] = area(np.asarray(table["curve"]), sup_curve)
        table["p_value"] = None
        if pool is not None:
            null = null_sets(*pool, floor, table["directions_count"], cfg.null_sets, seed=cfg.seed)
            table["p_value"] = significance(table, null)
            table["null_mean_at"] = {key: float(v.mean()) for key, v in null["at"].items()}
        headline_p = None if table["p_value"] is None else table["p_value"]["auc"]
        table["above_null"] = None if headline_p is None else bool(headline_p < 0.05)
        table["verdict"] = verdict(headline_p)
        table["per_seed"] = [{"seed": cfg.seed, "recovered_at": table["recovered_at"], "auc": table["auc"],
                              "p_value": table["p_value"]}]
    for kept in others:  # the same methods on other seeds or report-latent draws: medians and 2 of 3
        other = kept["methods"]
        for name in [n for n in methods if n in other]:
            methods[name]["per_seed"] += other[name]["per_seed"]
    for name, table in methods.items():
        if len(table["per_seed"]) > 1:
            methods[name] = across_seeds([table])
    supervised = methods.get("supervised")
    for table in methods.values():
        table["recoverable_at"] = supervised["recovered_at"] if supervised else None
        table["recoverable"] = supervised["recovered"] if supervised else None
    if supervised:
        subspaces(cfg, G, files, methods, z, eps, read, floor)
    main.update({k: methods[next(iter(methods))][k] for k in ("recovered_at", "recovered", "auc", "recoverable_at",
                                                              "recoverable", "p_value", "above_null", "verdict",
                                                              "per_seed")})
    recovered_plot(methods, AREA_TAUS, TAUS[HEADLINE], out / "recovered_curve.png")
    fit_oracle = (supervised or {}).get("supervised", {}).get("oracle_sha256")
    return {"oracles": {"fit": fit_oracle, "score": oracle.sha256}, "oracle_path": str(oracle.path),
            "oracle_r2": oracle.r2, "validation": _validation_summary(validation),
            "noise_floor": dict(zip(FACTORS, floor.tolist())), "minimum_effect": validation.get("minimum_effect"),
            "attainable": validation.get("attainable"), "taus": TAUS, "headline": HEADLINE, "r2_min": R2_MIN,
            "recoverable_at": supervised["recovered_at"] if supervised else None,
            "recoverable": supervised["recovered"] if supervised else None, "design": design,
            "null": None if pool is None else {"pool": cfg.null_pool, "sets": cfg.null_sets, **design,
                                               "latents": "the report's own",
                                               "weak": cfg.null_pool < 256 or cfg.null_sets < 1000},
            "heatmap": f"{out.name}/effect_matrix.png", "curve": f"{out.name}/recovered_curve.png",
            "main": main, "methods": methods}, None


def subspaces(cfg: Settings, G, files: dict, methods: dict, z, eps, read, floor) -> None:
    """Each method's ``subspace`` entry (latentct/score/subspace.py): its span against the supervised directions'
    and, with --fit-oracle, the span ceiling scored like every direction."""
    from latentct.discover.baselines import fit_directions, fit_readings
    from latentct.score import subspace

    sup_dirs = files["supervised"]
    target = sup_dirs.unit_rows()
    fit = None
    if cfg.fit_oracle:
        from latentct.score.oracle import load_oracle

        fit_oracle = load_oracle(cfg.fit_oracle)
        wanted = sup_dirs.extra.get("oracle_sha256")
        if wanted and fit_oracle.sha256 != wanted:
            raise UserError(f"--fit-oracle: {cfg.fit_oracle} is not the oracle the supervised directions were fitted "
                            f"with (sha256 {fit_oracle.sha256[:12]}, they name {wanted[:12]})")
        samples = int(sup_dirs.extra.get("samples", 2048))
        seed = int((sup_dirs.state.get("settings") or {}).get("seed", cfg.seed))
        h_view = getattr(G, "view", None) == "h"  # each span then draws its own fit latents (span_fit)
        fit = (None, None, samples) if h_view else (*fit_readings(G, fit_oracle, G.window, samples, seed), samples)
    recoverable = methods["supervised"]["recovered_at"][HEADLINE]
    start, stop = direction_block(G)  # the dimensions directions can live in: the chance level's
    image_z = z[:cfg.subspace_latents] if getattr(G, "view", None) is None else z[:0]  # a diffusion view: no image
    names = [name for name in methods if name != "supervised"]
    sizes = {name: subspace.span_size(files[name].method, files[name].count,  # a median over an even number
                                      None if recoverable is None else math.ceil(recoverable))  # of seeds: round up
             for name in names}
    # Random spans: draw j is one sequence of unit rows from its own seed, and its first k rows are the random
    # k-span, so a method's chance level and random ceiling do not move with the other methods diagnosed beside it
    draws = max(cfg.subspace_randoms, 3) if cfg.subspace_randoms else 0
    longest = max(sizes.values(), default=0)
    randoms = [in_block(G, subspace.random_rows(longest, stop - start, cfg.seed * 7919 + 4099 + j).float())
               for j in range(draws)]
    images = {}
    if len(image_z) and longest:
        images = subspace.diagnose_images(G, {name: files[name].unit_rows()[:sizes[name]] for name in names
                                              if sizes[name]}, target, randoms[:cfg.subspace_randoms], image_z,
                                          FACTORS)
    random_ceilings = {}  # span size -> the median ceiling of 3 random spans of it

    def ceiling_at(basis):
        in_span = span_fit(G, fit_oracle, basis, fit[2], seed) if h_view else fit
        ceiling, _ = fit_directions(in_span[0], in_span[1], in_span[2], basis)
        r2, effect = line_effects(read(sweep(G, subspace.Basis(ceiling), list(range(len(ceiling))), eps, z)), eps)
        return score_directions(r2, effect, floor)["recovered_at"]

    for name in names:
        k = sizes[name]
        entry, basis = subspace.diagnose(files[name].unit_rows(), target, k, FACTORS, dim=stop - start)
        entry["image"] = images.get(name)
        entry["span_ceiling_at"] = entry["span_ceiling_chance_at"] = None
        if fit is not None and basis.shape[1]:
            entry["span_ceiling_at"] = ceiling_at(basis)
            # random spans of the same size: what a span this large holds anyway (not in a diffusion h view,
            # where each ceiling samples thousands of images: the random method's own row is the reference there)
            if k not in random_ceilings and not h_view and randoms:
                drawn = [ceiling_at(subspace.orthonormal_basis(rows[:k])) for rows in randoms[:3]]
                random_ceilings[k] = {key: int(np.median([d[key] for d in drawn])) for key in TAUS}  # of 3
            entry["span_ceiling_chance_at"] = random_ceilings.get(k)
        methods[name]["subspace"] = entry


def span_fit(G, oracle, basis: torch.Tensor, samples: int, seed: int) -> tuple:
    """The span ceiling's fit latents where the prior cannot give them (a diffusion h view: dh = 0 in every draw,
    and the supervised fit's draws in h's principal components are not isotropic in another span, so the slopes
    on a span's coordinates would take up the rest): x_T from the prior, dh drawn isotropically inside the span,
    each reading paired with its dh = 0 image's (baselines.readings_of)."""
    from latentct.discover.baselines import readings_of

    gen = torch.Generator().manual_seed(seed * 7919 + 23)
    z = G.fit_in_span(samples + samples // 2, basis, gen)
    return z, readings_of(G, oracle, G.window, z, paired=True), samples


def cached_null(cfg: Settings, G, z, eps, read, oracle_sha: str) -> tuple[np.ndarray, np.ndarray]:
    """The pooled null, from --null-cache when it was scored with this generator, oracle, latents, shifts and
    pool; otherwise scored now (and kept there)."""
    import hashlib

    key = hashlib.sha256(json.dumps([G.reference.get("files"), G.reference.get("options", {}).get("diffusion"),
                                     oracle_sha, cfg.null_pool, cfg.seed]).encode()
                         + z.numpy().tobytes() + eps.numpy().tobytes()).hexdigest()
    if cfg.null_cache and Path(cfg.null_cache).is_file():
        kept = torch.load(cfg.null_cache, weights_only=True)
        if kept.get("key") == key:
            return kept["r2"].numpy(), kept["effect"].numpy()
    r2, effect = pooled_null(cfg, G, z, eps, read)
    if cfg.null_cache:
        atomic_torch_save({"key": key, "r2": torch.from_numpy(r2), "effect": torch.from_numpy(effect)}, cfg.null_cache)
    return r2, effect


def _seed_run(path: str, design: dict, scorer: dict) -> dict:
    """Another draw's ground_truth.json (--seed-runs), refused in one line unless it was scored like this run: the
    same sample count, shifts and pairing, score oracle, noise floors and null."""
    kept = json.loads(Path(path).read_text())
    theirs = kept.get("design")
    if theirs != design:
        raise UserError(f"--seed-runs: {path} was scored with {theirs}, this run with {design}: medians over "
                        "other scoring designs would mix their noise (score it again)")
    null = kept.get("null") or {}
    theirs = {"score oracle": (kept.get("oracles") or {}).get("score"), "noise floors": kept.get("noise_floor"),
              "null pool and sets": [null["pool"], null["sets"]] if null else None}
    differ = [key for key in scorer if theirs[key] != scorer[key]]
    if differ:
        raise UserError(f"--seed-runs: {path} was scored with another {' and '.join(differ)} than this run "
                        f"({', '.join(f'{theirs[k]} there, {scorer[k]} here' for k in differ)}): its counts and "
                        "p-values are not comparable (score it again)")
    return kept


def _check_floors(validation: dict, cfg: Settings, oracle) -> None:
    """The noise floors hold only for what they were measured with: the score oracle, the sample count and the
    number of shifts of this run (effects shrink with both counts)."""
    measured = {"oracle": validation.get("oracle_sha256"), "samples": validation.get("samples"),
                "shifts": validation.get("frames")}
    here = {"oracle": oracle.sha256, "samples": cfg.report_samples, "shifts": cfg.report_shifts}
    wrong = [k for k in measured if measured[k] is not None and measured[k] != here[k]]
    if wrong:
        raise UserError(f"--validation: {cfg.validation} measured its noise floors with " + ", ".join(
            f"{k} {measured[k]}" for k in wrong) + "; this run has " + ", ".join(f"{k} {here[k]}" for k in wrong)
            + " (rerun python -m latentct.score.validate with --scored-samples, --frames and --oracle to match, and "
            "at least as many --patients and --pair-patients as samples)")


def pooled_null(cfg: Settings, G, z, eps, read, chunk: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """R2 and effect (pool, F) of ``null_pool`` random unit directions, swept like every method: the same
    latents, shifts and sample count. Scored once; every method's null sets are drawn from it."""
    gen = torch.Generator().manual_seed(cfg.seed + 99991)
    start, stop = direction_block(G)  # where the methods' directions live (dh only in a diffusion h view)
    matrix = in_block(G, F.normalize(torch.randn(cfg.null_pool, stop - start, generator=gen), dim=1))
    r2, effect = [], []
    for start in tqdm(range(0, cfg.null_pool, chunk), desc="null pool", unit="chunk", leave=False):
        part = matrix[start:start + chunk]
        dirs = Directions({"method": "random", "matrix": part, "deformator": None, "generator": {}, "rca": None},
                          Path("null"))
        values = read(sweep(G, dirs, list(range(len(part))), eps, z))
        pr2, peffect = line_effects(values, eps)
        r2.append(pr2)
        effect.append(peffect)
    return np.concatenate(r2), np.concatenate(effect)


def _oracle_file(cfg: Settings, G, window) -> Path:
    """The oracle given, or where the cached one for this image size and window lives."""
    from latentct.score import oracle as oracle_stage

    if cfg.oracle:
        return Path(cfg.oracle)
    return oracle_stage.folder_for(oracle_stage.Settings(image_size=output_size(G), window=",".join(map(str, window)),
                                                         root=cfg.root)) / "oracle.pt"


def _validation_summary(validation: dict) -> dict:
    return {k: validation[k] for k in ("checks", "noise_floor", "minimum_effect", "attainable", "oracle", "sweeps",
                                       "seed", "samples") if k in validation}


def label_subspace(cfg: Settings, subject: Subject, files: dict[str, Directions]) -> tuple[dict | None, str | None]:
    """On data with label columns: directions fitted to them from encoded real slices, and every method's span
    against theirs (latentct/score/subspace.py); on the phantom also their angles to the oracle's supervised
    directions. Returns (entry, None) or (None, why there is none)."""
    from latentct.data.slices import CTSlices, load_manifest
    from latentct.score import subspace

    G = subject.G
    if cfg.label_subspace == "off" or not is_dataset(subject.dataset) or G.volume or subject.window is None:
        return None, None
    columns = load_manifest(subject.dataset).get("label_columns") or []
    if not columns:
        return None, None
    encoder = own_encoder(G, subject.generator_file)
    if encoder is None and cfg.label_subspace != "embed":
        return None, "the generator has no encoder; --label-subspace embed embeds every slice (minutes)"
    G = G.cpu()

    def encode(x):
        return encoder(x)[0] if encoder is not None else embed(G, x, steps=cfg.embed_steps, seed=cfg.seed)[0]

    try:
        slices = CTSlices(subject.dataset, "train", window=subject.window, labels=columns)
        target, info = subspace.label_directions(encode, slices, columns, cfg.label_slices, cfg.seed)
    except ValueError as err:
        return None, f"the label fit needs varying labels on at least 12 slices: {err}"
    info["encoder"] = "encoder" if encoder is not None else "optimised z"
    methods = {}
    for name, dirs in files.items():
        if dirs.method == "supervised":
            info["supervised_angles_deg"] = subspace.principal_angles(dirs.unit_rows(), target.double())
            continue
        k = subspace.span_size(dirs.method, dirs.count, len(columns))
        methods[name] = subspace.diagnose(dirs.unit_rows(), target.double(), k, columns)[0]
    info["methods"] = methods
    return info, None


def real_slices(cfg: Settings, subject: Subject, rows: list[dict], out: Path) -> list[dict]:
    """Held-out slices embedded in the latent space and moved along the strongest directions."""
    G, window = subject.G, subject.window
    if G.volume or window is None or cfg.real_slices <= 0:
        return []
    split = held_out(subject.dataset, window)
    if split is None:
        return []
    picks = torch.linspace(0, len(split) - 1, cfg.real_slices + 2)[1:-1].round().long().tolist()
    x = torch.stack([split[i] for i in picks]).to(cfg.device)
    size = output_size(G)
    if x.shape[-1] != size:
        raise UserError(f"--dataset: {subject.dataset} holds {x.shape[-1]} px slices, the generator makes {size} px")
    encoder = own_encoder(G, subject.generator_file, cfg.device)
    z, mse = embed(G, x, encoder=encoder, steps=0 if encoder is not None else cfg.embed_steps, seed=cfg.seed)
    top = [r["direction"] for r in sorted(rows, key=lambda r: -r["score"])[: cfg.real_directions]]
    unique, frame_index = sweep_plan(subject.scale, cfg.frames)
    eps = unique[frame_index]
    index = read_index(subject.dataset, split.split)
    items = []
    with torch.no_grad():
        recon = G(z).float()
    for i, pick in enumerate(picks):
        images = sweep(G, subject.directions, top, unique, z[i:i + 1])[:, frame_index]  # (dirs, frames, 1, 1, H, W)
        grid_gif(display(images, window, cfg.display_window), eps, subject.scale, out / f"real_{i}.gif", cfg.frame_ms)
        pair = display(torch.stack([x[i].cpu(), recon[i].cpu()]), window, cfg.display_window)
        save_png(make_grid(pair, nrow=2), out / f"real_{i}_pair.png")
        mae = float((unit_to_hu(recon[i].cpu(), window) - unit_to_hu(x[i].cpu(), window)).abs().mean())
        row = index[pick] if pick < len(index) else {}
        items.append({"title": f"{row.get('patient_id', 'slice')} slice {row.get('slice_index', pick)}",
                      "gif": f"real_{i}.gif", "pair": f"real_{i}_pair.png", "mse": float(mse[i]), "mae_hu": mae,
                      "directions": top, "embedding": "encoder" if encoder is not None else "optimised z"})
    return items


def ground_truth_line(output: Path) -> str:
    """The ground-truth stage's one line for the pipeline: the headline, the area and its p-value, the verdict."""
    gt = json.loads((Path(output) / "ground_truth.json").read_text())
    if not gt.get("main"):
        return gt.get("reason", "")
    main = gt["main"]
    of = f"of {gt['recoverable']} recoverable" if gt.get("recoverable") is not None else "of 6 factors"
    area = "area –" if main.get("auc") is None else f"area {main['auc']:.2f}"
    p = (main.get("p_value") or {}).get("auc")
    return (f"{main['recovered']} recovered {of} at tau 2/3, {area}" + ("" if p is None else f" (p {p:.3f})")
            + f": {main['verdict']}")


if __name__ == "__main__":
    run_cli(main, Settings)

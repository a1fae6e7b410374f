"""Known-answer sweeps: how far to trust the scorer, the oracle and the anatomy labels.

    python -m latentct.score.validate --output Animations/demo/validation [--seed S] [--image-size 64] [--vae generator.pt]

The phantom renders sweeps in which exactly one factor moves over its full range while the patient, its
nuisance, z and the noise draw stay fixed (three groups of the scorer's samples per factor): breast sweeps at
z = 0.5 from no breast to the largest, z sweeps over [0.1, 0.9] on patients without breasts, the others at a z drawn in
[0.25, 0.75]. Sweeps in which two factors move together follow. The oracle reads every frame and the *same*
scorer that scores a generator's directions (latentct/score/scoring.py) scores the sweeps:

- each single-factor sweep must be attributed to its own factor (its largest effect) with leakage <= 0.15;
- in each two-factor sweep its two factors must be the two largest effects;
- the anatomy report's label (the one a user of real LIDC sees, where there is no oracle) should lead with the
  expected measurement for each factor (EXPECTED_LABELS), and names it alone only where it holds more than 2/3
  of the change with R2 >= 0.5: a clean change of one factor can honestly read as a mixture of measurements that
  move together (a thicker body also has more body area); the confusion table shows what it leads with per
  patient.

The sweeps also give each factor's noise floor: the effect the oracle reports on a factor that a sweep held
still, measured at the scorer's own sample count over disjoint groups of patients (mean + 2 SD; effects shrink
with the square root of the sample count, so a floor measured on 96 patients at once would be too low for 32).
The scorer subtracts it before the shares and asks a recovered factor to move by at least twice it. Through a
VAE (--vae) the sweeps also say what share a perfectly clean change keeps after the VAE's encode-decode: the
attainable level, reported beside the counts, not used as a threshold. The oracle's held-out R2 is reported
beside its R2 on VAE reconstructions of held-out slices (how it reads generated-looking images).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from latentct.data import phantom
from latentct.data.phantom import FACTOR_RANGES, FACTORS
from latentct.data.slices import hu_to_unit, parse_window
from latentct.score.scoring import attribution, line_effects, shares
from latentct.util.io import atomic_write_json
from latentct.util.parallel import pool_map, worker_pool
from latentct.util.settings import UserError, check, run_cli, save_settings, setting

# The full range each sweep covers. Breast: from none to the largest; z: lung apex region to upper abdomen.
SWEEP_RANGES = {"z_position": (0.1, 0.9), **FACTOR_RANGES, "breast_size": (0.0, 1.0)}
# The anatomy measurement that should label each factor's sweep (latentct/score/anatomy.py). Over z in [0.1, 0.9] the
# lungs appear, fill the chest and give way to the liver: lung area changes most, but not along a line (its
# R2 against z is 0.2-0.4), so no measurement labels z sweeps reliably; it is the factor the 5-of-6 rule
# leaves room for.
EXPECTED_LABELS = {"z_position": "lung_area", "y_offset": "centroid_y", "rotation": "orientation",
                   "thickness": "thickness", "width": "width", "breast_size": "anterior_tissue"}
LEAKAGE_TARGET = 0.15
# The factors' own units, for the smallest effect a recovered factor needs (z and breast are fractions of range).
UNITS = {"z_position": "of its range", "y_offset": "mm", "rotation": "deg", "thickness": "mm", "width": "mm",
         "breast_size": "of its range"}


@dataclass
class Settings:
    """Score the phantom's known-answer sweeps with the oracle and the anatomy report."""

    output: str = setting("Animations/demo/validation", "folder for validation.json")
    seed: int = setting(0, "seed of the sweeps' patients")
    image_size: int = setting(64, "side of the slices (the oracle's and the generators' resolution)")
    window: str = setting("default", "HU window of the oracle and the generators")
    oracle: str | None = setting(None, "oracle.pt to use (default: train or reuse the cached one for this size)")
    root: str = setting(".", "folder under which the oracle cache runs/oracle/ lives")
    vae: str | None = setting(None, "a VAE generator.pt: the oracle is also scored on its reconstructions")
    dcgan: str | None = setting(None, "a DCGAN generator.pt: the attainable level through it too (each sweep frame "
                                "embedded by optimising z, 4 x 300 steps per slice: the benchmark's)")
    fit_oracle: str | None = setting(None, "the other oracle (the one the supervised ceiling is fitted with): each "
                                     "factor's agreement between the two is reported")
    probe_slices: int = setting(3000, "with --vae: reconstructions a probe is trained on, labelled with their "
                                "inputs' factors; its held-out R2 bounds what the VAE leaves readable")
    probe_steps: int = setting(1500, "training steps of that probe")
    patients: int | None = setting(None, "patients per single-factor sweep (default: three groups of "
                                   "--scored-samples)")
    pair_patients: int | None = setting(None, "patients per two-factor sweep (default: one group of "
                                        "--scored-samples)")
    frames: int = setting(5, "frames per sweep (EvalDirections --report-shifts: the floors need them equal)")
    render_size: int = setting(128, "matrix size the phantom is rendered at")
    workers: int = setting(1, "processes that render sweeps")
    scored_samples: int = setting(32, "samples a direction is scored on (EvalDirections --report-samples): the "
                                  "noise floors are what an unmoved factor scores on that many")

    def __post_init__(self):
        self.patients = 3 * self.scored_samples if self.patients is None else self.patients
        self.pair_patients = self.scored_samples if self.pair_patients is None else self.pair_patients
        for name in ("patients", "pair_patients", "workers", "scored_samples"):
            check(getattr(self, name) >= 1, name, "must be at least 1")
        check(self.frames >= 3, "frames", "needs at least 3 frames for a line fit")
        parse_window(self.window)


# ------------------------------------------------------------------------------------------ sweeps

def _sweep_patient(seed: int, factors: tuple[str, ...], index: int):
    """The patient, its z and its noise seed for one sweep: breast sweeps at z = 0.5, z sweeps without breasts."""
    code = sum(FACTORS.index(f) * 7 ** i for i, f in enumerate(factors)) + 1
    rng = np.random.default_rng([seed, 31337, code, index])
    patient = phantom.sample_patient(rng)
    if "z_position" in factors and "breast_size" not in factors:
        patient = dataclasses.replace(patient, breast_size=0.0)
    z = 0.5 if "breast_size" in factors else float(rng.uniform(0.25, 0.75))
    return patient, z, int(rng.integers(2**31))


def render_sweep(job: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Worker: one sweep's frames as int16 HU (E, S, S) and their visible factors (E, 6). Every frame uses the
    same patient, z (unless z moves) and noise draw; only the sweep's factors change."""
    from latentct.data.dicom import resize_slices

    seed, factors, index, frames, render_size, image_size = job
    torch.set_num_threads(1)
    patient, z, noise_seed = _sweep_patient(seed, factors, index)
    images, targets = [], []
    for t in np.linspace(0.0, 1.0, frames):
        values = {f: SWEEP_RANGES[f][0] + t * (SWEEP_RANGES[f][1] - SWEEP_RANGES[f][0]) for f in factors}
        frame_z = values.pop("z_position", z)
        p = dataclasses.replace(patient, **values)
        hu = phantom.render_slice(p, frame_z, render_size, np.random.default_rng(noise_seed))
        images.append(phantom.as_read_back(hu, p.padding))
        targets.append(phantom.visible_factors(p, frame_z))
    return resize_slices(np.stack(images), image_size), np.asarray(targets, dtype=np.float32)


def render_sweeps(sweeps: list[tuple[str, ...]], patients: int, cfg: Settings, desc: str):
    """HU (len(sweeps), E, P, 1, S, S) int16 and exact factors (len(sweeps), E, P, 6)."""
    jobs = [(cfg.seed, s, i, cfg.frames, cfg.render_size, cfg.image_size) for s in sweeps for i in range(patients)]
    with worker_pool(cfg.workers) as pool:
        parts = list(pool_map(render_sweep, jobs, pool, desc, "sweep", chunksize=4))
    hu = torch.from_numpy(np.stack([p[0] for p in parts]))          # (sweeps * P, E, S, S)
    exact = torch.from_numpy(np.stack([p[1] for p in parts]))       # (sweeps * P, E, 6)
    S, E = hu.shape[-1], cfg.frames
    hu = hu.reshape(len(sweeps), patients, E, 1, S, S).transpose(1, 2)
    exact = exact.reshape(len(sweeps), patients, E, len(FACTORS)).transpose(1, 2)
    return hu, exact


def factor_spread(seed: int = 0, count: int = 20000) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the visible factors over random (patient, z): the units in which exact
    factors are scored when no oracle reads them (the oracle's own units are the same spread, estimated
    from its training slices)."""
    rng = np.random.default_rng([seed, 4242])
    values = torch.tensor([phantom.visible_factors(phantom.sample_patient(rng), float(rng.uniform()))
                           for _ in range(count)], dtype=torch.float64)
    return values.mean(0).float(), values.std(0).float()


# ------------------------------------------------------------------------------------------ scoring

def score_single(values: torch.Tensor, eps: torch.Tensor) -> dict:
    """Single-factor sweeps (6, E, P, 6) of standardised readings: per sweep the attributed factor, its raw
    leakage and the own-factor R2 (all patients together)."""
    r2, effect = line_effects(values, eps)
    own, leakage = attribution(effect)
    return {"r2": r2, "effect": effect, "attributed": own, "leakage": leakage}


def score_pairs(values: torch.Tensor, eps: torch.Tensor) -> np.ndarray:
    """Two-factor sweeps (pairs, E, P, 6): the effect matrix (pairs, 6)."""
    return line_effects(values, eps)[1]


def noise_floors(groups: list[tuple[torch.Tensor, torch.Tensor]], eps: torch.Tensor, samples: int) -> dict:
    """Per factor, mean + 2 SD of its effect in sweeps that held it still, each sweep scored on disjoint groups
    of ``samples`` patients (no resampling; one group of all patients where a sweep has fewer, and then the
    floors are recorded at that smaller count, which the scorer refuses to use for ``samples``).
    ``groups``: (values (sweeps, E, P, F), moved (sweeps, F) bool) for the single- and the two-factor sweeps."""
    effects = [[] for _ in FACTORS]
    sizes = []
    for values, moved in groups:
        P = values.shape[2]
        size = min(samples, P)
        sizes.append(size)
        for g in range(P // size):
            effect = line_effects(values[:, :, g * size:(g + 1) * size], eps)[1]
            for s, f in zip(*np.nonzero(~moved.numpy())):
                effects[f].append(effect[s, f])
    floor = {f: float(np.mean(v) + 2 * np.std(v, ddof=1)) if len(v) > 1 else float(np.mean(v))
             for f, v in zip(FACTORS, effects)}
    # the count they hold for: the smallest group (fewer patients than asked give a higher floor, for that count)
    return {"noise_floor": floor, "floor_values": {f: len(v) for f, v in zip(FACTORS, effects)},
            "samples": min(sizes)}


def attainable(values: torch.Tensor, eps: torch.Tensor, floor: np.ndarray, samples: int) -> dict:
    """The median share a single-factor sweep keeps on its own factor (after the floors), over disjoint groups of
    ``samples`` patients: what a perfectly clean change looks like through whatever made ``values``."""
    P = values.shape[2]
    size = min(samples, P)
    kept = [[] for _ in FACTORS]
    for g in range(P // size):
        share = shares(line_effects(values[:, :, g * size:(g + 1) * size], eps)[1], floor)
        for k in range(len(FACTORS)):
            kept[k].append(share[k, k])
    return {f: float(np.median(v)) for f, v in zip(FACTORS, kept)}


def anatomy_labels(hu: torch.Tensor, window, spacing: float) -> tuple[dict, dict]:
    """The label a user of real CT sees for each factor's sweep (all patients together; report.describe, each
    measurement's change normalised by its spread over the sweeps' unshifted slices, as the gallery normalises by
    real slices): {factor: {"label", "leads_with", "single"}}: the label's text, the measurement with the largest
    share of the change (the one it names first) and whether it names that one alone. And the per-patient
    confusion table {factor: {measurement it leads with: count}}."""
    from latentct.score.report import describe, real_spreads

    K, E, P = hu.shape[:3]
    images = hu_to_unit(hu, window)
    eps = torch.linspace(-1, 1, E)
    spreads = real_spreads(images[:, E // 2].reshape(K * P, *images.shape[3:]), window, spacing)

    def leads(row):
        return max(row["shares"], key=lambda m: row["shares"][m])

    rows = describe(images, eps, window, spacing, list(range(K)), spreads)
    labels = {FACTORS[k]: {"label": row["label"], "leads_with": leads(row),
                           "single": not row["label"].startswith(("mixture", "no measurement"))}
              for k, row in enumerate(rows)}
    confusion = {f: {} for f in FACTORS[:K]}
    for p in range(P):
        for k, row in enumerate(describe(images[:, :, p:p + 1], eps, window, spacing, list(range(K)), spreads)):
            confusion[FACTORS[k]][leads(row)] = confusion[FACTORS[k]].get(leads(row), 0) + 1
    return labels, confusion


def reconstruction(vae_path: str, oracle):
    """images -> the VAE's reconstructions (its encoder's mean, decoded), in the oracle's window."""
    from latentct.generators.interface import generator_info, load_encoder, load_generator

    info = generator_info(vae_path)
    encoder, decoder = load_encoder(vae_path), load_generator(vae_path)
    if encoder is None:
        raise UserError(f"--vae: {vae_path} has no encoder (a VAE's generator.pt has one)")
    if tuple(info["window"]) != tuple(oracle.window):
        raise UserError(f"--vae: {vae_path} was trained in window {info['window']}, the oracle in {oracle.window}")

    def through(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([decoder(encoder(part)[0]) for part in x.split(256)])

    return through


def embedding(dcgan_path: str, oracle):
    """images -> the DCGAN's images of the latents that reproduce them best (latentct/generators/embed.py)."""
    from latentct.generators.embed import embed
    from latentct.generators.interface import generator_info, load_generator

    if tuple(generator_info(dcgan_path)["window"]) != tuple(oracle.window):
        raise UserError(f"--dcgan: {dcgan_path} was trained in another window than the oracle's {oracle.window}")
    G = load_generator(dcgan_path)

    def through(x: torch.Tensor) -> torch.Tensor:
        parts = x.split(256)
        z = torch.cat([embed(G, part, desc=f"embedding frames, part {i + 1} of {len(parts)}")[0]
                       for i, part in enumerate(parts)])
        with torch.no_grad():
            return G(z)

    return through


def partial_slopes(values: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """(N, K) values, (N, F) factors -> (K, F): per column of ``values``, its least-squares coefficient on each
    factor with all F factors (and an intercept) in the fit, over the rows where that column is finite. A column
    with too few rows, or whose factors are degenerate on its rows, gives NaN (never a 0 that reads as "none")."""
    n_factors = factors.shape[1]
    out = torch.full((values.shape[1], n_factors), float("nan"), dtype=torch.float64)
    for k in range(values.shape[1]):
        ok = torch.isfinite(values[:, k]) & torch.isfinite(factors).all(1)
        X = torch.cat([factors[ok].double(), torch.ones(int(ok.sum()), 1, dtype=torch.float64)], 1)
        if len(X) < n_factors + 3 or torch.linalg.matrix_rank(X) < n_factors + 1:
            continue
        out[k] = torch.linalg.lstsq(X, values[ok, k].double()[:, None]).solution[:n_factors, 0]
    return out


def kept_share(generated: torch.Tensor, crisp: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """(N, F) readings of the F factors (column f stands for factor f) on generated images and on the crisp
    images they came from -> (F,): how much of each factor's change the generated readings keep, the factor's
    partial coefficient on generated over on crisp (1: all of it). Only rows where both are finite count, so the
    two fits see the same slices; every factor is in each fit, so a reading that also moves with other factors
    (the anterior tissue with thickness) is not credited with them."""
    both = torch.isfinite(generated) & torch.isfinite(crisp)
    nan = torch.tensor(float("nan"))
    g, c = torch.where(both, generated, nan), torch.where(both, crisp, nan)
    return partial_slopes(g, factors).diagonal() / partial_slopes(c, factors).diagonal()


def generated_r2(oracle, vae_path: str, cfg: Settings, count: int = 500, draws: int = 200
                 ) -> tuple[dict, dict, dict]:
    """On VAE reconstructions of fresh held-out slices whose factors are known: the oracle's R2; the bound, the
    held-out R2 of a probe trained on reconstructions of other slices (what the VAE leaves readable at all); and
    per factor how much of its change survives (``kept_share``, with a 90% bootstrap interval over the slices):
    ``read``, in the oracle's readings of the reconstructions against its readings of their inputs, and ``drawn``,
    in the factor's anatomy measurement (EXPECTED_LABELS; no model) of the reconstructions against the same
    measurement of their inputs. ``drawn`` below 1: the VAE draws less of the change than it was shown, which a
    probe trained on reconstructions learns to undo and an oracle that reads what is drawn cannot. ``read`` below
    ``drawn``: the oracle reads less than is drawn."""
    from latentct.data.slices import unit_to_hu
    from latentct.score.anatomy import measure
    from latentct.score.oracle import OracleNet, fit_reader, r_squared, render_slices

    through = reconstruction(vae_path, oracle)
    hu, targets = render_slices(count, cfg.image_size, cfg.seed, 3, cfg.render_size, cfg.workers,
                                "held-out slices for the VAE")
    inputs = hu_to_unit(hu, oracle.window)
    recon = through(inputs)
    readings = oracle.read(recon)
    r2 = {f: float(v) for f, v in zip(FACTORS, r_squared(readings, targets))}
    labels = [EXPECTED_LABELS[f] for f in FACTORS]
    crisp_m, recon_m = (torch.stack([v[m] for m in labels], 1)
                        for v in (measure(unit_to_hu(x, oracle.window)) for x in (inputs, recon)))
    pairs = {"read": (readings, oracle.read(inputs)), "drawn": (recon_m, crisp_m)}
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = [torch.arange(len(targets))] + [torch.randint(0, len(targets), (len(targets),), generator=gen)
                                           for _ in range(draws)]
    kept = {name: torch.stack([kept_share(g[r], c[r], targets[r]) for r in rows])
            for name, (g, c) in pairs.items()}

    def number(v):
        return None if not math.isfinite(float(v)) else float(v)

    slopes = {}
    for i, f in enumerate(FACTORS):
        slopes[f] = {"measurement": labels[i], "draws": draws}
        for name, k in kept.items():
            boot = k[1:, i][torch.isfinite(k[1:, i])]
            interval = [number(q) for q in boot.quantile(torch.tensor([0.05, 0.95], dtype=boot.dtype))] \
                if len(boot) else [None, None]
            slopes[f].update({name: number(k[0, i]), f"{name}_interval": interval})
    train_hu, train_y = render_slices(cfg.probe_slices, cfg.image_size, cfg.seed, 5, cfg.render_size, cfg.workers,
                                      "slices for the VAE probe")
    train_x = through(hu_to_unit(train_hu, oracle.window))
    mean, std = train_y.mean(0), train_y.std(0).clamp_min(1e-6)
    torch.manual_seed(cfg.seed)
    probe = OracleNet(cfg.image_size, oracle.state["args"]["width"])
    fit_reader(probe, lambda idx: train_x[idx], (train_y - mean) / std, cfg.probe_steps, 64, 2e-3,
               torch.Generator().manual_seed(cfg.seed), pct_start=0.3, desc="VAE probe")
    with torch.no_grad():
        bound = r_squared(probe.eval()(recon) * std + mean, targets)
    return r2, {f: float(v) for f, v in zip(FACTORS, bound)}, slopes


def agreement(score_oracle, fit_oracle, cfg: Settings, count: int = 500) -> dict:
    """Per factor, the R2 of the fit oracle's readings on the score oracle's, on fresh slices of new patients:
    how far two independently trained oracles read the same thing."""
    from latentct.score.oracle import r_squared, render_slices

    hu, _ = render_slices(count, cfg.image_size, cfg.seed, 6, cfg.render_size, cfg.workers, "slices both oracles read")
    x = hu_to_unit(hu, score_oracle.window)
    return {f: float(v) for f, v in zip(FACTORS, r_squared(fit_oracle.read(x), score_oracle.read(x)))}


def validate(cfg: Settings, reader=None, through=None, spread=None, regenerate=None) -> dict:
    """Render the sweeps, read them (``reader``: images -> standardised factors; None: the renderer's exact
    factors, which the scorer's tests use) and score them; the noise floors come from the rendered sweeps. With
    ``through`` (images -> images, a VAE's reconstruction) also the attainable level: the share a clean change
    keeps through it (``regenerate``: the same through the DCGAN, by embedding). ``spread``: each factor's
    standard deviation in the reader's units (the oracle's), to
    state the smallest recovered effect in the factor's own units."""
    window = parse_window(cfg.window)
    eps = torch.linspace(-1, 1, cfg.frames)
    singles = [(f,) for f in FACTORS]
    pairs = list(itertools.combinations(FACTORS, 2))
    hu, exact = render_sweeps(singles, cfg.patients, cfg, "single-factor sweeps")
    pair_hu, pair_exact = render_sweeps(pairs, cfg.pair_patients, cfg, "two-factor sweeps")
    if reader is None:
        mean, std = factor_spread()
        single_values, pair_values = (exact - mean) / std, (pair_exact - mean) / std
    else:
        single_values = _read(reader, hu, window)
        pair_values = _read(reader, pair_hu, window)
    single = score_single(single_values, eps)
    pair_effect = score_pairs(pair_values, eps)
    labels, confusion = anatomy_labels(hu, window, phantom.FOV_MM / cfg.image_size)
    sweeps = {}
    for k, f in enumerate(FACTORS):
        sweeps[f] = {"attributed": FACTORS[int(single["attributed"][k])], "leakage": float(single["leakage"][k]),
                     "r2": float(single["r2"][k, k]), **labels[f], "expected_label": EXPECTED_LABELS[f]}
    pair_rows = []
    for (a, b), row in zip(pairs, pair_effect):
        top = [FACTORS[i] for i in np.argsort(-row)[:2]]
        pair_rows.append({"factors": [a, b], "top_two": top, "ok": set(top) == {a, b}})
    checks = {"attributed": sum(v["attributed"] == f for f, v in sweeps.items()),
              "leakage_ok": sum(v["leakage"] <= LEAKAGE_TARGET for v in sweeps.values()),
              "labels_ok": sum(v["leads_with"] == v["expected_label"] for v in sweeps.values()),
              "labels_single": sum(v["leads_with"] == v["expected_label"] and v["single"] for v in sweeps.values()),
              "pairs_ok": sum(r["ok"] for r in pair_rows), "pairs": len(pair_rows)}
    checks["passed"] = bool(checks["attributed"] == 6 and checks["leakage_ok"] == 6 and checks["labels_ok"] >= 5
                            and checks["pairs_ok"] == len(pair_rows))
    moved = (exact.amax(1) - exact.amin(1)).amax(1) > 1e-6                 # (sweeps, factors)
    pair_moved = (pair_exact.amax(1) - pair_exact.amin(1)).amax(1) > 1e-6
    floors = noise_floors([(single_values, moved), (pair_values, pair_moved)], eps, cfg.scored_samples)
    floor = np.array([floors["noise_floor"][f] for f in FACTORS])
    std = np.asarray(spread) if spread is not None else factor_spread()[1].numpy()
    minimum = {f: {"value": float(2 * floor[k] * std[k]), "unit": UNITS[f]} for k, f in enumerate(FACTORS)}
    result = {"image_size": cfg.image_size, "seed": cfg.seed, "frames": cfg.frames, "sweeps": sweeps, "pairs": pair_rows,
              **floors, "minimum_effect": minimum, "confusion": confusion,
              "effect_matrix": np.round(single["effect"], 4).tolist(), "leakage_target": LEAKAGE_TARGET,
              "checks": checks}
    if reader is not None:  # through the DCGAN on one group of patients only: every frame is an optimisation
        routes = {"vae": (through, hu), "dcgan": (regenerate, hu[:, :, :cfg.scored_samples])}
        result["attainable"] = {name: attainable(_read(lambda x, f=f: reader(f(x)), frames, window), eps, floor,
                                                 cfg.scored_samples)
                                for name, (f, frames) in routes.items() if f is not None}
    return result


def _read(reader, hu: torch.Tensor, window) -> torch.Tensor:
    shape = hu.shape[:3]
    flat = hu_to_unit(hu.reshape(-1, *hu.shape[3:]), window)
    return reader(flat).reshape(*shape, -1)


def main(cfg: Settings) -> dict:
    from latentct.score import oracle as oracle_stage

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    save_settings(cfg, out / "config.json")
    if cfg.oracle:
        path = Path(cfg.oracle)
    else:
        ocfg = oracle_stage.Settings(image_size=cfg.image_size, window=cfg.window, root=cfg.root,
                                     render_size=cfg.render_size, workers=cfg.workers)
        oracle_stage.main(ocfg)
        path = oracle_stage.folder_for(ocfg) / "oracle.pt"
    oracle = oracle_stage.load_oracle(path)
    if oracle.image_size != cfg.image_size or tuple(oracle.window) != parse_window(cfg.window):
        raise UserError(f"--oracle: {path} reads {oracle.image_size} px in window {oracle.window}, not "
                        f"{cfg.image_size} px in {parse_window(cfg.window)}")
    through = reconstruction(cfg.vae, oracle) if cfg.vae else None
    regenerate = embedding(cfg.dcgan, oracle) if cfg.dcgan else None
    result = validate(cfg, oracle.read_std, through, oracle.std.numpy(), regenerate)
    generated, bound, slopes = generated_r2(oracle, cfg.vae, cfg) if cfg.vae else ({}, {}, {})
    agree = agreement(oracle, oracle_stage.load_oracle(cfg.fit_oracle), cfg) if cfg.fit_oracle else {}
    result = {"image_size": cfg.image_size, "seed": cfg.seed, "oracle_sha256": oracle.sha256,
              "oracle_path": str(path),
              "oracle": {f: {"r2": oracle.r2[f], "r2_generated": generated.get(f), "bound": bound.get(f),
                             "slope_generated": slopes.get(f), "agreement": agree.get(f)} for f in FACTORS}, **result}
    atomic_write_json(out / "validation.json", result)
    c, m = result["checks"], result["minimum_effect"]
    print(f"validation: {c['attributed']}/6 sweeps attributed to their factor, {c['leakage_ok']}/6 with leakage "
          f"<= {LEAKAGE_TARGET}, {c['labels_ok']}/6 labels led by the expected measurement "
          f"({c.get('labels_single', '–')} by it alone), {c['pairs_ok']}/{c['pairs']} pairs; "
          f"smallest recovered effect at {result['samples']} samples: " + ", ".join(
              f"{f} {m[f]['value']:.3g} {m[f]['unit']}" for f in FACTORS) + f" -> {out / 'validation.json'}")
    return result


def summary_line(output: Path) -> str:
    """The pipeline's one line for this stage."""
    c = json.loads((Path(output) / "validation.json").read_text())["checks"]
    return (f"{c['attributed']}/6 sweeps attributed, {c['leakage_ok']}/6 clean, {c['labels_ok']}/6 labels, "
            f"{c['pairs_ok']}/{c['pairs']} pairs")


if __name__ == "__main__":
    run_cli(main, Settings, prog="python -m latentct.score.validate")

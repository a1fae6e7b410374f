"""How the factor oracle reads a finished run's VAE reconstructions when it is trained with other augmentations.

    python -m bench.oracle_reading --run demo [--variants shipped blur3 down median] [--steps 3000]

Issue 19 asks the score oracle to read VAE reconstructions of held-out slices nearly as well as a probe trained
on them (validation.json's ``bound``), without ever training on a generator's output. This trains the oracle
once per augmentation on the same rendered slices, steps and seed as the pipeline's score oracle, and reads the
same held-out reconstructions validate.py uses (stream 3 of the oracle's seed). Variants:

- ``shipped``: latentct/score/oracle.py's ``augment`` (blur sigma 0-1.5 px, warp, contrast, gamma, grain), the
  reference of the run;
- ``blur3``: the same with blur sigma 0-3 px (the VAE's reconstructions match a blur of 1.5-2 px best in MSE);
- ``down``: 30% of the slices area-downsampled 2x or 4x and scaled back up, then ``augment`` with blur to 2.5 px;
- ``median``: 70% of the slices median-filtered 3x3 or 5x5 (fine structures go, edges stay, as in the VAE's
  reconstructions), then ``augment``;
- ``pca``, ``pca_all``: 60% (all) of the slices projected onto the top k principal axes of the training slices,
  k log-uniform in 8-96 per slice (a linear bottleneck keeps the main anatomy and loses the detail), then
  ``augment``;
- ``average``: every training slice rendered a second time from another patient that shares its six factors
  (other fat, organs, vessels, contrast, noise); 60% of the slices are a random convex mix of the two renders,
  then ``augment``: the factors stay exact while what they do not fix is averaged, as an autoencoder that does
  not encode it draws its mean. ``average_control`` trains on the same slices' first renders with ``augment``
  alone, so the difference is the average, not the draw of slices.
- ``plain``: half of the slices (drawn per batch) rendered again without the lung vessels, ribs and sternum, the
  fine anatomy the VAE's reconstructions lose (phantom.render_slice ``fine=False``: the same patients, z and
  noise), then ``augment``: an oracle that cannot lean on that detail must read each factor from what is left.
- ``autoencoder``: half of the slices (drawn per batch) replaced by their reconstruction through a stand-in VAE
  trained here on the oracle's own training slices (models/vae.py with TrainVAE's demo preset: width 16, latent 32,
  batch 64, Adam 1e-3, MSE + 0.01 KL, ``--standin-steps``; without TrainVAE's rotation and zoom augmentation), then
  ``augment``: how an autoencoder renders, without the run's generator or its output. Its reconstructions are not
  the run's VAE's, so an oracle that learns this one's habits reads the other's only as far as autoencoders render
  alike.
- ``both_oracles``: nothing trained; the mean of the run's score and fit oracles' readings (validation's
  config.json names them: other seeds, slices and widths), which reduces what the two misread independently;
  each oracle's own R2 and the correlation of their errors are printed beside it.

Prints per variant and factor the held-out R2 on crisp slices, the R2 on the reconstructions and the share of
the factor's change the readings keep there (validate.kept_share: the partial slope on the reconstructions over
that on their inputs), with each variant's difference to ``shipped`` in the same run; and the R2 after a linear
recalibration of the readings on the reconstructions (fitted on every other slice, scored on the rest: what a
correction of the readings' scale and offset could recover at most, were the factors of generated images known).
Writes Animations/<run>/oracle_reading.json.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from latentct.data.phantom import FACTORS
from latentct.data.slices import hu_to_unit, parse_window, unit_to_hu
from latentct.generators.interface import generator_info, load_generator, output_size
from latentct.score import oracle as oracle_stage
from latentct.score.validate import kept_share, reconstruction
from latentct.util.io import atomic_write_json
from latentct.util.settings import UserError, check, run_cli, setting

AUGMENTED = ("shipped", "blur3", "down", "median", "pca", "pca_all", "average", "average_control", "plain",
             "autoencoder")
VARIANTS = (*AUGMENTED, "both_oracles")  # both_oracles trains nothing: it reads with the run's two oracles
COPIES = 2  # renders per training slice for the nuisance average: the slice and one other patient


@dataclass
class Settings:
    """Train the score oracle under several augmentations and read a run's VAE reconstructions with each."""

    run: str = setting("demo", "the finished pipeline run whose VAE (runs/<run>/vae/generator.pt) reconstructs")
    root: str = setting(".", "folder that holds runs/ and Animations/")
    variants: list[str] = setting(list(VARIANTS), f"augmentations to train with, of {', '.join(VARIANTS)}")
    steps: int = setting(oracle_stage.Settings.steps, "training steps per oracle (the score oracle's)")
    train_slices: int = setting(oracle_stage.Settings.train_slices, "rendered training slices (the score oracle's)")
    test_slices: int = setting(2000, "held-out crisp slices")
    count: int = setting(500, "held-out slices the VAE reconstructs (validate.py's 500)")
    width: int = setting(oracle_stage.Settings.width, "oracle width (the score oracle's)")
    seed: int = setting(0, "the oracle's seed (the score oracle's 0)")
    render_size: int = setting(128, "phantom matrix size (the demo's)")
    workers: int = setting(1, "processes that render slices")
    standin_steps: int = setting(1500, "training steps of the autoencoder variant's stand-in VAE (TrainVAE's demo "
                                 "preset)")

    def __post_init__(self):
        unknown = sorted(set(self.variants) - set(VARIANTS))
        check(not unknown, "variants", f"unknown {unknown}; choose from {', '.join(VARIANTS)}")
        for name in ("steps", "train_slices", "test_slices", "count", "width", "standin_steps"):
            check(getattr(self, name) >= 1, name, f"must be at least 1, got {getattr(self, name)}")


def _median(x: torch.Tensor, k: int) -> torch.Tensor:
    p = k // 2
    patches = F.unfold(F.pad(x, (p, p, p, p), mode="replicate"), k)
    return patches.median(1).values.view_as(x)


def _some(x: torch.Tensor, share: float, gen: torch.Generator, change) -> torch.Tensor:
    """``change`` applied to a random ``share`` of the slices, half with each of its two strengths."""
    r = torch.rand(len(x), generator=gen)
    x = x.clone()
    for strength, pick in enumerate((r < share / 2, (r >= share / 2) & (r < share))):
        if pick.any():
            x[pick] = change(x[pick], strength)
    return x


def pca_basis(x: torch.Tensor, count: int = 4000) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (S*S,) and principal axes (S*S, 128) of the first ``count`` training slices (unit range)."""
    flat = x[:count].flatten(1)
    mean = flat.mean(0)
    _, _, v = torch.linalg.svd(flat - mean, full_matrices=False)
    return mean, v[:128].T.contiguous()


def project(x: torch.Tensor, gen: torch.Generator, basis, share: float, low: int = 8, high: int = 96) -> torch.Tensor:
    """A ``share`` of the slices replaced by their projection onto the top k principal axes of the training slices,
    k log-uniform in [low, high] per slice: a linear bottleneck keeps the main anatomy and loses the detail, as an
    autoencoder does, without a generator's output."""
    mean, axes = basis
    B = len(x)
    k = torch.exp(math.log(low) + torch.rand(B, generator=gen) * math.log(high / low)).long()
    pick = torch.rand(B, generator=gen) < share
    coords = (x.flatten(1) - mean) @ axes                                     # (B, 128)
    coords = coords * (torch.arange(axes.shape[1])[None, :] < k[:, None])
    projected = (coords @ axes.T + mean).view_as(x).clamp(-1, 1)
    return torch.where(pick[:, None, None, None], projected, x)


def nuisance_average(x: torch.Tensor, gen: torch.Generator, share: float = 0.6) -> torch.Tensor:
    """(B, C, S, S) renders of C patients that share every factor -> (B, 1, S, S): for a ``share`` of the slices a
    random convex mix of the C renders (Dirichlet(1) weights), else the first render alone. The factors stay
    exactly what they are; what they do not fix (fat, organs, vessels, contrast, noise) is averaged, as an
    autoencoder that does not encode it draws its mean."""
    B, C = x.shape[:2]
    w = -torch.log(torch.rand(B, C, generator=gen))
    alone = torch.rand(B, generator=gen) >= share
    w[alone] = F.one_hot(torch.zeros(int(alone.sum()), dtype=torch.long), C).float()
    return (x * (w / w.sum(1, keepdim=True))[:, :, None, None]).sum(1, keepdim=True)


def either(x: torch.Tensor, gen: torch.Generator, share: float = 0.5) -> torch.Tensor:
    """(B, 2, S, S) two renders of each slice -> (B, 1, S, S): the second for a random ``share`` of them."""
    second = torch.rand(len(x), generator=gen) < share
    return torch.where(second[:, None, None, None], x[:, 1:], x[:, :1])


def standin_reconstructions(x: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    """(N, 1, S, S) unit-range slices -> their reconstructions (the encoder's mean, decoded) through a VAE trained
    on them for ``steps`` steps with TrainVAE's demo preset (the study's ResNet VAE at width 16, latent 32; batch
    64, Adam 1e-3, MSE + 0.01 KL), its weights and batches seeded by ``seed`` + 11: a stand-in for how an
    autoencoder renders that is never the run's generator."""
    from latentct.models.vae import VAE, kl_divergence
    from Training.TrainVAE import PRESETS, reconstruction_loss
    from Training.TrainVAE import Settings as VAESettings

    preset = PRESETS["demo"]
    torch.manual_seed(seed + 11)
    model = VAE(latent_dim=VAESettings.latent_dim, image_size=x.shape[-1], ch=preset["width"])
    opt = torch.optim.Adam(model.parameters(), lr=preset["lr"])
    gen = torch.Generator().manual_seed(seed + 11)
    for _ in tqdm(range(steps), desc="stand-in VAE", unit="step", leave=False):
        real = x[torch.randint(0, len(x), (preset["batch_size"],), generator=gen)]
        recon, mu, logvar = model(real)
        loss = reconstruction_loss(recon, real, preset["loss"]) + preset["kl_weight"] * kl_divergence(mu, logvar)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return torch.cat([model.decoder(model.encoder(part)[0]) for part in x.split(256)])


class MeanReader:
    """Oracles read as one: the mean of their readings, in the factors' units (all of one HU window)."""

    def __init__(self, oracles: list, window):
        other = [o for o in oracles if tuple(o.window) != tuple(window)]
        if other:
            raise UserError(f"--variants both_oracles: an oracle reads the HU window {tuple(other[0].window)}, the "
                            f"VAE draws {tuple(window)}")
        self.oracles = oracles

    def read(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([o.read(images) for o in self.oracles]).mean(0)


def run_oracles(root: Path, run: str) -> list:
    """The score and fit oracles the run's validation used."""
    config = root / "Animations" / run / "validation" / "config.json"
    if not config.is_file():
        raise UserError(f"--variants both_oracles: {config} not found; the run has not been validated")
    names = json.loads(config.read_text())
    missing = [key for key in ("oracle", "fit_oracle") if not names.get(key)]
    if missing:
        raise UserError(f"--variants both_oracles: {config} names no {' or '.join(missing)}")
    # stored as the pipeline wrote them: with its --root, relative to the folder it ran in (this one, or --root)
    return [oracle_stage.load_oracle(Path(names[key]) if Path(names[key]).is_file() else root / names[key])
            for key in ("oracle", "fit_oracle")]


def recalibrated_r2(read: torch.Tensor, truth: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per factor, on the odd-numbered slices: the readings' R2 as they are, and after a line truth = a read + b
    fitted on the even-numbered ones (the same slices both times, so the two compare)."""
    fit, test = torch.arange(len(read)) % 2 == 0, torch.arange(len(read)) % 2 == 1
    raw, out = [], []
    for i in range(read.shape[1]):
        design = torch.stack([read[fit, i].double(), torch.ones(int(fit.sum()), dtype=torch.float64)], 1)
        a, b = torch.linalg.lstsq(design, truth[fit, i:i + 1].double()).solution[:, 0]
        target = truth[test, i:i + 1].double()
        raw.append(float(oracle_stage.r_squared(read[test, i:i + 1].double(), target)[0]))
        out.append(float(oracle_stage.r_squared((a * read[test, i] + b)[:, None], target)[0]))
    return raw, out


def augmentation(name: str, basis=None):
    """(x, gen) -> augmented slices, for one variant."""
    shipped = oracle_stage.augment
    if name in ("plain", "autoencoder"):  # each slice beside its second version: bare, or the stand-in's
        return lambda x, gen: shipped(either(x, gen), gen)
    if name == "average":
        return lambda x, gen: shipped(nuisance_average(x, gen), gen)
    if name == "average_control":
        return lambda x, gen: shipped(x[:, :1], gen)
    if name in ("pca", "pca_all"):
        share = 0.6 if name == "pca" else 1.0
        return lambda x, gen: shipped(project(x, gen, basis, share), gen)
    if name == "shipped":
        return shipped
    if name == "blur3":
        return lambda x, gen: shipped(x, gen, blur=3.0)
    if name == "down":
        def down(x, strength):
            return F.interpolate(F.avg_pool2d(x, 2 ** (strength + 1)), size=x.shape[-2:], mode="bilinear",
                                 align_corners=False)
        return lambda x, gen: shipped(_some(x, 0.3, gen, down), gen, blur=2.5)
    if name == "median":
        return lambda x, gen: shipped(_some(x, 0.7, gen, lambda x, strength: _median(x, 3 + 2 * strength)), gen)
    raise ValueError(f"{name}: not a training augmentation")


def main(cfg: Settings) -> dict:
    root = Path(cfg.root)
    vae = root / "runs" / cfg.run / "vae" / "generator.pt"
    if not vae.is_file():
        raise UserError(f"--run: {vae} not found; run python pipeline.py --run {cfg.run} first")
    both = run_oracles(root, cfg.run) if "both_oracles" in cfg.variants else None  # before any work: a clear error
    window = parse_window(tuple(generator_info(str(vae))["window"]))
    size = output_size(load_generator(str(vae)))
    # The score oracle's settings (batch, learning rate, loss weights from oracle.Settings' defaults) at this size
    ocfg = oracle_stage.Settings(image_size=size, window=window, seed=cfg.seed, width=cfg.width, steps=cfg.steps,
                                 train_slices=cfg.train_slices, test_slices=cfg.test_slices,
                                 render_size=cfg.render_size, workers=cfg.workers)
    trained = set(cfg.variants) & set(AUGMENTED)  # both_oracles alone trains nothing: no training slices
    train, test, (vae_hu, vae_y) = (
        oracle_stage.render_slices(count, size, cfg.seed, stream, cfg.render_size, cfg.workers, desc)
        if count else None
        for count, stream, desc in ((cfg.train_slices if trained else 0, 1, "training slices"),
                                    (cfg.test_slices, 2, "held-out slices"),
                                    (cfg.count, 3, "held-out slices for the VAE")))
    vae_x = hu_to_unit(vae_hu, window)
    recon = reconstruction(str(vae), SimpleNamespace(window=window))(vae_x)
    if {"average", "average_control"} & set(cfg.variants):  # the same slices, each with one more patient's render
        grouped = oracle_stage.render_slices(cfg.train_slices, size, cfg.seed, 1, cfg.render_size, cfg.workers,
                                             "training slices with a second patient", copies=COPIES)
    if "plain" in cfg.variants:  # the same slices again without their fine anatomy, as a second render of each
        plain = oracle_stage.render_slices(cfg.train_slices, size, cfg.seed, 1, cfg.render_size, cfg.workers,
                                           "training slices without fine anatomy", fine=False)
        paired = (torch.cat([train[0], plain[0]], 1), train[1])
    if "autoencoder" in cfg.variants:  # the same slices, each beside its stand-in VAE's reconstruction
        standin = standin_reconstructions(hu_to_unit(train[0], window), cfg.standin_steps, cfg.seed)
        auto = (torch.cat([train[0], unit_to_hu(standin, window).round().to(train[0].dtype)], 1), train[1])
    basis = pca_basis(hu_to_unit(train[0], window)) if {"pca", "pca_all"} & set(cfg.variants) else None
    rows = {}
    for name in cfg.variants:
        start = time.perf_counter()
        if name == "both_oracles":
            oracle = MeanReader(both, window)
            r2_crisp = oracle_stage.r_squared(oracle.read(hu_to_unit(test[0], window)), test[1]).tolist()
            own = [o.read(recon) for o in both]        # each oracle's reading, kept for its own R2 below
            read = torch.stack(own).mean(0)            # = oracle.read(recon), without reading twice
        else:
            slices = (grouped if name.startswith("average") else paired if name == "plain"
                      else auto if name == "autoencoder" else train)
            oracle = oracle_stage.Oracle(oracle_stage.fit_oracle(ocfg, slices, test, augmentation(name, basis)))
            r2_crisp = list(oracle.r2.values())
            read = oracle.read(recon)
        rows[name] = {"r2_crisp": r2_crisp,
                      "r2_generated": oracle_stage.r_squared(read, vae_y).tolist(),
                      "kept_generated": kept_share(read, oracle.read(vae_x), vae_y).tolist(),
                      **dict(zip(("r2_half", "r2_recalibrated"), recalibrated_r2(read, vae_y))),
                      "seconds": time.perf_counter() - start}
        if name == "both_oracles":  # each on its own too, and how alike their errors are
            rows[name]["r2_generated_each"] = [oracle_stage.r_squared(r, vae_y).tolist() for r in own]
            errors = [(r - vae_y) for r in own]
            rows[name]["error_correlation"] = [float(torch.corrcoef(torch.stack([e[:, i] for e in errors]))[0, 1])
                                               for i in range(len(FACTORS))]
    print(f"{cfg.run}'s VAE, {cfg.count} held-out slices; oracle width {cfg.width}, {cfg.steps} steps, seed {cfg.seed}")
    print(f"{'variant':12s} {'factor':12s} {'R2 crisp':>9s} {'R2 recon':>9s} {'kept':>6s} {'R2 recon - shipped':>19s}"
          f" {'R2 on half / recalibrated':>26s}")
    for name, row in rows.items():
        for i, f in enumerate(FACTORS):
            gap = (f"{row['r2_generated'][i] - rows['shipped']['r2_generated'][i]:+19.3f}" if "shipped" in rows
                   else f"{'–':>19s}")
            print(f"{name:12s} {f:12s} {row['r2_crisp'][i]:9.3f} {row['r2_generated'][i]:9.3f} "
                  f"{row['kept_generated'][i]:6.2f} {gap} {row['r2_half'][i]:18.3f} / {row['r2_recalibrated'][i]:5.3f}")
    if "both_oracles" in rows:
        row = rows["both_oracles"]
        for who, r2 in zip(("score oracle", "fit oracle"), row["r2_generated_each"]):
            print(f"both_oracles: the {who} alone, R2 recon " + ", ".join(f"{f} {v:.3f}" for f, v in zip(FACTORS, r2)))
        print("both_oracles: correlation of the two oracles' errors on the reconstructions: "
              + ", ".join(f"{f} {v:.2f}" for f, v in zip(FACTORS, row["error_correlation"])))
    result = {"run": cfg.run, "factors": list(FACTORS), "steps": cfg.steps, "width": cfg.width, "seed": cfg.seed,
              "standin_steps": cfg.standin_steps if "autoencoder" in cfg.variants else None, "variants": rows}
    atomic_write_json(root / "Animations" / cfg.run / "oracle_reading.json", result)
    return result


if __name__ == "__main__":
    run_cli(main, Settings, prog="python -m bench.oracle_reading")

"""MIG and DCI of direction methods by the published protocol for them (Khrulkov et al. 2021, "Disentangled
representations from non-disentangled models"; the protocol DisCo, ICLR 2022, also uses).

    python -m latentct.score.disentanglement --generator runs/demo/dcgan/generator.pt \
        --directions runs/demo/dcgan_demo/directions.pt runs/demo/dcgan_sefa/directions.pt ... \
        --output Animations/demo/dcgan_disentanglement

For each method an encoder is trained by MSE on generated images G(z) to predict z's coordinates along the
method's directions (the least-squares coordinates of z in the direction basis; the images are drawn once and
shared by the methods, and each encoder's R2 on held-out generated images is reported beside its scores); applied to phantom slices
with known factors it gives codes. As disentanglement_lib does: MIG discretises each code into 20 histogram
bins and uses scikit-learn's ``mutual_info_score``; the factors are discretised into 20 equal-frequency bins
(the breast factor's 0, no visible breast, is a bin of its own); DCI trains scikit-learn's exact
``GradientBoostingClassifier`` per factor on the codes (disentanglement_lib's choice) and reads disentanglement
and completeness off its feature importances. The slices are the oracle's kind: fresh patients, rendered and
preprocessed like the dataset, with their visible factors.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from latentct.data.phantom import FACTORS
from latentct.data.slices import hu_to_unit
from latentct.discover.directions import load_directions
from latentct.generators.interface import generator_info, sample_latents
from latentct.models.encoders import strided_convs
from latentct.util.io import atomic_write_json
from latentct.util.settings import check, run_cli, save_settings, setting

BINS = 20  # disentanglement_lib's num_bins for MIG


@dataclass
class Settings:
    """MIG and DCI of one or more direction methods of a generator, on phantom slices with known factors."""

    generator: str = setting("runs/demo/dcgan/generator.pt", "the generator the directions belong to")
    directions: list[str] = setting([], "directions.pt files to score")
    output: str = setting("Animations/demo/dcgan_disentanglement", "folder for disentanglement.json")
    slices: int = setting(2000, "phantom slices with known factors the encoders are applied to")
    render_size: int = setting(128, "matrix size the phantom is rendered at (the dataset's)")
    encoder_steps: int = setting(1500, "training steps of each method's encoder")
    generated: int = setting(8192, "generated images the encoders train on (drawn once, shared by the methods; "
                             "the last 512 score each encoder's R2)")
    batch_size: int = setting(64, "generated images per encoder step")
    train_fraction: float = setting(0.8, "share of the slices the DCI classifiers train on (the rest scores them)")
    seed: int = setting(0, "seed")

    def __post_init__(self):
        check(len(self.directions) >= 1, "directions", "needs at least one directions.pt")
        check(0 < self.train_fraction < 1, "train_fraction", "must be in (0, 1)")
        check(self.slices >= 2 * BINS, "slices", f"needs at least {2 * BINS} slices for {BINS} bins")
        check(self.generated >= 8, "generated", "needs at least 8 generated images")


class CodeEncoder(nn.Module):
    """Strided convolutions to 4 x 4 and a linear map to the K coordinates."""

    def __init__(self, image_size: int, codes: int, width: int = 16):
        super().__init__()
        layers, c = strided_convs(image_size, width)
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * 16, codes))

    def forward(self, x):
        return self.net(x)


def coordinates(z: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """(N, K) least-squares coordinates of latents z (N, d) in the basis of the K directions (K, d)."""
    return torch.linalg.lstsq(matrix.t().double(), z.t().double()).solution.t().float()


def generated_pool(G, count: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` latents and their images G(z), drawn once per generator and shared by every method's encoder
    (generating costs more than an encoder step on a CPU)."""
    gen = torch.Generator().manual_seed(seed + 1)
    zs, images = [], []
    with torch.no_grad():
        for start in tqdm(range(0, count, batch), desc="generated images for the code encoders", unit="batch",
                          leave=False):
            z = sample_latents(G, min(batch, count - start), gen)
            zs.append(z.reshape(len(z), -1))
            images.append(G(z).float())
    return torch.cat(zs), torch.cat(images)


def train_encoder(pool: tuple[torch.Tensor, torch.Tensor], matrix: torch.Tensor, steps: int, batch: int,
                  seed: int) -> tuple[CodeEncoder, float]:
    """An encoder trained by MSE to predict the direction coordinates of z from G(z), on all but the last 512
    images of the pool; returns it and its R2 on those 512 (how well the codes can be read at all)."""
    z, images = pool
    held = min(512, len(z) // 4)
    target = coordinates(z, matrix)
    torch.manual_seed(seed)
    encoder = CodeEncoder(images.shape[-1], matrix.shape[0])
    opt = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed + 2)
    for _ in tqdm(range(steps), desc="code encoder", unit="step", leave=False):
        pick = torch.randint(0, len(z) - held, (batch,), generator=gen)
        loss = F.mse_loss(encoder(images[pick]), target[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    encoder.eval()
    with torch.no_grad():
        truth = target[-held:]
        residual = ((encoder(images[-held:]) - truth) ** 2).sum(0)
        r2 = float((1 - residual / ((truth - truth.mean(0)) ** 2).sum(0)).mean())
    return encoder, r2


def discretize_codes(codes: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Each column into ``bins`` equal-width histogram bins (disentanglement_lib's _histogram_discretize)."""
    out = np.zeros(codes.shape, dtype=int)
    for j in range(codes.shape[1]):
        edges = np.histogram(codes[:, j], bins)[1][:-1]
        out[:, j] = np.digitize(codes[:, j], edges)
    return out


def discretize_factors(factors: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Each factor into ``bins`` equal-frequency bins; the breast factor's exact 0 (nothing visible) gets its
    own bin and the positive values share the rest."""
    out = np.zeros(factors.shape, dtype=int)
    for j, name in enumerate(FACTORS):
        col = factors[:, j]
        if name == "breast_size":
            positive = col > 0
            out[~positive, j] = 0
            if positive.any():
                out[positive, j] = 1 + _quantile_bins(col[positive], bins - 1)
        else:
            out[:, j] = _quantile_bins(col, bins)
    return out


def _quantile_bins(values: np.ndarray, bins: int) -> np.ndarray:
    edges = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])
    return np.searchsorted(edges, values, side="right")


def mig(codes_d: np.ndarray, factors_d: np.ndarray) -> dict:
    """Mutual information gap: per factor, the gap between the two codes most informative of it, over the
    factor's entropy; averaged over factors."""
    from sklearn.metrics import mutual_info_score

    K, Fn = codes_d.shape[1], factors_d.shape[1]
    mi = np.array([[mutual_info_score(factors_d[:, f], codes_d[:, k]) for f in range(Fn)] for k in range(K)])
    entropy = np.array([mutual_info_score(factors_d[:, f], factors_d[:, f]) for f in range(Fn)])
    top = np.sort(mi, axis=0)[::-1]
    second = top[1] if K > 1 else np.zeros(Fn)
    gaps = (top[0] - second) / np.maximum(entropy, 1e-12)
    return {"mig": float(gaps.mean()), "per_factor": dict(zip(FACTORS, gaps.round(4).tolist()))}


def dci(codes: np.ndarray, factors_d: np.ndarray, train_fraction: float, seed: int) -> dict:
    """DCI disentanglement, completeness and informativeness from gradient-boosted tree classifiers."""
    from sklearn.ensemble import GradientBoostingClassifier

    n_train = int(len(codes) * train_fraction)
    K, Fn = codes.shape[1], factors_d.shape[1]
    importance = np.zeros((K, Fn))
    accuracy = []
    for f in tqdm(range(Fn), desc="DCI classifiers", unit="factor", leave=False):
        model = GradientBoostingClassifier(random_state=seed)
        model.fit(codes[:n_train], factors_d[:n_train, f])
        importance[:, f] = np.abs(model.feature_importances_)
        accuracy.append(float(model.score(codes[n_train:], factors_d[n_train:, f])))
    total = importance.sum()
    p_codes = importance / np.maximum(importance.sum(1, keepdims=True), 1e-12)
    d_codes = 1 - _entropy_rows(p_codes, Fn)
    rho = importance.sum(1) / max(total, 1e-12)
    p_factors = (importance / np.maximum(importance.sum(0, keepdims=True), 1e-12)).T
    c_factors = 1 - _entropy_rows(p_factors, K)
    weight = importance.sum(0) / max(total, 1e-12)  # as disentanglement_lib: factors weighted by importance
    return {"disentanglement": float((rho * d_codes).sum()), "completeness": float((weight * c_factors).sum()),
            "informativeness": float(np.mean(accuracy))}


def _entropy_rows(p: np.ndarray, base: int) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(1) / math.log(max(base, 2))


def score(pool, directions, slices: torch.Tensor, factors: np.ndarray, cfg: Settings) -> dict:
    """MIG and DCI of one direction method."""
    encoder, r2 = train_encoder(pool, directions.matrix, cfg.encoder_steps, cfg.batch_size, cfg.seed)
    with torch.no_grad():
        codes = torch.cat([encoder(part) for part in slices.split(512)]).numpy()
    factors_d = discretize_factors(factors)
    return {"method": directions.method, "directions_count": directions.count, "encoder_r2": r2,
            **mig(discretize_codes(codes), factors_d),
            **{f"dci_{k}": v for k, v in dci(codes, factors_d, cfg.train_fraction, cfg.seed).items()}}


def main(cfg: Settings) -> dict:
    from latentct.score.oracle import render_slices

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    save_settings(cfg, out / "config.json")
    info = generator_info(cfg.generator)
    size = int(info["args"]["image_size"])
    hu, factors = render_slices(cfg.slices, size, cfg.seed, 4, cfg.render_size, desc="phantom slices for MIG/DCI")
    slices = hu_to_unit(hu, info["window"])
    rows, pool = [], None
    for path in cfg.directions:
        directions, G = load_directions(path, cfg.generator)
        pool = pool or generated_pool(G, cfg.generated, cfg.batch_size, cfg.seed)
        rows.append({"file": str(path), **score(pool, directions, slices, factors.numpy(), cfg)})
        print(f"{directions.method}: MIG {rows[-1]['mig']:.3f}, DCI D {rows[-1]['dci_disentanglement']:.3f} "
              f"C {rows[-1]['dci_completeness']:.3f} (code encoder R2 {rows[-1]['encoder_r2']:.2f})")
    result = {"generator": cfg.generator, "protocol": "Khrulkov et al. 2021 (encoder on generated images -> "
              "direction coordinates; MIG with 20 histogram bins; DCI with GradientBoostingClassifier)",
              "slices": cfg.slices, "methods": rows}
    atomic_write_json(out / "disentanglement.json", result)
    return result


def summary_line(output: Path) -> str:
    """The pipeline's one line for this stage."""
    rows = json.loads((Path(output) / "disentanglement.json").read_text())["methods"]
    return ", ".join(f"{r['method']} MIG {r['mig']:.2f}" for r in rows)


if __name__ == "__main__":
    run_cli(main, Settings, prog="python -m latentct.score.disentanglement")

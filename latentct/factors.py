"""Ground truth on the phantom: a CNN that reads the six known factors off a slice, and the direction x factor
effect matrix measured through it. Its held-out R-squared per factor is reported, so a poor regressor shows."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from latentct.checkpoint import load_file
from latentct.data import CTSlices, read_index
from latentct.io import atomic_torch_save
from latentct.matching import linear_sum_assignment
from latentct.phantom import FACTORS
from latentct.settings import UserError


class FactorRegressor(nn.Module):
    def __init__(self, outputs: int = len(FACTORS), width: int = 32):
        super().__init__()
        layers, c = [], 1
        for i, out in enumerate([width, 2 * width, 4 * width, 4 * width]):
            layers += [nn.Conv2d(c, out, 4, 2, 1), nn.BatchNorm2d(out) if i else nn.Identity(), nn.LeakyReLU(0.2)]
            c = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, outputs)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(-1, -2)))


def has_factors(dataset: str | Path) -> bool:
    index = read_index(dataset, "train")
    return bool(index) and all(f in index[0] and index[0][f] != "" for f in FACTORS)


def _tensors(dataset, split, window):
    ds = CTSlices(dataset, split, window=window, labels=list(FACTORS))
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    targets = torch.stack([ds[i][1] for i in range(len(ds))])
    return images, targets


def r_squared(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    sst = ((target - target.mean(0)) ** 2).sum(0).clamp_min(1e-12)
    return 1 - ((pred - target) ** 2).sum(0) / sst


def synthetic_slices(count: int, render_size: int, out_size: int, window, seed: int):
    """Freshly rendered phantom slices, every factor drawn independently per slice, preprocessed like the
    dataset (anti-aliased resize, HU window). Unlimited patients: the regressor cannot memorise them."""
    from latentct import phantom
    from latentct.data import hu_to_unit
    from latentct.dicom import resize_slices

    rng = np.random.default_rng([seed, 7919])
    images, targets = [], []
    for _ in tqdm(range(count), desc="phantom slices for the regressor", unit="slice", leave=False):
        patient = phantom.sample_patient(rng)
        z = float(rng.uniform(0, 1))
        images.append(phantom.render_slice(patient, z, render_size, rng))
        targets.append([z] + [getattr(patient, f) for f in FACTORS[1:]])
    hu = torch.from_numpy(resize_slices(np.stack(images), out_size).astype(np.float32))[:, None]
    return hu_to_unit(hu, window), torch.tensor(targets, dtype=torch.float32)


def _render_size(dataset) -> int:
    """Matrix size of the phantom the dataset came from (its config.json), else the phantom's default."""
    import json

    from latentct.data import load_manifest

    source = Path(load_manifest(dataset).get("input", "")) / "config.json"
    try:
        return int(json.loads(source.read_text())["size"])
    except (OSError, KeyError, ValueError):
        return 256


def train_regressor(dataset: str | Path, window, steps: int = 600, batch: int = 64, seed: int = 0,
                    device="cpu", synthetic: int = 3000) -> dict:
    """Train on the dataset's train split plus ``synthetic`` freshly rendered phantom slices; score on the
    dataset's test split. Returns the state that ``save_regressor``/``load_regressor`` use."""
    if not has_factors(dataset):
        raise UserError(f"{dataset}: the index has no phantom factor columns; ground truth needs the phantom")
    torch.manual_seed(seed)
    x, y = _tensors(dataset, "train", window)
    if synthetic > 0:
        sx, sy = synthetic_slices(synthetic, _render_size(dataset), x.shape[-1], window, seed)
        x, y = torch.cat([x, sx]), torch.cat([y, sy])
    mean, std = y.mean(0), y.std(0).clamp_min(1e-6)
    model = FactorRegressor().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="factor regressor", unit="step", leave=False):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = F.mse_loss(model(x[idx].to(device)), ((y[idx] - mean) / std).to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    tx, ty = _tensors(dataset, "test", window)
    if len(tx) < 2:
        tx, ty = x, y
    with torch.no_grad():
        pred = torch.cat([model(part.to(device)).cpu() for part in tx.split(256)]) * std + mean
    r2 = r_squared(pred, ty)
    return {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "factors": list(FACTORS),
            "mean": mean, "std": std, "test_r2": {f: float(v) for f, v in zip(FACTORS, r2)},
            "window": list(window), "dataset": str(dataset), "dataset_sha256": dataset_fingerprint(dataset)}


def dataset_fingerprint(dataset: str | Path) -> str:
    """The manifest's hash: a regressor trained on other data (preprocessing rerun) is not reused."""
    from latentct.generators import file_hash

    return file_hash(Path(dataset) / "manifest.json")


def save_regressor(state: dict, path: str | Path) -> None:
    atomic_torch_save(state, path)


def load_regressor(path: str | Path) -> tuple[FactorRegressor, dict]:
    state = load_file(path, "factor regressor file")
    model = FactorRegressor(len(state["factors"]))
    model.load_state_dict(state["state_dict"])
    return model.eval(), state


@torch.no_grad()
def predict_std_units(model: FactorRegressor, images: torch.Tensor) -> torch.Tensor:
    """Factor predictions in units of each factor's spread in the data (so effects compare across factors)."""
    return torch.cat([model(part) for part in images.split(256)])


def match_factors(r2: np.ndarray, effect: np.ndarray, r2_min: float = 0.5, leakage_max: float = 0.5) -> dict:
    """Hungarian matching of directions (rows) to factors (columns) by R2 x effect (a weak but linear response
    should not win); per factor the matched R2, the leakage of its direction into the other factors (share of
    its effect that moves them), and whether it counts as recovered."""
    rows, cols = linear_sum_assignment(-(r2 * effect))
    per = {}
    for k, f in zip(rows, cols):
        total = effect[k].sum()
        leakage = float((total - effect[k, f]) / total) if total > 0 else 1.0
        ok = bool(r2[k, f] >= r2_min and leakage <= leakage_max)
        per[FACTORS[f]] = {"direction": int(k), "r2": float(r2[k, f]), "leakage": leakage, "recovered": ok}
    return {"factors": per, "recovered": sum(v["recovered"] for v in per.values()),
            "mean_matched_r2": float(np.mean([v["r2"] for v in per.values()])) if per else 0.0}

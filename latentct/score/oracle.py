"""The factor oracle: a CNN that reads the phantom's six factors off one slice, so that what a latent direction
does can be scored against the truth.

    python -m latentct.score.oracle --image-size 64 --window default        # trains, or reuses the cached one

It is trained only on freshly rendered phantom slices: every slice a new patient with every factor drawn
independently (so it cannot memorise patients), rendered at the phantom's 128 px and read back exactly as
preprocessing reads the phantom's DICOM (integer HU, padding outside the reconstruction circle), resized with
the same anti-aliased filter and windowed. Its targets are what a slice shows (``phantom.visible_factors``):
the breast factor is the visible projection, not the patient's breast size. It is scored on fresh slices of
patients it never saw. One oracle serves every run with the same image size, window and phantom version:
it is cached in ``runs/oracle/<key>/oracle.pt`` and named in every report by the file's sha256.
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

from latentct.data.phantom import FACTORS, PHANTOM_VERSION
from latentct.data.slices import hu_to_unit, parse_window
from latentct.models.encoders import strided_convs
from latentct.train.checkpoint import load_file
from latentct.util.io import atomic_torch_save
from latentct.util.parallel import pool_map, worker_pool
from latentct.util.settings import UserError, check, run_cli, save_settings, setting

CHUNK = 200  # slices per rendering job


@dataclass
class Settings:
    """Train (or reuse) the factor oracle for one image size and HU window."""

    image_size: int = setting(64, "side of the slices it reads (the generators' resolution)")
    window: str = setting("default", "HU window of the images it reads (the generators' training window)")
    output: str | None = setting(None, "folder for oracle.pt (default: <root>/runs/oracle/<size, window, phantom>)")
    root: str = setting(".", "folder under which runs/oracle/ lives")
    render_size: int = setting(128, "matrix size the phantom is rendered at before resizing (the demo's phantom)")
    train_slices: int = setting(16000, "freshly rendered training slices, one new patient each")
    test_slices: int = setting(2000, "fresh held-out slices of other patients for the R2")
    steps: int = setting(3000, "training steps (24,000 slices and 4,000 steps reach R2 0.954 for z, 3 min on 2 cores)")
    batch_size: int = setting(64, "slices per step")
    width: int = setting(16, "channels of the first convolution")
    lr: float = setting(2e-3, "peak Adam learning rate of a one-cycle schedule")
    # The slice level is the hardest factor to read (R2 0.926 at weight 1, 0.946 at 3 with the same steps; the
    # others stay at 0.996 and above): its loss counts z_weight times.
    z_weight: float = setting(3.0, "weight of the slice level's loss against the other factors' (1 each)")
    seed: int = setting(0, "seed for the rendered slices and the weights (another seed: other slices)")
    workers: int = setting(1, "processes that render slices")
    # Generated slices are blurred (the VAE), grainy and shifted in contrast (the DCGAN) and a little warped; an
    # oracle trained on crisp renders alone reads them poorly (z R2 0.42, breast 0.48 on VAE reconstructions).
    # It never trains on a generator's output: these are generic image changes drawn at random per slice.
    augment: bool = setting(True, "train on slices blurred, noised, contrast- and gamma-shifted and mildly warped "
                            "at random, as generators render (held-out R2 is on crisp slices)")

    def __post_init__(self):
        check(self.image_size >= 16 and self.image_size & (self.image_size - 1) == 0, "image_size",
              f"must be a power of two of at least 16, got {self.image_size}")
        for name in ("train_slices", "test_slices", "steps", "batch_size", "width", "workers"):
            check(getattr(self, name) >= 1, name, f"must be at least 1, got {getattr(self, name)}")
        check(self.z_weight > 0, "z_weight", f"must be positive, got {self.z_weight}")
        parse_window(self.window)


def cache_key(image_size: int, window, render_size: int = 128, seed: int = 0, width: int = 16) -> str:
    """The cache folder's name: two oracles of other seeds or widths (the fit and the score oracle) never share
    one."""
    low, high = parse_window(window)
    return f"{image_size}px_hu{low:g}_{high:g}_render{render_size}_phantom{PHANTOM_VERSION}_seed{seed}_w{width}"


def folder_for(cfg: Settings) -> Path:
    if cfg.output:
        return Path(cfg.output)
    return Path(cfg.root) / "runs" / "oracle" / cache_key(cfg.image_size, cfg.window, cfg.render_size, cfg.seed,
                                                          cfg.width)


def augment(x: torch.Tensor, gen: torch.Generator, blur: float = 1.5) -> torch.Tensor:
    """(B, 1, S, S) in [-1, 1] -> the same slices as a generator might render them: per slice a Gaussian blur of
    sigma 0-``blur`` px, a smooth warp of up to 1 px, contrast x0.85-1.15 and brightness +-0.05, gamma 0.8-1.25 on
    [0, 1], and grain of sigma 0-0.04. The factors a slice shows stay what they are."""
    B, _, S, _ = x.shape
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    sigma = blur * u(B)
    radius = max(3, math.ceil(2 * blur))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True))[:, None, None, :]          # (B, 1, 1, 2r+1): one per slice
    grouped = F.pad(x.transpose(0, 1), (radius, radius, radius, radius), mode="replicate")
    blurred = F.conv2d(F.conv2d(grouped, kernel, groups=B), kernel.transpose(2, 3), groups=B).transpose(0, 1)
    coarse = (u(B, 2, 4, 4) * 2 - 1) * (2.0 / S)                              # up to 1 px in grid units
    flow = F.interpolate(coarse, size=(S, S), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    base = F.affine_grid(torch.eye(2, 3).expand(B, 2, 3), (B, 1, S, S), align_corners=False)
    warped = F.grid_sample(blurred, base + flow, padding_mode="border", align_corners=False)
    contrast = (0.85 + 0.3 * u(B, 1, 1, 1)) * warped + (u(B, 1, 1, 1) - 0.5) * 0.1
    unit = ((contrast.clamp(-1, 1) + 1) / 2) ** (0.8 + 0.45 * u(B, 1, 1, 1))
    grain = 0.04 * u(B, 1, 1, 1) * torch.randn(x.shape, generator=gen)
    return (unit * 2 - 1 + grain).clamp(-1, 1)


class OracleNet(nn.Module):
    """Strided convolutions down to 4 x 4, then a small MLP on the flattened map: the map keeps where things
    are (table height and roll are positions, not textures), which a global average would throw away."""

    def __init__(self, image_size: int = 64, width: int = 32, outputs: int = len(FACTORS)):
        super().__init__()
        layers, c = strided_convs(image_size, width)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * 16, 256), nn.LeakyReLU(0.2), nn.Linear(256, outputs))

    def forward(self, x):
        return self.head(self.features(x))


# ------------------------------------------------------------------------------------------ slices

def _render_chunk(job: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Worker: ``count`` slices of new patients as int16 HU (count, copies, S, S) and their visible factors.
    Copies after the first are other patients given the first one's five patient-level factors, at the same z:
    the same factors under other nuisance (fat, organ sizes, diaphragm, vessels, contrast, noise, padding).
    ``fine=False``: without lung vessels, ribs and sternum (phantom.render_slice), the same patients, z and noise."""
    import dataclasses

    from latentct.data import phantom
    from latentct.data.dicom import resize_slices

    seed, stream, chunk, count, render_size, image_size, copies, fine = job
    torch.set_num_threads(1)
    rng = np.random.default_rng([seed, stream, chunk])
    images, targets = [], []
    for _ in range(count):
        patient = phantom.sample_patient(rng)
        z = float(rng.uniform(0.0, 1.0))
        group = [patient] + [dataclasses.replace(phantom.sample_patient(rng), **{f: getattr(patient, f) for f in
                                                                                FACTORS[1:]})
                             for _ in range(copies - 1)]
        images.extend(phantom.as_read_back(phantom.render_slice(p, z, render_size, rng, fine=fine), p.padding)
                      for p in group)
        targets.append(phantom.visible_factors(patient, z))
    hu = resize_slices(np.stack(images), image_size)
    return hu.reshape(count, copies, *hu.shape[1:]), np.asarray(targets, dtype=np.float32)


def render_slices(count: int, image_size: int, seed: int, stream: int, render_size: int = 128, workers: int = 1,
                  desc: str = "phantom slices", copies: int = 1, fine: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, copies, S, S) int16 HU slices of fresh patients, every factor independent, and (count, 6)
    targets; ``copies`` > 1 adds per slice renders of other patients that share its six factors (the nuisance
    average of bench.oracle_reading); ``fine=False`` renders the same slices without their finest anatomy.
    ``stream`` separates the training, held-out and validation draws of one seed."""
    jobs = [(seed, stream, i, min(CHUNK, count - start), render_size, image_size, copies, fine)
            for i, start in enumerate(range(0, count, CHUNK))]
    with worker_pool(workers) as pool:
        parts = list(pool_map(_render_chunk, jobs, pool, desc, "chunk"))
    hu = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    return hu, torch.from_numpy(np.concatenate([p[1] for p in parts]))


def r_squared(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per column: 1 - residual / total sum of squares."""
    sst = ((target - target.mean(0)) ** 2).sum(0).clamp_min(1e-12)
    return 1 - ((pred - target) ** 2).sum(0) / sst


# ------------------------------------------------------------------------------------------ the oracle

class Oracle:
    """A trained oracle: ``read(images)`` gives the six factors in their units, ``read_std`` in units of each
    factor's spread over the training slices (so effects on different factors compare)."""

    def __init__(self, state: dict, path: Path | None = None):
        self.state, self.path = state, path
        self.model = OracleNet(**state["args"])
        self.model.load_state_dict(state["state_dict"])
        self.model.eval().requires_grad_(False)
        self.mean, self.std = state["mean"], state["std"]
        self.window = tuple(state["window"])
        self.image_size = state["args"]["image_size"]
        self.r2 = state["r2"]
        self.sha256 = None
        if path is not None:
            from latentct.generators.interface import file_hash

            self.sha256 = file_hash(path)

    @torch.no_grad()
    def read_std(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) in [-1, 1] of the oracle's window -> (N, 6) standardised factors."""
        if images.shape[-1] != self.image_size:
            raise UserError(f"oracle: trained on {self.image_size} px slices, given {images.shape[-1]} px")
        return torch.cat([self.model(part.float()) for part in images.split(512)])

    def read(self, images: torch.Tensor) -> torch.Tensor:
        return self.read_std(images) * self.std + self.mean


def train_oracle(cfg: Settings) -> dict:
    """Render, train, score on held-out slices; the state that ``Oracle`` loads."""
    train = render_slices(cfg.train_slices, cfg.image_size, cfg.seed, 1, cfg.render_size, cfg.workers,
                          "oracle training slices")
    test = render_slices(cfg.test_slices, cfg.image_size, cfg.seed, 2, cfg.render_size, cfg.workers,
                         "oracle held-out slices")
    return fit_oracle(cfg, train, test)


def fit_oracle(cfg: Settings, train: tuple, test: tuple, augmentation=augment) -> dict:
    """Train on rendered (HU slices, factors) ``train``, augmented by ``augmentation(x, gen)`` when
    ``cfg.augment``, and score on ``test``; the state that ``Oracle`` loads. bench.oracle_reading fits other
    augmentations to the same slices."""
    window = parse_window(cfg.window)
    (train_hu, train_y), (test_hu, test_y) = train, test
    torch.manual_seed(cfg.seed)
    mean, std = train_y.mean(0), train_y.std(0).clamp_min(1e-6)
    args = dict(image_size=cfg.image_size, width=cfg.width)
    model = OracleNet(**args)
    gen = torch.Generator().manual_seed(cfg.seed)

    def batch(idx):
        x = hu_to_unit(train_hu[idx], window)
        return augmentation(x, gen) if cfg.augment else x

    weights = torch.ones(len(FACTORS))
    weights[FACTORS.index("z_position")] = cfg.z_weight
    fit_reader(model, batch, (train_y - mean) / std, cfg.steps, cfg.batch_size, cfg.lr, gen, pct_start=0.1,
               weights=weights)
    model.eval()
    state = {"state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}, "args": args,
             "factors": list(FACTORS), "mean": mean, "std": std, "window": list(window), "r2": {},
             "phantom_version": PHANTOM_VERSION,
             "key": cache_key(cfg.image_size, cfg.window, cfg.render_size, cfg.seed, cfg.width), "seed": cfg.seed,
             "test_slices": cfg.test_slices}
    pred = Oracle(state).read(hu_to_unit(test_hu, window))
    state["r2"] = {f: float(v) for f, v in zip(FACTORS, r_squared(pred, test_y))}
    return state


def fit_reader(model: nn.Module, batch, targets: torch.Tensor, steps: int, batch_size: int, lr: float,
               gen: torch.Generator, pct_start: float, desc: str = "oracle", weights: torch.Tensor | None = None) -> None:
    """Train a reader of standardised factors: Adam with a one-cycle schedule on a smooth-L1 loss (each factor's
    column weighted by ``weights``, default 1), batches of rows drawn from ``gen`` (``batch(idx)``: those rows'
    images). The oracle and the VAE-readability probe."""
    weights = torch.ones(targets.shape[1]) if weights is None else weights / weights.mean()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=pct_start)
    for _ in tqdm(range(steps), desc=desc, unit="step", leave=False):
        idx = torch.randint(0, len(targets), (batch_size,), generator=gen)
        loss = (F.smooth_l1_loss(model(batch(idx)), targets[idx], beta=0.1, reduction="none") * weights).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def load_oracle(path: str | Path) -> Oracle:
    state = load_file(path, "factor oracle")
    if not isinstance(state, dict) or "state_dict" not in state or state.get("phantom_version") is None:
        raise UserError(f"{path}: not a LatentCT factor oracle")
    if state["phantom_version"] != PHANTOM_VERSION:
        raise UserError(f"{path}: trained on phantom version {state['phantom_version']}, this is version "
                        f"{PHANTOM_VERSION}; rerun python -m latentct.score.oracle")
    return Oracle(state, Path(path))


def main(cfg: Settings) -> dict:
    """Train the oracle into its cache folder, or reuse the one there when it was trained with these settings."""
    folder = folder_for(cfg)
    path, config = folder / "oracle.pt", folder / "config.json"
    from latentct.util.settings import settings_dict

    wanted = {k: v for k, v in settings_dict(cfg).items() if k not in ("output", "root", "workers")}
    if path.is_file() and config.is_file():
        saved = {k: v for k, v in json.loads(config.read_text()).items() if k not in ("output", "root", "workers")}
        if saved == wanted:
            oracle = load_oracle(path)
            print(f"factor oracle reused: {path} (sha256 {oracle.sha256[:12]})")
            return oracle.r2
    folder.mkdir(parents=True, exist_ok=True)
    state = train_oracle(cfg)
    atomic_torch_save(state, path)
    save_settings(cfg, config)
    print(f"factor oracle -> {path}; held-out R2 on {cfg.test_slices} fresh slices: "
          + ", ".join(f"{f} {v:.3f}" for f, v in state["r2"].items()))
    return state["r2"]


def summary_line(output: Path) -> str:
    """The pipeline's one line for this stage."""
    r2 = torch.load(Path(output) / "oracle.pt", weights_only=True)["r2"]
    return "held-out R2 " + ", ".join(f"{v:.2f}" for v in r2.values())


if __name__ == "__main__":
    run_cli(main, Settings, prog="python -m latentct.score.oracle")

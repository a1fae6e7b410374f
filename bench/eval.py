"""Benchmark: time to render every GIF and the measurement report for K = 32 directions at 64 px on CPU,
against the original code's way (one generator call per frame, one matplotlib figure per frame).

    python -m bench.eval [--directions-count 32] [--frames 33]
"""
from __future__ import annotations

import copy
import io
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch

from latentct.discover.directions import Directions
from latentct.models.dcgan import Generator, weights_init
from latentct.score.report import describe, sweep
from latentct.show.render import direction_gif, grid_gif, sweep_plan, sweep_shifts
from latentct.util.settings import parse_settings, setting


@dataclass
class Settings:
    """Rendering and report time against the original's frame-by-frame matplotlib rendering."""

    directions_count: int = setting(32, "K")
    image_size: int = setting(64, "generator output size")
    frames: int = setting(33, "frames per sweep")
    grid_samples: int = setting(5, "samples in the grid GIFs")


def naive(G, matrix: torch.Tensor, z: torch.Tensor, eps: torch.Tensor, folder: Path) -> None:
    """The original's way: a generator call and a matplotlib figure for every frame of every direction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for k in range(matrix.shape[0]):
        frames = []
        for e in eps:
            with torch.no_grad():
                img = G((z + e * matrix[k])[None])[0, 0].numpy()
            fig, ax = plt.subplots(figsize=(2, 2))
            ax.imshow(img, cmap="gray", vmin=-1, vmax=1)
            ax.axis("off")
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=48)
            plt.close(fig)
            frames.append(iio.imread(buf.getvalue()))
        iio.imwrite(folder / f"naive_{k}.gif", np.stack(frames), extension=".gif", duration=50, loop=0)


def ours(G, directions: Directions, z: torch.Tensor, cfg: Settings, folder: Path) -> None:
    ks = list(range(directions.count))
    unique, order = sweep_plan(6.0, cfg.frames)
    eps = unique[order]
    images = sweep(G, directions, ks, unique, z)
    for k in ks:
        direction_gif(images[k, order, 0], eps, 6.0, folder / f"direction_{k}.gif")
    for start in range(0, len(ks), 10):
        grid_gif(images[start:start + 10][:, order], eps, 6.0, folder / f"group_{start}.gif")
    report_eps = torch.linspace(-6, 6, 9)
    describe(sweep(G, directions, ks, report_eps, torch.randn(16, G.latent_dim)), report_eps, (-1000, 2000), 6.25, ks)


def ours_gifs_only(G, directions: Directions, z: torch.Tensor, cfg: Settings, folder: Path) -> None:
    """The same work as the naive reference: one GIF per direction for one sample."""
    unique, order = sweep_plan(6.0, cfg.frames)
    eps = unique[order]
    images = sweep(G, directions, list(range(directions.count)), unique, z[:1])
    for k in range(directions.count):
        direction_gif(images[k, order, 0], eps, 6.0, folder / f"only_{k}.gif")


def main(cfg: Settings) -> dict:
    torch.manual_seed(0)
    G = Generator(32, cfg.image_size, 32).apply(weights_init).eval()
    q, _ = torch.linalg.qr(torch.randn(32, 32))
    matrix = q[: cfg.directions_count]
    directions = Directions({"method": "random", "matrix": matrix, "deformator": None, "generator": {"path": "-"},
                             "rca": None}, Path("-"))
    z = torch.randn(cfg.grid_samples, 32)
    with tempfile.TemporaryDirectory() as tmp:
        fast = copy.deepcopy(G).to(memory_format=torch.channels_last)
        started = time.perf_counter()
        ours(fast, directions, z, cfg, Path(tmp))
        t_ours = time.perf_counter() - started
        started = time.perf_counter()
        ours_gifs_only(fast, directions, z, cfg, Path(tmp))
        t_same = time.perf_counter() - started
        started = time.perf_counter()
        naive(G, matrix, z[0], sweep_shifts(6.0, cfg.frames), Path(tmp))
        t_naive = time.perf_counter() - started
    print(f"\nrendering benchmark, K={cfg.directions_count}, {cfg.image_size}px, {cfg.frames} frames, CPU")
    print(f"  ours  (all GIFs, grid GIFs of {cfg.grid_samples} samples, and the measurement report) {t_ours:7.2f} s")
    print(f"  naive (per-direction GIFs only, one call and one figure per frame)              {t_naive:7.2f} s")
    print(f"  ours, the same work as naive (per-direction GIFs only)                            {t_same:7.2f} s")
    print(f"  speed-up: {t_naive / t_ours:.1f}x with the report and grids, {t_naive / t_same:.1f}x like for like")
    return {"ours_s": t_ours, "ours_same_work_s": t_same, "naive_s": t_naive, "ratio": t_naive / t_ours,
            "ratio_same_work": t_naive / t_same}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(parse_settings(Settings)), default=float))

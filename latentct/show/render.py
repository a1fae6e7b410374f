"""Animations and charts of directions: every frame of every direction comes from batched generator calls."""
from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch

from latentct.show.images import display, make_grid, save_grid, save_png, to_uint8
from latentct.train.runtime import evaluating
from latentct.util.io import atomic_path


def sweep_plan(shift_scale: float, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct shifts of a back-and-forth sweep (-R .. +R) and, per frame, which of them it shows
    (33 frames = 17 out, 16 back): each distinct image is generated once."""
    unique = torch.linspace(-shift_scale, shift_scale, frames // 2 + 1)
    order = torch.cat([torch.arange(len(unique)), torch.arange(len(unique) - 2, -1, -1)])[:frames]
    return unique, order


def sweep_shifts(shift_scale: float, frames: int) -> torch.Tensor:
    """The shift of every frame of a back-and-forth sweep: -R .. +R .. -R, 0 in the middle of each pass."""
    unique, order = sweep_plan(shift_scale, frames)
    return unique[order]


def shift_strip(width: int, eps: float, shift_scale: float, height: int = 3) -> np.ndarray:
    """A strip under each frame: a dot where the shift is, the whole strip lit at the centre frame (eps = 0)."""
    strip = np.zeros((height, width), dtype=np.uint8)
    if abs(eps) < 1e-6:
        strip[:] = 255
        return strip
    pos = int(round((eps + shift_scale) / (2 * shift_scale) * (width - 1)))
    strip[:, max(pos - 1, 0):pos + 2] = 200
    strip[:, width // 2] = 90
    return strip


def write_gif(frames: list[np.ndarray], path: str | Path, frame_ms: int = 50) -> None:
    """The one GIF writer: uint8 frames, looping forever, written atomically. Pillow's palette optimisation is
    off: on about 1 grey sweep in 70 it wrote a frame without a palette, which Pillow itself cannot read back."""
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, np.stack(frames), extension=".gif", duration=frame_ms, loop=0, optimize=False)


def direction_gif(images: torch.Tensor, eps: torch.Tensor, shift_scale: float, path, frame_ms: int = 50) -> None:
    """images (F, 1, H, W) for the shifts ``eps`` of one sweep; one GIF at the model's resolution."""
    frames = [np.vstack([to_uint8(img), shift_strip(img.shape[-1], float(e), shift_scale)])
              for img, e in zip(images, eps)]
    write_gif(frames, path, frame_ms)


def grid_gif(images: torch.Tensor, eps: torch.Tensor, shift_scale: float, path, frame_ms: int = 50) -> None:
    """images (K, F, Z, 1, H, W): rows = directions, columns = z samples, one frame per shift."""
    K, F, Z = images.shape[:3]
    frames = []
    for f in range(F):
        grid = to_uint8(make_grid(images[:, f].reshape(K * Z, *images.shape[3:]), nrow=Z, pad_value=-1.0))
        frames.append(np.vstack([grid, shift_strip(grid.shape[1], float(eps[f]), shift_scale, height=4)]))
    write_gif(frames, path, frame_ms)


def chart(images: torch.Tensor, path) -> None:
    """images (K, E, 1, H, W): a static PNG, rows = directions, columns = shifts."""
    K, E = images.shape[:2]
    save_png(make_grid(images.reshape(K * E, *images.shape[2:]), nrow=E), path)


def heatmap(matrix: np.ndarray, rows: list[str], cols: list[str], title: str, path, highlight=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.1 + 0.75 * len(cols), 0.8 + 0.22 * len(rows)))
    im = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=max(1.0, float(np.nanmax(matrix)) if matrix.size else 1))
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for r, c in (highlight or []):
        ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def recovered_plot(methods: dict, taus, headline: float, path) -> None:
    """Recovered factors against the share a recovered factor needs (tau), one line per method; the headline
    tau marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 2.8))
    for name, table in methods.items():
        ax.step(taus, table["curve"], where="post", label=name, lw=1.2)
    ax.axvline(headline, color="red", lw=1, ls="--", label=f"tau = {headline:.2f}")
    ax.set_xlabel("share of the direction's effect (tau)")
    ax.set_ylabel("factors recovered")
    ax.set_ylim(-0.2, 6.2)
    ax.legend(fontsize=6, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def direction_chart(G, deformator, z: torch.Tensor, shift_scale: float, display_window: str, path) -> None:
    """``path``: a chart of the first (up to 8) directions, one row each at 7 shifts from -scale to +scale, in the
    display window."""
    K = deformator.directions_count
    shown = min(K, 8)
    eps = torch.linspace(-shift_scale, shift_scale, 7, device=z.device)
    basis = torch.zeros(shown * 7, K, device=z.device)
    basis[torch.arange(shown * 7), torch.arange(shown).repeat_interleave(7)] = eps.repeat(shown)
    with evaluating(deformator):
        images = G(z.expand(shown * 7, -1) + deformator(basis)).float()
    save_grid(display(images, G.window, display_window), path, nrow=7)

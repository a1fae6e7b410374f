"""Preprocessed slices for training: lazy memory-mapped dataset, HU windows, batched augmentation."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from latentct.util.settings import UserError

# default: the original study's training window; lung: a narrower one, and the pictures' default (air black,
# lungs dark, fat, soft tissue and contrast in greys, bone white). The last two are the radiologists' reading
# windows (width/level 1500/-600 and 400/40).
WINDOWS = {"default": (-1000.0, 2000.0), "lung": (-1000.0, 400.0),
           "pulmonary": (-1350.0, 150.0), "mediastinal": (-160.0, 240.0)}


def parse_window(window: str | Sequence[float], name: str = "--window") -> tuple[float, float]:
    """A named window (see WINDOWS) or 'LOW,HIGH' in HU; ``name`` is the flag an error names."""
    if isinstance(window, str):
        if window in WINDOWS:
            return WINDOWS[window]
        try:
            low, high = (float(v) for v in window.split(","))
        except ValueError:
            raise UserError(f"{name}: {window!r} is neither {', '.join(WINDOWS)} nor LOW,HIGH in HU") from None
    else:
        low, high = (float(v) for v in window)
    if not high > low:
        raise UserError(f"{name}: upper bound {high} must exceed lower bound {low}")
    return low, high


def hu_to_unit(hu: torch.Tensor, window) -> torch.Tensor:
    """HU to [-1, 1] through a window (values outside it are clipped)."""
    low, high = parse_window(window)
    return ((hu.float() - low) / (high - low) * 2 - 1).clamp_(-1, 1)


def unit_to_hu(x: torch.Tensor, window) -> torch.Tensor:
    low, high = parse_window(window)
    return (x.float() + 1) / 2 * (high - low) + low


def load_manifest(folder: str | Path) -> dict:
    """The manifest of a finished preprocessing run, or a clear error."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise UserError(f"{folder}: not a preprocessed dataset (no manifest.json); run preprocess.py first")
    return json.loads(path.read_text())


def read_index(folder: str | Path, split: str) -> list[dict]:
    with open(Path(folder) / f"{split}_index.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def is_dataset(folder: str | Path | None) -> bool:
    """Whether ``folder`` is a finished preprocessing run (it has its manifest)."""
    return bool(folder) and (Path(folder) / "manifest.json").is_file()


def held_out(folder: str | Path | None, window) -> "CTSlices | None":
    """The real slices an evaluation compares with and embeds: the test split, or the train split where the test
    split is empty (a dataset preprocessed with --test-fraction 0); None without a dataset."""
    if not is_dataset(folder):
        return None
    split = CTSlices(folder, "test", window=window)
    return split if len(split) else CTSlices(folder, "train", window=window)


def has_factors(folder: str | Path) -> bool:
    """Whether a preprocessed dataset came from the phantom (its index carries the six factors)."""
    from latentct.data.phantom import FACTORS

    index = read_index(folder, "train")
    return bool(index) and all(f in index[0] and index[0][f] != "" for f in FACTORS)


class CTSlices(torch.utils.data.Dataset):
    """Slices of one split as float tensors (1, S, S) in [-1, 1]; with ``labels``, also a float vector.

    The array is memory-mapped on first access in each process, so DataLoader workers open their own map.
    """

    def __init__(self, folder: str | Path, split: str = "train", window="default",
                 labels: Sequence[str] | None = None):
        self.folder, self.split = Path(folder), split
        self.manifest = load_manifest(folder)
        self.window = parse_window(window)
        self.labels = list(labels or [])
        self._array = None
        self.length = int(self.manifest["counts"]["slices"][split])
        self._targets = None
        if self.labels:
            index = read_index(folder, split)
            missing = [c for c in self.labels if index and c not in index[0]]
            if missing:
                raise UserError(f"{folder}/{split}_index.csv has no column(s) {', '.join(missing)}")
            self._targets = torch.tensor([[float(row[c]) if row[c] != "" else math.nan for c in self.labels]
                                          for row in index], dtype=torch.float32)

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.folder / f"{self.split}.npy", mmap_mode="r")
        return self._array

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        image = hu_to_unit(torch.from_numpy(np.array(self.array[i])), self.window)
        return (image, self._targets[i]) if self._targets is not None else image

    def __getstate__(self):  # never pickle an open map into a worker
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    def tensor(self, device=None) -> torch.Tensor:
        """The whole split as int16 HU on ``device``: on a GPU the dataset stays resident there."""
        return torch.from_numpy(np.ascontiguousarray(self.array)).to(device)


def random_affine(x: torch.Tensor, max_rotation_deg: float = 1.0, scale_range=(1.0, 1.1),
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Rotate each image of a batch by up to +-max_rotation_deg and zoom by a factor in scale_range.

    One grid_sample call for the whole batch, on whatever device ``x`` is on. Areas brought in from
    outside are filled with -1 (air after windowing).
    """
    n = x.shape[0]
    rand = torch.rand(n, 2, generator=generator, device="cpu").to(x.device)
    angle = (rand[:, 0] * 2 - 1) * math.radians(max_rotation_deg)
    scale = scale_range[0] + rand[:, 1] * (scale_range[1] - scale_range[0])
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=torch.float32)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = F.affine_grid(theta, list(x.shape), align_corners=False).to(x.dtype)
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


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

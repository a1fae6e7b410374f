"""The one checkpoint helper: atomic saves that keep the previous file, loads with weights_only=True."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from latentct.util.io import atomic_torch_save
from latentct.util.settings import UserError


def rng_state() -> dict:
    """Every random-number state the training loops draw from (torch CPU and CUDA, numpy)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore ``rng_state()``'s states (CPU tensors: the RNG setters take nothing else)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` atomically; the checkpoint it replaces is kept as ``<name>.prev.pt``."""
    path = Path(path)
    if path.exists():
        os.replace(path, path.with_suffix(".prev.pt"))
    atomic_torch_save(state, path)


def load_file(path: str | Path, what: str):
    """Any of the project's torch files (weights_only=True), with a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{path}: not a readable {what} ({type(err).__name__})") from None


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; a damaged file is a one-line error naming the fallback."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint") from None
    except Exception as err:
        prev = path.with_suffix(".prev.pt")
        hint = (f"; the previous checkpoint {prev} is intact: move it to {path.name} to resume from it"
                if prev.is_file() and _loads(prev) else "")
        raise UserError(f"{path}: checkpoint is truncated or corrupt ({type(err).__name__}){hint}") from None


def _loads(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
        return True
    except Exception:
        return False
